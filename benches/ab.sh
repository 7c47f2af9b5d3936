#!/usr/bin/env bash
# ab.sh - interleaved A/B of zonegate variants on one workload, with the CPU each process
# spent: on this 2-core VM req/s and Gbit/s move ±15 % from run to run, CPU per unit of work
# much less, so a change is judged by both.
#
# Usage: benches/ab.sh front|half|tcp|conn|bulk|download VARIANT...
#   VARIANT: a zonegate binary, optionally @N for N node worker threads (`threads = N` in
#            node.toml) or @N,G for N node and G gateway threads, e.g.
#            `benches/ab.sh front target/release/zonegate@2 target/release/zonegate@1`;
#            for front, also `nginx-rp`: nginx's reverse proxy to the same backend without a
#            tunnel (run.sh's reference), its workers' CPU and waiting in the gateway's place
#   front: wrk -t1 -c$CONNS -d$SECS (CONNS=32 unless set) through the gateway's HTTP front to
#          nginx on the node's side; prints req/s, p99, gateway/node CPU µs per request (and
#          the µs each spent ready to run but waiting for a CPU) and the tunnel's UDP datagrams
#          per request each way (the gateway's /status)
#   half:  the same path at a fixed rate, RATE req/s (default 10000, about half of the front's
#          maximum here) from h2load --h1 -c$HALF_CLIENTS --rps (16 unless set, as run.sh's
#          half-load run): p50/p99/p99.9 latency and CPU per request
#   tcp:   as front, but through a public tcp app (the same tunnel, no HTTP work in zonegate):
#          what the front would reach if its HTTP handling were free
#   conn:  wrk -t1 -c$CONNS -d$SECS -H 'Connection: close' through a public tcp app to the same nginx
#          (one new connection and tunnel stream per request); same figures per connection
#   bulk:  iperf3 -t$SECS through a public tcp app, upload then download (-R); prints Gbit/s,
#          gateway/node CPU seconds per GB moved and the namespace's UDP receive-buffer overflows
#   download: one HTTP GET of a 2 GiB file (curl, nginx serving it) through the HTTP front
#          (HTTP/1.1, and HTTP/2 with prior knowledge), through a public tcp app, and direct;
#          then the same file PUT up each path (nginx's WebDAV module stores it in /dev/shm);
#          Gbit/s and CPU seconds per GB as for bulk
#   Every line ends with the whole machine's idle and stolen CPU shares over the measurement
#   (/proc/stat): a round the hypervisor stole from is disturbed, not a property of the variant.
#   ROUNDS=4 rounds; each round starts every variant afresh (gateway + node), the order
#            rotated by one each round (give as many rounds as variants, or a multiple).
# Runs as root in a private network namespace like the other scripts (benches/lib.sh).
set -euo pipefail

ROUNDS=${ROUNDS:-4}
# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"

if ! in_netns "$@"; then
  if [[ $# -lt 2 || ! " front half tcp conn bulk download " == *" $1 "* ]]; then
    echo "usage: $0 front|half|tcp|conn|bulk|download ZONEGATE_BINARY[@NODE_THREADS[,GATEWAY_THREADS]]..." >&2
    exit 2
  fi
  bins=0
  for v in "${@:2}"; do
    if [[ $v == nginx-rp ]]; then
      [[ $1 == front ]] || { echo "nginx-rp is a reference for front only" >&2; exit 2; }
      continue
    fi
    [[ -x ${v%@*} ]] || { echo "not an executable: ${v%@*}" >&2; exit 2; }
    bins=$((bins + 1))
  done
  ((bins > 0)) || { echo "no zonegate binary among the variants" >&2; exit 2; }
  case $1 in
    bulk) need_tools iperf3 python3 nstat unshare ;;
    half) need_tools h2load nginx python3 unshare ;;
    download) need_tools curl nginx python3 unshare ;;
    *) need_tools wrk nginx python3 unshare ;;
  esac
  export ROUNDS SECS="${SECS:-}" RATE="${RATE:-10000}" CONNS="${CONNS:-32}" HALF_CLIENTS="${HALF_CLIENTS:-16}"
  enter_netns "$0" "$@"
fi

# ---- inside the private namespace ----
shift # --inside
MODE=$1
shift
if [[ -z $SECS ]]; then
  case $MODE in bulk) SECS=8 ;; half) SECS=10 ;; *) SECS=5 ;; esac
fi
for v in "$@"; do # lib.sh's zone helpers run the first zonegate variant's binary
  [[ $v != nginx-rp ]] && { ZONEGATE=${v%@*}; break; }
done
netns_init

Z=$tmp/zone
zone_create "$Z" bench.example gw=127.0.0.1:4433 n1
cat >"$Z/devices/gw/policies/bench.toml" <<'EOF'
[app.iperf]
tcp = { listen = "127.0.0.1:15201" }
to = "n1/iperf"
allow = { from = ["public"] }

[app.tcphttp]
tcp = { listen = "127.0.0.1:18001" }
to = "n1/http"
allow = { from = ["public"] }

[app.web]
http = { host = "bench.example" }
to = "n1/http"
allow = { from = ["public"] }
EOF
gw_conf=$Z/devices/gw/gateway.toml
front_only "$gw_conf"
node_conf=$Z/devices/n1/node.toml
cp "$node_conf" "$tmp/node.base.toml"
cp "$gw_conf" "$tmp/gw.base.toml"

if [[ $MODE == download ]]; then
  mkdir -p "$tmp/www"
  truncate -s 2G "$tmp/www/big" # sparse: nginx reads it from the page cache, no disk
  chmod o+rx "$tmp" "$tmp/www" && chmod o+r "$tmp/www/big" # nginx's workers run as nobody
  # Uploads land in memory, not on the disk (and an answer before the body would not do:
  # the front, as nginx, then drops the rest of the body unsent).
  shm=$(mktemp -d /dev/shm/zonegate-bench.XXXXXX)
  shm_down() { rm -rf "$shm"; }
  cleanup_hooks+=(shm_down)
  mkdir -p "$shm/up" "$shm/body" && chmod -R a+rwx "$shm"
  nginx_start nginx-backend "
  access_log off;
  sendfile on;
  server {
    listen 127.0.0.1:8000 backlog=4096; root $tmp/www; client_max_body_size 0;
    location /up/ { root $shm; client_body_temp_path $shm/body; dav_methods PUT; }
  }"
elif [[ $MODE != bulk ]]; then
  nginx_backend
else
  start iperf3-server iperf3 -s -p 5201
fi

# ticks PID... - CPU time of the processes: utime + stime, clock ticks.
ticks() {
  local p
  for p; do cat "/proc/$p/stat"; done | awk '{ s += $14 + $15 } END { printf "%.0f\n", s }'
}
# ready_ns PID... - nanoseconds the processes' threads have spent ready to run but waiting for
# a CPU (the second field of each thread's schedstat): set against the machine's idle share,
# whether they waited behind others while a CPU idled.
ready_ns() {
  local p
  for p; do cat /proc/"$p"/task/*/schedstat 2>/dev/null; done | awk '{ s += $2 } END { printf "%.0f\n", s }'
}
# cpu_end - notes the machine's CPU counters as the load stops (no fork), so
# the reading of counters and /status that follows is not part of the measurement.
cpu_end() { read -r CPU_END </proc/stat; }
# The whole machine's idle and stolen CPU from `cpu_mark` to `cpu_end`: a round the hypervisor
# stole from is slower for reasons of its own; idle CPU under a closed-loop load means
# latency-bound.
machine_note() { python3 "$bench_dir/parse.py" cpu "$CPU_MARK|$CPU_END"; }
hz=$(getconf CLK_TCK)
export NSTAT_HISTORY=$tmp/nstat.history # nstat keeps its history per user, not per namespace

for ((round = 1; round <= ROUNDS; round++)); do
  # Rotated each round: whoever runs first in a round reads higher on this VM.
  k=$(((round - 1) % $#))
  for v in "${@:k+1}" "${@:1:k}"; do
    bin=${v%@*}
    threads= gw_threads=
    [[ $v == *@* ]] && threads=${v##*@}
    [[ $threads == *,* ]] && { gw_threads=${threads#*,}; threads=${threads%,*}; }
    # `threads` is a top-level key: it goes before the file's first table.
    { [[ -n $threads ]] && echo "threads = $threads"; cat "$tmp/node.base.toml"; } >"$node_conf"
    { [[ -n $gw_threads ]] && echo "threads = $gw_threads"; cat "$tmp/gw.base.toml"; } >"$gw_conf"
    if [[ $v == nginx-rp ]]; then
      # The reference: nginx's reverse proxy to the same backend, no tunnel (as run.sh's).
      nginx_rp
      http_ready http://127.0.0.1:8080/ bench.example 30
      mapfile -t measured < <(pgrep -P "${PID[nginx-rp]}") # its workers
      second=() labels=(nginx-rp -)
    else
      start gw "$bin" gateway --config "$gw_conf"
      start node "$bin" node --config "$node_conf" --service http=127.0.0.1:8000 \
        --service iperf=127.0.0.1:5201
      wait_agents 127.0.0.1:9090 1 20 >/dev/null || { tail -n 20 "$tmp"/gw.log "$tmp"/node.log >&2; exit 1; }
      measured=("${PID[gw]}") second=("${PID[node]}") labels=(gateway node)
    fi
    if [[ $MODE == half ]]; then
      http_ready http://127.0.0.1:18080/ bench.example 30
      rm -f "$tmp/h2.log"
      g0=$(ticks "${PID[gw]}") n0=$(ticks "${PID[node]}")
      cpu_mark
      timeout $((SECS + 30)) h2load --h1 -c"$HALF_CLIENTS" --rps="$(python3 -c "print($RATE / $HALF_CLIENTS)")" -D "$SECS" \
        -H ':authority: bench.example' --log-file="$tmp/h2.log" http://127.0.0.1:18080/ >"$tmp/h2.out" 2>&1 || true
      cpu_end
      g1=$(ticks "${PID[gw]}") n1=$(ticks "${PID[node]}")
      python3 -c "
import sys
sys.path.insert(0, sys.argv[1])
import parse
lat, bad = parse.latencies(sys.argv[2])
g, n, hz = map(float, sys.argv[3:6])
r = max(len(lat), 1)
print('%-40s round %s: req/s %8.0f  p50 %.2f  p99 %.2f  p99.9 %.2f ms  non-2xx %d  gateway %5.1f us/req  node %5.1f us/req  %s' % (
    sys.argv[6], sys.argv[7], len(lat) / float(sys.argv[8]), parse.pct(lat, .5), parse.pct(lat, .99), parse.pct(lat, .999), bad,
    g * 1e6 / hz / r, n * 1e6 / hz / r, sys.argv[9]))" \
        "$bench_dir" "$tmp/h2.log" "$((g1 - g0))" "$((n1 - n0))" "$hz" "$v" "$round" "$SECS" "$(machine_note)"
      # Requests h2load gave up on (failed counts the errored and the timed out).
      failed=$(sed -nE 's/.* ([0-9]+) failed, .*/\1/p' "$tmp/h2.out")
      [[ ${failed:-x} == 0 ]] || echo "    ^ ERRORS: ${failed:-no summary from h2load} failed requests: this round's figures are not to be used"
    elif [[ $MODE == download ]]; then
      http_ready http://127.0.0.1:18080/big bench.example 30
      # The first read of the file fills the page cache: not part of any path's figure.
      curl -sS -o /dev/null http://127.0.0.1:8000/big
      for path in front:18080 front-h2:18080 tcp:18001 direct:8000 up-front:18080 up-tcp:18001 up-direct:8000; do
        g0=$(ticks "${PID[gw]}") n0=$(ticks "${PID[node]}")
        if [[ $path == up-* ]]; then
          rm -f "$shm/up/big"
          got=$(curl -sS -o /dev/null -H 'Host: bench.example' -T "$tmp/www/big" \
            -w '%{size_upload} %{time_total} %{http_code}' "http://127.0.0.1:${path#*:}/up/big")
          [[ ${got##* } == 201 || ${got##* } == 204 ]] || { echo "upload via $path: HTTP ${got##* }" >&2; exit 1; }
          [[ $(stat -c %s "$shm/up/big") == "$(stat -c %s "$tmp/www/big")" ]] ||
            { echo "upload via $path: stored $(stat -c %s "$shm/up/big") bytes" >&2; exit 1; }
          got=${got% *}
        else
          h2=()
          [[ $path == *-h2:* ]] && h2=(--http2-prior-knowledge) # the front's HTTP/2 (hyper's)
          got=$(curl -fsS "${h2[@]}" -o /dev/null -H 'Host: bench.example' \
            -w '%{size_download} %{time_total}' "http://127.0.0.1:${path#*:}/big") ||
            { echo "download via $path failed" >&2; exit 1; }
          [[ ${got%% *} == "$(stat -c %s "$tmp/www/big")" ]] ||
            { echo "download via $path: got ${got%% *} bytes" >&2; exit 1; }
        fi
        g1=$(ticks "${PID[gw]}") n1=$(ticks "${PID[node]}")
        python3 -c "
import sys
size, secs = map(float, sys.argv[1].split())
g, n, hz = map(float, sys.argv[2:5])
gb = size / 1e9
print('%-40s round %d: %-9s %5.2f Gbit/s  gateway %5.2f s/GB  node %5.2f s/GB' % (sys.argv[5], $round, sys.argv[6], size * 8 / secs / 1e9, g / hz / gb, n / hz / gb))" \
          "$got" "$((g1 - g0))" "$((n1 - n0))" "$hz" "$v" "${path%:*}"
      done
    elif [[ $MODE != bulk ]]; then
      url=http://127.0.0.1:18080/ close=()
      [[ $MODE == tcp ]] && url=http://127.0.0.1:18001/
      [[ $MODE == conn ]] && url=http://127.0.0.1:18001/ close=(-H 'Connection: close')
      [[ $v == nginx-rp ]] && url=http://127.0.0.1:8080/
      http_ready "$url" bench.example 30
      d0="- -" d1="- -"
      [[ $v != nginx-rp ]] && d0=$(python3 "$bench_dir/parse.py" datagrams 127.0.0.1:9090)
      w0="$(ready_ns "${measured[@]}") $(ready_ns "${second[@]}")"
      g0=$(ticks "${measured[@]}") n0=$(ticks "${second[@]}")
      cpu_mark
      out=$(wrk -t1 -c"${CONNS:-32}" -d"${SECS}s" --latency -H 'Host: bench.example' "${close[@]}" "$url")
      cpu_end
      g1=$(ticks "${measured[@]}") n1=$(ticks "${second[@]}")
      w1="$(ready_ns "${measured[@]}") $(ready_ns "${second[@]}")"
      [[ $v != nginx-rp ]] && d1=$(python3 "$bench_dir/parse.py" datagrams 127.0.0.1:9090)
      reqs=$(awk '/requests in/ { print $1 }' <<<"$out")
      rps=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
      p99=$(awk '$1 == "99%" { print $2 }' <<<"$out")
      unit=req
      [[ $MODE == conn ]] && unit=conn
      python3 -c "
import sys
g, n, r, hz = map(float, sys.argv[1:5])
u = sys.argv[8]
d0, d1 = sys.argv[10].split(), sys.argv[11].split()
per = ['%.2f' % ((int(b) - int(a)) / r) if a.isdigit() and b.isdigit() else '?' for a, b in zip(d0, d1)]
wg, wn = (int(b) - int(a) for a, b in zip(sys.argv[12].split(), sys.argv[13].split()))
la, lb = sys.argv[14:16]
cost = '%s %5.1f us/%s (+%.1f waiting)' % (la, g * 1e6 / hz / r, u, wg / 1e3 / r)
if lb != '-':
    cost += '  %s %5.1f us/%s (+%.1f waiting)  packets/%s to node %s back %s' % (lb, n * 1e6 / hz / r, u, wn / 1e3 / r, u, per[0], per[1])
print('%-40s round %d: %s/s %8.0f  p99 %-7s %s  %s' % (sys.argv[5], $round, u, float(sys.argv[6]), sys.argv[7], cost, sys.argv[9]))" \
        "$((g1 - g0))" "$((n1 - n0))" "$reqs" "$hz" "$v" "$rps" "$p99" "$unit" "$(machine_note)" "$d0" "$d1" "$w0" "$w1" "${labels[@]}"
      # A build answering with fast errors (502s, resets) must not read as a faster one.
      sockerr=$(grep -oE 'Socket errors: .*' <<<"$out" || true)
      non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' <<<"$out")
      if [[ -n $sockerr || -n $non2xx ]]; then
        echo "    ^ ERRORS: ${sockerr:-no socket errors}; non-2xx answers ${non2xx:-0}: this round's figures are not to be used"
      fi
    else
      for dir in up down; do
        flag=
        [[ $dir == down ]] && flag=-R
        nstat -n >/dev/null # reset nstat's history: the next call prints the delta
        g0=$(ticks "${PID[gw]}") n0=$(ticks "${PID[node]}")
        cpu_mark
        json=$(iperf3 -c 127.0.0.1 -p 15201 -t "$SECS" -J $flag)
        cpu_end
        g1=$(ticks "${PID[gw]}") n1=$(ticks "${PID[node]}")
        overflows=$(nstat -z UdpRcvbufErrors | awk '$1 == "UdpRcvbufErrors" { print $2 }')
        python3 -c "
import json, sys
d = json.loads(sys.argv[1])['end']['sum_received']
g, n, hz = map(float, sys.argv[2:5])
gb = d['bytes'] / 1e9
print('%-40s round %d: %-4s %5.2f Gbit/s  gateway %5.2f s/GB  node %5.2f s/GB  UDP overflows %s  %s' % (sys.argv[5], $round, sys.argv[6], d['bits_per_second'] / 1e9, g / hz / gb, n / hz / gb, sys.argv[7], sys.argv[8]))" \
          "$json" "$((g1 - g0))" "$((n1 - n0))" "$hz" "$v" "$dir" "${overflows:-?}" "$(machine_note)"
      done
    fi
    stop gw || true
    stop node || true
    stop nginx-rp || true
  done
done
