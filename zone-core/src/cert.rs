//! X.509 certificates: the zone CA (self-signed with the zone key) and device certificates it
//! issues, and reading a device's identity back out of a verified certificate.
//!
//! A device certificate carries the DNS SAN `NAME.DOMAIN` (what peers check) and one URI SAN
//! `urn:zonegate:role:ROLE` per role, so roles travel with the identity and no zone.json is
//! needed to know what a device may do.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;

use crate::error::ZoneError;
use crate::keys::{DeviceKey, ZoneKey};
use crate::names::{DeviceName, Domain, Role};

/// URI SAN prefix carrying a role.
pub const ROLE_URI_PREFIX: &str = "urn:zonegate:role:";
/// Default device certificate validity.
pub const DEVICE_CERT_DAYS: i64 = 365;
/// The CA certificate outlives every device certificate it will issue; re-creating it means
/// re-issuing every device, so make it long.
pub const CA_CERT_DAYS: i64 = 20 * 365;

fn cert_err(e: rcgen::Error) -> ZoneError {
    ZoneError::Cert(e.to_string())
}

fn ia5(s: String) -> Result<rcgen::string::Ia5String, ZoneError> {
    rcgen::string::Ia5String::try_from(s).map_err(cert_err)
}

/// Makes the zone CA certificate (PEM), self-signed by the zone key.
pub fn make_ca(zone: &ZoneKey, domain: &Domain, now: OffsetDateTime) -> Result<String, ZoneError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("zonegate zone CA {domain}"));
    dn.push(DnType::OrganizationName, domain.as_str());
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(CA_CERT_DAYS);
    p.serial_number = Some(random_serial());
    // Names under the zone's domain only: a zone CA that reached a trust store it was not
    // meant for (a browser's, a system's) vouches for nothing else. Device certificates name
    // DEVICE.DOMAIN. A constraint holds only for the name types it lists, so every IP
    // address is excluded too (device certificates carry none): permitted DNS names alone
    // left the CA able to vouch for `https://ANY-IP`. (Their role URIs stay unconstrained.)
    p.name_constraints = Some(rcgen::NameConstraints {
        permitted_subtrees: vec![rcgen::GeneralSubtree::DnsName(domain.as_str().to_owned())],
        excluded_subtrees: vec![
            rcgen::GeneralSubtree::IpAddress(rcgen::CidrSubnet::V4([0; 4], [0; 4])),
            rcgen::GeneralSubtree::IpAddress(rcgen::CidrSubnet::V6([0; 16], [0; 16])),
        ],
    });
    let cert = p.self_signed(&zone.rcgen_pair()?).map_err(cert_err)?;
    Ok(cert.pem())
}

fn random_serial() -> SerialNumber {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b[0] &= 0x7f; // positive INTEGER
    b[0] |= 0x01; // and no leading zero to trim
    SerialNumber::from_slice(&b)
}

/// A freshly issued device certificate.
#[derive(Clone, Debug)]
pub struct DeviceCert {
    pub pem: String,
    pub serial_hex: String,
    pub not_after: OffsetDateTime,
}

/// What to put in a device certificate.
#[derive(Clone, Debug)]
pub struct IssueRequest<'a> {
    pub domain: &'a Domain,
    pub name: &'a DeviceName,
    pub roles: &'a [Role],
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// Issues a certificate for `device` signed by the zone CA (`ca_pem` made from `zone`).
pub fn issue_device(
    zone: &ZoneKey,
    ca_pem: &str,
    device: &DeviceKey,
    req: &IssueRequest<'_>,
) -> Result<DeviceCert, ZoneError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, req.name.as_str());
    dn.push(DnType::OrganizationName, req.domain.as_str());
    p.distinguished_name = dn;
    p.subject_alt_names = vec![SanType::DnsName(ia5(req.domain.host_of(req.name))?)];
    for r in req.roles {
        p.subject_alt_names
            .push(SanType::URI(ia5(format!("{ROLE_URI_PREFIX}{r}"))?));
    }
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every device is both a TLS client (dialing) and a server (accepting direct mesh peers).
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = req.not_before;
    // Not past the CA's own end: a certificate outliving it is refused at every handshake
    // after, while connections opened before ran on to the certificate's end.
    let not_after = match ca_not_after(ca_pem) {
        Some(end) if end < req.not_after => end,
        _ => req.not_after,
    };
    p.not_after = not_after;
    let serial = random_serial();
    let serial_hex = hex(&serial.to_bytes());
    p.serial_number = Some(serial);
    p.use_authority_key_identifier_extension = true;
    let issuer = Issuer::from_ca_cert_pem(ca_pem, zone.rcgen_pair()?).map_err(cert_err)?;
    let cert = p
        .signed_by(&device.rcgen_pair()?, &issuer)
        .map_err(cert_err)?;
    Ok(DeviceCert {
        pem: cert.pem(),
        serial_hex,
        not_after,
    })
}

/// The end of the CA certificate `ca_pem`, if it parses.
pub(crate) fn ca_not_after(ca_pem: &str) -> Option<OffsetDateTime> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).ok()?;
    let (_, x) = x509_parser::parse_x509_certificate(&pem.contents).ok()?;
    OffsetDateTime::from_unix_timestamp(x.validity().not_after.timestamp()).ok()
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The identity a verified device certificate carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceIdentity {
    pub name: DeviceName,
    pub domain: Domain,
    pub roles: Vec<Role>,
    pub serial_hex: String,
    /// When it was issued for (`device renew` makes it now): a renewal's is later.
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// Raw ed25519 public key of the device.
    pub public_key: [u8; 32],
}

impl DeviceIdentity {
    pub fn has_role(&self, r: Role) -> bool {
        self.roles.contains(&r)
    }

    /// Reads the identity out of a certificate. This does NOT verify the certificate: call it
    /// on a chain that rustls (or [`crate::trust`]) has already verified.
    pub fn from_der(der: &[u8]) -> Result<Self, ZoneError> {
        let bad = |why: String| ZoneError::Cert(why);
        let (_, x) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| bad(format!("cannot parse certificate: {e}")))?;
        let mut host = None;
        let mut names = 0;
        let mut roles = Vec::new();
        if let Ok(Some(san)) = x.subject_alternative_name() {
            for g in &san.value.general_names {
                match g {
                    GeneralName::DNSName(d) => {
                        names += 1;
                        host = Some(d.to_string());
                    }
                    GeneralName::URI(u) => {
                        if let Some(r) = u.strip_prefix(ROLE_URI_PREFIX) {
                            // An unknown role from a newer zonegate is ignored, not fatal.
                            if let Ok(r) = r.parse::<Role>() {
                                roles.push(r);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        let host = host.ok_or_else(|| bad("certificate has no DNS name".into()))?;
        // The chain's verifier accepts a server name found in any of them, the identity is
        // read from one: a certificate with several could be checked for one name and taken
        // for another. The zone issues exactly one.
        if names > 1 {
            return Err(bad(format!(
                "certificate has {names} DNS names; a zone device's has exactly one"
            )));
        }
        let (name, domain) = host
            .split_once('.')
            .ok_or_else(|| bad(format!("certificate name {host:?} is not NAME.DOMAIN")))?;
        // By the algorithm, not just the length: another 32-byte key taken for an ed25519 one
        // would stand for a different key.
        if x.public_key().algorithm.algorithm != x509_parser::oid_registry::OID_SIG_ED25519 {
            return Err(bad("certificate key is not ed25519".into()));
        }
        let pk = x.public_key().subject_public_key.data.as_ref();
        let public_key: [u8; 32] = pk
            .try_into()
            .map_err(|_| bad("certificate key is not ed25519".into()))?;
        let not_after = OffsetDateTime::from_unix_timestamp(x.validity().not_after.timestamp())
            .map_err(|e| bad(e.to_string()))?;
        let not_before = OffsetDateTime::from_unix_timestamp(x.validity().not_before.timestamp())
            .map_err(|e| bad(e.to_string()))?;
        Ok(DeviceIdentity {
            name: DeviceName::new(name)?,
            domain: Domain::new(domain)?,
            roles,
            serial_hex: hex(x.raw_serial()),
            not_before,
            not_after,
            public_key,
        })
    }
}

/// Parses every certificate of a PEM file.
pub fn parse_pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, ZoneError> {
    use rustls_pki_types::pem::PemObject;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| {
        use rustls_pki_types::pem::Error;
        // Their Display prints the marker as a list of byte values.
        let why = match e {
            Error::MissingSectionEnd { end_marker } => format!(
                "a section has no {:?} line (the file is cut short: a copy not finished?)",
                String::from_utf8_lossy(&end_marker)
            ),
            Error::IllegalSectionStart { line } => format!(
                "a malformed section start {:?}",
                String::from_utf8_lossy(&line)
            ),
            other => other.to_string(),
        };
        ZoneError::Cert(format!("bad PEM: {why}"))
    })?;
    if certs.is_empty() {
        return Err(ZoneError::Cert("no certificate in PEM".into()));
    }
    Ok(certs)
}

/// The ed25519 public key of a CA certificate (the zone key it pins).
pub fn ca_public_key(ca_der: &[u8]) -> Result<ed25519_dalek::VerifyingKey, ZoneError> {
    let (_, x) = x509_parser::parse_x509_certificate(ca_der)
        .map_err(|e| ZoneError::Cert(format!("cannot parse zone CA certificate: {e}")))?;
    // A device's certificate given for the CA (`--ca device.crt`, `ca = "device.crt"`) was
    // taken at its word, and its key told as "another zone's".
    if !x.is_ca() {
        let named = DeviceIdentity::from_der(ca_der)
            .map(|d| format!(" (the certificate of device {}.{})", d.name, d.domain))
            .unwrap_or_default();
        return Err(ZoneError::Cert(format!(
            "not a CA certificate{named}: give the zone's CA certificate, zone-ca.crt (in the zone directory and in every device's bundle)"
        )));
    }
    // By the algorithm, as for device certificates: any 32-byte key was pinned as ed25519.
    if x.public_key().algorithm.algorithm != x509_parser::oid_registry::OID_SIG_ED25519 {
        return Err(ZoneError::Cert("zone CA key is not ed25519".into()));
    }
    let pk: [u8; 32] = x
        .public_key()
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| ZoneError::Cert("zone CA key is not ed25519".into()))?;
    ed25519_dalek::VerifyingKey::from_bytes(&pk).map_err(|e| ZoneError::Cert(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    fn verify(ca_pem: &str, cert_pem: &str, name: &str) -> Result<(), rustls::Error> {
        let der = |pem: &str| {
            let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
            CertificateDer::from(p.contents)
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der(ca_pem)).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider,
        )
        .build()
        .unwrap();
        let name = ServerName::try_from(name.to_owned()).unwrap();
        v.verify_server_cert(&der(cert_pem), &[], &name, &[], UnixTime::now())
            .map(drop)
    }

    /// The zone CA vouches for its devices' names and for no IP address, whoever holds the
    /// zone key: a certificate it signs for `https://127.0.0.1` fails as a name constraint.
    #[test]
    fn the_zone_ca_vouches_for_no_ip_address() {
        let zone = ZoneKey::from_secret([7u8; 32]);
        let domain = Domain::new("alice.example").unwrap();
        let now = OffsetDateTime::now_utc();
        let ca = make_ca(&zone, &domain, now).unwrap();
        let name = DeviceName::new("home1").unwrap();
        let req = IssueRequest {
            domain: &domain,
            name: &name,
            roles: &[Role::Gateway, Role::Node],
            not_before: now - time::Duration::hours(1),
            not_after: now + time::Duration::days(1),
        };
        let device = issue_device(&zone, &ca, &zone.derive_device(&domain, &name), &req).unwrap();
        verify(&ca, &device.pem, "home1.alice.example").expect("a device's own name verifies");
        // The CA's key is read from the CA only: a device's certificate given for it was
        // taken at its word (and its key told as another zone's).
        let der = |pem: &str| {
            x509_parser::pem::parse_x509_pem(pem.as_bytes())
                .unwrap()
                .1
                .contents
        };
        assert_eq!(
            ca_public_key(&der(&ca)).unwrap().as_bytes(),
            zone.verifying_key().as_bytes()
        );
        let e = ca_public_key(&der(&device.pem)).unwrap_err().to_string();
        assert!(
            e.contains("not a CA certificate (the certificate of device home1.alice.example)")
                && e.contains("zone-ca.crt"),
            "{e}"
        );

        for ip in ["127.0.0.1", "::1"] {
            let mut p = CertificateParams::default();
            p.subject_alt_names = vec![SanType::IpAddress(ip.parse().unwrap())];
            p.not_before = req.not_before;
            p.not_after = req.not_after;
            let issuer = Issuer::from_ca_cert_pem(&ca, zone.rcgen_pair().unwrap()).unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let forged = p.signed_by(&key, &issuer).unwrap().pem();
            let e = verify(&ca, &forged, ip).expect_err("the zone CA vouched for an IP address");
            assert!(format!("{e:?}").contains("NameConstraint"), "{ip}: {e:?}");
        }
    }
}
