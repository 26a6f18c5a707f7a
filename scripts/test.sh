#!/usr/bin/env bash
# Install everything the tests need on a fresh machine, start PostgreSQL, run the checks.
# This is the README's test command, and what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

# Debian packages the tests need, installed only when missing (without them
# their tests fail under CI=true instead of skipping):
#   libfuse2  the power-cut file system of tests/test_powercut.py (fusepy loads it)
#   strace    tests/test_fsync_order.py records the file-system calls of a save
#   chromium  tests/test_report.py loads the report page in a real headless browser
#   nftables  tests/test_pg_partition.py cuts a PostgreSQL connection inside a private network namespace
missing=()
ldconfig -p 2>/dev/null | grep 'libfuse\.so\.2' >/dev/null || missing+=(libfuse2)
command -v strace >/dev/null 2>&1 || missing+=(strace)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v nft >/dev/null 2>&1 || missing+=(nftables)
if [ ${#missing[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        export DEBIAN_FRONTEND=noninteractive
        { $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" \
            || { $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"; }; } >/dev/null
    else
        echo "test.sh: ${missing[*]} missing and apt-get is not available; install them" >&2
    fi
fi

# A real PostgreSQL server for the PostgreSQL store's tests (installed and
# started by our own script; exports AI2_KIT_TEST_PG_URL).
if [ -f scripts/postgres.sh ]; then
    # shellcheck source=postgres.sh
    source scripts/postgres.sh
fi

.venv/bin/ruff check src tests benchmarks examples scripts
.venv/bin/mypy
.venv/bin/python -m pytest "$@"

# The oldest and the newest declared Python run a fast subset as well (the
# full suite ran above on 3.11). Each has its own environment (.venv-py39,
# .venv-py313; gitignored), reinstalled only when pyproject.toml changes.
FAST_TESTS=(tests/test_api.py tests/test_contract.py tests/test_cli.py tests/test_cli_maintenance.py
            tests/test_entry_points.py tests/test_compat.py tests/test_type_hints.py tests/test_legacy.py
            tests/test_fingerprint.py)
other_python() {
    local version=$1 venv=$2 prefix stamp
    prefix=$(pyenv prefix "$version" 2>/dev/null || true)
    if [ -z "$prefix" ] || [ ! -x "$prefix/bin/python3" ]; then
        if [ "${CI:-}" = "true" ]; then
            echo "test.sh: Python $version is missing (pyenv prefix $version); it must run under CI=true" >&2
            exit 1
        fi
        echo "test.sh: Python $version is not installed; skipping its run" >&2
        return 0
    fi
    [ -x "$venv/bin/python" ] || "$prefix/bin/python3" -m venv "$venv"
    stamp=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ "$(cat "$venv/.installed" 2>/dev/null)" != "$stamp" ]; then
        "$venv/bin/python" -m pip install -q --disable-pip-version-check -e . \
            pytest pytest-timeout numpy 'psycopg[binary]'
        echo "$stamp" > "$venv/.installed"
    fi
    echo "test.sh: Python $version, fast subset"
    "$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" "${FAST_TESTS[@]}"
}
other_python 3.9.18 .venv-py39
other_python 3.13.0 .venv-py313
