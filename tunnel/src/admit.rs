//! Admission of incoming QUIC connections, shared by the gateway's hub (agents) and the node
//! agents' peer side (direct mesh paths): a cap on handshakes in flight, and QUIC Retry
//! (address validation) once many are in flight.
//!
//! A handshake costs the accepting side a TLS key exchange and signature, and state until it
//! completes or times out. The cap bounds that cost, so a flood of connection attempts cannot
//! starve the connections already up. Retry makes a client prove it receives packets at its
//! source address before it gets a handshake: spoofed-source floods (and clients that send one
//! Initial and vanish) then cost one stateless Retry packet each instead of a handshake slot.
//!
//! A gate may also bound the handshakes of one source address and IPv6 site ([`AddressSlots`]),
//! so one host or site cannot hold every slot: the agents' peer side (real peers' hole
//! punching) and the hub (agents reconnecting), the hub with room for a home's devices
//! behind its one NAT address.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use quinn::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};
use zone_core::client_slots::{ClientSlot, ClientSlots};

/// Counters of a [`HandshakeGate`], for `/status`, logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GateStats {
    /// Handshakes in flight now.
    pub in_flight: usize,
    /// Most handshakes ever in flight at once.
    pub peak: usize,
    /// Connection attempts let through to a handshake.
    pub admitted: u64,
    /// Attempts answered with a Retry (the client must come back from a proven address).
    pub retried: u64,
    /// Attempts refused because the cap was reached.
    pub refused: u64,
}

#[derive(Debug)]
struct GateInner {
    /// Who is behind the gate, for logs ("tunnel hub", "mesh peers").
    what: &'static str,
    permits: Arc<Semaphore>,
    max: usize,
    retry_above: usize,
    peak: AtomicUsize,
    admitted: AtomicU64,
    retried: AtomicU64,
    refused: AtomicU64,
    /// Set while Retry or refusals are in use: the one log line per change of that state.
    flooded: AtomicBool,
    per_address: Option<AddressSlots>,
}

/// Handshakes in flight per client (an IPv4 address, an IPv6 /64) and per site (an IPv4 /24, an IPv6 /48),
/// counted apart for addresses not yet validated and validated ones (that answered a Retry):
/// a [`ClientSlots`] table each. A spoofer can only fill the first class, and only with the
/// victim's address: the victim, sent a Retry, comes back validated and finds its own class
/// free. A host that does validate is bounded by the second.
#[derive(Debug)]
pub struct AddressSlots {
    /// [not validated, validated]
    classes: [ClientSlots; 2],
}

/// A site (IPv4 /24, IPv6 /48) may have this many times an address's handshakes in flight.
pub const SITE_FACTOR: usize = 4;

/// One handshake's slot in its class; released on drop.
#[derive(Debug)]
pub struct AddressSlot {
    _slot: ClientSlot,
}

impl AddressSlots {
    /// At most `unvalidated` and `validated` handshakes in flight per address.
    pub fn new(unvalidated: usize, validated: usize) -> Self {
        let class = |max: usize| ClientSlots::new(max, max * SITE_FACTOR);
        AddressSlots {
            classes: [class(unvalidated), class(validated)],
        }
    }

    /// A slot for a handshake from `ip`, or `None` when its class is full for its address or
    /// its site.
    pub fn take(&self, ip: IpAddr, validated: bool) -> Option<AddressSlot> {
        let _slot = self.classes[usize::from(validated)].take(ip)?;
        Some(AddressSlot { _slot })
    }

    /// Addresses and sites (per class) with a handshake in flight.
    pub fn tracked(&self) -> usize {
        self.classes.iter().map(ClientSlots::tracked).sum()
    }
}

/// Bounds concurrent handshakes and asks for address validation when many are in flight.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct HandshakeGate(Arc<GateInner>);

/// One handshake slot; released on drop.
#[derive(Debug)]
pub struct HandshakePermit {
    _permit: OwnedSemaphorePermit,
    _address: Option<AddressSlot>,
    gate: Arc<GateInner>,
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        let g = &self.gate;
        // This permit is still counted as taken while we are here, hence the `- 1`.
        let in_flight = (g.max - g.permits.available_permits()).saturating_sub(1);
        // Hysteresis (half the Retry threshold) so a load hovering at the threshold does not
        // log a flood starting and ending on every attempt.
        if in_flight <= g.retry_above / 2 && g.flooded.swap(false, Ordering::Relaxed) {
            info!(
                gate = g.what,
                retried = g.retried.load(Ordering::Relaxed),
                refused = g.refused.load(Ordering::Relaxed),
                "handshake load back to normal: Retry off"
            );
        }
    }
}

impl HandshakeGate {
    /// At most `max` handshakes in flight; above `retry_above` in flight, clients whose address
    /// is not validated yet get a Retry.
    pub fn new(what: &'static str, max: usize, retry_above: usize) -> Self {
        Self::build(what, max, retry_above, None)
    }

    /// As [`HandshakeGate::new`], and at most `unvalidated` and `validated` handshakes in
    /// flight per source address ([`AddressSlots`]): past them, an address not yet validated
    /// gets a Retry, a validated one is refused.
    pub fn with_per_address(
        what: &'static str,
        max: usize,
        retry_above: usize,
        unvalidated: usize,
        validated: usize,
    ) -> Self {
        let slots = AddressSlots::new(unvalidated, validated);
        Self::build(what, max, retry_above, Some(slots))
    }

    fn build(
        what: &'static str,
        max: usize,
        retry_above: usize,
        per_address: Option<AddressSlots>,
    ) -> Self {
        HandshakeGate(Arc::new(GateInner {
            what,
            permits: Arc::new(Semaphore::new(max)),
            max,
            retry_above,
            peak: AtomicUsize::new(0),
            admitted: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            flooded: AtomicBool::new(false),
            per_address,
        }))
    }

    /// Decides what to do with one connection attempt: go on with the handshake, holding the
    /// permit until it is over (done or failed), or `None` when it was answered with a Retry or
    /// refused. Never waits: the caller is an accept loop, which must keep draining the
    /// endpoint's queue.
    pub fn admit(&self, incoming: Incoming) -> Option<(Incoming, HandshakePermit)> {
        let g = &self.0;
        let in_flight = g.max - g.permits.available_permits();
        let Ok(permit) = g.permits.clone().try_acquire_owned() else {
            debug!(gate = g.what, remote = %incoming.remote_address(), "handshake refused: too many in flight");
            g.refused.fetch_add(1, Ordering::Relaxed);
            self.flood_seen(in_flight);
            incoming.refuse();
            return None;
        };
        if in_flight >= g.retry_above
            && !incoming.remote_address_validated()
            && incoming.may_retry()
        {
            // Dropping the permit here: a Retry is stateless, it costs no handshake slot.
            drop(permit);
            g.retried.fetch_add(1, Ordering::Relaxed);
            self.flood_seen(in_flight);
            if let Err(e) = incoming.retry() {
                // Only when the attempt cannot be retried, which may_retry() ruled out.
                e.into_incoming().refuse();
            }
            return None;
        }
        let validated = incoming.remote_address_validated();
        let address = match &g.per_address {
            None => None,
            Some(slots) => match slots.take(incoming.remote_address().ip(), validated) {
                Some(slot) => Some(slot),
                None => {
                    drop(permit);
                    // One address at its own limit is no gateway-wide flood: told as one, it
                    // let a single host switch the warning and its all-clear on and off (the
                    // load drops back under the hysteresis with its next aborted handshake).
                    if in_flight >= g.retry_above {
                        self.flood_seen(in_flight);
                    }
                    if !validated && incoming.may_retry() {
                        g.retried.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = incoming.retry() {
                            e.into_incoming().refuse();
                        }
                    } else {
                        debug!(gate = g.what, remote = %incoming.remote_address(), "handshake refused: too many in flight from this address");
                        g.refused.fetch_add(1, Ordering::Relaxed);
                        incoming.refuse();
                    }
                    return None;
                }
            },
        };
        g.admitted.fetch_add(1, Ordering::Relaxed);
        g.peak.fetch_max(in_flight + 1, Ordering::Relaxed);
        Some((
            incoming,
            HandshakePermit {
                _permit: permit,
                _address: address,
                gate: g.clone(),
            },
        ))
    }

    fn flood_seen(&self, in_flight: usize) {
        if !self.0.flooded.swap(true, Ordering::Relaxed) {
            warn!(
                gate = self.0.what,
                in_flight,
                max = self.0.max,
                retry_above = self.0.retry_above,
                "many handshakes at once: unvalidated clients get a Retry, the excess is refused"
            );
        }
    }

    pub fn stats(&self) -> GateStats {
        let g = &self.0;
        GateStats {
            in_flight: g.max - g.permits.available_permits(),
            peak: g.peak.load(Ordering::Relaxed),
            admitted: g.admitted.load(Ordering::Relaxed),
            retried: g.retried.load(Ordering::Relaxed),
            refused: g.refused.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_slots_bound_each_class_of_each_address() {
        let slots = AddressSlots::new(2, 2);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = ip("198.51.100.7");
        let held: Vec<AddressSlot> = (0..2).map(|_| slots.take(a, false).unwrap()).collect();
        assert!(slots.take(a, false).is_none(), "unvalidated class full");
        // A spoofer filling a victim's unvalidated class leaves its validated class free.
        let v: Vec<AddressSlot> = (0..2).map(|_| slots.take(a, true).unwrap()).collect();
        assert!(slots.take(a, true).is_none(), "validated class full");
        assert!(
            slots.take(ip("198.51.100.8"), false).is_some(),
            "another address"
        );
        // IPv6 per /64; v4-mapped as IPv4.
        let x = slots.take(ip("2001:db8:1:2::1"), true).unwrap();
        let y = slots.take(ip("2001:db8:1:2:ffff::9"), true).unwrap();
        assert!(slots.take(ip("2001:db8:1:2:aaaa::1"), true).is_none());
        assert!(slots.take(ip("2001:db8:1:3::1"), true).is_some());
        assert!(slots.take(ip("::ffff:198.51.100.7"), true).is_none());
        // A site (/48) holds SITE_FACTOR times an address's share, all its /64s together.
        let site: Vec<AddressSlot> = (0..2 * SITE_FACTOR as u16 - 2)
            .map(|n| slots.take(ip(&format!("2001:db8:1:{:x}::1", 0x100 + n)), true))
            .map(|s| s.expect("within the site's share"))
            .collect();
        assert!(
            slots.take(ip("2001:db8:1:ffff::1"), true).is_none(),
            "site full"
        );
        assert!(
            slots.take(ip("2001:db8:2::1"), true).is_some(),
            "another site"
        );
        drop(site);
        // Released on drop; the map forgets addresses with nothing in flight.
        drop(held);
        assert!(slots.take(a, false).is_some());
        drop(v);
        drop((x, y));
        assert_eq!(slots.tracked(), 0);
    }
}
