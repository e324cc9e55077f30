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

import gzip
import json
import logging
import os
import re
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from datetime import date
from pathlib import Path
from typing import IO, Any, Final

import msgspec
from mypy_extensions import mypyc_attr

from ._shapes import _Brief, _Concept, _Dated, _Head, _Part
from .terminology import canonical_coding

__all__ = [
    "PatientRecord",
    "ResourceFilter",
    "check_record",
    "decode_head",
    "decode_json",
    "iter_patient_records",
    "load_patient_records",
    "patient_reference_of",
    "reference_id",
    "unicode_problem",
]

log = logging.getLogger(__name__)

#: element names that point from a resource to its patient, in the order they are tried
PATIENT_REFERENCE_FIELDS = ("subject", "patient", "beneficiary", "individual")
#: resource types that are not about one patient (no reference expected)
SHARED_TYPES: Final = frozenset(
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
#: every resource type of FHIR R4B (https://hl7.org/fhir/R4B/resourcelist.html), the version whose
#: models fhir.resources provides; a test checks it against fhir.resources
RESOURCE_TYPES = frozenset(
    {
        "Account",
        "ActivityDefinition",
        "AdministrableProductDefinition",
        "AdverseEvent",
        "AllergyIntolerance",
        "Appointment",
        "AppointmentResponse",
        "AuditEvent",
        "Basic",
        "Binary",
        "BiologicallyDerivedProduct",
        "BodyStructure",
        "Bundle",
        "CapabilityStatement",
        "CarePlan",
        "CareTeam",
        "CatalogEntry",
        "ChargeItem",
        "ChargeItemDefinition",
        "Citation",
        "Claim",
        "ClaimResponse",
        "ClinicalImpression",
        "ClinicalUseDefinition",
        "CodeSystem",
        "Communication",
        "CommunicationRequest",
        "CompartmentDefinition",
        "Composition",
        "ConceptMap",
        "Condition",
        "Consent",
        "Contract",
        "Coverage",
        "CoverageEligibilityRequest",
        "CoverageEligibilityResponse",
        "DetectedIssue",
        "Device",
        "DeviceDefinition",
        "DeviceMetric",
        "DeviceRequest",
        "DeviceUseStatement",
        "DiagnosticReport",
        "DocumentManifest",
        "DocumentReference",
        "Encounter",
        "Endpoint",
        "EnrollmentRequest",
        "EnrollmentResponse",
        "EpisodeOfCare",
        "EventDefinition",
        "Evidence",
        "EvidenceReport",
        "EvidenceVariable",
        "ExampleScenario",
        "ExplanationOfBenefit",
        "FamilyMemberHistory",
        "Flag",
        "Goal",
        "GraphDefinition",
        "Group",
        "GuidanceResponse",
        "HealthcareService",
        "ImagingStudy",
        "Immunization",
        "ImmunizationEvaluation",
        "ImmunizationRecommendation",
        "ImplementationGuide",
        "Ingredient",
        "InsurancePlan",
        "Invoice",
        "Library",
        "Linkage",
        "List",
        "Location",
        "ManufacturedItemDefinition",
        "Measure",
        "MeasureReport",
        "Media",
        "Medication",
        "MedicationAdministration",
        "MedicationDispense",
        "MedicationKnowledge",
        "MedicationRequest",
        "MedicationStatement",
        "MedicinalProductDefinition",
        "MessageDefinition",
        "MessageHeader",
        "MolecularSequence",
        "NamingSystem",
        "NutritionOrder",
        "NutritionProduct",
        "Observation",
        "ObservationDefinition",
        "OperationDefinition",
        "OperationOutcome",
        "Organization",
        "OrganizationAffiliation",
        "PackagedProductDefinition",
        "Parameters",
        "Patient",
        "PaymentNotice",
        "PaymentReconciliation",
        "Person",
        "PlanDefinition",
        "Practitioner",
        "PractitionerRole",
        "Procedure",
        "Provenance",
        "Questionnaire",
        "QuestionnaireResponse",
        "RegulatedAuthorization",
        "RelatedPerson",
        "RequestGroup",
        "ResearchDefinition",
        "ResearchElementDefinition",
        "ResearchStudy",
        "ResearchSubject",
        "RiskAssessment",
        "Schedule",
        "SearchParameter",
        "ServiceRequest",
        "Slot",
        "Specimen",
        "SpecimenDefinition",
        "StructureDefinition",
        "StructureMap",
        "Subscription",
        "SubscriptionStatus",
        "SubscriptionTopic",
        "Substance",
        "SubstanceDefinition",
        "SupplyDelivery",
        "SupplyRequest",
        "Task",
        "TerminologyCapabilities",
        "TestReport",
        "TestScript",
        "ValueSet",
        "VerificationResult",
        "VisionPrescription",
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

    def __reduce__(self) -> tuple[Any, ...]:
        return by_fields(self)


def by_fields(obj: Any) -> tuple[Any, ...]:
    """``__reduce__`` for a dataclass sent to worker processes: rebuilt by calling its class with
    its fields. (A dataclass compiled with mypyc cannot be unpickled attribute by attribute.)"""
    return (type(obj), tuple(getattr(obj, f.name) for f in fields(obj)))


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
        pid = _patient_of(text)
        if pid:
            return pid
    return None


def _describe(resource: dict[str, Any]) -> str:
    return f"{resource.get('resourceType', '?')}/{resource.get('id', '?')}"


def _open_text(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def _open_binary(path: Path) -> IO[bytes]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return path.open("rb")


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


def decode_json(data: bytes | memoryview) -> Any:
    """``json.loads`` of UTF-8 ``data``, with the same result and the same exceptions, about three
    times faster: msgspec decodes it (as fast as orjson: see ``benchmarks/bench_offline.py``),
    and only what msgspec refuses (NaN, lone surrogates, anything malformed) is handed to the
    standard library, which decides as it always did; except that a string holding a lone
    surrogate (``"\\udc80"``) raises ``UnicodeDecodeError`` (:func:`unicode_problem` says why),
    as bytes that are not UTF-8 do: no result or record could be written with it.
    """
    try:
        return _DECODE(data)
    except msgspec.DecodeError:
        text = bytes(data).decode("utf-8")
        value = json.loads(text)
    if "\\u" not in text:
        return value  # a surrogate can only come from an escape: UTF-8 text holds none
    try:  # rare: only what msgspec refused, with escapes, gets here
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        # "\udc80" alone is JSON but not Unicode text: it could not be written out again
        raise UnicodeDecodeError("utf-8", b"", 0, 1, LONE_SURROGATE) from None
    return value


#: the reason of the UnicodeDecodeError :func:`decode_json` raises for a lone surrogate escape
LONE_SURROGATE = "a \\u escape of a lone surrogate, which is not Unicode text"

#: a surrogate code point, which a str holds only from a lone escape (built with chr: mypyc
#: refuses surrogates in literals)
_SURROGATE: Final = re.compile(f"[{chr(0xD800)}-{chr(0xDFFF)}]")


def mend_lone_surrogates(value: Any) -> tuple[Any, int]:
    """``value``, decoded JSON, with every lone surrogate in its strings and keys (what a
    ``"\\udc80"`` escape decodes to) replaced by U+FFFD REPLACEMENT CHARACTER, and how many
    strings held one. A valid pair of escapes is one character once decoded, so it is left alone.

    For a FHIR server's answers: a resource holding such text is kept, and only the character
    that is not Unicode is lost (a code or an id is almost always ASCII). Without this, a unit or a
    display holding one would reach a result's reason, and the result could not be written as
    UTF-8."""
    if isinstance(value, str):
        if value.isascii() or _SURROGATE.search(value) is None:
            return value, 0
        return _SURROGATE.sub("\ufffd", value), 1
    if isinstance(value, list):
        mended = 0
        items = []
        for item in value:
            item, n = mend_lone_surrogates(item)
            items.append(item)
            mended += n
        return (items if mended else value), mended
    if isinstance(value, dict):
        mended = 0
        pairs = []
        for key, item in value.items():
            key, k = mend_lone_surrogates(key)
            item, n = mend_lone_surrogates(item)
            pairs.append((key, item))
            mended += k + n
        return (dict(pairs) if mended else value), mended
    return value, 0


def unicode_problem(exc: UnicodeDecodeError) -> str:
    """What is wrong with text :func:`decode_json` refused as not Unicode."""
    return "holds " + LONE_SURROGATE if exc.reason == LONE_SURROGATE else "is not UTF-8"


def undecodable_problem(exc: ValueError | RecursionError) -> str:
    """The problem of a line that was read in part, and that :func:`decode_json` then refused
    whole (``UnicodeDecodeError`` is a ``ValueError``)."""
    if isinstance(exc, UnicodeDecodeError):
        return f"{unicode_problem(exc)}; line skipped"
    if isinstance(exc, RecursionError):
        return "is nested too deeply; skipped"
    return "is not valid JSON; line skipped"


# Final, here and on the module's other constants read per line: the compiled build keeps a
# Final name in a static variable instead of looking it up in the module's dict at each use
#: the types :func:`iter_ndjson_slice` routes from a :class:`_Brief`: every FHIR type that
#: belongs to one patient (not the Patient itself, nor the shared types)
_ROUTABLE: Final[frozenset[str]] = RESOURCE_TYPES - SHARED_TYPES - {"Patient"}
#: patient id (or "" for none) of the references met lately (a patient's lines repeat one)
_PATIENT_IDS: Final[dict[str, str]] = {}


def _patient_of(reference: str) -> str:
    """:func:`reference_id` of a Patient reference, or "" (remembered: most lines of an export
    refer to a patient met just before)."""
    pid = _PATIENT_IDS.get(reference)
    if pid is None:
        if len(_PATIENT_IDS) >= 65536:
            _PATIENT_IDS.clear()
        pid = _PATIENT_IDS[reference] = reference_id(reference, "Patient") or ""
    return pid


_DECODE = msgspec.json.Decoder().decode
_DECODE_HEAD: Final = msgspec.json.Decoder(_Head).decode
_DECODE_BRIEF: Final = msgspec.json.Decoder(_Brief).decode
_DECODE_CONCEPT: Final = msgspec.json.Decoder(_Concept | None).decode
_DECODE_PARTS: Final = msgspec.json.Decoder(list[_Part]).decode
_DECODE_DATED: Final = msgspec.json.Decoder(_Dated).decode
_asdict = msgspec.structs.asdict


def decode_head(data: bytes) -> dict[str, Any]:
    """The resource in one NDJSON line reduced to ``resourceType``, ``id``, ``code`` and its
    patient references (:data:`PATIENT_REFERENCE_FIELDS`): enough for
    :func:`patient_reference_of` and :meth:`ResourceFilter.keeps`, without building the rest
    (about three times cheaper than decoding it all). Elements that are absent or null are left
    out. Raises ``msgspec.DecodeError`` when the line is not a JSON
    object; strings it does not keep are not checked for UTF-8 (the full decode does that).
    """
    head = _asdict(_DECODE_HEAD(data))
    for name in ("id", "code", *PATIENT_REFERENCE_FIELDS):
        if head[name] is None:
            del head[name]
    if not head["component"]:
        del head["component"]
    return head


def iter_patient_records(
    paths: Iterable[str | os.PathLike[str]],
    *,
    problems: list[str] | None = None,
    partition_bytes: int | None = None,
    types: frozenset[str] | None = None,
    spill_dir: str | os.PathLike[str] | None = None,
) -> Iterator[PatientRecord]:
    """Yield one :class:`PatientRecord` per patient found in ``paths`` (files or directories).

    Problems that belong to no patient (an unreadable file, a resource without a patient
    reference) are logged and appended to ``problems`` when given. ``partition_bytes`` bounds
    the memory used to group NDJSON that is not ordered by patient (see :mod:`fhirmatch.stream`;
    default 64 MB of NDJSON text per partition); its spill files go under ``spill_dir``.
    ``types`` (e.g. :func:`fhirmatch.stream.wanted_types`) keeps only those resource types of
    NDJSON input, skipping the others before their JSON is decoded where possible.
    """
    from .stream import Shuffle, plan_input

    general: list[str] = problems if problems is not None else []
    for part in plan_input(
        paths, general, types=types, partition_bytes=partition_bytes, spill_dir=spill_dir
    ):
        yield from checked_records(part.records(general) if isinstance(part, Shuffle) else part)


def checked_records(source: Iterator[PatientRecord]) -> Iterator[PatientRecord]:
    """:func:`check_record` of each record of ``source``. Stopping early closes ``source`` at
    once (when it can be closed), so its ``finally`` blocks run now, not whenever its last
    reference goes: an abandoned iteration removes its spill files."""
    try:
        for rec in source:
            yield check_record(rec)
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


def _known_type(resource_type: str) -> bool:
    return resource_type in RESOURCE_TYPES


def _value_keys(resource: dict[str, Any]) -> list[str]:
    return [k for k in resource if k.startswith("value") and len(k) > 5 and k[5].isupper()]


def check_record(rec: PatientRecord, *, quiet: bool = False) -> PatientRecord:
    """Drop resources whose meaning cannot be trusted, reporting each with its id:

    * an unknown ``resourceType`` (a misspelt type would otherwise pass as "no data");
    * an Observation with more than one ``value[x]`` (invalid FHIR: which value is meant?);
    * copies of one ``type/id`` that differ (contradicting data: every copy is dropped; identical
      copies, common in overlapping exports, are kept once).

    A criterion that needed a dropped resource then finds no usable data: ``unknown``, never
    a pass or fail decided by a guess. The record's problems (these and those found while
    grouping it) are logged here, once; ``quiet``: collect them without logging (in worker
    processes; the caller logs them).
    """
    note = _collect if quiet else _note
    if not quiet:
        for problem in rec.problems:  # found while grouping (e.g. no Patient resource)
            log.warning("%s", problem)
    kept: list[dict[str, Any]] = []
    seen: dict[tuple[str, str], int] = {}
    contradicted: set[tuple[str, str]] = set()
    for res in rec.resources:
        rtype = res["resourceType"]
        if not _known_type(rtype):
            note(rec, f"{rec.source}: {_describe(res)} has an unknown resourceType; skipped")
            continue
        if rtype == "Observation" and len(_value_keys(res)) > 1:
            note(rec, f"{rec.source}: {_describe(res)} has more than one value[x]; skipped")
            continue
        rid = res.get("id")
        if isinstance(rid, str) and rid:
            key = (rtype, rid)
            if key in seen:
                if kept[seen[key]] != res and key not in contradicted:
                    contradicted.add(key)
                    note(
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


def _collect(rec: PatientRecord, message: str) -> None:
    rec.problems.append(message)


def load_patient_records(
    paths: Iterable[str | os.PathLike[str]], *, problems: list[str] | None = None
) -> list[PatientRecord]:
    """All records of ``paths`` as a list (see :func:`iter_patient_records`)."""
    return list(iter_patient_records(paths, problems=problems))


def read_json_file(path: Path, problems: list[str]) -> dict[str, Any] | None:
    """The FHIR resource or Bundle in a JSON file; None (reported) when it holds none."""
    try:
        with _open_binary(path) as fh:
            data = decode_json(fh.read())
    except UnicodeDecodeError as exc:
        why = "not UTF-8 text" if exc.reason != LONE_SURROGATE else "holds " + LONE_SURROGATE
        _problem(problems, f"{path}: {why}; file skipped")
        return None
    except (json.JSONDecodeError, EOFError, gzip.BadGzipFile) as exc:
        where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        _problem(problems, f"{path}: not valid JSON{where}; file skipped")
        return None
    except RecursionError:
        _problem(problems, f"{path}: JSON nested too deeply to read; file skipped")
        return None
    except OSError as exc:
        _problem(problems, f"{path}: cannot be read ({exc.strerror or type(exc).__name__})")
        return None
    if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
        _problem(problems, f"{path}: not a FHIR resource or Bundle; file skipped")
        return None
    return data


def _iter_json_file(path: Path, problems: list[str]) -> Iterator[PatientRecord]:
    data = read_json_file(path, problems)
    if data is not None:
        yield from group_bundle(data, str(path), problems)


def group_single_resources(
    found: Sequence[tuple[Path, dict[str, Any]]], problems: list[str]
) -> Iterator[PatientRecord]:
    """Group resources read one per file (the way implementation guides ship examples) by
    patient, across files; records in the order each patient was first seen.

    Shared Medications are attached to the records that reference them, like NDJSON; other
    resources without a patient reference are reported and skipped.
    """
    records: dict[str, PatientRecord] = {}
    files: dict[str, list[Path]] = {}
    medications: dict[str, dict[str, Any]] = {}
    for path, res in found:
        rtype = res["resourceType"]
        if rtype == "Medication" and isinstance(res.get("id"), str):
            medications[res["id"]] = res
        if rtype in SHARED_TYPES:
            continue
        pid = patient_reference_of(res)
        if pid is None:
            _problem(problems, f"{path}: {_describe(res)} has no patient reference; skipped")
            continue
        rec = records.get(pid)
        if rec is None:
            rec = records[pid] = PatientRecord(pid)
            files[pid] = []
        rec.resources.append(res)
        files[pid].append(path)
    for pid, rec in records.items():
        paths = files[pid]
        if len(paths) == 1:
            rec.source = str(paths[0])
        else:
            parent = os.path.commonpath([str(p.parent) for p in paths])
            rec.source = f"{parent} ({len(paths)} files)"
        yield _finish_ndjson(rec, medications)


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


def group_bundle(data: dict[str, Any], source: str, problems: list[str]) -> Iterator[PatientRecord]:
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


@mypyc_attr(native_class=False)  # a compiled class cannot subclass frozenset
class ResourceFilter(frozenset[str]):
    """The resources a run reads: a set of resource type names (usable wherever one is), and,
    for the types in ``coded``, only the resources whose code some criterion may look for.

    ``keeps`` applies the screening engine's own rule for which resources it indexes
    (:func:`fhirmatch.engine.may_be_found`: a known code, an ICD-10 code below a known
    category, or an Observation with a local code that a ConceptMap may translate), and keeps
    every resource whose code has no coding at all (the engine may read its words), so
    dropping the others while reading NDJSON changes no result; it only spares decoding,
    grouping and indexing most of a record (vital signs, surveys, encounter procedures ...).
    The whole check needs only the resource's ``resourceType`` and ``code``
    (:func:`decode_head` keeps both).

    With ``as_of`` and ``windows`` (the widest look-back window of the inputs that ask for a
    code, when each has one), a kept line whose every code is asked for only within such
    windows, and which is dated outside all of them, is :meth:`outdated`. The engine cannot
    match such a resource; all it reads of it is its date, to name the latest ("the latest ...
    is outside the window"), and whether its status lets it count. So of a patient's outdated
    lines of one kind (type, code and statuses as written), the NDJSON reader keeps only the
    latest (:func:`iter_ndjson_slice`): a long history of routine labs is mostly such lines.
    """

    known_codes: frozenset[tuple[str, str]]
    coded: frozenset[str]
    #: the date :meth:`outdated` judges by, or None: no line is outdated
    as_of: date | None
    #: ``(type, system, code)`` -> the widest look-back window (days) of the inputs asking for
    #: it, for the codes that only inputs with a window ask for
    windows: dict[tuple[str, str, str], int]
    #: per coded type whose dates :class:`_Dated` holds, its codes as written -> the window a
    #: resource so coded must be dated within to be read whole (-1: read whole, whatever its date)
    _code_windows: dict[str, dict[bytes, int]]
    #: per coded type, its codes as written -> :meth:`keeps_brief`'s verdict
    _verdicts: dict[str, dict[bytes, bool | None]]
    #: a component's code as written -> whether an input asks for it (see :meth:`_parts_kept`)
    _part_verdicts: dict[bytes, bool]
    #: the LOINC codes among ``known_codes`` (most resources a run drops are LOINC-coded)
    _loinc: frozenset[str]

    def __new__(
        cls,
        types: Iterable[str],
        known_codes: Iterable[tuple[str, str]] = (),
        coded: Iterable[str] = (),
        windows: dict[tuple[str, str, str], int] | None = None,
        as_of: date | None = None,
    ) -> ResourceFilter:
        self = frozenset.__new__(cls, types)
        self.known_codes = frozenset(known_codes)
        self.coded = frozenset(coded)
        self._loinc = frozenset(code for system, code in self.known_codes if system == _LOINC)
        self._verdicts = {rtype: {} for rtype in self.coded}
        self._part_verdicts = {}
        self.windows = dict(windows or {})
        self.as_of = as_of if self.windows else None
        self._code_windows = {
            rtype: {} for rtype in self.coded if set(_date_fields(rtype)) <= set(_DATED_DATES)
        }
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            ResourceFilter,
            (tuple(self), self.known_codes, self.coded, self.windows, self.as_of),
        )

    def keeps(self, resource: dict[str, Any]) -> bool:
        """Whether ``resource`` (of a type in the set) is read: it may matter to a criterion,
        or it has no patient reference (kept so that the reader reports it, as before)."""
        rtype = resource.get("resourceType")
        if rtype not in self.coded:
            return True
        if "component" in resource and self._known_component(resource["component"]):
            return True  # a panel whose parts an input asks for (the stains of an MMR panel)
        concept = resource.get("code")
        codings = concept.get("coding") if isinstance(concept, dict) else None
        pairs = [
            (c["system"], c["code"])
            for c in (codings if isinstance(codings, list) else ())
            if isinstance(c, dict) and isinstance(c.get("system"), str)
            if isinstance(c.get("code"), str)
        ]
        if not pairs or self._codes_kept(str(rtype), pairs):
            return True  # no coding (the engine judges it by its words), or a code it may find
        return patient_reference_of(resource) is None

    def keeps_brief(self, brief: _Brief) -> bool | None:
        """:meth:`keeps` of a resource of a wanted type whose subject is a Patient, decided from
        its :class:`_Brief` when that is simple (every coding has a system and a code; the
        components, if any, a list of objects); None when :meth:`keeps` must judge the head.
        Judged once per type and code as written (a bounded table): an export repeats the same
        few codes."""
        rtype = brief.resourceType
        verdicts = self._verdicts.get(rtype) if rtype is not None else None
        if rtype is None or verdicts is None:
            return True  # not a coded type: kept whatever its code
        code = bytes(brief.code)
        verdict = verdicts.get(code, _UNJUDGED)
        if verdict is _UNJUDGED:
            verdict = self._judge_code(rtype, code)
            if len(verdicts) >= _MAX_VERDICTS:
                verdicts.clear()
            verdicts[code] = verdict
        if verdict is False and brief.component:
            # a panel whose own code is not wanted: kept when a part's code is (as in keeps)
            return self._parts_kept(brief.component)
        return verdict  # type: ignore[return-value]

    def outdated(
        self, brief: _Brief, body: bytes, code: bytes | None = None
    ) -> tuple[bytes, str] | None:
        """For a line :meth:`keeps_brief` keeps: None when it may match an input (or is a
        panel, or its dates cannot be read here); else it is dated outside every window that
        asks for its code, and this is ``(what the engine reads of it besides its date, its
        date)``: its code and statuses as written, and :func:`fhirmatch.engine._resource_date`
        ("" for none). The engine cannot match such a resource; it only names the latest date
        among those alike, to say that an older record exists. ``code`` is ``bytes(brief.code)``
        when the caller has it already."""
        as_of = self.as_of
        rtype = brief.resourceType
        if as_of is None or rtype is None or brief.component:
            return None
        windows = self._code_windows.get(rtype)
        if windows is None:
            return None
        if code is None:
            code = bytes(brief.code)
        days = windows.get(code)
        if days is None:
            days = self._window_of(rtype, code)
            if len(windows) >= _MAX_VERDICTS:
                windows.clear()
            windows[code] = days
        if days < 0:
            return None
        date_key, resource_date, to_date = _ENGINE_DATES or _import_engine_dates()
        when = None
        if rtype == "Observation" and brief.effectiveDateTime:
            # most lines: the brief read holds the date the engine reads first, and the status,
            # the only one it reads of an Observation (inputs that filter on a clinical status
            # have no window here: see fhirmatch.stream.wanted_types)
            try:
                when = date_key(_DECODE(brief.effectiveDateTime))
            except (ValueError, RecursionError):
                return None  # the whole decode reports it
        if when:
            status = bytes(brief.status) + b"\0\0"
        else:
            try:
                dated = _DECODE_DATED(body)
            except msgspec.DecodeError:
                return None
            elements: dict[str, Any] = {"resourceType": rtype}
            for name in _DATED_DATES:
                raw = getattr(dated, name)
                if raw:
                    try:
                        elements[name] = _DECODE(raw)
                    except (ValueError, RecursionError):
                        return None  # the whole decode reports it
            when = resource_date(elements)
            statuses = (dated.status, dated.clinicalStatus, dated.verificationStatus)
            status = b"\0".join([bytes(raw) for raw in statuses])
        day = to_date(when) if when else None
        if day is not None and (as_of - day).days <= days:
            return None  # within a window: read whole
        return code + b"\0" + status, when or ""

    def _window_of(self, rtype: str, code: bytes) -> int:
        """The widest window of the inputs asking for a resource of ``rtype`` coded ``code``
        (its JSON text), or -1 when one of its codes may be found without a window (or in a way
        other than by itself: an ICD-10 category above it, a ConceptMap)."""
        from .engine import ICD10_SYSTEMS

        try:
            concept = _DECODE_CONCEPT(code) if code else None
        except msgspec.DecodeError:
            return -1
        codings = concept.coding if concept is not None else None
        if not codings:
            return -1
        widest = -1
        for coding in codings:
            system, value = coding.system, coding.code
            if not isinstance(system, str) or not isinstance(value, str):
                return -1
            if system == _LOINC and value.strip() not in self._loinc:
                continue  # an unknown LOINC code is found by nothing
            system, value = canonical_coding(system, value)
            if system in ICD10_SYSTEMS:
                return -1  # an input asking for a category above it may have another window
            days = self.windows.get((rtype, system, value))
            if days is None:
                return -1
            widest = max(widest, days)
        return widest

    def _parts_kept(self, raw: msgspec.Raw) -> bool | None:
        """:meth:`_known_component` of the components as written, each part's code judged once
        (a bounded table: the parts of a panel repeat a few codes); None when they are not a
        list of objects (the head decode reads them)."""
        try:
            parts = _DECODE_PARTS(raw)
        except msgspec.DecodeError:
            return None
        verdicts = self._part_verdicts
        for part in parts:
            code = bytes(part.code)
            verdict = verdicts.get(code)
            if verdict is None:
                try:
                    concept = _DECODE(code) if code else None
                except (ValueError, RecursionError):  # not UTF-8, say: the head decode reads it
                    return None
                verdict = self._asks_for(concept)
                if len(verdicts) >= _MAX_VERDICTS:
                    verdicts.clear()
                verdicts[code] = verdict
            if verdict:
                return True
        return False

    def _judge_code(self, rtype: str, code: bytes) -> bool | None:
        """:meth:`keeps_brief` of a resource of a coded type, from the JSON text of its code
        (empty when it has none)."""
        try:
            concept = _DECODE_CONCEPT(code) if code else None
        except msgspec.DecodeError:
            return None  # another shape: the head decode reads it
        codings = concept.coding if concept is not None else None
        if not codings:
            return True  # only words, or nothing: the engine judges it by its text
        pairs: list[tuple[str, str]] = []
        for coding in codings:
            if not isinstance(coding.system, str) or not isinstance(coding.code, str):
                return None
            pairs.append((coding.system, coding.code))
        return self._codes_kept(rtype, pairs)

    def _codes_kept(self, rtype: str, pairs: list[tuple[str, str]]) -> bool:
        """The engine's rule for a resource coded ``pairs`` (system and code as recorded):
        decided here when every coding is an unknown LOINC code (most resources a run drops),
        else by :func:`fhirmatch.engine._codes_may_be_found`, which comes to the same answer."""
        loinc = self._loinc
        if all(system == _LOINC and code.strip() not in loinc for system, code in pairs):
            return False
        _read, found = _ENGINE_RULES or _import_engine_rules()
        keys = [canonical_coding(system, code) for system, code in pairs]
        return found(keys, rtype, self.known_codes, True)

    def _known_component(self, components: Any) -> bool:
        """Whether a component of an Observation has a code an input asks for (the head decode
        leaves the components as raw JSON; decoded here only for the Observations that have
        them)."""
        if isinstance(components, msgspec.Raw):
            try:
                components = _DECODE(components)
            except (ValueError, RecursionError):  # msgspec.DecodeError is a ValueError
                return True  # unreadable here (not JSON, not UTF-8): read in full, judged later
        if not isinstance(components, list):
            return False
        return any(
            self._asks_for(comp.get("code")) for comp in components if isinstance(comp, dict)
        )

    def _asks_for(self, concept: Any) -> bool:
        """Whether a component's code (a CodeableConcept as decoded) has a coding an input asks
        for."""
        codings, _found = _ENGINE_RULES or _import_engine_rules()
        known = self.known_codes
        return any(key in known for key in codings(concept))


_LOINC: Final = "http://loinc.org"
#: marks a code not judged yet; and the bound on the codes :meth:`ResourceFilter.keeps_brief`
#: remembers
_UNJUDGED: Final = object()
_MAX_VERDICTS: Final = 65536
#: the engine's reading of codings and its indexing rule (``_codings``,
#: ``_codes_may_be_found``), imported when first needed (the engine imports this module)
_ENGINE_RULES: tuple[Callable[..., list[tuple[str, str]]], Callable[..., bool]] | None = None


def _import_engine_rules() -> tuple[Callable[..., list[tuple[str, str]]], Callable[..., bool]]:
    global _ENGINE_RULES
    from .engine import _codes_may_be_found, _codings

    _ENGINE_RULES = (_codings, _codes_may_be_found)
    return _ENGINE_RULES


_DateRules = tuple[
    Callable[[Any], str | None],
    Callable[[dict[str, Any]], str | None],
    Callable[[str], date | None],
]
#: the engine's reading of dates (``_date_key`` of one element, ``_resource_date`` of a
#: resource, ``_to_date``), imported when first needed
_ENGINE_DATES: _DateRules | None = None


def _import_engine_dates() -> _DateRules:
    global _ENGINE_DATES
    from .engine import _date_key, _resource_date, _to_date

    _ENGINE_DATES = (_date_key, _resource_date, _to_date)
    return _ENGINE_DATES


def _date_fields(rtype: str) -> tuple[str, ...]:
    """The elements the engine reads a resource's date from, in its order of preference."""
    from .engine import _DATE_FIELDS, _GENERIC_DATE_FIELDS

    return _DATE_FIELDS.get(rtype, _GENERIC_DATE_FIELDS)


#: the date elements :class:`_Dated` reads (its fields but the statuses)
_DATED_DATES: Final = tuple(
    name for name in _Dated.__struct_fields__ if not name.lower().endswith("status")
)


#: ``"resourceType": "X"`` anywhere in an NDJSON line (top level or contained resources)
_TYPE_PATTERN = re.compile(rb'"resourceType"\s*:\s*"([A-Za-z]+)"')
#: problem reporter: ``(line number or 0 for the whole file, text after "path: line N ")``
Report = Callable[[int, str], None]


def skippable_line(line: bytes, types: frozenset[str]) -> bool:
    """True when an NDJSON ``line`` surely holds a resource of a known type not in ``types``.

    Decided without decoding the JSON: every ``"resourceType"`` in the line (the resource's own
    and those of contained resources) must name a known FHIR type outside ``types``. Anything
    doubtful (``\\u`` escapes, an unknown or misspelt type, no type at all) is decoded and judged
    normally, so a line that may matter is never dropped unread. (A broken line of a type the
    run does not need is skipped unreported, like the rest of that type.)
    """
    if b"\\u" in line:
        return False
    found = _TYPE_PATTERN.findall(line)
    if not found or len(found) != line.count(b'"resourceType"'):
        return False
    for raw in found:
        name = raw.decode("ascii")
        if name in types or not _known_type(name):
            return False
    return True


def iter_ndjson_slice(
    path: Path,
    report: Report,
    *,
    types: frozenset[str] | None = None,
    start: int = 0,
    end: int | None = None,
    head: bool = False,
) -> Generator[tuple[int, dict[str, Any], bytes], None, int]:
    """Yield ``(line number, resource, line text)`` for each readable line of an NDJSON file;
    returns (as the generator's value) the number of lines it covered.

    ``start``/``end`` (uncompressed files only) restrict it to the lines that *begin* in that
    byte range, numbered from 1 at the first of them; so consecutive ranges cover every line
    exactly once. With ``types``, resources of other known types are skipped (before decoding
    when :func:`skippable_line` can tell), and with a :class:`ResourceFilter`, the resources it
    does not keep. With ``head``, resources are only partly decoded, except Medications, which
    are kept whole: with ``types``, most lines into a :class:`_Brief` (type, code, subject;
    the resource is then yielded as just its type and subject), and any line of another shape by
    :func:`decode_head` (enough to find its patient and judge its code). Of the lines
    :meth:`ResourceFilter.outdated` finds in a run of one patient's lines, only the latest of
    each kind is yielded, when the run ends (the others cannot change a result). Bad lines are
    passed to ``report`` and skipped.
    """
    lineno = 0
    keeps = types.keeps if isinstance(types, ResourceFilter) else None
    keeps_brief = types.keeps_brief if isinstance(types, ResourceFilter) else None
    #: per coded type, keeps_brief's table of verdicts by code as written: looked up here, so
    #: that keeps_brief is called only for a code not judged yet (or a panel's parts)
    verdicts: dict[str, dict[bytes, bool | None]] = {}
    outdated = None
    if isinstance(types, ResourceFilter):
        verdicts = types._verdicts
        if types.as_of is not None:
            outdated = types.outdated
    #: of the lines outdated in the current run of one patient's lines, the latest of each kind
    #: (type, code, statuses): yielded when the run ends, the others dropped
    held: dict[tuple[str, bytes], tuple[str, int, dict[str, Any], bytes]] = {}
    held_ref = ""
    brief = _DECODE_BRIEF if head and types is not None else None
    # what the previous line's type and subject came to: an export's file holds one type, and
    # its lines come a patient at a time
    last_type: str | None = None
    routable = wanted = False
    table: dict[bytes, bool | None] | None = None
    last_ref = ""
    last_pid = ""
    try:
        with _open_binary(path) as fh:
            if start > 0:
                fh.seek(start - 1)
                if fh.read(1) != b"\n":
                    start += len(fh.readline())  # the line in progress belongs to the range before
            for line in fh if end is None else _lines_before(fh, start, end):
                lineno += 1
                if brief is not None:
                    # the common line: a resource of a patient, read only as far as needed (JSON
                    # allows the line's own whitespace around it; a blank line fails here)
                    try:
                        short = brief(line)
                    except msgspec.DecodeError:
                        short = None  # another shape: read below
                    if short is not None:
                        btype = short.resourceType
                        if btype != last_type:
                            last_type = btype
                            routable = btype is not None and btype in _ROUTABLE
                            wanted = routable and btype in types  # type: ignore[operator]
                            table = verdicts.get(btype) if btype is not None else None
                        subject = short.subject
                        if routable and subject is not None:
                            ref = subject.reference
                            if ref is not None and ref != last_ref:
                                last_ref = ref
                                last_pid = _patient_of(ref)
                        else:
                            ref = None
                    if short is not None and ref is not None and last_pid:
                        if not wanted:
                            continue
                        assert btype is not None  # routable: this line's type, last_type
                        code = b""
                        kept: object = True  # or False, None: keeps_brief's verdict
                        if table is not None:
                            code = bytes(short.code)
                            kept = table.get(code, _UNJUDGED)
                            if kept is _UNJUDGED or (kept is False and short.component):
                                kept = keeps_brief(short)  # type: ignore[misc]
                        if kept is False:
                            continue
                        if kept is True:
                            routed = {"resourceType": btype, "subject": {"reference": ref}}
                            body = line.strip()
                            if outdated is not None:
                                if ref != held_ref:
                                    for _when, n, r, b in held.values():
                                        yield n, r, b
                                    held.clear()
                                    held_ref = ref
                                found = None if table is None else outdated(short, body, code)
                                if found is not None:
                                    kind = (btype, found[0])
                                    had = held.get(kind)
                                    if had is None or found[1] > had[0]:
                                        held[kind] = (found[1], lineno, routed, body)
                                    continue
                            yield lineno, routed, body
                            continue
                body = line.strip()
                if not body:
                    continue
                # whatever the line holds (a list, a string ...): decoded JSON is not typed here
                res: Any
                if head:
                    try:
                        res = decode_head(body)
                        if res["resourceType"] == "Medication":
                            res = decode_json(body)
                    except msgspec.DecodeError:
                        res = None  # not an object, or malformed: judged below
                    except (ValueError, RecursionError):  # a Medication line fully decoded
                        res = None
                    if res is not None:
                        rtype = res.get("resourceType")
                        if not isinstance(rtype, str):
                            report(lineno, "is not a FHIR resource; skipped")
                        elif types is None or rtype not in RESOURCE_TYPES:
                            yield lineno, res, body
                        elif rtype in types and (keeps is None or keeps(res)):
                            yield lineno, res, body
                        continue
                if types is not None and skippable_line(body, types):
                    continue
                try:
                    res = decode_json(body)
                except UnicodeDecodeError as exc:
                    report(lineno, f"{unicode_problem(exc)}; line skipped")
                    continue
                except json.JSONDecodeError:
                    report(lineno, "is not valid JSON; line skipped")
                    continue
                except RecursionError:
                    report(lineno, "is nested too deeply; skipped")
                    continue
                if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
                    report(lineno, "is not a FHIR resource; skipped")
                    continue
                rtype = res["resourceType"]
                if types is not None and _known_type(rtype):
                    if rtype not in types or (keeps is not None and not keeps(res)):
                        continue
                yield lineno, res, body
    except (EOFError, gzip.BadGzipFile, OSError) as exc:
        report(0, f"cannot be read to the end ({type(exc).__name__})")
    for _when, n, r, b in held.values():
        yield n, r, b
    return lineno


def _lines_before(fh: IO[bytes], start: int, end: int) -> Iterator[bytes]:
    """The lines of ``fh`` (positioned at ``start``) that begin before ``end``."""
    pos = start
    while pos < end:
        line = fh.readline()
        if not line:
            return
        pos += len(line)
        yield line


def problem_text(path: Path | str, lineno: int, text: str) -> str:
    """The message for a problem :func:`iter_ndjson_slice` reported."""
    return f"{path}: line {lineno} {text}" if lineno else f"{path}: {text}"


def _iter_ndjson_lines(
    path: Path, problems: list[str], types: frozenset[str] | None = None
) -> Generator[tuple[int, dict[str, Any]], None, None]:
    """Yield ``(line number, resource)`` for each readable line; report the others."""

    def report(lineno: int, text: str) -> None:
        _problem(problems, problem_text(path, lineno, text))

    yield from iter_ndjson_whole(path, report, types)


def iter_ndjson_whole(
    path: Path, report: Report, types: frozenset[str] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, resource)`` for each readable line of ``path`` that ``types`` keeps, the
    resource decoded whole. With ``types``, every line is first read in part, as
    :func:`iter_ndjson_slice` reads it with ``head`` (most only as far as type, code and
    patient), and only the lines kept are decoded whole; a line the whole decode then refuses
    is reported. Without, each line is decoded whole at once."""
    if types is None:
        for lineno, res, _body in iter_ndjson_slice(path, report):
            yield lineno, res
        return
    for lineno, res, body in iter_ndjson_slice(path, report, types=types, head=True):
        if res["resourceType"] == "Medication":
            yield lineno, res  # the partial read keeps Medications whole
            continue
        try:
            whole = decode_json(body)
        except (ValueError, RecursionError) as exc:
            report(lineno, undecodable_problem(exc))
            continue
        yield lineno, whole


def ndjson_is_contiguous(
    paths: Sequence[Path], types: frozenset[str] | None = None
) -> tuple[bool, dict[str, dict[str, Any]]]:
    """Whether each patient's lines in ``paths`` are contiguous (a patient-ordered export), and
    the shared Medications by id. Problems are not reported here (the real read reports them).

    The scan stops at the first patient seen again after another one: a Bulk Data export split by
    resource type is recognised after its Patient file.
    """
    medications: dict[str, dict[str, Any]] = {}
    finished: set[str] = set()
    for path in paths:
        current: str | None = None
        lines = iter_ndjson_slice(path, lambda _n, _t: None, types=types, head=True)
        for _lineno, res, _body in lines:
            if res["resourceType"] in SHARED_TYPES:
                if res["resourceType"] == "Medication" and isinstance(res.get("id"), str):
                    medications[res["id"]] = res
                continue
            pid = patient_reference_of(res)
            if pid is None or pid == current:
                continue
            if pid in finished:
                lines.close()
                return False, medications
            if current is not None:
                finished.add(current)
            current = pid
        if current is not None:
            finished.add(current)
    return True, medications


def iter_contiguous_ndjson(
    paths: Sequence[Path],
    problems: list[str],
    medications: dict[str, dict[str, Any]],
    types: frozenset[str] | None = None,
) -> Iterator[PatientRecord]:
    """Stream the records of patient-ordered NDJSON files, one patient at a time (unchecked)."""
    for path in paths:
        rec: PatientRecord | None = None
        for lineno, res in _iter_ndjson_lines(path, problems, types):
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


def _ndjson_patient(
    res: dict[str, Any], path: Path, lineno: int, problems: list[str]
) -> str | None:
    return ndjson_patient(
        res, lineno, lambda n, text: _problem(problems, problem_text(path, n, text))
    )


def ndjson_patient(res: dict[str, Any], lineno: int, report: Report) -> str | None:
    """The patient of an NDJSON resource; None for shared resources and (reported) orphans."""
    if res["resourceType"] in SHARED_TYPES:
        return None
    pid = patient_reference_of(res)
    if pid is None:
        report(lineno, f"({_describe(res)}) has no patient reference")
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
