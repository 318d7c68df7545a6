#!/usr/bin/env bash
# Side-by-side benchmark of oxqcow and qemu-img on the same files.
#
# Every case runs both tools on identical inputs, alternating, REPEAT times,
# and keeps each tool's best wall time. It prints one line per case with both
# times, the ratio oxqcow/qemu-img (below 1.0 means oxqcow is faster) and
# oxqcow's peak RSS. Page cache is warm for both tools alike.
#
#   scripts/bench.sh                 # 1 GiB data set
#   BENCH_SIZE_MB=256 scripts/bench.sh
#   BENCH_ONLY='compress|compressed' scripts/bench.sh   # only the cases whose name matches
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MB=${BENCH_SIZE_MB:-1024}
REPEAT=${BENCH_REPEAT:-3}
ONLY=${BENCH_ONLY:-}
WORK=${BENCH_DIR:-$(mktemp -d /tmp/oxqcow-bench.XXXXXX)}
QEMU_IMG=${QEMU_IMG:-qemu-img}
command -v "$QEMU_IMG" >/dev/null || { echo "bench: $QEMU_IMG not found (apt-get install qemu-utils)" >&2; exit 1; }

cargo build --release -q --bin oxqcow
OX=${CARGO_TARGET_DIR:-$PWD/target}/release/oxqcow
trap 'rm -rf "$WORK"' EXIT

# A mixed data set: random data, text, zero-filled runs and holes, in 1 MiB pieces.
python3 - "$WORK/src.raw" "$SIZE_MB" <<'PY'
import os, random, sys
path, size_mb = sys.argv[1], int(sys.argv[2])
rng = random.Random(42)
words = b"qcow2 cluster refcount table snapshot backing image guest host offset ".split()
text = b" ".join(rng.choice(words) for _ in range(300000))[: 1 << 20]
with open(path, "wb") as f:
    f.truncate(size_mb << 20)
    for i in range(size_mb):
        kind = rng.random()
        f.seek(i << 20)
        if kind < 0.35:
            f.write(os.urandom(1 << 20))
        elif kind < 0.65:
            f.write(text)
        elif kind < 0.80:
            f.write(bytes(1 << 20))   # explicit zeros: must become holes
        # else: a hole
PY

best() { sort -n | head -n 1; }
# run LABEL CMD... : wall seconds and peak RSS (KiB) of one run
run() {
    /usr/bin/time -f "%e %M" -o "$WORK/time" "$@" >"$WORK/out" 2>"$WORK/err" || {
        echo "bench: command failed: $*" >&2; cat "$WORK/err" >&2; exit 1; }
    cat "$WORK/time"
}

results=()
peak_rss=0
# case NAME SETUP-FN QEMU-CMD OX-CMD (commands as strings; SETUP runs before each run)
bench_case() {
    local name=$1 setup=$2 qcmd=$3 ocmd=$4 q=() o=() r case_rss=0
    last_ran=0
    if [[ -n $ONLY && ! $name =~ $ONLY ]]; then return 0; fi
    last_ran=1
    for _ in $(seq "$REPEAT"); do
        $setup; r=$(run bash -c "$qcmd"); q+=("${r% *}")
        $setup; r=$(run bash -c "$ocmd"); o+=("${r% *}")
        local rss=${r#* }
        if (( rss > case_rss )); then case_rss=$rss; fi
    done
    if (( case_rss > peak_rss )); then peak_rss=$case_rss; fi
    local qt ot
    qt=$(printf '%s\n' "${q[@]}" | best)
    ot=$(printf '%s\n' "${o[@]}" | best)
    results+=("$(printf '%-34s qemu-img %8.3fs  oxqcow %8.3fs  ratio %5.2f  oxqcow-rss %6d KiB' \
        "$name" "$qt" "$ot" "$(python3 -c "print($ot/max($qt,1e-3))")" "$case_rss")")
}

nothing() { :; }
clean_out() { rm -f "$WORK"/out.qcow2 "$WORK"/out.raw; }
fresh_write_image() { rm -f "$WORK/w.qcow2"; "$QEMU_IMG" create -q -f qcow2 "$WORK/w.qcow2" "${SIZE_MB}M"; }

"$QEMU_IMG" convert -f raw -O qcow2 "$WORK/src.raw" "$WORK/src.qcow2"

bench_case "convert raw->qcow2" clean_out \
    "$QEMU_IMG convert -f raw -O qcow2 $WORK/src.raw $WORK/out.qcow2" \
    "$OX convert -f raw -O qcow2 $WORK/src.raw $WORK/out.qcow2"
bench_case "convert qcow2->raw" clean_out \
    "$QEMU_IMG convert -f qcow2 -O raw $WORK/src.qcow2 $WORK/out.raw" \
    "$OX convert -f qcow2 -O raw $WORK/src.qcow2 $WORK/out.raw"

# Compressed output (-c), deflate and zstd: oxqcow compresses on every core
# (-m defaults to the number of cores), qemu-img on one. The last output of
# each tool is kept and checked with qemu-img, so the figures are for
# images QEMU reads.
verify_compressed() {
    (( last_ran )) || return 0
    "$QEMU_IMG" check -q "$WORK/out.qcow2" && "$QEMU_IMG" compare -q "$WORK/src.raw" "$WORK/out.qcow2" || {
        echo "bench: oxqcow's compressed image does not pass qemu-img check/compare" >&2; exit 1; }
    results+=("$(printf '%-34s %s' "  (output)" "$(du -k "$WORK/out.qcow2" | cut -f1) KiB, qemu-img check and compare pass")")
}
bench_case "convert -c raw->qcow2 (deflate)" clean_out \
    "$QEMU_IMG convert -c -f raw -O qcow2 $WORK/src.raw $WORK/out.qcow2" \
    "$OX convert -c -f raw -O qcow2 $WORK/src.raw $WORK/out.qcow2"
verify_compressed
bench_case "convert -c raw->qcow2 (zstd)" clean_out \
    "$QEMU_IMG convert -c -f raw -O qcow2 -o compression_type=zstd $WORK/src.raw $WORK/out.qcow2" \
    "$OX convert -c -f raw -O qcow2 -o compression_type=zstd $WORK/src.raw $WORK/out.qcow2"
verify_compressed
# Reading a compressed image (made by qemu-img, deflate).
"$QEMU_IMG" convert -c -f raw -O qcow2 "$WORK/src.raw" "$WORK/src-c.qcow2"
bench_case "convert compressed qcow2->raw" clean_out \
    "$QEMU_IMG convert -f qcow2 -O raw $WORK/src-c.qcow2 $WORK/out.raw" \
    "$OX convert -f qcow2 -O raw $WORK/src-c.qcow2 $WORK/out.raw"

reqs=$(( SIZE_MB * 256 / 2 ))
bench_case "bench 4k read (qd 64)" nothing \
    "$QEMU_IMG bench -f qcow2 -c $reqs -d 64 -s 4k $WORK/src.qcow2" \
    "$OX bench -f qcow2 -c $reqs -d 64 -s 4k $WORK/src.qcow2"
writes=$(( SIZE_MB * 16 ))
bench_case "bench 4k allocating write (qd 64)" fresh_write_image \
    "$QEMU_IMG bench -w -f qcow2 -c $writes -d 64 -s 4k -S 64k $WORK/w.qcow2" \
    "$OX bench -w -f qcow2 -c $writes -d 64 -s 4k -S 64k $WORK/w.qcow2"

"$QEMU_IMG" create -q -f qcow2 -o cluster_size=4k,preallocation=metadata "$WORK/big.qcow2" 64G
bench_case "check 64 GiB, 4k clusters (prealloc)" nothing \
    "$QEMU_IMG check $WORK/big.qcow2" \
    "$OX check $WORK/big.qcow2"

echo "oxqcow vs qemu-img ($("$QEMU_IMG" --version | head -n 1)), ${SIZE_MB} MiB data set, best of $REPEAT"
echo "$(nproc) cores, load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%s\n' "${results[@]}"
echo "oxqcow peak RSS: $peak_rss KiB"
