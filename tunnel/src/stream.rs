//! A proxied connection on one QUIC bidirectional stream: writing and reading the stream
//! header and reply (bounded, incremental) and an `AsyncRead + AsyncWrite` view for splicing.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::{OpenError, TunnelError};
use crate::holds::{Holds, Watched};
use crate::proto::{self, StreamHeader, StreamReply};
use crate::read_gate::ReadGate;

/// Bytes read per chunk while looking for a header: a header is at most 1 KiB, and reading
/// no more than that keeps what spills past it (the start of the payload) small.
const HEADER_READ: usize = 1024;

/// The acceptor's refusal of an early-opened stream, as the error inside the `io::Error` its
/// reads (and writes) then fail with: code and reason survive layers that only pass
/// `io::Error`s on (hyper's client, say). Find it with [`StreamRefused::find`].
#[derive(Debug, Clone, thiserror::Error)]
#[error("stream refused: {reason}")]
pub struct StreamRefused {
    pub code: proto::RefuseCode,
    pub reason: String,
}

impl StreamRefused {
    /// The same error a waiting open ([`open`]) returns for this refusal by `device`.
    pub fn open_error(&self, device: &str) -> OpenError {
        OpenError::Refused {
            device: device.to_owned(),
            code: self.code,
            reason: self.reason.clone(),
        }
    }

    /// The refusal somewhere in `e`'s chain of sources, if any.
    pub fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a StreamRefused> {
        find_in(e)
    }
}

/// What the reads and writes of an early-opened stream fail with when the acceptor did not
/// reply within the open's timeout: found like [`StreamRefused`], so that the caller can
/// report a timeout (the device's, not the service's) where only an `io::Error` came through.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the device did not answer the stream in time")]
pub struct ReplyTimedOut;

impl ReplyTimedOut {
    /// Whether `e`'s chain of sources holds it.
    pub fn is_in(e: &(dyn std::error::Error + 'static)) -> bool {
        find_in::<ReplyTimedOut>(e).is_some()
    }
}

/// The `T` somewhere in `e`'s chain of sources, if any.
fn find_in<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<T>() {
            return Some(r);
        }
        // io::Error::source() skips the error it wraps: walk into it instead (an io::Error
        // may wrap another, as layers that pass only io::Errors on do).
        cur = match err.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

/// Payload an early-opened stream ([`open_early`]) may send before the acceptor's reply:
/// enough for a request or a protocol's first message to go with the open. Unbounded, a
/// device slow to reach its service (a LAN host asleep: seconds per connect) held the
/// connection's flow-control window with unread uploads, eight streams of 4 MiB all of it,
/// and every other stream to the device waited.
pub const EARLY_BYTES: usize = 64 * 1024;

/// Early payload the early-opened streams of one connection may send together before their
/// replies: a quarter of the connection's flow-control window. [`EARLY_BYTES`] per stream did
/// not bound it: 512 opens to a service slow to connect (a LAN host asleep, 5 s a connect)
/// held 32 MiB unread at the device, all of the window, and every other stream and control
/// message to the device waited.
pub const EARLY_BYTES_PER_CONNECTION: usize = crate::transport::CONNECTION_WINDOW as usize / 4;

/// What is left of one connection's [`EARLY_BYTES_PER_CONNECTION`]. Each early open takes up
/// to [`EARLY_BYTES`] of it and gives it back once its reply is read (or the stream is
/// dropped); one that finds none left waits for its reply before it writes.
#[derive(Debug)]
pub struct EarlyBudget(std::sync::atomic::AtomicUsize);

impl EarlyBudget {
    pub fn new(bytes: usize) -> Arc<Self> {
        Arc::new(EarlyBudget(std::sync::atomic::AtomicUsize::new(bytes)))
    }

    /// Bytes left to take.
    pub fn left(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// Takes up to `want` bytes; what it got is given back when the hold is dropped.
    fn take(self: &Arc<Self>, want: usize) -> EarlyHold {
        let before = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                Some(left - left.min(want))
            })
            .unwrap_or_else(|left| left);
        EarlyHold {
            budget: self.clone(),
            bytes: before.min(want),
        }
    }
}

/// Bytes of an [`EarlyBudget`] one stream holds until its reply.
#[derive(Debug)]
struct EarlyHold {
    budget: Arc<EarlyBudget>,
    bytes: usize,
}

impl Drop for EarlyHold {
    fn drop(&mut self) {
        self.budget.0.fetch_add(self.bytes, Ordering::Relaxed);
    }
}

/// Both halves of a stream, plus payload bytes that arrived with the header.
#[derive(Debug)]
pub struct QuicStream {
    pub send: SendStream,
    recv: Recv,
    prefix: Bytes,
    meter: Option<StreamMeter>,
    /// Opened with [`open_early`]: the acceptor's reply is still to be read (bytes so far),
    /// before any payload.
    reply: Option<BytesMut>,
    /// When waiting for that reply ends (the open's timeout, counted from the open): an
    /// acceptor that never answers would otherwise hold the stream and whoever reads it.
    reply_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Payload this early-opened stream may still send before the reply ([`EARLY_BYTES`],
    /// or less: what its connection's [`EarlyBudget`] had left).
    early_left: usize,
    /// That payload's share of the connection's [`EarlyBudget`], held until the reply.
    early_hold: Option<EarlyHold>,
    /// The acceptor refused the stream (read in place of the reply of an early open).
    refused: Option<StreamRefused>,
    /// Payload written before the reply: added to `meter` once accepted, never if refused.
    early_sent: u64,
    /// Every read of `recv` goes through it ([`QuicStream::poll_quinn`]).
    gate: ReadGate,
}

impl QuicStream {
    /// Resolves once the peer has everything written to this stream after its finish (or
    /// stopped it): see [`until_acked`].
    pub fn acked(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let stopped = self.send.stopped();
        async move {
            let _ = stopped.await;
        }
    }
}

/// How long a gateway's copy that ended cleanly waits for its streams' last bytes to be
/// acknowledged ([`until_acked`]); a drain's grace bounds it too.
pub const ACK_WAIT: Duration = Duration::from_secs(10);

/// After a copy that ended cleanly, waits (at most `limit`) until the peer acknowledged what
/// the stream holds after its finish (a whole window: seconds on a home uplink). Usually a
/// round trip; it matters when the endpoint closes next (a drain ends once the copies' tasks
/// are done, and that close throws away what quinn has not yet sent: a client's upload,
/// passed on whole and closed cleanly, lost its tail). Not after a failure: a stream reset
/// is dropped by quinn without a wake-up, and the wait would last the whole `limit`.
pub async fn until_acked(acked: impl std::future::Future, limit: Duration) {
    let _ = tokio::time::timeout(limit, acked).await;
}

/// A stream's receive side: the stream's alone, or shared with the sweep of held streams
/// ([`crate::holds`]), which may cut it.
#[derive(Debug)]
enum Recv {
    Own(RecvStream),
    Watched(Arc<Watched>),
}

/// What reads of a stream the held-stream sweep cut (`w`) fail with.
fn cut_error(w: &Watched) -> io::Error {
    if w.was_reset() {
        return io::Error::new(io::ErrorKind::ConnectionReset, "stream reset by its sender");
    }
    io::Error::new(
        io::ErrorKind::TimedOut,
        "stream cut: its reader stopped reading while the device's connection needed the flow-control credit it held",
    )
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
            recv: Recv::Own(recv),
            prefix,
            meter: None,
            reply: None,
            reply_deadline: None,
            early_left: 0,
            early_hold: None,
            refused: None,
            early_sent: 0,
            gate: ReadGate::new(),
        }
    }

    /// Counts the payload written to and read from this stream into `meter`.
    pub fn metered(mut self, meter: StreamMeter) -> Self {
        self.meter = Some(meter);
        self
    }

    /// Puts the receive side under `holds`' watch ([`crate::holds`]): cut if its reader stops
    /// reading while too many of the connection's streams are held. `app` and `service` name
    /// it in the log.
    pub fn watched(mut self, holds: &Holds, app: &str, service: &str) -> Self {
        self.recv = match self.recv {
            Recv::Own(r) => Recv::Watched(holds.watch(r, app, service)),
            w @ Recv::Watched(_) => w,
        };
        self
    }

    /// The reader is done for now (an idle pooled connection): the stream holds nothing,
    /// whatever its last read handed over.
    pub fn rest(&self) {
        if let Recv::Watched(w) = &self.recv {
            w.rest();
        }
    }

    /// The refusal an early-opened stream got instead of its payload (see [`open_early`]).
    pub fn refused(&self) -> Option<&StreamRefused> {
        self.refused.as_ref()
    }

    /// Reads quinn's stream through the gate (every read of `recv` goes here). `got_data` tells
    /// whether a read's answer handed data over: a watched stream then counts as held until
    /// its reader reads again.
    fn poll_quinn<T>(
        &mut self,
        cx: &mut Context<'_>,
        read: impl FnOnce(&mut RecvStream, &mut Context<'_>) -> Poll<io::Result<T>>,
        got_data: impl FnOnce(&T) -> bool,
    ) -> Poll<io::Result<T>> {
        let gate = &mut self.gate;
        match &mut self.recv {
            Recv::Own(r) => gate.poll(cx, |cx| read(r, cx)),
            // The gate answers first: a stream it keeps from being polled answered `Pending`
            // last, so it is not held (and was not cut: only held streams are), and its
            // lock is not taken.
            Recv::Watched(w) => gate.poll(cx, |cx| {
                w.poll(
                    |r| read(r, cx),
                    |p| matches!(p, Poll::Ready(Ok(t)) if got_data(t)),
                )
                .unwrap_or_else(|| Poll::Ready(Err(cut_error(w))))
            }),
        }
    }

    /// Reads into `buf` from quinn's stream.
    fn poll_recv(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.poll_quinn(
            cx,
            |r, cx| {
                let before = buf.filled().len();
                Pin::new(r)
                    .poll_read(cx, buf)
                    .map_ok(|()| buf.filled().len() > before)
            },
            |data| *data,
        )
        .map_ok(|_| ())
    }

    /// Reads the acceptor's reply of an early-opened stream: Ready(Ok) once accepted (what
    /// followed the reply becomes the prefix), an error if refused or cut short. A refusal
    /// is every later read's and write's error too: whichever of them read it first (a
    /// writer past [`EARLY_BYTES`]), the others must not find a plain end of stream instead.
    fn poll_reply(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let Some(got) = self.reply.as_mut() else {
                return Poll::Ready(match &self.refused {
                    Some(r) => Err(io::Error::new(io::ErrorKind::ConnectionRefused, r.clone())),
                    None => Ok(()),
                });
            };
            match proto::decode_stream_reply(got) {
                Ok(Some((reply, used))) => {
                    got.advance(used);
                    let rest = got.split().freeze();
                    self.reply = None;
                    self.reply_deadline = None;
                    // The device reads the stream now (or refused it): what was sent early
                    // no longer waits unread.
                    self.early_hold = None;
                    let early_sent = std::mem::take(&mut self.early_sent);
                    return Poll::Ready(match reply {
                        StreamReply::Accepted => {
                            self.prefix = rest;
                            if let Some(m) = &self.meter {
                                m.sent.fetch_add(early_sent, Ordering::Relaxed);
                            }
                            Ok(())
                        }
                        StreamReply::Refused { code, reason } => {
                            let refused = StreamRefused { code, reason };
                            self.refused = Some(refused.clone());
                            Err(io::Error::new(io::ErrorKind::ConnectionRefused, refused))
                        }
                    });
                }
                // decode bounds lengths itself; this is a second fence against a decoder bug.
                Ok(None) if got.len() <= proto::limits::MAX_HEADER_LEN + 16 => {}
                Ok(None) => return Poll::Ready(Err(io::Error::other("stream reply too long"))),
                Err(e) => return Poll::Ready(Err(io::Error::other(e))),
            }
            let mut chunk = [0u8; 256];
            let mut rb = ReadBuf::new(&mut chunk);
            if self.poll_recv(cx, &mut rb)?.is_pending() {
                // Only once nothing is there: a reply that came in time but was read late
                // (the caller wrote first) is not a timeout.
                if let Some(d) = self.reply_deadline.as_mut() {
                    if d.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            ReplyTimedOut,
                        )));
                    }
                }
                return Poll::Pending;
            }
            if rb.filled().is_empty() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "stream ended before its reply",
                )));
            }
            if let Some(got) = self.reply.as_mut() {
                got.extend_from_slice(rb.filled());
            }
        }
    }

    /// The next chunk quinn holds (one packet's payload, as received: no copy), at most
    /// `max` (> 0) bytes of it. `None` at the end of the stream.
    pub fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<io::Result<Option<Bytes>>> {
        ready!(self.poll_reply(cx))?;
        if !self.prefix.is_empty() {
            let chunk = self.prefix.split_to(self.prefix.len().min(max));
            self.was_read(chunk.len());
            return Poll::Ready(Ok(Some(chunk)));
        }
        let r = ready!(self.poll_quinn(
            cx,
            |r, cx| pin!(r.read_chunk(max, true)).poll(cx).map_err(Into::into),
            Option::is_some,
        ))?;
        Poll::Ready(Ok(r.map(|chunk| {
            self.was_read(chunk.bytes.len());
            chunk.bytes
        })))
    }

    /// The outcome of a write: counted, or, when it failed before an early open's reply was
    /// read, the refusal in its place.
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if self.reply.is_some() && matches!(r, Poll::Ready(Err(_))) {
            // A refusing acceptor stops our sending right after its reply: a write can fail
            // on that before the reply was read. Report the refusal, not "stopped".
            match self.poll_reply(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // Woken when the reply arrives; the write then fails again and reads it.
                Poll::Pending => return Poll::Pending,
            }
        }
        if let Poll::Ready(Ok(n)) = &r {
            if self.reply.is_some() {
                self.early_left = self.early_left.saturating_sub(*n);
                // Counted once the device takes the stream (a refused one took none of it).
                self.early_sent += *n as u64;
            } else if let (Some(m), None) = (&self.meter, &self.refused) {
                m.sent.fetch_add(*n as u64, Ordering::Relaxed);
            }
        }
        r
    }

    /// How much of `want` bytes may be written now: all once the reply is read; before it,
    /// what is left of [`EARLY_BYTES`], and when nothing is, the reply is waited for.
    fn room(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.reply.is_none() {
            return Poll::Ready(Ok(want));
        }
        if self.early_left == 0 {
            ready!(self.poll_reply(cx))?;
            return Poll::Ready(Ok(want));
        }
        Poll::Ready(Ok(want.min(self.early_left)))
    }

    /// Counts `n` bytes read.
    fn was_read(&self, n: usize) {
        if let Recv::Watched(w) = &self.recv {
            w.took(n);
        }
        if let Some(m) = &self.meter {
            if n > 0 {
                m.received.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}

impl AsyncRead for QuicStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_reply(cx))?;
        let before = buf.filled().len();
        let r = if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            Poll::Ready(Ok(()))
        } else {
            self.poll_recv(cx, buf)
        };
        self.was_read(buf.filled().len() - before);
        r
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(self.room(cx, buf.len()))?;
        let r = AsyncWrite::poll_write(Pin::new(&mut self.send), cx, &buf[..n])
            .map_err(io::Error::other);
        self.wrote(cx, r)
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

impl crate::splice::End for QuicStream {
    fn accepted(&self) -> Option<bool> {
        match (&self.reply, &self.refused) {
            (Some(_), _) => None,
            (None, Some(_)) => Some(false),
            (None, None) => Some(true),
        }
    }

    fn cut_signal(&self) -> Option<Arc<Watched>> {
        match &self.recv {
            Recv::Own(_) => None,
            Recv::Watched(w) => Some(w.clone()),
        }
    }

    fn abort(&mut self) {
        // Either may already be finished or stopped; then there is nothing left to tear down.
        let _ = self.send.reset(ABORTED);
        self.abort_receiving();
    }

    fn abort_receiving(&mut self) {
        match &mut self.recv {
            Recv::Own(r) => {
                let _ = r.stop(ABORTED);
            }
            Recv::Watched(w) => w.stop(ABORTED),
        }
    }

    /// The chunks quinn holds (slices of the received datagrams), not a copy of them.
    fn poll_read_chunks(
        &mut self,
        cx: &mut Context<'_>,
        _room: &mut crate::splice::ReadRoom,
        out: &mut VecDeque<Bytes>,
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_reply(cx))?;
        if !self.prefix.is_empty() {
            let prefix = std::mem::take(&mut self.prefix);
            let n = prefix.len();
            out.push_back(prefix);
            self.was_read(n);
            return Poll::Ready(Ok(n));
        }
        let mut got: [Bytes; crate::splice::READ_CHUNKS] = Default::default();
        let r = ready!(self.poll_quinn(
            cx,
            |r, cx| pin!(r.read_chunks(&mut got)).poll(cx).map_err(Into::into),
            |k| k.is_some_and(|k| k > 0),
        ))?;
        let n = match r {
            Some(k) => {
                let n = got[..k].iter().map(Bytes::len).sum();
                out.extend(got.into_iter().take(k).filter(|c| !c.is_empty()));
                n
            }
            None => 0,
        };
        self.was_read(n);
        Poll::Ready(Ok(n))
    }

    /// Hands quinn the chunks themselves: it keeps them until they are acknowledged, where
    /// `poll_write` would copy them into new buffers first.
    fn poll_write_chunks(
        &mut self,
        cx: &mut Context<'_>,
        chunks: &mut VecDeque<Bytes>,
    ) -> Poll<io::Result<usize>> {
        if self.reply.is_some() {
            let want: usize = chunks.iter().map(|c| c.len()).sum();
            let room = ready!(self.room(cx, want))?;
            if room < want {
                // Part of the first chunk only, copied: this happens once per early open.
                let first = chunks.front().map(|c| c.len()).unwrap_or(0);
                let Some(head) = chunks.front().map(|c| c.slice(..room.min(first))) else {
                    return Poll::Ready(Ok(0));
                };
                let r = AsyncWrite::poll_write(Pin::new(&mut self.send), cx, &head)
                    .map_err(io::Error::other);
                let r = self.wrote(cx, r);
                if let Poll::Ready(Ok(n)) = r {
                    crate::splice::consume(chunks, n);
                }
                return r;
            }
        }
        let send = &mut self.send;
        let r = pin!(send.write_chunks(chunks.make_contiguous()))
            .poll(cx)
            .map(|r| {
                r.map(|w| w.bytes)
                    .map_err(|e| io::Error::other(io::Error::from(e)))
            });
        let r = self.wrote(cx, r);
        if let Poll::Ready(Ok(_)) = r {
            // Fully written chunks were left empty.
            crate::splice::consume(chunks, 0);
        }
        r
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

/// Accepts a stream: writes the `Accepted` reply, waiting at most `timeout` for the opener's
/// flow-control credit (an opener that grants none must not hold the acceptor's task, its
/// stream slot and the connection to the service); the stream is reset when it runs out.
/// False when the reply could not be sent.
pub async fn accept(send: &mut SendStream, timeout: Duration) -> bool {
    match tokio::time::timeout(timeout, write_reply(send, &StreamReply::Accepted)).await {
        Ok(sent) => sent.is_ok(),
        Err(_) => {
            let _ = send.reset(0u32.into());
            false
        }
    }
}

/// How long a refusal may wait for the opener's flow-control credit.
pub const REFUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Refuses a stream: writes the reason and finishes our side. The reason is made to fit the
/// wire (a long or multi-line error message would otherwise fail the encoder, and the opener
/// would see a cut stream instead of the refusal).
pub async fn refuse(send: &mut SendStream, code: proto::RefuseCode, reason: &str) {
    let reason = proto::wire_text(reason, proto::limits::MAX_REASON_LEN);
    let reply = StreamReply::Refused { code, reason };
    // A peer that grants the stream no flow-control credit would hold this task (and the
    // stream's slot) forever: a refusal is a few bytes, given up on after a while.
    match tokio::time::timeout(REFUSE_TIMEOUT, write_reply(send, &reply)).await {
        Ok(_) => {
            let _ = send.finish();
        }
        Err(_) => {
            let _ = send.reset(0u32.into());
        }
    }
}

/// Opens a stream on `conn` with `header` and waits for the acceptor's reply.
pub async fn open(
    conn: &quinn::Connection,
    device: &str,
    header: &StreamHeader,
    timeout: Duration,
) -> Result<QuicStream, OpenError> {
    open_with(conn, device, header, timeout, None).await
}

/// How long a direct open waits for any packet from the peer before the path counts as dead:
/// several round trips (the answer needs one, plus the peer's connect to its service), at
/// least half a second, at most three.
pub fn direct_silence_limit(rtt: Duration) -> Duration {
    (rtt * 4 + Duration::from_millis(100)).clamp(Duration::from_millis(500), Duration::from_secs(3))
}

/// [`open`] on a direct path between devices, which may have died silently (the peer
/// suspended, its NAT's mapping dropped): nothing tells until the connection's idle timeout,
/// 30 s. If no packet at all came from the peer within [`direct_silence_limit`] of the open
/// (its acknowledgements of the header would have), the open fails as a timeout there and the
/// caller takes the relay: every forward waited the whole open timeout first (10 s, twice
/// with its retry). A path that answers packets but not yet the open (a service slow to
/// accept) gets the whole timeout.
pub async fn open_direct(
    conn: &quinn::Connection,
    device: &str,
    header: &StreamHeader,
    timeout: Duration,
) -> Result<QuicStream, OpenError> {
    let silence = direct_silence_limit(conn.rtt());
    open_checked(conn, device, header, timeout, None, Some(silence)).await
}

/// Opens a stream on `conn` with `header` and returns without waiting for the acceptor's
/// reply: the first payload bytes can follow the header at once, so a new proxied TCP
/// connection costs no tunnel round trip before its data moves (a waiting open adds one RTT
/// between gateway and device to every new connection). The reply is read before the first
/// payload byte; a refusal then surfaces as a `ConnectionRefused` read error, and
/// [`QuicStream::refused`] tells the code and reason. The payload sent meanwhile is
/// discarded by the refusing side. What goes before the reply is taken from `budget`, the
/// connection's [`EarlyBudget`].
pub async fn open_early(
    conn: &quinn::Connection,
    device: &str,
    header: &StreamHeader,
    timeout: Duration,
    budget: &Arc<EarlyBudget>,
) -> Result<QuicStream, OpenError> {
    open_with(conn, device, header, timeout, Some(budget)).await
}

/// [`open`] (`early` None) or [`open_early`] (its connection's budget). The timeout covers
/// waiting for stream credit (the peer's concurrent-stream limit) and, for a waiting open,
/// the reply.
pub async fn open_with(
    conn: &quinn::Connection,
    device: &str,
    header: &StreamHeader,
    timeout: Duration,
    early: Option<&Arc<EarlyBudget>>,
) -> Result<QuicStream, OpenError> {
    open_checked(conn, device, header, timeout, early, None).await
}

/// [`open_with`]; with `silence`, a waiting open also gives up that long after it began if
/// the connection received no packet meanwhile ([`open_direct`]).
async fn open_checked(
    conn: &quinn::Connection,
    device: &str,
    header: &StreamHeader,
    timeout: Duration,
    early: Option<&Arc<EarlyBudget>>,
    silence: Option<Duration>,
) -> Result<QuicStream, OpenError> {
    let heard = || conn.stats().udp_rx.datagrams;
    let silent_check = silence.map(|s| (tokio::time::Instant::now() + s, heard()));
    let tunnel = |source| OpenError::Tunnel {
        device: device.to_owned(),
        source,
    };
    let timed_out = || OpenError::Timeout(device.to_owned());
    let deadline = tokio::time::Instant::now() + timeout;
    let (mut send, mut recv) = match tokio::time::timeout_at(deadline, conn.open_bi()).await {
        Ok(r) => r.map_err(|e| tunnel(e.into()))?,
        Err(_) => return Err(timed_out()),
    };
    // Given up on: reset, not dropped (quinn finishes a dropped send stream, and the acceptor
    // would take header and end for a whole request).
    let abandon = |send: &mut SendStream, recv: &mut RecvStream| {
        let _ = send.reset(ABORTED);
        let _ = recv.stop(ABORTED);
    };
    match tokio::time::timeout_at(deadline, write_header(&mut send, header)).await {
        Ok(r) => r.map_err(tunnel)?,
        Err(_) => {
            abandon(&mut send, &mut recv);
            return Err(timed_out());
        }
    }
    if let Some(budget) = early {
        let mut s = QuicStream::new(send, recv, Bytes::new());
        s.reply = Some(BytesMut::new());
        let hold = budget.take(EARLY_BYTES);
        s.early_left = hold.bytes;
        s.early_hold = Some(hold);
        s.reply_deadline = Some(Box::pin(tokio::time::sleep_until(deadline)));
        return Ok(s);
    }
    let replied = {
        // Pinned across both waits: a read cut at the first would lose what it had read.
        let mut reading = pin!(read_reply(&mut recv));
        match silent_check {
            Some((at, before)) => {
                match tokio::time::timeout_at(at.min(deadline), &mut reading).await {
                    Ok(r) => Some(r),
                    Err(_) if heard() == before => None,
                    Err(_) => tokio::time::timeout_at(deadline, &mut reading).await.ok(),
                }
            }
            None => tokio::time::timeout_at(deadline, &mut reading).await.ok(),
        }
    };
    let (reply, rest) = match replied {
        Some(Ok(r)) => r,
        // Reset, not dropped: a dropped send stream is finished, and the device would read
        // the header and an end, an empty request, if it went on.
        Some(Err(e)) => {
            abandon(&mut send, &mut recv);
            return Err(tunnel(e));
        }
        None => {
            abandon(&mut send, &mut recv);
            return Err(timed_out());
        }
    };
    match reply {
        StreamReply::Accepted => Ok(QuicStream::new(send, recv, rest)),
        StreamReply::Refused { code, reason } => Err(OpenError::Refused {
            device: device.to_owned(),
            code,
            reason,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_timeout_is_found_through_io_errors() {
        let inner = io::Error::new(io::ErrorKind::TimedOut, ReplyTimedOut);
        assert!(ReplyTimedOut::is_in(&inner));
        // As hyper or a splice pass it on: wrapped again.
        let wrapped = io::Error::other(inner);
        assert!(ReplyTimedOut::is_in(&wrapped));
        let other = io::Error::new(io::ErrorKind::TimedOut, "some other timeout");
        assert!(!ReplyTimedOut::is_in(&other));
        assert!(StreamRefused::find(&wrapped).is_none());
    }
}
