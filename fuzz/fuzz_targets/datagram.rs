//! Fuzzes the UDP flow datagram decoder: no panic, canonical re-encoding, and the zero-copy
//! `Bytes` variant agrees with the slice variant.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tunnel::proto::{decode_datagram, decode_datagram_bytes, encode_datagram};

fuzz_target!(|data: &[u8]| {
    let decoded = decode_datagram(data);
    if let Ok((flow_id, payload)) = decoded {
        let mut out = Vec::new();
        encode_datagram(flow_id, payload, &mut out).expect("a decoded datagram re-encodes");
        assert_eq!(out, data);
    }
    let owned = decode_datagram_bytes(Bytes::copy_from_slice(data));
    match (decoded, owned) {
        (Ok((a, p)), Ok((b, q))) => assert_eq!((a, p), (b, &q[..])),
        (Err(e), Err(f)) => assert_eq!(e, f),
        (x, y) => panic!("slice and Bytes decoders disagree: {x:?} vs {y:?}"),
    }
});
