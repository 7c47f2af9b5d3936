//! Generated zones for tests, examples and benchmarks (not for production use: the zone key is
//! made up on the spot and thrown away).

use time::OffsetDateTime;
use zone_core::config::trunc_now;
use zone_core::{
    DeviceEntry, DeviceName, Domain, GatewayEntry, Role, SignedZone, ZoneConfig, ZoneKey,
};

/// Domain of the generated zones.
pub const DOMAIN: &str = "alice.example";

/// A config for `alice.example` signed-ready for `key`: gateways gw1 (203.0.113.10,
/// 2001:db8::10) and gw2 (203.0.113.11), nodes home1..home`nodes`.
pub fn config(key: &ZoneKey, serial: u64, nodes: usize) -> ZoneConfig {
    let now = trunc_now(OffsetDateTime::now_utc());
    let domain = Domain::new(DOMAIN).expect("valid domain");
    let mut c = ZoneConfig::new(domain.clone(), key, now);
    c.serial = serial;
    let mut add = |name: &str, roles: Vec<Role>| {
        let name = DeviceName::new(name).expect("valid device name");
        c.devices.push(DeviceEntry {
            public_key: key.derive_device(&domain, &name).public_text(),
            name,
            roles,
            cert_serial: "01".into(),
            cert_expires_at: now + time::Duration::days(30),
        });
    };
    add("gw1", vec![Role::Gateway]);
    add("gw2", vec![Role::Gateway]);
    for i in 1..=nodes {
        add(&format!("home{i}"), vec![Role::Node]);
    }
    c.gateways.push(GatewayEntry {
        device: DeviceName::new("gw1").expect("valid"),
        addrs: vec![
            "203.0.113.10:4433".parse().expect("addr"),
            "[2001:db8::10]:4433".parse().expect("addr"),
        ],
    });
    c.gateways.push(GatewayEntry {
        device: DeviceName::new("gw2").expect("valid"),
        addrs: vec!["203.0.113.11:4433".parse().expect("addr")],
    });
    c
}

/// A fresh zone key and its zone at serial 1 with three nodes.
pub fn zone() -> (ZoneKey, SignedZone) {
    zone_with(1, |_| {})
}

/// A fresh zone key and its zone at `serial`, edited by `f` before signing.
pub fn zone_with(serial: u64, f: impl FnOnce(&mut ZoneConfig)) -> (ZoneKey, SignedZone) {
    let key = ZoneKey::generate();
    let mut c = config(&key, serial, 3);
    f(&mut c);
    let z = c.sign(&key).expect("generated zone signs");
    (key, z)
}
