//! Evaluation: routing a request to an app and deciding whether a requester may use it.
//!
//! Everything here works on the precompiled tables of [`CompiledPolicy`] and borrows its
//! inputs: no parsing and no allocation per decision (except [`CompiledPolicy::explain_http`]
//! and friends, which build text for people).

use crate::model::*;
use crate::policy::CompiledPolicy;
use crate::units::{normalize_path, path_has_prefix};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// A point in time in whole Unix seconds: time windows have minute resolution, and plain
/// seconds make decisions testable with any injected clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Self {
        std::time::SystemTime::now().into()
    }
}

impl From<std::time::SystemTime> for Timestamp {
    fn from(t: std::time::SystemTime) -> Self {
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Timestamp(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            Err(e) => Timestamp(-i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX)),
        }
    }
}

impl From<time::OffsetDateTime> for Timestamp {
    fn from(t: time::OffsetDateTime) -> Self {
        Timestamp(t.unix_timestamp())
    }
}

/// Who is asking.
#[derive(Debug, Clone, Copy)]
pub enum Requester<'a> {
    /// An internet client, known only by its address.
    Public { ip: IpAddr },
    /// A zone device with a verified certificate. `ip` is its address when it has one that
    /// matters (a device coming through the gateway), for CIDR rules.
    Device {
        name: &'a str,
        roles: &'a [&'a str],
        ip: Option<IpAddr>,
    },
}

impl Requester<'_> {
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Requester::Public { ip } => Some(*ip),
            Requester::Device { ip, .. } => *ip,
        }
    }
}

impl fmt::Display for Requester<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requester::Public { ip } => write!(f, "public client {ip}"),
            Requester::Device { name, roles, ip } => {
                write!(f, "device {name}")?;
                if !roles.is_empty() {
                    write!(f, " (roles: {})", roles.join(", "))?;
                }
                if let Some(ip) = ip {
                    write!(f, " from {ip}")?;
                }
                Ok(())
            }
        }
    }
}

/// Why a request was not allowed. Ordered by how far evaluation got: when several rules
/// refuse, the reason of the rule that came closest is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    /// The app has no `allow` (deny by default), or no mesh app targets the service.
    NoAllowRule,
    NoMeshApp,
    NotInFrom,
    Path,
    Method,
    OutsideHours,
}

impl DenyReason {
    pub const ALL: [DenyReason; 6] = [
        DenyReason::NoAllowRule,
        DenyReason::NoMeshApp,
        DenyReason::NotInFrom,
        DenyReason::Path,
        DenyReason::Method,
        DenyReason::OutsideHours,
    ];

    /// Short stable name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::NoAllowRule => "no_allow_rule",
            DenyReason::NoMeshApp => "no_mesh_app",
            DenyReason::NotInFrom => "not_in_from",
            DenyReason::Method => "method",
            DenyReason::Path => "path",
            DenyReason::OutsideHours => "outside_hours",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DenyReason::NoAllowRule => "the app has no allow rule (deny by default)",
            DenyReason::NoMeshApp => "no mesh app gives access to this service",
            DenyReason::NotInFrom => "the requester is not in any rule's `from`",
            DenyReason::Method => "the method is not allowed",
            DenyReason::Path => "the path is not allowed",
            DenyReason::OutsideHours => "outside the allowed hours or days",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by `app.rules[rule]`.
    Allow {
        rule: usize,
    },
    Deny {
        reason: DenyReason,
    },
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow { rule } => write!(f, "allowed by rule {}", rule + 1),
            Decision::Deny { reason } => write!(f, "denied: {reason}"),
        }
    }
}

/// The outcome of a mesh request: the app that decided (if any targets the service).
#[derive(Debug, Clone, Copy)]
pub struct MeshDecision<'p> {
    pub app: Option<&'p App>,
    pub decision: Decision,
}

fn from_matches(from: &FromSet, who: &Requester<'_>) -> bool {
    if from.public {
        return true;
    }
    if let Requester::Device { name, roles, .. } = who {
        if from.zone
            || from.devices.iter().any(|d| d == name)
            || from.roles.iter().any(|r| roles.contains(&r.as_str()))
        {
            return true;
        }
    }
    // A dual-stack `[::]` listener sees IPv4 clients as `::ffff:a.b.c.d`: an IPv4 network
    // must still match them.
    who.ip()
        .map(|ip| ip.to_canonical())
        .is_some_and(|ip| from.nets.iter().any(|n| n.contains(&ip)))
}

/// Is `ts` inside the window? A window that wraps midnight belongs to the day it starts on:
/// "22:00-02:00" on Friday covers Saturday 01:00.
pub(crate) fn window_allows(w: &TimeWindow, ts: Timestamp) -> bool {
    let local = ts.0.saturating_add(i64::from(w.offset_secs));
    let day = local.div_euclid(86_400);
    let minute = (local.rem_euclid(86_400) / 60) as u16;
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let weekday = (day + 3).rem_euclid(7) as u8;
    let day_ok = |d: u8| w.days & (1 << d) != 0;
    match w.hours {
        None => day_ok(weekday),
        Some(h) if h.start < h.end => (h.start..h.end).contains(&minute) && day_ok(weekday),
        Some(h) if minute >= h.start => day_ok(weekday),
        Some(h) if minute < h.end => day_ok((weekday + 6) % 7),
        Some(_) => false,
    }
}

/// `path` (normal form) as a file system that matches names loosely would look it up: every
/// letter in lowercase, not only ASCII (exFAT, NTFS, APFS ignore case beyond it), and each
/// name without trailing dots and spaces (FAT and Windows drop them: `private.` is
/// `private`) or `;` parameters. Escapes are decoded for it, but for `/` and `\`, which would make new
/// segments. For [`Policy::route_http`]'s guard and the routes' check at an edit: paths
/// still route as written.
#[doc(hidden)]
pub fn fold_name_matching(path: &str) -> String {
    let b = path.as_bytes();
    let mut bytes = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        let escaped = match (b[i], b.get(i + 1), b.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) => hex(h).zip(hex(l)).map(|(h, l)| (h * 16 + l) as u8),
            _ => None,
        };
        match escaped {
            Some(c) if c != b'/' && c != b'\\' => {
                bytes.push(c);
                i += 3;
            }
            _ => {
                bytes.push(b[i]);
                i += 1;
            }
        }
    }
    // Each name without its `;` parameters (Tomcat, Jetty and Spring drop them: `rw.;x` is
    // `rw.`, then `rw`), and without the segments left empty.
    let text = String::from_utf8_lossy(&bytes);
    let names: Vec<String> = text
        .split('/')
        .map(|seg| {
            let name = seg.split(';').next().unwrap_or("");
            name.trim_end_matches(['.', ' ']).to_lowercase()
        })
        .filter(|name| !name.is_empty())
        .collect();
    format!("/{}", names.join("/"))
}

/// Checks one rule; `Err` is the first condition that failed.
pub(crate) fn check_rule(
    rule: &Rule,
    who: &Requester<'_>,
    method: Option<&str>,
    path: Option<&str>,
    now: Timestamp,
) -> Result<(), DenyReason> {
    if !from_matches(&rule.from, who) {
        return Err(DenyReason::NotInFrom);
    }
    // An unknown method or path cannot satisfy a rule that restricts it. The path first: a
    // path no rule covers is refused as such (403), not as a method (a 405 whose `Allow`
    // was empty, sending the user to try a method no rule allows there either).
    if !rule.paths.is_empty() {
        // Compared in normal form, as routing does: `/pub/../private` is `/private`.
        let p = path.and_then(|p| normalize_path(strip_query(p)).ok());
        if !p.is_some_and(|p| rule.paths.iter().any(|x| path_has_prefix(&p, x))) {
            return Err(DenyReason::Path);
        }
    }
    if !rule.methods.is_empty() && !method.is_some_and(|m| rule.methods.iter().any(|x| x == m)) {
        return Err(DenyReason::Method);
    }
    if let Some(w) = &rule.window {
        if !window_allows(w, now) {
            return Err(DenyReason::OutsideHours);
        }
    }
    Ok(())
}

fn strip_query(p: &str) -> &str {
    p.split_once(['?', '#']).map_or(p, |(a, _)| a)
}

/// Longest host name we look up; DNS names are at most 253 characters.
const MAX_HOST: usize = 256;

/// `Host` header → lowercase host without port or trailing dot, in `buf` (no allocation).
/// Only what RFC 3986 makes a host matches anything: a name of letters, digits, `-`, `.`
/// (and `_`, which real names carry) or a bracketed IPv6 address, then at most `:PORT`.
/// Anything else would be routed by a part of it while the service, which gets the `Host` as
/// the client wrote it, builds links from all of it (`[alice.example]@evil.example` used to
/// route to alice.example).
/// Whether `host` (a `Host` header or `:authority`, port included) is one that routing can
/// match at all: when not, the request is malformed (RFC 9112 §3.2: 400), not unrouted.
pub fn is_host(host: &str) -> bool {
    normalize_host(host, &mut [0u8; MAX_HOST]).is_some()
}

fn normalize_host<'b>(host: &str, buf: &'b mut [u8; MAX_HOST]) -> Option<&'b str> {
    // RFC 3986: `port = *DIGIT`, so `host:` is a host too.
    let port_ok = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    let h = if let Some(rest) = host.strip_prefix('[') {
        let (a, after) = rest.split_once(']')?;
        let tail_ok = after.is_empty() || after.strip_prefix(':').is_some_and(port_ok);
        if !tail_ok || a.parse::<std::net::Ipv6Addr>().is_err() {
            return None;
        }
        a
    } else {
        let a = match host.rsplit_once(':') {
            Some((a, port)) if port_ok(port) => a,
            Some(_) => return None,
            None => host,
        };
        if !a
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        {
            return None;
        }
        a
    };
    let h = h.strip_suffix('.').unwrap_or(h);
    let out = buf.get_mut(..h.len())?;
    out.copy_from_slice(h.as_bytes());
    out.make_ascii_lowercase();
    std::str::from_utf8(out).ok()
}

impl CompiledPolicy {
    /// Whether any rule has hours or days: decisions then change with the clock.
    pub fn has_time_windows(&self) -> bool {
        self.apps
            .iter()
            .any(|a| a.rules.iter().any(|r| r.window.is_some()))
    }

    /// All apps, sorted by file then position.
    pub fn apps(&self) -> &[App] {
        &self.apps
    }

    pub fn app(&self, name: &str) -> Option<&App> {
        self.by_name.get(name).map(|&i| &self.apps[i])
    }

    /// The files the policy was compiled from.
    pub fn files(&self) -> &[std::path::PathBuf] {
        &self.files
    }

    /// The http app for a request: host compared case-insensitively without port, then the
    /// longest path prefix (whole segments) of the path in normal form ([`normalize_path`]:
    /// the form the gateway forwards, so the service serves what was routed). A path with no
    /// normal form matches no app.
    ///
    /// Paths compare case-sensitively, but a path that falls under a longer prefix only once
    /// names are compared loosely ([`fold_name_matching`]: case, trailing dots and spaces,
    /// `;` parameters) matches no app: a service that serves paths so (ASP.NET, a share on a
    /// FAT, macOS or Windows disk) would serve `/dfs/RW/x` under `dfs-rw`'s `/dfs/rw`, while
    /// it routed to `dfs` and passed that app's rules.
    pub fn route_http(&self, host: &str, path: &str) -> Option<&App> {
        let mut buf = [0u8; MAX_HOST];
        let host = normalize_host(host, &mut buf)?;
        let path = normalize_path(strip_query(path)).ok()?;
        let routes = self.http.get(host)?;
        let at = routes
            .iter()
            .position(|(prefix, _, _)| path_has_prefix(&path, prefix))?;
        // Longer prefixes first: those before it did not match as written.
        let longer = &routes[..at];
        if !longer.is_empty() {
            let folded = fold_name_matching(&path);
            if longer
                .iter()
                .any(|(_, _, prefix)| path_has_prefix(&folded, prefix))
            {
                return None;
            }
        }
        Some(&self.apps[routes[at].1])
    }

    /// Why [`CompiledPolicy::route_http`] found no app for `host` + `path` (asked only when it
    /// found none: the gateway's log line for a 404 and `policy explain` say it; the client's
    /// 404 does not, as it names apps and paths). "no app serves" alone, beside an app at `/`,
    /// left policy authors guessing.
    pub fn why_no_route(&self, host: &str, path: &str) -> String {
        let mut buf = [0u8; MAX_HOST];
        let Some(h) = normalize_host(host, &mut buf) else {
            return "the host is not a host name".into();
        };
        let normal = match normalize_path(strip_query(path)) {
            Ok(p) => p,
            Err(e) => return format!("{e}, which a service may read otherwise than routing would"),
        };
        let Some(routes) = self.http.get(h) else {
            return format!("no app has host {h}");
        };
        let Some(at) = routes
            .iter()
            .position(|(prefix, _, _)| path_has_prefix(&normal, prefix))
        else {
            let mut prefixes: Vec<&str> = routes.iter().map(|(p, _, _)| p.as_str()).collect();
            prefixes.sort_unstable();
            return format!(
                "no app of host {h} has a path that covers it (theirs: {})",
                prefixes.join(", ")
            );
        };
        let folded = fold_name_matching(&normal);
        match routes[..at]
            .iter()
            .find(|(_, _, prefix)| path_has_prefix(&folded, prefix))
        {
            Some((written, i, _)) => format!(
                "it falls under app `{}`'s path {written} once letter case, trailing dots and spaces or `;` parameters are ignored: refused, so that a service which ignores them cannot serve it under app `{}`'s rules",
                self.apps[*i].name, self.apps[routes[at].1].name
            ),
            None => "it is routed".into(),
        }
    }

    /// The tcp/udp app listening on `addr`; an app bound to a wildcard address also owns the
    /// port on every specific address.
    pub fn app_by_listen(&self, kind: ListenKind, addr: SocketAddr) -> Option<&App> {
        let exact = self.listeners.get(&(kind, addr));
        let any = |ip: IpAddr| {
            self.listeners
                .get(&(kind, SocketAddr::new(ip, addr.port())))
        };
        let v6_any = || any(std::net::Ipv6Addr::UNSPECIFIED.into());
        // `[::]` is bound dual-stack: it owns IPv4 addresses too, unless `0.0.0.0` does.
        let wildcard = || match addr.ip().to_canonical() {
            IpAddr::V4(_) => any(std::net::Ipv4Addr::UNSPECIFIED.into()).or_else(v6_any),
            IpAddr::V6(_) => v6_any(),
        };
        exact.or_else(wildcard).map(|&i| &self.apps[i])
    }

    /// Mesh apps whose `to` is `device/service`.
    pub fn mesh_apps_for_target(
        &self,
        device: &str,
        service: &str,
    ) -> impl Iterator<Item = &App> + '_ {
        self.mesh
            .get(device)
            .and_then(|s| s.get(service))
            .map(|v| v.as_slice())
            .unwrap_or(&[])
            .iter()
            .map(|&i| &self.apps[i])
    }

    /// May `who` use `app`? The first rule that holds allows; otherwise the reason of the rule
    /// that came closest. `method`/`path` are for http apps (`path` is the full request path,
    /// before any `strip_prefix`).
    pub fn decide(
        &self,
        app: &App,
        who: &Requester<'_>,
        method: Option<&str>,
        path: Option<&str>,
        now: Timestamp,
    ) -> Decision {
        decide_app(app, who, method, path, now)
    }

    /// An HTTP request's decision as the front answers it: refused for its method while no
    /// method is allowed on that path now, it is refused for the time (a rule that lets the
    /// path in with other methods is outside its hours: a 405 with an empty `Allow` sent the
    /// user to try methods that fail as well). With the methods allowed there now when it is
    /// refused for its method (a 405's `Allow`: the usual ones and those the rules name).
    pub fn decide_http(
        &self,
        app: &App,
        who: &Requester<'_>,
        method: &str,
        path: &str,
        now: Timestamp,
    ) -> (Decision, Vec<String>) {
        let decision = decide_app(app, who, Some(method), Some(path), now);
        let Decision::Deny {
            reason: DenyReason::Method,
        } = decision
        else {
            return (decision, Vec::new());
        };
        let allow = self.allowed_methods(app, who, path, now);
        match allow.is_empty() {
            true => (
                Decision::Deny {
                    reason: DenyReason::OutsideHours,
                },
                allow,
            ),
            false => (decision, allow),
        }
    }

    /// The methods `who` may use on `path` of `app` now (a 405's `Allow`): of the usual ones
    /// and those the app's rules name (`PROPFIND` for a WebDAV service).
    pub fn allowed_methods(
        &self,
        app: &App,
        who: &Requester<'_>,
        path: &str,
        now: Timestamp,
    ) -> Vec<String> {
        let mut tried: Vec<&str> = USUAL_METHODS.to_vec();
        for m in app.rules.iter().flat_map(|r| r.methods.iter()) {
            if !tried.contains(&m.as_str()) {
                tried.push(m);
            }
        }
        tried
            .into_iter()
            .filter(|m| decide_app(app, who, Some(m), Some(path), now).is_allow())
            .map(str::to_owned)
            .collect()
    }

    /// May device `from` (holding `roles`) open `to_device/to_service` over the mesh? Denied
    /// when no mesh app targets that service.
    pub fn decide_mesh(
        &self,
        from: &str,
        roles: &[&str],
        to_device: &str,
        to_service: &str,
        now: Timestamp,
    ) -> MeshDecision<'_> {
        let who = Requester::Device {
            name: from,
            roles,
            ip: None,
        };
        let mut best: Option<(&App, DenyReason)> = None;
        for app in self.mesh_apps_for_target(to_device, to_service) {
            match decide_app(app, &who, None, None, now) {
                Decision::Allow { rule } => {
                    return MeshDecision {
                        app: Some(app),
                        decision: Decision::Allow { rule },
                    }
                }
                Decision::Deny { reason } => {
                    if best.is_none_or(|(_, r)| reason > r) {
                        best = Some((app, reason));
                    }
                }
            }
        }
        match best {
            Some((app, reason)) => MeshDecision {
                app: Some(app),
                decision: Decision::Deny { reason },
            },
            None => MeshDecision {
                app: None,
                decision: Decision::Deny {
                    reason: DenyReason::NoMeshApp,
                },
            },
        }
    }
}

/// Methods tried when telling a client which ones an app allows (a 405's `Allow`), besides
/// those its rules name.
pub const USUAL_METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

pub(crate) fn decide_app(
    app: &App,
    who: &Requester<'_>,
    method: Option<&str>,
    path: Option<&str>,
    now: Timestamp,
) -> Decision {
    let mut best = DenyReason::NoAllowRule;
    for (i, rule) in app.rules.iter().enumerate() {
        match check_rule(rule, who, method, path, now) {
            Ok(()) => return Decision::Allow { rule: i },
            Err(r) => best = best.max(r),
        }
    }
    Decision::Deny { reason: best }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::Hours;

    fn ts(s: &str) -> Timestamp {
        let t =
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap();
        t.into()
    }

    #[test]
    fn weekday_and_hours() {
        // 2024-06-07 is a Friday.
        let w = TimeWindow {
            hours: Some(Hours {
                start: 15 * 60,
                end: 19 * 60,
            }),
            days: 1 << 4,
            offset_secs: 0,
        };
        assert!(window_allows(&w, ts("2024-06-07T15:00:00Z")));
        assert!(window_allows(&w, ts("2024-06-07T18:59:59Z")));
        assert!(!window_allows(&w, ts("2024-06-07T19:00:00Z")));
        assert!(!window_allows(&w, ts("2024-06-07T14:59:59Z")));
        assert!(!window_allows(&w, ts("2024-06-08T16:00:00Z")), "saturday");
        // The offset moves the window: 15:00 at +02:00 is 13:00 UTC.
        let w2 = TimeWindow {
            offset_secs: 7200,
            ..w
        };
        assert!(window_allows(&w2, ts("2024-06-07T13:00:00Z")));
        assert!(!window_allows(&w2, ts("2024-06-07T18:00:00Z")));
    }

    #[test]
    fn wrapping_window_belongs_to_start_day() {
        let fri = 1 << 4;
        let w = TimeWindow {
            hours: Some(Hours {
                start: 22 * 60,
                end: 2 * 60,
            }),
            days: fri,
            offset_secs: 0,
        };
        assert!(
            window_allows(&w, ts("2024-06-07T23:00:00Z")),
            "friday night"
        );
        assert!(
            window_allows(&w, ts("2024-06-08T01:30:00Z")),
            "saturday early is friday's night"
        );
        assert!(
            !window_allows(&w, ts("2024-06-07T01:30:00Z")),
            "friday early is thursday's night"
        );
        assert!(!window_allows(&w, ts("2024-06-07T12:00:00Z")));
    }

    #[test]
    fn host_normalization() {
        let mut b = [0u8; MAX_HOST];
        assert_eq!(
            normalize_host("Alice.Example:8443", &mut b),
            Some("alice.example")
        );
        assert_eq!(
            normalize_host("alice.example.", &mut b),
            Some("alice.example")
        );
        assert_eq!(normalize_host("[::1]:80", &mut b), Some("::1"));
        assert_eq!(normalize_host("[::1]", &mut b), Some("::1"));
        assert_eq!(
            normalize_host("alice.example:", &mut b),
            Some("alice.example")
        );
        assert_eq!(normalize_host("192.0.2.1:80", &mut b), Some("192.0.2.1"));
        assert_eq!(normalize_host(&"a".repeat(300), &mut b), None);
        // Not a host: nothing routes by a part of it.
        for bad in [
            "[alice.example]@evil.example",
            "[alice.example]",
            "[::1]@evil.example",
            "[::1]:80x",
            "alice.example:80:80",
            "alice.example@evil.example",
            "evil.example/alice.example",
            "alice example",
            "alice.example\\",
        ] {
            assert_eq!(normalize_host(bad, &mut b), None, "{bad}");
        }
    }
}
