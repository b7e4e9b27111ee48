"""deployments.image_fetch: internal addresses are never contacted, whatever the spelling or redirect,
and every failure reads the same to the client."""

from __future__ import annotations

import io
import ipaddress
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from vlora.deployments.image_fetch import ImageFetcher, is_public_address
from vlora.engine.images import ImageLoadPolicy, ImageSourceError, load_image


def png(h: int = 20, w: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(h * w).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    """Loopback HTTP server: path -> (status, body or Location, send Content-Length?, delay); counts hits."""
    routes: dict[str, tuple[int, bytes | str, bool, float]] = {}
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path not in routes:
                self.send_error(404)
                return
            status, body, send_length, delay = routes[self.path]
            time.sleep(delay)
            self.send_response(status)
            if status in (301, 302, 303, 307, 308):
                self.send_header("Location", body)
                self.end_headers()
                return
            self.send_header("Content-Type", "image/png")
            if send_length:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1], routes, hits
    srv.shutdown()
    srv.server_close()


LOOPBACK_SPELLINGS = ["127.0.0.1", "0x7f000001", "2130706433", "127.1", "0177.0.0.1", "localhost",
                      "[::ffff:127.0.0.1]", "[::1]", "0.0.0.0"]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_loopback_in_any_spelling_is_never_contacted(server, host):
    port, routes, hits = server
    routes["/cat.png"] = (200, png(), True, 0.0)
    fetcher = ImageFetcher(timeout_s=2)
    before = len(hits)
    with pytest.raises(ImageSourceError) as e:
        fetcher(f"http://{host}:{port}/cat.png")
    assert str(e.value) == fetcher.message
    assert len(hits) == before  # the listener saw nothing


def test_every_failure_reads_the_same(server):
    """Refused address, DNS failure, connection refused, 404, too slow, too large: one message."""
    port, routes, hits = server
    routes["/slow.png"] = (200, png(), True, 1.0)
    routes["/big.png"] = (200, png(200, 200), False, 0.0)
    allow = ImageFetcher(timeout_s=0.3, max_bytes=5000, allowed_networks=["127.0.0.0/8"])
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    messages = set()
    for fetcher, url in [(ImageFetcher(), f"http://10.0.0.1:{port}/x.png"),
                         (ImageFetcher(), "http://no-such-host.invalid/x.png"),
                         (allow, f"http://127.0.0.1:{closed}/x.png"),
                         (allow, f"http://127.0.0.1:{port}/missing.png"),
                         (allow, f"http://127.0.0.1:{port}/slow.png"),
                         (allow, f"http://127.0.0.1:{port}/big.png"),
                         (allow, "ftp://127.0.0.1/x.png"),
                         (allow, f"http://user:pw@127.0.0.1:{port}/cat.png")]:
        with pytest.raises(ImageSourceError) as e:
            fetcher(url)
        messages.add(str(e.value).replace("0.3 s", "10 s").replace("5000 bytes", "20971520 bytes"))
    assert messages == {ImageFetcher().message}
    assert "public http(s) address" in ImageFetcher().message and "data:image" in ImageFetcher().message


def test_allow_listed_network_loads_through_the_image_policy(server):
    port, routes, _ = server
    data = png()
    routes["/ok.png"] = (200, data, True, 0.0)
    policy = ImageLoadPolicy(fetch=ImageFetcher(allowed_networks=["127.0.0.0/8"]))
    loaded = load_image(f"http://127.0.0.1:{port}/ok.png", policy)
    assert np.array_equal(np.asarray(loaded), np.asarray(Image.open(io.BytesIO(data))))


def resolver_for(name: str, address: str):
    def resolve(host, port, **kw):
        if host == name:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
        return socket.getaddrinfo(host, port, **kw)
    return resolve


def test_every_redirect_hop_is_checked(server):
    """An allow-listed host that redirects to loopback: the loopback hop is refused before connecting."""
    port, routes, hits = server
    data = png()
    routes["/secret"] = (200, data, True, 0.0)
    routes["/hop"] = (302, f"http://127.0.0.1:{port}/secret", True, 0.0)
    routes["/hop-hex"] = (302, f"http://0x7f000001:{port}/secret", True, 0.0)
    routes["/local-hop"] = (302, "/ok2.png", True, 0.0)
    routes["/ok2.png"] = (200, data, True, 0.0)
    fetcher = ImageFetcher(allowed_hosts=["images.test"], resolve=resolver_for("images.test", "127.0.0.1"))
    assert fetcher(f"http://images.test:{port}/local-hop") == data  # same-host redirect is followed
    for path in ("/hop", "/hop-hex"):
        with pytest.raises(ImageSourceError):
            fetcher(f"http://images.test:{port}{path}")
    assert "/secret" not in hits
    routes["/loop"] = (302, "/loop", True, 0.0)
    before = hits.count("/loop")
    with pytest.raises(ImageSourceError):
        fetcher(f"http://images.test:{port}/loop")
    assert hits.count("/loop") - before == fetcher.max_redirects + 1


def test_a_name_that_resolves_to_an_internal_address_is_refused(server):
    port, routes, hits = server
    routes["/cat.png"] = (200, png(), True, 0.0)
    fetcher = ImageFetcher(resolve=resolver_for("evil.example", "127.0.0.1"))
    before = len(hits)
    with pytest.raises(ImageSourceError):
        fetcher(f"http://evil.example:{port}/cat.png")
    assert len(hits) == before


@pytest.mark.parametrize("address,public", [
    ("8.8.8.8", True), ("2606:4700::1111", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("::1", False), ("fc00::1", False), ("fe80::1", False), ("::ffff:127.0.0.1", False),
    ("::ffff:10.0.0.1", False), ("2002:7f00:1::", False), ("64:ff9b::a00:1", False), ("::ffff:8.8.8.8", True),
])
def test_public_address_table(address, public):
    assert is_public_address(ipaddress.ip_address(address)) is public
