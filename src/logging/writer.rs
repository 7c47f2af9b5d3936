//! The log writer: one thread writes the lines of every logger, in batches.
//!
//! Lines are formatted by the thread that logs and appended to a shared buffer; a dedicated
//! writer thread takes everything buffered and writes it with one system call. A busy gateway
//! logs a line per request: written one by one, the `write(2)` calls alone cost ~5% of its CPU
//! (`perf` on the HTTP front under `wrk`, benches/RESULTS.md).
//!
//! The writer is ours rather than `tracing_appender::non_blocking`: that one sends each line
//! through a channel and wakes its writer per line, and under ~20k requests/s the per-line send,
//! the writer's spinning (`sched_yield`) and a futex wake per line cost ~8% of the gateway's CPU
//! on a 2-core machine. Here a logger wakes the writer only when the buffer goes from empty to
//! non-empty, and the writer then waits [`BATCH_DELAY`] so a batch gathers: one wake-up and one
//! `write(2)` per batch. An idle process causes no wake-ups at all (no timer).
//!
//! When the buffer is full ([`BUFFER_CAP`]: stderr took nothing for a while — a full pipe, a
//! terminal paused with Ctrl-S or `less`), new lines are dropped and counted, and the writer
//! says how many with the next lines it writes. Waiting instead froze the whole process: the
//! runtime threads that log a line per request stopped at the first line past the cap, and
//! with them every tunnel and connection. Dropping [`LogGuard`](super::LogGuard) writes out
//! what is buffered, waiting at most [`EXIT_WAIT`] for a stderr that takes nothing; lines
//! logged after that go straight to stderr.

use std::io::{self, Write};
use std::mem;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long the writer lets lines gather after the first one of a batch wakes it. At 20k
/// lines/s, 3 ms is ~60 lines per wake-up and `write(2)` instead of one; a person watching the
/// log (or journald's timestamps) does not notice 3 ms.
const BATCH_DELAY: Duration = Duration::from_millis(3);

/// Buffered bytes beyond which lines are dropped (a single line longer than this is still
/// taken, alone). ~7,000 lines of ~150 bytes: a batch at the load above is ~10 KiB, so only a
/// stalled stderr (a full pipe, a suspended terminal) fills it.
pub(super) const BUFFER_CAP: usize = 1 << 20;

/// Capacity the writer keeps in its spare buffer between batches, to reuse the allocation
/// under steady load. A burst can grow it towards [`BUFFER_CAP`]; past this it is freed, since
/// an idle home agent must stay small in RSS.
const KEEP_CAPACITY: usize = 256 << 10;

/// Starts the writer thread writing to `sink`, lines dropped beyond `cap` buffered bytes.
/// `sink` is a parameter so tests can capture the output.
pub(super) fn start(sink: Box<dyn Write + Send>, cap: usize) -> (BatchWriter, WriterThread) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            buf: Vec::new(),
            shutdown: false,
            dropped: 0,
            closed: false,
            flushed: false,
        }),
        after: Mutex::new(None),
        wake_writer: Condvar::new(),
        finished: Condvar::new(),
        cap,
        written: Arc::new(AtomicU64::new(0)),
    });
    let mut writer = Writer {
        shared: Arc::clone(&shared),
        sink: Box::new(Counting {
            inner: sink,
            written: Arc::clone(&shared.written),
        }),
        lost: 0,
    };
    // If the thread cannot be created, the closure (and `writer` in it) is dropped, which closes
    // the buffer: loggers then write straight to the sink, unbatched but not lost.
    let thread = thread::Builder::new()
        .name("zonegate-log".into())
        .spawn(move || writer.run())
        .ok();
    (
        BatchWriter {
            shared: Arc::clone(&shared),
        },
        WriterThread { shared, thread },
    )
}

struct Shared {
    state: Mutex<State>,
    /// Once the writer is gone (`closed`), its sink: loggers write to it directly. A lock of
    /// its own, never held with `state`'s while writing: a write that stalls (a full pipe)
    /// must not hold [`Finisher::finish`] past its limit, which waits on `state`.
    after: Mutex<Option<Box<dyn Write + Send>>>,
    /// The writer waits here: for a first line when idle, and during the batching delay.
    wake_writer: Condvar,
    /// Notified when the writer is gone (`closed` set): [`Finisher::finish`] waits here.
    finished: Condvar,
    cap: usize,
    /// Bytes the sink has taken: whether a stderr still takes what is written, however slowly
    /// ([`Finisher::finish`]).
    written: Arc<AtomicU64>,
}

/// The sink, counting what it takes in [`Shared::written`] (not holding [`Shared`], which
/// holds the sink once the writer is gone).
struct Counting {
    inner: Box<dyn Write + Send>,
    written: Arc<AtomicU64>,
}

/// Bytes handed to the sink in one write at most: stderr takes a whole write before it
/// returns (a pipe, a pty, journald's socket), and a batch of up to [`BUFFER_CAP`] in one
/// would show a slow stderr's progress only at its end.
const WRITE_AT_MOST: usize = 64 << 10;

impl Write for Counting {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(&data[..data.len().min(WRITE_AT_MOST)])?;
        self.written.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct State {
    /// Formatted lines not yet taken by the writer.
    buf: Vec<u8>,
    /// Set by dropping the guard: the writer writes what is left and exits.
    shutdown: bool,
    /// Lines dropped on a full buffer since the writer last took it: the writer skips its
    /// delay while there are any, and reports them.
    dropped: u64,
    /// The writer is gone: loggers write to [`Shared::after`] directly.
    closed: bool,
    /// The writer's last lines are written too: what [`Finisher::finish`] waits for.
    flushed: bool,
}

impl Shared {
    /// Logging must not panic because some other thread did: a poisoned lock's state is still
    /// consistent (every update to it is a single step).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues whole lines for the writer, or drops them (counted) when the buffer is full.
    fn push(&self, lines: &[u8], urgent: bool) {
        if lines.is_empty() {
            return;
        }
        let mut state = self.lock();
        if state.closed {
            drop(state);
            let mut after = self.after.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(sink) = after.as_mut() {
                // Errors ignored, as the writer does: stderr is where errors would go.
                let _ = sink.write_all(lines);
                let _ = sink.flush();
            }
            return;
        }
        // Warnings and errors may use an eighth more: a flood of request lines filling the
        // buffer must not drop the first line of a new problem with them.
        let cap = if urgent {
            self.cap + self.cap / 8
        } else {
            self.cap
        };
        if !state.buf.is_empty() && state.buf.len() + lines.len() > cap {
            state.dropped += 1;
            let first = state.dropped == 1;
            drop(state);
            // The writer may be in its batching delay: a full buffer should go out now (one
            // wake-up is enough, not one per line dropped).
            if first {
                self.wake_writer.notify_one();
            }
            return;
        }
        let was_empty = state.buf.is_empty();
        state.buf.extend_from_slice(lines);
        drop(state);
        // One wake-up per batch: a non-empty buffer means the writer is already awake (or about
        // to take it), and it looks again before it sleeps.
        if was_empty {
            self.wake_writer.notify_one();
        }
    }
}

/// The fmt layer's `MakeWriter`: each event gets a [`LineWriter`] onto the shared buffer.
#[derive(Clone)]
pub(super) struct BatchWriter {
    shared: Arc<Shared>,
}

impl BatchWriter {
    /// Queues one whole line as an error's (past the cap as [`Shared::push`] allows those).
    pub(super) fn push_error_line(&self, line: &[u8]) {
        self.shared.push(line, true);
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            shared: &self.shared,
            partial: Vec::new(),
            urgent: false,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        LineWriter {
            shared: &self.shared,
            partial: Vec::new(),
            urgent: *meta.level() <= tracing::Level::WARN,
        }
    }
}

/// Writes one event. The fmt layer writes each event as one whole line with one `write`, which
/// goes to the shared buffer without a copy here; a line arriving in pieces is gathered in
/// `partial` first, so that lines from other threads never land inside it.
pub(super) struct LineWriter<'a> {
    shared: &'a Shared,
    partial: Vec<u8>,
    /// A warning or an error ([`Shared::push`]).
    urgent: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.partial.is_empty() && data.ends_with(b"\n") {
            self.shared.push(data, self.urgent);
        } else {
            self.partial.extend_from_slice(data);
            if self.partial.ends_with(b"\n") {
                self.shared.push(&mem::take(&mut self.partial), self.urgent);
            }
        }
        Ok(data.len())
    }

    /// Nothing to do: whole lines are already with the writer thread, which writes them within
    /// [`BATCH_DELAY`]; an unfinished line goes when it is finished or this writer is dropped.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter<'_> {
    fn drop(&mut self) {
        // An event that did not end with a newline: still the event's own piece of output.
        self.shared.push(&mem::take(&mut self.partial), self.urgent);
    }
}

/// The writer thread's side. Dropping it (at the thread's end, or by unwinding) closes the
/// buffer, so that no logger ever waits for a writer that is gone.
struct Writer {
    shared: Arc<Shared>,
    sink: Box<dyn Write + Send>,
    /// Lines of batches whose write failed (a full disk under `2>>file`): told, with a line
    /// break first (the failed write may have ended mid-line), before the next batch.
    lost: u64,
}

impl Writer {
    fn run(&mut self) {
        let shared = Arc::clone(&self.shared);
        let mut spare = Vec::new();
        let mut state = shared.lock();
        loop {
            while state.buf.is_empty() && !state.shutdown {
                state = shared
                    .wake_writer
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.buf.is_empty() {
                return; // shut down, and everything written
            }
            // Let the batch gather, unless the process is exiting or lines are being dropped.
            state = shared
                .wake_writer
                .wait_timeout_while(state, BATCH_DELAY, |s| !s.shutdown && s.dropped == 0)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            mem::swap(&mut state.buf, &mut spare);
            let last = state.shutdown;
            let dropped = mem::take(&mut state.dropped);
            drop(state);
            if dropped > 0 {
                spare.extend_from_slice(dropped_notice(dropped).as_bytes());
            }
            self.write_batch(&spare, dropped);
            if last {
                // Whatever came meanwhile is written by `drop`: the guard's drop waits for at
                // most a few more writes, however busy the loggers are.
                return;
            }
            spare.clear();
            if spare.capacity() > KEEP_CAPACITY {
                spare = Vec::new();
            }
            state = shared.lock();
        }
    }
}

impl Writer {
    /// Writes one batch, whose last line may be the notice of `dropped` lines. A failed write
    /// cannot be reported anywhere but where it failed: its lines are counted (the notice as
    /// the lines it stood for), and told once a write works again.
    fn write_batch(&mut self, batch: &[u8], dropped: u64) {
        if self.lost > 0 {
            let notice = format!(
                "\nWARN zonegate: {} log lines lost: writing them to stderr failed (a full disk?)\n",
                self.lost
            );
            if self.sink.write_all(notice.as_bytes()).is_ok() {
                self.lost = 0;
            }
        }
        if self
            .sink
            .write_all(batch)
            .and_then(|()| self.sink.flush())
            .is_err()
        {
            let lines = batch.iter().filter(|&&b| b == b'\n').count() as u64;
            self.lost += lines + dropped.saturating_sub(1);
        }
    }

    /// Takes the lines buffered (with a notice of any dropped), leaving the buffer empty; and
    /// how many the notice stands for.
    fn take(state: &mut State) -> (Vec<u8>, u64) {
        let mut batch = mem::take(&mut state.buf);
        let dropped = mem::take(&mut state.dropped);
        if dropped > 0 {
            batch.extend_from_slice(dropped_notice(dropped).as_bytes());
        }
        (batch, dropped)
    }
}

impl Drop for Writer {
    /// Writes the lines pushed after `run`'s last swap (or left by a panic), never holding
    /// the state's lock while writing: [`Finisher::finish`] must be able to give up on a
    /// stderr that takes nothing, which it could not while a stalled write held the lock.
    fn drop(&mut self) {
        // A few rounds while loggers keep adding lines; the rest goes out as the buffer closes.
        for _ in 0..3 {
            let (batch, dropped) = Self::take(&mut self.shared.lock());
            if batch.is_empty() {
                break;
            }
            self.write_batch(&batch, dropped);
        }
        let sink = mem::replace(&mut self.sink, Box::new(io::sink()));
        let mut state = self.shared.lock();
        let (rest, _) = Self::take(&mut state);
        state.closed = true;
        // Taken before `state` is let go: a logger that sees `closed` waits for this lock,
        // so its line comes after `rest`.
        let mut after = self
            .shared
            .after
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        drop(state);
        let sink = after.insert(sink);
        let _ = sink.write_all(&rest);
        let _ = sink.flush();
        drop(after);
        // Only now: a finisher told earlier let the process exit (or join this thread, for
        // good) while `rest` was still being written.
        self.shared.lock().flushed = true;
        self.shared.finished.notify_all();
    }
}

/// The line that says lines were dropped.
fn dropped_notice(n: u64) -> String {
    format!("WARN zonegate: {n} log lines dropped: stderr took nothing while {} KiB of lines waited (a full pipe or a paused terminal)\n", BUFFER_CAP >> 10)
}

/// How long an exiting process waits for its buffered lines to be written. Longer only for a
/// stderr that takes nothing (a full pipe, a pager paused): waiting for that kept a stopped
/// process alive for good, deaf to SIGTERM and SIGINT (the runtime's handlers outlive it).
pub(super) const EXIT_WAIT: Duration = Duration::from_secs(2);
/// [`EXIT_WAIT`]s an exiting process waits at most for a stderr that still takes its lines,
/// slowly: 20 s, within systemd's stop timeout (90 s by default).
const SLOW_EXIT_WAITS: u32 = 10;

/// Owns the writer thread: dropping it writes out every buffered line and joins the thread,
/// waiting at most [`EXIT_WAIT`].
pub(super) struct WriterThread {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl WriterThread {
    /// A handle that can finish the writer from elsewhere (a second signal's exit).
    pub(super) fn finisher(&self) -> Finisher {
        Finisher(Arc::clone(&self.shared))
    }

    /// Writes out what is buffered and stops the writer, waiting at most `limit`; false if
    /// stderr took nothing meanwhile. Once: the drop that follows does not wait again.
    pub(super) fn finish(mut self, limit: Duration) -> bool {
        self.finish_once(limit)
    }

    fn finish_once(&mut self, limit: Duration) -> bool {
        let Some(thread) = self.thread.take() else {
            // Finished before (or the thread never started: `finish` says which).
            return self.finisher().finish(Duration::ZERO);
        };
        let done = self.finisher().finish(limit);
        if done {
            // Done writing: the join is at once. (A panicked writer has closed the buffer on
            // its way out, `Writer`'s drop.)
            let _ = thread.join();
        }
        // Otherwise the writer is stuck in a write: left behind, the process exits without it.
        done
    }
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        self.finish_once(EXIT_WAIT);
    }
}

/// Ends the writer thread: what is buffered is written, later lines go straight to the sink.
#[derive(Clone)]
pub(super) struct Finisher(Arc<Shared>);

impl Finisher {
    /// Asks the writer to write what is buffered and stop, and waits until it has: `limit` at a
    /// time while stderr takes something in each (a slow terminal over SSH, a busy journald
    /// draining a backlog), at most [`SLOW_EXIT_WAITS`] of them. True if it has (or there was
    /// none: its thread could not start); false if stderr took nothing for a whole `limit`, or
    /// still had not taken everything. Given up after one `limit` however slowly it moved, a
    /// failing command's last `error:` line was left out.
    pub(super) fn finish(&self, limit: Duration) -> bool {
        self.finish_waiting(limit, SLOW_EXIT_WAITS)
    }

    /// [`Finisher::finish`] for an exit a second signal asked for: one `limit` at most,
    /// however steadily stderr moves.
    pub(super) fn finish_now(&self, limit: Duration) -> bool {
        self.finish_waiting(limit, 1)
    }

    fn finish_waiting(&self, limit: Duration, waits: u32) -> bool {
        let shared = &*self.0;
        let mut state = shared.lock();
        state.shutdown = true;
        shared.wake_writer.notify_one();
        for _ in 0..waits {
            let before = shared.written.load(Ordering::Relaxed);
            state = shared
                .finished
                .wait_timeout_while(state, limit, |s| !s.flushed)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            if state.flushed || shared.written.load(Ordering::Relaxed) == before {
                break;
            }
        }
        state.flushed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A sink the test can read: everything written, and the size of each `write` call.
    #[derive(Clone, Default)]
    struct Capture {
        out: Arc<Mutex<Vec<u8>>>,
        writes: Arc<Mutex<Vec<usize>>>,
    }

    impl Write for Capture {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.out.lock().unwrap().extend_from_slice(data);
            self.writes.lock().unwrap().push(data.len());
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8(self.out.lock().unwrap().clone()).unwrap()
        }
    }

    /// A slow sink: each write waits until the test drops the sender (a stalled stderr).
    struct Gated {
        gate: mpsc::Receiver<()>,
        inner: Capture,
    }

    impl Write for Gated {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            let _ = self.gate.recv();
            self.inner.write(data)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_and_in_order() {
        const THREADS: usize = 8;
        const LINES: usize = 2_000;
        let capture = Capture::default();
        let (make, thread) = start(Box::new(capture.clone()), BUFFER_CAP);
        thread::scope(|s| {
            for t in 0..THREADS {
                let make = &make;
                s.spawn(move || {
                    for n in 0..LINES {
                        let line = format!("thread {t} line {n} {}\n", "x".repeat(n % 50));
                        let mut w = make.make_writer();
                        if n % 3 == 0 {
                            // In pieces, as a writer other than the fmt layer might.
                            let (a, b) = line.as_bytes().split_at(line.len() / 2);
                            w.write_all(a).unwrap();
                            w.write_all(b).unwrap();
                        } else {
                            w.write_all(line.as_bytes()).unwrap();
                        }
                    }
                });
            }
        });
        // Finished explicitly with a long limit: a drop waits EXIT_WAIT at most, then leaves
        // the lines unwritten, which a loaded machine can take.
        assert!(
            thread.finish(Duration::from_secs(30)),
            "the writer never finished"
        );
        let text = capture.text();
        let mut next = [0; THREADS];
        for line in text.lines() {
            let words: Vec<&str> = line.split(' ').collect();
            assert_eq!(words.len(), 5, "split or merged line: {line:?}");
            let t: usize = words[1].parse().unwrap();
            let n: usize = words[3].parse().unwrap();
            assert_eq!(n, next[t], "thread {t} out of order");
            assert_eq!(words[4], "x".repeat(n % 50), "damaged line: {line:?}");
            next[t] += 1;
        }
        assert_eq!(next, [LINES; THREADS]);
    }

    #[test]
    fn dropping_the_guard_writes_everything_and_later_lines_go_direct() {
        let capture = Capture::default();
        let (make, thread) = start(Box::new(capture.clone()), BUFFER_CAP);
        let mut expected = String::new();
        for n in 0..100 {
            let line = format!("line {n}\n");
            make.make_writer().write_all(line.as_bytes()).unwrap();
            expected.push_str(&line);
        }
        // Within the batching delay: the drop must not wait for it to be of any use. Waited
        // for first with a long limit (the drop's own wait is EXIT_WAIT, which a loaded
        // machine can take); the drop then finds the writer finished and joins it.
        assert!(thread.finisher().finish(Duration::from_secs(30)));
        drop(thread);
        assert_eq!(capture.text(), expected);

        make.make_writer().write_all(b"after the guard\n").unwrap();
        expected.push_str("after the guard\n");
        assert_eq!(capture.text(), expected);
    }

    /// Finishing writes out what is buffered at once (a second signal's exit comes next); a
    /// stderr that takes nothing holds the exit for the limit only, not for good.
    #[test]
    fn finishing_writes_what_is_buffered_and_gives_up_on_a_stuck_sink() {
        let capture = Capture::default();
        let (make, thread) = start(Box::new(capture.clone()), BUFFER_CAP);
        make.make_writer().write_all(b"last words\n").unwrap();
        assert!(thread.finisher().finish(Duration::from_secs(30)));
        assert_eq!(capture.text(), "last words\n");
        // Later lines go straight to the sink, unbatched.
        make.make_writer().write_all(b"after\n").unwrap();
        assert_eq!(capture.text(), "last words\nafter\n");
        drop(thread);

        let (open, gate) = mpsc::channel::<()>();
        let stuck = Gated {
            gate,
            inner: capture.clone(),
        };
        let (make, thread) = start(Box::new(stuck), BUFFER_CAP);
        make.make_writer().write_all(b"never taken\n").unwrap();
        let started = std::time::Instant::now();
        assert!(!thread.finisher().finish(Duration::from_millis(200)));
        drop(thread);
        // Two waits of their limits (200 ms, then EXIT_WAIT), not for ever.
        assert!(started.elapsed() < EXIT_WAIT + Duration::from_secs(20));
        assert!(!capture.text().contains("never"));
        drop(open);

        // Finishing the thread itself waits once: its drop does not wait again (an exit
        // took two waits, 4 s, for a stderr that takes nothing).
        let (open, gate) = mpsc::channel::<()>();
        let stuck = Gated {
            gate,
            inner: capture.clone(),
        };
        let (make, thread) = start(Box::new(stuck), BUFFER_CAP);
        make.make_writer()
            .write_all(b"never taken either\n")
            .unwrap();
        let started = std::time::Instant::now();
        assert!(!thread.finish(Duration::from_millis(300)));
        assert!(
            started.elapsed() < Duration::from_millis(300) + EXIT_WAIT,
            "{:?}",
            started.elapsed()
        );
        drop(open);
    }

    /// The lines that came during the writer's last batch are written as it closes; a stderr
    /// that stalls then must not hold [`Finisher::finish`] past its limit (that write held the
    /// state's lock, which the finisher's wait must take back to return: a second signal's
    /// exit waited for good).
    #[test]
    fn finishing_gives_up_on_a_sink_that_stalls_as_the_writer_closes() {
        let capture = Capture::default();
        let (open, gate) = mpsc::channel::<()>();
        let sink = Gated {
            gate,
            inner: capture.clone(),
        };
        let (make, thread) = start(Box::new(sink), BUFFER_CAP);
        make.make_writer().write_all(b"a\n").unwrap();
        let finisher = thread.finisher();
        let (done_tx, done) = mpsc::channel();
        let finishing = thread::spawn(move || {
            let _ = done_tx.send(finisher.finish(Duration::from_millis(300)));
        });
        // The writer takes "a" and waits in its write; "b" comes meanwhile, for the close.
        let t = std::time::Instant::now();
        while !make.shared.lock().buf.is_empty() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the writer never took its batch"
            );
            thread::sleep(Duration::from_millis(1));
        }
        make.make_writer().write_all(b"b\n").unwrap();
        open.send(()).unwrap();
        let finished = done.recv_timeout(Duration::from_secs(10));
        assert_eq!(finished, Ok(false), "finish waited past its limit");
        drop(open);
        finishing.join().unwrap();
        // Finished explicitly with a long limit: a drop waits EXIT_WAIT at most, then leaves
        // the lines unwritten, which a loaded machine can take.
        assert!(
            thread.finish(Duration::from_secs(30)),
            "the writer never finished"
        );
        assert_eq!(capture.text(), "a\nb\n");
    }

    /// A write that fails (a full disk under `2>>file`) loses its lines: they are counted and
    /// told once writing works again, on a line of their own.
    #[test]
    fn lines_of_a_failed_write_are_counted_and_told() {
        struct Failing {
            fail: Arc<std::sync::atomic::AtomicBool>,
            inner: Capture,
        }
        impl Write for Failing {
            fn write(&mut self, data: &[u8]) -> io::Result<usize> {
                if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                    // Part of it, as a disk filling up mid-write.
                    self.inner.write(&data[..data.len().min(3)])?;
                    return Err(io::Error::from_raw_os_error(28));
                }
                self.inner.write(data)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let capture = Capture::default();
        let sink = Failing {
            fail: fail.clone(),
            inner: capture.clone(),
        };
        let (make, thread) = start(Box::new(sink), BUFFER_CAP);
        make.make_writer().write_all(b"one\ntwo\n").unwrap();
        let t = std::time::Instant::now();
        while capture.text().is_empty() {
            assert!(t.elapsed() < Duration::from_secs(10), "nothing written");
            thread::sleep(Duration::from_millis(1));
        }
        fail.store(false, std::sync::atomic::Ordering::SeqCst);
        make.make_writer().write_all(b"three\n").unwrap();
        // Finished explicitly with a long limit: a drop waits EXIT_WAIT at most, then leaves
        // the lines unwritten, which a loaded machine can take.
        assert!(
            thread.finish(Duration::from_secs(30)),
            "the writer never finished"
        );
        assert_eq!(
            capture.text(),
            "one\nWARN zonegate: 2 log lines lost: writing them to stderr failed (a full disk?)\nthree\n"
        );
    }

    /// Lines dropped while a write stalled, whose notice then fails to write with its batch,
    /// are counted as lost, each (they were counted as the notice's one line).
    #[test]
    fn lines_dropped_before_a_failed_write_are_counted_lost() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        struct StallThenFail {
            gate: mpsc::Receiver<()>,
            calls: Arc<AtomicUsize>,
            failed: mpsc::Sender<()>,
            inner: Capture,
        }
        impl Write for StallThenFail {
            fn write(&mut self, data: &[u8]) -> io::Result<usize> {
                // 1: the first batch, stalled then failing; 2: the notice of its lost line;
                // 3: the batch of what was buffered meanwhile, with the notice of the dropped.
                let call = self.calls.fetch_add(1, SeqCst) + 1;
                if call == 1 {
                    let _ = self.gate.recv();
                }
                if call <= 3 {
                    if call == 3 {
                        let _ = self.failed.send(());
                    }
                    return Err(io::Error::from_raw_os_error(5));
                }
                self.inner.write(data)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        const CAP: usize = 100;
        let capture = Capture::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let (open, gate) = mpsc::channel();
        let (failed, third_failed) = mpsc::channel();
        let sink = StallThenFail {
            gate,
            calls: calls.clone(),
            failed,
            inner: capture.clone(),
        };
        let (make, thread) = start(Box::new(sink), CAP);
        make.make_writer().write_all(b"first\n").unwrap();
        let t = std::time::Instant::now();
        while calls.load(SeqCst) == 0 {
            assert!(t.elapsed() < Duration::from_secs(10), "nothing written");
            thread::sleep(Duration::from_millis(1));
        }
        for n in 0..50 {
            make.make_writer()
                .write_all(format!("line {n:04}\n").as_bytes())
                .unwrap();
        }
        assert!(make.shared.lock().dropped > 0);
        drop(open);
        third_failed
            .recv_timeout(Duration::from_secs(30))
            .expect("the buffered lines' write");
        make.make_writer().write_all(b"last\n").unwrap();
        assert!(
            thread.finish(Duration::from_secs(30)),
            "the writer never finished"
        );
        assert_eq!(
            capture.text(),
            "\nWARN zonegate: 51 log lines lost: writing them to stderr failed (a full disk?)\nlast\n"
        );
    }

    /// An exiting process waits for a stderr that takes its lines slowly but steadily (a slow
    /// terminal over SSH), past one wait: given up after it, the last lines (a failing
    /// command's `error:` line) were left out.
    #[test]
    fn finishing_waits_for_a_slow_stderr_that_keeps_taking() {
        // Takes each write whole before it returns, as stderr does, slowly: 100 ms for each
        // 64 KiB.
        struct Slow(Capture);
        impl Write for Slow {
            fn write(&mut self, data: &[u8]) -> io::Result<usize> {
                let chunks = (data.len() as u64).div_ceil(64 << 10);
                thread::sleep(Duration::from_millis(100 * chunks));
                self.0.write(data)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let capture = Capture::default();
        let (make, thread) = start(Box::new(Slow(capture.clone())), 4 << 20);
        // 3 MiB in one batch, taken 64 KiB (WRITE_AT_MOST) a write: about five seconds, more
        // than one wait of a second (wide margins: only a stall of a whole second between two
        // writes fails it).
        let line = format!("{}\n", "x".repeat(1023));
        let text = line.repeat(3 * 1024);
        make.make_writer().write_all(text.as_bytes()).unwrap();
        assert!(
            thread.finish(Duration::from_secs(1)),
            "given up on a stderr taking it all"
        );
        assert_eq!(capture.text(), text);
    }

    /// A stalled stderr must not stop the loggers (a runtime thread logging a request): past
    /// the cap lines are dropped, counted, and the count written with the next batch.
    #[test]
    fn a_full_buffer_drops_lines_and_says_how_many_instead_of_blocking() {
        const CAP: usize = 100;
        let capture = Capture::default();
        let (open, gate) = mpsc::channel();
        let sink = Gated {
            gate,
            inner: capture.clone(),
        };
        let (make, thread) = start(Box::new(sink), CAP);
        let lines: Vec<String> = (0..50).map(|n| format!("line {n:04}\n")).collect();
        // 500 bytes against a 100-byte cap and a sink that takes nothing: every line is
        // logged at once all the same.
        for line in &lines {
            make.make_writer().write_all(line.as_bytes()).unwrap();
        }
        assert!(make.shared.lock().buf.len() <= CAP);
        // A warning still has room (an eighth more): the first line of a new problem is not
        // lost to a flood of request lines. Another request line is.
        let mut warn = LineWriter {
            shared: &make.shared,
            partial: Vec::new(),
            urgent: true,
        };
        warn.write_all(b"warn 0001\n").unwrap();
        drop(warn);
        make.make_writer().write_all(b"line 9999\n").unwrap();
        drop(open);
        // Finished explicitly with a long limit: a drop waits EXIT_WAIT at most, then leaves
        // the lines unwritten, which a loaded machine can take.
        assert!(
            thread.finish(Duration::from_secs(30)),
            "the writer never finished"
        );
        let text = capture.text();
        assert!(text.contains("warn 0001\n"), "{text}");
        assert!(!text.contains("line 9999"), "{text}");
        let kept = text.lines().filter(|l| l.starts_with("line ")).count();
        assert!((10..50).contains(&kept), "{text}");
        // One notice per batch that followed drops: together, every line not kept.
        let told: usize = text
            .lines()
            .filter_map(|l| l.strip_prefix("WARN zonegate: "))
            .filter_map(|l| l.split(' ').next()?.parse::<usize>().ok())
            .sum();
        assert_eq!(told, 51 - kept, "{text}");
        // The lines kept are whole and in order.
        let kept_lines: Vec<&str> = text.lines().filter(|l| l.starts_with("line ")).collect();
        let mut sorted = kept_lines.clone();
        sorted.sort();
        assert_eq!(kept_lines, sorted);
    }
}
