"""The one reader for qualitative results: every way a feed writes positive or negative."""

from __future__ import annotations

from typing import Any

import pytest

from fhirmatch.model import Threshold
from fhirmatch.qualitative import read_qualitative, read_text
from fhirmatch.terminology import Terminology

SCT = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
V3 = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
HCG = Threshold(positive=25, unit="m[IU]/mL", negative=5)
RNA = Threshold(if_quantified=True)


@pytest.fixture(scope="module")
def terminology() -> Terminology:
    return Terminology.load()


def cc(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def interp(code: str) -> list[dict[str, Any]]:
    return [cc(V3, code)]


def qty(value: float, unit: str = "m[IU]/mL", comparator: str | None = None) -> dict[str, Any]:
    q: dict[str, Any] = {"value": value, "unit": unit, "system": UCUM, "code": unit}
    if comparator:
        q["comparator"] = comparator
    return q


CASES: list[tuple[str, dict[str, Any], Threshold | None, str | None]] = [
    ("snomed-positive", {"valueCodeableConcept": cc(SCT, "10828004")}, None, "positive"),
    ("snomed-detected", {"valueCodeableConcept": cc(SCT, "260373001")}, None, "positive"),
    ("snomed-reactive", {"valueCodeableConcept": cc(SCT, "11214006")}, None, "positive"),
    ("snomed-negative", {"valueCodeableConcept": cc(SCT, "260385009")}, None, "negative"),
    ("snomed-not-detected", {"valueCodeableConcept": cc(SCT, "260415000")}, None, "negative"),
    ("snomed-non-reactive", {"valueCodeableConcept": cc(SCT, "131194007")}, None, "negative"),
    ("loinc-positive", {"valueCodeableConcept": cc(LOINC, "LA6576-8")}, None, "positive"),
    ("loinc-not-detected", {"valueCodeableConcept": cc(LOINC, "LA11883-8")}, None, "negative"),
    ("uscore-pregnant", {"valueCodeableConcept": cc(SCT, "77386006")}, None, "positive"),
    ("uscore-not-pregnant", {"valueCodeableConcept": cc(SCT, "60001007")}, None, "negative"),
    ("uscore-pregnancy-unknown", {"valueCodeableConcept": cc(SCT, "261665006")}, None, None),
    ("coded-text-only", {"valueCodeableConcept": {"text": "Negative"}}, None, "negative"),
    ("string-positive-any-case", {"valueString": "POSITIVE"}, None, "positive"),
    ("string-pos", {"valueString": "pos"}, None, "positive"),
    ("string-detected", {"valueString": "Detected."}, None, "positive"),
    ("string-not-detected", {"valueString": "Not Detected"}, None, "negative"),
    ("string-non-reactive", {"valueString": "non-reactive"}, None, "negative"),
    ("string-nonreactive", {"valueString": "Nonreactive"}, None, "negative"),
    ("string-free-text", {"valueString": "see comment"}, None, None),
    ("boolean-true", {"valueBoolean": True}, None, "positive"),
    ("boolean-false", {"valueBoolean": False}, None, "negative"),
    ("interpretation-pos", {"interpretation": interp("POS")}, None, "positive"),
    ("interpretation-nd", {"interpretation": interp("ND")}, None, "negative"),
    ("interpretation-high-says-nothing", {"interpretation": interp("H")}, None, None),
    ("hcg-above", {"valueQuantity": qty(30)}, HCG, "positive"),
    ("hcg-at-threshold", {"valueQuantity": qty(25)}, HCG, "positive"),
    ("hcg-below", {"valueQuantity": qty(2)}, HCG, "negative"),
    ("hcg-equivocal", {"valueQuantity": qty(12)}, HCG, None),
    ("hcg-other-unit", {"valueQuantity": qty(40, "[IU]/L")}, HCG, "positive"),
    ("hcg-censored-below", {"valueQuantity": qty(2, comparator="<")}, HCG, "negative"),
    ("hcg-censored-wide", {"valueQuantity": qty(10, comparator="<")}, HCG, None),
    ("hcg-censored-above", {"valueQuantity": qty(1000, comparator=">")}, HCG, "positive"),
    ("hcg-numeric-string", {"valueString": "<2 mIU/mL"}, HCG, "negative"),
    ("number-without-threshold", {"valueQuantity": qty(30)}, None, None),
    ("hcv-rna-quantified", {"valueQuantity": qty(150000, "[IU]/mL")}, RNA, "positive"),
    ("hcv-rna-below-limit", {"valueQuantity": qty(15, "[IU]/mL", "<")}, RNA, "negative"),
    ("hcv-rna-zero", {"valueQuantity": qty(0, "[IU]/mL")}, RNA, "negative"),
    (
        "coded-and-interpretation-agree",
        {"valueCodeableConcept": cc(SCT, "10828004"), "interpretation": interp("POS")},
        None,
        "positive",
    ),
    (
        "coded-and-interpretation-disagree",
        {"valueCodeableConcept": cc(SCT, "10828004"), "interpretation": interp("NEG")},
        None,
        None,
    ),
    ("no-value", {}, None, None),
]


@pytest.mark.parametrize(("name", "obs", "threshold", "expected"), CASES, ids=[c[0] for c in CASES])
def test_reader(
    terminology: Terminology,
    name: str,
    obs: dict[str, Any],
    threshold: Threshold | None,
    expected: str | None,
) -> None:
    reading = read_qualitative({"resourceType": "Observation", **obs}, terminology, threshold)
    assert reading.result == expected, reading.source


def test_reasons_say_what_was_read_and_why_not() -> None:
    terminology = Terminology.load()
    read = read_qualitative({"valueString": "Reactive"}, terminology)
    assert read.source == "positive from valueString"
    clash = {"valueBoolean": True, "interpretation": interp("NEG")}
    assert "disagree" in read_qualitative(clash, terminology).source
    bare = read_qualitative({"valueQuantity": qty(3)}, terminology)
    assert "no threshold" in bare.source


def test_wordings() -> None:
    assert read_text(" Negative ") == "negative"
    assert read_text("NOT DETECTED") == "negative"
    assert read_text("non reactive") == "negative"
    assert read_text("+") == "positive"
    assert read_text("weakly positive?") is None  # a qualified wording is for a person


def test_a_result_written_as_text_is_read_as_the_answer_its_wording_names() -> None:
    from fhirmatch.qualitative import read_coded_answer
    from fhirmatch.terminology import Terminology

    term = Terminology.load()
    sets = (
        "https://fhirmatch.dev/fhir/ValueSet/msi-stable",
        "https://fhirmatch.dev/fhir/ValueSet/msi-high",
    )
    stable, high = ("http://loinc.org", "LA14122-8"), ("http://loinc.org", "LA26203-2")
    assert read_coded_answer({"valueString": "MSS"}, term, sets) == stable
    assert read_coded_answer({"valueString": "Microsatellite-stable."}, term, sets) == stable
    assert read_coded_answer({"valueCodeableConcept": {"text": "MSI-H"}}, term, sets) == high
    assert read_coded_answer({"valueString": "MSI-L"}, term, sets) is None
    assert read_coded_answer({"valueString": "see report"}, term, sets) is None
    coded = {
        "valueCodeableConcept": {
            "coding": [{"system": "http://loinc.org", "code": "LA26203-2"}],
            "text": "MSS",
        }
    }
    assert read_coded_answer(coded, term, sets) is None  # the code decides, not the text
