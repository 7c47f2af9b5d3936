//! The `zonegate zone …` and `zonegate device …` commands, run as a user runs them.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::common::*;

/// The serial of the zone directory `z`'s zone.json.
/// A second zone, `bob.example`, made in `dir/other-zone`: its directory.
fn other_zone(dir: &std::path::Path) -> std::path::PathBuf {
    let other = dir.join("other-zone");
    ok([
        "zone",
        "init",
        "--domain",
        "bob.example",
        "--dir",
        other.to_str().unwrap(),
    ]);
    other
}

fn zone_serial(z: &std::path::Path) -> u64 {
    let bytes = std::fs::read(z.join("zone.json")).unwrap();
    zone_core::config::SignedZone::from_json(&bytes)
        .unwrap()
        .config
        .serial
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_add_bundle_and_show() {
    let t = tempfile::tempdir().unwrap();
    let z = zone_with_devices(t.path());
    assert_eq!(mode(&z.join("zone.key")), 0o600);
    let b = z.join("devices/home1");
    for f in [
        "device.key",
        "device.crt",
        "zone-ca.crt",
        "zone.json",
        "node.toml",
    ] {
        assert!(b.join(f).exists(), "bundle lacks {f}");
    }
    assert_eq!(mode(&b.join("device.key")), 0o600);
    let node = std::fs::read_to_string(b.join("node.toml")).unwrap();
    assert!(node.contains("device = \"home1\""), "{node}");
    assert!(node.contains("gw at 203.0.113.10:4433"), "{node}");
    let gw = std::fs::read_to_string(z.join("devices/gw/gateway.toml")).unwrap();
    assert!(gw.contains("listen = \"0.0.0.0:4433\""), "{gw}");
    // Both bundle configs are valid TOML.
    toml::from_str::<toml::Table>(&node).unwrap();
    toml::from_str::<toml::Table>(&gw).unwrap();

    let show = ok(["zone", "show", "--zone", z.to_str().unwrap()]);
    let serial = zone_serial(&z);
    assert!(show.contains(&format!("serial   {serial}")), "{show}");
    // Serials carry the clock (`next_serial`): a change outranks anything issued before it,
    // even from a zone directory restored from an older backup.
    let unix_now = time::OffsetDateTime::now_utc().unix_timestamp() as u64;
    assert!(
        serial + 3600 > unix_now && serial <= unix_now + 1,
        "{serial}"
    );
    assert!(show.contains("home1") && show.contains("gateway"), "{show}");
    let list = ok(["device", "list", "--zone", z.to_str().unwrap()]);
    assert_eq!(list.lines().count(), 2, "{list}");
}

/// `device move` says the addresses as saved: an IPv4-mapped one as IPv4 (no note about an
/// IPv6 listen for an IPv4-only gateway), one given twice once.
#[test]
fn device_move_says_the_addresses_as_saved() {
    let t = tempfile::tempdir().unwrap();
    let z = zone_with_devices(t.path());
    let zs = z.to_str().unwrap();
    let mapped = "[::ffff:198.51.100.8]:4433";
    let out = ok([
        "device",
        "move",
        "gw",
        "--zone",
        zs,
        "--public-addr",
        mapped,
        "--public-addr",
        mapped,
    ]);
    assert!(
        out.contains("moved gw to 198.51.100.8:4433: zone.json"),
        "{out}"
    );
    assert!(!out.contains("IPv6"), "{out}");
}

/// A zone whose last change was signed by a clock ahead (a year typed wrong once): with the
/// clock right again, `device revoke` still goes through, signed as of that change (it was
/// refused until that time came: a stolen laptop could not be revoked); `device add`, which
/// issues a certificate from this clock, is refused with what to do.
#[test]
fn a_clock_ahead_once_does_not_block_revocations() {
    let t = tempfile::tempdir().unwrap();
    let z = zone_with_devices(t.path());
    let zs = z.to_str().unwrap();
    let ahead = time::OffsetDateTime::now_utc() + time::Duration::days(400);
    let mut zd = zone_core::zonedir::ZoneDir::open(&z).unwrap();
    zd.resign(ahead, 365).unwrap();
    let before = zone_serial(&z);

    let out = ok(["device", "revoke", "home1", "--zone", zs]);
    assert!(
        out.contains("more than a day before the zone's last change")
            && out.contains("revoked home1"),
        "{out}"
    );
    let zone = zone_core::zonedir::read_zone_json(&z.join("zone.json")).unwrap();
    assert!(zone.config.serial > before);
    assert!(zone
        .config
        .is_revoked(&zone_core::DeviceName::new("home1").unwrap()));
    assert!(
        zone.config.issued_at >= zd.zone.config.issued_at,
        "signed as of the clock behind"
    );
    ok(["zone", "resign", "--zone", zs]);

    let e = fails(2, ["device", "add", "nas", "--zone", zs, "--role", "node"]);
    // The command as it can be run (--zone was left out of it).
    assert!(
        e.contains(&format!(
            "`zonegate zone resign --zone {zs} --clock-is-right`"
        )),
        "{e}"
    );
    // The owner's word that this clock is right brings the zone back to now.
    let before = zone_serial(&z);
    let said = ok(["zone", "resign", "--zone", zs, "--clock-is-right"]);
    // Where the new zone.json goes, as `device add` and `revoke` say.
    assert!(
        said.contains("Copy ") && said.contains("into a running gateway's bundle"),
        "{said}"
    );
    let zone = zone_core::zonedir::read_zone_json(&z.join("zone.json")).unwrap();
    assert!(zone.config.serial > before);
    assert!(zone.config.issued_at < time::OffsetDateTime::now_utc() + time::Duration::days(1));
    ok(["device", "add", "nas", "--zone", zs, "--role", "node"]);
}

/// `device move` gives a gateway new addresses (serial + 1, same key and certificate) and
/// refuses what it cannot do without touching zone.json.
#[test]
fn device_move_readdresses_a_gateway_and_refuses_the_rest() {
    let t = tempfile::tempdir().unwrap();
    let z = zone_with_devices(t.path());
    let zs = z.to_str().unwrap();
    let cert = std::fs::read(z.join("devices/gw/device.crt")).unwrap();
    let before = zone_serial(&z);
    let out = ok([
        "device",
        "move",
        "gw",
        "--zone",
        zs,
        "--public-addr",
        "198.51.100.7:4433",
        "--public-addr",
        "[2001:db8::7]:4433",
    ]);
    assert!(
        out.contains("moved gw to 198.51.100.7:4433, [2001:db8::7]:4433"),
        "{out}"
    );
    let json = std::fs::read_to_string(z.join("zone.json")).unwrap();
    assert!(
        json.contains("198.51.100.7:4433") && !json.contains("203.0.113.10"),
        "{json}"
    );
    let show = ok(["zone", "show", "--zone", zs]);
    assert!(zone_serial(&z) > before);
    assert!(
        show.contains(&format!("serial   {}", zone_serial(&z))),
        "{show}"
    );
    assert_eq!(
        cert,
        std::fs::read(z.join("devices/gw/device.crt")).unwrap()
    );
    ok([
        "zone",
        "verify",
        "--file",
        &format!("{zs}/zone.json"),
        "--ca",
        &format!("{zs}/zone-ca.crt"),
    ]);
    // --server goes with --dns only (with --file it was accepted and ignored).
    let e = fails(
        2,
        [
            "zone",
            "verify",
            "--file",
            &format!("{zs}/zone.json"),
            "--ca",
            &format!("{zs}/zone-ca.crt"),
            "--server",
            "127.0.0.1:53",
        ],
    );
    assert!(e.contains("--server"), "{e}");
    ok([
        "device",
        "add",
        "gw2",
        "--zone",
        zs,
        "--role",
        "gateway",
        "--public-addr",
        "198.51.100.9:4433",
    ]);

    let before = std::fs::read(z.join("zone.json")).unwrap();
    // Another gateway's address, however written, is refused to a new one as to a move.
    let e = fails(
        2,
        [
            "device",
            "add",
            "gw3",
            "--zone",
            zs,
            "--role",
            "gateway",
            "--public-addr",
            "[::ffff:198.51.100.9]:4433",
        ],
    );
    assert!(e.contains("gateway gw2's already"), "{e}");
    // A usage error (2) where the command line asks for what cannot be; 1 for a name the zone
    // lacks, as `device revoke` does.
    for (code, args, says) in [
        (
            2,
            vec!["home1", "--public-addr", "198.51.100.8:4433"],
            "not a gateway",
        ),
        (
            1,
            vec!["ghost", "--public-addr", "198.51.100.8:4433"],
            "not in this zone",
        ),
        (
            2,
            vec![
                "gw",
                "--public-addr",
                "198.51.100.7:4433",
                "--public-addr",
                "[2001:db8::7]:4433",
            ],
            "nothing to change",
        ),
        // The same addresses, one written IPv4-mapped.
        (
            2,
            vec![
                "gw",
                "--public-addr",
                "[::ffff:198.51.100.7]:4433",
                "--public-addr",
                "[2001:db8::7]:4433",
            ],
            "nothing to change",
        ),
        (
            2,
            vec!["gw", "--public-addr", "198.51.100.9:4433"],
            "gateway gw2's already",
        ),
    ] {
        let e = fails(
            code,
            ["device", "move"]
                .into_iter()
                .chain(args)
                .chain(["--zone", zs]),
        );
        assert!(e.contains(says), "{e}");
    }
    let e = fails(2, ["device", "move", "gw", "--zone", zs]);
    assert!(e.contains("--public-addr"), "{e}");
    let e = fails(
        2,
        [
            "device",
            "move",
            "gw",
            "--zone",
            zs,
            "--public-addr",
            "nowhere",
        ],
    );
    assert!(e.contains("nowhere"), "{e}");
    assert_eq!(before, std::fs::read(z.join("zone.json")).unwrap());
}

#[test]
fn pubkey_is_derived_and_stable() {
    let t = tempfile::tempdir().unwrap();
    let z = zone_with_devices(t.path());
    let zs = z.to_str().unwrap();
    let a = ok(["device", "pubkey", "home1", "--zone", zs]);
    let b = ok(["device", "pubkey", "home1", "--zone", zs]);
    assert_eq!(a, b);
    assert!(a.starts_with("ed25519:"));
    // It is the key in the bundle's zone.json entry, and for a name not added yet it writes nothing.
    let json = std::fs::read_to_string(z.join("zone.json")).unwrap();
    assert!(json.contains(a.trim()));
    let before = std::fs::read(z.join("zone.json")).unwrap();
    let laptop = zg(["device", "pubkey", "laptop", "--zone", zs]);
    assert!(laptop.status.success());
    assert_eq!(before, std::fs::read(z.join("zone.json")).unwrap());
    // Said on stderr (a misspelt name printed a key that matches nothing); stdout is the key.
    let e = String::from_utf8_lossy(&laptop.stderr);
    assert!(e.contains("laptop is not a device of this zone"), "{e}");
    assert!(stdout(&laptop).trim().starts_with("ed25519:"));
    let home1 = zg(["device", "pubkey", "home1", "--zone", zs]);
    assert!(home1.stderr.is_empty(), "{home1:?}");
    // Renew keeps the key.
    ok(["device", "renew", "home1", "--zone", zs]);
    assert_eq!(a, ok(["device", "pubkey", "home1", "--zone", zs]));
}

#[test]
fn openssl_verifies_own_zone_only() {
    if Command::new("openssl").arg("version").output().is_err() {
        crate::common::skip(
            "openssl_verifies_own_zone_only",
            "needs openssl: apt-get install openssl",
        );
        return;
    }
    let t1 = tempfile::tempdir().unwrap();
    let t2 = tempfile::tempdir().unwrap();
    let z1 = zone_with_devices(t1.path());
    let z2 = zone_with_devices(t2.path());
    let verify = |ca: &std::path::Path, crt: &std::path::Path| {
        Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(ca)
            .arg(crt)
            .output()
            .unwrap()
            .status
            .success()
    };
    let crt = z1.join("devices/home1/device.crt");
    assert!(verify(&z1.join("zone-ca.crt"), &crt));
    assert!(!verify(&z2.join("zone-ca.crt"), &crt));
    // The zone CA vouches for names under its domain only (its devices are, above).
    let ca = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(z1.join("zone-ca.crt"))
        .output()
        .unwrap();
    let ca = String::from_utf8_lossy(&ca.stdout);
    assert!(
        ca.contains("X509v3 Name Constraints") && ca.contains("DNS:alice.example"),
        "{ca}"
    );
}

#[test]
fn txt_round_trip_and_verify() {
    let t = tempfile::tempdir().unwrap();
    let z = zone_with_devices(t.path());
    let zs = z.to_str().unwrap();
    let ca = z.join("zone-ca.crt");
    let text = ok(["zone", "dump-text", "--zone", zs]);
    assert!(text.lines().count() > 1);
    for l in text.lines() {
        assert!(
            l.len() <= 255 && l.starts_with(zone_core::txt::PREFIX),
            "{l}"
        );
    }
    let f = t.path().join("txt");
    // Reversed order still verifies: chunks carry their index.
    let reversed: Vec<&str> = text.lines().rev().collect();
    std::fs::write(&f, reversed.join("\n")).unwrap();
    let out = ok([
        "zone",
        "verify",
        "--text",
        f.to_str().unwrap(),
        "--ca",
        ca.to_str().unwrap(),
    ]);
    assert!(
        out.contains(&format!("serial {}", zone_serial(&z))),
        "{out}"
    );
    // Truncated: one chunk missing.
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(&f, lines[..lines.len() - 1].join("\n")).unwrap();
    let e = fails(
        1,
        [
            "zone",
            "verify",
            "--text",
            f.to_str().unwrap(),
            "--ca",
            ca.to_str().unwrap(),
        ],
    );
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn verify_refuses_tampered_foreign_stale_and_reports_revoked() {
    let t = tempfile::tempdir().unwrap();
    let z = zone_with_devices(t.path());
    let zs = z.to_str().unwrap();
    let ca = z.join("zone-ca.crt");
    let cas = ca.to_str().unwrap();
    let zj = z.join("zone.json");
    ok(["device", "revoke", "home1", "--zone", zs]);
    let out = ok([
        "zone",
        "verify",
        "--file",
        zj.to_str().unwrap(),
        "--ca",
        cas,
    ]);
    assert!(out.contains("revoked home1"), "{out}");
    assert!(
        out.contains(&format!("serial {}", zone_serial(&z))),
        "{out}"
    );

    let e = fails(
        1,
        [
            "zone",
            "verify",
            "--file",
            zj.to_str().unwrap(),
            "--ca",
            cas,
            "--known-serial",
            &(zone_serial(&z) + 2).to_string(),
        ],
    );
    assert!(e.contains("older"), "{e}");

    let json = std::fs::read_to_string(&zj).unwrap();
    let bad = t.path().join("tampered.json");
    std::fs::write(&bad, json.replace("203.0.113.10", "203.0.113.66")).unwrap();
    let e = fails(
        1,
        [
            "zone",
            "verify",
            "--file",
            bad.to_str().unwrap(),
            "--ca",
            cas,
        ],
    );
    assert!(e.contains("signature"), "{e}");

    std::fs::write(&bad, &json[..json.len() / 2]).unwrap();
    let e = fails(
        1,
        [
            "zone",
            "verify",
            "--file",
            bad.to_str().unwrap(),
            "--ca",
            cas,
        ],
    );
    assert!(e.contains("not a valid zone.json"), "{e}");

    let t2 = tempfile::tempdir().unwrap();
    let other = zone_with_devices(t2.path());
    let e = fails(
        1,
        [
            "zone",
            "verify",
            "--file",
            zj.to_str().unwrap(),
            "--ca",
            other.join("zone-ca.crt").to_str().unwrap(),
        ],
    );
    assert!(e.contains("another zone"), "{e}");
}

#[test]
fn expired_config_refused() {
    let t = tempfile::tempdir().unwrap();
    let z = t.path().join("zone");
    let zs = z.to_str().unwrap();
    ok(["zone", "init", "--domain", "alice.example", "--dir", zs]);
    // Build an expired but correctly signed config through the library (a CLI cannot go back in time).
    let mut dir = zone_core::zonedir::ZoneDir::open(&z).unwrap();
    let past = time::OffsetDateTime::now_utc() - time::Duration::days(10);
    dir.resign(past, 1).unwrap();
    let e = fails(
        1,
        [
            "zone",
            "verify",
            "--file",
            z.join("zone.json").to_str().unwrap(),
            "--ca",
            z.join("zone-ca.crt").to_str().unwrap(),
        ],
    );
    assert!(e.contains("expired"), "{e}");
    // `zone show` on the owner's side still opens it and says so.
    let show = ok(["zone", "show", "--zone", zs]);
    assert!(show.contains("EXPIRED"), "{show}");
}

#[test]
fn bad_input_is_clear_and_writes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let z = zone_with_devices(t.path());
    let zs = z.to_str().unwrap();
    let before = std::fs::read(z.join("zone.json")).unwrap();

    // Usage errors: exit 2.
    let e = fails(2, ["gateway", "--config", zs]);
    assert!(e.contains("is a directory"), "{e}");
    // The usual address slips, each with what to write.
    let add_gw = |addr: &str| {
        fails(
            2,
            [
                "device",
                "add",
                "gw2",
                "--zone",
                zs,
                "--role",
                "gateway",
                "--public-addr",
                addr,
            ],
        )
    };
    let e = add_gw("2001:db8::10");
    assert!(e.contains("in brackets"), "{e}");
    let e = add_gw("203.0.113.10");
    assert!(e.contains("add the port: 203.0.113.10:PORT"), "{e}");
    let e = add_gw("vps.example:4433");
    assert!(e.contains("a name is not resolved"), "{e}");
    let e = fails(
        2,
        [
            "zone",
            "init",
            "--domain",
            "alice.example",
            "--dir",
            zs,
            "--bogus",
        ],
    );
    assert!(e.contains("--bogus"), "{e}");
    let e = fails(
        2,
        ["device", "add", "Bad_Name", "--zone", zs, "--role", "node"],
    );
    assert!(e.contains("invalid device name"), "{e}");
    let e = fails(2, ["device", "add", "x", "--zone", zs, "--role", "admin"]);
    assert!(e.contains("unknown role"), "{e}");
    let e = fails(
        2,
        ["device", "add", "gw2", "--zone", zs, "--role", "gateway"],
    );
    assert!(e.contains("--public-addr"), "{e}");
    let e = fails(
        2,
        [
            "device", "add", "n2", "--zone", zs, "--role", "node", "--days", "0",
        ],
    );
    assert!(e.contains("1 to 3650"), "{e}");
    fails(2, ["zone", "init", "--domain", "nodots", "--dir", "x"]);

    // Runtime errors: exit 1, a sentence saying what to do.
    let e = fails(
        1,
        ["zone", "init", "--domain", "alice.example", "--dir", zs],
    );
    assert!(e.contains("refusing to overwrite"), "{e}");
    let e = fails(
        1,
        ["device", "add", "home1", "--zone", zs, "--role", "node"],
    );
    assert!(e.contains("already exists"), "{e}");
    let e = fails(
        1,
        [
            "device",
            "list",
            "--zone",
            t.path().join("nowhere").to_str().unwrap(),
        ],
    );
    assert!(e.contains("zonegate zone init"), "{e}");
    let e = fails(1, ["device", "revoke", "ghost", "--zone", zs]);
    assert!(e.contains("device \"ghost\" is not in this zone"), "{e}");
    assert_eq!(
        before,
        std::fs::read(z.join("zone.json")).unwrap(),
        "a failed command changed zone.json"
    );

    // The only gateway is not revoked without --force: every node would lose its way in.
    let e = fails(2, ["device", "revoke", "gw", "--zone", zs]);
    assert!(e.contains("only gateway") && e.contains("--force"), "{e}");
    assert_eq!(
        before,
        std::fs::read(z.join("zone.json")).unwrap(),
        "a refused revocation changed zone.json"
    );

    // A revoked name cannot come back; revoking it again changes nothing.
    ok(["device", "revoke", "home1", "--zone", zs]);
    let before = std::fs::read(z.join("zone.json")).unwrap();
    let out = ok(["device", "revoke", "home1", "--zone", zs]);
    assert!(out.contains("revoked already"), "{out}");
    assert_eq!(before, std::fs::read(z.join("zone.json")).unwrap());
    // A name this directory does not list is revoked only when asked to.
    let e = fails(1, ["device", "revoke", "lost", "--zone", zs]);
    assert!(
        e.contains("not in this zone") && e.contains("--force"),
        "{e}"
    );
    let out = ok(["device", "revoke", "lost", "--zone", zs, "--force"]);
    assert!(out.contains("revoked lost"), "{out}");
    assert!(
        !z.join("devices/lost").exists(),
        "a bundle was made for a revoked name"
    );
    let e = fails(
        1,
        ["device", "add", "home1", "--zone", zs, "--role", "node"],
    );
    assert!(e.contains("revoked"), "{e}");

    // Forced, the only gateway goes, and the owner is told the nodes need zone.json by hand.
    let out = ok(["device", "revoke", "gw", "--zone", zs, "--force"]);
    assert!(
        out.contains("only gateway") && out.contains("every node's bundle"),
        "{out}"
    );

    // Corrupted key file.
    std::fs::write(
        z.join("zone.key"),
        "-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let e = fails(1, ["device", "list", "--zone", zs]);
    assert!(e.contains("zone.key") && e.contains("backup"), "{e}");

    // A foreign zone dir: CA of another zone next to this key.
    let t2 = tempfile::tempdir().unwrap();
    let other = zone_with_devices(t2.path());
    std::fs::copy(t.path().join("zone/zone-ca.crt"), other.join("zone-ca.crt")).unwrap();
    let e = fails(1, ["device", "list", "--zone", other.to_str().unwrap()]);
    assert!(e.contains("another zone key"), "{e}");
}

#[test]
fn renewing_a_device_keeps_its_edited_config() {
    let t = tempfile::tempdir().unwrap();
    let z = zone_with_devices(t.path());
    let zs = z.to_str().unwrap();
    let node = z.join("devices/home1/node.toml");
    let edited = format!(
        "{}\n[services.web]\nlocal = \"127.0.0.1:8000\"\n",
        std::fs::read_to_string(&node).unwrap()
    );
    std::fs::write(&node, &edited).unwrap();
    let cert_before = std::fs::read(z.join("devices/home1/device.crt")).unwrap();
    let out = ok(["device", "renew", "home1", "--zone", zs]);
    assert!(out.contains("was kept as it is"), "{out}");
    assert!(
        out.contains("takes them within seconds (no restart)"),
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&node).unwrap(), edited);
    assert!(z.join("devices/home1/node.toml.new").is_file());
    assert_ne!(
        std::fs::read(z.join("devices/home1/device.crt")).unwrap(),
        cert_before
    );
    // A bad --out changes nothing in the zone.
    let serial = |z: &std::path::Path| {
        zone_core::zonedir::read_zone_json(&z.join("zone.json"))
            .unwrap()
            .config
            .serial
    };
    let before = serial(&z);
    let file = t.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let e = renew_refused(zs, "home1", &file);
    assert!(e.contains("is not a directory"), "{e}");
    assert_eq!(serial(&z), before);
    // Another device's bundle is never written over.
    let home1 = z.join("devices/home1");
    let e = tv_refused_into(zs, &home1);
    assert!(e.contains("holds a device's bundle already"), "{e}");
    assert_eq!(serial(&z), before);
}

#[test]
fn gateway_and_node_refuse_bad_configs_before_starting() {
    let t = tempfile::tempdir().unwrap();
    let z = zone_with_devices(t.path());
    let gw = z.join("devices/gw/gateway.toml");
    let node = z.join("devices/home1/node.toml");
    let gws = gw.to_str().unwrap();
    let nodes = node.to_str().unwrap();

    // Each role's config given to the other command: the error says which command runs it.
    let e = fails(2, ["node", "--config", gws]);
    assert!(
        e.contains("this reads as a gateway's config") && e.contains("zonegate gateway --config"),
        "{e}"
    );
    let e = fails(2, ["gateway", "--config", nodes]);
    assert!(
        e.contains("this reads as a node agent's config") && e.contains("zonegate node --config"),
        "{e}"
    );

    // A bundle file named wrong: the setting and the config file are named (the error gave
    // only the path), exit 1 (a disk mounted late has it by the next start).
    let typo = z.join("devices/home1/typo.toml");
    std::fs::write(
        &typo,
        std::fs::read_to_string(&node)
            .unwrap()
            .replace("zone_config = \"zone.json\"", "zone_config = \"zone.jsn\""),
    )
    .unwrap();
    let e = fails(1, ["node", "--config", typo.to_str().unwrap()]);
    assert!(
        e.contains("typo.toml: zone_config = \"zone.jsn\": ") && e.contains("does not exist"),
        "{e}"
    );
    // A node can fetch zone.json from the zone's DNS instead: said.
    assert!(e.contains("or start with `--bootstrap-dns IP:PORT`"), "{e}");
    let typo = z.join("devices/gw/typo.toml");
    std::fs::write(
        &typo,
        std::fs::read_to_string(&gw)
            .unwrap()
            .replace("key = \"device.key\"", "key = \"devic.key\""),
    )
    .unwrap();
    let e = fails(1, ["gateway", "--config", typo.to_str().unwrap()]);
    assert!(e.contains("typo.toml: key = \"devic.key\": "), "{e}");
    // The device's own certificate given for the zone CA: no restart mends it (exit 2). Its
    // key was taken as the zone's, and the device's own certificate refused as another zone's.
    std::fs::write(
        &typo,
        std::fs::read_to_string(&gw)
            .unwrap()
            .replace("ca = \"zone-ca.crt\"", "ca = \"device.crt\""),
    )
    .unwrap();
    let e = fails(2, ["gateway", "--config", typo.to_str().unwrap()]);
    assert!(
        e.contains("not a CA certificate (the certificate of device gw.alice.example)"),
        "{e}"
    );
    std::fs::remove_file(&typo).unwrap();

    // The bundle comes with an empty policy directory; one named in gateway.toml but gone:
    let pol = z.join("devices/gw/policies");
    assert!(pol.is_dir(), "device add made no policies/ for the gateway");
    std::fs::remove_dir(&pol).unwrap();
    let e = fails(2, ["gateway", "--config", gws]);
    assert!(
        e.contains("policy directory") && e.contains("does not exist"),
        "{e}"
    );
    // A link to nothing (a mount not up yet at boot): exit 1, which the unit retries.
    std::os::unix::fs::symlink(t.path().join("unmounted"), &pol).unwrap();
    let e = fails(1, ["gateway", "--config", gws]);
    assert!(
        e.contains("is a link to") && e.contains("a mount not up yet"),
        "{e}"
    );
    std::fs::remove_file(&pol).unwrap();

    // A broken policy file: every error with file:line:column, nothing starts.
    std::fs::create_dir_all(&pol).unwrap();
    std::fs::write(
        pol.join("bad.toml"),
        "[app.web]\ntcp = { listen = \"nonsense\" }\nto = \"home1/web\"\n",
    )
    .unwrap();
    let e = fails(2, ["gateway", "--config", gws]);
    assert!(e.contains("bad.toml:2:") && e.contains("listen"), "{e}");
    std::fs::remove_file(pol.join("bad.toml")).unwrap();
    // A policy file it cannot read (here a link to nothing: as root, modes do not stop a
    // read) may be readable on the next try: exit 1, which the systemd unit restarts.
    std::os::unix::fs::symlink(t.path().join("gone.toml"), pol.join("later.toml")).unwrap();
    let e = fails(1, ["gateway", "--config", gws]);
    assert!(
        e.contains("later.toml: is a link to") && e.contains("which does not exist"),
        "{e}"
    );
    std::fs::remove_file(pol.join("later.toml")).unwrap();

    // A front timeout out of range, and the tcp apps' per-client limit above their total.
    let gw_text = std::fs::read_to_string(&gw).unwrap();
    std::fs::write(&gw, format!("{gw_text}\n[front]\nread_timeout_secs = 0\n")).unwrap();
    let e = fails(2, ["gateway", "--config", gws]);
    assert!(
        e.contains("[front] read_timeout_secs = 0") && e.contains("1 to 86400"),
        "{e}"
    );
    std::fs::write(
        &gw,
        format!("tcp_connections = 10\ntcp_connections_per_ip = 11\n{gw_text}"),
    )
    .unwrap();
    let e = fails(2, ["gateway", "--config", gws]);
    assert!(
        e.contains("tcp_connections_per_ip = 11") && e.contains("1 to 10"),
        "{e}"
    );
    std::fs::write(&gw, &gw_text).unwrap();

    // Port 0 where a port must be known: the admin address, a forward's, a service's.
    let zero_admin: String = gw_text
        .lines()
        .map(|l| {
            if l.starts_with("admin =") {
                "admin = \"127.0.0.1:0\"".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(zero_admin, gw_text.trim_end(), "gateway.toml sets no admin");
    std::fs::write(&gw, zero_admin).unwrap();
    let e = fails(2, ["gateway", "--config", gws]);
    assert!(
        e.contains("admin = 127.0.0.1:0") && e.contains("port 0"),
        "{e}"
    );
    std::fs::write(&gw, &gw_text).unwrap();
    let e = fails(
        2,
        [
            "node",
            "--config",
            nodes,
            "--forward",
            "127.0.0.1:0=gw/echo",
        ],
    );
    assert!(
        e.contains("listen = 127.0.0.1:0") && e.contains("port 0"),
        "{e}"
    );
    let e = fails(
        2,
        ["node", "--config", nodes, "--service", "web=127.0.0.1:0"],
    );
    assert!(e.contains("service web") && e.contains("port 0"), "{e}");

    // A service on one of the process's own sockets is the process itself: a forward there
    // took public requests for the service on to another device as this one, past the mesh
    // policy; the admin API there answered a raw tcp app with its /status.
    let p = free_port();
    std::fs::write(
        &gw,
        format!("{gw_text}\n[[forward]]\nlisten = \"127.0.0.1:{p}\"\nto = \"home1/echo\"\n\n[services.web]\nlocal = \"127.0.0.1:{p}\"\n"),
    )
    .unwrap();
    let e = fails(2, ["gateway", "--config", gws]);
    assert!(
        e.contains(&format!("`[services.web]` (127.0.0.1:{p}) is this process's own `[[forward]] to home1/echo` socket")),
        "{e}"
    );
    std::fs::write(&gw, &gw_text).unwrap();
    let e = fails(
        2,
        ["node", "--config", nodes, "--service", "web=127.0.0.1:9091"],
    );
    assert!(
        e.contains("`[services.web]` (127.0.0.1:9091) is this process's own `admin` socket"),
        "{e}"
    );

    // A [[tls]] file that is not there: told before any socket is bound; exit 1, as a
    // restart may find it (a mount late at boot, a certbot hook half way through its copy).
    std::fs::write(
        &gw,
        format!("{gw_text}\n[[tls]]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n"),
    )
    .unwrap();
    let e = fails(1, ["gateway", "--config", gws]);
    assert!(e.contains("/nonexistent/cert.pem"), "{e}");
    // And what to do: a single broken pair stops the whole gateway (tunnel, DNS, apps).
    assert!(
        e.contains("no [[tls]] certificate loads") && e.contains("take the [[tls]] entries out"),
        "{e}"
    );
    std::fs::write(&gw, &gw_text).unwrap();

    // No `policies` key: --policies stands in for it (here a directory that is not there,
    // told as such), and without the flag the start is refused saying both.
    let no_key: String = gw_text
        .lines()
        .filter(|l| !l.starts_with("policies"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(no_key, gw_text);
    std::fs::write(&gw, &no_key).unwrap();
    let e = fails(2, ["gateway", "--config", gws]);
    assert!(
        e.contains("no policy directory") && e.contains("--policies"),
        "{e}"
    );
    let e = fails(
        2,
        ["gateway", "--config", gws, "--policies", "/nonexistent/p"],
    );
    assert!(e.contains("/nonexistent/p does not exist"), "{e}");
    std::fs::write(&gw, &gw_text).unwrap();

    // Unknown key in the config file: named with its position.
    let text = std::fs::read_to_string(&node).unwrap();
    std::fs::write(&node, format!("{text}\nfrobnicate = true\n")).unwrap();
    let e = fails(2, ["node", "--config", nodes]);
    assert!(e.contains("node.toml:") && e.contains("frobnicate"), "{e}");
    std::fs::write(&node, &text).unwrap();

    // A domain that is not the certificate's zone.
    std::fs::write(
        &node,
        text.replace("domain = \"alice.example\"", "domain = \"bob.example\""),
    )
    .unwrap();
    let e = fails(2, ["node", "--config", nodes]);
    assert!(e.contains("certificate is for zone alice.example"), "{e}");
    std::fs::write(&node, &text).unwrap();

    // A worker thread count of 0 would start a runtime that runs nothing.
    std::fs::write(&node, format!("threads = 0\n{text}")).unwrap();
    let e = fails(2, ["node", "--config", nodes]);
    assert!(e.contains("threads = 0") && e.contains("1 to 1024"), "{e}");
    std::fs::write(&node, &text).unwrap();

    // Bad flags.
    let e = fails(2, ["node", "--config", nodes, "--service", "web"]);
    assert!(e.contains("NAME=IP:PORT"), "{e}");
    let e = fails(
        2,
        ["node", "--config", nodes, "--service", "web=localhost:80"],
    );
    assert!(e.contains("a name is not resolved here"), "{e}");
    let e = fails(2, ["node", "--config", nodes, "--service", "web=127.0.0.1"]);
    assert!(e.contains("add the port: 127.0.0.1:PORT"), "{e}");
    let e = fails(
        2,
        [
            "node",
            "--config",
            nodes,
            "--forward",
            "127.0.0.1:9000=home1/web",
        ],
    );
    assert!(e.contains("this device itself"), "{e}");
    let e = fails(
        2,
        [
            "node",
            "--config",
            nodes,
            "--forward",
            "127.0.0.1:9000=home2",
        ],
    );
    assert!(e.contains("DEVICE/SERVICE"), "{e}");
    // A forward on the admin's port (here through a wildcard): both settings named, before
    // any bind.
    let e = fails(
        2,
        [
            "node",
            "--config",
            nodes,
            "--forward",
            "0.0.0.0:9091=home2/web",
        ],
    );
    assert!(
        e.contains("`admin` (127.0.0.1:9091)")
            && e.contains("`forward to home2/web` (0.0.0.0:9091)")
            && e.contains(&format!(
                "another address in {nodes} or its --forward flags"
            )),
        "{e}"
    );

    // Certificates with HTTPS off: never served, said before starting.
    let original = std::fs::read_to_string(&gw).unwrap();
    std::fs::write(
        &gw,
        format!("https = \"off\"\n{original}[[tls]]\ncert = \"a.pem\"\nkey = \"b.pem\"\n"),
    )
    .unwrap();
    let e = fails(2, ["gateway", "--config", gws]);
    assert!(
        e.contains("[[tls]] certificates are set but `https = \"off\"`"),
        "{e}"
    );
    // One pair listed twice (its second block naming the file another way).
    std::fs::write(
        &gw,
        format!("{original}[[tls]]\ncert = \"a.pem\"\nkey = \"b.pem\"\n[[tls]]\ncert = \"./a.pem\"\nkey = \"b.pem\"\n"),
    )
    .unwrap();
    let e = fails(2, ["gateway", "--config", gws]);
    assert!(e.contains("a.pem is listed twice"), "{e}");
    std::fs::write(&gw, original).unwrap();

    // A node bundle run as a gateway, and a key that is not the certificate's.
    std::fs::create_dir_all(z.join("devices/home1/policies")).unwrap();
    let g2 = z.join("devices/home1/gateway.toml");
    std::fs::write(
        &g2,
        format!(
            "{text}listen = \"127.0.0.1:{}\"\npolicies = \"policies\"\n",
            crate::inproc::free_udp_port()
        ),
    )
    .unwrap();
    let e = fails(2, ["gateway", "--config", g2.to_str().unwrap()]);
    assert!(e.contains("not a gateway"), "{e}");
    let home1_key = std::fs::read(z.join("devices/home1/device.key")).unwrap();
    std::fs::copy(
        z.join("devices/gw/device.key"),
        z.join("devices/home1/device.key"),
    )
    .unwrap();
    let e = fails(1, ["node", "--config", nodes]);
    assert!(e.contains("does not belong to the certificate"), "{e}");
    assert!(e.contains("is device home1's certificate"), "{e}");
    std::fs::write(z.join("devices/home1/device.key"), home1_key).unwrap();
    // Another device's certificate alone copied in (its key not): exit 2 naming whose, as with
    // its key too (it exited 1, retried for ever, and said only that the key did not match).
    let home1_cert = std::fs::read(z.join("devices/home1/device.crt")).unwrap();
    std::fs::copy(
        z.join("devices/gw/device.crt"),
        z.join("devices/home1/device.crt"),
    )
    .unwrap();
    let e = fails(2, ["node", "--config", nodes]);
    assert!(
        e.contains("certificate is for another device: gw (config says home1)"),
        "{e}"
    );
    std::fs::write(z.join("devices/home1/device.crt"), home1_cert).unwrap();

    // A config naming another device than its bundle's certificate: a setting to change,
    // exit 2, which the unit does not restart (it restarted every 5 s for ever with exit 1).
    ok([
        "device",
        "add",
        "home2",
        "--zone",
        z.to_str().unwrap(),
        "--role",
        "node",
    ]);
    let h2 = z.join("devices/home2/node.toml");
    let text = std::fs::read_to_string(&h2).unwrap();
    assert!(text.contains("device = \"home2\""), "{text}");
    std::fs::write(
        &h2,
        text.replace("device = \"home2\"", "device = \"home1\""),
    )
    .unwrap();
    let e = fails(2, ["node", "--config", h2.to_str().unwrap()]);
    assert!(e.contains("certificate is for another device"), "{e}");

    // Another zone's zone.json in the bundle (an owner of two zones copying the wrong one):
    // no restart mends it either, exit 2 (it exited 1, restarted every 5 s for ever).
    let other = other_zone(t.path());
    ok([
        "device",
        "add",
        "home3",
        "--zone",
        z.to_str().unwrap(),
        "--role",
        "node",
    ]);
    std::fs::copy(other.join("zone.json"), z.join("devices/home3/zone.json")).unwrap();
    let h3 = z.join("devices/home3/node.toml");
    let e = fails(2, ["node", "--config", h3.to_str().unwrap()]);
    assert!(e.contains("another zone"), "{e}");
}

/// Two agents on one machine both default to admin port 9091: the second one's error names
/// the setting that frees it, and says the OS error once.
#[test]
fn busy_admin_port_names_the_setting() {
    let t = tempfile::tempdir().unwrap();
    let z = zone_with_devices(t.path());
    let node = z.join("devices/home1/node.toml");
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    let text = std::fs::read_to_string(&node).unwrap();
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("admin ="))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&node, format!("admin = \"{addr}\"\n{text}")).unwrap();
    let e = fails(1, ["node", "--config", node.to_str().unwrap()]);
    assert!(
        e.contains(&format!("admin API: cannot listen on {addr}"))
            && e.contains("set `admin = \"127.0.0.1:PORT\"`"),
        "{e}"
    );
    assert_eq!(e.matches("(os error").count(), 1, "{e}");
}

/// The gateway's QUIC port held by another program: the error names `listen` and what to
/// do, as every other bind's does, and the OS error once.
#[test]
fn busy_quic_port_names_the_listen_setting() {
    let t = tempfile::tempdir().unwrap();
    let z = zone_with_devices(t.path());
    let gw = z.join("devices/gw/gateway.toml");
    let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let quic = held.local_addr().unwrap();
    let text: String = std::fs::read_to_string(&gw)
        .unwrap()
        .lines()
        .filter(|l| {
            !["admin =", "listen =", "http =", "https =", "dns ="]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(
        &gw,
        format!("admin = \"127.0.0.1:{}\"\nlisten = \"{quic}\"\nhttp = \"off\"\nhttps = \"off\"\ndns = \"off\"\n{text}", crate::inproc::free_tcp_port()),
    )
    .unwrap();
    let e = fails(1, ["gateway", "--config", gw.to_str().unwrap()]);
    assert!(
        e.contains(&format!(
            "`listen` (the tunnel's QUIC port): cannot listen on UDP {quic}"
        )) && e.contains("set `listen = \"IP:PORT\"` in gateway.toml"),
        "{e}"
    );
    assert_eq!(e.matches("(os error").count(), 1, "{e}");
}

/// A policy app on one of the gateway's own ports is a setting to change, not a failure a
/// restart gets past: exit 2 (which the systemd unit does not restart), the setting named.
#[test]
fn an_app_on_the_gateways_own_port_is_a_usage_error() {
    let t = tempfile::tempdir().unwrap();
    let z = zone_with_devices(t.path());
    let gw = z.join("devices/gw/gateway.toml");
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let text: String = std::fs::read_to_string(&gw)
        .unwrap()
        .lines()
        .filter(|l| {
            !["admin =", "listen =", "http =", "https =", "dns ="]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    // The HTTP port is held by another program: the clash is told before any bind, not
    // hidden behind that bind's failure (exit 1, restarted for ever).
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http = held.local_addr().unwrap();
    std::fs::write(
        &gw,
        format!("admin = \"{admin}\"\nlisten = \"127.0.0.1:{}\"\nhttp = \"{http}\"\nhttps = \"off\"\ndns = \"off\"\n{text}", crate::inproc::free_udp_port()),
    )
    .unwrap();
    std::fs::write(
        z.join("devices/gw/policies/clash.toml"),
        format!("[app.clash]\ntcp = {{ listen = \"{admin}\" }}\nto = \"home1/web\"\nallow = {{ from = [\"public\"] }}\n"),
    )
    .unwrap();
    let e = fails(2, ["gateway", "--config", gw.to_str().unwrap()]);
    assert!(
        e.contains("app clash") && e.contains("gateway's own `admin`"),
        "{e}"
    );
}

/// `policy check --gateway-config` checks the apps against that gateway's own ports, as the
/// gateway does at start and reload (where such an edit is refused): without it the check
/// passes an app on the gateway's HTTP port.
#[test]
fn policy_check_knows_the_gateways_own_ports_when_told() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("policies");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("apps.toml"),
        "[app.web2]\ntcp = { listen = \"0.0.0.0:8080\" }\nto = \"home1/web\"\nallow = { from = [\"public\"] }\n",
    )
    .unwrap();
    let gw = t.path().join("gateway.toml");
    std::fs::write(
        &gw,
        "device = \"gw\"\ndomain = \"alice.example\"\nkey = \"device.key\"\ncert = \"device.crt\"\nca = \"zone-ca.crt\"\nzone_config = \"zone.json\"\nlisten = \"0.0.0.0:4433\"\npolicies = \"policies\"\nhttp = \"0.0.0.0:8080\"\n",
    )
    .unwrap();
    let d = dir.to_str().unwrap();
    let out = ok(["policy", "check", d]);
    assert!(out.contains("1 apps"), "{out}");
    let o = zg([
        "policy",
        "check",
        d,
        "--gateway-config",
        gw.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    // Where the app is written, as the running gateway says it.
    assert!(
        out.contains("apps.toml:1:6: app web2") && out.contains("gateway's own `http`"),
        "{out}"
    );
    // Devices the zone config does not list are warned of (the gateway serves such an app,
    // every request failing; zone.json may list the device later): a misspelt `to` and
    // `device:` passed with "ok", and requests then failed as "device offline".
    let z = zone_with_devices(t.path());
    std::fs::copy(z.join("zone.json"), t.path().join("zone.json")).unwrap();
    std::fs::write(
        dir.join("apps.toml"),
        "[app.web]\nhttp = { host = \"alice.example\" }\nto = \"home9/web\"\nallow = { from = [\"public\"] }\n\n[app.peers]\nmesh = true\nto = \"home1/etcd\"\nallow = { from = [\"device:hom1\", \"device:gw\"] }\n",
    )
    .unwrap();
    let out = ok([
        "policy",
        "check",
        d,
        "--gateway-config",
        gw.to_str().unwrap(),
    ]);
    assert!(
        out.contains("warning: ") && out.contains("app web: its `to` names device home9"),
        "{out}"
    );
    assert!(
        out.contains("app peers: its `from` names device:hom1,"),
        "{out}"
    );
    assert!(!out.contains("device:gw,"), "{out}");
    assert!(out.contains("ok: 1 files, 2 apps"), "{out}");
    // A file that is no gateway.toml is the command's mistake.
    let e = fails(
        2,
        [
            "policy",
            "check",
            d,
            "--gateway-config",
            dir.join("apps.toml").to_str().unwrap(),
        ],
    );
    assert!(e.contains("apps.toml"), "{e}");
    // A node's config is said to be one (it read "missing field `listen`").
    let node = t.path().join("node.toml");
    std::fs::write(
        &node,
        "device = \"home1\"\ndomain = \"alice.example\"\nkey = \"device.key\"\ncert = \"device.crt\"\nca = \"zone-ca.crt\"\nzone_config = \"zone.json\"\n",
    )
    .unwrap();
    let e = fails(
        2,
        [
            "policy",
            "check",
            d,
            "--gateway-config",
            node.to_str().unwrap(),
        ],
    );
    assert!(
        e.contains("this reads as a node agent's config") && e.contains("give its gateway.toml"),
        "{e}"
    );
}

#[test]
fn policy_check_and_explain() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    std::fs::write(
        dir.join("apps.toml"),
        "[app.dfs]\nhttp = { host = \"alice.example\", path = \"/dfs\" }\nto = \"home1/dfs\"\nallow = { from = [\"public\"], methods = [\"GET\", \"HEAD\"] }\n\n[app.peers]\nmesh = true\nto = \"home2/etcd\"\nallow = { from = [\"device:home1\"] }\n",
    )
    .unwrap();
    let d = dir.to_str().unwrap();
    // Look meant as policy files, are not read: named, not passed over in silence.
    std::fs::write(dir.join("ssh.TOML"), "").unwrap();
    std::fs::write(dir.join("games.toml.txt"), "").unwrap();
    std::fs::create_dir(dir.join("more")).unwrap();
    std::fs::write(dir.join("more/x.toml"), "").unwrap();
    std::fs::write(dir.join("notes.md"), "").unwrap();
    std::fs::write(dir.join("web.tml"), "").unwrap();
    std::fs::write(dir.join("mail.toml "), "").unwrap();
    let out = ok(["policy", "check", d]);
    assert!(out.contains("2 apps"), "{out}");
    assert!(!out.contains("denies everything"), "{out}");
    for name in [
        "ssh.TOML",
        "games.toml.txt",
        "more",
        "web.tml",
        "mail.toml ",
    ] {
        assert!(
            out.contains(&format!("{name} is not read")),
            "{name}: {out}"
        );
    }
    assert!(!out.contains("notes.md"), "{out}");
    let missing = dir.join("missing");
    let missing = missing.to_str().unwrap();
    let args = [
        "--from",
        "198.51.100.7",
        "--host",
        "a.example",
        "--path",
        "/",
    ];
    let mut explain = vec!["policy", "explain", "--dir", missing];
    explain.extend(args);
    let e = fails(2, explain);
    // Said as it is: "not a directory" sent owners looking for a file in its place.
    assert!(e.contains("missing: does not exist"), "{e}");
    let e = fails(
        2,
        ["policy", "check", dir.join("notes.md").to_str().unwrap()],
    );
    assert!(e.contains("notes.md: not a directory"), "{e}");
    // A DENY exits 3 (ALLOW 0), for scripts.
    let out = denied([
        "policy",
        "explain",
        "--dir",
        d,
        "--from",
        "198.51.100.7",
        "--host",
        "alice.example",
        "--path",
        "/dfs/x",
        "--method",
        "PUT",
    ]);
    assert!(
        out.contains("dfs") && out.to_lowercase().contains("method"),
        "{out}"
    );
    let out = denied([
        "policy",
        "explain",
        "--dir",
        d,
        "--from",
        "device:home3",
        "--to",
        "home2/etcd",
    ]);
    assert!(out.contains("peers"), "{out}");
    let out = ok([
        "policy",
        "explain",
        "--dir",
        d,
        "--from",
        "device:home1",
        "--to",
        "home2/etcd",
    ]);
    assert!(out.contains("overall: ALLOW"), "{out}");
    // Decided as the front decides (a method refused while no method is allowed there now is
    // refused for the time), at the moment given (said, with now as the default); tcp and
    // udp apps explained too; a device is no HTTP client; a path starts with /.
    std::fs::write(
        dir.join("more.toml"),
        "[app.tw]\nhttp = { host = \"tw.example\" }\nto = \"home1/web\"\nallow = { from = [\"public\"], methods = [\"GET\"], hours = \"15:00-16:00\" }\n\n[app.ssh]\ntcp = { listen = \"0.0.0.0:2222\" }\nto = \"home1/ssh\"\nallow = { from = [\"10.0.0.0/8\"] }\n",
    )
    .unwrap();
    let tw = |at: &str, method: &str| {
        zg([
            "policy",
            "explain",
            "--dir",
            d,
            "--from",
            "198.51.100.7",
            "--host",
            "tw.example",
            "--path",
            "/x",
            "--method",
            method,
            "--at",
            at,
        ])
    };
    let tw = |at: &str, method: &str| {
        let o = tw(at, method);
        (o.status.code(), stdout(&o))
    };
    let (code, out) = tw("2026-12-07T13:54:00Z", "POST");
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("at: 2026-12-07T13:54:00Z"), "{out}");
    assert!(
        out.contains("DENY") && out.contains("outside the allowed hours"),
        "{out}"
    );
    let (code, out) = tw("2026-12-07T15:30:00Z", "POST");
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains("DENY") && out.contains("allowed here now: GET"),
        "{out}"
    );
    let (code, out) = tw("2026-12-07T16:30:00+01:00", "GET");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("ALLOW"), "{out}");
    let ssh = |from: &'static str| {
        [
            "policy",
            "explain",
            "--dir",
            d,
            "--from",
            from,
            "--tcp",
            "0.0.0.0:2222",
        ]
    };
    let out = ok(ssh("10.1.2.3"));
    assert!(out.contains("ALLOW"), "{out}");
    denied(ssh("198.51.100.7"));
    let e = fails(
        2,
        [
            "policy",
            "explain",
            "--dir",
            d,
            "--from",
            "device:home1",
            "--host",
            "alice.example",
            "--path",
            "/dfs/x",
        ],
    );
    assert!(e.contains("knows its clients by address"), "{e}");
    let e = fails(
        2,
        [
            "policy",
            "explain",
            "--dir",
            d,
            "--from",
            "198.51.100.7",
            "--host",
            "alice.example",
            "--path",
            "dfs/x",
        ],
    );
    assert!(e.contains("starts with /"), "{e}");
    // A host the front answers 400 is a mistake, not a denial; a method that is likely a
    // slip is explained as sent (the front forwards it), with a note.
    let explain = |host: &'static str, method: &'static str| {
        [
            "policy",
            "explain",
            "--dir",
            d,
            "--from",
            "198.51.100.7",
            "--host",
            host,
            "--path",
            "/dfs/x",
            "--method",
            method,
        ]
    };
    for host in ["fam example", "a:b"] {
        let e = fails(2, explain(host, "GET"));
        assert!(e.contains("not a host name"), "{e}");
    }
    let out = denied(explain("alice.example", "get"));
    assert!(
        out.contains("note: --method get:") && out.contains("the method is not allowed"),
        "{out}"
    );
    std::fs::remove_file(dir.join("more.toml")).unwrap();
    // An app with no rule is told as denying everything (deny by default).
    std::fs::write(
        dir.join("closed.toml"),
        "[app.closed]\nhttp = { host = \"closed.example\" }\nto = \"home1/web\"\n",
    )
    .unwrap();
    let out = ok(["policy", "check", d]);
    assert!(
        out.contains("note: no `allow` rule: it denies everything"),
        "{out}"
    );
    std::fs::remove_file(dir.join("closed.toml")).unwrap();
    // An emptied file: a running gateway that served apps from it refuses it (a save in
    // progress), and the check says so and fails (it said "ok").
    std::fs::write(dir.join("gone.toml"), "\n").unwrap();
    let o = zg(["policy", "check", d]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(
        out.contains("gone.toml: is empty: a running gateway that served apps from it keeps them"),
        "{out}"
    );
    std::fs::write(dir.join("gone.toml"), "# nothing here now\n").unwrap();
    ok(["policy", "check", d]);
    std::fs::remove_file(dir.join("gone.toml")).unwrap();
    // Options that would be ignored are refused (they were accepted and had no effect).
    let e = fails(
        2,
        [
            "policy",
            "explain",
            "--dir",
            d,
            "--from",
            "device:home3",
            "--to",
            "home2/etcd",
            "--method",
            "PUT",
        ],
    );
    assert!(e.contains("--method"), "{e}");
    let e = fails(
        2,
        [
            "policy",
            "explain",
            "--dir",
            d,
            "--from",
            "198.51.100.7",
            "--role",
            "node",
            "--host",
            "alice.example",
            "--path",
            "/dfs/x",
        ],
    );
    assert!(e.contains("--role is for --from device:NAME"), "{e}");
    // A role or device name no device can have is a usage error, not an explained denial.
    for (from, role, says) in [
        ("device:home3", "gatway", "gatway"),
        ("device:Home_3", "node", "Home_3"),
    ] {
        let e = fails(
            2,
            [
                "policy",
                "explain",
                "--dir",
                d,
                "--from",
                from,
                "--role",
                role,
                "--to",
                "home2/etcd",
            ],
        );
        assert!(e.contains(says), "{e}");
    }
    std::fs::write(
        dir.join("broken.toml"),
        "[app.x]\nmesh = true\nto = \"nowhere\"\nbogus = 1\n",
    )
    .unwrap();
    let o = zg(["policy", "check", d]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.contains("broken.toml:"), "{out}");
}

#[test]
fn demo_check_runs_a_whole_zone() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("demo");
    let o = zg(["demo", "--dir", dir.to_str().unwrap(), "--check"]);
    let out = stdout(&o);
    assert!(o.status.success(), "demo failed:\n{out}\n{}", stderr(&o));
    assert!(out.contains("demo check passed"), "{out}");
    assert!(out.contains("/dfs/"), "{out}");
    // It left a usable zone behind in --dir, and refuses to write there again, or into any
    // directory that holds files (a repository, a gateway's bundle with watched policies).
    assert!(dir.join("zone/zone.key").exists());
    let e = fails(2, ["demo", "--dir", dir.to_str().unwrap(), "--check"]);
    assert!(e.contains("not an empty directory"), "{e}");
    let used = t.path().join("used");
    std::fs::create_dir_all(used.join("policies")).unwrap();
    std::fs::write(used.join("policies/mine.toml"), "# mine\n").unwrap();
    let e = fails(2, ["demo", "--dir", used.to_str().unwrap(), "--check"]);
    assert!(e.contains("not an empty directory"), "{e}");
    assert!(!used.join("policies/demo.toml").exists());
}

/// The interactive demo stopped by SIGTERM removes its temporary zone (keys and all): the
/// default action ended it with the directory left behind. It stops as a gateway does, its
/// gateway drained and saying so: the demo was dropped mid-flight, with no line, and at
/// times a task that outlived it logged an ERROR that a part of the gateway had failed.
#[test]
fn a_stopped_demo_leaves_no_temporary_zone() {
    use std::io::{BufRead, BufReader, Read};
    let tmp = tempfile::tempdir().unwrap();
    let child = std::process::Command::new(bin())
        .arg("demo")
        .env("TMPDIR", tmp.path())
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    let mut stderr = child.0.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut log = String::new();
        let _ = stderr.read_to_string(&mut log);
        log
    });
    // Read on a thread: a demo that hangs before it is ready fails the test at the deadline
    // instead of blocking it for ever.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + ENDS_WITHIN;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("Press Ctrl-C") => break,
            Ok(_) => {}
            Err(e) => panic!("the demo never got ready: {e}"),
        }
    }
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "its zone"
    );
    let pid = child.0.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.wait_within(ENDS_WITHIN, "SIGTERM");
    assert!(status.success(), "{status:?}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let log = log.join().unwrap();
    assert!(log.contains("gateway stopped"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
}

/// A listing whose reader left (`device list | head -1`) ends quietly with SIGPIPE's status,
/// as a Unix tool does: println! panicked with "failed printing to stdout" (exit 101).
#[test]
fn a_listing_whose_reader_left_ends_quietly() {
    let t = tempfile::tempdir().unwrap();
    let z = zone_with_devices(t.path());
    // Another test's child forked at that moment holds a copy of the pipe's read end until it
    // execs, and a listing written then lands in the pipe (exit 0): tried again then.
    for _ in 0..20 {
        // The reader is gone before the child starts (dropped after the spawn, it could be
        // late for a child that printed first on a busy machine).
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new(bin())
            .args(["device", "list", "--zone", z.to_str().unwrap()])
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{err}");
        match out.status.code() {
            Some(141) => return,
            Some(0) => continue,
            other => panic!("exit {other:?}: {err}"),
        }
    }
    panic!("the listing never met its reader gone (exit 0 each time)");
}

/// A `demo --check` stopped half way (a CI job cancelled) fails: it exited 0, a pass, having
/// checked nothing; and its temporary zone is removed all the same. Stopped as soon as its
/// zone exists, before any check (it prints nothing until all have passed).
#[test]
fn a_demo_check_stopped_half_way_fails() {
    use std::io::Read;
    let tmp = tempfile::tempdir().unwrap();
    let child = std::process::Command::new(bin())
        .args(["demo", "--check"])
        .env("TMPDIR", tmp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    // Its temporary directory is made before the signal handlers are in place; what the demo
    // writes in it, after.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let started = || {
        std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(Result::ok)
            .any(|d| std::fs::read_dir(d.path()).is_ok_and(|mut c| c.next().is_some()))
    };
    while !started() {
        assert!(std::time::Instant::now() < deadline, "no demo zone made");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let pid = child.0.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        let _ = tx.send(out);
    });
    let status = child.wait_within(ENDS_WITHIN, "SIGTERM");
    let out = rx
        .recv_timeout(ENDS_WITHIN)
        .expect("the demo's output never ended");
    assert!(!out.contains("demo check passed"), "{out}");
    assert_eq!(status.code(), Some(1), "{status:?}: {out}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// SIGHUP is said and ignored by a serving process (its default ended it at once, undrained:
/// `kill -HUP` out of nginx habit, a logrotate hook, a closed terminal); SIGTERM still stops
/// it cleanly.
#[test]
fn a_hangup_does_not_stop_a_serving_process() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("f.txt"), "served").unwrap();
    let port = free_port();
    let child = std::process::Command::new(bin())
        .args(["files", "--dir"])
        .arg(tmp.path())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    let up = || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !up() {
        assert!(std::time::Instant::now() < deadline, "files never listened");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid = child.0.id().to_string();
    let signal = |sig: &str| {
        assert!(std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success())
    };
    signal("-HUP");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(child.0.try_wait().unwrap().is_none(), "SIGHUP stopped it");
    assert!(up(), "no longer serving after SIGHUP");
    signal("-TERM");
    let status = child.wait_within(ENDS_WITHIN, "SIGTERM");
    assert!(status.success(), "{status:?}");
}

/// Kills the child (by its PID) when dropped, so a failing test leaves no process behind.
struct Killed(std::process::Child);

/// How long a child given a signal (or left to give up) may take to end: a child that does
/// not end fails its test then, instead of blocking the whole run (libtest has no timeout).
const ENDS_WITHIN: std::time::Duration = std::time::Duration::from_secs(120);

impl Killed {
    /// Waits at most `within` for the child to end; `after` names what should have ended it.
    fn wait_within(
        &mut self,
        within: std::time::Duration,
        after: &str,
    ) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "process {} still running {within:?} after {after}",
                self.0.id()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Free for UDP and TCP, below the ephemeral range: the zonegate child binds it later.
fn free_port() -> u16 {
    crate::inproc::free_udp_and_tcp_port()
}

#[test]
fn zone_config_over_the_gateways_dns_verify_and_node_bootstrap() {
    let t = tempfile::tempdir().unwrap();
    let z = t.path().join("zone");
    let zs = z.to_str().unwrap();
    let quic = free_port();
    let dns = free_port();
    ok(["zone", "init", "--domain", "alice.example", "--dir", zs]);
    ok([
        "device",
        "add",
        "gw",
        "--zone",
        zs,
        "--role",
        "gateway",
        "--public-addr",
        &format!("127.0.0.1:{quic}"),
    ]);
    ok(["device", "add", "home1", "--zone", zs, "--role", "node"]);
    let gwdir = z.join("devices/gw");
    std::fs::copy(z.join("zone.json"), gwdir.join("zone.json")).unwrap();
    std::fs::create_dir_all(gwdir.join("policies")).unwrap();
    let cfg = gwdir.join("gateway.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let admin = free_port();
    let text = text
        .replace(
            &format!("listen = \"0.0.0.0:{quic}\""),
            &format!("listen = \"127.0.0.1:{quic}\""),
        )
        .replace(
            "admin = \"127.0.0.1:9090\"",
            &format!("admin = \"127.0.0.1:{admin}\""),
        );
    std::fs::write(
        &cfg,
        format!("{text}\nhttp = \"off\"\nhttps = \"off\"\ndns = \"127.0.0.1:{dns}\"\n"),
    )
    .unwrap();
    let _gw = Killed(
        Command::new(bin())
            .args(["gateway", "--config", cfg.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let server = format!("127.0.0.1:{dns}");
    let ca = z.join("zone-ca.crt");
    // Verify over DNS (retry while the gateway starts).
    let start = std::time::Instant::now();
    let out = loop {
        let o = zg([
            "zone",
            "verify",
            "--dns",
            "alice.example",
            "--server",
            &server,
            "--ca",
            ca.to_str().unwrap(),
        ]);
        if o.status.success() {
            break stdout(&o);
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "DNS never answered: {}",
            stderr(&o)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(
        out.contains(&format!("serial {}", zone_serial(&z)))
            && out.contains(&format!("gw at 127.0.0.1:{quic}")),
        "{out}"
    );
    // Another zone's CA refuses it.
    let t2 = tempfile::tempdir().unwrap();
    let other = zone_with_devices(t2.path());
    let e = fails(
        1,
        [
            "zone",
            "verify",
            "--dns",
            "alice.example",
            "--server",
            &server,
            "--ca",
            other.join("zone-ca.crt").to_str().unwrap(),
        ],
    );
    assert!(
        e.contains("refusing it") && e.contains("another zone's config"),
        "{e}"
    );
    // A stale answer is refused.
    let e = fails(
        1,
        [
            "zone",
            "verify",
            "--dns",
            "alice.example",
            "--server",
            &server,
            "--ca",
            ca.to_str().unwrap(),
            "--known-serial",
            &(zone_serial(&z) + 6).to_string(),
        ],
    );
    assert!(e.contains("older than the known serial"), "{e}");

    // One whose zone.json is cut short (a copy interrupted) is refused, not replaced from DNS:
    // it may hold revocations the answer lacks. Exit 1, as without bootstrap_dns: the copy
    // finished, a restart starts.
    // A node started with --bootstrap-dns that must fail with `code`: what it says.
    let bootstrap_fails = |code, dir: &std::path::Path| {
        let config = dir.join("node.toml");
        let config = config.to_str().unwrap();
        fails(
            code,
            ["node", "--config", config, "--bootstrap-dns", &server],
        )
    };
    let nodedir = z.join("devices/home1");
    let good = std::fs::read(nodedir.join("zone.json")).unwrap();
    let cut = &good[..good.len() / 2];
    std::fs::write(nodedir.join("zone.json"), cut).unwrap();
    let e = bootstrap_fails(1, &nodedir);
    assert!(e.contains("cannot be used"), "{e}");
    assert_eq!(std::fs::read(nodedir.join("zone.json")).unwrap(), cut);

    // A bundle made after the zone.json the gateway serves (a stale gateway, or an answer
    // replayed from before) is refused: that config does not list the device, and may trust
    // devices revoked since. Nothing is written.
    ok(["device", "add", "laptop", "--zone", zs, "--role", "node"]);
    let laptop = z.join("devices/laptop");
    std::fs::remove_file(laptop.join("zone.json")).unwrap();
    // A bundle that cannot start (its key readable by others) is refused before anything is
    // fetched or written into it.
    use std::os::unix::fs::PermissionsExt;
    let key = laptop.join("device.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = bootstrap_fails(2, &laptop);
    assert!(e.contains("chmod 600"), "{e}");
    assert!(!laptop.join("zone.json").exists());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = bootstrap_fails(1, &laptop);
    assert!(
        e.contains("does not list this device (laptop) at all") && e.contains("copy the zone"),
        "{e}"
    );
    assert!(!laptop.join("zone.json").exists());

    // A node bundle holding another zone's zone.json (an owner of two zones copied the wrong
    // one) bootstraps from DNS as one without any, and connects: it was kept as the known
    // config, and the node refused to start with it (exit 2, never restarted).
    let other = other_zone(z.parent().unwrap());
    // Its serial above this zone's: a lower one was replaced by the newer answer anyway.
    while zone_serial(&other) <= zone_serial(&z) {
        ok(["zone", "resign", "--zone", other.to_str().unwrap()]);
    }
    std::fs::copy(other.join("zone.json"), nodedir.join("zone.json")).unwrap();
    let ncfg = nodedir.join("node.toml");
    let node_admin = free_port();
    let ntext = std::fs::read_to_string(&ncfg)
        .unwrap()
        .replace("127.0.0.1:9091", &format!("127.0.0.1:{node_admin}"));
    std::fs::write(&ncfg, ntext).unwrap();
    let _node = Killed(
        Command::new(bin())
            .args([
                "node",
                "--config",
                ncfg.to_str().unwrap(),
                "--bootstrap-dns",
                &server,
            ])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let start = std::time::Instant::now();
    loop {
        let st = std::net::TcpStream::connect(("127.0.0.1", admin)).and_then(|mut s| {
            use std::io::{Read, Write};
            s.write_all(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
            let mut b = String::new();
            s.read_to_string(&mut b)?;
            Ok(b)
        });
        if st
            .as_deref()
            .is_ok_and(|b| b.contains("\"device\": \"home1\""))
        {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "node never connected: {st:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The node's own /status says when its certificate ends, what it offers and forwards.
    let node_get = |path: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", node_admin))?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )?;
        let mut b = String::new();
        s.read_to_string(&mut b)?;
        Ok::<_, std::io::Error>(b)
    };
    let node_status = node_get("/status").unwrap();
    // And its /metrics, for a scraper: its link to the gateway is up.
    let metrics = node_get("/metrics").unwrap();
    assert!(
        metrics.starts_with("HTTP/1.1 200")
            && metrics.contains("zonegate_gateway_link_state{gateway=\"gw\",state=\"up\"} 1\n")
            && metrics.contains("# TYPE zonegate_certificate_not_after_seconds gauge\n"),
        "{metrics}"
    );
    assert!(
        node_status.contains("\"cert_not_after\": \"20")
            && node_status.contains("\"services\": [")
            && node_status.contains("\"forwards\": ["),
        "{node_status}"
    );
    let written = std::fs::read_to_string(nodedir.join("zone.json")).unwrap();
    assert!(
        !written.contains("bob.example"),
        "bootstrap did not replace the other zone's zone.json"
    );
}

/// `zonegate gateway` started under a low soft open-files limit (1,024 is the common default)
/// raises it to the hard limit: past it every accept and connect fails.
#[test]
fn serving_raises_the_open_files_limit() {
    let t = tempfile::tempdir().unwrap();
    let z = zone_with_devices(t.path());
    let gwdir = z.join("devices/gw");
    std::fs::copy(z.join("zone.json"), gwdir.join("zone.json")).unwrap();
    std::fs::create_dir_all(gwdir.join("policies")).unwrap();
    let cfg = gwdir.join("gateway.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(
            "listen = \"0.0.0.0:4433\"",
            &format!("listen = \"127.0.0.1:{}\"", free_port()),
        )
        .replace(
            "admin = \"127.0.0.1:9090\"",
            &format!("admin = \"127.0.0.1:{}\"", free_port()),
        );
    std::fs::write(
        &cfg,
        format!("{text}\nhttp = \"off\"\nhttps = \"off\"\ndns = \"off\"\n"),
    )
    .unwrap();
    let limits = |pid: u32| -> Option<(String, String)> {
        let l = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
        let line = l.lines().find(|l| l.starts_with("Max open files"))?;
        let mut f = line["Max open files".len()..].split_whitespace();
        Some((f.next()?.to_owned(), f.next()?.to_owned()))
    };
    let (_, hard) = limits(std::process::id()).unwrap();
    // Raised to the hard limit, but not beyond fd_limit::MOST (2^20).
    let hard = match hard.parse::<u64>() {
        Ok(h) if h <= 1 << 20 => hard,
        _ => (1u64 << 20).to_string(),
    };
    let gw = Killed(
        Command::new("sh")
            .args([
                "-c",
                "ulimit -Sn 256 && exec \"$0\" gateway --config \"$1\"",
            ])
            .arg(bin())
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = gw.0.id();
    let start = std::time::Instant::now();
    loop {
        // Once `sh` has lowered the limit and become the gateway (its soft limit was 256).
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        let now = limits(pid);
        let gateway = exe.is_some_and(|e| e.file_name() == bin().file_name());
        if gateway && now.as_ref().is_some_and(|(soft, _)| *soft == hard) {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "the gateway's open files limit stayed {now:?} (hard limit {hard})"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A closed stderr (a service manager or a shell pipeline that went away) does not turn a
/// refused start into a panic: the exit code still says why.
#[test]
fn a_closed_stderr_keeps_the_exit_code() {
    let (reader, writer) = std::io::pipe().unwrap();
    // Writes to the pipe now fail with EPIPE (SIGPIPE is ignored in Rust programs).
    drop(reader);
    let out = Command::new(bin())
        .args(["gateway", "--config", "/nonexistent/gateway.toml"])
        .stderr(writer)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// `device add` and `device renew` never write a bundle over another zone's directory or
/// bundle, nor over another device's: add replaced another zone's CA and signed zone.json,
/// renew another device's key and certificate.
#[test]
fn bundles_are_never_written_over_another_zones_or_devices_files() {
    let t = tempfile::tempdir().unwrap();
    let z = zone_with_devices(t.path());
    let zs = z.to_str().unwrap();
    let other = t.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let os = other.to_str().unwrap();
    ok(["zone", "init", "--domain", "bob.example", "--dir", os]);
    let their_zone = std::fs::read(other.join("zone.json")).unwrap();
    // A zone directory as --out.
    let e = fails(
        2,
        [
            "device", "add", "tv", "--zone", zs, "--role", "node", "--out", os,
        ],
    );
    assert!(e.contains("is a zone directory"), "{e}");
    assert_eq!(std::fs::read(other.join("zone.json")).unwrap(), their_zone);
    // Another zone's bundle.
    ok(["device", "add", "nas", "--zone", os, "--role", "node"]);
    let theirs = other.join("devices/nas");
    let e = renew_refused(zs, "home1", &theirs);
    assert!(e.contains("another zone's bundle"), "{e}");
    // Another device's bundle of this zone.
    ok(["device", "add", "home2", "--zone", zs, "--role", "node"]);
    let before = std::fs::read(z.join("zone.json")).unwrap();
    let home2 = z.join("devices/home2");
    let key = std::fs::read(home2.join("device.key")).unwrap();
    let e = renew_refused(zs, "home1", &home2);
    assert!(e.contains("holds device home2's bundle"), "{e}");
    assert_eq!(std::fs::read(home2.join("device.key")).unwrap(), key);
    assert_eq!(std::fs::read(z.join("zone.json")).unwrap(), before);
    // The same bundle with its certificate lost: its key still says whose it is.
    std::fs::remove_file(home2.join("device.crt")).unwrap();
    let e = renew_refused(zs, "home1", &home2);
    assert!(e.contains("its device.key is not home1's"), "{e}");
    assert_eq!(std::fs::read(home2.join("device.key")).unwrap(), key);
    assert_eq!(std::fs::read(z.join("zone.json")).unwrap(), before);
    // Its own device may renew into it.
    let out = ok([
        "device",
        "renew",
        "home2",
        "--zone",
        zs,
        "--out",
        home2.to_str().unwrap(),
    ]);
    assert!(out.contains("Copy device.crt and zone.json"), "{out}");
    assert_eq!(std::fs::read(home2.join("device.key")).unwrap(), key);
}

/// `device renew NAME --zone ZS --out OUT`, refused as a usage error: its message.
fn renew_refused(zs: &str, name: &str, out: &std::path::Path) -> String {
    fails(
        2,
        [
            "device",
            "renew",
            name,
            "--zone",
            zs,
            "--out",
            out.to_str().unwrap(),
        ],
    )
}

/// A config file that is missing or saved as UTF-16 (Notepad's "Unicode") stops the start as
/// a usage error, exit 2, which the systemd units do not restart, and says what to do; it was
/// exit 1, restarted every 5 s for ever.
#[test]
fn missing_and_utf16_config_files_are_usage_errors_that_say_what_to_do() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("node.toml");
    let e = fails(2, ["node", "--config", missing.to_str().unwrap()]);
    assert!(e.contains("zonegate device add"), "{e}");

    let z = zone_with_devices(t.path());
    let gw = z.join("devices/gw/gateway.toml");
    let text = std::fs::read_to_string(&gw).unwrap();
    let utf16: Vec<u8> = [0xff, 0xfe]
        .into_iter()
        .chain(text.encode_utf16().flat_map(u16::to_le_bytes))
        .collect();
    std::fs::write(&gw, utf16).unwrap();
    let e = fails(2, ["gateway", "--config", gw.to_str().unwrap()]);
    assert!(e.contains("not UTF-8 text: save it as UTF-8"), "{e}");
}

/// A bundle is not written into an existing directory anybody may write (made in /tmp by
/// someone else, say): they could replace its files before it is installed, and the device
/// would join their zone. Nothing is added to the zone.
#[test]
fn a_bundle_is_not_written_where_anybody_may_write() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let z = zone_with_devices(t.path());
    let zs = z.to_str().unwrap();
    let open = t.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let before = std::fs::read(z.join("zone.json")).unwrap();
    let e = tv_refused_into(zs, &open);
    assert!(e.contains("anybody may write this directory"), "{e}");
    assert_eq!(std::fs::read(z.join("zone.json")).unwrap(), before);
    assert_eq!(std::fs::read_dir(&open).unwrap().count(), 0);
}

/// `device add tv --role node` into `out`, refused as a usage error: its message.
#[track_caller]
fn tv_refused_into(zone: &str, out: &std::path::Path) -> String {
    let add = [
        "device", "add", "tv", "--zone", zone, "--role", "node", "--out",
    ];
    fails(2, add.iter().copied().chain([out.to_str().unwrap()]))
}

/// Whether this test runs as root (the bundle tests below change files' owners); says it is
/// skipped otherwise.
fn as_root(test: &str) -> bool {
    let root = rustix::process::geteuid().is_root();
    if !root {
        crate::common::skip(test, "needs root to give files another owner");
    }
    root
}

/// A bundle renewed in place under sudo (where the service's user owns the directory and its
/// `device.key`) keeps that key as it was: written again, it became root's, 0600, and the
/// service could not read it at the restart the renew asks for.
#[test]
fn renewing_in_place_keeps_the_device_keys_owner() {
    use std::os::unix::fs::MetadataExt;
    if !as_root("renewing_in_place_keeps_the_device_keys_owner") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let z = zone_with_devices(t.path());
    let zs = z.to_str().unwrap();
    let bundle = z.join("devices/home1");
    let key = bundle.join("device.key");
    // As the unit's install comment says: chown -R zonegate:zonegate (nobody here).
    for f in [&bundle, &key] {
        std::os::unix::fs::chown(f, Some(65534), Some(65534)).unwrap();
    }
    let cert_before = std::fs::read(bundle.join("device.crt")).unwrap();
    ok(["device", "renew", "home1", "--zone", zs]);
    assert_ne!(
        std::fs::read(bundle.join("device.crt")).unwrap(),
        cert_before
    );
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    // A key there that others may read is written again, private.
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    ok(["device", "renew", "home1", "--zone", zs]);
    assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
}

/// Root writes a bundle into a directory its service user owns, but not into one another
/// user made where anybody may make one (/tmp): they could swap the bundle's files before it
/// is installed. Nothing is added to the zone.
#[test]
fn root_does_not_write_a_bundle_into_a_directory_another_user_made_in_tmp() {
    use std::os::unix::fs::PermissionsExt;
    if !as_root("root_does_not_write_a_bundle_into_a_directory_another_user_made_in_tmp") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let z = zone_with_devices(t.path());
    let zs = z.to_str().unwrap();
    let tmp = t.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let theirs = tmp.join("bundle");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let before = std::fs::read(z.join("zone.json")).unwrap();
    let e = tv_refused_into(zs, &theirs);
    assert!(e.contains("belongs to another user (uid 65534)"), "{e}");
    assert_eq!(std::fs::read(z.join("zone.json")).unwrap(), before);
    assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 0);
    // Below it, made or to be made: they could rename theirs/bundle away.
    let below = theirs.join("bundle");
    for out in [below.clone(), below.join("new")] {
        if out == below {
            std::fs::create_dir(&below).unwrap();
        }
        let e = tv_refused_into(zs, &out);
        assert!(e.contains("belongs to another user (uid 65534)"), "{e}");
    }
    // A directory anybody may write that is not sticky: anybody may rename what is in it.
    let open = t.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = tv_refused_into(zs, &open.join("new"));
    assert!(e.contains("may be renamed by anybody"), "{e}");
    // Reached through a link of root's own, likewise.
    let link = t.path().join("link");
    std::os::unix::fs::symlink(&open, &link).unwrap();
    let e = tv_refused_into(zs, &link.join("new"));
    assert!(e.contains("may be renamed by anybody"), "{e}");
    assert_eq!(std::fs::read(z.join("zone.json")).unwrap(), before);
    // Root's own there, and another user's where only root makes directories, are written.
    let service = t.path().join("etc-zonegate");
    std::fs::create_dir(&service).unwrap();
    std::os::unix::fs::chown(&service, Some(65534), Some(65534)).unwrap();
    ok([
        "device",
        "add",
        "tv",
        "--zone",
        zs,
        "--role",
        "node",
        "--out",
        service.to_str().unwrap(),
    ]);
    assert!(service.join("device.key").is_file());
    let own = tmp.join("roots");
    ok([
        "device",
        "add",
        "tv2",
        "--zone",
        zs,
        "--role",
        "node",
        "--out",
        own.to_str().unwrap(),
    ]);
    assert!(own.join("device.key").is_file());
}

/// A `RUST_LOG` that is not UTF-8 is said to be no filter, as one that does not parse is
/// (it was dropped without a word, and the default filter used).
#[test]
fn a_rust_log_that_is_not_utf8_is_said() {
    use std::os::unix::ffi::OsStrExt;
    let t = tempfile::tempdir().unwrap();
    let o = Command::new(crate::common::bin())
        .args(["zone", "show", "--zone"])
        .arg(t.path())
        .env("RUST_LOG", std::ffi::OsStr::from_bytes(b"debug\xff"))
        .output()
        .unwrap();
    let e = stderr(&o);
    assert!(e.contains("is not UTF-8 text, so no log filter"), "{e}");
}

/// An app on the port of one of the gateway's own `[services]` on this machine is refused
/// at start and by `policy check --gateway-config`: bound while the service was down, it
/// took the service's port, and an app leading to that service connected to itself over and
/// over. A service at another host's address takes no port here.
#[test]
fn an_app_on_a_gateway_services_port_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("policies");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("apps.toml"),
        "[app.web]\ntcp = { listen = \"0.0.0.0:8000\" }\nto = \"gw/web\"\nallow = { from = [\"public\"] }\n\
         [app.lan]\ntcp = { listen = \"0.0.0.0:8001\" }\nto = \"gw/lan\"\nallow = { from = [\"public\"] }\n",
    )
    .unwrap();
    let gw = t.path().join("gateway.toml");
    std::fs::write(
        &gw,
        "device = \"gw\"\ndomain = \"alice.example\"\nkey = \"device.key\"\ncert = \"device.crt\"\nca = \"zone-ca.crt\"\nzone_config = \"zone.json\"\nlisten = \"0.0.0.0:4433\"\npolicies = \"policies\"\n\
         [services.web]\nlocal = \"127.0.0.1:8000\"\n[services.lan]\nlocal = \"192.168.1.20:8001\"\n",
    )
    .unwrap();
    let o = zg([
        "policy",
        "check",
        dir.to_str().unwrap(),
        "--gateway-config",
        gw.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(
        out.contains("app web") && out.contains("gateway's own `[services.web]`"),
        "{out}"
    );
    assert!(!out.contains("app lan"), "{out}");

    // The gateway itself refuses to start with it (exit 2).
    let z = zone_with_devices(t.path());
    let conf = z.join("devices/gw/gateway.toml");
    let port = crate::inproc::free_tcp_port();
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(
        &conf,
        format!("{text}\n[services.web]\nlocal = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    std::fs::write(
        z.join("devices/gw/policies/web.toml"),
        format!("[app.web]\ntcp = {{ listen = \"0.0.0.0:{port}\" }}\nto = \"gw/web\"\nallow = {{ from = [\"public\"] }}\n"),
    )
    .unwrap();
    let e = fails(2, ["gateway", "--config", conf.to_str().unwrap()]);
    assert!(
        e.contains("app web") && e.contains("gateway's own `[services.web]`"),
        "{e}"
    );
}

/// A SIGHUP while a serving process starts (here a node's DNS bootstrap, waiting on a server
/// that does not answer) does not end it: SIGHUP's default ended it, which systemd counts as
/// a clean exit and does not restart. It goes on to its own end (exit 1: no zone config).
#[test]
fn a_hangup_while_starting_does_not_end_the_process() {
    use std::os::unix::process::ExitStatusExt;
    let t = tempfile::tempdir().unwrap();
    let z = zone_with_devices(t.path());
    let node = z.join("devices/home1");
    std::fs::remove_file(node.join("zone.json")).unwrap();
    // A DNS server that takes the query and never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let server = silent.local_addr().unwrap().to_string();
    let child = Command::new(crate::common::bin())
        .args(["node", "--config"])
        .arg(node.join("node.toml"))
        .args(["--bootstrap-dns", &server])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    silent
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    silent
        .recv(&mut [0u8; 512])
        .expect("the node's bootstrap query");
    let pid = child.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.wait_within(ENDS_WITHIN, "its bootstrap failed");
    assert_eq!(status.signal(), None, "ended by the signal: {status:?}");
    assert_eq!(status.code(), Some(1), "{status:?}");
}

/// What `device add` says matches what happens next: a second gateway's zone.json reaches no
/// one by itself (nodes dial only the gateways theirs lists); a config already in the bundle
/// directory is kept, said, and warned of when it is another device's; a public address
/// another gateway has is refused with a command that can be pasted as printed.
#[test]
fn device_add_says_what_happens_next() {
    let t = tempfile::tempdir().unwrap();
    let z = zone_with_devices(t.path());
    let zs = z.to_str().unwrap();
    let out = ok([
        "device",
        "add",
        "gw2",
        "--zone",
        zs,
        "--role",
        "gateway",
        "--public-addr",
        "203.0.113.11:4433",
    ]);
    assert!(
        out.contains("into a running gateway's bundle")
            && out.contains("nothing passes it on before"),
        "{out}"
    );
    let e = fails(
        2,
        [
            "device",
            "add",
            "gw3",
            "--zone",
            zs,
            "--role",
            "gateway",
            "--public-addr",
            "203.0.113.10:4433",
        ],
    );
    assert!(
        e.contains(&format!(
            "`zonegate device move gw --public-addr IP:PORT --zone {zs}`"
        )),
        "{e}"
    );
    // A directory reused after home1's key and certificate were taken out: its node.toml
    // (home1's) is kept, and said to be another device's.
    let reused = t.path().join("reused");
    ok([
        "device",
        "add",
        "home2",
        "--zone",
        zs,
        "--role",
        "node",
        "--out",
        reused.to_str().unwrap(),
    ]);
    std::fs::remove_file(reused.join("device.key")).unwrap();
    std::fs::remove_file(reused.join("device.crt")).unwrap();
    let out = ok([
        "device",
        "add",
        "home3",
        "--zone",
        zs,
        "--role",
        "node",
        "--out",
        reused.to_str().unwrap(),
    ]);
    assert!(
        out.contains("node.toml was there already and is kept as it is"),
        "{out}"
    );
    assert!(out.contains("is the config of device \"home2\""), "{out}");
    assert!(reused.join("node.toml.new").exists());
}
