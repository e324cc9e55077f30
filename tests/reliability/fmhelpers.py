"""Helpers shared by the reliability tests: tagged test populations and server-side checks.

Each test creates its own patients under a fresh tag and screens only those, so the tests do
not see each other's data on the session's server.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests
from fhirdata import JSON_HEADERS, TAG_SYSTEM, patient_resources, put_all, query_for

from fhirmatch.client import ClientConfig, FhirClient
from fhirmatch.match import MatchOptions, MatchOutcome
from fhirmatch.writeback import SUBJECT_IDENTIFIER_SYSTEM, subject_identifier

__all__ = ["JSON_HEADERS", "TAG_SYSTEM", "patient_resources", "put_all", "query_for"]

REPO = Path(__file__).resolve().parents[2]
TRIALS = REPO / "fixtures" / "trials"
AS_OF = "2026-11-01"


def make_population(base: str, n: int) -> tuple[str, list[str]]:
    """``n`` fresh tagged patients (alternately rectal and esophageal); returns (tag, ids)."""
    tag = uuid.uuid4().hex[:12]
    ids = [f"fr-{tag}-{i}" for i in range(n)]
    resources: list[dict[str, Any]] = []
    for i, pid in enumerate(ids):
        resources += patient_resources(pid, tag, rectal=i % 2 == 0)
    put_all(base, resources)
    return tag, ids


def fast_client(base: str, *, read_timeout: float = 5.0, attempts: int = 5) -> FhirClient:
    """A client with millisecond retry delays (the schedule stays bounded as in production)."""
    return FhirClient(
        ClientConfig(
            base_url=base,
            connect_timeout=2.0,
            read_timeout=read_timeout,
            max_attempts=attempts,
            max_delay=0.02,
            retry_after_cap=5.0,
        )
    )


def options(tag: str, **kw: Any) -> MatchOptions:
    import datetime as dt

    return MatchOptions(
        as_of=dt.date.fromisoformat(AS_OF), patients_query=query_for(tag), chunk_size=2, **kw
    )


def _search_all(base: str, rtype: str, params: dict[str, str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    url: str | None = f"{base}/{rtype}"
    query: dict[str, str] | None = {**params, "_count": "200"}
    while url:
        page = requests.get(url, params=query, headers=JSON_HEADERS, timeout=30).json()
        out.extend(e["resource"] for e in page.get("entry", []))
        url = next((lk["url"] for lk in page.get("link", []) if lk["relation"] == "next"), None)
        query = None
    return out


def subjects_of(base: str, ids: Sequence[str], studies: Sequence[str]) -> list[dict[str, Any]]:
    """Every fhirmatch ResearchSubject the server holds for these patients and studies."""
    values = [subject_identifier(s, f"Patient/{p}") for s in studies for p in ids]
    found: list[dict[str, Any]] = []
    for i in range(0, len(values), 40):
        tokens = ",".join(f"{SUBJECT_IDENTIFIER_SYSTEM}|{v}" for v in values[i : i + 40])
        found += _search_all(base, "ResearchSubject", {"identifier": tokens})
    return found


def provenances_of(base: str, subject_id: str) -> list[dict[str, Any]]:
    return _search_all(base, "Provenance", {"target": f"ResearchSubject/{subject_id}"})


def candidate_pairs(outcome: MatchOutcome) -> set[tuple[str, str]]:
    """(study, patient) pairs whose status write-back records (the default ``--write``)."""
    return {
        (r.study, r.patient)
        for r in outcome.results
        if r.status in ("eligible", "insufficient-data")
    }


def assert_written_once(
    base: str, ids: Sequence[str], studies: Sequence[str], pairs: set[tuple[str, str]]
) -> None:
    """Exactly one ResearchSubject per candidate pair, none for other pairs, each with exactly
    one Provenance: nothing duplicated, nothing half-written."""
    subjects = subjects_of(base, ids, studies)
    keys = [(s["study"]["reference"], s["individual"]["reference"]) for s in subjects]
    assert sorted(keys) == sorted(pairs)
    for s in subjects:
        assert len(provenances_of(base, s["id"])) == 1, s["id"]
