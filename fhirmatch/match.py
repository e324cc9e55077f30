"""The match job: pull patients from a FHIR server, evaluate them, write back candidates.

:func:`run_match` is the whole job as a library call; ``fhirmatch match`` and ``fhirmatch demo``
are thin layers over it. The steps:

1. trials are published to the server when they come from files (so every ResearchSubject
   references a ResearchStudy the server holds), or loaded from it;
2. the patients to screen are chosen: a list, a FHIR query, everyone — or, for an incremental
   run with a state file, only those whose relevant data changed since the last successful run
   (``_lastUpdated`` on the resource types the criteria use), everyone when the trials changed;
3. patients are fetched in chunks with :func:`fhirmatch.fetch.fetch_patient_data` (only the data
   the criteria need), evaluated, and written back one transaction per patient
   (:mod:`fhirmatch.writeback`); each finished patient is journalled so a killed run resumes.

A patient whose data could not be fetched, or whose write-back failed, is *skipped* with the
reason and the run goes on; the summary and the exit code say so. Logs name resource ids only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .client import FhirClient
from .engine import Engine
from .errors import ConfigurationError, FatalNetworkError, NetworkError
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

    @property
    def screened(self) -> int:
        return len({r.patient for r in self.results})


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


def publish_trials(client: FhirClient, trials: Sequence[Trial]) -> dict[str, str]:
    """Upload each trial's ResearchStudy, PlanDefinition (and ValueSets) idempotently.

    Each resource is looked up by its identifier (ResearchStudy) or canonical URL
    (PlanDefinition, ValueSet); one the server holds with the same content is left alone (no new
    version), one it holds with other content is written with a conditional update on the same
    criteria, and a new one with ``PUT [type]/[id]``, keeping the trial's own ids (a conditional
    update that creates lets HAPI FHIR choose the id). What is referred to is written first.
    Returns the study reference -> PlanDefinition reference map write-back cites.
    """
    plan_refs: dict[str, str] = {}
    for trial in trials:
        changed = 0
        # what is referred to first: servers that enforce referential integrity (HAPI FHIR)
        # refuse a ResearchStudy whose protocol PlanDefinition they do not hold yet
        for res in sorted(trial.resources, key=_publish_order):
            rtype = str(res.get("resourceType"))
            if rtype == "ResearchStudy" and res.get("identifier"):
                ident = res["identifier"][0]
                criteria = {"identifier": f"{ident.get('system', '')}|{ident['value']}"}
            elif rtype in ("PlanDefinition", "ValueSet") and res.get("url"):
                criteria = {"url": res["url"]}
            else:
                continue
            held = list(client.iter_resources(rtype, criteria))
            if len(held) == 1 and _content(held[0]) == _content(res):
                continue
            if not held and res.get("id"):
                # a conditional update that matches nothing creates the resource, but HAPI
                # FHIR then gives it an id of its own: the trial's references would break
                client.update(res)
            else:
                client.conditional_update(res, criteria)
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
        for res in client.iter_resources("Patient", [*base, ("_elements", "id")]):
            if res.get("id"):
                ids.setdefault(str(res["id"]), None)
        return list(ids)
    # incremental: patients whose relevant data changed, or who are new/changed themselves
    changed: dict[str, None] = {}
    for res in client.iter_resources("Patient", [*base, ("_lastUpdated", f"ge{since}")]):
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
            str(r["id"]) for r in client.iter_resources("Patient", [*base, ("_elements", "id")])
        }
        return [p for p in changed if p in allowed]
    return list(changed)


# --------------------------------------------------------------------------- write-back


def existing_subjects(
    client: FhirClient, pairs: Iterable[tuple[str, str]], chunk: int = 50
) -> dict[str, dict[str, Any]]:
    """ResearchSubjects fhirmatch wrote for these (study, patient) pairs, by identifier value."""
    values = [subject_identifier(s, p) for s, p in pairs]
    found: dict[str, dict[str, Any]] = {}
    for i in range(0, len(values), chunk):
        tokens = ",".join(f"{SUBJECT_IDENTIFIER_SYSTEM}|{v}" for v in values[i : i + chunk])
        for res in client.iter_resources("ResearchSubject", {"identifier": tokens}):
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

    ``engine`` defaults to one built from ``trials`` and ``terminology`` (default: the
    ``mappings/`` tables, whose ConceptMaps translate local lab codes).

    ``executor`` (:mod:`fhirmatch.executors`) evaluates the patients; default: ``engine`` in this
    process. With ``options.bulk`` a full run reads everyone's data from one ``$export``; an
    incremental bulk run exports with ``_since`` only to learn which patients changed (such an
    export holds the changed resources, not whole records) and fetches those patients' data with
    REST searches.
    """
    t0 = time.monotonic()
    requests_before = client.stats.requests
    as_of = options.as_of or dt.date.today()
    started = server_now(client)
    outcome = MatchOutcome(as_of=as_of, started=started, dry_run=options.dry_run)
    if terminology is None:
        terminology = engine.terminology if engine is not None else None
    if terminology is None:
        terminology = Terminology.load()
    if engine is None:
        engine = Engine(trials, terminology)
    version = _fhir_version(client)
    digest = trials_digest(trials)

    if options.publish and not options.dry_run:
        plan_refs = publish_trials(client, trials)
    else:
        plan_refs = {t.reference: f"PlanDefinition/{t.plan_definition_id}" for t in trials}
    for t in trials:
        outcome.summaries[t.reference] = TrialSummary(study=t.reference, title=t.title)

    requirements = fetch_requirements(trials, terminology)
    since: str | None = None
    done: set[str] = set()
    if state is not None and not options.dry_run:
        st = state.state
        params = {
            "server": client.base_url,
            "trials": digest,
            "patients": list(options.patients),
            "query": options.patients_query,
            "as_of": options.as_of.isoformat() if options.as_of else None,
            "write": sorted(options.write),
        }
        resuming = st.in_progress is not None and not options.restart
        if resuming and st.in_progress:
            since = st.in_progress.get("since")
            started = st.in_progress.get("started", started)
            outcome.started = started
        elif st.last_success and st.trials_digest == digest and st.server == client.base_url:
            since = st.last_success
        done = state.begin_run(params, restart=options.restart)
        if not resuming or options.restart:
            assert state.state.in_progress is not None
            state.state.in_progress.update({"since": since, "started": started})
            state.save()
        outcome.resumed = len(done)
        outcome.incremental = since is not None
        outcome.since = since
        if since:
            log.info("incremental run: data changed since %s", since)

    if options.bulk and since is None:
        _screen_bulk(
            client,
            engine,
            requirements,
            options,
            outcome,
            plan_refs,
            version,
            state,
            done,
            executor,
            progress,
        )
        patient_ids: list[str] = []
    elif options.bulk and since is not None:
        patient_ids = _changed_by_bulk(client, requirements, options, since)
    else:
        patient_ids = select_patients(client, options, requirements, since)
    todo = [p for p in patient_ids if f"Patient/{p}" not in done]
    log.info(
        "screening %d patients against %d trials (%d already done by an interrupted run)",
        len(todo),
        len(trials),
        len(patient_ids) - len(todo),
    )
    finished = 0
    for chunk in _chunks(todo, options.chunk_size):
        _screen_chunk(
            client,
            engine,
            chunk,
            requirements,
            options,
            outcome,
            plan_refs,
            version,
            state,
            executor,
        )
        finished += len(chunk)
        if progress:
            progress(finished, len(todo))

    if state is not None and not options.dry_run:
        if outcome.skipped:
            log.warning(
                "%d patients skipped; the state keeps the previous window so they are retried",
                len(outcome.skipped),
            )
            # keep the journal: a re-run resumes and retries only the skipped patients
        else:
            state.finish_run(server=client.base_url, trials_digest=digest, started=started)
    outcome.requests = client.stats.requests - requests_before
    outcome.seconds = time.monotonic() - t0
    return outcome


def _chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def _screen_chunk(
    client: FhirClient,
    engine: Engine,
    chunk: list[str],
    requirements: Sequence[DataInput],
    options: MatchOptions,
    outcome: MatchOutcome,
    plan_refs: dict[str, str],
    version: FhirVersion,
    state: StateStore | None,
    executor: Executor | None = None,
) -> None:
    as_of = outcome.as_of
    try:
        fetched = fetch_patient_data(client, chunk, requirements, as_of=as_of)
    except FatalNetworkError:
        raise
    except NetworkError as exc:
        for pid in chunk:
            outcome.skipped[f"Patient/{pid}"] = f"fetch failed: {exc.message}"
        log.warning("could not fetch a chunk of %d patients: %s", len(chunk), exc.message)
        return
    records: list[PatientRecord] = []
    for pid in chunk:
        ref = f"Patient/{pid}"
        if pid in fetched.errors:
            outcome.skipped[ref] = "; ".join(fetched.errors[pid])
            log.warning("skipped %s: data could not be fetched completely", ref)
            continue
        resources = fetched.resources.get(pid) or []
        if not any(r.get("resourceType") == "Patient" for r in resources):
            outcome.skipped[ref] = "the server has no such Patient"
            continue
        records.append(PatientRecord(pid, resources))
    if executor is None:
        evaluated = {r.patient_id: engine.evaluate(r.resources, as_of=as_of) for r in records}
    else:
        evaluated = {
            rec.patient_id: results for rec, results in executor.evaluate(records, as_of=as_of)
        }
    write_back_results(client, evaluated, options, outcome, plan_refs, version, state)


def write_back_results(
    client: FhirClient,
    evaluated: dict[str, list[TrialResult]],
    options: MatchOptions,
    outcome: MatchOutcome,
    plan_refs: dict[str, str],
    version: FhirVersion,
    state: StateStore | None,
) -> None:
    """Write back already-evaluated patients (patient id -> results), one transaction each;
    count them in ``outcome`` and journal each finished patient in ``state``."""
    as_of = outcome.as_of
    pairs = [(r.study, r.patient) for results in evaluated.values() for r in results]
    try:
        existing = existing_subjects(client, pairs)
    except NetworkError as exc:
        if isinstance(exc, FatalNetworkError):
            raise
        for pid in evaluated:
            outcome.skipped[f"Patient/{pid}"] = f"reading ResearchSubjects failed: {exc.message}"
        return
    for pid, results in evaluated.items():
        ref = f"Patient/{pid}"
        plans = [
            plan_subject(
                r,
                existing.get(subject_identifier(r.study, r.patient)),
                as_of=as_of,
                plan_definition=plan_refs.get(r.study),
                write=options.write,
                version=version,
            )
            for r in results
        ]
        bundle = transaction_for(plans, dict(plan_refs), version)
        if bundle is not None and not options.dry_run:
            try:
                entries = client.transaction(bundle)
            except NetworkError as exc:
                if isinstance(exc, FatalNetworkError) and exc.status in (401, 403):
                    raise
                outcome.skipped[ref] = f"write-back failed: {exc.message}"
                # a lost answer (timeout, dropped connection) may follow a commit: the next
                # run finds what the server holds by identifier and writes nothing twice
                log.warning("write-back for %s failed (%s); it is retried next run", ref, exc)
                continue
            bad = [e for e in entries if not e.ok]
            if bad:
                outcome.skipped[ref] = f"write-back entry failed: HTTP {bad[0].status}"
                continue
        _count(outcome, results, plans)
        if options.keep_results:
            outcome.results.extend(results)
        outcome.planned.extend(plans)
        if state is not None and not options.dry_run:
            state.mark_done(ref)


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
    if engine is None:
        engine = Engine(trials, Terminology.load())
    as_of = options.as_of or dt.date.today()
    now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    outcome = MatchOutcome(as_of=as_of, started=now, dry_run=options.dry_run)
    for t in trials:
        outcome.summaries[t.reference] = TrialSummary(study=t.reference, title=t.title)
    if plan_refs is None:
        plan_refs = {t.reference: f"PlanDefinition/{t.plan_definition_id}" for t in trials}
    if requirements is None:
        requirements = fetch_requirements(trials, engine.terminology)
    t0 = time.monotonic()
    requests_before = client.stats.requests
    ids = list(dict.fromkeys(_id_of(p) for p in patient_ids))
    version = _fhir_version(client)
    for chunk in _chunks(ids, options.chunk_size):
        _screen_chunk(
            client, engine, chunk, requirements, options, outcome, plan_refs, version, None
        )
    outcome.requests = client.stats.requests - requests_before
    outcome.seconds = time.monotonic() - t0
    return outcome


def _screen_bulk(
    client: FhirClient,
    engine: Engine,
    requirements: Sequence[DataInput],
    options: MatchOptions,
    outcome: MatchOutcome,
    plan_refs: dict[str, str],
    version: FhirVersion,
    state: StateStore | None,
    done: set[str],
    executor: Executor | None,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Full bulk run: one ``$export``, grouped per patient on disk, evaluated, written back."""
    import shutil
    import tempfile
    from pathlib import Path

    from .bulk import export_patient_data
    from .executors import LocalExecutor

    workdir = Path(tempfile.mkdtemp(prefix="fhirmatch-bulk-"))
    try:
        paths = export_patient_data(
            client,
            requirements,
            group=options.bulk_group,
            workdir=workdir,
            type_filter=options.bulk_type_filter,
            poll_max=options.bulk_poll_max,
        )
        problems: list[str] = []
        runner = executor or LocalExecutor(engine)
        evaluated = runner.evaluate_files(
            paths,
            as_of=outcome.as_of,
            problems=problems,
            spill_dir=options.spill_dir,
            partition_bytes=options.partition_bytes,
        )
        finished = 0
        batch: dict[str, list[TrialResult]] = {}
        for record, results in evaluated:
            # a resumed run re-evaluates the patients already done (the workers group the
            # export themselves) but writes only the others
            if record.reference in done or not _has_patient(record, outcome):
                continue
            batch[record.patient_id] = results
            if len(batch) >= options.chunk_size:
                write_back_results(client, batch, options, outcome, plan_refs, version, state)
                finished += len(batch)
                batch = {}
                if progress:
                    progress(finished, 0)
        if batch:
            write_back_results(client, batch, options, outcome, plan_refs, version, state)
            finished += len(batch)
            if progress:
                progress(finished, 0)
        # the loader logged each problem of the export once, as it met it
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _has_patient(record: PatientRecord, outcome: MatchOutcome) -> bool:
    if record.patient is None:
        outcome.skipped[record.reference] = "the export holds no such Patient"
        return False
    return True


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
