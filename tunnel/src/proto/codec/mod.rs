//! Field-level reading and writing shared by headers, control frames and datagrams.
//!
//! `Reader` walks a byte slice and tells "needs more bytes" (`Need::More`) apart from "invalid"
//! (`Need::Bad`). Top-level decoders of unframed data (the stream reply) turn `More` into
//! `Ok(None)`; decoders of length-delimited bodies turn it into `Truncated`, because there the
//! whole body is already present and a short field is the peer's error.
//!
//! Writers validate before they write and never allocate beyond the value itself.

pub mod decoder;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use bytes::BufMut;

use super::limits::MAX_NAME_LEN;
use super::name::{validate_name, validate_name_bytes, validate_text};
use super::{varint, ProtoError};

/// Outcome of a field read that did not produce a value.
#[derive(Debug)]
pub(crate) enum Need {
    More,
    Bad(ProtoError),
}

impl From<ProtoError> for Need {
    fn from(e: ProtoError) -> Self {
        Need::Bad(e)
    }
}

pub(crate) type Read<T> = Result<T, Need>;

/// Address family tags, also used for `Option<SocketAddr>` presence (0 = absent).
const ADDR_V4: u8 = 4;
const ADDR_V6: u8 = 6;

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Takes the rest of the buffer (datagram payloads).
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let rest = &self.buf[self.pos..];
        self.pos = self.buf.len();
        rest
    }

    pub(crate) fn take(&mut self, n: usize) -> Read<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or(Need::More)?;
        let bytes = self.buf.get(self.pos..end).ok_or(Need::More)?;
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Read<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Read<u8> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Read<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Read<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Read<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub(crate) fn varint(&mut self) -> Read<u64> {
        match varint::decode(&self.buf[self.pos..])? {
            Some((value, used)) => {
                self.pos += used;
                Ok(value)
            }
            None => Err(Need::More),
        }
    }

    /// A varint that must fit a `u32` (flow ids).
    pub(crate) fn varint_u32(&mut self, field: &'static str) -> Read<u32> {
        let value = self.varint()?;
        u32::try_from(value).map_err(|_| Need::Bad(ProtoError::VarintTooLarge { field, value }))
    }

    /// A length or count, rejected against `max` as soon as it is read, before any wait for
    /// the bytes it announces.
    pub(crate) fn len(&mut self, field: &'static str, max: usize) -> Read<usize> {
        let len = self.varint()?;
        if len > max as u64 {
            return Err(Need::Bad(ProtoError::FieldTooLong { field, len, max }));
        }
        Ok(len as usize)
    }

    /// An element count for a list, bounded like [`Reader::len`].
    pub(crate) fn count(&mut self, field: &'static str, max: usize) -> Read<usize> {
        let count = self.varint()?;
        if count > max as u64 {
            return Err(Need::Bad(ProtoError::TooMany { field, count, max }));
        }
        Ok(count as usize)
    }

    pub(crate) fn bytes(&mut self, field: &'static str, max: usize) -> Read<&'a [u8]> {
        let len = self.len(field, max)?;
        self.take(len)
    }

    pub(crate) fn name(&mut self, field: &'static str) -> Read<String> {
        let raw = self.bytes(field, MAX_NAME_LEN)?;
        validate_name_bytes(field, raw)?;
        // Validated names are ASCII, so this conversion cannot fail; map it anyway rather
        // than unwrap on peer input.
        Ok(std::str::from_utf8(raw)
            .map_err(|_| ProtoError::InvalidUtf8 { field })?
            .to_owned())
    }

    pub(crate) fn text(&mut self, field: &'static str, max: usize) -> Read<String> {
        let raw = self.bytes(field, max)?;
        let text = std::str::from_utf8(raw).map_err(|_| ProtoError::InvalidUtf8 { field })?;
        validate_text(field, text, max)?;
        Ok(text.to_owned())
    }

    /// Presence byte of an `Option`: 0 absent, 1 present, anything else invalid so that each
    /// value has one encoding.
    pub(crate) fn present(&mut self, field: &'static str) -> Read<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(Need::Bad(ProtoError::InvalidTag { field, tag })),
        }
    }

    pub(crate) fn addr(&mut self, field: &'static str) -> Read<SocketAddr> {
        match self.u8()? {
            ADDR_V4 => {
                let ip = Ipv4Addr::from(self.array::<4>()?);
                Ok(SocketAddr::V4(SocketAddrV4::new(ip, self.u16()?)))
            }
            ADDR_V6 => {
                let ip = Ipv6Addr::from(self.array::<16>()?);
                Ok(SocketAddr::V6(SocketAddrV6::new(ip, self.u16()?, 0, 0)))
            }
            tag => Err(Need::Bad(ProtoError::InvalidTag { field, tag })),
        }
    }

    pub(crate) fn opt_addr(&mut self, field: &'static str) -> Read<Option<SocketAddr>> {
        // One tag byte: 0 = absent, else the address family.
        match self.buf.get(self.pos) {
            None => Err(Need::More),
            Some(0) => {
                self.pos += 1;
                Ok(None)
            }
            Some(_) => Ok(Some(self.addr(field)?)),
        }
    }

    /// Fails with `TrailingBytes` unless every byte was used.
    pub(crate) fn finish(&self, what: &'static str) -> Result<(), ProtoError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(ProtoError::TrailingBytes { what, extra }),
        }
    }
}

/// Parses a complete, length-delimited body: a short field there is the peer's error.
pub(crate) fn parse_body<T>(
    body: &[u8],
    what: &'static str,
    parse: impl FnOnce(&mut Reader<'_>) -> Read<T>,
) -> Result<T, ProtoError> {
    let mut r = Reader::new(body);
    let value = parse(&mut r).map_err(|need| match need {
        Need::More => ProtoError::Truncated { what },
        Need::Bad(e) => e,
    })?;
    r.finish(what)?;
    Ok(value)
}

// ---- writers -------------------------------------------------------------------------------

pub(crate) fn put_varint<B: BufMut>(out: &mut B, value: u64) -> Result<(), ProtoError> {
    varint::encode(value, out)
}

pub(crate) fn put_bytes<B: BufMut>(
    out: &mut B,
    field: &'static str,
    bytes: &[u8],
    max: usize,
) -> Result<(), ProtoError> {
    if bytes.len() > max {
        return Err(ProtoError::FieldTooLong {
            field,
            len: bytes.len() as u64,
            max,
        });
    }
    put_varint(out, bytes.len() as u64)?;
    out.put_slice(bytes);
    Ok(())
}

pub(crate) fn put_name<B: BufMut>(
    out: &mut B,
    field: &'static str,
    name: &str,
) -> Result<(), ProtoError> {
    validate_name(field, name)?;
    put_bytes(out, field, name.as_bytes(), MAX_NAME_LEN)
}

pub(crate) fn put_text<B: BufMut>(
    out: &mut B,
    field: &'static str,
    text: &str,
    max: usize,
) -> Result<(), ProtoError> {
    validate_text(field, text, max)?;
    put_bytes(out, field, text.as_bytes(), max)
}

pub(crate) fn put_count<B: BufMut>(
    out: &mut B,
    field: &'static str,
    count: usize,
    max: usize,
) -> Result<(), ProtoError> {
    if count > max {
        return Err(ProtoError::TooMany {
            field,
            count: count as u64,
            max,
        });
    }
    put_varint(out, count as u64)
}

/// Writes a socket address. IPv6 flow info and scope id are not carried: they mean nothing
/// on the peer's host.
pub(crate) fn put_addr<B: BufMut>(out: &mut B, addr: &SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            out.put_u8(ADDR_V4);
            out.put_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            out.put_u8(ADDR_V6);
            out.put_slice(&a.ip().octets());
        }
    }
    out.put_u16(addr.port());
}

pub(crate) fn put_opt_addr<B: BufMut>(out: &mut B, addr: &Option<SocketAddr>) {
    match addr {
        None => out.put_u8(0),
        Some(a) => put_addr(out, a),
    }
}
