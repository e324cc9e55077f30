"""Broken trial definitions stop ``trials check`` and ``match`` before anything is sent.

``match`` runs against a recording proxy in front of the sandbox: a rejected definition must
leave it without a single request (nothing published, nothing written), exit 2 and name the
file and the criterion. (Broken FHIRPath through ``match`` is in tests/integration/test_match.py;
the checker's full catalogue of breakages is in tests/unit/test_trials.py.)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fhirmatch.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from faultproxy import FaultProxy

REPO = Path(__file__).resolve().parents[2]
ESCC = REPO / "fixtures" / "trials" / "escc-sbrt-antipd1.json"


def _action(bundle: dict[str, Any], action_id: str) -> dict[str, Any]:
    def walk(actions: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for a in actions:
            yield a
            yield from walk(a.get("action") or [])

    for entry in bundle["entry"]:
        res = entry["resource"]
        if res["resourceType"] == "PlanDefinition":
            for a in walk(res.get("action") or []):
                if a.get("id") == action_id:
                    return a
    raise KeyError(action_id)


def unknown_value_set(b: dict[str, Any]) -> None:
    _action(b, "inc-ecog")["input"][0]["codeFilter"][0]["valueSet"] = (
        "https://fhirmatch.dev/fhir/ValueSet/no-such-thing"
    )


def impossible_unit(b: dict[str, Any]) -> None:
    inp = _action(b, "inc-hemoglobin")["input"][0]
    unit_ext = next(e for e in inp["extension"] if "valueCode" in e and "unit" in e["url"])
    unit_ext["valueCode"] = "furlong/fortnight"


def broken_fhirpath(b: dict[str, Any]) -> None:
    _action(b, "inc-ecog")["condition"][0]["expression"]["expression"] = "%ecog.value <= ("


BREAKAGES: list[tuple[Callable[[dict[str, Any]], None], str, str]] = [
    (unknown_value_set, "no-such-thing", "inc-ecog"),
    (impossible_unit, "furlong/fortnight", "inc-hemoglobin"),
    (broken_fhirpath, "FHIRPath", "inc-ecog"),
]


def _broken(tmp_path: Path, breakage: Callable[[dict[str, Any]], None]) -> Path:
    bundle = json.loads(ESCC.read_text(encoding="utf-8"))
    breakage(bundle)
    path = tmp_path / "broken-trial.json"
    path.write_text(json.dumps(bundle), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("breakage", "phrase", "criterion"), BREAKAGES, ids=[b[0].__name__ for b in BREAKAGES]
)
def test_trials_check_rejects(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    breakage: Callable[[dict[str, Any]], None],
    phrase: str,
    criterion: str,
) -> None:
    path = _broken(tmp_path, breakage)
    assert main(["trials", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and phrase in err and criterion in err


@pytest.mark.integration
@pytest.mark.parametrize(
    ("breakage", "phrase", "criterion"), BREAKAGES, ids=[b[0].__name__ for b in BREAKAGES]
)
def test_match_rejects_before_any_request(
    fhir_base_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    breakage: Callable[[dict[str, Any]], None],
    phrase: str,
    criterion: str,
) -> None:
    path = _broken(tmp_path, breakage)
    with FaultProxy(fhir_base_url) as proxy:
        code = main(
            [
                "match",
                "--server",
                proxy.base_url,
                "--trials",
                str(ESCC.parent / "NCT06767007.json"),
                str(path),
                "--state",
                str(tmp_path / "state.json"),
            ]
        )
        assert proxy.seen == []  # not even the good trial file was published
    assert code == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and phrase in err and criterion in err
    assert not (tmp_path / "state.json").exists()
