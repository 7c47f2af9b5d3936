#!/usr/bin/env bash
set -euo pipefail
source "$(dirname "$0")/lib.sh"
if ! in_netns "$@"; then enter_netns "$0" "$@"; fi
shift
ZONEGATE=$1
netns_init
tls_cert "$tmp/tls" bench.example
nginx_backend
proxy="proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header Host \$host;"
nginx_start nginx-rp "
  access_log $tmp/nginx-rp/access.log;
  upstream backend { server 127.0.0.1:8000; keepalive 64; }
  server { listen 127.0.0.1:8080 backlog=4096; location / { $proxy } }
  server { listen 127.0.0.1:8443 ssl backlog=4096; ssl_certificate $tmp/tls/cert.pem; ssl_certificate_key $tmp/tls/key.pem; location / { $proxy } }"
Z=$tmp/zone
zone_create "$Z" bench.example gw=127.0.0.1:4433 n1
cat >"$Z/devices/gw/policies/bench.toml" <<'P'
[app.web]
http = { host = "bench.example" }
to = "n1/http"
allow = { from = ["public"] }
P
gw_conf=$Z/devices/gw/gateway.toml
front_only "$gw_conf"
conf_set "$gw_conf" https '"127.0.0.1:18443"'
printf '[[tls]]\ncert = "%s"\nkey = "%s"\n' "$tmp/tls/cert.pem" "$tmp/tls/key.pem" >>"$gw_conf"
start gw "$ZONEGATE" gateway --config "$gw_conf"
start node "$ZONEGATE" node --config "$Z/devices/n1/node.toml" --service http=127.0.0.1:8000
wait_agents 127.0.0.1:9090 1 20 >/dev/null
http_ready https://127.0.0.1:8443/ bench.example 20
http_ready https://127.0.0.1:18443/ bench.example 20
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
for r in 1; do
for p in 18443; do
  nt() { local t=0 c; for c in $(pgrep -P "${PID[nginx-rp]}"); do t=$((t + $(ticks $c))); done; echo $t; }
  g0=$(ticks "${PID[gw]}"); x0=$(nt); d0=$(ticks "${PID[node]}")
  (sleep 1; perf record -F 2000 --call-graph dwarf,16384 -o /tmp/perf.tls3.data -p "${PID[gw]}" -- sleep 2 >/dev/null 2>&1) &
  out=$(wrk -t1 -c32 -d5s -H 'Host: bench.example' -H 'Connection: close' "$( [[ $p == *443 ]] && echo https || echo http)://127.0.0.1:$p/")
  g1=$(ticks "${PID[gw]}"); x1=$(nt); d1=$(ticks "${PID[node]}")
  echo "$p: $(awk '/^Requests\/sec/ {print $2}' <<<"$out") conn/s; errors: $(grep -i 'error\|Non-2xx' <<<"$out" | tr '\n' ' ') gw ticks $((g1-g0)) nginx-rp ticks $((x1-x0)) node ticks $((d1-d0))"
done; done
