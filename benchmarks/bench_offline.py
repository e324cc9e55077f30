"""Offline screening against its floor: `fhirmatch evaluate` end to end vs decoding the export.

    .venv/bin/python benchmarks/bench_offline.py [--sizes 2000 8000] [--templates 5]
        [--repeat 3] [--keep DIR]

**The export.** For each size N, a Bulk Data export of N Synthea-sized patients, written by
``bench_scale.write_export`` (NDJSON split by resource type, the types a fhirmatch ``$export`` asks
for; about 0.21 MB and 250 resources per patient).

**What is measured**, ``--repeat`` times per size, each pair in the same moment so a loaded machine
slows both:

1. **the floor**: orjson decoding every line of the export (files read in binary, one line at a
   time, in this process, on one core); msgspec decoding the same lines is printed beside it
   (the JSON library fhirmatch uses was chosen by this measurement);
2. **evaluate**: ``fhirmatch evaluate --trials fixtures/trials --patients EXPORT --format ndjson
   --output FILE`` as a fresh process with the local executor (one core): wall-clock seconds from
   start to exit, start-up included, its CPU seconds and its peak RSS.

Printed per run: both wall times and their ratio, both CPU times and their ratio (less sensitive
to other work on the machine). The goal is a wall ratio of at most 3.

3. **evaluate beside its floor**, ``--repeat`` more times: the same run of evaluate while this
   process decodes the export with orjson over and over on the other core until evaluate exits;
   the floor is the time per whole export at the rate decoded in those same seconds. On a
   virtual machine whose speed drifts within the minute, a floor decoded just before a run can
   be 1.5× faster or slower than one during it; sampled in the same window, the ratios spread
   far less (both processes then share the machine's memory bandwidth, which slows both).

**Start-up**: ``fhirmatch evaluate`` on an empty NDJSON file (it exits 2: no patients), once with
an empty trial cache (compiles the trials) and then ``--startup-runs`` times with the cache
filled; the median wall time of those is the figure (goal: at most 0.5 s).

Every run has Python's bytecode cache, as an installed fhirmatch has (``pip`` compiles the
package when it installs it): ``PYTHONDONTWRITEBYTECODE`` is removed from the runs'
environment, so a checkout's first run writes ``__pycache__`` and the others read it.

A first line describes the machine. Memory: the peak RSS of evaluate for each size shows whether
it grows with the population.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import machine, write_export

REPO = Path(__file__).resolve().parent.parent
TRIALS = REPO / "fixtures" / "trials"
AS_OF = "2026-11-01"


def decode_all(folder: Path, loads: object) -> tuple[float, float, int]:
    """(wall s, CPU s, lines) to decode every line of every file in ``folder`` with ``loads``."""
    files = sorted(p for p in folder.iterdir() if p.name.endswith(".ndjson"))
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for path in files:
        with path.open("rb") as fh:
            for line in fh:
                loads(line)  # type: ignore[operator]
                n += 1
    return time.perf_counter() - t0, time.process_time() - c0, n


def run_cli(
    args: list[str], env: dict[str, str], floor_of: Path | None = None
) -> tuple[float, float, int, int, float | None]:
    """Run ``python -m fhirmatch ARGS``: (wall s, CPU s, peak RSS bytes, exit code, floor).

    With ``floor_of`` (an export folder), this process meanwhile decodes that export with orjson
    over and over on the other core, until fhirmatch exits; the floor is then the seconds per
    whole export at the rate decoded in that same window (else None). Sampled over exactly the
    time evaluate runs, it is slowed alike when the machine's speed drifts within the minute (a
    floor measured before or after may not be)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "fhirmatch", *args],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            cwd=REPO,
        )
        ended: list[tuple[float, int, Any]] = []

        def reap() -> None:
            _pid, status, usage = os.wait4(proc.pid, 0)
            ended.append((time.perf_counter(), status, usage))

        waiter = threading.Thread(target=reap, daemon=True)
        waiter.start()
        floor = None if floor_of is None else _decode_until(ended, floor_of)
        waiter.join()
        stop, status, usage = ended[0]
        code = os.waitstatus_to_exitcode(status)
        if code not in (0, 1, 2):
            err.seek(0)
            raise SystemExit(f"fhirmatch {' '.join(args)} failed:\n{err.read().decode()[-3000:]}")
    return stop - t0, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, code, floor


def _decode_until(ended: list[Any], folder: Path) -> float:
    """Decode every line of ``folder`` with orjson, again and again, until ``ended`` is filled:
    the seconds one whole pass takes at the rate achieved."""
    files = sorted(p for p in folder.iterdir() if p.name.endswith(".ndjson"))
    total = sum(p.stat().st_size for p in files)
    done = 0
    d0 = time.perf_counter()
    while not ended:
        for path in files:
            with path.open("rb") as fh:
                n = 0
                for line in fh:
                    orjson.loads(line)
                    n += 1
                    if n % 1000 == 0 and ended:
                        break
                done += fh.tell()
            if ended:
                break
    return (time.perf_counter() - d0) / (done / total)


def run_env(tmp: Path) -> dict[str, str]:
    """The runs' environment: their own trial cache, and bytecode cached (see above)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "FHIRMATCH_CACHE_DIR": str(tmp / "startup-cache")}


def startup(tmp: Path, runs: int) -> tuple[float, list[float]]:
    """(wall s with an empty trial cache, wall s of each run with the cache filled)."""
    empty = tmp / "empty.ndjson"
    empty.write_text("")
    env = run_env(tmp)
    args = ["evaluate", "--trials", str(TRIALS), "--patients", str(empty), "--format", "json"]
    cold = run_cli(args, env)
    assert cold[3] == 2, "an empty input must exit 2"
    return cold[0], [run_cli(args, env)[0] for _ in range(runs)]


def export_types() -> set[str]:
    """The types the export holds, found in a child process: loading the trials here would make
    this process large, and a child forked from it counts that memory in its own peak RSS."""
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); "
        "from bench_engine import load_trials; from bench_scale import needed_types; "
        "print(json.dumps(sorted(needed_types(load_trials()))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, check=True)
    return set(json.loads(out.stdout))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000])
    ap.add_argument("--templates", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--startup-runs", type=int, default=7)
    ap.add_argument("--keep", type=Path, help="keep the exports here and reuse them")
    args = ap.parse_args()
    print(machine(), flush=True)
    types = export_types()
    with tempfile.TemporaryDirectory(prefix="fhirmatch-bench-offline-") as raw:
        tmp = Path(raw)
        cold, warm = startup(tmp, args.startup_runs)
        print(
            f"start-up (evaluate, empty input): {statistics.median(warm):.2f} s median of "
            f"{len(warm)} with the trial cache filled (min {min(warm):.2f}, max {max(warm):.2f}); "
            f"{cold:.2f} s with an empty cache",
            flush=True,
        )
        env = run_env(tmp)
        print(
            "| patients | NDJSON MB | run | orjson decode s | msgspec decode s | evaluate s "
            "| ratio (wall) | orjson CPU s | evaluate CPU s | ratio (CPU) | evaluate peak RSS MB |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
        for size in args.sizes:
            base = args.keep if args.keep is not None else tmp
            folder = base / f"offline-{size}"
            marker = folder / ".complete"
            if not marker.exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                write_export(folder, size, args.templates, types)
                marker.write_text("ok")
            mb = sum(p.stat().st_size for p in folder.glob("*.ndjson")) / 1e6
            out = tmp / "out.ndjson"
            ratios, beside = [], []
            evaluate = [
                "evaluate",
                "--trials",
                str(TRIALS),
                "--patients",
                str(folder),
                "--as-of",
                AS_OF,
                "--format",
                "ndjson",
                "--output",
                str(out),
            ]
            for run in range(1, args.repeat + 1):
                floor_wall, floor_cpu, _n = decode_all(folder, orjson.loads)
                ms_wall, _ms_cpu, _ = decode_all(folder, msgspec.json.Decoder().decode)
                wall, cpu, rss, code, _floor = run_cli(evaluate, env)
                assert code == 0, f"evaluate exited {code}"
                ratios.append(wall / floor_wall)
                print(
                    f"| {size} | {mb:.0f} | {run} | {floor_wall:.2f} | {ms_wall:.2f} | {wall:.2f} "
                    f"| {wall / floor_wall:.2f} | {floor_cpu:.2f} | {cpu:.2f} "
                    f"| {cpu / floor_cpu:.2f} | {rss / 1e6:.0f} |",
                    flush=True,
                )
            for _run in range(args.repeat):
                wall, _cpu, _rss, code, floor = run_cli(evaluate, env, floor_of=folder)
                assert code == 0 and floor is not None, f"evaluate exited {code}"
                beside.append((wall, floor))
            print(
                f"N={size}: median wall ratio {statistics.median(ratios):.2f} (floor decoded "
                "before each run); with the floor decoded beside each run, in the same seconds "
                "on the other core: "
                + ", ".join(f"{w:.2f} s / {f:.2f} s = {w / f:.2f}" for w, f in beside)
                + f", median {statistics.median(w / f for w, f in beside):.2f}",
                flush=True,
            )
            out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
