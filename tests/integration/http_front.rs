//! The gateway's public HTTP(S) front end to end on loopback: a zone made with the CLI, a
//! gateway and a node agent in-process (`Gateway::bind` / `Agent::bind`), a small hyper
//! backend behind the agent, and real clients: curl (HTTP/1.1 and HTTP/2 over TLS), a
//! WebSocket client, headless Chromium for the status page.
//!
//! Needs Debian's `curl`; the status-page test also `chromium` and prints
//! `SKIPPED (needs chromium)` without it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use gateway::http::HttpTuning;
use gateway::{Gateway, GatewayOptions};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use tunnel::agent::{Agent, AgentConfig};
use tunnel::creds::{BundlePaths, DeviceCreds};
use tunnel::hub::Hub;
use tunnel::proto::ServiceProto;
use tunnel::services::{LocalService, LocalServices};
use tunnel::transport::Tuning;

use crate::common::ok;
use crate::inproc::socket_from;

const DOMAIN: &str = "alice.example";
/// How long the gateway waits for a response's headers in these tests (the backend's `/slow`
/// takes longer, so it answers 504).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the backend's `/slow` takes: far past RESPONSE_TIMEOUT, so that a busy machine's
/// 504 still comes well before it.
const SLOW: Duration = Duration::from_secs(30);
/// How long the gateway waits for more of an answer in these tests.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a client has to send its request headers (slowloris defence).
const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// The front's request body timeout in these tests.
const BODY_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 connections without an open request close after this.
const H2_IDLE: Duration = Duration::from_secs(2);
/// A stream whose reader took nothing more for this long is held (`tunnel::holds`).
const READER_STALL: Duration = Duration::from_secs(1);
/// How long a test waits for the front to cut a misbehaving client.
const WAIT_CUT: Duration = Duration::from_secs(10);

const POLICY: &str = r#"
[app.web]
http = { host = "alice.example" }
to = "home1/web"
allow = { from = ["public"] }

[app.api]
http = { host = "alice.example", path = "/api", strip_prefix = true }
to = "home1/web"
allow = { from = ["public"] }

[app.offline]
http = { host = "offline.alice.example" }
to = "home2/web"
allow = { from = ["public"] }

[app.down]
http = { host = "down.alice.example" }
to = "home1/down"
allow = { from = ["public"] }

[app.stale]
http = { host = "stale.alice.example" }
to = "home1/stale"
allow = { from = ["public"] }

[app.limited]
http = { host = "limited.alice.example" }
to = "home1/web"
allow = { from = ["public"] }
limits = { rate = "1/h", burst = 2 }

[app.capped]
http = { host = "capped.alice.example" }
to = "home1/web"
allow = { from = ["public"] }
limits = { rate = "1/h", burst = 2, max_connections_per_client = 1 }

[app.small]
http = { host = "small.alice.example" }
to = "home1/web"
allow = { from = ["public"] }
limits = { max_body = "1KiB" }

[app.slow]
http = { host = "slow.alice.example" }
to = "home1/web"
allow = { from = ["public"] }
limits = { bandwidth_per_connection = "100KiB/s" }
"#;

// ---------------------------------------------------------------------------------------------
// The backend behind the node agent.

/// `len` bytes of a fixed pattern, made on the fly in 64 KiB frames.
struct Pattern {
    sent: u64,
    len: u64,
}

const CHUNK: u64 = 64 * 1024;
/// The pattern repeats every `PERIOD` bytes (a prime, so it never lines up with chunk or
/// frame sizes): byte `i` is `TABLE[i % PERIOD]`.
const PERIOD: u64 = 65_521;

/// `PERIOD + 1 MiB` bytes, so any window of up to 1 MiB of the pattern is one slice of it:
/// making and checking the pattern is a memcpy / memcmp, fast even in a debug build.
fn table() -> &'static [u8] {
    static T: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        (0..PERIOD + 1024 * 1024)
            .map(|i| ((i % PERIOD) * 7 % 251) as u8)
            .collect()
    })
}

fn pattern_chunk(from: u64, n: u64) -> &'static [u8] {
    assert!(n <= 1024 * 1024);
    let at = (from % PERIOD) as usize;
    &table()[at..at + n as usize]
}

/// Checks that `data` is the pattern from offset `from`.
fn is_pattern(from: u64, data: &[u8]) -> bool {
    data.chunks(1024 * 1024)
        .enumerate()
        .all(|(i, c)| c == pattern_chunk(from + (i as u64) * 1024 * 1024, c.len() as u64))
}

impl Body for Pattern {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.sent >= self.len {
            return Poll::Ready(None);
        }
        let n = CHUNK.min(self.len - self.sent);
        let b = Bytes::from_static(pattern_chunk(self.sent, n));
        self.sent += n;
        Poll::Ready(Some(Ok(Frame::data(b))))
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.len - self.sent)
    }
}

/// A body that can fail part way (`/breaks-mid-answer`).
type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

fn text(status: StatusCode, s: String) -> Response<BoxBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(s))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r
}

async fn backend_handle(mut req: Request<Incoming>) -> Result<Response<BoxBody>, Infallible> {
    let path = req.uri().path().to_owned();
    if path == "/ws" {
        let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                "not a websocket request".into(),
            ));
        };
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(up) = on.await else { return };
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(up),
                tungstenite::protocol::Role::Server,
                None,
            )
            .await;
            while let Some(Ok(m)) = ws.next().await {
                if m.is_close() {
                    break;
                }
                if ws.send(m).await.is_err() {
                    break;
                }
            }
        });
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .body(
                Full::new(Bytes::new())
                    .map_err(|e| match e {})
                    .boxed_unsync(),
            )
            .unwrap());
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let len: u64 = n.parse().unwrap_or(0);
        return Ok(Response::new(
            Pattern { sent: 0, len }
                .map_err(|e| match e {})
                .boxed_unsync(),
        ));
    }
    if let Some(n) = path.strip_prefix("/chunked-bytes/") {
        // The same bytes, their length untold: hyper sends them chunked.
        let len: u64 = n.parse().unwrap_or(0);
        let mut p = Pattern { sent: 0, len };
        let body = http_body_util::StreamBody::new(futures_util::stream::poll_fn(move |cx| {
            Pin::new(&mut p).poll_frame(cx)
        }));
        return Ok(Response::new(body.map_err(|e| match e {}).boxed_unsync()));
    }
    if path == "/upload" {
        // Checks the body against the pattern as it streams in.
        let mut body = req.into_body();
        let mut len = 0u64;
        let mut intact = true;
        while let Some(f) = body.frame().await {
            let Ok(f) = f else {
                return Ok(text(StatusCode::BAD_REQUEST, "body broke".into()));
            };
            if let Some(d) = f.data_ref() {
                intact &= is_pattern(len, d);
                len += d.len() as u64;
            }
        }
        return Ok(text(StatusCode::OK, format!("len={len} intact={intact}")));
    }
    if path == "/slow" {
        tokio::time::sleep(SLOW).await;
        return Ok(text(StatusCode::OK, "slow answer".into()));
    }
    if path == "/hangs-mid-answer" {
        // Sends the head and a first piece of a 100-byte body, then nothing more.
        let mut first = Some(Bytes::from_static(b"first part"));
        let body = http_body_util::StreamBody::new(futures_util::stream::poll_fn(move |_| {
            match first.take() {
                Some(b) => Poll::Ready(Some(Ok::<_, Infallible>(Frame::data(b)))),
                None => Poll::Pending,
            }
        }));
        return Ok(Response::builder()
            .header("content-length", "100")
            .body(body.map_err(|e| match e {}).boxed_unsync())
            .unwrap());
    }
    if path == "/breaks-mid-answer" {
        // A first piece of an answer of untold length, then (once that piece has gone out)
        // an error: hyper ends the connection without the chunked body's last chunk.
        let body = futures_util::stream::unfold(0, |step| async move {
            let frame = match step {
                0 => Ok(Frame::data(Bytes::from_static(b"first part"))),
                1 => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Err(std::io::Error::other("the disk failed"))
                }
                _ => return None,
            };
            Some((frame, step + 1))
        });
        let body = http_body_util::StreamBody::new(body);
        return Ok(Response::new(body.boxed_unsync()));
    }
    if path == "/wedged" {
        // Reads nothing of the body and never answers: a service that hangs mid-upload.
        std::future::pending::<()>().await;
    }
    // Echo: method, path and headers as the backend saw them.
    let mut s = format!(
        "method={} path={} version={:?}\n",
        req.method(),
        req.uri(),
        req.version()
    );
    for (k, v) in req.headers() {
        s.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
    }
    Ok(text(StatusCode::OK, s))
}

async fn start_backend(shutdown: CancellationToken) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = l.accept() => r.unwrap(),
            };
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(
                        TokioIo::new(tcp),
                        hyper::service::service_fn(backend_handle),
                    )
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// What [`start_stale_backend`] read: (connection number, request line), in order.
type SeenRequests = Arc<Mutex<Vec<(u32, String)>>>;

/// A service that answers the first request on each connection and keeps it open, then reads
/// the second request and closes the connection without an answer (a reset on odd-numbered
/// connections, a FIN on even ones): a service whose idle timeout fires just as the gateway
/// reuses the connection, made to happen every time.
async fn start_stale_backend(shutdown: CancellationToken) -> (SocketAddr, SeenRequests) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = SeenRequests::default();
    let log = seen.clone();
    tokio::spawn(async move {
        for conn in 1u32.. {
            let (tcp, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = l.accept() => r.unwrap(),
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut tcp = BufReader::new(tcp);
                for nth in 1.. {
                    let mut head = String::new();
                    let mut len = 0usize;
                    loop {
                        let mut line = String::new();
                        if tcp.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((k, v)) = line.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                len = v.trim().parse().unwrap();
                            }
                        }
                        if head.is_empty() {
                            head = line.trim_end().to_owned();
                        }
                    }
                    let mut body = vec![0; len];
                    tcp.read_exact(&mut body).await.unwrap();
                    // Answers a well-behaved service would not give.
                    let odd: Option<&[u8]> = if head.starts_with("GET /switch ") {
                        Some(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\n")
                    } else if head.starts_with("GET /no-content ") {
                        Some(b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n")
                    } else {
                        None
                    };
                    if let Some(odd) = odd {
                        tcp.get_mut().write_all(odd).await.unwrap();
                        continue;
                    }
                    log.lock().unwrap().push((conn, head.clone()));
                    if head.starts_with("GET /held ") {
                        // Never answered: waits for the gateway to give the request up.
                        let mut rest = [0u8; 64];
                        while matches!(tcp.read(&mut rest).await, Ok(1..)) {}
                        log.lock().unwrap().push((conn, "closed".into()));
                        return;
                    }
                    if nth == 2 {
                        // Unanswered: odd connections end with a reset, even ones with a FIN.
                        if conn % 2 == 1 {
                            tcp.get_ref().set_zero_linger().unwrap();
                        }
                        return;
                    }
                    let text = format!("connection {conn}, request {nth}");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{text}",
                        text.len()
                    );
                    tcp.get_mut().write_all(answer.as_bytes()).await.unwrap();
                }
            });
        }
    });
    (addr, seen)
}

// ---------------------------------------------------------------------------------------------
// Zone, gateway and agent.

struct Harness {
    dir: tempfile::TempDir,
    http: SocketAddr,
    https: SocketAddr,
    admin: SocketAddr,
    /// The gateway's self-signed certificate, for `curl --cacert`.
    ca: PathBuf,
    hub: Hub,
    /// Requests [`start_stale_backend`] (service `stale` on home1) read.
    stale_seen: SeenRequests,
    shutdown: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn bundle(zone: &Path, device: &str, zone_json: &Path) -> BundlePaths {
    let b = zone.join("devices").join(device);
    BundlePaths {
        key: b.join("device.key"),
        cert: b.join("device.crt"),
        ca: b.join("zone-ca.crt"),
        zone_config: zone_json.to_owned(),
    }
}

/// Apps whose rules name methods: `closed` allows GET and PROPFIND three days from today
/// (UTC) only, `dav` allows PROPFIND and GET at any time.
fn hours_policy() -> String {
    const DAYS: [&str; 7] = ["thu", "fri", "sat", "sun", "mon", "tue", "wed"];
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400;
    let other = DAYS[((days + 3) % 7) as usize];
    format!(
        r#"
[app.closed]
http = {{ host = "closed.alice.example" }}
to = "home1/web"
allow = {{ from = ["public"], methods = ["GET", "PROPFIND"], days = ["{other}"] }}

[app.dav]
http = {{ host = "dav.alice.example" }}
to = "home1/web"
allow = {{ from = ["public"], methods = ["PROPFIND", "GET"] }}
"#
    )
}

/// A zone `alice.example` with gateway `gw` and nodes `home1` (connected, serving the test
/// backend as `web` and `dfs`) and `home2` (never connected); the policy is [`POLICY`] plus
/// the repository's `policies/examples/dfs.toml` as it is.
async fn start() -> Harness {
    start_tuned(|_| {}).await
}

/// [`start`] with a front whose send timeout is `send_timeout`.
async fn start_sending_within(send_timeout: Duration) -> Harness {
    start_tuned(|t| t.send_timeout = send_timeout).await
}

/// [`start`] with the front's per-client connection limit at `per_ip`.
async fn start_with(per_ip: usize) -> Harness {
    start_tuned(|t| t.max_connections_per_ip = per_ip).await
}

/// [`start`] with the tests' front tuning changed by `tune`.
async fn start_tuned(tune: impl FnOnce(&mut HttpTuning)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    // The zone config must name the address the gateway listens on for QUIC.
    let quic = std::net::SocketAddr::from(([127, 0, 0, 1], crate::inproc::free_udp_port()));
    let z = dir.path().join("zone");
    let zs = z.to_str().unwrap();
    ok(["zone", "init", "--domain", DOMAIN, "--dir", zs]);
    let public = quic.to_string();
    ok([
        "device",
        "add",
        "gw",
        "--zone",
        zs,
        "--role",
        "gateway",
        "--public-addr",
        &public,
    ]);
    ok(["device", "add", "home1", "--zone", zs, "--role", "node"]);
    ok(["device", "add", "home2", "--zone", zs, "--role", "node"]);
    let zone_json = z.join("zone.json");

    let pdir = dir.path().join("policies");
    std::fs::create_dir_all(&pdir).unwrap();
    std::fs::write(pdir.join("main.toml"), POLICY).unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples/dfs.toml");
    std::fs::copy(example, pdir.join("dfs.toml")).unwrap();
    std::fs::write(pdir.join("hours.toml"), hours_policy()).unwrap();
    let policy = Arc::new(policies::PolicyStore::load(&pdir).expect("test policy loads"));

    let backend = start_backend(shutdown.clone()).await;
    let (stale, stale_seen) = start_stale_backend(shutdown.clone()).await;
    // A short stall time: clients that stop reading are dealt with within the tests' time.
    let tuning = Tuning {
        reader_stall: READER_STALL,
        ..Tuning::default()
    };
    let gw_creds = DeviceCreds::load(
        &bundle(&z, "gw", &zone_json),
        Some(&zone_core::DeviceName::new("gw").unwrap()),
    )
    .unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut http_tuning = HttpTuning {
        response_timeout: RESPONSE_TIMEOUT,
        header_read_timeout: HEADER_TIMEOUT,
        body_timeout: BODY_TIMEOUT,
        h2_idle_timeout: H2_IDLE,
        read_timeout: READ_TIMEOUT,
        ..HttpTuning::default()
    };
    tune(&mut http_tuning);
    let gw = Gateway::bind(
        GatewayOptions {
            creds: gw_creds,
            policy,
            services: Arc::new(LocalServices::default()),
            forwards: Vec::new(),
            listen: quic,
            admin: any,
            tuning,
            grace: Duration::from_secs(2),
            http: Some(any),
            https: Some(any),
            tls_certs: Vec::new(),
            http_tuning,
            tcp_connections_per_ip: gateway::listeners::TCP_CONNECTIONS_PER_IP,
            tcp_connections: gateway::listeners::MAX_TCP_CONNECTIONS,
            udp_flows_per_ip: gateway::listeners::UDP_FLOWS_PER_IP,
            udp_flows_per_app: gateway::listeners::MAX_UDP_CLIENTS,
            dns: None,
        },
        shutdown.clone(),
    )
    .await
    .expect("gateway binds");
    let ca = dir.path().join("gateway-self-signed.pem");
    std::fs::write(
        &ca,
        gw.self_signed_pem().expect("self-signed without [[tls]]"),
    )
    .unwrap();
    let (http, https, admin) = (
        gw.http_addr().unwrap(),
        gw.https_addr().unwrap(),
        gw.admin_addr(),
    );
    let hub = gw.hub().clone();
    tokio::spawn(gw.run());

    let creds = DeviceCreds::load(
        &bundle(&z, "home1", &zone_json),
        Some(&zone_core::DeviceName::new("home1").unwrap()),
    )
    .unwrap();
    let svc = LocalService {
        addr: backend,
        proto: ServiceProto::Tcp,
    };
    let services = LocalServices::new(BTreeMap::from([
        ("web".to_string(), svc),
        ("dfs".to_string(), svc),
        (
            "stale".to_string(),
            LocalService {
                addr: stale,
                proto: ServiceProto::Tcp,
            },
        ),
        (
            // Nothing listens there: the service is down.
            "down".to_string(),
            LocalService {
                addr: ([127, 0, 0, 1], crate::inproc::free_tcp_port()).into(),
                proto: ServiceProto::Tcp,
            },
        ),
    ]));
    let ep = tunnel::transport::client_endpoint(any, &creds, &tuning).unwrap();
    let agent = Agent::bind(
        AgentConfig {
            creds,
            services: Arc::new(services),
            forwards: Vec::new(),
            gateways: Vec::new(),
            tuning,
        },
        ep,
    )
    .await
    .unwrap();
    tokio::spawn(agent.run(shutdown.clone()));
    let deadline = Instant::now() + Duration::from_secs(15);
    while hub.agent("home1").is_none() {
        assert!(Instant::now() < deadline, "home1 did not connect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Harness {
        dir,
        http,
        https,
        admin,
        ca,
        hub,
        stale_seen,
        shutdown,
    }
}

// ---------------------------------------------------------------------------------------------
// curl.

#[derive(Debug)]
struct Curl {
    code: u16,
    version: String,
    headers: String,
    body: String,
    /// Shown by `Debug` in assertion messages.
    #[allow(dead_code)]
    stderr: String,
}

impl Curl {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

impl Harness {
    /// `https://HOST:PORT/PATH` with HOST resolved to the gateway, trusting its certificate.
    fn https_args(&self, host: &str, path: &str) -> Vec<String> {
        let p = self.https.port();
        vec![
            "--cacert".into(),
            self.ca.to_str().unwrap().into(),
            "--resolve".into(),
            format!("{host}:{p}:127.0.0.1"),
            format!("https://{host}:{p}{path}"),
        ]
    }
    fn http_args(&self, host: &str, path: &str) -> Vec<String> {
        let p = self.http.port();
        vec![
            "--resolve".into(),
            format!("{host}:{p}:127.0.0.1"),
            format!("http://{host}:{p}{path}"),
        ]
    }

    async fn curl(&self, args: &[String]) -> Curl {
        let hdr = self.dir.path().join(format!("h{}", rand::random::<u64>()));
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "30", "-D"])
            .arg(&hdr)
            .args(["-w", "\n%{http_code} %{http_version}"])
            .args(args)
            .output()
            .await
            .expect("curl runs (apt-get install curl)");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, tail) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        let (code, version) = tail.split_once(' ').unwrap_or((tail, ""));
        let headers = std::fs::read_to_string(&hdr).unwrap_or_default();
        let _ = std::fs::remove_file(&hdr);
        Curl {
            code: code.parse().unwrap_or_else(|_| {
                panic!(
                    "curl {args:?}: {}\n{stdout}",
                    String::from_utf8_lossy(&out.stderr)
                )
            }),
            version: version.to_owned(),
            headers,
            body: body.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn streams_to_home1(&self) -> u64 {
        self.hub
            .agent("home1")
            .map(|a| a.streams.load(std::sync::atomic::Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Sends `request` as raw bytes on a new plain HTTP connection and reads until the
    /// gateway closes it (within 10 s, or the test fails naming `what`).
    async fn raw(&self, request: &[u8], what: &str) -> String {
        let mut tcp = tokio::net::TcpStream::connect(self.http).await.unwrap();
        tcp.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("{what}: connection still open after 10 s"))
            .unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    }

    async fn admin_get(&self, path: &str) -> String {
        let c = self.curl(&[format!("http://{}{path}", self.admin)]).await;
        assert_eq!(c.code, 200, "{path}: {c:?}");
        c.body
    }
}

fn args(a: &[&str], rest: Vec<String>) -> Vec<String> {
    a.iter().map(|s| s.to_string()).chain(rest).collect()
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_http1_and_http2_route_and_set_forwarded_headers() {
    let h = start().await;
    // HTTP/1.1 over TLS; the client's own X-Forwarded-For and a Connection-named header must
    // not reach the service.
    let c = h
        .curl(&args(
            &[
                "--http1.1",
                "-H",
                "X-Forwarded-For: 6.6.6.6",
                "-H",
                "Connection: keep-alive, X-Hop",
                "-H",
                "X-Hop: secret",
            ],
            h.https_args(DOMAIN, "/hello?x=1"),
        ))
        .await;
    assert_eq!((c.code, c.version.as_str()), (200, "1.1"), "{c:?}");
    let b = c.body.to_lowercase();
    assert!(b.contains("method=get path=/hello?x=1"), "{b}");
    assert!(b.contains("x-forwarded-for: 127.0.0.1\n"), "{b}");
    assert!(!b.contains("6.6.6.6"), "{b}");
    assert!(b.contains("x-forwarded-proto: https\n"), "{b}");
    assert!(
        b.contains(&format!("x-forwarded-host: {DOMAIN}:{}\n", h.https.port())),
        "{b}"
    );
    assert!(!b.contains("x-hop"), "hop-by-hop header forwarded: {b}");
    assert!(!b.contains("x-forwarded-prefix"), "{b}");

    // HTTP/2 over TLS (ALPN), to the same service.
    let c = h
        .curl(&args(&["--http2"], h.https_args(DOMAIN, "/h2")))
        .await;
    assert_eq!((c.code, c.version.as_str()), (200, "2"), "{c:?}");
    assert!(c.body.contains("path=/h2"), "{}", c.body);
    assert!(c.body.contains(&format!("host: {DOMAIN}")), "{}", c.body);

    // Plain HTTP/1.1; prefix stripping.
    let c = h
        .curl(&args(&["--http1.1"], h.http_args(DOMAIN, "/api/v1/items")))
        .await;
    assert_eq!(c.code, 200, "{c:?}");
    assert!(c.body.contains("path=/v1/items"), "{}", c.body);
    assert!(c.body.contains("x-forwarded-proto: http\n"), "{}", c.body);
    assert!(c.body.contains("x-forwarded-prefix: /api\n"), "{}", c.body);

    // Plain HTTP/2 with prior knowledge: the front's HTTP/1 server sees the preface and
    // hands the connection to HTTP/2.
    let c = h
        .curl(&args(
            &["--http2-prior-knowledge"],
            h.http_args(DOMAIN, "/api/v1/h2c"),
        ))
        .await;
    assert_eq!((c.code, c.version.as_str()), (200, "2"), "{c:?}");
    assert!(c.body.contains("path=/v1/h2c"), "{}", c.body);

    // HTTP/1.0 is answered (in HTTP/1.1, the version the server speaks).
    let c = h
        .curl(&args(&["--http1.0"], h.http_args(DOMAIN, "/api/v1/old")))
        .await;
    assert_eq!((c.code, c.version.as_str()), (200, "1.1"), "{c:?}");
    assert!(c.body.contains("path=/v1/old"), "{}", c.body);

    // Upstream connections are pooled: sequential requests from new client connections
    // reuse tunnel streams instead of opening one each.
    let before = h.streams_to_home1();
    for i in 0..6 {
        let c = h.curl(&h.http_args(DOMAIN, &format!("/seq/{i}"))).await;
        assert_eq!(c.code, 200);
    }
    let opened = h.streams_to_home1() - before;
    assert!(
        opened <= 2,
        "6 sequential requests opened {opened} tunnel streams"
    );
}

/// A head trickled a few bytes per write is answered once its end arrives, whole. (It is
/// parsed when its blank line comes, not rescanned after every read; that is a matter of
/// speed, so the head timeout here is long: thousands of writes take a busy machine a while.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_head_is_answered_once_whole() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = start_tuned(|t| t.header_read_timeout = Duration::from_secs(30)).await;
    let mut tcp = tokio::net::TcpStream::connect(h.http).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let head = format!(
        "GET /x HTTP/1.1\r\nHost: nobody.alice.example\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "p".repeat(20_000)
    );
    for piece in head.as_bytes().chunks(7) {
        tcp.write_all(piece).await.unwrap();
    }
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT_CUT, tcp.read_to_end(&mut answer))
        .await
        .expect("trickled head answered in time")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_distinct_and_short() {
    let h = start().await;
    // No app for this host.
    let c = h.curl(&h.https_args("nobody.alice.example", "/x")).await;
    assert_eq!(c.code, 404, "{c:?}");
    assert!(
        c.body.contains("no app serves nobody.alice.example"),
        "{}",
        c.body
    );

    // A request target beyond 8 KiB: 414 before routing, with the limit; at 8 KiB it is
    // routed as usual (here: no app, 404, the path clipped in the answer).
    // A GET whose target is `n` bytes long.
    let get = |n: usize| {
        format!(
            "GET /{} HTTP/1.1\r\nHost: nobody.alice.example\r\nConnection: close\r\n\r\n",
            "l".repeat(n - 1)
        )
    };
    let answer = h.raw(get(8193).as_bytes(), "long target").await;
    assert!(answer.starts_with("HTTP/1.1 414"), "{}", &answer[..200]);
    assert!(answer.contains("8193 bytes; the gateway forwards at most 8192"));
    let answer = h.raw(get(8192).as_bytes(), "target at the limit").await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{}", &answer[..200]);
    assert!(
        answer.contains("...[7168_more_bytes]"),
        "{}",
        &answer[..200]
    );

    // A Host that is no host (RFC 9112 §3.2: 400), not one no app serves (404).
    for host in ["x@alice.example", "alice.example:http", "[::1"] {
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let answer = h.raw(req.as_bytes(), "bad host").await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{host}: {answer}");
        assert!(answer.contains("is not a host"), "{host}: {answer}");
    }

    // The app's device is not connected: 502 naming app and device.
    let c = h.curl(&h.https_args("offline.alice.example", "/")).await;
    assert_eq!(c.code, 502, "{c:?}");
    assert!(
        c.body.contains("app offline") && c.body.contains("device home2 is offline"),
        "{}",
        c.body
    );

    // The device is there, its service is not: the device refuses the (early-opened) stream
    // and the 502 names the service, as when the gateway waited for the device's reply.
    let c = h.curl(&h.http_args("down.alice.example", "/")).await;
    assert_eq!(c.code, 502, "{c:?}");
    assert!(
        c.body
            .contains("app down: service down on device home1 is not answering"),
        "{}",
        c.body
    );
    // The same with an upload larger than what goes before the device's reply
    // (`EARLY_BYTES`): the body's writer reads the refusal first, and the answer must still
    // name the service (it said the service closed the connection without answering).
    let upload = h.dir.path().join("upload");
    std::fs::write(&upload, vec![b'u'; 4 * tunnel::stream::EARLY_BYTES]).unwrap();
    let mut args = h.http_args("down.alice.example", "/");
    args.extend([
        "-H".into(),
        "Expect:".into(),
        "--data-binary".into(),
        format!("@{}", upload.display()),
    ]);
    let c = h.curl(&args).await;
    assert_eq!(c.code, 502, "{c:?}");
    assert!(
        c.body
            .contains("app down: service down on device home1 is not answering"),
        "{}",
        c.body
    );

    // The service takes longer than the gateway waits.
    let t = Instant::now();
    let c = h.curl(&h.http_args(DOMAIN, "/slow")).await;
    assert_eq!(c.code, 504, "{c:?}");
    assert!(c.body.contains("did not answer"), "{}", c.body);
    assert!(t.elapsed() < SLOW, "504 only after {:?}", t.elapsed());

    // Slowloris: a client that never finishes its headers is disconnected.
    let mut tcp = tokio::net::TcpStream::connect(h.http).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: alice.example\r\nX-Slow: ")
        .await
        .unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("slow client still connected after 10 s")
        .unwrap_or(0);
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(t.elapsed() >= HEADER_TIMEOUT / 2, "{:?}", t.elapsed());

    // A silent client (connects, sends nothing, not even a preface) is dropped too, so idle
    // sockets cannot hold the front's connection slots.
    let mut idle = tokio::net::TcpStream::connect(h.http).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("silent client still connected after 10 s")
        .unwrap_or(0);
    assert_eq!(n, 0, "the gateway answered a client that said nothing");

    // A client that stops sending its request body midway gets a 408 once the body has
    // waited BODY_TIMEOUT, not a 502 that would blame the device, and the connection ends.
    let t = Instant::now();
    let answer = h
        .raw(
            b"POST /upload HTTP/1.1\r\nHost: alice.example\r\nContent-Length: 100\r\n\r\n0123456789",
            "stalled upload",
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("no more of the request body arrived"),
        "{answer}"
    );
    assert!(t.elapsed() >= BODY_TIMEOUT / 2, "{:?}", t.elapsed());

    // The same over HTTP/2 (hyper's server), from a client whose body stops after 10 bytes.
    // (curl cannot do this one: while its upload waits on stdin it reads no answer.)
    struct Stuck(Option<Bytes>);
    impl Body for Stuck {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            match self.0.take() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Poll::Pending,
            }
        }
    }
    let (mut send, conn) = h2c_client(h.http).await;
    let req = Request::put(format!("http://{DOMAIN}/upload"))
        .body(Stuck(Some(Bytes::from_static(b"0123456789"))))
        .unwrap();
    let t = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .expect("stalled HTTP/2 upload unanswered after 10 s")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("no more of the request body arrived"),
        "{body}"
    );
    assert!(t.elapsed() >= BODY_TIMEOUT / 2, "{:?}", t.elapsed());
    conn.abort();

    // A body that fails on the client's side (here a malformed chunk size) is the client's
    // error: 400 naming the body, not a 502 that would blame the device.
    let answer = h
        .raw(
            b"POST /upload HTTP/1.1\r\nHost: alice.example\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
            "malformed body",
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("the request body could not be read"),
        "{answer}"
    );

    // A body declared larger than the app's max_body is refused before it goes anywhere; one
    // within it goes through.
    let mut big = h.http_args("small.alice.example", "/upload");
    big.extend(["--data-binary".into(), "x".repeat(2000)]);
    let c = h.curl(&big).await;
    assert_eq!(c.code, 413, "{c:?}");
    assert!(c.body.contains("up to 1024 bytes"), "{}", c.body);
    let mut fits = h.http_args("small.alice.example", "/upload");
    fits.extend(["--data-binary".into(), "x".repeat(100)]);
    assert_eq!(h.curl(&fits).await.code, 200);

    // Rate limit: a burst of 2, then 429 with Retry-After.
    for _ in 0..2 {
        let c = h.curl(&h.http_args("limited.alice.example", "/")).await;
        assert_eq!(c.code, 200, "{c:?}");
    }
    let c = h.curl(&h.http_args("limited.alice.example", "/")).await;
    assert_eq!(c.code, 429, "{c:?}");
    let retry: u64 = c
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=3600).contains(&retry), "{retry}");

    // Requests the connection limit refuses spend none of the rate: with one in progress
    // (the burst's first), each other is a 503 (it spent a token, so the second was a 503
    // and the rest 429s); once it ends, the burst's second goes through.
    let slow = {
        let mut a = h.http_args("capped.alice.example", "/slow");
        a.extend(["--max-time".into(), "4".into()]);
        a
    };
    let held = {
        let args = slow.clone();
        let dir = h.dir.path().to_owned();
        tokio::spawn(async move {
            Command::new("curl")
                .args(["-sS", "-o"])
                .arg(dir.join("slow-body"))
                .args(&args)
                .output()
                .await
        })
    };
    // In progress once the gateway has counted it (admitted, slot taken).
    let start = Instant::now();
    loop {
        let status: serde_json::Value =
            serde_json::from_str(&h.admin_get("/status").await).expect("status JSON");
        let admitted = status["apps"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["name"] == "capped")
            .and_then(|a| a["counters"]["requests"].as_u64());
        if admitted == Some(1) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the slow request never began"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..3 {
        let c = h.curl(&h.http_args("capped.alice.example", "/")).await;
        assert_eq!(c.code, 503, "request {i} beside the one in progress: {c:?}");
    }
    let _ = held.await;
    loop {
        let c = h.curl(&h.http_args("capped.alice.example", "/")).await;
        if c.code == 200 {
            break;
        }
        assert_eq!(c.code, 503, "the burst's second spent by refusals: {c:?}");
        assert!(start.elapsed() < Duration::from_secs(30), "{c:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A head that cannot be parsed is refused unread, and counted without an app.
    let answer = h
        .raw(
            b"GET / HTTP/1.1\r\nHost alice.example\r\n\r\n",
            "garbled head",
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // Every answer was counted by app and status.
    let m = h.admin_get("/metrics").await;
    for line in [
        // No app: the first request and the 8 KiB target.
        "zonegate_http_requests_total{app=\"-\",code=\"404\"} 2",
        "zonegate_http_requests_total{app=\"-\",code=\"414\"} 1",
        "zonegate_http_requests_total{app=\"web\",code=\"400\"} 1",
        "zonegate_http_unreadable_requests_total{code=\"400\"} 1",
        "zonegate_http_requests_total{app=\"offline\",code=\"502\"} 1",
        "zonegate_http_requests_total{app=\"web\",code=\"504\"} 1",
        "zonegate_http_requests_total{app=\"limited\",code=\"429\"} 1",
        "zonegate_app_refusals_total{app=\"limited\",reason=\"rate_limited\"} 1",
        // The agent's connection went through the handshake gate; nothing was refused.
        "zonegate_tunnel_handshake_attempts_total{outcome=\"refused\"} 0",
    ] {
        assert!(m.contains(line), "missing {line}:\n{m}");
    }
    let admitted: u64 = m
        .lines()
        .find_map(|l| {
            l.strip_prefix("zonegate_tunnel_handshake_attempts_total{outcome=\"admitted\"} ")
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no admitted handshakes line:\n{m}"));
    assert!(admitted >= 1, "{admitted}");
}

/// A pooled connection the service closes as the next request arrives on it: a request that
/// may be repeated (GET, no body) goes once more on a new connection and the client never sees
/// the race; one that may not (POST with a body) is not sent twice and gets a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_lost_to_a_closing_pooled_connection_is_repeated_only_if_idempotent() {
    let h = start().await;
    let host = "stale.alice.example";
    let c = h.curl(&h.http_args(host, "/first")).await;
    assert_eq!(c.code, 200, "{c:?}");
    assert_eq!(c.body, "connection 1, request 1");
    // Services time out idle connections: the pause lets this one decide the pooled connection
    // is done with (the gateway sends a repeatable request again on any reused connection
    // that ended unanswered).
    let idle = Duration::from_millis(200);
    tokio::time::sleep(idle).await;
    // Reuses connection 1, which the service resets unanswered; sent again on connection 2.
    let c = h.curl(&h.http_args(host, "/again")).await;
    assert_eq!(c.code, 200, "{c:?}");
    assert_eq!(c.body, "connection 2, request 1");
    tokio::time::sleep(idle).await;
    // Reuses connection 2, which the service closes (FIN) unanswered: a POST is not repeated.
    let c = h
        .curl(&args(
            &["--data-binary", "once"],
            h.http_args(host, "/post"),
        ))
        .await;
    assert_eq!(c.code, 502, "{c:?}");
    assert!(
        c.body
            .contains("the service on device home1 closed the connection without answering"),
        "{}",
        c.body
    );
    let seen = h.stale_seen.lock().unwrap().clone();
    let want: Vec<(u32, String)> = [
        (1, "GET /first HTTP/1.1"),
        (1, "GET /again HTTP/1.1"),
        (2, "GET /again HTTP/1.1"),
        (2, "POST /post HTTP/1.1"),
    ]
    .into_iter()
    .map(|(c, l)| (c, l.to_owned()))
    .collect();
    assert_eq!(seen, want, "what the service read");
}

/// A client that leaves while its request waits for the answer (a long poll it gave up on)
/// takes the request with it, as nginx does: the service's connection is closed then, not when
/// the response timeout ends (or the service answers into a closed connection). HTTP/1
/// clients that close or reset; an HTTP/2 client that resets its stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_the_answer_takes_its_request_with_it() {
    // Long enough that a request given up at its end could not pass.
    let h = start_tuned(|t| t.response_timeout = Duration::from_secs(120)).await;
    let host = "stale.alice.example";
    let request = format!("GET /held HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let seen = |want: (u32, &'static str)| {
        let seen = h.stale_seen.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !seen
                .lock()
                .unwrap()
                .iter()
                .any(|(c, l)| *c == want.0 && l == want.1)
            {
                assert!(
                    Instant::now() < deadline,
                    "the service never saw {want:?}: {:?}",
                    seen.lock().unwrap()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    for (conn, reset) in [(1, false), (2, true)] {
        let mut tcp = tokio::net::TcpStream::connect(h.http).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        seen((conn, "GET /held HTTP/1.1")).await;
        if reset {
            tcp.set_zero_linger().unwrap();
        }
        drop(tcp);
        seen((conn, "closed")).await;
    }
    let (mut send, _conn) = h2c_client::<http_body_util::Empty<Bytes>>(h.http).await;
    let req = Request::get(format!("http://{host}/held"))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let answer = send.send_request(req);
    let asked = seen((3, "GET /held HTTP/1.1"));
    tokio::select! {
        r = answer => panic!("answered: {r:?}"),
        () = asked => {}
    }
    // The answer's future, dropped by the select, reset the stream.
    seen((3, "closed")).await;
    // Counted as given up (nginx's 499): a service that hangs while its clients give up
    // before the response timeout showed nothing in /metrics.
    let want = "zonegate_http_requests_total{app=\"stale\",code=\"499\"} 3";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = h.admin_get("/metrics").await;
        if metrics.lines().any(|l| l == want) {
            break;
        }
        assert!(Instant::now() < deadline, "no `{want}` in:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The product's quick start: `policies/examples/dfs.toml` makes `/dfs` a read-only public
/// view of a file service that serves from its root (the prefix is stripped, as
/// `zonegate files` needs): GET and HEAD pass, writes are refused with 405 naming what is allowed; the writable
/// `/dfs/rw` is for zone devices only (403 for the public).
/// An HTTP/2 (prior knowledge, plain) client connection to `addr`; the connection runs in the
/// returned task, which ends when the server closes it.
async fn h2c_client<B>(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<hyper::Result<()>>,
)
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    (send, tokio::spawn(conn))
}

/// A HEAD request the gateway answers itself (here: a host no app serves) gets its status
/// without a body over HTTP/2 as over HTTP/1: hyper's HTTP/2 server sends whatever body it is
/// handed, and clients refuse DATA on a HEAD stream (RFC 9113 §8.1.1; h2 resets it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_head_the_gateway_answers_itself_carries_no_body() {
    let h = start().await;
    let (mut send, _conn) = h2c_client::<http_body_util::Empty<Bytes>>(h.http).await;
    for method in [hyper::Method::HEAD, hyper::Method::GET] {
        let req = Request::builder()
            .method(method.clone())
            .uri("http://nobody.alice.example/x")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{method}: {e}"))
            .to_bytes();
        assert_eq!(body.is_empty(), method == hyper::Method::HEAD, "{method}");
    }
}

/// A request head with 20 KiB of cookies (sites with split sign-in cookies send such) passes
/// over HTTP/2 as over HTTP/1. hyper's HTTP/2 default of 16 KiB refused it with 431, and only
/// over h2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_request_with_a_large_head_passes_as_over_http1() {
    let h = start().await;
    let (mut send, _conn) = h2c_client::<http_body_util::Empty<Bytes>>(h.http).await;
    let req = Request::get(format!("http://{DOMAIN}/bytes/10"))
        .header("cookie", format!("session={}", "c".repeat(20 << 10)))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

/// An HTTP/2 client over plain TCP whose streams grant `window` bytes of credit (and no more
/// while their bodies are not read), and its connection's task.
async fn h2_client_granting(
    h: &Harness,
    window: u32,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let tcp = tokio::net::TcpStream::connect(h.http).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(window)
            .handshake::<_, http_body_util::Empty<Bytes>>(TokioIo::new(tcp))
            .await
            .unwrap();
    (send, tokio::spawn(conn))
}

/// An HTTP/2 client that grants no flow-control credit (a zero initial window) and answers
/// pings cannot hold its streams: the connection is closed once an answer's data waited the
/// send timeout. hyper waits for credit without a deadline, and every such stream kept its
/// tunnel stream and app slot for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_granting_no_credit_is_cut_after_the_send_timeout() {
    let send_timeout = Duration::from_secs(2);
    let h = start_sending_within(send_timeout).await;
    let (mut send, conn) = h2_client_granting(&h, 0).await;
    let started = Instant::now();
    let mut answers = Vec::new();
    for _ in 0..4 {
        let req = Request::get(format!("http://{DOMAIN}/bytes/1000000"))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
            .await
            .expect("headers in time")
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        answers.push(resp);
    }
    tokio::time::timeout(send_timeout * 3 + Duration::from_secs(5), conn)
        .await
        .expect("the connection was held past the send timeout")
        .unwrap()
        .ok();
    assert!(
        started.elapsed() >= send_timeout,
        "cut before the send timeout: {:?}",
        started.elapsed()
    );
}

/// An HTTP/2 client granting a window of one byte takes each answer's head and first byte;
/// hyper hands the rest of each (one chunk) to h2 and lets the answer go. Once the
/// connection closes (here: idle), what h2 could not send is under the send timeout too: the
/// connection held on after its GOAWAY for as long as the client answered pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_taking_none_of_its_finished_answers_is_cut_after_the_goaway() {
    let send_timeout = Duration::from_secs(2);
    let h = start_tuned(|t| {
        t.send_timeout = send_timeout;
        t.h2_idle_timeout = Duration::from_secs(1);
    })
    .await;
    let (mut send, conn) = h2_client_granting(&h, 1).await;
    let started = Instant::now();
    // All four at once: one by one, a pause of the idle timeout between two (a busy machine)
    // would let the connection close before the next.
    let asked: Vec<_> = (0..4)
        .map(|_| {
            // The gateway's own answer (no such host): one chunk, no device needed.
            let req = Request::get("http://nowhere.invalid/")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            send.send_request(req)
        })
        .collect();
    let answers = tokio::time::timeout(
        Duration::from_secs(10),
        futures_util::future::join_all(asked),
    )
    .await
    .expect("headers in time");
    for a in &answers {
        assert!(a.is_ok(), "{a:?}");
    }
    tokio::time::timeout(
        Duration::from_secs(1) + send_timeout * 3 + Duration::from_secs(5),
        conn,
    )
    .await
    .expect("the connection was held past the idle and send timeouts")
    .unwrap()
    .ok();
    assert!(started.elapsed() >= send_timeout, "{:?}", started.elapsed());
}

/// An HTTP/2 client granting a window of one byte, whose finished answers' tails h2 holds,
/// cannot keep them (a 16 KiB buffer each, up to 128 a connection) by keeping the connection
/// busy with a request now and then: the tails are under the stall check as answers are, and
/// resting past their allowance while other answers move closes the connection. It was never
/// closed (no answer open, so nothing watched; never idle, so no GOAWAY).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_keeping_its_unsent_tails_busy_is_cut() {
    let send_timeout = Duration::from_secs(1);
    let h = start_tuned(|t| {
        t.send_timeout = send_timeout;
        t.h2_idle_timeout = Duration::from_secs(2);
    })
    .await;
    let (mut send, mut conn) = h2_client_granting(&h, 1).await;
    let started = Instant::now();
    let ask = |send: &mut hyper::client::conn::http2::SendRequest<_>| {
        // The gateway's own answer (no such host): one chunk, no device needed.
        let req = Request::get("http://nowhere.invalid/")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        send.send_request(req)
    };
    let first: Vec<_> = (0..4).map(|_| ask(&mut send)).collect();
    let _answers = tokio::time::timeout(
        Duration::from_secs(10),
        futures_util::future::join_all(first),
    )
    .await
    .expect("headers in time");
    // A request every 300 ms (within the idle timeout), each answer's tail left unsent too,
    // until the gateway closes the connection; 30 s at most (it closes after 5 send timeouts
    // of its tails resting, and one more).
    let deadline = Duration::from_secs(30);
    let mut kept = Vec::new();
    let closed = loop {
        if started.elapsed() > deadline {
            break false;
        }
        tokio::select! {
            _ = &mut conn => break true,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
        if send.ready().await.is_err() {
            break true;
        }
        kept.push(tokio::spawn(ask(&mut send)));
    };
    assert!(
        closed,
        "the connection was held for {deadline:?} with its tails unsent"
    );
    assert!(started.elapsed() >= send_timeout, "{:?}", started.elapsed());
}

/// A service that sends the head and part of its answer and then hangs no longer holds the
/// client: after the read timeout without more of the answer the client's connection is
/// cut (the answer cannot be completed), and the request is logged. It waited for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_hangs_mid_answer_is_cut_after_the_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = start().await;
    let mut c = tokio::net::TcpStream::connect(h.http).await.unwrap();
    c.write_all(format!("GET /hangs-mid-answer HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let r = tokio::time::timeout(
        READ_TIMEOUT * 3 + Duration::from_secs(5),
        c.read_to_end(&mut got),
    )
    .await
    .expect("the client was held past the response timeout");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{r:?} {text}");
    assert!(text.ends_with("first part"), "{text}");
    assert!(started.elapsed() >= READ_TIMEOUT, "{:?}", started.elapsed());
}

/// An answer of untold length that breaks part way reaches an HTTP/1.0 client (which only
/// the close can tell where it ends) as a reset connection, not a clean close that would read
/// as the whole answer. HTTP/1.1 clients tell by the chunked framing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_short_resets_an_http10_clients_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = start().await;
    let mut c = tokio::net::TcpStream::connect(h.http).await.unwrap();
    c.write_all(format!("GET /breaks-mid-answer HTTP/1.0\r\nHost: {DOMAIN}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut got))
        .await
        .expect("the answer neither ended nor failed");
    let text = String::from_utf8_lossy(&got);
    let e = r.expect_err(&format!("a cut answer ended cleanly: {text:?}"));
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset,
        "{e}: {text:?}"
    );
}

/// One HTTP/2 stream whose reader rests (a paused video: its window full) is no stall while
/// the connection's other answers move — a connection where nothing moves is cut after the
/// send timeout — but it is given five send timeouts, not for ever: a client that stopped
/// reading its downloads and asked for a small page now and then kept every download's tunnel
/// stream (and buffers) while each small answer counted as progress. The connection then
/// closes gracefully (new requests go elsewhere, those in flight may finish) and is cut a send
/// timeout later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resting_http2_stream_is_given_five_send_timeouts() {
    // Three seconds: an /echo answered within them keeps the connection "moving" on a busy
    // machine (a gap of a whole send timeout would make it a stalled connection, cut at
    // once); what is measured is the resting allowance.
    let send_timeout = Duration::from_secs(3);
    let h = start_sending_within(send_timeout).await;
    let tcp = tokio::net::TcpStream::connect(h.http).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(64 * 1024)
            .handshake::<_, http_body_util::Empty<Bytes>>(TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let get = |path: &str| {
        Request::get(format!("http://{DOMAIN}{path}"))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap()
    };
    // Never read: its window fills and its answer waits.
    let resting = send.send_request(get("/bytes/10000000")).await.unwrap();
    let started = Instant::now();
    let (mut served, mut served_early) = (0, 0);
    while !conn.is_finished() && started.elapsed() < send_timeout * 10 {
        if let Ok(Ok(resp)) = tokio::time::timeout(WAIT_CUT, send.send_request(get("/echo"))).await
        {
            if resp.into_body().collect().await.is_ok() {
                served += 1;
                if started.elapsed() < send_timeout * 3 {
                    served_early += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        served_early >= 3,
        "the busy connection was not served on: {served_early} answers in three send timeouts"
    );
    let took = started.elapsed();
    assert!(conn.is_finished(), "still open after {took:?}");
    assert!(
        took >= send_timeout * gateway::http::RESTING_TIMEOUTS,
        "cut before its allowance: {took:?} ({served} served)"
    );
    drop(resting);
}

/// An HTTP/2 client that resets most of its requests after the front took them ("rapid
/// reset") loses its connection past a burst of 200 (refilling at 20 a second): each request had
/// already reached the device, and h2's own bound counts only streams reset before hyper
/// took them (before, such a client was let go on until it went quiet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_resetting_its_requests_is_cut() {
    let h = start().await;
    let (mut send, conn) = h2c_client::<http_body_util::Empty<Bytes>>(h.http).await;
    let mut batches = 0;
    while !conn.is_finished() && batches < 6 {
        batches += 1;
        let mut pending = Vec::new();
        let before = h.streams_to_home1();
        for _ in 0..100 {
            if send.ready().await.is_err() {
                break;
            }
            let req = Request::get(format!("http://{DOMAIN}/slow"))
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            pending.push(send.send_request(req));
        }
        // Taken by the front and on their way to the device (each opens its own stream to
        // it, the pool holding no idle connection); then reset. Only requests the front took
        // count, so a busy machine's front is waited for.
        let taken = before + pending.len() as u64;
        let _ = tokio::time::timeout(WAIT_CUT, async {
            while h.streams_to_home1() < taken {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        drop(pending);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ended = tokio::time::timeout(WAIT_CUT, conn)
        .await
        .expect("a client resetting its requests kept its connection")
        .unwrap();
    // Cut (not the idle GOAWAY a quiet connection gets) right past the limit: 201 abandoned
    // requests are in the third batch.
    assert!(ended.is_err(), "closed, not cut: {ended:?}");
    assert!(
        (3..=4).contains(&batches),
        "cut after {batches} batches of 100, not right past the limit"
    );
}

/// Answers a service may not give are not passed on as given: a `101` the request did not
/// ask for becomes a 502 (it reached the client, which then held an "upgraded" connection),
/// and a 204's Content-Length is dropped (RFC 9110 §8.6). Request methods longer than 32
/// bytes are refused before they reach the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_a_service_may_not_give_are_not_passed_on() {
    let h = start().await;
    let host = "stale.alice.example";
    let c = h.curl(&h.http_args(host, "/switch")).await;
    assert_eq!(c.code, 502, "{c:?}");
    let c = h.curl(&h.http_args(host, "/no-content")).await;
    assert_eq!(c.code, 204, "{c:?}");
    assert!(
        !c.headers.to_ascii_lowercase().contains("content-length"),
        "{c:?}"
    );
    let long = format!("{} / HTTP/1.1\r\nHost: {host}\r\n\r\n", "A".repeat(40));
    let answer = h.raw(long.as_bytes(), "a 40-byte method").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

/// CONNECT and TRACE are answered 501 by the gateway whatever the app allows (CONNECT was
/// passed on as `CONNECT /`, TRACE echoed cookies back), and so is an HTTP/2 method longer
/// than any real one (logged whole before). A raw UTF-8 path is passed on in its escaped
/// normal form, the one routing and rules saw (it was refused as naming no host, then passed
/// raw, which a `/caf%C3%A9` rule did not match).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_not_proxied_and_raw_utf8_paths() {
    let h = start().await;
    let connect = format!("CONNECT {DOMAIN}:443 HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n");
    let answer = h.raw(connect.as_bytes(), "a CONNECT").await;
    assert!(answer.starts_with("HTTP/1.1 501"), "{answer}");
    let trace = format!("TRACE /echo HTTP/1.1\r\nHost: {DOMAIN}\r\nCookie: secret=1\r\n\r\n");
    let answer = h.raw(trace.as_bytes(), "a TRACE").await;
    assert!(answer.starts_with("HTTP/1.1 501"), "{answer}");
    assert!(!answer.contains("secret"), "{answer}");
    let mut raw = b"GET /echo/caf".to_vec();
    raw.extend_from_slice("é HTTP/1.1\r\nHost: ".as_bytes());
    raw.extend_from_slice(format!("{DOMAIN}\r\n\r\n").as_bytes());
    let answer = h.raw(&raw, "a raw UTF-8 path").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("path=/echo/caf%C3%A9 "), "{answer}");
    // A C1 control (U+0085, "next line", which Python's http.server splits request lines at)
    // goes escaped too: never raw to the service.
    let mut raw = b"GET /echo/a".to_vec();
    raw.extend_from_slice("\u{85}b HTTP/1.1\r\nHost: ".as_bytes());
    raw.extend_from_slice(format!("{DOMAIN}\r\n\r\n").as_bytes());
    let answer = h.raw(&raw, "a C1 control in the path").await;
    assert!(answer.contains("path=/echo/a%C2%85b "), "{answer}");
    let (mut send, _conn) = h2c_client::<http_body_util::Empty<Bytes>>(h.http).await;
    let long = Request::builder()
        .method(http::Method::from_bytes("X".repeat(100).as_bytes()).unwrap())
        .uri(format!("http://{DOMAIN}/echo"))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(long).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_IMPLEMENTED);
}

/// A service that stops reading an upload (and never answers) gets the request answered 504
/// once nothing of the body has moved for the response plus body timeouts; before, the
/// answer's timer started only at the body's end, which never came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_stops_reading_an_upload_times_out() {
    let h = start().await;
    let tcp = tokio::net::TcpStream::connect(h.http).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    // 256 MiB, made as it is sent: far more than every buffer on the way holds.
    let body = Pattern {
        sent: 0,
        len: 256 << 20,
    };
    let req = Request::post(format!("http://{DOMAIN}/wedged"))
        .header("host", DOMAIN)
        .body(body)
        .unwrap();
    let t = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(30), send.send_request(req))
        .await
        .expect("a wedged upload never answered")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(
        t.elapsed() >= RESPONSE_TIMEOUT + BODY_TIMEOUT,
        "{:?}",
        t.elapsed()
    );
    // Said as what happened: not "did not answer within" the response timeout.
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("stopped taking the request body"), "{body}");
    conn.abort();
}

/// An HTTP/2 client that keeps its connection but sends no request (it answers pings, as
/// every HTTP/2 stack does) is closed with GOAWAY after the idle time; a connection with a
/// request in progress is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_are_closed() {
    let h = start().await;
    let (mut send, mut conn) = h2c_client(h.http).await;
    let req = Request::get(format!("http://{DOMAIN}/idle"))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let _ = resp.into_body().collect().await.unwrap();
    let t = Instant::now();
    let ended = tokio::time::timeout(H2_IDLE * 4, &mut conn).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection stayed open");
    assert!(t.elapsed() >= H2_IDLE / 2, "{:?}", t.elapsed());
}

/// Downloads whose clients stopped reading are cut once more of them are held than the
/// device's connection window allows (they would stall its other streams); idle pooled
/// upstream connections, whose last read was an answer's end, are not held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_nobody_reads_are_cut_and_idle_pooled_connections_are_not() {
    let h = start().await;
    let cut = || h.hub.agent("home1").map_or(0, |a| a.streams_cut());
    // A burst of concurrent requests leaves a pool of idle upstream connections.
    let burst = (0..16).map(|i| {
        let h = &h;
        async move { h.curl(&h.http_args(DOMAIN, &format!("/burst/{i}"))).await }
    });
    for c in futures_util::future::join_all(burst).await {
        assert_eq!(c.code, 200, "{c:?}");
    }
    tokio::time::sleep(READER_STALL * 3).await;
    assert_eq!(cut(), 0, "idle pooled connections were cut as held");
    let before = h.streams_to_home1();
    for i in 0..4 {
        let c = h.curl(&h.http_args(DOMAIN, &format!("/again/{i}"))).await;
        assert_eq!(c.code, 200, "{c:?}");
    }
    assert_eq!(
        h.streams_to_home1(),
        before,
        "the pooled connections were not reused"
    );

    // Downloads of a gigabyte by clients that read nothing (a small receive buffer, so the
    // gateway's copy stalls at once), a budget's worth at a time: the first wave is held and
    // left alone; each later one pushes the held count over the budget and the oldest wave is
    // cut. (All at once, the ones beyond the connection's window would wait for credit until
    // the first cut, longer than these tests' 2 s response timeout.)
    let budget = tunnel::holds::HELD_BUDGET;
    let mut stalled = Vec::new();
    for wave in 0..6 {
        for _ in 0..budget {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.set_recv_buffer_size(4096).unwrap();
            let mut c = s.connect(h.http).await.unwrap();
            let get = format!("GET /bytes/1000000000 HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n");
            c.write_all(get.as_bytes()).await.unwrap();
            stalled.push(c);
        }
        let want = (wave * budget) as u64;
        crate::inproc::wait_until(
            "the oldest held downloads cut",
            Duration::from_secs(20),
            || cut() >= want,
        )
        .await;
        assert_eq!(cut(), want, "more than the oldest wave cut");
        // A request to the device meanwhile is answered.
        let c = h
            .curl(&h.http_args(DOMAIN, &format!("/meanwhile/{wave}")))
            .await;
        assert_eq!(c.code, 200, "{c:?}");
    }
    // Each client got its answer's head and the body's start: none was refused or timed out.
    for (i, c) in stalled.iter_mut().enumerate() {
        let mut head = [0u8; 17];
        c.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200 OK\r\n", "download {i}");
    }
    drop(stalled);
}

/// A request refused while no method is allowed at this time is refused for the time (403),
/// not for its method (a 405 with an empty `Allow`); a 405's `Allow` names the methods the
/// app's rules name beyond the usual seven.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_say_the_time_and_name_the_rules_methods() {
    let h = start().await;
    for m in ["GET", "POST"] {
        let c = h
            .curl(&args(&["-X", m], h.http_args("closed.alice.example", "/x")))
            .await;
        assert_eq!(c.code, 403, "{m}: {c:?}");
        assert!(
            c.body.contains("outside the allowed hours"),
            "{m}: {}",
            c.body
        );
    }
    let c = h
        .curl(&args(
            &["-X", "POST"],
            h.http_args("dav.alice.example", "/x"),
        ))
        .await;
    assert_eq!(c.code, 405, "{c:?}");
    assert_eq!(c.header("allow").as_deref(), Some("GET, PROPFIND"), "{c:?}");
    let c = h
        .curl(&args(
            &["-X", "PROPFIND"],
            h.http_args("dav.alice.example", "/x"),
        ))
        .await;
    assert_eq!(c.code, 200, "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dfs_example_is_read_only_for_the_public() {
    let h = start().await;
    let c = h.curl(&h.http_args(DOMAIN, "/dfs/photos/a.jpg")).await;
    assert_eq!(c.code, 200, "{c:?}");
    assert!(c.body.contains("path=/photos/a.jpg"), "{}", c.body);
    let c = h
        .curl(&args(&["-I"], h.http_args(DOMAIN, "/dfs/photos/a.jpg")))
        .await;
    assert_eq!(c.code, 200, "{c:?}");
    for m in ["PUT", "POST", "DELETE"] {
        let c = h
            .curl(&args(
                &["-X", m, "--data-binary", "x"],
                h.https_args(DOMAIN, "/dfs/photos/a.jpg"),
            ))
            .await;
        assert_eq!(c.code, 405, "{m}: {c:?}");
        assert_eq!(c.header("allow").as_deref(), Some("GET, HEAD"), "{c:?}");
        assert!(c.body.contains("app dfs does not allow"), "{}", c.body);
    }
    // The app's own path without its slash goes to it with one (stripped, both are `/`).
    let c = h.curl(&h.http_args(DOMAIN, "/dfs?view=list")).await;
    assert_eq!(c.code, 308, "{c:?}");
    assert_eq!(c.header("location").as_deref(), Some("/dfs/?view=list"));
    let c = h.curl(&h.https_args(DOMAIN, "/dfs/rw/file")).await;
    assert_eq!(c.code, 403, "{c:?}");
    assert!(c.body.contains("app dfs-rw"), "{}", c.body);
    // A method-override header must name an allowed method too (frameworks run the POST as
    // it); a GET may not carry a body a service could take for another request.
    for name in [
        "X-HTTP-Method-Override",
        "x_http_method",
        "X-Method-Override",
    ] {
        let c = h
            .curl(&args(
                &["-H", &format!("{name}: DELETE")],
                h.http_args(DOMAIN, "/dfs/photos/a.jpg"),
            ))
            .await;
        assert_eq!(c.code, 405, "{name}: {c:?}");
        assert!(c.body.contains("overridden to DELETE"), "{}", c.body);
    }
    let c = h
        .curl(&h.http_args(DOMAIN, "/dfs/photos/a.jpg?_method=delete"))
        .await;
    assert_eq!(c.code, 405, "_method in the query: {c:?}");
    let c = h
        .curl(&args(
            &["-H", "X-HTTP-Method-Override: HEAD"],
            h.http_args(DOMAIN, "/dfs/photos/a.jpg"),
        ))
        .await;
    assert_eq!(c.code, 200, "an allowed override: {c:?}");
    // A long one is refused with its text clipped, as a method is (it went whole into the
    // answer and the log line).
    let long = "A".repeat(5000);
    let c = h
        .curl(&args(
            &["-H", &format!("X-HTTP-Method-Override: GET,{long}")],
            h.http_args(DOMAIN, "/dfs/photos/a.jpg"),
        ))
        .await;
    assert_eq!(c.code, 405, "{c:?}");
    assert!(c.body.len() < 400 && c.body.contains("AAAA…"), "{}", c.body);
    let smuggled = "GET /admin HTTP/1.1\r\nHost: x\r\n\r\n";
    let got = h
        .raw(
            format!(
                "GET /dfs/photos/a.jpg HTTP/1.1\r\nHost: {DOMAIN}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{smuggled}",
                smuggled.len()
            )
            .as_bytes(),
            "GET with a body",
        )
        .await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert!(got.contains("send it with POST"), "{got}");
    assert!(!got.contains("path=/admin"), "{got}");
    // A refused upload that waits for `100 Continue` gets the refusal, not an invitation to
    // send the body first, and is told the connection closes.
    let got = h
        .raw(
            format!(
                "PUT /dfs/photos/a.jpg HTTP/1.1\r\nHost: {DOMAIN}\r\nContent-Length: 100000000\r\nExpect: 100-continue\r\n\r\n"
            )
            .as_bytes(),
            "PUT awaiting 100 Continue",
        )
        .await;
    assert!(got.starts_with("HTTP/1.1 405"), "{got}");
    assert!(
        got.to_ascii_lowercase().contains("connection: close"),
        "{got}"
    );
    // An expectation other than 100-continue is refused, never passed on to the service.
    let got = h
        .raw(
            format!(
                "GET /dfs/photos/a.jpg HTTP/1.1\r\nHost: {DOMAIN}\r\nExpect: x-fast-lane\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
            "GET with an unknown expectation",
        )
        .await;
    assert!(got.starts_with("HTTP/1.1 417"), "{got}");
    assert!(got.contains("x-fast-lane"), "{got}");
    // Every Expect line counts: a 100-continue after another expectation is refused as the
    // only one is, not invited with a `100` first and then refused.
    let got = h
        .raw(
            format!(
                "PUT /dfs/photos/a.jpg HTTP/1.1\r\nHost: {DOMAIN}\r\nContent-Length: 100000000\r\nExpect: x-fast-lane\r\nExpect: 100-continue\r\n\r\n"
            )
            .as_bytes(),
            "PUT with two expectations",
        )
        .await;
    assert!(got.starts_with("HTTP/1.1 4"), "{got}");
    assert!(!got.contains("100 Continue"), "{got}");
    let got = h
        .raw(
            format!(
                "GET /dfs/photos/a.jpg HTTP/1.1\r\nHost: {DOMAIN}\r\nExpect: 100-Continue\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
            "GET expecting 100-continue",
        )
        .await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_tunnel() {
    let h = start().await;
    let tcp = tokio::net::TcpStream::connect(h.http).await.unwrap();
    let url = format!("ws://{DOMAIN}:{}/ws", h.http.port());
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tcp)
        .await
        .expect("websocket handshake through the gateway");
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello through the tunnel"))
        .await
        .unwrap();
    let m = ws.next().await.unwrap().unwrap();
    assert_eq!(m.into_text().unwrap().as_str(), "hello through the tunnel");
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    let m = ws.next().await.unwrap().unwrap();
    assert_eq!(m.into_data().as_ref(), big.as_slice());
    ws.close(None).await.unwrap();

    // An app's bandwidth limit holds after the upgrade too: 300 kB each way at 100 KiB/s.
    let tcp = tokio::net::TcpStream::connect(h.http).await.unwrap();
    let url = format!("ws://slow.{DOMAIN}:{}/ws", h.http.port());
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
    assert_eq!(resp.status(), 101);
    let t = Instant::now();
    ws.send(Message::binary(big.clone())).await.unwrap();
    let m = ws.next().await.unwrap().unwrap();
    assert_eq!(m.into_data().as_ref(), big.as_slice());
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "an upgraded connection was not shaped: {:?}",
        t.elapsed()
    );
    ws.close(None).await.unwrap();
}

/// A front with all its connections open makes room for a client holding fewer, as the tcp
/// apps do: the longest-idle connection of the client holding the most is closed for it (a
/// few addresses holding idle connections locked everyone else out until they chose to close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_front_makes_room_for_a_client_holding_fewer() {
    let h = start_tuned(|t| {
        t.max_connections = 8;
        t.max_connections_per_ip = 6;
        // Idle keep-alive connections, and the long poll, stay open for the test's length.
        t.header_read_timeout = Duration::from_secs(60);
        t.response_timeout = Duration::from_secs(60);
    })
    .await;
    let request = format!("GET / HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n");
    // Opens a connection from `ip`, answered once, then left idle (keep-alive).
    let open = |ip: &'static str| {
        let request = request.clone();
        let addr = h.http;
        async move {
            let mut c = socket_from(ip).connect(addr).await.unwrap();
            c.write_all(request.as_bytes()).await.unwrap();
            let mut got = vec![0u8; 4096];
            let n = tokio::time::timeout(WAIT_CUT, c.read(&mut got))
                .await
                .unwrap_or_else(|_| panic!("{ip}: no answer"))
                .unwrap();
            (c, String::from_utf8_lossy(&got[..n]).into_owned())
        }
    };
    // The hog's quietest connection is a long poll waiting for its answer: busy, not idle.
    let mut poll = socket_from("127.0.0.1").connect(h.http).await.unwrap();
    poll.write_all(b"GET /held HTTP/1.1\r\nHost: stale.alice.example\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut hog = Vec::new();
    for _ in 0..5 {
        let (c, answer) = open("127.0.0.1").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        hog.push(c);
        // Each later one is more recently active: the first is the idlest.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut other = Vec::new();
    for _ in 0..2 {
        let (c, answer) = open("127.0.0.2").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        other.push(c);
    }
    // All 8 open: 127.0.0.2 holds 2, 127.0.0.1 holds 6 (at least two more): room is made.
    let (_third, answer) = open("127.0.0.2").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    let mut buf = [0u8; 16];
    let end = tokio::time::timeout(WAIT_CUT, hog[0].read(&mut buf))
        .await
        .expect("the hog's idlest connection between requests was not closed");
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    let waiting = tokio::time::timeout(Duration::from_millis(300), poll.read(&mut buf)).await;
    assert!(waiting.is_err(), "the long poll was cut: {waiting:?}");
    // Counted just after the socket is closed: looked at until it shows.
    let started = Instant::now();
    loop {
        let metrics = h.admin_get("/metrics").await;
        if metrics.contains("zonegate_http_connections_evicted_total 1\n") {
            break;
        }
        assert!(started.elapsed() < WAIT_CUT, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Full again, 127.0.0.1 holding 5: a third client gets in the same way (its idlest
    // connection between requests goes).
    let (_c, answer) = open("127.0.0.3").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

/// An upgraded connection keeps counting against its client's limit of open connections
/// (and the front's): it outlives the task that served its HTTP, which gave both slots back
/// as it handed the connection over — one address could hold any number of WebSockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_connections_count_against_the_per_client_limit() {
    let h = start_with(2).await;
    let url = format!("ws://{DOMAIN}:{}/ws", h.http.port());
    let mut sockets = Vec::new();
    for _ in 0..2 {
        let tcp = socket_from("127.0.0.1").connect(h.http).await.unwrap();
        let (ws, resp) = tokio_tungstenite::client_async(url.clone(), tcp)
            .await
            .expect("websocket handshake through the gateway");
        assert_eq!(resp.status(), 101);
        sockets.push(ws);
    }
    // Served: a request on a connection gets an answer.
    async fn served(mut c: tokio::net::TcpStream) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let req = format!("GET /nothing HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n");
        if c.write_all(req.as_bytes()).await.is_err() {
            return false;
        }
        let mut buf = [0u8; 5];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut buf)).await,
            Ok(Ok(_)) if &buf == b"HTTP/"
        )
    }
    let third = socket_from("127.0.0.1").connect(h.http).await.unwrap();
    assert!(
        !served(third).await,
        "a third connection next to two WebSockets"
    );
    let other = socket_from("127.0.0.2").connect(h.http).await.unwrap();
    assert!(served(other).await, "another address is served");
    // A WebSocket that closes gives its slot back.
    let mut ws = sockets.pop().unwrap();
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    drop(ws);
    let mut back = false;
    for _ in 0..50 {
        if served(socket_from("127.0.0.1").connect(h.http).await.unwrap()).await {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "a closed WebSocket gave its slot back");
}

/// Resident and peak memory of this process (kB): the gateway, agent and backend all run in
/// it, curl does not.
fn mem_kb() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_with_flat_memory() {
    const LEN: u64 = 256 * 1024 * 1024;
    /// Growth allowed: buffers and flow-control windows (QUIC allows 32 MiB in flight per
    /// connection), far below the 256 MiB a buffering proxy would hold.
    const MAX_GROWTH_KB: u64 = 96 * 1024;
    // Peak RSS is per process: measured in a process of its own, not next to other tests.
    if !crate::common::in_isolated_process(
        "http_front::large_bodies_stream_both_ways_with_flat_memory",
    ) {
        return;
    }
    let h = start().await;
    let (rss0, _) = mem_kb();

    // Download over HTTP/2 + TLS (hyper's server), then HTTP/1.1 (the front's own, whose
    // long body frames go out as the tunnel stream delivered them), with a length and
    // chunked, checked as they arrive.
    let mut a = h.https_args(DOMAIN, &format!("/bytes/{LEN}"));
    a.insert(0, "--http2".into());
    let mut b = h.http_args(DOMAIN, &format!("/bytes/{LEN}"));
    b.insert(0, "--http1.1".into());
    let mut c = h.http_args(DOMAIN, &format!("/chunked-bytes/{LEN}"));
    c.insert(0, "--http1.1".into());
    for (what, args) in [("HTTP/2", a), ("HTTP/1.1", b), ("HTTP/1.1 chunked", c)] {
        let t = Instant::now();
        let mut child = Command::new("curl")
            .args(["-sS", "--max-time", "120", "-o", "-"])
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut got = 0u64;
        let mut intact = true;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = out.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            intact &= is_pattern(got, &buf[..n]);
            got += n as u64;
        }
        assert!(child.wait().await.unwrap().success());
        assert_eq!(got, LEN, "{what}");
        assert!(
            intact,
            "{what}: downloaded bytes differ from what the service sent"
        );
        eprintln!("download over {what}: 256 MiB in {:?}", t.elapsed());
    }
    let (_, hwm_down) = mem_kb();

    // Upload over HTTP/1.1 (chunked, from curl's stdin), hashed by the service.
    let mut a = h.http_args(DOMAIN, "/upload");
    a.insert(0, "--http1.1".into());
    let mut child = Command::new("curl")
        .args(["-sS", "--max-time", "120", "-T", "-"])
        .args(&a)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feeder = tokio::spawn(async move {
        let mut at = 0;
        while at < LEN {
            let n = (1024 * 1024).min(LEN - at);
            if stdin.write_all(pattern_chunk(at, n)).await.is_err() {
                return at; // curl gave up: its stderr says why
            }
            at += n;
        }
        at
    });
    let o = child.wait_with_output().await.unwrap();
    let fed = feeder.await.unwrap();
    let body = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        body,
        format!("len={LEN} intact=true"),
        "fed {fed} bytes; curl: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // And with a length (a file): the front reads it in large pieces and hands them on.
    let file = h.dir.path().join("upload.bin");
    let mut f = std::fs::File::create(&file).unwrap();
    let mut at = 0;
    while at < LEN {
        let n = (1024 * 1024).min(LEN - at);
        std::io::Write::write_all(&mut f, pattern_chunk(at, n)).unwrap();
        at += n;
    }
    drop(f);
    let mut a = h.http_args(DOMAIN, "/upload");
    a.insert(0, "--http1.1".into());
    a.insert(0, file.display().to_string());
    a.insert(0, "-T".into());
    let o = Command::new("curl")
        .args(["-sS", "--max-time", "120"])
        .args(&a)
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("len={LEN} intact=true"),
        "curl: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::remove_file(&file).unwrap();
    let (_, hwm_up) = mem_kb();

    let growth = hwm_down.max(hwm_up).saturating_sub(rss0);
    eprintln!(
        "memory: rss before {rss0} kB, peak after download {hwm_down} kB, after upload {hwm_up} kB"
    );
    assert!(
        growth < MAX_GROWTH_KB,
        "peak memory grew by {growth} kB while moving 5 x 256 MiB"
    );
    // Both directions were counted: the upload by its request body's counter, the download
    // by its response body's.
    let m = h.admin_get("/metrics").await;
    for dir in ["in", "out"] {
        let name = format!("zonegate_app_bytes_{dir}_total{{app=\"web\"}}");
        let line = m.lines().find(|l| l.starts_with(&name)).unwrap();
        let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n >= LEN, "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_metrics_and_headless_chromium() {
    let h = start().await;
    let c = h.curl(&h.http_args(DOMAIN, "/x")).await;
    assert_eq!(c.code, 200);

    let m = h.admin_get("/metrics").await;
    for want in [
        "zonegate_http_requests_total{app=\"web\",code=\"200\"} 1",
        "zonegate_http_request_duration_seconds_count{app=\"web\"} 1",
        "zonegate_app_requests_total{app=\"web\"} 1",
        "zonegate_tunnel_agents 1",
        "zonegate_zone_health{colour=\"yellow\"} 1",
        "zonegate_tunnel_rtt_seconds{device=\"home1\"}",
    ] {
        assert!(m.contains(want), "missing {want}:\n{m}");
    }
    // Certificate ends: home1's as it connected (from the handshake), and as the zone config
    // lists it for every device, home2 not connected included; this gateway's own.
    let end = h.hub.status()[0].cert_not_after_unix;
    let creds = h.hub.creds();
    let listed = |d: &str| {
        creds
            .zone()
            .config
            .devices
            .iter()
            .find(|e| e.name.as_str() == d)
            .unwrap()
            .cert_expires_at
            .unix_timestamp()
    };
    for want in [
        format!("zonegate_tunnel_certificate_not_after_seconds{{device=\"home1\"}} {end}\n"),
        format!(
            "zonegate_device_certificate_not_after_seconds{{device=\"home1\"}} {}\n",
            listed("home1")
        ),
        format!(
            "zonegate_device_certificate_not_after_seconds{{device=\"home2\"}} {}\n",
            listed("home2")
        ),
        format!(
            "zonegate_certificate_not_after_seconds {}\n",
            creds.cert_not_after().unix_timestamp()
        ),
        format!(
            "zonegate_zone_config_expires_seconds {}\n",
            creds.zone().config.expires_at.unix_timestamp()
        ),
    ] {
        assert!(m.contains(&want), "missing {want}:\n{m}");
    }
    let status = h.admin_get("/status").await;
    assert!(status.contains("\"health\": \"yellow\""), "{status}");

    // The page itself, as a person's browser renders it.
    let page = h.admin_get("/").await;
    assert!(page.contains("data-device=\"home1\""), "{page}");
    let chromium = ["chromium", "chromium-browser"].into_iter().find(|b| {
        std::process::Command::new(b)
            .arg("--version")
            .output()
            .is_ok()
    });
    let Some(chromium) = chromium else {
        crate::common::skip(
            "status_page_metrics_and_headless_chromium (the browser part)",
            "needs chromium: apt-get install chromium",
        );
        return;
    };
    let profile = h.dir.path().join("chromium-profile");
    let o = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", &format!("http://{}/", h.admin)])
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let dom = String::from_utf8_lossy(&o.stdout);
    assert!(
        dom.contains("<td>home1</td><td class=\"up\">connected</td>"),
        "chromium DOM lacks connected home1:\n{dom}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        dom.contains("<td>home2</td><td class=\"down\">not connected</td>"),
        "{dom}"
    );
    assert!(dom.contains("data-health=\"yellow\""), "{dom}");
    assert!(
        dom.contains("http alice.example -&gt; home1/web")
            || dom.contains("http alice.example -> home1/web"),
        "{dom}"
    );
}

/// A TLS client connection to the front's HTTPS port over `tcp`, offering `alpn`, that takes
/// the gateway's self-signed certificate.
async fn tls_over(
    tcp: tokio::net::TcpStream,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(crate::hostile::AnyServer(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let name = rustls::pki_types::ServerName::try_from(DOMAIN).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// An HTTPS/1.1 client that sends requests and stops reading is cut after the send timeout
/// even when its last answer went whole into TLS's own buffer: the wait for that buffer to
/// reach the socket (the flush) had no deadline, and such a client held its connection for
/// good. Small answers, so that the answer the full socket stops is taken whole by rustls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_client_that_stops_reading_is_cut_after_the_send_timeout() {
    use tokio::io::AsyncWriteExt;
    let send_timeout = Duration::from_secs(2);
    let h = start_sending_within(send_timeout).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tls = tls_over(socket.connect(h.https).await.unwrap(), b"http/1.1").await;
    let (_rd, mut wr) = tokio::io::split(tls);
    // Requests without end, never reading an answer: the gateway stops reading them once
    // its answers back up, and only its cut ends this loop (the write then fails). How soon
    // the answers back up depends on the machine's load, so the wait below is generous.
    let t = Instant::now();
    let writer = tokio::spawn(async move {
        let req = format!("GET /bytes/1000 HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n");
        loop {
            if let Err(e) = async {
                wr.write_all(req.as_bytes()).await?;
                wr.flush().await
            }
            .await
            {
                return e;
            }
        }
    });
    let ended = tokio::time::timeout(Duration::from_secs(60), writer).await;
    assert!(
        ended.is_ok(),
        "still connected {:?} after the client stopped reading",
        t.elapsed()
    );
}

/// An HTTP/2 client over TLS that sends part of the connection preface and then nothing is
/// dropped after the head timeout: the first byte lifted the deadline, and hyper neither
/// pings nor closes before the preface is whole, so such a client held its connection (and
/// its slot) for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_stalled_in_its_preface_is_dropped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = start().await;
    let tcp = tokio::net::TcpStream::connect(h.https).await.unwrap();
    let mut tls = tls_over(tcp, b"h2").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls.write_all(b"PRI * HTTP").await.unwrap();
    tls.flush().await.unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(HEADER_TIMEOUT * 10, async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "still connected after {:?}", t.elapsed());
    assert!(t.elapsed() >= HEADER_TIMEOUT / 2, "{:?}", t.elapsed());
}

/// Plain HTTP sent to the HTTPS port (`http://host:8443/`) is answered in HTTP: a 400 naming
/// the https:// address to use, then a close — also after a request body the answer leaves
/// unread (the close lingers, so no reset destroys the answer). It was a raw TLS alert, which
/// browsers show as "invalid response". TLS on the same port is served as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_the_https_port_is_told_the_https_address() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = start().await;
    let port = h.https.port();
    for req in [
        format!("GET /a/b?c=1 HTTP/1.1\r\nHost: {DOMAIN}:{port}\r\n\r\n"),
        format!(
            "POST /up HTTP/1.1\r\nHost: {DOMAIN}:{port}\r\nContent-Length: 100000\r\n\r\n{}",
            "x".repeat(100_000)
        ),
    ] {
        let mut tcp = tokio::net::TcpStream::connect(h.https).await.unwrap();
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut got))
            .await
            .expect("connection not closed after the answer")
            .expect("answer cut by a reset");
        let got = String::from_utf8_lossy(&got).to_lowercase();
        let path = if req.starts_with("GET") {
            "/a/b?c=1"
        } else {
            "/up"
        };
        let address = format!("https://{DOMAIN}:{port}{path}");
        assert!(got.starts_with("http/1.1 400 "), "{got}");
        assert!(got.contains(&format!("location: {address}\r\n")), "{got}");
        assert!(got.contains("connection: close\r\n"), "{got}");
        assert!(
            got.contains(&format!(
                "this port speaks https and the request came as plain http; use {address}\n"
            )),
            "{got}"
        );
    }
    let c = h.curl(&h.https_args(DOMAIN, "/after")).await;
    assert_eq!(c.code, 200, "{c:?}");
}

/// Connections that end before any request — a head that never completes (slow headers), a
/// TLS handshake that fails or stalls — are counted in `/metrics` by why (they are not logged:
/// a client causes one per connection). An attack of that kind left no trace at all. A
/// keep-alive connection's idle end after a request is not one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_end_before_any_request_are_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = start_tuned(|t| t.tls_handshake_timeout = Duration::from_secs(1)).await;
    let until_closed = |mut c: tokio::net::TcpStream| async move {
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(20), async {
            while matches!(c.read(&mut buf).await, Ok(n) if n > 0) {}
        })
        .await;
        assert!(closed.is_ok(), "not closed");
    };
    // Half a head on the HTTP port, then nothing.
    let mut slow = tokio::net::TcpStream::connect(h.http).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: alice")
        .await
        .unwrap();
    // A whole request, then idle until the keep-alive end: not counted. A whole request,
    // then half a head: counted.
    let mut idle = tokio::net::TcpStream::connect(h.http).await.unwrap();
    idle.write_all(format!("GET /x HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut kept = tokio::net::TcpStream::connect(h.http).await.unwrap();
    kept.write_all(
        format!("GET /x HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\nGET /y HTTP/1.1\r\nHo").as_bytes(),
    )
    .await
    .unwrap();
    // An empty ClientHello, and a TLS client that says nothing after connecting.
    let mut bad = tokio::net::TcpStream::connect(h.https).await.unwrap();
    bad.write_all(&[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x00, 0x00])
        .await
        .unwrap();
    let mute = tokio::net::TcpStream::connect(h.https).await.unwrap();
    tokio::join!(
        until_closed(slow),
        until_closed(idle),
        until_closed(kept),
        until_closed(bad),
        until_closed(mute)
    );
    // Counted as the front ends them, which may come just after the client sees the close.
    let lines = [
        "zonegate_http_connections_unserved_total{reason=\"no_request_head\"} 2\n",
        "zonegate_http_connections_unserved_total{reason=\"tls_failed\"} 1\n",
        "zonegate_http_connections_unserved_total{reason=\"tls_timeout\"} 1\n",
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = h.admin_get("/metrics").await;
        if lines.iter().all(|l| m.contains(l)) {
            break;
        }
        assert!(Instant::now() < deadline, "{lines:?} not all in\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A connection closed before its first byte (a TCP health check) is none of them.
    drop(tokio::net::TcpStream::connect(h.https).await.unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = h.admin_get("/metrics").await;
    assert!(m.contains(lines[1]), "{m}");
}
