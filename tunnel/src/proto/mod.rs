//! Sans-IO wire protocol of the tunnel: stream headers, control messages, UDP flow datagrams,
//! and the control session state machine. No sockets, no clocks, no async: the QUIC layer
//! feeds bytes in and writes bytes out (see DESIGN.md, "Tunnel").
//!
//! # Layout
//!
//! - [`limits`]: every length bound, with why.
//! - [`varint`]: QUIC variable-length integers.
//! - [`header`]: stream header and stream reply.
//! - [`control`]: control messages and their framing.
//! - [`datagram`]: UDP flow datagrams.
//! - [`FrameDecoder`] (`codec::decoder`): incremental control stream decoder.
//! - [`session`]: the control session state machine.
//! - [`error`]: `ProtoError` (bad bytes) and `SessionError` (bad sequence).
//!
//! # Decoding contract
//!
//! Every `decode_*` function of stream data takes the bytes received so far and returns
//! `Ok(None)` when it needs more, `Ok(Some((value, consumed)))`, or a [`ProtoError`]. A
//! declared length is compared with its bound before the decoder waits for the bytes, so no
//! decoder buffers or allocates more than the bound. Decoders never panic. Encodings are
//! canonical (minimal varints, 0/1 presence bytes, no trailing bytes), so decoding and
//! re-encoding reproduces the input exactly; the fuzz targets check that.
//!
//! # Byte layout (version 1)
//!
//! Integers are big-endian. `varint` is a QUIC varint (RFC 9000 §16, minimal form only).
//! `u8`/`u16`/`u32`/`u64` are fixed width.
//!
//! Field types:
//!
//! ```text
//! name      = varint len (1..=63) | len bytes [a-z0-9-], no leading/trailing '-'
//! text      = varint len (<= bound) | UTF-8 bytes, no control characters
//! bytes     = varint len (<= bound) | len bytes
//! addr      = 0x04 | 4-byte IPv4 | u16 port          (7 bytes)
//!           | 0x06 | 16-byte IPv6 | u16 port         (19 bytes; flow info and scope id dropped)
//! opt_addr  = 0x00 (absent) | addr
//! opt_bytes = 0x00 (absent) | 0x01 bytes
//! origin    = 0x01 addr                              Public(client address)
//!           | 0x02 name opt_addr                     Device { name, addr }
//! service   = name | u8 proto (0x01 Tcp, 0x02 Udp)
//! services  = varint count (<= 256) | count × service   (names unique)
//! ```
//!
//! **Stream header**, the first bytes on every bidirectional stream, written by the opener. An
//! `Open` opener may send payload right after the header without waiting for the reply (the
//! gateway's public TCP apps do: no tunnel round trip before the first byte); an acceptor that
//! refuses discards it:
//!
//! ```text
//! 0x5A 0x47 ("ZG") | u8 version = 0x01 | u16 body_len (1..=1024) | body
//! body = 0x01 name app | name service | origin              Open
//!      | 0x02 name app | name to_device | name service      Relay
//!      | 0x03                                               Control
//! ```
//!
//! **Stream reply**, written by the acceptor; raw bytes follow `Accepted`:
//!
//! ```text
//! 0x00                                  Accepted
//! 0x01 | u8 code | text reason (<= 256) Refused
//! code: 1 NoSuchService, 2 PolicyDenied, 3 DeviceOffline, 4 RateLimited, 5 Overloaded,
//!       6 BadRequest, 7 ServiceUnreachable, 8 Draining, other = Unknown(code)
//! ```
//!
//! **Control frames**, on the `Control` stream after its header (no reply is sent for it):
//!
//! ```text
//! frame = varint type | varint len (<= 80 KiB) | len bytes payload
//! 0x01 Hello          u16 proto_version | name device | services | u64 zone_serial
//!                     | opt_bytes zone_config (<= 60 KiB) | text agent_version (<= 64)
//! 0x02 Welcome        u64 session_id | addr observed_addr | u64 zone_serial
//!                     | opt_bytes zone_config | u32 keepalive_ms
//! 0x03 ConfigUpdate   u64 zone_serial | bytes zone_config (<= 60 KiB)
//! 0x04 ServicesUpdate services
//! 0x05 Drain          u32 grace_ms | text reason (<= 256)
//! 0x06 UdpFlowOpen    varint flow_id (<= u32::MAX) | name app | name service | origin
//! 0x07 UdpFlowClose   varint flow_id
//! 0x08 PeerAddr       name device | varint count (<= 8) | count × addr | u64 punch_nonce
//! 0x09 PunchRequest   name device
//! 0x0a Ping           u64 nonce
//! 0x0b Pong           u64 nonce
//! 0x0c Error          u16 code (1 ProtocolViolation, 2 VersionMismatch, 3 Internal)
//!                     | text message (<= 256)
//! 0x0d PermitRevoke   name device | name service (gateway to agent: drop that peer's
//!                     direct-path permit for the service and end its direct streams)
//! 0x0e PermitsHeld    varint count (<= 512) | count × (name device | name service)
//!                     (agent to gateway: the direct-path permits it holds, sent as a
//!                     session starts)
//! 0x0f LocalAddrs     varint count (<= 4) | count × addr (agent to gateway, as a session
//!                     starts: its socket's addresses behind its NAT, for a peer behind the
//!                     same public address)
//! 0x10 UdpFlowIdle    u32 idle_ms (gateway to agent, after Welcome: how long the gateway
//!                     keeps a UDP flow quiet both ways)
//! other               skipped whole, decoded as Unknown { ty }
//! ```
//!
//! A known type whose payload has bytes left over after its fields is an error: extensions
//! come as new message types (which old peers skip) or a new version, never as appended
//! fields.
//!
//! **Datagram** (one QUIC datagram per UDP datagram of a flow):
//!
//! ```text
//! varint flow_id (<= u32::MAX) | payload (rest of the datagram, <= 65527 bytes, may be empty)
//! ```

mod codec;
pub mod control;
pub mod datagram;
pub mod error;
pub mod header;
pub mod limits;
pub mod name;
pub mod session;
pub mod varint;

pub use codec::decoder::FrameDecoder;
pub use control::{
    decode_control, encode_control, ControlMsg, ErrorCode, Hello, PeerAddr, ServiceInfo,
    ServiceProto, UdpFlowOpen, Welcome, CONTROL_VERSION,
};
pub use datagram::{datagram_overhead, decode_datagram, decode_datagram_bytes, encode_datagram};
pub use error::{ProtoError, SessionError};
pub use header::{
    decode_stream_header, decode_stream_reply, encode_stream_header, encode_stream_reply, Origin,
    RefuseCode, StreamHeader, StreamReply, STREAM_MAGIC, STREAM_VERSION,
};
pub use name::{unfit_for_logs, validate_name, wire_text};
pub use session::{ControlSession, Event, Role};
