#!/usr/bin/env bash
# tunnel_loopback.sh - issue 3's benchmark: a gateway and one node agent on loopback, a service
# exposed through a public `tcp` app, compared with the same service reached directly.
#   1. bulk TCP throughput: iperf3 -c 127.0.0.1 -p PORT -t $SECS (upload, and -R download)
#   2. new connections per second: wrk with `Connection: close` against a tiny HTTP server
#      (one TCP connection per request), $CONNS connections from 2 threads for $SECS s
# Everything runs in a private network namespace (`unshare --net`, needs root) so ports never
# collide with anything else on the machine, and is killed on exit.
#
# Usage: benches/tunnel_loopback.sh            (builds `cargo build --release` first)
#   ZONEGATE=path/to/zonegate  use that binary instead of building
#   SECS=5 CONNS=32            run length and wrk connections
# Needs: iperf3, wrk, python3 (apt-get install -y iperf3 wrk python3).
set -euo pipefail

SECS=${SECS:-5}
CONNS=${CONNS:-32}
here=$(cd "$(dirname "$0")/.." && pwd)

if [[ ${1:-} != --inside ]]; then
  for t in iperf3 wrk python3 unshare; do
    command -v "$t" >/dev/null || { echo "needs $t (apt-get install -y iperf3 wrk python3)" >&2; exit 1; }
  done
  if [[ -z ${ZONEGATE:-} ]]; then
    (cd "$here" && cargo build --release -q)
    ZONEGATE=${CARGO_TARGET_DIR:-$here/target}/release/zonegate
  fi
  [[ -x $ZONEGATE ]] || { echo "no zonegate binary at $ZONEGATE" >&2; exit 1; }
  export ZONEGATE SECS CONNS
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
[app.iperf]
tcp = { listen = "127.0.0.1:15201" }
to = "n1/iperf"
allow = { from = ["public"] }

[app.http]
tcp = { listen = "127.0.0.1:18080" }
to = "n1/http"
allow = { from = ["public"] }
EOF

# the services: iperf3 server, and an HTTP server that answers every request and closes
iperf3 -s -p 5201 >"$tmp/iperf3-server.log" 2>&1 &
pids+=($!)
cat >"$tmp/http.py" <<'EOF'
import asyncio
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
async def handle(r, w):
    try:
        await r.readuntil(b"\r\n\r\n")
        w.write(RESP)
        await w.drain()
    except Exception:
        pass
    w.close()
async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", 8000, backlog=1024)
    async with srv:
        await srv.serve_forever()
asyncio.run(main())
EOF
python3 "$tmp/http.py" >"$tmp/http.log" 2>&1 &
pids+=($!)

# gateway and agent with their default settings (info logs: one line per proxied connection)
"$ZONEGATE" gateway --config "$Z/devices/gw/gateway.toml" >"$tmp/gateway.log" 2>&1 &
pids+=($!)
"$ZONEGATE" node --config "$Z/devices/n1/node.toml" \
  --service iperf=127.0.0.1:5201 --service http=127.0.0.1:8000 >"$tmp/node.log" 2>&1 &
pids+=($!)

ready() {
  python3 - <<'EOF'
import json, sys, time, urllib.request
end = time.time() + 20
while time.time() < end:
    try:
        st = json.load(urllib.request.urlopen("http://127.0.0.1:9090/status", timeout=1))
        if any(a["device"] == "n1" and len(a["services"]) == 2 for a in st["agents"]):
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.1)
sys.exit("agent n1 not connected within 20 s")
EOF
}
ready || { cat "$tmp/gateway.log" "$tmp/node.log" >&2; exit 1; }

gbps() { # iperf3 -J output on stdin -> receiver Gbit/s
  python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
}
iperf() { iperf3 -c 127.0.0.1 -p "$1" -t "$SECS" -J "${@:2}" | gbps; }
rps() { # wrk output on stdin -> requests/s (integer)
  awk '/^Requests\/sec:/ { printf "%d\n", $2 }'
}
cps() { wrk -t2 -c"$CONNS" -d"${SECS}s" -H 'Connection: close' "http://127.0.0.1:$1/" | rps; }

echo "# zonegate tunnel on loopback: $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r)"
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "bulk TCP upload   (iperf3 -t $SECS)     direct: $(iperf 5201) Gbit/s   tunnel: $(iperf 15201) Gbit/s"
echo "bulk TCP download (iperf3 -R -t $SECS)  direct: $(iperf 5201 -R) Gbit/s   tunnel: $(iperf 15201 -R) Gbit/s"
echo "new connections/s (wrk -c$CONNS, Connection: close)  direct: $(cps 8000)   tunnel: $(cps 18080)"
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
errors=$(grep -c -E ' (WARN|ERROR) ' "$tmp/gateway.log" "$tmp/node.log" | paste -sd' ' || true)
echo "# warnings/errors logged: $errors"
