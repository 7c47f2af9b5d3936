//! QUIC endpoints and transport tuning shared by the gateway and the agents.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{ClientConfig, Endpoint, IdleTimeout, ServerConfig, TransportConfig, VarInt};

use crate::creds::DeviceCreds;
use crate::error::TunnelError;
use crate::tls;
use crate::udp;

/// Transport timing. Defaults suit home NATs; tests shorten them.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// QUIC PING interval: below the 30 s idle UDP timeout of common NATs (and the NAT lab),
    /// with room for a lost ping.
    pub keepalive: Duration,
    /// A connection with no packets for this long is dead (then the agent reconnects).
    pub idle_timeout: Duration,
    /// Time allowed for the QUIC + TLS handshake and the hello exchange.
    pub handshake_timeout: Duration,
    /// Time a peer has to answer a stream header.
    pub open_timeout: Duration,
    /// A UDP flow with no datagram either way for this long is closed (agent and gateway).
    pub udp_flow_idle: Duration,
    /// A stream to a device whose reader took data and has not read again for this long is
    /// held; beyond [`crate::holds::HELD_BUDGET`] held streams per device the gateway cuts the
    /// longest-held. Long enough for a client's pause, short enough that a device is not
    /// frozen for long by clients that stopped reading.
    pub reader_stall: Duration,
    /// Silence after which the clients of proxied TCP connections (public clients of tcp apps
    /// and the HTTP front, local clients of forwards) and services on other hosts are probed
    /// ([`crate::sockets::keepalive_accepted`]); None: never. Services on the device's own
    /// host are not: its kernel closes what a dead service held.
    pub tcp_keepalive: Option<Duration>,
    /// How long a stopping node agent lets the streams it serves finish, telling its
    /// gateways it offers nothing more meanwhile ([`crate::agent::Agent::run`]); zero: it
    /// stops at once. The CLI sets it from `grace_secs` (10 s).
    pub agent_drain: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            keepalive: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            open_timeout: Duration::from_secs(10),
            udp_flow_idle: Duration::from_secs(120),
            reader_stall: Duration::from_secs(5),
            // Five minutes: a dead client is given up 10 minutes after its last packet (a
            // first probe at 5, three more 75 s apart, the connection dropped 75 s after the
            // fourth); most NATs keep an idle TCP mapping that long, and a phone is not woken
            // every minute.
            tcp_keepalive: Some(Duration::from_secs(300)),
            agent_drain: Duration::ZERO,
        }
    }
}

/// Concurrent streams an agent (or a mesh peer) may open on one connection: each is one
/// relayed or forwarded TCP connection; bounded so one device cannot make the gateway hold
/// unbounded stream state.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 4096;
/// Concurrent streams the gateway may open to an agent: each is one public connection to a
/// service on the device (10,000 idle proxied connections to one device is a benchmark case).
pub const MAX_STREAMS_TO_AGENT: u32 = 32 * 1024;
/// Concurrent streams a connection starts with. quinn allocates bookkeeping for every stream
/// the peer may open, up front (~70 bytes each, both directions): 4,096 would cost ~280 KiB per
/// idle agent on the gateway. Connections start small and [`StreamBudget`] grows them while
/// they are busy. 64 rather than 128 since the larger packets' send buffers (see
/// [`MAX_UDP_PAYLOAD`]) took ~8 KiB per idle agent: `benches/run.sh mem` 61.5 → 56.3 KiB per
/// agent, while 32 concurrent clients opening streams (`benches/ab.sh conn|front`) ran the same.
pub const INITIAL_STREAMS: u32 = 64;
/// Flow-control windows: a stream may have 4 MiB in flight (enough for ~300 Mbit/s at 100 ms
/// RTT), a connection 32 MiB across its streams.
/// Streams whose readers stopped reading hold their unread data's share of the connection
/// window; [`crate::holds`] keeps them from holding all of it.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
/// Datagram receive buffer for UDP flows (bytes): about a second of a modest UDP service.
const DATAGRAM_BUFFER: usize = 1024 * 1024;
/// Datagrams waiting to go out on one connection at most (bytes); past it, new ones are
/// dropped ([`crate::flow_datagram::send`]). quinn's 1 MiB default is 0.8 s of a 10 Mbit/s
/// home link: a flood held every game and call datagram of the connection that long, then
/// quinn dropped the oldest (other flows') silently while they counted as sent.
pub const DATAGRAM_QUEUE: usize = 256 * 1024;
/// Largest UDP payload path MTU discovery probes for, and the largest a peer may send us: what
/// a jumbo-frame link (MTU 9,000) carries over IPv6, so packets grow to what the path takes —
/// 1,470 bytes over Ethernet-sized links (the NAT lab's, `tunnel_lab` asserts it), 8,952 on a
/// jumbo LAN or on loopback (a zone on one machine), as TCP segments follow the interface's MTU. quinn's default bound is 1,452. Probes are sent
/// with "don't fragment", and one too big for the local interface fails without leaving the
/// host, so over an Ethernet path the higher bound costs a longer binary search after the
/// handshake (a dozen probe round trips at 1,200 bytes before the first size that fits,
/// instead of none) and a few lost probes when quinn searches again every ten minutes. Higher
/// bounds carry little more (`benches/ab.sh bulk`: 64 KiB datagrams on loopback ~5 % more)
/// while every connection keeps a send buffer as large as its biggest probe (~65 KiB more per
/// idle agent on the gateway at 65,527). Needs [`udp::GsoBounded`] under the endpoint: quinn
/// batches ten datagrams into one send.
pub const MAX_UDP_PAYLOAD: u16 = 8_952;

pub fn transport_config(t: &Tuning) -> Arc<TransportConfig> {
    Arc::new(transport(t))
}

fn transport(t: &Tuning) -> TransportConfig {
    let mut c = TransportConfig::default();
    c.keep_alive_interval(Some(t.keepalive));
    c.max_idle_timeout(Some(
        IdleTimeout::try_from(t.idle_timeout)
            .unwrap_or(IdleTimeout::from(VarInt::from_u32(30_000))),
    ));
    c.max_concurrent_bidi_streams(VarInt::from_u32(INITIAL_STREAMS));
    c.max_concurrent_uni_streams(VarInt::from_u32(0));
    c.stream_receive_window(VarInt::from_u32(STREAM_WINDOW));
    c.receive_window(VarInt::from_u32(CONNECTION_WINDOW));
    c.send_window(CONNECTION_WINDOW as u64);
    c.datagram_receive_buffer_size(Some(DATAGRAM_BUFFER));
    c.datagram_send_buffer_size(DATAGRAM_QUEUE);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    c.mtu_discovery_config(Some(mtu));
    c
}

/// Grows the number of concurrent streams a peer may open on a connection, from
/// [`INITIAL_STREAMS`] up to a cap, while they are in use: whoever accepts streams calls
/// [`StreamBudget::admit`] for each and holds the slot while the stream lives. Once three
/// quarters of the allowance is open it doubles (quinn then sends MAX_STREAMS); it never
/// shrinks, so a connection that was busy once keeps its larger allowance.
#[derive(Debug)]
pub struct StreamBudget {
    conn: quinn::Connection,
    cap: u32,
    state: std::sync::Mutex<BudgetState>,
}

#[derive(Debug)]
struct BudgetState {
    open: u32,
    limit: u32,
}

/// One admitted stream: dropping it frees its place in the budget.
#[derive(Debug)]
pub struct StreamSlot(Arc<StreamBudget>);

impl StreamBudget {
    pub fn new(conn: quinn::Connection, cap: u32) -> Arc<Self> {
        Arc::new(StreamBudget {
            conn,
            cap: cap.max(INITIAL_STREAMS),
            state: std::sync::Mutex::new(BudgetState {
                open: 0,
                limit: INITIAL_STREAMS,
            }),
        })
    }

    /// Counts a newly accepted stream, raising the peer's allowance when it runs short.
    pub fn admit(self: &Arc<Self>) -> StreamSlot {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.open += 1;
        if st.open.saturating_mul(4) >= st.limit.saturating_mul(3) && st.limit < self.cap {
            st.limit = st.limit.saturating_mul(2).min(self.cap);
            self.conn
                .set_max_concurrent_bi_streams(VarInt::from_u32(st.limit));
            tracing::debug!(open = st.open, limit = st.limit, "stream allowance raised");
        }
        StreamSlot(self.clone())
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        st.open = st.open.saturating_sub(1);
    }
}

/// An endpoint that accepts zone devices (the gateway; also any device for direct mesh).
pub fn server_endpoint(
    bind: SocketAddr,
    creds: &DeviceCreds,
    t: &Tuning,
) -> Result<Endpoint, TunnelError> {
    let sc = server_config(creds, t)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| TunnelError::Config("no async runtime for the QUIC endpoint".into()))?;
    let socket = udp::bind(bind, "listen on", &*runtime)?;
    let mut ep =
        Endpoint::new_with_abstract_socket(endpoint_config(creds), Some(sc), socket, runtime)
            .map_err(|e| TunnelError::Config(format!("cannot listen on UDP {bind}: {e}")))?;
    ep.set_default_client_config(client_config(creds, t)?);
    Ok(ep)
}

/// Endpoint settings that survive a restart of the process: the stateless-reset key and the
/// key of the connection-ID generator, both derived from the device key.
///
/// After a crash, peers keep sending on connections the new process does not know. quinn answers
/// such packets with a stateless reset, which ends the peer's connection at once instead of
/// after its idle timeout (30 s by default), but only when the packet's connection ID validates
/// and the reset token matches the one the old process issued. quinn's default CID generator
/// signs CIDs with a random per-process key, so a restarted gateway dropped every old packet as
/// "invalid CID" and agents waited out the idle timeout (NAT lab, idle agents, 4 s test idle
/// timeout: back 5.3 s after a SIGKILLed gateway restarted).
fn endpoint_config(creds: &DeviceCreds) -> quinn::EndpointConfig {
    let mut reset = [0u8; 32];
    creds.derive_secret(b"zonegate/stateless-reset/v1", &mut reset);
    let mut cid = [0u8; 8];
    creds.derive_secret(b"zonegate/cid-hash/v1", &mut cid);
    let cid_key = u64::from_le_bytes(cid);
    let mut cfg = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &reset,
    )));
    // Within quinn's range (1,200..=65,527) by construction, so this cannot fail.
    let _ = cfg.max_udp_payload_size(MAX_UDP_PAYLOAD);
    cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    cfg
}

/// Why a control stream ended, for the "tunnel down" log: the connection's close reason when the
/// connection went (e.g. "reset by peer" after the other side restarted), else the stream error.
pub fn stream_end(conn: &quinn::Connection, e: &dyn std::fmt::Display) -> String {
    match conn.close_reason() {
        Some(why) => format!("connection lost: {why}"),
        None => format!("control stream: {e}"),
    }
}

/// Accepting side of a device: the gateway's, and a node agent's for direct mesh paths (set on
/// the agent's one endpoint, so peers reach it through the NAT mapping the gateway observed).
pub fn server_config(creds: &DeviceCreds, t: &Tuning) -> Result<ServerConfig, TunnelError> {
    let mut sc = ServerConfig::with_crypto(tls::server_crypto(creds)?);
    sc.transport_config(transport_config(t));
    // NAT rebinding: let an agent's connection move to a new address/port.
    sc.migration(true);
    Ok(sc)
}

/// A node agent's accepting side, for direct mesh paths: as [`server_config`], taking no
/// QUIC datagrams ([`peer_transport_config`]).
pub fn peer_server_config(creds: &DeviceCreds, t: &Tuning) -> Result<ServerConfig, TunnelError> {
    let mut sc = server_config(creds, t)?;
    sc.transport_config(peer_transport_config(t));
    Ok(sc)
}

/// How a node agent dials a peer directly ([`crate::peers`]): as [`client_config`], taking no
/// QUIC datagrams ([`peer_transport_config`]).
pub fn peer_client_config(creds: &DeviceCreds, t: &Tuning) -> Result<ClientConfig, TunnelError> {
    let mut cc = ClientConfig::new(tls::client_crypto(creds)?);
    cc.transport_config(peer_transport_config(t));
    Ok(cc)
}

/// A direct connection's settings: [`transport_config`]'s without datagrams. Only gateway links
/// carry them (UDP flows); on a direct connection nothing reads them, and quinn would queue a
/// peer's up to its receive buffer by payload size — an empty datagram each keeping its whole
/// packet (up to 9 KB), tens of MB per connection from any zone device. The peer is told
/// (the transport parameter left out); one sending them anyway is a protocol violation.
pub fn peer_transport_config(t: &Tuning) -> Arc<TransportConfig> {
    let mut c = transport(t);
    c.datagram_receive_buffer_size(None);
    Arc::new(c)
}

/// A dial-only endpoint (node agents: [`crate::agent::Agent::bind`] adds the accepting side).
pub fn client_endpoint(
    bind: SocketAddr,
    creds: &DeviceCreds,
    t: &Tuning,
) -> Result<Endpoint, TunnelError> {
    let runtime = quinn::default_runtime()
        .ok_or_else(|| TunnelError::Config("no async runtime for the QUIC endpoint".into()))?;
    let socket = udp::bind(bind, "bind", &*runtime)?;
    let mut ep = Endpoint::new_with_abstract_socket(endpoint_config(creds), None, socket, runtime)
        .map_err(|e| TunnelError::Config(format!("cannot bind UDP {bind}: {e}")))?;
    ep.set_default_client_config(client_config(creds, t)?);
    Ok(ep)
}

/// A node agent's endpoint: one socket on every interface for IPv4 and IPv6 (`[::]:0`,
/// dual-stack), so gateways and peers of either family are reachable; IPv4 only
/// (`0.0.0.0:0`) where the machine has IPv6 disabled.
pub fn agent_endpoint(creds: &DeviceCreds, t: &Tuning) -> Result<Endpoint, TunnelError> {
    if !crate::sockets::ipv6_available() {
        tracing::info!("no IPv6 on this machine: the agent dials over IPv4 only");
    }
    client_endpoint(crate::sockets::any_addr(0), creds, t)
}

pub fn client_config(creds: &DeviceCreds, t: &Tuning) -> Result<ClientConfig, TunnelError> {
    let mut cc = ClientConfig::new(tls::client_crypto(creds)?);
    cc.transport_config(transport_config(t));
    Ok(cc)
}
