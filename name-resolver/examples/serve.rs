//! Serves a generated zone (`alice.example`, made-up zone key) so that dig and dnsperf can be
//! pointed at the name resolver without a gateway.
//!
//! ```text
//! cargo run --release -p name-resolver --example serve -- 127.0.0.1:5353 --nodes 20 --queries /tmp/q.txt [--zonefile /tmp/alice.example.zone]
//! dig @127.0.0.1 -p 5353 home1.alice.example
//! dnsperf -s 127.0.0.1 -p 5353 -d /tmp/q.txt -l 10 -c 8 -Q 200000
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use name_resolver::{testzone, DnsServer};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // hickory-server logs every query at info: far too much for a benchmark.
    let filter: tracing_subscriber::filter::Targets = std::env::var("RUST_LOG")
        .unwrap_or_else(|_| "info,hickory_server=warn".into())
        .parse()?;
    tracing_subscriber::fmt()
        .with_max_level(tracing::level_filters::LevelFilter::TRACE)
        .finish()
        .with(filter)
        .init();
    let mut addr: SocketAddr = "127.0.0.1:5353".parse()?;
    let mut nodes = 20usize;
    let mut queries = None;
    let mut zonefile = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--nodes" => nodes = args.next().context("--nodes N")?.parse()?,
            "--queries" => queries = Some(args.next().context("--queries FILE")?),
            "--zonefile" => zonefile = Some(args.next().context("--zonefile FILE")?),
            other => {
                addr = other
                    .parse()
                    .with_context(|| format!("not an address: {other}"))?
            }
        }
    }
    let key = zone_core::ZoneKey::generate();
    let zone = Arc::new(testzone::config(&key, 1, nodes).sign(&key)?);
    let txt_bytes: usize = zone_core::txt::to_txt(&zone).iter().map(String::len).sum();
    if let Some(path) = queries {
        std::fs::write(&path, query_mix(nodes)).with_context(|| format!("writing {path}"))?;
        eprintln!("dnsperf query file written to {path}");
    }
    if let Some(path) = zonefile {
        std::fs::write(&path, master_file(&zone)).with_context(|| format!("writing {path}"))?;
        eprintln!("equivalent master file written to {path} (to benchmark another server)");
    }
    eprintln!(
        "zone {} with {} devices, zone config TXT {txt_bytes} bytes",
        testzone::DOMAIN,
        nodes + 2
    );

    let server = DnsServer::bind_same_port(addr).await?;
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });
    server.run(move || zone.clone(), stop).await?;
    Ok(())
}

/// The same records as a master file (RFC 1035), for benchmarking another server on equal terms.
fn master_file(zone: &zone_core::SignedZone) -> String {
    let c = &zone.config;
    let mut ips: Vec<std::net::IpAddr> = Vec::new();
    for a in c.gateways.iter().flat_map(|g| &g.addrs) {
        if !ips.contains(&a.ip()) {
            ips.push(a.ip());
        }
    }
    let addr_lines = |owner: &str, ips: &[std::net::IpAddr]| -> String {
        ips.iter()
            .map(|ip| {
                let t = if ip.is_ipv4() { "A" } else { "AAAA" };
                format!("{owner} 300 IN {t} {ip}\n")
            })
            .collect()
    };
    let mut f = format!(
        "$ORIGIN {}.\n@ 3600 IN SOA ns1 hostmaster {} 3600 600 1209600 60\n@ 300 IN NS ns1\n",
        c.domain, c.serial
    );
    for owner in ["@", "ns1", "*"] {
        f += &addr_lines(owner, &ips);
    }
    for d in &c.devices {
        let own: Vec<std::net::IpAddr> = c
            .gateways
            .iter()
            .filter(|g| g.device == d.name)
            .flat_map(|g| g.addrs.iter().map(|a| a.ip()))
            .collect();
        f += &addr_lines(d.name.as_str(), if own.is_empty() { &ips } else { &own });
    }
    let strings: Vec<String> = zone_core::txt::to_txt(zone)
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect();
    f += &format!("_zonegate 60 IN TXT ( {} )\n", strings.join(" "));
    f
}

/// What a gateway's DNS mostly sees: addresses of the apex, apps (wildcard) and devices, some
/// SOA/NS from resolvers, negative answers, queries for other domains, and the zone config TXT
/// (truncated over UDP: the client is expected to retry over TCP).
fn query_mix(nodes: usize) -> String {
    let d = testzone::DOMAIN;
    let mut q = vec![
        format!("{d} A"),
        format!("{d} AAAA"),
        format!("{d} SOA"),
        format!("{d} NS"),
        format!("www.{d} A"),
        format!("dfs.{d} A"),
        format!("gw1.{d} A"),
        format!("x.home1.{d} A"),
        format!("home1.{d} MX"),
        format!("_zonegate.{d} TXT"),
        "example.com A".to_string(),
    ];
    for i in 1..=nodes.min(8) {
        q.push(format!("home{i}.{d} A"));
    }
    q.join("\n") + "\n"
}
