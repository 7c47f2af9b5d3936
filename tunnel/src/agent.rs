//! The node agent: dials every gateway of the zone, keeps each connection up (keep-alives,
//! jittered backoff, migration), serves the device's named services on streams the gateway
//! opens, carries UDP flows, and runs local forwards into the mesh.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn::{Connection, Endpoint};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::control::{self, ControlHandle, ControlIo};
use crate::creds::DeviceCreds;
use crate::error::TunnelError;
use crate::proto::{
    self, ControlSession, Event, Hello, Origin, RefuseCode, ServiceProto, StreamHeader,
    StreamReply, UdpFlowOpen,
};
use crate::services::LocalServices;
use crate::splice::splice;
use crate::status::LinkStatus;
use crate::stream::{self, QuicStream};
use crate::transport::Tuning;

/// First reconnect delay and its cap: quick recovery from a blip, no hammering of a gateway
/// that is down.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A connection that lasted this long counts as healthy: the next failure starts backoff over.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// A UDP flow with no traffic either way for this long is closed.
const UDP_FLOW_IDLE: Duration = Duration::from_secs(120);
/// Largest UDP payload read from a local service.
const UDP_READ: usize = 65_535;
/// App name an agent puts in a Relay header: the gateway decides the real app by policy.
const RELAY_APP: &str = "mesh";

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
}

/// One gateway as this agent sees it.
#[derive(Debug)]
pub struct GatewayLink {
    pub name: String,
    pub addr: SocketAddr,
    state: Mutex<LinkState>,
    connects: AtomicU64,
}

impl GatewayLink {
    fn usable(&self) -> Option<Connection> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &s.conn {
            Some(c) if !s.draining && c.close_reason().is_none() => Some(c.clone()),
            _ => None,
        }
    }
    fn set(&self, f: impl FnOnce(&mut LinkState)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }
    pub fn status(&self) -> LinkStatus {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let up = s.conn.as_ref().filter(|c| c.close_reason().is_none());
        LinkStatus {
            gateway: self.name.clone(),
            addr: self.addr.to_string(),
            state: match (up, s.draining) {
                (Some(_), false) => "up",
                (Some(_), true) => "draining",
                (None, _) => "connecting",
            }
            .into(),
            observed_addr: s.observed.map(|a| a.to_string()),
            rtt_ms: up.map(|c| c.rtt().as_secs_f64() * 1000.0),
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
    links: Vec<Arc<GatewayLink>>,
    forward_listeners: Mutex<Vec<(Forward, TcpListener)>>,
    forward_bound: Vec<SocketAddr>,
}

impl Agent {
    /// Binds everything up front (UDP socket, forward ports), so a bad config fails here and
    /// never half-starts.
    pub async fn bind(cfg: AgentConfig, endpoint: Endpoint) -> Result<Arc<Self>, TunnelError> {
        let gateways = if cfg.gateways.is_empty() {
            cfg.creds
                .zone()
                .config
                .gateway_addrs()
                .into_iter()
                .map(|(n, a)| (n.to_string(), a))
                .collect()
        } else {
            cfg.gateways.clone()
        };
        if gateways.is_empty() {
            return Err(TunnelError::Config(
                "no gateway to connect to: zone.json lists none (add one with `zonegate device add NAME --role gateway --public-addr IP:PORT` and copy the new zone.json here)".into(),
            ));
        }
        let mut fl = Vec::new();
        for f in &cfg.forwards {
            let l = TcpListener::bind(f.listen).await.map_err(|e| {
                TunnelError::Config(format!(
                    "forward {} -> {}/{}: cannot listen: {e}",
                    f.listen, f.device, f.service
                ))
            })?;
            fl.push((f.clone(), l));
        }
        let links = gateways
            .into_iter()
            .filter(|(n, _)| n != cfg.creds.name())
            .map(|(name, addr)| {
                Arc::new(GatewayLink {
                    name,
                    addr,
                    state: Mutex::default(),
                    connects: AtomicU64::new(0),
                })
            })
            .collect();
        let forward_bound = fl.iter().filter_map(|(_, l)| l.local_addr().ok()).collect();
        Ok(Arc::new(Agent {
            cfg,
            endpoint,
            links,
            forward_listeners: Mutex::new(fl),
            forward_bound,
        }))
    }

    pub fn links(&self) -> &[Arc<GatewayLink>] {
        &self.links
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
        info!(device = %self.cfg.creds.name(), gateways = ?self.links.iter().map(|l| format!("{} {}", l.name, l.addr)).collect::<Vec<_>>(), services = ?services, "node agent starting");
        let mut tasks = tokio::task::JoinSet::new();
        for link in &self.links {
            tasks.spawn(self.clone().link_loop(link.clone(), shutdown.clone()));
        }
        let listeners = std::mem::take(
            &mut *self
                .forward_listeners
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (f, l) in listeners {
            info!(listen = %f.listen, to = %format!("{}/{}", f.device, f.service), "mesh forward listening");
            tasks.spawn(self.clone().forward_loop(f, l, shutdown.clone()));
        }
        shutdown.cancelled().await;
        for link in &self.links {
            if let Some(c) = &link.state.lock().unwrap_or_else(|p| p.into_inner()).conn {
                c.close(0u32.into(), b"agent stopping");
            }
        }
        tasks.abort_all();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        info!("node agent stopped");
    }

    async fn link_loop(self: Arc<Self>, link: Arc<GatewayLink>, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
        loop {
            let started = Instant::now();
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.clone().session(link.clone()) => r,
            };
            let err = match result {
                Ok(reason) => reason,
                Err(e) => e.to_string(),
            };
            link.set(|s| {
                s.conn = None;
                s.draining = false;
                s.last_error = Some(err.clone());
            });
            if started.elapsed() >= HEALTHY_AFTER {
                backoff.reset();
            }
            let delay = backoff.next_delay(rand::random::<f64>());
            info!(gateway = %link.name, addr = %link.addr, reason = %err, retry_ms = delay.as_millis() as u64, "tunnel down; reconnecting");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One connection to a gateway, from dial to loss. Returns why it ended.
    async fn session(self: Arc<Self>, link: Arc<GatewayLink>) -> Result<String, TunnelError> {
        let creds = &self.cfg.creds;
        let t = self.cfg.tuning;
        let server_name = format!("{}.{}", link.name, creds.domain());
        let setup = async {
            let conn = self.endpoint.connect(link.addr, &server_name)?.await?;
            let (mut send, recv) = conn.open_bi().await?;
            stream::write_header(&mut send, &StreamHeader::Control).await?;
            let zone = creds.zone();
            let hello = Hello {
                proto_version: proto::CONTROL_VERSION,
                device: creds.name().to_owned(),
                services: self.cfg.services.infos(),
                zone_serial: zone.config.serial,
                // Pass our zone.json on: a gateway with an older one learns revocations this way.
                zone_config: Some(zone.to_json_compact())
                    .filter(|z| z.len() <= proto::limits::MAX_ZONE_CONFIG),
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            };
            let mut io = ControlIo::new(send, recv, ControlSession::agent(hello));
            io.flush().await?;
            let welcome = loop {
                match io.next_event().await? {
                    Some(Event::Welcome(w)) => break w,
                    Some(Event::PeerError { code, message }) => {
                        return Err(TunnelError::Config(format!(
                            "gateway refused us: {code:?}: {message}"
                        )))
                    }
                    Some(_) => continue,
                    None => return Err(TunnelError::Truncated),
                }
            };
            Ok::<_, TunnelError>((conn, io, welcome))
        };
        let (conn, io, welcome) = match tokio::time::timeout(t.handshake_timeout, setup).await {
            Ok(r) => r?,
            Err(_) => return Err(TunnelError::Timeout("connect and hello")),
        };
        if let Some(z) = &welcome.zone_config {
            match creds.offer_zone(z) {
                Ok(Some(serial)) => {
                    info!(serial, gateway = %link.name, "adopted newer zone config from gateway")
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(gateway = %link.name, error = %e, "gateway offered a zone config we refuse")
                }
            }
        }
        link.connects.fetch_add(1, Ordering::Relaxed);
        link.set(|s| {
            s.conn = Some(conn.clone());
            s.draining = false;
            s.observed = Some(welcome.observed_addr);
            s.last_error = None;
        });
        info!(
            gateway = %link.name,
            addr = %link.addr,
            observed = %welcome.observed_addr,
            session = welcome.session_id,
            services = ?self.cfg.services.infos().iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
            "tunnel up"
        );
        let (ctl, cmds) = control::channel();
        let flows: Flows = Arc::new(Mutex::new(HashMap::new()));
        let streams = tokio::spawn(self.clone().accept_streams(conn.clone(), link.name.clone()));
        let dgrams = tokio::spawn(read_datagrams(conn.clone(), flows.clone()));
        let reason = self.run_control(&link, &conn, io, cmds, ctl, flows).await;
        streams.abort();
        dgrams.abort();
        conn.close(0u32.into(), b"");
        Ok(reason)
    }

    async fn run_control(
        &self,
        link: &GatewayLink,
        conn: &Connection,
        mut io: ControlIo,
        mut cmds: tokio::sync::mpsc::Receiver<control::SessionCmd>,
        ctl: ControlHandle,
        flows: Flows,
    ) -> String {
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        loop {
            if let Err(e) = io.flush().await {
                return format!("control stream: {e}");
            }
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
                        drain_deadline = Some(tokio::time::Instant::now() + Duration::from_millis(grace_ms as u64));
                    }
                    Ok(Some(ev)) => self.on_event(link, conn, &ctl, &flows, ev),
                    Ok(None) => return "gateway closed the control stream".into(),
                    Err(e) => return format!("control stream: {e}"),
                },
                cmd = cmds.recv() => if let Some(cmd) = cmd {
                    if let Err(e) = cmd(&mut io.session) {
                        debug!(error = %e, "control command not applied");
                    }
                },
                e = conn.closed() => return format!("connection lost: {e}"),
                _ = drain_sleep => return "gateway drained".into(),
            }
        }
    }

    fn on_event(
        &self,
        link: &GatewayLink,
        conn: &Connection,
        ctl: &ControlHandle,
        flows: &Flows,
        ev: Event,
    ) {
        match ev {
            Event::ConfigUpdate { zone_config, .. } => {
                match self.cfg.creds.offer_zone(&zone_config) {
                    Ok(Some(serial)) => {
                        info!(serial, gateway = %link.name, "adopted newer zone config")
                    }
                    Ok(None) => {}
                    Err(e) => warn!(gateway = %link.name, error = %e, "refused zone config update"),
                }
            }
            Event::UdpFlowOpen(f) => self.open_flow(conn, ctl, flows, f),
            Event::UdpFlowClose { flow_id } => {
                if let Some(f) = flows
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&flow_id)
                {
                    f.stop.cancel();
                }
            }
            Event::PeerError { code, message } => {
                warn!(gateway = %link.name, ?code, %message, "gateway reported a control error")
            }
            other => debug!(event = ?other, "control event ignored"),
        }
    }

    fn open_flow(&self, conn: &Connection, ctl: &ControlHandle, flows: &Flows, f: UdpFlowOpen) {
        let id = f.flow_id;
        let svc = match self.cfg.services.get(&f.service) {
            Some(s) if s.proto == ServiceProto::Udp => *s,
            _ => {
                info!(service = %f.service, app = %f.app, "UDP flow refused: no such UDP service here");
                ctl.try_apply(move |s| s.close_udp_flow(id));
                return;
            }
        };
        let stop = CancellationToken::new();
        let (conn, ctl, flows2) = (conn.clone(), ctl.clone(), flows.clone());
        let (stop2, app, service, origin) = (
            stop.clone(),
            f.app.clone(),
            f.service.clone(),
            origin_text(&f.origin),
        );
        let (sock_tx, sock_rx) = tokio::sync::oneshot::channel::<Arc<UdpSocket>>();
        tokio::spawn(async move {
            let bind: SocketAddr = if svc.addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            }
            .parse()
            .expect("valid");
            let sock = match UdpSocket::bind(bind).await {
                Ok(s) if s.connect(svc.addr).await.is_ok() => Arc::new(s),
                _ => {
                    ctl.try_apply(move |s| s.close_udp_flow(id));
                    return;
                }
            };
            let _ = sock_tx.send(sock.clone());
            let started = Instant::now();
            let mut down = 0u64;
            let mut buf = vec![0u8; UDP_READ];
            loop {
                tokio::select! {
                    _ = stop2.cancelled() => break,
                    r = tokio::time::timeout(UDP_FLOW_IDLE, sock.recv(&mut buf)) => match r {
                        Ok(Ok(n)) => {
                            down += n as u64;
                            let mut b = BytesMut::with_capacity(n + 8);
                            if proto::encode_datagram(id, &buf[..n], &mut b).is_ok() {
                                let _ = conn.send_datagram(b.freeze());
                            }
                        }
                        Ok(Err(_)) | Err(_) => break,
                    }
                }
            }
            flows2.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            ctl.try_apply(move |s| s.close_udp_flow(id));
            info!(app = %app, service = %service, origin = %origin, bytes_down = down, secs = started.elapsed().as_secs(), "UDP flow done");
        });
        let flows = flows.clone();
        tokio::spawn(async move {
            if let Ok(sock) = sock_rx.await {
                flows
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, FlowEnd { sock, stop });
            }
        });
    }

    async fn accept_streams(self: Arc<Self>, conn: Connection, gateway: String) {
        while let Ok((send, recv)) = conn.accept_bi().await {
            let me = self.clone();
            let gw = gateway.clone();
            tokio::spawn(async move { me.serve_stream(send, recv, gw).await });
        }
    }

    async fn serve_stream(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        gateway: String,
    ) {
        let (header, rest) = match tokio::time::timeout(
            self.cfg.tuning.open_timeout,
            stream::read_header(&mut recv),
        )
        .await
        {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                stream::refuse(&mut send, RefuseCode::BadRequest, &e.to_string()).await;
                return;
            }
            Err(_) => return,
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
        let started = Instant::now();
        let mut tcp: TcpStream = match self.cfg.services.connect_tcp(&service).await {
            Ok(t) => t,
            Err((code, reason)) => {
                info!(app = %app, service = %service, origin = %origin_text(&origin), reason = %reason, "stream refused");
                stream::refuse(&mut send, code, &reason).await;
                return;
            }
        };
        if stream::write_reply(&mut send, &StreamReply::Accepted)
            .await
            .is_err()
        {
            return;
        }
        let mut q = QuicStream::new(send, recv, rest);
        let m = splice(&mut q, &mut tcp).await;
        let (up, down) = m.as_ref().map(|m| (m.a_to_b, m.b_to_a)).unwrap_or((0, 0));
        info!(
            app = %app,
            service = %service,
            origin = %origin_text(&origin),
            via = %gateway,
            bytes_in = up,
            bytes_out = down,
            ms = started.elapsed().as_millis() as u64,
            error = m.err().map(|e| e.to_string()).unwrap_or_default(),
            "connection done"
        );
    }

    fn pick_link(&self) -> Option<(String, Connection)> {
        self.links
            .iter()
            .find_map(|l| l.usable().map(|c| (l.name.clone(), c)))
    }

    async fn forward_loop(
        self: Arc<Self>,
        f: Forward,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) {
        loop {
            let (mut tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => { warn!(listen = %f.listen, error = %e, "forward accept failed"); tokio::time::sleep(Duration::from_millis(100)).await; continue; }
                },
            };
            let _ = tcp.set_nodelay(true);
            let me = self.clone();
            let f = f.clone();
            tokio::spawn(async move {
                let to = format!("{}/{}", f.device, f.service);
                let Some((gw, conn)) = me.pick_link() else {
                    warn!(listen = %f.listen, to = %to, "forward refused: no gateway connected");
                    return;
                };
                let started = Instant::now();
                let header = StreamHeader::Relay {
                    app: RELAY_APP.into(),
                    to_device: f.device.clone(),
                    service: f.service.clone(),
                };
                let mut q = match stream::open(&conn, &gw, &header, me.cfg.tuning.open_timeout)
                    .await
                {
                    Ok(q) => q,
                    Err(e) => {
                        info!(listen = %f.listen, to = %to, client = %peer, reason = %e, "forward refused");
                        return;
                    }
                };
                let m = splice(&mut tcp, &mut q).await;
                let (up, down) = m.as_ref().map(|m| (m.a_to_b, m.b_to_a)).unwrap_or((0, 0));
                info!(to = %to, via = %gw, client = %peer, bytes_up = up, bytes_down = down, ms = started.elapsed().as_millis() as u64, "forward connection done");
            });
        }
    }
}

type Flows = Arc<Mutex<HashMap<u32, FlowEnd>>>;

#[derive(Debug)]
struct FlowEnd {
    sock: Arc<UdpSocket>,
    stop: CancellationToken,
}

async fn read_datagrams(conn: Connection, flows: Flows) {
    while let Ok(d) = conn.read_datagram().await {
        let Ok((id, payload)) = proto::decode_datagram_bytes(d) else {
            continue;
        };
        let sock = flows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .map(|f| f.sock.clone());
        if let Some(s) = sock {
            let _ = s.send(&payload).await;
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
