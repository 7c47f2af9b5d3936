//! `zonegate demo`: a whole zone on this machine, in one process. A zone is created in a
//! temporary directory (or `--dir`), a gateway and two node agents start on loopback with free
//! ports, home1 offers a read-only file service and home2 an echo service, and the demo prints
//! what to try. With `--check` it verifies every path once and exits (used by the tests).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tunnel::agent::{Agent, AgentConfig, Forward};
use tunnel::creds::{BundlePaths, DeviceCreds};
use tunnel::proto::ServiceProto;
use tunnel::services::{LocalService, LocalServices};
use tunnel::transport::Tuning;
use zone_core::zonedir::ZoneDir;
use zone_core::{DeviceName, Domain, Role};

/// `println!` that cannot panic: the demo's banner goes to a stdout whose reader may have left
/// (`zonegate demo | head -3`), and the demo serves on regardless.
macro_rules! out {
    () => {
        out!("")
    };
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// The demo zone's domain (reserved for examples, never resolvable on the internet).
pub const DEMO_DOMAIN: &str = "demo.example";
/// Time everything has to come up before the demo says what failed.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Time Ctrl-C waits for tasks to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// How long the demo's gateway waits for requests in flight when it stops.
const DEMO_GRACE: Duration = Duration::from_secs(1);

/// Loopback ports free now for the demo: QUIC (UDP), HTTP, admin (TCP), the zone DNS (UDP and
/// TCP: it binds both on one port), the echo app and home2's forward (TCP). All are held until
/// all are picked, so no two are the same (a DNS port taken for UDP only failed its TCP bind
/// now and then).
fn free_ports() -> anyhow::Result<[u16; 6]> {
    use std::net::{TcpListener, UdpSocket};
    let port = |a: SocketAddr| a.port();
    let quic = UdpSocket::bind("127.0.0.1:0")?;
    let http = TcpListener::bind("127.0.0.1:0")?;
    let admin = TcpListener::bind("127.0.0.1:0")?;
    let echo = TcpListener::bind("127.0.0.1:0")?;
    let fwd = TcpListener::bind("127.0.0.1:0")?;
    let mut dns = None;
    for _ in 0..100 {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        if let Ok(tcp) = TcpListener::bind(udp.local_addr()?) {
            dns = Some((udp, tcp));
            break;
        }
    }
    let (dns, _dns_tcp) =
        dns.ok_or_else(|| anyhow::anyhow!("no loopback port free for both UDP and TCP"))?;
    Ok([
        port(quic.local_addr()?),
        port(http.local_addr()?),
        port(admin.local_addr()?),
        port(dns.local_addr()?),
        port(echo.local_addr()?),
        port(fwd.local_addr()?),
    ])
}

fn bundle(zone: &Path, name: &str) -> BundlePaths {
    let b = zone.join("devices").join(name);
    BundlePaths {
        key: b.join("device.key"),
        cert: b.join("device.crt"),
        ca: b.join("zone-ca.crt"),
        zone_config: b.join("zone.json"),
    }
}

/// Creates the demo zone: gateway `gw` on 127.0.0.1:QUIC, nodes `home1` and `home2`.
fn make_zone(dir: &Path, quic: SocketAddr) -> anyhow::Result<PathBuf> {
    let zdir = dir.join("zone");
    let now = OffsetDateTime::now_utc();
    let mut z = ZoneDir::init(&zdir, Domain::new(DEMO_DOMAIN)?, now)?;
    let mut issued = Vec::new();
    for (name, role, addrs) in [
        ("gw", Role::Gateway, vec![quic]),
        ("home1", Role::Node, vec![]),
        ("home2", Role::Node, vec![]),
    ] {
        let n = DeviceName::new(name)?;
        let (k, c) = z.add_device(&n, &[role], &addrs, now, zone_core::cert::DEVICE_CERT_DAYS)?;
        issued.push((n, k, c));
    }
    for (n, k, c) in &issued {
        z.write_bundle(&zdir.join("devices").join(n.as_str()), n, k, c)?;
    }
    Ok(zdir)
}

fn write_share(dir: &Path) -> anyhow::Result<PathBuf> {
    let share = dir.join("share");
    std::fs::create_dir_all(share.join("photos"))?;
    std::fs::write(
        share.join("README.txt"),
        "This file lives on home1, behind its NAT (in the demo: a task on loopback).\nYou are reading it through the gateway's HTTP front and a QUIC tunnel stream.\n",
    )?;
    std::fs::write(
        share.join("photos").join("list.txt"),
        "holiday-001.jpg\nholiday-002.jpg\n",
    )?;
    Ok(share)
}

fn policy_text(echo_port: u16) -> String {
    format!(
        r#"# The demo's traffic policy. Edit it while the demo runs: changes apply within 1.5 s,
# and a broken edit is refused with file:line:column while the old policy keeps serving.

# A read-only public view of home1's file service.
[app.dfs]
http = {{ host = "127.0.0.1", path = "/dfs", strip_prefix = true }}
to = "home1/dfs"
allow = {{ from = ["public"], methods = ["GET", "HEAD"] }}
limits = {{ rate = "50/s", burst = 100 }}

[app.dfs-localhost]
http = {{ host = "localhost", path = "/dfs", strip_prefix = true }}
to = "home1/dfs"
allow = {{ from = ["public"], methods = ["GET", "HEAD"] }}

# home2's echo service on a public TCP port of the gateway.
[app.echo]
tcp = {{ listen = "127.0.0.1:{echo_port}" }}
to = "home2/echo"
allow = {{ from = ["public"] }}

# home2 may reach home1's files over the mesh (everything else between devices is denied).
[app.dfs-mesh]
mesh = true
to = "home1/dfs"
allow = {{ from = ["device:home2"] }}
"#
    )
}

async fn echo_service() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let a = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(a)
}

/// One HTTP/1.1 GET over a plain TCP connection; returns (status, body).
async fn http_get(addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

async fn echo_check(addr: SocketAddr) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"zonegate").await?;
    let mut b = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b)).await??;
    if &b != b"zonegate" {
        bail!("echo answered {:?}", String::from_utf8_lossy(&b));
    }
    Ok(())
}

/// Runs the demo. `dir`: where to create the zone (must not hold one); default a temporary
/// directory removed at exit. `check`: verify every path once, then stop.
pub fn run(dir: Option<PathBuf>, check: bool) -> anyhow::Result<()> {
    let tmp;
    let dir = match dir {
        Some(d) => {
            // The demo writes a zone, a policy and a share here: into a directory that holds
            // other files (a repository, a gateway's bundle with its watched policies) it
            // would write over them.
            let fresh = match std::fs::read_dir(&d) {
                Ok(mut entries) => entries.next().is_none(),
                Err(e) => e.kind() == std::io::ErrorKind::NotFound,
            };
            if !fresh {
                return Err(crate::cmd::UsageError(format!(
                    "--dir {}: is not an empty directory; give a new or empty one (the demo writes a zone, a policy and files to share there)",
                    d.display()
                ))
                .into());
            }
            d
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("zonegate-demo-")
                .tempdir()?;
            tmp.path().to_owned()
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Signals are caught from the start, start-up included: the default action would end the
    // process without removing the temporary zone (its keys among it).
    rt.block_on(async {
        // A signal cancels `signalled`, and through it `shutdown`; a part that stops by itself
        // cancels only `shutdown`, which the demo then reports as the failure it is.
        let signalled = CancellationToken::new();
        let shutdown = signalled.child_token();
        let mut demo = std::pin::pin!(run_async(dir, check, shutdown));
        // Biased: the signal handlers are installed (at their first poll) before the demo's
        // first step, which writes the zone's keys.
        tokio::select! {
            biased;
            why = stop_signal() => {
                // Not println!: stdout may be gone (a pipe's reader exited), and a panic now
                // would skip removing the zone.
                use std::io::Write;
                let _ = writeln!(std::io::stdout(), "{why}: stopping the demo");
                // Stopped as `zonegate gateway` stops: the gateway drains and says so, the
                // agents leave. Dropping the demo's future instead ended it mid-flight: no
                // drain, and at times a task that outlived it reported a part "failed".
                // Bounded, and a second signal ends it at once.
                signalled.cancel();
                tokio::select! {
                    _ = &mut demo => {}
                    () = tokio::time::sleep(DEMO_GRACE + 2 * STOP_TIMEOUT) => {}
                    _ = stop_signal() => {}
                }
                // A check stopped half way checked nothing: not a pass (a CI job cancelled
                // mid-check read as green). One stopped while it winds down after passing is.
                match check && !CHECK_PASSED.load(std::sync::atomic::Ordering::SeqCst) {
                    true => Err(anyhow::anyhow!("{why}: the check was stopped before it finished")),
                    false => Ok(()),
                }
            }
            r = &mut demo => r,
        }
    })
}

/// The first of Ctrl-C, SIGTERM and SIGHUP (a closed terminal).
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return "interrupt";
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupt",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
    }
}

/// Set once `demo --check` has passed every check: a signal after it (while the demo winds
/// down) does not fail the check.
static CHECK_PASSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs the demo until `shutdown` is cancelled (by a signal: the caller's) or a part of it
/// stops by itself (an error).
async fn run_async(dir: PathBuf, check: bool, shutdown: CancellationToken) -> anyhow::Result<()> {
    // The homes' services bind first: bound to port 0 after `free_ports` let its picks go,
    // the kernel could hand one of those out again, and the gateway's bind failed.
    let files = TcpListener::bind("127.0.0.1:0").await?;
    let echo_addr = echo_service().await?;
    let [quic, http, admin, dns, echo_port, fwd_port] = free_ports()?;
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let (quic, http, admin, dns) = (at(quic), at(http), at(admin), at(dns));
    let zdir = make_zone(&dir, quic)
        .with_context(|| format!("creating the demo zone in {}", dir.display()))?;
    let share = write_share(&dir)?;
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(policies.join("demo.toml"), policy_text(echo_port))?;

    let tuning = Tuning::default();

    // Services of the two homes.
    let files_addr = files.local_addr()?;
    let share_root = crate::files::Share::open(&share)
        .with_context(|| format!("opening the demo share {}", share.display()))?;
    tokio::spawn(crate::files::serve(
        files,
        share_root,
        crate::files::Options::default(),
        shutdown.clone(),
    ));

    // The gateway.
    let gw_creds = DeviceCreds::load(&bundle(&zdir, "gw"), None)?;
    let policy = policies::PolicyStore::load(&policies)
        .map_err(|e| anyhow::anyhow!("demo policy: {e:?}"))?;
    let gw = gateway::Gateway::bind(
        gateway::GatewayOptions {
            creds: gw_creds,
            policy: Arc::new(policy),
            services: Arc::new(LocalServices::default()),
            forwards: Vec::new(),
            listen: quic,
            admin,
            tuning,
            grace: DEMO_GRACE,
            http: Some(http),
            https: None,
            tls_certs: Vec::new(),
            http_tuning: Default::default(),
            tcp_connections_per_ip: gateway::listeners::TCP_CONNECTIONS_PER_IP,
            tcp_connections: gateway::listeners::MAX_TCP_CONNECTIONS,
            udp_flows_per_ip: gateway::listeners::UDP_FLOWS_PER_IP,
            udp_flows_per_app: gateway::listeners::MAX_UDP_CLIENTS,
            dns: Some(dns),
        },
        shutdown.clone(),
    )
    .await?;
    let hub = gw.hub().clone();
    let dns_addr = gw.dns_addr();
    let mut tasks = tokio::task::JoinSet::new();
    {
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = gw.run().await {
                tracing::error!(error = %e, "demo gateway stopped");
                shutdown.cancel();
            }
        });
    }

    // The two node agents.
    let fwd = at(fwd_port);
    let start_agent =
        |name: &str, svcs: Vec<(&str, SocketAddr)>, forwards: Vec<Forward>| -> anyhow::Result<_> {
            let creds = DeviceCreds::load(&bundle(&zdir, name), None)?;
            let services = Arc::new(LocalServices::new(
                svcs.into_iter()
                    .map(|(n, a)| {
                        (
                            n.to_string(),
                            LocalService {
                                addr: a,
                                proto: ServiceProto::Tcp,
                            },
                        )
                    })
                    .collect(),
            ));
            let endpoint =
                tunnel::transport::client_endpoint("127.0.0.1:0".parse()?, &creds, &tuning)?;
            Ok((
                AgentConfig {
                    creds,
                    services,
                    forwards,
                    gateways: Vec::new(),
                    tuning,
                },
                endpoint,
            ))
        };
    let (c1, e1) = start_agent("home1", vec![("dfs", files_addr)], vec![])?;
    let (c2, e2) = start_agent(
        "home2",
        vec![("echo", echo_addr)],
        vec![Forward {
            listen: fwd,
            device: "home1".into(),
            service: "dfs".into(),
        }],
    )?;
    // An agent a part of which broke stops the demo (its run cancels `shutdown` itself):
    // said with the device and why, as the gateway's stop is, not as the gateway's.
    for (name, agent) in [
        ("home1", Agent::bind(c1, e1).await?),
        ("home2", Agent::bind(c2, e2).await?),
    ] {
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            agent.clone().run(shutdown).await;
            if let Some(why) = agent.broke() {
                tracing::error!(device = name, reason = %why, "demo node agent stopped");
            }
        });
    }

    // Ready when both agents are connected and every path answers.
    let start = Instant::now();
    while hub.agents().len() < 2 {
        // A part that broke (the gateway's run, a node agent's) cancelled `shutdown` and said
        // why: waiting out the timeout then blamed the agents' connecting for it.
        if shutdown.is_cancelled() {
            bail!(
                "a part of the demo stopped while it started (the error above says which and why)"
            );
        }
        if start.elapsed() > READY_TIMEOUT {
            shutdown.cancel();
            bail!("the node agents did not connect to the gateway within {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = http_get(http, "127.0.0.1", "/dfs/README.txt").await?;
    if status != 200 || !body.contains("lives on home1") {
        shutdown.cancel();
        bail!("GET http://{http}/dfs/README.txt answered {status}: {body}");
    }
    let (put_status, put_answer) = {
        let mut s = TcpStream::connect(http).await?;
        s.write_all(b"PUT /dfs/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx").await?;
        let mut b = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut b)).await??;
        let t = String::from_utf8_lossy(&b).into_owned();
        (
            t.split_whitespace()
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok())
                .unwrap_or(0),
            t,
        )
    };
    // Refused by the gateway's policy (the app allows GET and HEAD), not by the file service
    // behind it (which answers 405 too) nor by a broken path (a 502 is no refusal).
    if put_status != 405 || !put_answer.contains("does not allow PUT") {
        shutdown.cancel();
        bail!("a write through the read-only view was not refused by the gateway's policy (status {put_status}): {put_answer}");
    }
    let (mstatus, mbody) = http_get(fwd, "127.0.0.1", "/README.txt").await?;
    if mstatus != 200 || !mbody.contains("lives on home1") {
        shutdown.cancel();
        bail!("the mesh forward on home2 answered {mstatus}");
    }
    let echo_pub: SocketAddr = format!("127.0.0.1:{echo_port}").parse()?;
    echo_check(echo_pub)
        .await
        .context("echo through the gateway")?;
    if let Some(d) = dns_addr {
        // The bootstrap path a node uses: fetch _zonegate TXT, reassemble, verify with the CA.
        let ca = zone_core::zonedir::read_cert_der(&zdir.join("zone-ca.crt"))?;
        let key = zone_core::cert::ca_public_key(&ca)?;
        name_resolver::fetch_zone(&Domain::new(DEMO_DOMAIN)?, d, &key, None)
            .await
            .context("zone config over the gateway's DNS")?;
    }

    // Stopped while it started, by a signal (the caller then stops as it does, whatever this
    // says) or by a part that broke: nothing to try any more.
    if shutdown.is_cancelled() {
        bail!("a part of the demo stopped while it started (the error above says which and why)");
    }
    // What to try, for a demo that goes on running: a check's zone is removed as it ends.
    if !check {
        out!();
        out!(
            "zonegate demo: zone {DEMO_DOMAIN} with a gateway and two homes, running in {}",
            dir.display()
        );
        out!();
        out!("  read-only files on home1, through the gateway:  http://{http}/dfs/");
        out!("  (writes are refused:  curl -X PUT http://{http}/dfs/x  → {put_status})");
        out!("  the same files from home2, over the mesh:      http://{fwd}/");
        out!("  home2's echo service on a gateway TCP port:    {echo_pub}  (e.g. `nc 127.0.0.1 {echo_port}`)");
        out!("  gateway status page / JSON / metrics:          http://{admin}/  /status  /metrics");
        if let Some(d) = dns_addr {
            out!("  the zone's DNS (signed zone config as TXT):    dig @{} -p {} +tcp TXT _zonegate.{DEMO_DOMAIN}", d.ip(), d.port());
            out!("                                                 zonegate zone verify --dns {DEMO_DOMAIN} --server {d} --ca {}", zdir.join("zone-ca.crt").display());
        }
        out!(
            "  traffic policy (edit it live):                 {}",
            policies.join("demo.toml").display()
        );
        out!(
            "  zone files (zone key, CA, bundles):            {}",
            zdir.display()
        );
        out!();
    }
    if check {
        CHECK_PASSED.store(true, std::sync::atomic::Ordering::SeqCst);
        out!("demo check passed: files through the gateway (GET /dfs/README.txt 200, PUT /dfs/x {put_status}), mesh forward, echo, DNS bootstrap");
        shutdown.cancel();
    } else {
        out!("Press Ctrl-C to stop.");
        // Until a signal (`run`), or the demo's gateway stops by itself: a failure.
        shutdown.cancelled().await;
        let stop = async { while tasks.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(STOP_TIMEOUT, stop).await;
        bail!("a part of the demo (its gateway or a node agent) stopped by itself (see the log above)");
    }
    let stop = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(STOP_TIMEOUT, stop).await.is_err() {
        tracing::warn!("some tasks did not stop within {STOP_TIMEOUT:?}; exiting anyway");
    }
    Ok(())
}
