//! An agent's UDP flows on one gateway connection, by flow id, and the datagrams that arrived
//! before their flow's open.
//!
//! The gateway sends a flow's open on the control stream and its first datagram right behind
//! it, as a QUIC datagram: the two are not ordered with each other, and the agent reads them
//! in two tasks. A datagram whose flow was not open yet was dropped — 16 of 100 first
//! datagrams of new flows on loopback (`the_first_datagram_of_every_new_flow_arrives`): a DNS
//! query or a VPN handshake lost, and the client's retry seconds later. Such datagrams are now
//! kept briefly and handed to the flow when it opens. Sans-IO (the entries are the caller's).
//!
//! Flow ids count up on the gateway (a closed flow's id comes back only after 2^32 others), so
//! a late datagram of a closed flow, kept as early, ages out without meeting a new flow of its
//! id.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Flows that may have early datagrams waiting at once. Opens queue behind one lost control
/// packet for a retransmission timeout (100–300 ms): a DNS app taking a new flow per query
/// at 1,000 queries/s has hundreds of flows opening then (at 64, about 236 of 300 first
/// queries were lost).
pub const EARLY_FLOWS: usize = 1024;
/// Early datagrams kept per flow.
pub const EARLY_PER_FLOW: usize = 8;
/// Bytes of early datagrams kept at once, all flows together: room for the flows above with
/// small datagrams (DNS, game state) without 1,024 × 8 full 9 KB datagrams (73 MiB).
pub const EARLY_BYTES: usize = 2 << 20;
/// How long early datagrams wait for their flow's open: the open is behind them by well
/// under a round trip.
pub const EARLY_FOR: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct FlowTable<E> {
    open: HashMap<u32, E>,
    early: HashMap<u32, (Instant, Vec<Bytes>)>,
    /// Bytes held in `early`.
    early_bytes: usize,
    /// Early datagrams dropped (no room, or their open came too late) since the last
    /// [`FlowTable::take_dropped`].
    dropped: u64,
}

impl<E> Default for FlowTable<E> {
    fn default() -> Self {
        FlowTable {
            open: HashMap::new(),
            early: HashMap::new(),
            early_bytes: 0,
            dropped: 0,
        }
    }
}

/// Bytes of a flow's early datagrams.
fn held_bytes(held: &[Bytes]) -> usize {
    held.iter().map(Bytes::len).sum()
}

impl<E> FlowTable<E> {
    pub fn get(&self, id: u32) -> Option<&E> {
        self.open.get(&id)
    }

    pub fn remove(&mut self, id: u32) -> Option<E> {
        self.open.remove(&id)
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Removes every open flow.
    pub fn drain(&mut self) -> impl Iterator<Item = (u32, E)> + '_ {
        self.early.clear();
        self.early_bytes = 0;
        self.open.drain()
    }

    /// Opens flow `id` with `entry`; returns the datagrams that arrived for it before (within
    /// [`EARLY_FOR`] of `now`; older ones count as dropped).
    pub fn open(&mut self, id: u32, entry: E, now: Instant) -> Vec<Bytes> {
        self.open.insert(id, entry);
        let Some((at, held)) = self.early.remove(&id) else {
            return Vec::new();
        };
        self.early_bytes -= held_bytes(&held);
        if now.saturating_duration_since(at) < EARLY_FOR {
            held
        } else {
            self.dropped += held.len() as u64;
            Vec::new()
        }
    }

    /// Keeps a datagram of flow `id`, which is not open (yet), unless there is no room: at most
    /// [`EARLY_FLOWS`] flows, [`EARLY_PER_FLOW`] datagrams each and [`EARLY_BYTES`] in all, for
    /// [`EARLY_FOR`]. Returns whether it was kept; one not kept counts as dropped, as do
    /// those aged out.
    pub fn hold_early(&mut self, id: u32, datagram: Bytes, now: Instant) -> bool {
        let (mut aged, mut aged_bytes) = (0, 0);
        self.early.retain(|_, (at, held)| {
            let keep = now.saturating_duration_since(*at) < EARLY_FOR;
            if !keep {
                aged += held.len() as u64;
                aged_bytes += held_bytes(held);
            }
            keep
        });
        self.dropped += aged;
        self.early_bytes -= aged_bytes;
        let room = self.early_bytes + datagram.len() <= EARLY_BYTES
            && (self.early.contains_key(&id) || self.early.len() < EARLY_FLOWS);
        if !room {
            self.dropped += 1;
            return false;
        }
        let (_, held) = self.early.entry(id).or_insert_with(|| (now, Vec::new()));
        if held.len() >= EARLY_PER_FLOW {
            self.dropped += 1;
            return false;
        }
        self.early_bytes += datagram.len();
        held.push(datagram);
        true
    }

    /// Early datagrams dropped since the last call, for a log line: the gateway counted them
    /// as passed on.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_datagrams_go_to_their_flow_in_order() {
        let mut t = FlowTable::default();
        let now = Instant::now();
        assert!(t.hold_early(7, Bytes::from_static(b"a"), now));
        assert!(t.hold_early(7, Bytes::from_static(b"b"), now));
        assert!(t.hold_early(8, Bytes::from_static(b"x"), now));
        assert_eq!(
            t.open(7, "seven", now),
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]
        );
        assert_eq!(t.get(7), Some(&"seven"));
        assert!(t.open(9, "nine", now).is_empty());
        assert_eq!(t.open(8, "eight", now), vec![Bytes::from_static(b"x")]);
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn early_datagrams_are_bounded_and_age_out() {
        let mut t: FlowTable<()> = FlowTable::default();
        let now = Instant::now();
        let d = || Bytes::from_static(b"d");
        for _ in 0..EARLY_PER_FLOW {
            assert!(t.hold_early(1, d(), now));
        }
        assert!(!t.hold_early(1, d(), now), "more than EARLY_PER_FLOW kept");
        for id in 2..EARLY_FLOWS as u32 + 1 {
            assert!(t.hold_early(id, d(), now));
        }
        assert!(
            !t.hold_early(100_000, d(), now),
            "more than EARLY_FLOWS flows kept"
        );
        // Later, the old ones are gone: room again, and an open finds nothing.
        let later = now + EARLY_FOR;
        assert!(t.hold_early(100_000, d(), later));
        assert!(t.open(1, (), later).is_empty());
        assert_eq!(t.open(100_000, (), later).len(), 1);
        // Kept, but opened too late: not handed over.
        assert!(t.hold_early(200_000, d(), later));
        assert!(t.open(200_000, (), later + EARLY_FOR).is_empty());
        // Every datagram not handed over was counted: two refused, those aged out (flow 1's
        // EARLY_PER_FLOW and one of each other flow), one opened late.
        let aged = (EARLY_PER_FLOW + EARLY_FLOWS - 1) as u64;
        assert_eq!(t.take_dropped(), 2 + aged + 1);
        assert_eq!(t.take_dropped(), 0);
        assert_eq!(t.early_bytes, 0);
    }

    #[test]
    fn early_datagrams_are_bounded_in_bytes() {
        let mut t: FlowTable<()> = FlowTable::default();
        let now = Instant::now();
        let big = Bytes::from(vec![0u8; 8192]);
        let fits = EARLY_BYTES / big.len();
        for id in 0..fits as u32 {
            assert!(t.hold_early(id, big.clone(), now));
        }
        assert!(!t.hold_early(9999, big.clone(), now), "past EARLY_BYTES");
        assert_eq!(t.take_dropped(), 1);
        // Handed over: the bytes are free again.
        assert_eq!(t.open(0, (), now).len(), 1);
        assert!(t.hold_early(9999, big, now));
    }
}
