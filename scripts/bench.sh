#!/usr/bin/env bash
# Side-by-side benchmark of oxqcow and qemu-img on the same files.
#
# Every case runs both tools on identical inputs, alternating, REPEAT times,
# and keeps each tool's best wall time. It prints one line per case with both
# times, the ratio oxqcow/qemu-img (below 1.0 means oxqcow is faster; in
# parentheses the lowest and highest ratio of the runs paired by repetition) and
# oxqcow's peak RSS. Page cache is warm for both tools alike.
#
# Then `oxqcow serve` against qemu-nbd on the same image with the same
# clients (fio's nbd engine, nbdcopy) over a Unix socket: throughput of each,
# best of BENCH_NBD_REPEAT (5), and the ratio oxqcow/qemu-nbd (above 1.0 means oxqcow serves
# faster), each ratio with its spread over the repetitions; and oxqcow's
# NBD client: convert from qemu-nbd's export against qemu-img convert and
# nbdcopy. Needs fio and nbdcopy (apt-get install fio libnbd-bin), for
# the HTTP case nginx and qemu-block-extra (qemu-img's curl driver), and for
# the RBD case Ceph (ceph-mon ceph-osd ceph-mgr radosgw ceph-common: a
# single-node cluster started here with scripts/ceph-cluster.sh) and
# qemu-block-extra (qemu-img's rbd driver);
# the S3 case Ceph's packages too (radosgw) and curl, its reference.
#
#   scripts/bench.sh                 # 1 GiB data set
#   BENCH_SIZE_MB=256 scripts/bench.sh
#   BENCH_ONLY='compress|compressed' scripts/bench.sh   # only the cases whose name matches
#   BENCH_NBD=only scripts/bench.sh  # only the NBD figures (BENCH_NBD=0: none)
#   BENCH_FUSE=0 scripts/bench.sh    # without the FUSE figures (oxqcow mount vs qemu-storage-daemon)
#   BENCH_NBD=0 BENCH_ONLY=fuse BENCH_FUSE_REPEAT=9 scripts/bench.sh   # only the FUSE figures
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MB=${BENCH_SIZE_MB:-1024}
REPEAT=${BENCH_REPEAT:-3}
ONLY=${BENCH_ONLY:-}
WORK=${BENCH_DIR:-$(mktemp -d /tmp/oxqcow-bench.XXXXXX)}
QEMU_IMG=${QEMU_IMG:-qemu-img}
command -v "$QEMU_IMG" >/dev/null || { echo "bench: $QEMU_IMG not found (apt-get install qemu-utils)" >&2; exit 1; }

cargo build --release -q --bin oxqcow
# BENCH_OXQCOW=PATH: another oxqcow binary (an older build, for before/after figures).
OX=${BENCH_OXQCOW:-${CARGO_TARGET_DIR:-$PWD/target}/release/oxqcow}
NBD=${BENCH_NBD:-1}
trap '[ -d "$WORK/ceph" ] && scripts/ceph-cluster.sh stop "$WORK/ceph"; rm -rf "$WORK"' EXIT

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
# run CMD... : wall seconds and peak RSS (KiB) of one run (the wall
# time to the microsecond: /usr/bin/time's %e has 10 ms steps, a large part
# of a convert of a few hundred MiB from the page cache)
run() {
    local t0 t1
    t0=$(date +%s%N)
    /usr/bin/time -f "%M" -o "$WORK/time" "$@" >"$WORK/out" 2>"$WORK/err" || {
        echo "bench: command failed: $*" >&2; cat "$WORK/err" >&2; exit 1; }
    t1=$(date +%s%N)
    echo "$(awk -v ns=$(( t1 - t0 )) 'BEGIN { printf "%.6f", ns / 1e9 }') $(tail -n 1 "$WORK/time")"
}

# spread "OURS..." "THEIRS...": min..max of the ratios of the runs paired by
# repetition (each pair ran back to back, so under load they share it).
spread() {
    python3 -c 'import sys; r = [a / max(b, 1e-3) for a, b in zip(map(float, sys.argv[1].split()), map(float, sys.argv[2].split()))]; print(f"{min(r):.2f}..{max(r):.2f}")' "$1" "$2"
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
        # sync: neither tool pays for writing back the other's dirty pages.
        $setup; sync; r=$(run bash -c "$qcmd"); q+=("${r% *}")
        $setup; sync; r=$(run bash -c "$ocmd"); o+=("${r% *}")
        local rss=${r#* }
        if (( rss > case_rss )); then case_rss=$rss; fi
    done
    if (( case_rss > peak_rss )); then peak_rss=$case_rss; fi
    local qt ot
    qt=$(printf '%s\n' "${q[@]}" | best)
    ot=$(printf '%s\n' "${o[@]}" | best)
    results+=("$(printf '%-34s qemu-img %8.3fs  oxqcow %8.3fs  ratio %5.2f (%s)  oxqcow-rss %6d KiB' \
        "$name" "$qt" "$ot" "$(python3 -c "print($ot/max($qt,1e-3))")" "$(spread "${o[*]}" "${q[*]}")" "$case_rss")")
}

nothing() { :; }
clean_out() { rm -f "$WORK"/out.qcow2 "$WORK"/out.raw; }
fresh_write_image() { rm -f "$WORK/w.qcow2"; "$QEMU_IMG" create -q -f qcow2 "$WORK/w.qcow2" "${SIZE_MB}M"; }

"$QEMU_IMG" convert -f raw -O qcow2 "$WORK/src.raw" "$WORK/src.qcow2"

if [[ $NBD != only ]]; then
bench_case "convert raw->qcow2" clean_out \
    "$QEMU_IMG convert -f raw -O qcow2 $WORK/src.raw $WORK/out.qcow2" \
    "$OX convert -f raw -O qcow2 $WORK/src.raw $WORK/out.qcow2"
bench_case "convert qcow2->qcow2" clean_out \
    "$QEMU_IMG convert -f qcow2 -O qcow2 $WORK/src.qcow2 $WORK/out.qcow2" \
    "$OX convert -f qcow2 -O qcow2 $WORK/src.qcow2 $WORK/out.qcow2"
# The limit of a convert: the same bytes through the page cache once, holes
# kept. The ratio of this line is cp's time over qemu-img convert's; the
# next one is oxqcow's convert over cp (issue 13's goal: 1.25 or less).
# Below even that: only writing the source's data bytes into a new file
# (dd from /dev/zero, no read, no zero scan, no metadata), the floor any
# convert into a file through the page cache has; its ratio over qemu-img
# shows how much of qemu-img's time no converter can save.
if [[ -z $ONLY || "cp --sparse=always" =~ $ONLY ]]; then
    data_mib=$(( $(stat -c %b "$WORK/src.raw") * 512 / 1048576 ))
    dd_times=()
    cp_times=()
    ox_times=()
    q_times=()
    for _ in $(seq "$REPEAT"); do
        clean_out; sync; r=$(run cp --sparse=always "$WORK/src.raw" "$WORK/out.raw"); cp_times+=("${r% *}")
        clean_out; sync; r=$(run dd if=/dev/zero of="$WORK/out.raw" bs=1M count="$data_mib" status=none); dd_times+=("${r% *}")
        clean_out; sync; r=$(run "$QEMU_IMG" convert -f raw -O qcow2 "$WORK/src.raw" "$WORK/out.qcow2"); q_times+=("${r% *}")
        clean_out; sync; r=$(run "$OX" convert -f raw -O qcow2 "$WORK/src.raw" "$WORK/out.qcow2"); ox_times+=("${r% *}")
    done
    ct=$(printf '%s\n' "${cp_times[@]}" | best)
    dt=$(printf '%s\n' "${dd_times[@]}" | best)
    qt=$(printf '%s\n' "${q_times[@]}" | best)
    ot=$(printf '%s\n' "${ox_times[@]}" | best)
    results+=("$(printf '%-34s qemu-img %8.3fs  cp       %8.3fs  ratio %5.2f  (cp/qemu-img)' \
        "cp --sparse=always raw (limit)" "$qt" "$ct" "$(python3 -c "print($ct/max($qt,1e-3))")")")
    results+=("$(printf '%-34s qemu-img %8.3fs  dd       %8.3fs  ratio %5.2f  (dd/qemu-img)' \
        "write of the data bytes (floor)" "$qt" "$dt" "$(python3 -c "print($dt/max($qt,1e-3))")")")
    results+=("$(printf '%-34s cp       %8.3fs  oxqcow %8.3fs  ratio %5.2f (%s)  (oxqcow/cp)' \
        "convert raw->qcow2 vs cp" "$ct" "$ot" "$(python3 -c "print($ot/max($ct,1e-3))")" \
        "$(spread "${ox_times[*]}" "${cp_times[*]}")")")
fi
bench_case "convert qcow2->raw" clean_out \
    "$QEMU_IMG convert -f qcow2 -O raw $WORK/src.qcow2 $WORK/out.raw" \
    "$OX convert -f qcow2 -O raw $WORK/src.qcow2 $WORK/out.raw"
# Direct I/O on both sides (-t none -T none: O_DIRECT, no page cache).
bench_case "convert raw->qcow2 -t none -T none" clean_out \
    "$QEMU_IMG convert -t none -T none -f raw -O qcow2 $WORK/src.raw $WORK/out.qcow2" \
    "$OX convert -t none -T none -f raw -O qcow2 $WORK/src.raw $WORK/out.qcow2"

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

# Reading over HTTP from nginx (started here on 127.0.0.1, serving $WORK):
# qemu-img's curl driver with -m 1 (it hangs on parallel reads; it needs
# qemu-block-extra), oxqcow with its defaults (parallel range requests).
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if [[ $NBD != only && ( -z $ONLY || "convert qcow2->raw from nginx (http)" =~ $ONLY ) ]]; then
    [[ -x $NGINX ]] || { echo "bench: nginx not found (apt-get install nginx)" >&2; exit 1; }
    mkdir -p "$WORK/nginx/logs" "$WORK/nginx/tmp"
    http_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    cat >"$WORK/nginx/nginx.conf" <<NGINX_CONF
daemon off; master_process off; pid $WORK/nginx/pid; error_log $WORK/nginx/logs/error.log;
events { worker_connections 256; }
http { access_log off; client_body_temp_path $WORK/nginx/tmp; proxy_temp_path $WORK/nginx/tmp;
  fastcgi_temp_path $WORK/nginx/tmp; uwsgi_temp_path $WORK/nginx/tmp; scgi_temp_path $WORK/nginx/tmp;
  server { listen 127.0.0.1:$http_port; root $WORK; } }
NGINX_CONF
    "$NGINX" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" &
    nginx_pid=$!
    for _ in $(seq 100); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $http_port))" 2>/dev/null && break
        sleep 0.1
    done
    bench_case "convert qcow2->raw from nginx (http)" clean_out \
        "$QEMU_IMG convert -m 1 -O raw http://127.0.0.1:$http_port/src.qcow2 $WORK/out.raw" \
        "$OX convert -O raw http://127.0.0.1:$http_port/src.qcow2 $WORK/out.raw"
    if (( last_ran )); then
        cmp -s "$WORK/out.raw" "$WORK/src.raw" || { echo "bench: the copy from nginx differs" >&2; exit 1; }
    fi
    kill "$nginx_pid"; wait "$nginx_pid" || true
fi

# Starts a single-node Ceph cluster in $WORK/ceph, its env file in
# $WORK/ceph.env. A start can lose a race for the random ports it picks
# (or find radosgw slow to answer): one more try, as the tests make.
ceph_start() {
    local attempt
    for attempt in 1 2; do
        rm -rf "$WORK/ceph"
        if bash scripts/ceph-cluster.sh start "$WORK/ceph" >"$WORK/ceph.env"; then
            return 0
        fi
        bash scripts/ceph-cluster.sh stop "$WORK/ceph" >/dev/null 2>&1 || true
        echo "bench: scripts/ceph-cluster.sh could not start a cluster (attempt $attempt)" >&2
    done
    exit 1
}

# Writing into RBD (a single-node memstore cluster started here on
# 127.0.0.1): qemu-img's rbd driver and `rbd import` of the raw data set
# (Ceph's own client) against oxqcow, each run into a new image removed
# afterwards, interleaved. Ratios of the best times, and the spread
# (min..max) of the ratios of the runs of one repetition.
if [[ $NBD != only && ( -z $ONLY || "convert qcow2->raw into rbd" =~ $ONLY ) ]]; then
    ceph_start
    CONF=$WORK/ceph/ceph.conf
    rbd_rm() { rbd --conf "$CONF" rm "rbd/$1" >/dev/null 2>&1 || true; }
    q_times=(); o_times=(); i_times=(); oq=(); oi=()
    for _ in $(seq "$REPEAT"); do
        rbd_rm bq; rbd_rm bo; rbd_rm bi
        r=$(run "$QEMU_IMG" convert -O raw "$WORK/src.qcow2" "rbd:rbd/bq:conf=$CONF"); qt=${r% *}
        r=$(run "$OX" convert -O raw "$WORK/src.qcow2" "rbd:rbd/bo:conf=$CONF"); ot=${r% *}
        if (( ${r#* } > peak_rss )); then peak_rss=${r#* }; fi
        r=$(run rbd --conf "$CONF" import --no-progress "$WORK/src.raw" rbd/bi); it=${r% *}
        q_times+=("$qt"); o_times+=("$ot"); i_times+=("$it")
        oq+=("$(python3 -c "print($ot/max($qt,1e-3))")"); oi+=("$(python3 -c "print($ot/max($it,1e-3))")")
    done
    "$QEMU_IMG" compare -f raw -F raw "$WORK/src.raw" "rbd:rbd/bo:conf=$CONF" >/dev/null \
        || { echo "bench: the copy into RBD differs" >&2; exit 1; }
    spread() { printf '%s\n' "$@" | sort -g | sed -n '1p;$p' | paste -sd' ' | awk '{printf "%.2f..%.2f", $1, $2}'; }
    qt=$(printf '%s\n' "${q_times[@]}" | best); ot=$(printf '%s\n' "${o_times[@]}" | best)
    it=$(printf '%s\n' "${i_times[@]}" | best)
    results+=("$(printf '%-34s qemu-img %8.3fs  oxqcow %8.3fs  ratio %5.2f  (runs %s)' \
        "convert qcow2->raw into rbd" "$qt" "$ot" "$(python3 -c "print($ot/max($qt,1e-3))")" "$(spread "${oq[@]}")")")
    results+=("$(printf '%-34s import   %8.3fs  oxqcow %8.3fs  ratio %5.2f  (runs %s, oxqcow/rbd import)' \
        "  the same vs rbd import (raw)" "$it" "$ot" "$(python3 -c "print($ot/max($it,1e-3))")" "$(spread "${oi[@]}")")")
    scripts/ceph-cluster.sh stop "$WORK/ceph"
    rm -rf "$WORK/ceph"
fi

# Reading from S3 (radosgw, from scripts/ceph-cluster.sh, which needs Ceph's
# packages). QEMU has no S3 driver, so the reference is curl downloading the
# same object (signed with SigV4): the ratio is oxqcow's convert over curl's
# transfer of the qcow2 bytes, i.e. what reading them as an image costs above
# moving them. Then one upload each (convert -O qcow2 into a new object, a
# multipart upload, against curl putting the same qcow2 bytes), not repeated:
# the OSD keeps its data in memory and radosgw frees replaced objects late.
if [[ $NBD != only && ( -z $ONLY || "convert qcow2->raw from S3 (radosgw)" =~ $ONLY ) ]]; then
    command -v curl >/dev/null || { echo "bench: curl not found (apt-get install curl): the S3 case's reference" >&2; exit 1; }
    ceph_start
    trap 'bash scripts/ceph-cluster.sh stop "$WORK/ceph" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
    # shellcheck disable=SC1091
    . "$WORK/ceph.env"
    export AWS_ENDPOINT_URL=$S3_ENDPOINT AWS_REGION=$S3_REGION AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY \
        AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY AWS_ALLOW_HTTP=true
    # radosgw wants the payload's hash among the signed headers.
    s3curl=(curl -sS --fail --aws-sigv4 "aws:amz:$S3_REGION:s3" -u "$S3_ACCESS_KEY:$S3_SECRET_KEY"
        -H "x-amz-content-sha256: UNSIGNED-PAYLOAD")
    "${s3curl[@]}" -X PUT "$S3_ENDPOINT/bench" >/dev/null
    "${s3curl[@]}" -T "$WORK/src.qcow2" "$S3_ENDPOINT/bench/src.qcow2" >/dev/null
    curl_times=()
    ox_times=()
    s3_rss=0
    for _ in $(seq "$REPEAT"); do
        clean_out; sync; r=$(run "${s3curl[@]}" -o "$WORK/out.qcow2" "$S3_ENDPOINT/bench/src.qcow2"); curl_times+=("${r% *}")
        clean_out; sync; r=$(run "$OX" convert -O raw s3://bench/src.qcow2 "$WORK/out.raw"); ox_times+=("${r% *}")
        if (( ${r#* } > s3_rss )); then s3_rss=${r#* }; fi
    done
    cmp -s "$WORK/out.raw" "$WORK/src.raw" || { echo "bench: the copy from S3 differs" >&2; exit 1; }
    ct=$(printf '%s\n' "${curl_times[@]}" | best)
    ot=$(printf '%s\n' "${ox_times[@]}" | best)
    mb=$(( $(stat -c %s "$WORK/src.qcow2") >> 20 ))
    results+=("$(printf '%-34s curl     %8.3fs  oxqcow %8.3fs  ratio %5.2f  oxqcow-rss %6d KiB  (%d MiB object, oxqcow/curl)' \
        "convert qcow2->raw from S3 (radosgw)" "$ct" "$ot" "$(python3 -c "print($ot/max($ct,1e-3))")" "$s3_rss" "$mb")")
    if (( s3_rss > peak_rss )); then peak_rss=$s3_rss; fi
    r=$(run "${s3curl[@]}" -T "$WORK/src.qcow2" "$S3_ENDPOINT/bench/curl.qcow2"); ct=${r% *}
    r=$(run "$OX" convert -f qcow2 -O qcow2 "$WORK/src.qcow2" s3://bench/ox.qcow2); ot=${r% *}
    if (( ${r#* } > peak_rss )); then peak_rss=${r#* }; fi
    results+=("$(printf '%-34s curl     %8.3fs  oxqcow %8.3fs  ratio %5.2f  oxqcow-rss %6d KiB  (one run each)' \
        "convert qcow2->qcow2 to S3 (upload)" "$ct" "$ot" "$(python3 -c "print($ot/max($ct,1e-3))")" "${r#* }")")
    bash scripts/ceph-cluster.sh stop "$WORK/ceph" >/dev/null
    trap 'rm -rf "$WORK"' EXIT
fi

reqs=$(( SIZE_MB * 256 / 2 ))
bench_case "bench 4k read (qd 64)" nothing \
    "$QEMU_IMG bench -f qcow2 -c $reqs -d 64 -s 4k $WORK/src.qcow2" \
    "$OX bench -f qcow2 -c $reqs -d 64 -s 4k $WORK/src.qcow2"
bench_case "bench 64k read (qd 64)" nothing \
    "$QEMU_IMG bench -f qcow2 -c $(( SIZE_MB * 16 )) -d 64 -s 64k $WORK/src.qcow2" \
    "$OX bench -f qcow2 -c $(( SIZE_MB * 16 )) -d 64 -s 64k $WORK/src.qcow2"
writes=$(( SIZE_MB * 16 ))
bench_case "bench 4k allocating write (qd 64)" fresh_write_image \
    "$QEMU_IMG bench -w -f qcow2 -c $writes -d 64 -s 4k -S 64k $WORK/w.qcow2" \
    "$OX bench -w -f qcow2 -c $writes -d 64 -s 4k -S 64k $WORK/w.qcow2"
# The same with a flush after every 64 requests (qd 16): what a guest that
# syncs sees.
bench_case "bench 4k alloc write flush/64 qd16" fresh_write_image \
    "$QEMU_IMG bench -w -f qcow2 -c $(( writes / 4 )) -d 16 --flush-interval=64 -s 4k -S 64k $WORK/w.qcow2" \
    "$OX bench -w -f qcow2 -c $(( writes / 4 )) -d 16 --flush-interval=64 -s 4k -S 64k $WORK/w.qcow2"

# 4k writes into an overlay with 1 MiB clusters over a filled backing file,
# with and without extended L2 entries. The step (1 MiB + 4 KiB) puts every
# write in another cluster at another offset until it wraps: without
# subclusters each first write copies the rest of its 1 MiB cluster from the
# backing file, with them only the rest of its 32 KiB subcluster.
if [[ -z $ONLY || "bench 4k overlay write 1M clusters extended_l2" =~ $ONLY ]]; then
    "$QEMU_IMG" create -q -f qcow2 "$WORK/filled.qcow2" "${SIZE_MB}M"
    qemu-io -f qcow2 -c "write -P 0x5a 0 ${SIZE_MB}M" "$WORK/filled.qcow2" >/dev/null
fi
overlay_ext=off
fresh_overlay() {
    rm -f "$WORK/ov.qcow2"
    "$QEMU_IMG" create -q -f qcow2 -o cluster_size=1M,extended_l2=$overlay_ext \
        -b "$WORK/filled.qcow2" -F qcow2 "$WORK/ov.qcow2"
}
ov_writes=$(( SIZE_MB * 4 ))
for overlay_ext in off on; do
    bench_case "bench 4k overlay write 1M clusters extended_l2=$overlay_ext (qd 64)" fresh_overlay \
        "$QEMU_IMG bench -w -f qcow2 -c $ov_writes -d 64 -s 4k -S 1028k $WORK/ov.qcow2" \
        "$OX bench -w -f qcow2 -c $ov_writes -d 64 -s 4k -S 1028k $WORK/ov.qcow2"
    if (( last_ran )); then
        "$QEMU_IMG" check -q "$WORK/ov.qcow2" || { echo "bench: the overlay fails qemu-img check" >&2; exit 1; }
    fi
done

# (made only when the case runs: creating it takes minutes on a loaded machine)
if [[ -z $ONLY || "check 64 GiB, 4k clusters (prealloc)" =~ $ONLY ]]; then
    "$QEMU_IMG" create -q -f qcow2 -o cluster_size=4k,preallocation=metadata "$WORK/big.qcow2" 64G
fi
bench_case "check 64 GiB, 4k clusters (prealloc)" nothing \
    "$QEMU_IMG check $WORK/big.qcow2" \
    "$OX check $WORK/big.qcow2"
fi

# ---- NBD: oxqcow serve vs qemu-nbd ------------------------------------------
# Each case runs NBD_REPEAT times, the two servers (or tools) alternating,
# and states the ratio of the best figures with its spread: the lowest and
# highest ratio of the repetitions' pairs (each pair ran back to back, so
# the load of other processes on the machine tilts both alike).
NBD_RUNTIME=${BENCH_NBD_RUNTIME:-10}
NBD_REPEAT=${BENCH_NBD_REPEAT:-5}
nbd_results=()
client_results=()
SOCK=$WORK/nbd.sock
URI="nbd+unix:///?socket=$SOCK"
server_pid=
TLS_ARGS=()

# TLS (x509) for both servers: a CA, a server and a client certificate made
# with openssl in $WORK/tls-server and $WORK/tls-client (QEMU's and
# libnbd's file names); with_tls switches the servers and $URI to it.
make_tls() {
    local d=$WORK/tls-make who
    mkdir -p "$d" "$WORK/tls-server" "$WORK/tls-client"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=bench-ca \
        -keyout "$d/ca-key.pem" -out "$WORK/tls-server/ca-cert.pem" 2>/dev/null
    cp "$WORK/tls-server/ca-cert.pem" "$WORK/tls-client/ca-cert.pem"
    for who in server client; do
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost \
            -keyout "$WORK/tls-$who/$who-key.pem" -out "$d/$who.csr" 2>/dev/null
        printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=%sAuth\n' "$who" >"$d/$who.ext"
        openssl x509 -req -in "$d/$who.csr" -CA "$WORK/tls-server/ca-cert.pem" -CAkey "$d/ca-key.pem" \
            -CAcreateserial -days 2 -extfile "$d/$who.ext" -out "$WORK/tls-$who/$who-cert.pem" 2>/dev/null
    done
}
with_tls() {
    TLS_ARGS=(--object "tls-creds-x509,id=tls0,dir=$WORK/tls-server,endpoint=server" --tls-creds tls0)
    URI="nbds+unix:///?socket=$SOCK&tls-certificates=$WORK/tls-client"
}
without_tls() { TLS_ARGS=(); URI="nbd+unix:///?socket=$SOCK"; }

# start_server qemu|ox IMAGE: both with the same flags (qcow2, writeback
# cache, persistent, up to 4 clients so that both advertise multi-conn).
start_server() {
    rm -f "$SOCK"
    if [[ $1 == qemu ]]; then
        qemu-nbd "${TLS_ARGS[@]}" -f qcow2 --cache=writeback -t -e 4 -k "$SOCK" "$2" >/dev/null 2>"$WORK/server.err" &
    else
        "$OX" serve "${TLS_ARGS[@]}" -f qcow2 --cache=writeback -t -e 4 -k "$SOCK" "$2" >/dev/null 2>"$WORK/server.err" &
    fi
    server_pid=$!
    for _ in $(seq 500); do [[ -S $SOCK ]] && return; sleep 0.02; done
    echo "bench: $1 server did not start" >&2; cat "$WORK/server.err" >&2; exit 1
}
stop_server() { kill "$server_pid"; wait "$server_pid" || true; server_pid=; }
trap '[[ -n $server_pid ]] && kill "$server_pid"; rm -rf "$WORK"' EXIT

# fio_figure RW BS QD: one fio run against $URI; prints IOPS and MiB/s.
fio_figure() {
    fio --name=nbd --ioengine=nbd --uri="$URI" --rw="$1" --bs="$2" --iodepth="$3" \
        --size="${SIZE_MB}M" --time_based --runtime="$NBD_RUNTIME" --ramp_time=1 \
        --output-format=json >"$WORK/fio.json" 2>"$WORK/fio.err" || {
        echo "bench: fio failed" >&2; cat "$WORK/fio.err" >&2; exit 1; }
    python3 - "$WORK/fio.json" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]   # fio's nbd engine prints a line first
side = job["read"] if job["read"]["io_bytes"] else job["write"]
print(f'{side["iops"]:.0f} {side["bw"] / 1024:.1f}')
PY
}

# nbd_case NAME IMAGE-SETUP FIELD(iops|mibs) FIO-ARGS...: best of REPEAT
# for each server, alternating.
nbd_case() {
    local name=$1 setup=$2 field=$3 q=() o=() r; shift 3
    if [[ -n $ONLY && ! $name =~ $ONLY ]]; then return 0; fi
    for _ in $(seq "$NBD_REPEAT"); do
        for kind in qemu ox; do
            $setup; start_server "$kind" "$NBD_IMAGE"
            r=$(fio_figure "$@"); stop_server
            if [[ $field == iops ]]; then r=${r% *}; else r=${r#* }; fi
            if [[ $kind == qemu ]]; then q+=("$r"); else o+=("$r"); fi
        done
    done
    nbd_report "$name" "$field" "${q[*]}" "${o[*]}"
}

# ratios higher|lower "QEMU-FIGURES" "OX-FIGURES": the best of each, the
# ratio of the bests (oxqcow over qemu) and the spread of the pairs'
# ratios, as "BEST-QEMU BEST-OX RATIO MIN MAX"; "higher" when a higher
# figure is better (throughput), "lower" for times.
ratios() {
    python3 - "$@" <<'PY'
import sys
better, q, o = sys.argv[1], [float(x) for x in sys.argv[2].split()], [float(x) for x in sys.argv[3].split()]
best = max if better == "higher" else min
pairs = [b / max(a, 1e-9) for a, b in zip(q, o)]
bq, bo = best(q), best(o)
print(f"{bq} {bo} {bo / max(bq, 1e-9):.2f} {min(pairs):.2f} {max(pairs):.2f}")
PY
}

# nbd_report NAME iops|mibs "QEMU-FIGURES" "OX-FIGURES"
nbd_report() {
    local unit=IOPS r; [[ $2 == mibs ]] && unit=MiB/s
    read -r -a r <<<"$(ratios higher "$3" "$4")"
    nbd_results+=("$(printf '%-34s qemu-nbd %9.0f %-5s  oxqcow %9.0f %-5s  ratio %5.2f  (%s..%s)' \
        "$1" "${r[0]}" "$unit" "${r[1]}" "$unit" "${r[2]}" "${r[3]}" "${r[4]}")")
}

# The CPU seconds (user and system) the server has used so far: less
# sensitive to the machine's load than wall times.
server_cpu() { awk '{ print ($14 + $15) / 100 }' "/proc/$server_pid/stat"; }

# nbdcopy_case NAME IMAGE-SETUP SRC DST: MiB/s of a whole-disk nbdcopy,
# and the least CPU time each server spent on it.
nbdcopy_case() {
    local name=$1 setup=$2 src=$3 dst=$4 q=() o=() qc=() oc=() t c
    if [[ -n $ONLY && ! $name =~ $ONLY ]]; then return 0; fi
    for _ in $(seq "$NBD_REPEAT"); do
        for kind in qemu ox; do
            $setup; start_server "$kind" "$NBD_IMAGE"
            t=$(run nbdcopy "${src//@URI@/"$URI"}" "${dst//@URI@/"$URI"}"); c=$(server_cpu); stop_server
            t=$(python3 -c "print($SIZE_MB / max(${t% *}, 1e-3))")
            if [[ $kind == qemu ]]; then q+=("$t"); qc+=("$c"); else o+=("$t"); oc+=("$c"); fi
        done
    done
    nbd_report "$name" mibs "${q[*]}" "${o[*]}"
    nbd_results[-1]+=$(printf '  server CPU %.2fs/%.2fs' "$(printf '%s\n' "${qc[@]}" | sort -g | head -n 1)" \
        "$(printf '%s\n' "${oc[@]}" | sort -g | head -n 1)")
}

# The NBD client: a whole export (qcow2 served by qemu-nbd) copied to a
# raw file by oxqcow convert (its default workers), by qemu-img convert
# and by nbdcopy, in turn, NBD_REPEAT times; ratios of times, oxqcow's over
# the other's (below 1.0: oxqcow faster), with their spread.
client_case() {
    local name="convert qcow2 from an NBD export to raw" q=() o=() n=() t r
    if [[ -n $ONLY && ! $name =~ $ONLY ]]; then return 0; fi
    data_image; start_server qemu "$NBD_IMAGE"
    for _ in $(seq "$NBD_REPEAT"); do
        clean_out; sync; t=$(run "$QEMU_IMG" convert -O raw "$URI" "$WORK/out.raw"); q+=("${t% *}")
        clean_out; sync; t=$(run "$OX" convert -O raw "$URI" "$WORK/out.raw"); o+=("${t% *}")
        clean_out; sync; t=$(run nbdcopy "$URI" "$WORK/out.raw"); n+=("${t% *}")
    done
    cmp -s "$WORK/out.raw" "$WORK/src.raw" || { echo "bench: nbdcopy's copy from the export differs" >&2; exit 1; }
    clean_out; "$OX" convert -O raw "$URI" "$WORK/out.raw"
    cmp -s "$WORK/out.raw" "$WORK/src.raw" || { echo "bench: oxqcow's copy from the export differs" >&2; exit 1; }
    stop_server
    read -r -a r <<<"$(ratios lower "${q[*]}" "${o[*]}")"
    client_results+=("$(printf '%-40s qemu-img %7.3fs  oxqcow %7.3fs  ratio %5.2f  (%s..%s)' \
        "$name" "${r[0]}" "${r[1]}" "${r[2]}" "${r[3]}" "${r[4]}")")
    read -r -a r <<<"$(ratios lower "${n[*]}" "${o[*]}")"
    client_results+=("$(printf '%-40s nbdcopy  %7.3fs  oxqcow %7.3fs  ratio %5.2f  (%s..%s)' \
        "  (the same vs nbdcopy)" "${r[0]}" "${r[1]}" "${r[2]}" "${r[3]}" "${r[4]}")")
}

data_image() { NBD_IMAGE=$WORK/src.qcow2; }
empty_image() {
    NBD_IMAGE=$WORK/nbd-w.qcow2; rm -f "$NBD_IMAGE"
    "$QEMU_IMG" create -q -f qcow2 "$NBD_IMAGE" "${SIZE_MB}M"
}

if [[ $NBD != 0 ]]; then
    for tool in fio nbdcopy qemu-nbd; do
        command -v "$tool" >/dev/null || { echo "bench: $tool not found (apt-get install fio libnbd-bin qemu-utils)" >&2; exit 1; }
    done
    nbd_case "nbd fio 4k random read (qd 16)" data_image iops randread 4k 16
    nbd_case "nbd fio 4k random write (qd 16)" empty_image iops randwrite 4k 16
    nbd_case "nbd fio 1M sequential read (qd 8)" data_image mibs read 1M 8
    nbd_case "nbd fio 1M sequential write (qd 8)" empty_image mibs write 1M 8
    nbdcopy_case "nbdcopy export -> null" data_image @URI@ null:
    nbdcopy_case "nbdcopy raw -> export" empty_image "$WORK/src.raw" @URI@
    client_case
    if command -v openssl >/dev/null; then
        make_tls
        with_tls
        nbdcopy_case "nbdcopy export -> null (TLS)" data_image @URI@ null:
        nbdcopy_case "nbdcopy raw -> export (TLS)" empty_image "$WORK/src.raw" @URI@
        without_tls
    else
        echo "bench: TLS figures skipped (openssl not found)" >&2
    fi
fi

# ---- FUSE: oxqcow mount vs qemu-storage-daemon --export type=fuse ------------
# Through the mounted file, each run on a fresh mount (the kernel's page
# cache of the FUSE file starts empty; the image file's host cache is warm
# for both): dd with 1 MiB blocks, and fio's psync engine with 4 KiB blocks
# (one request at a time, sequential and random, read and write; writes end
# with an fsync, so what they measure has reached the image). Each case
# runs qsd and oxqcow alternately BENCH_FUSE_REPEAT times (default 5); the
# ratio oxqcow/qsd is the median of the runs' pairwise ratios, with their
# min..max. oxqcow mount's peak RSS over all its runs is printed. Needs
# /dev/fuse, fusermount3, fio and qemu-storage-daemon; skipped with a note
# when one is missing. BENCH_FUSE=0 skips them; BENCH_NBD=0 BENCH_ONLY=fuse
# runs only them.
FUSE=${BENCH_FUSE:-1}
FUSE_REPEAT=${BENCH_FUSE_REPEAT:-5}
FUSE_RUNTIME=${BENCH_FUSE_RUNTIME:-5}
fuse_results=()
fuse_peak_rss=0
MNT=$WORK/fuse-mnt
fuse_pid=
mounted() { grep -q " $MNT fuse" /proc/mounts; }
start_fuse() {
    : >"$MNT"
    if [[ $1 == qemu ]]; then
        qemu-storage-daemon --blockdev "driver=file,node-name=f,filename=$2" \
            --blockdev driver=qcow2,node-name=q,file=f \
            --export "type=fuse,id=e,node-name=q,mountpoint=$MNT,writable=on" 2>"$WORK/server.err" &
    else
        /usr/bin/time -f %M -o "$WORK/fuse-rss" "$OX" mount -f qcow2 "$2" "$MNT" 2>"$WORK/server.err" &
    fi
    fuse_pid=$!
    for _ in $(seq 3000); do mounted && return; sleep 0.02; done
    echo "bench: $1 FUSE export did not mount" >&2; cat "$WORK/server.err" >&2; exit 1
}
stop_fuse() {
    if [[ $1 == qemu ]]; then
        kill "$fuse_pid"; wait "$fuse_pid" || true
    else
        fusermount3 -u "$MNT"
        wait "$fuse_pid" || { echo "bench: oxqcow mount failed" >&2; cat "$WORK/server.err" >&2; exit 1; }
        local rss; rss=$(tail -n 1 "$WORK/fuse-rss")
        if (( rss > fuse_peak_rss )); then fuse_peak_rss=$rss; fi
    fi
    fuse_pid=
}
trap '[[ -n $server_pid ]] && kill "$server_pid"; mounted && fusermount3 -u "$MNT"; [[ -n $fuse_pid ]] && kill "$fuse_pid"; rm -rf "$WORK"' EXIT

# fuse_report NAME UNIT QSD-FIGURES OX-FIGURES: medians and the spread of
# the pairwise ratios (figures space-separated; run i of one tool goes with
# run i of the other, which ran right after it).
fuse_report() {
    fuse_results+=("$(python3 -c '
import statistics, sys
name, unit = sys.argv[1], sys.argv[2]
q, o = ([float(x) for x in a.split()] for a in sys.argv[3:5])
r = [b / max(a, 1e-9) for a, b in zip(q, o)]
print(f"{name:<34} qsd {statistics.median(q):9.0f} {unit:<5}  oxqcow {statistics.median(o):9.0f} {unit:<5}  "
      f"ratio {statistics.median(r):5.2f} ({min(r):.2f}..{max(r):.2f}, {len(r)} runs)")
' "$@")")
}

# fuse_dd_case NAME IMAGE-SETUP DD-ARGS...: MiB/s of one dd per run.
fuse_dd_case() {
    local name=$1 setup=$2 q=() o=() t; shift 2
    if [[ -n $ONLY && ! $name =~ $ONLY ]]; then return 0; fi
    for _ in $(seq "$FUSE_REPEAT"); do
        for kind in qemu ox; do
            $setup; start_fuse "$kind" "$NBD_IMAGE"
            t=$(run dd "${@//@MNT@/$MNT}" bs=1M status=none); stop_fuse "$kind"
            t=$(python3 -c "print($SIZE_MB / max(${t% *}, 1e-3))")
            if [[ $kind == qemu ]]; then q+=("$t"); else o+=("$t"); fi
        done
    done
    fuse_report "$name" MiB/s "${q[*]}" "${o[*]}"
}

# fuse_fio_case NAME IMAGE-SETUP RW: IOPS of one fio psync 4 KiB job per
# run, over the whole disk or for BENCH_FUSE_RUNTIME seconds, whichever
# ends first (random jobs visit each block at most once: fio's random map).
fuse_fio_case() {
    local name=$1 setup=$2 rw=$3 q=() o=() r extra=()
    if [[ -n $ONLY && ! $name =~ $ONLY ]]; then return 0; fi
    if [[ $rw == *write ]]; then extra=(--end_fsync=1); fi
    for _ in $(seq "$FUSE_REPEAT"); do
        for kind in qemu ox; do
            $setup; start_fuse "$kind" "$NBD_IMAGE"
            fio --name=fuse --filename="$MNT" --ioengine=psync --rw="$rw" --bs=4k --size="${SIZE_MB}M" \
                --runtime="$FUSE_RUNTIME" --fallocate=none "${extra[@]}" --output-format=json \
                >"$WORK/fio.json" 2>"$WORK/fio.err" || {
                echo "bench: fio failed" >&2; cat "$WORK/fio.err" >&2; exit 1; }
            stop_fuse "$kind"
            r=$(python3 -c '
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
side = job["read"] if job["read"]["io_bytes"] else job["write"]
print(round(side["iops"]))
' "$WORK/fio.json")
            if [[ $kind == qemu ]]; then q+=("$r"); else o+=("$r"); fi
        done
    done
    fuse_report "$name" IOPS "${q[*]}" "${o[*]}"
}

if [[ $FUSE != 0 && $NBD != only ]]; then
    if [[ ! -e /dev/fuse ]] || ! command -v fusermount3 >/dev/null || ! command -v qemu-storage-daemon >/dev/null \
        || ! command -v fio >/dev/null; then
        echo "bench: FUSE figures skipped (need /dev/fuse, fusermount3, fio and qemu-storage-daemon)" >&2
    else
        fuse_dd_case "fuse dd 1M sequential read" data_image if=@MNT@ of=/dev/null
        fuse_dd_case "fuse dd 1M sequential write" empty_image if="$WORK/src.raw" of=@MNT@ conv=notrunc,fsync
        fuse_fio_case "fuse fio 4k sequential read" data_image read
        fuse_fio_case "fuse fio 4k random read" data_image randread
        fuse_fio_case "fuse fio 4k sequential write" empty_image write
        fuse_fio_case "fuse fio 4k random write" empty_image randwrite
    fi
fi

if (( ${#results[@]} )); then
    echo "oxqcow vs qemu-img ($("$QEMU_IMG" --version | sed -n 1p)), ${SIZE_MB} MiB data set, best of $REPEAT"
    echo "$(nproc) cores, load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    printf '%s\n' "${results[@]}"
    echo "oxqcow peak RSS: $peak_rss KiB"
fi
if (( ${#nbd_results[@]} )); then
    echo "oxqcow serve vs qemu-nbd, ${SIZE_MB} MiB image, unix socket, best of $NBD_REPEAT alternating" \
        "(ratio of the bests above 1.0: oxqcow faster; in parentheses the lowest..highest ratio of a pair;" \
        "server CPU: the least user+system seconds of qemu-nbd/oxqcow for one copy)"
    printf '%s\n' "${nbd_results[@]}"
fi
if (( ${#client_results[@]} )); then
    echo "NBD client: from qemu-nbd's export, ${SIZE_MB} MiB image, unix socket, best of $NBD_REPEAT alternating" \
        "(time ratio below 1.0: oxqcow faster; in parentheses the lowest..highest ratio of a run's trio)"
    printf '%s\n' "${client_results[@]}"
fi
if (( ${#fuse_results[@]} )); then
    echo "oxqcow mount vs $(qemu-storage-daemon --version | sed -n 1p) FUSE export, ${SIZE_MB} MiB image,"
    echo "median of $FUSE_REPEAT interleaved runs, ratio oxqcow/qsd with its min..max (above 1.0: oxqcow faster)"
    echo "$(nproc) cores, load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    printf '%s\n' "${fuse_results[@]}"
    echo "oxqcow mount peak RSS: $fuse_peak_rss KiB"
fi
