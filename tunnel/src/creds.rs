//! A device's credentials as loaded from its bundle: key, certificate, zone CA, and the newest
//! verified zone config it knows (which can be replaced at run time by a newer one).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use zone_core::seen_revocations;
use zone_core::zonedir::{read_cert_der, read_zone_json, rfc3339};
use zone_core::{cert, DeviceIdentity, DeviceKey, DeviceName, Domain, SignedZone, ZoneTrust};

use crate::error::TunnelError;
use crate::proto::limits::MAX_ZONE_CONFIG;

/// Where a device's bundle files are.
#[derive(Debug, Clone)]
pub struct BundlePaths {
    pub key: PathBuf,
    pub cert: PathBuf,
    pub ca: PathBuf,
    pub zone_config: PathBuf,
}

/// Loaded, cross-checked credentials of this device.
#[derive(Debug)]
pub struct DeviceCreds {
    /// Who this device is (name, zone, roles, key) as its certificate at the start said; a
    /// renewed certificate must say the same ([`DeviceCreds::renew_cert`]). Its `not_after` is
    /// the first certificate's: [`DeviceCreds::cert_not_after`] tells the one in use.
    pub identity: DeviceIdentity,
    /// The certificate handshakes present, swapped by a renewal (the TLS configurations read
    /// it at every handshake: [`crate::tls`]).
    cert: Arc<arc_swap::ArcSwap<OwnCert>>,
    key_pkcs8: zeroize::Zeroizing<Vec<u8>>,
    /// X25519 form of the device key: the Noise static key of the mesh (see [`crate::e2e`]).
    noise_secret: zeroize::Zeroizing<[u8; 32]>,
    pub trust: Arc<ZoneTrust>,
    zone_key: ed25519_dalek::VerifyingKey,
    /// Shared with the set-asides in the blocking pool, which write back the config in use at
    /// the time they write, not the one of when they were spawned.
    zone: Arc<RwLock<Arc<SignedZone>>>,
    zone_path: Option<PathBuf>,
    /// The bundle's device.crt, watched for a renewal ([`DeviceCreds::cert_file_changed`]).
    cert_path: Option<PathBuf>,
    /// Held while a newer zone.json is written back: offers arrive at once from agents, peers
    /// and the bundle poll, and two writes must not interleave (nor an older one land last).
    saving: Arc<std::sync::Mutex<()>>,
    /// Saves of adopted configs under way in the blocking pool ([`DeviceCreds::saved`]).
    saves: tokio_util::task::TaskTracker,
    /// Refused zone.json files being set aside there (apart from `saves`: a save pending
    /// means the file will be replaced anyway; a set-aside does not).
    asides: tokio_util::task::TaskTracker,
    /// Records of revocations learned from configs not adopted (apart from `saves`: they
    /// write no zone.json, so a file copied in meanwhile is not replaced by them).
    records: tokio_util::task::TaskTracker,
}

/// This device's certificate as handshakes present it.
#[derive(Debug)]
pub struct OwnCert {
    pub der: CertificateDer<'static>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// The certificate with the device's signing key, as rustls serves it.
    pub certified: Arc<rustls::sign::CertifiedKey>,
}

impl OwnCert {
    fn new(
        der: CertificateDer<'static>,
        id: &DeviceIdentity,
        key: &PrivateKeyDer<'static>,
        trust: &ZoneTrust,
    ) -> Result<Self, TunnelError> {
        let signer = trust
            .crypto()
            .key_provider
            .load_private_key(key.clone_key())?;
        Ok(OwnCert {
            certified: Arc::new(rustls::sign::CertifiedKey::new(vec![der.clone()], signer)),
            der,
            not_before: id.not_before,
            not_after: id.not_after,
        })
    }
}

fn bad(path: &Path, what: &str, e: impl std::fmt::Display) -> TunnelError {
    TunnelError::Config(format!("{}: {what}: {e}", path.display()))
}

/// A device key others on this machine may read is refused: with it they could act as this
/// device and read its mesh traffic (its Noise key derives from it). A group may read it (a
/// root-owned key the service's group reads, as TLS keys often are).
fn private_to_its_owner(path: &Path) -> Result<(), TunnelError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = match std::fs::metadata(path) {
        Ok(m) if m.is_file() => m.permissions().mode(),
        // Said by the read that follows, with its own words (a directory: "Is a directory",
        // not "others may read it").
        _ => return Ok(()),
    };
    if mode & 0o007 != 0 {
        return Err(unrunnable(
            path,
            "device key",
            format!(
                "others may read it (mode {:o}): anyone on this machine could act as this device; run `chmod 600 {}`",
                mode & 0o777,
                path.display()
            ),
        ));
    }
    Ok(())
}

/// As [`bad`], for what a restart cannot mend ([`TunnelError::Unrunnable`]).
fn unrunnable(path: &Path, what: &str, e: impl std::fmt::Display) -> TunnelError {
    TunnelError::Unrunnable(format!("{}: {what}: {e}", path.display()))
}

/// A bundle's key, certificate and zone CA, checked against each other (everything of
/// [`DeviceCreds::load`] but zone.json).
struct Identity {
    key: DeviceKey,
    cert_der: CertificateDer<'static>,
    identity: DeviceIdentity,
    zone_key: ed25519_dalek::VerifyingKey,
    trust: Arc<ZoneTrust>,
}

impl Identity {
    fn load(p: &BundlePaths, expect_device: Option<&DeviceName>) -> Result<Self, TunnelError> {
        private_to_its_owner(&p.key)?;
        let key_pem = zeroize::Zeroizing::new(
            std::fs::read_to_string(&p.key)
                .map_err(|e| bad(&p.key, "cannot read device key", e))?,
        );
        let key = DeviceKey::from_pem(&key_pem).map_err(|e| bad(&p.key, "not a device key", e))?;
        let cert_der = read_cert_der(&p.cert)?;
        let identity = DeviceIdentity::from_der(&cert_der)
            .map_err(|e| bad(&p.cert, "not a zonegate device certificate", e))?;
        // Another device's certificate first, key or not: no restart mends it (a copy of
        // another bundle's device.crt alone exited 1, retried for ever, and never said whose).
        if let Some(d) = expect_device {
            if &identity.name != d {
                return Err(unrunnable(
                    &p.cert,
                    "certificate is for another device",
                    format!("{} (config says {d})", identity.name),
                ));
            }
        }
        if &identity.public_key != key.verifying_key().as_bytes() {
            return Err(bad(
                &p.key,
                "key does not belong to the certificate",
                format!(
                    "{} is device {}'s certificate and this is not its key: copy both files from that device's bundle",
                    p.cert.display(),
                    identity.name
                ),
            ));
        }
        let ca_der = read_cert_der(&p.ca)?;
        // Not the zone's CA (a device's certificate given for it): no restart mends it.
        let zone_key = cert::ca_public_key(&ca_der)
            .map_err(|e| unrunnable(&p.ca, "the zone CA certificate (`ca`)", e))?;
        let trust = ZoneTrust::new(identity.domain.clone(), ca_der)?;
        // Our own certificate must pass our own trust: catches a bundle mixed from two zones
        // and an expired certificate before any peer refuses it with a vaguer message.
        let renew = renew_hint(&identity.name);
        trust
            .verify_device(&cert_der, rustls::pki_types::UnixTime::now())
            .map_err(|e| {
                let why = zone_core::trust::describe_refusal(&e);
                let hint = if why.contains("expired") {
                    format!(": {renew} (or, if this machine's clock is wrong, set it)")
                } else {
                    String::new()
                };
                bad(&p.cert, "own certificate refused", format!("{why}{hint}"))
            })?;
        Ok(Identity {
            key,
            cert_der,
            identity,
            zone_key,
            trust,
        })
    }
}

/// Checks a bundle's key, certificate and zone CA as [`DeviceCreds::load`] does, without
/// its zone.json: for a start that fetches zone.json first (`bootstrap_dns`), so that a
/// bundle it cannot start with is refused before anything is written into it. The identity
/// its certificate carries.
pub fn check_identity(
    p: &BundlePaths,
    expect_device: Option<&DeviceName>,
) -> Result<DeviceIdentity, TunnelError> {
    Identity::load(p, expect_device).map(|i| i.identity)
}

impl DeviceCreds {
    /// Loads and checks a bundle: the key matches the certificate, the certificate is the
    /// zone CA's, and zone.json is signed by that zone key. Any mismatch is an error here, so
    /// a wrong bundle never half-starts a process.
    pub fn load(
        p: &BundlePaths,
        expect_device: Option<&DeviceName>,
    ) -> Result<Arc<Self>, TunnelError> {
        let Identity {
            key,
            cert_der,
            identity,
            zone_key,
            trust,
        } = Identity::load(p, expect_device)?;
        let left = identity.not_after - OffsetDateTime::now_utc();
        if left < time::Duration::days(EXPIRY_WARNING_DAYS) {
            // Peers refuse it from then on, and nothing here renews it.
            let renew = renew_hint(&identity.name);
            tracing::warn!(file = %p.cert.display(), days_left = left.whole_days(), "this device's certificate expires soon: {renew}");
        }
        let zone = read_zone_json(&p.zone_config)?;
        let now = OffsetDateTime::now_utc();
        match zone.verify(&zone_key, now) {
            Ok(_) => warn_if_expiring(&zone, &p.zone_config, now),
            // Expiry is checked last: everything else about it holds. It is the newest config
            // this device knows, revocations and all; refusing it would leave the device down
            // (systemd restarting it for ever) after a year without zone changes, and no newer
            // one can reach a device that is not running. Offers from peers must not be expired.
            // Not for ever: expiry is what bounds how old a loaded config may be (a standby
            // gateway powered on after years must not start with the revocations of then).
            Err(zone_core::ZoneError::Expired(at))
                if now - zone.config.expires_at <= time::Duration::days(EXPIRED_GRACE_DAYS) =>
            {
                tracing::warn!(file = %p.zone_config.display(), expired_at = %at, "zone config expired: starting with it, as the newest this device has, for at most {EXPIRED_GRACE_DAYS} days after its expiry; re-sign it with `zonegate zone resign --zone DIR` and copy zone.json into every bundle (a running gateway passes it on to its agents)");
            }
            // Another zone's (signed by another zone key): no restart mends it.
            Err(e @ zone_core::ZoneError::ForeignZone { .. }) => return Err(unrunnable(
                &p.zone_config,
                "refused: it belongs to another zone (copy this zone's zone.json into the bundle)",
                e,
            )),
            Err(e) => return Err(bad(&p.zone_config, "refused", e)),
        }
        if zone.config.domain != identity.domain {
            return Err(unrunnable(
                &p.zone_config,
                "zone.json is for another domain",
                &zone.config.domain,
            ));
        }
        // A device.crt older than the one the zone config lists (a backup restored, a renewal
        // whose device.crt was not copied): it works until its own end, which then comes
        // sooner than the owner thinks. Said, not refused.
        if let Some(entry) = zone.config.device(&identity.name) {
            let hex = |s: &str| s.trim_start_matches("00").to_ascii_lowercase();
            if hex(&entry.cert_serial) != hex(&identity.serial_hex)
                && entry.cert_expires_at > identity.not_after
            {
                tracing::warn!(file = %p.cert.display(), not_after = %rfc3339(identity.not_after), listed_not_after = %rfc3339(entry.cert_expires_at), "this bundle's device.crt is older than the certificate the zone config lists for this device (a backup restored, or a renewal whose device.crt was not copied here?): copy device.crt from the device's bundle in the zone directory (a running device takes it within seconds)");
            }
        }
        // A device its own zone.json revokes would start, then be refused by every peer with
        // a vaguer message, redialing for ever.
        if zone.config.is_revoked(&identity.name) {
            return Err(unrunnable(
                &p.zone_config,
                "revokes this device",
                "it can no longer join the zone; add it again under a new name (zonegate device add)",
            ));
        }
        let seen_path = seen_revocations::path_beside(&p.zone_config);
        let seen = seen_revocations::read(&seen_path).map_err(|e| match e {
            // Damaged: no restart mends it.
            zone_core::ZoneError::BadFile { why, .. } => unrunnable(
                &seen_path,
                "this device's record of revoked devices is damaged",
                format!("{why}: it lists one device name per line; fix that line"),
            ),
            // Permissions, a mount not ready yet: a restart may find it readable.
            zone_core::ZoneError::Io { source, .. } => bad(
                &seen_path,
                "cannot read this device's record of revoked devices",
                source,
            ),
            other => bad(&seen_path, "record of revoked devices", other),
        })?;
        if seen.contains(&identity.name) {
            return Err(unrunnable(
                &seen_path,
                "revokes this device",
                "a zone config it adopted earlier revoked it: it can no longer join the zone; add it again under a new name (zonegate device add)",
            ));
        }
        let left_out: Vec<&str> = seen
            .iter()
            .filter(|n| !zone.config.is_revoked(n))
            .map(|n| n.as_str())
            .collect();
        if !left_out.is_empty() {
            tracing::warn!(file = %p.zone_config.display(), serial = zone.config.serial, devices = %left_out.join(", "), "zone.json leaves out revocations this device saw in an earlier zone config: they stay in force here (it was probably signed from an older copy of the zone directory: there, run `zonegate device revoke NAME --zone DIR` for each again, with --force for one it does not list, and copy the new zone.json to every device)");
        }
        trust.add_revoked(seen.iter().cloned());
        if trust.add_revocations(&zone.config) {
            record_revocations(&seen_path, &trust);
        }
        let key_pkcs8 = key.to_pkcs8_der()?;
        let noise_secret =
            crate::e2e::static_secret(&ed25519_dalek::SigningKey::from_bytes(&key.secret_bytes()));
        let own = OwnCert::new(
            cert_der,
            &identity,
            &PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8.to_vec())),
            &trust,
        )?;
        Ok(Arc::new(DeviceCreds {
            identity,
            cert: Arc::new(arc_swap::ArcSwap::from_pointee(own)),
            key_pkcs8,
            noise_secret,
            trust,
            zone_key,
            zone: Arc::new(RwLock::new(Arc::new(zone))),
            zone_path: Some(p.zone_config.clone()),
            cert_path: Some(p.cert.clone()),
            saving: Arc::default(),
            saves: tokio_util::task::TaskTracker::new(),
            asides: tokio_util::task::TaskTracker::new(),
            records: tokio_util::task::TaskTracker::new(),
        }))
    }

    pub fn name(&self) -> &str {
        self.identity.name.as_str()
    }
    /// Whether device `name` is revoked in any zone config this device loaded or adopted (a
    /// name that is no device name is no revoked device).
    pub fn is_revoked(&self, name: &str) -> bool {
        zone_core::DeviceName::new(name).is_ok_and(|n| self.trust.is_revoked(&n))
    }

    /// Where device `name` stands: revoked (in any zone config seen: a revocation learned from
    /// an older one leaves it listed in the one in use), else listed in the one in use, or not.
    pub fn standing(&self, name: &str) -> Standing {
        if self.is_revoked(name) {
            return Standing::Revoked;
        }
        let listed =
            zone_core::DeviceName::new(name).is_ok_and(|n| self.zone().config.device(&n).is_some());
        match listed {
            true => Standing::Listed,
            false => Standing::Unlisted,
        }
    }
    pub fn domain(&self) -> &Domain {
        &self.identity.domain
    }
    pub fn roles(&self) -> Vec<&'static str> {
        self.identity.roles.iter().map(|r| r.as_str()).collect()
    }

    /// A secret for `purpose` derived from the device key (HKDF-SHA256), so per-purpose
    /// secrets never reuse the signing key itself.
    pub fn derive_secret(&self, purpose: &[u8], out: &mut [u8]) {
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(purpose), &self.key_pkcs8);
        // Callers ask for at most a few dozen bytes, far below HKDF's 8160-byte limit.
        hk.expand(b"", out).expect("short HKDF output");
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.to_vec()))
    }

    /// This device's Noise static secret (X25519).
    pub fn noise_secret(&self) -> &[u8; 32] {
        &self.noise_secret
    }

    /// The Noise static public key zone.json implies for `device` (refused when revoked —
    /// in the trust's set, which keeps revocations a later zone.json left out — or its
    /// certificate has ended).
    pub fn noise_public_of(&self, device: &str) -> Result<[u8; 32], crate::e2e::E2eError> {
        if self.is_revoked(device) {
            return Err(crate::e2e::E2eError::UnknownPeer {
                device: device.to_owned(),
                why: format!("{device} is revoked (in a zone config this device has seen)"),
            });
        }
        let now = time::OffsetDateTime::now_utc();
        crate::e2e::peer_public(&self.zone().config, device, now)
    }

    /// The bundle's zone.json, when these credentials were loaded from one.
    pub fn cert_path(&self) -> Option<&Path> {
        self.cert_path.as_deref()
    }

    pub fn zone_path(&self) -> Option<&Path> {
        self.zone_path.as_deref()
    }

    /// The newest verified zone config.
    pub fn zone(&self) -> Arc<SignedZone> {
        self.zone.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn zone_serial(&self) -> u64 {
        self.zone().config.serial
    }

    /// Offers zone.json bytes from a peer. Adopted if it verifies against the pinned zone key
    /// and is newer, then written back to the bundle so a restart keeps it. Returns the new
    /// serial when adopted.
    ///
    /// Adoption does not depend on the write: a revocation must take effect even when the
    /// bundle cannot be written (read-only, disk full). Half-adopting it (revocations set,
    /// config not swapped) kept a revoked device's live connections up, and every later offer
    /// failed the same way.
    pub fn offer_zone(&self, bytes: &[u8]) -> Result<Option<u64>, TunnelError> {
        let offered = SignedZone::from_json(bytes)?;
        if offered.config.serial <= self.zone_serial() {
            return Ok(None);
        }
        // Checked before the write lock: every reader of the zone (hellos, Noise key lookups)
        // would wait on a signature check of whatever a device offers.
        // What cannot be passed on over a tunnel is not taken in: a gateway would fail to
        // send it to every agent.
        let size = offered.to_json_compact().len();
        if size > MAX_ZONE_CONFIG {
            return Err(TunnelError::Config(format!(
                "offered zone.json is {size} bytes, more than the {MAX_ZONE_CONFIG} devices can pass on"
            )));
        }
        offered.verify(&self.zone_key, OffsetDateTime::now_utc())?;
        if offered.config.domain != self.identity.domain {
            return Err(TunnelError::Config(
                "offered zone.json is for another domain".into(),
            ));
        }
        let mut cur = self.zone.write().unwrap_or_else(|p| p.into_inner());
        // Another offer may have been adopted while this one was checked.
        if offered.config.serial <= cur.config.serial {
            return Ok(None);
        }
        offered.config.keeps_revocations_of(&cur.config)?;
        let revoked_more = self.trust.add_revocations(&offered.config);
        let serial = offered.config.serial;
        let json = offered.to_json_pretty();
        *cur = Arc::new(offered);
        drop(cur);
        if let Some(p) = &self.zone_path {
            let (path, saving) = (p.clone(), self.saving.clone());
            let (key, domain) = (self.zone_key, self.identity.domain.clone());
            let trust = revoked_more.then(|| self.trust.clone());
            let save = move || {
                // Kept apart from zone.json: a later zone.json may leave them out (the next
                // start records what zone.json holds in any case). Read under the lock the
                // saves share: the set only grows, so the last write holds every name (two
                // adoptions' writes landed in either order, the smaller last).
                if let Some(trust) = trust {
                    let _saving = saving.lock().unwrap_or_else(|p| p.into_inner());
                    record_revocations(&seen_revocations::path_beside(&path), &trust);
                }
                save_if_newer(&path, &saving, serial, json.as_bytes(), |z| {
                    z.verify(&key, OffsetDateTime::now_utc()).is_ok() && z.config.domain == domain
                })
            };
            // Two syncs of a file and its directory: on a node's single runtime thread (an SD
            // card takes tens of milliseconds, more when busy) every tunnel would wait on them.
            // Saves racing in the blocking pool are ordered by `saving` and the serial check;
            // a stop waits for them ([`DeviceCreds::saved`]).
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(self.saves.spawn_blocking_on(save, &rt)),
                Err(_) => save(),
            }
        }
        Ok(Some(serial))
    }

    /// An authentic zone config not newer than the one in use (an agent's, in its hello) may
    /// still revoke devices the one in use does not: signed from a zone directory restored
    /// from an older backup, that one lost them, and a gateway added from it let a revoked
    /// device back in. Revocations are for good, so they are taken from it, and recorded
    /// beside zone.json as adopted ones are. The names newly revoked; a config revoking
    /// nothing new costs no signature check.
    ///
    /// The config, when it revoked devices not revoked here before (said in an error line
    /// naming them and `from`, with what the zone directory lacks).
    pub fn learn_revocations(
        &self,
        bytes: &[u8],
        from: &str,
    ) -> Result<Option<SignedZone>, TunnelError> {
        let offered = SignedZone::from_json(bytes)?;
        let new: Vec<DeviceName> = offered
            .config
            .revoked
            .iter()
            .map(|r| r.device.clone())
            .filter(|d| !self.trust.is_revoked(d))
            .collect();
        if new.is_empty() {
            return Ok(None);
        }
        // Authentic, however old: checked as of its own signing (expiry is no matter for a
        // revocation, which is for good).
        offered.verify(&self.zone_key, offered.config.issued_at)?;
        if offered.config.domain != self.identity.domain {
            return Err(TunnelError::Config(
                "offered zone.json is for another domain".into(),
            ));
        }
        self.trust.add_revoked(new.iter().cloned());
        if let Some(p) = &self.zone_path {
            let (path, saving, trust) = (p.clone(), self.saving.clone(), self.trust.clone());
            let record = move || {
                let _saving = saving.lock().unwrap_or_else(|p| p.into_inner());
                record_revocations(&seen_revocations::path_beside(&path), &trust);
            };
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(self.records.spawn_blocking_on(record, &rt)),
                Err(_) => record(),
            }
        }
        let list = new
            .iter()
            .map(|n| n.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        tracing::error!(from = %from, revoked = %list, serial = self.zone_serial(), "a zone config not adopted (older, expired, or leaving out a revocation) revokes devices the config in use does not: the zone directory that signed the one in use lacks these revocations (restored from an older backup?). They are enforced here from now on; in the zone directory run `zonegate device revoke NAME --zone DIR --force` for each and copy the new zone.json into the gateways' bundles");
        Ok(Some(offered))
    }

    /// Whether an adopted config (or its revocations) is still being written back: a
    /// zone.json copied in meanwhile may be replaced by the save, not set aside.
    pub fn saving(&self) -> bool {
        !self.saves.is_empty() || !self.records.is_empty()
    }

    /// Waits, at most `within`, for adopted configs still being written back: a stop right
    /// after an adoption would otherwise lose it, and a restart go back to the older config
    /// (and its revocations) until a peer offered the newer one again.
    pub async fn saved(&self, within: std::time::Duration) {
        self.saves.close();
        self.asides.close();
        self.records.close();
        let all = async {
            self.saves.wait().await;
            self.asides.wait().await;
            self.records.wait().await;
        };
        if tokio::time::timeout(within, all).await.is_err() {
            tracing::warn!("an adopted zone config is still being written back to the bundle; stopping without waiting longer");
        }
    }

    /// A zone.json copied into the bundle (`file`) that [`Self::offer_zone`] did not adopt:
    /// `error` says why it was refused, `None` when it was not newer than `current` (the
    /// serial then in use). One older than that, or one that parses but is refused (it drops
    /// a revocation, has expired, is another zone's), is set aside
    /// ([`Self::set_aside_refused`]): a restart would load it, checked for its signature only,
    /// and forget the revocations since, or refuse it. One that does not parse may be a copy
    /// still in progress: it is read again as it changes.
    pub fn not_adopted_from_bundle(
        &self,
        bytes: &[u8],
        file: &str,
        current: u64,
        error: Option<&TunnelError>,
    ) {
        let parsed = SignedZone::from_json(bytes).ok();
        match error {
            None => {
                let Some(offered) = parsed else {
                    return;
                };
                let serial = offered.config.serial;
                // A save of a newer config is on its way: it replaces this file (one of our
                // own earlier saves, read before the next one landed, most likely). Not a
                // record of revocations this very file taught (`records`): that writes no
                // zone.json, and this file stayed, unreported, for the next start to load.
                if !self.saves.is_empty() {
                    return;
                }
                if serial < current {
                    tracing::warn!(file, serial, current, "zone.json file is older than the zone config in use: ignored, and set aside so that a restart does not go back to it (copy the newest zone.json from the zone directory)");
                    self.set_aside_off_thread(bytes);
                } else if serial == current && offered != *self.zone() {
                    // The same serial saying something else (edited by hand, another copy
                    // of the zone): never checked, as not newer, and a restart would refuse
                    // its signature or zone and stop the device for good.
                    tracing::warn!(file, serial, "zone.json file has the serial of the zone config in use but other contents (edited by hand? a zone.json has to come from `zonegate` in the zone directory): ignored, and set aside so that a restart does not load it");
                    self.set_aside_off_thread(bytes);
                }
            }
            // A whole file (it parses) refused for what it says, another zone's or forged
            // among them, is set aside: the next start would refuse it, or load it. One that
            // does not parse may be a copy still in progress: it is read again as it changes.
            Some(e) if parsed.is_some() => {
                tracing::warn!(file, error = %e, current, "zone.json file refused; the zone config in use stays (copy the zone directory's zone.json again)");
                self.set_aside_off_thread(bytes);
            }
            Some(e) => {
                tracing::warn!(file, error = %e, current, "zone.json file cannot be read as a zone config; the zone config in use stays (a copy still in progress is read again once it changes; otherwise copy the zone directory's zone.json again)");
            }
        }
    }

    /// A zone.json in the bundle that was refused (`refused`, its bytes) would be loaded as
    /// it is at the next start, where only its signature is checked: a config leaving out a
    /// revocation would let the revoked device back in after a restart. It is kept beside the
    /// bundle's as `zone.json.refused` and the config in use written in its place. The path
    /// it was kept at; `None` when the file changed again meanwhile (that one is looked at
    /// next, and left as it is).
    pub fn set_aside_refused(&self, refused: &[u8]) -> Result<Option<PathBuf>, TunnelError> {
        let Some(p) = &self.zone_path else {
            return Err(TunnelError::Config("no zone.json file to set aside".into()));
        };
        set_aside(p, &self.saving, refused, &self.zone)
    }

    /// [`DeviceCreds::set_aside_refused`] in the blocking pool, tracked as a save: its two
    /// synced writes held a node's single runtime thread (every tunnel) as the saves did.
    fn set_aside_off_thread(&self, refused: &[u8]) {
        let Some(p) = self.zone_path.clone() else {
            return;
        };
        let (saving, refused, zone) = (self.saving.clone(), refused.to_vec(), self.zone.clone());
        let work = move || report_set_aside(set_aside(&p, &saving, &refused, &zone));
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(self.asides.spawn_blocking_on(work, &rt)),
            Err(_) => work(),
        }
    }
}

/// Keeps `refused` (the bytes of the bundle's zone.json at `p`) beside it as
/// `zone.json.refused` and writes the config in use (`zone`, read under the lock the saves
/// share: one adopted since the set-aside was asked for is what a restart must find) in its
/// place, unless the file changed meanwhile (then `None`: the owner copied another one in,
/// looked at next).
fn set_aside(
    p: &Path,
    saving: &std::sync::Mutex<()>,
    refused: &[u8],
    zone: &RwLock<Arc<SignedZone>>,
) -> Result<Option<PathBuf>, TunnelError> {
    let _saving = saving.lock().unwrap_or_else(|p| p.into_inner());
    let ours = zone
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .to_json_pretty();
    let now = std::fs::read(p).map_err(|e| TunnelError::Config(format!("{}: {e}", p.display())))?;
    if now != refused {
        return Ok(None);
    }
    let aside = p.with_extension("json.refused");
    zone_core::zonedir::write_atomic(&aside, refused, 0o644)?;
    zone_core::zonedir::write_atomic(p, ours.as_bytes(), 0o644)?;
    Ok(Some(aside))
}

/// Days after its expiry that a device still starts with its own zone.json (with a warning).
pub const EXPIRED_GRACE_DAYS: i64 = 90;

/// Days before a zone config's or the device certificate's expiry from which starts warn.
pub(crate) const EXPIRY_WARNING_DAYS: i64 = 30;

/// What to do about this device's certificate that is about to end or has.
/// Why a renewed device.crt is not taken ([`DeviceCreds::renew_cert`]), and when it would be
/// if that is only a matter of time (its validity starts later by this machine's clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewRefused {
    /// What is wrong, with what to do.
    pub why: String,
    /// When the certificate's validity starts, if that is all that refuses it.
    pub valid_from: Option<OffsetDateTime>,
}

impl From<String> for RenewRefused {
    fn from(why: String) -> Self {
        Self {
            why,
            valid_from: None,
        }
    }
}

impl From<&str> for RenewRefused {
    fn from(why: &str) -> Self {
        why.to_string().into()
    }
}

impl std::fmt::Display for RenewRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

fn renew_hint(name: &zone_core::DeviceName) -> String {
    format!("renew it with `zonegate device renew {name} --zone DIR` where the zone directory is, copy the new device.crt and zone.json into this bundle (a running device takes them within seconds; the gateways take the zone.json from it)")
}

/// Where a device name stands in this device's zone configs ([`DeviceCreds::standing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Listed,
    Revoked,
    /// Never added, misspelt, or not in the zone config yet.
    Unlisted,
}

impl DeviceCreds {
    /// When this device's certificate in use ends (`/status`; `device renew` before then).
    pub fn cert_not_after(&self) -> OffsetDateTime {
        self.cert.load().not_after
    }

    /// The certificate handshakes present now.
    pub fn own_cert(&self) -> Arc<OwnCert> {
        self.cert.load_full()
    }

    /// What the TLS configurations read at every handshake ([`crate::tls`]).
    pub(crate) fn own_cert_swap(&self) -> Arc<arc_swap::ArcSwap<OwnCert>> {
        self.cert.clone()
    }

    /// The bundle's device.crt changed (`bytes`, read from `path` by the watch): a renewed
    /// certificate is taken ([`DeviceCreds::renew_cert`]) and said at info, one not taken is
    /// said at warn with why (once: not again at the watch's retries), the one in use serving
    /// on. One not valid yet by this machine's clock is tried again each minute until it is
    /// (a clock set late at boot, then corrected): when to try again, or None.
    pub fn cert_file_changed(
        &self,
        bytes: &[u8],
        path: &Path,
        seen: crate::zone_watch::Seen,
    ) -> Option<std::time::Duration> {
        let taken = std::str::from_utf8(bytes)
            .map_err(|_| RenewRefused::from("not a PEM file (not text)".to_string()))
            .and_then(|pem| self.renew_cert(pem));
        match taken {
            Ok(Some(not_after)) => {
                tracing::info!(file = %path.display(), device = %self.name(), not_after = %rfc3339(not_after), "renewed certificate taken: handshakes present it from now on (connections up keep theirs until they reconnect)");
                None
            }
            Ok(None) => None,
            Err(refused) => {
                if seen == crate::zone_watch::Seen::New {
                    tracing::warn!(file = %path.display(), device = %self.name(), not_after = %rfc3339(self.cert_not_after()), "device.crt changed but is not taken: {}; the certificate in use serves on", refused.why);
                }
                refused.valid_from.map(|from| {
                    let wait = from - OffsetDateTime::now_utc();
                    // Each minute at most: the wall clock may be set forward meanwhile.
                    std::time::Duration::try_from(wait)
                        .unwrap_or_default()
                        .min(std::time::Duration::from_secs(60))
                })
            }
        }
    }

    /// Takes a renewed certificate (`pem`, the bundle's device.crt after `device renew` and a
    /// copy) for the handshakes from now on — connections up keep theirs; each gateway
    /// closes a connection when the certificate it was made with ends, and the redial
    /// presents the new one. It must be this device's (name, zone, key and roles as in use:
    /// other roles need a restart), issued by this zone's CA, in date, and issued no earlier
    /// than the one in use (an older copy is refused). The new end when taken; None when it
    /// is the certificate in use.
    pub fn renew_cert(&self, pem: &str) -> Result<Option<OffsetDateTime>, RenewRefused> {
        let der = cert::parse_pem_certs(pem)
            .map_err(|e| e.to_string())?
            .swap_remove(0);
        let current = self.cert.load_full();
        if der == current.der {
            return Ok(None);
        }
        let new = DeviceIdentity::from_der(&der)
            .map_err(|e| format!("not a zonegate device certificate: {e}"))?;
        let me = &self.identity;
        if new.name != me.name || new.domain != me.domain {
            return Err(format!(
                "it is the certificate of {}.{}, not of this device ({}.{})",
                new.name, new.domain, me.name, me.domain
            )
            .into());
        }
        if new.public_key != me.public_key {
            return Err("it certifies another key than this device's device.key (issued for another copy of this device?): copy device.crt and device.key of one bundle".into());
        }
        let roles = |i: &DeviceIdentity| {
            let mut r: Vec<&str> = i.roles.iter().map(|r| r.as_str()).collect();
            r.sort_unstable();
            r.join(",")
        };
        if roles(&new) != roles(me) {
            return Err(format!(
                "its roles ({}) are not those in use ({}): restart to take them",
                roles(&new),
                roles(me)
            )
            .into());
        }
        // Checked before the chain, to be told apart: this one passes by itself.
        let now = OffsetDateTime::now_utc();
        if new.not_before > now {
            return Err(RenewRefused {
                why: format!(
                    "it is valid only from {} and this machine's clock reads {} (behind? the certificate is taken then, checked each minute, unless the file changes first)",
                    rfc3339(new.not_before),
                    rfc3339(now)
                ),
                valid_from: Some(new.not_before),
            });
        }
        self.trust
            .verify_device(&der, rustls::pki_types::UnixTime::now())
            .map_err(|e| zone_core::trust::describe_refusal(&e))?;
        // Issued before the one in use: an older copy. (Its end says nothing: a renewal may
        // be issued for fewer days, `device renew --days`.)
        if new.not_before < current.not_before {
            return Err(format!(
                "it was issued ({}) before the certificate in use ({}): an older copy?",
                rfc3339(new.not_before),
                rfc3339(current.not_before)
            )
            .into());
        }
        let own =
            OwnCert::new(der, &new, &self.private_key(), &self.trust).map_err(|e| e.to_string())?;
        self.cert.store(Arc::new(own));
        Ok(Some(new.not_after))
    }

    /// Why this device cannot be let in anywhere, with what to do, if that is so: its
    /// certificate has ended (every peer refuses it from then on). A dial's own error then
    /// says only that the handshake failed.
    pub fn own_cert_problem(&self) -> Option<String> {
        let not_after = self.cert_not_after();
        (OffsetDateTime::now_utc() >= not_after).then(|| {
            format!(
                "this device's certificate expired at {}: {}",
                not_after,
                renew_hint(&self.identity.name)
            )
        })
    }

    /// [`Self::watch_own_expiry`] and [`Self::watch_zone_expiry`] together, for as long as the
    /// process runs.
    pub async fn watch_expiry(self: Arc<Self>) {
        tokio::join!(self.clone().watch_own_expiry(), self.watch_zone_expiry());
    }

    /// Says, while the process runs, what [`DeviceCreds::load`] says of the zone config at a
    /// start, for the config in use (adoptions included): a warning [`EXPIRY_WARNING_DAYS`]
    /// before it expires, an error when it has, and another once a restart would refuse it
    /// ([`EXPIRED_GRACE_DAYS`] on). A zone left alone for a year was told only at starts; after
    /// a power cut every device then refused to start at once, with none left running to pass
    /// a re-signed config on.
    pub async fn watch_zone_expiry(self: Arc<Self>) {
        // Looked at again at least this often: an adopted config (a new expiry) is noticed.
        const LOOK: std::time::Duration = std::time::Duration::from_secs(600);
        let mut told: Option<(u64, ZoneExpiry)> = None;
        let mut first = true;
        loop {
            let zone = self.zone();
            let (serial, expires_at) = (zone.config.serial, zone.config.expires_at);
            let now = OffsetDateTime::now_utc();
            let (stage, next) = ZoneExpiry::at(expires_at, now);
            // The start said it already (`load`).
            if std::mem::take(&mut first) {
                told = Some((serial, stage));
            }
            if stage != ZoneExpiry::Fine && told != Some((serial, stage)) {
                let resign = "re-sign it with `zonegate zone resign --zone DIR` and copy zone.json into a gateway's bundle (it passes it on to its agents)";
                match stage {
                    ZoneExpiry::Fine => {}
                    ZoneExpiry::Soon => {
                        tracing::warn!(serial, expires_at = %expires_at, days_left = (expires_at - now).whole_days(), "the zone config expires soon: {resign}")
                    }
                    ZoneExpiry::Expired => {
                        tracing::error!(serial, expires_at = %expires_at, "the zone config has expired: devices holding an older one and DNS bootstrap refuse it, and {EXPIRED_GRACE_DAYS} days on a restart refuses to start; {resign}")
                    }
                    ZoneExpiry::PastGrace => {
                        tracing::error!(serial, expires_at = %expires_at, "the zone config expired more than {EXPIRED_GRACE_DAYS} days ago: this device keeps running, but a restart refuses to start; {resign}")
                    }
                }
                told = Some((serial, stage));
            }
            let wait = next.map_or(LOOK, |t| crate::hub::until(t).min(LOOK));
            tokio::time::sleep(wait).await;
        }
    }

    /// Says, while the process runs, what [`DeviceCreds::load`] says at a start: a warning
    /// [`EXPIRY_WARNING_DAYS`] before this device's certificate ends, an error when it has. A
    /// node running for months otherwise went from working to refused everywhere with only
    /// "tunnel down; reconnecting" lines.
    pub async fn watch_own_expiry(self: Arc<Self>) {
        const LOOK_EVERY: Duration = Duration::from_secs(600);
        let renew = renew_hint(&self.identity.name);
        // The certificate each was said of: a renewal (a later end) is said of afresh. The
        // start's own warning ([`DeviceCreds::load`]) is not repeated.
        let first = self.cert_not_after();
        let mut warned = (OffsetDateTime::now_utc()
            >= first - time::Duration::days(EXPIRY_WARNING_DAYS))
        .then_some(first);
        let mut ended = None;
        loop {
            let not_after = self.cert_not_after();
            let warn_at = not_after - time::Duration::days(EXPIRY_WARNING_DAYS);
            let now = OffsetDateTime::now_utc();
            // Whether the clock got here by sleeping or by jumping, each stage is said once.
            if now >= not_after && ended != Some(not_after) {
                ended = Some(not_after);
                tracing::error!(not_after = %rfc3339(not_after), "this device's certificate has expired: peers and gateways refuse it from now on; {renew}");
            } else if now >= warn_at && now < not_after && warned != Some(not_after) {
                warned = Some(not_after);
                let left = not_after - now;
                tracing::warn!(days_left = left.whole_days(), not_after = %rfc3339(not_after), "this device's certificate expires soon: {renew}");
            }
            // Until the next stage, looking again at least every ten minutes: a renewed
            // certificate moves the stages, a clock set forward or a suspend skips ahead.
            let next = if now < warn_at { warn_at } else { not_after };
            let wait = match next > now {
                true => crate::hub::until(next).min(LOOK_EVERY),
                false => LOOK_EVERY,
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// Where a zone config stands against its expiry, as [`DeviceCreds::watch_zone_expiry`] tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZoneExpiry {
    Fine,
    /// Within [`EXPIRY_WARNING_DAYS`] of it.
    Soon,
    /// Past it, within [`EXPIRED_GRACE_DAYS`].
    Expired,
    /// Past the grace: a start refuses it.
    PastGrace,
}

impl ZoneExpiry {
    /// The stage at `now` of a config expiring at `expires_at`, and when the next one begins.
    fn at(expires_at: OffsetDateTime, now: OffsetDateTime) -> (Self, Option<OffsetDateTime>) {
        let soon = expires_at - time::Duration::days(EXPIRY_WARNING_DAYS);
        let grace_end = expires_at + time::Duration::days(EXPIRED_GRACE_DAYS);
        if now < soon {
            (ZoneExpiry::Fine, Some(soon))
        } else if now < expires_at {
            (ZoneExpiry::Soon, Some(expires_at))
        } else if now <= grace_end {
            (
                ZoneExpiry::Expired,
                Some(grace_end + time::Duration::seconds(1)),
            )
        } else {
            (ZoneExpiry::PastGrace, None)
        }
    }
}

/// Warns when `zone` (read from `path`) expires within [`EXPIRY_WARNING_DAYS`].
fn warn_if_expiring(zone: &SignedZone, path: &Path, now: OffsetDateTime) {
    let left = zone.config.expires_at - now;
    if left < time::Duration::days(EXPIRY_WARNING_DAYS) {
        tracing::warn!(file = %path.display(), days_left = left.whole_days(), "zone config expires soon: re-sign it with `zonegate zone resign --zone DIR` and copy zone.json into a gateway's bundle (it passes it on to its agents); devices keep running on an expired one, but one that holds an older config and DNS bootstrap refuse it");
    }
}

/// Writes an adopted zone config (`json`, serial `serial`) back to the bundle's `path`, unless
/// the file there is as new already and `valid` (it would be adopted).
fn save_if_newer(
    path: &Path,
    saving: &std::sync::Mutex<()>,
    serial: u64,
    json: &[u8],
    valid: impl FnOnce(&SignedZone) -> bool,
) {
    let _saving = saving.lock().unwrap_or_else(|p| p.into_inner());
    // The owner may have copied a newer zone.json into the bundle that this process has not
    // read yet (the gateway polls it), or another offer saved a newer one a moment ago: never
    // overwrite it with an older one. Only one that verifies as this zone's counts: a copy
    // with a higher serial that does not (another zone's, a forged one) is being set aside,
    // and deferring to it left the adopted config unsaved. (One that verifies but drops a
    // revocation is deferred to; the bundle poll sets it aside and writes the config in use.)
    let on_disk = std::fs::read(path)
        .ok()
        .and_then(|b| SignedZone::from_json(&b).ok())
        .filter(valid)
        .map(|z| z.config.serial);
    if on_disk.is_none_or(|s| s < serial) {
        if let Err(e) = zone_core::zonedir::write_atomic(path, json, 0o644) {
            tracing::error!(serial, path = %path.display(), error = %e, "zone config adopted but not saved: a restart would go back to the older one until a peer offers this again; make the bundle directory writable by this process");
        }
    }
}

/// Writes the trust's revocations to the device's record ([`seen_revocations`]).
fn record_revocations(path: &Path, trust: &ZoneTrust) {
    if let Err(e) = seen_revocations::write(path, &trust.revoked()) {
        tracing::error!(path = %path.display(), error = %e, "revocations not recorded: a restart with an older zone.json would forget them; make the bundle directory writable by this process");
    }
}

/// Logs what [`DeviceCreds::set_aside_refused`] did.
pub fn report_set_aside(r: Result<Option<PathBuf>, TunnelError>) {
    match r {
        Ok(None) => tracing::info!(
            "the refused zone.json changed again meanwhile: the new one is looked at next"
        ),
        Ok(Some(aside)) => {
            tracing::warn!(kept = %aside.display(), "the refused zone.json was moved aside and the config in use written back, so a restart keeps it")
        }
        Err(e) => {
            tracing::error!(error = %e, "the refused zone.json could not be replaced by the config in use: a restart would load it; replace the bundle's zone.json by hand")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stages a running device tells of its zone config's expiry, and when each begins.
    #[test]
    fn zone_expiry_stages_and_their_boundaries() {
        let expires = OffsetDateTime::UNIX_EPOCH + time::Duration::days(1000);
        let days = time::Duration::days;
        let soon = expires - days(EXPIRY_WARNING_DAYS);
        let grace_end = expires + days(EXPIRED_GRACE_DAYS);
        assert_eq!(
            ZoneExpiry::at(expires, soon - days(1)),
            (ZoneExpiry::Fine, Some(soon))
        );
        assert_eq!(
            ZoneExpiry::at(expires, soon),
            (ZoneExpiry::Soon, Some(expires))
        );
        assert_eq!(
            ZoneExpiry::at(expires, expires),
            (
                ZoneExpiry::Expired,
                Some(grace_end + time::Duration::seconds(1))
            )
        );
        // The last moment a start still takes it (load: `now - expires_at <= grace`).
        assert_eq!(ZoneExpiry::at(expires, grace_end).0, ZoneExpiry::Expired);
        assert_eq!(
            ZoneExpiry::at(expires, grace_end + time::Duration::seconds(1)),
            (ZoneExpiry::PastGrace, None)
        );
    }
}
