#!/bin/sh
# Build a release into dist/VERSION (scripts/release.py): the sdist, the pure-Python wheel, and a
# compiled manylinux wheel for each CPython 3.11+ found, each installed and checked as pip chooses
# it. Sets up .venv first (scripts/env.sh). Arguments go to scripts/release.py (--help).
. "$(dirname "$0")/env.sh"
exec .venv/bin/python scripts/release.py "$@"
