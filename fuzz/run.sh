#!/usr/bin/env bash
# Runs a fuzz target on stable Rust (no sanitizer),
# seeded with valid images of several geometries made by the library.
# Usage: fuzz/run.sh [SECONDS] [TARGET]   (default 60 s, open_read_check;
# the other target is open_write_check)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
target="${2:-open_read_check}"
corpus="fuzz/corpus/$target"
mkdir -p "$corpus"
cargo run -q -p oxqcow-testkit --bin oxqcow-fuzz-seeds -- "$corpus"
cd fuzz
cargo fuzz run -s none "$target" "corpus/$target" -- \
    -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 -timeout=30
