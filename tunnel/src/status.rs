//! Status snapshots (serde) for the admin `/status` endpoints of gateway and node.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub proto: String,
}

/// A connected agent as the gateway sees it.
#[derive(Debug, Clone, Serialize)]
pub struct AgentStatus {
    pub device: String,
    pub roles: Vec<String>,
    /// Address as seen by the gateway (the agent's NAT's public side).
    pub addr: String,
    /// Its socket's addresses behind its NAT, as it reported them: told to a punching peer
    /// behind the same public address.
    pub local_addrs: Vec<String>,
    pub session: u64,
    pub rtt_ms: f64,
    /// Largest UDP payload the connection's packets carry now (path MTU discovery: ~1,450 over
    /// the Internet, up to 8,952 on jumbo-frame links and loopback).
    pub path_mtu: u16,
    pub uptime_secs: u64,
    pub since_unix: u64,
    /// When the device's certificate ends (Unix seconds): the gateway closes its connection
    /// then and refuses it until it is renewed.
    pub cert_not_after_unix: i64,
    pub streams: u64,
    /// Zone configs the device offered this session (agents pass on the newest they hear
    /// of), and how many of them were refused: said to be newer and not, or not verifying.
    /// [`crate::hub::MAX_REFUSED_OFFERS`] refused end the session.
    pub zone_offers: u64,
    pub zone_offers_refused: u32,
    /// Streams cut because their readers stopped reading while more of the device's streams
    /// were held than its connection's flow-control window allows ([`crate::holds`]).
    pub streams_cut: u64,
    /// Receive window lent to the device's connection now, beyond its own, for streams
    /// backlogged behind slow readers (bytes; [`crate::holds`]).
    pub window_lent: u64,
    pub bytes_to: u64,
    pub bytes_from: u64,
    pub udp_tx: u64,
    pub udp_rx: u64,
    /// UDP datagrams sent and received on the connection, and the ACK and STREAM frames they
    /// carried each way: packets per request is what a tunnel's per-request cost follows.
    pub udp_tx_datagrams: u64,
    pub udp_rx_datagrams: u64,
    pub ack_frames_tx: u64,
    pub ack_frames_rx: u64,
    pub stream_frames_tx: u64,
    pub stream_frames_rx: u64,
    pub services: Vec<ServiceStatus>,
    /// Mesh streams from this device to others: relayed here or (after punching) direct.
    pub mesh: Vec<MeshPairStatus>,
}

/// One gateway link as an agent sees it.
#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    pub gateway: String,
    pub addr: String,
    pub state: String,
    pub observed_addr: Option<String>,
    pub rtt_ms: Option<f64>,
    /// Largest UDP payload the link's packets carry now, while it is up (see
    /// [`AgentStatus::path_mtu`]).
    pub path_mtu: Option<u16>,
    pub connects: u64,
    pub last_error: Option<String>,
}

/// A mesh peer as an agent sees it: how streams to it travel and what they carried.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub device: String,
    /// `direct` (a QUIC connection of our own to the peer is up), `offline` (the gateways
    /// said so at the last stream opened to it, and nothing has reached it or come from it
    /// since), else `relay` (streams go through a gateway, Noise end to end).
    pub path: String,
    /// The peer's address on the direct connection.
    pub direct_addr: Option<String>,
    /// RTT of the direct connection; for `relay`, the RTT to the gateway (a lower bound).
    pub rtt_ms: Option<f64>,
    /// Largest UDP payload the direct connection's packets carry now (none while relayed).
    pub path_mtu: Option<u16>,
    /// Streams ended, per path.
    pub streams_direct: u64,
    pub streams_relay: u64,
    /// Streams open now, per path: one opened on the relay stays there for its life, whatever
    /// `path` says since.
    pub open_direct: u64,
    pub open_relay: u64,
    /// Payload bytes sent to / received from the peer, per path (both directions of streams
    /// we opened and of streams the peer opened to us), counted as they go.
    pub bytes_direct_out: u64,
    pub bytes_direct_in: u64,
    pub bytes_relay_out: u64,
    pub bytes_relay_in: u64,
    /// Hole-punching rounds the gateway coordinated with this peer, and direct connections made.
    pub punches: u64,
    pub direct_connects: u64,
    /// Services the gateway allowed this peer to reach here (so it may use them directly).
    pub permits: Vec<String>,
    pub last_error: Option<String>,
}

/// A device pair whose mesh traffic this gateway relayed or whose hole punching it coordinated.
#[derive(Debug, Clone, Serialize)]
pub struct MeshPairStatus {
    pub to: String,
    /// The gateway's view: `relay` while it relays streams of this pair (one within the last
    /// minute), `direct` when it coordinated punching and has relayed nothing since (the agents'
    /// own `/status` says for sure), else `idle`.
    pub path: String,
    pub relayed_streams: u64,
    /// Ciphertext bytes relayed from / to the `from` device (Noise end to end: never readable here).
    pub relayed_bytes_up: u64,
    pub relayed_bytes_down: u64,
    pub punches: u64,
    pub secs_since_relay: Option<u64>,
    pub secs_since_punch: Option<u64>,
}
