"""Where patient evaluation runs: this process, a pool of local processes, or a Dask cluster.

Every executor runs the same :class:`~fhirmatch.engine.Engine` on the same records and yields
``(record, results)`` pairs **in input order**, so the caller's write-back, report and output are
identical whichever executor ran the evaluation::

    with make_executor("processes", trials, terminology) as ex:
        for record, results in ex.evaluate(iter_patient_records(paths), as_of=as_of):
            ...

* ``local`` — evaluation in this process, one patient at a time; no dependencies.
* ``processes`` — a :class:`concurrent.futures.ProcessPoolExecutor`; each worker compiles the
  trials once (pool initializer) and evaluates batches of patients.
* ``dask`` — a Dask ``distributed`` cluster (``pip install 'fhirmatch[dask]'``): the scheduler at
  ``scheduler`` (``tcp://host:8786``), or a local cluster when none is given. The trial definitions
  are scattered to every worker once; each worker compiles them into an engine the first time it
  sees them and keeps it (cached per worker, keyed by a digest of the definitions).

Records are sent in batches (``batch_size`` patients) and at most ``window`` batches are in flight,
so memory in this process stays bounded however many patients stream through.

:meth:`Executor.evaluate_files` takes files instead of records. NDJSON that is not ordered by
patient (a Bulk Data export) is then grouped by the executor's own workers: they run the map
tasks (read a slice of the input, spill each line to its patient's hash partition) and the reduce
tasks (group one partition, evaluate its patients) of :mod:`fhirmatch.stream`, so patient data
never passes through this process. Only results, with each record reduced to its Patient
resource and its problems, come back. The workers must see the input and the spill directory at
the same paths as this process: always true for ``processes`` and a local Dask cluster; for a
remote Dask scheduler pass ``spill_dir`` on storage every worker mounts, or the records are
grouped here and shipped as with :meth:`Executor.evaluate`.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import logging
import os
import pickle
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from datetime import date
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar

from .engine import Engine
from .errors import ConfigurationError
from .options import positive_float, positive_int
from .records import PatientRecord, _problem, check_record
from .results import TrialResult
from .stream import (
    PartitionTask,
    Shuffle,
    SliceOutcome,
    SliceTask,
    group_partition,
    plan_input,
    remove_spill,
    spill_slice,
    wanted_types,
)

if TYPE_CHECKING:
    import multiprocessing.context

    from .model import Trial
    from .terminology import Terminology

__all__ = [
    "EXECUTORS",
    "DaskExecutor",
    "Executor",
    "LocalExecutor",
    "ProcessExecutor",
    "add_executor_arguments",
    "executor_from_args",
    "freeze_heap",
    "make_executor",
    "partition_bytes",
]

log = logging.getLogger(__name__)

EXECUTORS = ("local", "processes", "dask")
#: one batch sent to a worker: (patient id, resources) per patient
Batch = list[tuple[str, list[dict[str, Any]]]]
Evaluated = Iterator[tuple[PatientRecord, list[TrialResult]]]
#: what a reduce task sends back: per patient, the slim record and its results; and the problems
#: of lines that belong to no patient after all (reported, with file and line, in this process)
PartitionResults = tuple[list[tuple[PatientRecord, list[TrialResult]]], list[str]]
T = TypeVar("T")


class Executor(Protocol):
    """Evaluates a stream of patient records; a context manager that releases its workers."""

    name: str

    def evaluate(self, records: Iterable[PatientRecord], *, as_of: date) -> Evaluated:
        """Yield ``(record, results)`` for every record, in input order."""
        ...

    def evaluate_files(
        self,
        paths: Iterable[str | os.PathLike[str]],
        *,
        as_of: date,
        problems: list[str] | None = None,
        partition_bytes: int | None = None,
        spill_dir: str | os.PathLike[str] | None = None,
        slice_bytes: int | None = None,
    ) -> Evaluated:
        """Yield ``(record, results)`` for every patient of ``paths``, in the order of
        :func:`~fhirmatch.records.iter_patient_records` (only the resource types the trials
        read are loaded). ``partition_bytes``, ``spill_dir`` and ``slice_bytes`` tune the
        grouping of NDJSON not ordered by patient (:mod:`fhirmatch.stream`)."""
        ...

    def close(self) -> None:
        """Release workers and clusters this executor started."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class _Base:
    name = "base"
    trials: tuple[Trial, ...] = ()
    #: the workers see this machine's files (input and spill directory) at the same paths
    shared_files = True

    def __enter__(self) -> Self:
        return self

    def evaluate(self, records: Iterable[PatientRecord], *, as_of: date) -> Evaluated:
        raise NotImplementedError

    def evaluate_files(
        self,
        paths: Iterable[str | os.PathLike[str]],
        *,
        as_of: date,
        problems: list[str] | None = None,
        partition_bytes: int | None = None,
        spill_dir: str | os.PathLike[str] | None = None,
        slice_bytes: int | None = None,
    ) -> Evaluated:
        """See :meth:`Executor.evaluate_files`."""
        general: list[str] = problems if problems is not None else []
        for part in plan_input(
            paths,
            general,
            types=wanted_types(self.trials, as_of),
            partition_bytes=partition_bytes,
            spill_dir=spill_dir,
            slice_bytes=slice_bytes,
        ):
            if not isinstance(part, Shuffle):
                yield from self.evaluate((check_record(r) for r in part), as_of=as_of)
            elif not (self.shared_files or spill_dir is not None):
                yield from self.evaluate(
                    (check_record(r) for r in part.records(general)), as_of=as_of
                )
            else:
                with part:
                    outcomes = self._map_slices(part.slice_tasks())
                    tasks = part.partition_tasks(outcomes, general)
                    yield from self._reduce(tasks, as_of, general)

    def _map_slices(self, tasks: list[SliceTask]) -> list[SliceOutcome]:
        """Run the map tasks of a grouping (in any order; all done on return)."""
        return [spill_slice(t) for t in tasks]

    def _reduce(self, tasks: list[PartitionTask], as_of: date, problems: list[str]) -> Evaluated:
        raise NotImplementedError

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release by default."""


class LocalExecutor(_Base):
    """Evaluation in this process (the default; no extra dependencies)."""

    name = "local"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.trials = engine.trials

    def evaluate(self, records: Iterable[PatientRecord], *, as_of: date) -> Evaluated:
        for record in records:
            yield record, self.engine.evaluate_patient_record(record, as_of=as_of)

    def _reduce(self, tasks: list[PartitionTask], as_of: date, problems: list[str]) -> Evaluated:
        def report(text: str) -> None:
            _problem(problems, text)

        for task in tasks:
            for record in group_partition(task, report):
                record = check_record(record)
                yield record, self.engine.evaluate_patient_record(record, as_of=as_of)
            remove_spill(task)


def freeze_heap() -> None:
    """After start-up (modules imported, trials compiled): move every object alive out of the
    cyclic collector's sight, and collect young objects less often. Screening allocates millions
    of short-lived dicts and lists without cycles; scanning them took 12-17% of the CPU on Bulk
    exports and 33-40% on Synthea Bundles. Called by the CLI and in every worker process.

    The heap is frozen as it is, without a full collection first: start-up leaves about a
    hundred objects in cycles, and finding them meant scanning the other 75,000 (about 27 ms,
    a tenth of the start-up)."""
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)


def _known_units() -> None:
    """In a worker: the unit conversions earlier runs remembered (no unit registry to build for
    them; see :func:`fhirmatch.trialcache.load_unit_factors`)."""
    from .trialcache import load_unit_factors

    load_unit_factors()


def _batches(records: Iterable[PatientRecord], size: int) -> Iterator[list[PatientRecord]]:
    batch: list[PatientRecord] = []
    for record in records:
        batch.append(record)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _payload(batch: list[PatientRecord]) -> Batch:
    return [(r.patient_id, r.resources) for r in batch]


def _windowed(
    items: Iterable[T], window: int, submit: Callable[[T], Any]
) -> Iterator[tuple[T, Any]]:
    """Submit ``items``, keep at most ``window`` in flight, yield ``(item, result)`` in order."""
    pending: deque[tuple[T, Any]] = deque()
    try:
        for item in items:
            pending.append((item, submit(item)))
            if len(pending) >= window:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:
        for _item, future in pending:
            future.cancel()


def _in_order(
    records: Iterable[PatientRecord],
    batch_size: int,
    window: int,
    submit: Callable[[list[PatientRecord]], Any],
) -> Evaluated:
    """Submit batches, keep at most ``window`` in flight, yield results in submission order."""
    for batch, results in _windowed(_batches(records, batch_size), window, submit):
        yield from zip(batch, results, strict=True)


def _reduced(
    tasks: list[PartitionTask],
    window: int,
    submit: Callable[[PartitionTask], Any],
    problems: list[str],
) -> Evaluated:
    """Run reduce tasks on workers, at most ``window`` at once; yield their results in order and
    log the problems the workers collected (they do not log themselves)."""
    for _task, (results, general) in _windowed(tasks, window, submit):
        for text in general:
            _problem(problems, text)
        for record, trial_results in results:
            for problem in record.problems:
                log.warning("%s", problem)
            yield record, trial_results


def _slim(record: PatientRecord) -> PatientRecord:
    """The record without its clinical resources (what a worker sends back)."""
    patient = record.patient
    return PatientRecord(
        record.patient_id,
        [patient] if patient is not None else [],
        problems=record.problems,
        source=record.source,
    )


def evaluate_partition(engine: Engine, task: PartitionTask, as_of: date) -> PartitionResults:
    """A reduce task on a worker: group partition ``task``, evaluate its patients, remove its
    spill files; return slim records (Patient resource and problems only) with their results."""
    out: list[tuple[PatientRecord, list[TrialResult]]] = []
    general: list[str] = []
    for record in group_partition(task, general.append):
        record = check_record(record, quiet=True)
        out.append((_slim(record), engine.evaluate_patient_record(record, as_of=as_of)))
    remove_spill(task)
    return out, general


def _evaluate_batch(engine: Engine, batch: Batch, as_of: date) -> list[list[TrialResult]]:
    return [engine.evaluate(resources, as_of=as_of, patient_id=pid) for pid, resources in batch]


# --------------------------------------------------------------------------- processes

_WORKER_ENGINE: Engine | None = None


def _init_process(trials: Sequence[Trial], terminology: Terminology | None) -> None:
    global _WORKER_ENGINE  # one engine per worker process, built once
    _WORKER_ENGINE = Engine(trials, terminology)
    _known_units()
    freeze_heap()


def _process_batch(batch: Batch, as_of: date) -> list[list[TrialResult]]:
    if _WORKER_ENGINE is None:  # pragma: no cover - the initializer always ran
        raise RuntimeError("worker engine not initialised")
    return _evaluate_batch(_WORKER_ENGINE, batch, as_of)


def _process_partition(task: PartitionTask, as_of: date) -> PartitionResults:
    if _WORKER_ENGINE is None:  # pragma: no cover - the initializer always ran
        raise RuntimeError("worker engine not initialised")
    return evaluate_partition(_WORKER_ENGINE, task, as_of)


def _mp_context() -> multiprocessing.context.BaseContext:
    import multiprocessing  # here: `evaluate` with the local executor never needs it

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


class ProcessExecutor(_Base):
    """A pool of local worker processes; each compiles the trials once, in its initializer."""

    name = "processes"

    def __init__(
        self,
        trials: Sequence[Trial],
        terminology: Terminology | None = None,
        *,
        workers: int | None = None,
        batch_size: int = 50,
    ) -> None:
        if batch_size < 1:
            raise ConfigurationError("the batch size must be positive")
        self.workers = workers or os.cpu_count() or 1
        self.batch_size = batch_size
        self.trials = tuple(trials)
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=_mp_context(),
            initializer=_init_process,
            initargs=(tuple(trials), terminology),
        )

    def evaluate(self, records: Iterable[PatientRecord], *, as_of: date) -> Evaluated:
        def submit(batch: list[PatientRecord]) -> Future[list[list[TrialResult]]]:
            return self.pool.submit(_process_batch, _payload(batch), as_of)

        yield from _in_order(records, self.batch_size, 2 * self.workers, submit)

    def _map_slices(self, tasks: list[SliceTask]) -> list[SliceOutcome]:
        return list(self.pool.map(spill_slice, tasks))

    def _reduce(self, tasks: list[PartitionTask], as_of: date, problems: list[str]) -> Evaluated:
        def submit(task: PartitionTask) -> Future[PartitionResults]:
            return self.pool.submit(_process_partition, task, as_of)

        yield from _reduced(tasks, 2 * self.workers, submit, problems)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- dask

_DASK_ENGINES: dict[str, Engine] = {}
_DASK_LOCK = threading.Lock()


def _dask_batch(
    definitions: tuple[str, tuple[Trial, ...], Terminology | None],
    batch: Batch,
    as_of: date,
) -> list[list[TrialResult]]:
    """Run on a Dask worker: the engine for these definitions is compiled once per worker."""
    return _evaluate_batch(_dask_engine(definitions), batch, as_of)


def _dask_partition(
    definitions: tuple[str, tuple[Trial, ...], Terminology | None],
    task: PartitionTask,
    as_of: date,
) -> PartitionResults:
    """A reduce task on a Dask worker."""
    return evaluate_partition(_dask_engine(definitions), task, as_of)


def _dask_engine(definitions: tuple[str, tuple[Trial, ...], Terminology | None]) -> Engine:
    """The engine for these definitions, compiled once per worker."""
    digest, trials, terminology = definitions
    with _DASK_LOCK:
        engine = _DASK_ENGINES.get(digest)
        if engine is None:
            engine = _DASK_ENGINES[digest] = Engine(trials, terminology)
            _known_units()
            freeze_heap()
    return engine


class DaskExecutor(_Base):
    """Evaluation on a Dask ``distributed`` cluster (``fhirmatch[dask]``).

    ``scheduler``: the address of a running scheduler; None starts a :class:`LocalCluster`
    (``workers`` processes, or threads with ``processes=False``) that :meth:`close` stops.
    With a remote scheduler, :meth:`evaluate_files` lets the workers read the files only when
    it is given a ``spill_dir`` (which, like the input, must be on storage every worker sees).
    """

    name = "dask"

    def __init__(
        self,
        trials: Sequence[Trial],
        terminology: Terminology | None = None,
        *,
        scheduler: str | None = None,
        workers: int | None = None,
        processes: bool = True,
        batch_size: int = 100,
    ) -> None:
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise ConfigurationError(
                "the dask executor needs Dask: pip install 'fhirmatch[dask]'"
            ) from None
        if batch_size < 1:
            raise ConfigurationError("the batch size must be positive")
        self.batch_size = batch_size
        self.trials = tuple(trials)
        self.shared_files = not scheduler
        self._cluster: Any = None
        if scheduler:
            try:
                self.client = Client(scheduler, timeout=30)
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot reach the Dask scheduler {scheduler}: {exc}"
                ) from exc
        else:
            self._cluster = LocalCluster(
                n_workers=workers or os.cpu_count() or 1,
                threads_per_worker=1,
                processes=processes,
                dashboard_address=":0",  # any free port: runs side by side never clash
            )
            self.client = Client(self._cluster)
        definitions = (tuple(trials), terminology)
        digest = hashlib.sha256(pickle.dumps(definitions)).hexdigest()[:32]
        # scatter a one-element list: the future stands for the whole tuple
        (self._definitions,) = self.client.scatter(
            [(digest, *definitions)], broadcast=True, hash=False
        )
        n_workers = len(self.client.scheduler_info(n_workers=-1).get("workers", {})) or 1
        self.window = 2 * n_workers

    def evaluate(self, records: Iterable[PatientRecord], *, as_of: date) -> Evaluated:
        def submit(batch: list[PatientRecord]) -> Any:
            (data,) = self.client.scatter([_payload(batch)], hash=False)
            return self.client.submit(_dask_batch, self._definitions, data, as_of, pure=False)

        yield from _in_order(records, self.batch_size, self.window, submit)

    def _map_slices(self, tasks: list[SliceTask]) -> list[SliceOutcome]:
        futures = self.client.map(spill_slice, tasks, pure=False)
        outcomes: list[SliceOutcome] = self.client.gather(futures)
        return outcomes

    def _reduce(self, tasks: list[PartitionTask], as_of: date, problems: list[str]) -> Evaluated:
        def submit(task: PartitionTask) -> Any:
            return self.client.submit(_dask_partition, self._definitions, task, as_of, pure=False)

        yield from _reduced(tasks, self.window, submit, problems)

    def close(self) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


def make_executor(
    name: str,
    trials: Sequence[Trial],
    terminology: Terminology | None = None,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    engine: Engine | None = None,
) -> LocalExecutor | ProcessExecutor | DaskExecutor:
    """The executor ``name`` (``local``, ``processes`` or ``dask``) for these trials.

    ``engine`` is reused by the local executor (it must be built from the same trials).
    """
    if scheduler and name != "dask":
        raise ConfigurationError("--scheduler is only for --executor dask")
    if name == "local":
        return LocalExecutor(engine or Engine(trials, terminology))
    if name == "processes":
        return ProcessExecutor(trials, terminology, workers=workers)
    if name == "dask":
        return DaskExecutor(trials, terminology, scheduler=scheduler, workers=workers)
    raise ConfigurationError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")


def add_executor_arguments(group: argparse._ActionsContainer) -> None:
    """Add ``--executor``, ``--scheduler`` and ``--workers`` (``evaluate`` and ``match``)."""
    group.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="where patients are evaluated: this process (default), a pool of local processes, "
        "or a Dask cluster (needs fhirmatch[dask])",
    )
    group.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="with --executor dask: the scheduler, e.g. tcp://10.0.0.5:8786 "
        "(default: a local cluster)",
    )
    group.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="worker processes for --executor processes or a local Dask cluster "
        "(default: CPU count)",
    )
    group.add_argument(
        "--partition-mb",
        type=positive_float,
        metavar="MB",
        help="NDJSON text per grouping partition, the memory one worker needs to group a share "
        "of a Bulk export (default 64)",
    )
    group.add_argument(
        "--spill-dir",
        metavar="DIR",
        help="where NDJSON not ordered by patient is grouped (temporary files, about the size "
        "of the needed part of the input; default: the system's temp dir). With --scheduler it "
        "must be storage every Dask worker sees at the same path, as must the input",
    )


def partition_bytes(args: argparse.Namespace) -> int | None:
    """``--partition-mb`` in bytes (None: the default)."""
    mb = args.partition_mb
    return None if mb is None else max(1, int(mb * 1024 * 1024))


def executor_from_args(
    args: argparse.Namespace,
    trials: Sequence[Trial],
    terminology: Terminology | None = None,
    *,
    engine: Engine | None = None,
) -> LocalExecutor | ProcessExecutor | DaskExecutor:
    """The executor the command-line flags ask for."""
    if args.workers is not None and args.workers < 1:
        raise ConfigurationError("--workers must be positive")
    if args.partition_mb is not None and args.partition_mb <= 0:
        raise ConfigurationError("--partition-mb must be positive")
    if args.spill_dir is not None and not os.path.isdir(args.spill_dir):
        raise ConfigurationError(f"--spill-dir {args.spill_dir}: no such directory")
    return make_executor(
        args.executor,
        trials,
        terminology,
        scheduler=args.scheduler,
        workers=args.workers,
        engine=engine,
    )
