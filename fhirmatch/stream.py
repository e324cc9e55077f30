"""Group NDJSON resources by patient in bounded memory: a map/reduce over hash partitions.

Bulk Data exports are split by resource type (``Patient.ndjson``, ``Observation.ndjson`` …), so
one patient's resources are spread over every file. They are grouped in two phases whose tasks
are independent, so an executor can run them in this process, in a pool of processes or on a
Dask cluster (:meth:`fhirmatch.executors.Executor.evaluate_files`):

1. **Map (spill).** The input is cut into :class:`SliceTask` s: a byte range of an uncompressed
   file (``slice_bytes``, default 256 MB) or a whole ``.gz`` file. Each task reads its lines, skips
   resource types no criterion needs (before decoding the JSON when the line shows its type; see
   :func:`~fhirmatch.records.skippable_line`), decodes the rest once to find their patient, and
   appends the *original line* to one of ``N`` spill files of its own, chosen by
   ``crc32(patient id) % N``. Shared ``Medication`` resources are returned to the caller (there
   are few) and attached to the records that reference them; other shared resources
   (Organization, Practitioner …) are not needed for screening and are dropped.
2. **Reduce (group).** A :class:`PartitionTask` reads partition ``k`` of every slice, in input
   order, and groups the lines *as text* by patient; each patient's lines are decoded only when
   its record is built. Patients come out in the order each was first seen.

Memory is bounded by one partition's text plus one decoded patient: ``N`` is chosen so a partition
holds about ``partition_bytes`` of NDJSON (default 64 MB). Disk use is at most one extra copy of
the needed part of the input. Spill files live in a private temporary directory (under
``spill_dir`` when given) that is removed when the grouping ends or is abandoned. Input smaller
than one partition is grouped in memory, without spill files.

The hash is ``zlib.crc32`` (not ``hash()``), so partitioning is the same in every process and run,
and the order of the records is the same whichever executor ran the tasks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .records import (
    NDJSON_SUFFIXES,
    SHARED_TYPES,
    PatientRecord,
    Report,
    ResourceFilter,
    _expand_paths,
    _finish_ndjson,
    _problem,
    by_fields,
    checked_records,
    decode_json,
    group_bundle,
    group_single_resources,
    iter_contiguous_ndjson,
    iter_ndjson_slice,
    iter_ndjson_whole,
    ndjson_is_contiguous,
    ndjson_patient,
    problem_text,
    read_json_file,
    undecodable_problem,
)

if TYPE_CHECKING:
    from .model import Trial

__all__ = [
    "DEFAULT_PARTITION_BYTES",
    "DEFAULT_SLICE_BYTES",
    "PartitionTask",
    "Shuffle",
    "SliceOutcome",
    "SliceTask",
    "group_ndjson_by_patient",
    "group_partition",
    "partition_count",
    "partition_of",
    "plan_input",
    "remove_spill",
    "spill_slice",
    "wanted_types",
]

log = logging.getLogger(__name__)

#: NDJSON text per partition the grouping aims for
DEFAULT_PARTITION_BYTES = 64 * 1024 * 1024
#: bytes of an uncompressed NDJSON file per map task
DEFAULT_SLICE_BYTES = 256 * 1024 * 1024
#: gzip-compressed NDJSON is counted this many times its size when sizing partitions
GZIP_RATIO = 8
#: never more spill files per slice than this (open file handles)
MAX_PARTITIONS = 512
MEDICATION_TYPES = frozenset(
    {"MedicationRequest", "MedicationStatement", "MedicationAdministration", "MedicationDispense"}
)


def wanted_types(trials: Sequence[Trial], as_of: date | None = None) -> ResourceFilter:
    """The resources screening ``trials`` reads: Patient, every data input's type, Medication
    when a medication resource may refer to one; and of the coded types (not Patient nor the
    medicines), only resources with a code that an input asks for (the same rule as the
    engine's index: see :class:`~fhirmatch.records.ResourceFilter`). With ``as_of``, of the
    resources dated outside every look-back window that asks for their code, only the latest of
    each kind is read (:meth:`~fhirmatch.records.ResourceFilter.outdated`)."""
    inputs = [inp for t in trials for inp in t.all_inputs()]
    windows: dict[tuple[str, str, str], int | None] = {}
    for inp in inputs:
        # an input that also filters on other elements (bodySite) or on a clinical status reads
        # more of a resource outside its window than ResourceFilter.outdated keeps
        days = inp.lookback_days
        if inp.extra_filters or inp.clinical_status != "any":
            days = None
        for system, code in (*inp.codes, *inp.possible_codes):
            key = (inp.resource_type, system, code)
            had = windows.get(key, days)
            windows[key] = None if had is None or days is None else max(had, days)
    types = {"Patient"} | {inp.resource_type for inp in inputs}
    if types & MEDICATION_TYPES:
        types.add("Medication")
    known = {code for inp in inputs for code in (*inp.codes, *inp.possible_codes)}
    coded = types - MEDICATION_TYPES - {"Patient", "Medication"}
    if any(inp.text_systems for inp in inputs):
        # a diagnosis written in words under any code system the trials do not read is looked
        # for among all Conditions (the engine's TextDiagnosisRule): keep every one
        coded -= {"Condition"}
    bounded = {key: days for key, days in windows.items() if days is not None}
    return ResourceFilter(types, known, coded, bounded, as_of)


def partition_of(patient_id: str, partitions: int) -> int:
    """The partition (0 … ``partitions - 1``) a patient's resources go to; stable everywhere."""
    return zlib.crc32(patient_id.encode("utf-8")) % partitions


def partition_count(paths: Sequence[Path], partition_bytes: int = DEFAULT_PARTITION_BYTES) -> int:
    """How many partitions keep each one near ``partition_bytes`` of NDJSON text."""
    if partition_bytes < 1:
        raise ValueError("partition_bytes must be positive")
    total = 0
    for path in paths:
        with contextlib.suppress(OSError):
            size = path.stat().st_size
            total += size * GZIP_RATIO if path.name.endswith(".gz") else size
    return max(1, min(MAX_PARTITIONS, -(-total // partition_bytes)))


# --------------------------------------------------------------------------- map


@dataclass(frozen=True)
class SliceTask:
    """One map task: the lines of ``path`` that begin in ``[start, end)`` (None: to the end)."""

    ordinal: int  # position of this slice in the whole input
    path: str
    start: int
    end: int | None
    spill_dir: str
    partitions: int
    types: frozenset[str] | None

    def __reduce__(self) -> tuple[Any, ...]:
        return by_fields(self)


@dataclass
class SliceOutcome:
    """What a map task reports back (small: no patient data but shared Medications)."""

    ordinal: int
    #: lines in the slice (for numbering the lines of the next slice of the same file)
    lines: int = 0
    #: ``(line number within the slice, or 0 for the file, text)``
    problems: list[tuple[int, str]] = field(default_factory=list)
    medications: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: partition → spill file written by this slice
    spilled: dict[int, str] = field(default_factory=dict)

    def __reduce__(self) -> tuple[Any, ...]:
        return by_fields(self)


def spill_slice(task: SliceTask) -> SliceOutcome:
    """Run one map task: append each patient resource of the slice to its partition's file.

    A line is decoded only as far as its type, code and patient (see
    :func:`~fhirmatch.records.iter_ndjson_slice`); it is decoded whole once, when its patient's
    record is built. Runs anywhere the input and spill
    directory are visible (this process, a worker process or a Dask worker); it never logs:
    problems are returned, with line numbers within the slice.
    """
    out = SliceOutcome(task.ordinal)
    path = Path(task.path)
    handles: dict[int, IO[bytes]] = {}
    #: per patient id, its partition's file and the id as bytes (a patient has many lines)
    routes: dict[str, tuple[IO[bytes], bytes]] = {}

    def report(lineno: int, text: str) -> None:
        out.problems.append((lineno, text))

    lines = iter_ndjson_slice(
        path, report, types=task.types, start=task.start, end=task.end, head=True
    )
    try:
        while True:
            try:
                lineno, res, body = next(lines)
            except StopIteration as stop:
                out.lines = stop.value or 0
                break
            pid = _route(res, lineno, out, report)
            if pid is None:
                continue
            route = routes.get(pid)
            if route is None:
                if "\t" in pid or "\n" in pid or "\r" in pid:
                    report(lineno, "refers to an invalid patient id")
                    continue
                k = partition_of(pid, task.partitions)
                fh = handles.get(k)
                if fh is None:
                    name = os.path.join(task.spill_dir, f"part-{k}.{task.ordinal}.ndjson")
                    fh = handles[k] = open(name, "ab")
                    out.spilled[k] = name
                if len(routes) >= _MAX_ROUTES:
                    routes.clear()
                route = routes[pid] = (fh, pid.encode("utf-8"))
            route[0].write(b"%s\t%d\t%s\n" % (route[1], lineno, body))
    finally:
        for fh in handles.values():
            fh.close()
    return out


#: bound on the patients a map task remembers the partition of
_MAX_ROUTES = 65536


def _route(res: dict[str, Any], lineno: int, out: SliceOutcome, report: Report) -> str | None:
    """The patient a resource goes to; None for shared resources (Medications are kept in
    ``out``) and for resources without a patient (reported)."""
    if res["resourceType"] == "Medication" and isinstance(res.get("id"), str):
        out.medications[res["id"]] = res
    if res["resourceType"] in SHARED_TYPES:
        return None
    return ndjson_patient(res, lineno, report)


def plan_slices(
    paths: Sequence[Path], slice_bytes: int = DEFAULT_SLICE_BYTES
) -> list[tuple[Path, int, int | None]]:
    """Cut ``paths`` into ``(path, start, end)`` byte ranges (a ``.gz`` file is one range)."""
    out: list[tuple[Path, int, int | None]] = []
    for path in paths:
        size = 0
        with contextlib.suppress(OSError):
            size = path.stat().st_size
        if path.name.endswith(".gz") or size <= slice_bytes:
            out.append((path, 0, None))
            continue
        for start in range(0, size, slice_bytes):
            end = start + slice_bytes
            out.append((path, start, None if end >= size else end))
    return out


# --------------------------------------------------------------------------- reduce


@dataclass(frozen=True)
class PartitionTask:
    """One reduce task: partition ``index``'s spill files ``(file, source, first line - 1)``, in
    input order (the third item turns a line number within the slice into one within the file)."""

    index: int
    files: tuple[tuple[str, str, int], ...]
    medications: dict[str, dict[str, Any]]

    def __reduce__(self) -> tuple[Any, ...]:
        return by_fields(self)


def group_partition(
    task: PartitionTask, report: Callable[[str], None] | None = None
) -> Iterator[PatientRecord]:
    """Group one partition's spill files by patient; unchecked records in first-seen order.

    The lines are held as text; a patient's lines are decoded only when its record is built (for
    most lines, the only time they are decoded). A line that turns out not to be a resource of
    that patient after all (text that is not UTF-8 in elements the map phase skipped, or not JSON)
    is passed to ``report`` as a problem naming the file and line, like the problems of the map
    phase, and skipped.
    """
    # per patient, its spill lines after the id ("line number\tJSON\n") and the index of the file
    # each came from: bytes and ints, which the garbage collector does not track
    lines: dict[bytes, list[bytes]] = {}
    files: dict[bytes, list[int]] = {}
    for n, (name, _source, _base) in enumerate(task.files):
        with open(name, "rb") as fh:
            for line in fh:
                pid, rest = line.split(b"\t", 1)
                held = lines.get(pid)
                if held is None:
                    lines[pid] = [rest]
                    files[pid] = [n]
                else:
                    held.append(rest)
                    files[pid].append(n)
    for pid in list(lines):
        held = lines.pop(pid)
        where = files.pop(pid)
        patient = pid.decode("utf-8")
        rec = PatientRecord(patient)
        resources = rec.resources
        for rest, n in zip(held, where, strict=True):
            tab = rest.index(b"\t")
            try:
                res = decode_json(memoryview(rest)[tab + 1 :])
            except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
                _report(report, task, n, int(rest[:tab]), undecodable_problem(exc))
                continue
            # the map phase read this line's resourceType and patient from the same text, with
            # the same decoder: the whole resource is of this patient
            resources.append(res)
        if not resources:
            continue
        names = list(dict.fromkeys(where))
        seen: list[str] = []
        for n in names:
            if task.files[n][1] not in seen:
                seen.append(task.files[n][1])
        rec.source = ", ".join(seen)
        yield _finish_ndjson(rec, task.medications)


def _report(
    report: Callable[[str], None] | None, task: PartitionTask, n: int, lineno: int, text: str
) -> None:
    if report is not None:
        _name, source, base = task.files[n]
        report(problem_text(source, base + lineno, text))


def remove_spill(task: PartitionTask) -> None:
    """Delete a partition's spill files once it has been grouped."""
    for name, _source, _base in task.files:
        with contextlib.suppress(OSError):
            os.unlink(name)


# --------------------------------------------------------------------------- the plan


class Shuffle:
    """The map/reduce grouping of NDJSON files that are not ordered by patient.

    Use as a context manager (it owns the spill directory)::

        with shuffle:
            outcomes = map(spill_slice, shuffle.slice_tasks())      # any executor, any order
            for task in shuffle.partition_tasks(outcomes, problems):   # in order
                ... group_partition(task) ...
    """

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        types: frozenset[str] | None = None,
        partitions: int | None = None,
        partition_bytes: int = DEFAULT_PARTITION_BYTES,
        slice_bytes: int = DEFAULT_SLICE_BYTES,
        spill_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.paths = list(paths)
        self.types = types
        self.partitions = (
            partitions if partitions is not None else partition_count(self.paths, partition_bytes)
        )
        if self.partitions < 1:
            raise ValueError("partitions must be positive")
        if slice_bytes < 1:
            raise ValueError("slice_bytes must be positive")
        self.slice_bytes = slice_bytes
        self.spill_dir = spill_dir
        self.directory: Path | None = None
        self._slices: list[tuple[Path, int, int | None]] = []

    def __enter__(self) -> Shuffle:
        made = tempfile.mkdtemp(prefix="fhirmatch-spill-", dir=self.spill_dir)
        self.directory = Path(made).resolve()  # workers may run in another directory
        return self

    def __exit__(self, *exc: object) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def slice_tasks(self) -> list[SliceTask]:
        """The map tasks (run each once, with :func:`spill_slice`)."""
        if self.directory is None:
            raise RuntimeError("use the Shuffle as a context manager")
        self._slices = plan_slices(self.paths, self.slice_bytes)
        return [
            SliceTask(
                n, str(path.resolve()), start, end, str(self.directory), self.partitions, self.types
            )
            for n, (path, start, end) in enumerate(self._slices)
        ]

    def partition_tasks(
        self, outcomes: Iterable[SliceOutcome], problems: list[str]
    ) -> list[PartitionTask]:
        """The reduce tasks, once every map task is done; reports the map problems (logged,
        and appended to ``problems`` with file names and whole-file line numbers)."""
        by_ordinal = {o.ordinal: o for o in outcomes}
        if len(by_ordinal) != len(self._slices):
            raise RuntimeError("a map task of the grouping did not report")
        medications: dict[str, dict[str, Any]] = {}
        per_partition: dict[int, list[tuple[str, str, int]]] = {}
        base = 0
        previous: Path | None = None
        for n, (path, _start, _end) in enumerate(self._slices):
            outcome = by_ordinal[n]
            if path != previous:
                base, previous = 0, path
            for lineno, text in outcome.problems:
                _problem(problems, problem_text(path, base + lineno if lineno else 0, text))
            medications.update(outcome.medications)
            for k, name in outcome.spilled.items():
                per_partition.setdefault(k, []).append((name, str(path), base))
            base += outcome.lines
        log.info(
            "grouping NDJSON by patient: %d slices, %d partitions",
            len(self._slices),
            len(per_partition),
        )
        return [
            PartitionTask(k, tuple(per_partition[k]), medications)
            for k in range(self.partitions)
            if k in per_partition
        ]

    def records(self, problems: list[str]) -> Iterator[PatientRecord]:
        """Run the whole grouping in this process (unchecked records)."""
        with self:
            tasks = self.partition_tasks(map(spill_slice, self.slice_tasks()), problems)
            for task in tasks:
                yield from group_partition(task, lambda text: _problem(problems, text))
                remove_spill(task)


def plan_input(
    paths: Iterable[str | os.PathLike[str]],
    problems: list[str],
    *,
    types: frozenset[str] | None = None,
    partition_bytes: int | None = None,
    spill_dir: str | os.PathLike[str] | None = None,
    slice_bytes: int | None = None,
) -> Iterator[Iterator[PatientRecord] | Shuffle]:
    """The input as parts, in order: record streams (each Bundle file; then the JSON files that
    hold one resource each, grouped by patient across files; then patient-ordered NDJSON or small
    NDJSON grouped in memory) and at most one :class:`Shuffle` (NDJSON not ordered by patient).

    Records are unchecked (see :func:`fhirmatch.records.iter_patient_records`). Parts are
    planned lazily: a file is read, and the NDJSON scanned, only when the parts before it have
    been consumed. Single-resource files are held until every JSON file has been read (a
    directory of examples is small; a large population comes as Bundles or NDJSON).
    """
    files = _expand_paths(paths, problems)
    ndjson = [f for f in files if f.name.endswith(NDJSON_SUFFIXES)]
    singles: list[tuple[Path, dict[str, Any]]] = []
    for path in files:
        if path.name.endswith(NDJSON_SUFFIXES):
            continue
        data = read_json_file(path, problems)
        if data is None:
            continue
        if data["resourceType"] == "Bundle":
            yield group_bundle(data, str(path), problems)
        else:
            singles.append((path, data))
    if singles:
        yield group_single_resources(singles, problems)
    if not ndjson:
        return
    contiguous, medications = ndjson_is_contiguous(ndjson, types)
    if contiguous:
        yield iter_contiguous_ndjson(ndjson, problems, medications, types)
        return
    log.info("NDJSON input is not grouped by patient; grouping %d files by partition", len(ndjson))
    shuffle = Shuffle(
        ndjson,
        types=types,
        partition_bytes=partition_bytes or DEFAULT_PARTITION_BYTES,
        slice_bytes=slice_bytes or DEFAULT_SLICE_BYTES,
        spill_dir=spill_dir,
    )
    if shuffle.partitions == 1:
        yield _group_in_memory(ndjson, problems, types)
    else:
        yield shuffle


def _group_in_memory(
    paths: Sequence[Path], problems: list[str], types: frozenset[str] | None
) -> Iterator[PatientRecord]:
    outcomes = [_spill_in_memory(n, path, types) for n, path in enumerate(paths)]
    medications: dict[str, dict[str, Any]] = {}
    records: dict[str, PatientRecord] = {}
    for path, (outcome, grouped) in zip(paths, outcomes, strict=True):
        for lineno, text in outcome.problems:
            _problem(problems, problem_text(path, lineno, text))
        medications.update(outcome.medications)
        for pid, resources in grouped.items():
            rec = records.get(pid)
            if rec is None:
                rec = records[pid] = PatientRecord(pid, source=str(path))
            elif str(path) not in rec.source.split(", "):
                rec.source += f", {path}"
            rec.resources.extend(resources)
    for rec in records.values():
        yield _finish_ndjson(rec, medications)


def _spill_in_memory(
    ordinal: int, path: Path, types: frozenset[str] | None
) -> tuple[SliceOutcome, dict[str, list[dict[str, Any]]]]:
    out = SliceOutcome(ordinal)
    grouped: dict[str, list[dict[str, Any]]] = {}

    def report(lineno: int, text: str) -> None:
        out.problems.append((lineno, text))

    for lineno, res in iter_ndjson_whole(path, report, types):
        pid = _route(res, lineno, out, report)
        if pid is not None:
            grouped.setdefault(pid, []).append(res)
    return out, grouped


def group_ndjson_by_patient(
    paths: Sequence[Path],
    problems: list[str],
    *,
    partitions: int | None = None,
    partition_bytes: int = DEFAULT_PARTITION_BYTES,
    spill_dir: str | os.PathLike[str] | None = None,
    types: frozenset[str] | None = None,
    slice_bytes: int = DEFAULT_SLICE_BYTES,
) -> Iterator[PatientRecord]:
    """Yield one checked :class:`~fhirmatch.records.PatientRecord` per patient of NDJSON
    ``paths``, grouping in this process.

    ``partitions`` forces the number of spill files (default: from :func:`partition_count`);
    ``spill_dir`` is where the temporary directory is made (default: the system's temp dir);
    ``types`` keeps only those resource types. Unreadable lines and resources without a patient
    are reported in ``problems`` (file names, line numbers and resource ids only).
    """
    shuffle = Shuffle(
        paths,
        types=types,
        partitions=partitions,
        partition_bytes=partition_bytes,
        slice_bytes=slice_bytes,
        spill_dir=spill_dir,
    )
    source = (
        _group_in_memory(paths, problems, types)
        if shuffle.partitions == 1
        else shuffle.records(problems)
    )
    yield from checked_records(source)
