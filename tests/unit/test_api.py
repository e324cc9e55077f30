"""The public API: ``__all__`` and ``docs/api.md`` in step, the error tree, thread safety, silence,
and the Subscription criteria the listener derives from the trials."""

from __future__ import annotations

import ast
import datetime as dt
import importlib.machinery
import inspect
import logging
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest

import fhirmatch
from fhirmatch.listen import Watch, watches_for
from fhirmatch.match import fetch_requirements
from fhirmatch.model import DataInput

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "api.md"
AS_OF = dt.date(2026, 11, 1)


@pytest.fixture(scope="module")
def trials() -> list[fhirmatch.Trial]:
    return fhirmatch.load_trials([REPO / "fixtures" / "trials"])


@pytest.fixture(scope="module")
def records() -> list[fhirmatch.PatientRecord]:
    problems: list[str] = []
    recs = fhirmatch.load_patient_records(
        sorted((REPO / "fixtures" / "patients").glob("demo-*.json")), problems=problems
    )
    assert len(recs) >= 10
    return recs


def test_all_and_docs_name_the_same_things() -> None:
    documented = set(re.findall(r"^### `([A-Za-z_]+)`$", DOC.read_text(), flags=re.M))
    assert documented == set(fhirmatch.__all__)
    assert len(fhirmatch.__all__) == len(set(fhirmatch.__all__))


#: public callables still without a docstring in their own module (remove when documented)
MISSING_DOCSTRINGS: set[str] = set()


def _docstring(value: Any) -> str | None:
    """The docstring of a public class or function: at run time, or, in a module compiled with
    mypyc (which drops docstrings; see setup.py), the one its shipped ``.py`` source holds."""
    doc = inspect.getdoc(value)
    module = sys.modules[value.__module__]
    path = Path(module.__file__ or "")
    if doc or not path.name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
        return doc
    tree = ast.parse(path.with_name(module.__name__.rsplit(".", 1)[-1] + ".py").read_text())
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == value.__name__:
            return ast.get_docstring(node)
    raise AssertionError(f"{value.__name__} not found in the source of {module.__name__}")


def test_every_public_name_resolves_and_documents_itself() -> None:
    for name in fhirmatch.__all__:
        value = getattr(fhirmatch, name)
        if inspect.isclass(value) or inspect.isfunction(value) or inspect.isbuiltin(value):
            has_doc = bool(_docstring(value))
            assert has_doc != (name in MISSING_DOCSTRINGS), name
    with pytest.raises(AttributeError):
        _ = fhirmatch.no_such_name  # type: ignore[attr-defined]


def test_every_public_error_is_a_fhirmatch_error() -> None:
    errors = [
        getattr(fhirmatch, n)
        for n in fhirmatch.__all__
        if inspect.isclass(getattr(fhirmatch, n)) and issubclass(getattr(fhirmatch, n), Exception)
    ]
    assert len(errors) == 15
    assert all(issubclass(e, fhirmatch.FhirmatchError) for e in errors)
    # and every error class the errors module defines is exported
    from fhirmatch import errors as module

    defined = {
        n for n, v in vars(module).items() if inspect.isclass(v) and issubclass(v, Exception)
    }
    assert defined <= set(fhirmatch.__all__)


def test_import_is_lazy() -> None:
    code = "import sys, fhirmatch; print('fhirmatch.engine' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_one_engine_many_threads_same_results_as_serial(
    trials: list[fhirmatch.Trial], records: list[fhirmatch.PatientRecord]
) -> None:
    engine = fhirmatch.Engine(trials, fhirmatch.Terminology.load())
    work = records * 4

    def run(rec: fhirmatch.PatientRecord) -> list[dict[str, object]]:
        return [r.model_dump(mode="json") for r in engine.evaluate_patient_record(rec, as_of=AS_OF)]

    serial = [run(r) for r in work]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(run, work))
    assert threaded == serial
    assert {r[0]["status"] for r in serial} >= {"eligible", "ineligible"}


def test_the_library_prints_nothing(
    trials: list[fhirmatch.Trial],
    records: list[fhirmatch.PatientRecord],
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG, logger="fhirmatch")
    terminology = fhirmatch.Terminology.load()
    loaded = fhirmatch.load_trials([REPO / "fixtures" / "trials"], terminology)
    assert fhirmatch.check_trials([REPO / "fixtures" / "trials"]).ok
    engine = fhirmatch.Engine(loaded, terminology)
    outcome = fhirmatch.MatchOutcome(as_of=AS_OF, started="2026-11-01T00:00:00Z")
    for rec in records:
        results = engine.evaluate_patient_record(rec, as_of=AS_OF)
        plans = [fhirmatch.plan_subject(r, None, as_of=AS_OF) for r in results]
        fhirmatch.transaction_for(plans, {})
        outcome.results.extend(results)
        outcome.planned.extend(plans)
    html = fhirmatch.render_report(outcome, loaded)
    fhirmatch.write_report(tmp_path / "r.html", outcome, loaded)
    assert "<html" in html.lower()
    watches_for(fetch_requirements(loaded, terminology))
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def _req(rtype: str, codes: set[tuple[str, str]], **kw: object) -> DataInput:
    return DataInput(name="x", resource_type=rtype, codes=frozenset(codes), **kw)  # type: ignore[arg-type]


def test_watches_one_subscription_per_type_with_the_union_of_codes() -> None:
    reqs = [
        _req("Observation", {("http://loinc.org", "777-3")}),
        _req("Observation", {("http://loinc.org", "718-7"), ("http://loinc.org", "777-3")}),
        _req("Condition", {("http://hl7.org/fhir/sid/icd-10-cm", "C20")}),
        _req("MedicationRequest", {("http://www.nlm.nih.gov/research/umls/rxnorm", "1")}),
        _req("Procedure", {("http://snomed.info/sct", "a,b|c")}),
    ]
    watches = {w.resource_type: w for w in watches_for(reqs)}
    assert watches["Observation"].criteria == (
        "Observation?code=http://loinc.org|718-7,http://loinc.org|777-3"
    )
    # ICD-10 categories stand for descendants and drugs may be references: whole types
    assert watches["Condition"].criteria == "Condition?"
    assert watches["MedicationRequest"].criteria == "MedicationRequest?"
    # a comma or pipe inside a code is escaped, and the criteria decodes back to the token
    _, query = watches["Procedure"].criteria.split("?", 1)
    assert parse_qsl(query) == [("code", "http://snomed.info/sct|a\\,b\\|c")]


def test_conditions_read_for_text_diagnoses_are_fetched_and_watched_whole() -> None:
    """A diagnosis recorded only as text has no code a search, a Subscription or a bulk
    export filter could select it by."""
    from fhirmatch.bulk import export_request_for
    from fhirmatch.fetch import _plans

    sct = {("http://snomed.info/sct", "363402007")}
    plain, text = _req("Condition", sct), _req("Condition", sct, text_systems=frozenset({"s"}))
    assert [p.codes for p in _plans([plain])] == [sct]
    assert [p.codes for p in _plans([plain, text])] == [None]
    assert watches_for([plain])[0].criteria.startswith("Condition?code=")
    assert watches_for([text])[0].criteria == "Condition?"
    assert export_request_for([plain]).type_filters
    assert not export_request_for([text]).type_filters


def test_long_code_lists_are_split_under_the_limit() -> None:
    codes = {("http://loinc.org", f"{i:05d}-{i % 10}") for i in range(300)}
    watches = watches_for([_req("Observation", codes)], max_length=500)
    assert len(watches) > 1
    assert all(len(w.criteria) <= 500 for w in watches)
    seen = [t for w in watches for t in dict(w.params)["code"].split(",")]
    assert sorted(seen) == sorted(f"http://loinc.org|{c}" for _, c in codes)
    assert Watch("Patient").criteria == "Patient?"


def test_the_real_trials_criteria_fit(trials: list[fhirmatch.Trial]) -> None:
    watches = watches_for(fetch_requirements(trials, fhirmatch.Terminology.load()))
    types = {w.resource_type for w in watches}
    assert {"Observation", "Condition", "Procedure"} <= types
    assert all(len(w.criteria) <= 1800 for w in watches)
    platelets = "http://loinc.org|777-3"
    assert any(platelets in w.criteria for w in watches if w.resource_type == "Observation")


def test_listen_options_refuse_a_public_bind_without_a_public_url() -> None:
    with pytest.raises(fhirmatch.ConfigurationError):
        fhirmatch.ListenOptions(host="192.0.2.10")
    assert (
        fhirmatch.ListenOptions(host="192.0.2.10", public_url="https://hooks.example.org").port == 0
    )
