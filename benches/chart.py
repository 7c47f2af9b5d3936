#!/usr/bin/env python3
"""SVG chart of run.sh's figures (standard library only; called by report.py).

Small multiples, one panel per test, horizontal bars = medians, whiskers = min-max over
repetitions, a dashed line where issue 8 puts zonegate's target.
"""

from xml.sax.saxutils import escape

COLORS = {
    "direct": "#8c8c8c",
    "zonegate": "#1f77b4",
    "zonegate-tcp": "#1f77b4",
    "zonegate-front": "#0b4f8a",
    "rathole-tcp": "#ff7f0e",
    "rathole-noise": "#d62728",
    "bore": "#2ca02c",
    "nginx-rp": "#9467bd",
    "zonegate-front-tls": "#0b4f8a",
    "nginx-rp-tls": "#9467bd",
    "node": "#1f77b4",
    "gateway": "#0b4f8a",
}
LABEL = {
    "direct": "direct",
    "zonegate": "zonegate",
    "zonegate-tcp": "zonegate tcp app",
    "zonegate-front": "zonegate front",
    "rathole-tcp": "rathole tcp",
    "rathole-noise": "rathole noise",
    "bore": "bore",
    "nginx-rp": "nginx proxy",
    "zonegate-front-tls": "front, HTTPS",
    "nginx-rp-tls": "nginx proxy, HTTPS",
}
TUNNELS = ["direct", "zonegate", "rathole-tcp", "rathole-noise", "bore"]
HTTP_PATHS = ["direct", "nginx-rp", "zonegate-front", "zonegate-tcp", "rathole-tcp",
              "rathole-noise"]
HTTPS_PATHS = ["nginx-rp-tls", "zonegate-front-tls"]
HALF_PATHS = ["direct", "nginx-rp", "zonegate-front"]
FRONT_CONN_PATHS = ["nginx-rp", "zonegate-front"] + HTTPS_PATHS

PANEL_W = 470
LABEL_W = 120
BAR_H = 18
GAP = 6


def fmt(v):
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def panel(x0, y0, title, unit, rows, target=None):
    """rows: [(key, label, median, (lo, hi) or None[, row target])]; returns (parts, height)."""
    parts = [f'<text x="{x0}" y="{y0 + 14}" class="t">{escape(title)}</text>']
    vals = [r[2] for r in rows if r[2] is not None] + [r[3][1] for r in rows if r[3]]
    vals += [r[4] for r in rows if len(r) > 4]
    label_w = LABEL_W + 20 if any(len(r[1]) > 16 for r in rows) else LABEL_W
    if target and target[0] is not None:
        vals.append(target[0])
    vmax = max(vals) if vals else 1.0
    vmax = vmax * 1.12 if vmax > 0 else 1.0
    plot_w = PANEL_W - label_w - 60
    y = y0 + 24
    for key, label, med, spread, *row_target in rows:
        color = COLORS.get(key, "#555")
        if row_target:
            tx = x0 + label_w + row_target[0] / vmax * plot_w
            parts.append(f'<path d="M{tx:.1f} {y - 2}V{y + BAR_H + 2}" class="tg"/>')
        parts.append(f'<text x="{x0 + label_w - 6}" y="{y + BAR_H - 5}" class="l">{escape(label)}</text>')
        if med is None:
            parts.append(f'<text x="{x0 + label_w + 4}" y="{y + BAR_H - 5}" class="v">no data</text>')
        else:
            w = max(1.0, med / vmax * plot_w)
            parts.append(f'<rect x="{x0 + label_w}" y="{y}" width="{w:.1f}" height="{BAR_H}" fill="{color}"/>')
            if spread and spread[0] != spread[1]:
                lo = x0 + label_w + spread[0] / vmax * plot_w
                hi = x0 + label_w + spread[1] / vmax * plot_w
                cy = y + BAR_H / 2
                parts.append(f'<path d="M{lo:.1f} {cy}H{hi:.1f}M{lo:.1f} {cy - 4}V{cy + 4}M{hi:.1f} {cy - 4}V{cy + 4}" class="wh"/>')
            tx = x0 + label_w + max(w, (spread[1] / vmax * plot_w) if spread else 0) + 4
            parts.append(f'<text x="{tx:.1f}" y="{y + BAR_H - 5}" class="v">{fmt(med)}</text>')
        y += BAR_H + GAP
    if target and target[0] is not None:
        tx = x0 + label_w + target[0] / vmax * plot_w
        parts.append(f'<path d="M{tx:.1f} {y0 + 20}V{y}" class="tg"/>')
        parts.append(f'<text x="{tx:.1f}" y="{y + 10}" class="tgl">{escape(target[1])}</text>')
        y += 12
    parts.append(f'<text x="{x0 + label_w}" y="{y + 10}" class="u">{escape(unit)}</text>')
    return parts, y + 16 - y0


def render(st, doc):
    def rows(test, metric, keys):
        return [(k, LABEL.get(k, k), st.median(test, k, metric), st.spread(test, k, metric))
                for k in keys if st.values(test, k, metric)]

    panels = []
    for test, title in (("bulk-up", "Bulk TCP upload (iperf3)"),
                        ("bulk-down", "Bulk TCP download (iperf3 -R)")):
        if st.has(test):
            noise = st.median(test, "rathole-noise", "gbps")
            tcp = st.median(test, "rathole-tcp", "gbps")
            goals = [v for v in ((noise or 0) * 1.5, (tcp or 0) * 1.0) if v]
            target = (max(goals), "target") if goals else None
            panels.append((title, "Gbit/s, higher is better", rows(test, "gbps", TUNNELS), target))
    if st.has("conn"):
        best = max([v for v in (st.median("conn", "rathole-tcp", "rps"),
                                st.median("conn", "rathole-noise", "rps")) if v] or [0])
        panels.append(("New connections/s (Connection: close)", "connections/s, higher is better",
                       rows("conn", "rps", TUNNELS), (best * 3, "target 3× rathole") if best else None))
    if st.has("wan-conn"):
        best = max([v for v in (st.median("wan-conn", "rathole-tcp", "rps"),
                                st.median("wan-conn", "rathole-noise", "rps")) if v] or [0])
        rtt = st.one("wan-link", "wire", "rtt_ms") or doc.get("params", {}).get("wan_rtt_ms")
        panels.append((f"New connections/s over a {fmt(rtt or 0)} ms link",
                       "connections/s, higher is better", rows("wan-conn", "rps", TUNNELS),
                       (best * 3, "target 3× rathole") if best else None))
    if st.has("http"):
        n = st.median("http", "nginx-rp", "rps")
        panels.append(("Keep-alive HTTP/1.1 requests/s", "requests/s, higher is better",
                       rows("http", "rps", HTTP_PATHS), (n * 0.8, "target 0.8× nginx") if n else None))
        panels.append(("Keep-alive HTTP/1.1 p99 at full load", "ms, lower is better",
                       rows("http", "p99_ms", HTTP_PATHS), None))
        if any(st.values("http", c, "rps") for c in HTTPS_PATHS):
            panels.append(("Keep-alive HTTPS (TLS 1.3) requests/s", "requests/s, higher is better",
                           rows("http", "rps", HTTPS_PATHS), None))
    if st.has("http-conn"):
        panels.append(("New connections through the front (plain, HTTPS)",
                       "connections/s, higher is better",
                       rows("http-conn", "rps", FRONT_CONN_PATHS), None))
    if st.has("http-half"):
        d = st.median("http-half", "direct", "p99_ms")
        panels.append(("p99 at half of the front's maximum", "ms, lower is better",
                       rows("http-half", "p99_ms", HALF_PATHS),
                       (d + 1.0, "target: direct + 1 ms") if d is not None else None))
    mem_rows = []
    # 0 is an RSS read of a process that was gone; a failed gateway run is no figure either.
    a = st.one("mem-agent", "node", "idle_rss_kib")
    if a:
        mem_rows.append(("node", f"idle agent {a / 1024:.1f} MiB", a / 1024 / 10.0, None))
    g = st.one("mem-gateway", "agents", "per_agent_kib")
    gw_ok = not st.one("mem-gateway", "agents", "error") and all(
        st.one("mem-gateway", "agents", k) for k in ("gw_one_agent_kib", "gw_with_agents_kib"))
    if g is not None and gw_ok:
        mem_rows.append(("gateway", f"gw/agent {g:.0f} KiB", g / 64.0, None))
    if mem_rows:
        panels.append(("Memory against its target (10 MiB; 64 KiB/agent)", "× target, lower is better",
                       mem_rows, (1.0, "target")))

    parts = []
    col_h = [40, 40]
    for i, (title, unit, rs, target) in enumerate(panels):
        col = 0 if col_h[0] <= col_h[1] else 1
        p, h = panel(10 + col * (PANEL_W + 20), col_h[col], title, unit, rs, target)
        parts.extend(p)
        col_h[col] += h + 18
    width = 2 * PANEL_W + 40
    height = max(col_h) + 10
    m = doc.get("machine", {})
    p = doc.get("params", {})
    head = (f"zonegate benchmarks — {doc.get('date', '')} — {m.get('nproc')} cores, {m.get('cpu')}, "
            f"kernel {m.get('kernel')} — medians of {p.get('reps')} × {p.get('secs')} s, whiskers min–max")
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif">',
        "<style>.t{font-size:13px;font-weight:bold}.l{font-size:11px;text-anchor:end}"
        ".v{font-size:11px}.u{font-size:10px;fill:#666}.h{font-size:12px}"
        ".wh{stroke:#222;stroke-width:1;fill:none}.tg{stroke:#000;stroke-dasharray:4 3;fill:none}"
        ".tgl{font-size:10px;text-anchor:middle}</style>",
        f'<rect width="{width}" height="{height}" fill="#fff"/>',
        f'<text x="10" y="20" class="h">{escape(head)}</text>',
        *parts,
        "</svg>",
        "",
    ])
