//! Receive window lent to a connection while its streams are backlogged behind slow readers
//! ([`crate::holds`] counts them), from a pool shared by the process's connections, and given
//! back once quinn no longer grants it.
//!
//! quinn grows a connection's window at once ([`quinn::Connection::set_receive_window`]) but
//! cannot take back credit it already granted: shrunk, it withholds the difference from the
//! credit its streams' reads would return (its "shrink debt"), so the sender may still send
//! the old window's worth until that much has been read. What a shrink takes off the window
//! is therefore *owed*, not free: it stays out of the pool until the connection's watched
//! streams have consumed that much (read it, or dropped it unread as they ended; reads of
//! other streams pay quinn's debt too, so the count is on the safe side). A stream its sender
//! reset is owed the same way, not given back at once: quinn credits its unread data when the
//! reset arrives, before anything here sees it — credit granted to the peer, which a shrink
//! after cannot take back — so only reads pay it off. A loan grows only
//! beyond what is lent and owed together. So the window quinn grants never exceeds the
//! connection's own plus what the pool counts out, and the pool bounds the unread data the
//! process may hold beyond its connections' own windows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tracing::info;

use crate::log_budget::LogBudget;
use crate::transport::CONNECTION_WINDOW;

/// Receive window a process lends, at most, to connections whose streams are backlogged
/// behind slow readers (bytes): the unread data it may hold beyond each connection's own
/// [`CONNECTION_WINDOW`].
pub const LENDABLE_WINDOW: u64 = 128 * 1024 * 1024;

/// Lent to one connection at most: half the pool, so slow readers of one device leave the
/// other devices' connections half of it.
pub const LENT_PER_CONNECTION: u64 = LENDABLE_WINDOW / 2;

/// Lines a second the process's loans log between them (one per connection whose loan
/// starts or ends): a client pausing and resuming five slow downloads can flip a loan every
/// sweep.
const LINES_PER_SEC: u32 = 2;

/// Receive window the connections of a process may borrow beyond their own.
#[derive(Debug)]
pub struct WindowPool {
    free: AtomicU64,
    lines: Mutex<LogBudget>,
}

impl WindowPool {
    pub fn new(bytes: u64) -> Self {
        WindowPool {
            free: AtomicU64::new(bytes),
            lines: Mutex::new(LogBudget::new(LINES_PER_SEC)),
        }
    }

    /// What is left to lend.
    pub fn free(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    /// Takes up to `want` bytes; returns what it took.
    fn take(&self, want: u64) -> u64 {
        let mut took = 0;
        let _ = self
            .free
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |free| {
                took = want.min(free);
                Some(free - took)
            });
        took
    }

    fn give(&self, bytes: u64) {
        if bytes > 0 {
            self.free.fetch_add(bytes, Ordering::Relaxed);
        }
    }
}

impl Default for WindowPool {
    fn default() -> Self {
        WindowPool::new(LENDABLE_WINDOW)
    }
}

/// One connection's loan from a [`WindowPool`].
#[derive(Debug)]
pub struct Loan {
    conn: quinn::Connection,
    pool: Arc<WindowPool>,
    /// Bytes the connection's watched streams took from quinn, read or dropped unread: what
    /// pays off `owed`. Counted by the streams ([`Loan::consumed`]).
    consumed: AtomicU64,
    state: Mutex<LoanState>,
    /// `lent + owed`, for status without the lock.
    out: AtomicU64,
}

#[derive(Debug, Default)]
struct LoanState {
    /// Added to the connection's window now.
    lent: u64,
    /// Taken off the window, still granted by quinn until the streams consume as much.
    owed: u64,
    /// `consumed` when last looked at.
    consumed_seen: u64,
}

impl Loan {
    pub fn new(conn: quinn::Connection, pool: Arc<WindowPool>) -> Self {
        Loan {
            conn,
            pool,
            consumed: AtomicU64::new(0),
            state: Mutex::default(),
            out: AtomicU64::new(0),
        }
    }

    /// The count the connection's streams add what they take from quinn to.
    pub fn consumed(&self) -> &AtomicU64 {
        &self.consumed
    }

    /// Out of the pool for this connection now: lent, and owed after a shrink (bytes).
    pub fn out(&self) -> u64 {
        self.out.load(Ordering::Relaxed)
    }

    /// Has the connection's window be its own plus `want` bytes, as far as the pool goes and
    /// as fast as quinn lets credit go: growing takes from the pool, shrinking owes (module
    /// doc). `backlogged` and `peer` are for the log line.
    pub fn follow(&self, want: u64, backlogged: usize, peer: &str) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if self.conn.close_reason().is_some() {
            self.release_locked(&mut st);
            return;
        }
        let before = st.lent;
        st.follow(want, self.consumed.load(Ordering::Relaxed), &self.pool);
        self.out.store(st.lent + st.owed, Ordering::Relaxed);
        if st.lent == before {
            return;
        }
        let window = self.set_window(st.lent);
        let mib = |b: u64| b / (1024 * 1024);
        if before != 0 && st.lent != 0 {
            tracing::debug!(peer = %peer, backlogged, lent_mib = mib(st.lent), "receive window resized");
        } else if let Some(unlogged) = LogBudget::take_shared(&self.pool.lines) {
            info!(
                peer = %peer,
                backlogged,
                lent_mib = mib(st.lent),
                owed_mib = mib(st.owed),
                window_mib = mib(window),
                pool_free_mib = mib(self.pool.free()),
                unlogged,
                "receive window follows streams backlogged behind slow readers"
            );
        }
    }

    /// A stream the last sweep counted as backlogged is ending, its unread data about to be
    /// dropped: its share comes off the window first, so the credit quinn returns for that
    /// data pays the share off (taken off after, the share would stay granted, and owed,
    /// until as much again was read on the connection).
    pub fn stream_ending(&self) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st.lent == 0 || self.conn.close_reason().is_some() {
            return;
        }
        // What was consumed before now paid older debt, not this share.
        st.settle(self.consumed.load(Ordering::Relaxed), &self.pool);
        let share = st.lent.min(u64::from(crate::transport::STREAM_WINDOW));
        st.lent -= share;
        st.owed += share;
        self.out.store(st.lent + st.owed, Ordering::Relaxed);
        self.set_window(st.lent);
    }

    /// Sets the connection's window to its own plus `lent`; returns it.
    fn set_window(&self, lent: u64) -> u64 {
        let window = u64::from(CONNECTION_WINDOW) + lent;
        self.conn
            .set_receive_window(quinn::VarInt::from_u64(window).unwrap_or(quinn::VarInt::MAX));
        window
    }

    /// The connection is over: all of it goes back to the pool.
    pub fn release(&self) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.release_locked(&mut st);
    }

    fn release_locked(&self, st: &mut LoanState) {
        self.pool.give(st.lent + st.owed);
        st.lent = 0;
        st.owed = 0;
        self.out.store(0, Ordering::Relaxed);
    }
}

impl LoanState {
    /// Pays `owed` off with what was consumed since it last looked (the count is now
    /// `consumed`): quinn's debt goes first with every byte its streams take.
    fn settle(&mut self, consumed: u64, pool: &WindowPool) {
        let paid = consumed.wrapping_sub(self.consumed_seen).min(self.owed);
        self.consumed_seen = consumed;
        self.owed -= paid;
        pool.give(paid);
    }

    /// Settles what was consumed (the count is now `consumed`), then grows the loan towards
    /// `want` (at most [`LENT_PER_CONNECTION`]) beyond what is lent and owed, or shrinks it
    /// to `want`, owing the difference.
    fn follow(&mut self, want: u64, consumed: u64, pool: &WindowPool) {
        self.settle(consumed, pool);
        let want = want.min(LENT_PER_CONNECTION);
        let out = self.lent + self.owed;
        if want > out {
            self.lent += pool.take(want - out);
        } else if want < self.lent {
            self.owed += self.lent - want;
            self.lent = want;
        }
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        self.pool.give(st.lent + st.owed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_lends_no_more_than_it_has() {
        let pool = WindowPool::new(10);
        assert_eq!(pool.take(4), 4);
        assert_eq!(pool.take(8), 6, "only what is left");
        assert_eq!(pool.take(1), 0);
        pool.give(6);
        assert_eq!(pool.free(), 6);
        assert_eq!(pool.take(6), 6);
    }

    #[test]
    fn a_shrunk_loan_stays_out_of_the_pool_until_consumed() {
        let pool = WindowPool::new(100);
        let mut st = LoanState::default();
        st.follow(40, 0, &pool);
        assert_eq!((st.lent, st.owed, pool.free()), (40, 0, 60));
        // Shrunk to 10: quinn still grants 30 more until as much is read.
        st.follow(10, 5, &pool);
        assert_eq!((st.lent, st.owed, pool.free()), (10, 30, 60));
        // Grown again: only beyond what is lent and owed (quinn's window is 40 already).
        st.follow(35, 5, &pool);
        assert_eq!((st.lent, st.owed, pool.free()), (10, 30, 60));
        // 20 read: 20 of the debt paid, and the loan grows to 35 out again.
        st.follow(35, 25, &pool);
        assert_eq!((st.lent, st.owed, pool.free()), (25, 10, 65));
        // Read on: the rest is paid; nothing wanted, all of it comes back once consumed.
        st.follow(0, 1000, &pool);
        assert_eq!((st.lent, st.owed, pool.free()), (0, 25, 75));
        st.follow(0, 1030, &pool);
        assert_eq!((st.lent, st.owed, pool.free()), (0, 0, 100));
        // A dry pool lends what it has.
        let other = pool.take(95);
        st.follow(40, 1030, &pool);
        assert_eq!((st.lent, pool.free()), (5, 0));
        pool.give(other);
        // One connection gets half the pool at most.
        let pool = WindowPool::default();
        let mut st = LoanState::default();
        st.follow(LENDABLE_WINDOW, 0, &pool);
        assert_eq!(st.lent, LENT_PER_CONNECTION);
        assert_eq!(pool.free(), LENDABLE_WINDOW - LENT_PER_CONNECTION);
    }
}
