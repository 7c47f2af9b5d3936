//! Deadlines of the front's connections and request bodies, each served by one timer that is
//! re-armed only when it fires early: they are set often and rarely reached.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

/// Ready once `due` has passed. One timer serves all of a connection's deadlines, which are
/// set often and rarely reached: it is re-armed only when it fires before the deadline in
/// force, not for every request (a timer-wheel update per request, ~700 instructions).
pub fn poll_deadline(
    mut timer: Pin<&mut tokio::time::Sleep>,
    cx: &mut Context<'_>,
    due: Instant,
) -> Poll<()> {
    if timer.deadline() > due {
        timer.as_mut().reset(due);
    }
    while timer.as_mut().poll(cx).is_ready() {
        if Instant::now() >= due {
            return Poll::Ready(());
        }
        timer.as_mut().reset(due);
    }
    Poll::Pending
}

/// Bytes a client must take within one send timeout for the timeout to start over, unless it
/// took all there was: a reader taking a byte a minute would otherwise hold the answer, its
/// tunnel stream and the service's connection for ever (1,024 of them per address). At 16 KiB
/// a minute the floor is ~270 bytes/s, far below any real link. (Request bodies keep a
/// per-frame timeout: a streaming upload, gRPC or a log tail, may rightly send a few bytes
/// every few seconds.)
pub const MIN_PROGRESS: u64 = 16 * 1024;

/// How long a request body has been waiting for its client (nginx's `client_body_timeout`).
#[derive(Debug)]
pub struct Stall {
    /// How long the client may keep the body waiting.
    timeout: Duration,
    /// Made the first time the body waits (a body that arrives with its head never needs
    /// one), then kept for its later waits ([`poll_deadline`] moves it).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When the current wait began: the last poll was answered `Pending`.
    since: Option<Instant>,
}

impl Stall {
    pub fn new(timeout: Duration) -> Self {
        Stall {
            timeout,
            timer: None,
            since: None,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The body is waiting for the client: true once it has waited `timeout` since its last
    /// progress. Only a wait the service sees counts: the body is polled when the service is
    /// ready for more, so a slow device is not blamed on the client.
    pub fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let due = *self.since.get_or_insert_with(Instant::now) + self.timeout;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        poll_deadline(timer.as_mut(), cx, due).is_ready()
    }

    /// The body moved (a frame, its end or an error): the next wait starts afresh.
    pub fn progress(&mut self) {
        self.since = None;
    }
}
