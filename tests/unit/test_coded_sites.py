"""Codings as records write them (OIDs, ICD codes without the dot) and the second codeFilter on
a body site, through the real trial loader and engine."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from fhirmatch.engine import Engine
from fhirmatch.errors import TrialDefinitionError
from fhirmatch.terminology import Terminology, canonical_coding
from fhirmatch.trials import compile_trial

SCT = "http://snomed.info/sct"
VS = "https://fhirmatch.dev/fhir/ValueSet/"
KIND = {"system": "https://fhirmatch.dev/fhir/CodeSystem/criterion-kind", "code": "exclusion"}


@pytest.mark.parametrize(
    ("system", "code", "expected"),
    [
        ("urn:oid:2.16.840.1.113883.6.90", "c159", ("http://hl7.org/fhir/sid/icd-10-cm", "C15.9")),
        ("2.16.840.1.113883.6.3", " C15 ", ("http://hl7.org/fhir/sid/icd-10", "C15")),
        ("urn:oid:2.16.840.1.113883.6.96", "39607008", (SCT, "39607008")),
        ("http://loinc.org/", "89247-1", ("http://loinc.org", "89247-1")),
    ],
)
def test_a_record_coding_is_read_in_the_form_expansions_use(
    system: str, code: str, expected: tuple[str, str]
) -> None:
    assert canonical_coding(system, code) == expected


def _plan(filters: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "resourceType": "PlanDefinition",
        "id": "t-eligibility",
        "action": [
            {
                "id": "exc-rt",
                "description": "thoracic irradiation",
                "code": [{"coding": [KIND]}],
                "input": [{"id": "rt", "type": "Procedure", "codeFilter": filters}],
                "condition": [
                    {
                        "kind": "applicability",
                        "expression": {"language": "text/fhirpath", "expression": "%rt.exists()"},
                    }
                ],
            }
        ],
    }


STUDY = {"resourceType": "ResearchStudy", "id": "t", "status": "active"}


@pytest.fixture(scope="module")
def term() -> Terminology:
    return Terminology.load()


@pytest.fixture(scope="module")
def engine(term: Terminology) -> Engine:
    filters = [
        {"path": "code", "valueSet": VS + "radiotherapy"},
        {"path": "bodySite", "valueSet": VS + "thoracic-body-site"},
    ]
    return Engine([compile_trial(STUDY, _plan(filters), term)], term)


def _rt(*sites: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Procedure",
        "id": "rt",
        "status": "completed",
        "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "77427"}]},
        "bodySite": list(sites),
        "subject": {"reference": "Patient/p"},
        "performedDateTime": "2021-02-01",
    }


def _site(code: str, system: str = SCT) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


@pytest.mark.parametrize(
    ("sites", "outcome"),
    [
        ([_site("44029006")], "fail"),  # left lung
        ([_site("44029006", "urn:oid:2.16.840.1.113883.6.96")], "fail"),
        ([_site("122496007"), _site("73056007")], "fail"),  # lumbar spine and right breast
        ([_site("122496007")], "pass"),  # lumbar spine only
        ([], "pass"),  # no site: this input cannot place it (the seed trial asks separately)
    ],
)
def test_the_body_site_must_be_in_its_value_set_too(
    engine: Engine, sites: list[dict[str, Any]], outcome: str
) -> None:
    [result] = engine.evaluate(
        [{"resourceType": "Patient", "id": "p"}, _rt(*sites)], as_of=date(2026, 11, 1)
    )
    assert result.criteria[0].outcome == outcome


def test_a_second_code_filter_must_name_a_known_element_and_a_value_set(
    term: Terminology,
) -> None:
    bad = [{"path": "code", "valueSet": VS + "radiotherapy"}, {"path": "laterality"}]
    with pytest.raises(TrialDefinitionError, match=r"codeFilter\[1\] needs path bodySite"):
        compile_trial(STUDY, _plan(bad), term)
    unknown = [
        {"path": "code", "valueSet": VS + "radiotherapy"},
        {"path": "bodySite", "valueSet": VS + "no-such-site"},
    ]
    with pytest.raises(TrialDefinitionError, match="no-such-site"):
        compile_trial(STUDY, _plan(unknown), term)
