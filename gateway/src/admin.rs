//! The admin API on loopback: `/status` (JSON). Small on purpose: plain HTTP/1.1, GET only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// Produces the JSON body of `/status` on demand.
pub type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

fn reply(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .header("cache-control", "no-store")
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

/// Serves the admin API on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, status: StatusFn, shutdown: CancellationToken) {
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "admin API listening (/status)");
    }
    loop {
        let (tcp, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
        };
        let status = status.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let status = status.clone();
                async move {
                    let resp = match (req.method(), req.uri().path()) {
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
                        _ => reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n"),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                debug!(error = %e, "admin connection ended");
            }
        });
    }
}

/// Binds the admin address. The admin API shows who is connected from where, so anything but
/// loopback gets a loud warning.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    if !addr.ip().is_loopback() {
        tracing::warn!(addr = %addr, "admin API bound to a non-loopback address: anyone who reaches it sees your devices");
    }
    TcpListener::bind(addr).await
}
