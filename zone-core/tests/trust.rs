//! Device certificates checked through rustls' WebPKI verifiers, as handshakes will check them.

use std::sync::Arc;

use rustls::pki_types::{ServerName, UnixTime};
use time::OffsetDateTime;
use zone_core::cert::{issue_device, IssueRequest};
use zone_core::names::{DeviceName, Role};
use zone_core::zonedir::{read_cert_der, ZoneDir};
use zone_core::{DeviceIdentity, Domain, ZoneTrust};

fn zone(dir: &std::path::Path, domain: &str) -> ZoneDir {
    ZoneDir::init(dir, Domain::new(domain).unwrap(), OffsetDateTime::now_utc()).unwrap()
}

fn trust_of(z: &ZoneDir) -> Arc<ZoneTrust> {
    let ca = read_cert_der(&z.dir.join("zone-ca.crt")).unwrap();
    ZoneTrust::new(z.domain().clone(), ca).unwrap()
}

fn der(pem: &str) -> rustls::pki_types::CertificateDer<'static> {
    zone_core::cert::parse_pem_certs(pem).unwrap().remove(0)
}

#[test]
fn own_device_accepted_with_identity() {
    let t = tempfile::tempdir().unwrap();
    let mut z = zone(t.path(), "alice.example");
    let name = DeviceName::new("home1").unwrap();
    let (_k, c) = z
        .add_device(&name, &[Role::Node], &[], OffsetDateTime::now_utc(), 365)
        .unwrap();
    let trust = trust_of(&z);
    let id = trust.verify_device(&der(&c.pem), UnixTime::now()).unwrap();
    assert_eq!(id.name, name);
    assert_eq!(id.roles, vec![Role::Node]);
    assert_eq!(id.serial_hex, c.serial_hex);
    // And as a server certificate for its host name (the direct-mesh and agent→gateway case).
    let sv = trust.server_verifier();
    sv.verify_server_cert(
        &der(&c.pem),
        &[],
        &ServerName::try_from("home1.alice.example").unwrap(),
        &[],
        UnixTime::now(),
    )
    .unwrap();
    let wrong = sv.verify_server_cert(
        &der(&c.pem),
        &[],
        &ServerName::try_from("gw.alice.example").unwrap(),
        &[],
        UnixTime::now(),
    );
    assert!(
        wrong.is_err(),
        "certificate accepted for another device's name"
    );
}

#[test]
fn other_zone_refused() {
    let t1 = tempfile::tempdir().unwrap();
    let t2 = tempfile::tempdir().unwrap();
    let z1 = zone(t1.path(), "alice.example");
    // Same domain, different zone key: still another zone.
    let mut z2 = zone(t2.path(), "alice.example");
    let (_k, c) = z2
        .add_device(
            &DeviceName::new("home1").unwrap(),
            &[Role::Node],
            &[],
            OffsetDateTime::now_utc(),
            365,
        )
        .unwrap();
    let err = trust_of(&z1)
        .verify_device(&der(&c.pem), UnixTime::now())
        .unwrap_err();
    assert!(
        zone_core::trust::describe_refusal(&err).contains("another zone"),
        "{err:?}"
    );
}

/// A node certificate for `name` of zone `z`, valid from `not_before` to `not_after` as asked.
fn node_cert(
    z: &ZoneDir,
    name: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> zone_core::cert::DeviceCert {
    let name = DeviceName::new(name).unwrap();
    let key = z.key.derive_device(z.domain(), &name);
    issue_device(
        &z.key,
        &z.ca_pem,
        &key,
        &IssueRequest {
            domain: z.domain(),
            name: &name,
            roles: &[Role::Node],
            not_before,
            not_after,
        },
    )
    .unwrap()
}

#[test]
fn expired_refused() {
    let t = tempfile::tempdir().unwrap();
    let z = zone(t.path(), "alice.example");
    let now = OffsetDateTime::now_utc();
    let c = node_cert(
        &z,
        "old",
        now - time::Duration::days(30),
        now - time::Duration::days(1),
    );
    let err = trust_of(&z)
        .verify_device(&der(&c.pem), UnixTime::now())
        .unwrap_err();
    assert!(
        zone_core::trust::describe_refusal(&err).contains("expired"),
        "{err:?}"
    );
}

/// A device certificate ends no later than the zone CA does: one outliving it is refused at
/// every handshake once the CA ends, while connections opened before ran on to its own end.
#[test]
fn device_certificates_end_with_the_ca_at_the_latest() {
    let t = tempfile::tempdir().unwrap();
    let z = zone(t.path(), "alice.example");
    let now = OffsetDateTime::now_utc();
    let far = now + time::Duration::days(zone_core::cert::CA_CERT_DAYS + 400);
    let c = node_cert(&z, "late", now, far);
    let ca_end = now + time::Duration::days(zone_core::cert::CA_CERT_DAYS);
    assert!(c.not_after < far, "{}", c.not_after);
    assert!(
        (c.not_after - ca_end).abs() < time::Duration::hours(1),
        "{} against {ca_end}",
        c.not_after
    );
    // The certificate itself says so, not only the returned date.
    let d = der(&c.pem);
    let (_, x) = x509_parser::parse_x509_certificate(&d).unwrap();
    assert_eq!(
        x.validity().not_after.timestamp(),
        c.not_after.unix_timestamp()
    );
}

#[test]
fn revoked_refused_once_config_known() {
    let t = tempfile::tempdir().unwrap();
    let mut z = zone(t.path(), "alice.example");
    let name = DeviceName::new("laptop").unwrap();
    let (_k, c) = z
        .add_device(&name, &[Role::Node], &[], OffsetDateTime::now_utc(), 365)
        .unwrap();
    let trust = trust_of(&z);
    trust.verify_device(&der(&c.pem), UnixTime::now()).unwrap();
    z.revoke(&name, OffsetDateTime::now_utc()).unwrap();
    trust.add_revocations(&z.zone.config);
    let err = trust
        .verify_device(&der(&c.pem), UnixTime::now())
        .unwrap_err();
    assert!(
        zone_core::trust::describe_refusal(&err).contains("revoked"),
        "{err:?}"
    );
    // The client-side verifier used in handshakes refuses it too.
    assert!(trust
        .client_verifier()
        .verify_client_cert(&der(&c.pem), &[], UnixTime::now())
        .is_err());
}

#[test]
fn identity_reads_roles_and_key() {
    let t = tempfile::tempdir().unwrap();
    let mut z = zone(t.path(), "alice.example");
    let name = DeviceName::new("gw").unwrap();
    let (k, c) = z
        .add_device(
            &name,
            &[Role::Gateway, Role::Node],
            &["203.0.113.10:4433".parse().unwrap()],
            OffsetDateTime::now_utc(),
            365,
        )
        .unwrap();
    let id = DeviceIdentity::from_der(&der(&c.pem)).unwrap();
    assert!(id.has_role(Role::Gateway) && id.has_role(Role::Node));
    assert_eq!(&id.public_key, k.verifying_key().as_bytes());
}

/// An identity is read from exactly one DNS name: a certificate with several (the zone never
/// issues one) could pass the chain's check under one name and be taken for another.
#[test]
fn a_certificate_with_several_dns_names_has_no_identity() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let names = vec![
        "home1.alice.example".to_string(),
        "gw.alice.example".to_string(),
    ];
    let cert = rcgen::CertificateParams::new(names)
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let e = DeviceIdentity::from_der(cert.der())
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 DNS names"), "{e}");
    let one = rcgen::CertificateParams::new(vec!["home1.alice.example".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    assert_eq!(
        DeviceIdentity::from_der(one.der()).unwrap().name.as_str(),
        "home1"
    );
}
