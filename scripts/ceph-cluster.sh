#!/usr/bin/env bash
# A throw-away single-node Ceph cluster on 127.0.0.1 for the RBD and S3 tests
# and benchmarks: one mon, one mgr, one OSD (memstore: the data lives in the
# OSD's memory, nothing large on disk), cephx on, a pool `rbd` initialised for
# RBD, and a radosgw (S3) with one user.
#
# Usage:
#   scripts/ceph-cluster.sh start DIR   create and start a cluster in DIR (created
#                                       if missing, must be empty); prints the env
#                                       file's lines when the cluster is ready
#   scripts/ceph-cluster.sh stop DIR    stop the daemons started in DIR (by their
#                                       pid files, nothing else); DIR is left for
#                                       the caller to remove
#   scripts/ceph-cluster.sh env DIR     print DIR/env
#
# DIR/env (shell syntax, `VAR=value` lines, values without spaces or quotes):
#   CEPH_CONF        DIR/ceph.conf: the cluster's configuration (mon address,
#                    keyring of client.admin); librados, qemu-img's
#                    `rbd:...:conf=$CEPH_CONF` and the `ceph`/`rbd` tools read it
#   CEPH_KEYRING     DIR/keyring: client.admin's keyring (also named in CEPH_CONF)
#   CEPH_MON_HOST    the mon's addresses, `[v2:127.0.0.1:P,v1:127.0.0.1:P+1]`
#   CEPH_USER        `admin` (the cephx id, as in `rbd:...:id=admin`)
#   CEPH_KEY         client.admin's secret key, base64 (`key=`/`key-secret`)
#   RBD_POOL         `rbd`, a pool initialised for RBD
#   S3_ENDPOINT      `http://127.0.0.1:PORT`, radosgw's S3 endpoint
#   S3_REGION        `us-east-1` (radosgw takes any region in a signature)
#   S3_ACCESS_KEY    the S3 user's access key
#   S3_SECRET_KEY    the S3 user's secret key
#
# Needs ceph-mon, ceph-osd, ceph-mgr, radosgw and ceph-common (Debian's
# packages; Ceph 16 here). Starting takes about 10-20 s. Exit status 0 when the
# cluster is ready; otherwise the daemons started so far are stopped, the
# logs' tails are printed on stderr and the status is 1.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop|env DIR" >&2
    exit 2
}

[ $# -eq 2 ] || usage
action=$1
dir=$2

# The daemons run with `run dir` = DIR/run and write a pid file each there.
stop_cluster() {
    local run=$1/run pidfile pid i
    [ -d "$run" ] || return 0
    for pidfile in "$run"/*.pid; do
        [ -e "$pidfile" ] || continue
        pid=$(cat "$pidfile" 2>/dev/null || true)
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    for pidfile in "$run"/*.pid; do
        [ -e "$pidfile" ] || continue
        pid=$(cat "$pidfile" 2>/dev/null || true)
        [ -n "$pid" ] || continue
        for i in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
}

case "$action" in
    stop)
        stop_cluster "$dir"
        exit 0
        ;;
    env)
        cat "$dir/env"
        exit 0
        ;;
    start) ;;
    *) usage ;;
esac

for tool in ceph-mon ceph-osd ceph-mgr radosgw radosgw-admin ceph ceph-authtool monmaptool rbd; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "$0: $tool not found (install ceph-mon ceph-osd ceph-mgr radosgw ceph-common)" >&2
        exit 1
    fi
done

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
if [ -n "$(ls -A "$dir")" ]; then
    echo "$0: $dir is not empty" >&2
    exit 1
fi
mkdir -p "$dir/run" "$dir/log"

fail() {
    echo "$0: $*" >&2
    local log
    for log in "$dir"/log/*.log; do
        [ -e "$log" ] || continue
        echo "--- $log" >&2
        tail -n 20 "$log" >&2
    done
    stop_cluster "$dir"
    exit 1
}

# A port nobody listens on, and none we picked already. The daemon binding it
# may still lose a race with another process: the start then fails loudly.
taken=" "
free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 40000))
        case "$taken" in *" $p "* | *" $((p + 1)) "*) continue ;; esac
        # A connection that succeeds means a listener (bash's /dev/tcp:
        # no tool needed).
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null \
            && ! (exec 3<>"/dev/tcp/127.0.0.1/$((p + 1))") 2>/dev/null; then
            taken="$taken$p $((p + 1)) "
            echo "$p"
            return
        fi
    done
}

mon_port=$(free_port)
rgw_port=$(free_port)
fsid=$(cat /proc/sys/kernel/random/uuid)
mon_host="[v2:127.0.0.1:$mon_port,v1:127.0.0.1:$((mon_port + 1))]"
conf=$dir/ceph.conf
keyring=$dir/keyring

cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = $mon_host
public addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = $dir/run
pid file = $dir/run/\$name.pid
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
log to stderr = false
err to stderr = false
crash dir = $dir/crash
exporter sock dir = $dir/run
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 1
mon warn on insecure global id reclaim allowed = false
[client]
keyring = $keyring
[mon]
mon data = $dir/\$name
keyring = $dir/\$name/keyring
[mgr]
mgr data = $dir/\$name
keyring = $dir/\$name/keyring
[osd]
osd data = $dir/\$name
keyring = $dir/\$name/keyring
osd objectstore = memstore
memstore device bytes = 4294967296
osd max object name len = 460
osd max object namespace len = 64
[client.rgw.gw]
keyring = $dir/rgw/keyring
rgw data = $dir/rgw
rgw frontends = beast endpoint=127.0.0.1:$rgw_port
rgw dns name = 127.0.0.1
EOF

export CEPH_CONF=$conf
ceph_() { timeout 60 ceph --conf "$conf" "$@"; }

ceph-authtool --create-keyring "$dir/mon-keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool --create-keyring "$keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
ceph-authtool "$dir/mon-keyring" --import-keyring "$keyring" >/dev/null
monmaptool --create --fsid "$fsid" --addv a "$mon_host" "$dir/monmap" >/dev/null

mkdir -p "$dir/mon.a"
ceph-mon --conf "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon-keyring" \
    || fail "ceph-mon --mkfs failed"
ceph-mon --conf "$conf" -i a 2>>"$dir/log/daemons.err" || fail "ceph-mon did not start"
ceph_ -s >/dev/null 2>&1 || fail "the mon does not answer"

mkdir -p "$dir/mgr.x"
ceph_ auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
    >"$dir/mgr.x/keyring" || fail "no key for mgr.x"
ceph-mgr --conf "$conf" -i x 2>>"$dir/log/daemons.err" || fail "ceph-mgr did not start"

osd_uuid=$(cat /proc/sys/kernel/random/uuid)
osd_id=$(ceph_ osd new "$osd_uuid") || fail "ceph osd new failed"
mkdir -p "$dir/osd.$osd_id"
ceph-osd --conf "$conf" -i "$osd_id" --mkfs --mkkey --no-mon-config --osd-uuid "$osd_uuid" >"$dir/log/osd-mkfs.out" 2>&1 \
    || fail "ceph-osd --mkfs failed: $(cat "$dir/log/osd-mkfs.out")"
ceph_ auth add "osd.$osd_id" osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' \
    -i "$dir/osd.$osd_id/keyring" >/dev/null 2>&1 || fail "no key for osd.$osd_id"
ceph-osd --conf "$conf" -i "$osd_id" 2>>"$dir/log/daemons.err" || fail "ceph-osd did not start"

ceph_ osd pool create rbd 8 8 >/dev/null 2>&1 || fail "pool rbd not created"
# Blocks until the pool's placement groups are active, i.e. the OSD is up.
timeout 60 rbd --conf "$conf" pool init rbd || fail "rbd pool init failed"

mkdir -p "$dir/rgw"
ceph_ auth get-or-create client.rgw.gw mon 'allow rw' osd 'allow rwx' \
    >"$dir/rgw/keyring" || fail "no key for client.rgw.gw"
radosgw --conf "$conf" -n client.rgw.gw 2>>"$dir/log/daemons.err" || fail "radosgw did not start"
access_key=$(head -c 15 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr a-f A-F | head -c 20)
secret_key=$(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n')
timeout 60 radosgw-admin --conf "$conf" user create --uid=oxqcow --display-name=oxqcow \
    --access-key="$access_key" --secret-key="$secret_key" >/dev/null \
    || fail "radosgw-admin user create failed"
ready=
for _ in $(seq 1 300); do
    # An anonymous bucket listing answers 200 once radosgw serves (bash's
    # /dev/tcp: no HTTP client needed).
    # (stderr is closed inside the substitution: a refused connection is
    # reported by the subshell, past a redirection of the assignment.)
    if status=$(exec 2>/dev/null 3<>"/dev/tcp/127.0.0.1/$rgw_port" && printf 'GET / HTTP/1.0\r\n\r\n' >&3 \
        && head -n 1 <&3) && [[ $status == "HTTP/1."?" 200"* ]]; then
        ready=1
        break
    fi
    sleep 0.1
done
[ -n "$ready" ] || fail "radosgw does not answer on 127.0.0.1:$rgw_port"

admin_key=$(ceph-authtool "$keyring" -n client.admin -p)
cat >"$dir/env" <<EOF
CEPH_CONF=$conf
CEPH_KEYRING=$keyring
CEPH_MON_HOST=$mon_host
CEPH_USER=admin
CEPH_KEY=$admin_key
RBD_POOL=rbd
S3_ENDPOINT=http://127.0.0.1:$rgw_port
S3_REGION=us-east-1
S3_ACCESS_KEY=$access_key
S3_SECRET_KEY=$secret_key
EOF
cat "$dir/env"
