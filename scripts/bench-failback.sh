#!/usr/bin/env bash
# Failback benchmark, measured in one go on the same data: a 4 GiB disk of random data is
# replicated and failed over; the running replica then has about 1% of the disk changed in
# scattered 64 KiB blocks. Failback phase 1 to the original disk is measured with
#   - quick rollback (the difference from standby's metadata),
#   - digest comparison (the same failback after the source's bitmap was removed),
#   - rsync -I --inplace --no-whole-file of the replica's state (as a raw image) onto the
#     production disk (as a raw image): the baseline.
# Each standby round is undone before the next (undo before the switch discards only the
# working layer), and every round's working layer is compared with the replica's state.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bash scripts/install-deps.sh
cargo build --release --quiet --bin standby
standby="$root/target/release/standby"
size_mib=${BENCH_SIZE_MIB:-4096}
rounds=${BENCH_ROUNDS:-3}
work=${STANDBY_BENCH_DIR:-/tmp/standby-bench-failback}
rm -rf "$work"
mkdir -p "$work/prod" "$work/dr" "$work/rsync"
export STANDBY_DATA_DIR="$work/data" STANDBY_ACCEL=tcg
src="$work/prod/disk.qcow2"

row() { "$standby" failback list --json | python3 -c "import json,sys; r=json.load(sys.stdin)[0]; print(r$1)"; }

echo "preparing a ${size_mib} MiB disk of random data, its replica and a failover..."
head -c "$((size_mib << 20))" /dev/urandom > "$work/prod/disk.raw"
qemu-img convert -O qcow2 "$work/prod/disk.raw" "$src"
rm -f "$work/prod/disk.raw"
"$standby" vm create bench --disk "$src" --memory 64 >/dev/null
"$standby" job create j --vm bench --target-host local --target-dir "$work/dr" >/dev/null
"$standby" job run j >/dev/null 2>&1
"$standby" failover bench >/dev/null
"$standby" vm stop bench_replica >/dev/null

# About 1% of the disk, scattered 64 KiB blocks (seeded: the same every time), written
# on the replica during failover.
blocks=$((size_mib * 16))
changes=$((blocks / 100))
python3 - "$blocks" "$changes" > "$work/changes.txt" <<'PY'
import random, sys
blocks, n = int(sys.argv[1]), int(sys.argv[2])
r = random.Random(7)
for b in sorted(r.sample(range(blocks), n)):
    print(f"write -P {r.randrange(1, 256)} {b * 65536} 64k")
PY
args=()
while read -r c; do args+=(-c "$c"); done < "$work/changes.txt"
qemu-io -f qcow2 "${args[@]}" "$work/dr/bench/failover-d0.qcow2" >/dev/null
"$standby" vm start bench_replica >/dev/null

# The replica's state and the production disk as raw files, for rsync.
qemu-img convert -U -O raw "$work/dr/bench/failover-d0.qcow2" "$work/rsync/replica.raw"
qemu-img convert -O raw "$src" "$work/rsync/prod.raw"

phase1() { # $1: expected method; prints seconds
  cold
  local t0 t1 top
  t0=$(now)
  "$standby" failback bench --to original --switch manual >/dev/null 2>&1
  t1=$(now)
  [ "$(row "['method']")" = "$1" ] || { echo "BENCH INVALID: method $(row "['method']"), not $1" >&2; exit 1; }
  top=$("$standby" vm show bench_replica --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["disks"][0]["path"])')
  # The working layer over the production disk must read as the replica did at phase 1:
  # the overlay generation below its new top.
  local frozen
  frozen=$(python3 -c 'import re,sys; p=sys.argv[1]; m=re.search(r"\.g(\d+)\.qcow2$", p); g=int(m.group(1))-1; print(p[:m.start()] + ("" if g == 0 else f".g{g}") + ".qcow2")' "$top")
  qemu-img compare -q -U "$src.failback-r1.qcow2" "$frozen" ||
    { echo "BENCH INVALID: the working layer differs from the replica" >&2; exit 1; }
  echo "$(elapsed "$t0" "$t1") $(row "['phase1']['read']")" >> "$work/$1.txt"
  "$standby" failback undo bench >/dev/null
}

r_rsync=()
for round in $(seq 1 "$rounds"); do
  cp "$work/rsync/prod.raw" "$work/rsync/target.raw"
  cold; t0=$(now)
  rsync -I --inplace --no-whole-file "$work/rsync/replica.raw" "$work/rsync/target.raw"
  r_rsync+=("$(elapsed "$t0" "$(now)")")
  cmp -s "$work/rsync/replica.raw" "$work/rsync/target.raw" || { echo "BENCH INVALID: rsync result differs" >&2; exit 1; }
done
rm -f "$work/rsync/target.raw"
# What digest mode must read at least: the production disk and the replica's chain, once.
r_read=()
for round in $(seq 1 "$rounds"); do
  cold; t0=$(now); cat "$src" "$work"/dr/bench/*.qcow2 > /dev/null; r_read+=("$(elapsed "$t0" "$(now)")")
done
for round in $(seq 1 "$rounds"); do phase1 quick; done
# Without the source's bitmap standby cannot trust its metadata: digest comparison.
for b in $(qemu-img info --output=json "$src" | python3 -c 'import json,sys; [print(b["name"]) for b in json.load(sys.stdin)["format-specific"]["data"].get("bitmaps", [])]'); do
  qemu-img bitmap --remove "$src" "$b"
done
for round in $(seq 1 "$rounds"); do phase1 digest; done
"$standby" vm stop bench_replica >/dev/null

t_rsync=$(median "${r_rsync[@]}"); t_read=$(median "${r_read[@]}")
mapfile -t q < <(cut -d' ' -f1 "$work/quick.txt"); t_quick=$(median "${q[@]}")
mapfile -t d < <(cut -d' ' -f1 "$work/digest.txt"); t_digest=$(median "${d[@]}")
read_quick=$(head -1 "$work/quick.txt" | cut -d' ' -f2)
read_digest=$(head -1 "$work/digest.txt" | cut -d' ' -f2)
echo
echo "failback phase 1 benchmark: ${size_mib} MiB disk, $changes scattered 64 KiB blocks ($(mib $((changes * 65536))) MiB) changed on the replica,"
echo "$cache page cache, median of $rounds rounds (rsync: ${r_rsync[*]}; quick: ${q[*]}; digest: ${d[*]})"
printf '%-46s %10s %14s %12s\n' "operation" "seconds" "read (MiB)" "vs rsync"
printf '%-46s %10.2f %14s %12s\n' "rsync -I --inplace --no-whole-file (raw)" "$t_rsync" "-" "1.0x"
printf '%-46s %10.2f %14s %11sx\n' "standby failback phase 1, quick rollback" "$t_quick" "$(mib "$read_quick")" "$(ratio "$t_rsync" "$t_quick")"
printf '%-46s %10.2f %14s %11sx\n' "standby failback phase 1, digest" "$t_digest" "$(mib "$read_digest")" "$(ratio "$t_rsync" "$t_digest")"
printf '%-46s %10.2f %14s %12s\n' "read production disk + replica chain once (cat)" "$t_read" "-" "-"
echo
echo "target quick rollback >= 50x faster than rsync: $(pass "$t_rsync >= 50 * $t_quick")"
echo "target digest no slower than rsync:             $(pass "$t_digest <= $t_rsync")"
echo "every round's working layer verified identical to the replica with qemu-img compare"
