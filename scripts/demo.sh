#!/usr/bin/env bash
# standby's main job on its defaults, both sites on this machine: a real guest writes to
# its disk while standby replicates it twice to a local DR directory; then the restore
# points are listed and verified against the guest's own record of acknowledged writes,
# and, once the guest is shut down, against its disk byte for byte.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh
bash scripts/guest/build.sh
cargo build --release --quiet --bin standby
standby="$root/target/release/standby"

work=${STANDBY_DEMO_DIR:-/tmp/standby-demo}
rm -rf "$work"
mkdir -p "$work/prod" "$work/dr"
export STANDBY_DATA_DIR="$work/data"
trap '"$standby" vm stop web >/dev/null 2>&1 || true' EXIT

say() { printf '\n== %s\n' "$*"; }

say "can VMs use KVM here? (boots the test guest under KVM; TCG if it does not boot)"
"$standby" host probe --kernel "$root/build/guest/vmlinuz" --initrd "$root/build/guest/initrd.gz"

say "production disk: 256 MiB qcow2 with 64 MiB of data"
qemu-img create -q -f qcow2 "$work/prod/web.qcow2" 256M
qemu-io -f qcow2 -c "write -P 0x5a 0 48M" -c "write -P 0xa5 128M 16M" "$work/prod/web.qcow2" >/dev/null

say "define and start the VM (test guest writes numbered, flushed records from 64 MiB on)"
"$standby" vm create web --disk "$work/prod/web.qcow2" --format qcow2 --memory 192 \
  --kernel "$root/build/guest/vmlinuz" --initrd "$root/build/guest/initrd.gz" \
  --append "console=ttyS0 quiet panic=-1 standby.workload=ledger standby.ledger_start=16384 standby.ledger_count=20000 standby.ledger_interval=20000"
"$standby" vm start web
"$standby" job create nightly --vm web --target-host local --target-dir "$work/dr" --retain 7
acked() { "$standby" vm console web | grep -c '^LEDGER [0-9]' || true; }
until [ "$(acked)" -ge 20 ]; do sleep 0.5; done

declare -a before
for run in 1 2; do
  say "replication run $run while the guest writes"
  before[$run]=$(acked)
  "$standby" job run nightly
  sleep 2
done

say "restore points"
"$standby" replica points web
"$standby" replica list

say "verify each restore point"
n=0
while read -r path; do
  n=$((n + 1))
  qemu-img check -q "$path"
  raw="$work/check.raw"
  qemu-img convert -U -O raw "$path" "$raw"
  records=$(grep -a -c 'STANDBY-LEDGER seq=' "$raw" || true)
  rm -f "$raw"
  if [ "$records" -lt "${before[$n]}" ]; then
    echo "restore point $n: only $records records, guest had ${before[$n]} acknowledged" >&2
    exit 1
  fi
  echo "restore point $n: qemu-img check clean; $records guest records, ${before[$n]} were acknowledged when the run began"
done < <("$standby" replica points web --json | python3 -c 'import json,sys; [print(p["disks"][0]["path"]) for p in json.load(sys.stdin)]')

say "shut the guest down, replicate the stopped VM, compare with its disk"
"$standby" vm shutdown web --timeout 60
"$standby" job run nightly
last=$("$standby" replica points web --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["disks"][0]["path"])')
qemu-img compare "$work/prod/web.qcow2" "$last"

# The rest of the lifecycle: the production site goes away and comes back.
newest() { "$standby" vm console "$1" | tr -d '\r' | grep '^LEDGER [0-9]' | tail -1 | awk '{print $2}'; }
records_in() {
  qemu-img convert -U -O raw "$1" "$work/check.raw"
  grep -a -c 'STANDBY-LEDGER seq=' "$work/check.raw" || true
  rm -f "$work/check.raw"
}
say "site outage: fail over to the newest restore point; the replica's guest writes on"
"$standby" failover web
until "$standby" vm console web_replica | grep -q LEDGER-RESUME; do sleep 0.5; done
resumed=$("$standby" vm console web_replica | tr -d '\r' | grep LEDGER-RESUME | awk '{print $2}')
until [ "$(newest web_replica)" -ge $((resumed + 20)) ] 2>/dev/null; do sleep 0.5; done
"$standby" replica list

say "production is back: fail back to the original disk, phase 1 while the replica serves, then the switch"
"$standby" failback web --to original --switch manual --shutdown-timeout 60
"$standby" failback list
"$standby" failback switch web
acked_replica=$(newest web_replica)
held=$(records_in "$work/prod/web.qcow2")
[ "$held" -ge "$acked_replica" ] || { echo "production holds $held records, the replica acknowledged $acked_replica" >&2; exit 1; }
echo "production disk holds $held guest records; the replica had acknowledged $acked_replica"

say "commit failback: the replica's final state is kept as a restore point; replication resumes from the switch"
"$standby" failback commit web
"$standby" vm start web
until [ "$(newest web)" -ge $((held + 10)) ] 2>/dev/null; do sleep 0.5; done
"$standby" vm shutdown web --timeout 60
"$standby" job run nightly
"$standby" replica points web
last=$("$standby" replica points web --json | python3 -c 'import json,sys; p=json.load(sys.stdin)[-1]; assert p["method"] == "cbt", p["method"]; print(p["disks"][0]["path"])')
qemu-img compare "$work/prod/web.qcow2" "$last"
"$standby" history web
echo
echo "demo complete: data in $work (STANDBY_DATA_DIR=$STANDBY_DATA_DIR)"
