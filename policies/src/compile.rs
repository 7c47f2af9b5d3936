//! Validation of one app's spec (entry point, target, rules, limits) into its compiled parts,
//! collecting every error with the span it is about.

use crate::error::SpanError;
use crate::model::*;
use crate::schema::{AppSpec, LimitsSpec, Per, RuleSpec};
use crate::units;
use ipnet::IpNet;
use serde_spanned::Spanned;
use std::net::SocketAddr;
use std::time::Duration;

/// Longest a rate limit's burst may take to refill at its rate: the limiter holds it in
/// nanoseconds in 64 bits (584 years).
const MAX_BURST_REFILL: Duration = Duration::from_secs(200 * 366 * 24 * 3600);

/// Everything about an app except its index and source; errors are collected, not stopped at.
pub(crate) struct AppParts {
    pub listener: Listener,
    pub target: Target,
    pub rules: Vec<Rule>,
    pub limits: LimitsConfig,
    pub proxy_protocol: bool,
}

pub(crate) fn compile_app(
    spec: AppSpec,
    table_span: std::ops::Range<usize>,
) -> Result<AppParts, Vec<SpanError>> {
    let mut errs = Vec::new();
    let mut kinds: Vec<(&str, std::ops::Range<usize>)> = Vec::new();
    if let Some(h) = &spec.http {
        kinds.push(("http", h.span()));
    }
    if let Some(t) = &spec.tcp {
        kinds.push(("tcp", t.span()));
    }
    if let Some(u) = &spec.udp {
        kinds.push(("udp", u.span()));
    }
    if let Some(m) = &spec.mesh {
        if *m.get_ref() {
            kinds.push(("mesh", m.span()));
        } else {
            errs.push(SpanError::new(
                m.span(),
                "`mesh = false` means nothing; remove it or use `mesh = true`",
            ));
        }
    }
    let listener = match kinds.len() {
        0 => {
            errs.push(SpanError::new(
                table_span,
                "no entry point: expected exactly one of `http`, `tcp`, `udp` or `mesh = true`",
            ));
            None
        }
        1 => listener(&spec, &mut errs),
        _ => {
            let names: Vec<&str> = kinds.iter().map(|k| k.0).collect();
            errs.push(SpanError::new(
                kinds[1].1.clone(),
                format!(
                    "{} entry points ({}): expected exactly one",
                    names.len(),
                    names.join(", ")
                ),
            ));
            None
        }
    };
    let target = target(&spec.to, &mut errs);
    let kind = kinds.first().map(|k| k.0);
    // The header goes ahead of a connection's bytes; a udp app's datagrams each would need
    // one, which few services read.
    if let Some(p) = spec
        .udp
        .as_ref()
        .and_then(|u| u.get_ref().proxy_protocol.as_ref())
    {
        errs.push(SpanError::new(
            p.span(),
            "`proxy_protocol` is for tcp apps: a udp service learns nothing from it (the client's address is in the gateway's flow log lines)",
        ));
    }
    let proxy_protocol = spec
        .tcp
        .as_ref()
        .and_then(|t| t.get_ref().proxy_protocol.as_ref())
        .is_some_and(|p| *p.get_ref());
    let is_mesh = kind == Some("mesh");
    let app_path = match &listener {
        Some(Listener::Http(h)) => Some(h.path.clone()),
        _ => None,
    };
    let rules = match spec.allow {
        None => Vec::new(),
        Some(allow) => {
            let span = allow.span();
            let list = allow.into_inner().0;
            if list.is_empty() {
                errs.push(SpanError::new(
                    span,
                    "empty `allow` list: leave `allow` out to deny everything",
                ));
            }
            let listen = match &listener {
                Some(Listener::Tcp(a) | Listener::Udp(a)) => Some(*a),
                _ => None,
            };
            list.into_iter()
                .filter_map(|r| rule(r, (kind, listen), app_path.as_deref(), &mut errs))
                .collect()
        }
    };
    let limits = match spec.limits {
        // Streams between devices may go direct, past the gateway: limits it could keep only
        // on relayed streams would promise what they do not hold.
        Some(l) if is_mesh => {
            errs.push(SpanError::new(
                l.span(),
                "mesh apps take no `limits`: device-to-device streams may go direct, where the gateway does not see them; limit the service on its own device instead",
            ));
            LimitsConfig::default()
        }
        Some(l) => limits(l.into_inner(), kind, &mut errs),
        None => LimitsConfig::default(),
    };
    match (listener, target) {
        (Some(listener), Some(target)) if errs.is_empty() => Ok(AppParts {
            listener,
            target,
            rules,
            limits,
            proxy_protocol,
        }),
        _ => Err(errs),
    }
}

fn listener(spec: &AppSpec, errs: &mut Vec<SpanError>) -> Option<Listener> {
    if let Some(h) = &spec.http {
        let h = h.get_ref();
        let host = units::parse_host(h.host.get_ref())
            .map_err(|m| errs.push(SpanError::new(h.host.span(), m)));
        let path = match &h.path {
            Some(p) => units::parse_path_prefix(p.get_ref())
                .map_err(|m| errs.push(SpanError::new(p.span(), m))),
            None => Ok("/".to_string()),
        };
        return Some(Listener::Http(HttpRoute {
            host: host.ok()?,
            path: path.ok()?,
            strip_prefix: h.strip_prefix,
        }));
    }
    let parse_addr = |l: &Spanned<String>, errs: &mut Vec<SpanError>| {
        let Ok(addr) = l.get_ref().parse::<SocketAddr>() else {
            errs.push(SpanError::new(
                l.span(),
                format!("invalid listen address {:?}: expected IP:PORT such as \"0.0.0.0:2222\" or \"[::]:2222\"", l.get_ref()),
            ));
            return None;
        };
        // Port 0 binds whatever port the kernel picks: a public app on a port nobody chose,
        // which `explain` and `/status` could not name. On loopback (nobody outside reaches
        // it; in-process tests read the bound port back) it stays allowed.
        if addr.port() == 0 && !addr.ip().is_loopback() {
            errs.push(SpanError::new(
                l.span(),
                format!("listen address {:?} has port 0, which would listen on a port the system picks at random: give the app's port, such as \"{}\"", l.get_ref(), SocketAddr::new(addr.ip(), 2222)),
            ));
            return None;
        }
        // An IPv4-mapped address is the IPv4 one in disguise (a dual-stack socket bound to it
        // takes IPv4 only): taken as that, so the overlap checks against other apps and the
        // gateway's own sockets see it. As written it passed them and then failed to bind
        // (or bound nothing where bindv6only is set). Any other address stays as written,
        // with its scope.
        Some(zone_core::zonedir::unmapped(addr))
    };
    if let Some(t) = &spec.tcp {
        return parse_addr(&t.get_ref().listen, errs).map(Listener::Tcp);
    }
    if let Some(u) = &spec.udp {
        return parse_addr(&u.get_ref().listen, errs).map(Listener::Udp);
    }
    Some(Listener::Mesh)
}

fn target(to: &Spanned<String>, errs: &mut Vec<SpanError>) -> Option<Target> {
    let Some((device, service)) = to.get_ref().split_once('/') else {
        errs.push(SpanError::new(
            to.span(),
            format!(
                "invalid `to` {:?}: expected \"DEVICE/SERVICE\" such as \"home1/dfs\"",
                to.get_ref()
            ),
        ));
        return None;
    };
    let checks = [
        units::check_label(device, "device"),
        units::check_label(service, "service"),
    ];
    let mut ok = true;
    for c in checks {
        if let Err(m) = c {
            errs.push(SpanError::new(to.span(), m));
            ok = false;
        }
    }
    ok.then(|| Target {
        device: device.to_string(),
        service: service.to_string(),
    })
}

/// One allow rule of an app whose entry point is `kind` ("http", "tcp", "udp", "mesh"; `None`
/// when it had none or several, already an error), listening on `listen` (tcp, udp), and
/// whose http route is under `app_path`.
fn rule(
    spec: RuleSpec,
    (kind, listen): (Option<&str>, Option<SocketAddr>),
    app_path: Option<&str>,
    errs: &mut Vec<SpanError>,
) -> Option<Rule> {
    let is_http = kind == Some("http");
    let before = errs.len();
    let mut from = FromSet::default();
    if spec.from.get_ref().is_empty() {
        let expected = match kind {
            Some("mesh") => "zone, device:NAME or role:NAME",
            Some(_) => "public or a CIDR such as \"10.0.0.0/8\"",
            None => "public, zone, device:NAME, role:NAME or a CIDR",
        };
        errs.push(SpanError::new(
            spec.from.span(),
            format!("empty `from`: expected at least one of {expected}"),
        ));
    }
    for entry in spec.from.get_ref() {
        from_entry(entry, kind, &mut from, errs);
    }
    // A rule whose networks are all of the other family than a tcp/udp app's address takes
    // can never match: refused, naming `[::]`. One with a network of each family still
    // matches some clients and is kept (as it was before this check: refusing it now would
    // keep a gateway that served it from starting).
    if let (Some(listen), false) = (listen, from.public || from.nets.is_empty()) {
        let unreachable: Vec<String> = from
            .nets
            .iter()
            .filter_map(|n| family_unreachable(n, listen))
            .collect();
        if unreachable.len() == from.nets.len() {
            errs.push(SpanError::new(
                spec.from.span(),
                format!("`from` can never match: every network {}", unreachable[0]),
            ));
        }
    }
    // An empty list would read as no condition, so every method or path: an edit that removed
    // the last entry to close the rule opened it instead.
    for (list, what) in [(&spec.methods, "methods"), (&spec.paths, "paths")] {
        if let Some(l) = list.as_ref().filter(|l| l.get_ref().is_empty()) {
            errs.push(SpanError::new(
                l.span(),
                format!("empty `{what}`: leave it out to allow every {}, or remove the rule to allow none", &what[..what.len() - 1]),
            ));
        }
    }
    let mut methods = Vec::new();
    for m in spec.methods.iter().flat_map(|l| l.get_ref()) {
        if !is_http {
            errs.push(SpanError::new(
                m.span(),
                "`methods` only applies to http apps",
            ));
        } else if let Err(e) = units::check_method(m.get_ref()) {
            errs.push(SpanError::new(m.span(), e));
        } else {
            methods.push(m.get_ref().clone());
        }
    }
    let mut paths = Vec::new();
    for p in spec.paths.iter().flat_map(|l| l.get_ref()) {
        if !is_http {
            errs.push(SpanError::new(
                p.span(),
                "`paths` only applies to http apps",
            ));
            continue;
        }
        match units::parse_path_prefix(p.get_ref()) {
            // A rule's paths are whole request paths (before any `strip_prefix`): one outside
            // the app's own path would never match.
            Ok(path) => match app_path.filter(|a| !units::path_has_prefix(&path, a)) {
                Some(a) => errs.push(SpanError::new(
                    p.span(),
                    format!(
                        "`{path}` is outside this app's path `{a}`: `paths` are whole request paths; did you mean `{}{path}`?",
                        a.trim_end_matches('/')
                    ),
                )),
                None => paths.push(path),
            },
            Err(e) => errs.push(SpanError::new(p.span(), e)),
        }
    }
    let hours = spec.hours.as_ref().and_then(|h| {
        units::parse_hours(h.get_ref())
            .map_err(|m| errs.push(SpanError::new(h.span(), m)))
            .ok()
    });
    let offset_secs = match &spec.tz {
        Some(tz) => {
            if spec.hours.is_none() && spec.days.is_none() {
                errs.push(SpanError::new(
                    tz.span(),
                    "`tz` without `hours` or `days` has no effect",
                ));
            }
            units::parse_tz(tz.get_ref())
                .map_err(|m| errs.push(SpanError::new(tz.span(), m)))
                .unwrap_or(0)
        }
        None => 0,
    };
    let days = match &spec.days {
        Some(d) if d.get_ref().is_empty() => {
            errs.push(SpanError::new(
                d.span(),
                "empty `days`: leave it out for every day",
            ));
            ALL_DAYS
        }
        Some(d) => d
            .get_ref()
            .iter()
            .fold(0u8, |acc, day| acc | (1 << day.index())),
        None => ALL_DAYS,
    };
    let window = (spec.hours.is_some() || spec.days.is_some()).then_some(TimeWindow {
        hours,
        days,
        offset_secs,
    });
    (errs.len() == before).then_some(Rule {
        from,
        methods,
        paths,
        window,
    })
}

/// One `from` entry of a rule of a `kind` app. Gateway-facing apps (http, tcp, udp) know their
/// clients only by address, mesh apps only by device: an entry of the other sort could never
/// match, so it is refused rather than kept to mislead.
fn from_entry(
    entry: &Spanned<String>,
    kind: Option<&str>,
    from: &mut FromSet,
    errs: &mut Vec<SpanError>,
) {
    let s = entry.get_ref().as_str();
    let is_mesh = kind == Some("mesh");
    let mut push_err = |m: String| errs.push(SpanError::new(entry.span(), m));
    let by_device = s == "zone" || s.starts_with("device:") || s.starts_with("role:");
    if let (Some(kind), true) = (kind.filter(|_| !is_mesh), by_device) {
        return push_err(format!(
            "`{s}` cannot match on a {kind} app: the gateway knows its clients by address only; allow `public` or CIDRs here, and reach the service from devices with a mesh app"
        ));
    }
    match s {
        "public" if is_mesh => {
            push_err("`public` cannot reach a mesh app: only zone devices use the mesh".into())
        }
        "public" => from.public = true,
        "zone" => from.zone = true,
        _ => {
            if let Some(d) = s.strip_prefix("device:") {
                match units::check_label(d, "device") {
                    Ok(()) => from.devices.push(d.to_string()),
                    Err(m) => push_err(m),
                }
            } else if let Some(r) = s.strip_prefix("role:") {
                // Only the roles a device can hold: another name would never match.
                match r.parse::<zone_core::Role>() {
                    Ok(role) => from.roles.push(role.as_str().to_string()),
                    Err(_) => push_err(format!(
                        "unknown role {r:?} in `{s}`: a device's role is one of {}",
                        zone_core::Role::ALL
                            .map(|r| format!("role:{}", r.as_str()))
                            .join(", ")
                    )),
                }
            } else if s.contains('/') {
                if is_mesh {
                    return push_err(format!(
                        "CIDR {s:?} cannot match on a mesh app: devices are known by name there; use zone, device:NAME or role:NAME"
                    ));
                }
                match cidr(s) {
                    Ok(n) => from.nets.push(n),
                    Err(m) => push_err(m),
                }
            } else if let Ok(ip) = s.parse::<std::net::IpAddr>() {
                let bits = if ip.is_ipv4() { 32 } else { 128 };
                push_err(format!(
                    "`from` entry {s:?} is an address: write it as a network of one, \"{s}/{bits}\""
                ))
            } else if is_mesh {
                push_err(format!(
                    "unknown `from` entry {s:?}: a mesh app takes zone, device:NAME or role:NAME"
                ))
            } else if kind.is_some() {
                // An http, tcp or udp app: the entries by device would be refused next.
                push_err(format!(
                    "unknown `from` entry {s:?}: expected public or a CIDR such as \"10.0.0.0/8\""
                ))
            } else {
                push_err(format!(
                    "unknown `from` entry {s:?}: expected public, zone, device:NAME, role:NAME or a CIDR such as \"10.0.0.0/8\""
                ))
            }
        }
    }
}

/// Why clients of `net` can never reach a socket bound to `listen`, if they cannot: an IPv4
/// address (`0.0.0.0` included) takes IPv4 only, a specific IPv6 one IPv6 only; `[::]` takes
/// both (the gateway binds it dual-stack).
fn family_unreachable(net: &IpNet, listen: SocketAddr) -> Option<String> {
    let port = listen.port();
    match (net, listen.ip()) {
        (IpNet::V6(_), std::net::IpAddr::V4(_)) => Some(format!(
            "is IPv6, but the app listens on IPv4 {listen} only: listen on \"[::]:{port}\" for IPv4 and IPv6 clients"
        )),
        (IpNet::V4(_), std::net::IpAddr::V6(ip)) if !ip.is_unspecified() => Some(format!(
            "is IPv4, but the app listens on IPv6 {listen} only: listen on \"[::]:{port}\" for IPv4 and IPv6 clients"
        )),
        _ => None,
    }
}

/// A CIDR as written: a network address (no host bits: "192.168.1.10/24" is more likely one
/// host meant than the whole /24), IPv4-mapped IPv6 networks as the IPv4 ones they are (client
/// addresses are compared as IPv4).
fn cidr(s: &str) -> Result<IpNet, String> {
    let net: IpNet = s.parse().map_err(|_| {
        format!("invalid CIDR {s:?}: expected e.g. \"10.0.0.0/8\" or \"2001:db8::/32\"")
    })?;
    if net != net.trunc() {
        let one = IpNet::from(net.addr());
        return Err(format!(
            "CIDR {s:?} has host bits set: write \"{}\" for the network or \"{one}\" for the one address",
            net.trunc()
        ));
    }
    if let IpNet::V6(v6) = net {
        if let (Some(v4), true) = (v6.addr().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            let v4 = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_err(|e| e.to_string())?;
            return Ok(IpNet::V4(v4));
        }
    }
    Ok(net)
}

/// The limits of a gateway-facing app (`kind` "http", "tcp" or "udp").
fn limits(spec: LimitsSpec, kind: Option<&str>, errs: &mut Vec<SpanError>) -> LimitsConfig {
    let is_http = kind == Some("http");
    let mut out = LimitsConfig::default();
    // A udp app's flows are rate-limited as they start and their datagrams held to its
    // bandwidth (dropped past it, as a router would); their number is gateway.toml's.
    if kind == Some("udp") {
        let spans = [
            (
                "max_connections",
                spec.max_connections.as_ref().map(|v| v.span()),
            ),
            (
                "max_connections_per_client",
                spec.max_connections_per_client.as_ref().map(|v| v.span()),
            ),
        ];
        for (name, span) in spans {
            if let Some(span) = span {
                errs.push(SpanError::new(
                    span,
                    format!("`{name}` does not apply to udp apps: their limits are `rate` (new flows per client) and `bandwidth` (`udp_flows_per_ip` in gateway.toml caps flows per address)"),
                ));
            }
        }
    }
    if let Some(p) = spec.per.as_ref().filter(|p| *p.get_ref() == Per::Device) {
        errs.push(SpanError::new(
            p.span(),
            "`per = \"device\"` needs clients known as devices, which only mesh apps have (and they take no limits): use \"client-ip\" or \"app\"",
        ));
    }
    let size = |v: &Option<Spanned<String>>, bw: bool, errs: &mut Vec<SpanError>| {
        v.as_ref().and_then(|s| {
            let r = if bw {
                units::parse_bandwidth(s.get_ref())
            } else {
                units::parse_size(s.get_ref())
            };
            r.map_err(|m| errs.push(SpanError::new(s.span(), m))).ok()
        })
    };
    out.bandwidth = size(&spec.bandwidth, true, errs);
    out.bandwidth_per_connection = size(&spec.bandwidth_per_connection, true, errs);
    if let Some(b) = &spec.max_body {
        if !is_http {
            errs.push(SpanError::new(
                b.span(),
                "`max_body` only applies to http apps",
            ));
        }
    }
    out.max_body = size(&spec.max_body, false, errs);
    let positive = |v: &Option<Spanned<u32>>, name: &str, errs: &mut Vec<SpanError>| {
        v.as_ref().and_then(|n| {
            if *n.get_ref() == 0 {
                errs.push(SpanError::new(
                    n.span(),
                    format!("`{name}` must be at least 1"),
                ));
                None
            } else {
                Some(*n.get_ref())
            }
        })
    };
    out.max_connections = positive(&spec.max_connections, "max_connections", errs);
    out.max_connections_per_client = positive(
        &spec.max_connections_per_client,
        "max_connections_per_client",
        errs,
    );
    let burst = positive(&spec.burst, "burst", errs);
    match &spec.rate {
        Some(r) => match units::parse_rate(r.get_ref()) {
            Ok(rate) => {
                // Default burst: one period's worth, what `10/min` reads as (ten in a minute,
                // at once if need be). It was one second's worth, at least one: `10/min` let
                // a client one connection per 6 s, and an `ssh` then `scp` was refused.
                let burst = burst.unwrap_or(rate.count.max(1));
                // The limiter holds `burst` × the interval between requests in nanoseconds:
                // past 584 years it overflowed (a panic in debug builds, a wrong burst in
                // release ones).
                let interval = rate.period.as_nanos() / u128::from(rate.count.max(1));
                let most =
                    (MAX_BURST_REFILL.as_nanos() / interval.max(1)).min(u128::from(u32::MAX));
                if u128::from(burst) > most {
                    let span = spec.burst.as_ref().map_or(r.span(), |b| b.span());
                    errs.push(SpanError::new(
                        span,
                        format!("`burst` = {burst} at `rate` = {:?} takes more than 200 years to refill: give at most {most}, or a faster rate", r.get_ref()),
                    ));
                }
                let per = spec.per.as_ref().map_or(Per::ClientIp, |p| *p.get_ref());
                out.rate = Some(RateLimit { rate, burst, per });
            }
            Err(m) => errs.push(SpanError::new(r.span(), m)),
        },
        None => {
            for (name, span) in [
                ("burst", spec.burst.as_ref().map(|b| b.span())),
                ("per", spec.per.as_ref().map(|p| p.span())),
            ] {
                if let Some(span) = span {
                    errs.push(SpanError::new(span, format!("`{name}` needs a `rate`")));
                }
            }
        }
    }
    out
}
