//! One public `udp` app's socket: a flow through the tunnel per client (address and port),
//! opened without holding up the socket's reads, closed when quiet both ways for the tunnel's
//! `udp_flow_idle` — after [`UNANSWERED_IDLE`] when not in use both ways — and cut when
//! the policy stops allowing it. UDP sources are forged for free, so what one datagram can cost
//! is bounded: a full flow table makes room by ending flows not in use both ways (never
//! answered, or answered while the client never sent again: [`ASSURE_AFTER`]), and refusals
//! are counted in the app's counters with their log lines capped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use policies::accounting::{AppCounters, Refusal};
use policies::bandwidth::Shaper;
use policies::{Requester, Timestamp};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tunnel::flow_activity::FlowActivity;
use tunnel::hub::{refusal_of, Hub, UdpFlow};
use tunnel::proto::Origin;
use tunnel::sockets::ReplySocket;
use tunnel::OpenError;

use crate::addr_text::Client;
use crate::listeners::{app_at, still_allowed, Kind};
use crate::per_ip::{IpSlot, PerIp};
use tunnel::log_budget::LogBudget;

/// A flow the device never answered that carried at most [`PROBE_DATAGRAMS`] of the client's
/// datagrams, or one it answered while the client never sent again ([`ASSURE_AFTER`]), ends
/// after this long quiet (conntrack's timeout for UDP not seen as a stream), whatever
/// `udp_flow_idle` says: each forged source address then holds a slot of the table for 30 s,
/// not two minutes. A client that keeps sending to a silent service (syslog, statsd) has its
/// flow kept for `udp_flow_idle` like any other.
pub const UNANSWERED_IDLE: Duration = Duration::from_secs(30);
/// See [`UNANSWERED_IDLE`]: a forged source sends one datagram, a probe a few.
const PROBE_DATAGRAMS: u64 = 3;
/// A flow is in use both ways ("assured", as conntrack says) once the device answered and
/// the client sent again at least this long after the flow began. conntrack counts a packet
/// either way; only the client's count here, as the service's answers to a forged source
/// are what a flood brings. (A client that subscribes once to a service that pushes is so
/// never assured: a full table may end it after a quiet second between pushes.) An answer
/// alone proves only that the service replies, not that the client exists:
/// forged sources whose one datagram a DNS or game service answered held the table for
/// `udp_flow_idle`, unevictable. Flows not assured end after [`UNANSWERED_IDLE`] quiet and
/// make room for newcomers after [`EVICT_QUIET`], or, when none is that quiet, once older
/// than this (the quietest first).
const ASSURE_AFTER: Duration = Duration::from_secs(2);
/// A full table ends the flows not in use both ways ([`ASSURE_AFTER`]) that have been quiet
/// this long (and flows already closed by the device)...
const EVICT_QUIET: Duration = Duration::from_secs(1);
/// ...looking for them at most this often (the search walks the whole table)...
const EVICT_EVERY: Duration = Duration::from_millis(250);
/// ...and, when those are too few, flows in use both ways that have been quiet this long:
/// a forger that sends twice from each address, 2 s apart, to a service that answers makes
/// its flows "assured" without ever seeing an answer, and filled the table for good...
const EVICT_ASSURED_QUIET: Duration = Duration::from_secs(10);
/// ...and ending at most this share of the table each time: under a flood of forged sources
/// every ended flow is replaced by one the device has to open, so this bounds that work
/// (4,096 flows: at most 1,024 opens a second).
const EVICT_SHARE: usize = 16;
/// An open that has not reported back after the tunnel's open timeout and this much more is
/// given up (its task cannot have outlived the timeout unless it failed).
const OPEN_MARGIN: Duration = Duration::from_secs(5);
/// A client's datagrams kept while its flow opens; later ones are dropped (and counted). No
/// more than the device keeps of a flow not open there yet: sent right behind the open, the
/// rest would be lost there, uncounted.
const OPENING_QUEUE: usize = tunnel::flow_table::EARLY_PER_FLOW;
/// Bytes of such datagrams per app socket, all flows together, as the device keeps at most
/// [`tunnel::flow_table::EARLY_BYTES`] of flows not open there yet: counted by number only,
/// 4,096 opening flows of 8 datagrams up to 64 KiB each could hold 2 GiB while a tunnel's
/// control session stalled.
const OPENING_BYTES: usize = tunnel::flow_table::EARLY_BYTES;
/// Through a drain, a flow quiet this long ends (one still moving goes on for the grace).
const DRAIN_QUIET: Duration = Duration::from_secs(3);
/// A flow ended after this long in use both ways says so whatever the log budget.
const ALWAYS_LOGGED_AFTER: Duration = Duration::from_secs(60);
/// Log lines a second, per app socket, of refused or failed flows and of flows that ended
/// without an answer: all of them are what a flood of forged datagrams causes.
pub const LINES_PER_SECOND: u32 = 10;
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Room for one receive: a datagram is at most 64 KiB, and with UDP GRO (on with
/// [`ReplySocket`]) several of one client arrive together, up to 64 segments.
const UDP_READ: usize = 128 * 1024;

/// The limits of one app's flows.
#[derive(Debug, Clone, Copy)]
pub struct UdpLimits {
    /// Flows of the app one client address (IPv6: its /64) may have.
    pub per_ip: usize,
    /// Flows the app keeps at once.
    pub per_app: usize,
}

/// An open that finished: the entry it was for (its id and client) and what came of it.
type Opened = (
    u64,
    SocketAddr,
    Result<(UdpFlow, mpsc::Receiver<Bytes>), OpenError>,
);

/// One client's flow.
struct Entry {
    /// Tells this entry from a later one of the same client (an open finishing late).
    id: u64,
    /// The client as policy and logs see it (an IPv4 client of a `[::]` socket as IPv4);
    /// replies go to the address the datagrams came from.
    client: SocketAddr,
    /// The address the client sent to, which replies leave from ([`ReplySocket`]).
    local: Option<std::net::IpAddr>,
    /// Where the flow goes, as its app said when it started.
    target: policies::Target,
    app: String,
    counters: Arc<AppCounters>,
    started: Instant,
    /// When its open came back (young until [`ASSURE_AFTER`] past it: an open that took
    /// seconds left no time to be in use both ways).
    opened_at: Option<Instant>,
    /// Datagrams either way: a client that only sends (syslog, statsd) is still in use.
    activity: Arc<FlowActivity>,
    /// Ends the task passing the device's datagrams back.
    stop: CancellationToken,
    bytes_in: u64,
    /// The client's datagrams passed on.
    datagrams_in: u64,
    /// The client's datagrams not passed on: too large for the tunnel (or refused by a local
    /// service's socket, or the tunnel's datagram queue full), past the app's `bandwidth`,
    /// or past [`OPENING_QUEUE`] while the flow opened.
    dropped: u64,
    /// Of those, the ones the tunnel or the service's socket refused.
    failed: u64,
    /// The app's `bandwidth` limits, client→service and service→client (the latter handed
    /// to the task passing the device's datagrams back once the flow is open).
    shape_in: Shaper,
    shape_out: Option<Shaper>,
    /// In use both ways ([`ASSURE_AFTER`]).
    assured: bool,
    /// Counts the flow against its client address's `udp_flows_per_ip`.
    _slot: IpSlot,
    state: State,
}

enum State {
    /// Waiting for the device; the client's datagrams meanwhile.
    Opening(OpeningQueue),
    Open {
        flow: UdpFlow,
        back: Arc<Back>,
    },
}

/// What the task passing the device's datagrams to the client has seen.
#[derive(Default)]
struct Back {
    bytes: AtomicU64,
    answered: AtomicBool,
    /// The device's datagrams past the app's `bandwidth`, or refused by the socket: not
    /// passed on.
    dropped: AtomicU64,
}

impl Entry {
    /// Passes a client's datagram up. One that cannot go (too large for the tunnel, refused
    /// by a local service's socket) is
    /// counted; the first of a flow is returned, for the caller to say (within its log
    /// budget: forged sources can each send one).
    fn send(&mut self, data: &[u8]) -> Option<tunnel::TunnelError> {
        let State::Open { flow, back } = &self.state else {
            return None;
        };
        // Past the app's bandwidth: dropped, as a router drops what its link cannot carry.
        if !self.shape_in.try_take(data.len() as u64) {
            self.dropped += 1;
            return None;
        }
        match flow.send(data) {
            Ok(()) => {
                self.bytes_in += data.len() as u64;
                self.counters.bytes_in(data.len() as u64);
                self.datagrams_in += 1;
                if !self.assured
                    && back.answered.load(Ordering::Relaxed)
                    && self.started.elapsed() >= ASSURE_AFTER
                {
                    self.assured = true;
                }
                None
            }
            Err(e) => {
                // Not sent: not spent from the app's bandwidth either.
                self.shape_in.give_back(data.len() as u64);
                self.dropped += 1;
                // The first failure of the flow is said, whatever the bandwidth dropped before.
                self.failed += 1;
                (self.failed == 1).then_some(e)
            }
        }
    }

    fn answered(&self) -> bool {
        match &self.state {
            State::Open { back, .. } => back.answered.load(Ordering::Relaxed),
            State::Opening(_) => false,
        }
    }

    /// Why the sweep ends this flow, if it does; `open_limit` bounds an open.
    fn expired(&self, idle: Duration, open_limit: Duration) -> Option<&'static str> {
        let State::Open { flow, .. } = &self.state else {
            return (self.started.elapsed() >= open_limit).then_some("open never finished");
        };
        let quiet = self.activity.quiet_for();
        if !flow.is_alive() {
            Some("closed by the device or its tunnel")
        } else if quiet >= idle {
            Some("idle")
        } else if !self.answered()
            && self.datagrams_in <= PROBE_DATAGRAMS
            && quiet >= UNANSWERED_IDLE
        {
            Some("never answered")
        } else if self.answered() && !self.assured && quiet >= UNANSWERED_IDLE {
            Some("answered, then quiet")
        } else {
            None
        }
    }

    /// Open for less than [`ASSURE_AFTER`] (or opening): it has had no chance to be in use
    /// both ways.
    fn young(&self) -> bool {
        self.opened_at.is_none_or(|t| t.elapsed() < ASSURE_AFTER)
    }

    /// Why a full table may end it for a newcomer, if it may, with how sure that is (lower
    /// first) and how long it has been quiet: closed by the device, quiet for `idle` (the
    /// sweep has not come by yet), or not in use both ways ([`ASSURE_AFTER`]) and quiet for
    /// [`EVICT_QUIET`]; then in use both ways and quiet for [`EVICT_ASSURED_QUIET`]; last,
    /// not in use both ways however recent, once older than [`ASSURE_AFTER`].
    fn evictable(&self, idle: Duration) -> Option<(u8, Duration, &'static str)> {
        let State::Open { flow, .. } = &self.state else {
            return None;
        };
        let quiet = self.activity.quiet_for();
        let (rank, why) = eviction_rank(
            flow.is_alive(),
            quiet,
            idle,
            (self.assured, self.answered()),
            self.young(),
        )?;
        Some((rank, quiet, why))
    }
}

/// The socket's loop and its table.
struct AppSocket {
    hub: Hub,
    listen: SocketAddr,
    sock: Arc<ReplySocket>,
    per_ip: Arc<PerIp>,
    /// `udp_flows_per_ip` as configured, for a table of `max_flows` ([`AppSocket::set_share`]).
    max_per_ip: usize,
    max_flows: usize,
    /// What the table holds at most now: `max_flows`, or this app's share of its device's
    /// tunnel ([`AppSocket::share`]).
    limit: usize,
    idle: Duration,
    flows: HashMap<SocketAddr, Entry>,
    next_id: u64,
    opened: mpsc::UnboundedSender<Opened>,
    /// When a full table last looked for flows to end.
    last_eviction: Option<Instant>,
    /// When each client (its [`crate::per_ip::keys`] address) at its limit last ended a flow
    /// of its own ([`AppSocket::make_room_for`]): one for the socket let one address sending
    /// from new ports take every turn, and other clients at their limits waited for the sweep.
    last_client_eviction: HashMap<std::net::IpAddr, Instant>,
    /// Log lines of refused flows, of failed opens, and of flows that ended not in use both
    /// ways:
    /// each kind is what a flood causes, each has its own budget.
    refused_lines: LogBudget,
    failed_lines: LogBudget,
    unassured_lines: LogBudget,
    /// Parent of the flows' own stops: fired when the loop ends.
    stop: CancellationToken,
    /// The gateway is stopping: datagrams of open flows pass, a new client's are dropped.
    draining: bool,
    /// Bytes the flows still opening hold ([`OPENING_BYTES`]).
    opening_held: Arc<AtomicUsize>,
}

/// A client's datagrams held while its flow opens, counted in its socket's [`OPENING_BYTES`]
/// until taken or dropped with the entry (whichever way it leaves the table).
struct OpeningQueue {
    datagrams: Vec<Box<[u8]>>,
    bytes: usize,
    held: Arc<AtomicUsize>,
}

impl OpeningQueue {
    fn new(held: Arc<AtomicUsize>) -> Self {
        OpeningQueue {
            datagrams: Vec::new(),
            bytes: 0,
            held,
        }
    }

    /// Holds `data` unless the flow has [`OPENING_QUEUE`] already, the socket's flows hold
    /// [`OPENING_BYTES`] with it, or it could never cross the tunnel (the send after the
    /// open would refuse it).
    fn push(&mut self, data: &[u8]) -> bool {
        let n = data.len();
        if self.datagrams.len() >= OPENING_QUEUE
            || n > usize::from(tunnel::transport::MAX_UDP_PAYLOAD)
        {
            return false;
        }
        // One task owns the socket's flows: the atomic is for the entries being `Send`.
        if self.held.fetch_add(n, Ordering::Relaxed) + n > OPENING_BYTES {
            self.held.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        self.bytes += n;
        self.datagrams.push(data.into());
        true
    }

    fn len(&self) -> usize {
        self.datagrams.len()
    }

    fn take(&mut self) -> Vec<Box<[u8]>> {
        self.held.fetch_sub(self.bytes, Ordering::Relaxed);
        self.bytes = 0;
        std::mem::take(&mut self.datagrams)
    }
}

impl Drop for OpeningQueue {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Serves the app on `listen` from `sock` until `stop` (the app removed or moved: its flows
/// end then), or, when `stop` comes from the gateway's `shutdown`, through the drain: flows
/// in use both ways go on while they move (quiet for [`DRAIN_QUIET`], or not in use both
/// ways, they end), no new one starts, until they end or the drain's grace ends them (the
/// tunnels close). While any flow is open the socket holds a place in the hub's work, as a
/// proxied TCP connection does, so the drain waits for them. They went dark the moment the
/// drain began, while TCP apps had their grace.
pub async fn run(
    hub: Hub,
    listen: SocketAddr,
    sock: Arc<ReplySocket>,
    limits: UdpLimits,
    (stop, shutdown): (CancellationToken, CancellationToken),
) {
    let (opened, mut opened_rx) = mpsc::unbounded_channel();
    let idle = hub.tuning().udp_flow_idle;
    let policy = hub.policy().clone();
    let mut changes = policy.subscribe();
    let mut s = AppSocket {
        hub,
        listen,
        sock: sock.clone(),
        per_ip: {
            let t = PerIp::new(limits.per_ip, "UDP flows of one app", "udp_flows_per_ip");
            // Each udp app has a table of its own: its lines say which.
            t.set_label(format!("udp app on {listen}"));
            t
        },
        max_per_ip: limits.per_ip,
        max_flows: limits.per_app,
        limit: limits.per_app,
        idle,
        flows: HashMap::new(),
        next_id: 0,
        opened,
        last_eviction: None,
        last_client_eviction: HashMap::new(),
        refused_lines: LogBudget::new(LINES_PER_SECOND),
        failed_lines: LogBudget::new(LINES_PER_SECOND),
        unassured_lines: LogBudget::new(LINES_PER_SECOND),
        // Not the listener's `stop`: through a drain the flows go on after it fired.
        stop: CancellationToken::new(),
        draining: false,
        opening_held: Arc::default(),
    };
    s.set_share();
    let mut buf = vec![0u8; UDP_READ];
    // A short idle time is kept to within a quarter of itself, not SWEEP_EVERY.
    let mut sweep =
        tokio::time::interval(SWEEP_EVERY.min(idle / 4).max(Duration::from_millis(100)));
    // Held while any flow is open, in the hub's work as a proxied connection is: a drain
    // that begins finds it there, whichever task sees the shutdown first (taken only once
    // this loop saw it, the drain could find no work and close the tunnels at once).
    let mut work: Option<tokio_util::task::task_tracker::TaskTrackerToken> = None;
    loop {
        if s.flows.is_empty() {
            work = None;
            if s.draining {
                break;
            }
        } else if work.is_none() {
            work = Some(s.hub.work().token());
        }
        tokio::select! {
            _ = stop.cancelled(), if !s.draining => {
                if !shutdown.is_cancelled() || s.flows.is_empty() {
                    break;
                }
                s.draining = true;
                // Only flows in use both ways and still moving hold the drain: one forged
                // datagram, or a query answered a while ago, made every restart wait out
                // the whole grace period.
                s.drain_quiet();
                info!(addr = %listen, flows = s.flows.len(), "UDP app draining: flows in use go on for the grace period while they move, no new ones start");
                // Sooner than SWEEP_EVERY: flows that go quiet, or that the closing tunnels
                // end, go at once.
                sweep = tokio::time::interval(Duration::from_millis(250));
            }
            // Flows were decided as they started: ask again whenever the policy or the
            // minute changes.
            Ok(()) = changes.changed() => {
                s.set_share();
                s.decide_again();
            }
            _ = sweep.tick() => {
                s.sweep();
                if s.draining {
                    s.drain_quiet();
                }
            }
            Some(o) = opened_rx.recv() => s.opened(o),
            r = sock.recv(&mut buf) => {
                if let Ok(got) = r {
                    for d in got.datagrams(&buf) {
                        s.datagram(got.from, got.to, d);
                    }
                }
            }
        }
    }
    for (_, e) in std::mem::take(&mut s.flows) {
        s.end(e, "listener stopped");
    }
    // Flows' reply tasks end with it (each also ended with its flow, above).
    s.stop.cancel();
    let unlogged = [
        &mut s.refused_lines,
        &mut s.failed_lines,
        &mut s.unassured_lines,
    ]
    .into_iter()
    .map(|b| b.unlogged())
    .sum::<u64>();
    if unlogged > 0 {
        info!(addr = %listen, unlogged, "UDP listener stopped: refusals, failures and flows not in use both ways not logged");
    }
}

impl AppSocket {
    /// Sets the table's limit to [`AppSocket::share`], and the flows one client address may
    /// hold to as large a part of it as `udp_flows_per_ip` is of `udp_flows_per_app`: with
    /// sixteen apps to one device each table holds 256, and one host sending from 256 source
    /// ports filled one by itself at the unscaled 256 per address.
    fn set_share(&mut self) {
        self.limit = self.share();
        self.per_ip
            .set_limit(per_ip_of_share(self.max_per_ip, self.limit, self.max_flows));
    }

    /// How many flows this app may keep: `max_flows`, but no more than its share of the
    /// flows one device's tunnel carries ([`MAX_UDP_FLOWS`](tunnel::proto::limits::MAX_UDP_FLOWS))
    /// when several udp apps go to that device — a flood on one took every flow id of the
    /// tunnel, and the others' new flows failed as "overloaded" for as long as it lasted.
    fn share(&self) -> usize {
        match app_at(&self.hub, Kind::Udp, self.listen) {
            // The gateway's own services take no tunnel's flows.
            Some((active, i))
                if active.policy.apps()[i].target.device != self.hub.device_name() =>
            {
                share_of(active.policy.apps(), i, self.max_flows)
            }
            _ => self.max_flows,
        }
    }

    fn datagram(&mut self, peer: SocketAddr, local: Option<std::net::IpAddr>, data: &[u8]) {
        if let Some(e) = self.flows.get_mut(&peer) {
            match &mut e.state {
                State::Open { flow, .. } if flow.is_alive() => {
                    e.activity.touch();
                    if let Some(error) = e.send(data) {
                        let e = &self.flows[&peer];
                        too_large(&mut self.failed_lines, e, &error);
                    }
                    return;
                }
                State::Opening(queued) => {
                    e.activity.touch();
                    if !queued.push(data) {
                        e.dropped += 1;
                    }
                    return;
                }
                // The agent closed it (its service socket failed, or it was idle there) or
                // the tunnel is gone: this datagram opens a new flow.
                State::Open { .. } => {
                    if let Some(e) = self.flows.remove(&peer) {
                        self.end(e, "closed by the device or its tunnel");
                    }
                }
            }
        }
        self.start(peer, local, data);
    }

    /// A new client: admitted, decided and limited, then its flow opens in a task of its
    /// own (up to the tunnel's open timeout) while this loop goes on reading.
    fn start(&mut self, peer: SocketAddr, local: Option<std::net::IpAddr>, data: &[u8]) {
        if self.draining {
            return;
        }
        // No app names this address any more: the listener is about to stop.
        let Some((active, i)) = app_at(&self.hub, Kind::Udp, self.listen) else {
            return;
        };
        let app = &active.policy.apps()[i];
        let state = active.state(app);
        // As written, for the device, logs and limits: an IPv4 client on a `[::]` socket
        // arrives as `::ffff:a.b.c.d`.
        let client = tunnel::sockets::canonical(peer);
        let who = Requester::Public { ip: client.ip() };
        let (shape_in, shape_out) = state.limits.datagram_shapers();
        if let policies::Decision::Deny { reason } =
            active
                .policy
                .decide(app, &who, None, None, Timestamp::now())
        {
            state.counters.refused(Refusal::Denied(reason));
            if let Some(unlogged) = self.refused_lines.take() {
                info!(app = %app.name, client = %Client(client), reason = %reason, unlogged, "UDP flow refused by policy");
            }
            return;
        }
        // The first refusal of a run is logged by `per_ip`. At its limit, a client ends one
        // of its own flows that is closed, idle, or never answered and quiet, and is let in:
        // forged datagrams from its address (never answered) otherwise held every slot of
        // it, and its own new flows were refused for as long as the forger sent. After the
        // policy (a client it refuses ended a flow for nothing); before the rate, which may
        // be the app's as a whole: a client past its own limit must not spend it.
        let slot = self.per_ip.admit(client.ip()).or_else(|| {
            self.make_room_for(client.ip())
                .then(|| self.per_ip.admit(client.ip()))
                .flatten()
        });
        let Some(slot) = slot else {
            state.counters.refused(Refusal::ConnectionLimit);
            return;
        };
        if state.limits.check_rate(&who).is_err() {
            state.counters.refused(Refusal::RateLimited);
            if let Some(unlogged) = self.refused_lines.take() {
                info!(app = %app.name, client = %Client(client), unlogged, "UDP flow refused: over the app's rate of new flows");
            }
            return;
        }
        // Last: only a client that would be served may make room.
        if self.flows.len() >= self.limit && !self.make_room(&app.name, client.ip()) {
            state.counters.refused(Refusal::ConnectionLimit);
            if let Some(unlogged) = self.refused_lines.take() {
                warn!(app = %app.name, addr = %self.listen, client = %Client(client), flows = self.flows.len(), limit = self.limit, unlogged, "UDP flow refused: the app's table is full of flows in use (udp_flows_per_app in gateway.toml; several udp apps to one device share its tunnel's 4,096 flows)");
            }
            return;
        }
        self.next_id += 1;
        let mut queue = OpeningQueue::new(self.opening_held.clone());
        let dropped = u64::from(!queue.push(data));
        let e = Entry {
            id: self.next_id,
            client,
            local,
            target: app.target.clone(),
            app: app.name.clone(),
            counters: state.counters.clone(),
            started: Instant::now(),
            opened_at: None,
            activity: Arc::new(FlowActivity::default()),
            stop: self.stop.child_token(),
            bytes_in: 0,
            datagrams_in: 0,
            dropped,
            failed: 0,
            shape_in,
            shape_out: Some(shape_out),
            assured: false,
            _slot: slot,
            state: State::Opening(queue),
        };
        drop(active);
        let (hub, tx) = (self.hub.clone(), self.opened.clone());
        let (id, target, app) = (e.id, e.target.clone(), e.app.clone());
        // Not raced against the entry's stop: an open dropped after the session loop took
        // its id (but before it was handed over) would leave the flow open on the agent.
        // It ends within the open timeout; a result nobody wants is dropped, which closes it.
        tokio::spawn(async move {
            let r = hub
                .open_udp_flow(
                    &target.device,
                    &target.service,
                    &app,
                    Origin::Public(client),
                )
                .await;
            let _ = tx.send((id, peer, r));
        });
        self.flows.insert(peer, e);
    }

    fn opened(&mut self, (id, peer, r): Opened) {
        let Some(e) = self.flows.get_mut(&peer).filter(|e| e.id == id) else {
            // Its entry was cut or replaced meanwhile: dropping `r` closes the flow.
            return;
        };
        let (flow, rx) = match r {
            Ok(x) => x,
            Err(err) => {
                if let Some(e) = self.flows.remove(&peer) {
                    e.stop.cancel();
                    e.counters.failed(tunnel::hub::failure_of(&err));
                    if let Some(unlogged) = self.failed_lines.take() {
                        let (_, reason) = refusal_of(&err);
                        let queued = match &e.state {
                            State::Opening(q) => q.len() as u64,
                            State::Open { .. } => 0,
                        };
                        info!(app = %e.app, device = %e.target.device, client = %Client(e.client), reason = %reason, dropped = e.dropped + queued, unlogged, "UDP flow failed");
                    }
                }
                return;
            }
        };
        let State::Opening(queued) = &mut e.state else {
            return;
        };
        let queued = queued.take();
        let back = Arc::new(Back::default());
        tokio::spawn(pass_back(
            self.sock.clone(),
            (peer, e.local),
            rx,
            (back.clone(), e.counters.clone()),
            e.shape_out.take().unwrap_or_default(),
            e.activity.clone(),
            e.stop.clone(),
        ));
        e.state = State::Open { flow, back };
        e.opened_at = Some(Instant::now());
        e.counters.connection();
        for d in queued {
            if let Some(error) = e.send(&d) {
                too_large(&mut self.failed_lines, e, &error);
            }
        }
    }

    /// Asks the policy again about every flow (it changed, or the minute did).
    fn decide_again(&mut self) {
        let active = self.hub.policy().current();
        let cut: Vec<(SocketAddr, String)> = self
            .flows
            .iter()
            .filter_map(|(peer, e)| {
                let who = Requester::Public { ip: e.client.ip() };
                let reached = e.local.unwrap_or(self.listen.ip());
                still_allowed(
                    &active,
                    Kind::Udp,
                    self.listen,
                    reached,
                    &e.app,
                    &e.target,
                    &who,
                )
                .err()
                .map(|why| (*peer, why))
            })
            .collect();
        drop(active);
        for (peer, why) in cut {
            if let Some(e) = self.flows.remove(&peer) {
                // One line per flow, its done line (within its budget: a window's end cuts a
                // table of forged flows at once), with the reason.
                self.end(e, &format!("cut by policy: {why}"));
            }
        }
    }

    /// Draining: ends the flows not in use both ways, and those quiet for [`DRAIN_QUIET`].
    fn drain_quiet(&mut self) {
        let ended: Vec<SocketAddr> = self
            .flows
            .iter()
            .filter(|(_, e)| !e.assured || e.activity.quiet_for() >= DRAIN_QUIET)
            .map(|(peer, _)| *peer)
            .collect();
        for peer in ended {
            if let Some(e) = self.flows.remove(&peer) {
                self.end(e, "gateway stopping, flow quiet or not in use both ways");
            }
        }
    }

    fn sweep(&mut self) {
        let idle = self.idle;
        let open_limit = self.hub.tuning().open_timeout + OPEN_MARGIN;
        let ended: Vec<(SocketAddr, &'static str)> = self
            .flows
            .iter()
            .filter_map(|(peer, e)| e.expired(idle, open_limit).map(|why| (*peer, why)))
            .collect();
        for (peer, why) in ended {
            if let Some(e) = self.flows.remove(&peer) {
                self.end(e, why);
            }
        }
    }

    /// The table is full: ends flows the device closed, flows idle past the idle time, and
    /// flows not in use both ways that have been quiet for [`EVICT_QUIET`] (forged sources,
    /// clients the service ignores or answered once), then flows in use both ways quiet for
    /// [`EVICT_ASSURED_QUIET`], then flows not in use both ways however recent (once older
    /// than [`ASSURE_AFTER`]), quietest first within each: at most a [`EVICT_SHARE`]th of the
    /// table,
    /// looking at most every [`EVICT_EVERY`]; when none of those is there, the quietest flow
    /// of the client holding the most ([`AppSocket::biggest_holders_quietest`]) for
    /// `newcomer`. Whether there is room now.
    fn make_room(&mut self, app: &str, newcomer: std::net::IpAddr) -> bool {
        let now = Instant::now();
        if self
            .last_eviction
            .is_some_and(|t| now.duration_since(t) < EVICT_EVERY)
        {
            return false;
        }
        self.last_eviction = Some(now);
        let most = (self.limit / EVICT_SHARE).max(1);
        let mut candidates: Vec<(u8, Duration, SocketAddr, &'static str)> = self
            .flows
            .iter()
            .filter_map(|(peer, e)| {
                e.evictable(self.idle)
                    .map(|(rank, quiet, why)| (rank, quiet, *peer, why))
            })
            .collect();
        // The surest first, then the quietest (the table's order picked them at random).
        candidates.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        let mut victims: Vec<(SocketAddr, &'static str)> = candidates
            .into_iter()
            .take(most)
            .map(|(_, _, peer, why)| (peer, why))
            .collect();
        if victims.is_empty() {
            victims.extend(self.biggest_holders_quietest(newcomer));
        }
        if !victims.is_empty() {
            warn!(app = %app, addr = %self.listen, ended = victims.len(), flows = self.flows.len(), "UDP flow table full: ending flows the device closed, idle or quiet ones, ones not in use both ways, or the quietest of the client holding the most");
        }
        for (peer, why) in victims {
            if let Some(e) = self.flows.remove(&peer) {
                self.end(e, &format!("table full, {why}"));
            }
        }
        self.flows.len() < self.limit
    }

    /// A table full of flows in use both ways and busy: the quietest flow (not young) of the
    /// client holding the most — its address, or for IPv6 its /48 —, when that is more than
    /// `newcomer` holds and one more. Sixteen addresses at the default `udp_flows_per_ip`,
    /// each flow sent to every few seconds, otherwise held the table against everyone else
    /// (a full TCP or HTTP table does the same: [`crate::per_ip::PerIp::making_room`]).
    fn biggest_holders_quietest(
        &self,
        newcomer: std::net::IpAddr,
    ) -> Option<(SocketAddr, &'static str)> {
        let holder = |ip: std::net::IpAddr| {
            let (key, site) = crate::per_ip::keys(ip);
            site.unwrap_or(key)
        };
        let mut held: HashMap<std::net::IpAddr, usize> = HashMap::new();
        for e in self.flows.values() {
            *held.entry(holder(e.client.ip())).or_default() += 1;
        }
        let (&most, &count) = held.iter().max_by_key(|(_, n)| **n)?;
        let theirs = held.get(&holder(newcomer)).copied().unwrap_or(0);
        if count <= theirs + 1 {
            return None;
        }
        self.flows
            .iter()
            .filter(|(_, e)| holder(e.client.ip()) == most && !e.young())
            .max_by_key(|(_, e)| e.activity.quiet_for())
            .map(|(peer, _)| (*peer, "in use both ways, of the client holding the most"))
    }

    /// Ends the surest, quietest flow of `ip`'s own (its address, or IPv6 /64, first; then
    /// its /48) that the device closed, is idle, or is not in use both ways and has been
    /// quiet for [`EVICT_QUIET`], for a new flow of `ip` at its per-client limit; at most one
    /// every [`EVICT_EVERY`] for each client (a forger's flows cost it one each). Whether one
    /// ended.
    fn make_room_for(&mut self, ip: std::net::IpAddr) -> bool {
        let now = Instant::now();
        let (key, site) = crate::per_ip::keys(ip);
        if self
            .last_client_eviction
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < EVICT_EVERY)
        {
            return false;
        }
        // At its own limit, only its own flows free a place for it: ending a neighbour's in
        // its /48 freed nothing it could use. At its /48's limit, its own go first.
        let own_only = self.per_ip.client_full(ip);
        let victim = self
            .flows
            .iter()
            .filter_map(|(peer, e)| {
                let (k, s) = crate::per_ip::keys(e.client.ip());
                let same = if k == key {
                    0u8
                } else if !own_only && site.is_some() && s == site {
                    1
                } else {
                    return None;
                };
                let (rank, quiet, why) = e.evictable(self.idle)?;
                // Closed or idle, or not in use both ways and quiet: answered ones too, as
                // forged datagrams from its address to a service that answers (DNS, a game)
                // held every slot of it otherwise, refreshed a few times a minute. Not one in
                // use both ways, however quiet (a WireGuard tunnel between keepalives, a
                // call on hold): a forger sending from new ports of its address ended those,
                // four a second, while its own sending flows stayed.
                (rank <= 1).then_some((same, rank, quiet, *peer, why))
            })
            .min_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)).then(b.2.cmp(&a.2)));
        let Some((_, _, _, peer, why)) = victim else {
            return false;
        };
        // Bounded by the clients holding flows: the stale are let go as it grows past them.
        if self.last_client_eviction.len() >= self.flows.len().max(EVICT_SHARE) {
            self.last_client_eviction
                .retain(|_, t| now.duration_since(*t) < EVICT_EVERY);
        }
        self.last_client_eviction.insert(key, now);
        match self.flows.remove(&peer) {
            Some(e) => {
                self.end(e, &format!("client at its limit, {why}"));
                true
            }
            None => false,
        }
    }

    /// Ends a flow taken out of the table: its task stops, and one line says so with its
    /// counts (the app's took them as they passed) — for flows not in use both ways
    /// ([`ASSURE_AFTER`]) for [`ALWAYS_LOGGED_AFTER`], within the log budget (a flood of
    /// forged sources makes one each). A flow still opening is told too (it was not, and a
    /// policy's cut of it went unsaid), its queued datagrams as dropped.
    fn end(&mut self, e: Entry, why: &str) {
        e.stop.cancel();
        let (bytes_out, dropped_out, queued) = match &e.state {
            // Past the bandwidth or refused by the socket here, and behind the tunnel's queue.
            State::Open { back, flow } => (
                back.bytes.load(Ordering::Relaxed),
                back.dropped.load(Ordering::Relaxed) + flow.queue_drops(),
                0,
            ),
            State::Opening(q) => (0, 0, q.len() as u64),
        };
        // A flow in use both ways for a minute is a client's; a younger one may be a forger's
        // (two datagrams 2 s apart to a service that answers make it so): within the budget.
        let unlogged = if e.assured && e.started.elapsed() >= ALWAYS_LOGGED_AFTER {
            Some(0)
        } else {
            self.unassured_lines.take()
        };
        if let Some(unlogged) = unlogged {
            info!(app = %e.app, device = %e.target.device, client = %Client(e.client), bytes_in = e.bytes_in, bytes_out, dropped = e.dropped + queued, dropped_out, ms = e.started.elapsed().as_millis() as u64, end = why, unlogged, "UDP flow done");
        }
    }
}

/// [`Entry::evictable`] of a flow alive or not, quiet for `quiet`, in use both ways
/// (`assured`) or not, `answered` or not; its reason is told after what made room be made
/// ("table full, idle").
fn eviction_rank(
    alive: bool,
    quiet: Duration,
    idle: Duration,
    (assured, answered): (bool, bool),
    young: bool,
) -> Option<(u8, &'static str)> {
    if !alive {
        Some((0, "closed by the device"))
    } else if quiet >= idle {
        Some((0, "idle"))
    } else if !assured && quiet >= EVICT_QUIET {
        Some((
            1,
            match answered {
                true => "answered but not in use both ways",
                false => "never answered",
            },
        ))
    } else if quiet >= EVICT_ASSURED_QUIET {
        Some((2, "in use both ways but quiet"))
    } else if !assured && !young {
        // Not in use both ways, but sending: forged sources each sending once a second,
        // never quiet for EVICT_QUIET, held a full table against every newcomer for as long
        // as they sent. Ended last, the quietest first (conntrack's early drop does the same);
        // not before ASSURE_AFTER, or a newcomer let in would be ended waiting for its answer.
        Some((3, "not in use both ways"))
    } else {
        None
    }
}

/// The flows one client address may hold in a table of `limit` ([`AppSocket::set_share`]):
/// `max_per_ip` of `max_flows`, in proportion.
fn per_ip_of_share(max_per_ip: usize, limit: usize, max_flows: usize) -> usize {
    (max_per_ip.saturating_mul(limit) / max_flows.max(1)).clamp(1, max_per_ip.max(1))
}

/// [`AppSocket::share`] of app `i` of `apps`.
fn share_of(apps: &[policies::App], i: usize, max_flows: usize) -> usize {
    let device = &apps[i].target.device;
    let sharing = apps
        .iter()
        .filter(|a| matches!(a.listener, policies::Listener::Udp(_)) && &a.target.device == device)
        .count()
        .max(1);
    max_flows
        .min(tunnel::proto::limits::MAX_UDP_FLOWS / sharing)
        .max(1)
}

/// Says that a client's datagram of `e` was dropped (the first of its flow), within `lines`.
fn too_large(lines: &mut LogBudget, e: &Entry, error: &tunnel::TunnelError) {
    if let Some(unlogged) = lines.take() {
        warn!(app = %e.app, device = %e.target.device, client = %Client(e.client), error = %error, unlogged, "UDP datagram from the client dropped (further drops of this flow are counted in its done line)");
    }
}

/// Passes the device's datagrams of one flow to its client until the flow stops.
async fn pass_back(
    sock: Arc<ReplySocket>,
    (peer, local): (SocketAddr, Option<std::net::IpAddr>),
    mut rx: mpsc::Receiver<Bytes>,
    (back, counters): (Arc<Back>, Arc<AppCounters>),
    shape_out: Shaper,
    activity: Arc<FlowActivity>,
    stop: CancellationToken,
) {
    // Made once, not per datagram (a cancellation waiter per packet).
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let d = tokio::select! {
            _ = &mut stopped => return,
            d = rx.recv() => match d {
                Some(d) => d,
                None => return,
            },
        };
        activity.touch();
        back.answered.store(true, Ordering::Relaxed);
        if !shape_out.try_take(d.len() as u64) {
            back.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        // A datagram the socket refused (the client's network unreachable) is not counted
        // as passed.
        if sock.send_to(&d, peer, local).await.is_err() {
            shape_out.give_back(d.len() as u64);
            back.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        back.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
        // The app's too, as they pass: a flow may last days (a VPN, a game server).
        counters.bytes_out(d.len() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Datagrams held while flows open are bounded in bytes for the whole socket, not only
    /// in number per flow; one that could never cross the tunnel is not held; what a queue
    /// holds is given back when it is taken or dropped.
    #[test]
    fn opening_queues_hold_a_bounded_number_of_bytes() {
        let held = Arc::new(AtomicUsize::new(0));
        let max = usize::from(tunnel::transport::MAX_UDP_PAYLOAD);
        let big = vec![0u8; max];
        assert!(!OpeningQueue::new(held.clone()).push(&vec![0u8; max + 1]));
        let mut queues = Vec::new();
        let mut kept = 0;
        'fill: loop {
            let mut q = OpeningQueue::new(held.clone());
            for _ in 0..OPENING_QUEUE {
                if !q.push(&big) {
                    queues.push(q);
                    break 'fill;
                }
                kept += max;
            }
            assert!(!q.push(b"x"), "past OPENING_QUEUE");
            queues.push(q);
        }
        assert_eq!(held.load(Ordering::Relaxed), kept);
        assert!(
            kept <= OPENING_BYTES && kept + max > OPENING_BYTES,
            "{kept}"
        );
        // A small one still fits in what is left.
        let mut last = OpeningQueue::new(held.clone());
        assert!(last.push(b"x"));
        let taken: usize = queues.pop().unwrap().take().iter().map(|d| d.len()).sum();
        assert_eq!(held.load(Ordering::Relaxed), kept + 1 - taken);
        drop(queues);
        drop(last);
        assert_eq!(held.load(Ordering::Relaxed), 0);
    }

    /// A full table ends closed and idle flows first, then flows not in use both ways quiet
    /// for a second, then, when those are not enough, flows in use both ways quiet for ten
    /// seconds (a forger can make its flows "assured" without seeing an answer), then flows
    /// not in use both ways however recent; flows in use both ways and active stay.
    #[test]
    fn a_full_table_can_end_quiet_flows_in_use_both_ways_last() {
        let idle = Duration::from_secs(120);
        let s = Duration::from_secs;
        let rank = |alive, quiet, assured, answered| {
            eviction_rank(alive, quiet, idle, (assured, answered), false).map(|(r, _)| r)
        };
        assert_eq!(rank(false, s(0), true, true), Some(0));
        assert_eq!(rank(true, idle, true, true), Some(0));
        assert_eq!(rank(true, s(1), false, false), Some(1));
        assert_eq!(rank(true, s(1), false, true), Some(1));
        // Sending, but not in use both ways: last, yet ended (a forger sending from each
        // address once a second held the table).
        assert_eq!(rank(true, s(0), false, false), Some(3));
        assert_eq!(rank(true, s(0), false, true), Some(3));
        // Not before it could have been in use both ways.
        assert_eq!(
            eviction_rank(true, s(0), idle, (false, false), true).map(|(r, _)| r),
            None
        );
        assert_eq!(rank(true, s(1), true, true), None);
        assert_eq!(rank(true, s(9), true, true), None);
        assert_eq!(rank(true, EVICT_ASSURED_QUIET, true, true), Some(2));
    }

    /// A table shrunk by sharing its device's flows shrinks what one address may hold in
    /// proportion; a table the operator set small keeps `udp_flows_per_ip` as set.
    #[test]
    fn the_flows_of_one_address_follow_the_tables_share() {
        let max = tunnel::proto::limits::MAX_UDP_FLOWS;
        assert_eq!(per_ip_of_share(max / 16, max, max), max / 16);
        assert_eq!(per_ip_of_share(max / 16, max / 16, max), 16);
        assert_eq!(per_ip_of_share(max / 16, 1, max), 1);
        assert_eq!(per_ip_of_share(256, 4, 4), 256);
        assert_eq!(per_ip_of_share(8, 4, 4), 8);
    }

    /// Several udp apps to one device share its tunnel's flows; an app alone to its device
    /// keeps `udp_flows_per_app`.
    #[test]
    fn udp_apps_to_one_device_share_its_tunnels_flows() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("apps.toml"),
            "[app.a]\nudp = { listen = \"127.0.0.1:1\" }\nto = \"home1/a\"\nallow = { from = [\"public\"] }\n\
             [app.b]\nudp = { listen = \"127.0.0.1:2\" }\nto = \"home1/b\"\nallow = { from = [\"public\"] }\n\
             [app.c]\nudp = { listen = \"127.0.0.1:3\" }\nto = \"home2/c\"\nallow = { from = [\"public\"] }\n\
             [app.t]\ntcp = { listen = \"127.0.0.1:4\" }\nto = \"home1/t\"\nallow = { from = [\"public\"] }\n",
        )
        .unwrap();
        let store = policies::PolicyStore::load(dir.path()).unwrap();
        let active = store.current();
        let apps = active.policy.apps();
        let at = |name: &str| apps.iter().position(|a| a.name == name).unwrap();
        let max = tunnel::proto::limits::MAX_UDP_FLOWS;
        assert_eq!(share_of(apps, at("a"), max), max / 2);
        assert_eq!(share_of(apps, at("b"), max), max / 2);
        assert_eq!(share_of(apps, at("c"), max), max);
        assert_eq!(share_of(apps, at("c"), 100), 100);
    }
}
