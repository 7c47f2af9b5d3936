//! Serves the HTTP/1.x of one client connection: request heads read under a deadline, each
//! request handed to a service with a body read straight off the connection, the response
//! written back (head and a small body in one write), keep-alive and pipelining,
//! `Expect: 100-continue`, upgrades handed over with the bytes already read, and a plain
//! connection that opens with HTTP/2's preface handed back for HTTP/2. The wire format is
//! [`super::server_h1`]'s.
//!
//! One task per connection polls everything: the service's future, the request body inside
//! it (which reads the connection through a shared, uncontended lock) and the response. While
//! a request waits for its answer, the connection is watched for the client leaving, and what
//! it sends meanwhile (pipelined requests) is read ahead, at most [`READ_AHEAD`] bytes, through
//! a small stack buffer: the read buffer is reused in place between requests instead of
//! reallocated.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::io::poll_read_buf;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::body::{BodyStalled, BoxError, ProxyBody};
use super::deadline::{poll_deadline, Stall};
use super::h1::{self, ChunkedDecoder};
use super::headers;
use super::outbox::{self, Outbox};
use super::server_h1::{self, BodyLen, ConnHeader, RequestError, RespBody, DATE_LEN};
use super::upstream::{poll_write_all, Io, Upgraded};

/// Read buffer reserved before each read: a request head and a small body come in one.
const READ_CHUNK: usize = 8 * 1024;
/// Bytes read ahead while a request waits for its answer: enough for pipelined requests'
/// heads, little for a connection to hold in memory (the rest waits in the socket).
const READ_AHEAD: usize = 4 * 1024;
/// Read buffer reserved before each read of a long request body.
const BODY_READ: usize = 64 * 1024;
/// Response bytes copied together before they are written (a body's frames are written as
/// soon as the body has no more ready, so gathering never delays bytes).
const WRITE_AT: usize = 16 * 1024;
/// Bytes gathered, copied or held, for one write: a download goes out in writes of ~64 KiB,
/// and a response held up by a slow client keeps at most about this much here.
const GATHER_MAX: usize = 64 * 1024;
/// Chunks held for one write (each may need two slices: see [`outbox::MAX_SLICES`]).
const MAX_HELD: usize = outbox::MAX_SLICES / 2 - 1;
/// After answering a request whose body was not read to its end, the connection is closed;
/// what the client still sends is read and dropped for this long first, so its kernel does
/// not answer our close with a reset that could destroy the answer before it is read.
const LINGER: Duration = Duration::from_secs(2);
/// Time a close (TLS `close_notify`, FIN) may take.
const CLOSE_TIME: Duration = Duration::from_secs(1);

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// How a connection is served.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Time a client has to send a request's head, counted from when the connection is
    /// ready for it (so also the idle keep-alive timeout).
    pub header_read_timeout: Duration,
    /// Time a client may leave a response unread (its connection accepts no byte) before
    /// the connection is closed: a client that stops reading must not hold a connection
    /// slot and a tunnel stream for ever (nginx's `send_timeout`, also 60 s by default).
    pub send_timeout: Duration,
    /// Time a client may leave its request body stalled (no byte arrives while the service
    /// is ready for more) before the body fails: the request is answered 408 and the
    /// connection closed (nginx's `client_body_timeout`, also 60 s by default).
    pub body_timeout: Duration,
    /// A plain connection: one starting with HTTP/2's preface is handed back.
    pub sniff_h2: bool,
}

/// The client's side of an upgrade, for the service: the protocol it asked for, and its
/// connection once the `101` answer went out.
pub struct ClientUpgrade {
    pub protocol: HeaderValue,
    pub conn: oneshot::Receiver<Upgraded>,
}

/// How a connection's HTTP/1 ended.
pub enum Served {
    Done,
    /// It opened with HTTP/2's preface: serve it as HTTP/2 (the bytes read come first).
    H2(Upgraded),
    /// An answer delimited by the connection's close (an HTTP/1.0 client's, its length
    /// untold) failed part way: the caller ends the connection with a reset, the only way
    /// its client can tell; a close would read as the answer's end. Not shut down here.
    CutShort(Box<dyn Io>),
}

/// The connection and what was read from it, shared by the connection's loop and the body
/// of the request being served.
struct Wire {
    /// None once handed over (upgrade, HTTP/2).
    io: Option<Box<dyn Io>>,
    buf: BytesMut,
    /// When the request head being read is worth parsing again.
    scan: h1::HeadScan,
    body: BodyState,
    /// The client closed its sending side after pipelined requests: read no more while
    /// answering them.
    read_closed: bool,
}

type Shared = Arc<Mutex<Wire>>;

fn lock(w: &Shared) -> MutexGuard<'_, Wire> {
    // Nothing panics while holding it; if it ever did, the data is still consistent bytes.
    w.lock().unwrap_or_else(|p| p.into_inner())
}

/// The body of the request being served.
struct BodyState {
    /// The request it belongs to: a body kept past its request reads nothing of the next.
    request: u64,
    left: Left,
    /// `100 Continue` is due (Some(bytes of it written)) before the body is read.
    continue_due: Option<usize>,
    failed: bool,
}

enum Left {
    Done,
    Length(u64),
    Chunked(ChunkedDecoder),
}

/// What waiting for the next request gave.
enum Next {
    Head(server_h1::RequestHead),
    /// The client closed between requests.
    Closed,
    H2,
    Shutdown,
    TimedOut,
    Bad(RequestError),
    Failed(String),
}

/// A connection that got no request served, as [`serve`] tells its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unserved {
    /// A request refused unread (its head malformed or too large), answered with this status.
    Refused(StatusCode),
    /// No complete request head within the head timeout: one begun, or none on a new
    /// connection.
    NoHead,
}

/// Serves HTTP/1.x on `io` until the client closes, a request says so, `shutdown` (after the
/// request in progress) or an error. `service` answers each request; it never fails.
/// `refused` hears of a request refused unread (its head malformed or too large: it never
/// reaches `service`), with the status it was answered, as soon as the answer is written, or
/// of a connection that sent no whole head before the head timeout ([`Unserved`]).
pub async fn serve<F, Fut>(
    io: Box<dyn Io>,
    cfg: Config,
    shutdown: CancellationToken,
    mut service: F,
    refused: impl FnOnce(Unserved) + Send,
) -> Served
where
    F: FnMut(Request<ProxyBody>, Option<ClientUpgrade>) -> Fut + Send,
    Fut: Future<Output = Response<ProxyBody>> + Send,
{
    let wire: Shared = Arc::new(Mutex::new(Wire {
        io: Some(io),
        buf: BytesMut::new(),
        scan: h1::HeadScan::default(),
        read_closed: false,
        body: BodyState {
            request: 0,
            left: Left::Done,
            continue_due: None,
            failed: false,
        },
    }));
    let mut cancelled = pin!(shutdown.cancelled());
    // One timer for all the connection's deadlines (see `poll_deadline`).
    let t = cfg.header_read_timeout;
    let mut timer = pin!(tokio::time::sleep(t));
    let mut sniff = cfg.sniff_h2;
    let mut out = Outbox::default();
    let mut request = 0u64;
    let mut linger = false;
    loop {
        let since = Instant::now();
        let next = poll_fn(|cx| {
            if let Poll::Ready(n) = lock(&wire).poll_head(cx, &mut sniff) {
                return Poll::Ready(n);
            }
            if cancelled.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Next::Shutdown);
            }
            poll_deadline(timer.as_mut(), cx, since + t).map(|()| Next::TimedOut)
        })
        .await;
        let head = match next {
            Next::Head(h) => h,
            Next::Closed | Next::Shutdown => break,
            Next::H2 => {
                let mut w = lock(&wire);
                // Copied, as for an upgrade below: the HTTP/2 connection lasts.
                let pending = Bytes::copy_from_slice(&w.buf.split());
                return match w.io.take() {
                    Some(io) => Served::H2(Upgraded::new(pending, io)),
                    None => Served::Done,
                };
            }
            Next::TimedOut => {
                debug!("no complete request head within {t:?}; closing");
                // A head begun and not finished (a slow-headers attack looks so, also on a
                // kept-alive connection), or none at all on a new connection. Nothing after
                // a request is keep-alive's end.
                // Empty lines between requests (RFC 9112 §2.2) begin nothing.
                let begun = lock(&wire).buf.iter().any(|b| !matches!(b, b'\r' | b'\n'));
                if request == 0 || begun {
                    refused(Unserved::NoHead);
                }
                break;
            }
            Next::Failed(e) => {
                debug!(error = %e, "connection ended before a complete request head");
                break;
            }
            Next::Bad(e) => {
                info!(status = e.status().as_u16(), error = %e, "http request refused unread");
                // What the client sent after its bad head is not read: linger.
                let refusal = server_h1::refusal(&e, &http_date());
                linger = write_all(&wire, &refusal, cfg.send_timeout).await.is_ok();
                refused(Unserved::Refused(e.status()));
                break;
            }
        };
        request += 1;
        let version = head.version;
        let keep_alive = head.keep_alive;
        let head_request = head.method == Method::HEAD;
        let upgrade = (version == Version::HTTP_11)
            .then(|| headers::upgrade_requested(&head.headers))
            .flatten();
        let body: ProxyBody = {
            let mut w = lock(&wire);
            w.body = BodyState {
                request,
                left: match head.body {
                    BodyLen::Empty => Left::Done,
                    BodyLen::Length(n) => Left::Length(n),
                    BodyLen::Chunked => Left::Chunked(ChunkedDecoder::new()),
                },
                continue_due: head.expect_continue.then_some(0),
                failed: false,
            };
            match head.body {
                BodyLen::Empty => empty_body(),
                BodyLen::Length(n) => {
                    ReqBody::boxed(wire.clone(), request, Some(n), cfg.body_timeout)
                }
                BodyLen::Chunked => ReqBody::boxed(wire.clone(), request, None, cfg.body_timeout),
            }
        };
        let (up_tx, client_upgrade) = match upgrade {
            Some(protocol) => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(ClientUpgrade { protocol, conn: rx }))
            }
            None => (None, None),
        };
        let resp = {
            let mut answer = pin!(service(head.into_request(body), client_upgrade));
            let gone = poll_fn(|cx| {
                if let Poll::Ready(r) = answer.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                lock(&wire).poll_gone(cx, !keep_alive).map(|()| None)
            })
            .await;
            match gone {
                Some(r) => r,
                None => {
                    // The service's future, dropped above, gave the request up: its tunnel
                    // stream is reset and its log line says the client left (499).
                    debug!("the client left before the answer; request given up");
                    break;
                }
            }
        };

        let (parts, mut body) = resp.into_parts();
        let status = parts.status;
        let switching = status == StatusCode::SWITCHING_PROTOCOLS && up_tx.is_some();
        let framing = if switching
            || head_request
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            RespBody::None
        } else {
            match body.size_hint().exact() {
                Some(n) => RespBody::Length(n),
                None if version == Version::HTTP_11 => RespBody::Chunked,
                None => RespBody::UntilClose,
            }
        };
        out.clear();
        let body_unread = {
            let mut w = lock(&wire);
            // A final answer makes a `100 Continue` moot, unless it is half written.
            match w.body.continue_due {
                Some(0) => w.body.continue_due = None,
                Some(k) => {
                    out.copy(&CONTINUE[k..]);
                    w.body.continue_due = None;
                }
                None => {}
            }
            !matches!(w.body.left, Left::Done) || w.body.failed
        };
        // An interim answer nobody asked to switch on (a service's stray `101`) ends the
        // exchange: the client cannot know what follows it. A request body not read whole
        // by now (an answer before the upload ended: a refusal, a 413) most likely ends it
        // too, and the client is told so (RFC 9112 §9.6) rather than finding out by the close.
        let close = !switching
            && (!keep_alive
                || body_unread
                || framing == RespBody::UntilClose
                || status.is_informational()
                || shutdown.is_cancelled());
        let conn_header = match (close, version) {
            (true, _) => ConnHeader::Close,
            (false, Version::HTTP_10) if !switching => ConnHeader::KeepAlive,
            _ => ConnHeader::Default,
        };
        server_h1::encode_response_head(
            status,
            &parts.headers,
            framing,
            conn_header,
            &http_date(),
            out.buf_mut(),
        );
        drop(parts);
        let send = (timer.as_mut(), cfg.send_timeout);
        let written = write_response(&wire, &mut out, &mut body, framing, send).await;
        match &written {
            Ok(()) => drop(body),
            Err(e) => super::proxy::drop_undelivered(body, e),
        }
        if let Err(e) = written {
            debug!(error = %e, "response cut short; closing");
            if framing == RespBody::UntilClose && matches!(e, WriteError::Body(_)) {
                return match lock(&wire).io.take() {
                    Some(io) => Served::CutShort(io),
                    None => Served::Done,
                };
            }
            break;
        }
        if switching {
            let mut w = lock(&wire);
            // Copied: a slice would keep the connection's whole read buffer (grown to 128 KiB
            // by a padded head) for as long as the upgraded connection lasts.
            let pending = Bytes::copy_from_slice(&w.buf.split());
            if let (Some(io), Some(tx)) = (w.io.take(), up_tx) {
                let _ = tx.send(Upgraded::new(pending, io));
            }
            return Served::Done;
        }
        let body_done = {
            let w = lock(&wire);
            matches!(w.body.left, Left::Done) && !w.body.failed
        };
        if !body_done {
            // The rest of the body lies between here and the next request.
            linger = true;
            break;
        }
        if close {
            // Bytes the client sent after this request (pipelined, or arriving late) must not
            // turn the close into a reset, which can destroy the answer before the client
            // reads it (RFC 9112 §9.6): read and drop them until the client closes.
            linger = true;
            break;
        }
    }
    let io = lock(&wire).io.take();
    if let Some(io) = io {
        close_conn(io, linger).await;
    }
    Served::Done
}

impl Wire {
    /// While a request waits for its answer: reads ahead what the client sends next (a
    /// pipelined request, up to [`READ_AHEAD`]), and is ready when the client has left — its
    /// connection reset, or closed with nothing more sent. The request is then given up, as
    /// nginx does (499), instead of going on at the device (a long poll, a slow report) until
    /// its answer meets a closed connection. A close is a client done sending, waiting for its
    /// answers, after pipelined requests or after a request that said it is the `last`
    /// (`Connection: close`, HTTP/1.0: `printf ... | nc -N` sends its request and closes its
    /// side): those are served.
    fn poll_gone(&mut self, cx: &mut Context<'_>, last: bool) -> Poll<()> {
        // A body still being read is the service's to read (and to see end early).
        if self.read_closed
            || !matches!(self.body.left, Left::Done)
            || self.body.failed
            || self.body.continue_due.is_some()
        {
            return Poll::Pending;
        }
        let Some(io) = self.io.as_mut() else {
            return Poll::Pending;
        };
        // Read through a small stack buffer, not into `buf`: reserving there while the
        // request's head still shares its allocation took a new one per request (~0.3 µs of
        // the gateway's ~10 per request, benches/ab.sh front); bytes arrive here rarely.
        let mut ahead = [0u8; 512];
        while self.buf.len() < READ_AHEAD {
            let mut got = tokio::io::ReadBuf::new(&mut ahead);
            match ready!(Pin::new(&mut **io).poll_read(cx, &mut got)) {
                Ok(()) if !got.filled().is_empty() => self.buf.extend_from_slice(got.filled()),
                Ok(()) if self.buf.is_empty() && !last => return Poll::Ready(()),
                Ok(()) => {
                    self.read_closed = true;
                    break;
                }
                Err(_) => return Poll::Ready(()),
            }
        }
        Poll::Pending
    }

    /// Reads until a request head is complete. Parse errors are answered by the caller.
    fn poll_head(&mut self, cx: &mut Context<'_>, sniff: &mut bool) -> Poll<Next> {
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Next::Closed);
        };
        loop {
            if !self.buf.is_empty() {
                if *sniff {
                    match server_h1::sniff_h2(&self.buf) {
                        Some(true) => return Poll::Ready(Next::H2),
                        Some(false) => *sniff = false,
                        None => {}
                    }
                }
                if !*sniff && self.scan.due(&self.buf) {
                    match server_h1::parse_request(&mut self.buf) {
                        Ok(Some(h)) => {
                            self.scan.reset();
                            return Poll::Ready(Next::Head(h));
                        }
                        Ok(None) => {}
                        Err(e) => {
                            self.scan.reset();
                            return Poll::Ready(Next::Bad(e));
                        }
                    }
                }
            }
            // Reclaims the buffer in place when the previous request's bytes are gone.
            self.buf.reserve(READ_CHUNK);
            match ready!(poll_read_buf(Pin::new(&mut **io), cx, &mut self.buf)) {
                Ok(0) if self.buf.is_empty() => return Poll::Ready(Next::Closed),
                Ok(0) => {
                    return Poll::Ready(Next::Failed(format!(
                        "client closed with {} bytes of an incomplete head",
                        self.buf.len()
                    )))
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Next::Failed(e.to_string())),
            }
        }
    }

    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        if self.body.failed {
            return Poll::Ready(Some(Err("the request body failed earlier".into())));
        }
        let r = self.poll_body_inner(cx);
        if let Poll::Ready(Some(Err(_))) = &r {
            self.body.failed = true;
        }
        r
    }

    fn poll_body_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Some(Err("the connection was handed over".into())));
        };
        if let Some(written) = self.body.continue_due.as_mut() {
            ready!(poll_write_all(&mut **io, cx, CONTINUE, written))?;
            self.body.continue_due = None;
        }
        loop {
            match &mut self.body.left {
                Left::Done => return Poll::Ready(None),
                Left::Length(left) if !self.buf.is_empty() => {
                    let n = self
                        .buf
                        .len()
                        .min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= n as u64;
                    if *left == 0 {
                        self.body.left = Left::Done;
                    }
                    return Poll::Ready(Some(Ok(self.buf.split_to(n).freeze())));
                }
                Left::Chunked(d) if !self.buf.is_empty() => {
                    let step = d.decode(&self.buf)?;
                    let done = d.is_done();
                    let taken = self.buf.split_to(step.consumed);
                    if done {
                        self.body.left = Left::Done;
                    }
                    match step.data {
                        Some(r) if !r.is_empty() => {
                            return Poll::Ready(Some(Ok(taken.freeze().slice(r))))
                        }
                        _ if done => return Poll::Ready(None),
                        _ => continue,
                    }
                }
                _ => {}
            }
            // An upload comes in large reads, as a tcp app's bytes do (8 KiB reads took ~35 %
            // more of the gateway's CPU per GB).
            let room = match &self.body.left {
                Left::Length(left) => usize::try_from(*left).unwrap_or(usize::MAX),
                _ => BODY_READ,
            };
            self.buf.reserve(room.clamp(READ_CHUNK, BODY_READ));
            match ready!(poll_read_buf(Pin::new(&mut **io), cx, &mut self.buf)) {
                Ok(0) => {
                    return Poll::Ready(Some(Err(
                        "the client closed its connection before its body ended".into(),
                    )))
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
        }
    }
}

/// A request body read off the client's connection as the service asks for it.
struct ReqBody {
    wire: Shared,
    request: u64,
    /// Bytes still due by `Content-Length` (None: chunked).
    left: Option<u64>,
    stall: Stall,
}

impl ReqBody {
    fn boxed(wire: Shared, request: u64, left: Option<u64>, timeout: Duration) -> ProxyBody {
        ReqBody {
            wire,
            request,
            left,
            stall: Stall::new(timeout),
        }
        .boxed_unsync()
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut w = lock(&this.wire);
        if w.body.request != this.request {
            return Poll::Ready(Some(Err("the request is over".into())));
        }
        let Poll::Ready(r) = w.poll_body(cx) else {
            if this.stall.expired(cx) {
                w.body.failed = true;
                return Poll::Ready(Some(Err(Box::new(BodyStalled(this.stall.timeout())))));
            }
            return Poll::Pending;
        };
        this.stall.progress();
        if let (Some(Ok(d)), Some(left)) = (&r, this.left.as_mut()) {
            *left = left.saturating_sub(d.len() as u64);
        }
        Poll::Ready(r.map(|r| r.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.left == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

fn empty_body() -> ProxyBody {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Why a response did not go out whole.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("client connection: {0}")]
    Io(#[from] io::Error),
    #[error("response body failed: {0}")]
    Body(BoxError),
    #[error("response body {0} its length")]
    Length(&'static str),
    #[error("the connection was handed over")]
    Gone,
    #[error("the client read nothing for {0:?}")]
    Stalled(Duration),
}

/// Writes the head in `out`, then the body as `framing` says. Body bytes are gathered with
/// the head while the body has frames ready (one write for a small answer) and written as
/// soon as it has none; large chunks are held, not copied ([`Outbox`]). Fails when the client
/// accepts no byte for `send.1`.
async fn write_response(
    wire: &Shared,
    out: &mut Outbox,
    body: &mut ProxyBody,
    framing: RespBody,
    send: (Pin<&mut tokio::time::Sleep>, Duration),
) -> Result<(), WriteError> {
    let (mut timer, send_timeout) = send;
    // Asked once a chunk long enough to hold comes: most answers are small.
    let mut vectored = None;
    let mut ended = false;
    let mut sent = 0u64;
    let mut blocked_since: Option<Instant> = None;
    // Bytes written since `blocked_since`.
    let mut moved = 0u64;
    poll_fn(|cx| loop {
        if !ended && out.copied() < WRITE_AT && out.len() < GATHER_MAX && out.held() < MAX_HELD {
            match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers are not forwarded (nor by nginx).
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    sent += data.len() as u64;
                    let vectored = data.len() >= outbox::HOLD_MIN
                        && *vectored.get_or_insert_with(|| {
                            lock(wire)
                                .io
                                .as_ref()
                                .is_some_and(|io| io.is_write_vectored())
                        });
                    match framing {
                        RespBody::None => {}
                        RespBody::Length(n) if sent > n => {
                            return Poll::Ready(Err(WriteError::Length("longer than")))
                        }
                        RespBody::Length(_) | RespBody::UntilClose => out.push(data, vectored),
                        RespBody::Chunked => {
                            h1::push_chunk_size_line(out.buf_mut(), data.len());
                            out.push(data, vectored);
                            out.copy(b"\r\n");
                        }
                    }
                    continue;
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(WriteError::Body(e))),
                Poll::Ready(None) => {
                    ended = true;
                    match framing {
                        RespBody::Chunked => out.copy(h1::LAST_CHUNK),
                        RespBody::Length(n) if sent != n => {
                            return Poll::Ready(Err(WriteError::Length("shorter than")))
                        }
                        _ => {}
                    }
                }
                Poll::Pending if out.is_empty() => {
                    // TLS may hold bytes a write took (records waiting for the socket, which
                    // wakes this task but is written to only by a write or a flush): flushed
                    // while the body has nothing new, or an event stream's last events waited
                    // for its next ones. A flush still under way sets no deadline of its own
                    // (it cannot tell how much it moved): the next write, or the answer's end,
                    // is under the send timeout as before.
                    let mut w = lock(wire);
                    let Some(io) = w.io.as_mut() else {
                        return Poll::Ready(Err(WriteError::Gone));
                    };
                    return match Pin::new(&mut **io).poll_flush(cx) {
                        Poll::Ready(Err(e)) => Poll::Ready(Err(e.into())),
                        Poll::Ready(Ok(())) => {
                            // All of it went: the client is taking the answer.
                            blocked_since = None;
                            moved = 0;
                            Poll::Pending
                        }
                        Poll::Pending => Poll::Pending,
                    };
                }
                Poll::Pending => {}
            }
        }
        let mut w = lock(wire);
        let Some(io) = w.io.as_mut() else {
            return Poll::Ready(Err(WriteError::Gone));
        };
        if !out.is_empty() {
            let written = if out.held() > 0 {
                let mut slices = [io::IoSlice::new(&[]); outbox::MAX_SLICES];
                let k = out.slices(&mut slices);
                Pin::new(&mut **io).poll_write_vectored(cx, &slices[..k])
            } else {
                Pin::new(&mut **io).poll_write(cx, out.first())
            };
            let Poll::Ready(n) = written else {
                let since = *blocked_since.get_or_insert_with(Instant::now);
                return poll_deadline(timer.as_mut(), cx, since + send_timeout)
                    .map(|()| Err(WriteError::Stalled(send_timeout)));
            };
            let n = n?;
            if n == 0 {
                return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
            }
            out.advance(n);
            // The send timeout starts over once the client took MIN_PROGRESS bytes, or all
            // there was: a reader taking a byte a minute does not hold the answer for ever.
            moved += n as u64;
            if moved >= super::deadline::MIN_PROGRESS || out.is_empty() {
                blocked_since = None;
                moved = 0;
            }
        } else if ended {
            // TLS takes the last bytes into its own buffer (`out` is empty) and writes them
            // out on flush: a client that stopped reading then is under the send timeout too.
            let Poll::Ready(flushed) = Pin::new(&mut **io).poll_flush(cx) else {
                let since = *blocked_since.get_or_insert_with(Instant::now);
                return poll_deadline(timer.as_mut(), cx, since + send_timeout)
                    .map(|()| Err(WriteError::Stalled(send_timeout)));
            };
            return Poll::Ready(flushed.map_err(Into::into));
        }
    })
    .await
}

/// Writes `bytes` within `limit`, like every other write to a client: a client that filled
/// its receive window and the socket's send buffer with an unread answer, then sent a bad head,
/// held its connection (and slot) for ever waiting for the refusal to go out.
async fn write_all(wire: &Shared, bytes: &[u8], limit: Duration) -> Result<(), WriteError> {
    let mut at = 0;
    let write = poll_fn(|cx| {
        let mut w = lock(wire);
        let Some(io) = w.io.as_mut() else {
            return Poll::Ready(Err(WriteError::Gone));
        };
        poll_write_all(&mut **io, cx, bytes, &mut at).map_err(WriteError::Io)
    });
    tokio::time::timeout(limit, write)
        .await
        .unwrap_or(Err(WriteError::Stalled(limit)))
}

/// Closes the connection: our side first (FIN, or TLS `close_notify`), then, with `linger`,
/// what the client still sends is read and dropped for a while (see [`LINGER`]).
async fn close_conn(mut io: Box<dyn Io>, linger: bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(CLOSE_TIME, io.shutdown()).await;
    if linger {
        let _ = tokio::time::timeout(LINGER, async {
            let mut sink = [0u8; 4096];
            while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}

/// The `Date` value for this second (RFC 9110 §6.6.1), formatted once per second per thread.
fn http_date() -> [u8; DATE_LEN] {
    use std::cell::Cell;
    thread_local! {
        static CACHE: Cell<(u64, [u8; DATE_LEN])> = const { Cell::new((u64::MAX, [0; DATE_LEN])) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let (at, date) = c.get();
        if at == secs {
            return date;
        }
        let mut fresh = [b' '; DATE_LEN];
        let text = httpdate::fmt_http_date(now);
        let n = text.len().min(DATE_LEN);
        fresh[..n].copy_from_slice(&text.as_bytes()[..n]);
        c.set((secs, fresh));
        fresh
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::body;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    const CFG: Config = Config {
        header_read_timeout: Duration::from_secs(10),
        send_timeout: Duration::from_secs(60),
        body_timeout: Duration::from_secs(60),
        sniff_h2: true,
    };

    /// A service answering `<method> <path> <body bytes>`; a body of unknown length for
    /// `/stream`; a 101 that echoes the upgraded connection for `/ws`.
    async fn echo(req: Request<ProxyBody>, up: Option<ClientUpgrade>) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        if let Some(up) = up {
            tokio::spawn(async move {
                if let Ok(mut c) = up.conn.await {
                    let mut b = [0u8; 64];
                    while let Ok(n @ 1..) = c.read(&mut b).await {
                        let _ = c.write_all(&b[..n]).await;
                    }
                }
            });
            let mut r = Response::new(body::full(""));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut()
                .insert("connection", HeaderValue::from_static("upgrade"));
            r.headers_mut().insert("upgrade", up_protocol());
            return r;
        }
        let got = body.collect().await.map(|b| b.to_bytes().len());
        let text = format!("{} {} {:?}", parts.method, parts.uri.path(), got.ok());
        match parts.uri.path() {
            "/never" => std::future::pending().await,
            "/later" => tokio::time::sleep(Duration::from_millis(200)).await,
            _ => {}
        }
        match parts.uri.path() {
            // One frame, of a length the body does not tell.
            "/stream" => Response::new(Pieces([Bytes::from(text)].into(), false).boxed_unsync()),
            "/pieces" => Response::new(Pieces(pieces().0, true).boxed_unsync()),
            "/pieces-chunked" => Response::new(Pieces(pieces().0, false).boxed_unsync()),
            "/burst-then-quiet" => {
                Response::new(ThenQuiet(Some(Bytes::from(vec![b'z'; BURST]))).boxed_unsync())
            }
            _ => Response::new(body::full(text)),
        }
    }

    /// A long body: frames of 5,000 bytes (held, not copied, where the connection takes
    /// vectored writes) between small ones, more of them and more bytes than one write takes;
    /// and all its bytes in order.
    fn pieces() -> (std::collections::VecDeque<Bytes>, Vec<u8>) {
        let mut frames = std::collections::VecDeque::new();
        let mut all = Vec::new();
        for i in 0..90u8 {
            let len = if i % 3 == 0 { 10 } else { 5000 };
            let b = Bytes::from(vec![b'a' + i % 26; len]);
            all.extend_from_slice(&b);
            frames.push_back(b);
        }
        (frames, all)
    }

    /// Frames, with their total length told (`true`) or not.
    struct Pieces(std::collections::VecDeque<Bytes>, bool);
    impl Body for Pieces {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
        fn size_hint(&self) -> SizeHint {
            match self.1 {
                true => SizeHint::with_exact(self.0.iter().map(|b| b.len() as u64).sum()),
                false => SizeHint::default(),
            }
        }
    }

    /// What `/burst-then-quiet` sends (of a length untold) before it goes quiet.
    const BURST: usize = 50_000;

    /// One frame, then nothing more for ever (an event stream between events).
    struct ThenQuiet(Option<Bytes>);
    impl Body for ThenQuiet {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            match self.0.take() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Poll::Pending,
            }
        }
    }

    /// A connection that, as TLS does, takes what a write gives into its own buffer (up to
    /// 64 KiB) and says it took it even when the socket under it is full: those bytes go out
    /// at a later write or flush only.
    struct TakesAhead {
        inner: DuplexStream,
        held: Vec<u8>,
    }

    impl TakesAhead {
        const MAX: usize = 64 * 1024;

        fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            while !self.held.is_empty() {
                let n = ready!(tokio::io::AsyncWrite::poll_write(
                    Pin::new(&mut self.inner),
                    cx,
                    &self.held
                ))?;
                self.held.drain(..n);
            }
            Poll::Ready(Ok(()))
        }
    }

    impl tokio::io::AsyncRead for TakesAhead {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            tokio::io::AsyncRead::poll_read(Pin::new(&mut self.inner), cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for TakesAhead {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            if buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            loop {
                let n = buf.len().min(Self::MAX - this.held.len());
                this.held.extend_from_slice(&buf[..n]);
                match (n, this.poll_out(cx)?) {
                    (0, Poll::Pending) => return Poll::Pending,
                    (0, Poll::Ready(())) => continue,
                    (n, _) => return Poll::Ready(Ok(n)),
                }
            }
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            ready!(this.poll_out(cx))?;
            tokio::io::AsyncWrite::poll_flush(Pin::new(&mut this.inner), cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            ready!(this.poll_out(cx))?;
            tokio::io::AsyncWrite::poll_shutdown(Pin::new(&mut this.inner), cx)
        }
    }

    /// An answer's bytes a TLS-like connection took while the client read nothing reach the
    /// client once it reads, while the answer has nothing more to send (they waited for the
    /// answer's next bytes, for ever here).
    #[tokio::test]
    async fn bytes_taken_ahead_go_out_while_the_answer_is_quiet() {
        let (mut c, server) = tokio::io::duplex(8 * 1024);
        let io = TakesAhead {
            inner: server,
            held: Vec::new(),
        };
        let _h = tokio::spawn(serve(
            Box::new(io),
            CFG,
            CancellationToken::new(),
            echo,
            |_| {},
        ));
        c.write_all(b"GET /burst-then-quiet HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // The pipe fills, the rest waits in the connection's buffer (had the client read
        // earlier, the test would pass without flushing: it cannot fail wrongly).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut zs = 0;
        let mut b = [0u8; 4096];
        tokio::time::timeout(Duration::from_secs(10), async {
            while zs < BURST {
                let n = c.read(&mut b).await.unwrap();
                assert!(n > 0, "closed after {zs} bytes");
                zs += b[..n].iter().filter(|&&x| x == b'z').count();
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{zs} of the {BURST} bytes arrived"));
    }

    fn up_protocol() -> HeaderValue {
        HeaderValue::from_static("echo")
    }

    fn start(cfg: Config) -> (DuplexStream, tokio::task::JoinHandle<Served>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let h = tokio::spawn(serve(
            Box::new(server),
            cfg,
            CancellationToken::new(),
            echo,
            |_| {},
        ));
        (client, h)
    }

    /// What one read gives (an answer that fits the pipe comes whole).
    async fn read_once(c: &mut DuplexStream) -> String {
        let mut got = vec![0u8; 4096];
        let n = c.read(&mut got).await.unwrap();
        String::from_utf8_lossy(&got[..n]).into_owned()
    }

    async fn read_all(c: &mut DuplexStream) -> String {
        let mut s = Vec::new();
        c.read_to_end(&mut s).await.unwrap();
        String::from_utf8(s).unwrap()
    }

    /// Splits one answer off the front of `all`: its head and its body (de-chunked).
    fn take_answer(all: &mut &[u8]) -> (String, Vec<u8>) {
        let end = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8(all[..end].to_vec()).unwrap();
        *all = &all[end..];
        if let Some(l) = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
        {
            let n: usize = l.parse().unwrap();
            let body = all[..n].to_vec();
            *all = &all[n..];
            return (head, body);
        }
        assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
        let mut d = ChunkedDecoder::new();
        let mut body = Vec::new();
        while !d.is_done() {
            let step = d.decode(all).unwrap();
            if let Some(r) = step.data {
                body.extend_from_slice(&all[r]);
            }
            assert!(step.consumed > 0, "chunked body cut short");
            *all = &all[step.consumed..];
        }
        (head, body)
    }

    /// At the head timeout, a head begun is told (`Unserved::NoHead`) also after earlier
    /// requests; nothing, or only empty lines (RFC 9112 §2.2), after a request is keep-alive's
    /// end and is not.
    #[tokio::test(start_paused = true)]
    async fn a_head_begun_and_not_finished_is_told_empty_lines_are_not() {
        let cfg = Config {
            header_read_timeout: Duration::from_secs(1),
            ..CFG
        };
        for (after, told) in [
            (&b""[..], false),
            (&b"\r\n"[..], false),
            (&b"\r\nGET /b HT"[..], true),
        ] {
            let (mut client, server) = tokio::io::duplex(16 * 1024);
            let said = Arc::new(Mutex::new(Vec::new()));
            let s2 = said.clone();
            let h = tokio::spawn(serve(
                Box::new(server),
                cfg,
                CancellationToken::new(),
                echo,
                move |u| s2.lock().unwrap().push(u),
            ));
            client
                .write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            client.write_all(after).await.unwrap();
            let _ = h.await;
            let said = said.lock().unwrap().clone();
            assert_eq!(said == [Unserved::NoHead], told, "{after:?}: {said:?}");
        }
    }

    #[tokio::test]
    async fn long_bodies_go_out_whole_and_in_order() {
        // Over TCP (vectored writes: long frames held) and over a pipe (all copied).
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp_client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp_server, _) = l.accept().await.unwrap();
        assert!(tokio::io::AsyncWrite::is_write_vectored(&tcp_server));
        let (pipe_client, pipe_server) = tokio::io::duplex(16 * 1024);
        let ends: [(Box<dyn Io>, Box<dyn Io>); 2] = [
            (Box::new(tcp_client), Box::new(tcp_server)),
            (Box::new(pipe_client), Box::new(pipe_server)),
        ];
        for (mut c, server) in ends {
            let h = tokio::spawn(serve(server, CFG, CancellationToken::new(), echo, |_| {}));
            c.write_all(
                b"GET /pieces HTTP/1.1\r\nHost: x\r\n\r\nGET /pieces-chunked HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
            let mut all = Vec::new();
            c.read_to_end(&mut all).await.unwrap();
            let want = pieces().1;
            let mut rest = &all[..];
            let (head, body) = take_answer(&mut rest);
            assert!(
                head.contains(&format!("content-length: {}\r\n", want.len())),
                "{head}"
            );
            assert!(body == want, "length-framed body differs");
            let (_, body) = take_answer(&mut rest);
            assert!(body == want, "chunked body differs");
            assert!(rest.is_empty(), "{} bytes after the answers", rest.len());
            assert!(matches!(h.await.unwrap(), Served::Done));
        }
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_then_close() {
        let (mut c, h) = start(CFG);
        c.write_all(
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let all = read_all(&mut c).await;
        let a = all.find("GET /a Some(0)").unwrap();
        let b = all.find("POST /b Some(3)").unwrap();
        let cc = all.find("GET /c Some(0)").unwrap();
        assert!(a < b && b < cc, "{all}");
        assert_eq!(all.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{all}");
        assert!(
            all.contains("content-length: 14\r\n") && all.contains("connection: close\r\n"),
            "{all}"
        );
        assert!(matches!(h.await.unwrap(), Served::Done));
    }

    #[tokio::test]
    async fn a_client_that_leaves_before_the_answer_takes_its_request_with_it() {
        // Closed with nothing more sent while the answer is awaited: the request is given up
        // (the service's future dropped) and the connection ends unanswered.
        let (mut c, h) = start(CFG);
        c.write_all(b"GET /never HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.shutdown().await.unwrap();
        let served = tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .expect("the request was kept going after its client left");
        assert!(matches!(served.unwrap(), Served::Done));
        assert_eq!(read_all(&mut c).await, "");

        // Closed after pipelined requests: a client done sending, waiting for its answers.
        let (mut c, h) = start(CFG);
        c.write_all(b"GET /later HTTP/1.1\r\nHost: x\r\n\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        c.shutdown().await.unwrap();
        let all = read_all(&mut c).await;
        let later = all.find("GET /later Some(0)").unwrap();
        let a = all.find("GET /a Some(0)").unwrap();
        assert!(later < a, "{all}");
        assert!(matches!(h.await.unwrap(), Served::Done));

        // Closed after a request that said it is the last: answered too.
        let (mut c, h) = start(CFG);
        c.write_all(b"GET /later HTTP/1.0\r\n\r\n").await.unwrap();
        c.shutdown().await.unwrap();
        let all = read_all(&mut c).await;
        assert!(all.contains("GET /later Some(0)"), "{all}");
        assert!(matches!(h.await.unwrap(), Served::Done));
    }

    #[tokio::test]
    async fn chunked_upload_after_100_continue_and_chunked_answer() {
        let (mut c, _h) = start(CFG);
        c.write_all(b"POST /stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
            .await
            .unwrap();
        let mut b = [0u8; 25];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, CONTINUE);
        c.write_all(b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n")
            .await
            .unwrap();
        let s = read_once(&mut c).await;
        assert!(
            s.starts_with("HTTP/1.1 200 OK\r\n") && s.contains("transfer-encoding: chunked\r\n"),
            "{s}"
        );
        assert!(
            s.ends_with("\r\n\r\n15\r\nPOST /stream Some(11)\r\n0\r\n\r\n"),
            "{s:?}"
        );
    }

    #[tokio::test]
    async fn bad_requests_get_a_status_and_the_connection_closes() {
        for (req, status) in [
            (
                &b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
                "400",
            ),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", "501"),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "400"),
        ] {
            let (mut c, h) = start(CFG);
            c.write_all(req).await.unwrap();
            let all = read_all(&mut c).await;
            assert!(all.starts_with(&format!("HTTP/1.1 {status} ")), "{all}");
            assert!(all.contains("connection: close\r\n"), "{all}");
            drop(c);
            h.await.unwrap();
        }
    }

    #[tokio::test]
    async fn http_1_0_is_closed_unless_kept_alive_and_gets_close_delimited_bodies() {
        let (mut c, _h) = start(CFG);
        c.write_all(b"GET /stream HTTP/1.0\r\n\r\n").await.unwrap();
        let all = read_all(&mut c).await;
        assert!(
            all.contains("connection: close\r\n") && !all.contains("chunked"),
            "{all}"
        );
        assert!(all.ends_with("\r\n\r\nGET /stream Some(0)"), "{all}");

        let (mut c, _h) = start(CFG);
        c.write_all(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let s = read_once(&mut c).await;
        assert!(
            s.contains("connection: keep-alive\r\n") && s.ends_with("GET /a Some(0)"),
            "{s}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_head_or_an_idle_connection_is_closed_at_the_deadline() {
        let (mut c, h) = start(CFG);
        c.write_all(b"GET / HTTP/1.1\r\nHost:").await.unwrap();
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(read_all(&mut c).await, "");
        h.await.unwrap();

        // Keep-alive: the deadline counts from the end of the last answer.
        let (mut c, h) = start(CFG);
        tokio::time::sleep(Duration::from_secs(8)).await;
        c.write_all(b"GET /a HTTP/1.1\r\n\r\n").await.unwrap();
        let mut got = vec![0u8; 4096];
        assert!(c.read(&mut got).await.unwrap() > 0);
        tokio::time::sleep(Duration::from_secs(8)).await;
        c.write_all(b"GET /b HTTP/1.1\r\n\r\n").await.unwrap();
        let n = c.read(&mut got).await.unwrap();
        assert!(String::from_utf8_lossy(&got[..n]).contains("GET /b"));
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(c.read(&mut got).await.unwrap(), 0);
        h.await.unwrap();
    }

    /// A client whose unread answer filled the pipe, then a bad head: the refusal cannot be
    /// written, and is given the send timeout like any other write (it waited for ever,
    /// holding the connection's task and slot).
    #[tokio::test(start_paused = true)]
    async fn a_refusal_the_client_does_not_read_is_given_the_send_timeout() {
        let (mut c, server) = tokio::io::duplex(4096);
        // An answer of 4,000 bytes in all: it fits the pipe, the refusal after it does not.
        let fill = |_, _| async { Response::new(body::full(vec![b'x'; 3900])) };
        let h = tokio::spawn(serve(
            Box::new(server),
            CFG,
            CancellationToken::new(),
            fill,
            |_| {},
        ));
        c.write_all(b"GET /fill HTTP/1.1\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        c.write_all(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
            .await
            .unwrap();
        let t = Instant::now();
        tokio::time::timeout(CFG.send_timeout * 2, h)
            .await
            .expect("the connection is still held")
            .unwrap();
        assert!(t.elapsed() >= CFG.send_timeout, "{:?}", t.elapsed());
    }

    /// A connection (4 KiB of pipe) that asked a service answering 1 MiB for it, and the
    /// server's task.
    async fn asked_for_a_megabyte() -> (tokio::io::DuplexStream, tokio::task::JoinHandle<Served>) {
        let (mut c, server) = tokio::io::duplex(4096);
        let big = |_, _| async { Response::new(body::full(vec![b'x'; 1 << 20])) };
        let h = tokio::spawn(serve(
            Box::new(server),
            CFG,
            CancellationToken::new(),
            big,
            |_| {},
        ));
        c.write_all(b"GET /big HTTP/1.1\r\n\r\n").await.unwrap();
        (c, h)
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_cut_off_after_the_send_timeout() {
        let (mut c, h) = asked_for_a_megabyte().await;
        let t = Instant::now();
        h.await.unwrap();
        assert!(t.elapsed() >= CFG.send_timeout, "{:?}", t.elapsed());
        // What was sent, then the end: no complete answer.
        let got = read_all(&mut c).await;
        assert!(
            got.starts_with("HTTP/1.1 200 OK\r\n") && got.len() < 1 << 20,
            "{}",
            got.len()
        );
    }

    /// A client that takes a few bytes now and then, less than MIN_PROGRESS per send
    /// timeout, is cut off as if it had stopped: every partial write used to start the timeout
    /// over, so a trickling reader held the answer for ever.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_reads_a_trickle_is_cut_off_after_the_send_timeout() {
        let (mut c, h) = asked_for_a_megabyte().await;
        let t = Instant::now();
        let mut buf = [0u8; 100];
        // 100 bytes every 20 s until the server gives up on the answer.
        while !h.is_finished() {
            tokio::time::sleep(Duration::from_secs(20)).await;
            assert!(c.read(&mut buf).await.unwrap() > 0);
            assert!(t.elapsed() < 10 * CFG.send_timeout, "never cut off");
        }
        h.await.unwrap();
        let waited = t.elapsed();
        assert!(
            waited >= CFG.send_timeout && waited < 2 * CFG.send_timeout,
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_request_body_fails_after_the_body_timeout() {
        let (mut c, server) = tokio::io::duplex(4096);
        let svc = |req: Request<ProxyBody>, _| async move {
            let got = req.into_body().collect().await;
            Response::new(body::full(match got {
                Ok(b) => format!("whole body: {} bytes", b.to_bytes().len()),
                Err(e) => format!("body failed: {e}"),
            }))
        };
        let h = tokio::spawn(serve(
            Box::new(server),
            CFG,
            CancellationToken::new(),
            svc,
            |_| {},
        ));
        let t = Instant::now();
        c.write_all(b"POST /up HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap();
        // A byte before the timeout is progress: the wait starts again from it.
        tokio::time::sleep(CFG.body_timeout - Duration::from_secs(10)).await;
        c.write_all(b"d").await.unwrap();
        let got = read_all(&mut c).await;
        let waited = t.elapsed();
        assert!(
            waited >= 2 * CFG.body_timeout - Duration::from_secs(10),
            "{waited:?}"
        );
        assert!(
            got.contains("body failed: the client sent no more of its request body for 60 s"),
            "{got}"
        );
        // The body was not read to its end: the connection cannot carry another request.
        h.await.unwrap();
    }

    #[tokio::test]
    async fn a_request_body_that_keeps_coming_is_not_cut_off() {
        let (mut c, h) = start(CFG);
        c.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.write_all(b"cd").await.unwrap();
        let s = read_once(&mut c).await;
        assert!(
            s.starts_with("HTTP/1.1 200 OK\r\n") && s.ends_with("POST /up Some(4)"),
            "{s}"
        );
        drop(c);
        h.await.unwrap();
    }

    #[tokio::test]
    async fn upgrade_hands_over_the_connection_with_bytes_already_sent() {
        let (mut c, h) = start(CFG);
        c.write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nearly",
        )
        .await
        .unwrap();
        let mut got = vec![0u8; 4096];
        let mut s = String::new();
        while !s.ends_with("early") {
            let n = c.read(&mut got).await.unwrap();
            assert!(n > 0, "{s}");
            s.push_str(&String::from_utf8_lossy(&got[..n]));
        }
        assert!(
            s.starts_with("HTTP/1.1 101 Switching Protocols\r\n")
                && s.contains("upgrade: echo\r\n"),
            "{s}"
        );
        c.write_all(b"later").await.unwrap();
        let n = c.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"later");
        assert!(matches!(h.await.unwrap(), Served::Done));
    }

    #[tokio::test]
    async fn a_101_nobody_asked_for_ends_the_connection() {
        let (mut c, server) = tokio::io::duplex(4096);
        let stray = |_, _| async {
            let mut r = Response::new(body::full(""));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r
        };
        let h = tokio::spawn(serve(
            Box::new(server),
            CFG,
            CancellationToken::new(),
            stray,
            |_| {},
        ));
        c.write_all(b"GET / HTTP/1.1\r\n\r\nGET /again HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let all = read_all(&mut c).await;
        assert_eq!(all.matches("HTTP/1.1 101").count(), 1, "{all}");
        assert!(all.contains("connection: close\r\n"), "{all}");
        h.await.unwrap();
    }

    #[tokio::test]
    async fn the_http2_preface_is_handed_back() {
        let (mut c, h) = start(CFG);
        c.write_all(&server_h1::H2_PREFACE[..10]).await.unwrap();
        tokio::task::yield_now().await;
        c.write_all(&server_h1::H2_PREFACE[10..]).await.unwrap();
        c.write_all(b"frames").await.unwrap();
        let Served::H2(mut io) = h.await.unwrap() else {
            panic!("not handed back")
        };
        let mut got = vec![0u8; server_h1::H2_PREFACE.len() + 6];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..24], server_h1::H2_PREFACE);
        assert_eq!(&got[24..], b"frames");
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections() {
        let (mut c, server) = tokio::io::duplex(4096);
        let stop = CancellationToken::new();
        let h = tokio::spawn(serve(Box::new(server), CFG, stop.clone(), echo, |_| {}));
        c.write_all(b"GET /a HTTP/1.1\r\n\r\n").await.unwrap();
        let mut got = vec![0u8; 4096];
        assert!(c.read(&mut got).await.unwrap() > 0);
        stop.cancel();
        assert_eq!(c.read(&mut got).await.unwrap(), 0);
        h.await.unwrap();
    }
}
