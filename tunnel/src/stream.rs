//! A proxied connection on one QUIC bidirectional stream: writing and reading the stream
//! header and reply (bounded, incremental) and an `AsyncRead + AsyncWrite` view for splicing.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::{OpenError, TunnelError};
use crate::proto::{self, StreamHeader, StreamReply};

/// Bytes read per chunk while looking for a header: a header is at most 1 KiB, and reading
/// no more than that keeps what spills past it (the start of the payload) small.
const HEADER_READ: usize = 1024;

/// Both halves of a stream, plus payload bytes that arrived with the header.
#[derive(Debug)]
pub struct QuicStream {
    pub send: SendStream,
    pub recv: RecvStream,
    prefix: Bytes,
    meter: Option<StreamMeter>,
}

/// Totals a stream adds the payload it moves to (on the gateway: the device's, for `/status`
/// and `/metrics`). Added per read or write call, not per byte.
#[derive(Debug, Clone)]
pub struct StreamMeter {
    pub sent: Arc<AtomicU64>,
    pub received: Arc<AtomicU64>,
}

impl QuicStream {
    pub fn new(send: SendStream, recv: RecvStream, prefix: Bytes) -> Self {
        QuicStream {
            send,
            recv,
            prefix,
            meter: None,
        }
    }

    /// Counts the payload written to and read from this stream into `meter`.
    pub fn metered(mut self, meter: StreamMeter) -> Self {
        self.meter = Some(meter);
        self
    }
}

impl AsyncRead for QuicStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            Poll::Ready(Ok(()))
        } else {
            Pin::new(&mut self.recv).poll_read(cx, buf)
        };
        if let Some(m) = &self.meter {
            let n = buf.filled().len() - before;
            if n > 0 {
                m.received.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        r
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf).map_err(io::Error::other);
        if let (Some(m), Poll::Ready(Ok(n))) = (&self.meter, &r) {
            m.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_shutdown(cx)
    }
}

/// Application error code of a stream torn down because the connection it carried failed
/// part way (the other end sees `RESET_STREAM`/`STOP_SENDING` with it, not a clean end).
pub const ABORTED: quinn::VarInt = quinn::VarInt::from_u32(1);

impl crate::splice::Abort for QuicStream {
    fn abort(&mut self) {
        // Either may already be finished or stopped; then there is nothing left to tear down.
        let _ = self.send.reset(ABORTED);
        let _ = self.recv.stop(ABORTED);
    }
}

/// Reads until `decode` yields a value; returns it with the bytes that followed it.
async fn read_framed<T>(
    recv: &mut RecvStream,
    decode: impl Fn(&[u8]) -> Result<Option<(T, usize)>, proto::ProtoError>,
) -> Result<(T, Bytes), TunnelError> {
    let mut buf = BytesMut::new();
    loop {
        if let Some((v, used)) = decode(&buf)? {
            buf.advance(used);
            return Ok((v, buf.freeze()));
        }
        if buf.len() > proto::limits::MAX_HEADER_LEN + 16 {
            // decode() bounds lengths itself; this is a second fence against a decoder bug.
            return Err(TunnelError::Proto(proto::ProtoError::FieldTooLong {
                field: "stream header",
                len: buf.len() as u64,
                max: proto::limits::MAX_HEADER_LEN,
            }));
        }
        match recv.read_chunk(HEADER_READ, true).await? {
            Some(chunk) => buf.extend_from_slice(&chunk.bytes),
            None => return Err(TunnelError::Truncated),
        }
    }
}

pub async fn read_header(recv: &mut RecvStream) -> Result<(StreamHeader, Bytes), TunnelError> {
    read_framed(recv, proto::decode_stream_header).await
}

pub async fn read_reply(recv: &mut RecvStream) -> Result<(StreamReply, Bytes), TunnelError> {
    read_framed(recv, proto::decode_stream_reply).await
}

pub async fn write_header(send: &mut SendStream, h: &StreamHeader) -> Result<(), TunnelError> {
    let mut b = BytesMut::new();
    proto::encode_stream_header(h, &mut b)?;
    send.write_all(&b).await?;
    Ok(())
}

pub async fn write_reply(send: &mut SendStream, r: &StreamReply) -> Result<(), TunnelError> {
    let mut b = BytesMut::new();
    proto::encode_stream_reply(r, &mut b)?;
    send.write_all(&b).await?;
    Ok(())
}

/// Refuses a stream: writes the reason and finishes our side.
pub async fn refuse(send: &mut SendStream, code: proto::RefuseCode, reason: &str) {
    let reason: String = reason.chars().take(proto::limits::MAX_REASON_LEN).collect();
    let _ = write_reply(send, &StreamReply::Refused { code, reason }).await;
    let _ = send.finish();
}

/// Opens a stream on `conn` with `header` and waits for the acceptor's reply.
pub async fn open(
    conn: &quinn::Connection,
    device: &str,
    header: &StreamHeader,
    timeout: Duration,
) -> Result<QuicStream, OpenError> {
    let tunnel = |source| OpenError::Tunnel {
        device: device.to_owned(),
        source,
    };
    let fut = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| tunnel(e.into()))?;
        write_header(&mut send, header).await.map_err(tunnel)?;
        let (reply, rest) = read_reply(&mut recv).await.map_err(tunnel)?;
        match reply {
            StreamReply::Accepted => Ok(QuicStream::new(send, recv, rest)),
            StreamReply::Refused { code, reason } => Err(OpenError::Refused {
                device: device.to_owned(),
                code,
                reason,
            }),
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(OpenError::Timeout(device.to_owned())),
    }
}
