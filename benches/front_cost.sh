#!/usr/bin/env bash
# front_cost.sh - the gateway's CPU instructions per request through the HTTP front, counted by
# callgrind: deterministic where req/s on a shared 2-core VM is not (the same binary measured
# 17.6k-26.6k req/s from one wrk run to the next). Instructions leave out the kernel, wake-ups
# and cache effects, so this complements run.sh; it does not replace it.
#
# The gateway runs under `valgrind --tool=callgrind`; the node agent and an nginx backend run
# natively; h2load sends N1 then (fresh gateway) N2 keep-alive GETs through the front. The
# difference of the two totals over N2-N1 is the cost of one request, start-up excluded.
#
# Usage: benches/front_cost.sh [ZONEGATE_BINARY...]   (default: cargo build --release)
#   N1=2000 N2=12000 CLIENTS=16    requests of the two runs; h2load clients
#   KEEP_OUT=dir                   keep the callgrind.out files there (callgrind_annotate them)
#   WHO=node                       count the node agent's instructions instead (the gateway
#                                  then runs natively)
# Prints, per binary: "instructions/request <gateway|node> <binary> <count>".
# Needs: valgrind, h2load, nginx, python3. Runs in a private network namespace (root).
set -euo pipefail

WHO=${WHO:-gateway}
N1=${N1:-2000}
N2=${N2:-12000}
CLIENTS=${CLIENTS:-16}
# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"

if ! in_netns "$@"; then
  need_tools valgrind h2load nginx python3 unshare
  if (($# == 0)); then
    build_zonegate
    set -- "$ZONEGATE"
  fi
  bins=()
  for b in "$@"; do bins+=("$(realpath "$b")"); done
  export N1 N2 CLIENTS KEEP_OUT WHO
  enter_netns "$0" "${bins[@]}"
fi

# ---- inside the private namespace ----
shift
netns_init
nginx_backend
port_ready 8000

# run BINARY N - total instructions of a gateway that served N requests through the front.
# Called in this shell, its output to a file, not in `$(...)`: a subshell's `start` records the
# valgrind processes' PIDs where the exit trap never sees them (left running after a failure),
# and `set -e` is off in a command substitution.
run() {
  local bin=$1 n=$2 dir=$tmp/run-$RANDOM out
  ZONEGATE=$bin
  zone_create "$dir" bench.example gw=127.0.0.1:4433 n1
  cat >"$dir/devices/gw/policies/bench.toml" <<'EOF'
[app.web]
http = { host = "bench.example" }
to = "n1/http"
allow = { from = ["public"] }
EOF
  local conf=$dir/devices/gw/gateway.toml
  front_only "$conf"
  out=$dir/callgrind.out
  local cg=(valgrind --tool=callgrind --callgrind-out-file="$out") gw=() node=()
  if [[ $WHO == node ]]; then node=("${cg[@]}"); else gw=("${cg[@]}"); fi
  start cg-gateway "${gw[@]}" "$bin" gateway --config "$conf"
  start cg-node "${node[@]}" "$bin" node --config "$dir/devices/n1/node.toml" --service http=127.0.0.1:8000
  wait_agents 127.0.0.1:9090 1 120 >&2
  http_ready http://127.0.0.1:18080/ bench.example 60 >&2
  h2load --h1 -c"$CLIENTS" -n "$n" -H ':authority: bench.example' http://127.0.0.1:18080/ >"$dir/h2.out"
  grep -q "$n succeeded, 0 failed" "$dir/h2.out" || { cat "$dir/h2.out" >&2; exit 1; }
  stop cg-node || true
  stop cg-gateway || true
  [[ -n ${KEEP_OUT:-} ]] && mkdir -p "$KEEP_OUT" && cp "$out" "$KEEP_OUT/callgrind.$WHO.$(basename "$bin").$n.out"
  # the "totals:" line callgrind writes at the end of its output file
  awk '/^totals:/ { print $2 }' "$out"
}

for bin in "$@"; do
  run "$bin" "$N1" >"$tmp/total"
  a=$(<"$tmp/total")
  run "$bin" "$N2" >"$tmp/total"
  b=$(<"$tmp/total")
  echo "instructions/request $WHO $bin $(((b - a) / (N2 - N1)))"
done
