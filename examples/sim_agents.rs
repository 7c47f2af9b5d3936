//! Many node agents in one process, for the gateway's memory per connected agent
//! (`benches/run.sh mem`, issue 8).
//!
//! Each simulated agent is the real thing: a device certificate issued by the zone CA (made
//! here from `zone.key`, not added to zone.json, which would grow past what a Hello may carry;
//! a valid, unrevoked certificate of the zone is all a gateway asks), its own QUIC endpoint
//! and UDP socket, and `tunnel::agent::Agent` running the mutual-TLS handshake, the control
//! stream's Hello/Welcome and keep-alives, so the gateway holds a real session per agent.
//!
//! ```sh
//! cargo run --release --example sim_agents -- --zone ZONE_DIR --gateway gw=127.0.0.1:4433 --count 1000
//! ```
//! Prints progress on stderr and, once every agent is up, one JSON line on stdout
//! (`{"agents":1000,"up":1000,"connect_secs":…,"rss_kib":…}`); then keeps the agents idle until
//! SIGTERM/SIGINT (or `--hold SECS`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tunnel::agent::{Agent, AgentConfig};
use tunnel::creds::{BundlePaths, DeviceCreds};
use tunnel::proto::ServiceProto;
use tunnel::services::{LocalService, LocalServices};
use tunnel::transport::{self, Tuning};
use zone_core::cert::{issue_device, IssueRequest};
use zone_core::zonedir::{write_atomic, ZoneDir, ZONE_CA_FILE, ZONE_JSON_FILE};
use zone_core::{DeviceName, Role};

#[derive(Parser, Debug)]
#[command(about = "Simulate many idle node agents connected to one gateway")]
struct Args {
    /// The zone directory (holds zone.key, zone-ca.crt, zone.json)
    #[arg(long)]
    zone: PathBuf,
    /// Gateway to dial: DEVICE=IP:PORT (the device name must match its certificate)
    #[arg(long)]
    gateway: String,
    /// Number of agents
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Device name prefix (names are PREFIX0000, PREFIX0001, ...)
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Service every agent offers (never dialed while idle)
    #[arg(long, default_value = "127.0.0.1:9")]
    service: SocketAddr,
    /// Agents started at a time (each batch is waited for before the next). At most 32 keeps
    /// the gateway under its handshake threshold for QUIC Retry (and its warning).
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Give up if the agents are not all up within this many seconds
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Stop after this many seconds once up (default: run until SIGTERM/SIGINT)
    #[arg(long)]
    hold: Option<u64>,
    /// Where to write the agents' key and certificate files (default: a temporary directory)
    #[arg(long)]
    out: Option<PathBuf>,
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Issues `count` node certificates and writes each device's key and certificate, plus the
/// zone CA and zone.json once, to `dir`. Returns the bundle paths.
fn make_bundles(
    zone_dir: &Path,
    dir: &Path,
    prefix: &str,
    count: usize,
) -> anyhow::Result<Vec<BundlePaths>> {
    let zone =
        ZoneDir::open(zone_dir).with_context(|| format!("opening zone {}", zone_dir.display()))?;
    std::fs::create_dir_all(dir)?;
    let ca = dir.join(ZONE_CA_FILE);
    let zone_json = dir.join(ZONE_JSON_FILE);
    write_atomic(&ca, zone.ca_pem.as_bytes(), 0o644)?;
    std::fs::copy(zone_dir.join(ZONE_JSON_FILE), &zone_json)?;
    let now = OffsetDateTime::now_utc();
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let name = DeviceName::new(&format!("{prefix}{i:04}"))?;
        let key = zone.key.derive_device(zone.domain(), &name);
        let cert = issue_device(
            &zone.key,
            &zone.ca_pem,
            &key,
            &IssueRequest {
                domain: zone.domain(),
                name: &name,
                roles: &[Role::Node],
                not_before: now - time::Duration::hours(1),
                // Past the 30 days within which the gateway warns of each device connecting
                // (a thousand warn lines in the bench's log count otherwise).
                not_after: now + time::Duration::days(60),
            },
        )?;
        let paths = BundlePaths {
            key: dir.join(format!("{name}.key")),
            cert: dir.join(format!("{name}.crt")),
            ca: ca.clone(),
            zone_config: zone_json.clone(),
        };
        write_atomic(&paths.key, key.to_pem()?.as_bytes(), 0o600)?;
        write_atomic(&paths.cert, cert.pem.as_bytes(), 0o644)?;
        out.push(paths);
    }
    Ok(out)
}

fn up_count(agents: &[Arc<Agent>]) -> usize {
    agents
        .iter()
        .filter(|a| a.links().iter().all(|l| l.status().state == "up"))
        .count()
}

async fn wait_signal(hold: Option<u64>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    let hold = async {
        match hold {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = hold => {}
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (gw_name, gw_addr) = args
        .gateway
        .split_once('=')
        .context("--gateway wants DEVICE=IP:PORT")?;
    let gw_addr: SocketAddr = gw_addr.parse().context("--gateway address")?;
    let tmp;
    let dir = match &args.out {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_owned()
        }
    };
    let started = Instant::now();
    let bundles = make_bundles(&args.zone, &dir, &args.prefix, args.count)?;
    eprintln!(
        "sim_agents: {} certificates issued in {:.1} s",
        bundles.len(),
        started.elapsed().as_secs_f64()
    );

    let services = Arc::new(LocalServices::new(BTreeMap::from([(
        "svc".to_string(),
        LocalService {
            addr: args.service,
            proto: ServiceProto::Tcp,
        },
    )])));
    let tuning = Tuning::default();
    let shutdown = CancellationToken::new();
    let mut agents = Vec::with_capacity(bundles.len());
    let mut tasks = tokio::task::JoinSet::new();
    let connect_start = Instant::now();
    let deadline = connect_start + Duration::from_secs(args.timeout);
    for chunk in bundles.chunks(args.batch.max(1)) {
        for paths in chunk {
            let creds = DeviceCreds::load(paths, None)?;
            let endpoint =
                transport::client_endpoint("127.0.0.1:0".parse().expect("addr"), &creds, &tuning)?;
            let agent = Agent::bind(
                AgentConfig {
                    creds,
                    services: services.clone(),
                    forwards: Vec::new(),
                    gateways: vec![(gw_name.to_string(), gw_addr)],
                    tuning,
                },
                endpoint,
            )
            .await?;
            tasks.spawn(agent.clone().run(shutdown.clone()));
            agents.push(agent);
        }
        while up_count(&agents) < agents.len() {
            if Instant::now() > deadline {
                bail!(
                    "only {} of {} agents up after {} s",
                    up_count(&agents),
                    agents.len(),
                    args.timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "sim_agents: {} agents up after {:.1} s",
            agents.len(),
            connect_start.elapsed().as_secs_f64()
        );
    }
    let connect_secs = connect_start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "agents": agents.len(),
            "up": up_count(&agents),
            "connect_secs": (connect_secs * 100.0).round() / 100.0,
            "rss_kib": rss_kib(),
        })
    );
    wait_signal(args.hold).await;
    let up = up_count(&agents);
    eprintln!("sim_agents: stopping ({up} of {} still up)", agents.len());
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if up < agents.len() {
        bail!("{} agents lost their tunnel while idle", agents.len() - up);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter: tracing_subscriber::filter::Targets = std::env::var("RUST_LOG")
        .unwrap_or_else(|_| "warn".into())
        .parse()?;
    tracing_subscriber::fmt()
        .with_max_level(tracing::level_filters::LevelFilter::TRACE)
        .with_writer(std::io::stderr)
        .finish()
        .with(filter)
        .init();
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}
