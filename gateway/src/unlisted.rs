//! Devices a policy names that the zone config does not list (an app's `to`, a rule's
//! `device:`), and services an app names that its connected device does not offer. Said, not
//! refused — zone.json may list the device later, the node may offer the service after a
//! restart, and the app then works — since otherwise an app to a misspelt device failed every
//! request as "device offline", a rule for one admitted no one, and a misspelt service passed
//! every check while each request or peer stream failed.

use std::collections::BTreeSet;

use policies::{CompiledPolicy, Listener};
use tunnel::proto::control::{ServiceInfo, ServiceProto};
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

/// Whether an app's device offers the service its `to` names, as far as is known now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// The device is not connected, or offers nothing (its node agent is stopping — a drain
    /// withdraws every service — or was started without any, which its own log says).
    Unknown,
    Offered,
    /// What to tell the owner.
    NotOffered(String),
}

/// For each app, a key naming the app and what it needs (its name, `to` and protocol: a line
/// is told once per key, not again as the device reconnects or its other services change)
/// and whether its device offers it (`services_of`: what a connected device offers, None when
/// it is not connected).
pub fn unoffered_services(
    policy: &CompiledPolicy,
    services_of: impl Fn(&str) -> Option<Vec<ServiceInfo>>,
) -> Vec<(String, Offer)> {
    let proto = |p: ServiceProto| match p {
        ServiceProto::Tcp => "TCP",
        ServiceProto::Udp => "UDP",
    };
    let mut out = Vec::new();
    for app in policy.apps() {
        let (device, service) = (&app.target.device, &app.target.service);
        let wanted = match app.listener {
            Listener::Udp(_) => ServiceProto::Udp,
            Listener::Http(_) | Listener::Tcp(_) | Listener::Mesh => ServiceProto::Tcp,
        };
        let key = format!("{} {device}/{service} {}", app.name, proto(wanted));
        let offered = services_of(device).unwrap_or_default();
        let offer = match offered.iter().find(|s| s.name == *service) {
            _ if offered.is_empty() => Offer::Unknown,
            Some(s) if s.proto == wanted => Offer::Offered,
            Some(s) => Offer::NotOffered(format!(
                "{}: app {}: its `to` names {device}/{service}, which {device} offers over {}, not {}: its requests fail; point the app at a {} service",
                app.source,
                app.name,
                proto(s.proto),
                proto(wanted),
                proto(wanted)
            )),
            None => {
                let names: Vec<&str> = offered.iter().map(|s| s.name.as_str()).collect();
                Offer::NotOffered(format!(
                    "{}: app {}: its `to` names {device}/{service}, which {device} does not offer (it offers {}): its requests fail until it does (a misspelt service? a node offers what its node.toml's [services] and --service name)",
                    app.source,
                    app.name,
                    names.join(", ")
                ))
            }
        };
        out.push((key, offer));
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

    #[test]
    fn apps_naming_services_their_device_does_not_offer_are_told() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.toml"),
            "[app.web]\nhttp = { host = \"a.example\" }\nto = \"home1/web\"\nallow = { from = [\"public\"] }\n\n\
             [app.typo]\nmesh = true\nto = \"home1/etcd-peers\"\nallow = { from = [\"device:home2\"] }\n\n\
             [app.dns]\nudp = { listen = \"0.0.0.0:5353\" }\nto = \"home1/web\"\nallow = { from = [\"public\"] }\n\n\
             [app.away]\ntcp = { listen = \"0.0.0.0:2222\" }\nto = \"home2/ssh\"\nallow = { from = [\"public\"] }\n\n\
             [app.stopping]\ntcp = { listen = \"0.0.0.0:2223\" }\nto = \"home3/ssh\"\nallow = { from = [\"public\"] }\n",
        )
        .unwrap();
        let policy = policies::check_dir(dir.path()).unwrap();
        let svc = |name: &str, proto| ServiceInfo {
            name: name.into(),
            proto,
        };
        // home1 offers web and etcd-peer over TCP; home2 is not connected; home3 offers
        // nothing (stopping).
        let all = unoffered_services(&policy, |d| match d {
            "home1" => Some(vec![
                svc("web", ServiceProto::Tcp),
                svc("etcd-peer", ServiceProto::Tcp),
            ]),
            "home3" => Some(Vec::new()),
            _ => None,
        });
        let offer = |app: &str| {
            all.iter()
                .find(|(k, _)| k.starts_with(&format!("{app} ")))
                .map(|(_, o)| o.clone())
                .unwrap()
        };
        assert_eq!(offer("web"), Offer::Offered);
        assert_eq!(offer("away"), Offer::Unknown, "not connected");
        assert_eq!(offer("stopping"), Offer::Unknown, "offers nothing");
        let told: Vec<String> = all
            .iter()
            .filter_map(|(_, o)| match o {
                Offer::NotOffered(line) => Some(line.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(told.len(), 2, "{told:?}");
        assert!(
            told.iter().any(|t| t.contains("a.toml:")
                && t.contains("app typo: its `to` names home1/etcd-peers, which home1 does not offer (it offers web, etcd-peer)")),
            "{told:?}"
        );
        assert!(
            told.iter().any(|t| t.contains(
                "app dns: its `to` names home1/web, which home1 offers over TCP, not UDP"
            )),
            "{told:?}"
        );
    }
}
