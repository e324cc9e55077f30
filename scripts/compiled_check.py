"""Whether the modules ``setup.py`` compiles load as C extensions: the one check that a build is
what it says, shared by ``scripts/test-compiled.sh``, ``scripts/release.py`` and the packaging
tests.

    python scripts/compiled_check.py compiled|pure

checks the fhirmatch this Python imports (exit 1 when a module is not as expected). Other Pythons
(an installed wheel's venv) run :data:`PROBE` with the JSON list of :func:`module_names`.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: run by any Python as ``python -c PROBE '["fhirmatch.engine", ...]'``: prints a JSON list,
#: for each module named, whether it was imported from a C extension
PROBE = (
    "import importlib, importlib.machinery, json, sys\n"
    "suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)\n"
    "print(json.dumps([importlib.import_module(n).__file__.endswith(suffixes)"
    " for n in json.loads(sys.argv[1])]))"
)


def module_names() -> list[str]:
    """The dotted names of ``setup.py``'s ``COMPILED_MODULES``."""
    spec = importlib.util.spec_from_file_location("fhirmatch_setup", REPO / "setup.py")
    assert spec is not None and spec.loader is not None
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # setup() itself runs only as __main__
    return [path.removesuffix(".py").replace("/", ".") for path in setup.COMPILED_MODULES]


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("compiled", "pure"):
        print("usage: compiled_check.py compiled|pure", file=sys.stderr)
        return 2
    names = module_names()
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(names)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    want = argv[0] == "compiled"
    wrong = [name for name, ext in zip(names, json.loads(out), strict=True) if ext != want]
    if wrong:
        print(f"not {argv[0]}: {', '.join(wrong)}", file=sys.stderr)
        return 1
    print(f"{argv[0]}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
