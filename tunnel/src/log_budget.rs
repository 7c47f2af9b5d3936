//! A cap on how many lines a second one kind of event may log. Events a client can cause per
//! packet (a UDP datagram the policy refuses, a flow the device cannot open) would otherwise
//! let one sender write a log line per datagram and fill the disk; past the cap they are
//! counted and the count is said on the next line that is logged.

use std::time::Duration;

use tokio::time::Instant;

const WINDOW: Duration = Duration::from_secs(1);

/// Lines left in the current second and the events not logged since the last line.
#[derive(Debug)]
pub struct LogBudget {
    per_second: u32,
    window_start: Instant,
    used: u32,
    unlogged: u64,
}

impl LogBudget {
    /// At most `per_second` lines a second.
    pub fn new(per_second: u32) -> Self {
        LogBudget {
            per_second,
            window_start: Instant::now(),
            used: 0,
            unlogged: 0,
        }
    }

    /// `Some(n)` when this event may be logged, `n` being how many were not logged since the
    /// last line (to put on it); `None` when the second's lines are used up (it is counted).
    pub fn take(&mut self) -> Option<u64> {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= WINDOW {
            self.window_start = now;
            self.used = 0;
        }
        if self.used >= self.per_second {
            self.unlogged += 1;
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.unlogged))
    }

    /// [`LogBudget::take`] on a budget shared by several tasks.
    pub fn take_shared(shared: &std::sync::Mutex<LogBudget>) -> Option<u64> {
        shared.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The events not logged since the last line (and forgets them): for a last line.
    pub fn unlogged(&mut self) -> u64 {
        std::mem::take(&mut self.unlogged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn lines_past_the_cap_are_counted_on_the_next_one() {
        let mut b = LogBudget::new(3);
        assert_eq!(b.take(), Some(0));
        assert_eq!(b.take(), Some(0));
        assert_eq!(b.take(), Some(0));
        for _ in 0..1000 {
            assert_eq!(b.take(), None);
        }
        tokio::time::sleep(WINDOW).await;
        assert_eq!(b.take(), Some(1000));
        assert_eq!(b.take(), Some(0));
    }
}
