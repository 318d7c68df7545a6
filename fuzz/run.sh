#!/usr/bin/env bash
# Runs a fuzz target on stable Rust (no sanitizer),
# seeded with valid images of several geometries made by the library, or
# for the NBD targets with the client byte streams in fuzz/seeds/TARGET.
# Usage: fuzz/run.sh [SECONDS] [TARGET]   (default 60 s, open_read_check;
# the others are open_write_check, open_repair_check, open_any_check, open_secret_check, nbd_session,
# nbd_tls_session, nbd_requests and nbd_client)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
target="${2:-open_read_check}"
corpus="fuzz/corpus/$target"
mkdir -p "$corpus"
if [[ "$target" == nbd_tls_session ]]; then
    # The session seeds with STARTTLS after the client flags.
    for f in fuzz/seeds/nbd_session/*; do
        { head -c 4 "$f"; printf 'IHAVEOPT\0\0\0\5\0\0\0\0'; tail -c +5 "$f"; } >"$corpus/tls-$(basename "$f")"
    done
elif [[ "$target" == nbd_* || "$target" == open_secret_check ]]; then
    cp fuzz/seeds/"$target"/* "$corpus"/
else
    cargo run -q -p oxqcow-testkit --bin oxqcow-fuzz-seeds -- "$corpus"
    if [[ "$target" == open_any_check ]]; then
        cp fuzz/seeds/open_any_check/* "$corpus"/
    fi
fi
# A LUKS file holds eight key slots' material before its payload: the
# encrypted seeds reach 1.1 MB.
max_len=65536
if [[ "$target" == open_secret_check ]]; then
    max_len=1200000
fi
cd fuzz
cargo fuzz run -s none "$target" "corpus/$target" -- \
    -max_total_time="$secs" -max_len="$max_len" -rss_limit_mb=2048 -timeout=30
