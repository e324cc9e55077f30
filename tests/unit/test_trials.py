"""Loading, compiling and checking trial definitions, and the ``fhirmatch trials`` subcommand."""

from __future__ import annotations

import copy
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fhirmatch.cli import main
from fhirmatch.errors import TrialDefinitionError
from fhirmatch.model import Criterion, Trial
from fhirmatch.trials import (
    check_trials,
    code_literals,
    computable_leaves,
    fhirpath_problems,
    fhirpath_variables,
    load_trial_resources,
    load_trials,
    member_of_urls,
)

TRIALS_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "trials"
EXT = "https://fhirmatch.dev/fhir/StructureDefinition/"


def walk(criteria: tuple[Criterion, ...]) -> Iterator[Criterion]:
    for c in criteria:
        yield c
        yield from walk(c.children)


@pytest.fixture(scope="module")
def trials() -> dict[str, Trial]:
    return {t.id: t for t in load_trials([TRIALS_DIR])}


def find(trial: Trial, cid: str) -> Criterion:
    return next(c for c in walk(trial.criteria) if c.id == cid)


# (trial, top-level inclusion, top-level exclusion, manual leaves, computable leaves)
COUNTS = [
    ("escc-sbrt-antipd1", 8, 11, 6, 31),
    ("NCT06084897", 8, 0, 5, 10),
    ("NCT05183958", 6, 0, 4, 7),
    ("NCT03731442", 7, 6, 5, 18),
    ("NCT06767007", 10, 0, 5, 20),
]


def test_three_quarters_of_the_leaf_criteria_are_computable(trials: dict[str, Trial]) -> None:
    done, total = computable_leaves(trials.values())
    assert (done, total) == (86, 111)
    assert done / total >= 0.75


@pytest.mark.parametrize(("tid", "inc", "exc", "manual", "computable"), COUNTS)
def test_trial_counts(
    trials: dict[str, Trial], tid: str, inc: int, exc: int, manual: int, computable: int
) -> None:
    t = trials[tid]
    assert sum(c.kind == "inclusion" for c in t.criteria) == inc
    assert sum(c.kind == "exclusion" for c in t.criteria) == exc
    leaves = [c for c in walk(t.criteria) if not c.is_group]
    assert sum(c.is_manual for c in leaves) == manual
    assert sum(not c.is_manual for c in leaves) == computable
    assert t.plan_definition_url == f"https://fhirmatch.dev/fhir/PlanDefinition/{tid}-eligibility"
    assert t.recruitment_status == "active"


def test_identifiers(trials: dict[str, Trial]) -> None:
    assert trials["NCT06767007"].identifiers == (("https://clinicaltrials.gov", "NCT06767007"),)
    assert trials["escc-sbrt-antipd1"].identifiers == (
        ("https://fhirmatch.dev/fhir/sid/local-trial-id", "escc-sbrt-antipd1"),
    )


def test_hbv_two_units_never_converted(trials: dict[str, Trial]) -> None:
    hbv = find(trials["escc-sbrt-antipd1"], "exc-hbv")
    results = [i for i in hbv.inputs if i.resource_type == "Observation"]
    units = {i.name: i.unit for i in results}
    assert units == {"hbv_iu": "[IU]/mL", "hbv_copies": "{copies}/mL"}
    assert {i.value_set for i in results} == {
        "https://fhirmatch.dev/fhir/ValueSet/hbv-dna-iu",
        "https://fhirmatch.dev/fhir/ValueSet/hbv-dna-copies",
    }
    # a hepatitis B diagnosis without a viral load is read too (unknown, not a pass)
    [diagnosis] = [i for i in hbv.inputs if i.resource_type == "Condition"]
    assert diagnosis.value_set == "https://fhirmatch.dev/fhir/ValueSet/hepatitis-b"
    assert hbv.expression is not None and " or " in hbv.expression
    assert all(i.select == "latest" and i.lookback_days == 180 for i in results)


def test_lab_inputs_compiled(trials: dict[str, Trial]) -> None:
    anc = find(trials["NCT06767007"], "inc-wbc-or-anc")
    assert [i.lookback_days for i in anc.inputs] == [15, 15]  # "tested within 15 days"
    assert [i.unit for i in anc.inputs] == ["10*9/L", "10*9/L"]
    assert all(i.required for i in anc.inputs)
    wbc = anc.inputs[0]
    assert ("http://loinc.org", "6690-2") in wbc.codes and ("http://loinc.org", "751-8") not in (
        wbc.codes
    )
    crea = find(trials["escc-sbrt-antipd1"], "inc-creatinine")
    assert crea.expression == (
        "%crea.valueQuantity.value <= 1.5 * %crea.referenceRange.high.value"
        " or %crcl.valueQuantity.value > 60"
    )
    assert {i.analyte for i in crea.inputs} == {"creatinine", "creatinine-clearance"}


def test_groups_and_alternatives(trials: dict[str, Trial]) -> None:
    t = trials["NCT03731442"]
    situation = find(t, "inc-recurrence-situation")
    assert situation.selection == "any" and len(situation.children) == 4
    assert all(c.kind == "inclusion" for c in situation.children)
    # the locoregional recurrence after surgery is read from the record; the others need a person
    assert [c.id for c in situation.children if not c.is_manual] == ["inc-locoregional-recurrence"]
    assert find(t, "inc-age").expression == "%age >= 16 and %age <= 70"
    assert find(t, "exc-age").expression == "%age > 70 or %age < 16"
    organ = find(trials["escc-sbrt-antipd1"], "exc-ild-hepatitis")
    assert organ.selection == "all" and all(c.kind == "exclusion" for c in organ.children)


def test_every_criterion_keeps_wording_and_reason(trials: dict[str, Trial]) -> None:
    for t in trials.values():
        for c in walk(t.criteria):
            assert c.text.strip()
            if c.is_manual:
                assert c.manual_reason and c.manual_reason != "(invalid)"


def test_registry_sourced_trials_cite_the_record(trials: dict[str, Trial]) -> None:
    for tid in ("NCT06084897", "NCT05183958"):
        for c in walk(trials[tid].criteria):
            assert c.note and f"https://clinicaltrials.gov/study/{tid}" in c.note


def test_condition_codes_expand_through_is_a(trials: dict[str, Trial]) -> None:
    ec = find(trials["escc-sbrt-antipd1"], "inc-escc").inputs[0]
    assert ec.resource_type == "Condition" and ec.code_path == "code"
    assert ("http://snomed.info/sct", "363402007") in ec.codes


# ---------------------------------------------------------------------------- FHIRPath


@pytest.mark.parametrize(
    "expr",
    ["%a.value >= ", "((%a", "%a.value >= 4 $$", "x.where(", "%a.value >= 3 and", ""],
)
def test_fhirpath_syntax_errors_found(expr: str) -> None:
    assert fhirpath_problems(expr)


def test_fhirpath_valid_and_variables() -> None:
    expr = "iif(%ec.where(code = '%notavar').exists(), true, {}) or %`odd name`.empty()"
    assert fhirpath_problems(expr) == []
    assert fhirpath_variables(expr) == {"ec", "odd name"}


# ---------------------------------------------------------------------------- check


def good_bundle() -> dict[str, Any]:
    return json.loads((TRIALS_DIR / "NCT06767007.json").read_text(encoding="utf-8"))


def plan_of(bundle: dict[str, Any]) -> dict[str, Any]:
    return next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "PlanDefinition"
    )


def action(bundle: dict[str, Any], aid: str) -> dict[str, Any]:
    def rec(actions: list[dict[str, Any]]) -> dict[str, Any] | None:
        for a in actions:
            if a["id"] == aid:
                return a
            hit = rec(a.get("action", []))
            if hit:
                return hit
        return None

    found = rec(plan_of(bundle)["action"])
    assert found is not None
    return found


def write(tmp_path: Path, bundle: dict[str, Any], name: str = "t.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(bundle), encoding="utf-8")
    return path


def test_good_definitions_pass_check() -> None:
    report = check_trials([TRIALS_DIR])
    assert report.ok, report.problems
    assert len(report.trials) == 5


def broken_fhirpath(b: dict[str, Any]) -> None:
    action(b, "inc-ecog")["condition"][0]["expression"]["expression"] = "%ecog.value <= ("


def unknown_value_set(b: dict[str, Any]) -> None:
    action(b, "inc-ecog")["input"][0]["codeFilter"][0]["valueSet"] = (
        "https://fhirmatch.dev/fhir/ValueSet/no-such-thing"
    )


def impossible_unit(b: dict[str, Any]) -> None:
    action(b, "inc-hemoglobin")["input"][0]["extension"][0]["valueCode"] = "furlong/fortnight"


def missing_reason(b: dict[str, Any]) -> None:
    action(b, "inc-survival")["extension"][0]["valueString"] = ""


def duplicate_id(b: dict[str, Any]) -> None:
    action(b, "inc-age")["id"] = "inc-ecog"


def input_id_reused(b: dict[str, Any]) -> None:
    # Variables are per criterion, but FHIR element ids are unique within the PlanDefinition.
    hgb = action(b, "inc-hemoglobin")
    plt_id = action(b, "inc-platelets")["input"][0]["id"]
    old = hgb["input"][0]["id"]
    hgb["input"][0]["id"] = plt_id
    expr = hgb["condition"][0]["expression"]
    expr["expression"] = expr["expression"].replace(f"%{old}", f"%{plt_id}")


def undefined_variable(b: dict[str, Any]) -> None:
    action(b, "inc-ecog")["condition"][0]["expression"]["expression"] = (
        "%ecgo.valueQuantity.value <= 1"
    )


def unknown_analyte(b: dict[str, Any]) -> None:
    action(b, "inc-hemoglobin")["input"][0]["extension"][1]["valueCode"] = "unobtainium"


def neither(b: dict[str, Any]) -> None:
    a = action(b, "inc-survival")
    del a["extension"]


def bad_duration(b: dict[str, Any]) -> None:
    action(b, "inc-ecog")["input"][0]["dateFilter"][0]["valueDuration"]["code"] = "fortnight"


def invalid_fhir(b: dict[str, Any]) -> None:
    study = next(e for e in b["entry"] if e["resource"]["resourceType"] == "ResearchStudy")
    study["resource"]["title"] = ["a title must be a string"]


def bad_status(b: dict[str, Any]) -> None:
    study = next(e for e in b["entry"] if e["resource"]["resourceType"] == "ResearchStudy")
    study["resource"]["status"] = "recruiting"


def lab_without_lookback(b: dict[str, Any]) -> None:
    del action(b, "inc-platelets")["input"][0]["dateFilter"]


def platelets_in_mass_units(b: dict[str, Any]) -> None:
    action(b, "inc-platelets")["input"][0]["extension"][0]["valueCode"] = "g/dL"


def unconvertible_unit_without_analyte(b: dict[str, Any]) -> None:
    exts = action(b, "inc-hemoglobin")["input"][0]["extension"]
    exts[:] = [{"url": EXT + "target-unit", "valueCode": "10*9/L"}]


def code_literal(b: dict[str, Any]) -> None:
    action(b, "inc-crc")["condition"][0]["expression"]["expression"] = (
        "%crc.where(code.coding.where(code.startsWith('C18')).exists()).exists()"
    )


def unknown_member_of(b: dict[str, Any]) -> None:
    action(b, "inc-crc")["condition"][0]["expression"]["expression"] = (
        "%crc.where(code.memberOf('https://fhirmatch.dev/fhir/ValueSet/no-such-set')).exists()"
    )


def threshold_without_value(b: dict[str, Any]) -> None:
    hcg = next(i for i in action(b, "inc-not-pregnant")["input"] if i["id"] == "hcg_quant")
    threshold = next(x for x in hcg["extension"] if x["url"].endswith("positive-threshold"))
    del threshold["valueQuantity"]["value"]


def text_review_on_an_observation(b: dict[str, Any]) -> None:
    action(b, "inc-ecog")["input"][0].setdefault("extension", []).append(
        {"url": EXT + "review-text-diagnoses", "valueBoolean": True}
    )


BREAKAGES = [
    (broken_fhirpath, "FHIRPath"),
    (text_review_on_an_observation, "review-text-diagnoses is for Condition inputs only"),
    (unknown_value_set, "no-such-thing"),
    (impossible_unit, "furlong/fortnight"),
    (missing_reason, "without a reason"),
    (duplicate_id, "duplicate action id 'inc-ecog'"),
    (input_id_reused, "is already used in this PlanDefinition"),
    (undefined_variable, "%ecgo"),
    (unknown_analyte, "unobtainium"),
    (neither, "neither computable"),
    (bad_duration, "fortnight"),
    (invalid_fhir, "invalid FHIR R4"),
    (bad_status, "not an R4 status code"),
    (lab_without_lookback, "no look-back window"),
    (platelets_in_mass_units, "'g/dL' cannot be converted from platelets's unit '10*9/L'"),
    (unconvertible_unit_without_analyte, "'10*9/L' cannot be converted from hemoglobin's"),
    (code_literal, "code literal(s) 'C18' in the condition"),
    (unknown_member_of, "memberOf('https://fhirmatch.dev/fhir/ValueSet/no-such-set')"),
    (threshold_without_value, "positive-threshold needs valueQuantity.value"),
]


@pytest.mark.parametrize(
    ("breakage", "expected"), BREAKAGES, ids=[b[0].__name__ for b in BREAKAGES]
)
def test_check_rejects(tmp_path: Path, breakage: Any, expected: str) -> None:
    bundle = good_bundle()
    breakage(bundle)
    path = write(tmp_path, bundle)
    report = check_trials([path])
    assert not report.ok
    assert any(expected in p for p in report.problems[str(path)]), report.problems


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    bundle = good_bundle()
    for breakage, _ in BREAKAGES[:5]:
        breakage(bundle)
    path = write(tmp_path, bundle)
    with pytest.raises(TrialDefinitionError) as info:
        load_trials([path])
    text = "\n".join(info.value.problems)
    for _, expected in BREAKAGES[:5]:
        assert expected in text
    assert info.value.source == str(path)


def test_duplicate_trial_ids_across_files(tmp_path: Path) -> None:
    write(tmp_path, good_bundle(), "a.json")
    write(tmp_path, good_bundle(), "b.json")
    report = check_trials([tmp_path])
    assert any("also defined in" in p for ps in report.problems.values() for p in ps)
    with pytest.raises(TrialDefinitionError, match="also defined"):
        load_trials([tmp_path])


def test_loose_resources_gzip_and_lookback_units(tmp_path: Path) -> None:
    bundle = good_bundle()
    ecog = action(bundle, "inc-ecog")["input"][0]["dateFilter"][0]["valueDuration"]
    ecog.update({"value": 2, "code": "mo", "unit": "mo"})
    study, plan = (copy.deepcopy(e["resource"]) for e in bundle["entry"])
    write(tmp_path, study, "study.json")
    with gzip.open(tmp_path / "plan.json.gz", "wt", encoding="utf-8") as fh:
        json.dump(plan, fh)
    assert len(load_trial_resources([tmp_path])) == 1
    (trial,) = load_trials([tmp_path])
    assert find(trial, "inc-ecog").inputs[0].lookback_days == 60
    assert find(trial, "inc-ecog").inputs[0].select == "latest"


def test_study_without_plan(tmp_path: Path) -> None:
    study = good_bundle()["entry"][0]["resource"]
    path = write(tmp_path, study)
    with pytest.raises(TrialDefinitionError, match="names no PlanDefinition"):
        load_trials([path])


def test_missing_path() -> None:
    with pytest.raises(TrialDefinitionError, match="no such file"):
        load_trials(["/nonexistent/trials"])


# ---------------------------------------------------------------------------- CLI


def test_cli_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trials", "check", str(TRIALS_DIR)]) == 0
    out = capsys.readouterr().out
    assert "NCT06767007" in out and "inc-wbc-or-anc" in out
    assert "group:any" in out and "manual" in out and "computable" in out
    assert "5 trial(s) valid." in out
    assert "leaf criteria computable" in out


def test_code_literals_and_value_set_names() -> None:
    expr = (
        "%x.where(code.memberOf('https://a/b')).exists()"
        " and %y.extension.where(url = 'http://u').valueCodeableConcept.coding"
        ".where(code in ('1' | '2')).exists() and %z.code.startsWith('C61')"
    )
    assert code_literals(expr) == ["'1'", "'2'", "'C61'"]
    assert member_of_urls(expr) == ["https://a/b"]


def test_check_lists_value_sets_no_criterion_uses(tmp_path: Path) -> None:
    bundle = good_bundle()
    orphan = {
        "resourceType": "ValueSet",
        "id": "orphan",
        "url": "https://fhirmatch.dev/fhir/ValueSet/orphan",
        "status": "active",
        "compose": {"include": [{"system": "http://loinc.org", "concept": [{"code": "1-8"}]}]},
    }
    bundle["entry"].append({"fullUrl": orphan["url"], "resource": orphan})
    report = check_trials([write(tmp_path, bundle)])
    assert report.ok, report.problems
    assert "https://fhirmatch.dev/fhir/ValueSet/orphan" in report.unused_value_sets
    # used by the trial directly, through memberOf, through another ValueSet, or by the engine
    for used in ("platelets", "positive-result", "malignant-neoplasm", "negative-result"):
        assert f"https://fhirmatch.dev/fhir/ValueSet/{used}" not in report.unused_value_sets
    done, total = computable_leaves(report.trials)
    assert (done, total) == (20, 25)


def test_incomplete_definitions_are_marked(trials: dict[str, Trial]) -> None:
    assert "exclusion criteria" in (trials["NCT06084897"].incomplete or "")
    assert "inclusion criterion 6" in (trials["NCT05183958"].incomplete or "")
    complete = [t for t in trials.values() if t.incomplete is None]
    assert {t.id for t in complete} == {"escc-sbrt-antipd1", "NCT03731442", "NCT06767007"}


def test_cli_check_warns_about_incomplete_definitions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["trials", "check", str(TRIALS_DIR)]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "definition incomplete" in line]
    assert len(warnings) == 2, captured.err
    assert all(w.startswith("fhirmatch: warning: ") for w in warnings)
    assert any("NCT06084897: definition incomplete: No exclusion criteria" in w for w in warnings)
    assert any("NCT05183958: definition incomplete" in w for w in warnings)
    assert "DEFINITION INCOMPLETE" in captured.out


def test_drafted_marker_compiled_and_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = good_bundle()
    action(bundle, "inc-platelets").setdefault("extension", []).append(
        {"url": EXT + "drafted", "extension": [{"url": "span", "valueString": "PLT ≥ 100"}]}
    )
    path = write(tmp_path, bundle)
    (trial,) = load_trials([path])
    assert find(trial, "inc-platelets").drafted == "PLT ≥ 100"
    assert trial.drafted_criteria() == ["inc-platelets"]
    assert main(["trials", "check", str(path)]) == 0
    captured = capsys.readouterr()
    assert "1 criteria drafted automatically and not reviewed: inc-platelets" in captured.err
    assert main(["trials", "show", "NCT06767007", "--trials", str(path)]) == 0
    out = capsys.readouterr().out
    assert "DRAFTED, NOT REVIEWED: drafted from 'PLT ≥ 100'" in out
    # a reviewer clears the mark by removing the extension
    exts = action(bundle, "inc-platelets")["extension"]
    exts[:] = [e for e in exts if e["url"] != EXT + "drafted"]
    (trial,) = load_trials([write(tmp_path, bundle)])
    assert trial.drafted_criteria() == []


def test_cli_check_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = good_bundle()
    broken_fhirpath(bundle)
    path = write(tmp_path, bundle)
    assert main(["trials", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "FHIRPath" in err


def test_cli_show(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trials", "show", "escc-sbrt-antipd1", "--trials", str(TRIALS_DIR)]) == 0
    out = capsys.readouterr().out
    assert "[exclusion] exc-hbv" in out
    assert "in [IU]/mL" in out and "in {copies}/mL" in out
    assert "manual review: Consent is obtained in person." in out
    assert "within the last 30 days" in out


def test_cli_show_default_path_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, good_bundle())
    monkeypatch.setenv("FHIRMATCH_TRIALS", str(tmp_path))
    assert main(["trials", "show", "NCT06767007"]) == 0
    assert main(["trials", "show", "NCT03731442"]) == 2
    assert "no trial 'NCT03731442'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- conditions


def lab(value: float, high: float | None = None) -> dict[str, Any]:
    obs: dict[str, Any] = {"resourceType": "Observation", "valueQuantity": {"value": value}}
    if high is not None:
        obs["referenceRange"] = [{"high": {"value": high}}]
    return obs


def evaluate(c: Criterion, **bound: Any) -> list[Any]:
    """The condition evaluated by fhirpathpy (with fhirmatch's memberOf) and by the compiled
    closures: both must agree."""
    from fhirmatch.fhirpath import compile_expression
    from fhirmatch.terminology import Terminology

    assert c.expression is not None
    env = {i.name: [] for i in c.inputs} | {"age": 50} | bound
    terminology = Terminology.load()
    slow = compile_expression(c.expression, native=False, terminology=terminology)({}, env)
    fast = compile_expression(c.expression, terminology=terminology)({}, env)
    assert fast == slow
    return slow


def test_conditions_tri_state(trials: dict[str, Trial]) -> None:
    t = trials["escc-sbrt-antipd1"]
    hbv = find(t, "exc-hbv")
    assert evaluate(hbv, hbv_iu=[lab(2500)]) == [True]
    assert evaluate(hbv, hbv_copies=[lab(20000)]) == [True]
    assert evaluate(hbv, hbv_iu=[lab(100)], hbv_copies=[lab(500)]) == [False]
    # one test in one of two units: a low result in one unit with none in the other is not met
    assert evaluate(hbv, hbv_iu=[lab(1500)]) == [False]
    assert evaluate(hbv, hbv_copies=[lab(5000)]) == [False]
    assert evaluate(hbv) == [False]  # nothing measured: not met (the engine says "no record")
    liver = find(t, "inc-transaminases-alp")
    assert evaluate(liver) == []  # none measured: unknown, not fail
    assert evaluate(liver, alt=[lab(90, 40)]) == [True]
    assert evaluate(liver, alt=[lab(90, 40)], alp=[lab(400, 120)]) == [False]
    crea = find(t, "inc-creatinine")
    assert evaluate(crea, crea=[lab(3.0, 1.2)], crcl=[lab(75)]) == [True]
    assert evaluate(crea, crea=[lab(3.0, 1.2)], crcl=[lab(40)]) == [False]


def test_histology_and_other_malignancy_conditions(trials: dict[str, Trial]) -> None:
    t = trials["escc-sbrt-antipd1"]
    histo_url = (
        "http://hl7.org/fhir/us/mcode/StructureDefinition/mcode-histology-morphology-behavior"
    )
    scc = {
        "resourceType": "Condition",
        "extension": [
            {
                "url": histo_url,
                "valueCodeableConcept": {
                    "coding": [{"system": "http://snomed.info/sct", "code": "28899001"}]
                },
            }
        ],
    }
    escc = find(t, "inc-escc")
    assert evaluate(escc, ec=[scc]) == [True]
    assert evaluate(escc, ec=[{"resourceType": "Condition"}]) == []  # histology not recorded
    assert evaluate(escc) == [False]
    other = find(t, "exc-other-malignancy")

    def prostate(status: str) -> dict[str, Any]:
        return {
            "resourceType": "Condition",
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "C61"}]},
            "clinicalStatus": {"coding": [{"code": status}]},
        }

    assert evaluate(other, other=[prostate("resolved")]) == [False]  # cured prostate cancer
    assert evaluate(other, other=[prostate("active")]) == [True]


def test_evaluate_warns_and_reports_incomplete_definitions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    patients = TRIALS_DIR.parent / "patients"
    argv = ["evaluate", "--trials", str(TRIALS_DIR), "--patients", str(patients)]
    assert main([*argv, "--trial", "NCT06084897", "--format", "json", "--as-of", "2026-11-01"]) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)["results"]
    assert results and all("exclusion criteria" in r["incomplete"] for r in results)
    assert all(r["drafted"] == [] for r in results)
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "NCT06084897: definition incomplete" in warnings[0]
    assert main([*argv, "--trial", "NCT06767007", "NCT05183958", "--as-of", "2026-11-01"]) == 0
    captured = capsys.readouterr()
    assert "! definition incomplete: Inclusion criteria after 6" in captured.out
    assert "NCT05183958: definition incomplete" in captured.err
    assert "NCT06767007: definition" not in captured.err


def test_a_body_site_filter_uses_its_value_set_and_drafts_keep_theirs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The seed trials' check: the thoracic sites of a radiotherapy input's second code filter
    are in use; lab ValueSets only `trials import` names are said apart, not warned about."""
    from fhirmatch.terminology import Terminology

    report = check_trials([TRIALS_DIR], terminology=Terminology.load())
    assert "https://fhirmatch.dev/fhir/ValueSet/thoracic-body-site" not in report.unused_value_sets
    glucose = "https://fhirmatch.dev/fhir/ValueSet/glucose"
    assert glucose in report.unused_value_sets  # no seed trial asks for glucose ...
    assert main(["trials", "check", str(TRIALS_DIR)]) == 0
    out, err = capsys.readouterr()
    assert "serve the criteria `fhirmatch trials import` drafts" in out
    assert glucose not in err  # ... but a drafted criterion may: not a warning
