#!/usr/bin/env bash
# Growth benchmark, in one go on the same data: `standby replica list` with a short history
# and with 100,000 history rows for the listed VM, against the baseline of reading that
# VM's whole history (what `replica list` did per VM before it asked for the last entry).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bash scripts/install-deps.sh
cargo build --release --quiet --bin standby
standby="$root/target/release/standby"
rows=${BENCH_HISTORY_ROWS:-100000}
work=${STANDBY_BENCH_DIR:-/tmp/standby-bench-history}
rm -rf "$work"
mkdir -p "$work/src"
export STANDBY_DATA_DIR="$work/data"
qemu-img create -q -f qcow2 "$work/src/h.qcow2" 16M
"$standby" vm create h --disk "$work/src/h.qcow2" --format qcow2 >/dev/null
"$standby" job create j --vm h --target-host local --target-dir "$work/dr" >/dev/null
"$standby" job run j >/dev/null 2>&1

best() { # best of 5, milliseconds
  local b=999999
  for _ in 1 2 3 4 5; do
    local t0; t0=$(now)
    "$standby" "$@" >/dev/null
    local t; t=$(echo "($(now) - $t0) * 1000" | bc -l)
    b=$(echo "if ($t < $b) $t else $b" | bc -l)
  done
  echo "$b"
}
short=$(best replica list)
python3 - "$work/data/standby.db" "$rows" <<'PY'
import sqlite3, sys
db, n = sys.argv[1], int(sys.argv[2])
c = sqlite3.connect(db)
c.executemany(
    "INSERT INTO history (at, vm, operation, command, result, detail) VALUES (?, 'h', 'replication', 'bench', 'ok', ?)",
    (("2026-01-01T00:00:00Z", f"restore point {i}") for i in range(n)),
)
c.commit()
PY
count=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute(\"SELECT COUNT(*) FROM history WHERE vm='h'\").fetchone()[0])" "$work/data/standby.db")
long=$(best replica list)
whole=$(best history h --limit "$count" --json)

echo
echo "growth benchmark: standby replica list, one VM, best of 5"
printf '%-52s %12s\n' "case" "ms"
printf '%-52s %12.1f\n' "replica list, short history" "$short"
printf '%-52s %12.1f\n' "replica list, $count history rows" "$long"
printf '%-52s %12.1f\n' "baseline: reading the VM's whole history ($count rows)" "$whole"
printf '%-52s %12s\n' "replica list within 2x of the short-history case" "$(pass "$long < 2 * $short + 5")"
