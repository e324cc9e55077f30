"""HTTP plumbing for talking to a FHIR server: one pooled session, timeouts, retries, errors.

This module knows nothing about FHIR searches or paging (that is :mod:`fhirmatch.client`); it
knows how to send one request safely:

* every call has a connect and a read timeout (:class:`Timeouts`);
* 408, 429, 500, 502, 503 and 504 and connection failures are retried on a bounded list of
  exponentially growing, jittered delays (:class:`RetryPolicy`); ``Retry-After`` (seconds or an
  HTTP date) is honoured up to a cap;
* requests that are not idempotent are retried only when a retry cannot create a duplicate (see
  :func:`HttpTransport.request`, argument ``idempotent``);
* failures become :class:`~fhirmatch.errors.TemporaryNetworkError` (retryable, retries ran out)
  or :class:`~fhirmatch.errors.FatalNetworkError` and its subclasses, carrying the status, the
  request's method and redacted URL, and the server's OperationOutcome text;
* the ``Authorization`` header goes only to the server's own scheme, host and port.

Nothing here logs a request or response body or a header value.
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import requests

from .errors import (
    AuthenticationError,
    ConfigurationError,
    FatalNetworkError,
    NetworkError,
    PreconditionFailed,
    ResourceGone,
    ResourceNotFound,
    TemporaryNetworkError,
)
from .records import mend_lone_surrogates

if TYPE_CHECKING:
    from .auth import Auth

__all__ = [
    "RETRYABLE_STATUSES",
    "HttpTransport",
    "RetryPolicy",
    "Timeouts",
    "check_base_url",
    "describe_connection_error",
    "json_body",
    "outcome_text",
    "parse_retry_after",
    "redact_url",
    "same_origin",
]

log = logging.getLogger(__name__)

#: Statuses that a later attempt may cure.
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

#: Query parameters whose values are secrets and are masked in error messages and logs.
_SECRET_PARAMS = frozenset(
    {
        "access_token",
        "token",
        "client_secret",
        "password",
        "client_assertion",
        "code",
        "refresh_token",
        "api_key",
        "apikey",
        "key",
        "sig",
        "signature",
    }
)

FHIR_JSON = "application/fhir+json"


@dataclass(frozen=True)
class Timeouts:
    """Connect and read timeouts in seconds, applied to every request."""

    connect: float = 10.0
    read: float = 60.0

    def as_tuple(self) -> tuple[float, float]:
        return (self.connect, self.read)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry.

    ``max_attempts`` counts the first try (1 disables retries). Delay ``n`` (0-based) is
    ``min(max_delay, base_delay * 2**n)`` scaled by a random factor in ``[1 - jitter, 1]``; a
    server's ``Retry-After`` replaces it, capped at ``retry_after_cap`` (a longer demand ends the
    retries at once rather than stalling a job for hours).
    """

    max_attempts: int = 5
    base_delay: float = 1.0
    max_delay: float = 30.0
    retry_after_cap: float = 120.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError("retry max_attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0 or self.retry_after_cap < 0:
            raise ConfigurationError("retry delays must not be negative")
        if not 0 <= self.jitter <= 1:
            raise ConfigurationError("retry jitter must be between 0 and 1")

    def delays(self, rng: random.Random | None = None) -> list[float]:
        """The bounded list of waits between attempts (``max_attempts - 1`` items)."""
        pick = rng.random if rng else random.random
        out = []
        for n in range(self.max_attempts - 1):
            nominal = min(self.max_delay, self.base_delay * (2**n))
            out.append(nominal * (1 - self.jitter * pick()))
        return out


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def redact_url(url: str) -> str:
    """The URL without user-info and with secret-looking query values masked."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:  # IPv6 literal
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
            pairs = [(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs]
            query = urlencode(pairs, safe=",|:/$")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return (scheme, (parts.hostname or "").lower(), port)


def same_origin(a: str, b: str) -> bool:
    """True when both URLs share scheme, host and (effective) port."""
    return _origin(a) == _origin(b)


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(
        ".localhost"
    ):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(base_url: str, *, allow_insecure_http: bool = False) -> str:
    """Validate a FHIR base URL and return it without a trailing slash.

    ``http://`` is accepted only for loopback hosts (127.0.0.0/8, ::1, localhost) unless
    ``allow_insecure_http`` is set; user-info in the URL is refused (pass credentials as auth).
    """
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"FHIR base URL must be an http(s) URL, got {redact_url(base_url)}"
        )
    if parts.username or parts.password:
        raise ConfigurationError("FHIR base URL must not contain credentials; use an auth option")
    if parts.query or parts.fragment:
        raise ConfigurationError("FHIR base URL must not have a query or fragment")
    if parts.scheme == "http" and not allow_insecure_http and not _is_loopback(parts.hostname):
        raise ConfigurationError(
            f"refusing plain http:// to non-loopback host {parts.hostname}; use https://, or "
            "pass --allow-insecure-http (ClientConfig.allow_insecure_http) on a trusted network"
        )
    return base_url.rstrip("/")


def outcome_text(response: requests.Response) -> str | None:
    """Diagnostics/details text of an OperationOutcome body, or a short plain-text body."""
    ctype = response.headers.get("Content-Type", "")
    if "json" in ctype:
        try:
            body, _mended = json_body(response)
        except ValueError:
            return None
        if isinstance(body, dict):
            if body.get("resourceType") == "OperationOutcome":
                texts = []
                for issue in body.get("issue") or []:
                    text = issue.get("diagnostics") or (issue.get("details") or {}).get("text")
                    if text:
                        texts.append(str(text))
                return "; ".join(texts)[:1000] or None
            # OAuth token endpoints answer {"error": ..., "error_description": ...}
            if "error" in body:
                desc = body.get("error_description")
                return f"{body['error']}: {desc}" if desc else str(body["error"])
        return None
    if ctype.startswith("text/plain"):
        return response.text[:300].strip() or None
    return None


def json_body(response: requests.Response) -> tuple[Any, int]:
    """``response.json()`` with each lone surrogate (what a JSON ``"\\udc80"`` escape decodes
    to) replaced by U+FFFD, and how many strings held one (see
    :func:`fhirmatch.records.mend_lone_surrogates`): a server's words go into results, error
    messages, logs and reports, which are written as UTF-8, and such a character cannot be.
    The client's answers, write outcomes and error texts are read through it. Raises
    ``ValueError`` as ``response.json()`` does."""
    body = response.json()
    content = response.content
    if b"\\ud" in content or b"\\uD" in content:  # a surrogate comes only from an escape
        return mend_lone_surrogates(body)
    return body, 0


def _error_class(status: int) -> type[NetworkError]:
    if status in RETRYABLE_STATUSES:
        return TemporaryNetworkError
    if status in (401, 403):
        return AuthenticationError
    if status == 404:
        return ResourceNotFound
    if status == 410:
        return ResourceGone
    if status == 412:
        return PreconditionFailed
    return FatalNetworkError


@dataclass
class TransportStats:
    """Counters of what one transport sent (updated under a lock: threads share a transport)."""

    requests: int = 0
    retries: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_request(self) -> None:
        with self._lock:
            self.requests += 1

    def add_retry(self) -> None:
        with self._lock:
            self.retries += 1

    def add_status(self, status: int) -> None:
        with self._lock:
            self.by_status[status] = self.by_status.get(status, 0) + 1


#: Statuses that pause every request of a transport, not only the one that met them: the
#: server says it is overloaded (429) or unavailable (503), so the whole client backs off.
BACKOFF_STATUSES = frozenset({429, 503})


class _Backoff:
    """A pause shared by every thread using one transport.

    A 429 or 503 sets a deadline (its ``Retry-After`` or the retry delay); every request started
    before it, by any thread, waits until then before it is sent.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until = 0.0

    def extend(self, seconds: float) -> float:
        """Pause everyone for ``seconds`` from now (never shortening a longer pause); returns
        the deadline this pause stands for."""
        deadline = time.monotonic() + seconds
        with self._lock:
            self._until = max(self._until, deadline)
        return deadline

    def wait(self, honoured: float, sleep: Callable[[float], None]) -> float:
        """Sleep until the shared deadline unless the caller already waited for it (its own
        retry delay ends at ``honoured``); returns the deadline now honoured."""
        with self._lock:
            until = self._until
        remaining = until - time.monotonic()
        if until <= honoured or remaining <= 0:
            return honoured
        sleep(remaining)
        return until


class HttpTransport:
    """One pooled :class:`requests.Session` bound to one FHIR server.

    ``sleep`` is injectable so tests run instantly; ``rng`` makes jitter reproducible.
    Several threads may send through one transport at once (``connections`` sizes the pool):
    the counters are locked, and a 429 or 503 pauses every thread (see :class:`_Backoff`).
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth: Auth | None = None,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        verify: bool = True,
        ca_bundle: str | None = None,
        allow_insecure_http: bool = False,
        user_agent: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        session: requests.Session | None = None,
        connections: int = 10,
    ) -> None:
        from . import __version__

        self.base_url = check_base_url(base_url, allow_insecure_http=allow_insecure_http)
        self.auth = auth
        self.timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicy()
        self.sleep = sleep
        self.rng = rng
        self.stats = TransportStats()
        self._backoff = _Backoff()
        if session is None:
            session = requests.Session()
            if connections > 10:  # one pooled connection per thread that may send at once
                adapter = requests.adapters.HTTPAdapter(pool_maxsize=connections)
                session.mount("https://", adapter)
                session.mount("http://", adapter)
        self.session = session
        # A CA bundle path replaces the default trust store; verify=False is an explicit opt-out.
        self.session.verify = ca_bundle if (ca_bundle and verify) else verify
        self.session.headers.update(
            {
                "User-Agent": user_agent or f"fhirmatch/{__version__}",
                "Accept": FHIR_JSON,
                # Servers may answer a repeated search from a cache of earlier results (HAPI
                # FHIR reuses them for 60 s by default): a screen must see the current data.
                "Cache-Control": "no-cache",
            }
        )
        for name, value in (extra_headers or {}).items():
            if name.lower() == "authorization":
                raise ConfigurationError("pass credentials through auth, not extra headers")
            self.session.headers[name] = value
        # Proxies from the environment are kept (trust_env), but redirects use our own, stricter
        # rule: Authorization survives only a same scheme/host/port hop, and ~/.netrc is never
        # consulted for credentials.
        self.session.auth = _no_auth  # a set auth stops requests from reading ~/.netrc
        self.session.rebuild_auth = _rebuild_auth_same_origin.__get__(self.session)  # type: ignore[method-assign]

    def __repr__(self) -> str:
        return f"HttpTransport(base_url={redact_url(self.base_url)!r}, auth={self.auth!r})"

    def close(self) -> None:
        self.session.close()

    def url_for(self, path_or_url: str) -> str:
        """Absolute URL for a path relative to the base (or an absolute URL, unchanged)."""
        if "://" in path_or_url:
            return path_or_url
        if not path_or_url.strip("/"):
            return self.base_url  # transactions and batches go to [base] itself
        return f"{self.base_url}/{path_or_url.lstrip('/')}"

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        params: Sequence[tuple[str, str]] | None = None,
        json_body: Any = None,
        form: Sequence[tuple[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
        authenticated: bool = True,
        ok_statuses: frozenset[int] = frozenset(),
        read_timeout: float | None = None,
    ) -> requests.Response:
        """Send one request with retries and return a 2xx (or ``ok_statuses``) response.

        ``read_timeout`` replaces the transport's read timeout for this request.

        ``idempotent`` defaults to True for GET, HEAD, PUT and DELETE and for POSTs that are
        searches (``_search``) or conditional creates (``If-None-Exist``); pass it explicitly for
        transactions. A non-idempotent request is retried only when the server cannot have acted
        on it: a connect timeout (nothing was sent) or a 429 (rejected before processing). A read
        timeout, 5xx or dropped connection on a plain create could mean the resource was created,
        so the error is raised at once instead of risking a duplicate.

        ``authenticated=False`` sends no Authorization header (token endpoint, discovery).
        Absolute URLs on another scheme/host/port are refused while authenticated.
        """
        url = self.url_for(path_or_url)
        method = method.upper()
        hdrs = dict(headers or {})
        if idempotent is None:
            idempotent = method in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS") or (
                method == "POST"
                and (
                    urlsplit(url).path.endswith("/_search")
                    or any(k.lower() == "if-none-exist" for k in hdrs)
                )
            )
        if authenticated and not same_origin(url, self.base_url):
            raise FatalNetworkError(
                "refusing to send credentials to a URL outside the FHIR server",
                method=method,
                url=redact_url(url),
            )
        if json_body is not None:
            hdrs.setdefault("Content-Type", FHIR_JSON)
        # A per-request Prefer (return=representation) must not replace a configured one
        # (handling=strict): requests would let the request header win, so join them.
        prefer = next((k for k in hdrs if k.lower() == "prefer"), None)
        configured = self.session.headers.get("Prefer")
        if prefer and configured:
            wanted = [p.strip() for p in f"{configured},{hdrs[prefer]}".split(",") if p.strip()]
            hdrs[prefer] = ", ".join(dict.fromkeys(wanted))
        delays = self.retry.delays(self.rng)
        refreshed_auth = False
        attempt = 0
        honoured = 0.0  # the shared pause this request has already waited for
        while True:
            attempt += 1
            honoured = self._backoff.wait(honoured, self.sleep)
            send_headers = dict(hdrs)
            if authenticated and self.auth is not None:
                value = self.auth.authorization(self)
                if value:
                    send_headers["Authorization"] = value
            self.stats.add_request()
            try:
                response = self.session.request(
                    method,
                    url,
                    params=list(params) if params else None,
                    json=json_body,
                    data=list(form) if form is not None else None,
                    headers=send_headers,
                    timeout=(
                        self.timeouts.as_tuple()
                        if read_timeout is None
                        else (self.timeouts.connect, read_timeout)
                    ),
                )
            except requests.exceptions.SSLError as exc:
                raise FatalNetworkError(
                    describe_connection_error(exc, url), method=method, url=redact_url(url)
                ) from None
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError,
            ) as exc:
                # ConnectTimeout is a subclass of both; nothing reached the server. A body cut
                # off mid-way (ChunkedEncodingError) means the server answered: it acted.
                safe = idempotent or isinstance(exc, requests.exceptions.ConnectTimeout)
                kind = describe_connection_error(exc, url, self.timeouts)
                if safe and attempt <= len(delays):
                    wait = delays[attempt - 1]
                    self._note_retry(method, url, kind, attempt, wait)
                    self.sleep(wait)
                    continue
                raise TemporaryNetworkError(
                    f"{kind} after {attempt} attempt(s)", method=method, url=redact_url(url)
                ) from None
            status = response.status_code
            self.stats.add_status(status)
            log.debug("%s %s -> %s", method, urlsplit(url).path, status)
            if status < 400 or status in ok_statuses:
                return response
            if (
                status == 401
                and authenticated
                and self.auth is not None
                and not refreshed_auth
                and self.auth.invalidate()
            ):
                refreshed_auth = True
                log.info("%s %s -> 401; refreshing the access token once", method, url_path(url))
                continue
            if status in RETRYABLE_STATUSES and (idempotent or status == 429):
                retry_wait = self._retry_wait(response, attempt, delays)
                if retry_wait is not None:
                    self._note_retry(method, url, str(status), attempt, retry_wait)
                    if status in BACKOFF_STATUSES:
                        honoured = self._backoff.extend(retry_wait)
                    self.sleep(retry_wait)
                    continue
            cls = _error_class(status)
            tried = f" after {attempt} attempts" if attempt > 1 else ""
            raise cls(
                f"HTTP {status}{tried}",
                method=method,
                url=redact_url(url),
                status=status,
                outcome=outcome_text(response),
            )

    def _retry_wait(
        self, response: requests.Response, attempt: int, delays: list[float]
    ) -> float | None:
        if attempt > len(delays):
            return None
        wait = delays[attempt - 1]
        asked = parse_retry_after(response.headers.get("Retry-After"))
        if asked is not None:
            if asked > self.retry.retry_after_cap:
                log.warning(
                    "server asked to retry after %.0f s, more than the %.0f s cap; giving up",
                    asked,
                    self.retry.retry_after_cap,
                )
                return None
            wait = asked
        return wait

    def _note_retry(self, method: str, url: str, why: str, attempt: int, wait: float) -> None:
        self.stats.add_retry()
        level = logging.INFO if attempt == 1 else logging.WARNING
        log.log(
            level,
            "%s %s: %s; retry %d/%d in %.1f s",
            method,
            url_path(url),
            why,
            attempt,
            self.retry.max_attempts - 1,
            wait,
        )


def describe_connection_error(
    exc: BaseException, url: str, timeouts: Timeouts | None = None
) -> str:
    """What failed, in words a person can act on: DNS, refused, TLS, timeout or a dropped
    connection, with the host (never the query string)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    where = f"{host}:{parts.port}" if parts.port else host
    chain = _exception_chain(exc)
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        limit = f" within {timeouts.connect:g} s" if timeouts else ""
        return f"timeout: no connection to {where}{limit}"
    if isinstance(exc, requests.exceptions.ReadTimeout):
        limit = f" within {timeouts.read:g} s" if timeouts else ""
        return f"timeout: {where} did not answer{limit}"
    if isinstance(exc, requests.exceptions.SSLError) or any(
        isinstance(e, ssl.SSLError) for e in chain
    ):
        why = next(
            (
                e.verify_message or e.reason or ""
                for e in chain
                if isinstance(e, ssl.SSLCertVerificationError)
            ),
            None,
        ) or next((str(e.reason) for e in chain if isinstance(e, ssl.SSLError) and e.reason), "")
        return f"TLS error with {where}" + (f": {why}" if why else "")
    if any(isinstance(e, socket.gaierror) for e in chain) or any(
        "NameResolutionError" in type(e).__name__ or "Name or service not known" in str(e)
        for e in chain
    ):
        return f"DNS lookup failed for {host}"
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return f"connection refused by {where}"
    if any(isinstance(e, TimeoutError | socket.timeout) for e in chain):
        return f"timeout talking to {where}"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return f"the answer from {where} was cut off"
    if isinstance(exc, requests.exceptions.ContentDecodingError):
        return f"the answer from {where} could not be decoded"
    if any(isinstance(e, ConnectionResetError | ConnectionAbortedError) for e in chain) or any(
        "RemoteDisconnected" in type(e).__name__ for e in chain
    ):
        return f"connection to {where} dropped"
    if any(isinstance(e, OSError) and e.errno is not None for e in chain):
        err = next(e for e in chain if isinstance(e, OSError) and e.errno is not None)
        return f"cannot connect to {where}: {err.strerror or type(err).__name__}"
    return f"connection to {where} failed ({type(exc).__name__})"


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: causes, contexts, ``args`` and urllib3's ``reason``."""
    out: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(out) < 20:
        e = todo.pop(0)
        if any(e is seen for seen in out):
            continue
        out.append(e)
        nested = [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
        todo.extend(n for n in nested if isinstance(n, BaseException))
    return out


def url_path(url: str) -> str:
    """Path part of a URL, for log lines (no query string: search values stay out of logs)."""
    return urlsplit(url).path


def _rebuild_auth_same_origin(
    self: requests.Session, prepared_request: requests.PreparedRequest, response: requests.Response
) -> None:
    """Drop Authorization on a redirect that leaves the original host; never add netrc auth."""
    headers = prepared_request.headers
    url = prepared_request.url or ""
    if "Authorization" in headers and not same_origin(response.request.url or "", url):
        del headers["Authorization"]


def _no_auth(request: requests.PreparedRequest) -> requests.PreparedRequest:
    """requests auth hook that changes nothing (our Authorization header is set per request)."""
    return request
