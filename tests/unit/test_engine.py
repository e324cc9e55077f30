"""Semantics of the eligibility engine, on trials built in Python (docs/trial-format.md)."""

from __future__ import annotations

import json
import threading
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from fhirmatch.engine import Engine, age_range, combine_group, trial_status
from fhirmatch.errors import TrialDefinitionError
from fhirmatch.model import Criterion, DataInput, Trial
from fhirmatch.records import PatientRecord

LOINC = "http://loinc.org"
SCT = "http://snomed.info/sct"
AS_OF = date(2026, 11, 1)

WBC = DataInput(
    "wbc",
    "Observation",
    value_set="https://fhirmatch.dev/fhir/ValueSet/wbc",
    codes=frozenset({(LOINC, "6690-2"), (LOINC, "26464-8")}),
    unit="10*9/L",
    select="latest",
    lookback_days=30,
)
TBIL = DataInput(
    "tbil",
    "Observation",
    codes=frozenset({(LOINC, "1975-2")}),
    unit="mg/dL",
    analyte="bilirubin-total",
    select="latest",
)
VS = "https://fhirmatch.dev/fhir/ValueSet"
ECOG = DataInput(
    "ecog",
    "Observation",
    value_set=f"{VS}/ecog",
    codes=frozenset({(LOINC, "89247-1")}),
    unit="{score}",
    select="latest",
)
KPS = DataInput(
    "kps",
    "Observation",
    value_set=f"{VS}/karnofsky",
    codes=frozenset({(LOINC, "89243-0")}),
    unit="{score}",
    select="latest",
)
BRAIN = DataInput("brain", "Condition", codes=frozenset({(SCT, "94225005")}))
BRAIN_REQUIRED = DataInput(
    "brain", "Condition", codes=frozenset({(SCT, "94225005")}), required=True
)
CANCER_CURRENT = DataInput(
    "cancer", "Condition", codes=frozenset({(SCT, "363402007")}), clinical_status="current"
)
CANCER_HISTORY = DataInput(
    "cancer", "Condition", codes=frozenset({(SCT, "363402007")}), clinical_status="history"
)
PLATINUM = DataInput("platinum", "MedicationRequest", codes=frozenset({("rxnorm", "2555")}))


def inc(cid: str, expr: str, *inputs: DataInput) -> Criterion:
    return Criterion(cid, "inclusion", cid, expression=expr, inputs=inputs)


def exc(cid: str, expr: str, *inputs: DataInput) -> Criterion:
    return Criterion(cid, "exclusion", cid, expression=expr, inputs=inputs)


def trial(*criteria: Criterion, tid: str = "T1") -> Trial:
    return Trial(tid, f"Trial {tid}", (), tuple(criteria), f"pd-{tid}")


def patient(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": "p1", "birthDate": "1960-05-17", **extra}


def obs(oid: str, code: str, when: str, **value: Any) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": value.pop("status", "final"),
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": when,
    }
    res.update(value)
    return res


def qty(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}


def cond(cid: str, code: str, status: str | None = "active", **extra: Any) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Condition",
        "id": cid,
        "code": {"coding": [{"system": SCT, "code": code}]},
        "subject": {"reference": "Patient/p1"},
        **extra,
    }
    if status:
        res["clinicalStatus"] = {"coding": [{"code": status}]}
    return res


def one(criterion: Criterion, *resources: dict[str, Any], as_of: date = AS_OF) -> Any:
    result = Engine([trial(criterion)]).evaluate([patient(), *resources], as_of=as_of)[0]
    return result.criteria[0]


# ---------------------------------------------------------------- inclusion / exclusion worlds


def test_inclusion_pass_cites_resource_and_converted_value() -> None:
    c = one(
        inc("inc-wbc", "%wbc.valueQuantity.value >= 4.0", WBC),
        obs("o7", "6690-2", "2026-10-30", valueQuantity=qty(5200, "/uL")),
    )
    assert c.outcome == "pass"
    assert c.evidence == ["Observation/o7"]
    assert "wbc 5.2 10*9/L (Observation/o7, 2026-10-30)" in c.reason


def test_inclusion_fail_and_missing_is_unknown() -> None:
    low = obs("o1", "6690-2", "2026-10-30", valueQuantity=qty(3.1, "10*9/L"))
    assert one(inc("i", "%wbc.valueQuantity.value >= 4.0", WBC), low).outcome == "fail"
    c = one(inc("i", "%wbc.valueQuantity.value >= 4.0", WBC))
    assert c.outcome == "unknown"
    assert "no record of wbc" in c.reason and "within 30 days" in c.reason


def test_only_older_results_say_when_the_latest_was() -> None:
    old = obs("o2", "6690-2", "2026-08-14", valueQuantity=qty(5.2, "10*9/L"))
    older = obs("o3", "6690-2", "2026-05-02", valueQuantity=qty(5.0, "10*9/L"))
    c = one(inc("i", "%wbc.valueQuantity.value >= 4.0", WBC), older, old)
    assert c.outcome == "unknown"
    assert c.reason.endswith(
        "within 30 days before 2026-11-01; the latest, 2026-08-14, is outside the window"
    )
    # without any record the reason stays as it was
    assert "outside the window" not in one(inc("i", "%wbc.valueQuantity.value >= 4.0", WBC)).reason


def test_exclusion_closed_world_passes_without_records() -> None:
    c = one(exc("exc-brain", "%brain.exists()", BRAIN))
    assert c.outcome == "pass"
    assert c.reason.startswith("no record of brain")
    assert one(exc("exc-brain", "%brain.exists()", BRAIN), cond("c1", "94225005")).outcome == "fail"


def test_exclusion_lab_without_result_passes_unless_required() -> None:
    assert one(exc("e", "%wbc.valueQuantity.value < 1", WBC)).outcome == "pass"
    # a required input never takes the closed-world shortcut: an empty condition stays unknown
    assert one(exc("e", "%brain.first().id = 'x'", BRAIN_REQUIRED)).outcome == "unknown"
    required_lab = DataInput(
        "wbc", "Observation", codes=WBC.codes, unit="10*9/L", select="latest", required=True
    )
    assert one(exc("e", "%wbc.valueQuantity.value < 1", required_lab)).outcome == "unknown"


def test_unusable_latest_result_is_unknown_without_fallback() -> None:
    older = obs("o1", "6690-2", "2026-10-01", valueQuantity=qty(6.0, "10*9/L"))
    newer = obs("o2", "6690-2", "2026-10-30", valueQuantity=qty(6.0, "foo"))
    c = one(inc("i", "%wbc.valueQuantity.value >= 4.0", WBC), older, newer)
    assert c.outcome == "unknown"
    assert "Observation/o2: unit 'foo' cannot be converted to 10*9/L" in c.reason
    assert c.evidence == ["Observation/o2"]


def test_stale_future_and_non_final_results_are_ignored() -> None:
    stale = obs("o1", "6690-2", "2026-09-01", valueQuantity=qty(6.0, "10*9/L"))
    future = obs("o2", "6690-2", "2026-11-05", valueQuantity=qty(6.0, "10*9/L"))
    prelim = obs(
        "o3", "6690-2", "2026-10-30", valueQuantity=qty(6.0, "10*9/L"), status="preliminary"
    )
    error = obs(
        "o4", "6690-2", "2026-10-30", valueQuantity=qty(6.0, "10*9/L"), status="entered-in-error"
    )
    c = one(inc("i", "%wbc.valueQuantity.value >= 4.0", WBC), stale, future, prelim, error)
    assert c.outcome == "unknown"


def test_latest_result_wins_with_deterministic_ties() -> None:
    a = obs(
        "a", "6690-2", "2026-10-30", valueQuantity=qty(2.0, "10*9/L"), issued="2026-10-30T10:00:00Z"
    )
    b = obs(
        "b", "6690-2", "2026-10-30", valueQuantity=qty(5.0, "10*9/L"), issued="2026-10-30T12:00:00Z"
    )
    c1 = one(inc("i", "%wbc.valueQuantity.value >= 4.0", WBC), a, b)
    c2 = one(inc("i", "%wbc.valueQuantity.value >= 4.0", WBC), b, a)
    assert c1.outcome == c2.outcome == "pass"
    assert c1.evidence == c2.evidence == ["Observation/b"]
    same_x = obs("x", "6690-2", "2026-10-30", valueQuantity=qty(2.0, "10*9/L"))
    same_y = obs("y", "6690-2", "2026-10-30", valueQuantity=qty(5.0, "10*9/L"))
    assert one(inc("i", "%wbc.valueQuantity.value >= 4.0", WBC), same_y, same_x).evidence == [
        "Observation/y"
    ]


ULN_RULE = "%tbil.valueQuantity.value <= 1.5 * %tbil.referenceRange.high.value"


def test_uln_from_reference_range_converted_to_target_unit() -> None:
    o = obs(
        "t1",
        "1975-2",
        "2026-10-30",
        valueQuantity=qty(30, "umol/L"),
        referenceRange=[{"high": qty(17, "umol/L")}],
    )
    c = one(inc("i", ULN_RULE, TBIL), o)
    assert c.outcome == "fail"  # 30 > 1.5 * 17
    assert "from reference range" in c.reason


def test_uln_default_when_observation_has_none() -> None:
    o = obs("t1", "1975-2", "2026-10-30", valueQuantity=qty(1.5, "mg/dL"))
    c = one(inc("i", ULN_RULE, TBIL), o)
    assert c.outcome == "pass"  # default ULN 1.2 mg/dL, 1.5 <= 1.8
    assert "default ULN for bilirubin-total" in c.reason


def test_censored_value_decides_only_when_both_ends_agree() -> None:
    below = obs("t1", "1975-2", "2026-10-30", valueString="<0.5 mg/dL")
    assert one(inc("i", "%tbil.valueQuantity.value <= 1.0", TBIL), below).outcome == "pass"
    assert one(inc("i", "%tbil.valueQuantity.value >= 1.0", TBIL), below).outcome == "fail"
    c = one(inc("i", "%tbil.valueQuantity.value <= 0.3", TBIL), below)
    assert c.outcome == "unknown" and "censored" in c.reason


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"valueInteger": 1}, "pass"),
        ({"valueCodeableConcept": {"coding": [{"system": LOINC, "code": "LA9624-3"}]}}, "fail"),
        ({"valueCodeableConcept": {"coding": [{"system": SCT, "code": "425389002"}]}}, "pass"),
        ({"valueString": "1"}, "pass"),
        ({"valueCodeableConcept": {"coding": [{"system": LOINC, "code": "LA9627-6"}]}}, "fail"),
        ({"valueCodeableConcept": {"text": "fit"}}, "unknown"),
    ],
)
def test_ecog_value_forms(value: dict[str, Any], expected: str) -> None:
    o = obs("e1", "89247-1", "2026-10-30", **value)
    assert one(inc("i", "%ecog.valueQuantity.value <= 1", ECOG), o).outcome == expected


def test_dead_is_the_worst_score_of_the_scale_asked() -> None:
    dead = {"valueCodeableConcept": {"coding": [{"system": LOINC, "code": "LA9627-6"}]}}
    c = one(
        inc("i", "%kps.valueQuantity.value = 0", KPS), obs("k1", "89243-0", "2026-10-30", **dead)
    )
    assert c.outcome == "pass" and "kps 0" in c.reason
    c = one(
        inc("i", "%ecog.valueQuantity.value = 5", ECOG), obs("e1", "89247-1", "2026-10-30", **dead)
    )
    assert c.outcome == "pass" and "ecog 5" in c.reason


def test_answer_scores_are_read_from_the_answers_value_set(tmp_path: Path) -> None:
    """A site's reviewed copy of mappings/ decides what a coded answer scores: no list in code."""
    from fhirmatch.terminology import Terminology

    source = Path(__file__).resolve().parents[2] / "mappings" / "valuesets"
    for name in ("ecog", "ecog-answers"):
        (tmp_path / f"{name}.json").write_text(
            (source / f"{name}.json").read_text(encoding="utf-8"), encoding="utf-8"
        )
    answers = json.loads((tmp_path / "ecog-answers.json").read_text(encoding="utf-8"))
    concept = answers["compose"]["include"][0]["concept"][2]
    assert concept["code"] == "LA9624-3"  # ECOG 2
    concept["extension"][0]["valueDecimal"] = 1
    (tmp_path / "ecog-answers.json").write_text(json.dumps(answers), encoding="utf-8")
    value = {"valueCodeableConcept": {"coding": [{"system": LOINC, "code": "LA9624-3"}]}}
    crit = inc("i", "%ecog.valueQuantity.value <= 1", ECOG)
    o = obs("e1", "89247-1", "2026-10-30", **value)
    assert one(crit, o).outcome == "fail"
    engine = Engine([trial(crit)], Terminology.load([tmp_path]))
    assert engine.evaluate([patient(), o], as_of=AS_OF)[0].criteria[0].outcome == "pass"


# ---------------------------------------------------------------- conditions and medications


def test_clinical_status_current_vs_history() -> None:
    resolved = cond("c1", "363402007", "resolved")
    missing = cond("c2", "363402007", None)
    rule = "%cancer.exists()"
    assert one(exc("e", rule, CANCER_CURRENT), resolved).outcome == "pass"
    assert one(exc("e", rule, CANCER_HISTORY), resolved).outcome == "fail"
    assert one(exc("e", rule, CANCER_CURRENT), missing).outcome == "fail"  # missing = current


def test_refuted_and_entered_in_error_conditions_are_ignored() -> None:
    refuted = cond("c1", "94225005", verificationStatus={"coding": [{"code": "refuted"}]})
    wrong = cond("c2", "94225005", verificationStatus={"coding": [{"code": "entered-in-error"}]})
    c = one(exc("e", "%brain.exists()", BRAIN), refuted, wrong)
    assert c.outcome == "pass" and c.evidence == []


def test_medication_reference_is_resolved_and_cancelled_ignored() -> None:
    med = {
        "resourceType": "Medication",
        "id": "m1",
        "code": {"coding": [{"system": "rxnorm", "code": "2555"}]},
    }
    req = {
        "resourceType": "MedicationRequest",
        "id": "r1",
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "medicationReference": {"reference": "Medication/m1"},
    }
    c = one(inc("i", "%platinum.exists()", PLATINUM), med, req)
    assert c.outcome == "pass" and c.evidence == ["MedicationRequest/r1"]
    cancelled = {**req, "status": "cancelled"}
    assert one(inc("i", "%platinum.exists()", PLATINUM), med, cancelled).outcome == "fail"


# ---------------------------------------------------------------- groups, manual, status


def test_group_combination_rules() -> None:
    assert combine_group("all", ["pass", "unknown", "manual"]) == "unknown"
    assert combine_group("all", ["pass", "fail", "unknown"]) == "fail"
    assert combine_group("all", ["pass", "manual"]) == "pass"
    assert combine_group("any", ["fail", "unknown"]) == "unknown"
    assert combine_group("any", ["fail", "pass", "unknown"]) == "pass"
    assert combine_group("any", ["fail", "fail"]) == "fail"
    assert combine_group("any", ["manual", "manual"]) == "manual"
    # a manual alternative left: the failed computable one must not exclude the patient
    assert combine_group("any", ["fail", "manual"]) == "manual"
    assert combine_group("any", ["unknown", "manual"]) == "manual"
    assert combine_group("any", ["pass", "manual"]) == "pass"


def test_trial_status_ignores_manual() -> None:
    assert trial_status(["pass", "manual"]) == "eligible"
    assert trial_status(["pass", "unknown", "manual"]) == "insufficient-data"
    assert trial_status(["unknown", "fail"]) == "ineligible"


def test_group_results_nest_children() -> None:
    group = Criterion(
        "inc-recurrence",
        "inclusion",
        "one of",
        selection="any",
        children=(
            inc("inc-recurrence.1", "%wbc.valueQuantity.value > 100", WBC),
            Criterion("inc-recurrence.2", "inclusion", "MDT", manual_reason="needs MDT"),
            inc("inc-recurrence.3", "%brain.exists()", BRAIN),
        ),
    )
    t = trial(group, Criterion("inc-consent", "inclusion", "consent", manual_reason="consent"))
    res = Engine([t]).evaluate(
        [
            patient(),
            obs("o1", "6690-2", "2026-10-30", valueQuantity=qty(5, "10*9/L")),
            cond("c", "94225005"),
        ],
        as_of=AS_OF,
    )[0]
    g = res.criteria[0]
    assert [k.id for k in g.criteria] == [
        "inc-recurrence.1",
        "inc-recurrence.2",
        "inc-recurrence.3",
    ]
    assert [k.outcome for k in g.criteria] == ["fail", "manual", "pass"]
    assert g.outcome == "pass" and "Condition/c" in g.evidence
    assert res.status == "eligible"
    assert [m.id for m in res.manual_criteria()] == ["inc-recurrence.2", "inc-consent"]


# ---------------------------------------------------------------- age and death

AGE = inc("inc-age", "%age >= 18 and %age <= 75")


@pytest.mark.parametrize(
    ("birth", "expected"),
    [
        ("1960-05-17", "pass"),
        ("1950-11-02", "pass"),
        ("1950-11-01", "fail"),
        ("1950", "unknown"),
        ("1960-05", "pass"),
        ("2008-11", "unknown"),
        (None, "unknown"),
    ],
)
def test_age_with_full_partial_and_missing_birth_dates(birth: str | None, expected: str) -> None:
    p = patient(birthDate=birth) if birth else {"resourceType": "Patient", "id": "p1"}
    res = Engine([trial(AGE)]).evaluate([p], as_of=AS_OF)[0]
    assert res.criteria[0].outcome == expected
    if birth is None:
        assert "birth date unknown" in res.criteria[0].reason


def test_age_range() -> None:
    assert age_range("1960-05-17", AS_OF) == (66, 66)
    assert age_range("1960", AS_OF) == (65, 66)
    assert age_range("1960-12", AS_OF) == (65, 65)
    assert age_range("garbage", AS_OF) is None


@pytest.mark.parametrize(
    ("extra", "deceased"),
    [
        ({"deceasedBoolean": True}, True),
        ({"deceasedDateTime": "2026-10-01T10:00:00Z"}, True),
        ({"deceasedDateTime": "2026-12-01"}, False),
        ({"deceasedBoolean": False}, False),
    ],
)
def test_deceased_patient_is_never_eligible(extra: dict[str, Any], deceased: bool) -> None:
    res = Engine([trial(AGE)]).evaluate([patient(**extra)], as_of=AS_OF)[0]
    assert (res.status == "ineligible") is deceased
    assert (res.criteria[0].id == "patient-deceased") is deceased


# ---------------------------------------------------------------- engine API


def test_inputs_shared_across_trials_and_records() -> None:
    t1 = trial(inc("i", "%wbc.valueQuantity.value >= 4.0", WBC), tid="A")
    t2 = trial(inc("i", "%wbc.valueQuantity.value >= 3.0", WBC), tid="B")
    engine = Engine([t1, t2])
    record = PatientRecord(
        "p1", [patient(), obs("o1", "6690-2", "2026-10-30", valueQuantity=qty(3.5, "10*9/L"))]
    )
    (results,) = list(engine.evaluate_many([record], as_of=AS_OF))
    assert [(r.study, r.status) for r in results] == [
        ("ResearchStudy/A", "ineligible"),
        ("ResearchStudy/B", "eligible"),
    ]
    assert all(r.patient == "Patient/p1" for r in results)


def test_bad_fhirpath_is_a_trial_definition_error() -> None:
    with pytest.raises(TrialDefinitionError) as info:
        Engine([trial(inc("broken", "%wbc.valueQuantity.value >=", WBC))])
    assert "broken" in str(info.value)


def test_caller_data_is_not_mutated_and_threads_agree() -> None:
    resources = [patient(), obs("o1", "6690-2", "2026-10-30", valueQuantity=qty(5200, "/uL"))]
    snapshot = repr(resources)
    engine = Engine([trial(inc("i", "%wbc.valueQuantity.value >= 4.0", WBC), AGE)])
    outputs: list[str] = []

    def work() -> None:
        for _ in range(20):
            outputs.append(engine.evaluate(resources, as_of=AS_OF)[0].model_dump_json())

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(outputs)) == 1 and len(outputs) == 80
    assert repr(resources) == snapshot


def test_icd_descendants_match_their_category_but_respect_excludes(tmp_path: Path) -> None:
    """is-a C79 except C79.31: C79.51 matches, C79.31 does not, C80.1 does not."""
    from fhirmatch.engine import PatientIndex, icd_ancestors
    from fhirmatch.terminology import Terminology

    icd = "http://hl7.org/fhir/sid/icd-10-cm"
    url = "https://fhirmatch.dev/fhir/ValueSet/test-mets"
    vs = {
        "resourceType": "ValueSet",
        "url": url,
        "status": "active",
        "compose": {
            "include": [
                {"system": icd, "filter": [{"property": "concept", "op": "is-a", "value": "C79"}]}
            ],
            "exclude": [{"system": icd, "concept": [{"code": "C79.31"}]}],
        },
    }
    (tmp_path / "vs.json").write_text(json.dumps(vs))
    term = Terminology.load([tmp_path])
    assert icd_ancestors("C79.51") == ["C79.5", "C79"]
    assert icd_ancestors("C7951") == ["C79.5", "C79"]

    def cond(cid: str, code: str) -> dict[str, Any]:
        return {
            "resourceType": "Condition",
            "id": cid,
            "subject": {"reference": "Patient/p"},
            "code": {"coding": [{"system": icd, "code": code}]},
        }

    resources = [
        {"resourceType": "Patient", "id": "p"},
        cond("bone", "C79.51"),
        cond("brain", "C79.31"),
        cond("other", "C80.1"),
        cond("bare", "C7952"),
    ]
    index = PatientIndex(resources, as_of=date(2026, 11, 1), terminology=term)
    found = index.find("Condition", term.expand(url), url)
    assert sorted(r["id"] for r in found) == ["bare", "bone"]


def test_latest_result_of_one_day_is_decided_by_time_and_offset() -> None:
    """10:10 beats 10:09 on the same day; 11:00+02:00 (09:00 UTC) loses to 10:00Z."""
    from fhirmatch.engine import _sort_key

    def obs(oid: str, when: str) -> dict[str, Any]:
        return {"resourceType": "Observation", "id": oid, "effectiveDateTime": when}

    later, earlier = obs("a", "2026-10-30T10:10:00Z"), obs("b", "2026-10-30T10:09:00Z")
    assert max([later, earlier], key=_sort_key)["id"] == "a"
    assert max([earlier, later], key=_sort_key)["id"] == "a"
    utc, offset = obs("u", "2026-10-30T10:00:00Z"), obs("o", "2026-10-30T11:00:00+02:00")
    assert max([offset, utc], key=_sort_key)["id"] == "u"
    assert (
        max([obs("d", "2026-10-30"), obs("t", "2026-10-30T00:01:00Z")], key=_sort_key)["id"] == "t"
    )


# ---------------------------------------------------------------------- after-start-of


def test_after_start_of_keeps_only_results_after_the_first_treatment_record() -> None:
    from fhirmatch.terminology import Terminology
    from fhirmatch.trials import compile_trial

    base = "https://fhirmatch.dev/fhir/"
    status_vs = base + "ValueSet/cancer-disease-status"
    worse = f"{base}ValueSet/disease-progression"
    plan = {
        "resourceType": "PlanDefinition",
        "id": "t-eligibility",
        "action": [
            {
                "id": "exc-progression",
                "description": "Progression after the treatment started",
                "code": [
                    {
                        "coding": [
                            {"system": base + "CodeSystem/criterion-kind", "code": "exclusion"}
                        ]
                    }
                ],
                "input": [
                    {
                        "id": "tx",
                        "type": "MedicationRequest",
                        "codeFilter": [
                            {"path": "medication", "valueSet": base + "ValueSet/anti-pd1"}
                        ],
                    },
                    {
                        "id": "status",
                        "type": "Observation",
                        "extension": [
                            {
                                "url": base + "StructureDefinition/after-start-of",
                                "valueString": "tx",
                            }
                        ],
                        "codeFilter": [{"path": "code", "valueSet": status_vs}],
                    },
                ],
                "condition": [
                    {
                        "kind": "applicability",
                        "expression": {
                            "language": "text/fhirpath",
                            "expression": (
                                f"%status.where(valueCodeableConcept.memberOf('{worse}')).exists()"
                            ),
                        },
                    }
                ],
            }
        ],
    }
    study = {"resourceType": "ResearchStudy", "id": "t", "status": "active"}
    terminology = Terminology.load()
    t = compile_trial(study, plan, terminology)
    status_input = t.criteria[0].inputs[1]
    assert [a.name for a in status_input.after] == ["tx"]
    engine = Engine([t], terminology)

    def obs(oid: str, day: str, code: str) -> dict[str, Any]:
        return {
            "resourceType": "Observation",
            "id": oid,
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "97509-4"}]},
            "effectiveDateTime": day,
            "valueCodeableConcept": {
                "coding": [{"system": "http://snomed.info/sct", "code": code}]
            },
        }

    pd1 = {
        "resourceType": "MedicationRequest",
        "id": "rx",
        "status": "completed",
        "authoredOn": "2026-05-01",
        "medicationCodeableConcept": {
            "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "1547545"}]
        },
    }
    patient = {"resourceType": "Patient", "id": "p", "birthDate": "1960-01-01"}

    def outcome(*resources: dict[str, Any]) -> tuple[str, str]:
        [res] = engine.evaluate([patient, *resources], as_of=AS_OF)
        return res.criteria[0].outcome, res.criteria[0].reason

    before = obs("o1", "2026-04-01", "271299001")  # worsened before the treatment: not counted
    after = obs("o2", "2026-08-01", "271299001")
    assert outcome(pd1, before)[0] == "pass"
    assert outcome(pd1, before, after)[0] == "fail"
    assert outcome(pd1, obs("o3", "2026-08-01", "268910001"))[0] == "pass"
    undated, why = outcome(after)  # no treatment record: cannot tell what follows it
    assert undated == "unknown" and "cannot tell which results follow the start of tx" in why
    assert outcome(pd1)[0] == "pass"  # no status at all: closed-world exclusion


def test_records_with_nothing_share_a_decision_but_never_a_result() -> None:
    """A criterion whose inputs find nothing is decided once per as-of date (and age): a
    long-lived engine gives each patient what a fresh engine would, in its own objects."""
    crits = (
        inc("wbc", "%wbc.valueQuantity.value >= 4.0", WBC),
        exc("brain", "%brain.exists()", BRAIN),
        inc("young", "%age <= 70"),
        inc("young-wbc", "%age <= 70 and %wbc.valueQuantity.value >= 4.0", WBC),
    )
    engine = Engine([trial(*crits)])
    with_data = [obs("o1", "6690-2", "2026-10-30", valueQuantity=qty(5.0, "10*9/L"))]
    with_data.append(cond("b1", "94225005"))
    # results outside the look-back window: every input empty, but each reason names its date
    stale = [obs("o2", "6690-2", "2020-01-02", valueQuantity=qty(5.0, "10*9/L"))]
    staler = [obs("o3", "6690-2", "2019-05-06", valueQuantity=qty(2.0, "10*9/L"))]
    people = [
        [patient()],
        [patient(birthDate="1940-01-01")],
        [patient(), *with_data],
        [patient(), *stale],
        [patient()],
        [patient(birthDate="1940-01-01"), *staler],
        [patient(birthDate="1940-01-01")],
        [patient(birthDate="1960-05"), *stale],
    ]
    seen: list[Any] = []
    for n, resources in enumerate(people):
        for as_of in (AS_OF, date(2025, 1, 1)):
            got = engine.evaluate(resources, as_of=as_of)[0]
            fresh = Engine([trial(*crits)]).evaluate(resources, as_of=as_of)[0]
            assert got.model_dump() == fresh.model_dump(), (n, as_of)
            seen.extend(got.criteria)
    assert len({id(c) for c in seen}) == len(seen)  # never the same object twice
    first = engine.evaluate(people[0], as_of=AS_OF)[0].criteria
    old = engine.evaluate(people[1], as_of=AS_OF)[0].criteria
    assert [c.outcome for c in first] == ["unknown", "pass", "pass", "unknown"]
    assert [c.outcome for c in old] == ["unknown", "pass", "fail", "fail"]
    assert old[2].evidence == ["Patient/p1"] and "age 86" in old[2].reason
    dated = [engine.evaluate(people[n], as_of=AS_OF)[0].criteria[0] for n in (3, 5)]
    assert [c.outcome for c in dated] == ["unknown", "unknown"]
    assert "2020-01-02" in dated[0].reason and "2019-05-06" in dated[1].reason


@pytest.mark.parametrize(
    "expr",
    [
        "gender = 'female' and %brain.empty()",
        "%brain.empty() and iif(gender = 'female', true, false)",
        "%brain.empty() and %context.gender = 'female'",
        "%brain.empty() and %context.exists(gender = 'female')",
        "%brain.empty() and $this.gender = 'female'",
        "%brain.empty() and exists(gender = 'female')",
        "%brain.empty() and %patient.gender = 'female'",
    ],
)
def test_a_condition_that_reads_the_patient_is_never_settled_for_others(expr: str) -> None:
    """A condition evaluated against the Patient (its root), not only through %patient, is
    decided for each patient even when its inputs find nothing: the outcome of one patient must
    not be given to another."""
    engine = Engine([trial(inc("female", expr, BRAIN))])
    outcomes = [
        engine.evaluate([patient(id=f"p{n}", gender=sex)], as_of=AS_OF)[0].criteria[0].outcome
        for n, sex in enumerate(["male", "female", "male", "female"])
    ]
    assert outcomes == ["fail", "pass", "fail", "pass"]


def test_an_input_hashes_once_and_never_pickles_its_hash() -> None:
    import pickle

    copy = pickle.loads(pickle.dumps(WBC))  # noqa: S301 - our own bytes
    assert copy == WBC and hash(copy) == hash(WBC)
    hash(WBC)
    assert b"_hash" not in pickle.dumps(WBC)  # string hashes differ between processes
    assert {WBC: 1}[copy] == 1


def test_a_result_sent_as_a_panel_component_is_read_with_the_panels_date_and_status() -> None:
    def panel(pid: str, status: str, when: str, wbc: float) -> dict[str, Any]:
        return {
            "resourceType": "Observation",
            "id": pid,
            "status": status,
            "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": "urn:oid:1.2.3.4", "code": "CBC"}], "text": "CBC"},
            "effectiveDateTime": when,
            "valueString": "see components",
            "component": [
                {"code": {"coding": [{"system": LOINC, "code": "718-7"}]}, "valueString": "x"},
                {
                    "code": {"coding": [{"system": LOINC, "code": "6690-2"}]},
                    "valueQuantity": qty(wbc, "10*9/L"),
                },
            ],
        }

    rule = "%wbc.valueQuantity.value >= 4"
    c = one(inc("i", rule, WBC), panel("cbc", "final", "2026-10-30", 5.2))
    assert c.outcome == "pass" and c.evidence == ["Observation/cbc"]
    assert "wbc 5.2" in c.reason
    c = one(inc("i", rule, WBC), panel("cbc", "final", "2026-10-30", 3.1))
    assert c.outcome == "fail"
    # the panel's status and date hold for its components
    assert (
        one(inc("i", rule, WBC), panel("cbc", "entered-in-error", "2026-10-30", 3.1)).outcome
        == "unknown"
    )
    assert one(inc("i", rule, WBC), panel("cbc", "final", "2026-08-01", 5.2)).outcome == "unknown"
