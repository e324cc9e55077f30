"""The match job online: how much of a server's latency it hides.

Starts a local sandbox, loads ``--patients`` patients for each measured run (copies of the demo
patients in ``fixtures/patients``, each under its own ids, tagged per run), and runs the whole
match job (publish, select, fetch, evaluate, write back) over them through this script's own
latency proxy, which waits ``--latencies`` milliseconds before forwarding each request. Every run
writes the same ResearchSubjects to a fresh population, so the runs do the same work. Prints for
each latency the seconds, patients/s, requests and the time projected for 100,000 patients at
that rate, and the ratio of each run's time to the run with no added latency (the floor, measured
in the same run of this script); ``--sequential`` adds a run with ``--concurrency 1`` at the
highest latency for comparison. ``--dry-run`` measures dry runs (no transactions).
``--memory`` then screens growing populations, each in a fresh process talking to the server
directly, keeping counts rather than every result as ``fhirmatch match`` does without JSON output
or a report, and prints that process's resident memory before the run and at its peak.

    python benchmarks/bench_match.py [--patients 240] [--latencies 0 50 100] [--concurrency 8]
        [--sequential] [--dry-run] [--memory 240 960]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

import fhirmatch
from fhirmatch.match import MatchOptions, run_match
from fhirmatch.sandbox import start_sandbox

REPO = Path(__file__).resolve().parent.parent
TAG_SYSTEM = "https://fhirmatch.dev/fhir/bench-run"
JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
AS_OF = dt.date(2026, 11, 1)
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "content-encoding",
    "host",
    "accept-encoding",
}


class LatencyProxy:
    """A threaded reverse proxy on 127.0.0.1 that waits ``delay`` seconds before forwarding
    each request (a server that far away); upstream URLs in answers point back at the proxy."""

    def __init__(self, upstream_base: str, delay: float) -> None:
        parts = urlsplit(upstream_base)
        self.upstream = f"{parts.scheme}://{parts.netloc}"
        self.delay = delay
        self._local = threading.local()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.base_url = self.origin + parts.path.rstrip("/")
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                time.sleep(proxy.delay)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                up = proxy._session().request(
                    self.command,
                    proxy.upstream + self.path,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    timeout=300,
                )
                data = up.content.replace(proxy.upstream.encode(), proxy.origin.encode())
                self.send_response(up.status_code)
                for name, value in up.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        self.send_header(name, value.replace(proxy.upstream, proxy.origin))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _forward

        return Handler


@contextmanager
def latency(upstream: str, ms: float) -> Iterator[str]:
    proxy = LatencyProxy(upstream, ms / 1000)
    try:
        yield proxy.base_url
    finally:
        proxy.close()


def demo_bundles() -> list[tuple[str, str]]:
    """(patient id, bundle text) of each demo patient."""
    out = []
    for path in sorted((REPO / "fixtures" / "patients").glob("*.json")):
        bundle = json.loads(path.read_text())
        pid = next(
            e["resource"]["id"]
            for e in bundle["entry"]
            if e["resource"]["resourceType"] == "Patient"
        )
        out.append((pid, path.read_text()))
    return out


def load_population(base: str, n: int) -> tuple[str, list[str]]:
    """``n`` patients copied from the demo patients under fresh ids and a fresh tag."""
    tag = uuid.uuid4().hex[:10]
    templates = demo_bundles()
    ids = [f"bm-{tag}-{i}" for i in range(n)]
    entries: list[dict[str, Any]] = []
    for i, pid in enumerate(ids):
        template_id, text = templates[i % len(templates)]
        bundle = json.loads(text.replace(template_id, pid))
        for entry in bundle["entry"]:
            res = entry["resource"]
            if res["resourceType"] == "Patient":
                res.setdefault("meta", {})["tag"] = [{"system": TAG_SYSTEM, "code": tag}]
            url = f"{res['resourceType']}/{res['id']}"
            entries.append({"resource": res, "request": {"method": "PUT", "url": url}})
    for i in range(0, len(entries), 500):
        batch: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": entries[i : i + 500],
        }
        requests.post(base, json=batch, headers=JSON, timeout=300).raise_for_status()
    return tag, ids


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRss:
    """Samples this process's resident memory every 50 ms while it runs."""

    def __init__(self) -> None:
        self.start = rss_mb()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak - self.start


def run_once(
    base: str,
    trials: list[Any],
    tag: str,
    concurrency: int,
    keep: bool = True,
    dry_run: bool = False,
) -> tuple[float, int, int]:
    """One match run; returns (seconds, requests, ResearchSubjects written)."""
    options = MatchOptions(
        as_of=AS_OF,
        patients_query=f"Patient?_tag={TAG_SYSTEM}|{tag}",
        concurrency=concurrency,
        keep_results=keep,
        dry_run=dry_run,
    )
    config = fhirmatch.ClientConfig(base_url=base, connections=max(10, concurrency))
    with fhirmatch.FhirClient(config) as client:
        t0 = time.perf_counter()
        outcome = run_match(client, trials, options)
        seconds = time.perf_counter() - t0
    if outcome.skipped:
        raise SystemExit(f"{len(outcome.skipped)} patients skipped: {outcome.skipped}")
    return seconds, outcome.requests, sum(s.written for s in outcome.summaries.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=240)
    parser.add_argument("--latencies", type=float, nargs="+", default=[0, 50, 100])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sequential", action="store_true", help="also --concurrency 1")
    parser.add_argument("--dry-run", action="store_true", help="write nothing (fewer requests)")
    parser.add_argument("--memory", type=int, nargs="*", default=[], metavar="N")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        base, tag, concurrency = args.memory_child
        return memory_child(base, tag, int(concurrency))
    latencies = sorted(set(args.latencies) | {0.0})
    trials = fhirmatch.load_trials([REPO / "fixtures" / "trials"])
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; {args.patients} patients, {len(trials)} trials"
        + ("; dry runs" if args.dry_run else "")
    )
    with start_sandbox(load=False) as sandbox:
        upstream = sandbox.base_url
        runs = [(ms, args.concurrency) for ms in latencies]
        if args.sequential:
            runs.append((max(latencies), 1))
        populations = [load_population(upstream, args.patients)[0] for _ in runs]
        # warm-up: trials published, server and client paths exercised once
        with latency(upstream, 0) as base:
            run_once(base, trials, load_population(upstream, 20)[0], args.concurrency)
        floor: float | None = None
        print(
            f"{'latency':>8} {'conc.':>5} {'seconds':>8} {'patients/s':>10} {'requests':>8} "
            f"{'written':>7} {'vs 0 ms':>7} {'100,000 patients':>16}"
        )
        for (ms, conc), tag in zip(runs, populations, strict=True):
            with latency(upstream, ms) as base:
                seconds, sent, written = run_once(base, trials, tag, conc, dry_run=args.dry_run)
            if floor is None:
                floor = seconds
            rate = args.patients / seconds
            projected = dt.timedelta(seconds=round(100_000 / rate))
            print(
                f"{ms:>6.0f}ms {conc:>5} {seconds:>8.1f} {rate:>10.1f} {sent:>8} {written:>7} "
                f"{seconds / floor:>6.2f}x {projected!s:>16}"
            )
        for n in args.memory:
            tag, _ = load_population(upstream, n)
            child = subprocess.run(
                [sys.executable, __file__, "--memory-child", upstream, tag, str(args.concurrency)],
                capture_output=True,
                text=True,
                check=True,
            )
            got = json.loads(child.stdout.strip().splitlines()[-1])
            print(
                f"memory: {n} patients in {got['seconds']:.1f} s (its own process, no proxy): "
                f"resident {got['before']:.0f} MB before the run, peak {got['peak']:.0f} MB "
                f"(+{got['peak'] - got['before']:.0f} MB)"
            )
    return 0


def memory_child(base: str, tag: str, concurrency: int) -> int:
    """One run in a fresh process: resident memory before it and at its peak."""
    trials = fhirmatch.load_trials([REPO / "fixtures" / "trials"])
    fhirmatch.Engine(trials)  # the imports and the compiled trials count as "before"
    sampler = PeakRss()
    seconds, _, _ = run_once(base, trials, tag, concurrency, keep=False)
    sampler.stop()
    print(json.dumps({"seconds": seconds, "before": sampler.start, "peak": sampler.peak}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
