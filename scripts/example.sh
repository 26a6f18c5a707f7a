#!/usr/bin/env bash
# The main job on a fresh machine: install, run the example workflow so that it
# fails half-way, then rerun it and watch every finished step being skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e .

store=examples/workdir/checkpoint.db
rm -rf examples/workdir
echo "== run 1: fails at iters-001/explore (a simulated crash)"
if AI2_KIT_EXAMPLE_FAIL_AT=iters-001/explore .venv/bin/python examples/workflow.py --store "$store"; then
    echo "expected the first run to fail" >&2
    exit 1
fi
echo
echo "== what finished before the failure"
.venv/bin/ai2-kit tool checkpoint load "$store" - ls || true
echo
echo "== run 2: resumes; finished steps are skipped"
.venv/bin/python examples/workflow.py --store "$store"
echo
echo "== what the two runs did, and a report page of the store"
.venv/bin/ai2-kit tool checkpoint load "$store" - runs
report=examples/workdir/report.html
.venv/bin/ai2-kit tool checkpoint load "$store" - report "$report"
echo "open it in a browser: file://$(cd "$(dirname "$report")" && pwd)/$(basename "$report")"
