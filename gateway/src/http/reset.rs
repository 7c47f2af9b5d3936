//! A client connection the front can end with a reset (RST) instead of a close: the only way
//! to tell an HTTP/1.0 client that an answer delimited by the connection's close was cut
//! short. Its FIN (or TLS `close_notify`) would read as the answer's end, and a download or a
//! cached page would be kept as whole.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Asks for the connection's reset ([`ResetOnClose::arm`]) from wherever it is served: the
/// socket itself is inside the TLS and HTTP layers by then.
#[derive(Debug, Clone, Default)]
pub struct ResetOnClose(Arc<AtomicBool>);

impl ResetOnClose {
    /// The connection is reset when its socket is dropped, which the caller does next.
    pub fn arm(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A client's TCP connection, reset as it is dropped once its [`ResetOnClose`] is armed.
#[derive(Debug)]
pub struct Resettable {
    tcp: TcpStream,
    reset: ResetOnClose,
}

impl Resettable {
    pub fn new(tcp: TcpStream) -> (Self, ResetOnClose) {
        let reset = ResetOnClose::default();
        let r = Resettable {
            tcp,
            reset: reset.clone(),
        };
        (r, reset)
    }

    /// Waits for the client's first bytes and copies them into `buf` without taking them: the
    /// HTTPS front looks at the first before the TLS handshake reads it.
    pub async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.tcp.peek(buf).await
    }
}

impl Drop for Resettable {
    fn drop(&mut self) {
        if self.reset.0.load(Ordering::Relaxed) {
            // SO_LINGER 0: the close that follows sends RST, not FIN, and never blocks.
            let _ = self.tcp.set_zero_linger();
        }
    }
}

impl AsyncRead for Resettable {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Resettable {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// Armed, the client reads a reset after what was sent; not armed, a clean end.
    #[tokio::test]
    async fn an_armed_connection_ends_with_a_reset() {
        for armed in [false, true] {
            let (mut client, server) = pair().await;
            let (mut s, reset) = Resettable::new(server);
            s.write_all(b"part of it").await.unwrap();
            if armed {
                reset.arm();
            }
            drop(s);
            let mut got = Vec::new();
            let r = client.read_to_end(&mut got).await;
            if armed {
                let e = r.expect_err("an armed connection closed cleanly");
                assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
            } else {
                r.unwrap();
                assert_eq!(got, b"part of it");
            }
        }
    }
}
