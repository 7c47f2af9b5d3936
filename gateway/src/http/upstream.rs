//! The gateway's HTTP/1.1 client toward device services, over tunnel streams: one request at
//! a time per connection; the response body is read straight off the stream by whoever
//! streams it to the client (no task, no channel, no callback), and at its end the
//! connection goes back to the [`Pool`]. The wire format is [`super::h1`]'s.
//!
//! A request's head is encoded once ([`Outgoing`]); a bodiless idempotent request whose
//! pooled connection turns out to have been closed by the service is sent again from those
//! bytes on a new connection (see [`SendError::again`]).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::HeaderMap;
use http::{Method, Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::poll_read_buf;
use tracing::debug;

use super::body::{BodyStalled, BoxError, ProxyBody, TooLarge};
use super::h1::{self, BodyFraming, ChunkedDecoder, H1Error, ReqFraming};
use super::headers::Forwarded;
use super::pool::{Pool, PoolKey};

/// Read buffer reserved before each read of a response: a small answer (head and body)
/// comes in one read; a large body is read in pieces of about this size.
const READ_CHUNK: usize = 16 * 1024;

/// A connection of the front: the client's, or the service's (a tunnel stream; a duplex
/// pipe in tests).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// What an upstream connection runs on: bytes, and a response body's bytes as chunks, which
/// a tunnel stream hands over as it holds them (slices of the decrypted packets), so they
/// reach the client's connection without a copy on the way ([`super::outbox`]).
pub trait UpIo: Io {
    /// The next bytes, at most `max` of them: `None` at the end of the stream.
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<io::Result<Option<Bytes>>> {
        tunnel::splice::poll_read_owned(self, cx, max, READ_CHUNK)
    }

    /// Writes from the front of `chunks`, removing what was written (a chunk written in part
    /// keeps its rest): the number of bytes written. A tunnel stream takes the chunks
    /// themselves (a request body's bytes go up without a copy).
    fn poll_write_chunks(
        &mut self,
        cx: &mut Context<'_>,
        chunks: &mut VecDeque<Bytes>,
    ) -> Poll<io::Result<usize>> {
        poll_write_front(self, cx, chunks)
    }

    /// The connection goes idle (back to the pool): a tunnel stream's last read no longer
    /// counts as data its reader stopped taking ([`tunnel::holds`]).
    fn rest(&self) {}

    /// A tunnel stream's held-stream watch: kept by an upgraded connection, whose splice a
    /// cut must end ([`tunnel::splice::End::cut_signal`]).
    fn cut_signal(&self) -> Option<Arc<tunnel::holds::Watched>> {
        None
    }

    /// Ends the exchange abnormally both ways (a tunnel stream is reset): the service sees
    /// its request fail, not a clean end.
    fn abort(&mut self) {}

    /// Ends only the receiving side abnormally, what was sent having been finished (see
    /// [`tunnel::splice::End::abort_receiving`]).
    fn abort_receiving(&mut self) {}
}

/// Writes (a copy of) the first of `chunks`, removing what was written.
fn poll_write_front<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    cx: &mut Context<'_>,
    chunks: &mut VecDeque<Bytes>,
) -> Poll<io::Result<usize>> {
    let Some(front) = chunks.front_mut() else {
        return Poll::Ready(Ok(0));
    };
    let n = ready!(Pin::new(w).poll_write(cx, front))?;
    front.advance(n);
    if front.is_empty() {
        chunks.pop_front();
    }
    Poll::Ready(Ok(n))
}

impl UpIo for tunnel::upstream::Upstream {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<io::Result<Option<Bytes>>> {
        tunnel::upstream::Upstream::poll_read_chunk(self, cx, max)
    }

    fn rest(&self) {
        tunnel::upstream::Upstream::rest(self)
    }

    fn cut_signal(&self) -> Option<Arc<tunnel::holds::Watched>> {
        tunnel::splice::End::cut_signal(self)
    }

    fn abort(&mut self) {
        tunnel::splice::End::abort(self)
    }

    fn abort_receiving(&mut self) {
        tunnel::splice::End::abort_receiving(self)
    }

    fn poll_write_chunks(
        &mut self,
        cx: &mut Context<'_>,
        chunks: &mut VecDeque<Bytes>,
    ) -> Poll<io::Result<usize>> {
        // A small piece (a short body, a chunk-size line) costs less copied than kept: quinn
        // keeps what it is handed until the peer acknowledges it, and a slice kept keeps the
        // client connection's whole read buffer from being reused.
        if chunks
            .front()
            .is_some_and(|c| c.len() < super::outbox::HOLD_MIN)
        {
            return poll_write_front(self, cx, chunks);
        }
        tunnel::splice::End::poll_write_chunks(self, cx, chunks)
    }
}

#[cfg(test)]
impl UpIo for tokio::io::DuplexStream {}

/// Writes what is left of `bytes` after `written` (kept across polls), then flushes.
pub(crate) fn poll_write_all(
    io: &mut dyn Io,
    cx: &mut Context<'_>,
    bytes: &[u8],
    written: &mut usize,
) -> Poll<io::Result<()>> {
    while *written < bytes.len() {
        let n = ready!(Pin::new(&mut *io).poll_write(cx, &bytes[*written..]))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        *written += n;
    }
    Pin::new(io).poll_flush(cx)
}

/// An upstream connection between requests: the stream and bytes read but not yet used
/// (always none between requests: a connection with stray bytes is not reused).
pub struct Upstream {
    io: Box<dyn UpIo>,
    buf: BytesMut,
    /// When the response head being read is worth parsing again.
    scan: h1::HeadScan,
    /// The buffer grew past one read for a large head: let go of it when pooled
    /// (`capacity()` then counts only what is left after the head was split off).
    grown: bool,
    /// Interim answers skipped before this request's final one ([`MAX_INTERIM`]).
    interim: u8,
}

/// Interim (1xx) answers taken before a final one: a service sends one `100 Continue` and
/// maybe a `103 Early Hints` or two.
const MAX_INTERIM: u8 = 16;

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("buffered", &self.buf.len())
            .finish()
    }
}

/// Why an exchange with a service failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the service closed the connection without answering")]
    Closed,
    #[error("tunnel stream failed: {error}")]
    Io {
        #[source]
        error: io::Error,
        /// Part of the answer had arrived.
        answered: bool,
    },
    #[error(transparent)]
    Malformed(#[from] H1Error),
    #[error("the service closed the connection in the middle of its answer")]
    Truncated,
    #[error("request body: {0}")]
    RequestBody(#[source] BoxError),
    /// A `101 Switching Protocols` the request did not ask for, or to another protocol than
    /// the one it named (RFC 9110 §15.2.2).
    #[error("the service switched protocols unasked ({0})")]
    UnaskedSwitch(String),
    /// A `101 Switching Protocols` before the request's body was all sent: the upgraded
    /// bytes would start inside it.
    #[error("the service switched protocols before the request's body was all sent")]
    EarlySwitch,
    /// The service sent part of its answer, then nothing for the read timeout.
    #[error("the service sent nothing more of its answer for {} s", .0.as_secs())]
    Stalled(std::time::Duration),
}

impl UpstreamError {
    /// The connection ended before any of the answer came: closed, or reset by the service.
    pub fn ended_unanswered(&self) -> bool {
        match self {
            UpstreamError::Closed => true,
            UpstreamError::Io {
                error,
                answered: false,
            } => {
                use io::ErrorKind::*;
                matches!(
                    error.kind(),
                    ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
                )
            }
            _ => false,
        }
    }

    /// The tunnel under the exchange went before any of the answer came (its QUIC connection
    /// ended: the device's agent reconnected, was replaced or went away; quinn says
    /// `NotConnected`): not the service's doing, and a request that may be sent again is.
    pub fn tunnel_lost(&self) -> bool {
        matches!(self, UpstreamError::Io { error, answered: false }
            if error.kind() == io::ErrorKind::NotConnected)
    }

    /// The device refused the stream (opened early, so the refusal came instead of data).
    pub fn refused(&self) -> Option<&tunnel::stream::StreamRefused> {
        match self {
            UpstreamError::Io { error, .. } => tunnel::stream::StreamRefused::find(error),
            _ => None,
        }
    }

    /// The device did not reply to the early-opened stream in time (a timeout of the tunnel,
    /// not an answer of the service).
    pub fn reply_timed_out(&self) -> bool {
        match self {
            UpstreamError::Io { error, .. } => tunnel::stream::ReplyTimedOut::is_in(error),
            _ => false,
        }
    }

    /// Why the client's request body failed on the way up, if that is what ended the request
    /// (see [`UpstreamError::too_large`] and [`UpstreamError::body_stalled`] for two reasons).
    pub fn request_body(&self) -> Option<&BoxError> {
        match self {
            UpstreamError::RequestBody(e) => Some(e),
            _ => None,
        }
    }

    /// The client's body grew past the app's `max_body` on the way up.
    pub fn too_large(&self) -> bool {
        self.body_failure::<TooLarge>().is_some()
    }

    /// The client left its body stalled.
    pub fn body_stalled(&self) -> Option<&BodyStalled> {
        self.body_failure::<BodyStalled>()
    }

    /// The client's body failed on the way up, for the reason `T`.
    fn body_failure<T: std::error::Error + 'static>(&self) -> Option<&T> {
        let UpstreamError::RequestBody(e) = self else {
            return None;
        };
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e.as_ref());
        while let Some(c) = cur {
            if let Some(t) = c.downcast_ref::<T>() {
                return Some(t);
            }
            cur = c.source();
        }
        None
    }
}

/// A failed [`Upstream::send`]. `again` gives the request back when it can go once more on
/// another connection: nothing of it was written, or it has no body, an idempotent method
/// (RFC 9110 §9.2.2) and the connection ended before any answer (the service closed an idle
/// keep-alive connection as the request crossed it, as nginx retries), or it has no body, a
/// safe method and the tunnel was lost before any answer.
#[derive(Debug)]
pub struct SendError {
    pub error: UpstreamError,
    pub again: Option<Outgoing>,
}

/// A request ready to go up: its head encoded, its body still the client's.
pub struct Outgoing {
    head: Bytes,
    head_request: bool,
    /// Bodiless and idempotent: may go again whole after a connection ended unanswered.
    replayable: bool,
    /// Bodiless and safe (GET, HEAD, OPTIONS): may go again after the tunnel was lost
    /// before the answer, though the service may have had it (its agent hands requests on
    /// before the loss is seen).
    safe: bool,
    /// The connection may carry another request after this one's answer: not after a body
    /// on a method that defines none (DELETE, OPTIONS, unknown methods:
    /// [`h1::body_is_defined`]; RFC 9110 §9.3.5 warns of exactly this), which a service
    /// ignoring it would read as its next request, one the policy never saw. Such a request
    /// also says `Connection: close` (an upgrade request too), so that the service parses
    /// nothing after it; not pooling alone kept the smuggled request's answer from anyone, not
    /// the request from running. (GET, HEAD and TRACE with a body are refused before they get
    /// here.)
    reusable: bool,
    body: Option<ReqBody>,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field("head", &self.head)
            .field("body", &self.body.is_some())
            .finish()
    }
}

impl Outgoing {
    /// `target` is the origin-form request target (printable ASCII, no spaces); `headers` the
    /// client's, rewritten on the way as [`super::headers::write_request_headers`] says.
    pub fn new(
        method: &Method,
        target: &str,
        headers: &HeaderMap,
        fwd: &Forwarded<'_>,
        body: ProxyBody,
    ) -> Self {
        let framing = h1::request_framing(body.is_end_stream(), body.size_hint().exact());
        let mut head = Vec::new();
        h1::encode_request_head(method, target, headers, fwd, framing, &mut head);
        // An empty body is none, however it was framed (an HTTP/2 request saying
        // `content-length: 0` without ending its stream with its headers).
        let reusable = matches!(framing, ReqFraming::Empty | ReqFraming::Length(0))
            || h1::body_is_defined(method);
        if !reusable && head.ends_with(b"\r\n\r\n") {
            head.truncate(head.len() - 2);
            head.extend_from_slice(b"connection: close\r\n\r\n");
        }
        let body = match framing {
            ReqFraming::Empty => None,
            ReqFraming::Length(n) => Some(ReqBody::new(body, Some(n))),
            ReqFraming::Chunked => Some(ReqBody::new(body, None)),
        };
        // Decided here, from the framing: `send` takes the body out before the answer comes,
        // and a PUT judged by its body then went again as a head promising a body that never
        // followed (the service waited for it, or read the next request as it).
        let replayable = framing == ReqFraming::Empty
            && matches!(
                *method,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::TRACE
                    | Method::PUT
                    | Method::DELETE
            );
        let safe = framing == ReqFraming::Empty
            && matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        Outgoing {
            head: Bytes::from(head),
            head_request: *method == Method::HEAD,
            replayable,
            safe,
            reusable,
            body,
        }
    }
}

/// The rest of a request body on its way up, framed as its head said.
struct ReqBody {
    body: ProxyBody,
    /// Bytes still due by `Content-Length`; None: chunked.
    left: Option<u64>,
    /// Encoded pieces not yet written (a chunk's size line, its data, its CRLF).
    out: VecDeque<Bytes>,
    ended: bool,
    /// The last write waits for the stream (the service is not reading), not for the client.
    stream_full: bool,
    /// Bytes the stream took so far: the service reading is progress of the exchange.
    sent: u64,
}

/// Why a request body stopped going up.
enum WriteError {
    /// The client's side: its body failed, or did not match its length.
    Client(BoxError),
    /// The stream's side.
    Io(io::Error),
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Client(e) => write!(f, "client's body: {e}"),
            WriteError::Io(e) => write!(f, "stream: {e}"),
        }
    }
}

impl ReqBody {
    fn new(body: ProxyBody, left: Option<u64>) -> Self {
        ReqBody {
            body,
            left,
            out: VecDeque::with_capacity(3),
            ended: false,
            stream_full: false,
            sent: 0,
        }
    }

    /// Writes the body as it comes; Ready(Ok) once all of it (and its framing) was written.
    fn poll_write(
        &mut self,
        io: &mut dyn UpIo,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), WriteError>> {
        loop {
            while !self.out.is_empty() {
                let written = io.poll_write_chunks(cx, &mut self.out);
                self.stream_full = written.is_pending();
                let n = ready!(written).map_err(WriteError::Io)?;
                if n == 0 {
                    return Poll::Ready(Err(WriteError::Io(io::ErrorKind::WriteZero.into())));
                }
                self.sent += n as u64;
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers of the client's are not forwarded (nor by nginx).
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    match self.left.as_mut() {
                        None => {
                            self.out.push_back(h1::chunk_size_line(data.len()));
                            self.out.push_back(data);
                            self.out.push_back(Bytes::from_static(b"\r\n"));
                        }
                        Some(left) => {
                            let n = data.len() as u64;
                            if n > *left {
                                return Poll::Ready(Err(WriteError::Client(
                                    "request body longer than its Content-Length".into(),
                                )));
                            }
                            *left -= n;
                            self.out.push_back(data);
                        }
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(WriteError::Client(e))),
                None => {
                    match self.left {
                        None => self.out.push_back(Bytes::from_static(h1::LAST_CHUNK)),
                        Some(0) => {}
                        Some(_) => {
                            return Poll::Ready(Err(WriteError::Client(
                                "request body shorter than its Content-Length".into(),
                            )))
                        }
                    }
                    self.ended = true;
                }
            }
        }
    }
}

impl Upstream {
    pub fn new(io: impl UpIo) -> Self {
        Upstream {
            io: Box::new(io),
            buf: BytesMut::new(),
            scan: h1::HeadScan::default(),
            grown: false,
            interim: 0,
        }
    }

    /// Goes idle: see [`UpIo::rest`].
    pub(crate) fn rest(&self) {
        self.io.rest();
    }

    /// For idle connections: false if the service closed the stream meanwhile (or sent
    /// something nobody asked for). Registers no waker.
    pub(crate) fn still_open(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut one = [0u8; 1];
        let mut rb = ReadBuf::new(&mut one);
        Pin::new(&mut *self.io)
            .poll_read(&mut cx, &mut rb)
            .is_pending()
    }

    /// Sends `out` and waits for the response head (skipping interim `1xx` answers but
    /// `101`), writing the request body meanwhile. The response's body reads the rest of
    /// the answer off this connection, and writes what is left of the request body.
    pub async fn send(mut self, mut out: Outgoing) -> Result<Response<UpBody>, SendError> {
        let mut written = 0;
        let head = out.head.clone();
        let wrote =
            std::future::poll_fn(|cx| poll_write_all(&mut *self.io, cx, &head, &mut written)).await;
        if let Err(error) = wrote {
            let again = (written == 0 || out.replayable).then_some(out);
            return Err(SendError {
                error: UpstreamError::Io {
                    error,
                    answered: false,
                },
                again,
            });
        }
        let mut writer = out.body.take();
        let mut cut = false;
        let mut answered = false;
        let head_request = out.head_request;
        let r = std::future::poll_fn(|cx| {
            if let Some(w) = writer.as_mut() {
                match w.poll_write(&mut *self.io, cx) {
                    Poll::Ready(Ok(())) => writer = None,
                    Poll::Ready(Err(WriteError::Client(e))) => {
                        return Poll::Ready(Err(UpstreamError::RequestBody(e)))
                    }
                    // The service may have answered early and closed its side: read on.
                    Poll::Ready(Err(WriteError::Io(e))) => {
                        debug!(error = %e, "request body cut short by the stream; reading the answer");
                        writer = None;
                        cut = true;
                    }
                    Poll::Pending => {}
                }
            }
            self.poll_head(cx, head_request, &mut answered)
        })
        .await;
        match r {
            Ok(mut head) => {
                head.keep_alive &= !cut && out.reusable;
                Ok(UpBody::response(self, head, writer))
            }
            Err(error) => {
                // The client's body failed part way: the service is told by a reset, as when
                // that happens later (`poll_data`), not by a clean end of a short upload.
                if matches!(error, UpstreamError::RequestBody(_)) {
                    self.io.abort();
                }
                let again = ((out.replayable && error.ended_unanswered())
                    || (out.safe && error.tunnel_lost()))
                .then_some(out);
                Err(SendError { error, again })
            }
        }
    }

    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
        answered: &mut bool,
    ) -> Poll<Result<h1::ResponseHead, UpstreamError>> {
        loop {
            if !self.buf.is_empty() && self.scan.due(&self.buf) {
                let parsed = h1::parse_response(&mut self.buf, head_request);
                if !matches!(parsed, Ok(None)) {
                    self.scan.reset();
                }
                if let Some(head) = parsed? {
                    // Interim answers (100 Continue, 103 Early Hints) are not forwarded. A
                    // few: a service sending them without end kept this parsing them in a
                    // loop that never waited (the response timeout fires only on a wait).
                    if head.status.is_informational()
                        && head.status != StatusCode::SWITCHING_PROTOCOLS
                    {
                        self.interim += 1;
                        if self.interim > MAX_INTERIM {
                            self.interim = 0;
                            return Poll::Ready(Err(UpstreamError::Malformed(h1::H1Error::Head(
                                format!("more than {MAX_INTERIM} interim (1xx) answers"),
                            ))));
                        }
                        continue;
                    }
                    self.interim = 0;
                    return Poll::Ready(Ok(head));
                }
            }
            self.buf.reserve(READ_CHUNK);
            self.grown |= self.buf.capacity() > 2 * READ_CHUNK;
            match ready!(poll_read_buf(Pin::new(&mut *self.io), cx, &mut self.buf)) {
                Ok(0) if *answered => return Poll::Ready(Err(UpstreamError::Truncated)),
                Ok(0) => return Poll::Ready(Err(UpstreamError::Closed)),
                Ok(_) => *answered = true,
                Err(error) => {
                    return Poll::Ready(Err(UpstreamError::Io {
                        error,
                        answered: *answered,
                    }))
                }
            }
        }
    }
}

/// A chunked body's decoder, and bytes read off the stream not yet decoded.
#[derive(Default)]
struct Dechunk {
    decoder: ChunkedDecoder,
    held: Bytes,
}

/// How much of a response body is left.
enum Remaining {
    Empty,
    Length(u64),
    /// Boxed: most answers are small and have a length, and the body moves with the answer.
    Chunked(Box<Dechunk>),
    UntilClose,
}

impl Remaining {
    /// The rest of the answer is within the `buffered` bytes already read.
    fn within(&self, buffered: usize) -> bool {
        match self {
            Remaining::Empty => true,
            Remaining::Length(n) => *n <= buffered as u64,
            Remaining::Chunked(_) | Remaining::UntilClose => false,
        }
    }
}

/// A response body read off its [`Upstream`] connection, which it returns to its pool
/// ([`UpBody::home`]) once the body is over, if the connection can take another request.
pub struct UpBody {
    conn: Option<Upstream>,
    left: Remaining,
    /// The rest of the request body (the service answered before reading all of it).
    writer: Option<ReqBody>,
    keep_alive: bool,
    /// How long the service said it keeps an idle connection, and when its answer's head
    /// came: its timer runs from when it finished writing, which may be long before a slow
    /// client took the last byte, and is taken to run from the head ([`UpBody::finish`]).
    keep_said: Option<std::time::Duration>,
    head_at: std::time::Instant,
    home: Option<(Arc<Pool>, PoolKey)>,
    /// How long the service may keep the rest of its answer waiting ([`UpBody::read_timeout`]).
    stall: Option<super::deadline::Stall>,
}

impl std::fmt::Debug for UpBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpBody")
            .field("open", &self.conn.is_some())
            .finish()
    }
}

impl UpBody {
    fn response(
        conn: Upstream,
        head: h1::ResponseHead,
        writer: Option<ReqBody>,
    ) -> Response<UpBody> {
        let upgrade = head.status == StatusCode::SWITCHING_PROTOCOLS;
        let body = UpBody {
            conn: Some(conn),
            left: match head.framing {
                BodyFraming::Empty => Remaining::Empty,
                BodyFraming::Length(n) => Remaining::Length(n),
                BodyFraming::Chunked => Remaining::Chunked(Box::default()),
                BodyFraming::UntilClose => Remaining::UntilClose,
            },
            // Answered before the whole request body was written: whatever the service makes
            // of the rest (it may read it as the start of its next request — the CL.0 desync),
            // this connection must not carry another client's request.
            keep_alive: head.keep_alive && !upgrade && writer.is_none(),
            keep_said: head.keep_alive_timeout,
            head_at: std::time::Instant::now(),
            writer,
            home: None,
            stall: None,
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = head.status;
        *resp.headers_mut() = head.headers;
        resp
    }

    /// Where the connection goes at the end of the body.
    pub fn home(mut self, pool: Arc<Pool>, key: PoolKey) -> Self {
        self.home = Some((pool, key));
        self
    }

    /// The service may keep the rest of its answer waiting at most `timeout` between two
    /// pieces (nginx's `proxy_read_timeout`): one that sent its head and hung held the
    /// client's connection, the tunnel stream and the app's slot for ever. Only waits for the
    /// service count: the body is read when the client is ready for more.
    pub fn read_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.stall = Some(super::deadline::Stall::new(timeout));
        self
    }

    /// The service answered before the whole request body was written: a `101` then would
    /// start the upgraded bytes in the middle of the body.
    pub fn upload_unfinished(&self) -> bool {
        self.writer.is_some()
    }

    /// After a `101 Switching Protocols`: the connection as a byte stream, starting with
    /// whatever the service sent after its answer's head.
    pub fn into_upgraded(mut self) -> Option<Upgraded> {
        let conn = self.conn.take()?;
        Some(Upgraded {
            // Copied (usually nothing): frozen, the rest of the read buffer kept all of it —
            // 16 KiB, 128 KiB after a padded `101` head — for as long as the upgraded
            // connection lasts, as the client side's copy says (server.rs).
            pending: Bytes::copy_from_slice(&conn.buf),
            cut: conn.io.cut_signal(),
            io: UpgradedIo::Service(conn.io),
        })
    }

    /// The body is over: pool the connection if it can serve again.
    fn finish(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if let (true, None, true, Some((pool, key))) = (
            self.keep_alive,
            &self.writer,
            conn.buf.is_empty(),
            self.home.take(),
        ) {
            let left = self
                .keep_said
                .map(|t| t.saturating_sub(self.head_at.elapsed()));
            // Empty, yet holding its allocation: one grown past the usual read (up to 128 KiB
            // after a large head) is let go while the connection idles. The usual 16 KiB is
            // kept: a fresh one per request cost about 0.7 µs of the gateway's 14 (benches/ab.sh
            // front, 4 rounds each, within its noise).
            if std::mem::take(&mut conn.grown) || conn.buf.capacity() > READ_CHUNK {
                conn.buf = BytesMut::new();
            }
            pool.put(key, conn, super::pool::keep_for(left));
        }
    }

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, UpstreamError>>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some(w) = self.writer.as_mut() {
            let sent = w.sent;
            let r = w.poll_write(&mut *conn.io, cx);
            if w.sent != sent {
                // The service read some of the upload: the exchange moves.
                if let Some(s) = self.stall.as_mut() {
                    s.progress();
                }
            }
            if let Poll::Ready(r) = r {
                self.writer = None;
                match r {
                    Ok(()) => {}
                    // The client's body failed (too large, stalled, badly framed): the service
                    // would wait for the rest of a body that never comes, holding its answer,
                    // the stream and the app's slot until the read timeout. The exchange ends
                    // here, told to the service as a reset, and the answer is cut.
                    // An answer already read whole (a 413 or 401 sent early) is still given.
                    Err(WriteError::Client(e)) if !self.left.within(conn.buf.len()) => {
                        conn.io.abort();
                        return Poll::Ready(Some(Err(UpstreamError::RequestBody(e))));
                    }
                    Err(WriteError::Client(e)) => {
                        debug!(error = %e, "request body failed after the whole answer came");
                        self.keep_alive = false;
                    }
                    // The stream's side failed: the service has its answer going. Finish
                    // reading it, but do not reuse a connection whose request was cut short.
                    Err(WriteError::Io(e)) => {
                        debug!(error = %e, "request body cut short after the answer began");
                        self.keep_alive = false;
                    }
                }
            }
        }
        loop {
            let buf = &mut conn.buf;
            match &mut self.left {
                Remaining::Empty | Remaining::Length(0) => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Remaining::Length(left) if !buf.is_empty() => {
                    let n = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= n as u64;
                    let data = buf.split_to(n).freeze();
                    if *left == 0 {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(data)));
                }
                Remaining::Chunked(c) if !buf.is_empty() => {
                    let d = &mut c.decoder;
                    let step = d.decode(buf)?;
                    if let Some(r) = step.data {
                        buf.advance(r.start);
                        return Poll::Ready(Some(Ok(buf.split_to(r.len()).freeze())));
                    }
                    buf.advance(step.consumed);
                    if d.is_done() {
                        self.finish();
                        return Poll::Ready(None);
                    }
                }
                // Past what came with the head: decoded in the chunks the stream holds, the
                // data handed on as slices of them.
                Remaining::Chunked(c) if !c.held.is_empty() => {
                    let step = c.decoder.decode(&c.held)?;
                    let data = step.data.map(|r| c.held.slice(r));
                    c.held.advance(step.consumed);
                    if let Some(data) = data {
                        return Poll::Ready(Some(Ok(data)));
                    }
                    if c.decoder.is_done() {
                        // Bytes after the body: kept, so the connection is not reused.
                        buf.extend_from_slice(&c.held);
                        self.finish();
                        return Poll::Ready(None);
                    }
                }
                Remaining::UntilClose if !buf.is_empty() => {
                    return Poll::Ready(Some(Ok(buf.split().freeze())));
                }
                Remaining::Length(_) | Remaining::Chunked(_) | Remaining::UntilClose => {}
            }
            // The rest of the body, as the stream holds it: handed on as it is (a length,
            // or up to the close) or decoded in place (chunked, above).
            let max = match &self.left {
                Remaining::Length(left) => usize::try_from(*left).unwrap_or(usize::MAX),
                _ => usize::MAX,
            };
            let read = match conn.io.poll_read_chunk(cx, max) {
                Poll::Pending => {
                    // Waiting for the client's upload (the rest of the request body still
                    // going up) is not the service's wait; a service that neither reads the
                    // upload nor answers is (it held the request, its slots and the stream
                    // for as long as the client kept sending).
                    if self.writer.as_ref().is_some_and(|w| !w.stream_full) {
                        if let Some(s) = self.stall.as_mut() {
                            s.progress();
                        }
                    } else if self.stall.as_mut().is_some_and(|s| s.expired(cx)) {
                        let t = self.stall.as_ref().map(|s| s.timeout()).unwrap_or_default();
                        return Poll::Ready(Some(Err(UpstreamError::Stalled(t))));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Ok(read)) => {
                    if let Some(s) = self.stall.as_mut() {
                        s.progress();
                    }
                    read
                }
                // Errors drop the connection in `poll_frame`.
                Poll::Ready(Err(error)) => {
                    return Poll::Ready(Some(Err(UpstreamError::Io {
                        error,
                        answered: true,
                    })))
                }
            };
            match (&mut self.left, read) {
                (Remaining::Chunked(c), Some(data)) => c.held = data,
                (Remaining::Length(left), Some(data)) => {
                    *left -= data.len() as u64;
                    if *left == 0 {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(data)));
                }
                (Remaining::UntilClose, Some(data)) => return Poll::Ready(Some(Ok(data))),
                (Remaining::UntilClose, None) => {
                    self.conn = None;
                    return Poll::Ready(None);
                }
                // (An empty body returned above.)
                (_, None) | (Remaining::Empty, Some(_)) => {
                    return Poll::Ready(Some(Err(UpstreamError::Truncated)))
                }
            }
        }
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self.get_mut();
        let r = ready!(this.poll_data(cx));
        if let Some(Err(_)) = r {
            this.conn = None;
        }
        Poll::Ready(r.map(|r| r.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || matches!(self.left, Remaining::Empty | Remaining::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Remaining::Empty => SizeHint::with_exact(0),
            Remaining::Length(n) => SizeHint::with_exact(n),
            _ if self.conn.is_none() => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for UpBody {
    /// Dropped unread: an empty body (`204`, `HEAD`, `Content-Length: 0`) is never polled,
    /// and its connection is as good as after a finished one. Dropped mid-body, the
    /// connection is dropped too: the rest of that answer is still on its way.
    fn drop(&mut self) {
        if matches!(self.left, Remaining::Empty | Remaining::Length(0)) {
            self.finish();
        }
    }
}

/// An upgraded connection (WebSocket, …) to the service: bytes the service sent right
/// after its `101` answer first, then the stream. The client's side of an upgrade (and a
/// plain connection found to speak HTTP/2) is one too: what was read past the head first.
pub struct Upgraded {
    pending: Bytes,
    io: UpgradedIo,
    /// The service side's held-stream watch ([`tunnel::holds`]), for the splice.
    cut: Option<Arc<tunnel::holds::Watched>>,
}

/// Which end an [`Upgraded`] is: the service's keeps its [`UpIo::abort`].
enum UpgradedIo {
    Service(Box<dyn UpIo>),
    Client(Box<dyn Io>),
}

impl UpgradedIo {
    fn get(&mut self) -> &mut dyn Io {
        match self {
            UpgradedIo::Service(io) => &mut **io,
            UpgradedIo::Client(io) => &mut **io,
        }
    }
}

/// Spliced like any other connection end (an upgraded connection's bytes are shaped by the
/// app's limits, see `proxy::splice_upgrade`).
impl tunnel::splice::End for Upgraded {
    fn abort(&mut self) {
        // The service's end is reset (a tunnel stream dropped is finished: the service took a
        // cut upload for a whole one). The client's closes as it is dropped, right after.
        if let UpgradedIo::Service(io) = &mut self.io {
            io.abort();
        }
    }
    fn abort_receiving(&mut self) {
        // What went to the service was finished whole: kept, only its answer is refused (the
        // trait's default, a whole abort, reset a finished upload).
        if let UpgradedIo::Service(io) = &mut self.io {
            io.abort_receiving();
        }
    }
    fn cut_signal(&self) -> Option<Arc<tunnel::holds::Watched>> {
        self.cut.clone()
    }
}

impl Upgraded {
    /// The client's side.
    pub fn new(pending: Bytes, io: Box<dyn Io>) -> Self {
        Upgraded {
            pending,
            io: UpgradedIo::Client(io),
            cut: None,
        }
    }
}

impl AsyncRead for Upgraded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pending.is_empty() {
            let n = self.pending.len().min(buf.remaining());
            buf.put_slice(&self.pending[..n]);
            self.pending.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(self.io.get()).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.io.get()).poll_write(cx, b)
    }
    // Passed on: a plain connection that turned out to speak HTTP/2 is one of these, and
    // HTTP/2 writes each frame's header and payload as two slices of one write.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.io.get()).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        match &self.io {
            UpgradedIo::Service(io) => io.is_write_vectored(),
            UpgradedIo::Client(io) => io.is_write_vectored(),
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.io.get()).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.io.get()).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::body;
    use http::header;
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::http::pool::tests::key;

    /// A hyper server on the far end of a duplex pipe: answers `METHOD path body-length` and
    /// echoes the body after it; counts the connections it serves.
    fn backend(conns: &Arc<AtomicUsize>) -> Upstream {
        let (a, b) = tokio::io::duplex(64 * 1024);
        conns.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let head = format!("{} {} ", req.method(), req.uri());
                    let chunked = req.headers().get(header::TRANSFER_ENCODING).is_some();
                    let b = req.into_body().collect().await.unwrap().to_bytes();
                    let text = format!("{head}{} chunked={chunked} ", b.len());
                    let mut all = text.into_bytes();
                    all.extend_from_slice(&b);
                    Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
                        Bytes::from(all),
                    )))
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(b), svc)
                .await;
        });
        Upstream::new(a)
    }

    /// A far end that reads one request head, answers `script`, and closes unless `stay`.
    fn scripted(script: &'static [u8], stay: bool) -> (Upstream, tokio::task::JoinHandle<Vec<u8>>) {
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = [0u8; 4096];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = b.read(&mut chunk).await.unwrap();
                if n == 0 {
                    return got;
                }
                got.extend_from_slice(&chunk[..n]);
            }
            b.write_all(script).await.unwrap();
            if stay {
                // Keep reading (an upgraded or pooled connection) until the other end goes.
                while let Ok(n) = b.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&chunk[..n]);
                    b.write_all(&chunk[..n]).await.unwrap();
                }
            }
            got
        });
        (Upstream::new(a), task)
    }

    const FWD: Forwarded<'static> = Forwarded {
        client: std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7)),
        https: false,
        host: "a.example",
        upgrade: None,
        prefix: None,
    };

    fn get(path: &str) -> Outgoing {
        Outgoing::new(&Method::GET, path, &HeaderMap::new(), &FWD, body::full(""))
    }

    fn request(method: Method, headers: &[(&str, &str)], b: ProxyBody) -> Outgoing {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        let upgrade = h.get(header::UPGRADE).cloned();
        let fwd = Forwarded {
            upgrade: upgrade.as_ref(),
            ..FWD
        };
        Outgoing::new(&method, "/up", &h, &fwd, b)
    }

    /// A bodiless GET asking to upgrade to WebSocket.
    fn websocket_request() -> Outgoing {
        request(
            Method::GET,
            &[("connection", "upgrade"), ("upgrade", "websocket")],
            body::full(""),
        )
    }

    /// Sends `out` on `up`, reads the whole answer (pooling `up` into `pool` at its end).
    async fn exchange(pool: &Arc<Pool>, up: Upstream, out: Outgoing) -> (StatusCode, String) {
        let resp = up.send(out).await.unwrap();
        let status = resp.status();
        let b = resp
            .into_body()
            .home(pool.clone(), key())
            .collect()
            .await
            .unwrap()
            .to_bytes();
        (status, String::from_utf8(b.to_vec()).unwrap())
    }

    /// A request body of unknown length: `left` frames of `size` bytes, then the end, or
    /// (`stall`) nothing more ever.
    struct Frames {
        left: usize,
        size: usize,
        stall: bool,
    }
    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            match (self.left, self.stall) {
                (0, true) => Poll::Pending,
                (0, false) => Poll::Ready(None),
                _ => {
                    self.left -= 1;
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; self.size])))))
                }
            }
        }
    }

    #[tokio::test]
    async fn a_long_body_is_read_to_its_length_and_no_further() {
        let (a, mut b) = tokio::io::duplex(16 * 1024);
        let service = tokio::spawn(async move {
            let mut req = [0u8; 1024];
            let _ = b.read(&mut req).await.unwrap();
            b.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                .await
                .unwrap();
            for i in 0..10u8 {
                b.write_all(&[b'a' + i; 10_000]).await.unwrap();
            }
            // Bytes after the body that nobody asked for: the connection is not reused.
            b.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
            b
        });
        let pool = Pool::new();
        let (status, body) = exchange(&pool, Upstream::new(a), get("/big")).await;
        assert_eq!(status, StatusCode::OK);
        let want: String = (0..10u8)
            .map(|i| char::from(b'a' + i).to_string().repeat(10_000))
            .collect();
        assert!(body == want, "body of {} bytes differs", body.len());
        let _b = service.await.unwrap();
        assert!(pool.take(&key()).is_none(), "stray bytes: not handed out");
    }

    #[tokio::test]
    async fn a_chunked_body_split_anywhere_is_decoded_and_the_connection_reused() {
        for stray in [&b""[..], b"HTTP/1.1 200 OK\r\n"] {
            let (a, mut b) = tokio::io::duplex(16 * 1024);
            let service = tokio::spawn(async move {
                let mut req = [0u8; 1024];
                let _ = b.read(&mut req).await.unwrap();
                b.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .await
                    .unwrap();
                let mut body = Vec::new();
                for (i, len) in [5000usize, 1, 70_000].into_iter().enumerate() {
                    body.extend_from_slice(format!("{len:x};ext=1\r\n").as_bytes());
                    body.extend(std::iter::repeat_n(b'a' + i as u8, len));
                    body.extend_from_slice(b"\r\n");
                }
                body.extend_from_slice(b"0\r\nX-Trailer: 1\r\n\r\n");
                body.extend_from_slice(stray);
                // Pieces of 7 bytes: size lines, CRLFs and the end split across reads. (The
                // stray bytes may find the connection already dropped.)
                for piece in body.chunks(7) {
                    if b.write_all(piece).await.is_err() {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                b
            });
            let pool = Pool::new();
            let (status, body) = exchange(&pool, Upstream::new(a), get("/chunked")).await;
            assert_eq!(status, StatusCode::OK);
            let want = "a".repeat(5000) + "b" + &"c".repeat(70_000);
            assert!(body == want, "body of {} bytes differs", body.len());
            let _b = service.await.unwrap();
            assert_eq!(
                pool.take(&key()).is_some(),
                stray.is_empty(),
                "reused only without bytes after the body"
            );
        }
    }

    #[tokio::test]
    async fn a_finished_connection_is_reused() {
        let conns = Arc::new(AtomicUsize::new(0));
        let pool = Pool::new();
        let (s, b) = exchange(&pool, backend(&conns), get("/a")).await;
        assert_eq!((s, b.as_str()), (StatusCode::OK, "GET /a 0 chunked=false "));
        let up = pool.take(&key()).expect("pooled at the end of the body");
        let (_, b) = exchange(&pool, up, get("/b?q=1")).await;
        assert_eq!(b, "GET /b?q=1 0 chunked=false ");
        assert_eq!(conns.load(Ordering::Relaxed), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn request_bodies_go_up_with_their_length_or_chunked() {
        let conns = Arc::new(AtomicUsize::new(0));
        let pool = Pool::new();
        let known = request(
            Method::POST,
            &[("content-length", "5")],
            body::full("hello"),
        );
        let (_, b) = exchange(&pool, backend(&conns), known).await;
        assert_eq!(b, "POST /up 5 chunked=false hello");
        let unknown = request(
            Method::PUT,
            &[],
            Frames {
                left: 3,
                size: 4000,
                stall: false,
            }
            .boxed_unsync(),
        );
        let up = pool.take(&key()).unwrap();
        let (_, b) = exchange(&pool, up, unknown).await;
        assert_eq!(
            b,
            format!("PUT /up 12000 chunked=true {}", "x".repeat(12000))
        );
        let empty = request(Method::POST, &[], body::full(""));
        let up = pool.take(&key()).unwrap();
        let (_, b) = exchange(&pool, up, empty).await;
        assert_eq!(b, "POST /up 0 chunked=false ");
        assert_eq!(conns.load(Ordering::Relaxed), 1, "all on one connection");
    }

    #[tokio::test]
    async fn a_body_longer_than_its_length_fails_the_request() {
        let pool = Pool::new();
        let conns = Arc::new(AtomicUsize::new(0));
        /// Says it is 3 bytes long and yields 5. The servers hold a body to its length
        /// already; the upstream does too, in case one ever did not.
        struct Lying(bool);
        impl Body for Lying {
            type Data = Bytes;
            type Error = BoxError;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
                let first = std::mem::replace(&mut self.0, false);
                Poll::Ready(first.then(|| Ok(Frame::data(Bytes::from_static(b"hello")))))
            }
            fn size_hint(&self) -> SizeHint {
                SizeHint::with_exact(3)
            }
        }
        let lying = request(
            Method::POST,
            &[("content-length", "3")],
            Lying(true).boxed_unsync(),
        );
        let Err(e) = backend(&conns).send(lying).await else {
            panic!("sent")
        };
        assert!(matches!(e.error, UpstreamError::RequestBody(_)), "{e:?}");
        assert!(e.again.is_none());
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn answer_framings() {
        let pool = Pool::new();
        // Chunked, with an interim answer before it and a trailer: pooled at its end.
        let (up, _t) = scripted(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nX-T: 1\r\n\r\n",
            true,
        );
        assert_eq!(
            exchange(&pool, up, get("/")).await,
            (StatusCode::OK, "hello world".into())
        );
        assert_eq!(pool.idle_count(), 1);
        // Delimited by the close: read to the end, not pooled.
        let pool = Pool::new();
        let (up, _t) = scripted(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", false);
        assert_eq!(exchange(&pool, up, get("/")).await.1, "until the end");
        assert_eq!(pool.idle_count(), 0);
        // `Connection: close`: not pooled.
        let (up, _t) = scripted(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            true,
        );
        assert_eq!(exchange(&pool, up, get("/")).await.1, "ok");
        assert_eq!(pool.idle_count(), 0);
        // An answer to HEAD has no body, whatever its length says; never polled, still pooled.
        let (up, _t) = scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n", true);
        let resp = up
            .send(request(Method::HEAD, &[], body::full("")))
            .await
            .unwrap();
        assert_eq!(resp.headers()[header::CONTENT_LENGTH], "20");
        assert!(resp.body().is_end_stream());
        drop(resp.into_body().home(pool.clone(), key()));
        assert_eq!(pool.idle_count(), 1);
    }

    /// A few interim answers are skipped; a service sending them without end is an error,
    /// not a loop parsing them that never waits.
    #[tokio::test]
    async fn interim_answers_are_bounded() {
        let script = |n: usize| -> &'static [u8] {
            let mut s = b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n".repeat(n);
            s.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            s.leak()
        };
        let pool = Pool::new();
        let (up, _t) = scripted(script(usize::from(MAX_INTERIM)), true);
        assert_eq!(
            exchange(&pool, up, get("/")).await,
            (StatusCode::OK, "ok".into())
        );
        let (up, _t) = scripted(script(usize::from(MAX_INTERIM) + 1), false);
        let e = up.send(get("/")).await.unwrap_err();
        assert!(
            matches!(&e.error, UpstreamError::Malformed(H1Error::Head(m)) if m.contains("interim")),
            "{:?}",
            e.error
        );
    }

    #[tokio::test]
    async fn broken_answers_are_errors() {
        let (up, _t) = scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", false);
        let resp = up.send(get("/")).await.unwrap();
        let e = resp.into_body().collect().await.unwrap_err();
        assert!(matches!(e, UpstreamError::Truncated), "{e}");
        let (up, _t) = scripted(b"SSH-2.0-OpenSSH_9.2\r\n\r\n", false);
        let e = up.send(get("/")).await.unwrap_err();
        assert!(
            matches!(e.error, UpstreamError::Malformed(_)),
            "{:?}",
            e.error
        );
        assert!(e.again.is_none(), "an answer came: not sent again");
        let (up, _t) = scripted(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            false,
        );
        let resp = up.send(get("/")).await.unwrap();
        let e = resp.into_body().collect().await.unwrap_err();
        assert!(
            matches!(e, UpstreamError::Malformed(H1Error::Chunk(_))),
            "{e}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_that_neither_reads_the_upload_nor_answers_more_is_cut() {
        let (a, mut b) = tokio::io::duplex(4 * 1024);
        let _service = tokio::spawn(async move {
            let mut req = [0u8; 512];
            let _ = b.read(&mut req).await.unwrap();
            b.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
                .await
                .unwrap();
            // Reads nothing more of the upload, and writes nothing more.
            std::future::pending::<()>().await;
            drop(b);
        });
        let upload = Frames {
            left: 10_000,
            size: 1024,
            stall: false,
        };
        let put = request(Method::PUT, &[], upload.boxed_unsync());
        let resp = Upstream::new(a).send(put).await.unwrap();
        let mut body = resp
            .into_body()
            .read_timeout(std::time::Duration::from_secs(30));
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"hello");
        let next = tokio::time::timeout(std::time::Duration::from_secs(300), body.frame())
            .await
            .expect("held past the read timeout");
        assert!(
            matches!(next, Some(Err(UpstreamError::Stalled(_)))),
            "{next:?}"
        );
    }

    /// Reads that fail as quinn's do when the QUIC connection under them ends.
    struct LostReads;
    impl AsyncRead for LostReads {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "connection lost",
            )))
        }
    }
    /// A tunnel stream whose writes go nowhere and whose reads fail: its connection is lost.
    type LostTunnel = tokio::io::Join<LostReads, tokio::io::Sink>;
    impl UpIo for LostTunnel {}
    fn lost_tunnel() -> LostTunnel {
        tokio::io::join(LostReads, tokio::io::sink())
    }

    /// A tunnel lost before the answer is said to be one (it was "device sent no valid HTTP
    /// answer"), and a GET (safe) is given back to be sent again on a new stream.
    #[tokio::test]
    async fn a_tunnel_lost_before_the_answer_is_told_and_repeatable_requests_go_again() {
        let e = Upstream::new(lost_tunnel())
            .send(get("/x"))
            .await
            .unwrap_err();
        assert!(e.error.tunnel_lost(), "{:?}", e.error);
        assert!(e.again.is_some(), "a GET goes again");
        let text = crate::http::errors::ProxyError::Upstream {
            app: "web".into(),
            device: "home1".into(),
            error: e.error,
        }
        .body();
        assert!(
            text.contains("the tunnel to device home1 was lost"),
            "{text}"
        );
        let post = request(Method::POST, &[("content-length", "2")], body::full("hi"));
        let e = Upstream::new(lost_tunnel()).send(post).await.unwrap_err();
        assert!(e.error.tunnel_lost());
        assert!(e.again.is_none(), "a POST is not repeated");
        // Idempotent but not safe: the service may have done it before the loss.
        let delete = request(Method::DELETE, &[], body::full(""));
        let e = Upstream::new(lost_tunnel()).send(delete).await.unwrap_err();
        assert!(
            e.again.is_none(),
            "a DELETE is not repeated after a tunnel loss"
        );
    }

    #[tokio::test]
    async fn a_close_before_any_answer_gives_repeatable_requests_back() {
        let (up, _t) = scripted(b"", false);
        let e = up.send(get("/again")).await.unwrap_err();
        assert!(e.error.ended_unanswered(), "{:?}", e.error);
        let again = e.again.expect("a GET without a body goes again");
        let conns = Arc::new(AtomicUsize::new(0));
        let (_, b) = exchange(&Pool::new(), backend(&conns), again).await;
        assert_eq!(b, "GET /again 0 chunked=false ");
        let (up, _t) = scripted(b"", false);
        let post = request(Method::POST, &[("content-length", "2")], body::full("hi"));
        let e = up.send(post).await.unwrap_err();
        assert!(e.error.ended_unanswered());
        assert!(e.again.is_none(), "a POST is not repeated");
        // Idempotent, but its body went up with the first try: a second head would promise
        // a body that never follows.
        let (up, _t) = scripted(b"", false);
        let put = request(Method::PUT, &[("content-length", "2")], body::full("hi"));
        let e = up.send(put).await.unwrap_err();
        assert!(e.error.ended_unanswered());
        assert!(e.again.is_none(), "a PUT with a body is not repeated");
        let (up, _t) = scripted(b"", false);
        let e = up
            .send(request(Method::DELETE, &[], body::full("")))
            .await
            .unwrap_err();
        assert!(e.again.is_some(), "a bodiless DELETE goes again");
    }

    #[tokio::test]
    async fn an_early_answer_ends_the_connection() {
        let pool = Pool::new();
        let (up, _t) = scripted(
            b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\n\r\nno!",
            true,
        );
        let out = request(
            Method::POST,
            &[],
            Frames {
                left: 1,
                size: 4,
                stall: true,
            }
            .boxed_unsync(),
        );
        let (s, b) = exchange(&pool, up, out).await;
        assert_eq!((s, b.as_str()), (StatusCode::PAYLOAD_TOO_LARGE, "no!"));
        assert_eq!(pool.idle_count(), 0, "its request was never finished");
    }

    /// A request body that sends one frame once `go` fires, then ends.
    struct Gated {
        go: Option<tokio::sync::oneshot::Receiver<()>>,
    }
    impl Body for Gated {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            let Some(go) = self.go.as_mut() else {
                return Poll::Ready(None);
            };
            match std::future::Future::poll(Pin::new(go), cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(_) => {
                    self.go = None;
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                        b"GET /x HTTP/1.1\r\nX-Ignore: ",
                    )))))
                }
            }
        }
    }

    /// The service answers before the request body is over and keeps the connection open; the
    /// rest of the body then goes out in full while the answer is read. The connection still
    /// must not be pooled: the service may take those bytes for the start of its next request,
    /// and the next client's request would be glued to them.
    #[tokio::test]
    async fn an_early_answer_is_not_pooled_even_when_the_body_then_completes() {
        let pool = Pool::new();
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        let service = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = [0u8; 4096];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = b.read(&mut chunk).await.unwrap();
                got.extend_from_slice(&chunk[..n]);
            }
            b.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
                .await
                .unwrap();
            // The body's rest arrives after the answer's head; then the answer's body.
            while !got.ends_with(b"X-Ignore: \r\n0\r\n\r\n") {
                let n = b.read(&mut chunk).await.unwrap();
                assert!(n > 0, "request body never came");
                got.extend_from_slice(&chunk[..n]);
            }
            b.write_all(b"ok").await.unwrap();
            b
        });
        let (go, gate) = tokio::sync::oneshot::channel();
        let out = request(Method::POST, &[], Gated { go: Some(gate) }.boxed_unsync());
        let resp = Upstream::new(a).send(out).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        go.send(()).unwrap();
        let body = resp
            .into_body()
            .home(pool.clone(), key())
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&body[..], b"ok");
        assert_eq!(
            pool.idle_count(),
            0,
            "a connection answered early was pooled"
        );
        drop(service.await.unwrap());
    }

    /// A body on a DELETE (one that defines none) may be read by the service as its next
    /// request: that connection carries no other. Other bodies, and bodiless DELETEs, pool.
    #[tokio::test]
    async fn a_connection_that_carried_a_delete_body_is_not_pooled() {
        let conns = Arc::new(AtomicUsize::new(0));
        let pool = Pool::new();
        let (_, b) = exchange(
            &pool,
            backend(&conns),
            request(Method::DELETE, &[], body::full("GET /x HTTP/1.1\r\n\r\n")),
        )
        .await;
        assert_eq!(b, "DELETE /up 19 chunked=false GET /x HTTP/1.1\r\n\r\n");
        assert_eq!(
            pool.idle_count(),
            0,
            "a connection after a DELETE body was pooled"
        );
        // And told to the service, which then parses nothing after the request.
        let (up, task) = scripted(b"HTTP/1.1 204 No Content\r\n\r\n", false);
        let out = request(Method::DELETE, &[], body::full("GET /x HTTP/1.1\r\n\r\n"));
        drop(up.send(out).await.unwrap());
        let head = String::from_utf8(task.await.unwrap()).unwrap();
        assert!(head.contains("connection: close\r\n"), "{head}");
        exchange(
            &pool,
            backend(&conns),
            request(Method::DELETE, &[], body::full("")),
        )
        .await;
        assert_eq!(
            pool.idle_count(),
            1,
            "a bodiless DELETE's connection is as good as any"
        );
        let up = pool.take(&key()).unwrap();
        exchange(&pool, up, request(Method::PUT, &[], body::full("data"))).await;
        assert_eq!(pool.idle_count(), 1, "a PUT's connection is pooled");
        let up = pool.take(&key()).unwrap();
        let propfind = Method::from_bytes(b"PROPFIND").unwrap();
        exchange(&pool, up, request(propfind, &[], body::full("<x/>"))).await;
        assert_eq!(pool.idle_count(), 1, "a PROPFIND's connection is pooled");
        let up = pool.take(&key()).unwrap();
        let merge = Method::from_bytes(b"MERGE").unwrap();
        exchange(&pool, up, request(merge, &[], body::full("<x/>"))).await;
        assert_eq!(
            pool.idle_count(),
            1,
            "a MERGE's (Subversion) connection is pooled"
        );

        // OPTIONS and methods unknown here define no body either.
        for method in [Method::OPTIONS, Method::from_bytes(b"PURGE").unwrap()] {
            let up = pool.take(&key()).unwrap();
            exchange(
                &pool,
                up,
                request(method.clone(), &[], body::full("GET /x HTTP/1.1\r\n\r\n")),
            )
            .await;
            assert_eq!(pool.idle_count(), 0, "{method} with a body was pooled");
            exchange(
                &pool,
                backend(&conns),
                request(Method::GET, &[], body::full("")),
            )
            .await;
        }
        // Asking for an upgrade too does not leave the close out (the upgrade goes on only
        // after the body, which the service may take for a request).
        let (up, task) = scripted(b"HTTP/1.1 204 No Content\r\n\r\n", false);
        let out = request(
            Method::DELETE,
            &[("connection", "upgrade"), ("upgrade", "websocket")],
            body::full("GET /x HTTP/1.1\r\n\r\n"),
        );
        drop(up.send(out).await.unwrap());
        let head = String::from_utf8(task.await.unwrap()).unwrap();
        assert!(head.contains("connection: close\r\n"), "{head}");
    }

    /// The service answered and waits for the rest of the upload; the client's body then
    /// fails. The service must not be left waiting for bytes that never come (until the read
    /// timeout, holding the stream and the app's slot): the answer is cut and the connection
    /// ended.
    #[tokio::test]
    async fn a_client_body_failing_after_the_answer_began_ends_the_exchange() {
        struct FailsAfter(Option<tokio::sync::oneshot::Receiver<()>>);
        impl Body for FailsAfter {
            type Data = Bytes;
            type Error = BoxError;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
                let Some(go) = self.0.as_mut() else {
                    return Poll::Ready(None);
                };
                ready!(std::future::Future::poll(Pin::new(go), cx)).ok();
                self.0 = None;
                Poll::Ready(Some(Err("the client's body broke".into())))
            }
        }
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        let service = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = [0u8; 4096];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = b.read(&mut chunk).await.unwrap();
                got.extend_from_slice(&chunk[..n]);
            }
            b.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwait\r\n")
                .await
                .unwrap();
            // Reads the upload until the gateway ends the connection.
            while b.read(&mut chunk).await.unwrap() > 0 {}
        });
        let (go, gate) = tokio::sync::oneshot::channel();
        let out = request(Method::POST, &[], FailsAfter(Some(gate)).boxed_unsync());
        let resp = Upstream::new(a).send(out).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"wait");
        go.send(()).unwrap();
        let end = tokio::time::timeout(std::time::Duration::from_secs(10), body.frame())
            .await
            .expect("the answer waited on a service that waits for the upload");
        let err = end.unwrap().unwrap_err();
        assert!(matches!(err, UpstreamError::RequestBody(_)), "{err:?}");
        drop(body);
        tokio::time::timeout(std::time::Duration::from_secs(10), service)
            .await
            .expect("the service was left waiting for the rest of the upload")
            .unwrap();
    }

    /// A `101` before the whole upload was written: the upgraded bytes would start inside
    /// the body (the proxy refuses such a switch).
    #[tokio::test]
    async fn a_switch_before_the_upload_ended_is_told() {
        let (up, _task) = scripted(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            true,
        );
        let (_go, gate) = tokio::sync::oneshot::channel::<()>();
        let out = request(
            Method::GET,
            &[("upgrade", "websocket"), ("connection", "upgrade")],
            Gated { go: Some(gate) }.boxed_unsync(),
        );
        let resp = up.send(out).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert!(resp.body().upload_unfinished());
        let (up, _task) = scripted(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            true,
        );
        let resp = up.send(websocket_request()).await.unwrap();
        assert!(!resp.body().upload_unfinished());
    }

    #[tokio::test]
    async fn a_body_dropped_midway_drops_its_connection() {
        let pool = Pool::new();
        let (up, _t) = scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart", true);
        let resp = up.send(get("/")).await.unwrap();
        let mut body = resp.into_body().home(pool.clone(), key());
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"part");
        drop(body);
        assert_eq!(pool.idle_count(), 0, "half-read connection was pooled");
    }

    /// A service end whose abort is seen (a tunnel stream's resets it).
    struct AbortSeen {
        io: tokio::io::DuplexStream,
        aborted: Arc<std::sync::atomic::AtomicBool>,
        receiving_aborted: Arc<std::sync::atomic::AtomicBool>,
    }
    impl AsyncRead for AbortSeen {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            b: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, b)
        }
    }
    impl AsyncWrite for AbortSeen {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.io).poll_write(cx, b)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }
    impl UpIo for AbortSeen {
        fn abort(&mut self) {
            self.aborted.store(true, Ordering::Relaxed);
        }
        fn abort_receiving(&mut self) {
            self.receiving_aborted.store(true, Ordering::Relaxed);
        }
    }

    /// An upgraded connection cut (the client reset, a policy cut) resets the service's end:
    /// `abort` did nothing, and the tunnel stream dropped after it was finished, so the
    /// service took a cut upload for a whole one.
    #[tokio::test]
    async fn an_upgraded_connection_cut_resets_the_service_end() {
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        let aborted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let receiving_aborted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let up = Upstream::new(AbortSeen {
            io: a,
            aborted: aborted.clone(),
            receiving_aborted: receiving_aborted.clone(),
        });
        tokio::spawn(async move {
            let mut chunk = [0u8; 4096];
            let _ = b.read(&mut chunk).await;
            b.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")
                .await
                .unwrap();
            let _ = b.read(&mut chunk).await;
        });
        let resp = up.send(websocket_request()).await.unwrap();
        let mut io = resp.into_body().into_upgraded().unwrap();
        // What went up was finished whole: only the receiving side is torn down (a whole
        // abort reset the finished upload).
        tunnel::splice::End::abort_receiving(&mut io);
        assert!(receiving_aborted.load(Ordering::Relaxed));
        assert!(
            !aborted.load(Ordering::Relaxed),
            "a finished upload was reset"
        );
        tunnel::splice::End::abort(&mut io);
        assert!(
            aborted.load(Ordering::Relaxed),
            "the service's end was not reset"
        );
        // The client's side has nothing to reset through: it closes as it is dropped.
        let (c, _) = tokio::io::duplex(64);
        let mut client = Upgraded::new(Bytes::new(), Box::new(c));
        tunnel::splice::End::abort(&mut client);
    }

    #[tokio::test]
    async fn an_upgrade_hands_over_the_stream_with_what_came_after_the_head() {
        let (up, task) = scripted(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nfirst",
            true,
        );
        let resp = up.send(websocket_request()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        let mut io = resp.into_body().into_upgraded().unwrap();
        let mut got = [0u8; 5];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"first");
        io.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        io.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"ping");
        drop(io);
        let seen = String::from_utf8(task.await.unwrap()).unwrap();
        assert!(
            seen.starts_with(
                "GET /up HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\nhost: a.example\r\n"
            ),
            "{seen:?}"
        );
        assert!(seen.ends_with("ping"));
    }
}
