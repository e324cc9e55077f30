"""Scale benchmark: the executors on a Bulk Data export of 10,000 to 100,000 patients.

    .venv/bin/python benchmarks/bench_scale.py [--sizes 10000 100000] [--templates 5]
        [--executors local processes dask] [--workers 2] [--partition-mb 64]
        [--types needed|all] [--keep DIR] [--file-mb 256]

**The export.** For each size N, N Synthea-sized patients (the population of ``bench_engine.py``:
real Synthea records from ``../shared/data/synthea-r4`` used round-robin as ``--templates``
templates, plus random oncology labs, ECOG and diagnoses per patient) are written as a Bulk Data
export: uncompressed NDJSON, one series of files per resource type, each split into parts of at
most ``--file-mb`` (``Patient.001.ndjson``, ``Observation.001.ndjson``, ``Observation.002.ndjson``
…). Patients are in order inside each file, so one patient's resources are spread over every type.
The patients are the same ones ``build_population`` writes (same ids, same resources, same random
oncology data for a seed). ``--types needed`` (default) writes only the types a fhirmatch
``$export`` kick-off asks for: ``Patient``, ``Medication`` and the resource type of every data
input of the trials (all resources of those types: no ``_typeFilter``, as from a server that ignores
it). ``--types all`` writes every type of the templates, to measure what skipping unneeded types
before decoding saves; it is about 2.6 times bigger on disk.

Each template resource is serialised once, with a placeholder for the patient id, and written per
patient with the id substituted; only the oncology resources are serialised per patient. The
generation time and size are printed to stderr. ``--keep DIR`` writes the export of size N to
``DIR/N-needed/ndjson`` (or ``N-all``) with a ``manifest.json`` beside it and reuses it in later
runs when the manifest matches; without it the export goes to a temporary directory, removed once
every executor has run on it.

**What is measured.** Each executor (``fhirmatch.executors``) streams the export folder with
``Executor.evaluate_files`` (grouping by patient through hash-partitioned spill files of
``--partition-mb`` each, see :mod:`fhirmatch.stream`) and evaluates every patient against the trials
of ``bench_engine.load_trials``. Each run is a fresh child process (``--measure``), so no worker,
forkserver or cache of an earlier run is counted. Printed per run, as a markdown row as soon as the
run ends: wall-clock seconds and patients/s (grouping + evaluation, including starting and stopping
the workers, not the interpreter's start), the peak RSS of the run's whole process tree (the child
plus its worker processes, sampled every 50 ms; RSS is summed, so pages the workers share count once
per process), the peak size of the spill files (sampled every 0.5 s, so a short peak can be missed),
and a digest of every (patient, [(trial, status)]) in output order; every executor must yield the
same digest for one export (checked). The output order is the order patients are first seen in the
export's files, so the digests of ``--types needed`` and ``--types all`` differ even though the
results are the same. A first line describes the machine.

**Disk.** With ``--types needed`` and the default 5 templates a patient takes about 0.21 MB of
NDJSON (``--types all``: about 0.55 MB), so 100,000 patients write about 21 GB. While grouping, the
spill files hold another copy of the export (the measured peak equals the export's size), so a run
at 100,000 needs about 42 GB of free disk: the export and the spill files are both under
``--keep DIR`` when it is given, else in the system's temp directory. The generator writes about
2,000 patients/s (500,000 resources/s, 420 MB/s) with ``--types needed`` on a 2-core Xeon VM,
about 1 minute for 100,000.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import AS_OF, SYNTHEA, load_trials, oncology_resources

from fhirmatch.executors import make_executor
from fhirmatch.model import Trial
from fhirmatch.records import iter_patient_records

#: stands for the patient id in pre-serialised template lines (never occurs in Synthea data)
TOKEN = "PID0TOKEN0X7Q"


def needed_types(trials: list[Trial]) -> set[str]:
    """The resource types a fhirmatch ``$export`` kick-off asks for with these trials."""
    return {"Patient", "Medication"} | {inp.resource_type for t in trials for inp in t.all_inputs()}


def serialised_templates(n_templates: int, types: set[str] | None) -> list[dict[str, bytes]]:
    """Per template: resource type -> its NDJSON lines with ``TOKEN`` for the patient id.

    The same rewriting as ``bench_engine.build_population`` (the Patient id becomes the patient
    id, other ids are prefixed with it, ``subject``/``patient`` point to it; resources with
    neither are skipped), serialised once.
    """
    out = []
    files = sorted(SYNTHEA.glob("*.json.gz"))[:n_templates]
    for rec in iter_patient_records(files):
        if rec.patient is None:
            continue
        ref = {"reference": f"Patient/{TOKEN}"}
        lines: dict[str, list[str]] = {}
        for r in rec.resources:
            rtype = r["resourceType"]
            if rtype == "Patient":
                r = {**r, "id": TOKEN}
            elif "subject" in r:
                r = {**r, "id": f"{TOKEN}-{r.get('id')}", "subject": ref}
            elif "patient" in r:
                r = {**r, "id": f"{TOKEN}-{r.get('id')}", "patient": ref}
            else:
                continue
            if types is not None and rtype not in types:
                continue
            line = json.dumps(r)
            assert line.count(TOKEN) == (1 if rtype == "Patient" else 2), line[:200]
            lines.setdefault(rtype, []).append(line + "\n")
        # json.dumps escapes non-ASCII, so the text is ASCII: one byte per character
        out.append({rtype: "".join(ls).encode("ascii") for rtype, ls in lines.items()})
    if not out:
        raise SystemExit(f"no Synthea patients found in {SYNTHEA}")
    return out


class TypeFiles:
    """The NDJSON files of one resource type, a new part whenever one would exceed ``limit``."""

    def __init__(self, folder: Path, rtype: str, limit: int) -> None:
        self.folder, self.rtype, self.limit = folder, rtype, limit
        self.part = 0
        self.size = 0
        self.total = 0
        self.fh: IO[bytes] | None = None

    def _next(self) -> IO[bytes]:
        self.close()
        self.part += 1
        self.size = 0
        path = self.folder / f"{self.rtype}.{self.part:03d}.ndjson"
        self.fh = path.open("wb", buffering=1 << 20)
        return self.fh

    def write(self, text: bytes) -> None:
        """Append whole lines, starting a new part at a line boundary when this one is full."""
        fh = self.fh or self._next()
        self.total += len(text)
        while self.size + len(text) > self.limit:
            cut = text.rfind(b"\n", 0, self.limit - self.size) + 1
            if cut == 0 and self.size == 0:  # one line longer than a whole part
                cut = text.find(b"\n") + 1 or len(text)
            fh.write(text[:cut])
            text = text[cut:]
            fh = self._next()
        fh.write(text)
        self.size += len(text)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def write_export(
    folder: Path,
    n_patients: int,
    n_templates: int,
    types: set[str] | None,
    seed: int = 7,
    file_bytes: int = 256_000_000,
) -> tuple[int, int]:
    """Write ``n_patients`` patients to ``folder`` as a Bulk Data export (see the module doc).

    ``types`` limits the resource types written (``None``: all). Returns the number of
    resources and of bytes written.
    """
    templates = serialised_templates(n_templates, types)
    counts = [{t: text.count(b"\n") for t, text in tpl.items()} for tpl in templates]
    token = TOKEN.encode("ascii")
    rng = random.Random(seed)
    files: dict[str, TypeFiles] = {}

    def out(rtype: str) -> TypeFiles:
        f = files.get(rtype)
        if f is None:
            f = files[rtype] = TypeFiles(folder, rtype, file_bytes)
        return f

    written = 0
    try:
        for n in range(n_patients):
            k = n % len(templates)
            pid = f"bench-{n}"
            pid_bytes = pid.encode("ascii")
            for rtype, text in templates[k].items():
                out(rtype).write(text.replace(token, pid_bytes))
                written += counts[k][rtype]
            extra: dict[str, list[str]] = {}
            for r in oncology_resources(pid, rng):  # drawn even when unwritten: same data
                if types is None or r["resourceType"] in types:
                    extra.setdefault(r["resourceType"], []).append(json.dumps(r) + "\n")
            for rtype, lines in extra.items():
                out(rtype).write("".join(lines).encode("ascii"))
                written += len(lines)
    finally:
        for f in files.values():
            f.close()
    return written, sum(f.total for f in files.values())


def prepare_export(
    base: Path, size: int, args: argparse.Namespace, types: set[str] | None
) -> tuple[Path, int, int]:
    """The export folder for ``size`` patients under ``base``, reused when its manifest matches."""
    label = "all" if types is None else "needed"
    root = base / f"{size}-{label}"
    folder = root / "ndjson"
    manifest = root / "manifest.json"
    want = {
        "n_patients": size,
        "types": "all" if types is None else sorted(types),
        "templates": args.templates,
        "seed": 7,
        "file_bytes": int(args.file_mb * 1e6),
    }
    try:
        have = json.loads(manifest.read_text(encoding="utf-8"))
        on_disk = sum(p.stat().st_size for p in folder.iterdir())
    except (OSError, ValueError):
        have, on_disk = {}, -1
    if {k: have.get(k) for k in want} == want and on_disk == have.get("bytes"):
        print(f"N={size}: reusing {folder} ({on_disk / 1e9:.2f} GB)", file=sys.stderr)
        return folder, have["resources"], on_disk
    manifest.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    n_res, n_bytes = write_export(
        folder, size, args.templates, types, seed=7, file_bytes=want["file_bytes"]
    )
    secs = time.perf_counter() - t0
    n_files = sum(1 for _ in folder.iterdir())
    print(
        f"N={size}: generated {n_res} resources, {n_bytes / 1e9:.2f} GB in {n_files} files "
        f"in {secs:.1f}s ({n_res / secs:.0f} resources/s, {n_bytes / 1e6 / secs:.0f} MB/s)",
        file=sys.stderr,
    )
    manifest.write_text(
        json.dumps({**want, "resources": n_res, "bytes": n_bytes}, indent=1), encoding="utf-8"
    )
    return folder, n_res, n_bytes


def tree_bytes(path: Path) -> int:
    """Total size of the files under ``path`` (0 when it is gone)."""
    total = 0
    try:
        with os.scandir(path) as it:
            for entry in it:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        total += tree_bytes(Path(entry.path))
                    else:
                        total += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    pass  # removed while scanning
    except OSError:
        pass
    return total


class TreeRss:
    """Peak RSS of this process's descendants (a measured run and its workers); peak size of
    ``spill_dir`` if given."""

    def __init__(self, spill_dir: Path | None = None) -> None:
        self.peak = 0
        self.peak_spill = 0
        self.spill_dir = spill_dir
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        tick = 0
        while not self._stop.is_set():
            total = 0
            for p in me.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            if self.spill_dir is not None and tick % 10 == 0:  # every 0.5 s
                self.peak_spill = max(self.peak_spill, tree_bytes(self.spill_dir))
            tick += 1
            time.sleep(0.05)

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(args: argparse.Namespace) -> None:
    """One measured run (in its own process, so nothing of an earlier run is counted): evaluate
    the export with one executor; print a JSON line with the count, seconds and a digest."""
    trials = load_trials()
    problems: list[str] = []
    digest = hashlib.sha256()
    t0 = time.perf_counter()
    n = 0
    with make_executor(args.measure, trials, workers=args.workers) as ex:
        for record, results in ex.evaluate_files(
            [args.folder],
            as_of=AS_OF,
            problems=problems,
            partition_bytes=int(args.partition_mb * 1e6),
            spill_dir=args.spill,
        ):
            n += 1
            key = (record.patient_id, [(r.study, r.status) for r in results])
            digest.update(repr(key).encode())
    secs = time.perf_counter() - t0
    out = {"n": n, "secs": secs, "digest": digest.hexdigest()[:12], "problems": len(problems)}
    print(json.dumps(out), flush=True)


def run_isolated(
    name: str, folder: Path, spill: Path, args: argparse.Namespace
) -> tuple[dict[str, Any], TreeRss]:
    """Run :func:`measure` in a child process; sample its tree's memory and the spill size."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--measure",
        name,
        "--folder",
        str(folder),
        "--spill",
        str(spill),
        "--workers",
        str(args.workers),
        "--partition-mb",
        str(args.partition_mb),
    ]
    with TreeRss(spill) as rss:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{name} run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result, rss


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = psutil.virtual_memory().total / 2**30
    return (
        f"machine: {model}, {os.cpu_count()} logical cores, {ram:.1f} GiB RAM, "
        f"Python {platform.python_version()}, {platform.platform()}"
    )


HEAD = (
    "patients",
    "resources",
    "NDJSON GB",
    "executor",
    "workers",
    "seconds",
    "patients/s",
    "peak RSS MB",
    "peak spill GB",
    "digest",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000])
    ap.add_argument("--templates", type=int, default=5)
    ap.add_argument("--executors", nargs="+", default=["local", "processes", "dask"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--partition-mb", type=float, default=64.0)
    ap.add_argument("--types", choices=("needed", "all"), default="needed")
    ap.add_argument("--keep", type=Path, help="keep the exports here and reuse them")
    ap.add_argument("--file-mb", type=float, default=256.0, help="largest NDJSON file")
    ap.add_argument("--measure", choices=("local", "processes", "dask"), help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--spill", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        measure(args)
        return
    trials = load_trials()
    types = None if args.types == "all" else needed_types(trials)
    print(machine(), flush=True)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    header_done = False
    with tempfile.TemporaryDirectory(prefix="fhirmatch-bench-", dir=args.keep) as tmp:
        for size in args.sizes:
            folder, n_res, n_bytes = prepare_export(args.keep or Path(tmp), size, args, types)
            first_digest = None
            for name in args.executors:
                spill = Path(tmp) / f"spill-{size}-{name}"
                spill.mkdir()
                result, rss = run_isolated(name, folder, spill, args)
                n, secs = result["n"], result["secs"]
                shutil.rmtree(spill, ignore_errors=True)
                if result["problems"]:
                    print(f"  {name} N={size}: {result['problems']} problems", file=sys.stderr)
                if not header_done:
                    print("| " + " | ".join(HEAD) + " |")
                    print("|" + "---|" * len(HEAD), flush=True)
                    header_done = True
                hexd = result["digest"]
                workers = 1 if name == "local" else args.workers
                print(
                    f"| {size} | {n_res} | {n_bytes / 1e9:.2f} | {name} | {workers} "
                    f"| {secs:.1f} | {n / secs:.0f} | {rss.peak / 1e6:.0f} "
                    f"| {rss.peak_spill / 1e9:.2f} | {hexd} |",
                    flush=True,
                )
                assert n == size, f"{name}: {n} patients yielded for {size}"
                first_digest = first_digest or hexd
                assert hexd == first_digest, f"{name}: results differ from the first executor"
            if args.keep is None:
                shutil.rmtree(folder.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
