#!/usr/bin/env bash
# A throwaway PostgreSQL server for the PostgreSQL store's tests.
#
#   source scripts/postgres.sh       # install if missing, start, export AI2_KIT_TEST_PG_URL
#   scripts/postgres.sh start        # the same, and print the URL
#   scripts/postgres.sh stop         # stop the server (the data stays in .pg/)
#   scripts/postgres.sh status | url | wipe
#
# The server runs from .pg/data in the repository (gitignored), as the
# `postgres` system user when we are root (PostgreSQL refuses to run as root),
# listening on 127.0.0.1 only, on a free port, with no unix socket (so it
# never collides with a system cluster). Running it again reuses a running
# server. A server that cannot start is an error (non-zero status) with the
# end of its log, never a silent skip: CI must not pass by skipping tests.
#
# Safe to `source` under `set -euo pipefail`: everything lives in functions
# with local variables, and the caller's shell options are left as they were.
# An AI2_KIT_TEST_PG_URL that is already set is respected (your own server).

_ai2kit_pg_die() {
    echo "postgres.sh: error: $*" >&2
    return 1
}

_ai2kit_pg_repo() {
    local here
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd) || return 1
    (cd "$here/.." && pwd)
}

# Print the directory holding pg_ctl/postgres/initdb, newest major version first.
_ai2kit_pg_bindir() {
    local d best=""
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ] && [ -x "$d/initdb" ] || continue
        if [ -z "$best" ] || [ "$(basename "$(dirname "$d")")" -gt "$(basename "$(dirname "$best")")" ] 2>/dev/null; then
            best=$d
        fi
    done
    if [ -z "$best" ] && command -v pg_ctl >/dev/null 2>&1; then
        # Not Debian's layout (e.g. a symlink in /usr/local/bin): follow it.
        best=$(dirname "$(readlink -f "$(command -v pg_ctl)")")
        [ -x "$best/postgres" ] && [ -x "$best/initdb" ] || best=""
    fi
    [ -n "$best" ] && echo "$best"
}

_ai2kit_pg_install() {
    local log
    if [ "$(id -u)" != 0 ]; then
        _ai2kit_pg_die "PostgreSQL is not installed and we are not root; install it (apt-get install postgresql) or set AI2_KIT_TEST_PG_URL"
        return 1
    fi
    command -v apt-get >/dev/null 2>&1 || {
        _ai2kit_pg_die "PostgreSQL is not installed and apt-get is missing; install PostgreSQL or set AI2_KIT_TEST_PG_URL"
        return 1
    }
    log=$(mktemp)
    echo "postgres.sh: installing PostgreSQL (apt-get)..." >&2
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        rm -f "$log"
        _ai2kit_pg_die "apt-get install postgresql failed"
        return 1
    fi
    rm -f "$log"
}

# Run a command as the server's owner.
_ai2kit_pg_as() {
    local user=$1
    shift
    if [ "$(id -un)" = "$user" ]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u "$user" -- "$@"
    else
        local q
        q=$(printf '%q ' "$@")
        su -s /bin/sh "$user" -c "$q"
    fi
}

_ai2kit_pg_port_busy() {
    # A successful connect means something listens there.
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Sets _AI2KIT_PG_* globals describing the layout (bin dir, owner, data dir).
_ai2kit_pg_layout() {
    local repo
    repo=$(_ai2kit_pg_repo) || return 1
    _AI2KIT_PG_BIN=$(_ai2kit_pg_bindir) || _AI2KIT_PG_BIN=""
    if [ "$(id -u)" = 0 ]; then
        _AI2KIT_PG_USER=postgres
    else
        _AI2KIT_PG_USER=$(id -un)
    fi
    _AI2KIT_PG_ROOT=$repo/.pg
    if [ "$(id -u)" = 0 ] && id "$_AI2KIT_PG_USER" >/dev/null 2>&1 \
        && ! _ai2kit_pg_as "$_AI2KIT_PG_USER" test -x "$repo"; then
        # The repository is not reachable by the postgres user (e.g. under
        # /root, mode 700): keep the data outside it, one per repository.
        _AI2KIT_PG_ROOT=${TMPDIR:-/tmp}/ai2-kit-pg-$(printf '%s' "$repo" | cksum | cut -d' ' -f1)
    fi
    _AI2KIT_PG_DATA=$_AI2KIT_PG_ROOT/data
    _AI2KIT_PG_LOG=$_AI2KIT_PG_ROOT/server.log
}

_ai2kit_pg_running_port() {
    # Line 1 of postmaster.pid is the server's pid, line 4 its port.
    local pid state
    [ -n "$_AI2KIT_PG_BIN" ] && [ -f "$_AI2KIT_PG_DATA/postmaster.pid" ] || return 1
    pid=$(head -n 1 "$_AI2KIT_PG_DATA/postmaster.pid" 2>/dev/null) || return 1
    state=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || state=""
    if [ "$state" = Z ] || [ "$state" = X ]; then
        # A killed server that nobody reaped (PID 1 of a container may not):
        # the server itself would take the zombie for a live owner of the lock
        # file and refuse to start.
        rm -f "$_AI2KIT_PG_DATA/postmaster.pid"
        return 1
    fi
    _ai2kit_pg_as "$_AI2KIT_PG_USER" "$_AI2KIT_PG_BIN/pg_ctl" status -D "$_AI2KIT_PG_DATA" >/dev/null 2>&1 || return 1
    sed -n 4p "$_AI2KIT_PG_DATA/postmaster.pid" 2>/dev/null
}

_ai2kit_pg_init() {
    local major
    major=$(basename "$(dirname "$_AI2KIT_PG_BIN")")
    if [ -f "$_AI2KIT_PG_DATA/PG_VERSION" ] && [ "$(cat "$_AI2KIT_PG_DATA/PG_VERSION")" != "$major" ]; then
        # Test data only: a cluster of another major version is recreated.
        rm -rf "$_AI2KIT_PG_DATA"
    fi
    mkdir -p "$_AI2KIT_PG_ROOT" || return 1
    if [ "$(id -u)" = 0 ]; then
        id "$_AI2KIT_PG_USER" >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql \
            --shell /bin/bash "$_AI2KIT_PG_USER" || return 1
        chown -R "$_AI2KIT_PG_USER:" "$_AI2KIT_PG_ROOT" || return 1
    fi
    [ -f "$_AI2KIT_PG_DATA/PG_VERSION" ] && return 0
    local log=$_AI2KIT_PG_ROOT/initdb.log
    # Trust on 127.0.0.1 only: a disposable test server, unreachable from
    # other hosts. C locale: byte-order collation, like the other stores.
    if ! _ai2kit_pg_as "$_AI2KIT_PG_USER" "$_AI2KIT_PG_BIN/initdb" -D "$_AI2KIT_PG_DATA" -U postgres \
        --auth=trust -E UTF8 --locale=C --no-sync >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        _ai2kit_pg_die "initdb failed (log: $log)"
        return 1
    fi
    {
        echo "# added by scripts/postgres.sh"
        echo "listen_addresses = '127.0.0.1'"
        echo "unix_socket_directories = ''"
        echo "max_connections = 200"
    } | _ai2kit_pg_as "$_AI2KIT_PG_USER" tee -a "$_AI2KIT_PG_DATA/postgresql.conf" >/dev/null
}

_ai2kit_pg_start() {
    local port tries=0
    _ai2kit_pg_layout || return 1
    if [ -z "$_AI2KIT_PG_BIN" ]; then
        _ai2kit_pg_install || return 1
        _AI2KIT_PG_BIN=$(_ai2kit_pg_bindir) || _AI2KIT_PG_BIN=""
        [ -n "$_AI2KIT_PG_BIN" ] || { _ai2kit_pg_die "PostgreSQL installed but no server binaries under /usr/lib/postgresql/*/bin"; return 1; }
    fi
    if ! port=$(_ai2kit_pg_running_port) || [ -z "$port" ]; then
        _ai2kit_pg_init || return 1
        # A port derived from the path (stable across runs), then the next free one.
        port=$((20000 + $(printf '%s' "$_AI2KIT_PG_ROOT" | cksum | cut -d' ' -f1) % 20000))
        local logstart
        logstart=1
        [ ! -f "$_AI2KIT_PG_LOG" ] || logstart=$(($(wc -c <"$_AI2KIT_PG_LOG") + 1))
        while :; do
            while _ai2kit_pg_port_busy "$port"; do port=$((port + 1)); done
            if _ai2kit_pg_as "$_AI2KIT_PG_USER" "$_AI2KIT_PG_BIN/pg_ctl" start -D "$_AI2KIT_PG_DATA" \
                -l "$_AI2KIT_PG_LOG" -w -t 60 -o "-p $port" >/dev/null 2>&1; then
                break
            fi
            tries=$((tries + 1))
            if [ "$tries" -ge 3 ] || ! tail -c +"$logstart" "$_AI2KIT_PG_LOG" 2>/dev/null | grep -qi "address already in use"; then
                tail -c +"$logstart" "$_AI2KIT_PG_LOG" 2>/dev/null | tail -n 20 >&2 || true
                _ai2kit_pg_die "the PostgreSQL server did not start (data $_AI2KIT_PG_DATA, log $_AI2KIT_PG_LOG)"
                return 1
            fi
            port=$((port + 1))  # lost a race for the port: try the next one
        done
    fi
    tries=0
    until "$_AI2KIT_PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$port" -d postgres -U postgres; do
        tries=$((tries + 1))
        if [ "$tries" -ge 120 ] || ! _ai2kit_pg_running_port >/dev/null; then
            _ai2kit_pg_die "the PostgreSQL server on port $port does not accept connections (log $_AI2KIT_PG_LOG)"
            return 1
        fi
        sleep 0.5
    done
    local psql=("$_AI2KIT_PG_BIN/psql" -X -q -h 127.0.0.1 -p "$port" -U postgres -v ON_ERROR_STOP=1)
    if [ -z "$("${psql[@]}" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'ai2kit_test'")" ]; then
        "${psql[@]}" -d postgres -c "CREATE DATABASE ai2kit_test" >/dev/null 2>&1 \
            || [ -n "$("${psql[@]}" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'ai2kit_test'")" ] \
            || { _ai2kit_pg_die "cannot create the database ai2kit_test on port $port"; return 1; }
    fi
    export AI2_KIT_TEST_PG_URL="postgresql://postgres@127.0.0.1:$port/ai2kit_test"
}

_ai2kit_pg_stop() {
    _ai2kit_pg_layout || return 1
    [ -n "$_AI2KIT_PG_BIN" ] && [ -f "$_AI2KIT_PG_DATA/postmaster.pid" ] || return 0
    _ai2kit_pg_as "$_AI2KIT_PG_USER" "$_AI2KIT_PG_BIN/pg_ctl" stop -D "$_AI2KIT_PG_DATA" -m fast -w >/dev/null 2>&1 \
        || ! _ai2kit_pg_running_port >/dev/null \
        || _ai2kit_pg_die "cannot stop the server in $_AI2KIT_PG_DATA"
}

# Public names for an interactive shell that sourced this file.
ai2kit_pg_start() { _ai2kit_pg_start; }
ai2kit_pg_stop() { _ai2kit_pg_stop; }

_ai2kit_pg_main() {
    case "${1:-start}" in
        start)
            _ai2kit_pg_start || return 1
            echo "$AI2_KIT_TEST_PG_URL"
            ;;
        stop) _ai2kit_pg_stop ;;
        status)
            _ai2kit_pg_layout || return 1
            local port
            if port=$(_ai2kit_pg_running_port) && [ -n "$port" ]; then
                echo "running on 127.0.0.1:$port (data $_AI2KIT_PG_DATA)"
            else
                echo "not running (data $_AI2KIT_PG_DATA)"
                return 3
            fi
            ;;
        url)
            _ai2kit_pg_layout || return 1
            local port
            port=$(_ai2kit_pg_running_port) && [ -n "$port" ] || { _ai2kit_pg_die "not running"; return 1; }
            echo "postgresql://postgres@127.0.0.1:$port/ai2kit_test"
            ;;
        wipe)
            _ai2kit_pg_stop || return 1
            rm -rf "$_AI2KIT_PG_ROOT"
            ;;
        *)
            echo "usage: $0 [start|stop|status|url|wipe]" >&2
            return 2
            ;;
    esac
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
    # Sourced: the positional parameters are the caller's (pytest's), not ours.
    if [ -z "${AI2_KIT_TEST_PG_URL:-}" ]; then
        _ai2kit_pg_start || return 1
    fi
else
    set -euo pipefail
    _ai2kit_pg_main "$@"
fi
