"""A fault-injecting HTTP reverse proxy for reliability tests.

:class:`FaultProxy` listens on 127.0.0.1 (a free port) and forwards every request to an upstream
FHIR server, unless a :class:`Fault` in its schedule matches the request first. Faults:

``status``
    answer with an HTTP status (and optionally a ``Retry-After`` header) without forwarding;
``delay``
    wait ``seconds`` before forwarding (longer than the client's read timeout: a read timeout);
``drop_response``
    forward, then send the status line, the headers (with the full ``Content-Length``) and half
    of the body, and close the connection: a connection dropped mid-response;
``drop_after_forward``
    forward (the server applies the request), then close the connection without a reply: the
    lost response of a transaction that committed;
``hang_after_forward``
    forward, set :attr:`Fault.fired`, then hold the connection open for ``seconds`` without a
    reply (lets a test kill the client while the server has applied its write).

Each fault matches a method (or any) and a regular expression searched in the request path with
its query string (and, for ``POST [type]/_search``, the form body after a newline), and fires
``times`` times (``None``: for ever), optionally after letting ``skip`` matching requests
through. ``before_forward`` hooks run for every forwarded request (tests use them to change the
server's data during a run). :class:`RandomFaults` adds faults at random rates to the requests no
scheduled fault matched (a flaky network between a job and its server), never more than a few in a
row for one request.

Upstream URLs in response bodies and ``Location`` headers are rewritten to the proxy's own
origin, so ``next`` links keep paging through the proxy.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import urlsplit

import requests

FaultKind = Literal["status", "delay", "drop_response", "drop_after_forward", "hang_after_forward"]

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
        "host",
        "accept-encoding",
    }
)


@dataclass
class Fault:
    """One scheduled fault (see the module docstring for the kinds)."""

    kind: FaultKind
    method: str | None = None
    path: str = ""
    times: int | None = 1
    skip: int = 0
    status: int = 503
    retry_after: str | None = None
    seconds: float = 0.0
    fired: threading.Event = field(default_factory=threading.Event)
    hits: int = 0

    def matches(self, method: str, target: str, body: bytes | None = None) -> bool:
        """True when the method fits and ``path`` is found in the request target or, for a
        form-encoded ``POST _search``, in the target followed by a newline and the body."""
        if self.method is not None and method != self.method:
            return False
        text = target if not body else f"{target}\n{body.decode('latin-1')}"
        return re.search(self.path, text, re.DOTALL) is not None


@dataclass
class RandomFaults:
    """Faults drawn at random (seeded) for each request no scheduled fault matches: answer
    ``unavailable`` of them with 503, ``too_many`` with 429, and close the connection without
    a reply after forwarding ``dropped`` of them (the server acted; its answer is lost).

    One request (the same method, target and body) meets at most ``max_in_a_row`` faults in a
    row; the next attempt goes through. Concurrent requests take the seeded draws in an order
    that depends on timing, so without the cap one request could, on a loaded machine, meet
    enough faults in a row to exhaust any client's retries. With it, a client allowing more
    attempts than ``max_in_a_row`` completes every request, whatever the order.
    """

    unavailable: float = 0.0
    too_many: float = 0.0
    dropped: float = 0.0
    seed: int = 0
    max_in_a_row: int = 3
    rng: random.Random = field(init=False)
    in_a_row: dict[tuple[str, str, bytes], int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def draw(self, method: str, target: str, body: bytes | None) -> Fault | None:
        """The fault for this attempt of a request, if any (call under the proxy's lock)."""
        key = (method, target, body or b"")
        fault = self._draw()
        if fault is None or self.in_a_row.get(key, 0) >= self.max_in_a_row:
            self.in_a_row.pop(key, None)
            return None
        self.in_a_row[key] = self.in_a_row.get(key, 0) + 1
        return fault

    def _draw(self) -> Fault | None:
        x = self.rng.random()
        if x < self.unavailable:
            return Fault("status", status=503, times=None)
        if x < self.unavailable + self.too_many:
            return Fault("status", status=429, times=None)
        if x < self.unavailable + self.too_many + self.dropped:
            return Fault("drop_after_forward", times=None)
        return None


@dataclass
class Seen:
    """One request the proxy received, and the fault it met (None: forwarded untouched)."""

    method: str
    target: str
    fault: FaultKind | None


Hook = Callable[[str, str], None]


class FaultProxy:
    """A threaded reverse proxy with a programmable fault schedule; use as a context manager."""

    def __init__(self, upstream_base: str) -> None:
        parts = urlsplit(upstream_base)
        self.upstream_origin = f"{parts.scheme}://{parts.netloc}"
        self.upstream_path = parts.path.rstrip("/")
        self.faults: list[Fault] = []
        self.random: RandomFaults | None = None
        self.hooks: list[Hook] = []
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._session = requests.Session()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.origin = f"http://127.0.0.1:{self.port}"
        self.base_url = self.origin + self.upstream_path
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._session.close()

    def add(self, fault: Fault) -> Fault:
        """Schedule ``fault`` (faults are tried in the order they were added)."""
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.random = None

    def count(self, kind: FaultKind) -> int:
        """How many requests met a fault of this kind."""
        with self._lock:
            return sum(1 for s in self.seen if s.fault == kind)

    # ------------------------------------------------------------------ internals

    def _pick(self, method: str, target: str, body: bytes | None) -> Fault | None:
        with self._lock:
            chosen: Fault | None = None
            for fault in self.faults:
                if fault.times is not None and fault.hits >= fault.skip + fault.times:
                    continue
                if fault.matches(method, target, body if target.endswith("/_search") else None):
                    fault.hits += 1
                    if fault.hits > fault.skip:
                        chosen = fault
                    break
            else:
                if self.random is not None:
                    chosen = self.random.draw(method, target, body)
            self.seen.append(Seen(method, target, chosen.kind if chosen else None))
            return chosen

    def _forward(
        self, method: str, target: str, headers: dict[str, str], body: bytes | None
    ) -> requests.Response:
        for hook in list(self.hooks):
            hook(method, target)
        return self._session.request(
            method,
            self.upstream_origin + target,
            headers=headers,
            data=body,
            allow_redirects=False,
            timeout=120,
        )

    def _rewrite(self, data: bytes) -> bytes:
        return data.replace(self.upstream_origin.encode(), self.origin.encode())

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return  # keep test output quiet

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                method = self.command
                target = self.path
                fault = proxy._pick(method, target, body)
                if fault is not None and fault.kind == "status":
                    self._reply(fault.status, b'{"resourceType":"OperationOutcome"}', fault)
                    return
                if fault is not None and fault.kind == "delay":
                    time.sleep(fault.seconds)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Accept-Encoding"] = "identity"
                try:
                    upstream = proxy._forward(method, target, headers, body)
                except requests.RequestException:
                    self._reply(502, b"", None)
                    return
                if fault is not None and fault.kind == "drop_after_forward":
                    fault.fired.set()
                    self._drop()
                    return
                if fault is not None and fault.kind == "hang_after_forward":
                    fault.fired.set()
                    time.sleep(fault.seconds)
                    self._drop()
                    return
                data = proxy._rewrite(upstream.content)
                self.send_response(upstream.status_code)
                for name, value in upstream.headers.items():
                    if name.lower() in _HOP_BY_HOP:
                        continue
                    if name.lower() in ("location", "content-location"):
                        value = value.replace(proxy.upstream_origin, proxy.origin)
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                if fault is not None and fault.kind == "drop_response":
                    self.end_headers()
                    self.wfile.write(data[: max(1, len(data) // 2)])
                    self.wfile.flush()
                    self._drop()
                    return
                self.end_headers()
                self.wfile.write(data)

            def _reply(self, status: int, data: bytes, fault: Fault | None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                if fault is not None and fault.retry_after is not None:
                    self.send_header("Retry-After", fault.retry_after)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _drop(self) -> None:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            def _safe(self) -> None:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self._handle()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _safe

        return Handler
