"""Import a trial: a ClinicalTrials.gov API v2 study record, or a plain-text eligibility section,
becomes one trial Bundle (ResearchStudy + PlanDefinition) with drafted computable criteria.

* :func:`read_records` reads a JSON file holding one study object or a page with ``studies``;
* :func:`study_bundle` turns one record into a Bundle: the ResearchStudy carries the NCT id,
  identifiers, titles, phase, status, conditions, arms and interventions, sponsor and enrollment;
  the PlanDefinition one action per criterion bullet (wording verbatim, nested bullets as groups)
  drafted by :mod:`fhirmatch.drafting`, plus actions for the record's structured minimum/maximum
  age and sex;
* :func:`text_bundle` does the same for eligibility text with a given id;
* :func:`skeleton_bundle` is the example Bundle of ``fhirmatch trials new``.

Output is deterministic: the same input gives a byte-identical Bundle (:func:`dump_bundle`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .criteria_text import Section, split_criteria
from .drafting import (
    ActionIds,
    draft_actions,
    drafted_extension,
    drafted_value_sets,
    duration,
    kind_code,
    observation_input,
)
from .errors import ConfigurationError
from .model import (
    CS_CRITERION_KIND,
    EXT_BASE,
    EXT_DEFINITION_INCOMPLETE,
    EXT_MANUAL_REVIEW,
    VS_BASE,
)
from .trials import EXT_NOTE

__all__ = [
    "CTGOV_SYSTEM",
    "LOCAL_SYSTEM",
    "dump_bundle",
    "read_records",
    "skeleton_bundle",
    "study_bundle",
    "text_bundle",
]

CTGOV_SYSTEM = "https://clinicaltrials.gov"
LOCAL_SYSTEM = "https://fhirmatch.dev/fhir/sid/local-trial-id"
PLAN_BASE = "https://fhirmatch.dev/fhir/PlanDefinition"
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_NCT = re.compile(r"^NCT\d{8}$")

#: ClinicalTrials.gov overallStatus → R4 ResearchStudy.status
STATUS_MAP = {
    "RECRUITING": "active",
    "ENROLLING_BY_INVITATION": "active",
    "NOT_YET_RECRUITING": "approved",
    "ACTIVE_NOT_RECRUITING": "closed-to-accrual",
    "SUSPENDED": "temporarily-closed-to-accrual",
    "TEMPORARILY_NOT_AVAILABLE": "temporarily-closed-to-accrual",
    "COMPLETED": "completed",
    "TERMINATED": "administratively-completed",
    "WITHDRAWN": "withdrawn",
    "WITHHELD": "in-review",
    "NO_LONGER_AVAILABLE": "closed-to-accrual",
    "AVAILABLE": "active",
    "APPROVED_FOR_MARKETING": "completed",
    "UNKNOWN": "in-review",
}
#: ClinicalTrials.gov phases → R4 research-study-phase
PHASE_MAP = {
    ("NA",): "n-a",
    ("EARLY_PHASE1",): "early-phase-1",
    ("PHASE1",): "phase-1",
    ("PHASE1", "PHASE2"): "phase-1-phase-2",
    ("PHASE2",): "phase-2",
    ("PHASE2", "PHASE3"): "phase-2-phase-3",
    ("PHASE3",): "phase-3",
    ("PHASE4",): "phase-4",
}
PHASE_SYSTEM = "http://terminology.hl7.org/CodeSystem/research-study-phase"


#: the ValueSets of a registry record's sex restriction (``eligibilityModule.sex``)
GENDER_VALUE_SETS = {
    "female": f"{VS_BASE}/administrative-gender-female",
    "male": f"{VS_BASE}/administrative-gender-male",
}


def imported_value_sets() -> frozenset[str]:
    """Canonical URLs of the ValueSets a criterion ``trials import`` drafts may name."""
    return drafted_value_sets() | frozenset(GENDER_VALUE_SETS.values())


def dump_bundle(bundle: dict[str, Any]) -> str:
    """The Bundle as the JSON text written to disk (stable: same Bundle, same bytes)."""
    return json.dumps(bundle, indent=2, ensure_ascii=False) + "\n"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The study records in a ClinicalTrials.gov API v2 JSON file (one study, or a page with
    ``studies``). Raises :class:`ConfigurationError` with a one-line reason otherwise."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{path}: cannot read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"{path}: not JSON: {exc}") from exc
    records = doc.get("studies") if isinstance(doc, dict) and "studies" in doc else [doc]
    if not isinstance(records, list) or not records:
        raise ConfigurationError(f"{path}: no study records")
    for i, rec in enumerate(records):
        ident = (
            _get(rec, "protocolSection", "identificationModule") if isinstance(rec, dict) else None
        )
        nct = ident.get("nctId") if isinstance(ident, dict) else None
        if not isinstance(nct, str) or not _NCT.match(nct):
            raise ConfigurationError(
                f"{path}: record {i + 1} is not a ClinicalTrials.gov API v2 study "
                "(protocolSection.identificationModule.nctId missing or not NCT########)"
            )
    return records


def _get(doc: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _citation(nct: str) -> dict[str, Any]:
    return {
        "type": "citation",
        "display": f"ClinicalTrials.gov record {nct}",
        "citation": f"ClinicalTrials.gov {nct}, eligibility criteria",
        "url": f"https://clinicaltrials.gov/study/{nct}",
    }


def study_bundle(record: dict[str, Any]) -> dict[str, Any]:
    """One ClinicalTrials.gov API v2 study record as a trial Bundle with drafted criteria."""
    proto = record.get("protocolSection") or {}
    ident = proto.get("identificationModule") or {}
    nct = str(ident["nctId"])
    status_mod = proto.get("statusModule") or {}
    design = proto.get("designModule") or {}
    sponsor = proto.get("sponsorCollaboratorsModule") or {}
    arms_mod = proto.get("armsInterventionsModule") or {}
    elig = proto.get("eligibilityModule") or {}
    desc = proto.get("descriptionModule") or {}
    conditions = proto.get("conditionsModule") or {}

    identifiers: list[dict[str, Any]] = [{"use": "official", "system": CTGOV_SYSTEM, "value": nct}]
    org_id = _text(_get(ident, "orgStudyIdInfo", "id"))
    if org_id:
        identifiers.append(
            {
                "use": "secondary",
                "type": {"text": "Organization study id"},
                "value": org_id,
                **(
                    {"assigner": {"display": org}}
                    if (org := _text(_get(ident, "organization", "fullName")))
                    else {}
                ),
            }
        )
    for sec in ident.get("secondaryIdInfos") or []:
        value = _text(sec.get("id")) if isinstance(sec, dict) else None
        if value:
            label = " ".join(str(sec.get(k)) for k in ("type", "domain") if _text(sec.get(k)))
            identifiers.append(
                {"use": "secondary", **({"type": {"text": label}} if label else {}), "value": value}
            )
    brief = _text(ident.get("briefTitle"))
    official = _text(ident.get("officialTitle"))
    acronym = _text(ident.get("acronym"))
    study: dict[str, Any] = {"resourceType": "ResearchStudy", "id": nct}
    extensions: list[dict[str, Any]] = []
    if official and official != brief:
        extensions.append({"url": f"{EXT_BASE}/official-title", "valueString": official})
    if acronym:
        extensions.append({"url": f"{EXT_BASE}/acronym", "valueString": acronym})
    if extensions:
        study["extension"] = extensions
    study["contained"] = []
    study["identifier"] = identifiers
    study["title"] = brief or official or nct
    study["protocol"] = [{"reference": f"PlanDefinition/{nct}-eligibility"}]
    study["status"] = STATUS_MAP.get(str(status_mod.get("overallStatus") or "UNKNOWN"), "in-review")
    phases = tuple(str(p) for p in design.get("phases") or [])
    if phases in PHASE_MAP:
        code = PHASE_MAP[phases]
        study["phase"] = {
            "coding": [{"system": PHASE_SYSTEM, "code": code}],
            "text": " / ".join(phases),
        }
    purpose = _text(_get(design, "designInfo", "primaryPurpose"))
    if purpose:
        study["primaryPurposeType"] = {"text": purpose.replace("_", " ").lower()}
    focus = [
        {"text": f"{str(i.get('type', '')).replace('_', ' ').title()}: {i['name']}".lstrip(": ")}
        for i in arms_mod.get("interventions") or []
        if isinstance(i, dict) and _text(i.get("name"))
    ]
    if focus:
        study["focus"] = focus
    conds = [{"text": c} for c in conditions.get("conditions") or [] if _text(c)]
    if conds:
        study["condition"] = conds
    keywords = [{"text": k} for k in conditions.get("keywords") or [] if _text(k)]
    if keywords:
        study["keyword"] = keywords
    study["relatedArtifact"] = [_citation(nct)]
    summary = _text(desc.get("briefSummary"))
    if summary:
        study["description"] = summary
    count = _get(design, "enrollmentInfo", "count")
    if isinstance(count, int):
        kind = str(_get(design, "enrollmentInfo", "type") or "")
        study["contained"].append(
            {
                "resourceType": "Group",
                "id": "enrollment",
                "type": "person",
                "actual": kind == "ACTUAL",
                "quantity": count,
                "name": f"Enrollment ({kind.lower() or 'count'})",
            }
        )
        study["enrollment"] = [{"reference": "#enrollment"}]
    if not study["contained"]:
        del study["contained"]
    start = _text(_get(status_mod, "startDateStruct", "date"))
    end = _text(_get(status_mod, "completionDateStruct", "date"))
    if start or end:
        study["period"] = {**({"start": start} if start else {}), **({"end": end} if end else {})}
    lead = _text(_get(sponsor, "leadSponsor", "name"))
    if lead:
        study["sponsor"] = {"display": lead}
    arms = []
    for arm in arms_mod.get("armGroups") or []:
        if not isinstance(arm, dict) or not _text(arm.get("label")):
            continue
        out: dict[str, Any] = {"name": arm["label"]}
        if _text(arm.get("type")):
            out["type"] = {"text": str(arm["type"]).replace("_", " ").lower()}
        parts = [_text(arm.get("description"))]
        names = [n for n in arm.get("interventionNames") or [] if _text(n)]
        if names:
            parts.append("Interventions: " + "; ".join(names) + ".")
        text = " ".join(p for p in parts if p)
        if text:
            out["description"] = text
        arms.append(out)
    if arms:
        study["arm"] = arms

    criteria = str(elig.get("eligibilityCriteria") or "")
    docs = [_citation(nct)]
    actions, missing = _criteria_actions(criteria, docs)
    ids = ActionIds()
    ids.used.update(_all_ids(actions))
    actions = _registry_actions(elig, docs, ids) + actions
    if not actions:
        actions = [_missing_action(docs)]
    plan = _plan(
        nct,
        brief or nct,
        f"Drafted by fhirmatch trials import from the ClinicalTrials.gov record {nct} "
        f"(https://clinicaltrials.gov/study/{nct}); every computable criterion is marked drafted "
        "until a person has reviewed it.",
        actions,
        missing,
    )
    return _bundle(nct, study, plan)


def _all_ids(actions: Sequence[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for a in actions:
        out.append(str(a["id"]))
        out.extend(_all_ids(a.get("action") or []))
    return out


def _criteria_actions(
    text: str, docs: Sequence[dict[str, Any]], default: Section = "inclusion"
) -> tuple[list[dict[str, Any]], list[str]]:
    bullets = split_criteria(text, default)
    missing: list[str] = []
    if not text.strip():
        missing.append("the record has no eligibility criteria text")
    else:
        kinds = {b.kind for b in bullets}
        if "inclusion" not in kinds:
            missing.append("no inclusion criteria were found in the text")
        if "exclusion" not in kinds:
            missing.append("no exclusion criteria were found in the text")
    return draft_actions(bullets, docs), missing


_AGE = re.compile(r"^\s*(\d+)\s*(year|month|week|day)s?\s*$", re.IGNORECASE)


def _registry_actions(
    elig: dict[str, Any], docs: Sequence[dict[str, Any]], ids: ActionIds
) -> list[dict[str, Any]]:
    """Actions for the record's structured minimumAge, maximumAge and sex."""
    out: list[dict[str, Any]] = []
    bounds: list[tuple[str, str, str]] = []
    manual: list[str] = []
    for key, op, label in (
        ("minimumAge", ">=", "Minimum age"),
        ("maximumAge", "<=", "Maximum age"),
    ):
        raw = _text(elig.get(key))
        if raw is None:
            continue
        m = _AGE.match(raw)
        if m and m.group(2).lower() == "year":
            bounds.append((op, m.group(1), f"{label} {raw}"))
        else:
            manual.append(f"{label} {raw}")
    if bounds:
        text = (
            "; ".join(label for _, _, label in bounds) + " (ClinicalTrials.gov eligibility module)"
        )
        expr = " and ".join(f"%age {op} {n}" for op, n, _ in bounds)
        out.append(
            _registry_action(
                ids.take("inc-registry-age"),
                "Age " + ", ".join(f"{'≥' if op == '>=' else '≤'} {n}" for op, n, _ in bounds),
                text,
                expr,
                "age",
                docs,
            )
        )
    if manual:
        text = "; ".join(manual) + " (ClinicalTrials.gov eligibility module)"
        out.append(
            {
                "id": ids.take("inc-registry-age-other"),
                "title": "Age limit in months, weeks or days",
                "description": text,
                "code": kind_code("inclusion"),
                "documentation": list(docs),
                "extension": [
                    {
                        "url": EXT_MANUAL_REVIEW,
                        "valueString": "An age limit below one year: the engine computes age in "
                        "whole years, so a person checks it.",
                    }
                ],
            }
        )
    sex = str(elig.get("sex") or "ALL").upper()
    if sex in ("FEMALE", "MALE"):
        gender = sex.lower()
        other = "male" if gender == "female" else "female"
        text = f"Sex: {sex} (ClinicalTrials.gov eligibility module)"
        # only the other binary value fails: 'other', 'unknown' or no gender is for a person
        sexes = {g: f"%patient.gender.memberOf('{GENDER_VALUE_SETS[g]}')" for g in (gender, other)}
        expr = f"iif({sexes[gender]}, true, iif({sexes[other]}, false, {{}}))"
        out.append(
            _registry_action(ids.take("inc-registry-sex"), f"Sex {gender}", text, expr, "sex", docs)
        )
    return out


def _registry_action(
    aid: str, title: str, text: str, expr: str, rule: str, docs: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "id": aid,
        "title": title,
        "description": text,
        "code": kind_code("inclusion"),
        "documentation": list(docs),
        "extension": [drafted_extension(text.split(" (")[0], rule)],
        "condition": [
            {
                "kind": "applicability",
                "expression": {"language": "text/fhirpath", "expression": expr},
            }
        ],
    }


def _missing_action(docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": "inc-criteria-missing",
        "title": "Eligibility criteria missing",
        "description": "The source gives no eligibility criteria.",
        "code": kind_code("inclusion"),
        **({"documentation": list(docs)} if docs else {}),
        "extension": [
            {
                "url": EXT_MANUAL_REVIEW,
                "valueString": "The source gives no eligibility criteria: add them from the "
                "protocol.",
            }
        ],
    }


def _plan(
    tid: str,
    title: str,
    description: str,
    actions: list[dict[str, Any]],
    missing: Sequence[str],
) -> dict[str, Any]:
    plan: dict[str, Any] = {"resourceType": "PlanDefinition", "id": f"{tid}-eligibility"}
    if missing:
        plan["extension"] = [
            {
                "url": EXT_DEFINITION_INCOMPLETE,
                "valueMarkdown": "Found while importing: "
                + "; ".join(missing)
                + ". Add what is missing from the protocol before screening real patients.",
            }
        ]
    name = "Eligibility" + re.sub(r"[^A-Za-z0-9]", "", tid.title())
    plan.update(
        {
            "url": f"{PLAN_BASE}/{tid}-eligibility",
            "version": "0.1.0",
            "name": name[:1].upper() + name[1:],
            "title": f"Eligibility criteria: {title}",
            "status": "draft",
            "type": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/plan-definition-type",
                        "code": "eca-rule",
                    }
                ]
            },
            "description": description,
            "action": actions,
        }
    )
    return plan


def _bundle(tid: str, study: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "id": f"trial-{tid}",
        "type": "collection",
        "entry": [
            {"fullUrl": f"https://fhirmatch.dev/fhir/ResearchStudy/{tid}", "resource": study},
            {"fullUrl": f"{PLAN_BASE}/{tid}-eligibility", "resource": plan},
        ],
    }


def check_id(tid: str) -> str:
    """``tid`` if it is usable as a FHIR id (and file name), else :class:`ConfigurationError`."""
    if not _ID.match(tid):
        raise ConfigurationError(
            f"trial id {tid!r} is not a FHIR id (letters, digits, '-' and '.', at most 64)"
        )
    return tid


def text_bundle(tid: str, text: str, *, title: str | None = None) -> dict[str, Any]:
    """Eligibility text (``Inclusion Criteria:`` / ``Exclusion Criteria:`` sections, bullets)
    as a trial Bundle with id ``tid`` and drafted criteria."""
    check_id(tid)
    system = CTGOV_SYSTEM if _NCT.match(tid) else LOCAL_SYSTEM
    study: dict[str, Any] = {
        "resourceType": "ResearchStudy",
        "id": tid,
        "identifier": [{"use": "official", "system": system, "value": tid}],
        "title": title or tid,
        "protocol": [{"reference": f"PlanDefinition/{tid}-eligibility"}],
        "status": "active",
    }
    actions, missing = _criteria_actions(text, ())
    if not actions:
        actions = [_missing_action(())]
    plan = _plan(
        tid,
        title or tid,
        "Drafted by fhirmatch trials import from eligibility text; every computable criterion "
        "is marked drafted until a person has reviewed it.",
        actions,
        missing,
    )
    return _bundle(tid, study, plan)


def skeleton_bundle(tid: str, *, title: str | None = None) -> dict[str, Any]:
    """A valid trial Bundle with one example criterion of each kind (lab threshold, diagnosis
    present, medication given, manual), for an author to edit (``fhirmatch trials new``)."""
    check_id(tid)
    system = CTGOV_SYSTEM if _NCT.match(tid) else LOCAL_SYSTEM
    study: dict[str, Any] = {
        "resourceType": "ResearchStudy",
        "id": tid,
        "identifier": [{"use": "official", "system": system, "value": tid}],
        "title": title or f"{tid} (new trial)",
        "protocol": [{"reference": f"PlanDefinition/{tid}-eligibility"}],
        "status": "in-review",
    }

    def kind(code: str) -> list[dict[str, Any]]:
        return [{"coding": [{"system": CS_CRITERION_KIND, "code": code}]}]

    def note(text: str) -> dict[str, Any]:
        return {"url": EXT_NOTE, "valueMarkdown": text}

    lab = {
        "id": "inc-platelets",
        "title": "Platelets ≥ 100 × 10^9/L",
        "description": "EXAMPLE (lab threshold): Platelets ≥ 100 × 10^9/L within 14 days before "
        "enrolment.",
        "code": kind("inclusion"),
        "extension": [
            note(
                "Example of a lab threshold: latest result within the look-back, converted to the "
                "target unit (any platelet unit converts). Replace it with the protocol's "
                "criteria; ×ULN limits compare with %x.referenceRange.high.value."
            )
        ],
        "input": [observation_input("plt", "platelets", "10*9/L", "platelets", 14)],
        "condition": [
            {
                "kind": "applicability",
                "expression": {
                    "language": "text/fhirpath",
                    "expression": "%plt.valueQuantity.value >= 100",
                },
            }
        ],
    }
    diagnosis = {
        "id": "inc-diagnosis",
        "title": "Esophageal cancer",
        "description": "EXAMPLE (diagnosis present): Histologically confirmed cancer of the "
        "esophagus.",
        "code": kind("inclusion"),
        "extension": [
            note(
                "Example of a diagnosis: a Condition coded in the ValueSet (SNOMED CT and "
                "ICD-10-CM) whose clinical status is current."
            )
        ],
        "input": [
            {
                "id": "cancer",
                "type": "Condition",
                "extension": [{"url": f"{EXT_BASE}/clinical-status", "valueCode": "current"}],
                "codeFilter": [{"path": "code", "valueSet": f"{VS_BASE}/esophageal-cancer"}],
            }
        ],
        "condition": [
            {
                "kind": "applicability",
                "expression": {"language": "text/fhirpath", "expression": "%cancer.exists()"},
            }
        ],
    }
    medication = {
        "id": "exc-prior-platinum",
        "title": "Platinum in the last 6 months",
        "description": "EXAMPLE (medication given): Platinum-based chemotherapy within the last "
        "6 months.",
        "code": kind("exclusion"),
        "extension": [
            note(
                "Example of a medication: an order or an administration coded in the ValueSet "
                "(RxNorm, ATC) within the look-back."
            )
        ],
        "input": [
            {
                "id": "plat_req",
                "type": "MedicationRequest",
                "codeFilter": [{"path": "medication", "valueSet": f"{VS_BASE}/platinum"}],
                "dateFilter": [{"path": "authoredOn", "valueDuration": duration(180)}],
            },
            {
                "id": "plat_adm",
                "type": "MedicationAdministration",
                "codeFilter": [{"path": "medication", "valueSet": f"{VS_BASE}/platinum"}],
                "dateFilter": [{"path": "effective", "valueDuration": duration(180)}],
            },
        ],
        "condition": [
            {
                "kind": "applicability",
                "expression": {
                    "language": "text/fhirpath",
                    "expression": "%plat_req.exists() or %plat_adm.exists()",
                },
            }
        ],
    }
    manual = {
        "id": "inc-consent",
        "title": "Informed consent",
        "description": "EXAMPLE (manual): Ability to understand the study and sign informed "
        "consent.",
        "code": kind("inclusion"),
        "extension": [{"url": EXT_MANUAL_REVIEW, "valueString": "Consent is obtained in person."}],
    }
    plan = _plan(
        tid,
        title or tid,
        "Skeleton written by fhirmatch trials new: replace the four EXAMPLE criteria with the "
        "protocol's (docs/trials.md, docs/trial-format.md).",
        [lab, diagnosis, medication, manual],
        ["this is a skeleton with example criteria, not the protocol's"],
    )
    return _bundle(tid, study, plan)
