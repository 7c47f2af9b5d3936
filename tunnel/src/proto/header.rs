//! Stream header (first bytes of every bidirectional stream) and the acceptor's reply.

use std::fmt;
use std::net::SocketAddr;

use bytes::BufMut;

use super::codec::{self, parse_body, put_addr, put_name, put_opt_addr, put_text, Need, Reader};
use super::limits::{MAX_HEADER_LEN, MAX_REASON_LEN};
use super::ProtoError;

/// First two bytes of every stream: `ZG`. Catches a peer that speaks something else (or a
/// stream opened by a bug) at the first byte instead of as a garbled name later.
pub const STREAM_MAGIC: [u8; 2] = *b"ZG";
/// Stream header version. Bumped on any incompatible change of the header or control format.
pub const STREAM_VERSION: u8 = 1;
/// Magic + version + u16 body length.
pub const HEADER_PREFIX_LEN: usize = 5;

const KIND_OPEN: u8 = 0x01;
const KIND_RELAY: u8 = 0x02;
const KIND_CONTROL: u8 = 0x03;

const ORIGIN_PUBLIC: u8 = 0x01;
const ORIGIN_DEVICE: u8 = 0x02;

const REPLY_ACCEPTED: u8 = 0x00;
const REPLY_REFUSED: u8 = 0x01;

/// Who asked for a stream or UDP flow: used by policy and written in logs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Origin {
    /// An internet client, by the address the gateway saw.
    Public(SocketAddr),
    /// A zone device (verified by its certificate on the connection it came from), and its
    /// address when known.
    Device {
        name: String,
        addr: Option<SocketAddr>,
    },
}

/// What a stream is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StreamHeader {
    /// Connect this stream to `service` on the device at the other end of the connection.
    Open {
        app: String,
        service: String,
        origin: Origin,
    },
    /// Agent→gateway: relay this stream to `service` on `to_device` (mesh through the gateway).
    Relay {
        app: String,
        to_device: String,
        service: String,
    },
    /// The connection's one control stream, opened by the agent.
    Control,
}

/// Why an acceptor refused a stream. Unassigned codes decode as `Unknown` so that newer
/// peers can add codes; encoding `Unknown(n)` with an assigned `n` yields that known code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefuseCode {
    NoSuchService,
    PolicyDenied,
    DeviceOffline,
    RateLimited,
    Overloaded,
    BadRequest,
    ServiceUnreachable,
    Draining,
    Unknown(u8),
}

impl RefuseCode {
    pub fn to_u8(self) -> u8 {
        match self {
            RefuseCode::NoSuchService => 1,
            RefuseCode::PolicyDenied => 2,
            RefuseCode::DeviceOffline => 3,
            RefuseCode::RateLimited => 4,
            RefuseCode::Overloaded => 5,
            RefuseCode::BadRequest => 6,
            RefuseCode::ServiceUnreachable => 7,
            RefuseCode::Draining => 8,
            RefuseCode::Unknown(n) => n,
        }
    }

    pub fn from_u8(code: u8) -> Self {
        match code {
            1 => RefuseCode::NoSuchService,
            2 => RefuseCode::PolicyDenied,
            3 => RefuseCode::DeviceOffline,
            4 => RefuseCode::RateLimited,
            5 => RefuseCode::Overloaded,
            6 => RefuseCode::BadRequest,
            7 => RefuseCode::ServiceUnreachable,
            8 => RefuseCode::Draining,
            n => RefuseCode::Unknown(n),
        }
    }
}

impl fmt::Display for RefuseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefuseCode::NoSuchService => f.write_str("no such service"),
            RefuseCode::PolicyDenied => f.write_str("denied by policy"),
            RefuseCode::DeviceOffline => f.write_str("device offline"),
            RefuseCode::RateLimited => f.write_str("rate limited"),
            RefuseCode::Overloaded => f.write_str("overloaded"),
            RefuseCode::BadRequest => f.write_str("bad request"),
            RefuseCode::ServiceUnreachable => f.write_str("service unreachable"),
            RefuseCode::Draining => f.write_str("draining"),
            RefuseCode::Unknown(n) => write!(f, "unknown refusal {n}"),
        }
    }
}

/// The acceptor's answer, after which raw bytes flow (only after `Accepted`; after `Refused`
/// the acceptor finishes the stream).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StreamReply {
    Accepted,
    Refused { code: RefuseCode, reason: String },
}

pub(crate) fn read_origin(r: &mut Reader<'_>) -> codec::Read<Origin> {
    match r.u8()? {
        ORIGIN_PUBLIC => Ok(Origin::Public(r.addr("origin address")?)),
        ORIGIN_DEVICE => Ok(Origin::Device {
            name: r.name("origin device")?,
            addr: r.opt_addr("origin address")?,
        }),
        tag => Err(Need::Bad(ProtoError::InvalidTag {
            field: "origin",
            tag,
        })),
    }
}

pub(crate) fn put_origin<B: BufMut>(out: &mut B, origin: &Origin) -> Result<(), ProtoError> {
    match origin {
        Origin::Public(addr) => {
            out.put_u8(ORIGIN_PUBLIC);
            put_addr(out, addr);
        }
        Origin::Device { name, addr } => {
            out.put_u8(ORIGIN_DEVICE);
            put_name(out, "origin device", name)?;
            put_opt_addr(out, addr);
        }
    }
    Ok(())
}

/// Appends the encoding of `header`; on error nothing is written.
pub fn encode_stream_header<B: BufMut>(
    header: &StreamHeader,
    out: &mut B,
) -> Result<(), ProtoError> {
    let mut body = Vec::with_capacity(64);
    match header {
        StreamHeader::Open {
            app,
            service,
            origin,
        } => {
            body.put_u8(KIND_OPEN);
            put_name(&mut body, "app", app)?;
            put_name(&mut body, "service", service)?;
            put_origin(&mut body, origin)?;
        }
        StreamHeader::Relay {
            app,
            to_device,
            service,
        } => {
            body.put_u8(KIND_RELAY);
            put_name(&mut body, "app", app)?;
            put_name(&mut body, "to_device", to_device)?;
            put_name(&mut body, "service", service)?;
        }
        StreamHeader::Control => body.put_u8(KIND_CONTROL),
    }
    // Cannot trigger with valid names (the largest header is < 250 bytes); kept so that a
    // future field cannot silently produce a header the peer refuses.
    if body.len() > MAX_HEADER_LEN {
        return Err(ProtoError::HeaderLength {
            len: body.len(),
            max: MAX_HEADER_LEN,
        });
    }
    out.put_slice(&STREAM_MAGIC);
    out.put_u8(STREAM_VERSION);
    out.put_u16(body.len() as u16);
    out.put_slice(&body);
    Ok(())
}

/// Decodes a stream header from the start of `buf`.
///
/// Magic and version are checked on the bytes present, so a foreign protocol fails at its
/// first byte; the body length is checked before waiting for the body.
pub fn decode_stream_header(buf: &[u8]) -> Result<Option<(StreamHeader, usize)>, ProtoError> {
    for (i, &expected) in STREAM_MAGIC.iter().enumerate() {
        match buf.get(i) {
            None => return Ok(None),
            Some(&b) if b != expected => return Err(ProtoError::BadMagic(b)),
            Some(_) => {}
        }
    }
    match buf.get(2) {
        None => return Ok(None),
        Some(&v) if v != STREAM_VERSION => return Err(ProtoError::UnsupportedVersion(v)),
        Some(_) => {}
    }
    let Some(len_bytes) = buf.get(3..HEADER_PREFIX_LEN) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([len_bytes[0], len_bytes[1]]));
    if len == 0 || len > MAX_HEADER_LEN {
        return Err(ProtoError::HeaderLength {
            len,
            max: MAX_HEADER_LEN,
        });
    }
    let total = HEADER_PREFIX_LEN + len;
    let Some(body) = buf.get(HEADER_PREFIX_LEN..total) else {
        return Ok(None);
    };
    let header = parse_body(body, "stream header", |r| match r.u8()? {
        KIND_OPEN => Ok(StreamHeader::Open {
            app: r.name("app")?,
            service: r.name("service")?,
            origin: read_origin(r)?,
        }),
        KIND_RELAY => Ok(StreamHeader::Relay {
            app: r.name("app")?,
            to_device: r.name("to_device")?,
            service: r.name("service")?,
        }),
        KIND_CONTROL => Ok(StreamHeader::Control),
        kind => Err(Need::Bad(ProtoError::UnknownStreamKind(kind))),
    })?;
    Ok(Some((header, total)))
}

/// Appends the encoding of `reply`; on error nothing is written.
pub fn encode_stream_reply<B: BufMut>(reply: &StreamReply, out: &mut B) -> Result<(), ProtoError> {
    match reply {
        StreamReply::Accepted => out.put_u8(REPLY_ACCEPTED),
        StreamReply::Refused { code, reason } => {
            let mut body = Vec::with_capacity(3 + reason.len());
            body.put_u8(REPLY_REFUSED);
            body.put_u8(code.to_u8());
            put_text(&mut body, "refusal reason", reason, MAX_REASON_LEN)?;
            out.put_slice(&body);
        }
    }
    Ok(())
}

/// Decodes a stream reply from the start of `buf`. The reply has no length prefix (it is at
/// most 261 bytes), so any short field means "wait for more".
pub fn decode_stream_reply(buf: &[u8]) -> Result<Option<(StreamReply, usize)>, ProtoError> {
    let mut r = Reader::new(buf);
    let parsed = (|| match r.u8()? {
        REPLY_ACCEPTED => Ok(StreamReply::Accepted),
        REPLY_REFUSED => Ok(StreamReply::Refused {
            code: RefuseCode::from_u8(r.u8()?),
            reason: r.text("refusal reason", MAX_REASON_LEN)?,
        }),
        tag => Err(Need::Bad(ProtoError::InvalidTag {
            field: "stream reply",
            tag,
        })),
    })();
    match parsed {
        Ok(reply) => Ok(Some((reply, r.pos()))),
        Err(Need::More) => Ok(None),
        Err(Need::Bad(e)) => Err(e),
    }
}
