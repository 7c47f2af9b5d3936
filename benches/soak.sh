#!/usr/bin/env bash
# soak.sh - issue 10's soak: SOAK_SECS (default 10 minutes) of mixed load through one gateway
# and two node agents on loopback, all at once, with the gateway's and agents' RSS sampled
# every SAMPLE seconds and every error counted.
#
# Zone soak.example: gateway gw (QUIC 4433, HTTP front 18080, DNS 5353, admin 9090); node n1
# offers http (nginx, tiny static answer), iperf (iperf3 -s) and echo (UDP echo); node n2 has a
# mesh forward 127.0.0.1:9100 -> n1/http. Load, concurrently, until the end:
#   http    keep-alive HTTP/1.1 via the front: wrk -t1 -c$HTTP_CONNS, in $CHUNK s runs
#   conn    new connections via a tcp app: wrk -t1 -c$CONN_CONNS -H 'Connection: close'
#   bulk    every $IPERF_EVERY s an iperf3 burst of $IPERF_SECS s at $IPERF_RATE, up/down alternating
#   udp     UDP app echo: $UDP_RATE datagrams/s, each must come back
#   dns     dnsperf -Q $DNS_QPS (A/SOA/NS in the zone, all NOERROR)
#   checks  every sample: GET via the front, GET via the mesh forward, both agents listed in
#           the gateway's /status, the zone TXT over DNS/TCP (dig)
# Errors: wrk socket errors and non-2xx answers, failed iperf3 runs, lost DNS queries and
# non-NOERROR answers, UDP outages (a second in which no echo came back), failed checks, and
# ERROR lines in the zonegate logs. RSS growth = last sample against the first sample after
# WARMUP_SECS. Pass: zero errors and every process under 10% growth.
#
# Usage: benches/soak.sh       (SOAK_SECS=60 for a short check)
#   SOAK_SECS=600 WARMUP_SECS=60 SAMPLE=10 CHUNK=30 HTTP_CONNS=16 CONN_CONNS=8
#   IPERF_EVERY=30 IPERF_SECS=5 IPERF_RATE=500M UDP_RATE=50 DNS_QPS=200
#   ZONEGATE=path (default: cargo build --release); N1_WRAP='heaptrack -o FILE' (profile n1);
#   OUT=dir (default benches/results);
#   REPORT=0 skips rewriting benches/SOAK.md; KEEP_TMP=1 keeps logs
# Writes OUT/soak-<date>.json (samples and every load run), then benches/soak_report.py ->
# benches/SOAK.md and benches/soak.svg. Exit status 1 if the soak failed.
# shellcheck disable=SC2317 # the load loops below run through start(), which shellcheck cannot follow
set -euo pipefail

SOAK_SECS=${SOAK_SECS:-600}
if [[ -z ${WARMUP_SECS:-} ]]; then
  WARMUP_SECS=60
  ((SOAK_SECS >= 240)) || WARMUP_SECS=$((SOAK_SECS / 4))
fi
SAMPLE=${SAMPLE:-10}
CHUNK=${CHUNK:-30}
HTTP_CONNS=${HTTP_CONNS:-16}
CONN_CONNS=${CONN_CONNS:-8}
IPERF_EVERY=${IPERF_EVERY:-30}
IPERF_SECS=${IPERF_SECS:-5}
IPERF_RATE=${IPERF_RATE:-500M}
UDP_RATE=${UDP_RATE:-50}
DNS_QPS=${DNS_QPS:-200}
REPORT=${REPORT:-1}
# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-$bench_dir/results}

if ! in_netns "$@"; then
  need_tools python3 unshare iperf3 wrk nginx dnsperf dig
  build_zonegate
  mkdir -p "$OUT"
  OUT=$(realpath "$OUT")
  export N1_WRAP SOAK_SECS WARMUP_SECS SAMPLE CHUNK HTTP_CONNS CONN_CONNS IPERF_EVERY IPERF_SECS \
    IPERF_RATE UDP_RATE DNS_QPS REPORT OUT
  enter_netns "$0"
fi

# ---- inside the private namespace ----
netns_init
runs=$tmp/runs.jsonl
samples=$tmp/samples.jsonl
: >"$runs"
: >"$samples"
parse() { python3 "$bench_dir/parse.py" "$@"; }
tools() { python3 "$bench_dir/soak_tools.py" "$@"; }
started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
echo "# zonegate soak: $started_at, $(machine_line), ${SOAK_SECS}s (warm-up ${WARMUP_SECS}s)"
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)"

Z=$tmp/zone
zone_create "$Z" soak.example gw=127.0.0.1:4433 n1 n2
cat >"$Z/devices/gw/policies/soak.toml" <<'EOF'
[app.web]
http = { host = "soak.example" }
to = "n1/http"
allow = { from = ["public"] }

[app.conn]
tcp = { listen = "127.0.0.1:18001" }
to = "n1/http"
allow = { from = ["public"] }

[app.iperf]
tcp = { listen = "127.0.0.1:15201" }
to = "n1/iperf"
allow = { from = ["public"] }

[app.echo]
udp = { listen = "127.0.0.1:17001" }
to = "n1/echo"
allow = { from = ["public"] }

[app.web-mesh]
mesh = true
to = "n1/http"
allow = { from = ["device:n2"] }
EOF
gw_conf=$Z/devices/gw/gateway.toml
conf_set "$gw_conf" http '"127.0.0.1:18080"'
conf_set "$gw_conf" https '"off"'
conf_set "$gw_conf" dns '"127.0.0.1:5353"'
conf_set "$Z/devices/n2/node.toml" admin '"127.0.0.1:9092"'

start iperf3-server iperf3 -s -p 5201
nginx_backend
start udp-echo python3 "$bench_dir/soak_tools.py" udp-echo 127.0.0.1:7001
start gw "$ZONEGATE" gateway --config "$gw_conf"
# N1_WRAP (a command prefix, e.g. `heaptrack -o /tmp/n1`) runs agent n1 under a profiler; the
# PID sampled is then the wrapper's (heaptrack's launcher script), not the agent's, so such a
# run is for the profile, not for its RSS column or pass/fail.
# shellcheck disable=SC2086 # N1_WRAP is a command and its arguments
start n1 ${N1_WRAP:-} "$ZONEGATE" node --config "$Z/devices/n1/node.toml" \
  --service http=127.0.0.1:8000 --service iperf=127.0.0.1:5201 --service echo=127.0.0.1:7001/udp
start n2 "$ZONEGATE" node --config "$Z/devices/n2/node.toml" --forward 127.0.0.1:9100=n1/http
if ! wait_agents 127.0.0.1:9090 2 30 || ! http_ready http://127.0.0.1:18080/ soak.example ||
  ! http_ready http://127.0.0.1:9100/ "" 30; then
  tail -n 30 "$tmp/gw.log" "$tmp/n1.log" "$tmp/n2.log" >&2
  exit 1
fi
cat >"$tmp/queries.txt" <<'EOF'
soak.example A
soak.example SOA
soak.example NS
gw.soak.example A
n1.soak.example A
n2.soak.example A
www.soak.example A
EOF

t0=$(date +%s)
end_epoch=$((t0 + SOAK_SECS))
left() { echo $((end_epoch - $(date +%s))); }

http_loop() {
  local i=0 l
  while l=$(left); ((l > 2)); do
    i=$((i + 1))
    timeout $((CHUNK + 30)) wrk -t1 -c"$HTTP_CONNS" -d"$((l < CHUNK ? l : CHUNK))s" --timeout 10s \
      -H 'Host: soak.example' http://127.0.0.1:18080/ >"$tmp/load-http.out" 2>&1 || true
    parse wrk "$runs" http front "$i" "$tmp/load-http.out"
  done
}
conn_loop() {
  local i=0 l
  while l=$(left); ((l > 2)); do
    i=$((i + 1))
    timeout $((CHUNK + 30)) wrk -t1 -c"$CONN_CONNS" -d"$((l < CHUNK ? l : CHUNK))s" --timeout 10s \
      -H 'Connection: close' http://127.0.0.1:18001/ >"$tmp/load-conn.out" 2>&1 || true
    parse wrk "$runs" conn tcp-app "$i" "$tmp/load-conn.out"
  done
}
bulk_loop() {
  local i=0 l dir
  while l=$(left); ((l > IPERF_SECS + 2)); do
    i=$((i + 1))
    dir=()
    ((i % 2)) || dir=(-R)
    timeout $((IPERF_SECS + 30)) iperf3 -c 127.0.0.1 -p 15201 -t "$IPERF_SECS" -b "$IPERF_RATE" \
      -J "${dir[@]}" >"$tmp/load-bulk.json" 2>&1 || true
    parse iperf3 "$runs" bulk "tcp-app${dir[*]:+-down}" "$i" "$tmp/load-bulk.json"
    l=$(left)
    sleep $((l < IPERF_EVERY - IPERF_SECS ? (l > 0 ? l : 0) : IPERF_EVERY - IPERF_SECS))
  done
}
dns_loop() {
  local i=0 l
  while l=$(left); ((l > 2)); do
    i=$((i + 1))
    timeout $((CHUNK + 30)) dnsperf -s 127.0.0.1 -p 5353 -d "$tmp/queries.txt" -c 2 \
      -l "$((l < CHUNK ? l : CHUNK))" -Q "$DNS_QPS" >"$tmp/load-dns.out" 2>&1 || true
    parse dnsperf "$runs" dns gateway "$i" "$tmp/load-dns.out"
  done
}
udp_run() {
  local out
  out=$(tools udp-client 127.0.0.1:17001 "$((SOAK_SECS - 2))" "$UDP_RATE")
  python3 - "$runs" "$out" <<'EOF'
import json, sys
m = json.loads(sys.argv[2])
m["errors"] = m["outages"]
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"test": "udp", "contender": "udp-app", "rep": 1, "metrics": m}) + "\n")
print("  udp " + json.dumps(m), flush=True)
EOF
}
# Samples on a fixed schedule (t = 0, SAMPLE, 2*SAMPLE, ... and the end), printed as they come.
sample() {
  local t line
  t=$(($(date +%s) - t0))
  line=$(printf '{"t":%d,"gw_kib":%s,"n1_kib":%s,"n2_kib":%s,"check":%s}' "$t" \
    "$(rss_kib "${PID[gw]}")" "$(rss_kib "${PID[n1]}")" "$(rss_kib "${PID[n2]}")" \
    "$(tools check "$t" 127.0.0.1:18080 soak.example 127.0.0.1:9100 127.0.0.1:9090 2 127.0.0.1:5353 soak.example)")
  echo "$line" >>"$samples"
  python3 -c 'import json,sys; s=json.loads(sys.argv[1]); print("  t=%4ds  RSS gateway %6.1f MiB  n1 %6.1f MiB  n2 %6.1f MiB  checks %s" % (s["t"], s["gw_kib"]/1024, s["n1_kib"]/1024, s["n2_kib"]/1024, ",".join(s["check"]["failed"]) or "ok"))' "$line"
}

echo "# mixed load for ${SOAK_SECS}s; samples every ${SAMPLE}s"
start load-http http_loop
start load-conn conn_loop
start load-bulk bulk_loop
start load-dns dns_loop
start load-udp udp_run
k=0
while true; do
  sample
  k=$((k + 1))
  next=$((t0 + k * SAMPLE))
  ((next < end_epoch)) || next=$end_epoch
  now=$(date +%s)
  ((now < end_epoch)) || break
  ((next > now)) && sleep $((next - now))
done
for n in load-http load-conn load-bulk load-dns load-udp; do
  wait "${PID[$n]}" || echo "# $n exited with $?" >&2
  unset "PID[$n]"
done

read -r warns errs < <(log_problems "$tmp/gw.log" "$tmp/n1.log" "$tmp/n2.log")
parse put "$runs" logs zonegate 1 warnings="$warns" errors="$errs"
grep -h -E ' (WARN|ERROR) ' "$tmp/gw.log" "$tmp/n1.log" "$tmp/n2.log" | head -n 20 >"$tmp/log-problems.txt" || true
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"

stamp=$(date -u -d "$started_at" +%Y-%m-%dT%H%MZ)
export SOAK_STARTED=$started_at LOAD_AFTER REPO_DIR=$repo_dir
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
rc=0
python3 "$bench_dir/soak_report.py" --assemble "$runs" "$samples" "$tmp/log-problems.txt" \
  "$OUT/soak-$stamp.json" || rc=$?
if [[ $REPORT != 0 ]]; then
  python3 "$bench_dir/soak_report.py" "$OUT/soak-$stamp.json" || rc=$?
fi
exit "$rc"
