#!/usr/bin/env bash
# A/B of two builds of the DNS example server over UDP (benches/dns.md): copy them to
# /tmp/dns-serve-before and /tmp/dns-serve-after, write /tmp/q.txt (benches/dns.md), then run this.
set -euo pipefail
command -v dig >/dev/null && command -v dnsperf >/dev/null || { echo "needs dig and dnsperf" >&2; exit 1; }
pid=
# The server ends with the script, however it ends: one left bound to 5353 would answer the
# next run's queries in place of the build it names.
trap '[[ -n $pid ]] && kill "$pid" 2>/dev/null; true' EXIT
for round in 1 2; do
# Whoever runs first in a round reads higher on this VM: the order alternates.
order=(before after)
(( round % 2 == 0 )) && order=(after before)
for v in "${order[@]}"; do
  if dig +time=1 +tries=1 -p 5353 @127.0.0.1 example >/dev/null 2>&1; then
    echo "something already answers on 127.0.0.1:5353: stop it first" >&2
    exit 1
  fi
  /tmp/dns-serve-$v 127.0.0.1:5353 --nodes 20 --queries /tmp/q.txt > /tmp/dns-$v.log 2>&1 &
  pid=$!
  for _ in $(seq 50); do
    dig +time=1 +tries=1 -p 5353 @127.0.0.1 example >/dev/null 2>&1 && break
    sleep 0.1
  done
  out=$(dnsperf -s 127.0.0.1 -p 5353 -d /tmp/q.txt -l 8 -c 4 -T 1 -q 200 2>&1)
  qps=$(awk '/Queries per second/ {print $4}' <<<"$out")
  lost=$(awk '/Queries lost/ {print $3}' <<<"$out")
  echo "round $round $v udp-mix qps=$qps lost=${lost:-?}"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  pid=
done
done
