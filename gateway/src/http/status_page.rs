//! The admin status page (`/` on the admin address): devices and their tunnels, the zone
//! health colour, and per-app counters — rendered on the server from the same JSON as
//! `/status`, so it needs no script and shows the same truth.

use std::fmt::Write as _;

use serde_json::Value;

/// Seconds between automatic reloads of the page.
const REFRESH_SECS: u32 = 5;

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => esc(s),
        Value::Null => String::new(),
        other => esc(&other.to_string()),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A certificate's end (Unix seconds) as a date (UTC), marked when `soon` or past: the
/// gateway's operator renews device certificates and the HTTPS ones, and nothing else on the
/// page says one is about to stop a device or a site.
fn cert_end(end: Option<i64>, soon: bool, now: i64) -> String {
    let Some(end) = end else {
        return String::new();
    };
    let date = time::OffsetDateTime::from_unix_timestamp(end)
        .map(|t| t.date().to_string())
        .unwrap_or_default();
    if end <= now {
        format!("<span class=\"down\">{date} (expired)</span>")
    } else if soon {
        let days = (end - now).div_euclid(86_400);
        format!("<span class=\"down\">{date} ({days} days left)</span>")
    } else {
        date
    }
}

/// A device certificate's end, marked within [`DEVICE_CERT_SOON_DAYS`] of it, when its node
/// starts warning.
fn device_cert_end(end: Option<i64>, now: i64) -> String {
    let soon = end.is_some_and(|e| e - now < DEVICE_CERT_SOON_DAYS * 86_400);
    cert_end(end, soon, now)
}

/// An RFC 3339 time of `/status` as Unix seconds.
fn unix_of(v: &Value) -> Option<i64> {
    let t =
        time::OffsetDateTime::parse(v.as_str()?, &time::format_description::well_known::Rfc3339)
            .ok()?;
    Some(t.unix_timestamp())
}

/// Days before a device certificate's end from which the page marks it (as its node warns).
const DEVICE_CERT_SOON_DAYS: i64 = 30;

/// What a colour means, in the product's words (DESIGN.md, "Zone health colours").
fn health_words(c: &str) -> &'static str {
    match c {
        "green" => "every device of the zone is connected",
        "yellow" => "a device is missing",
        "orange" => "most devices are missing",
        "red" => "no device is connected",
        _ => "unknown",
    }
}

/// Renders the page from the `/status` JSON of a gateway.
pub fn render(status: &Value) -> String {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let health = status["health"].as_str().unwrap_or("unknown");
    let colour = match health {
        "green" => "#2e9d44",
        "yellow" => "#d9b400",
        "orange" => "#e2760b",
        "red" => "#c8281e",
        _ => "#777",
    };
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
<title>zonegate — {zone}</title>\
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}\
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:.3em .7em;text-align:left}}\
th{{background:#f3f3f3}}.badge{{display:inline-block;padding:.2em .8em;border-radius:1em;color:#fff;font-weight:bold}}\
.up{{color:#2e9d44}}.down{{color:#c8281e}}</style></head><body>\n\
<h1>zonegate gateway <code>{device}</code> for <code>{zone}</code></h1>\n\
<p id=\"health\">Zone health: <span class=\"badge\" style=\"background:{colour}\" data-health=\"{health}\">{health}</span> — {words}. \
Zone config serial {serial}, valid until {expires}; this gateway's certificate ends {own}; up {uptime} s{draining}.</p>\n",
        zone = text(&status["zone"]),
        device = text(&status["device"]),
        health = esc(health),
        words = health_words(health),
        serial = text(&status["zone_serial"]),
        // Marked from 30 days before, as the log warns: past its end the gateway's certificate
        // is refused by every device, and an expired zone config by devices bootstrapping.
        expires = device_cert_end(unix_of(&status["zone_expires_at"]), now),
        own = device_cert_end(unix_of(&status["cert_not_after"]), now),
        uptime = text(&status["uptime_secs"]),
        draining = if status["draining"].as_bool() == Some(true) {
            "; <strong>draining</strong>"
        } else {
            ""
        },
    );

    // Devices: every device of the zone config, connected or not, plus any connected extra.
    let agents = status["agents"].as_array().cloned().unwrap_or_default();
    let mut names: Vec<String> = status["devices_expected"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    for a in &agents {
        if let Some(d) = a["device"].as_str() {
            if !names.iter().any(|n| n == d) {
                names.push(d.to_owned());
            }
        }
    }
    let _ = write!(
        h,
        "<h2>Devices</h2>\n<table id=\"devices\"><tr><th>device</th><th>state</th><th>address</th><th>RTT</th><th>path MTU</th><th>up</th><th>services</th><th>streams</th><th>to device</th><th>from device</th><th>certificate ends (UTC)</th></tr>\n"
    );
    for n in &names {
        match agents.iter().find(|a| a["device"].as_str() == Some(n)) {
            Some(a) => {
                let services: Vec<String> = a["services"]
                    .as_array()
                    .map(|s| s.iter().map(|x| text(&x["name"])).collect())
                    .unwrap_or_default();
                let _ = writeln!(
                    h,
                    "<tr class=\"device\" data-device=\"{d}\"><td>{d}</td><td class=\"up\">connected</td><td>{addr}</td><td>{rtt:.1} ms</td><td>{mtu} B</td><td>{up} s</td><td>{svc}</td><td>{st}</td><td>{to}</td><td>{from}</td><td>{cert}</td></tr>",
                    d = esc(n),
                    addr = text(&a["addr"]),
                    rtt = a["rtt_ms"].as_f64().unwrap_or(0.0),
                    mtu = text(&a["path_mtu"]),
                    up = text(&a["uptime_secs"]),
                    svc = services.join(", "),
                    st = text(&a["streams"]),
                    to = bytes(a["bytes_to"].as_u64().unwrap_or(0)),
                    from = bytes(a["bytes_from"].as_u64().unwrap_or(0)),
                    cert = device_cert_end(a["cert_not_after_unix"].as_i64(), now),
                );
            }
            None => {
                // Its certificate as the zone config lists it: one that ended is why a device
                // is cut off, with nothing else here to say so.
                let _ = writeln!(
                    h,
                    "<tr class=\"device\" data-device=\"{d}\"><td>{d}</td><td class=\"down\">not connected</td><td colspan=\"8\"></td><td>{cert}</td></tr>",
                    d = esc(n),
                    cert = device_cert_end(status["device_cert_not_after_unix"][n].as_i64(), now),
                );
            }
        }
    }
    h.push_str("</table>\n");

    let _ = write!(
        h,
        "<h2>Apps</h2>\n<table id=\"apps\"><tr><th>app</th><th>route</th><th>requests</th><th>connections</th><th>bytes in</th><th>bytes out</th><th>refused</th></tr>\n"
    );
    for a in status["apps"].as_array().cloned().unwrap_or_default() {
        let c = &a["counters"];
        let refusals: Vec<String> = c["refusals"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| format!("{} {}", esc(k), v)).collect())
            .unwrap_or_default();
        let _ = writeln!(
            h,
            "<tr class=\"app\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            text(&a["name"]),
            text(&a["summary"]),
            text(&c["requests"]),
            text(&c["connections"]),
            bytes(c["bytes_in"].as_u64().unwrap_or(0)),
            bytes(c["bytes_out"].as_u64().unwrap_or(0)),
            refusals.join(", "),
        );
    }
    h.push_str("</table>\n");
    let p = &status["policy"];
    if p["ok"].as_bool() == Some(false) {
        let errs: Vec<String> = p["errors"]
            .as_array()
            .map(|e| e.iter().map(text).collect())
            .unwrap_or_default();
        let _ = writeln!(
            h,
            "<h2>Policy</h2><p class=\"down\">The last policy edit was refused; the previous policy keeps serving:</p><pre>{}</pre>",
            errs.join("\n")
        );
    }
    // Apps the policy has but whose address could not be taken (another program holds it):
    // they look idle in the table above, and serve nothing until the gateway's retry binds.
    let unbound: Vec<String> = status["listener_errors"]
        .as_array()
        .map(|e| e.iter().map(text).collect())
        .unwrap_or_default();
    if !unbound.is_empty() {
        let _ = writeln!(
            h,
            "<h2>Listeners</h2><p class=\"down\">These apps cannot listen yet (retried every poll):</p><pre>{}</pre>",
            unbound.join("\n")
        );
    }
    // The `[[tls]]` pairs: the end of each certificate served, and those whose files fail.
    let certs = status["tls_certificates"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !certs.is_empty() {
        h.push_str("<h2>HTTPS certificates</h2>\n<table id=\"tls\"><tr><th>file</th><th>names</th><th>ends (UTC)</th><th>files</th></tr>\n");
        for c in &certs {
            let names: Vec<String> = c["names"]
                .as_array()
                .map(|n| n.iter().map(text).collect())
                .unwrap_or_default();
            let (from, end) = (unix_of(&c["not_before"]), unix_of(&c["not_after"]));
            // As the gateway's log tells it: a quarter of its lifetime left and not renewed
            // (certbot renews with a third left; a 6-day certificate is not "ending" for 30).
            let soon = match (from, end) {
                (Some(f), Some(e)) => (e - now).saturating_mul(4) < e - f,
                _ => false,
            };
            let files = match (c["failing"].as_bool(), end) {
                (Some(true), Some(_)) => {
                    "<span class=\"down\">do not load (the certificate before serves on)</span>"
                }
                (Some(true), None) => {
                    "<span class=\"down\">never loaded (its names get the first pair's certificate)</span>"
                }
                _ => "loaded",
            };
            let _ = writeln!(
                h,
                "<tr class=\"tls\"><td>{}</td><td>{}</td><td>{}</td><td>{files}</td></tr>",
                text(&c["file"]),
                names.join(", "),
                cert_end(end, soon, now),
            );
        }
        h.push_str("</table>\n");
        let errors: Vec<String> = status["tls_errors"]
            .as_array()
            .map(|e| e.iter().map(text).collect())
            .unwrap_or_default();
        if !errors.is_empty() {
            let _ = writeln!(h, "<pre class=\"down\">{}</pre>", errors.join("\n"));
        }
    }
    h.push_str("<p><a href=\"/status\">/status</a> (JSON) · <a href=\"/metrics\">/metrics</a> (Prometheus)</p>\n</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shows_devices_health_and_apps_escaped() {
        let s = json!({
            "device": "gw", "zone": "alice.example", "zone_serial": 4, "uptime_secs": 9,
            "draining": false, "health": "yellow",
            "devices_expected": ["home1", "home2"],
            "agents": [{"device": "home1", "addr": "198.51.100.2:4000", "rtt_ms": 1.5, "path_mtu": 1470,
                        "uptime_secs": 3, "streams": 2, "bytes_to": 2048, "bytes_from": 10,
                        "services": [{"name": "dfs", "proto": "tcp"}]}],
            "apps": [{"name": "dfs", "summary": "http alice.example/dfs -> home1/dfs",
                      "counters": {"requests": 7, "connections": 0, "bytes_in": 0,
                                   "bytes_out": 1, "refusals": {"method": 2}}}],
            "policy": {"ok": false, "errors": ["a.toml:1:1: <bad>"]},
            "listener_errors": ["app game: cannot listen on UDP 0.0.0.0:27015: <in use>"],
        });
        let mut s = s;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let in_ten_days = now + 10 * 86_400 + 3_600;
        s["agents"][0]["cert_not_after_unix"] = json!(in_ten_days);
        // home2, not connected: its certificate as the zone config lists it, ended.
        s["device_cert_not_after_unix"] = json!({"home1": in_ten_days, "home2": 1_000});
        let rfc = |t: i64| {
            time::OffsetDateTime::from_unix_timestamp(t)
                .unwrap()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap()
        };
        s["tls_certificates"] = json!([
            {"file": "/etc/zonegate/gw/tls/fullchain.pem", "names": ["alice.example", "<x>"],
             "not_before": "2024-01-01T00:00:00Z", "not_after": "2099-01-01T00:00:00Z", "failing": false},
            // A 6-day certificate with 3 days left: half its life, not "ending".
            {"file": "/etc/zonegate/gw/tls/short.pem", "names": ["s.example"],
             "not_before": rfc(now - 3 * 86_400), "not_after": rfc(now + 3 * 86_400 + 60), "failing": true},
            // A 90-day one with 20 days left: under a quarter.
            {"file": "/etc/zonegate/gw/tls/late.pem", "names": ["l.example"],
             "not_before": rfc(now - 70 * 86_400), "not_after": rfc(now + 20 * 86_400 + 60), "failing": false},
            {"file": "/etc/zonegate/gw/tls/new.pem", "names": [], "not_before": null, "not_after": null, "failing": true},
        ]);
        s["tls_errors"] = json!(["/etc/zonegate/gw/tls/new.key: <no key>"]);
        s["zone_expires_at"] = json!(rfc(now + 5 * 86_400 + 60));
        s["cert_not_after"] = json!("2099-01-01T00:00:00Z");
        let h = render(&s);
        assert!(h.contains("data-health=\"yellow\""));
        assert!(
            h.contains("<td>home1</td><td class=\"up\">connected</td>"),
            "{h}"
        );
        assert!(
            h.contains("<td>home2</td><td class=\"down\">not connected</td>"),
            "{h}"
        );
        assert!(h.contains("2.0 KiB"));
        assert!(h.contains("<td>1.5 ms</td><td>1470 B</td>"), "{h}");
        assert!(h.contains("method 2"));
        assert!(h.contains("&lt;bad&gt;") && !h.contains("<bad>"));
        assert!(
            h.contains("cannot listen yet") && h.contains("27015: &lt;in use&gt;"),
            "{h}"
        );
        assert!(h.contains("(10 days left)</span></td></tr>"), "{h}");
        assert!(
            h.contains("(5 days left)</span>; this gateway's certificate ends 2099-01-01; up 9 s"),
            "{h}"
        );
        assert!(
            h.contains("<td colspan=\"8\"></td><td><span class=\"down\">1970-01-01 (expired)</span></td></tr>"),
            "{h}"
        );
        assert!(
            h.contains("<td>alice.example, &lt;x&gt;</td><td>2099-01-01</td><td>loaded</td>"),
            "{h}"
        );
        assert!(
            h.contains("/new.pem</td><td></td><td></td><td><span class=\"down\">never loaded"),
            "{h}"
        );
        let row = |file: &str| {
            h.lines()
                .find(|l| l.contains(file))
                .unwrap_or_else(|| panic!("{file}: {h}"))
                .to_owned()
        };
        let short = row("short.pem");
        assert!(
            !short.contains("days left") && short.contains("do not load (the certificate before"),
            "{short}"
        );
        assert!(row("late.pem").contains("(20 days left)"), "{h}");
        assert!(h.contains("new.key: &lt;no key&gt;"), "{h}");
        // Past its end.
        assert_eq!(
            cert_end(Some(1_000), false, 2_000),
            "<span class=\"down\">1970-01-01 (expired)</span>"
        );
    }
}
