//! Upstream HTTP/1.1 connections to device services, kept open over tunnel streams and
//! reused: a request to a service that was used a moment ago costs no new QUIC stream, no
//! stream-header round trip and no TCP connect on the device.
//!
//! A connection goes back to the pool only once hyper says it can take another request
//! (the previous response body was read to the end); a connection that was upgraded, broke,
//! or sat idle past [`IDLE_TIMEOUT`] is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::{self, SendRequest};
use hyper::rt::{Read, Write};
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

struct Idle {
    tx: SendRequest<ProxyBody>,
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

    /// An idle connection ready for a request, if one is fresh enough.
    pub fn take(&self, key: &PoolKey) -> Option<SendRequest<ProxyBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key)?;
        while let Some(c) = list.pop() {
            if c.since.elapsed() < IDLE_TIMEOUT && c.tx.is_ready() {
                return Some(c.tx);
            }
        }
        None
    }

    /// Keeps `tx` for reuse once it can take another request. Returns at once; the wait runs
    /// in its own task (it lasts as long as the response body being streamed).
    pub fn recycle(self: &Arc<Self>, key: PoolKey, mut tx: SendRequest<ProxyBody>) {
        let pool = self.clone();
        tokio::spawn(async move {
            if tx.ready().await.is_ok() {
                pool.put(key, tx);
            }
        });
    }

    fn put(&self, key: PoolKey, tx: SendRequest<ProxyBody>) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(key).or_default();
        list.retain(|c| c.since.elapsed() < IDLE_TIMEOUT && !c.tx.is_closed());
        if list.len() < MAX_IDLE_PER_KEY {
            list.push(Idle {
                tx,
                since: Instant::now(),
            });
        }
    }

    /// Drops every idle connection and keeps none from now on (shutdown).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Drops idle connections past [`IDLE_TIMEOUT`] or closed by the other side.
    pub fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|_, list| {
            list.retain(|c| c.since.elapsed() < IDLE_TIMEOUT && !c.tx.is_closed());
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
/// pipe in tests). The connection runs in its own task and supports upgrades.
pub async fn handshake<I>(io: I) -> Result<SendRequest<ProxyBody>, hyper::Error>
where
    I: Read + Write + Unpin + Send + 'static,
{
    let (tx, conn) = http1::Builder::new().handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(tx)
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

    async fn get(tx: &mut SendRequest<ProxyBody>, path: &str) -> String {
        let req = hyper::Request::get(path).body(body::full("")).unwrap();
        let resp = tx.send_request(req).await.unwrap();
        let b = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn reuses_a_finished_connection() {
        let conns = Arc::new(AtomicUsize::new(0));
        let pool = Pool::new();
        let mut tx = handshake(TokioIo::new(backend(conns.clone())))
            .await
            .unwrap();
        assert_eq!(get(&mut tx, "/a").await, "hello /a");
        pool.recycle(key(), tx);
        let mut tx = loop {
            if let Some(tx) = pool.take(&key()) {
                break tx;
            }
            tokio::task::yield_now().await;
        };
        assert_eq!(get(&mut tx, "/b").await, "hello /b");
        assert_eq!(conns.load(Ordering::Relaxed), 1);
        assert!(
            pool.take(&key()).is_none(),
            "taken connections leave the pool"
        );
        let other = PoolKey {
            app: "other".into(),
            ..key()
        };
        pool.recycle(other.clone(), tx);
        while pool.idle_count() == 0 {
            tokio::task::yield_now().await;
        }
        assert!(pool.take(&key()).is_none(), "keys do not share");
        assert!(pool.take(&other).is_some());
    }

    #[tokio::test]
    async fn closed_connections_are_not_handed_out() {
        let conns = Arc::new(AtomicUsize::new(0));
        let pool = Pool::new();
        let (a, b) = tokio::io::duplex(1024);
        drop(b);
        let tx = handshake(TokioIo::new(a)).await.unwrap();
        while !tx.is_closed() {
            tokio::task::yield_now().await;
        }
        pool.put(key(), tx);
        assert!(pool.take(&key()).is_none());
        let tx = handshake(TokioIo::new(backend(conns))).await.unwrap();
        pool.close();
        pool.put(key(), tx);
        assert_eq!(pool.idle_count(), 0);
    }
}
