//! Fuzzes the zone config decoders that read untrusted bytes: zone.json (from a peer's hello
//! or a file) and the TXT chunk reassembly (from DNS). No panic; whatever parses re-serializes
//! and parses again to the same value; verification of garbage never succeeds, from a file or
//! through the TXT path DNS bootstrap takes (reassemble, parse, verify); a config signed by the
//! zone key it names verifies, also read back from its JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zone_core::{txt, SignedZone, ZoneKey};

fuzz_target!(|data: &[u8]| {
    if let Ok(z) = SignedZone::from_json(data) {
        let again = SignedZone::from_json(&z.to_json_compact()).expect("re-serialized zone parses");
        assert_eq!(again, z);
        // A fuzzed config never verifies, even naming the zone key it is checked against, as a
        // forger's would (the key is public): the signature would have to be forged. Naming
        // another key, `verify` stopped at its first check, and the signature's decoding and
        // check were never reached.
        let (forged, key) = naming_the_key(&z);
        assert!(
            forged
                .verify(&key, time::OffsetDateTime::UNIX_EPOCH)
                .is_err(),
            "a fuzzed config verified"
        );
        // Signed by the zone key it names (a random key stops `verify` at its first check,
        // before the signature and the consistency checks): whatever signs verifies, as of
        // its issue, also read back from its JSON (the signed bytes survive the trip a
        // zone.json takes to every device).
        let zone = ZoneKey::from_secret([7u8; 32]);
        let mut config = z.config.clone();
        config.zone_key = zone.public_text();
        if let Ok(signed) = config.sign(&zone) {
            let issued = signed.config.issued_at;
            if let Err(e) = signed.verify(&zone.verifying_key(), issued) {
                panic!("a config signed does not verify: {e}");
            }
            let back = SignedZone::from_json(&signed.to_json_compact()).expect("signed parses");
            if let Err(e) = back.verify(&zone.verifying_key(), issued) {
                panic!("a config signed does not verify once read back: {e}");
            }
        }
    }
    // The same bytes as TXT strings: split on newlines, as `zone verify --text` reads them.
    if let Ok(text) = std::str::from_utf8(data) {
        let strings: Vec<&str> = text.lines().collect();
        // DNS bootstrap's path as one: reassembled, parsed, verified (never, under a random key).
        if let Ok(z) = txt::from_txt(&strings) {
            let (forged, key) = naming_the_key(&z);
            assert!(
                forged
                    .verify_newer_than(&key, time::OffsetDateTime::UNIX_EPOCH, Some(0))
                    .is_err(),
                "a fuzzed config from TXT verified"
            );
        }
        if let Ok(payload) = txt::unchunk(&strings) {
            let rechunked = txt::chunk(&payload);
            assert_eq!(
                txt::unchunk(&rechunked).expect("own chunks reassemble"),
                payload
            );
        }
    }
});

/// `z` naming the public key of a zone key whose secret the fuzzer does not have, and that key.
fn naming_the_key(z: &SignedZone) -> (SignedZone, ed25519_dalek::VerifyingKey) {
    let zone = ZoneKey::from_secret([9u8; 32]);
    let mut forged = z.clone();
    forged.config.zone_key = zone.public_text();
    (forged, zone.verifying_key())
}
