"""Tokens, passwords and private keys never reach logs, error messages or ``repr``.

Each test hands fhirmatch a known secret (bearer token, Basic password, SMART private key and
the access token the token endpoint issues), makes the server refuse it, and scans everything
that came out: stdout, stderr, every log record at DEBUG (text and JSON formats), ``str`` and
``repr`` of the raised error and of the client objects.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import responses
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fhirmatch.auth import BasicAuth, BearerAuth, SmartBackendAuth
from fhirmatch.cli import main
from fhirmatch.client import ClientConfig, FhirClient
from fhirmatch.errors import AuthenticationError

BASE = "https://fhir.example.org/r4"
TOKEN_URL = "https://auth.example.org/token"
TOKEN = "bearer-SECRET-7f3a9c2e"
PASSWORD = "pw-SECRET-91b2"
ACCESS_TOKEN = "access-SECRET-55d0e1"
REFUSED = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "login", "diagnostics": "invalid credentials"}],
}


@pytest.fixture(autouse=True)
def _restore_fhirmatch_logger() -> Iterator[None]:
    """``main`` reconfigures the ``fhirmatch`` logger (no propagation); undo it afterwards so
    later tests' ``caplog`` still sees fhirmatch logs."""
    logger = logging.getLogger("fhirmatch")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture(scope="module")
def pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_fragments(pem: bytes) -> list[str]:
    """The key's base64 lines: any one of them in output would leak key material."""
    return [line for line in pem.decode().splitlines() if line and "-----" not in line]


def _run(
    argv: list[str], capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> tuple[int, str]:
    with caplog.at_level(logging.DEBUG, logger="fhirmatch"):
        code = main(argv)
    out, err = capsys.readouterr()
    logged = "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_info!r}" for r in caplog.records)
    return code, "\n".join([out, err, logged])


def _server_refuses() -> None:
    responses.add(responses.GET, f"{BASE}/metadata", json=REFUSED, status=401)


def _assert_clean(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text, f"secret leaked: {secret[:12]}…"


@pytest.mark.parametrize("log_format", ["text", "json"])
@responses.activate
def test_bearer_token_never_printed(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    log_format: str,
) -> None:
    _server_refuses()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    code, text = _run(
        [
            "match",
            "--server",
            BASE,
            "--trials",
            "fixtures/trials",
            "--auth",
            "bearer",
            "--token-file",
            str(token_file),
            "--log-level",
            "DEBUG",
            "--log-format",
            log_format,
        ],
        capsys,
        caplog,
    )
    assert code == 3
    assert "authentication failed" in text and "401" in text
    sent = responses.calls[0].request.headers["Authorization"]
    assert sent == f"Bearer {TOKEN}"  # the secret was really in play
    _assert_clean(text, [TOKEN])


@responses.activate
def test_basic_password_never_printed(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _server_refuses()
    monkeypatch.setenv("FM_TEST_PASSWORD", PASSWORD)
    code, text = _run(
        [
            "match",
            "--server",
            BASE,
            "--trials",
            "fixtures/trials",
            "--auth",
            "basic",
            "--username",
            "screening-job",
            "--password-env",
            "FM_TEST_PASSWORD",
            "--log-level",
            "DEBUG",
        ],
        capsys,
        caplog,
    )
    assert code == 3
    encoded = base64.b64encode(f"screening-job:{PASSWORD}".encode()).decode()
    assert responses.calls[0].request.headers["Authorization"] == f"Basic {encoded}"
    _assert_clean(text, [PASSWORD, encoded])


@responses.activate
def test_smart_key_assertion_and_access_token_never_printed(
    tmp_path: Path,
    pem: bytes,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The token endpoint issues an access token; the server refuses it twice (fhirmatch
    fetches a fresh token once): neither the key, the signed assertion nor a token leaks."""
    responses.add(
        responses.POST,
        TOKEN_URL,
        json={"access_token": ACCESS_TOKEN, "token_type": "bearer", "expires_in": 300},
    )
    _server_refuses()
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(pem)
    code, text = _run(
        [
            "match",
            "--server",
            BASE,
            "--trials",
            "fixtures/trials",
            "--auth",
            "smart",
            "--client-id",
            "fhirmatch-job",
            "--private-key",
            str(key_file),
            "--key-id",
            "k1",
            "--token-url",
            TOKEN_URL,
            "--log-level",
            "DEBUG",
        ],
        capsys,
        caplog,
    )
    assert code == 3
    token_calls = [c for c in responses.calls if c.request.url == TOKEN_URL]
    assert len(token_calls) == 2  # fetched, refused, fetched once more
    body = str(token_calls[0].request.body)
    assertion = body.split("client_assertion=")[1].split("&")[0]
    assert assertion.startswith("eyJ")
    _assert_clean(text, [ACCESS_TOKEN, assertion, *_pem_fragments(pem)])


@responses.activate
def test_smart_token_endpoint_refusal_keeps_secrets(
    tmp_path: Path,
    pem: bytes,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    responses.add(
        responses.POST,
        TOKEN_URL,
        json={"error": "invalid_client", "error_description": "unknown key"},
        status=400,
    )
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(pem)
    code, text = _run(
        [
            "match",
            "--server",
            BASE,
            "--trials",
            "fixtures/trials",
            "--auth",
            "smart",
            "--client-id",
            "fhirmatch-job",
            "--private-key",
            str(key_file),
            "--token-url",
            TOKEN_URL,
        ],
        capsys,
        caplog,
    )
    assert code == 3
    assert "invalid_client" in text  # the endpoint's reason is shown …
    _assert_clean(text, _pem_fragments(pem))  # … the key is not


@responses.activate
def test_library_errors_and_reprs_hold_no_secret(pem: bytes) -> None:
    _server_refuses()
    auths = [
        BearerAuth(TOKEN),
        BasicAuth("screening-job", PASSWORD),
        SmartBackendAuth("fhirmatch-job", private_key=pem, kid="k1", token_url=TOKEN_URL),
    ]
    secrets = [TOKEN, PASSWORD, *_pem_fragments(pem)]
    for auth in auths[:2]:
        config = ClientConfig(base_url=BASE, auth=auth, max_attempts=1)
        client = FhirClient(config)
        with pytest.raises(AuthenticationError) as info:
            client.capabilities()
        exc = info.value
        text = " ".join(
            [str(exc), repr(exc), repr(exc.args), repr(client), repr(config), repr(auth)]
        )
        text += repr(client.transport) + str(vars(exc))
        _assert_clean(text, secrets)
    smart = auths[2]
    _assert_clean(repr(smart) + str(smart) + repr(ClientConfig(BASE, auth=smart)), secrets)


@responses.activate
def test_token_in_a_next_link_is_masked(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A server that puts an access token in its paging links: the refused cross-host link's
    error shows the URL with the token masked."""
    client = FhirClient(ClientConfig(base_url=BASE, auth=BearerAuth(TOKEN)))
    responses.add(
        responses.GET,
        f"{BASE}/Patient",
        json={
            "resourceType": "Bundle",
            "type": "searchset",
            "link": [
                {
                    "relation": "next",
                    "url": f"https://cdn.example.net/r4/Patient?page=2&access_token={TOKEN}",
                }
            ],
            "entry": [],
        },
    )
    with pytest.raises(Exception) as info:
        list(client.iter_resources("Patient"))
    assert "another scheme, host or port" in str(info.value)
    assert "cdn.example.net" in str(info.value)
    _assert_clean(str(info.value) + repr(info.value), [TOKEN])
    assert len(responses.calls) == 1  # nothing was sent to the other host
