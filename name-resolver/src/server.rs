//! The DNS server the gateway runs: UDP through a receive loop of our own ([`crate::udp`]:
//! answers leave from the address each query came to), TCP through a small accept loop of
//! our own (hickory's has no bound on open connections) that reuses hickory's framing and
//! response path. Follows the zone the gateway holds without a restart.

use crate::stats::Transport;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use hickory_proto::op::MessageType;
use hickory_proto::runtime::iocompat::AsyncIoTokioAsStd;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use hickory_proto::xfer::Protocol;
use hickory_proto::ProtoError;
use hickory_server::authority::MessageRequest;
use hickory_server::server::{Request, RequestHandler, ResponseHandle};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use zone_core::SignedZone;

use zone_core::client_slots::{ClientSlot, ClientSlots, Full};

use crate::error::DnsError;
use crate::handler::ZoneHandler;
use crate::records::ZoneRecords;
use crate::tcp_writer::AnswerWriter;

/// Open TCP connections at once. Resolvers use TCP only after a truncated answer, so a few
/// hundred covers a busy zone while a flood of idle connections cannot exhaust file descriptors.
pub const MAX_TCP_CONNECTIONS: usize = 256;
/// Of those, connections one client address (IPv6: its /64) may hold: a resolver needs one or
/// two, and one address keeping all of them busy with a query every few seconds shut every
/// node out of fetching the zone config (its TXT answer needs TCP).
pub const MAX_TCP_PER_CLIENT: usize = 16;
/// Connections of one site (IPv4 /24, IPv6 /48), all its clients together: a /48 holds 65,536
/// /64s and a rented /24 256 addresses, so without this one network could still take every
/// slot, [`MAX_TCP_PER_CLIENT`] per client.
pub const MAX_TCP_PER_SITE: usize = 4 * MAX_TCP_PER_CLIENT;
/// A TCP connection that sends no complete query for this long is closed (RFC 7766 §6.2.3
/// recommends seconds, not minutes, for servers).
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// A TCP connection owing an answer it cannot write (its client reads nothing) is closed after
/// this long without progress. Making room closes such a connection last.
pub const TCP_OWED_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the zone source is asked for its serial. Cheap (an Arc clone and a compare), and
/// a second is well below any TTL, so answers follow zone.json changes without notice.
pub const ZONE_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often the rate limiter's work (and TCP connections refused at a limit) is logged, when
/// there was any: one line per period under a flood, not one per answer.
pub const RATE_LIMIT_REPORT_EVERY: Duration = Duration::from_secs(60);
/// How long shutdown waits for queries in flight before abandoning them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Attempts to find a port free for both UDP and TCP when binding port 0.
const SAME_PORT_ATTEMPTS: usize = 16;

/// Bound UDP and TCP sockets, ready to [`run`](DnsServer::run).
#[derive(Debug)]
pub struct DnsServer {
    /// One socket each, or one per address of the machine ([`bind_each_address`]).
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
    /// What it answered ([`DnsServer::stats`]).
    stats: Arc<crate::DnsStats>,
}

fn bind_error(proto: &'static str, addr: SocketAddr, source: std::io::Error) -> DnsError {
    let hint = match source.kind() {
        std::io::ErrorKind::PermissionDenied if addr.port() < 1024 => format!(
            "; port {} needs root or CAP_NET_BIND_SERVICE; set dns = \"127.0.0.1:5353\" or dns = \"off\" in gateway.toml",
            addr.port()
        ),
        std::io::ErrorKind::AddrInUse => "; another DNS server is using it: set dns = \"PUBLIC-IP:53\" (an address of this machine it does not hold), another port, or dns = \"off\" in gateway.toml (systemd-resolved holds 127.0.0.53:53; to free it set DNSStubListener=no in /etc/systemd/resolved.conf and link /etc/resolv.conf to /run/systemd/resolve/resolv.conf, or this machine's own lookups stop)".into(),
        std::io::ErrorKind::AddrNotAvailable => "; this machine has no such address: use [::] (or 0.0.0.0 without IPv6) or one of its own addresses in dns = \"IP:PORT\" in gateway.toml".into(),
        _ => String::new(),
    };
    DnsError::Bind {
        proto,
        addr,
        error: source,
        hint,
    }
}

impl DnsServer {
    /// What it answered since it started, for `/metrics`: take it before [`DnsServer::run`].
    pub fn stats(&self) -> Arc<crate::DnsStats> {
        self.stats.clone()
    }

    /// Binds UDP and TCP on the given addresses.
    pub async fn bind(udp: SocketAddr, tcp: SocketAddr) -> Result<Self, DnsError> {
        let udp = UdpSocket::bind(udp)
            .await
            .map_err(|e| bind_error("UDP", udp, e))?;
        let tcp = TcpListener::bind(tcp)
            .await
            .map_err(|e| bind_error("TCP", tcp, e))?;
        Ok(DnsServer {
            udp: vec![udp],
            tcp: vec![tcp],
            stats: Arc::default(),
        })
    }

    /// Binds UDP and TCP on the same address and port, as DNS clients expect. With port 0, picks
    /// a port free for both.
    pub async fn bind_same_port(addr: SocketAddr) -> Result<Self, DnsError> {
        Self::bind_same_port_using(
            addr,
            |a| {
                let s = std::net::UdpSocket::bind(a)?;
                s.set_nonblocking(true)?;
                UdpSocket::from_std(s)
            },
            |a| {
                // As TcpListener::bind does it (SO_REUSEADDR, std's backlog of 128), but
                // synchronous.
                let s = match a {
                    SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                s.set_reuseaddr(true)?;
                s.bind(a)?;
                s.listen(128)
            },
        )
        .await
    }

    /// [`bind_same_port`](DnsServer::bind_same_port) with the caller's way of binding (the
    /// gateway's makes `[::]` take IPv4 too).
    pub async fn bind_same_port_using(
        addr: SocketAddr,
        bind_udp: impl Fn(SocketAddr) -> std::io::Result<UdpSocket>,
        bind_tcp: impl Fn(SocketAddr) -> std::io::Result<TcpListener>,
    ) -> Result<Self, DnsError> {
        match bind_pair(addr, &bind_udp, &bind_tcp) {
            Ok((udp, tcp)) => Ok(DnsServer {
                udp: vec![udp],
                tcp: vec![tcp],
                stats: Arc::default(),
            }),
            // Another DNS server holds the port on one address (systemd-resolved: 127.0.0.53
            // on every stock Ubuntu), and a wildcard overlaps it: the gateway exited and
            // systemd restarted it for ever. Every other address can still be served.
            Err(e) if addr.ip().is_unspecified() && addr.port() != 0 && e.in_use() => {
                let ips = match if_addrs::get_if_addrs() {
                    Ok(list) => list.into_iter().map(|i| i.ip()).collect(),
                    Err(error) => {
                        warn!(%error, "cannot list this machine's addresses");
                        Vec::new()
                    }
                };
                bind_each_address(addr, ips, &bind_udp, &bind_tcp).ok_or(e)
            }
            Err(e) => Err(e),
        }
    }

    /// The bound UDP address (with the real port when 0 was asked); the first of them when
    /// bound on each address.
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addrs().first().copied().unwrap_or_else(unbound)
    }

    /// The bound TCP address; the first of them when bound on each address.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addrs().first().copied().unwrap_or_else(unbound)
    }

    /// Every bound UDP address.
    pub fn udp_addrs(&self) -> Vec<SocketAddr> {
        self.udp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }

    /// Every bound TCP address.
    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.tcp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }

    /// Serves the zone `zone_source` returns until `shutdown`. The source is asked every
    /// [`ZONE_POLL_INTERVAL`]; records are rebuilt only when the serial changes. Pass the
    /// gateway's `move || creds.zone()`.
    pub async fn run(
        self,
        zone_source: impl Fn() -> Arc<SignedZone> + Send + Sync + 'static,
        shutdown: CancellationToken,
    ) -> Result<(), DnsError> {
        let first = ZoneRecords::new(&zone_source())?;
        self.run_with(first, zone_source, shutdown).await
    }

    /// Like [`run`](DnsServer::run), starting with records the caller built already (the
    /// gateway builds them before it starts serving anything, to refuse a zone DNS cannot
    /// carry). A new serial's records are built on a blocking thread (tens of milliseconds for a
    /// zone near the limit: no runtime task waits on it), and a serial that cannot be built is
    /// not tried again: too large for DNS, it is served without its TXT set; failing even so
    /// (or panicking), DNS stops with [`DnsError::Stopped`] rather than go on serving the
    /// previous serial's TXT, without the newer revocations.
    pub async fn run_with(
        self,
        first: ZoneRecords,
        zone_source: impl Fn() -> Arc<SignedZone> + Send + Sync + 'static,
        shutdown: CancellationToken,
    ) -> Result<(), DnsError> {
        let first = Arc::new(first);
        let (tx, rx) = tokio::sync::watch::channel(first.clone());
        let mut builder = {
            let shutdown = shutdown.clone();
            let mut tried = first.serial();
            tokio::spawn(async move {
                let mut poll = tokio::time::interval(ZONE_POLL_INTERVAL);
                poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = poll.tick() => {}
                    }
                    let zone = zone_source();
                    let serial = zone.config.serial;
                    let origin = zone.config.domain.to_string();
                    if serial == tried {
                        continue;
                    }
                    tried = serial;
                    // The gateway accepted this zone, so it verified; only a zone too large
                    // for DNS fails to build. Its addresses are served still, its TXT set no
                    // longer: the last one that fitted would hand bootstrapping nodes a config
                    // without the newer revocations.
                    let built =
                        tokio::task::spawn_blocking(move || match ZoneRecords::new(&zone) {
                            Ok(r) => (Ok(r), None),
                            Err(error) => (ZoneRecords::without_txt(&zone), Some(error)),
                        })
                        .await;
                    // A panicked build, or records that do not build even without TXT: one
                    // failure, said the same way.
                    let built = built.map_err(|e| e.to_string()).and_then(|(r, txt_error)| {
                        r.map(|r| (r, txt_error)).map_err(|e| e.to_string())
                    });
                    match built {
                        Ok((r, None)) => {
                            let _ = tx.send(Arc::new(r));
                        }
                        Ok((r, Some(error))) => {
                            error!(zone = %origin, %error, serial, "DNS serves this zone serial's addresses without its TXT record: nodes cannot bootstrap over DNS until it fits");
                            let _ = tx.send(Arc::new(r));
                        }
                        // The previous serial's TXT, without the newer revocations, must not go
                        // on being served — DNS stops, and with it the gateway, said why.
                        Err(error) => {
                            return Err(DnsError::Stopped(
                                "zone records builder",
                                format!("zone {origin} serial {serial}: {error}"),
                            ));
                        }
                    }
                }
            })
        };
        // Told of each new serial's records as they are built: polled on its own second as
        // well, a zone.json adopted was served up to two seconds later (a node started with
        // --bootstrap-dns at once after copying it in was refused the older serial).
        let changed = rx.clone();
        let serve = self.serve_records(
            first,
            move || rx.borrow().clone(),
            Some(changed),
            ZONE_POLL_INTERVAL,
            shutdown,
        );
        tokio::pin!(serve);
        // The builder ends only at shutdown, or by a panic (of the zone source): then DNS
        // would serve one serial for good, unseen — said as the server stopping instead.
        let r = tokio::select! {
            r = &mut serve => r,
            end = &mut builder => match end {
                Err(e) if e.is_panic() => Err(DnsError::Stopped("zone records builder", e.to_string())),
                Ok(Err(e)) => Err(e),
                _ => serve.await,
            },
        };
        builder.abort();
        r
    }

    /// Like [`run`](DnsServer::run), with records built by the caller (tests serve hand-made
    /// TXT sets this way). A new serial or a new `Arc` from the source is served from then on.
    pub async fn run_records(
        self,
        first: Arc<ZoneRecords>,
        records_source: impl FnMut() -> Arc<ZoneRecords> + Send + 'static,
        shutdown: CancellationToken,
    ) -> Result<(), DnsError> {
        self.serve_records(first, records_source, None, ZONE_POLL_INTERVAL, shutdown)
            .await
    }

    /// [`run_records`](DnsServer::run_records), the source also read as soon as `changed`
    /// says it changed.
    async fn serve_records(
        self,
        first: Arc<ZoneRecords>,
        mut records_source: impl FnMut() -> Arc<ZoneRecords> + Send + 'static,
        mut changed: Option<tokio::sync::watch::Receiver<Arc<ZoneRecords>>>,
        poll_every: Duration,
        shutdown: CancellationToken,
    ) -> Result<(), DnsError> {
        let (udp_addr, tcp_addr) = (self.udp_addrs(), self.tcp_addrs());
        let handler = ZoneHandler::counting(first.clone(), self.stats.clone());
        info!(
            udp = ?udp_addr,
            tcp = ?tcp_addr,
            zone = %first.origin(),
            serial = first.serial(),
            "DNS server listening"
        );

        // A loop per socket ([`crate::udp`]), each answering from the address its queries
        // came to.
        let udp_stop = CancellationToken::new();
        let mut udp_tasks = JoinSet::new();
        for udp in self.udp {
            udp_tasks.spawn(crate::udp::serve(udp, handler.clone(), udp_stop.clone()));
        }
        // Its own token, not a child of `shutdown`: the loop below must see the shutdown first,
        // so that the accept loop ending is always unexpected there.
        let tcp_stop = CancellationToken::new();
        // TCP connections closed at once for a limit, for the periodic report.
        let tcp_refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tcp_task = tokio::spawn(tcp_accept_loop(
            self.tcp,
            handler.clone(),
            tcp_refused.clone(),
            tcp_stop.clone(),
        ));

        // The first look a period from now: `first` is what the source holds at the start.
        let mut poll =
            tokio::time::interval_at(tokio::time::Instant::now() + poll_every, poll_every);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported = tokio::time::Instant::now();
        let result = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                told = next_change(&mut changed) => {
                    match told {
                        Some(()) => serve_newer(&handler, records_source()),
                        // The builder ended (shutdown): the ticks go on.
                        None => changed = None,
                    }
                }
                _ = poll.tick() => {
                    serve_newer(&handler, records_source());
                    if reported.elapsed() >= RATE_LIMIT_REPORT_EVERY {
                        reported = tokio::time::Instant::now();
                        let (slipped, dropped) = handler.rate_limited();
                        if slipped + dropped > 0 {
                            warn!(slipped, dropped, minutes = RATE_LIMIT_REPORT_EVERY.as_secs() / 60, "DNS rate limit: UDP answers over a client network's rate of one answer sent empty with TC (slipped) or not at all (dropped): a forged-source flood, or a resolver asking very fast");
                        }
                        let refused = tcp_refused.swap(0, std::sync::atomic::Ordering::Relaxed);
                        if refused > 0 {
                            warn!(refused, minutes = RATE_LIMIT_REPORT_EVERY.as_secs() / 60, per_client = MAX_TCP_PER_CLIENT, per_site = MAX_TCP_PER_SITE, total = MAX_TCP_CONNECTIONS, "DNS over TCP: connections closed at once, their client, its site or the server at its limit");
                        }
                    }
                }
                // Both are cancel-safe: they only wait on a JoinSet / JoinHandle. The UDP loops
                // end only at their stop, or by a panic.
                Some(r) = udp_tasks.join_next() => {
                    break Err(DnsError::Stopped("UDP", r.err().map(|e| e.to_string()).unwrap_or_else(|| "receive loop ended".into())));
                }
                r = &mut tcp_task => {
                    break Err(DnsError::Stopped("TCP", match r { Ok(()) => "accept loop ended".into(), Err(e) => e.to_string() }));
                }
            }
        };

        tcp_stop.cancel();
        udp_stop.cancel();
        let graceful = async {
            while udp_tasks.join_next().await.is_some() {}
            if !tcp_task.is_finished() {
                let _ = (&mut tcp_task).await;
            }
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful)
            .await
            .is_err()
        {
            warn!("DNS server: queries still in flight after the shutdown grace period, abandoning them");
            tcp_task.abort();
            udp_tasks.abort_all();
        }
        info!(udp = ?udp_addr, tcp = ?tcp_addr, "DNS server stopped");
        result
    }
}

/// Serves `next` from now on if it is not what `handler` serves.
fn serve_newer(handler: &ZoneHandler, next: Arc<ZoneRecords>) {
    let served = handler.records();
    if !Arc::ptr_eq(&next, &served) {
        let (old, new) = (served.serial(), next.serial());
        let zone = next.origin().clone();
        handler.replace(next);
        if old != new {
            info!(%zone, serial = new, previous = old, "DNS serving new zone serial");
        }
    }
}

/// Once `changed` (if any) has a new value; `None` once its sender is gone.
async fn next_change(
    changed: &mut Option<tokio::sync::watch::Receiver<Arc<ZoneRecords>>>,
) -> Option<()> {
    match changed {
        Some(rx) => rx.changed().await.ok(),
        None => std::future::pending().await,
    }
}

fn unbound() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// UDP and TCP on `addr`, the same port for both; with port 0, one free for both.
fn bind_pair(
    addr: SocketAddr,
    bind_udp: &impl Fn(SocketAddr) -> std::io::Result<UdpSocket>,
    bind_tcp: &impl Fn(SocketAddr) -> std::io::Result<TcpListener>,
) -> Result<(UdpSocket, TcpListener), DnsError> {
    let mut last = None;
    for _ in 0..SAME_PORT_ATTEMPTS {
        let udp = bind_udp(addr).map_err(|e| bind_error("UDP", addr, e))?;
        let port = udp
            .local_addr()
            .map_err(|e| bind_error("UDP", addr, e))?
            .port();
        // `addr` with the port, its scope kept: `dns = "[fe80::1%2]:53"` bound UDP on
        // interface 2 and then TCP with no scope (EINVAL: the gateway exited, for ever).
        let mut tcp_addr = addr;
        tcp_addr.set_port(port);
        match bind_tcp(tcp_addr) {
            Ok(tcp) => return Ok((udp, tcp)),
            // Only a port we picked ourselves may be retried.
            Err(e) if addr.port() == 0 && e.kind() == std::io::ErrorKind::AddrInUse => {
                last = Some(bind_error("TCP", tcp_addr, e));
            }
            Err(e) => return Err(bind_error("TCP", tcp_addr, e)),
        }
    }
    Err(last.unwrap_or_else(|| bind_error("TCP", addr, std::io::ErrorKind::AddrInUse.into())))
}

/// Binds `wildcard`'s port on each of `ips` it covers (`0.0.0.0` IPv4 only, `[::]` both), one
/// pair of sockets per address, skipping those another server holds; IPv6 link-local
/// addresses are left out (they need a scope, and no resolver asks there). `None` when no
/// address could be bound. Addresses the machine gains later are not served.
fn bind_each_address(
    wildcard: SocketAddr,
    ips: Vec<IpAddr>,
    bind_udp: &impl Fn(SocketAddr) -> std::io::Result<UdpSocket>,
    bind_tcp: &impl Fn(SocketAddr) -> std::io::Result<TcpListener>,
) -> Option<DnsServer> {
    let (mut udp, mut tcp, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    let mut seen = std::collections::HashSet::new();
    for ip in ips {
        let covered = wildcard.is_ipv6() || ip.is_ipv4();
        let link_local = matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
        if !covered || link_local || !seen.insert(ip) {
            continue;
        }
        match bind_pair(SocketAddr::new(ip, wildcard.port()), bind_udp, bind_tcp) {
            Ok((u, t)) => {
                udp.push(u);
                tcp.push(t);
            }
            Err(e) => skipped.push(format!("{ip} ({})", e.short())),
        }
    }
    // Loopback alone serves no resolver: the zone's NS address is another one (held by the
    // other server, say), and a gateway answering only itself must not look healthy.
    let reachable = |s: &UdpSocket| s.local_addr().is_ok_and(|a| !a.ip().is_loopback());
    if !udp.iter().any(reachable) {
        return None;
    }
    let server = DnsServer {
        udp,
        tcp,
        stats: Arc::default(),
    };
    warn!(
        port = wildcard.port(),
        listening = ?server.udp_addrs(),
        skipped = ?skipped,
        "DNS: another server holds this port on one of this machine's addresses (systemd-resolved holds 127.0.0.53), so a wildcard cannot be bound: serving each of the others instead; addresses the machine gains later are served after a restart"
    );
    Some(server)
}

/// The open TCP connections, each with its client, when it last completed a query and a way
/// to close it: when every slot is taken, the one idle longest makes room for a newcomer
/// (RFC 7766 §6.2.3 lets a server close idle connections under pressure), or, when none has
/// been idle a while, the idlest of the client holding the most. Without that, a few
/// addresses keeping [`MAX_TCP_CONNECTIONS`] busy with a query every few seconds (or every
/// half second) shut every node out of fetching the zone config, whose answer needs TCP.
#[derive(Debug, Default)]
struct Live {
    conns: std::sync::Mutex<std::collections::HashMap<u64, LiveConn>>,
    next_id: std::sync::atomic::AtomicU64,
    /// The reference point of `LiveConn::last`.
    epoch: std::sync::OnceLock<tokio::time::Instant>,
}

#[derive(Debug, Clone)]
struct LiveConn {
    /// Milliseconds after `Live::epoch` of its last complete query (or its accept), or of
    /// its last write's progress.
    last: Arc<std::sync::atomic::AtomicU64>,
    /// Answers it owes: queries read, less answers written whole ([`AnswerWriter`]).
    owed: Arc<std::sync::atomic::AtomicU64>,
    stop: CancellationToken,
    /// Its client's site ([`zone_core::client_slots::site_of`]).
    site: IpAddr,
    /// Its client ([`zone_core::client_slots::client_of`]).
    client: IpAddr,
}

impl LiveConn {
    /// Whether it has gone [`EVICTABLE_AFTER`] without a query or write progress, at `now`
    /// (milliseconds of [`Live::now_ms`]).
    fn evictable(&self, now: u64) -> bool {
        self.last.load(std::sync::atomic::Ordering::Relaxed) + EVICTABLE_AFTER.as_millis() as u64
            <= now
    }

    /// Which connection is closed first to make room: one between answers before one still
    /// owing an answer (closing that cuts it part way: a node's zone config fetch fails), then
    /// the one idle longest. One owing answers goes only when every candidate does (clients
    /// that stopped reading), the one stalled longest first.
    fn rank(&self) -> (bool, u64) {
        (
            self.owed.load(std::sync::atomic::Ordering::Relaxed) > 0,
            self.last.load(std::sync::atomic::Ordering::Relaxed),
        )
    }
}

impl Live {
    fn now_ms(&self) -> u64 {
        let epoch = *self.epoch.get_or_init(tokio::time::Instant::now);
        epoch.elapsed().as_millis() as u64
    }

    /// Registers a connection of `peer`; it unregisters when the returned guard drops.
    fn register(self: &Arc<Self>, peer: IpAddr) -> (LiveConn, LiveGuard) {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let conn = LiveConn {
            last: Arc::new(self.now_ms().into()),
            owed: Arc::default(),
            stop: CancellationToken::new(),
            site: zone_core::client_slots::site_of(peer),
            client: zone_core::client_slots::client_of(peer),
        };
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, conn.clone());
        (
            conn,
            LiveGuard {
                live: self.clone(),
                id,
            },
        )
    }

    /// Closes the connection idle the longest, if one has been idle for [`EVICTABLE_AFTER`],
    /// one between answers before any still owing one ([`LiveConn::rank`]); false if there is
    /// none. (A connection whose query came a moment ago may still be sending its answer: a
    /// node fetching the zone config on a slow link.)
    fn evict_idlest(&self) -> bool {
        let now = self.now_ms();
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        // Ties (queries within one millisecond) go to the older connection.
        let idlest = conns
            .iter()
            .filter(|(_, c)| !c.stop.is_cancelled() && c.evictable(now))
            .min_by_key(|(id, c)| (c.rank(), **id));
        close(idlest.map(|(_, c)| c))
    }

    /// Closes every connection that has neither read a query nor written for `quiet`.
    fn close_quiet(&self, quiet: Duration) {
        let now = self.now_ms();
        let quiet = quiet.as_millis() as u64;
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            if c.last.load(std::sync::atomic::Ordering::Relaxed) + quiet <= now {
                c.stop.cancel();
            }
        }
    }

    /// Makes room for a connection of `newcomer` in a full table: closes the connection idle
    /// the longest if one has been idle for [`EVICTABLE_AFTER`], else the idlest of the site
    /// (IPv4 /24, IPv6 /48) holding the most, if it holds two more than `newcomer`'s, or any
    /// while `newcomer`'s holds none. False if neither. By site: four sites at
    /// [`MAX_TCP_PER_SITE`] fill the table with one connection per client, none of them
    /// holding "the most". A site holding none gets in against one holding one: sites holding
    /// one busy connection each (an IPv6 /40 is 256 of them) kept every newcomer out.
    fn make_room(&self, newcomer: IpAddr) -> bool {
        if self.evict_idlest() {
            return true;
        }
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let open = || conns.values().filter(|c| !c.stop.is_cancelled());
        let me = zone_core::client_slots::site_of(newcomer);
        let Some((victim, most, mine)) = biggest_holder(open, |c| c.site, me) else {
            return false;
        };
        // Two more, or any at all against a site holding none: sites one apart would close
        // each other's busy connections in turn as each reconnects.
        close(Some(victim).filter(|_| most > mine + 1 || (mine == 0 && most > 0)))
    }
}

impl Live {
    /// Makes room in `newcomer`'s site, which holds [`MAX_TCP_PER_SITE`]: closes its
    /// connection idle the longest if one has been idle for [`EVICTABLE_AFTER`], else the
    /// idlest of its client holding the most if that holds two more than `newcomer`'s client
    /// (ranked by [`LiveConn::rank`] both). False if neither. Without it a neighbour in a
    /// cloud /24 or a shared /64 holding the site's slots shut a node there out of DNS over
    /// TCP, and so out of its zone config.
    fn make_room_in_site(&self, newcomer: IpAddr) -> bool {
        let site = zone_core::client_slots::site_of(newcomer);
        let me = zone_core::client_slots::client_of(newcomer);
        let now = self.now_ms();
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let open = || {
            conns
                .values()
                .filter(move |c| c.site == site && !c.stop.is_cancelled())
        };
        let victim = open()
            .filter(|c| c.evictable(now))
            .min_by_key(|c| c.rank())
            .or_else(|| {
                let (victim, most, mine) = biggest_holder(open, |c| c.client, me)?;
                Some(victim).filter(|_| most >= mine + 2)
            });
        close(victim)
    }
}

/// Of the connections `open` gives, grouped by `key` (site or client): the best to close
/// ([`LiveConn::rank`]) of the group holding the most, with that group's count and the count of
/// group `me`. `None` when there are none.
fn biggest_holder<'a, I: Iterator<Item = &'a LiveConn>>(
    open: impl Fn() -> I,
    key: impl Fn(&LiveConn) -> IpAddr,
    me: IpAddr,
) -> Option<(&'a LiveConn, usize, usize)> {
    let mut held: std::collections::HashMap<IpAddr, usize> = Default::default();
    for c in open() {
        *held.entry(key(c)).or_default() += 1;
    }
    let mine = held.get(&me).copied().unwrap_or(0);
    let (&hog, &most) = held.iter().max_by_key(|(_, n)| **n)?;
    let victim = open().filter(|c| key(c) == hog).min_by_key(|c| c.rank())?;
    Some((victim, most, mine))
}

/// Closes `victim`, if any (its task ends and frees its slots); whether there was one.
fn close(victim: Option<&LiveConn>) -> bool {
    victim.map(|c| c.stop.cancel()).is_some()
}

/// A slot of `per_client` for `ip`, waited for up to [`EVICTION_WAIT`] while a connection
/// closed for it ends.
async fn slot_freed(per_client: &ClientSlots, ip: IpAddr) -> Option<ClientSlot> {
    let deadline = tokio::time::Instant::now() + EVICTION_WAIT;
    loop {
        if let Some(slot) = per_client.take(ip) {
            return Some(slot);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[derive(Debug)]
struct LiveGuard {
    live: Arc<Live>,
    id: u64,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.live
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// How long a connection must have gone without a query to be closed for a newcomer.
const EVICTABLE_AFTER: Duration = Duration::from_secs(1);

/// How long a newcomer waits for the slot an evicted connection frees.
const EVICTION_WAIT: Duration = Duration::from_millis(200);

/// Accepts TCP connections up to [`MAX_TCP_CONNECTIONS`], at most [`MAX_TCP_PER_CLIENT`] per
/// client and [`MAX_TCP_PER_SITE`] per site, each served in its own task; when all are taken,
/// one is closed for the newcomer if that is fair ([`Live::make_room`]).
async fn tcp_accept_loop(
    listeners: Vec<TcpListener>,
    handler: ZoneHandler,
    refused: Arc<std::sync::atomic::AtomicU64>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    let per_client = ClientSlots::new(MAX_TCP_PER_CLIENT, MAX_TCP_PER_SITE);
    let live = Arc::new(Live::default());
    let mut conns = JoinSet::new();
    // Every listener's accepts as one stream, under one set of limits.
    let mut accepts = futures_util::stream::select_all(listeners.into_iter().map(|l| {
        Box::pin(futures_util::stream::unfold(l, |l| async move {
            let r = l.accept().await;
            Some((r, l))
        }))
    }));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            Some(accepted) = accepts.next() => match accepted {
                Ok((stream, peer)) => {
                    let slot = match per_client.take_or_why(peer.ip()) {
                        Ok(slot) => Some(slot),
                        Err(Full::Site) if live.make_room_in_site(peer.ip()) => {
                            debug!(%peer, "DNS over TCP: this client's site holds its share of connections, closing one of them to make room");
                            slot_freed(&per_client, peer.ip()).await
                        }
                        Err(_) => None,
                    };
                    let Some(slot) = slot else {
                        debug!(%peer, "DNS over TCP: this client's (or its site's) connection limit reached, closing");
                        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        handler.stats().tcp_refused();
                        continue;
                    };
                    let permit = match slots.clone().try_acquire_owned() {
                        Ok(p) => Some(p),
                        Err(_) if live.make_room(peer.ip()) => {
                            debug!(%peer, "DNS over TCP: all connections taken, closing one to make room");
                            tokio::time::timeout(EVICTION_WAIT, slots.clone().acquire_owned())
                                .await
                                .ok()
                                .and_then(Result::ok)
                        }
                        Err(_) => None,
                    };
                    match permit {
                        Some(permit) => {
                            let (conn, guard) = live.register(peer.ip());
                            conns.spawn(serve_tcp(stream, peer, handler.clone(), (permit, slot, guard), conn));
                        }
                        // Closing at once tells the client to go elsewhere, instead of queueing it.
                        None => {
                            debug!(%peer, "DNS over TCP: connection limit reached, closing");
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        handler.stats().tcp_refused();
                        }
                    }
                }
                Err(error) => {
                    // Usually out of file descriptors: back off instead of spinning on accept.
                    warn!(%error, "DNS over TCP: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    // Connections between queries are closed now, and each that is answering once it has
    // been quiet for a moment: a resolver's idle connection otherwise held every shutdown
    // for the whole grace period (and its warning). run() bounds how long this takes.
    let mut check = tokio::time::interval(SHUTDOWN_QUIET);
    loop {
        live.close_quiet(SHUTDOWN_QUIET);
        tokio::select! {
            joined = conns.join_next() => if joined.is_none() { break },
            _ = check.tick() => {}
        }
    }
}

/// At shutdown, how long a connection must have neither read a query nor written to count as
/// between queries (its last answer written).
const SHUTDOWN_QUIET: Duration = Duration::from_millis(100);

/// What the server does with one DNS-over-TCP message (the bytes its length prefix framed),
/// as [`serve_tcp`] does it. Sans-IO, for the fuzz target too.
#[doc(hidden)]
#[derive(Debug)]
pub enum TcpFrame {
    /// A query, for the handler (which answers every one, several questions with a FORMERR).
    Query(MessageRequest),
    /// A query that does not decode, its header intact (the framing said where it ends):
    /// answered with this header-only FORMERR, and the connection goes on. With the error.
    FormErr(Vec<u8>, ProtoError),
    /// A response: never answered (that is how reflection loops start); the connection goes on.
    Response,
    /// Not even a query's header (too short, or a response that does not decode): the
    /// connection ends. With the error.
    NotAQuery(ProtoError),
}

/// Reads one DNS-over-TCP message: see [`TcpFrame`].
#[doc(hidden)]
pub fn tcp_frame(bytes: &[u8]) -> TcpFrame {
    match MessageRequest::read(&mut BinDecoder::new(bytes)) {
        Ok(m) if m.message_type() == MessageType::Response => TcpFrame::Response,
        Ok(m) => TcpFrame::Query(m),
        Err(error) => match formerr_for(bytes) {
            Some(answer) => TcpFrame::FormErr(answer, error),
            None => TcpFrame::NotAQuery(error),
        },
    }
}

/// The answer to a query that does not decode: its header with QR set, RCODE FORMERR and no
/// records (RFC 6891 §6.1.1 wants FORMERR, say, for two OPT records). `None` when the bytes
/// are not a query header at all, or are a response (never answered).
pub(crate) fn formerr_for(frame: &[u8]) -> Option<Vec<u8>> {
    let head = frame.get(..12)?;
    if head[2] & 0x80 != 0 {
        return None;
    }
    let mut out = vec![0u8; 12];
    out[..2].copy_from_slice(&head[..2]);
    // QR, the opcode and RD copied; AA, TC, RA, Z, AD and CD clear; RCODE 1 (FORMERR).
    out[2] = 0x80 | (head[2] & 0x79);
    out[3] = 0x01;
    Some(out)
}

/// One TCP connection: length-prefixed queries (hickory's framing), answered in order, until
/// the client closes, idles out, or the connection is evicted (`conn.stop`).
async fn serve_tcp(
    stream: TcpStream,
    peer: SocketAddr,
    handler: ZoneHandler,
    // Held until the connection ends.
    slots: (OwnedSemaphorePermit, ClientSlot, LiveGuard),
    conn: LiveConn,
) {
    // Answers are small and clients pipeline queries: without this, Nagle holds each small
    // answer back waiting for the client's delayed ACK (dnsperf over TCP: 15k -> 21k queries/s).
    if let Err(error) = stream.set_nodelay(true) {
        debug!(%peer, %error, "DNS over TCP: cannot set TCP_NODELAY");
    }
    let live = slots.2.live.clone();
    // Writing an answer counts as activity, as a query does: a large one (the zone's TXT set)
    // to a slow client took longer than the idle timeout to hand over, and the connection
    // was cut part way, or picked as the idlest to make room.
    let clock = live.clone();
    let stream = AnswerWriter::new(
        stream,
        (conn.last.clone(), conn.owed.clone(), move || clock.now_ms()),
        // The slots stay taken while the socket lingers: a client whose connections end in a
        // linger cannot open more meanwhile. Closed to make room (`stop`), it does not linger.
        (Box::new(slots), conn.stop.clone()),
    );
    let (mut frames, mut response_stream) =
        hickory_proto::tcp::TcpStream::from_stream(AsyncIoTokioAsStd(stream), peer);
    let idle = tokio::time::sleep(TCP_IDLE_TIMEOUT);
    tokio::pin!(idle);
    // Polling `frames` also writes the responses queued on `response_stream`, so keep polling
    // until the client closes or idles out.
    loop {
        let frame = tokio::select! {
            _ = conn.stop.cancelled() => {
                debug!(%peer, "DNS over TCP: closed (idle longest, for a newcomer; or idle at shutdown)");
                return;
            }
            () = &mut idle => {
                let quiet = live.now_ms().saturating_sub(conn.last.load(std::sync::atomic::Ordering::Relaxed));
                // An answer still owed is waited on longer than a client's next query: a lossy
                // link backs its retransmissions off past 5 s (1, 2, 4 s...), and a node whose
                // zone-config fetch stalled that long was cut part way.
                let owed = conn.owed.load(std::sync::atomic::Ordering::Relaxed) > 0;
                let wait = if owed { TCP_OWED_TIMEOUT } else { TCP_IDLE_TIMEOUT };
                let limit = wait.as_millis() as u64;
                if quiet >= limit {
                    debug!(%peer, owed, "DNS over TCP: no query and nothing written for {} s, closing", wait.as_secs());
                    return;
                }
                idle.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(limit - quiet));
                continue;
            }
            f = frames.next() => match f {
                Some(f) => f,
                None => return,
            },
        };
        let frame = match frame {
            Ok(f) => f,
            Err(error) => {
                debug!(%peer, %error, "DNS over TCP: connection closed");
                return;
            }
        };
        conn.last
            .store(live.now_ms(), std::sync::atomic::Ordering::Relaxed);
        let message = match tcp_frame(frame.bytes()) {
            TcpFrame::Query(m) => m,
            TcpFrame::FormErr(answer, error) => {
                debug!(%peer, %error, "DNS over TCP: malformed query, FORMERR");
                handler.stats().answered(Transport::Tcp, 1);
                conn.owed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                use hickory_proto::xfer::DnsStreamHandle;
                let sent =
                    response_stream.send(hickory_proto::xfer::SerialMessage::new(answer, peer));
                if sent.is_err() {
                    return;
                }
                continue;
            }
            TcpFrame::Response => continue,
            TcpFrame::NotAQuery(error) => {
                debug!(%peer, %error, "DNS over TCP: not a query, closing");
                return;
            }
        };
        // Every query over TCP is answered (the handler drops none): owed until written.
        conn.owed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let request = Request::new(message, peer, Protocol::Tcp);
        let respond = ResponseHandle::new(peer, response_stream.clone(), Protocol::Tcp);
        let answered = handler.handle_request(&request, respond).await;
        handler
            .stats()
            .answered(Transport::Tcp, answered.response_code().into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    /// Records built anew are served as soon as they are told, not at the next poll (which
    /// the builder's own poll came before: a zone.json adopted was served up to two seconds
    /// later). The poll is an hour here: only being told can serve serial 2 in time.
    #[tokio::test]
    async fn new_records_are_served_when_told_not_at_the_next_poll() {
        use hickory_proto::op::{Message, Query};
        use hickory_proto::rr::{Name, RData, RecordType};
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let server = DnsServer::bind(any, any).await.unwrap();
        let addr = server.udp_addr();
        let records = |serial| {
            let (_, z) = crate::testzone::zone_with(serial, |_| {});
            Arc::new(ZoneRecords::new(&z).unwrap())
        };
        let first = records(1);
        let (tx, rx) = tokio::sync::watch::channel(first.clone());
        let changed = rx.clone();
        let stop = CancellationToken::new();
        let task = tokio::spawn(server.serve_records(
            first,
            move || rx.borrow().clone(),
            Some(changed),
            Duration::from_secs(3600),
            stop.clone(),
        ));
        let client = tokio::net::UdpSocket::bind(any).await.unwrap();
        client.connect(addr).await.unwrap();
        let serial = || async {
            let mut m = Message::new();
            m.set_id(7);
            m.add_query(Query::query(
                Name::from_ascii("alice.example.").unwrap(),
                RecordType::SOA,
            ));
            client.send(&m.to_vec().unwrap()).await.unwrap();
            let mut buf = [0u8; 2048];
            let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
                .await
                .ok()?
                .ok()?;
            let answer = Message::from_vec(&buf[..n]).ok()?;
            match answer.answers().first().map(|a| a.data()) {
                Some(RData::SOA(soa)) => Some(soa.serial()),
                _ => None,
            }
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while serial().await != Some(1) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "serial 1 never served"
            );
        }
        tx.send(records(2)).unwrap();
        while serial().await != Some(2) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "serial 2 not served when told"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    /// TCP is bound where UDP was, an IPv6 address's scope included (a link-local one needs
    /// it; it was dropped, and the bind failed).
    #[tokio::test]
    async fn tcp_is_bound_with_the_scope_udp_was_bound_with() {
        let asked = std::sync::Mutex::new(None);
        let at: SocketAddr = "[fe80::1%2]:53".parse().unwrap();
        let udp = |_| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
            s.set_nonblocking(true)?;
            UdpSocket::from_std(s)
        };
        let tcp = |a: SocketAddr| {
            *asked.lock().unwrap() = Some(a);
            Err::<TcpListener, _>(std::io::Error::other("not bound in this test"))
        };
        assert!(bind_pair(at, &udp, &tcp).is_err());
        let SocketAddr::V6(v6) = asked.lock().unwrap().expect("TCP bound") else {
            panic!("TCP asked for an IPv4 address");
        };
        assert_eq!((*v6.ip(), v6.scope_id()), ("fe80::1".parse().unwrap(), 2));
    }

    /// One IPv6 /48 holds 65,536 /64s: each /64 gets its share, the site together at most
    /// MAX_TCP_PER_SITE, and the slots come back as connections close.
    #[test]
    fn an_ipv6_site_holds_at_most_its_share_of_tcp_connections() {
        let table = ClientSlots::new(MAX_TCP_PER_CLIENT, MAX_TCP_PER_SITE);
        let addr = |site: u16, net: u16, host: u16| -> IpAddr {
            format!("2001:db8:{site:x}:{net:x}::{host:x}")
                .parse()
                .unwrap()
        };
        let mut held = Vec::new();
        for host in 0..MAX_TCP_PER_CLIENT as u16 {
            held.push(
                table
                    .take(addr(1, 0, host))
                    .expect("within the /64's share"),
            );
        }
        assert!(table.take(addr(1, 0, 999)).is_none(), "the /64 is full");
        let mut net = 1;
        while held.len() < MAX_TCP_PER_SITE {
            if let Some(slot) = table.take(addr(1, net, 1)) {
                held.push(slot);
            }
            net += 1;
        }
        assert!(table.take(addr(1, 0xffff, 1)).is_none(), "the /48 is full");
        assert!(table.take(addr(2, 0, 1)).is_some(), "another site");
        assert!(
            table.take("198.51.100.1".parse().unwrap()).is_some(),
            "IPv4"
        );
        // An IPv4 /24 is a site too.
        let mut v4 = Vec::new();
        for host in 1..=16u8 {
            for _ in 0..MAX_TCP_PER_CLIENT {
                if let Some(s) = table.take(IpAddr::from([203, 0, 113, host])) {
                    v4.push(s);
                }
            }
        }
        assert_eq!(v4.len(), MAX_TCP_PER_SITE, "the /24 together");
        assert!(
            table.take(IpAddr::from([203, 0, 114, 1])).is_some(),
            "another /24"
        );
        drop(v4);
        held.pop();
        assert!(table.take(addr(1, 0xffff, 1)).is_some(), "a slot came back");
        drop(held);
        assert!(table.tracked() == 0, "closed connections are forgotten");
    }

    #[test]
    fn privileged_port_error_says_what_to_do() {
        let e = bind_error(
            "UDP",
            "0.0.0.0:53".parse().unwrap(),
            std::io::ErrorKind::PermissionDenied.into(),
        )
        .to_string();
        assert!(
            e.contains("port 53 needs root or CAP_NET_BIND_SERVICE"),
            "{e}"
        );
        assert!(
            e.contains(r#"dns = "127.0.0.1:5353" or dns = "off" in gateway.toml"#),
            "{e}"
        );
    }

    #[tokio::test]
    async fn port_in_use_error_names_the_culprit() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let e = DnsServer::bind("127.0.0.1:0".parse().unwrap(), addr)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("TCP {addr}")), "{e}");
        assert!(e.contains("another DNS server"), "{e}");
    }
}
