# Helpers the benchmark scripts share (sourced, not run).
now() { date +%s.%N; }
elapsed() { echo "$2 - $1" | bc -l; }
# Empties the page cache before a measurement when allowed; `cache` says which it was.
cold() {
  sync
  if echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then cache=cold; else cache=warm; fi
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }
ratio() { echo "scale=1; $1 / $2" | bc -l; }
pass() { if [ "$(echo "$1" | bc -l)" = 1 ]; then echo PASS; else echo FAIL; fi; }
mib() { echo "scale=1; $1 / 1048576" | bc -l; }
