//! Trust in peers: rustls certificate verifiers rooted at the zone CA.
//!
//! Chain, validity period and key usage are checked by rustls' own WebPKI verifiers (no
//! home-made certificate checks); on top, a [`ZoneTrust`] refuses certificates of another domain
//! and devices revoked in the newest zone config it has seen. The revocation set can be replaced
//! at run time when a newer zone.json arrives.

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
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a peer certificate was refused, in words for the log.
pub fn describe_refusal(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Expired) => {
            "certificate expired".into()
        }
        rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
            "certificate expired".into()
        }
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

/// The zone's trust anchor plus the current revocation set.
#[derive(Debug)]
pub struct ZoneTrust {
    domain: Domain,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    revoked: RwLock<BTreeSet<DeviceName>>,
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

    /// Replaces the revocation set with the one of `config` (call with verified configs only).
    pub fn set_revocations(&self, config: &ZoneConfig) {
        let set = config.revoked.iter().map(|r| r.device.clone()).collect();
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = set;
    }

    pub fn is_revoked(&self, name: &DeviceName) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
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
        self.0.check_identity(end_entity)?;
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
        self.0.check_identity(end_entity)?;
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
