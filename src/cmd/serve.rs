//! `zonegate gateway` and `zonegate node`: load and check everything, bind every socket, then
//! serve until SIGTERM/Ctrl-C (the gateway drains first).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tunnel::creds::DeviceCreds;
use tunnel::sockets::any_addr;

use super::UsageError;
use crate::cli::{GatewayArgs, NodeArgs};
use crate::config::{self, GatewayFile, NodeFile};

/// Default grace period of a drain.
const DEFAULT_GRACE: Duration = Duration::from_secs(10);
/// Default public HTTP, HTTPS and DNS ports of a gateway, on every interface: `[::]` (IPv4
/// and IPv6 on one socket: the zone's DNS answers AAAA for a gateway's IPv6 address, so its
/// front must be there) or `0.0.0.0` where the machine has no IPv6.
const DEFAULT_HTTP_PORT: u16 = 80;
const DEFAULT_HTTPS_PORT: u16 = 443;
const DEFAULT_DNS_PORT: u16 = 53;

/// CPU cores this process may use (affinity and cgroup quota included).
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The async runtime, with `threads` workers. One worker is tokio's current-thread runtime:
/// every task, the QUIC connection drivers included, runs on the thread that calls `block_on`,
/// in the order woken. A one-worker multi-thread runtime has the main thread and the worker
/// waking each other, and its LIFO slot runs a just-woken QUIC driver before the other ready
/// streams have written, so each answer leaves in a packet and a `sendmsg` of its own. On the
/// 2-core bench machine, keep-alive requests through the HTTP front (`benches/ab.sh front`,
/// gateway and node both on one thread; `perf stat` of the syscalls): UDP sends per request
/// went 1.11 → 0.10 on the gateway and 1.21 → 0.21 on the node, and CPU per request 20 %
/// (gateway, 28-30 vs 35-37 µs) and 30-38 % (node) down, 3 rounds; 15-22 % less per new
/// connection (`conn`); the same per GB of bulk transfer (`bulk`).
fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    b.enable_all().build().context("starting the async runtime")
}

/// Runs `main` on a runtime of `threads`, then stops the runtime waiting at most `wait` for
/// its blocking work. A plain drop waits for that for ever: a bundle write or `stat` stuck in
/// a hung mount (what the blocking pool is used for) held the stopped process, deaf to a
/// second signal since its handler task was gone, until systemd's SIGKILL.
fn run_then_stop<T>(
    threads: usize,
    wait: Duration,
    main: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let rt = runtime(threads)?;
    let r = rt.block_on(main);
    rt.shutdown_timeout(wait);
    r
}

/// What a gateway or node reads again as it changes (said when SIGHUP is ignored): an operator
/// sending it out of nginx habit after editing gateway.toml saw "read again as they change",
/// and the edit never applied.
const REREADS: &str = "zone.json, and on a gateway policy files and [[tls]] certificates, are read again as they change; gateway.toml, node.toml and the device's key and certificate only at start: restart for those";

/// How long a stopped gateway or node waits for blocking work still running (its drain and
/// its last zone.json save are over by then).
const STOP_WAIT: Duration = Duration::from_secs(2);

/// The signals a serving process answers, registered at once, first thing in its runtime:
/// until a handler is in place SIGHUP's default ends the process, undrained, and the gateway
/// accepts connections as soon as it has bound (before a spawned task first runs).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: Option<tokio::signal::unix::Signal>,
}

fn install_signals() -> Option<Signals> {
    use tokio::signal::unix::{signal, SignalKind};
    Some(Signals {
        term: signal(SignalKind::terminate()).ok()?,
        int: signal(SignalKind::interrupt()).ok()?,
        hup: signal(SignalKind::hangup()).ok(),
    })
}

/// Cancels `token` on SIGTERM or SIGINT; a second one ends the process at once, drain or not
/// (an operator pressing Ctrl-C again does not want to wait out `grace_secs`). SIGHUP is said
/// and ignored: its default ended the process at once, undrained (`kill -HUP` out of nginx
/// habit, a logrotate hook, a closed terminal), and there is nothing to reload by it — policy
/// files, certificates and zone.json are read again as they change.
/// `rereads` says what the process reads again as it changes, and what only at start.
async fn on_signal(signals: Option<Signals>, token: CancellationToken, rereads: &'static str) {
    let Some(Signals {
        mut term,
        mut int,
        mut hup,
    }) = signals
    else {
        return;
    };
    async fn hangup(hup: &mut Option<tokio::signal::unix::Signal>) {
        let got = match hup {
            Some(h) => h.recv().await,
            None => None,
        };
        if got.is_none() {
            std::future::pending::<()>().await;
        }
    }
    let said = || info!("SIGHUP: ignored ({rereads}; SIGTERM stops it)");
    loop {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("interrupt: shutting down"),
            () = hangup(&mut hup) => {
                said();
                continue;
            }
        }
        break;
    }
    token.cancel();
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            () = hangup(&mut hup) => {
                said();
                continue;
            }
        }
        break;
    }
    // The lines the log writer holds first (the drain's so far), then this one straight to
    // stderr. Not `eprintln!`, which panics when stderr is closed (a service manager that
    // dropped it) and would then leave the process running instead of exiting.
    // Not at all when stderr takes nothing (the write would block, and the exit never come).
    if crate::logging::finish_before_exit() {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "second signal: exiting without finishing the drain"
        );
    }
    std::process::exit(130);
}

/// The gateway's own sockets as `path` (a gateway.toml, `f`) sets them, defaults included,
/// for `zonegate policy check --gateway-config`: an app on one of them is refused by the
/// gateway, at start or reload.
pub(crate) fn gateway_own_sockets(
    path: &std::path::Path,
    f: &GatewayFile,
) -> Result<Vec<(gateway::listeners::Kind, std::net::SocketAddr, String)>, UsageError> {
    let forwards =
        config::forwards(&f.forward, &f.device).map_err(|e| config::in_file_or_flags(path, e))?;
    let (admin, http, https, dns) = gateway_addresses(f);
    let mut own = gateway::run::own_sockets_of(
        (config::quic_listen(path, f.listen)?, admin),
        (http, https, dns),
        &forwards,
    );
    let services = config::services(&f.services).map_err(|e| config::in_file_or_flags(path, e))?;
    own.extend(gateway::run::services_here(&services));
    Ok(own)
}

type Addr = std::net::SocketAddr;

/// A gateway's `admin`, `http`, `https` and `dns` addresses as `f` sets them, defaults filled
/// in (`None`: "off"): what it binds, and what `policy check --gateway-config` checks against.
fn gateway_addresses(f: &GatewayFile) -> (Addr, Option<Addr>, Option<Addr>, Option<Addr>) {
    let admin = f.admin.unwrap_or_else(|| {
        zone_core::zonedir::GATEWAY_ADMIN_DEFAULT
            .parse()
            .expect("valid default")
    });
    (
        admin,
        config::ListenSetting::resolve(f.http, any_addr(DEFAULT_HTTP_PORT)),
        config::ListenSetting::resolve(f.https, any_addr(DEFAULT_HTTPS_PORT)),
        config::ListenSetting::resolve(f.dns, any_addr(DEFAULT_DNS_PORT)),
    )
}

/// Ignores SIGHUP until the runtime's handler takes it ([`install_signals`]), first thing in
/// a serving command: its default ends the process, which systemd counts as a clean exit and
/// does not restart, and the start before the handler can take seconds (a node's DNS
/// bootstrap, a gateway's policy settling) — a logrotate hook's HUP there left it down.
#[allow(unsafe_code)]
fn ignore_hangup_while_starting() {
    // SAFETY: sets the disposition of one signal to SIG_IGN (no handler runs); nothing else in
    // the process relies on SIGHUP's default, and tokio's registration replaces it later.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

/// Gives SIGINT and SIGTERM their default back once the serving runtime is gone: its
/// handlers stay installed with nothing listening, and the last log lines' wait (up to
/// 20 s for a slow stderr) was deaf to a Ctrl-C.
#[allow(unsafe_code)]
pub fn default_stop_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: sets one signal's disposition to SIG_DFL (no handler runs); the runtime
        // whose handler this replaces has stopped, and nothing else listens.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
}

pub fn gateway(a: GatewayArgs) -> anyhow::Result<()> {
    ignore_hangup_while_starting();
    let mut f: GatewayFile = config::read(&a.config)
        .map_err(|e| config::other_role_hint::<NodeFile>(e, &a.config, "a node agent's", "node"))?;
    config::add_service_flags(&a.config, &mut f.services, &a.services)?;
    for s in &a.forwards {
        f.forward.push(config::parse_forward_flag(s)?);
    }
    let from_file = |e| config::in_file_or_flags(&a.config, e);
    let services = Arc::new(config::services(&f.services).map_err(from_file)?);
    let forwards = config::forwards(&f.forward, &f.device).map_err(from_file)?;
    config::gateway_forwards_local(&forwards).map_err(from_file)?;
    let tuning = config::tuning(&f.tunnel).map_err(|e| config::in_file(&a.config, e))?;
    let threads =
        config::threads(&a.config, f.threads)?.unwrap_or_else(|| config::gateway_threads(cores()));
    let paths = config::bundle(&a.config, &f.key, &f.cert, &f.ca, &f.zone_config);
    bundle_files_there(
        &a.config,
        &f.key,
        &f.cert,
        &f.ca,
        Some(&f.zone_config),
        &paths,
        false,
    )?;
    let creds = DeviceCreds::load(&paths, Some(&f.device))?;
    config::check_domain(&a.config, &f.domain, creds.domain())?;
    if !creds.identity.has_role(zone_core::Role::Gateway) {
        return Err(UsageError(format!(
            "{} is not a gateway device (its certificate has the roles {}); use `zonegate node`",
            f.device,
            creds.roles().join(", ")
        ))
        .into());
    }
    let dir = match (&a.policies, &f.policies) {
        (Some(flag), _) => flag.clone(),
        (None, Some(key)) => config::resolve(&a.config, key),
        (None, None) => {
            return Err(UsageError(format!(
                "{}: no policy directory: set `policies = \"policies\"` (relative to the file) or give --policies DIR",
                a.config.display()
            ))
            .into())
        }
    };
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(UsageError(format!(
                "policy directory {} is not a directory: point `policies` (or --policies) at the directory of policy files",
                dir.display()
            ))
            .into())
        }
        // A link to nothing (a mount not up yet at boot): exit 1, which the unit retries,
        // as for a policy file linked to nothing; "create it" could not be done (the link
        // is there), and exit 2 left the gateway down after the reboot.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Ok(target) = std::fs::read_link(&dir) {
                anyhow::bail!(
                    "policy directory {} is a link to {}, which does not exist (a mount not up yet?): mount it or point the link at the policy directory",
                    dir.display(),
                    target.display()
                );
            }
            return Err(UsageError(format!("policy directory {} does not exist: create it (it may be empty) or pass --policies DIR", dir.display())).into());
        }
        // Exit 1, as for a policy file it cannot read: fixed by the time a restart comes.
        Err(e) => anyhow::bail!(
            "policy directory {}: {e}: let the gateway's user read it (and the directories above it)",
            dir.display()
        ),
    }
    let policy = policies::PolicyStore::load_keeping_accepted(&dir)
        .map(Arc::new)
        .map_err(|errs| {
            // At most 100 per file, then a line saying how many more: not counted here.
            let list: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
            let text = format!("policy refused:\n  {}", list.join("\n  "));
            // Only files it could not read (copied in by root with a strict umask, half
            // written): exit 1, which systemd retries, as for an unreadable gateway.toml; a
            // mistake in what is written is the config's (exit 2).
            match errs.iter().all(|e| e.unreadable) {
                true => anyhow::anyhow!(text),
                false => UsageError(text).into(),
            }
        })?;
    let udp_per_app = config::udp_flows_per_app(&a.config, f.udp_flows_per_app)?;
    let tcp_total = config::tcp_connections(&a.config, f.tcp_connections)?;
    let http_total = config::http_connections(&a.config, f.http_connections)?;
    let http_per_ip =
        config::http_connections_per_ip(&a.config, f.http_connections_per_ip, http_total)?;
    let (admin, http, https, dns) = gateway_addresses(&f);
    config::fixed_port("admin =", admin).map_err(|e| config::in_file(&a.config, e))?;
    // Files that would never be read: a setting left behind, or HTTPS turned off by mistake.
    if https.is_none() && !f.tls.is_empty() {
        return Err(UsageError(format!(
            "{}: [[tls]] certificates are set but `https = \"off\"`: they would never be served; remove them, or set `https = \"IP:PORT\"`",
            a.config.display()
        ))
        .into());
    }
    // Absolute: the files' paths label `/metrics` series, which must not change with the
    // directory the gateway is started from.
    let tls_certs: Vec<(std::path::PathBuf, std::path::PathBuf)> = f
        .tls
        .iter()
        .map(|t| {
            let abs = |p: std::path::PathBuf| std::path::absolute(&p).unwrap_or(p);
            (
                abs(config::resolve(&a.config, &t.cert)),
                abs(config::resolve(&a.config, &t.key)),
            )
        })
        .collect();
    // A pair listed twice (a block pasted twice) served nothing more, and showed every
    // `zonegate_tls_*` series of its file twice.
    for (i, (c, _)) in tls_certs.iter().enumerate() {
        if tls_certs[..i].iter().any(|(other, _)| other == c) {
            return Err(UsageError(format!(
                "{}: [[tls]] cert {} is listed twice: remove one of its [[tls]] blocks",
                a.config.display(),
                c.display()
            ))
            .into());
        }
    }
    let listen = config::quic_listen(&a.config, f.listen)?;
    // Agents dial the addresses the zone config publishes for this gateway: a `listen` on
    // none of their ports (a `device move` to a new port, gateway.toml kept) starts fine and
    // is reached by nobody. A warning, not an error: a NAT may map another port to it.
    let published: Vec<std::net::SocketAddr> = creds
        .zone()
        .config
        .gateways
        .iter()
        .filter(|g| g.device == creds.identity.name)
        .flat_map(|g| g.addrs.iter().copied())
        .collect();
    if !published.is_empty() && !published.iter().any(|p| p.port() == listen.port()) {
        warn!(%listen, published = ?published.iter().map(|p| p.to_string()).collect::<Vec<_>>(), "the QUIC listen port is none of the ports the zone config publishes for this gateway: agents dial those; set `listen` in gateway.toml to that port (unless a NAT maps it here)");
    }
    let opts = gateway::GatewayOptions {
        creds,
        policy: policy.clone(),
        services,
        forwards,
        listen,
        admin,
        tuning,
        grace: config::grace(&a.config, f.grace_secs, DEFAULT_GRACE)?,
        http,
        https,
        tls_certs,
        http_tuning: config::http_tuning(&a.config, &f.front, (http_total, http_per_ip))?,
        tcp_connections_per_ip: config::tcp_connections_per_ip(
            &a.config,
            f.tcp_connections_per_ip,
            tcp_total,
        )?,
        tcp_connections: tcp_total,
        udp_flows_per_ip: config::udp_flows_per_ip(&a.config, f.udp_flows_per_ip, udp_per_app)?,
        udp_flows_per_app: udp_per_app,
        dns,
    };
    crate::fd_limit::raise_open_files(crate::fd_limit::gateway_needs(http_total, tcp_total));
    run_then_stop(threads, STOP_WAIT, async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signal(install_signals(), shutdown.clone(), REREADS));
        let gw = gateway::Gateway::bind(opts, shutdown.clone()).await?;
        // Everything bound on this policy: it is the one a later start falls back to.
        policy.started();
        tokio::spawn(crate::memory::release_freed_memory());
        gw.run().await?;
        Ok(())
    })
}

pub fn node(a: NodeArgs) -> anyhow::Result<()> {
    ignore_hangup_while_starting();
    let mut f: NodeFile = config::read(&a.config).map_err(|e| {
        config::other_role_hint::<GatewayFile>(e, &a.config, "a gateway's", "gateway")
    })?;
    config::add_service_flags(&a.config, &mut f.services, &a.services)?;
    for s in &a.forwards {
        f.forward.push(config::parse_forward_flag(s)?);
    }
    let from_file = |e| config::in_file_or_flags(&a.config, e);
    let services = Arc::new(config::services(&f.services).map_err(from_file)?);
    let forwards = config::forwards(&f.forward, &f.device).map_err(from_file)?;
    let admin_addr = f.admin.unwrap_or_else(|| {
        zone_core::zonedir::NODE_ADMIN_DEFAULT
            .parse()
            .expect("valid default")
    });
    config::fixed_port("admin =", admin_addr).map_err(|e| config::in_file(&a.config, e))?;
    config::node_socket_clashes(&a.config, admin_addr, &forwards, &services)?;
    for fw in forwards.iter().filter(|fw| !fw.listen.ip().is_loopback()) {
        tracing::warn!(listen = %fw.listen, to = %format!("{}/{}", fw.device, fw.service), "forward listens beyond this machine: anyone who reaches it there reaches the service as this device, past the gateway's per-client limits; use 127.0.0.1 unless that is meant");
    }
    let mut tuning = config::tuning(&f.tunnel).map_err(|e| config::in_file(&a.config, e))?;
    tuning.agent_drain = config::grace(&a.config, f.grace_secs, DEFAULT_GRACE)?;
    let threads = config::threads(&a.config, f.threads)?.unwrap_or(config::NODE_THREADS);
    let paths = config::bundle(&a.config, &f.key, &f.cert, &f.ca, &f.zone_config);
    // zone.json may be missing with bootstrap_dns: it is fetched.
    let bootstraps = a.bootstrap_dns.or(f.bootstrap_dns).is_some();
    let zone_json = (!bootstraps).then_some(f.zone_config.as_path());
    bundle_files_there(&a.config, &f.key, &f.cert, &f.ca, zone_json, &paths, true)?;
    if let Some(server) = a.bootstrap_dns.or(f.bootstrap_dns) {
        if a.bootstrap_dns.is_some() {
            config::fixed_port("--bootstrap-dns", server)?;
        } else {
            config::fixed_port("bootstrap_dns =", server)
                .map_err(|e| config::in_file(&a.config, e))?;
        }
        // The bundle but zone.json first (key, its mode, certificate, device name, CA): one
        // that cannot start must not have zone.json written into it. And the domain: a
        // wrong one would otherwise fail as "none over DNS" (exit 1, restarted) rather than
        // as the config error it is.
        let identity = tunnel::creds::check_identity(&paths, Some(&f.device))?;
        config::check_domain(&a.config, &f.domain, &identity.domain)?;
        bootstrap(&f.domain, server, &paths, &identity)?;
    }
    let creds = DeviceCreds::load(&paths, Some(&f.device))?;
    config::check_domain(&a.config, &f.domain, creds.domain())?;
    // Said, not refused: zone.json may list the device later (adopted from the gateway).
    let zone = creds.zone();
    for fw in forwards.iter().filter(|fw| {
        zone_core::DeviceName::new(&fw.device)
            .ok()
            .and_then(|n| zone.config.device(&n))
            .is_none()
    }) {
        tracing::warn!(listen = %fw.listen, to = %format!("{}/{}", fw.device, fw.service), serial = zone.config.serial, "forward to a device the zone config does not list: its connections fail until it does (a misspelt name?)");
    }
    drop(zone);
    crate::fd_limit::raise_open_files(crate::fd_limit::NODE_NEEDS);
    run_then_stop(threads, STOP_WAIT, async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signal(install_signals(), shutdown.clone(), REREADS));
        let endpoint = tunnel::transport::agent_endpoint(&creds, &tuning)?;
        // What this node offers and forwards, for /status: fixed for its run.
        let offered: Vec<_> = services
            .iter()
            .map(|(name, s)| {
                let proto = match s.proto {
                    tunnel::proto::ServiceProto::Tcp => "tcp",
                    tunnel::proto::ServiceProto::Udp => "udp",
                };
                serde_json::json!({ "name": name, "addr": s.addr.to_string(), "proto": proto })
            })
            .collect();
        let forwarded: Vec<_> = forwards
            .iter()
            .map(|f| {
                serde_json::json!({ "listen": f.listen.to_string(), "to": format!("{}/{}", f.device, f.service) })
            })
            .collect();
        let agent = tunnel::agent::Agent::bind(
            tunnel::agent::AgentConfig {
                creds: creds.clone(),
                services,
                forwards,
                gateways: Vec::new(),
                tuning,
            },
            endpoint,
        )
        .await?;
        let admin = gateway::admin::bind(admin_addr).await?;
        let a2 = agent.clone();
        let c2 = creds.clone();
        let status: gateway::admin::StatusFn = Arc::new(move || {
            serde_json::json!({
                "device": c2.name(),
                "zone": c2.domain().to_string(),
                "zone_serial": c2.zone_serial(),
                "cert_not_after": super::fmt_time(c2.cert_not_after()),
                "services": offered,
                "forwards": forwarded,
                "gateways": a2.links().iter().map(|l| l.status()).collect::<Vec<_>>(),
                "peers": a2.peers(),
                "streams_cut": a2.streams_cut(),
                "window_lent": a2.window_lent(),
            })
        });
        // Answers through the agent's drain; stops with it.
        let admin_stop = CancellationToken::new();
        let _admin_stop = admin_stop.clone().drop_guard();
        let (a3, c3) = (agent.clone(), creds.clone());
        let metrics: gateway::admin::TextFn = Arc::new(move || {
            let (links, peers) = (
                a3.links().iter().map(|l| l.status()).collect::<Vec<_>>(),
                a3.peers(),
            );
            crate::node_metrics::render(&crate::node_metrics::NodeView {
                cert_not_after: c3.cert_not_after().unix_timestamp(),
                zone_expires: c3.zone().config.expires_at.unix_timestamp(),
                zone_serial: c3.zone_serial(),
                links: &links,
                peers: &peers,
                streams_cut: a3.streams_cut(),
            })
        });
        let extras = gateway::admin::Extras {
            metrics: Some(metrics),
            page: None,
        };
        let admin_task = tokio::spawn(gateway::admin::serve_with(
            admin, status, extras, admin_stop,
        ));
        // The admin API failing (a panic) stops the node too, as any part of the agent does.
        let admin_failed = Arc::new(std::sync::Mutex::new(None::<String>));
        tokio::spawn({
            let (failed, shutdown) = (admin_failed.clone(), shutdown.clone());
            async move {
                if let Err(e) = admin_task.await {
                    if e.is_panic() && !shutdown.is_cancelled() {
                        tracing::error!(error = %e, "the admin API failed: stopping");
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                        shutdown.cancel();
                    }
                }
            }
        });
        tokio::spawn(crate::memory::release_freed_memory());
        agent.clone().run(shutdown).await;
        if let Some(why) = agent.revoked_self() {
            return Err(tunnel::TunnelError::Unrunnable(why).into());
        }
        let admin_failed = admin_failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match agent
            .broke()
            .map(|w| ("agent", w))
            .or(admin_failed.map(|w| ("admin API", w)))
        {
            Some((what, why)) => Err(anyhow::anyhow!(
                "the node stopped: its {what} failed: {why}"
            )),
            None => Ok(()),
        }
    })
}

pub fn files(
    dir: std::path::PathBuf,
    listen: std::net::SocketAddr,
    opts: crate::files::Options,
) -> anyhow::Result<()> {
    ignore_hangup_while_starting();
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(UsageError(format!(
                "--dir {}: does not exist: give the directory to serve",
                dir.display()
            ))
            .into())
        }
        Ok(_) => {
            return Err(UsageError(format!(
                "--dir {}: not a directory: give the directory to serve",
                dir.display()
            ))
            .into())
        }
        Err(e) => return Err(UsageError(format!("--dir {}: {e}", dir.display())).into()),
    }
    config::fixed_port("--listen", listen)?;
    let share = crate::files::Share::open(&dir)
        .with_context(|| format!("--dir {}: cannot open the directory", dir.display()))?;
    if !listen.ip().to_canonical().is_loopback() {
        warn!(addr = %listen, "the file service listens beyond this machine: anyone who reaches {listen} reads the share without the gateway's policy; keep it on loopback (127.0.0.1) unless that is meant");
    }
    // Each connection served holds its socket and an open file, as many more may wait:
    // the usual soft limit of 1,024 is close.
    crate::fd_limit::raise_open_files(crate::fd_limit::Needs {
        descriptors: 4 * crate::files::MAX_CONNECTIONS as u64 + crate::fd_limit::RESERVE,
        lower: "",
    });
    // Answers under way get files::STOP_GRACE to finish; then a file system call stuck in a
    // hung mount (what FS_TIMEOUT answers around) is not waited for past FILES_STOP_WAIT.
    run_then_stop(cores(), FILES_STOP_WAIT, async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signal(
            install_signals(),
            shutdown.clone(),
            "the shared directory is read as requests come; the command line only at start: restart for it",
        ));
        crate::files::run(share, listen, opts, shutdown)
            .await
            .with_context(|| format!("cannot listen on {listen}"))
    })
}

/// A bundle without zone.json takes whatever signed, unexpired config DNS answers: one that
/// does not list this device with the bundle's certificate predates the bundle (an answer
/// replayed from before it was made, or a gateway not given the newer zone.json), and may
/// trust a gateway revoked since. Refused: exit 1, as a restart after the copy starts.
fn lists_this_device(
    z: &zone_core::SignedZone,
    server: std::net::SocketAddr,
    id: &zone_core::cert::DeviceIdentity,
) -> anyhow::Result<()> {
    let listed = z.config.device(&id.name);
    if listed.is_some_and(|d| d.cert_serial == id.serial_hex) {
        return Ok(());
    }
    let what = if listed.is_some() {
        "with another certificate than this bundle's"
    } else {
        "at all"
    };
    anyhow::bail!(
        "the zone config DNS server {server} serves (serial {}) does not list this device ({}) {what}: it is older than this bundle (a stale gateway, or an answer replayed from before), and may trust devices revoked since; copy the zone directory's zone.json into the gateways' bundles (or into this bundle) and start again",
        z.config.serial,
        id.name
    )
}

/// How long a stopping file service waits for its file system calls still running.
const FILES_STOP_WAIT: Duration = Duration::from_secs(5);

/// The bundle files `config` names (`key`, `cert`, `ca`, `zone_config` as written, when
/// given) exist, or an error says which setting names a missing one and where it was looked
/// for: the load's own error gave only the path ("zone.jsn: No such file or directory"). Exit
/// 1 still, as for files not readable yet: a disk mounted late has them by the next start.
fn bundle_files_there(
    config: &std::path::Path,
    key: &std::path::Path,
    cert: &std::path::Path,
    ca: &std::path::Path,
    zone_json: Option<&std::path::Path>,
    paths: &tunnel::creds::BundlePaths,
    // A node can fetch zone.json from the zone's DNS (`--bootstrap-dns`); a gateway cannot.
    node: bool,
) -> anyhow::Result<()> {
    let named = [
        ("key", Some(key), &paths.key, "this device's device.key"),
        ("cert", Some(cert), &paths.cert, "this device's device.crt"),
        ("ca", Some(ca), &paths.ca, "the zone's zone-ca.crt"),
        (
            "zone_config",
            zone_json,
            &paths.zone_config,
            "the zone's zone.json",
        ),
    ];
    for (setting, written, path, what) in named {
        let Some(written) = written else { continue };
        if let Err(e) = std::fs::metadata(path) {
            if e.kind() == std::io::ErrorKind::NotFound {
                let relative = if written.is_absolute() {
                    String::new()
                } else {
                    let dir = config
                        .parent()
                        .filter(|d| !d.as_os_str().is_empty())
                        .unwrap_or(std::path::Path::new("."));
                    format!(
                        " (a relative path is read from the config file's directory, {})",
                        dir.display()
                    )
                };
                // zone.json alone can be fetched instead: the zone's DNS serves it signed.
                let or_fetch = match (setting, node) {
                    ("zone_config", true) => ", or start with `--bootstrap-dns IP:PORT` (the zone's DNS, e.g. the gateway's) to fetch it",
                    _ => "",
                };
                anyhow::bail!(
                    "{}: {setting} = {:?}: {} does not exist: give the path of {what}{relative}; the device's bundle directory holds it (`zonegate device add` wrote it there){or_fetch}",
                    config.display(),
                    written.display().to_string(),
                    path.display()
                );
            }
        }
    }
    Ok(())
}

/// Fetches `_zonegate.DOMAIN` from `server`, verifies it with the pinned zone CA and writes it
/// as the bundle's zone.json when it is newer than what the bundle holds (or when it has none).
/// A bundle that already has a zone.json starts with it if DNS fails; without one, it cannot.
fn bootstrap(
    domain: &zone_core::Domain,
    server: std::net::SocketAddr,
    paths: &tunnel::creds::BundlePaths,
    identity: &zone_core::cert::DeviceIdentity,
) -> anyhow::Result<()> {
    let ca = zone_core::zonedir::read_cert_der(&paths.ca)?;
    let key = zone_core::cert::ca_public_key(&ca)?;
    // Only a missing file is "none": one that cannot be read (permissions) or parsed (a copy
    // cut short) may hold revocations the DNS answer lacks, and was silently replaced by it.
    let have = match std::fs::symlink_metadata(&paths.zone_config) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        _ => Some(
            // Exit 1, as without bootstrap_dns: permissions being set, or a copy still being
            // made, are fixed by the time a restart comes (exit 2 is never restarted).
            zone_core::zonedir::read_zone_json(&paths.zone_config).map_err(|e| {
                anyhow::anyhow!(
                    "{e}: the bundle's zone.json cannot be used, and bootstrap_dns does not replace one it cannot read: fix its permissions, or copy the zone directory's zone.json into the bundle again"
                )
            })?,
        ),
    };
    // Another zone's (signed by another zone key: an owner of two zones copied the wrong
    // one) is no config of this zone: replaced as a missing one is, its serial no bar.
    let this_zone = zone_core::keys::public_text(&key);
    let have = match have {
        Some(z) if z.config.zone_key != this_zone => {
            tracing::warn!(file = %paths.zone_config.display(), "the bundle's zone.json belongs to another zone: fetching this zone's over DNS to replace it");
            None
        }
        have => have,
    };
    let known = have.as_ref().map(|z| z.config.serial);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let fetched = rt
        .block_on(name_resolver::fetch_zone(domain, server, &key, known))
        .and_then(|z| match &have {
            Some(h) => z
                .config
                .keeps_revocations_of(&h.config)
                .map(|()| z)
                .map_err(|source| name_resolver::BootstrapError::NotASuccessor { server, source }),
            None => Ok(z),
        });
    match fetched {
        Ok(z) => {
            if have.is_none() {
                lists_this_device(&z, server, identity)?;
            }
            if known.is_none_or(|k| z.config.serial > k) {
                zone_core::zonedir::write_atomic(
                    &paths.zone_config,
                    z.to_json_pretty().as_bytes(),
                    0o644,
                )?;
            }
            info!(server = %server, serial = z.config.serial, gateways = ?z.config.gateway_addrs().iter().map(|(n, a)| format!("{n} {a}")).collect::<Vec<_>>(), "zone config fetched over DNS and verified");
            Ok(())
        }
        Err(name_resolver::BootstrapError::Stale { .. }) if have.is_some() => Ok(()),
        Err(e) if have.is_some() => {
            tracing::warn!(server = %server, error = %e, "zone config over DNS refused or unavailable; starting with the bundle's zone.json");
            Ok(())
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "no zone.json in the bundle and none over DNS from {server}"
        ))),
    }
}
