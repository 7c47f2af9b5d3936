#!/usr/bin/env bash
# node_order.sh - writes link/node-idle.order: the functions an idle node agent runs (start,
# connect, keep-alives, zone.json polls, stop), which build.rs has the linker place together
# at the start of .text.
#
# Why: the kernel maps an executable's text by whole runs of pages around each one touched
# (fault-around, read-ahead). Spread over 9 MB, the ~2 MB an idle agent runs kept ~6.6 MiB of
# text resident; packed together, they keep little more than their own size. See
# benches/RESULTS.md (idle agent RSS) for the before/after.
#
# How: a gateway and one node agent in a private network namespace, the agent under valgrind's
# callgrind (--demangle=no: the symbols as the linker names them) for SECS seconds, then
# stopped with SIGTERM; every function of the zonegate binary callgrind saw run is listed, in
# the order of their addresses in that binary. Rerun after changes that move the agent's idle
# path to other functions (a stale list only loses its effect: names it lists that are gone
# are skipped by the linker).
#
# Usage: benches/node_order.sh                 (needs root, valgrind, python3)
#   ZONEGATE=path   the binary to profile (default: cargo build --release)
#   SECS=40         how long the agent idles under callgrind
set -euo pipefail
SECS=${SECS:-40}
# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"

if ! in_netns "$@"; then
  need_tools python3 unshare ip valgrind
  [[ -n ${ZONEGATE:-} ]] || need_tools cargo
  build_zonegate
  export SECS
  enter_netns "$0"
fi

shift
netns_init
zone_create "$tmp/z" order.example gwo=127.0.0.1:4434 n1
gw_conf=$tmp/z/devices/gwo/gateway.toml node_conf=$tmp/z/devices/n1/node.toml
conf_set "$gw_conf" admin '"127.0.0.1:9190"'
conf_set "$gw_conf" http '"off"'
conf_set "$gw_conf" https '"off"'
conf_set "$gw_conf" dns '"off"'
conf_set "$node_conf" admin '"127.0.0.1:9191"'
start gwo "$ZONEGATE" gateway --config "$gw_conf"
wait_agents 127.0.0.1:9190 0 20
# As the benchmark's idle agent runs (benches/run.sh mem): one service, nothing using it.
start n1 valgrind --tool=callgrind --demangle=no --callgrind-out-file="$tmp/cg.out" \
  "$ZONEGATE" node --config "$node_conf" --service echo=127.0.0.1:7007
wait_agents 127.0.0.1:9190 1 120 || { cat "$tmp/gwo.log" "$tmp/n1.log" >&2; exit 1; }
sleep "$SECS"
kill -TERM "${PID[n1]}"
for ((i = 0; i < 600; i++)); do
  kill -0 "${PID[n1]}" 2>/dev/null || break
  sleep 0.1
done
[[ -s $tmp/cg.out ]] || { echo "callgrind wrote no profile" >&2; cat "$tmp/n1.log" >&2; exit 1; }

mkdir -p "$repo_dir/link"
python3 - "$tmp/cg.out" "$ZONEGATE" "$repo_dir/link/node-idle.order" <<'EOF'
import re, subprocess, sys
profile, binary, out = sys.argv[1:]
# callgrind's compressed names: ob=(N) NAME once, then ob=(N); fn/cfn likewise, cob= naming
# the object of the next cfn.
obs, names, cur_ob, cob = {}, set(), None, None
for line in open(profile, errors="replace"):
    m = re.match(r"^(ob|cob)=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
    if m:
        kind, i, name = m.groups()
        if name is not None:
            obs[i] = name
        if kind == "ob":
            cur_ob = obs.get(i)
        else:
            cob = obs.get(i)
        continue
    m = re.match(r"^(fn|cfn)=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
    if m:
        kind, i, name = m.groups()
        ob = cur_ob if kind == "fn" else (cob or cur_ob)
        if kind == "cfn":
            cob = None
        if name is not None and ob is not None and ob.endswith(binary.split("/")[-1]):
            names.add(re.sub(r"'\d+$", "", name))
addr = {}
for line in subprocess.run(["nm", "--defined-only", binary], capture_output=True, text=True, check=True).stdout.splitlines():
    p = line.split(" ", 2)
    if len(p) == 3 and p[1] in "tTwW":
        addr[p[2]] = int(p[0], 16)
ran = sorted((n for n in names if n in addr), key=addr.get)
with open(out, "w") as f:
    f.write("".join(n + "\n" for n in ran))
print(f"{out}: {len(ran)} functions ({len(names) - len(ran)} names callgrind saw are not symbols of {binary})")
EOF
