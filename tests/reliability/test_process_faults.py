"""``fhirmatch match`` as a process under faults: killed mid-write-back, started twice at once,
and a server that keeps failing (exit codes 3 and 1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultproxy import Fault, FaultProxy
from fmhelpers import AS_OF, TRIALS, assert_written_once, make_population, query_for

from fhirmatch.cli import main
from fhirmatch.cli.match import load_file_trials

pytestmark = pytest.mark.integration

TRANSACTION = r"^/fhir/?$"
STUDIES = [t.reference for t in load_file_trials([TRIALS], None)]


@pytest.fixture()
def proxy(fhir_base_url: str) -> Iterator[FaultProxy]:
    with FaultProxy(fhir_base_url) as p:
        yield p


def _args(base: str, tag: str, *extra: str) -> list[str]:
    return [
        "match",
        "--server",
        base,
        "--trials",
        str(TRIALS),
        "--as-of",
        AS_OF,
        "--patients-query",
        query_for(tag),
        *extra,
    ]


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "fhirmatch", *args, "--log-level", "ERROR"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _run_json(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, dict[str, Any]]:
    code = main([*args, "--format", "json", "--log-level", "ERROR"])
    return code, json.loads(capsys.readouterr().out)


def _pairs(report: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (r["study"], r["patient"])
        for r in report["results"]
        if r["status"] in ("eligible", "insufficient-data")
    }


@pytest.mark.parametrize("concurrency", [1, 8])
def test_sigkill_while_server_commits_then_resume(
    fhir_base_url: str,
    proxy: FaultProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    concurrency: int,
) -> None:
    """The third patient's transaction reaches the server and commits; the client is killed
    before the answer arrives (so that patient is not in the journal). The resumed run must
    find its subjects, not create them again, and must screen everyone not journalled. One at a
    time, the first two patients are journalled; concurrently, whichever finished."""
    tag, ids = make_population(fhir_base_url, 6)
    state = tmp_path / "state.json"
    journal = tmp_path / "state.json.journal"
    hang = proxy.add(
        Fault("hang_after_forward", method="POST", path=TRANSACTION, skip=2, seconds=30)
    )
    args = _args(
        proxy.base_url,
        tag,
        "--state",
        str(state),
        "--chunk-size",
        "1",
        "--concurrency",
        str(concurrency),
    )
    proc = _spawn(args)
    try:
        assert hang.fired.wait(60), "the run never reached its third transaction"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
        assert proc.stderr is not None
        proc.stderr.close()
    done = [json.loads(line)["patient"] for line in journal.read_text().splitlines()]
    if concurrency == 1:
        assert len(done) == 2  # the first two patients; the third committed but is not journalled
    else:
        assert len(done) <= len(ids) - 1  # the third committed but is not journalled

    proxy.clear()
    code, resumed = _run_json(capsys, args)
    assert code == 0
    screened = {r["patient"] for r in resumed["results"]}
    assert screened == {f"Patient/{p}" for p in ids} - set(done)
    # the in-flight patient's subjects were committed by the killed run: found, not re-created
    actions: dict[str, set[str]] = {}
    for w in resumed["writes"]:
        if w["action"] != "not-written":
            actions.setdefault(w["patient"], set()).add(w["action"])
    found_written = [p for p, acts in actions.items() if acts == {"unchanged"}]
    if concurrency == 1:
        assert len(found_written) == 1, actions
    else:  # the hanging one, and any others written but not journalled before the kill
        assert len(found_written) >= 1, actions
    assert not journal.exists()

    code, check = _run_json(capsys, [*_args(fhir_base_url, tag), "--dry-run"])
    assert code == 0
    assert {w["action"] for w in check["writes"] if w["action"] != "not-written"} == {"unchanged"}
    assert_written_once(fhir_base_url, ids, STUDIES, _pairs(check))


def test_second_concurrent_run_refuses_with_exit_4(
    fhir_base_url: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    tag, _ids = make_population(fhir_base_url, 2)
    state = tmp_path / "state.json"
    lock = tmp_path / "state.json.lock"
    # hold the first run in its first transaction, so it keeps the lock
    hang = proxy.add(Fault("hang_after_forward", method="POST", path=TRANSACTION, seconds=20))
    args = _args(proxy.base_url, tag, "--state", str(state))
    first = _spawn(args)
    try:
        assert hang.fired.wait(60), "the first run never reached write-back"
        second = subprocess.run(
            [sys.executable, "-m", "fhirmatch", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 4
        assert f"another fhirmatch run holds {lock}" in second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        assert first.stderr is not None
        first.stderr.close()


def test_server_failing_from_the_start_exits_3(
    proxy: FaultProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy.add(Fault("status", path=r"/metadata", status=503, times=None))
    t0 = time.monotonic()
    code = main([*_args(proxy.base_url, "none"), "--retries", "2", "--log-level", "ERROR"])
    assert code == 3
    err = capsys.readouterr().err
    assert "server error" in err and "503" in err and "after 2 attempts" in err
    assert proxy.count("status") == 2
    assert time.monotonic() - t0 < 10


def test_search_failing_for_some_patients_exits_1_and_lists_them(
    fhir_base_url: str, proxy: FaultProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    tag, ids = make_population(fhir_base_url, 4)
    failing = rf"/Observation(/_search|\?).*patient={ids[0]}%2C{ids[1]}&"
    proxy.add(Fault("status", path=failing, status=502, times=None))
    code, report = _run_json(
        capsys, [*_args(proxy.base_url, tag), "--chunk-size", "2", "--retries", "2"]
    )
    assert code == 1
    assert {s["patient"] for s in report["skipped"]} == {f"Patient/{p}" for p in ids[:2]}
    assert all("502" in s["reason"] for s in report["skipped"])
    assert {r["patient"] for r in report["results"]} == {f"Patient/{p}" for p in ids[2:]}
