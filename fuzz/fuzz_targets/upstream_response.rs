//! Fuzzes what a device's service answers the gateway's HTTP/1.1 client
//! (`gateway::http::h1`): the response head parser and the chunked body decoder, fed the way
//! the connection feeds them (the bytes arrive in pieces; unconsumed bytes stay in the buffer).
//!
//! Input: one flags byte (bit 0: the request was `HEAD`; bits 1–7: the piece size, 1–128),
//! then the service's bytes.
//!
//! Checked: no panic; a head parsed from pieces is the head parsed from all the bytes at
//! once, taking the same bytes; an incomplete head leaves the buffer as it was; no hop-by-hop
//! header is kept (a `101` keeps exactly `Upgrade` and `Connection: upgrade`); a chunked body
//! leaves no `Content-Length` behind; chunked framing only for HTTP/1.1; a reusable
//! connection has a delimited body. The chunked decoder fed in pieces gives the same data,
//! the same end and the same error as fed everything at once; its data ranges lie in its
//! input and it never consumes past the body's end.
#![no_main]

use bytes::BytesMut;
use gateway::http::h1::{
    parse_response, BodyFraming, ChunkedDecoder, H1Error, HeadScan, ResponseHead,
};
use gateway::http::headers::is_hop_by_hop;
use http::header;
use libfuzzer_sys::fuzz_target;

/// Parses the head from `data` arriving `step` bytes at a time: the head and the bytes it took.
fn head_in_pieces(
    data: &[u8],
    step: usize,
    head_request: bool,
) -> Result<Option<(ResponseHead, usize)>, H1Error> {
    let mut buf = BytesMut::new();
    let mut scan = HeadScan::default();
    let mut fed = 0;
    while fed < data.len() {
        let end = (fed + step).min(data.len());
        buf.extend_from_slice(&data[fed..end]);
        fed = end;
        // Parsed when the connection would parse it (HeadScan), not after every piece.
        if !scan.due(&buf) {
            continue;
        }
        let before = buf.clone();
        match parse_response(&mut buf, head_request)? {
            Some(h) => return Ok(Some((h, fed - buf.len()))),
            None => assert_eq!(buf, before, "an incomplete head changed the buffer"),
        }
    }
    // All bytes are in: a complete head HeadScan did not call due would hang a connection.
    let mut last = buf.clone();
    let end = parse_response(&mut last, head_request)?;
    assert!(end.is_none(), "HeadScan missed a complete head");
    Ok(None)
}

/// Decodes a chunked body from `data` in pieces of `step` bytes: (data, bytes consumed, done)
/// or the error.
fn dechunk(data: &[u8], step: usize) -> Result<(Vec<u8>, usize, bool), H1Error> {
    let mut d = ChunkedDecoder::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    let mut fed = 0;
    let mut consumed = 0;
    loop {
        if fed < data.len() && !d.is_done() {
            let end = (fed + step).min(data.len());
            buf.extend_from_slice(&data[fed..end]);
            fed = end;
        }
        let r = d.decode(&buf)?;
        assert!(r.consumed <= buf.len(), "consumed past its input");
        if let Some(range) = r.data.clone() {
            assert!(
                range.start <= range.end && range.end == r.consumed,
                "data range {range:?} of {}",
                r.consumed
            );
            out.extend_from_slice(&buf[range]);
        }
        buf.drain(..r.consumed);
        consumed += r.consumed;
        if d.is_done() {
            return Ok((out, consumed, true));
        }
        if fed == data.len() && r.consumed == 0 {
            return Ok((out, consumed, false));
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&flags, data)) = input.split_first() else {
        return;
    };
    let head_request = flags & 1 == 1;
    let step = usize::from(flags >> 1) + 1;

    let mut whole = BytesMut::from(data);
    let at_once = parse_response(&mut whole, head_request);
    let at_once = at_once.map(|h| h.map(|h| (h, data.len() - whole.len())));
    let pieces = head_in_pieces(data, step, head_request);
    match (&at_once, &pieces) {
        (Ok(Some((a, an))), Ok(Some((b, bn)))) => {
            assert_eq!(an, bn, "heads took different lengths");
            assert_eq!(
                (a.status, a.version, a.framing, a.keep_alive),
                (b.status, b.version, b.framing, b.keep_alive)
            );
            assert_eq!(a.headers, b.headers);
        }
        (Ok(None), Ok(None)) => {}
        // Pieces can fail earlier (a partial head past MAX_HEAD) or at the same error.
        (Err(_), Err(_)) => {}
        (a, b) => panic!("whole {a:?} but pieces {b:?}"),
    }
    let Ok(Some((head, used))) = at_once else {
        return;
    };
    if head.framing == BodyFraming::Chunked {
        assert!(
            !head.headers.contains_key(header::CONTENT_LENGTH),
            "length kept beside a transfer coding"
        );
    }
    // No hop-by-hop header is forwarded: a 101 keeps exactly `Upgrade` + `Connection: upgrade`.
    let upgrade = head.status == http::StatusCode::SWITCHING_PROTOCOLS
        && head.headers.contains_key(header::UPGRADE);
    for (name, value) in &head.headers {
        if upgrade && name == header::CONNECTION {
            assert_eq!(value, "upgrade");
            continue;
        }
        if upgrade && name == header::UPGRADE {
            assert_eq!(head.headers.get_all(header::UPGRADE).iter().count(), 1);
            continue;
        }
        assert!(
            !is_hop_by_hop(name),
            "hop-by-hop {name} kept: {:?}",
            head.headers
        );
    }
    for listed in head.headers.get_all(header::CONNECTION) {
        assert!(
            upgrade && listed == "upgrade",
            "Connection kept: {:?}",
            head.headers
        );
    }
    if head.framing == BodyFraming::Chunked {
        assert_eq!(head.version, http::Version::HTTP_11);
    }
    if head.keep_alive {
        assert_ne!(head.framing, BodyFraming::UntilClose);
    }
    let body = &data[used..];
    let a = dechunk(body, body.len().max(1));
    let b = dechunk(body, step);
    match (&a, &b) {
        (Ok(x), Ok(y)) => assert_eq!(x, y, "pieces of {step} decode differently"),
        (Err(x), Err(y)) => assert_eq!(x, y),
        _ => panic!("whole {a:?}, pieces of {step} {b:?}"),
    }
});
