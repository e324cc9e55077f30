"""The HTML report: self-contained, owner-only, and its figures come from the results."""

from __future__ import annotations

import re
import stat
from datetime import date
from pathlib import Path

from fhirmatch.match import MatchOutcome, TrialSummary
from fhirmatch.model import Criterion, Trial
from fhirmatch.report import build_sections, render_report, write_report
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
