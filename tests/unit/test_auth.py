"""Auth: static credentials, SMART Backend Services token flow, secrets kept out of text."""

from __future__ import annotations

import base64
import time
import urllib.parse
from pathlib import Path

import jwt
import pytest
import responses
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fhirmatch.auth import (
    ASSERTION_TYPE,
    BasicAuth,
    BearerAuth,
    NoAuth,
    SmartBackendAuth,
    build_auth,
)
from fhirmatch.errors import AuthenticationError, ConfigurationError
from fhirmatch.http import HttpTransport, RetryPolicy

BASE = "https://fhir.example.org/r4"
TOKEN_URL = "https://auth.example.org/oauth/token"


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _form(body: bytes | str | None) -> dict[str, str]:
    text = body.decode() if isinstance(body, bytes) else (body or "")
    return dict(urllib.parse.parse_qsl(text))


def _setup_smart(expires_in: int = 300) -> None:
    responses.get(
        f"{BASE}/.well-known/smart-configuration",
        json={"token_endpoint": TOKEN_URL, "grant_types_supported": ["client_credentials"]},
    )
    responses.post(
        TOKEN_URL,
        json={"access_token": "tok-1", "token_type": "bearer", "expires_in": expires_in},
    )
    responses.post(
        TOKEN_URL,
        json={"access_token": "tok-2", "token_type": "bearer", "expires_in": expires_in},
    )


def _transport(auth: SmartBackendAuth) -> HttpTransport:
    return HttpTransport(BASE, auth=auth, retry=RetryPolicy(max_attempts=2), sleep=lambda s: None)


@responses.activate
def test_smart_flow_discovery_assertion_and_caching(rsa_key: rsa.RSAPrivateKey) -> None:
    clock = Clock()
    auth = SmartBackendAuth(
        "my-client", private_key=_pem(rsa_key), kid="key-1", scope="system/*.rs", clock=clock
    )
    _setup_smart()
    responses.get(f"{BASE}/Patient/1", json={"resourceType": "Patient"})
    t = _transport(auth)
    t.request("GET", "Patient/1")
    t.request("GET", "Patient/1")
    urls = [c.request.url for c in responses.calls]
    assert urls[0] == f"{BASE}/.well-known/smart-configuration"
    assert urls[1] == TOKEN_URL
    assert urls[2:] == [f"{BASE}/Patient/1"] * 2  # token cached
    assert auth.tokens_fetched == 1
    # discovery and token requests carry no Authorization header
    assert "Authorization" not in responses.calls[0].request.headers
    assert "Authorization" not in responses.calls[1].request.headers
    assert responses.calls[2].request.headers["Authorization"] == "Bearer tok-1"

    form = _form(responses.calls[1].request.body)
    assert form["grant_type"] == "client_credentials"
    assert form["scope"] == "system/*.rs"
    assert form["client_assertion_type"] == ASSERTION_TYPE
    assertion = form["client_assertion"]
    header = jwt.get_unverified_header(assertion)
    assert header["alg"] == "RS384"
    assert header["kid"] == "key-1"
    claims = jwt.decode(
        assertion,
        rsa_key.public_key(),
        algorithms=["RS384"],
        audience=TOKEN_URL,
        options={"verify_exp": False, "require": ["exp", "jti", "iss", "sub", "aud"]},
    )
    assert claims["iss"] == claims["sub"] == "my-client"
    assert 0 < claims["exp"] - clock.now <= 300
    assert claims["jti"]


@responses.activate
def test_smart_jti_unique_and_es384() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    auth = SmartBackendAuth("c", private_key=_pem(key), token_url=TOKEN_URL, alg="ES384")
    _setup_smart()
    t = _transport(auth)
    auth.authorization(t)
    auth.invalidate()
    auth.authorization(t)
    forms = [_form(c.request.body) for c in responses.calls if c.request.url == TOKEN_URL]
    assert len(forms) == 2
    decoded = [
        jwt.decode(
            f["client_assertion"],
            key.public_key(),
            algorithms=["ES384"],
            audience=TOKEN_URL,
            options={"verify_exp": False},
        )
        for f in forms
    ]
    assert decoded[0]["jti"] != decoded[1]["jti"]


@responses.activate
def test_smart_token_refreshed_before_expiry(rsa_key: rsa.RSAPrivateKey) -> None:
    clock = Clock()
    auth = SmartBackendAuth("c", private_key=_pem(rsa_key), token_url=TOKEN_URL, clock=clock)
    _setup_smart(expires_in=300)
    t = _transport(auth)
    assert auth.authorization(t) == "Bearer tok-1"
    clock.now += 200  # still valid (refresh margin is 30 s for a 300 s token)
    assert auth.authorization(t) == "Bearer tok-1"
    clock.now += 75  # 275 s: inside the margin
    assert auth.authorization(t) == "Bearer tok-2"
    assert auth.tokens_fetched == 2


@responses.activate
def test_smart_refresh_on_401_once(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = SmartBackendAuth("c", private_key=_pem(rsa_key), token_url=TOKEN_URL)
    _setup_smart()
    responses.get(f"{BASE}/Patient/1", status=401)
    responses.get(f"{BASE}/Patient/1", json={"resourceType": "Patient"})
    t = _transport(auth)
    t.request("GET", "Patient/1")
    fhir_calls = [c for c in responses.calls if c.request.url.startswith(BASE)]
    assert [c.request.headers["Authorization"] for c in fhir_calls] == [
        "Bearer tok-1",
        "Bearer tok-2",
    ]


@responses.activate
def test_smart_second_401_is_authentication_error(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = SmartBackendAuth("c", private_key=_pem(rsa_key), token_url=TOKEN_URL)
    _setup_smart()
    responses.get(f"{BASE}/Patient/1", status=401)
    t = _transport(auth)
    with pytest.raises(AuthenticationError) as info:
        t.request("GET", "Patient/1")
    assert info.value.status == 401
    assert auth.tokens_fetched == 2
    assert "tok-" not in str(info.value)


@responses.activate
def test_token_endpoint_refusal(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = SmartBackendAuth("c", private_key=_pem(rsa_key), token_url=TOKEN_URL)
    responses.post(
        TOKEN_URL,
        status=400,
        json={"error": "invalid_client", "error_description": "bad signature"},
    )
    t = _transport(auth)
    with pytest.raises(AuthenticationError) as info:
        t.request("GET", "Patient/1")
    assert info.value.status == 400
    assert "invalid_client: bad signature" in str(info.value)
    assert "BEGIN" not in str(info.value)


@responses.activate
def test_discovery_without_token_endpoint(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = SmartBackendAuth("c", private_key=_pem(rsa_key))
    responses.get(f"{BASE}/.well-known/smart-configuration", json={"capabilities": []})
    with pytest.raises(AuthenticationError, match="token_endpoint"):
        _transport(auth).request("GET", "Patient/1")


def test_smart_config_errors(rsa_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        SmartBackendAuth("c")
    with pytest.raises(ConfigurationError):
        SmartBackendAuth("c", private_key=b"not a key")
    with pytest.raises(ConfigurationError):
        SmartBackendAuth("c", private_key=_pem(rsa_key), alg="HS256")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        SmartBackendAuth("c", private_key=_pem(rsa_key), assertion_lifetime=600)
    # RS384 assertion with an EC key cannot be signed
    ec_pem = _pem(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(ConfigurationError):
        SmartBackendAuth("c", private_key=ec_pem, alg="RS384")
    path = tmp_path / "key.pem"
    path.write_bytes(_pem(rsa_key))
    assert SmartBackendAuth("c", private_key_path=path).client_id == "c"


def test_no_secret_in_repr_or_str(rsa_key: rsa.RSAPrivateKey) -> None:
    pem = _pem(rsa_key)
    smart = SmartBackendAuth("c", private_key=pem, kid="k")
    for obj, secret in [
        (BearerAuth("tok-very-secret"), "tok-very-secret"),
        (BasicAuth("alice", "pw-very-secret"), "pw-very-secret"),
        (smart, "PRIVATE KEY"),
    ]:
        assert secret not in repr(obj)
        assert secret not in str(obj)
    assert "alice" in repr(BasicAuth("alice", "x"))
    assert repr(NoAuth()) == "NoAuth()"


def test_basic_header() -> None:
    t = HttpTransport(BASE)
    value = BasicAuth("alice", "pa:ss").authorization(t)
    assert value is not None
    assert base64.b64decode(value.removeprefix("Basic ")).decode() == "alice:pa:ss"
    with pytest.raises(ConfigurationError):
        BasicAuth("a:b", "x")


def test_bearer_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = HttpTransport(BASE)
    monkeypatch.setenv("FHIRMATCH_TEST_TOKEN", "from-env")
    assert BearerAuth.from_env("FHIRMATCH_TEST_TOKEN").authorization(t) == "Bearer from-env"
    monkeypatch.delenv("FHIRMATCH_TEST_TOKEN")
    with pytest.raises(ConfigurationError):
        BearerAuth.from_env("FHIRMATCH_TEST_TOKEN")
    f = tmp_path / "token"
    f.write_text("from-file\n")
    assert BearerAuth.from_file(f).authorization(t) == "Bearer from-file"
    with pytest.raises(ConfigurationError):
        BearerAuth.from_file(tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigurationError):
        BearerAuth.from_file(tmp_path / "empty")


def test_build_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(build_auth("none"), NoAuth)
    monkeypatch.setenv("FM_PW", "pw")
    basic = build_auth("basic", username="u", password_env="FM_PW")
    assert isinstance(basic, BasicAuth)
    with pytest.raises(ConfigurationError):
        build_auth("bearer")
    with pytest.raises(ConfigurationError):
        build_auth("smart", client_id="c")
