#!/usr/bin/env bash
# Replication between two hosts, measured in one go on the same data: network namespaces
# for a controller, a production host and a DR host (veth links on a bridge, addresses
# that exist only inside them), a real `standby agent` on each host, and the production
# host's link shaped with `tc tbf` (1 Gbit/s, then 100 Mbit/s; this kernel has no netem).
# On each link, against a plain copy of the same bytes over one TCP socket:
#   - a full first copy of a 2 GiB disk of random data (compression none, lz4, zstd),
#   - a full first copy of a 2 GiB ext4 filesystem holding text files (the same three),
#   - an incremental run after 2% of the random disk changed in scattered 64 KiB blocks.
# The full copies are also measured with QEMU's own means over mutual TLS: qemu-nbd
# serving the disk on the production host with x509 credentials, qemu-img convert reading
# it on the DR host (no changed-block tracking across hosts: full copies only).
# Bytes on the wire are the production host's interface counters (TLS and TCP included,
# for all); CPU is both agents' (or both QEMU tools') user + system time per GiB read at
# the source.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bash scripts/install-deps.sh
cargo build --release --quiet --bin standby
standby="$root/target/release/standby"
size_mib=${BENCH_SIZE_MIB:-2048}
rates=${BENCH_RATES:-1gbit 100mbit}
work=${STANDBY_BENCH_DIR:-/tmp/standby-bench-two-sites}
net=10.231.249
ctl=sbbench-ctl prod=sbbench-prod dr=sbbench-dr
# shellcheck source=scripts/sites-lib.sh
. scripts/sites-lib.sh
sites_down
trap sites_down EXIT
rm -rf "$work"
mkdir -p "$work/prod" "$work/dr"
sites_up

ip netns exec $prod "$standby" --data-dir "$work/agent-prod" agent --listen $net.1:7400 >"$work/prod.out" 2>&1 &
prod_pid=$!
disown
ip netns exec $dr "$standby" --data-dir "$work/agent-dr" agent --listen $net.2:7400 >"$work/dr.out" 2>&1 &
dr_pid=$!
disown
c() { ip netns exec $ctl "$standby" --data-dir "$work/controller" "$@"; }
c host add prod1 --address $net.1:7400 --token "$(token "$work/prod.out")" >/dev/null
c host add dr1 --address $net.2:7400 --token "$(token "$work/dr.out")" >/dev/null
# The agents' processes (ip netns exec execs standby in place).
agent_pids="$prod_pid $dr_pid"

echo "preparing a ${size_mib} MiB disk of random data and a ${size_mib} MiB ext4 filesystem of text files..."
head -c "$((size_mib << 20))" /dev/urandom > "$work/random.raw"
qemu-img convert -O qcow2 "$work/random.raw" "$work/prod/random.qcow2"
# Text as people keep it: the Rust crates' sources and documents this build downloaded
# (real files, compressible as text is), copied in until a fifth of the filesystem is full.
python3 - "$work/text" "$((size_mib / 5))" "${CARGO_HOME:-$HOME/.cargo}/registry/src" <<'PY'
import os, shutil, sys
root, mib, corpus = sys.argv[1], int(sys.argv[2]), sys.argv[3]
os.makedirs(root)
done, n = 0, 0
for rounds in range(100):
    for dirpath, _, files in sorted(os.walk(corpus)):
        for name in sorted(files):
            if not name.endswith(('.rs', '.md', '.toml', '.txt')) or done >= mib << 20:
                continue
            src = os.path.join(dirpath, name)
            d = os.path.join(root, f"r{rounds}", f"d{n // 200:04}")
            os.makedirs(d, exist_ok=True)
            shutil.copyfile(src, os.path.join(d, f"{n:06}-{name}"))
            done, n = done + os.path.getsize(src), n + 1
    if done >= mib << 20 or n == 0:
        break
print(f"{n} text files, {done >> 20} MiB", file=sys.stderr)
PY
truncate -s "${size_mib}M" "$work/text.raw"
mkfs.ext4 -q -F -d "$work/text" "$work/text.raw"
qemu-img convert -O qcow2 "$work/text.raw" "$work/prod/text.qcow2"
rm -rf "$work/text"

for d in random text; do c vm create "$d" --host prod1 --disk "$work/prod/$d.qcow2" --format qcow2 >/dev/null; done
modes=${BENCH_MODES:-none lz4 zstd}

# What the production host sent, and the agents' CPU time (seconds), now.
tx() { ip netns exec $prod cat /sys/class/net/eth0/statistics/tx_bytes; }
cpu() {
  local t=0 pid f
  for pid in $agent_pids; do
    read -ra f < "/proc/$pid/stat"
    t=$((t + f[13] + f[14]))
  done
  echo "scale=3; $t / $(getconf CLK_TCK)" | bc -l
}
# A plain copy of the data extents of $1 (a sparse file), from the production host to a
# listener on the DR host over one TCP socket: seconds and bytes on the wire.
plain() {
  ip netns exec $dr python3 -c '
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9000)); s.listen(1); c, _ = s.accept()
while c.recv(1 << 20): pass' $net.2 &
  local rx=$! t0 b0
  sleep 0.5
  b0=$(tx); t0=$(now)
  ip netns exec $prod python3 -c '
import os, socket, sys
f = os.open(sys.argv[1], os.O_RDONLY); end = os.fstat(f).st_size
s = socket.create_connection((sys.argv[2], 9000))
off = 0
while off < end:
    try:
        off = os.lseek(f, off, os.SEEK_DATA)
    except OSError:
        break
    hole = os.lseek(f, off, os.SEEK_HOLE)
    while off < hole:
        off += os.sendfile(s.fileno(), f, off, hole - off)
s.close()' "$1" $net.2
  wait $rx
  echo "$(elapsed "$t0" "$(now)") $(($(tx) - b0))"
}
# One standby run of job $1: seconds, bytes on the wire, CPU seconds, bytes read.
run() {
  local t0 b0 c0
  b0=$(tx); c0=$(cpu); t0=$(now)
  c job run "$1" --json > "$work/run.json" 2>>"$work/runs.log"
  local t; t=$(elapsed "$t0" "$(now)")
  local read; read=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["restore_point"]["bytes_read"])' "$work/run.json")
  echo "$t $(($(tx) - b0)) $(echo "$(cpu) - $c0" | bc -l) $read"
}
verify() {
  local p; p=$(c replica points "$1" --job "$2" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["disks"][0]["path"])')
  qemu-img compare -q "$work/prod/$1.qcow2" "$p" || { echo "BENCH INVALID: $2's restore point differs from $1" >&2; exit 1; }
}
# x509 credentials for QEMU's TLS, as its tls-creds-x509 object reads them from a
# directory: a CA, a server certificate for the production host's address, a client one.
native_tls() {
  local d=$work/tls who
  mkdir -p "$d/server" "$d/client"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$d/ca-key.pem" \
    -out "$d/ca-cert.pem" -days 2 -subj "/CN=standby-bench-ca" 2>/dev/null
  for who in server client; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$d/$who/$who-key.pem" \
      -out "$d/$who.csr" -subj "/CN=$who" 2>/dev/null
    printf 'subjectAltName=IP:%s\nextendedKeyUsage=%s\n' $net.1 \
      "$([ $who = server ] && echo serverAuth || echo clientAuth)" > "$d/$who.ext"
    openssl x509 -req -in "$d/$who.csr" -CA "$d/ca-cert.pem" -CAkey "$d/ca-key.pem" -CAcreateserial \
      -out "$d/$who/$who-cert.pem" -days 2 -extfile "$d/$who.ext" 2>/dev/null
    cp "$d/ca-cert.pem" "$d/$who/"
  done
}
# CPU seconds of process $1 so far.
proc_cpu() { local f; read -ra f < "/proc/$1/stat"; echo "scale=3; $((f[13] + f[14])) / $(getconf CLK_TCK)" | bc -l; }
# A full copy of $1 (qcow2) with qemu-nbd (mutual TLS) on the production host and qemu-img
# convert on the DR host, checked identical: seconds, bytes on the wire, CPU seconds.
native() {
  local out=$work/dr/native.qcow2 pidf=$work/native.pid t0 b0 t b convert_cpu nbd_cpu
  rm -f "$out"
  ip netns exec $prod qemu-nbd --fork --persistent -r -f qcow2 -b $net.1 -p 9100 -x disk --pid-file "$pidf" \
    --object tls-creds-x509,id=tls0,endpoint=server,dir="$work/tls/server",verify-peer=on --tls-creds tls0 "$1"
  b0=$(tx); t0=$(now)
  convert_cpu=$(ip netns exec $dr python3 -c '
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(r.ru_utime + r.ru_stime)' qemu-img convert --object tls-creds-x509,id=tls0,endpoint=client,dir="$work/tls/client" \
    --image-opts "driver=nbd,host=$net.1,port=9100,export=disk,tls-creds=tls0" -O qcow2 "$out")
  t=$(elapsed "$t0" "$(now)"); b=$(($(tx) - b0))
  nbd_cpu=$(proc_cpu "$(cat "$pidf")")
  kill "$(cat "$pidf")"
  qemu-img compare -q "$1" "$out" || { echo "BENCH INVALID: qemu-img convert's copy differs from $1" >&2; exit 1; }
  rm -f "$out"
  echo "$t $b $(echo "$convert_cpu + $nbd_cpu" | bc -l)"
}
gib() { echo "scale=6; $1 / 1073741824" | bc -l; }
# Two decimals: 0.93 and 0.99 are not both ".9".
ratio() { echo "scale=2; $1 / $2" | bc -l; }
per_gib() { if [ "$2" -gt 0 ]; then echo "scale=2; $1 / $(gib "$2")" | bc -l; else echo "-"; fi; }
row() { printf '%-40s %9.2f %12s %10s %10s %10s\n' "$1" "$2" "$(mib "$3")" "$4" "$5" "$6"; }
header() {
  echo
  echo "$1"
  printf '%-40s %9s %12s %10s %10s %10s\n' "operation" "seconds" "wire (MiB)" "vs plain" "bytes" "CPU s/GiB"
}

full() {
  local d=$1 job=$2 m=$3 rate=$4 pt=$5 pb=$6
  c job create "$job" --vm "$d" --target-host dr1 --target-dir "$work/dr/$job" --compression "$m" >/dev/null
  read -r t b cs rd < <(run "$job")
  verify "$d" "$job"
  row "standby full, $m" "$t" "$b" "$(ratio "$pt" "$t")x" "$(ratio "$b" "$pb")x" "$(per_gib "$cs" "$rd")"
  results+=("$rate $d full $m $pt $t $pb $b")
}

native_tls
results=()
first=1
for rate in $rates; do
  burst=$([ "$rate" = 1gbit ] && echo 1mb || echo 256kb)
  ip netns exec $prod tc qdisc replace dev eth0 root tbf rate "$rate" burst "$burst" latency 50ms
  tag=${rate/bit/}
  # The random disk's full copy on the first link only: on a slower one it only shows the
  # link's rate, for minutes. Its jobs then run incrementally on every link.
  disks=text
  [ $first = 1 ] && disks="random text"
  for d in $disks; do
    read -r pt pb < <(plain "$work/$d.raw")
    header "$rate link: full first copy of the $d disk (plain copy: its $(mib "$pb") MiB of data extents)"
    row "plain copy over TCP" "$pt" "$pb" "1.0x" "1.0x" "-"
    for m in $modes; do
      job=$d-$m-$tag
      [ "$d" = random ] && job=random-$m
      full "$d" "$job" "$m" "$rate" "$pt" "$pb"
    done
    # The same bytes read ($rd, from the last standby run) make the CPU figures comparable.
    read -r t b cs < <(native "$work/prod/$d.qcow2")
    row "qemu-nbd TLS -> qemu-img convert" "$t" "$b" "$(ratio "$pt" "$t")x" "$(ratio "$b" "$pb")x" "$(per_gib "$cs" "$rd")"
  done
  first=0

  # 2% of the random disk in scattered 64 KiB blocks, each block distinct random bytes.
  blocks=$((size_mib * 16)); changes=$((blocks / 50))
  python3 - "$blocks" "$changes" "$work" "$tag" <<'PY' > "$work/changes.txt"
import os, random, sys
blocks, n, work, tag = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
r = random.Random(hash(tag) & 0xffff)
with open(f"{work}/changed.raw", "wb") as out:
    for i, b in enumerate(sorted(r.sample(range(blocks), n))):
        data = os.urandom(65536)
        with open(f"{work}/blk", "wb") as f:
            f.write(data)
        os.replace(f"{work}/blk", f"{work}/blk{i}")
        out.write(data)
        print(f"write -s {work}/blk{i} {b * 65536} 64k")
PY
  args=()
  while read -r cmd; do args+=(-c "$cmd"); done < "$work/changes.txt"
  qemu-io -f qcow2 "${args[@]}" "$work/prod/random.qcow2" >/dev/null
  rm -f "$work"/blk*
  read -r pt pb < <(plain "$work/changed.raw")
  header "$rate link: incremental run after $changes scattered 64 KiB blocks changed ($(mib $((changes * 65536))) MiB, random)"
  row "plain copy over TCP (the changed bytes)" "$pt" "$pb" "1.0x" "1.0x" "-"
  for m in $modes; do
    read -r t b cs rd < <(run "random-$m")
    verify random "random-$m"
    method=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["restore_point"]["method"])' "$work/run.json")
    [ "$method" = cbt ] || { echo "BENCH INVALID: run of random-$m was $method, not cbt" >&2; exit 1; }
    row "standby cbt, $m" "$t" "$b" "$(ratio "$pt" "$t")x" "$(ratio "$b" "$pb")x" "$(per_gib "$cs" "$rd")"
    results+=("$rate random cbt $m $pt $t $pb $b")
  done
  ip netns exec $prod tc qdisc del dev eth0 root
done

echo
echo "vs plain: the plain copy's time over standby's (higher is faster); bytes: standby's bytes on the wire over the plain copy's"
for r in "${results[@]}"; do
  read -r rate d kind m pt t pb b <<< "$r"
  if [ "$m" = none ] && [ "$d" = random ]; then
    echo "target none >= 90% of plain throughput ($rate, $kind): $(pass "$pt >= 0.9 * $t")"
  fi
  if [ "$m" = zstd ] && [ "$d" = text ]; then
    echo "target zstd >= 2x fewer bytes than plain ($rate, text, $kind): $(pass "2 * $b <= $pb")"
  fi
done
echo "every restore point verified identical to its source with qemu-img compare"
