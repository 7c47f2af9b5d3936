//! Round trips of arbitrary valid values, every prefix incomplete, and chunked decoding.

use proptest::collection::vec;
use proptest::prelude::*;
use tunnel::proto::{
    decode_control, decode_datagram, decode_stream_header, decode_stream_reply, encode_control,
    encode_datagram, encode_stream_header, encode_stream_reply, FrameDecoder,
};

use super::strategies::*;

/// A trailing byte after a complete message belongs to whatever follows it on the stream.
const TRAILER: &[u8] = &[0xff, 0x00, 0x5a];

proptest! {
    #[test]
    fn stream_header_round_trip(h in stream_header()) {
        let mut buf = Vec::new();
        encode_stream_header(&h, &mut buf).unwrap();
        let len = buf.len();
        for cut in 0..len {
            prop_assert_eq!(decode_stream_header(&buf[..cut]), Ok(None), "prefix {}", cut);
        }
        buf.extend_from_slice(TRAILER);
        prop_assert_eq!(decode_stream_header(&buf), Ok(Some((h, len))));
    }

    #[test]
    fn stream_reply_round_trip(r in stream_reply()) {
        let mut buf = bytes::BytesMut::new();
        encode_stream_reply(&r, &mut buf).unwrap();
        let len = buf.len();
        for cut in 0..len {
            prop_assert_eq!(decode_stream_reply(&buf[..cut]), Ok(None), "prefix {}", cut);
        }
        buf.extend_from_slice(TRAILER);
        prop_assert_eq!(decode_stream_reply(&buf), Ok(Some((r, len))));
    }

    #[test]
    fn control_round_trip(m in control_msg()) {
        let mut buf = Vec::new();
        encode_control(&m, &mut buf).unwrap();
        let len = buf.len();
        for cut in 0..len {
            prop_assert_eq!(decode_control(&buf[..cut]), Ok(None), "prefix {}", cut);
        }
        buf.extend_from_slice(TRAILER);
        prop_assert_eq!(decode_control(&buf), Ok(Some((m, len))));
    }

    #[test]
    fn datagram_round_trip(flow_id in any::<u32>(), payload in vec(any::<u8>(), 0..1500)) {
        let mut buf = Vec::new();
        encode_datagram(flow_id, &payload, &mut buf).unwrap();
        prop_assert_eq!(decode_datagram(&buf), Ok((flow_id, &payload[..])));
        let (id, p) = tunnel::proto::decode_datagram_bytes(bytes::Bytes::from(buf.clone())).unwrap();
        prop_assert_eq!((id, &p[..]), (flow_id, &payload[..]));
        prop_assert_eq!(buf.len() - payload.len(), tunnel::proto::datagram_overhead(flow_id));
    }

    /// The control stream arrives in arbitrary pieces; the decoder must yield the same messages.
    #[test]
    fn frame_decoder_chunks(msgs in vec(control_msg(), 1..8), cuts in vec(1usize..300, 1..40)) {
        let mut stream = Vec::new();
        for m in &msgs {
            encode_control(m, &mut stream).unwrap();
        }
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        let mut rest = &stream[..];
        let mut cuts = cuts.iter().cycle();
        while !rest.is_empty() {
            let n = (*cuts.next().unwrap()).min(rest.len());
            dec.push(&rest[..n]).unwrap();
            rest = &rest[n..];
            while let Some(m) = dec.next_msg().unwrap() {
                got.push(m);
            }
        }
        prop_assert_eq!(got, msgs);
        prop_assert_eq!(dec.buffered(), 0);
    }
}

#[test]
fn frame_decoder_byte_by_byte() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut stream = Vec::new();
    let mut msgs = Vec::new();
    for _ in 0..64 {
        let m = control_msg().new_tree(&mut runner).unwrap().current();
        encode_control(&m, &mut stream).unwrap();
        msgs.push(m);
    }
    let mut dec = FrameDecoder::new();
    let mut got = Vec::new();
    for b in &stream {
        dec.push(std::slice::from_ref(b)).unwrap();
        while let Some(m) = dec.next_msg().unwrap() {
            got.push(m);
        }
    }
    assert_eq!(got, msgs);
}
