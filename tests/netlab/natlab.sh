#!/usr/bin/env bash
# natlab.sh - NAT test lab for zonegate's integration tests: built purely from network namespaces,
# veth pairs and nftables.  Project copy of shared/netlab/natlab.sh; see "Differences" below.
#
#                      namespace "inet" (bridge br0 = the "public internet" 203.0.113.0/24)
#        +----------------+----------------+----------------+----------------+
#        |                |                |                |                |
#   vps  eth0        nat1 wan0        nat2 wan0        nat3 wan0       client eth0
#   203.0.113.10     203.0.113.21     203.0.113.22     203.0.113.23    203.0.113.50
#                    nat1 lan0        nat2 lan0 (br)   nat3 lan0
#                    192.168.1.1/24   192.168.2.1/24   192.168.3.1/24
#                        |             |         |         |
#                    home1 eth0   home2 eth0  home2b eth0  home3 eth0
#                    192.168.1.10 192.168.2.10 192.168.2.11 192.168.3.10  (default route via .1)
#
# nat2's LAN is a switch (a bridge) with two hosts, so two devices share one (symmetric) NAT.
#
# Every namespace name above carries the lab's prefix: with NATLAB_PREFIX=zt3a- the hosts are
# zt3a-inet, zt3a-vps, zt3a-home1, ...  Addresses and interface names are the same in every lab
# (namespaces are isolated), so any number of labs can exist side by side.
#
# NAT behaviour (RFC 4787 terms):
#   nat1  "full-cone-ish": masquerade WITHOUT random flags -> Linux keeps the source port when it is
#         free, so mapping is endpoint-independent (EIM) in practice.  For UDP it also does
#         endpoint-independent filtering (EIF): every outbound UDP flow records
#         <external port> -> <internal ip . port> in a dynamic nft map (timeout ${EIM_TIMEOUT});
#         unsolicited inbound UDP to 203.0.113.21:<that port> from ANY host is DNATed to the
#         internal endpoint.  TCP (and UDP to unknown ports) from outside is dropped.
#   nat3  same as nat1 (a second cone NAT, so two homes can reach each other by hole punching).
#   nat2  "symmetric": masquerade fully-random -> every new 5-tuple gets a fresh random external
#         port (endpoint-dependent mapping); filtering is plain conntrack (address+port dependent).
#         All unsolicited inbound is dropped.
#   All routers: forward policy drop except LAN->WAN and established/related (+ DNATed on nat1/3);
#   input policy drop from WAN except established/related and ICMP echo.
#   No router has a route for the other home LANs and vps/client have no route to 192.168.0.0/16.
#   Idle UDP conntrack entries expire after 30 s (kernel default), MTU is 1500 end to end.
#
# Nothing is created in the root namespace (veths are created directly inside the namespaces).
#
# Usage: natlab.sh [-p|--prefix PFX] COMMAND ...     (PFX defaults to $NATLAB_PREFIX, else "")
#   up [--force]           build the lab; no-op if it is already complete, rebuilds if partly there
#   reset                  = up --force (tear down, incl. killing processes inside, and rebuild)
#   down                   kill processes running inside this lab's namespaces (by PID, found with
#                          `ip netns pids`) and delete the namespaces; other labs are untouched
#   status                 addresses of every host, nft rulesets of the routers
#   flush-conntrack NAT    forget every NAT mapping of router NAT (nat1|nat2|nat3): conntrack table
#                          flushed (conntrack -F, else a raw ctnetlink flush from python3) and, on
#                          the cone routers, the EIM map emptied.  Afterwards a home's next packet
#                          gets a new mapping (a new random port on nat2; the same port on nat1/3
#                          since they preserve ports) and inbound packets that matched the old
#                          mapping are dropped until the home sends again.
#   netem NS IFACE "SPEC"  impair egress of IFACE in host NS (e.g. netem home1 eth0 "loss 5%").
#                          Uses `tc qdisc replace ... netem SPEC` when the kernel has sch_netem.
#                          Without it (this project's CI kernel has none) it falls back to: loss
#                          via an nft netdev-egress rule (numgen random, silent like netem), rate
#                          via tbf; anything else (delay, duplicate, reorder, corrupt) exits with
#                          status 3 = unsupported on this kernel.
#   netem-clear NS IFACE   remove what `netem` installed on IFACE
#   divert-udp NAT IP:PORT LPORT
#                          on router NAT (nat1|nat2|nat3), DNAT new UDP flows from its LAN to IP:PORT
#                          to the router's own LAN address (192.168.N.1) port LPORT, where a
#                          userspace relay can run (e.g. tests/netlab/udpdelay.py: delay without
#                          sch_netem).  Conntrack un-DNATs the relay's replies, so the home sees
#                          answers from IP:PORT.  Flows already in conntrack keep their path until
#                          they expire or `flush-conntrack NAT`.  Table `ip natlab_divert`.
#   divert-clear NAT       remove every divert-udp rule of NAT (existing flows keep their NAT
#                          binding until flushed)
#   gc                     tear down labs whose owner process is gone: for each
#                          /run/natlab/PFX.owner holding "PID [START]" of a process gone (dead, or
#                          its PID reused: START, field 22 of /proc/PID/stat, differs), `down` it
#
# Differences from shared/netlab/natlab.sh: the name prefix (flag or NATLAB_PREFIX) and its
# validation; fewer `ip netns exec` calls (sysctls batched), so `up` is about twice as fast;
# `down` polls instead of a fixed 0.3 s sleep and tolerates a concurrent `down`; new commands
# flush-conntrack, netem, netem-clear, divert-udp, divert-clear and gc; `up` writes nothing
# outside /run/netns (the /run/natlab/*.owner files are written by the Rust harness, which
# reserves a prefix there); nat2's LAN is a bridge with a second host, home2b; missing tools
# are said (exit 3), not installed (a test run must not reach package mirrors).
set -euo pipefail

PREFIX=${NATLAB_PREFIX:-}
if [[ ${1:-} == -p || ${1:-} == --prefix ]]; then
  PREFIX=${2:?--prefix needs a value}
  shift 2
fi
# short, shell- and netns-safe; the empty prefix gives the shared script's names
if [[ -n $PREFIX && ! $PREFIX =~ ^[a-z0-9][a-z0-9_-]{0,11}$ ]]; then
  echo "natlab: bad prefix '$PREFIX' (want [a-z0-9][a-z0-9_-]{0,11})" >&2
  exit 2
fi
P=$PREFIX

HOSTS=(inet vps client nat1 nat2 nat3 home1 home2 home2b home3)
NSES=("${HOSTS[@]/#/$P}")
PUB_NET=203.0.113
EIM_TIMEOUT=${EIM_TIMEOUT:-120s}
OWNER_DIR=/run/natlab

log() { printf '[natlab %s] %s\n' "${P:-(no prefix)}" "$*" >&2; }

need_tools() {
  local missing=()
  command -v ip  >/dev/null 2>&1 || missing+=(iproute2)
  command -v nft >/dev/null 2>&1 || missing+=(nftables)
  # Said, not installed: a test run must not reach package mirrors or change the host
  # (.ci/run installs them; the tests' probe skips without them).
  if ((${#missing[@]})); then
    log "missing: ${missing[*]} (apt-get install ${missing[*]})"
    exit 3
  fi
}

nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
sysctl_ns() { local ns=$1; shift; nsx "$ns" sysctl -qw "$@" >/dev/null; }  # several keys, one exec

ns_exists() { [[ -e /run/netns/$1 ]]; }

# host name (nat1) or full name (zt3a-nat1) -> full namespace name of this lab
full_ns() {
  local h=$1 x
  for x in "${HOSTS[@]}"; do
    [[ $h == "$x" || $h == "$P$x" ]] && { echo "$P$x"; return 0; }
  done
  echo "natlab: unknown host '$h' (one of: ${HOSTS[*]})" >&2
  return 2
}

down() {
  local ns pids
  for ns in "${NSES[@]}"; do
    ns_exists "$ns" || continue
    # kill (by PID) anything still running inside the namespace, else it would keep the netns alive
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    if [[ -n $pids ]]; then
      log "killing processes in $ns: $(echo $pids)"
      kill $pids 2>/dev/null || true
      local i
      for i in 1 2 3 4 5 6; do   # up to 0.3 s for a clean exit, then SIGKILL
        sleep 0.05
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [[ -z $pids ]] && break
      done
      [[ -n $pids ]] && kill -9 $pids 2>/dev/null || true
    fi
  done
  for ns in "${NSES[@]}"; do
    # a concurrent `down` (e.g. gc) may delete it first: only complain if it is still there
    if ns_exists "$ns"; then
      ip netns del "$ns" 2>/dev/null || ! ns_exists "$ns" || { log "cannot delete $ns"; return 1; }
    fi
  done
  log "down"
  return 0
}

# veth pair created from inside namespace $1 (name $2), peer created directly in namespace $3 (name $4)
veth() { ip -n "$1" link add "$2" type veth peer name "$4" netns "$3"; }

base_ns() {  # new namespace, lo up, no IPv6 noise, no rp_filter surprises; $2.. more sysctls
  local ns=$1
  shift
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  # one `ip netns exec` per namespace: they dominate the build time (~15 ms each)
  sysctl_ns "$ns" net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 \
    net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 "$@"
}

nat_rules() {  # $1=ns $2=wan ip $3=lan cidr $4=mode(cone|symmetric)
  local ns=$1 wan=$2 lan=$3 mode=$4 masq extra_map="" extra_pre="" extra_rec="" extra_fwd=""
  if [[ $mode == cone ]]; then
    masq="masquerade"
    extra_map="
  map eim_udp {
    type inet_service : ipv4_addr . inet_service
    flags dynamic, timeout
    timeout $EIM_TIMEOUT
  }"
    extra_pre="iifname \"wan0\" ip daddr $wan meta l4proto udp dnat ip to udp dport map @eim_udp"
    # only flows that were initiated from the LAN (original direction, LAN source) create/refresh a
    # mapping; without this, replies of DNATed inbound flows would insert bogus entries
    extra_rec="oifname \"wan0\" meta l4proto udp ct direction original ct original ip saddr $lan update @eim_udp { ct reply proto-dst : ct original ip saddr . ct original proto-src }"
    extra_fwd="iifname \"wan0\" oifname \"lan0\" ct status dnat accept"
  else
    masq="masquerade fully-random"
  fi
  nsx "$ns" nft -f - <<EOF
flush ruleset
table ip natlab {$extra_map
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    $extra_pre
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan0" ip saddr $lan $masq
  }
  chain record {
    # runs after the srcnat hook, so "ct reply proto-dst" is the external (mapped) port
    type filter hook postrouting priority srcnat + 10; policy accept;
    $extra_rec
  }
  chain forward {
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    ct state invalid drop
    iifname "lan0" oifname "wan0" accept
    # hosts of one LAN talk to each other even if bridged frames reach these hooks
    iifname "lan0" oifname "lan0" accept
    $extra_fwd
  }
  chain input {
    type filter hook input priority filter; policy drop;
    iif "lo" accept
    ct state established,related accept
    ct state invalid drop
    iifname "lan0" accept
    icmp type echo-request accept
  }
}
EOF
}

healthy() {  # every namespace present, NAT tables loaded, home default routes in place
  local ns
  for ns in "${NSES[@]}"; do ns_exists "$ns" || return 1; done
  local n
  for n in nat1 nat2 nat3; do nsx "$P$n" nft list table ip natlab >/dev/null 2>&1 || return 1; done
  local h
  for h in home1 home2 home2b home3; do [[ -n $(ip -n "$P$h" route show default 2>/dev/null) ]] || return 1; done
}

up() {
  need_tools
  if [[ ${1:-} != --force ]] && healthy; then
    log "already up (use 'up --force' or 'reset' to rebuild)"
    return 0
  fi
  local ns
  for ns in "${NSES[@]}"; do
    if ns_exists "$ns"; then log "lab partly present or --force - tearing down first"; down; break; fi
  done
  local h
  for h in "${HOSTS[@]}"; do
    # per-netns, default 0 in a new namespace; set before the interfaces exist, which inherit it
    if [[ $h == nat* ]]; then base_ns "$P$h" net.ipv4.ip_forward=1; else base_ns "$P$h"; fi
  done

  # public segment: bridge inside "inet"
  ip -n "${P}inet" link add br0 type bridge
  ip -n "${P}inet" link set br0 up
  # br_netfilter is built into this kernel: keep bridged frames out of the (empty) IP hooks of "inet"
  nsx "${P}inet" sh -c 'for f in /proc/sys/net/bridge/bridge-nf-call-iptables /proc/sys/net/bridge/bridge-nf-call-arptables; do [ -w $f ] && echo 0 > $f; done; true'

  local spec port node ifn ip
  for spec in "p-vps vps eth0 10" "p-client client eth0 50" "p-nat1 nat1 wan0 21" "p-nat2 nat2 wan0 22" "p-nat3 nat3 wan0 23"; do
    read -r port node ifn ip <<<"$spec"
    veth "${P}inet" "$port" "$P$node" "$ifn"
    ip -n "${P}inet" link set "$port" master br0 up
    ip -n "$P$node" addr add "$PUB_NET.$ip/24" dev "$ifn"
    ip -n "$P$node" link set "$ifn" up
  done

  # home LANs: point-to-point veth router<->host (a /24 on each end); nat2's a bridge with two
  local i
  for i in 1 2 3; do
    if [[ $i == 2 ]]; then
      ip -n "${P}nat2" link add lan0 type bridge
      veth "${P}nat2" lp1 "${P}home2" eth0
      veth "${P}nat2" lp2 "${P}home2b" eth0
      ip -n "${P}nat2" link set lp1 master lan0 up
      ip -n "${P}nat2" link set lp2 master lan0 up
      # frames between the two hosts are switched, not routed: out of nat2's IP hooks
      nsx "${P}nat2" sh -c 'for f in /proc/sys/net/bridge/bridge-nf-call-iptables /proc/sys/net/bridge/bridge-nf-call-arptables; do [ -w $f ] && echo 0 > $f; done; true'
      ip -n "${P}home2b" addr add 192.168.2.11/24 dev eth0
      ip -n "${P}home2b" link set eth0 up
      ip -n "${P}home2b" route add default via 192.168.2.1
    else
      veth "${P}nat$i" lan0 "${P}home$i" eth0
    fi
    ip -n "${P}nat$i" addr add "192.168.$i.1/24" dev lan0
    ip -n "${P}nat$i" link set lan0 up
    ip -n "${P}home$i" addr add "192.168.$i.10/24" dev eth0
    ip -n "${P}home$i" link set eth0 up
    ip -n "${P}home$i" route add default via "192.168.$i.1"
  done
  # no default routes on the public side: the whole "internet" is the on-link 203.0.113.0/24,
  # so vps/client have no route to any 192.168.x.x and nat1 has none to nat2's LAN.

  nat_rules "${P}nat1" "$PUB_NET.21" 192.168.1.0/24 cone
  nat_rules "${P}nat2" "$PUB_NET.22" 192.168.2.0/24 symmetric
  nat_rules "${P}nat3" "$PUB_NET.23" 192.168.3.0/24 cone
  log "up: namespaces ${NSES[*]}"
}

status() {
  local ns
  for ns in "${NSES[@]}"; do
    if ns_exists "$ns"; then
      echo "== $ns: $(ip -n "$ns" -br -4 addr show | awk '$1!="lo"{printf "%s %s %s; ", $1,$2,$3}')"
    else
      echo "== $ns: (absent)"
    fi
  done
  for ns in "${P}nat1" "${P}nat2" "${P}nat3"; do
    ns_exists "$ns" && { echo "--- nft ruleset in $ns"; nsx "$ns" nft list ruleset; }
  done
  return 0
}

# ctnetlink IPCTNL_MSG_CT_DELETE without a tuple = flush the IPv4 table (what `conntrack -F` does);
# fallback for machines without the conntrack package
CT_FLUSH_PY='
import socket, struct, sys
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)        # NETLINK_NETFILTER
s.bind((0, 0))
# nlmsghdr: len, type = NFNL_SUBSYS_CTNETLINK<<8 | IPCTNL_MSG_CT_DELETE, flags = REQUEST|ACK, seq, pid
msg = struct.pack("=IHHII", 20, (1 << 8) | 2, 0x1 | 0x4, 1, 0) + struct.pack("=BBH", socket.AF_INET, 0, 0)
s.send(msg)
r = s.recv(4096)
typ = struct.unpack("=H", r[4:6])[0]
err = struct.unpack("=i", r[16:20])[0] if typ == 2 else -1       # NLMSG_ERROR carries the result
sys.exit(0 if err == 0 else 1)
'

ct_count() { nsx "$1" cat /proc/sys/net/netfilter/nf_conntrack_count 2>/dev/null || echo '?'; }

flush_conntrack() {
  local host=${1:?usage: flush-conntrack NAT} ns before
  ns=$(full_ns "$host")
  ns_exists "$ns" || { log "$ns does not exist"; return 1; }
  before=$(ct_count "$ns")
  # the EIM map first: a packet between the two steps would otherwise re-create a conntrack entry
  # from a stale map entry
  if nsx "$ns" nft list map ip natlab eim_udp >/dev/null 2>&1; then
    nsx "$ns" nft flush map ip natlab eim_udp
  fi
  if command -v conntrack >/dev/null 2>&1; then
    nsx "$ns" conntrack -F >/dev/null 2>&1
  else
    local py
    py=$(command -v python3) || { log "flush-conntrack needs conntrack or python3"; return 1; }
    nsx "$ns" "$py" -c "$CT_FLUSH_PY" || { log "ctnetlink flush failed in $ns"; return 1; }
  fi
  log "flushed conntrack in $ns (entries: $before -> $(ct_count "$ns"))"
}

has_sch_netem() {  # probe: try a netem qdisc on lo of the namespace (harmless, removed at once)
  local ns=$1
  if nsx "$ns" tc qdisc add dev lo root netem delay 0ms 2>/dev/null; then
    nsx "$ns" tc qdisc del dev lo root 2>/dev/null || true
    return 0
  fi
  return 1
}

netem() {
  local host=${1:?usage: netem NS IFACE SPEC} ifc=${2:?usage: netem NS IFACE SPEC} spec=${3:?usage: netem NS IFACE SPEC} ns
  ns=$(full_ns "$host")
  [[ $ifc =~ ^[a-z0-9]+$ ]] || { log "bad interface name '$ifc'"; return 2; }
  netem_clear "$host" "$ifc"
  if has_sch_netem "$ns"; then
    # shellcheck disable=SC2086  # SPEC is a tc argument list
    nsx "$ns" tc qdisc replace dev "$ifc" root netem $spec
    log "netem on $ns/$ifc: $spec"
    return 0
  fi
  # fallback without sch_netem: parse the subset we can emulate
  local -a w
  read -ra w <<<"$spec"
  local i=0 loss="" rate=""
  while ((i < ${#w[@]})); do
    case ${w[i]} in
      loss)
        ((i++)) || true
        [[ ${w[i]:-} == random ]] && { ((i++)) || true; }
        loss=${w[i]:-}
        [[ $loss =~ ^([0-9]+)(\.([0-9]{1,2}))?%$ ]] || { log "netem fallback: bad loss '$loss'"; return 2; }
        ;;
      rate)
        ((i++)) || true
        rate=${w[i]:-}
        [[ $rate =~ ^[0-9]+[kmg]?(bit|bps)$ ]] || { log "netem fallback: bad rate '$rate'"; return 2; }
        ;;
      *)
        log "netem: kernel has no sch_netem; fallback supports only 'loss N%' and 'rate R', not '${w[i]}' (in: $spec)"
        return 3
        ;;
    esac
    ((i++)) || true
  done
  if [[ -n $loss ]]; then
    # percent with up to 2 decimals -> parts per 10000
    local int frac ppm
    [[ $loss =~ ^([0-9]+)(\.([0-9]{1,2}))?%$ ]]
    int=${BASH_REMATCH[1]}
    frac=${BASH_REMATCH[3]:-0}
    [[ ${#frac} == 1 ]] && frac="${frac}0"
    ppm=$((10#$int * 100 + 10#$frac))
    ((ppm <= 10000)) || { log "loss over 100%"; return 2; }
    local match="numgen random mod 10000 < $ppm"   # nft wants the bound inside the modulus range
    ((ppm == 10000)) && match=""
    ((ppm == 0)) || nsx "$ns" nft -f - <<EOF
table netdev natlab_netem_$ifc {
  chain egress {
    # the netdev egress hook sits where a qdisc would: after routing and NAT, for local and
    # forwarded packets alike, and a drop there is silent (an ip-family output rule would make
    # the sender's sendto() fail with EPERM instead)
    # (the counter lets a test check that the loss really happened)
    type filter hook egress device "$ifc" priority 0; policy accept;
    $match counter drop
  }
}
EOF
  fi
  if [[ -n $rate ]]; then
    nsx "$ns" tc qdisc replace dev "$ifc" root tbf rate "$rate" burst 32kbit latency 400ms
  fi
  log "netem fallback on $ns/$ifc: ${loss:+loss $loss }${rate:+rate $rate}"
}

netem_clear() {
  local host=${1:?usage: netem-clear NS IFACE} ifc=${2:?usage: netem-clear NS IFACE} ns
  ns=$(full_ns "$host")
  [[ $ifc =~ ^[a-z0-9]+$ ]] || { log "bad interface name '$ifc'"; return 2; }
  # deleting the root qdisc of a veth restores its default (noqueue); "no such qdisc" is fine
  nsx "$ns" tc qdisc del dev "$ifc" root 2>/dev/null || true
  nsx "$ns" nft delete table netdev "natlab_netem_$ifc" 2>/dev/null || true
}

divert_udp() {
  local host=${1:?usage: divert-udp NAT IP:PORT LPORT} dst=${2:?usage: divert-udp NAT IP:PORT LPORT} \
    lport=${3:?usage: divert-udp NAT IP:PORT LPORT} ns n
  [[ $host =~ ^nat([123])$ ]] || { log "divert-udp: '$host' is not a NAT router (nat1|nat2|nat3)"; return 2; }
  n=${BASH_REMATCH[1]}
  [[ $dst =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}:[0-9]{1,5}$ ]] || { log "divert-udp: bad destination '$dst' (want IP:PORT)"; return 2; }
  [[ $lport =~ ^[0-9]{1,5}$ ]] || { log "divert-udp: bad local port '$lport'"; return 2; }
  ns=$(full_ns "$host")
  ns_exists "$ns" || { log "$ns does not exist"; return 1; }
  nsx "$ns" nft -f - <<EOF
table ip natlab_divert {
  chain prerouting {
    # before the router's own dstnat rules; the DNATed packet is then local (input, from lan0)
    type nat hook prerouting priority dstnat - 10; policy accept;
  }
}
add rule ip natlab_divert prerouting iifname "lan0" ip daddr ${dst%:*} udp dport ${dst##*:} dnat to 192.168.$n.1:$lport
EOF
  log "divert-udp on $ns: LAN udp to $dst -> 192.168.$n.1:$lport"
}

divert_clear() {
  local host=${1:?usage: divert-clear NAT} ns
  ns=$(full_ns "$host")
  nsx "$ns" nft delete table ip natlab_divert 2>/dev/null || true
}

gc() {
  [[ -d $OWNER_DIR ]] || return 0
  local f pfx pid start stat fields
  for f in "$OWNER_DIR"/*.owner; do
    [[ -e $f ]] || continue
    pfx=$(basename "$f" .owner)
    read -r pid start < "$f" 2>/dev/null || true
    # empty = being reserved right now (the harness writes the PID just after creating the file)
    [[ $pid =~ ^[0-9]+$ ]] || continue
    if stat=$(cat "/proc/$pid/stat" 2>/dev/null); then
      # alive, unless the PID now belongs to a later process: compare the start time (field 22;
      # the command name in field 2 may hold spaces and parens, so split after its last ')')
      read -ra fields <<< "${stat##*)}"
      [[ -z $start || ${fields[19]} == "$start" ]] && continue
    fi
    log "gc: owner $pid of lab '$pfx' is gone"
    NATLAB_PREFIX=$pfx bash "${BASH_SOURCE[0]}" down || continue
    rm -f "$f"
  done
}

case "${1:-}" in
  up) up "${2:-}" ;;
  reset) up --force ;;
  down) down ;;
  status) status ;;
  flush-conntrack) flush_conntrack "${2:-}" ;;
  netem) netem "${2:-}" "${3:-}" "${4:-}" ;;
  netem-clear) netem_clear "${2:-}" "${3:-}" ;;
  divert-udp) divert_udp "${2:-}" "${3:-}" "${4:-}" ;;
  divert-clear) divert_clear "${2:-}" ;;
  gc) gc ;;
  *) echo "usage: $0 [-p PREFIX] up [--force]|reset|down|status|flush-conntrack NAT|netem NS IFACE SPEC|netem-clear NS IFACE|divert-udp NAT IP:PORT LPORT|divert-clear NAT|gc" >&2; exit 2 ;;
esac
