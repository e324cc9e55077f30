"""Write-back: record screening results as ResearchSubject + Provenance, idempotently.

For each (study, patient) pair fhirmatch owns at most one ResearchSubject, found by a
deterministic identifier (system :data:`SUBJECT_IDENTIFIER_SYSTEM`, value a UUID5 of the pair).
The decision for each pair (:func:`plan_subject`) is:

=====================  =================================  ======================================
what the server has     new status                          action
=====================  =================================  ======================================
nothing                 in ``write`` (candidate, potential)  create (conditional, ``ifNoneExist``)
nothing                 not in ``write``                      nothing
ours, same assessment   any                                   nothing ("unchanged")
ours, changed           any                                   update with ``If-Match`` its version
advanced by a person    any                                   nothing, ever ("advanced")
=====================  =================================  ======================================

"Ours" means the subject's current status is the one fhirmatch last wrote (recorded in the
assessment extension); any other status was set by a person — screening, on-study, or a
coordinator's own ``ineligible`` — and fhirmatch never touches it again.

The explanation travels with the subject: the :data:`EXT_ASSESSMENT` extension holds the trial
status, the as-of date and every criterion's outcome, reason and evidence (format in
``docs/writeback.md``), and a Provenance names the PlanDefinition and every evidence resource,
with the fhirmatch Device as agent. One transaction per patient carries the Device (conditional
create), the subjects and their Provenance, so a failure leaves nothing half-written. Every entry
of a transaction that creates subjects is safe to resend (conditional creates, and the Provenance
written with ``PUT`` to a deterministic id, :func:`provenance_id`), so a lost answer is simply
resent; an update carries ``If-Match`` and is re-planned from what the server holds instead.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Literal

from . import __version__
from .model import EXT_BASE
from .results import CriterionResult, TrialResult

SUBJECT_IDENTIFIER_SYSTEM = "https://fhirmatch.dev/fhir/sid/research-subject"
DEVICE_IDENTIFIER_SYSTEM = "https://fhirmatch.dev/fhir/sid/device"
EXT_ASSESSMENT = f"{EXT_BASE}/eligibility-assessment"
#: R5's required binding (ValueSet research-subject-state) takes the code system from
#: terminology.hl7.org, not hl7.org/fhir
R5_SUBJECT_STATE = "http://terminology.hl7.org/CodeSystem/research-subject-state"
R5_SUBJECT_STATE_TYPE = "http://terminology.hl7.org/CodeSystem/research-subject-state-type"
_NAMESPACE = uuid.UUID("6f1c3a52-6d0e-4b8e-9f61-3c1b2f4f7a10")

#: fhirmatch trial status -> ResearchSubject status (R4 ``status``, R5 ``progress.subjectState``)
SUBJECT_STATUS = {
    "eligible": "candidate",
    "insufficient-data": "potential-candidate",
    "ineligible": "ineligible",
}
DEFAULT_WRITE = frozenset({"candidate", "potential-candidate"})

Action = Literal["create", "update", "unchanged", "advanced", "not-written"]
FhirVersion = Literal["R4", "R5"]


def subject_identifier(study: str, patient: str) -> str:
    """The deterministic identifier value of the (study, patient) ResearchSubject."""
    return str(uuid.uuid5(_NAMESPACE, f"{study}|{patient}"))


def device_resource(version: FhirVersion = "R4") -> dict[str, Any]:
    """The Device that stands for this fhirmatch version as Provenance agent (R5 renamed
    ``deviceName`` to ``name`` and made ``type`` a list)."""
    kind = {"text": "clinical trial eligibility screening software"}
    device: dict[str, Any] = {
        "resourceType": "Device",
        "identifier": [{"system": DEVICE_IDENTIFIER_SYSTEM, "value": f"fhirmatch-{__version__}"}],
        "status": "active",
    }
    if version == "R5":
        device["name"] = [{"value": "fhirmatch", "type": "user-friendly-name"}]
        device["version"] = [{"value": __version__}]
        device["type"] = [kind]
    else:
        device["deviceName"] = [{"name": "fhirmatch", "type": "manufacturer-name"}]
        device["version"] = [{"value": __version__}]
        device["type"] = kind
    return device


def _flatten(
    criteria: Sequence[CriterionResult], parent: str | None = None
) -> Iterable[tuple[CriterionResult, str | None]]:
    for c in criteria:
        yield c, parent
        yield from _flatten(c.criteria, c.id)


def assessment_digest(result: TrialResult) -> str:
    """A digest of what the assessment decided (status, outcomes, evidence), not of its wording
    or date, so a daily run with the same findings writes nothing."""
    items = [(c.id, c.outcome, sorted(c.evidence)) for c, _ in _flatten(result.criteria)]
    blob = json.dumps([result.status, items], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def assessment_extension(
    result: TrialResult, as_of: date, plan_definition: str | None, written_status: str
) -> dict[str, Any]:
    """The documented ``eligibility-assessment`` extension (see ``docs/writeback.md``)."""
    ext: list[dict[str, Any]] = [
        {"url": "status", "valueCode": result.status},
        {"url": "writtenStatus", "valueCode": written_status},
        {"url": "asOf", "valueDate": as_of.isoformat()},
        {"url": "digest", "valueString": assessment_digest(result)},
        {"url": "software", "valueString": f"fhirmatch {__version__}"},
    ]
    if plan_definition:
        ext.append({"url": "planDefinition", "valueReference": {"reference": plan_definition}})
    for c, parent in _flatten(result.criteria):
        sub: list[dict[str, Any]] = [
            {"url": "id", "valueString": c.id},
            {"url": "kind", "valueCode": c.kind},
            {"url": "outcome", "valueCode": c.outcome},
        ]
        if parent:
            sub.append({"url": "parent", "valueString": parent})
        if c.reason:
            sub.append({"url": "reason", "valueString": c.reason})
        sub.extend({"url": "evidence", "valueReference": {"reference": r}} for r in c.evidence)
        ext.append({"url": "criterion", "extension": sub})
    return {"url": EXT_ASSESSMENT, "extension": ext}


def _ext_value(resource: dict[str, Any], name: str) -> Any:
    for ext in resource.get("extension", []):
        if ext.get("url") == EXT_ASSESSMENT:
            for sub in ext.get("extension", []):
                if sub.get("url") == name:
                    for key, value in sub.items():
                        if key.startswith("value"):
                            return value
    return None


def current_status(resource: dict[str, Any]) -> str | None:
    """The subject's status as the server holds it: R4 ``status``, or R5's latest
    ``progress[].subjectState`` code."""
    progress = resource.get("progress")
    if isinstance(progress, list) and progress:
        for step in reversed(progress):
            for coding in (step.get("subjectState") or {}).get("coding", []):
                if coding.get("code"):
                    return str(coding["code"])
    status = resource.get("status")
    return str(status) if status else None


@dataclass
class PlannedWrite:
    """What write-back will do (or did, or would do under ``--dry-run``) for one pair."""

    study: str
    patient: str
    trial_status: str
    action: Action
    subject_status: str | None = None
    reason: str = ""
    subject: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None
    existing_id: str | None = None
    existing_version: str | None = None
    #: the evidence references, for the Provenance entities
    evidence: list[str] = field(default_factory=list)


def _subject_resource(
    result: TrialResult,
    subject_status: str,
    as_of: date,
    plan_definition: str | None,
    version: FhirVersion,
    existing_id: str | None,
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "ResearchSubject",
        "identifier": [
            {
                "system": SUBJECT_IDENTIFIER_SYSTEM,
                "value": subject_identifier(result.study, result.patient),
            }
        ],
        "study": {"reference": result.study},
        "extension": [assessment_extension(result, as_of, plan_definition, subject_status)],
    }
    if existing_id:
        res["id"] = existing_id
    if version == "R5":
        res["status"] = "active"
        res["subject"] = {"reference": result.patient}
        res["progress"] = [
            {
                "type": {
                    "coding": [
                        {
                            "system": R5_SUBJECT_STATE_TYPE,
                            "code": "Enrollment",
                        }
                    ]
                },
                "subjectState": {"coding": [{"system": R5_SUBJECT_STATE, "code": subject_status}]},
                "startDate": as_of.isoformat(),
            }
        ]
    else:
        res["status"] = subject_status
        res["individual"] = {"reference": result.patient}
        res["period"] = {"start": as_of.isoformat()}
    return res


def _evidence(result: TrialResult) -> list[str]:
    seen: dict[str, None] = {}
    for c, _ in _flatten(result.criteria):
        for ref in c.evidence:
            seen.setdefault(ref, None)
    return list(seen)


def plan_subject(
    result: TrialResult,
    existing: dict[str, Any] | None,
    *,
    as_of: date,
    plan_definition: str | None = None,
    write: frozenset[str] = DEFAULT_WRITE,
    version: FhirVersion = "R4",
) -> PlannedWrite:
    """Decide what to do for one (study, patient) pair; see the module docstring's table."""
    new_status = SUBJECT_STATUS[result.status]
    plan = PlannedWrite(
        study=result.study,
        patient=result.patient,
        trial_status=result.status,
        action="not-written",
        subject_status=new_status,
        evidence=_evidence(result),
    )
    if existing is None:
        if new_status not in write:
            plan.reason = f"status {result.status} is not written (--write)"
            return plan
        plan.action = "create"
    else:
        plan.existing_id = existing.get("id")
        plan.existing_version = (existing.get("meta") or {}).get("versionId")
        held = current_status(existing)
        written = _ext_value(existing, "writtenStatus")
        if written is None or held != written:
            plan.action = "advanced"
            plan.reason = f"status {held!r} was set by a person; left as it is"
            return plan
        if _ext_value(existing, "digest") == assessment_digest(result):
            plan.action = "unchanged"
            plan.reason = "assessment unchanged"
            return plan
        plan.action = "update"
    plan.subject = _subject_resource(
        result, new_status, as_of, plan_definition, version, plan.existing_id
    )
    return plan


def provenance_resource(
    plan: PlannedWrite,
    target: str,
    plan_definition: str | None,
    device: str,
    version: FhirVersion = "R4",
) -> dict[str, Any]:
    """The Provenance of one write: the Device as assembler, the PlanDefinition and the evidence
    as sources. R5 renamed ``reason`` (the purpose of use) to ``authorization``."""
    entities = []
    if plan_definition:
        entities.append({"role": "source", "what": {"reference": plan_definition}})
    entities.extend({"role": "source", "what": {"reference": ref}} for ref in plan.evidence)
    prov: dict[str, Any] = {
        "resourceType": "Provenance",
        "target": [{"reference": target}],
        "recorded": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "activity": {"text": f"eligibility screening: {plan.trial_status}"},
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "assembler",
                        }
                    ]
                },
                "who": {"reference": device},
            }
        ],
    }
    if version == "R5":
        prov["authorization"] = [{"concept": {"text": "clinical trial eligibility screening"}}]
    else:
        prov["reason"] = [{"text": "clinical trial eligibility screening"}]
    if entities:
        prov["entity"] = entities
    return prov


def transaction_for(
    plans: Sequence[PlannedWrite],
    plan_definitions: dict[str, str | None],
    version: FhirVersion = "R4",
) -> dict[str, Any] | None:
    """One transaction Bundle writing every create/update in ``plans`` (one patient's), each
    ResearchSubject with its Provenance, and the Device conditionally; None if nothing to write."""
    writes = [p for p in plans if p.action in ("create", "update") and p.subject]
    if not writes:
        return None
    device = device_resource(version)
    device_url = f"urn:uuid:{uuid.uuid4()}"
    ident = device["identifier"][0]
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": device_url,
            "resource": device,
            "request": {
                "method": "POST",
                "url": "Device",
                "ifNoneExist": f"identifier={ident['system']}|{ident['value']}",
            },
        }
    ]
    for plan in writes:
        assert plan.subject is not None
        pd = plan_definitions.get(plan.study)
        if plan.action == "create":
            target = f"urn:uuid:{uuid.uuid4()}"
            value = plan.subject["identifier"][0]["value"]
            request: dict[str, Any] = {
                "method": "POST",
                "url": "ResearchSubject",
                "ifNoneExist": f"identifier={SUBJECT_IDENTIFIER_SYSTEM}|{value}",
            }
            entries.append({"fullUrl": target, "resource": plan.subject, "request": request})
        else:
            target = f"ResearchSubject/{plan.existing_id}"
            request = {"method": "PUT", "url": target}
            if plan.existing_version:
                request["ifMatch"] = f'W/"{plan.existing_version}"'
            entries.append({"resource": plan.subject, "request": request})
        plan.provenance = provenance_resource(plan, target, pd, device_url, version)
        plan.provenance["id"] = provenance_id(plan)
        entries.append(
            {
                "resource": plan.provenance,
                "request": {"method": "PUT", "url": f"Provenance/{plan.provenance['id']}"},
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def provenance_id(plan: PlannedWrite) -> str:
    """The Provenance's deterministic id: a UUID5 of the subject's identifier, the version the
    write starts from (none for a create), the assessment's digest and its as-of date.

    Written with ``PUT Provenance/[id]``, so every entry of a write-back transaction is safe to
    resend: a resend after a lost answer rewrites the same Provenance instead of adding a
    second one, while each later change of the subject (a new starting version) gets its own.
    """
    assert plan.subject is not None
    key = "|".join(
        [
            "provenance",
            subject_identifier(plan.study, plan.patient),
            f"from {plan.existing_version}" if plan.action == "update" else "new",
            str(_ext_value(plan.subject, "digest")),
            str(_ext_value(plan.subject, "asOf")),
        ]
    )
    return str(uuid.uuid5(_NAMESPACE, key))
