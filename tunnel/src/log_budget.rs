//! A cap on how many lines a second one kind of event may log. Events a client can cause per
//! packet (a UDP datagram the policy refuses, a flow the device cannot open) would otherwise
//! let one sender write a log line per datagram and fill the disk; past the cap they are
//! counted and the count is said on the next line that is logged. [`Repeats`] says a line that
//! would say the same thing again at most once a minute.

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

/// How often a line that says the same thing again is said ([`Repeats`]).
pub const REPEAT_EVERY: Duration = Duration::from_secs(60);

/// Distinct things [`Repeats`] keeps apart at once; past it, new ones are said every time
/// (under the per-second budget still), and old ones forgotten first.
const MAX_REPEAT_KEYS: usize = 1024;

/// Lines that would say the same thing again — a device that keeps opening streams to a peer
/// that is away (etcd redials its peers several times a second, for as long as a laptop
/// sleeps), a forward whose target's service is down: said once, then at most once
/// a [`REPEAT_EVERY`] with how many times it was so meanwhile. A per-second budget alone let
/// such a failure through at its cap for hours (about 40 lines a second, millions a day).
#[derive(Debug, Default)]
pub struct Repeats {
    /// Per thing said: when its line was last written (None: due at its next time), and the
    /// times since.
    seen: std::collections::HashMap<String, (Option<Instant>, u64)>,
}

impl Repeats {
    /// `Some(n)` when a line saying `what` is due (`n`: the times it was so since its last
    /// line, to put on it), `None` when it was said within [`REPEAT_EVERY`] (it is counted).
    pub fn take(&mut self, what: &str) -> Option<u64> {
        let now = Instant::now();
        let recent =
            |at: &Option<Instant>| at.is_some_and(|t| now.duration_since(t) < REPEAT_EVERY);
        if let Some((at, n)) = self.seen.get_mut(what) {
            if recent(at) {
                *n += 1;
                return None;
            }
            *at = Some(now);
            return Some(std::mem::take(n));
        }
        if self.seen.len() >= MAX_REPEAT_KEYS {
            self.seen.retain(|_, (at, _)| recent(at));
        }
        if self.seen.len() < MAX_REPEAT_KEYS {
            self.seen.insert(what.to_owned(), (Some(now), 0));
        }
        Some(0)
    }

    /// A line [`Repeats::take`] said was due could not be written after all (the
    /// per-second budget was spent): the next time `what` happens is due again, with the
    /// `n` repeats it would have carried and this one.
    pub fn not_written(&mut self, what: &str, n: u64) {
        if let Some((at, count)) = self.seen.get_mut(what) {
            *at = None;
            *count = n + 1;
        }
    }

    /// [`Repeats::take`] then [`LogBudget::take`], shared by several tasks: `Some((repeats,
    /// unlogged))` when the line is written. A line the budget holds back leaves its repeat
    /// due (its count kept), rather than silent for another minute.
    pub fn take_both(
        repeats: &std::sync::Mutex<Repeats>,
        budget: &std::sync::Mutex<LogBudget>,
        what: &str,
    ) -> Option<(u64, u64)> {
        let n = Repeats::take_shared(repeats, what)?;
        match LogBudget::take_shared(budget) {
            Some(unlogged) => Some((n, unlogged)),
            None => {
                repeats
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .not_written(what, n);
                None
            }
        }
    }

    /// [`Repeats::take`] on one shared by several tasks.
    pub fn take_shared(shared: &std::sync::Mutex<Repeats>, what: &str) -> Option<u64> {
        shared.lock().unwrap_or_else(|p| p.into_inner()).take(what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_same_line_is_said_once_a_minute_with_its_repeats() {
        let mut r = Repeats::default();
        assert_eq!(r.take("a: offline"), Some(0));
        assert_eq!(r.take("b: offline"), Some(0));
        for _ in 0..500 {
            assert_eq!(r.take("a: offline"), None);
        }
        tokio::time::sleep(REPEAT_EVERY / 2).await;
        assert_eq!(r.take("a: offline"), None);
        assert_eq!(r.take("a: refused"), Some(0));
        tokio::time::sleep(REPEAT_EVERY / 2).await;
        assert_eq!(r.take("a: offline"), Some(501));
        assert_eq!(r.take("a: offline"), None);
        assert_eq!(r.take("b: offline"), Some(0));
        // Past the cap: new things are said every time, old quiet ones forgotten to make room.
        for i in 0..MAX_REPEAT_KEYS {
            r.take(&format!("k{i}"));
        }
        assert_eq!(r.take("new"), Some(0));
        assert_eq!(r.take("new"), Some(0));
        tokio::time::sleep(REPEAT_EVERY).await;
        assert_eq!(r.take("new"), Some(0));
        assert_eq!(r.take("new"), None);
        // A due line the budget held back: due again at once, its count kept.
        assert_eq!(r.take("b: offline"), Some(0));
        r.not_written("b: offline", 0);
        assert_eq!(r.take("b: offline"), Some(1));
        assert_eq!(r.take("b: offline"), None);
    }

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
