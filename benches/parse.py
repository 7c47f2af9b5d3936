#!/usr/bin/env python3
"""Parses benchmark tool output into records for run.sh and soak.sh (standard library only).

Each measurement is one JSON line appended to a runs file:
  {"test": "bulk-up", "contender": "zonegate", "rep": 1, "metrics": {"gbps": 3.1}}
and one human line is printed. Sub-commands:

  iperf3 RUNS TEST CONTENDER REP JSON_OUT         receiver Gbit/s of `iperf3 -J`
  wrk    RUNS TEST CONTENDER REP OUT              req/s, p50/p99 (with --latency), errors
  h2load RUNS TEST CONTENDER REP OUT LOG TARGET   achieved req/s, p50/p99 from --log-file
  dnsperf RUNS TEST CONTENDER REP OUT             queries/s, lost, non-NOERROR answers
  wire   RUNS RTT_MS CONNECT_MS LOG               delay_wire's packet counts (test wan-link)
  put    RUNS TEST CONTENDER REP KEY=VALUE...     anything else (numbers, true/false, text)
  get    RUNS TEST CONTENDER METRIC               median of METRIC over reps (for the shell)
  assemble RUNS OUT.json                          runs + machine/params (from the environment)
  cpu    "BEFORE|AFTER"                           the machine's idle and stolen CPU shares between
                                                  two /proc/stat `cpu` lines (for ab.sh)
  own_ticks                                       CPU ticks so far of the benchmark's processes
                                                  (see own_ticks)
  datagrams ADMIN                                 UDP datagrams the gateway (admin address) sent
                                                  to and received from its one agent (for ab.sh)

With CPU_STAT="BEFORE|AFTER" (two /proc/stat `cpu` lines) in the environment, a measurement
also gets the machine's CPU over it (machine_cpu); with OWN_TICKS="BEFORE|AFTER" (two
`own_ticks`) too, the share of it used by processes outside the benchmark.
"""

import functools
import gzip
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time


def machine_cpu(metrics, stat):
    """Adds the whole machine's CPU over one measurement, from two /proc/stat `cpu` lines
    ("BEFORE|AFTER", run.sh's cpu_mark and parse): CPU seconds busy (user, nice, system, irq,
    softirq: the client, the servers and whatever sits between them), the share of CPU time
    idle, and the share stolen (time the hypervisor ran something else while this VM's CPUs
    wanted to run: a host that steals makes req/s and Gbit/s lower and noisier). Per unit of
    work: busy CPU µs per request, busy CPU seconds per GB received."""
    before, _, after = stat.partition("|")
    try:
        a = [int(x) for x in before.split()[1:9]]
        b = [int(x) for x in after.split()[1:9]]
    except ValueError:
        return
    if len(a) < 8 or len(b) < 8:
        return
    user, nice, system, idle, iowait, irq, softirq, steal = (y - x for x, y in zip(a, b))
    total = user + nice + system + idle + iowait + irq + softirq + steal
    if total <= 0:
        return
    busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    metrics["cpu_busy_s"] = round(busy, 2)
    metrics["idle_pct"] = round(100 * (idle + iowait) / total, 1)
    metrics["steal_pct"] = round(100 * steal / total, 1)
    own_before, _, own_after = os.environ.get("OWN_TICKS", "").partition("|")
    if own_before.isdigit() and own_after.isdigit():
        # Without IRQ time accounting (this machine's kernel), a process's system time
        # includes the softirq work run in its own system calls (loopback receive), which
        # /proc/stat puts under softirq: the benchmark's own time is compared with every busy
        # column (against user+nice+system only, it exceeded them and this read 0 whatever
        # else ran). With it, that work is nobody's system time: user+nice+system then.
        if irq_time_accounted():
            machine, metrics["outside_of"] = user + nice + system, "user+nice+system"
        else:
            machine, metrics["outside_of"] = user + nice + system + irq + softirq, "all busy"
        outside = machine - (int(own_after) - int(own_before))
        metrics["outside_pct"] = round(100 * max(0, outside) / total, 1)
        # Unclamped, so a bias either way shows in the raw data.
        metrics["outside_raw_pct"] = round(100 * outside / total, 1)
    if metrics.get("requests"):
        metrics["cpu_us_per_req"] = round(busy * 1e6 / metrics["requests"], 2)
    if metrics.get("gbytes"):
        metrics["cpu_s_per_gb"] = round(busy / metrics["gbytes"], 3)


@functools.lru_cache(maxsize=None)
def irq_time_accounted():
    """Whether this kernel accounts IRQ and softirq time apart from the tasks they interrupt
    (CONFIG_IRQ_TIME_ACCOUNTING, unless booted with `tsc=noirqtime`), from /proc/config.gz or
    /boot/config-RELEASE; unknown reads as not (this machine's kernel)."""
    found = False
    for path, opener in (("/proc/config.gz", gzip.open),
                         (f"/boot/config-{platform.release()}", open)):
        try:
            with opener(path, "rt") as f:
                found = any(line.strip() == "CONFIG_IRQ_TIME_ACCOUNTING=y" for line in f)
            break
        except OSError:
            continue
    try:
        return found and "noirqtime" not in open("/proc/cmdline").read()
    except OSError:
        return found


def own_ticks():
    """User and system CPU ticks so far of the benchmark's processes: the process tree of the
    shell that runs it (BENCH_ROOT_PID, set by netns_init; the children it reaped are in its
    cutime/cstime), plus the ksoftirqd threads, which run the receive work its packets leave
    over. What the machine spent busy beside them over a measurement (user, nice, system,
    irq, softirq: a process's system time holds the softirq work done in its own system
    calls, which /proc/stat counts under softirq) is work that competed with it: another job.
    Identified by descent rather than by network namespace: other jobs run in namespaces of
    their own too (containers, lab tests, another benchmark)."""
    root = os.environ.get("BENCH_ROOT_PID")
    if not root:
        return 0
    parent, ticks = {}, {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rfind(")") + 2:].split()  # from field 3 (state) on
        parent[pid] = fields[1]
        ticks[pid] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        if stat[stat.find("(") + 1:].startswith("ksoftirqd/"):
            parent[pid] = root
    total = 0
    for pid, t in ticks.items():
        p, hops = pid, 0
        while p in parent and p != root and hops < 64:
            p, hops = parent[p], hops + 1
        if p == root:
            total += t
    return total


def append(runs, test, contender, rep, metrics):
    stat = os.environ.get("CPU_STAT", "")
    if stat and not stat.startswith("|"):
        machine_cpu(metrics, stat)
    rec = {"test": test, "contender": contender, "rep": int(rep), "metrics": metrics}
    with open(runs, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def fmt(metrics):
    parts = []
    for k, v in metrics.items():
        if isinstance(v, float):
            v = f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
        parts.append(f"{k}={v}")
    return " ".join(parts)


def iperf3(runs, test, contender, rep, path):
    metrics = {"gbps": None, "errors": 0}
    try:
        d = json.load(open(path))
        if d.get("error"):
            raise ValueError(d["error"])
        metrics["gbps"] = round(d["end"]["sum_received"]["bits_per_second"] / 1e9, 3)
        metrics["gbytes"] = round(d["end"]["sum_received"]["bytes"] / 1e9, 3)
        metrics["retransmits"] = d["end"].get("sum_sent", {}).get("retransmits")
    except Exception as e:  # a failed run is recorded, not fatal
        metrics["errors"] = 1
        metrics["error"] = str(e)[:200]
    append(runs, test, contender, rep, metrics)
    print(f"  {test:<10} {contender:<15} rep {rep}: {fmt(metrics)}", flush=True)


def to_ms(s):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", s)
    if not m:
        return None
    v, u = float(m.group(1)), m.group(2)
    return round(v * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[u], 3)


def wrk(runs, test, contender, rep, path):
    out = open(path).read()
    metrics = {"rps": None, "errors": 0}
    m = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if m:
        metrics["rps"] = round(float(m.group(1)), 1)
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M)
        if m:
            metrics[key] = to_ms(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", out)
    metrics["requests"] = int(m.group(1)) if m else 0
    if m:
        metrics["secs"] = round(float(m.group(2)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(3)], 2)
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
        metrics["socket_errors"] = m.group(0).split(": ", 1)[1]
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
        metrics["non2xx"] = int(m.group(1))
    if metrics["rps"] is None or metrics["requests"] == 0:
        errors += 1
        metrics["error"] = out.strip().splitlines()[-1][:200] if out.strip() else "no output"
    metrics["errors"] = errors
    append(runs, test, contender, rep, metrics)
    print(f"  {test:<10} {contender:<15} rep {rep}: {fmt(metrics)}", flush=True)


def latencies(log):
    """h2load --log-file rows: start µs, status, µs to end of response."""
    lat, bad = [], 0
    for line in open(log):
        f = line.split()
        if len(f) < 3:
            continue
        if not f[1].startswith("2"):
            bad += 1
        lat.append(int(f[2]) / 1000.0)
    return sorted(lat), bad


def pct(sorted_values, p):
    if not sorted_values:
        return None
    return round(sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))], 3)


def h2load(runs, test, contender, rep, out_path, log_path, target):
    out = open(out_path).read()
    metrics = {"target_rps": float(target), "rps": None, "errors": 0}
    m = re.search(r"finished in ([\d.]+)(ms|s), ([\d.]+) req/s", out)
    if m:
        metrics["rps"] = round(float(m.group(3)), 1)
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    errors = 0
    if m:
        total, _, done, ok, failed, errored, timeout = (int(x) for x in m.groups())
        metrics["requests"] = done
        # h2load's `failed` already counts the errored requests, and those the timed out.
        errors += failed
    else:
        errors += 1
        metrics["error"] = out.strip()[-200:]
    lat, bad = latencies(log_path) if os.path.exists(log_path) else ([], 0)
    errors += bad
    metrics["p50_ms"] = pct(lat, 0.50)
    metrics["p99_ms"] = pct(lat, 0.99)
    metrics["p999_ms"] = pct(lat, 0.999)
    metrics["errors"] = errors
    append(runs, test, contender, rep, metrics)
    print(f"  {test:<10} {contender:<15} rep {rep}: {fmt(metrics)}", flush=True)


def dnsperf(runs, test, contender, rep, path):
    out = open(path).read()
    metrics = {"qps": None, "errors": 0}
    m = re.search(r"Queries per second:\s+([\d.]+)", out)
    if m:
        metrics["qps"] = round(float(m.group(1)), 1)
    m = re.search(r"Queries sent:\s+(\d+)", out)
    metrics["sent"] = int(m.group(1)) if m else 0
    m = re.search(r"Queries lost:\s+(\d+)", out)
    metrics["lost"] = int(m.group(1)) if m else None
    codes = dict((c, int(n)) for c, n in re.findall(r"([A-Z]+) (\d+) \([\d.]+%\)", out.split("Response codes:", 1)[-1].splitlines()[0])) if "Response codes:" in out else {}
    metrics["noerror"] = codes.get("NOERROR", 0)
    other = sum(n for c, n in codes.items() if c != "NOERROR")
    errors = other + (metrics["lost"] or 0)
    if metrics["sent"] == 0 or metrics["lost"] is None:
        errors += 1
        metrics["error"] = out.strip()[-200:] or "no output"
    metrics["errors"] = errors
    append(runs, test, contender, rep, metrics)
    print(f"  {test:<10} {contender:<15} rep {rep}: {fmt(metrics)}", flush=True)


def value(s):
    if s in ("true", "false"):
        return s == "true"
    if s in ("null", ""):
        return None
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return s


def wire(runs, rtt_ms, connect_ms, log):
    """The `wan` link: configured round trip, measured TCP connect time, and what
    examples/delay_wire.rs says it carried and lost (its last `stopped:` line)."""
    metrics = {"rtt_ms": float(rtt_ms), "connect_ms": float(connect_ms)}
    last = ""
    if os.path.exists(log):
        for line in open(log):
            if "stopped:" in line:
                last = line
    counts = [(k, int(v)) for k, v in re.findall(r"(carried|dropped_full|failed_writes) (\d+)", last)]
    if len(counts) == 6:
        metrics["packets"] = sum(v for k, v in counts if k == "carried")
        metrics["dropped"] = sum(v for k, v in counts if k != "carried")
    else:
        metrics["error"] = "delay_wire printed no final counts"
    append(runs, "wan-link", "wire", 1, metrics)
    print(f"  wan-link   wire           : {fmt(metrics)}", flush=True)


def put(runs, test, contender, rep, *kvs):
    metrics = {}
    for kv in kvs:
        k, _, v = kv.partition("=")
        metrics[k] = value(v)
    append(runs, test, contender, rep, metrics)
    print(f"  {test:<10} {contender:<15}: {fmt(metrics)}", flush=True)


def get(runs, test, contender, metric):
    vals = []
    for line in open(runs):
        r = json.loads(line)
        v = r["metrics"].get(metric)
        # Measured rounds without errors only (rep 0 is run.sh's warm-up).
        if (r["test"] == test and r["contender"] == contender and r.get("rep") != 0
                and not r["metrics"].get("errors") and isinstance(v, (int, float))):
            vals.append(v)
    print(statistics.median(vals) if vals else "")


def sh(cmd):
    try:
        out = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).strip().splitlines()[0].strip()
    except Exception:
        return None


def sha256_of(path):
    if not path or not os.path.exists(path):
        return None
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def assemble(runs, out_path):
    recs = [json.loads(l) for l in open(runs)] if os.path.exists(runs) else []
    cpu = None
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    env = os.environ
    repo = env.get("REPO_DIR", ".")
    doc = {
        "date": env.get("BENCH_DATE") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": cpu,
            "kernel": platform.release(),
            "load_before": env.get("LOAD_BEFORE"),
            "load_after": open("/proc/loadavg").read().split()[:3],
        },
        "zonegate": {
            "binary": env.get("ZONEGATE"),
            # The binary itself, to tell which build ran: the commit is the repository's at
            # run time, which a given ZONEGATE= need not have been built from.
            "sha256": sha256_of(env.get("ZONEGATE")),
            "commit": sh(f"git -C {repo} rev-parse --short HEAD"),
            "dirty": bool(sh(f"git -C {repo} status --porcelain --untracked-files=no")),
        },
        "tools": {
            "iperf3": sh("iperf3 --version"),
            "wrk": sh("wrk -v"),
            "h2load": sh("h2load --version"),
            "nginx": sh("nginx -v"),
            "rathole": sh("rathole --version | awk '/Build Version/ { print \"rathole \" $3 }'"),
            "bore": sh("bore --version"),
        },
        "params": json.loads(env.get("BENCH_PARAMS", "{}")),
        "sections": env.get("SECTIONS", "").split(),
        "runs": recs,
    }
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"# raw data: {out_path}")


def cpu(stat):
    """Prints the machine's idle and stolen CPU shares between two /proc/stat lines."""
    m = {}
    machine_cpu(m, stat)
    print(f"idle {m['idle_pct']:4.1f} %  stolen {m['steal_pct']:4.1f} %" if m else "idle ? stolen ?")


def datagrams(admin):
    """Prints the UDP datagrams the gateway has sent to and received from its one agent
    (its /status): packets per request is what the tunnel's per-request cost follows."""
    import urllib.request

    agents = json.load(urllib.request.urlopen(f"http://{admin}/status", timeout=5))["agents"]
    if len(agents) != 1:
        sys.exit(f"datagrams: expected one agent at {admin}, found {len(agents)}")
    a = agents[0]
    # A binary from before these counters (an A/B against an old build) has none: "- -".
    print(a.get("udp_tx_datagrams", "-"), a.get("udp_rx_datagrams", "-"))


def main(argv):
    cmds = {"iperf3": iperf3, "wrk": wrk, "h2load": h2load, "dnsperf": dnsperf, "put": put, "get": get, "wire": wire,
            "assemble": assemble, "cpu": cpu, "datagrams": datagrams,
            "own_ticks": lambda: print(own_ticks())}
    if len(argv) < 2 or argv[1] not in cmds:
        sys.exit(__doc__)
    cmds[argv[1]](*argv[2:])


if __name__ == "__main__":
    main(sys.argv)
