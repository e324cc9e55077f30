"""fetch_patient_data: which searches it sends, and how it sorts what comes back."""

from __future__ import annotations

import datetime as dt
import urllib.parse
from typing import Any

import pytest
import responses

from fhirmatch.client import ClientConfig, FhirClient
from fhirmatch.errors import AuthenticationError
from fhirmatch.fetch import fetch_patient_data
from fhirmatch.model import DataInput

BASE = "https://fhir.example.org/r4"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
AS_OF = dt.date(2025, 6, 30)


@pytest.fixture
def client() -> FhirClient:
    return FhirClient(ClientConfig(BASE, max_attempts=2), sleep=lambda s: None)


def bundle(*resources: dict[str, Any], included: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    entries = [{"resource": r, "search": {"mode": "match"}} for r in resources]
    entries += [{"resource": r, "search": {"mode": "include"}} for r in included]
    return {"resourceType": "Bundle", "type": "searchset", "entry": entries}


def patient(pid: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid}


def res(rtype: str, rid: str, pid: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": rtype, "id": rid, "subject": {"reference": f"Patient/{pid}"}, **extra}


def query(call: Any) -> dict[str, list[str]]:
    request = call.request
    if request.method == "POST":
        return urllib.parse.parse_qs(request.body)
    return urllib.parse.parse_qs(urllib.parse.urlsplit(request.url).query)


def inp(
    rtype: str, codes: set[tuple[str, str]], lookback: int | None = None, **kw: Any
) -> DataInput:
    return DataInput(
        name=f"{rtype}-{len(codes)}",
        resource_type=rtype,
        codes=frozenset(codes),
        lookback_days=lookback,
        **kw,
    )


@responses.activate
def test_one_search_per_type_combining_codes_and_widest_window(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient", json=bundle(patient("a"), patient("b")))
    responses.get(
        f"{BASE}/Observation",
        json=bundle(
            res("Observation", "o1", "a"),
            res("Observation", "o2", "b"),
            res("Observation", "stray", "zzz"),
        ),
    )
    responses.get(f"{BASE}/Condition", json=bundle(res("Condition", "c1", "a")))
    reqs = [
        inp("Observation", {(LOINC, "2160-0")}, lookback=30),
        inp("Observation", {(LOINC, "718-7"), (LOINC, "2160-0")}, lookback=90),
        inp("Condition", {("http://snomed.info/sct", "254637007")}, lookback=365),
    ]
    result = fetch_patient_data(client, ["a", "b"], reqs, as_of=AS_OF)
    assert result.requests == 3
    assert result.errors == {}
    assert [r["id"] for r in result.resources["a"]] == ["a", "c1", "o1"]
    assert [r["id"] for r in result.resources["b"]] == ["b", "o2"]
    q_patient, q_cond, q_obs = (query(c) for c in responses.calls)
    assert q_patient["_id"] == ["a,b"]
    assert q_obs["patient"] == ["a,b"]
    assert q_obs["code"] == [f"{LOINC}|2160-0,{LOINC}|718-7"]
    assert q_obs["date"] == ["ge2025-04-01"]  # 90 days before AS_OF: the widest window
    assert "date" not in q_cond and "onset-date" not in q_cond  # Conditions are not bounded
    assert "_count" in q_obs


@responses.activate
def test_unbounded_window_and_empty_codes_widen_the_search(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient", json=bundle(patient("a")))
    responses.get(f"{BASE}/Observation", json=bundle())
    reqs = [inp("Observation", {(LOINC, "1")}, lookback=30), inp("Observation", set())]
    fetch_patient_data(client, ["a"], reqs, as_of=AS_OF, since="2025-01-01")
    q = query(responses.calls[1])
    assert "code" not in q
    assert "date" not in q
    assert q["_lastUpdated"] == ["ge2025-01-01"]


@responses.activate
def test_missing_patient_reported_and_not_searched(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient", json=bundle(patient("a")))
    responses.get(f"{BASE}/Observation", json=bundle())
    result = fetch_patient_data(client, ["a", "gone"], [inp("Observation", {(LOINC, "1")})])
    assert result.errors == {"gone": ["Patient not found"]}
    assert query(responses.calls[1])["patient"] == ["a"]
    assert "gone" not in result.resources


@responses.activate
def test_patients_chunked(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient", json=bundle(patient("p1"), patient("p2")))
    responses.get(f"{BASE}/Patient", json=bundle(patient("p3")))
    responses.get(f"{BASE}/Observation", json=bundle())
    responses.get(f"{BASE}/Observation", json=bundle())
    result = fetch_patient_data(
        client, ["p1", "p2", "p3", "p1"], [inp("Observation", {(LOINC, "1")})], chunk_size=2
    )
    assert result.requests == 4
    assert [query(c).get("_id", query(c).get("patient")) for c in responses.calls] == [
        ["p1,p2"],
        ["p3"],
        ["p1,p2"],
        ["p3"],
    ]


@responses.activate
def test_code_lists_split_and_long_queries_posted(client: FhirClient) -> None:
    codes = {(LOINC, f"{i:05d}-0") for i in range(250)}
    responses.get(f"{BASE}/Patient", json=bundle(patient("a")))
    responses.post(f"{BASE}/Observation/_search", json=bundle(res("Observation", "o1", "a")))
    responses.post(f"{BASE}/Observation/_search", json=bundle(res("Observation", "o1", "a")))
    responses.get(f"{BASE}/Observation", json=bundle(res("Observation", "o2", "a")))
    result = fetch_patient_data(
        client, ["a"], [inp("Observation", codes)], max_codes_per_search=100
    )
    assert result.errors == {}
    sent = [query(c)["code"][0].count(",") + 1 for c in responses.calls[1:]]
    assert sent == [100, 100, 50]
    # 100 codes make a query over the GET limit (POST _search); 50 fit in a GET
    assert [c.request.method for c in responses.calls[1:]] == ["POST", "POST", "GET"]
    # o1 came back twice but is kept once
    assert [r["id"] for r in result.resources["a"]] == ["a", "o1", "o2"]


@responses.activate
def test_medications_by_reference_and_inline(client: FhirClient) -> None:
    wanted = (RXNORM, "860975")
    responses.get(f"{BASE}/Patient", json=bundle(patient("a")))
    med_ok = {
        "resourceType": "Medication",
        "id": "m1",
        "code": {"coding": [{"system": RXNORM, "code": "860975"}]},
    }
    med_other = {
        "resourceType": "Medication",
        "id": "m2",
        "code": {"coding": [{"system": RXNORM, "code": "1"}]},
    }
    inline = {"coding": [{"system": RXNORM, "code": "860975"}]}
    contained = {"resourceType": "Medication", "id": "c", "code": inline}
    responses.get(
        f"{BASE}/MedicationRequest",
        json=bundle(
            res("MedicationRequest", "r1", "a", medicationReference={"reference": "Medication/m1"}),
            res("MedicationRequest", "r2", "a", medicationReference={"reference": "Medication/m2"}),
            res("MedicationRequest", "r3", "a", medicationCodeableConcept=inline),
            res(
                "MedicationRequest",
                "r4",
                "a",
                medicationReference={"reference": "#c"},
                contained=[contained],
            ),
            res(
                "MedicationRequest",
                "r5",
                "a",
                medicationCodeableConcept={"coding": [{"system": RXNORM, "code": "2"}]},
            ),
            included=(med_ok, med_other),
        ),
    )
    result = fetch_patient_data(
        client, ["a"], [inp("MedicationRequest", {wanted}, code_path="medication")]
    )
    ids = [r["id"] for r in result.resources["a"]]
    assert ids == ["a", "r1", "m1", "r3", "r4"]
    q = query(responses.calls[1])
    assert q["_include"] == ["MedicationRequest:medication"]
    assert "code" not in q


@responses.activate
def test_medications_by_code_only_when_asked(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient", json=bundle(patient("a")))
    responses.get(f"{BASE}/MedicationStatement", json=bundle())
    fetch_patient_data(
        client,
        ["a"],
        [inp("MedicationStatement", {(RXNORM, "1")}, code_path="medication")],
        medication_refs=False,
    )
    q = query(responses.calls[1])
    assert q["code"] == [f"{RXNORM}|1"]
    assert "_include" not in q


@responses.activate
def test_multi_patient_refused_falls_back_per_patient(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient", json=bundle(patient("a"), patient("b")))
    responses.get(f"{BASE}/Observation", status=400)
    responses.get(f"{BASE}/Observation", json=bundle(res("Observation", "o1", "a")))
    responses.get(f"{BASE}/Observation", json=bundle(res("Observation", "o2", "b")))
    result = fetch_patient_data(client, ["a", "b"], [inp("Observation", {(LOINC, "1")})])
    assert [query(c)["patient"] for c in responses.calls[1:]] == [["a,b"], ["a"], ["b"]]
    assert result.errors == {}
    assert [r["id"] for r in result.resources["b"]] == ["b", "o2"]


@responses.activate
def test_failed_search_recorded_per_patient(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient", json=bundle(patient("a"), patient("b")))
    responses.get(f"{BASE}/Observation", status=503)
    result = fetch_patient_data(client, ["a", "b"], [inp("Observation", {(LOINC, "1")})])
    assert set(result.errors) == {"a", "b"}
    assert "Observation search failed" in result.errors["a"][0]
    assert "503" in result.errors["a"][0]
    assert result.requests == 3  # Patient + 2 attempts


@responses.activate
def test_authentication_failure_is_raised(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient", status=401)
    with pytest.raises(AuthenticationError):
        fetch_patient_data(client, ["a"], [])


@responses.activate
def test_icd_categories_fetch_the_whole_list(client: FhirClient) -> None:
    """``code=icd|C15`` would only find C15 itself, never C15.4: such types come unfiltered."""
    responses.get(f"{BASE}/Patient", json=bundle(patient("a")))
    responses.get(f"{BASE}/Condition", json=bundle(res("Condition", "c1", "a")))
    responses.get(f"{BASE}/Observation", json=bundle())
    reqs = [
        inp("Condition", {("http://hl7.org/fhir/sid/icd-10-cm", "C15"), (SNOMED, "1")}),
        inp("Observation", {(LOINC, "1")}),
    ]
    result = fetch_patient_data(client, ["a"], reqs, as_of=AS_OF)
    cond = next(query(c) for c in responses.calls if "/Condition" in c.request.url)
    obs = next(query(c) for c in responses.calls if "/Observation" in c.request.url)
    assert "code" not in cond
    assert obs["code"] == [f"{LOINC}|1"]
    assert [r["id"] for r in result.resources["a"] if r["resourceType"] == "Condition"] == ["c1"]


@responses.activate
def test_dispenses_and_medicines_named_in_text_are_fetched(client: FhirClient) -> None:
    name = ("https://fhirmatch.dev/fhir/CodeSystem/medication-name", "camrelizumab")
    ingredient = ("https://fhirmatch.dev/fhir/CodeSystem/medication-ingredient", "camrelizumab")
    responses.get(f"{BASE}/Patient", json=bundle(patient("a")))
    named = {"coding": [{"system": "urn:local", "code": "X1", "display": "Camrelizumab 200mg"}]}
    responses.get(
        f"{BASE}/MedicationDispense",
        json=bundle(
            res("MedicationDispense", "d1", "a", medicationCodeableConcept=named),
            res("MedicationDispense", "d2", "a", medicationCodeableConcept={"text": "aspirin"}),
        ),
    )
    result = fetch_patient_data(
        client, ["a"], [inp("MedicationDispense", {name, ingredient}, 30)], as_of=AS_OF
    )
    assert [r["id"] for r in result.resources["a"]] == ["a", "d1"]
    q = query(responses.calls[1])
    assert q["whenhandedover"] == ["ge2025-05-31"]


@responses.activate
def test_internal_code_systems_are_never_sent(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient", json=bundle(patient("a")))
    responses.get(f"{BASE}/MedicationStatement", json=bundle())
    codes = {
        (RXNORM, "1"),
        ("https://fhirmatch.dev/fhir/CodeSystem/medication-ingredient", "cisplatin"),
        ("https://fhirmatch.dev/fhir/CodeSystem/medication-name", "cisplatin"),
    }
    fetch_patient_data(
        client,
        ["a"],
        [inp("MedicationStatement", codes, code_path="medication")],
        medication_refs=False,
    )
    assert query(responses.calls[1])["code"] == [f"{RXNORM}|1"]
