#!/usr/bin/env bash
# run.sh - issue 8's end-to-end benchmark: zonegate side by side with the direct path, rathole
# (tcp and noise transports), bore and nginx, in ONE run on loopback, contenders interleaved
# (round-robin repetitions, the order rotated each repetition; the report takes medians).
#
#   bulk  bulk TCP throughput, iperf3 upload and download (-R), one stream:
#         direct, zonegate (public tcp app), rathole-tcp, rathole-noise, bore
#   conn  new connections/s: wrk -H 'Connection: close' against nginx (tiny static answer),
#         one TCP connection per request, through each of the above
#   http  keep-alive HTTP/1.1 req/s and p50/p99 (wrk --latency): direct to nginx, nginx as a
#         plain reverse proxy (no tunnel), zonegate's HTTP front (plain HTTP), zonegate tcp
#         app, rathole-tcp, rathole-noise, and the nginx reverse proxy and the front over
#         HTTPS (TLS 1.3, one certificate for both); new connections/s (Connection: close)
#         through the front and nginx's reverse proxy, plain and HTTPS; then latency at half
#         of the front's maximum
#         (h2load --h1 --rps, rate-limited) for direct, nginx reverse proxy and the front
#   mem   RSS: idle node agent; gateway per connected idle agent (AGENTS simulated agents,
#         examples/sim_agents.rs); gateway and agent with IDLE_CONNS concurrent idle proxied
#         connections (examples/idle_conns.rs), none may fail
#   wan   new connections/s as in `conn`, then bulk as in `bulk`, but with the tunnel clients,
#         nginx and iperf3's server in a second namespace ("home") joined to this one ("VPS":
#         wrk, gateway, tunnel servers) by a link with WAN_RTT_MS of round trip
#         (examples/delay_wire.rs: this kernel has no netem); direct = across the link
#
# Usage: benches/run.sh [bulk] [conn] [http] [mem] [wan]     (no argument: all five)
#   SECS=10 REPS=3        seconds per measurement, repetitions per contender
#   CONNS=32 THREADS=1    wrk connections and threads (conn and http)
#   HALF_CLIENTS=16       h2load clients for the half-load latency run (more is not better:
#                         h2load's clients send in step, so N clients make bursts of N requests;
#                         see README.md, "p99 added")
#   AGENTS=1000 IDLE_CONNS=10000 SETTLE=5    mem section sizes; seconds to settle before RSS
#   WAN_RTT_MS=20         wan section: round trip added between "home" and "VPS"
#   ZONEGATE=path         zonegate binary (default: cargo build --release)
#   EXAMPLES_DIR=path     directory with sim_agents, idle_conns, delay_wire (default: cargo build --release --example …)
#   OUT=dir               raw results directory (default benches/results); REPORT=0 skips
#                         rewriting benches/RESULTS.md and benches/results.svg
#   KEEP_TMP=1            keep logs and configs (path printed at exit)
# Writes OUT/<date>.json, then benches/report.py -> benches/RESULTS.md + benches/results.svg.
# Everything runs in a private network namespace (`unshare --net`, needs root; `wan` adds a
# named one, deleted at exit); every process it starts is killed (by PID) on exit.
set -euo pipefail

SECS=${SECS:-10}
REPS=${REPS:-3}
# A round of WARMUP_SECS per contender before the measured ones, not recorded (0: none): the
# first contender of a section otherwise ran on a cold machine and read higher.
WARMUP_SECS=${WARMUP_SECS:-3}
CONNS=${CONNS:-32}
THREADS=${THREADS:-1}
HALF_CLIENTS=${HALF_CLIENTS:-16}
AGENTS=${AGENTS:-1000}
IDLE_CONNS=${IDLE_CONNS:-10000}
SETTLE=${SETTLE:-5}
WAN_RTT_MS=${WAN_RTT_MS:-20}
REPORT=${REPORT:-1}
# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-$bench_dir/results}

if ! in_netns "$@"; then
  sections=("$@")
  ((${#sections[@]})) || sections=(bulk conn http mem wan)
  # ip brings loopback up in every section's namespace; ps lists processes; cargo builds
  # what ZONEGATE/EXAMPLES_DIR do not give.
  tools=(python3 unshare ip ps)
  need_examples=0
  [[ " ${sections[*]} " == *" mem "* || " ${sections[*]} " == *" wan "* ]] && need_examples=1
  if [[ -z ${ZONEGATE:-} ]] || { ((need_examples)) && [[ -z ${EXAMPLES_DIR:-} ]]; }; then
    tools+=(cargo)
  fi
  for s in "${sections[@]}"; do
    case $s in
      bulk) tools+=(iperf3 nginx rathole bore) ;;
      # The contenders' set-up starts iperf3's server and bore in every one of these.
      conn) tools+=(wrk iperf3 nginx rathole bore) ;;
      http) tools+=(wrk h2load iperf3 nginx rathole bore openssl) ;;
      mem) ;;
      wan) tools+=(wrk iperf3 nginx rathole bore ip) ;;
      *) echo "unknown section '$s' (bulk conn http mem wan)" >&2; exit 2 ;;
    esac
  done
  mapfile -t tools < <(printf '%s\n' "${tools[@]}" | sort -u)
  need_tools "${tools[@]}"
  build_zonegate
  examples=()
  if [[ " ${sections[*]} " == *" mem "* ]]; then examples+=(sim_agents idle_conns); fi
  if [[ " ${sections[*]} " == *" wan "* ]]; then
    if ! python3 -c "assert 0 < float('$WAN_RTT_MS') <= 2000" 2>/dev/null; then
      echo "WAN_RTT_MS=$WAN_RTT_MS: give a round trip in milliseconds, above 0 and at most 2000" >&2
      exit 2
    fi
    examples+=(delay_wire)
  fi
  if ((${#examples[@]})); then build_examples "${examples[@]}"; fi
  mkdir -p "$OUT"
  OUT=$(realpath "$OUT")
  export SECS REPS WARMUP_SECS CONNS THREADS HALF_CLIENTS AGENTS IDLE_CONNS SETTLE WAN_RTT_MS REPORT OUT
  enter_netns "$0" "${sections[@]}"
fi

# ---- inside the private namespace ----
shift
sections=("$@")
has() { [[ " ${sections[*]} " == *" $1 "* ]]; }
netns_init
runs=$tmp/runs.jsonl
: >"$runs"
# parse ARGS... - records a measurement (parse.py); one that `cpu_mark` started also gets the
# machine's CPU figures for the time since the mark (parse.py's machine_cpu).
parse() {
  local now own
  own=$(python3 "$bench_dir/parse.py" own_ticks)
  read -r now </proc/stat
  CPU_STAT="${CPU_MARK:-}|$now" OWN_TICKS="${OWN_MARK:-}|$own" python3 "$bench_dir/parse.py" "$@"
  CPU_MARK= OWN_MARK=
}
export BENCH_DATE REPO_DIR=$repo_dir LOAD_BEFORE SECTIONS="${sections[*]}"
BENCH_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
export BENCH_PARAMS
BENCH_PARAMS=$(printf '{"secs":%s,"reps":%s,"warmup_secs":%s,"conns":%s,"threads":%s,"half_clients":%s,"agents":%s,"idle_conns":%s,"settle":%s,"wan_rtt_ms":%s}' \
  "$SECS" "$REPS" "$WARMUP_SECS" "$CONNS" "$THREADS" "$HALF_CLIENTS" "$AGENTS" "$IDLE_CONNS" "$SETTLE" "$WAN_RTT_MS")

echo "# zonegate benchmark: $BENCH_DATE, $(machine_line)"
echo "# sections: ${sections[*]}; SECS=$SECS REPS=$REPS CONNS=$CONNS THREADS=$THREADS; load before: $LOAD_BEFORE"

# Ports. Services: iperf3 5201, nginx 8000 (backend), nginx reverse proxy 8080.
# zonegate: QUIC 4433, admin 9090/9091, tcp apps 15201 (iperf) and 18001 (http), front 18080.
# rathole: control 2333 (tcp) / 2334 (noise); services 25201/28000 (tcp), 26201/28001 (noise).
# bore: control 7835; tunnels 35201 (iperf), 38000 (http).
declare -A IPERF_PORT=([direct]=5201 [zonegate]=15201 [rathole-tcp]=25201 [rathole-noise]=26201 [bore]=35201)
declare -A HTTP_PORT=([direct]=8000 [zonegate]=18001 [rathole-tcp]=28000 [rathole-noise]=28001 [bore]=38000
  [nginx-rp]=8080 [zonegate-front]=18080 [zonegate-tcp]=18001 [nginx-rp-tls]=8443 [zonegate-front-tls]=18443)
TUNNELS=(direct zonegate rathole-tcp rathole-noise bore)
HTTP_PATHS=(direct nginx-rp zonegate-front zonegate-tcp rathole-tcp rathole-noise nginx-rp-tls zonegate-front-tls)
HALF_PATHS=(direct nginx-rp zonegate-front)
FRONT_CONN_PATHS=(nginx-rp zonegate-front nginx-rp-tls zonegate-front-tls)

# first_rep - 0 when a warm-up round runs (WARMUP_SECS), else 1.
first_rep() { if ((WARMUP_SECS > 0)); then echo 0; else echo 1; fi; }
# rep_secs REP - the seconds of a measurement in round REP (0: the warm-up).
rep_secs() { if (($1 == 0)); then echo "$WARMUP_SECS"; else echo "$MAIN_SECS"; fi; }
MAIN_SECS=$SECS

# rotated REP NAME... - NAME... rotated left by REP-1, so no contender always runs first.
rotated() {
  local rep=$1
  shift
  local n=$# i
  local a=("$@")
  for ((i = 0; i < n; i++)); do echo "${a[(i + rep - 1) % n]}"; done
}

# rathole_start PREFIX SERVER_HOST TCP_PORTS NOISE_PORTS [WRAPPER...] - a rathole server and
# client per transport (tcp, noise), each serving iperf3 (127.0.0.1:5201) and nginx
# (127.0.0.1:8000); PORTS = CONTROL,IPERF,HTTP: the server's control port on SERVER_HOST and
# its service ports on 127.0.0.1. WRAPPER (e.g. `ip netns exec NS`) runs the clients.
rathole_start() {
  local prefix=$1 host=$2 tcp_ports=$3 noise_ports=$4
  shift 4
  local keys priv pub t ctl ip hp rdir
  keys=$(rathole --genkey)
  priv=$(awk '/Private Key:/ { getline; print; exit }' <<<"$keys")
  pub=$(awk '/Public Key:/ { getline; print; exit }' <<<"$keys")
  for t in tcp noise; do
    # rathole watches its config file's directory (hot reload) and wakes on every change in
    # it: kept out of $tmp, where every contender's log is written, or each log line would
    # cost four rathole processes a wake-up (seen: ~30% of a core during the HTTP runs).
    rdir=$tmp/$prefix-$t
    mkdir -p "$rdir"
    if [[ $t == tcp ]]; then IFS=, read -r ctl ip hp <<<"$tcp_ports"; else IFS=, read -r ctl ip hp <<<"$noise_ports"; fi
    {
      printf '[server]\nbind_addr = "%s:%s"\n[server.transport]\ntype = "%s"\n' "$host" "$ctl" "$t"
      [[ $t == noise ]] && printf '[server.transport.noise]\nlocal_private_key = "%s"\n' "$priv"
      printf '[server.services.iperf]\ntoken = "bench"\nbind_addr = "127.0.0.1:%s"\n' "$ip"
      printf '[server.services.http]\ntoken = "bench"\nbind_addr = "127.0.0.1:%s"\n' "$hp"
    } >"$rdir/server.toml"
    {
      printf '[client]\nremote_addr = "%s:%s"\n[client.transport]\ntype = "%s"\n' "$host" "$ctl" "$t"
      [[ $t == noise ]] && printf '[client.transport.noise]\nremote_public_key = "%s"\n' "$pub"
      printf '[client.services.iperf]\ntoken = "bench"\nlocal_addr = "127.0.0.1:5201"\n'
      printf '[client.services.http]\ntoken = "bench"\nlocal_addr = "127.0.0.1:8000"\n'
    } >"$rdir/client.toml"
    start "$prefix-$t-server" rathole --server "$rdir/server.toml"
    start "$prefix-$t-client" "$@" rathole --client "$rdir/client.toml"
  done
}

# ---------------------------------------------------------------------------------------------
# contenders for bulk / conn / http
setup_contenders() {
  start iperf3-server iperf3 -s -p 5201
  nginx_backend
  if has http; then
    # HTTPS: nginx and the gateway serve the same certificate, TLS 1.3 and AES-128-GCM.
    tls_cert "$tmp/tls" bench.example
    nginx_rp "$tmp/tls"
  fi

  # zonegate: one gateway, one node agent, default settings (info log: a line per connection
  # and per HTTP request, to a file, as nginx's access log).
  Z=$tmp/zone
  zone_create "$Z" bench.example gw=127.0.0.1:4433 n1
  cat >"$Z/devices/gw/policies/bench.toml" <<'EOF'
[app.iperf]
tcp = { listen = "127.0.0.1:15201" }
to = "n1/iperf"
allow = { from = ["public"] }

[app.http]
tcp = { listen = "127.0.0.1:18001" }
to = "n1/http"
allow = { from = ["public"] }

[app.web]
http = { host = "bench.example" }
to = "n1/http"
allow = { from = ["public"] }
EOF
  local gw_conf=$Z/devices/gw/gateway.toml
  front_only "$gw_conf"
  if has http; then
    conf_set "$gw_conf" https '"127.0.0.1:18443"'
    printf '[[tls]]\ncert = "%s"\nkey = "%s"\n' "$tmp/tls/cert.pem" "$tmp/tls/key.pem" >>"$gw_conf"
  fi
  start zg-gateway "$ZONEGATE" gateway --config "$gw_conf"
  start zg-node "$ZONEGATE" node --config "$Z/devices/n1/node.toml" \
    --service iperf=127.0.0.1:5201 --service http=127.0.0.1:8000

  # rathole, both transports, default settings otherwise
  rathole_start rathole 127.0.0.1 2333,25201,28000 2334,26201,28001

  # bore: server and one `bore local` per exposed port
  start bore-server bore server --bind-addr 127.0.0.1 --min-port 35000 --max-port 39000
  port_ready 7835
  start bore-iperf bore local 5201 --local-host 127.0.0.1 --to 127.0.0.1 --port 35201
  start bore-http bore local 8000 --local-host 127.0.0.1 --to 127.0.0.1 --port 38000

  # ready: every contender answers HTTP through its tunnel
  local c
  wait_agents 127.0.0.1:9090 1 20 || { cat "$tmp/zg-gateway.log" "$tmp/zg-node.log" >&2; exit 1; }
  for c in direct zonegate rathole-tcp rathole-noise bore; do
    http_ready "http://127.0.0.1:${HTTP_PORT[$c]}/" "" 30 || { tail -n 20 "$tmp"/*.log >&2; exit 1; }
  done
  if has http; then
    http_ready http://127.0.0.1:8080/ || exit 1
    http_ready http://127.0.0.1:18080/ bench.example || exit 1
    http_ready https://127.0.0.1:8443/ || exit 1
    http_ready https://127.0.0.1:18443/ bench.example || exit 1
  fi
  port_ready 5201
}

# ---------------------------------------------------------------------------------------------
run_bulk() {
  echo "## bulk TCP throughput: iperf3 -t $SECS, upload and download (-R), Gbit/s"
  local rep c f
  for ((rep = $(first_rep); rep <= REPS; rep++)); do
    local SECS
    SECS=$(rep_secs "$rep")
    for c in $(rotated "$rep" "${TUNNELS[@]}"); do
      f=$tmp/iperf.json
      cpu_mark
      timeout $((SECS + 30)) iperf3 -c 127.0.0.1 -p "${IPERF_PORT[$c]}" -t "$SECS" -J >"$f" 2>&1 || true
      parse iperf3 "$runs" bulk-up "$c" "$rep" "$f"
      cpu_mark
      timeout $((SECS + 30)) iperf3 -c 127.0.0.1 -p "${IPERF_PORT[$c]}" -t "$SECS" -J -R >"$f" 2>&1 || true
      parse iperf3 "$runs" bulk-down "$c" "$rep" "$f"
    done
  done
}

run_conn() {
  echo "## new connections/s: wrk -t$THREADS -c$CONNS -d${SECS}s -H 'Connection: close' -> nginx"
  local rep c
  for ((rep = $(first_rep); rep <= REPS; rep++)); do
    local SECS
    SECS=$(rep_secs "$rep")
    for c in $(rotated "$rep" "${TUNNELS[@]}"); do
      cpu_mark
      timeout $((SECS + 30)) wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" --timeout 10s \
        -H 'Connection: close' "http://127.0.0.1:${HTTP_PORT[$c]}/" >"$tmp/wrk.out" 2>&1 || true
      parse wrk "$runs" conn "$c" "$rep" "$tmp/wrk.out"
    done
  done
}

# wrk_paths TEST PATH... [-- WRK_ARG...] - REPS rounds of wrk --latency through each PATH
# (HTTPS for the *-tls ones), recorded as TEST.
wrk_paths() {
  local test=$1 rep c scheme paths=() extra=()
  shift
  while (($#)) && [[ $1 != -- ]]; do paths+=("$1"); shift; done
  (($#)) && { shift; extra=("$@"); }
  for ((rep = $(first_rep); rep <= REPS; rep++)); do
    local SECS
    SECS=$(rep_secs "$rep")
    for c in $(rotated "$rep" "${paths[@]}"); do
      scheme=http
      [[ $c == *-tls ]] && scheme=https
      cpu_mark
      timeout $((SECS + 30)) wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" --timeout 10s --latency \
        -H 'Host: bench.example' "${extra[@]}" "$scheme://127.0.0.1:${HTTP_PORT[$c]}/" >"$tmp/wrk.out" 2>&1 || true
      parse wrk "$runs" "$test" "$c" "$rep" "$tmp/wrk.out"
    done
  done
}

run_http() {
  echo "## keep-alive HTTP/1.1: wrk -t$THREADS -c$CONNS -d${SECS}s --latency"
  wrk_paths http "${HTTP_PATHS[@]}"
  echo "## new connections through the front and nginx's reverse proxy: wrk -t$THREADS -c$CONNS -d${SECS}s -H 'Connection: close'"
  wrk_paths http-conn "${FRONT_CONN_PATHS[@]}" -- -H 'Connection: close'

  local max rate per
  max=$(parse get "$runs" http zonegate-front rps)
  if [[ -z $max ]]; then
    echo "## half-load latency: skipped (no maximum measured for the front)"
    return
  fi
  max=$(python3 -c "print(round($max))")
  rate=$(python3 -c "print(round($max / 2))")
  per=$(python3 -c "print(round($max / 2 / $HALF_CLIENTS, 1))")
  echo "## latency at half of the front's maximum ($max req/s): h2load --h1 -c$HALF_CLIENTS --rps $per (= $rate req/s) -D $SECS"
  for ((rep = $(first_rep); rep <= REPS; rep++)); do
    local SECS
    SECS=$(rep_secs "$rep")
    for c in $(rotated "$rep" "${HALF_PATHS[@]}"); do
      rm -f "$tmp/h2.log"
      cpu_mark
      timeout $((SECS + 30)) h2load --h1 -c"$HALF_CLIENTS" --rps="$per" -D "$SECS" \
        -H ':authority: bench.example' --log-file="$tmp/h2.log" \
        "http://127.0.0.1:${HTTP_PORT[$c]}/" >"$tmp/h2.out" 2>&1 || true
      parse h2load "$runs" http-half "$c" "$rep" "$tmp/h2.out" "$tmp/h2.log" "$rate"
    done
  done
}

# ---------------------------------------------------------------------------------------------
# mem: a zone of its own (mem.example), so the gateway measured has served nothing else.
run_mem() {
  echo "## memory (RSS): idle agent; gateway with $AGENTS idle agents; $IDLE_CONNS idle proxied connections"
  local ZM=$tmp/memzone
  zone_create "$ZM" mem.example gwm=127.0.0.1:4434 m1
  cat >"$ZM/devices/gwm/policies/mem.toml" <<'EOF'
[app.echo]
tcp = { listen = "127.0.0.1:19000" }
to = "m1/echo"
allow = { from = ["public"] }
EOF
  local gw_conf=$ZM/devices/gwm/gateway.toml node_conf=$ZM/devices/m1/node.toml
  conf_set "$gw_conf" admin '"127.0.0.1:9190"'
  conf_set "$gw_conf" http '"off"'
  conf_set "$gw_conf" https '"off"'
  conf_set "$gw_conf" dns '"off"'
  # All IDLE_CONNS come from 127.0.0.1: above the default per-client cap (1,024), at most tcp_connections (16,384).
  conf_set "$gw_conf" tcp_connections_per_ip "$((IDLE_CONNS > 16384 ? 16384 : IDLE_CONNS))"
  conf_set "$node_conf" admin '"127.0.0.1:9191"'

  start echo "$EXAMPLES_DIR/idle_conns" echo --listen 127.0.0.1:7007
  start gwm "$ZONEGATE" gateway --config "$gw_conf"
  wait_agents 127.0.0.1:9190 0 20
  sleep "$SETTLE"
  local gw_empty gw_one agent_idle
  gw_empty=$(rss_kib "${PID[gwm]}")
  # The idle agent twice. First from the binary the gateway runs: most of an idle agent's RSS
  # is the binary's text, and the pages it maps depend on what the page cache holds (each
  # fault maps its cached neighbours), so this figure counts text the gateway brought in.
  # Then - the figure the target judges - from a copy of its own whose cached pages are
  # dropped first, as on a node where nothing else runs zonegate. Its anonymous memory
  # (RssAnon: heap, stacks) beside.
  start m1 "$ZONEGATE" node --config "$node_conf" --service echo=127.0.0.1:7007
  wait_agents 127.0.0.1:9190 1 20 || { cat "$tmp/gwm.log" "$tmp/m1.log" >&2; exit 1; }
  sleep "$SETTLE"
  local agent_shared agent_anon
  agent_shared=$(rss_kib "${PID[m1]}")
  stop m1 || true
  # Gone from the gateway's list before the copy starts, so that the count of one below is
  # the copy connected (wait_agents waits for at least COUNT).
  for ((i = 0; i < 100; i++)); do
    [[ $(agent_count 127.0.0.1:9190) -eq 0 ]] && break
    sleep 0.2
  done
  # On disk, not tmpfs: a tmpfs file's pages cannot be dropped from memory, and a copy there
  # would be mapped whole.
  local node_bin
  node_bin=$(mktemp -p "$(dirname "$ZONEGATE")" .zonegate-node.XXXXXX)
  cleanup_files+=("$node_bin")
  cp "$ZONEGATE" "$node_bin"
  chmod 755 "$node_bin"
  if [[ $(stat -f -c %T "$node_bin") == tmpfs ]]; then
    echo "note: $node_bin is on tmpfs: its pages cannot be dropped from the page cache" >&2
  fi
  drop_cached "$node_bin"
  start m1 "$node_bin" node --config "$node_conf" --service echo=127.0.0.1:7007
  wait_agents 127.0.0.1:9190 1 20 || { cat "$tmp/gwm.log" "$tmp/m1.log" >&2; exit 1; }
  sleep "$SETTLE"
  agent_idle=$(rss_kib "${PID[m1]}")
  agent_anon=$(anon_kib "${PID[m1]}")
  gw_one=$(rss_kib "${PID[gwm]}")
  parse put "$runs" mem-agent node 1 idle_rss_kib="$agent_idle" idle_anon_kib="$agent_anon" \
    shared_binary_rss_kib="$agent_shared"

  # AGENTS simulated agents (real handshake, hello and keep-alives; one UDP socket each)
  local line n gw_n sim_rss rc=0 i
  start sim "$EXAMPLES_DIR/sim_agents" --zone "$ZM" --gateway gwm=127.0.0.1:4434 \
    --count "$AGENTS" --out "$tmp/sim-bundles" --timeout 300
  for ((i = 0; i < 3000; i++)); do
    line=$(grep -m1 '^{' "$tmp/sim.log" || true)
    [[ -n $line ]] && break
    alive sim || break
    sleep 0.1
  done
  if [[ -z ${line:-} ]]; then
    echo "sim_agents did not bring its agents up:" >&2
    tail -n 20 "$tmp/sim.log" >&2
    parse put "$runs" mem-gateway agents 1 agents="$AGENTS" connected=0 error=sim_agents_failed
  else
    wait_agents 127.0.0.1:9190 $((AGENTS + 1)) 60 || true
    sleep "$SETTLE"
    gw_n=$(rss_kib "${PID[gwm]}")
    sim_rss=$(rss_kib "${PID[sim]}")
    n=$(agent_count 127.0.0.1:9190)
    stop sim || rc=$?
    read -r warns errs < <(log_problems "$tmp/gwm.log")
    parse put "$runs" mem-gateway agents 1 agents="$AGENTS" connected=$((n - 1)) \
      log_warnings="$warns" log_errors="$errs" \
      gw_empty_kib="$gw_empty" gw_one_agent_kib="$gw_one" gw_with_agents_kib="$gw_n" \
      per_agent_kib="$(python3 -c "print(round(($gw_n - $gw_one) / max($n - 1, 1), 2))")" \
      sim_rss_kib="$sim_rss" sim_exit="$rc" \
      connect_secs="$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['connect_secs'])" "$line")"
  fi
  # the simulated agents said goodbye: back to one agent
  for ((i = 0; i < 300; i++)); do
    [[ $(agent_count 127.0.0.1:9190) -le 1 ]] && break
    sleep 0.1
  done

  # IDLE_CONNS concurrent idle connections through the tcp app -> m1 -> echo, on a restarted
  # gateway (the agents' test leaves memory in the allocator); m1 reconnects by itself.
  local gw_before ag_before gw_after ag_after open_json after_json
  mv "$tmp/gwm.log" "$tmp/gwm-agents.log"
  stop gwm || true
  start gwm "$ZONEGATE" gateway --config "$gw_conf"
  wait_agents 127.0.0.1:9190 1 60 || { tail -n 20 "$tmp/gwm.log" "$tmp/m1.log" >&2; exit 1; }
  sleep "$SETTLE"
  gw_before=$(rss_kib "${PID[gwm]}")
  ag_before=$(rss_kib "${PID[m1]}")
  rm -f "$tmp/hold.ready"
  start hold "$EXAMPLES_DIR/idle_conns" hold --connect 127.0.0.1:19000 --count "$IDLE_CONNS" \
    --ready-file "$tmp/hold.ready" --hold $((SETTLE + 5))
  for ((i = 0; i < 6000; i++)); do
    [[ -e $tmp/hold.ready ]] && break
    alive hold || break
    sleep 0.1
  done
  sleep "$SETTLE"
  gw_after=$(rss_kib "${PID[gwm]}")
  ag_after=$(rss_kib "${PID[m1]}")
  rc=0
  wait "${PID[hold]}" || rc=$?
  unset "PID[hold]"
  open_json=$(grep -m1 '"phase":"open"' "$tmp/hold.log" || echo '{}')
  after_json=$(grep -m1 '"phase":"after_hold"' "$tmp/hold.log" || echo '{}')
  read -r warns errs < <(log_problems "$tmp/gwm.log" "$tmp/m1.log")
  python3 - "$runs" "$open_json" "$after_json" <<EOF
import json, sys
o, a = json.loads(sys.argv[2]), json.loads(sys.argv[3])
ok = o.get("ok", 0)
m = {"requested": $IDLE_CONNS, "ok": ok, "failed": o.get("failed"),
     "not_tried": $IDLE_CONNS - o.get("tried", 0), "open_errors": o.get("errors"),
     "open_secs": o.get("open_secs"), "still_ok_after_hold": a.get("still_ok"),
     "hold_errors": a.get("errors"), "exit": $rc,
     "gw_before_kib": $gw_before, "gw_after_kib": $gw_after,
     "agent_before_kib": $ag_before, "agent_after_kib": $ag_after,
     "gw_per_conn_kib": round(($gw_after - $gw_before) / ok, 2) if ok else None,
     "agent_per_conn_kib": round(($ag_after - $ag_before) / ok, 2) if ok else None,
     "log_warnings": $warns, "log_errors": $errs}
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"test": "mem-conns", "contender": "idle", "rep": 1, "metrics": m}) + "\n")
print("  mem-conns  " + " ".join(f"{k}={v}" for k, v in m.items()), flush=True)
EOF
  if ((rc != 0)); then
    echo "  idle connections: not all opened and held (see above)" >&2
    grep -h -E ' (WARN|ERROR) ' "$tmp/gwm.log" "$tmp/m1.log" | tail -n 5 >&2 || true
  fi
  stop m1 || true
  stop gwm || true
  stop echo || true
}

# ---------------------------------------------------------------------------------------------
# wan: the agents live at home, the gateway on a VPS. A second namespace ("home": nginx,
# iperf3's server, the zonegate node agent, the rathole clients, bore's clients) is joined to
# this one ("VPS": wrk, the gateway, the rathole and bore servers) by delay_wire, WAN_RTT_MS of
# round trip. What differs from `conn` is what each design pays in round trips per new
# connection: zonegate opens a QUIC stream on its standing connection (the request rides with
# the stream's first bytes), rathole hands the visitor a pooled data channel (8 made ahead; one
# more, a new TCP connection from the client, requested per visitor), bore asks its client for
# a new TCP connection per visitor. Bulk then shows whether each fills the path.
wan_ns=
wan_down() { [[ -z $wan_ns ]] || ip netns del "$wan_ns" 2>/dev/null; }

run_wan() {
  local one_way
  one_way=$(python3 -c "print($WAN_RTT_MS / 2)")
  echo "## new connections/s over a link with ${WAN_RTT_MS} ms round trip: wrk -t$THREADS -c$CONNS -d${SECS}s -H 'Connection: close' -> nginx at \"home\""
  wan_ns=zgbench-$$-home
  cleanup_hooks+=(wan_down)
  ip netns add "$wan_ns"
  ip -n "$wan_ns" link set lo up
  local H=(ip netns exec "$wan_ns")
  start delay-wire "$EXAMPLES_DIR/delay_wire" --delay-ms "$one_way" --a wan0 --b wan0 \
    --b-netns "/run/netns/$wan_ns"
  local i
  for ((i = 0; i < 100; i++)); do
    ip link show wan0 >/dev/null 2>&1 && ip -n "$wan_ns" link show wan0 >/dev/null 2>&1 && break
    alive delay-wire || break
    sleep 0.1
  done
  ip -n "$wan_ns" link show wan0 >/dev/null 2>&1 || { cat "$tmp/delay-wire.log" >&2; exit 1; }
  ip addr add 10.99.0.1 peer 10.99.0.2 dev wan0
  ip link set wan0 up txqueuelen 10000
  ip -n "$wan_ns" addr add 10.99.0.2 peer 10.99.0.1 dev wan0
  ip -n "$wan_ns" link set wan0 up txqueuelen 10000

  nginx_backend wan-backend 8000 "${H[@]}"
  start wan-iperf3 "${H[@]}" iperf3 -s -p 5201

  # zonegate: a zone of its own; the gateway's QUIC on the VPS side of the link
  local ZW=$tmp/wanzone
  zone_create "$ZW" wan.example gww=10.99.0.1:4443 h1
  printf '%s\n' '[app.http]' 'tcp = { listen = "127.0.0.1:19001" }' 'to = "h1/http"' \
    'allow = { from = ["public"] }' '[app.iperf]' 'tcp = { listen = "127.0.0.1:19002" }' \
    'to = "h1/iperf"' 'allow = { from = ["public"] }' >"$ZW/devices/gww/policies/wan.toml"
  local gw_conf=$ZW/devices/gww/gateway.toml
  conf_set "$gw_conf" listen '"10.99.0.1:4443"'
  conf_set "$gw_conf" admin '"127.0.0.1:9290"'
  conf_set "$gw_conf" http '"off"'
  conf_set "$gw_conf" https '"off"'
  conf_set "$gw_conf" dns '"off"'
  start wan-zg-gateway "$ZONEGATE" gateway --config "$gw_conf"
  start wan-zg-node "${H[@]}" "$ZONEGATE" node --config "$ZW/devices/h1/node.toml" \
    --service http=127.0.0.1:8000 --service iperf=127.0.0.1:5201

  # rathole, both transports; servers on the VPS side, clients at home
  rathole_start wan-rathole 10.99.0.1 2433,29100,29000 2434,29101,29001 "${H[@]}"

  # bore: server on the VPS side (control 10.99.0.1:7835), its tunnel port 39000 there too
  start wan-bore-server bore server --bind-addr 10.99.0.1 --min-port 39000 --max-port 39999
  port_ready 7835 10 10.99.0.1
  start wan-bore-http "${H[@]}" bore local 8000 --local-host 127.0.0.1 --to 10.99.0.1 --port 39000
  start wan-bore-iperf "${H[@]}" bore local 5201 --local-host 127.0.0.1 --to 10.99.0.1 --port 39001

  local -A url=([direct]=http://10.99.0.2:8000/ [zonegate]=http://127.0.0.1:19001/
    [rathole-tcp]=http://127.0.0.1:29000/ [rathole-noise]=http://127.0.0.1:29001/
    [bore]=http://10.99.0.1:39000/)
  local -A iperf=([direct]=10.99.0.2:5201 [zonegate]=127.0.0.1:19002 [rathole-tcp]=127.0.0.1:29100
    [rathole-noise]=127.0.0.1:29101 [bore]=10.99.0.1:39001)
  wait_agents 127.0.0.1:9290 1 30 || { tail -n 20 "$tmp"/wan-zg-*.log >&2; exit 1; }
  local c
  for c in "${TUNNELS[@]}"; do
    http_ready "${url[$c]}" "" 30 || { tail -n 20 "$tmp"/wan-*.log >&2; exit 1; }
  done

  # the link as measured: TCP connect time across it (one round trip), median of 20
  local rtt
  rtt=$(python3 -c '
import socket, statistics, time
ts = []
for _ in range(20):
    t = time.perf_counter()
    socket.create_connection(("10.99.0.2", 8000), timeout=5).close()
    ts.append((time.perf_counter() - t) * 1000)
print(round(statistics.median(ts), 2))')
  echo "  link: ${WAN_RTT_MS} ms round trip configured; a TCP connect across it takes ${rtt} ms (median of 20)"

  local rep
  for ((rep = $(first_rep); rep <= REPS; rep++)); do
    local SECS
    SECS=$(rep_secs "$rep")
    for c in $(rotated "$rep" "${TUNNELS[@]}"); do
      cpu_mark
      timeout $((SECS + 30)) wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" --timeout 10s --latency \
        -H 'Connection: close' "${url[$c]}" >"$tmp/wrk.out" 2>&1 || true
      parse wrk "$runs" wan-conn "$c" "$rep" "$tmp/wrk.out"
    done
  done
  echo "## bulk TCP throughput over the link: iperf3 -t $SECS, upload (VPS -> home) and download (-R)"
  local f=$tmp/iperf.json
  for ((rep = $(first_rep); rep <= REPS; rep++)); do
    local SECS
    SECS=$(rep_secs "$rep")
    for c in $(rotated "$rep" "${TUNNELS[@]}"); do
      cpu_mark
      timeout $((SECS + 30)) iperf3 -c "${iperf[$c]%:*}" -p "${iperf[$c]##*:}" -t "$SECS" -J >"$f" 2>&1 || true
      parse iperf3 "$runs" wan-bulk-up "$c" "$rep" "$f"
      cpu_mark
      timeout $((SECS + 30)) iperf3 -c "${iperf[$c]%:*}" -p "${iperf[$c]##*:}" -t "$SECS" -J -R >"$f" 2>&1 || true
      parse iperf3 "$runs" wan-bulk-down "$c" "$rep" "$f"
    done
  done

  for c in wan-zg-node wan-zg-gateway wan-bore-http wan-bore-iperf wan-bore-server wan-backend wan-iperf3 \
    wan-rathole-tcp-client wan-rathole-tcp-server wan-rathole-noise-client wan-rathole-noise-server; do
    stop "$c" || true
  done
  read -r warns errs < <(log_problems "$tmp/wan-zg-gateway.log" "$tmp/wan-zg-node.log")
  parse put "$runs" logs wan-zonegate 1 warnings="$warns" errors="$errs"
  # what the link carried, and whether it lost anything (delay_wire prints its counts on exit)
  stop delay-wire || true
  parse wire "$runs" "$WAN_RTT_MS" "$rtt" "$tmp/delay-wire.log"
  wan_down
  wan_ns=
}

# ---------------------------------------------------------------------------------------------
if has bulk || has conn || has http; then setup_contenders; fi
if has bulk; then run_bulk; fi
if has conn; then run_conn; fi
if has http; then run_http; fi
if has mem; then run_mem; fi
if has wan; then run_wan; fi

if [[ -n ${PID[zg-gateway]:-} ]]; then
  read -r warns errs < <(log_problems "$tmp/zg-gateway.log" "$tmp/zg-node.log")
  parse put "$runs" logs zonegate 1 warnings="$warns" errors="$errs"
fi
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
stamp=$(date -u -d "$BENCH_DATE" +%Y-%m-%dT%H%MZ)
parse assemble "$runs" "$OUT/$stamp.json"
if [[ $REPORT != 0 ]]; then
  python3 "$bench_dir/report.py" "$OUT/$stamp.json"
fi
