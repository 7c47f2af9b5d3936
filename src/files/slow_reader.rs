//! A connection's writes, cut when its client takes too little: an answer waiting on a client
//! that reads a few bytes every few seconds held its open file (or a whole listing), the
//! connection and its task for as long as the client liked. Hyper bounds how long a request's
//! headers may take, not how long an answer may.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How long a client may take to take [`MIN_PROGRESS`] bytes of an answer.
pub const SEND_WINDOW: Duration = Duration::from_secs(60);
/// Bytes a client must take within [`SEND_WINDOW`], unless it took all there was (the
/// gateway's front asks the same of its clients). What counts is what the socket accepts,
/// so with [`UNSENT_MOST`] a client must in fact take about one write (hyper's, up to 64 KiB)
/// a window: ~1 KiB/s, far below any real link.
pub const MIN_PROGRESS: u64 = 16 * 1024;
/// Unsent bytes a socket may hold before a write waits (`TCP_NOTSENT_LOWAT`). Without it a
/// write waits only for a third of the send buffer to drain, and on loopback (the node's
/// tunnel end) that buffer grows to megabytes: a client taking 14 KB/s made no progress
/// visible for a minute and was cut.
pub const UNSENT_MOST: u32 = 16 * 1024;

/// `T`'s writes, failing with `TimedOut` once an answer has been written for [`SEND_WINDOW`]
/// with less than [`MIN_PROGRESS`] bytes taken. The window starts with the first write after
/// a flush that finished (hyper flushes each answer), so an idle keep-alive connection is not
/// counted.
#[derive(Debug)]
pub struct SlowReaderCut<T> {
    inner: T,
    /// When the current window began and what was taken since; None between answers.
    window: Option<(Instant, u64)>,
    /// Wakes a write left waiting when its window ends; made on the first wait.
    timer: Option<Pin<Box<Sleep>>>,
    window_len: Duration,
}

impl SlowReaderCut<tokio::net::TcpStream> {
    /// An accepted connection, its unsent bytes bounded by [`UNSENT_MOST`].
    pub fn tcp(tcp: tokio::net::TcpStream) -> Self {
        Self::tcp_with_window(tcp, SEND_WINDOW)
    }

    fn tcp_with_window(tcp: tokio::net::TcpStream, window: Duration) -> Self {
        if let Err(error) = socket2::SockRef::from(&tcp).set_tcp_notsent_lowat(UNSENT_MOST) {
            // Then progress shows later: slow clients are cut sooner, not wrongly served.
            tracing::debug!(%error, "file connection: cannot set TCP_NOTSENT_LOWAT");
        }
        Self::with_window(tcp, window)
    }
}

impl<T> SlowReaderCut<T> {
    fn with_window(inner: T, window_len: Duration) -> Self {
        SlowReaderCut {
            inner,
            window: None,
            timer: None,
            window_len,
        }
    }

    /// Counts `n` bytes taken; a window that reached [`MIN_PROGRESS`] starts over.
    fn took(&mut self, n: usize) {
        let now = Instant::now();
        let (start, taken) = self.window.get_or_insert((now, 0));
        *taken += n as u64;
        if *taken >= MIN_PROGRESS {
            *start = now;
            *taken = 0;
        }
    }

    /// What a write of the inner stream came to, counted; a wait, timed.
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) => {
                self.took(n);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.waiting(cx).map(Err),
        }
    }

    /// A write is waiting: an error once its window has ended, else Pending with a wake-up
    /// for when it ends.
    fn waiting(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let (start, _) = *self.window.get_or_insert((Instant::now(), 0));
        let due = start + self.window_len;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.deadline() != due {
            timer.as_mut().reset(due);
        }
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client took less than {MIN_PROGRESS} bytes of the answer in {} s",
                self.window_len.as_secs()
            ),
        ))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SlowReaderCut<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Ready(r) => {
                // The answer is out: the wait for the next request is not the client's to
                // hurry (hyper's header timeout and the keep-alive bound that).
                self.window = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.waiting(cx).map(Err),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SlowReaderCut<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client that takes a little now and then, less than the floor, is cut when the window
    /// ends; one that takes the floor in time is not, and neither is an idle one.
    #[tokio::test(start_paused = true)]
    async fn a_client_taking_too_little_is_cut() {
        let window = Duration::from_secs(10);
        let (ours, mut client) = tokio::io::duplex(1024);
        let mut w = SlowReaderCut::with_window(ours, window);
        let reader = tokio::spawn(async move {
            // 1 KiB every 2 s: 5 KiB per window, under MIN_PROGRESS.
            let mut buf = [0u8; 1024];
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                if client.read(&mut buf).await.map_or(true, |n| n == 0) {
                    return;
                }
            }
        });
        let started = Instant::now();
        let big = vec![7u8; 1 << 20];
        let e = w.write_all(&big).await.expect_err("cut");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        let took = started.elapsed();
        assert!(
            took >= window && took < window + Duration::from_secs(3),
            "{took:?}"
        );
        reader.abort();

        // A reader keeping the pace: the same write finishes, however long it takes in all.
        let (ours, mut client) = tokio::io::duplex(64 * 1024);
        let mut w = SlowReaderCut::with_window(ours, window);
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; MIN_PROGRESS as usize];
            let mut got = 0;
            while got < 1 << 20 {
                tokio::time::sleep(Duration::from_secs(5)).await;
                got += client.read(&mut buf).await.unwrap();
            }
            client
        });
        w.write_all(&big).await.expect("a reader keeping the pace");
        w.flush().await.unwrap();
        // Idle after a flushed answer: no window runs.
        tokio::time::sleep(window * 3).await;
        let mut client = reader.await.unwrap();
        w.write_all(b"next")
            .await
            .expect("the next answer starts afresh");
        let mut next = [0u8; 4];
        client.read_exact(&mut next).await.unwrap();
    }

    /// Over a real loopback connection (whose send buffer grows to megabytes) a client taking
    /// 64 KiB/s of a large answer is not cut: its progress shows every few KiB, not every
    /// third of the send buffer.
    #[tokio::test]
    async fn a_slow_but_steady_client_on_loopback_is_not_cut() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (client, accepted) = tokio::join!(
            tokio::net::TcpStream::connect(l.local_addr().unwrap()),
            l.accept()
        );
        let (mut client, server) = (client.unwrap(), accepted.unwrap().0);
        // The window is long enough (~40 reads' worth, 20 times the floor) that a loaded
        // machine running the reader late cannot make it look slow; the reads run for two
        // windows, so a client cut wrongly would be.
        let window = Duration::from_secs(5);
        let mut w = SlowReaderCut::tcp_with_window(server, window);
        let writer = tokio::spawn(async move { w.write_all(&vec![1u8; 64 << 20]).await });
        let mut buf = vec![0u8; 8 * 1024];
        // An interval, not sleeps: ticks missed while the task was not run are caught up at
        // once (`MissedTickBehavior::Burst`), so the pace holds on average.
        let mut pace = tokio::time::interval(Duration::from_millis(125));
        let until = Instant::now() + window * 2;
        while Instant::now() < until {
            pace.tick().await;
            client
                .read_exact(&mut buf)
                .await
                .expect("the answer goes on");
        }
        assert!(!writer.is_finished(), "{:?}", writer.await);
        writer.abort();
    }
}
