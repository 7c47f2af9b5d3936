//! Device names, zone domains and roles: validated once, then carried as types.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ZoneError;

/// Longest DNS label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;
/// Longest domain name in text form (RFC 1035 §2.3.4, 255 octets on the wire).
pub const MAX_DOMAIN_LEN: usize = 253;
/// Longest zone domain: its DNS zone names `hostmaster.DOMAIN` (the SOA's contact) and
/// `_zonegate.DOMAIN`, which must fit [`MAX_DOMAIN_LEN`] too.
pub const MAX_ZONE_DOMAIN_LEN: usize = MAX_DOMAIN_LEN - "hostmaster.".len();

fn label_problem(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        return Some("empty");
    }
    if s.len() > MAX_LABEL_LEN {
        return Some("longer than 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Some("only lowercase a-z, 0-9 and '-' are allowed");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Some("must not start or end with '-'");
    }
    None
}

/// A device name: one DNS label, so that `NAME.DOMAIN` is a valid host name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceName(String);

impl DeviceName {
    pub fn new(s: &str) -> Result<Self, ZoneError> {
        match label_problem(s) {
            None => Ok(DeviceName(s.to_owned())),
            Some(why) => Err(ZoneError::BadName {
                name: s.to_owned(),
                why,
            }),
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DeviceName {
    type Error = ZoneError;
    fn try_from(s: String) -> Result<Self, ZoneError> {
        DeviceName::new(&s)
    }
}
impl From<DeviceName> for String {
    fn from(n: DeviceName) -> String {
        n.0
    }
}
impl FromStr for DeviceName {
    type Err = ZoneError;
    fn from_str(s: &str) -> Result<Self, ZoneError> {
        DeviceName::new(s)
    }
}
impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

/// A zone domain such as `alice.example`: at least two labels, lowercase, no trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Domain(String);

impl Domain {
    pub fn new(s: &str) -> Result<Self, ZoneError> {
        let bad = |why| ZoneError::BadDomain {
            domain: s.to_owned(),
            why,
        };
        let d = s.strip_suffix('.').unwrap_or(s);
        if d.len() > MAX_DOMAIN_LEN {
            return Err(bad("longer than 253 characters"));
        }
        if d.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad("use lowercase letters"));
        }
        let labels: Vec<&str> = d.split('.').collect();
        if labels.len() < 2 {
            return Err(bad("needs at least two labels, like alice.example"));
        }
        for l in labels {
            if let Some(why) = label_problem(l) {
                return Err(bad(why));
            }
        }
        Ok(Domain(d.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// Whether it can be a new zone's domain: its DNS names, `hostmaster.DOMAIN` among
    /// them, must fit [`MAX_DOMAIN_LEN`] (checked at `zone init` only: zones made before
    /// still load).
    pub fn check_new_zone(&self) -> Result<(), ZoneError> {
        // TLS (rustls) refuses a server name whose last label is all digits, as an IP address
        // written as a name: every device's dial to gw.203.0.113.10 failed, for ever.
        if self
            .0
            .rsplit('.')
            .next()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(ZoneError::BadDomain {
                domain: self.0.clone(),
                why: "its last label is all digits: a zone needs a DNS domain name (one you own, or a free one such as a duckdns.org name), not an IP address",
            });
        }
        if self.0.len() > MAX_ZONE_DOMAIN_LEN {
            return Err(ZoneError::BadDomain {
                domain: self.0.clone(),
                why: "longer than 242 characters (the zone's DNS names, hostmaster.DOMAIN among them, must fit 253)",
            });
        }
        Ok(())
    }

    /// Whether `NAME.DOMAIN` of `device` fits a DNS name ([`MAX_DOMAIN_LEN`]).
    pub fn fits(&self, device: &DeviceName) -> bool {
        device.as_str().len() + 1 + self.0.len() <= MAX_DOMAIN_LEN
    }

    /// The host name of a device of this zone: `NAME.DOMAIN`.
    pub fn host_of(&self, device: &DeviceName) -> String {
        format!("{}.{}", device, self.0)
    }
}

impl TryFrom<String> for Domain {
    type Error = ZoneError;
    fn try_from(s: String) -> Result<Self, ZoneError> {
        Domain::new(&s)
    }
}
impl From<Domain> for String {
    fn from(d: Domain) -> String {
        d.0
    }
}
impl FromStr for Domain {
    type Err = ZoneError;
    fn from_str(s: &str) -> Result<Self, ZoneError> {
        Domain::new(s)
    }
}
impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

/// What a device does in the zone. A device may hold several roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Public gateway: accepts agents, terminates public traffic, relays.
    Gateway,
    /// Node agent: usually behind NAT, offers services to the zone.
    Node,
}

impl Role {
    pub const ALL: [Role; 2] = [Role::Gateway, Role::Node];
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Node => "node",
        }
    }
}

impl FromStr for Role {
    type Err = ZoneError;
    fn from_str(s: &str) -> Result<Self, ZoneError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| ZoneError::BadRole(s.to_owned()))
    }
}
impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert!(DeviceName::new("home1").is_ok());
        assert!(DeviceName::new("a-b").is_ok());
        for bad in ["", "-a", "a-", "Home", "a_b", "a.b", &"x".repeat(64)] {
            assert!(DeviceName::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn domains() {
        assert_eq!(
            Domain::new("alice.example.").unwrap().as_str(),
            "alice.example"
        );
        for bad in ["example", "Alice.example", "a..b", "-a.b", "a b.c"] {
            assert!(Domain::new(bad).is_err(), "{bad:?} accepted");
        }
        // An IP address is no zone domain (checked for new zones: one made before still loads).
        let ip = Domain::new("203.0.113.10").expect("loads");
        let e = ip.check_new_zone().unwrap_err().to_string();
        assert!(e.contains("not an IP address"), "{e}");
        // Digits elsewhere are fine.
        assert!(Domain::new("10.home.example")
            .unwrap()
            .check_new_zone()
            .is_ok());
    }

    #[test]
    fn roles() {
        assert_eq!("gateway".parse::<Role>().unwrap(), Role::Gateway);
        assert!("admin".parse::<Role>().is_err());
    }
}
