//! Zone identities and the signed zone config. Pure: no tokio, no sockets.
//!
//! # Layout
//! - [`names`]: device names (DNS labels), zone domains and roles.
//! - [`keys`]: the zone key and device keys *derived* from it (HKDF), PEM files.
//! - [`cert`]: the zone CA certificate, device certificates, reading identity back from a certificate.
//! - [`config`]: the zone config (`zone.json`): devices, gateways, revocations; signing and verifying.
//! - [`txt`]: the zone config as DNS TXT strings (versioned prefix + base58, ≤255-byte chunks).
//! - [`trust`]: rustls verifiers rooted at the zone CA that also refuse revoked devices.
//! - [`zonedir`]: the owner's zone directory and device bundles on disk (atomic writes);
//!   [`seen_revocations`]: a device's record of every revocation it has seen.
//! - [`client_slots`]: open connections or handshakes per client address and IPv6 site, capped
//!   (the DNS server's and the agents' defence against one host or site taking every slot).
//!
//! # Glossary
//! - *zone*: one person's devices under one domain, vouched for by one zone key.
//! - *device*: a machine of the zone (gateway or node); its identity is its certificate.
//! - *serial*: the zone config's version number; a higher serial always wins.

pub mod cert;
pub mod client_slots;
pub mod config;
pub mod error;
pub mod keys;
pub mod names;
pub mod seen_revocations;
pub mod trust;
pub mod txt;
pub mod zonedir;

pub use cert::{DeviceCert, DeviceIdentity};
pub use config::{DeviceEntry, GatewayEntry, Revocation, SignedZone, ZoneConfig};
pub use error::ZoneError;
pub use keys::{DeviceKey, ZoneKey};
pub use names::{DeviceName, Domain, Role};
pub use trust::ZoneTrust;
