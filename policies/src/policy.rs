//! Assembly of checked apps into a [`CompiledPolicy`]: cross-app checks (unique names, routes
//! and listen addresses) and the lookup tables evaluation uses (host → path prefixes, listen
//! address → app, mesh target → apps), so that a decision does no parsing or allocation.

use crate::compile::AppParts;
use crate::error::{PolicyError, Position};
use crate::model::*;
use crate::units::path_has_prefix;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// A checked app with the spans needed for cross-app errors.
pub(crate) struct PendingApp {
    pub name: String,
    pub parts: AppParts,
    pub source: Source,
    /// Where the conflicting parts are, for "also defined at" messages.
    pub listener_pos: Position,
}

/// A compiled, immutable policy: all apps of a directory plus lookup tables.
#[derive(Debug, Default)]
pub struct CompiledPolicy {
    pub(crate) apps: Vec<App>,
    pub(crate) by_name: HashMap<String, usize>,
    /// host → (path prefix, app index, the prefix as loose file systems see it
    /// ([`crate::eval::fold_name_matching`], made once here for the routing guard)), longest
    /// prefix first.
    pub(crate) http: HashMap<String, Vec<(String, usize, String)>>,
    pub(crate) listeners: HashMap<(ListenKind, SocketAddr), usize>,
    /// device → service → mesh apps.
    pub(crate) mesh: HashMap<String, HashMap<String, Vec<usize>>>,
    pub(crate) files: Vec<PathBuf>,
}

pub(crate) fn assemble(
    pending: Vec<PendingApp>,
    files: Vec<PathBuf>,
) -> Result<CompiledPolicy, Vec<PolicyError>> {
    let mut errs = Vec::new();
    let mut policy = CompiledPolicy {
        files,
        ..Default::default()
    };
    let mut http_seen: HashMap<(String, String), usize> = HashMap::new();
    for p in pending {
        let err_at = |msg: String| PolicyError {
            path: p.source.path.clone(),
            position: Some(p.listener_pos),
            message: msg,
            unreadable: false,
        };
        if let Some(&other) = policy.by_name.get(&p.name) {
            errs.push(PolicyError {
                path: p.source.path.clone(),
                position: Some(p.source.position),
                message: format!(
                    "duplicate app `{}`: already defined at {}",
                    p.name, policy.apps[other].source
                ),
                unreadable: false,
            });
            continue;
        }
        let index = policy.apps.len();
        let mut conflict = None;
        match &p.parts.listener {
            Listener::Http(h) => {
                let folded = crate::eval::fold_name_matching(&h.path);
                // Nested once names are folded and not as written (`/dfs/RW` beside `/dfs/rw`,
                // `/a.../b` beside `/a/b/c`): to such a service one holds the other's paths,
                // while routing, which refuses what could reach either, left one unreachable.
                let nested = |a: &str, b: &str| path_has_prefix(a, b) || path_has_prefix(b, a);
                let loosely = policy.http.get(&h.host).and_then(|seen| {
                    seen.iter()
                        .find(|(written, _, f)| nested(&folded, f) && !nested(&h.path, written))
                        .map(|&(_, other, _)| other)
                });
                if let Some(&other) = http_seen.get(&(h.host.clone(), h.path.clone())) {
                    conflict = Some(format!(
                        "http route {}{} is already used by app `{}` at {}",
                        h.host, h.path, policy.apps[other].name, policy.apps[other].source
                    ));
                } else if let Some(other) = loosely {
                    conflict = Some(format!(
                        "http route {}{} and app `{}`'s {} (at {}) differ only by case, trailing dots or spaces, or `;` parameters, where one lies under the other: a service that ignores those would serve one's paths as the other's, and routing refuses what could reach either; give them paths that differ otherwise",
                        h.host,
                        h.path,
                        policy.apps[other].name,
                        match &policy.apps[other].listener {
                            Listener::Http(o) => o.path.as_str(),
                            _ => "",
                        },
                        policy.apps[other].source
                    ));
                }
            }
            Listener::Tcp(a) | Listener::Udp(a) => {
                let kind = if matches!(p.parts.listener, Listener::Tcp(_)) {
                    ListenKind::Tcp
                } else {
                    ListenKind::Udp
                };
                // Same port with equal or wildcard addresses cannot both be bound.
                if let Some((_, &other)) = policy
                    .listeners
                    .iter()
                    .find(|((k, b), _)| *k == kind && crate::units::listens_overlap(*a, *b))
                {
                    conflict = Some(format!(
                        "listen address {a} overlaps app `{}` at {}",
                        policy.apps[other].name, policy.apps[other].source
                    ));
                }
            }
            Listener::Mesh => {}
        }
        if let Some(c) = conflict {
            errs.push(err_at(format!("app `{}`: {c}", p.name)));
            continue;
        }
        match &p.parts.listener {
            Listener::Http(h) => {
                http_seen.insert((h.host.clone(), h.path.clone()), index);
                policy.http.entry(h.host.clone()).or_default().push((
                    h.path.clone(),
                    index,
                    crate::eval::fold_name_matching(&h.path),
                ));
            }
            Listener::Tcp(a) => {
                policy.listeners.insert((ListenKind::Tcp, *a), index);
            }
            Listener::Udp(a) => {
                policy.listeners.insert((ListenKind::Udp, *a), index);
            }
            Listener::Mesh => policy
                .mesh
                .entry(p.parts.target.device.clone())
                .or_default()
                .entry(p.parts.target.service.clone())
                .or_default()
                .push(index),
        }
        policy.by_name.insert(p.name.clone(), index);
        policy.apps.push(App {
            name: p.name,
            index,
            listener: p.parts.listener,
            target: p.parts.target,
            rules: p.parts.rules,
            limits: p.parts.limits,
            proxy_protocol: p.parts.proxy_protocol,
            source: p.source,
        });
    }
    for routes in policy.http.values_mut() {
        routes.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
    }
    errs.extend(unsent_proxy_headers(&policy.apps));
    if errs.is_empty() {
        Ok(policy)
    } else {
        Err(errs)
    }
}

/// A service that an app sends PROXY headers to takes one at the start of every connection
/// (Postfix, nginx, HAProxy configured for it): a client of another app reaching it without
/// one (a tcp app without `proxy_protocol`, an http or mesh app) could send its own header
/// and pass for any address — `127.0.0.1` through an SMTP relay's `mynetworks`. Such apps
/// are refused, at the app without the header.
fn unsent_proxy_headers(apps: &[App]) -> Vec<PolicyError> {
    let mut errs = Vec::new();
    let sends = |a: &App| a.proxy_protocol && matches!(a.listener, Listener::Tcp(_));
    // The first sender to each service (an app without the header is said once).
    let first_senders = apps
        .iter()
        .enumerate()
        .filter(|(i, a)| sends(a) && !apps[..*i].iter().any(|s| sends(s) && s.target == a.target));
    for (_, sender) in first_senders {
        for other in apps
            .iter()
            .filter(|o| o.target == sender.target && !sends(o))
        {
            errs.push(PolicyError {
                path: other.source.path.clone(),
                position: Some(other.source.position),
                message: format!(
                    "app `{}`: reaches {} without a PROXY header, while app `{}` at {} sends one to it: the service reads one at the start of every connection, and a client of `{}` could send its own and pass for any address; give `{}` `proxy_protocol = true` (a tcp app), or point it at another service",
                    other.name, other.target, sender.name, sender.source, other.name, other.name
                ),
                unreadable: false,
            });
        }
    }
    errs
}
