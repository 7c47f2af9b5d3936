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
#
# Usage: benches/http_front.sh           (builds `cargo build --release` first)
#   ZONEGATE=path/to/zonegate  use that binary;  SECS=10 CONNS=32 H2CONNS=8 H2STREAMS=8
# Needs: wrk, nginx, h2load, openssl, python3 (apt-get install -y wrk nginx-light nghttp2-client openssl python3).
set -euo pipefail

SECS=${SECS:-10}
CONNS=${CONNS:-32}
H2CONNS=${H2CONNS:-8}
H2STREAMS=${H2STREAMS:-8}
here=$(cd "$(dirname "$0")/.." && pwd)

if [[ ${1:-} != --inside ]]; then
  for t in wrk nginx h2load openssl python3 unshare; do
    command -v "$t" >/dev/null || { echo "needs $t (apt-get install -y wrk nginx-light nghttp2-client openssl python3)" >&2; exit 1; }
  done
  if [[ -z ${ZONEGATE:-} ]]; then
    (cd "$here" && cargo build --release -q --bin zonegate)
    ZONEGATE=${CARGO_TARGET_DIR:-$here/target}/release/zonegate
  fi
  [[ -x $ZONEGATE ]] || { echo "no zonegate binary at $ZONEGATE" >&2; exit 1; }
  export ZONEGATE SECS CONNS H2CONNS H2STREAMS
  exec unshare --net -- bash "$0" --inside
fi

# ---- inside the private namespace ----
ip link set lo up
tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

zg() { "$ZONEGATE" "$@" >/dev/null; }
Z=$tmp/zone
zg zone init --domain bench.example --dir "$Z"
zg device add gw --zone "$Z" --role gateway --public-addr 127.0.0.1:4433
zg device add n1 --zone "$Z" --role node
for d in gw n1; do cp "$Z/zone.json" "$Z/devices/$d/zone.json"; done
mkdir -p "$Z/devices/gw/policies"
cat >"$Z/devices/gw/policies/bench.toml" <<'EOF'
[app.web]
http = { host = "bench.example" }
to = "n1/web"
allow = { from = ["public"] }
EOF
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=bench.example -addext subjectAltName=DNS:bench.example \
  -keyout "$tmp/tls.key" -out "$tmp/tls.crt" 2>/dev/null
cat >>"$Z/devices/gw/gateway.toml" <<EOF
http = "127.0.0.1:18080"
https = "127.0.0.1:18443"
[[tls]]
cert = "$tmp/tls.crt"
key = "$tmp/tls.key"
EOF

cat >"$tmp/nginx.conf" <<EOF
worker_processes auto;
pid $tmp/nginx.pid;
error_log $tmp/nginx-error.log;
daemon off;
events { worker_connections 4096; }
http {
  access_log $tmp/nginx-access.log;
  keepalive_requests 1000000;  # the default (1000) would end h2load's connections mid-run
  upstream backend { server 127.0.0.1:8000; keepalive 64; }
  server { listen 127.0.0.1:8000; access_log off; location / { return 200 "hello from the backend\n"; } }
  server {
    listen 127.0.0.1:8080;
    listen 127.0.0.1:8443 ssl http2;
    ssl_certificate $tmp/tls.crt;
    ssl_certificate_key $tmp/tls.key;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$remote_addr;
      proxy_set_header X-Forwarded-Proto \$scheme;
    }
  }
}
EOF
nginx -c "$tmp/nginx.conf" -e "$tmp/nginx-error.log" &
pids+=($!)
"$ZONEGATE" gateway --config "$Z/devices/gw/gateway.toml" >"$tmp/gateway.log" 2>&1 &
pids+=($!)
"$ZONEGATE" node --config "$Z/devices/n1/node.toml" --service web=127.0.0.1:8000 >"$tmp/node.log" 2>&1 &
pids+=($!)

python3 - <<'EOF' || { cat "$tmp/gateway.log" "$tmp/node.log" "$tmp/nginx-error.log" >&2; exit 1; }
import json, sys, time, urllib.request
end = time.time() + 20
while time.time() < end:
    try:
        st = json.load(urllib.request.urlopen("http://127.0.0.1:9090/status", timeout=1))
        if any(a["device"] == "n1" for a in st["agents"]):
            r = urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:8080/"), timeout=1)
            if r.status == 200:
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.1)
sys.exit("agent n1 or nginx not ready within 20 s")
EOF

wrk_run() { # port -> "RPS p50 p99"
  wrk -t1 -c"$CONNS" -d"${SECS}s" --latency -H 'Host: bench.example' "http://127.0.0.1:$1/" >"$tmp/wrk.out"
  awk '/^Requests\/sec:/ {r=$2} /^ +50%/ {p50=$2} /^ +99%/ {p99=$2} END {printf "%8d req/s  p50 %-8s p99 %s\n", r, p50, p99}' "$tmp/wrk.out"
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
d = sorted(int(l.split()[2]) for l in open(sys.argv[2]) if l.strip())
pct = lambda p: d[min(len(d) - 1, int(len(d) * p))] / 1000.0
print("%8d req/s  p50 %-8s p99 %s  (%s ok)" % (rps, "%.2fms" % pct(0.50), "%.2fms" % pct(0.99), ok))
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
errors=$(grep -c -E ' (WARN|ERROR) ' "$tmp/gateway.log" "$tmp/node.log" | paste -sd' ' || true)
echo "# warnings/errors logged: $errors; gateway request lines: $(grep -c 'http request' "$tmp/gateway.log" || true)"
