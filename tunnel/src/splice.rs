//! Copying bytes both ways between two ends of a proxied connection, counting them.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Per-direction copy buffer: 64 KiB keeps syscalls and QUIC frames large without holding much
/// memory per idle connection (buffers are only allocated while copying).
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

/// Copies until both directions are done (each EOF is passed on as a half-close) or one fails.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> Moved
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut ca = Counted { inner: a, read: 0 };
    let mut cb = Counted { inner: b, read: 0 };
    let r = tokio::io::copy_bidirectional_with_sizes(&mut ca, &mut cb, COPY_BUF, COPY_BUF).await;
    Moved {
        a_to_b: ca.read,
        b_to_a: cb.read,
        error: r.err(),
    }
}

/// Chunk size of shaped copies: small enough that a slow rate is paced smoothly rather than
/// in bursts of 64 KiB.
const SHAPED_CHUNK: usize = 16 * 1024;

async fn pump<R, W>(
    r: &mut R,
    w: &mut W,
    shaper: &policies::bandwidth::Shaper,
) -> (u64, Option<io::Error>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; SHAPED_CHUNK];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) => return (total, w.shutdown().await.err()),
            Ok(n) => n,
            Err(e) => return (total, Some(e)),
        };
        shaper.consume(n as u64).await;
        if let Err(e) = w.write_all(&buf[..n]).await {
            return (total, Some(e));
        }
        total += n as u64;
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
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let ((up, e1), (down, e2)) = tokio::join!(
        pump(&mut ar, &mut bw, a_to_b),
        pump(&mut br, &mut aw, b_to_a)
    );
    Moved {
        a_to_b: up,
        b_to_a: down,
        error: e1.or(e2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_both_ways_with_half_close() {
        let (mut a, mut a_peer) = tokio::io::duplex(1024);
        let (mut b, mut b_peer) = tokio::io::duplex(1024);
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
