//! One request through the gateway: route by host and path → the app's rules → its limits →
//! a pooled upstream connection over a tunnel stream → the response streamed back. An
//! upgrade (WebSocket, …) is spliced byte for byte once both sides agreed to it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::request::Parts;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Body as _;
use policies::accounting::{AppCounters, Refusal};
use policies::{ConnGuard, Decision, DenyReason, Listener, Requester, Timestamp};
use tracing::{debug, info, Instrument};
use tunnel::proto::Origin;

use super::body::{self, Metered, ProxyBody};
use super::errors::ProxyError;
use super::headers;
use super::metrics::NO_APP;
use super::pool::PoolKey;
use super::route;
use super::server::ClientUpgrade;
use super::upstream::{Outgoing, SendError, UpBody, Upgraded, Upstream};
use super::Front;

/// Longest request target (path and query) the front forwards; longer ones are answered 414,
/// as nginx does beyond its 8 KiB request-line buffer.
pub const MAX_TARGET: usize = 8 * 1024;

/// Bytes of a request path written into a log line or an error: a client can send 64 KiB
/// paths, and each request's line (twice, in `path=` and in a 404's `error=`) grew by that
/// much, tying the front's rate to the log's disk.
const LOG_PATH_MAX: usize = 1024;

/// `text` (a request's path or host) as logged: bytes outside printable ASCII
/// percent-encoded, the URL's own escaping (a path may hold any UTF-8: a U+00A0 reads as the
/// space between two fields, so a path could forge `status=` or `client=`, and U+0085 or
/// U+2028 break lines in some viewers); whole up to [`LOG_PATH_MAX`] bytes, else its start
/// and how much was cut. `"` and `=` too: the line's fields are unquoted `key=value` where
/// the value has neither (a raw `"` opened a quote a later field's closed, and strict logfmt
/// readers refuse either in an unquoted value).
pub fn loggable(text: &str) -> std::borrow::Cow<'_, str> {
    // Folded without an early exit: a vector loop over every request's path.
    let plain = text.bytes().fold(true, |ok, b| ok & as_is(b));
    if plain && text.len() <= LOG_PATH_MAX {
        return text.into();
    }
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(text.len().min(LOG_PATH_MAX) + 32);
    for (i, b) in text.bytes().enumerate() {
        if out.len() >= LOG_PATH_MAX {
            // ASCII without spaces: the field stays one unquoted logfmt value.
            out.push_str(&format!("...[{}_more_bytes]", text.len() - i));
            break;
        }
        if as_is(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
    out.into()
}

/// Whether [`loggable`] writes byte `b` as it is: printable ASCII but `"` and `=`.
fn as_is(b: u8) -> bool {
    (b.wrapping_sub(0x21) < 0x5e) & (b != b'"') & (b != b'=')
}

/// A refused request's body is read and discarded up to this size (and for at most
/// [`DRAIN_TIME`]) before answering, so the client sees a clean answer instead of a reset
/// stream (curl reports an HTTP/2 `RST_STREAM` after an early answer as an error). Larger
/// bodies are cut off: a refusal must stay cheap.
const DRAIN_MAX: usize = 64 * 1024;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(1);

/// The status logged for a request given up before its answer (nginx's "client closed
/// request"; no client ever reads it).
const GIVEN_UP: u16 = 499;

/// The per-request log line, written when the response is over (body sent, failed or
/// dropped; for an upgrade, when the spliced connection closes). Also settles the app's byte
/// counters and holds the app's connection slot until then.
struct RequestLog {
    /// The app's names, once routed.
    names: Option<PoolKey>,
    client: SocketAddr,
    method: Method,
    /// The request's target (`path()` is logged): shares the request head's bytes.
    uri: http::Uri,
    status: u16,
    started: Instant,
    /// The request body's byte count, shared with its [`Metered`] body; `None` while the
    /// request has none (most: no allocation for them).
    bytes_in: Option<Arc<AtomicU64>>,
    /// Counted by the response's [`Metered`] body, which holds this log ([`Logged`]).
    bytes_out: u64,
    counters: Option<Arc<AppCounters>>,
    error: Option<String>,
    _slot: Option<ConnGuard>,
    /// The connection is busy with this request until its answer is over.
    _busy: Option<crate::make_room::Busy>,
    /// Where a request given up before its answer is counted (as 499): the others are counted
    /// as their answer comes.
    front: Option<Front>,
}

impl RequestLog {
    fn app(&self) -> &str {
        self.names.as_deref().map_or(NO_APP, |n| &n.app)
    }
    fn device(&self) -> &str {
        self.names.as_deref().map_or("", |n| &n.device)
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let bytes_in = self
            .bytes_in
            .as_ref()
            .map_or(0, |b| b.load(Ordering::Relaxed));
        let bytes_out = self.bytes_out;
        if let Some(c) = &self.counters {
            c.bytes_in(bytes_in);
            c.bytes_out(bytes_out);
        }
        if self.status == 0 {
            // Dropped before any answer: the client left (its HTTP/1 connection closed, its
            // HTTP/2 stream reset) or the gateway stopped — nginx's 499.
            self.status = GIVEN_UP;
            self.error.get_or_insert_with(|| {
                "given up before the answer: the client left or the gateway stopped".into()
            });
            if let Some(front) = &self.front {
                front
                    .metrics()
                    .observe(self.app(), GIVEN_UP, self.started.elapsed());
            }
        }
        let ms = self.started.elapsed().as_millis() as u64;
        info!(
            "{}",
            LineFields {
                log: self,
                bytes_in,
                bytes_out,
                ms,
            }
        );
    }
}

/// The request's log line after the level: `http request app=… device=… client=… method=…
/// path=… status=… bytes_in=… bytes_out=… ms=… error="…"`, the bytes tracing's default format
/// would write for those as event fields (`%` for the names, integers, `error` a quoted
/// string), written as the event's message instead: ten fields through tracing's field visitor
/// and `core::fmt` cost ~2.9k instructions per request; the message assembled on the stack and
/// written once took the gateway's total from 35,827 to 34,052 per request (callgrind,
/// benches/front_cost.sh). What is lost: a subscriber that reads fields does not see these as
/// fields, and a terminal's colours no longer set off their names.
struct LineFields<'a> {
    log: &'a RequestLog,
    bytes_in: u64,
    bytes_out: u64,
    ms: u64,
}

impl LineFields<'_> {
    /// `path`: the request's path as logged ([`loggable`]), made once for both tries.
    fn write_to(&self, w: &mut impl std::fmt::Write, path: &str) -> std::fmt::Result {
        let log = self.log;
        let mut int = itoa::Buffer::new();
        w.write_str("http request app=")?;
        w.write_str(log.app())?;
        w.write_str(" device=")?;
        w.write_str(log.device())?;
        w.write_str(" client=")?;
        crate::addr_text::write_client(w, log.client)?;
        w.write_str(" method=")?;
        w.write_str(&loggable_method(&log.method))?;
        w.write_str(" path=")?;
        w.write_str(path)?;
        w.write_str(" status=")?;
        w.write_str(int.format(log.status))?;
        w.write_str(" bytes_in=")?;
        w.write_str(int.format(self.bytes_in))?;
        w.write_str(" bytes_out=")?;
        w.write_str(int.format(self.bytes_out))?;
        w.write_str(" ms=")?;
        w.write_str(int.format(self.ms))?;
        w.write_str(" error=")?;
        match log.error.as_deref() {
            None | Some("") => w.write_str("\"\""),
            Some(e) => write!(w, "{e:?}"),
        }
    }
}

impl std::fmt::Display for LineFields<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Assembled on the stack, then one write: each write through the formatter costs a
        // dynamic call and the log writer's control-character check. A line too long for the
        // buffer (a long path or error) is written piece by piece instead.
        let mut line = StackLine {
            buf: [0; 256],
            len: 0,
        };
        let path = loggable(self.log.uri.path());
        match self.write_to(&mut line, &path) {
            Ok(()) => f.write_str(line.as_str()),
            Err(_) => self.write_to(f, &path),
        }
    }
}

/// A fixed buffer for [`LineFields`]: a write that does not fit fails.
struct StackLine {
    buf: [u8; 256],
    len: usize,
}

impl StackLine {
    fn as_str(&self) -> &str {
        // Only whole `&str`s were copied in.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl std::fmt::Write for StackLine {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let to = self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        to.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// A response body's counter: its bytes go into the request's log line, which is written when
/// the body is dropped: once written out (the HTTP/1 server drops it after its last write;
/// hyper's HTTP/2 one after the frame that ends it), or unfinished. The log holds its own
/// count: no shared counter to allocate per request.
struct Logged {
    log: Option<RequestLog>,
    /// The body came to its end ([`body::Count::end`]).
    ended: bool,
}

impl Logged {
    fn new(log: RequestLog) -> Self {
        Logged {
            log: Some(log),
            ended: false,
        }
    }
}

impl body::Count for Logged {
    fn add(&mut self, n: u64) -> u64 {
        match &mut self.log {
            Some(log) => {
                log.bytes_out += n;
                log.bytes_out
            }
            None => 0,
        }
    }

    fn failed(&mut self, error: &body::BoxError) {
        if let Some(log) = &mut self.log {
            // The head's status went out already; the line must not read as a clean answer.
            log.error = Some(format!("the answer was cut short: {error}"));
        }
    }

    fn end(&mut self) {
        self.ended = true;
    }
}

thread_local! {
    /// Why the answer whose body is being dropped on this thread was not delivered whole
    /// ([`drop_undelivered`]): read by its [`Logged`], which the server cannot reach through
    /// the boxed body. Empty but for that drop.
    static UNDELIVERED: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Drops an answer's `body` whose writing to the client failed (`why`): its log line says so.
/// The body may have ended already (its last bytes taken, waiting in the socket's or TLS's
/// buffers when the client stopped reading). Or drops a connection's whole future, with the
/// bodies it holds (a drain's grace period over).
pub(super) fn drop_undelivered<T>(body: T, why: &dyn std::fmt::Display) {
    UNDELIVERED.with(|u| *u.borrow_mut() = Some(why.to_string()));
    drop(body);
    UNDELIVERED.with(|u| u.borrow_mut().take());
}

impl Drop for Logged {
    /// Writes the line (by dropping the log). Dropped before its end, or with a write that
    /// failed: the client did not take the whole answer (it left, or read nothing for the
    /// send timeout). The head's status went out; the line says the rest did not, rather
    /// than read as a clean answer.
    fn drop(&mut self) {
        self.settle();
    }
}

impl Logged {
    /// Puts a failure to deliver the answer in the line, if there was one ([`Drop`]).
    fn settle(&mut self) {
        let Some(log) = &mut self.log else { return };
        match UNDELIVERED.with(|u| u.borrow_mut().take()) {
            Some(why) => {
                log.error
                    .get_or_insert_with(|| format!("the answer was not delivered whole: {why}"));
            }
            None if !self.ended => {
                log.error.get_or_insert_with(|| {
                    "the client did not take the whole answer (it left, or read nothing for the send timeout)".into()
                });
            }
            None => {}
        }
    }
}

/// What the proxy got back from the device, ready to be streamed to the client.
struct Answer {
    resp: Response<UpBody>,
    shape_out: policies::bandwidth::Shaper,
    /// The client-to-service shaping a bodiless request did not use: an upgraded connection's
    /// bytes that way are shaped by it.
    shape_in: policies::bandwidth::Shaper,
}

/// Why `method` is not proxied at all, whatever the app: CONNECT asks for a tunnel to another
/// host (a forward proxy's job; hyper would treat a service's 2xx to it as one), TRACE echoes
/// the request — cookies and credentials included — back to a script (cross-site tracing;
/// nginx refuses both), and a method longer than any real one would be written whole into
/// every log line and error answer (HTTP/1 heads refuse them when parsed; HTTP/2 ones reach
/// here).
fn unproxied_method(method: &Method) -> Option<&'static str> {
    if method == Method::CONNECT {
        Some("the gateway is no forward proxy")
    } else if method == Method::TRACE {
        Some("it would echo the request's cookies and credentials")
    } else if method.as_str().len() > super::server_h1::MAX_METHOD {
        Some("the method is longer than any the gateway takes")
    } else {
        None
    }
}

/// `method` as logs and answers show it: clipped to [`super::server_h1::MAX_METHOD`] bytes.
pub fn loggable_method(method: &Method) -> std::borrow::Cow<'_, str> {
    let m = method.as_str();
    match m.get(..super::server_h1::MAX_METHOD) {
        Some(head) if head.len() < m.len() => format!("{head}…").into(),
        _ => m.into(),
    }
}

/// Serves one request. Never fails: every refusal and error becomes a short plain answer.
/// `upgrade`: the client asked for one (HTTP/1.1 only; HTTP/2 forbids `Upgrade`).
pub(crate) async fn handle(
    front: Front,
    req: Request<ProxyBody>,
    peer: SocketAddr,
    https: bool,
    upgrade: Option<ClientUpgrade>,
    // The connection's slots: the request marks it busy while in flight, and an upgraded
    // connection keeps them.
    slots: Option<Arc<super::ConnSlots>>,
) -> Response<ProxyBody> {
    let mut log = RequestLog {
        _busy: slots.as_ref().map(|s| s.busy()),
        names: None,
        client: peer,
        method: req.method().clone(),
        uri: req.uri().clone(),
        status: 0,
        started: Instant::now(),
        bytes_in: None,
        bytes_out: 0,
        counters: None,
        error: None,
        _slot: None,
        front: Some(front.clone()),
    };
    let (upgrade, client_upgrade) = match upgrade {
        Some(u) => (Some(u.protocol), Some(u.conn)),
        None => (None, None),
    };
    // A client waiting for `100 Continue` has sent none of its body: reading it for a refusal
    // would invite the upload just to throw it away.
    // Any of its `Expect` lines, as the front's parser reads them (`Expect: foo` first, then
    // `Expect: 100-continue`, had the upload invited by a `100` then thrown away).
    let awaits_continue = req.headers().get_all(http::header::EXPECT).iter().any(|v| {
        v.as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"100-continue")
    });
    let (parts, body) = req.into_parts();
    // An upgraded connection outlives the request's decision: its host is kept to route and
    // decide it again when the policy or the minute changes.
    let upgrade_host = client_upgrade
        .as_ref()
        .and_then(|_| route::request_host(&parts).map(str::to_owned));
    let mut body = Some(body);
    let asked = upgrade.clone();
    let mut result = forward(&front, parts, &mut body, peer, https, upgrade, &mut log).await;
    if let Ok((answer, key)) = &result {
        if let Some(error) = refused_switch(answer, asked.as_ref()) {
            result = Err(ProxyError::Upstream {
                app: key.app.clone(),
                device: key.device.clone(),
                error,
            });
        }
    }
    // Tested before the await: a `&result` held across it would need `Upstream: Sync`.
    if let (true, false, Some(b)) = (result.is_err(), awaits_continue, body) {
        drain(b).await;
    }
    let latency = log.started.elapsed();
    match result {
        Ok((answer, key)) => {
            let Answer {
                resp,
                shape_out,
                shape_in,
            } = answer;
            log.status = resp.status().as_u16();
            front.metrics().observe(log.app(), log.status, latency);
            // The answer's hop-by-hop headers were left out as it was parsed (h1.rs).
            let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
            match (switching, client_upgrade) {
                (true, Some(client_on)) => {
                    let (parts, up) = resp.into_parts();
                    if let Some(up) = up.into_upgraded() {
                        let shapers = (shape_in, shape_out);
                        // Kept as long as the upgraded connection: a URI sliced out of the
                        // client's read buffer would keep all of it (a head padded to 63 KiB
                        // with a header the gateway strips left 128 KiB per WebSocket).
                        log.uri = detached(&log.uri);
                        let recheck = Recheck {
                            policy: front.hub().policy().clone(),
                            host: upgrade_host.unwrap_or_default(),
                            uri: log.uri.clone(),
                            method: log.method.clone(),
                            ip: peer.ip(),
                            target: log.names.as_deref().map(|n| policies::Target {
                                device: n.device.clone(),
                                service: n.service.clone(),
                            }),
                        };
                        front
                            .hub()
                            .work()
                            // In the connection's span: the connection's own task ends
                            // with the 101, and the splice's lines (a cut to make room)
                            // would otherwise name no client.
                            .spawn(
                                splice_upgrade(client_on, up, log, shapers, slots, recheck)
                                    .in_current_span(),
                            );
                    }
                    Response::from_parts(parts, body::full(""))
                }
                _ => {
                    let (parts, up) = resp.into_parts();
                    let home = up
                        .home(front.pool().clone(), key)
                        .read_timeout(front.tuning().read_timeout);
                    let b = Metered::new(home, Logged::new(log))
                        .shape(shape_out)
                        .boxed();
                    Response::from_parts(parts, b)
                }
            }
        }
        Err(e) => {
            log.status = e.status().as_u16();
            log.error = Some(e.to_string());
            front.metrics().observe(log.app(), log.status, latency);
            let (parts, full) = e.response().into_parts();
            // HTTP/1 leaves a HEAD answer's body out as it writes it; hyper's HTTP/2 server
            // would send it as DATA, which clients refuse (RFC 9113 §8.1.1).
            let full = if log.method == Method::HEAD {
                http_body_util::Full::new(bytes::Bytes::new())
            } else {
                full
            };
            Response::from_parts(parts, Metered::new(full, Logged::new(log)).boxed())
        }
    }
}

/// The `Expect` value of a request expecting anything but `100-continue`, clipped for the
/// answer; None when it expects nothing or only that.
fn unmet_expectation(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::EXPECT)
        .iter()
        .find(|v| {
            !v.as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"100-continue")
        })
        .map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .chars()
                .filter(|c| !c.is_control())
                .take(64)
                .collect()
        })
}

async fn forward(
    front: &Front,
    parts: Parts,
    body: &mut Option<ProxyBody>,
    peer: SocketAddr,
    https: bool,
    upgrade: Option<HeaderValue>,
    log: &mut RequestLog,
) -> Result<(Answer, PoolKey), ProxyError> {
    // Before anything reads the path: routing and each rule's paths normalize it, and a 64 KiB
    // target took that work dozens of times per request.
    let target_len = log.uri.path_and_query().map_or(0, |p| p.as_str().len());
    if target_len > MAX_TARGET {
        return Err(ProxyError::UriTooLong { len: target_len });
    }
    if let Some(why) = unproxied_method(&parts.method) {
        return Err(ProxyError::MethodNotSupported {
            method: loggable_method(&parts.method).into_owned(),
            why,
        });
    }
    // The one expectation HTTP defines is 100-continue (RFC 9110 §10.1.1); another, passed on,
    // would have the service act on what the gateway never agreed to.
    if let Some(e) = unmet_expectation(&parts.headers) {
        return Err(ProxyError::ExpectationFailed { expect: e });
    }
    let host = route::request_host(&parts).ok_or(ProxyError::NoHost)?;
    let active = front.hub().policy().current();
    let app =
        active
            .policy
            .route_http(host, log.uri.path())
            .ok_or_else(|| match policies::is_host(host) {
                true => ProxyError::NoRoute {
                    host: loggable(host).into_owned(),
                    path: loggable(log.uri.path()).into_owned(),
                    why: active.policy.why_no_route(host, log.uri.path()),
                },
                false => ProxyError::BadHost {
                    host: loggable(host).into_owned(),
                },
            })?;
    let Listener::Http(http_route) = &app.listener else {
        return Err(ProxyError::NoRoute {
            host: loggable(host).into_owned(),
            path: loggable(log.uri.path()).into_owned(),
            why: "its app is no http app".into(),
        });
    };
    let state = active.state(app);
    log.names = Some(state.names.clone());
    log.counters = Some(state.counters.clone());
    let who = Requester::Public { ip: peer.ip() };
    let now = Timestamp::now();
    let method = parts.method.as_str();
    let not_allowed = |method: String, allow: Vec<String>| ProxyError::MethodNotAllowed {
        app: app.name.clone(),
        method,
        allow,
    };
    // As `policy explain` tells it: one decision for both.
    if let (Decision::Deny { reason }, allow) =
        active
            .policy
            .decide_http(app, &who, method, log.uri.path(), now)
    {
        state.counters.refused(Refusal::Denied(reason));
        return Err(if reason == DenyReason::Method {
            not_allowed(method.to_owned(), allow)
        } else {
            ProxyError::Denied {
                app: app.name.clone(),
                reason,
            }
        });
    }
    // Frameworks (Laravel, Symfony, Rails' Rack middleware) run a POST carrying a
    // method-override header as that method: it must be one the app allows too. Only apps
    // that name methods look.
    if app.rules.iter().any(|r| !r.methods.is_empty()) {
        let overrides = headers::method_overrides(&parts.headers, parts.uri.query());
        let refused = overrides.iter().find(|over| {
            !active
                .policy
                .decide(app, &who, Some(over.as_str()), Some(log.uri.path()), now)
                .is_allow()
        });
        if let Some(over) = refused {
            state.counters.refused(Refusal::Denied(DenyReason::Method));
            // Clipped as a method is: the value is the client's, of any length.
            let head: String = over.chars().take(super::server_h1::MAX_METHOD).collect();
            let over = match head.len() < over.len() {
                true => format!("{head}…"),
                false => head,
            };
            return Err(not_allowed(
                format!("{method} overridden to {over} (by a method override)"),
                active
                    .policy
                    .allowed_methods(app, &who, log.uri.path(), now),
            ));
        }
    }
    // A body on a method without one (RFC 9110 §9.3.1): a service that ignores it reads it
    // as its next request — one the policy never saw, whose answer could then reach the
    // next client of the pooled connection. HTTP/1 frames a body by its head; HTTP/2 ends a
    // GET's stream with its HEADERS or, some clients, with an empty DATA frame after them:
    // only a declared length counts there (what other DATA such a GET carries is dropped
    // below, not sent).
    let has_body = body.as_ref().is_some_and(|b| {
        if parts.version == http::Version::HTTP_2 {
            b.size_hint().lower() > 0
        } else {
            !b.is_end_stream()
        }
    });
    if matches!(parts.method, Method::GET | Method::HEAD | Method::TRACE) && has_body {
        return Err(ProxyError::BodyNotAllowed {
            method: method.to_owned(),
        });
    }
    if let Some(location) = route::slash_redirect(parts.uri.path_and_query(), http_route) {
        return Err(ProxyError::SlashRedirect { location });
    }
    let rate = state.limits.take_rate(&who).map_err(|retry| {
        state.counters.refused(Refusal::RateLimited);
        ProxyError::RateLimited {
            app: app.name.clone(),
            retry_after: retry.0,
        }
    })?;
    // A request the connection limits refuse gives its token of the rate back: it spent it
    // (a client at its `max_connections_per_client` then got 429s once one ended).
    log._slot = Some(state.limits.connect(&who).map_err(|which| {
        rate.give_back();
        state.counters.refused(Refusal::ConnectionLimit);
        ProxyError::TooManyConnections {
            app: app.name.clone(),
            which,
        }
    })?);
    let max_body = state.limits.max_body();
    // A declared length is the body's exact size: the HTTP/1 server and hyper's HTTP/2 both
    // parsed and checked `Content-Length` already.
    let declared = body.as_ref().and_then(|b| b.size_hint().exact());
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
    let mut shape_in = Some(shape_in);
    // An upgrade request with a body: the body takes `shape_in`, and the upgraded
    // connection's uploads would have gone unshaped. Its own (the app's bucket is shared).
    let upgrade_in = upgrade.is_some().then(|| state.limits.shapers().0);
    let key = state.names.clone();
    let target = route::upstream_target(parts.uri.path_and_query(), http_route);
    // Only apps that strip a prefix have one to tell (an allocation for those only).
    let prefix =
        (http_route.strip_prefix && http_route.path != "/").then(|| http_route.path.clone());
    let counters = state.counters.clone();
    drop(active);

    // The request line and `Host` are written as they are: built from what the server parsed,
    // the target holds no space or control byte and the host no control byte; and must not.
    // UTF-8 past ASCII (a raw path from curl or a script) is escaped in the path's normal
    // form, which is what is sent; in a target that has none (the query, a path that could not
    // be normalized) it passes as it came, as nginx passes it, but for the C1 controls
    // (U+0080..U+009F): Python's http.server splits request lines at U+0085 as at a space.
    if !writable_head(&target, host) {
        return Err(ProxyError::BadTarget);
    }
    let body = body.take().ok_or(ProxyError::NoHost)?;
    // An HTTP/2 GET whose stream ends after its HEADERS (an empty DATA frame) has no body
    // to send: sent as it is, it went up chunked, and a service ignoring GET bodies read the
    // chunk framing as another request. What DATA such a GET carries is not passed on.
    let body = if matches!(parts.method, Method::GET | Method::HEAD | Method::TRACE)
        && !body.is_end_stream()
    {
        super::body::full("")
    } else {
        body
    };
    // `sent` fires when the request body is over (sent, failed or dropped): the response
    // timeout counts from then, so a long upload is not cut off as a slow service. A bodiless
    // request (most) has nothing to count, cap or shape, and its timeout counts from now.
    let (body, sent) = if body.is_end_stream() {
        (body, None)
    } else {
        let (sent_tx, sent_rx) = tokio::sync::oneshot::channel::<()>();
        let bytes_in = log.bytes_in.get_or_insert_with(Arc::default).clone();
        let taken = bytes_in.clone();
        let body = Metered::new(body, bytes_in)
            .limit(max_body)
            .shape(shape_in.take().unwrap_or_default())
            .guard(sent_tx)
            .boxed();
        (body, Some((sent_rx, taken)))
    };
    let fwd_host = route::forwarded_host(host);
    let fwd = headers::Forwarded {
        client: peer.ip(),
        https,
        host: &fwd_host,
        upgrade: upgrade.as_ref(),
        prefix: prefix.as_deref(),
    };
    let out = Outgoing::new(&parts.method, &target, &parts.headers, &fwd, body);
    let resp = send(front, &key, peer, out, sent).await.map_err(|e| {
        // The client's body failing on the way up is the client's doing, not the device's.
        let ProxyError::Upstream { error, .. } = &e else {
            return e;
        };
        let Some(body_error) = error.request_body() else {
            return e;
        };
        if error.too_large() {
            counters.refused(Refusal::BodyTooLarge);
            return ProxyError::BodyTooLarge {
                app: key.app.clone(),
                max: max_body.unwrap_or(0),
            };
        }
        match error.body_stalled() {
            Some(stalled) => ProxyError::BodyStalled {
                secs: stalled.0.as_secs(),
            },
            None => ProxyError::ClientBody {
                reason: body_error.to_string(),
            },
        }
    })?;
    let shape_in = shape_in.or(upgrade_in).unwrap_or_default();
    Ok((
        Answer {
            resp,
            shape_out,
            shape_in,
        },
        key,
    ))
}

/// Reads and drops a small request body (see [`DRAIN_MAX`]).
async fn drain(mut body: ProxyBody) {
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

/// Sends `out` on a pooled connection, or a new one over a new tunnel stream. A pooled
/// connection can turn out closed just as it is used (the service timed it out): a request
/// not yet sent goes once more on a fresh connection; so does one that was sent but the
/// connection ended before any answer, if it may be repeated ([`SendError::again`]), as nginx
/// does for idempotent requests; and a safe one whose tunnel was lost before the answer. The service's close and the request cross in flight, most
/// often with services whose keep-alive timeout is shorter than the pool's (a few seconds is
/// common).
async fn send(
    front: &Front,
    key: &PoolKey,
    peer: SocketAddr,
    mut out: Outgoing,
    body_sent: Option<(tokio::sync::oneshot::Receiver<()>, Arc<AtomicU64>)>,
) -> Result<Response<UpBody>, ProxyError> {
    let timeout = front.tuning().response_timeout;
    // A client that stops sending its body is answered 408 after `body_timeout` without
    // progress; a service that stops taking it must not be blamed first.
    let taking = timeout + front.tuning().body_timeout;
    let deadline = async move {
        if let Some((mut sent, taken)) = body_sent {
            // While the body goes up, the service must take some of it every `taking` (like
            // nginx's `proxy_send_timeout`): one that stopped reading would otherwise hold the
            // request, its client and its stream for ever, the answer's timer never started.
            loop {
                let before = taken.load(Ordering::Relaxed);
                match tokio::time::timeout(taking, &mut sent).await {
                    Ok(_) => break,
                    Err(_) if taken.load(Ordering::Relaxed) == before => return true,
                    Err(_) => {}
                }
            }
        }
        tokio::time::sleep(timeout).await;
        false
    };
    tokio::pin!(deadline);
    // A kept connection only while the device still offers the service: one that is
    // stopping lets its streams finish but takes no new requests (they would be cut).
    let pooled = match front.hub().offers_tcp(&key.device, &key.service) {
        true => front.pool().take(key),
        false => None,
    };
    let (mut up, reused) = match pooled {
        Some(up) => (up, true),
        None => (connect(front, key, peer).await?, false),
    };
    let mut retried = false;
    loop {
        let r = tokio::select! {
            r = up.send(out) => Ok(r),
            upload_stalled = &mut deadline => Err(upload_stalled),
        };
        match r {
            Err(upload_stalled) => {
                return Err(ProxyError::UpstreamTimeout {
                    app: key.app.clone(),
                    device: key.device.clone(),
                    secs: match upload_stalled {
                        true => taking.as_secs(),
                        false => timeout.as_secs(),
                    },
                    upload_stalled,
                })
            }
            Ok(Ok(resp)) => return Ok(resp),
            Ok(Err(SendError { error, again })) => {
                if let Some(r) = error.refused() {
                    return Err(ProxyError::Open {
                        app: key.app.clone(),
                        service: key.service.clone(),
                        error: r.open_error(&key.device),
                    });
                }
                // As a waiting open's timeout (504, "did not answer in time"), not a 502
                // blaming the service's HTTP.
                if error.reply_timed_out() {
                    return Err(ProxyError::Open {
                        app: key.app.clone(),
                        service: key.service.clone(),
                        error: tunnel::OpenError::Timeout(key.device.clone()),
                    });
                }
                match again {
                    // Once: a kept connection the service closed as the request crossed it,
                    // or a tunnel lost under a safe request (the device's agent reconnected).
                    Some(o) if !retried && (reused || error.tunnel_lost()) => {
                        debug!(app = %key.app, device = %key.device, %error, reused,
                            "connection ended before answering; request sent again on a new one");
                        out = o;
                        retried = true;
                        up = connect(front, key, peer).await?;
                    }
                    _ => {
                        return Err(ProxyError::Upstream {
                            app: key.app.clone(),
                            device: key.device.clone(),
                            error,
                        })
                    }
                }
            }
        }
    }
}

/// A new upstream connection: a tunnel stream to the service. The stream header names the first client; later clients of a pooled connection are told
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
    Ok(Upstream::new(up))
}

/// Why a `101` answer may not reach the client: the request asked for no upgrade, the
/// service switched to a protocol the client did not offer, or it switched before the
/// request's body was all sent (the upgraded bytes start after the answer, and the service
/// would read the client's first frames as the rest of the body). `None` for any other answer.
fn refused_switch(
    answer: &Answer,
    asked: Option<&HeaderValue>,
) -> Option<super::upstream::UpstreamError> {
    use super::upstream::UpstreamError::{EarlySwitch, UnaskedSwitch};
    if answer.resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return None;
    }
    if asked.is_some() && answer.resp.body().upload_unfinished() {
        return Some(EarlySwitch);
    }
    unasked_switch(answer, asked).map(UnaskedSwitch)
}

/// [`refused_switch`]'s first two reasons.
fn unasked_switch(answer: &Answer, asked: Option<&HeaderValue>) -> Option<String> {
    let Some(asked) = asked else {
        return Some("the request asked for no upgrade".into());
    };
    let to = answer.resp.headers().get(http::header::UPGRADE);
    // Protocol tokens, compared case-insensitively, without versions' surrounding spaces.
    let tokens = |v: &HeaderValue| -> Vec<Vec<u8>> {
        v.as_bytes()
            .split(|&c| c == b',')
            .map(|t| t.trim_ascii().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    };
    let offered = tokens(asked);
    match to.map(tokens).as_deref() {
        Some([chosen]) if offered.contains(chosen) => None,
        Some(chosen) => Some(format!(
            "to {:?}, not one of the {:?} offered",
            String::from_utf8_lossy(&chosen.join(&b", "[..])),
            String::from_utf8_lossy(&offered.join(&b", "[..]))
        )),
        None => Some("no Upgrade header".into()),
    }
}

/// What an upgraded connection's request was, to decide it again whenever the policy or the
/// minute changes: it must still route to the app it was routed to, and be allowed there.
struct Recheck {
    policy: Arc<policies::PolicyStore>,
    host: String,
    uri: http::Uri,
    method: Method,
    ip: std::net::IpAddr,
    /// Where the request went: an app renamed, or another app in its place with the same
    /// target, keeps the connection.
    target: Option<policies::Target>,
}

impl Recheck {
    /// Resolves with the reason once the request is no longer allowed.
    async fn until_refused(&self) -> String {
        self.policy.until_refused(|a| self.allowed(a)).await
    }

    fn allowed(&self, active: &policies::Active) -> Result<(), String> {
        let path = self.uri.path();
        let app = active.policy.route_http(&self.host, path);
        let Some(target) = &self.target else {
            return Err("the request was routed to no app".into());
        };
        let who = Requester::Public { ip: self.ip };
        active.decide_again(app, target, &who, Some(self.method.as_str()), Some(path))
    }
}

/// `uri` in memory of its own (not a slice of the buffer it was read into).
fn detached(uri: &http::Uri) -> http::Uri {
    http::Uri::from_maybe_shared(bytes::Bytes::copy_from_slice(uri.to_string().as_bytes()))
        .unwrap_or_else(|_| uri.clone())
}

/// After a `101 Switching Protocols`, joins the client's and the service's connections,
/// shaped like the app's other traffic (`bandwidth`, `bandwidth_per_connection`): (client →
/// service, service → client), until either ends or the policy no longer allows the request.
async fn splice_upgrade(
    client: tokio::sync::oneshot::Receiver<Upgraded>,
    mut u: Upgraded,
    mut log: RequestLog,
    (shape_in, shape_out): (policies::bandwidth::Shaper, policies::bandwidth::Shaper),
    // Held until the upgraded connection ends: it counts against the front's limits, and
    // may be picked to make room there.
    slots: Option<Arc<super::ConnSlots>>,
    recheck: Recheck,
) {
    // An upgraded connection is no request in flight: a quiet WebSocket may make room.
    log._busy = None;
    match client.await {
        Ok(mut c) => {
            let stop = async {
                let why = recheck.until_refused().await;
                format!("the policy no longer allows it ({why})")
            };
            // Counted as the bytes move (a WebSocket may stay open for days), so not again
            // when the log line is written.
            let counters = log.counters.take().unwrap_or_default();
            let (mut c, mut u) = tunnel::splice::counted(&mut c, &mut u, &counters);
            let m = if shape_in.is_unlimited() && shape_out.is_unlimited() {
                tunnel::splice::splice_until(&mut c, &mut u, stop).await
            } else {
                tunnel::splice::splice_shaped_until(&mut c, &mut u, &shape_in, &shape_out, stop)
                    .await
            };
            log.bytes_in = Some(Arc::new(AtomicU64::new(m.a_to_b)));
            log.bytes_out = m.b_to_a;
            let evicted = slots.as_ref().is_some_and(|s| s.note_eviction());
            log.error = match (m.stopped, m.error) {
                _ if evicted => Some(format!("upgraded connection cut: {}", super::EVICTED)),
                (Some(why), _) => Some(format!("upgraded connection cut: {why}")),
                (None, Some(e)) => Some(format!("upgraded connection: {e}")),
                (None, None) => None,
            };
        }
        Err(_) => log.error = Some("upgrade failed: the client's connection ended first".into()),
    }
    // Dropping `log` writes the request's line, now that the upgraded connection is over.
    drop(log);
}

/// Whether a request line with `target` and a `Host` of `host` may be written to a service
/// ([`forward`]'s check; the fuzz target skips what it refuses): the target has no space or
/// control byte, and past ASCII (passed as it came, as nginx passes it) no C1 control —
/// Python's http.server splits request lines at U+0085 as at a space; the host no control
/// byte.
#[doc(hidden)]
pub fn writable_head(target: &str, host: &str) -> bool {
    let c1 = |t: &str| t.chars().any(|c| ('\u{80}'..='\u{9f}').contains(&c));
    target
        .bytes()
        .all(|b| b.is_ascii_graphic() || !b.is_ascii())
        && (target.is_ascii() || !c1(target))
        && !host.bytes().any(|b| b.is_ascii_control())
}
#[cfg(test)]
mod tests {
    use super::*;

    fn log(path: &str, error: Option<&str>) -> RequestLog {
        RequestLog {
            names: Some(Arc::new(policies::AppNames {
                app: "web".into(),
                device: "n1".into(),
                service: "www".into(),
            })),
            client: "127.0.0.1:33680".parse().unwrap(),
            method: Method::GET,
            uri: path.parse().unwrap(),
            status: 200,
            started: Instant::now(),
            bytes_in: None,
            bytes_out: 0,
            counters: None,
            error: error.map(str::to_owned),
            _slot: None,
            _busy: None,
            front: None,
        }
    }

    /// An answer is logged as delivered only when its body ended and no write of it failed:
    /// a write that failed after the body's last bytes were taken (waiting in the socket's
    /// or TLS's buffers for a client that stopped reading) read as a clean answer.
    #[test]
    fn an_answer_is_logged_as_delivered_only_when_its_writes_went_through() {
        let settled = |ended: bool, undelivered: Option<&str>| {
            let mut l = Logged::new(log("/", None));
            l.ended = ended;
            if let Some(why) = undelivered {
                UNDELIVERED.with(|u| *u.borrow_mut() = Some(why.to_owned()));
            }
            l.settle();
            // Taken by the one that settled.
            assert!(UNDELIVERED.with(|u| u.borrow().is_none()));
            l.log.as_ref().and_then(|log| log.error.clone())
        };
        assert_eq!(settled(true, None), None);
        assert!(settled(false, None).is_some_and(|e| e.contains("did not take the whole answer")));
        assert_eq!(
            settled(true, Some("the client read nothing for 60s")).as_deref(),
            Some("the answer was not delivered whole: the client read nothing for 60s")
        );
        // Through the boxed body, as the HTTP/1 server drops it; nothing left behind.
        let body = Metered::new(
            http_body_util::Full::new(bytes::Bytes::from_static(b"x")),
            Logged::new(log("/", None)),
        )
        .boxed();
        drop_undelivered(body, &"gone");
        assert!(UNDELIVERED.with(|u| u.borrow().is_none()));
    }

    fn line(log: &RequestLog) -> String {
        LineFields {
            log,
            bytes_in: 0,
            bytes_out: 3,
            ms: 2,
        }
        .to_string()
    }

    #[test]
    fn log_line_reads_as_the_fields_would() {
        // The bytes tracing's default format writes for `app = %…, device = %…, client = %…,
        // method = %…, path = %…, status, bytes_in, bytes_out, ms, error` (src/logging tests).
        assert_eq!(
            line(&log("/", None)),
            "http request app=web device=n1 client=127.0.0.1:33680 method=GET path=/ \
             status=200 bytes_in=0 bytes_out=3 ms=2 error=\"\""
        );
        assert_eq!(
            line(&log("/a", Some("upstream said \"no\"\n"))),
            "http request app=web device=n1 client=127.0.0.1:33680 method=GET path=/a \
             status=200 bytes_in=0 bytes_out=3 ms=2 error=\"upstream said \\\"no\\\"\\n\""
        );
        let mut unrouted = log("/", None);
        unrouted.names = None;
        assert!(line(&unrouted).starts_with(&format!("http request app={NO_APP} device= ")));
    }

    #[test]
    fn a_log_line_longer_than_the_stack_buffer_is_written_whole() {
        let path = format!("/{}", "p".repeat(400));
        let long = line(&log(&path, Some(&"e".repeat(300))));
        assert!(
            long.contains(&format!(" path={path} status=200 ")),
            "{long}"
        );
        assert!(
            long.ends_with(&format!("error=\"{}\"", "e".repeat(300))),
            "{long}"
        );
        // Right at the edge: a line that just fits, and one byte more.
        let base = line(&log("/", None)).len();
        for extra in [256 - base, 257 - base] {
            let p = format!("/{}", "q".repeat(extra));
            assert_eq!(line(&log(&p, None)).len(), base + extra);
        }
    }

    #[test]
    fn a_huge_path_is_logged_clipped_with_what_was_cut() {
        let path = format!("/{}", "z".repeat(60_000));
        let l = line(&log(&path, None));
        let shown = format!(
            " path=/{}...[58977_more_bytes] status=200 ",
            "z".repeat(1023)
        );
        assert!(l.contains(&shown), "{}", &l[..200]);
        assert!(l.len() < 1200, "{}", l.len());
        assert_eq!(loggable("/short"), "/short");
        // Nothing in a path can pass for a field or a line break.
        assert_eq!(
            loggable("/x\u{a0}status=200\u{85}\u{2028}é"),
            "/x%C2%A0status%3D200%C2%85%E2%80%A8%C3%A9"
        );
        // Nor a quote that a later field's value would close.
        assert_eq!(loggable("/a\"b=c"), "/a%22b%3Dc");
    }
}
