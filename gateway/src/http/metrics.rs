//! Prometheus text for the admin `/metrics`: HTTP requests per app by status code, a latency
//! histogram per app (time until the response headers), and tunnel gauges per device. App
//! counters (bytes, refusals) come from [`policies::accounting::render_prometheus`].
//!
//! Label cardinality is bounded: apps come from the policy (plus `-` for requests no app
//! serves; an app the policy no longer has is dropped at the next scrape), and an app's
//! status codes are at most [`MAX_CODES`], later ones counted as `other` (a service may answer
//! any code from 100 to 999).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tunnel::admit::GateStats;
use tunnel::status::AgentStatus;

/// The app label of requests that matched no app.
pub const NO_APP: &str = "-";
/// Distinct status codes one app's requests are counted by at most; the rest under `other`.
pub const MAX_CODES: usize = 32;
/// Where codes past [`MAX_CODES`] are counted (no status is 0).
const OTHER_CODE: u16 = 0;
/// Histogram bucket bounds in seconds: from a cached page on a LAN to a slow home uplink.
pub const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Default, Clone)]
struct AppHttp {
    by_status: BTreeMap<u16, u64>,
    /// Non-cumulative counts per bucket; the last slot is `+Inf`.
    buckets: [u64; BUCKETS.len() + 1],
    count: u64,
    sum: f64,
}

/// HTTP metrics of the front. A mutex is enough: one short critical section per request.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    apps: Mutex<BTreeMap<String, AppHttp>>,
    /// Requests refused before they could be read (malformed or oversized heads), by status:
    /// they have no app and no meaningful latency.
    unread: Mutex<BTreeMap<u16, u64>>,
    /// Connections closed at accept: their client had its limit open, or the front had
    /// [`super::MAX_CONNECTIONS`].
    refused_per_ip: AtomicU64,
    refused_full: AtomicU64,
    /// Connections ended to make room for another client's.
    evicted: AtomicU64,
    /// Connections that ended before any request: no whole head within the head timeout
    /// (slow headers), a TLS handshake that failed or timed out. Not logged (a client can
    /// cause one per connection): counted, so an attack shows.
    unserved: [AtomicU64; 3],
}

/// Why a connection ended before any request ([`HttpMetrics::unserved`]).
#[derive(Debug, Clone, Copy)]
pub enum Unserved {
    /// No whole request head within the head timeout.
    NoHead = 0,
    /// Its TLS handshake failed (not TLS, no shared cipher, a bad record).
    TlsFailed = 1,
    /// Its TLS handshake did not finish within the handshake timeout.
    TlsTimeout = 2,
}

impl Unserved {
    const ALL: [Unserved; 3] = [Unserved::NoHead, Unserved::TlsFailed, Unserved::TlsTimeout];
    fn label(self) -> &'static str {
        match self {
            Unserved::NoHead => "no_request_head",
            Unserved::TlsFailed => "tls_failed",
            Unserved::TlsTimeout => "tls_timeout",
        }
    }
}

/// Why a connection was closed as soon as it was accepted.
#[derive(Debug, Clone, Copy)]
pub enum ConnRefusal {
    /// Its client address had [`super::HttpTuning::max_connections_per_ip`] open.
    PerIp,
    /// The front had all its connections open ([`super::HttpTuning::max_connections`]) and
    /// no room could fairly be made.
    Full,
}

impl HttpMetrics {
    /// Records one request of `app` answered with `status` after `latency`.
    pub fn observe(&self, app: &str, status: u16, latency: Duration) {
        let mut apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
        if !apps.contains_key(app) {
            apps.insert(app.to_owned(), AppHttp::default());
        }
        let Some(a) = apps.get_mut(app) else { return };
        let code = if a.by_status.len() >= MAX_CODES && !a.by_status.contains_key(&status) {
            OTHER_CODE
        } else {
            status
        };
        *a.by_status.entry(code).or_default() += 1;
        let secs = latency.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        a.buckets[i] += 1;
        a.count += 1;
        a.sum += secs;
    }

    /// Records a request refused with `status` because its head could not be read.
    pub fn refused_unread(&self, status: u16) {
        let mut unread = self.unread.lock().unwrap_or_else(|p| p.into_inner());
        *unread.entry(status).or_default() += 1;
    }

    /// Records a connection closed at accept.
    pub fn refused_connection(&self, why: ConnRefusal) {
        match why {
            ConnRefusal::PerIp => &self.refused_per_ip,
            ConnRefusal::Full => &self.refused_full,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// Records a connection ended to make room for another client's, once per connection:
    /// true the first time.
    pub(crate) fn evicted_connection(&self, held: &crate::make_room::Held) -> bool {
        let first = held.count_eviction_once();
        if first {
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
        first
    }

    /// Records a connection that ended before any request.
    pub fn unserved(&self, why: Unserved) {
        self.unserved[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Connections that ended before any request for `why`, so far.
    pub fn unserved_connections(&self, why: Unserved) -> u64 {
        self.unserved[why as usize].load(Ordering::Relaxed)
    }

    /// Connections ended to make room so far.
    pub fn evicted_connections(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Connections closed at accept so far for `why`.
    pub fn refused_connections(&self, why: ConnRefusal) -> u64 {
        match why {
            ConnRefusal::PerIp => &self.refused_per_ip,
            ConnRefusal::Full => &self.refused_full,
        }
        .load(Ordering::Relaxed)
    }

    /// Requests of `app` answered with `status` so far.
    pub fn requests(&self, app: &str, status: u16) -> u64 {
        let apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
        apps.get(app)
            .and_then(|a| a.by_status.get(&status).copied())
            .unwrap_or(0)
    }

    /// Forgets the apps `keep` says no to (apps a policy edit removed or renamed): their
    /// series would stay for ever beside the renamed app's.
    pub fn retain_apps(&self, keep: impl Fn(&str) -> bool) {
        let mut apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
        apps.retain(|name, _| name == NO_APP || keep(name));
    }

    pub fn render(&self, out: &mut String) {
        let apps = self.apps.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let name = "zonegate_http_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} HTTP requests answered, by app and status code\n# TYPE {name} counter"
        );
        for (app, a) in &apps {
            for (code, n) in &a.by_status {
                let _ = match *code {
                    OTHER_CODE => writeln!(out, "{name}{{app=\"{app}\",code=\"other\"}} {n}"),
                    code => writeln!(out, "{name}{{app=\"{app}\",code=\"{code}\"}} {n}"),
                };
            }
        }
        let unread = self
            .unread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let name = "zonegate_http_unreadable_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} Requests refused before they could be read (malformed or oversized head), by status code\n# TYPE {name} counter"
        );
        for (code, n) in &unread {
            let _ = writeln!(out, "{name}{{code=\"{code}\"}} {n}");
        }
        let name = "zonegate_http_connections_refused_total";
        let _ = writeln!(
            out,
            "# HELP {name} Connections closed as soon as accepted: their client address had its limit open (per_ip), or the front had all it takes (full)\n# TYPE {name} counter\n{name}{{reason=\"per_ip\"}} {}\n{name}{{reason=\"full\"}} {}",
            self.refused_connections(ConnRefusal::PerIp),
            self.refused_connections(ConnRefusal::Full),
        );
        let name = "zonegate_http_connections_unserved_total";
        let _ = writeln!(
            out,
            "# HELP {name} Connections that ended with no request served, or cut in the head of a further one: no whole request head within the head timeout (no_request_head: one begun, also after earlier requests, or none on a new connection), a TLS handshake that failed or timed out\n# TYPE {name} counter"
        );
        for why in Unserved::ALL {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{}\"}} {}",
                why.label(),
                self.unserved_connections(why)
            );
        }
        let name = "zonegate_http_connections_evicted_total";
        let _ = writeln!(
            out,
            "# HELP {name} Connections ended to make room: the front had all it takes open, and their client held the most (this its longest idle)\n# TYPE {name} counter\n{name} {}",
            self.evicted_connections(),
        );
        let name = "zonegate_http_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from request to response headers, by app\n# TYPE {name} histogram"
        );
        for (app, a) in &apps {
            let mut cum = 0;
            for (i, b) in BUCKETS.iter().enumerate() {
                cum += a.buckets[i];
                let _ = writeln!(out, "{name}_bucket{{app=\"{app}\",le=\"{b}\"}} {cum}");
            }
            let _ = writeln!(
                out,
                "{name}_bucket{{app=\"{app}\",le=\"+Inf\"}} {}\n{name}_sum{{app=\"{app}\"}} {}\n{name}_count{{app=\"{app}\"}} {}",
                a.count, a.sum, a.count
            );
        }
    }
}

/// Agent handshakes at the gateway's QUIC endpoint ([`tunnel::admit::HandshakeGate`]): how a
/// flood of connection attempts is being absorbed (Retry, refusals), which otherwise shows
/// only as one log line when it starts and one when it ends.
pub fn render_handshakes(g: &GateStats, out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP zonegate_tunnel_handshakes_in_flight Agent handshakes in progress
# TYPE zonegate_tunnel_handshakes_in_flight gauge
zonegate_tunnel_handshakes_in_flight {}",
        g.in_flight
    );
    let _ = writeln!(
        out,
        "# HELP zonegate_tunnel_handshakes_peak Most agent handshakes in progress at once
# TYPE zonegate_tunnel_handshakes_peak gauge
zonegate_tunnel_handshakes_peak {}",
        g.peak
    );
    let name = "zonegate_tunnel_handshake_attempts_total";
    let _ = writeln!(
        out,
        "# HELP {name} QUIC connection attempts at the tunnel endpoint, by outcome: admitted to a handshake, answered with a Retry (address validation under load), refused (too many in progress)
# TYPE {name} counter"
    );
    for (outcome, n) in [
        ("admitted", g.admitted),
        ("retried", g.retried),
        ("refused", g.refused),
    ] {
        let _ = writeln!(out, "{name}{{outcome=\"{outcome}\"}} {n}");
    }
}

/// The zone DNS's answers since the gateway started (queries are not logged one by one): by
/// transport and answer code, and the UDP answers its rate limiter sent empty (slipped) or
/// not at all (dropped), and TCP connections closed at once at a limit.
pub fn render_dns(c: &name_resolver::DnsCounts, out: &mut String) {
    let name = "zonegate_dns_answers_total";
    let _ = writeln!(
        out,
        "# HELP {name} Zone DNS answers by transport and answer code (rate-limited ones included)
# TYPE {name} counter"
    );
    for (transport, rcode, n) in &c.answers {
        let _ = writeln!(
            out,
            "{name}{{transport=\"{transport}\",rcode=\"{rcode}\"}} {n}"
        );
    }
    let name = "zonegate_dns_rate_limited_total";
    let _ = writeln!(
        out,
        "# HELP {name} Zone DNS answers over UDP over a client network's rate: sent empty with TC (slipped) or not sent (dropped)
# TYPE {name} counter
{name}{{action=\"slipped\"}} {}
{name}{{action=\"dropped\"}} {}",
        c.rate_slipped, c.rate_dropped
    );
    let name = "zonegate_dns_tcp_refused_total";
    let _ = writeln!(
        out,
        "# HELP {name} Zone DNS TCP connections closed at once: their client, its site or the server at its limit
# TYPE {name} counter
{name} {}",
        c.tcp_refused
    );
}

/// The `[[tls]]` pairs: each served certificate's validity, and whether a pair's files fail
/// to load (the certificate before serves on, so nothing else shows it until it ends).
/// Labelled by the `cert` file only: names may change at a renewal, the file does not.
/// Nothing for a self-signed certificate. Alerts: README.md, `/metrics`.
pub fn render_tls(served: &[super::tls::ServedCert], out: &mut String) {
    if served.is_empty() {
        return;
    }
    type Get = fn((i64, i64)) -> i64;
    let validity: [(&str, &str, Get); 2] = [
        (
            "zonegate_tls_certificate_not_before_seconds",
            "Start of validity (Unix time) of the certificate each [[tls]] pair serves",
            |(from, _)| from,
        ),
        (
            "zonegate_tls_certificate_not_after_seconds",
            "End of validity (Unix time) of the certificate each [[tls]] pair serves",
            |(_, until)| until,
        ),
    ];
    for (name, help, get) in validity {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for c in served {
            if let Some(v) = c.valid {
                let _ = writeln!(
                    out,
                    "{name}{{file=\"{}\"}} {}",
                    label_value(&c.file.display().to_string()),
                    get(v)
                );
            }
        }
    }
    let name = "zonegate_tls_pair_failing";
    let _ = writeln!(
        out,
        "# HELP {name} 1 while a [[tls]] pair's files do not load (read again every 5 s; the certificate before serves on, if one loaded), else 0
# TYPE {name} gauge"
    );
    for c in served {
        let _ = writeln!(
            out,
            "{name}{{file=\"{}\"}} {}",
            label_value(&c.file.display().to_string()),
            u8::from(c.failing)
        );
    }
}

/// The ends this gateway knows of besides its HTTPS certificates ([`render_ends`]), Unix
/// seconds.
#[derive(Debug, Clone, Default)]
pub struct ZoneEnds {
    /// This gateway's own device certificate: every tunnel and mesh path through it stops then.
    pub own_certificate: i64,
    /// The zone config in use (`zonegate zone resign` before it).
    pub zone_config: i64,
    /// Each device the zone config lists and does not revoke, with the end of the newest
    /// certificate the zone issued it: connected or not (a device cut off at its end is no
    /// longer in the tunnel's series).
    pub devices: Vec<(String, i64)>,
}

/// The gateway's own certificate's end, the zone config's expiry and every device's
/// certificate's end, as gauges an alert compares with `time()`.
pub fn render_ends(e: &ZoneEnds, out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP zonegate_certificate_not_after_seconds End (Unix time) of this gateway's own device certificate
# TYPE zonegate_certificate_not_after_seconds gauge
zonegate_certificate_not_after_seconds {}
# HELP zonegate_zone_config_expires_seconds Expiry (Unix time) of the zone config in use: re-sign it before (zonegate zone resign)
# TYPE zonegate_zone_config_expires_seconds gauge
zonegate_zone_config_expires_seconds {}",
        e.own_certificate, e.zone_config
    );
    let name = "zonegate_device_certificate_not_after_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} End (Unix time) of the newest certificate the zone config lists for each device it does not revoke, connected or not
# TYPE {name} gauge"
    );
    for (device, end) in &e.devices {
        // Device names are DNS labels: no escaping needed.
        let _ = writeln!(out, "{name}{{device=\"{device}\"}} {end}");
    }
}

/// A label value in the exposition format: backslash, double quote and line feed escaped (a
/// file path may hold any of them).
fn label_value(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for ch in v.chars() {
        match ch {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Tunnel gauges: connected agents, and per device RTT, streams and bytes.
pub fn render_tunnel(agents: &[AgentStatus], health: &str, pool_idle: usize, out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP zonegate_tunnel_agents Node agents connected\n# TYPE zonegate_tunnel_agents gauge\nzonegate_tunnel_agents {}",
        agents.len()
    );
    let _ = writeln!(
        out,
        "# HELP zonegate_zone_health Zone health colour (1 for the current one)\n# TYPE zonegate_zone_health gauge"
    );
    for c in ["green", "yellow", "orange", "red"] {
        let _ = writeln!(
            out,
            "zonegate_zone_health{{colour=\"{c}\"}} {}",
            u8::from(c == health)
        );
    }
    let _ = writeln!(
        out,
        "# HELP zonegate_http_pool_idle Idle upstream HTTP connections kept over tunnel streams\n# TYPE zonegate_http_pool_idle gauge\nzonegate_http_pool_idle {pool_idle}"
    );
    type Get = fn(&AgentStatus) -> f64;
    let per_device: [(&str, &str, &str, Get); 7] = [
        (
            "zonegate_tunnel_rtt_seconds",
            "gauge",
            "Round-trip time to the device",
            |a| a.rtt_ms / 1000.0,
        ),
        (
            "zonegate_tunnel_path_mtu_bytes",
            "gauge",
            "Largest UDP payload the tunnel's packets carry (path MTU discovery)",
            |a| f64::from(a.path_mtu),
        ),
        (
            "zonegate_tunnel_uptime_seconds",
            "gauge",
            "Time the device's tunnel has been up",
            |a| a.uptime_secs as f64,
        ),
        (
            "zonegate_tunnel_streams_total",
            "counter",
            "Streams opened to the device (this session)",
            |a| a.streams as f64,
        ),
        (
            "zonegate_tunnel_bytes_to_device_total",
            "counter",
            "Payload bytes sent to the device (this session)",
            |a| a.bytes_to as f64,
        ),
        (
            "zonegate_tunnel_bytes_from_device_total",
            "counter",
            "Payload bytes received from the device (this session)",
            |a| a.bytes_from as f64,
        ),
        (
            "zonegate_tunnel_certificate_not_after_seconds",
            "gauge",
            "End (Unix time) of the certificate the device connected with: its connection is closed then (the zone's newer one, if issued, is in zonegate_device_certificate_not_after_seconds)",
            |a| a.cert_not_after_unix as f64,
        ),
    ];
    for (name, kind, help, get) in per_device {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for a in agents {
            // Device names are DNS labels: no escaping needed.
            let _ = writeln!(out, "{name}{{device=\"{}\"}} {}", a.device, get(a));
        }
    }
    render_mesh(agents, out);
}

/// Mesh pairs as this gateway sees them (`/status`'s `agents[].mesh`): streams and bytes it
/// relayed, punches it coordinated, and the path it believes each pair takes. A pair that
/// went direct carries nothing through here: the nodes' own `/status` says what it carries.
fn render_mesh(agents: &[AgentStatus], out: &mut String) {
    let pairs = || {
        agents
            .iter()
            .flat_map(|a| a.mesh.iter().map(move |m| (a.device.as_str(), m)))
    };
    let name = "zonegate_mesh_path";
    let _ = writeln!(
        out,
        "# HELP {name} Path a device pair takes as this gateway sees it (1 for the current): relay while it relays their streams, direct after it coordinated punching and relayed nothing since, else idle\n# TYPE {name} gauge"
    );
    for (from, m) in pairs() {
        for path in ["relay", "direct", "idle"] {
            let _ = writeln!(
                out,
                "{name}{{from=\"{from}\",to=\"{}\",path=\"{path}\"}} {}",
                m.to,
                u8::from(m.path == path)
            );
        }
    }
    type Get = fn(&tunnel::status::MeshPairStatus) -> u64;
    let counters: [(&str, &str, Get); 4] = [
        (
            "zonegate_mesh_relayed_streams_total",
            "Mesh streams this gateway relayed from one device to another",
            |m| m.relayed_streams,
        ),
        (
            "zonegate_mesh_relayed_bytes_up_total",
            "Ciphertext bytes relayed from the `from` device to the `to` device (counted as each relayed stream ends)",
            |m| m.relayed_bytes_up,
        ),
        (
            "zonegate_mesh_relayed_bytes_down_total",
            "Ciphertext bytes relayed from the `to` device back to the `from` device (counted as each relayed stream ends)",
            |m| m.relayed_bytes_down,
        ),
        (
            "zonegate_mesh_punches_total",
            "Hole-punching rounds this gateway coordinated for the pair",
            |m| m.punches,
        ),
    ];
    for (name, help, get) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (from, m) in pairs() {
            let _ = writeln!(out, "{name}{{from=\"{from}\",to=\"{}\"}} {}", m.to, get(m));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service answering ever new codes adds at most MAX_CODES series to its app, the rest
    /// under `other`; an app the policy no longer has is dropped, `-` kept.
    #[test]
    fn series_stay_bounded() {
        let m = HttpMetrics::default();
        for code in 100..1000u16 {
            m.observe("web", code, Duration::ZERO);
        }
        m.observe("old", 200, Duration::ZERO);
        m.observe(NO_APP, 404, Duration::ZERO);
        m.retain_apps(|name| name == "web");
        let mut s = String::new();
        m.render(&mut s);
        let series = s
            .lines()
            .filter(|l| l.starts_with("zonegate_http_requests_total{app=\"web\""))
            .count();
        assert_eq!(series, MAX_CODES + 1, "{s}");
        let other = 900 - MAX_CODES;
        assert!(
            s.contains(&format!("{{app=\"web\",code=\"other\"}} {other}\n")),
            "{s}"
        );
        assert!(!s.contains("app=\"old\""), "{s}");
        assert!(s.contains("{app=\"-\",code=\"404\"} 1"), "{s}");
    }

    #[test]
    fn histogram_is_cumulative_and_counts_by_status() {
        let m = HttpMetrics::default();
        m.observe("web", 200, Duration::from_millis(3));
        m.observe("web", 200, Duration::from_millis(30));
        m.observe("web", 502, Duration::from_secs(60));
        m.observe(NO_APP, 404, Duration::ZERO);
        m.refused_unread(400);
        m.refused_unread(400);
        m.refused_unread(431);
        assert_eq!(m.requests("web", 200), 2);
        let mut s = String::new();
        m.render(&mut s);
        assert!(
            s.contains("zonegate_http_unreadable_requests_total{code=\"400\"} 2\n")
                && s.contains("zonegate_http_unreadable_requests_total{code=\"431\"} 1\n"),
            "{s}"
        );
        assert!(
            s.contains("zonegate_http_requests_total{app=\"web\",code=\"200\"} 2\n"),
            "{s}"
        );
        assert!(
            s.contains("zonegate_http_requests_total{app=\"-\",code=\"404\"} 1\n"),
            "{s}"
        );
        assert!(
            s.contains(
                "zonegate_http_request_duration_seconds_bucket{app=\"web\",le=\"0.005\"} 1\n"
            ),
            "{s}"
        );
        assert!(
            s.contains(
                "zonegate_http_request_duration_seconds_bucket{app=\"web\",le=\"0.05\"} 2\n"
            ),
            "{s}"
        );
        assert!(
            s.contains("zonegate_http_request_duration_seconds_bucket{app=\"web\",le=\"10\"} 2\n"),
            "{s}"
        );
        assert!(
            s.contains(
                "zonegate_http_request_duration_seconds_bucket{app=\"web\",le=\"+Inf\"} 3\n"
            ),
            "{s}"
        );
        assert!(
            s.contains("zonegate_http_request_duration_seconds_count{app=\"web\"} 3\n"),
            "{s}"
        );
    }

    #[test]
    fn tunnel_gauges() {
        let mut s = String::new();
        render_tunnel(&[], "red", 0, &mut s);
        assert!(s.contains("zonegate_tunnel_agents 0\n"));
        assert!(s.contains("zonegate_zone_health{colour=\"red\"} 1\n"));
        assert!(s.contains("zonegate_zone_health{colour=\"green\"} 0\n"));
    }

    #[test]
    fn handshake_counters() {
        let mut s = String::new();
        let g = GateStats {
            in_flight: 3,
            peak: 40,
            admitted: 1000,
            retried: 25,
            refused: 7,
        };
        render_handshakes(&g, &mut s);
        for line in [
            "zonegate_tunnel_handshakes_in_flight 3\n",
            "zonegate_tunnel_handshakes_peak 40\n",
            "zonegate_tunnel_handshake_attempts_total{outcome=\"admitted\"} 1000\n",
            "zonegate_tunnel_handshake_attempts_total{outcome=\"retried\"} 25\n",
            "zonegate_tunnel_handshake_attempts_total{outcome=\"refused\"} 7\n",
            "# TYPE zonegate_tunnel_handshake_attempts_total counter\n",
        ] {
            assert!(s.contains(line), "{line} missing in:\n{s}");
        }
    }

    /// Each pair's end and failing flag, its file path escaped as a label value; nothing
    /// for a self-signed certificate.
    #[test]
    fn tls_pairs_are_rendered_with_escaped_labels() {
        use super::super::tls::ServedCert;
        let served = [
            ServedCert {
                file: "/etc/zonegate/tls/a\"b\\c\nd.pem".into(),
                names: vec!["a.example".into(), "www.a.example".into()],
                valid: Some((1_700_000_000, 4_070_908_800)),
                failing: false,
            },
            ServedCert {
                file: "/etc/zonegate/tls/new.pem".into(),
                names: vec![],
                valid: None,
                failing: true,
            },
        ];
        let mut s = String::new();
        render_tls(&served, &mut s);
        let a = r#"file="/etc/zonegate/tls/a\"b\\c\nd.pem""#;
        for line in [
            format!("zonegate_tls_certificate_not_before_seconds{{{a}}} 1700000000\n"),
            format!("zonegate_tls_certificate_not_after_seconds{{{a}}} 4070908800\n"),
            format!("zonegate_tls_pair_failing{{{a}}} 0\n"),
            "zonegate_tls_pair_failing{file=\"/etc/zonegate/tls/new.pem\"} 1\n".to_string(),
        ] {
            assert!(s.contains(&line), "{line} missing in:\n{s}");
        }
        // A pair that never loaded has no validity to show; every line is one sample.
        assert_eq!(
            s.matches("zonegate_tls_certificate_not_after_seconds{")
                .count(),
            1
        );
        assert!(
            s.lines()
                .all(|l| l.starts_with('#') || l.starts_with("zonegate_tls_")),
            "{s}"
        );
        let mut none = String::new();
        render_tls(&[], &mut none);
        assert_eq!(none, "");
    }
}
