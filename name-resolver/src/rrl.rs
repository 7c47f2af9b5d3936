//! Response rate limiting for answers over UDP, where a query's source address can be forged:
//! without it, anyone can make this server send its answers (several times the query's size)
//! to a victim. Each client network (IPv4 /24, IPv6 /56: one subscriber or resolver farm) gets
//! [`RATE`] answers per second of each [`Response`] (the same records, NXDOMAIN, an error)
//! with a burst of [`BURST`]; past that, every [`SLIP`]th answer goes out empty with TC set
//! (small, and a real resolver asks again over TCP, which cannot be forged) and the others
//! are dropped: the scheme of BIND's and Knot's RRL. Per response, not per network alone: a
//! flood forged from a resolver's address spends the rate of the answer it asks for, and the
//! resolver still gets every other name of the zone. And per network over all its answers
//! ([`ALL_RATE`], BIND's `all-per-second`): a zone with 30 devices has ~100 answers to ask
//! for, and a flood turning through them drew 100 times the rate towards one victim. TCP answers are not limited here (the
//! TCP server bounds connections), nor answers to loopback clients. Sans-IO: the caller
//! passes the time.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::rr::{LowerName, RecordType};

/// Answers per second one network gets of one [`Response`] over UDP. A resolver caches an
/// answer for its TTL, so it asks a name a few times a second at most; this leaves room for
/// a busy resolver farm behind one /24.
pub const RATE: u32 = 100;
/// Answers a network may get at once beyond the rate.
pub const BURST: u32 = 200;
/// Answers per second one network gets over UDP of all answers together: four answers'
/// rates (a resolver farm asking many names at once), not one per name of the zone.
pub const ALL_RATE: u32 = 4 * RATE;
/// Answers a network may get at once beyond [`ALL_RATE`].
pub const ALL_BURST: u32 = 4 * BURST;
/// Of the answers over the limit, every SLIP-th is sent empty with TC (a client that is real
/// retries over TCP); the rest are dropped.
pub const SLIP: u32 = 2;
/// Buckets tracked at most (~56 bytes each; two a network that asks one answer, its
/// answer's and its total's); past that, newcomers are slipped or dropped as if over a limit
/// until idle ones are forgotten.
pub const MAX_ENTRIES: usize = 65_536;

/// Which answer one is, for its rate (BIND's keys): the same records of a name and type,
/// answers made from the wildcard being the wildcard's (random names under it must not get
/// an allowance each); any empty answer of a name, whatever the type asked (a flood turning
/// through types likewise); any NXDOMAIN of the zone; any error (REFUSED, FORMERR, NOTIMP,
/// BADVERS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Response<'a> {
    Records(&'a LowerName, RecordType),
    Empty(&'a LowerName),
    NxDomain,
    Error,
}

/// What to do with one UDP answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Send,
    /// Send it empty, with TC.
    Slip,
    Drop,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// Answers over the limit so far, for the slip count.
    limited: u32,
}

/// Token buckets per network and response ([`RATE`], [`BURST`]).
#[derive(Debug, Default)]
pub struct ResponseLimiter {
    state: Mutex<State>,
    /// Keyed per process: a flood cannot pick names whose answers share a bucket with one
    /// it means to starve.
    keys: std::collections::hash_map::RandomState,
    /// Answers slipped and dropped since [`ResponseLimiter::take_counts`], for the log.
    slipped: std::sync::atomic::AtomicU64,
    dropped: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    buckets: HashMap<Key, Bucket>,
    /// When the full table was last swept for refilled networks (at most every
    /// [`SWEEP_EVERY`]: a sweep walks every entry under the lock).
    swept: Option<Instant>,
    /// Answers to networks left out of a full table: slipped or dropped like answers over a
    /// limit, on one count.
    overflow: u32,
}

/// A bucket: one answer of a network's, or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Answer(Network, u64),
    All(Network),
}

impl Key {
    /// Its (rate, burst).
    fn limits(self) -> (u32, u32) {
        match self {
            Key::Answer(..) => (RATE, BURST),
            Key::All(_) => (ALL_RATE, ALL_BURST),
        }
    }
}

/// Least time between two sweeps of a full table.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// A client's network: the first 3 bytes of an IPv4 address, 7 of an IPv6 one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Network {
    V4([u8; 3]),
    V6([u8; 7]),
}

/// `ip`'s network; an IPv4-mapped address must come as the IPv4 one ([`ResponseLimiter::admit`]
/// maps it).
fn network(ip: IpAddr) -> Network {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            Network::V4([o[0], o[1], o[2]])
        }
        IpAddr::V6(v6) => {
            let mut n = [0u8; 7];
            n.copy_from_slice(&v6.octets()[..7]);
            Network::V6(n)
        }
    }
}

impl ResponseLimiter {
    /// Counts one UDP answer, `response`, to `ip` at `now`. Loopback clients are not limited:
    /// the kernel drops packets that arrive from outside with a loopback source, so theirs
    /// cannot be forged (and local tools, dnsperf included, may ask as fast as they like).
    pub fn admit(&self, ip: IpAddr, response: Response<'_>, now: Instant) -> Verdict {
        let verdict = self.decide(ip, response, now);
        let counter = match verdict {
            Verdict::Send => return verdict,
            Verdict::Slip => &self.slipped,
            Verdict::Drop => &self.dropped,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        verdict
    }

    /// Answers slipped and dropped since the last call: an operator must be able to tell
    /// the limiter at work from packet loss.
    pub fn take_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.slipped.swap(0, Relaxed), self.dropped.swap(0, Relaxed))
    }

    fn decide(&self, ip: IpAddr, response: Response<'_>, now: Instant) -> Verdict {
        // IPv4-mapped clients (a dual-stack socket) count as the IPv4 address they are.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if ip.is_loopback() {
            return Verdict::Send;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut *state;
        let net = network(ip);
        // The answer's own rate first: over it, the network's total is not charged; over
        // the total, the answer's token comes back (the answer was not sent).
        let answer = Key::Answer(net, self.keys.hash_one(response));
        match take(state, answer, now) {
            Verdict::Send => match take(state, Key::All(net), now) {
                Verdict::Send => Verdict::Send,
                over => {
                    if let Some(b) = state.buckets.get_mut(&answer) {
                        b.tokens += 1.0;
                    }
                    over
                }
            },
            over => over,
        }
    }

    /// Buckets tracked now.
    pub fn tracked(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .buckets
            .len()
    }
}

/// Spends a token of `key`'s bucket at `now`, or counts one more answer over its limit.
fn take(state: &mut State, key: Key, now: Instant) -> Verdict {
    if !state.buckets.contains_key(&key) && state.buckets.len() >= MAX_ENTRIES {
        // Buckets that have refilled are as good as new: forget them.
        let due = state
            .swept
            .is_none_or(|at| now.checked_duration_since(at).unwrap_or_default() >= SWEEP_EVERY);
        if due {
            state.swept = Some(now);
            state
                .buckets
                .retain(|k, b| refilled(b, *k, now) < f64::from(k.limits().1));
        }
        if state.buckets.len() >= MAX_ENTRIES {
            // Full of busy entries (a flood from many networks): newcomers get the
            // over-the-limit treatment, on one shared count.
            state.overflow = state.overflow.wrapping_add(1);
            return slip_or_drop(state.overflow);
        }
    }
    let b = state.buckets.entry(key).or_insert(Bucket {
        tokens: f64::from(key.limits().1),
        at: now,
        limited: 0,
    });
    b.tokens = refilled(b, key, now);
    b.at = now;
    if b.tokens >= 1.0 {
        b.tokens -= 1.0;
        b.limited = 0;
        return Verdict::Send;
    }
    b.limited = b.limited.wrapping_add(1);
    slip_or_drop(b.limited)
}

/// The `n`th answer over a limit: every [`SLIP`]th is slipped, the rest dropped.
fn slip_or_drop(n: u32) -> Verdict {
    if n.is_multiple_of(SLIP) {
        Verdict::Slip
    } else {
        Verdict::Drop
    }
}

/// The tokens at `now` of `key`'s bucket `b` (time going backwards counts as none passed).
fn refilled(b: &Bucket, key: Key, now: Instant) -> f64 {
    let secs = now
        .checked_duration_since(b.at)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64();
    let (rate, burst) = key.limits();
    (b.tokens + secs * f64::from(rate)).min(f64::from(burst))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One answer, asked again and again.
    const R: Response<'static> = Response::NxDomain;

    #[test]
    fn a_network_gets_its_burst_then_its_rate_and_slips_every_other_answer_past_it() {
        let rrl = ResponseLimiter::default();
        let t = Instant::now();
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        for i in 0..BURST {
            assert_eq!(rrl.admit(ip, R, t), Verdict::Send, "answer {i}");
        }
        let over: Vec<Verdict> = (0..4).map(|_| rrl.admit(ip, R, t)).collect();
        assert_eq!(
            over,
            [Verdict::Drop, Verdict::Slip, Verdict::Drop, Verdict::Slip]
        );
        // The same /24 shares the bucket; another /24 has its own.
        assert_ne!(
            rrl.admit("198.51.100.200".parse().unwrap(), R, t),
            Verdict::Send
        );
        assert_eq!(
            rrl.admit("198.51.101.7".parse().unwrap(), R, t),
            Verdict::Send
        );
        // A tenth of a second later: RATE / 10 answers more.
        let later = t + Duration::from_millis(100);
        for _ in 0..RATE / 10 {
            assert_eq!(rrl.admit(ip, R, later), Verdict::Send);
        }
        assert_ne!(rrl.admit(ip, R, later), Verdict::Send);
        // Loopback is never limited (its source cannot be forged from outside).
        for _ in 0..2 * BURST {
            assert_eq!(rrl.admit("127.0.0.1".parse().unwrap(), R, t), Verdict::Send);
            assert_eq!(rrl.admit("::1".parse().unwrap(), R, t), Verdict::Send);
        }
        // IPv4-mapped clients count as the IPv4 network; IPv6 by /56.
        assert_ne!(
            rrl.admit("::ffff:198.51.100.9".parse().unwrap(), R, later),
            Verdict::Send
        );
        let v6: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        for _ in 0..BURST {
            assert_eq!(rrl.admit(v6, R, t), Verdict::Send);
        }
        assert_ne!(
            rrl.admit("2001:db8:1:ff::1".parse().unwrap(), R, t),
            Verdict::Send
        );
        assert_eq!(
            rrl.admit("2001:db8:1:100::1".parse().unwrap(), R, t),
            Verdict::Send
        );
    }

    #[test]
    fn the_table_stays_bounded_and_forgets_idle_networks() {
        let rrl = ResponseLimiter::default();
        let t = Instant::now();
        // Two buckets a network: its answer's and all of its answers'.
        for i in 0..MAX_ENTRIES as u32 / 2 {
            let ip = IpAddr::V4((i << 8).into());
            assert_eq!(rrl.admit(ip, R, t), Verdict::Send);
        }
        assert_eq!(rrl.tracked(), MAX_ENTRIES);
        // Full of networks that just answered: newcomers are dropped or slipped, not tracked.
        let newcomer: IpAddr = "2001:db8::1".parse().unwrap();
        let other: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        assert_eq!(rrl.admit(newcomer, R, t), Verdict::Drop);
        assert_eq!(rrl.admit(other, R, t), Verdict::Slip);
        assert_eq!(rrl.tracked(), MAX_ENTRIES);
        // Once they have refilled, they are forgotten and the newcomer is served.
        let later = t + Duration::from_secs(1);
        assert_eq!(rrl.admit(newcomer, R, later), Verdict::Send);
        assert_eq!(rrl.tracked(), 2);
    }

    /// A flood turning through the zone's answers, forged from one network, gets the
    /// network's total rate, not each answer's: ~100 answers (a zone of 30 devices) drew 100
    /// times the rate towards one victim.
    #[test]
    fn a_network_gets_its_total_rate_over_all_answers() {
        let rrl = ResponseLimiter::default();
        let t = Instant::now();
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let names: Vec<LowerName> = (0..100)
            .map(|i| {
                let n = format!("home{i}.alice.example.");
                LowerName::from(hickory_proto::rr::Name::from_ascii(&n).unwrap())
            })
            .collect();
        let mut sent = 0;
        for round in 0..BURST {
            for n in &names {
                let r = Response::Records(n, RecordType::A);
                if rrl.admit(ip, r, t) == Verdict::Send {
                    sent += 1;
                }
            }
            assert!(round > 0 || sent == 100, "each answer at first");
        }
        assert_eq!(sent, ALL_BURST, "the network's burst over all answers");
        // Another network is not affected.
        let other: IpAddr = "203.0.113.9".parse().unwrap();
        let r = Response::Records(&names[0], RecordType::A);
        assert_eq!(rrl.admit(other, r, t), Verdict::Send);
        // A second later, the total rate's worth more: the answers refused by the total did
        // not spend their own rates.
        let later = t + Duration::from_secs(1);
        let more = (0..5)
            .flat_map(|_| names.iter())
            .filter(|n| rrl.admit(ip, Response::Records(n, RecordType::A), later) == Verdict::Send)
            .count();
        assert_eq!(more as u32, ALL_RATE);
    }

    /// A flood of one question, forged from a resolver's network, spends that answer's rate
    /// only: the resolver still gets every other answer of the zone. Names count without
    /// their case; any NXDOMAIN shares one rate (random names get none each).
    #[test]
    fn each_answer_has_its_own_rate() {
        let rrl = ResponseLimiter::default();
        let t = Instant::now();
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let name = |s: &str| LowerName::from(hickory_proto::rr::Name::from_ascii(s).unwrap());
        let (txt, a) = (name("_zonegate.alice.example."), name("alice.example."));
        for _ in 0..BURST {
            assert_eq!(
                rrl.admit(ip, Response::Records(&txt, RecordType::TXT), t),
                Verdict::Send
            );
        }
        let shouted = name("_ZONEGATE.Alice.example.");
        let flooded = Response::Records(&shouted, RecordType::TXT);
        assert_ne!(rrl.admit(ip, flooded, t), Verdict::Send, "the same answer");
        assert_eq!(
            rrl.admit(ip, Response::Records(&a, RecordType::A), t),
            Verdict::Send
        );
        assert_eq!(
            rrl.admit(ip, Response::Records(&txt, RecordType::A), t),
            Verdict::Send
        );
        assert_eq!(rrl.admit(ip, Response::NxDomain, t), Verdict::Send);
        assert_eq!(rrl.admit(ip, Response::Error, t), Verdict::Send);
        for _ in 1..BURST {
            assert_eq!(rrl.admit(ip, Response::NxDomain, t), Verdict::Send);
        }
        assert_ne!(
            rrl.admit(ip, Response::NxDomain, t),
            Verdict::Send,
            "one rate for NXDOMAIN"
        );
        // Empty answers of one name share one rate, whatever type is asked.
        for _ in 0..BURST {
            assert_eq!(rrl.admit(ip, Response::Empty(&a), t), Verdict::Send);
        }
        assert_ne!(
            rrl.admit(ip, Response::Empty(&a), t),
            Verdict::Send,
            "one rate for a name's empty answers"
        );
        // Three over the limit, each the first over its own: all dropped, none slipped.
        assert_eq!(rrl.take_counts(), (0, 3));
        assert_eq!(rrl.take_counts(), (0, 0));
    }
}
