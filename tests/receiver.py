"""A real webhook receiver on 127.0.0.1 for tests and the benchmark: records every request
(with the time it arrived) and answers as scripted; verifies signatures independently
of monitor's code, from the Standard Webhooks spec and agentctl's scheme."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    at_ns: int  # time.monotonic_ns() when it was read

    @property
    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # wait this long first (a slow or hung receiver)


class Receiver:
    """`script(request) -> Reply` decides each answer (default 200)."""

    def __init__(self, port: int = 0, script: Callable[[Request], Reply] | None = None) -> None:
        self.requests: list[Request] = []
        self.script = script or (lambda request: Reply())
        self.arrived = threading.Condition()
        self.release = threading.Event()  # set: every delayed reply is answered at once
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                request = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.monotonic_ns())
                with receiver.arrived:
                    receiver.requests.append(request)
                    receiver.arrived.notify_all()
                reply = receiver.script(request)
                if reply.delay_s:
                    receiver.release.wait(reply.delay_s)
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender gave up waiting

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = False
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), name="test-receiver")
        self._thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self._thread.join()
        self.server.server_close()  # joins the request threads

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_for(self, count: int, timeout_s: float = 20.0) -> list[Request]:
        """Once at least `count` requests have arrived, all of them."""
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.requests) >= count, timeout_s):
                raise AssertionError(f"{len(self.requests)} webhook requests arrived within {timeout_s}s, expected {count}")
            return list(self.requests)


def standard_signature_ok(request: Request, secret: str, tolerance_s: float = 300.0) -> bool:
    """The Standard Webhooks v1 check, written from the spec: base64(HMAC-SHA256(key,
    "id.timestamp.body")), key = base64-decoded secret after "whsec_"; any listed signature."""
    h = request.headers
    if abs(time.time() - int(h["webhook-timestamp"])) > tolerance_s:
        return False
    key = base64.b64decode(secret[len("whsec_"):]) if secret.startswith("whsec_") else secret.encode()
    signed = f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + request.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(part.partition(",")[2], expected) for part in h["webhook-signature"].split())


def agentctl_signature_ok(request: Request, secret: str) -> bool:
    """agentctl's receivers: hex HMAC-SHA256 of the raw body with the secret's text."""
    expected = hmac.new(secret.encode(), request.body, hashlib.sha256).hexdigest()
    h = request.headers
    return (hmac.compare_digest(h["x-agentctl-signature"], expected)
            and hmac.compare_digest(h["x-hub-signature-256"], "sha256=" + expected)
            and hmac.compare_digest(h["x-signature"], "sha256=" + expected))
