# Two sites on one machine, shared by the demo and the benchmark (sourced, not run): the
# network namespaces $ctl, $prod and $dr, veth links from a bridge in $ctl to each host,
# addresses $net.254 (controller), $net.1 (production) and $net.2 (DR) that exist only
# inside them, and the token an agent prints.

# Removes the namespaces with every process in them.
sites_down() {
  for ns in $ctl $prod $dr; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
}

sites_up() {
  for ns in $ctl $prod $dr; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
  ip -n "$ctl" link add br0 type bridge
  ip -n "$ctl" addr add "$net.254/24" dev br0
  ip -n "$ctl" link set br0 up
  local i=0 ns
  for ns in $prod $dr; do
    i=$((i + 1))
    ip link add "v$i" netns "$ctl" type veth peer name eth0 netns "$ns"
    ip -n "$ctl" link set "v$i" master br0 up
    ip -n "$ns" addr add "$net.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
  done
}

# The enrolment token in an agent's output file $1, once it is there.
token() { until grep -q '^enrolment token: ' "$1"; do sleep 0.2; done; sed -n 's/^enrolment token: //p' "$1"; }
