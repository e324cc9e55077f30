"""The sdist and the wheel carry every file of the data folders, found by glob: what is in
``mappings/``, ``fixtures/trials/`` and ``fixtures/patients/`` is exactly what ships, so a table or
trial added there ships without touching the build. Built without isolation (the venv's
setuptools) to stay fast; ``test_install.py`` builds as a release would and installs the wheel."""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import fhirmatch
from fhirmatch.data import BUNDLE_FOLDERS, PACKAGE_DATA

REPO = Path(__file__).resolve().parents[2]
#: what a build needs from the repository (everything else stays out of the copy)
BUILD_INPUTS = ["fhirmatch", "mappings", "fixtures", "pyproject.toml", "setup.py", "MANIFEST.in"]
BUILD_INPUTS += ["build_support"]
BUILD_INPUTS += ["README.md", "LICENSE", "NOTICE", "CHANGELOG.md"]
#: files a colleague might add: other formats, a new sub-folder
EXTRA_FILES = {
    ("mappings",): ["valuesets/zz-test/new-table.json", "units/extra-aliases.tsv", "NEW.txt"],
    ("fixtures", "trials"): ["imported/NCT99999999.json"],
    ("fixtures", "patients"): ["more/notes.ndjson"],
}


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    """(source copy with extra data files, sdist, wheel) built from a copy of the repository."""
    base = tmp_path_factory.mktemp("build")
    src = base / "src"
    # (and no compiled module: scripts/test-compiled.sh runs this in a copy compiled in place)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc", "*.so", "*.pyd")
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    for parts, names in EXTRA_FILES.items():
        for name in names:
            target = src.joinpath(*parts, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f"added after the build was written: {name}\n")
    out = base / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    yield src, sdist, wheel


def test_wheel_holds_exactly_the_data_folders(built: tuple[Path, Path, Path]) -> None:
    src, _, wheel = built
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        for kind, parts in BUNDLE_FOLDERS.items():
            prefix = f"fhirmatch/{PACKAGE_DATA}/{kind}/"
            shipped = {n[len(prefix) :]: zf.read(n) for n in names if n.startswith(prefix)}
            source = _files(src.joinpath(*parts))
            assert sorted(shipped) == sorted(source), kind
            assert shipped == source, f"{kind}: contents differ"
            for extra in EXTRA_FILES[parts]:
                assert extra in shipped
        # nothing else under _data, and the package itself is complete
        data_kinds = {n.split("/")[2] for n in names if n.startswith(f"fhirmatch/{PACKAGE_DATA}/")}
        assert data_kinds == set(BUNDLE_FOLDERS)
        modules = {p.relative_to(REPO).as_posix() for p in (REPO / "fhirmatch").rglob("*.py")}
        assert modules <= set(names)
        assert {"fhirmatch/py.typed", "fhirmatch/templates/report.html.j2"} <= set(names)


def test_wheel_metadata(built: tuple[Path, Path, Path]) -> None:
    _, _, wheel = built
    assert wheel.name == f"fhirmatch-{fhirmatch.__version__}-py3-none-any.whl"
    dist_info = f"fhirmatch-{fhirmatch.__version__}.dist-info"
    with zipfile.ZipFile(wheel) as zf:
        meta = email.parser.Parser().parsestr(zf.read(f"{dist_info}/METADATA").decode())
        licences = {
            n[len(f"{dist_info}/licenses/") :]
            for n in zf.namelist()
            if n.startswith(f"{dist_info}/licenses/")
        }
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        notice = zf.read(f"{dist_info}/licenses/NOTICE")
    assert meta["Version"] == fhirmatch.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    assert set(meta.get_all("Provides-Extra") or []) == {"sandbox", "dask", "test", "dev"}
    assert licences == {"LICENSE", "NOTICE", "mappings/LICENSES.md"}
    assert notice == (REPO / "NOTICE").read_bytes()
    assert "fhirmatch = fhirmatch.cli:main" in entry_points


def test_sdist_holds_the_source_folders(built: tuple[Path, Path, Path]) -> None:
    src, sdist, _ = built
    root = f"fhirmatch-{fhirmatch.__version__}/"
    with tarfile.open(sdist) as tf:
        names = {m.name[len(root) :] for m in tf.getmembers() if m.isfile()}
    for parts in BUNDLE_FOLDERS.values():
        folder = "/".join(parts)
        assert {n for n in names if n.startswith(folder + "/")} == {
            f"{folder}/{rel}" for rel in _files(src.joinpath(*parts))
        }
    assert {"setup.py", "MANIFEST.in", "LICENSE", "NOTICE", "CHANGELOG.md"} <= names
    assert "build_support/backend.py" in names  # the build backend pyproject.toml names


def test_the_version_is_defined_once(capsys: pytest.CaptureFixture[str]) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fhirmatch.__version__"}
    from fhirmatch.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"fhirmatch {fhirmatch.__version__}\n"
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert f"## {fhirmatch.__version__} " in changelog
