//! The node agent: dials every gateway of the zone, keeps each connection up (keep-alives,
//! jittered backoff, migration), serves the device's named services on streams the gateway
//! opens, carries UDP flows, and runs local forwards into the mesh.
//!
//! Mesh forwards go direct when a hole-punched QUIC connection to the peer is up and the peer
//! has a gateway-approved permit for the service ([`crate::peers`]); otherwise they are relayed
//! by a gateway and encrypted end to end with Noise ([`crate::e2e`]), so the gateway only
//! forwards ciphertext. The agent's one endpoint dials the gateways and also accepts peers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::admit::{GateStats, HandshakeGate};
use crate::backoff::Backoff;
use crate::control::{self, ControlHandle, ControlIo};
use crate::creds::{DeviceCreds, Standing};
use crate::e2e;
use crate::error::{OpenError, TunnelError};
use crate::flow_activity::FlowActivity;
use crate::flow_table::FlowTable;
use crate::holds::{HoldClock, Holds};
use crate::log_budget::{LogBudget, Repeats};
use crate::peers::{peer_identity, PeerConn, Peers};
use crate::proto::{
    self, ControlSession, Event, Hello, Origin, PeerAddr, RefuseCode, StreamHeader, UdpFlowOpen,
};
use crate::services::LocalServices;
use crate::splice::{splice, splice_until};
use crate::status::{LinkStatus, PeerStatus};
use crate::stream::{self, QuicStream};
use crate::transport::{
    self, StreamBudget, Tuning, MAX_STREAMS_PER_CONNECTION, MAX_STREAMS_TO_AGENT, MAX_UDP_PAYLOAD,
};
use crate::window_loan::WindowPool;

/// First reconnect delay and its cap: quick recovery from a blip, no hammering of a gateway
/// that is down.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A connection that lasted this long counts as healthy: the next failure starts backoff over.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// Read buffer of a UDP flow's socket: one byte more than the largest datagram payload a
/// tunnel carries ([`MAX_UDP_PAYLOAD`]), so a longer datagram shows as a full buffer. Each open
/// flow keeps one; at 64 KiB the 4,096 flows a gateway may open took 256 MiB.
const FLOW_READ: usize = MAX_UDP_PAYLOAD as usize + 1;
/// How often the bundle's zone.json is checked for a newer copy (as the gateway does).
const ZONE_POLL: Duration = Duration::from_millis(500);
/// The longest drain a gateway may ask of this agent: the longest `grace_secs` a gateway
/// takes (an hour).
const MAX_GATEWAY_DRAIN: Duration = Duration::from_secs(3600);
/// How often a session looks its LAN address up again ([`LanReport`]): a route lookup, no
/// packet sent.
const LAN_RECHECK: Duration = Duration::from_secs(10);
/// Connections one forward serves at once ([`Agent::forward_loop`]).
pub const MAX_FORWARD_CONNECTIONS: usize = 1024;
/// Longest UDP flow idle time a gateway's `UdpFlowIdle` sets (the setting's own bound).
const MAX_UDP_FLOW_IDLE: Duration = Duration::from_secs(86_400);
/// App name an agent puts in a Relay header: the gateway decides the real app by policy.
const RELAY_APP: &str = "mesh";
/// Peer handshakes in flight at once, and the count above which unvalidated peers get a
/// Retry first. A zone has a handful of devices, and each punching round dials a peer a few
/// times at most, so these leave ample room for every legitimate peer.
pub const MAX_PEER_HANDSHAKES: usize = 64;
pub const PEER_RETRY_ABOVE: usize = 8;
/// Peer handshakes in flight from one address (IPv6 /64; an IPv4 /24 or IPv6 /48 four times as many) not yet
/// validated, and validated ones ([`AddressSlots`]): a peer dials one attempt at a time; a
/// host that stalled handshakes from its one address would otherwise hold all
/// [`MAX_PEER_HANDSHAKES`] slots for the handshake timeout each, and every real peer's hole
/// punching would fail. More validated ones, for peers behind one NAT address.
///
/// [`AddressSlots`]: crate::admit::AddressSlots
pub const PEER_HANDSHAKES_PER_ADDRESS: usize = 4;
pub const PEER_VALIDATED_PER_ADDRESS: usize = 8;

/// A local port that reaches `device/service` through the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub listen: SocketAddr,
    pub device: String,
    pub service: String,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub creds: Arc<DeviceCreds>,
    pub services: Arc<LocalServices>,
    pub forwards: Vec<Forward>,
    /// (gateway device name, address) to dial; empty means "the gateways of zone.json".
    pub gateways: Vec<(String, SocketAddr)>,
    pub tuning: Tuning,
}

#[derive(Debug, Default)]
struct LinkState {
    conn: Option<Connection>,
    draining: bool,
    observed: Option<SocketAddr>,
    last_error: Option<String>,
    /// Control session of the current connection (punch requests go through it).
    ctl: Option<ControlHandle>,
    /// UDP flows of the current connection.
    flows: Option<Flows>,
    /// When the current connection's hello was answered.
    up_since: Option<Instant>,
    /// The address of the current (or last good) connection: dialed first next time.
    addr: Option<SocketAddr>,
    /// When the link was last lost after being up (None: never up). Failed redials, and
    /// sessions after a loss that lasted less than [`HEALTHY_AFTER`] (a gateway closing each
    /// at once: for permits, an outage goes on), do not move it.
    down_since: Option<Instant>,
    /// The gateway's addresses from the zone config, in its order (a newer config may change
    /// them: the next dial uses the new ones).
    addrs: Vec<SocketAddr>,
    /// The last session was closed by the gateway for a newer connection of this device's
    /// identity, made by another agent: its backoff is not reset, so the two take turns
    /// slower.
    replaced: bool,
    /// A gateway closed a session because this device is revoked (its zone config says so;
    /// this device's may not yet): until a session is welcomed again, retries say so and wait
    /// the longest backoff.
    revoked: bool,
    /// The gateway refused this device's certificate as revoked after this agent had
    /// finished its side of the handshake: the refusal came under keys only the gateway it
    /// verified holds, not from anyone on the path (an unauthenticated packet could say so
    /// too before that). Once every gateway link says so, the agent stops for good.
    refused_as_revoked: bool,
    /// How long the gateway of the current session keeps a quiet UDP flow (`UdpFlowIdle`;
    /// None from a gateway that does not say).
    udp_flow_idle: Option<Duration>,
    /// Zone configs the current session offered that did not verify
    /// ([`crate::hub::MAX_REFUSED_OFFERS`] end it).
    refused_offers: u32,
    /// Zone configs older than ours the current session sent ([`MAX_OLDER_OFFERS`]).
    older_offers: u32,
}

/// How a dial ended, for the hint its retry line carries.
#[derive(Debug, Clone, Copy)]
enum DialEnd {
    /// The handshake and hello timed out: nothing answered.
    NoAnswer,
    Other,
}

/// Zone configs older than ours a gateway sends in one session without counting against it:
/// the configs it learned revocations from, at most [`crate::control::MAX_REVOKING_CONFIGS`]
/// at its session's start and one per revocation learned later, with room to spare. Each costs
/// a parse; past this, each counts as a refused offer.
const MAX_OLDER_OFFERS: u32 = 4 * crate::control::MAX_REVOKING_CONFIGS as u32;

impl LinkState {
    /// When a link that is not usable now (`now`) was lost: now if it is connected (draining),
    /// else when its last session that counts ended; None if it was never up.
    fn lost_at(&self, now: Instant) -> Option<Instant> {
        match self.conn {
            Some(_) => Some(now),
            None => self.down_since,
        }
    }

    /// The current session is over (ended, or dropped with its retired link): no connection,
    /// control session or flows. When it came up (if it did) and its flows. The link is lost
    /// from now if the session had come up, the first time or for [`HEALTHY_AFTER`]; a dial
    /// that failed, or a session the gateway closed at once (draining, replaced), does not
    /// move the time it was lost: direct paths outlive their permits during an outage by when
    /// the gateways were lost ([`Agent::gateways_lost_at`]), and a retry every 30 s made that
    /// "just now" for ever, so they stopped taking new streams 15 minutes in.
    fn session_over(&mut self) -> (Option<Instant>, Option<Flows>) {
        self.conn = None;
        self.ctl = None;
        self.draining = false;
        let up_since = self.up_since.take();
        if let Some(up) = up_since {
            if self.down_since.is_none() || up.elapsed() >= HEALTHY_AFTER {
                self.down_since = Some(Instant::now());
            }
        }
        (up_since, self.flows.take())
    }
}

/// What a gateway refusing this device as revoked means, and what to do.
const REVOKED_HELP: &str = "this device is revoked in the zone config and will not be let in again (a revoked name cannot come back). To bring this machine back, add it as a device under a new name on the machine holding the zone key (`zonegate device add NEWNAME`) and install that bundle here";

/// Whether a dial failed because the gateway's TLS refused this device's certificate as
/// revoked (alert certificate_revoked, 44, as QUIC's crypto error 0x12c): the gateway's zone
/// config revokes this device, while this device's own may not say so yet.
fn refused_as_revoked(e: &quinn::ConnectionError) -> bool {
    const CERTIFICATE_REVOKED: u8 = 44;
    matches!(
        e,
        quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code == quinn::TransportErrorCode::crypto(CERTIFICATE_REVOKED)
    )
}

/// Stops every flow of a session: their tasks end and their sockets close.
fn stop_flows(flows: &Flows) {
    for (_, f) in flows.lock().unwrap_or_else(|p| p.into_inner()).drain() {
        f.stop.cancel();
    }
}

/// One gateway as this agent sees it: one connection, whichever of its addresses answers
/// (a gateway with an IPv4 and an IPv6 address, or two, is one device: a link per address
/// had two connections replace each other at the hub, over and over).
#[derive(Debug)]
pub struct GatewayLink {
    pub name: String,
    state: Mutex<LinkState>,
    connects: AtomicU64,
    /// Cancelled when a newer zone config no longer lists this gateway (or revokes it): its
    /// loop ends and its connection closes.
    stop: CancellationToken,
    /// Signalled when a newer zone config gives the gateway new addresses: a link that is
    /// not connected dials them at once.
    redial: tokio::sync::Notify,
}

impl GatewayLink {
    fn new(name: String, addrs: Vec<SocketAddr>) -> Self {
        GatewayLink {
            name,
            state: Mutex::new(LinkState {
                addrs,
                ..LinkState::default()
            }),
            connects: AtomicU64::new(0),
            stop: CancellationToken::new(),
            redial: tokio::sync::Notify::new(),
        }
    }

    /// The gateway's addresses, in the zone config's order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .addrs
            .clone()
    }

    /// Whether this link was retired (its gateway left the zone config or was revoked).
    pub fn retired(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Ends this link: its loop stops and its connection (if any) closes with `code`/`why`.
    fn retire(&self, code: u32, why: &'static [u8]) {
        self.stop.cancel();
        self.close(code, why);
    }

    /// After the loop of a retired link ended mid-session: what the session would have done on
    /// its way out (a connection set up after `retire` ran is closed here).
    fn wind_up(&self) {
        self.close(0, b"gateway left the zone");
        let (_, flows) = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .session_over();
        if let Some(flows) = flows {
            stop_flows(&flows);
        }
    }

    /// Closes the current connection, if any (the loop dials again unless retired).
    fn close(&self, code: u32, why: &[u8]) {
        let conn = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .conn
            .clone();
        if let Some(c) = conn {
            c.close(code.into(), why);
        }
    }
    fn usable(&self) -> Option<Connection> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &s.conn {
            Some(c) if !s.draining && c.close_reason().is_none() => Some(c.clone()),
            _ => None,
        }
    }
    fn ctl(&self) -> Option<ControlHandle> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ctl
            .clone()
    }
    fn set(&self, f: impl FnOnce(&mut LinkState)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The address in use (or last used), else the first listed: for logs and status.
    pub fn addr(&self) -> SocketAddr {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.addr
            .or(s.addrs.first().copied())
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Addresses to dial, in order: the last good one first, then the IPv4 ones, then the
    /// IPv6 ones, each as listed; only those the agent's socket (`local`) can reach. IPv4
    /// before IPv6: a host with IPv6 but no IPv6 route loses a whole handshake timeout on each
    /// IPv6 address tried first, and peers punch holes at the address their gateway saw, so
    /// one family for every node of a zone keeps direct paths possible.
    fn dial_order(&self, local: Option<SocketAddr>) -> Vec<SocketAddr> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let reachable = |a: &SocketAddr| local.is_none_or(|l| l.is_ipv6() || a.is_ipv4());
        // The last good address goes first only while the zone config still lists it.
        let last = s.addr.filter(|a| s.addrs.contains(a));
        let others = |v4: bool| {
            s.addrs
                .iter()
                .copied()
                .filter(move |a| a.is_ipv4() == v4 && Some(*a) != last)
        };
        last.into_iter()
            .chain(others(true))
            .chain(others(false))
            .filter(reachable)
            .collect()
    }
    pub fn status(&self) -> LinkStatus {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let up = s.conn.as_ref().filter(|c| c.close_reason().is_none());
        let addr = s.addr.or(s.addrs.first().copied());
        LinkStatus {
            gateway: self.name.clone(),
            addr: addr.map(|a| a.to_string()).unwrap_or_default(),
            state: match (up, s.draining) {
                (Some(_), false) => "up",
                (Some(_), true) => "draining",
                (None, _) => "connecting",
            }
            .into(),
            observed_addr: s.observed.map(|a| a.to_string()),
            rtt_ms: up.map(|c| c.rtt().as_secs_f64() * 1000.0),
            path_mtu: up.map(|c| c.stats().path.current_mtu),
            connects: self.connects.load(Ordering::Relaxed),
            last_error: s.last_error.clone(),
        }
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    cfg: AgentConfig,
    endpoint: Endpoint,
    links: Mutex<Links>,
    forward_listeners: Mutex<Vec<(Forward, TcpListener)>>,
    forward_bound: Vec<SocketAddr>,
    peers: Arc<Peers>,
    /// Bounds handshakes of peers dialing us: the endpoint is reachable by anyone who learns
    /// its address (a hole-punched NAT mapping, a public IP), so it gets the hub's defence.
    peer_gate: HandshakeGate,
    /// Ticks of every connection's [`Holds`], advanced by [`Agent::sweep_holds`].
    hold_clock: Arc<HoldClock>,
    /// Receive window the connections borrow while streams wait on slow local services
    /// ([`crate::holds`]).
    window_pool: Arc<WindowPool>,
    /// The held-stream watch of each connection to a gateway or peer (by connection id, with
    /// the other end's name), for the streams read from it either way; gone once nothing of
    /// the connection uses it.
    holds: Mutex<Vec<(usize, String, std::sync::Weak<Holds>)>>,
    /// Streams cut so far because the local service stopped reading them.
    streams_cut: AtomicU64,
    /// Lines a flood makes one per event of: UDP flows (refused, dropping, done; forged
    /// sources open a flow each, a thousand a second) and streams refused for a service that
    /// is down (a client retrying). Each would be a line on an SD card otherwise.
    flood_lines: Arc<Mutex<LogBudget>>,
    /// Forward connections refused the same way again (a peer away, its service down): said
    /// once a minute ([`Repeats`]).
    repeats: Mutex<Repeats>,
    /// The streams from gateways being served: a stop lets them finish first.
    streams: tokio_util::task::TaskTracker,
    /// The forwards' connections: a stop lets them finish too (an SSH session through a
    /// forward was cut at once).
    forwarded: tokio_util::task::TaskTracker,
    /// Set as a stop begins: a hello offers no services (a gateway reconnecting meanwhile
    /// must not send new streams).
    draining: std::sync::atomic::AtomicBool,
    /// Why a part of the agent failed and stopped it ([`Agent::broke`]).
    broke: Mutex<Option<String>>,
    /// A zone config this device verified revokes it: the agent stopped for good
    /// ([`Agent::revoked_self`]).
    revoked_self: Mutex<Option<String>>,
}

/// Lines a second of [`Agent::flood_lines`], as many as the gateway allows its own.
const FLOOD_LINES_PER_SECOND: u32 = 10;

/// The agent's gateway links: one per gateway of the zone config (or of
/// [`AgentConfig::gateways`]), revoked ones left out; a newer zone config adds and retires
/// links at run time ([`Agent::relink`]).
#[derive(Debug, Default)]
struct Links {
    list: Vec<Arc<GatewayLink>>,
    /// Set when `run` starts: a link added after that gets its loop from `relink`, stopped
    /// by the first token (the links' stop); a panic in it cancels the second (the agent's).
    running: Option<(CancellationToken, CancellationToken)>,
    /// When the links the zone config dropped were last usable (the latest of them; None if
    /// none was ever up): with the list emptied, or holding only links never up, the start of
    /// the outage direct paths bridge.
    retired_lost: Option<Instant>,
}

/// Who delivered a stream to this agent.
#[derive(Debug)]
enum Via {
    /// A gateway, by name: a public client, the gateway itself, or a relayed mesh stream.
    Gateway(String),
    /// A peer device over a direct connection.
    Direct { peer: String, pc: PeerConn },
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Via::Gateway(g) => write!(f, "gateway {g}"),
            Via::Direct { peer, .. } => write!(f, "peer {peer} (direct)"),
        }
    }
}

/// How a stream's bytes are carried, decided before accepting it.
#[derive(Debug)]
enum Carry {
    /// As is: from the gateway (public traffic, the gateway's own forwards).
    Plain,
    /// Relayed from device `peer`: Noise end to end, initiator must hold `key`.
    E2e { peer: String, key: [u8; 32] },
    /// Direct from `peer` (TLS-authenticated), under a permit of app `app`; `revoked` fires
    /// when the gateway revokes that permit.
    Direct {
        peer: String,
        app: String,
        revoked: CancellationToken,
    },
}

impl Agent {
    /// Binds everything up front (UDP socket, forward ports), so a bad config fails here and
    /// never half-starts.
    pub async fn bind(cfg: AgentConfig, endpoint: Endpoint) -> Result<Arc<Self>, TunnelError> {
        // Peers dial us on the socket the gateway sees, so accept on it too.
        endpoint.set_server_config(Some(transport::peer_server_config(
            &cfg.creds,
            &cfg.tuning,
        )?));
        let wanted = wanted_gateways(&cfg);
        if wanted.is_empty() {
            return Err(TunnelError::Config(if !cfg.gateways.is_empty() {
                format!("no gateway to connect to: every gateway this agent was given ({:?}) is revoked in the zone config", cfg.gateways)
            } else if zone_gateways(&cfg.creds.zone()).is_empty() {
                "no gateway to connect to: zone.json lists none (add one with `zonegate device add NAME --role gateway --public-addr IP:PORT --zone DIR` and copy the new zone.json here)".into()
            } else {
                "no gateway to connect to: zone.json revokes every gateway it lists (add a new one with `zonegate device add NAME --role gateway --public-addr IP:PORT --zone DIR` and copy the new zone.json here)".into()
            }));
        }
        let mut fl = Vec::new();
        for f in &cfg.forwards {
            let l = crate::sockets::tcp(f.listen).map_err(|e| {
                TunnelError::Config(format!(
                    "forward {} -> {}/{}: cannot listen: {e}",
                    f.listen, f.device, f.service
                ))
            })?;
            fl.push((f.clone(), l));
        }
        let links = Links {
            list: wanted
                .into_iter()
                .map(|(name, addrs)| Arc::new(GatewayLink::new(name, addrs)))
                .collect(),
            running: None,
            retired_lost: None,
        };
        let forward_bound = fl.iter().filter_map(|(_, l)| l.local_addr().ok()).collect();
        let dial = transport::peer_client_config(&cfg.creds, &cfg.tuning)?;
        let peers = Arc::new(Peers::new(cfg.creds.clone(), endpoint.clone(), dial));
        Ok(Arc::new(Agent {
            peers,
            peer_gate: HandshakeGate::with_per_address(
                "mesh peers",
                MAX_PEER_HANDSHAKES,
                PEER_RETRY_ABOVE,
                PEER_HANDSHAKES_PER_ADDRESS,
                PEER_VALIDATED_PER_ADDRESS,
            ),
            hold_clock: Arc::default(),
            window_pool: Arc::default(),
            holds: Mutex::default(),
            streams_cut: AtomicU64::new(0),
            flood_lines: Arc::new(Mutex::new(LogBudget::new(FLOOD_LINES_PER_SECOND))),
            repeats: Mutex::default(),
            streams: tokio_util::task::TaskTracker::new(),
            forwarded: tokio_util::task::TaskTracker::new(),
            draining: std::sync::atomic::AtomicBool::new(false),
            broke: Mutex::new(None),
            revoked_self: Mutex::new(None),
            cfg,
            endpoint,
            links: Mutex::new(links),
            forward_listeners: Mutex::new(fl),
            forward_bound,
        }))
    }

    /// The gateway links now, in the zone config's order.
    pub fn links(&self) -> Vec<Arc<GatewayLink>> {
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .list
            .clone()
    }

    /// A newer zone config was adopted from gateway `from`: cut the direct paths of peers it
    /// revokes, follow its gateway list, and pass it on to every other connected gateway at
    /// once — each acts on its revocations only when it learns of them, and an agent may stay
    /// connected for days.
    fn zone_adopted(self: &Arc<Self>, from: &str) {
        if self.stop_if_revoked(&format!(
            "zone config serial {}",
            self.cfg.creds.zone_serial()
        )) {
            return;
        }
        self.peers.cut_revoked();
        self.relink();
        let Some((serial, json)) = self.zone_to_pass_on() else {
            return;
        };
        for link in self.links().iter().filter(|l| l.name != from) {
            if let Some(ctl) = link.ctl() {
                ctl.send_config(serial, json.clone());
            }
        }
    }

    /// This node's zone config as a ConfigUpdate carries it: serial and compact JSON; None if
    /// too large to send (not reached: offers larger than that are refused before adoption).
    fn zone_to_pass_on(&self) -> Option<(u64, Vec<u8>)> {
        let zone = self.cfg.creds.zone();
        let json = zone.to_json_compact();
        (json.len() <= proto::limits::MAX_ZONE_CONFIG).then_some((zone.config.serial, json))
    }

    /// A zone.json the owner copied into this node's bundle while it runs
    /// ([`crate::zone_watch`]): adopted when newer and valid, as one a gateway passed on — the
    /// way to reach a zone whose gateways all moved while this node was away.
    pub fn adopt_zone_file(self: &Arc<Self>, bytes: &[u8], path: &std::path::Path) {
        let current = self.cfg.creds.zone_serial();
        let file = path.display().to_string();
        let error = match self.cfg.creds.offer_zone(bytes) {
            Ok(Some(serial)) => {
                info!(serial, file, "adopted newer zone config from the bundle");
                self.zone_adopted("");
                return;
            }
            Ok(None) => None,
            Err(e) => Some(e),
        };
        // What keeps it from being read is told by the line below.
        let _ = self.learn_revocations(bytes, &file);
        let creds = &self.cfg.creds;
        creds.not_adopted_from_bundle(bytes, &file, current, error.as_ref());
    }

    /// A zone config not adopted — older than the one in use, expired, or leaving out a
    /// revocation — may still revoke devices the one in use does not
    /// ([`DeviceCreds::learn_revocations`]): a signed revocation is for good, whatever else
    /// refuses its config. They are enforced from now on: direct paths to them cut, a
    /// gateway among them dropped. What keeps the config from being read is told by the
    /// refusal's own line.
    /// An error when the config cannot be read or does not verify (only a config revoking a
    /// device not revoked here yet is verified).
    fn learn_revocations(self: &Arc<Self>, bytes: &[u8], from: &str) -> Result<(), TunnelError> {
        if let Some(zone) = self.cfg.creds.learn_revocations(bytes, from)? {
            if self.stop_if_revoked(&format!(
                "zone config serial {} ({from})",
                zone.config.serial
            )) {
                return Ok(());
            }
            self.peers.cut_revoked();
            self.relink();
        }
        Ok(())
    }

    /// Makes the links match the gateways the zone config lists now: a gateway added gets a
    /// link (dialed at once when running), one removed or revoked loses its link and its
    /// connection (TLS checks revocation only at the next handshake: a revoked gateway kept
    /// its way to every service of this device), one with new addresses dials them next time.
    /// Moving a zone to a new VPS thus needs no restart of its nodes.
    fn relink(self: &Arc<Self>) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        // Read under the lock: of two adoptions racing here, the later one applies the newest
        // config (credentials only ever move to a newer one), never an older list last.
        let wanted = wanted_gateways(&self.cfg);
        let running = links.running.clone();
        let now = Instant::now();
        let mut retired_lost: Option<Instant> = None;
        let mut retired = 0;
        links.list.retain(|link| {
            if wanted.iter().any(|(n, _)| *n == link.name) {
                return true;
            }
            retired += 1;
            // When this link stopped being usable, for `gateways_lost_at` should none remain;
            // one never up counts for nothing, as there.
            let lost = match link.usable() {
                Some(_) => Some(now),
                None => link.state.lock().unwrap_or_else(|p| p.into_inner()).lost_at(now),
            };
            if let Some(lost) = lost {
                retired_lost = Some(retired_lost.map_or(lost, |t| t.max(lost)));
            }
            if self.cfg.creds.is_revoked(&link.name) {
                warn!(gateway = %link.name, addr = %link.addr(), "gateway revoked by the adopted zone config: disconnecting");
                link.retire(crate::hub::CLOSE_REVOKED, b"gateway revoked");
            } else {
                info!(gateway = %link.name, addr = %link.addr(), "gateway no longer in the zone config: disconnecting");
                link.retire(0, b"gateway left the zone");
            }
            false
        });
        let mut list = Vec::with_capacity(wanted.len());
        for (name, addrs) in wanted {
            match links.list.iter().find(|l| l.name == name) {
                Some(link) => {
                    let old = link.addrs();
                    if old != addrs {
                        info!(gateway = %name, from = ?old, to = ?addrs, "gateway addresses changed in the zone config: a connection that is up stays, the next dials the new ones");
                        link.set(|s| s.addrs = addrs);
                        link.redial.notify_one();
                    }
                    list.push(link.clone());
                }
                None => {
                    info!(gateway = %name, addrs = ?addrs, "gateway added to the zone config: connecting");
                    let link = Arc::new(GatewayLink::new(name, addrs));
                    if let Some((links_stop, agent_stop)) = &running {
                        let task =
                            tokio::spawn(self.clone().link_loop(link.clone(), links_stop.clone()));
                        // Watched as `run` watches the loops it started: a link loop that
                        // panicked would leave its gateway "connecting" for good, the node
                        // looking healthy.
                        let (me, agent_stop) = (self.clone(), agent_stop.clone());
                        tokio::spawn(async move {
                            if let Err(e) = task.await {
                                if e.is_panic() {
                                    me.part_broke(e.to_string());
                                    agent_stop.cancel();
                                }
                            }
                        });
                    }
                    list.push(link);
                }
            }
        }
        if list.is_empty() && retired > 0 {
            warn!(serial = self.cfg.creds.zone_serial(), "the zone config leaves no gateway to connect to: services and relayed forwards are unreachable until a newer one lists one");
        }
        links.retired_lost = links.retired_lost.max(retired_lost);
        links.list = list;
    }

    /// Streams cut so far because the local service they went to stopped reading them while
    /// more were held than the connection's window allows ([`crate::holds`]).
    pub fn streams_cut(&self) -> u64 {
        self.streams_cut.load(Ordering::Relaxed)
    }

    /// Receive window lent now to this node's connections (to gateways and peers), beyond
    /// their own, for streams backlogged behind slow local services ([`crate::holds`]).
    pub fn window_lent(&self) -> u64 {
        let all = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        all.iter()
            .filter_map(|(_, _, w)| w.upgrade())
            .map(|h| h.window_lent())
            .sum()
    }

    /// This device's credentials and the zone config in use.
    pub fn creds(&self) -> &Arc<DeviceCreds> {
        &self.cfg.creds
    }

    /// The direct connection to `peer` streams use now, if one is up.
    pub fn direct_conn(&self, peer: &str) -> Option<quinn::Connection> {
        self.peers.direct(peer).map(|p| p.conn)
    }

    /// Mesh peers: path (direct or relay), RTT, bytes.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let gw_rtt = self
            .links()
            .iter()
            .find_map(|l| l.usable().map(|c| c.rtt().as_secs_f64() * 1000.0));
        self.peers.status(gw_rtt)
    }

    /// UDP flows open now, over every gateway.
    pub fn udp_flows(&self) -> usize {
        self.links()
            .iter()
            .filter_map(|l| {
                l.state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .flows
                    .clone()
            })
            .map(|f| f.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Admission counters of the accepting side (direct mesh peers).
    pub fn peer_handshake_stats(&self) -> GateStats {
        self.peer_gate.stats()
    }

    /// The agent's UDP address (gateways and peers reach it there, through its NAT).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Bound forward addresses (useful when configured with port 0).
    pub fn forward_addrs(&self) -> &[SocketAddr] {
        &self.forward_bound
    }

    /// Runs until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let services: Vec<String> = self
            .cfg
            .services
            .iter()
            .map(|(n, s)| format!("{n}={}", s.addr))
            .collect();
        // The gateway links (and the sweep of held streams) outlive `shutdown` by the drain:
        // the streams they carry finish first.
        let links_stop = CancellationToken::new();
        let links = {
            // `relink` spawns the loops of links added from here on.
            let mut l = self.links.lock().unwrap_or_else(|p| p.into_inner());
            l.running = Some((links_stop.clone(), shutdown.clone()));
            l.list.clone()
        };
        info!(device = %self.cfg.creds.name(), zone = %self.cfg.creds.domain(), serial = self.cfg.creds.zone_serial(), gateways = ?links.iter().map(|l| format!("{} {:?}", l.name, l.addrs())).collect::<Vec<_>>(), services = ?services, "node agent starting");
        let mut tasks = tokio::task::JoinSet::new();
        for link in links {
            tasks.spawn(self.clone().link_loop(link, links_stop.clone()));
        }
        tasks.spawn(self.cfg.creds.clone().watch_expiry());
        let listeners = std::mem::take(
            &mut *self
                .forward_listeners
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        tasks.spawn(self.clone().accept_peers(shutdown.clone()));
        tasks.spawn(self.clone().sweep_holds(links_stop.clone()));
        if let Some(path) = self.cfg.creds.zone_path() {
            let me = self.clone();
            tasks.spawn(crate::zone_watch::watch(
                move |bytes, path, _| {
                    me.adopt_zone_file(bytes, path);
                    None
                },
                path.to_owned(),
                ZONE_POLL,
                shutdown.clone(),
            ));
        }
        if let Some(path) = self.cfg.creds.cert_path() {
            let creds = self.cfg.creds.clone();
            tasks.spawn(crate::zone_watch::watch(
                move |bytes, path, seen| creds.cert_file_changed(bytes, path, seen),
                path.to_owned(),
                ZONE_POLL,
                shutdown.clone(),
            ));
        }
        for (f, l) in listeners {
            info!(listen = %f.listen, to = %format!("{}/{}", f.device, f.service), "mesh forward listening");
            tasks.spawn(self.clone().forward_loop(f, l, shutdown.clone()));
        }
        // A part that panics (a forward's loop, the zone.json watch) stops the agent, drained,
        // for its service manager to restart: running on without it would look healthy while,
        // say, no newer zone.json were adopted. A part that returns is done (a retired link).
        let broke = loop {
            tokio::select! {
                () = shutdown.cancelled() => break None,
                Some(done) = tasks.join_next(), if !tasks.is_empty() => match done {
                    Err(e) if e.is_panic() => break Some(e.to_string()),
                    _ => {}
                },
            }
        };
        if let Some(why) = broke {
            self.part_broke(why);
            shutdown.cancel();
        }
        self.drain().await;
        links_stop.cancel();
        self.peers.close_all();
        for link in self.links() {
            link.close(0, b"agent stopping");
        }
        tasks.abort_all();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        self.cfg.creds.saved(Duration::from_secs(5)).await;
        info!(device = %self.cfg.creds.name(), zone = %self.cfg.creds.domain(), "node agent stopped");
    }

    /// Whether a forward's refusal (to `to`, for `reason`) is logged, and its counts: the
    /// times it was so since its last line ([`Repeats`]: once a minute), and the agent's
    /// flood lines not logged ([`LogBudget`]).
    fn repeat_lines(&self, to: &str, reason: &str) -> Option<(u64, u64)> {
        Repeats::take_both(&self.repeats, &self.flood_lines, &format!("{to} {reason}"))
    }

    /// Stops the agent for good when a zone config it verified (`what`) revokes this device:
    /// no gateway or peer lets it in again, and a node that redialed every 30 s looked alive
    /// to its service manager for ever. The node exits 2, as a start with that config does.
    /// Whether it stopped.
    fn stop_if_revoked(&self, what: &str) -> bool {
        let creds = &self.cfg.creds;
        if !creds.is_revoked(creds.name()) {
            return false;
        }
        self.stop_revoked(
            format!("{what} revokes this device: it can no longer join the zone; add it again under a new name (zonegate device add)"),
            || error!(device = %creds.name(), zone = %creds.domain(), config = %what, "a zone config this device verified revokes it: stopping; {REVOKED_HELP}"),
        );
        true
    }

    /// Stops the agent for good once every gateway it has refused this device's certificate
    /// as revoked, each on a connection this agent had verified it on
    /// ([`LinkState::refused_as_revoked`]): a node revoked while it was stopped (or started
    /// from an old bundle) never receives the config that revokes it — the gateway lets it
    /// in no more — and redialed every 30 s for ever, looking alive to its service manager.
    /// One gateway of several is not enough: another may still serve it until the
    /// revocation reaches it, and one gateway alone should not be able to stop a node.
    fn stop_if_every_gateway_refuses(&self) {
        let links = self.links();
        let live: Vec<_> = links.iter().filter(|l| !l.retired()).collect();
        let refused = |l: &&Arc<GatewayLink>| {
            l.state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .refused_as_revoked
        };
        if live.is_empty() || !live.iter().all(refused) {
            return;
        }
        let names = live
            .iter()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let creds = &self.cfg.creds;
        self.stop_revoked(
            format!("the zone's gateways ({names}) refuse this device's certificate as revoked: it can no longer join the zone; add it again under a new name (zonegate device add)"),
            // The refusal's own line said what to do.
            || error!(device = %creds.name(), zone = %creds.domain(), gateways = %names, "every gateway refuses this device's certificate as revoked: stopping"),
        );
    }

    /// Records why the agent stops for good (`why`, said once by `log`) and stops it.
    fn stop_revoked(&self, why: String, log: impl FnOnce()) {
        let mut revoked = self.revoked_self.lock().unwrap_or_else(|p| p.into_inner());
        if revoked.is_none() {
            log();
            *revoked = Some(why);
        }
        drop(revoked);
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, shutdown)) = &links.running {
            shutdown.cancel();
        }
    }

    /// Why the agent stopped for good, if a zone config it verified revokes this device
    /// ([`Agent::run`] stopped for it; the node exits 2).
    pub fn revoked_self(&self) -> Option<String> {
        self.revoked_self
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A part of the agent panicked (`why`): logged, kept for [`Agent::broke`].
    fn part_broke(&self, why: String) {
        error!(error = %why, "a part of the node agent failed: stopping");
        *self.broke.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// Why a part of the agent failed, if one did: [`Agent::run`] stopped for it (the node
    /// exits 1).
    pub fn broke(&self) -> Option<String> {
        self.broke.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The start of a stop: gateways are told this device offers nothing more, and the
    /// streams it serves get [`Tuning::agent_drain`] to finish (a restart of the node cut
    /// every download through it).
    async fn drain(&self) {
        let grace = self.cfg.tuning.agent_drain;
        self.draining.store(true, Ordering::Relaxed);
        self.streams.close();
        self.forwarded.close();
        if grace.is_zero() || (self.streams.is_empty() && self.forwarded.is_empty()) {
            return;
        }
        for link in self.links() {
            if let Some(ctl) = link.ctl() {
                ctl.send_services(Vec::new());
            }
        }
        info!(
            streams = self.streams.len(),
            forwarded = self.forwarded.len(),
            grace_secs = grace.as_secs(),
            "node agent stopping: open streams may finish, gateways send no new ones"
        );
        let both = async {
            self.streams.wait().await;
            self.forwarded.wait().await;
        };
        if tokio::time::timeout(grace, both).await.is_err() {
            warn!(
                streams = self.streams.len(),
                forwarded = self.forwarded.len(),
                "streams still open after the grace period: cut"
            );
        }
    }

    async fn link_loop(self: Arc<Self>, link: Arc<GatewayLink>, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
        loop {
            let session = self.clone().session(link.clone());
            tokio::pin!(session);
            let result = loop {
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        // A connection the session set up after `run` closed the links' ones
                        // (a dial finishing just then) is closed too, not left to the idle
                        // timeout at the gateway, which would route streams to it meanwhile.
                        link.close(0, b"agent stopping");
                        // The session's UDP flows end with it: their tasks hold the services'
                        // sockets, for up to a day while a service keeps sending.
                        let flows = link.state.lock().unwrap_or_else(|p| p.into_inner()).flows.take();
                        if let Some(flows) = flows {
                            stop_flows(&flows);
                        }
                        return;
                    }
                    _ = link.stop.cancelled() => return link.wind_up(),
                    r = &mut session => break Some(r),
                    // New addresses while still dialing the old ones (each may take the whole
                    // handshake timeout): start over with the new. Not once a connection is
                    // up — it works, and its tasks belong to the session.
                    _ = link.redial.notified() => if link.state.lock().unwrap_or_else(|p| p.into_inner()).conn.is_none() {
                        break None;
                    },
                }
            };
            let Some(result) = result else {
                info!(gateway = %link.name, addrs = ?link.addrs(), "dialing the gateway's new addresses");
                continue;
            };
            // An `Err` is a dial that never reached a session (one that ended says why in
            // its `Ok`): timed out there, by our deadline or QUIC's own, nothing answered.
            let result_kind = match &result {
                Err(TunnelError::Timeout("connect and hello"))
                | Err(TunnelError::Connection(quinn::ConnectionError::TimedOut)) => {
                    DialEnd::NoAnswer
                }
                _ => DialEnd::Other,
            };
            let mut err = match result {
                Ok(reason) => reason,
                Err(e) => e.to_string(),
            };
            // No answer at all: the usual first-day mistake is a gateway not started yet or a
            // firewall (the VPS's, or its provider's security group) dropping its UDP port.
            if matches!(result_kind, DialEnd::NoAnswer) {
                err = format!("{err}: no answer from the gateway — is `zonegate gateway` running there, and its QUIC port open to UDP from here (the VPS's firewall, the provider's security group)?");
            }
            // Refused at the handshake for the device's own certificate: the dial's error says
            // only that the handshake failed.
            if let Some(problem) = self.cfg.creds.own_cert_problem() {
                err = format!("{err} ({problem})");
            }
            let revoked = link.state.lock().unwrap_or_else(|p| p.into_inner()).revoked;
            if revoked && !err.contains("revoked") {
                err = format!("{err} (a gateway said this device is revoked)");
            }
            // Healthy means up for a while, counted from the welcome: a dial that took the
            // whole handshake timeout (a gateway dropping our packets) is no success.
            let mut healthy = false;
            // A tunnel that never came up, for a reason not told yet (a gateway refusing this
            // device, another protocol version, no route): a warning the first time, as the
            // gateway's side says; the same reason again is the retry it was, at info.
            let mut news = false;
            let mut was_up = false;
            link.set(|s| {
                // Its flows were stopped as the session ended.
                let (up_since, _) = s.session_over();
                was_up = up_since.is_some();
                let replaced = std::mem::take(&mut s.replaced);
                healthy = up_since.is_some_and(|t| t.elapsed() >= HEALTHY_AFTER) && !replaced;
                // Compared without digits: a certificate refused as out of date says when it
                // was checked, in seconds, and warned at every retry.
                let shape = |t: &str| {
                    t.chars()
                        .filter(|c| !c.is_ascii_digit())
                        .collect::<String>()
                };
                news =
                    up_since.is_none() && s.last_error.as_deref().map(shape) != Some(shape(&err));
                s.last_error = Some(err.clone());
            });
            if healthy {
                backoff.reset();
            }
            // Stopped for good meanwhile (every gateway refused it as revoked): no "retrying".
            if self.revoked_self().is_some() {
                return;
            }
            // A revoked device is let in by no retry: the longest wait, not a stream of dials.
            let delay = match revoked {
                true => BACKOFF_CAP,
                false => backoff.next_delay(rand::random::<f64>()),
            };
            if news {
                warn!(gateway = %link.name, addrs = ?link.addrs(), reason = %err, retry_ms = delay.as_millis() as u64, "tunnel not up; retrying");
            } else if !was_up {
                // Never up this time: "tunnel down" read as if it had been.
                info!(gateway = %link.name, addrs = ?link.addrs(), reason = %err, retry_ms = delay.as_millis() as u64, "tunnel still not up; retrying");
            } else {
                info!(gateway = %link.name, addrs = ?link.addrs(), reason = %err, retry_ms = delay.as_millis() as u64, "tunnel down; reconnecting");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = link.stop.cancelled() => return link.wind_up(),
                _ = tokio::time::sleep(delay) => {}
                // New addresses: no reason to wait out a backoff earned at the old ones.
                _ = link.redial.notified() => backoff.reset(),
            }
        }
    }

    /// One connection to a gateway, from dial to loss. Returns why it ended.
    async fn session(self: Arc<Self>, link: Arc<GatewayLink>) -> Result<String, TunnelError> {
        let creds = &self.cfg.creds;
        let server_name = format!("{}.{}", link.name, creds.domain());
        // A revoked gateway is not dialed (TLS would refuse it anyway): no packets to it.
        if creds.is_revoked(&link.name) {
            return Err(TunnelError::Config(format!(
                "gateway {} is revoked in the zone config: not connecting to it",
                link.name
            )));
        }
        let candidates = link.dial_order(self.endpoint.local_addr().ok());
        if candidates.is_empty() {
            return Err(TunnelError::Config(format!(
                "gateway {name} lists only IPv6 addresses ({:?}) and this agent's socket is IPv4 only (bound to {}; IPv6 is off on this machine when the node chose it): enable IPv6 here, or give the gateway an IPv4 address too (`zonegate device move {name} --public-addr IPv4:PORT --public-addr [IPv6]:PORT`)",
                link.addrs(),
                self.endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                name = link.name,
            )));
        }
        let mut last_error = None;
        for addr in candidates {
            match self.clone().dial(&link, addr, &server_name).await {
                Ok(reason) => return Ok(reason),
                Err(e) => {
                    debug!(gateway = %link.name, %addr, error = %e, "gateway address failed");
                    // A refusal said by the gateway (certificate, version) outlives a timeout
                    // at another of its addresses (an IPv6 one without a route): only the
                    // last error is kept, and it must be the one that tells what to do.
                    let timeout = matches!(e, TunnelError::Timeout(_));
                    if timeout && last_error.is_some() {
                        continue;
                    }
                    last_error = Some(if link.addrs().len() > 1 {
                        TunnelError::Config(format!("{addr}: {e}"))
                    } else {
                        e
                    });
                }
            }
        }
        Err(last_error.unwrap_or(TunnelError::Truncated))
    }

    /// One connection to `link` at `addr`: an error if it could not be set up, else why it
    /// ended.
    async fn dial(
        self: Arc<Self>,
        link: &Arc<GatewayLink>,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<String, TunnelError> {
        let creds = &self.cfg.creds;
        let t = self.cfg.tuning;
        // Kept to read why it closed: the gateway refuses a revoked device's certificate after
        // the client side of the handshake is done, so the error the setup returns is
        // whichever stream call came next.
        let mut dialed: Option<Connection> = None;
        let setup = async {
            let conn = self.endpoint.connect(addr, server_name)?.await?;
            dialed = Some(conn.clone());
            // A gateway link is trusted with more than a peer (plain streams from it, punching
            // addresses, permit revocations): its certificate must say gateway, not only the
            // zone.json this agent holds (roles changed without a new certificate).
            if !crate::peers::peer_identity(&conn)?.has_role(zone_core::Role::Gateway) {
                conn.close(0u32.into(), b"not a gateway");
                return Err(TunnelError::Config(format!(
                    "{server_name} at {addr} presents a certificate without the gateway role: reissue its certificate with --role gateway (`zonegate device renew`), or correct the zone's gateway list"
                )));
            }
            let (mut send, recv) = conn.open_bi().await?;
            stream::write_header(&mut send, &StreamHeader::Control).await?;
            let zone = creds.zone();
            let hello = Hello {
                proto_version: proto::CONTROL_VERSION,
                device: creds.name().to_owned(),
                services: if self.draining.load(Ordering::Relaxed) {
                    Vec::new()
                } else {
                    self.cfg.services.infos()
                },
                zone_serial: zone.config.serial,
                // Pass our zone.json on: a gateway with an older one learns revocations this way.
                zone_config: Some(zone.to_json_compact())
                    .filter(|z| z.len() <= proto::limits::MAX_ZONE_CONFIG),
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            };
            let mut io = ControlIo::new(send, recv, ControlSession::agent(hello));
            io.flush().await?;
            let welcome = loop {
                match io.next_event().await {
                    Ok(Some(Event::Welcome(w))) => break w,
                    Ok(Some(Event::PeerError { code, message })) => {
                        return Err(TunnelError::Config(format!(
                            "gateway refused us: {code:?}: {message}"
                        )))
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => return Err(TunnelError::Truncated),
                    Err(e) => {
                        // A violation by the gateway (bytes that are no message, one out of
                        // place) is told to it before the close, as the hub tells agents.
                        io.close_as_violation(&conn, b"protocol violation").await;
                        return Err(e);
                    }
                }
            };
            // The Welcome came with a violation behind it in the same read (the session
            // failed after it): refused here, before the link is marked up or its zone
            // config taken, as the hub refuses such a Hello.
            if io.session.is_closed() {
                // The gateway's own Error right behind its Welcome: said as before one.
                if !io.session.ended_here() {
                    while let Some(ev) = io.session.poll_event() {
                        if let Event::PeerError { code, message } = ev {
                            return Err(TunnelError::Config(format!(
                                "gateway refused us: {code:?}: {message}"
                            )));
                        }
                    }
                }
                let e = io.take_failure().unwrap_or(TunnelError::Truncated);
                io.close_as_violation(&conn, b"protocol violation").await;
                return Err(e);
            }
            Ok::<_, TunnelError>((conn, io, welcome))
        };
        let r = tokio::time::timeout(t.handshake_timeout, setup).await;
        // A device revoked while this agent was stopped is refused at the TLS handshake,
        // before any session could say so.
        let closed = dialed.as_ref().and_then(|c| c.close_reason());
        let refused = match &r {
            Ok(Err(TunnelError::Connection(e))) => Some(e),
            _ => closed.as_ref(),
        };
        if refused.is_some_and(refused_as_revoked) {
            // On the connection this agent completed its handshake on, with a peer whose
            // certificate says gateway: that gateway's word.
            let proven = closed.as_ref().is_some_and(refused_as_revoked)
                && dialed
                    .as_ref()
                    .and_then(|c| crate::peers::peer_identity(c).ok())
                    .is_some_and(|id| id.has_role(zone_core::Role::Gateway));
            let mut first = false;
            link.set(|s| {
                first = !std::mem::replace(&mut s.revoked, true);
                s.refused_as_revoked |= proven;
            });
            // Said as a closed session says it, once per refusal streak (the retries' lines
            // say it too, at info): a node started after its revocation met only those.
            if first {
                error!(gateway = %link.name, device = %creds.name(), "the gateway refused this device's certificate: {REVOKED_HELP}");
            }
            if proven {
                self.stop_if_every_gateway_refuses();
            }
        }
        let (conn, io, welcome) = match r {
            Ok(r) => r?,
            // No QUIC connection at all: nothing answered (the hint in the retry line).
            Err(_) if dialed.is_none() => return Err(TunnelError::Timeout("connect and hello")),
            Err(_) => return Err(TunnelError::Timeout("the gateway's welcome")),
        };
        if let Some(z) = &welcome.zone_config {
            match creds.offer_zone(z) {
                Ok(Some(serial)) => {
                    info!(serial, gateway = %link.name, "adopted newer zone config from gateway");
                    self.zone_adopted(&link.name);
                }
                // Said by the welcome's checks if it matters: an older config that does not
                // verify from a gateway that connects is no reason to refuse it here.
                Ok(None) => {
                    let _ = self.learn_revocations(z, &link.name);
                }
                Err(e) => {
                    // Budgeted as a refused update is: a gateway whose sessions last just
                    // long enough to reset the backoff would write one at each.
                    if let Some(unlogged) = LogBudget::take_shared(&self.flood_lines) {
                        warn!(gateway = %link.name, error = %e, unlogged, "gateway offered a zone config we refuse");
                    }
                    let _ = self.learn_revocations(z, &link.name);
                }
            }
        }
        link.connects.fetch_add(1, Ordering::Relaxed);
        link.set(|s| {
            s.conn = Some(conn.clone());
            s.draining = false;
            s.observed = Some(welcome.observed_addr);
            s.last_error = None;
            s.revoked = false;
            s.refused_as_revoked = false;
            s.up_since = Some(Instant::now());
            s.addr = Some(addr);
            s.udp_flow_idle = None;
            s.refused_offers = 0;
            s.older_offers = 0;
        });
        // A zone config revoking this gateway may have been adopted (from another gateway)
        // while this handshake ran: `zone_adopted` found no connection to close then.
        if creds.is_revoked(&link.name) {
            warn!(gateway = %link.name, %addr, "gateway revoked by the adopted zone config: disconnecting");
            conn.close(crate::hub::CLOSE_REVOKED.into(), b"gateway revoked");
            return Ok("gateway revoked".into());
        }
        // Or dropped from the zone config meanwhile (the loop winds the link up at its next
        // wait; no "tunnel up" and no tasks for it in between).
        if link.retired() {
            conn.close(0u32.into(), b"gateway left the zone");
            return Ok("gateway left the zone config".into());
        }
        info!(
            gateway = %link.name,
            addr = %addr,
            observed = %welcome.observed_addr,
            session = welcome.session_id,
            services = ?self.cfg.services.infos().iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
            "tunnel up"
        );
        let (ctl, cmds) = control::channel();
        link.set(|s| s.ctl = Some(ctl.clone()));
        // What changed while this handshake ran reached the links with a session then, not
        // this one (the hub does the same for its side). A newer zone config adopted meanwhile
        // (from another gateway's welcome, the bundle watch): this gateway would have kept the
        // older one, and a device it revokes connected, until it heard of it some other way.
        if creds.zone_serial() > welcome.zone_serial {
            if let Some((serial, json)) = self.zone_to_pass_on() {
                ctl.send_config(serial, json);
            }
        }
        // A stop begun meanwhile: nothing is offered any more.
        if self.draining.load(Ordering::Relaxed) {
            ctl.send_services(Vec::new());
        }
        let flows: Flows = Arc::default();
        link.set(|s| s.flows = Some(flows.clone()));
        // The gateway's certificate was checked at the handshake; the link, up for as long
        // as both like, must not outlive it (the hub does the same for ours).
        if let Ok(id) = peer_identity(&conn) {
            tokio::spawn(crate::hub::close_at_expiry(
                conn.clone(),
                link.name.clone(),
                id.not_after,
                crate::hub::Tell::AtEnd,
            ));
        }
        let streams = tokio::spawn(self.clone().accept_streams(conn.clone(), link.name.clone()));
        let dgrams = tokio::spawn(read_datagrams(
            conn.clone(),
            flows.clone(),
            link.name.clone(),
        ));
        let reason = self
            .run_control(link, &conn, io, cmds, ctl, flows.clone())
            .await;
        streams.abort();
        dgrams.abort();
        // UDP flows belong to this session: stop their tasks and close their sockets now, or a
        // chatty local UDP service would keep them alive after the tunnel is gone.
        stop_flows(&flows);
        // Only another agent with this identity connects while this connection works: ours
        // dials again only once it is gone.
        let code = match conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c)) => Some(c.error_code),
            _ => None,
        };
        let replaced = code == Some(crate::hub::CLOSE_REPLACED.into());
        let reason = if code == Some(crate::hub::CLOSE_REVOKED.into()) {
            link.set(|s| s.revoked = true);
            error!(gateway = %link.name, device = %self.cfg.creds.name(), "the gateway disconnected this device: {REVOKED_HELP}");
            "this device is revoked in the zone config (said by the gateway)".to_owned()
        } else if replaced {
            link.set(|s| s.replaced = true);
            warn!(gateway = %link.name, "the gateway took a newer connection with this device's identity in place of this working one: another node agent runs with this device's bundle (a cloned disk, a restored backup, a second service); stop it, or give it a device of its own (`zonegate device add`)");
            "replaced by another node agent with this device's identity".to_owned()
        } else {
            reason
        };
        conn.close(0u32.into(), b"");
        Ok(reason)
    }

    async fn run_control(
        self: &Arc<Self>,
        link: &GatewayLink,
        conn: &Connection,
        mut io: ControlIo,
        mut cmds: control::ControlCmds,
        ctl: ControlHandle,
        flows: Flows,
    ) -> String {
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        // For peers behind the same NAT, to which the NAT's outside rarely leads back: told
        // now, and again whenever it changed (a new DHCP lease, another network), since QUIC
        // migration keeps the session going for days across such a change.
        let mut lan = LanReport::default();
        lan.update(self, link, conn, &mut io.session);
        let mut lan_check =
            tokio::time::interval_at(tokio::time::Instant::now() + LAN_RECHECK, LAN_RECHECK);
        lan_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The gateway may not have relayed them (it restarted, or another one did), yet must
        // be able to revoke them.
        let held = self.peers.held_permits();
        if !held.is_empty() {
            if let Err(e) = io.session.send_permits_held(held) {
                debug!(gateway = %link.name, error = %e, "permits held not reported");
            }
        }
        // A gateway that stops reading its control stream is given what the hub gives a
        // device: the loop goes on reading its events while a write waits (`next_event`
        // writes while it reads), and ends the session at the limit instead of waiting in the
        // write for ever, deaf to revocations and drains.
        let stall = self.cfg.tuning.idle_timeout * crate::hub::CONTROL_STALL_TIMEOUTS;
        io.end_stalled_after(stall);
        loop {
            let drain_sleep = async {
                match drain_deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = io.next_event() => match ev {
                    Ok(Some(Event::Drain { grace_ms, reason })) => {
                        info!(gateway = %link.name, grace_ms, reason = %reason, "gateway draining: no new work through it");
                        link.set(|s| s.draining = true);
                        // At most the longest grace a gateway can be given, and not moved by a
                        // repeated Drain: a buggy gateway asking for u32::MAX ms, or asking
                        // again and again, held the link unusable for weeks.
                        let grace = Duration::from_millis(grace_ms as u64).min(MAX_GATEWAY_DRAIN);
                        drain_deadline.get_or_insert(tokio::time::Instant::now() + grace);
                    }
                    Ok(Some(ev)) => if let Some(end) = self.on_event(link, conn, &ctl, &flows, ev) {
                        // Told to the gateway, whose operator would otherwise see a plain close.
                        let refused = link.state.lock().unwrap_or_else(|p| p.into_inner()).refused_offers;
                        if refused >= crate::hub::MAX_REFUSED_OFFERS {
                            io.session.reject(proto::ErrorCode::ProtocolViolation, &end);
                            io.close_as_violation(conn, b"zone configs that do not verify").await;
                        }
                        return end;
                    },
                    Ok(None) => return "gateway closed the control stream".into(),
                    Err(TunnelError::Timeout(control::CONTROL_NOT_READ)) => {
                        conn.close(crate::hub::CLOSE_STALLED.into(), b"control stream not read");
                        return format!("gateway read nothing of its control stream for {} s", stall.as_secs());
                    }
                    Err(TunnelError::Timeout(control::CONTROL_BACKLOG)) => {
                        conn.close(crate::hub::CLOSE_STALLED.into(), b"control stream not read");
                        return format!("gateway left more than {} KiB of its control stream unread", control::MAX_UNREAD >> 10);
                    }
                    Err(e) => {
                        let why = transport::stream_end(conn, &e);
                        io.close_as_violation(conn, b"protocol violation").await;
                        return why;
                    }
                },
                cmd = cmds.recv() => if let Some(cmd) = cmd {
                    if let Err(e) = cmd(&mut io.session) {
                        debug!(error = %e, "control command not applied");
                    }
                },
                e = conn.closed() => return format!("connection lost: {e}"),
                _ = drain_sleep => return "gateway drained".into(),
                _ = lan_check.tick() => lan.update(self, link, conn, &mut io.session),
            }
        }
    }

    fn on_event(
        self: &Arc<Self>,
        link: &GatewayLink,
        conn: &Connection,
        ctl: &ControlHandle,
        flows: &Flows,
        ev: Event,
    ) -> Option<String> {
        match ev {
            Event::ConfigUpdate {
                zone_serial,
                zone_config,
            } => {
                // Not newer by its own account: no parse spent on it, as the hub does — but an
                // older one comes from a gateway that learned revocations from it without a
                // new serial (a config not adopted): taken from it (one parse; a signature
                // check only if it revokes a device not revoked here yet).
                let ours = self.cfg.creds.zone_serial();
                let refused = if zone_serial == ours {
                    return None;
                } else if zone_serial < ours {
                    // Counted as a refused newer one when it does not verify: a gateway
                    // labelling forged configs older kept this device checking them (a
                    // parse and a signature check each) without end.
                    // And beyond what a gateway sends (its configs revocations were learned
                    // from, each session): each older one costs a parse, verified or not.
                    let mut older = 0;
                    link.set(|s| {
                        s.older_offers += 1;
                        older = s.older_offers;
                    });
                    match self.learn_revocations(&zone_config, &link.name) {
                        Ok(()) if older <= MAX_OLDER_OFFERS => return None,
                        Ok(()) => Some(format!(
                            "more than {MAX_OLDER_OFFERS} zone configs older than ours in one session"
                        )),
                        Err(e) => Some(format!(
                            "an older zone config (serial {zone_serial}) that cannot be read or does not verify: {e}"
                        )),
                    }
                } else {
                    let refused = match self.cfg.creds.offer_zone(&zone_config) {
                        Ok(Some(serial)) => {
                            info!(serial, gateway = %link.name, "adopted newer zone config");
                            self.zone_adopted(&link.name);
                            None
                        }
                        // Said to be newer and not (parsed all the same), as the hub counts it.
                        Ok(None) if zone_serial > self.cfg.creds.zone_serial() => {
                            Some("its serial is not the newer one it announced".to_owned())
                        }
                        Ok(None) => None,
                        Err(e) => Some(e.to_string()),
                    };
                    if refused.is_some() {
                        let _ = self.learn_revocations(&zone_config, &link.name);
                    }
                    refused
                };
                if let Some(why) = refused {
                    // Budgeted: a gateway sending bad ones in a loop must not fill the disk.
                    if let Some(unlogged) = LogBudget::take_shared(&self.flood_lines) {
                        warn!(gateway = %link.name, error = %why, unlogged, "refused zone config update");
                    }
                    // Nor keep this device busy checking them (a parse and a signature check
                    // each): the session ends as a violation, as the hub ends a device's.
                    let mut n = 0;
                    link.set(|s| {
                        s.refused_offers += 1;
                        n = s.refused_offers;
                    });
                    if n >= crate::hub::MAX_REFUSED_OFFERS {
                        return Some(format!(
                            "gateway offered {n} zone configs that do not verify (or older ones past what a gateway sends); the last: {why}"
                        ));
                    }
                }
            }
            Event::UdpFlowOpen(f) => {
                // The longer of ours and the gateway's: closing a flow the gateway still holds
                // makes its next datagram a new flow, from a new port to the service.
                let theirs = link
                    .state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .udp_flow_idle;
                let ours = self.cfg.tuning.udp_flow_idle;
                let idle = theirs.unwrap_or(ours).max(ours);
                self.open_flow(conn, ctl, flows, f, &link.name, idle)
            }
            Event::UdpFlowIdle { idle_ms } => {
                // Bounded as the setting is (a day): a gateway's word is no reason to hold a
                // service's socket for weeks.
                let idle = Duration::from_millis(idle_ms.into()).min(MAX_UDP_FLOW_IDLE);
                debug!(gateway = %link.name, idle_secs = idle.as_secs(), "gateway's UDP flow idle time");
                link.set(|s| s.udp_flow_idle = Some(idle));
            }
            Event::UdpFlowClose { flow_id } => {
                if let Some(f) = flows
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(flow_id)
                {
                    f.stop.cancel();
                }
            }
            // The gateway's session has ended (an Error closes it at its end): reconnect
            // rather than stay on a link that looks up and takes no command.
            Event::PeerError { code, message } => {
                warn!(gateway = %link.name, ?code, %message, "gateway reported a control error");
                return Some(format!("gateway reported a control error: {message}"));
            }
            Event::PeerAddr(pa) => self.on_peer_addr(pa, conn.remote_address()),
            Event::PermitRevoke { device, service } => {
                if self.peers.revoke_permit(&device, &service) {
                    info!(gateway = %link.name, peer = %device, service = %service, "direct-path permit revoked by the gateway (its policy, or the peer revoked): its direct streams end");
                }
            }
            other => debug!(event = ?other, "control event ignored"),
        }
        None
    }

    /// Opens the local end of a UDP flow. The flow is in the table before this returns, on the
    /// control loop, so a `UdpFlowClose` right behind the open always finds it.
    fn open_flow(
        &self,
        conn: &Connection,
        ctl: &ControlHandle,
        flows: &Flows,
        f: UdpFlowOpen,
        gateway: &str,
        idle: Duration,
    ) {
        let id = f.flow_id;
        // Stopping: like a new stream, a new flow is refused (it would be cut at the drain's
        // end); the gateways were told this device offers nothing more.
        if self.draining.load(Ordering::Relaxed) {
            ctl.close_udp_flow(id);
            return;
        }
        let sock = match self.cfg.services.connect_udp(&f.service) {
            Ok(s) => Arc::new(s),
            Err((_, reason)) => {
                if let Some(unlogged) = LogBudget::take_shared(&self.flood_lines) {
                    info!(gateway = %gateway, flow = id, service = %f.service, app = %f.app, reason = %reason, unlogged, "UDP flow refused");
                }
                ctl.close_udp_flow(id);
                return;
            }
        };
        let stop = CancellationToken::new();
        let activity = Arc::new(FlowActivity::default());
        let dropped_up = Arc::new(std::sync::atomic::AtomicU64::new(0));
        {
            let mut table = flows.lock().unwrap_or_else(|p| p.into_inner());
            let early = table.open(
                id,
                FlowEnd {
                    sock: sock.clone(),
                    stop: stop.clone(),
                    activity: activity.clone(),
                    dropped_up: dropped_up.clone(),
                },
                Instant::now(),
            );
            // Datagrams that came before the open (see `flow_table`) go first, sent while the
            // table is held: `read_datagrams` finds the flow only then, so a datagram that
            // arrives now cannot overtake them (a service saw a DNS or VPN first flight out
            // of order). Sent on the socket itself: a fresh socket takes them at once, but
            // tokio's `try_send` refuses until the reactor has seen it writable (3 first
            // datagrams in 100 were lost so). One the kernel refuses is dropped, as UDP may.
            for d in early {
                activity.touch();
                if socket2::SockRef::from(&*sock).send(&d).is_err() {
                    dropped_up.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let (conn, ctl, flows) = (conn.clone(), ctl.clone(), flows.clone());
        let (app, service, origin) = (f.app, f.service, origin_text(&f.origin));
        let (gateway, lines) = (gateway.to_owned(), self.flood_lines.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let mut down = 0u64;
            let mut buf = vec![0u8; FLOW_READ];
            let mut dropped = 0u64;
            let mut ended = "quiet";
            // Made once, not per datagram: each would register a timer and a cancellation
            // waiter for every packet. The idle wait re-checks the activity when it fires.
            let stopped = stop.cancelled();
            let quiet = activity.idle(idle);
            tokio::pin!(stopped, quiet);
            loop {
                tokio::select! {
                    _ = &mut stopped => {
                        ended = "closed by the gateway, or its tunnel ended";
                        break;
                    }
                    // Quiet both ways (datagrams to the service touch it in `read_datagrams`).
                    _ = &mut quiet => break,
                    r = sock.recv(&mut buf) => match r {
                        Ok(n) => {
                            activity.touch();
                            // A full buffer is a datagram cut short: larger than any the
                            // tunnel carries, so it is dropped, like one the path refuses.
                            let sent = if n == FLOW_READ {
                                Err(TunnelError::DatagramTooLarge { len: n, max: MAX_UDP_PAYLOAD.into() })
                            } else {
                                crate::flow_datagram::send(&conn, id, &buf[..n])
                            };
                            match sent {
                                Ok(()) => down += n as u64,
                                Err(e) => {
                                    dropped += 1;
                                    if dropped == 1 {
                                        if let Some(unlogged) = LogBudget::take_shared(&lines) {
                                            warn!(gateway = %gateway, flow = id, app = %app, service = %service, origin = %origin, error = %e, unlogged, "UDP datagram from the service dropped (further drops of this flow are counted in its done line)");
                                        }
                                    }
                                }
                            }
                        }
                        // ICMP reports about earlier datagrams: the flow goes on, as the
                        // gateway's own flows do (a new socket would be a new source port to
                        // the service, breaking DTLS and game sessions).
                        Err(e) if crate::sockets::icmp_transient(&e) => {}
                        Err(e) => {
                            if let Some(unlogged) = LogBudget::take_shared(&lines) {
                                warn!(gateway = %gateway, flow = id, app = %app, service = %service, error = %e, unlogged, "UDP flow's socket to the service failed: the flow ends");
                            }
                            ended = "socket error";
                            break;
                        }
                    }
                }
            }
            {
                // Only our own entry: after a close the gateway may reuse the id for a new flow.
                let mut table = flows.lock().unwrap_or_else(|p| p.into_inner());
                if table.get(id).is_some_and(|e| Arc::ptr_eq(&e.sock, &sock)) {
                    table.remove(id);
                }
            }
            if !stop.is_cancelled() {
                // Ended here (idle, socket error): tell the gateway. A flow the gateway closed
                // needs no close back.
                ctl.close_udp_flow(id);
            }
            if let Some(unlogged) = LogBudget::take_shared(&lines) {
                let dropped_up = dropped_up.load(Ordering::Relaxed);
                info!(gateway = %gateway, flow = id, app = %app, service = %service, origin = %origin, bytes_down = down, dropped, dropped_up, secs = started.elapsed().as_secs(), ended, unlogged, "UDP flow done");
            }
        });
    }

    async fn accept_streams(self: Arc<Self>, conn: Connection, gateway: String) {
        // Each stream is one public connection to a service here: the allowance starts small
        // (memory of an idle agent) and grows with the load, up to MAX_STREAMS_TO_AGENT.
        let budget = StreamBudget::new(conn.clone(), MAX_STREAMS_TO_AGENT);
        let holds = self.holds_of(&conn, &gateway);
        while let Ok((send, recv)) = conn.accept_bi().await {
            let me = self.clone();
            let via = Via::Gateway(gateway.clone());
            let slot = budget.admit();
            let holds = holds.clone();
            self.streams.spawn(async move {
                me.serve_stream(send, recv, via, &holds).await;
                drop(slot);
            });
        }
    }

    /// The held-stream watch of `conn` (to `peer`, a gateway or a device): one per
    /// connection, shared by the streams it brings and those this agent opens on it (their
    /// unread data counts against the same window), swept by [`Agent::sweep_holds`] for as
    /// long as any of them lives.
    fn holds_of(&self, conn: &Connection, peer: &str) -> Arc<Holds> {
        let id = conn.stable_id();
        let mut all = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = all
            .iter()
            .find(|(i, _, _)| *i == id)
            .and_then(|(_, _, w)| w.upgrade())
        {
            return h;
        }
        let holds = Arc::new(Holds::new(
            self.hold_clock.clone(),
            conn.clone(),
            self.window_pool.clone(),
        ));
        all.retain(|(i, _, w)| *i != id && w.strong_count() > 0);
        all.push((id, peer.to_owned(), Arc::downgrade(&holds)));
        holds
    }

    /// Cuts, on every connection, the longest-held streams beyond what its window allows
    /// ([`crate::holds`]): a local service that stops reading uploads (one public client's,
    /// or a peer's) would otherwise stop every other stream the gateway or peer sends here.
    async fn sweep_holds(self: Arc<Self>, shutdown: CancellationToken) {
        let stall = self.cfg.tuning.reader_stall;
        crate::holds::sweep_loop(&self.hold_clock, stall, &shutdown, |tick, stall_ticks| {
            let live: Vec<(String, Arc<Holds>)> = {
                let mut all = self.holds.lock().unwrap_or_else(|p| p.into_inner());
                // A connection nothing uses any more is forgotten.
                all.retain(|(_, _, w)| w.strong_count() > 0);
                all.iter()
                    .filter_map(|(_, p, w)| w.upgrade().map(|h| (p.clone(), h)))
                    .collect()
            };
            for (peer, holds) in live {
                let cut = holds.sweep(stall_ticks, tick, &peer);
                self.streams_cut.fetch_add(cut as u64, Ordering::Relaxed);
            }
        })
        .await
    }

    /// Streams a peer opens on a direct connection.
    async fn accept_direct_streams(self: Arc<Self>, peer: String, pc: PeerConn) {
        let budget = StreamBudget::new(pc.conn.clone(), MAX_STREAMS_PER_CONNECTION);
        let holds = self.holds_of(&pc.conn, &peer);
        while let Ok((send, recv)) = pc.conn.accept_bi().await {
            // The peer uses it, so it has it: it may be the best now.
            self.peers.confirm(&peer, &pc);
            let me = self.clone();
            let via = Via::Direct {
                peer: peer.clone(),
                pc: pc.clone(),
            };
            let slot = budget.admit();
            let holds = holds.clone();
            // In use from its first moment: a duplicate the peer retires is closed only once
            // no stream uses it, and this one's header may still be on its way.
            let used = pc.stream_guard();
            // Tracked like the gateways' streams: a stopping node lets a peer's direct
            // download finish too (it was cut at once).
            self.streams.spawn(async move {
                me.serve_stream(send, recv, via, &holds).await;
                drop((slot, used));
            });
        }
    }

    /// Accepts direct connections from peers (hole punching: see [`crate::peers`]). The TLS
    /// handshake runs in its own task, bounded by the handshake timeout and, in number, by the
    /// peer gate.
    async fn accept_peers(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => return,
                i = self.endpoint.accept() => match i {
                    Some(i) => i,
                    // The endpoint stopped by itself (its socket failed: quinn's driver ends
                    // on a receive error): every dial fails from now on. Stopped, for the
                    // service manager to restart (exit 1); returning quietly left a node
                    // that looked up, cut off for good.
                    None if !shutdown.is_cancelled() => {
                        self.part_broke("the QUIC endpoint stopped by itself (its UDP socket failed): no gateway or peer can be reached".into());
                        shutdown.cancel();
                        return;
                    }
                    None => return,
                },
            };
            let Some((incoming, permit)) = self.peer_gate.admit(incoming) else {
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let remote = crate::sockets::canonical(incoming.remote_address());
                let handshake = tokio::time::timeout(me.cfg.tuning.handshake_timeout, incoming);
                let conn = match handshake.await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        debug!(%remote, error = %e, "peer connection refused");
                        return;
                    }
                    Err(_) => return,
                };
                drop(permit);
                match peer_identity(&conn) {
                    Ok(id) if id.name.as_str() != me.cfg.creds.name() => {
                        me.add_direct(id.name.to_string(), conn, false)
                    }
                    Ok(_) | Err(_) => conn.close(0u32.into(), b"not a peer"),
                }
            });
        }
    }

    /// A direct connection to `peer` is up (dialed by us or accepted): serve its streams and
    /// make it the direct path unless it is a duplicate.
    fn add_direct(self: &Arc<Self>, peer: String, conn: Connection, dialed: bool) {
        let dialer = if dialed {
            self.cfg.creds.name().to_owned()
        } else {
            peer.clone()
        };
        // Both ends checked the certificate at the handshake: the path ends with it.
        if let Ok(id) = crate::peers::peer_identity(&conn) {
            tokio::spawn(crate::hub::close_at_expiry(
                conn.clone(),
                peer.clone(),
                id.not_after,
                crate::hub::Tell::AtEnd,
            ));
        }
        let pc = PeerConn::new(conn, dialer);
        self.peers.register(&peer, pc.clone());
        tokio::spawn(self.clone().accept_direct_streams(peer, pc));
    }

    fn on_peer_addr(self: &Arc<Self>, pa: PeerAddr, gateway: SocketAddr) {
        let Some(addrs) = self.peers.on_peer_addr(&pa, gateway) else {
            return;
        };
        if self.peers.punch_failed_last(&pa.device) {
            debug!(peer = %pa.device, addrs = ?addrs, "hole punching towards peer again");
        } else {
            info!(peer = %pa.device, addrs = ?addrs, "hole punching towards peer");
        }
        let me = self.clone();
        tokio::spawn(async move {
            if let Some(conn) = me.peers.clone().punch(pa.device.clone(), addrs).await {
                me.add_direct(pa.device, conn, true);
            }
        });
    }

    async fn serve_stream(
        self: Arc<Self>,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        via: Via,
        holds: &Holds,
    ) {
        let t = self.cfg.tuning;
        let (header, rest) = match tokio::time::timeout(
            t.open_timeout,
            stream::read_header(&mut recv),
        )
        .await
        {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                if let Some(unlogged) = LogBudget::take_shared(&self.flood_lines) {
                    warn!(via = %via, error = %e, unlogged, "stream with an unreadable header refused");
                }
                stream::refuse(&mut send, RefuseCode::BadRequest, &e.to_string()).await;
                return;
            }
            // Said to the opener (its log reads the refusal, not "stream ended before its
            // reply"), as the gateway's hub does.
            Err(_) => {
                if let Some(unlogged) = LogBudget::take_shared(&self.flood_lines) {
                    warn!(via = %via, timeout_secs = t.open_timeout.as_secs(), unlogged, "stream header did not arrive in time: refused");
                }
                stream::refuse(&mut send, RefuseCode::BadRequest, "stream header timed out").await;
                return;
            }
        };
        let StreamHeader::Open {
            app,
            service,
            origin,
        } = header
        else {
            stream::refuse(
                &mut send,
                RefuseCode::BadRequest,
                "agents accept only Open streams",
            )
            .await;
            return;
        };
        // Stopping: the streams open finish, a new one is refused even when the gateway or
        // peer did not hear (in time) that this device offers nothing more.
        if self.draining.load(Ordering::Relaxed) {
            stream::refuse(&mut send, RefuseCode::Draining, "device stopping").await;
            return;
        }
        let me = self.cfg.creds.name();
        let (carry, via_text, _guard) = match &via {
            Via::Direct { peer, pc } => {
                match self
                    .peers
                    .permitted(peer, &service, self.gateways_lost_at())
                {
                    Some((app, revoked)) => (
                        Carry::Direct {
                            peer: peer.clone(),
                            app,
                            revoked,
                        },
                        "direct".to_owned(),
                        Some(pc.stream_guard()),
                    ),
                    None => {
                        if let Some(unlogged) = LogBudget::take_shared(&self.flood_lines) {
                            info!(peer = %peer, service = %service, unlogged, "direct stream refused: no gateway-approved stream from this peer yet");
                        }
                        stream::refuse(
                            &mut send,
                            RefuseCode::PolicyDenied,
                            "not approved by a gateway yet: use the relay",
                        )
                        .await;
                        return;
                    }
                }
            }
            Via::Gateway(gw) => match &origin {
                // A device other than the gateway itself: relayed, so end to end encrypted.
                Origin::Device { name, .. } if name != gw && name != me => {
                    match self.cfg.creds.noise_public_of(name) {
                        Ok(key) => (
                            Carry::E2e {
                                peer: name.clone(),
                                key,
                            },
                            gw.clone(),
                            None,
                        ),
                        Err(e) => {
                            // A peer retrying would write a line each.
                            if let Some(unlogged) = LogBudget::take_shared(&self.flood_lines) {
                                warn!(origin = %name, service = %service, via = %gw, error = %e, unlogged, "relayed stream refused");
                            }
                            stream::refuse(&mut send, RefuseCode::BadRequest, &e.to_string()).await;
                            return;
                        }
                    }
                }
                _ => (Carry::Plain, gw.clone(), None),
            },
        };
        let origin = match &carry {
            Carry::Direct { peer, .. } => format!("device {peer} (direct)"),
            _ => origin_text(&origin),
        };
        let started = Instant::now();
        let mut tcp: TcpStream = match self
            .cfg
            .services
            .connect_tcp(&service, t.tcp_keepalive)
            .await
        {
            Ok(t) => t,
            Err((code, reason)) => {
                // One per connection a client retries against a service that is down.
                if let Some(unlogged) = LogBudget::take_shared(&self.flood_lines) {
                    info!(app = %app, service = %service, origin = %origin, via = %via_text, reason = %reason, unlogged, "stream refused");
                }
                stream::refuse(&mut send, code, &reason).await;
                return;
            }
        };
        // Bounded like the header's read. Failed: the gateway or peer gave the stream up
        // while the service was being connected; the service sees a reset, not a clean close
        // of a connection that carried nothing.
        if !stream::accept(&mut send, t.open_timeout).await {
            crate::splice::End::abort(&mut tcp);
            if let Some(unlogged) = LogBudget::take_shared(&self.flood_lines) {
                info!(app = %app, service = %service, origin = %origin, via = %via_text, unlogged, "stream given up by its opener before it was accepted");
            }
            return;
        }
        // Watched: a local service that stops reading leaves the stream's data unread here,
        // counted against the connection's window shared with every other stream to us.
        let mut q = QuicStream::new(send, recv, rest).watched(holds, &app, &service);
        // Resolves once the other side acknowledged everything sent (or the stream is gone).
        let acked = q.send.stopped();
        let (m, app) = match carry {
            Carry::Plain => (splice(&mut q, &mut tcp).await, app),
            Carry::Direct { peer, app, revoked } => {
                // Ends when the gateway revokes the permit: the relay's own streams end when
                // the policy stops allowing them, and a direct one must not outlive that.
                let stop = async move {
                    revoked.cancelled().await;
                    "the gateway's policy no longer allows it".to_owned()
                };
                let tally = self.peers.counters(&peer).stream(true);
                let (mut local, mut theirs) = crate::splice::counted(&mut tcp, &mut q, &tally);
                (splice_until(&mut theirs, &mut local, stop).await, app)
            }
            Carry::E2e { peer, key } => {
                let secret = self.cfg.creds.noise_secret();
                let hs = e2e::respond(&mut q, secret, &key, &peer, me, &service);
                let mut s = match within(t.open_timeout, hs).await {
                    Ok(s) => s,
                    Err(why) => {
                        if let Some(unlogged) = LogBudget::take_shared(&self.flood_lines) {
                            warn!(origin = %origin, service = %service, via = %via_text, error = %why, unlogged, "relayed stream not served: reset");
                        }
                        // Both ends see a failure: a dropped stream and socket closed cleanly,
                        // a connection that carried nothing read as one that ended.
                        crate::splice::End::abort(&mut q);
                        crate::splice::End::abort(&mut tcp);
                        return;
                    }
                };
                // The gateway allowed this peer this service, and Noise proves the peer once
                // its first frame opens (a handshake alone can be a replay): it may use the
                // service over a direct path too.
                let (agent, p, svc, a) = (self.clone(), peer.clone(), service.clone(), app.clone());
                s.on_first_frame(move || agent.granted(&p, &svc, &a, started));
                self.peers.reached(&peer);
                let tally = self.peers.counters(&peer).stream(false);
                let (mut local, mut theirs) = crate::splice::counted(&mut tcp, &mut s, &tally);
                let ended = self.peers.peer_ended(&peer);
                (splice_until(&mut theirs, &mut local, ended).await, app)
            }
        };
        let (up, down) = (m.a_to_b, m.b_to_a);
        let clean = m.is_clean();
        info!(
            app = %app,
            service = %service,
            origin = %origin,
            via = %via_text,
            bytes_in = up,
            bytes_out = down,
            ms = started.elapsed().as_millis() as u64,
            error = m.error.map(|e| e.to_string()).unwrap_or_default(),
            // Why it was cut (the policy, the peer revoked), in its one line.
            cut = m.stopped.as_deref().unwrap_or_default(),
            "connection done"
        );
        // Its last bytes acknowledged before the task ends (a stop waits for it): the
        // service's socket and the direct path's guard are let go first.
        drop(tcp);
        drop(_guard);
        until_acked(acked, clean, &t).await;
    }

    /// A relayed stream from `peer` for `service` (accepted at `opened`) proved its origin:
    /// the peer may use the service directly too. A new permit is reported to every gateway
    /// connected now, so that whichever applies a policy change can revoke it (the one that
    /// relayed the stream may be down by then).
    fn granted(&self, peer: &str, service: &str, app: &str, opened: Instant) {
        if !self.peers.grant(peer, service, app, opened) {
            return;
        }
        for link in self.links() {
            if let Some(ctl) = link.ctl() {
                // Queued even when the queue is full: a gateway that missed it could not
                // revoke the permit until the next session.
                let held = vec![(peer.to_owned(), service.to_owned())];
                tokio::spawn(async move { ctl.apply(move |s| s.send_permits_held(held)).await });
            }
        }
    }

    /// When this agent lost its last usable gateway link, if it has none now. A link that is
    /// draining counts as lost just now; one never up does not count (a link added during an
    /// outage moved the loss to its first failed dial), unless none was ever up: then now.
    fn gateways_lost_at(&self) -> Option<Instant> {
        let now = Instant::now();
        let (list, retired_lost) = {
            let l = self.links.lock().unwrap_or_else(|p| p.into_inner());
            (l.list.clone(), l.retired_lost)
        };
        // Links the zone config dropped count with when they were last usable.
        let mut latest: Option<Instant> = retired_lost;
        for l in list {
            if l.usable().is_some() {
                return None;
            }
            // Never up: no loss to count.
            let lost = l
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .lost_at(now);
            if let Some(t) = lost {
                latest = Some(latest.map_or(t, |x| x.max(t)));
            }
        }
        latest.or(Some(now))
    }

    /// Usable gateway links for a stream to `device`: its own link first when it is a
    /// gateway (another gateway cannot reach it: gateways do not connect to each other), then
    /// the others in the zone config's order.
    fn links_for(&self, device: &str) -> Vec<(Arc<GatewayLink>, Connection)> {
        let mut v: Vec<_> = self
            .links()
            .iter()
            .filter_map(|l| l.usable().map(|c| (l.clone(), c)))
            .collect();
        v.sort_by_key(|(l, _)| l.name != device);
        v
    }

    async fn forward_loop(
        self: Arc<Self>,
        f: Forward,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) {
        crate::sockets::keepalive_accepted(&listener, self.cfg.tuning.tcp_keepalive);
        crate::sockets::bound_unsent_accepted(&listener);
        // Bounded: a local program opening connections in a loop would otherwise take every
        // file descriptor, and with them the services' and the UDP flows' sockets. Past the
        // bound the kernel's backlog holds newcomers until one ends.
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_FORWARD_CONNECTIONS));
        loop {
            let slot = tokio::select! {
                _ = shutdown.cancelled() => return,
                s = slots.clone().acquire_owned() => match s {
                    Ok(s) => s,
                    Err(_) => return,
                },
            };
            let Some((tcp, peer)) = crate::sockets::accept_until(&listener, &shutdown).await else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            let one = self.clone().forward_one(f.clone(), tcp, peer);
            // Tracked for the drain (the loop stops accepting as the stop begins).
            self.forwarded.spawn(async move {
                one.await;
                drop(slot);
            });
        }
    }

    /// One local connection of a forward: direct to the peer when possible, else relayed.
    async fn forward_one(self: Arc<Self>, f: Forward, tcp: TcpStream, client: SocketAddr) {
        // A local client's end: an answer the service gave before the upload ended must reach
        // it whole (a lingering close).
        let mut tcp = crate::linger::Lingering::new(tcp, None, None);
        let to = format!("{}/{}", f.device, f.service);
        let me = self.cfg.creds.name();
        let t = self.cfg.tuning;
        let started = Instant::now();
        // A zone device other than us and the gateways: a mesh peer.
        let mesh_peer = f.device != me && !self.links().iter().any(|l| l.name == f.device);
        // A second try when the first connection failed: after a simultaneous open the
        // peer closes its duplicate, and an open racing that close can still go direct on
        // the connection the peer kept. (The client's bytes are not read yet.)
        let mut tries = if mesh_peer { 2 } else { 0 };
        while tries > 0 {
            tries -= 1;
            let Some(pc) = self.peers.direct(&f.device) else {
                break;
            };
            {
                let _guard = pc.stream_guard();
                let header = StreamHeader::Open {
                    app: RELAY_APP.into(),
                    service: f.service.clone(),
                    origin: Origin::Device {
                        name: me.to_owned(),
                        addr: None,
                    },
                };
                match stream::open_direct(&pc.conn, &f.device, &header, t.open_timeout).await {
                    Ok(q) => {
                        // Answered: the peer has this connection too.
                        self.peers.confirm(&f.device, &pc);
                        // Watched: a local client that stops reading the peer's answer leaves
                        // it unread here, against the window of every stream on this path.
                        let holds = self.holds_of(&pc.conn, &f.device);
                        let mut q = q.watched(&holds, RELAY_APP, &f.service);
                        let acked = q.send.stopped();
                        let m = {
                            let tally = self.peers.counters(&f.device).stream(true);
                            let (mut local, mut theirs) =
                                crate::splice::counted(&mut tcp, &mut q, &tally);
                            splice(&mut local, &mut theirs).await
                        };
                        let (up, down) = (m.a_to_b, m.b_to_a);
                        info!(to = %to, via = "direct", client = %client, bytes_up = up, bytes_down = down, ms = started.elapsed().as_millis() as u64, "forward connection done");
                        until_acked(acked, m.is_clean(), &t).await;
                        return;
                    }
                    Err(OpenError::Refused { code, reason, .. }) => {
                        // An answer all the same: the peer has this connection.
                        self.peers.confirm(&f.device, &pc);
                        // The peer's service itself is missing or down: the relay ends at the
                        // same device, which would try the same connect again (seconds more
                        // for the client, for the same answer).
                        if matches!(
                            code,
                            RefuseCode::NoSuchService | RefuseCode::ServiceUnreachable
                        ) {
                            if let Some((repeats, unlogged)) = self.repeat_lines(&to, &reason) {
                                info!(listen = %f.listen, to = %to, client = %client, via = "direct", %code, reason = %reason, repeats, unlogged, "forward refused");
                            }
                            crate::splice::End::abort(&mut tcp);
                            return;
                        }
                        debug!(to = %to, %code, reason = %reason, "direct stream refused: using the relay");
                        break;
                    }
                    Err(e) => {
                        self.peers
                            .forget_direct(&f.device, &pc.conn, &e.to_string());
                    }
                }
            }
        }
        let mut links = self.links_for(&f.device);
        if !mesh_peer {
            // A gateway's own service: over its own link only. Relayed by another gateway,
            // the stream would cross it in plaintext (end-to-end encryption is between mesh
            // peers), for that gateway to read.
            links.retain(|(l, _)| l.name == f.device);
        }
        if links.is_empty() {
            if let Some((repeats, unlogged)) = self.repeat_lines(&to, "no gateway, no direct path")
            {
                warn!(listen = %f.listen, to = %to, client = %client, repeats, unlogged, "forward refused: no gateway connected that reaches it, and no direct path");
            }
            crate::splice::End::abort(&mut tcp);
            return;
        }
        let peer_key = if mesh_peer {
            match self.cfg.creds.noise_public_of(&f.device) {
                Ok(k) => Some(k),
                Err(e) => {
                    if let Some((repeats, unlogged)) = self.repeat_lines(&to, &e.to_string()) {
                        warn!(to = %to, client = %client, error = %e, repeats, unlogged, "forward refused");
                    }
                    crate::splice::End::abort(&mut tcp);
                    return;
                }
            }
        } else {
            None
        };
        let header = StreamHeader::Relay {
            app: RELAY_APP.into(),
            to_device: f.device.clone(),
            service: f.service.clone(),
        };
        // The first gateway that reaches the device: one that answers "offline" (the device
        // is connected elsewhere), is draining or overloaded, or does not answer, leaves the
        // next to try; a refusal by policy or by the device is the answer.
        let mut opened = None;
        let mut last_error = None;
        for (link, conn) in links {
            match stream::open(&conn, &link.name, &header, t.open_timeout).await {
                Ok(q) => {
                    // Watched, as a direct stream above, against this gateway connection.
                    let holds = self.holds_of(&conn, &link.name);
                    opened = Some((link, q.watched(&holds, RELAY_APP, &f.service), holds));
                    break;
                }
                Err(e) if another_gateway_may_reach(&e) => {
                    debug!(to = %to, via = %link.name, reason = %e, "forward: trying the next gateway");
                    last_error = Some(e);
                }
                Err(e) => {
                    last_error = Some(e);
                    break;
                }
            }
        }
        let Some((link, q, _holds)) = opened else {
            // What the refusal says of the peer (a gateway's own services are no peer's). The
            // wire's DeviceOffline also carries "not in the zone config" and "revoked": a
            // peer this device's own zone config lists, not revoked, is offline.
            if mesh_peer {
                match &last_error {
                    Some(OpenError::Offline(_))
                    | Some(OpenError::Refused {
                        code: RefuseCode::DeviceOffline,
                        ..
                    }) if self.cfg.creds.standing(&f.device) == Standing::Listed => {
                        let reason = last_error.as_ref().map(|e| e.to_string());
                        self.peers.offline(&f.device, &reason.unwrap_or_default());
                    }
                    // It answered: online, whatever its service did.
                    Some(OpenError::Refused {
                        code: RefuseCode::NoSuchService | RefuseCode::ServiceUnreachable,
                        ..
                    }) => self.peers.reached(&f.device),
                    _ => {}
                }
            }
            let reason = last_error.map(|e| e.to_string()).unwrap_or_default();
            if let Some((repeats, unlogged)) = self.repeat_lines(&to, &reason) {
                info!(listen = %f.listen, to = %to, client = %client, reason = %reason, repeats, unlogged, "forward refused");
            }
            // Reset, not closed: a client that only reads (`nc host port > dump`) took the
            // clean end of an empty stream for success.
            crate::splice::End::abort(&mut tcp);
            return;
        };
        if mesh_peer {
            self.peers.reached(&f.device);
        }
        let mut q = q;
        let acked = q.send.stopped();
        let (m, via) = match peer_key {
            None => (splice(&mut tcp, &mut q).await, link.name.clone()),
            Some(key) => {
                let secret = self.cfg.creds.noise_secret();
                let hs = e2e::initiate(&mut q, secret, &key, me, &f.device, &f.service);
                let mut s = match within(t.open_timeout, hs).await {
                    Ok(s) => s,
                    Err(why) => {
                        // A line per local connection, whatever the peer does: budgeted.
                        if let Some(unlogged) = LogBudget::take_shared(&self.flood_lines) {
                            warn!(to = %to, via = %link.name, client = %client, error = %why, unlogged, "forward connection reset");
                        }
                        // The local client sees a failure, not a connection that ended.
                        crate::splice::End::abort(&mut q);
                        crate::splice::End::abort(&mut tcp);
                        return;
                    }
                };
                // The relayed stream works, so the gateway allows us there: try to go direct
                // for the next ones.
                if self.peers.should_request_punch(&f.device) {
                    let d = f.device.clone();
                    let sent = link
                        .ctl()
                        .is_some_and(|ctl| ctl.try_apply(move |s| s.request_punch(d)));
                    // Dropped (a full command queue, the session gone): the next relayed
                    // stream asks again, not 30 s later.
                    if !sent {
                        self.peers.punch_request_lost(&f.device);
                    }
                }
                let tally = self.peers.counters(&f.device).stream(false);
                let (mut local, mut theirs) = crate::splice::counted(&mut tcp, &mut s, &tally);
                let ended = self.peers.peer_ended(&f.device);
                let m = splice_until(&mut local, &mut theirs, ended).await;
                (m, format!("{} (e2e)", link.name))
            }
        };
        let (up, down) = (m.a_to_b, m.b_to_a);
        info!(to = %to, via = %via, client = %client, bytes_up = up, bytes_down = down, ms = started.elapsed().as_millis() as u64, cut = m.stopped.as_deref().unwrap_or_default(), "forward connection done");
        until_acked(acked, m.is_clean(), &t).await;
    }
}

/// An end-to-end handshake `hs` within `limit`, or why it failed (for the log line).
async fn within<S>(
    limit: Duration,
    hs: impl std::future::Future<Output = Result<S, e2e::E2eError>>,
) -> Result<S, String> {
    match tokio::time::timeout(limit, hs).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("end-to-end handshake failed: {e}")),
        Err(_) => Err("end-to-end handshake timed out".to_owned()),
    }
}

/// After a splice that ended cleanly, waits (at most `agent_drain`) until the peer
/// acknowledged the stream's last bytes (a stream's whole window, 4 MiB: seconds on a home
/// uplink), served streams and forwards alike: a stop closes the connections once their
/// tasks are done, and that close throws away what quinn has not yet sent. Usually a round
/// trip. Not after a failure: a stream we reset is dropped by quinn without a wake-up, and the
/// wait would last the whole time.
async fn until_acked(acked: impl std::future::Future, clean: bool, t: &Tuning) {
    if clean && !t.agent_drain.is_zero() {
        stream::until_acked(acked, t.agent_drain).await;
    }
}

/// The gateways of a zone config as (name, address) pairs, in its order.
fn zone_gateways(zone: &zone_core::SignedZone) -> Vec<(String, SocketAddr)> {
    zone.config
        .gateway_addrs()
        .into_iter()
        .map(|(n, a)| (n.to_string(), a))
        .collect()
}

/// The gateways an agent with `cfg` links to — its own list, else the zone config's — one
/// entry per gateway but itself, revoked ones left out.
fn wanted_gateways(cfg: &AgentConfig) -> Vec<(String, Vec<SocketAddr>)> {
    let list = if cfg.gateways.is_empty() {
        zone_gateways(&cfg.creds.zone())
    } else {
        cfg.gateways.clone()
    };
    let mut groups = gateway_groups(list, cfg.creds.name());
    groups.retain(|(name, _)| !cfg.creds.is_revoked(name));
    groups
}

/// One entry per gateway (but `me`), with its addresses in the order listed.
fn gateway_groups(list: Vec<(String, SocketAddr)>, me: &str) -> Vec<(String, Vec<SocketAddr>)> {
    let mut by_name: Vec<(String, Vec<SocketAddr>)> = Vec::new();
    for (name, addr) in list {
        if name == me {
            continue;
        }
        match by_name.iter_mut().find(|(n, _)| *n == name) {
            Some((_, addrs)) if !addrs.contains(&addr) => addrs.push(addr),
            Some(_) => {}
            None => by_name.push((name, vec![addr])),
        }
    }
    by_name
}

/// Whether a stream another gateway refused this way may get through another gateway.
fn another_gateway_may_reach(e: &OpenError) -> bool {
    match e {
        OpenError::Refused { code, .. } => matches!(
            code,
            RefuseCode::DeviceOffline | RefuseCode::Draining | RefuseCode::Overloaded
        ),
        OpenError::Offline(_) | OpenError::Timeout(_) | OpenError::Tunnel { .. } => true,
        // Another gateway may hold a newer zone config that lists it.
        OpenError::NotInZone(_) => true,
        // Revoked for good: no gateway lets it in.
        OpenError::Revoked(_) => false,
    }
}

type Flows = Arc<Mutex<FlowTable<FlowEnd>>>;

#[derive(Debug)]
struct FlowEnd {
    sock: Arc<UdpSocket>,
    stop: CancellationToken,
    activity: Arc<FlowActivity>,
    /// Datagrams to the service its socket would not take (a full send buffer, an ICMP
    /// error pending): the gateway counted them as passed on, so the flow's done line says.
    dropped_up: Arc<std::sync::atomic::AtomicU64>,
}

async fn read_datagrams(conn: Connection, flows: Flows, gateway: String) {
    let mut lines = LogBudget::new(1);
    let mut dropped = 0u64;
    let (mut bad_lines, mut undecodable) = (LogBudget::new(1), 0u64);
    while let Ok(d) = conn.read_datagram().await {
        let Ok((id, payload)) = proto::decode_datagram_bytes(d) else {
            undecodable += 1;
            if bad_lines.take().is_some() {
                warn!(%gateway, undecodable, "UDP datagrams from the gateway that are no flow's datagram: dropped (a gateway of another version?)");
                undecodable = 0;
            }
            continue;
        };
        let sock = {
            let mut table = flows.lock().unwrap_or_else(|p| p.into_inner());
            let open = table
                .get(id)
                .map(|f| (f.sock.clone(), f.activity.clone(), f.dropped_up.clone()));
            if open.is_none() {
                // Its open may be right behind on the control stream. A copy: the payload is a
                // slice of quinn's receive buffer, a whole packet (or batch) that an empty
                // datagram, counted as 0 bytes against the bound, kept alive.
                table.hold_early(id, bytes::Bytes::copy_from_slice(&payload), Instant::now());
            }
            dropped += table.take_dropped();
            open
        };
        if dropped > 0 && lines.take().is_some() {
            info!(%gateway, dropped, "UDP datagrams dropped for a flow not open: too many flows were opening at once, an open came more than 2 s after its datagrams, or they came just after their flow closed (the gateway counted them as passed on)");
            dropped = 0;
        }
        if let Some((s, activity, dropped_up)) = sock {
            activity.touch();
            // Not awaited: one flow whose socket's send buffer is full (a service on a slow
            // link) held up every flow's datagrams behind it. A datagram the kernel will not
            // take now is dropped, as UDP may, and counted for the flow's done line.
            if socket2::SockRef::from(&*s).send(&payload).is_err() {
                dropped_up.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

pub fn origin_text(o: &Origin) -> String {
    match o {
        Origin::Public(a) => format!("public {a}"),
        Origin::Device {
            name,
            addr: Some(a),
        } => format!("device {name} ({a})"),
        Origin::Device { name, addr: None } => format!("device {name}"),
    }
}

/// This device's address behind its NAT as told to one gateway in this session
/// (`LocalAddrs`), for peers behind the same NAT.
#[derive(Default)]
struct LanReport {
    /// `None` until first looked up; then what the gateway was last told (or, before any
    /// report, that there was nothing to tell).
    told: Option<Option<SocketAddr>>,
}

impl LanReport {
    /// Looks the address up and tells the gateway when it changed (an empty list when there
    /// is none any more: the gateway then stops handing out the old one).
    fn update(
        &mut self,
        agent: &Agent,
        link: &GatewayLink,
        conn: &Connection,
        session: &mut crate::proto::session::ControlSession,
    ) {
        // The address this session's gateway saw at its welcome.
        let observed = link
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observed;
        let now = agent
            .endpoint
            .local_addr()
            .ok()
            .zip(observed)
            .and_then(|(bound, observed)| {
                crate::candidates::lan_candidate(bound, conn.remote_address(), observed)
            });
        let first = self.told.is_none();
        if self.told == Some(now) || (first && now.is_none()) {
            self.told = Some(now);
            return;
        }
        match session.send_local_addrs(now.into_iter().collect()) {
            Ok(()) if first => {
                debug!(gateway = %link.name, lan = ?now, "reporting this device's address behind its NAT");
            }
            Ok(()) => {
                let was = self.told.flatten();
                info!(gateway = %link.name, device = %agent.cfg.creds.name(), lan = ?now, was = ?was, "this device's address behind its NAT changed: told the gateway");
            }
            Err(e) => {
                debug!(gateway = %link.name, error = %e, "local address not reported");
                return;
            }
        }
        self.told = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn failed_dials_and_short_sessions_do_not_move_when_a_link_was_lost() {
        let mut s = LinkState::default();
        // Never up: never lost.
        s.session_over();
        assert_eq!(s.down_since, None);
        s.up_since = Some(Instant::now());
        let (up, _) = s.session_over();
        assert!(up.is_some());
        let down = s.down_since.expect("lost once its first session ended");
        std::thread::sleep(Duration::from_millis(5));
        // Redials that never came up, and one the gateway closed at once.
        for _ in 0..3 {
            assert!(s.session_over().0.is_none());
        }
        s.up_since = Some(Instant::now());
        s.session_over();
        assert_eq!(s.down_since, Some(down));
        // A session that was up a while and ended: lost from its end.
        s.up_since = Instant::now().checked_sub(HEALTHY_AFTER);
        s.session_over();
        assert!(s.down_since.is_some_and(|t| t > down));
    }

    #[test]
    fn dial_order_is_last_good_then_ipv4_then_ipv6() {
        let link = GatewayLink::new(
            "gw".into(),
            vec![
                a("[2001:db8::1]:4433"),
                a("198.51.100.1:4433"),
                a("[2001:db8::2]:4433"),
                a("198.51.100.2:4433"),
            ],
        );
        let dual = Some(a("[::]:5000"));
        assert_eq!(
            link.dial_order(dual),
            [
                a("198.51.100.1:4433"),
                a("198.51.100.2:4433"),
                a("[2001:db8::1]:4433"),
                a("[2001:db8::2]:4433")
            ]
        );
        link.set(|s| s.addr = Some(a("[2001:db8::2]:4433")));
        assert_eq!(
            link.dial_order(dual),
            [
                a("[2001:db8::2]:4433"),
                a("198.51.100.1:4433"),
                a("198.51.100.2:4433"),
                a("[2001:db8::1]:4433")
            ]
        );
        // An IPv4 socket reaches the IPv4 ones only; a last address the zone config no longer
        // lists is not dialed.
        link.set(|s| {
            s.addrs
                .retain(|x| x.port() == 4433 && *x != a("[2001:db8::2]:4433"))
        });
        assert_eq!(
            link.dial_order(Some(a("0.0.0.0:5000"))),
            [a("198.51.100.1:4433"), a("198.51.100.2:4433")]
        );
    }
}
