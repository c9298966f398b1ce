#!/usr/bin/env bash
# Runs every test against real servers: installs what is missing, starts a
# throw-away PostgreSQL cluster (tests create one database each and start
# their own nats-server), runs the Rust suites and the foreign-client checks.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
ud_install_deps

ud_install_docker
ud_install_garage   # tests start their own Garage servers (testkit)

work="$(mktemp -d /tmp/ud-test.XXXXXX)"
pg_port="$(ud_free_port)"
cleanup() { ud_stop_dockerd "$work/d"; ud_stop_pg "$work/pg"; rm -rf "$work"; }
trap cleanup EXIT
ud_start_pg "$work/pg" "$pg_port" off
export UD_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
# A Docker engine (the running one, or a private one) with the base image tasks run in.
ud_start_dockerd "$work/d"
ud_base_image >/dev/null

cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast -- --test-threads=4
python3 -m unittest discover -s tests/foreign -v
python3 -m unittest discover -s clients/python/tests -v
# The fault suite's short subset: each fault once, at random times from a
# fixed seed, on the whole stack as separate processes (docs/faults.md).
target/debug/ud-bench faults --runs 10 --seed "${UD_FAULTS_SEED:-1}"
# The web UI in headless Chromium against the whole local stack (release build).
tests/browser/run.sh
