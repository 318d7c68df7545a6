#!/usr/bin/env bash
# Runs the open_read_check fuzz target on stable Rust (no sanitizer),
# seeded with valid images of several geometries made by the library.
# Usage: fuzz/run.sh [SECONDS]   (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
corpus=fuzz/corpus/open_read_check
mkdir -p "$corpus"
cargo run -q -p oxqcow-testkit --bin oxqcow-fuzz-seeds -- "$corpus"
cd fuzz
cargo fuzz run -s none open_read_check "corpus/open_read_check" -- \
    -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 -timeout=30
