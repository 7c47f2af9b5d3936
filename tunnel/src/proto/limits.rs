//! Every length the wire format allows, each with the reason for its value.
//!
//! Decoders compare a declared length with these bounds *before* they wait for or copy the
//! bytes, so a peer cannot make us buffer more than the bound by announcing a large length.

/// Longest device, service or app name: one DNS label (RFC 1035 §2.3.4), so that
/// `NAME.DOMAIN` stays a valid host name. Same rule as `zone_core::names`.
pub const MAX_NAME_LEN: usize = 63;

/// Longest stream header body (after the 5-byte prefix). The largest valid header, an `Open`
/// with three 63-byte names and an IPv6 origin, is under 250 bytes; 1 KiB leaves room for
/// later versions while keeping per-stream memory trivial.
pub const MAX_HEADER_LEN: usize = 1024;

/// Largest control frame payload. Sized so that the worst-case `Hello` (256 services plus a
/// 60 KiB zone config) fits, see [`WORST_CASE_HELLO`]; a frame is buffered whole before it
/// is parsed, so this is also the per-connection decoder memory.
pub const MAX_CONTROL_FRAME: usize = 80 * 1024;

/// Largest signed zone config carried in `Hello`/`Welcome`/`ConfigUpdate`, and adopted from
/// a peer. Zone commands grow a config only up to `zone_core::config::MAX_SHARED_ZONE_JSON`
/// (40 KiB: what one DNS answer of TXT chunks holds), a revocation by name alone up to
/// `zone_core::config::MAX_REVOKING_ZONE_JSON` (56 KiB: carried here).
pub const MAX_ZONE_CONFIG: usize = 60 * 1024;
const _: () = assert!(zone_core::config::MAX_REVOKING_ZONE_JSON <= MAX_ZONE_CONFIG);

/// Most services one device may announce. A home node runs a handful; 256 is generous and
/// keeps a `Hello` well under [`MAX_CONTROL_FRAME`].
pub const MAX_SERVICES: usize = 256;

/// Most addresses in one `PeerAddr`: observed v4 + v6 plus a few LAN candidates. More would
/// only multiply the punching packets sent to a peer.
pub const MAX_PEER_ADDRS: usize = 8;

/// Most addresses one `LocalAddrs` lists. The gateway sends a peer these plus the observed
/// address in one `PeerAddr`, so they must leave room for it.
pub const MAX_LOCAL_ADDRS: usize = 4;
const _: () = assert!(MAX_LOCAL_ADDRS < MAX_PEER_ADDRS);

/// Longest human-readable text (`Refused` reason, `Drain` reason, `Error` message). These
/// end up in one log line; a sentence is enough.
pub const MAX_REASON_LEN: usize = 256;

/// Longest agent version string (e.g. `0.1.0 (abc1234 2026-01-01)`), logged and shown on
/// the status page.
pub const MAX_VERSION_LEN: usize = 64;

/// Largest UDP payload carried in one flow datagram: the largest UDP payload over IPv6
/// without jumbograms (65535 - 8). The QUIC path's datagram size is usually much smaller
/// and is checked by the I/O layer, which knows it.
pub const MAX_DATAGRAM_PAYLOAD: usize = 65_527;

/// Longest control frame prefix: type varint + length varint, 8 bytes each at most.
pub const MAX_FRAME_PREFIX: usize = 16;

/// How many bytes a [`FrameDecoder`](super::FrameDecoder) may hold: one incomplete frame
/// plus one pushed chunk of at most [`MAX_PUSH_CHUNK`]. Reaching it means the caller is not
/// draining the decoder, a local bug, not a peer's.
pub const MAX_DECODER_BUFFER: usize = MAX_FRAME_PREFIX + MAX_CONTROL_FRAME + MAX_PUSH_CHUNK;

/// Largest chunk to give [`FrameDecoder::push`](super::FrameDecoder::push) at once (quinn's
/// `read_chunk(MAX_PUSH_CHUNK, true)`).
pub const MAX_PUSH_CHUNK: usize = 64 * 1024;

/// Size of the largest valid `Hello` payload: version, device name, service list, serial,
/// zone config and agent version, every one at its bound.
pub const WORST_CASE_HELLO: usize = 2
    + (1 + MAX_NAME_LEN)
    + 2
    + MAX_SERVICES * (1 + MAX_NAME_LEN + 1)
    + 8
    + 1
    + 4
    + MAX_ZONE_CONFIG
    + (2 + MAX_VERSION_LEN);

/// Most (peer, service) permits one `PermitsHeld` lists: peers of a zone times the services
/// each may reach directly; an agent holding more reports the first ones.
pub const MAX_PERMITS_HELD: usize = 512;

// The field bounds must imply the frame bound: encoding a valid message never fails for size.
const _: () = assert!(WORST_CASE_HELLO <= MAX_CONTROL_FRAME);
const _: () = assert!(2 + MAX_PERMITS_HELD * 2 * (1 + MAX_NAME_LEN) <= MAX_CONTROL_FRAME);
// A one-byte varint (< 64) carries every name length.
const _: () = assert!(MAX_NAME_LEN < 64);
// The stream header length is a u16.
const _: () = assert!(MAX_HEADER_LEN <= u16::MAX as usize);

/// Most UDP flows open at once on one connection. Each costs the agent a UDP socket; 4096 is
/// far above what one home service sees and keeps a flood of `UdpFlowOpen` from exhausting
/// the agent's file descriptors.
pub const MAX_UDP_FLOWS: usize = 4096;
