//! Typed errors of the tunnel crate.

use crate::proto::{ProtoError, RefuseCode};

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("{0}")]
    Config(String),
    /// The UDP socket under a QUIC endpoint could not be bound (the caller names the setting).
    #[error("cannot {what} UDP {addr}: {error}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        error: std::io::Error,
    },
    /// The bundle and config agree that this device cannot run as set up: a certificate of
    /// another device than the config names, a zone config that revokes it or is another
    /// domain's. A restart cannot help (the CLI exits 2, which its service unit does not
    /// restart), unlike a file not readable yet or half copied.
    #[error("{0}")]
    Unrunnable(String),
    #[error(transparent)]
    Zone(#[from] zone_core::ZoneError),
    #[error("TLS set-up: {0}")]
    Tls(#[from] rustls::Error),
    #[error("protocol: {0}")]
    Proto(#[from] ProtoError),
    #[error("QUIC connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("QUIC connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer closed the stream before its header/reply was complete")]
    Truncated,
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// Datagrams cannot be split: the service (or client) must send smaller ones.
    #[error("a datagram of {len} bytes is larger than the tunnel carries on this path ({max} bytes): dropped")]
    DatagramTooLarge { len: usize, max: usize },
    #[error("datagram: {0}")]
    Datagram(String),
    /// More datagrams waiting for the tunnel than [`crate::transport::DATAGRAM_QUEUE`]: the
    /// link is slower than the flows sending over it.
    #[error("the tunnel's datagram queue is full (its link carries less than the UDP flows send): dropped")]
    DatagramQueueFull,
}

/// Why a stream could not be opened to a device's service. Carries the refusal code so the
/// HTTP front can map it to a status (502 offline, 403 denied, 429 rate, 504 timeout).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("device {0} is not connected")]
    Offline(String),
    /// Not connected, and no device the zone config lists (a misspelt `to`, a device not
    /// added yet, or revoked): told apart from one that is offline, which sent its owner
    /// looking for an agent that does not exist.
    #[error("device {0} is not in the zone config (zone.json lists no such device)")]
    NotInZone(String),
    /// Revoked in the zone config: for good (a name revoked cannot be added again).
    #[error("device {0} is revoked in the zone config")]
    Revoked(String),
    #[error("refused by {device}: {code}: {reason}")]
    Refused {
        device: String,
        code: RefuseCode,
        reason: String,
    },
    #[error("device {0} did not answer in time")]
    Timeout(String),
    #[error("tunnel to {device}: {source}")]
    Tunnel {
        device: String,
        #[source]
        source: TunnelError,
    },
}
