# shellcheck shell=bash
# lib.sh - shared by the benchmark scripts (run.sh, soak.sh, tunnel_loopback.sh, http_front.sh):
# tool checks, the release build, re-running inside a private network namespace, started
# processes and their clean-up, a zone with a gateway and node agents, readiness checks, RSS.
#
# Source it, then:
#   bench_outside "$@"         # outside the namespace: checks, build, re-exec in `unshare --net`
#   (inside) netns_init        # lo up, $tmp, clean-up trap
#   zone_create DIR DOMAIN gw=127.0.0.1:4433 n1 [n2 ...]
#   start NAME CMD ARGS...     # background, log in $tmp/NAME.log, PID in ${PID[NAME]}
#   wait_agents ADMIN_ADDR COUNT [TIMEOUT]
# Everything started with `start` is killed (by PID) when the script exits.

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# `cargo install` puts rathole and bore there
PATH=$PATH:${CARGO_HOME:-$HOME/.cargo}/bin
repo_dir=$(cd "$bench_dir/.." && pwd)

# tool_hint TOOL - how to install it.
tool_hint() {
  case $1 in
    iperf3) echo "apt-get install -y iperf3" ;;
    wrk) echo "apt-get install -y wrk" ;;
    h2load) echo "apt-get install -y nghttp2-client" ;;
    nginx) echo "apt-get install -y nginx-light" ;;
    python3) echo "apt-get install -y python3" ;;
    rathole) echo "cargo install rathole (under sudo, on root's PATH: ~root/.cargo/bin, or set PATH)" ;;
    bore) echo "cargo install bore-cli (under sudo, on root's PATH: ~root/.cargo/bin, or set PATH)" ;;
    cargo) echo "https://rustup.rs (or give ZONEGATE= and EXAMPLES_DIR= built elsewhere)" ;;
    ps) echo "apt-get install -y procps" ;;
    dnsperf) echo "apt-get install -y dnsperf" ;;
    dig) echo "apt-get install -y bind9-dnsutils" ;;
    openssl) echo "apt-get install -y openssl" ;;
    unshare) echo "apt-get install -y util-linux" ;;
    ip) echo "apt-get install -y iproute2" ;;
    valgrind) echo "apt-get install -y valgrind" ;;
    nstat) echo "apt-get install -y iproute2" ;;
    *) echo "install $1" ;;
  esac
}

# need_tools TOOL... - exits naming every missing tool and how to install it.
need_tools() {
  local missing=0 tool
  for tool in "$@"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      echo "missing tool: $tool    install: $(tool_hint "$tool")" >&2
      missing=1
    fi
  done
  ((missing == 0)) || exit 1
}

# build_zonegate - sets ZONEGATE (the release binary) unless the caller gave one.
build_zonegate() {
  if [[ -z ${ZONEGATE:-} ]]; then
    echo "# building zonegate (cargo build --release)" >&2
    (cd "$repo_dir" && cargo build --release -q --bin zonegate)
    ZONEGATE=${CARGO_TARGET_DIR:-$repo_dir/target}/release/zonegate
  fi
  [[ -x $ZONEGATE ]] || { echo "no zonegate binary at $ZONEGATE" >&2; exit 1; }
  ZONEGATE=$(realpath "$ZONEGATE")
  export ZONEGATE
}

# build_examples NAME... - builds the root package's examples; sets EXAMPLES_DIR.
build_examples() {
  if [[ -z ${EXAMPLES_DIR:-} ]]; then
    local args=() e
    for e in "$@"; do args+=(--example "$e"); done
    echo "# building examples $* (cargo build --release)" >&2
    (cd "$repo_dir" && cargo build --release -q "${args[@]}")
    EXAMPLES_DIR=${CARGO_TARGET_DIR:-$repo_dir/target}/release/examples
  fi
  for e in "$@"; do
    [[ -x $EXAMPLES_DIR/$e ]] || { echo "no example binary $EXAMPLES_DIR/$e" >&2; exit 1; }
  done
  EXAMPLES_DIR=$(realpath "$EXAMPLES_DIR")
  export EXAMPLES_DIR
}

# in_netns "$@" - true when this is the re-executed copy inside the private namespace.
in_netns() { [[ ${1:-} == --inside ]]; }

# enter_netns SCRIPT ARGS... - re-runs SCRIPT inside a new network namespace (needs root).
enter_netns() {
  local script=$1
  shift
  if [[ $(id -u) != 0 ]]; then
    echo "needs root: runs everything in a private network namespace (unshare --net)" >&2
    exit 1
  fi
  exec unshare --net -- bash "$script" --inside "$@"
}

declare -gA PID=()
pids=()
tmp=
cleanup_hooks=()
# Files made outside $tmp (removed at exit too).
cleanup_files=()

# netns_init - inside the namespace: loopback up, a scratch directory, the clean-up trap.
netns_init() {
  # parse.py own_ticks: the benchmark's processes are this shell's descendants.
  export BENCH_ROOT_PID=$$
  ip link set lo up
  tmp=$(mktemp -d /tmp/zonegate-bench.XXXXXX)
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  # 10,000 proxied connections need ~10,000 descriptors in each of client, gateway, agent.
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
}

cleanup() {
  local i h kids
  set +e
  for h in "${cleanup_hooks[@]}"; do "$h"; done
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    # Only processes still ours: one waited for already (`stop`, or a script's own wait) has
    # been reaped, and its PID may be another program's by now.
    kill -0 "${pids[i]}" 2>/dev/null || continue
    jobs -p | grep -qx "${pids[i]}" || continue
    # a load loop (a bash function started with `start`) may be running a client right now
    mapfile -t kids < <(ps -o pid= --ppid "${pids[i]}" 2>/dev/null)
    kill "${kids[@]}" "${pids[i]}" 2>/dev/null
  done
  for i in "${pids[@]}"; do wait "$i" 2>/dev/null; done
  ((${#cleanup_files[@]})) && rm -f "${cleanup_files[@]}"
  if [[ -n ${KEEP_TMP:-} ]]; then
    echo "# logs kept in $tmp" >&2
  elif [[ -n $tmp ]]; then
    rm -rf "$tmp"
  fi
}

# start NAME CMD ARGS... - runs CMD in the background, output to $tmp/NAME.log.
start() {
  local name=$1
  shift
  "$@" >"$tmp/$name.log" 2>&1 &
  PID[$name]=$!
  pids+=($!)
}

# stop NAME - SIGTERM to a process started with `start`, and waits for it; returns its status.
stop() {
  local p=${PID[$1]:-}
  [[ -n $p ]] || return 0
  kill "$p" 2>/dev/null || true
  local rc=0
  wait "$p" 2>/dev/null || rc=$?
  unset "PID[$1]"
  return "$rc"
}

# alive NAME - the process is still running.
alive() { [[ -n ${PID[$1]:-} ]] && kill -0 "${PID[$1]}" 2>/dev/null; }

zg() { "$ZONEGATE" "$@" >/dev/null; }

# zone_create DIR DOMAIN GW=IP:PORT NODE... - a zone with one gateway and node agents; every
# bundle holds the final zone.json; the gateway gets an empty policy directory.
zone_create() {
  local dir=$1 domain=$2 gw=${3%%=*} gwaddr=${3#*=} d
  shift 3
  zg zone init --domain "$domain" --dir "$dir"
  zg device add "$gw" --zone "$dir" --role gateway --public-addr "$gwaddr"
  for d in "$@"; do zg device add "$d" --zone "$dir" --role node; done
  for d in "$gw" "$@"; do cp "$dir/zone.json" "$dir/devices/$d/zone.json"; done
  mkdir -p "$dir/devices/$gw/policies"
}

# conf_set FILE KEY VALUE - sets a top-level `KEY = VALUE` in a generated gateway.toml or
# node.toml (replaces the line, or appends it; call before appending any [table]).
conf_set() {
  local file=$1 key=$2 value=$3
  if grep -q "^$key = " "$file"; then
    sed -i "s|^$key = .*|$key = $value|" "$file"
  else
    printf '%s = %s\n' "$key" "$value" >>"$file"
  fi
}

# wait_agents ADMIN_ADDR COUNT [TIMEOUT] - until the gateway's /status lists COUNT agents.
wait_agents() {
  python3 - "$1" "$2" "${3:-30}" <<'EOF'
import json, sys, time, urllib.request
admin, want, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end, n = time.time() + limit, -1
while time.time() < end:
    try:
        st = json.load(urllib.request.urlopen(f"http://{admin}/status", timeout=5))
        n = len(st["agents"])
        if n >= want:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.2)
sys.exit(f"gateway {admin}: {n} agents connected after {limit:.0f} s, want {want}")
EOF
}

# agent_count ADMIN_ADDR - agents the gateway lists now.
agent_count() {
  python3 - "$1" <<'EOF'
import json, sys, urllib.request
try:
    print(len(json.load(urllib.request.urlopen(f"http://{sys.argv[1]}/status", timeout=5))["agents"]))
except Exception:
    print(-1)
EOF
}

# tls_cert DIR NAME - a self-signed ECDSA P-256 certificate for NAME (DIR/cert.pem, DIR/key.pem),
# the kind the gateway makes for itself when none is configured; one file pair serves every
# HTTPS contender, so they hand clients the same chain and sign with the same kind of key.
tls_cert() {
  mkdir -p "$1"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -keyout "$1/key.pem" -out "$1/cert.pem" -subj "/CN=$2" -addext "subjectAltName=DNS:$2" \
    2>/dev/null || { echo "openssl could not make a certificate for $2" >&2; exit 1; }
}

# nginx_tls DIR - nginx's TLS lines for the certificate of `tls_cert DIR`, set to what the
# gateway does by default: TLS 1.3 (nginx 1.22 stops at 1.2 unless told) and AES-128-GCM
# chosen by the server (nginx follows the client's order unless told, and wrk's OpenSSL lists
# AES-256-GCM first), so a comparison measures implementations, not settings.
nginx_tls() {
  echo "ssl_certificate $1/cert.pem;
    ssl_certificate_key $1/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_prefer_server_ciphers on;
    ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256;"
}

# http_ready URL [HOST] [TIMEOUT] - until URL answers 200.
http_ready() {
  python3 - "$1" "${2:-}" "${3:-20}" <<'EOF'
import ssl, sys, time, urllib.request
url, host, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
end, err = time.time() + limit, "no answer"
# The benchmarks' HTTPS servers use a certificate made for the run: not verified.
tls = ssl._create_unverified_context() if url.startswith("https:") else None
while time.time() < end:
    try:
        req = urllib.request.Request(url, headers={"Host": host} if host else {})
        with urllib.request.urlopen(req, timeout=2, context=tls) as r:
            if r.status == 200:
                sys.exit(0)
            err = f"status {r.status}"
    except Exception as e:
        err = str(e)
    time.sleep(0.2)
sys.exit(f"{url}: not ready after {limit:.0f} s: {err}")
EOF
}

# port_ready PORT [TIMEOUT] [HOST] - until something listens on HOST:PORT (127.0.0.1).
port_ready() {
  local port=$1 limit=${2:-20} host=${3:-127.0.0.1} i
  for ((i = 0; i < limit * 10; i++)); do
    if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on $host:$port after ${limit} s" >&2
  return 1
}

# cpu_mark - notes the machine's CPU counters (the first line of /proc/stat) in CPU_MARK, and
# the benchmark's own processes' CPU ticks in OWN_MARK (parse.py own_ticks, before the load
# starts); run.sh's `parse` and ab.sh measure from there.
cpu_mark() {
  OWN_MARK=$(python3 "$bench_dir/parse.py" own_ticks)
  read -r CPU_MARK </proc/stat
}

# rss_kib PID - resident set size in KiB (0 if gone).
rss_kib() { awk '/^VmRSS:/ { print $2; f = 1 } END { if (!f) print 0 }' "/proc/$1/status" 2>/dev/null || echo 0; }
# anon_kib PID - its anonymous resident memory (heap, stacks: not the binary's text), KiB.
anon_kib() { awk '/^RssAnon:/ { print $2; f = 1 } END { if (!f) print 0 }' "/proc/$1/status" 2>/dev/null || echo 0; }

# drop_cached FILE - evicts FILE's pages from the page cache (written back first), so a
# process started from it reads (and maps) only what it faults in, with the kernel's
# read-ahead, as on a machine where nothing else has it open.
drop_cached() {
  sync "$1"
  python3 -c 'import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' "$1"
}

# log_problems FILE... - "W warnings, E errors" logged at WARN/ERROR level.
log_problems() {
  local w e
  w=$(cat "$@" 2>/dev/null | grep -c -E ' WARN ' || true)
  e=$(cat "$@" 2>/dev/null | grep -c -E ' ERROR ' || true)
  echo "$w $e"
}

machine_line() {
  echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r)"
}

# nginx_start NAME CONF_BODY [WRAPPER...] - runs an nginx (daemon off) with its own prefix
# under $tmp; WRAPPER (e.g. `ip netns exec NS`) runs it elsewhere.
nginx_start() {
  local name=$1 body=$2 dir=$tmp/$1
  shift 2
  mkdir -p "$dir/logs"
  cat >"$dir/nginx.conf" <<EOF
worker_processes auto;
pid $dir/nginx.pid;
error_log $dir/error.log;
daemon off;
worker_rlimit_nofile 65536;
events { worker_connections 16384; }
http {
  client_body_temp_path $dir/body;
  proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi;
  uwsgi_temp_path $dir/uwsgi;
  scgi_temp_path $dir/scgi;
  keepalive_requests 1000000;
  $body
}
EOF
  start "$name" "$@" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log"
}

# nginx_backend [NAME [LISTEN [WRAPPER...]]] - the service every HTTP benchmark proxies to:
# nginx (NAME nginx-backend) on LISTEN (127.0.0.1:8000) answering every request with 200 "ok",
# no access log.
nginx_backend() {
  local name=${1:-nginx-backend} listen=${2:-127.0.0.1:8000}
  shift $(($# < 2 ? $# : 2))
  nginx_start "$name" "
  access_log off;
  server { listen $listen backlog=4096; location / { return 200 \"ok\n\"; } }" "$@"
}

# nginx_rp [TLS_DIR] - nginx as a plain reverse proxy (NAME nginx-rp, no tunnel) to
# nginx_backend's 127.0.0.1:8000: HTTP/1.1 upstream with a keep-alive pool of 64, access log on
# as shipped, on 127.0.0.1:8080 and, given TLS_DIR (from tls_cert), HTTPS on 127.0.0.1:8443.
nginx_rp() {
  local proxy="
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$remote_addr;
      proxy_set_header X-Forwarded-Proto \$scheme;" https=
  if [[ -n ${1:-} ]]; then
    https="server {
    listen 127.0.0.1:8443 ssl backlog=4096;
    $(nginx_tls "$1")
    location / { $proxy }
  }"
  fi
  nginx_start nginx-rp "
  access_log $tmp/nginx-rp/access.log;
  upstream backend { server 127.0.0.1:8000; keepalive 64; }
  server { listen 127.0.0.1:8080 backlog=4096; location / { $proxy } }
  $https"
}

# front_only GATEWAY_TOML - the gateway serves plain HTTP on 127.0.0.1:18080, no HTTPS, no DNS.
front_only() {
  conf_set "$1" http '"127.0.0.1:18080"'
  conf_set "$1" https '"off"'
  conf_set "$1" dns '"off"'
}
