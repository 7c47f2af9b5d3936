//! `zonegate zone …`: create, show, publish (TXT) and verify a zone config.

use std::path::Path;

use anyhow::Context;
use time::OffsetDateTime;
use zone_core::zonedir::{read_cert_der, read_zone_json, ZoneDir};
use zone_core::{cert, txt, SignedZone};

use super::{check_days, expiry_note, fmt_time, say};
use crate::cli::{VerifyArgs, ZoneCmd};

pub fn run(cmd: ZoneCmd) -> anyhow::Result<()> {
    match cmd {
        ZoneCmd::Init { domain, dir } => {
            let z = ZoneDir::init(&dir, domain, OffsetDateTime::now_utc())?;
            say!("created zone {} in {}", z.domain(), dir.display());
            say!("  zone key   {}  (0600: keep it private and backed up; every device key derives from it)", dir.join("zone.key").display());
            say!("  zone CA    {}", dir.join("zone-ca.crt").display());
            say!("  zone.json  serial {}", z.zone.config.serial);
            say!(
                "next: zonegate device add gw --zone {} --role gateway --public-addr IP:PORT",
                dir.display()
            );
            Ok(())
        }
        ZoneCmd::Show(a) => show(&ZoneDir::open(&a.zone)?),
        ZoneCmd::DumpText(a) => {
            let z = ZoneDir::open(&a.zone)?;
            // Published expired, every node bootstrapping over DNS would refuse it, saying
            // only that DNS refused: said here, where it can be fixed.
            if z.zone.config.expires_at <= OffsetDateTime::now_utc() {
                anyhow::bail!(
                    "zone.json (serial {}) expired at {}: nodes would refuse these records; run `zonegate zone resign --zone {}` first",
                    z.zone.config.serial,
                    fmt_time(z.zone.config.expires_at),
                    a.zone.display()
                );
            }
            // Too large for one DNS answer, the set published elsewhere is answered by no one
            // (the gateway's own DNS serves it without TXT, and says so): said here.
            if let Err(e @ name_resolver::RecordsError::TxtTooLarge { .. }) =
                name_resolver::ZoneRecords::new(&z.zone)
            {
                anyhow::bail!("{e}");
            }
            for s in txt::to_txt(&z.zone) {
                say!("{s}");
            }
            Ok(())
        }
        ZoneCmd::Resign {
            zone,
            valid_days,
            clock_is_right,
        } => {
            check_days("--valid-days", valid_days)?;
            let mut z = ZoneDir::open(&zone.zone)?;
            // Signed as of the later time, a change made once by a clock ahead (a year typed
            // wrong) held every later one there, and refused certificates until that time
            // came: the owner's word that this clock is right is the way back. The serial
            // still grows; devices go by it and the expiry, not the issue time.
            let now = match clock_is_right {
                true => OffsetDateTime::now_utc(),
                false => super::device::signing_time(&z, OffsetDateTime::now_utc())?,
            };
            z.resign(now, valid_days)?;
            say!(
                "re-signed zone.json: serial {}, expires {} ({valid_days} days; later changes to the zone sign for as long, until the next resign). Copy {} into a running gateway's bundle: it adopts it within about a second and passes it on to its nodes",
                z.zone.config.serial,
                fmt_time(z.zone.config.expires_at),
                z.dir.join("zone.json").display()
            );
            Ok(())
        }
        ZoneCmd::Verify(a) => verify(&a),
    }
}

fn show(z: &ZoneDir) -> anyhow::Result<()> {
    let c = &z.zone.config;
    let now = OffsetDateTime::now_utc();
    say!("zone     {}", c.domain);
    say!("key      {}", c.zone_key);
    say!("serial   {}", c.serial);
    say!("signed   {}", fmt_time(c.issued_at));
    say!(
        "expires  {} ({})",
        fmt_time(c.expires_at),
        expiry_note(c.expires_at, now)
    );
    say!("gateways");
    if c.gateways.is_empty() {
        say!("  (none: add one with `zonegate device add NAME --role gateway --public-addr IP:PORT --zone DIR`)");
    }
    for g in &c.gateways {
        let addrs: Vec<String> = g.addrs.iter().map(|a| a.to_string()).collect();
        say!("  {:<16} {}", g.device, addrs.join(", "));
    }
    say!("devices");
    if c.devices.is_empty() {
        say!("  (none)");
    }
    for d in &c.devices {
        let roles: Vec<&str> = d.roles.iter().map(|r| r.as_str()).collect();
        say!(
            "  {:<16} {:<14} cert until {} ({})",
            d.name,
            roles.join(","),
            fmt_time(d.cert_expires_at),
            expiry_note(d.cert_expires_at, now)
        );
    }
    if !c.revoked.is_empty() {
        say!("revoked");
        for r in &c.revoked {
            say!("  {:<16} since {}", r.device, fmt_time(r.revoked_at));
        }
    }
    Ok(())
}

fn read_text_file(path: &Path) -> anyhow::Result<SignedZone> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    // Accept the strings as dig prints them too: quoted, possibly several on one line.
    let strings: Vec<String> = lines
        .iter()
        .flat_map(|l| l.split_whitespace())
        .map(|s| s.trim_matches('"').to_owned())
        .collect();
    txt::from_txt(&strings).with_context(|| format!("{}", path.display()))
}

fn verify(a: &VerifyArgs) -> anyhow::Result<()> {
    let ca = read_cert_der(&a.ca)?;
    let pinned = cert::ca_public_key(&ca).with_context(|| format!("{}", a.ca.display()))?;
    let (zone, from) = match (&a.source.file, &a.source.text, &a.source.dns) {
        (Some(f), _, _) => (read_zone_json(f)?, f.display().to_string()),
        (None, Some(t), _) => (read_text_file(t)?, t.display().to_string()),
        (None, None, Some(domain)) => {
            let server = a.server.expect("clap requires --server with --dns");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            // fetch_zone verifies too; verifying again below keeps one code path for output.
            let z = rt
                .block_on(name_resolver::fetch_zone(
                    domain,
                    server,
                    &pinned,
                    a.known_serial,
                ))
                // Not "refused": the error says what went wrong (a timeout, a bad signature).
                .with_context(|| format!("_zonegate.{domain} from {server}"))?;
            (z, format!("_zonegate.{domain} at {server}"))
        }
        (None, None, None) => unreachable!("clap requires one source"),
    };
    let v = zone
        .verify_newer_than(&pinned, OffsetDateTime::now_utc(), a.known_serial)
        .with_context(|| format!("{from}: refused"))?;
    let c = v.config;
    say!(
        "valid: zone {} serial {}, {} devices, {} gateways, expires {}",
        c.domain,
        c.serial,
        c.devices.len(),
        c.gateways.len(),
        fmt_time(c.expires_at)
    );
    for g in c.gateway_addrs() {
        say!("  gateway {} at {}", g.0, g.1);
    }
    for r in &c.revoked {
        say!("  revoked {} since {}", r.device, fmt_time(r.revoked_at));
    }
    Ok(())
}
