"""Load patient records from FHIR Bundle files, NDJSON (Bulk Data) files and directories.

:func:`iter_patient_records` yields one :class:`PatientRecord` per patient: the Patient resource
and every resource that refers to it through ``subject``, ``patient``, ``beneficiary`` (and a few
other patient-compartment references), as plain dicts.

Formats:

* a JSON file holding a ``Bundle`` (collection, transaction, searchset, ``$everything`` output:
  ``entry[].resource``) or a single resource; references to ``urn:uuid:`` fullUrls (Synthea
  transaction bundles) are mapped to the Patient id, and absolute references
  (``http://x/fhir/Patient/1``) are understood;
* an NDJSON file (``.ndjson``, ``.jsonl``): one resource per line;
* ``.gz`` versions of both; directories (searched recursively, files sorted by name).

Memory: a Bundle file is read whole, then its patients are yielded. NDJSON files are first
scanned to check whether each patient's lines are contiguous (as in patient-ordered exports); if
they are, a second pass streams one patient at a time. Otherwise (Bulk Data exports split by
resource type) the scan stops at the first patient seen twice and the resources are grouped through
hash-partitioned spill files (:mod:`fhirmatch.stream`): memory is bounded by one partition, not
the export.

Resources without a patient reference (Medication, Organization, Practitioner ...) are attached to
the patients of the same Bundle (a Bundle with several patients: to each of them); shared NDJSON
Medications are attached to the records that reference them. A clinical resource with no patient
reference, a malformed file (bad JSON, not UTF-8) or a malformed NDJSON line (reported with its line
number) is reported and skipped; loading never stops on bad data. Problems are logged with file
names, line numbers and resource ids only, and also collected in ``PatientRecord.problems`` or the
optional ``problems`` list the caller passes.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import os
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "PatientRecord",
    "iter_patient_records",
    "load_patient_records",
    "patient_reference_of",
    "reference_id",
]

log = logging.getLogger(__name__)

#: element names that point from a resource to its patient, in the order they are tried
PATIENT_REFERENCE_FIELDS = ("subject", "patient", "beneficiary", "individual")
#: resource types that are not about one patient (no reference expected)
SHARED_TYPES = frozenset(
    {
        "Medication",
        "Organization",
        "Practitioner",
        "PractitionerRole",
        "Location",
        "Substance",
        "Device",
        "HealthcareService",
        "Endpoint",
        "ValueSet",
        "CodeSystem",
        "ConceptMap",
        "ResearchStudy",
        "PlanDefinition",
        "ActivityDefinition",
        "Library",
        "Questionnaire",
        "StructureDefinition",
        "Group",
        "Bundle",
    }
)
JSON_SUFFIXES = (".json", ".json.gz")
NDJSON_SUFFIXES = (".ndjson", ".ndjson.gz", ".jsonl", ".jsonl.gz")


@dataclass
class PatientRecord:
    """One patient's data: the Patient resource (when present) and its resources, as dicts."""

    patient_id: str
    resources: list[dict[str, Any]] = field(default_factory=list)
    #: problems found while loading this patient's data (ids and file names, never values)
    problems: list[str] = field(default_factory=list)
    #: the file(s) the record came from
    source: str = ""

    @property
    def patient(self) -> dict[str, Any] | None:
        """The Patient resource, or None when the data referred to a patient it did not hold."""
        for r in self.resources:
            if r.get("resourceType") == "Patient":
                return r
        return None

    @property
    def reference(self) -> str:
        return f"Patient/{self.patient_id}"


def reference_id(reference: str, resource_type: str) -> str | None:
    """The id in ``reference`` when it points to ``resource_type``, else None.

    Accepts ``Type/id``, ``Type/id/_history/v`` and absolute ``http://host/fhir/Type/id``.
    """
    parts = reference.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2] == resource_type and parts[-1]:
        return parts[-1]
    return None


def patient_reference_of(
    resource: dict[str, Any], full_urls: dict[str, str] | None = None
) -> str | None:
    """The id of the patient ``resource`` belongs to, or None.

    ``full_urls`` maps Bundle ``fullUrl`` values (``urn:uuid:…``) of Patients to their ids.
    """
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return rid if isinstance(rid, str) and rid else None
    for name in PATIENT_REFERENCE_FIELDS:
        ref = resource.get(name)
        if isinstance(ref, list):  # e.g. Consent.patient is single; some elements are lists
            ref = ref[0] if ref else None
        if not isinstance(ref, dict):
            continue
        text = ref.get("reference")
        if not isinstance(text, str):
            continue
        if full_urls and text in full_urls:
            return full_urls[text]
        pid = reference_id(text, "Patient")
        if pid:
            return pid
    return None


def _describe(resource: dict[str, Any]) -> str:
    return f"{resource.get('resourceType', '?')}/{resource.get('id', '?')}"


def _open_text(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def _expand_paths(paths: Iterable[str | os.PathLike[str]], problems: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.name.endswith(JSON_SUFFIXES + NDJSON_SUFFIXES):
                    out.append(child)
        elif path.is_file():
            out.append(path)
        else:
            _problem(problems, f"{path}: no such file or directory")
    return out


def _problem(problems: list[str], message: str) -> None:
    log.warning("%s", message)
    problems.append(message)


def iter_patient_records(
    paths: Iterable[str | os.PathLike[str]],
    *,
    problems: list[str] | None = None,
    partition_bytes: int | None = None,
) -> Iterator[PatientRecord]:
    """Yield one :class:`PatientRecord` per patient found in ``paths`` (files or directories).

    Problems that belong to no patient (an unreadable file, a resource without a patient
    reference) are logged and appended to ``problems`` when given. ``partition_bytes`` bounds
    the memory used to group NDJSON that is not ordered by patient (see :mod:`fhirmatch.stream`;
    default 64 MB of NDJSON text per partition).
    """
    general: list[str] = problems if problems is not None else []
    for rec in _iter_unchecked(paths, general, partition_bytes):
        yield _checked(rec)


def _iter_unchecked(
    paths: Iterable[str | os.PathLike[str]], general: list[str], partition_bytes: int | None
) -> Iterator[PatientRecord]:
    files = _expand_paths(paths, general)
    ndjson = [f for f in files if f.name.endswith(NDJSON_SUFFIXES)]
    others = [f for f in files if not f.name.endswith(NDJSON_SUFFIXES)]
    for path in others:
        yield from _iter_json_file(path, general)
    if ndjson:
        from .stream import DEFAULT_PARTITION_BYTES

        yield from _iter_ndjson_files(ndjson, general, partition_bytes or DEFAULT_PARTITION_BYTES)


@functools.lru_cache(maxsize=512)
def _known_type(resource_type: str) -> bool:
    from fhir.resources.R4B import get_fhir_model_class

    try:
        get_fhir_model_class(resource_type)
    except ValueError:
        return False
    return True


def _value_keys(resource: dict[str, Any]) -> list[str]:
    return [k for k in resource if len(k) > 5 and k.startswith("value") and k[5].isupper()]


def _checked(rec: PatientRecord) -> PatientRecord:
    """Drop resources whose meaning cannot be trusted, reporting each with its id:

    * an unknown ``resourceType`` (a misspelt type would otherwise pass as "no data");
    * an Observation with more than one ``value[x]`` (invalid FHIR: which value is meant?);
    * copies of one ``type/id`` that differ (contradicting data: every copy is dropped; identical
      copies, common in overlapping exports, are kept once).

    A criterion that needed a dropped resource then finds no usable data: ``unknown``, never
    a pass or fail decided by a guess.
    """
    kept: list[dict[str, Any]] = []
    seen: dict[tuple[str, str], int] = {}
    contradicted: set[tuple[str, str]] = set()
    for res in rec.resources:
        rtype = res["resourceType"]
        if not _known_type(rtype):
            _note(rec, f"{rec.source}: {_describe(res)} has an unknown resourceType; skipped")
            continue
        if rtype == "Observation" and len(_value_keys(res)) > 1:
            _note(rec, f"{rec.source}: {_describe(res)} has more than one value[x]; skipped")
            continue
        rid = res.get("id")
        if isinstance(rid, str) and rid:
            key = (rtype, rid)
            if key in seen:
                if kept[seen[key]] != res and key not in contradicted:
                    contradicted.add(key)
                    _note(
                        rec,
                        f"{rec.source}: {_describe(res)} appears more than once with different "
                        "content; every copy skipped",
                    )
                continue
            seen[key] = len(kept)
        kept.append(res)
    if contradicted:
        kept = [r for r in kept if (r["resourceType"], r.get("id")) not in contradicted]
    rec.resources = kept
    return rec


def _note(rec: PatientRecord, message: str) -> None:
    log.warning("%s", message)
    rec.problems.append(message)


def load_patient_records(
    paths: Iterable[str | os.PathLike[str]], *, problems: list[str] | None = None
) -> list[PatientRecord]:
    """All records of ``paths`` as a list (see :func:`iter_patient_records`)."""
    return list(iter_patient_records(paths, problems=problems))


def _iter_json_file(path: Path, problems: list[str]) -> Iterator[PatientRecord]:
    try:
        with _open_text(path) as fh:
            data = json.load(fh)
    except UnicodeDecodeError:
        _problem(problems, f"{path}: not UTF-8 text; file skipped")
        return
    except (json.JSONDecodeError, EOFError, gzip.BadGzipFile) as exc:
        where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        _problem(problems, f"{path}: not valid JSON{where}; file skipped")
        return
    except RecursionError:
        _problem(problems, f"{path}: JSON nested too deeply to read; file skipped")
        return
    except OSError as exc:
        _problem(problems, f"{path}: cannot be read ({exc.strerror or type(exc).__name__})")
        return
    if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
        _problem(problems, f"{path}: not a FHIR resource or Bundle; file skipped")
        return
    yield from _group_bundle(data, str(path), problems)


def _bundle_resources(
    bundle: dict[str, Any], source: str, problems: list[str]
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Flatten a Bundle (nested Bundles too) into resources and a fullUrl → Patient id map."""
    resources: list[dict[str, Any]] = []
    full_urls: dict[str, str] = {}
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        _problem(problems, f"{source}: Bundle.entry is not a list; bundle skipped")
        return resources, full_urls
    for n, entry in enumerate(entries):
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            if isinstance(entry, dict) and "request" in entry and "resource" not in entry:
                continue  # e.g. a DELETE entry in a transaction
            _problem(problems, f"{source}: entry {n} holds no resource; skipped")
            continue
        if res["resourceType"] == "Bundle":
            inner, inner_urls = _bundle_resources(res, source, problems)
            resources.extend(inner)
            full_urls.update(inner_urls)
            continue
        resources.append(res)
        if res["resourceType"] == "Patient" and isinstance(res.get("id"), str):
            full_url = entry.get("fullUrl")
            if isinstance(full_url, str):
                full_urls[full_url] = res["id"]
    return resources, full_urls


def _group_bundle(
    data: dict[str, Any], source: str, problems: list[str]
) -> Iterator[PatientRecord]:
    if data["resourceType"] == "Bundle":
        resources, full_urls = _bundle_resources(data, source, problems)
    else:
        resources, full_urls = [data], {}
    records: dict[str, PatientRecord] = {}
    shared: list[dict[str, Any]] = []
    for res in resources:
        pid = patient_reference_of(res, full_urls)
        if pid is None:
            if res["resourceType"] in SHARED_TYPES:
                shared.append(res)
            else:
                _problem(problems, f"{source}: {_describe(res)} has no patient reference; skipped")
            continue
        rec = records.get(pid)
        if rec is None:
            rec = records[pid] = PatientRecord(pid, source=source)
        rec.resources.append(res)
    for rec in records.values():
        rec.resources.extend(shared)
        if rec.patient is None:
            rec.problems.append(f"{source}: no Patient resource for Patient/{rec.patient_id}")
        yield rec


def _iter_ndjson_lines(
    path: Path, problems: list[str]
) -> Generator[tuple[int, dict[str, Any]], None, None]:
    """Yield ``(line number, resource)`` for each readable line; report the others."""
    try:
        with _open_text(path) as fh:
            lineno = 0
            while True:
                try:
                    line = fh.readline()
                except UnicodeDecodeError:
                    _problem(
                        problems, f"{path}: line {lineno + 1} is not UTF-8; rest of file skipped"
                    )
                    return
                if not line:
                    return
                lineno += 1
                if not line.strip():
                    continue
                try:
                    res = json.loads(line)
                except json.JSONDecodeError:
                    _problem(problems, f"{path}: line {lineno} is not valid JSON; line skipped")
                    continue
                except RecursionError:
                    _problem(problems, f"{path}: line {lineno} is nested too deeply; skipped")
                    continue
                if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
                    _problem(problems, f"{path}: line {lineno} is not a FHIR resource; skipped")
                    continue
                yield lineno, res
    except (EOFError, gzip.BadGzipFile, OSError) as exc:
        _problem(problems, f"{path}: cannot be read to the end ({type(exc).__name__})")


def _iter_ndjson_files(
    paths: list[Path], problems: list[str], partition_bytes: int
) -> Iterator[PatientRecord]:
    # Pass 1: check contiguity and collect shared Medications (few) without keeping resources.
    medications: dict[str, dict[str, Any]] = {}
    finished: set[str] = set()
    contiguous = True
    scan_problems: list[str] = []
    # The scan stops at the first patient seen twice: the partitioned grouping reads everything.
    for path in paths:
        current: str | None = None
        lines = _iter_ndjson_lines(path, scan_problems)
        for _lineno, res in lines:
            if res["resourceType"] in SHARED_TYPES:
                if res["resourceType"] == "Medication" and isinstance(res.get("id"), str):
                    medications[res["id"]] = res
                continue
            pid = patient_reference_of(res)
            if pid is None or pid == current:
                continue
            if pid in finished:
                contiguous = False
                lines.close()
                break
            if current is not None:
                finished.add(current)
            current = pid
        if not contiguous:
            break
        if current is not None:
            finished.add(current)
    finished.clear()
    if not contiguous:
        log.info(
            "NDJSON input is not grouped by patient; grouping %d files by partition", len(paths)
        )
    # Pass 2: read again, reporting problems this time.
    if contiguous:
        for path in paths:
            rec: PatientRecord | None = None
            for lineno, res in _iter_ndjson_lines(path, problems):
                pid = _ndjson_patient(res, path, lineno, problems)
                if pid is None:
                    continue
                if rec is not None and rec.patient_id != pid:
                    yield _finish_ndjson(rec, medications)
                    rec = None
                if rec is None:
                    rec = PatientRecord(pid, source=str(path))
                rec.resources.append(res)
            if rec is not None:
                yield _finish_ndjson(rec, medications)
        return
    from .stream import group_ndjson_by_patient

    yield from group_ndjson_by_patient(paths, problems, partition_bytes=partition_bytes)


def _ndjson_patient(
    res: dict[str, Any], path: Path, lineno: int, problems: list[str]
) -> str | None:
    if res["resourceType"] in SHARED_TYPES:
        return None
    pid = patient_reference_of(res)
    if pid is None:
        _problem(problems, f"{path}: line {lineno} ({_describe(res)}) has no patient reference")
    return pid


def _finish_ndjson(rec: PatientRecord, medications: dict[str, dict[str, Any]]) -> PatientRecord:
    if medications:
        wanted: set[str] = set()
        for res in rec.resources:
            ref = res.get("medicationReference")
            if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
                mid = reference_id(ref["reference"], "Medication")
                if mid:
                    wanted.add(mid)
        rec.resources.extend(medications[m] for m in sorted(wanted) if m in medications)
    if rec.patient is None:
        rec.problems.append(f"{rec.source}: no Patient resource for Patient/{rec.patient_id}")
    return rec
