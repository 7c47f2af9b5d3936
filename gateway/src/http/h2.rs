//! One client's HTTP/2 connection: hyper's server, plus what it lacks for a public front — a
//! GOAWAY once no request has been open for the idle time (an answer still streaming counts as
//! open), and a cut when the client takes no answer data for the send timeout. hyper hands an
//! answer's chunk to the connection and then waits for the client's flow-control credit
//! without a deadline, so a client that grants none (a zero initial window) and answers pings
//! held every stream's tunnel stream and app slot for ever; one answer resting while others
//! move is given [`RESTING_TIMEOUTS`] send timeouts. And a cut of a client that resets
//! most of its requests before their answers ("rapid reset", CVE-2023-44487): each request
//! still reached a device (a tunnel stream, a connection to the service) before the reset
//! was seen, and h2's own bound counts only streams reset before hyper took them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, Instrument};
use tunnel::flow_activity::FlowActivity;

use super::body::{self, BoxError, ProxyBody};
use super::{proxy, Front, MAX_H2_STREAMS};

/// Decoded bytes of one HTTP/2 request head at most (hyper's `max_header_list_size`).
const MAX_H2_HEAD: u32 = 32 * 1024;

/// Requests of one connection its client may abandon (reset before their answer's head) in a
/// burst; the allowance refills at [`ABANDONED_PER_SEC`]. Past it the connection is cut.
/// Browsers cancel some (a page left while loading, map tiles scrolled away, type-ahead
/// searches), far below this; a rapid-reset attack resets thousands a second.
pub const ABANDONED_BURST: f64 = 200.0;
pub const ABANDONED_PER_SEC: f64 = 20.0;
/// Send timeouts one answer may rest (its chunk held, the client granting it no credit) while
/// the connection's other answers move, before the connection is closed (GOAWAY, then cut a
/// send timeout later): a paused video is no stall, but the connection's progress alone
/// bounded nothing — a client that stopped reading every download and asked
/// for a small page now and then (each answer moving as it ended) held them all for ever.
pub const RESTING_TIMEOUTS: u32 = 5;

/// Serves HTTP/2 on one client connection until it ends, the front shuts down, it has been
/// idle for the idle time, or its client stalls an answer: for the send timeout with nothing
/// else moving, or for [`RESTING_TIMEOUTS`] of them while others move (then it closes
/// gracefully, and is cut a send timeout later).
pub(super) async fn serve<I>(
    front: Front,
    io: I,
    peer: SocketAddr,
    https: bool,
    shutdown: CancellationToken,
    // Marked busy by each request in flight.
    slots: Arc<super::ConnSlots>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let body_timeout = front.0.tuning.body_timeout;
    let idle = front.0.tuning.h2_idle_timeout;
    let send_timeout = front.0.tuning.send_timeout;
    let busy = Arc::new(Busy::new());
    let busy2 = busy.clone();
    let conn_slots = slots.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let front = front.clone();
        let req = req
            .map(|b| body::Stalling::new(b.map_err(BoxError::from), body_timeout).boxed_unsync());
        let open = Open::enter(&busy2);
        // Boxed: hyper moves each stream's future several times on its way into the task
        // it spawns for it, and the proxy's future is ~4 KiB.
        let slots = Some(slots.clone());
        let answer = Box::pin(proxy::handle(front, req, peer, https, None, slots));
        let mut abandoned = Abandoned(Some(busy2.clone()));
        async move {
            let r = answer.await;
            abandoned.answered();
            // The request stays open until its answer's body ends (or is dropped).
            Ok::<_, Infallible>(r.map(|b| Answer::new(b, open).boxed_unsync()))
        }
    });
    let mut b = hyper::server::conn::http2::Builder::new(InSpan);
    b.timer(TokioTimer::new())
        .max_concurrent_streams(MAX_H2_STREAMS)
        // Twice hyper's default of 16 KiB, which refused (431) split sign-in cookies that pass
        // over HTTP/1.1 (64 KiB a head). Not 64 KiB: a connection holds up to
        // MAX_H2_STREAMS heads at once, and HPACK lets a few bytes stand for a long value.
        .max_header_list_size(MAX_H2_HEAD)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    let conn = b.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let mut check = tokio::time::interval(send_timeout / 4);
    let mut closing = false;
    // When a connection closing for a resting answer is cut, answers in flight or not.
    let mut rest_cut: Option<Instant> = None;
    // When a closing connection with no answer left open is cut, and the bytes sent to the
    // client when that was set: hyper hands a finished answer's last chunk to h2 and lets its
    // body go, and what h2 could not send yet (a client granting no window) is watched by
    // nothing else. The connection held on after its GOAWAY for as long as the client
    // answered pings. A client still taking it (MIN_PROGRESS bytes, more than pings) gets
    // another send timeout.
    let mut unsent_cut: Option<(Instant, u64)> = None;
    let r = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = shutdown.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            // GOAWAY: answers still streaming finish, nothing new starts.
            _ = busy.idle(idle), if !closing => {
                debug!(idle_secs = idle.as_secs(), "HTTP/2 connection idle: closing");
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = busy.reset_flood.notified() => {
                let (requests, abandoned) = busy.abandoned();
                info!(client = %crate::addr_text::Client(peer), requests, abandoned, "HTTP/2 client reset requests before their answers faster than allowed: connection closed");
                return;
            }
            // Also while closing: a graceful shutdown waits for every answer.
            _ = check.tick() => match busy.stalled_for(send_timeout) {
                Some(Stall::Connection(held)) => {
                    info!(client = %crate::addr_text::Client(peer), held_secs = held.as_secs(), "HTTP/2 client took no answer data for the send timeout: connection closed");
                    return;
                }
                // One answer resting too long while others move: no new request on this
                // connection (GOAWAY), and those in flight get a send timeout to finish
                // (cutting at once cut every other tab's answers with it).
                Some(Stall::Resting(held)) => match rest_cut {
                    None => {
                        info!(client = %crate::addr_text::Client(peer), held_secs = held.as_secs(), "HTTP/2 answer resting past its allowance: connection closing (GOAWAY; answers in flight may finish)");
                        rest_cut = Some(Instant::now() + send_timeout);
                        if !closing {
                            closing = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                    Some(at) if Instant::now() >= at => {
                        info!(client = %crate::addr_text::Client(peer), held_secs = held.as_secs(), "HTTP/2 answer still resting after the GOAWAY: connection closed");
                        return;
                    }
                    Some(_) => {}
                },
                None if closing && busy.open.load(Ordering::Relaxed) == 0 => {
                    let sent = conn_slots.sent();
                    let restart = (Instant::now() + send_timeout, sent);
                    let (at, from) = *unsent_cut.get_or_insert(restart);
                    if sent.saturating_sub(from) >= super::deadline::MIN_PROGRESS {
                        unsent_cut = Some(restart);
                    } else if Instant::now() >= at {
                        info!(client = %crate::addr_text::Client(peer), secs = send_timeout.as_secs(), "HTTP/2 client took under 16 KiB of the answers left to send in the send timeout after the GOAWAY: connection closed");
                        return;
                    }
                }
                None => unsent_cut = None,
            }
        }
    };
    if let Err(e) = r {
        match broke_protocol(&e) {
            Some(why) => {
                info!(client = %crate::addr_text::Client(peer), error = %why, "HTTP/2 client broke the protocol: connection closed (GOAWAY)")
            }
            None => debug!(error = %e, "connection ended with an error"),
        }
    }
}

/// The h2 error of a connection closed by our GOAWAY for what its client sent (a malformed
/// frame, a CONTINUATION or header flood, too many streams reset by us); None for I/O ends
/// and the client's own GOAWAY. hyper returns them all alike, and they were logged at debug,
/// unseen, while the gateway's own floods checks log at info.
fn broke_protocol(e: &hyper::Error) -> Option<&::h2::Error> {
    let h2e = std::error::Error::source(e)?.downcast_ref::<::h2::Error>()?;
    let ours = h2e.is_library() && h2e.is_go_away();
    (ours && h2e.reason() != Some(::h2::Reason::NO_ERROR)).then_some(h2e)
}

/// Spawns hyper's per-stream tasks in the connection's span (`http{client, scheme}`), as
/// HTTP/1 requests are served: hyper-util's `TokioExecutor` spawns them bare, and every
/// HTTP/2 request's lines (its log line, written as its answer's body is dropped) lacked the
/// client.
#[derive(Clone, Copy)]
struct InSpan;

impl<F> hyper::rt::Executor<F> for InSpan
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut.in_current_span());
    }
}

/// The requests of one connection: how many are open (until their answers end), when the
/// last one ended, and since when each answer has had a chunk hyper has not sent.
struct Busy {
    open: AtomicUsize,
    last: FlowActivity,
    /// Answers' `held` clocks, for the stall check (pruned as answers end).
    answers: Mutex<Vec<Weak<AtomicU64>>>,
    /// What the `held` clocks count from.
    start: Instant,
    /// When (ms of [`Busy::now_ms`]) an answer last came back for more after a chunk: one
    /// stream whose reader rests (a paused video) is no stall while others move.
    progress: AtomicU64,
    requests: AtomicU64,
    /// Requests dropped before their answer's head (the client reset them): in all, and as
    /// a level that drains at [`ABANDONED_PER_SEC`] (with when it was last updated).
    abandoned: AtomicU64,
    abandoned_level: Mutex<(f64, Instant)>,
    /// Told when the level passes [`ABANDONED_BURST`].
    reset_flood: tokio::sync::Notify,
}

impl Busy {
    fn new() -> Self {
        Busy {
            open: AtomicUsize::new(0),
            last: FlowActivity::default(),
            answers: Mutex::new(Vec::new()),
            start: Instant::now(),
            progress: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            abandoned_level: Mutex::new((0.0, Instant::now())),
            reset_flood: tokio::sync::Notify::new(),
        }
    }

    /// (requests, abandoned requests) so far.
    fn abandoned(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.abandoned.load(Ordering::Relaxed),
        )
    }

    /// Milliseconds since the connection began, at least 1 (0 means "nothing held").
    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// An answer's held chunk went on its way: the connection moves.
    fn moved(&self) {
        self.progress.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Resolves once no request has been open for `idle`.
    async fn idle(&self, idle: Duration) {
        loop {
            self.last.idle(idle).await;
            if self.open.load(Ordering::Relaxed) == 0 {
                return;
            }
            // Busy: look again an idle time after now.
            self.last.touch();
        }
    }

    /// Whether the longest-held answer chunk has waited `timeout` or more with no answer of
    /// the connection moving meanwhile, or [`RESTING_TIMEOUTS`] times `timeout` or more while
    /// others moved; and how long.
    fn stalled_for(&self, timeout: Duration) -> Option<Stall> {
        let now = self.now_ms();
        let moved = self.progress.load(Ordering::Relaxed);
        let (limit, stall): (_, fn(Duration) -> Stall) =
            if Duration::from_millis(now.saturating_sub(moved)) < timeout {
                (timeout * RESTING_TIMEOUTS, Stall::Resting)
            } else {
                (timeout, Stall::Connection)
            };
        let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        answers.retain(|w| w.strong_count() > 0);
        let oldest = answers
            .iter()
            .filter_map(Weak::upgrade)
            .map(|held| held.load(Ordering::Relaxed))
            .filter(|&since| since != 0)
            .min()?;
        let held = Duration::from_millis(now.saturating_sub(oldest));
        (held >= limit).then(|| stall(held))
    }
}

/// An answer held too long ([`Busy::stalled_for`]), and for how long.
enum Stall {
    /// Nothing of the connection moved for the send timeout: the client took nothing.
    Connection(Duration),
    /// One answer rested [`RESTING_TIMEOUTS`] send timeouts while others moved.
    Resting(Duration),
}

/// One open request of a [`Busy`] connection, until dropped.
struct Open(Arc<Busy>);

impl Open {
    fn enter(busy: &Arc<Busy>) -> Self {
        busy.requests.fetch_add(1, Ordering::Relaxed);
        busy.open.fetch_add(1, Ordering::Relaxed);
        busy.last.touch();
        Open(busy.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.last.touch();
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts its request as abandoned if dropped before the answer's head was made.
struct Abandoned(Option<Arc<Busy>>);

impl Abandoned {
    /// The answer's head was made: not abandoned.
    fn answered(&mut self) {
        self.0 = None;
    }
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        let Some(busy) = self.0.take() else {
            return;
        };
        busy.abandoned.fetch_add(1, Ordering::Relaxed);
        let mut level = busy
            .abandoned_level
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let drained = now.duration_since(level.1).as_secs_f64() * ABANDONED_PER_SEC;
        *level = ((level.0 - drained).max(0.0) + 1.0, now);
        if level.0 > ABANDONED_BURST {
            busy.reset_flood.notify_one();
        }
    }
}

/// An answer's body as hyper sends it: keeps its request open until it ends, and notes when
/// hyper took a chunk and has not come back for the next (it waits for the client's credit
/// in between).
struct Answer {
    inner: ProxyBody,
    open: Open,
    /// Since when (ms of [`Busy::now_ms`]) a chunk has been held; 0 when none is.
    held: Arc<AtomicU64>,
}

impl Answer {
    fn new(inner: ProxyBody, open: Open) -> Self {
        let held = Arc::new(AtomicU64::new(0));
        let mut answers = open.0.answers.lock().unwrap_or_else(|p| p.into_inner());
        // At most MAX_H2_STREAMS answers are open at once: past twice that the list holds
        // ended ones (and their clocks' memory), so it is pruned, amortized over the pushes.
        if answers.len() >= 2 * MAX_H2_STREAMS as usize {
            answers.retain(|w| w.strong_count() > 0);
        }
        answers.push(Arc::downgrade(&held));
        drop(answers);
        Answer { inner, open, held }
    }
}

/// A chunk of an answer as hyper hands it to h2, which holds it until the client's credit lets
/// it go out: for as long as it does, the answer's `held` clock stays in the stall check
/// ([`Busy::stalled_for`]), past the answer's end — hyper hands an answer's last chunk to h2
/// and drops the answer, and a client granting a window of one byte left every answer's
/// tail (a 16 KiB read buffer each, shared) with h2, 128 streams a connection, for as long as
/// it kept the connection busy with a request now and then. Its going (sent, or dropped with
/// its stream) is the connection moving.
struct Unsent {
    data: Bytes,
    _held: Arc<AtomicU64>,
    busy: Arc<Busy>,
}

impl AsRef<[u8]> for Unsent {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Unsent {
    fn drop(&mut self) {
        self.busy.moved();
    }
}

/// An answer hyper is done with (sent whole, or its stream ended) moved too: a one-chunk
/// answer sent with its end is never polled again.
impl Drop for Answer {
    fn drop(&mut self) {
        if self.held.load(Ordering::Relaxed) != 0 {
            self.open.0.moved();
        }
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // Back for more: what was taken before is on its way.
        if self.held.swap(0, Ordering::Relaxed) != 0 {
            self.open.0.moved();
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) if f.is_data() => {
                let now = self.open.0.now_ms();
                self.held.store(now, Ordering::Relaxed);
                let tail = |data| {
                    Bytes::from_owner(Unsent {
                        data,
                        _held: self.held.clone(),
                        busy: self.open.0.clone(),
                    })
                };
                Poll::Ready(Some(Ok(f.map_data(tail))))
            }
            r => r,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
