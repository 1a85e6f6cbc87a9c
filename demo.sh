#!/usr/bin/env bash
# The serin demo: builds every binary, then runs a coordinator and eight agents on loopback and
# rolls releases out through a canary and waves, including a failing one that is rolled back.
# Honours CARGO_TARGET_DIR. Set SERIN_DEMO_KEEP=1 to keep the demo's directory afterwards.
set -euo pipefail
if [[ -n "${CARGO_TARGET_DIR:-}" && "${CARGO_TARGET_DIR}" != /* ]]; then
  CARGO_TARGET_DIR="$PWD/$CARGO_TARGET_DIR"
  export CARGO_TARGET_DIR
fi
cd "$(dirname "${BASH_SOURCE[0]}")"
cargo build --workspace --bins
exec "${CARGO_TARGET_DIR:-$PWD/target}/debug/serin-demo" "$@"
