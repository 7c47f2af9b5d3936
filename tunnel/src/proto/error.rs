//! Typed errors of the wire protocol: malformed bytes (`ProtoError`) and protocol misuse on the
//! control stream (`SessionError`).
//!
//! A `ProtoError` from a decoder means the peer sent something invalid (or an attacker did):
//! refuse the stream (`RefuseCode::BadRequest`) or close the connection, and count it. A
//! `ProtoError` from an encoder is a local bug or bad local config (an invalid service name).

use thiserror::Error;

/// Invalid bytes, or a value that cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtoError {
    #[error("bad stream magic {0:#04x} (not a zonegate stream)")]
    BadMagic(u8),
    #[error("unsupported stream header version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown stream kind {0:#04x}")]
    UnknownStreamKind(u8),
    #[error("stream header length {len} outside 1..={max}")]
    HeaderLength { len: usize, max: usize },
    #[error("control frame type {ty} of {len} bytes exceeds {max}")]
    FrameTooLarge { ty: u64, len: u64, max: usize },
    #[error("{field} is {len} bytes, at most {max} allowed")]
    FieldTooLong {
        field: &'static str,
        len: u64,
        max: usize,
    },
    #[error("{field} has {count} entries, at most {max} allowed")]
    TooMany {
        field: &'static str,
        count: u64,
        max: usize,
    },
    #[error("invalid {field} name: {why}")]
    InvalidName {
        field: &'static str,
        why: &'static str,
    },
    #[error("duplicate service name in list")]
    DuplicateService,
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    #[error("{field} contains a control character, or one that reorders or splits text")]
    ControlChar { field: &'static str },
    #[error("invalid {field} tag {tag:#04x}")]
    InvalidTag { field: &'static str, tag: u8 },
    #[error("non-minimal varint encoding")]
    VarintNonMinimal,
    #[error("varint value {value} too large for {field}")]
    VarintTooLarge { field: &'static str, value: u64 },
    #[error("{what} ends before its fields do")]
    Truncated { what: &'static str },
    #[error("{what} has {extra} unexpected trailing bytes")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("cannot encode a control message of unknown type {0}")]
    EncodeUnknown(u64),
    #[error("empty datagram")]
    EmptyDatagram,
    #[error("frame decoder holds {buffered} bytes; drain it with next_msg after each push")]
    DecoderFull { buffered: usize },
    #[error("frame decoder already failed; close the control stream")]
    DecoderFailed,
    /// A Hello of another control protocol version: the rest of it (which that version may
    /// lay out otherwise) is not read.
    #[error("hello of control protocol version {0}")]
    HelloVersion(u16),
}

/// The peer (or our own I/O layer) broke the control session rules.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SessionError {
    #[error("unexpected {msg} while {state}")]
    Unexpected {
        msg: &'static str,
        state: &'static str,
    },
    #[error("peer speaks control protocol version {0}, we speak {1}")]
    VersionMismatch(u16, u16),
    #[error("UDP flow {0} is already open")]
    DuplicateFlow(u32),
    #[error("too many UDP flows open (at most {0})")]
    TooManyFlows(usize),
    #[error("session is closed")]
    Closed,
    #[error(transparent)]
    Proto(#[from] ProtoError),
}
