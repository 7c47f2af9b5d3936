//! Fuzzes the end-to-end (Noise) frame decoder of relayed mesh streams: the bare length
//! decoder never panics and consumes exactly what it declares; the framer fed attacker bytes
//! never panics and opens nothing it did not seal; sealing the input and opening it on the
//! other side gives it back.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tunnel::e2e::{decode_frame, framer_pair_for_tests, Opened, LEN_PREFIX, TAG_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((body, used))) = decode_frame(data) {
        assert_eq!(used, LEN_PREFIX + body.len());
        assert!(used <= data.len() && body.len() >= TAG_LEN);
    }
    let (mut tx, mut rx) = framer_pair_for_tests();
    let mut wire = BytesMut::from(data);
    if let Ok(Some(o)) = rx.open(&mut wire) {
        panic!("forged frame opened: {o:?}");
    }
    let mut sealed = BytesMut::new();
    tx.seal(data, &mut sealed).expect("seal");
    tx.seal_end(&mut sealed).expect("seal end");
    let mut back = Vec::new();
    loop {
        match rx.open(&mut sealed).expect("own frames open") {
            Some(Opened::Data(d)) => back.extend_from_slice(&d),
            Some(Opened::End) => break,
            None => panic!("sealed stream ended without its end frame"),
        }
    }
    assert_eq!(back, data);
    assert!(sealed.is_empty());
});
