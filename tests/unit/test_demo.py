"""The demo shows the same picture on any day: it screens as of the date the demo patients' data
is written for, says so, and that date gives eligible patients in every fully modelled trial."""

from __future__ import annotations

import datetime as dt
import types
from pathlib import Path

import pytest

from fhirmatch.cli import demo
from fhirmatch.engine import Engine
from fhirmatch.records import load_patient_records
from fhirmatch.trials import load_trials

REPO = Path(__file__).resolve().parents[2]
#: the trials modelled in full (the other two lack their exclusion criteria; README)
FULLY_MODELLED = ("NCT06767007", "NCT03731442", "escc-sbrt-antipd1")


class _FarFuture(dt.date):
    @classmethod
    def today(cls) -> _FarFuture:
        return cls(2031, 6, 1)


def test_the_demo_date_does_not_depend_on_today(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.SimpleNamespace(date=_FarFuture, datetime=dt.datetime, timedelta=dt.timedelta)
    monkeypatch.setattr(demo, "dt", fake)
    assert demo.demo_as_of(None) == dt.date(2026, 11, 1) == demo.DEMO_AS_OF
    assert demo.demo_as_of(dt.date(2026, 12, 1)) == dt.date(2026, 12, 1)


def test_the_demo_date_gives_eligible_patients_in_every_fully_modelled_trial() -> None:
    trials = load_trials([REPO / "fixtures" / "trials"])
    engine = Engine(trials)
    eligible: dict[str, int] = {}
    for record in load_patient_records([REPO / "fixtures" / "patients"]):
        for r in engine.evaluate(record.resources, as_of=demo.DEMO_AS_OF):
            if r.status == "eligible":
                key = r.study.removeprefix("ResearchStudy/")
                eligible[key] = eligible.get(key, 0) + 1
    for trial in FULLY_MODELLED:
        assert eligible.get(trial, 0) >= 1, (trial, eligible)


@pytest.mark.slow
def test_the_demo_run_on_a_far_future_day(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fhirmatch.cli import main

    fake = types.SimpleNamespace(date=_FarFuture, datetime=dt.datetime, timedelta=dt.timedelta)
    monkeypatch.setattr(demo, "dt", fake)
    assert main(["demo", "--report", str(tmp_path / "demo.html")]) == 0
    out = capsys.readouterr().out
    assert "Screening as of 2026-11-01 (the date the demo patients' data is written for" in out
    rows = {
        line.split()[0]: line.split() for line in out.splitlines() if line[:3] in ("NCT", "esc")
    }
    for trial in FULLY_MODELLED:
        assert int(rows[trial][2]) >= 1, out
