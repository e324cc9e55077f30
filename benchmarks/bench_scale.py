"""Scale benchmark: throughput and peak memory of the executors on a Bulk-style export.

    .venv/bin/python benchmarks/bench_scale.py [--sizes 1000 4000] [--templates 5]
        [--executors local processes dask] [--workers 2]

For each size N, a population of N Synthea-templated patients (the generator of
``bench_engine.py``: real Synthea records as templates plus oncology labs) is written as a Bulk
Data style export, one NDJSON file per resource type, so grouping by patient goes through the
hash-partitioned spill files of :mod:`fhirmatch.stream` (``--partition-mb`` per partition). Each
executor then streams the export and evaluates every patient against the trials. Printed per run:
patients/s (grouping + evaluation, wall clock), and the peak RSS of the whole process tree
(this process plus worker processes, sampled every 50 ms with psutil).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import AS_OF, build_population, load_trials

from fhirmatch.executors import make_executor
from fhirmatch.records import iter_patient_records


def split_by_type(source: Path, folder: Path) -> int:
    """Rewrite a patient-ordered NDJSON.gz as one NDJSON file per resource type."""
    handles = {}
    n = 0
    with gzip.open(source, "rt", encoding="utf-8") as fh:
        for line in fh:
            rtype = json.loads(line)["resourceType"]
            out = handles.get(rtype)
            if out is None:
                out = handles[rtype] = (folder / f"{rtype}.ndjson").open("w", encoding="utf-8")
            out.write(line)
            n += 1
    for out in handles.values():
        out.close()
    return n


class TreeRss:
    """Peak RSS of this process and all its descendants."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    ap.add_argument("--templates", type=int, default=5)
    ap.add_argument("--executors", nargs="+", default=["local", "processes", "dask"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--partition-mb", type=float, default=64.0)
    args = ap.parse_args()
    trials = load_trials()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fhirmatch-bench-") as tmp:
        for size in args.sizes:
            ordered = Path(tmp) / f"pop-{size}.ndjson.gz"
            build_population(ordered, size, args.templates)
            folder = Path(tmp) / f"export-{size}"
            folder.mkdir()
            n_res = split_by_type(ordered, folder)
            ordered.unlink()
            mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
            for name in args.executors:
                with TreeRss() as rss:
                    t0 = time.perf_counter()
                    with make_executor(name, trials, workers=args.workers) as ex:
                        records = iter_patient_records(
                            [folder], partition_bytes=int(args.partition_mb * 1e6)
                        )
                        n = sum(1 for _ in ex.evaluate(records, as_of=AS_OF))
                    secs = time.perf_counter() - t0
                assert n == size, (n, size)
                rows.append((size, n_res, mb, name, secs, size / secs, rss.peak / 1e6))
                print(f"  {name} N={size}: {size / secs:.0f} patients/s", file=sys.stderr)
    head = (
        "patients",
        "resources",
        "NDJSON MB",
        "executor",
        "seconds",
        "patients/s",
        "peak RSS MB",
    )
    print(" | ".join(head))
    for size, n_res, mb, name, secs, rate, peak in rows:
        print(f"{size} | {n_res} | {mb:.0f} | {name} | {secs:.1f} | {rate:.0f} | {peak:.0f}")


if __name__ == "__main__":
    main()
