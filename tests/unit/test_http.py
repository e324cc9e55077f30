"""HTTP transport: timeouts, retries (table-style), Retry-After, error sorting, auth scoping."""

from __future__ import annotations

import email.utils
import logging
import time

import pytest
import requests
import responses
from responses import matchers

from fhirmatch.auth import BearerAuth
from fhirmatch.errors import (
    AuthenticationError,
    ConfigurationError,
    FatalNetworkError,
    PreconditionFailed,
    ResourceGone,
    ResourceNotFound,
    TemporaryNetworkError,
)
from fhirmatch.http import (
    HttpTransport,
    RetryPolicy,
    Timeouts,
    check_base_url,
    parse_retry_after,
    redact_url,
    same_origin,
)

BASE = "https://fhir.example.org/r4"
TOKEN = "s3cr3t-token-value"


def oo(text: str) -> dict[str, object]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "exception", "diagnostics": text}],
    }


class Sleeps(list[float]):
    """Records requested sleeps instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def transport(sleeps: Sleeps) -> HttpTransport:
    return HttpTransport(
        BASE,
        auth=BearerAuth(TOKEN),
        retry=RetryPolicy(max_attempts=4, base_delay=1.0, max_delay=5.0, retry_after_cap=30),
        sleep=sleeps,
    )


# status -> (retried?, error class when it persists)
STATUS_TABLE = [
    (400, False, FatalNetworkError),
    (401, False, AuthenticationError),
    (403, False, AuthenticationError),
    (404, False, ResourceNotFound),
    (408, True, TemporaryNetworkError),
    (409, False, FatalNetworkError),
    (410, False, ResourceGone),
    (412, False, PreconditionFailed),
    (422, False, FatalNetworkError),
    (429, True, TemporaryNetworkError),
    (500, True, TemporaryNetworkError),
    (501, False, FatalNetworkError),
    (502, True, TemporaryNetworkError),
    (503, True, TemporaryNetworkError),
    (504, True, TemporaryNetworkError),
]


@pytest.mark.parametrize(("status", "retried", "error"), STATUS_TABLE)
@responses.activate
def test_status_table(
    transport: HttpTransport, sleeps: Sleeps, status: int, retried: bool, error: type
) -> None:
    responses.get(f"{BASE}/Patient/1", status=status, json=oo(f"problem {status}"))
    with pytest.raises(error) as info:
        transport.request("GET", "Patient/1")
    exc = info.value
    assert type(exc) is error
    assert exc.status == status
    assert exc.method == "GET"
    assert exc.url == f"{BASE}/Patient/1"
    assert exc.outcome == f"problem {status}"
    assert f"problem {status}" in str(exc)
    expected_calls = 4 if retried else 1
    assert len(responses.calls) == expected_calls
    assert len(sleeps) == expected_calls - 1


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
@responses.activate
def test_retry_then_success(transport: HttpTransport, sleeps: Sleeps, status: int) -> None:
    responses.get(f"{BASE}/Patient/1", status=status)
    responses.get(f"{BASE}/Patient/1", json={"resourceType": "Patient", "id": "1"})
    response = transport.request("GET", "Patient/1")
    assert response.json()["id"] == "1"
    assert len(responses.calls) == 2
    assert len(sleeps) == 1
    assert transport.stats.requests == 2
    assert transport.stats.retries == 1


@responses.activate
def test_503_storm_exhausts_bounded_backoff(transport: HttpTransport, sleeps: Sleeps) -> None:
    responses.get(f"{BASE}/Observation", status=503, json=oo("overloaded"))
    with pytest.raises(TemporaryNetworkError) as info:
        transport.request("GET", "Observation", params=[("code", "x")])
    assert info.value.status == 503
    assert "after 4 attempts" in str(info.value)
    assert len(sleeps) == 3
    # exponential and bounded: nominal 1, 2, 4 (max 5) scaled by jitter into [0.5, 1] of that
    for wait, nominal in zip(sleeps, [1.0, 2.0, 4.0], strict=True):
        assert nominal * 0.5 <= wait <= nominal


def test_delays_are_capped() -> None:
    delays = RetryPolicy(max_attempts=10, base_delay=1, max_delay=8, jitter=0).delays()
    assert delays == [1, 2, 4, 8, 8, 8, 8, 8, 8]
    with pytest.raises(ConfigurationError):
        RetryPolicy(max_attempts=0)


@responses.activate
def test_retry_after_seconds(transport: HttpTransport, sleeps: Sleeps) -> None:
    responses.get(f"{BASE}/Patient", status=429, headers={"Retry-After": "7"})
    responses.get(f"{BASE}/Patient", json={"resourceType": "Bundle"})
    transport.request("GET", "Patient")
    assert sleeps == [7.0]


@responses.activate
def test_retry_after_http_date(transport: HttpTransport, sleeps: Sleeps) -> None:
    when = email.utils.formatdate(time.time() + 12, usegmt=True)
    responses.get(f"{BASE}/Patient", status=503, headers={"Retry-After": when})
    responses.get(f"{BASE}/Patient", json={"resourceType": "Bundle"})
    transport.request("GET", "Patient")
    assert len(sleeps) == 1
    assert 9 <= sleeps[0] <= 12


@responses.activate
def test_retry_after_beyond_cap_gives_up(transport: HttpTransport, sleeps: Sleeps) -> None:
    responses.get(f"{BASE}/Patient", status=429, headers={"Retry-After": "3600"})
    with pytest.raises(TemporaryNetworkError) as info:
        transport.request("GET", "Patient")
    assert info.value.status == 429
    assert sleeps == []
    assert len(responses.calls) == 1


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


@responses.activate
def test_read_timeout_on_get_is_retried_then_temporary(
    transport: HttpTransport, sleeps: Sleeps
) -> None:
    responses.get(f"{BASE}/Patient/1", body=requests.exceptions.ReadTimeout("slow"))
    with pytest.raises(TemporaryNetworkError) as info:
        transport.request("GET", "Patient/1")
    assert "timeout: fhir.example.org did not answer" in str(info.value)
    assert info.value.status is None
    assert len(responses.calls) == 4


@responses.activate
def test_timeouts_are_passed_on_every_call(sleeps: Sleeps) -> None:
    t = HttpTransport(BASE, timeouts=Timeouts(connect=3.0, read=11.0), sleep=sleeps)
    responses.get(f"{BASE}/metadata", json={})
    t.request("GET", "metadata")
    assert responses.calls[0].request.req_kwargs["timeout"] == (3.0, 11.0)


@responses.activate
def test_plain_create_not_retried_after_read_timeout(
    transport: HttpTransport, sleeps: Sleeps
) -> None:
    responses.post(f"{BASE}/Patient", body=requests.exceptions.ReadTimeout("lost answer"))
    with pytest.raises(TemporaryNetworkError):
        transport.request("POST", "Patient", json_body={"resourceType": "Patient"})
    assert len(responses.calls) == 1
    assert sleeps == []


@responses.activate
def test_plain_create_not_retried_after_500(transport: HttpTransport, sleeps: Sleeps) -> None:
    responses.post(f"{BASE}/Patient", status=500, json=oo("boom"))
    with pytest.raises(TemporaryNetworkError) as info:
        transport.request("POST", "Patient", json_body={"resourceType": "Patient"})
    assert info.value.outcome == "boom"
    assert len(responses.calls) == 1


@responses.activate
def test_plain_create_retried_after_connect_timeout_and_429(
    transport: HttpTransport, sleeps: Sleeps
) -> None:
    responses.post(f"{BASE}/Patient", body=requests.exceptions.ConnectTimeout("no route"))
    responses.post(f"{BASE}/Patient", status=429)
    responses.post(f"{BASE}/Patient", status=201, json={"resourceType": "Patient", "id": "9"})
    response = transport.request("POST", "Patient", json_body={"resourceType": "Patient"})
    assert response.status_code == 201
    assert len(responses.calls) == 3


@responses.activate
def test_conditional_create_is_retried(transport: HttpTransport, sleeps: Sleeps) -> None:
    responses.post(f"{BASE}/Patient", body=requests.exceptions.ReadTimeout("lost answer"))
    responses.post(
        f"{BASE}/Patient",
        status=200,
        json={"resourceType": "Patient", "id": "9"},
        match=[matchers.header_matcher({"If-None-Exist": "identifier=urn:x|1"})],
    )
    response = transport.request(
        "POST",
        "Patient",
        json_body={"resourceType": "Patient"},
        headers={"If-None-Exist": "identifier=urn:x|1"},
    )
    assert response.json()["id"] == "9"
    assert len(responses.calls) == 2


@responses.activate
def test_post_search_counts_as_idempotent(transport: HttpTransport, sleeps: Sleeps) -> None:
    responses.post(f"{BASE}/Observation/_search", status=502)
    responses.post(f"{BASE}/Observation/_search", json={"resourceType": "Bundle"})
    transport.request("POST", "Observation/_search", form=[("code", "a")])
    assert len(responses.calls) == 2


@responses.activate
def test_explicit_non_idempotent_transaction_not_retried(
    transport: HttpTransport, sleeps: Sleeps
) -> None:
    responses.post(f"{BASE}", status=504)
    with pytest.raises(TemporaryNetworkError):
        transport.request("POST", "", json_body={"resourceType": "Bundle"}, idempotent=False)
    assert len(responses.calls) == 1


@responses.activate
def test_auth_header_sent_to_own_server(transport: HttpTransport) -> None:
    responses.get(f"{BASE}/Patient/1", json={})
    transport.request("GET", "Patient/1")
    assert responses.calls[0].request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert responses.calls[0].request.headers["User-Agent"].startswith("fhirmatch/")


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example.net/r4/Patient",
        "http://fhir.example.org/r4/Patient",
        "https://fhir.example.org:8443/r4/Patient",
    ],
)
@responses.activate
def test_authenticated_request_to_other_origin_refused(transport: HttpTransport, url: str) -> None:
    with pytest.raises(FatalNetworkError) as info:
        transport.request("GET", url)
    assert "outside the FHIR server" in str(info.value)
    assert len(responses.calls) == 0


@responses.activate
def test_redirect_to_other_host_drops_authorization(transport: HttpTransport) -> None:
    responses.get(
        f"{BASE}/Binary/1", status=302, headers={"Location": "https://cdn.example.net/b/1"}
    )
    responses.get("https://cdn.example.net/b/1", json={"ok": True})
    transport.request("GET", "Binary/1")
    assert len(responses.calls) == 2
    assert "Authorization" in responses.calls[0].request.headers
    assert "Authorization" not in responses.calls[1].request.headers


@responses.activate
def test_redirect_on_same_host_keeps_authorization(transport: HttpTransport) -> None:
    responses.get(f"{BASE}/Binary/1", status=302, headers={"Location": f"{BASE}/Binary/2"})
    responses.get(f"{BASE}/Binary/2", json={"ok": True})
    transport.request("GET", "Binary/1")
    assert responses.calls[1].request.headers["Authorization"] == f"Bearer {TOKEN}"


@responses.activate
def test_unauthenticated_request_may_leave_origin(transport: HttpTransport) -> None:
    responses.post("https://auth.example.net/token", json={"access_token": "x"})
    transport.request("POST", "https://auth.example.net/token", form=[], authenticated=False)
    assert "Authorization" not in responses.calls[0].request.headers


@responses.activate
def test_logs_have_no_token_no_query_no_body(
    transport: HttpTransport, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="fhirmatch")
    responses.get(f"{BASE}/Patient", status=503)
    responses.get(f"{BASE}/Patient", json={"resourceType": "Bundle", "secretbody": "Jane Doe"})
    transport.request("GET", "Patient", params=[("name", "Jane Doe")])
    text = caplog.text
    assert "GET /r4/Patient -> 503" in text
    assert "retry 1/3" in text
    assert TOKEN not in text
    assert "Jane" not in text


def test_check_base_url() -> None:
    assert check_base_url("https://x.org/fhir/") == "https://x.org/fhir"
    for ok in ("http://localhost:8080/fhir", "http://127.0.0.5/fhir", "http://[::1]:80/fhir"):
        assert check_base_url(ok) == ok
    with pytest.raises(ConfigurationError, match="plain http"):
        check_base_url("http://fhir.hospital.org/fhir")
    assert check_base_url("http://fhir.hospital.org/fhir", allow_insecure_http=True)
    with pytest.raises(ConfigurationError, match="credentials"):
        check_base_url("https://user:pw@x.org/fhir")
    with pytest.raises(ConfigurationError):
        check_base_url("ftp://x.org/fhir")


def test_tls_options() -> None:
    assert HttpTransport(BASE).session.verify is True
    assert HttpTransport(BASE, ca_bundle="/etc/ca.pem").session.verify == "/etc/ca.pem"
    assert HttpTransport(BASE, verify=False).session.verify is False


def test_extra_headers_cannot_carry_authorization() -> None:
    t = HttpTransport(BASE, extra_headers={"Prefer": "handling=strict"})
    assert t.session.headers["Prefer"] == "handling=strict"
    with pytest.raises(ConfigurationError):
        HttpTransport(BASE, extra_headers={"Authorization": "Bearer x"})


@responses.activate
def test_requests_ask_for_fresh_results_not_a_cached_search() -> None:
    """HAPI FHIR answers a search repeated within 60 s from its cache unless told not to."""
    responses.get(f"{BASE}/Patient", json={"resourceType": "Bundle", "type": "searchset"})
    HttpTransport(BASE).request("GET", "Patient", params=[("identifier", "x|1")])
    assert responses.calls[0].request.headers["Cache-Control"] == "no-cache"


def test_redact_url_and_same_origin() -> None:
    assert redact_url("https://u:p@x.org/a?access_token=abc&code=1") == (
        "https://x.org/a?access_token=%2A%2A%2A&code=%2A%2A%2A"
    )
    assert redact_url("https://x.org/a?patient=1,2") == "https://x.org/a?patient=1,2"
    assert same_origin("https://x.org/a", "https://X.org:443/b")
    assert not same_origin("https://x.org/a", "http://x.org/a")
    assert "s3cr3t" not in repr(HttpTransport(BASE, auth=BearerAuth(TOKEN)))


@responses.activate
def test_tls_error_is_fatal(transport: HttpTransport, sleeps: Sleeps) -> None:
    responses.get(f"{BASE}/metadata", body=requests.exceptions.SSLError("bad cert"))
    with pytest.raises(FatalNetworkError) as info:
        transport.request("GET", "metadata")
    assert "TLS" in str(info.value)
    assert len(responses.calls) == 1


@responses.activate
def test_prefer_headers_are_joined(sleeps: Sleeps) -> None:
    t = HttpTransport(BASE, extra_headers={"Prefer": "handling=strict"}, sleep=sleeps)
    responses.post(f"{BASE}/Patient", status=201, json={})
    responses.get(f"{BASE}/Patient", json={})
    t.request("POST", "Patient", json_body={}, headers={"Prefer": "return=representation"})
    t.request("GET", "Patient")
    assert responses.calls[0].request.headers["Prefer"] == (
        "handling=strict, return=representation"
    )
    assert responses.calls[1].request.headers["Prefer"] == "handling=strict"


@responses.activate
def test_429_pauses_every_thread_of_the_transport(transport: HttpTransport, sleeps: Sleeps) -> None:
    """A 429 (or 503) pauses the whole client: a request another thread starts during the
    pause waits for the rest of it before it is sent."""
    import threading

    responses.get(f"{BASE}/Patient/a", status=429, headers={"Retry-After": "3"})
    responses.get(f"{BASE}/Patient/a", json={"resourceType": "Patient", "id": "a"})
    responses.get(f"{BASE}/Patient/b", json={"resourceType": "Patient", "id": "b"})
    transport.request("GET", "Patient/a")
    assert sleeps == [3.0]  # the request that met the 429 waited its Retry-After
    other = threading.Thread(target=transport.request, args=("GET", "Patient/b"))
    other.start()
    other.join()
    # (sleeps are recorded, not slept: the pause's deadline is still ahead for the other thread)
    assert len(sleeps) == 2 and 2.0 < sleeps[1] <= 3.0
    assert [c.request.url for c in responses.calls][-1] == f"{BASE}/Patient/b"


@responses.activate
def test_500_pauses_only_the_request_that_met_it(transport: HttpTransport, sleeps: Sleeps) -> None:
    responses.get(f"{BASE}/Patient/a", status=500)
    responses.get(f"{BASE}/Patient/a", json={"resourceType": "Patient", "id": "a"})
    responses.get(f"{BASE}/Patient/b", json={"resourceType": "Patient", "id": "b"})
    transport.request("GET", "Patient/a")
    transport.request("GET", "Patient/b")
    assert len(sleeps) == 1


@responses.activate
def test_counters_are_exact_under_threads(transport: HttpTransport) -> None:
    from concurrent.futures import ThreadPoolExecutor

    responses.get(f"{BASE}/Patient/a", json={"resourceType": "Patient", "id": "a"})
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: transport.request("GET", "Patient/a"), range(400)))
    assert transport.stats.requests == 400
    assert transport.stats.by_status == {200: 400}
