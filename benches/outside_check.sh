#!/usr/bin/env bash
# Checks parse.py's `outside_pct` (CPU the machine spent beside the benchmark's own processes)
# on this machine: a 3 s loopback iperf3 measured alone, then beside a busy loop that is not
# the benchmark's. Alone it should read near 0 %; beside the loop, near the loop's share (up to
# a core: 50 % of two). Needs iperf3; uses 127.0.0.1:15202.
set -euo pipefail
cd "$(dirname "$0")"
command -v iperf3 >/dev/null || { echo "needs iperf3 (apt-get install iperf3)" >&2; exit 1; }
measure() (
  export BENCH_ROOT_PID=$BASHPID
  iperf3 -s -p 15202 -1 >/dev/null 2>&1 &
  sleep 0.3
  b=$(head -1 /proc/stat)
  ob=$(python3 -c 'import parse; print(parse.own_ticks())')
  iperf3 -c 127.0.0.1 -p 15202 -t 3 >/dev/null
  oa=$(python3 -c 'import parse; print(parse.own_ticks())')
  a=$(head -1 /proc/stat)
  wait
  OWN_TICKS="$ob|$oa" CPU_STAT="$b|$a" python3 -c '
import os, parse
m = {}
parse.machine_cpu(m, os.environ["CPU_STAT"])
print("outside %s %% (unclamped %s %%), idle %s %%" % (m["outside_pct"], m["outside_raw_pct"], m["idle_pct"]))'
)
echo "alone:              $(measure)"
bash -c 'end=$((SECONDS + 6)); while ((SECONDS < end)); do :; done' &
loop=$!
trap 'kill "$loop" 2>/dev/null || true' EXIT
sleep 0.5
echo "beside a busy loop: $(measure)"
