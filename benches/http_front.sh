#!/usr/bin/env bash
# http_front.sh - issue 4's benchmark: requests/s and p50/p99 latency through the gateway's
# HTTP front and the tunnel, against nginx as a plain reverse proxy to the same backend, in the
# same run.
#   backend: nginx `return 200` on 127.0.0.1:8000 (tiny body), reached by
#   - nginx reverse proxy   :8080 (HTTP/1.1), :8443 (TLS, HTTP/2), keep-alive upstream pool
#   - zonegate gateway      :18080 (HTTP/1.1), :18443 (TLS, HTTP/2) -> QUIC tunnel -> node agent
#   1. wrk  -t1 -c$CONNS, HTTP/1.1 keep-alive: requests/s, p50, p99
#   2. h2load -c$H2CONNS -m$H2STREAMS, HTTP/2 over TLS: requests/s, p50, p99 (from its log)
# Both proxies log one line per request (nginx access log, zonegate info log) to files.
# Runs in a private network namespace (`unshare --net`, needs root); everything is killed on exit.
# (run.sh measures the HTTP/1.1 part together with rathole; this one keeps the TLS/HTTP/2 part.)
#
# Usage: benches/http_front.sh           (builds `cargo build --release` first)
#   ZONEGATE=path/to/zonegate  use that binary;  SECS=10 CONNS=32 H2CONNS=8 H2STREAMS=8
# Needs: wrk, nginx, h2load, openssl, python3 (apt-get install -y wrk nginx-light nghttp2-client openssl python3).
set -euo pipefail

SECS=${SECS:-10}
CONNS=${CONNS:-32}
H2CONNS=${H2CONNS:-8}
H2STREAMS=${H2STREAMS:-8}
# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"

if ! in_netns "$@"; then
  need_tools wrk nginx h2load openssl \
    python3 unshare
  build_zonegate
  export SECS CONNS H2CONNS H2STREAMS
  enter_netns "$0"
fi

# ---- inside the private namespace ----
netns_init
Z=$tmp/zone
zone_create "$Z" bench.example gw=127.0.0.1:4433 n1
cat >"$Z/devices/gw/policies/bench.toml" <<'EOF'
[app.web]
http = { host = "bench.example" }
to = "n1/web"
allow = { from = ["public"] }
EOF
tls_cert "$tmp/tls" bench.example
gw_conf=$Z/devices/gw/gateway.toml
conf_set "$gw_conf" http '"127.0.0.1:18080"'
conf_set "$gw_conf" https '"127.0.0.1:18443"'
conf_set "$gw_conf" dns '"off"'
cat >>"$gw_conf" <<EOF
[[tls]]
cert = "$tmp/tls/cert.pem"
key = "$tmp/tls/key.pem"
EOF

nginx_start nginx "
  access_log $tmp/nginx-access.log;
  upstream backend { server 127.0.0.1:8000; keepalive 64; }
  server { listen 127.0.0.1:8000; access_log off; location / { return 200 \"hello from the backend\n\"; } }
  server {
    listen 127.0.0.1:8080;
    listen 127.0.0.1:8443 ssl http2;
    $(nginx_tls "$tmp/tls")
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$remote_addr;
      proxy_set_header X-Forwarded-Proto \$scheme;
    }
  }"
start gateway "$ZONEGATE" gateway --config "$gw_conf"
start node "$ZONEGATE" node --config "$Z/devices/n1/node.toml" --service web=127.0.0.1:8000

if ! wait_agents 127.0.0.1:9090 1 20 || ! http_ready http://127.0.0.1:8080/; then
  cat "$tmp/gateway.log" "$tmp/node.log" "$tmp/nginx/error.log" >&2
  exit 1
fi

wrk_run() { # port -> "RPS p50 p99"
  wrk -t1 -c"$CONNS" -d"${SECS}s" --latency -H 'Host: bench.example' "http://127.0.0.1:$1/" >"$tmp/wrk.out"
  awk '/^Requests\/sec:/ {r=$2} /^ +50%/ {p50=$2} /^ +99%/ {p99=$2} END {printf "%8d req/s  p50 %-8s p99 %s", r, p50, p99}' "$tmp/wrk.out"
  # Fast errors (502s from a front whose agent dropped, resets) must not read as a fast run.
  local sockerr non2xx
  sockerr=$(grep -oE 'Socket errors: .*' "$tmp/wrk.out" || true)
  non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' "$tmp/wrk.out")
  if [[ -n $sockerr || -n $non2xx ]]; then
    printf '  ERRORS: %s; non-2xx answers %s: not a result' "${sockerr:-no socket errors}" "${non2xx:-0}"
  fi
  echo
}
h2_run() { # port -> "RPS p50 p99"
  rm -f "$tmp/h2.log"
  h2load -c"$H2CONNS" -m"$H2STREAMS" -D "$SECS" -H ':authority: bench.example' --log-file="$tmp/h2.log" \
    "https://127.0.0.1:$1/" >"$tmp/h2.out"
  python3 - "$tmp/h2.out" "$tmp/h2.log" <<'EOF'
import re, sys
out = open(sys.argv[1]).read()
rps = float(re.search(r"finished in [^,]+, ([\d.]+) req/s", out).group(1))
ok = re.search(r"requests: .* (\d+) succeeded", out).group(1)
# h2load's req/s counts answers of any status: failed ones (non-2xx included) mark the line.
failed = int(re.search(r"requests: .* (\d+) failed", out).group(1))
d = sorted(int(l.split()[2]) for l in open(sys.argv[2]) if l.strip())
pct = lambda p: d[min(len(d) - 1, int(len(d) * p))] / 1000.0
print("%8d req/s  p50 %-8s p99 %s  (%s ok)" % (rps, "%.2fms" % pct(0.50), "%.2fms" % pct(0.99), ok)
      + ("  ERRORS: %d failed: not a result" % failed if failed else ""))
EOF
}

echo "# HTTP front benchmark: $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r), ${SECS}s per run"
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "wrk HTTP/1.1 -c$CONNS   backend direct       : $(wrk_run 8000)"
echo "wrk HTTP/1.1 -c$CONNS   nginx reverse proxy  : $(wrk_run 8080)"
echo "wrk HTTP/1.1 -c$CONNS   zonegate + tunnel    : $(wrk_run 18080)"
echo "h2load TLS h2 -c$H2CONNS -m$H2STREAMS nginx reverse proxy : $(h2_run 8443)"
echo "h2load TLS h2 -c$H2CONNS -m$H2STREAMS zonegate + tunnel   : $(h2_run 18443)"
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
read -r warns errs < <(log_problems "$tmp/gateway.log" "$tmp/node.log")
echo "# warnings/errors logged: $warns/$errs; gateway request lines: $(grep -c 'http request' "$tmp/gateway.log" || true)"
