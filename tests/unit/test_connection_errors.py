"""Connection errors say what failed (DNS, refused, TLS, timeout, dropped), on real sockets, and
the insecure-HTTP refusal names the flag that allows it."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fhirmatch.errors import ConfigurationError, FatalNetworkError, NetworkError
from fhirmatch.http import HttpTransport, RetryPolicy, Timeouts, check_base_url

REPO = Path(__file__).resolve().parents[2]


def _transport(base: str, **kw: object) -> HttpTransport:
    return HttpTransport(
        base,
        retry=RetryPolicy(max_attempts=1),
        timeouts=Timeouts(connect=2.0, read=0.3),
        sleep=lambda s: None,
        **kw,  # type: ignore[arg-type]
    )


def _error(base: str, **kw: object) -> NetworkError:
    with pytest.raises(NetworkError) as info:
        _transport(base, **kw).request("GET", "metadata")
    return info.value


@pytest.fixture
def tcp_server() -> Iterator[Callable[[Callable[[socket.socket], None]], int]]:
    """A loopback TCP server that hands each accepted connection to ``serve``."""
    sockets: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def start(serve: Callable[[socket.socket], None]) -> int:
        srv = socket.create_server(("127.0.0.1", 0))
        sockets.append(srv)

        def loop() -> None:
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                sockets.append(conn)
                serve(conn)

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        threads.append(t)
        return int(srv.getsockname()[1])

    yield start
    for s in sockets:
        s.close()
    for t in threads:
        t.join(timeout=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_refused() -> None:
    port = _free_port()
    err = _error(f"http://127.0.0.1:{port}/fhir")
    assert f"connection refused by 127.0.0.1:{port}" in str(err)


def test_dns() -> None:
    err = _error("https://no-such-host.invalid/fhir")
    assert "DNS lookup failed for no-such-host.invalid" in str(err)


def test_timeout(tcp_server: Callable[[Callable[[socket.socket], None]], int]) -> None:
    port = tcp_server(lambda conn: None)  # accepts, never answers
    err = _error(f"http://127.0.0.1:{port}/fhir")
    assert f"timeout: 127.0.0.1:{port} did not answer within 0.3 s" in str(err)


def test_dropped(tcp_server: Callable[[Callable[[socket.socket], None]], int]) -> None:
    def drop(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.close()

    port = tcp_server(drop)
    err = _error(f"http://127.0.0.1:{port}/fhir")
    assert f"connection to 127.0.0.1:{port} dropped" in str(err)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fhirmatch-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls(tmp_path: Path, tcp_server: Callable[[Callable[[socket.socket], None]], int]) -> None:
    cert, key = _self_signed(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    def handshake(conn: socket.socket) -> None:
        try:
            ctx.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            pass

    port = tcp_server(handshake)
    err = _error(f"https://localhost:{port}/fhir")
    assert isinstance(err, FatalNetworkError)
    assert f"TLS error with localhost:{port}" in str(err)
    assert "certificate" in str(err)


def test_insecure_http_names_the_flag() -> None:
    with pytest.raises(ConfigurationError) as info:
        check_base_url("http://fhir.example.org/r4")
    assert "--allow-insecure-http" in str(info.value)


def test_cli_says_refused_and_exits_3() -> None:
    port = _free_port()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fhirmatch",
            "match",
            "--server",
            f"http://127.0.0.1:{port}/fhir",
            "--trials",
            str(REPO / "fixtures" / "trials"),
            "--retries",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert f"connection refused by 127.0.0.1:{port}" in proc.stderr
