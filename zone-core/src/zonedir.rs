//! The owner's zone directory (zone key, CA, zone.json) and the device bundles made from it.
//!
//! Every file is written to a temporary file in the same directory and renamed into place, so
//! an interrupted command never leaves a half-written key or config behind.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use crate::cert::{self, DeviceCert, IssueRequest};
use crate::config::{
    trunc_now, DeviceEntry, GatewayEntry, Revocation, SignedZone, ZoneConfig,
    MAX_REVOKING_ZONE_JSON, MAX_SHARED_ZONE_JSON,
};
use crate::error::ZoneError;
use crate::keys::{DeviceKey, ZoneKey};
use crate::names::{DeviceName, Domain, Role};

pub const ZONE_KEY_FILE: &str = "zone.key";
pub const ZONE_CA_FILE: &str = "zone-ca.crt";
pub const ZONE_JSON_FILE: &str = "zone.json";
pub const DEVICE_KEY_FILE: &str = "device.key";
pub const DEVICE_CERT_FILE: &str = "device.crt";
/// Default admin address of a node agent (the gateway uses 9090; both can run on one machine).
pub const NODE_ADMIN_DEFAULT: &str = "127.0.0.1:9091";
pub const GATEWAY_ADMIN_DEFAULT: &str = "127.0.0.1:9090";

/// The serial after `prev`, at `now`: the Unix time in seconds when that is larger. Devices
/// adopt only a higher serial than they hold, so a zone directory restored from a backup
/// (serial N-k, devices at N) would issue configs every device ignores, revocations
/// included; with the clock in the serial the next change outranks anything issued before.
/// Several changes within one second still count up by one.
pub fn next_serial(prev: u64, now: OffsetDateTime) -> u64 {
    let secs = u64::try_from(now.unix_timestamp()).unwrap_or(0);
    (prev + 1).max(secs)
}

/// Why [`write_new`] wrote nothing.
enum WriteNewError {
    /// Something is at the path already.
    Exists,
    Zone(ZoneError),
}

/// Writes `data` to `path` with `mode` as [`write_atomic`] does, but never over a file that is
/// there: the complete temp file is linked into place, which fails if the name exists.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), WriteNewError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.new{}", std::process::id()));
    write_atomic(&tmp, data, mode).map_err(WriteNewError::Zone)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            let _ = fs::File::open(dir).and_then(|d| d.sync_all());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(WriteNewError::Exists),
        // A file system without hard links (vfat, exFAT, some FUSE and SMB mounts: a zone
        // key on a USB stick): the file is created new in place instead, which refuses an
        // existing one just as well, if not atomically (an interrupt can leave it short;
        // `open` then refuses the key, and nothing has used it yet).
        Err(_) => write_new_in_place(path, data, mode),
    }
}

fn write_new_in_place(path: &Path, data: &[u8], mode: u32) -> Result<(), WriteNewError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(WriteNewError::Exists)
        }
        Err(e) => return Err(WriteNewError::Zone(ZoneError::io(path, e))),
    };
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| WriteNewError::Zone(ZoneError::io(path, e)))
}

/// Removes the temp files of [`write_atomic`] and [`write_new`] in `dir` that a crash left
/// (a minute old or more: none is being written): a device key's, a zone key's. Left, a copy
/// of a bundle (`scp -r`) carried extra copies of its key along, and a zone key deleted on
/// purpose survived as a dot file.
fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let is_temp = |name: &str| {
        let Some(rest) = name.strip_prefix('.') else {
            return false;
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        // `.NAME.tmpPID.N` and `.NAME.newPID`.
        if let Some((_, tail)) = rest.rsplit_once(".tmp") {
            return tail
                .split_once('.')
                .is_some_and(|(p, n)| digits(p) && digits(n));
        }
        rest.rsplit_once(".new").is_some_and(|(_, p)| digits(p))
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|a| a.as_secs() >= 60));
        if name.to_str().is_some_and(is_temp) && old && e.file_type().is_ok_and(|t| t.is_file()) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Writes `data` to `path` atomically (temp file + fsync + rename + directory fsync) with Unix
/// `mode`.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), ZoneError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    // Per process and call: two writers of one process must not share a temp file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let next = || {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        dir.join(format!(".{name}.tmp{}.{n}", std::process::id()))
    };
    let mut tmp = next();
    // Created new and never through a symlink, so nobody who can write the directory can
    // point it elsewhere or lend it their permissions. A name taken is never removed: process
    // IDs repeat across PID namespaces (a gateway and the CLI both PID 1 in containers on
    // one bundle), and removing another writer's file let its rename move this one's
    // unfinished file in place. Stale ones (a crash between create and rename) are removed
    // by `remove_stale_temps` once old.
    let mut made = false;
    let result = (|| {
        let mut tries = 0;
        let mut f = loop {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .mode(mode)
                .open(&tmp)
            {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 16 => {
                    tries += 1;
                    tmp = next();
                }
                opened => break opened?,
            }
        };
        made = true;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_ok() {
        // The rename is durable only once the directory is: after a power cut the older file
        // (an older zone config: a forgotten revocation) would otherwise come back. Written
        // either way, so a file system that cannot sync a directory only gets a warning.
        if let Err(e) = fs::File::open(dir).and_then(|d| d.sync_all()) {
            tracing::warn!(path = %path.display(), error = %e, "written, but its directory could not be synced: a power cut may bring the older file back");
        }
    }
    result.map_err(|e| {
        // Only this call's own: a name found taken is another writer's.
        if made {
            let _ = fs::remove_file(&tmp);
        }
        ZoneError::io(path, e)
    })
}

/// `addrs` without repeats, in their order, an IPv4-mapped one as the IPv4 address it is
/// (`[::ffff:1.2.3.4]:4433` and `1.2.3.4:4433` are one): a gateway address listed twice was
/// served twice in DNS and dialled twice by every agent.
fn distinct(addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::with_capacity(addrs.len());
    for a in addrs.iter().map(|a| unmapped(*a)) {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// An IPv4-mapped address as the IPv4 one; any other as written, an IPv6 scope id kept (which
/// `SocketAddr::new` would drop: a link-local `[fe80::1%2]` binds only with it).
pub fn unmapped(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => {
            SocketAddr::new(a.ip().to_canonical(), a.port())
        }
        _ => a,
    }
}

/// Refuses an address another gateway than `name` already lists: agents dialling `name`
/// there reach that gateway, whose certificate names another device, and fail for ever.
fn check_not_taken(
    gateways: &[GatewayEntry],
    name: &DeviceName,
    addrs: &[SocketAddr],
    dir: &Path,
) -> Result<(), ZoneError> {
    for g in gateways.iter().filter(|g| &g.device != name) {
        if let Some(a) = addrs
            .iter()
            .find(|a| g.addrs.iter().any(|b| unmapped(*b) == **a))
        {
            return Err(ZoneError::Usage(format!(
                "--public-addr {a} is gateway {}'s already: agents dialling {name} there would reach {} and refuse it; give {name} its own address (or move {} first: `zonegate device move {} --public-addr IP:PORT --zone {}`)",
                g.device,
                g.device,
                g.device,
                g.device,
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Mode of a bundle directory this makes: readable by the service's user (it is copied, and
/// may be installed where another user runs it), writable by its owner only whatever the
/// umask, so nobody else can delete its key or swap its zone.json and revocation record.
pub const BUNDLE_DIR_MODE: u32 = 0o755;

/// Makes `dir` and its missing parents with `mode` (less the umask).
pub fn make_dir(dir: &Path, mode: u32) -> Result<(), ZoneError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|e| ZoneError::io(dir, e))
}

/// Refuses a private key file others may read, as ssh does: every device key derives from the
/// zone key, and a copy or restore (`cp` from a backup, an unzip) can leave it at 0644.
fn check_private(path: &Path) -> Result<(), ZoneError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path)
        .map_err(|e| ZoneError::io(path, e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(ZoneError::NotPrivate {
            path: path.to_owned(),
            what: "zone key",
            why: format!(
                "others may read it (mode {:o}): every device key derives from it; run `chmod 600 {}` (on a FAT or exFAT drive, which has no modes, copy the zone directory off it first)",
                mode & 0o777,
                path.display()
            ),
        });
    }
    Ok(())
}

/// Refuses a zone directory that others may write (`mkdir` under a umask of 002 makes it
/// 0775): they could delete or replace the zone key, which nothing replaces.
fn check_not_shared(dir: &Path) -> Result<(), ZoneError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(dir)
        .map_err(|e| ZoneError::io(dir, e))?
        .permissions()
        .mode();
    if mode & 0o022 != 0 {
        return Err(ZoneError::NotPrivate {
            path: dir.to_owned(),
            what: "zone directory",
            why: format!(
                "others may write it (mode {:o}) and so delete or replace the zone key; run `chmod 700 {}` and run this again",
                mode & 0o777,
                dir.display()
            ),
        });
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, ZoneError> {
    fs::read_to_string(path).map_err(|e| ZoneError::io(path, e))
}

/// Reads and parses a zone.json file.
pub fn read_zone_json(path: &Path) -> Result<SignedZone, ZoneError> {
    let bytes = fs::read(path).map_err(|e| ZoneError::io(path, e))?;
    SignedZone::from_json(&bytes).map_err(|e| ZoneError::BadFile {
        path: path.to_owned(),
        what: "zone.json",
        why: e.to_string(),
    })
}

/// Reads the (single) certificate of a PEM file as DER.
pub fn read_cert_der(path: &Path) -> Result<rustls_pki_types::CertificateDer<'static>, ZoneError> {
    let pem = read(path)?;
    let mut certs = cert::parse_pem_certs(&pem).map_err(|e| ZoneError::BadFile {
        path: path.to_owned(),
        what: "PEM certificate",
        why: e.to_string(),
    })?;
    Ok(certs.remove(0))
}

/// An opened zone directory.
#[derive(Debug)]
pub struct ZoneDir {
    pub dir: PathBuf,
    pub key: ZoneKey,
    pub ca_pem: String,
    pub zone: SignedZone,
}

impl ZoneDir {
    /// Creates a new zone in `dir`; refuses if a zone is already there.
    pub fn init(dir: &Path, domain: Domain, now: OffsetDateTime) -> Result<Self, ZoneError> {
        domain.check_new_zone()?;
        clock_not_before_zonegate(now)?;
        // A zone, whole or half made, is never made again over: `open` says which.
        if [ZONE_KEY_FILE, ZONE_JSON_FILE, ZONE_CA_FILE]
            .iter()
            .any(|f| dir.join(f).exists())
        {
            return Err(match Self::open(dir) {
                Err(e @ (ZoneError::IncompleteZone { .. } | ZoneError::LostCa(_))) => e,
                _ => ZoneError::ZoneExists(dir.to_owned()),
            });
        }
        // Owner only, whatever the umask: whoever may write the directory may delete the
        // zone key, which nothing replaces. A directory already there keeps its mode: one
        // others may write is refused before anything is written into it.
        make_dir(dir, 0o700)?;
        check_not_shared(dir)?;
        let key = ZoneKey::generate();
        let ca_pem = cert::make_ca(&key, &domain, now)?;
        let zone = ZoneConfig::new(domain, &key, now).sign(&key)?;
        // Key first: if anything after fails, re-running init says "exists" rather than
        // silently making a second, different zone key. Never over another: two inits at once
        // both passed the check above, and the second replaced the first's key after it had
        // said "created".
        let key_path = dir.join(ZONE_KEY_FILE);
        write_new(&key_path, key.to_pem()?.as_bytes(), 0o600).map_err(|e| match e {
            WriteNewError::Exists => ZoneError::ZoneExists(dir.to_owned()),
            WriteNewError::Zone(e) => e,
        })?;
        // A file system without modes (FAT, exFAT: a USB stick) shows it 0644 or so whatever
        // it was made with, and every later command refuses such a key: said now, and taken
        // back, rather than "created" and a zone nothing can use.
        if let Err(e) = check_private(&key_path) {
            let _ = fs::remove_file(&key_path);
            return Err(e);
        }
        write_atomic(&dir.join(ZONE_CA_FILE), ca_pem.as_bytes(), 0o644)?;
        write_atomic(
            &dir.join(ZONE_JSON_FILE),
            zone.to_json_pretty().as_bytes(),
            0o644,
        )?;
        Ok(ZoneDir {
            dir: dir.to_owned(),
            key,
            ca_pem,
            zone,
        })
    }

    /// Opens an existing zone directory and checks that its three files belong together.
    pub fn open(dir: &Path) -> Result<Self, ZoneError> {
        // `try_exists`: a directory this user may not search (made under sudo) is an error
        // to say, not "no zone here".
        let has = |f: &str| {
            let p = dir.join(f);
            p.try_exists().map_err(|e| ZoneError::io(p, e))
        };
        match (
            has(ZONE_KEY_FILE)?,
            has(ZONE_CA_FILE)?,
            has(ZONE_JSON_FILE)?,
        ) {
            (false, false, false) => return Err(ZoneError::NoZone(dir.to_owned())),
            (false, true, true) => {
                return Err(ZoneError::NoZoneKey(
                    dir.to_owned(),
                    "zone-ca.crt and zone.json",
                ))
            }
            // Made private at init; loosened since, others could swap in a zone of theirs.
            (true, true, true) => {
                check_not_shared(dir)?;
                remove_stale_temps(dir);
            }
            (true, false, true) => return Err(ZoneError::LostCa(dir.to_owned())),
            (true, ca, _) => {
                return Err(ZoneError::IncompleteZone {
                    dir: dir.to_owned(),
                    have: ZONE_KEY_FILE,
                    missing: if ca { ZONE_JSON_FILE } else { ZONE_CA_FILE },
                })
            }
            // One of them without the key: not "no zone here", which sends the user to
            // `zone init`, and init refuses a directory holding either.
            (false, ca, _) => {
                let have = if ca { ZONE_CA_FILE } else { ZONE_JSON_FILE };
                return Err(ZoneError::NoZoneKey(dir.to_owned(), have));
            }
        }
        let kp = dir.join(ZONE_KEY_FILE);
        check_private(&kp)?;
        let pem = zeroize::Zeroizing::new(read(&kp)?);
        let key = ZoneKey::from_pem(&pem).map_err(|e| ZoneError::BadFile {
            path: kp.clone(),
            what: "zone key",
            why: format!("{e}; restore it from your backup"),
        })?;
        let cp = dir.join(ZONE_CA_FILE);
        let ca_pem = read(&cp)?;
        let ca_der = read_cert_der(&cp)?;
        let ca_key = cert::ca_public_key(&ca_der)?;
        if ca_key != key.verifying_key() {
            return Err(ZoneError::BadFile {
                path: cp,
                what: "zone CA of this zone key",
                why: "it was made from another zone key".into(),
            });
        }
        let zp = dir.join(ZONE_JSON_FILE);
        let zone = read_zone_json(&zp)?;
        // The owner's own copy must verify too (but may be expired: re-signing renews it).
        match zone.verify(&key.verifying_key(), OffsetDateTime::now_utc()) {
            Ok(_) | Err(ZoneError::Expired(_)) => {}
            Err(e) => {
                return Err(ZoneError::BadFile {
                    path: zp,
                    what: "zone.json of this zone key",
                    why: e.to_string(),
                })
            }
        }
        Ok(ZoneDir {
            dir: dir.to_owned(),
            key,
            ca_pem,
            zone,
        })
    }

    pub fn domain(&self) -> &Domain {
        &self.zone.config.domain
    }

    /// Bumps the serial, re-signs (renewing expiry) and saves zone.json — unless another
    /// command saved one since this one read it: two commands at once (a revoke and an add in
    /// two shells) each wrote their change over the other's, the revocation lost, and could
    /// sign two different configs with one serial.
    fn commit(&mut self, config: ZoneConfig, now: OffsetDateTime) -> Result<(), ZoneError> {
        let valid = self.zone.config.expires_at - self.zone.config.issued_at;
        self.commit_valid(config, now, valid, MAX_SHARED_ZONE_JSON)
    }

    /// [`ZoneDir::commit`], valid for `valid` from now, refused if it grows the config past
    /// `limit` bytes.
    fn commit_valid(
        &mut self,
        mut config: ZoneConfig,
        now: OffsetDateTime,
        valid: time::Duration,
        limit: usize,
    ) -> Result<(), ZoneError> {
        let zp = self.dir.join(ZONE_JSON_FILE);
        let _lock = lock_dir(&self.dir)?;
        let on_disk = read_zone_json(&zp)?.config.serial;
        if on_disk != self.zone.config.serial {
            return Err(ZoneError::Concurrent(format!(
                "{} changed since this command read it (serial {} → {on_disk}): another command changed the zone at the same time; nothing was changed, run this one again",
                zp.display(),
                self.zone.config.serial
            )));
        }
        let now = trunc_now(now);
        config.serial = next_serial(self.zone.config.serial, now);
        config.issued_at = now;
        config.expires_at = now + valid;
        let signed = config.sign(&self.key)?;
        let size = signed.to_json_compact().len();
        // Only growth past the limit is refused: a zone already above it (made by hand, or
        // before the limit) must still revoke, renew and re-sign.
        if size > limit && size > self.zone.to_json_compact().len() {
            let room = match limit {
                MAX_SHARED_ZONE_JSON => {
                    "bytes the zone's DNS answer holds (nodes bootstrap from it)"
                }
                _ => "bytes a revocation may grow it to (within what tunnel messages carry)",
            };
            return Err(ZoneError::Usage(format!(
                "the zone config would be {size} bytes, more than the {limit} {room}: nothing was changed (the zone lists {} devices and {} revocations: revoke devices no longer used, which takes their entries out)",
                signed.config.devices.len(),
                signed.config.revoked.len()
            )));
        }
        write_atomic(&zp, signed.to_json_pretty().as_bytes(), 0o644)?;
        self.zone = signed;
        Ok(())
    }

    /// The end of the zone's CA certificate: no device certificate outlasts it.
    pub fn ca_not_after(&self) -> Option<OffsetDateTime> {
        cert::ca_not_after(&self.ca_pem)
    }

    /// Refuses `now` more than a day before the zone's last change, for the commands that
    /// issue certificates from the machine's clock (`device add`, `device renew`): this
    /// machine's clock is behind (a Raspberry Pi without a clock before NTP answers, a dead
    /// CMOS battery), and a certificate issued now would end early or have ended on arrival
    /// — or the last change was signed by a clock ahead, which this cannot tell apart. A day
    /// of slack: clocks of two machines used for the zone may differ a little. (The methods
    /// take the time they are given: tests make configs of other times.)
    pub fn clock_not_behind(&self, now: OffsetDateTime) -> Result<(), ZoneError> {
        let last = self.zone.config.issued_at;
        if now + time::Duration::days(1) < last {
            return Err(ZoneError::Usage(format!(
                "this machine's clock reads {}, more than a day before the zone's last change ({}): a certificate issued now would be out of date on arrival; set the clock right (NTP) and run this again (nothing was changed). If this clock is right, the last change was signed by a clock ahead: `zonegate zone resign --zone {} --clock-is-right` signs the zone as of now, and certificates can be issued again",
                rfc3339(now),
                rfc3339(last),
                self.dir.display(),
            )));
        }
        Ok(())
    }

    /// The time a change that issues no certificate (`device revoke`, `device move`, `zone
    /// resign`) signs its config as of: `now`, or the zone's last change when that is later.
    /// A config signed with a clock behind would be expired on arrival, so such changes were
    /// refused — and a last change signed once by a clock ahead (a year typed wrong) then
    /// refused every revocation until that time came. Devices take a config by its serial and
    /// expiry, not its issue time.
    pub fn signing_time(&self, now: OffsetDateTime) -> OffsetDateTime {
        now.max(self.zone.config.issued_at)
    }

    /// Re-signs the config with a new validity period (new serial: [`next_serial`]).
    pub fn resign(&mut self, now: OffsetDateTime, valid_days: i64) -> Result<(), ZoneError> {
        // The period goes to the commit, not into the config held: a refused commit (a race,
        // the size limit) left it holding dates its signature did not cover.
        let c = self.zone.config.clone();
        self.commit_valid(
            c,
            now,
            time::Duration::days(valid_days),
            MAX_SHARED_ZONE_JSON,
        )
    }

    fn issue(
        &self,
        name: &DeviceName,
        roles: &[Role],
        now: OffsetDateTime,
        days: i64,
    ) -> Result<(DeviceKey, DeviceCert), ZoneError> {
        let key = self.key.derive_device(self.domain(), name);
        let now = trunc_now(now);
        // A certificate ends with the CA at the latest (`issue_device`): once the CA has
        // ended, every one issued would be out of date on arrival, and "renew it" (what a
        // device refusing its own certificate says) made the same one again.
        if let Some(end) = cert::ca_not_after(&self.ca_pem) {
            if end <= now {
                return Err(ZoneError::Usage(format!(
                    "the zone's CA certificate ({ZONE_CA_FILE}) ended at {}: no certificate it signs is valid now (nothing was changed). A zone CA lasts {} years from `zone init`; make a new zone (`zonegate zone init`) and add the devices to it",
                    rfc3339(end),
                    cert::CA_CERT_DAYS / 365
                )));
            }
        }
        let cert = cert::issue_device(
            &self.key,
            &self.ca_pem,
            &key,
            &IssueRequest {
                domain: self.domain(),
                name,
                roles,
                // Slack for devices whose clock runs behind: a Raspberry Pi without a clock
                // starts at its last shutdown's time until NTP answers, and refused a renewed
                // gateway's certificate as not yet valid. Revocation is by name, so an earlier
                // start costs nothing.
                not_before: now - time::Duration::days(1),
                not_after: now + time::Duration::days(days),
            },
        )?;
        Ok((key, cert))
    }

    /// Adds a device: derives its key, issues its certificate, records it (new serial: [`next_serial`]).
    /// Its `NAME.DOMAIN` must fit a DNS name, and a gateway's addresses must be dialable.
    pub fn add_device(
        &mut self,
        name: &DeviceName,
        roles: &[Role],
        public_addrs: &[SocketAddr],
        now: OffsetDateTime,
        days: i64,
    ) -> Result<(DeviceKey, DeviceCert), ZoneError> {
        if self.zone.config.is_revoked(name) {
            return Err(ZoneError::DeviceRevoked(name.to_string()));
        }
        if self.zone.config.device(name).is_some() {
            return Err(ZoneError::DeviceExists(name.to_string()));
        }
        let domain = &self.zone.config.domain;
        if !domain.fits(name) {
            return Err(ZoneError::Usage(format!(
                "{name}.{domain} is longer than a DNS name may be (253 characters): choose a shorter device name"
            )));
        }
        check_dialable(public_addrs)?;
        let is_gw = roles.contains(&Role::Gateway);
        if is_gw && public_addrs.is_empty() {
            return Err(ZoneError::Usage(
                "a gateway needs --public-addr IP:PORT (the address agents dial)".into(),
            ));
        }
        if !is_gw && !public_addrs.is_empty() {
            return Err(ZoneError::Usage(
                "--public-addr is only for --role gateway".into(),
            ));
        }
        let addrs = distinct(public_addrs);
        check_not_taken(&self.zone.config.gateways, name, &addrs, &self.dir)?;
        let (key, cert) = self.issue(name, roles, now, days)?;
        let mut c = self.zone.config.clone();
        c.devices.push(DeviceEntry {
            name: name.clone(),
            public_key: key.public_text(),
            roles: roles.to_vec(),
            cert_serial: cert.serial_hex.clone(),
            cert_expires_at: cert.not_after,
        });
        if is_gw {
            c.gateways.push(GatewayEntry {
                device: name.clone(),
                addrs,
            });
        }
        self.commit(c, now)?;
        Ok((key, cert))
    }

    /// Device `name`'s entry: an error when it is revoked or not in the zone.
    fn live_device(&self, name: &DeviceName) -> Result<&DeviceEntry, ZoneError> {
        if self.zone.config.is_revoked(name) {
            return Err(ZoneError::DeviceRevoked(name.to_string()));
        }
        self.zone
            .config
            .device(name)
            .ok_or_else(|| ZoneError::NoSuchDevice(name.to_string()))
    }

    /// Re-issues a device certificate (same derived key) with a new validity period.
    pub fn renew(
        &mut self,
        name: &DeviceName,
        now: OffsetDateTime,
        days: i64,
    ) -> Result<(DeviceKey, DeviceCert), ZoneError> {
        let entry = self.live_device(name)?.clone();
        let (key, cert) = self.issue(name, &entry.roles, now, days)?;
        let mut c = self.zone.config.clone();
        if let Some(d) = c.devices.iter_mut().find(|d| &d.name == name) {
            d.cert_serial = cert.serial_hex.clone();
            d.cert_expires_at = cert.not_after;
        }
        self.commit(c, now)?;
        Ok((key, cert))
    }

    /// Gives gateway `name` new public addresses (new serial: [`next_serial`]): the gateway moved to another
    /// VPS or its IP changed. Its key and certificate stay (they name the device, not an
    /// address); agents that adopt this config dial the new addresses from their next
    /// connection, and the zone's DNS answers with them.
    pub fn move_gateway(
        &mut self,
        name: &DeviceName,
        public_addrs: &[SocketAddr],
        now: OffsetDateTime,
    ) -> Result<(), ZoneError> {
        let entry = self.live_device(name)?;
        if !entry.roles.contains(&Role::Gateway) {
            return Err(ZoneError::Usage(format!(
                "{name} is not a gateway: only gateways have public addresses"
            )));
        }
        check_dialable(public_addrs)?;
        let addrs = distinct(public_addrs);
        if addrs.is_empty() {
            return Err(ZoneError::Usage(
                "a gateway needs --public-addr IP:PORT (the address agents dial)".into(),
            ));
        }
        check_not_taken(&self.zone.config.gateways, name, &addrs, &self.dir)?;
        let mut c = self.zone.config.clone();
        let Some(g) = c.gateways.iter_mut().find(|g| &g.device == name) else {
            return Err(ZoneError::Config(format!(
                "{name} has the gateway role but no gateway entry: this zone.json is inconsistent"
            )));
        };
        if g.addrs == addrs {
            return Err(ZoneError::Usage(format!(
                "{name} already has exactly these addresses: nothing to change"
            )));
        }
        g.addrs = addrs;
        self.commit(c, now)
    }

    /// Revokes a name this directory does not list (a device added in a newer copy of the
    /// zone, lost with it): its certificates are refused by name wherever this zone.json is
    /// known. Adding the name first to revoke it, as the only way used to be, issued a fresh
    /// certificate for it. False, and nothing changed, if it was revoked already.
    pub fn revoke_unlisted(
        &mut self,
        name: &DeviceName,
        now: OffsetDateTime,
    ) -> Result<bool, ZoneError> {
        if self.zone.config.is_revoked(name) {
            return Ok(false);
        }
        if self.zone.config.device(name).is_some() {
            return self.revoke(name, now);
        }
        let mut c = self.zone.config.clone();
        c.revoked.push(Revocation {
            device: name.clone(),
            revoked_at: trunc_now(now),
            cert_serials: Vec::new(),
        });
        // The one change that only grows a zone and must not wait on room (a stolen device
        // added in a newer copy of the zone): allowed past the usual limit, up to what
        // tunnel messages still carry (the gateways' DNS then publishes no TXT: the command
        // says so).
        let valid = self.zone.config.expires_at - self.zone.config.issued_at;
        self.commit_valid(c, now, valid, MAX_REVOKING_ZONE_JSON)?;
        Ok(true)
    }

    /// Revokes a device: its certificates are refused wherever this zone.json (or a newer one)
    /// is known. False, and nothing changed, if it was revoked already.
    pub fn revoke(&mut self, name: &DeviceName, now: OffsetDateTime) -> Result<bool, ZoneError> {
        if self.zone.config.is_revoked(name) {
            return Ok(false);
        }
        let entry = self.live_device(name)?.clone();
        let mut c = self.zone.config.clone();
        c.devices.retain(|d| &d.name != name);
        c.gateways.retain(|g| &g.device != name);
        c.revoked.push(Revocation {
            device: name.clone(),
            revoked_at: trunc_now(now),
            cert_serials: vec![entry.cert_serial],
        });
        self.commit(c, now)?;
        Ok(true)
    }

    /// Writes a self-contained, ready-to-run bundle for `name` into `out`: keys, certificates,
    /// zone.json, its config (kept if there is one: the template goes to `NAME.toml.new`)
    /// and, for a gateway, an empty `policies/`. The config's path.
    pub fn write_bundle(
        &self,
        out: &Path,
        name: &DeviceName,
        key: &DeviceKey,
        cert: &DeviceCert,
    ) -> Result<PathBuf, ZoneError> {
        make_dir(out, BUNDLE_DIR_MODE)?;
        remove_stale_temps(out);
        let entry = self
            .zone
            .config
            .device(name)
            .ok_or_else(|| ZoneError::NoSuchDevice(name.to_string()))?;
        let key_pem = key.to_pem()?;
        let key_path = out.join(DEVICE_KEY_FILE);
        // The same key there already, private (a renew in place: the key derives again the
        // same) is left as it is: written again under sudo, it became root's, 0600, and the
        // service's user could no longer read it at the restart the renew asks for.
        if !same_private_file(&key_path, key_pem.as_bytes()) {
            write_atomic(&key_path, key_pem.as_bytes(), 0o600)?;
        }
        write_atomic(&out.join(DEVICE_CERT_FILE), cert.pem.as_bytes(), 0o644)?;
        write_atomic(&out.join(ZONE_CA_FILE), self.ca_pem.as_bytes(), 0o644)?;
        write_atomic(
            &out.join(ZONE_JSON_FILE),
            self.zone.to_json_pretty().as_bytes(),
            0o644,
        )?;
        let is_gw = entry.roles.contains(&Role::Gateway);
        let (file, text) = if is_gw {
            ("gateway.toml", gateway_toml(&self.zone.config, name))
        } else {
            ("node.toml", node_toml(&self.zone.config, name))
        };
        if is_gw {
            // The config names it; an empty one serves no app until policies are added.
            let dir = out.join("policies");
            make_dir(&dir, BUNDLE_DIR_MODE)?;
        }
        let path = out.join(file);
        // A bundle renewed in place keeps the config its owner edited (services, TLS,
        // limits): the fresh template goes beside it.
        let target = if path.exists() {
            out.join(format!("{file}.new"))
        } else {
            path.clone()
        };
        write_atomic(&target, text.as_bytes(), 0o644)?;
        Ok(path)
    }
}

/// Whether `path` holds exactly `data` and others may not read it: its owner, or its group
/// as devices accept (`root:zonegate 0640`, for a service's user; a key kept only when
/// owner-only was written again as root's 0600 under sudo, and that service stopped).
fn same_private_file(path: &Path, data: &[u8]) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let private = fs::symlink_metadata(path)
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o007 == 0);
    private && fs::read(path).is_ok_and(|held| zeroize::Zeroizing::new(held).as_slice() == data)
}

fn gateways_comment(c: &ZoneConfig) -> String {
    let gws = c.gateway_addrs();
    if gws.is_empty() {
        "# No gateway in zone.json yet: add one with `zonegate device add NAME --role gateway --public-addr IP:PORT --zone DIR`,\n# then copy the new zone.json here.\n".into()
    } else {
        let list: Vec<String> = gws.iter().map(|(n, a)| format!("{n} at {a}")).collect();
        format!(
            "# Gateways (from zone.json serial {}): {}\n",
            c.serial,
            list.join(", ")
        )
    }
}

const COMMON_TAIL: &str = r#"
# Services this device offers to the zone. Nothing else on this device's network is reachable
# through zonegate. `proto` is "tcp" (default) or "udp".
# [services.web]
# local = "127.0.0.1:8000"

# Local ports that reach another device's service over the mesh. A policy app with
# `mesh = true` must allow this device, or the gateway refuses the stream.
# [[forward]]
# listen = "127.0.0.1:9000"
# to = "home2/etcd-peer"
"#;

fn header(c: &ZoneConfig, name: &DeviceName, what: &str, cmd: &str) -> String {
    format!(
        "# zonegate {what} for {host}\n# Start it with:  zonegate {cmd} --config THIS_FILE\n# Paths are relative to this file. Keep device.key private (mode 0600).\n\ndevice = \"{name}\"\ndomain = \"{domain}\"\nkey = \"{DEVICE_KEY_FILE}\"\ncert = \"{DEVICE_CERT_FILE}\"\nca = \"{ZONE_CA_FILE}\"\nzone_config = \"{ZONE_JSON_FILE}\"\n",
        host = c.domain.host_of(name),
        domain = c.domain,
    )
}

/// The node agent config of a bundle; `zonegate node --config` runs it as is.
pub fn node_toml(c: &ZoneConfig, name: &DeviceName) -> String {
    let mut s = header(c, name, "node agent", "node");
    s.push_str(&gateways_comment(c));
    s.push_str(&format!(
        "# Status JSON on loopback.\nadmin = \"{NODE_ADMIN_DEFAULT}\"\n"
    ));
    s.push_str(COMMON_TAIL);
    s
}

/// The gateway config of a bundle; `zonegate gateway --config` runs it as is.
pub fn gateway_toml(c: &ZoneConfig, name: &DeviceName) -> String {
    let mut s = header(c, name, "gateway", "gateway");
    let addrs = c
        .gateways
        .iter()
        .find(|g| &g.device == name)
        .map(|g| g.addrs.as_slice())
        .unwrap_or_default();
    let port = addrs.first().map(|a| a.port()).unwrap_or(4433);
    // With an IPv6 public address, one dual-stack socket takes both families.
    let (any, families) = if addrs.iter().any(|a| a.is_ipv6()) {
        ("[::]", "IPv4 and IPv6")
    } else {
        ("0.0.0.0", "IPv4")
    };
    s.push_str(&gateways_comment(c));
    if let Some(note) = mixed_ports_note(addrs) {
        s.push_str(&format!("# Note: {note}\n"));
    }
    s.push_str(&format!(
        "# QUIC for node agents: the port of this gateway's public address, on all interfaces ({families}).\nlisten = \"{any}:{port}\"\n# Traffic policy files (TOML); edits are picked up while running.\npolicies = \"policies\"\n# Admin API and status page, loopback only.\nadmin = \"{GATEWAY_ADMIN_DEFAULT}\"\n# Public HTTP and HTTPS front (\"off\" to disable). Ports below 1024 need root or\n# CAP_NET_BIND_SERVICE. Without [[tls]] entries HTTPS uses a self-signed certificate.\n# Defaults: [::] takes IPv4 and IPv6 (0.0.0.0 where the machine has no IPv6).\n# http = \"[::]:80\"\n# https = \"[::]:443\"\n# The zone's DNS server (UDP and TCP; \"off\" to disable), as the front's ports.\n# dns = \"[::]:53\"\n# Certificate files are read again when they change (a renewal needs no restart). Under the\n# systemd unit the gateway runs as `zonegate`, which cannot read certbot's live/ directory:\n# have a deploy hook copy them here, e.g. certbot ... --deploy-hook 'install -D -o zonegate -m 600\n# -t /etc/zonegate/gw/tls $RENEWED_LINEAGE/fullchain.pem $RENEWED_LINEAGE/privkey.pem'\n# [[tls]]\n# cert = \"tls/fullchain.pem\"\n# key = \"tls/privkey.pem\"\n"
    ));
    s.push_str(COMMON_TAIL);
    s
}

/// Said when a gateway's public addresses use more than one port: it listens for QUIC on one
/// (the first address's), so agents dialing the others reach it only through a port mapping in
/// front of it (a NAT VPS's, say). Not refused, since such a mapping is a real set-up.
pub fn mixed_ports_note(addrs: &[SocketAddr]) -> Option<String> {
    let first = addrs.first()?.port();
    let others: Vec<String> = addrs
        .iter()
        .filter(|a| a.port() != first)
        .map(|a| a.to_string())
        .collect();
    if others.is_empty() {
        return None;
    }
    Some(format!(
        "the gateway listens for QUIC on port {first} only, so agents dialing {} reach it only if something in front of it forwards that port to {first}; otherwise give every public address port {first}",
        others.join(", ")
    ))
}

/// Holds an exclusive `flock` on the zone directory itself until dropped: one commit at a
/// time, so each sees what the one before it saved. The directory, opened read-only, not a
/// lock file in it: one made by a command run with sudo would lock every later user out.
fn lock_dir(dir: &Path) -> Result<fs::File, ZoneError> {
    let f = fs::File::open(dir).map_err(|e| ZoneError::io(dir, e))?;
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive) {
        Ok(()) => Ok(f),
        // A file system without locks (some network and FUSE mounts): the serial compare
        // still catches a change made meanwhile, only not one made in the same instant.
        Err(rustix::io::Errno::NOTSUP | rustix::io::Errno::NOLCK) => Ok(f),
        Err(e) => Err(ZoneError::io(dir, e.into())),
    }
}

/// Refuses public addresses agents cannot dial: `0.0.0.0`, `[::]`, multicast, broadcast or
/// port 0 (the zone's DNS leaves the unspecified ones out, but agents would try them all).
fn check_dialable(addrs: &[SocketAddr]) -> Result<(), ZoneError> {
    let undialable = |a: &&SocketAddr| {
        let ip = a.ip().to_canonical();
        // A multicast or broadcast address answers no QUIC handshake.
        let broadcast = matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast());
        ip.is_unspecified() || ip.is_multicast() || broadcast || a.port() == 0
    };
    match addrs.iter().find(undialable) {
        Some(a) => Err(ZoneError::Usage(format!(
            "--public-addr {a}: agents cannot dial it; give the address and port the gateway is reached at from the internet"
        ))),
        None => Ok(()),
    }
}

/// `t` as RFC 3339, for messages.
/// Before this, a clock is wrong, not early: no zonegate existed to make a zone then.
const CLOCK_FLOOR_UNIX: i64 = 1_735_689_600; // 2025-01-01T00:00:00Z

/// Refuses a `now` before zonegate existed for `zone init`: a Raspberry Pi without a clock
/// reads 1970 until NTP answers, and a zone CA made then ended in 1989, so every device
/// certificate it signed was out of date on arrival and no command could mend it.
fn clock_not_before_zonegate(now: OffsetDateTime) -> Result<(), ZoneError> {
    if now.unix_timestamp() < CLOCK_FLOOR_UNIX {
        return Err(ZoneError::Usage(format!(
            "this machine's clock reads {}, before zonegate existed: the zone's CA certificate would be dated from it and end 20 years on; set the clock right (NTP: `timedatectl`) and run zone init again (nothing was made)",
            rfc3339(now)
        )));
    }
    Ok(())
}

/// `t` as logs and messages write times (RFC 3339): `OffsetDateTime`'s own Display reads
/// "2027-12-07 23:29:46.0 +00:00:00".
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Temp files a crash left (a key's copy among them) go once a minute old; others stay.
    #[test]
    fn stale_temp_files_are_removed_and_nothing_else() {
        let t = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(120);
        let names = [
            (".device.key.tmp123.0", true),
            (".zone.key.new4567", true),
            (".device.key.tmp123.x", false),
            ("device.key", false),
            (".hidden", false),
            (".zone.json.tmp9.1", true),
        ];
        for (name, _) in names {
            let f = fs::File::create(t.path().join(name)).unwrap();
            f.set_modified(old).unwrap();
        }
        fs::write(t.path().join(".fresh.tmp1.2"), "").unwrap();
        remove_stale_temps(t.path());
        for (name, gone) in names {
            assert_eq!(!t.path().join(name).exists(), gone, "{name}");
        }
        assert!(
            t.path().join(".fresh.tmp1.2").exists(),
            "one being written now"
        );
    }

    /// A clock more than a day behind the zone's last change is refused: what it signed would
    /// be expired on arrival. A clock just a little behind (another machine's) is fine.
    #[test]
    fn a_clock_far_behind_the_zones_last_change_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("z");
        let now = OffsetDateTime::now_utc();
        let z = ZoneDir::init(&d, Domain::new("alice.example").unwrap(), now).unwrap();
        let e = z
            .clock_not_behind(now - time::Duration::days(400))
            .unwrap_err();
        assert!(e.to_string().contains("set the clock right"), "{e}");
        z.clock_not_behind(now - time::Duration::hours(2)).unwrap();
        // Changes that issue no certificate sign as of the later of the two.
        let behind = now - time::Duration::days(400);
        assert_eq!(z.signing_time(behind), z.zone.config.issued_at);
        let ahead = now + time::Duration::days(3);
        assert_eq!(z.signing_time(ahead), ahead);
    }

    /// A zone made while the clock reads 1970 (a Raspberry Pi before NTP answers) is refused:
    /// its CA ended in 1989, and no certificate it signed could ever be used. A CA that has
    /// ended signs nothing; one ending sooner than a certificate asks cuts it to its end.
    #[test]
    fn zone_cas_of_a_wrong_clock_or_past_their_end_sign_nothing() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("z");
        let e = ZoneDir::init(
            &d,
            Domain::new("alice.example").unwrap(),
            OffsetDateTime::UNIX_EPOCH,
        )
        .unwrap_err();
        assert!(e.to_string().contains("set the clock right"), "{e}");
        assert!(!d.exists(), "made on a wrong clock");

        let now = OffsetDateTime::now_utc();
        let mut z = ZoneDir::init(&d, Domain::new("alice.example").unwrap(), now).unwrap();
        let end = z.ca_not_after().expect("the CA's end");
        let name = DeviceName::new("home1").unwrap();
        let late = end - time::Duration::days(10);
        let (_, c) = z.add_device(&name, &[Role::Node], &[], late, 365).unwrap();
        assert_eq!(c.not_after, end, "cut to the CA's end");
        let name = DeviceName::new("home2").unwrap();
        let after = end + time::Duration::days(1);
        let e = z
            .add_device(&name, &[Role::Node], &[], after, 365)
            .unwrap_err();
        assert!(e.to_string().contains("zone-ca.crt) ended at"), "{e}");
        assert!(z.zone.config.device(&name).is_none(), "added all the same");
    }

    /// A bundle written again in place (`device renew`) leaves the device key as it is when
    /// it holds that key and others may not read it, its group included as devices accept:
    /// written anew it became the writer's (root's under sudo), 0600, and the service's user
    /// could no longer read it. A key others may read is written anew (0600).
    #[test]
    fn a_bundle_written_again_keeps_a_group_readable_key() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let t = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let mut z = ZoneDir::init(
            &t.path().join("z"),
            Domain::new("alice.example").unwrap(),
            now,
        )
        .unwrap();
        let name = DeviceName::new("home1").unwrap();
        let (key, cert) = z.add_device(&name, &[Role::Node], &[], now, 90).unwrap();
        let out = t.path().join("home1");
        z.write_bundle(&out, &name, &key, &cert).unwrap();
        let k = out.join(DEVICE_KEY_FILE);
        for (mode, kept) in [(0o640, true), (0o600, true), (0o644, false)] {
            fs::set_permissions(&k, fs::Permissions::from_mode(mode)).unwrap();
            let ino = fs::metadata(&k).unwrap().ino();
            z.write_bundle(&out, &name, &key, &cert).unwrap();
            let m = fs::metadata(&k).unwrap();
            assert_eq!(m.ino() == ino, kept, "mode {mode:o}");
            let want = if kept { mode } else { 0o600 };
            assert_eq!(m.permissions().mode() & 0o777, want, "mode {mode:o}");
        }
    }

    /// An existing directory others may write is refused before anything is written into
    /// it: they could delete or replace the zone key. One only its owner writes is used.
    #[test]
    fn zone_init_refuses_a_directory_others_may_write() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("z");
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o775)).unwrap();
        let now = OffsetDateTime::now_utc();
        let e = ZoneDir::init(&d, Domain::new("alice.example").unwrap(), now).unwrap_err();
        assert!(
            e.to_string()
                .contains("the zone directory is not private enough: others may write it")
                && e.to_string().contains("chmod 700"),
            "{e}"
        );
        assert_eq!(fs::read_dir(&d).unwrap().count(), 0, "written into");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        ZoneDir::init(&d, Domain::new("alice.example").unwrap(), now).unwrap();
    }

    /// A zone key is never written over another (two inits at once), and a directory left
    /// half made by an interrupted init says so, to init and to every other command.
    #[test]
    fn zone_init_never_replaces_a_key_and_a_half_made_zone_says_so() {
        let t = tempfile::tempdir().unwrap();
        let key = t.path().join(ZONE_KEY_FILE);
        assert!(write_new(&key, b"first", 0o600).is_ok());
        assert!(matches!(
            write_new(&key, b"second", 0o600),
            Err(WriteNewError::Exists)
        ));
        assert_eq!(fs::read(&key).unwrap(), b"first");
        assert_eq!(
            fs::read_dir(t.path()).unwrap().count(),
            1,
            "no temp file left"
        );

        let d = t.path().join("z");
        let now = OffsetDateTime::now_utc();
        ZoneDir::init(&d, Domain::new("alice.example").unwrap(), now).unwrap();
        fs::remove_file(d.join(ZONE_JSON_FILE)).unwrap();
        let Err(e) = ZoneDir::open(&d) else {
            panic!("a half-made zone opened");
        };
        assert!(
            matches!(
                e,
                ZoneError::IncompleteZone {
                    missing: ZONE_JSON_FILE,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("zone init"), "{e}");
        let again = ZoneDir::init(&d, Domain::new("alice.example").unwrap(), now);
        assert!(matches!(again, Err(ZoneError::IncompleteZone { .. })));

        // The CA lost from a whole zone (zone.json is written last): not "init again", which
        // makes a zone no device trusts, but the copy every bundle holds.
        let d = t.path().join("lost-ca");
        ZoneDir::init(&d, Domain::new("alice.example").unwrap(), now).unwrap();
        let ca = fs::read(d.join(ZONE_CA_FILE)).unwrap();
        fs::remove_file(d.join(ZONE_CA_FILE)).unwrap();
        let Err(opened) = ZoneDir::open(&d) else {
            panic!("opened without its CA");
        };
        let Err(made) = ZoneDir::init(&d, Domain::new("alice.example").unwrap(), now) else {
            panic!("made again");
        };
        for e in [opened, made] {
            assert!(matches!(e, ZoneError::LostCa(_)), "{e}");
            assert!(
                e.to_string()
                    .contains("copy zone-ca.crt from any device's bundle"),
                "{e}"
            );
        }
        fs::write(d.join(ZONE_CA_FILE), ca).unwrap();
        ZoneDir::open(&d).unwrap();
    }

    #[test]
    fn serials_carry_the_clock_and_still_count_up() {
        let t = time::macros::datetime!(2026-12-04 18:00 UTC);
        let secs = t.unix_timestamp() as u64;
        assert_eq!(next_serial(3, t), secs);
        assert_eq!(next_serial(secs, t), secs + 1);
        assert_eq!(next_serial(secs + 5, t), secs + 6);
    }

    /// A change that would make the zone config too large to pass on is refused and leaves
    /// zone.json as it was (a 60 KiB+ config used to be saved, then every gateway failed to
    /// send it and took every tunnel down).
    #[test]
    fn a_zone_config_too_large_to_pass_on_is_never_made() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let mut z = ZoneDir::init(dir.path(), Domain::new("big.example").unwrap(), now).unwrap();
        let mut added = 0;
        let err = loop {
            let name = DeviceName::new(&format!("device{added}")).unwrap();
            match z.add_device(&name, &[Role::Node], &[], now, 90) {
                Ok(_) => added += 1,
                Err(e) => break e,
            }
            assert!(added < 10_000, "never refused");
        };
        let msg = err.to_string();
        assert!(msg.contains("more than the 40960"), "{msg}");
        assert!(msg.contains("nothing was changed"), "{msg}");
        assert!(added > 50, "refused at {added} devices");
        let on_disk = read_zone_json(&dir.path().join(ZONE_JSON_FILE)).unwrap();
        assert_eq!(on_disk.config.devices.len(), added);
        assert!(on_disk.to_json_compact().len() <= MAX_SHARED_ZONE_JSON);
        // A revocation always fits: it drops the device's entry, larger than its own.
        z.revoke(&DeviceName::new("device0").unwrap(), now).unwrap();
        // A revocation by name alone (a device of a newer copy of the zone) only grows it:
        // allowed past the limit, up to what tunnel messages carry.
        let mut by_name = 0;
        let err = loop {
            let name = DeviceName::new(&format!("stolen{by_name}")).unwrap();
            match z.revoke_unlisted(&name, now) {
                Ok(true) => by_name += 1,
                Ok(false) => panic!("{name} was revoked already"),
                Err(e) => break e,
            }
            assert!(by_name < 10_000, "never refused");
        };
        assert!(err.to_string().contains("more than the 57344"), "{err}");
        let size = z.zone.to_json_compact().len();
        assert!(
            size > MAX_SHARED_ZONE_JSON && size <= MAX_REVOKING_ZONE_JSON,
            "{size}"
        );
    }

    /// The zone key others may read is refused with the command that fixes it; a zone
    /// directory without its key (a device's bundle looks so) is told apart from no zone.
    #[test]
    fn a_readable_or_missing_zone_key_is_said_plainly() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        ZoneDir::init(dir.path(), Domain::new("keys.example").unwrap(), now).unwrap();
        let key = dir.path().join(ZONE_KEY_FILE);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = ZoneDir::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("chmod 600") && e.contains("644"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        ZoneDir::open(dir.path()).unwrap();
        std::fs::remove_file(&key).unwrap();
        let e = ZoneDir::open(dir.path()).err().unwrap();
        assert!(matches!(e, ZoneError::NoZoneKey(..)), "{e}");
        assert!(e.to_string().contains("restore zone.key"), "{e}");
        // zone.json alone: the same, not "create one with `zone init`" (which refuses it).
        std::fs::remove_file(dir.path().join(ZONE_CA_FILE)).unwrap();
        let e = ZoneDir::open(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains("zone.json but no zone.key") && !e.contains("zone init --domain"),
            "{e}"
        );
    }

    /// Revoking a name revoked already changes nothing (no new serial); a gateway's address
    /// given twice is listed once; certificates start a day back (a device whose clock runs
    /// behind until NTP answers took a renewed one as not yet valid).
    #[test]
    fn revoke_twice_repeated_addresses_and_certificate_start() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let mut z = ZoneDir::init(dir.path(), Domain::new("twice.example").unwrap(), now).unwrap();
        let gw = DeviceName::new("gw").unwrap();
        let addr: SocketAddr = "203.0.113.7:4433".parse().unwrap();
        let (_, cert) = z
            .add_device(&gw, &[Role::Gateway], &[addr, addr], now, 90)
            .unwrap();
        assert_eq!(z.zone.config.gateways[0].addrs, [addr]);
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert.pem.as_bytes()).unwrap();
        let starts = pem.parse_x509().unwrap().validity().not_before.timestamp();
        assert!(
            starts <= (now - time::Duration::hours(23)).unix_timestamp(),
            "{starts}"
        );
        let laptop = DeviceName::new("laptop").unwrap();
        z.add_device(&laptop, &[Role::Node], &[], now, 90).unwrap();
        assert!(z.revoke(&laptop, now).unwrap());
        let serial = z.zone.config.serial;
        assert!(!z.revoke(&laptop, now).unwrap());
        assert_eq!(
            ZoneDir::open(dir.path()).unwrap().zone.config.serial,
            serial
        );
        // A name this copy never listed (a device added in a newer, lost copy): revoked by
        // name, no certificate issued for it, and only once.
        let lost = DeviceName::new("stolen").unwrap();
        assert!(matches!(
            z.revoke(&lost, now),
            Err(ZoneError::NoSuchDevice(_))
        ));
        assert!(z.revoke_unlisted(&lost, now).unwrap());
        assert!(z.zone.config.is_revoked(&lost));
        assert!(z.zone.config.device(&lost).is_none());
        assert!(!dir.path().join("devices/stolen").exists());
        assert!(!z.revoke_unlisted(&lost, now).unwrap());
        let back = ZoneDir::open(dir.path()).unwrap();
        assert!(back.zone.config.is_revoked(&lost));
    }

    /// Two commands on one zone directory at once: the second to save is refused and changes
    /// nothing, so no change is lost (the revocation used to be written over).
    #[test]
    fn a_change_made_meanwhile_is_never_written_over() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let mut z = ZoneDir::init(dir.path(), Domain::new("race.example").unwrap(), now).unwrap();
        let laptop = DeviceName::new("laptop").unwrap();
        z.add_device(&laptop, &[Role::Node], &[], now, 90).unwrap();
        let mut one = ZoneDir::open(dir.path()).unwrap();
        let mut two = ZoneDir::open(dir.path()).unwrap();
        one.revoke(&laptop, now).unwrap();
        let tv = DeviceName::new("tv").unwrap();
        let e = two
            .add_device(&tv, &[Role::Node], &[], now, 90)
            .unwrap_err();
        assert!(e.to_string().contains("run this one again"), "{e}");
        let back = ZoneDir::open(dir.path()).unwrap();
        assert!(back.zone.config.is_revoked(&laptop));
        assert!(back.zone.config.device(&tv).is_none());
    }

    /// Names the zone's DNS could not carry, and gateway addresses agents could not dial, are
    /// refused before anything is signed (a device name too long for its domain made every
    /// later serial fail to build its DNS records).
    #[test]
    fn devices_must_fit_dns_and_gateways_be_dialable() {
        let label = "a".repeat(60);
        let long = format!("{}.example", [label.as_str(); 3].join("."));
        assert!(Domain::new(&long).is_ok());
        let too_long = format!("{}.example", [label.as_str(); 4].join("."));
        let dir = tempfile::tempdir().unwrap();
        let e = ZoneDir::init(
            dir.path(),
            Domain::new(&too_long).unwrap(),
            OffsetDateTime::now_utc(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("longer than 242"), "{e}");
        let now = OffsetDateTime::now_utc();
        let mut z = ZoneDir::init(dir.path(), Domain::new(&long).unwrap(), now).unwrap();
        let name = DeviceName::new(&"n".repeat(63)).unwrap();
        let e = z
            .add_device(&name, &[Role::Node], &[], now, 90)
            .unwrap_err();
        assert!(
            e.to_string().contains("choose a shorter device name"),
            "{e}"
        );
        let short = DeviceName::new("nas").unwrap();
        z.add_device(&short, &[Role::Node], &[], now, 90).unwrap();
        let gw = DeviceName::new("gw").unwrap();
        for bad in [
            "0.0.0.0:7843",
            "[::]:7843",
            "203.0.113.1:0",
            "224.0.0.1:7843",
            "255.255.255.255:7843",
            "[ff02::1]:7843",
            "[::ffff:239.1.1.1]:7843",
        ] {
            let e = z
                .add_device(&gw, &[Role::Gateway], &[bad.parse().unwrap()], now, 90)
                .unwrap_err();
            assert!(
                e.to_string().contains("agents cannot dial it"),
                "{bad}: {e}"
            );
        }
        let serial = z.zone.config.serial;
        z.add_device(
            &gw,
            &[Role::Gateway],
            &["203.0.113.1:7843".parse().unwrap()],
            now,
            90,
        )
        .unwrap();
        assert!(z.zone.config.serial > serial);
        let e = z
            .move_gateway(&gw, &["0.0.0.0:7843".parse().unwrap()], now)
            .unwrap_err();
        assert!(e.to_string().contains("agents cannot dial it"), "{e}");
        name_fits_after_all(&z);
    }

    /// A new zone directory is its owner's alone, so nobody else can delete the zone key; a
    /// bundle's is nobody else's to write.
    #[test]
    fn a_new_zone_directory_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("new/zone");
        let now = OffsetDateTime::now_utc();
        let mut z = ZoneDir::init(&dir, Domain::new("example.org").unwrap(), now).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir) & 0o077, 0, "{:o}", mode(&dir));
        let gw = DeviceName::new("gw").unwrap();
        let (key, cert) = z
            .add_device(
                &gw,
                &[Role::Gateway],
                &["203.0.113.1:7843".parse().unwrap()],
                now,
                90,
            )
            .unwrap();
        let out = t.path().join("bundles/gw");
        z.write_bundle(&out, &gw, &key, &cert).unwrap();
        for d in [out.clone(), out.join("policies")] {
            assert_eq!(mode(&d) & 0o022, 0, "{}: {:o}", d.display(), mode(&d));
        }
    }

    /// A gateway reached on two ports listens on one: its gateway.toml and `device add` say so.
    #[test]
    fn a_gateway_with_public_addresses_on_two_ports_is_told_it_listens_on_one() {
        let one: Vec<SocketAddr> = vec![
            "203.0.113.1:7843".parse().unwrap(),
            "[2001:db8::1]:7843".parse().unwrap(),
        ];
        assert_eq!(mixed_ports_note(&one), None);
        assert_eq!(mixed_ports_note(&[]), None);
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let mut z = ZoneDir::init(dir.path(), Domain::new("example.org").unwrap(), now).unwrap();
        let gw = DeviceName::new("gw").unwrap();
        let two = [
            "203.0.113.1:7843".parse().unwrap(),
            "[2001:db8::1]:443".parse().unwrap(),
        ];
        z.add_device(&gw, &[Role::Gateway], &two, now, 90).unwrap();
        let note = mixed_ports_note(&two).unwrap();
        assert!(
            note.contains("port 7843 only") && note.contains("[2001:db8::1]:443"),
            "{note}"
        );
        let toml = gateway_toml(&z.zone.config, &gw);
        assert!(toml.contains(&format!("# Note: {note}\n")), "{toml}");
        assert!(toml.contains("listen = \"[::]:7843\""), "{toml}");
    }

    fn name_fits_after_all(z: &ZoneDir) {
        let d = &z.zone.config.domain;
        assert!(z.zone.config.devices.iter().all(|e| d.fits(&e.name)));
    }

    /// Writers of one process at once (a gateway adopting offers from several agents) each
    /// get their own temp file: with one name per process, one's remove or rename took the
    /// other's half-written file.
    #[test]
    fn concurrent_atomic_writes_leave_one_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("zone.json");
        let writers: Vec<_> = (0..8u8)
            .map(|i| {
                let target = target.clone();
                std::thread::spawn(move || {
                    let data = vec![b'a' + i; 256 * 1024];
                    for _ in 0..20 {
                        write_atomic(&target, &data, 0o644).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let got = std::fs::read(&target).unwrap();
        assert_eq!(got.len(), 256 * 1024);
        assert!(got.iter().all(|&c| c == got[0]), "a mix of writers");
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1, "temp files left behind");
    }
}
