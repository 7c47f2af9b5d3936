//! Copying bytes both ways between two ends of a proxied connection, counting them, and
//! tearing both ends down abortively when the copy fails.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One end of a proxied connection that can be ended abortively. A copy that failed part way
/// must not look like one that finished: a plain close (TCP FIN, QUIC FIN) after a truncated
/// transfer tells the reader "that was all of it". Aborting makes the next hop see an error
/// (TCP RST, QUIC RESET_STREAM), which it passes on the same way, end to end.
pub trait Abort {
    /// Called once the copy has failed; the end is dropped soon after.
    fn abort(&mut self);
}

impl Abort for tokio::net::TcpStream {
    fn abort(&mut self) {
        // SO_LINGER 0: closing sends RST instead of FIN, and never blocks.
        let _ = self.set_zero_linger();
    }
}

impl<T: Abort + ?Sized> Abort for &mut T {
    fn abort(&mut self) {
        (**self).abort()
    }
}

/// Per-direction copy buffer of a new splice: most proxied connections carry a request and an
/// answer of a few KiB. It doubles each time a read fills it, up to [`COPY_BUF`].
pub const COPY_BUF_START: usize = 8 * 1024;
/// Largest per-direction copy buffer: 64 KiB keeps syscalls and QUIC frames large in bulk
/// transfers (16 KiB lost ~15 % of bulk throughput, 256 KiB lost too: benches/RESULTS.md).
///
/// Starting every connection at 64 KiB, as tokio's `copy_bidirectional` did here, cost each
/// new connection two zeroed 64 KiB allocations on the gateway and two on the node (memset and
/// the page faults behind it were ~12 % of the gateway's CPU under `Connection: close` load).
pub const COPY_BUF: usize = 64 * 1024;

/// Bytes moved by a finished splice, and the error that ended it early, if any. Counts are
/// exact even on error, so logs never claim "0 bytes" for a connection that carried data.
#[derive(Debug, Default)]
pub struct Moved {
    /// From `a` to `b`.
    pub a_to_b: u64,
    /// From `b` to `a`.
    pub b_to_a: u64,
    pub error: Option<io::Error>,
}

impl Moved {
    /// How the connection ended, for logs: `closed` (both directions finished) or
    /// `aborted: ERROR` (the copy failed and both ends were reset).
    pub fn end(&self) -> String {
        match &self.error {
            None => "closed".to_owned(),
            Some(e) => format!("aborted: {e}"),
        }
    }
}

/// Counts the bytes read through it.
struct Counted<'a, T: ?Sized> {
    inner: &'a mut T,
    read: u64,
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Counted<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        r
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Copies until both directions are done (each EOF is passed on as a half-close) or one fails;
/// on failure both ends are aborted (see [`Abort`]).
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> Moved
where
    A: AsyncRead + AsyncWrite + Abort + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Abort + Unpin + ?Sized,
{
    let mut ca = Counted { inner: a, read: 0 };
    let mut cb = Counted { inner: b, read: 0 };
    let (mut a_b, mut b_a) = (Pump::default(), Pump::default());
    let r = std::future::poll_fn(|cx| {
        // Both directions run until both are done; the first error ends the splice.
        let a_b = a_b.poll(cx, &mut ca, &mut cb)?;
        let b_a = b_a.poll(cx, &mut cb, &mut ca)?;
        if a_b.is_ready() && b_a.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    if r.is_err() {
        ca.inner.abort();
        cb.inner.abort();
    }
    Moved {
        a_to_b: ca.read,
        b_to_a: cb.read,
        error: r.err(),
    }
}

/// One direction of a [`splice`]: read into the buffer, write it all out, repeat; at the
/// reader's end, flush and shut the writer down (a half-close).
#[derive(Default)]
struct Pump {
    /// Allocated at the first read; replaced by one twice the size (while below [`COPY_BUF`])
    /// after a read filled it, once its bytes are written.
    buf: Vec<u8>,
    grow: bool,
    /// Bytes `buf[pos..end]` are read and not yet written.
    pos: usize,
    end: usize,
    read_done: bool,
    /// Written since the last flush (flushed before waiting on the reader).
    unflushed: bool,
    done: bool,
}

impl Pump {
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.pos == self.end && !self.read_done {
                if self.buf.is_empty() || self.grow {
                    let size = (self.buf.len() * 2).clamp(COPY_BUF_START, COPY_BUF);
                    self.buf = vec![0; size];
                    self.grow = false;
                }
                let mut rb = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.read_done = true;
                        } else {
                            self.grow = n == self.buf.len() && n < COPY_BUF;
                            (self.pos, self.end) = (0, n);
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        if self.unflushed {
                            std::task::ready!(Pin::new(&mut *w).poll_flush(cx))?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.end {
                let n = std::task::ready!(
                    Pin::new(&mut *w).poll_write(cx, &self.buf[self.pos..self.end])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.unflushed = true;
            }
            if self.read_done {
                std::task::ready!(Pin::new(&mut *w).poll_flush(cx))?;
                std::task::ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
                // The buffer is not needed while the other direction goes on.
                self.buf = Vec::new();
                return Poll::Ready(Ok(()));
            }
        }
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
            return w.shutdown().await;
        }
        shaper.consume(n as u64).await;
        w.write_all(&buf[..n]).await?;
        *total += n as u64;
    }
}

/// Like [`splice`], with each direction paced by a bandwidth shaper (policy `bandwidth`).
pub async fn splice_shaped<A, B>(
    a: A,
    b: B,
    a_to_b: &policies::bandwidth::Shaper,
    b_to_a: &policies::bandwidth::Shaper,
) -> Moved
where
    A: AsyncRead + AsyncWrite + Abort + Unpin,
    B: AsyncRead + AsyncWrite + Abort + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let (mut up, mut down) = (0u64, 0u64);
    let error = {
        let a_b = pump(&mut ar, &mut bw, a_to_b, &mut up);
        let b_a = pump(&mut br, &mut aw, b_to_a, &mut down);
        tokio::pin!(a_b, b_a);
        let (mut a_b_done, mut b_a_done) = (false, false);
        // Like `splice`: both directions run until both are done, but the first error ends
        // the other direction too (it could otherwise wait on an idle peer indefinitely).
        loop {
            let r = tokio::select! {
                r = &mut a_b, if !a_b_done => { a_b_done = true; r }
                r = &mut b_a, if !b_a_done => { b_a_done = true; r }
            };
            if let Err(e) = r {
                break Some(e);
            }
            if a_b_done && b_a_done {
                break None;
            }
        }
    };
    if error.is_some() {
        ar.unsplit(aw).abort();
        br.unsplit(bw).abort();
    }
    Moved {
        a_to_b: up,
        b_to_a: down,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A duplex pipe end; aborting it is a no-op (in-memory pipes have no reset).
    struct Pipe(tokio::io::DuplexStream);
    impl Abort for Pipe {
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

    /// A connected pair of loopback TCP streams.
    async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap());
        let (c, a) = tokio::join!(c, l.accept());
        (c.unwrap(), a.unwrap().0)
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
