"""FhirClient searches: paging by next links (HAPI-shaped), loops, origins, long queries."""

from __future__ import annotations

import json
import logging
import urllib.parse
from typing import Any

import pytest
import responses
from responses import matchers

from fhirmatch.auth import BearerAuth
from fhirmatch.client import ClientConfig, FhirClient, encode_params
from fhirmatch.errors import ConfigurationError, DataError, FatalNetworkError

BASE = "http://hapi.local:8080/fhir"
HAPI = "http://hapi.local:8080/fhir"


def obs(i: int, pid: str = "p1") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"o{i}",
        "subject": {"reference": f"Patient/{pid}"},
    }


def page(
    resources: list[dict[str, Any]], next_url: str | None, included: list[dict[str, Any]] = ()
) -> dict[str, Any]:
    links = [{"relation": "self", "url": f"{BASE}/Observation"}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    entries = [{"resource": r, "search": {"mode": "match"}} for r in resources]
    entries += [{"resource": r, "search": {"mode": "include"}} for r in included]
    return {"resourceType": "Bundle", "type": "searchset", "link": links, "entry": entries}


@pytest.fixture
def client() -> FhirClient:
    config = ClientConfig(BASE, auth=BearerAuth("tok"), allow_insecure_http=True, max_attempts=2)
    return FhirClient(config, sleep=lambda s: None)


def _getpages(offset: int) -> str:
    return (
        f"{HAPI}?_getpages=abc-123&_getpagesoffset={offset}"
        "&_count=2&_pretty=true&_bundletype=searchset"
    )


@responses.activate
def test_hapi_paging_follows_next_links_exactly(client: FhirClient) -> None:
    responses.get(
        f"{BASE}/Observation",
        json=page([obs(1), obs(2)], _getpages(2)),
        match=[matchers.query_param_matcher({"patient": "p1", "_count": "2"})],
    )
    responses.get(
        HAPI,
        json=page([obs(3), obs(4)], _getpages(4)),
        match=[
            matchers.query_param_matcher(
                {
                    "_getpages": "abc-123",
                    "_getpagesoffset": "2",
                    "_count": "2",
                    "_pretty": "true",
                    "_bundletype": "searchset",
                }
            )
        ],
    )
    responses.get(
        HAPI,
        json=page([obs(5)], None),
        match=[
            matchers.query_param_matcher(
                {
                    "_getpages": "abc-123",
                    "_getpagesoffset": "4",
                    "_count": "2",
                    "_pretty": "true",
                    "_bundletype": "searchset",
                }
            )
        ],
    )
    ids = [r["id"] for r in client.iter_resources("Observation", {"patient": "p1", "_count": 2})]
    assert ids == ["o1", "o2", "o3", "o4", "o5"]
    assert client.stats.requests == 3
    # the next link is used byte for byte (parameter order kept)
    assert responses.calls[1].request.url == _getpages(2)


@responses.activate
def test_relative_next_link_resolved_against_base(client: FhirClient) -> None:
    responses.get(
        f"{BASE}/Observation",
        json=page([obs(1)], "Observation?_offset=1&_count=1"),
        match=[matchers.query_param_matcher({"code": "x"})],
    )
    responses.get(
        f"{BASE}/Observation",
        json=page([obs(2)], None),
        match=[matchers.query_param_matcher({"_offset": "1", "_count": "1"})],
    )
    pages = list(client.iter_pages("Observation", {"code": "x"}))
    assert len(pages) == 2
    assert responses.calls[1].request.url == f"{BASE}/Observation?_offset=1&_count=1"


@responses.activate
def test_paging_loop_detected(client: FhirClient) -> None:
    loop = f"{BASE}/Observation?_offset=2"
    responses.get(
        f"{BASE}/Observation", json=page([obs(1)], loop), match=[matchers.query_param_matcher({})]
    )
    responses.get(loop, json=page([obs(2)], loop))
    with pytest.raises(FatalNetworkError, match="paging loop"):
        client.search_all("Observation")
    assert client.stats.requests == 2


@pytest.mark.parametrize(
    "next_url",
    [
        "https://hapi.local:8080/fhir/Observation?_getpages=x",  # scheme
        "http://evil.example.net:8080/fhir/Observation?_getpages=x",  # host
        "http://hapi.local:9090/fhir/Observation?_getpages=x",  # port
    ],
)
@responses.activate
def test_cross_origin_next_link_refused(client: FhirClient, next_url: str) -> None:
    responses.get(f"{BASE}/Observation", json=page([obs(1)], next_url))
    with pytest.raises(FatalNetworkError, match="next link"):
        client.search_all("Observation")
    assert len(responses.calls) == 1  # nothing, and no token, went to the other origin


@responses.activate
def test_include_entries_kept_apart(client: FhirClient) -> None:
    patient = {"resourceType": "Patient", "id": "p1"}
    outcome = {"resourceType": "OperationOutcome", "issue": []}
    body = page([obs(1)], None, included=[patient])
    body["entry"].append({"resource": outcome, "search": {"mode": "outcome"}})
    responses.get(f"{BASE}/Observation", json=body)
    result = client.search_all("Observation", {"_include": "Observation:patient"})
    assert [r["id"] for r in result.matches] == ["o1"]
    assert result.included == [patient]
    assert [r["id"] for r in client.iter_resources("Observation")] == ["o1"]
    assert [r["resourceType"] for r in client.iter_resources("Observation", included=True)] == [
        "Observation",
        "Patient",
    ]


@responses.activate
def test_long_query_goes_to_post_search(client: FhirClient) -> None:
    codes = ",".join(f"http://loinc.org|{i}-{i % 10}" for i in range(150))
    responses.post(f"{BASE}/Observation/_search", json=page([obs(1)], None))
    result = client.search_all("Observation", [("patient", "p1"), ("code", codes)])
    assert len(result.matches) == 1
    request = responses.calls[0].request
    assert request.method == "POST"
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert "?" not in request.url
    form = urllib.parse.parse_qs(request.body)
    assert form["code"] == [codes]
    assert form["patient"] == ["p1"]


@responses.activate
def test_short_query_uses_get_with_repeated_params(client: FhirClient) -> None:
    responses.get(f"{BASE}/Observation", json=page([], None))
    client.search("Observation", {"date": ["ge2020-01-01", "lt2021-01-01"], "_count": 50})
    url = responses.calls[0].request.url
    assert responses.calls[0].request.method == "GET"
    assert url.count("date=") == 2
    assert "_count=50" in url


@responses.activate
def test_max_pages_stops_early(client: FhirClient) -> None:
    responses.get(f"{BASE}/Observation", json=page([obs(1)], f"{BASE}/Observation?p=2"))
    result = client.search_all("Observation", max_pages=1)
    assert result.pages == 1
    assert len(responses.calls) == 1


@responses.activate
def test_non_bundle_answer_is_data_error(client: FhirClient) -> None:
    responses.get(f"{BASE}/Observation", json={"resourceType": "Patient"})
    with pytest.raises(DataError):
        client.search("Observation")


def test_bad_type_and_id_refused(client: FhirClient) -> None:
    with pytest.raises(ConfigurationError):
        client.read("Patient", "../metadata")
    with pytest.raises(ConfigurationError):
        client.search("patient?x=1")


def test_encode_params() -> None:
    assert encode_params({"a": "1", "b": ["2", "3"], "c": 4}) == [
        ("a", "1"),
        ("b", "2"),
        ("b", "3"),
        ("c", "4"),
    ]
    assert encode_params([("x", "1"), ("x", "2")]) == [("x", "1"), ("x", "2")]
    assert encode_params(None) == []


def test_client_repr_has_no_secret() -> None:
    c = FhirClient(ClientConfig("https://x.org/fhir", auth=BearerAuth("tok-secret-42")))
    assert "tok-secret-42" not in repr(c)
    assert "https://x.org/fhir" in repr(c)


@responses.activate
def test_a_lone_surrogate_in_an_answer_is_read_as_a_replacement_character(
    client: FhirClient, caplog: pytest.LogCaptureFixture
) -> None:
    # JSON allows "\udc80" alone, but it is not Unicode text: a result quoting it (a unit in a
    # reason) could not be written as UTF-8. A pair of escapes is one character and stays.
    text = (
        '{"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": '
        '{"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/p1"}, '
        '"code": {"text": "Kreatinin \\ud83d\\ude00"}, '
        '"valueQuantity": {"value": 1.0, "unit": "mg\\udc80dL"}}, "search": {"mode": "match"}}]}'
    )
    responses.get(f"{BASE}/Observation", body=text, content_type="application/fhir+json")
    with caplog.at_level(logging.WARNING, logger="fhirmatch.client"):
        (resource,) = client.search_all("Observation", {}).matches
    assert resource["valueQuantity"]["unit"] == "mg\ufffddL"
    assert resource["code"]["text"] == "Kreatinin \U0001f600"
    json.dumps(resource, ensure_ascii=False).encode("utf-8")  # can be written out again
    (record,) = [r for r in caplog.records if r.name == "fhirmatch.client"]
    assert record.getMessage() == (
        "Observation: 1 string(s) of the server's answer hold a \\u escape of a lone surrogate,"
        " which is not Unicode text; each such character is read as U+FFFD"
    )
    assert "mg" not in record.getMessage()  # no patient data in the log


@responses.activate
def test_an_answer_without_lone_surrogates_is_kept_as_it_is(
    client: FhirClient, caplog: pytest.LogCaptureFixture
) -> None:
    body = page([obs(1)], None)
    body["entry"][0]["resource"]["note"] = [{"text": "\\ud83d is text here, not an escape"}]
    responses.get(f"{BASE}/Observation", json=body)
    with caplog.at_level(logging.WARNING, logger="fhirmatch.client"):
        (resource,) = client.search_all("Observation", {}).matches
    assert resource == body["entry"][0]["resource"]
    assert not [r for r in caplog.records if r.name == "fhirmatch.client"]
