//! In-process zones on loopback: a zone made with the zone-core API, a gateway and agents run
//! as tasks in the test's runtime, and small echo services. No root needed.
#![allow(dead_code)] // each test module uses a different part

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tunnel::agent::{Agent, AgentConfig, Forward};
use tunnel::creds::{BundlePaths, DeviceCreds};
use tunnel::proto::ServiceProto;
use tunnel::services::{LocalService, LocalServices};
use tunnel::transport::Tuning;
use zone_core::zonedir::ZoneDir;
use zone_core::{DeviceName, Domain, Role};

/// Short timings so loss is noticed within seconds in tests.
pub fn fast_tuning() -> Tuning {
    Tuning {
        keepalive: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(1500),
        handshake_timeout: Duration::from_secs(5),
        open_timeout: Duration::from_secs(5),
        udp_flow_idle: Duration::from_secs(120),
        reader_stall: Duration::from_secs(1),
        tcp_keepalive: Tuning::default().tcp_keepalive,
        agent_drain: Duration::ZERO,
    }
}

/// A free UDP port on 127.0.0.1 (bound and released; the gateway binds it right after).
/// A UDP port on loopback that is free now, for a gateway's QUIC address (see [`free_port`]).
pub fn free_udp_port() -> u16 {
    free_port(|p| std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok())
}

/// A TCP port on loopback that is free now (see [`free_port`]).
pub fn free_tcp_port() -> u16 {
    free_port(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
}

/// A loopback port free now for both UDP and TCP (a DNS server binds both), as [`free_port`].
pub fn free_udp_and_tcp_port() -> u16 {
    free_port(|p| {
        std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
    })
}

/// A port `binds` finds free now, chosen below the kernel's ephemeral range
/// (`ip_local_port_range`, 32768–60999 by default): a test that binds it later (a gateway
/// restarted in place, a listener a policy edit opens) must not find it taken meanwhile by the
/// ephemeral port of another test's socket — which happened once in CI ("Address already in
/// use" restarting a gateway on its address).
fn free_port(binds: impl Fn(u16) -> bool) -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low > 11_000 {
        for _ in 0..1000 {
            let port = 10_000 + rand::random::<u16>() % (low - 10_000);
            if binds(port) {
                return port;
            }
        }
    }
    // An unusual range: any free port, as before.
    std::iter::repeat_with(|| 10_000 + rand::random::<u16>() % 50_000)
        .take(10_000)
        .find(|&p| binds(p))
        .expect("a free port on 127.0.0.1")
}

/// A zone "alice.example" with gateway `gw` at 127.0.0.1:PORT and the given nodes.
pub struct TestZone {
    pub tmp: tempfile::TempDir,
    pub gw_addr: SocketAddr,
    /// Every gateway's name and QUIC address (`gw` at `gw_addr` first).
    pub gateways: Vec<(String, SocketAddr)>,
}

impl TestZone {
    pub fn new(nodes: &[&str]) -> Self {
        Self::with_gateways(&["gw"], nodes)
    }

    /// A zone with several gateways, each at its own loopback port.
    pub fn with_gateways(gateways: &[&str], nodes: &[&str]) -> Self {
        Self::build(gateways, &[], nodes)
    }

    /// A zone whose one gateway `gw` lists `first` before its own address (where it listens).
    pub fn with_gateway_addrs_before(first: &[SocketAddr], nodes: &[&str]) -> Self {
        Self::build(&["gw"], first, nodes)
    }

    /// A zone whose gateways listen (and are listed) at the given addresses, the first as `gw`.
    pub fn with_gateways_at(gateways: &[(&str, SocketAddr)], nodes: &[&str]) -> Self {
        Self::build_at(gateways, &[], nodes)
    }

    fn build(gateways: &[&str], first: &[SocketAddr], nodes: &[&str]) -> Self {
        let at: Vec<(&str, SocketAddr)> = gateways
            .iter()
            .map(|g| {
                let addr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
                (*g, addr)
            })
            .collect();
        Self::build_at(&at, first, nodes)
    }

    fn build_at(gateways: &[(&str, SocketAddr)], first: &[SocketAddr], nodes: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let zdir = tmp.path().join("zone");
        let mut z = ZoneDir::init(
            &zdir,
            Domain::new("alice.example").unwrap(),
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        let now = OffsetDateTime::now_utc();
        let mut issued = Vec::new();
        let mut gws = Vec::new();
        for &(g, addr) in gateways {
            let name = DeviceName::new(g).unwrap();
            let addrs: Vec<SocketAddr> = first.iter().copied().chain([addr]).collect();
            let (k, c) = z
                .add_device(&name, &[Role::Gateway], &addrs, now, 30)
                .unwrap();
            issued.push((name, k, c));
            gws.push((g.to_string(), addr));
        }
        for n in nodes {
            let name = DeviceName::new(n).unwrap();
            let (k, c) = z.add_device(&name, &[Role::Node], &[], now, 30).unwrap();
            issued.push((name, k, c));
        }
        // Bundles written last, so each holds the final zone.json.
        for (name, k, c) in &issued {
            z.write_bundle(&zdir.join("devices").join(name.as_str()), name, k, c)
                .unwrap();
        }
        std::fs::create_dir_all(tmp.path().join("policies")).unwrap();
        TestZone {
            tmp,
            gw_addr: gws[0].1,
            gateways: gws,
        }
    }

    /// Revokes `device` in the zone directory (as `zonegate device revoke` does) and returns the
    /// new zone.json; no bundle gets it.
    pub fn revoke(&self, device: &str) -> Vec<u8> {
        let mut zd = ZoneDir::open(&self.zone_dir()).unwrap();
        zd.revoke(&DeviceName::new(device).unwrap(), OffsetDateTime::now_utc())
            .unwrap();
        std::fs::read(self.zone_dir().join("zone.json")).unwrap()
    }

    /// A zone.json signed as from a zone directory restored from an older `backup`: its
    /// config (without what was revoked since) under a serial newer than the directory's.
    pub fn restored_from_backup(&self, backup: &zone_core::SignedZone) -> Vec<u8> {
        let zd = ZoneDir::open(&self.zone_dir()).unwrap();
        let mut restored = backup.config.clone();
        restored.serial = zd.zone.config.serial + 10;
        restored
            .sign(&zd.key)
            .unwrap()
            .to_json_pretty()
            .into_bytes()
    }

    /// Adds gateway `name` at a free loopback port to the zone directory (as `zonegate device
    /// add NAME --role gateway` does), writes its bundle and returns the new zone.json; no
    /// other bundle gets it.
    pub fn add_gateway(&mut self, name: &str) -> Vec<u8> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
        let mut zd = ZoneDir::open(&self.zone_dir()).unwrap();
        let dn = DeviceName::new(name).unwrap();
        let (k, c) = zd
            .add_device(
                &dn,
                &[Role::Gateway],
                &[addr],
                OffsetDateTime::now_utc(),
                30,
            )
            .unwrap();
        zd.write_bundle(&self.zone_dir().join("devices").join(name), &dn, &k, &c)
            .unwrap();
        self.gateways.push((name.to_string(), addr));
        std::fs::read(self.zone_dir().join("zone.json")).unwrap()
    }

    /// Moves gateway `name` to a free loopback port (as `zonegate device move` does) and returns
    /// the new address and zone.json; no bundle gets it.
    pub fn move_gateway(&mut self, name: &str) -> (SocketAddr, Vec<u8>) {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
        let mut zd = ZoneDir::open(&self.zone_dir()).unwrap();
        zd.move_gateway(
            &DeviceName::new(name).unwrap(),
            &[addr],
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        for g in self.gateways.iter_mut().filter(|(n, _)| n == name) {
            g.1 = addr;
        }
        if name == "gw" {
            self.gw_addr = addr;
        }
        (
            addr,
            std::fs::read(self.zone_dir().join("zone.json")).unwrap(),
        )
    }

    pub fn zone_dir(&self) -> PathBuf {
        self.tmp.path().join("zone")
    }
    pub fn bundle(&self, name: &str) -> BundlePaths {
        let b = self.zone_dir().join("devices").join(name);
        BundlePaths {
            key: b.join("device.key"),
            cert: b.join("device.crt"),
            ca: b.join("zone-ca.crt"),
            zone_config: b.join("zone.json"),
        }
    }
    pub fn creds(&self, name: &str) -> Arc<DeviceCreds> {
        DeviceCreds::load(&self.bundle(name), None).unwrap()
    }
    pub fn policy_dir(&self) -> PathBuf {
        self.tmp.path().join("policies")
    }
    pub fn write_policy(&self, file: &str, text: &str) {
        std::fs::write(self.policy_dir().join(file), text).unwrap();
    }
}

pub fn services(list: &[(&str, SocketAddr, ServiceProto)]) -> Arc<LocalServices> {
    Arc::new(LocalServices::new(
        list.iter()
            .map(|(n, a, p)| {
                (
                    n.to_string(),
                    LocalService {
                        addr: *a,
                        proto: *p,
                    },
                )
            })
            .collect(),
    ))
}

/// A running in-process gateway.
pub struct RunningGateway {
    pub shutdown: CancellationToken,
    pub apps: std::collections::HashMap<String, SocketAddr>,
    pub admin: SocketAddr,
    pub hub: tunnel::hub::Hub,
    pub task: tokio::task::JoinHandle<()>,
}

impl RunningGateway {
    /// App `app`'s counters now, as `/status` gives them.
    pub fn app_counts(&self, app: &str) -> policies::accounting::CountersSnapshot {
        let cur = self.hub.policy().current();
        let a = cur.policy.app(app).expect("an app of the policy");
        cur.state(a).counters.snapshot()
    }
}

pub async fn start_gateway(z: &TestZone, tuning: Tuning, grace: Duration) -> RunningGateway {
    start_gateway_with_dns(z, tuning, grace, None).await
}

/// Starts gateway `name` of a [`TestZone::with_gateways`] zone at its address.
pub async fn start_named_gateway(z: &TestZone, name: &str, tuning: Tuning) -> RunningGateway {
    let addr = z
        .gateways
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, a)| *a)
        .expect("a gateway of the zone");
    run_gateway(gateway_options(
        z,
        name,
        addr,
        tuning,
        Duration::from_millis(500),
        None,
    ))
    .await
}

/// Starts gateway `name` of `z` listening for QUIC on `listen` (not necessarily the address
/// the zone lists, as behind a VPS's 1:1 NAT or on a dual-stack `[::]` socket).
pub async fn start_gateway_listening(
    z: &TestZone,
    name: &str,
    listen: SocketAddr,
    tuning: Tuning,
) -> RunningGateway {
    run_gateway(gateway_options(
        z,
        name,
        listen,
        tuning,
        Duration::from_millis(500),
        None,
    ))
    .await
}

/// Like [`start_gateway`], also serving the zone's DNS on `dns` (UDP and TCP).
pub async fn start_gateway_with_dns(
    z: &TestZone,
    tuning: Tuning,
    grace: Duration,
    dns: Option<SocketAddr>,
) -> RunningGateway {
    run_gateway(gateway_options(z, "gw", z.gw_addr, tuning, grace, dns)).await
}

/// Binds a gateway with `opts` (it must bind) and runs it. A gateway restarted in place may
/// find its QUIC port still held for a moment by the previous one's endpoint, which lets go
/// of its socket only once its last connection finished draining: retried for up to 5 s.
pub async fn run_gateway(opts: gateway::GatewayOptions) -> RunningGateway {
    let shutdown = CancellationToken::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let gw = loop {
        match gateway::Gateway::bind(opts.clone(), shutdown.clone()).await {
            Ok(gw) => break gw,
            Err(e)
                if e.to_string().contains("Address already in use")
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("gateway binds: {e}"),
        }
    };
    let apps = gw.app_addrs();
    let admin = gw.admin_addr();
    let hub = gw.hub().clone();
    let task = tokio::spawn(async move { gw.run().await.expect("the gateway stopped on its own") });
    RunningGateway {
        shutdown,
        apps,
        admin,
        hub,
        task,
    }
}

/// Options of gateway `name` of `z` listening for QUIC on `listen`: loopback admin, no HTTP
/// front, the zone's policy directory.
pub fn gateway_options(
    z: &TestZone,
    name: &str,
    listen: SocketAddr,
    tuning: Tuning,
    grace: Duration,
    dns: Option<SocketAddr>,
) -> gateway::GatewayOptions {
    let creds = z.creds(name);
    let policy = Arc::new(policies::PolicyStore::load(&z.policy_dir()).expect("policy loads"));
    gateway::GatewayOptions {
        creds,
        policy,
        services: Arc::new(LocalServices::default()),
        forwards: Vec::new(),
        listen,
        admin: "127.0.0.1:0".parse().unwrap(),
        tuning,
        grace,
        http: None,
        https: None,
        tls_certs: Vec::new(),
        http_tuning: Default::default(),
        tcp_connections_per_ip: gateway::listeners::TCP_CONNECTIONS_PER_IP,
        tcp_connections: gateway::listeners::MAX_TCP_CONNECTIONS,
        udp_flows_per_ip: gateway::listeners::UDP_FLOWS_PER_IP,
        udp_flows_per_app: gateway::listeners::MAX_UDP_CLIENTS,
        dns,
    }
}

pub struct RunningAgent {
    pub agent: Arc<Agent>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

pub async fn start_agent(
    z: &TestZone,
    name: &str,
    svcs: Arc<LocalServices>,
    forwards: Vec<Forward>,
    tuning: Tuning,
) -> RunningAgent {
    start_agent_via(z, name, svcs, forwards, tuning, Vec::new()).await
}

/// [`start_agent`] connecting to `gateways` only (empty: every gateway of the zone).
pub async fn start_agent_via(
    z: &TestZone,
    name: &str,
    svcs: Arc<LocalServices>,
    forwards: Vec<Forward>,
    tuning: Tuning,
    gateways: Vec<(String, SocketAddr)>,
) -> RunningAgent {
    let creds = z.creds(name);
    let endpoint =
        tunnel::transport::client_endpoint("127.0.0.1:0".parse().unwrap(), &creds, &tuning)
            .unwrap();
    let agent = Agent::bind(
        AgentConfig {
            creds,
            services: svcs,
            forwards,
            gateways,
            tuning,
        },
        endpoint,
    )
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(agent.clone().run(shutdown.clone()));
    RunningAgent {
        agent,
        shutdown,
        task,
    }
}

/// Why `hub` refuses a public client's stream to `device`'s `service` (for app `app`): it must.
pub async fn open_refused(
    hub: &tunnel::hub::Hub,
    device: &str,
    service: &str,
    app: &str,
) -> tunnel::OpenError {
    let origin = tunnel::proto::Origin::Public("127.0.0.1:1".parse().unwrap());
    match hub.connect(device, service, app, origin).await {
        Ok(_) => panic!("the hub opened {device}/{service}"),
        Err(e) => e,
    }
}

/// Waits until every gateway link of `agent` is up: the hub has an agent before the agent has
/// the hub's welcome, and a forward opened in between finds no usable gateway.
pub async fn wait_links_up(agent: &Agent) {
    wait_until(
        "the agent's gateway links up",
        Duration::from_secs(10),
        || agent.links().iter().all(|l| l.status().state == "up"),
    )
    .await;
}

/// A TCP socket bound to `ip` (a loopback address such as 127.0.0.2), to connect from it.
pub fn socket_from(ip: &str) -> tokio::net::TcpSocket {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    s
}

/// Starts node `name` offering a TCP echo service as `echo`, and waits until the gateway has it.
pub async fn start_echo_node(z: &TestZone, gw: &RunningGateway, name: &str) -> RunningAgent {
    let echo = tcp_echo().await;
    let agent = start_agent(
        z,
        name,
        services(&[("echo", echo, ServiceProto::Tcp)]),
        vec![],
        fast_tuning(),
    )
    .await;
    wait_until(
        &format!("{name} connected"),
        Duration::from_secs(10),
        || gw.hub.agent(name).is_some(),
    )
    .await;
    agent
}

pub fn forward(listen: &str, to: &str) -> Forward {
    let (d, s) = to.split_once('/').unwrap();
    Forward {
        listen: listen.parse().unwrap(),
        device: d.into(),
        service: s.into(),
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// TCP echo server; returns its address.
pub async fn tcp_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// UDP echo server; returns its address.
pub async fn udp_echo() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// Sends `data` through a TCP connection to `addr` and returns everything read back.
pub async fn roundtrip(addr: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let mut out = Vec::new();
    let read = r.read_to_end(&mut out);
    let (a, b) = tokio::join!(write, read);
    // A refused stream closes without data; a write error then is part of that outcome.
    b?;
    if out.is_empty() {
        a?;
    }
    Ok(out)
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|_| rand::random::<u8>()).collect()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A UDP relay on loopback to `to` that goes silent (drops everything, both ways) while its
/// flag is set: a path that dies without a word. Answers from `to` go back to the last other
/// address that sent. Ends with the test's runtime.
pub async fn udp_relay(to: SocketAddr) -> (SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let relay = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = relay.local_addr().unwrap();
    let silent = Arc::new(AtomicBool::new(false));
    tokio::spawn({
        let silent = silent.clone();
        async move {
            let mut client = None;
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = relay.recv_from(&mut buf).await {
                let dest = if from == to {
                    match client {
                        Some(c) => c,
                        None => continue,
                    }
                } else {
                    client = Some(from);
                    to
                };
                if !silent.load(Ordering::Relaxed) {
                    let _ = relay.send_to(&buf[..n], dest).await;
                }
            }
        }
    });
    (addr, silent)
}

/// The log lines of the tasks run on this thread while the guard lives: a current-thread
/// runtime's, all of them.
pub fn capture_logs() -> (
    Arc<std::sync::Mutex<Vec<u8>>>,
    tracing::subscriber::DefaultGuard,
) {
    struct W(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for W {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
    let b = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || W(b.clone()))
        .finish();
    (buf, tracing::subscriber::set_default(sub))
}
