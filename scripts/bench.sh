#!/usr/bin/env bash
# Replication benchmark, measured in one go on the same data: a 2 GiB disk of random data
# with about 2% of it changed in scattered 64 KiB blocks, sent to the DR side by
#   - standby with changed-block tracking (CBT),
#   - standby with digest comparison (the same change, its bitmap removed first),
#   - rsync -I --inplace --no-whole-file of the same image (the baseline),
# and the time to read the source and the DR image once, which bounds digest mode.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bash scripts/install-deps.sh
cargo build --release --quiet --bin standby
standby="$root/target/release/standby"
size_mib=${BENCH_SIZE_MIB:-2048}
work=${STANDBY_BENCH_DIR:-/tmp/standby-bench}
rm -rf "$work"
mkdir -p "$work/prod" "$work/dr-cbt" "$work/dr-digest"
export STANDBY_DATA_DIR="$work/data" STANDBY_ACCEL=tcg
src="$work/prod/disk.qcow2"


echo "preparing a ${size_mib} MiB disk of random data..."
head -c "$((size_mib << 20))" /dev/urandom > "$work/prod/disk.raw"
qemu-img convert -O qcow2 "$work/prod/disk.raw" "$src"
rm -f "$work/prod/disk.raw"
"$standby" vm create bench --disk "$src" >/dev/null
"$standby" job create cbt --vm bench --target-host local --target-dir "$work/dr-cbt" >/dev/null
"$standby" job create digest --vm bench --target-host local --target-dir "$work/dr-digest" >/dev/null
t0=$(now); "$standby" job run cbt 2>/dev/null; t_full=$(elapsed "$t0" "$(now)")
"$standby" job run digest >/dev/null 2>&1
cp "$src" "$work/rsync-target.qcow2"

# Each round changes ~2% of the disk in scattered 64 KiB blocks (seeded: the same rounds
# every time), then measures every method on that same change; medians are reported.
rounds=${BENCH_ROUNDS:-3}
blocks=$((size_mib * 16))
changes=$((blocks / 50))
changed=$((changes * 65536))
field() { python3 -c "import json,sys; o=json.load(open('$1'))[0]['restore_point']; print(o['$2'])"; }
r_rsync=(); r_cbt=(); r_digest=(); r_read=()
for round in $(seq 1 "$rounds"); do
  python3 - "$blocks" "$changes" "$round" > "$work/changes.txt" <<'PY'
import random, sys
blocks, n, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
r = random.Random(41 + seed)
for b in sorted(r.sample(range(blocks), n)):
    print(f"write -P {r.randrange(1, 256)} {b * 65536} 64k")
PY
  args=()
  while read -r c; do args+=(-c "$c"); done < "$work/changes.txt"
  qemu-io -f qcow2 "${args[@]}" "$src" >/dev/null
  # The digest job's replica must not trust a bitmap: remove it, as after a crash.
  for b in $(qemu-img info --output=json "$src" | python3 -c 'import json,sys; [print(b["name"]) for b in json.load(sys.stdin)["format-specific"]["data"].get("bitmaps", [])]'); do
    case "$b" in standby-r2-*) qemu-img bitmap --remove "$src" "$b" ;; esac
  done
  cold; t0=$(now); rsync -I --inplace --no-whole-file "$src" "$work/rsync-target.qcow2"; r_rsync+=("$(elapsed "$t0" "$(now)")")
  cold; t0=$(now); "$standby" job run cbt --json > "$work/cbt.json" 2>/dev/null; r_cbt+=("$(elapsed "$t0" "$(now)")")
  cold; t0=$(now); "$standby" job run digest --json > "$work/digest.json" 2>/dev/null; r_digest+=("$(elapsed "$t0" "$(now)")")
  # Both images once: the source, and every layer of the previous restore point's chain
  # (the DR directory's files but the newest, which this run wrote).
  prev_chain=$(ls "$work/dr-digest/bench/"*.qcow2 | sort | head -n -1)
  # shellcheck disable=SC2086
  cold; t0=$(now); cat "$src" $prev_chain > /dev/null; r_read+=("$(elapsed "$t0" "$(now)")")
  for job in cbt digest; do
    p=$("$standby" replica points bench --job "$job" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["disks"][0]["path"])')
    qemu-img compare -q "$src" "$p" || { echo "BENCH INVALID: $job restore point differs from the source" >&2; exit 1; }
  done
  [ "$(field "$work/cbt.json" method)" = cbt ] && [ "$(field "$work/digest.json" method)" = digest ] ||
    { echo "BENCH INVALID: unexpected transfer methods" >&2; exit 1; }
done
t_rsync=$(median "${r_rsync[@]}"); t_cbt=$(median "${r_cbt[@]}"); t_digest=$(median "${r_digest[@]}"); t_read=$(median "${r_read[@]}")
m_cbt=cbt; b_cbt=$(field "$work/cbt.json" bytes_transferred)
m_digest=digest; b_digest=$(field "$work/digest.json" bytes_transferred)

echo
echo "replication benchmark: ${size_mib} MiB disk, $changes scattered 64 KiB blocks changed ($(mib $changed) MiB) per round,"
echo "$cache page cache, median of $rounds rounds (rsync: ${r_rsync[*]}; cbt: ${r_cbt[*]}; digest: ${r_digest[*]})"
printf '%-42s %10s %14s %12s\n' "operation" "seconds" "sent (MiB)" "vs rsync"
printf '%-42s %10.2f %14s %12s\n' "rsync -I --inplace --no-whole-file" "$t_rsync" "-" "1.0x"
printf '%-42s %10.2f %14s %11sx\n' "standby incremental, $m_cbt" "$t_cbt" "$(mib "$b_cbt")" "$(ratio "$t_rsync" "$t_cbt")"
printf '%-42s %10.2f %14s %11sx\n' "standby incremental, $m_digest" "$t_digest" "$(mib "$b_digest")" "$(ratio "$t_rsync" "$t_digest")"
printf '%-42s %10.2f %14s %12s\n' "read source + DR image once (cat)" "$t_read" "-" "-"
printf '%-42s %10.2f %14s %12s\n' "(first run, full copy)" "$t_full" "-" "-"
echo
echo "target CBT >= 20x faster than rsync:        $(pass "$t_rsync >= 20 * $t_cbt")"
echo "target digest no slower than rsync:          $(pass "$t_digest <= $t_rsync")"
echo "target digest within 2x of reading both:     $(pass "$t_digest <= 2 * $t_read")"
echo "every round's restore points verified identical to the source with qemu-img compare"
