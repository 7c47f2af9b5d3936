//! The socket side of one DNS-over-TCP connection: notes write progress and the answers still
//! owed (so making room never picks a connection mid-answer while another is between
//! answers), sends each answer's 2-byte length with the answer, and closes lingering.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Counts the answers that end within the bytes written so far: DNS over TCP frames each
/// message with its length in 2 bytes (RFC 1035 §4.2.2). Sans-IO.
#[derive(Debug, Default)]
pub(crate) struct FrameEnds {
    /// The first byte of a length prefix split between writes.
    high: Option<u8>,
    /// Message bytes still to come of the current frame; `None` between frames.
    left: Option<usize>,
}

impl FrameEnds {
    /// Takes `bytes` written after those before; returns how many frames they completed.
    pub(crate) fn wrote(&mut self, mut bytes: &[u8]) -> u64 {
        let mut ended = 0;
        while let Some((&b, rest)) = bytes.split_first() {
            match (self.left, self.high.take()) {
                (Some(left), _) => {
                    let n = left.min(bytes.len());
                    bytes = &bytes[n..];
                    self.left = Some(left - n).filter(|l| *l > 0);
                    ended += u64::from(self.left.is_none());
                }
                (None, None) => {
                    self.high = Some(b);
                    bytes = rest;
                }
                (None, Some(high)) => {
                    let len = usize::from(u16::from_be_bytes([high, b]));
                    self.left = Some(len).filter(|l| *l > 0);
                    ended += u64::from(self.left.is_none());
                    bytes = rest;
                }
            }
        }
        ended
    }
}

/// Writes this small are held back and go out with the next write (or at the flush hickory
/// does after each answer): hickory writes an answer's 2-byte length on its own, and with
/// `TCP_NODELAY` that left as a segment of its own before every answer (RFC 7766 §8 asks
/// for the two together).
const HOLD_BACK: usize = 2;

/// A DNS connection's socket for hickory's framing: each write's progress is noted in `last`
/// (milliseconds from `now_ms`), each answer written whole takes one off `owed`, and dropped,
/// the socket closes lingering ([`tunnel::linger`]): a client that pipelined a query we
/// had not read yet got a reset, which can throw away answers it had not read either.
pub(crate) struct AnswerWriter<C: Fn() -> u64> {
    inner: TcpStream,
    last: Arc<AtomicU64>,
    /// Answers owed: queries read (the caller adds them) less answers written whole.
    owed: Arc<AtomicU64>,
    now_ms: C,
    frames: FrameEnds,
    held: Vec<u8>,
    /// Kept while the socket lingers after the drop (the connection's slots).
    hold: Option<tunnel::linger::Guard>,
    /// Cancelled: the connection was closed to make room, and does not linger.
    stop: CancellationToken,
}

impl<C: Fn() -> u64> AnswerWriter<C> {
    pub(crate) fn new(
        inner: TcpStream,
        (last, owed, now_ms): (Arc<AtomicU64>, Arc<AtomicU64>, C),
        (hold, stop): (tunnel::linger::Guard, CancellationToken),
    ) -> Self {
        AnswerWriter {
            inner,
            last,
            owed,
            now_ms,
            frames: FrameEnds::default(),
            held: Vec::with_capacity(HOLD_BACK),
            hold: Some(hold),
            stop,
        }
    }

    /// Notes `written`, just handed to the kernel.
    fn sent(&mut self, written: &[u8]) {
        if written.is_empty() {
            return;
        }
        self.last.store((self.now_ms)(), Ordering::Relaxed);
        let ended = self.frames.wrote(written);
        if ended > 0 {
            let _ = self
                .owed
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |o| {
                    Some(o.saturating_sub(ended))
                });
        }
    }

    /// Writes what is held back, if anything.
    fn poll_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent_held(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Notes the first `n` held bytes as handed to the kernel and lets them go, in place: the
    /// buffer keeps its room, so holding the next answer's length allocates nothing.
    fn sent_held(&mut self, n: usize) {
        let n = n.min(self.held.len());
        let mut went = [0u8; HOLD_BACK];
        went[..n].copy_from_slice(&self.held[..n]);
        self.held.drain(..n);
        self.sent(&went[..n]);
    }
}

impl<C: Fn() -> u64 + Unpin> AsyncRead for AnswerWriter<C> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<C: Fn() -> u64 + Unpin> AsyncWrite for AnswerWriter<C> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.held.is_empty() && buf.len() <= HOLD_BACK {
            this.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        loop {
            if this.held.is_empty() {
                let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
                this.sent(&buf[..n]);
                return Poll::Ready(Ok(n));
            }
            let both = [IoSlice::new(&this.held), IoSlice::new(buf)];
            let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &both))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let of_held = n.min(this.held.len());
            this.sent_held(of_held);
            let of_buf = n - of_held;
            if of_buf > 0 {
                this.sent(&buf[..of_buf]);
                return Poll::Ready(Ok(of_buf));
            }
            // Only (some of) the held bytes went: again, for `buf`.
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_held(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_held(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<C: Fn() -> u64> Drop for AnswerWriter<C> {
    fn drop(&mut self) {
        // Our sending half closed, what the client still sends read and dropped until it
        // closes too (or a bound passes); where that cannot be, dropping closes as before.
        tunnel::linger::close_lingering(&self.inner, self.hold.take(), Some(self.stop.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: u16) -> Vec<u8> {
        let mut f = len.to_be_bytes().to_vec();
        f.extend(std::iter::repeat_n(7u8, len.into()));
        f
    }

    /// Frames end where their lengths say, however the bytes are split between writes.
    #[test]
    fn frame_ends_are_counted_across_any_split() {
        let mut stream = frame(300);
        stream.extend(frame(0));
        stream.extend(frame(1));
        stream.extend(frame(2));
        let total = 4;
        assert_eq!(FrameEnds::default().wrote(&stream), total);
        for size in 1..=5 {
            let mut f = FrameEnds::default();
            let ended: u64 = stream.chunks(size).map(|c| f.wrote(c)).sum();
            assert_eq!(ended, total, "in writes of {size}");
        }
        // Part of a frame ends none.
        let mut f = FrameEnds::default();
        assert_eq!(f.wrote(&frame(10)[..11]), 0);
        assert_eq!(f.wrote(&[7]), 1);
    }

    /// An answer's length goes out with the answer, in one write; what is written is counted
    /// against the answers owed.
    #[tokio::test]
    async fn the_length_goes_with_its_answer_and_answers_are_counted() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let owed = Arc::new(AtomicU64::new(2));
        let last = Arc::new(AtomicU64::new(0));
        let mut w = AnswerWriter::new(
            server,
            (last.clone(), owed.clone(), || 42),
            (Box::new(()), CancellationToken::new()),
        );
        // As hickory writes: the length alone, then the message, then a flush.
        assert_eq!(w.write(&5u16.to_be_bytes()).await.unwrap(), 2);
        assert_eq!(w.held, [0, 5], "the length went alone");
        assert_eq!(owed.load(Ordering::Relaxed), 2);
        w.write_all(b"hello").await.unwrap();
        w.flush().await.unwrap();
        assert!(w.held.is_empty());
        assert_eq!(owed.load(Ordering::Relaxed), 1);
        assert_eq!(last.load(Ordering::Relaxed), 42);
        // A length whose message never comes is written at the flush.
        w.write_all(&3u16.to_be_bytes()).await.unwrap();
        w.flush().await.unwrap();
        w.write_all(b"abc").await.unwrap();
        w.flush().await.unwrap();
        assert_eq!(owed.load(Ordering::Relaxed), 0);
        drop(w);
        let mut got = Vec::new();
        let mut client = client;
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"\x00\x05hello\x00\x03abc");
    }
}
