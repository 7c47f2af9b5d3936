//! Upstream HTTP/1.1 connections kept open over tunnel streams and reused: a request to a
//! service that was used a moment ago costs no new QUIC stream, no stream-header round trip
//! and no TCP connect on the device.
//!
//! A connection has no task of its own: whoever uses it drives it ([`super::upstream`]).
//! A task per upstream connection cost a spawn and four cross-task wake-ups per request: few
//! instructions, but scheduling work on a busy 2-core box (the gateway's CPU per front request
//! went 49.7 → 40.1 µs in an interleaved wrk A/B; benches/RESULTS.md). An idle pooled
//! connection is polled by nobody; one the service closed meanwhile is found when it is next
//! taken or swept.
//!
//! A connection comes back here only when its response was read to the end, its request
//! was sent whole, and the service did not say `Connection: close`; one that was upgraded,
//! broke, or sat idle past [`IDLE_TIMEOUT`] is dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use super::upstream::Upstream;

/// Idle connections kept per (app, device, service). Each is a QUIC stream plus a TCP
/// connection on the device (~20 KiB on each side, benches/RESULTS.md, and a read buffer of
/// at most 16 KiB here), kept at most
/// [`IDLE_TIMEOUT`] (or until the service closes it). It must hold what one burst of answers
/// hands back: answers to concurrent requests finish together, and each connection turned away
/// is a new stream and a new TCP connection on the device for the next request. At 32, 64
/// keep-alive clients through the front (`CONNS=64 benches/ab.sh front`) ran at 38.7k req/s
/// with the node spending 14.7 µs per request, against 59.3k and 6.4 µs at 128; 128 clients
/// 30.6k against 63.3k. With 128 kept, 512 clients (`CONNS=512 ROUNDS=2 SECS=5 benches/ab.sh
/// front OLD NEW nginx-rp`) ran at 16.0k/16.6k req/s against 22.2k/23.5k at 1,024 (nginx's reverse
/// proxy, `keepalive 64`: 20.4k/21.8k), the node spending 34–39 µs per request on a TCP connect
/// and shutdown for most requests against 16.4–18.8 µs (5 rounds). Only a burst that wide
/// fills it, and the sweep empties it within [`IDLE_TIMEOUT`] after.
pub const MAX_IDLE_PER_KEY: usize = 1024;
/// Idle connections older than this are not reused: services commonly close idle keep-alive
/// connections after 60 s or more, so 30 s rarely hands out one that is about to be closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Which pooled connections may serve a request: the app's names (app, device, service),
/// compared by value. The app is part of the key because the tunnel stream header names the
/// app for the device's logs and accounting. The map hashes it with FxHash, not std's SipHash:
/// the keys come from the user's policy files, not from clients, and SipHash over the three
/// names cost ~385 instructions per lookup, two lookups per request (callgrind,
/// benches/front_cost.sh).
pub type PoolKey = Arc<policies::AppNames>;

struct Idle {
    up: Upstream,
    since: Instant,
    /// How long it may be reused: [`IDLE_TIMEOUT`], or less if the service said it closes
    /// idle connections sooner ([`keep_for`]).
    keep: Duration,
}

/// How long a connection may sit idle here when the service's answer said `Keep-Alive:
/// timeout=N` (`said`: what is left of `N`): a second less (its close may be on its way
/// through the tunnel as the next request goes out; a POST then gets a 502, as it cannot be
/// sent again), at most [`IDLE_TIMEOUT`]. Node.js says 5 s and closes at 5 s: connections kept
/// 30 s failed requests sent 5 s apart.
pub fn keep_for(said: Option<Duration>) -> Duration {
    match said {
        Some(t) => t.saturating_sub(Duration::from_secs(1)).min(IDLE_TIMEOUT),
        None => IDLE_TIMEOUT,
    }
}

#[derive(Default)]
pub struct Pool {
    idle: Mutex<FxHashMap<PoolKey, Vec<Idle>>>,
    closed: AtomicBool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("idle", &self.idle_count())
            .finish()
    }
}

impl Pool {
    pub fn new() -> Arc<Self> {
        Arc::new(Pool::default())
    }

    /// An idle connection that is fresh enough and still open.
    pub fn take(&self, key: &PoolKey) -> Option<Upstream> {
        let now = Instant::now();
        // Dropped once the lock is released: after a device's tunnel came back, up to
        // MAX_IDLE_PER_KEY dead streams go here, each drop into quinn, while every other app
        // would wait on the lock.
        let mut dead = Vec::new();
        let found = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let list = idle.get_mut(key)?;
            loop {
                let Some(mut c) = list.pop() else { break None };
                if now - c.since < c.keep && c.up.still_open() {
                    break Some(c.up);
                }
                dead.push(c);
            }
        };
        drop(dead);
        found
    }

    /// Keeps `up` for the next request to `key`, for at most `keep` ([`keep_for`]).
    pub fn put(&self, key: PoolKey, up: Upstream, keep: Duration) {
        if self.closed.load(Ordering::Relaxed) || keep.is_zero() {
            return;
        }
        up.rest();
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(key).or_default();
        // Pruned only when full; `sweep` prunes the rest every few seconds. The list is oldest
        // first (pushed as they come back, taken from the end, swept in order), so those past
        // IDLE_TIMEOUT (stale whatever their own time) are a prefix: found by binary search,
        // not by a pass over up to MAX_IDLE_PER_KEY entries on every answer while a wide
        // burst keeps it full. Ones past a shorter time of their own may stay until `sweep`.
        if list.len() >= MAX_IDLE_PER_KEY {
            let stale = list.partition_point(|c| now - c.since >= IDLE_TIMEOUT);
            list.drain(..stale);
        }
        if list.len() < MAX_IDLE_PER_KEY {
            list.push(Idle {
                up,
                since: now,
                keep,
            });
        }
    }

    /// Drops every idle connection and keeps none from now on (shutdown).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Drops idle connections past their time, closed by the other side, or that may no
    /// longer carry requests (`usable(key)` false: the rule the front takes them by — a
    /// stopping device offers nothing). A stopping node drains, waiting for its open streams,
    /// and an idle kept connection is one (a node restarted within 30 s of a request waited
    /// out its whole grace period, then warned of a stream cut).
    pub fn sweep(&self, usable: impl Fn(&PoolKey) -> bool) {
        let now = Instant::now();
        let mut dead = Vec::new();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|key, list| {
            let gone = !usable(key);
            for mut c in std::mem::take(list) {
                if !gone && now - c.since < c.keep && c.up.still_open() {
                    list.push(c);
                } else {
                    dead.push(c);
                }
            }
            !list.is_empty()
        });
        // As in `take`: not under the lock.
        drop(idle);
        drop(dead);
    }

    pub fn idle_count(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::http) fn key() -> PoolKey {
        Arc::new(policies::AppNames {
            app: "web".into(),
            device: "home1".into(),
            service: "web".into(),
        })
    }

    /// A connection whose far end is open (`keep` holds it) or already closed.
    fn conn(open: bool) -> (Upstream, Option<tokio::io::DuplexStream>) {
        let (a, b) = tokio::io::duplex(1024);
        (Upstream::new(a), open.then_some(b))
    }

    #[tokio::test]
    async fn closed_connections_are_not_handed_out() {
        let pool = Pool::new();
        // Never polled since, they look ready: taking or sweeping finds them closed.
        pool.put(key(), conn(false).0, IDLE_TIMEOUT);
        assert!(pool.take(&key()).is_none());
        pool.put(key(), conn(false).0, IDLE_TIMEOUT);
        assert_eq!(pool.idle_count(), 1);
        pool.sweep(|_| true);
        assert_eq!(pool.idle_count(), 0);
        let (up, _keep) = conn(true);
        pool.put(key(), up, IDLE_TIMEOUT);
        pool.sweep(|_| true);
        assert_eq!(pool.idle_count(), 1, "an open connection survives a sweep");
        // Not one to a device that is stopping: its node drains, waiting for it.
        pool.sweep(|k| k.device != "nowhere");
        assert_eq!(pool.idle_count(), 1);
        let device = key().device.clone();
        pool.sweep(|k| k.device != device);
        assert_eq!(pool.idle_count(), 0, "kept for a stopping device");
        let (up, _keep) = conn(true);
        pool.put(key(), up, IDLE_TIMEOUT);
        assert!(pool.take(&key()).is_some());
        assert!(
            pool.take(&key()).is_none(),
            "taken connections leave the pool"
        );
        let other = Arc::new(policies::AppNames {
            app: "other".into(),
            ..(*key()).clone()
        });
        let (up, _keep2) = conn(true);
        pool.put(other.clone(), up, IDLE_TIMEOUT);
        assert!(pool.take(&key()).is_none(), "keys do not share");
        pool.close();
        assert_eq!(pool.idle_count(), 0);
        let (up, _keep3) = conn(true);
        pool.put(key(), up, IDLE_TIMEOUT);
        assert_eq!(pool.idle_count(), 0, "a closed pool keeps nothing");
    }

    #[tokio::test]
    async fn a_connection_with_stray_bytes_is_not_reused() {
        use tokio::io::AsyncWriteExt;
        let pool = Pool::new();
        let (up, keep) = conn(true);
        let mut far = keep.unwrap();
        far.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        pool.put(key(), up, IDLE_TIMEOUT);
        assert!(pool.take(&key()).is_none(), "bytes nobody asked for");
    }

    /// A service that said it closes idle connections after 3 s: its connections are
    /// handed out for 2 s; one that said 1 s is not kept at all.
    #[tokio::test]
    async fn a_service_keep_alive_timeout_bounds_reuse() {
        assert_eq!(keep_for(None), IDLE_TIMEOUT);
        assert_eq!(keep_for(Some(Duration::from_secs(300))), IDLE_TIMEOUT);
        assert_eq!(keep_for(Some(Duration::from_secs(1))), Duration::ZERO);
        let said = Some(Duration::from_secs(3));
        let pool = Pool::new();
        let (up, _keep) = conn(true);
        pool.put(key(), up, keep_for(said));
        let (up, _keep2) = conn(true);
        pool.put(key(), up, keep_for(Some(Duration::from_secs(1))));
        assert_eq!(pool.idle_count(), 1, "a 1 s keep-alive is not kept");
        let up = pool.take(&key()).expect("fresh");
        pool.put(key(), up, keep_for(said));
        std::thread::sleep(Duration::from_millis(2100));
        assert!(pool.take(&key()).is_none(), "handed out past its time");
    }

    #[tokio::test]
    async fn at_most_max_idle_per_key() {
        let pool = Pool::new();
        let mut keep = Vec::new();
        for _ in 0..MAX_IDLE_PER_KEY + 5 {
            let (up, k) = conn(true);
            keep.push(k);
            pool.put(key(), up, IDLE_TIMEOUT);
        }
        assert_eq!(pool.idle_count(), MAX_IDLE_PER_KEY);
    }
}
