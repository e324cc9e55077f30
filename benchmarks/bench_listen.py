"""Latency of event-driven screening: a new platelet result -> the ResearchSubject written.

Starts a local sandbox and writes ``--events`` patients, each eligible for NCT06767007 except for
a low platelet count (50 × 10^9/L), starts a :class:`fhirmatch.Listener`, then, one patient at a
time, posts a new platelet result of 150 and measures the time from sending the Observation to
the listener having written that patient's new ResearchSubject (the server is checked to hold
every one at the end). Prints the median and 95th percentile.

    python benchmarks/bench_listen.py [--events 20] [--verbose]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import requests

import fhirmatch
from fhirmatch.listen import ListenOptions
from fhirmatch.sandbox import start_sandbox
from fhirmatch.writeback import SUBJECT_IDENTIFIER_SYSTEM, subject_identifier

REPO = Path(__file__).resolve().parent.parent
JSON = {"Content-Type": "application/fhir+json"}
STUDY = "ResearchStudy/NCT06767007"


def patient_bundle(pid: str) -> tuple[dict[str, Any], dict[str, Any]]:
    text = (REPO / "fixtures" / "patients" / "demo-rectal-eligible.json").read_text()
    bundle = json.loads(text.replace("demo-rectal-eligible", pid))
    plt = next(e["resource"] for e in bundle["entry"] if e["resource"]["id"] == f"{pid}-plt")
    plt["valueQuantity"]["value"] = 50
    return bundle, plt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--verbose", action="store_true", help="log what the listener does")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    run = uuid.uuid4().hex[:8]
    with start_sandbox(load=False) as sandbox:
        base = sandbox.base_url
        patients: dict[str, dict[str, Any]] = {}
        for i in range(args.events):
            pid = f"bench-{run}-{i}"
            bundle, patients[pid] = patient_bundle(pid)
            requests.post(base, json=bundle, headers=JSON, timeout=60).raise_for_status()
        trials = fhirmatch.load_trials([REPO / "fixtures" / "trials"])
        written: dict[str, threading.Event] = {pid: threading.Event() for pid in patients}

        def on_screened(patient: str, outcome: fhirmatch.MatchOutcome) -> None:
            if any(p.study == STUDY and p.action == "create" for p in outcome.planned):
                written[patient].set()

        latencies: list[float] = []
        options = ListenOptions(as_of=dt.date(2026, 11, 1))
        with (
            fhirmatch.connect(base) as client,
            fhirmatch.Listener(client, trials, options, on_screened=on_screened),
        ):
            for pid, plt in patients.items():
                obs = dict(plt, id=f"{pid}-plt-new", effectiveDateTime="2026-10-30")
                obs["valueQuantity"] = dict(plt["valueQuantity"], value=150)
                t0 = time.perf_counter()
                requests.put(f"{base}/Observation/{obs['id']}", json=obs, headers=JSON, timeout=30)
                if not written[pid].wait(30):
                    raise SystemExit(f"Patient/{pid}: no ResearchSubject written within 30 s")
                latencies.append(time.perf_counter() - t0)
            tokens = ",".join(
                f"{SUBJECT_IDENTIFIER_SYSTEM}|{subject_identifier(STUDY, f'Patient/{p}')}"
                for p in patients
            )
            found = requests.get(
                f"{base}/ResearchSubject",
                params={"identifier": tokens, "_count": "500"},
                timeout=30,
            ).json()
            assert len(found.get("entry", [])) == len(patients)
    ms = sorted(x * 1000 for x in latencies)
    p95 = ms[max(0, round(0.95 * len(ms)) - 1)]
    print(f"listen latency over {len(ms)} events (new Observation -> ResearchSubject written):")
    print(f"  median {statistics.median(ms):.0f} ms, p95 {p95:.0f} ms, max {ms[-1]:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
