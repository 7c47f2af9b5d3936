//! The gateway's side of the tunnel: accepts agents, keeps the table of connected devices,
//! opens streams to their services, relays mesh streams between devices, carries UDP flows,
//! and drains on shutdown.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use policies::{PolicyStore, Timestamp};
use quinn::{Connection, Endpoint};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};
use zone_core::{DeviceIdentity, SignedZone};

use crate::admit::{GateStats, HandshakeGate, HandshakePermit};
use crate::candidates;
use crate::control::{self, ControlHandle, ControlIo, CONTROL_BACKLOG, CONTROL_NOT_READ};
use crate::creds::{DeviceCreds, Standing};
use crate::error::{OpenError, TunnelError};
use crate::holds::{HoldClock, Holds};
use crate::log_budget::{LogBudget, Repeats};
use crate::proto::ServiceProto;
use crate::proto::{
    self, ControlSession, ErrorCode, Event, Origin, RefuseCode, ServiceInfo, StreamHeader, Welcome,
};
use crate::services::LocalServices;
use crate::sockets::canonical;
use crate::splice::splice_until;
use crate::status::{AgentStatus, MeshPairStatus, ServiceStatus};
use crate::stream::{self, QuicStream};
use crate::transport::{self, StreamBudget, Tuning, MAX_STREAMS_PER_CONNECTION};
use crate::upstream::Upstream;
use crate::window_loan::WindowPool;

/// Handshakes in progress at once. Beyond this new connection attempts are refused, so a
/// handshake flood costs bounded CPU and memory and connected agents keep working.
pub const MAX_HANDSHAKES: usize = 256;
/// Above this many handshakes in flight, unvalidated clients must first prove their address
/// (QUIC Retry), which stops spoofed-source floods from costing a TLS handshake each.
pub const RETRY_ABOVE: usize = 32;
/// Handshakes in flight from one address (IPv6 /64; an IPv4 /24 or IPv6 /48 four times as many) not yet
/// validated, and validated ones ([`crate::admit::AddressSlots`]): without them one host
/// that answers Retry and then stalls its handshakes held all [`MAX_HANDSHAKES`] slots (26
/// attempts a second, each held for the handshake timeout), and every agent that reconnected
/// meanwhile was refused. A home's devices share its NAT's address, and a whole zone
/// reconnecting after a gateway restart stays well within 32 at a time.
pub const HANDSHAKES_PER_ADDRESS: usize = 16;
pub const VALIDATED_PER_ADDRESS: usize = 32;
/// Zone configs a device may offer that are refused (do not verify, wrong zone, too large)
/// before its session is ended; a correct agent offers only configs it verified itself.
pub const MAX_REFUSED_OFFERS: u32 = 8;
/// Datagrams queued towards one UDP flow's public client before dropping (UDP semantics).
pub const UDP_FLOW_QUEUE: usize = 256;
/// Application close codes on the QUIC connection.
pub const CLOSE_SHUTDOWN: u32 = 1;
pub const CLOSE_REPLACED: u32 = 2;
pub const CLOSE_REVOKED: u32 = 3;
pub const CLOSE_PROTOCOL: u32 = 4;
/// The device's certificate expired while its connection was up.
pub const CLOSE_EXPIRED: u32 = 5;
/// The device took nothing of its control stream for [`CONTROL_STALL_TIMEOUTS`] idle timeouts.
pub const CLOSE_STALLED: u32 = 6;
/// Idle timeouts the hub's control messages may wait for a device to read them before its
/// session ends: several, as a connection whose flow-control window slow (but reading)
/// services filled holds them back too.
pub const CONTROL_STALL_TIMEOUTS: u32 = 4;

/// How a control session ended ([`Hub::run_control`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionEnd {
    /// The connection or the stream ended, or the device said why.
    Ended,
    /// The device broke the protocol: the session's `Error` is written before the close.
    Broke,
    /// The device read nothing of its control stream for too long.
    Stalled,
}

/// Closes `conn` (to `device`) when the device's certificate ends (`not_after`), unless it
/// closes first: certificates are checked at the handshake, and a connection may stay up for
/// as long as both ends like.
pub(crate) async fn close_at_expiry(
    conn: Connection,
    device: String,
    not_after: time::OffsetDateTime,
    tell: Tell,
) {
    let warn_at = not_after - time::Duration::days(crate::creds::EXPIRY_WARNING_DAYS);
    let mut told = tell == Tell::AtEnd;
    loop {
        let next = if told { not_after } else { warn_at };
        tokio::select! {
            () = tokio::time::sleep(until(next)) => {}
            _ = conn.closed() => return,
        }
        let now = time::OffsetDateTime::now_utc();
        if now >= not_after {
            warn!(device = %device, not_after = %not_after, "certificate expired: connection closed");
            conn.close(CLOSE_EXPIRED.into(), b"certificate expired");
            return;
        }
        if !told && now >= warn_at {
            told = true;
            // The device says it too, but in its own log at home: the gateway's is the one
            // its operator reads. Told as it connects within the last days, or as a
            // connection kept up for months reaches them.
            warn!(device = %device, not_after = %not_after, days_left = (not_after - now).whole_days(), "the device's certificate ends soon, and with it its connection here: renew it with `zonegate device renew {device} --zone DIR` where the zone directory is, copy the new device.crt and zone.json into the device's bundle (its node takes them within seconds, no restart; it passes the zone.json on to this gateway, whose device certificate series then shows the new end, and its connection here is made again with the new certificate when this one's ends)");
        }
    }
}

/// What [`close_at_expiry`] says before it closes a connection at its certificate's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tell {
    /// Only the end.
    AtEnd,
    /// Also once [`crate::creds::EXPIRY_WARNING_DAYS`] before it (a node agent's connection
    /// to the gateway).
    Before,
}

/// How long until `t`, at most ten minutes (a timer is then set again): zero once it has
/// passed. Timers run on the monotonic clock, which stands still while the machine sleeps: a
/// laptop suspended across `t` would otherwise wait out the rest of a longer timer after it.
pub(crate) fn until(t: time::OffsetDateTime) -> Duration {
    let left = t - time::OffsetDateTime::now_utc();
    Duration::try_from(left)
        .unwrap_or(Duration::ZERO)
        .min(Duration::from_secs(600))
}
/// Least time between two hole-punching rounds the hub coordinates for one device pair: agents
/// rate-limit themselves too; this bounds what a misbehaving one can make the hub send.
pub const PUNCH_MIN_INTERVAL: Duration = Duration::from_secs(5);
/// A pair whose last relayed stream is younger than this shows as `relay` in `/status`.
const RELAY_RECENT: Duration = Duration::from_secs(60);

/// Why [`Hub::serve`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Its shutdown token was cancelled.
    Shutdown,
    /// The QUIC endpoint stopped accepting by itself; the hub cancelled the shutdown token.
    EndpointEnded,
}

/// Everything the hub needs.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub creds: Arc<DeviceCreds>,
    pub policy: Arc<PolicyStore>,
    /// The gateway's own services (it is a zone device too).
    pub local: Arc<LocalServices>,
    pub tuning: Tuning,
}

/// One connected agent.
#[derive(Debug)]
pub struct AgentLink {
    pub device: String,
    pub roles: Vec<&'static str>,
    pub session_id: u64,
    pub conn: Connection,
    pub services: RwLock<Vec<ServiceInfo>>,
    /// The device withdrew its services: a node agent does so only as it stops (its drain),
    /// so streams to it are refused as `Draining`, not as a service it does not offer.
    pub stopping: AtomicBool,
    /// Cancelled when a zone config adopted here revokes the device: out of the table, its
    /// streams cut and new ones refused, its UDP flows and control messages dropped, its
    /// connection kept only for that config to reach it ([`REVOKED_NOTICE`]).
    revoked: CancellationToken,
    pub since: SystemTime,
    started: Instant,
    /// The end of the device's certificate: the connection is closed then
    /// ([`close_at_expiry`]); shown so the gateway's operator sees renewals coming.
    pub cert_not_after: time::OffsetDateTime,
    ctl: ControlHandle,
    /// Open UDP flows: where their datagrams go, and how many were dropped because the
    /// reader was behind ([`UdpFlow::queue_drops`]).
    flows: Mutex<HashMap<u32, FlowTx>>,
    pub streams: AtomicU64,
    /// Zone configs this session offered, whatever became of them.
    zone_offers: AtomicU64,
    /// Zone configs this session offered that were refused ([`MAX_REFUSED_OFFERS`]).
    refused_offers: AtomicU32,
    /// Permit reports (`PermitsHeld`) this session ([`MAX_PERMIT_REPORTS`]).
    permit_reports: AtomicU32,
    /// Payload bytes sent to / received from the device over its connection: streams the
    /// gateway opens to it (public TCP, HTTP front, mesh relay's far side), mesh streams it
    /// opens, and UDP flows. Shared with the metered streams ([`QuicStream::metered`]).
    pub bytes_to: Arc<AtomicU64>,
    pub bytes_from: Arc<AtomicU64>,
    /// The device's streams this gateway reads, watched for readers that stopped reading.
    holds: Holds,
    /// What the streams opened to the device without waiting for its reply may send before
    /// it, together ([`stream::EARLY_BYTES_PER_CONNECTION`]).
    early: Arc<stream::EarlyBudget>,
    /// Lines the device can cause one per message or stream (services changed, bad stream
    /// headers, refused mesh streams): [`LINK_LINES_PER_SEC`] a second.
    lines: Mutex<LogBudget>,
    /// Mesh streams refused or failing the same way again (a peer away for hours, its
    /// service down): said once a minute ([`Repeats`]).
    repeats: Mutex<Repeats>,
    /// The device's socket addresses behind its NAT (`LocalAddrs`), told to a punching peer
    /// behind the same public address ([`crate::candidates`]).
    local_addrs: Mutex<Vec<SocketAddr>>,
}

/// Where a UDP flow's datagrams from the device go, and its count of those dropped there.
type FlowTx = (mpsc::Sender<Bytes>, Arc<AtomicU64>);

/// A working connection replaced by its device's newer one sooner than this after it came up
/// is told at warn ([`Hub`]'s "device connected again"): two agents with one identity.
const SHORT_LIVED_REPLACED: Duration = Duration::from_secs(60);

/// How long a device revoked by a zone config adopted here keeps its connection for that
/// config to reach it ([`Hub::disconnect_revoked`]): a few round trips over a slow uplink.
const REVOKED_NOTICE: Duration = Duration::from_secs(3);

/// What [`Hub::disconnect_revoked`] sends the devices it disconnects: the config (serial,
/// JSON) that revokes them, the newest or one whose revocations were learned.
#[derive(Debug, Clone, Copy)]
enum Notice<'a> {
    Newest(u64, &'a [u8]),
    Revoking(u64, &'a [u8]),
}

/// Why work still open when a drain's grace period ran out ended ([`Hub::grace_over`]).
pub const GRACE_CUT: &str =
    "the gateway is stopping and its drain's grace period (grace_secs) ran out";

/// Whether an agent closed its own connection before the handshake ended (an application
/// close then travels as APPLICATION_ERROR): its dial timed out, as each does while this
/// gateway restarts, or it reached us at another address first. Nothing here refused it, and
/// a restart logged every healthy node as refused.
fn closed_by_agent_during_handshake(e: &TunnelError) -> bool {
    matches!(
        e,
        TunnelError::Connection(quinn::ConnectionError::ConnectionClosed(c))
            if c.error_code == quinn::TransportErrorCode::APPLICATION_ERROR
    )
}

/// How long a drain whose grace ran out waits for the work it cut to log its lines: taken
/// from [`CLOSE_WAIT`].
const CUT_LINES_WAIT: Duration = Duration::from_secs(1);

/// How long a drain waits, after its grace period, for the endpoint's close to reach the
/// agents (and for cut work's lines, [`CUT_LINES_WAIT`]).
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Runs `fut` while refusing new connections to `endpoint` (one CONNECTION_REFUSED packet
/// each, no state kept): unaccepted during a drain, quinn kept each attempt, up to 65,536 of
/// them and 100 MiB, and an agent dialing got no answer until its own handshake timeout
/// instead of going to another gateway at once.
async fn refusing<T>(endpoint: &Endpoint, fut: impl std::future::Future<Output = T>) -> T {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            out = &mut fut => return out,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming.refuse(),
                // Stopped by itself: nothing more comes to refuse.
                None => return fut.await,
            },
        }
    }
}

/// Log lines a second one device's messages and streams may cause ([`AgentLink::lines`]).
const LINK_LINES_PER_SEC: u32 = 20;
/// Log lines a second of refused agent connections (anyone can cause them) and of revoked
/// permits (a device repeating its reports can).
const HUB_LINES_PER_SEC: u32 = 20;

impl AgentLink {
    /// Streams of this device cut because their readers stopped reading ([`crate::holds`]).
    pub fn streams_cut(&self) -> u64 {
        self.holds.cut_count()
    }

    /// Whether this device offers `service` over `proto`; the refusal to open it if not. A
    /// UDP app pointed at a TCP service opened a flow per datagram, each refused by the
    /// device (and logged there), before any was counted as lost.
    fn offers(&self, service: &str, proto: ServiceProto) -> Result<(), OpenError> {
        let services = self.services.read().unwrap_or_else(|p| p.into_inner());
        let none_offered = services.is_empty();
        let offered = services.iter().find(|s| s.name == service).map(|s| s.proto);
        drop(services);
        let reason = match offered {
            Some(p) if p == proto => return Ok(()),
            Some(p) => format!(
                "{} offers {service} over {}, not {}: point the app at a {} service",
                self.device,
                proto_name(p),
                proto_name(proto),
                proto_name(proto)
            ),
            // "does not offer" sent owners after a typo in their policy.
            None if self.stopping.load(Ordering::Relaxed) => {
                return Err(OpenError::Refused {
                    device: self.device.clone(),
                    code: RefuseCode::Draining,
                    reason: format!(
                        "{} is stopping: its node agent withdrew its services to drain",
                        self.device
                    ),
                })
            }
            None if none_offered => format!(
                "{} offers no services (its node agent runs without any: give it `--service` or [services])",
                self.device
            ),
            None => format!("{} does not offer {service}", self.device),
        };
        Err(OpenError::Refused {
            device: self.device.clone(),
            code: RefuseCode::NoSuchService,
            reason,
        })
    }
}

fn proto_name(p: ServiceProto) -> &'static str {
    match p {
        ServiceProto::Tcp => "TCP",
        ServiceProto::Udp => "UDP",
    }
}

#[derive(Debug)]
struct Inner {
    cfg: HubConfig,
    agents: RwLock<HashMap<String, Arc<AgentLink>>>,
    next_session: AtomicU64,
    draining: AtomicBool,
    /// Proxied connections and relays in flight: drain waits for them.
    work: TaskTracker,
    /// Cancelled when a drain's grace period runs out with work still open: that work ends
    /// on it and logs its line saying so ([`Hub::grace_over`]).
    grace_over: CancellationToken,
    handshakes: HandshakeGate,
    /// (from, to) device pairs of mesh traffic: relayed streams and punching rounds.
    mesh: Mutex<HashMap<(String, String), MeshPair>>,
    tap: RwLock<Option<Arc<RelayTap>>>,
    /// Ticks for every link's [`Holds`], advanced by [`Hub::sweep_holds`].
    hold_clock: Arc<HoldClock>,
    /// Receive window the links borrow while streams wait on slow readers ([`crate::holds`]).
    window_pool: Arc<WindowPool>,
    refused_lines: Mutex<LogBudget>,
    /// Agent connections refused for the same reason: said once a minute with `repeats=`
    /// (garbage on the QUIC port, or an agent retrying every few seconds, wrote up to
    /// [`HUB_LINES_PER_SEC`] warnings a second for as long as it went on).
    refused_repeats: Mutex<Repeats>,
    permit_lines: Mutex<LogBudget>,
    /// The configs not adopted that revocations were learned from (serial and JSON, the
    /// latest [`MAX_LEARNED_FROM`]): each session that starts gets them, as the agents
    /// connected then did. Its device, older or of the same serial, was told nothing else.
    learned_from: Mutex<VecDeque<(u64, Vec<u8>)>>,
}

/// Configs revocations were learned from kept for sessions to come ([`Inner::learned_from`]):
/// each comes of a restored backup or a copy, rare; a config is at most 60 KiB.
const MAX_LEARNED_FROM: usize = crate::control::MAX_REVOKING_CONFIGS;

#[derive(Debug, Default)]
struct MeshPair {
    /// The services of the latest relayed streams (at most [`PAIR_SERVICES`]): a punch
    /// request is coordinated only while the policy still allows one of them.
    services: Vec<String>,
    streams: u64,
    bytes_up: u64,
    bytes_down: u64,
    punches: u64,
    last_relay: Option<Instant>,
    last_punch: Option<Instant>,
    /// The addresses the last round gave (opener's, target's): a round with the same ones
    /// is no news for the log.
    last_punch_addrs: Option<(std::net::SocketAddr, std::net::SocketAddr)>,
    /// Every service the target may have let the peer use directly: relayed here, or
    /// reported held by the target (`PermitsHeld`); at most the target's services.
    permitted: Vec<String>,
    /// Those of [`MeshPair::permitted`] whose permit this hub revoked at the target (sent
    /// once; a relayed stream allowed again, or the target reporting it held, clears it).
    revoked: Vec<String>,
}

impl MeshPair {
    /// `service` may be permitted at the target: the next check asks about it. `again`: it
    /// may have been granted since a revocation was sent (a relayed stream allowed, a new
    /// session's report), so a refusal is sent again.
    /// Whether anything changed (a check is due).
    fn may_permit(&mut self, service: &str, again: bool) -> bool {
        let mut changed = false;
        if !self.permitted.iter().any(|s| s == service)
            && self.permitted.len() < crate::proto::limits::MAX_SERVICES
        {
            self.permitted.push(service.to_owned());
            changed = true;
        }
        if again {
            let before = self.revoked.len();
            self.revoked.retain(|s| s != service);
            changed |= self.revoked.len() != before;
        }
        changed
    }
}

/// `PermitsHeld` reports taken per session: one as it starts, then one per permit the device
/// newly grants (a relayed stream from a peer); past this a device is flooding.
const MAX_PERMIT_REPORTS: u32 = 1024;

/// A device's service names for a log line: the first [`SUMMARY_NAMES`] and how many in all
/// (a device may offer 256 names of 63 bytes, 17 KB a line, and may reconnect or change its
/// list again and again).
fn services_summary<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::from("[");
    let mut n = 0usize;
    for name in names {
        if n < SUMMARY_NAMES {
            if n > 0 {
                out.push_str(", ");
            }
            out.push_str(name);
        }
        n += 1;
    }
    if n > SUMMARY_NAMES {
        out.push_str(&format!(", … {n} in all"));
    }
    out.push(']');
    out
}

/// Service names a log line lists at most.
const SUMMARY_NAMES: usize = 8;

/// `name`'s entry in the zone config, if it names a device of it.
fn zone_device<'a>(zone: &'a SignedZone, name: &str) -> Option<&'a zone_core::DeviceEntry> {
    let name = zone_core::DeviceName::new(name).ok()?;
    zone.config.device(&name)
}

/// Services remembered per device pair ([`MeshPair::services`]).
const PAIR_SERVICES: usize = 8;

/// Records the bytes the relay forwards between devices, for tests that check what the
/// gateway can see (it must be ciphertext only). Bounded: recording stops at `cap` bytes.
#[derive(Debug)]
pub struct RelayTap {
    cap: usize,
    seen: Mutex<Vec<u8>>,
}

impl RelayTap {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(RelayTap {
            cap,
            seen: Mutex::new(Vec::new()),
        })
    }
    fn record(&self, b: &[u8]) {
        let mut v = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let room = self.cap.saturating_sub(v.len());
        v.extend_from_slice(&b[..b.len().min(room)]);
    }
    /// Everything recorded so far (both directions, interleaved as read).
    pub fn seen(&self) -> Vec<u8> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A stream end whose reads are copied into a [`RelayTap`].
struct Tapped<'a, T: ?Sized> {
    inner: &'a mut T,
    tap: Option<Arc<RelayTap>>,
}

impl<T: crate::splice::End + ?Sized> crate::splice::End for Tapped<'_, T> {
    fn abort(&mut self) {
        self.inner.abort()
    }
    fn abort_receiving(&mut self) {
        self.inner.abort_receiving()
    }
    fn cut_signal(&self) -> Option<Arc<crate::holds::Watched>> {
        self.inner.cut_signal()
    }
    fn accepted(&self) -> Option<bool> {
        self.inner.accepted()
    }
    fn poll_read_chunks(
        &mut self,
        cx: &mut std::task::Context<'_>,
        room: &mut crate::splice::ReadRoom,
        out: &mut std::collections::VecDeque<bytes::Bytes>,
    ) -> std::task::Poll<std::io::Result<usize>> {
        let before = out.len();
        let r = self.inner.poll_read_chunks(cx, room, out);
        if let Some(t) = &self.tap {
            out.iter().skip(before).for_each(|c| t.record(c));
        }
        r
    }
    fn poll_write_chunks(
        &mut self,
        cx: &mut std::task::Context<'_>,
        chunks: &mut std::collections::VecDeque<bytes::Bytes>,
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.inner.poll_write_chunks(cx, chunks)
    }
}

impl<T: tokio::io::AsyncRead + Unpin + ?Sized> tokio::io::AsyncRead for Tapped<'_, T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut *this.inner).poll_read(cx, buf);
        if let Some(t) = &this.tap {
            t.record(&buf.filled()[before..]);
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin + ?Sized> tokio::io::AsyncWrite for Tapped<'_, T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut *self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// The gateway's hub. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Hub(Arc<Inner>);

fn identity_of(conn: &Connection) -> Result<DeviceIdentity, TunnelError> {
    let any = conn
        .peer_identity()
        .ok_or_else(|| TunnelError::Config("peer sent no certificate".into()))?;
    let certs = any
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| TunnelError::Config("unexpected peer identity type".into()))?;
    let first = certs
        .first()
        .ok_or_else(|| TunnelError::Config("peer sent no certificate".into()))?;
    Ok(DeviceIdentity::from_der(first)?)
}

impl Hub {
    pub fn new(cfg: HubConfig) -> Self {
        Hub(Arc::new(Inner {
            cfg,
            agents: RwLock::new(HashMap::new()),
            next_session: AtomicU64::new(rand::random::<u32>() as u64),
            draining: AtomicBool::new(false),
            work: TaskTracker::new(),
            grace_over: CancellationToken::new(),
            handshakes: HandshakeGate::with_per_address(
                "tunnel hub",
                MAX_HANDSHAKES,
                RETRY_ABOVE,
                HANDSHAKES_PER_ADDRESS,
                VALIDATED_PER_ADDRESS,
            ),
            mesh: Mutex::new(HashMap::new()),
            tap: RwLock::new(None),
            hold_clock: Arc::default(),
            window_pool: Arc::default(),
            refused_lines: Mutex::new(LogBudget::new(HUB_LINES_PER_SEC)),
            refused_repeats: Mutex::default(),
            permit_lines: Mutex::new(LogBudget::new(HUB_LINES_PER_SEC)),
            learned_from: Mutex::new(VecDeque::new()),
        }))
    }

    /// Why `device` has no connection here: offline, revoked, or no device of the zone at all.
    fn absent(&self, device: &str) -> OpenError {
        // A revoked one said as such: "not in the zone config" or "offline" beside the
        // policy's own warning that the device is revoked read as another story.
        match self.0.cfg.creds.standing(device) {
            Standing::Listed => OpenError::Offline(device.to_owned()),
            Standing::Revoked => OpenError::Revoked(device.to_owned()),
            Standing::Unlisted => OpenError::NotInZone(device.to_owned()),
        }
    }

    pub fn creds(&self) -> &Arc<DeviceCreds> {
        &self.0.cfg.creds
    }
    pub fn policy(&self) -> &Arc<PolicyStore> {
        &self.0.cfg.policy
    }
    pub fn tuning(&self) -> &Tuning {
        &self.0.cfg.tuning
    }
    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::Relaxed)
    }
    /// Handshake admission counters (flood defence: cap and Retry).
    pub fn handshake_stats(&self) -> GateStats {
        self.0.handshakes.stats()
    }
    /// Tracker for proxied work, so drain waits for it.
    pub fn work(&self) -> &TaskTracker {
        &self.0.work
    }

    /// Cancelled when a drain's grace period runs out: proxied work still open ends on it,
    /// with its line saying the gateway cut it (it was cut by the endpoint's close, and its
    /// line blamed the tunnel or the client, or never came as the process ended first).
    pub fn grace_over(&self) -> &CancellationToken {
        &self.0.grace_over
    }

    /// Starts (or with None stops) recording the bytes of relayed device↔device streams.
    pub fn set_relay_tap(&self, tap: Option<Arc<RelayTap>>) {
        *self.0.tap.write().unwrap_or_else(|p| p.into_inner()) = tap;
    }

    fn mesh_pair<R>(&self, from: &str, to: &str, f: impl FnOnce(&mut MeshPair) -> R) -> R {
        let mut m = self.0.mesh.lock().unwrap_or_else(|p| p.into_inner());
        f(m.entry((from.to_owned(), to.to_owned())).or_default())
    }

    /// `link` asks to reach `peer` directly: send both each other's observed address.
    /// Only for a pair whose relayed stream the policy allowed and still allows (asked again
    /// now: a pair once allowed kept its punching after the policy stopped allowing it), so
    /// punching never tells a device the address of a peer it may not reach.
    fn coordinate_punch(&self, link: &Arc<AgentLink>, peer: &str) {
        let services = {
            let m = self.0.mesh.lock().unwrap_or_else(|p| p.into_inner());
            m.get(&(link.device.clone(), peer.to_owned()))
                .map(|p| p.services.clone())
                .unwrap_or_default()
        };
        let active = self.0.cfg.policy.current();
        let now = Timestamp::now();
        let relayed = services.iter().any(|service| {
            active
                .policy
                .decide_mesh(&link.device, &link.roles, peer, service, now)
                .decision
                .is_allow()
        });
        drop(active);
        let Some(other) = self.agent(peer).filter(|_| relayed && peer != link.device) else {
            debug!(device = %link.device, peer = %peer, "punch request ignored: peer offline, or no relayed stream to it the policy allows");
            return;
        };
        let (a_addr, b_addr) = (
            canonical(link.conn.remote_address()),
            canonical(other.conn.remote_address()),
        );
        // A draining gateway coordinates nothing more: its sessions are ending.
        if self.is_draining() {
            return;
        }
        // The round before, to put back if this one cannot be sent.
        let due = self.mesh_pair(&link.device, peer, |p| {
            if p.last_punch
                .is_some_and(|t| t.elapsed() < PUNCH_MIN_INTERVAL)
            {
                return None;
            }
            p.punches += 1;
            Some(p.last_punch.replace(Instant::now()))
        });
        let Some(before) = due else {
            return;
        };
        let nonce = rand::random::<u64>();
        let local = |l: &AgentLink| {
            l.local_addrs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        };
        let to_a = proto::PeerAddr {
            device: other.device.clone(),
            addrs: candidates::punch_candidates(a_addr, b_addr, &local(&other)),
            punch_nonce: nonce,
        };
        let to_b = proto::PeerAddr {
            device: link.device.clone(),
            addrs: candidates::punch_candidates(b_addr, a_addr, &local(link)),
            punch_nonce: nonce,
        };
        let (told_a, told_b) = (to_a.addrs.clone(), to_b.addrs.clone());
        let sent_a = link.ctl.try_apply(move |s| s.send_peer_addr(to_a));
        let sent_b = other.ctl.try_apply(move |s| s.send_peer_addr(to_b));
        if !(sent_a && sent_b) {
            // A control queue full (a burst of flow opens): no round, and none recorded — it
            // held off the next request for the interval and read as "direct" in /status.
            self.mesh_pair(&link.device, peer, |p| {
                p.last_punch = before;
                p.punches = p.punches.saturating_sub(1);
            });
            debug!(a = %link.device, b = %other.device, sent_a, sent_b, "hole punching not coordinated: a control queue is full; the next request tries again");
            return;
        }
        // Rounds repeat every half minute while a pair stays relayed (a symmetric NAT).
        let news = self.mesh_pair(&link.device, peer, |p| {
            p.last_punch_addrs.replace((a_addr, b_addr)) != Some((a_addr, b_addr))
        });
        if news && a_addr.is_ipv4() != b_addr.is_ipv4() {
            // Each is told an address of the other family than its own path here: that works
            // when the side dialed has no NAT (or a full-cone one), as neither NAT was opened
            // towards the other. Said, so that rounds failing for good are not blamed on
            // address-dependent NATs alone.
            info!(a = %link.device, a_addr = %a_addr, b = %other.device, b_addr = %b_addr, a_told = ?told_a, b_told = ?told_b, "hole punching coordinated across address families (one device reaches the gateway over IPv4, the other over IPv6): it works only where a side has no NAT or a full-cone one");
        } else if news {
            info!(a = %link.device, a_addr = %a_addr, b = %other.device, b_addr = %b_addr, a_told = ?told_a, b_told = ?told_b, "hole punching coordinated");
        } else {
            debug!(a = %link.device, a_addr = %a_addr, b = %other.device, b_addr = %b_addr, a_told = ?told_a, b_told = ?told_b, "hole punching coordinated again");
        }
    }

    /// Mesh pairs with `from` as the opening side, for `/status`.
    fn mesh_status(&self, from: &str) -> Vec<MeshPairStatus> {
        let m = self.0.mesh.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<MeshPairStatus> = m
            .iter()
            .filter(|((f, _), _)| f == from)
            .map(|((_, to), p)| {
                let recent = p.last_relay.is_some_and(|t| t.elapsed() < RELAY_RECENT);
                // Nothing relayed since the last punching round: the pair went direct (or
                // went quiet; the agents' own `/status` knows).
                let punched = match (p.last_punch, p.last_relay) {
                    (Some(pu), Some(r)) => pu >= r,
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                MeshPairStatus {
                    to: to.clone(),
                    path: if punched {
                        "direct"
                    } else if recent {
                        "relay"
                    } else {
                        "idle"
                    }
                    .into(),
                    relayed_streams: p.streams,
                    relayed_bytes_up: p.bytes_up,
                    relayed_bytes_down: p.bytes_down,
                    punches: p.punches,
                    secs_since_relay: p.last_relay.map(|t| t.elapsed().as_secs()),
                    secs_since_punch: p.last_punch.map(|t| t.elapsed().as_secs()),
                }
            })
            .collect();
        v.sort_by(|a, b| a.to.cmp(&b.to));
        v
    }

    /// This gateway's own device name (its services are reached without a tunnel).
    pub fn device_name(&self) -> &str {
        self.0.cfg.creds.name()
    }

    /// Whether `device` offers `service` over TCP now: a stopping device says it offers
    /// nothing, and a connection to it kept for reuse (the HTTP front's pool) must not carry
    /// new requests. The gateway's own services always.
    pub fn offers_tcp(&self, device: &str, service: &str) -> bool {
        device == self.device_name()
            || self
                .agent(device)
                .is_some_and(|l| l.offers(service, ServiceProto::Tcp).is_ok())
    }

    pub fn agent(&self, device: &str) -> Option<Arc<AgentLink>> {
        self.0
            .agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(device)
            .cloned()
    }

    pub fn agents(&self) -> Vec<Arc<AgentLink>> {
        let mut v: Vec<_> = self
            .0
            .agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.device.cmp(&b.device));
        v
    }

    /// Accepts agents until `shutdown`; then drains (see [`Hub::drain`]). An endpoint that
    /// stops accepting by itself (quinn's driver ended on a UDP error) cancels `shutdown`, so
    /// that the process it serves drains and stops with it rather than run on unreachable to
    /// every agent, and says so in its answer.
    pub async fn serve(
        &self,
        endpoint: Endpoint,
        shutdown: CancellationToken,
        grace: Duration,
    ) -> Served {
        info!(addr = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(), "tunnel hub listening (QUIC, ALPN zonegate/1)");
        // The sweep of held streams and the permits' revocation go on through the drain (until
        // this future ends, however it ends): the proxied work a drain waits for is still
        // carried, and one client holding streams unread stalled every other stream of its
        // device for the whole grace, as an edit or a time window's end kept direct paths.
        let lasting = CancellationToken::new();
        let _lasting = lasting.clone().drop_guard();
        tokio::spawn(self.clone().sweep_holds(lasting.clone()));
        tokio::spawn(self.clone().revoke_permits(lasting));
        // Ends with this future, however it ends.
        let _expiry = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
            self.0.cfg.creds.clone().watch_expiry(),
        ));
        let mut served = Served::Shutdown;
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                i = endpoint.accept() => match i {
                    Some(i) => i,
                    None => {
                        error!("the QUIC endpoint stopped accepting connections by itself: draining and stopping");
                        served = Served::EndpointEnded;
                        shutdown.cancel();
                        break;
                    }
                },
            };
            let Some((incoming, permit)) = self.0.handshakes.admit(incoming) else {
                continue;
            };
            let hub = self.clone();
            tokio::spawn(async move {
                let remote = canonical(incoming.remote_address());
                if let Err(e) = hub.handle_incoming(incoming, permit).await {
                    // Anyone can fail a handshake (no certificate, another zone's), as fast
                    // as the handshake gate lets them.
                    if closed_by_agent_during_handshake(&e) {
                        if let Some(unlogged) = LogBudget::take_shared(&hub.0.refused_lines) {
                            info!(%remote, error = %e, unlogged, "agent connection given up by the agent during the handshake");
                        }
                    } else if let Some((repeats, unlogged)) = Repeats::take_both(
                        &hub.0.refused_repeats,
                        &hub.0.refused_lines,
                        &e.to_string(),
                    ) {
                        // `remote`: this line's; the repeats came from anywhere.
                        warn!(%remote, error = %e, repeats, unlogged, "agent connection refused");
                    }
                }
            });
        }
        self.drain(&endpoint, grace).await;
        self.0.cfg.creds.saved(Duration::from_secs(5)).await;
        served
    }

    /// Whenever the policy or the minute changes, revokes the direct-path permits it no
    /// longer backs ([`Hub::revoke_refused_permits`]).
    async fn revoke_permits(self, shutdown: CancellationToken) {
        let mut epoch = self.0.cfg.policy.subscribe();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = epoch.changed() => if r.is_err() { return },
            }
            self.revoke_refused_permits();
        }
    }

    /// A device that accepted a relayed stream from a peer lets that peer reach the service
    /// directly ([`crate::peers`]): the hub asks again, for every pair it relayed or the
    /// target reported holding, whether the policy still allows it, and tells the target to
    /// drop each permit it no longer does (`PermitRevoke`). The target's direct streams then
    /// end as the relay's own do ([`PolicyStore::until_mesh_refused`]); without this they ran
    /// on after an edit or the end of a time window. A target not connected now is told when
    /// it next reports what it holds.
    fn revoke_refused_permits(&self) {
        let pairs: Vec<(String, String, Vec<String>)> = {
            let m = self.0.mesh.lock().unwrap_or_else(|p| p.into_inner());
            m.iter()
                .map(|((from, to), p)| {
                    let open: Vec<String> = p
                        .permitted
                        .iter()
                        .filter(|s| !p.revoked.contains(s))
                        .cloned()
                        .collect();
                    (from.clone(), to.clone(), open)
                })
                .filter(|(_, _, open)| !open.is_empty())
                .collect()
        };
        if pairs.is_empty() {
            return;
        }
        let active = self.0.cfg.policy.current();
        let creds = &self.0.cfg.creds;
        let zone = creds.zone();
        let now = Timestamp::now();
        for (from, to, services) in pairs {
            let Some(target) = self.agent(&to) else {
                continue;
            };
            // A peer revoked (a revocation learned from a config not adopted changes no
            // serial) or no longer listed, or whose certificate ended, loses its permits
            // whatever the policy says: `from = ["zone"]` still allowed it.
            let refused = creds.noise_public_of(&from).err();
            // The peer's roles as its certificate says (connected) or the zone config does.
            let roles: Vec<&'static str> = match self.agent(&from) {
                Some(l) => l.roles.clone(),
                None => zone_device(&zone, &from)
                    .map(|d| d.roles.iter().map(|r| r.as_str()).collect())
                    .unwrap_or_default(),
            };
            for service in services {
                let allowed = refused.is_none()
                    && active
                        .policy
                        .decide_mesh(&from, &roles, &to, &service, now)
                        .decision
                        .is_allow();
                if allowed {
                    continue;
                }
                // Never lost to a full command queue (UDP opens), and sent once however
                // often a device reports the permit before it goes out; a session gone
                // meanwhile is told again by the device's next report.
                target.ctl.revoke_permit(from.clone(), service.clone());
                // A device repeating its reports makes one of these per permit each time.
                if let Some(unlogged) = LogBudget::take_shared(&self.0.permit_lines) {
                    let why = match &refused {
                        None => "the policy no longer allows it".to_owned(),
                        Some(e) => e.to_string(),
                    };
                    info!(device = %to, peer = %from, service = %service, unlogged, "direct-path permit revoked: {why}");
                }
                self.mesh_pair(&from, &to, |p| p.revoked.push(service));
            }
        }
    }

    /// Cuts, on every link, the longest-held streams beyond what its window allows
    /// ([`crate::holds`]): five ticks per [`Tuning::reader_stall`], at most one a second.
    async fn sweep_holds(self, shutdown: CancellationToken) {
        let stall = self.0.cfg.tuning.reader_stall;
        crate::holds::sweep_loop(&self.0.hold_clock, stall, &shutdown, |tick, stall_ticks| {
            for link in self.agents() {
                link.holds.sweep(stall_ticks, tick, &link.device);
            }
        })
        .await
    }

    /// Graceful stop: no new agents or streams, tell agents, let proxied work finish within
    /// `grace`, then close every connection.
    pub async fn drain(&self, endpoint: &Endpoint, grace: Duration) {
        self.0.draining.store(true, Ordering::Relaxed);
        let agents = self.agents();
        let started = tokio::time::Instant::now();
        let open = self.0.work.len();
        info!(
            agents = agents.len(),
            connections = open,
            grace_ms = grace.as_millis() as u64,
            "draining: telling agents, waiting for proxied connections"
        );
        let grace_ms = grace.as_millis().min(u32::MAX as u128) as u32;
        for a in &agents {
            a.ctl.drain(grace_ms, "gateway shutting down");
        }
        self.0.work.close();
        // New connections are refused while the drain waits ([`refusing`]).
        let waited = refusing(endpoint, tokio::time::timeout(grace, self.0.work.wait())).await;
        // The close's own wait below shares its bound with the wait for cut work's lines: the
        // stop's whole margin after the grace period (config.rs, README `grace_secs`) stays.
        let mut close_wait = CLOSE_WAIT;
        if waited.is_err() {
            warn!(
                left = self.0.work.len(),
                "grace period over: closing proxied connections still open"
            );
            // Their lines first, each saying the gateway cut it: they end on this at once
            // (relayed mesh streams and UDP flows end with the endpoint's close).
            self.0.grace_over.cancel();
            let cut = tokio::time::Instant::now();
            let _ = refusing(
                endpoint,
                tokio::time::timeout(CUT_LINES_WAIT, self.0.work.wait()),
            )
            .await;
            close_wait = close_wait.saturating_sub(cut.elapsed());
        }
        endpoint.close(CLOSE_SHUTDOWN.into(), b"gateway shutting down");
        let _ = tokio::time::timeout(close_wait, endpoint.wait_idle()).await;
        // What the drain waited for, and how long: one that waited on nothing and one that
        // let 300 connections finish read alike.
        info!(
            device = %self.0.cfg.creds.name(),
            connections = open,
            waited_ms = started.elapsed().as_millis() as u64,
            "drained"
        );
    }

    async fn handle_incoming(
        &self,
        incoming: quinn::Incoming,
        permit: HandshakePermit,
    ) -> Result<(), TunnelError> {
        let remote = canonical(incoming.remote_address());
        let t = self.0.cfg.tuning;
        let setup = async {
            let conn = incoming.await?;
            let id = identity_of(&conn)?;
            let (send, mut recv) = conn.accept_bi().await?;
            let (header, rest) = match stream::read_header(&mut recv).await {
                Ok(h) => h,
                // Another stream-header version (or no header at all): said in the close, so
                // the agent can tell its owner to upgrade one side (a bare close read as a
                // lost connection, retried for ever).
                Err(e @ TunnelError::Proto(_)) => {
                    conn.close(
                        CLOSE_PROTOCOL.into(),
                        b"unsupported stream header: run the same zonegate version on both sides",
                    );
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            if header != StreamHeader::Control {
                conn.close(
                    CLOSE_PROTOCOL.into(),
                    b"first stream must be the control stream",
                );
                return Err(TunnelError::Config(format!(
                    "{}: first stream was not the control stream",
                    id.name
                )));
            }
            let mut io = ControlIo::with_prefix(send, recv, ControlSession::gateway(), &rest)?;
            let hello = loop {
                match io.next_event().await {
                    Ok(Some(Event::Hello(h))) => break h,
                    Ok(Some(_)) => continue,
                    Ok(None) => return Err(TunnelError::Truncated),
                    // A hello of another protocol version, or a broken one: the session's
                    // Error says which, so the agent can tell its owner (upgrade one side).
                    Err(e) => {
                        io.close_as_violation(&conn, b"control protocol violation")
                            .await;
                        return Err(e);
                    }
                }
            };
            Ok::<_, TunnelError>((conn, id, io, hello))
        };
        let (conn, id, mut io, hello) = match tokio::time::timeout(t.handshake_timeout, setup).await
        {
            Ok(r) => r?,
            Err(_) => return Err(TunnelError::Timeout("handshake and hello")),
        };
        let device = id.name.to_string();
        if hello.device != device {
            io.session.reject(
                ErrorCode::ProtocolViolation,
                "hello names another device than the certificate",
            );
            // Bounded, and short (the handshake slot is still held): a peer that does not read
            // must not hold this. Acknowledged before the close, which would discard it.
            io.close_as_violation(&conn, b"hello device mismatch").await;
            return Err(TunnelError::Config(format!(
                "{device}: hello claims to be {}",
                hello.device
            )));
        }
        let creds = &self.0.cfg.creds;
        // Every hello carries the agent's zone.json: parsed only when its serial differs
        // (the same config otherwise): adopted when newer, its revocations taken when older.
        if let Some(z) = hello.zone_config.as_ref() {
            if hello.zone_serial > creds.zone_serial() {
                self.adopt_zone(z, &device);
            } else if hello.zone_serial < creds.zone_serial() {
                if let Err(e) = self.learn_revocations(z, &device) {
                    if let Some(unlogged) = LogBudget::take_shared(&self.0.refused_lines) {
                        warn!(from = %device, error = %e, unlogged, "refused zone config offered by a device");
                    }
                }
            }
        }
        let ours = creds.zone();
        // A config too large for the message (only one loaded from a file at start can be:
        // offers and new configs are bounded) is left out rather than failing the Welcome.
        // Sent to a device whose config is older, and to one whose newer config was not
        // adopted (leaving out a revocation: signed from a restored backup): it takes the
        // revocations of ours, as older than its own.
        let zone_config = (hello.zone_serial != ours.config.serial)
            .then(|| ours.to_json_compact())
            .filter(|z| {
                let fits = z.len() <= crate::proto::limits::MAX_ZONE_CONFIG;
                if !fits {
                    warn!(device = %device, bytes = z.len(), max = crate::proto::limits::MAX_ZONE_CONFIG, "zone config too large to pass on: the device keeps its older one (the gateway's zone.json was made by hand?)");
                }
                fits
            });
        let session_id = self.0.next_session.fetch_add(1, Ordering::Relaxed);
        let welcomed = io
            .session
            .welcome(Welcome {
                session_id,
                observed_addr: canonical(conn.remote_address()),
                zone_serial: ours.config.serial,
                zone_config,
                keepalive_ms: t.keepalive.as_millis() as u32,
            })
            // The agent keeps its end of a flow at least this long (older agents skip it).
            .and_then(|()| {
                io.session.send_udp_flow_idle(
                    u32::try_from(t.udp_flow_idle.as_millis()).unwrap_or(u32::MAX),
                )
            });
        if let Err(e) = welcomed {
            // The session ended while the hello was read (another frame out of place came
            // with it): the agent is told why, instead of a bare close.
            io.close_as_violation(&conn, b"control protocol violation")
                .await;
            return Err(TunnelError::Config(e.to_string()));
        }
        // Bounded like the hello: a device whose control stream takes no data (a zero receive
        // window) would otherwise hold this connection, unregistered — out of reach of
        // replacement and revocation — with its streams unread.
        match tokio::time::timeout(t.handshake_timeout, io.flush()).await {
            Ok(r) => r?,
            Err(_) => {
                conn.close(CLOSE_PROTOCOL.into(), b"welcome not read");
                return Err(TunnelError::Timeout("welcome"));
            }
        }
        // Held until now: a connection whose Welcome is still unread is in no other limit
        // (not in the agent table yet), and a device not reading it could otherwise pile up
        // one such connection per handshake it completes.
        drop(permit);

        let (ctl, cmds) = control::channel();
        let link = Arc::new(AgentLink {
            device: device.clone(),
            roles: id.roles.iter().map(|r| r.as_str()).collect(),
            session_id,
            conn: conn.clone(),
            services: RwLock::new(hello.services.clone()),
            stopping: AtomicBool::new(false),
            revoked: CancellationToken::new(),
            since: SystemTime::now(),
            started: Instant::now(),
            cert_not_after: id.not_after,
            ctl,
            flows: Mutex::new(HashMap::new()),
            streams: AtomicU64::new(0),
            zone_offers: AtomicU64::new(0),
            refused_offers: AtomicU32::new(0),
            permit_reports: AtomicU32::new(0),
            bytes_to: Arc::default(),
            bytes_from: Arc::default(),
            holds: Holds::new(
                self.0.hold_clock.clone(),
                conn.clone(),
                self.0.window_pool.clone(),
            ),
            early: stream::EarlyBudget::new(stream::EARLY_BYTES_PER_CONNECTION),
            lines: Mutex::new(LogBudget::new(LINK_LINES_PER_SEC)),
            repeats: Mutex::default(),
            local_addrs: Mutex::default(),
        });
        let replaced = {
            let mut agents = self.0.agents.write().unwrap_or_else(|p| p.into_inner());
            // Draining already: not let in, and the device's connection still up (its
            // streams are what the drain waits for) is not replaced by one closed at once.
            // Looked at under the table's lock, which `drain` reads after setting the flag:
            // either this link is in the table `drain` tells, or it is not let in (looked at
            // before taking the lock, a drain starting in between had its live connection
            // replaced).
            if self.is_draining() {
                drop(agents);
                info!(device = %device, "gateway draining: new connection closed (the agent uses another gateway)");
                conn.close(CLOSE_SHUTDOWN.into(), b"gateway shutting down");
                return Ok(());
            }
            agents.insert(device.clone(), link.clone())
        };
        if let Some(old) = replaced {
            // A device reconnecting (restart, power loss) replaces its stale connection. One
            // that was still live is said with both addresses: two agents with one identity
            // (a cloned disk) show as this line again and again (each agent says so too).
            if old.conn.close_reason().is_none() {
                let (previous, now) = (
                    crate::sockets::canonical(old.conn.remote_address()),
                    crate::sockets::canonical(conn.remote_address()),
                );
                let up = old.started.elapsed();
                // Replaced within a minute while still working: what two agents with one
                // identity do to each other, every few seconds. Said only at info, the
                // gateway's operator, who reads this log, never saw it.
                if up < SHORT_LIVED_REPLACED {
                    warn!(device = %device, %previous, %now, previous_up_secs = up.as_secs(), "device connected again while its previous connection, up less than a minute, still worked: if this repeats, two node agents run with this device's bundle (a cloned disk, a restored backup, a second service); stop one, or give it a device of its own (`zonegate device add`)");
                } else {
                    info!(device = %device, %previous, %now, previous_up_secs = up.as_secs(), "device connected again: its previous connection, still open, is closed");
                }
            }
            old.conn
                .close(CLOSE_REPLACED.into(), b"replaced by a newer connection");
        }
        // A newer zone.json adopted between this device's handshake and now may revoke it:
        // adopt_zone only walks the table, so check again once the link is in it.
        if creds.trust.is_revoked(&id.name) {
            warn!(device = %device, "device revoked by a zone config adopted during its handshake: disconnecting");
            conn.close(CLOSE_REVOKED.into(), b"device revoked");
            self.forget(&device, session_id);
            return Ok(());
        }
        // A newer zone config adopted since the Welcome was made reached the agents in the
        // table then, not this one: it would have kept the older config (and a peer it
        // revokes, its direct path) until its next connection.
        if creds.zone_serial() > ours.config.serial {
            let newer = creds.zone();
            link.ctl
                .send_config(newer.config.serial, newer.to_json_compact());
        }
        // And the configs revocations were learned from, which no new serial carries: a
        // device away when they were learned kept its direct paths to the devices they revoke.
        let learned: Vec<_> = self
            .0
            .learned_from
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        for (serial, json) in learned {
            link.ctl.send_revoking_config(serial, json);
        }
        let services = services_summary(hello.services.iter().map(|s| s.name.as_str()));
        info!(device = %device, addr = %remote, session = session_id, services = %services, agent = %hello.agent_version, "tunnel up");

        let accepting = tokio::spawn(self.clone().accept_streams(link.clone()));
        let datagrams = tokio::spawn(self.clone().read_datagrams(link.clone()));
        // The certificate was checked at the handshake; the connection, kept alive for as long
        // as the device likes, must not outlive it. A task of its own: the control loop can
        // wait on a device that reads nothing.
        tokio::spawn(close_at_expiry(
            conn.clone(),
            device.clone(),
            id.not_after,
            Tell::Before,
        ));
        let (reason, end) = self.run_control(&link, &mut io, cmds).await;

        let removed = self.forget(&device, session_id);
        // Out of the table, and taking no more of its streams or datagrams.
        accepting.abort();
        datagrams.abort();
        match end {
            SessionEnd::Broke => {
                // The Error the session ended on, if the device still reads: it says why.
                io.close_as_violation(&conn, b"control protocol violation")
                    .await;
                // Closed whatever ended the session (a violation the device followed with its
                // own Error leaves none of ours to send): out of the table, it must not live on.
                conn.close(CLOSE_PROTOCOL.into(), b"control protocol violation");
            }
            SessionEnd::Stalled => conn.close(CLOSE_STALLED.into(), b"control stream not read"),
            SessionEnd::Ended => conn.close(0u32.into(), b""),
        }
        // Closed: what its window borrowed goes back now (its streams may hold the link a
        // while yet, and the sweep no longer sees it).
        link.holds.release();
        // This gateway closed it for a revocation: the session's own words say only "closed".
        let reason = match self.0.cfg.creds.is_revoked(&device) {
            true => format!("device revoked: disconnected by this gateway ({reason})"),
            false => reason,
        };
        info!(
            device = %device,
            session = session_id,
            reason = %reason,
            up_secs = link.started.elapsed().as_secs(),
            bytes_to = link.bytes_to.load(Ordering::Relaxed),
            bytes_from = link.bytes_from.load(Ordering::Relaxed),
            // Out of the table already when a revocation's notice went to it.
            replaced = !removed && !link.revoked.is_cancelled(),
            "tunnel down"
        );
        Ok(())
    }

    /// Removes `device`'s link if it is still this session's (a newer connection may have
    /// replaced it); whether it was.
    fn forget(&self, device: &str, session_id: u64) -> bool {
        let mut agents = self.0.agents.write().unwrap_or_else(|p| p.into_inner());
        match agents.get(device) {
            Some(l) if l.session_id == session_id => agents.remove(device).is_some(),
            _ => false,
        }
    }

    /// Runs the control session until the connection or the stream ends; returns why, and
    /// how it ended ([`SessionEnd`]: one that broke the protocol is closed with
    /// [`CLOSE_PROTOCOL`], the session's `Error` written first, so the agent can say why).
    async fn run_control(
        &self,
        link: &Arc<AgentLink>,
        io: &mut ControlIo,
        mut cmds: control::ControlCmds,
    ) -> (String, SessionEnd) {
        // A device that stops reading its control stream is given several times as long as
        // a silent connection is, then its session ends (its messages would wait for ever).
        let stall = self.0.cfg.tuning.idle_timeout * CONTROL_STALL_TIMEOUTS;
        io.end_stalled_after(stall);
        loop {
            tokio::select! {
                ev = io.next_event() => match ev {
                    Ok(Some(ev)) => if let Some((why, end)) = self.on_event(link, ev) {
                        if end == SessionEnd::Broke && !io.session.is_closed() {
                            io.session.reject(ErrorCode::ProtocolViolation, &why);
                        }
                        return (why, end);
                    },
                    Ok(None) => return ("agent closed the control stream".into(), SessionEnd::Ended),
                    Err(TunnelError::Timeout(CONTROL_NOT_READ)) => {
                        let why = format!("agent read nothing of its control stream for {} s", stall.as_secs());
                        return (why, SessionEnd::Stalled);
                    }
                    Err(TunnelError::Timeout(CONTROL_BACKLOG)) => {
                        let why = format!("agent left more than {} KiB of its control stream unread", control::MAX_UNREAD >> 10);
                        return (why, SessionEnd::Stalled);
                    }
                    Err(e) => {
                        let end = match io.session.ended_here() {
                            true => SessionEnd::Broke,
                            false => SessionEnd::Ended,
                        };
                        return (transport::stream_end(&link.conn, &e), end);
                    }
                },
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => if let Err(e) = cmd(&mut io.session) {
                        debug!(device = %link.device, error = %e, "control command not applied");
                    },
                    None => return ("hub dropped the session".into(), SessionEnd::Ended),
                },
                e = link.conn.closed() => return (format!("connection closed: {e}"), SessionEnd::Ended),
            }
        }
    }

    /// Acts on one control event; `Some((why, how))` ends the session.
    fn on_event(&self, link: &Arc<AgentLink>, ev: Event) -> Option<(String, SessionEnd)> {
        // Revoked, it waits only for the config that says so: nothing it asks for (permits,
        // punches, offers) is done.
        if link.revoked.is_cancelled() {
            return None;
        }
        match ev {
            Event::ServicesUpdate { services } => {
                // Sent by node agents only to withdraw them as they stop.
                if services.is_empty() {
                    link.stopping.store(true, Ordering::Relaxed);
                }
                let mut current = link.services.write().unwrap_or_else(|p| p.into_inner());
                // Logged only when the list changes: an update is 3 bytes on the wire, and a
                // device repeating one would write a line each.
                if *current != services {
                    // Budgeted too: a device alternating two lists would write a line each.
                    if let Some(unlogged) = LogBudget::take_shared(&link.lines) {
                        if services.is_empty() {
                            info!(device = %link.device, unlogged, "device stopping: its node agent withdrew its services to drain");
                        } else {
                            info!(device = %link.device, services = %services_summary(services.iter().map(|s| s.name.as_str())), unlogged, "services changed");
                        }
                    }
                    *current = services;
                }
            }
            Event::LocalAddrs { addrs } => {
                let addrs = candidates::sanitize_local(&addrs);
                let mut held = link.local_addrs.lock().unwrap_or_else(|p| p.into_inner());
                if *held != addrs {
                    debug!(device = %link.device, local = ?addrs, "device's addresses behind its NAT");
                    *held = addrs;
                }
            }
            Event::PermitsHeld { permits } => {
                // Each report holds permits granted after any revocation sent before it (the
                // session's first, anything held; later ones, a permit newly granted): a
                // refusal of them is sent again. Bounded per session, and after the first the
                // table is only scanned when a report changed it.
                let n = link.permit_reports.fetch_add(1, Ordering::Relaxed);
                if n >= MAX_PERMIT_REPORTS {
                    if n == MAX_PERMIT_REPORTS {
                        warn!(device = %link.device, max = MAX_PERMIT_REPORTS, "device reports its permits too often: further reports of this session are ignored");
                    }
                    return None;
                }
                // Only pairs of zone devices: the table stays bounded by the zone's size.
                let zone = self.0.cfg.creds.zone();
                // And only services the device offers, or the pair holds already (a device
                // draining offers none, and its permits stay revocable): made-up ones grew
                // every pair's lists (256 each), scanned under the mesh lock at every report.
                let offered: std::collections::HashSet<String> = link
                    .services
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .map(|s| s.name.clone())
                    .collect();
                let mut changed = false;
                let creds = &self.0.cfg.creds;
                for (peer, service) in permits {
                    if peer == link.device {
                        continue;
                    }
                    // A peer revoked or no longer listed: its permit goes, and no pair is
                    // kept for it (a target away when it left reports it here).
                    if zone_device(&zone, &peer).is_none() || creds.is_revoked(&peer) {
                        if let Some(unlogged) = LogBudget::take_shared(&self.0.permit_lines) {
                            info!(device = %link.device, peer = %peer, service = %service, unlogged, "direct-path permit revoked: the peer is revoked or no longer in the zone config");
                        }
                        link.ctl.revoke_permit(peer, service);
                        continue;
                    }
                    // A pair made only for a service it offers: made up ones must not list a
                    // pair (an idle `mesh` entry in the peer's /status) for every zone device.
                    let key = (peer.clone(), link.device.clone());
                    let mut m = self.0.mesh.lock().unwrap_or_else(|p| p.into_inner());
                    let pair = match m.get_mut(&key) {
                        Some(p) => Some(p),
                        None if offered.contains(&service) => Some(m.entry(key).or_default()),
                        None => None,
                    };
                    if let Some(p) = pair {
                        let known = offered.contains(&service) || p.permitted.contains(&service);
                        changed |= known && p.may_permit(&service, true);
                    }
                }
                drop(zone);
                // A session's first report is always checked: a policy change while the
                // device was away skipped its pairs (nobody to tell), leaving them unchanged.
                if changed || n == 0 {
                    self.revoke_refused_permits();
                }
            }
            Event::ConfigUpdate {
                zone_serial,
                zone_config,
            } => {
                link.zone_offers.fetch_add(1, Ordering::Relaxed);
                // Not newer by its own account: nothing to adopt, and no parse spent on it (a
                // device re-sending a stale config in a loop cost a 64 KiB JSON parse each).
                if zone_serial <= self.0.cfg.creds.zone_serial() {
                    debug!(from = %link.device, zone_serial, "zone config offered is not newer: ignored");
                    return None;
                }
                let adopted = self
                    .adopt_zone_from(&zone_config, &link.device)
                    .and_then(|serial| {
                        // Said to be newer and not: counted as refused, so a loop of them ends
                        // the session too. Unless the serial it announced was adopted from
                        // another device meanwhile (all pass a new config on at once).
                        let caught_up = || zone_serial <= self.0.cfg.creds.zone_serial();
                        match serial.is_some() || caught_up() {
                            true => Ok(()),
                            false => Err(TunnelError::Config(format!(
                                "zone config announced as serial {zone_serial} is not newer than the one in use"
                            ))),
                        }
                    });
                if let Err(e) = adopted {
                    // Each costs a parse and maybe a signature check, and a warning: a
                    // device sending them by the thousand would flood the log.
                    let n = link.refused_offers.fetch_add(1, Ordering::Relaxed) + 1;
                    if n == 1 {
                        warn!(from = %link.device, error = %e, "refused zone config offered by a device");
                    } else {
                        debug!(from = %link.device, error = %e, "refused zone config offered by a device");
                    }
                    if n >= MAX_REFUSED_OFFERS {
                        return Some((
                            format!("{n} zone configs offered that do not verify"),
                            SessionEnd::Broke,
                        ));
                    }
                }
            }
            Event::UdpFlowClose { flow_id } => {
                link.flows
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&flow_id);
            }
            Event::PunchRequest { device } => self.coordinate_punch(link, &device),
            // The agent's session has ended (an Error closes it at its end): every command
            // sent from now on would fail unseen while the device looked connected.
            Event::PeerError { code, message } => {
                warn!(device = %link.device, ?code, %message, "agent reported a control error");
                return Some((
                    format!("agent reported a control error: {message}"),
                    SessionEnd::Ended,
                ));
            }
            other => debug!(device = %link.device, event = ?other, "control event ignored"),
        }
        None
    }

    /// A peer offered a zone.json: adopt it if newer and valid, push it to every agent, and
    /// drop connections of devices it revokes.
    fn adopt_zone(&self, bytes: &[u8], from: &str) {
        if let Err(e) = self.adopt_zone_from(bytes, from) {
            // Offered in every hello: a device reconnecting in a loop with a bad one would
            // otherwise write a line per connection.
            if let Some(unlogged) = LogBudget::take_shared(&self.0.refused_lines) {
                warn!(from = %from, error = %e, unlogged, "refused zone config offered by a device");
            }
        }
    }

    /// Disconnects the agents whose device is revoked now (`by` names what revoked it, for the
    /// line); returns the others, still connected. With `notice`, the config that revokes
    /// them goes to each first, and its connection, out of the table and taking none of its
    /// streams, is closed once the agent closed it (it stops on that config: exit 2, which
    /// systemd does not restart) or after [`REVOKED_NOTICE`]. Closed at once, a running node
    /// never got the config: refused at each handshake after, it retried for ever, shown as
    /// running.
    fn disconnect_revoked(&self, by: &str, notice: Option<Notice<'_>>) -> Vec<Arc<AgentLink>> {
        let creds = &self.0.cfg.creds;
        let (revoked, others): (Vec<_>, Vec<_>) = self
            .agents()
            .into_iter()
            .partition(|a| creds.is_revoked(&a.device));
        for a in revoked {
            warn!(device = %a.device, "device revoked by {by}: disconnecting");
            let Some(notice) = notice else {
                a.conn.close(CLOSE_REVOKED.into(), b"device revoked");
                continue;
            };
            a.revoked.cancel();
            self.forget(&a.device, a.session_id);
            // Its flows' tasks end with their senders.
            a.flows.lock().unwrap_or_else(|p| p.into_inner()).clear();
            match notice {
                Notice::Newest(serial, json) => a.ctl.send_config(serial, json.to_vec()),
                Notice::Revoking(serial, json) => a.ctl.send_revoking_config(serial, json.to_vec()),
            }
            let conn = a.conn.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = conn.closed() => {}
                    () = tokio::time::sleep(REVOKED_NOTICE) => {}
                }
                conn.close(CLOSE_REVOKED.into(), b"device revoked");
            });
        }
        others
    }

    /// A zone.json not adopted — older than the one in use (a device's, in its hello; one
    /// copied into the bundle), expired, or leaving out a revocation ([`DeviceCreds::learn_revocations`]):
    /// devices it revokes that the config in use does not are revoked here too, their
    /// connections closed, and the owner told what the zone directory lacks. A signed
    /// revocation is for good, whatever else refuses its config: one that carried the only
    /// revocation of a stolen laptop kept it served.
    fn learn_revocations(&self, bytes: &[u8], from: &str) -> Result<(), TunnelError> {
        let Some(zone) = self.0.cfg.creds.learn_revocations(bytes, from)? else {
            return Ok(());
        };
        let (serial, json) = (zone.config.serial, zone.to_json_compact());
        // Only a config older than ours goes on: a device older than a newer one (refused
        // here: expired, or leaving out a revocation) would try to adopt it, refuse it as we
        // did, and count it against the gateway as a bad offer at every session.
        let pass_on = json.len() <= crate::proto::limits::MAX_ZONE_CONFIG
            && serial < self.0.cfg.creds.zone_serial();
        // Kept before the table is read below: a session that joins the table after that
        // read takes it from here (it reads this after joining), one before is among
        // `others`. Kept after, a session joining in between got it from neither.
        if pass_on {
            let mut kept = self
                .0
                .learned_from
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if kept.len() >= MAX_LEARNED_FROM {
                kept.pop_front();
            }
            kept.push_back((serial, json.clone()));
        }
        let others = self.disconnect_revoked(
            "a zone config not adopted",
            pass_on.then_some(Notice::Revoking(serial, &json)),
        );
        // Their direct paths too: the permits the devices they reached hold for them, and,
        // as no new serial goes out, the config itself, which each device (older than its
        // own) takes the revocations from: its direct connections to them close.
        self.forget_non_members();
        if pass_on {
            for a in others {
                a.ctl.send_revoking_config(serial, json.clone());
            }
        }
        Ok(())
    }

    /// Devices revoked or no longer listed (or whose certificate ended) leave the mesh: the
    /// permits others hold for them are revoked while their pairs are still known, then the
    /// pairs go from the mesh table (and `/status`): kept, they stayed listed for good.
    fn forget_non_members(&self) {
        self.revoke_refused_permits();
        let creds = &self.0.cfg.creds;
        self.0
            .mesh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(a, b), _| {
                creds.noise_public_of(a).is_ok() && creds.noise_public_of(b).is_ok()
            });
    }

    /// The zone.json file in this gateway's bundle changed (the owner copied a new one in,
    /// e.g. after `device revoke`): adopt it like one a device offers. One that is not
    /// adopted changes nothing ([`DeviceCreds::not_adopted_from_bundle`] for the file).
    pub fn adopt_zone_file(&self, bytes: &[u8], path: &std::path::Path) {
        let from = path.display().to_string();
        let current = self.0.cfg.creds.zone_serial();
        let error = match self.adopt_zone_from(bytes, &from) {
            Ok(Some(_)) => return,
            Ok(None) => None,
            Err(e) => Some(e),
        };
        let creds = &self.0.cfg.creds;
        creds.not_adopted_from_bundle(bytes, &from, current, error.as_ref());
    }

    /// Adopts `bytes` if newer and valid: pushes it to every agent and drops the connections
    /// of devices it revokes. The new serial when adopted.
    fn adopt_zone_from(&self, bytes: &[u8], from: &str) -> Result<Option<u64>, TunnelError> {
        let creds = &self.0.cfg.creds;
        let was_revoked = creds.is_revoked(creds.name());
        let adopted = creds.offer_zone(bytes);
        if !matches!(adopted, Ok(Some(_))) {
            // Its refusal is told by the caller; what else keeps it from being read is too.
            let _ = self.learn_revocations(bytes, from);
        }
        match adopted? {
            Some(serial) => {
                info!(serial, from = %from, "adopted newer zone config");
                // Its agents leave it and new ones are refused from now on; a restart refuses
                // to start. Said once (by the config that revokes it), with what to do, instead
                // of only refusals.
                if !was_revoked && creds.is_revoked(creds.name()) {
                    error!(serial, from = %from, device = %creds.name(), "the adopted zone config revokes this gateway: agents leave it and a restart refuses to start; to keep a gateway here, add it under a new name on the machine holding the zone key (`zonegate device add NEWNAME --role gateway --public-addr IP:PORT`) and install that bundle");
                }
                self.forget_non_members();
                let json = creds.zone().to_json_compact();
                for a in self
                    .disconnect_revoked("the new zone config", Some(Notice::Newest(serial, &json)))
                {
                    a.ctl.send_config(serial, json.clone());
                }
                Ok(Some(serial))
            }
            None => Ok(None),
        }
    }

    /// Streams opened by an agent: mesh relays, or streams to the gateway's own services.
    async fn accept_streams(self, link: Arc<AgentLink>) {
        // Agents start with a small stream allowance (memory per idle agent) that grows while
        // they relay and forward, up to MAX_STREAMS_PER_CONNECTION.
        let budget = StreamBudget::new(link.conn.clone(), MAX_STREAMS_PER_CONNECTION);
        loop {
            let (send, recv) = match link.conn.accept_bi().await {
                Ok(s) => s,
                Err(_) => return,
            };
            if self.is_draining() {
                // In its own task: a device that grants the stream no credit must not hold
                // this accept loop for the refusal's timeout.
                let mut send = send;
                self.0.work.spawn(async move {
                    stream::refuse(&mut send, RefuseCode::Draining, "gateway is shutting down")
                        .await;
                });
                continue;
            }
            // Its connection waits only for the config that revokes it to arrive.
            if link.revoked.is_cancelled() {
                let mut send = send;
                self.0.work.spawn(async move {
                    stream::refuse(
                        &mut send,
                        RefuseCode::PolicyDenied,
                        "this device is revoked",
                    )
                    .await;
                });
                continue;
            }
            let hub = self.clone();
            let link = link.clone();
            let slot = budget.admit();
            self.0.work.spawn(async move {
                hub.serve_agent_stream(link, send, recv).await;
                drop(slot);
            });
        }
    }

    async fn serve_agent_stream(
        &self,
        link: Arc<AgentLink>,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let header = match tokio::time::timeout(
            self.0.cfg.tuning.open_timeout,
            stream::read_header(&mut recv),
        )
        .await
        {
            Ok(Ok((h, rest))) => (h, rest),
            Ok(Err(e)) => {
                if let Some(unlogged) = LogBudget::take_shared(&link.lines) {
                    warn!(device = %link.device, error = %e, unlogged, "bad stream header from agent");
                }
                stream::refuse(&mut send, RefuseCode::BadRequest, &e.to_string()).await;
                return;
            }
            Err(_) => {
                if let Some(unlogged) = LogBudget::take_shared(&link.lines) {
                    warn!(device = %link.device, unlogged, "stream from agent given up: its header did not arrive in time");
                }
                stream::refuse(&mut send, RefuseCode::BadRequest, "stream header timed out").await;
                return;
            }
        };
        // Accepted before its device was revoked, its header sent after.
        if link.revoked.is_cancelled() {
            stream::refuse(
                &mut send,
                RefuseCode::PolicyDenied,
                "this device is revoked",
            )
            .await;
            return;
        }
        let (to_device, service, rest) = match header {
            (
                StreamHeader::Relay {
                    to_device, service, ..
                },
                rest,
            ) => (to_device, service, rest),
            (StreamHeader::Open { service, .. }, rest) => {
                (self.0.cfg.creds.name().to_owned(), service, rest)
            }
            (StreamHeader::Control, _) => {
                stream::refuse(
                    &mut send,
                    RefuseCode::BadRequest,
                    "only one control stream per connection",
                )
                .await;
                return;
            }
        };
        let started = Instant::now();
        let active = self.0.cfg.policy.current();
        let decision = active.policy.decide_mesh(
            &link.device,
            &link.roles,
            &to_device,
            &service,
            Timestamp::now(),
        );
        let app = match (decision.app, decision.decision.is_allow()) {
            (Some(app), true) => app,
            (app, _) => {
                let why = match app {
                    None => format!("no mesh app allows {to_device}/{service}"),
                    Some(a) => format!("app {}: {}", a.name, decision.decision),
                };
                if let (Some(a), policies::Decision::Deny { reason }) = (app, decision.decision) {
                    active
                        .state(a)
                        .counters
                        .refused(policies::accounting::Refusal::Denied(reason));
                }
                let to = format!("{to_device}/{service}");
                let what = format!("{to} {why}");
                if let Some((repeats, unlogged)) =
                    Repeats::take_both(&link.repeats, &link.lines, &what)
                {
                    info!(from = %link.device, to = %to, reason = %why, repeats, unlogged, "mesh stream refused");
                }
                stream::refuse(&mut send, RefuseCode::PolicyDenied, &why).await;
                return;
            }
        };
        let counters = active.state(app).counters.clone();
        let app_name = app.name.clone();
        drop(active);
        let origin = Origin::Device {
            name: link.device.clone(),
            addr: Some(canonical(link.conn.remote_address())),
        };
        let mut upstream = match self.connect(&to_device, &service, &app_name, origin).await {
            Ok(u) => u,
            Err(e) => {
                counters.failed(failure_of(&e));
                let (code, reason) = refusal_of(&e);
                // Budgeted: a device opening streams to a peer that is away fails each at once.
                let to = format!("{to_device}/{service}");
                let what = format!("{to} {reason}");
                if let Some((repeats, unlogged)) =
                    Repeats::take_both(&link.repeats, &link.lines, &what)
                {
                    info!(from = %link.device, to = %to, app = %app_name, reason = %reason, repeats, unlogged, "mesh stream failed");
                }
                stream::refuse(&mut send, code, &reason).await;
                return;
            }
        };
        if !stream::accept(&mut send, self.0.cfg.tuning.open_timeout).await {
            // The opener is gone (its own open timed out, or it reset): the target's service
            // is told so by a reset, not a clean end of an empty request.
            crate::splice::End::abort(&mut upstream);
            if let Some(unlogged) = LogBudget::take_shared(&link.lines) {
                info!(from = %link.device, to = %format!("{to_device}/{service}"), app = %app_name, unlogged, "mesh stream given up: the opener left before it was accepted");
            }
            return;
        }
        counters.connection();
        let mut down = QuicStream::new(send, recv, rest).watched(&link.holds, &app_name, &service);
        let relayed = to_device != self.0.cfg.creds.name();
        if relayed {
            self.mesh_pair(&link.device, &to_device, |p| {
                p.streams += 1;
                p.last_relay = Some(Instant::now());
                // Allowed (again): a later refusal is revoked (again).
                let _ = p.may_permit(&service, true);
                if !p.services.contains(&service) {
                    if p.services.len() >= PAIR_SERVICES {
                        p.services.remove(0);
                    }
                    p.services.push(service.clone());
                }
            });
        }
        let acked = (down.acked(), upstream.acked());
        // Test hook: what a relay forwards between devices (end to end encrypted).
        let tap = relayed
            .then(|| self.0.tap.read().unwrap_or_else(|p| p.into_inner()).clone())
            .flatten();
        let (mut a, mut b) = (
            Tapped {
                inner: &mut down,
                tap: tap.clone(),
            },
            Tapped {
                inner: &mut upstream,
                tap,
            },
        );
        // Decided once as it opened; asked again whenever the policy or the minute changes.
        let policy = self.0.cfg.policy.clone();
        let refused = policy.until_mesh_refused(&link.device, &link.roles, &to_device, &service);
        // And cut as its device is revoked (its connection waits a moment for the notice).
        let revoked = link.revoked.clone();
        let stop = async move {
            tokio::select! {
                why = refused => why,
                () = revoked.cancelled() => "the device is revoked".to_owned(),
            }
        };
        let (mut a, mut b) = crate::splice::counted(&mut a, &mut b, &counters);
        let moved = splice_until(&mut a, &mut b, stop).await;
        let (up, dn) = (moved.a_to_b, moved.b_to_a);
        if relayed {
            self.mesh_pair(&link.device, &to_device, |p| {
                p.bytes_up += up;
                p.bytes_down += dn;
            });
        }
        link.bytes_from.fetch_add(up, Ordering::Relaxed);
        link.bytes_to.fetch_add(dn, Ordering::Relaxed);
        let ms = started.elapsed().as_millis() as u64;
        let clean = moved.is_clean();
        match moved.stopped {
            Some(why) => {
                info!(app = %app_name, from = %link.device, to = %format!("{to_device}/{service}"), bytes_up = up, bytes_down = dn, ms, reason = %why, "mesh connection cut: the policy no longer allows it")
            }
            None => {
                info!(app = %app_name, from = %link.device, to = %format!("{to_device}/{service}"), bytes_up = up, bytes_down = dn, ms, "mesh connection done")
            }
        }
        // As a tcp app's connection: both devices get the tails of what was passed on before a
        // drain's close of the endpoint throws them away.
        if clean {
            let (to_origin, to_target) = acked;
            let both = async move {
                match to_target {
                    Some(t) => drop(tokio::join!(to_origin, t)),
                    None => to_origin.await,
                }
            };
            crate::stream::until_acked(both, crate::stream::ACK_WAIT).await;
        }
    }

    /// Connects to `service` on `device`: through its tunnel, or locally when `device` is this
    /// gateway. `app` and `origin` travel in the stream header for the device's logs.
    pub async fn connect(
        &self,
        device: &str,
        service: &str,
        app: &str,
        origin: Origin,
    ) -> Result<Upstream, OpenError> {
        self.connect_with(device, service, app, origin, false).await
    }

    /// Like [`Hub::connect`], without waiting for the device's reply to the tunnel stream
    /// ([`stream::open_early`]): the caller's first bytes go out with the stream header. A
    /// refusal by the device then shows as a read error, with the reason in
    /// [`Upstream::refused`]. For splices, whose client gets a reset either way.
    pub async fn connect_early(
        &self,
        device: &str,
        service: &str,
        app: &str,
        origin: Origin,
    ) -> Result<Upstream, OpenError> {
        self.connect_with(device, service, app, origin, true).await
    }

    async fn connect_with(
        &self,
        device: &str,
        service: &str,
        app: &str,
        origin: Origin,
        early: bool,
    ) -> Result<Upstream, OpenError> {
        if device == self.0.cfg.creds.name() {
            return match self
                .0
                .cfg
                .local
                .connect_tcp(service, self.0.cfg.tuning.tcp_keepalive)
                .await
            {
                Ok(s) => Ok(Upstream::Tcp(s)),
                Err((code, reason)) => Err(OpenError::Refused {
                    device: device.to_owned(),
                    code,
                    reason,
                }),
            };
        }
        let link = self.agent(device).ok_or_else(|| self.absent(device))?;
        link.offers(service, ServiceProto::Tcp)?;
        let header = StreamHeader::Open {
            app: app.to_owned(),
            service: service.to_owned(),
            origin,
        };
        let timeout = self.0.cfg.tuning.open_timeout;
        let s = stream::open_with(
            &link.conn,
            device,
            &header,
            timeout,
            early.then_some(&link.early),
        )
        .await?;
        link.streams.fetch_add(1, Ordering::Relaxed);
        let meter = stream::StreamMeter {
            sent: link.bytes_to.clone(),
            received: link.bytes_from.clone(),
        };
        Ok(Upstream::Quic(Box::new(s.metered(meter).watched(
            &link.holds,
            app,
            service,
        ))))
    }

    /// Opens a UDP flow to `service` on `device`; datagrams from the service arrive on the
    /// returned receiver. Dropping the [`UdpFlow`] closes it.
    pub async fn open_udp_flow(
        &self,
        device: &str,
        service: &str,
        app: &str,
        origin: Origin,
    ) -> Result<(UdpFlow, mpsc::Receiver<Bytes>), OpenError> {
        if device == self.0.cfg.creds.name() {
            return self.open_local_udp_flow(service);
        }
        let link = self.agent(device).ok_or_else(|| self.absent(device))?;
        link.offers(service, ServiceProto::Udp)?;
        let (id_tx, mut id_rx) = oneshot::channel();
        let (tx, rx) = mpsc::channel(UDP_FLOW_QUEUE);
        let drops = Arc::new(AtomicU64::new(0));
        let (app, service2, link2, drops2) = (
            app.to_owned(),
            service.to_owned(),
            link.clone(),
            drops.clone(),
        );
        // Never wait on a stuck control stream: the caller is a UDP listener serving every
        // client of the app, so a full queue is "overloaded", not a reason to stop reading.
        // The flow enters the table as its id is taken, on the session loop: a close the agent
        // sends back at once (no such UDP service) is handled on that loop too, so it always
        // finds the flow.
        let queued = link.ctl.try_apply(move |s| {
            let id = s.open_udp_flow(app, service2, origin)?;
            link2
                .flows
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, (tx, drops2));
            if id_tx.send(id).is_err() {
                // The caller gave up waiting: nobody will hold this flow, close it now.
                link2
                    .flows
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                s.close_udp_flow(id)?;
            }
            Ok(())
        });
        let overloaded = || OpenError::Refused {
            device: device.to_owned(),
            code: RefuseCode::Overloaded,
            reason: "no UDP flow available on this tunnel".into(),
        };
        if !queued {
            return Err(overloaded());
        }
        let flow_id = match tokio::time::timeout(self.0.cfg.tuning.open_timeout, &mut id_rx).await {
            Ok(Ok(id)) => id,
            Ok(Err(_)) => return Err(overloaded()),
            Err(_) => {
                // The id may have arrived just as the timeout fired: close that flow.
                id_rx.close();
                if let Ok(flow_id) = id_rx.try_recv() {
                    drop(UdpFlow {
                        end: FlowEnd::Tunnel { link, flow_id },
                        drops,
                    });
                }
                return Err(OpenError::Timeout(device.to_owned()));
            }
        };
        Ok((
            UdpFlow {
                end: FlowEnd::Tunnel { link, flow_id },
                drops,
            },
            rx,
        ))
    }

    /// A flow to a UDP service of the gateway's own device: a socket connected to it, whose
    /// datagrams a task hands to the receiver until the flow is dropped (or the socket
    /// fails). Idle time is the caller's to judge, as for a flow through a tunnel.
    fn open_local_udp_flow(
        &self,
        service: &str,
    ) -> Result<(UdpFlow, mpsc::Receiver<Bytes>), OpenError> {
        let device = self.0.cfg.creds.name();
        let sock = self
            .0
            .cfg
            .local
            .connect_udp(service)
            .map_err(|(code, reason)| OpenError::Refused {
                device: device.to_owned(),
                code,
                reason,
            })?;
        let sock = Arc::new(sock);
        let (tx, rx) = mpsc::channel(UDP_FLOW_QUEUE);
        let drops = Arc::new(AtomicU64::new(0));
        let reader = tokio::spawn({
            let (sock, drops) = (sock.clone(), drops.clone());
            let service = service.to_owned();
            async move {
                loop {
                    if sock.readable().await.is_err() {
                        return;
                    }
                    // Into the thread's buffer, copied out: one of 64 KiB per flow held
                    // 256 MiB at 4,096 flows (the agent's flows learnt it first).
                    let got = LOCAL_FLOW_BUF.with(|b| {
                        let mut b = b.borrow_mut();
                        sock.try_recv(&mut b[..])
                            .map(|n| Bytes::copy_from_slice(&b[..n]))
                    });
                    match got {
                        // As from a tunnel: a reader behind drops datagrams, as UDP may.
                        Ok(d) => match tx.try_send(d) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                drops.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => return,
                        },
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) if crate::sockets::icmp_transient(&e) => {}
                        // Said here: the flow then ends as if the device had closed it.
                        Err(e) => {
                            warn!(%service, error = %e, "UDP flow to this gateway's own service ended: its socket failed");
                            return;
                        }
                    }
                }
            }
        });
        Ok((
            UdpFlow {
                end: FlowEnd::Local {
                    sock,
                    reader,
                    device: device.to_owned(),
                },
                drops,
            },
            rx,
        ))
    }

    async fn read_datagrams(self, link: Arc<AgentLink>) {
        while let Ok(d) = link.conn.read_datagram().await {
            let Ok((flow, payload)) = proto::decode_datagram_bytes(d) else {
                debug!(device = %link.device, "undecodable datagram dropped");
                continue;
            };
            let tx = link
                .flows
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&flow)
                .cloned();
            if let Some((tx, drops)) = tx {
                link.bytes_from
                    .fetch_add(payload.len() as u64, Ordering::Relaxed);
                // A reader behind drops datagrams, as UDP may; the flow's done line counts them.
                if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(payload) {
                    drops.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Snapshot of connected agents for `/status`.
    pub fn status(&self) -> Vec<AgentStatus> {
        self.agents()
            .iter()
            .map(|a| {
                let st = a.conn.stats();
                AgentStatus {
                    device: a.device.clone(),
                    roles: a.roles.iter().map(|r| r.to_string()).collect(),
                    addr: canonical(a.conn.remote_address()).to_string(),
                    local_addrs: a
                        .local_addrs
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .map(|x| x.to_string())
                        .collect(),
                    session: a.session_id,
                    rtt_ms: a.conn.rtt().as_secs_f64() * 1000.0,
                    path_mtu: st.path.current_mtu,
                    uptime_secs: a.started.elapsed().as_secs(),
                    since_unix: a
                        .since
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                    cert_not_after_unix: a.cert_not_after.unix_timestamp(),
                    streams: a.streams.load(Ordering::Relaxed),
                    zone_offers: a.zone_offers.load(Ordering::Relaxed),
                    zone_offers_refused: a.refused_offers.load(Ordering::Relaxed),
                    streams_cut: a.holds.cut_count(),
                    window_lent: a.holds.window_lent(),
                    bytes_to: a.bytes_to.load(Ordering::Relaxed),
                    bytes_from: a.bytes_from.load(Ordering::Relaxed),
                    udp_tx: st.udp_tx.bytes,
                    udp_rx: st.udp_rx.bytes,
                    udp_tx_datagrams: st.udp_tx.datagrams,
                    udp_rx_datagrams: st.udp_rx.datagrams,
                    ack_frames_tx: st.frame_tx.acks,
                    ack_frames_rx: st.frame_rx.acks,
                    stream_frames_tx: st.frame_tx.stream,
                    stream_frames_rx: st.frame_rx.stream,
                    services: a
                        .services
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .map(|s| ServiceStatus {
                            name: s.name.clone(),
                            proto: format!("{:?}", s.proto).to_lowercase(),
                        })
                        .collect(),
                    mesh: self.mesh_status(&a.device),
                }
            })
            .collect()
    }
}

/// A UDP flow to a service: through an agent's tunnel, or to one of the gateway's own.
#[derive(Debug)]
pub struct UdpFlow {
    end: FlowEnd,
    /// Datagrams from the service dropped because the flow's reader was behind.
    drops: Arc<AtomicU64>,
}

#[derive(Debug)]
enum FlowEnd {
    Tunnel {
        link: Arc<AgentLink>,
        flow_id: u32,
    },
    /// A service of the gateway's own device ([`Hub::open_local_udp_flow`]).
    Local {
        sock: Arc<tokio::net::UdpSocket>,
        reader: tokio::task::JoinHandle<()>,
        device: String,
    },
}

thread_local! {
    /// Where a local flow's datagram is read (any UDP datagram fits), then copied out.
    static LOCAL_FLOW_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 65_536]);
}

impl UdpFlow {
    /// Sends one datagram to the service. Fails if the connection is gone or the datagram is
    /// larger than the path allows.
    pub fn send(&self, payload: &[u8]) -> Result<(), TunnelError> {
        match &self.end {
            FlowEnd::Tunnel { link, flow_id } => {
                crate::flow_datagram::send(&link.conn, *flow_id, payload)?;
                link.bytes_to
                    .fetch_add(payload.len() as u64, Ordering::Relaxed);
                Ok(())
            }
            // On the socket itself: tokio's `try_send` refuses a fresh socket until the
            // reactor has seen it writable (the agent's flows lost first datagrams so). One
            // the kernel refuses is dropped, as UDP may.
            FlowEnd::Local { sock, .. } => socket2::SockRef::from(&**sock)
                .send(payload)
                .map(drop)
                .map_err(|e| TunnelError::Datagram(format!("to the local service: {e}"))),
        }
    }
    /// Datagrams from the service dropped because the flow's reader was behind (more than
    /// [`UDP_FLOW_QUEUE`] waiting).
    pub fn queue_drops(&self) -> u64 {
        self.drops.load(Ordering::Relaxed)
    }

    pub fn device(&self) -> &str {
        match &self.end {
            FlowEnd::Tunnel { link, .. } => &link.device,
            FlowEnd::Local { device, .. } => device,
        }
    }
    /// False once the connection is gone or the agent closed the flow (its service socket
    /// failed, or it was idle there) — for a local service, once its socket failed: the
    /// caller opens a new flow for the next datagram instead of sending into one nobody
    /// reads.
    pub fn is_alive(&self) -> bool {
        match &self.end {
            FlowEnd::Tunnel { link, flow_id } => {
                link.conn.close_reason().is_none()
                    && link
                        .flows
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains_key(flow_id)
            }
            FlowEnd::Local { reader, .. } => !reader.is_finished(),
        }
    }
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        match &self.end {
            FlowEnd::Tunnel { link, flow_id } => {
                link.flows
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(flow_id);
                // Not through the bounded command queue: a close lost there would leave the
                // agent's socket open and the id taken for the rest of the session.
                link.ctl.close_udp_flow(*flow_id);
            }
            FlowEnd::Local { reader, .. } => reader.abort(),
        }
    }
}

/// How an app counts an [`OpenError`] (`/status`, `/metrics`).
pub fn failure_of(e: &OpenError) -> policies::accounting::Failure {
    use policies::accounting::Failure;
    match e {
        OpenError::Offline(_) => Failure::DeviceOffline,
        OpenError::NotInZone(_) | OpenError::Revoked(_) => Failure::NoSuchDevice,
        OpenError::Timeout(_) => Failure::Timeout,
        OpenError::Tunnel { .. } => Failure::Tunnel,
        OpenError::Refused { code, .. } => match code {
            RefuseCode::NoSuchService => Failure::NoSuchService,
            RefuseCode::ServiceUnreachable => Failure::ServiceUnreachable,
            RefuseCode::DeviceOffline => Failure::DeviceOffline,
            RefuseCode::Draining => Failure::DeviceStopping,
            _ => Failure::RefusedByDevice,
        },
    }
}

/// Refusal code and words for an [`OpenError`], to pass on to whoever asked.
pub fn refusal_of(e: &OpenError) -> (RefuseCode, String) {
    match e {
        OpenError::Offline(d) => (RefuseCode::DeviceOffline, format!("device {d} is offline")),
        OpenError::NotInZone(d) => (
            RefuseCode::DeviceOffline,
            format!("device {d} is not in the zone config"),
        ),
        OpenError::Revoked(d) => (
            RefuseCode::DeviceOffline,
            format!("device {d} is revoked in the zone config"),
        ),
        OpenError::Refused { code, reason, .. } => (*code, reason.clone()),
        OpenError::Timeout(d) => (
            RefuseCode::ServiceUnreachable,
            format!("device {d} did not answer in time"),
        ),
        OpenError::Tunnel { device, source } => (
            RefuseCode::DeviceOffline,
            format!("tunnel to {device}: {source}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log line names a device's first services and how many in all, however many it has.
    #[test]
    fn service_lists_are_summed_up_in_a_bounded_line() {
        assert_eq!(services_summary(std::iter::empty()), "[]");
        assert_eq!(services_summary(["dfs", "etcd"].into_iter()), "[dfs, etcd]");
        let many: Vec<String> = (0..256).map(|i| format!("{i:0>63}")).collect();
        let line = services_summary(many.iter().map(String::as_str));
        assert!(line.ends_with(", … 256 in all]"), "{line}");
        assert!(line.len() < 600, "{} bytes", line.len());
    }
}
