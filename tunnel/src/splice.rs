//! Copying bytes both ways between two ends of a proxied connection, counting them, and
//! tearing both ends down abortively when the copy fails.
//!
//! Bytes move as [`Bytes`] chunks: a QUIC stream end hands over the chunks quinn received
//! (slices of the decrypted datagrams) and takes ownership of the chunks it sends, so a byte
//! crossing between TCP and a tunnel stream is copied by the kernel and by packet assembly,
//! not also into and out of a copy buffer (that was ~a third of the memcpy in bulk
//! transfers, benches/RESULTS.md).

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::holds::Watched;

/// One end of a proxied connection, as [`splice`] moves bytes through it.
///
/// It can be ended abortively. A copy that failed part way must not look like one that
/// finished: a plain close (TCP FIN, QUIC FIN) after a truncated transfer tells the reader
/// "that was all of it". Aborting makes the next hop see an error (TCP RST, QUIC
/// RESET_STREAM), which it passes on the same way, end to end.
///
/// Reads and writes go by chunks; the defaults copy through `AsyncRead`/`AsyncWrite` (a
/// reused buffer, vectored writes), and ends that hold their bytes as [`Bytes`] anyway (a
/// QUIC stream) pass them without copying.
pub trait End: AsyncRead + AsyncWrite + Unpin {
    /// Called once the copy has failed; the end is dropped soon after.
    fn abort(&mut self);

    /// Called instead of [`End::abort`] when the copy failed after everything for this end
    /// was written and its sending half closed cleanly: that data must still arrive (a
    /// service's whole answer to an upload it refused early), so only receiving is torn
    /// down. A reset after the end threw away what was not yet acknowledged.
    fn abort_receiving(&mut self) {
        self.abort()
    }

    /// The held-stream watch of this end's receive side, if it has one: a cut
    /// ([`crate::holds`]) ends the splice, which may be stuck writing to the other end and
    /// would never read this one again to see it.
    fn cut_signal(&self) -> Option<Arc<Watched>> {
        None
    }

    /// Whether what is written into this end reaches its far side: `None` while that is still
    /// to be told (an early-opened stream before the acceptor's reply), `Some(false)` once
    /// refused. A [`Counted`] end holds back what is written meanwhile.
    fn accepted(&self) -> Option<bool> {
        Some(true)
    }

    /// Reads what is available, appending it to `out` as chunks: the number of bytes, 0 at the
    /// end of the stream. `room` is the caller's buffer for ends that read by copying.
    fn poll_read_chunks(
        &mut self,
        cx: &mut Context<'_>,
        room: &mut ReadRoom,
        out: &mut VecDeque<Bytes>,
    ) -> Poll<io::Result<usize>> {
        room.poll_read(cx, self, out)
    }

    /// Writes from the front of `chunks`, removing what was written (a chunk written in part
    /// keeps its rest): the number of bytes written.
    fn poll_write_chunks(
        &mut self,
        cx: &mut Context<'_>,
        chunks: &mut VecDeque<Bytes>,
    ) -> Poll<io::Result<usize>> {
        let n = if chunks.len() > 1 && self.is_write_vectored() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let k = chunks.len().min(MAX_SLICES);
            for (s, c) in slices.iter_mut().zip(chunks.iter()) {
                *s = IoSlice::new(c);
            }
            ready!(Pin::new(&mut *self).poll_write_vectored(cx, &slices[..k]))?
        } else {
            let Some(first) = chunks.front() else {
                return Poll::Ready(Ok(0));
            };
            ready!(Pin::new(&mut *self).poll_write(cx, first))?
        };
        consume(chunks, n);
        Poll::Ready(Ok(n))
    }
}

/// One end of an app's connection, adding what is written into it to the app's counters as
/// it goes: into the tunnel's end, the app's `bytes_in` ([`Flow::In`]); into the client's, its
/// `bytes_out`. Writes only: what was read and then dropped (a copy that failed, a direction
/// draining) did not move. Added when the connection ended, a two-day SSH session showed
/// nothing in `/status` and `/metrics` until it closed (then all at once), and a restart lost
/// it all. What is written into an end not yet accepted ([`End::accepted`]: an early-opened
/// stream before the device's reply) is counted once it is, and never if it is refused: a
/// client retrying a service that was down counted its bytes as the app's `bytes_in`.
pub struct Counted<'a, E: End + ?Sized, T: Tally = policies::accounting::AppCounters> {
    pub inner: &'a mut E,
    pub counters: &'a T,
    pub writes: Flow,
    /// Written while `inner` was not yet accepted: counted once it is.
    held: u64,
}

/// An app's connection's two ends, counted ([`Counted`]): what is written to the client is
/// its `bytes_out`, what is written into the tunnel its `bytes_in`.
pub fn counted<'a, C: End + ?Sized, T: End + ?Sized, Y: Tally>(
    client: &'a mut C,
    tunnel: &'a mut T,
    counters: &'a Y,
) -> (Counted<'a, C, Y>, Counted<'a, T, Y>) {
    (
        Counted {
            inner: client,
            counters,
            writes: Flow::Out,
            held: 0,
        },
        Counted {
            inner: tunnel,
            counters,
            writes: Flow::In,
            held: 0,
        },
    )
}

/// Byte counts a [`Counted`] end adds to as it is written: an app's, a mesh peer's.
pub trait Tally {
    /// `n` bytes written towards the service (`Flow::In`) or the client (`Flow::Out`).
    fn add(&self, flow: Flow, n: u64);
}

impl Tally for policies::accounting::AppCounters {
    fn add(&self, flow: Flow, n: u64) {
        match flow {
            Flow::In => self.bytes_in(n),
            Flow::Out => self.bytes_out(n),
        }
    }
}

impl<T: Tally + ?Sized> Tally for Arc<T> {
    fn add(&self, flow: Flow, n: u64) {
        (**self).add(flow, n)
    }
}

/// Which of an app's byte counts a [`Counted`] end's writes add to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Towards the service: `bytes_in`.
    In,
    /// Towards the client: `bytes_out`.
    Out,
}

impl<E: End + ?Sized, T: Tally> Counted<'_, E, T> {
    fn count(&mut self, n: usize) {
        self.settle();
        if n == 0 {
            return;
        }
        match self.inner.accepted() {
            None => self.held += n as u64,
            Some(true) => self.add(n as u64),
            // Refused: what quinn took still goes nowhere (it is stopped, unread).
            Some(false) => {}
        }
    }

    fn add(&self, n: u64) {
        self.counters.add(self.writes, n);
    }

    /// Counts what was held back once `inner` was accepted; forgets it once refused.
    fn settle(&mut self) {
        if self.held == 0 {
            return;
        }
        match self.inner.accepted() {
            None => {}
            Some(true) => {
                let n = std::mem::take(&mut self.held);
                self.add(n);
            }
            Some(false) => self.held = 0,
        }
    }
}

impl<E: End + ?Sized, T: Tally> Drop for Counted<'_, E, T> {
    fn drop(&mut self) {
        self.settle();
    }
}

impl<E: End + ?Sized, T: Tally> End for Counted<'_, E, T> {
    fn abort(&mut self) {
        self.inner.abort()
    }
    fn abort_receiving(&mut self) {
        self.inner.abort_receiving()
    }
    fn cut_signal(&self) -> Option<Arc<Watched>> {
        self.inner.cut_signal()
    }
    fn accepted(&self) -> Option<bool> {
        self.inner.accepted()
    }
    fn poll_read_chunks(
        &mut self,
        cx: &mut Context<'_>,
        room: &mut ReadRoom,
        out: &mut VecDeque<Bytes>,
    ) -> Poll<io::Result<usize>> {
        // A read is what brings the acceptor's reply in.
        let r = self.inner.poll_read_chunks(cx, room, out);
        self.settle();
        r
    }
    fn poll_write_chunks(
        &mut self,
        cx: &mut Context<'_>,
        chunks: &mut VecDeque<Bytes>,
    ) -> Poll<io::Result<usize>> {
        let n = ready!(self.inner.poll_write_chunks(cx, chunks))?;
        self.count(n);
        Poll::Ready(Ok(n))
    }
}

impl<E: End + ?Sized, T: Tally> AsyncRead for Counted<'_, E, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        self.settle();
        r
    }
}

impl<E: End + ?Sized, T: Tally> AsyncWrite for Counted<'_, E, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut *self.inner).poll_write(cx, buf))?;
        self.count(n);
        Poll::Ready(Ok(n))
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut *self.inner).poll_write_vectored(cx, bufs))?;
        self.count(n);
        Poll::Ready(Ok(n))
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Chunks given to one vectored write: a QUIC read yields up to [`READ_CHUNKS`] chunks.
const MAX_SLICES: usize = 64;
/// Chunks taken from a QUIC stream per read (each one packet's STREAM frame, ~1.2 KB).
pub const READ_CHUNKS: usize = 32;

/// One read from `r` of at most `max` bytes into a new buffer of at most `cap` bytes: for
/// ends that read by copying but whose caller wants the bytes as a chunk. `None` at the end.
pub fn poll_read_owned<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    cx: &mut Context<'_>,
    max: usize,
    cap: usize,
) -> Poll<io::Result<Option<Bytes>>> {
    // `take`: the buffer may have more room than asked, and bytes past `max` are not ours.
    let mut buf = BytesMut::with_capacity(max.min(cap));
    let mut limited = tokio::io::AsyncReadExt::take(r, max as u64);
    let n = ready!(tokio_util::io::poll_read_buf(
        Pin::new(&mut limited),
        cx,
        &mut buf
    ))?;
    Poll::Ready(Ok((n > 0).then(|| buf.freeze())))
}

/// Drops the first `n` bytes of `chunks`.
pub fn consume(chunks: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let Some(first) = chunks.front_mut() else {
            return;
        };
        if first.len() > n {
            first.advance(n);
            return;
        }
        n -= first.len();
        chunks.pop_front();
    }
    while chunks.front().is_some_and(|c| c.is_empty()) {
        chunks.pop_front();
    }
}

/// Whether write error `e` says only that the writer's peer stopped reading (QUIC
/// STOP_SENDING): what that peer sends still ends on its own, with a FIN or a reset that can
/// be told apart, so the other direction runs on to it. A service that answers and closes
/// while the client still uploads is seen this way from the gateway, and its answer was cut
/// off by a reset when the stop arrived before all of it had been passed on. A TCP reset is
/// not such a stop: the kernel reports it once, and a read after it ends like a clean close.
pub fn peer_stopped_reading(e: &io::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(quinn::WriteError::Stopped(_)) = c.downcast_ref::<quinn::WriteError>() {
            return true;
        }
        // io::Error wraps its payload without naming it as the source.
        cause = match c.downcast_ref::<io::Error>() {
            Some(io) => io.get_ref().map(|i| i as _),
            None => c.source(),
        };
    }
    false
}

impl End for tokio::net::TcpStream {
    fn abort(&mut self) {
        // SO_LINGER 0: closing sends RST instead of FIN, and never blocks.
        let _ = self.set_zero_linger();
    }
    fn abort_receiving(&mut self) {
        // A plain close, no SO_LINGER 0: the FIN already queued goes after the data before
        // it. (Linux still answers with a reset, dropping what is unsent, when the peer's
        // data waits unread: client ends linger instead, `crate::linger::Lingering`.)
    }
}

impl<T: End + ?Sized> End for &mut T {
    fn abort(&mut self) {
        (**self).abort()
    }
    fn abort_receiving(&mut self) {
        (**self).abort_receiving()
    }
    fn cut_signal(&self) -> Option<Arc<Watched>> {
        (**self).cut_signal()
    }
    fn accepted(&self) -> Option<bool> {
        (**self).accepted()
    }
    fn poll_read_chunks(
        &mut self,
        cx: &mut Context<'_>,
        room: &mut ReadRoom,
        out: &mut VecDeque<Bytes>,
    ) -> Poll<io::Result<usize>> {
        (**self).poll_read_chunks(cx, room, out)
    }
    fn poll_write_chunks(
        &mut self,
        cx: &mut Context<'_>,
        chunks: &mut VecDeque<Bytes>,
    ) -> Poll<io::Result<usize>> {
        (**self).poll_write_chunks(cx, chunks)
    }
}

/// Per-direction read buffer of a new splice: most proxied connections carry a request and an
/// answer of a few KiB. Its reservation doubles each time a read fills the room it had, up to
/// [`COPY_BUF`].
pub const COPY_BUF_START: usize = 8 * 1024;
/// Largest per-direction read reservation: 64 KiB keeps syscalls and QUIC frames large in bulk
/// transfers (16 KiB lost ~15 % of bulk throughput, 256 KiB lost too: benches/RESULTS.md).
///
/// Starting every connection at 64 KiB, as tokio's `copy_bidirectional` did here, cost each
/// new connection two zeroed 64 KiB allocations on the gateway and two on the node (memset and
/// the page faults behind it were ~12 % of the gateway's CPU under `Connection: close` load).
pub const COPY_BUF: usize = 64 * 1024;
/// A read is given at least this much room; less left in the buffer, and it reserves more.
const MIN_ROOM: usize = 4 * 1024;

/// The buffer an [`End`] that reads by copying reads into. What a read fills is split off as
/// a chunk; once the chunks are written and dropped the space is reused (or, while a writer
/// still holds them, as a QUIC stream does until they are acknowledged, a new one is taken).
/// Never zeroed: reads go into its spare capacity.
#[derive(Debug, Default)]
pub struct ReadRoom {
    buf: BytesMut,
    /// What the next reservation asks for.
    size: usize,
}

impl ReadRoom {
    /// One read from `r` into the buffer's spare room; what it read is appended to `out`.
    pub fn poll_read<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        out: &mut VecDeque<Bytes>,
    ) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < MIN_ROOM {
            self.size = self.size.clamp(COPY_BUF_START, COPY_BUF);
            self.buf.reserve(self.size);
        }
        let room = self.buf.capacity() - self.buf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(r),
            cx,
            &mut self.buf
        ))?;
        if n > 0 {
            if n == room && self.size < COPY_BUF {
                self.size *= 2;
            }
            out.push_back(self.buf.split().freeze());
        }
        Poll::Ready(Ok(n))
    }

    /// Gives the buffer back (a direction that is done).
    fn release(&mut self) {
        *self = ReadRoom::default();
    }
}

/// Bytes moved by a finished splice, and the error that ended it early, if any. Counts are
/// exact even on error, so logs never claim "0 bytes" for a connection that carried data.
#[derive(Debug, Default)]
pub struct Moved {
    /// From `a` to `b`.
    pub a_to_b: u64,
    /// From `b` to `a`.
    pub b_to_a: u64,
    pub error: Option<io::Error>,
    /// Why the `stop` of [`splice_until`] / [`splice_shaped_until`] ended it, if it did.
    pub stopped: Option<String>,
}

impl Moved {
    /// Ended by both directions finishing: no error, not stopped.
    pub fn is_clean(&self) -> bool {
        self.error.is_none() && self.stopped.is_none()
    }

    /// How the connection ended, for logs: `closed` (both directions finished) or
    /// `aborted: ERROR` (the copy failed and both ends were reset).
    pub fn end(&self) -> String {
        match &self.error {
            None => "closed".to_owned(),
            Some(e) => format!("aborted: {e}"),
        }
    }
}

/// Copies until both directions are done (each EOF is passed on as a half-close) or one fails;
/// on failure both ends are aborted (see [`End`]).
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> Moved
where
    A: End + ?Sized,
    B: End + ?Sized,
{
    splice_until(a, b, std::future::pending()).await
}

/// [`splice`], ended early (both ends aborted) when `stop` resolves, with its reason as the
/// error: what moved until then is still counted (a connection the policy stopped allowing).
pub async fn splice_until<A, B, S>(a: &mut A, b: &mut B, stop: S) -> Moved
where
    A: End + ?Sized,
    B: End + ?Sized,
    S: Future<Output = String>,
{
    let (mut a_b, mut b_a) = (Pump::default(), Pump::default());
    let cuts = [a.cut_signal(), b.cut_signal()];
    tokio::pin!(stop);
    let mut stopped = None;
    let r = std::future::poll_fn(|cx| {
        if let Poll::Ready(why) = stop.as_mut().poll(cx) {
            stopped = Some(why.clone());
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionAborted, why)));
        }
        poll_cuts(&cuts, cx)?;
        // Both directions run until both are done; the first error ends the splice.
        let written = (a_b.written, b_a.written);
        let there = a_b.poll(cx, &mut *a, &mut *b)?;
        let back = b_a.poll(cx, &mut *b, &mut *a)?;
        // What a watched end handed over is moving on: its reader is not stuck.
        for (w, moved) in cuts
            .iter()
            .zip([a_b.written > written.0, b_a.written > written.1])
        {
            if let (Some(w), true) = (w, moved) {
                w.progressed();
            }
        }
        // A stopped direction drains its reader until that ends, or until the other one is
        // over too: then nothing waits on what it reads.
        let over = |p: &Pump, ready: bool, other: &Pump| {
            ready || (p.stopped.is_some() && (other.done || other.stopped.is_some()))
        };
        if over(&a_b, there.is_ready(), &b_a) && over(&b_a, back.is_ready(), &a_b) {
            // A direction whose reader stopped it failed, once the other one ended.
            Poll::Ready(match a_b.stopped.take().or_else(|| b_a.stopped.take()) {
                Some(e) => Err(e),
                None => Ok(()),
            })
        } else {
            Poll::Pending
        }
    })
    .await;
    if let Err(e) = &r {
        // A direction that finished wrote its end whole: `b_a` into `a`, `a_b` into `b`.
        let keep = ended_by_an_end(e);
        abort_end(a, b_a.done && keep);
        abort_end(b, a_b.done && keep);
    }
    Moved {
        a_to_b: a_b.written,
        b_to_a: b_a.written,
        error: r.err(),
        stopped,
    }
}

/// Tears `end` down after a failed copy, keeping what it was sent when its sending half
/// closed cleanly (`sent_all`) and the copy was ended by an end ([`ended_by_an_end`]).
fn abort_end<E: End + ?Sized>(end: &mut E, sent_all: bool) {
    if sent_all {
        end.abort_receiving()
    } else {
        end.abort()
    }
}

/// Whether a copy's error is an end refusing more — its reader stopped the stream, or its
/// socket was closed (EPIPE) or reset — after which what the other end was sent whole is kept
/// (the service's whole answer to an upload it refused early). A lost connection, a cut or a
/// policy's stop is no end's choice: the ends are reset even so, or the one that got its
/// answer would linger, what its sender still sent dropped with no sign it went nowhere.
fn ended_by_an_end(e: &io::Error) -> bool {
    peer_stopped_reading(e)
        || matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        )
}

/// An error once either end was cut ([`End::cut_signal`]); until then `cx` is woken by a cut.
fn poll_cuts(cuts: &[Option<Arc<Watched>>; 2], cx: &mut Context<'_>) -> io::Result<()> {
    match cuts.iter().flatten().find(|w| w.poll_cut(cx)) {
        Some(w) if w.was_reset() => Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "stream reset by its sender",
        )),
        Some(_) => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "stream cut: its reader stopped reading",
        )),
        None => Ok(()),
    }
}

/// One direction of a [`splice`]: read chunks, write them all out, repeat; at the reader's
/// end, flush and shut the writer down (a half-close).
#[derive(Default)]
struct Pump {
    room: ReadRoom,
    /// Read and not yet written.
    chunks: VecDeque<Bytes>,
    /// Bytes written so far: what reached the other end (read and not yet written is not
    /// moved, and is lost when the copy fails).
    written: u64,
    read_done: bool,
    /// Written since the last flush (flushed before waiting on the reader).
    unflushed: bool,
    done: bool,
    /// The writer's peer stopped reading ([`peer_stopped_reading`]): this direction is over,
    /// and failed, while the other one runs on to its end.
    stopped: Option<io::Error>,
}

impl Pump {
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<()>>
    where
        R: End + ?Sized,
        W: End + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        if self.stopped.is_some() {
            return self.poll_drain(cx, r);
        }
        loop {
            if self.chunks.is_empty() && !self.read_done {
                match r.poll_read_chunks(cx, &mut self.room, &mut self.chunks) {
                    Poll::Ready(Ok(0)) => self.read_done = true,
                    Poll::Ready(Ok(_)) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        if self.unflushed {
                            if let Err(e) = ready!(Pin::new(&mut *w).poll_flush(cx)) {
                                return self.failed(cx, r, e);
                            }
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while !self.chunks.is_empty() {
                let n = match ready!(w.poll_write_chunks(cx, &mut self.chunks)) {
                    Ok(n) => n,
                    Err(e) => return self.failed(cx, r, e),
                };
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n as u64;
                self.unflushed = true;
            }
            if self.read_done {
                let ended = match ready!(Pin::new(&mut *w).poll_flush(cx)) {
                    Ok(()) => ready!(Pin::new(&mut *w).poll_shutdown(cx)),
                    Err(e) => Err(e),
                };
                if let Err(e) = ended {
                    return self.failed(cx, r, e);
                }
                self.done = true;
                // The buffer is not needed while the other direction goes on.
                self.room.release();
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl Pump {
    /// A write, flush or shutdown of the writer failed with `e`: a peer that stopped reading
    /// ends this direction only ([`peer_stopped_reading`]), anything else the splice. Flush
    /// and shutdown count as writes: an end-to-end encrypted stream sends its buffered frames
    /// and its end frame there, so the stop shows there too, and was taken for a failure
    /// that reset the client before the other direction's answer had been passed on.
    fn failed<R: End + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        e: io::Error,
    ) -> Poll<io::Result<()>> {
        if peer_stopped_reading(&e) {
            self.stopped = Some(e);
            return self.poll_drain(cx, r);
        }
        Poll::Ready(Err(e))
    }

    /// After its writer's peer stopped reading: reads and drops what its reader still sends,
    /// until that ends. Left unread, a client that writes its whole upload before it reads
    /// would block on it, never read the answer, and hold the connection for ever.
    fn poll_drain<R: End + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
    ) -> Poll<io::Result<()>> {
        while !self.read_done {
            self.chunks.clear();
            match ready!(r.poll_read_chunks(cx, &mut self.room, &mut self.chunks)) {
                Ok(0) => self.read_done = true,
                Ok(_) => {}
                // The direction failed already; how its reader ends changes nothing.
                Err(_) => self.read_done = true,
            }
        }
        self.chunks.clear();
        self.room.release();
        Poll::Ready(Ok(()))
    }
}

/// Chunk size of shaped copies: small enough that a slow rate is paced smoothly rather than
/// in bursts of 64 KiB.
const SHAPED_CHUNK: usize = 16 * 1024;

/// Copies `r` to `w` paced by `shaper`, adding what it wrote to `total` as it goes (so the
/// count survives the copy being cancelled), until EOF (passed on as a shutdown) or an error.
async fn pump<R, W>(
    r: &mut R,
    w: &mut W,
    shaper: &policies::bandwidth::Shaper,
    total: &mut u64,
    watched: Option<&Watched>,
    (stop, over, other_over): (&Stopped, &Over, &Over),
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; SHAPED_CHUNK];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // As a write's below: a stop seen at the end (an encrypted stream sends its end
            // frame here) ends this direction only.
            match w.shutdown().await {
                Err(e) if peer_stopped_reading(&e) => {
                    let _ = stop.set(e);
                }
                r => r?,
            }
            over.cancel();
            return Ok(());
        }
        // Waiting for the app's bandwidth is pacing, not a reader that stopped taking data: a
        // slow limit (16 KiB at 2 KiB/s is 8 s) made every shaped stream of a device held.
        if let Some(wd) = watched {
            wd.pace();
        }
        shaper.consume(n as u64).await;
        if let Some(wd) = watched {
            wd.hold_from_now();
        }
        // Counted as each write lands (a copy cancelled mid-chunk counts what went), then
        // flushed: a writer that buffers — TLS keeps the part of a record the socket did not
        // take — sends it only when flushed, and the copy goes back to reading, so the rest of
        // a message waited for the next one (a request/answer protocol never got it).
        let mut at = 0;
        let wrote = loop {
            if at == n {
                break w.flush().await;
            }
            match w.write(&buf[at..n]).await {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => {
                    at += m;
                    *total += m as u64;
                    if let Some(wd) = watched {
                        wd.progressed();
                    }
                }
                Err(e) => break Err(e),
            }
        };
        match wrote {
            Ok(()) => {}
            // As `Pump::poll_drain`: what the reader still sends is read and dropped.
            // Until the reader ends, or the other direction is over too: then nothing waits
            // on what it reads (it may never end: a client that keeps sending).
            Err(e) if peer_stopped_reading(&e) => {
                let _ = stop.set(e);
                over.cancel();
                loop {
                    tokio::select! {
                        _ = other_over.cancelled() => return Ok(()),
                        read = r.read(&mut buf) => if !matches!(read, Ok(n) if n > 0) {
                            return Ok(());
                        },
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// A direction of [`splice_shaped_until`] whose writer's peer stopped reading, with the
/// error that said so.
type Stopped = std::sync::OnceLock<io::Error>;

/// Cancelled once a direction of [`splice_shaped_until`] is done or stopped: a stopped one
/// draining its reader waits on the other's.
type Over = tokio_util::sync::CancellationToken;

fn is_stopped(s: &Stopped) -> bool {
    s.get().is_some()
}

/// Like [`splice`], with each direction paced by a bandwidth shaper (policy `bandwidth`).
pub async fn splice_shaped<A, B>(
    a: A,
    b: B,
    a_to_b: &policies::bandwidth::Shaper,
    b_to_a: &policies::bandwidth::Shaper,
) -> Moved
where
    A: End,
    B: End,
{
    splice_shaped_until(a, b, a_to_b, b_to_a, std::future::pending()).await
}

/// [`splice_shaped`], ended early when `stop` resolves, as [`splice_until`].
pub async fn splice_shaped_until<A, B, S>(
    a: A,
    b: B,
    a_to_b: &policies::bandwidth::Shaper,
    b_to_a: &policies::bandwidth::Shaper,
    stop: S,
) -> Moved
where
    A: End,
    B: End,
    S: Future<Output = String>,
{
    let cuts = [a.cut_signal(), b.cut_signal()];
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let (mut up, mut down) = (0u64, 0u64);
    let mut stopped = None;
    // Directions whose pump returned without error: finished cleanly, or stopped and drained.
    let (mut a_b_ended, mut b_a_ended) = (false, false);
    let (stop_a, stop_b) = (Stopped::default(), Stopped::default());
    let (over_a, over_b) = (Over::new(), Over::new());
    let error = {
        let (wa, wb) = (cuts[0].as_deref(), cuts[1].as_deref());
        let a_b = pump(
            &mut ar,
            &mut bw,
            a_to_b,
            &mut up,
            wa,
            (&stop_a, &over_a, &over_b),
        );
        let b_a = pump(
            &mut br,
            &mut aw,
            b_to_a,
            &mut down,
            wb,
            (&stop_b, &over_b, &over_a),
        );
        let cut = std::future::poll_fn(|cx| match poll_cuts(&cuts, cx) {
            Err(e) => Poll::Ready(e),
            Ok(()) => Poll::Pending,
        });
        tokio::pin!(a_b, b_a, cut, stop);
        // As in `splice`: both directions run until both are over, and the first error ends
        // the other direction too (it could otherwise wait on an idle peer indefinitely); a
        // stopped one, draining its reader, ends once the other one is over (`Over`).
        loop {
            if a_b_ended && b_a_ended {
                break None;
            }
            let r = tokio::select! {
                // An error ends the loop: the future is not polled again.
                r = &mut a_b, if !a_b_ended => { a_b_ended = r.is_ok(); r }
                r = &mut b_a, if !b_a_ended => { b_a_ended = r.is_ok(); r }
                e = &mut cut => Err(e),
                why = &mut stop => {
                    stopped = Some(why.clone());
                    Err(io::Error::new(io::ErrorKind::ConnectionAborted, why))
                }
            };
            if let Err(e) = r {
                break Some(e);
            }
        }
    };
    // Finished cleanly: its writer shut down after all was written.
    let a_b_done = a_b_ended && !is_stopped(&stop_a);
    let b_a_done = b_a_ended && !is_stopped(&stop_b);
    // No error but a stop: a reader stopped its direction.
    let keep = error.as_ref().is_none_or(ended_by_an_end);
    let error = error
        .or_else(|| stop_a.into_inner())
        .or_else(|| stop_b.into_inner());
    if error.is_some() {
        abort_end(&mut ar.unsplit(aw), b_a_done && keep);
        abort_end(&mut br.unsplit(bw), a_b_done && keep);
    }
    Moved {
        a_to_b: up,
        b_to_a: down,
        error,
        stopped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadBuf};

    /// A duplex pipe end; aborting it is a no-op (in-memory pipes have no reset).
    struct Pipe(tokio::io::DuplexStream);
    impl End for Pipe {
        fn abort(&mut self) {}
    }
    impl AsyncRead for Pipe {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }
    impl AsyncWrite for Pipe {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, b)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    /// A scripted end: reads give `input` then EOF, or with `endless` give it every other
    /// read for ever (the reads between are "nothing yet"); with `write_error`, writes fail with it
    /// once its own input was read (a service that answered and closed); which abort it got
    /// is recorded. With `stopped` instead, writes fail from the start as a QUIC stream's do
    /// once its reader stopped it, and the input comes only at the third read; with
    /// `flush_stopped`, the same but writes are taken and flushes and shutdowns fail (an end-
    /// to-end encrypted stream sends its buffered frames there).
    struct Scripted {
        input: Option<Bytes>,
        endless: bool,
        reads: usize,
        write_error: Option<io::ErrorKind>,
        stopped: bool,
        flush_stopped: bool,
        aborted: Arc<std::sync::Mutex<Vec<&'static str>>>,
        name: &'static str,
    }
    impl End for Scripted {
        fn abort(&mut self) {
            self.aborted.lock().unwrap().push(self.name);
        }
        fn abort_receiving(&mut self) {
            let what = if self.name == "client" {
                "client receiving"
            } else {
                "service receiving"
            };
            self.aborted.lock().unwrap().push(what);
        }
    }
    impl AsyncRead for Scripted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.reads += 1;
            if (self.stopped || self.flush_stopped) && self.reads < 3 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let next = if self.endless {
                if self.reads.is_multiple_of(2) {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                self.input.clone()
            } else {
                self.input.take()
            };
            if let Some(b) = next {
                let n = b.len().min(buf.remaining());
                buf.put_slice(&b[..n]);
            }
            Poll::Ready(Ok(()))
        }
    }
    impl AsyncWrite for Scripted {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            if let (Some(kind), None) = (self.write_error, &self.input) {
                return Poll::Ready(Err(kind.into()));
            }
            if self.stopped {
                return Poll::Ready(Err(stopped_error()));
            }
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            match self.flush_stopped {
                true => Poll::Ready(Err(stopped_error())),
                false => Poll::Ready(Ok(())),
            }
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.poll_flush(cx)
        }
    }

    /// A client uploading without end to `other` (named `name`), which answers 26 bytes and
    /// whose writes fail once its answer was read (`write_error`) or from the start, as a
    /// stopped QUIC stream's (`stopped`; at its flushes and shutdown only with
    /// `flush_stopped`), through either splice: what moved, and which abort each end got.
    async fn upload_against(
        name: &'static str,
        write_error: Option<io::ErrorKind>,
        (stopped, flush_stopped): (bool, bool),
        shaped: bool,
    ) -> (Moved, Vec<&'static str>) {
        let aborted = Arc::new(std::sync::Mutex::new(Vec::new()));
        let client = Scripted {
            input: Some(Bytes::from_static(b"upload upload upload")),
            endless: true,
            reads: 0,
            write_error: None,
            stopped: false,
            flush_stopped: false,
            aborted: aborted.clone(),
            name: "client",
        };
        let other = Scripted {
            input: Some(Bytes::from_static(b"HTTP/1.1 413 Too Large\r\n\r\n")),
            endless: false,
            reads: 0,
            write_error,
            stopped,
            flush_stopped,
            aborted: aborted.clone(),
            name,
        };
        let m = if shaped {
            let unlimited = policies::bandwidth::Shaper::default();
            splice_shaped(client, other, &unlimited, &unlimited).await
        } else {
            let (mut client, mut other) = (client, other);
            splice(&mut client, &mut other).await
        };
        let mut got = aborted.lock().unwrap().clone();
        got.sort();
        (m, got)
    }

    /// A service answers an upload it refuses early and closes: the client's answer was
    /// written whole and its sending half closed, so when the upload's copy then fails the
    /// client's end keeps it (abort_receiving) and only the service's end is reset. Both
    /// were reset, and a QUIC reset after the end threw the unacknowledged answer away.
    #[tokio::test]
    async fn a_failed_copy_keeps_what_an_end_was_sent_whole() {
        for shaped in [false, true] {
            let (m, aborted) = upload_against("service", BROKEN, (false, false), shaped).await;
            assert!(m.error.is_some(), "shaped {shaped}: {m:?}");
            assert_eq!(
                m.b_to_a, 26,
                "shaped {shaped}: the answer was not all written"
            );
            assert_eq!(aborted, ["client receiving", "service"], "shaped {shaped}");
        }
    }

    /// The service's writes failing as a socket closed by its owner.
    const BROKEN: Option<io::ErrorKind> = Some(io::ErrorKind::BrokenPipe);

    /// As above, but the upload fails because the device's connection was lost (quinn's
    /// ConnectionLost): no end chose to end it, and the client, whose answer was written
    /// whole, is reset too. Kept, it lingered: the rest of its upload was read and dropped
    /// and it saw a clean close, its upload lost without a sign.
    #[tokio::test]
    async fn a_copy_failing_by_no_ends_choice_resets_both_ends() {
        for shaped in [false, true] {
            let lost = Some(io::ErrorKind::NotConnected);
            let (m, aborted) = upload_against("tunnel", lost, (false, false), shaped).await;
            assert_eq!(m.error.as_ref().map(|e| e.kind()), lost, "shaped {shaped}");
            assert_eq!(m.b_to_a, 26, "shaped {shaped}");
            assert_eq!(aborted, ["client", "tunnel"], "shaped {shaped}");
        }
    }

    /// The tunnel end of a TCP app's connection is stopped (the device's service answered
    /// and closed while the client still uploads) before the answer has come through: the
    /// upload ends there, the answer is still passed on whole and the client keeps it. The
    /// stop failed the whole copy, and the client was reset before it had the answer.
    #[tokio::test]
    async fn a_stopped_tunnel_stream_still_brings_its_answer() {
        for shaped in [false, true] {
            let (m, aborted) = upload_against("tunnel", None, (true, false), shaped).await;
            let e = m.error.as_ref().expect("the upload failed");
            assert!(peer_stopped_reading(e), "shaped {shaped}: {e}");
            assert_eq!(m.b_to_a, 26, "shaped {shaped}: the answer was cut");
            assert_eq!(aborted, ["client receiving", "tunnel"], "shaped {shaped}");
        }
    }

    /// As above through an end-to-end encrypted stream (a mesh forward relayed by the
    /// gateway), whose stop shows at a flush: the stop failed the splice there, and the
    /// client was reset instead of getting the service's early answer.
    #[tokio::test]
    async fn a_stop_seen_at_a_flush_still_brings_the_answer() {
        let (m, aborted) = upload_against("tunnel", None, (false, true), false).await;
        let e = m.error.as_ref().expect("the upload failed");
        assert!(peer_stopped_reading(e), "{e}");
        assert_eq!(m.b_to_a, 26, "the answer was cut");
        assert_eq!(aborted, ["client receiving", "tunnel"]);
    }

    /// A write error as a QuicStream's when its reader stopped it (STOP_SENDING).
    fn stopped_error() -> io::Error {
        io::Error::other(io::Error::from(quinn::WriteError::Stopped(0u32.into())))
    }

    /// A tunnel end whose reader stopped it: writes fail as a stopped QUIC stream's do, and
    /// reads give `left` bytes of answer, then its end.
    struct StoppedAnswering {
        left: usize,
    }
    impl End for StoppedAnswering {
        fn abort(&mut self) {}
    }
    impl AsyncRead for StoppedAnswering {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = self.left.min(buf.remaining()).min(64 * 1024);
            buf.put_slice(&vec![b'a'; n]);
            self.left -= n;
            Poll::Ready(Ok(()))
        }
    }
    impl AsyncWrite for StoppedAnswering {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(stopped_error()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A client that writes its whole upload before it reads, to a stream stopped with a
    /// large answer to come: what it sends is read and dropped, so it gets to read the whole
    /// answer. Left unread, it blocked in its write and the answer in ours, for ever.
    #[tokio::test]
    async fn a_stopped_direction_drains_a_client_that_uploads_before_it_reads() {
        const UPLOAD: usize = 32 << 20;
        const ANSWER: usize = 32 << 20;
        for shaped in [false, true] {
            let (mut client, server) = tcp_pair().await;
            let tunnel = StoppedAnswering { left: ANSWER };
            let spliced = tokio::spawn(async move {
                if shaped {
                    let unlimited = policies::bandwidth::Shaper::default();
                    splice_shaped(server, tunnel, &unlimited, &unlimited).await
                } else {
                    let (mut server, mut tunnel) = (server, tunnel);
                    splice(&mut server, &mut tunnel).await
                }
            });
            let talk = async {
                client.write_all(&vec![7u8; UPLOAD]).await.unwrap();
                let mut answer = Vec::new();
                client.read_to_end(&mut answer).await.unwrap();
                answer.len()
            };
            // Stuck is for ever; 64 MiB through loopback in a debug build on a loaded machine
            // can take a good part of 20 s. (Smaller sizes would not do: loopback receive
            // buffers can grow to tcp_rmem's maximum, 32 MiB on some hosts.)
            let got = tokio::time::timeout(std::time::Duration::from_secs(60), talk)
                .await
                .unwrap_or_else(|_| panic!("shaped {shaped}: stuck"));
            assert_eq!(got, ANSWER, "shaped {shaped}");
            let m = spliced.await.unwrap();
            assert_eq!(m.b_to_a, ANSWER as u64, "shaped {shaped}");
            assert!(
                m.error.as_ref().is_some_and(peer_stopped_reading),
                "shaped {shaped}: {m:?}"
            );
        }
    }

    /// The answer ends first, then the upload's write is stopped, and the client never stops
    /// sending: the splice ends as the answer did, instead of draining the client for ever.
    #[tokio::test]
    async fn a_stopped_direction_stops_draining_once_the_answer_is_over() {
        for shaped in [false, true] {
            let (client, server) = tcp_pair().await;
            let (mut client_r, mut client_w) = client.into_split();
            let sender = tokio::spawn(async move {
                let chunk = vec![3u8; 64 * 1024];
                while client_w.write_all(&chunk).await.is_ok() {}
            });
            let tunnel = StoppedAnswering { left: 26 };
            let spliced = async move {
                if shaped {
                    let unlimited = policies::bandwidth::Shaper::default();
                    splice_shaped(server, tunnel, &unlimited, &unlimited).await
                } else {
                    let (mut server, mut tunnel) = (server, tunnel);
                    splice(&mut server, &mut tunnel).await
                }
            };
            let m = tokio::time::timeout(std::time::Duration::from_secs(10), spliced)
                .await
                .unwrap_or_else(|_| panic!("shaped {shaped}: drained for ever"));
            assert_eq!(m.b_to_a, 26, "shaped {shaped}");
            let mut answer = Vec::new();
            let _ = client_r.read_to_end(&mut answer).await;
            assert_eq!(answer.len(), 26, "shaped {shaped}");
            sender.abort();
        }
    }

    /// A connected pair of loopback TCP streams.
    async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap());
        let (c, a) = tokio::join!(c, l.accept());
        (c.unwrap(), a.unwrap().0)
    }

    #[test]
    fn consume_drops_whole_chunks_and_splits_the_last() {
        let mut q: VecDeque<Bytes> = ["abc", "de", "", "fgh"]
            .into_iter()
            .map(|s: &'static str| Bytes::from_static(s.as_bytes()))
            .collect();
        consume(&mut q, 4);
        assert_eq!(q, ["e", "", "fgh"]);
        consume(&mut q, 1);
        assert_eq!(q, ["fgh"], "empty chunks left at the front are dropped");
        consume(&mut q, 0);
        assert_eq!(q, ["fgh"]);
        consume(&mut q, 3);
        assert!(q.is_empty());
    }

    /// Gives a byte pattern as many small chunks per read, as a QUIC stream does; takes and
    /// drops what is written to it.
    struct Chunky {
        sent: usize,
        len: usize,
    }
    impl End for Chunky {
        fn abort(&mut self) {}
        fn poll_read_chunks(
            &mut self,
            _: &mut Context<'_>,
            _: &mut ReadRoom,
            out: &mut VecDeque<Bytes>,
        ) -> Poll<io::Result<usize>> {
            let before = self.sent;
            for _ in 0..40 {
                let n = 997.min(self.len - self.sent);
                if n == 0 {
                    break;
                }
                out.push_back((self.sent..self.sent + n).map(|i| i as u8).collect());
                self.sent += n;
            }
            Poll::Ready(Ok(self.sent - before))
        }
    }
    impl AsyncRead for Chunky {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            unreachable!("splice reads by chunks")
        }
    }
    impl AsyncWrite for Chunky {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn chunks_go_out_whole_through_partial_vectored_writes() {
        const LEN: usize = 3 << 20;
        // A small send buffer makes vectored writes stop part way through a chunk.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.set_send_buffer_size(4096).unwrap();
        let (a, peer) = tokio::join!(s.connect(l.local_addr().unwrap()), l.accept());
        let (mut a, mut peer) = (a.unwrap(), peer.unwrap().0);
        let t = tokio::spawn(async move {
            let mut c = Chunky { sent: 0, len: LEN };
            splice(&mut c, &mut a).await
        });
        let mut got = Vec::new();
        peer.shutdown().await.unwrap();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), LEN);
        assert!(got.iter().enumerate().all(|(i, b)| *b == i as u8));
        let m = t.await.unwrap();
        assert_eq!((m.a_to_b, m.b_to_a), (LEN as u64, 0));
        assert!(m.error.is_none(), "{m:?}");
    }

    #[tokio::test]
    async fn a_reset_on_one_side_reaches_the_other_as_a_reset_not_an_end() {
        let (mut client, mut a) = tcp_pair().await;
        let (mut b, mut service) = tcp_pair().await;
        let t = tokio::spawn(async move { splice(&mut a, &mut b).await });
        client.write_all(b"part of a request").await.unwrap();
        let mut got = [0u8; 17];
        service.read_exact(&mut got).await.unwrap();
        // The client dies abortively mid-transfer.
        client.set_zero_linger().unwrap();
        drop(client);
        let m = t.await.unwrap();
        assert!(m.error.is_some(), "the copy saw the reset: {m:?}");
        assert_eq!(m.a_to_b, 17);
        // The service must not see a clean end of stream (it would take the truncated request
        // as complete); it sees a reset.
        let mut rest = Vec::new();
        let e = service.read_to_end(&mut rest).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    }

    #[tokio::test]
    async fn a_shaped_copy_ends_at_the_first_error_even_with_the_other_side_idle() {
        let (mut client, a) = tcp_pair().await;
        let (b, mut service) = tcp_pair().await;
        let shaper = || policies::bandwidth::Shaper::new(None, Some(1 << 20));
        let t = tokio::spawn(async move { splice_shaped(a, b, &shaper(), &shaper()).await });
        client.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        service.read_exact(&mut got).await.unwrap();
        // The client resets; the service stays silent and open. The copy must still end.
        client.set_zero_linger().unwrap();
        drop(client);
        let m = tokio::time::timeout(std::time::Duration::from_secs(10), t)
            .await
            .expect("the shaped copy ended although the service is idle")
            .unwrap();
        assert!(m.error.is_some(), "{m:?}");
        assert_eq!(m.a_to_b, 5);
        let mut rest = Vec::new();
        let e = service.read_to_end(&mut rest).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    }

    /// Keeps what is written until flushed, as TLS keeps a record's rest when its socket is
    /// full; reads pass through.
    struct HoldsUntilFlushed {
        inner: tokio::net::TcpStream,
        held: Vec<u8>,
    }
    impl End for HoldsUntilFlushed {
        fn abort(&mut self) {}
    }
    impl AsyncRead for HoldsUntilFlushed {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            b: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, b)
        }
    }
    impl AsyncWrite for HoldsUntilFlushed {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.held.extend_from_slice(b);
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            let me = &mut *self;
            while !me.held.is_empty() {
                let n = ready!(Pin::new(&mut me.inner).poll_write(cx, &me.held))?;
                me.held.drain(..n);
            }
            Pin::new(&mut me.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            ready!(self.as_mut().poll_flush(cx))?;
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// A shaped copy flushes what it writes: into a writer that holds bytes until flushed, a
    /// service's answer arrived only with its next one (or the end).
    #[tokio::test]
    async fn a_shaped_copy_flushes_each_write() {
        let (mut client, a) = tcp_pair().await;
        let (b, mut service) = tcp_pair().await;
        let a = HoldsUntilFlushed {
            inner: a,
            held: Vec::new(),
        };
        let shaper = || policies::bandwidth::Shaper::new(None, Some(1 << 20));
        let _t = tokio::spawn(async move { splice_shaped(a, b, &shaper(), &shaper()).await });
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        service.read_exact(&mut got).await.unwrap();
        service.write_all(b"pong").await.unwrap();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            client.read_exact(&mut got),
        )
        .await
        .expect("the answer stayed in the writer's buffer")
        .unwrap();
        assert_eq!(&got, b"pong");
    }

    /// Bulk both ways at once, through buffers that grow from 8 to 64 KiB on the way: every
    /// byte arrives, in order, and is counted.
    #[tokio::test]
    async fn bulk_both_ways_arrives_intact_while_buffers_grow() {
        const LEN: usize = 3 << 20;
        let data = |seed: u8| -> Vec<u8> { (0..LEN).map(|i| (i % 251) as u8 ^ seed).collect() };
        let (a, a_peer) = tokio::io::duplex(256 * 1024);
        let (b, b_peer) = tokio::io::duplex(256 * 1024);
        let (mut a, mut b) = (Pipe(a), Pipe(b));
        let t = tokio::spawn(async move { splice(&mut a, &mut b).await });
        let side = |mut peer: tokio::io::DuplexStream, out: Vec<u8>| async move {
            let (mut r, mut w) = tokio::io::split(&mut peer);
            let send = async {
                w.write_all(&out).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let recv = r.read_to_end(&mut got);
            let (_, n) = tokio::join!(send, recv);
            n.unwrap();
            got
        };
        let (at_a, at_b) = tokio::join!(side(a_peer, data(1)), side(b_peer, data(2)));
        assert!(at_b == data(1), "a to b arrived changed");
        assert!(at_a == data(2), "b to a arrived changed");
        let m = t.await.unwrap();
        assert_eq!((m.a_to_b, m.b_to_a), (LEN as u64, LEN as u64));
        assert!(m.error.is_none(), "{m:?}");
    }

    #[tokio::test]
    async fn counts_both_ways_with_half_close() {
        let (a, mut a_peer) = tokio::io::duplex(1024);
        let (b, mut b_peer) = tokio::io::duplex(1024);
        let (mut a, mut b) = (Pipe(a), Pipe(b));
        let t = tokio::spawn(async move { splice(&mut a, &mut b).await });
        a_peer.write_all(b"hello").await.unwrap();
        a_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        b_peer.write_all(b"world!").await.unwrap();
        b_peer.shutdown().await.unwrap();
        b_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        let mut back = Vec::new();
        a_peer.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"world!");
        let m = t.await.unwrap();
        assert_eq!((m.a_to_b, m.b_to_a), (5, 6));
        assert!(m.error.is_none());
    }
}
