//! HTTP/1.x from public clients, sans-IO: request heads parsed (httparse) into `http` types
//! with values sliced from the read buffer, request body framing (RFC 9112 §6.3, strictly:
//! a request whose length could be read two ways is refused, the classic smuggling vector),
//! and response heads written for the client. What a client sends is untrusted: everything
//! here is bounded, never panics on it, and is fuzzed (`fuzz/fuzz_targets/client_request.rs`).
//!
//! [`super::server`] drives these on each HTTP/1 client connection. It replaced hyper's
//! HTTP/1 server connection (~15k of the gateway's ~44k instructions per proxied request,
//! benches/front_cost.sh); HTTP/2 is still hyper's.

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};

use super::h1;
use super::headers;

/// A request head larger than this is answered 431 (nginx allows 4 × 8 KiB by default). The
/// same as a response head's: [`h1::HeadScan`] parses a growing head of either at this size.
pub const MAX_HEAD: usize = h1::MAX_HEAD;
/// Header lines in a request head (hyper's limit too).
pub const MAX_HEADERS: usize = 100;

/// A request that is no valid HTTP/1.x, or one the gateway will not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("more than {MAX_HEADERS} header lines")]
    TooManyHeaders,
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("transfer coding {0:?} is not supported (only chunked)")]
    Coding(String),
}

impl RequestError {
    /// The status the client is answered with before the connection is closed.
    pub fn status(&self) -> StatusCode {
        match self {
            RequestError::HeadTooLarge | RequestError::TooManyHeaders => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            RequestError::Malformed(_) => StatusCode::BAD_REQUEST,
            RequestError::Coding(_) => StatusCode::NOT_IMPLEMENTED,
        }
    }
}

/// Longest request method taken (policies take methods of at most 32 bytes too).
pub const MAX_METHOD: usize = 32;

/// Client bytes as an error message may carry them into the log: at most 64 of them.
fn clip_for_log(bytes: &[u8]) -> String {
    let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(64)]).into_owned();
    if bytes.len() > 64 {
        format!("{shown}…[{} more bytes]", bytes.len() - 64)
    } else {
        shown
    }
}

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLen {
    Empty,
    Length(u64),
    Chunked,
}

/// A parsed request head.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: BodyLen,
    /// The connection may carry another request after this one's response.
    pub keep_alive: bool,
    /// `Expect: 100-continue` (HTTP/1.1): the client waits for a `100` before its body.
    pub expect_continue: bool,
}

impl RequestHead {
    pub fn into_request<B>(self, body: B) -> Request<B> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

/// Parses a request head at the start of `buf` and takes it off `buf`, which then starts
/// with the body (or the next request). `Ok(None)`: incomplete, read more; `buf` is left as
/// it was. Header values, the method's extension name and the target are slices of the
/// head's bytes (no copies).
///
/// Refused: a `Transfer-Encoding` other than exactly `chunked` (501), one in an HTTP/1.0
/// request, one beside a `Content-Length`, and `Content-Length`s that disagree or are not
/// numbers (400; RFC 9112 §6.3 lets a server refuse all of these, and a proxy must not guess
/// where a body ends: the service might guess otherwise).
pub fn parse_request(buf: &mut BytesMut) -> Result<Option<RequestHead>, RequestError> {
    // Where the method, the target and each header lie in `buf` (as in h1::parse_response:
    // httparse's slices borrow `buf`, which is split before values are cut from it).
    let (n, method, target, minor, spans) = {
        let mut raw =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_request_with_uninit_headers(&mut req, buf, &mut raw);
        let n = match parsed {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                return Err(RequestError::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(RequestError::TooManyHeaders),
            Err(e) => return Err(RequestError::Malformed(e.to_string())),
        };
        let base = buf.as_ptr() as usize;
        let span = |s: &str| {
            let at = s.as_ptr() as usize - base;
            at..at + s.len()
        };
        // A complete request always has both (httparse fills them before Complete).
        let (Some(m), Some(p)) = (req.method, req.path) else {
            return Err(RequestError::Malformed("no request line".into()));
        };
        let spans = h1::header_spans(req.headers, base);
        (n, span(m), span(p), req.version.unwrap_or(1), spans)
    };
    if n > MAX_HEAD {
        return Err(RequestError::HeadTooLarge);
    }
    let raw = buf.split_to(n).freeze();
    // Methods are short tokens; a long one would be logged whole with every answer to it.
    if method.len() > MAX_METHOD {
        return Err(RequestError::Malformed(format!(
            "method longer than {MAX_METHOD} bytes"
        )));
    }
    let method = Method::from_bytes(&raw[method])
        .map_err(|_| RequestError::Malformed("invalid method".into()))?;
    // Origin-form (`/path`) or absolute-form (`http://host/path`); `*` for OPTIONS only and
    // authority-form (`host:port`) for CONNECT only (refused later, with its reason), as RFC
    // 9112 §3.2 allows: `GET host:80` parsed as a URI without a path and was forwarded as `/`.
    let form_ok = match raw[target.clone()].first() {
        Some(b'/') => true,
        Some(b'*') => method == Method::OPTIONS && target.len() == 1,
        _ => method == Method::CONNECT,
    };
    let uri = Uri::from_maybe_shared(raw.slice(target))
        .map_err(|_| RequestError::Malformed("invalid request target".into()))?;
    if !form_ok && uri.scheme().is_none() {
        return Err(RequestError::Malformed(
            "request target is neither /path nor http://host/path".into(),
        ));
    }
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut headers = HeaderMap::with_capacity(spans.len());
    let mut length: Option<Result<u64, ()>> = None;
    let mut codings: Option<Vec<u8>> = None;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut expect_continue = false;
    for (name_span, value_span) in spans {
        let name = HeaderName::from_bytes(&raw[name_span])
            .map_err(|_| RequestError::Malformed("invalid header name".into()))?;
        let value_bytes = &raw[value_span.clone()];
        if name == header::CONTENT_LENGTH {
            let this = h1::parse_length(value_bytes);
            length = Some(match (length, this) {
                (None, Ok(n)) => Ok(n),
                (Some(Ok(a)), Ok(b)) if a == b => Ok(a),
                _ => Err(()),
            });
        } else if name == header::TRANSFER_ENCODING {
            let all = codings.get_or_insert_with(Vec::new);
            if !all.is_empty() {
                all.push(b',');
            }
            all.extend_from_slice(value_bytes);
        } else if name == header::CONNECTION {
            for t in value_bytes.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                close |= t.eq_ignore_ascii_case(b"close");
                keep_alive_token |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name == header::EXPECT {
            expect_continue |= value_bytes
                .trim_ascii()
                .eq_ignore_ascii_case(b"100-continue");
        }
        let value = HeaderValue::from_maybe_shared(raw.slice(value_span)).map_err(|_| {
            let name = clip_for_log(name.as_str().as_bytes());
            RequestError::Malformed(format!("invalid value of header {name}"))
        })?;
        headers.append(name, value);
    }
    let body = match (codings, length) {
        (Some(c), _) if !is_just_chunked(&c) => return Err(RequestError::Coding(clip_for_log(&c))),
        (Some(_), _) if version == Version::HTTP_10 => {
            return Err(RequestError::Malformed(
                "Transfer-Encoding in an HTTP/1.0 request".into(),
            ))
        }
        (Some(_), Some(_)) => {
            return Err(RequestError::Malformed(
                "both Transfer-Encoding and Content-Length".into(),
            ))
        }
        (Some(_), None) => BodyLen::Chunked,
        (None, Some(Err(()))) => {
            return Err(RequestError::Malformed("invalid Content-Length".into()))
        }
        (None, Some(Ok(0))) | (None, None) => BodyLen::Empty,
        (None, Some(Ok(n))) => BodyLen::Length(n),
    };
    let keep_alive = match version {
        Version::HTTP_10 => keep_alive_token && !close,
        _ => !close,
    } && method != Method::CONNECT;
    Ok(Some(RequestHead {
        method,
        uri,
        version,
        headers,
        body,
        keep_alive,
        expect_continue: expect_continue && version == Version::HTTP_11 && body != BodyLen::Empty,
    }))
}

/// `Transfer-Encoding` lists exactly one coding, `chunked`.
fn is_just_chunked(codings: &[u8]) -> bool {
    let mut it = codings
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty());
    matches!((it.next(), it.next()), (Some(c), None) if c.eq_ignore_ascii_case(b"chunked"))
}

/// How a response's body goes to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RespBody {
    /// No body bytes at all (`HEAD`, `1xx`, `204`, `304`): the headers go as they are,
    /// `Content-Length` included (it tells what a `GET` would get).
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client and a body of unknown length).
    UntilClose,
}

/// What the response's `Connection` header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnHeader {
    /// Nothing: HTTP/1.1 keeps the connection by default.
    Default,
    Close,
    /// An HTTP/1.0 client is told the connection stays (it assumes otherwise).
    KeepAlive,
}

/// Bytes of the date line's value (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub const DATE_LEN: usize = 29;

/// Writes a response head: `HTTP/1.1 <status> <reason>`, the headers but those of the hop
/// (hop-by-hop and framing headers, which are written here from `body` and `conn`: a
/// `Content-Length` from the service that disagreed with the body would desynchronise the
/// client), `date` when the response has none, then the blank line. A `101` keeps its
/// `Connection: upgrade` and `Upgrade`.
pub fn encode_response_head(
    status: StatusCode,
    hdrs: &HeaderMap,
    body: RespBody,
    conn: ConnHeader,
    date: &[u8; DATE_LEN],
    out: &mut Vec<u8>,
) {
    out.reserve(128 + hdrs.len() * 48);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    for (name, value) in hdrs {
        // No Content-Length on a 1xx or 204 at all (RFC 9110 §8.6); on HEAD and 304 answers
        // (bodiless, `RespBody::None`) the service's is the length GET would have had.
        let framing = *name == header::CONTENT_LENGTH
            && (body != RespBody::None
                || status.is_informational()
                || status == StatusCode::NO_CONTENT);
        // A 426 keeps its `Upgrade` (what the client must upgrade to: RFC 9110 §15.5.22).
        let hop = headers::is_hop_by_hop(name)
            && !(switching && (*name == header::CONNECTION || *name == header::UPGRADE))
            && !(status == StatusCode::UPGRADE_REQUIRED && *name == header::UPGRADE);
        if framing || hop {
            continue;
        }
        line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !hdrs.contains_key(header::DATE) {
        line(out, b"date", date);
    }
    match body {
        RespBody::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            h1::push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        RespBody::Chunked => line(out, b"transfer-encoding", b"chunked"),
        RespBody::None | RespBody::UntilClose => {}
    }
    // A 426's Upgrade is listed in Connection, as whoever sends Upgrade must (RFC 9110 §7.8).
    let upgrade_listed =
        status == StatusCode::UPGRADE_REQUIRED && hdrs.contains_key(header::UPGRADE);
    match (conn, upgrade_listed) {
        (ConnHeader::Default, false) => {}
        (ConnHeader::Default, true) => line(out, b"connection", b"upgrade"),
        (ConnHeader::Close, false) => line(out, b"connection", b"close"),
        (ConnHeader::Close, true) => line(out, b"connection", b"upgrade, close"),
        (ConnHeader::KeepAlive, false) => line(out, b"connection", b"keep-alive"),
        (ConnHeader::KeepAlive, true) => line(out, b"connection", b"upgrade, keep-alive"),
    }
    out.extend_from_slice(b"\r\n");
}

fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A short complete answer for a request that could not be read, after which the
/// connection is closed.
pub fn refusal(err: &RequestError, date: &[u8; DATE_LEN]) -> Bytes {
    let text = format!("{err}\n");
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    let mut out = Vec::with_capacity(160 + text.len());
    encode_response_head(
        err.status(),
        &h,
        RespBody::Length(text.len() as u64),
        ConnHeader::Close,
        date,
        &mut out,
    );
    out.extend_from_slice(text.as_bytes());
    Bytes::from(out)
}

/// The start of an HTTP/2 connection without TLS ("prior knowledge", RFC 9113 §3.3).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the first bytes of a plain connection are HTTP/2's preface: `Some` once they
/// tell, `None` while they are a proper prefix of it.
pub fn sniff_h2(first: &[u8]) -> Option<bool> {
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] != H2_PREFACE[..n] {
        Some(false)
    } else if n == H2_PREFACE.len() {
        Some(true)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<RequestHead>, RequestError> {
        parse_request(&mut BytesMut::from(s))
    }

    #[test]
    fn simple_get_keeps_alive_and_leaves_the_next_request() {
        let mut buf = BytesMut::from(
            "GET /a?b=c HTTP/1.1\r\nHost: x.example\r\nAccept: */*\r\n\r\nGET /next HTTP/1.1\r\n",
        );
        let h = parse_request(&mut buf).unwrap().unwrap();
        assert_eq!(h.method, Method::GET);
        assert_eq!(h.uri.path(), "/a");
        assert_eq!(h.uri.query(), Some("b=c"));
        assert_eq!(h.version, Version::HTTP_11);
        assert_eq!(h.headers["host"], "x.example");
        assert_eq!(h.body, BodyLen::Empty);
        assert!(h.keep_alive && !h.expect_continue);
        assert_eq!(&buf[..], b"GET /next HTTP/1.1\r\n");
        // Incomplete: nothing taken.
        assert!(parse_request(&mut buf).unwrap().is_none());
        assert_eq!(&buf[..], b"GET /next HTTP/1.1\r\n");
    }

    /// The request target's forms RFC 9112 §3.2 allows, each for its methods only.
    #[test]
    fn targets_in_a_form_their_method_may_not_use_are_refused() {
        for ok in [
            "GET /a HTTP/1.1\r\n\r\n",
            "GET http://x.example/a HTTP/1.1\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\n\r\n",
            "CONNECT x.example:443 HTTP/1.1\r\n\r\n",
        ] {
            assert!(parse(ok).unwrap().is_some(), "{ok}");
        }
        for bad in [
            "GET x.example:80 HTTP/1.1\r\n\r\n",
            "GET * HTTP/1.1\r\n\r\n",
            "OPTIONS *x HTTP/1.1\r\n\r\n",
        ] {
            let e = parse(bad).map(|_| ()).unwrap_err().to_string();
            assert!(
                e.contains("neither /path nor http://host/path"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn framing_and_keep_alive_rules() {
        let h = parse("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.body, BodyLen::Length(5));
        let h = parse("POST / HTTP/1.1\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.body, BodyLen::Length(5));
        let h =
            parse("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\nExpect: 100-Continue\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(h.body, BodyLen::Chunked);
        assert!(h.expect_continue);
        let h = parse("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let h = parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        let h = parse("GET / HTTP/1.1\r\nConnection: foo, close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let h = parse("CONNECT x.example:443 HTTP/1.1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(
            !h.keep_alive,
            "CONNECT is not tunnelled: its answer ends the connection"
        );
        // Expect without a body waits for nothing.
        let h = parse("GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.expect_continue);
    }

    #[test]
    fn ambiguous_lengths_are_refused() {
        let cases = [
            ("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n", 501),
            ("GET / HTTP/2.0\r\n\r\n", 400),
            ("GET /a b HTTP/1.1\r\n\r\n", 400),
            ("G(T / HTTP/1.1\r\n\r\n", 400),
        ];
        for (req, status) in cases {
            let e = parse(req).unwrap_err();
            assert_eq!(e.status().as_u16(), status, "{req:?}: {e}");
        }
    }

    #[test]
    fn oversized_heads_are_431() {
        let mut big = String::from("GET / HTTP/1.1\r\n");
        while big.len() <= MAX_HEAD {
            big.push_str(
                "X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            );
        }
        let e = parse(&big).unwrap_err();
        assert_eq!(e.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("X-{i}: 1\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(parse(&many).unwrap_err(), RequestError::TooManyHeaders);
    }

    #[test]
    fn response_heads_frame_by_the_body_not_the_service() {
        let date = b"Wed, 02 Dec 2026 12:00:00 GMT";
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let mut out = Vec::new();
        encode_response_head(
            StatusCode::OK,
            &h,
            RespBody::Length(5),
            ConnHeader::Default,
            date,
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ndate: Wed, 02 Dec 2026 12:00:00 GMT\r\ncontent-length: 5\r\n\r\n"
        );
        let mut out = Vec::new();
        encode_response_head(
            StatusCode::OK,
            &h,
            RespBody::None,
            ConnHeader::Close,
            date,
            &mut out,
        );
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.contains("content-length: 999\r\n") && s.ends_with("connection: close\r\n\r\n"),
            "{s}"
        );
        let mut up = HeaderMap::new();
        up.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        up.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let mut out = Vec::new();
        encode_response_head(
            StatusCode::SWITCHING_PROTOCOLS,
            &up,
            RespBody::None,
            ConnHeader::Default,
            date,
            &mut out,
        );
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.starts_with("HTTP/1.1 101 Switching Protocols\r\n")
                && s.contains("upgrade: websocket\r\n")
                && s.contains("connection: upgrade\r\n"),
            "{s}"
        );
        // A 426 says what to upgrade to, listed in Connection as any Upgrade must be.
        let mut out = Vec::new();
        encode_response_head(
            StatusCode::UPGRADE_REQUIRED,
            &up,
            RespBody::Length(0),
            ConnHeader::KeepAlive,
            date,
            &mut out,
        );
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.contains("upgrade: websocket\r\n")
                && s.contains("connection: upgrade, keep-alive\r\n")
                && s.matches("connection:").count() == 1,
            "{s}"
        );
    }

    #[test]
    fn preface_sniffing() {
        assert_eq!(sniff_h2(b"GET / HTTP/1.1\r\n"), Some(false));
        assert_eq!(sniff_h2(b"PRI * HT"), None);
        assert_eq!(sniff_h2(b"POST"), Some(false));
        assert_eq!(sniff_h2(H2_PREFACE), Some(true));
        assert_eq!(sniff_h2(b""), None);
    }
}
