#!/usr/bin/env bash
# Two sites on one machine: network namespaces for a controller, a production host and a
# DR host (veth links on a bridge in the controller's namespace, addresses that exist only
# inside them), a real `standby agent` on each host, and the lifecycle across them:
# replication of a running guest, failover, failback to the original, commit. Everything
# the namespaces hold is removed at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh
bash scripts/guest/build.sh
cargo build --release --quiet --bin standby
standby="$root/target/release/standby"

work=${STANDBY_DEMO_DIR:-/tmp/standby-two-sites}
net=10.231.250
ctl=sbdemo-ctl prod=sbdemo-prod dr=sbdemo-dr
# shellcheck source=scripts/sites-lib.sh
. scripts/sites-lib.sh
sites_down
trap sites_down EXIT
rm -rf "$work"
mkdir -p "$work/prod" "$work/dr"
say() { printf '\n== %s\n' "$*"; }

say "network: controller $net.254, production $net.1, DR $net.2 (namespaces $ctl, $prod, $dr)"
sites_up

say "an agent on each host"
# Disowned: their end, when the namespaces go, is expected and not reported.
ip netns exec $prod "$standby" --data-dir "$work/agent-prod" agent --listen $net.1:7400 >"$work/prod.out" &
disown
ip netns exec $dr "$standby" --data-dir "$work/agent-dr" agent --listen $net.2:7400 >"$work/dr.out" &
disown
c() { ip netns exec $ctl "$standby" --data-dir "$work/controller" "$@"; }
c host add prod1 --address $net.1:7400 --token "$(token "$work/prod.out")"
c host add dr1 --address $net.2:7400 --token "$(token "$work/dr.out")"
c host list

say "a VM on prod1, replicated to dr1 while its guest writes"
qemu-img create -q -f qcow2 "$work/prod/web.qcow2" 256M
c vm create web --host prod1 --disk "$work/prod/web.qcow2" --format qcow2 --memory 192 \
  --kernel "$root/build/guest/vmlinuz" --initrd "$root/build/guest/initrd.gz" \
  --append "console=ttyS0 quiet panic=-1 standby.workload=ledger standby.ledger_start=16384 standby.ledger_count=20000 standby.ledger_interval=20000"
c vm start web
c job create nightly --vm web --target-host dr1 --target-dir "$work/dr"
acked() { c vm console "$1" >"$work/console.txt"; grep -c '^LEDGER [0-9]' "$work/console.txt" || true; }
until [ "$(acked web)" -ge 20 ]; do sleep 0.5; done
c job run nightly
sleep 2
c job run nightly
c vm shutdown web --timeout 60
c job run nightly
c replica points web
last=$(c replica points web --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["disks"][0]["path"])')
qemu-img compare "$work/prod/web.qcow2" "$last"

say "the production site is lost: fail over to dr1"
c failover web
until c vm console web_replica >"$work/console.txt" && grep -q LEDGER-RESUME "$work/console.txt"; do sleep 0.5; done
c replica list

say "production is back: fail back to the original disk on prod1, switch, commit"
c failback web --to original --switch manual --shutdown-timeout 30
c failback switch web
c failback commit web
c job run nightly
last=$(c replica points web --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["disks"][0]["path"])')
qemu-img compare "$work/prod/web.qcow2" "$last"
c history web
echo
echo "two-site demo complete: files in $work; the namespaces are removed on exit"
