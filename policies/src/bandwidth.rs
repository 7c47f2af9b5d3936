//! Bandwidth shaping: a token bucket that async copy loops consult before sending a chunk.
//!
//! Time comes from tokio's clock, so tests can pause and advance it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Smallest bucket, in bytes. Copy loops move chunks of up to 16 KiB; a smaller bucket would
/// make every chunk wait even far below the rate.
pub const MIN_BURST: u64 = 16 * 1024;

/// A bytes-per-second token bucket. Callers *reserve* bytes and then wait out the debt, so a
/// chunk larger than the bucket is still allowed, just delayed in proportion.
///
/// Its rate can change while connections use it (a policy edit): it is read from a shared
/// cell at every reservation, 0 meaning unlimited.
#[derive(Debug)]
pub struct TokenBucket {
    rate: Arc<AtomicU64>,
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    /// May go negative: bytes already promised beyond what has been earned.
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket refilling at `bytes_per_sec` that holds a tenth of a second (at least
    /// [`MIN_BURST`]): small enough that the long-run rate is what the user wrote.
    pub fn new(bytes_per_sec: u64) -> Self {
        Self::following(Arc::new(AtomicU64::new(bytes_per_sec.max(1))))
    }

    /// A bucket refilling at whatever `rate` says (bytes per second; 0: unlimited), starting
    /// full.
    pub fn following(rate: Arc<AtomicU64>) -> Self {
        let tokens = capacity(rate.load(Ordering::Relaxed) as f64);
        TokenBucket {
            rate,
            state: Mutex::new(BucketState {
                tokens,
                last: Instant::now(),
            }),
        }
    }

    /// The rate now (0: unlimited).
    pub fn bytes_per_sec(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Changes the rate for every connection using the bucket (0: unlimited).
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// Takes `n` bytes now and returns how long the caller must wait before sending them.
    pub fn reserve(&self, n: u64) -> Duration {
        let rate = self.rate.load(Ordering::Relaxed);
        wait_for(self.owed_after(n), rate)
    }

    /// Takes `n` bytes now; returns how many bytes the bucket must earn before the caller may
    /// send them (0: at once; also 0 while unlimited).
    fn owed_after(&self, n: u64) -> f64 {
        let rate = self.rate.load(Ordering::Relaxed) as f64;
        if rate == 0.0 {
            return 0.0;
        }
        let capacity = capacity(rate);
        let now = Instant::now();
        // A poisoned lock only means another task panicked mid-update of two floats; the
        // state is still usable.
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let earned = now.saturating_duration_since(s.last).as_secs_f64() * rate;
        s.tokens = (s.tokens + earned).min(capacity);
        s.last = now;
        s.tokens -= n as f64;
        (-s.tokens).max(0.0)
    }

    /// Takes `n` bytes if the bucket holds them now, else nothing: for datagrams, which are
    /// dropped past the rate rather than delayed (a queue would only add latency to a game
    /// or a call, and the sender's own rate control reads loss).
    pub fn try_take(&self, n: u64) -> bool {
        let rate = self.rate.load(Ordering::Relaxed) as f64;
        if rate == 0.0 {
            return true;
        }
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let earned = now.saturating_duration_since(s.last).as_secs_f64() * rate;
        s.tokens = (s.tokens + earned).min(capacity(rate));
        s.last = now;
        if s.tokens >= n as f64 {
            s.tokens -= n as f64;
            true
        } else {
            false
        }
    }

    /// Returns `n` bytes [`TokenBucket::try_take`] took for a datagram that did not go after
    /// all (up to what the bucket holds).
    pub fn give_back(&self, n: u64) {
        let rate = self.rate.load(Ordering::Relaxed) as f64;
        if rate == 0.0 {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.tokens = (s.tokens + n as f64).min(capacity(rate));
    }

    /// Waits until `n` bytes may be sent. Cancel-safe in the sense that dropping the future
    /// keeps the reservation: the bucket errs on the slow side, never the fast one.
    pub async fn consume(&self, n: u64) {
        let owed = self.owed_after(n);
        wait_out(&mut [(owed, &self.rate)]).await;
    }
}

/// How long a waiter sleeps at most before it looks at the rate again: a policy edit raising
/// or removing a rate reaches connections already waiting within this. (A wait worked out
/// once, at a typo's `1KB/s` shared by 20 connections, lasted minutes after the fix.)
const RECHECK: Duration = Duration::from_secs(1);

/// What taking `n` bytes from `bucket` leaves owed, and its rate; an absent bucket owes
/// nothing (its "rate" says unlimited).
fn owed_of(bucket: Option<&TokenBucket>, n: u64) -> (f64, &AtomicU64) {
    static NONE: AtomicU64 = AtomicU64::new(0);
    bucket.map_or((0.0, &NONE), |b| (b.owed_after(n), &*b.rate))
}

/// How long earning `owed` bytes takes at `rate` bytes per second (0: unlimited).
fn wait_for(owed: f64, rate: u64) -> Duration {
    if rate == 0 || owed <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(owed / rate as f64).unwrap_or(Duration::MAX)
}

/// Waits until each bucket has earned what is owed to it, at its rate as it is now: the
/// rate is read again at least every [`RECHECK`], so a raised rate shortens the wait and
/// an unlimited one ends it.
async fn wait_out(owed: &mut [(f64, &AtomicU64)]) {
    loop {
        let wait = owed
            .iter()
            .map(|(bytes, rate)| wait_for(*bytes, rate.load(Ordering::Relaxed)))
            .max()
            .unwrap_or(Duration::ZERO);
        if wait.is_zero() {
            return;
        }
        let before = Instant::now();
        tokio::time::sleep(wait.min(RECHECK)).await;
        let slept = before.elapsed().as_secs_f64();
        for (bytes, rate) in owed.iter_mut() {
            *bytes -= slept * rate.load(Ordering::Relaxed) as f64;
        }
    }
}

/// What a bucket of `rate` bytes per second holds: a tenth of a second, at least [`MIN_BURST`].
fn capacity(rate: f64) -> f64 {
    (rate / 10.0).max(MIN_BURST as f64)
}

/// The shaping of one connection in one direction: the app-wide bucket (shared by all its
/// connections) and the connection's own bucket, whichever is slower.
#[derive(Debug, Default)]
pub struct Shaper {
    app: Option<Arc<TokenBucket>>,
    conn: Option<TokenBucket>,
}

impl Shaper {
    pub fn new(app: Option<Arc<TokenBucket>>, per_connection: Option<u64>) -> Self {
        Shaper {
            app,
            conn: per_connection.map(TokenBucket::new),
        }
    }

    /// As [`Shaper::new`], the connection's own bucket following the rate in `per_connection`
    /// (an app's `bandwidth_per_connection`, which a policy edit changes for open connections
    /// too).
    pub fn following(
        app: Option<Arc<TokenBucket>>,
        per_connection: Option<&Arc<AtomicU64>>,
    ) -> Self {
        Shaper {
            app,
            conn: per_connection.map(|r| TokenBucket::following(r.clone())),
        }
    }

    /// No limit at all: copy loops can skip the call.
    pub fn is_unlimited(&self) -> bool {
        self.app.is_none() && self.conn.is_none()
    }

    /// [`TokenBucket::try_take`] on this connection's buckets: whether `n` bytes may pass
    /// now. The connection's own first, and given back when the app's refuses: a client
    /// flooding past its own limit spent the app's budget on datagrams its own bucket then
    /// dropped, and every other client's were dropped for it.
    pub fn try_take(&self, n: u64) -> bool {
        if !self.conn.as_ref().is_none_or(|b| b.try_take(n)) {
            return false;
        }
        if self.app.as_ref().is_none_or(|b| b.try_take(n)) {
            return true;
        }
        if let Some(c) = &self.conn {
            c.give_back(n);
        }
        false
    }

    /// Returns what [`Shaper::try_take`] took for `n` bytes that did not go after all (the
    /// tunnel refused the datagram): it must not spend the app's budget.
    pub fn give_back(&self, n: u64) {
        if let Some(b) = &self.app {
            b.give_back(n);
        }
        if let Some(b) = &self.conn {
            b.give_back(n);
        }
    }

    /// Waits until `n` bytes may be sent on this connection.
    pub async fn consume(&self, n: u64) {
        wait_out(&mut [
            owed_of(self.app.as_deref(), n),
            owed_of(self.conn.as_ref(), n),
        ])
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    /// Sends `chunk`-byte pieces through `shaper` for `secs` of (paused) time; returns bytes.
    async fn pump(shaper: &Shaper, chunk: u64, secs: u64) -> u64 {
        let start = Instant::now();
        let mut sent = 0;
        loop {
            shaper.consume(chunk).await;
            if start.elapsed() >= Duration::from_secs(secs) {
                return sent;
            }
            sent += chunk;
        }
    }

    fn within(actual: u64, expected: u64, pct: f64) -> bool {
        (actual as f64 - expected as f64).abs() <= expected as f64 * pct
    }

    #[tokio::test(start_paused = true)]
    async fn per_connection_rate_within_ten_percent_over_5s() {
        let s = Shaper::new(None, Some(MIB));
        let sent = pump(&s, 16 * 1024, 5).await;
        assert!(within(sent, 5 * MIB, 0.10), "sent {sent}");
    }

    #[tokio::test(start_paused = true)]
    async fn big_chunks_are_delayed_not_refused() {
        let s = Shaper::new(None, Some(2 * MIB));
        let sent = pump(&s, 3 * MIB, 5).await;
        assert!(within(sent, 10 * MIB, 0.35), "sent {sent}");
    }

    #[tokio::test(start_paused = true)]
    async fn app_bucket_is_shared_by_connections() {
        let app = Arc::new(TokenBucket::new(MIB));
        let a = Shaper::new(Some(app.clone()), None);
        let b = Shaper::new(Some(app), Some(10 * MIB));
        let (x, y) = tokio::join!(pump(&a, 8 * 1024, 5), pump(&b, 8 * 1024, 5));
        assert!(within(x + y, 5 * MIB, 0.10), "sent {x} + {y}");
        assert!(x > MIB && y > MIB, "both progress: {x} {y}");
    }

    /// A client flooding past its own per-connection limit spends only its own bucket: the
    /// app's budget stays for the others (it was spent first, then the connection's bucket
    /// refused). What the tunnel refused after the take is given back.
    #[tokio::test(start_paused = true)]
    async fn a_flooding_flow_spends_its_own_bucket_not_the_apps() {
        let app = Arc::new(TokenBucket::new(10 * MIB));
        let flood = Shaper::new(Some(app.clone()), Some(MIB));
        let other = Shaper::new(Some(app.clone()), Some(10 * MIB));
        let start = Instant::now();
        let (mut flood_taken, mut other_taken) = (0u64, 0u64);
        while start.elapsed() < Duration::from_secs(5) {
            for _ in 0..100 {
                if flood.try_take(1200) {
                    flood_taken += 1200;
                }
            }
            if other.try_take(1200) {
                other_taken += 1200;
            }
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        // The flood gets its own rate; the other client all it asked (one per millisecond).
        assert!(
            within(flood_taken, 5 * MIB, 0.10),
            "flood took {flood_taken}"
        );
        assert!(
            other_taken >= 4_900 * 1200,
            "the other client took {other_taken}"
        );
        // A refused send given back: the app's bucket is whole again.
        let full = Shaper::new(Some(app), None);
        while full.try_take(1200) {}
        full.give_back(1200);
        assert!(full.try_take(1200));
        assert!(!full.try_take(1200));
    }

    /// A rate raised or removed while connections wait (a typo's `1KB/s` fixed) reaches
    /// them within a second: the waits worked out at the old rate are not slept out.
    #[tokio::test(start_paused = true)]
    async fn waiters_follow_a_changed_rate() {
        let rate = Arc::new(AtomicU64::new(1024));
        let app = Arc::new(TokenBucket::following(rate.clone()));
        // Twenty connections reserve a chunk each: the last waits ~5 minutes at 1 KiB/s.
        let waiters: Vec<_> = (0..20)
            .map(|_| {
                let s = Shaper::new(Some(app.clone()), None);
                tokio::spawn(async move { s.consume(16 * 1024).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let start = Instant::now();
        app.set_rate(MIB);
        for w in waiters {
            w.await.expect("waiter");
        }
        // 20 × 16 KiB at 1 MiB/s is 0.3 s; the rate is looked at again within a second.
        assert!(
            start.elapsed() <= Duration::from_millis(1400),
            "released after {:?}",
            start.elapsed()
        );

        // Removed (0: unlimited) while both buckets of a connection hold it back.
        let conn_rate = Arc::new(AtomicU64::new(1024));
        rate.store(1024, Ordering::Relaxed);
        let s = Arc::new(Shaper::following(Some(app.clone()), Some(&conn_rate)));
        let w = tokio::spawn({
            let s = s.clone();
            async move {
                for _ in 0..10 {
                    s.consume(16 * 1024).await;
                }
            }
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        let start = Instant::now();
        rate.store(0, Ordering::Relaxed);
        conn_rate.store(0, Ordering::Relaxed);
        w.await.expect("waiter");
        assert!(
            start.elapsed() <= Duration::from_secs(1),
            "released after {:?}",
            start.elapsed()
        );
    }

    /// Datagrams past the rate are refused, not delayed: over five seconds the bytes taken
    /// are the rate's (plus the burst), whatever is offered.
    #[tokio::test(start_paused = true)]
    async fn try_take_passes_the_rate_and_refuses_the_rest() {
        let s = Shaper::new(Some(Arc::new(TokenBucket::new(MIB))), None);
        let (mut taken, mut refused) = (0u64, 0u64);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            for _ in 0..10 {
                match s.try_take(1200) {
                    true => taken += 1200,
                    false => refused += 1,
                }
            }
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert!(within(taken, 5 * MIB, 0.05), "taken {taken}");
        assert!(refused > 0);
        assert!(Shaper::default().try_take(u64::MAX));
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_waits() {
        let s = Shaper::default();
        assert!(s.is_unlimited());
        let start = Instant::now();
        for _ in 0..1000 {
            s.consume(MIB).await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
