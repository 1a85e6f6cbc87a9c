#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 30; CI runs `fuzz/run.sh 20`) from the committed seeds plus
# the local corpus (fuzz/corpus/, not committed). Exits non-zero on the first crash; the input
# that crashed is in fuzz/artifacts/<target>/.
#
#   fuzz/run.sh 20         # the CI smoke run: 20 s per target
#   fuzz/run.sh 3600       # a long run: an hour per target
#   fuzz/run.sh 600 manifest
#
# Needs cargo-fuzz (installed here when missing) and RUSTC_BOOTSTRAP=1, because cargo-fuzz uses
# -Zsanitizer and the project builds on the stable toolchain.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-30}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(manifest wire_to_domain peer_identity agent_state)
fi
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
mkdir -p artifacts
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  log="artifacts/$t.log"
  echo "fuzz: $t for ${seconds}s"
  if ! cargo fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz: $t FAILED; the crashing input is under fuzz/artifacts/$t/, the log in fuzz/$log" >&2
    exit 1
  fi
  grep -E '^Done|stat::number_of_executed_units|stat::peak_rss_mb' "$log" || true
done
