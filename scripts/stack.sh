#!/usr/bin/env bash
# The local UniDesk stack on one machine.
#   scripts/stack.sh up     install what is missing, start nats-server, PostgreSQL
#                           and the main server, then run the main job (a task
#                           submitted by a project user and followed to the read model)
#   scripts/stack.sh down   stop everything started by `up`
# State (data, logs, the admin token) lives in .unidesk/ (UD_STATE_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh

STATE="${UD_STATE_DIR:-$PWD/.unidesk}"
NATS_PORT="${UD_NATS_PORT:-4222}"
PG_PORT="${UD_PG_PORT:-5433}"
API="${UD_LISTEN:-127.0.0.1:8080}"
BIN="$PWD/target/release/unidesk"

wait_for_line() { # file pattern seconds
  local i=0
  until grep -q "$2" "$1" 2>/dev/null; do
    i=$((i + 1)); [ "$i" -gt $(($3 * 10)) ] && { echo "timed out waiting for '$2' in $1" >&2; tail -20 "$1" >&2; return 1; }
    sleep 0.1
  done
}

up() {
  ud_install_deps
  mkdir -p "$STATE"
  cargo build --release -p unidesk
  if ! [ -f "$STATE/nats.pid" ] || ! kill -0 "$(cat "$STATE/nats.pid")" 2>/dev/null; then
    : > "$STATE/nats.log"
    "$UD_NATS_SERVER" -c infra/nats/hub.conf --store_dir "$STATE/nats" -p "$NATS_PORT" >>"$STATE/nats.log" 2>&1 &
    echo $! > "$STATE/nats.pid"
    wait_for_line "$STATE/nats.log" "Server is ready" 30
  fi
  if ! [ -f "$STATE/pg/data/postmaster.pid" ]; then
    ud_start_pg "$STATE/pg" "$PG_PORT" on
  fi
  export UD_NATS_URL="nats://127.0.0.1:$NATS_PORT"
  export UD_DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  export UD_API_URL="http://$API"
  if ! [ -f "$STATE/server.pid" ] || ! kill -0 "$(cat "$STATE/server.pid")" 2>/dev/null; then
    : > "$STATE/server.out"
    UD_LISTEN="$API" "$BIN" serve >"$STATE/server.out" 2>"$STATE/server.log" &
    echo $! > "$STATE/server.pid"
    wait_for_line "$STATE/server.out" "listening" 60
  fi
  if ! [ -s "$STATE/admin.token" ]; then
    "$BIN" admin issue-token --name admin --admin > "$STATE/admin.token"
  fi
  cat "$STATE/server.out"
  echo "admin token: $STATE/admin.token"

  # The main job: a project user submits a task and reads it back.
  local user id
  user="$(UD_TOKEN="$(cat "$STATE/admin.token")" "$BIN" token issue --name demo --project demo)"
  id="$(UD_TOKEN="$user" "$BIN" submit --project demo --wait \
        --code-repo https://git.example.org/demo/code.git \
        --code-commit 0123456789abcdef0123456789abcdef01234567 \
        --cpus 1 --memory-mb 512 -- python -c 'print(42)')"
  echo "submitted task $id"
  UD_TOKEN="$user" "$BIN" show "$id"
  UD_TOKEN="$user" "$BIN" history "$id"
  echo
  echo "UniDesk is up: API $UD_API_URL, NATS $UD_NATS_URL, PostgreSQL $UD_DATABASE_URL"
  echo "stop it with: scripts/stack.sh down"
}

down() {
  for p in server nats; do
    if [ -f "$STATE/$p.pid" ]; then kill "$(cat "$STATE/$p.pid")" 2>/dev/null || true; rm -f "$STATE/$p.pid"; fi
  done
  ud_find_pg_bin && ud_stop_pg "$STATE/pg"
  echo "stopped"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
