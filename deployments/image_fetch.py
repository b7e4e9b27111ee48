"""Fetching client image URLs without letting a client reach the cluster's own network (SSRF).

Each hop resolves its host once, refuses any address that is not globally routable (loopback,
RFC 1918, link-local incl. 169.254.169.254, CGNAT, unique-local, multicast, and the IPv4-mapped,
6to4 and NAT64 forms of those), then connects to that pinned address, so a second DNS answer
cannot swap in an internal one. Redirects are followed by hand, a few hops at most, each hop
checked the same way. Proxies from the environment are ignored (`trust_env=False`).

Clients get one generic message whatever went wrong (refused address, DNS failure, connection
refused, HTTP error, too large, too slow), so the fetcher cannot be used to map internal ports;
the detail goes to the log. Operators who need internal image hosts name them in an allow-list.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterable

from vlora.engine.images import ImageLoadPolicy, ImageSourceError

log = logging.getLogger("vlora.image_fetch")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_REDIRECTS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class FetchRefused(Exception):
    """Why one fetch failed (logged, never shown to the client)."""


def is_public_address(ip: IPAddress) -> bool:
    """Globally routable unicast, looking through IPv4-mapped, 6to4 and NAT64 wrappers."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            return is_public_address(ip.sixtofour)
        if ip.teredo is not None:
            return False
        if ip in _NAT64:
            return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_link_local or ip.is_loopback)


class ImageFetcher:
    """`fetcher(url) -> bytes` for `ImageLoadPolicy.fetch`; every failure is one ImageSourceError."""

    def __init__(self, timeout_s: float = 10.0, max_bytes: int = 20 * 2**20, max_redirects: int = 3,
                 allowed_hosts: Iterable[str] = (), allowed_networks: Iterable[str] = (),
                 resolve: Callable[..., list] = socket.getaddrinfo):
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.allowed_hosts = tuple(h.lower().rstrip(".") for h in allowed_hosts)
        self.allowed_networks = tuple(ipaddress.ip_network(n, strict=False) for n in allowed_networks)
        self.resolve = resolve
        self.message = (f"could not fetch an image from that URL: it must be a public http(s) address that answers "
                        f"within {timeout_s:g} s with an image of at most {max_bytes} bytes; or send the image as a "
                        "data:image/...;base64 URL")

    def __call__(self, url: str) -> bytes:
        try:
            return self._fetch(url)
        except Exception as exc:  # noqa: BLE001 - one answer for every cause; the cause goes to the log
            log.warning("image fetch refused or failed: %s (%s: %s)", url[:200], type(exc).__name__, exc)
            raise ImageSourceError(self.message) from None

    # -- checks -------------------------------------------------------------------------------
    def _host_allowed(self, host: str) -> bool:
        return any(host == h or (h.startswith(".") and host.endswith(h)) for h in self.allowed_hosts)

    def _address_allowed(self, ip: IPAddress) -> bool:
        return is_public_address(ip) or any(ip in net for net in self.allowed_networks)

    def pin(self, url: str) -> tuple[str, str, int, str]:
        """(scheme, host, port, address) to connect to, or FetchRefused."""
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise FetchRefused(f"scheme {scheme!r}")
        if parts.username is not None or parts.password is not None:
            raise FetchRefused("credentials in the URL")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise FetchRefused("no host")
        port = parts.port or (443 if scheme == "https" else 80)  # .port raises ValueError on a bad port
        infos = self.resolve(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
        if not addresses:
            raise FetchRefused(f"{host} has no address")
        if not self._host_allowed(host):
            bad = [str(a) for a in addresses if not self._address_allowed(a)]
            if bad:  # any internal answer refuses the host: the next resolution could pick it
                raise FetchRefused(f"{host} resolves to non-public {bad}")
        return scheme, host, port, str(addresses[0])

    # -- network ------------------------------------------------------------------------------
    def _fetch(self, url: str) -> bytes:
        import httpx

        deadline = time.monotonic() + self.timeout_s
        with httpx.Client(trust_env=False, follow_redirects=False, timeout=self.timeout_s) as client:
            for _ in range(self.max_redirects + 1):
                scheme, host, port, address = self.pin(url)
                parts = urllib.parse.urlsplit(url)
                literal = f"[{address}]" if ":" in address else address
                default = port == (443 if scheme == "https" else 80)
                target = urllib.parse.urlunsplit((scheme, f"{literal}:{port}", parts.path or "/", parts.query, ""))
                host_header = host if default else f"{host}:{port}"
                if ":" in host and not host.startswith("["):  # an IPv6 literal host
                    host_header = f"[{host}]" if default else f"[{host}]:{port}"
                ext = {"sni_hostname": host} if scheme == "https" else {}
                with client.stream("GET", target, headers={"Host": host_header}, extensions=ext) as response:
                    if response.status_code in _REDIRECTS:
                        location = response.headers.get("location")
                        if not location:
                            raise FetchRefused(f"HTTP {response.status_code} without Location")
                        url = urllib.parse.urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        raise FetchRefused(f"HTTP {response.status_code}")
                    return self._read(response, deadline)
        raise FetchRefused(f"more than {self.max_redirects} redirects")

    def _read(self, response, deadline: float) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise FetchRefused(f"Content-Length {declared} above {self.max_bytes}")
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > self.max_bytes:
                raise FetchRefused(f"body above {self.max_bytes} bytes")
            if time.monotonic() > deadline:
                raise FetchRefused("download deadline passed")
        return bytes(body)


def image_load_policy(images) -> ImageLoadPolicy:
    """The ImageLoadPolicy of a config's `images` section (deployments/config.py ImageLimits), with this
    module's fetcher for http(s) URLs."""


    fetch = ImageFetcher(images.http_timeout_s, images.max_image_bytes, images.max_redirects, images.allowed_hosts,
                         images.allowed_networks) if images.allow_http else None
    return ImageLoadPolicy(max_bytes=images.max_image_bytes, max_image_pixels=images.max_image_pixels,
                           allow_http=images.allow_http, http_timeout_s=images.http_timeout_s,
                           allowed_local_dirs=tuple(images.allowed_local_dirs), fetch=fetch)
