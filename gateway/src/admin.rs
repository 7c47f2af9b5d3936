//! The admin API on loopback: `/status` (JSON), `/metrics` (Prometheus text: a gateway's, or a
//! node's from `zonegate::node_metrics`), and on a gateway the HTML status page at `/`. Small on purpose: plain HTTP/1.1, GET (and HEAD) only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// Admin connections served at once; more are closed as they come. The API is for a
/// monitoring scraper and a person's browser: a client holding hundreds would take file
/// descriptors the public traffic shares.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a connection may take to send a request's headers (and, kept alive, to start
/// its next request).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection is kept before it is closed after its answer in flight: exchanges
/// here are short, and a scraper reconnects.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// How long a connection's last answer may take to go out once it is being closed.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Produces the JSON body of `/status` on demand.
pub type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;
/// Produces a text body on demand (`/metrics`, the status page).
pub type TextFn = Arc<dyn Fn() -> String + Send + Sync>;

/// What an admin API serves beyond `/status`.
#[derive(Clone, Default)]
pub struct Extras {
    /// `/metrics`, Prometheus text format.
    pub metrics: Option<TextFn>,
    /// `/`, an HTML page.
    pub page: Option<TextFn>,
}

fn reply(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .header("cache-control", "no-store")
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

/// Serves the admin API (`/status` only) on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, status: StatusFn, shutdown: CancellationToken) {
    serve_with(listener, status, Extras::default(), shutdown).await
}

/// Serves the admin API with `extras` on `listener` until `shutdown`.
pub async fn serve_with(
    listener: TcpListener,
    status: StatusFn,
    extras: Extras,
    shutdown: CancellationToken,
) {
    if let Ok(a) = listener.local_addr() {
        let paths = match (&extras.metrics, &extras.page) {
            (Some(_), Some(_)) => "/, /status, /metrics",
            (Some(_), None) => "/status, /metrics",
            (None, Some(_)) => "/, /status",
            (None, None) => "/status",
        };
        info!(addr = %a, paths, "admin API listening");
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    while let Some((tcp, peer)) = tunnel::sockets::accept_until(&listener, &shutdown).await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(client = %peer, max = MAX_CONNECTIONS, "admin connection refused: too many open");
            continue;
        };
        let status = status.clone();
        let extras = extras.clone();
        tokio::spawn(async move {
            let _slot = slot;
            serve_connection(tcp, status, extras, (MAX_CONNECTION_AGE, CLOSE_GRACE)).await;
        });
    }
}

/// Lines about refused admin requests (addressed to a name), shared by every connection.
static REFUSED_LINES: std::sync::LazyLock<std::sync::Mutex<tunnel::log_budget::LogBudget>> =
    std::sync::LazyLock::new(|| std::sync::Mutex::new(tunnel::log_budget::LogBudget::new(5)));

/// Serves one admin connection, for at most `age` and then as long as its answer in flight
/// takes to go out, within `grace` ([`MAX_CONNECTION_AGE`], [`CLOSE_GRACE`]). Without a bound a local client that pipelined
/// requests and read none of the answers held its slot for ever (hyper's header timer waits
/// for the stalled write first): 64 of them shut the API out.
async fn serve_connection(
    tcp: tokio::net::TcpStream,
    status: StatusFn,
    extras: Extras,
    (age, grace): (Duration, Duration),
) {
    let peer = tcp.peer_addr().ok().map(tunnel::sockets::canonical);
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let status = status.clone();
        let extras = extras.clone();
        async move {
            // Checked wherever the API listens: a web page in any browser that reaches
            // it (on this machine, or on the LAN of an API bound there) can point a
            // name of its own at its address (DNS rebinding) and read the answers.
            if !addressed_to_this_machine(&req) {
                // A refusal worth telling (a page trying DNS rebinding), not a scrape: once
                // per request, within a budget.
                if let Some(unlogged) = tunnel::log_budget::LogBudget::take_shared(&REFUSED_LINES) {
                    let host = req.headers().get(hyper::header::HOST).map_or_else(
                        || "-".to_owned(),
                        |h| String::from_utf8_lossy(h.as_bytes()).into_owned(),
                    );
                    let client = peer.map_or_else(|| "-".to_owned(), |p| p.to_string());
                    tracing::warn!(%client, host = ?host, path = %req.uri().path(), unlogged, "admin API request refused: addressed to a name, not to this machine's address (a web page trying DNS rebinding?)");
                }
                return Ok::<_, Infallible>(reply(
                    StatusCode::FORBIDDEN,
                    "text/plain",
                    "the admin API answers requests addressed by IP address or to localhost (and *.localhost) only: a name could be a web page's (DNS rebinding); use the address\n",
                ));
            }
            // HEAD as GET (hyper leaves the body out): uptime checkers send it.
            let method = match req.method() {
                &Method::HEAD => &Method::GET,
                m => m,
            };
            let resp = match (method, req.uri().path()) {
                (&Method::GET, "/metrics") if extras.metrics.is_some() => {
                    let m = extras.metrics.as_ref().map(|f| f()).unwrap_or_default();
                    reply(
                        StatusCode::OK,
                        "text/plain; version=0.0.4; charset=utf-8",
                        m,
                    )
                }
                (&Method::GET, "/") if extras.page.is_some() => {
                    let p = extras.page.as_ref().map(|f| f()).unwrap_or_default();
                    reply(StatusCode::OK, "text/html; charset=utf-8", p)
                }
                (&Method::GET, "/status") => {
                    let v = status();
                    reply(
                        StatusCode::OK,
                        "application/json",
                        serde_json::to_vec_pretty(&v).unwrap_or_default(),
                    )
                }
                (&Method::GET, _) => reply(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    "not found: try /status\n",
                ),
                _ => reply(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "text/plain",
                    "GET (or HEAD) only\n",
                ),
            };
            Ok::<_, Infallible>(resp)
        }
    });
    let io = hyper_util::rt::TokioIo::new(tcp);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(io, svc);
    let mut conn = std::pin::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => Some(r),
        () = tokio::time::sleep(age) => None,
    };
    let ended = match ended {
        Some(r) => r,
        None => {
            // A scraper keeping its connection alive gets its answer in flight, then a close.
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(grace, conn).await {
                Ok(r) => r,
                Err(_) => {
                    debug!("admin connection cut: its answer was not taken within {grace:?}");
                    return;
                }
            }
        }
    };
    if let Err(e) = ended {
        debug!(error = %e, "admin connection ended");
    }
}

/// Whether the request names this machine (an IP address or `localhost`, any port) as its
/// host, or names none. A web page in a browser on this machine can point its own name at
/// 127.0.0.1 (DNS rebinding) and then read loopback answers as its own: its requests carry
/// that name.
pub fn addressed_to_this_machine<B>(req: &Request<B>) -> bool {
    let Some(host) = req.headers().get(hyper::header::HOST) else {
        return true;
    };
    let Some(authority) = host
        .to_str()
        .ok()
        .and_then(|h| h.parse::<hyper::http::uri::Authority>().ok())
    else {
        return false;
    };
    let name = authority.host().trim_end_matches('.').to_ascii_lowercase();
    // `*.localhost` is loopback by definition (RFC 6761; browsers never ask DNS for it).
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok()
}

/// The admin address could not be bound; the message says which setting to change. It embeds
/// the I/O error, which is therefore not a `source` (error chains would print it twice).
#[derive(Debug, thiserror::Error)]
#[error("admin API: cannot listen on {addr}: {error}{}", bind_hint(.error))]
pub struct BindError {
    pub addr: SocketAddr,
    pub error: std::io::Error,
}

/// Two agents on one machine both default to the same admin port; say which setting frees it.
fn bind_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (another program uses it, e.g. another zonegate on this machine: set `admin = \"127.0.0.1:PORT\"` to a free port in the config file)"
        }
        std::io::ErrorKind::AddrNotAvailable => {
            " (no interface of this machine has that address: set `admin = \"127.0.0.1:PORT\"` in the config file)"
        }
        _ => "",
    }
}

/// Binds the admin address. The admin API shows who is connected from where, so anything but
/// loopback gets a loud warning.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    if !addr.ip().to_canonical().is_loopback() {
        tracing::warn!(addr = %addr, "admin API bound to a non-loopback address: anyone who reaches it sees your devices");
    }
    // As the apps' listeners bind: `[::]` dual-stack whatever `bindv6only` says, and
    // `0.0.0.0` on a kernel without IPv6.
    tunnel::sockets::tcp(addr).map_err(|error| BindError { addr, error })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(host: Option<&str>) -> bool {
        let mut b = Request::builder().uri("/status");
        if let Some(h) = host {
            b = b.header("host", h);
        }
        addressed_to_this_machine(&b.body(()).unwrap())
    }

    /// A client that pipelines requests and reads none of the answers loses its connection
    /// (and slot) once the connection's age is up and its answer in flight is not taken.
    #[tokio::test]
    async fn a_client_not_reading_its_answers_loses_its_connection() {
        use tokio::io::AsyncWriteExt;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = l.accept().await.unwrap();
        let big = serde_json::Value::String("x".repeat(100_000));
        let status: StatusFn = Arc::new(move || big.clone());
        let limits = (Duration::from_secs(1), Duration::from_secs(1));
        let served = tokio::spawn(serve_connection(tcp, status, Extras::default(), limits));
        // 20 MB of answers: more than the two sockets' buffers hold.
        let asks = "GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".repeat(200);
        client.write_all(asks.as_bytes()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(30), served)
            .await
            .expect("a connection whose answers were not read was kept")
            .unwrap();
    }

    #[test]
    fn only_requests_to_this_machine_are_answered_on_loopback() {
        for ok in [
            Some("127.0.0.1:9090"),
            Some("127.0.0.1"),
            Some("[::1]:9090"),
            Some("[::1]"),
            Some("localhost:9090"),
            Some("LOCALHOST"),
            Some("localhost."),
            Some("status.localhost:9090"),
            Some("10.0.0.1:9090"),
            None,
        ] {
            assert!(to(ok), "{ok:?}");
        }
        for refused in [
            "evil.example:9090",
            "evil.example",
            "localhost.evil.example",
            "evil.example.",
            "127.0.0.1.nip.io",
            "",
            "a b",
        ] {
            assert!(!to(Some(refused)), "{refused:?}");
        }
    }
}
