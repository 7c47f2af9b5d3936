//! Fuzzes the stream header and stream reply decoders: no panic, and whatever decodes
//! re-encodes to the exact bytes consumed, every shorter prefix of which is "incomplete".
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel::proto::{
    decode_stream_header, decode_stream_reply, encode_stream_header, encode_stream_reply,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((header, used))) = decode_stream_header(data) {
        let mut out = Vec::new();
        encode_stream_header(&header, &mut out).expect("a decoded header re-encodes");
        assert_eq!(
            out,
            &data[..used],
            "header encoding is not canonical: {header:?}"
        );
        for cut in [0, used / 2, used - 1] {
            assert_eq!(decode_stream_header(&data[..cut]), Ok(None));
        }
    }
    if let Ok(Some((reply, used))) = decode_stream_reply(data) {
        let mut out = Vec::new();
        encode_stream_reply(&reply, &mut out).expect("a decoded reply re-encodes");
        assert_eq!(
            out,
            &data[..used],
            "reply encoding is not canonical: {reply:?}"
        );
        for cut in 0..used {
            assert_eq!(decode_stream_reply(&data[..cut]), Ok(None));
        }
    }
});
