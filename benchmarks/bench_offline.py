"""Offline screening against its floor: `fhirmatch evaluate` end to end vs decoding the export.

    .venv/bin/python benchmarks/bench_offline.py [--sizes 2000 8000] [--templates 5]
        [--repeat 3] [--keep DIR] [--builds pure compiled]

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
4. **the least disturbed runs**: the fastest evaluate of (1–2) against the fastest floor of the
   same size. Other work on the machine only ever adds time, so the minimum of several runs is
   the closest to each one's own cost (the rule ``timeit`` follows); both minimums come from
   the same runs as the medians above.

**Start-up**: ``fhirmatch evaluate`` on an empty NDJSON file (it exits 2: no patients), once with
an empty trial cache (compiles the trials) and then ``--startup-runs`` times with the cache
filled; the median wall time of those is the figure (goal: at most 0.5 s).

Every run has Python's bytecode cache, as an installed fhirmatch has (``pip`` compiles the
package when it installs it): ``PYTHONDONTWRITEBYTECODE`` is removed from the runs'
environment, so a checkout's first run writes ``__pycache__`` and the others read it.

**Builds**: each figure is measured for each of ``--builds``: ``pure`` is this checkout as it is
(pure Python); ``compiled`` is the build ``FHIRMATCH_COMPILE=1`` makes (``setup.py``: the
per-line and per-patient modules compiled with mypyc), made once per run in a temporary copy of
the package (``setup.py build_ext --inplace``; it needs mypy, from the ``dev`` extra, and a C
compiler). ``--installed VENV`` adds the fhirmatch installed in that virtual environment, run
by its Python from an empty directory: what a ``pip install`` gave, for example from a release
folder (``pip install --no-index --find-links dist/VERSION fhirmatch``, README). The runs of the
builds alternate, so each meets the same moments of the machine.

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
    args: list[str],
    env: dict[str, str],
    root: Path = REPO,
    floor_of: Path | None = None,
    python: str = sys.executable,
) -> tuple[float, float, int, int, float | None]:
    """Run ``python -m fhirmatch ARGS`` in ``root`` (the fhirmatch there, or else the one
    ``python`` has installed, is the one run): (wall s, CPU s, peak RSS bytes, exit code, floor).

    With ``floor_of`` (an export folder), this process meanwhile decodes that export with orjson
    over and over on the other core, until fhirmatch exits; the floor is then the seconds per
    whole export at the rate decoded in that same window (else None). Sampled over exactly the
    time evaluate runs, it is slowed alike when the machine's speed drifts within the minute (a
    floor measured before or after may not be)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [python, "-m", "fhirmatch", *args],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            cwd=root,
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


def run_env(tmp: Path, build: str) -> dict[str, str]:
    """A build's runs' environment: its own trial cache, and bytecode cached (see above)."""
    skip = ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k not in skip}
    return {**env, "FHIRMATCH_CACHE_DIR": str(tmp / f"cache-{build}")}


def compiled_root(tmp: Path) -> Path:
    """A copy of the package with its hot modules compiled in place (``FHIRMATCH_COMPILE=1``),
    beside links to this checkout's data folders; ``python -m fhirmatch`` run there runs it."""
    root = tmp / "compiled"
    shutil.copytree(
        REPO / "fhirmatch",
        root / "fhirmatch",
        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd"),
    )
    shutil.copytree(REPO / "build_support", root / "build_support")
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(REPO / name, root / name)
    for name in ("mappings", "fixtures"):
        (root / name).symlink_to(REPO / name)
    print("compiling the compiled build (mypyc, once per run) ...", flush=True)
    proc = subprocess.run(
        [sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"],
        cwd=root,
        env={**os.environ, "FHIRMATCH_COMPILE": "1"},
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"the compiled build failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    check = [sys.executable, str(REPO / "scripts" / "compiled_check.py"), "compiled"]
    subprocess.run(check, cwd=root, check=True, stdout=subprocess.DEVNULL)
    return root


def installed_root(tmp: Path, venv: Path) -> tuple[Path, str]:
    """An empty directory to run ``venv``'s fhirmatch from (so no checkout is imported), and
    that venv's Python; says which build of fhirmatch it holds."""
    python = venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"--installed {venv}: no bin/python there")
    root = tmp / "installed"
    root.mkdir()
    code = "import fhirmatch, fhirmatch.engine as e; print(fhirmatch.__version__, e.__file__)"
    out = subprocess.run([python, "-c", code], cwd=root, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"--installed {venv}: fhirmatch does not import:\n{out.stderr[-2000:]}")
    version, engine = out.stdout.split()
    kind = "compiled" if not engine.endswith(".py") else "pure"
    print(f"installed: fhirmatch {version} in {venv}, the {kind} build ({Path(engine).name})")
    return root, str(python)


def startup(env: dict[str, str], root: Path, empty: Path, python: str) -> float:
    """Wall s of evaluate on an empty input (exit 2: no patients)."""
    args = ["evaluate", "--trials", str(TRIALS), "--patients", str(empty), "--format", "json"]
    wall, _cpu, _rss, code, _floor = run_cli(args, env, root, python=python)
    assert code == 2, "an empty input must exit 2"
    return wall


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
    ap.add_argument(
        "--builds", nargs="+", choices=["pure", "compiled"], default=["pure", "compiled"]
    )
    ap.add_argument(
        "--installed",
        type=Path,
        metavar="VENV",
        help="also measure the fhirmatch installed in this virtual environment",
    )
    args = ap.parse_args()
    print(machine(), flush=True)
    types = export_types()
    with tempfile.TemporaryDirectory(prefix="fhirmatch-bench-offline-") as raw:
        tmp = Path(raw)
        roots = {b: compiled_root(tmp) if b == "compiled" else REPO for b in args.builds}
        pythons = dict.fromkeys(args.builds, sys.executable)
        if args.installed is not None:
            args.builds.append("installed")
            roots["installed"], pythons["installed"] = installed_root(tmp, args.installed)
        envs = {b: run_env(tmp, b) for b in args.builds}
        empty = tmp / "empty.ndjson"
        empty.write_text("")
        cold = {b: startup(envs[b], roots[b], empty, pythons[b]) for b in args.builds}
        warm: dict[str, list[float]] = {b: [] for b in args.builds}
        for _run in range(args.startup_runs):
            for b in args.builds:
                warm[b].append(startup(envs[b], roots[b], empty, pythons[b]))
        for b in args.builds:
            print(
                f"{b}: start-up (evaluate, empty input): {statistics.median(warm[b]):.2f} s "
                f"median of {len(warm[b])} with the trial cache filled (min {min(warm[b]):.2f}, "
                f"max {max(warm[b]):.2f}); {cold[b]:.2f} s with an empty cache",
                flush=True,
            )
        print(
            "| build | patients | NDJSON MB | run | orjson decode s | msgspec decode s "
            "| evaluate s | ratio (wall) | orjson CPU s | evaluate CPU s | ratio (CPU) "
            "| evaluate peak RSS MB |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
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
            ratios: dict[str, list[float]] = {b: [] for b in args.builds}
            walls: dict[str, list[float]] = {b: [] for b in args.builds}
            floors: list[float] = []
            beside: dict[str, list[tuple[float, float]]] = {b: [] for b in args.builds}
            evaluate = ["evaluate", "--trials", str(TRIALS), "--patients", str(folder)]
            evaluate += ["--as-of", AS_OF, "--format", "ndjson", "--output", str(out)]
            for run in range(1, args.repeat + 1):
                for b in args.builds:
                    floor_wall, floor_cpu, _n = decode_all(folder, orjson.loads)
                    ms_wall, _ms_cpu, _ = decode_all(folder, msgspec.json.Decoder().decode)
                    wall, cpu, rss, code, _floor = run_cli(
                        evaluate, envs[b], roots[b], python=pythons[b]
                    )
                    assert code == 0, f"evaluate exited {code}"
                    ratios[b].append(wall / floor_wall)
                    walls[b].append(wall)
                    floors.append(floor_wall)
                    print(
                        f"| {b} | {size} | {mb:.0f} | {run} | {floor_wall:.2f} | {ms_wall:.2f} "
                        f"| {wall:.2f} | {wall / floor_wall:.2f} | {floor_cpu:.2f} | {cpu:.2f} "
                        f"| {cpu / floor_cpu:.2f} | {rss / 1e6:.0f} |",
                        flush=True,
                    )
            for _run in range(args.repeat):
                for b in args.builds:
                    wall, _cpu, _rss, code, floor = run_cli(
                        evaluate, envs[b], roots[b], folder, pythons[b]
                    )
                    assert code == 0 and floor is not None, f"evaluate exited {code}"
                    beside[b].append((wall, floor))
            for b in args.builds:
                print(
                    f"{b}, N={size}: median wall ratio {statistics.median(ratios[b]):.2f} (floor "
                    "decoded before each run); with the floor decoded beside each run, in the "
                    "same seconds on the other core: "
                    + ", ".join(f"{w:.2f} s / {f:.2f} s = {w / f:.2f}" for w, f in beside[b])
                    + f", median {statistics.median(w / f for w, f in beside[b]):.2f}",
                    flush=True,
                )
            for b in args.builds:
                print(
                    f"{b}, N={size}: least disturbed, the fastest of {len(walls[b])} runs "
                    f"{min(walls[b]):.2f} s against the fastest of {len(floors)} floors "
                    f"{min(floors):.2f} s: ratio {min(walls[b]) / min(floors):.2f}",
                    flush=True,
                )
            out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
