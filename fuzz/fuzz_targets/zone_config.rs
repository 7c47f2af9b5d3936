//! Fuzzes the zone config decoders that read untrusted bytes: zone.json (from a peer's hello
//! or a file) and the TXT chunk reassembly (from DNS). No panic; whatever parses re-serializes
//! and parses again to the same value; verification of garbage never succeeds, from a file or
//! through the TXT path DNS bootstrap takes (reassemble, parse, verify).
#![no_main]

use libfuzzer_sys::fuzz_target;
use zone_core::{txt, SignedZone};

fuzz_target!(|data: &[u8]| {
    if let Ok(z) = SignedZone::from_json(data) {
        let again = SignedZone::from_json(&z.to_json_compact()).expect("re-serialized zone parses");
        assert_eq!(again, z);
        // A random key never verifies a fuzzed config (the signature would have to be forged).
        let key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]).verifying_key();
        assert!(
            z.verify(&key, time::OffsetDateTime::UNIX_EPOCH).is_err(),
            "a fuzzed config verified"
        );
    }
    // The same bytes as TXT strings: split on newlines, as `zone verify --text` reads them.
    if let Ok(text) = std::str::from_utf8(data) {
        let strings: Vec<&str> = text.lines().collect();
        // DNS bootstrap's path as one: reassembled, parsed, verified (never, under a random key).
        if let Ok(z) = txt::from_txt(&strings) {
            let key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]).verifying_key();
            assert!(
                z.verify_newer_than(&key, time::OffsetDateTime::UNIX_EPOCH, Some(0))
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
