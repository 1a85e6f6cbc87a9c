#!/bin/bash
# Heap profile of `serin serve` with N idle agents attached (BENCHMARKS.md, "Memory per agent").
#
#   tests/bench/heap-profile.sh 1500 target/release/serin /tmp/serin-heap
#
# Runs the connect scenario with the coordinator under heaptrack (`apt-get install -y heaptrack`)
# and SIGKILLs the coordinator 5 s after its open files reach N, so heaptrack's "leaked"
# allocations are exactly those live while every agent is attached. Prints the top allocation
# sites; the profile stays in OUT.zst for `heaptrack_print` (delete it when done: ~0.3 MB per
# 1,000 agents). Needs `target/release/serin-bench` built, and a `serin` built with glibc's
# malloc, which heaptrack interposes (the default binary uses mimalloc):
#   cargo build --release -p serin-cli --features system-allocator --target-dir target/sysalloc
set -euo pipefail
N=${1:?agents}
SERIN=$(realpath "${2:?path to the serin binary}")
OUT=${3:?output prefix, e.g. /tmp/serin-heap}
WRAP=$(mktemp)
trap 'rm -f "$WRAP"' EXIT
printf '#!/bin/sh\nexec heaptrack -o %q %q "$@"\n' "$OUT" "$SERIN" > "$WRAP"
chmod +x "$WRAP"
target/release/serin-bench connect --agents "$N" --heartbeat-ms 10000 \
  --unreachable-after-ms 30000 --timeout-s 240 --serin "$WRAP" > "$OUT.bench.log" 2>&1 &
BENCH=$!
for _ in $(seq 1 240); do
  sleep 1
  PID=""
  # heaptrack's own script carries the same command line: pick the process running serin.
  for p in $(pgrep -f "serve --config /tmp/serin-bench" || true); do
    [ "$(readlink "/proc/$p/exe")" = "$SERIN" ] && PID=$p
  done
  [ -n "$PID" ] || continue
  if [ "$(ls "/proc/$PID/fd" | wc -l)" -ge "$N" ]; then
    sleep 5
    echo "coordinator $PID: $(ls "/proc/$PID/fd" | wc -l) open files, $(grep VmRSS "/proc/$PID/status")"
    kill -9 "$PID"
    break
  fi
done
wait "$BENCH" || true
sleep 3
heaptrack_print -f "$OUT.zst" --print-leaks 1 -n 40 --print-peaks 0 --print-allocators 0 \
  --print-temporary 0 | sed -n '/MEMORY LEAKS/,$p'
