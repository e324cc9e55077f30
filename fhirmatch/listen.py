"""Event-driven screening: re-screen a patient as soon as data the trial criteria use changes.

:class:`Listener` registers R4 ``rest-hook`` Subscriptions on the FHIR server, one per resource
type the active trials' criteria read (``Observation?code=sys|c1,sys|c2``, built from the same
data requirements :func:`fhirmatch.fetch.fetch_patient_data` fetches with), and receives the
notifications on a small local HTTP endpoint (:class:`http.server.ThreadingHTTPServer`, bound to
127.0.0.1 by default). Each notification names a resource; the listener re-screens only the
patient it belongs to with :func:`fhirmatch.match.screen_patients`, which fetches the patient's
current data, evaluates it and writes back exactly as ``fhirmatch match`` does (idempotent
ResearchSubjects with Provenance).

Guarantees:

* Duplicates and out-of-order notifications are harmless: a screen reads the server's current
  state, never the notified resource. Notifications for one patient are coalesced for
  ``coalesce_seconds``; one patient is never screened by two threads at once, and a notification
  that arrives while its patient is being screened queues one more screen after it.
* Nothing is missed across downtime: with a state file (:class:`fhirmatch.state.StateStore`, the
  same format ``fhirmatch match --state`` uses) the listener keeps the server time before which
  every change has been screened (``last_success``). On start it subscribes first, then searches
  each watched type with ``_lastUpdated=ge<checkpoint>`` and re-screens those patients while
  listening. The checkpoint advances only past changes whose notifications had
  ``delivery_grace`` seconds to arrive and whose screens have all finished; a patient whose
  screen failed is retried with back-off and holds the checkpoint back until it succeeds.
* The notification endpoint checks the ``Authorization`` header the Subscription's
  ``channel.header`` carries (a random bearer token per run unless one is given), and its
  Subscriptions are deleted on :meth:`Listener.stop` (and, after a crash, on the next start,
  from the ids kept next to the state file).

Logs name resource ids only, never patient data.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hmac
import http.server
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from .client import FhirClient
from .engine import Engine
from .errors import ConfigurationError, FatalNetworkError, NetworkError, StateError
from .fetch import HIERARCHICAL_SYSTEMS, MEDICATION_TYPES
from .match import (
    MatchOptions,
    MatchOutcome,
    fetch_requirements,
    publish_trials,
    screen_patients,
    server_now,
    trials_digest,
)
from .model import DataInput, Trial
from .records import patient_reference_of
from .state import StateStore, write_private_file
from .terminology import Terminology
from .writeback import DEFAULT_WRITE

__all__ = [
    "DEFAULT_MAX_CRITERIA_LENGTH",
    "ListenOptions",
    "Listener",
    "Watch",
    "subscription_resource",
    "watches_for",
]

log = logging.getLogger(__name__)

#: Subscription.criteria longer than this is split into several Subscriptions of one type. FHIR
#: sets no limit below 1 MB, but servers evaluate criteria as a search URL and many cap URLs
#: near 2 KB; :class:`fhirmatch.client.ClientConfig` ``max_get_query`` uses the same bound.
DEFAULT_MAX_CRITERIA_LENGTH = 1800
#: largest notification body accepted (a resource, or a Bundle of a few)
MAX_BODY = 10 * 1024 * 1024
SUBSCRIPTION_REASON = "fhirmatch: re-screen patients when data the trial criteria use changes"
NOTIFY_PATH = "/fhirmatch/notify"


# --------------------------------------------------------------------------- criteria


@dataclass(frozen=True)
class Watch:
    """One Subscription: a resource type and the search parameters its changes must match."""

    resource_type: str
    params: tuple[tuple[str, str], ...] = ()

    @property
    def criteria(self) -> str:
        """``Type?name=value&…`` with the values percent-encoded (``|``, ``,`` and ``:`` kept)."""
        query = "&".join(f"{k}={quote(v, safe=':/|,')}" for k, v in self.params)
        return f"{self.resource_type}?{query}"


def _escape(text: str) -> str:
    # commas, pipes and dollars inside a token are escaped with a backslash (FHIR search)
    return text.replace("\\", "\\\\").replace(",", "\\,").replace("|", "\\|").replace("$", "\\$")


def _token(system: str, code: str) -> str:
    return f"{_escape(system)}|{_escape(code)}" if system else _escape(code)


def watches_for(
    requirements: Iterable[DataInput], *, max_length: int = DEFAULT_MAX_CRITERIA_LENGTH
) -> list[Watch]:
    """The Subscriptions that cover every change to data ``requirements`` read.

    One per resource type, filtered on the union of the required codes (``code=s|c,s|c``), except
    where a code filter would miss relevant changes: medication types (the drug may be a
    ``medicationReference``, invisible to ``code``), value sets of hierarchical code systems
    (ICD-10 categories stand for their descendants) and requirements without codes watch every
    resource of the type. A code list too long for ``max_length`` is split over several
    Subscriptions of the same type. ``Patient`` is watched whole when a criterion reads it (a
    changed birth date or death matters).
    """
    codes_by_type: dict[str, set[tuple[str, str]] | None] = {}
    for req in requirements:
        rtype = req.resource_type
        whole = (
            rtype == "Patient"
            or rtype in MEDICATION_TYPES
            or req.code_path == "medication"
            or not req.codes
            or any(system in HIERARCHICAL_SYSTEMS for system, _ in req.codes)
            or bool(req.text_systems)  # a diagnosis recorded as text has no code to watch
        )
        if whole or codes_by_type.get(rtype, set()) is None:
            codes_by_type[rtype] = None
        else:
            held = codes_by_type.setdefault(rtype, set())
            assert held is not None
            held |= set(req.codes)
    watches: list[Watch] = []
    for rtype in sorted(codes_by_type):
        codes = codes_by_type[rtype]
        if codes is None:
            watches.append(Watch(rtype))
            continue
        budget = max_length - len(Watch(rtype, (("code", ""),)).criteria)
        group: list[str] = []
        size = 0
        for token in sorted(_token(s, c) for s, c in codes):
            cost = len(quote(token, safe=":/|,")) + (1 if group else 0)
            if group and size + cost > budget:
                watches.append(Watch(rtype, (("code", ",".join(group)),)))
                group, size = [], 0
                cost -= 1
            if cost > budget:
                raise ConfigurationError(
                    f"a {rtype} code is longer than the Subscription criteria limit ({max_length})"
                )
            group.append(token)
            size += cost
        if group:
            watches.append(Watch(rtype, (("code", ",".join(group)),)))
    return watches


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ListenOptions:
    """How a :class:`Listener` runs.

    ``host``/``port``: where the notification endpoint listens (port 0 picks a free one).
    ``public_url``: the endpoint's base URL as the FHIR server reaches it (default
    ``http://host:port``; required when ``host`` is not a loopback address).
    ``token``: the bearer token the server must send (``channel.header``); None makes a random
    one per run. ``state_path``: the checkpoint file; None screens only what is notified while
    running. ``as_of``: a fixed evaluation date (default: each screen's today).
    ``activation_timeout``: how long start-up waits for the server to mark the Subscriptions
    ``active`` (servers that activate them asynchronously notify nothing before that).
    """

    host: str = "127.0.0.1"
    port: int = 0
    public_url: str | None = None
    token: str | None = None
    state_path: Path | None = None
    as_of: dt.date | None = None
    write: frozenset[str] = DEFAULT_WRITE
    dry_run: bool = False
    publish: bool = True
    workers: int = 4
    coalesce_seconds: float = 0.1
    checkpoint_interval: float = 5.0
    delivery_grace: float = 30.0
    max_retry_delay: float = 60.0
    max_criteria_length: int = DEFAULT_MAX_CRITERIA_LENGTH
    #: seconds to wait for the server to activate the Subscriptions before listening
    activation_timeout: float = 60.0

    def __post_init__(self) -> None:
        for name in ("dry_run", "publish"):
            if not isinstance(getattr(self, name), bool):  # "false" would be truthy
                raise ConfigurationError(
                    f"ListenOptions.{name} must be True or False, not {getattr(self, name)!r}"
                )
        if self.workers < 1:
            raise ConfigurationError("the listener needs at least one worker")
        if min(self.coalesce_seconds, self.delivery_grace) < 0 or self.checkpoint_interval <= 0:
            raise ConfigurationError("listener delays must not be negative")
        if self.public_url is None and self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ConfigurationError(
                f"listening on {self.host}: give the URL the server reaches it at (--public-url)"
            )
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            raise ConfigurationError("--public-url must be an http(s) URL")


# --------------------------------------------------------------------------- work queue


@dataclass
class _Item:
    due: float
    first_seen: float
    attempts: int = 0


class _WorkQueue:
    """Patients waiting to be screened: coalesced, never one patient on two threads at once."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: dict[str, _Item] = {}
        self._running: dict[str, _Item] = {}
        self._closed = False

    def submit(self, pid: str, delay: float, *, first_seen: float | None = None) -> None:
        now = time.monotonic()
        seen = now if first_seen is None else first_seen
        with self._cond:
            item = self._pending.get(pid)
            if item is None:
                self._pending[pid] = _Item(due=now + delay, first_seen=seen)
            else:
                item.first_seen = min(item.first_seen, seen)
            self._cond.notify()

    def take(self) -> tuple[str, _Item] | None:
        """The next due patient not being screened, or None once closed."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                ready = [(i.due, p) for p, i in self._pending.items() if p not in self._running]
                if ready:
                    due, pid = min(ready)
                    if due <= now:
                        item = self._pending.pop(pid)
                        self._running[pid] = item
                        return pid, item
                    self._cond.wait(due - now)
                else:
                    self._cond.wait()
            return None

    def finish(self, pid: str, item: _Item, ok: bool, retry_delay: float) -> None:
        with self._cond:
            self._running.pop(pid, None)
            if not ok:
                again = self._pending.get(pid)
                if again is None:
                    self._pending[pid] = _Item(
                        due=time.monotonic() + retry_delay,
                        first_seen=item.first_seen,
                        attempts=item.attempts + 1,
                    )
                else:
                    again.first_seen = min(again.first_seen, item.first_seen)
                    again.attempts = item.attempts + 1
            self._cond.notify_all()

    def oldest_unfinished(self) -> float | None:
        with self._cond:
            seen = [i.first_seen for i in (*self._pending.values(), *self._running.values())]
            return min(seen) if seen else None

    def wait_idle(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending or self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


# --------------------------------------------------------------------------- the listener


@dataclass
class _Sample:
    ready_after: float  # monotonic time after which this checkpoint may be committed
    server_time: str


@dataclass
class ListenStats:
    """Counters of one listener's life."""

    notifications: int = 0
    rejected: int = 0
    screens: int = 0
    failed_screens: int = 0
    caught_up: int = 0
    subscriptions: list[str] = field(default_factory=list)


def subscription_resource(criteria: str, endpoint: str, token: str) -> dict[str, Any]:
    """The R4 rest-hook Subscription the listener registers for one search ``criteria``: the
    server PUTs/POSTs each matching resource (JSON) to ``endpoint`` with ``token`` as bearer."""
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": SUBSCRIPTION_REASON,
        "criteria": criteria,
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "header": [f"Authorization: Bearer {token}"],
        },
    }


class Listener:
    """Screens patients when the server notifies a change to data the trials use.

    ``with Listener(client, trials, options) as listener:`` starts it (publish trials, open the
    endpoint, subscribe, catch up) and stops it on exit; or call :meth:`start` and :meth:`stop`.
    ``on_screened(patient_id, outcome)`` is called (from a worker thread) after every screen.
    The client must stay open while the listener runs.
    """

    def __init__(
        self,
        client: FhirClient,
        trials: Sequence[Trial],
        options: ListenOptions | None = None,
        *,
        engine: Engine | None = None,
        terminology: Terminology | None = None,
        on_screened: Callable[[str, MatchOutcome], None] | None = None,
    ) -> None:
        if not trials:
            raise ConfigurationError("the listener needs at least one trial")
        self.client = client
        self.trials = list(trials)
        self.options = options or ListenOptions()
        if terminology is None:
            terminology = engine.terminology if engine is not None else Terminology.load()
        self.engine = engine or Engine(self.trials, terminology)
        self.requirements = fetch_requirements(self.trials, terminology)
        self.watches = watches_for(self.requirements, max_length=self.options.max_criteria_length)
        self.match_options = MatchOptions(
            as_of=self.options.as_of, dry_run=self.options.dry_run, write=self.options.write
        )
        self.stats = ListenStats()
        self._on_screened = on_screened
        self._token = self.options.token or secrets.token_urlsafe(32)
        self._queue = _WorkQueue()
        self._plan_refs: dict[str, str] = {
            t.reference: f"PlanDefinition/{t.plan_definition_id}" for t in self.trials
        }
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._server: http.server.ThreadingHTTPServer | None = None
        self._state: StateStore | None = None
        self._samples: list[_Sample] = []
        self._samples_lock = threading.Lock()
        self._stopping = threading.Event()
        self._started = False
        self._endpoint = ""

    # -- public --------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """The URL the Subscriptions deliver to (set once started)."""
        return self._endpoint

    @property
    def checkpoint(self) -> str | None:
        """The server time before which every change has been screened (with a state file)."""
        return self._state.state.last_success if self._state is not None else None

    def __enter__(self) -> Listener:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Publish the trials, open the endpoint, subscribe, and queue the catch-up screens."""
        if self._started:
            raise ConfigurationError("this listener has already been started")
        if self.client.fhir_version != "R4":
            raise ConfigurationError(
                "listen uses R4 rest-hook Subscriptions; the server speaks "
                f"{self.client.fhir_version}"
            )
        self._started = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        opts = self.options
        since: str | None = None
        if opts.state_path is not None:
            self._state = StateStore(opts.state_path)
            self._state.acquire()
            since = self._resume_point(self._state)
            self._remove_stale_subscriptions()
        if opts.publish and not opts.dry_run:
            self._plan_refs = publish_trials(self.client, self.trials)
        self._open_endpoint()
        for _ in range(opts.workers):
            self._spawn(self._work, "fhirmatch-listen-worker")
        self._subscribe()
        # every change from here on is notified; the catch-up search covers the rest
        start_time = server_now(self.client)
        if since is not None:
            self.catch_up(since)
        self._add_sample(_Sample(time.monotonic(), start_time))
        if self._state is not None:
            self._spawn(self._checkpoint_loop, "fhirmatch-listen-checkpoint")
        log.info(
            "listening on %s for %d watched resource types (%d subscriptions)",
            self._endpoint,
            len({w.resource_type for w in self.watches}),
            len(self.stats.subscriptions),
        )

    def stop(self) -> None:
        """Delete the Subscriptions, close the endpoint, finish running screens, save the state."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._unsubscribe()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self._queue.close()
        for t in self._threads:
            t.join(timeout=60)
        if self._state is not None:
            with contextlib.suppress(NetworkError):
                self._commit_checkpoint()
            self._state.release()
        log.info(
            "stopped: %d notifications, %d screens (%d failed)",
            self.stats.notifications,
            self.stats.screens,
            self.stats.failed_screens,
        )

    def wait(self) -> None:
        """Block until :meth:`stop` is called (from a signal handler or another thread)."""
        while not self._stopping.wait(0.5):
            pass

    def submit(self, patient_id: str, *, delay: float | None = None) -> None:
        """Queue a re-screen of one patient (what a notification does)."""
        pid = patient_id.rsplit("/", 1)[-1]
        if pid:
            wait = self.options.coalesce_seconds if delay is None else delay
            self._queue.submit(pid, wait)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no screen is queued or running; False when ``timeout`` ran out first."""
        return self._queue.wait_idle(timeout)

    def screen(self, patient_id: str) -> MatchOutcome:
        """Screen one patient now and write back, serialised with other screens of that patient."""
        pid = patient_id.rsplit("/", 1)[-1]
        with self._locks_guard:
            lock = self._locks.setdefault(pid, threading.Lock())
        with lock:
            return screen_patients(
                self.client,
                self.trials,
                [pid],
                self.match_options,
                engine=self.engine,
                plan_refs=self._plan_refs,
                requirements=self.requirements,
            )

    def catch_up(self, since: str) -> set[str]:
        """Queue every patient with a watched resource updated at or after ``since``."""
        changed: set[str] = set()
        seen = time.monotonic()
        for watch in self.watches:
            params = [*watch.params, ("_lastUpdated", f"ge{since}"), ("_count", "500")]
            for res in self.client.iter_resources(watch.resource_type, params):
                pid = patient_reference_of(res)
                if pid:
                    changed.add(pid)
        for pid in sorted(changed):
            self._queue.submit(pid, 0.0, first_seen=seen)
        self.stats.caught_up += len(changed)
        log.info("catch-up since %s: %d patients to re-screen", since, len(changed))
        return changed

    # -- state ---------------------------------------------------------------------------
    def _resume_point(self, state: StateStore) -> str | None:
        st = state.state
        if st.in_progress is not None:
            raise StateError(
                f"{state.path} holds an interrupted match run; finish it with "
                "'fhirmatch match --state' before listening with this state file"
            )
        if st.last_success is None:
            log.info("no checkpoint in %s: screening only what changes from now on", state.path)
            return None
        if st.server != self.client.base_url:
            log.warning("the state file belongs to another server; its checkpoint is ignored")
            return None
        if st.trials_digest != trials_digest(self.trials):
            log.warning(
                "the trials changed since the checkpoint: changed data is re-screened, but run "
                "'fhirmatch match' to re-screen everyone against the new definitions"
            )
        return st.last_success

    def _subs_path(self) -> Path | None:
        path = self.options.state_path
        return path.with_name(path.name + ".subscriptions") if path is not None else None

    def _save_subscription_ids(self) -> None:
        path = self._subs_path()
        if path is not None:
            body = json.dumps({"server": self.client.base_url, "ids": self.stats.subscriptions})
            write_private_file(path, body.encode())

    def _remove_stale_subscriptions(self) -> None:
        path = self._subs_path()
        if path is None or not path.exists():
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if not isinstance(data, dict) or data.get("server") != self.client.base_url:
            return
        for sid in data.get("ids") or []:
            with contextlib.suppress(NetworkError):
                self.client.delete("Subscription", str(sid))
                log.info("removed Subscription/%s left by an earlier listener", sid)
        path.unlink(missing_ok=True)

    def _add_sample(self, sample: _Sample) -> None:
        with self._samples_lock:
            self._samples.append(sample)

    def _commit_checkpoint(self) -> None:
        """Advance the checkpoint to the newest sample whose changes are all screened."""
        if self._state is None:
            return
        now = time.monotonic()
        oldest = self._queue.oldest_unfinished()
        with self._samples_lock:
            ready = [
                s
                for s in self._samples
                if s.ready_after <= now and (oldest is None or oldest > s.ready_after)
            ]
            if not ready:
                return
            best = ready[-1]
            self._samples = [s for s in self._samples if s.ready_after > best.ready_after]
        if best.server_time != self._state.state.last_success:
            self._state.finish_run(
                server=self.client.base_url,
                trials_digest=trials_digest(self.trials),
                started=best.server_time,
            )
            log.debug("checkpoint now %s", best.server_time)

    def _checkpoint_loop(self) -> None:
        while not self._stopping.wait(self.options.checkpoint_interval):
            try:
                stamp = server_now(self.client)
                self._add_sample(_Sample(time.monotonic() + self.options.delivery_grace, stamp))
                self._commit_checkpoint()
            except (NetworkError, StateError, OSError) as exc:
                log.warning("could not advance the checkpoint: %s", exc)

    # -- subscriptions -------------------------------------------------------------------
    def _subscribe(self) -> None:
        for watch in self.watches:
            sub = subscription_resource(watch.criteria, self._endpoint, self._token)
            created = self.client.create(sub)
            sid = created.id
            if not sid:
                raise ConfigurationError(
                    f"the server did not create a {watch.resource_type} Subscription"
                )
            self.stats.subscriptions.append(sid)
            self._save_subscription_ids()
            log.info("Subscription/%s watches %s", sid, watch.resource_type)
        self._await_active(list(self.stats.subscriptions))

    def _await_active(self, ids: list[str]) -> None:
        """Wait until the server has activated every Subscription: until then it notifies
        nothing (HAPI FHIR stores it as ``requested`` and activates it seconds later)."""
        deadline = time.monotonic() + self.options.activation_timeout
        delay = 0.2
        pending = ids
        while True:
            waiting: list[tuple[str, str]] = []
            for sid in pending:
                held = self.client.read("Subscription", sid)
                status = str(held.get("status", ""))
                if status in ("error", "off"):
                    raise ConfigurationError(
                        f"the server refused Subscription/{sid} ({status}): "
                        f"{held.get('error', 'no reason given')}"
                    )
                if status != "active":
                    waiting.append((sid, status))
            if not waiting:
                return
            if time.monotonic() + delay > deadline:
                sid, status = waiting[0]
                raise ConfigurationError(
                    f"the server did not activate Subscription/{sid} within "
                    f"{self.options.activation_timeout:.0f} s (status {status or 'missing'})"
                )
            log.debug("waiting for %d Subscription(s) to become active", len(waiting))
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
            pending = [sid for sid, _ in waiting]

    def _unsubscribe(self) -> None:
        left: list[str] = []
        for sid in self.stats.subscriptions:
            try:
                self.client.delete("Subscription", sid)
                log.info("deleted Subscription/%s", sid)
            except NetworkError as exc:
                log.warning("could not delete Subscription/%s: %s", sid, exc)
                left.append(sid)
        self.stats.subscriptions = left
        path = self._subs_path()
        if path is not None:
            if left:
                self._save_subscription_ids()
            else:
                path.unlink(missing_ok=True)

    # -- workers -------------------------------------------------------------------------
    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _work(self) -> None:
        while True:
            taken = self._queue.take()
            if taken is None:
                return
            pid, item = taken
            ok = False
            try:
                outcome = self.screen(pid)
                ok = not outcome.skipped
                self.stats.screens += 1
                if ok:
                    log.info(
                        "re-screened Patient/%s against %d trials: %d ResearchSubjects written",
                        pid,
                        len(outcome.summaries),
                        sum(s.written for s in outcome.summaries.values()),
                    )
                if not ok:
                    log.warning("Patient/%s: screen incomplete; retried later", pid)
                elif self._on_screened is not None:
                    self._on_screened(pid, outcome)
            except FatalNetworkError as exc:
                log.error("Patient/%s: screen failed: %s", pid, exc)
            except NetworkError as exc:
                log.warning("Patient/%s: screen failed (%s); retried later", pid, exc)
            except Exception:  # a worker must survive whatever one patient's data does
                log.exception("Patient/%s: screen failed", pid)
            if not ok:
                self.stats.failed_screens += 1
            delay = min(self.options.max_retry_delay, 2.0 ** min(item.attempts, 10))
            self._queue.finish(pid, item, ok, delay)

    # -- the endpoint --------------------------------------------------------------------
    def _open_endpoint(self) -> None:
        listener = self

        class Handler(_NotificationHandler):
            owner = listener

        try:
            server = http.server.ThreadingHTTPServer(
                (self.options.host, self.options.port), Handler
            )
        except OSError as exc:
            raise ConfigurationError(
                f"cannot listen on {self.options.host}:{self.options.port}: {exc.strerror}"
            ) from None
        server.daemon_threads = True
        self._server = server
        port = server.server_address[1]
        host = self.options.host
        base = self.options.public_url or f"http://{'[::1]' if host == '::1' else host}:{port}"
        self._endpoint = base.rstrip("/") + NOTIFY_PATH
        self._spawn(server.serve_forever, "fhirmatch-listen-http")

    def _authorised(self, header: str | None) -> bool:
        expected = f"Bearer {self._token}".encode()
        return header is not None and hmac.compare_digest(header.strip().encode(), expected)

    def _notified(self, path: str, body: bytes) -> tuple[int, str]:
        """Handle one notification; returns (HTTP status, message)."""
        self.stats.notifications += 1
        tail = path[len(NOTIFY_PATH) :].strip("/").split("/")
        resources: list[dict[str, Any]] = []
        if body.strip():
            try:
                doc = json.loads(body)
            except ValueError:
                return 400, "the body is not JSON"
            if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
                resources = [
                    e["resource"]
                    for e in doc.get("entry") or []
                    if isinstance(e, dict) and isinstance(e.get("resource"), dict)
                ]
            elif isinstance(doc, dict):
                resources = [doc]
        patients = {pid for r in resources if (pid := patient_reference_of(r))}
        if not patients and len(tail) == 2 and tail[0] == "Patient" and tail[1]:
            patients = {tail[1]}
        changed = _resource_ids(resources) or ("/".join(tail) if len(tail) == 2 else "")
        if not patients:
            # an id-only (empty) notification: find what changed since the checkpoint
            since = self.checkpoint
            if since is None:
                log.info("notification %s without a patient: nothing to screen", changed or "")
                return 200, "nothing to screen"
            log.info("notification without resources: catching up since %s", since)
            self._spawn(lambda: self._safe_catch_up(since), "fhirmatch-listen-catch-up")
            return 200, "catching up"
        log.info(
            "notification: %s for %s",
            changed or "a change",
            ", ".join(f"Patient/{p}" for p in sorted(patients)),
        )
        for pid in sorted(patients):
            self.submit(pid)
        return 200, f"queued {len(patients)} patient(s)"

    def _safe_catch_up(self, since: str) -> None:
        try:
            self.catch_up(since)
        except NetworkError as exc:
            log.warning("catch-up after an empty notification failed: %s", exc)


def _resource_ids(resources: list[dict[str, Any]], limit: int = 5) -> str:
    """``Observation/o1, Condition/c2`` (ids only; at most ``limit``, then a count)."""
    refs = [
        f"{r.get('resourceType')}/{r.get('id')}"
        for r in resources
        if isinstance(r.get("resourceType"), str) and isinstance(r.get("id"), str)
    ]
    more = f" and {len(refs) - limit} more" if len(refs) > limit else ""
    return ", ".join(refs[:limit]) + more


class _NotificationHandler(http.server.BaseHTTPRequestHandler):
    """The rest-hook endpoint: ``POST``/``PUT`` under :data:`NOTIFY_PATH`."""

    owner: Listener
    server_version = "fhirmatch-listen"
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def _handle(self) -> None:
        path = urlsplit(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        if not (path == NOTIFY_PATH or path.startswith(NOTIFY_PATH + "/")):
            self._drain(length)
            self._answer(404, "not found")
            return
        if not self.owner._authorised(self.headers.get("Authorization")):
            self.owner.stats.rejected += 1
            log.warning("rejected a notification without the expected Authorization header")
            self._drain(length)
            self._answer(401, "unauthorised")
            return
        if length > MAX_BODY:
            self.close_connection = True
            self._answer(413, "notification too large")
            return
        body = self.rfile.read(length) if length else b""
        status, message = self.owner._notified(path, body)
        self._answer(status, message)

    def _drain(self, length: int) -> None:
        if 0 < length <= MAX_BODY:
            self.rfile.read(length)
        elif length:
            self.close_connection = True

    def _answer(self, status: int, message: str) -> None:
        severity = "information" if status < 300 else "error"
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": "informational", "diagnostics": message}],
        }
        data = json.dumps(outcome).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("endpoint: " + format, *args)
