"""Start-up: each FHIRPath condition is parsed once, the unit registry is built only when a unit
is needed, compiled trials are cached by content hash, and resource types are known without
importing fhir.resources."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from fhirmatch import fhirpath, trialcache
from fhirmatch.engine import Engine
from fhirmatch.records import RESOURCE_TYPES
from fhirmatch.terminology import Terminology
from fhirmatch.trials import default_mappings_dir, load_trials

REPO = Path(__file__).resolve().parents[2]
TRIALS = REPO / "fixtures" / "trials"
PATIENTS = REPO / "fixtures" / "patients"


def test_resource_types_are_those_of_fhir_resources() -> None:
    from fhir.resources.R4B import fhirtypes, get_fhir_model_class
    from fhir.resources.R4B.resource import Resource

    expected = set()
    for name in dir(fhirtypes):
        if not name.endswith("Type"):
            continue
        try:
            cls = get_fhir_model_class(name[:-4])
        except ValueError:
            continue
        if issubclass(cls, Resource) and name[:-4] not in ("Resource", "DomainResource"):
            expected.add(name[:-4])
    assert expected == RESOURCE_TYPES


def test_each_condition_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # counted at ANTLR's lexer, which every parse of a FHIRPath text starts with (a call from a
    # module compiled with mypyc does not go through a patched module attribute)
    from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer

    calls: list[str] = []
    real = FHIRPathLexer.__init__

    def counting(self: Any, stream: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(stream.strdata)
        real(self, stream, *args, **kwargs)

    monkeypatch.setattr(FHIRPathLexer, "__init__", counting)
    monkeypatch.setattr(fhirpath, "_PARSED", {})
    trials = load_trials([TRIALS])
    Engine(trials, Terminology.load([default_mappings_dir()]))
    assert calls, "the conditions were not parsed at all"
    assert len(calls) == len(set(calls))  # checked by the loader, compiled by the engine: once


def test_a_condition_that_does_not_parse_has_no_tree_and_says_why() -> None:
    parsed = fhirpath.parse_expression("%ecog.valueQuantity.value <= ")
    assert parsed.tree is None and parsed.problems
    with pytest.raises(ValueError, match="FHIRPath"):
        fhirpath.compile_expression("%ecog.valueQuantity.value <= ")


def _copy_trials(tmp_path: Path) -> Path:
    folder = tmp_path / "trials"
    shutil.copytree(TRIALS, folder)
    return folder


def test_cached_trials_equal_compiled_ones_and_evaluate_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FHIRMATCH_CACHE_DIR", str(tmp_path / "cache"))
    folder = _copy_trials(tmp_path)
    first, term1 = trialcache.load_compiled([folder])
    entries = list((tmp_path / "cache").glob("trials-*.pickle"))
    assert len(entries) == 1
    assert stat.S_IMODE(entries[0].stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700
    second, term2 = trialcache.load_compiled([folder])
    assert second == first and [t.resources for t in second] == [t.resources for t in first]
    bundle = json.loads((PATIENTS / "demo-escc-eligible.json").read_text(encoding="utf-8"))
    resources = [e["resource"] for e in bundle["entry"]]
    as_of = date(2026, 11, 1)
    a = Engine(first, term1).evaluate(resources, as_of=as_of)
    b = Engine(second, term2).evaluate(resources, as_of=as_of)
    assert [r.model_dump() for r in a] == [r.model_dump() for r in b]


def test_a_changed_trial_file_is_compiled_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FHIRMATCH_CACHE_DIR", str(tmp_path / "cache"))
    folder = _copy_trials(tmp_path)
    before, _ = trialcache.load_compiled([folder])
    target = sorted(folder.glob("*.json"))[0]
    doc = json.loads(target.read_text(encoding="utf-8"))
    for entry in doc["entry"]:
        if entry["resource"]["resourceType"] == "ResearchStudy":
            entry["resource"]["title"] = "A changed title"
    target.write_text(json.dumps(doc), encoding="utf-8")
    after, _ = trialcache.load_compiled([folder])
    assert "A changed title" in {t.title for t in after}
    assert "A changed title" not in {t.title for t in before}
    assert len(list((tmp_path / "cache").glob("trials-*.pickle"))) == 2


def test_a_corrupt_or_shared_cache_entry_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FHIRMATCH_CACHE_DIR", str(tmp_path / "cache"))
    folder = _copy_trials(tmp_path)
    expected, _ = trialcache.load_compiled([folder])
    (entry,) = (tmp_path / "cache").glob("trials-*.pickle")
    entry.write_bytes(b"not a pickle")
    assert trialcache.load_compiled([folder])[0] == expected
    (entry,) = (tmp_path / "cache").glob("trials-*.pickle")
    os.chmod(entry, 0o666)  # noqa: S103 - writable by others: never unpickled
    assert trialcache._read(entry) is None
    monkeypatch.setenv("FHIRMATCH_CACHE", "off")
    assert trialcache.cache_dir() is None
    assert trialcache.load_compiled([folder])[0] == expected


def _python(script: str, env: dict[str, str], *args: str) -> str:
    """What ``script`` prints, run by this Python in a fresh process."""
    return subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, check=True
    ).stdout


def test_a_cached_start_parses_nothing_and_builds_no_unit_registry(tmp_path: Path) -> None:
    """In a fresh process whose trials come from the cache: neither pint nor fhirpathpy imported
    (so no ANTLR parse: the parser is fhirpathpy's; and every condition of the trials compiles
    natively); the first unit conversion then builds the registry."""
    env = {**os.environ, "FHIRMATCH_CACHE_DIR": str(tmp_path / "cache")}
    script = f"""
import sys
from fhirmatch import units
from fhirmatch.engine import Engine
from fhirmatch.trialcache import load_compiled
trials, term = load_compiled([{str(TRIALS)!r}])
Engine(trials, term)
print("fhirpathpy" in sys.modules, "pint" in sys.modules, units._STATE is None,
      "importlib.metadata" in sys.modules)
units.convert(1.0, "g/dL", "g/L")
print(units._STATE is not None)
"""
    runs = [_python(script, env).split() for _ in range(2)]
    assert runs[0][0] == "True"  # the first run parsed the conditions
    # nor importlib.metadata (the cache key finds the dependencies without it)
    assert runs[1] == ["False", "False", "True", "False", "True"]


def test_unit_conversions_seen_before_need_no_unit_registry(tmp_path: Path) -> None:
    """A second run over data with the same units converts them from the cache: pint is never
    imported, and the results are the same."""
    env = {**os.environ, "FHIRMATCH_CACHE_DIR": str(tmp_path / "cache")}
    script = f"""
import sys
from fhirmatch.cli import main
code = main(["evaluate", "--trials", {str(TRIALS)!r}, "--patients", {str(PATIENTS)!r},
             "--as-of", "2026-11-01", "--format", "ndjson", "--output", sys.argv[1]])
print(code, "pint" in sys.modules)
"""
    outs = []
    for n in range(2):
        out = tmp_path / f"out{n}.ndjson"
        printed = _python(script, env, str(out))
        outs.append((printed.split()[-2:], out.read_text(encoding="utf-8")))
    assert outs[0][0] == ["0", "True"]  # the demo patients' labs need conversions
    assert outs[1][0] == ["0", "False"]
    assert outs[1][1] == outs[0][1]
    assert list((tmp_path / "cache").glob("units-*.pickle"))


def test_an_ndjson_run_builds_no_result_validators(tmp_path: Path) -> None:
    """The result models build their pydantic validators and serializers only when first used:
    ``--format ndjson`` never uses them (the engine constructs results, msgspec writes them).
    Built afterwards, they read each line written and write it back the same."""
    env = {**os.environ, "FHIRMATCH_CACHE_DIR": str(tmp_path / "cache")}
    script = f"""
import sys
from fhirmatch.cli import main
from fhirmatch.results import CriterionResult, TrialResult
code = main(["evaluate", "--trials", {str(TRIALS)!r}, "--patients", {str(PATIENTS)!r},
             "--as-of", "2026-11-01", "--format", "ndjson", "--output", sys.argv[1]])
print(code, TrialResult.__pydantic_complete__, CriterionResult.__pydantic_complete__)
with open(sys.argv[1], encoding="utf-8") as fh:
    lines = [line.rstrip("\\n") for line in fh if line.startswith('{{"patient"')]
print(len(lines), all(TrialResult.model_validate_json(line).model_dump_json() == line
                      for line in lines))
"""
    out = tmp_path / "out.ndjson"
    (code, trial_built, criterion_built), (lines, same) = (
        row.split() for row in _python(script, env, str(out)).strip().splitlines()[-2:]
    )
    assert (code, trial_built, criterion_built) == ("0", "False", "False")
    assert int(lines) > 0 and same == "True"


def test_a_reinstalled_dependency_changes_the_cache_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key names each dependency the compiled trials hold results of by its ``__init__.py``
    and that file's size and modification time, which an upgrade or a reinstall rewrites."""
    package = tmp_path / "site" / "fhirpathpy"
    package.mkdir(parents=True)
    init = package / "__init__.py"
    init.write_text("__version__ = '1.0'\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    first = trialcache._installed("fhirpathpy")
    assert first.startswith(f"fhirpathpy {init}:")
    key = trialcache._key([TRIALS], [])
    init.write_text("__version__ = '1.1'\n")
    assert trialcache._installed("fhirpathpy") != first
    assert trialcache._key([TRIALS], []) != key
    assert trialcache._installed("no_such_package_here") == "no_such_package_here ?"
