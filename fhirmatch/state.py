"""Job state for scheduled ``fhirmatch match --state FILE`` runs.

Three files, all created owner-only (0600):

- ``FILE`` — JSON, replaced atomically (write to a temporary file, fsync, ``os.replace``, fsync
  the directory): the server and trial digest the state belongs to, and the start time of the
  last successful run (the ``_lastUpdated`` lower bound of the next incremental run);
- ``FILE.lock`` — held with ``flock`` for the whole run, so a second run refuses to start (the
  kernel releases it when a run dies, even by SIGKILL);
- ``FILE.journal`` — append-only NDJSON, one line per patient finished by the current run
  (evaluated and written back), flushed at once and fsynced in small batches. A run that
  dies leaves it behind; the next run with the same parameters resumes: it skips the patients
  listed there and keeps the dead run's ``_lastUpdated`` window, so nothing is missed and
  nothing is done twice.

A resumed run whose parameters (server, trials) differ from the interrupted one refuses to go on
unless the journal is discarded (``--restart``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .errors import StateError

STATE_VERSION = 1
_JOURNAL_SYNC_EVERY = 20


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass
class RunState:
    """What the state file says."""

    server: str | None = None
    trials_digest: str | None = None
    #: server-side start time (ISO 8601) of the last successful run
    last_success: str | None = None
    #: the interrupted run, if any: its parameters and ``since`` window
    in_progress: dict[str, Any] | None = None
    runs: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "server": self.server,
            "trials_digest": self.trials_digest,
            "last_success": self.last_success,
            "in_progress": self.in_progress,
            "runs": self.runs,
        }


@dataclass
class StateStore:
    """The state file, its lock and its journal. Use as a context manager to hold the lock."""

    path: Path
    state: RunState = field(default_factory=RunState)
    _lock_fh: IO[str] | None = None
    _journal_fh: IO[str] | None = None
    _unsynced: int = 0

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @property
    def journal_path(self) -> Path:
        return self.path.with_name(self.path.name + ".journal")

    # -- lock -------------------------------------------------------------------------------
    def __enter__(self) -> StateStore:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fh = os.fdopen(fd, "r+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = fh.read().strip()
            fh.close()
            who = f" (pid {holder})" if holder else ""
            raise StateError(
                f"another fhirmatch run holds {self.lock_path}{who}; refusing to start"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._lock_fh = fh
        try:
            self.state = self._read()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self._journal_fh is not None:
            self._sync_journal()
            self._journal_fh.close()
            self._journal_fh = None
        if self._lock_fh is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    # -- state file -------------------------------------------------------------------------
    def _read(self) -> RunState:
        if not self.path.exists():
            return RunState()
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StateError(f"state file {self.path} is unreadable: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
            raise StateError(f"state file {self.path} has an unknown format")
        return RunState(
            server=raw.get("server"),
            trials_digest=raw.get("trials_digest"),
            last_success=raw.get("last_success"),
            in_progress=raw.get("in_progress"),
            runs=int(raw.get("runs") or 0),
        )

    def save(self) -> None:
        self._require_lock()
        body = json.dumps(self.state.to_json(), indent=2, sort_keys=True).encode()
        write_private_file(self.path, body)

    def _require_lock(self) -> None:
        if self._lock_fh is None:
            raise StateError("the state file is not locked by this run")

    # -- journal ----------------------------------------------------------------------------
    def journal_done(self) -> set[str]:
        """Patients the interrupted run finished (empty when there is no journal)."""
        done: set[str] = set()
        if not self.journal_path.exists():
            return done
        with open(self.journal_path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line torn by a crash: that patient is simply done again
                if isinstance(entry, dict) and isinstance(entry.get("patient"), str):
                    done.add(entry["patient"])
        return done

    def begin_run(self, params: dict[str, Any], *, restart: bool = False) -> set[str]:
        """Start (or resume) a run; returns the patients an interrupted run already finished."""
        self._require_lock()
        previous = self.state.in_progress
        done: set[str] = set()
        if previous is not None and not restart:
            if previous.get("params") != params:
                raise StateError(
                    "the interrupted run in this state file used other parameters "
                    f"({_diff(previous.get('params') or {}, params)}); re-run with the same "
                    "ones to resume, or pass --restart to discard it"
                )
            done = self.journal_done()
        else:
            with contextlib.suppress(FileNotFoundError):
                self.journal_path.unlink()
            self.state.in_progress = {"params": params}
            self.save()
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._journal_fh = os.fdopen(fd, "a", encoding="utf-8")
        return done

    def mark_done(self, patient: str) -> None:
        assert self._journal_fh is not None, "begin_run() first"
        self._journal_fh.write(json.dumps({"patient": patient}) + "\n")
        self._journal_fh.flush()  # in the kernel now: survives SIGKILL; fsync (power loss) batched
        self._unsynced += 1
        if self._unsynced >= _JOURNAL_SYNC_EVERY:
            self._sync_journal()

    def _sync_journal(self) -> None:
        if self._journal_fh is not None and self._unsynced:
            self._journal_fh.flush()
            os.fsync(self._journal_fh.fileno())
            self._unsynced = 0

    def finish_run(self, *, server: str, trials_digest: str, started: str) -> None:
        """Record a successful run and drop its journal."""
        self._require_lock()
        self.state.server = server
        self.state.trials_digest = trials_digest
        self.state.last_success = started
        self.state.in_progress = None
        self.state.runs += 1
        self.save()
        if self._journal_fh is not None:
            self._journal_fh.close()
            self._journal_fh = None
        with contextlib.suppress(FileNotFoundError):
            self.journal_path.unlink()


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(keys) or "unknown"
