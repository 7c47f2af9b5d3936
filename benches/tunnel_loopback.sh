#!/usr/bin/env bash
# tunnel_loopback.sh - issue 3's benchmark: a gateway and one node agent on loopback, a service
# exposed through a public `tcp` app, compared with the same service reached directly.
#   1. bulk TCP throughput: iperf3 -c 127.0.0.1 -p PORT -t $SECS (upload, and -R download)
#   2. new connections per second: wrk with `Connection: close` against a tiny HTTP server
#      (one TCP connection per request), $CONNS connections from 2 threads for $SECS s
# Everything runs in a private network namespace (`unshare --net`, needs root) so ports never
# collide with anything else on the machine, and is killed on exit. (Superseded by run.sh,
# which adds rathole, bore and nginx; kept to reproduce tunnel-loopback.md.)
#
# Usage: benches/tunnel_loopback.sh            (builds `cargo build --release` first)
#   ZONEGATE=path/to/zonegate  use that binary instead of building
#   SECS=5 CONNS=32            run length and wrk connections
# Needs: iperf3, wrk, python3 (apt-get install -y iperf3 wrk python3).
set -euo pipefail

SECS=${SECS:-5}
CONNS=${CONNS:-32}
# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"

if ! in_netns "$@"; then
  need_tools iperf3 wrk python3 unshare
  build_zonegate
  export SECS CONNS
  enter_netns "$0"
fi

# ---- inside the private namespace ----
netns_init
Z=$tmp/zone
zone_create "$Z" bench.example gw=127.0.0.1:4433 n1
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
start iperf3-server iperf3 -s -p 5201
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
start http python3 "$tmp/http.py"

# gateway and agent with their default settings (info logs: one line per proxied connection)
start gateway "$ZONEGATE" gateway --config "$Z/devices/gw/gateway.toml"
start node "$ZONEGATE" node --config "$Z/devices/n1/node.toml" \
  --service iperf=127.0.0.1:5201 --service http=127.0.0.1:8000
if ! wait_agents 127.0.0.1:9090 1 20 || ! port_ready 8000; then
  cat "$tmp/gateway.log" "$tmp/node.log" >&2
  exit 1
fi

gbps() { # iperf3 -J output on stdin -> receiver Gbit/s
  python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
}
iperf() { iperf3 -c 127.0.0.1 -p "$1" -t "$SECS" -J "${@:2}" | gbps; }
rps() { # wrk output on stdin -> requests/s (integer)
  awk '/^Requests\/sec:/ { printf "%d\n", $2 }'
}
cps() {
  local out
  out=$(wrk -t2 -c"$CONNS" -d"${SECS}s" -H 'Connection: close' "http://127.0.0.1:$1/")
  # Fast errors (a front answering for an agent that dropped) must not read as a fast run.
  # A tcp app's failures are resets (socket errors), not error answers.
  if grep -qE 'Non-2xx or 3xx responses|Socket errors' <<<"$out"; then
    echo "wrk through port $1 got error answers or socket errors: not a result" >&2
    return 1
  fi
  rps <<<"$out"
}
# figure CMD... - CMD's figure; a tool that failed or printed none stops the run (inside the
# echo below an empty figure read as a result, and the script still exited 0).
figure() {
  local v
  v=$("$@") || { echo "failed: $*" >&2; return 1; }
  [[ -n $v ]] || { echo "no figure from: $*" >&2; return 1; }
  printf '%s' "$v"
}

echo "# zonegate tunnel on loopback: $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r)"
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)"
up_direct=$(figure iperf 5201)
up_tunnel=$(figure iperf 15201)
echo "bulk TCP upload   (iperf3 -t $SECS)     direct: $up_direct Gbit/s   tunnel: $up_tunnel Gbit/s"
down_direct=$(figure iperf 5201 -R)
down_tunnel=$(figure iperf 15201 -R)
echo "bulk TCP download (iperf3 -R -t $SECS)  direct: $down_direct Gbit/s   tunnel: $down_tunnel Gbit/s"
cps_direct=$(figure cps 8000)
cps_tunnel=$(figure cps 18080)
echo "new connections/s (wrk -c$CONNS, Connection: close)  direct: $cps_direct   tunnel: $cps_tunnel"
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
read -r warns errs < <(log_problems "$tmp/gateway.log" "$tmp/node.log")
echo "# warnings/errors logged: $warns/$errs"
