#!/usr/bin/env python3
"""Soak results: assemble soak.sh's raw data, and write benches/SOAK.md + benches/soak.svg.

  soak_report.py --assemble RUNS.jsonl SAMPLES.jsonl LOG_PROBLEMS.txt OUT.json
  soak_report.py benches/results/soak-2026-11-22T0300Z.json

Exit status 1 when the soak failed (any error, or RSS growth of 10% or more after warm-up).
Text below the notes marker of an existing SOAK.md is kept.
"""

import json
import os
import platform
import subprocess
import sys
from xml.sax.saxutils import escape

HERE = os.path.dirname(os.path.abspath(__file__))
NOTES_MARKER = "<!-- notes below this line are kept when soak_report.py regenerates the file -->"
GROWTH_LIMIT = 10.0
PROCS = [("gw_kib", "gateway"), ("n1_kib", "agent n1 (services)"), ("n2_kib", "agent n2 (mesh forward)")]


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def assemble(runs_path, samples_path, problems_path, out_path):
    env = os.environ
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), None)
    repo = env.get("REPO_DIR", ".")
    keys = ["SOAK_SECS", "WARMUP_SECS", "SAMPLE", "CHUNK", "HTTP_CONNS", "CONN_CONNS",
            "IPERF_EVERY", "IPERF_SECS", "IPERF_RATE", "UDP_RATE", "DNS_QPS"]
    doc = {
        "date": env.get("SOAK_STARTED"),
        "machine": {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
                    "load_after": env.get("LOAD_AFTER")},
        "zonegate": {"binary": env.get("ZONEGATE"),
                     "commit": sh(f"git -C {repo} rev-parse --short HEAD"),
                     "dirty": bool(sh(f"git -C {repo} status --porcelain --untracked-files=no"))},
        "params": {k.lower(): env.get(k) for k in keys},
        "samples": [json.loads(l) for l in open(samples_path) if l.strip()],
        "runs": [json.loads(l) for l in open(runs_path) if l.strip()],
        "log_problems": open(problems_path).read().splitlines() if os.path.exists(problems_path) else [],
    }
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"# raw data: {out_path}")
    return summarize(doc)["pass"]


def summarize(doc):
    runs, samples = doc["runs"], doc["samples"]
    warm = int(doc["params"].get("warmup_secs") or 60)

    def of(test):
        return [r["metrics"] for r in runs if r["test"] == test]

    def total(ms, k):
        return sum(m.get(k) or 0 for m in ms if isinstance(m.get(k), (int, float)))

    s = {"loads": [], "rss": [], "errors": 0}
    http, conn, bulk, dns, udp = of("http"), of("conn"), of("bulk"), of("dns"), of("udp")
    if http:
        s["loads"].append(("keep-alive HTTP via the front (wrk)", f"{len(http)} runs, "
                           f"{total(http, 'requests'):,} requests, "
                           f"{total(http, 'requests') / max(1e-9, total(http, 'secs')):,.0f} req/s",
                           total(http, "errors")))
    if conn:
        s["loads"].append(("new connections via a tcp app (wrk, Connection: close)",
                           f"{len(conn)} runs, {total(conn, 'requests'):,} connections, "
                           f"{total(conn, 'requests') / max(1e-9, total(conn, 'secs')):,.0f}/s",
                           total(conn, "errors")))
    if bulk:
        ok = [m["gbps"] for m in bulk if m.get("gbps")]
        s["loads"].append(("iperf3 bursts via a tcp app", f"{len(bulk)} bursts"
                           + (f", {min(ok):.2f}–{max(ok):.2f} Gbit/s" if ok else ""),
                           total(bulk, "errors")))
    if dns:
        s["loads"].append(("DNS queries (dnsperf, UDP)", f"{total(dns, 'sent'):,} sent, "
                           f"{total(dns, 'lost')} lost, {total(dns, 'noerror'):,} NOERROR",
                           total(dns, "errors")))
    if udp:
        u = udp[0]
        s["loads"].append(("UDP app echo", f"{u['sent']:,} sent, {u['received']:,} echoed, "
                           f"{u['lost']} lost, {u['outages']} one-second outages",
                           u["outages"]))
    failed = [f for sm in samples for f in (sm.get("check") or {}).get("failed", [])]
    s["loads"].append(("checks every sample (front GET, mesh GET, /status agents, DNS TXT over TCP)",
                       f"{len(samples)} rounds, {len(failed)} failed"
                       + (f" ({', '.join(sorted(set(failed)))})" if failed else ""), len(failed)))
    logs = of("logs")
    if logs:
        s["loads"].append(("zonegate logs", f"{logs[0].get('warnings')} WARN lines, "
                           f"{logs[0].get('errors')} ERROR lines", logs[0].get("errors") or 0))
    s["errors"] = sum(e for _, _, e in s["loads"])
    ok = True
    for key, name in PROCS:
        pts = [(sm["t"], sm.get(key) or 0) for sm in samples if sm.get(key)]
        if not pts:
            continue
        after = [p for p in pts if p[0] >= warm]
        base = after[0] if after else pts[0]
        end = pts[-1]
        growth = (end[1] - base[1]) / base[1] * 100 if base[1] else None
        peak = max(v for _, v in pts)
        good = growth is not None and growth < GROWTH_LIMIT
        ok = ok and good
        s["rss"].append((name, base, end, growth, peak, good))
    s["pass"] = ok and s["errors"] == 0 and bool(samples)
    return s


def svg(doc):
    samples = doc["samples"]
    w, h, left, top, bottom = 780, 260, 60, 30, 40
    pts = {k: [(sm["t"], (sm.get(k) or 0) / 1024) for sm in samples] for k, _ in PROCS}
    tmax = max([sm["t"] for sm in samples] or [1]) or 1
    vmax = max([v for p in pts.values() for _, v in p] or [1]) * 1.15
    colors = {"gw_kib": "#0b4f8a", "n1_kib": "#ff7f0e", "n2_kib": "#2ca02c"}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="#fff"/>',
           f'<text x="{left}" y="18" font-size="13" font-weight="bold">RSS during the soak ({escape(str(doc.get("date")))}), MiB</text>']
    pw, ph = w - left - 200, h - top - bottom
    for i in range(5):
        v = vmax * i / 4
        y = top + ph - ph * i / 4
        out.append(f'<path d="M{left} {y:.1f}H{left + pw}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{v:.0f}</text>')
    warm = int(doc["params"].get("warmup_secs") or 60)
    wx = left + pw * min(warm, tmax) / tmax
    out.append(f'<path d="M{wx:.1f} {top}V{top + ph}" stroke="#000" stroke-dasharray="4 3"/>')
    out.append(f'<text x="{wx + 3:.1f}" y="{top + 10}">warm-up</text>')
    out.append(f'<text x="{left + pw / 2}" y="{h - 8}" text-anchor="middle">seconds</text>')
    out.append(f'<text x="{left}" y="{top + ph + 14}">0</text><text x="{left + pw}" y="{top + ph + 14}" text-anchor="end">{tmax}</text>')
    for n, (k, name) in enumerate(PROCS):
        p = pts[k]
        if not p:
            continue
        d = " ".join(f"{'M' if i == 0 else 'L'}{left + pw * t / tmax:.1f} {top + ph - ph * v / vmax:.1f}"
                     for i, (t, v) in enumerate(p))
        out.append(f'<path d="{d}" fill="none" stroke="{colors[k]}" stroke-width="2"/>')
        out.append(f'<rect x="{left + pw + 12}" y="{top + n * 18}" width="12" height="10" fill="{colors[k]}"/>')
        out.append(f'<text x="{left + pw + 28}" y="{top + n * 18 + 9}">{escape(name)}</text>')
    out.append("</svg>\n")
    return "\n".join(out)


def report(path):
    doc = json.load(open(path))
    s = summarize(doc)
    p, m, zg = doc["params"], doc["machine"], doc.get("zonegate", {})
    o = []
    w = o.append
    w("# Soak (issue 10)")
    w("")
    w(f"Generated by `benches/soak_report.py` from `benches/results/{os.path.basename(path)}` "
      "(raw samples and every load run of `benches/soak.sh`); RSS chart: [`soak.svg`](soak.svg). "
      "How to run and what it does: [`README.md`](README.md#soak).")
    w("")
    w(f"- **Date**: {doc.get('date')}; **duration** {p.get('soak_secs')} s, warm-up {p.get('warmup_secs')} s, "
      f"samples every {p.get('sample')} s")
    w(f"- **Machine**: {m.get('nproc')} cores, {m.get('cpu')}, kernel {m.get('kernel')}; load average at the end {m.get('load_after')}")
    w(f"- **zonegate**: commit {zg.get('commit')}{' (with uncommitted changes)' if zg.get('dirty') else ''}, release build; "
      "one gateway, agent n1 (http, iperf, UDP echo services), agent n2 (mesh forward to n1/http)")
    w(f"- **Load, all at once**: wrk -c{p.get('http_conns')} keep-alive via the front; wrk -c{p.get('conn_conns')} "
      f"`Connection: close` via a tcp app; iperf3 {p.get('iperf_secs')} s at {p.get('iperf_rate')}bit/s every "
      f"{p.get('iperf_every')} s; UDP echo {p.get('udp_rate')}/s; dnsperf {p.get('dns_qps')} q/s")
    w("")
    w(f"**Verdict: {'PASS' if s['pass'] else 'FAIL'}** — {s['errors']} errors (target 0); RSS growth after warm-up "
      + ", ".join(f"{name} {g:+.1f}%" for name, _, _, g, _, _ in s["rss"] if g is not None)
      + f" (target < {GROWTH_LIMIT:.0f}%).")
    w("")
    w("| load | what ran | errors |")
    w("|---|---|---:|")
    for name, what, errs in s["loads"]:
        w(f"| {name} | {what} | {errs} |")
    w("")
    w("| process | RSS after warm-up | RSS at the end | growth | peak | < 10% |")
    w("|---|---:|---:|---:|---:|---|")
    for name, base, end, g, peak, good in s["rss"]:
        w(f"| {name} | {base[1] / 1024:.1f} MiB (t={base[0]} s) | {end[1] / 1024:.1f} MiB (t={end[0]} s) "
          f"| {'—' if g is None else f'{g:+.1f}%'} | {peak / 1024:.1f} MiB | {'yes' if good else '**no**'} |")
    w("")
    if doc.get("log_problems"):
        w("First WARN/ERROR log lines:")
        w("")
        w("```")
        o.extend(l[:300] for l in doc["log_problems"][:10])
        w("```")
        w("")
    md = os.path.join(HERE, "SOAK.md")
    notes = ""
    if os.path.exists(md):
        old = open(md).read()
        if NOTES_MARKER in old:
            notes = old.split(NOTES_MARKER, 1)[1]
    with open(md, "w") as f:
        f.write("\n".join(o) + "\n" + NOTES_MARKER + (notes or "\n"))
    with open(os.path.join(HERE, "soak.svg"), "w") as f:
        f.write(svg(doc))
    print("\n".join(o))
    print(f"# wrote {md} and {os.path.join(HERE, 'soak.svg')}")
    return s["pass"]


def main(argv):
    if len(argv) == 6 and argv[1] == "--assemble":
        ok = assemble(*argv[2:])
    elif len(argv) == 2:
        ok = report(argv[1])
    else:
        sys.exit(__doc__)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(sys.argv)
