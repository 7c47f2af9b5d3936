//! Cost of the per-request and per-chunk limiters: the keyed rate limiter (governor GCRA on a
//! bounded key table), connection counting with RAII guards, and the bandwidth token buckets
//! the copy loops consult before every chunk.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use policies::bandwidth::{Shaper, TokenBucket};
use policies::limits::{ConnLimiter, RateLimiter};
use policies::units::Rate;
use policies::{AppLimits, LimitKey, LimitsConfig, Per, RateLimit, Requester};
use std::future::Future;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

fn rate(count: u32, burst: u32, per: Per) -> RateLimit {
    RateLimit {
        rate: Rate {
            count,
            period: Duration::from_secs(1),
        },
        burst,
        per,
    }
}

fn ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | n))
}

/// Polls a future that must complete without waiting.
fn poll_ready<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the shaper asked to wait"),
    }
}

fn rate_limiter(c: &mut Criterion) {
    let mut g = c.benchmark_group("rate limiter");
    g.throughput(Throughput::Elements(1));

    // A limit far above the bench's pace: every check is admitted.
    let open = RateLimiter::new(rate(u32::MAX / 2, 1_000_000, Per::ClientIp));
    let key = LimitKey::client_ip(ip(1));
    g.bench_function("check, one key, admitted", |b| {
        b.iter(|| black_box(open.check(black_box(key))))
    });

    // 1/s with burst 1: after the first call every check is refused with a Retry-After.
    let tight = RateLimiter::new(rate(1, 1, Per::ClientIp));
    let _ = tight.check(key);
    g.bench_function("check, one key, refused", |b| {
        b.iter(|| black_box(tight.check(black_box(key))))
    });

    // Many clients: keys spread over a table of 10,000 entries (each already present).
    for clients in [1_000u32, 10_000] {
        let many = RateLimiter::new(rate(u32::MAX / 2, 1_000_000, Per::ClientIp));
        for n in 0..clients {
            let _ = many.check(LimitKey::client_ip(ip(n)));
        }
        let mut n = 0u32;
        g.bench_with_input(
            BenchmarkId::new("check, rotating over N known keys", clients),
            &clients,
            |b, &clients| {
                b.iter(|| {
                    n = (n + 1) % clients;
                    black_box(many.check(LimitKey::client_ip(ip(n))))
                })
            },
        );
    }

    // A full table (max_keys 1,024): unknown clients share the overflow buckets.
    let full = RateLimiter::with_max_keys(rate(u32::MAX / 2, 1_000_000, Per::ClientIp), 1024);
    for n in 0..2048 {
        let _ = full.check(LimitKey::client_ip(ip(n)));
    }
    let mut n = 1_000_000u32;
    g.bench_function("check, table full, new client -> overflow key", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            black_box(full.check(LimitKey::client_ip(ip(n))))
        })
    });

    // The gateway's call: key chosen from the requester, then checked.
    let limits = AppLimits::new(&LimitsConfig {
        rate: Some(rate(u32::MAX / 2, 1_000_000, Per::ClientIp)),
        ..Default::default()
    });
    let who = Requester::Public { ip: ip(7) };
    g.bench_function(
        "AppLimits::check_rate (public client, per client-ip)",
        |b| b.iter(|| black_box(limits.check_rate(black_box(&who)))),
    );
    let v6 = Requester::Public {
        ip: "2001:db8:1:2:3:4:5:6".parse().expect("ipv6"),
    };
    g.bench_function("AppLimits::check_rate (IPv6 client, keyed per /64)", |b| {
        b.iter(|| black_box(limits.check_rate(black_box(&v6))))
    });
    g.finish();
}

fn conn_limiter(c: &mut Criterion) {
    let mut g = c.benchmark_group("connection limiter");
    g.throughput(Throughput::Elements(1));
    let total_only = Arc::new(ConnLimiter::new(Some(100_000), None));
    let key = LimitKey::client_ip(ip(3));
    g.bench_function("acquire + release (total only)", |b| {
        b.iter(|| drop(black_box(total_only.try_acquire(black_box(key)))))
    });
    let per_client = Arc::new(ConnLimiter::new(Some(100_000), Some(1_000)));
    // Other clients hold connections, so the per-client map is not trivially small.
    let held: Vec<_> = (0..1_000)
        .filter_map(|n| per_client.try_acquire(LimitKey::client_ip(ip(n))).ok())
        .collect();
    g.bench_function(
        "acquire + release (per client, 1,000 other clients open)",
        |b| b.iter(|| drop(black_box(per_client.try_acquire(black_box(key))))),
    );
    drop(held);
    g.finish();
}

fn bandwidth(c: &mut Criterion) {
    let mut g = c.benchmark_group("bandwidth");
    g.throughput(Throughput::Elements(1));
    // A rate no bench reaches: reserve never has to return a wait.
    let bucket = TokenBucket::new(u64::MAX / 4);
    g.bench_function("TokenBucket::reserve 16 KiB (under the rate)", |b| {
        b.iter(|| black_box(bucket.reserve(black_box(16 * 1024))))
    });
    // 1 MiB/s: every call is in debt and computes a wait.
    let slow = TokenBucket::new(1024 * 1024);
    g.bench_function("TokenBucket::reserve 16 KiB (over the rate)", |b| {
        b.iter(|| black_box(slow.reserve(black_box(16 * 1024))))
    });

    // consume() is async but never waits here: poll it once with a no-op waker, so the figure is
    // the shaper's own cost, not an executor's.
    let app = Arc::new(TokenBucket::new(u64::MAX / 4));
    let shaper = Shaper::new(Some(app), Some(u64::MAX / 4));
    g.bench_function(
        "Shaper::consume 16 KiB (app + per-connection bucket, no wait)",
        |b| b.iter(|| poll_ready(shaper.consume(black_box(16 * 1024)))),
    );
    let unlimited = Shaper::default();
    g.bench_function("Shaper::consume 16 KiB (unlimited)", |b| {
        b.iter(|| poll_ready(unlimited.consume(black_box(16 * 1024))))
    });
    g.finish();
}

criterion_group!(benches, rate_limiter, conn_limiter, bandwidth);
criterion_main!(benches);
