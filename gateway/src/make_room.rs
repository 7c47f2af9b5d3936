//! Public connections that can be closed to make room for other clients: each one's last
//! activity, stamped as its client's bytes move, and a signal that ends it.
//!
//! A table of connections with a total ([`crate::per_ip::PerIp::with_total`] with
//! [`crate::per_ip::PerIp::making_room`]) that is full picks, for a client holding fewer, the
//! longest-idle connection of the client holding the most, and ends it: a few addresses
//! holding idle connections (16 IPv4 addresses at the `tcp` apps' default per-address limit)
//! otherwise locked everyone else out until they chose to close.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use atomic_waker::AtomicWaker;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use tunnel::flow_activity::FlowActivity;
use tunnel::holds::Watched;
use tunnel::splice::{End, ReadRoom};

/// One open connection as a full table sees it: when its client's bytes last moved, and
/// the signal that ends it.
#[derive(Debug, Default)]
pub struct Held {
    activity: FlowActivity,
    evict: CancellationToken,
    /// Set with `evict`, read on every read and write of a [`Stamped::ending`] stream: an
    /// atomic load where polling the token took a lock (and registered a waiter) per wake.
    evicted: AtomicBool,
    /// The task to wake when evicted: the last to poll its [`Stamped::ending`] stream.
    waker: AtomicWaker,
    /// Requests of the connection waiting for or receiving their answers (HTTP): a connection
    /// serving one is not idle, however quiet its client (a long poll), and is picked last.
    busy: AtomicUsize,
    /// The eviction was counted (for connections watched from more than one task).
    counted: AtomicBool,
    /// Bytes written to the client ([`Stamped`]): whether a connection with nothing left but
    /// to send still makes progress (HTTP/2 after its GOAWAY).
    sent: std::sync::atomic::AtomicU64,
}

/// A request in flight on a connection ([`Held::busy`]), for as long as this lives.
pub struct Busy(Arc<Held>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Held {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Bytes moved now.
    pub fn touch(&self) {
        self.activity.touch()
    }

    /// How long since bytes last moved (or since it opened): the longest is the idlest.
    pub(crate) fn quiet_for(&self) -> Duration {
        self.activity.quiet_for()
    }

    /// Marks a request in flight until the returned guard is dropped.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// Whether no request is in flight: such a connection is picked first.
    pub(crate) fn is_between_requests(&self) -> bool {
        self.busy.load(Ordering::Relaxed) == 0
    }

    /// Bytes written to the client so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Seconds since bytes last moved, for the log line of an eviction.
    pub fn idle_secs(&self) -> u64 {
        self.quiet_for().as_secs()
    }

    /// Ends the connection to make room; false if it was picked before. (Called under the
    /// table's lock: no two pickers race.)
    pub(crate) fn evict(&self) -> bool {
        if self.evicted.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.evict.cancel();
        self.waker.wake();
        true
    }

    /// Whether the connection was picked to make room (a flag: no lock).
    pub fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }

    /// Resolves once the connection is picked to make room. Lock-free, as a
    /// [`Stamped::ending`] stream's reads are: it registers its task's waker the same way, so
    /// a task waiting on something else (an answer's body from upstream) still ends.
    pub fn until_evicted(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            self.waker.register(cx.waker());
            match self.evicted.load(Ordering::Acquire) {
                true => Poll::Ready(()),
                false => Poll::Pending,
            }
        })
    }

    /// True the first time it is asked after the eviction: count it then.
    pub(crate) fn count_eviction_once(&self) -> bool {
        self.is_evicted() && !self.counted.swap(true, Ordering::Relaxed)
    }

    /// Resolves once the connection was picked to make room.
    pub async fn evicted(&self) {
        self.evict.cancelled().await
    }

    /// Cancelled once the connection is picked to make room (for a socket that outlives its
    /// copy: a lingering close).
    pub fn eviction_token(&self) -> CancellationToken {
        self.evict.clone()
    }
}

/// An [`End`] whose reads and writes stamp its [`Held`]: the public client's side of a
/// connection, so a client that only receives (a download, a server's pushes) is active too.
pub struct Stamped<E> {
    inner: E,
    held: Arc<Held>,
    /// Reads and writes fail once the connection is evicted ([`Stamped::ending`]).
    ends: bool,
}

impl<E> Stamped<E> {
    pub fn new(inner: E, held: Arc<Held>) -> Self {
        Stamped {
            inner,
            held,
            ends: false,
        }
    }

    /// As [`Stamped::new`], and ended by an eviction: its reads and writes fail from then
    /// on (their task woken for it), so whatever serves the connection ends as on a reset —
    /// without a watch of its own polled at every wake of the connection's task.
    pub fn ending(inner: E, held: Arc<Held>) -> Self {
        Stamped {
            inner,
            held,
            ends: true,
        }
    }

    /// The connection inside.
    pub fn get_ref(&self) -> &E {
        &self.inner
    }

    /// Before a read or write: an error once evicted.
    fn check(&self, cx: &mut Context<'_>) -> Option<io::Error> {
        if !self.ends {
            return None;
        }
        // Registered before the check: an eviction between them still wakes this task.
        self.held.waker.register(cx.waker());
        self.held.evicted.load(Ordering::Acquire).then(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "cut to make room for another client",
            )
        })
    }

    /// As [`Stamped::stamp`] for a write, and counts the bytes written.
    fn stamp_sent(&self, r: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = &r {
            self.held.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        self.stamp(r, |n| *n > 0)
    }

    /// Stamps when `r` moved bytes; passes it on.
    fn stamp<T>(
        &self,
        r: Poll<io::Result<T>>,
        moved: impl FnOnce(&T) -> bool,
    ) -> Poll<io::Result<T>> {
        if let Poll::Ready(Ok(v)) = &r {
            if moved(v) {
                self.held.touch();
            }
        }
        r
    }
}

impl<E: AsyncRead + Unpin> AsyncRead for Stamped<E> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let grew = buf.filled().len() > before;
        this.stamp(r, |_| grew)
    }
}

impl<E: AsyncWrite + Unpin> AsyncWrite for Stamped<E> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, b);
        this.stamp_sent(r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.stamp_sent(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<E: End> End for Stamped<E> {
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
        // As the AsyncRead side: an `ending` connection spliced chunk-wise ends when evicted.
        if let Some(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        let r = self.inner.poll_read_chunks(cx, room, out);
        self.stamp(r, |n| *n > 0)
    }

    fn poll_write_chunks(
        &mut self,
        cx: &mut Context<'_>,
        chunks: &mut VecDeque<Bytes>,
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        let r = self.inner.poll_write_chunks(cx, chunks);
        self.stamp(r, |n| *n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // The activity record follows tokio's clock: paused, only `advance` moves it, so a
    // thread descheduled on a loaded machine cannot make a fresh stamp look stale.
    #[tokio::test(start_paused = true)]
    async fn reads_and_writes_stamp_the_connection() {
        let held = Held::new();
        let (a, mut b) = tokio::io::duplex(64);
        let mut s = Stamped::new(a, held.clone());
        tokio::time::advance(Duration::from_millis(20)).await;
        let before = held.quiet_for();
        assert!(before >= Duration::from_millis(20), "{before:?}");
        b.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).await.unwrap();
        let after_read = held.quiet_for();
        assert!(
            after_read < Duration::from_millis(20),
            "a read stamps ({after_read:?})"
        );
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(held.quiet_for() >= Duration::from_millis(20));
        s.write_all(b"yo").await.unwrap();
        assert!(
            held.quiet_for() < Duration::from_millis(20),
            "a write stamps"
        );
    }

    #[test]
    fn a_connection_is_evicted_once() {
        let held = Held::new();
        assert!(!held.is_evicted());
        assert!(held.evict());
        assert!(!held.evict(), "picked before");
        assert!(held.is_evicted());
    }
}
