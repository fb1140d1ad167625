#!/usr/bin/env bash
# Failover benchmark: time from `standby failover` to the replicas' QEMU running (the
# command returns once each replica's QEMU runs), for 1 VM and for a batch of 10 VMs.
# The VMs have no guest, so guest boot is excluded, as the targets ask.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bash scripts/install-deps.sh
cargo build --release --quiet --bin standby
standby="$root/target/release/standby"
work=${STANDBY_BENCH_DIR:-/tmp/standby-bench-failover}
rm -rf "$work"
mkdir -p "$work/prod" "$work/dr"
export STANDBY_DATA_DIR="$work/data" STANDBY_ACCEL=tcg
vms=()
for i in $(seq 0 9); do
  qemu-img create -q -f qcow2 "$work/prod/v$i.qcow2" 256M
  qemu-io -f qcow2 -c "write -P $((i + 1)) 0 16M" "$work/prod/v$i.qcow2" >/dev/null
  "$standby" vm create "v$i" --disk "$work/prod/v$i.qcow2" --memory 64 >/dev/null
  vms+=("v$i")
done
job=(job create site --target-host local --target-dir "$work/dr")
for v in "${vms[@]}"; do job+=(--vm "$v"); done
"$standby" "${job[@]}" >/dev/null
"$standby" job run site >/dev/null 2>&1

best() { # best of 3: the command's own time to all replicas running
  local b=999
  for _ in 1 2 3; do
    local t0; t0=$(now)
    "$standby" failover "$@" >/dev/null
    local t; t=$(elapsed "$t0" "$(now)")
    "$standby" failover undo "$@" >/dev/null
    b=$(echo "if ($t < $b) $t else $b" | bc -l)
  done
  echo "$b"
}
one=$(best v0)
ten=$(best "${vms[@]}")
running_check() { [ "$("$standby" vm list --json | grep -c '"state": "running"')" -eq "$1" ]; }
"$standby" failover "${vms[@]}" >/dev/null
running_check 10 || { echo "BENCH INVALID: not all 10 replicas run" >&2; exit 1; }
"$standby" failover undo "${vms[@]}" >/dev/null

echo
echo "failover benchmark: from 'standby failover' to the replica's QEMU running (best of 3, no guest boot)"
printf '%-32s %10s %10s %8s\n' "case" "seconds" "target" "result"
printf '%-32s %10.3f %10s %8s\n' "1 VM" "$one" "< 1 s" "$(pass "$one < 1")"
printf '%-32s %10.3f %10s %8s\n' "batch of 10 VMs (in parallel)" "$ten" "< 3 s" "$(pass "$ten < 3")"
