"""Job state: atomic owner-only files, an exclusive lock, and resumable runs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fhirmatch.errors import StateError
from fhirmatch.state import StateStore, write_private_file

PARAMS = {"server": "http://127.0.0.1:1/fhir", "trials": "abc"}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_file_is_owner_only_and_replaced_atomically(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.json"
    write_private_file(target, b"one")
    write_private_file(target, b"two")
    assert target.read_bytes() == b"two"
    assert _mode(target) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]  # no temp files left


def test_second_holder_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    with StateStore(path):
        with pytest.raises(StateError, match="another fhirmatch run holds"):
            StateStore(path).acquire()
    # released: a new run may start
    with StateStore(path):
        pass


def test_lock_held_by_another_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    code = (
        "import sys, time; from pathlib import Path; from fhirmatch.state import StateStore;"
        f"s = StateStore(Path({str(path)!r})); s.acquire(); print('locked', flush=True);"
        "sys.stdin.readline()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(StateError, match=f"pid {proc.pid}"):
            StateStore(path).acquire()
    finally:
        proc.kill()
        proc.communicate()
    with StateStore(path):  # the kernel released the lock of the killed process
        pass


def test_interrupted_run_resumes_with_its_journal(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = StateStore(path)
    store.acquire()
    assert store.begin_run(PARAMS) == set()
    store.mark_done("Patient/a")
    store.mark_done("Patient/b")
    store.release()  # dies here: no finish_run
    assert _mode(store.journal_path) == 0o600

    with StateStore(path) as again:
        assert again.state.in_progress == {"params": PARAMS}
        assert again.begin_run(PARAMS) == {"Patient/a", "Patient/b"}
        again.mark_done("Patient/c")
        again.finish_run(server="s", trials_digest="abc", started="2026-11-24T10:00:00Z")
        assert not again.journal_path.exists()

    saved = json.loads(path.read_text())
    assert saved["in_progress"] is None
    assert saved["last_success"] == "2026-11-24T10:00:00Z"
    assert saved["runs"] == 1
    assert _mode(path) == 0o600


def test_torn_journal_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    with StateStore(path) as store:
        store.begin_run(PARAMS)
        store.mark_done("Patient/a")
    with open(store.journal_path, "a") as fh:
        fh.write('{"patient": "Patient/b"')  # the crash tore the last line
    with StateStore(path) as again:
        assert again.begin_run(PARAMS) == {"Patient/a"}


def test_resume_with_other_parameters_is_refused_unless_restarted(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    with StateStore(path) as store:
        store.begin_run(PARAMS)
        store.mark_done("Patient/a")
    other = {**PARAMS, "trials": "changed"}
    with StateStore(path) as again:
        with pytest.raises(StateError, match="trials"):
            again.begin_run(other)
        assert again.begin_run(other, restart=True) == set()


def test_unreadable_state_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("{not json")
    with pytest.raises(StateError, match="unreadable"):
        StateStore(path).acquire()


def test_state_files_are_not_world_readable_even_with_lax_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with StateStore(tmp_path / "state.json") as store:
            store.begin_run(PARAMS)
            store.save()
    finally:
        os.umask(old)
    for name in ("state.json", "state.json.lock", "state.json.journal"):
        assert _mode(tmp_path / name) == 0o600, name
