//! Fuzzes the certificate readers: a device certificate's identity (`DeviceIdentity::from_der`,
//! read from every peer's certificate in a handshake, after rustls' chain check), the zone CA's
//! pinned key (`ca_public_key`, from a bundle's zone-ca.crt) and PEM files of certificates
//! (`parse_pem_certs`). No panic; an identity read is the certificate's one DNS name, split into
//! a valid device name and domain, with an ed25519 key of the certificate's own (checked here
//! against x509-parser directly, not through the reader); a CA key is read only from a CA
//! certificate's ed25519 key; PEM that parses holds at least one certificate, each read as
//! above.
#![no_main]

use libfuzzer_sys::fuzz_target;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::OID_SIG_ED25519;
use zone_core::{cert, DeviceIdentity, DeviceName, Domain};

/// The certificate's DNS names and whether its key is ed25519, read without zone-core.
fn facts(der: &[u8]) -> Option<(Vec<String>, bool, Vec<u8>)> {
    let (_, x) = x509_parser::parse_x509_certificate(der).ok()?;
    let names = match x.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let spki = x.public_key();
    Some((
        names,
        spki.algorithm.algorithm == OID_SIG_ED25519,
        spki.subject_public_key.data.to_vec(),
    ))
}

fn check_identity(der: &[u8]) {
    let Ok(id) = DeviceIdentity::from_der(der) else {
        return;
    };
    let (names, ed25519, key) = facts(der).expect("an identity was read from a certificate");
    // One DNS name, exactly: a certificate with two could be checked for one and taken for
    // the other.
    assert_eq!(names.len(), 1, "identity read from {names:?}");
    let name = names[0].strip_suffix('.').unwrap_or(&names[0]);
    assert_eq!(format!("{}.{}", id.name.as_str(), id.domain.as_str()), name);
    assert!(DeviceName::new(id.name.as_str()).is_ok());
    assert!(Domain::new(id.domain.as_str()).is_ok());
    assert!(ed25519, "identity read from a key that is not ed25519");
    assert_eq!(id.public_key.as_slice(), key.as_slice());
    // Reading is deterministic: a peer's identity is read again where it is checked.
    assert_eq!(DeviceIdentity::from_der(der).expect("read twice"), id);
}

fuzz_target!(|data: &[u8]| {
    check_identity(data);
    if let Ok(k) = cert::ca_public_key(data) {
        let (_, ed25519, key) = facts(data).expect("a CA key was read from a certificate");
        let (_, x) = x509_parser::parse_x509_certificate(data).expect("parsed above");
        assert!(x.is_ca(), "CA key read from a certificate that is no CA's");
        assert!(ed25519, "CA key read from a key that is not ed25519");
        assert_eq!(k.as_bytes().as_slice(), key.as_slice());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(certs) = cert::parse_pem_certs(text) {
            assert!(!certs.is_empty(), "PEM read as no certificate at all");
            for c in &certs {
                check_identity(c.as_ref());
                let _ = cert::ca_public_key(c.as_ref());
            }
        }
    }
});
