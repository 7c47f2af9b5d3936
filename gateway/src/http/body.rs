//! Bodies as they cross the gateway: streamed frame by frame (never collected), counted,
//! optionally shaped to the app's bandwidth and capped at its `max_body`; the counter and a
//! guard hear when the body is over (the per-request log line is written then).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use policies::bandwidth::Shaper;

use super::deadline::Stall;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type on both sides of the proxy.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A request body grew past the app's `max_body` while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {0} bytes")]
pub struct TooLarge(pub u64);

/// The client left its request body waiting longer than the front allows (see
/// `server::Config::body_timeout`).
#[derive(Debug, thiserror::Error)]
#[error("the client sent no more of its request body for {} s", .0.as_secs())]
pub struct BodyStalled(pub std::time::Duration);

type Wait = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where a [`Metered`] body counts its data bytes.
pub trait Count {
    /// Adds `n` bytes; returns the total so far.
    fn add(&mut self, n: u64) -> u64;
    /// The body failed with `error` (called before [`Count::end`]).
    fn failed(&mut self, _error: &BoxError) {}
    /// The body is over, once: ended (its last frame taken, or empty from the start), failed,
    /// or cut off at its limit. Not called when the body is dropped before its end (the client
    /// left): then the counter is dropped with it.
    fn end(&mut self) {}
}

/// A counter shared with whoever reads it (the request's log line reads its body's count).
impl Count for Arc<AtomicU64> {
    fn add(&mut self, n: u64) -> u64 {
        self.fetch_add(n, Ordering::Relaxed) + n
    }
}

/// A body that counts its data bytes into `C`. `G`: what [`Metered::guard`] holds, in place
/// (a box per body was an allocation per request), dropped when the body is over.
pub struct Metered<B, C = Arc<AtomicU64>, G = ()> {
    inner: B,
    bytes: C,
    limit: Option<u64>,
    shaper: Option<Arc<Shaper>>,
    wait: Option<Wait>,
    guard: Option<G>,
    /// [`Count::end`] was called.
    over: bool,
}

impl<B: Body, C: Count> Metered<B, C> {
    pub fn new(inner: B, mut bytes: C) -> Self {
        // A body empty from the start may never be polled (hyper's HTTP/2 server sends the
        // head with END_STREAM and drops it): it is over now.
        let over = inner.is_end_stream();
        if over {
            bytes.end();
        }
        Metered {
            inner,
            bytes,
            limit: None,
            shaper: None,
            wait: None,
            guard: None,
            over,
        }
    }
}

impl<B, C, G> Metered<B, C, G> {
    /// Fails the body once more than `max` bytes went through.
    pub fn limit(mut self, max: Option<u64>) -> Self {
        self.limit = max;
        self
    }
    /// Paces frames through `shaper` (skipped when it has no limit).
    pub fn shape(mut self, shaper: Shaper) -> Self {
        self.shaper = (!shaper.is_unlimited()).then(|| Arc::new(shaper));
        self
    }
    /// Dropped when the body ends, fails, or is dropped.
    pub fn guard<G2>(self, g: G2) -> Metered<B, C, G2> {
        Metered {
            inner: self.inner,
            bytes: self.bytes,
            limit: self.limit,
            shaper: self.shaper,
            wait: self.wait,
            guard: (!self.over).then_some(g),
            over: self.over,
        }
    }

    /// The body is over: the counter hears it (once), the guard is dropped.
    fn over(&mut self)
    where
        C: Count,
    {
        if !std::mem::replace(&mut self.over, true) {
            self.bytes.end();
        }
        self.guard = None;
    }
}

impl<B, C, G> Metered<B, C, G>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    C: Count + Send + Unpin + 'static,
    G: Send + Unpin + 'static,
{
    pub fn boxed(self) -> ProxyBody {
        BodyExt::boxed_unsync(self)
    }
}

impl<B, C, G> Body for Metered<B, C, G>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    C: Count + Unpin,
    G: Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(w) = this.wait.as_mut() {
            ready!(w.as_mut().poll(cx));
            this.wait = None;
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    let n = d.len() as u64;
                    let total = this.bytes.add(n);
                    if let Some(max) = this.limit.filter(|m| total > *m) {
                        let e: BoxError = Box::new(TooLarge(max));
                        this.bytes.failed(&e);
                        this.over();
                        return Poll::Ready(Some(Err(e)));
                    }
                    if let Some(s) = &this.shaper {
                        let s = s.clone();
                        this.wait = Some(Box::pin(async move { s.consume(n).await }));
                    }
                }
                // Its last frame: hyper's HTTP/2 server sends it with END_STREAM and does not
                // poll for the end, so the body is over now, not when it is dropped.
                if this.inner.is_end_stream() {
                    this.over();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                let e = e.into();
                this.bytes.failed(&e);
                this.over();
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.over();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that fails with [`BodyStalled`] once its client has kept it waiting for the
/// timeout (see [`Stall`]); the HTTP/1 server's bodies track this themselves, HTTP/2's (hyper's)
/// are wrapped in this.
pub struct Stalling<B> {
    inner: B,
    stall: Stall,
}

impl<B> Stalling<B> {
    pub fn new(inner: B, timeout: std::time::Duration) -> Self {
        Stalling {
            inner,
            stall: Stall::new(timeout),
        }
    }
}

impl<B> Body for Stalling<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Poll::Ready(r) = Pin::new(&mut this.inner).poll_frame(cx) else {
            if this.stall.expired(cx) {
                return Poll::Ready(Some(Err(Box::new(BodyStalled(this.stall.timeout())))));
            }
            return Poll::Pending;
        };
        this.stall.progress();
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A complete small body (error pages, 101 answers).
pub fn full(b: impl Into<Bytes>) -> ProxyBody {
    http_body_util::Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::time::Duration;

    /// A body of `n` equal chunks.
    mod chunks {
        use super::*;
        pub struct Iter {
            left: usize,
            size: usize,
        }
        impl Iter {
            pub fn new(left: usize, size: usize) -> Self {
                Iter { left, size }
            }
        }
        impl hyper::body::Body for Iter {
            type Data = Bytes;
            type Error = std::convert::Infallible;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
                if self.left == 0 {
                    return Poll::Ready(None);
                }
                self.left -= 1;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![7u8; self.size])))))
            }
        }
    }

    struct Flag(Arc<AtomicU64>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[tokio::test]
    async fn counts_and_fires_guard_at_end() {
        let bytes = Arc::new(AtomicU64::new(0));
        let fired = Arc::new(AtomicU64::new(0));
        let body = Metered::new(chunks::Iter::new(4, 1000), bytes.clone())
            .guard(Flag(fired.clone()))
            .boxed();
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(all.len(), 4000);
        assert_eq!(bytes.load(Ordering::Relaxed), 4000);
        assert_eq!(fired.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn limit_fails_the_body() {
        let bytes = Arc::new(AtomicU64::new(0));
        let body = Metered::new(chunks::Iter::new(10, 1000), bytes.clone())
            .limit(Some(2500))
            .boxed();
        let err = body.collect().await.unwrap_err();
        assert!(err.to_string().contains("2500"), "{err}");
        assert_eq!(bytes.load(Ordering::Relaxed), 3000);
    }

    /// The request's log line is written by its counter's end: a body that failed must tell
    /// its counter why first, or the line reads as a clean answer.
    #[tokio::test]
    async fn a_failing_body_tells_its_counter_before_the_end() {
        #[derive(Default)]
        struct Seen(Vec<String>);
        struct Recorder(Arc<std::sync::Mutex<Seen>>);
        impl Count for Recorder {
            fn add(&mut self, _: u64) -> u64 {
                0
            }
            fn failed(&mut self, error: &BoxError) {
                self.0.lock().unwrap().0.push(format!("failed: {error}"));
            }
            fn end(&mut self) {
                self.0.lock().unwrap().0.push("end".into());
            }
        }
        /// One frame of data, then an error.
        struct Failing(bool);
        impl Body for Failing {
            type Data = Bytes;
            type Error = BoxError;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
                if std::mem::replace(&mut self.0, true) {
                    Poll::Ready(Some(Err("cut".into())))
                } else {
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"part")))))
                }
            }
        }
        let failing = Failing(false);
        let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
        let body = Metered::new(failing, Recorder(seen.clone())).boxed();
        assert!(body.collect().await.is_err());
        assert_eq!(seen.lock().unwrap().0, ["failed: cut", "end"]);

        let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
        let body = Metered::new(chunks::Iter::new(2, 10), Recorder(seen.clone())).boxed();
        body.collect().await.unwrap();
        assert_eq!(seen.lock().unwrap().0, ["end"]);

        // Over at its last frame (hyper's HTTP/2 server polls no further), once.
        let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
        let mut body = Metered::new(
            http_body_util::Full::new(Bytes::from_static(b"all")),
            Recorder(seen.clone()),
        );
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "all");
        assert_eq!(seen.lock().unwrap().0, ["end"]);
        assert!(body.frame().await.is_none());
        assert_eq!(seen.lock().unwrap().0, ["end"]);

        // Empty from the start: over before any poll (hyper never polls it).
        let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
        drop(Metered::new(
            http_body_util::Empty::<Bytes>::new(),
            Recorder(seen.clone()),
        ));
        assert_eq!(seen.lock().unwrap().0, ["end"]);

        // Dropped before its end (the client left): the counter hears no end.
        let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
        let mut body = Metered::new(chunks::Iter::new(2, 10), Recorder(seen.clone()));
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert!(seen.lock().unwrap().0.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_after_its_timeout_and_each_frame_rearms_it() {
        /// Frames as they are sent; ends when the sender is dropped.
        struct Fed(tokio::sync::mpsc::Receiver<Bytes>);
        impl Body for Fed {
            type Data = Bytes;
            type Error = BoxError;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
                self.0.poll_recv(cx).map(|d| d.map(|d| Ok(Frame::data(d))))
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut body = Stalling::new(Fed(rx), Duration::from_secs(60));
        let start = tokio::time::Instant::now();
        let feed = tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(40)).await;
                tx.send(Bytes::from_static(b"x")).await.unwrap();
            }
            // Then nothing more, without ending the body.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(tx);
        });
        for _ in 0..3 {
            let f = body.frame().await.unwrap().unwrap();
            assert_eq!(f.into_data().unwrap(), "x");
        }
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<BodyStalled>(), "{err}");
        // 3 frames 40 s apart, each within the 60 s; then 60 s of nothing.
        assert_eq!(start.elapsed().as_secs(), 180);
        feed.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn shaping_paces_frames() {
        let bytes = Arc::new(AtomicU64::new(0));
        let shaper = Shaper::new(None, Some(100_000));
        let start = tokio::time::Instant::now();
        let body = Metered::new(chunks::Iter::new(50, 10_000), bytes)
            .shape(shaper)
            .boxed();
        body.collect().await.unwrap();
        // 500 kB at 100 kB/s, less the initial 16 KiB burst.
        let secs = start.elapsed().as_secs_f64();
        assert!((4.0..5.5).contains(&secs), "{secs}");
    }
}
