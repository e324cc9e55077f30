#!/bin/sh
# The test suite against the compiled build (setup.py: FHIRMATCH_COMPILE=1 compiles the per-line
# and per-patient modules with mypyc). The checkout's files are copied to a temporary folder, the
# modules are compiled there in place, and the suite runs in that copy; the checkout itself stays
# pure Python. Extra arguments go to pytest.
. "$(dirname "$0")/env.sh"
root=$(pwd)
git rev-parse --git-dir >/dev/null 2>&1 || { echo "$0: needs a git checkout" >&2; exit 2; }
work=$(mktemp -d "${TMPDIR:-/tmp}/fhirmatch-compiled-XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
mkdir "$work/src"
# every file git knows of or would add (tracked, and new files not ignored), as they are now
git ls-files -z --cached --others --exclude-standard \
    | tar --null -T - --ignore-failed-read -cf - | tar -xf - -C "$work/src"
# the public sample data some tests read, found beside the checkout (README)
if [ -d "$root/../shared" ]; then ln -s "$(cd "$root/../shared" && pwd)" "$work/shared"; fi
cd "$work/src"
FHIRMATCH_COMPILE=1 "$root/.venv/bin/python" setup.py --quiet build_ext --inplace \
    >"$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; echo "$0: the compiled build failed" >&2; exit 1; }
# every module setup.py compiles must now load as an extension
PYTHONPATH="$work/src" "$root/.venv/bin/python" scripts/compiled_check.py compiled
PYTHONPATH="$work/src" "$root/.venv/bin/python" -m pytest -m "not slow" -q -p no:cacheprovider "$@"
