# Sourced by scripts/demo.sh and scripts/test.sh: create .venv (once) and install fhirmatch with
# everything the demo and the tests need, including the local FHIR server (sekmet-fhir, pinned).
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "fhirmatch needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 2; }
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.fhirmatch-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[test,sandbox,dev,dask]'
    touch "$stamp"
fi
