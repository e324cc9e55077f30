"""The local FHIR sandbox: a real FHIR R4 server (sekmet-fhir, pinned) on 127.0.0.1.

This is the only module that touches sekmet's internals. It

- registers the search parameters sekmet lacks (ResearchStudy, ResearchSubject, PlanDefinition,
  ValueSet) in ``sekmet.fhir.search_params.PARAMS`` *before* the app is created — without them
  conditional create answers 400 and searches on those types silently return everything;
- binds 127.0.0.1 only and disables sekmet's workflow simulator (its defaults are 0.0.0.0 and
  a simulator that writes resources on its own);
- runs the server in a child process (``python -m fhirmatch.sandbox --serve …``) so that the
  parent talks to it over real HTTP, can show its log when it dies, and stops it cleanly.

:func:`start_sandbox` is used by ``fhirmatch sandbox``, ``fhirmatch demo`` and the pytest fixture.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from . import data
from .errors import ConfigurationError, FhirmatchError

log = logging.getLogger(__name__)

SANDBOX_HOST = "127.0.0.1"
STARTUP_TIMEOUT = 60.0

#: Search parameters sekmet 0.1.1 does not define, in its ``name:kind:path[|path][:target]`` form.
EXTRA_SEARCH_PARAMS: dict[str, str] = {
    "ResearchStudy": """
        identifier:token:identifier
        status:token:status
        title:string:title
        protocol:reference:protocol
        condition:token:condition
        category:token:category
        sponsor:reference:sponsor
    """,
    "ResearchSubject": """
        identifier:token:identifier
        status:token:status
        study:reference:study
        individual:reference:individual
        patient:reference:individual:Patient
        date:date:period
    """,
    "PlanDefinition": """
        identifier:token:identifier
        url:uri:url
        version:token:version
        status:token:status
        name:string:name
        title:string:title
    """,
    "ValueSet": """
        identifier:token:identifier
        url:uri:url
        version:token:version
        status:token:status
        name:string:name
    """,
}


class SandboxError(FhirmatchError):
    """The sandbox could not be started, or died. ``log_tail`` holds the end of its log."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        self.log_tail = log_tail
        super().__init__(message)

    def __str__(self) -> str:
        msg = str(self.args[0])
        if self.log_tail:
            msg += "\n--- sandbox log (last lines) ---\n" + self.log_tail
        return msg


def register_search_params() -> None:
    """Add :data:`EXTRA_SEARCH_PARAMS` to sekmet's table (idempotent). Call before create_app."""
    from sekmet.fhir import search_params as sp

    for rtype, block in EXTRA_SEARCH_PARAMS.items():
        table = sp.PARAMS.setdefault(rtype, {})
        for line in block.strip().splitlines():
            bits = line.strip().split(":")
            name, kind, paths = bits[0], bits[1], tuple(bits[2].split("|"))
            target = bits[3] if len(bits) > 3 else None
            table.setdefault(name, sp.SearchParam(name, kind, paths, target))


def _settings(port: int, data_dir: Path, auth: dict[str, Any] | None, nonce: str) -> Any:
    from sekmet.config import Settings

    data: dict[str, Any] = {
        "host": SANDBOX_HOST,
        "port": port,
        "base_url": f"http://{SANDBOX_HOST}:{port}/fhir",
        "data_dir": str(data_dir),
        "own_private_key_path": str(data_dir / "keys" / "sandbox_private.pem"),
        "simulator": {"enabled": False},
        "log_inbound": False,
        "facility_name": "fhirmatch sandbox",
        # the nonce lets the parent tell its own child from another server on the same port
        "software_name": f"fhirmatch sandbox (sekmet-fhir) {nonce}",
    }
    if auth:
        data["server_auth"] = auth
    return Settings.model_validate(data)


def serve(port: int, data_dir: Path, auth: dict[str, Any] | None = None, nonce: str = "") -> None:
    """Run the sandbox in this process until interrupted (the child-process entry point)."""
    import uvicorn
    from sekmet.config import set_settings
    from sekmet.main import create_app

    data_dir.mkdir(parents=True, exist_ok=True)
    register_search_params()
    settings = _settings(port, data_dir, auth, nonce)
    set_settings(settings)
    app = create_app(settings)
    config = uvicorn.Config(app, host=SANDBOX_HOST, port=port, log_level="warning")
    uvicorn.Server(config).run()


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((SANDBOX_HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class SandboxHandle:
    """A running sandbox. ``base_url`` ends in ``/fhir``; call :meth:`stop` (or use ``with``)."""

    base_url: str
    port: int
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    loaded: dict[str, int] = field(default_factory=dict)
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> SandboxHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_sandbox(
    port: int = 0,
    data_dir: str | Path | None = None,
    *,
    load: bool = True,
    fixtures: Iterable[Path] | None = None,
    auth: dict[str, Any] | None = None,
    startup_timeout: float = STARTUP_TIMEOUT,
) -> SandboxHandle:
    """Start a sandbox in a child process and wait until ``/metadata`` answers.

    ``port`` 0 picks a free port; ``data_dir`` None uses a fresh temporary directory removed on
    :meth:`SandboxHandle.stop`. ``auth`` is sekmet's ``server_auth`` settings (e.g.
    ``{"types": ["smart"], "smart_clients": [...]}``). With ``load`` the trial definitions and
    demo patients bundled with fhirmatch (:mod:`fhirmatch.data`; or the given ``fixtures`` files)
    are loaded.
    """
    try:
        import sekmet  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            "the local FHIR sandbox needs sekmet-fhir: pip install 'fhirmatch[sandbox]'"
        ) from exc
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fhirmatch-sandbox-")
        data_dir = tmp.name
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = data_dir / "sandbox.log"
    cmd = [sys.executable, "-m", "fhirmatch.sandbox", "--serve", "--port", str(port)]
    nonce = secrets.token_hex(8)
    cmd += ["--data-dir", str(data_dir), "--nonce", nonce]
    if auth:
        cmd += ["--auth-json", json.dumps(auth)]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the parent only; the parent stops the child
        )
    handle = SandboxHandle(
        base_url=f"http://{SANDBOX_HOST}:{port}/fhir",
        port=port,
        data_dir=data_dir,
        log_path=log_path,
        process=process,
        _tmp=tmp,
    )
    try:
        _wait_until_up(handle, startup_timeout, nonce)
        if load:
            handle.loaded = load_fixtures(handle.base_url, fixtures)
    except BaseException:
        handle.stop()
        raise
    return handle


def _wait_until_up(handle: SandboxHandle, timeout: float, nonce: str) -> None:
    deadline = time.monotonic() + timeout
    url = f"{handle.base_url}/metadata"
    while time.monotonic() < deadline:
        if not handle.alive():
            raise SandboxError(
                f"the sandbox exited with code {handle.process.returncode}", handle.log_tail()
            )
        with contextlib.suppress(requests.RequestException, ValueError):
            resp = requests.get(url, timeout=2)
            if resp.status_code == 200:
                if nonce in str(resp.json().get("software", {}).get("name", "")):
                    return
                # another server answers on this port: ours failed (or will fail) to bind
                with contextlib.suppress(subprocess.TimeoutExpired):
                    handle.process.wait(timeout=10)
                raise SandboxError(
                    f"port {handle.port} is taken by another server", handle.log_tail()
                )
        time.sleep(0.2)
    raise SandboxError(f"the sandbox did not answer on {url} in {timeout:.0f}s", handle.log_tail())


def fixture_files(paths: Iterable[Path] | None = None) -> list[Path]:
    """The JSON files to load: trial Bundles first, then patients (sorted, so loads repeat)."""
    roots = list(paths) if paths is not None else [data.seed_trials_dir(), data.demo_patients_dir()]
    files: list[Path] = []
    for root in roots:
        if root.is_dir():
            files.extend(sorted(p for p in root.rglob("*.json") if p.is_file()))
        elif root.is_file():
            files.append(root)
    return files


def _as_transaction(doc: dict[str, Any]) -> dict[str, Any]:
    """Turn a collection Bundle or loose resource into a transaction of idempotent PUTs."""
    if doc.get("resourceType") == "Bundle" and doc.get("type") in ("transaction", "batch"):
        return doc
    resources = (
        [e["resource"] for e in doc.get("entry", []) if "resource" in e]
        if doc.get("resourceType") == "Bundle"
        else [doc]
    )
    entries = []
    for res in resources:
        if not res.get("id"):
            raise ConfigurationError(f"fixture {res.get('resourceType')} has no id")
        url = f"{res['resourceType']}/{res['id']}"
        entries.append({"resource": res, "request": {"method": "PUT", "url": url}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def load_fixtures(base_url: str, paths: Iterable[Path] | None = None) -> dict[str, int]:
    """POST each fixture file to the server as a transaction; return counts per resource type."""
    counts: dict[str, int] = {}
    with requests.Session() as session:
        for path in fixture_files(paths):
            bundle = _as_transaction(json.loads(path.read_text(encoding="utf-8")))
            resp = session.post(
                base_url,
                json=bundle,
                headers={"Content-Type": "application/fhir+json"},
                timeout=120,
            )
            if resp.status_code >= 300:
                raise SandboxError(
                    f"loading {path.name} failed with HTTP {resp.status_code}: {_outcome(resp)}"
                )
            for entry in bundle.get("entry", []):
                rtype = entry.get("resource", {}).get("resourceType", "?")
                counts[rtype] = counts.get(rtype, 0) + 1
    return counts


def _outcome(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    issues = body.get("issue", []) if isinstance(body, dict) else []
    return "; ".join(str(i.get("diagnostics", i.get("code", ""))) for i in issues)[:500]


@contextlib.contextmanager
def running_sandbox(**kwargs: Any) -> Iterator[SandboxHandle]:
    """``with running_sandbox() as sb:`` — start, yield, always stop."""
    handle = start_sandbox(**kwargs)
    try:
        yield handle
    finally:
        handle.stop()


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fhirmatch.sandbox")
    parser.add_argument("--serve", action="store_true", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--auth-json", default=None)
    parser.add_argument("--nonce", default="")
    args = parser.parse_args(argv)
    auth = json.loads(args.auth_json) if args.auth_json else None
    os.chdir(args.data_dir)  # sekmet writes relative paths (keys, exports) under the cwd
    serve(args.port, args.data_dir, auth, args.nonce)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
