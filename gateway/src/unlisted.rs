//! Devices a policy names that the zone config does not list: an app's `to`, a rule's
//! `device:`. Said, not refused — zone.json may list them later (a device added after the
//! policy was written), and the app then works — since otherwise an app to a misspelt device
//! failed every request as "device offline", and a rule for one admitted no one, unexplained.

use std::collections::BTreeSet;

use policies::CompiledPolicy;
use zone_core::{DeviceName, ZoneConfig};

/// Why a device name is not in the zone config.
enum Absent {
    /// For good: adding it again is refused.
    Revoked,
    /// Never added (or misspelt).
    NotAdded,
}

/// One line per unlisted device an app names (its place in the policy files first). No
/// serial in them: a caller telling each line once would tell them all again at every new
/// zone config.
pub fn unlisted_devices(policy: &CompiledPolicy, zone: &ZoneConfig) -> Vec<String> {
    let absent = |d: &str| match DeviceName::new(d) {
        Ok(n) if zone.device(&n).is_some() => None,
        Ok(n) if zone.is_revoked(&n) => Some(Absent::Revoked),
        _ => Some(Absent::NotAdded),
    };
    let mut out = Vec::new();
    for app in policy.apps() {
        let to = &app.target.device;
        match absent(to) {
            None => {}
            Some(Absent::Revoked) => out.push(format!(
                "{}: app {}: its `to` names device {to}, which is revoked: its requests fail for good; point the app at another device or remove it",
                app.source, app.name
            )),
            Some(Absent::NotAdded) => out.push(format!(
                "{}: app {}: its `to` names device {to}, which the zone config does not list: its requests fail until it does (a misspelt name? else add the device with `zonegate device add {to} --zone DIR` and copy the new zone.json into this gateway's bundle)",
                app.source, app.name
            )),
        }
        let from: BTreeSet<&str> = app
            .rules
            .iter()
            .flat_map(|r| r.from.devices.iter().map(String::as_str))
            .collect();
        for d in from {
            match absent(d) {
                None => {}
                Some(Absent::Revoked) => out.push(format!(
                    "{}: app {}: its `from` names device:{d}, which is revoked: it admits that device no more; take it out",
                    app.source, app.name
                )),
                Some(Absent::NotAdded) => out.push(format!(
                    "{}: app {}: its `from` names device:{d}, which the zone config does not list: it admits no device until it does (a misspelt name?)",
                    app.source, app.name
                )),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apps_naming_devices_the_zone_lacks_are_told() {
        // gw1, gw2, home1, home2; home3 revoked.
        let mut zone = name_resolver::testzone::config(&zone_core::ZoneKey::generate(), 1, 2);
        zone.revoked.push(zone_core::Revocation {
            device: DeviceName::new("home3").unwrap(),
            revoked_at: zone.issued_at,
            cert_serials: Vec::new(),
        });
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.toml"),
            "[app.web]\nhttp = { host = \"a.example\" }\nto = \"home1/web\"\nallow = { from = [\"public\"] }\n\n\
             [app.ghost]\nhttp = { host = \"b.example\" }\nto = \"home9/web\"\nallow = { from = [\"public\"] }\n\n\
             [app.peers]\nmesh = true\nto = \"home2/etcd\"\nallow = { from = [\"device:home1\", \"device:hom1\", \"role:gateway\"] }\n\n\
             [app.stolen]\nmesh = true\nto = \"home3/etcd\"\nallow = { from = [\"device:home3\"] }\n",
        )
        .unwrap();
        let policy = policies::check_dir(dir.path()).unwrap();
        let told = unlisted_devices(&policy, &zone);
        assert_eq!(told.len(), 4, "{told:?}");
        assert!(
            told.iter()
                .any(|t| t.contains("app stolen: its `to` names device home3, which is revoked")),
            "{told:?}"
        );
        assert!(
            told.iter()
                .any(|t| t.contains("app stolen: its `from` names device:home3, which is revoked")),
            "{told:?}"
        );
        // No serial: told once, not again at each new zone config.
        assert!(told.iter().all(|t| !t.contains("serial")), "{told:?}");
        assert!(
            told.iter()
                .any(|t| t.contains("a.toml:")
                    && t.contains("app ghost: its `to` names device home9")),
            "{told:?}"
        );
        assert!(
            told.iter()
                .any(|t| t.contains("app peers: its `from` names device:hom1,")),
            "{told:?}"
        );
    }
}
