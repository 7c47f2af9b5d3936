//! Public TCP and UDP listeners, one per `tcp`/`udp` app of the live policy. On every policy
//! change the set is reconciled: new addresses get a listener, removed ones lose it, and
//! addresses the policy still names keep theirs (and their connections) — even when the app
//! that names it was renamed or swapped ports with another, since a listener finds its app by
//! its address for every new connection. A bind that fails is retried at every poll until it
//! works or the policy stops asking for it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use policies::accounting::Refusal;
use policies::{ListenKind, Listener, Requester, Timestamp};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use tunnel::hub::{refusal_of, Hub};
use tunnel::log_budget::LogBudget;
use tunnel::proto::Origin;
use tunnel::splice::splice_until;

use crate::addr_text::Client;
use crate::make_room::{Held, Stamped};
use crate::per_ip::{Full, IpSlot, PerIp};
pub use crate::udp_app::UdpLimits;

/// Default of the flows (distinct public clients) one `udp` app keeps at once (gateway.toml
/// `udp_flows_per_app`), and its most: the flows one device connection takes
/// ([`tunnel::proto::limits::MAX_UDP_FLOWS`]). A full table ends flows the device never
/// answered to make room ([`crate::udp_app`]); beyond, new clients are dropped.
pub const MAX_UDP_CLIENTS: usize = tunnel::proto::limits::MAX_UDP_FLOWS;
/// Default of the flows of one `udp` app from one client address (IPv6: its /64; gateway.toml
/// `udp_flows_per_ip`): a sixteenth of [`MAX_UDP_CLIENTS`], so one host sending from thousands
/// of source ports cannot take every slot and have everyone else dropped.
pub const UDP_FLOWS_PER_IP: usize = MAX_UDP_CLIENTS / 16;
/// Default of the open connections one client address (IPv6: its /64) may have through all
/// `tcp` apps together (gateway.toml `tcp_connections_per_ip`), as the HTTP front's default:
/// every connection is a tunnel stream to a device, and one client holding thousands of idle
/// ones would leave none for anyone else.
pub const TCP_CONNECTIONS_PER_IP: usize = 1_024;
/// Open connections of all clients through all `tcp` apps together, as the HTTP front's
/// [`crate::http::MAX_CONNECTIONS`]: each is a tunnel stream to a device, and a device takes
/// [`tunnel::transport::MAX_STREAMS_TO_AGENT`] (32,768) at once; without a total, 32 addresses
/// holding idle connections took them all, and the device's HTTP and mesh streams waited.
pub const MAX_TCP_CONNECTIONS: usize = 16_384;
/// How long a new bind waits for a listener it replaces to let go of the address (a `[::]`
/// listener replacing `0.0.0.0` on the same port, a UDP socket whose flows are ending).
const REBIND_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Tcp,
    Udp,
}

impl Kind {
    /// "TCP" or "UDP", as messages say it.
    fn name(self) -> &'static str {
        match self {
            Kind::Tcp => "TCP",
            Kind::Udp => "UDP",
        }
    }

    fn listen_kind(self) -> ListenKind {
        match self {
            Kind::Tcp => ListenKind::Tcp,
            Kind::Udp => ListenKind::Udp,
        }
    }
}

#[derive(Debug)]
struct Running {
    /// The app naming this address when last reconciled (for `bound` and logs only).
    app: String,
    stop: CancellationToken,
    bound: SocketAddr,
    task: JoinHandle<()>,
}

/// The running listeners, by (kind, address).
#[derive(Debug)]
pub struct Listeners {
    running: HashMap<(Kind, SocketAddr), Running>,
    /// Open connections per client address through every `tcp` app together.
    tcp_per_ip: Arc<PerIp>,
    /// Flows of one `udp` app, per client address and in all.
    udp: UdpLimits,
    /// Binds that failed, with their error: retried at every [`Listeners::reconcile`], and
    /// reported again only when the error changes.
    failed: HashMap<(Kind, SocketAddr), String>,
    /// Why a listener's loop last ended by itself, by address: the same reason (a panic
    /// that comes back at every bind) is told once.
    ended: HashMap<(Kind, SocketAddr), String>,
    /// The gateway's own sockets (kind, address, the gateway.toml key that sets it): an app
    /// asking for one of them gets a message naming it instead of "address in use".
    reserved: Vec<(Kind, SocketAddr, String)>,
    /// The current failures, as `/status` shows them.
    published: Arc<std::sync::Mutex<Vec<String>>>,
    /// The addresses listened on now, for [`Listeners::reload_check`].
    listening: Arc<std::sync::Mutex<Vec<(Kind, SocketAddr)>>>,
}

/// What a policy wants: (kind, address) → app name.
pub fn wanted(policy: &policies::CompiledPolicy) -> HashMap<(Kind, SocketAddr), String> {
    policy
        .apps()
        .iter()
        .filter_map(|a| match a.listener {
            Listener::Tcp(addr) => Some(((Kind::Tcp, addr), a.name.clone())),
            Listener::Udp(addr) => Some(((Kind::Udp, addr), a.name.clone())),
            _ => None,
        })
        .collect()
}

impl Listeners {
    /// No listeners yet; `reserved` are the gateway's own sockets (see [`Listeners::reserved`]);
    /// one client address may hold `tcp_per_ip` connections through the `tcp` apps, all
    /// clients together `tcp_total` (at most [`MAX_TCP_CONNECTIONS`]); each `udp` app keeps
    /// flows within `udp`.
    pub fn new(
        reserved: Vec<(Kind, SocketAddr, String)>,
        tcp_per_ip: usize,
        tcp_total: usize,
        udp: UdpLimits,
    ) -> Self {
        Listeners {
            running: HashMap::new(),
            tcp_per_ip: PerIp::making_room(
                tcp_per_ip,
                tcp_total.min(MAX_TCP_CONNECTIONS),
                "public TCP connections",
                "tcp_connections_per_ip",
            ),
            udp,
            failed: HashMap::new(),
            ended: HashMap::new(),
            reserved,
            published: Arc::default(),
            listening: Arc::default(),
        }
    }

    /// What a reloaded policy must pass before it serves: each `tcp`/`udp` address it brings
    /// (one the serving policy does not have) is not one of the gateway's own sockets and can
    /// be bound now (tried, then let go). Otherwise the reload is refused and the old policy
    /// keeps serving: its listeners were stopped first, and the app stayed down while the
    /// bind failed. An address overlapping one listened on now (`0.0.0.0:P` becoming
    /// `[::]:P`) is freed only by the swap: only its address is tried (on another port), and
    /// another program's socket on its port that it overlaps is looked for
    /// ([`crate::port_holders`]). Addresses the serving policy has are
    /// not tried either (one failing now, retried every poll, must not hold up every edit).
    pub fn reload_check(&self) -> policies::ReloadCheck {
        let listening = self.listening.clone();
        let reserved = self.reserved.clone();
        policies::ReloadCheck(Arc::new(move |policy, serving| {
            let now = listening.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let had = wanted(serving);
            let mut errors = Vec::new();
            // Only an address another program holds now may be free later: an app on the
            // gateway's own socket, or on an address this machine does not have, never passes.
            let mut may_pass_later = true;
            for (key, app) in wanted(policy) {
                if now.contains(&key) || had.contains_key(&key) {
                    continue;
                }
                let about = |message| policies::CheckError {
                    app: Some(app.clone()),
                    message,
                };
                if let Some(own) = own_socket(&reserved, key) {
                    errors.push(about(listen_error(&app, key, &own, "")));
                    may_pass_later = false;
                    continue;
                }
                let replaces = now
                    .iter()
                    .any(|(k, a)| *k == key.0 && policies::units::listens_overlap(*a, key.1));
                // Freed only by the swap, its port cannot be tried; its address can, on any
                // port: a mistyped IP, or IPv6 where the machine has none, took the app down
                // after the swap, the edit already serving.
                let mut probe = key.1;
                if replaces {
                    // set_port keeps an IPv6 scope id (`[fe80::1%2]`), which new() would drop.
                    probe.set_port(0);
                }
                let tried = match key.0 {
                    Kind::Tcp => tunnel::sockets::tcp_bound(probe).map(drop),
                    Kind::Udp => tunnel::sockets::std_udp(probe).map(drop),
                };
                // Nor can its port while ours holds it: another program's socket on it (on
                // `127.0.0.1:P`, which a wildcard overlaps) is looked for instead. Found only
                // after the swap, the app was down under an edit already serving.
                let tried = tried.and_then(|()| {
                    let beside: Vec<SocketAddr> = now
                        .iter()
                        .filter(|(k, a)| *k == key.0 && a.port() == key.1.port())
                        .map(|(_, a)| *a)
                        .collect();
                    match replaces
                        .then(|| crate::port_holders::foreign_clash(key.0, key.1, &beside))
                    {
                        Some(Some(other)) => Err(std::io::Error::new(
                            std::io::ErrorKind::AddrInUse,
                            format!(
                                "another program on this machine holds {other}, which it overlaps"
                            ),
                        )),
                        _ => Ok(()),
                    }
                });
                if let Err(e) = tried {
                    let hint = crate::run::bind_hint(&e, key.1, "give the app another address");
                    errors.push(about(listen_error(&app, key, &e, &hint)));
                    may_pass_later &= e.kind() == std::io::ErrorKind::AddrInUse;
                }
            }
            if errors.is_empty() {
                Ok(())
            } else {
                Err(policies::CheckRefusal {
                    errors,
                    may_pass_later,
                })
            }
        }))
    }

    /// The binds that are failing now (retried at every poll), for `/status`.
    pub fn failures(&self) -> Arc<std::sync::Mutex<Vec<String>>> {
        self.published.clone()
    }

    /// Brings the running set to what the policy wants. Returns bind errors (as text) not
    /// reported before, which the caller logs (at start-up too: the rest of the gateway
    /// serves, and failed binds show in `/status` until they pass). Listeners that stop are waited for before new ones bind, so an address they
    /// held (or overlap, like `0.0.0.0:P` and `[::]:P`) is free again.
    pub async fn reconcile(&mut self, hub: &Hub, shutdown: &CancellationToken) -> Vec<String> {
        let want = wanted(&hub.policy().current().policy);
        // A listener whose loop ended by itself (a panic: it only ends when stopped) held its
        // key with no socket behind it, never bound again: bound again below.
        let ended: Vec<_> = self
            .running
            .iter()
            .filter(|(_, r)| r.task.is_finished())
            .map(|(k, _)| *k)
            .collect();
        for key in ended {
            if let Some(r) = self.running.remove(&key) {
                // The panic's own message: the JoinError's text names the task, another at
                // every bind, and the same panic would read as a new reason each time.
                let why = match r.task.await {
                    Err(e) if e.is_panic() => {
                        let p = e.into_panic();
                        let msg = p
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| p.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "(not a text)".into());
                        format!("it panicked: {msg}")
                    }
                    Err(e) => e.to_string(),
                    Ok(()) => "its loop returned".into(),
                };
                if !want.contains_key(&key) {
                    continue;
                }
                if self.ended.get(&key) != Some(&why) {
                    error!(app = %r.app, addr = %key.1, reason = %why, "listener stopped by itself: binding it again");
                    self.ended.insert(key, why);
                }
            }
        }
        let gone: Vec<_> = self
            .running
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        let mut stopped = Vec::new();
        let mut stopped_keys = Vec::new();
        for key in gone {
            if let Some(r) = self.running.remove(&key) {
                r.stop.cancel();
                info!(app = %r.app, addr = %key.1, "listener stopped");
                stopped.push(r.task);
                stopped_keys.push(key);
            }
        }
        // Only a bind that replaces a listener stopped just now (its address, or one
        // overlapping it) waits for its address; others, and a port another program holds,
        // fail at once and do not hold up the pass.
        let replaces = |key: &(Kind, SocketAddr)| {
            stopped_keys
                .iter()
                .any(|k| k.0 == key.0 && policies::units::listens_overlap(k.1, key.1))
        };
        for t in stopped {
            let _ = t.await;
        }
        for (key, r) in self.running.iter_mut() {
            if let Some(app) = want.get(key).filter(|a| **a != r.app) {
                info!(app = %app, previous = %r.app, addr = %key.1, "listener now serves a renamed app");
                r.app = app.clone();
            }
        }
        self.failed.retain(|key, _| want.contains_key(key));
        self.ended.retain(|key, _| want.contains_key(key));
        let mut errors = Vec::new();
        for (key, app) in want {
            if self.running.contains_key(&key) {
                continue;
            }
            let own = own_socket(&self.reserved, key);
            let is_own = own.is_some();
            let r = match own {
                Some(e) => Err(e),
                None => {
                    let replacing = replaces(&key);
                    bind(hub, key, &self.tcp_per_ip, self.udp, shutdown, replacing).await
                }
            };
            match r {
                Ok((bound, stop, task)) => {
                    info!(app = %app, kind = ?key.0, addr = %bound, "listener started");
                    self.failed.remove(&key);
                    self.running.insert(
                        key,
                        Running {
                            app,
                            stop,
                            bound,
                            task,
                        },
                    );
                }
                Err(e) => {
                    // The gateway's own sockets' error says what to do already.
                    let hint = if is_own {
                        String::new()
                    } else {
                        crate::run::bind_hint(&e, key.1, "give the app another address")
                    };
                    let msg = listen_error(&app, key, &e, &hint);
                    if self.failed.get(&key) != Some(&msg) {
                        errors.push(msg.clone());
                    }
                    self.failed.insert(key, msg);
                }
            }
        }
        let mut now: Vec<String> = self.failed.values().cloned().collect();
        now.sort();
        *self.published.lock().unwrap_or_else(|p| p.into_inner()) = now;
        *self.listening.lock().unwrap_or_else(|p| p.into_inner()) =
            self.running.keys().copied().collect();
        errors
    }

    /// The messages for `policy`'s apps that ask for one of the gateway's own sockets.
    pub fn own_clashes(&self, policy: &policies::CompiledPolicy) -> Vec<String> {
        clashes_with(&self.reserved, policy)
    }

    /// Binds that failed and are retried at the next reconcile.
    pub fn has_failures(&self) -> bool {
        !self.failed.is_empty() || self.running.values().any(|r| r.task.is_finished())
    }

    /// Bound addresses by app name (for tests and status).
    pub fn bound(&self) -> HashMap<String, SocketAddr> {
        self.running
            .values()
            .map(|r| (r.app.clone(), r.bound))
            .collect()
    }
}

/// The error for an app asking for one of the gateway's own sockets (`reserved`), if `key`
/// overlaps one: it says what to do.
fn own_socket<S: AsRef<str>>(
    reserved: &[(Kind, SocketAddr, S)],
    key: (Kind, SocketAddr),
) -> Option<std::io::Error> {
    let (_, addr, setting) = reserved
        .iter()
        .find(|(k, a, _)| *k == key.0 && policies::units::listens_overlap(*a, key.1))?;
    Some(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!(
            "the gateway's own `{}` ({addr}, gateway.toml) uses that port: give the app another one",
            setting.as_ref()
        ),
    ))
}

/// The pairs of `own` (kind, address, setting) that take the same port (equal addresses, or
/// one a wildcard of the other's), each said with both settings and the `file` to change.
/// Port 0 (any free port) clashes with nothing. A gateway's own sockets; a node's too.
pub fn clashes_among(own: &[(Kind, SocketAddr, String)], file: &str) -> Vec<String> {
    let mut clashes = Vec::new();
    for (i, (kind, a, key)) in own.iter().enumerate() {
        for (other_kind, b, other) in &own[i + 1..] {
            if kind == other_kind && a.port() != 0 && policies::units::listens_overlap(*a, *b) {
                let proto = kind.name();
                clashes.push(format!(
                    "`{key}` ({a}) and `{other}` ({b}) both take {proto} port {}: give one of them another address in {file}",
                    a.port()
                ));
            }
        }
    }
    clashes
}

/// The messages for `services` (those at this machine's addresses, [`crate::run::services_here`])
/// on one of the process's own sockets `own`: a connection to such a service reaches the
/// process itself. A `[[forward]]` there took a public app's requests for the service on to
/// another device as this one, past the mesh policy and the per-client limits; the admin API
/// there answered a raw `tcp` app with its `/status`. (Services among themselves are not
/// compared: two names for one address are fine.)
pub fn services_on_own(
    own: &[(Kind, SocketAddr, String)],
    services: &[(Kind, SocketAddr, String)],
    file: &str,
) -> Vec<String> {
    let mut clashes = Vec::new();
    for (kind, at, service) in services {
        for (own_kind, mine, key) in own {
            if kind == own_kind && mine.port() != 0 && policies::units::listens_overlap(*at, *mine)
            {
                let proto = kind.name();
                clashes.push(format!(
                    "`{service}` ({at}) is this process's own `{key}` socket ({mine}, {proto}): connections to the service would reach this process itself; give the service its own address, or `{key}` another one, in {file}"
                ));
            }
        }
    }
    clashes
}

/// The messages for `policy`'s apps that ask for an address of `own` (the gateway's sockets:
/// as bound, or as gateway.toml sets them before anything is bound).
pub fn clashes_with<S: AsRef<str>>(
    own: &[(Kind, SocketAddr, S)],
    policy: &policies::CompiledPolicy,
) -> Vec<String> {
    // Where the app is written first, as a running gateway's reload says it (`policy check`
    // and a refused start named only the app).
    let mut clashes: Vec<String> = wanted(policy)
        .into_iter()
        .filter_map(|(key, app)| {
            let e = own_socket(own, key)?;
            let message = listen_error(&app, key, &e, "");
            Some(match policy.app(&app) {
                Some(a) => format!("{}: {message}", a.source),
                None => message,
            })
        })
        .collect();
    clashes.sort();
    clashes
}

/// The message for an app that cannot listen on `key`.
fn listen_error(app: &str, key: (Kind, SocketAddr), e: &std::io::Error, hint: &str) -> String {
    format!(
        "app {app}: cannot listen on {} {}: {e}{hint}",
        key.0.name(),
        key.1
    )
}

/// Binds `key` and starts its loop; when `replacing` a listener that just stopped, retries an
/// address still in use for up to [`REBIND_WAIT`] (it may still be letting go of it). A port
/// another program holds is tried once per reconcile, i.e. per poll.
async fn bind(
    hub: &Hub,
    key: (Kind, SocketAddr),
    tcp_per_ip: &Arc<PerIp>,
    udp: UdpLimits,
    shutdown: &CancellationToken,
    replacing: bool,
) -> std::io::Result<(SocketAddr, CancellationToken, JoinHandle<()>)> {
    let deadline = Instant::now()
        + if replacing {
            REBIND_WAIT
        } else {
            Duration::ZERO
        };
    loop {
        let stop = shutdown.child_token();
        let r = match key.0 {
            Kind::Tcp => tunnel::sockets::tcp(key.1).map(|l| {
                tunnel::sockets::keepalive_accepted(&l, hub.tuning().tcp_keepalive);
                tunnel::sockets::bound_unsent_accepted(&l);
                let bound = l.local_addr().unwrap_or(key.1);
                let task = tokio::spawn(tcp_loop(
                    hub.clone(),
                    key.1,
                    l,
                    tcp_per_ip.clone(),
                    stop.clone(),
                ));
                (bound, stop, task)
            }),
            Kind::Udp => tunnel::sockets::udp(key.1).map(|s| {
                let bound = s.local_addr().unwrap_or(key.1);
                let task = tokio::spawn(crate::udp_app::run(
                    hub.clone(),
                    key.1,
                    Arc::new(tunnel::sockets::ReplySocket::new(s)),
                    udp,
                    (stop.clone(), shutdown.clone()),
                ));
                (bound, stop, task)
            }),
        };
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            r => return r,
        }
    }
}

/// The app that configured exactly `listen` in the live policy, with the policy.
pub(crate) fn app_at(
    hub: &Hub,
    kind: Kind,
    listen: SocketAddr,
) -> Option<(Arc<policies::Active>, usize)> {
    let active = hub.policy().current();
    let i = app_listening(&active, kind, listen)?.index;
    Some((active, i))
}

/// The app of `active`'s policy that configured exactly `listen`.
fn app_listening(
    active: &policies::Active,
    kind: Kind,
    listen: SocketAddr,
) -> Option<&policies::App> {
    active
        .policy
        .app_by_listen(kind.listen_kind(), listen)
        .filter(|a| match a.listener {
            Listener::Tcp(a) | Listener::Udp(a) => a == listen,
            _ => false,
        })
}

/// Whether the app on `listen` still leads to `target` and still allows `who`: asked again
/// of connections and flows decided when they opened (under app `opened_by`), each time the
/// policy or the minute changes ([`policies::PolicyStore::until_refused`]). `Err` says why
/// not, for the log.
///
/// When the app now on `listen` leads elsewhere, or no app is there any more, the
/// connection's own app decides if it still leads to `target` from another address of the
/// same kind: two apps that swap ports keep their listeners (see the module doc), and each
/// one's connections stay under its rules instead of being cut for the other's target; an
/// app moved to another port or address keeps its open connections — if its new address
/// still takes connections to `reached`, the local address the client reached (`0.0.0.0` to
/// `127.0.0.1` is an edit withdrawing public access, whose sessions then end).
pub(crate) fn still_allowed(
    active: &policies::Active,
    kind: Kind,
    listen: SocketAddr,
    reached: std::net::IpAddr,
    opened_by: &str,
    target: &policies::Target,
    who: &Requester<'_>,
) -> Result<(), String> {
    let here = app_listening(active, kind, listen);
    let own = || {
        active.policy.app(opened_by).filter(|own| {
            own.target == *target
                && matches!(
                    (kind, &own.listener),
                    (Kind::Tcp, Listener::Tcp(_)) | (Kind::Udp, Listener::Udp(_))
                )
        })
    };
    // The app moved to another port or address (`:2222` to `:2200`, `0.0.0.0:P` to `[::]:P`,
    // or swapped ports with another app): its connections go on under its rules; they were
    // cut, every SSH session with them. Not when the new address would not take them
    // (narrowed to loopback or a private address: an edit withdrawing public access) —
    // whether or not another app took the old address meanwhile.
    let moved = || {
        own().filter(|a| match a.listener {
            Listener::Tcp(at) | Listener::Udp(at) => takes(at.ip(), reached),
            _ => false,
        })
    };
    let app = match here {
        Some(a) if a.target != *target => moved().or(here),
        None => moved(),
        _ => here,
    };
    active.decide_again(app, target, who, None, None)
}

/// Whether a socket bound to `bound` takes what is sent to `reached`: `[::]` every address
/// (IPv4 too, dual-stack as the gateway binds it), `0.0.0.0` every IPv4 one, else only its
/// own.
fn takes(bound: std::net::IpAddr, reached: std::net::IpAddr) -> bool {
    let reached = reached.to_canonical();
    if bound.is_unspecified() {
        return bound.is_ipv6() || reached.is_ipv4();
    }
    bound.to_canonical() == reached
}

async fn tcp_loop(
    hub: Hub,
    listen: SocketAddr,
    l: TcpListener,
    per_ip: Arc<PerIp>,
    stop: CancellationToken,
) {
    // Refusals are one line each, and a client in a retry loop (or a flood) would write one
    // per connection: as many a second of each kind as UDP apps allow theirs.
    let lines = Arc::new(TcpLines::default());
    while let Some((tcp, peer)) = tunnel::sockets::accept_until(&l, &stop).await {
        if hub.is_draining() {
            return;
        }
        // Dual-stack `[::]` listeners see IPv4 clients as `::ffff:a.b.c.d`.
        let peer = tunnel::sockets::canonical(peer);
        // Closed at once (the first refusal of a run is logged by `per_ip`), counted as the
        // app's connection-limit refusal: past its address's limit. At the total of all,
        // decided first: only a connection that would be served may make room.
        let slot = match per_ip.try_admit(peer.ip()) {
            Ok(slot) => Some(slot),
            Err(Full::Total) => None,
            Err(Full::Client) => {
                if let Some((active, i)) = app_at(&hub, Kind::Tcp, listen) {
                    let app = &active.policy.apps()[i];
                    active.state(app).counters.refused(Refusal::ConnectionLimit);
                }
                continue;
            }
        };
        let (hub2, per_ip, lines) = (hub.clone(), per_ip.clone(), lines.clone());
        hub.work()
            .spawn(async move { tcp_conn(hub2, listen, tcp, peer, slot, per_ip, &lines).await });
    }
}

/// A tcp listener's log budgets, one per kind of line, so that each line's `unlogged` counts
/// the events of its own kind (one budget for all put a client's rate-limit refusals on
/// another client's connection-limit line).
struct TcpLines {
    /// Refused by the policy, or no app listens there any more.
    policy: std::sync::Mutex<LogBudget>,
    /// Refused by the app's rate limit.
    rate: std::sync::Mutex<LogBudget>,
    /// Refused by a connection limit (the app's, or all tcp apps' together).
    limit: std::sync::Mutex<LogBudget>,
    /// Let in, but the device's service could not be reached.
    failed: std::sync::Mutex<LogBudget>,
}

impl Default for TcpLines {
    fn default() -> Self {
        let budget = || std::sync::Mutex::new(LogBudget::new(crate::udp_app::LINES_PER_SECOND));
        TcpLines {
            policy: budget(),
            rate: budget(),
            limit: budget(),
            failed: budget(),
        }
    }
}

/// One public connection to a `tcp` app; `slot` counts it against its client's limit until
/// it ends, and ends it when all `tcp` apps together are full and it is picked to make room.
/// No `slot`: all tcp apps together were full as it came; once the policy, the rate limit and
/// the app's connection limits let it in, room is made for it if that is fair
/// ([`PerIp::admit_making_room`]), else it is refused.
async fn tcp_conn(
    hub: Hub,
    listen: SocketAddr,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    slot: Option<IpSlot>,
    per_ip: Arc<PerIp>,
    lines: &TcpLines,
) {
    let _ = tcp.set_nodelay(true);
    // The address the client reached: the listen address, or on a wildcard one of the
    // machine's (asked of the socket only then).
    let reached = match listen.ip().is_unspecified() {
        true => tcp.local_addr().map_or(listen.ip(), |a| a.ip()),
        false => listen.ip(),
    };
    let started = Instant::now();
    // The listener is being replaced or removed: the policy no longer names its address.
    let Some((active, i)) = app_at(&hub, Kind::Tcp, listen) else {
        if let Some(unlogged) = LogBudget::take_shared(&lines.policy) {
            info!(listen = %listen, client = %Client(peer), unlogged, "connection refused: no app listens here any more (a policy edit)");
        }
        return;
    };
    let app = &active.policy.apps()[i];
    // The address the client reached (on a wildcard listen, the machine's own), for a PROXY
    // header: asked only for apps that send one (a system call per connection).
    let local = app
        .proxy_protocol
        .then(|| tcp.local_addr().unwrap_or(listen));
    let app_name = app.name.clone();
    let state = active.state(app);
    let who = Requester::Public { ip: peer.ip() };
    let decision = active
        .policy
        .decide(app, &who, None, None, Timestamp::now());
    if let policies::Decision::Deny { reason } = decision {
        state.counters.refused(Refusal::Denied(reason));
        if let Some(unlogged) = LogBudget::take_shared(&lines.policy) {
            info!(app = %app_name, client = %Client(peer), reason = %reason, unlogged, "connection refused by policy");
        }
        return;
    }
    let Ok(rate) = state.limits.take_rate(&who) else {
        state.counters.refused(Refusal::RateLimited);
        if let Some(unlogged) = LogBudget::take_shared(&lines.rate) {
            info!(app = %app_name, client = %Client(peer), unlogged, "connection refused: rate limit");
        }
        return;
    };
    // A connection the connection limits refuse gives its token of the rate back: it spent
    // it (a client at its `max_connections_per_client`, retrying, was then refused by the
    // rate too once its connection closed).
    let guard = match state.limits.connect(&who) {
        Ok(g) => g,
        Err(e) => {
            rate.give_back();
            state.counters.refused(Refusal::ConnectionLimit);
            if let Some(unlogged) = LogBudget::take_shared(&lines.limit) {
                info!(app = %app_name, client = %Client(peer), reason = %e, unlogged, "connection refused: connection limit");
            }
            return;
        }
    };
    let target = app.target.clone();
    let slot = match slot {
        Some(s) => s,
        // Nothing is taken from others for a connection that would not be served: the device
        // is not there, or does not offer the service (a typo in `to`, a service removed).
        None if !hub.offers_tcp(&target.device, &target.service) => {
            rate.give_back();
            state.counters.refused(Refusal::ConnectionLimit);
            if let Some(unlogged) = LogBudget::take_shared(&lines.limit) {
                info!(app = %app_name, device = %target.device, service = %target.service, client = %Client(peer), unlogged, "connection refused: all tcp apps together at their limit (gateway.toml tcp_connections), and the device is offline or does not offer this tcp service");
            }
            return;
        }
        None => match per_ip.admit_making_room(peer.ip()) {
            Some(s) => s,
            None => {
                rate.give_back();
                state.counters.refused(Refusal::ConnectionLimit);
                if let Some(unlogged) = LogBudget::take_shared(&lines.limit) {
                    info!(app = %app_name, client = %Client(peer), unlogged, "connection refused: all tcp apps together at their limit (gateway.toml tcp_connections), and no room could fairly be made (no client holds two more than this one, or connections picked before have not closed yet)");
                }
                return;
            }
        },
    };
    // The tcp apps' table always makes room (`Listeners::new`); a stand-in is never evicted.
    let held = slot.held().cloned().unwrap_or_else(Held::new);
    // The slot goes with the socket: one that lingers after the copy still counts.
    let lingering =
        tunnel::linger::Lingering::new(tcp, Some(Box::new(slot)), Some(held.eviction_token()));
    let mut tcp = Stamped::new(lingering, held.clone());
    let counters = state.counters.clone();
    let (shape_in, shape_out) = state.limits.shapers();
    let proxy_header = local.map(|local| crate::proxy_header::encode(peer, local));
    drop(active);
    counters.connection();
    // Early: the client's first bytes go with the stream header, no tunnel round trip first.
    let mut up = match hub
        .connect_early(
            &target.device,
            &target.service,
            &app_name,
            Origin::Public(peer),
        )
        .await
    {
        Ok(u) => u,
        Err(e) => {
            counters.failed(tunnel::hub::failure_of(&e));
            let (_, reason) = refusal_of(&e);
            if let Some(unlogged) = LogBudget::take_shared(&lines.failed) {
                info!(app = %app_name, device = %target.device, client = %Client(peer), reason = %reason, unlogged, "connection failed");
            }
            return;
        }
    };
    // Ahead of the client's bytes, with the stream's header (early open): not counted as the
    // client's.
    if let Some(h) = proxy_header {
        if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut up, &h).await {
            if let Some(unlogged) = LogBudget::take_shared(&lines.failed) {
                info!(app = %app_name, device = %target.device, client = %Client(peer), error = %e, unlogged, "connection failed: the PROXY header could not be sent");
            }
            return;
        }
    }
    // Decided once as it opened; asked again whenever the policy or the minute changes.
    let policy = hub.policy().clone();
    let refused = policy
        .until_refused(|a| still_allowed(a, Kind::Tcp, listen, reached, &app_name, &target, &who));
    let stop = async {
        tokio::select! {
            why = refused => format!("the policy no longer allows it ({why})"),
            () = held.evicted() => "evicted to make room for another client".to_owned(),
            () = hub.grace_over().cancelled() => tunnel::hub::GRACE_CUT.to_owned(),
        }
    };
    let acked = up.acked();
    let m = {
        // Its counts are settled as the ends are dropped, at the end of this block.
        let (mut client, mut tunnel) = tunnel::splice::counted(&mut tcp, &mut up, &counters);
        if shape_in.is_unlimited() && shape_out.is_unlimited() {
            splice_until(&mut client, &mut tunnel, stop).await
        } else {
            tunnel::splice::splice_shaped_until(client, &mut tunnel, &shape_in, &shape_out, stop)
                .await
        }
    };
    let (bin, bout) = (m.a_to_b, m.b_to_a);
    if held.is_evicted() && m.stopped.is_some() {
        info!(app = %app_name, device = %target.device, client = %Client(peer), bytes_in = bin, bytes_out = bout, ms = started.elapsed().as_millis() as u64, idle_s = held.idle_secs(), "connection cut to make room: all tcp apps together were at their limit (gateway.toml tcp_connections) and this client held the most connections; this one was its longest idle");
        return;
    }
    if let Some(why) = m.stopped {
        info!(app = %app_name, device = %target.device, client = %Client(peer), bytes_in = bin, bytes_out = bout, ms = started.elapsed().as_millis() as u64, reason = %why, "connection cut");
        return;
    }
    if let Some(refused) = up.refused() {
        let refused = refused.open_error(&target.device);
        counters.failed(tunnel::hub::failure_of(&refused));
        let (_, reason) = refusal_of(&refused);
        // A client retrying against a service that is down: one per connection.
        if let Some(unlogged) = LogBudget::take_shared(&lines.failed) {
            info!(app = %app_name, device = %target.device, client = %Client(peer), reason = %reason, unlogged, "connection failed");
        }
        return;
    }
    info!(app = %app_name, device = %target.device, client = %Client(peer), bytes_in = bin, bytes_out = bout, ms = started.elapsed().as_millis() as u64, end = %m.end(), "connection done");
    // The client's connection, its slot and its count against the app's connection limits
    // go first; the task stays until the device has the upload's tail, or a drain closing
    // the tunnel right after would lose it.
    drop(tcp);
    drop(guard);
    if let (Some(acked), true) = (acked, m.is_clean()) {
        tunnel::stream::until_acked(acked, tunnel::stream::ACK_WAIT).await;
    }
}
