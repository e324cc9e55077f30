"""The HTML report: self-contained, owner-only, and its figures come from the results."""

from __future__ import annotations

import re
import stat
from datetime import date
from pathlib import Path

import pytest

from fhirmatch.match import MatchOutcome, TrialSummary
from fhirmatch.model import Criterion, Trial
from fhirmatch.report import (
    build_sections,
    mrns_of,
    read_report_data,
    render_report,
    write_report,
)
from fhirmatch.results import CriterionResult, TrialResult

STUDY = "ResearchStudy/S"


def _trial() -> Trial:
    crits = (
        Criterion(id="inc-ecog", kind="inclusion", text="ECOG ≤ 1", expression="true"),
        Criterion(id="inc-plt", kind="inclusion", text="Platelets ≥ 100", expression="true"),
        Criterion(id="exc-bm", kind="exclusion", text="Brain metastases", expression="false"),
    )
    return Trial(
        id="S",
        title="Study <S>",
        identifiers=(),
        criteria=crits,
        plan_definition_id="S-eligibility",
    )


def _result(pid: str, ecog: str, plt: str, bm: str) -> TrialResult:
    outcomes = {"inc-ecog": ecog, "inc-plt": plt, "exc-bm": bm}
    crits = [
        CriterionResult(
            id=cid,
            kind="exclusion" if cid.startswith("exc") else "inclusion",
            text=cid,
            outcome=o,
            evidence=[f"Observation/{pid}-{cid}"],  # type: ignore[arg-type]
            reason=f"{cid} reason",
        )
        for cid, o in outcomes.items()
    ]
    if "fail" in outcomes.values():
        status = "ineligible"
    elif "unknown" in outcomes.values():
        status = "insufficient-data"
    else:
        status = "eligible"
    return TrialResult(
        patient=f"Patient/{pid}",
        study=STUDY,
        status=status,  # type: ignore[arg-type]
        criteria=crits,
    )


def _outcome() -> MatchOutcome:
    out = MatchOutcome(as_of=date(2026, 11, 1), started="2026-11-24T10:00:00Z")
    out.results = [
        _result("a", "pass", "pass", "pass"),
        _result("b", "pass", "unknown", "pass"),
        _result("c", "fail", "fail", "pass"),
        _result("d", "pass", "fail", "pass"),
        _result("e", "pass", "pass", "fail"),
        _result("f", "unknown", "unknown", "pass"),
    ]
    out.summaries[STUDY] = TrialSummary(study=STUDY, title="Study S", created=3)
    out.skipped["Patient/z"] = "fetch failed: HTTP 503"
    return out


def test_sections_count_from_results() -> None:
    (sec,) = build_sections(_outcome(), [_trial()])
    assert sec.screened == 6
    assert [r.patient for r in sec.eligible] == ["Patient/a"]
    assert [r.patient for r in sec.insufficient] == ["Patient/b", "Patient/f"]
    assert sec.ineligible == 3
    assert [(c.id, c.count) for c in sec.attrition] == [
        ("inc-plt", 2),
        ("inc-ecog", 1),
        ("exc-bm", 1),
    ]
    assert [(c.id, c.count) for c in sec.unknown] == [("inc-plt", 2), ("inc-ecog", 1)]


def test_report_is_self_contained_and_escaped() -> None:
    html = render_report(
        _outcome(),
        [_trial()],
        server="http://127.0.0.1:8080/fhir",
        parameters={"server": "http://127.0.0.1:8080/fhir"},
    )
    assert "Study &lt;S&gt;" in html  # autoescaped
    assert 'href="http://127.0.0.1:8080/fhir/Observation/a-inc-ecog"' in html
    assert "Patient/z" in html and "HTTP 503" in html
    # nothing to fetch: no external scripts, styles, images or fonts
    assert not re.search(r'<(script|link|img)\b[^>]*(src|href)="https?://', html)
    assert "@import" not in html


def test_report_file_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_report(path, _outcome(), [_trial()], parameters={})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text(encoding="utf-8").startswith("<!doctype html>")


def test_report_warns_about_incomplete_and_drafted_trials() -> None:
    base = _trial()
    crits = (
        Criterion(
            id="inc-ecog", kind="inclusion", text="ECOG ≤ 1", expression="true", drafted="ECOG ≤ 1"
        ),
        *base.criteria[1:],
    )
    trial = Trial(
        id="S",
        title="Study S",
        identifiers=(),
        criteria=crits,
        plan_definition_id="S-eligibility",
        incomplete="No exclusion criteria could be sourced.",
    )
    html = render_report(_outcome(), [trial])
    assert "Incomplete definition" in html
    assert "No exclusion criteria could be sourced." in html
    assert "1 criteria drafted automatically, not reviewed" in html and "inc-ecog" in html
    plain = render_report(_outcome(), [_trial()])
    assert "Incomplete definition" not in plain and "drafted automatically" not in plain


# ------------------------------------------------------------------ the last picture is kept


def _quiet_outcome() -> MatchOutcome:
    """An incremental run with nothing to screen."""
    out = MatchOutcome(as_of=date(2026, 11, 2), started="2026-11-25T02:15:00Z")
    out.incremental = True
    out.since = "2026-11-24T09:59:58Z"
    out.summaries[STUDY] = TrialSummary(study=STUDY, title="Study S")
    return out


def _counts_row(html: str) -> list[int]:
    row = re.search(r'<tr><td class="num">.*?</tr>', html, re.DOTALL)
    assert row is not None
    return [int(n) for n in re.findall(r'class="num">(\d+)<', row.group(0))]


def test_incremental_run_with_nothing_to_screen_keeps_the_picture(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_report(path, _outcome(), [_trial()], parameters={})
    before = _counts_row(path.read_text(encoding="utf-8"))
    assert before[:4] == [6, 1, 2, 3]

    write_report(path, _quiet_outcome(), [_trial()], parameters={})
    html = path.read_text(encoding="utf-8")
    assert "No changes since 2026-11-24T09:59:58Z" in html
    assert "0 patients screened" not in html
    assert "6 patients screened" in html
    # screened, eligible, insufficient, ineligible kept; nothing written; all six carried
    assert _counts_row(html) == [6, 1, 2, 3, 0, 0, 6]
    assert "Patient/a" in html and "Patient/b" in html
    assert "the last screening, 2026-11-24T10:00:00Z (as of 2026-11-01)" in html
    # and again: a second quiet run still shows the same picture
    write_report(path, _quiet_outcome(), [_trial()], parameters={})
    assert _counts_row(path.read_text(encoding="utf-8")) == [6, 1, 2, 3, 0, 0, 6]


def test_incremental_run_replaces_only_the_patients_it_screened(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_report(path, _outcome(), [_trial()], parameters={})
    out = _quiet_outcome()
    out.results = [_result("a", "pass", "fail", "pass")]  # a is no longer eligible
    out.summaries[STUDY] = TrialSummary(study=STUDY, title="Study S", updated=1)
    write_report(path, out, [_trial()], parameters={})
    html = path.read_text(encoding="utf-8")
    assert "No changes since" not in html
    assert "Incremental run: 1 patients" in html
    assert _counts_row(html) == [6, 0, 2, 4, 1, 0, 5]
    data = read_report_data(path)
    assert data is not None and len(data.results) == 6
    assert data.updated == "2026-11-25T02:15:00Z"


def test_incremental_run_without_a_previous_report_says_so(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_report(path, _quiet_outcome(), [_trial()], parameters={})
    html = path.read_text(encoding="utf-8")
    assert "No changes since 2026-11-24T09:59:58Z" in html
    assert "no earlier report here" in html


def test_a_damaged_previous_report_is_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "report.html"
    path.write_text(
        '<script type="application/json" id="fhirmatch-report-data">{"version": 1, '
        '"results": [{"nope": 1}]}</script>'
    )
    write_report(path, _quiet_outcome(), [_trial()], parameters={})
    assert "no earlier report here" in path.read_text(encoding="utf-8")
    assert any("unreadable data" in r.getMessage() for r in caplog.records)
    path.write_bytes(b"\xff\xfe not html")
    write_report(path, _quiet_outcome(), [_trial()], parameters={})
    assert read_report_data(path) is not None


def test_the_embedded_data_survives_markup_in_reasons(tmp_path: Path) -> None:
    out = _outcome()
    sneaky = CriterionResult(
        id="inc-ecog",
        kind="inclusion",
        text="x",
        outcome="unknown",
        reason="</script><script>alert(1)</script><!--",
    )
    out.results = [
        TrialResult(patient="Patient/q", study=STUDY, status="insufficient-data", criteria=[sneaky])
    ]
    path = tmp_path / "report.html"
    write_report(path, out, [_trial()], parameters={})
    html = path.read_text(encoding="utf-8")
    assert "<script>alert" not in html
    data = read_report_data(path)
    assert data is not None and data.results[0].criteria[0].reason == sneaky.reason


# ------------------------------------------------------------------ for the study coordinator


def test_trial_and_plan_definition_versions_are_shown() -> None:
    trial = Trial(
        id="S",
        title="Study S",
        identifiers=(("https://clinicaltrials.gov", "NCT01234567"),),
        criteria=_trial().criteria,
        plan_definition_id="S-eligibility",
        plan_definition_url="https://example.org/PlanDefinition/S",
        version="2.1.0",
        resources=({"resourceType": "ResearchStudy", "id": "S", "version": "7"},),
    )
    html = render_report(_outcome(), [trial])
    assert "NCT01234567" in html
    assert "PlanDefinition/S-eligibility · version 2.1.0" in html
    assert "version 7" in html


def test_navigation_links_every_trial() -> None:
    t1 = _trial()
    t2 = Trial(
        id="T",
        title="Study T",
        identifiers=(),
        criteria=t1.criteria,
        plan_definition_id="T-eligibility",
    )
    out = _outcome()
    out.results = out.results + [
        r.model_copy(update={"study": "ResearchStudy/T"}) for r in out.results
    ]
    html = render_report(out, [t1, t2])
    nav = re.search(r"<nav.*?</nav>", html, re.DOTALL)
    assert nav is not None
    targets = re.findall(r'href="#([^"]+)"', nav.group(0))
    assert targets == ["trial-S", "trial-T"]
    for t in targets:
        assert f'<section id="{t}">' in html
    assert '<a href="#trial-T">next trial</a>' in html
    assert '<a href="#trial-S">previous trial</a>' in html


def test_counts_include_ineligible_and_unchanged() -> None:
    out = _outcome()
    out.summaries[STUDY] = TrialSummary(study=STUDY, title="Study S", created=1, unchanged=2)
    html = render_report(out, [_trial()])
    head = re.search(r"<tr><th>screened</th>.*?</tr>", html, re.DOTALL)
    assert head is not None and "<th>ineligible</th>" in head.group(0)
    assert "<th>unchanged</th>" in head.group(0)
    assert _counts_row(html) == [6, 1, 2, 3, 1, 2]


def _unknown(pid: str, reason: str) -> TrialResult:
    crits = [
        CriterionResult(id="inc-ecog", kind="inclusion", text="x", outcome="pass"),
        CriterionResult(id="inc-plt", kind="inclusion", text="x", outcome="unknown", reason=reason),
        CriterionResult(id="exc-bm", kind="exclusion", text="x", outcome="pass"),
    ]
    return TrialResult(
        patient=f"Patient/{pid}", study=STUDY, status="insufficient-data", criteria=crits
    )


def test_a_criterion_unknown_for_nearly_everyone_is_explained() -> None:
    out = _outcome()
    window = "no record of plt (Observation in ValueSet platelets) within 15 days before "
    out.results = [
        _unknown(p, window + f"2027-06-01; the latest, 2026-10-{28 + i}, is outside the window")
        for i, p in enumerate("abcd")
    ] + [_unknown("e", window + "2027-06-01")]
    (sec,) = build_sections(out, [_trial()])
    (plt,) = [c for c in sec.unknown if c.id == "inc-plt"]
    assert plt.explanation is not None
    assert "Unknown for all patients screened" in plt.explanation
    assert "most often (4): only results older than the 15-day look-back window" in (
        plt.explanation
    )
    assert "laboratory feed is current" in plt.explanation
    html = render_report(out, [_trial()])
    assert '<div class="explain">Unknown for all patients screened' in html
    # no patient's own dates in the explanation
    assert "2026-10-28" not in plt.explanation


def test_no_explanation_when_only_some_are_unknown() -> None:
    (sec,) = build_sections(_outcome(), [_trial()])  # inc-plt unknown for 2 of 6
    assert all(c.explanation is None for c in sec.unknown)


def test_criterion_labels_are_not_clipped() -> None:
    long_text = (
        "Adequate bone marrow function: platelets at least 100 x 10^9/L within 14 days before "
        "registration, without transfusion in the 7 days before the test"
    )
    crits = (
        Criterion(id="inc-plt", kind="inclusion", text=long_text, expression="true"),
        *[c for c in _trial().criteria if c.id != "inc-plt"],
    )
    trial = Trial(
        id="S", title="Study S", identifiers=(), criteria=crits, plan_definition_id="S-eligibility"
    )
    html = render_report(_outcome(), [trial])
    chart = re.search(
        r'<table class="chart" aria-label="attrition chart">.*?</table>', html, re.DOTALL
    )
    assert chart is not None
    assert long_text in chart.group(0)  # whole, in a cell that wraps
    assert "<svg" not in html  # no fixed-width label column to clip it


def test_mrns_are_shown_only_when_given() -> None:
    assert "MRN" not in render_report(_outcome(), [_trial()])
    html = render_report(_outcome(), [_trial()], identifiers={"Patient/a": ["MRN-77"]})
    assert "<summary>Patient/a · MRN MRN-77</summary>" in html


def test_mrns_of_reads_identifiers_of_type_mr() -> None:
    mr = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}
    patient = {
        "resourceType": "Patient",
        "identifier": [
            {"system": "urn:mrn", "type": mr, "value": "M1"},
            {"system": "urn:ssn", "value": "999"},
            {"type": {"coding": [{"code": "SS"}]}, "value": "998"},
            {"type": mr},
        ],
    }
    assert mrns_of(patient) == ["M1"]
