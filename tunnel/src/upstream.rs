//! Where a proxied connection goes: a tunnel stream to a device, or a local TCP service when
//! the target is this device itself.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::splice::{End, ReadRoom};
use crate::stream::QuicStream;

#[derive(Debug)]
pub enum Upstream {
    Quic(Box<QuicStream>),
    Tcp(TcpStream),
}

impl Upstream {
    /// The device's refusal of an early-opened stream ([`crate::hub::Hub::connect_early`]),
    /// once it was read.
    pub fn refused(&self) -> Option<&crate::stream::StreamRefused> {
        match self {
            Upstream::Quic(q) => q.refused(),
            Upstream::Tcp(_) => None,
        }
    }

    /// Resolves once the device has everything written to this stream after its finish (or
    /// stopped it); `None` for a local service, which needs no wait. See
    /// [`crate::stream::until_acked`].
    pub fn acked(&self) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        match self {
            Upstream::Quic(q) => Some(q.acked()),
            Upstream::Tcp(_) => None,
        }
    }

    /// Done with for now (an idle pooled connection): a tunnel stream then holds nothing
    /// ([`crate::holds`]), whatever its last read handed over.
    pub fn rest(&self) {
        if let Upstream::Quic(q) = self {
            q.rest();
        }
    }
}

impl Upstream {
    /// The next bytes, at most `max` (> 0) of them: a tunnel stream's as quinn holds them (no
    /// copy), a TCP connection's read into a new buffer. `None` at the end of the stream.
    pub fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<io::Result<Option<Bytes>>> {
        match self {
            Upstream::Quic(q) => q.poll_read_chunk(cx, max),
            Upstream::Tcp(t) => crate::splice::poll_read_owned(t, cx, max, TCP_READ),
        }
    }
}

/// Most bytes one [`Upstream::poll_read_chunk`] of a TCP connection takes.
const TCP_READ: usize = 64 * 1024;

impl End for Upstream {
    fn abort(&mut self) {
        match self {
            Upstream::Quic(q) => q.abort(),
            Upstream::Tcp(t) => t.abort(),
        }
    }
    fn abort_receiving(&mut self) {
        match self {
            Upstream::Quic(q) => q.abort_receiving(),
            Upstream::Tcp(t) => t.abort_receiving(),
        }
    }
    fn cut_signal(&self) -> Option<std::sync::Arc<crate::holds::Watched>> {
        match self {
            Upstream::Quic(q) => q.cut_signal(),
            Upstream::Tcp(_) => None,
        }
    }
    fn accepted(&self) -> Option<bool> {
        match self {
            Upstream::Quic(q) => q.accepted(),
            Upstream::Tcp(t) => t.accepted(),
        }
    }
    fn poll_read_chunks(
        &mut self,
        cx: &mut Context<'_>,
        room: &mut ReadRoom,
        out: &mut VecDeque<Bytes>,
    ) -> Poll<io::Result<usize>> {
        match self {
            Upstream::Quic(q) => q.poll_read_chunks(cx, room, out),
            Upstream::Tcp(t) => t.poll_read_chunks(cx, room, out),
        }
    }
    fn poll_write_chunks(
        &mut self,
        cx: &mut Context<'_>,
        chunks: &mut VecDeque<Bytes>,
    ) -> Poll<io::Result<usize>> {
        match self {
            Upstream::Quic(q) => q.poll_write_chunks(cx, chunks),
            Upstream::Tcp(t) => t.poll_write_chunks(cx, chunks),
        }
    }
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Quic(q) => Pin::new(q.as_mut()).poll_read(cx, buf),
            Upstream::Tcp(t) => Pin::new(t).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Quic(q) => Pin::new(q.as_mut()).poll_write(cx, buf),
            Upstream::Tcp(t) => Pin::new(t).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Quic(q) => Pin::new(q.as_mut()).poll_flush(cx),
            Upstream::Tcp(t) => Pin::new(t).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Quic(q) => Pin::new(q.as_mut()).poll_shutdown(cx),
            Upstream::Tcp(t) => Pin::new(t).poll_shutdown(cx),
        }
    }
}
