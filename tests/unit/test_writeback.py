"""Write-back decisions (create / update / unchanged / advanced) and the resources written."""

from __future__ import annotations

import copy
from datetime import date
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from fhirmatch.client import bundle_is_retry_safe
from fhirmatch.results import CriterionResult, TrialResult
from fhirmatch.writeback import (
    EXT_ASSESSMENT,
    SUBJECT_IDENTIFIER_SYSTEM,
    assessment_digest,
    current_status,
    plan_subject,
    provenance_id,
    subject_identifier,
    transaction_for,
)

AS_OF = date(2026, 11, 1)
PD = "PlanDefinition/S-eligibility"


def result(
    status: str = "eligible",
    outcome: str = "pass",
    evidence: str = "Observation/o1",
    patient: str = "Patient/p1",
) -> TrialResult:
    inner = CriterionResult(
        id="inc-wbc",
        kind="inclusion",
        text="WBC",
        outcome="pass",
        evidence=["Observation/o2"],
        reason="WBC 5.1",
    )
    return TrialResult(
        patient=patient,
        study="ResearchStudy/S",
        status=status,  # type: ignore[arg-type]
        criteria=[
            CriterionResult(
                id="inc-ecog",
                kind="inclusion",
                text="ECOG ≤ 2",
                outcome=outcome,
                evidence=[evidence],
                reason="ECOG 1",
            ),  # type: ignore[arg-type]
            CriterionResult(
                id="inc-labs", kind="inclusion", text="labs", outcome="pass", criteria=[inner]
            ),
        ],
    )


def written(res: TrialResult, version: str = "1", **changes: Any) -> dict[str, Any]:
    """What the server would hold after fhirmatch created the subject for ``res``."""
    plan = plan_subject(res, None, as_of=AS_OF, plan_definition=PD)
    assert plan.subject is not None
    subject = copy.deepcopy(plan.subject)
    subject |= {"id": "rs1", "meta": {"versionId": version}}
    subject.update(changes)
    return subject


def test_identifier_is_deterministic_per_pair() -> None:
    a = subject_identifier("ResearchStudy/S", "Patient/p1")
    assert a == subject_identifier("ResearchStudy/S", "Patient/p1")
    assert a != subject_identifier("ResearchStudy/S", "Patient/p2")
    assert a != subject_identifier("ResearchStudy/T", "Patient/p1")


@pytest.mark.parametrize(
    ("status", "write", "action", "subject_status"),
    [
        ("eligible", {"candidate", "potential-candidate"}, "create", "candidate"),
        (
            "insufficient-data",
            {"candidate", "potential-candidate"},
            "create",
            "potential-candidate",
        ),
        ("insufficient-data", {"candidate"}, "not-written", "potential-candidate"),
        ("ineligible", {"candidate", "potential-candidate"}, "not-written", "ineligible"),
    ],
)
def test_new_pairs(status: str, write: set[str], action: str, subject_status: str) -> None:
    plan = plan_subject(result(status), None, as_of=AS_OF, write=frozenset(write))
    assert plan.action == action
    assert plan.subject_status == subject_status
    assert (plan.subject is not None) == (action == "create")


def test_unchanged_assessment_writes_nothing_even_on_another_day() -> None:
    res = result()
    plan = plan_subject(res, written(res), as_of=date(2026, 12, 1))
    assert plan.action == "unchanged"
    assert plan.subject is None


def test_changed_evidence_updates_with_the_version_read() -> None:
    res = result()
    plan = plan_subject(
        result(evidence="Observation/newer"), written(res, version="7"), as_of=AS_OF
    )
    assert plan.action == "update"
    assert plan.existing_id == "rs1" and plan.existing_version == "7"
    bundle = transaction_for([plan], {"ResearchStudy/S": PD})
    assert bundle is not None
    put = [e for e in bundle["entry"] if e["request"]["method"] == "PUT"]
    assert put[0]["request"] == {"method": "PUT", "url": "ResearchSubject/rs1", "ifMatch": 'W/"7"'}


def test_newly_ineligible_candidate_is_updated_to_ineligible() -> None:
    old = written(result())
    plan = plan_subject(result("ineligible", outcome="fail"), old, as_of=AS_OF)
    assert plan.action == "update"
    assert plan.subject is not None and plan.subject["status"] == "ineligible"


@pytest.mark.parametrize("human_status", ["screening", "on-study", "withdrawn", "ineligible"])
def test_subject_advanced_by_a_person_is_never_touched(human_status: str) -> None:
    old = written(result(), status=human_status)
    for new in (result(), result("ineligible", outcome="fail"), result(evidence="Observation/x")):
        plan = plan_subject(new, old, as_of=AS_OF)
        assert plan.action == "advanced", (human_status, new.status)
        assert plan.subject is None


def test_subject_without_our_assessment_is_not_ours() -> None:
    foreign = {"resourceType": "ResearchSubject", "id": "x", "status": "candidate"}
    assert plan_subject(result(), foreign, as_of=AS_OF).action == "advanced"


def test_digest_ignores_wording_but_not_outcomes() -> None:
    a = result()
    reworded = a.model_copy(
        update={
            "criteria": [a.criteria[0].model_copy(update={"reason": "other words"}), a.criteria[1]]
        }
    )
    assert assessment_digest(a) == assessment_digest(reworded)
    assert assessment_digest(a) != assessment_digest(
        result(outcome="unknown", status="insufficient-data")
    )


def test_transaction_is_valid_r4_and_carries_everything() -> None:
    plan = plan_subject(result(), None, as_of=AS_OF, plan_definition=PD)
    bundle = transaction_for([plan], {"ResearchStudy/S": PD})
    assert bundle is not None
    Bundle.model_validate(bundle)
    types = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert types == ["Device", "ResearchSubject", "Provenance"]
    device, subject, prov = (e for e in bundle["entry"])
    assert device["request"]["ifNoneExist"].startswith("identifier=")
    value = subject_identifier("ResearchStudy/S", "Patient/p1")
    assert subject["request"]["ifNoneExist"] == f"identifier={SUBJECT_IDENTIFIER_SYSTEM}|{value}"
    assert prov["resource"]["target"] == [{"reference": subject["fullUrl"]}]
    assert prov["resource"]["agent"][0]["who"] == {"reference": device["fullUrl"]}
    entities = [e["what"]["reference"] for e in prov["resource"]["entity"]]
    assert entities == [PD, "Observation/o1", "Observation/o2"]
    ext = subject["resource"]["extension"][0]
    assert ext["url"] == EXT_ASSESSMENT
    crits = [e for e in ext["extension"] if e["url"] == "criterion"]
    parents = [
        [s.get("valueString") for s in c["extension"] if s["url"] == "parent"] for c in crits
    ]
    assert parents == [[], [], ["inc-labs"]]  # the group's child is kept, with its parent


def test_nothing_to_write_gives_no_transaction() -> None:
    plan = plan_subject(result("ineligible", outcome="fail"), None, as_of=AS_OF)
    assert transaction_for([plan], {}) is None


def test_r5_shape() -> None:
    plan = plan_subject(
        result("insufficient-data", outcome="unknown"), None, as_of=AS_OF, version="R5"
    )
    subject = plan.subject
    assert subject is not None
    assert subject["status"] == "active"
    assert subject["subject"] == {"reference": "Patient/p1"}
    assert "individual" not in subject
    assert subject["progress"][0]["subjectState"]["coding"][0]["code"] == "potential-candidate"
    assert current_status(subject) == "potential-candidate"


def test_every_entry_of_a_create_is_safe_to_resend() -> None:
    """A lost answer to a transaction that creates subjects may be resent: the subject and the
    Device are conditional creates, the Provenance a PUT to an id derived from the write."""
    plan = plan_subject(result(), None, as_of=AS_OF, plan_definition=PD)
    bundle = transaction_for([plan], {"ResearchStudy/S": PD})
    assert bundle is not None and bundle_is_retry_safe(bundle)
    prov = bundle["entry"][-1]
    assert prov["request"] == {"method": "PUT", "url": f"Provenance/{provenance_id(plan)}"}
    assert prov["resource"]["id"] == provenance_id(plan)
    again = transaction_for([plan_subject(result(), None, as_of=AS_OF, plan_definition=PD)], {})
    assert again is not None and again["entry"][-1]["request"] == prov["request"]


def test_provenance_ids_differ_for_each_write_of_a_subject() -> None:
    res = result()
    created = plan_subject(res, None, as_of=AS_OF)
    changed = result(evidence="Observation/newer")
    first_update = plan_subject(changed, written(res, version="1"), as_of=AS_OF)
    back = plan_subject(res, written(changed, version="2"), as_of=AS_OF)
    for plan in (created, first_update, back):
        transaction_for([plan], {})
    ids = {provenance_id(p) for p in (created, first_update, back)}
    assert len(ids) == 3
    # an update carries If-Match: not resent blindly (the match job reads again and re-plans)
    bundle = transaction_for([first_update], {})
    assert bundle is not None and not bundle_is_retry_safe(bundle)
