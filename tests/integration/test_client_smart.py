"""SMART Backend Services against a sandbox that requires it (sekmet's own token endpoint)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fhirmatch.auth import Auth, BearerAuth, SmartBackendAuth
from fhirmatch.client import ClientConfig, FhirClient
from fhirmatch.errors import AuthenticationError
from fhirmatch.sandbox import SandboxHandle, start_sandbox


def _write_keys(tmp: Path, name: str, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> Path:
    private = tmp / f"{name}.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp / f"{name}.pub.pem").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private


@pytest.fixture(scope="module")
def smart_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SandboxHandle, Path]]:
    keys = tmp_path_factory.mktemp("keys")
    _write_keys(keys, "rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    _write_keys(keys, "ec", ec.generate_private_key(ec.SECP384R1()))
    _write_keys(keys, "stranger", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    auth = {
        "types": ["smart"],
        "smart_clients": [
            {
                "client_id": "fhirmatch-rsa",
                "public_key_path": str(keys / "rsa.pub.pem"),
                "scopes": "system/*.read",
            },
            {
                "client_id": "fhirmatch-ec",
                "public_key_path": str(keys / "ec.pub.pem"),
                "scopes": "system/*.read",
            },
        ],
        "token_lifetime": 300,
    }
    handle = start_sandbox(load=False, auth=auth)
    try:
        yield handle, keys
    finally:
        handle.stop()


def _client(base: str, auth: Auth) -> FhirClient:
    return FhirClient(ClientConfig(base, auth=auth, max_attempts=2))


@pytest.mark.parametrize(
    ("client_id", "key", "alg"),
    [
        ("fhirmatch-rsa", "rsa", "RS384"),
        ("fhirmatch-ec", "ec", "ES384"),
    ],
)
def test_smart_backend_services(
    smart_sandbox: tuple[SandboxHandle, Path], client_id: str, key: str, alg: str
) -> None:
    handle, keys = smart_sandbox
    auth = SmartBackendAuth(
        client_id,
        private_key_path=keys / f"{key}.pem",
        kid=f"{key}-1",
        alg=alg,  # type: ignore[arg-type]
        scope="system/*.read",
    )
    with _client(handle.base_url, auth) as client:
        bundle = client.search("Patient", {"_count": 1})
        assert bundle["resourceType"] == "Bundle"
        client.search("Observation", {"_count": 1})
        assert auth.tokens_fetched == 1  # cached between calls
        assert auth.token_url is not None and auth.token_url.endswith("/auth/token")
        # a token the server no longer accepts is replaced once, transparently
        auth._token = "garbage"
        client.search("Patient", {"_count": 1})
        assert auth.tokens_fetched == 2


def test_unknown_key_refused(smart_sandbox: tuple[SandboxHandle, Path]) -> None:
    handle, keys = smart_sandbox
    auth = SmartBackendAuth("fhirmatch-rsa", private_key_path=keys / "stranger.pem")
    with _client(handle.base_url, auth) as client, pytest.raises(AuthenticationError) as info:
        client.search("Patient")
    assert info.value.status == 401
    assert "invalid_client" in str(info.value)


def test_no_or_bad_credentials_refused(smart_sandbox: tuple[SandboxHandle, Path]) -> None:
    handle, _ = smart_sandbox
    with _client(handle.base_url, BearerAuth("not-a-token")) as client:
        with pytest.raises(AuthenticationError) as info:
            client.search("Patient")
        assert info.value.status == 401
        assert "not-a-token" not in str(info.value)
