//! Public TCP and UDP listeners, one per `tcp`/`udp` app of the live policy. On every policy
//! change the set is reconciled: new apps get a listener, removed ones lose it, and apps whose
//! address did not change keep theirs (and their connections).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use policies::accounting::Refusal;
use policies::{Listener, Requester, Timestamp};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tunnel::hub::{refusal_of, Hub};
use tunnel::proto::Origin;
use tunnel::splice::splice;

use crate::addr_text::Client;

/// A UDP flow with no datagram either way for this long is forgotten.
const UDP_IDLE: Duration = Duration::from_secs(120);
/// Distinct public clients of one UDP app tracked at once; beyond, new clients are dropped
/// (bounded memory under a spoofed-source flood).
const MAX_UDP_CLIENTS: usize = 4096;
const UDP_READ: usize = 65_535;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Tcp,
    Udp,
}

/// The running listeners, by (kind, address).
#[derive(Debug, Default)]
pub struct Listeners {
    running: HashMap<(Kind, SocketAddr), (String, CancellationToken, SocketAddr)>,
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
    /// Brings the running set to what the policy wants. Returns bind errors (as text); at
    /// start-up the caller treats them as fatal, on reload they are logged.
    pub async fn reconcile(&mut self, hub: &Hub, shutdown: &CancellationToken) -> Vec<String> {
        let want = wanted(&hub.policy().current().policy);
        self.running.retain(|key, (app, tok, _)| {
            let keep = want.get(key) == Some(app);
            if !keep {
                tok.cancel();
                info!(app = %app, addr = %key.1, "listener stopped");
            }
            keep
        });
        let mut errors = Vec::new();
        for (key, app) in want {
            if self.running.contains_key(&key) {
                continue;
            }
            let tok = shutdown.child_token();
            let r = match key.0 {
                Kind::Tcp => TcpListener::bind(key.1).await.map(|l| {
                    let bound = l.local_addr().unwrap_or(key.1);
                    tokio::spawn(tcp_loop(hub.clone(), app.clone(), l, tok.clone()));
                    bound
                }),
                Kind::Udp => UdpSocket::bind(key.1).await.map(|s| {
                    let bound = s.local_addr().unwrap_or(key.1);
                    tokio::spawn(udp_loop(hub.clone(), app.clone(), Arc::new(s), tok.clone()));
                    bound
                }),
            };
            match r {
                Ok(bound) => {
                    info!(app = %app, kind = ?key.0, addr = %bound, "listener started");
                    self.running.insert(key, (app, tok, bound));
                }
                Err(e) => errors.push(format!(
                    "app {app}: cannot listen on {:?} {}: {e}",
                    key.0, key.1
                )),
            }
        }
        errors
    }

    /// Bound addresses by app name (for tests and status).
    pub fn bound(&self) -> HashMap<String, SocketAddr> {
        self.running
            .values()
            .map(|(a, _, b)| (a.clone(), *b))
            .collect()
    }
}

async fn tcp_loop(hub: Hub, app: String, l: TcpListener, stop: CancellationToken) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = l.accept() => match r {
                Ok(x) => x,
                Err(e) => { warn!(app = %app, error = %e, "accept failed"); tokio::time::sleep(Duration::from_millis(50)).await; continue; }
            },
        };
        if hub.is_draining() {
            return;
        }
        // Dual-stack `[::]` listeners see IPv4 clients as `::ffff:a.b.c.d`.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let hub2 = hub.clone();
        let app = app.clone();
        hub.work()
            .spawn(async move { tcp_conn(hub2, app, tcp, peer).await });
    }
}

async fn tcp_conn(hub: Hub, app_name: String, mut tcp: tokio::net::TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let started = Instant::now();
    let active = hub.policy().current();
    let Some(app) = active.policy.app(&app_name) else {
        return;
    };
    let state = active.state(app);
    let who = Requester::Public { ip: peer.ip() };
    let decision = active
        .policy
        .decide(app, &who, None, None, Timestamp::now());
    if let policies::Decision::Deny { reason } = decision {
        state.counters.refused(Refusal::Denied(reason));
        info!(app = %app_name, client = %Client(peer), reason = %reason, "connection refused by policy");
        return;
    }
    if state.limits.check_rate(&who).is_err() {
        state.counters.refused(Refusal::RateLimited);
        info!(app = %app_name, client = %Client(peer), "connection refused: rate limit");
        return;
    }
    let _guard = match state.limits.connect(&who) {
        Ok(g) => g,
        Err(e) => {
            state.counters.refused(Refusal::ConnectionLimit);
            info!(app = %app_name, client = %Client(peer), reason = %e, "connection refused: connection limit");
            return;
        }
    };
    let counters = state.counters.clone();
    let (shape_in, shape_out) = state.limits.shapers();
    let target = app.target.clone();
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
            let (_, reason) = refusal_of(&e);
            info!(app = %app_name, device = %target.device, client = %Client(peer), reason = %reason, "connection failed");
            return;
        }
    };
    let m = if shape_in.is_unlimited() && shape_out.is_unlimited() {
        splice(&mut tcp, &mut up).await
    } else {
        tunnel::splice::splice_shaped(tcp, &mut up, &shape_in, &shape_out).await
    };
    let (bin, bout) = (m.a_to_b, m.b_to_a);
    counters.bytes_in(bin);
    counters.bytes_out(bout);
    if let Some(refused) = up.refused() {
        let (_, reason) = refusal_of(&refused.open_error(&target.device));
        info!(app = %app_name, device = %target.device, client = %Client(peer), reason = %reason, "connection failed");
        return;
    }
    info!(app = %app_name, device = %target.device, client = %Client(peer), bytes_in = bin, bytes_out = bout, ms = started.elapsed().as_millis() as u64, end = %m.end(), "connection done");
}

struct ClientFlow {
    flow: tunnel::hub::UdpFlow,
    last: Instant,
    stop: CancellationToken,
}

async fn udp_loop(hub: Hub, app_name: String, sock: Arc<UdpSocket>, stop: CancellationToken) {
    let mut clients: HashMap<SocketAddr, ClientFlow> = HashMap::new();
    let mut buf = vec![0u8; UDP_READ];
    let mut sweep = tokio::time::interval(Duration::from_secs(10));
    loop {
        let (n, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            _ = sweep.tick() => {
                clients.retain(|_, c| {
                    let keep = c.last.elapsed() < UDP_IDLE && c.flow.is_alive();
                    if !keep { c.stop.cancel(); }
                    keep
                });
                continue;
            }
            r = sock.recv_from(&mut buf) => match r { Ok(x) => x, Err(_) => continue },
        };
        if let Some(c) = clients.get_mut(&peer) {
            if c.flow.is_alive() {
                c.last = Instant::now();
                let _ = c.flow.send(&buf[..n]);
                continue;
            }
            c.stop.cancel();
            clients.remove(&peer);
        }
        if clients.len() >= MAX_UDP_CLIENTS {
            continue;
        }
        let active = hub.policy().current();
        let Some(app) = active.policy.app(&app_name) else {
            break;
        };
        let state = active.state(app);
        let who = Requester::Public { ip: peer.ip() };
        if let policies::Decision::Deny { reason } =
            active
                .policy
                .decide(app, &who, None, None, Timestamp::now())
        {
            state.counters.refused(Refusal::Denied(reason));
            info!(app = %app_name, client = %Client(peer), reason = %reason, "UDP flow refused by policy");
            continue;
        }
        if state.limits.check_rate(&who).is_err() {
            state.counters.refused(Refusal::RateLimited);
            continue;
        }
        let target = app.target.clone();
        let counters = state.counters.clone();
        drop(active);
        match hub
            .open_udp_flow(
                &target.device,
                &target.service,
                &app_name,
                Origin::Public(peer),
            )
            .await
        {
            Ok((flow, mut rx)) => {
                counters.connection();
                counters.bytes_in(n as u64);
                let _ = flow.send(&buf[..n]);
                let tok = stop.child_token();
                let (sock2, tok2, app2) = (sock.clone(), tok.clone(), app_name.clone());
                tokio::spawn(async move {
                    let mut out = 0u64;
                    loop {
                        tokio::select! {
                            _ = tok2.cancelled() => break,
                            d = rx.recv() => match d {
                                Some(d) => { out += d.len() as u64; let _ = sock2.send_to(&d, peer).await; }
                                None => break,
                            }
                        }
                    }
                    counters.bytes_out(out);
                    info!(app = %app2, client = %Client(peer), bytes_out = out, "UDP flow done");
                });
                clients.insert(
                    peer,
                    ClientFlow {
                        flow,
                        last: Instant::now(),
                        stop: tok,
                    },
                );
            }
            Err(e) => {
                let (_, reason) = refusal_of(&e);
                info!(app = %app_name, client = %Client(peer), reason = %reason, "UDP flow failed");
            }
        }
    }
    for c in clients.values() {
        c.stop.cancel();
    }
}
