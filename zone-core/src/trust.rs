//! Trust in peers: rustls certificate verifiers rooted at the zone CA.
//!
//! Chain, validity period and key usage are checked by rustls' own WebPKI verifiers (no
//! home-made certificate checks); on top, a [`ZoneTrust`] refuses certificates of another domain
//! and devices revoked in any zone config it has seen. The revocation set only grows, at run
//! time as newer zone.json files arrive: a revoked name never comes back.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};

use crate::cert::DeviceIdentity;
use crate::config::ZoneConfig;
use crate::error::ZoneError;
use crate::names::{DeviceName, Domain};

/// The crypto provider zonegate uses everywhere (ring: no C toolchain surprises, ed25519 support).
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = preferred_suites(hardware_aes());
    Arc::new(p)
}

/// Cipher suites in the order this machine prefers them. With AES instructions, ring's default
/// order (AES-GCM first): on this benchmark VM sealing a 1,400-byte tunnel packet takes 331 ns
/// with AES-128-GCM, 337 ns with AES-256-GCM and 1,425 ns with ChaCha20-Poly1305
/// (`cargo bench -p tunnel --bench aead`). Without them (a Raspberry Pi 4's Cortex-A72, say)
/// AES runs in software and ChaCha20-Poly1305 goes first, as Go's crypto/tls and BoringSSL
/// order it. A server follows its client's order, so an agent's own hardware picks its
/// tunnel's cipher. Every suite stays enabled: only the preference changes.
fn preferred_suites(aes: bool) -> Vec<rustls::SupportedCipherSuite> {
    let mut suites = rustls::crypto::ring::DEFAULT_CIPHER_SUITES.to_vec();
    if !aes {
        // Stable: TLS 1.3 ChaCha first, the rest in ring's order.
        suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
    }
    suites
}

/// Whether the CPU has AES instructions (AES-NI, or ARMv8's crypto extension).
fn hardware_aes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Why a peer certificate was refused, in words for the log.
pub fn describe_refusal(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Expired) => {
            "certificate expired".into()
        }
        rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { time, not_after }) => {
            format!(
                "certificate expired at {} (this machine's clock says {})",
                rfc3339(*not_after),
                rfc3339(*time)
            )
        }
        // A machine without a battery-backed clock (a Raspberry Pi) boots in the past until
        // NTP answers: the certificate is fine, the clock is not.
        rustls::Error::InvalidCertificate(CertificateError::NotValidYet) => {
            "certificate not valid yet: check this machine's clock (NTP)".into()
        }
        rustls::Error::InvalidCertificate(CertificateError::NotValidYetContext {
            time,
            not_before,
        }) => format!(
            "certificate not valid until {} and this machine's clock says {}: check the clock (NTP)",
            rfc3339(*not_before),
            rfc3339(*time)
        ),
        rustls::Error::InvalidCertificate(CertificateError::Revoked) => {
            "device revoked in zone config".into()
        }
        // Same issuer name but another key (a zone with the same domain) shows as a bad signature.
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        | rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
            "certificate not issued by this zone's CA (another zone?)".into()
        }
        rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
        | rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. }) => {
            "certificate is for another name".into()
        }
        other => other.to_string(),
    }
}

/// A certificate time as RFC 3339 (UTC), or its Unix seconds if out of range.
fn rfc3339(t: rustls::pki_types::UnixTime) -> String {
    let secs = t.as_secs();
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs} (Unix time)"))
}

/// The zone's trust anchor plus the current revocation set.
#[derive(Debug)]
pub struct ZoneTrust {
    domain: Domain,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    revoked: RwLock<BTreeSet<DeviceName>>,
    /// When each revoked device's refused handshake was last named ([`ZoneTrust::tell_revoked`]):
    /// only revoked names, so bounded by the signed revocation lists.
    revoked_told: std::sync::Mutex<std::collections::HashMap<DeviceName, std::time::Instant>>,
    server: Arc<WebPkiServerVerifier>,
    client: Arc<dyn ClientCertVerifier>,
}

impl ZoneTrust {
    /// Trust rooted at `ca_der` for devices of `domain`.
    pub fn new(domain: Domain, ca_der: CertificateDer<'static>) -> Result<Arc<Self>, ZoneError> {
        let mut roots = RootCertStore::empty();
        roots.add(ca_der).map_err(|e| {
            ZoneError::Cert(format!("zone CA certificate unusable as trust anchor: {e}"))
        })?;
        let roots = Arc::new(roots);
        let provider = provider();
        let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| ZoneError::Cert(e.to_string()))?;
        let client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| ZoneError::Cert(e.to_string()))?;
        Ok(Arc::new(ZoneTrust {
            domain,
            roots,
            provider,
            revoked: RwLock::new(BTreeSet::new()),
            revoked_told: std::sync::Mutex::default(),
            server,
            client,
        }))
    }

    pub fn domain(&self) -> &Domain {
        &self.domain
    }
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }
    pub fn crypto(&self) -> Arc<CryptoProvider> {
        self.provider.clone()
    }

    /// Adds the revocations of `config` (call with verified configs only); those it leaves
    /// out stay. True when the set grew.
    pub fn add_revocations(&self, config: &ZoneConfig) -> bool {
        self.add_revoked(config.revoked.iter().map(|r| r.device.clone()))
    }

    /// Adds revoked device names (from a verified config, or the device's record of those).
    /// True when the set grew.
    pub fn add_revoked(&self, names: impl IntoIterator<Item = DeviceName>) -> bool {
        let mut set = self.revoked.write().unwrap_or_else(|p| p.into_inner());
        let before = set.len();
        set.extend(names);
        set.len() != before
    }

    /// Every device name revoked so far.
    pub fn revoked(&self) -> BTreeSet<DeviceName> {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn is_revoked(&self, name: &DeviceName) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }

    /// Names the device a handshake refused as revoked, once a minute per device (anyone
    /// holding a revoked certificate can cause one per handshake): the handshake's own error,
    /// logged by whoever dialed or accepted, says only "Revoked" and an address.
    fn tell_revoked(&self, end_entity: &CertificateDer<'_>, e: &rustls::Error) {
        const EVERY: std::time::Duration = std::time::Duration::from_secs(60);
        if !matches!(
            e,
            rustls::Error::InvalidCertificate(CertificateError::Revoked)
        ) {
            return;
        }
        let Ok(id) = DeviceIdentity::from_der(end_entity) else {
            return;
        };
        let now = std::time::Instant::now();
        let mut told = self.revoked_told.lock().unwrap_or_else(|p| p.into_inner());
        if told
            .get(&id.name)
            .is_some_and(|t| now.duration_since(*t) < EVERY)
        {
            return;
        }
        told.insert(id.name.clone(), now);
        drop(told);
        tracing::info!(device = %id.name, "certificate refused: the device is revoked in the zone config");
    }

    /// Zone rules on top of WebPKI: right domain, not revoked. Returns the identity.
    fn check_identity(
        &self,
        end_entity: &CertificateDer<'_>,
    ) -> Result<DeviceIdentity, rustls::Error> {
        let id = DeviceIdentity::from_der(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        if id.domain != self.domain {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ));
        }
        if self.is_revoked(&id.name) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(id)
    }

    /// Verifies a device certificate as a client certificate would be (chain, time, revocation)
    /// and returns who it is. For CLI checks and tests; handshakes use the verifiers below.
    pub fn verify_device(
        &self,
        end_entity: &CertificateDer<'_>,
        now: UnixTime,
    ) -> Result<DeviceIdentity, rustls::Error> {
        self.client.verify_client_cert(end_entity, &[], now)?;
        self.check_identity(end_entity)
    }

    /// Verifier for connections this device dials (peer must be `NAME.DOMAIN`).
    pub fn server_verifier(self: &Arc<Self>) -> Arc<dyn ServerCertVerifier> {
        Arc::new(ServerSide(self.clone()))
    }

    /// Verifier for connections this device accepts (client certificate mandatory).
    pub fn client_verifier(self: &Arc<Self>) -> Arc<dyn ClientCertVerifier> {
        Arc::new(ClientSide(self.clone()))
    }
}

#[derive(Debug)]
struct ServerSide(Arc<ZoneTrust>);

impl ServerCertVerifier for ServerSide {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let v =
            self.0
                .server
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        self.0
            .check_identity(end_entity)
            .inspect_err(|e| self.0.tell_revoked(end_entity, e))?;
        Ok(v)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.server.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.server.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.server.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct ClientSide(Arc<ZoneTrust>);

impl ClientCertVerifier for ClientSide {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.client.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let v = self
            .0
            .client
            .verify_client_cert(end_entity, intermediates, now)?;
        self.0
            .check_identity(end_entity)
            .inspect_err(|e| self.0.tell_revoked(end_entity, e))?;
        Ok(v)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.client.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.client.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.client.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CipherSuite;

    #[test]
    fn chacha_goes_first_only_without_hardware_aes() {
        let default: Vec<_> = rustls::crypto::ring::DEFAULT_CIPHER_SUITES
            .iter()
            .map(|s| s.suite())
            .collect();
        let with_aes: Vec<_> = preferred_suites(true).iter().map(|s| s.suite()).collect();
        assert_eq!(with_aes, default);
        let without: Vec<_> = preferred_suites(false).iter().map(|s| s.suite()).collect();
        assert_eq!(without[0], CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
        let mut a = without.clone();
        let mut b = default.clone();
        a.sort_by_key(|s| u16::from(*s));
        b.sort_by_key(|s| u16::from(*s));
        assert_eq!(a, b, "the same suites, reordered");
        // The TLS 1.3 AES suites keep their relative order behind it.
        let aes: Vec<_> = without
            .iter()
            .filter(|s| {
                matches!(
                    s,
                    CipherSuite::TLS13_AES_256_GCM_SHA384 | CipherSuite::TLS13_AES_128_GCM_SHA256
                )
            })
            .collect();
        assert_eq!(
            aes,
            [
                &CipherSuite::TLS13_AES_256_GCM_SHA384,
                &CipherSuite::TLS13_AES_128_GCM_SHA256
            ]
        );
    }
}
