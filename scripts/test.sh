#!/usr/bin/env bash
# Install everything the tests need on a fresh machine, start PostgreSQL, run the checks.
# This is the README's test command, and what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

# A real PostgreSQL server for the PostgreSQL store's tests (installed and
# started by our own script; exports AI2_KIT_TEST_PG_URL).
if [ -f scripts/postgres.sh ]; then
    # shellcheck source=postgres.sh
    source scripts/postgres.sh
fi

.venv/bin/ruff check src tests benchmarks examples scripts
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
