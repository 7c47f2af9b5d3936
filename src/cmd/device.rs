//! `zonegate device …`: add, list, revoke, renew and move devices, print derived public keys.

use std::path::{Path, PathBuf};

use anyhow::Context;
use time::OffsetDateTime;
use zone_core::zonedir::ZoneDir;
use zone_core::DeviceName;

use super::{check_days, expiry_note, fmt_time, say, UsageError};
use crate::cli::DeviceCmd;

fn bundle_dir(zone: &Path, out: Option<PathBuf>, name: &DeviceName) -> PathBuf {
    out.unwrap_or_else(|| zone.join("devices").join(name.as_str()))
}

/// Refuses a bundle directory `out` that holds another zone's or another device's files: a
/// bundle written there replaced that zone's CA and signed zone.json (its revocations with
/// it), or that device's key and certificate.
fn check_out(out: &Path, name: &DeviceName, z: &ZoneDir) -> Result<(), UsageError> {
    use zone_core::zonedir::{DEVICE_CERT_FILE, ZONE_CA_FILE, ZONE_KEY_FILE};
    // Not a directory (yet): nothing of anyone's in it; `prepare_out` says what is wrong.
    if !out.is_dir() {
        return Ok(());
    }
    let at = || format!("bundle directory {}", out.display());
    if out.join(ZONE_KEY_FILE).exists() {
        return Err(UsageError(format!(
            "{}: is a zone directory (zone.key): give a device's bundle directory (by default ZONE/devices/{name})",
            at()
        )));
    }
    // Read as certificates, not compared as text (a copy with CRLF line ends is this zone's).
    let der = |pem: &str| {
        zone_core::cert::parse_pem_certs(pem)
            .ok()
            .and_then(|c| c.into_iter().next())
    };
    let read = |f: &str| match std::fs::read_to_string(out.join(f)) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(UsageError(format!(
            "{}: cannot read its {f} to check whose it is: {e}",
            at()
        ))),
    };
    if let Some(ca) = read(ZONE_CA_FILE)? {
        if der(&ca).is_none_or(|d| Some(d) != der(&z.ca_pem)) {
            return Err(UsageError(format!(
                "{}: holds another zone's bundle (its zone-ca.crt is not this zone's): choose another directory",
                at()
            )));
        }
    }
    if let Some(pem) = read(DEVICE_CERT_FILE)? {
        let id = zone_core::cert::parse_pem_certs(&pem).ok().and_then(|c| {
            c.first()
                .and_then(|d| zone_core::DeviceIdentity::from_der(d).ok())
        });
        if let Some(id) = id.filter(|id| id.name != *name) {
            return Err(UsageError(format!(
                "{}: holds device {}'s bundle: give {name}'s own directory",
                at(),
                id.name
            )));
        }
    }
    Ok(())
}

pub fn run(cmd: DeviceCmd) -> anyhow::Result<()> {
    let now = OffsetDateTime::now_utc();
    match cmd {
        DeviceCmd::Add {
            name,
            zone,
            mut roles,
            public_addrs,
            out,
            days,
        } => {
            check_days("--days", days)?;
            roles.sort();
            roles.dedup();
            let mut z = ZoneDir::open(&zone.zone)?;
            z.clock_not_behind(now)?;
            let out = bundle_dir(&zone.zone, out, &name);
            // Another device's bundle is never written over (its key, its config). (A name the
            // zone has already is refused as such below.)
            let known = z.zone.config.device(&name).is_some() || z.zone.config.is_revoked(&name);
            if !known && out.join("device.key").exists() {
                return Err(UsageError(format!(
                    "bundle directory {}: holds a device's bundle already (device.key): choose another directory",
                    out.display()
                ))
                .into());
            }
            check_out(&out, &name, &z)?;
            let role_file = match roles.contains(&zone_core::Role::Gateway) {
                true => "gateway.toml",
                false => "node.toml",
            };
            let had_config = out.join(role_file).exists();
            // Refuse before touching zone.json, so a bad --out never leaves a half-added device.
            let created = prepare_out(&out)?;
            let (key, cert) = match z.add_device(&name, &roles, &public_addrs, now, days) {
                Ok(kc) => kc,
                Err(e) => {
                    unmake(&out, created);
                    return Err(e.into());
                }
            };
            // The device is in zone.json now: a bundle that fails half way (a full disk, an
            // interrupt) is written again by `renew`, which says so.
            let cfg = z.write_bundle(&out, &name, &key, &cert).with_context(|| {
                unwritten_bundle(&format!("{name} was added to"), &name, &z, &zone.zone, &out)
            })?;
            say!(
                "added {} ({}) to zone {}: serial {}",
                name,
                roles
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                z.domain(),
                z.zone.config.serial
            );
            say!("  public key  {}", key.public_text());
            say!("  certificate until {}", cert_until(&cert, &z));
            say!("  bundle      {}", out.display());
            if had_config {
                // Kept, as `renew` keeps it: said, and a config of another device warned of
                // (a reused directory: the start would refuse the certificate as another's).
                say!(
                    "  {} was there already and is kept as it is (this device's template: {}.new)",
                    cfg.display(),
                    cfg.display()
                );
                if let Some(other) = config_device(&cfg).filter(|d| *d != name.as_str()) {
                    say!("warning: {} is the config of device {other:?}: use {}.new for {name} (move it over), or set `device = \"{name}\"` in it", cfg.display(), cfg.display());
                }
            }
            say!(
                "run it there with: zonegate {} --config {}",
                if cfg.ends_with("gateway.toml") {
                    "gateway"
                } else {
                    "node"
                },
                cfg.display()
            );
            if let Some(note) = zone_core::zonedir::mixed_ports_note(&public_addrs) {
                say!("note: {note}");
            }
            let others = z.zone.config.devices.len() > 1;
            if roles.contains(&zone_core::Role::Gateway) && others {
                // Nothing passes this one on: nodes dial only the gateways their zone.json
                // lists, and gateways dial no one.
                say!("note: the other devices' bundles hold an older zone.json, without {name}: copy {} into a running gateway's bundle (it adopts it and passes it on to its nodes, which then dial {name} too), or into each node's bundle while no gateway runs; nothing passes it on before", zone.zone.join("zone.json").display());
            } else if others && !z.zone.config.gateways.is_empty() {
                say!("note: other bundles hold an older zone.json; copy {} to them (or let agents pass it on: this device offers it to its gateways as it connects)", zone.zone.join("zone.json").display());
            }
            Ok(())
        }
        DeviceCmd::List(a) => {
            let z = ZoneDir::open(&a.zone)?;
            let c = &z.zone.config;
            for d in &c.devices {
                let roles: Vec<&str> = d.roles.iter().map(|r| r.as_str()).collect();
                say!(
                    "{:<16} {:<14} {}  cert until {} ({})",
                    d.name,
                    roles.join(","),
                    d.public_key,
                    fmt_time(d.cert_expires_at),
                    expiry_note(d.cert_expires_at, now)
                );
            }
            for r in &c.revoked {
                say!("{:<16} REVOKED since {}", r.device, fmt_time(r.revoked_at));
            }
            Ok(())
        }
        DeviceCmd::Revoke { name, zone, force } => {
            let mut z = ZoneDir::open(&zone.zone)?;
            let now = signing_time(&z, now)?;
            let gateways = &z.zone.config.gateways;
            let was_gateway = gateways.iter().any(|g| g.device == name);
            let last_gateway = was_gateway && gateways.len() == 1;
            if last_gateway && !force {
                // Agents drop a revoked gateway's link: with none left they have nowhere to
                // connect, and no gateway carries them a newer zone.json either.
                return Err(UsageError(format!(
                    "{name} is the zone's only gateway: revoked, every node loses its way in and nothing brings them a newer zone.json. Add the new gateway first (`zonegate device add NAME --role gateway --public-addr IP:PORT --zone DIR`), copy zone.json into {name}'s bundle so that it passes the new gateway on to the nodes, then revoke {name}; or pass --force and copy zone.json into every node's bundle by hand"
                ))
                .into());
            }
            let listed = z.zone.config.device(&name).is_some() || z.zone.config.is_revoked(&name);
            if !listed && !force {
                // Exit 1, as for any device the zone does not hold (`renew`, `move`).
                anyhow::bail!(
                    "device \"{name}\" is not in this zone (see `zonegate device list`). To revoke a name this directory does not list (a device added in a newer copy of the zone), pass --force: its certificates are then refused by name"
                );
            }
            let revoked = if listed {
                z.revoke(&name, now)?
            } else {
                let r = z.revoke_unlisted(&name, now)?;
                // Said, since --force also lets the last gateway go: a typo of a name burns
                // that name for good, and the device meant stays.
                if r {
                    say!("note: {name} is not a device this directory lists (see `zonegate device list`): it is now revoked by name, for good. If you meant another device, revoke that one too.");
                }
                r
            };
            if !revoked {
                say!(
                    "{name} was revoked already: nothing changed (zone.json serial {})",
                    z.zone.config.serial
                );
                return Ok(());
            }
            let file = zone.zone.join("zone.json");
            let serial = z.zone.config.serial;
            let size = z.zone.to_json_compact().len();
            if size > zone_core::config::MAX_SHARED_ZONE_JSON {
                say!("note: zone.json is now {size} bytes, past the {} a zone keeps to for DNS answers: the gateways' DNS may publish no zone config until it shrinks (their log says so; nodes starting with --bootstrap-dns then need zone.json in their bundle); devices pass it on as usual. Revoke devices no longer used: that takes their entries out.", zone_core::config::MAX_SHARED_ZONE_JSON);
            }
            if last_gateway {
                say!("revoked {name}, the zone's only gateway: zone.json serial {serial}. Add a new gateway (`zonegate device add NAME --role gateway --public-addr IP:PORT --zone DIR`) and copy {} into every node's bundle: no gateway passes it on to them.", file.display());
            } else if was_gateway {
                say!("revoked {name}: zone.json serial {serial}. Copy {} into another gateway's bundle (not {name}'s): it adopts it within about a second and passes it to every agent linked to it, which drop their link to {name}. An agent dials only the gateways its zone.json lists: one whose config predates the other gateways (they were added after it last got one) knows only {name} and is stranded once {name} stops; copy the new zone.json into its bundle too.", file.display());
            } else {
                say!("revoked {name}: zone.json serial {serial}. Copy {} into each gateway's bundle: a running gateway adopts it within about a second, disconnects {name} and passes the new config to every agent (its DNS serves it too).", file.display());
            }
            Ok(())
        }
        DeviceCmd::Move {
            name,
            zone,
            public_addrs,
        } => {
            let mut z = ZoneDir::open(&zone.zone)?;
            let now = signing_time(&z, now)?;
            z.move_gateway(&name, &public_addrs, now)?;
            // As saved (IPv4-mapped ones as IPv4, each once), not as typed: the notes below
            // are about what agents will dial.
            let public_addrs: Vec<std::net::SocketAddr> = z
                .zone
                .config
                .gateways
                .iter()
                .find(|g| g.device == name)
                .map(|g| g.addrs.clone())
                .unwrap_or(public_addrs);
            let addrs: Vec<String> = public_addrs.iter().map(|a| a.to_string()).collect();
            say!(
                "moved {name} to {}: zone.json serial {}.",
                addrs.join(", "),
                z.zone.config.serial
            );
            say!("Copy {} into {name}'s bundle while it still runs at its old address: it adopts it within about a second and passes it to every agent (its DNS answers with the new address too). Then stop it there and start the same bundle at the new address: agents stay on the old address while it answers and dial the new one when it goes.", zone.zone.join("zone.json").display());
            if public_addrs.iter().any(|a| a.is_ipv6()) {
                say!("The new addresses include IPv6: set `listen = \"[::]:PORT\"` in its gateway.toml (IPv4 and IPv6 on one socket) if it says 0.0.0.0.");
            }
            say!("If the QUIC port changed, set that port in `listen` in its gateway.toml before starting it.");
            if let Some(note) = zone_core::zonedir::mixed_ports_note(&public_addrs) {
                say!("note: {note}");
            }
            Ok(())
        }
        DeviceCmd::Renew {
            name,
            zone,
            out,
            days,
        } => {
            check_days("--days", days)?;
            let mut z = ZoneDir::open(&zone.zone)?;
            z.clock_not_behind(now)?;
            let out = bundle_dir(&zone.zone, out, &name);
            check_out(&out, &name, &z)?;
            // A device.key there must be this device's (the same key, derived again): one of
            // another device whose certificate is missing got past `check_out`.
            let key_file = out.join("device.key");
            if key_file.exists() {
                // Unreadable is no answer to "whose is it": refused too.
                let pem =
                    zeroize::Zeroizing::new(std::fs::read_to_string(&key_file).map_err(|e| {
                        UsageError(format!(
                            "{}: cannot read it to check whose it is: {e}",
                            key_file.display()
                        ))
                    })?);
                let ours = z.key.derive_device(z.domain(), &name).public_text();
                let theirs = zone_core::DeviceKey::from_pem(&pem).map(|k| k.public_text());
                if theirs.as_ref().ok() != Some(&ours) {
                    return Err(UsageError(format!(
                        "bundle directory {}: its device.key is not {name}'s: choose {name}'s bundle directory, or an empty one",
                        out.display()
                    ))
                    .into());
                }
            }
            let created = prepare_out(&out)?;
            let role_file = match z.zone.config.device(&name) {
                Some(d) if d.roles.contains(&zone_core::Role::Gateway) => "gateway.toml",
                _ => "node.toml",
            };
            let had_config = out.join(role_file).exists();
            let (key, cert) = match z.renew(&name, now, days) {
                Ok(kc) => kc,
                Err(e) => {
                    unmake(&out, created);
                    return Err(e.into());
                }
            };
            let cfg = z.write_bundle(&out, &name, &key, &cert).with_context(|| {
                unwritten_bundle(
                    &format!("{name}'s certificate was renewed in"),
                    &name,
                    &z,
                    &zone.zone,
                    &out,
                )
            })?;
            say!(
                "renewed {name}: certificate until {}, bundle {}",
                cert_until(&cert, &z),
                out.display()
            );
            if had_config {
                say!(
                    "{} was kept as it is (a fresh template, if wanted: {}.new).",
                    cfg.display(),
                    cfg.display()
                );
            }
            // A running device takes the files within seconds (its bundle is watched).
            // Never "copy the bundle": a device set up already has its own config (services,
            // TLS) and its zone-revoked.txt there, which a fresh template would replace.
            say!("Copy device.crt and zone.json into {name}'s bundle: a running zonegate there takes them within seconds (no restart).");
            if created {
                say!(
                    "({} also holds device.key, zone-ca.crt and a fresh {role_file} template: copy those only to a device set up anew.)",
                    out.display()
                );
            }
            Ok(())
        }
        DeviceCmd::Pubkey { name, zone } => {
            let z = ZoneDir::open(&zone.zone)?;
            // Any name has a key: a misspelt one printed a key that matches nothing, unsaid.
            // On stderr, so that stdout stays the key alone for scripts.
            if z.zone.config.device(&name).is_none() {
                use std::io::Write as _;
                let note = match z.zone.config.is_revoked(&name) {
                    true => format!("note: {name} is revoked: this is the key it had (it cannot be added again)"),
                    false => format!(
                        "note: {name} is not a device of this zone (zone.json serial {} does not list it): this is the key it would have once added",
                        z.zone.config.serial
                    ),
                };
                let _ = writeln!(std::io::stderr(), "{note}");
            }
            say!("{}", z.key.derive_device(z.domain(), &name).public_text());
            Ok(())
        }
    }
}

/// A change to zone.json was saved (`done`, e.g. "home1 was added to") but the bundle at
/// `out` was not written whole: what happened and the `renew` that writes it once fixed.
fn unwritten_bundle(done: &str, name: &DeviceName, z: &ZoneDir, zone: &Path, out: &Path) -> String {
    format!(
        "{done} zone.json (serial {}), but its bundle {} was not written whole: once fixed, write it with `zonegate device renew {name} --zone {} --out {}`",
        z.zone.config.serial,
        out.display(),
        zone.display(),
        out.display()
    )
}

/// The bundle directory `--out` names, made (if need be) and tried for writing before
/// zone.json changes: a bad `--out` must never leave a change made and its bundle unwritten.
/// Whether it was made now.
fn prepare_out(out: &std::path::Path) -> Result<bool, UsageError> {
    if out.exists() && !out.is_dir() {
        return Err(UsageError(format!(
            "--out {}: exists and is not a directory",
            out.display()
        )));
    }
    let created = !out.exists();
    // One that anybody may write, or another user's: they could swap the bundle's files (its
    // zone.json, its CA) between this write and its install, and the device would join their
    // zone. (Group-writable is left alone: with a user's own group, the usual umask 002.)
    if !created {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(out)
            .map_err(|e| UsageError(format!("--out {}: {e}", out.display())))?;
        let mode = meta.permissions().mode();
        let me = rustix::process::geteuid();
        // Root may write into a directory its service user owns (/etc/zonegate/node); one
        // another user made where anybody may make one (/tmp/bundle) is refused below.
        let theirs = meta.uid() != me.as_raw() && !me.is_root();
        if mode & 0o002 != 0 || theirs {
            return Err(UsageError(format!(
                "--out {}: {} and could replace the bundle's files before it is installed; give a directory of your own that only you may write (`chmod 700`), or a new one",
                out.display(),
                if theirs { "another user owns this directory".to_owned() } else { format!("anybody may write this directory (mode {:o})", mode & 0o777) },
            )));
        }
    }
    // Nor one on a way through a directory another user made where anybody may make one
    // (/tmp/theirs/bundle, existing or to be made): they could rename it away and put their
    // own in its place. Root may write into its service user's (/etc/zonegate/node), which
    // lies under no such directory.
    let open_way = || {
        let (dir, owner) = another_users_below_open(out)?;
        let why = match owner {
            Some(uid) => format!("belongs to another user (uid {uid})"),
            None => "may be renamed by anybody (no sticky bit)".to_owned(),
        };
        Some(UsageError(format!(
            "--out {}: {} lies in a directory anybody may write and {why}, so the bundle's files could be replaced before it is installed; give a directory of your own that only you may write (`chmod 700`), or a new one outside it",
            out.display(),
            dir.display(),
        )))
    };
    if let Some(e) = open_way() {
        return Err(e);
    }
    let mut dirs = std::fs::DirBuilder::new();
    std::os::unix::fs::DirBuilderExt::mode(&mut dirs, zone_core::zonedir::BUNDLE_DIR_MODE);
    // A new one is made itself (its parents as need be), never found made: one another user
    // made between the look above and here would have passed unchecked.
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
    let made = match (created, parent) {
        (false, _) => Ok(()),
        (true, Some(parent)) => dirs
            .recursive(true)
            .create(parent)
            .and_then(|()| dirs.recursive(false).create(out)),
        (true, None) => dirs.create(out),
    };
    made.and_then(|()| tempfile::tempfile_in(out).map(drop))
        .map_err(|e| {
            UsageError(format!(
                "--out {}: cannot write a bundle there: {e}",
                out.display()
            ))
        })?;
    // Its parents may have been found made (another user's, made between the look and the
    // making): looked at again now that the way is there.
    if let Some(e) = open_way() {
        unmake(out, created);
        return Err(e);
    }
    Ok(created)
}

/// The first entry on the way to `out` (as written, symbolic links not followed, and as it
/// resolves) that a user other than root and this one owns, below a directory anybody may
/// write (/tmp), or any entry in such a directory without the sticky bit (anybody may rename
/// it), with that other user; `None` when there is none. Entries not made yet end the way.
fn another_users_below_open(out: &std::path::Path) -> Option<(std::path::PathBuf, Option<u32>)> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let me = rustix::process::geteuid().as_raw();
    let absolute = std::path::absolute(out).ok()?;
    let walk = |path: &std::path::Path, follow: bool| {
        // The directory above: anybody may write it, and whether it is sticky (then only an
        // entry's owner may rename it: /tmp).
        let mut open_above: Option<bool> = None;
        let mut at = std::path::PathBuf::new();
        for part in path.components() {
            at.push(part);
            let meta = match follow {
                true => std::fs::metadata(&at),
                false => std::fs::symlink_metadata(&at),
            };
            let Ok(meta) = meta else {
                // To be made in a directory anybody may write and rename in.
                return (open_above == Some(false)).then_some((at, None));
            };
            let theirs = meta.uid() != 0 && meta.uid() != me;
            match open_above {
                Some(false) => return Some((at, None)),
                Some(true) if theirs => return Some((at, Some(meta.uid()))),
                _ => {}
            }
            // A symbolic link's own mode says nothing (0777): what it names is looked at by
            // the resolved walk.
            let mode = meta.permissions().mode();
            let open = !meta.is_symlink() && mode & 0o002 != 0;
            open_above = open.then_some(mode & 0o1000 != 0);
        }
        None
    };
    // Resolved, with the part still to be made: where the files will land (a link of the
    // user's own to a directory anybody may write and rename in passed as written).
    let existing = absolute.ancestors().find(|a| a.exists())?;
    let rest = absolute.strip_prefix(existing).ok()?;
    let resolved = std::fs::canonicalize(existing).ok()?.join(rest);
    walk(&absolute, false).or_else(|| walk(&resolved, true))
}

/// Takes back a bundle directory [`prepare_out`] made for a change the zone then refused
/// (only if still empty).
fn unmake(out: &std::path::Path, created: bool) {
    if created {
        let _ = std::fs::remove_dir(out);
    }
}

/// [`ZoneDir::signing_time`], saying so when this machine's clock is more than a day behind
/// the zone's last change (the change still goes through: it issues no certificate).
pub(crate) fn signing_time(z: &ZoneDir, now: OffsetDateTime) -> anyhow::Result<OffsetDateTime> {
    if z.clock_not_behind(now).is_err() {
        say!(
            "note: this machine's clock reads {}, more than a day before the zone's last change ({}): signed as of that change. Set the clock right (NTP) if it is wrong; if it is right, the last change was signed by a clock ahead.",
            fmt_time(now),
            fmt_time(z.zone.config.issued_at)
        );
    }
    Ok(z.signing_time(now))
}

/// When `cert` ends, said as the zone CA's end when that cut it short: it looked like the
/// days asked for had been taken, and a renewal then made no longer one.
fn cert_until(cert: &zone_core::cert::DeviceCert, z: &zone_core::zonedir::ZoneDir) -> String {
    let until = fmt_time(cert.not_after);
    match z.ca_not_after() {
        Some(end) if end == cert.not_after => format!(
            "{until} (cut short to the end of the zone's CA certificate, zone-ca.crt: no device certificate outlasts it)"
        ),
        _ => until,
    }
}

/// The `device =` a gateway.toml or node.toml at `path` names, if it can be read.
fn config_device(path: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let table: toml::Table = toml::from_str(&text).ok()?;
    table.get("device")?.as_str().map(str::to_owned)
}
