//! QUIC endpoints and transport tuning shared by the gateway and the agents.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{ClientConfig, Endpoint, IdleTimeout, ServerConfig, TransportConfig, VarInt};

use crate::creds::DeviceCreds;
use crate::error::TunnelError;
use crate::tls;

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
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            keepalive: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            open_timeout: Duration::from_secs(10),
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
/// they are busy.
pub const INITIAL_STREAMS: u32 = 128;
/// Flow-control windows: a stream may have 4 MiB in flight (enough for ~300 Mbit/s at 100 ms
/// RTT), a connection 32 MiB across its streams.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
/// Datagram receive buffer for UDP flows (bytes): about a second of a modest UDP service.
const DATAGRAM_BUFFER: usize = 1024 * 1024;

pub fn transport_config(t: &Tuning) -> Arc<TransportConfig> {
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
    Arc::new(c)
}

/// Kernel buffer asked for each QUIC UDP socket, both directions. The common default (208 KiB)
/// overflows under a bulk transfer even on loopback (measured: ~4,700 `UdpRcvbufErrors` in
/// 16 s of iperf3 through the tunnel, none with 4 MiB), and every overflow is a lost packet the
/// congestion controller answers by slowing down. The kernel caps the request at
/// `net.core.rmem_max`/`wmem_max`. Memory stays bounded by the flow-control windows, not by
/// this: a sender may only have as much stream data in flight as the receiver granted.
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Binds a UDP socket for a QUIC endpoint, with [`SOCKET_BUFFER`]-sized kernel buffers where
/// the system allows (best effort: a smaller buffer still works, only slower under load).
fn bind_udp(bind: SocketAddr, what: &str) -> Result<std::net::UdpSocket, TunnelError> {
    let socket = std::net::UdpSocket::bind(bind)
        .map_err(|e| TunnelError::Config(format!("cannot {what} UDP {bind}: {e}")))?;
    let sized = quinn::udp::UdpSocketState::new((&socket).into()).and_then(|st| {
        st.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER)?;
        st.set_send_buffer_size((&socket).into(), SOCKET_BUFFER)?;
        Ok((
            st.recv_buffer_size((&socket).into())?,
            st.send_buffer_size((&socket).into())?,
        ))
    });
    match sized {
        Ok((recv, send)) => tracing::debug!(%bind, recv, send, "UDP socket buffers"),
        Err(e) => tracing::debug!(%bind, error = %e, "UDP socket buffers left at the default"),
    }
    Ok(socket)
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
    let socket = bind_udp(bind, "listen on")?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| TunnelError::Config("no async runtime for the QUIC endpoint".into()))?;
    let mut ep = Endpoint::new(endpoint_config(creds), Some(sc), socket, runtime)
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

/// A dial-only endpoint (node agents: [`crate::agent::Agent::bind`] adds the accepting side).
pub fn client_endpoint(
    bind: SocketAddr,
    creds: &DeviceCreds,
    t: &Tuning,
) -> Result<Endpoint, TunnelError> {
    let socket = bind_udp(bind, "bind")?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| TunnelError::Config("no async runtime for the QUIC endpoint".into()))?;
    let mut ep = Endpoint::new(endpoint_config(creds), None, socket, runtime)
        .map_err(|e| TunnelError::Config(format!("cannot bind UDP {bind}: {e}")))?;
    ep.set_default_client_config(client_config(creds, t)?);
    Ok(ep)
}

pub fn client_config(creds: &DeviceCreds, t: &Tuning) -> Result<ClientConfig, TunnelError> {
    let mut cc = ClientConfig::new(tls::client_crypto(creds)?);
    cc.transport_config(transport_config(t));
    Ok(cc)
}
