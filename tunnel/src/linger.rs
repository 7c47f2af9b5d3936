//! Lingering close of a TCP connection whose sending half finished but whose peer is still
//! sending: what was sent must still arrive.
//!
//! Closing a TCP socket with received bytes unread makes Linux answer with a reset at once,
//! dropping everything still in its send queue (RFC 2525 §2.17): a service's whole answer to
//! an upload it refused early — a 413, an auth error — was lost to a client still uploading.
//! So, as nginx's `lingering_close`, the socket stays open after its owner lets it go, its
//! sending half closed: incoming bytes are read and dropped until the peer closes too, goes
//! quiet for [`QUIET`], or [`MOST`] has passed; then it is closed.

use std::io::{self, IoSlice};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::splice::End;

/// A lingering socket whose peer sends nothing for this long is closed.
pub const QUIET: Duration = Duration::from_secs(5);
/// Longest a socket lingers, whatever its peer sends.
pub const MOST: Duration = Duration::from_secs(30);
/// Sockets lingering at once, all connections together; beyond, a socket is closed at once
/// (a reset, as before): a client that makes connections end this way and trickles bytes
/// into each cannot hold more.
pub const MAX_LINGERING: usize = 1_024;

static LINGERING: AtomicUsize = AtomicUsize::new(0);

/// Something held for as long as a socket lingers (the client's connection slot: a lingering
/// socket still counts against its client's limits).
pub type Guard = Box<dyn Send + Sync>;

/// Keeps `tcp`'s socket open, with its sending half closed, after the caller drops `tcp`,
/// reading and dropping what arrives (see the module doc), and `guard` until it closes; at
/// once when `stop` is cancelled (the connection was picked to make room). False when it
/// cannot (no runtime, no file descriptor left, [`MAX_LINGERING`] lingering already, `stop`
/// cancelled already): dropping `tcp` then closes it as usual.
pub fn close_lingering(
    tcp: &TcpStream,
    guard: Option<Guard>,
    stop: Option<CancellationToken>,
) -> bool {
    let stop = stop.unwrap_or_default();
    if stop.is_cancelled() {
        return false;
    }
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return false;
    };
    let Some(slot) = Slot::take() else {
        return false;
    };
    // A second descriptor of the same socket: the caller's close then leaves the socket open.
    let Ok(fd) = tcp.as_fd().try_clone_to_owned() else {
        return false;
    };
    let sock = socket2::Socket::from(fd);
    // Sending is done (a no-op when the caller shut it down already): data, then FIN.
    let _ = sock.shutdown(std::net::Shutdown::Write);
    let std: std::net::TcpStream = sock.into();
    if std.set_nonblocking(true).is_err() {
        return false;
    }
    let s = {
        let _in_runtime = rt.enter();
        TcpStream::from_std(std)
    };
    let Ok(s) = s else {
        return false;
    };
    rt.spawn(async move {
        let _held = (slot, guard);
        tokio::select! {
            _ = tokio::time::timeout(MOST, drain(s)) => {}
            () = stop.cancelled() => {}
        }
    });
    true
}

/// A client's TCP end that lingers ([`close_lingering`]) where a copy keeps what it was sent
/// ([`End::abort_receiving`]), holding `guard` until it closes, and closing at once when
/// `stop` is cancelled. Only client ends (public, or local clients of a forward): a service's
/// end draining for 30 s would keep a streaming answer running for nothing after its client
/// reset.
pub struct Lingering {
    tcp: TcpStream,
    guard: Option<Guard>,
    stop: Option<CancellationToken>,
}

impl Lingering {
    pub fn new(tcp: TcpStream, guard: Option<Guard>, stop: Option<CancellationToken>) -> Self {
        Lingering { tcp, guard, stop }
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, b)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

impl End for Lingering {
    fn abort(&mut self) {
        self.tcp.abort()
    }

    fn abort_receiving(&mut self) {
        close_lingering(&self.tcp, self.guard.take(), self.stop.take());
    }
}

/// Reads and drops until the peer closes, fails or goes quiet for [`QUIET`].
async fn drain(mut s: TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(Ok(n)) = tokio::time::timeout(QUIET, s.read(&mut buf)).await {
        if n == 0 {
            return;
        }
    }
}

/// One of the [`MAX_LINGERING`] lingering sockets; given back when dropped.
struct Slot;

impl Slot {
    fn take() -> Option<Slot> {
        LINGERING
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_LINGERING).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        LINGERING.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A socket with small buffers on the peer's side, so most of an answer waits in the
    /// sender's queue.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        client.set_recv_buffer_size(4096).unwrap();
        client.set_nonblocking(true).unwrap();
        let client = tokio::net::TcpSocket::from_std_stream(client.into());
        let (c, s) = tokio::join!(client.connect(l.local_addr().unwrap()), l.accept());
        let server = s.unwrap().0;
        socket2::SockRef::from(&server)
            .set_send_buffer_size(256 * 1024)
            .unwrap();
        (c.unwrap(), server)
    }

    /// The server answers 160 KB and closes while the client's upload waits unread: with a
    /// lingering close the client reads the whole answer and a clean end.
    async fn answer_arrives_whole(linger: bool) -> Result<usize, std::io::Error> {
        let (mut client, mut server) = pair().await;
        client.write_all(&[7u8; 32 * 1024]).await.unwrap();
        let answer = vec![1u8; 160 * 1024];
        tokio::time::timeout(Duration::from_secs(5), server.write_all(&answer))
            .await
            .expect("the answer fits the send buffer")
            .unwrap();
        server.shutdown().await.unwrap();
        // Give the unread upload time to land in the server's receive queue.
        tokio::time::sleep(Duration::from_millis(50)).await;
        if linger {
            assert!(close_lingering(&server, None, None));
        }
        drop(server);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.map(|_| got.len())
    }

    #[tokio::test]
    async fn a_lingering_close_delivers_the_whole_answer() {
        let n = answer_arrives_whole(true).await.expect("a clean end");
        assert_eq!(n, 160 * 1024);
    }

    /// A lingering socket picked to make room closes at once, its guard (the client's slot)
    /// with it.
    #[tokio::test]
    async fn a_stop_ends_the_lingering_and_gives_the_guard_back() {
        let (mut client, server) = pair().await;
        client.write_all(b"still sending").await.unwrap();
        let slot = std::sync::Arc::new(());
        let stop = CancellationToken::new();
        assert!(close_lingering(
            &server,
            Some(Box::new(slot.clone())),
            Some(stop.clone())
        ));
        drop(server);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(std::sync::Arc::strong_count(&slot), 2, "lingering holds it");
        stop.cancel();
        for _ in 0..100 {
            if std::sync::Arc::strong_count(&slot) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            std::sync::Arc::strong_count(&slot),
            1,
            "still held after the stop"
        );
        // Already stopped: no lingering at all.
        let (_c, s) = pair().await;
        assert!(!close_lingering(&s, None, Some(stop)));
    }

    #[tokio::test(start_paused = true)]
    async fn lingering_ends_when_the_peer_closes_or_goes_quiet() {
        let (client, server) = pair().await;
        drop(client);
        tokio::time::timeout(Duration::from_secs(1), drain(server))
            .await
            .expect("the peer's close ends it");
        let (mut client, server) = pair().await;
        client.write_all(b"then nothing").await.unwrap();
        let started = tokio::time::Instant::now();
        drain(server).await;
        assert!(
            started.elapsed() >= QUIET,
            "ended before the peer was quiet"
        );
        drop(client);
    }

    /// What the test above guards against: a plain close with unread data resets, and the
    /// answer still queued is lost.
    #[tokio::test]
    async fn a_plain_close_with_unread_data_loses_the_answer() {
        let r = answer_arrives_whole(false).await;
        assert!(
            r.as_ref().is_err() || r.as_ref().is_ok_and(|n| *n < 160 * 1024),
            "a plain close delivered everything: {r:?}"
        );
    }
}
