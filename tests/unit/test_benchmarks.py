"""The benchmarks keep running: a benchmark that stops working measures nothing, and nobody
notices until its figures are needed. Each is started as a person starts it, on a tiny input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYNTHEA = REPO.parent / "shared" / "data" / "synthea-r4"


@pytest.mark.skipif(not SYNTHEA.is_dir(), reason="needs ../shared/data/synthea-r4 (see README)")
def test_the_engine_benchmark_runs_its_three_evaluators() -> None:
    """bench_engine.py compares the engine with a naive baseline that evaluates each condition
    with fhirpathpy itself; conditions call fhirmatch's memberOf(), which fhirpathpy only knows
    when it is given the function."""
    bench = REPO / "benchmarks" / "bench_engine.py"
    args = ["--patients", "4", "--templates", "2", "--naive", "2"]
    run = subprocess.run(
        [sys.executable, str(bench), *args], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for figure in ("naive baseline:", "engine, fhirpathpy conditions:", "compiled conditions:"):
        assert figure in run.stdout
