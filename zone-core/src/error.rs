//! Typed errors of zone-core: each says what is wrong and, where it helps, what to do.

use std::path::PathBuf;

/// Everything that can go wrong with identities, zone configs and zone directories.
#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    #[error("invalid device name {name:?}: {why} (use 1-63 characters a-z, 0-9 and '-', not starting or ending with '-')")]
    BadName { name: String, why: &'static str },
    #[error("invalid zone domain {domain:?}: {why}")]
    BadDomain { domain: String, why: &'static str },
    #[error("unknown role {0:?} (roles are: gateway, node)")]
    BadRole(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A zone key others may read, a zone directory others may write: refused until its
    /// mode is mended (it is not invalid: "not a valid zone key" sent owners looking at
    /// its contents).
    #[error("{path}: the {what} is not private enough: {why}")]
    NotPrivate {
        path: PathBuf,
        what: &'static str,
        why: String,
    },
    #[error("{path}: not a valid {what}: {why}")]
    BadFile {
        path: PathBuf,
        what: &'static str,
        why: String,
    },
    #[error("key: {0}")]
    Key(String),
    #[error("certificate: {0}")]
    Cert(String),
    #[error("zone config: {0}")]
    Config(String),
    #[error("zone config signature does not verify: the file was changed after signing or was signed by another zone key (a copied file: copy the zone directory's zone.json again)")]
    BadSignature,
    #[error("zone config is for zone key {found}, but the pinned zone CA has key {expected}: this is another zone's config")]
    ForeignZone { expected: String, found: String },
    #[error("zone config expired at {0}: re-sign it with `zonegate zone resign --zone DIR` (or, if it should not have yet, set this machine's clock right)")]
    Expired(String),
    #[error(
        "zone config serial {offered} is older than the known serial {known}: refusing to go back"
    )]
    StaleSerial { offered: u64, known: u64 },
    #[error("zone config serial {serial} leaves out the revocation of {devices}, which serial {known} holds: revocations are for good, so it is refused. It was probably signed from an older copy of the zone directory (a backup, another machine): in that directory run `zonegate device revoke NAME --zone DIR` for each again (one it does not list: add --force), then publish the new zone.json")]
    DropsRevocations {
        serial: u64,
        known: u64,
        devices: String,
    },
    #[error("TXT record: {0}")]
    Txt(String),
    #[error("zone directory {0}: no zone here (create one with `zonegate zone init --domain DOMAIN --dir DIR`)")]
    NoZone(PathBuf),
    #[error("zone directory {0}: {1} but no zone.key. A device's bundle holds zone-ca.crt and zone.json and never the zone key: give the zone directory itself (--zone). If this is it, restore zone.key from your backup: without it the zone cannot change (a new `zone init` makes another zone, which no device trusts)")]
    NoZoneKey(PathBuf, &'static str),
    #[error(
        "zone directory {0} already holds a zone: refusing to overwrite it (choose another --dir)"
    )]
    ZoneExists(PathBuf),
    #[error("zone directory {0}: holds zone.key and zone.json but not zone-ca.crt, a file lost since (`zone init` writes it before zone.json): copy zone-ca.crt from any device's bundle into it (it is checked against the zone key)")]
    LostCa(PathBuf),
    #[error("zone directory {dir}: holds {have} but not {missing}: a `zone init` interrupted half way (no device can have this zone yet: move the directory away and run `zone init` again), or a file lost since (every bundle holds zone-ca.crt and a zone.json: restore zone.json from the one with the highest serial, a running gateway's (its /status says it) — an older copy brings revoked devices back)")]
    IncompleteZone {
        dir: PathBuf,
        have: &'static str,
        missing: &'static str,
    },
    #[error("device {0:?} already exists in this zone (see `zonegate device list`; `renew` re-issues its certificate, and writes its bundle again where `--out` says: the way to finish an add whose bundle was never written)")]
    DeviceExists(String),
    #[error("device {0:?} is not in this zone (see `zonegate device list`)")]
    NoSuchDevice(String),
    #[error("device {0:?} is revoked: a revoked name cannot come back, choose a new name")]
    DeviceRevoked(String),
    #[error("{0}")]
    Usage(String),
    /// Another command changed the zone directory meanwhile: running this one again works.
    #[error("{0}")]
    Concurrent(String),
}

impl ZoneError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ZoneError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = ZoneError> = std::result::Result<T, E>;
