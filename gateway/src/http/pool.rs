//! Upstream HTTP/1.1 connections to device services, kept open over tunnel streams and
//! reused: a request to a service that was used a moment ago costs no new QUIC stream, no
//! stream-header round trip and no TCP connect on the device.
//!
//! A connection has no task of its own: whoever uses it drives it. The request is sent and the
//! response body streamed from the client's connection task, which polls the upstream
//! connection alongside ([`Upstream::send`], [`Driven`]). A task per upstream connection cost
//! a spawn and four cross-task wake-ups per request: few instructions, but scheduling work on
//! a busy 2-core box (with the log-line change, the gateway's CPU per front request went
//! 49.7 → 40.1 µs in an interleaved wrk A/B; benches/RESULTS.md). An idle pooled connection is
//! polled by nobody; one the service closed meanwhile is found when it is next taken or swept.
//!
//! A connection goes back to the pool only once hyper says it can take another request
//! (the previous response body was read to the end); a connection that was upgraded, broke,
//! or sat idle past [`IDLE_TIMEOUT`] is dropped.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::TrySendError;
use hyper::rt::{Read, Write};
use hyper::{Request, Response};
use tracing::debug;

use crate::http::body::ProxyBody;

/// Idle connections kept per (app, device, service). Each is a QUIC stream plus a TCP
/// connection on the device; 32 covers a few browsers' parallel loads (6 connections each) and
/// a busy service without churning streams, and stays small for a home device.
pub const MAX_IDLE_PER_KEY: usize = 32;
/// Idle connections older than this are not reused: services commonly close idle keep-alive
/// connections after 60 s or more, so 30 s rarely hands out one that is about to be closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Which pooled connections may serve a request. The app is part of the key because the
/// tunnel stream header names the app for the device's logs and accounting.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub app: String,
    pub device: String,
    pub service: String,
}

/// hyper's client connection future (with upgrade support); unnameable, hence boxed.
type ConnFuture = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// One upstream HTTP/1.1 connection: the handle requests are sent on, and the connection
/// itself, which moves bytes only while someone polls it.
pub struct Upstream {
    tx: SendRequest<ProxyBody>,
    conn: Option<ConnFuture>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("open", &self.conn.is_some())
            .finish()
    }
}

impl Upstream {
    /// Polls the connection; false once it has ended (closed, failed, or upgraded).
    fn poll_conn(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(c) = self.conn.as_mut() {
            if let Poll::Ready(r) = c.as_mut().poll(cx) {
                if let Err(e) = r {
                    debug!(error = %e, "upstream connection ended with an error");
                }
                self.conn = None;
            }
        }
        self.conn.is_some()
    }

    /// Lets the connection notice what happened while nobody polled it (the service closed
    /// it, say); false if it has ended. Registers no waker: for idle connections only.
    fn still_open(&mut self) -> bool {
        self.poll_conn(&mut Context::from_waker(Waker::noop())) && !self.tx.is_closed()
    }

    /// Sends `req` and waits for the response head, driving the connection meanwhile. When
    /// the request could not be sent at all (the connection had closed), the error gives it
    /// back for another connection.
    pub async fn send(
        &mut self,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, TrySendError<Request<ProxyBody>>> {
        let mut sent = std::pin::pin!(self.tx.try_send_request(req));
        std::future::poll_fn(|cx| {
            self.poll_conn(cx);
            sent.as_mut().poll(cx)
        })
        .await
    }

    /// Ready(true) once the connection can take another request, Ready(false) if it ended.
    fn poll_reusable(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        if !self.poll_conn(cx) {
            return Poll::Ready(false);
        }
        self.tx.poll_ready(cx).map(|r| r.is_ok())
    }

    /// The connection future, for a task of its own: after a `101 Switching Protocols` it
    /// must run on to hand over the upgraded stream, whoever reads the response.
    pub fn into_conn(mut self) -> Option<impl Future<Output = ()> + Send + 'static> {
        self.conn.is_some().then(|| {
            std::future::poll_fn(move |cx| {
                if self.poll_conn(cx) {
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
        })
    }
}

/// A response body read from an [`Upstream`]: drives the connection while it is read, and
/// at its end hands the connection back to the pool.
pub struct Driven {
    inner: Incoming,
    up: Option<(Arc<Pool>, PoolKey, Upstream)>,
}

impl Driven {
    pub fn new(inner: Incoming, pool: Arc<Pool>, key: PoolKey, up: Upstream) -> Self {
        Driven {
            inner,
            up: Some((pool, key, up)),
        }
    }

    /// The body was read to its end: pool the connection once it can take a request (at
    /// once, nearly always; else a task drives it until then).
    fn finish(&mut self, cx: &mut Context<'_>) {
        let Some((pool, key, mut up)) = self.up.take() else {
            return;
        };
        match up.poll_reusable(cx) {
            Poll::Ready(true) => pool.put(key, up),
            Poll::Ready(false) => {}
            Poll::Pending => pool.recycle(key, up),
        }
    }
}

impl Body for Driven {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some((_, _, up)) = this.up.as_mut() {
            // An ended connection also ends (or fails) `inner`: nothing more to do here.
            up.poll_conn(cx);
        }
        let r = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &r {
            Some(Err(_)) => this.up = None,
            None => this.finish(cx),
            // A body of known length is over with its last frame, and hyper's server then
            // drops it without polling for the end: pool the connection now.
            Some(Ok(_)) if this.inner.is_end_stream() => this.finish(cx),
            Some(Ok(_)) => {}
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Driven {
    /// Dropped unread: an empty body (`204`, `HEAD`, `Content-Length: 0`) is never polled, and
    /// its connection is as good as after a finished one. Dropped mid-body, the connection
    /// is dropped too: the rest of that response is still on its way.
    fn drop(&mut self) {
        if self.up.is_some() && self.inner.is_end_stream() {
            self.finish(&mut Context::from_waker(Waker::noop()));
        }
    }
}

struct Idle {
    up: Upstream,
    since: Instant,
}

#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<PoolKey, Vec<Idle>>>,
    closed: AtomicBool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("idle", &self.idle_count())
            .finish()
    }
}

impl Pool {
    pub fn new() -> Arc<Self> {
        Arc::new(Pool::default())
    }

    /// An idle connection ready for a request, if one is fresh enough and still open, and how
    /// long it sat idle.
    pub fn take(&self, key: &PoolKey) -> Option<(Upstream, Duration)> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key)?;
        while let Some(mut c) = list.pop() {
            let idle_for = now - c.since;
            if idle_for < IDLE_TIMEOUT && c.up.still_open() && c.up.tx.is_ready() {
                return Some((c.up, idle_for));
            }
        }
        None
    }

    /// Keeps `up` for reuse once it can take another request. Returns at once; a task drives
    /// the connection until then (the rest of a request body may still be going up).
    pub fn recycle(self: &Arc<Self>, key: PoolKey, mut up: Upstream) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        // A body can be dropped outside the runtime (at shutdown): the connection just closes.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pool = self.clone();
        rt.spawn(async move {
            if std::future::poll_fn(|cx| up.poll_reusable(cx)).await {
                pool.put(key, up);
            }
        });
    }

    fn put(&self, key: PoolKey, up: Upstream) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(key).or_default();
        // Pruned only when full (one clock read per request, not one per idle connection);
        // `sweep` prunes the rest every few seconds.
        if list.len() >= MAX_IDLE_PER_KEY {
            list.retain(|c| now - c.since < IDLE_TIMEOUT && !c.up.tx.is_closed());
        }
        if list.len() < MAX_IDLE_PER_KEY {
            list.push(Idle { up, since: now });
        }
    }

    /// Drops every idle connection and keeps none from now on (shutdown).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Drops idle connections past [`IDLE_TIMEOUT`] or closed by the other side.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|_, list| {
            list.retain_mut(|c| now - c.since < IDLE_TIMEOUT && c.up.still_open());
            !list.is_empty()
        });
    }

    pub fn idle_count(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }
}

/// Starts an HTTP/1.1 client connection over `io` (a tunnel stream in the gateway, a duplex
/// pipe in tests). Nothing runs until the connection is used: see [`Upstream`].
pub async fn handshake<I>(io: I) -> Result<Upstream, hyper::Error>
where
    I: Read + Write + Unpin + Send + 'static,
{
    let (tx, conn) = http1::Builder::new().handshake(io).await?;
    Ok(Upstream {
        tx,
        conn: Some(Box::pin(conn.with_upgrades())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::body;
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    /// A backend on the far end of a duplex pipe, counting the connections it serves.
    fn backend(conns: Arc<AtomicUsize>) -> tokio::io::DuplexStream {
        let (a, b) = tokio::io::duplex(64 * 1024);
        conns.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let path = req.uri().path().to_owned();
                    Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from(format!("hello {path}")),
                    )))
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(b), svc)
                .await;
        });
        a
    }

    fn key() -> PoolKey {
        PoolKey {
            app: "web".into(),
            device: "home1".into(),
            service: "web".into(),
        }
    }

    /// GET `path` on `up`, reading the body through [`Driven`] (which pools `up` at its end).
    async fn get(pool: &Arc<Pool>, key: PoolKey, mut up: Upstream, path: &str) -> String {
        let req = hyper::Request::get(path).body(body::full("")).unwrap();
        let resp = up.send(req).await.unwrap();
        let b = Driven::new(resp.into_body(), pool.clone(), key, up)
            .collect()
            .await
            .unwrap()
            .to_bytes();
        String::from_utf8(b.to_vec()).unwrap()
    }

    async fn pooled(pool: &Pool, key: &PoolKey) -> Upstream {
        loop {
            if let Some((up, _)) = pool.take(key) {
                return up;
            }
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn reuses_a_finished_connection() {
        let conns = Arc::new(AtomicUsize::new(0));
        let pool = Pool::new();
        let up = handshake(TokioIo::new(backend(conns.clone())))
            .await
            .unwrap();
        assert_eq!(get(&pool, key(), up, "/a").await, "hello /a");
        let up = pooled(&pool, &key()).await;
        assert!(
            pool.take(&key()).is_none(),
            "taken connections leave the pool"
        );
        assert_eq!(get(&pool, key(), up, "/b").await, "hello /b");
        assert_eq!(conns.load(Ordering::Relaxed), 1);
        let other = PoolKey {
            app: "other".into(),
            ..key()
        };
        let up = pooled(&pool, &key()).await;
        assert_eq!(get(&pool, other.clone(), up, "/c").await, "hello /c");
        pooled(&pool, &other).await;
        assert!(pool.take(&key()).is_none(), "keys do not share");
        assert_eq!(conns.load(Ordering::Relaxed), 1);
    }

    /// A body that sends one frame, then never another and never ends.
    struct Stalls(bool);
    impl Body for Stalls {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if self.0 {
                return Poll::Pending;
            }
            self.0 = true;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"part")))))
        }
    }

    #[tokio::test]
    async fn a_body_dropped_midway_drops_its_connection() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req: hyper::Request<Incoming>| async move {
                Ok::<_, Infallible>(hyper::Response::new(Stalls(false)))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(b), svc)
                .await;
        });
        let pool = Pool::new();
        let mut up = handshake(TokioIo::new(a)).await.unwrap();
        let req = hyper::Request::get("/").body(body::full("")).unwrap();
        let resp = up.send(req).await.unwrap();
        let mut body = Driven::new(resp.into_body(), pool.clone(), key(), up);
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"part");
        drop(body);
        tokio::task::yield_now().await;
        assert_eq!(pool.idle_count(), 0, "half-read connection was pooled");
    }

    #[tokio::test]
    async fn closed_connections_are_not_handed_out() {
        let conns = Arc::new(AtomicUsize::new(0));
        let pool = Pool::new();
        let closed = || async {
            let (a, b) = tokio::io::duplex(1024);
            drop(b);
            handshake(TokioIo::new(a)).await.unwrap()
        };
        // Never polled since, they look ready: taking or sweeping finds them closed.
        pool.put(key(), closed().await);
        assert!(pool.take(&key()).is_none());
        pool.put(key(), closed().await);
        assert_eq!(pool.idle_count(), 1);
        pool.sweep();
        assert_eq!(pool.idle_count(), 0);
        let up = handshake(TokioIo::new(backend(conns))).await.unwrap();
        pool.put(key(), up);
        pool.sweep();
        assert_eq!(pool.idle_count(), 1, "an open connection survives a sweep");
        pool.close();
        assert_eq!(pool.idle_count(), 0);
        let up = handshake(TokioIo::new(backend(Arc::default())))
            .await
            .unwrap();
        pool.put(key(), up);
        assert_eq!(pool.idle_count(), 0, "a closed pool keeps nothing");
    }
}
