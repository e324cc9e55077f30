"""The release script's own logic (``scripts/release.py``): which Pythons it builds for, and how
it reads a wheel's tags. The release itself (builds, installs, the byte-for-byte comparison) runs
in ``.ci/run``, as ``scripts/release.sh``."""

from __future__ import annotations

import importlib.util
import stat
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def release() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fhirmatch_release", REPO / "scripts/release.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_this_python_is_one_to_build_for(release: ModuleType) -> None:
    python = release.probe(sys.executable)
    assert python is not None
    assert python.version == tuple(sys.version_info[:3])
    assert python.tag == f"cp{sys.version_info[0]}{sys.version_info[1]}"


def test_what_is_not_a_working_python_is_left_out(release: ModuleType, tmp_path: Path) -> None:
    assert release.probe(tmp_path / "no-such-python") is None
    # a pyenv shim for a version that is not selected: it exists, and exits 127 with a message
    shim = _script(
        tmp_path / "python3.12", 'echo "pyenv: python3.12: command not found" >&2\nexit 127'
    )
    assert release.probe(shim) is None
    # a Python older than the package supports
    old = _script(
        tmp_path / "python3.10",
        'echo \'{"version": [3, 10, 13], "implementation": '
        '"cpython", "executable": "/x", "headers": true}\'',
    )
    assert release.probe(old) is None
    # one without its headers cannot compile
    bare = _script(
        tmp_path / "python3.13",
        'echo \'{"version": [3, 13, 0], "implementation": '
        '"cpython", "executable": "/x", "headers": false}\'',
    )
    assert release.probe(bare) is None


def test_a_named_python_that_does_not_work_is_an_error(release: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(release.ReleaseError, match="no-such-python"):
        release.find_pythons([str(tmp_path / "no-such-python")], {})


def test_found_pythons_are_one_per_minor_version(release: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "bin"
    path.mkdir()
    # two more names for this very Python, and a broken shim: still one build for this version
    _script(path / f"python3.{sys.version_info[1]}", f'exec "{sys.executable}" "$@"')
    _script(path / "python3.19", f'exec "{sys.executable}" "$@"')
    _script(path / "python3.18", "exit 127")
    pyenv = tmp_path / "pyenv"
    (pyenv / "versions" / "3.12.1" / "bin").mkdir(parents=True)
    _script(pyenv / "versions" / "3.12.1" / "bin" / "python3", "exit 1")
    found = release.find_pythons([], {"PATH": str(path), "PYENV_ROOT": str(pyenv)})
    assert [p.version[:2] for p in found] == [tuple(sys.version_info[:2])]


def test_wheel_tags(release: ModuleType) -> None:
    name = "fhirmatch-0.1.0-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"
    assert release.wheel_tags(Path(name)) == (
        "cp312",
        "cp312",
        "manylinux2014_x86_64.manylinux_2_17_x86_64",
    )
    assert release.wheel_tags(Path("fhirmatch-0.1.0-py3-none-any.whl")) == ("py3", "none", "any")
    with pytest.raises(release.ReleaseError):
        release.wheel_tags(Path("fhirmatch-0.1.0.tar.gz"))


def test_a_folder_it_did_not_make_is_never_emptied(release: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("someone's file", encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        release.main(["--out", str(tmp_path)])
    assert exc.value.code == 2
    assert (tmp_path / "keep.txt").read_text(encoding="utf-8") == "someone's file"
