//! Streams whose reader stopped reading, per connection, and cutting the longest-held of them
//! when together they would hold the connection's shared receive credit from its other streams.
//! Both ends watch what they read: the gateway its streams from devices (public clients that
//! stop reading downloads), a node agent its streams from gateways and peers (local services
//! that stop reading uploads).
//!
//! quinn returns receive credit to the sender as the application reads. A stream the gateway
//! stopped reading (because its public client stopped reading) keeps up to the stream window
//! of the device's data unread, and that data counts against the connection's window too: 8
//! such streams (4 MiB each of a 32 MiB window) stopped every other stream of the device —
//! other clients, new connections, the control stream — for as long as their clients kept
//! their sockets open. Anyone who could reach a download could freeze a device that way.
//!
//! A stream is *held* when its last read returned data and nobody has read it since, nor
//! passed any of what it read on (a splice's write to the other end), for at least the stall
//! time ([`crate::transport::Tuning::reader_stall`]). A reader that waits for
//! data (its last read was pending), reached the end, or put its connection back to rest
//! ([`Watched::rest`]) or waits for its app's bandwidth ([`Watched::pace`]) is not held; nor
//! is one that keeps reading, however slowly (see *Slow readers* below). Of the held streams
//! only those with data waiting unread count: one whose reader read all there was (and is
//! slow to write the last of it) holds no credit. While at most [`HELD_BUDGET`] streams of a
//! connection count, nothing happens: clients may pause. Beyond that the longest-held are
//! cut: their receive side is stopped (quinn drops the unread data and returns its credit;
//! the device sees STOP_SENDING and ends its side) and their reader gets an error at its
//! next read.
//!
//! A cut also ends the splice the stream is in ([`Watched::poll_cut`]): it was stuck writing
//! to a reader that takes nothing and would never read the stream again to find out, so the
//! client's (or local service's) socket and the task stayed open until that reader left.
//!
//! For the same reason a held stream whose sender reset it is cut too, within the budget or
//! not: its reader would see the reset only at its next read, after the write it is stuck in,
//! and the splice (with the local socket behind it) waited on that reader for as long as it
//! read nothing. The sweep looks for the reset of each stream it looks at (held or
//! backlogged), and cuts it whichever: quinn reports a reset once.
//!
//! ## Slow readers
//!
//! A reader that keeps reading, but slower than the sender sends, is never held, yet up to a
//! stream window waits unread for it too: eight downloads to clients slower than the device's
//! uplink (or eight attackers reading a little every second) filled the connection's window
//! between them, and its other streams went at those readers' pace. Such a stream is
//! *backlogged*: its reader, holding what it read at the sweep, found data waiting at every
//! read for a whole tick before (it never caught up with the sender), and data waits unread
//! now. Held streams are backlogged too, and so are streams waiting for their app's bandwidth
//! ([`Watched::pace`]) whose sender is faster than the limit. A bulk download its client
//! reads slower than the device sends is backlogged as much as one to an attacker reading a
//! byte a second: each holds up to a stream window. quinn has no per-stream windows that
//! would follow each reader, so the connection's window follows the backlog instead: each
//! sweep has it lent a stream window for every backlogged stream beyond [`HELD_BUDGET`]
//! (those fit in the half of the window the budget already leaves them), from a
//! process-wide [`WindowPool`], given back as the backlog clears (once quinn stops granting
//! it: [`crate::window_loan`]) or the connection ends. The other streams keep half the
//! connection's window whatever the slow ones hold, until its loan reaches
//! [`crate::window_loan::LENT_PER_CONNECTION`] or the pool runs dry (a device is then slowed
//! by 24 slow readers rather than 8). What is lent is memory the process may hold unread: the
//! pool bounds it for all connections together.
//!
//! Time is counted in ticks of one hub-wide [`HoldClock`], advanced by the sweep: a read that
//! returned data stores the current tick (one relaxed store), not a clock reading.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use atomic_waker::AtomicWaker;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use quinn::RecvStream;
use tracing::info;

use crate::transport::{CONNECTION_WINDOW, STREAM_WINDOW};
use crate::window_loan::{Loan, WindowPool};

/// Streams of one connection that may be held before the longest-held are cut: half the
/// connection's window, so the held ones leave the other half to everything else.
pub const HELD_BUDGET: usize = (CONNECTION_WINDOW / STREAM_WINDOW / 2) as usize;

/// Application error code of a receive side stopped because its reader stopped reading.
pub const CUT_HELD: quinn::VarInt = quinn::VarInt::from_u32(2);

/// The sweep's tick count, shared by every stream it watches. Starts at 1: a stored 0 means
/// "not held".
#[derive(Debug)]
pub struct HoldClock(AtomicU64);

impl Default for HoldClock {
    fn default() -> Self {
        HoldClock(AtomicU64::new(1))
    }
}

impl HoldClock {
    pub fn now(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub fn advance(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// The watched streams of one connection.
#[derive(Debug)]
pub struct Holds {
    clock: Arc<HoldClock>,
    streams: Mutex<Vec<Weak<Watched>>>,
    cut: AtomicU64,
    /// The connection's window beyond its own, following its backlogged streams.
    loan: Arc<Loan>,
}

/// A stream's receive side, shared between its reader and the sweep (which may stop it).
#[derive(Debug)]
pub struct Watched {
    /// `None` once cut.
    recv: Mutex<Option<RecvStream>>,
    /// Tick of the last read that returned data, while no read followed it; 0 otherwise.
    since: AtomicU64,
    /// The reader waits for its app's bandwidth with what it read last (not held, but
    /// backlogged if the sender is faster: [`Watched::pace`]).
    pacing: AtomicBool,
    /// A read found nothing to read (its reader caught up with the sender) since the sweep
    /// last looked.
    caught_up: AtomicBool,
    /// The connection's loan: what its streams take from quinn is counted there.
    loan: Arc<Loan>,
    /// Counted as backlogged by the last sweep (its share is in the loan).
    counted: AtomicBool,
    clock: Arc<HoldClock>,
    /// For the log line of a cut: the app and the service the stream carries.
    app: Box<str>,
    service: Box<str>,
    /// Set when cut; `cut_waker` is the task of the splice carrying the stream.
    cut: AtomicBool,
    cut_waker: AtomicWaker,
    /// Set (before `cut`) when the cut was for the sender's reset, not for the budget.
    reset: AtomicBool,
}

impl Holds {
    /// The watch of `conn`'s streams, ticked by `clock`; its window borrows from `pool`.
    pub fn new(clock: Arc<HoldClock>, conn: quinn::Connection, pool: Arc<WindowPool>) -> Self {
        Holds {
            clock,
            streams: Mutex::new(Vec::new()),
            cut: AtomicU64::new(0),
            loan: Arc::new(Loan::new(conn, pool)),
        }
    }

    /// Receive window out of the pool for the connection now, beyond its own (bytes; lent,
    /// or owed after a shrink: [`crate::window_loan`]).
    pub fn window_lent(&self) -> u64 {
        self.loan.out()
    }

    /// The connection is over (its device reconnected or left): what it borrowed goes back
    /// now, not when the last of its streams lets go of it.
    pub fn release(&self) {
        self.loan.release();
    }

    /// Takes `recv` into watch; its reader reads it through [`Watched::poll`].
    pub fn watch(&self, recv: RecvStream, app: &str, service: &str) -> Arc<Watched> {
        let w = Arc::new(Watched {
            recv: Mutex::new(Some(recv)),
            since: AtomicU64::new(0),
            pacing: AtomicBool::new(false),
            // New: backlogged at the earliest after a whole tick.
            caught_up: AtomicBool::new(true),
            loan: self.loan.clone(),
            counted: AtomicBool::new(false),
            clock: self.clock.clone(),
            app: app.into(),
            service: service.into(),
            cut: AtomicBool::new(false),
            cut_waker: AtomicWaker::new(),
            reset: AtomicBool::new(false),
        });
        self.streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::downgrade(&w));
        w
    }

    /// Streams cut so far.
    pub fn cut_count(&self) -> u64 {
        self.cut.load(Ordering::Relaxed)
    }

    /// Forgets streams that ended, cuts the longest-held beyond [`HELD_BUDGET`] of those
    /// held for the stall time (`stall_ticks` ticks of period `tick`) with data waiting
    /// unread, and has the connection's window follow the backlogged streams left (module
    /// doc). Returns how many it cut.
    /// `peer` names the other end of the connection in the log lines.
    pub fn sweep(&self, stall_ticks: u64, tick: std::time::Duration, peer: &str) -> usize {
        let now = self.clock.now();
        let mut waiting: Vec<(u64, Arc<Watched>)> = Vec::new();
        {
            let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
            streams.retain(|w| {
                let Some(w) = w.upgrade() else {
                    return false;
                };
                let since = w.since.load(Ordering::Relaxed);
                // Only a reader that holds what it read is looked at: one waiting in quinn
                // at this sweep starts its whole tick at the next.
                // Not caught up for a whole tick: backlogged if data waits (one not read for a
                // tick caught up with nothing either).
                if (since != 0 || w.pacing.load(Ordering::Relaxed))
                    && !w.caught_up.swap(false, Ordering::Relaxed)
                {
                    waiting.push((since, w));
                } else {
                    w.counted.store(false, Ordering::Relaxed);
                }
                true
            });
        }
        // Those whose sender reset them are cut, whatever the budget; those with nothing
        // waiting unread hold no credit (their reader is slow to take the last of what it
        // read: cutting one frees nothing, loses its tail, and spares one that does hold).
        waiting.retain(|(since, w)| {
            let holds = w.look(*since, peer) == Look::HoldsData;
            if !holds {
                w.counted.store(false, Ordering::Relaxed);
            }
            holds
        });
        // `since` is the tick during which the read happened: held for the stall time once
        // more than `stall_ticks` ticks have begun since. A pacing reader is not held.
        let (mut held, backlogged): (Vec<_>, Vec<_>) = waiting
            .into_iter()
            .partition(|(since, _)| *since != 0 && now.saturating_sub(*since) > stall_ticks);
        // The last sweep's count stands for those to be cut until they are: a cut stream's
        // share comes off before its data is dropped ([`Loan::stream_ending`]).
        let cut = self.cut_held(&mut held, now, tick, peer);
        // `held` keeps those within the budget.
        for (_, w) in backlogged.iter().chain(held.iter()) {
            w.counted.store(true, Ordering::Relaxed);
        }
        let backlogged = backlogged.len() + held.len();
        let want = backlogged.saturating_sub(HELD_BUDGET) as u64 * u64::from(STREAM_WINDOW);
        self.loan.follow(want, backlogged, peer);
        cut
    }

    /// Cuts the longest-held of `held` beyond [`HELD_BUDGET`]; returns how many it cut.
    fn cut_held(
        &self,
        held: &mut Vec<(u64, Arc<Watched>)>,
        now: u64,
        tick: std::time::Duration,
        peer: &str,
    ) -> usize {
        if held.len() <= HELD_BUDGET {
            return 0;
        }
        held.sort_unstable_by_key(|(since, _)| *since);
        let over = held.len() - HELD_BUDGET;
        let mut cut = 0;
        for (since, w) in held.drain(..over) {
            // Gone meanwhile (only this list holds it): nothing to cut.
            if Arc::strong_count(&w) == 1 {
                continue;
            }
            let taken = {
                let mut recv = w.recv.lock().unwrap_or_else(PoisonError::into_inner);
                // Read again since the scan (reads run under this lock): not held any more.
                // Cut now, a reader whose last poll answered Pending would never be woken (its
                // waker goes with the stopped stream) and never see the cut.
                if w.since.load(Ordering::Relaxed) != since {
                    // Not counted this sweep (the discard of a cut one clears it too).
                    w.counted.store(false, Ordering::Relaxed);
                    continue;
                }
                // A cut stream holds nothing (its reads fail before they could mark it again).
                w.since.store(0, Ordering::Relaxed);
                recv.take()
            };
            if let Some(mut recv) = taken {
                w.discard(&mut recv);
                let _ = recv.stop(CUT_HELD);
                w.cut.store(true, Ordering::Release);
                w.cut_waker.wake();
                cut += 1;
                info!(
                    peer = %peer,
                    app = %w.app,
                    service = %w.service,
                    held_ms = (tick * u32::try_from(now - since).unwrap_or(u32::MAX)).as_millis() as u64,
                    budget = HELD_BUDGET,
                    "stream cut: its reader stopped reading while more streams of the connection were held than its flow-control window allows"
                );
            }
        }
        self.cut.fetch_add(cut as u64, Ordering::Relaxed);
        cut
    }
}

/// Until `shutdown`: every tick of the period [`sweep_timing`] gives `stall`, advances `clock`
/// and runs `sweep(tick, stall_ticks)` (the gateway's and the agent's sweeps).
pub async fn sweep_loop(
    clock: &HoldClock,
    stall: std::time::Duration,
    shutdown: &tokio_util::sync::CancellationToken,
    mut sweep: impl FnMut(std::time::Duration, u64),
) {
    let (tick, stall_ticks) = sweep_timing(stall);
    let mut every = tokio::time::interval(tick);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        clock.advance();
        sweep(tick, stall_ticks);
    }
}

/// The sweep's period and the stall time in its ticks: five ticks per `stall`, at most one a
/// second, at least 10 ms.
pub fn sweep_timing(stall: std::time::Duration) -> (std::time::Duration, u64) {
    const STALL_TICKS: u32 = 5;
    let tick = (stall / STALL_TICKS).clamp(
        std::time::Duration::from_millis(10),
        std::time::Duration::from_secs(1),
    );
    let stall_ticks = u64::try_from(stall.as_nanos() / tick.as_nanos().max(1))
        .unwrap_or(u64::MAX)
        .max(1);
    (tick, stall_ticks)
}

/// What the sweep finds at a stream it saw held ([`Watched::look`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Look {
    /// Read since, cut, or reset by its sender (and so cut now if held).
    NotHeld,
    /// Data waits unread: it holds that much of the connection's credit.
    HoldsData,
    /// Nothing waits (all of it read, or nothing more came).
    Empty,
}

impl Drop for Watched {
    /// What quinn holds of the stream is counted as its reader's ([`Watched::discard`]).
    fn drop(&mut self) {
        let recv = self.recv.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(mut r) = recv.take() {
            self.discard(&mut r);
        }
    }
}

impl Watched {
    /// Looks at a stream the sweep saw holding what it read last since tick `since` (0: pacing):
    /// cuts it if its sender reset it and its reader has not read since, and tells whether
    /// data waits in it.
    fn look(&self, since: u64, peer: &str) -> Look {
        let mut recv = self.recv.lock().unwrap_or_else(PoisonError::into_inner);
        // Read again since the scan (reads run under this lock): its reader may be waiting in
        // quinn for data now, and this look must not take its place there.
        if self.since.load(Ordering::Relaxed) != since
            || (since == 0 && !self.pacing.load(Ordering::Relaxed))
        {
            return Look::NotHeld;
        }
        let Some(r) = recv.as_mut() else {
            return Look::NotHeld;
        };
        // A read of no bytes, without a waker: it takes nothing (quinn hands back an empty
        // chunk while data waits) and fails if the stream was reset (a reset drops the data
        // buffered). Not `received_reset`: with all the stream's data and its end already
        // received it leaves its waker with quinn for good, as no later event of the stream
        // takes it (and quinn's debug builds assert on that when the stream is dropped). A
        // read leaves one only when more is to come, whose arrival takes it; it replaces no
        // reader's, as the reader's last read returned data (it holds what it read).
        // Whatever it finds, the reset is taken here: quinn reports it once, and a later
        // read would end like a clean end of the stream (a truncated download passed on as
        // whole), so the stream is cut, held or not.
        let read = pin!(r.read_chunk(0, true)).poll(&mut Context::from_waker(Waker::noop()));
        let code = match read {
            Poll::Ready(Err(quinn::ReadError::Reset(code))) => code,
            Poll::Ready(Ok(Some(_))) => return Look::HoldsData,
            Poll::Ready(Ok(None)) | Poll::Pending => return Look::Empty,
            // Lost with its connection, or stopped: the reader's next read says so.
            Poll::Ready(Err(_)) => return Look::NotHeld,
        };
        // quinn freed the stream's state with the reset; the reader is told at its next poll
        // (the cut), and the splice at once.
        recv.take();
        self.since.store(0, Ordering::Relaxed);
        self.pacing.store(false, Ordering::Relaxed);
        self.reset.store(true, Ordering::Relaxed);
        self.cut.store(true, Ordering::Release);
        self.cut_waker.wake();
        info!(
            peer = %peer,
            app = %self.app,
            service = %self.service,
            code = code.into_inner(),
            "stream reset by its sender while its reader was stuck writing: its connection ends"
        );
        Look::NotHeld
    }

    /// Whether a cut ([`Self::poll_cut`]) was for the sender's reset.
    pub fn was_reset(&self) -> bool {
        self.cut.load(Ordering::Acquire) && self.reset.load(Ordering::Relaxed)
    }

    /// Runs `read` on the receive side unless it was cut (then `None`). `got_data` tells
    /// whether the answer handed the reader data: the stream then counts as held until its
    /// reader reads again.
    pub(crate) fn poll<T>(
        &self,
        read: impl FnOnce(&mut RecvStream) -> T,
        got_data: impl FnOnce(&T) -> bool,
    ) -> Option<T> {
        let mut recv = self.recv.lock().unwrap_or_else(PoisonError::into_inner);
        let r = read(recv.as_mut()?);
        let since = if got_data(&r) {
            self.clock.now()
        } else {
            self.caught_up.store(true, Ordering::Relaxed);
            0
        };
        self.since.store(since, Ordering::Relaxed);
        Some(r)
    }

    /// Stops the receive side (a reader tearing its connection down), unless already cut.
    pub(crate) fn stop(&self, code: quinn::VarInt) {
        if let Some(r) = self
            .recv
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            self.discard(r);
            let _ = r.stop(code);
        }
    }

    /// Counts `n` bytes its reader took from quinn ([`Loan::consumed`]).
    pub(crate) fn took(&self, n: usize) {
        if n > 0 {
            self.loan.consumed().fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Takes and drops what quinn holds of the stream, counting it, before the stream is
    /// stopped or dropped (which would drop it uncounted): quinn's credit comes back for it
    /// either way, and the loan's debt is paid off only with what is counted. The chunks are
    /// quinn's own buffers: nothing is copied. No waker is left with quinn but for a stream
    /// about to be stopped.
    fn discard(&self, r: &mut RecvStream) {
        if self.counted.swap(false, Ordering::Relaxed) {
            self.loan.stream_ending();
        }
        let mut cx = Context::from_waker(Waker::noop());
        while let Poll::Ready(Ok(Some(chunk))) = pin!(r.read_chunk(usize::MAX, true)).poll(&mut cx)
        {
            self.took(chunk.bytes.len());
        }
    }

    /// Whether the stream was cut; until it is, `cx` is woken when it is. For the splice
    /// carrying the stream, which may be waiting on its other end only.
    pub fn poll_cut(&self, cx: &mut std::task::Context<'_>) -> bool {
        if self.cut.load(Ordering::Acquire) {
            return true;
        }
        self.cut_waker.register(cx.waker());
        self.cut.load(Ordering::Acquire)
    }

    /// The reader passed some of what it read on (a write of it made progress): it is not
    /// stuck, however long the rest takes to write — a read can hand over a few hundred KiB
    /// (32 of quinn's chunks), which a client reading 50 KiB/s takes seconds to take. A held
    /// mark starts again from now; nothing changes for a reader that is not held.
    pub fn progressed(&self) {
        if self.since.load(Ordering::Relaxed) != 0 {
            self.since.store(self.clock.now(), Ordering::Relaxed);
        }
    }

    /// The reader holds what it read from now on (its wait for the app's bandwidth is over,
    /// its write may stall): as if that read had just returned. Not once cut — a cut stream
    /// holds nothing, and marked it would count as held until its reader let go of it, and
    /// could have others cut — so under the receive side's lock, as the cut clears the mark.
    pub fn hold_from_now(&self) {
        let recv = self.recv.lock().unwrap_or_else(PoisonError::into_inner);
        self.pacing.store(false, Ordering::Relaxed);
        if recv.is_some() {
            self.since.store(self.clock.now(), Ordering::Relaxed);
        }
    }

    /// The reader is done with the stream for now (an idle pooled connection): it holds
    /// nothing, whatever its last read returned.
    pub fn rest(&self) {
        self.since.store(0, Ordering::Relaxed);
        self.pacing.store(false, Ordering::Relaxed);
    }

    /// The reader waits for its app's bandwidth with what it read last: pacing, not a reader
    /// that stopped taking data (a slow limit, 16 KiB at 2 KiB/s, is 8 s), so not held; but
    /// the stream is backlogged when its sender is faster than the limit, and counts so
    /// until [`Watched::hold_from_now`]. Follows a read that returned data.
    pub fn pace(&self) {
        self.pacing.store(true, Ordering::Relaxed);
        self.since.store(0, Ordering::Relaxed);
    }
}
