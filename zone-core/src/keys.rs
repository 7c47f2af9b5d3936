//! The zone key and the device keys derived from it.
//!
//! Device keys are *derived*, not random: seed = HKDF-SHA256(zone secret, salt
//! `zonegate/device/v1`, info = domain ‖ 0x00 ‖ device name). The owner can therefore re-create
//! any device's key from the zone key alone; no per-device secret needs a backup.

use std::fmt;

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::error::ZoneError;
use crate::names::{DeviceName, Domain};

/// HKDF salt for device keys; the version lets a future scheme coexist.
pub const DEVICE_KEY_SALT: &[u8] = b"zonegate/device/v1";
/// Text prefix of public keys, so a key in a file says what it is.
pub const PUBKEY_PREFIX: &str = "ed25519:";

/// The zone's root secret (ed25519). Lives with the owner, never on the gateway.
pub struct ZoneKey(SigningKey);

/// A device's ed25519 key, derived from the zone key.
pub struct DeviceKey(SigningKey);

// Secrets stay out of Debug output (logs, panics).
impl fmt::Debug for ZoneKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ZoneKey({})", self.public_text())
    }
}
impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceKey({})", self.public_text())
    }
}

fn to_pem(k: &SigningKey) -> Result<Zeroizing<String>, ZoneError> {
    k.to_pkcs8_pem(Default::default())
        .map_err(|e| ZoneError::Key(e.to_string()))
}

fn from_pem(pem: &str) -> Result<SigningKey, ZoneError> {
    // The PEM parser's own words for an empty file name a NUL byte it never saw.
    if pem.trim().is_empty() {
        return Err(ZoneError::Key(
            "the file is empty (a copy cut short?): copy the key again from where it came from, or your backup".into(),
        ));
    }
    SigningKey::from_pkcs8_pem(pem)
        .map_err(|e| ZoneError::Key(format!("not an ed25519 PKCS#8 PEM private key ({e})")))
}

/// `ed25519:BASE58` text form of a public key.
pub fn public_text(k: &VerifyingKey) -> String {
    format!(
        "{PUBKEY_PREFIX}{}",
        bs58::encode(k.as_bytes()).into_string()
    )
}

/// Base58 digits of a 32-byte key, at most (58^44 > 2^256).
const MAX_KEY_DIGITS: usize = 44;

/// Parses the `ed25519:BASE58` text form of a public key.
pub fn parse_public_text(s: &str) -> Result<VerifyingKey, ZoneError> {
    // Quoted in the error only as far as a key goes: the text may be an untrusted 60 KB.
    let b58 = s.strip_prefix(PUBKEY_PREFIX).ok_or_else(|| {
        let head: String = s
            .chars()
            .take(PUBKEY_PREFIX.len() + MAX_KEY_DIGITS)
            .collect();
        let more = if head.len() < s.len() { "…" } else { "" };
        ZoneError::Key(format!(
            "public key {head:?}{more} does not start with {PUBKEY_PREFIX}"
        ))
    })?;
    // 32 bytes take at most 44 base58 digits; decoding costs the square of the length, and
    // this runs on untrusted text before any signature is checked (a 60 KB key in an offered
    // zone.json took seconds of a runtime thread).
    if b58.len() > MAX_KEY_DIGITS {
        return Err(ZoneError::Key(format!(
            "public key {}… is {} characters long: an ed25519 key in base58 has at most {MAX_KEY_DIGITS}",
            s.chars().take(24).collect::<String>(),
            s.len()
        )));
    }
    let raw = bs58::decode(b58)
        .into_vec()
        .map_err(|e| ZoneError::Key(format!("public key {s:?}: {e}")))?;
    let arr: [u8; 32] = raw
        .try_into()
        .map_err(|_| ZoneError::Key(format!("public key {s:?} is not 32 bytes")))?;
    VerifyingKey::from_bytes(&arr).map_err(|e| ZoneError::Key(format!("public key {s:?}: {e}")))
}

impl ZoneKey {
    /// A fresh random zone key.
    pub fn generate() -> Self {
        ZoneKey(SigningKey::generate(&mut rand::rngs::OsRng))
    }
    /// A zone key from a known 32-byte secret (tests and known-answer vectors).
    pub fn from_secret(secret: [u8; 32]) -> Self {
        ZoneKey(SigningKey::from_bytes(&secret))
    }
    pub fn from_pem(pem: &str) -> Result<Self, ZoneError> {
        from_pem(pem).map(ZoneKey)
    }
    pub fn to_pem(&self) -> Result<Zeroizing<String>, ZoneError> {
        to_pem(&self.0)
    }
    pub fn verifying_key(&self) -> VerifyingKey {
        self.0.verifying_key()
    }
    pub fn public_text(&self) -> String {
        public_text(&self.0.verifying_key())
    }
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }
    /// rcgen's view of this key, to sign certificates.
    pub(crate) fn rcgen_pair(&self) -> Result<rcgen::KeyPair, ZoneError> {
        rcgen_pair(&self.0)
    }

    /// Derives the key of device `name` in zone `domain`. Same inputs, same key, always.
    pub fn derive_device(&self, domain: &Domain, name: &DeviceName) -> DeviceKey {
        let hk = Hkdf::<Sha256>::new(Some(DEVICE_KEY_SALT), self.0.as_bytes());
        let mut info = Vec::with_capacity(domain.as_str().len() + 1 + name.as_str().len());
        info.extend_from_slice(domain.as_str().as_bytes());
        info.push(0);
        info.extend_from_slice(name.as_str().as_bytes());
        let mut seed = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA256's 255*32 limit, so expand cannot fail.
        hk.expand(&info, seed.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        DeviceKey(SigningKey::from_bytes(&seed))
    }
}

impl DeviceKey {
    pub fn from_pem(pem: &str) -> Result<Self, ZoneError> {
        from_pem(pem).map(DeviceKey)
    }
    pub fn to_pem(&self) -> Result<Zeroizing<String>, ZoneError> {
        to_pem(&self.0)
    }
    /// PKCS#8 DER, the form rustls takes as a private key.
    pub fn to_pkcs8_der(&self) -> Result<Zeroizing<Vec<u8>>, ZoneError> {
        self.0
            .to_pkcs8_der()
            .map(|d| Zeroizing::new(d.as_bytes().to_vec()))
            .map_err(|e| ZoneError::Key(e.to_string()))
    }
    pub fn verifying_key(&self) -> VerifyingKey {
        self.0.verifying_key()
    }
    pub fn public_text(&self) -> String {
        public_text(&self.0.verifying_key())
    }
    /// The raw 32-byte secret; the mesh derives its Noise static key from it.
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }
    pub(crate) fn rcgen_pair(&self) -> Result<rcgen::KeyPair, ZoneError> {
        rcgen_pair(&self.0)
    }
}

fn rcgen_pair(k: &SigningKey) -> Result<rcgen::KeyPair, ZoneError> {
    let der = k
        .to_pkcs8_der()
        .map_err(|e| ZoneError::Key(e.to_string()))?;
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from(der.as_bytes().to_vec());
    rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)
        .map_err(|e| ZoneError::Key(e.to_string()))
}

/// Verifies an ed25519 signature made by `key` (strict: no malleable signatures).
pub fn verify(key: &VerifyingKey, msg: &[u8], sig: &[u8]) -> bool {
    let Ok(sig) = ed25519_dalek::Signature::from_slice(sig) else {
        return false;
    };
    key.verify_strict(msg, &sig).is_ok() && key.verify(msg, &sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vectors: generated once with this code and pinned, so a change to the
    /// derivation (which would orphan every existing device) cannot slip in unnoticed.
    #[test]
    fn derivation_known_answers() {
        let zone = ZoneKey::from_secret([7u8; 32]);
        let domain = Domain::new("alice.example").unwrap();
        let cases = [("home1", KAT_HOME1), ("gw", KAT_GW)];
        for (name, want) in cases {
            let k = zone.derive_device(&domain, &DeviceName::new(name).unwrap());
            assert_eq!(k.public_text(), want, "device {name}");
        }
        // The HKDF seed itself, cross-checked with an independent implementation (Python's
        // hmac/hashlib, RFC 5869 by hand) so the pin is not just "what this code printed once".
        let seed = zone
            .derive_device(&domain, &DeviceName::new("home1").unwrap())
            .secret_bytes();
        assert_eq!(
            crate::cert::hex(seed.as_ref()),
            "bf3414716664436ae8b05617bed9ef927a907e5b0831229edb0a2b18b949028d"
        );
        // Another domain gives another key for the same name.
        let other = zone.derive_device(
            &Domain::new("bob.example").unwrap(),
            &DeviceName::new("home1").unwrap(),
        );
        assert_ne!(other.public_text(), KAT_HOME1);
    }

    const KAT_HOME1: &str = "ed25519:4zpvRejzTAyYtP5MbEWxfxJqsJzo1q27XeqW7dZktQ75";
    const KAT_GW: &str = "ed25519:2vHpZbeJL3UvsQdELf984BkFm462YtdAe3Hn2qAaoZwc";

    #[test]
    fn pem_round_trip() {
        let z = ZoneKey::generate();
        let back = ZoneKey::from_pem(&z.to_pem().unwrap()).unwrap();
        assert_eq!(z.public_text(), back.public_text());
        assert!(ZoneKey::from_pem(
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        )
        .is_err());
        let e = DeviceKey::from_pem("").unwrap_err().to_string();
        assert!(e.contains("the file is empty"), "{e}");
        assert_eq!(
            parse_public_text(&z.public_text()).unwrap(),
            z.verifying_key()
        );
        assert!(parse_public_text("ed25519:0OIl").is_err());
    }

    /// The largest 32-byte value fits the length cap; a key text past it is refused before
    /// decoding (quadratic in its length).
    #[test]
    fn public_key_texts_are_capped_before_decoding() {
        let widest = bs58::encode([0xffu8; 32]).into_string();
        assert_eq!(widest.len(), MAX_KEY_DIGITS);
        let long = format!("{PUBKEY_PREFIX}{}", "z".repeat(60_000));
        let e = parse_public_text(&long).unwrap_err().to_string();
        assert!(e.contains("at most 44") && e.len() < 200, "{e}");
        // Without the prefix too: an error quoting a 60 KB text was logged for each offer.
        let e = parse_public_text(&"A".repeat(60_000))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not start with") && e.len() < 200, "{e}");
        let e = parse_public_text("rsa:abc").unwrap_err().to_string();
        assert!(e.contains("\"rsa:abc\" does not"), "{e}");
    }

    #[test]
    fn signatures() {
        let z = ZoneKey::generate();
        let sig = z.sign(b"hello");
        assert!(verify(&z.verifying_key(), b"hello", &sig));
        assert!(!verify(&z.verifying_key(), b"hellO", &sig));
        assert!(!verify(&z.verifying_key(), b"hello", &sig[..63]));
    }
}
