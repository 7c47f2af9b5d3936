//! Direct device↔device paths of a node agent: the peer table, UDP hole punching and the rule
//! that decides which streams may use a direct path (DESIGN.md, "Device↔device").
//!
//! # How a direct path comes to be
//!
//! 1. Device A's forward opens a relayed stream to B's service through the gateway (policy
//!    decided there, Noise end to end: [`crate::e2e`]). Once B accepted it, A sends the gateway
//!    `PunchRequest{B}` (at most once per [`PUNCH_INTERVAL`] per peer, never while a direct path
//!    is up).
//! 2. The gateway sends `PeerAddr` to both: each learns the other's address as the gateway sees
//!    it (its NAT's public side) and a shared nonce; two devices behind the same public
//!    address also learn each other's LAN address ([`crate::candidates`]), dialed first.
//! 3. Both dial each other from the agent's one QUIC endpoint, the same UDP socket that talks to
//!    the gateway, so the NAT mapping the gateway saw is the one the peer aims at, and both
//!    accept (simultaneous open). Mutual TLS with zone certificates, server name `B.DOMAIN`, as
//!    with the gateway. Each outgoing Initial also opens our NAT for the peer's packets.
//! 4. Both sides may end up with two connections (or more, over several rounds). Streams use
//!    the best one by the same rule on both sides: one known to be up at the peer's end too
//!    (*confirmed*: we accepted it — the dialer's handshake finishes first — or a stream on
//!    it was answered or came from the peer), then one dialed by the lexicographically
//!    smaller device name, then the newest. Only a connection's dialer closes it as a
//!    duplicate (once no stream uses it), and only when its best is confirmed: a QUIC
//!    client's handshake finishes half a round trip before the server's, so the dialer of
//!    the preferred connection cannot tell whether the peer ever finished accepting it, and
//!    closing the peer's dial then could leave the peer with no connection at all. The one
//!    the peer dialed stays until the peer closes it ([`MAX_SPARE`] at most).
//!
//! # Which streams may go direct
//!
//! Policy lives on the gateway. B remembers, per peer, the services for which the gateway
//! delivered it a relayed stream from that peer whose Noise handshake proved the origin
//! (a *permit*, valid [`PERMIT_TTL`]). A direct `Open` from a peer (identified by its TLS
//! certificate, never by the header) is served only for a permitted service; B still serves only
//! its named services. A refused or failed direct open falls back to the relay, which renews the
//! permit. When the policy stops allowing a (peer, service) it once relayed (an edit, a time
//! window's end), the gateway sends B `PermitRevoke`: the permit goes and the direct streams
//! opened under it end, as relayed ones do. A direct path that dies is dropped and later
//! streams use the relay again.
//!
//! Direct paths do not need the gateway once up: they keep working while it is down.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::candidates;
use crate::creds::DeviceCreds;
use crate::error::TunnelError;
use crate::log_budget::LogBudget;
use crate::proto::PeerAddr;
use crate::status::PeerStatus;

/// Minimum time between two punch requests for the same peer: a failed punch (symmetric NAT)
/// is retried now and then, in case the NAT changed, without flooding the gateway.
pub const PUNCH_INTERVAL: Duration = Duration::from_secs(30);
/// Dial attempts per punching round, each bounded by [`PUNCH_ATTEMPT`]. Each attempt sends
/// QUIC Initials (quinn retransmits them within the attempt); three cover the case where the
/// peer's first packets arrive before our NAT opened for them.
pub const PUNCH_ATTEMPTS: u32 = 3;
pub const PUNCH_ATTEMPT: Duration = Duration::from_secs(2);
/// Attempts a round adds, at most, for addresses that came during its last one.
pub const PUNCH_EXTRA_ATTEMPTS: u32 = 2;
/// How long a round's LAN addresses are dialed alone before the others: a LAN handshake takes
/// a few milliseconds, and whichever connection comes up first is kept.
pub const LAN_HEAD_START: Duration = Duration::from_millis(150);
/// How long a gateway-approved (peer, service) may open new direct streams without passing
/// through the gateway again. Streams already open run until the gateway revokes the permit
/// (`PermitRevoke`, sent as the policy stops allowing it, and again at each new session for
/// the permits the agent reports holding, `PermitsHeld`).
pub const PERMIT_TTL: Duration = Duration::from_secs(15 * 60);
/// Check interval of a retired duplicate connection that still carries streams.
const RETIRE_POLL: Duration = Duration::from_millis(500);
/// Close code of a duplicate direct connection.
const CLOSE_DUPLICATE: u32 = 10;
/// Retired connections to one peer that may wait for their streams to end. Past it a further
/// duplicate is closed at once, streams or not: a peer that left a stream open on each
/// connection it made us retire (one per punching round) would otherwise pile up connections,
/// each with its own stream and receive windows.
pub const MAX_RETIRING: usize = 4;
/// Open connections to one peer kept besides the one streams use (the peer's duplicates it
/// has not closed yet, ours waiting for the best to be confirmed). Past it the oldest is
/// closed at once: a peer dialing again and again cannot pile them up.
pub const MAX_SPARE: usize = 4;

/// One direct QUIC connection to a peer.
#[derive(Debug, Clone)]
pub struct PeerConn {
    pub conn: Connection,
    /// Device that dialed it.
    pub dialer: String,
    /// Streams in use on it (ours and the peer's): a retired duplicate is closed at zero.
    active: Arc<AtomicUsize>,
    /// Known to be up at the peer's end too (see the module doc, step 4).
    confirmed: Arc<AtomicBool>,
}

impl PeerConn {
    pub fn new(conn: Connection, dialer: String) -> Self {
        PeerConn {
            conn,
            dialer,
            active: Arc::new(AtomicUsize::new(0)),
            confirmed: Arc::new(AtomicBool::new(false)),
        }
    }
    fn live(&self) -> bool {
        self.conn.close_reason().is_none()
    }
    fn is_confirmed(&self) -> bool {
        self.confirmed.load(Ordering::Relaxed)
    }
    /// Marks a stream in use until the guard drops.
    pub fn stream_guard(&self) -> StreamGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.active.clone())
    }
}

/// See [`PeerConn::stream_guard`].
#[derive(Debug)]
pub struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Byte and stream counters of one peer.
#[derive(Debug, Default)]
pub struct PeerCounters {
    /// Streams ended, per path.
    pub streams_direct: AtomicU64,
    pub streams_relay: AtomicU64,
    /// Streams open now, per path: a relayed stream opened before the direct path came up
    /// stays relayed for its life (etcd's raft streams: for good), which `path` alone hid.
    pub open_direct: AtomicU64,
    pub open_relay: AtomicU64,
    /// Payload bytes, counted as they are written (not when a stream ends: a stream open for
    /// days showed nothing until it closed).
    pub bytes_direct_out: AtomicU64,
    pub bytes_direct_in: AtomicU64,
    pub bytes_relay_out: AtomicU64,
    pub bytes_relay_in: AtomicU64,
}

impl PeerCounters {
    /// A stream to or from the peer over the direct path or the relay, open from now until
    /// the returned tally is dropped; its ends count their bytes into it as they are written
    /// ([`crate::splice::counted`], the local end as the client's, the peer's stream as the
    /// tunnel's).
    pub fn stream(self: &Arc<Self>, direct: bool) -> PeerStream {
        let open = match direct {
            true => &self.open_direct,
            false => &self.open_relay,
        };
        open.fetch_add(1, Ordering::Relaxed);
        PeerStream {
            counters: self.clone(),
            direct,
        }
    }
}

/// One open stream of a peer ([`PeerCounters::stream`]).
#[derive(Debug)]
pub struct PeerStream {
    counters: Arc<PeerCounters>,
    direct: bool,
}

impl crate::splice::Tally for PeerStream {
    fn add(&self, flow: crate::splice::Flow, n: u64) {
        let c = &self.counters;
        let (out, inn) = match self.direct {
            true => (&c.bytes_direct_out, &c.bytes_direct_in),
            false => (&c.bytes_relay_out, &c.bytes_relay_in),
        };
        match flow {
            // Into the peer's stream: sent to the peer.
            crate::splice::Flow::In => out.fetch_add(n, Ordering::Relaxed),
            crate::splice::Flow::Out => inn.fetch_add(n, Ordering::Relaxed),
        };
    }
}

impl Drop for PeerStream {
    fn drop(&mut self) {
        let c = &self.counters;
        let (open, ended) = match self.direct {
            true => (&c.open_direct, &c.streams_direct),
            false => (&c.open_relay, &c.streams_relay),
        };
        open.fetch_sub(1, Ordering::Relaxed);
        ended.fetch_add(1, Ordering::Relaxed);
    }
}

/// A registered direct connection and when it came (newer ones count as better on a tie).
#[derive(Debug)]
struct Held {
    pc: PeerConn,
    seq: u64,
}

/// What settling a peer's connections changed, for the log (outside the table's lock).
enum PathChange {
    Same,
    Up(Connection),
    Moved(Connection),
    Lost,
}

#[derive(Debug, Default)]
struct PeerState {
    /// Open direct connections; streams use the best ([`PeerState::best`]).
    conns: Vec<Held>,
    next_seq: u64,
    /// The connection streams used when last settled (its stable id), to log changes.
    in_use: Option<usize>,
    /// Retired connections still open for their streams (see [`MAX_RETIRING`]).
    retiring: Arc<AtomicUsize>,
    /// A punching round is running: a further `PeerAddr` starts no other round (our running
    /// round keeps our NAT open towards the peer), but its addresses replace the round's.
    punching: bool,
    /// Addresses of a `PeerAddr` that came while the round ran (the peer restarted on another
    /// port, its NAT moved it): the round's next attempt dials these instead.
    fresh_addrs: Option<Vec<SocketAddr>>,
    /// `next_seq` when the running (or last) round began: only a connection registered since
    /// ends it early.
    round_from: u64,
    last_punch_request: Option<Instant>,
    last_nonce: Option<u64>,
    punches: u64,
    direct_connects: u64,
    /// By service: what the gateway let this peer reach here directly.
    permits: HashMap<String, Permit>,
    /// By service: when a gateway last revoked the permit. A relayed stream opened before
    /// that grants nothing (its first frame can arrive after the revocation).
    revoked_at: HashMap<String, Instant>,
    counters: Arc<PeerCounters>,
    last_error: Option<String>,
    /// The gateways said the peer is offline at the last relayed open; cleared by a stream
    /// that reaches it or comes from it, or a direct connection ([`Peers::offline`]).
    offline: bool,
    /// Fired when the zone config revokes the peer: its relayed, end-to-end encrypted streams
    /// end here, at this end, not only where a relaying gateway chooses to end them.
    revoked: CancellationToken,
}

/// How often [`Peers::peer_ended`] looks at a peer's certificate end again.
const RECHECK_END: Duration = Duration::from_secs(600);

/// A peer's leave to use one service here over a direct path.
#[derive(Debug)]
struct Permit {
    /// The app the gateway decided it under.
    app: String,
    until: Instant,
    /// Fired when the gateway revokes it (or the peer is revoked): the direct streams opened
    /// under it end, as the relay ends the relayed ones.
    stop: CancellationToken,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The agent's table of mesh peers.
#[derive(Debug)]
pub struct Peers {
    creds: Arc<DeviceCreds>,
    endpoint: Endpoint,
    /// How peers are dialed ([`crate::transport::peer_client_config`]): not the endpoint's
    /// default, which is for gateways.
    dial: quinn::ClientConfig,
    table: Mutex<HashMap<String, PeerState>>,
    /// Told of each zone config adopted ([`Peers::cut_revoked`]): a peer's certificate end
    /// may have moved (a renewal, a shorter re-issue).
    adopted: tokio::sync::Notify,
    /// Lines about direct paths and connections, which a zone device dialing this one over
    /// and over causes one or two per handshake: [`PATH_LINES_PER_SECOND`] a second.
    lines: Mutex<LogBudget>,
    /// Set by [`Peers::close_all`] (the agent stopping): a direct connection a punching round
    /// still running completes after that is closed, not taken in — it outlived the stop.
    closed: AtomicBool,
}

/// Lines a second of [`Peers::lines`], as many as the agent allows its other flood lines.
const PATH_LINES_PER_SECOND: u32 = 10;

impl Peers {
    pub fn new(creds: Arc<DeviceCreds>, endpoint: Endpoint, dial: quinn::ClientConfig) -> Self {
        Peers {
            creds,
            endpoint,
            dial,
            table: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            adopted: tokio::sync::Notify::new(),
            lines: Mutex::new(LogBudget::new(PATH_LINES_PER_SECOND)),
        }
    }

    /// The table entry of `peer` (made on first use).
    fn with<R>(&self, peer: &str, f: impl FnOnce(&mut PeerState) -> R) -> R {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        f(t.entry(peer.to_owned()).or_default())
    }

    pub fn counters(&self, peer: &str) -> Arc<PeerCounters> {
        self.with(peer, |s| s.counters.clone())
    }

    /// The gateways said `peer` is offline (`why`) when a stream to it was opened: `/status`
    /// says so, not `relay` with the gateway's RTT as if it were reached that way.
    pub fn offline(&self, peer: &str, why: &str) {
        self.with(peer, |s| {
            s.offline = true;
            s.last_error = Some(why.to_owned());
        });
    }

    /// A stream reached `peer`, or came from it: it is online.
    pub fn reached(&self, peer: &str) {
        self.with(peer, |s| s.offline = false);
    }

    /// True when the newest zone config revokes `peer`. A revoked peer loses its direct path
    /// and its permits at once: the direct path bypasses the gateway, so this device must
    /// enforce the revocation itself.
    fn cut_if_revoked(&self, peer: &str) -> bool {
        let revoked = self.creds.is_revoked(peer);
        if revoked {
            self.with(peer, |s| {
                for h in s.conns.drain(..) {
                    h.pc.conn.close(0u32.into(), b"device revoked");
                }
                s.in_use = None;
                s.permits.clear();
                s.revoked.cancel();
            });
        }
        revoked
    }

    /// A newer zone config was adopted: every peer it revokes loses its direct path and its
    /// permits now, not at its next stream (a long-lived stream on the direct path would
    /// otherwise outlive the revocation). Retired duplicates close at their next check.
    pub fn cut_revoked(&self) {
        self.adopted.notify_waiters();
        let peers: Vec<String> = self
            .table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for peer in peers {
            let had_direct = self.with(&peer, |s| !s.conns.is_empty());
            if self.cut_if_revoked(&peer) && had_direct {
                info!(peer = %peer, "peer revoked by the zone config: direct path closed");
            }
        }
    }

    /// Resolves, with the reason, when an end-to-end stream with `peer` must end: the zone
    /// config revokes the peer, or its certificate ends (as the newest zone config says: each
    /// one adopted is looked at again). The relaying gateway ends such streams too, but
    /// the encryption is there so that the ends need not trust it.
    pub async fn peer_ended(&self, peer: &str) -> String {
        let revoked = self.with(peer, |s| s.revoked.clone());
        let Ok(name) = zone_core::DeviceName::new(peer) else {
            return format!("{peer:?} is no device name");
        };
        loop {
            // Enabled before the config is read: one adopted meanwhile is not missed.
            let adopted = self.adopted.notified();
            tokio::pin!(adopted);
            adopted.as_mut().enable();
            // Also after taking the token: a revocation adopted before it was made fired none.
            if self.creds.is_revoked(peer) {
                return "revoked by the zone config".into();
            }
            let zone = self.creds.zone();
            let Some(ends) = zone.config.device(&name).map(|d| d.cert_expires_at) else {
                return "no longer in the zone config".into();
            };
            drop(zone);
            let left = ends - time::OffsetDateTime::now_utc();
            if !left.is_positive() {
                return format!("its certificate ended at {ends}");
            }
            // Looked at again at each zone config adopted, and every ten minutes: a clock
            // set forward, or a machine that slept (timers stand still meanwhile), is seen
            // then.
            let wait = Duration::try_from(left)
                .unwrap_or(Duration::MAX)
                .min(RECHECK_END);
            tokio::select! {
                _ = revoked.cancelled() => return "revoked by the zone config".into(),
                _ = tokio::time::sleep(wait) => {}
                () = &mut adopted => {}
            }
        }
    }

    /// The live direct connection to `peer`, if any.
    pub fn direct(&self, peer: &str) -> Option<PeerConn> {
        if self.cut_if_revoked(peer) {
            return None;
        }
        let preferred = self.preferred_dialer(peer);
        self.with(peer, |s| s.best(preferred).map(|i| s.conns[i].pc.clone()))
    }

    /// Whether a live direct connection to `peer` was registered after `from` (a `next_seq`),
    /// best or not: one held from before may still be the best until it is found dead.
    fn direct_since(&self, peer: &str, from: u64) -> bool {
        self.with(peer, |s| {
            s.conns.iter().any(|h| h.seq > from && h.pc.live())
        })
    }

    /// The dialer both sides prefer between two equally confirmed connections.
    fn preferred_dialer<'a>(&'a self, peer: &'a str) -> &'a str {
        self.creds.name().min(peer)
    }

    /// Notes that `conn` is up at `peer`'s end too: a stream on it was answered, or came from
    /// the peer. It may now be the best (the module doc, step 4).
    pub fn confirm(self: &Arc<Self>, peer: &str, pc: &PeerConn) {
        // A load first: every stream passes here, only the first changes anything.
        if pc.is_confirmed() || pc.confirmed.swap(true, Ordering::Relaxed) {
            return;
        }
        self.settle_and_log(peer);
    }

    /// Settles `peer`'s connections ([`PeerState::settle`]), retires or closes what it says,
    /// and logs a change of path.
    fn settle_and_log(self: &Arc<Self>, peer: &str) {
        let me = self.creds.name().to_owned();
        let preferred = self.preferred_dialer(peer);
        let (change, retire, close, retiring, why) = self.with(peer, |s| {
            let (change, retire, close) = s.settle(&me, preferred);
            (
                change,
                retire,
                close,
                s.retiring.clone(),
                s.last_error.clone(),
            )
        });
        for pc in close {
            if let Some(unlogged) = LogBudget::take_shared(&self.lines) {
                info!(peer = %peer, max = MAX_SPARE, unlogged, "too many direct connections to this peer: the oldest spare retired");
            }
            self.retire_soon(pc, retiring.clone(), peer, b"too many direct connections");
        }
        for pc in retire {
            self.retire_soon(pc, retiring.clone(), peer, b"duplicate direct path");
        }
        if matches!(change, PathChange::Same) {
            return;
        }
        let Some(unlogged) = LogBudget::take_shared(&self.lines) else {
            return;
        };
        match change {
            PathChange::Same => {}
            PathChange::Up(c) => {
                info!(peer = %peer, addr = %crate::sockets::canonical(c.remote_address()), rtt_ms = c.rtt().as_millis() as u64, unlogged, "direct path up")
            }
            PathChange::Moved(c) => {
                info!(peer = %peer, addr = %crate::sockets::canonical(c.remote_address()), unlogged, "direct path moved to another connection with this peer")
            }
            PathChange::Lost => {
                info!(peer = %peer, reason = why.as_deref().unwrap_or("closed"), unlogged, "direct path lost: streams use the relay")
            }
        }
    }

    /// Drops `conn` as the direct path to `peer` (it failed a stream open), and closes it
    /// once its streams are over: left open, the peer kept using it as its direct path (and
    /// keep-alives kept it open), ignored our punch requests since it had a live direct path,
    /// and retired our next direct connection as a duplicate — we stayed on the relay for good.
    pub fn forget_direct(self: &Arc<Self>, peer: &str, conn: &Connection, why: &str) {
        let dropped = self.with(peer, |s| {
            let i = s
                .conns
                .iter()
                .position(|h| h.pc.conn.stable_id() == conn.stable_id())?;
            if s.in_use == Some(conn.stable_id()) {
                s.last_error = Some(why.to_owned());
            }
            // The next relayed stream may ask for a new round at once (the gateway spaces
            // rounds): waiting out PUNCH_INTERVAL left a peer on the relay for 30 s.
            s.last_punch_request = None;
            Some((s.conns.remove(i).pc, s.retiring.clone()))
        });
        if let Some((pc, retiring)) = dropped {
            debug!(peer = %peer, reason = %why, "direct connection failed");
            self.retire_soon(pc, retiring, peer, b"direct path failed");
            self.settle_and_log(peer);
        }
    }

    /// True if a punch request for `peer` should be sent now (and notes it as sent).
    pub fn should_request_punch(&self, peer: &str) -> bool {
        let preferred = self.preferred_dialer(peer);
        self.with(peer, |s| {
            if s.best(preferred).is_some() {
                return false;
            }
            match s.last_punch_request {
                Some(t) if t.elapsed() < PUNCH_INTERVAL => false,
                _ => {
                    s.last_punch_request = Some(Instant::now());
                    true
                }
            }
        })
    }

    /// The punch request [`Peers::should_request_punch`] allowed was not sent: the next one
    /// may go at once.
    pub fn punch_request_lost(&self, peer: &str) {
        self.with(peer, |s| s.last_punch_request = None);
    }

    /// Notes that the gateway let `peer` open `service` here (relayed, origin proven by Noise).
    /// `opened` is when the relayed stream that proves it was accepted. Whether this is a
    /// new permit (not a renewal, not refused as older than a revocation).
    pub fn grant(&self, peer: &str, service: &str, app: &str, opened: Instant) -> bool {
        self.with(peer, |s| {
            if s.revoked_at.get(service).is_some_and(|at| *at > opened) {
                debug!(peer = %peer, service = %service, "permit not granted: revoked after its stream opened");
                return false;
            }
            let until = Instant::now() + PERMIT_TTL;
            // Renewed in place: the streams opened under it keep their stop signal.
            match s.permits.get_mut(service) {
                Some(p) => {
                    p.app = app.to_owned();
                    p.until = until;
                    false
                }
                None => {
                    s.permits.insert(
                        service.to_owned(),
                        Permit {
                            app: app.to_owned(),
                            until,
                            stop: CancellationToken::new(),
                        },
                    );
                    true
                }
            }
        })
    }

    /// Every (peer, service) permit held, expired ones included (their streams may still
    /// run), at most [`crate::proto::limits::MAX_PERMITS_HELD`]: what a gateway is told as
    /// a session starts, so that it can revoke what it did not relay itself.
    pub fn held_permits(&self) -> Vec<(String, String)> {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(String, String)> = t
            .iter()
            .flat_map(|(peer, s)| s.permits.keys().map(move |svc| (peer.clone(), svc.clone())))
            .collect();
        // Sorted first: which ones a report past the bound leaves out is then stable.
        v.sort();
        v.truncate(crate::proto::limits::MAX_PERMITS_HELD);
        v
    }

    /// The gateway's policy no longer lets `peer` reach `service` here: its permit goes, and
    /// the direct streams opened under it end. Whether there was one.
    pub fn revoke_permit(&self, peer: &str, service: &str) -> bool {
        // A name the table does not hold is recorded only for a device of the zone, as
        // `on_peer_addr`: a gateway sending revocations for made-up names grew the table
        // without bound. One it holds always loses the permit (a device the zone no longer
        // lists, without a revocation, kept its permit and direct streams).
        let known = self
            .table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(peer);
        if !known && self.creds.noise_public_of(peer).is_err() {
            return false;
        }
        self.with(peer, |s| {
            // Bounded: revocations come from gateways, but a name is kept per service.
            if s.revoked_at.len() < crate::proto::limits::MAX_SERVICES
                || s.revoked_at.contains_key(service)
            {
                s.revoked_at.insert(service.to_owned(), Instant::now());
            }
            s.permits.remove(service)
        })
        .is_some()
    }

    /// The app under which the gateway last allowed `peer` to reach `service`, if still valid
    /// ([`permit_valid`]: `gateways_lost` is when this agent lost its last gateway, if it
    /// reaches none now), and what fires when that permit is revoked.
    pub fn permitted(
        &self,
        peer: &str,
        service: &str,
        gateways_lost: Option<Instant>,
    ) -> Option<(String, CancellationToken)> {
        if self.cut_if_revoked(peer) {
            return None;
        }
        let now = Instant::now();
        self.with(peer, |s| {
            s.permits
                .get(service)
                .filter(|p| permit_valid(p.until, now, gateways_lost))
                .map(|p| (p.app.clone(), p.stop.clone()))
        })
    }

    /// A new direct connection to `peer` (dialed or accepted): streams use it if it is the
    /// best one (the module doc, step 4), and it is watched until it closes. Returns whether
    /// it was taken in (false: it was closed already).
    pub fn register(self: &Arc<Self>, peer: &str, pc: PeerConn) -> bool {
        if pc.dialer == peer {
            // We accepted it: the peer's handshake finished before ours did.
            pc.confirmed.store(true, Ordering::Relaxed);
        }
        // Revoked by a config adopted between its handshake and now.
        if self.cut_if_revoked(peer) {
            pc.conn.close(0u32.into(), b"device revoked");
            return false;
        }
        let taken = self.with(peer, |s| {
            if self.closed.load(Ordering::Relaxed) {
                return false;
            }
            s.direct_connects += 1;
            s.offline = false;
            if !pc.live() {
                s.last_error = Some("direct connection closed as it came up".into());
                return false;
            }
            s.next_seq += 1;
            s.conns.push(Held {
                pc: pc.clone(),
                seq: s.next_seq,
            });
            true
        });
        if !taken {
            if self.closed.load(Ordering::Relaxed) {
                pc.conn.close(0u32.into(), b"agent stopping");
            }
            debug!(peer = %peer, "direct connection closed as it came up, or after the agent's stop");
            return false;
        }
        // And revoked between the check above and the push: the adoption's `cut_revoked`
        // may have run in between and found nothing to close. One revoked after this check
        // finds the connection in the table.
        if self.cut_if_revoked(peer) {
            return false;
        }
        let me = self.clone();
        let peer2 = peer.to_owned();
        let c = pc.conn.clone();
        tokio::spawn(async move {
            let e = c.closed().await;
            me.with(&peer2, |s| {
                if s.in_use == Some(c.stable_id()) {
                    s.last_error = Some(format!("connection closed: {e}"));
                }
            });
            me.settle_and_log(&peer2);
        });
        self.settle_and_log(peer);
        true
    }

    /// Whether the last punch round towards `peer` failed (its next is no news for the log).
    pub fn punch_failed_last(&self, peer: &str) -> bool {
        self.with(peer, |s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.starts_with("hole punching failed"))
        })
    }

    /// Handles the gateway's `PeerAddr`: returns the addresses to dial, or None if this round
    /// was seen already, a round is running (its next attempt dials these addresses instead
    /// of the ones it began with), or the device is none this agent may dial
    /// (itself, a device the zone config does not list or revokes). The table thus only holds
    /// zone devices and one round runs per peer, whatever a gateway sends. A round comes when
    /// the peer has no direct path to this device, so one this side still holds is no reason
    /// to skip it: it may be dead and not yet timed out (the peer restarted on another port,
    /// its NAT dropped the mapping), and the peer's dials then met a NAT this side had not
    /// opened for its new address, the direct path back only after another round, 30 s on.
    /// A returned round must end with [`Peers::punch`] (which clears the running mark).
    ///
    /// `gateway`: the address of the gateway that sent it. Only what an honest gateway sends
    /// is dialed: private (LAN) addresses, and one other (the peer's observed address, last
    /// in the list); loopback and link-local only as [`candidates::sanitize_peer`] says. A
    /// gateway that is buggy or not ours then steers at most one Internet address's worth of
    /// this agent's packets a round.
    pub fn on_peer_addr(&self, pa: &PeerAddr, gateway: SocketAddr) -> Option<Vec<SocketAddr>> {
        let device = pa.device.as_str();
        if device == self.creds.name()
            || self.creds.noise_public_of(device).is_err()
            || self.creds.is_revoked(device)
        {
            debug!(peer = %device, "punch round ignored: not a device of this zone");
            return None;
        }
        let addrs = candidates::sanitize_peer(&pa.addrs, gateway);
        if addrs.len() < pa.addrs.len() {
            debug!(peer = %device, sent = ?pa.addrs, kept = ?addrs, "punch addresses the gateway sent that no honest round holds were dropped");
        }
        if addrs.is_empty() {
            debug!(peer = %device, addrs = ?pa.addrs, "punch round ignored: no address to dial");
            return None;
        }
        self.with(device, |s| {
            if s.last_nonce == Some(pa.punch_nonce) {
                return None;
            }
            // The peer asks because it has no direct path to us: ours are unproven again.
            // One still marked confirmed (dead at the peer's end, not yet timed out here)
            // made this side close the round's new dial as a duplicate of it.
            for h in &s.conns {
                h.pc.confirmed.store(false, Ordering::Relaxed);
            }
            if s.punching {
                debug!(peer = %device, addrs = ?addrs, "punch round running: its next attempt dials these");
                s.last_nonce = Some(pa.punch_nonce);
                s.fresh_addrs = Some(addrs);
                return None;
            }
            s.punching = true;
            s.round_from = s.next_seq;
            s.last_nonce = Some(pa.punch_nonce);
            s.punches += 1;
            Some(addrs)
        })
    }

    /// Dials `peer` at `addrs` until a direct path exists or the attempts are spent; the round
    /// [`Peers::on_peer_addr`] started is over when this returns.
    pub async fn punch(
        self: Arc<Self>,
        peer: String,
        addrs: Vec<SocketAddr>,
    ) -> Option<Connection> {
        /// Ends the round however `punch` ends: returned, panicked or dropped.
        struct RoundOver<'a>(&'a Peers, &'a str);
        impl Drop for RoundOver<'_> {
            fn drop(&mut self) {
                self.0.with(self.1, |s| {
                    s.punching = false;
                    s.fresh_addrs = None;
                });
            }
        }
        let _over = RoundOver(&self, &peer);
        self.dial(&peer, addrs).await
    }

    async fn dial(&self, peer: &str, mut addrs: Vec<SocketAddr>) -> Option<Connection> {
        let peer = peer.to_owned();
        let server_name = format!("{peer}.{}", self.creds.domain());
        // What the last attempt ran into, for the status page and the log.
        let mut failure = String::from("no address could be dialed");
        let from = self.with(&peer, |s| s.round_from);
        // One attempt more when addresses came during the last (the peer moved meanwhile):
        // they were marked seen, so no later round would dial them. Again when more came
        // during that one (the peer moved again, or the other direction's round told its
        // newest mapping), up to [`PUNCH_EXTRA_ATTEMPTS`].
        let mut attempts = PUNCH_ATTEMPTS;
        let mut attempt = 0;
        while attempt < attempts {
            attempt += 1;
            // Attempts at least a quarter of PUNCH_ATTEMPT apart: one refused at once (the
            // peer's gate full for a moment) must not spend the whole round in milliseconds.
            let paced = tokio::time::sleep(PUNCH_ATTEMPT / 4);
            // Done once a connection came up in this round (the peer's dial accepted): one
            // older than the round is what the peer may no longer have.
            if self.direct_since(&peer, from) {
                return None;
            }
            // The addresses the gateway sent last: the ones the round began with may be stale.
            if let Some(fresh) = self.with(&peer, |s| s.fresh_addrs.take()) {
                info!(peer = %peer, addrs = ?fresh, "hole punching towards the peer's new addresses");
                addrs = fresh;
            }
            // Every address at once, LAN ones a little ahead: a LAN address that is not the
            // peer's must not hold up the one that answers, and a LAN path should win over
            // the NAT's outside (the first connection up is the one kept).
            let head_start = if addrs.iter().any(|a| candidates::is_lan(a.ip())) {
                LAN_HEAD_START
            } else {
                Duration::ZERO
            };
            let mut tries = tokio::task::JoinSet::new();
            for (i, addr) in addrs.iter().copied().enumerate() {
                let lan = candidates::is_lan(addr.ip());
                let wait = if lan { Duration::ZERO } else { head_start };
                let (endpoint, name) = (self.endpoint.clone(), server_name.clone());
                let dial = self.dial.clone();
                tries.spawn(async move {
                    tokio::time::sleep(wait).await;
                    let r = match endpoint.connect_with(dial, addr, &name) {
                        Ok(c) => tokio::time::timeout(PUNCH_ATTEMPT, c)
                            .await
                            .map(|r| r.map_err(|e| e.to_string())),
                        Err(e) => Ok(Err(format!("cannot dial: {e}"))),
                    };
                    (i, lan, r)
                });
            }
            let mut failures: Vec<(usize, String)> = Vec::new();
            while let Some(done) = tries.join_next().await {
                let Ok((i, lan, r)) = done else { continue };
                let addr = addrs[i];
                let why = match r {
                    Ok(Ok(conn)) => match peer_identity(&conn).map(|id| id.name.to_string()) {
                        // The other tries end with the set: their connections close unused.
                        Ok(name) if name == peer => return Some(conn),
                        Ok(name) => {
                            conn.close(0u32.into(), b"unexpected peer");
                            debug!(peer = %peer, got = %name, "dialed peer presented another name");
                            format!("{addr} answered as device {name}")
                        }
                        Err(e) => {
                            debug!(peer = %peer, error = %e, "dialed peer without identity");
                            format!("{addr} answered without a device identity")
                        }
                    },
                    Ok(Err(e)) => {
                        debug!(peer = %peer, %addr, attempt, error = %e, "punch attempt failed");
                        format!("{addr}: {e}")
                    }
                    Err(_) => {
                        debug!(peer = %peer, %addr, attempt, "punch attempt timed out");
                        let hint = if lan {
                            "the peer's LAN address: is this device on another network?"
                        } else {
                            "a NAT that maps each destination to another port, or a firewall?"
                        };
                        format!(
                            "no answer from {addr} within {} ms ({hint})",
                            PUNCH_ATTEMPT.as_millis()
                        )
                    }
                };
                failures.push((i, why));
            }
            if !failures.is_empty() {
                // In the order the gateway listed them, so a repeated failure reads alike.
                failures.sort();
                failure = failures
                    .into_iter()
                    .map(|(_, why)| why)
                    .collect::<Vec<_>>()
                    .join("; ");
            }
            if attempt == attempts
                && attempts < PUNCH_ATTEMPTS + PUNCH_EXTRA_ATTEMPTS
                && self.with(&peer, |s| s.fresh_addrs.is_some())
            {
                attempts += 1;
            }
            if attempt < attempts {
                paced.await;
            }
        }
        if self.direct(&peer).is_none() {
            let why = format!("hole punching failed: {failure}");
            // Rounds repeat every PUNCH_INTERVAL while streams are relayed: a failure like
            // the last one is no news (a symmetric NAT fails the same way for good).
            let news = self.with(&peer, |s| {
                let news = s.last_error.as_deref() != Some(why.as_str());
                s.last_error = Some(why.clone());
                news
            });
            if news {
                info!(peer = %peer, addrs = ?addrs, reason = %failure, "hole punching failed: streams stay relayed");
            } else {
                debug!(peer = %peer, addrs = ?addrs, reason = %failure, "hole punching failed again");
            }
        }
        None
    }

    /// Status of every peer this agent has dealt with.
    pub fn status(&self, gateway_rtt_ms: Option<f64>) -> Vec<PeerStatus> {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let mut v: Vec<PeerStatus> = t
            .iter()
            .map(|(name, s)| {
                let preferred = self.preferred_dialer(name);
                let direct = s.best(preferred).map(|i| &s.conns[i].pc);
                let c = &s.counters;
                let mut permits: Vec<String> = s
                    .permits
                    .iter()
                    .filter(|(_, p)| now < p.until)
                    .map(|(svc, _)| svc.clone())
                    .collect();
                permits.sort();
                // Every stream to it is refused here (no key to encrypt to), whatever the
                // table last saw: it read as reachable through the relay.
                let revoked = self.creds.is_revoked(name);
                PeerStatus {
                    device: name.clone(),
                    path: match (direct.is_some(), s.offline, revoked) {
                        (_, _, true) => "revoked",
                        (true, _, _) => "direct",
                        (false, true, _) => "offline",
                        (false, false, _) => "relay",
                    }
                    .into(),
                    direct_addr: direct
                        .map(|d| crate::sockets::canonical(d.conn.remote_address()).to_string()),
                    rtt_ms: match direct {
                        Some(d) => Some(d.conn.rtt().as_secs_f64() * 1000.0),
                        None if s.offline => None,
                        None => gateway_rtt_ms,
                    },
                    path_mtu: direct.map(|d| d.conn.stats().path.current_mtu),
                    streams_direct: c.streams_direct.load(Ordering::Relaxed),
                    streams_relay: c.streams_relay.load(Ordering::Relaxed),
                    open_direct: c.open_direct.load(Ordering::Relaxed),
                    open_relay: c.open_relay.load(Ordering::Relaxed),
                    bytes_direct_out: c.bytes_direct_out.load(Ordering::Relaxed),
                    bytes_direct_in: c.bytes_direct_in.load(Ordering::Relaxed),
                    bytes_relay_out: c.bytes_relay_out.load(Ordering::Relaxed),
                    bytes_relay_in: c.bytes_relay_in.load(Ordering::Relaxed),
                    punches: s.punches,
                    direct_connects: s.direct_connects,
                    permits,
                    last_error: match revoked {
                        true => {
                            Some("revoked in the zone config: no stream to it is opened".into())
                        }
                        false => s.last_error.clone(),
                    },
                }
            })
            .collect();
        v.sort_by(|a, b| a.device.cmp(&b.device));
        v
    }

    /// Closes every direct connection (agent stopping).
    pub fn close_all(&self) {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        // Under the table's lock: a registration checks it under the same lock.
        self.closed.store(true, Ordering::Relaxed);
        for s in t.values() {
            for h in &s.conns {
                h.pc.conn.close(0u32.into(), b"agent stopping");
            }
        }
    }
}

impl PeerState {
    /// The connection streams should use: a confirmed one before an unconfirmed one, then one
    /// `preferred` dialed, then the newest — the same order on both sides.
    fn best(&self, preferred: &str) -> Option<usize> {
        self.conns
            .iter()
            .enumerate()
            .filter(|(_, h)| h.pc.live())
            .max_by_key(|(_, h)| (h.pc.is_confirmed(), h.pc.dialer == preferred, h.seq))
            .map(|(i, _)| i)
    }

    /// Drops closed connections and, once the best is confirmed (the peer has it too), takes
    /// out the others this side dialed that could not become better than it, to be retired.
    /// Connections the peer dialed are left to it; of the spares (all but the best) only the
    /// newest [`MAX_SPARE`] stay, the rest are retired too. Returns the change of path and
    /// (duplicates, excess spares) to retire.
    fn settle(&mut self, me: &str, preferred: &str) -> (PathChange, Vec<PeerConn>, Vec<PeerConn>) {
        self.conns.retain(|h| h.pc.live());
        let (mut retire, mut close) = (Vec::new(), Vec::new());
        if let Some(b) = self.best(preferred) {
            let best_id = self.conns[b].pc.conn.stable_id();
            if self.conns[b].pc.is_confirmed() {
                // Not ours of the preferred dialer while the best is the peer's: once
                // confirmed, such a one becomes the best.
                let best_preferred = self.conns[b].pc.dialer == preferred;
                let (ours, rest): (Vec<Held>, Vec<Held>) = self.conns.drain(..).partition(|h| {
                    h.pc.dialer == me
                        && h.pc.conn.stable_id() != best_id
                        && (best_preferred || h.pc.dialer != preferred)
                });
                self.conns = rest;
                retire.extend(ours.into_iter().map(|h| h.pc));
            }
            // Oldest first: the spares past MAX_SPARE are the oldest.
            self.conns.sort_by_key(|h| h.seq);
            let spares = self.conns.len() - 1;
            if spares > MAX_SPARE {
                let mut n = spares - MAX_SPARE;
                self.conns.retain(|h| {
                    if n > 0 && h.pc.conn.stable_id() != best_id {
                        n -= 1;
                        close.push(h.pc.clone());
                        false
                    } else {
                        true
                    }
                });
            }
        }
        let now = self.best(preferred).map(|i| self.conns[i].pc.conn.clone());
        let change = match (self.in_use, &now) {
            (None, None) => PathChange::Same,
            (Some(_), None) => PathChange::Lost,
            (None, Some(c)) => PathChange::Up(c.clone()),
            (Some(id), Some(c)) if id == c.stable_id() => PathChange::Same,
            (Some(_), Some(c)) => PathChange::Moved(c.clone()),
        };
        if matches!(change, PathChange::Lost) {
            // The next relayed stream may ask for a new round at once.
            self.last_punch_request = None;
        }
        if matches!(change, PathChange::Up(_) | PathChange::Moved(_)) {
            self.last_error = None;
        }
        self.in_use = now.map(|c| c.stable_id());
        (change, retire, close)
    }
}

/// A permit expires so that a policy change on the gateway reaches direct paths; while this
/// agent reaches no gateway, no policy change can, and no relayed stream can renew the permit
/// either: a permit still valid when the last gateway was lost (`gateways_lost`) holds for the
/// outage (revocations in the zone config still apply), so direct paths keep working through
/// it, as DESIGN.md promises. One that had expired before stays expired: the gateway may have
/// refused it since.
pub fn permit_valid(until: Instant, now: Instant, gateways_lost: Option<Instant>) -> bool {
    now < until || gateways_lost.is_some_and(|lost| lost < until)
}

impl Peers {
    /// Retires `pc` ([`retire`]) unless [`MAX_RETIRING`] connections to `peer` already wait
    /// for their streams: then it is closed now.
    fn retire_soon(
        &self,
        pc: PeerConn,
        retiring: Arc<AtomicUsize>,
        peer: &str,
        why: &'static [u8],
    ) {
        if retiring.fetch_add(1, Ordering::Relaxed) >= MAX_RETIRING {
            retiring.fetch_sub(1, Ordering::Relaxed);
            if let Some(unlogged) = LogBudget::take_shared(&self.lines) {
                info!(peer = %peer, max = MAX_RETIRING, unlogged, "too many retired direct connections to this peer: one closed with its streams");
            }
            pc.conn.close(CLOSE_DUPLICATE.into(), why);
            return;
        }
        let (peer, creds) = (peer.to_owned(), self.creds.clone());
        tokio::spawn(async move {
            retire(pc, creds, peer, why).await;
            retiring.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Closes a connection no longer anyone's direct path (a duplicate, a failed one) once no
/// stream uses it, saying `why`.
async fn retire(pc: PeerConn, creds: Arc<DeviceCreds>, peer: String, why: &'static [u8]) {
    let revoked = || creds.is_revoked(&peer);
    loop {
        if !pc.live() {
            return;
        }
        if revoked() {
            pc.conn.close(0u32.into(), b"device revoked");
            return;
        }
        if pc.active.load(Ordering::Relaxed) == 0 {
            pc.conn.close(CLOSE_DUPLICATE.into(), why);
            return;
        }
        tokio::time::sleep(RETIRE_POLL).await;
    }
}

/// The identity in a connection's verified peer certificate.
pub fn peer_identity(conn: &Connection) -> Result<zone_core::DeviceIdentity, TunnelError> {
    let any = conn
        .peer_identity()
        .ok_or_else(|| TunnelError::Config("peer sent no certificate".into()))?;
    let certs = any
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| TunnelError::Config("unexpected peer identity type".into()))?;
    let first = certs
        .first()
        .ok_or_else(|| TunnelError::Config("peer sent no certificate".into()))?;
    Ok(zone_core::DeviceIdentity::from_der(first)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expired_permit_holds_only_while_no_gateway_is_reachable() {
        let now = Instant::now();
        let until = now + PERMIT_TTL;
        assert!(permit_valid(until, now, None));
        let later = until + Duration::from_secs(1);
        assert!(
            !permit_valid(until, later, None),
            "expired with a gateway to renew it"
        );
        let lost = now + Duration::from_secs(60);
        assert!(
            permit_valid(until, later, Some(lost)),
            "expired during a gateway outage"
        );
        let lost_after = until + Duration::from_millis(500);
        assert!(
            !permit_valid(until, later, Some(lost_after)),
            "expired before the outage: revived by it"
        );
    }
}
