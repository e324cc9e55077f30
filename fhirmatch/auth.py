"""Credentials for a FHIR server: none, a bearer token, HTTP Basic, SMART Backend Services.

Every class here produces the value of one ``Authorization`` header through
:meth:`Auth.authorization`; :class:`fhirmatch.http.HttpTransport` decides where it may be sent
(only the FHIR server's own scheme, host and port). Secrets never appear in ``repr``/``str``,
log lines or exception messages.

SMART Backend Services (https://hl7.org/fhir/smart-app-launch/backend-services.html): the client
signs a short-lived JWT (``iss`` = ``sub`` = client id, ``aud`` = token URL, unique ``jti``,
``exp`` at most five minutes ahead, ``kid`` header, RS384 or ES384) and trades it for an access
token at the token endpoint found in ``{base}/.well-known/smart-configuration``. The token is
cached until shortly before it expires and fetched again once after a 401.
"""

from __future__ import annotations

import base64
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import jwt

from .errors import AuthenticationError, ConfigurationError, FatalNetworkError

if TYPE_CHECKING:
    from .http import HttpTransport

__all__ = [
    "ASSERTION_TYPE",
    "Auth",
    "BasicAuth",
    "BearerAuth",
    "NoAuth",
    "SmartBackendAuth",
    "build_auth",
]

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

#: Refresh a cached token this many seconds before it expires.
REFRESH_MARGIN = 60.0


class Auth:
    """Base class: a source of ``Authorization`` header values."""

    def authorization(self, transport: HttpTransport) -> str | None:
        """The header value for the next request, or None to send none."""
        return None

    def invalidate(self) -> bool:
        """Forget cached credentials after a 401; True if a new attempt could succeed."""
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoAuth(Auth):
    """Send no credentials (an open server or one behind a trusted network gateway)."""


class BearerAuth(Auth):
    """A static bearer token, given directly, from an environment variable, or from a file."""

    def __init__(self, token: str) -> None:
        token = token.strip()
        if not token:
            raise ConfigurationError("bearer token is empty")
        self._token = token

    @classmethod
    def from_env(cls, name: str) -> BearerAuth:
        value = os.environ.get(name)
        if not value:
            raise ConfigurationError(f"environment variable {name} is not set or empty")
        return cls(value)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> BearerAuth:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read bearer token file {path}: {exc.strerror}"
            ) from None
        lines = text.strip().splitlines()
        return cls(lines[0] if lines else "")

    def authorization(self, transport: HttpTransport) -> str | None:
        return f"Bearer {self._token}"

    def __repr__(self) -> str:
        return "BearerAuth(token='***')"


class BasicAuth(Auth):
    """HTTP Basic credentials (the password only ever travels in the header)."""

    def __init__(self, username: str, password: str) -> None:
        if not username or ":" in username:
            raise ConfigurationError("basic auth username is empty or contains ':'")
        self.username = username
        self._password = password

    def authorization(self, transport: HttpTransport) -> str | None:
        raw = f"{self.username}:{self._password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def __repr__(self) -> str:
        return f"BasicAuth(username={self.username!r}, password='***')"


class SmartBackendAuth(Auth):
    """SMART Backend Services: client_credentials with a ``private_key_jwt`` assertion.

    ``private_key`` is a PEM string (or pass ``private_key_path``); ``token_url`` is discovered
    from the server's ``.well-known/smart-configuration`` when not given. ``clock`` returns the
    current Unix time and is injectable for tests.
    """

    def __init__(
        self,
        client_id: str,
        *,
        private_key: str | bytes | None = None,
        private_key_path: str | os.PathLike[str] | None = None,
        kid: str | None = None,
        alg: Literal["RS384", "ES384"] = "RS384",
        scope: str = "system/*.read",
        token_url: str | None = None,
        assertion_lifetime: int = 300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not client_id:
            raise ConfigurationError("SMART client_id is empty")
        if alg not in ("RS384", "ES384"):
            raise ConfigurationError(f"SMART assertion algorithm must be RS384 or ES384, not {alg}")
        if not 0 < assertion_lifetime <= 300:
            raise ConfigurationError("SMART assertion lifetime must be 1..300 seconds")
        if private_key is None:
            if private_key_path is None:
                raise ConfigurationError("SMART auth needs private_key or private_key_path")
            try:
                private_key = Path(private_key_path).read_bytes()
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot read SMART private key {private_key_path}: {exc.strerror}"
                ) from None
        self.client_id = client_id
        self.kid = kid
        self.alg = alg
        self.scope = scope
        self.token_url = token_url
        self.assertion_lifetime = assertion_lifetime
        self._key = private_key
        self._clock = clock
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = threading.Lock()
        #: how many access tokens were obtained (for tests and stats)
        self.tokens_fetched = 0
        self._check_key()

    def _check_key(self) -> None:
        try:
            self._assertion("https://key-check.invalid/token")
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            raise ConfigurationError(
                f"SMART private key cannot sign {self.alg}: {type(exc).__name__}"
            ) from None

    def __repr__(self) -> str:
        return (
            f"SmartBackendAuth(client_id={self.client_id!r}, kid={self.kid!r}, alg={self.alg!r}, "
            f"scope={self.scope!r}, token_url={self.token_url!r}, private_key='***')"
        )

    def _assertion(self, token_url: str) -> str:
        now = int(self._clock())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": token_url,
            "jti": uuid.uuid4().hex,
            "iat": now,
            "exp": now + self.assertion_lifetime,
        }
        headers = {"typ": "JWT"}
        if self.kid:
            headers["kid"] = self.kid
        return jwt.encode(claims, self._key, algorithm=self.alg, headers=headers)

    def discover_token_url(self, transport: HttpTransport) -> str:
        """Token endpoint from ``{base}/.well-known/smart-configuration`` (cached)."""
        if self.token_url:
            return self.token_url
        response = transport.request(
            "GET",
            ".well-known/smart-configuration",
            headers={"Accept": "application/json"},
            authenticated=False,
        )
        try:
            url = response.json().get("token_endpoint")
        except (ValueError, AttributeError):
            url = None
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise AuthenticationError(
                "smart-configuration has no usable token_endpoint",
                method="GET",
                url=f"{transport.base_url}/.well-known/smart-configuration",
            )
        self.token_url = url
        return url

    def _fetch_token(self, transport: HttpTransport) -> None:
        token_url = self.discover_token_url(transport)
        form = [
            ("grant_type", "client_credentials"),
            ("scope", self.scope),
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", self._assertion(token_url)),
        ]
        try:
            # Not idempotent: the assertion's jti may be recorded, so a blind resend is refused.
            response = transport.request(
                "POST",
                token_url,
                form=form,
                headers={"Accept": "application/json"},
                authenticated=False,
                idempotent=False,
            )
        except AuthenticationError:
            raise
        except FatalNetworkError as exc:
            raise AuthenticationError(
                "token endpoint refused the client assertion",
                method=exc.method,
                url=exc.url,
                status=exc.status,
                outcome=exc.outcome,
            ) from None
        try:
            body = response.json()
            token = body["access_token"]
            expires_in = float(body.get("expires_in", 300))
        except (ValueError, KeyError, TypeError):
            raise AuthenticationError(
                "token endpoint answer has no access_token", method="POST", url=token_url
            ) from None
        if str(body.get("token_type", "bearer")).lower() != "bearer":
            raise AuthenticationError(
                f"unsupported token_type {body.get('token_type')!r}", method="POST", url=token_url
            )
        self._token = str(token)
        margin = min(REFRESH_MARGIN, expires_in / 10)
        self._expires_at = self._clock() + expires_in - margin
        self.tokens_fetched += 1

    def authorization(self, transport: HttpTransport) -> str | None:
        with self._lock:
            if self._token is None or self._clock() >= self._expires_at:
                self._fetch_token(transport)
            return f"Bearer {self._token}"

    def invalidate(self) -> bool:
        with self._lock:
            self._token = None
            self._expires_at = 0.0
        return True


def build_auth(
    kind: Literal["none", "bearer", "basic", "smart"],
    *,
    token: str | None = None,
    token_env: str | None = None,
    token_file: str | None = None,
    username: str | None = None,
    password_env: str | None = None,
    password_file: str | None = None,
    client_id: str | None = None,
    private_key_path: str | None = None,
    kid: str | None = None,
    alg: Literal["RS384", "ES384"] = "RS384",
    scope: str = "system/*.read",
    token_url: str | None = None,
) -> Auth:
    """Build an :class:`Auth` from CLI-style options (secrets come from env vars or files)."""
    if kind == "none":
        return NoAuth()
    if kind == "bearer":
        if token:
            return BearerAuth(token)
        if token_env:
            return BearerAuth.from_env(token_env)
        if token_file:
            return BearerAuth.from_file(token_file)
        raise ConfigurationError("bearer auth needs a token file or environment variable")
    if kind == "basic":
        if not username:
            raise ConfigurationError("basic auth needs a username")
        if password_env:
            password = os.environ.get(password_env)
            if password is None:
                raise ConfigurationError(f"environment variable {password_env} is not set")
        elif password_file:
            try:
                password = Path(password_file).read_text(encoding="utf-8").splitlines()[0]
            except (OSError, IndexError):
                raise ConfigurationError(f"cannot read password file {password_file}") from None
        else:
            raise ConfigurationError("basic auth needs a password file or environment variable")
        return BasicAuth(username, password)
    if kind == "smart":
        if not client_id or not private_key_path:
            raise ConfigurationError("SMART auth needs a client id and a private key file")
        return SmartBackendAuth(
            client_id,
            private_key_path=private_key_path,
            kid=kid,
            alg=alg,
            scope=scope,
            token_url=token_url,
        )
    raise ConfigurationError(f"unknown auth kind {kind!r}")
