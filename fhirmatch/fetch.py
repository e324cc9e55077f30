"""Fetch exactly the patient data a set of trials needs, in few requests.

:func:`fetch_patient_data` turns the trials' data requirements
(:class:`fhirmatch.model.DataInput`) into a handful of searches:

* Patients: ``Patient?_id=a,b,c`` per chunk of ids.
* Per resource type and chunk of patients: ONE search ``patient=a,b,c`` with every required code
  OR-ed in one token list (``code=sys|c1,sys|c2``). Very long code lists are split into several
  searches; a query still longer than the client's limit goes out as ``POST _search``.
* A lower date bound (``date=ge…``) from the widest look-back window, for event types whose date
  a look-back refers to (Observation, Procedure, …). Conditions and prescriptions are not bounded:
  an old Condition or prescription may still be current, and that is the engine's call.
* ``since`` adds ``_lastUpdated=ge…`` for incremental runs.
* Medications: a MedicationRequest/-Statement/-Administration names its drug either inline
  (``medicationCodeableConcept``, found by ``code=``) or as ``medicationReference`` to a
  Medication resource, which a ``code=`` search does not see. By default (``medication_refs``)
  the medication types are therefore searched by patient only, with
  ``_include=<Type>:medication``, and filtered here on either form; the referenced Medication
  resources are returned with the patient's data so the engine can resolve the reference.

Resources stay plain dicts; nothing is validated with pydantic here.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from .client import FhirClient, SearchResult
from .errors import FatalNetworkError, NetworkError
from .model import DataInput

__all__ = ["DATE_PARAMS", "MEDICATION_TYPES", "FetchResult", "fetch_patient_data"]

log = logging.getLogger(__name__)

#: Search parameter that bounds a look-back window, per resource type (event-like types only).
DATE_PARAMS: dict[str, str] = {
    "Observation": "date",
    "Procedure": "date",
    "DiagnosticReport": "date",
    "Encounter": "date",
    "Immunization": "date",
    "MedicationAdministration": "effective-time",
    "MedicationDispense": "whenhandedover",
}

MEDICATION_TYPES = frozenset(
    {"MedicationRequest", "MedicationStatement", "MedicationAdministration", "MedicationDispense"}
)
#: fhirmatch's own code systems in a requirement's codes (ingredients named by a ValueSet, names
#: looked for in a medication's text): no server holds them, so they are never sent
_INTERNAL_SYSTEMS = frozenset(
    {
        "https://fhirmatch.dev/fhir/CodeSystem/medication-ingredient",
        "https://fhirmatch.dev/fhir/CodeSystem/medication-name",
    }
)
_NAME_SYSTEM = "https://fhirmatch.dev/fhir/CodeSystem/medication-name"


@dataclass
class FetchResult:
    """Resources per requested patient id (the Patient first), request count and errors.

    ``errors`` maps a patient id to the problems met fetching its data (a missing Patient, a
    failed search); a patient with errors may have incomplete data and should not be screened
    as if complete.
    """

    resources: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    requests: int = 0
    errors: dict[str, list[str]] = field(default_factory=dict)

    def add_error(self, patient_id: str, message: str) -> None:
        self.errors.setdefault(patient_id, []).append(message)


@dataclass
class _TypePlan:
    rtype: str
    codes: set[tuple[str, str]] | None  # None: every resource of the type
    lookback_days: int | None  # None: no date bound
    medication: bool = False


#: code systems whose value sets name a category for all its descendants (``C15`` is-a): a
#: server's exact-match token search cannot express that, so such types are fetched whole
HIERARCHICAL_SYSTEMS = frozenset(
    {"http://hl7.org/fhir/sid/icd-10-cm", "http://hl7.org/fhir/sid/icd-10"}
)


def _plans(requirements: Iterable[DataInput]) -> list[_TypePlan]:
    plans: dict[str, _TypePlan] = {}
    for req in requirements:
        if req.resource_type == "Patient":
            continue
        codes = set(req.codes) if req.codes else None
        if codes and any(system in HIERARCHICAL_SYSTEMS for system, _ in codes):
            codes = None  # the patient's whole list; the engine matches descendants
        if req.text_systems:
            codes = None  # diagnoses recorded as text have no code to search by
        plan = plans.get(req.resource_type)
        if plan is None:
            plans[req.resource_type] = _TypePlan(
                req.resource_type,
                codes,
                req.lookback_days,
                medication=req.code_path == "medication" or req.resource_type in MEDICATION_TYPES,
            )
            continue
        if plan.codes is None or codes is None:
            plan.codes = None
        else:
            plan.codes |= codes
        if plan.lookback_days is None or req.lookback_days is None:
            plan.lookback_days = None
        else:
            plan.lookback_days = max(plan.lookback_days, req.lookback_days)
        plan.medication = plan.medication or req.code_path == "medication"
    return sorted(plans.values(), key=lambda p: p.rtype)


def _chunks(items: Sequence[str], size: int) -> list[list[str]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def _token(system: str, code: str) -> str:
    # Commas, pipes and dollars inside a token value are escaped with a backslash (FHIR search).
    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace(",", "\\,").replace("|", "\\|").replace("$", "\\$")

    return f"{esc(system)}|{esc(code)}" if system else esc(code)


def _patient_of(resource: dict[str, Any]) -> str | None:
    for key in ("subject", "patient"):
        ref = (resource.get(key) or {}).get("reference")
        if isinstance(ref, str) and "Patient/" in ref:
            tail = ref.split("Patient/", 1)[1]
            return tail.split("/", 1)[0] or None
    return None


def _codings_match(concept: Any, codes: set[tuple[str, str]]) -> bool:
    """Whether a medication's CodeableConcept has one of ``codes``, or names one of the medicine
    names among them in its text or a coding's display."""
    if not isinstance(concept, dict):
        return False
    codings = [c for c in concept.get("coding") or [] if isinstance(c, dict)]
    if any((c.get("system", ""), c.get("code", "")) in codes for c in codings):
        return True
    names = [code for system, code in codes if system == _NAME_SYSTEM]
    if not names:
        return False
    texts = [concept.get("text"), *(c.get("display") for c in codings)]
    words = " ".join(t.lower() for t in texts if isinstance(t, str))
    return any(n in words for n in names)


def fetch_patient_data(
    client: FhirClient,
    patient_ids: Iterable[str],
    requirements: Iterable[DataInput],
    *,
    since: str | dt.datetime | None = None,
    as_of: dt.date | dt.datetime | None = None,
    chunk_size: int = 50,
    page_size: int = 500,
    max_codes_per_search: int = 100,
    medication_refs: bool = True,
    executor: Executor | None = None,
) -> FetchResult:
    """Fetch the Patients and the resources ``requirements`` ask for, grouped by patient id.

    ``as_of`` (default: today, UTC) anchors the look-back windows; ``since`` restricts every
    search to resources updated at or after it (``_lastUpdated=ge…``). Failures are recorded per
    patient in ``FetchResult.errors`` rather than raised, except for authentication failures,
    which would fail every request alike.

    ``executor`` (a thread pool sharing ``client``) sends the per-type searches concurrently;
    their answers are still added in the order the searches are listed, so each patient's
    resources come out in the same order as without it.
    """
    ids = list(dict.fromkeys(str(p) for p in patient_ids))
    if chunk_size < 1 or page_size < 1 or max_codes_per_search < 1:
        raise ValueError("chunk_size, page_size and max_codes_per_search must be positive")
    start_requests = client.stats.requests
    result = FetchResult()
    if isinstance(as_of, dt.datetime):
        as_of_date = as_of.date()
    elif isinstance(as_of, dt.date):
        as_of_date = as_of
    else:
        as_of_date = dt.datetime.now(dt.UTC).date()
    since_text = since.isoformat() if isinstance(since, dt.datetime) else since
    seen: dict[str, set[tuple[str, str]]] = {}

    def add(pid: str, resource: dict[str, Any]) -> None:
        key = (str(resource.get("resourceType")), str(resource.get("id")))
        if key not in seen.setdefault(pid, set()):
            seen[pid].add(key)
            result.resources.setdefault(pid, []).append(resource)

    # 1. the Patients
    def read_patients(chunk: list[str]) -> list[dict[str, Any]] | NetworkError:
        params = [("_id", ",".join(chunk)), ("_count", str(len(chunk)))]
        try:
            return list(client.iter_resources("Patient", params))
        except NetworkError as exc:
            _raise_if_auth(exc)
            return exc

    found: list[str] = []
    id_chunks = _chunks(ids, chunk_size)
    pool_map = executor.map if executor is not None else map
    for chunk, patients in zip(id_chunks, pool_map(read_patients, id_chunks), strict=True):
        if isinstance(patients, NetworkError):
            for pid in chunk:
                result.add_error(pid, f"Patient search failed: {patients}")
            continue
        got = {str(p.get("id")): p for p in patients}
        for pid in chunk:
            if pid in got:
                add(pid, got[pid])
                found.append(pid)
            else:
                result.add_error(pid, "Patient not found")

    # 2. one search per resource type and chunk of patients (and chunk of codes)
    searches: list[_Search] = []
    for plan in _plans(requirements):
        by_ref = plan.medication and medication_refs and plan.rtype in MEDICATION_TYPES
        base: list[tuple[str, str]] = [("_count", str(page_size))]
        if plan.lookback_days is not None and plan.rtype in DATE_PARAMS:
            lower = as_of_date - dt.timedelta(days=plan.lookback_days)
            base.append((DATE_PARAMS[plan.rtype], f"ge{lower.isoformat()}"))
        if since_text:
            base.append(("_lastUpdated", f"ge{since_text}"))
        code_groups: list[list[str] | None]
        if plan.codes is None or by_ref:
            code_groups = [None]
        else:
            tokens = sorted(_token(s, c) for s, c in plan.codes if s not in _INTERNAL_SYSTEMS)
            code_groups = list(_chunks(tokens, max_codes_per_search))
        if by_ref:
            base.append(("_include", f"{plan.rtype}:medication"))
        for chunk in _chunks(found, chunk_size):
            for group in code_groups:
                params = [("patient", ",".join(chunk)), *base]
                if group is not None:
                    params.append(("code", ",".join(group)))
                searches.append(_Search(plan, params, chunk, by_ref))

    def send(search: _Search) -> list[tuple[_Search, SearchResult | NetworkError]]:
        return _send(client, search)

    for answer in pool_map(send, searches):
        for search, found_or_error in answer:
            _take(search, found_or_error, add, result)

    result.requests = client.stats.requests - start_requests
    log.debug(
        "fetched data for %d patient(s) in %d request(s); %d with errors",
        len(ids),
        result.requests,
        len(result.errors),
    )
    return result


def _raise_if_auth(exc: NetworkError) -> None:
    if exc.status in (401, 403):
        raise exc


@dataclass(frozen=True)
class _Search:
    plan: _TypePlan
    params: list[tuple[str, str]]
    chunk: list[str]
    by_ref: bool


def _send(client: FhirClient, search: _Search) -> list[tuple[_Search, SearchResult | NetworkError]]:
    """Run one search (one per patient when the server refuses the patient list); a failure
    is returned, not raised, except an authentication failure."""
    try:
        return [(search, client.search_all(search.plan.rtype, search.params))]
    except FatalNetworkError as exc:
        _raise_if_auth(exc)
        if exc.status == 400 and len(search.chunk) > 1:
            # Some servers refuse a comma list on a reference parameter: one patient at a time.
            log.info(
                "%s: multi-patient search refused (400); searching per patient", search.plan.rtype
            )
            out: list[tuple[_Search, SearchResult | NetworkError]] = []
            for pid in search.chunk:
                single = [(k, pid if k == "patient" else v) for k, v in search.params]
                out += _send(client, _Search(search.plan, single, [pid], search.by_ref))
            return out
        return [(search, exc)]
    except NetworkError as exc:
        return [(search, exc)]


def _take(
    search: _Search,
    found: SearchResult | NetworkError,
    add: Callable[[str, dict[str, Any]], None],
    result: FetchResult,
) -> None:
    """Add one search's matches to their patients (or record its failure for each of them)."""
    plan, chunk, by_ref = search.plan, search.chunk, search.by_ref
    if isinstance(found, NetworkError):
        for pid in chunk:
            result.add_error(pid, f"{plan.rtype} search failed: {found}")
        return
    wanted = set(chunk)
    medications: dict[str, dict[str, Any]] = {}
    if by_ref:
        for inc in found.included:
            if inc.get("resourceType") == "Medication" and inc.get("id"):
                medications[f"Medication/{inc['id']}"] = inc
    for resource in found.matches:
        owner = _patient_of(resource)
        if owner is None or owner not in wanted:
            continue
        if not by_ref:
            add(owner, resource)
            continue
        concept, medication = _medication_of(resource, medications)
        if plan.codes is not None and not _codings_match(concept, plan.codes):
            continue
        add(owner, resource)
        if medication is not None:
            add(owner, medication)


def _medication_of(
    resource: dict[str, Any], medications: dict[str, dict[str, Any]]
) -> tuple[Any, dict[str, Any] | None]:
    """The drug's CodeableConcept and, for a reference to a separate Medication, that resource.

    Handles ``medicationCodeableConcept``, a contained Medication (``#id``) and a reference to
    an included Medication (relative or absolute).
    """
    ref = (resource.get("medicationReference") or {}).get("reference")
    if not isinstance(ref, str):
        return resource.get("medicationCodeableConcept"), None
    if ref.startswith("#"):
        for contained in resource.get("contained") or []:
            if contained.get("resourceType") == "Medication" and contained.get("id") == ref[1:]:
                return contained.get("code"), None
        return None, None
    medication = medications.get("/".join(ref.rstrip("/").split("/")[-2:]))
    return (medication.get("code") if medication else None), medication
