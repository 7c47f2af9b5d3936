//! Many concurrent idle TCP connections through a gateway `tcp` app, for memory with 10,000
//! proxied connections (`benches/run.sh mem`, issue 8).
//!
//! ```sh
//! cargo run --release --example idle_conns -- echo --listen 127.0.0.1:7007
//! cargo run --release --example idle_conns -- hold --connect 127.0.0.1:19000 --count 10000
//! ```
//! `echo` is the service behind the agent: it echoes bytes with a small buffer per connection,
//! so 10,000 connections cost it little. `hold` opens `--count` connections (at most
//! `--parallel` opening at a time), proves each reaches the service (one byte echoed), keeps
//! them all open and idle, writes one JSON line with the counts to stdout (and touches
//! `--ready-file`, so a script can measure memory now), holds them for `--hold` seconds,
//! proves every held connection still echoes, and prints a final JSON line. The exit status is
//! non-zero if any connection failed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

#[derive(Parser, Debug)]
#[command(about = "Hold many idle proxied TCP connections")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Echo server with a small per-connection buffer
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Open, check and hold connections
    Hold {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// Connections being opened at once
        #[arg(long, default_value_t = 200)]
        parallel: usize,
        /// Seconds a connection may take to connect and echo its first byte
        #[arg(long, default_value_t = 20)]
        timeout: u64,
        /// Seconds to keep the connections open and idle once all are tried
        #[arg(long, default_value_t = 10)]
        hold: u64,
        /// File created when every connection has been tried
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Stop opening new connections after this many failures (a hard limit on the way
        /// would otherwise make every remaining attempt wait for its timeout)
        #[arg(long, default_value_t = 400)]
        max_failures: usize,
    },
}

async fn echo(listen: SocketAddr) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen).await?;
    loop {
        let (mut s, _) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("idle_conns echo: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 256];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// Writes one byte and expects it back.
async fn ping(s: &mut TcpStream, b: u8) -> Result<(), &'static str> {
    s.write_all(&[b]).await.map_err(|_| "write")?;
    let mut got = [0u8; 1];
    match s.read(&mut got).await {
        Ok(1) if got[0] == b => Ok(()),
        Ok(0) => Err("closed"),
        Ok(_) => Err("wrong byte"),
        Err(_) => Err("read"),
    }
}

async fn open_one(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, &'static str> {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.map_err(|_| "connect")?;
        ping(&mut s, b'o').await?;
        Ok(s)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Err("timeout"))
}

fn count_errors(errs: &[&'static str]) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for e in errs {
        *m.entry(*e).or_insert(0) += 1;
    }
    m
}

async fn hold(
    addr: SocketAddr,
    count: usize,
    parallel: usize,
    timeout: Duration,
    hold_secs: u64,
    ready_file: Option<PathBuf>,
    max_failures: usize,
) -> anyhow::Result<bool> {
    let sem = Arc::new(Semaphore::new(parallel.max(1)));
    let failures = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut tried = 0;
    for _ in 0..count {
        let permit = sem.clone().acquire_owned().await?;
        if failures.load(Ordering::Relaxed) >= max_failures {
            break;
        }
        tried += 1;
        let failures = failures.clone();
        tasks.spawn(async move {
            let r = open_one(addr, timeout).await;
            if r.is_err() {
                failures.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
            r
        });
    }
    let mut held = Vec::with_capacity(count);
    let mut errors = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r? {
            Ok(s) => held.push(s),
            Err(e) => errors.push(e),
        }
    }
    let open_secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "phase": "open",
            "requested": count,
            "tried": tried,
            "ok": held.len(),
            "failed": errors.len(),
            "errors": count_errors(&errors),
            "open_secs": (open_secs * 100.0).round() / 100.0,
        })
    );
    if let Some(f) = &ready_file {
        std::fs::write(f, b"ready\n")?;
    }
    tokio::time::sleep(Duration::from_secs(hold_secs)).await;

    // Still there after idling? One more byte on each, a few at a time.
    let total = held.len();
    let mut checks = tokio::task::JoinSet::new();
    for mut s in held {
        let permit = sem.clone().acquire_owned().await?;
        checks.spawn(async move {
            let r = tokio::time::timeout(timeout, ping(&mut s, b'h'))
                .await
                .unwrap_or(Err("timeout"));
            drop(permit);
            (s, r)
        });
    }
    let mut late = Vec::new();
    let mut streams = Vec::with_capacity(total);
    while let Some(r) = checks.join_next().await {
        let (s, r) = r?;
        streams.push(s);
        if let Err(e) = r {
            late.push(e);
        }
    }
    drop(streams);
    println!(
        "{}",
        serde_json::json!({
            "phase": "after_hold",
            "held": total,
            "still_ok": total - late.len(),
            "errors": count_errors(&late),
        })
    );
    Ok(tried == count && errors.is_empty() && late.is_empty())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    match args.cmd {
        Cmd::Echo { listen } => rt.block_on(echo(listen)),
        Cmd::Hold {
            connect,
            count,
            parallel,
            timeout,
            hold: h,
            ready_file,
            max_failures,
        } => {
            let ok = rt.block_on(hold(
                connect,
                count,
                parallel,
                Duration::from_secs(timeout),
                h,
                ready_file,
                max_failures,
            ))?;
            if !ok {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
