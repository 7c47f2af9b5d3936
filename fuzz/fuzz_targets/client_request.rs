//! Fuzzes what a public client sends the front's HTTP/1.x server (`gateway::http::server_h1`):
//! the request head parser, fed the way the connection feeds it (the bytes arrive in pieces;
//! unconsumed bytes stay in the buffer; parsed when `HeadScan` says so, and never missing a
//! complete head), the chunked decoder on what follows a chunked head,
//! and the response head written back with the request's headers in it.
//!
//! Input: one flags byte (bits 0–6: the piece size, 1–128), then the client's bytes.
//!
//! Checked: no panic; a head parsed from pieces is the head parsed from all the bytes at
//! once, taking the same bytes; an incomplete head leaves the buffer as it was; the body's
//! framing is unambiguous (chunked only for HTTP/1.1 and never beside a `Content-Length`; a
//! length only from a `Content-Length`); `Expect: 100-continue` only with a body; an HTTP/1.0
//! connection stays open only when asked; `CONNECT` closes. A response head carrying the
//! request's headers parses (httparse, the gateway's own client parser) as one `200` with
//! exactly the framing written: nothing of the client's framing headers leaks into it.
#![no_main]

use bytes::BytesMut;
use gateway::http::h1::{parse_response, BodyFraming, ChunkedDecoder, HeadScan};
use gateway::http::server_h1::{
    encode_response_head, parse_request, BodyLen, ConnHeader, RequestError, RequestHead, RespBody,
};
use http::{header, Method, StatusCode, Version};
use libfuzzer_sys::fuzz_target;

fn head_in_pieces(data: &[u8], step: usize) -> Result<Option<(RequestHead, usize)>, RequestError> {
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
        match parse_request(&mut buf)? {
            Some(h) => return Ok(Some((h, fed - buf.len()))),
            None => assert_eq!(buf, before, "an incomplete head changed the buffer"),
        }
    }
    // All bytes are in: a complete head HeadScan did not call due would hang a connection.
    let mut last = buf.clone();
    let end = parse_request(&mut last)?;
    assert!(end.is_none(), "HeadScan missed a complete head");
    Ok(None)
}

fn same(a: &RequestHead, b: &RequestHead) -> bool {
    a.method == b.method
        && a.uri == b.uri
        && a.version == b.version
        && a.headers == b.headers
        && a.body == b.body
        && a.keep_alive == b.keep_alive
        && a.expect_continue == b.expect_continue
}

fuzz_target!(|input: &[u8]| {
    let Some((&flags, data)) = input.split_first() else {
        return;
    };
    let step = usize::from(flags & 0x7f) + 1;
    let whole = {
        let mut buf = BytesMut::from(data);
        parse_request(&mut buf).map(|h| h.map(|h| (h, data.len() - buf.len())))
    };
    let pieces = head_in_pieces(data, step);
    let (head, used) = match (whole, pieces) {
        (Ok(Some(w)), Ok(Some(p))) => {
            assert!(
                same(&w.0, &p.0) && w.1 == p.1,
                "pieces gave another head: {w:?} / {p:?}"
            );
            w
        }
        (Err(a), Err(b)) => {
            assert_eq!(a.status(), b.status());
            return;
        }
        // Pieces stop at the first complete head; all bytes at once may also be incomplete
        // only if the pieces were.
        (Ok(None), Ok(None)) => return,
        (w, p) => {
            // A head too large is found at whatever size the buffer reached: pieces may see
            // the limit where the whole input is refused for another reason, and vice versa.
            let big = |r: &Result<_, RequestError>| matches!(r, Err(RequestError::HeadTooLarge));
            assert!(big(&w) || big(&p), "whole {w:?} vs pieces {p:?}");
            return;
        }
    };
    let h = &head;
    let has_length = h.headers.contains_key(header::CONTENT_LENGTH);
    let has_te = h.headers.contains_key(header::TRANSFER_ENCODING);
    match h.body {
        BodyLen::Chunked => {
            assert!(
                has_te && !has_length && h.version == Version::HTTP_11,
                "{h:?}"
            )
        }
        BodyLen::Length(n) => assert!(n > 0 && has_length && !has_te, "{h:?}"),
        BodyLen::Empty => assert!(!has_te, "{h:?}"),
    }
    if h.expect_continue {
        assert!(h.body != BodyLen::Empty && h.version == Version::HTTP_11);
    }
    if h.version == Version::HTTP_10 && h.keep_alive {
        assert!(h.headers.contains_key(header::CONNECTION));
    }
    if h.method == Method::CONNECT {
        assert!(!h.keep_alive);
    }
    if h.body == BodyLen::Chunked {
        let mut d = ChunkedDecoder::new();
        let rest = &data[used..];
        if let Ok(r) = d.decode(rest) {
            assert!(r.consumed <= rest.len());
        }
    }
    // The request's headers in a response head: it must parse as exactly what was written.
    if h.headers.len() <= 90 {
        let date = b"Wed, 02 Dec 2026 12:00:00 GMT";
        let mut out = Vec::new();
        encode_response_head(
            StatusCode::OK,
            &h.headers,
            RespBody::Length(7),
            ConnHeader::Default,
            date,
            &mut out,
        );
        if out.len() < gateway::http::h1::MAX_HEAD - 64 {
            out.extend_from_slice(b"1234567");
            let mut buf = BytesMut::from(&out[..]);
            let resp = parse_response(&mut buf, false)
                .unwrap_or_else(|e| {
                    panic!(
                        "our response head does not parse: {e}\n{:?}",
                        String::from_utf8_lossy(&out)
                    )
                })
                .expect("our response head is incomplete");
            assert_eq!(resp.status, StatusCode::OK);
            assert_eq!(
                resp.framing,
                BodyFraming::Length(7),
                "{:?}",
                String::from_utf8_lossy(&out)
            );
            assert!(resp.keep_alive);
            assert_eq!(&buf[..], b"1234567");
        }
    }
});
