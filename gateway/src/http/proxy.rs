//! One request through the gateway: route by host and path → the app's rules → its limits →
//! a pooled upstream connection over a tunnel stream → the response streamed back. An
//! upgrade (WebSocket, …) is spliced byte for byte once both sides agreed to it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::request::Parts;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use policies::accounting::{AppCounters, Refusal};
use policies::{ConnGuard, Decision, DenyReason, Listener, Requester, Timestamp};
use tracing::{debug, info};
use tunnel::proto::Origin;

use crate::addr_text::Client;

use super::body::{self, Metered, ProxyBody, TooLarge};
use super::errors::ProxyError;
use super::headers;
use super::metrics::NO_APP;
use super::pool::{self, Driven, PoolKey, Upstream};
use super::route;
use super::Front;

/// Methods tried when telling a client which ones an app allows (`Allow` of a 405).
const KNOWN_METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

/// A refused request's body is read and discarded up to this size (and for at most
/// [`DRAIN_TIME`]) before answering, so the client sees a clean answer instead of a reset
/// stream (curl reports an HTTP/2 `RST_STREAM` after an early answer as an error). Larger
/// bodies are cut off: a refusal must stay cheap.
const DRAIN_MAX: usize = 64 * 1024;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(1);

/// The per-request log line, written when the response is over (body sent, failed or
/// dropped; for an upgrade, when the spliced connection closes). Also settles the app's byte
/// counters and holds the app's connection slot until then.
struct RequestLog {
    app: String,
    device: String,
    client: SocketAddr,
    method: Method,
    path: String,
    status: u16,
    started: Instant,
    bytes_in: Arc<AtomicU64>,
    bytes_out: Arc<AtomicU64>,
    counters: Option<Arc<AppCounters>>,
    error: Option<String>,
    _slot: Option<ConnGuard>,
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let bytes_in = self.bytes_in.load(Ordering::Relaxed);
        let bytes_out = self.bytes_out.load(Ordering::Relaxed);
        if let Some(c) = &self.counters {
            c.bytes_in(bytes_in);
            c.bytes_out(bytes_out);
        }
        let ms = self.started.elapsed().as_millis() as u64;
        let error = self.error.as_deref().unwrap_or("");
        info!(
            app = %self.app,
            device = %self.device,
            client = %Client(self.client),
            method = %self.method,
            path = %self.path,
            status = self.status,
            bytes_in,
            bytes_out,
            ms,
            error,
            "http request"
        );
    }
}

/// What the proxy got back from the device, ready to be streamed to the client.
struct Answer {
    resp: Response<Incoming>,
    shape_out: policies::bandwidth::Shaper,
}

/// Serves one request. Never fails: every refusal and error becomes a short plain answer.
pub(crate) async fn handle(
    front: Front,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    https: bool,
) -> Response<ProxyBody> {
    let mut log = RequestLog {
        app: NO_APP.into(),
        device: String::new(),
        client: peer,
        method: req.method().clone(),
        path: req.uri().path().to_owned(),
        status: 0,
        started: Instant::now(),
        bytes_in: Arc::default(),
        bytes_out: Arc::default(),
        counters: None,
        error: None,
        _slot: None,
    };
    // Only HTTP/1.1 has `Upgrade`; HTTP/2 forbids it.
    let upgrade = (req.version() == Version::HTTP_11)
        .then(|| headers::upgrade_requested(req.headers()))
        .flatten();
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let mut body = Some(body);
    let result = forward(&front, parts, &mut body, peer, https, upgrade, &mut log).await;
    // Tested before the await: a `&result` held across it would need `Upstream: Sync`.
    if let (true, Some(b)) = (result.is_err(), body) {
        drain(b).await;
    }
    let latency = log.started.elapsed();
    match result {
        Ok((answer, (key, up))) => {
            let Answer {
                mut resp,
                shape_out,
            } = answer;
            log.status = resp.status().as_u16();
            front.metrics().observe(&log.app, log.status, latency);
            let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
            let up_proto = resp.headers().get(header::UPGRADE).cloned();
            headers::strip_hop_by_hop(resp.headers_mut(), up_proto.as_ref().filter(|_| switching));
            match (switching, client_upgrade) {
                (true, Some(client_on)) => {
                    let up_on = hyper::upgrade::on(&mut resp);
                    // The upgraded stream is handed over by the connection future itself.
                    if let Some(drive) = up.into_conn() {
                        front.hub().work().spawn(drive);
                    }
                    front
                        .hub()
                        .work()
                        .spawn(splice_upgrade(client_on, up_on, log));
                    let (parts, _) = resp.into_parts();
                    Response::from_parts(parts, body::full(""))
                }
                _ => {
                    let out = log.bytes_out.clone();
                    let (parts, incoming) = resp.into_parts();
                    let driven = Driven::new(incoming, front.pool().clone(), key, up);
                    let b = Metered::new(driven, out)
                        .shape(shape_out)
                        .guard(log)
                        .boxed();
                    Response::from_parts(parts, b)
                }
            }
        }
        Err(e) => {
            log.status = e.status().as_u16();
            log.error = Some(e.to_string());
            front.metrics().observe(&log.app, log.status, latency);
            let (parts, full) = e.response().into_parts();
            let out = log.bytes_out.clone();
            Response::from_parts(parts, Metered::new(full, out).guard(log).boxed())
        }
    }
}

/// The upstream connection an answer came on, and its pool key.
type Conn = (PoolKey, Upstream);

async fn forward(
    front: &Front,
    mut parts: Parts,
    body: &mut Option<Incoming>,
    peer: SocketAddr,
    https: bool,
    upgrade: Option<HeaderValue>,
    log: &mut RequestLog,
) -> Result<(Answer, Conn), ProxyError> {
    let host = route::request_host(&parts)
        .ok_or(ProxyError::NoHost)?
        .to_owned();
    let active = front.hub().policy().current();
    let app = active
        .policy
        .route_http(&host, &log.path)
        .ok_or_else(|| ProxyError::NoRoute {
            host: host.clone(),
            path: log.path.clone(),
        })?;
    let Listener::Http(http_route) = &app.listener else {
        return Err(ProxyError::NoRoute {
            host,
            path: log.path.clone(),
        });
    };
    log.app = app.name.clone();
    log.device = app.target.device.clone();
    let state = active.state(app);
    log.counters = Some(state.counters.clone());
    let who = Requester::Public { ip: peer.ip() };
    let now = Timestamp::now();
    let method = parts.method.as_str();
    if let Decision::Deny { reason } =
        active
            .policy
            .decide(app, &who, Some(method), Some(&log.path), now)
    {
        state.counters.refused(Refusal::Denied(reason));
        return Err(if reason == DenyReason::Method {
            let allow = KNOWN_METHODS
                .iter()
                .filter(|m| {
                    active
                        .policy
                        .decide(app, &who, Some(m.as_str()), Some(&log.path), now)
                        .is_allow()
                })
                .map(|m| m.to_string())
                .collect();
            ProxyError::MethodNotAllowed {
                app: app.name.clone(),
                method: method.to_owned(),
                allow,
            }
        } else {
            ProxyError::Denied {
                app: app.name.clone(),
                reason,
            }
        });
    }
    if let Err(retry) = state.limits.check_rate(&who) {
        state.counters.refused(Refusal::RateLimited);
        return Err(ProxyError::RateLimited {
            app: app.name.clone(),
            retry_after: retry.0,
        });
    }
    log._slot = Some(state.limits.connect(&who).map_err(|_| {
        state.counters.refused(Refusal::ConnectionLimit);
        ProxyError::TooManyConnections {
            app: app.name.clone(),
        }
    })?);
    let max_body = state.limits.max_body();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let (Some(max), Some(len)) = (max_body, declared) {
        if len > max {
            state.counters.refused(Refusal::BodyTooLarge);
            return Err(ProxyError::BodyTooLarge {
                app: app.name.clone(),
                max,
            });
        }
    }
    state.counters.request();
    let (shape_in, shape_out) = state.limits.shapers();
    let key = PoolKey {
        app: app.name.clone(),
        device: app.target.device.clone(),
        service: app.target.service.clone(),
    };
    let target = route::upstream_target(parts.uri.path_and_query(), http_route);
    let counters = state.counters.clone();
    drop(active);

    headers::strip_hop_by_hop(&mut parts.headers, upgrade.as_ref());
    headers::set_forwarded(&mut parts.headers, peer.ip(), https, &host);
    if !parts.headers.contains_key(header::HOST) {
        if let Ok(v) = HeaderValue::from_str(&host) {
            parts.headers.insert(header::HOST, v);
        }
    }
    parts.uri = Uri::try_from(target).map_err(|_| ProxyError::NoHost)?;
    parts.version = Version::HTTP_11;
    let body = body.take().ok_or(ProxyError::NoHost)?;
    // Fires when the request body is over (sent, failed or dropped): the response timeout
    // counts from then, so a long upload is not cut off as a slow service.
    let (sent_tx, sent_rx) = tokio::sync::oneshot::channel::<()>();
    let body = Metered::new(body, log.bytes_in.clone())
        .limit(max_body)
        .shape(shape_in)
        .guard(sent_tx)
        .boxed();
    let (up, resp) = send(front, &key, peer, Request::from_parts(parts, body), sent_rx)
        .await
        .map_err(|e| match e {
            ProxyError::Upstream { ref error, .. } if is_too_large(error) => {
                counters.refused(Refusal::BodyTooLarge);
                ProxyError::BodyTooLarge {
                    app: key.app.clone(),
                    max: max_body.unwrap_or(0),
                }
            }
            e => e,
        })?;
    Ok((Answer { resp, shape_out }, (key, up)))
}

/// Reads and drops a small request body (see [`DRAIN_MAX`]).
async fn drain(mut body: Incoming) {
    use http_body_util::BodyExt;
    if body.is_end_stream() {
        return;
    }
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        let mut seen = 0;
        while let Some(Ok(f)) = body.frame().await {
            seen += f.data_ref().map_or(0, |d| d.len());
            if seen > DRAIN_MAX {
                return;
            }
        }
    })
    .await;
}

fn is_too_large(e: &hyper::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if s.is::<TooLarge>() {
            return true;
        }
        src = s.source();
    }
    false
}

/// Sends `req` on a pooled connection, or a new one over a new tunnel stream. A pooled
/// connection can turn out closed just as it is used (the service timed it out): a request not
/// yet sent goes once more on a fresh connection; so does one that was sent but the connection
/// ended before any answer, if it may be repeated ([`Replay`]), as nginx does for idempotent
/// requests. The service's close and the request cross in flight, most often with services
/// whose keep-alive timeout is shorter than the pool's (a few seconds is common).
async fn send(
    front: &Front,
    key: &PoolKey,
    peer: SocketAddr,
    mut req: Request<ProxyBody>,
    body_sent: tokio::sync::oneshot::Receiver<()>,
) -> Result<(Upstream, Response<Incoming>), ProxyError> {
    let timeout = front.tuning().response_timeout;
    let deadline = async move {
        let _ = body_sent.await;
        tokio::time::sleep(timeout).await;
    };
    tokio::pin!(deadline);
    let (mut up, mut reused, mut replay) = match front.pool().take(key) {
        Some((up, idle)) => {
            let replay = (idle >= REPLAY_AFTER_IDLE)
                .then(|| Replay::of(&req))
                .flatten();
            (up, true, replay)
        }
        None => (connect(front, key, peer).await?, false, None),
    };
    loop {
        let r = tokio::select! {
            r = up.send(req) => Ok(r),
            _ = &mut deadline => Err(()),
        };
        match r {
            Err(()) => {
                return Err(ProxyError::UpstreamTimeout {
                    app: key.app.clone(),
                    device: key.device.clone(),
                    secs: timeout.as_secs(),
                })
            }
            Ok(Ok(resp)) => return Ok((up, resp)),
            Ok(Err(mut e)) => {
                if let Some(r) = tunnel::stream::StreamRefused::find(e.error()) {
                    return Err(ProxyError::Open {
                        app: key.app.clone(),
                        service: key.service.clone(),
                        error: r.open_error(&key.device),
                    });
                }
                let again = match e.take_message() {
                    // Not sent at all: the connection had closed.
                    Some(unsent) if reused => Some(unsent),
                    // Sent, and the connection ended before any answer: again if repeatable.
                    None if reused && ended_unanswered(e.error()) => {
                        replay.take().map(|r| {
                            debug!(app = %key.app, device = %key.device, error = %e.error(),
                                "pooled connection ended before answering; request sent again on a new one");
                            r.request()
                        })
                    }
                    _ => None,
                };
                let Some(r) = again else {
                    return Err(ProxyError::Upstream {
                        app: key.app.clone(),
                        device: key.device.clone(),
                        error: e.into_error(),
                    });
                };
                req = r;
                reused = false;
                up = connect(front, key, peer).await?;
            }
        }
    }
}

/// A pooled connection idle at least this long may have been closed by the service's
/// keep-alive timeout as the request goes out, so the request's head is kept to send it again
/// ([`Replay`]). Services close idle connections after a second or more (gunicorn 2 s, Node.js
/// and uvicorn 5 s, nginx 75 s); one used a moment ago is not timed out, and one the service
/// meant to close after its last answer said so (`Connection: close`) and was not pooled.
/// Copying the head costs ~2,600 instructions, 3.6 % of a front request (benches/front_cost.sh),
/// so connections reused back to back under load skip it.
const REPLAY_AFTER_IDLE: std::time::Duration = std::time::Duration::from_millis(100);

/// The head of a request that may be sent a second time: an idempotent method (RFC 9110
/// §9.2.2) and no body, so nothing of the client's is consumed by the first attempt.
struct Replay {
    method: Method,
    uri: Uri,
    headers: http::HeaderMap,
}

impl Replay {
    fn of(req: &Request<ProxyBody>) -> Option<Replay> {
        let idempotent = matches!(
            *req.method(),
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        (idempotent && req.body().is_end_stream()).then(|| Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers: req.headers().clone(),
        })
    }

    fn request(self) -> Request<ProxyBody> {
        let mut r = Request::new(body::full(bytes::Bytes::new()));
        *r.method_mut() = self.method;
        *r.uri_mut() = self.uri;
        *r.headers_mut() = self.headers;
        r
    }
}

/// True if a sent request's connection ended before any of the answer came: closed (hyper's
/// "incomplete message") or reset by the service. Not for timeouts or malformed answers.
pub(super) fn ended_unanswered(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() {
        return true;
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(io.kind(), ConnectionReset | ConnectionAborted | BrokenPipe);
        }
        src = s.source();
    }
    false
}

/// A new upstream connection: a tunnel stream to the service, then an HTTP/1.1 handshake.
/// The stream header names the first client; later clients of a pooled connection are told
/// to the service by `X-Forwarded-For`. The stream is opened early: the request follows its
/// header without waiting for the device's reply (one tunnel round trip less for the first
/// request to a service); a refusal then arrives inside the request's error
/// ([`tunnel::stream::StreamRefused`]).
async fn connect(front: &Front, key: &PoolKey, peer: SocketAddr) -> Result<Upstream, ProxyError> {
    let up = front
        .hub()
        .connect_early(&key.device, &key.service, &key.app, Origin::Public(peer))
        .await
        .map_err(|error| ProxyError::Open {
            app: key.app.clone(),
            service: key.service.clone(),
            error,
        })?;
    pool::handshake(TokioIo::new(up))
        .await
        .map_err(|error| ProxyError::Upstream {
            app: key.app.clone(),
            device: key.device.clone(),
            error,
        })
}

/// After a `101 Switching Protocols`, joins the client's and the service's connections.
async fn splice_upgrade(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    mut log: RequestLog,
) {
    match tokio::join!(client, upstream) {
        (Ok(c), Ok(u)) => {
            let mut c = TokioIo::new(c);
            let mut u = TokioIo::new(u);
            match tokio::io::copy_bidirectional(&mut c, &mut u).await {
                Ok((to_up, to_client)) => {
                    log.bytes_in.fetch_add(to_up, Ordering::Relaxed);
                    log.bytes_out.fetch_add(to_client, Ordering::Relaxed);
                }
                Err(e) => log.error = Some(format!("upgraded connection: {e}")),
            }
        }
        (Err(e), _) | (_, Err(e)) => log.error = Some(format!("upgrade failed: {e}")),
    }
    // Dropping `log` writes the request's line, now that the upgraded connection is over.
    drop(log);
}
