//! Admission of incoming QUIC connections, shared by the gateway's hub (agents) and the node
//! agents' peer side (direct mesh paths): a cap on handshakes in flight, and QUIC Retry
//! (address validation) once many are in flight.
//!
//! A handshake costs the accepting side a TLS key exchange and signature, and state until it
//! completes or times out. The cap bounds that cost, so a flood of connection attempts cannot
//! starve the connections already up. Retry makes a client prove it receives packets at its
//! source address before it gets a handshake: spoofed-source floods (and clients that send one
//! Initial and vanish) then cost one stateless Retry packet each instead of a handshake slot.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use quinn::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

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
}

/// Bounds concurrent handshakes and asks for address validation when many are in flight.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct HandshakeGate(Arc<GateInner>);

/// One handshake slot; released on drop.
#[derive(Debug)]
pub struct HandshakePermit {
    _permit: OwnedSemaphorePermit,
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
        g.admitted.fetch_add(1, Ordering::Relaxed);
        g.peak.fetch_max(in_flight + 1, Ordering::Relaxed);
        Some((
            incoming,
            HandshakePermit {
                _permit: permit,
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
