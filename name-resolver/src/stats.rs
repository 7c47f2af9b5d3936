//! Counters of what the zone DNS answered, for the gateway's `/metrics`: queries are not
//! logged one by one (a resolver's traffic would flood the log), so these are how an
//! operator sees that the server is asked at all, and what it answers.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The answer codes counted apart; any other is counted as `other`.
const RCODES: [(u16, &str); 6] = [
    (0, "NOERROR"),
    (1, "FORMERR"),
    (2, "SERVFAIL"),
    (3, "NXDOMAIN"),
    (4, "NOTIMP"),
    (5, "REFUSED"),
];

/// The transports counted apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// Counts since the server started; shared by its UDP loops and TCP connections.
#[derive(Debug, Default)]
pub struct DnsStats {
    /// Per transport, per [`RCODES`] entry and one more for any other code.
    answers: [[AtomicU64; RCODES.len() + 1]; 2],
    /// UDP answers the rate limiter sent empty with TC, or did not send.
    rate_slipped: AtomicU64,
    rate_dropped: AtomicU64,
    /// TCP connections closed at once: their client, its site or the server at its limit.
    tcp_refused: AtomicU64,
}

/// One snapshot of [`DnsStats`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DnsCounts {
    /// (transport, answer code, answers) for every pair, zeros included (a series that
    /// appears only once counted is missed by `rate()`).
    pub answers: Vec<(&'static str, &'static str, u64)>,
    pub rate_slipped: u64,
    pub rate_dropped: u64,
    pub tcp_refused: u64,
}

impl DnsStats {
    /// One answer of code `rcode` (the header's 4 bits, or an extended code) over `transport`.
    /// An answer the rate limiter then drops is counted here and as dropped.
    pub fn answered(&self, transport: Transport, rcode: u16) {
        let i = RCODES
            .iter()
            .position(|(c, _)| *c == rcode)
            .unwrap_or(RCODES.len());
        self.answers[transport as usize][i].fetch_add(1, Relaxed);
    }

    pub(crate) fn rate_limited(&self, slipped: bool) {
        let c = if slipped {
            &self.rate_slipped
        } else {
            &self.rate_dropped
        };
        c.fetch_add(1, Relaxed);
    }

    pub(crate) fn tcp_refused(&self) {
        self.tcp_refused.fetch_add(1, Relaxed);
    }

    /// What was counted until now.
    pub fn counts(&self) -> DnsCounts {
        let mut answers = Vec::with_capacity(2 * (RCODES.len() + 1));
        for t in [Transport::Udp, Transport::Tcp] {
            let names = RCODES.iter().map(|(_, n)| *n).chain(["other"]);
            for (name, n) in names.zip(&self.answers[t as usize]) {
                answers.push((t.as_str(), name, n.load(Relaxed)));
            }
        }
        DnsCounts {
            answers,
            rate_slipped: self.rate_slipped.load(Relaxed),
            rate_dropped: self.rate_dropped.load(Relaxed),
            tcp_refused: self.tcp_refused.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_counted_by_transport_and_code_other_codes_together() {
        let s = DnsStats::default();
        s.answered(Transport::Udp, 0);
        s.answered(Transport::Udp, 0);
        s.answered(Transport::Tcp, 3);
        s.answered(Transport::Udp, 16); // BADVERS
        s.rate_limited(true);
        s.tcp_refused();
        let c = s.counts();
        let get = |t, r| c.answers.iter().find(|a| a.0 == t && a.1 == r).unwrap().2;
        assert_eq!(get("udp", "NOERROR"), 2);
        assert_eq!(get("tcp", "NXDOMAIN"), 1);
        assert_eq!(get("udp", "other"), 1);
        assert_eq!(get("tcp", "NOERROR"), 0);
        assert_eq!(c.answers.len(), 14);
        assert_eq!((c.rate_slipped, c.rate_dropped, c.tcp_refused), (1, 0, 1));
    }
}
