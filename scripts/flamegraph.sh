#!/usr/bin/env bash
# Where the CPU goes during the whole lifecycle at full speed: runs
# `scripts/bench.sh lifecycle --sync default` (built with frame pointers and
# line tables), samples every process of the machine with perf while the
# lifecycle phase runs, and draws a flame graph with one tower per process
# (the benchmark process holds the main server and the simulated agents).
# Usage: scripts/flamegraph.sh [lifecycle flags]   e.g. --nodes 5 --tasks 20000
# Writes target/flamegraph/lifecycle.svg and .folded; UD_FLAME_SECONDS (15).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
command -v perf >/dev/null || ud_apt_install linux-perf
command -v inferno-flamegraph >/dev/null || cargo install --locked inferno
out=target/flamegraph
mkdir -p "$out"
log="$out/lifecycle.log"
UD_BENCH_PROFILE=profiling RUSTFLAGS="-C force-frame-pointers=yes" \
  scripts/bench.sh lifecycle --sync default "$@" > "$log" 2>&1 &
bench=$!
# The lifecycle phase starts right after the steady-rate phase prints this
# (tail ends with the benchmark, so a benchmark that fails ends the wait).
if ! grep -q -m1 "dispatches seen" < <(tail -F --pid="$bench" "$log" 2>/dev/null); then
  cat "$log"; echo "the benchmark ended before its lifecycle phase" >&2; exit 1
fi
perf record -a -g -F 299 -o "$out/perf.data" -- sleep "${UD_FLAME_SECONDS:-15}"
wait "$bench"
cat "$log"
perf script -i "$out/perf.data" 2>/dev/null | inferno-collapse-perf > "$out/lifecycle.folded"
inferno-flamegraph --title "UniDesk lifecycle, every process" < "$out/lifecycle.folded" > "$out/lifecycle.svg"
# The share of samples per thread name (nats-server, postgres, the benchmark's
# tokio-rt-worker), the first answer the graph gives.
awk '{ c = $0; sub(/.* /, "", c); k = $0; sub(/ [0-9]+$/, "", k); sub(/;.*/, "", k); s[k] += c; t += c }
  END { for (k in s) printf "%6.1f %%  %s\n", 100 * s[k] / t, k }' "$out/lifecycle.folded" | sort -rn | head -12
echo "flame graph: $out/lifecycle.svg"
