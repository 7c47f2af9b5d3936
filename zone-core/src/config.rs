//! The zone config (`zone.json`): who is in the zone, where its gateways are, who is revoked.
//! Signed by the zone key; a higher serial always replaces a lower one, never the reverse.
//!
//! The signature covers a domain-separation prefix plus the compact JSON serialization of
//! [`ZoneConfig`]. Verification re-serializes the parsed (typed, `deny_unknown_fields`) config,
//! so a file edited by hand in any way that changes a value fails, while whitespace does not.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use base64::Engine;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::ZoneError;
use crate::keys::{parse_public_text, verify, ZoneKey};
use crate::names::{DeviceName, Domain, Role};

/// Version of the zone config format.
pub const FORMAT: u32 = 1;
/// Domain separation: a zone-config signature can never be mistaken for another message.
const SIGNING_CONTEXT: &[u8] = b"zonegate-zone-config-v1\n";
/// How long a signed zone config stays valid by default; re-signing (any change) renews it.
pub const DEFAULT_VALID_DAYS: i64 = 365;
/// Largest zone.json we accept: far above any real zone (hundreds of devices), far below memory trouble.
pub const MAX_ZONE_JSON: usize = 256 * 1024;
/// Largest zone config (compact JSON) a change may grow it to: the zone's DNS serves it as
/// TXT chunks in one answer (a 64 KiB message over TCP holds about 42 KiB of it), and devices
/// carry it in tunnel control messages (60 KiB at most, the most they adopt). Commands that
/// would grow a zone past it are refused ([`crate::zonedir`]).
pub const MAX_SHARED_ZONE_JSON: usize = 40 * 1024;
/// Largest zone config a revocation by name alone (`device revoke --force` of a device this
/// zone directory does not list) may grow it to: past [`MAX_SHARED_ZONE_JSON`] (the DNS
/// answer's room), within what tunnel control messages carry (60 KiB), so that a full zone
/// can still revoke a stolen device.
pub const MAX_REVOKING_ZONE_JSON: usize = 56 * 1024;
/// Characters of a zone.json parse error's message kept from its start and from its end.
const QUOTED_HEAD: usize = 200;
const QUOTED_TAIL: usize = 60;

/// A gateway of the zone and the public addresses agents dial.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayEntry {
    pub device: DeviceName,
    pub addrs: Vec<SocketAddr>,
}

/// A device of the zone as the owner issued it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    pub name: DeviceName,
    /// `ed25519:BASE58`
    pub public_key: String,
    pub roles: Vec<Role>,
    /// Serial (hex) of the newest certificate issued to it.
    pub cert_serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub cert_expires_at: OffsetDateTime,
}

/// A revoked device: every certificate with that name is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    pub device: DeviceName,
    #[serde(with = "time::serde::rfc3339")]
    pub revoked_at: OffsetDateTime,
    /// Serials of certificates known to have been issued to it (for audit; the name decides).
    pub cert_serials: Vec<String>,
}

/// The signed content of zone.json.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    pub format: u32,
    pub domain: Domain,
    /// The zone public key, `ed25519:BASE58`; must match the pinned zone CA.
    pub zone_key: String,
    pub serial: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    pub gateways: Vec<GatewayEntry>,
    pub devices: Vec<DeviceEntry>,
    pub revoked: Vec<Revocation>,
}

/// zone.json as stored and published: the config and the zone key's signature over it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedZone {
    pub config: ZoneConfig,
    /// base64 (standard, padded) ed25519 signature.
    pub signature: String,
}

/// Whole seconds, UTC: what survives an RFC 3339 round trip unchanged.
pub fn trunc_now(t: OffsetDateTime) -> OffsetDateTime {
    t.to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .expect("0 is a valid nanosecond")
}

impl ZoneConfig {
    /// A new zone's config: serial 1, no devices yet.
    pub fn new(domain: Domain, zone: &ZoneKey, now: OffsetDateTime) -> Self {
        let now = trunc_now(now);
        ZoneConfig {
            format: FORMAT,
            domain,
            zone_key: zone.public_text(),
            serial: 1,
            issued_at: now,
            expires_at: now + time::Duration::days(DEFAULT_VALID_DAYS),
            gateways: Vec::new(),
            devices: Vec::new(),
            revoked: Vec::new(),
        }
    }

    fn signing_bytes(&self) -> Vec<u8> {
        let mut v = SIGNING_CONTEXT.to_vec();
        // Serializing plain structs of strings/ints/vecs cannot fail.
        v.extend(serde_json::to_vec(self).expect("zone config serializes"));
        v
    }

    pub fn device(&self, name: &DeviceName) -> Option<&DeviceEntry> {
        self.devices.iter().find(|d| &d.name == name)
    }

    pub fn is_revoked(&self, name: &DeviceName) -> bool {
        self.revoked.iter().any(|r| &r.device == name)
    }

    /// Gateway addresses, in config order.
    pub fn gateway_addrs(&self) -> Vec<(DeviceName, SocketAddr)> {
        self.gateways
            .iter()
            .flat_map(|g| g.addrs.iter().map(|a| (g.device.clone(), *a)))
            .collect()
    }

    /// Internal consistency: a signed config that breaks these is refused anyway.
    fn check_consistency(&self) -> Result<(), ZoneError> {
        let bad = |m: String| Err(ZoneError::Config(m));
        if self.format != FORMAT {
            return bad(format!(
                "format {} is not supported (this zonegate reads format {FORMAT}); upgrade zonegate",
                self.format
            ));
        }
        let mut names = BTreeSet::new();
        for d in &self.devices {
            if !names.insert(&d.name) {
                return bad(format!("device {} listed twice", d.name));
            }
            parse_public_text(&d.public_key)?;
        }
        // A revoked name listed as a device would be refused by the TLS checks yet trusted by
        // whatever reads the device list alone (the end-to-end keys of the mesh).
        if let Some(r) = self.revoked.iter().find(|r| names.contains(&r.device)) {
            return bad(format!("device {} is listed and revoked at once", r.device));
        }
        for g in &self.gateways {
            match self.device(&g.device) {
                Some(d) if d.roles.contains(&Role::Gateway) => {}
                _ => {
                    return bad(format!(
                        "gateway {} is not a device with role gateway",
                        g.device
                    ))
                }
            }
        }
        if self.expires_at <= self.issued_at {
            return bad("expires before it was issued".into());
        }
        Ok(())
    }

    /// Signs the config with the zone key.
    pub fn sign(self, zone: &ZoneKey) -> Result<SignedZone, ZoneError> {
        if self.zone_key != zone.public_text() {
            return Err(ZoneError::ForeignZone {
                expected: zone.public_text(),
                found: self.zone_key,
            });
        }
        self.check_consistency()?;
        let sig = zone.sign(&self.signing_bytes());
        Ok(SignedZone {
            config: self,
            signature: base64::engine::general_purpose::STANDARD.encode(sig),
        })
    }

    /// Refuses a config that leaves out a revocation `older` holds. A revoked name never
    /// comes back (the zone directory refuses it), but a directory restored from a backup,
    /// or a copy on another machine, signs configs with higher serials that never saw the
    /// revocation: adopting one put a stolen device's still-valid certificate back in.
    pub fn keeps_revocations_of(&self, older: &ZoneConfig) -> Result<(), ZoneError> {
        let dropped: Vec<&str> = older
            .revoked
            .iter()
            .filter(|r| !self.revoked.iter().any(|n| n.device == r.device))
            .map(|r| r.device.as_str())
            .collect();
        if dropped.is_empty() {
            return Ok(());
        }
        Err(ZoneError::DropsRevocations {
            serial: self.serial,
            known: older.serial,
            devices: dropped.join(", "),
        })
    }
}

/// What verification found worth telling beyond "valid".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified<'a> {
    pub config: &'a ZoneConfig,
    pub revoked: Vec<&'a DeviceName>,
}

impl SignedZone {
    /// Parses zone.json bytes (size-bounded, strict schema).
    pub fn from_json(bytes: &[u8]) -> Result<Self, ZoneError> {
        if bytes.len() > MAX_ZONE_JSON {
            return Err(ZoneError::Config(format!(
                "{} bytes is larger than the {MAX_ZONE_JSON}-byte limit",
                bytes.len()
            )));
        }
        // serde's message quotes what it found (an unknown field's name, a bad value): from a
        // DNS answer or a peer, unsigned as yet. Its control characters are escaped, as the
        // log does: a node's last `error:` line goes to stderr as it is, and a newline there
        // forged a line of the journal, an escape sequence took over a terminal.
        // It may quote a whole field (a 60 KB name or value): cut to its start and its end
        // (where serde says the line and column), or each refused offer logged tens of KB.
        serde_json::from_slice(bytes).map_err(|e| {
            let message = e.to_string();
            let n = message.chars().count();
            let mut text = String::new();
            for (i, c) in message.chars().enumerate() {
                if i == QUOTED_HEAD && n > QUOTED_HEAD + QUOTED_TAIL {
                    text.push_str(" … ");
                }
                if i >= QUOTED_HEAD && i < n.saturating_sub(QUOTED_TAIL) {
                    continue;
                }
                if c.is_control() {
                    text.extend(c.escape_default());
                } else {
                    text.push(c);
                }
            }
            ZoneError::Config(format!("not a valid zone.json: {text}"))
        })
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("zone config serializes") + "\n"
    }

    pub fn to_json_compact(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("zone config serializes")
    }

    /// Verifies signature, zone key and expiry against the pinned zone key.
    pub fn verify(
        &self,
        zone_key: &VerifyingKey,
        now: OffsetDateTime,
    ) -> Result<Verified<'_>, ZoneError> {
        let claimed = parse_public_text(&self.config.zone_key)?;
        if &claimed != zone_key {
            return Err(ZoneError::ForeignZone {
                expected: crate::keys::public_text(zone_key),
                found: self.config.zone_key.clone(),
            });
        }
        let sig = base64::engine::general_purpose::STANDARD
            .decode(&self.signature)
            .map_err(|_| ZoneError::BadSignature)?;
        if !verify(zone_key, &self.config.signing_bytes(), &sig) {
            return Err(ZoneError::BadSignature);
        }
        self.config.check_consistency()?;
        if now >= self.config.expires_at {
            return Err(ZoneError::Expired(
                self.config
                    .expires_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
            ));
        }
        Ok(Verified {
            config: &self.config,
            revoked: self.config.revoked.iter().map(|r| &r.device).collect(),
        })
    }

    /// Verifies and also refuses to go back from a known serial.
    pub fn verify_newer_than(
        &self,
        zone_key: &VerifyingKey,
        now: OffsetDateTime,
        known_serial: Option<u64>,
    ) -> Result<Verified<'_>, ZoneError> {
        let v = self.verify(zone_key, now)?;
        if let Some(known) = known_serial {
            if self.config.serial < known {
                return Err(ZoneError::StaleSerial {
                    offered: self.config.serial,
                    known,
                });
            }
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    /// What serde quotes from an unsigned zone.json (an unknown field's name here) reaches a
    /// node's last `error:` line: its control characters come escaped.
    #[test]
    fn a_parse_error_quotes_no_control_characters() {
        let forged = br#"{"\nerror: forged line\u001b[2J": 1}"#;
        let e = SignedZone::from_json(forged).unwrap_err().to_string();
        assert!(!e.chars().any(char::is_control), "{e:?}");
        assert!(e.contains("\\nerror: forged line\\u{1b}[2J"), "{e}");
    }

    /// An error quoting a 60 KB field name keeps its start and its end (the line and column).
    #[test]
    fn a_parse_error_quotes_a_long_field_cut() {
        let forged = format!(r#"{{"{}": 1}}"#, "x".repeat(60_000));
        let e = SignedZone::from_json(forged.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.len() < 400, "{} bytes", e.len());
        assert!(e.contains("unknown field `xxx") && e.contains(" … "), "{e}");
        assert!(e.ends_with("at line 1 column 60003"), "{e}");
    }

    use super::*;

    fn signed(zone: &ZoneKey) -> SignedZone {
        let now = OffsetDateTime::now_utc();
        let mut c = ZoneConfig::new(Domain::new("alice.example").unwrap(), zone, now);
        c.devices.push(DeviceEntry {
            name: DeviceName::new("gw").unwrap(),
            public_key: zone.public_text(),
            roles: vec![Role::Gateway],
            cert_serial: "01".into(),
            cert_expires_at: trunc_now(now),
        });
        c.gateways.push(GatewayEntry {
            device: DeviceName::new("gw").unwrap(),
            addrs: vec!["203.0.113.10:4433".parse().unwrap()],
        });
        c.sign(zone).unwrap()
    }

    #[test]
    fn sign_verify_round_trip_through_json() {
        let z = ZoneKey::generate();
        let s = signed(&z);
        let back = SignedZone::from_json(s.to_json_pretty().as_bytes()).unwrap();
        back.verify(&z.verifying_key(), OffsetDateTime::now_utc())
            .unwrap();
    }

    #[test]
    fn a_device_both_listed_and_revoked_is_refused() {
        let z = ZoneKey::generate();
        let mut c = signed(&z).config;
        c.revoked.push(Revocation {
            device: DeviceName::new("gw").unwrap(),
            revoked_at: c.issued_at,
            cert_serials: Vec::new(),
        });
        let e = c.sign(&z).unwrap_err().to_string();
        assert!(e.contains("listed and revoked at once"), "{e}");
    }

    #[test]
    fn tamper_is_refused() {
        let z = ZoneKey::generate();
        let s = signed(&z);
        let json = s.to_json_pretty();
        let tampered = json.replace("203.0.113.10", "198.51.100.1");
        assert_ne!(tampered, json);
        let t = SignedZone::from_json(tampered.as_bytes()).unwrap();
        assert!(matches!(
            t.verify(&z.verifying_key(), OffsetDateTime::now_utc()),
            Err(ZoneError::BadSignature)
        ));
        // Unknown fields are refused outright.
        let extra = json.replacen("\"serial\"", "\"extra\": 1, \"serial\"", 1);
        assert!(SignedZone::from_json(extra.as_bytes()).is_err());
        // Truncated.
        assert!(SignedZone::from_json(&json.as_bytes()[..json.len() / 2]).is_err());
    }

    #[test]
    fn other_zone_key_and_expiry_and_serial() {
        let z = ZoneKey::generate();
        let other = ZoneKey::generate();
        let s = signed(&z);
        assert!(matches!(
            s.verify(&other.verifying_key(), OffsetDateTime::now_utc()),
            Err(ZoneError::ForeignZone { .. })
        ));
        let later = OffsetDateTime::now_utc() + time::Duration::days(DEFAULT_VALID_DAYS + 1);
        assert!(matches!(
            s.verify(&z.verifying_key(), later),
            Err(ZoneError::Expired(_))
        ));
        let now = OffsetDateTime::now_utc();
        assert!(s
            .verify_newer_than(&z.verifying_key(), now, Some(1))
            .is_ok());
        assert!(matches!(
            s.verify_newer_than(&z.verifying_key(), now, Some(2)),
            Err(ZoneError::StaleSerial {
                offered: 1,
                known: 2
            })
        ));
    }
}
