"""A wheel that works anywhere: build the sdist and the wheel as a release would
(``python -m build``: the wheel is built from the sdist, each in an isolated environment),
install the wheel with the ``sandbox`` extra into a fresh venv outside the repository, and run
the commands a new user runs, from an empty directory and without ``--trials``: none may print a
traceback. Every test runs twice: on the pure-Python wheel, and on the compiled wheel
(``FHIRMATCH_COMPILE=1``, see ``setup.py``). Slow (a fresh venv installs every dependency; the
pip cache makes it cheaper), so it runs in ``.ci/run`` after the default suite:
``pytest -m slow tests/packaging``."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

import fhirmatch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
AS_JSON = ("--as-of", "2026-11-01", "--format", "json")
SEED_TRIALS = {"NCT03731442", "NCT05183958", "NCT06084897", "NCT06767007", "escc-sbrt-antipd1"}


class Installed:
    """A fresh venv holding the built wheel; :meth:`run` runs its ``fhirmatch`` in ``cwd``."""

    def __init__(self, root: Path, cwd: Path, *, compiled: bool) -> None:
        self.root = root
        self.cwd = cwd
        self.compiled = compiled
        self.bin = root / "venv" / "bin"
        # nothing of this checkout's environment: no PYTHONPATH, no overrides, not its venv
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("FHIRMATCH_", "PYTHON", "VIRTUAL_ENV", "PYTEST"))
        }
        self.env["PATH"] = f"{self.bin}{os.pathsep}{self.env.get('PATH', '')}"

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / "fhirmatch"), *args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def python(self, code: str, *args: str) -> str:
        proc = subprocess.run(
            [str(self.bin / "python"), "-c", code, *args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return proc.stdout


def _no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module", params=["pure", "compiled"])
def installed(request: pytest.FixtureRequest) -> Iterator[Installed]:
    # a private temporary folder, not pytest's numbered ones: another pytest session on the same
    # machine may clean those up while this (long) module still uses its venv
    root = Path(tempfile.mkdtemp(prefix="fhirmatch-wheel-"))
    try:
        yield from _install(root, compiled=request.param == "compiled")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _install(root: Path, *, compiled: bool) -> Iterator[Installed]:
    assert not root.resolve().is_relative_to(REPO.resolve())
    dist = root / "dist"
    env = {k: v for k, v in os.environ.items() if k != "FHIRMATCH_COMPILE"}
    if compiled:
        env["FHIRMATCH_COMPILE"] = "1"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(REPO)],
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert len(list(dist.glob("*.tar.gz"))) == 1
    (wheel,) = dist.glob("*.whl")
    # a compiled wheel is for this platform and Python only; the other runs anywhere
    assert wheel.name.endswith("-py3-none-any.whl") != compiled, wheel.name
    venv.EnvBuilder(with_pip=True, clear=True).create(root / "venv")
    pip = subprocess.run(
        [
            str(root / "venv" / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            f"{wheel}[sandbox]",
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    empty = root / "empty"
    empty.mkdir()
    yield Installed(root, empty, compiled=compiled)


def test_the_installed_package_is_the_wheel(installed: Installed) -> None:
    out = installed.python(
        "import json, fhirmatch as f\n"
        "print(json.dumps([f.__file__, f.__version__, str(f.mappings_dir()),"
        " str(f.seed_trials_dir()), str(f.demo_patients_dir())]))"
    )
    module, version, mappings, trials, patients = json.loads(out)
    package = Path(module).parent
    assert package.parent.name == "site-packages"
    assert package.is_relative_to(installed.root / "venv")
    assert version == fhirmatch.__version__
    assert [mappings, trials, patients] == [
        str(package / "_data" / kind) for kind in ("mappings", "trials", "patients")
    ]
    proc = installed.run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"fhirmatch {fhirmatch.__version__}"


def test_the_build_is_what_it_says(installed: Installed) -> None:
    spec = importlib.util.spec_from_file_location(
        "compiled_check", REPO / "scripts/compiled_check.py"
    )
    assert spec is not None and spec.loader is not None
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    compiled = check.module_names()
    assert "fhirmatch.engine" in compiled
    out = installed.python(check.PROBE, json.dumps(["fhirmatch.cli", *compiled]))
    cli, *hot = json.loads(out)
    assert not cli  # only the modules setup.py names are compiled
    assert hot == [installed.compiled] * len(compiled)


def test_trials_check_without_a_path(installed: Installed) -> None:
    proc = installed.run("trials", "check")
    _no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(SEED_TRIALS)} trial(s) valid." in proc.stdout
    proc = installed.run("trials", "show", "NCT06767007")
    _no_traceback(proc)
    assert proc.returncode == 0 and proc.stdout.startswith("NCT06767007: ")


def test_evaluate_a_patient_file_without_trials(installed: Installed) -> None:
    patient = installed.root / "patient.json"
    shutil.copy(REPO / "fixtures" / "patients" / "demo-escc-eligible.json", patient)
    proc = installed.run("evaluate", "--patients", str(patient), *AS_JSON)
    _no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)["results"]
    assert {r["study"].split("/")[1] for r in results} == SEED_TRIALS
    assert {r["patient"] for r in results} == {"Patient/demo-escc-eligible"}
    # the same results as this checkout gives (pure Python), whichever build is installed
    here = subprocess.run(
        [sys.executable, "-m", "fhirmatch", "evaluate", "--patients", str(patient), *AS_JSON],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert json.loads(here.stdout)["results"] == results


def test_demo(installed: Installed) -> None:
    proc = installed.run("demo", "--as-of", "2026-11-01", "--report", "report.html", timeout=600)
    _no_traceback(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for study in SEED_TRIALS:
        assert study in proc.stdout
    assert "screened 21 patients against 5 trials" in proc.stderr
    assert (installed.cwd / "report.html").stat().st_size > 0


def test_sandbox_serves_the_bundled_trials(installed: Installed) -> None:
    proc = subprocess.Popen(
        [str(installed.bin / "fhirmatch"), "sandbox"],
        cwd=installed.cwd,
        env=installed.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        loaded = proc.stdout.readline()
        base_url = proc.stdout.readline().strip()
        assert loaded.startswith("loaded: ") and "5 ResearchStudy" in loaded, loaded
        assert "21 Patient" in loaded, loaded
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/fhir")
        resp = requests.get(f"{base_url}/ResearchStudy", {"_summary": "count"}, timeout=30)
        assert resp.json()["total"] == len(SEED_TRIALS)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "Traceback" not in err


def test_broken_data_is_one_line_and_exit_2(installed: Installed) -> None:
    installed.env["FHIRMATCH_MAPPINGS"] = str(installed.root / "no-such-folder")
    try:
        proc = installed.run("trials", "check")
    finally:
        del installed.env["FHIRMATCH_MAPPINGS"]
    _no_traceback(proc)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no-such-folder" in proc.stderr
