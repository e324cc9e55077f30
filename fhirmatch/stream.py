"""Group NDJSON resources by patient in bounded memory (hash-partitioned spill files).

Bulk Data exports are split by resource type (``Patient.ndjson``, ``Observation.ndjson`` …), so
one patient's resources are spread over every file. :func:`group_ndjson_by_patient` groups them
without holding the whole export in memory:

1. **Spill pass.** Every line is parsed once to find its patient (``subject``, ``patient`` …) and
   appended, as the original text, to one of ``N`` spill files in a private temporary directory,
   chosen by ``crc32(patient id) % N``. All lines of one patient land in the same file, in input
   order. Shared ``Medication`` resources (referenced by ``medicationReference``) are kept in
   memory — there are few of them — and attached to the records that reference them; other
   shared resources (Organization, Practitioner …) are not needed for screening and are dropped.
2. **Group pass.** Each spill file is read and grouped in memory, then its patients are yielded
   (in the order each was first seen) and the file is deleted.

Memory is bounded by the largest partition, about ``total input bytes / N``: ``N`` is chosen so a
partition holds about ``partition_bytes`` of NDJSON text (default 64 MB; parsed into dicts that is
several times more). Disk use is one extra copy of the input, uncompressed; the directory is removed
when the iteration ends or is abandoned (generator closed or garbage-collected). When the input is
smaller than one partition, nothing is written to disk.

The hash is ``zlib.crc32`` (not ``hash()``), so partitioning is the same in every process and run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from .records import (
    SHARED_TYPES,
    PatientRecord,
    _finish_ndjson,
    _iter_ndjson_lines,
    _ndjson_patient,
)

__all__ = ["DEFAULT_PARTITION_BYTES", "group_ndjson_by_patient", "partition_count", "partition_of"]

log = logging.getLogger(__name__)

#: NDJSON text per partition the grouping aims for
DEFAULT_PARTITION_BYTES = 64 * 1024 * 1024
#: gzip-compressed NDJSON is counted this many times its size when sizing partitions
GZIP_RATIO = 8
#: never more spill files than this (open file handles)
MAX_PARTITIONS = 512


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


def group_ndjson_by_patient(
    paths: Sequence[Path],
    problems: list[str],
    *,
    partitions: int | None = None,
    partition_bytes: int = DEFAULT_PARTITION_BYTES,
    spill_dir: str | os.PathLike[str] | None = None,
) -> Iterator[PatientRecord]:
    """Yield one :class:`~fhirmatch.records.PatientRecord` per patient of NDJSON ``paths``.

    ``partitions`` forces the number of spill files (default: from :func:`partition_count`);
    ``spill_dir`` is where the temporary directory is made (default: the system's temp dir).
    Unreadable lines and resources without a patient are reported in ``problems`` (file names,
    line numbers and resource ids only).
    """
    n = partitions if partitions is not None else partition_count(paths, partition_bytes)
    if n < 1:
        raise ValueError("partitions must be positive")
    if n == 1:
        yield from _group_in_memory(paths, problems)
        return
    tmp = Path(tempfile.mkdtemp(prefix="fhirmatch-spill-", dir=spill_dir))
    try:
        medications = _spill(paths, problems, tmp, n)
        log.info("grouping NDJSON by patient through %d spill partitions", n)
        for k in range(n):
            part = tmp / f"part-{k}.ndjson"
            if not part.exists():
                continue
            yield from _group_partition(part, paths, medications)
            part.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _group_in_memory(paths: Sequence[Path], problems: list[str]) -> Iterator[PatientRecord]:
    medications: dict[str, dict[str, Any]] = {}
    records: dict[str, PatientRecord] = {}
    for path in paths:
        for lineno, res in _iter_ndjson_lines(path, problems):
            _keep_medication(res, medications)
            pid = _ndjson_patient(res, path, lineno, problems)
            if pid is None:
                continue
            rec = records.get(pid)
            if rec is None:
                rec = records[pid] = PatientRecord(pid, source=str(path))
            elif str(path) not in rec.source.split(", "):
                rec.source += f", {path}"
            rec.resources.append(res)
    for rec in records.values():
        yield _finish_ndjson(rec, medications)


def _keep_medication(res: dict[str, Any], medications: dict[str, dict[str, Any]]) -> None:
    if res["resourceType"] == "Medication" and isinstance(res.get("id"), str):
        medications[res["id"]] = res


def _spill(
    paths: Sequence[Path], problems: list[str], tmp: Path, n: int
) -> dict[str, dict[str, Any]]:
    """Append each patient resource to its partition file as ``file-index TAB pid TAB json``
    (compact JSON, one line); returns the shared Medications by id."""
    import json

    medications: dict[str, dict[str, Any]] = {}
    handles: dict[int, IO[str]] = {}
    try:
        for index, path in enumerate(paths):
            for lineno, res in _iter_ndjson_lines(path, problems):
                _keep_medication(res, medications)
                if res["resourceType"] in SHARED_TYPES:
                    continue
                pid = _ndjson_patient(res, path, lineno, problems)
                if pid is None:
                    continue
                if "\t" in pid or "\n" in pid:
                    problems.append(f"{path}: line {lineno} refers to an invalid patient id")
                    log.warning("%s: line %d refers to an invalid patient id", path, lineno)
                    continue
                k = partition_of(pid, n)
                fh = handles.get(k)
                if fh is None:
                    fh = handles[k] = (tmp / f"part-{k}.ndjson").open(
                        "a", encoding="utf-8", newline="\n"
                    )
                fh.write(f"{index}\t{pid}\t{json.dumps(res, separators=(',', ':'))}\n")
    finally:
        for fh in handles.values():
            fh.close()
    return medications


def _group_partition(
    part: Path, paths: Sequence[Path], medications: dict[str, dict[str, Any]]
) -> Iterator[PatientRecord]:
    import json

    records: dict[str, PatientRecord] = {}
    sources: dict[str, list[int]] = {}
    with part.open("r", encoding="utf-8") as fh:
        for line in fh:
            index_text, pid, body = line.rstrip("\n").split("\t", 2)
            index = int(index_text)
            rec = records.get(pid)
            if rec is None:
                rec = records[pid] = PatientRecord(pid)
                sources[pid] = [index]
            elif index not in sources[pid]:
                sources[pid].append(index)
            rec.resources.append(json.loads(body))
    for pid, rec in records.items():
        rec.source = ", ".join(str(paths[i]) for i in sources[pid])
        yield _finish_ndjson(rec, medications)
