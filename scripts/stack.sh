#!/usr/bin/env bash
# The local UniDesk stack on one machine.
#   scripts/stack.sh up     install what is missing, start the hub nats-server,
#                           PostgreSQL, Docker, Garage (S3), the main server and its
#                           own compute node (leaf nats-server + agent), then run the
#                           main job: a project user uploads an input file and submits
#                           a task; it runs in Docker, its log and its output are shown
#   scripts/stack.sh down   stop everything started by `up`
# State (data, logs, the admin token) lives in .unidesk/ (UD_STATE_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh

STATE="${UD_STATE_DIR:-$PWD/.unidesk}"
NATS_PORT="${UD_NATS_PORT:-4222}"
LEAF_PORT="${UD_LEAF_PORT:-7422}"
MONITOR_PORT="${UD_MONITOR_PORT:-8222}"
EDGE_PORT="${UD_EDGE_PORT:-4223}"
PG_PORT="${UD_PG_PORT:-5433}"
S3_PORT="${UD_S3_PORT:-3900}"
API="${UD_LISTEN:-127.0.0.1:8080}"
BIN="$PWD/target/release/unidesk"
EDGE="$PWD/target/release/unidesk-edge"

wait_for_line() { # file pattern seconds
  local i=0
  until grep -q "$2" "$1" 2>/dev/null; do
    i=$((i + 1)); [ "$i" -gt $(($3 * 10)) ] && { echo "timed out waiting for '$2' in $1" >&2; tail -20 "$1" >&2; return 1; }
    sleep 0.1
  done
}

secret() { [ -s "$1" ] || python3 -c 'import secrets; print(secrets.token_hex(24))' > "$1"; cat "$1"; }

up() {
  ud_install_deps
  ud_install_docker
  mkdir -p "$STATE/nats" "$STATE/leaf"
  cargo build --release -p unidesk -p ud-edge-agent
  local platform_pw system_pw agent_pw
  platform_pw="$(secret "$STATE/platform.password")"
  system_pw="$(secret "$STATE/system.password")"
  agent_pw="$(secret "$STATE/agent.password")"

  # The hub: JetStream domain "hub", every write synced, leaf-node port for compute nodes.
  if ! [ -f "$STATE/nats/hub.pid" ] || ! kill -0 "$(cat "$STATE/nats/hub.pid")" 2>/dev/null; then
    sed "s/listen: 127.0.0.1:4222/listen: 127.0.0.1:$NATS_PORT/; s/listen: 0.0.0.0:7422/listen: 127.0.0.1:$LEAF_PORT/; s/http: 127.0.0.1:8222/http: 127.0.0.1:$MONITOR_PORT/" \
      infra/nats/hub.conf > "$STATE/nats/hub.conf"
    [ -s "$STATE/nats/accounts.conf" ] || UD_PLATFORM_PASSWORD="$platform_pw" UD_HUB_SYSTEM_PASSWORD="$system_pw" \
      "$BIN" admin hub-accounts > "$STATE/nats/accounts.conf"
    : > "$STATE/nats.log"
    (cd "$STATE/nats" && exec "$UD_NATS_SERVER" -c hub.conf --store_dir "$STATE/nats/js") >>"$STATE/nats.log" 2>&1 &
    wait_for_line "$STATE/nats.log" "Server is ready" 30
  fi
  if ! [ -f "$STATE/pg/data/postmaster.pid" ]; then
    ud_start_pg "$STATE/pg" "$PG_PORT" on
  fi
  ud_start_dockerd "$STATE/docker"
  ud_base_image >/dev/null
  ud_install_garage
  ud_start_garage "$STATE/garage" "$S3_PORT"
  set -a
  source "$STATE/garage/s3.env"
  set +a

  export UD_NATS_URL="nats://platform:$platform_pw@127.0.0.1:$NATS_PORT"
  export UD_DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  export UD_API_URL="http://$API"
  # The key project secrets are encrypted with (kept apart from backups).
  [ -s "$STATE/secrets.key" ] || "$BIN" admin secret-key --out "$STATE/secrets.key" >/dev/null
  if ! [ -f "$STATE/server.pid" ] || ! kill -0 "$(cat "$STATE/server.pid")" 2>/dev/null; then
    : > "$STATE/server.out"
    UD_SECRETS_KEY_FILE="$STATE/secrets.key" UD_LISTEN="$API" UD_HUB_ACCOUNTS_FILE="$STATE/nats/accounts.conf" UD_HUB_PID_FILE="$STATE/nats/hub.pid" \
      UD_HUB_SYSTEM_PASSWORD="$system_pw" "$BIN" serve >"$STATE/server.out" 2>"$STATE/server.log" &
    echo $! > "$STATE/server.pid"
    wait_for_line "$STATE/server.out" "listening" 60
  fi
  if ! [ -s "$STATE/admin.token" ]; then
    "$BIN" admin issue-token --name admin --admin > "$STATE/admin.token"
  fi
  export UD_TOKEN="$(cat "$STATE/admin.token")"

  # The main server's own compute node, joined exactly like a remote one:
  # enrolled, its own leaf nats-server, its agent on the local Docker engine;
  # it holds back what the services here need (UD_MAIN_RESERVE_CPUS/_MEMORY_MB).
  if ! [ -s "$STATE/node.token" ]; then
    "$BIN" node enroll --name main-server --label role=main > "$STATE/node.token"
  fi
  if ! [ -f "$STATE/leaf.pid" ] || ! kill -0 "$(cat "$STATE/leaf.pid")" 2>/dev/null; then
    UD_NODE_TOKEN="$(cat "$STATE/node.token")" "$EDGE" leaf-config --hub "nats-leaf://127.0.0.1:$LEAF_PORT" --allow-plain-link \
      --store-dir "$STATE/leaf/js" --port "$EDGE_PORT" --agent-password "$agent_pw" > "$STATE/leaf/leaf.conf"
    : > "$STATE/leaf.log"
    "$UD_NATS_SERVER" -c "$STATE/leaf/leaf.conf" >>"$STATE/leaf.log" 2>&1 &
    echo $! > "$STATE/leaf.pid"
    wait_for_line "$STATE/leaf.log" "Server is ready" 30
  fi
  if ! [ -f "$STATE/agent.pid" ] || ! kill -0 "$(cat "$STATE/agent.pid")" 2>/dev/null; then
    UD_NODE_TOKEN="$(cat "$STATE/node.token")" UD_EDGE_LEAF_URL="nats://agent:$agent_pw@127.0.0.1:$EDGE_PORT" \
      UD_EDGE_WORK_DIR="$STATE/edge" UD_EDGE_RESERVE_CPUS="${UD_MAIN_RESERVE_CPUS:-0.5}" \
      UD_EDGE_RESERVE_MEMORY_MB="${UD_MAIN_RESERVE_MEMORY_MB:-2048}" "$EDGE" run --name main-server --label role=main > "$STATE/agent.log" 2>&1 &
    echo $! > "$STATE/agent.pid"
  fi
  cat "$STATE/server.out"
  echo "admin token: $STATE/admin.token"

  # The main job: a project user submits a task pinned to commits of a code and
  # an environment repository; the node fetches both, builds the environment
  # and runs the code in it.
  local demo="$STATE/demo" code_commit env_commit user id
  if ! [ -d "$demo/env/.git" ]; then
    mkdir -p "$demo/env" "$demo/code"
    printf 'FROM unidesk/busybox:base\nRUN echo "environment built from its repository" > /etc/unidesk-env\n' > "$demo/env/Dockerfile"
    cat > "$demo/code/main.sh" <<'EOF'
echo "hello from UniDesk"
cat /etc/unidesk-env
sum=0
for n in $(cat numbers.txt); do sum=$((sum + n)); done
echo "sum of the input numbers: $sum" | tee result.txt
EOF
    for r in env code; do
      git -C "$demo/$r" -c init.defaultBranch=main init -q
      git -C "$demo/$r" add -A
      git -C "$demo/$r" -c user.name=demo -c user.email=demo@localhost commit -q -m "demo"
    done
  fi
  if [ "${UD_STACK_DEMO:-1}" = 0 ]; then
    echo "UniDesk is up: API and web UI $UD_API_URL (demo job skipped: UD_STACK_DEMO=0)"
    return 0
  fi
  code_commit="$(git -C "$demo/code" rev-parse HEAD)"
  env_commit="$(git -C "$demo/env" rev-parse HEAD)"
  user="$("$BIN" token issue --name "demo-$(date +%s)" --project demo)"
  printf '6\n7\n29\n' > "$demo/numbers.txt"
  UD_TOKEN="$user" "$BIN" file put --quiet "$demo/numbers.txt" demo:data/numbers.txt
  id="$(UD_TOKEN="$user" "$BIN" submit --project demo --wait \
        --code-repo "file://$demo/code" --code-commit "$code_commit" \
        --env-repo "file://$demo/env" --env-commit "$env_commit" --dockerfile Dockerfile \
        --input data/numbers.txt:numbers.txt --output result.txt \
        --cpus 0.5 --memory-mb 128 -- sh main.sh)"
  echo "submitted task $id; its log:"
  UD_TOKEN="$user" timeout 120 "$BIN" task logs -f "$id"
  UD_TOKEN="$user" "$BIN" show "$id"
  echo "its output, fetched from the object store:"
  rm -rf "$demo/outputs"
  UD_TOKEN="$user" "$BIN" task outputs "$id" --download "$demo/outputs"
  cat "$demo/outputs/result.txt"
  echo
  echo "UniDesk is up: API and web UI $UD_API_URL, NATS 127.0.0.1:$NATS_PORT (leaf nodes on $LEAF_PORT), PostgreSQL $UD_DATABASE_URL, S3 $UD_S3_ENDPOINT"
  echo "stop it with: scripts/stack.sh down"
}

down() {
  for p in agent leaf server; do
    if [ -f "$STATE/$p.pid" ]; then kill "$(cat "$STATE/$p.pid")" 2>/dev/null || true; rm -f "$STATE/$p.pid"; fi
  done
  if [ -f "$STATE/nats/hub.pid" ]; then kill "$(cat "$STATE/nats/hub.pid")" 2>/dev/null || true; fi
  ud_stop_dockerd "$STATE/docker"
  ud_stop_garage "$STATE/garage"
  ud_find_pg_bin && ud_stop_pg "$STATE/pg"
  echo "stopped"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
