//! The public HTTP(S) front: terminates HTTP/1.1 and HTTP/2 (TLS with SNI and ALPN, or
//! plain), routes each request by host and path to an app of the policy, and proxies it to
//! the app's device service through the tunnel.
//!
//! # Layout
//! - [`Front`] (here): accept loops, one task per connection (TLS handshake with a timeout,
//!   then HTTP/1.x by [`server`], or HTTP/2 by hyper when ALPN or the preface says so),
//!   graceful drain.
//! - [`server`]: one client connection's HTTP/1.x; [`server_h1`]: its wire format (sans-IO,
//!   fuzzed); `h2`: one client connection's HTTP/2 (hyper's, with idle and stall cuts).
//! - [`proxy`]: one request: policy, limits, upstream, upgrades, the per-request log line.
//! - [`route`]: the host a request names and the path the service sees.
//! - [`headers`]: hop-by-hop stripping and `X-Forwarded-*`.
//! - [`upstream`]: the HTTP/1.1 client toward device services, over tunnel streams;
//!   [`h1`]: its wire format (sans-IO, fuzzed); [`pool`]: its idle connections.
//! - [`body`]: streamed, counted, shaped bodies; [`deadline`]: one-timer deadlines;
//!   [`outbox`]: a response's bytes on their way out, large chunks not copied.
//! - [`errors`]: what went wrong, whose fault it was, and the short answer a client gets.
//! - [`tls`]: rustls configuration: SNI certificate choice, self-signed fallback;
//!   [`plain_on_tls`]: the answer to plain HTTP sent to the HTTPS port.
//! - [`reset`]: a client connection ended by a reset, for an answer cut short.
//! - [`metrics`], [`status_page`]: the admin API's `/metrics` and `/`.

pub mod body;
pub mod deadline;
pub mod errors;
pub mod h1;
mod h2;
pub use h2::RESTING_TIMEOUTS;
pub mod headers;
pub mod metrics;
pub mod outbox;
pub mod plain_on_tls;
pub mod pool;
pub mod proxy;
mod reset;
pub mod route;
pub mod server;
pub mod server_h1;
pub mod status_page;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, Instrument};
use tunnel::hub::Hub;

use self::metrics::{ConnRefusal, HttpMetrics, Unserved};
use self::pool::Pool;
use self::reset::{ResetOnClose, Resettable};
use self::server::Served;
use self::upstream::Io;
use crate::make_room::{Held, Stamped};
use crate::per_ip::{self, Full, PerIp};

/// Public HTTP connections open at once, both listeners together. Each costs a file
/// descriptor and a task; beyond this a new connection gets in only by ending the longest-idle
/// connection of the client holding the most (at least two more than the newcomer), else it is
/// closed at once: a flood cannot exhaust descriptors the tunnel needs, and a few addresses
/// holding idle or stalled connections (16 at the per-address default) cannot lock everyone
/// else out ([`crate::make_room`]).
pub const MAX_CONNECTIONS: usize = 16_384;
/// Default of [`HttpTuning::max_connections_per_ip`]: a sixteenth of [`MAX_CONNECTIONS`],
/// room for a whole office or campus behind one NAT address.
pub const MAX_CONNECTIONS_PER_IP: usize = 1_024;
/// Concurrent HTTP/2 streams per client connection: a browser needs far fewer; a bound keeps
/// one connection from opening thousands of tunnel streams.
pub const MAX_H2_STREAMS: u32 = 128;

/// What an open front connection holds: its slot of [`MAX_CONNECTIONS`] and of its client's
/// per-address limit, and the signal that ends it to make room. An upgraded connection (a
/// WebSocket) outlives the task that served its HTTP: the splice that carries it on keeps
/// these until it ends.
pub(crate) struct ConnSlots {
    _ip: per_ip::IpSlot,
    held: Arc<Held>,
    /// Counts the eviction in its metrics.
    front: Front,
}

impl ConnSlots {
    /// Whether the connection was cut to make room for another client: counted (once, by
    /// whichever of its tasks asks first: the HTTP one, or an upgrade's splice) and logged.
    pub(crate) fn note_eviction(&self) -> bool {
        if !self.held.is_evicted() {
            return false;
        }
        if self.front.0.metrics.evicted_connection(&self.held) {
            info!(idle_s = self.held.idle_secs(), "{EVICTED}");
        }
        true
    }

    /// Bytes written to the client so far.
    pub(crate) fn sent(&self) -> u64 {
        self.held.sent()
    }

    /// A request in flight on the connection, until dropped: a connection serving one is
    /// picked last to make room (a long poll is quiet, not idle).
    pub(crate) fn busy(&self) -> crate::make_room::Busy {
        self.held.busy()
    }
}

/// Why a front connection was cut ([`ConnSlots::note_eviction`]), in its log line.
pub(crate) const EVICTED: &str = "HTTP connection cut to make room: the front was at its limit of open connections (all clients together) and this client held the most; this was its idlest connection (between requests, if it had one)";

/// Timeouts of the front.
#[derive(Debug, Clone, Copy)]
pub struct HttpTuning {
    /// Time a client has to send a request's headers (slowloris defence; HTTP/1.1).
    pub header_read_timeout: Duration,
    /// Time a device's service has to start answering (response headers) → else 504.
    pub response_timeout: Duration,
    /// Time a service may pause in the middle of its answer → else the client's connection
    /// (an HTTP/2 client's stream) is cut, the answer being incomplete (nginx's
    /// `proxy_read_timeout`, there 60 s: here longer, for event streams without heartbeats).
    pub read_timeout: Duration,
    /// Time a client has to finish the TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Time a client may leave a response unread before its connection is closed (HTTP/1:
    /// taking less than 16 KiB of it; HTTP/2: granting no flow-control credit for it).
    pub send_timeout: Duration,
    /// Time a client may leave its request body stalled before the request is answered 408
    /// (HTTP/1: and its connection closed; HTTP/2: its stream reset, the connection goes on).
    pub body_timeout: Duration,
    /// Time an HTTP/2 connection may go without an open request before it is closed (GOAWAY;
    /// nginx's `keepalive_timeout` is 75 s). HTTP/1 connections wait `header_read_timeout` for
    /// their next request. Without it an HTTP/2 client that only answers pings held a
    /// connection slot for ever: 16,384 of them locked everyone out.
    pub h2_idle_timeout: Duration,
    /// Connections one client address (IPv6: its /64) may have open at once; beyond, new ones
    /// are closed at once ([`per_ip`]).
    pub max_connections_per_ip: usize,
    /// Connections all clients may have open at once (at most [`MAX_CONNECTIONS`]); beyond,
    /// room is made or the new one closed (see [`MAX_CONNECTIONS`]).
    pub max_connections: usize,
}

impl Default for HttpTuning {
    fn default() -> Self {
        HttpTuning {
            header_read_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(60),
            read_timeout: Duration::from_secs(300),
            tls_handshake_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            h2_idle_timeout: Duration::from_secs(60),
            max_connections_per_ip: MAX_CONNECTIONS_PER_IP,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

struct Inner {
    hub: Hub,
    pool: Arc<Pool>,
    metrics: HttpMetrics,
    tuning: HttpTuning,
    /// Per client and in all ([`MAX_CONNECTIONS`]), making room when full.
    per_ip: Arc<PerIp>,
}

/// The HTTP front of a gateway. Cheap to clone.
#[derive(Clone)]
pub struct Front(Arc<Inner>);

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front")
            .field("pool", &self.0.pool)
            .field("tuning", &self.0.tuning)
            .finish()
    }
}

impl Front {
    pub fn new(hub: Hub, tuning: HttpTuning) -> Self {
        Front(Arc::new(Inner {
            hub,
            pool: Pool::new(),
            metrics: HttpMetrics::default(),
            tuning,
            per_ip: PerIp::making_room(
                tuning.max_connections_per_ip,
                tuning.max_connections,
                "HTTP connections",
                "http_connections_per_ip",
            ),
        }))
    }

    pub fn hub(&self) -> &Hub {
        &self.0.hub
    }
    pub fn pool(&self) -> &Arc<Pool> {
        &self.0.pool
    }
    pub fn metrics(&self) -> &HttpMetrics {
        &self.0.metrics
    }
    pub fn tuning(&self) -> &HttpTuning {
        &self.0.tuning
    }

    /// Accepts on `listener` until `shutdown`, with TLS when `tls` is given. Connections run
    /// as tracked work of the hub, so the gateway's drain waits for requests in flight; on
    /// shutdown each connection finishes its current requests and closes.
    pub async fn serve(
        self,
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
        shutdown: CancellationToken,
    ) {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let local = listener.local_addr();
        if let Ok(a) = local {
            info!(addr = %a, scheme, "HTTP front listening");
        }
        // For the https:// address told to a plain HTTP request sent here.
        let port = local.map_or(443, |a| a.port());
        // A client gone without a word holds no upgraded (WebSocket) or long-polling
        // connection for ever.
        tunnel::sockets::keepalive_accepted(&listener, self.0.hub.tuning().tcp_keepalive);
        // A client's unread answer waits in the tunnel's flow control rather than in the
        // kernel, and its progress shows as it reads (the send timeout, the held streams).
        tunnel::sockets::bound_unsent_accepted(&listener);
        while let Some((tcp, peer)) = tunnel::sockets::accept_until(&listener, &shutdown).await {
            // On a dual-stack `[::]` listener IPv4 clients arrive as `::ffff:a.b.c.d`: logs,
            // X-Forwarded-For and the policy see them as the IPv4 addresses they are.
            let peer = tunnel::sockets::canonical(peer);
            // Per client first: one client at its limit must not take the last free slots.
            let slot = match self.0.per_ip.try_admit(peer.ip()) {
                Ok(slot) => slot,
                Err(Full::Client) => {
                    self.0.metrics.refused_connection(ConnRefusal::PerIp);
                    continue;
                }
                Err(Full::Total) => match self.0.per_ip.admit_making_room(peer.ip()) {
                    Some(slot) => slot,
                    None => {
                        debug!(client = %peer, "connection refused: the front's connections all open, and no room could fairly be made");
                        self.0.metrics.refused_connection(ConnRefusal::Full);
                        continue;
                    }
                },
            };
            // The table always makes room; a stand-in is never evicted.
            let held = slot.held().cloned().unwrap_or_else(Held::new);
            let slots = Arc::new(ConnSlots {
                _ip: slot,
                held: held.clone(),
                front: self.clone(),
            });
            let _ = tcp.set_nodelay(true);
            // Its client's bytes moving either way keep it from being the idlest.
            let (tcp, reset) = Resettable::new(tcp);
            let tcp = Stamped::ending(tcp, held.clone());
            let front = self.clone();
            let tls = tls.clone();
            let shutdown = shutdown.clone();
            let grace_over = self.0.hub.grace_over().clone();
            let span = tracing::info_span!("http", client = %peer, scheme);
            self.0.hub.work().spawn(
                async move {
                    let served = async {
                        match tls {
                            None => {
                                front
                                    .serve_h1(Box::new(tcp), peer, false, shutdown, &slots, &reset)
                                    .await
                            }
                            Some(acc) => {
                                let t = front.0.tuning.tls_handshake_timeout;
                                let until = tokio::time::Instant::now() + t;
                                // Looked at, not read: plain HTTP (`http://` to this port) is
                                // answered in HTTP, not with a TLS alert.
                                let mut first = [0u8; 1];
                                let peek = tcp.get_ref().peek(&mut first);
                                let peeked = tokio::time::timeout_at(until, peek).await;
                                match peeked {
                                    Ok(Ok(1)) if plain_on_tls::starts_plain_http(first[0]) => {
                                        return front
                                            .answer_plain_http(Box::new(tcp), port, shutdown)
                                            .await;
                                    }
                                    // Closed before a byte (a TCP health check, a port scan):
                                    // no handshake failed.
                                    Ok(Ok(0)) => return,
                                    _ => {}
                                }
                                match tokio::time::timeout_at(until, acc.accept(tcp)).await {
                                    Ok(Ok(s)) if s.get_ref().1.alpn_protocol() == Some(b"h2") => {
                                        // Dead HTTP/2 peers are found by pings, which start
                                        // after the preface; one that does not send the whole
                                        // preface after its handshake is dropped by the
                                        // deadline (HTTP/1's head timeout covers that case).
                                        let t = front.0.tuning.header_read_timeout;
                                        let preface = server_h1::H2_PREFACE.len();
                                        let s = FirstReadDeadline::new(s, t, preface);
                                        h2::serve(front, s, peer, true, shutdown, slots.clone())
                                            .await
                                    }
                                    Ok(Ok(s)) => {
                                        front
                                            .serve_h1(
                                                Box::new(s),
                                                peer,
                                                true,
                                                shutdown,
                                                &slots,
                                                &reset,
                                            )
                                            .await
                                    }
                                    Ok(Err(e)) => {
                                        debug!(error = %e, "TLS handshake failed");
                                        front.0.metrics.unserved(Unserved::TlsFailed);
                                    }
                                    Err(_) => {
                                        debug!("TLS handshake timed out");
                                        front.0.metrics.unserved(Unserved::TlsTimeout);
                                    }
                                }
                            }
                        }
                    };
                    // Evicted: dropped, whatever it waited on (a quiet upstream answer, a
                    // request body its service does not read); its stream fails too, for an
                    // upgrade's splice that outlives this task. Still open when a drain's
                    // grace period runs out: dropped, an answer in flight logged as cut by
                    // the gateway (it read as the client's doing, after "gateway stopped").
                    let mut served = Box::pin(served);
                    let cut = tokio::select! {
                        biased;
                        () = &mut served => false,
                        () = held.until_evicted() => false,
                        () = grace_over.cancelled() => true,
                    };
                    match cut {
                        true => proxy::drop_undelivered(served, &tunnel::hub::GRACE_CUT),
                        false => drop(served),
                    }
                    slots.note_eviction();
                    drop(slots);
                }
                .instrument(span),
            );
        }
        self.0.pool.close();
    }

    /// Counts a connection [`server::serve`] served no request on.
    fn unserved(&self, why: server::Unserved) {
        match why {
            server::Unserved::Refused(status) => self.0.metrics.refused_unread(status.as_u16()),
            server::Unserved::NoHead => self.0.metrics.unserved(Unserved::NoHead),
        }
    }

    /// Answers a plain HTTP connection to the HTTPS port listening on `port`: its first
    /// request gets a 400 with the https:// address to use, then the connection closes.
    async fn answer_plain_http(self, io: Box<dyn Io>, port: u16, shutdown: CancellationToken) {
        let cfg = server::Config {
            header_read_timeout: self.0.tuning.header_read_timeout,
            send_timeout: self.0.tuning.send_timeout,
            body_timeout: self.0.tuning.body_timeout,
            sniff_h2: false,
        };
        // Cancelled by the answer: it goes out with `Connection: close`, and the connection
        // closes after it (lingering, so an unread body does not turn the close into a reset).
        let done = shutdown.child_token();
        let end = done.clone();
        let metrics = self.clone();
        let refused = self.clone();
        server::serve(
            io,
            cfg,
            done,
            move |req, _upgrade| {
                end.cancel();
                let (parts, _body) = req.into_parts();
                let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                let host = route::request_host(&parts);
                // A target longer than the front forwards is not echoed (nor its host).
                let address = (target.len() <= proxy::MAX_TARGET)
                    .then(|| plain_on_tls::https_address(host, target, port))
                    .flatten();
                // As a request's line: the path only (a query may hold tokens), clipped and
                // escaped.
                let path = proxy::loggable(parts.uri.path());
                let host = proxy::loggable(host.unwrap_or("-"));
                info!(method = %proxy::loggable_method(&parts.method), host = %host, path = %path, status = 400, "plain HTTP request to the HTTPS port: answered 400 with the https:// address to use");
                metrics.0.metrics.refused_unread(400);
                std::future::ready(plain_on_tls::answer(address.as_deref()))
            },
            move |why| refused.unserved(why),
        )
        .await;
    }

    /// Serves HTTP/1.x on one client connection (our own server: hyper's cost ~15k
    /// instructions per request, benches/front_cost.sh); a plain one that opens with HTTP/2's
    /// preface goes on as HTTP/2.
    async fn serve_h1(
        self,
        io: Box<dyn Io>,
        peer: SocketAddr,
        https: bool,
        shutdown: CancellationToken,
        slots: &Arc<ConnSlots>,
        reset: &ResetOnClose,
    ) {
        let cfg = server::Config {
            header_read_timeout: self.0.tuning.header_read_timeout,
            send_timeout: self.0.tuning.send_timeout,
            body_timeout: self.0.tuning.body_timeout,
            sniff_h2: !https,
        };
        let front = self.clone();
        let counted = self.clone();
        let served = server::serve(
            io,
            cfg,
            shutdown.clone(),
            move |req, upgrade: Option<_>| {
                let keep = Some(slots.clone());
                proxy::handle(front.clone(), req, peer, https, upgrade, keep)
            },
            move |why| counted.unserved(why),
        )
        .await;
        match served {
            Served::Done => {}
            Served::H2(io) => h2::serve(self, io, peer, https, shutdown, slots.clone()).await,
            Served::CutShort(io) => {
                reset.arm();
                drop(io);
            }
        }
    }
}

/// Fails a read of a connection if its first `bytes` have not all arrived within the
/// deadline; later reads are untouched (HTTP/2's pings find dead peers after its preface).
/// The first byte alone used to end it: a client that sent `P` of the preface and nothing
/// more held its connection for good, since hyper neither pings nor shuts down gracefully
/// before the preface is complete.
struct FirstReadDeadline<I> {
    inner: I,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Bytes still to arrive before the deadline is lifted.
    left: usize,
}

impl<I> FirstReadDeadline<I> {
    fn new(inner: I, after: Duration, bytes: usize) -> Self {
        FirstReadDeadline {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(after))),
            left: bytes.max(1),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for FirstReadDeadline<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.deadline.is_some() {
            match &r {
                std::task::Poll::Ready(Ok(())) if buf.filled().len() > before => {
                    let got = buf.filled().len() - before;
                    self.left = self.left.saturating_sub(got);
                    if self.left == 0 {
                        self.deadline = None;
                    }
                }
                std::task::Poll::Pending => {
                    if let Some(d) = self.deadline.as_mut() {
                        if std::future::Future::poll(d.as_mut(), cx).is_ready() {
                            return std::task::Poll::Ready(Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "client sent nothing",
                            )));
                        }
                    }
                }
                _ => {}
            }
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FirstReadDeadline<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        b: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, b)
    }
    // Passed on: HTTP/2 writes a frame's header and payload as two slices of one write, and
    // TLS makes them one record (without this, two records and two writes per frame).
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
