#!/usr/bin/env bash
# End-to-end tests of the web UI and the Python client: starts the real local
# stack (hub nats-server, PostgreSQL, Docker, Garage, the main server and its
# own compute node) on free ports in a throw-away state directory, then drives
# headless Chromium through it and runs clients/python/tests/stack_test.py.
# Screenshots of every page land in target/browser-artifacts/.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/deps.sh
ud_install_browser

state="$(mktemp -d /tmp/ud-browser.XXXXXX)"
export UD_STATE_DIR="$state"
export UD_NATS_PORT="$(ud_free_port)" UD_LEAF_PORT="$(ud_free_port)" UD_MONITOR_PORT="$(ud_free_port)"
export UD_EDGE_PORT="$(ud_free_port)" UD_PG_PORT="$(ud_free_port)" UD_S3_PORT="$(ud_free_port)"
export UD_LISTEN="127.0.0.1:$(ud_free_port)"
# Seconds instead of the production 15 s / 90 s, so "offline" shows within the test.
export UD_EDGE_HEARTBEAT_SECONDS=1 UD_HEARTBEAT_TIMEOUT_SECONDS=5 UD_CANCEL_GRACE_SECONDS=2
export UD_STACK_DEMO=0
# Sessions at hosts of their own: Chromium resolves *.localhost to loopback.
export UD_SESSION_ORIGIN="http://{id}.s.localhost:${UD_LISTEN##*:}"
cleanup() { scripts/stack.sh down >/dev/null 2>&1 || true; rm -rf "$state"; }
trap cleanup EXIT
scripts/stack.sh up >"$state/stack.out" 2>&1 || { cat "$state/stack.out" >&2; exit 1; }

export UD_API_URL="http://$UD_LISTEN"
# An environment repository whose image has the session program of the tests.
env_repo="$state/sessiond-env"
mkdir -p "$env_repo"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release --target x86_64-unknown-linux-gnu \
  --manifest-path testkit/sessiond/Cargo.toml --target-dir target/sessiond
cp target/sessiond/x86_64-unknown-linux-gnu/release/ud-sessiond "$env_repo/"
printf 'FROM unidesk/busybox:base\nCOPY ud-sessiond /bin/ud-sessiond\n' > "$env_repo/Dockerfile"
git -C "$env_repo" -c init.defaultBranch=main init -q
git -C "$env_repo" add -A
git -C "$env_repo" -c user.name=test -c user.email=test@localhost commit -q -m "session program"
export UD_SESSIOND_ENV="$env_repo"
export UD_ADMIN_TOKEN="$(cat "$state/admin.token")"
export UD_ARTIFACTS="${UD_ARTIFACTS:-$PWD/target/browser-artifacts}"
mkdir -p "$UD_ARTIFACTS"
(cd tests/browser && npm ci --no-audit --no-fund --silent)
status=0
# The Python client first: the browser tests end by stopping the node's agent.
export UD_NATS_PORT
python3 -m unittest -v clients/python/tests/stack_test.py || status=$?
node --test --test-concurrency=1 tests/browser/ui.test.mjs || status=$?
if [ "$status" != 0 ]; then
  echo "--- server log (tail)" >&2; tail -40 "$state/server.log" >&2 || true
  echo "--- agent log (tail)" >&2; tail -40 "$state/agent.log" >&2 || true
fi
exit "$status"
