"""Build hook: carry the top-level data folders into the package.

The mapping tables (``mappings/``), the seed trials (``fixtures/trials/``) and the demo patients
(``fixtures/patients/``) stay where they are, as the source. Building copies each folder whole,
every file in it whatever its name, into ``fhirmatch/_data/<kind>`` of the build, so the wheel
holds them and :mod:`fhirmatch.data` finds them with :mod:`importlib.resources`. ``MANIFEST.in``
grafts the same folders into the sdist, so a wheel built from the sdist holds them too.
Everything else is declared in ``pyproject.toml``.

**The compiled build.** With ``FHIRMATCH_COMPILE=1`` in the environment, the modules that run
once per NDJSON line, per patient or per criterion (:data:`COMPILED_MODULES`) are also compiled
to C extensions with mypyc, from the same source; the wheel is then specific to the platform and
Python version it was built on. The build backend (``build_support/backend.py``) adds mypy to the
build requirements only then. Without it, the wheel is pure Python. Both behave the same: the
suite runs against each (``scripts/test.sh`` and ``scripts/test-compiled.sh``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

#: package data folder -> source folder (relative to this file); mirrors fhirmatch.data
BUNDLE_FOLDERS = {
    "mappings": ("mappings",),
    "trials": ("fixtures", "trials"),
    "patients": ("fixtures", "patients"),
}
HERE = Path(__file__).resolve().parent
#: compiled with ``FHIRMATCH_COMPILE=1``; the rest of the package stays Python
COMPILED_MODULES = (
    "fhirmatch/engine.py",
    "fhirmatch/fhirpath.py",
    "fhirmatch/qualitative.py",
    "fhirmatch/records.py",
    "fhirmatch/stream.py",
)


def compiling() -> bool:
    """Whether this build compiles :data:`COMPILED_MODULES` (``FHIRMATCH_COMPILE=1``)."""
    flag = os.environ.get("FHIRMATCH_COMPILE", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"fhirmatch build: FHIRMATCH_COMPILE must be 0 or 1, not {flag!r}")
    return flag == "1"


def extensions() -> list[object]:
    """The C extensions of a compiled build (none otherwise)."""
    if not compiling():
        return []
    from mypyc.build import mypycify

    return list(mypycify(list(COMPILED_MODULES), opt_level="3", group_name="fhirmatch"))


def bundle_files() -> list[tuple[Path, str]]:
    """Every file under the source folders, with its path inside the package."""
    files: list[tuple[Path, str]] = []
    for kind, parts in BUNDLE_FOLDERS.items():
        source = HERE.joinpath(*parts)
        if not source.is_dir():
            raise SystemExit(f"fhirmatch build: the data folder {source} is missing")
        for path in sorted(source.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                rel = path.relative_to(source).as_posix()
                files.append((path, f"_data/{kind}/{rel}"))
    return files


class BuildWithData(build_py):
    """build_py that also copies the data folders into ``<build_lib>/fhirmatch/_data``."""

    def run(self) -> None:
        super().run()
        # an editable install reads the top-level folders themselves (fhirmatch.data)
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "fhirmatch" / "_data"
        if target.exists():
            shutil.rmtree(target)  # a file removed from the source leaves the next build too
        for source, rel in bundle_files():
            dest = Path(self.build_lib) / "fhirmatch" / rel
            self.mkpath(os.fspath(dest.parent))
            self.copy_file(os.fspath(source), os.fspath(dest))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            base = Path(self.build_lib) / "fhirmatch"
            outputs += [os.fspath(base / rel) for _, rel in bundle_files()]
        return outputs


if __name__ == "__main__":  # as the build runs it; the tests load it for COMPILED_MODULES
    setup(cmdclass={"build_py": BuildWithData}, ext_modules=extensions())
