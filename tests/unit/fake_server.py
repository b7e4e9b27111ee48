"""A loopback HTTP server for the client tests: subclasses answer `route`, the base does the rest.

`FakeServer` listens on 127.0.0.1 (a free port) in a daemon thread, records every request
(method, path, lowercased headers, JSON body or None) under `lock`, counts requests in flight,
and writes what `route` returns: `(status, json_body)` or `(status, json_body, headers)`, or an
`SSE` stream of events ended by `data: [DONE]`.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

ENV_VARS = ("VLORA_URL", "VLORA_API_KEY", "VLORA_ADMIN_KEY")


@dataclass
class SSE:
    """A `text/event-stream` answer: one `data:` line per event, then `data: [DONE]`."""

    events: list[dict]
    headers: dict = field(default_factory=dict)


class FakeServer:
    def __init__(self):
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def _handle(self):
                n = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(n) if n else b""
                body = json.loads(raw) if raw else None
                headers = {k.lower(): v for k, v in self.headers.items()}
                with fake.lock:
                    fake.requests.append({"method": self.command, "path": self.path, "headers": headers,
                                          "body": body})
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    self._send(fake.route(self.command, self.path, body, headers))
                except OSError:  # the client went away (a cancelled request): nothing to answer
                    pass
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def _send(self, response):
                if isinstance(response, SSE):
                    self.send_response(200)
                    self.send_header("content-type", "text/event-stream")
                    for k, v in response.headers.items():
                        self.send_header(k, v)
                    self.end_headers()  # HTTP/1.0: the body ends when the connection closes
                    for e in response.events:
                        self.wfile.write(b"data: " + json.dumps(e).encode() + b"\n\n")
                        self.wfile.flush()
                    self.wfile.write(b"data: [DONE]\n\n")
                    return
                status, body, *extra = response
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in (extra[0] if extra else {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def route(self, method: str, path: str, body, headers: dict):
        """Answer one request (called on the handler's thread, without `lock`)."""
        raise NotImplementedError

    def chats(self) -> list[dict]:
        return [r["body"] for r in self.requests if r["path"] == "/v1/chat/completions"]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def server_fixture(cls, *args):
    """A pytest fixture named `fake`: a running `cls(*args)` with the VLORA_* variables unset."""

    @pytest.fixture
    def fake(monkeypatch):
        for var in ENV_VARS:
            monkeypatch.delenv(var, raising=False)
        server = cls(*args)
        yield server
        server.close()

    return fake
