//! TLS for the public front: rustls with the certificate chosen by SNI among PEM files named
//! in gateway.toml (`[[tls]] cert = … key = …`), ALPN `h2` and `http/1.1`.
//!
//! With no files configured, a self-signed certificate is made at start for the zone's names
//! (`DOMAIN`, `*.DOMAIN`, and the hosts of the policy's http apps), so HTTPS works out of the
//! box; browsers warn about it until real certificates are configured. It is issued again,
//! with the same key, when a policy edit changes those hosts ([`Tls::reissue_self_signed`]).
//!
//! The cipher suite is the server's choice, AES-128-GCM first ([`front_provider`]).
//!
//! Certificate files are read again when they change ([`Tls::reload_if_changed`], polled by
//! the gateway): a renewal (certbot every 60 days or so) is served without a restart, and a
//! broken one is refused with the old certificates serving on. At start a pair that does not
//! load is left out while the others serve ([`configure`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CipherSuite, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocols offered, preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("TLS set-up: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("making a self-signed certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
    /// Several pairs failing at one look, each said.
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Several(Vec<TlsError>),
    /// At start, no `[[tls]]` pair loads: HTTPS, and with it the gateway, cannot start.
    #[error("{0}: no [[tls]] certificate loads, so the gateway cannot start: fix or copy the files again (a renewal's copy half done is retried at the next start), or take the [[tls]] entries out of gateway.toml to serve a self-signed certificate meanwhile")]
    NoneLoads(Box<TlsError>),
}

fn file_err(path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        why: why.to_string(),
    }
}

/// One certificate and the names it serves (DNS SANs, lowercase; may start with `*.`).
#[derive(Debug, Clone)]
struct Entry {
    names: Vec<String>,
    key: Arc<CertifiedKey>,
    /// The leaf's validity (Unix seconds, from and until); `None` when its dates cannot be
    /// read (rustls' own checks then).
    valid: Option<(i64, i64)>,
}

impl Entry {
    fn in_date(&self, now: i64) -> bool {
        self.valid
            .is_none_or(|(from, until)| from <= now && now <= until)
    }
}

/// The current time in Unix seconds (0 if the clock is before 1970).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Why `cert` (a leaf) is no certificate to serve at `now` (Unix seconds): expired, or not
/// valid yet. `None` when it is, or when its dates cannot be read (rustls' own checks then).
fn out_of_date(cert: &CertificateDer<'_>, now: i64) -> Option<String> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let v = x.validity();
    if now > v.not_after.timestamp() {
        Some(format!("the certificate expired on {}", v.not_after))
    } else if now < v.not_before.timestamp() {
        Some(format!(
            "the certificate is valid only from {}",
            v.not_before
        ))
    } else {
        None
    }
}

/// Picks a certificate by SNI: exact name first, then a one-label wildcard; without SNI or
/// without a match, the first certificate (a client then sees a name mismatch, which is the
/// honest answer). The set is swapped whole when the files are read again.
#[derive(Debug)]
pub struct SniResolver {
    entries: ArcSwap<Entries>,
}

/// The certificates a resolver picks from.
#[derive(Debug)]
struct Entries(Vec<Entry>);

impl Entries {
    /// Index of the entry for `sni` at `now`: among the certificates in date first (an
    /// expired one kept while its renewal fails loses to a wildcard that covers its name),
    /// then among all (an expired certificate for the name says more than another name's).
    fn pick(&self, sni: Option<&str>, now: i64) -> usize {
        let Some(sni) = sni.map(|s| s.trim_end_matches('.').to_ascii_lowercase()) else {
            return 0;
        };
        let parent = sni.split_once('.').map(|(_, p)| p);
        let find = |usable: &dyn Fn(&Entry) -> bool| {
            let exact = self
                .0
                .iter()
                .position(|e| usable(e) && e.names.contains(&sni));
            exact.or_else(|| {
                let parent = parent?;
                self.0.iter().position(|e| {
                    usable(e) && e.names.iter().any(|n| n.strip_prefix("*.") == Some(parent))
                })
            })
        };
        find(&|e| e.in_date(now))
            .or_else(|| find(&|_| true))
            .unwrap_or(0)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let entries = self.entries.load();
        entries
            .0
            .get(entries.pick(hello.server_name(), unix_now()))
            .map(|e| e.key.clone())
    }
}

/// ring's suites with AES-128-GCM ahead of AES-256-GCM (TLS 1.3 and 1.2), the rest in ring's
/// order; the server picks ([`ServerConfig::ignore_client_order`]), since OpenSSL-based
/// clients list AES-256-GCM first. TLS 1.3's key schedule runs on the suite's hash: SHA-256
/// for AES-128-GCM, which x86's SHA extensions compute, where AES-256-GCM's SHA-384 runs on
/// vector code. A resumed handshake plus one request through the front cost the gateway
/// 142–151 µs of CPU with AES-256-GCM and 128–133 µs with AES-128-GCM (wrk `Connection:
/// close` over HTTPS, 3 rounds each; `perf`: SHA-512's block function 14.6 % of the gateway's
/// time before, SHA-256's 4 % after). AES-128-GCM is TLS 1.3's mandatory suite and Go's and
/// BoringSSL's first choice.
///
/// Go also keeps a client's order when it lists ChaCha20-Poly1305 before AES-GCM (a CPU
/// without AES instructions). rustls fixes the order per configuration, so that needs a
/// configuration chosen per connection from its ClientHello (`LazyConfigAcceptor`), which cost
/// ~7 µs per handshake here (the hello is copied out and parsed twice): such clients (old
/// ARMv7 phones) get AES-128-GCM in software instead.
fn front_provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            CipherSuite::TLS13_AES_128_GCM_SHA256
                | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(p)
}

fn dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, x)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = x.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|g| match g {
            GeneralName::DNSName(n) => Some(n.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

fn entry(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Entry, rustls::Error> {
    let names = chain.first().map(dns_names).unwrap_or_default();
    let valid = chain.first().and_then(|leaf| {
        let (_, x) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
        let v = x.validity();
        Some((v.not_before.timestamp(), v.not_after.timestamp()))
    });
    let signing = front_provider().key_provider.load_private_key(key)?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()?;
    Ok(Entry {
        names,
        key: Arc::new(ck),
        valid,
    })
}

/// Reads a certificate or key file, saying what to do when the gateway may not read it.
fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => file_err(
            path,
            format!("{e}: the gateway's user cannot read it (the systemd unit runs it as `zonegate`; certbot's live/ is root's): copy the files where it can, e.g. a certbot --deploy-hook copying them into the bundle directory and chowning them to zonegate"),
        ),
        _ => file_err(path, e),
    })
}

/// Says at warn when others than its owner and group may read the key file (0644 after a
/// copy): served as it is, which is what certbot's own modes allow too.
fn warn_if_others_read(key: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(key) {
        let mode = m.permissions().mode();
        if mode & 0o007 != 0 {
            tracing::warn!(path = %key.display(), mode = format!("{:o}", mode & 0o777), "HTTPS private key readable by every user of this machine: run `chmod 640` (or 600) on it");
        }
    }
}

fn load_pair(cert: &Path, key: &Path) -> Result<Entry, TlsError> {
    let pem = read_pem(cert)?;
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert, format!("not a PEM certificate file: {e}")))?;
    if chain.is_empty() {
        return Err(file_err(cert, "no certificate in this PEM file"));
    }
    // Each certificate parsed here: a damaged one (a renewal's copy cut short in its base64)
    // failed later, as the key's mismatch ("invalid peer certificate: BadEncoding (is it the
    // key of …?)"), and sent the operator to the key file.
    for (i, c) in chain.iter().enumerate() {
        if let Err(e) = x509_parser::parse_x509_certificate(c.as_ref()) {
            let which = match i {
                0 => "its first certificate (the server's own)".to_owned(),
                n => format!("certificate {} of its chain", n + 1),
            };
            return Err(file_err(
                cert,
                format!("{which} is not a valid X.509 certificate ({e}): copy it again from the CA's files"),
            ));
        }
    }
    let pem = read_pem(key)?;
    // `ENCRYPTED PRIVATE KEY` (or a legacy key's `Proc-Type: 4,ENCRYPTED`) is no key rustls
    // reads: "no private key" (or a base64 error, for the legacy form) sent the operator
    // looking for another problem.
    const ENCRYPTED: &str = "the private key is encrypted (a passphrase), which the gateway cannot read: write it unencrypted, readable only by the gateway's user (`openssl pkey -in KEY -out KEY.new` asks for the passphrase; then `chmod 600`)";
    let encrypted = String::from_utf8_lossy(&pem).contains("ENCRYPTED");
    let pk = match rustls_pemfile::private_key(&mut pem.as_slice()) {
        _ if encrypted => return Err(file_err(key, ENCRYPTED)),
        Ok(Some(pk)) => pk,
        Ok(None) => return Err(file_err(key, "no private key in this PEM file")),
        Err(e) => return Err(file_err(key, format!("not a PEM key file: {e}"))),
    };
    let e = entry(chain, pk)
        .map_err(|e| file_err(key, format!("{e} (is it the key of {}?)", cert.display())))?;
    if e.names.is_empty() {
        return Err(file_err(
            cert,
            "the certificate names no DNS host (subjectAltName)",
        ));
    }
    Ok(e)
}

/// The server configuration and, when self-signed, that certificate in PEM (to show the
/// operator and for tests to trust).
#[derive(Debug)]
pub struct Tls {
    pub config: Arc<ServerConfig>,
    pub self_signed_pem: Option<String>,
    /// Names served, for the start-up log.
    pub names: Vec<String>,
    /// The certificate files, to read again when they change.
    files: CertFiles,
    /// Without files: the self-signed certificate's key, kept to issue it again for new names
    /// (a client that pinned the key keeps trusting it).
    self_signed_key: Option<rcgen::KeyPair>,
}

/// The `(cert, key)` files served, and what they looked like when last read.
#[derive(Debug)]
struct CertFiles {
    pairs: Vec<(PathBuf, PathBuf)>,
    seen: Vec<Fingerprint>,
    resolver: Arc<SniResolver>,
    /// The error of the last read, while the files do not load: they are read again at
    /// every look (a permission fixed, the second file of a renewal in place).
    failing: Option<String>,
    /// The pairs that failed at the last look: one that loads now serves anew, files
    /// changed or not (a certificate that became valid).
    failed_pairs: std::collections::HashSet<usize>,
    /// What each pair serves (by its place in `pairs`): its last certificate that loaded,
    /// kept while its files fail; `None` for one that never loaded.
    last: Vec<Option<Entry>>,
    /// What [`Tls::expiry`] last said of each certificate served (by its names and end).
    told: std::collections::HashMap<(Vec<String>, i64), Expiry>,
}

/// Where a certificate served from files stands against its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    InDate,
    /// Less than a quarter of its lifetime left: a renewal is due (certbot renews a 90-day
    /// certificate with 30 days left, a short-lived one with a third of its life left) and
    /// has not happened.
    Soon,
    Expired,
}

/// A change in how a served certificate stands against its end ([`Tls::expiry`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiryNote {
    pub names: Vec<String>,
    pub not_after: i64,
    pub now: Expiry,
}

impl ExpiryNote {
    /// Days left until the certificate ends (negative once it has).
    pub fn days_left(&self, now: i64) -> i64 {
        (self.not_after - now).div_euclid(86_400)
    }
}

/// A file as last seen (symlinks followed: certbot's live/ names point to new files at each
/// renewal; the change time: a `chown`/`chmod` making it readable), or the error reading its
/// metadata.
type Fingerprint = Result<(u64, u64, Option<SystemTime>, i64, i64), String>;

fn fingerprint(path: &Path) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| {
            (
                m.ino(),
                m.len(),
                m.modified().ok(),
                m.ctime(),
                m.ctime_nsec(),
            )
        })
        .map_err(|e| e.to_string())
}

impl CertFiles {
    fn fingerprints(&self) -> Vec<Fingerprint> {
        self.pairs
            .iter()
            .flat_map(|(c, k)| [fingerprint(c), fingerprint(k)])
            .collect()
    }
}

/// One `[[tls]]` pair as it serves, for `/status` and `/metrics`: monitoring alerts on a
/// certificate's end or a pair failing, before browsers refuse it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedCert {
    /// Its `cert` file, as gateway.toml names it.
    pub file: PathBuf,
    /// The names its certificate serves; empty when it never loaded.
    pub names: Vec<String>,
    /// The served certificate's validity, from and until (Unix seconds); `None` when none
    /// ever loaded or its dates cannot be read.
    pub valid: Option<(i64, i64)>,
    /// Its files did not load at the last look (the certificate before serves on, if any).
    pub failing: bool,
}

impl Tls {
    /// The `[[tls]]` pairs in gateway.toml's order, with what each serves; empty for a
    /// self-signed certificate (issued again as needed, nothing to renew).
    pub fn served(&self) -> Vec<ServedCert> {
        let f = &self.files;
        f.pairs
            .iter()
            .enumerate()
            .map(|(i, (cert, _))| {
                let last = f.last.get(i).and_then(Option::as_ref);
                ServedCert {
                    file: cert.clone(),
                    names: last.map(|e| e.names.clone()).unwrap_or_default(),
                    valid: last.and_then(|e| e.valid),
                    failing: f.failed_pairs.contains(&i),
                }
            })
            .collect()
    }

    /// The `[[tls]]` pairs that do not load at the last look, one per line (their previous
    /// certificates serve on), for `/status`: a broken renewal showed only in the log, and
    /// stopped the whole gateway at its next start.
    pub fn failing(&self) -> Option<&str> {
        self.files.failing.as_deref()
    }

    /// Reads the certificate files again if any changed since last read (or the last read
    /// failed): `None` when none did (or there are none: self-signed), or when they fail as
    /// they did at the last look; `Some(Ok(names))` when the new ones serve from the next
    /// handshake on; `Some(Err)` when they do not load, the old ones serving on. Blocking
    /// (file reads).
    pub fn reload_if_changed(&mut self) -> Option<Result<Vec<String>, TlsError>> {
        let f = &mut self.files;
        if f.pairs.is_empty() {
            return None;
        }
        let now = f.fingerprints();
        if now == f.seen && f.failing.is_none() {
            return None;
        }
        // Per pair, whether its files changed since the last look.
        let changed: Vec<bool> = (0..f.pairs.len())
            .map(|i| now.get(2 * i..2 * i + 2) != f.seen.get(2 * i..2 * i + 2))
            .collect();
        let mut renewed = false;
        let mut failed_now = std::collections::HashSet::new();
        // A key file's mode is told when the file changed, not at every look while another
        // pair fails (every 5 s).
        for (i, (_, k)) in f.pairs.iter().enumerate() {
            if now.get(2 * i + 1) != f.seen.get(2 * i + 1) {
                warn_if_others_read(k);
            }
        }
        f.seen = now;
        // Pair by pair: one that does not load (a lineage certbot deleted) keeps its previous
        // certificate, and holds up no other's renewal. Nor does one out of date replace a
        // good one (an old pair copied back by a deploy hook).
        let unix_now = unix_now();
        let mut errors: Vec<TlsError> = Vec::new();
        let last: Vec<Option<Entry>> = f
            .pairs
            .iter()
            .enumerate()
            .map(|(i, (c, k))| {
                let loaded = load_pair(c, k).and_then(|e| {
                    match e.key.cert.first().and_then(|l| out_of_date(l, unix_now)) {
                        Some(why) => Err(file_err(
                            c,
                            format!("{why}: not served (the certificate before it serves on); check its renewal (`certbot renew --dry-run`)"),
                        )),
                        None => Ok(e),
                    }
                });
                match loaded {
                    Ok(e) => {
                        renewed |= changed.get(i).copied().unwrap_or(true)
                            || f.failed_pairs.contains(&i);
                        Some(e)
                    }
                    Err(e) => {
                        errors.push(e);
                        failed_now.insert(i);
                        f.last.get(i).cloned().flatten()
                    }
                }
            })
            .collect();
        f.failed_pairs = failed_now;
        let entries: Vec<Entry> = last.iter().flatten().cloned().collect();
        f.last = last;
        let names: Vec<String> = entries.iter().flat_map(|e| e.names.clone()).collect();
        f.resolver.entries.store(Arc::new(Entries(entries)));
        self.names = names.clone();
        if errors.is_empty() {
            f.failing = None;
            return Some(Ok(names));
        }
        // Each failure is told once: those not failing at the last look, together.
        let before = f.failing.take().unwrap_or_default();
        f.failing = Some(
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n"),
        );
        let mut new: Vec<TlsError> = errors
            .into_iter()
            .filter(|e| !before.lines().any(|l| l == e.to_string()))
            .collect();
        match new.len() {
            // The same failure as before, and another pair renewed: that one serves.
            0 => renewed.then_some(Ok(names)),
            1 => new.pop().map(Err),
            _ => Some(Err(TlsError::Several(new))),
        }
    }
}

impl Tls {
    /// The certificates from files whose standing against their end changed since the last
    /// call (each told once per change, the first call telling all but those in date): a
    /// renewal that keeps failing while the files stay as they are changes nothing on disk,
    /// so nothing else would say it before browsers refuse the certificate.
    pub fn expiry(&mut self, now: i64) -> Vec<ExpiryNote> {
        let f = &mut self.files;
        let mut notes = Vec::new();
        let mut told = std::collections::HashMap::new();
        for e in f.last.iter().flatten() {
            let Some((from, until)) = e.valid else {
                continue;
            };
            let stands = if now > until {
                Expiry::Expired
            } else if (until - now).saturating_mul(4) < until.saturating_sub(from) {
                Expiry::Soon
            } else {
                Expiry::InDate
            };
            let key = (e.names.clone(), until);
            let before = f.told.get(&key).copied().unwrap_or(Expiry::InDate);
            if stands != before {
                notes.push(ExpiryNote {
                    names: e.names.clone(),
                    not_after: until,
                    now: stands,
                });
            }
            told.insert(key, stands);
        }
        // Certificates no longer served are forgotten.
        f.told = told;
        notes
    }

    /// Issues the self-signed certificate again, with the same key, when `names` (in any
    /// order) are not the ones it serves: an http app's host added by a policy edit was
    /// served a certificate without its name until a restart. `None` when nothing changed or
    /// the certificates are files; `Some(Ok(names))` when the new one serves from the next
    /// handshake on; `Some(Err)` when it could not be made, the old one serving on.
    pub fn reissue_self_signed(
        &mut self,
        names: &[String],
    ) -> Option<Result<Vec<String>, TlsError>> {
        let key = self.self_signed_key.as_ref()?;
        let same = |a: &[String], b: &[String]| a.iter().all(|n| b.contains(n));
        if names.len() == self.names.len() && same(names, &self.names) && same(&self.names, names) {
            return None;
        }
        Some(self_signed(names, key).map(|(pem, e)| {
            self.files
                .resolver
                .entries
                .store(Arc::new(Entries(vec![e])));
            self.self_signed_pem = Some(pem);
            self.names = names.to_vec();
            self.names.clone()
        }))
    }
}

/// A certificate for `names` signed by `key` itself: its PEM and the entry serving it.
fn self_signed(names: &[String], key: &rcgen::KeyPair) -> Result<(String, Entry), TlsError> {
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    // A serial of its own each time: rcgen's default derives it from the key, kept across
    // issues, and a browser that saw the old certificate refuses a different one with the
    // same issuer and serial (Firefox: SEC_ERROR_REUSED_ISSUER_AND_SERIAL). Positive, 16 bytes.
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let cert = params.self_signed(key)?;
    let der = PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    Ok((cert.pem(), entry(vec![cert.der().clone()], der)?))
}

/// Builds the TLS configuration from `(cert, key)` PEM file pairs, or a self-signed
/// certificate for `fallback_names` when there are none.
pub fn configure(pairs: &[(PathBuf, PathBuf)], fallback_names: &[String]) -> Result<Tls, TlsError> {
    // Before reading: a change made during the read shows as one at the next look.
    let seen = pairs
        .iter()
        .flat_map(|(c, k)| [fingerprint(c), fingerprint(k)])
        .collect();
    let mut last = Vec::new();
    let mut errors = Vec::new();
    let mut failed_pairs = std::collections::HashSet::new();
    for (i, (c, k)) in pairs.iter().enumerate() {
        match load_pair(c, k) {
            Ok(e) => last.push(Some(e)),
            Err(e) => {
                errors.push(e);
                failed_pairs.insert(i);
                last.push(None);
            }
        }
        warn_if_others_read(k);
    }
    // None loads: a setting to fix (a mistyped path), refused before anything is bound. Some
    // do: the others serve, as when a pair fails while running, and the failing ones are read
    // again at every look. Refused, a pair certbot deleted stopped the gateway — DNS, the
    // tunnel, every app — in a restart loop at its next boot, though it had served on.
    if !pairs.is_empty() && failed_pairs.len() == pairs.len() {
        return Err(TlsError::NoneLoads(Box::new(match errors.len() {
            1 => errors.remove(0),
            _ => TlsError::Several(errors),
        })));
    }
    for e in &errors {
        tracing::error!(error = %e, "a TLS certificate pair does not load: not served (the other pairs are), read again as its files change");
    }
    let failing = (!errors.is_empty()).then(|| {
        errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    });
    let mut entries: Vec<Entry> = last.iter().flatten().cloned().collect();
    let mut self_signed_pem = None;
    let mut self_signed_key = None;
    if entries.is_empty() {
        let key = rcgen::KeyPair::generate()?;
        let (pem, e) = self_signed(fallback_names, &key)?;
        self_signed_pem = Some(pem);
        self_signed_key = Some(key);
        entries.push(e);
    }
    // Self-signed: the names asked for, as `reissue_self_signed` compares them (an IP
    // address host is in the certificate, but as no DNS name: read back, it differed, and
    // the certificate was issued again at the first look).
    let names = match self_signed_key {
        Some(_) => fallback_names.to_vec(),
        None => entries.iter().flat_map(|e| e.names.clone()).collect(),
    };
    let resolver = Arc::new(SniResolver {
        entries: ArcSwap::from_pointee(Entries(entries)),
    });
    let mut config = ServerConfig::builder_with_provider(front_provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    config.ignore_client_order = true;
    let files = CertFiles {
        pairs: pairs.to_vec(),
        seen,
        resolver,
        failing,
        failed_pairs,
        last,
        told: std::collections::HashMap::new(),
    };
    Ok(Tls {
        config: Arc::new(config),
        self_signed_pem,
        names,
        files,
        self_signed_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let ck = rcgen::generate_simple_self_signed(
            names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        let c = dir.join(format!("{stem}.crt"));
        let k = dir.join(format!("{stem}.key"));
        std::fs::write(&c, ck.cert.pem()).unwrap();
        std::fs::write(&k, ck.signing_key.serialize_pem()).unwrap();
        (c, k)
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_first() {
        let d = tempfile::tempdir().unwrap();
        let a = write_pair(d.path(), "a", &["files.example", "www.files.example"]);
        let b = write_pair(d.path(), "b", &["*.alice.example", "alice.example"]);
        let a2 = load_pair(&a.0, &a.1).unwrap();
        let b2 = load_pair(&b.0, &b.1).unwrap();
        let r = Entries(vec![a2, b2]);
        let now = unix_now();
        assert_eq!(r.pick(Some("files.example"), now), 0);
        assert_eq!(r.pick(Some("alice.example"), now), 1);
        assert_eq!(r.pick(Some("Dfs.Alice.Example."), now), 1);
        assert_eq!(
            r.pick(Some("a.b.alice.example"), now),
            0,
            "wildcards cover one label"
        );
        assert_eq!(r.pick(None, now), 0);
        let tls = configure(&[a, b], &[]).unwrap();
        assert!(tls.self_signed_pem.is_none());
        assert_eq!(tls.config.alpn_protocols[0], b"h2");
    }

    /// A pair for `names` valid from the start of `from` to the start of `until` (y, m, d).
    fn write_dated_pair(
        dir: &Path,
        stem: &str,
        names: &[&str],
        from: (i32, u8, u8),
        until: (i32, u8, u8),
    ) -> (PathBuf, PathBuf) {
        let names = names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
        params.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let c = dir.join(format!("{stem}.crt"));
        let k = dir.join(format!("{stem}.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    /// An expired certificate kept for its name (its renewal failing) loses to one in date
    /// that covers the name by a wildcard; with nothing else for the name it is still the one.
    #[test]
    fn sni_prefers_certificates_in_date() {
        let d = tempfile::tempdir().unwrap();
        let old = write_dated_pair(
            d.path(),
            "old",
            &["files.alice.example"],
            (2020, 1, 1),
            (2020, 4, 1),
        );
        let wild = write_pair(d.path(), "wild", &["*.alice.example"]);
        let r = Entries(vec![
            load_pair(&old.0, &old.1).unwrap(),
            load_pair(&wild.0, &wild.1).unwrap(),
        ]);
        let now = unix_now();
        assert_eq!(r.pick(Some("files.alice.example"), now), 1);
        let r = Entries(vec![load_pair(&old.0, &old.1).unwrap()]);
        assert_eq!(r.pick(Some("files.alice.example"), now), 0);
        // In its own time, the exact name wins as before.
        let r = Entries(vec![
            load_pair(&old.0, &old.1).unwrap(),
            load_pair(&wild.0, &wild.1).unwrap(),
        ]);
        let (from, _) = r.0[0].valid.unwrap();
        let mut rotated = r;
        rotated.0.swap(0, 1);
        assert_eq!(rotated.pick(Some("files.alice.example"), from + 86_400), 1);
    }

    /// A certificate whose files never change is told as it nears its end (a quarter of its
    /// lifetime left, its renewal due and not done) and once it has ended: each once.
    #[test]
    fn certificates_nearing_their_end_are_told_once() {
        let d = tempfile::tempdir().unwrap();
        let a = write_dated_pair(d.path(), "a", &["a.example"], (2020, 1, 1), (2020, 4, 1));
        // In date whenever this runs (1975 to 4096).
        let b = write_pair(d.path(), "b", &["b.example"]);
        let mut tls = configure(&[a, b], &[]).unwrap();
        let (from, until) = tls.files.last[0].as_ref().unwrap().valid.unwrap();
        let day = 86_400;
        assert_eq!(tls.expiry(from + day), []);
        let soon = tls.expiry(until - 10 * day);
        assert_eq!(
            soon,
            [ExpiryNote {
                names: vec!["a.example".into()],
                not_after: until,
                now: Expiry::Soon
            }]
        );
        assert_eq!(soon[0].days_left(until - 10 * day), 10);
        assert_eq!(tls.expiry(until - 9 * day), [], "told again");
        let ended = tls.expiry(until + 1);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].now, Expiry::Expired);
        assert_eq!(ended[0].days_left(until + 1), -1);
        assert_eq!(tls.expiry(until + day), []);
        // Started today: one expired long ago is told at the first look.
        let mut again = configure(&tls.files.pairs.clone(), &[]).unwrap();
        let first = again.expiry(unix_now());
        assert_eq!(first.len(), 1, "{first:?}");
        assert_eq!(first[0].now, Expiry::Expired);
    }

    /// A self-signed certificate for an IP address host is not issued again at the first
    /// look: its names are the ones asked for.
    #[test]
    fn a_self_signed_certificate_for_an_ip_host_stays() {
        let names = vec!["alice.example".to_string(), "203.0.113.10".to_string()];
        let mut tls = configure(&[], &names).unwrap();
        assert!(tls.reissue_self_signed(&names).is_none());
    }

    /// A renewed certificate is served without a restart; a broken one is refused and the
    /// one before serves on.
    #[test]
    fn changed_files_are_read_again_and_bad_ones_refused() {
        let d = tempfile::tempdir().unwrap();
        let (c, k) = write_pair(d.path(), "a", &["old.example"]);
        let mut tls = configure(&[(c.clone(), k.clone())], &[]).unwrap();
        let served = |t: &Tls| t.files.resolver.entries.load().0[0].names.clone();
        assert!(tls.reload_if_changed().is_none(), "nothing changed");
        // A renewal: new files put in place by rename, as certbot's symlinks switch.
        let (c2, k2) = write_pair(d.path(), "b", &["new.example"]);
        std::fs::rename(&c2, &c).unwrap();
        std::fs::rename(&k2, &k).unwrap();
        let names = tls.reload_if_changed().unwrap().unwrap();
        assert_eq!(names, ["new.example"]);
        assert_eq!(served(&tls), ["new.example"]);
        // A broken key: refused, the renewed certificate serves on.
        std::fs::write(&k, "not a key").unwrap();
        let e = tls.reload_if_changed().unwrap().unwrap_err().to_string();
        assert!(e.contains("a.key"), "{e}");
        assert_eq!(served(&tls), ["new.example"]);
        assert!(
            tls.reload_if_changed().is_none(),
            "the same failure is told once"
        );
        // Mended (a fixed permission changes nothing but the change time): read again at the
        // next look, served.
        write_pair(d.path(), "c", &["other.example"]);
        std::fs::rename(d.path().join("c.crt"), &c).unwrap();
        std::fs::rename(d.path().join("c.key"), &k).unwrap();
        assert_eq!(tls.reload_if_changed().unwrap().unwrap(), ["other.example"]);
        assert!(
            tls.reload_if_changed().is_none(),
            "read again only when changed"
        );
        // Self-signed: nothing to read again.
        let mut own = configure(&[], &["x.example".into()]).unwrap();
        assert!(own.reload_if_changed().is_none());
    }

    /// A certificate damaged inside valid PEM armour is told against the certificate file,
    /// and an encrypted key as encrypted: both were told as something else (a key mismatch,
    /// a missing key), sending the operator to the wrong file or problem.
    #[test]
    fn a_damaged_certificate_and_an_encrypted_key_are_told_as_such() {
        let d = tempfile::tempdir().unwrap();
        let (c, k) = write_pair(d.path(), "a", &["a.example"]);
        let good = std::fs::read(&c).unwrap();
        std::fs::write(
            &c,
            "-----BEGIN CERTIFICATE-----\nMIIBaWJhZGRhdGE=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = configure(&[(c.clone(), k.clone())], &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a.crt: its first certificate (the server's own) is not a valid X.509"),
            "{e}"
        );
        assert!(!e.contains("a.key"), "{e}");
        std::fs::write(&c, good).unwrap();
        std::fs::write(
            &k,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBaWJhZGRhdGE=\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = configure(&[(c.clone(), k.clone())], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("a.key: the private key is encrypted"), "{e}");
        // The legacy form, its headers inside the PEM block.
        std::fs::write(
            &k,
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00112233445566778899AABBCCDDEEFF\n\nMIIBaWJhZGRhdGE=\n-----END RSA PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = configure(&[(c, k)], &[]).unwrap_err().to_string();
        assert!(e.contains("a.key: the private key is encrypted"), "{e}");
    }

    /// Certificate files are taken pair by pair: one pair that does not load (a lineage
    /// certbot deleted) or is out of date (an old pair copied back) keeps its previous
    /// certificate, and the other pair's renewal serves. A broken pair held up every renewal,
    /// and an expired one replaced a good one.
    #[test]
    fn pairs_reload_one_by_one_and_out_of_date_ones_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let (ca, ka) = write_pair(d.path(), "a", &["a.example"]);
        let (cb, kb) = write_pair(d.path(), "b", &["b.example"]);
        let mut tls =
            configure(&[(ca.clone(), ka.clone()), (cb.clone(), kb.clone())], &[]).unwrap();
        let served = |t: &Tls| -> Vec<Vec<String>> {
            t.files
                .resolver
                .entries
                .load()
                .0
                .iter()
                .map(|e| e.names.clone())
                .collect()
        };
        // a's key broken, b renewed: b's new one serves, a's old one stays.
        std::fs::write(&ka, "not a key").unwrap();
        let (c2, k2) = write_pair(d.path(), "b2", &["b2.example"]);
        std::fs::rename(&c2, &cb).unwrap();
        std::fs::rename(&k2, &kb).unwrap();
        let e = tls.reload_if_changed().unwrap().unwrap_err().to_string();
        assert!(e.contains("a.key"), "{e}");
        assert_eq!(served(&tls), [vec!["a.example"], vec!["b2.example"]]);
        // b renewed again while a still fails as before: told as served, a's failure not again.
        let (c3, k3) = write_pair(d.path(), "b3", &["b3.example"]);
        std::fs::rename(&c3, &cb).unwrap();
        std::fs::rename(&k3, &kb).unwrap();
        let names = tls.reload_if_changed().unwrap().unwrap();
        assert_eq!(names, ["a.example", "b3.example"]);
        assert!(tls.reload_if_changed().is_none(), "a's failure told again");
        // b replaced by an expired pair: refused, b2 serves on.
        let mut params = rcgen::CertificateParams::new(vec!["old.example".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let old = params.self_signed(&key).unwrap();
        std::fs::write(&cb, old.pem()).unwrap();
        std::fs::write(&kb, key.serialize_pem()).unwrap();
        let e = tls.reload_if_changed().unwrap().unwrap_err().to_string();
        assert!(e.contains("expired on"), "{e}");
        assert_eq!(served(&tls), [vec!["a.example"], vec!["b3.example"]]);
    }

    /// A pair that does not load at start leaves the others serving (it was refused, and a
    /// pair certbot deleted put the gateway in a restart loop), and serves once its files
    /// load; a start where none loads is refused.
    #[test]
    fn a_start_with_one_pair_failing_serves_the_others() {
        let d = tempfile::tempdir().unwrap();
        let (ca, ka) = write_pair(d.path(), "a", &["a.example"]);
        let (cb, kb) = write_pair(d.path(), "b", &["b.example"]);
        std::fs::remove_file(&kb).unwrap();
        let mut tls =
            configure(&[(ca.clone(), ka.clone()), (cb.clone(), kb.clone())], &[]).unwrap();
        assert_eq!(tls.names, ["a.example"]);
        assert!(
            tls.failing().is_some_and(|f| f.contains("b.key")),
            "{:?}",
            tls.failing()
        );
        // Still failing: told at start, not again.
        assert!(tls.reload_if_changed().is_none());
        let (c2, k2) = write_pair(d.path(), "b2", &["b.example"]);
        std::fs::rename(&c2, &cb).unwrap();
        std::fs::rename(&k2, &kb).unwrap();
        let names = tls.reload_if_changed().unwrap().unwrap();
        assert_eq!(names, ["a.example", "b.example"]);
        assert_eq!(tls.failing(), None);
        // Then a's key breaks: a keeps its certificate (the one loaded at start).
        std::fs::write(&ka, "not a key").unwrap();
        assert!(tls.reload_if_changed().unwrap().is_err());
        assert!(
            tls.failing().is_some_and(|f| f.contains("a.key")),
            "{:?}",
            tls.failing()
        );
        assert_eq!(tls.names, ["a.example", "b.example"]);
        let e = configure(&[(cb.clone(), d.path().join("gone.key"))], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("gone.key"), "{e}");
    }

    /// What `/status` and `/metrics` show of each pair: a pair that never loaded has no end,
    /// one failing after it loaded shows the end of the certificate serving on.
    #[test]
    fn served_pairs_show_their_end_and_whether_they_fail() {
        let d = tempfile::tempdir().unwrap();
        let (ca, ka) = write_dated_pair(d.path(), "a", &["a.example"], (2024, 1, 1), (2099, 1, 1));
        let (cb, kb) = write_pair(d.path(), "b", &["b.example"]);
        std::fs::remove_file(&kb).unwrap();
        let mut tls =
            configure(&[(ca.clone(), ka.clone()), (cb.clone(), kb.clone())], &[]).unwrap();
        let from_a = time::macros::datetime!(2024-01-01 0:00 UTC).unix_timestamp();
        let end_a = time::macros::datetime!(2099-01-01 0:00 UTC).unix_timestamp();
        let a = ServedCert {
            file: ca.clone(),
            names: vec!["a.example".into()],
            valid: Some((from_a, end_a)),
            failing: false,
        };
        let b = ServedCert {
            file: cb.clone(),
            names: vec![],
            valid: None,
            failing: true,
        };
        assert_eq!(tls.served(), [a.clone(), b]);
        std::fs::write(&ka, "not a key").unwrap();
        assert!(tls.reload_if_changed().unwrap().is_err());
        let served = tls.served();
        assert_eq!(
            served[0],
            ServedCert {
                failing: true,
                ..a.clone()
            }
        );
        assert!(configure(&[], &["x.example".into()])
            .unwrap()
            .served()
            .is_empty());
    }

    #[test]
    fn self_signed_when_no_files_and_clear_errors() {
        let tls = configure(&[], &["alice.example".into(), "*.alice.example".into()]).unwrap();
        assert!(tls.self_signed_pem.unwrap().contains("BEGIN CERTIFICATE"));
        assert_eq!(tls.names, ["alice.example", "*.alice.example"]);

        let d = tempfile::tempdir().unwrap();
        let (c, _) = write_pair(d.path(), "a", &["a.example"]);
        let (_, other_key) = write_pair(d.path(), "b", &["b.example"]);
        let e = configure(&[(c.clone(), other_key)], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("is it the key of"), "{e}");
        let e = configure(&[(c.clone(), d.path().join("missing.key"))], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.key"), "{e}");
        let e = configure(&[(c.clone(), c)], &[]).unwrap_err().to_string();
        assert!(e.contains("no private key"), "{e}");
    }

    /// A policy edit adding an http host gets the self-signed certificate issued again for
    /// it, with the same key; the same names in another order change nothing; certificate
    /// files are never replaced by it.
    #[test]
    fn the_self_signed_certificate_follows_the_hosts_and_keeps_its_key() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let spki = |c: &CertificateDer<'_>| {
            let (_, x) = x509_parser::parse_x509_certificate(c.as_ref()).unwrap();
            x.public_key().raw.to_vec()
        };
        let mut tls = configure(&[], &names(&["alice.example", "*.alice.example"])).unwrap();
        let first = tls.files.resolver.entries.load().0[0].key.cert[0].clone();
        let first_pem = tls.self_signed_pem.clone().unwrap();
        assert!(tls
            .reissue_self_signed(&names(&["*.alice.example", "alice.example"]))
            .is_none());
        let wanted = names(&["alice.example", "*.alice.example", "photos.bob.example"]);
        assert_eq!(tls.reissue_self_signed(&wanted).unwrap().unwrap(), wanted);
        assert_eq!(tls.names, wanted);
        let entries = tls.files.resolver.entries.load();
        assert_eq!(entries.0.len(), 1);
        assert!(entries.0[0]
            .names
            .contains(&"photos.bob.example".to_string()));
        let now = entries.0[0].key.cert[0].clone();
        assert_ne!(first, now);
        assert_eq!(spki(&first), spki(&now));
        let serial = |c: &CertificateDer<'_>| {
            let (_, x) = x509_parser::parse_x509_certificate(c.as_ref()).unwrap();
            x.raw_serial().to_vec()
        };
        assert_ne!(
            serial(&first),
            serial(&now),
            "a new certificate, a new serial"
        );
        assert_ne!(tls.self_signed_pem.as_deref(), Some(first_pem.as_str()));
        assert!(tls.reissue_self_signed(&wanted).is_none());

        let d = tempfile::tempdir().unwrap();
        let pair = write_pair(d.path(), "a", &["a.example"]);
        let mut files = configure(&[pair], &[]).unwrap();
        assert!(files.reissue_self_signed(&wanted).is_none());
        assert_eq!(files.names, ["a.example"]);
    }

    /// Runs a handshake in memory between `server` and a client offering `suites` in that
    /// order (trusting `pem`); the suite both ends settled on.
    fn negotiate(server: Arc<ServerConfig>, pem: &str, suites: &[CipherSuite]) -> CipherSuite {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites = suites
            .iter()
            .map(|want| *p.cipher_suites.iter().find(|s| s.suite() == *want).unwrap())
            .collect();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(p))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from("alice.example").unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        let mut wire = Vec::new();
        for _ in 0..10 {
            wire.clear();
            c.write_tls(&mut wire).unwrap();
            s.read_tls(&mut wire.as_slice()).unwrap();
            s.process_new_packets().unwrap();
            wire.clear();
            s.write_tls(&mut wire).unwrap();
            c.read_tls(&mut wire.as_slice()).unwrap();
            c.process_new_packets().unwrap();
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
        }
        assert!(
            !c.is_handshaking() && !s.is_handshaking(),
            "handshake stalled"
        );
        let theirs = c.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(s.negotiated_cipher_suite().unwrap().suite(), theirs);
        theirs
    }

    #[test]
    fn the_front_picks_aes_128_gcm_whatever_the_clients_order() {
        use CipherSuite::*;
        let tls = configure(&[], &["alice.example".into()]).unwrap();
        let pem = tls.self_signed_pem.unwrap();
        let openssl_order = [
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS13_AES_128_GCM_SHA256,
        ];
        let got = negotiate(tls.config.clone(), &pem, &openssl_order);
        assert_eq!(got, TLS13_AES_128_GCM_SHA256);
        // A client without it still gets a suite it offers.
        let only = [TLS13_CHACHA20_POLY1305_SHA256];
        assert_eq!(negotiate(tls.config.clone(), &pem, &only), only[0]);
        let tls12 = [
            TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ];
        assert_eq!(
            negotiate(tls.config, &pem, &tls12),
            TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        );
    }
}
