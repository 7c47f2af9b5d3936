//! Runtime limiters of one app: keyed rate limits (governor), connection counts with RAII
//! guards, bandwidth buckets and the body size limit.
//!
//! Memory is bounded: the rate limiter forgets keys whose state is back to "fresh"
//! ([`RateLimiter::maintain`], also run when the table is full) and never holds more than
//! `max_keys` keys; past that, new clients share [`OVERFLOW_BUCKETS`] overflow buckets, one
//! per network by a keyed hash, so one network that fills the table (an IPv6 /48 holds 65,536
//! /64 keys) drains its own bucket, not every newcomer's. Connection counters only hold
//! entries for open connections.

use crate::bandwidth::{Shaper, TokenBucket};
use crate::eval::Requester;
use crate::model::{LimitsConfig, RateLimit};
use crate::schema::Per;
use dashmap::DashMap;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, StateStore};
use governor::Quota;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Default bound on keys per rate limiter. About 100 bytes per key, so ~6.5 MB at most per
/// app: enough for every real client of a personal cloud, small enough for a cheap VPS.
pub const DEFAULT_MAX_KEYS: usize = 65_536;

/// Overflow buckets of a full table. A client's network (IPv6 /48, IPv4 /24) picks one by a
/// hash keyed per limiter, so a network cannot choose to land on another's bucket.
pub const OVERFLOW_BUCKETS: u8 = 64;

/// How often a full table may be swept on the request path; sweeping is O(keys).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// governor clock on top of tokio's clock, so tests can pause time.
#[derive(Debug, Clone)]
pub struct TokioClock {
    start: tokio::time::Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock {
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;
    fn now(&self) -> Nanos {
        self.start.elapsed().into()
    }
}

/// What a rate limit counts against. Cheap to copy and hash; no allocation per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKey {
    Ip(IpAddr),
    /// A device, by a fixed hash of its name (device names come from the zone, not from
    /// attackers, so collisions are not a concern).
    Device(u64),
    App,
    /// Shared by new clients of one [`RateLimiter::overflow_key`] bucket while the table is
    /// full.
    Overflow(u8),
}

impl LimitKey {
    /// The key `per` selects for `who`. IPv6 clients count per /64: one subscriber usually
    /// holds a whole /64, so per-address keys would be trivially evaded.
    pub fn for_requester(per: Per, who: &Requester<'_>) -> Self {
        match (per, who) {
            (Per::App, _) => LimitKey::App,
            (Per::Device, Requester::Device { name, .. }) => LimitKey::Device(name_hash(name)),
            (_, w) => match w.ip() {
                Some(ip) => LimitKey::client_ip(ip),
                None => match w {
                    Requester::Device { name, .. } => LimitKey::Device(name_hash(name)),
                    Requester::Public { .. } => LimitKey::App,
                },
            },
        }
    }

    pub fn client_ip(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => LimitKey::Ip(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => LimitKey::Ip(IpAddr::V4(v4)),
                None => {
                    let bits = u128::from(v6) & !((1u128 << 64) - 1);
                    LimitKey::Ip(IpAddr::V6(bits.into()))
                }
            },
        }
    }
}

fn name_hash(name: &str) -> u64 {
    // SipHash with fixed keys: stable across the process, no allocation.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    name.hash(&mut h);
    h.finish()
}

/// governor state store that shares its map with us, so we can count and probe keys.
#[derive(Debug, Clone, Default)]
struct SharedStore(Arc<DashMap<LimitKey, InMemoryState>>);

impl StateStore for SharedStore {
    type Key = LimitKey;
    fn measure_and_replace<T, F, E>(&self, key: &LimitKey, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<LimitKey> for SharedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        self.0.retain_recent(drop_below)
    }
    fn shrink_to_fit(&self) {
        ShrinkableKeyedStateStore::shrink_to_fit(&*self.0)
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Refused by a rate limit; retry after this long (the HTTP front sends it as `Retry-After`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limited; retry after {0:?}")]
pub struct RetryAfter(pub Duration);

/// A keyed GCRA rate limiter with a bounded number of keys.
#[derive(Debug)]
pub struct RateLimiter {
    inner: governor::RateLimiter<LimitKey, SharedStore, TokioClock, NoOpMiddleware<Nanos>>,
    store: SharedStore,
    clock: TokioClock,
    max_keys: usize,
    /// Keys the overflow bucket hash (per limiter, random).
    overflow_hash: RandomState,
    last_sweep: AtomicU64,
    pub config: RateLimit,
    /// Time one request's token takes to come back.
    cell: std::time::Duration,
    /// The clock reading governor's stored times (each key's theoretical arrival time) count
    /// from.
    started: i64,
    /// For a limiter that replaced another on a policy reload: the clients the other held,
    /// each with the clock reading (of this limiter's clock) at which its bucket counts as
    /// empty, refilling at the rate since: for those in the other's table, the moment that
    /// leaves them lacking at the reload what they lacked there; for those the other still
    /// counted so from an earlier reload, that one's. Editing a policy gives no client
    /// that was using it a fresh burst, and a client away over several edits is not charged
    /// afresh at each; a client never seen starts full, as it would have there.
    /// Dropped once a whole burst has refilled since the latest (nothing is missing from any
    /// bucket then).
    empty_at: arc_swap::ArcSwapOption<EmptyAt>,
}

/// Clients whose buckets count as empty from a moment each (see [`RateLimiter::empty_at`]),
/// in nanoseconds of the limiter's clock: negative for moments before it started (a client
/// carried over from an earlier edit).
#[derive(Debug)]
struct EmptyAt {
    /// The latest of the moments.
    latest: i64,
    keys: HashMap<LimitKey, i64>,
    /// Every client not in `keys` counts as empty from this moment: the edit changed what a
    /// client is (`per`), so the old table's keys name none of the new ones, and those in use
    /// would otherwise each start a fresh burst.
    others: Option<i64>,
}

/// A reading of a limiter's clock, signed (see [`EmptyAt`]).
fn signed(n: Nanos) -> i64 {
    i64::try_from(n.as_u64()).unwrap_or(i64::MAX)
}

impl RateLimiter {
    pub fn new(config: RateLimit) -> Self {
        Self::with_max_keys(config, DEFAULT_MAX_KEYS)
    }

    pub fn with_max_keys(config: RateLimit, max_keys: usize) -> Self {
        let one = NonZeroU32::MIN;
        // Above 10^9 per second the period rounds to 0 ns, which governor refuses (the
        // fallback below would have made it 1/s): 1 ns is as good as unlimited.
        let period =
            (config.rate.period / config.rate.count.max(1)).max(std::time::Duration::from_nanos(1));
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(one))
            .allow_burst(NonZeroU32::new(config.burst).unwrap_or(one));
        let store = SharedStore::default();
        let clock = TokioClock::default();
        // Read just before governor reads its own: what its stored times count from.
        let started = signed(clock.now());
        RateLimiter {
            inner: governor::RateLimiter::new(quota, store.clone(), clock.clone()),
            started,
            store,
            clock,
            // Room for the overflow buckets and as many clients of their own.
            max_keys: max_keys.max(2 * OVERFLOW_BUCKETS as usize),
            overflow_hash: RandomState::new(),
            last_sweep: AtomicU64::new(0),
            config,
            cell: period,
            empty_at: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// A limiter for `config` replacing `old` on a policy reload: a client `old` holds keeps
    /// what its bucket lacked there (up to the new burst), refilling at the new rate — no
    /// fresh burst, and none of what it had left taken away (they started empty, so raising
    /// a limit throttled exactly the clients using the app); a client `old` never saw starts
    /// full, as it would have there — unless the edit changed `per`, when every client counts
    /// as empty (the old keys name none).
    pub fn new_replacing(config: RateLimit, old: &RateLimiter) -> Self {
        Self::replacing_since(config, old, std::time::Duration::ZERO)
    }

    /// [`RateLimiter::new_replacing`] for `old` removed `gone` ago (an edit that took the
    /// limit out, and one now that puts it back): its clients count as empty from then, so
    /// the time since has refilled them.
    fn replacing_since(config: RateLimit, old: &RateLimiter, gone: std::time::Duration) -> Self {
        let mut r = Self::new(config);
        let now = signed(r.clock.now());
        let emptied = now.saturating_sub(i64::try_from(gone.as_nanos()).unwrap_or(i64::MAX));
        let mut keys: HashMap<LimitKey, i64> = HashMap::new();
        let mut others = None;
        // Those `old` itself still counted as empty from an edit before (not back since, so
        // not in its table), from when they were: two edits in a row, or an edit undone,
        // gave them a full bucket; counted from this edit instead, an idle client lost most
        // of what it had refilled since. Only while a whole burst has not refilled since.
        if let Some(prev) = old.empty_at.load_full() {
            let old_now = signed(old.clock.now());
            let refill = i64::try_from(old.cell.as_nanos())
                .unwrap_or(i64::MAX)
                .saturating_mul(i64::from(old.config.burst.max(1)));
            for (key, at) in &prev.keys {
                let ago = old_now.saturating_sub(*at);
                if ago < refill {
                    keys.insert(*key, now.saturating_sub(ago));
                }
            }
            others = prev
                .others
                .map(|at| old_now.saturating_sub(at))
                .filter(|ago| *ago < refill)
                .map(|ago| now.saturating_sub(ago));
            // Bounded like a table: past it, the ones emptied longest ago (most refilled) go.
            if keys.len() > r.max_keys {
                let mut by_age: Vec<(LimitKey, i64)> = keys.drain().collect();
                by_age.sort_unstable_by_key(|(_, at)| std::cmp::Reverse(*at));
                by_age.truncate(r.max_keys);
                keys.extend(by_age);
            }
        }
        // What each client of `old`'s table lacked when it was removed (now, on a plain
        // edit), as the moment its bucket here counts as empty from: as many cells of the
        // new rate before then as it still had tokens.
        let old_then = signed(old.clock.now())
            .saturating_sub(i64::try_from(gone.as_nanos()).unwrap_or(i64::MAX));
        let new_cell = i64::try_from(r.cell.as_nanos()).unwrap_or(i64::MAX).max(1);
        let new_burst = u64::from(r.config.burst.max(1));
        let old_keys: Vec<LimitKey> = old.store.0.iter().map(|e| *e.key()).collect();
        for key in old_keys {
            let Some(lacked) = old.lacked(&key, old_then).filter(|n| *n > 0) else {
                // Full there: full here, whatever an earlier edit said.
                keys.remove(&key);
                continue;
            };
            let had = new_burst.saturating_sub(lacked);
            let since = i64::try_from(had)
                .unwrap_or(i64::MAX)
                .saturating_mul(new_cell);
            keys.insert(key, emptied.saturating_sub(since));
        }
        // Another kind of key (`per` edited) while the old table was in use: its keys name
        // none of the new ones, so every client counts as empty from now.
        if old.config.per != config.per && !old.store.0.is_empty() {
            others = Some(emptied);
        }
        let latest = keys.values().copied().chain(others).max().unwrap_or(now);
        r.empty_at = arc_swap::ArcSwapOption::from_pointee(EmptyAt {
            latest,
            keys,
            others,
        });
        r
    }

    /// How many tokens `key`'s bucket lacked at clock reading `at` (0 when full, at most
    /// the burst); None for a key not in the table.
    fn lacked(&self, key: &LimitKey, at: i64) -> Option<u64> {
        // Looked up first: measuring an absent key would add it.
        if !self.store.0.contains_key(key) {
            return None;
        }
        // Read, and put back as it was.
        let tat = self
            .store
            .measure_and_replace(key, |tat| {
                Ok::<_, std::convert::Infallible>((tat, tat.unwrap_or_else(|| Nanos::from(0))))
            })
            .unwrap_or_else(|never| match never {})?;
        // The bucket is full again at its theoretical arrival time; each cell before it is
        // a token missing.
        let ahead = signed(tat).saturating_add(self.started).saturating_sub(at);
        let cell = u64::try_from(self.cell.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let lacked = u64::try_from(ahead).unwrap_or(0).div_ceil(cell);
        Some(lacked.min(u64::from(self.config.burst.max(1))))
    }

    /// How long a whole burst takes to refill: a limiter left unused for that long holds
    /// nothing a replacement needs to carry over.
    fn full_refill(&self) -> std::time::Duration {
        self.cell.saturating_mul(self.config.burst.max(1))
    }

    /// Counts one request for `key`.
    pub fn check(&self, key: LimitKey) -> Result<(), RetryAfter> {
        self.check_keyed(key).map(drop)
    }

    /// Gives back the token one request of `key` (the key it was counted against, from
    /// [`RateLimiter::check_keyed`]) took, for a request refused after all: its bucket's
    /// theoretical arrival time goes back one cell. Never more than a full bucket (an
    /// arrival time before now is a full bucket already); a key gone from the table (swept:
    /// full) is left so.
    pub fn give_back(&self, key: LimitKey) {
        if !self.store.0.contains_key(&key) {
            return;
        }
        let cell = Nanos::from(u64::try_from(self.cell.as_nanos()).unwrap_or(u64::MAX));
        let _ = self.store.measure_and_replace(&key, |tat| {
            Ok::<_, std::convert::Infallible>((
                (),
                tat.map_or(Nanos::from(0), |t| t.saturating_sub(cell)),
            ))
        });
    }

    /// [`RateLimiter::check`], with the key the request was counted against (an overflow
    /// bucket's while the table is full).
    fn check_keyed(&self, key: LimitKey) -> Result<LimitKey, RetryAfter> {
        let mut key = key;
        // Slots stay free for the overflow keys themselves, so `len() <= max_keys` holds.
        let full = |s: &Self| s.store.0.len() >= s.max_keys - OVERFLOW_BUCKETS as usize;
        if !self.store.0.contains_key(&key) && full(self) {
            self.sweep_if_due();
            if full(self) {
                key = self.overflow_key(key);
            }
        }
        if let Some(empty) = self.empty_at.load().as_deref() {
            if !self.drain_new_key(&key, empty) {
                self.empty_at.store(None);
            }
        }
        self.inner
            .check_key(&key)
            .map(|()| key)
            .map_err(|nu| RetryAfter(nu.wait_time_from(self.clock.now())))
    }

    /// For a key this limiter has not seen yet that counts as empty from a moment (`empty`):
    /// sets its bucket to where one empty since then is now. False once a whole burst has
    /// refilled since the latest of those moments: nothing is missing any more.
    fn drain_new_key(&self, key: &LimitKey, empty: &EmptyAt) -> bool {
        let now = signed(self.clock.now());
        let cell = i64::try_from(self.cell.as_nanos())
            .unwrap_or(i64::MAX)
            .max(1);
        // The moment a bucket empty at `at` is full again: a whole burst of cells later.
        let full_at =
            |at: i64| at.saturating_add(cell.saturating_mul(i64::from(self.config.burst.max(1))));
        // Once a whole burst has refilled since the edit (the usual case, soon after it),
        // nothing is missing: no table lookup per request.
        if full_at(empty.latest) <= now {
            return false;
        }
        if self.store.0.contains_key(key) {
            return true;
        }
        let Some(at) = empty.keys.get(key).copied().or(empty.others) else {
            return true;
        };
        // The bucket's state is set to exactly that of one empty at `at`: its theoretical
        // arrival time is when it is full again (governor's cell-rate algorithm lets
        // `(now - at) / cell` requests through, rounded down). Taking whole tokens instead
        // rounded the time since up: every edit granted a token more, with a burst of 1 a
        // whole fresh burst (1/h edited to 2/h and back, again and again: a request each).
        let full = full_at(at);
        let tat = full.saturating_sub(self.started);
        if full > now && tat > 0 {
            let tat = Nanos::from(u64::try_from(tat).unwrap_or(0));
            // Only while absent: a request of the same client that got in first has counted
            // itself against what it found.
            let _ = self.store.measure_and_replace(key, |was| {
                Ok::<_, std::convert::Infallible>(((), was.unwrap_or(tat)))
            });
        }
        true
    }

    /// The overflow bucket `key` shares while the table is full: by its network, so the
    /// clients of one network share one bucket and other networks mostly others.
    pub fn overflow_key(&self, key: LimitKey) -> LimitKey {
        let network: u128 = match key {
            LimitKey::Ip(IpAddr::V4(v4)) => u128::from(u32::from(v4) >> 8),
            LimitKey::Ip(IpAddr::V6(v6)) => (u128::from(v6) >> 80) | (1 << 64),
            LimitKey::Device(h) => u128::from(h) | (2 << 64),
            LimitKey::App | LimitKey::Overflow(_) => 3 << 64,
        };
        LimitKey::Overflow((self.overflow_hash.hash_one(network) % OVERFLOW_BUCKETS as u64) as u8)
    }

    fn sweep_if_due(&self) {
        let now = self.clock.now().as_u64();
        let last = self.last_sweep.load(Ordering::Relaxed);
        let due = now.saturating_sub(last) >= SWEEP_INTERVAL.as_nanos() as u64 || last == 0;
        if due
            && self
                .last_sweep
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.maintain();
        }
    }

    /// Forgets keys whose limit has fully recovered (they behave exactly like unknown keys)
    /// and releases memory. Call periodically; also called when the table is full.
    pub fn maintain(&self) {
        self.inner.retain_recent();
        self.inner.shrink_to_fit();
    }

    /// Keys currently tracked.
    pub fn len(&self) -> usize {
        self.store.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.store.0.is_empty()
    }
}

/// Refused by a connection limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnLimitExceeded {
    #[error("the app has reached its max_connections")]
    App,
    #[error("the client has reached max_connections_per_client")]
    Client,
}

/// Open-connection counts of an app, total and per client.
#[derive(Debug, Default)]
pub struct ConnLimiter {
    /// The limits, 0 for none (a policy never sets 0): atomics so a reload can change them
    /// while the counts of open connections carry on ([`AppLimits::reloaded`]).
    max_total: AtomicU32,
    max_per_client: AtomicU32,
    total: AtomicU32,
    per_client: Mutex<HashMap<LimitKey, u32>>,
}

impl ConnLimiter {
    pub fn new(max_total: Option<u32>, max_per_client: Option<u32>) -> Self {
        let limiter = ConnLimiter::default();
        limiter.set_limits(max_total, max_per_client);
        limiter
    }

    /// Changes the limits; connections open now stay counted. (Per-client counts are kept only
    /// while a per-client limit is set: a limit set by a reload counts the connections opened
    /// after it.)
    pub fn set_limits(&self, max_total: Option<u32>, max_per_client: Option<u32>) {
        self.max_total
            .store(max_total.unwrap_or(0), Ordering::Release);
        self.max_per_client
            .store(max_per_client.unwrap_or(0), Ordering::Release);
    }

    /// Admits one connection from `client` (use [`LimitKey::client_ip`] or
    /// [`LimitKey::for_requester`]). The guard releases it on drop.
    pub fn try_acquire(self: &Arc<Self>, client: LimitKey) -> Result<ConnGuard, ConnLimitExceeded> {
        let max = match self.max_total.load(Ordering::Acquire) {
            0 => u32::MAX,
            n => n,
        };
        self.total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| ConnLimitExceeded::App)?;
        let mut guard = ConnGuard {
            limiter: self.clone(),
            client: None,
        };
        let per = self.max_per_client.load(Ordering::Acquire);
        if per > 0 {
            let mut map = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
            let n = map.entry(client).or_insert(0);
            if *n >= per {
                drop(map);
                return Err(ConnLimitExceeded::Client); // guard drop releases the total
            }
            *n += 1;
            guard.client = Some(client);
        }
        Ok(guard)
    }

    pub fn open(&self) -> u32 {
        self.total.load(Ordering::Acquire)
    }

    /// Clients with open connections (entries are removed at zero, so this is bounded by
    /// the number of open connections).
    pub fn tracked_clients(&self) -> usize {
        self.per_client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

/// One admitted connection; dropping it frees its slots.
#[derive(Debug)]
pub struct ConnGuard {
    limiter: Arc<ConnLimiter>,
    client: Option<LimitKey>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Some(c) = self.client {
            let mut map = self
                .limiter
                .per_client
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&c);
                }
            }
        }
        self.limiter.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request's token of its app's rate ([`AppLimits::take_rate`]), to give back if the
/// request is refused after all.
#[must_use = "dropped, the token stays spent; give it back if the request is refused"]
#[derive(Debug)]
pub struct RateTaken(Option<(Arc<RateLimiter>, LimitKey)>);

impl RateTaken {
    /// The request was refused after all: its token goes back.
    pub fn give_back(self) {
        if let Some((r, key)) = self.0 {
            r.give_back(key);
        }
    }
}

/// All runtime limits of one app, built from its [`LimitsConfig`].
#[derive(Debug)]
pub struct AppLimits {
    pub config: LimitsConfig,
    pub rate: Option<Arc<RateLimiter>>,
    pub connections: Arc<ConnLimiter>,
    /// App-wide buckets, client→service and service→client, at the rate of `bandwidth` (0,
    /// unlimited, without one: kept so that connections opened under a limit follow it when
    /// it is removed and added again). New connections get them only under a limit.
    bandwidth_in: Arc<TokenBucket>,
    bandwidth_out: Arc<TokenBucket>,
    /// `bandwidth_per_connection` (0: none), as every connection's own buckets read it.
    per_connection: Arc<AtomicU64>,
    /// The rate limiter an edit removed, and when (its clock): a rate limit added back within
    /// a whole burst's refill replaces it, so commenting the limit out and back in gives no
    /// client in use a fresh burst.
    retired_rate: Option<(Arc<RateLimiter>, Nanos)>,
}

/// A rate cell: `rate` bytes per second, 0 for none.
fn rate_cell(rate: Option<u64>) -> Arc<AtomicU64> {
    Arc::new(AtomicU64::new(rate.map_or(0, |r| r.max(1))))
}

impl AppLimits {
    pub fn new(config: &LimitsConfig) -> Self {
        let bucket = || Arc::new(TokenBucket::following(rate_cell(config.bandwidth)));
        AppLimits {
            config: config.clone(),
            rate: config.rate.map(|c| Arc::new(RateLimiter::new(c))),
            connections: Arc::new(ConnLimiter::new(
                config.max_connections,
                config.max_connections_per_client,
            )),
            bandwidth_in: bucket(),
            bandwidth_out: bucket(),
            per_connection: rate_cell(config.bandwidth_per_connection),
            retired_rate: None,
        }
    }

    /// The limits for `config` replacing `old` (the same app's, under other limits) on a policy
    /// reload: open connections stay counted against the new maxima, rate limits that did not
    /// change are kept, and under a changed rate limit each client in use keeps what its
    /// bucket lacked. A reload thus never gives a client a fresh allowance. Bandwidth buckets
    /// are kept and take the new rates, open connections' included (a lowered `bandwidth`
    /// used to leave them on the old bucket, the app moving old + new); a removed limit
    /// leaves them unlimited until it comes back; connections opened without one stay
    /// unlimited.
    pub fn reloaded(config: &LimitsConfig, old: &AppLimits) -> Self {
        old.connections
            .set_limits(config.max_connections, config.max_connections_per_client);
        let rate = |r: Option<u64>| r.map_or(0, |r| r.max(1));
        old.bandwidth_in.set_rate(rate(config.bandwidth));
        old.bandwidth_out.set_rate(rate(config.bandwidth));
        old.per_connection
            .store(rate(config.bandwidth_per_connection), Ordering::Relaxed);
        // A limiter removed recently enough that some bucket has not refilled since, and
        // how long ago.
        let gone = |r: &RateLimiter, at: Nanos| {
            std::time::Duration::from(Nanos::from(
                r.clock.now().as_u64().saturating_sub(at.as_u64()),
            ))
        };
        let retired = old
            .retired_rate
            .as_ref()
            .filter(|(r, at)| gone(r, *at) < r.full_refill());
        let (rate, retired_rate) = match (&old.rate, config.rate) {
            (Some(r), Some(c)) if r.config == c => (Some(r.clone()), None),
            // A changed rate: nobody gets a fresh burst from the edit.
            (Some(r), Some(c)) => (Some(Arc::new(RateLimiter::new_replacing(c, r))), None),
            // The same rate back within a refill of its removal: the limiter itself, its
            // buckets refilled over the gap as they would have.
            (None, Some(c)) => match retired {
                Some((r, _)) if r.config == c => (Some(r.clone()), None),
                // Another: as a changed one, its clients lacking what they lacked at the
                // removal, refilled at the new rate since.
                Some((r, at)) => (
                    Some(Arc::new(RateLimiter::replacing_since(c, r, gone(r, *at)))),
                    None,
                ),
                // A rate where there was none (for long): nobody has used anything yet.
                None => (Some(Arc::new(RateLimiter::new(c))), None),
            },
            (Some(r), None) => (None, Some((r.clone(), r.clock.now()))),
            // Kept only while it may still matter (its table is emptied by `maintain` once a
            // whole burst has refilled since the removal).
            (None, None) => (None, retired.cloned()),
        };
        AppLimits {
            config: config.clone(),
            rate,
            retired_rate,
            connections: old.connections.clone(),
            bandwidth_in: old.bandwidth_in.clone(),
            bandwidth_out: old.bandwidth_out.clone(),
            per_connection: old.per_connection.clone(),
        }
    }

    /// Counts one request by `who` against the rate limit, if any.
    pub fn check_rate(&self, who: &Requester<'_>) -> Result<(), RetryAfter> {
        match &self.rate {
            Some(r) => r.check(LimitKey::for_requester(r.config.per, who)),
            None => Ok(()),
        }
    }

    /// [`AppLimits::check_rate`], keeping what it took: a request then refused by the
    /// connection limits gives it back ([`RateTaken::give_back`]), so that it spends none of
    /// the rate (a client at its `max_connections_per_client` that retried had spent it once
    /// its connection ended). Checked before the connection limits, a request the rate
    /// refuses never holds a connection slot, not even for an instant.
    pub fn take_rate(&self, who: &Requester<'_>) -> Result<RateTaken, RetryAfter> {
        match &self.rate {
            Some(r) => r
                .check_keyed(LimitKey::for_requester(r.config.per, who))
                .map(|key| RateTaken(Some((r.clone(), key)))),
            None => Ok(RateTaken(None)),
        }
    }

    /// Admits one connection by `who` (counted per client address, or per device).
    pub fn connect(&self, who: &Requester<'_>) -> Result<ConnGuard, ConnLimitExceeded> {
        self.connections
            .try_acquire(LimitKey::for_requester(Per::ClientIp, who))
    }

    /// Shapers for a new connection: (client→service, service→client).
    pub fn shapers(&self) -> (Shaper, Shaper) {
        // Unlimited connections skip shaping altogether (the copy's fast path).
        let app = |b: &Arc<TokenBucket>| self.config.bandwidth.map(|_| b.clone());
        let per = self
            .config
            .bandwidth_per_connection
            .map(|_| &self.per_connection);
        (
            Shaper::following(app(&self.bandwidth_in), per),
            Shaper::following(app(&self.bandwidth_out), per),
        )
    }

    /// Shapers for a new UDP flow: [`AppLimits::shapers`], but with both buckets attached
    /// whether or not a limit is set now (a bucket at rate 0 passes everything without a
    /// lock). A flow may last days (a VPN, a game) and takes a `bandwidth` or
    /// `bandwidth_per_connection` added later, which an unlimited stream's fast path
    /// cannot (it never looks again).
    pub fn datagram_shapers(&self) -> (Shaper, Shaper) {
        let per = Some(&self.per_connection);
        (
            Shaper::following(Some(self.bandwidth_in.clone()), per),
            Shaper::following(Some(self.bandwidth_out.clone()), per),
        )
    }

    /// Largest request body, if limited.
    pub fn max_body(&self) -> Option<u64> {
        self.config.max_body
    }

    /// Periodic housekeeping (forget recovered rate-limit keys). The removed limiter's table
    /// (up to 65,536 clients, kept in case the limit comes back) is emptied once a whole
    /// burst has refilled since the removal, when a limit coming back takes nothing from it;
    /// before, it was never swept while the app's limits stayed as the edit left them. Not
    /// swept key by key: what a client lacked is read as of the removal, and one full again
    /// now may have lacked tokens then.
    pub fn maintain(&self) {
        if let Some(r) = &self.rate {
            r.maintain();
        }
        if let Some((r, at)) = &self.retired_rate {
            let gone = r.clock.now().as_u64().saturating_sub(at.as_u64());
            if Duration::from_nanos(gone) >= r.full_refill() && !r.store.0.is_empty() {
                r.store.0.clear();
                r.store.0.shrink_to_fit();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::Rate;

    /// A token given back (a request the connection limits refused after the rate let it
    /// in) is the client's again, and no more than that: a full bucket stays full.
    #[tokio::test(start_paused = true)]
    async fn a_token_given_back_is_the_clients_again() {
        let limits = AppLimits::new(&LimitsConfig {
            rate: Some(RateLimit {
                rate: Rate {
                    count: 1,
                    period: Duration::from_secs(3600),
                },
                burst: 2,
                per: Per::ClientIp,
            }),
            ..LimitsConfig::default()
        });
        let who = Requester::Public {
            ip: IpAddr::from([198, 51, 100, 1]),
        };
        let first = limits.take_rate(&who).expect("the burst's first");
        first.give_back();
        // Both of the burst, as if the first had never come; then nothing.
        let kept: Vec<_> = (0..2)
            .map(|i| limits.take_rate(&who).unwrap_or_else(|_| panic!("{i}")))
            .collect();
        assert!(limits.take_rate(&who).is_err(), "more than the burst");
        for t in kept {
            t.give_back();
        }
        let again: Vec<_> = (0..2)
            .map(|i| {
                limits
                    .take_rate(&who)
                    .unwrap_or_else(|_| panic!("again {i}"))
            })
            .collect();
        assert!(
            limits.take_rate(&who).is_err(),
            "given back more than taken"
        );
        drop(again);
    }

    /// A rate limit an edit removed keeps its limiter (in case it comes back), but not its
    /// clients for good: the housekeeping that sweeps the app's limiter empties it once a
    /// whole burst has refilled since the removal.
    #[tokio::test(start_paused = true)]
    async fn a_removed_rate_limiters_clients_are_swept() {
        let limited = LimitsConfig {
            rate: Some(RateLimit {
                rate: Rate {
                    count: 10,
                    period: Duration::from_secs(1),
                },
                burst: 5,
                per: Per::ClientIp,
            }),
            ..LimitsConfig::default()
        };
        let before = AppLimits::new(&limited);
        let rate = before.rate.clone().expect("a rate limiter");
        for i in 0..100u8 {
            let key = LimitKey::client_ip(IpAddr::from([198, 51, 100, i]));
            assert!(rate.check(key).is_ok());
        }
        assert_eq!(rate.len(), 100);
        let after = AppLimits::reloaded(&LimitsConfig::default(), &before);
        assert!(after.rate.is_none());
        // Before a whole burst's refill (0.5 s), kept: a limit coming back reads what each
        // client lacked at the removal.
        tokio::time::advance(Duration::from_millis(300)).await;
        after.maintain();
        assert_eq!(rate.len(), 100);
        // After it, nobody lacked anything a limit coming back could read.
        tokio::time::advance(Duration::from_millis(700)).await;
        after.maintain();
        assert_eq!(rate.len(), 0, "the removed limiter's clients were kept");
    }
}
