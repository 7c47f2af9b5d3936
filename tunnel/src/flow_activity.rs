//! When a flow last carried traffic, in either direction, and waiting until it has been quiet
//! for a while. UDP flows use it so that they are idle only when both directions are quiet
//! (one-way protocols — syslog, statsd, a client's keep-alives to a service that rarely
//! answers — would otherwise be closed while in use); the HTTP front uses it for the idle
//! timer of HTTP/2 connections.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

// tokio's clock, which its timers follow (and tests can pause).
use tokio::time::Instant;

/// Last-traffic time of one flow, shared by the tasks that move its datagrams.
#[derive(Debug)]
pub struct FlowActivity {
    start: Instant,
    /// Milliseconds after `start` of the last datagram.
    last_ms: AtomicU64,
}

impl Default for FlowActivity {
    fn default() -> Self {
        FlowActivity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl FlowActivity {
    /// A datagram went through, either way.
    pub fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long since the last datagram (or since the flow began).
    pub fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    /// Waits until the flow has been quiet for `idle`, however often it is touched meanwhile.
    pub async fn idle(&self, idle: Duration) {
        loop {
            let quiet = self.quiet_for();
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_quiet_in_both_directions() {
        let a = std::sync::Arc::new(FlowActivity::default());
        let idle = Duration::from_secs(10);
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.idle(idle).await }
        });
        // Traffic every 6 s (less than the idle time) keeps it open for a minute.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            a.touch();
            assert!(!waiter.is_finished());
        }
        tokio::time::sleep(Duration::from_secs(9)).await;
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        tokio::time::sleep(Duration::from_secs(2)).await;
        waiter.await.unwrap();
        assert!(a.quiet_for() >= idle);
    }
}
