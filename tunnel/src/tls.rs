//! rustls configurations for the tunnel: TLS 1.3 only, ALPN `zonegate/1`, mutual
//! authentication with zone certificates in both directions.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::creds::{DeviceCreds, OwnCert};
use crate::error::TunnelError;

/// ALPN of the tunnel protocol; a peer speaking anything else fails the handshake.
pub const ALPN: &[u8] = b"zonegate/1";

/// This device's certificate in use, looked up at every handshake: a renewed one copied into
/// the bundle serves from the next handshake on, with no restart ([`DeviceCreds::renew_cert`]).
#[derive(Debug)]
struct OwnCertResolver(Arc<arc_swap::ArcSwap<OwnCert>>);

impl rustls::server::ResolvesServerCert for OwnCertResolver {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.load().certified.clone())
    }
}

impl rustls::client::ResolvesClientCert for OwnCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.load().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Accepting side: a client certificate of this zone is mandatory.
pub fn server_crypto(creds: &DeviceCreds) -> Result<Arc<QuicServerConfig>, TunnelError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(creds.trust.crypto())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(creds.trust.client_verifier())
        .with_cert_resolver(Arc::new(OwnCertResolver(creds.own_cert_swap())));
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // 0-RTT would let a replayed first flight open streams: not worth it for long-lived tunnels.
    cfg.max_early_data_size = 0;
    // No session resumption: a resumed handshake carries the client certificate over without
    // verifying it again, so a device revoked (or expired) since its last full handshake would
    // get in by reconnecting. Agents reconnect rarely; a full handshake each time is cheap.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    QuicServerConfig::try_from(cfg)
        .map(Arc::new)
        .map_err(|e| TunnelError::Config(e.to_string()))
}

/// Dialing side: the peer must present the certificate of the device we meant to reach.
pub fn client_crypto(creds: &DeviceCreds) -> Result<Arc<QuicClientConfig>, TunnelError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(creds.trust.crypto())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(creds.trust.server_verifier())
        .with_client_cert_resolver(Arc::new(OwnCertResolver(creds.own_cert_swap())));
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // Every handshake verifies the peer's certificate against the current revocations (see
    // `server_crypto`); the accepting side would refuse resumption anyway.
    cfg.resumption = rustls::client::Resumption::disabled();
    QuicClientConfig::try_from(cfg)
        .map(Arc::new)
        .map_err(|e| TunnelError::Config(e.to_string()))
}
