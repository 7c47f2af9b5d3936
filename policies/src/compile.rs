//! Validation of one app's spec (entry point, target, rules, limits) into its compiled parts,
//! collecting every error with the span it is about.

use crate::error::SpanError;
use crate::model::*;
use crate::schema::{AppSpec, LimitsSpec, Per, RuleSpec};
use crate::units;
use ipnet::IpNet;
use serde_spanned::Spanned;
use std::net::SocketAddr;

/// Everything about an app except its index and source; errors are collected, not stopped at.
pub(crate) struct AppParts {
    pub listener: Listener,
    pub target: Target,
    pub rules: Vec<Rule>,
    pub limits: LimitsConfig,
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
    let is_http = matches!(listener, Some(Listener::Http(_)));
    let is_mesh = matches!(listener, Some(Listener::Mesh));
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
            list.into_iter()
                .filter_map(|r| rule(r, is_http, is_mesh, &mut errs))
                .collect()
        }
    };
    let limits = spec
        .limits
        .map(|l| limits(l.into_inner(), is_http, &mut errs))
        .unwrap_or_default();
    match (listener, target) {
        (Some(listener), Some(target)) if errs.is_empty() => Ok(AppParts {
            listener,
            target,
            rules,
            limits,
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
        l.get_ref().parse::<SocketAddr>().ok().or_else(|| {
            errs.push(SpanError::new(
                l.span(),
                format!("invalid listen address {:?}: expected IP:PORT such as \"0.0.0.0:2222\" or \"[::]:2222\"", l.get_ref()),
            ));
            None
        })
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

fn rule(spec: RuleSpec, is_http: bool, is_mesh: bool, errs: &mut Vec<SpanError>) -> Option<Rule> {
    let before = errs.len();
    let mut from = FromSet::default();
    if spec.from.get_ref().is_empty() {
        errs.push(SpanError::new(
            spec.from.span(),
            "empty `from`: expected at least one of public, zone, device:NAME, role:NAME or a CIDR",
        ));
    }
    for entry in spec.from.get_ref() {
        from_entry(entry, is_mesh, &mut from, errs);
    }
    let mut methods = Vec::new();
    for m in spec.methods.iter().flatten() {
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
    for p in spec.paths.iter().flatten() {
        if !is_http {
            errs.push(SpanError::new(
                p.span(),
                "`paths` only applies to http apps",
            ));
            continue;
        }
        match units::parse_path_prefix(p.get_ref()) {
            Ok(p) => paths.push(p),
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

fn from_entry(
    entry: &Spanned<String>,
    is_mesh: bool,
    from: &mut FromSet,
    errs: &mut Vec<SpanError>,
) {
    let s = entry.get_ref().as_str();
    let mut push_err = |m: String| errs.push(SpanError::new(entry.span(), m));
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
                match units::check_label(r, "role") {
                    Ok(()) => from.roles.push(r.to_string()),
                    Err(m) => push_err(m),
                }
            } else if s.contains('/') {
                match s.parse::<IpNet>() {
                    // Store the network address so "10.1.2.3/8" and "10.0.0.0/8" compare equal.
                    Ok(n) => from.nets.push(n.trunc()),
                    Err(_) => push_err(format!(
                        "invalid CIDR {s:?}: expected e.g. \"10.0.0.0/8\" or \"2001:db8::/32\""
                    )),
                }
            } else {
                push_err(format!(
                    "unknown `from` entry {s:?}: expected public, zone, device:NAME, role:NAME or a CIDR such as \"10.0.0.0/8\""
                ))
            }
        }
    }
}

fn limits(spec: LimitsSpec, is_http: bool, errs: &mut Vec<SpanError>) -> LimitsConfig {
    let mut out = LimitsConfig::default();
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
                // Default burst: one second's worth, at least one request.
                let burst = burst.unwrap_or_else(|| {
                    rate.per_second().ceil().clamp(1.0, f64::from(u32::MAX)) as u32
                });
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
