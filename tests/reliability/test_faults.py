"""The match job under server faults, injected by a proxy between fhirmatch and a real server.

Every test screens its own tagged population through :class:`FaultProxy` and then checks the
server itself (not the proxy): each candidate pair has exactly one ResearchSubject with exactly
one Provenance per write, and every patient is either evaluated or listed as skipped with a
reason, and skipped only when its retries ran out.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from faultproxy import Fault, FaultProxy, RandomFaults
from fmhelpers import (
    TRIALS,
    assert_written_once,
    candidate_pairs,
    fast_client,
    make_population,
    options,
    patient_resources,
    provenances_of,
    put_all,
    subjects_of,
)

from fhirmatch.cli.match import load_file_trials
from fhirmatch.match import MatchOutcome, run_match
from fhirmatch.model import Trial

pytestmark = pytest.mark.integration

TRANSACTION = r"^/fhir/?$"


def search_of(rtype: str) -> str:
    """A fault path for a search on ``rtype``, whether sent as GET or as POST ``_search``."""
    return rf"/{rtype}(/_search|\?)"


CONDITION_SEARCH = search_of("Condition")
OBSERVATION_SEARCH = search_of("Observation")


@pytest.fixture(scope="module")
def trials() -> list[Trial]:
    return load_file_trials([TRIALS], None)


@pytest.fixture()
def proxy(fhir_base_url: str) -> Iterator[FaultProxy]:
    with FaultProxy(fhir_base_url) as p:
        yield p


def _studies(trials: list[Trial]) -> list[str]:
    return [t.reference for t in trials]


def _screened_or_skipped(outcome: MatchOutcome, ids: list[str], n_trials: int) -> None:
    """Each patient has a result for every trial, or is skipped with a reason; never both."""
    for pid in ids:
        ref = f"Patient/{pid}"
        got = [r for r in outcome.results if r.patient == ref]
        if ref in outcome.skipped:
            assert outcome.skipped[ref].strip(), ref
            assert got == [], ref
        else:
            assert len(got) == n_trials, ref
    # no (study, patient) pair evaluated twice
    keys = [(r.study, r.patient) for r in outcome.results]
    assert len(keys) == len(set(keys))


def test_status_bursts_and_retry_after_complete_the_run(
    fhir_base_url: str, proxy: FaultProxy, trials: list[Trial]
) -> None:
    tag, ids = make_population(fhir_base_url, 6)
    proxy.add(Fault("status", method="GET", path=r"/Patient\?_tag=", status=503, times=3))
    proxy.add(Fault("status", path=OBSERVATION_SEARCH, status=502, times=2))
    # long searches go out as POST _search: idempotent, retried like a GET
    proxy.add(Fault("status", path=CONDITION_SEARCH, status=500, times=2))
    proxy.add(Fault("status", method="GET", path=r"/ResearchSubject\?", status=503, times=2))
    # 429 on transactions: rejected before processing, so even a plain POST may be resent
    proxy.add(
        Fault("status", method="POST", path=TRANSACTION, status=429, retry_after="1", times=1)
    )
    proxy.add(
        Fault("status", method="POST", path=TRANSACTION, status=429, retry_after="0", times=2)
    )
    with fast_client(proxy.base_url) as client:
        outcome = run_match(client, trials, options(tag))
    assert proxy.count("status") == 3 + 2 + 2 + 2 + 1 + 2
    assert outcome.skipped == {}
    _screened_or_skipped(outcome, ids, len(trials))
    pairs = candidate_pairs(outcome)
    assert pairs
    assert_written_once(fhir_base_url, ids, _studies(trials), pairs)


def test_read_timeouts_are_retried(
    fhir_base_url: str, proxy: FaultProxy, trials: list[Trial]
) -> None:
    tag, ids = make_population(fhir_base_url, 4)
    # a read timeout well above a busy server's slowest answer (HAPI FHIR's 1.5 MB
    # CapabilityStatement takes up to a second), delays well above the timeout
    proxy.add(Fault("delay", path=OBSERVATION_SEARCH, seconds=6.0, times=2))
    proxy.add(Fault("delay", method="GET", path=r"/ResearchSubject\?", seconds=6.0, times=1))
    with fast_client(proxy.base_url, read_timeout=3.0) as client:
        outcome = run_match(client, trials, options(tag))
        assert client.stats.retries >= 3
    assert proxy.count("delay") == 3
    assert outcome.skipped == {}
    _screened_or_skipped(outcome, ids, len(trials))
    assert_written_once(fhir_base_url, ids, _studies(trials), candidate_pairs(outcome))


def test_connection_dropped_mid_response_is_retried(
    fhir_base_url: str, proxy: FaultProxy, trials: list[Trial]
) -> None:
    tag, ids = make_population(fhir_base_url, 4)
    proxy.add(Fault("drop_response", path=CONDITION_SEARCH, times=2))
    proxy.add(Fault("drop_response", method="GET", path=r"/Patient\?_tag=", times=1))
    with fast_client(proxy.base_url) as client:
        outcome = run_match(client, trials, options(tag))
    assert proxy.count("drop_response") == 3
    assert outcome.skipped == {}
    _screened_or_skipped(outcome, ids, len(trials))
    assert_written_once(fhir_base_url, ids, _studies(trials), candidate_pairs(outcome))


@pytest.mark.parametrize("kind", ["drop_after_forward", "drop_response"])
def test_transaction_lost_after_commit_is_resent_without_duplicates(
    fhir_base_url: str, proxy: FaultProxy, trials: list[Trial], kind: str
) -> None:
    """The server applied the transaction but its answer was lost. Every entry is safe to
    resend (conditional creates, the Provenance PUT to a deterministic id), so the client
    resends it within the run: nobody is skipped, nothing is written twice."""
    tag, ids = make_population(fhir_base_url, 4)
    fault = proxy.add(Fault(kind, method="POST", path=TRANSACTION, times=2))  # type: ignore[arg-type]
    with fast_client(proxy.base_url) as client:
        first = run_match(client, trials, options(tag))
    assert fault.hits == 2
    posts = [s for s in proxy.seen if s.method == "POST" and re.match(TRANSACTION, s.target)]
    assert len(posts) == len(ids) + 2  # one per patient, and the two lost ones again
    assert first.skipped == {}
    _screened_or_skipped(first, ids, len(trials))
    pairs = candidate_pairs(first)
    assert sum(s.created for s in first.summaries.values()) == len(pairs)
    assert_written_once(fhir_base_url, ids, _studies(trials), pairs)

    proxy.clear()
    with fast_client(proxy.base_url) as client:
        second = run_match(client, trials, options(tag))
    assert second.skipped == {}
    assert {p.action for p in second.planned} <= {"unchanged", "not-written"}
    assert_written_once(fhir_base_url, ids, _studies(trials), candidate_pairs(second))


@pytest.mark.parametrize("kind", ["drop_after_forward", "status"])
def test_update_in_doubt_is_read_again_and_planned_again(
    fhir_base_url: str, proxy: FaultProxy, trials: list[Trial], kind: str
) -> None:
    """An update carries If-Match, so it is not resent blindly. When its answer is lost (it
    committed) or refused with 503 (it did not), the run reads the subjects again by their
    identifiers and plans again: the committed update is reported as written, the refused one
    is sent again; one Provenance per write either way."""
    tag, ids = make_population(fhir_base_url, 2)
    with fast_client(fhir_base_url) as client:
        run_match(client, trials, options(tag))
    # the ECOG score worsens: every candidate pair of the first patient becomes ineligible
    worse = patient_resources(ids[0], tag, rectal=True)[2]
    worse["valueQuantity"] = {**worse["valueQuantity"], "value": 3}
    put_all(fhir_base_url, [worse])
    fault = proxy.add(Fault(kind, method="POST", path=TRANSACTION, times=1))  # type: ignore[arg-type]
    with fast_client(proxy.base_url) as client:
        second = run_match(client, trials, options(tag))
    assert fault.hits == 1
    assert second.skipped == {}
    updated = [p for p in second.planned if p.action == "update"]
    assert updated and {p.patient for p in updated} == {f"Patient/{ids[0]}"}
    assert sum(s.updated for s in second.summaries.values()) == len(updated)
    subjects = {
        (s["study"]["reference"], s["individual"]["reference"]): s
        for s in subjects_of(fhir_base_url, ids, _studies(trials))
    }
    for plan in updated:
        subject = subjects[(plan.study, plan.patient)]
        assert subject["status"] == "ineligible"
        # the create's Provenance and the update's
        assert len(provenances_of(fhir_base_url, subject["id"])) == 2


def test_flaky_network_run_converges_to_a_clean_run(
    fhir_base_url: str, proxy: FaultProxy, trials: list[Trial]
) -> None:
    """Through a proxy answering 10% of requests with 503, 5% with 429 and dropping 3% of
    connections after the server acted, a concurrent run ends with exactly the ResearchSubjects
    and Provenance of a clean run on the same population: none duplicated, nobody skipped.

    The proxy faults one request at most three times in a row, fewer than the client's eight
    attempts, so every request completes whatever order the concurrent requests take."""
    n = 30
    clean_tag, clean_ids = make_population(fhir_base_url, n)
    tag, ids = make_population(fhir_base_url, n)
    with fast_client(fhir_base_url) as client:
        clean = run_match(client, trials, options(clean_tag, concurrency=8))
    proxy.random = RandomFaults(unavailable=0.10, too_many=0.05, dropped=0.03, seed=7)
    with fast_client(proxy.base_url, attempts=8) as client:
        flaky = run_match(client, trials, options(tag, concurrency=8))
    assert proxy.count("status") > 10 and proxy.count("drop_after_forward") > 0
    assert flaky.skipped == {} and clean.skipped == {}

    def written(base: str, population: list[str]) -> list[tuple[str, int, str, int]]:
        index = {f"Patient/{p}": i for i, p in enumerate(population)}
        return sorted(
            (
                s["study"]["reference"],
                index[s["individual"]["reference"]],
                s["status"],
                len(provenances_of(base, s["id"])),
            )
            for s in subjects_of(base, population, _studies(trials))
        )

    expected = written(fhir_base_url, clean_ids)
    assert expected and all(count == 1 for *_, count in expected)
    assert written(fhir_base_url, ids) == expected
    assert [s.written for s in flaky.summaries.values()] == [
        s.written for s in clean.summaries.values()
    ]


def test_random_faults_stop_before_a_request_runs_out_of_attempts() -> None:
    faults = RandomFaults(unavailable=1.0, max_in_a_row=3)
    met = [faults.draw("GET", "/fhir/Patient?_id=a", None) is not None for _ in range(5)]
    assert met == [True, True, True, False, True]
    # another request (another target, or the same target with another body) has its own count
    assert faults.draw("GET", "/fhir/Patient?_id=b", None) is not None
    assert faults.draw("POST", "/fhir/Patient/_search", b"_id=a") is not None


def test_retries_exhausted_skips_with_reason(
    fhir_base_url: str, proxy: FaultProxy, trials: list[Trial]
) -> None:
    """A search that keeps failing: the chunk's patients are skipped with the reason, the other
    chunks are evaluated and written normally."""
    tag, ids = make_population(fhir_base_url, 4)
    # ids sort in creation order; chunks of two: the first chunk's Observation search fails
    first_chunk = rf"{OBSERVATION_SEARCH}.*patient={re.escape(ids[0])}%2C{re.escape(ids[1])}&"
    proxy.add(Fault("status", path=first_chunk, times=None))
    with fast_client(proxy.base_url, attempts=3) as client:
        outcome = run_match(client, trials, options(tag))
    assert proxy.count("status") >= 3
    skipped = set(outcome.skipped)
    assert skipped == {f"Patient/{p}" for p in ids[:2]}
    assert all("503" in why for why in outcome.skipped.values())
    _screened_or_skipped(outcome, ids, len(trials))
    pairs = candidate_pairs(outcome)
    assert {p for _, p in pairs} <= {f"Patient/{p}" for p in ids[2:]}
    assert_written_once(fhir_base_url, ids, _studies(trials), pairs)


def test_patient_set_growing_while_paged(
    fhir_base_url: str, proxy: FaultProxy, trials: list[Trial]
) -> None:
    """Patients inserted while ``Patient?`` is paged (two per page): no crash, no patient
    screened twice, every patient present at the start screened."""
    tag, ids = make_population(fhir_base_url, 6)
    added: list[str] = []

    def insert_on_second_page(method: str, target: str) -> None:
        # the second page: sekmet pages with _offset, HAPI FHIR with _getpages
        second_page = "_offset" in target or "_getpages" in target
        if (
            method == "GET"
            and second_page
            and not added
            and ("Patient" in target or "_getpages" in target)
        ):
            new = [f"fr-{tag}-late{i}" for i in range(3)]
            resources = []
            for pid in new:
                resources += patient_resources(pid, tag, rectal=True)
            put_all(fhir_base_url, resources)
            added.extend(new)

    proxy.hooks.append(insert_on_second_page)
    opts = options(tag)
    opts.patients_query = f"{opts.patients_query}&_count=2"
    with fast_client(proxy.base_url) as client:
        outcome = run_match(client, trials, opts)
    assert added, "the proxy never saw a second Patient page"
    screened = {r.patient for r in outcome.results}
    assert {f"Patient/{p}" for p in ids} <= screened
    assert screened <= {f"Patient/{p}" for p in ids + added}
    _screened_or_skipped(outcome, ids, len(trials))
    assert_written_once(fhir_base_url, ids + added, _studies(trials), candidate_pairs(outcome))
