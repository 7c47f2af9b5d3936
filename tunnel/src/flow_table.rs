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

/// Flows that may have early datagrams waiting at once.
pub const EARLY_FLOWS: usize = 64;
/// Early datagrams kept per flow.
pub const EARLY_PER_FLOW: usize = 8;
/// How long early datagrams wait for their flow's open: the open is behind them by well
/// under a round trip.
pub const EARLY_FOR: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct FlowTable<E> {
    open: HashMap<u32, E>,
    early: HashMap<u32, (Instant, Vec<Bytes>)>,
}

impl<E> Default for FlowTable<E> {
    fn default() -> Self {
        FlowTable {
            open: HashMap::new(),
            early: HashMap::new(),
        }
    }
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
        self.open.drain()
    }

    /// Opens flow `id` with `entry`; returns the datagrams that arrived for it before (within
    /// [`EARLY_FOR`] of `now`).
    pub fn open(&mut self, id: u32, entry: E, now: Instant) -> Vec<Bytes> {
        self.open.insert(id, entry);
        self.early
            .remove(&id)
            .filter(|(at, _)| now.saturating_duration_since(*at) < EARLY_FOR)
            .map(|(_, d)| d)
            .unwrap_or_default()
    }

    /// Keeps a datagram of flow `id`, which is not open (yet), unless there is no room: at most
    /// [`EARLY_FLOWS`] flows, [`EARLY_PER_FLOW`] datagrams each, for [`EARLY_FOR`]. Returns
    /// whether it was kept.
    pub fn hold_early(&mut self, id: u32, datagram: Bytes, now: Instant) -> bool {
        self.early
            .retain(|_, (at, _)| now.saturating_duration_since(*at) < EARLY_FOR);
        if !self.early.contains_key(&id) && self.early.len() >= EARLY_FLOWS {
            return false;
        }
        let (_, held) = self.early.entry(id).or_insert_with(|| (now, Vec::new()));
        if held.len() >= EARLY_PER_FLOW {
            return false;
        }
        held.push(datagram);
        true
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
            !t.hold_early(1000, d(), now),
            "more than EARLY_FLOWS flows kept"
        );
        // Later, the old ones are gone: room again, and an open finds nothing.
        let later = now + EARLY_FOR;
        assert!(t.hold_early(1000, d(), later));
        assert!(t.open(1, (), later).is_empty());
        assert_eq!(t.open(1000, (), later).len(), 1);
        // Kept, but opened too late: not handed over.
        assert!(t.hold_early(2000, d(), later));
        assert!(t.open(2000, (), later + EARLY_FOR).is_empty());
    }
}
