#!/usr/bin/env python3
"""Writes benches/RESULTS.md and benches/results.svg from run.sh's raw data (stdlib only).

  python3 benches/report.py benches/results/2026-11-22T0100Z.json [more.json ...]

With several files, a test measured in a later file replaces the same test of an earlier one
(so a full run can be completed by a later partial run, e.g. `run.sh mem`). Figures are medians
over repetitions, with the range (min-max) beside them. Text below the NOTES_MARKER line of an
existing RESULTS.md is kept, so before/after notes survive regeneration.
"""

import json
import os
import statistics
import sys

import chart

HERE = os.path.dirname(os.path.abspath(__file__))
# A measurement during which other processes used more than this share of the machine is
# named as disturbed (parse.py own_ticks).
OUTSIDE_LIMIT = 3.0
NOTES_MARKER = "<!-- notes below this line are kept when report.py regenerates the file -->"

TUNNELS = ["direct", "zonegate", "rathole-tcp", "rathole-noise", "bore"]
HTTP_PATHS = ["direct", "nginx-rp", "zonegate-front", "zonegate-tcp", "rathole-tcp",
              "rathole-noise", "nginx-rp-tls", "zonegate-front-tls"]
HALF_PATHS = ["direct", "nginx-rp", "zonegate-front"]
FRONT_CONN_PATHS = ["nginx-rp", "zonegate-front", "nginx-rp-tls", "zonegate-front-tls"]
LABEL = {
    "direct": "direct",
    "zonegate": "zonegate (tcp app)",
    "zonegate-tcp": "zonegate (tcp app)",
    "zonegate-front": "zonegate HTTP front",
    "rathole-tcp": "rathole (tcp)",
    "rathole-noise": "rathole (noise)",
    "bore": "bore",
    "nginx-rp": "nginx reverse proxy",
    "nginx-rp-tls": "nginx reverse proxy, HTTPS",
    "zonegate-front-tls": "zonegate HTTP front, HTTPS",
}


def load(paths):
    docs = [json.load(open(p)) for p in paths]
    by_test = {}
    for i, d in enumerate(docs):
        # By test, and for `logs` (one record per section's contender: zonegate,
        # wan-zonegate) by test and contender: a later run of one section replaced every
        # section's log counts.
        key = lambda r: (r["test"], r["contender"]) if r["test"] == "logs" else r["test"]
        for k in {key(r) for r in d["runs"]}:
            # Rep 0 is run.sh's warm-up round: run, not recorded in any figure.
            by_test[k] = (i, [r for r in d["runs"] if key(r) == k and r.get("rep") != 0])
    runs = [r for _, rs in by_test.values() for r in rs]
    # Which file each test's figures come from, for the header.
    for i, d in enumerate(docs):
        d["_supplies"] = sorted({k[0] if isinstance(k, tuple) else k
                                 for k, (j, _) in by_test.items() if j == i})
    return docs, runs


class Stats:
    def __init__(self, runs):
        self.runs = runs

    def values(self, test, contender, metric):
        """`metric` of each run of `contender` in `test`; a run with errors (wrk's socket
        errors or non-2xx answers, a failed iperf3) counts for nothing but its errors: a wrk
        that failed still prints a rate (0, or fast 502s)."""
        return [r["metrics"].get(metric) for r in self.runs
                if r["test"] == test and r["contender"] == contender
                and (metric == "errors" or not r["metrics"].get("errors"))
                and isinstance(r["metrics"].get(metric), (int, float))
                and not isinstance(r["metrics"].get(metric), bool)]

    def ran(self, test, contender):
        return any(r["test"] == test and r["contender"] == contender for r in self.runs)

    def failed_runs(self, test, contender):
        return sum(1 for r in self.runs if r["test"] == test and r["contender"] == contender
                   and r["metrics"].get("errors"))

    def by_rep(self, test, contender, metric):
        """{rep: value} of the runs without errors."""
        return {r["rep"]: r["metrics"][metric] for r in self.runs
                if r["test"] == test and r["contender"] == contender
                and not r["metrics"].get("errors")
                and isinstance(r["metrics"].get(metric), (int, float))}

    def median(self, test, contender, metric):
        v = self.values(test, contender, metric)
        return statistics.median(v) if v else None

    def spread(self, test, contender, metric):
        v = self.values(test, contender, metric)
        return (min(v), max(v)) if v else None

    def total(self, test, contender, metric):
        return sum(self.values(test, contender, metric))

    def one(self, test, contender, metric):
        for r in self.runs:
            if r["test"] == test and r["contender"] == contender:
                return r["metrics"].get(metric)
        return None

    def has(self, test):
        return any(r["test"] == test for r in self.runs)


def num(v, digits=None):
    if v is None:
        return "—"
    if digits is None:
        digits = 2 if abs(v) < 10 else (1 if abs(v) < 100 else 0)
    s = f"{v:,.{digits}f}"
    return s


def cell(st, test, c, metric, digits=None):
    m = st.median(test, c, metric)
    if m is None:
        return "—"
    sp = st.spread(test, c, metric)
    if sp and sp[0] != sp[1]:
        return f"{num(m, digits)} <sub>({num(sp[0], digits)}–{num(sp[1], digits)})</sub>"
    return num(m, digits)


def path_table(st, test, paths, rate, unit):
    """The lines of a per-path table of `test`: rate, p50, p99, then the machine's CPU per
    `unit` and the stolen share (left out for raw data recorded before run.sh measured the
    machine's CPU), errors. Paths without a rate are skipped."""
    cpu = any(st.values(test, c, "cpu_us_per_req") for c in paths)
    head = f" machine CPU µs/{unit} | stolen % |" if cpu else ""
    lines = [f"| path | {rate} | p50 ms | p99 ms |{head} errors |",
             f"|---|---:|---:|---:|{'---:|---:|' if cpu else ''}---:|"]
    for c in paths:
        # A contender that ran keeps its row, failed runs and all ("—" where nothing counts).
        if not st.ran(test, c):
            continue
        cpu_cells = (f" {cell(st, test, c, 'cpu_us_per_req', 1)} | "
                     f"{num(st.median(test, c, 'steal_pct'), 1)} |") if cpu else ""
        lines.append(f"| {LABEL[c]} | {cell(st, test, c, 'rps', 0)} | {cell(st, test, c, 'p50_ms')} "
                     f"| {cell(st, test, c, 'p99_ms')} |{cpu_cells} {st.total(test, c, 'errors')} |")
    return lines


def tunnel_ratios(st, test, metric):
    """zonegate's median of `metric` over rathole-tcp's, rathole-noise's and direct's."""
    z = st.median(test, "zonegate", metric)
    return [ratio(z, st.median(test, c, metric)) for c in ("rathole-tcp", "rathole-noise", "direct")]


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def rtxt(r):
    return "—" if r is None else f"{r:.2f}×"


def verdict(ok):
    if ok is None:
        return "—"
    if ok == "noise":
        return "**within noise**"
    return "**met**" if ok else "**missed**"


def ratio_target(st, test, a, bs, metric, target):
    """(text, verdict) of `a` against the best of `bs` in `test`: the median ratio and the
    range of the ratios within each round (the contenders ran minutes apart, and a round's
    ratio is what one run compared); met when every round clears `target`, within noise when
    the median does and some round does not, not judged when a run of either failed."""
    failed = st.failed_runs(test, a) + sum(st.failed_runs(test, b) for b in bs)
    za = st.by_rep(test, a, metric)
    best = {}
    for b in bs:
        for rep, v in st.by_rep(test, b, metric).items():
            best[rep] = max(best.get(rep, 0), v)
    rounds = [za[r] / best[r] for r in za if best.get(r)]
    if failed and not rounds:
        return f"{failed} failed run(s)", None
    if not rounds:
        return "—", None
    med = statistics.median(rounds)
    text = f"{med:.2f}× <sub>(rounds {min(rounds):.2f}–{max(rounds):.2f}×)</sub>"
    if failed:
        return text + f", {failed} failed run(s)", None
    if min(rounds) >= target:
        return text, True
    return text, ("noise" if med >= target else False)


def build(paths):
    docs, runs = load(paths)
    st = Stats(runs)
    d0 = docs[-1]
    m = d0["machine"]
    out = []
    w = out.append
    w("# Benchmark results (issue 8)")
    w("")
    w("Generated by `benches/report.py` from " + ", ".join(
        f"`benches/results/{os.path.basename(p)}`" for p in paths)
      + " (raw data of `benches/run.sh`); chart: [`results.svg`](results.svg). "
        "How it is measured: [`README.md`](README.md).")
    w("")
    dates = ", ".join(d["date"] for d in docs)
    zg = d0.get("zonegate", {})
    w(f"- **Date**: {dates}")
    w(f"- **Machine**: {m.get('nproc')} cores, {m.get('cpu')}, kernel {m.get('kernel')}; "
      f"load average before {m.get('load_before')}, after {' '.join(m.get('load_after') or [])}")
    w(f"- **zonegate**: commit {zg.get('commit')}{' (with uncommitted changes)' if zg.get('dirty') else ''}"
      f" (the repository's at run time{'; binary ' + zg['binary'] if zg.get('binary') else ''}"
      f"{', sha256 ' + zg['sha256'][:16] + '…' if zg.get('sha256') else ''}), release build")
    p = d0.get("params", {})
    warm = p.get("warmup_secs")
    w(f"- **Run**: {p.get('secs')} s per measurement, {p.get('reps')} repetitions per contender, "
      f"interleaved round-robin (order rotated each repetition"
      + (f", after an unrecorded warm-up round of {warm} s each" if warm else ", no warm-up round")
      + "); runs with errors count in no figure; figures are medians, "
      f"<sub>(min–max)</sub> over repetitions; wrk -t{p.get('threads')} -c{p.get('conns')}")
    steal = [r["metrics"]["steal_pct"] for r in runs if "steal_pct" in r["metrics"]]
    if steal:
        w(f"- **Host**: CPU time stolen by the hypervisor during the measurements: median "
          f"{statistics.median(steal):.1f} %, max {max(steal):.1f} % ({len(steal)} measurements); "
          f"each table's *machine CPU* column is the busy CPU of the whole machine (client, "
          f"servers and the path between) per unit of work, steadier than the rates when the "
          f"host is noisy")
    # Recorded before 2026-12-07 (no `outside_raw_pct`), the share left out the softirq time
    # of the benchmark's own system calls and read 0 whatever else ran: not a measurement,
    # and not mixed into the figures of those that are.
    outside = [(r["metrics"]["outside_pct"], r) for r in runs if "outside_raw_pct" in r["metrics"]]
    unmeasured = sum(1 for r in runs
                     if "outside_pct" in r["metrics"] and "outside_raw_pct" not in r["metrics"])
    if unmeasured and not outside:
        w("- **Quiet machine**: not measured by this data (its `outside_pct`, recorded before "
          "2026-12-07, read 0 whatever else ran: see the notes of session 45)")
    if outside:
        busy = sorted({f"{r['test']} {r['contender']} rep {r['rep']} ({pct:.1f} %)"
                       for pct, r in outside if pct > OUTSIDE_LIMIT})
        w(f"- **Quiet machine**: CPU used by processes other than the benchmark's during the "
          f"measurements (another job competing with it): median "
          f"{statistics.median(p for p, _ in outside):.1f} %, max {max(p for p, _ in outside):.1f} % "
          f"of the machine ({len(outside)} measurements); "
          + (f"**over {OUTSIDE_LIMIT:g} % in {len(busy)}**: " + ", ".join(busy)
             if busy else f"none over {OUTSIDE_LIMIT:g} %")
          + (f"; {unmeasured} more recorded before 2026-12-07, not measured (see the notes of "
             f"session 45)" if unmeasured else ""))
    if len(docs) > 1:
        # Sections measured at different times (and maybe builds): each file's own.
        w("- **Sources** (the lines above are the last file's):")
        for path, d in zip(paths, docs):
            if not d["_supplies"]:
                continue
            z, p = d.get("zonegate", {}), d.get("params", {})
            w(f"  - `{os.path.basename(path)}` ({d['date']}, commit {z.get('commit')}"
              f"{' with uncommitted changes' if z.get('dirty') else ''}, {p.get('secs')} s x "
              f"{p.get('reps')}, half-load clients {p.get('half_clients')}): "
              + ", ".join(d["_supplies"]))
    tools = d0.get("tools", {})
    w("- **Tools**: " + "; ".join(f"{v}" for v in tools.values() if v))
    w("")

    targets = []  # (target, measured, ok)

    # ---- throughput and connections
    if st.has("bulk-up") or st.has("conn"):
        w("## Bulk throughput and new connections")
        w("")
        w("| test | " + " | ".join(LABEL[c] for c in TUNNELS)
          + " | zonegate / rathole-tcp | zonegate / rathole-noise | zonegate / direct |")
        w("|---|" + "---:|" * (len(TUNNELS) + 3))
        rows = [("bulk-up", "gbps", "bulk TCP upload, Gbit/s"),
                ("bulk-down", "gbps", "bulk TCP download (-R), Gbit/s"),
                ("conn", "rps", "new connections/s (Connection: close)")]
        cpu_rows = [("bulk-up", "cpu_s_per_gb", "upload: machine CPU s per GB (less is better)"),
                    ("bulk-down", "cpu_s_per_gb", "download: machine CPU s per GB (less is better)"),
                    ("conn", "cpu_us_per_req", "new connections: machine CPU µs per connection (less is better)")]
        for test, metric, title in rows:
            if not st.has(test):
                continue
            z = st.median(test, "zonegate", metric)
            r_tcp, r_noise, r_direct = tunnel_ratios(st, test, metric)
            w(f"| {title} | " + " | ".join(cell(st, test, c, metric) for c in TUNNELS)
              + f" | {rtxt(r_tcp)} | {rtxt(r_noise)} | {rtxt(r_direct)} |")
            if test.startswith("bulk"):
                d = "upload" if test == "bulk-up" else "download"
                targets.append((f"bulk {d} ≥ 1.5× rathole-noise (zonegate's AES-GCM against "
                                f"rathole noise's ChaCha20-Poly1305)",
                                *ratio_target(st, test, "zonegate", ["rathole-noise"], metric, 1.5)))
                targets.append((f"bulk {d} ≥ 1.0× rathole-tcp",
                                *ratio_target(st, test, "zonegate", ["rathole-tcp"], metric, 1.0)))
            else:
                targets.append(("new connections/s ≥ 3× rathole (the faster transport of each round)",
                                *ratio_target(st, test, "zonegate", ["rathole-tcp", "rathole-noise"],
                                              metric, 3.0)))
        for test, metric, title in cpu_rows:
            if not any(st.values(test, c, metric) for c in TUNNELS):
                continue
            w(f"| {title} | " + " | ".join(cell(st, test, c, metric) for c in TUNNELS)
              + "".join(f" | {rtxt(r)}" for r in tunnel_ratios(st, test, metric)) + " |")
        errs = {c: st.total(t, c, "errors") for t in ("bulk-up", "bulk-down", "conn")
                for c in TUNNELS if st.has(t)}
        bad = {c: n for c, n in errs.items() if n}
        w("")
        w("Errors (failed iperf3 runs, wrk socket errors and non-2xx answers): "
          + (", ".join(f"{LABEL[c]} {n}" for c, n in bad.items()) if bad else "none") + ".")
        w("")

    # ---- keep-alive HTTP
    if st.has("http"):
        w("## Keep-alive HTTP/1.1 (wrk --latency; plain HTTP unless marked HTTPS)")
        w("")
        out += path_table(st, "http", HTTP_PATHS, "req/s", "req")
        f = st.median("http", "zonegate-front", "rps")
        n = st.median("http", "nginx-rp", "rps")
        r = ratio(f, n)
        w("")
        w(f"Front / nginx reverse proxy: **{rtxt(r)}** req/s; front / rathole-tcp: "
          f"{rtxt(ratio(f, st.median('http', 'rathole-tcp', 'rps')))}; "
          f"front / direct: {rtxt(ratio(f, st.median('http', 'direct', 'rps')))}.")
        fc = st.median("http", "zonegate-front", "cpu_us_per_req")
        nc = st.median("http", "nginx-rp", "cpu_us_per_req")
        if fc is not None and nc is not None:
            w("")
            w(f"Machine CPU per request: front {num(fc, 1)} µs, nginx reverse proxy {num(nc, 1)} µs: "
              f"requests per CPU-second, front / nginx reverse proxy {rtxt(ratio(nc, fc))}.")
        ft = st.median("http", "zonegate-front-tls", "rps")
        nt = st.median("http", "nginx-rp-tls", "rps")
        if ft is not None or nt is not None:
            w("")
            w(f"Over HTTPS (TLS 1.3, AES-128-GCM, the same certificate; the handshakes happen "
              f"once, before the measured requests): front / nginx reverse proxy {rtxt(ratio(ft, nt))}; "
              f"HTTPS / plain HTTP: front {rtxt(ratio(ft, f))}, nginx {rtxt(ratio(nt, n))}.")
        w("")
        targets.append(("HTTP req/s through the front ≥ 0.8× nginx reverse proxy",
                        *ratio_target(st, "http", "zonegate-front", ["nginx-rp"], "rps", 0.8)))
    if st.has("http-conn"):
        w("### New connections through the front (wrk `Connection: close`)")
        w("")
        w("One request per connection. Over HTTPS each connection makes a TLS 1.3 handshake; "
          "wrk resumes its sessions; both servers pick AES-128-GCM and keep their default "
          "session resumption (zonegate: rustls' session cache; nginx: session tickets, keys "
          "per worker process).")
        w("")
        out += path_table(st, "http-conn", FRONT_CONN_PATHS, "connections/s", "conn")
        w("")
        ratios = [(label, ratio(st.median("http-conn", f, "rps"), st.median("http-conn", n, "rps")))
                  for label, f, n in (("plain HTTP", "zonegate-front", "nginx-rp"),
                                      ("HTTPS", "zonegate-front-tls", "nginx-rp-tls"))]
        w("Front / nginx reverse proxy: " + "; ".join(f"{label} {rtxt(r)}" for label, r in ratios) + ".")
        w("")
    if st.has("http-half"):
        target = st.one("http-half", "zonegate-front", "target_rps")
        # The settings of the file the rows come from, not of the last file read.
        half = next((d for d in docs if "http-half" in d.get("_supplies", [])), d0)
        w(f"### Latency at half of the front's maximum ({num(target, 0)} req/s offered, "
          f"h2load --h1 --rps, {half.get('params', {}).get('half_clients')} connections)")
        w("")
        w("| path | achieved req/s | p50 ms | p99 ms | p99.9 ms | p99 added vs direct | errors |")
        w("|---|---:|---:|---:|---:|---:|---:|")
        d99 = st.median("http-half", "direct", "p99_ms")
        for c in HALF_PATHS:
            p99 = st.median("http-half", c, "p99_ms")
            added = None if (p99 is None or d99 is None or c == "direct") else p99 - d99
            w(f"| {LABEL[c]} | {cell(st, 'http-half', c, 'rps', 0)} "
              f"| {cell(st, 'http-half', c, 'p50_ms')} | {cell(st, 'http-half', c, 'p99_ms')} "
              f"| {cell(st, 'http-half', c, 'p999_ms')} "
              f"| {'—' if added is None else f'{added:+.2f} ms'} | {st.total('http-half', c, 'errors')} |")
        f99 = st.median("http-half", "zonegate-front", "p99_ms")
        added = None if (f99 is None or d99 is None) else f99 - d99
        f999 = st.median("http-half", "zonegate-front", "p999_ms")
        d999 = st.median("http-half", "direct", "p999_ms")
        added999 = None if (f999 is None or d999 is None) else f999 - d999
        w("")
        w("Direct's own p99 is the floor this can resolve: an addition smaller than the spread "
          "of direct's rounds is not told apart from none.")
        w("")
        failed = st.failed_runs("http-half", "zonegate-front") + st.failed_runs("http-half", "direct")
        targets.append(("p99 added by the front ≤ 1 ms at half of its maximum load",
                        ("—" if added is None else f"{added:+.2f} ms")
                        + ("" if added999 is None else f" (p99.9 {added999:+.2f} ms)")
                        + (f", {failed} failed run(s)" if failed else ""),
                        None if added is None or failed else added <= 1.0))

    # ---- new connections over a WAN-like link
    if st.has("wan-conn"):
        link = {k: st.one("wan-link", "wire", k) for k in ("rtt_ms", "connect_ms", "packets",
                                                            "dropped", "error")}
        rtt = link["rtt_ms"] if link["rtt_ms"] is not None else p.get("wan_rtt_ms")
        w(f"## New connections over a link with {num(rtt)} ms round trip (agents at home, gateway on a VPS)")
        w("")
        w("wrk `Connection: close` as in the loopback test, run on the VPS side; nginx and the "
          "tunnel clients in a second namespace behind `examples/delay_wire.rs` "
          f"(TCP connect across it: {num(link['connect_ms'])} ms; "
          + (f"it carried {link['packets']:,} packets and lost {link['dropped']})."
             if link["packets"] is not None else f"no packet counts: {link['error']}).")
          + " Latency is wrk's, from the request's write to the answer's end (the connect before "
            "it is not in it).")
        w("")
        w("| path | connections/s | p50 ms | p99 ms | p50 in round trips | zonegate / this | errors |")
        w("|---|---:|---:|---:|---:|---:|---:|")
        z = st.median("wan-conn", "zonegate", "rps")
        for c in TUNNELS:
            if not st.ran("wan-conn", c):
                continue
            p50 = st.median("wan-conn", c, "p50_ms")
            trips = "—" if (p50 is None or not rtt) else f"{p50 / rtt:.2f}"
            w(f"| {LABEL[c]} | {cell(st, 'wan-conn', c, 'rps', 0)} | {cell(st, 'wan-conn', c, 'p50_ms')} "
              f"| {cell(st, 'wan-conn', c, 'p99_ms')} | {trips} "
              f"| {'—' if c == 'zonegate' else rtxt(ratio(z, st.median('wan-conn', c, 'rps')))} "
              f"| {st.total('wan-conn', c, 'errors')} |")
        w("")
        targets.append((f"new connections/s ≥ 3× rathole (the faster transport of each round), "
                        f"over the {num(rtt)} ms link",
                        *ratio_target(st, "wan-conn", "zonegate", ["rathole-tcp", "rathole-noise"],
                                      "rps", 3.0)))
        if st.has("wan-bulk-up") or st.has("wan-bulk-down"):
            w("Bulk TCP over the same link (iperf3, one stream, Gbit/s). The ceiling here is CPU: "
              "`delay_wire` and every MTU-sized packet's processing share the two cores with the "
              "contenders. So this shows whether a tunnel fills a path with this round trip up to "
              "that ceiling (flow-control windows, congestion control), not which is fastest.")
            w("")
            w("| direction | " + " | ".join(LABEL[c] for c in TUNNELS) + " | zonegate / direct |")
            w("|---|" + "---:|" * (len(TUNNELS) + 1))
            for test, title in (("wan-bulk-up", "upload (VPS → home)"),
                                ("wan-bulk-down", "download (-R)")):
                if st.has(test):
                    r = ratio(st.median(test, "zonegate", "gbps"), st.median(test, "direct", "gbps"))
                    w(f"| {title} | " + " | ".join(cell(st, test, c, "gbps") for c in TUNNELS)
                      + f" | {rtxt(r)} |")
            w("")
            bad = {c: sum(st.total(t, c, "errors") for t in ("wan-bulk-up", "wan-bulk-down"))
                   for c in TUNNELS}
            bad = {c: n for c, n in bad.items() if n}
            w("Errors (failed iperf3 runs): "
              + (", ".join(f"{LABEL[c]} {n}" for c, n in bad.items()) if bad else "none") + ".")
            w("")
        wl = st.one("logs", "wan-zonegate", "warnings")
        if wl is not None:
            w(f"zonegate gateway + agent logged {wl} warnings and "
              f"{st.one('logs', 'wan-zonegate', 'errors')} errors in this section.")
            w("")

    # ---- memory
    if st.has("mem-agent") or st.has("mem-gateway") or st.has("mem-conns"):
        w("## Memory (RSS)")
        w("")
        w("| measurement | figure |")
        w("|---|---:|")
        a = st.one("mem-agent", "node", "idle_rss_kib")
        if a is not None:
            # 0 is what lib.sh's rss_kib reads of a process that is gone: no figure.
            if a:
                shared = st.one("mem-agent", "node", "shared_binary_rss_kib")
                anon = st.one("mem-agent", "node", "idle_anon_kib")
                if shared is None:
                    w(f"| idle node agent (one gateway link, one service) | {a / 1024:.1f} MiB |")
                else:
                    w(f"| idle node agent (one gateway link, one service; its own copy of the "
                      f"binary, as on its own machine) | {a / 1024:.1f} MiB |")
                    if anon:
                        w(f"| — of which its own memory (RssAnon: heap, stacks) | {anon / 1024:.1f} MiB |")
                    if shared:
                        w(f"| (the same agent run from the gateway's binary, their page cache "
                          f"shared) | {shared / 1024:.1f} MiB |")
                targets.append(("idle agent ≤ 10 MiB RSS", f"{a / 1024:.1f} MiB", a <= 10 * 1024))
            else:
                w("| idle node agent | failed: the agent was gone when read |")
                targets.append(("idle agent ≤ 10 MiB RSS", "agent gone", None))
        g = {k: st.one("mem-gateway", "agents", k) for k in
             ("agents", "connected", "gw_empty_kib", "gw_one_agent_kib", "gw_with_agents_kib",
              "per_agent_kib", "sim_rss_kib", "connect_secs", "error", "log_warnings",
              "log_errors", "sim_exit")}
        if g["agents"] is not None and not g["error"] and not all(
                g[k] for k in ("gw_empty_kib", "gw_one_agent_kib", "gw_with_agents_kib")):
            g["error"] = "the gateway was gone when read"
            g["per_agent_kib"] = None
        if g["agents"] is not None:
            if g["error"]:
                w(f"| gateway with {g['agents']} agents | failed: {g['error']} |")
            else:
                w(f"| gateway, no agent | {g['gw_empty_kib'] / 1024:.1f} MiB |")
                w(f"| gateway, 1 agent | {g['gw_one_agent_kib'] / 1024:.1f} MiB |")
                w(f"| gateway, {g['connected'] + 1} agents connected (of {g['agents']} simulated + 1) "
                  f"| {g['gw_with_agents_kib'] / 1024:.1f} MiB |")
                w(f"| **gateway per connected idle agent** | **{g['per_agent_kib']:.1f} KiB** |")
                w(f"| (simulator process, {g['agents']} agents; connect time) "
                  f"| {g['sim_rss_kib'] / 1024:.1f} MiB; {g['connect_secs']} s |")
                if g["log_warnings"] is not None:
                    w(f"| gateway log meanwhile; simulator exit | {g['log_warnings']} warnings, "
                      f"{g['log_errors']} errors; exit {g['sim_exit']} |")
            # A count the gateway's /status did not give (-1, so -2 connected) judges nothing.
            if (g["connected"] or 0) < 0:
                g["per_agent_kib"] = None
            ok = None if g["per_agent_kib"] is None else (
                g["per_agent_kib"] <= 64 and g["connected"] == g["agents"])
            targets.append(("gateway ≤ 64 KiB per connected idle agent",
                            "—" if g["per_agent_kib"] is None else
                            f"{g['per_agent_kib']:.1f} KiB ({g['connected']}/{g['agents']} up)", ok))
        c = {k: st.one("mem-conns", "idle", k) for k in
             ("requested", "ok", "failed", "not_tried", "open_errors", "still_ok_after_hold",
              "hold_errors", "gw_before_kib", "gw_after_kib", "agent_before_kib",
              "agent_after_kib", "gw_per_conn_kib", "agent_per_conn_kib", "open_secs")}
        if c["requested"] is not None:
            w(f"| {c['requested']:,} idle proxied connections (one agent, fresh gateway): opened and echoed | "
              f"{c['ok']:,} ok, {c['failed']} failed, {c['not_tried']} not tried"
              f"{' ' + json.dumps(c['open_errors']) if c['open_errors'] else ''} |")
            w(f"| … still echoing after idling | {c['still_ok_after_hold']} |")
            if not all(c[k] for k in ("gw_before_kib", "gw_after_kib", "agent_before_kib",
                                       "agent_after_kib")):
                c["gw_per_conn_kib"] = c["agent_per_conn_kib"] = None
                w("| RSS | failed: a process was gone when read |")
            w(f"| gateway before → with the connections | {c['gw_before_kib'] / 1024:.1f} → "
              f"{c['gw_after_kib'] / 1024:.1f} MiB ({num(c['gw_per_conn_kib'])} KiB per connection) |")
            w(f"| agent before → with the connections | {c['agent_before_kib'] / 1024:.1f} → "
              f"{c['agent_after_kib'] / 1024:.1f} MiB ({num(c['agent_per_conn_kib'])} KiB per connection) |")
            lw = st.one("mem-conns", "idle", "log_warnings")
            if lw is not None:
                w(f"| gateway + agent log meanwhile | {lw} warnings, "
                  f"{st.one('mem-conns', 'idle', 'log_errors')} errors |")
            clean = (c["ok"] == c["requested"] and c["still_ok_after_hold"] == c["ok"])
            targets.append((f"{c['requested']:,} concurrent idle proxied connections, no errors",
                            f"{c['ok']:,} of {c['requested']:,} ok", clean))
        w("")

    # One line per run: a later run of some sections has log counts of its own, which
    # replaced the earlier run's (of other sections) when merged by test.
    section_of = {"bulk-up": "bulk", "bulk-down": "bulk", "conn": "conn",
                  "http": "http", "http-conn": "http", "http-half": "http"}
    for path, d in zip(paths, docs):
        for r in d["runs"]:
            if r["test"] == "logs" and r["contender"] == "zonegate":
                sections = sorted({section_of[x["test"]] for x in d["runs"]
                                   if x["test"] in section_of})
                w(f"zonegate gateway + agent logged {r['metrics'].get('warnings')} warnings and "
                  f"{r['metrics'].get('errors')} errors during the {'/'.join(sections)} "
                  f"section{'s' if len(sections) > 1 else ''} of `{os.path.basename(path)}`.")
                w("")

    if targets:
        w("## Issue 8 targets")
        w("")
        w("| target | measured | |")
        w("|---|---:|---|")
        for t, meas, ok in targets:
            w(f"| {t} | {meas} | {verdict(ok)} |")
        w("")
    return out, st, d0


def main(paths):
    if not paths:
        sys.exit(__doc__)
    out, st, d0 = build(paths)
    md_path = os.path.join(HERE, "RESULTS.md")
    notes = ""
    if os.path.exists(md_path):
        old = open(md_path).read()
        if NOTES_MARKER in old:
            notes = old.split(NOTES_MARKER, 1)[1]
    text = "\n".join(out) + "\n" + NOTES_MARKER + (notes if notes else "\n")
    with open(md_path, "w") as f:
        f.write(text)
    svg = chart.render(st, d0)
    with open(os.path.join(HERE, "results.svg"), "w") as f:
        f.write(svg)
    print("\n".join(out))
    print(f"# wrote {md_path} and {os.path.join(HERE, 'results.svg')}")


if __name__ == "__main__":
    main(sys.argv[1:])
