"""The match job: pull patients from a FHIR server, evaluate them, write back candidates.

:func:`run_match` is the whole job as a library call; ``fhirmatch match`` and ``fhirmatch demo``
are thin layers over it; :class:`MatchRun` is one run, its stages in its methods. The steps:

1. trials are published to the server when they come from files (so every ResearchSubject
   references a ResearchStudy the server holds), or loaded from it;
2. the patients to screen are chosen: a list, a FHIR query, everyone — or, for an incremental
   run with a state file, only those whose relevant data changed since the last successful run
   (``_lastUpdated`` on the resource types the criteria use), everyone when the trials changed;
3. patients are fetched in chunks with :func:`fhirmatch.fetch.fetch_patient_data` (only the data
   the criteria need), evaluated, and written back one transaction per patient
   (:mod:`fhirmatch.writeback`); each finished patient is journalled so a killed run resumes.
   ``MatchOptions.concurrency`` requests are in flight at once: the next chunks are fetched
   while one is evaluated, and a chunk's searches and transactions go out together; the chunks
   are still reported in order, so the outcome is the same for every concurrency.

A patient whose data could not be fetched, or whose write-back failed after its retries, is
*skipped* with the reason and the run goes on; the summary and the exit code say so. Logs name
resource ids only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import hashlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor as Pool
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .client import FhirClient
from .engine import Engine
from .errors import (
    ConfigurationError,
    FatalNetworkError,
    NetworkError,
    PreconditionFailed,
    TemporaryNetworkError,
)
from .executors import Executor
from .fetch import fetch_patient_data
from .model import DataInput, Trial
from .records import PatientRecord
from .results import TrialResult
from .state import StateStore
from .terminology import Terminology
from .writeback import (
    DEFAULT_WRITE,
    SUBJECT_IDENTIFIER_SYSTEM,
    FhirVersion,
    PlannedWrite,
    plan_subject,
    subject_identifier,
    transaction_for,
)

log = logging.getLogger(__name__)

#: subtracted from the server's clock reading at run start, so a resource committed while the
#: run starts is seen by the next incremental run (a wider window only re-screens more)
CLOCK_MARGIN = dt.timedelta(seconds=2)
WRITE_CHOICES = frozenset({"candidate", "potential-candidate"})
#: ``--concurrency``: requests in flight at once
DEFAULT_CONCURRENCY = 8
MAX_CONCURRENCY = 64
#: ``_count`` of the patient list and of the ResearchSubject look-ups (servers cap it)
PATIENT_PAGE = 1000
SUBJECT_PAGE = 100
#: chunks fetched ahead of the one being evaluated, and chunks whose writes may still run
FETCH_AHEAD = 2
WRITE_AHEAD = 2


@dataclass
class TrialSummary:
    """Counts for one trial in one run."""

    study: str
    title: str
    screened: int = 0
    eligible: int = 0
    insufficient_data: int = 0
    ineligible: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    advanced: int = 0

    @property
    def written(self) -> int:
        return self.created + self.updated


@dataclass
class MatchOutcome:
    """What a run did."""

    as_of: dt.date
    started: str
    results: list[TrialResult] = field(default_factory=list)
    summaries: dict[str, TrialSummary] = field(default_factory=dict)
    planned: list[PlannedWrite] = field(default_factory=list)
    #: patient reference -> why it was not screened or not written
    skipped: dict[str, str] = field(default_factory=dict)
    resumed: int = 0
    incremental: bool = False
    #: for an incremental run, the server time its change window starts at
    since: str | None = None
    requests: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    #: patients evaluated and written back (counted also when the results are not kept)
    evaluated: int = 0

    @property
    def screened(self) -> int:
        return max(self.evaluated, len({r.patient for r in self.results}))


@dataclass
class MatchOptions:
    """The job's parameters (the CLI's flags)."""

    as_of: dt.date | None = None
    patients: Sequence[str] = ()
    patients_query: str | None = None
    dry_run: bool = False
    write: frozenset[str] = DEFAULT_WRITE
    publish: bool = True
    chunk_size: int = 50
    restart: bool = False
    #: keep every result and planned write in the outcome (the JSON output and the HTML report
    #: list them); without, a run's memory does not grow with the population
    keep_results: bool = True
    #: read the patients' data with Bulk Data ``$export`` (:mod:`fhirmatch.bulk`) instead of
    #: REST searches; ``bulk_group`` exports that Group's members only
    bulk: bool = False
    bulk_group: str | None = None
    bulk_type_filter: bool = False
    #: the longest wait between two status checks of the export (s); a server's longer
    #: ``Retry-After`` is cut to this (HAPI FHIR always asks for 120 s, whatever the job)
    bulk_poll_max: float = 60.0
    #: where the export is grouped by patient (spill files); default: the system's temp dir.
    #: With a remote Dask scheduler it must be storage every worker sees.
    spill_dir: str | None = None
    #: NDJSON text per grouping partition (memory of one reduce task); default 64 MB
    partition_bytes: int | None = None
    #: requests in flight at once (one client, one shared backoff); 1: one at a time
    concurrency: int = DEFAULT_CONCURRENCY

    def __post_init__(self) -> None:
        # a string never stands for a boolean: "false" is truthy, and a dry run must not be a
        # typo away from a real one (nor the reverse)
        for name in ("dry_run", "publish", "restart", "keep_results", "bulk", "bulk_type_filter"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigurationError(
                    f"MatchOptions.{name} must be True or False, not {value!r}"
                )
        bad = set(self.write) - WRITE_CHOICES
        if bad:
            raise ConfigurationError(
                f"--write takes {', '.join(sorted(WRITE_CHOICES))}; not {', '.join(sorted(bad))}"
            )
        if self.patients and self.patients_query:
            raise ConfigurationError("give --patient or --patients-query, not both")
        if self.partition_bytes is not None and self.partition_bytes < 1:
            raise ConfigurationError("the partition size must be positive")
        if self.chunk_size < 1:
            raise ConfigurationError("the chunk size must be positive")
        if not self.bulk_poll_max > 0:
            raise ConfigurationError("--bulk-poll-max must be a positive number of seconds")
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ConfigurationError(
                f"--concurrency must be between 1 and {MAX_CONCURRENCY}, not {self.concurrency}"
            )
        if self.bulk and (self.patients or self.patients_query):
            raise ConfigurationError(
                "--bulk exports every patient (or a --bulk-group); not with --patient or "
                "--patients-query"
            )


def trials_digest(trials: Sequence[Trial]) -> str:
    """A digest of the trial definitions (their FHIR resources): a change re-screens everyone."""
    blob = json.dumps(
        sorted(json.dumps(r, sort_keys=True) for t in trials for r in t.resources),
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def server_now(client: FhirClient) -> str:
    """The server's current time less :data:`CLOCK_MARGIN`: the ``_lastUpdated`` bound of the
    next incremental run. The server's clock, not ours, so skew between the machines stays out
    of the window: a searchset Bundle's ``meta.lastUpdated`` (millisecond precision on most
    servers), else the ``Date`` header (whole seconds, sometimes cached), else our clock."""
    when: dt.datetime | None = None
    with contextlib.suppress(NetworkError):
        resp = client.transport.request(
            "GET", "Patient", params=[("_count", "0"), ("_summary", "count")]
        )
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            stamp = (resp.json().get("meta") or {}).get("lastUpdated")
            if isinstance(stamp, str):
                when = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        if when is None:
            with contextlib.suppress(TypeError, ValueError, IndexError):
                when = email.utils.parsedate_to_datetime(resp.headers.get("Date", ""))
    if when is None or when.tzinfo is None:
        log.warning("the server told no time; the incremental window uses this machine's clock")
        when = dt.datetime.now(dt.UTC)
    start = (when - CLOCK_MARGIN).astimezone(dt.UTC)
    return start.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _id_of(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


# --------------------------------------------------------------------------- trials


def _content(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("id", "meta", "text")}


_PUBLISH_ORDER = {"ValueSet": 0, "PlanDefinition": 1, "ResearchStudy": 2}


def _publish_order(resource: dict[str, Any]) -> int:
    return _PUBLISH_ORDER.get(str(resource.get("resourceType")), len(_PUBLISH_ORDER))


def publish_trials(
    client: FhirClient, trials: Sequence[Trial], *, executor: Pool | None = None
) -> dict[str, str]:
    """Upload each trial's ResearchStudy, PlanDefinition (and ValueSets) idempotently.

    Each resource is looked up by its identifier (ResearchStudy) or canonical URL
    (PlanDefinition, ValueSet); one the server holds with the same content is left alone (no new
    version), one it holds with other content is written with a conditional update on the same
    criteria, and a new one with ``PUT [type]/[id]``, keeping the trial's own ids (a conditional
    update that creates lets HAPI FHIR choose the id). What is referred to is written first.
    Returns the study reference -> PlanDefinition reference map write-back cites.
    ``executor`` (a thread pool sharing ``client``) sends the look-ups concurrently; the writes
    go one at a time, in that order.
    """

    def look_up(item: tuple[dict[str, Any], dict[str, str]]) -> list[dict[str, Any]]:
        res, criteria = item
        return list(client.iter_resources(str(res["resourceType"]), criteria))

    per_trial: list[list[tuple[dict[str, Any], dict[str, str]]]] = []
    for trial in trials:
        items: list[tuple[dict[str, Any], dict[str, str]]] = []
        # what is referred to first: servers that enforce referential integrity (HAPI FHIR)
        # refuse a ResearchStudy whose protocol PlanDefinition they do not hold yet
        for res in sorted(trial.resources, key=_publish_order):
            rtype = str(res.get("resourceType"))
            if rtype == "ResearchStudy" and res.get("identifier"):
                ident = res["identifier"][0]
                items.append((res, {"identifier": f"{ident.get('system', '')}|{ident['value']}"}))
            elif rtype in ("PlanDefinition", "ValueSet") and res.get("url"):
                items.append((res, {"url": res["url"]}))
        per_trial.append(items)
    every = [item for items in per_trial for item in items]
    found = iter(list(executor.map(look_up, every) if executor else map(look_up, every)))
    plan_refs: dict[str, str] = {}
    written: set[str] = set()  # a ValueSet two trials share is written once
    for trial, items in zip(trials, per_trial, strict=True):
        changed = 0
        for res, criteria in items:
            held = next(found)
            key = json.dumps([res.get("resourceType"), criteria, _content(res)], sort_keys=True)
            if (len(held) == 1 and _content(held[0]) == _content(res)) or key in written:
                continue
            if not held and res.get("id"):
                # a conditional update that matches nothing creates the resource, but HAPI
                # FHIR then gives it an id of its own: the trial's references would break
                client.update(res)
            else:
                client.conditional_update(res, criteria)
            written.add(key)
            changed += 1
        plan_refs[trial.reference] = f"PlanDefinition/{trial.plan_definition_id}"
        log.info("published %s (%d resources written)", trial.reference, changed)
    return plan_refs


def missing_studies(client: FhirClient, trials: Sequence[Trial]) -> list[str]:
    """The trials whose ResearchStudy the server does not hold (for ``--dry-run`` reports)."""
    ids = ",".join(t.id for t in trials)
    found = {r.get("id") for r in client.iter_resources("ResearchStudy", {"_id": ids})}
    return [t.reference for t in trials if t.id not in found]


# --------------------------------------------------------------------------- patients


def _query_params(query: str) -> tuple[str, list[tuple[str, str]]]:
    """``Patient?name=x`` (or ``?name=x``) -> ("Patient", [("name", "x")])."""
    parts = urlsplit(query)
    path = parts.path.strip("/") or "Patient"
    if path != "Patient":
        raise ConfigurationError(f"--patients-query must search Patient, not {path!r}")
    return path, parse_qsl(parts.query, keep_blank_values=True)


def select_patients(
    client: FhirClient,
    options: MatchOptions,
    requirements: Sequence[DataInput],
    since: str | None,
) -> list[str]:
    """Patient ids to screen, in a stable order."""
    if options.patients:
        return list(dict.fromkeys(_id_of(p) for p in options.patients))
    if options.patients_query:
        _, params = _query_params(options.patients_query)
        base = [p for p in params if p[0] != "_elements"]
    else:
        base = []
    ids: dict[str, None] = {}
    if since is None:
        for res in client.iter_resources("Patient", _paged(base, ("_elements", "id"))):
            if res.get("id"):
                ids.setdefault(str(res["id"]), None)
        return list(ids)
    # incremental: patients whose relevant data changed, or who are new/changed themselves
    changed: dict[str, None] = {}
    for res in client.iter_resources(
        "Patient", _paged(base, ("_lastUpdated", f"ge{since}"), ("_elements", "id"))
    ):
        if res.get("id"):
            changed.setdefault(str(res["id"]), None)
    for rtype in sorted({r.resource_type for r in requirements} - {"Patient"}):
        # only whose data it is matters here: ask for the references, not whole resources
        params = [
            ("_lastUpdated", f"ge{since}"),
            ("_count", "500"),
            ("_elements", "subject,patient"),
        ]
        for res in client.iter_resources(rtype, params):
            ref = (res.get("subject") or res.get("patient") or {}).get("reference", "")
            if ref.startswith("Patient/") or "/Patient/" in ref:
                changed.setdefault(_id_of(ref), None)
    if base:  # keep only the ones the query selects
        allowed = {
            str(r["id"])
            for r in client.iter_resources("Patient", _paged(base, ("_elements", "id")))
        }
        return [p for p in changed if p in allowed]
    return list(changed)


def _paged(base: list[tuple[str, str]], *extra: tuple[str, str]) -> list[tuple[str, str]]:
    """A Patient search in large pages (:data:`PATIENT_PAGE`), unless the query sets its own."""
    params = [*base, *extra]
    if not any(k == "_count" for k, _ in params):
        params.append(("_count", str(PATIENT_PAGE)))
    return params


# --------------------------------------------------------------------------- write-back


def existing_subjects(
    client: FhirClient,
    pairs: Iterable[tuple[str, str]],
    chunk: int = 50,
    *,
    executor: Pool | None = None,
) -> dict[str, dict[str, Any]]:
    """ResearchSubjects fhirmatch wrote for these (study, patient) pairs, by identifier value.

    ``chunk`` identifiers per search, each answered in one page (``_count``); ``executor`` (a
    thread pool sharing ``client``) sends the searches concurrently."""
    values = [subject_identifier(s, p) for s, p in pairs]
    groups = [values[i : i + chunk] for i in range(0, len(values), chunk)]

    def look_up(group: list[str]) -> list[dict[str, Any]]:
        tokens = ",".join(f"{SUBJECT_IDENTIFIER_SYSTEM}|{v}" for v in group)
        # a pair has one subject; room for a few duplicates made by hand before paging
        params = [("identifier", tokens), ("_count", str(max(SUBJECT_PAGE, 2 * len(group))))]
        return list(client.iter_resources("ResearchSubject", params))

    found: dict[str, dict[str, Any]] = {}
    for resources in executor.map(look_up, groups) if executor else map(look_up, groups):
        for res in resources:
            for ident in res.get("identifier", []):
                if ident.get("system") == SUBJECT_IDENTIFIER_SYSTEM:
                    found[str(ident.get("value"))] = res
    return found


def _fhir_version(client: FhirClient) -> FhirVersion:
    return "R5" if client.fhir_version == "R5" else "R4"


# --------------------------------------------------------------------------- the job


def run_match(
    client: FhirClient,
    trials: Sequence[Trial],
    options: MatchOptions,
    *,
    engine: Engine | None = None,
    state: StateStore | None = None,
    progress: Callable[[int, int], None] | None = None,
    executor: Executor | None = None,
    terminology: Terminology | None = None,
) -> MatchOutcome:
    """Run the match job. ``state`` must already be acquired (locked) by the caller.

    ``engine`` defaults to the local executor's engine, else one built from ``trials`` and
    ``terminology`` (default: the ``mappings/`` tables, whose ConceptMaps translate local lab
    codes); it is built only when this process evaluates the patients.

    ``executor`` (:mod:`fhirmatch.executors`) evaluates the patients; default: ``engine`` in this
    process. With ``options.bulk`` a full run reads everyone's data from one ``$export``; an
    incremental bulk run exports with ``_since`` only to learn which patients changed (such an
    export holds the changed resources, not whole records) and fetches those patients' data with
    REST searches.

    ``options.concurrency`` requests are kept in flight (one client, whose backoff on 429 and
    503 pauses them all); the outcome is the same, in the same order, for every concurrency.
    """
    with MatchRun(
        client,
        trials,
        options,
        engine=engine,
        state=state,
        progress=progress,
        executor=executor,
        terminology=terminology,
    ) as run:
        return run.run()


def screen_patients(
    client: FhirClient,
    trials: Sequence[Trial],
    patient_ids: Iterable[str],
    options: MatchOptions | None = None,
    *,
    engine: Engine | None = None,
    plan_refs: dict[str, str] | None = None,
    requirements: Sequence[DataInput] | None = None,
) -> MatchOutcome:
    """Screen these patients now and write back exactly as :func:`run_match` does.

    The same fetch, evaluation, idempotent write-back and Provenance, without publishing trials,
    choosing patients or a state file: the building block for on-demand and event-driven
    screening. ``plan_refs`` (study -> PlanDefinition reference) defaults to the trials' own ids
    and ``requirements`` to :func:`fetch_requirements`; callers screening often pass both once.
    A patient that could not be fetched or written is listed in ``outcome.skipped``.
    """
    options = options or MatchOptions()
    with MatchRun(
        client,
        trials,
        options,
        engine=engine,
        plan_refs=plan_refs,
        requirements=requirements,
    ) as run:
        t0 = time.monotonic()
        requests_before = client.stats.requests
        run.screen(list(dict.fromkeys(_id_of(p) for p in patient_ids)))
        run.outcome.requests = client.stats.requests - requests_before
        run.outcome.seconds = time.monotonic() - t0
        return run.outcome


@dataclass
class _PatientWrite:
    """One patient's write-back: its results and plans, or why it was skipped."""

    patient_id: str
    results: list[TrialResult]
    plans: list[PlannedWrite] = field(default_factory=list)
    skipped: str | None = None


@dataclass
class _Chunk:
    """A chunk of patients on its way through the stages fetch -> evaluate -> write -> report."""

    ids: list[str]
    #: (patient reference, reason) of the patients the fetch stage could not screen, in order
    skipped: list[tuple[str, str]] = field(default_factory=list)
    records: list[PatientRecord] = field(default_factory=list)
    evaluated: dict[str, list[TrialResult]] = field(default_factory=dict)
    writes: list[_PatientWrite] | None = None
    writing: Future[list[_PatientWrite]] | None = None


class MatchRun:
    """One run of the match job: everything its stages share, built once per run.

    It carries the client, the engine (or executor), the options, the state file and the
    outcome, and runs the stages

    * **select** the patients (:meth:`select`),
    * **fetch** their data, chunk by chunk (:meth:`fetch`),
    * **evaluate** each chunk (:meth:`evaluate`),
    * **write** back one transaction per patient (:meth:`write`),
    * **report** each chunk's outcome in order: counts and results (:meth:`report`); each
      patient is journalled in the state file as soon as its write-back finished.

    With ``options.concurrency`` above 1 the stages overlap: the next chunks are fetched while
    this one is evaluated, and the per-patient transactions of a chunk run concurrently while
    the next chunk is evaluated; the client's requests go through one pool of that many threads.
    Each chunk is still reported in order, so the outcome does not depend on the concurrency.
    Use as a context manager (the thread pools are closed on exit).
    """

    def __init__(
        self,
        client: FhirClient,
        trials: Sequence[Trial],
        options: MatchOptions,
        *,
        engine: Engine | None = None,
        state: StateStore | None = None,
        progress: Callable[[int, int], None] | None = None,
        executor: Executor | None = None,
        terminology: Terminology | None = None,
        plan_refs: dict[str, str] | None = None,
        requirements: Sequence[DataInput] | None = None,
    ) -> None:
        self.client = client
        self.trials = list(trials)
        self.options = options
        self.state = state if not options.dry_run else None
        self.progress = progress
        self.executor = executor
        local = getattr(executor, "engine", None)
        self._engine = (
            engine if engine is not None else local if isinstance(local, Engine) else None
        )
        if terminology is None and self._engine is not None:
            terminology = self._engine.terminology
        self._terminology = terminology
        self.requirements = list(requirements) if requirements is not None else None
        self.plan_refs = plan_refs or {
            t.reference: f"PlanDefinition/{t.plan_definition_id}" for t in self.trials
        }
        self.version = _fhir_version(client)
        now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        self.outcome = MatchOutcome(
            as_of=options.as_of or dt.date.today(), started=now, dry_run=options.dry_run
        )
        for t in self.trials:
            self.outcome.summaries[t.reference] = TrialSummary(study=t.reference, title=t.title)
        #: patients an interrupted run already finished
        self.done: set[str] = set()
        #: the ``_lastUpdated`` bound of an incremental run
        self.since: str | None = None
        self.digest = trials_digest(self.trials)
        self._journal_lock = threading.Lock()
        self._io: ThreadPoolExecutor | None = None
        self._stages: ThreadPoolExecutor | None = None
        if options.concurrency > 1:
            self._io = ThreadPoolExecutor(options.concurrency, thread_name_prefix="fhirmatch-io")
            self._stages = ThreadPoolExecutor(
                FETCH_AHEAD + WRITE_AHEAD + 1, thread_name_prefix="fhirmatch-stage"
            )

    def __enter__(self) -> MatchRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for pool in (self._stages, self._io):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    @property
    def terminology(self) -> Terminology:
        if self._terminology is None:
            self._terminology = Terminology.load()
        return self._terminology

    @property
    def engine(self) -> Engine:
        """The engine evaluating in this process, built on first use."""
        if self._engine is None:
            self._engine = Engine(self.trials, self.terminology)
        return self._engine

    def _needs(self) -> list[DataInput]:
        if self.requirements is None:
            self.requirements = fetch_requirements(self.trials, self.terminology)
        return self.requirements

    # ------------------------------------------------------------------ the whole run

    def run(self) -> MatchOutcome:
        """Publish (or not), open the state, select, screen, close the state."""
        t0 = time.monotonic()
        requests_before = self.client.stats.requests
        self.outcome.started = server_now(self.client)
        self._needs()  # the terminology tables and the data requirements, once
        if self.options.publish and not self.options.dry_run:
            self.plan_refs = publish_trials(self.client, self.trials, executor=self._io)
        self._begin_state()
        if self.options.bulk and self.since is None:
            self.screen_bulk()
        else:
            ids = self.select()
            todo = [p for p in ids if f"Patient/{p}" not in self.done]
            log.info(
                "screening %d patients against %d trials (%d already done by an interrupted run)",
                len(todo),
                len(self.trials),
                len(ids) - len(todo),
            )
            self.screen(todo)
        self._finish_state()
        self.outcome.requests = self.client.stats.requests - requests_before
        self.outcome.seconds = time.monotonic() - t0
        return self.outcome

    def _begin_state(self) -> None:
        state, options, outcome = self.state, self.options, self.outcome
        if state is None:
            return
        st = state.state
        params = {
            "server": self.client.base_url,
            "trials": self.digest,
            "patients": list(options.patients),
            "query": options.patients_query,
            "as_of": options.as_of.isoformat() if options.as_of else None,
            "write": sorted(options.write),
        }
        resuming = st.in_progress is not None and not options.restart
        if resuming and st.in_progress:
            self.since = st.in_progress.get("since")
            outcome.started = st.in_progress.get("started", outcome.started)
        elif (
            st.last_success
            and st.trials_digest == self.digest
            and st.server == self.client.base_url
        ):
            self.since = st.last_success
        self.done = state.begin_run(params, restart=options.restart)
        if not resuming or options.restart:
            assert state.state.in_progress is not None
            state.state.in_progress.update({"since": self.since, "started": outcome.started})
            state.save()
        outcome.resumed = len(self.done)
        outcome.incremental = self.since is not None
        outcome.since = self.since
        if self.since:
            log.info("incremental run: data changed since %s", self.since)

    def _finish_state(self) -> None:
        if self.state is None:
            return
        if self.outcome.skipped:
            log.warning(
                "%d patients skipped; the state keeps the previous window so they are retried",
                len(self.outcome.skipped),
            )
            # keep the journal: a re-run resumes and retries only the skipped patients
        else:
            self.state.finish_run(
                server=self.client.base_url, trials_digest=self.digest, started=self.outcome.started
            )

    # ------------------------------------------------------------------ select

    def select(self) -> list[str]:
        """The patient ids to screen, in a stable order."""
        if self.options.bulk and self.since is not None:
            return _changed_by_bulk(self.client, self._needs(), self.options, self.since)
        return select_patients(self.client, self.options, self._needs(), self.since)

    # ------------------------------------------------------------------ the pipeline

    def screen(self, ids: Sequence[str]) -> None:
        """Fetch, evaluate, write and report these patients, chunk by chunk."""
        self._needs()  # computed once, before the fetch threads start
        chunks = _chunks(ids, self.options.chunk_size)
        self._pipeline((self.evaluate(chunk) for chunk in self._fetched(chunks)), len(ids))

    def screen_bulk(self) -> None:
        """Full bulk run: one ``$export``, grouped per patient on disk, evaluated, written."""
        import shutil
        import tempfile
        from pathlib import Path

        from .bulk import export_patient_data
        from .executors import LocalExecutor

        workdir = Path(tempfile.mkdtemp(prefix="fhirmatch-bulk-"))
        try:
            paths = export_patient_data(
                self.client,
                self._needs(),
                group=self.options.bulk_group,
                workdir=workdir,
                type_filter=self.options.bulk_type_filter,
                poll_max=self.options.bulk_poll_max,
            )
            problems: list[str] = []
            runner = self.executor or LocalExecutor(self.engine)
            evaluated = runner.evaluate_files(
                paths,
                as_of=self.outcome.as_of,
                problems=problems,
                spill_dir=self.options.spill_dir,
                partition_bytes=self.options.partition_bytes,
            )
            self._pipeline(self._bulk_chunks(evaluated), 0)
            # the loader logged each problem of the export once, as it met it
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _bulk_chunks(
        self, evaluated: Iterable[tuple[PatientRecord, list[TrialResult]]]
    ) -> Iterator[_Chunk]:
        chunk = _Chunk([])
        for record, results in evaluated:
            # a resumed run re-evaluates the patients already done (the workers group the
            # export themselves) but writes only the others
            if record.reference in self.done:
                continue
            if record.patient is None:
                self.outcome.skipped[record.reference] = "the export holds no such Patient"
                continue
            chunk.ids.append(record.patient_id)
            chunk.evaluated[record.patient_id] = results
            if len(chunk.ids) >= self.options.chunk_size:
                yield chunk
                chunk = _Chunk([])
        if chunk.ids:
            yield chunk

    def _pipeline(self, chunks: Iterable[_Chunk], total: int) -> None:
        """Write each evaluated chunk and report the chunks in order, keeping at most
        :data:`WRITE_AHEAD` chunks' writes in flight behind the one being evaluated."""
        writing: deque[_Chunk] = deque()
        finished = 0
        for chunk in chunks:
            self.write(chunk)
            writing.append(chunk)
            while len(writing) > WRITE_AHEAD or (writing and _written(writing[0])):
                finished += self.report(writing.popleft())
                if self.progress:
                    self.progress(finished, total)
        while writing:
            finished += self.report(writing.popleft())
            if self.progress:
                self.progress(finished, total)

    def _fetched(self, chunks: Iterable[list[str]]) -> Iterator[_Chunk]:
        """The chunks with their data, fetched up to :data:`FETCH_AHEAD` chunks ahead."""
        if self._stages is None:
            yield from (self.fetch(ids) for ids in chunks)
            return
        pending: deque[Future[_Chunk]] = deque()
        for ids in chunks:
            pending.append(self._stages.submit(self.fetch, ids))
            if len(pending) > FETCH_AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    # ------------------------------------------------------------------ fetch

    def fetch(self, ids: list[str]) -> _Chunk:
        """Read the data the criteria need for these patients."""
        chunk = _Chunk(ids)
        try:
            fetched = fetch_patient_data(
                self.client, ids, self._needs(), as_of=self.outcome.as_of, executor=self._io
            )
        except FatalNetworkError:
            raise
        except NetworkError as exc:
            chunk.skipped = [(f"Patient/{pid}", f"fetch failed: {exc.message}") for pid in ids]
            log.warning("could not fetch a chunk of %d patients: %s", len(ids), exc.message)
            return chunk
        for pid in ids:
            ref = f"Patient/{pid}"
            if pid in fetched.errors:
                chunk.skipped.append((ref, "; ".join(fetched.errors[pid])))
                log.warning("skipped %s: data could not be fetched completely", ref)
                continue
            resources = fetched.resources.get(pid) or []
            if not any(r.get("resourceType") == "Patient" for r in resources):
                chunk.skipped.append((ref, "the server has no such Patient"))
                continue
            chunk.records.append(PatientRecord(pid, resources))
        return chunk

    # ------------------------------------------------------------------ evaluate

    def evaluate(self, chunk: _Chunk) -> _Chunk:
        """Evaluate the chunk's records (here, or on the executor); frees the records."""
        as_of = self.outcome.as_of
        if self.executor is None:
            engine = self.engine
            chunk.evaluated = {
                r.patient_id: engine.evaluate(r.resources, as_of=as_of) for r in chunk.records
            }
        else:
            chunk.evaluated = {
                rec.patient_id: results
                for rec, results in self.executor.evaluate(chunk.records, as_of=as_of)
            }
        chunk.records = []
        return chunk

    # ------------------------------------------------------------------ write

    def write(self, chunk: _Chunk) -> None:
        """Start writing back the chunk's patients (at once when not concurrent)."""
        if self._stages is None:
            chunk.writes = self._write_chunk(chunk.evaluated)
        else:
            chunk.writing = self._stages.submit(self._write_chunk, chunk.evaluated)

    def _write_chunk(self, evaluated: dict[str, list[TrialResult]]) -> list[_PatientWrite]:
        pairs = [(r.study, r.patient) for results in evaluated.values() for r in results]
        try:
            existing = existing_subjects(self.client, pairs, executor=self._io)
        except FatalNetworkError as exc:
            if exc.status in (401, 403):
                raise
            why = f"reading ResearchSubjects failed: {exc.message}"
            return [_PatientWrite(pid, results, skipped=why) for pid, results in evaluated.items()]
        except NetworkError as exc:
            why = f"reading ResearchSubjects failed: {exc.message}"
            return [_PatientWrite(pid, results, skipped=why) for pid, results in evaluated.items()]

        def one(item: tuple[str, list[TrialResult]]) -> _PatientWrite:
            return self.write_patient(item[0], item[1], existing)

        items = list(evaluated.items())
        return list(self._io.map(one, items)) if self._io else [one(i) for i in items]

    def write_patient(
        self, pid: str, results: list[TrialResult], existing: dict[str, dict[str, Any]]
    ) -> _PatientWrite:
        """Plan and write one patient's transaction, converging through faults.

        Every entry of a transaction that creates subjects is safe to resend, so the client
        resends it itself after a lost answer. Where the outcome stays in doubt (a 5xx or a
        dropped connection the client could not retry, a 412 because the subject changed, a
        409), what committed is read again (the subjects' deterministic identifiers) and the
        patient planned again, up to the client's number of attempts; only then is it skipped.
        """
        ref = f"Patient/{pid}"
        options = self.options
        transport = self.client.transport
        delays = transport.retry.delays(transport.rng)
        earlier: list[PlannedWrite] | None = None
        attempt = 0
        while True:
            plans = [
                plan_subject(
                    r,
                    existing.get(subject_identifier(r.study, r.patient)),
                    as_of=self.outcome.as_of,
                    plan_definition=self.plan_refs.get(r.study),
                    write=options.write,
                    version=self.version,
                )
                for r in results
            ]
            # what to report: a write in doubt that turns out committed counts as written
            reported = plans
            if earlier is not None:
                reported = [_committed(old, new) for old, new in zip(earlier, plans, strict=True)]
            bundle = transaction_for(plans, dict(self.plan_refs), self.version)
            if bundle is None or options.dry_run:
                self._journal(ref)
                return _PatientWrite(pid, results, reported)
            try:
                entries = self.client.transaction(bundle)
            except NetworkError as exc:
                if isinstance(exc, FatalNetworkError) and exc.status in (401, 403):
                    raise
                if not _in_doubt(exc) or attempt >= len(delays):
                    log.warning("write-back for %s failed (%s)", ref, exc)
                    return _PatientWrite(pid, results, skipped=f"write-back failed: {exc.message}")
                log.info("write-back for %s: %s; reading what committed", ref, exc.message)
                transport.sleep(delays[attempt])
                attempt += 1
                earlier = reported
                try:
                    existing = existing_subjects(
                        self.client, [(r.study, r.patient) for r in results]
                    )
                except FatalNetworkError as again:
                    if again.status in (401, 403):
                        raise
                    why = f"write-back failed, then reading ResearchSubjects: {again.message}"
                    return _PatientWrite(pid, results, skipped=why)
                except NetworkError as again:
                    why = f"write-back failed, then reading ResearchSubjects: {again.message}"
                    return _PatientWrite(pid, results, skipped=why)
                continue
            bad = [e for e in entries if not e.ok]
            if bad:
                why = f"write-back entry failed: HTTP {bad[0].status}"
                return _PatientWrite(pid, results, skipped=why)
            for plan in reported:  # written: keep what the report needs, not the resources
                plan.subject = plan.provenance = None
            self._journal(ref)
            return _PatientWrite(pid, results, reported)

    # ------------------------------------------------------------------ report

    def report(self, chunk: _Chunk) -> int:
        """Count one chunk's outcome, keep its results and journal its finished patients;
        returns how many patients it held."""
        outcome, options = self.outcome, self.options
        for ref, why in chunk.skipped:
            outcome.skipped[ref] = why
        writes = chunk.writes if chunk.writing is None else chunk.writing.result()
        for w in writes or []:
            ref = f"Patient/{w.patient_id}"
            if w.skipped is not None:
                outcome.skipped[ref] = w.skipped
                continue
            _count(outcome, w.results, w.plans)
            outcome.evaluated += 1
            if options.keep_results:
                outcome.results.extend(w.results)
                outcome.planned.extend(w.plans)
        return len(chunk.ids)

    def _journal(self, ref: str) -> None:
        """Journal a patient whose write-back finished, at once (a killed run resumes after it)."""
        if self.state is not None:
            with self._journal_lock:
                self.state.mark_done(ref)


def _written(chunk: _Chunk) -> bool:
    return chunk.writing is None or chunk.writing.done()


def _in_doubt(exc: NetworkError) -> bool:
    """Whether a failed transaction may be cured by re-reading and planning again: a temporary
    failure (it may have committed), a 412 (the subject changed since it was read) or a 409."""
    return isinstance(exc, TemporaryNetworkError | PreconditionFailed) or exc.status == 409


def _committed(earlier: PlannedWrite, now: PlannedWrite) -> PlannedWrite:
    """The plan to report for a pair planned again after a transaction in doubt: when the
    server now holds exactly the assessment the earlier create/update wrote, that write
    committed, and it is reported as written."""
    if earlier.action in ("create", "update") and now.action == "unchanged":
        return earlier
    return now


def _chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def _changed_by_bulk(
    client: FhirClient, requirements: Sequence[DataInput], options: MatchOptions, since: str
) -> list[str]:
    """Ids of the patients with relevant data changed since ``since``, from a ``_since`` export."""
    import shutil
    import tempfile

    from .bulk import export_patient_data
    from .records import patient_reference_of

    workdir = tempfile.mkdtemp(prefix="fhirmatch-bulk-")
    try:
        paths = export_patient_data(
            client,
            requirements,
            group=options.bulk_group,
            since=since,
            workdir=workdir,
            type_filter=options.bulk_type_filter,
            poll_max=options.bulk_poll_max,
        )
        changed: set[str] = set()
        for path in paths:
            with path.open("r", encoding="utf-8") as fh:
                for line in fh:
                    if not line.strip():
                        continue
                    try:
                        pid = patient_reference_of(json.loads(line))
                    except (json.JSONDecodeError, AttributeError):
                        continue
                    if pid:
                        changed.add(pid)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return sorted(changed)


def _count(outcome: MatchOutcome, results: list[TrialResult], plans: list[PlannedWrite]) -> None:
    for r, p in zip(results, plans, strict=True):
        s = outcome.summaries.get(r.study)
        if s is None:
            continue
        s.screened += 1
        if r.status == "eligible":
            s.eligible += 1
        elif r.status == "insufficient-data":
            s.insufficient_data += 1
        else:
            s.ineligible += 1
        if p.action == "create":
            s.created += 1
        elif p.action == "update":
            s.updated += 1
        elif p.action == "unchanged":
            s.unchanged += 1
        elif p.action == "advanced":
            s.advanced += 1


def fetch_requirements(trials: Sequence[Trial], terminology: Terminology | None) -> list[DataInput]:
    """The trials' data requirements, each widened by the local codes the ConceptMaps translate
    into its codes, so the server-side code filter also returns locally coded results."""
    out: list[DataInput] = []
    for inp in (i for t in trials for i in t.all_inputs()):
        extra = terminology.sources_of(inp.codes) if terminology is not None else frozenset()
        # records coded only by a drug class are fetched too: they make a criterion unknown
        extra |= inp.possible_codes
        out.append(replace(inp, codes=inp.codes | extra) if extra - inp.codes else inp)
    return out


def load_trials_from_server(client: FhirClient, terminology: Any = None) -> list[Trial]:
    """Trials the server holds: ResearchStudies with an active recruitment status and their
    PlanDefinitions (``ResearchStudy.protocol``), compiled with the local terminology tables."""
    from .trials import compile_trial

    active = "active" if _fhir_version(client) == "R4" else "active,recruiting"
    result = client.search_all(
        "ResearchStudy", [("status", active), ("_include", "ResearchStudy:protocol")]
    )
    plans = {
        f"PlanDefinition/{r.get('id')}": r
        for r in result.included
        if r.get("resourceType") == "PlanDefinition"
    }
    trials: list[Trial] = []
    for study in result.matches:
        for proto in study.get("protocol") or []:
            ref = str(proto.get("reference", ""))
            plan = plans.get(ref)
            if plan is None and ref.startswith("PlanDefinition/"):
                plan = client.read("PlanDefinition", _id_of(ref))
            if plan is not None:
                src = f"{client.base_url}/ResearchStudy/{study.get('id')}"
                trials.append(compile_trial(study, plan, terminology, source=src))
                break
        else:
            log.warning("ResearchStudy/%s has no PlanDefinition protocol; ignored", study.get("id"))
    return trials
