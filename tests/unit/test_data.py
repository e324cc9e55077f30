"""Where the bundled data is found: the package's ``_data`` when installed, the repository's
top-level folders in a checkout, ``$FHIRMATCH_MAPPINGS`` / ``$FHIRMATCH_TRIALS`` over both; and a
missing or unreadable table is one line and exit 2, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fhirmatch
from fhirmatch import data, units
from fhirmatch.cli import main

REPO = Path(__file__).resolve().parents[2]
SEED_TRIALS = {"NCT03731442", "NCT05183958", "NCT06084897", "NCT06767007", "escc-sbrt-antipd1"}


@pytest.fixture
def fresh_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget the process's unit tables, so the next use reads them again (restored after)."""
    monkeypatch.setattr(units, "_STATE", None)


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FHIRMATCH_MAPPINGS", raising=False)
    monkeypatch.delenv("FHIRMATCH_TRIALS", raising=False)


def test_checkout_reads_the_top_level_folders(no_env: None) -> None:
    assert data.bundled_dir("mappings") == REPO / "mappings"
    assert data.mappings_dir() == REPO / "mappings"
    assert data.seed_trials_dir() == REPO / "fixtures" / "trials"
    assert data.demo_patients_dir() == REPO / "fixtures" / "patients"
    assert data.default_trial_paths() == [REPO / "fixtures" / "trials"]
    # the other modules' defaults are the same folders
    from fhirmatch.terminology import default_mappings_dir as term_dir
    from fhirmatch.trials import default_mappings_dir, default_trials_paths

    assert term_dir() == default_mappings_dir() == units.mappings_dir() == REPO / "mappings"
    assert default_trials_paths() == [REPO / "fixtures" / "trials"]
    with pytest.raises(ValueError, match="unknown kind"):
        data.bundled_dir("valuesets")  # type: ignore[arg-type]


def test_public_names() -> None:
    assert fhirmatch.seed_trials_dir is data.seed_trials_dir
    assert fhirmatch.mappings_dir is data.mappings_dir
    assert issubclass(fhirmatch.DataFileError, fhirmatch.ConfigurationError)


def test_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIRMATCH_MAPPINGS", str(tmp_path))
    assert data.mappings_dir() == tmp_path
    monkeypatch.setenv("FHIRMATCH_MAPPINGS", str(tmp_path / "nowhere"))
    with pytest.raises(fhirmatch.DataFileError, match=r"FHIRMATCH_MAPPINGS=.*nowhere"):
        data.mappings_dir()
    monkeypatch.setenv("FHIRMATCH_TRIALS", os.pathsep.join(["a.json", "", "b"]))
    assert data.default_trial_paths() == [Path("a.json"), Path("b")]
    # the seed trials themselves are not an override
    assert data.seed_trials_dir() == REPO / "fixtures" / "trials"


def test_evaluate_defaults_to_the_bundled_trials(
    no_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # ``trials show`` without --trials: the installed copy below; ``trials check``: tests/packaging
    patient = REPO / "fixtures" / "patients" / "demo-escc-eligible.json"
    argv = ["evaluate", "--patients", str(patient), "--as-of", "2026-11-01", "--format", "json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert {r["study"].split("/")[1] for r in report["results"]} == SEED_TRIALS


def _copy_mappings(tmp_path: Path) -> Path:
    target = tmp_path / "mappings"
    shutil.copytree(REPO / "mappings", target)
    return target


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda m: (m / "units" / "aliases.csv").unlink(), "aliases.csv: No such file"),
        (lambda m: (m / "analytes.json").write_text("{not json"), "analytes.json"),
        (lambda m: (m / "units" / "forbidden.json").write_text("{}"), "forbidden.json is malf"),
        (lambda m: (m / "units" / "aliases.csv").write_text("a,b\n"), "aliases.csv is malformed"),
        (lambda m: (m / "valuesets" / "ecog.json").write_bytes(b"\xff\xfe"), "ecog.json"),
    ],
)
def test_a_broken_mapping_table_is_one_line_and_exit_2(
    damage: object,
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fresh_units: None,
) -> None:
    mappings = _copy_mappings(tmp_path)
    damage(mappings)  # type: ignore[operator]
    monkeypatch.setenv("FHIRMATCH_MAPPINGS", str(mappings))
    patient = REPO / "fixtures" / "patients" / "demo-escc-eligible.json"
    assert main(["evaluate", "--patients", str(patient)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("fhirmatch: ") and expected in err[0], err


def test_missing_mappings_override_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FHIRMATCH_MAPPINGS", str(tmp_path / "gone"))
    assert main(["trials", "check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a folder" in err[0], err


def _installed_copy(site: Path, *, with_data: bool) -> None:
    """The package as a wheel installs it: no repository around it, data in ``_data``."""
    shutil.copytree(
        REPO / "fhirmatch", site / "fhirmatch", ignore=shutil.ignore_patterns("__pycache__")
    )
    # a compiled build's shared runtime sits beside the package (scripts/test-compiled.sh)
    for runtime in REPO.glob("fhirmatch__mypyc.*"):
        shutil.copy2(runtime, site / runtime.name)
    if with_data:
        for kind, parts in data.BUNDLE_FOLDERS.items():
            shutil.copytree(REPO.joinpath(*parts), site / "fhirmatch" / data.PACKAGE_DATA / kind)


def _run(site: Path, cwd: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRMATCH_")}
    env["PYTHONPATH"] = str(site)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_installed_package_reads_its_own_data(tmp_path: Path) -> None:
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _installed_copy(site, with_data=True)
    code = (
        "import fhirmatch, sys\n"
        "print(fhirmatch.__file__)\n"
        "print(fhirmatch.mappings_dir()); print(fhirmatch.seed_trials_dir())\n"
        "print(fhirmatch.demo_patients_dir())\n"
        "from fhirmatch.cli import main\n"
        "sys.exit(main(['trials', 'show', 'NCT06767007']))\n"
    )
    proc = _run(site, elsewhere, code)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    package = site / "fhirmatch"
    assert lines[0] == str(package / "__init__.py")
    assert lines[1:4] == [str(package / "_data" / k) for k in ("mappings", "trials", "patients")]
    assert lines[4].startswith("NCT06767007: ")


def test_installed_package_without_data_is_one_line_and_exit_2(tmp_path: Path) -> None:
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _installed_copy(site, with_data=False)
    # a stray top-level mappings/ beside the package must not be taken for the tables
    shutil.copytree(REPO / "mappings", site / "mappings")
    code = (
        "import sys\n"
        "from fhirmatch import DataFileError, data\n"
        "try:\n    data.mappings_dir()\nexcept DataFileError as exc:\n    print(exc)\n"
        "from fhirmatch.cli import main\n"
        "sys.exit(main(['trials', 'check']))\n"
    )
    proc = _run(site, elsewhere, code)
    assert proc.returncode == 2, proc.stderr
    assert "mapping tables are missing" in proc.stdout
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "seed trials are missing" in err[0], err


@pytest.mark.parametrize("command", ["match", "listen"])
def test_server_commands_ask_for_trials_and_say_where_the_bundled_ones_are(
    command: str, no_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # they write to a server, so they take trials only when told; the message shows the way
    assert main([command, "--server", "http://127.0.0.1:1/fhir"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(REPO / "fixtures" / "trials") in err[0], err
