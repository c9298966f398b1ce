#!/usr/bin/env bash
# Runs a benchmark from bench/ on real servers: a throw-away PostgreSQL
# cluster that syncs to disk like production, and nats-servers the benchmark
# starts itself. Usage: scripts/bench.sh backbone [flags]   (see ud-bench --help)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
ud_install_deps
work="$(mktemp -d /tmp/ud-bench.XXXXXX)"
pg_port="$(ud_free_port)"
trap 'ud_stop_dockerd "$work/d"; ud_stop_pg "$work/pg"; rm -rf "$work"' EXIT
ud_start_pg "$work/pg" "$pg_port" on
ud_install_docker
ud_start_dockerd "$work/d"
ud_base_image >/dev/null
ud_install_garage
export UD_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
if [ "${1:-}" = lifecycle ]; then
  # The peer baseline measured in the same run: Celery, RabbitMQ, PostgreSQL results.
  ud_install_celery_baseline
  mq_port="$(ud_free_port)"
  trap 'ud_stop_rabbitmq "$work/mq"; ud_stop_dockerd "$work/d"; ud_stop_pg "$work/pg"; rm -rf "$work"' EXIT
  ud_start_rabbitmq "$work/mq" "$mq_port"
  "$PG_BIN/psql" -q -h 127.0.0.1 -p "$pg_port" -U postgres -c "CREATE DATABASE celery_baseline" >/dev/null
  export UD_BENCH_CELERY_BROKER="amqp://guest:guest@127.0.0.1:$mq_port//"
  export UD_BENCH_CELERY_RESULTS="postgresql://postgres@127.0.0.1:$pg_port/celery_baseline"
fi
# UD_BENCH_PROFILE: another cargo profile (scripts/flamegraph.sh: profiling).
profile="${UD_BENCH_PROFILE:-release}"
cargo build --profile "$profile" -p ud-bench -p unidesk -p ud-edge-agent
"target/$profile/ud-bench" "${@:-backbone}"
