//! `zonegate policy check|explain`: the policy files as the gateway will read them.

use std::net::IpAddr;

use policies::{Requester, Timestamp};

use super::{say, UsageError};
use crate::cli::PolicyCmd;

/// Failure of `policy check`: the errors were printed; exit 1.
#[derive(Debug, thiserror::Error)]
#[error("the policy files have errors, listed above (at most 100 per file, then how many more); the gateway would refuse this policy (and keep the old one while running)")]
pub struct PolicyErrors;

pub fn run(cmd: PolicyCmd) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Check {
            dir,
            gateway_config,
        } => {
            not_a_dir(&dir)?;
            // Read first: a config that is no gateway's is the command's mistake (exit 2).
            let (own, zone_json) = match &gateway_config {
                Some(path) => {
                    let f: crate::config::GatewayFile =
                        crate::config::read(path).map_err(|e| node_config_given(e, path))?;
                    let paths = crate::config::bundle(path, &f.key, &f.cert, &f.ca, &f.zone_config);
                    (
                        Some(super::serve::gateway_own_sockets(path, &f)?),
                        Some(paths.zone_config),
                    )
                }
                None => (None, None),
            };
            for (path, why) in policies::ignored_policy_files(&dir) {
                say!("note: {} is not read: {why}", path.display());
            }
            // Refused by a running gateway that served apps from it (as a save in progress),
            // and of no use otherwise: an error here, so that `policy check && deploy` does
            // not ship an edit the gateway refuses (it said "ok" with a note).
            let empty: Vec<_> = policies::policy_files(&dir)
                .unwrap_or_default()
                .into_iter()
                .filter(|p| std::fs::read_to_string(p).is_ok_and(|t| t.trim().is_empty()))
                .collect();
            for path in &empty {
                say!("{}: is empty: a running gateway that served apps from it keeps them and refuses this edit (a save in progress?); to drop them, delete the file or leave only a comment in it", path.display());
            }
            match policies::check_dir(&dir) {
                Ok(p) => {
                    let clashes = own
                        .map(|own| gateway::listeners::clashes_with(&own, &p))
                        .unwrap_or_default();
                    if !clashes.is_empty() {
                        for c in &clashes {
                            say!("{c}");
                        }
                        return Err(PolicyErrors.into());
                    }
                    // Said, not refused, as the gateway does: zone.json may list them later.
                    if let Some(zone_json) = zone_json {
                        match zone_core::zonedir::read_zone_json(&zone_json) {
                            Ok(z) => {
                                for line in gateway::unlisted::unlisted_devices(&p, &z.config) {
                                    say!("warning: {line}");
                                }
                            }
                            Err(e) => say!(
                                "note: the devices the policy names are not checked against the zone config: {e}"
                            ),
                        }
                    }
                    if !empty.is_empty() {
                        return Err(PolicyErrors.into());
                    }
                    if p.files().is_empty() {
                        say!("note: {} holds no policy file (NAME.toml): a gateway on it serves no app", dir.display());
                    }
                    say!("ok: {} files, {} apps", p.files().len(), p.apps().len());
                    for a in p.apps() {
                        say!("  {:<20} {}", a.name, a.summary());
                        // Deny by default: an app without a rule is written on purpose rarely.
                        if a.rules.is_empty() {
                            say!("  {:<20} note: no `allow` rule: it denies everything", "");
                        }
                    }
                    Ok(())
                }
                Err(errs) => {
                    for e in &errs {
                        say!("{e}");
                    }
                    Err(PolicyErrors.into())
                }
            }
        }
        PolicyCmd::Explain {
            dir,
            from,
            roles,
            host,
            path,
            method,
            to,
            tcp,
            udp,
            at,
        } => {
            not_a_dir(&dir)?;
            let policy = policies::check_dir(&dir).map_err(|errs| {
                let list: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
                anyhow::anyhow!(
                    "policy has errors (run `zonegate policy check`):\n  {}",
                    list.join("\n  ")
                )
            })?;
            let role_refs: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            // A name no device can have would be explained as denied, not told as a typo.
            if let Some(name) = from.strip_prefix("device:") {
                zone_core::DeviceName::new(name)
                    .map_err(|e| UsageError(format!("--from {from}: {e}")))?;
            }
            let now = at.map_or_else(Timestamp::now, Timestamp::from);
            // Rules with hours or days decide by it: said, so that an answer is read for its
            // moment (each rule's `tz` applies to it).
            let moment = time::OffsetDateTime::from_unix_timestamp(now.0)
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_else(|| now.0.to_string());
            say!(
                "at: {moment}{}",
                if at.is_none() {
                    " (now; --at TIME for another moment)"
                } else {
                    ""
                }
            );
            if let Some(to) = to {
                let name = from
                    .strip_prefix("device:")
                    .ok_or_else(|| UsageError("--to (mesh) needs --from device:NAME".into()))?;
                let (d, s) = to
                    .split_once('/')
                    .ok_or_else(|| UsageError("--to must be DEVICE/SERVICE".into()))?;
                let explained = policy.explain_mesh(name, &role_refs, d, s, now);
                say!("{explained}");
                // The gateway reads a device's roles from its certificate; here they are only
                // those given.
                let by_role = policy
                    .apps()
                    .iter()
                    .filter(|a| a.target.device == d && a.target.service == s)
                    .any(|a| a.rules.iter().any(|r| !r.from.roles.is_empty()));
                if role_refs.is_empty() && by_role {
                    say!("note: rules here admit roles, and no --role was given: a device is decided with the roles its certificate holds (`zonegate device list --zone DIR` shows them); give them with --role");
                }
                return verdict(&explained);
            }
            let listen = tcp
                .map(|a| (policies::ListenKind::Tcp, a))
                .or(udp.map(|a| (policies::ListenKind::Udp, a)));
            if let Some((kind, addr)) = listen {
                let ip = from.parse::<IpAddr>().map_err(|_| {
                    UsageError(format!(
                        "--from {from:?}: a tcp or udp app knows its clients by address: give an IP address"
                    ))
                })?;
                let who = Requester::Public { ip };
                let explained = policy.explain_listen(&who, kind, addr, now);
                say!("{explained}");
                return verdict(&explained);
            }
            let (Some(host), Some(path)) = (host, path) else {
                return Err(UsageError(
                    "give --host and --path (HTTP), --tcp or --udp IP:PORT (a tcp or udp app), or --to DEVICE/SERVICE (mesh)".into(),
                )
                .into());
            };
            // As a request's path is written: `dfs/x` was explained as `hostdfs/x`.
            if !path.starts_with('/') {
                return Err(UsageError(format!(
                    "--path {path:?}: a request's path starts with /, as in /{path}"
                ))
                .into());
            }
            let who = match from.strip_prefix("device:") {
                // The front knows its clients by address only (`device:` and `zone` are refused
                // on http apps): an answer for a device would say nothing of what happens.
                Some(_) => {
                    return Err(UsageError(format!(
                        "--from {from}: an http app knows its clients by address: give the IP address the device's requests come from (device:NAME is for mesh apps, with --to DEVICE/SERVICE)"
                    ))
                    .into())
                }
                None if !role_refs.is_empty() => {
                    return Err(UsageError(format!(
                        "--role is for --from device:NAME; a public client ({from}) has no roles"
                    ))
                    .into())
                }
                None => Requester::Public {
                    ip: from.parse::<IpAddr>().map_err(|_| {
                        UsageError(format!("--from {from:?}: an IP address or device:NAME"))
                    })?,
                },
            };
            let method = method.as_deref().unwrap_or("GET");
            // A host the front answers 400 is a mistake here, not a denial (exit 3).
            if !policies::is_host(&host) {
                return Err(UsageError(format!(
                    "--host {host:?}: not a host name (letters, digits, '-', '.', '_', or a bracketed IPv6 address, with an optional :PORT); the front answers a request naming it 400"
                ))
                .into());
            }
            // Rules compare methods exactly, and the front forwards any token: explained, with
            // a word when it is likely a slip (`get`).
            if let Err(e) = policies::units::check_method(method) {
                say!("note: --method {method}: {e}; explained as sent (rules compare methods exactly)");
            }
            let explained = policy.explain_http(&who, &host, Some(method), &path, now);
            say!("{explained}");
            verdict(&explained)
        }
    }
}

/// A `--dir` that is no directory is a mistake in the command (exit 2), for `check` and
/// `explain` alike (`explain` said it as a policy error, exit 1).
fn not_a_dir(dir: &std::path::Path) -> Result<(), UsageError> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(UsageError(format!(
            "{}: not a directory: give the directory of policy files",
            dir.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(UsageError(format!(
            "{}: does not exist: give the directory of policy files (the gateway's `policies`)",
            dir.display()
        ))),
        Err(e) => Err(UsageError(format!("{}: {e}", dir.display()))),
    }
}

/// `policy explain` ended in DENY: exit 3, nothing more said (the explanation said it), so a
/// script can tell ALLOW (0) from DENY (3) from a mistake (1, 2).
#[derive(Debug, thiserror::Error)]
#[error("denied")]
pub struct Denied;

fn verdict(e: &policies::Explanation) -> anyhow::Result<()> {
    match e.allowed {
        true => Ok(()),
        false => Err(Denied.into()),
    }
}

/// `--gateway-config` given a node.toml: said as such (it read "missing field `listen`").
fn node_config_given(
    e: crate::config::ConfigError,
    path: &std::path::Path,
) -> crate::config::ConfigError {
    use crate::config::{read, ConfigError, NodeFile};
    match e {
        ConfigError::Usage(_) if read::<NodeFile>(path).is_ok() => UsageError(format!(
            "--gateway-config {}: this reads as a node agent's config (it has no `listen`, which a gateway's has); policies are enforced by the gateway: give its gateway.toml",
            path.display()
        ))
        .into(),
        e => e,
    }
}
