"""Conveniences for using fhirmatch as a library (re-exported by :mod:`fhirmatch`).

Everything here composes the building blocks the package exports; nothing keeps global state.
"""

from __future__ import annotations

from .auth import Auth, NoAuth
from .client import ClientConfig, FhirClient

__all__ = ["connect"]


def connect(
    base_url: str,
    *,
    auth: Auth | None = None,
    timeout: float = 60.0,
    connect_timeout: float = 10.0,
    max_attempts: int = 5,
    allow_insecure_http: bool = False,
) -> FhirClient:
    """A :class:`~fhirmatch.client.FhirClient` for ``base_url`` (use it as a context manager).

    ``auth`` is one of the :class:`~fhirmatch.auth.Auth` classes or :func:`build_auth`'s result
    (default: none). Plain ``http://`` is refused for hosts other than loopback unless
    ``allow_insecure_http``. For every other option build a :class:`ClientConfig` yourself.
    """
    config = ClientConfig(
        base_url=base_url,
        auth=auth or NoAuth(),
        read_timeout=timeout,
        connect_timeout=connect_timeout,
        max_attempts=max_attempts,
        allow_insecure_http=allow_insecure_http,
    )
    return FhirClient(config)
