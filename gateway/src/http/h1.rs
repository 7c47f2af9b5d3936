//! HTTP/1.1 toward device services, sans-IO: request heads written into a buffer, response
//! heads parsed (httparse) into `http` types, response body framing (RFC 9112 §6.3) and a
//! chunked decoder. What a service answers is untrusted input: everything here is bounded,
//! never panics on it, and is fuzzed (`fuzz/fuzz_targets/upstream_response.rs`).
//!
//! The gateway's own client ([`super::upstream`]) drives these over a tunnel stream. It
//! replaced a hyper client connection per pooled stream, whose dispatch (channels, a
//! callback per request, a connection state machine polled from both ends) was ~20k of the
//! gateway's ~58k instructions per proxied request (benches/front_cost.sh).

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

use super::headers;

/// A response head larger than this is refused (hyper's client allowed ~400 KiB; nginx's
/// default proxy buffer is 4–8 KiB). 64 KiB holds any sane set of cookies.
pub const MAX_HEAD: usize = 64 * 1024;
/// Header lines in a response head (hyper's limit too).
pub const MAX_HEADERS: usize = 100;
/// Bytes of chunk extensions per chunk, and of trailer fields in all, before the body is
/// called malformed: neither is forwarded, so neither may make the gateway buffer.
pub const MAX_CHUNK_EXT: usize = 4 * 1024;
pub const MAX_TRAILERS: usize = 16 * 1024;

/// A service's answer that is no valid HTTP/1.1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum H1Error {
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("malformed response head: {0}")]
    Head(String),
    #[error("Content-Length is not a single number")]
    BadLength,
    #[error("malformed chunked body: {0}")]
    Chunk(&'static str),
}

/// How a request body is sent: decided from the client's request (see [`request_framing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReqFraming {
    /// No body.
    Empty,
    /// `Content-Length`: exactly this many bytes follow.
    Length(u64),
    /// `Transfer-Encoding: chunked` (a body of unknown length: an HTTP/1.1 client's chunked
    /// upload, an HTTP/2 request without `Content-Length`).
    Chunked,
}

/// How a request body of the client's goes up, from what the body says of itself: `empty`,
/// and its `exact` size (both servers, ours for HTTP/1 and hyper's for HTTP/2, take it from a
/// valid `Content-Length` and hold the body to it).
pub fn request_framing(empty: bool, exact: Option<u64>) -> ReqFraming {
    match exact {
        Some(n) if n > 0 || !empty => ReqFraming::Length(n),
        _ if empty => ReqFraming::Empty,
        _ => ReqFraming::Chunked,
    }
}

/// Writes `METHOD target HTTP/1.1`, the headers as [`headers::write_request_headers`]
/// rewrites them, and the framing header of `framing` (the client's `Content-Length` is not
/// copied: this one is written from `framing`). Methods that carry a body get
/// `Content-Length: 0` when empty, as hyper's client did, so a service never waits for one.
/// `target` must be printable ASCII without spaces (the caller checks).
pub fn encode_request_head(
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    fwd: &headers::Forwarded<'_>,
    framing: ReqFraming,
    out: &mut Vec<u8>,
) {
    out.reserve(192 + target.len() + headers.len() * 48);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    headers::write_request_headers(headers, fwd, out);
    match framing {
        ReqFraming::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        ReqFraming::Empty if expects_body(method) => {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        ReqFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        ReqFraming::Empty => {}
    }
    out.extend_from_slice(b"\r\n");
}

fn expects_body(m: &Method) -> bool {
    matches!(*m, Method::POST | Method::PUT | Method::PATCH)
}

/// Whether a request body means something for `m`: POST, PUT, PATCH, and the WebDAV (with
/// versioning, DeltaV, and bindings), CalDAV and QUERY methods whose bodies their
/// specifications define. For the others — DELETE and
/// OPTIONS (RFC 9110 §9.3.5, §9.3.7: "no generally defined semantics"), CONNECT, methods this
/// list does not know — a service may answer without reading a body, and then parse it as its
/// next request, one the policy never saw.
pub(crate) fn body_is_defined(m: &Method) -> bool {
    expects_body(m)
        || matches!(
            m.as_str(),
            "PROPFIND"
                | "PROPPATCH"
                | "MKCOL"
                | "LOCK"
                | "REPORT"
                | "SEARCH"
                | "ACL"
                | "MKCALENDAR"
                | "QUERY"
                | "MERGE"
                | "CHECKOUT"
                | "CHECKIN"
                | "UNCHECKOUT"
                | "MKACTIVITY"
                | "MKWORKSPACE"
                | "UPDATE"
                | "LABEL"
                | "VERSION-CONTROL"
                | "BASELINE-CONTROL"
                | "ORDERPATCH"
                | "BIND"
                | "REBIND"
                | "UNBIND"
        )
}

pub(crate) fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// The size line of one chunk of a chunked request body (`1a2b\r\n`).
pub fn chunk_size_line(len: usize) -> Bytes {
    let mut b = Vec::with_capacity(18);
    push_chunk_size_line(&mut b, len);
    Bytes::from(b)
}

/// Appends the size line of a chunk of `len` bytes (hex, then CRLF), for a request going up
/// or an answer going to a client.
pub(crate) fn push_chunk_size_line(out: &mut Vec<u8>, mut len: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[len & 0xf];
        len >>= 4;
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// The end of a chunked body: the last chunk and an empty trailer section.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// When a head that arrives in pieces is worth parsing again. httparse keeps nothing between
/// calls, so parsing after every read rescans the whole head: a 64 KiB head trickled a few
/// bytes per read cost the reader a quadratic ~10⁹ byte steps. Parsing is due when the new
/// bytes hold a blank line (a complete head ends with `\n\r\n` or `\n\n`), when the head has
/// doubled since the last parse (so malformed bytes are still refused early, at linear cost in
/// all), at [`MAX_HEAD`] bytes (to refuse it), and for the first bytes of each head. A parse
/// that is not due could only have said "incomplete".
///
/// Empty lines before the first line are no end: httparse skips them (RFC 9112 §2.2), so a
/// client trickling `\n` bytes had every read parsed again from the start, the quadratic cost
/// this exists to prevent.
#[derive(Debug, Default)]
pub struct HeadScan {
    /// Bytes of the current head already searched for its end.
    scanned: usize,
    /// Bytes the last parse saw (0: none yet).
    parsed: usize,
    /// Leading CR and LF bytes found so far, and whether a byte of the first line followed.
    lead: usize,
    lead_done: bool,
}

impl HeadScan {
    /// Whether `buf`, the current head grown since the last call, should be parsed now.
    pub fn due(&mut self, buf: &[u8]) -> bool {
        // The first bytes are parsed unsearched: most heads arrive whole in one read, and
        // searching them first cost ~2,000 instructions per proxied request (front_cost.sh).
        if self.parsed == 0 {
            self.scanned = buf.len();
            self.parsed = buf.len().max(1);
            return true;
        }
        if !self.lead_done {
            let rest = buf.get(self.lead..).unwrap_or_default();
            self.lead += rest
                .iter()
                .take_while(|&&c| c == b'\r' || c == b'\n')
                .count();
            self.lead_done = self.lead < buf.len();
        }
        // Back two bytes: an end sequence may straddle the previous read; not into the empty
        // lines before the first line.
        let from = self.scanned.saturating_sub(2).max(self.lead).min(buf.len());
        let ended = self.lead_done && has_blank_line(&buf[from..]);
        self.scanned = buf.len();
        let due = ended || buf.len() >= self.parsed.saturating_mul(2) || buf.len() >= MAX_HEAD;
        if due {
            self.parsed = buf.len();
        }
        due
    }

    /// The head was taken off the buffer (or refused): the next bytes start a new one.
    pub fn reset(&mut self) {
        *self = HeadScan::default();
    }
}

/// Whether `b` holds the end of a header section: a line feed followed by an empty line.
fn has_blank_line(b: &[u8]) -> bool {
    b.iter().enumerate().any(|(i, &c)| {
        c == b'\n'
            && match b.get(i + 1) {
                Some(b'\n') => true,
                Some(b'\r') => b.get(i + 2) == Some(&b'\n'),
                _ => false,
            }
    })
}

/// How a response's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// None at all (`HEAD`, `1xx`, `204`, `304`).
    Empty,
    Length(u64),
    Chunked,
    /// Until the service closes the connection (no length, or a transfer coding other than
    /// chunked last): the connection cannot be reused.
    UntilClose,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: BodyFraming,
    /// The connection may carry another request once this response is over.
    pub keep_alive: bool,
    /// How long the service keeps an idle connection open, if its `Keep-Alive: timeout=N`
    /// said ([`super::pool::keep_for`]).
    pub keep_alive_timeout: Option<std::time::Duration>,
}

/// Parses a response head at the start of `buf` (to a `HEAD` request when `head_request`)
/// and takes it off `buf`, which then starts with the body. `Ok(None)`: incomplete, read
/// more (unless `buf` already holds [`MAX_HEAD`] bytes: then it is
/// [`H1Error::HeadTooLarge`]); `buf` is left as it was. Header values are slices of the
/// head's bytes (no copies).
///
/// Hop-by-hop headers are left out as they are read ([`headers::is_hop_by_hop`] and what
/// `Connection` names, RFC 9110 §7.6.1), cheaper than inserting and then removing them: a
/// `101` keeps its (first) `Upgrade` and says `Connection: upgrade`, a `426` its (first)
/// `Upgrade`. A `Content-Length` that a transfer coding overrides is dropped too, and so is
/// one a bodiless answer may not carry or that does not parse; one that is a list or repeated
/// becomes one value.
pub fn parse_response(
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Option<ResponseHead>, H1Error> {
    // Where each header's name and value lie in `buf`: the head is split off `buf` before
    // the values are cut from it, and httparse's slices borrow `buf`. (A zeroed array of
    // MAX_HEADERS positions cost a 4 KiB memset per answer, callgrind; hence the Vec.)
    let (n, code, minor, spans) = {
        let mut raw =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut raw);
        let n = match parsed {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                return Err(H1Error::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(H1Error::Head(format!(
                    "more than {MAX_HEADERS} header lines"
                )))
            }
            Err(e) => return Err(H1Error::Head(e.to_string())),
        };
        let spans = header_spans(resp.headers, buf.as_ptr() as usize);
        (n, resp.code.unwrap_or(0), resp.version.unwrap_or(1), spans)
    };
    if n > MAX_HEAD {
        return Err(H1Error::HeadTooLarge);
    }
    let status = StatusCode::from_u16(code)
        .map_err(|_| H1Error::Head(format!("status code {code} out of range")))?;
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let raw = buf.split_to(n).freeze();
    let mut headers = HeaderMap::with_capacity(spans.len());
    let mut lengths: Option<Result<u64, ()>> = None;
    // Transfer codings named (all headers together), and how many of them were `chunked`.
    let mut codings = None::<(usize, usize)>;
    let mut close_token = false;
    let mut keep_alive_token = false;
    let mut keep_alive_timeout = None;
    let (mut length_lines, mut length_lists) = (0usize, false);
    let upgrade = status == StatusCode::SWITCHING_PROTOCOLS;
    // A 426 must say what to upgrade to (RFC 9110 §15.5.22): its `Upgrade` is passed on too.
    let pass_upgrade = upgrade || status == StatusCode::UPGRADE_REQUIRED;
    // Names listed by `Connection` but `keep-alive` and `upgrade`, hop-by-hop names anyway:
    // most answers list no other, and then nothing is allocated.
    // As header names (lower case, hashed), not compared with every header one by one: a
    // 64 KiB `Connection` can list ~30,000 tokens.
    let listed: std::collections::HashSet<HeaderName> = spans
        .iter()
        .filter(|(n, _)| raw[n.clone()].eq_ignore_ascii_case(b"connection"))
        .flat_map(|(_, v)| raw[v.clone()].split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty() && !headers::is_connection_option(t))
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .collect();
    for (name_span, value_span) in spans {
        let name_bytes = &raw[name_span];
        let value_bytes = &raw[value_span.clone()];
        let name = HeaderName::from_bytes(name_bytes).map_err(|_| {
            H1Error::Head(format!(
                "invalid header name {:?}",
                String::from_utf8_lossy(name_bytes)
            ))
        })?;
        let value = HeaderValue::from_maybe_shared(raw.slice(value_span))
            .map_err(|_| H1Error::Head(format!("invalid value of header {name}")))?;
        if name == header::CONTENT_LENGTH {
            // Anything but one plain value is rewritten below.
            length_lines += 1;
            length_lists |= value_bytes.contains(&b',');
            let this = parse_length(value_bytes);
            lengths = Some(match (lengths, this) {
                (None, Ok(n)) => Ok(n),
                (Some(Ok(a)), Ok(b)) if a == b => Ok(a),
                _ => Err(()),
            });
        } else if name == header::TRANSFER_ENCODING {
            let (all, chunked) = codings.get_or_insert((0, 0));
            for t in value_bytes
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .filter(|t| !t.is_empty())
            {
                *all += 1;
                *chunked += usize::from(t.eq_ignore_ascii_case(b"chunked"));
            }
        } else if name == header::CONNECTION {
            for t in value_bytes.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                close_token |= t.eq_ignore_ascii_case(b"close");
                keep_alive_token |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.as_str() == "keep-alive" {
            // The smallest, if it says several: the service closes at that one.
            if let Some(t) = keep_alive_secs(value_bytes) {
                keep_alive_timeout =
                    Some(keep_alive_timeout.map_or(t, |k: std::time::Duration| k.min(t)));
            }
        }
        let hop = headers::is_hop_by_hop(&name) || listed.contains(&name);
        if hop
            && !(pass_upgrade && name == header::UPGRADE && !headers.contains_key(header::UPGRADE))
        {
            continue;
        }
        headers.append(name, value);
    }
    if upgrade && headers.contains_key(header::UPGRADE) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // HTTP/1.0 closes unless the answer keeps alive; a `close` token wins over a
    // `keep-alive` beside it, as on the request side.
    let mut close = close_token || (version == Version::HTTP_10 && !keep_alive_token);
    let no_body = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if no_body {
        BodyFraming::Empty
    } else if let Some(named) = codings {
        // Only a lone `chunked` on HTTP/1.1 can be passed on: `Transfer-Encoding` is
        // hop-by-hop, so a body still gzip-coded after de-chunking ("gzip, chunked"), or
        // raw chunk framing read to the close ("chunked, gzip", HTTP/1.0), would reach the
        // client with nothing saying how to read it (nginx refuses these too).
        if named != (1, 1) || version != Version::HTTP_11 {
            return Err(H1Error::Head(
                "the service's answer uses a transfer coding other than chunked".into(),
            ));
        }
        // A transfer coding overrides any length, which is then dropped: forwarded, it
        // would frame the client's copy of a body it no longer describes (smuggling).
        headers.remove(header::CONTENT_LENGTH);
        // And the connection is not reused (RFC 9112 §6.3: such a message "ought to be
        // handled as an error"): a service that is itself a proxy may have framed it the
        // other way, leaving bytes that would be the next client's answer.
        close |= lengths.is_some();
        BodyFraming::Chunked
    } else {
        match lengths {
            Some(Ok(0)) => BodyFraming::Empty,
            Some(Ok(n)) => BodyFraming::Length(n),
            Some(Err(())) => return Err(H1Error::BadLength),
            None => BodyFraming::UntilClose,
        }
    };
    // One `Content-Length` of the value read ("5, 5" or repeated lines are one length here,
    // but malformed to HTTP/2 clients, which reset the stream), none where no answer may
    // carry one (1xx, 204: RFC 9110 §8.6); HEAD and 304 answers keep theirs, which tells the
    // length of what a GET would get.
    // (A bodiless answer's length is not checked above: one that conflicts or does not parse
    // goes, as does any beside a transfer coding, which the framing branch drops only when
    // there is a body.)
    match (lengths, codings) {
        (Some(Ok(n)), None) if !(status.is_informational() || status == StatusCode::NO_CONTENT) => {
            if length_lines > 1 || length_lists {
                // Only then: most answers have one plain length, kept without an allocation.
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            }
        }
        (Some(_), _) => {
            headers.remove(header::CONTENT_LENGTH);
        }
        (None, _) => {}
    }
    let keep_alive = !close && framing != BodyFraming::UntilClose;
    Ok(Some(ResponseHead {
        status,
        version,
        headers,
        framing,
        keep_alive,
        keep_alive_timeout,
    }))
}

/// The `timeout=N` of a `Keep-Alive` header value, in seconds (RFC 2068 §19.7.1.1; Node.js and
/// Apache send it); None if absent or not a number.
fn keep_alive_secs(v: &[u8]) -> Option<std::time::Duration> {
    v.split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .find_map(|p| {
            let (k, n) = p.split_at_checked(p.iter().position(|&b| b == b'=')?)?;
            let n = n.get(1..)?.trim_ascii();
            (k.trim_ascii().eq_ignore_ascii_case(b"timeout")
                && !n.is_empty()
                && n.len() <= 9
                && n.iter().all(u8::is_ascii_digit))
            .then(|| n.iter().fold(0u64, |a, &d| a * 10 + u64::from(d - b'0')))
        })
        .map(std::time::Duration::from_secs)
}

/// Where each of `headers`' names and values lie, as offsets from `base`, the start of the
/// buffer httparse parsed (its slices borrow that buffer; the values are cut from it later).
pub(crate) fn header_spans(
    headers: &[httparse::Header<'_>],
    base: usize,
) -> Vec<(Range<usize>, Range<usize>)> {
    headers
        .iter()
        .map(|h| {
            let name = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            (name..name + h.name.len(), value..value + h.value.len())
        })
        .collect()
}

pub(crate) fn parse_length(v: &[u8]) -> Result<u64, ()> {
    // Some services repeat the value in one header ("5, 5"): equal parts are one length.
    let mut out = None;
    for part in v.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err(());
        }
        let n = part.iter().fold(0u64, |a, &d| a * 10 + u64::from(d - b'0'));
        match out {
            Some(prev) if prev != n => return Err(()),
            _ => out = Some(n),
        }
    }
    out.ok_or(())
}

/// Decodes a chunked body (RFC 9112 §7.1) from whatever bytes are at hand: data ranges come
/// out as they arrive (never buffered here), extensions and trailers are checked and dropped.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: ChunkState,
    /// Data bytes left in the current chunk (state `Data`).
    left: u64,
    /// Bytes of extensions in the current size line, or of the trailer section.
    skipped: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Hex digits of a size (none yet when `left == 0 && !digits`).
    Size {
        digits: u8,
    },
    /// Whitespace after the size, before `;` or CR.
    SizeWs,
    /// A chunk extension, up to CR.
    Ext,
    /// The LF of the size line.
    SizeLf,
    Data,
    /// The CRLF after a chunk's data.
    DataCr,
    DataLf,
    /// The start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer line, up to CR.
    Trailer,
    TrailerLf,
    /// The LF of the final empty line.
    EndLf,
    Done,
}

/// One step of [`ChunkedDecoder::decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// Bytes of the input used (including `data`).
    pub consumed: usize,
    /// Body data found, as a range of the input.
    pub data: Option<Range<usize>>,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: ChunkState::Size { digits: 0 },
            left: 0,
            skipped: 0,
        }
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The body is over (the last chunk and the trailer section were read).
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Consumes control bytes of `input` up to the first data, and returns that data's
    /// range (as much of the chunk as `input` holds). Stops at the end of `input`, at data, or
    /// when the body is over ([`Self::is_done`]); bytes after the body are not consumed.
    pub fn decode(&mut self, input: &[u8]) -> Result<Decoded, H1Error> {
        use ChunkState::*;
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                Done => break,
                Data => {
                    let n = (input.len() - i).min(usize::try_from(self.left).unwrap_or(usize::MAX));
                    self.left -= n as u64;
                    if self.left == 0 {
                        self.state = DataCr;
                    }
                    return Ok(Decoded {
                        consumed: i + n,
                        data: Some(i..i + n),
                    });
                }
                Size { digits } => match hex(b) {
                    Some(d) => {
                        // Fifteen significant digits at most (under 2^60); leading zeros are
                        // a size too (RFC 9112 §7.1: 1*HEXDIG), up to a bound on the line.
                        if self.left >= 1 << 56 {
                            return Err(H1Error::Chunk("chunk size too large"));
                        }
                        if digits >= 64 {
                            return Err(H1Error::Chunk("chunk size of over 64 digits"));
                        }
                        self.left = self.left * 16 + u64::from(d);
                        self.state = Size { digits: digits + 1 };
                    }
                    None if digits == 0 => return Err(H1Error::Chunk("expected a chunk size")),
                    None => {
                        self.skipped = 0;
                        self.state = SizeWs;
                        continue;
                    }
                },
                SizeWs => match b {
                    b' ' | b'\t' => {}
                    b';' => self.state = Ext,
                    b'\r' => self.state = SizeLf,
                    _ => return Err(H1Error::Chunk("invalid byte after chunk size")),
                },
                Ext => match b {
                    b'\r' => self.state = SizeLf,
                    b'\n' => return Err(H1Error::Chunk("bare LF in chunk extension")),
                    _ => self.skip(MAX_CHUNK_EXT, "chunk extension too long")?,
                },
                SizeLf => {
                    expect(b, b'\n', "expected LF after chunk size")?;
                    if self.left == 0 {
                        self.skipped = 0;
                        self.state = TrailerStart;
                    } else {
                        self.state = Data;
                    }
                }
                DataCr => {
                    expect(b, b'\r', "expected CRLF after chunk data")?;
                    self.state = DataLf;
                }
                DataLf => {
                    expect(b, b'\n', "expected CRLF after chunk data")?;
                    self.state = Size { digits: 0 };
                }
                TrailerStart => {
                    self.state = match b {
                        b'\r' => EndLf,
                        b'\n' => return Err(H1Error::Chunk("bare LF in trailer section")),
                        _ => {
                            self.skipped += 1;
                            Trailer
                        }
                    }
                }
                Trailer => match b {
                    b'\r' => self.state = TrailerLf,
                    b'\n' => return Err(H1Error::Chunk("bare LF in trailer section")),
                    _ => self.skip(MAX_TRAILERS, "trailer section too long")?,
                },
                TrailerLf => {
                    expect(b, b'\n', "expected LF after trailer line")?;
                    self.state = TrailerStart;
                }
                EndLf => {
                    expect(b, b'\n', "expected LF at the end of the body")?;
                    self.state = Done;
                    i += 1;
                    break;
                }
            }
            i += 1;
        }
        // Input ended inside a chunk's data: the next call returns it.
        Ok(Decoded {
            consumed: i,
            data: None,
        })
    }
}

impl ChunkedDecoder {
    /// One more byte of an extension or trailer, which are dropped: at most `max` of them.
    fn skip(&mut self, max: usize, too_long: &'static str) -> Result<(), H1Error> {
        self.skipped += 1;
        if self.skipped > max {
            return Err(H1Error::Chunk(too_long));
        }
        Ok(())
    }
}

/// `b` must be the framing byte `want`.
fn expect(b: u8, want: u8, otherwise: &'static str) -> Result<(), H1Error> {
    if b == want {
        Ok(())
    } else {
        Err(H1Error::Chunk(otherwise))
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The head parsed from `s`, and how many bytes it took.
    fn head(s: &str) -> Result<Option<(ResponseHead, usize)>, H1Error> {
        let mut b = BytesMut::from(s.as_bytes());
        let r = parse_response(&mut b, false)?;
        Ok(r.map(|h| (h, s.len() - b.len())))
    }

    #[test]
    fn head_scan_parses_a_trickled_head_a_logarithmic_number_of_times() {
        let head = format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 0\r\n\r\n",
            "a".repeat(60_000)
        );
        let (got, parses) = trickle(&head);
        let h = got.expect("the complete head parses the moment its blank line arrives");
        assert_eq!(h.status, StatusCode::OK);
        // 1, 2, 4, … 32,768, 60,0xx bytes, then the blank line: a handful, not 60,000.
        assert!(parses <= 20, "{parses} parses");
    }

    /// `head` fed a byte a read, parsed whenever [`HeadScan`] says so: the head parsed (the
    /// buffer then empty) and how many parses it took.
    fn trickle(head: &str) -> (Option<ResponseHead>, usize) {
        let mut scan = HeadScan::default();
        let mut buf = BytesMut::new();
        let (mut parses, mut got) = (0, None);
        for &byte in head.as_bytes() {
            buf.extend_from_slice(&[byte]);
            if scan.due(&buf) {
                parses += 1;
                if let Some(h) = parse_response(&mut buf, false).unwrap() {
                    got = Some(h);
                    scan.reset();
                }
            }
        }
        assert!(buf.is_empty(), "bytes left after the head");
        (got, parses)
    }

    /// Empty lines before the first line, trickled a byte a read, are parsed a logarithmic
    /// number of times too (each read's were parsed again from the start); the head after
    /// them still parses the moment its blank line arrives.
    #[test]
    fn head_scan_does_not_take_leading_empty_lines_for_an_end() {
        for lead in ["\n", "\r\n"] {
            let head = format!(
                "{}HTTP/1.1 204 No Content\r\nx-a: b\r\n\r\n",
                lead.repeat(20_000)
            );
            let (got, parses) = trickle(&head);
            let h = got.expect("the head after the empty lines parses");
            assert_eq!(h.status, StatusCode::NO_CONTENT);
            assert!(parses <= 20, "{lead:?}: {parses} parses");
        }
    }

    #[test]
    fn head_scan_finds_every_end_and_refuses_early() {
        // Bare-LF heads end too, and an end split across reads is found.
        for end in ["\r\n\r\n", "\n\n", "\r\n\n"] {
            let head = format!("HTTP/1.1 204 No Content\r\nx-a: {}{end}", "b".repeat(300));
            let mut scan = HeadScan::default();
            assert!(scan.due(&head.as_bytes()[..10]));
            let mut due_at_end = false;
            for len in 11..=head.len() {
                due_at_end = scan.due(&head.as_bytes()[..len]);
            }
            assert!(due_at_end, "{end:?}");
        }
        // Garbage is parsed (and refused) by the time it has doubled from its first read.
        let mut scan = HeadScan::default();
        assert!(scan.due(b"\x16\x03\x01"));
        assert!(!scan.due(b"\x16\x03\x01\x02"));
        assert!(scan.due(b"\x16\x03\x01\x02\x00\x01"));
        let mut refused = BytesMut::from(&b"\x16\x03\x01\x02\x00\x01"[..]);
        assert!(parse_response(&mut refused, false).is_err());
        // And at the limit, so a head that never ends is refused at MAX_HEAD.
        let mut scan = HeadScan::default();
        let big = vec![b'a'; MAX_HEAD];
        assert!(scan.due(&big[..MAX_HEAD / 2 + 1]));
        assert!(scan.due(&big));
    }

    #[test]
    fn request_heads() {
        let fwd = headers::Forwarded {
            client: "192.0.2.7".parse().unwrap(),
            https: false,
            host: "a.example",
            upgrade: None,
            prefix: None,
        };
        const OURS: &str = "host: a.example\r\nx-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: http\r\nx-forwarded-host: a.example\r\n";
        let head = |m: Method, h: &HeaderMap, f: ReqFraming| {
            let mut out = Vec::new();
            encode_request_head(&m, "/p?q=1", h, &fwd, f, &mut out);
            String::from_utf8(out).unwrap()
        };
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("b.example"));
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        assert_eq!(
            head(Method::GET, &h, ReqFraming::Empty),
            format!("GET /p?q=1 HTTP/1.1\r\nx-a: 1\r\nx-a: 2\r\n{OURS}\r\n")
        );
        let none = HeaderMap::new();
        assert_eq!(
            head(Method::POST, &none, ReqFraming::Empty),
            format!("POST /p?q=1 HTTP/1.1\r\n{OURS}content-length: 0\r\n\r\n")
        );
        assert_eq!(
            head(Method::PUT, &none, ReqFraming::Chunked),
            format!("PUT /p?q=1 HTTP/1.1\r\n{OURS}transfer-encoding: chunked\r\n\r\n")
        );
        let mut with = HeaderMap::new();
        with.insert(header::CONTENT_LENGTH, HeaderValue::from_static("1234567"));
        assert_eq!(
            head(Method::PUT, &with, ReqFraming::Length(1234567)),
            format!("PUT /p?q=1 HTTP/1.1\r\n{OURS}content-length: 1234567\r\n\r\n")
        );
    }

    #[test]
    fn framing_of_requests() {
        assert_eq!(request_framing(true, Some(0)), ReqFraming::Empty);
        assert_eq!(request_framing(true, None), ReqFraming::Empty);
        assert_eq!(request_framing(false, Some(9)), ReqFraming::Length(9));
        assert_eq!(request_framing(false, Some(0)), ReqFraming::Length(0));
        assert_eq!(request_framing(false, None), ReqFraming::Chunked);
    }

    /// What a service's answer head becomes: one canonical Content-Length (none on a 204),
    /// no reuse after a length beside a transfer coding, a 426's Upgrade kept, and the
    /// service's keep-alive timeout read.
    #[test]
    fn response_heads_are_made_safe_to_pass_on() {
        let h = |s: &str| head(s).unwrap().unwrap().0;
        let cl = |r: &ResponseHead| {
            r.headers
                .get_all(header::CONTENT_LENGTH)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        let r = h("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(cl(&r), ["5"]);
        assert_eq!(r.framing, BodyFraming::Length(5));
        let r = h("HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n");
        assert!(cl(&r).is_empty());
        let r = h("HTTP/1.1 304 Not Modified\r\nContent-Length: 7, 7\r\n\r\n");
        assert_eq!(cl(&r), ["7"]);
        // Bodiless, so not refused: a length that conflicts is dropped instead.
        let r = h("HTTP/1.1 304 Not Modified\r\nContent-Length: 5, 6\r\n\r\n");
        assert!(cl(&r).is_empty());
        let r = h("HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nContent-Length: 1\r\n\r\n");
        assert!(cl(&r).is_empty());
        let r = h("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(cl(&r).is_empty());
        assert_eq!(r.framing, BodyFraming::Chunked);
        assert!(!r.keep_alive, "a length beside chunked: not reused");
        let r = h("HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(r.headers.get(header::UPGRADE).unwrap(), "websocket");
        let r = h("HTTP/1.1 200 OK\r\nUpgrade: h2c\r\nContent-Length: 0\r\n\r\n");
        assert!(r.headers.get(header::UPGRADE).is_none());
        let ka = |v: &str| {
            h(&format!(
                "HTTP/1.1 200 OK\r\nKeep-Alive: {v}\r\nContent-Length: 0\r\n\r\n"
            ))
            .keep_alive_timeout
        };
        assert_eq!(ka("timeout=5"), Some(Duration::from_secs(5)));
        assert_eq!(ka("max=100, timeout = 15"), Some(Duration::from_secs(15)));
        let two = h("HTTP/1.1 200 OK\r\nKeep-Alive: timeout=15\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(two.keep_alive_timeout, Some(Duration::from_secs(5)));
        assert_eq!(ka("timeout=soon"), None);
        assert_eq!(ka("max=5"), None);
        assert_eq!(ka("timeout=99999999999"), None);
    }

    #[test]
    fn response_heads_and_their_framing() {
        let (h, n) = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!(n, 46);
        assert_eq!(h.status, StatusCode::OK);
        assert_eq!(h.framing, BodyFraming::Length(5));
        assert!(h.keep_alive);
        assert_eq!(h.headers["x-a"], "b");
        let (h, _) = head("HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\nProxy-Authenticate: Basic\r\nTrailer: X-T\r\nUpgrade: h2c\r\nX-End: 2\r\nContent-Length: 1\r\n\r\n")
            .unwrap()
            .unwrap();
        let names: Vec<&str> = h.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(
            names,
            ["x-end", "content-length"],
            "hop-by-hop headers left out"
        );
        assert!(h.keep_alive);
        let (h, _) = head("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade, X-Hop\r\nX-Hop: 1\r\nUpgrade: websocket\r\nUpgrade: other\r\nSec-WebSocket-Accept: k\r\n\r\n")
            .unwrap()
            .unwrap();
        let all: Vec<(&str, &str)> = h
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            all,
            [
                ("upgrade", "websocket"),
                ("sec-websocket-accept", "k"),
                ("connection", "upgrade")
            ],
            "an upgrade keeps exactly its handshake"
        );

        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Le"[..]);
        assert!(parse_response(&mut partial, false).unwrap().is_none());
        assert_eq!(
            partial.len(),
            27,
            "an incomplete head is left in the buffer"
        );
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
        let (h, _) = head(chunked).unwrap().unwrap();
        assert_eq!(h.framing, BodyFraming::Chunked);
        assert!(
            !h.headers.contains_key(header::CONTENT_LENGTH),
            "length dropped"
        );
        // Codings the client would get no word of once the hop-by-hop header is dropped.
        for coded in [
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(
                matches!(head(coded), Err(H1Error::Head(_))),
                "{coded:?} accepted"
            );
        }
        let (h, _) = head("HTTP/1.1 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.framing, BodyFraming::UntilClose);
        let (h, _) = head("HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, BodyFraming::Empty);
        assert!(h.keep_alive);
        let mut b = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n"[..]);
        let h = parse_response(&mut b, true).unwrap().unwrap();
        assert_eq!(h.framing, BodyFraming::Empty, "answer to HEAD");
        let (h, _) = head("HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let (h, _) = head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let (h, _) = head("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        // A `close` beside the `keep-alive` wins (it pooled a connection the service closed).
        for both in ["close, keep-alive", "keep-alive, close"] {
            let a = format!("HTTP/1.0 200 OK\r\nConnection: {both}\r\nContent-Length: 1\r\n\r\n");
            assert!(!head(&a).unwrap().unwrap().0.keep_alive, "{both}");
        }
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n")
                .unwrap()
                .unwrap()
                .0
                .framing,
            BodyFraming::Length(5)
        );
    }

    #[test]
    fn bad_response_heads() {
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
        ] {
            assert_eq!(head(bad).unwrap_err(), H1Error::BadLength, "{bad:?}");
        }
        assert!(matches!(
            head("SSH-2.0-OpenSSH\r\n\r\n"),
            Err(H1Error::Head(_))
        ));
        assert!(matches!(
            head("HTTP/1.1 2000 OK\r\n\r\n"),
            Err(H1Error::Head(_))
        ));
        let big = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(MAX_HEAD));
        assert_eq!(head(&big).unwrap_err(), H1Error::HeadTooLarge);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert!(matches!(
            head(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")),
            Err(H1Error::Head(_))
        ));
    }

    /// Decodes `body` fed in pieces of `step` bytes (carrying unconsumed bytes over, as the
    /// connection's buffer does); the data, and the bytes after the body.
    fn dechunk(body: &[u8], step: usize) -> Result<(Vec<u8>, Vec<u8>), H1Error> {
        let mut d = ChunkedDecoder::new();
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            if !d.is_done() && fed < body.len() {
                let end = (fed + step).min(body.len());
                buf.extend_from_slice(&body[fed..end]);
                fed = end;
            }
            let r = d.decode(&buf)?;
            if let Some(data) = r.data.clone() {
                out.extend_from_slice(&buf[data]);
            }
            buf.drain(..r.consumed);
            if d.is_done() {
                buf.extend_from_slice(&body[fed..]);
                return Ok((out, buf));
            }
            if fed == body.len() && r.consumed == 0 {
                return Err(H1Error::Chunk("input ended"));
            }
        }
    }

    #[test]
    fn chunked_bodies() {
        let body =
            b"5\r\nhello\r\n1A;ext=1 \r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, 100] {
            let (data, rest) = dechunk(body, step).unwrap();
            assert_eq!(data, b"helloabcdefghijklmnopqrstuvwxyz", "step {step}");
            assert_eq!(rest, b"NEXT", "step {step}");
        }
        assert_eq!(dechunk(b"0\r\n\r\n", 1).unwrap().0, b"");
        assert_eq!(dechunk(b"3 \t\r\nabc\r\n0\r\n\r\n", 4).unwrap().0, b"abc");
        for bad in [
            &b"x\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"1000000000000000\r\n",
            b"0\r\nX: 1\n\r\n",
            b"3 4\r\nabc\r\n",
        ] {
            assert!(matches!(dechunk(bad, 1), Err(H1Error::Chunk(_))), "{bad:?}");
        }
        let long_ext = format!("1;{}\r\na\r\n0\r\n\r\n", "e".repeat(MAX_CHUNK_EXT + 1));
        assert!(dechunk(long_ext.as_bytes(), 1000).is_err());
        let long_trailer = format!("0\r\nX: {}\r\n\r\n", "t".repeat(MAX_TRAILERS));
        assert!(dechunk(long_trailer.as_bytes(), 1000).is_err());
        assert_eq!(
            dechunk(b"fffffffffffffff\r\nab", 100),
            Err(H1Error::Chunk("input ended"))
        );
        // Leading zeros are a size like any other (they read as "too large" before).
        assert_eq!(
            dechunk(b"00000000000000000000003\r\nabc\r\n0\r\n\r\n", 1)
                .unwrap()
                .0,
            b"abc"
        );
        let zeros = format!("{}3\r\nabc\r\n0\r\n\r\n", "0".repeat(64));
        assert!(
            dechunk(zeros.as_bytes(), 1000).is_err(),
            "a line without end"
        );
    }
}
