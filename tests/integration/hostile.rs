//! Hostile peers against the gateway and the agents: garbage on the QUIC and DNS ports, QUIC
//! handshake floods (the hub's and an agent's peer side), authenticated devices that speak
//! garbage, lie in their hello, ask for streams they may not have or get revoked while
//! connected. Connected agents must keep working throughout.
//!
//! Devices of another zone and expired certificates are refused at the handshake: see
//! `tunnel::foreign_expired_and_revoked_devices_are_refused`; public clients asking a device
//! for a service it does not offer: `tunnel::node_serves_only_named_services_…`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tunnel::control::ControlIo;
use tunnel::creds::DeviceCreds;
use tunnel::proto::{ControlSession, Event, Hello, Origin, RefuseCode, StreamHeader, StreamReply};
use tunnel::transport::Tuning;

use crate::inproc::*;

const WAIT: Duration = Duration::from_secs(10);

fn echo_policy() -> &'static str {
    "[app.echo]\ntcp = { listen = \"127.0.0.1:0\" }\nto = \"home1/echo\"\nallow = { from = [\"public\"] }\n"
}

/// A zone of `nodes` whose policy is the public `echo` app on home1 plus `more_apps`, its
/// gateway, and home1 serving echo; all with timings `t`.
async fn echo_zone(
    nodes: &[&str],
    more_apps: &str,
    t: Tuning,
) -> (TestZone, RunningGateway, RunningAgent) {
    let z = TestZone::new(nodes);
    z.write_policy("apps.toml", &format!("{}{more_apps}", echo_policy()));
    let gw = start_gateway(&z, t, Duration::from_millis(500)).await;
    let h1 = echo_node(&z, &gw, "home1", t).await;
    (z, gw, h1)
}

/// `msg` goes through the public app listening on `app` and comes back unchanged.
async fn assert_echoes(app: SocketAddr, msg: &[u8]) {
    assert_eq!(roundtrip(app, msg).await.unwrap(), msg);
}

/// A zone config too large for the DNS TXT set: the gateway starts, and its DNS answers with
/// the zone's addresses but no TXT set, as a running gateway does with such a zone adopted
/// from another. It refused to start (exit 2, which the unit does not restart), so a gateway
/// that had adopted such a zone stayed down after its next reboot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_too_large_for_dns_starts_without_its_txt_record() {
    let z = TestZone::new(&[]);
    let mut zd = zone_core::zonedir::ZoneDir::open(&z.zone_dir()).unwrap();
    let template = zd.zone.config.devices[0].clone();
    for i in 0..350 {
        let name = zone_core::DeviceName::new(&format!("device{i}")).unwrap();
        let public_key = zd.key.derive_device(zd.domain(), &name).public_text();
        zd.zone.config.devices.push(zone_core::DeviceEntry {
            name,
            public_key,
            roles: vec![zone_core::Role::Node],
            ..template.clone()
        });
    }
    // Signed by hand: `zonegate zone`/`device` commands refuse to make a config this large
    // (zonedir's commit), but a hand-made zone.json can still reach a gateway.
    let signed = zd.zone.config.sign(&zd.key).unwrap();
    std::fs::write(z.bundle("gw").zone_config, signed.to_json_pretty()).unwrap();

    let dns: SocketAddr = ([127, 0, 0, 1], free_udp_and_tcp_port()).into();
    let gw = start_gateway_with_dns(&z, fast_tuning(), Duration::from_millis(500), Some(dns)).await;
    // The apex's address is answered...
    let answer = raw_dns_query(dns, "alice.example", 1).await;
    let rcode = answer[3] & 0x0f;
    let answers = u16::from_be_bytes([answer[6], answer[7]]);
    assert_eq!((rcode, answers > 0), (0, true), "{answer:?}");
    // ...and the zone config is not published.
    let domain = zone_core::Domain::new("alice.example").unwrap();
    let e = name_resolver::fetch_txt(&domain, dns).await.unwrap_err();
    assert!(e.to_string().contains("no TXT record"), "{e}");
    gw.shutdown.cancel();
}

/// The zone DNS's answers are counted in the gateway's `/metrics` by transport and answer
/// code (queries are not logged one by one: without these an operator could not tell whether
/// the server is asked at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zone_dns_answers_are_counted_in_metrics() {
    let z = TestZone::new(&["home1"]);
    let dns: SocketAddr = ([127, 0, 0, 1], free_udp_and_tcp_port()).into();
    let gw = start_gateway_with_dns(&z, fast_tuning(), Duration::from_millis(500), Some(dns)).await;
    for _ in 0..2 {
        let a = raw_dns_query(dns, "home1.alice.example", 1).await;
        assert_eq!(a[3] & 0x0f, 0, "{a:?}");
    }
    let a = raw_dns_query(dns, "elsewhere.example", 1).await;
    assert_eq!(a[3] & 0x0f, 5, "REFUSED: {a:?}");
    // Not a query that decodes: a header-only FORMERR.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&[0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 63], dns)
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(WAIT, sock.recv(&mut buf))
        .await
        .expect("a FORMERR in time")
        .unwrap();
    assert_eq!((n, buf[3] & 0x0f), (12, 1));
    // Over TCP: the zone's SOA.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut q = vec![0x56, 0x78, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x05alice\x07example\x00\x00\x06\x00\x01");
        let mut c = tokio::net::TcpStream::connect(dns).await.unwrap();
        c.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
        c.write_all(&q).await.unwrap();
        let mut len = [0u8; 2];
        c.read_exact(&mut len).await.unwrap();
        let mut a = vec![0u8; u16::from_be_bytes(len).into()];
        c.read_exact(&mut a).await.unwrap();
        assert_eq!((&a[..2], a[3] & 0x0f), (&[0x56, 0x78][..], 0), "{a:?}");
    }

    // Counted as each answer is handed to its socket: scraped until the last one shows.
    let count = |metrics: &str, series: &str| -> u64 {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"));
        line[series.len() + 1..].trim().parse().unwrap()
    };
    let series =
        |t: &str, r: &str| format!("zonegate_dns_answers_total{{transport=\"{t}\",rcode=\"{r}\"}}");
    let deadline = std::time::Instant::now() + WAIT;
    let metrics = loop {
        let m = crate::tunnel::admin_get(gw.admin, "/metrics").await;
        if m.contains("zonegate_dns_answers_total") && count(&m, &series("tcp", "NOERROR")) > 0 {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the TCP answer not counted: {m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let answers = |t: &str, r: &str| count(&metrics, &series(t, r));
    assert_eq!(answers("udp", "NOERROR"), 2);
    assert_eq!(answers("udp", "REFUSED"), 1);
    assert_eq!(answers("udp", "FORMERR"), 1);
    assert_eq!(answers("udp", "NXDOMAIN"), 0);
    assert_eq!(answers("tcp", "NOERROR"), 1);
    assert_eq!(
        count(
            &metrics,
            "zonegate_dns_rate_limited_total{action=\"dropped\"}"
        ),
        0
    );
    assert_eq!(count(&metrics, "zonegate_dns_tcp_refused_total"), 0);
    gw.shutdown.cancel();
}

/// The answer to one query for `name` of type `qtype` (1 = A) over UDP, as bytes.
pub(crate) async fn raw_dns_query(server: SocketAddr, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&q, server).await.unwrap();
    let mut buf = vec![0u8; 1500];
    let (n, _) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
        .await
        .expect("a DNS answer in time")
        .unwrap();
    buf.truncate(n);
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_on_quic_and_dns_ports_change_nothing() {
    let z = TestZone::new(&["home1"]);
    z.write_policy("apps.toml", echo_policy());
    let dns: std::net::SocketAddr = ([127, 0, 0, 1], free_udp_and_tcp_port()).into();
    let gw = start_gateway_with_dns(&z, fast_tuning(), Duration::from_millis(500), Some(dns)).await;
    let _h1 = start_echo_node(&z, &gw, "home1").await;

    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..2000u32 {
        let len = 1 + (i as usize * 37) % 1400;
        let junk = random_bytes(len);
        let _ = sock.send_to(&junk, z.gw_addr).await;
        let _ = sock.send_to(&junk, dns).await;
    }
    // A garbage TCP connection to the DNS port, too.
    if let Ok(mut t) = tokio::net::TcpStream::connect(dns).await {
        use tokio::io::AsyncWriteExt;
        let _ = t.write_all(&random_bytes(4096)).await;
    }

    // The tunnel still carries traffic and the agent was never dropped.
    assert_echoes(gw.apps["echo"], b"after the storm").await;
    assert_eq!(gw.hub.agents().len(), 1);
    // DNS still answers with a zone config that verifies.
    let domain = zone_core::Domain::new("alice.example").unwrap();
    let ca = zone_core::zonedir::read_cert_der(&z.zone_dir().join("zone-ca.crt")).unwrap();
    let zone_key = zone_core::cert::ca_public_key(&ca).unwrap();
    let fetched = name_resolver::fetch_zone(&domain, dns, &zone_key, None)
        .await
        .unwrap();
    assert_eq!(fetched.config.domain.as_str(), "alice.example");
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_device_sending_garbage_is_cut_off_alone() {
    let (z, gw, _h1) = echo_zone(&["home1", "home2"], "", fast_tuning()).await;

    // home2's real credentials, but instead of a control stream: an oversized garbage header.
    let creds = z.creds("home2");
    let ep =
        tunnel::transport::client_endpoint("127.0.0.1:0".parse().unwrap(), &creds, &fast_tuning())
            .unwrap();
    let conn = ep
        .connect(z.gw_addr, "gw.alice.example")
        .unwrap()
        .await
        .expect("mutual TLS succeeds");
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut junk = b"ZG\x01\xff\xff".to_vec();
    junk.extend(random_bytes(8192));
    let _ = send.write_all(&junk).await;
    let r = tokio::time::timeout(WAIT, recv.read_to_end(1 << 16))
        .await
        .expect("the gateway answers or closes in time");
    assert!(
        r.is_err() || r.as_ref().is_ok_and(|b| b.len() < 1024),
        "garbage got a real answer: {r:?}"
    );
    tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("the gateway closes the connection");
    assert!(
        gw.hub.agent("home2").is_none(),
        "a device that never said hello was registered"
    );

    // Everyone else is unaffected.
    assert_echoes(gw.apps["echo"], b"still here").await;
    gw.shutdown.cancel();
}

/// The admin API serves at most `MAX_CONNECTIONS` connections at once (more are closed as they
/// come) and closes one that sends no request within `HEADER_TIMEOUT`: a client holding
/// hundreds of idle connections took file descriptors the public traffic shares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_bounds_its_connections() {
    use gateway::admin::{HEADER_TIMEOUT, MAX_CONNECTIONS};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_z, gw, _h1) = echo_zone(&["home1"], "", fast_tuning()).await;
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        idle.push(tokio::net::TcpStream::connect(gw.admin).await.unwrap());
    }
    let opened = std::time::Instant::now();
    let mut extra = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
    let r = tokio::time::timeout(WAIT, extra.read(&mut [0u8; 16]))
        .await
        .expect("a connection past the cap was held open");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    // The idle ones are closed after the header timeout; then /status answers again.
    for mut c in idle {
        let r = tokio::time::timeout(HEADER_TIMEOUT + WAIT, c.read(&mut [0u8; 16]))
            .await
            .expect("an idle admin connection was never closed");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    }
    assert!(opened.elapsed() >= HEADER_TIMEOUT - Duration::from_secs(1));
    let mut m = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
    m.write_all(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut status = String::new();
    m.read_to_string(&mut status).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    // A request under another name (a page in a browser here, its name rebound to
    // 127.0.0.1) reads nothing.
    let mut m = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
    m.write_all(b"GET /status HTTP/1.1\r\nHost: rebound.example:9090\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut refused = String::new();
    m.read_to_string(&mut refused).await.unwrap();
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(!refused.contains("agents"), "{refused}");
    // HEAD (an uptime checker's) is answered as GET, without the body.
    let mut m = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
    m.write_all(b"HEAD /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut head = String::new();
    m.read_to_string(&mut head).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "a body after HEAD: {head}");
    gw.shutdown.cancel();
}

/// A device that accepts the gateway's streams and never answers them cannot hold public
/// connections: the gateway sends a tcp app's first bytes before the device's reply (an early
/// open), and waited for that reply without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_never_answers_a_stream_cannot_hold_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = "[app.mute]\ntcp = { listen = \"127.0.0.2:0\" }\nto = \"home2/mute\"\nallow = { from = [\"public\"] }\n";
    let t = fast_tuning();
    let (z, gw, _h1) = echo_zone(&["home1", "home2"], app, t).await;
    let creds = z.creds("home2");
    let ep =
        tunnel::transport::client_endpoint("127.0.0.1:0".parse().unwrap(), &creds, &t).unwrap();
    let conn = ep
        .connect(z.gw_addr, "gw.alice.example")
        .unwrap()
        .await
        .unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    tunnel::stream::write_header(&mut send, &StreamHeader::Control)
        .await
        .unwrap();
    let hello = Hello {
        proto_version: tunnel::proto::CONTROL_VERSION,
        device: "home2".into(),
        services: vec![tunnel::proto::ServiceInfo {
            name: "mute".into(),
            proto: tunnel::proto::ServiceProto::Tcp,
        }],
        zone_serial: creds.zone_serial(),
        zone_config: None,
        agent_version: "hostile".into(),
    };
    let mut io = ControlIo::new(send, recv, ControlSession::agent(hello));
    io.flush().await.unwrap();
    wait_until("home2 registered", WAIT, || gw.hub.agent("home2").is_some()).await;
    // Accepts every stream and reads it, unanswered, counting what arrives.
    let got = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let held = tokio::spawn({
        let conn = conn.clone();
        let got = got.clone();
        async move {
            let mut kept = Vec::new();
            while let Ok((send, mut recv)) = conn.accept_bi().await {
                let got = got.clone();
                kept.push(send);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(Some(n)) = recv.read(&mut buf).await {
                        got.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        }
    });
    let c = tokio::net::TcpStream::connect(gw.apps["mute"])
        .await
        .unwrap();
    let (mut r, mut w) = c.into_split();
    let started = std::time::Instant::now();
    let upload = tokio::spawn(async move {
        let _ = w.write_all(&vec![b'u'; 1 << 20]).await;
        let _ = w.shutdown().await;
        w
    });
    // Before the device's reply, only the first EARLY_BYTES go with the open: an upload
    // sent whole would sit unread against the flow-control window every stream of the
    // device shares (a device slow to reach its service stalled all its apps).
    wait_until("the open's first bytes", WAIT, || {
        got.load(std::sync::atomic::Ordering::Relaxed) > 0
    })
    .await;
    // Time for more to arrive, were any more sent.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let early = got.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        early > 0 && early <= tunnel::stream::EARLY_BYTES + 512,
        "{early} bytes went before the reply"
    );
    let read = tokio::time::timeout(t.open_timeout + WAIT, r.read(&mut [0u8; 16]))
        .await
        .expect("the connection was held past the open timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() >= t.open_timeout - Duration::from_secs(1));
    upload.abort();
    held.abort();
    drop(io);
    gw.shutdown.cancel();
}

/// Waits until the gateway no longer lists `device` and has closed its connection `conn`.
async fn assert_session_ended(gw: &RunningGateway, device: &str, conn: &quinn::Connection) {
    wait_until("the session ended", WAIT, || gw.hub.agent(device).is_none()).await;
    tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("the connection was not closed");
}

/// An agent that sends `Error` has ended its session at its end: the hub ends it too (it kept
/// the device registered, and every command to it — UDP flows, Drain, config updates —
/// failed unseen while the device looked connected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_error_ends_its_session_at_the_gateway() {
    let (z, gw, _h1) = echo_zone(&["home1", "home2"], "", fast_tuning()).await;
    let (_ep, conn, mut io) = raw_session(&z, "home2", "home2").await;
    wait_until("home2 registered", WAIT, || gw.hub.agent("home2").is_some()).await;
    io.session.reject(
        tunnel::proto::ErrorCode::ProtocolViolation,
        "something broke here",
    );
    io.flush().await.unwrap();
    assert_session_ended(&gw, "home2", &conn).await;
    assert!(gw.hub.agent("home1").is_some());
    gw.shutdown.cancel();
}

/// Zone configs `device` offered in its current session, and how many were refused, as the
/// gateway's status says; `None` while it has no session.
fn zone_offers(gw: &RunningGateway, device: &str) -> Option<(u64, u32)> {
    gw.hub
        .status()
        .into_iter()
        .find(|a| a.device == device)
        .map(|a| (a.zone_offers, a.zone_offers_refused))
}

/// Zone configs that do not verify cost the gateway a parse (maybe a signature check) and a
/// log line each: a device that keeps offering them loses its session after
/// `MAX_REFUSED_OFFERS`, and only the first is logged as a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_offering_bad_zone_configs_loses_its_session() {
    use tunnel::hub::MAX_REFUSED_OFFERS;
    let (z, gw, _h1) = echo_zone(&["home1", "home2"], "", fast_tuning()).await;
    let (_ep, conn, mut io) = raw_session(&z, "home2", "home2").await;
    wait_until("home2 registered", WAIT, || gw.hub.agent("home2").is_some()).await;
    for i in 0..MAX_REFUSED_OFFERS - 1 {
        io.session
            .send_config_update(u64::MAX - 1, format!("not a zone {i}").into_bytes())
            .unwrap();
    }
    io.flush().await.unwrap();
    let below = u64::from(MAX_REFUSED_OFFERS - 1);
    wait_until("the offers below the limit counted", WAIT, || {
        zone_offers(&gw, "home2") == Some((below, MAX_REFUSED_OFFERS - 1))
    })
    .await;
    // Counted means decided on: a session the hub ended for them would be gone by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(gw.hub.agent("home2").is_some(), "ended before the limit");
    io.session
        .send_config_update(u64::MAX - 1, b"one too many".to_vec())
        .unwrap();
    io.flush().await.unwrap();
    assert_session_ended(&gw, "home2", &conn).await;
    gw.shutdown.cancel();
}

/// A zone config offered again whose announced serial is not newer is ignored unparsed, as
/// often as it comes (agents pass configs on; a stuck one may repeat); one announced as newer
/// whose JSON is not counts as refused, so a device looping on it loses its session. Such
/// offers cost a full parse each and were never counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_zone_offers_cost_nothing_and_false_serials_end_the_session() {
    use tunnel::hub::MAX_REFUSED_OFFERS;
    let (z, gw, _h1) = echo_zone(&["home1", "home2"], "", fast_tuning()).await;
    let (_ep, conn, mut io) = raw_session(&z, "home2", "home2").await;
    wait_until("home2 registered", WAIT, || gw.hub.agent("home2").is_some()).await;
    let current = std::fs::read(z.bundle("home2").zone_config).unwrap();
    let serial = gw.hub.creds().zone_serial();
    for _ in 0..MAX_REFUSED_OFFERS * 4 {
        io.session
            .send_config_update(serial, current.clone())
            .unwrap();
    }
    io.flush().await.unwrap();
    let stale = u64::from(MAX_REFUSED_OFFERS * 4);
    wait_until("the stale offers counted", WAIT, || {
        zone_offers(&gw, "home2").is_some_and(|(seen, _)| seen == stale)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        zone_offers(&gw, "home2"),
        Some((stale, 0)),
        "stale offers were refused, or ended the session"
    );
    for _ in 0..MAX_REFUSED_OFFERS {
        io.session
            .send_config_update(serial + 1, current.clone())
            .unwrap();
    }
    io.flush().await.unwrap();
    assert_session_ended(&gw, "home2", &conn).await;
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_streams_from_one_agent_leave_others_served() {
    let (z, gw, _h1) = echo_zone(&["home1", "home2"], "", fast_tuning()).await;

    // home2 says a proper hello, then opens 10,000 streams that never finish their header.
    let (_ep, conn, _io) = raw_session(&z, "home2", "home2").await;
    wait_until("home2 registered", WAIT, || gw.hub.agents().len() == 2).await;

    let flood = {
        let conn = conn.clone();
        tokio::spawn(async move {
            let mut opened = 0u32;
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..10_000 {
                // open_bi waits when the gateway's stream limit is reached: that is the bound.
                let Ok(Ok((mut s, _r))) =
                    tokio::time::timeout(Duration::from_millis(200), conn.open_bi()).await
                else {
                    break;
                };
                opened += 1;
                tasks.spawn(async move {
                    let _ = s.write_all(b"Z").await; // first byte of a header, never the rest
                                                     // Held until the flood is over (the set is dropped then): a stream given
                                                     // up on returns its credit, and a flood slowed by a busy machine would
                                                     // then open more than the limit in all.
                    tokio::time::sleep(Duration::from_secs(60)).await;
                });
            }
            (opened, tasks)
        })
    };
    // While the flood runs, public traffic through the gateway to home1 still flows.
    for i in 0..5 {
        let msg = format!("served during the flood {i}");
        assert_eq!(
            roundtrip(gw.apps["echo"], msg.as_bytes()).await.unwrap(),
            msg.as_bytes()
        );
    }
    let (opened, tasks) = flood.await.unwrap();
    drop(tasks);
    assert!(
        opened <= tunnel::transport::MAX_STREAMS_PER_CONNECTION + 100,
        "the gateway let {opened} streams open at once"
    );
    eprintln!("hostile agent opened {opened} streams before the gateway's limit held it");
    assert!(
        opened >= 1000,
        "the flood never really started ({opened} streams)"
    );
    assert_echoes(gw.apps["echo"], b"after").await;
    gw.shutdown.cancel();
}

/// A connection to the zone's gateway with `creds` that grants each stream only
/// `stream_window` bytes of credit (and the connection `conn_window`, if given): a device that
/// reads little or nothing. The endpoint is returned to be kept alive.
async fn connect_reading_little(
    z: &TestZone,
    creds: &DeviceCreds,
    tuning: Tuning,
    stream_window: u32,
    conn_window: Option<u32>,
) -> (quinn::Endpoint, quinn::Connection) {
    let mut tc = quinn::TransportConfig::default();
    tc.stream_receive_window(stream_window.into());
    if let Some(w) = conn_window {
        tc.receive_window(w.into());
    }
    tc.keep_alive_interval(Some(Duration::from_millis(300)));
    connect_device(z, creds, tuning, Some(tc)).await
}

/// A QUIC connection to the zone's gateway with `creds`, with `transport` if given (else the
/// agents' own); the endpoint is returned to be kept alive.
async fn connect_device(
    z: &TestZone,
    creds: &DeviceCreds,
    tuning: Tuning,
    transport: Option<quinn::TransportConfig>,
) -> (quinn::Endpoint, quinn::Connection) {
    let ep =
        tunnel::transport::client_endpoint("127.0.0.1:0".parse().unwrap(), creds, &tuning).unwrap();
    let mut cc = tunnel::transport::client_config(creds, &tuning).unwrap();
    if let Some(tc) = transport {
        cc.transport_config(Arc::new(tc));
    }
    let conn = ep
        .connect_with(cc, z.gw_addr, "gw.alice.example")
        .unwrap()
        .await
        .unwrap();
    (ep, conn)
}

/// Opens the control stream on `conn` and sends a hello naming `claims`.
async fn send_hello(conn: &quinn::Connection, creds: &DeviceCreds, claims: &str) -> ControlIo {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    tunnel::stream::write_header(&mut send, &StreamHeader::Control)
        .await
        .unwrap();
    let hello = Hello {
        proto_version: tunnel::proto::CONTROL_VERSION,
        device: claims.into(),
        services: vec![],
        zone_serial: creds.zone_serial(),
        zone_config: None,
        agent_version: "hostile".into(),
    };
    let mut io = ControlIo::new(send, recv, ControlSession::agent(hello));
    io.flush().await.unwrap();
    io
}

/// Connects with `device`'s real credentials and says a hello naming `claims`; returns the
/// endpoint (keep it alive), the connection and the control stream after the gateway's first
/// answer, which must be a `Welcome` when `claims == device`.
async fn raw_session(
    z: &TestZone,
    device: &str,
    claims: &str,
) -> (quinn::Endpoint, quinn::Connection, ControlIo) {
    let creds = z.creds(device);
    let (ep, conn) = connect_device(z, &creds, fast_tuning(), None).await;
    let mut io = send_hello(&conn, &creds, claims).await;
    if device == claims {
        let ev = tokio::time::timeout(WAIT, io.next_event())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(ev, Some(Event::Welcome(_))), "{ev:?}");
    }
    (ep, conn, io)
}

/// Accepts whatever certificate a server shows: a flood's clients want their handshake to run
/// until the server decides about them.
#[derive(Debug)]
pub(crate) struct AnyServer(pub(crate) Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.verify_tls13_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A QUIC client speaking our ALPN with `cert` (another zone's device) or no certificate.
fn stranger_config(cert: Option<&tunnel::creds::DeviceCreds>) -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut cfg = match cert {
        Some(c) => builder
            .with_client_auth_cert(vec![c.own_cert().der.clone()], c.private_key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![tunnel::tls::ALPN.to_vec()];
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
    quinn::ClientConfig::new(Arc::new(qc))
}

/// First flights (QUIC Initials) of `n` distinct connection attempts, captured on a socket that
/// never answers: replayed at a server, they are clients that never complete a handshake, as
/// from spoofed source addresses.
async fn silent_first_flights(n: usize) -> Vec<Vec<u8>> {
    let hole = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let collect = tokio::spawn(async move {
        let (mut seen, mut flights) = (HashSet::new(), Vec::new());
        let mut buf = vec![0u8; 2048];
        while flights.len() < n {
            let got = tokio::time::timeout(Duration::from_secs(10), hole.recv(&mut buf)).await;
            let len = got.expect("quinn keeps sending Initials").unwrap();
            let d = &buf[..len];
            // Long header (0x80), Initial (type bits 0x30 == 0), then the destination
            // connection id: one flight per connection attempt.
            if len < 7 || d[0] & 0xb0 != 0x80 || len < 6 + d[5] as usize {
                continue;
            }
            if seen.insert(d[6..6 + d[5] as usize].to_vec()) {
                flights.push(d.to_vec());
            }
        }
        flights
    });
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(stranger_config(None));
    let attempts: Vec<_> = (0..n)
        .map(|_| ep.connect(hole_addr, "gw.alice.example").unwrap())
        .collect();
    let flights = collect.await.unwrap();
    drop(attempts);
    ep.close(0u32.into(), b"");
    flights
}

/// What a flood achieved.
#[derive(Debug)]
struct Flood {
    /// Strangers (no or foreign certificate) that ended up with a connection still open.
    let_in: usize,
    /// Strangers whose attempt got through to the server's verdict or a refusal.
    strangers: usize,
}

/// Floods `target` with `silent` first flights that are never followed up and `strangers`
/// concurrent full handshakes by clients holding another zone's certificate or none.
async fn handshake_flood(
    target: SocketAddr,
    silent: usize,
    strangers: usize,
    addresses: u8,
) -> Flood {
    let flights = silent_first_flights(silent).await;
    let other = TestZone::new(&["home1"]);
    let foreign = other.creds("home1");
    let configs = [stranger_config(Some(&foreign)), stranger_config(None)];
    // From `addresses` loopback addresses (127.0.0.1, .2, …): a gate that bounds handshakes
    // per address is only pushed to its global limits by many.
    let address = |i: usize| format!("127.0.0.{}", 1 + i % usize::from(addresses));
    let endpoints: Vec<quinn::Endpoint> = (0..4.max(usize::from(addresses)))
        .map(|i| quinn::Endpoint::client(format!("{}:0", address(i)).parse().unwrap()).unwrap())
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..strangers {
        let (ep, cfg) = (
            endpoints[i % endpoints.len()].clone(),
            configs[i % 2].clone(),
        );
        // Whether it was let in, once the server decided; `None` when it never did (the
        // attempt timed out, or could not start here).
        tasks.spawn(async move {
            let connecting = ep.connect_with(cfg, target, "gw.alice.example").ok()?;
            match tokio::time::timeout(Duration::from_secs(30), connecting).await {
                // TLS 1.3: the server judges our certificate after we finished, so a
                // connection can come up and be closed right after (which a machine this
                // busy may take seconds to send).
                Ok(Ok(conn)) => Some(
                    tokio::time::timeout(Duration::from_secs(20), conn.closed())
                        .await
                        .is_err(),
                ),
                Ok(Err(_)) => Some(false),
                Err(_) => None,
            }
        });
    }
    // The silent flights go out while the strangers' handshakes run, paced a little so the
    // target's socket buffer takes most of them.
    let mut spoofers = Vec::new();
    for i in 0..usize::from(addresses) {
        let bind = format!("{}:0", address(i));
        spoofers.push(tokio::net::UdpSocket::bind(bind).await.unwrap());
    }
    for (b, batch) in flights.chunks(50).enumerate() {
        let spoofer = &spoofers[b % spoofers.len()];
        for f in batch {
            let _ = spoofer.send_to(f, target).await;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut let_in = 0;
    let mut decided = 0;
    while let Some(r) = tasks.join_next().await {
        if let Some(got_in) = r.unwrap() {
            decided += 1;
            let_in += usize::from(got_in);
        }
    }
    Flood {
        let_in,
        strangers: decided,
    }
}

/// Timings for the flood tests, and for tests that assert a session lived on: a 2-core
/// machine busy with thousands of handshakes (or with other tests) can delay keep-alives by
/// more than [`fast_tuning`]'s 1.5 s idle timeout; the point is that the gateway serves
/// connected agents, not how fast a starved test process runs.
fn steady_tuning() -> Tuning {
    Tuning {
        keepalive: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(5),
        ..fast_tuning()
    }
}

async fn echo_node(z: &TestZone, gw: &RunningGateway, name: &str, t: Tuning) -> RunningAgent {
    let echo = tcp_echo().await;
    let svcs = services(&[("echo", echo, tunnel::proto::ServiceProto::Tcp)]);
    let a = start_agent(z, name, svcs, vec![], t).await;
    wait_until(&format!("{name} connected"), WAIT, || {
        gw.hub.agent(name).is_some()
    })
    .await;
    a
}

/// Roundtrips through `app` until `stop` (at least one); returns how many, failing on the
/// first error.
async fn keep_echoing(app: SocketAddr, stop: tokio_util::sync::CancellationToken) -> usize {
    let mut n = 0;
    while n == 0 || !stop.is_cancelled() {
        let msg = format!("during the flood {n}");
        let back = tokio::time::timeout(WAIT, roundtrip(app, msg.as_bytes()))
            .await
            .expect("a connected agent answers within 10 s during the flood")
            .unwrap();
        assert_eq!(back, msg.as_bytes());
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    n
}

const SILENT: usize = 2000;
const STRANGERS: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_handshake_flood_is_bounded_and_agents_keep_working() {
    use tunnel::hub::{HANDSHAKES_PER_ADDRESS, MAX_HANDSHAKES, RETRY_ABOVE, VALIDATED_PER_ADDRESS};
    let echo2 = "[app.echo2]\ntcp = { listen = \"127.0.0.2:0\" }\nto = \"home2/echo\"\nallow = { from = [\"public\"] }\n";
    let (z, gw, h1) = echo_zone(&["home1", "home2"], echo2, steady_tuning()).await;
    let before = gw.hub.handshake_stats();
    let session = gw.hub.agent("home1").unwrap().session_id;

    let stop = tokio_util::sync::CancellationToken::new();
    let echoing = tokio::spawn(keep_echoing(gw.apps["echo"], stop.clone()));
    let flood = handshake_flood(z.gw_addr, SILENT, STRANGERS, 1).await;
    stop.cancel();
    let served = echoing.await.unwrap();
    let st = gw.hub.handshake_stats();
    eprintln!("flood: {flood:?}; hub gate {st:?}; {served} roundtrips served during it");

    assert_eq!(flood.strangers, STRANGERS);
    assert_eq!(
        flood.let_in, 0,
        "a client without a zone certificate got in"
    );
    // Bounded: never more handshakes at once than the cap, and the flood did reach the point
    // where address validation starts.
    assert!(st.peak <= MAX_HANDSHAKES, "{st:?}");
    // The flood comes from one address: it held no more than that address's share (it held
    // every slot it could get, and reconnecting agents were refused).
    assert!(
        st.peak <= HANDSHAKES_PER_ADDRESS + VALIDATED_PER_ADDRESS + 1,
        "one address held more than its share of the hub's gate: {st:?}"
    );
    assert!(st.retried > before.retried, "no Retry was sent: {st:?}");
    // The silent clients cannot answer a Retry, so they got handshakes only while fewer than
    // RETRY_ABOVE were in flight; each stranger got at most one.
    let admitted = (st.admitted - before.admitted) as usize;
    assert!(
        admitted <= STRANGERS + 2 * RETRY_ABOVE,
        "{admitted} handshakes for {STRANGERS} strangers: the silent flood got through"
    );
    // Every slot comes back once the flood's handshakes are over.
    wait_until("handshake slots released", Duration::from_secs(20), || {
        gw.hub.handshake_stats().in_flight == 0
    })
    .await;

    // The connected agent kept its tunnel, and a new device can still join.
    assert_eq!(gw.hub.agent("home1").unwrap().session_id, session);
    assert_echoes(gw.apps["echo"], b"after").await;
    let _h2 = echo_node(&z, &gw, "home2", steady_tuning()).await;
    assert_echoes(gw.apps["echo2"], b"newcomer").await;
    drop(h1);
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_flood_on_an_agents_peer_side_is_bounded() {
    use tunnel::agent::{
        MAX_PEER_HANDSHAKES, PEER_HANDSHAKES_PER_ADDRESS, PEER_RETRY_ABOVE,
        PEER_VALIDATED_PER_ADDRESS,
    };
    let (_z, gw, h1) = echo_zone(&["home1"], "", steady_tuning()).await;
    let target = h1.agent.local_addr().unwrap();

    let stop = tokio_util::sync::CancellationToken::new();
    let echoing = tokio::spawn(keep_echoing(gw.apps["echo"], stop.clone()));
    let strangers = 100;
    // From one address: its own handshakes in flight stay within its two classes' shares
    // (unvalidated ones past it get a Retry, validated ones are refused) however many it
    // sends; the rest of the gate stays free for real peers.
    let flood = handshake_flood(target, 500, strangers, 1).await;
    let st = h1.agent.peer_handshake_stats();
    eprintln!("flood from one address: {flood:?}; agent peer gate {st:?}");
    assert_eq!(flood.let_in, 0);
    assert!(
        st.peak <= PEER_HANDSHAKES_PER_ADDRESS + PEER_VALIDATED_PER_ADDRESS,
        "one address held more than its share of the peer gate: {st:?}"
    );
    assert!(st.retried > 0 && st.refused > 0, "{st:?}");
    wait_until(
        "peer handshake slots released",
        Duration::from_secs(20),
        || h1.agent.peer_handshake_stats().in_flight == 0,
    )
    .await;
    // From 32 addresses: the gate's own bounds.
    let before = h1.agent.peer_handshake_stats();
    let flood = handshake_flood(target, 500, strangers, 32).await;
    stop.cancel();
    let served = echoing.await.unwrap();
    let st = h1.agent.peer_handshake_stats();
    eprintln!(
        "flood from 32 addresses: {flood:?}; agent peer gate {st:?}; {served} roundtrips served"
    );

    assert_eq!(
        flood.let_in, 0,
        "a client without a zone certificate got in"
    );
    assert!(st.peak <= MAX_PEER_HANDSHAKES, "{st:?}");
    assert!(st.retried > before.retried, "no Retry was sent: {st:?}");
    assert!(
        (st.admitted - before.admitted) as usize <= strangers + 2 * PEER_RETRY_ABOVE,
        "the silent flood got handshakes: {st:?}"
    );
    wait_until(
        "peer handshake slots released",
        Duration::from_secs(20),
        || h1.agent.peer_handshake_stats().in_flight == 0,
    )
    .await;
    // The agent's tunnel to the gateway never noticed.
    assert!(h1.agent.peers().is_empty(), "a stranger became a peer");
    assert_echoes(gw.apps["echo"], b"after").await;
    gw.shutdown.cancel();
}

/// Direct (mesh) connections take no QUIC datagrams, either way: nothing reads them there, and
/// a zone device could have a node queue tens of MB of them per connection. The node's
/// accepting side says so to a peer dialing with datagrams on; a node dialing says so too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_connections_take_no_datagrams() {
    let (z, gw, h1) = echo_zone(&["home1", "home2"], "", steady_tuning()).await;
    let t = steady_tuning();
    let lo = "127.0.0.1:0".parse().unwrap();
    // home2 dials home1's agent as a peer would, offering datagrams.
    let ep = tunnel::transport::client_endpoint(lo, &z.creds("home2"), &t).unwrap();
    let conn = ep
        .connect(h1.agent.local_addr().unwrap(), "home1.alice.example")
        .unwrap()
        .await
        .expect("a zone device reaches a node's peer side");
    assert_eq!(conn.max_datagram_size(), None);
    let sent = conn.send_datagram(bytes::Bytes::from_static(b"x"));
    assert!(
        matches!(sent, Err(quinn::SendDatagramError::UnsupportedByPeer)),
        "{sent:?}"
    );
    // A node's dial to a peer that would take them.
    let peer = tunnel::transport::server_endpoint(lo, &z.creds("home2"), &t).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let accepted = tokio::spawn(async move { peer.accept().await.unwrap().await.unwrap() });
    let dial = tunnel::transport::peer_client_config(&z.creds("home1"), &t).unwrap();
    let node = tunnel::transport::client_endpoint(lo, &z.creds("home1"), &t).unwrap();
    let out = node
        .connect_with(dial, peer_addr, "home2.alice.example")
        .unwrap()
        .await
        .unwrap();
    let at_peer = accepted.await.unwrap();
    assert_eq!(at_peer.max_datagram_size(), None);
    drop(out);
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_naming_another_device_is_refused_and_that_device_keeps_its_tunnel() {
    let (z, gw, _h1) = echo_zone(&["home1", "home2"], "", steady_tuning()).await;
    let session = gw.hub.agent("home1").unwrap().session_id;

    // home2's certificate, a hello claiming to be home1.
    let (_ep, conn, mut io) = raw_session(&z, "home2", "home1").await;
    let ev = tokio::time::timeout(WAIT, io.next_event())
        .await
        .expect("the gateway answers the lie in time");
    assert!(
        !matches!(ev, Ok(Some(Event::Welcome(_)))),
        "a hello naming another device was welcomed"
    );
    tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("the gateway closes the liar's connection");
    assert!(gw.hub.agent("home2").is_none());
    assert_eq!(
        gw.hub.agent("home1").map(|l| l.session_id),
        Some(session),
        "the impersonated device lost its tunnel"
    );
    assert_echoes(gw.apps["echo"], b"mine").await;
    gw.shutdown.cancel();
}

/// Writes `bytes` as a stream's first bytes and returns the gateway's reply.
async fn raw_stream_reply(conn: &quinn::Connection, bytes: &[u8]) -> StreamReply {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    let (reply, _) = tokio::time::timeout(WAIT, tunnel::stream::read_reply(&mut recv))
        .await
        .expect("the gateway answers a bad header in time")
        .expect("the gateway answers a bad header with a refusal");
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_a_device_may_not_open_are_refused_and_others_are_unaffected() {
    let mesh_apps = r#"
[app.echo-mesh]
mesh = true
to = "home1/echo"
allow = { from = ["device:home3"] }

[app.ghost-mesh]
mesh = true
to = "home1/ghost"
allow = { from = ["device:home2"] }

[app.away-mesh]
mesh = true
to = "home9/echo"
allow = { from = ["device:home2"] }
"#;
    let (z, gw, _h1) = echo_zone(&["home1", "home2", "home3"], mesh_apps, steady_tuning()).await;
    let (_ep, conn, _io) = raw_session(&z, "home2", "home2").await;
    wait_until("home2 registered", WAIT, || gw.hub.agent("home2").is_some()).await;
    let session = gw.hub.agent("home2").unwrap().session_id;

    let relay = |to_device: &str, service: &str| StreamHeader::Relay {
        app: "mesh".into(),
        to_device: to_device.into(),
        service: service.into(),
    };
    let open_own = StreamHeader::Open {
        app: "mesh".into(),
        service: "admin".into(),
        origin: Origin::Device {
            name: "home2".into(),
            addr: None,
        },
    };
    let cases = [
        // A service policy lets another device reach, not this one.
        (relay("home1", "echo"), RefuseCode::PolicyDenied),
        // Allowed by policy, but the device does not offer it.
        (relay("home1", "ghost"), RefuseCode::NoSuchService),
        // Allowed, but the device is not connected.
        (relay("home9", "echo"), RefuseCode::DeviceOffline),
        // A service of the gateway itself that no app allows.
        (open_own, RefuseCode::PolicyDenied),
        // A second control stream.
        (StreamHeader::Control, RefuseCode::BadRequest),
    ];
    for (header, want) in cases {
        let e = tunnel::stream::open(&conn, "gw", &header, WAIT)
            .await
            .err()
            .unwrap_or_else(|| panic!("{header:?} was accepted"));
        assert!(
            matches!(&e, tunnel::OpenError::Refused { code, .. } if *code == want),
            "{header:?}: want {want}, got {e}"
        );
    }
    // Bytes that are no header at all: announced longer than any header, not ours, cut short.
    let mut oversized = b"ZG\x01\xff\xff".to_vec();
    oversized.extend(random_bytes(8192));
    let mut garbage = random_bytes(600);
    garbage[0] = b'X';
    for bytes in [oversized, garbage, b"ZG\x01\x00\x10\x01".to_vec()] {
        let reply = raw_stream_reply(&conn, &bytes).await;
        assert!(
            matches!(
                reply,
                StreamReply::Refused {
                    code: RefuseCode::BadRequest,
                    ..
                }
            ),
            "{reply:?}"
        );
    }
    // Refused streams cost the device nothing else: its tunnel is the same, and everyone
    // else is served.
    assert!(conn.close_reason().is_none());
    assert_eq!(gw.hub.agent("home2").unwrap().session_id, session);
    assert_echoes(gw.apps["echo"], b"unaffected").await;
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_revoked_while_connected_is_cut_off_and_stays_out() {
    let (z, gw, h1) = echo_zone(&["home1", "laptop"], "", fast_tuning()).await;
    let laptop = start_echo_node(&z, &gw, "laptop").await;

    // The owner revokes the laptop; only home1's bundle gets the new zone.json, while home1 is
    // stopped (a running node would adopt it from the file and pass it on at once). home1
    // passes it on in its hello when it starts again, and the gateway must act on it.
    h1.shutdown.cancel();
    let _ = h1.task.await;
    let laptop_zone = std::fs::read(z.bundle("laptop").zone_config).unwrap();
    let revoking = z.revoke("laptop");
    std::fs::write(z.bundle("home1").zone_config, &revoking).unwrap();
    let _h1 = start_echo_node(&z, &gw, "home1").await;

    wait_until("laptop disconnected", WAIT, || {
        gw.hub.agent("laptop").is_none()
    })
    .await;
    assert!(gw
        .hub
        .creds()
        .trust
        .is_revoked(&zone_core::DeviceName::new("laptop").unwrap()));
    // The gateway sent the laptop the config that revokes it before closing: its agent
    // stopped for good (a node exits 2), and never registered again.
    wait_until("the laptop stopped as revoked", WAIT, || {
        laptop.agent.revoked_self().is_some()
    })
    .await;
    let until = std::time::Instant::now() + Duration::from_secs(1);
    while std::time::Instant::now() < until {
        assert!(
            gw.hub.agent("laptop").is_none(),
            "a revoked device registered again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its bundle now holds that config and a zone-revoked.txt (a restart refuses to start).
    // Restarted with the old bundle (a whole backup restored), it dials at once and is
    // refused at the TLS handshake: never registered; it stops for good once every gateway
    // (here the only one) has refused it so on a connection it verified — it redialed every
    // 30 s for ever, never to receive the config that revokes it.
    laptop.shutdown.cancel();
    let _ = laptop.task.await;
    let laptop_json = z.bundle("laptop").zone_config;
    let restore_old_bundle = || {
        std::fs::write(&laptop_json, &laptop_zone).unwrap();
        let _ = std::fs::remove_file(laptop_json.with_file_name("zone-revoked.txt"));
    };
    restore_old_bundle();
    let again = start_agent(&z, "laptop", services(&[]), vec![], fast_tuning()).await;
    tokio::time::timeout(WAIT, again.task)
        .await
        .expect("the agent stops once every gateway refuses it as revoked")
        .unwrap();
    let why = again.agent.revoked_self().expect("stopped as revoked");
    assert!(
        why.contains("gateways (gw) refuse this device's certificate as revoked"),
        "{why}"
    );
    assert!(again.agent.broke().is_none());
    assert!(
        gw.hub.agent("laptop").is_none(),
        "a revoked device registered again"
    );
    // Its apps' clients are told it is revoked (they were told "not in the zone config").
    let e = open_refused(&gw.hub, "laptop", "echo", "echo").await;
    assert!(
        matches!(&e, tunnel::OpenError::Revoked(d) if d == "laptop"),
        "{e}"
    );
    // A gateway that does not answer (nothing on its port) refuses nothing: the agent goes
    // on retrying. The revoking zone.json copied into its own bundle: verified, it stops the
    // agent for good (the node exits 2, as a start with it does).
    restore_old_bundle();
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let via = vec![("gw".to_string(), silent.local_addr().unwrap())];
    let third = start_agent_via(&z, "laptop", services(&[]), vec![], fast_tuning(), via).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.task.is_finished() && third.agent.revoked_self().is_none());
    std::fs::write(z.bundle("laptop").zone_config, &revoking).unwrap();
    tokio::time::timeout(WAIT, third.task)
        .await
        .expect("the agent stops once its own zone config revokes it")
        .unwrap();
    let why = third.agent.revoked_self().expect("stopped as revoked");
    assert!(why.contains("revokes this device"), "{why}");
    assert!(third.agent.broke().is_none());
    assert_echoes(gw.apps["echo"], b"still mine").await;
    gw.shutdown.cancel();
}

/// The gateway refusing a revoked device at the handshake names it: its own line says only
/// "invalid peer certificate: Revoked" and the address.
#[tokio::test(flavor = "current_thread")]
async fn a_revoked_devices_refused_handshake_names_it() {
    let (logs, _guard) = capture_logs();
    let z = TestZone::new(&["home1", "laptop"]);
    z.write_policy("apps.toml", echo_policy());
    // The gateway's bundle holds the zone.json revoking the laptop; the laptop's does not.
    std::fs::write(z.bundle("gw").zone_config, z.revoke("laptop")).unwrap();
    let gw = start_gateway(&z, fast_tuning(), Duration::from_millis(500)).await;
    let laptop = start_agent(&z, "laptop", services(&[]), vec![], fast_tuning()).await;
    let said = || String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    wait_until("the refusal named the device", WAIT, || {
        said().lines().any(|l| {
            l.contains("certificate refused: the device is revoked") && l.contains("device=laptop")
        })
    })
    .await;
    assert!(gw.hub.agent("laptop").is_none());
    laptop.shutdown.cancel();
    gw.shutdown.cancel();
}

/// What `device revoke` tells the owner to do: copy the new zone.json into the gateway's bundle.
/// The running gateway adopts it (no restart, no agent passing it on) and cuts the device off;
/// a damaged copy and an older one change nothing (the older one is set aside), and an older
/// config a device offers later does not overwrite the newer file on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_json_copied_into_a_running_gateway_revokes() {
    let (z, gw, _h1) = echo_zone(&["home1", "laptop"], "", fast_tuning()).await;
    let laptop = start_echo_node(&z, &gw, "laptop").await;
    let gw_zone = z.bundle("gw").zone_config;
    let before = std::fs::read(&gw_zone).unwrap();
    let serial0 = gw.hub.creds().zone_serial();

    // A half-copied file: refused, nothing changes — the file is left to the copy, which
    // may still be writing it (it was replaced by the config in use, and the copy then went
    // on into a file no longer there).
    let half = &before[..before.len() / 2];
    std::fs::write(&gw_zone, half).unwrap();
    // The watcher reads a change once it held still for a poll (500 ms each).
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(gw.hub.creds().zone_serial(), serial0);
    assert!(gw.hub.agent("laptop").is_some());
    assert!(
        std::fs::read(&gw_zone).unwrap() == half,
        "the half-copied file was replaced"
    );

    let revoking = z.revoke("laptop");
    std::fs::write(&gw_zone, &revoking).unwrap();
    wait_until("laptop disconnected", WAIT, || {
        gw.hub.agent("laptop").is_none()
    })
    .await;
    // The config that revokes it reached the laptop before its connection closed: it stopped
    // for good (a node exits 2). Closed at once, it retried for ever, refused at each
    // handshake, never learning why from anything it could verify.
    wait_until("the laptop stopped as revoked", WAIT, || {
        laptop.agent.revoked_self().is_some()
    })
    .await;
    let serial1 = gw.hub.creds().zone_serial();
    assert!(serial1 > serial0);
    assert!(gw
        .hub
        .creds()
        .trust
        .is_revoked(&zone_core::DeviceName::new("laptop").unwrap()));
    assert_echoes(gw.apps["echo"], b"home1 still served").await;

    // The owner copies an older zone.json by mistake: ignored, the laptop stays out, and
    // the file is set aside for the config in use (a restart loaded the older one and let
    // the laptop back in). Copied once the gateway's save of the newer one is done: one
    // still on its way replaces the older copy instead (as its own later write).
    wait_until("the adopted config saved", WAIT, || {
        !gw.hub.creds().saving()
    })
    .await;
    std::fs::write(&gw_zone, &before).unwrap();
    wait_until("the older zone.json set aside", WAIT, || {
        zone_core::zonedir::read_zone_json(&gw_zone).is_ok_and(|z| z.config.serial == serial1)
    })
    .await;
    let aside = gw_zone.with_extension("json.refused");
    assert!(std::fs::read(&aside).unwrap() == before, "not set aside");
    assert_eq!(gw.hub.creds().zone_serial(), serial1);
    assert!(gw.hub.agent("laptop").is_none());

    // Another zone's zone.json, whole but foreign: set aside too (a restart would refuse it).
    let other = TestZone::new(&["home1"]);
    let foreign = std::fs::read(other.zone_dir().join("zone.json")).unwrap();
    std::fs::write(&gw_zone, &foreign).unwrap();
    wait_until("the foreign zone.json set aside", WAIT, || {
        zone_core::zonedir::read_zone_json(&gw_zone).is_ok_and(|z| z.config.serial == serial1)
    })
    .await;
    assert!(std::fs::read(&aside).unwrap() == foreign, "not set aside");

    // The serial in use, other contents (edited by hand): set aside too — as not newer it
    // was never checked, and the next start refused its signature and stopped the gateway.
    let mut edited: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&gw_zone).unwrap()).unwrap();
    let sig = edited["signature"].as_str().unwrap().to_owned();
    let flipped = if sig.starts_with('A') { "B" } else { "A" };
    edited["signature"] = format!("{flipped}{}", &sig[1..]).into();
    let edited = serde_json::to_vec_pretty(&edited).unwrap();
    std::fs::write(&gw_zone, &edited).unwrap();
    // The copy is set aside first, then the config in use written back: wait for both.
    wait_until("the edited zone.json set aside and replaced", WAIT, || {
        std::fs::read(&aside).is_ok_and(|a| a == edited)
            && zone_core::zonedir::read_zone_json(&gw_zone)
                .is_ok_and(|z| z == *gw.hub.creds().zone())
    })
    .await;
    laptop.shutdown.cancel();
    gw.shutdown.cancel();
}

/// A device (valid certificate) that sends its hello but never reads: the gateway's welcome
/// cannot be written (zero receive window). The gateway must give up on the connection within
/// its handshake timeout instead of holding it unregistered, out of reach of revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_never_reads_its_welcome_is_dropped() {
    let z = TestZone::new(&["home1"]);
    let tuning = fast_tuning();
    let gw = start_gateway(&z, tuning, Duration::from_millis(500)).await;
    let creds = z.creds("home1");
    let (_ep, conn) = connect_reading_little(&z, &creds, tuning, 0, Some(0)).await;
    let _io = send_hello(&conn, &creds, "home1").await;
    let closed = tokio::time::timeout(
        tuning.handshake_timeout + Duration::from_secs(3),
        conn.closed(),
    )
    .await;
    assert!(closed.is_ok(), "the gateway still holds the connection");
    assert!(gw.hub.agent("home1").is_none());
    gw.shutdown.cancel();
}

/// Every tunnel handshake verifies the device's certificate against the revocations in force:
/// a reconnect must not slip past them by resuming an earlier TLS session (a resumed handshake
/// does not verify the client certificate again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_cannot_resume_past_a_revocation() {
    let z = TestZone::new(&["laptop"]);
    let gw = z.creds("gw");
    let tuning = fast_tuning();
    let server =
        tunnel::transport::server_endpoint("127.0.0.1:0".parse().unwrap(), &gw, &tuning).unwrap();
    let addr = server.local_addr().unwrap();
    // The accepting side verifies the client certificate after the client has finished its
    // half of the handshake, so the client alone cannot tell in time: the accepting side
    // reports each handshake's outcome.
    let (verdicts, mut verdict) = tokio::sync::mpsc::unbounded_channel();
    let accept = tokio::spawn({
        let server = server.clone();
        async move {
            while let Some(inc) = server.accept().await {
                let verdicts = verdicts.clone();
                tokio::spawn(async move {
                    match inc.await {
                        Ok(conn) => {
                            let _ = verdicts.send(Ok(()));
                            conn.closed().await;
                        }
                        Err(e) => {
                            let _ = verdicts.send(Err(e));
                        }
                    }
                });
            }
        }
    });
    let laptop = z.creds("laptop");
    let client =
        tunnel::transport::client_endpoint("127.0.0.1:0".parse().unwrap(), &laptop, &tuning)
            .unwrap();
    let mut connect = async || {
        // A refused client may or may not see its own handshake finish; the server's
        // verdict is what counts.
        let conn = client.connect(addr, "gw.alice.example").unwrap().await;
        let verdict = tokio::time::timeout(WAIT, verdict.recv())
            .await
            .expect("the gateway's side decides within WAIT")
            .expect("the accept task runs");
        verdict.map(|()| conn.expect("a handshake the gateway took finishes for the client"))
    };
    let first = connect().await.expect("laptop's first handshake");
    first.close(0u32.into(), b"");

    let revoking = z.revoke("laptop");
    assert!(gw.offer_zone(&revoking).unwrap().is_some());
    let again = connect().await;
    assert!(again.is_err(), "a revoked device completed a handshake");
    accept.abort();
}

/// Two gateways; the owner copies the revoking zone.json into one of them only. Agents connected
/// to both pass it on to the other at once (not just in their next hello, which may be days
/// away), so the other gateway cuts the revoked device off too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_every_gateway_through_the_agents() {
    let z = TestZone::with_gateways(&["gw", "gw2"], &["home1", "laptop"]);
    let t = fast_tuning();
    let gw = start_named_gateway(&z, "gw", t).await;
    let gw2 = start_named_gateway(&z, "gw2", t).await;
    let _h1 = start_agent(&z, "home1", services(&[]), vec![], t).await;
    let laptop = start_agent(&z, "laptop", services(&[]), vec![], t).await;
    wait_until("both agents on both gateways", WAIT, || {
        gw.hub.agents().len() == 2 && gw2.hub.agents().len() == 2
    })
    .await;

    std::fs::write(z.bundle("gw").zone_config, z.revoke("laptop")).unwrap();
    // The laptop's agent stops on the config gw sends it, which also ends its connection to
    // gw2: gw2 learning the revocation (from home1) is what this waits for.
    let laptop_name = zone_core::DeviceName::new("laptop").unwrap();
    wait_until(
        "gw2 learned the revocation and cut the laptop off",
        WAIT,
        || {
            gw2.hub.creds().trust.is_revoked(&laptop_name)
                && gw2.hub.agent("laptop").is_none()
                && gw.hub.agent("laptop").is_none()
        },
    )
    .await;
    assert!(gw2.hub.agent("home1").is_some());
    laptop.shutdown.cancel();
    gw.shutdown.cancel();
    gw2.shutdown.cancel();
}

/// One gateway of two refusing a device as revoked does not stop its agent: the other, which
/// has not learnt of the revocation yet, still serves it (and one gateway alone should not be
/// able to stop a node for good). When that one learns it too, the agent stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gateway_refusing_a_device_as_revoked_does_not_stop_it_while_another_serves() {
    let z = TestZone::with_gateways(&["gw", "gw2"], &["laptop"]);
    let t = fast_tuning();
    let revoking = z.revoke("laptop");
    std::fs::write(z.bundle("gw").zone_config, &revoking).unwrap();
    let gw = start_named_gateway(&z, "gw", t).await;
    let gw2 = start_named_gateway(&z, "gw2", t).await;
    let laptop = start_agent(&z, "laptop", services(&[]), vec![], t).await;
    let refused_by_gw =
        || {
            laptop.agent.links().iter().any(|l| {
                l.name == "gw" && l.status().last_error.is_some_and(|e| e.contains("revoked"))
            })
        };
    wait_until("gw refused the laptop, gw2 let it in", WAIT, || {
        refused_by_gw() && gw2.hub.agent("laptop").is_some()
    })
    .await;
    // A moment later, gw2 serving it: still running.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(laptop.agent.revoked_self().is_none() && !laptop.task.is_finished());
    assert!(gw.hub.agent("laptop").is_none());
    // gw2 learns the revocation (the owner copies zone.json there too): it tells the laptop,
    // which stops for good.
    std::fs::write(z.bundle("gw2").zone_config, &revoking).unwrap();
    tokio::time::timeout(WAIT, laptop.task)
        .await
        .expect("the agent stops once the last gateway serving it learns the revocation")
        .unwrap();
    assert!(laptop.agent.revoked_self().is_some());
    gw.shutdown.cancel();
    gw2.shutdown.cancel();
}

/// A gateway whose zone config was signed from a zone directory restored from an older
/// backup (a newer serial, without the revocation of the laptop made since) learns the
/// revocation from an agent's older config in its hello: revocations are for good. The
/// laptop, let in until then, is cut off and stays out; before, it was served for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_signed_from_a_restored_backup_learns_revocations_from_its_agents() {
    let z = TestZone::new(&["home1", "laptop"]);
    let backup = zone_core::zonedir::read_zone_json(&z.zone_dir().join("zone.json")).unwrap();
    let revoking = z.revoke("laptop");
    // What a `device add` in the restored directory signs: the backup's config, newer.
    std::fs::write(z.bundle("gw").zone_config, z.restored_from_backup(&backup)).unwrap();
    std::fs::write(z.bundle("home1").zone_config, &revoking).unwrap();
    let t = steady_tuning();
    let gw = start_gateway(&z, t, Duration::from_millis(500)).await;
    let laptop = start_agent(&z, "laptop", services(&[]), vec![], t).await;
    wait_until("the laptop let in", WAIT, || {
        gw.hub.agent("laptop").is_some()
    })
    .await;

    let _h1 = start_agent(&z, "home1", services(&[]), vec![], t).await;
    wait_until("the laptop cut off", WAIT, || {
        gw.hub.agent("laptop").is_none()
    })
    .await;
    let laptop_name = zone_core::DeviceName::new("laptop").unwrap();
    assert!(gw.hub.creds().trust.is_revoked(&laptop_name));
    // And it stays out (its agent keeps dialing).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(gw.hub.agent("laptop").is_none());
    // Recorded beside the gateway's zone.json, so a restart keeps it.
    let seen = zone_core::seen_revocations::path_beside(&z.bundle("gw").zone_config);
    wait_until("the revocation recorded", WAIT, || {
        std::fs::read_to_string(&seen).is_ok_and(|t| t.contains("laptop"))
    })
    .await;
    laptop.shutdown.cancel();
    gw.shutdown.cancel();
}

/// Two gateways; the owner revokes one (say its VPS was compromised) and copies the revoking
/// zone.json into the other. Agents learn it from there and drop their connection to the
/// revoked gateway at once (it could open streams to any of their services), and it cannot
/// get one back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_drop_a_gateway_the_zone_revokes() {
    let z = TestZone::with_gateways(&["gw", "gw2"], &["home1"]);
    let t = fast_tuning();
    let gw = start_named_gateway(&z, "gw", t).await;
    let gw2 = start_named_gateway(&z, "gw2", t).await;
    let _h1 = start_agent(&z, "home1", services(&[]), vec![], t).await;
    wait_until("home1 on both gateways", WAIT, || {
        gw.hub.agent("home1").is_some() && gw2.hub.agent("home1").is_some()
    })
    .await;

    std::fs::write(z.bundle("gw").zone_config, z.revoke("gw2")).unwrap();
    wait_until("home1 left the revoked gateway", WAIT, || {
        gw2.hub.agent("home1").is_none()
    })
    .await;
    // Well past the agent's reconnect delay: it did not get back in.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        gw2.hub.agent("home1").is_none(),
        "home1 reconnected to a revoked gateway"
    );
    assert!(gw.hub.agent("home1").is_some());
    gw.shutdown.cancel();
    gw2.shutdown.cancel();
}

/// A gateway running a config signed from a restored backup (newer, without the laptop's
/// revocation); the owner copies the revoking zone.json into its bundle. Not adopted — it is
/// older — but the revocation it signs is for good: the laptop is cut off and stays out.
/// Before, the file was set aside and the laptop served until some agent's hello carried the
/// revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_takes_the_revocations_of_an_older_zone_json_copied_into_its_bundle() {
    let z = TestZone::new(&["home1", "laptop"]);
    let backup = zone_core::zonedir::read_zone_json(&z.zone_dir().join("zone.json")).unwrap();
    let revoking = z.revoke("laptop");
    std::fs::write(z.bundle("gw").zone_config, z.restored_from_backup(&backup)).unwrap();
    let t = steady_tuning();
    let gw = start_gateway(&z, t, Duration::from_millis(500)).await;
    let laptop = start_agent(&z, "laptop", services(&[]), vec![], t).await;
    wait_until("the laptop let in", WAIT, || {
        gw.hub.agent("laptop").is_some()
    })
    .await;
    let serial = gw.hub.creds().zone_serial();

    std::fs::write(z.bundle("gw").zone_config, &revoking).unwrap();
    wait_until("the laptop cut off", WAIT, || {
        gw.hub.agent("laptop").is_none()
    })
    .await;
    let laptop_name = zone_core::DeviceName::new("laptop").unwrap();
    assert!(gw.hub.creds().trust.is_revoked(&laptop_name));
    assert_eq!(
        gw.hub.creds().zone_serial(),
        serial,
        "the older config was adopted"
    );
    // And the older file is set aside, the config in use written back: a restart would load
    // it (its gateways, its devices; refused if expired). It stayed, unreported, when the
    // record of the revocations it taught was still being written.
    let bundle = z.bundle("gw").zone_config;
    wait_until("the older zone.json set aside", WAIT, || {
        zone_core::zonedir::read_zone_json(&bundle).is_ok_and(|f| f.config.serial == serial)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(gw.hub.agent("laptop").is_none(), "the laptop got back in");
    laptop.shutdown.cancel();
    gw.shutdown.cancel();
}

/// Revocations a gateway learned from a config it did not adopt reach the devices that
/// connect after, with the gateway's own serial (whose Welcome carries no config): each new
/// session gets the configs they were learned from. Only the agents connected then were told,
/// and home1 kept trusting the laptop (a direct path to it, its streams) for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_a_gateway_learned_reach_devices_that_connect_later() {
    let z = TestZone::new(&["home1", "laptop"]);
    let backup = zone_core::zonedir::read_zone_json(&z.zone_dir().join("zone.json")).unwrap();
    let revoking = z.revoke("laptop");
    let restored = z.restored_from_backup(&backup);
    std::fs::write(z.bundle("gw").zone_config, &restored).unwrap();
    std::fs::write(z.bundle("home1").zone_config, &restored).unwrap();
    let t = steady_tuning();
    let gw = start_gateway(&z, t, Duration::from_millis(500)).await;
    std::fs::write(z.bundle("gw").zone_config, &revoking).unwrap();
    let laptop = zone_core::DeviceName::new("laptop").unwrap();
    wait_until("the gateway learned the revocation", WAIT, || {
        gw.hub.creds().trust.is_revoked(&laptop)
    })
    .await;
    let h1 = home1_learns_the_laptop_is_revoked(&z, t, |ours| {
        assert_eq!(ours, gw.hub.creds().zone_serial())
    })
    .await;
    h1.shutdown.cancel();
    gw.shutdown.cancel();
}

/// Starts home1 (`serial` sees its config's serial first) and waits until it holds the
/// laptop's revocation.
async fn home1_learns_the_laptop_is_revoked(
    z: &TestZone,
    t: Tuning,
    serial: impl FnOnce(u64),
) -> RunningAgent {
    let h1 = start_agent(z, "home1", services(&[]), vec![], t).await;
    serial(h1.agent.creds().zone_serial());
    wait_until("home1 learned the revocation", WAIT, || {
        h1.agent.creds().is_revoked("laptop")
    })
    .await;
    h1
}

/// A device whose newer config (signed from a restored backup) leaves out a revocation the
/// gateway holds gets the gateway's config in its Welcome all the same, and takes the
/// revocation from it, older as it is. The Welcome carried no config to a device whose serial
/// was higher, and home1 kept trusting the laptop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_a_config_leaving_out_a_revocation_learns_it_at_its_welcome() {
    let z = TestZone::new(&["home1", "laptop"]);
    let backup = zone_core::zonedir::read_zone_json(&z.zone_dir().join("zone.json")).unwrap();
    let revoking = z.revoke("laptop");
    std::fs::write(z.bundle("gw").zone_config, &revoking).unwrap();
    std::fs::write(
        z.bundle("home1").zone_config,
        z.restored_from_backup(&backup),
    )
    .unwrap();
    let t = steady_tuning();
    let gw = start_gateway(&z, t, Duration::from_millis(500)).await;
    let h1 = home1_learns_the_laptop_is_revoked(&z, t, |ours| {
        assert!(ours > gw.hub.creds().zone_serial())
    })
    .await;
    h1.shutdown.cancel();
    gw.shutdown.cancel();
}

/// The same on a node: its bundle gets a zone.json that revokes gateway gw2 but is older than
/// the (restored) one in use. The node drops its link to gw2 at once (a revoked gateway can
/// open streams to every service of the device) instead of keeping it until a newer config
/// revoking gw2 came along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_takes_the_revocations_of_an_older_zone_json_copied_into_its_bundle() {
    let z = TestZone::with_gateways(&["gw", "gw2"], &["home1"]);
    let backup = zone_core::zonedir::read_zone_json(&z.zone_dir().join("zone.json")).unwrap();
    let revoking = z.revoke("gw2");
    let restored = z.restored_from_backup(&backup);
    for d in ["gw", "gw2", "home1"] {
        std::fs::write(z.bundle(d).zone_config, &restored).unwrap();
    }
    let t = fast_tuning();
    let gw = start_named_gateway(&z, "gw", t).await;
    let gw2 = start_named_gateway(&z, "gw2", t).await;
    let home1 = start_agent(&z, "home1", services(&[]), vec![], t).await;
    wait_until("home1 on both gateways", WAIT, || {
        gw.hub.agent("home1").is_some() && gw2.hub.agent("home1").is_some()
    })
    .await;

    std::fs::write(z.bundle("home1").zone_config, &revoking).unwrap();
    wait_until("home1 dropped gw2", WAIT, || {
        gw2.hub.agent("home1").is_none() && home1.agent.links().iter().all(|l| l.name != "gw2")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        gw2.hub.agent("home1").is_none(),
        "home1 reconnected to a revoked gateway"
    );
    assert!(gw.hub.agent("home1").is_some());
    home1.shutdown.cancel();
    gw.shutdown.cancel();
    gw2.shutdown.cancel();
}

/// A device offers a config newer than the one in use, but the owner has meanwhile copied an
/// even newer one into the bundle (not read yet): the adoption must not overwrite that file.
#[test]
fn adopting_an_offer_keeps_a_newer_zone_json_on_disk() {
    let z = TestZone::new(&["home1"]);
    let creds = z.creds("gw");
    let mut zd = zone_core::zonedir::ZoneDir::open(&z.zone_dir()).unwrap();
    let now = time::OffsetDateTime::now_utc();
    zd.resign(now, 30).unwrap();
    let offered = std::fs::read(z.zone_dir().join("zone.json")).unwrap();
    zd.resign(now, 30).unwrap();
    let newest = std::fs::read(z.zone_dir().join("zone.json")).unwrap();
    std::fs::write(&z.bundle("gw").zone_config, &newest).unwrap();
    let adopted = creds.offer_zone(&offered).unwrap();
    assert_eq!(adopted, Some(creds.zone_serial()));
    assert_eq!(std::fs::read(&z.bundle("gw").zone_config).unwrap(), newest);
}

/// On a runtime the adopted config is written from the blocking pool (a node's one runtime
/// thread would wait on its two syncs): adopted at once, on disk soon after, and a second
/// offer racing the first leaves the newest on disk.
#[tokio::test(flavor = "current_thread")]
async fn an_offer_adopted_on_a_runtime_is_saved_off_it() {
    let z = TestZone::new(&["home1", "laptop"]);
    let creds = z.creds("gw");
    let mut zd = zone_core::zonedir::ZoneDir::open(&z.zone_dir()).unwrap();
    zd.resign(time::OffsetDateTime::now_utc(), 30).unwrap();
    let first = std::fs::read(z.zone_dir().join("zone.json")).unwrap();
    let second = z.revoke("laptop");
    assert!(creds.offer_zone(&first).unwrap().is_some());
    let newest = creds.offer_zone(&second).unwrap().expect("adopted");
    assert_eq!(creds.zone_serial(), newest);
    let path = z.bundle("gw").zone_config;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let on_disk = zone_core::zonedir::read_zone_json(&path)
            .unwrap()
            .config
            .serial;
        if on_disk == newest {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "zone.json on disk stayed at serial {on_disk}, adopted {newest}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A device's own zone.json has expired (a year without zone changes): it still starts with
/// it, the newest config it knows (it exited, and systemd restarted it for ever, until
/// someone copied a fresh one by hand); an expired config offered by a peer is still refused.
#[test]
fn a_device_starts_with_its_own_expired_zone_config() {
    let z = TestZone::new(&["home1"]);
    let mut zd = zone_core::zonedir::ZoneDir::open(&z.zone_dir()).unwrap();
    let long_ago = time::OffsetDateTime::now_utc() - time::Duration::days(400);
    zd.resign(long_ago, 365).unwrap();
    let expired = std::fs::read(z.zone_dir().join("zone.json")).unwrap();
    let bundle = z.bundle("home1");
    std::fs::write(&bundle.zone_config, &expired).unwrap();
    let creds = DeviceCreds::load(&bundle, None).expect("starts with its expired config");
    let serial = zone_core::SignedZone::from_json(&expired)
        .unwrap()
        .config
        .serial;
    assert_eq!(creds.zone_serial(), serial);
    zd.resign(long_ago, 365).unwrap();
    let newer = std::fs::read(z.zone_dir().join("zone.json")).unwrap();
    let e = creds.offer_zone(&newer).unwrap_err().to_string();
    assert!(e.contains("expired"), "{e}");
    assert_eq!(creds.zone_serial(), serial);
    // Past the grace after its expiry it is refused again: a standby powered on after years
    // must not start with the revocations of then.
    let longer_ago = time::OffsetDateTime::now_utc()
        - time::Duration::days(365 + tunnel::creds::EXPIRED_GRACE_DAYS + 10);
    zd.resign(longer_ago, 365).unwrap();
    std::fs::copy(z.zone_dir().join("zone.json"), &bundle.zone_config).unwrap();
    let Err(e) = DeviceCreds::load(&bundle, None) else {
        panic!("a config long expired was loaded");
    };
    assert!(e.to_string().contains("expired"), "{e}");
}

/// A zone directory restored from a backup made before a revocation signs configs without it,
/// and their serial (the clock) outranks the revoking one. A device that adopted the
/// revocation loaded such a zone.json at its next start and let the revoked device back in;
/// it now keeps the revocation in its record beside zone.json, and refuses a record naming
/// itself.
#[test]
fn a_revocation_seen_survives_a_restart_with_a_zone_json_signed_from_a_backup() {
    let z = TestZone::new(&["home1", "laptop"]);
    let backup = tempfile::tempdir().unwrap();
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(z.zone_dir())
        .arg(backup.path().join("zone"))
        .status()
        .unwrap();
    assert!(copied.success());
    let laptop = zone_core::DeviceName::new("laptop").unwrap();
    let bundle = z.bundle("home1");
    let record = zone_core::seen_revocations::path_beside(&bundle.zone_config);

    // Running, home1 adopts the revoking config (a gateway passes it on): recorded.
    let creds = DeviceCreds::load(&bundle, None).unwrap();
    assert!(!record.exists(), "nothing revoked yet, nothing to record");
    let revoking = z.revoke("laptop");
    creds.offer_zone(&revoking).unwrap().expect("adopted");
    assert!(creds.trust.is_revoked(&laptop));
    let recorded = zone_core::seen_revocations::read(&record).unwrap();
    assert!(recorded.contains(&laptop), "{recorded:?}");
    drop(creds);

    // The owner restores the zone directory from the backup and adds a device.
    let mut zd = zone_core::zonedir::ZoneDir::open(&backup.path().join("zone")).unwrap();
    let tablet = zone_core::DeviceName::new("tablet").unwrap();
    zd.add_device(
        &tablet,
        &[zone_core::Role::Node],
        &[],
        time::OffsetDateTime::now_utc(),
        30,
    )
    .unwrap();
    // Later that day (a serial is the clock's second, or one past the last).
    zd.resign(time::OffsetDateTime::now_utc(), 365).unwrap();
    let restored = std::fs::read(backup.path().join("zone/zone.json")).unwrap();
    let restored_zone = zone_core::SignedZone::from_json(&restored).unwrap();
    let revoking_serial = zone_core::SignedZone::from_json(&revoking)
        .unwrap()
        .config
        .serial;
    assert!(restored_zone.config.serial > revoking_serial);
    assert!(!restored_zone.config.is_revoked(&laptop));

    // home1 restarts with that zone.json in its bundle: the laptop stays out.
    std::fs::write(&bundle.zone_config, &restored).unwrap();
    let creds = DeviceCreds::load(&bundle, None).unwrap();
    assert_eq!(creds.zone_serial(), restored_zone.config.serial);
    assert!(
        creds.trust.is_revoked(&laptop),
        "a restart forgot the revocation"
    );
    assert!(creds.is_revoked("laptop"));
    // Nor does its end-to-end key open a relayed stream (the gateway relaying it may never
    // have seen the revocation).
    assert!(creds.noise_public_of("laptop").is_err());
    assert!(creds.noise_public_of("tablet").is_ok());
    drop(creds);

    // A record naming this device itself: it cannot start (every peer refuses it).
    std::fs::write(&record, "laptop\nhome1\n").unwrap();
    let Err(e) = DeviceCreds::load(&bundle, None) else {
        panic!("a device its own record revokes started");
    };
    assert!(e.to_string().contains("revokes this device"), "{e}");
    // An unreadable record says which file and what to do.
    std::fs::write(&record, "Not A Name\n").unwrap();
    let Err(e) = DeviceCreds::load(&bundle, None) else {
        panic!("a damaged record was ignored");
    };
    assert!(matches!(e, tunnel::TunnelError::Unrunnable(_)), "{e}");
    let e = e.to_string();
    assert!(
        e.contains("zone-revoked.txt") && e.contains("line 1"),
        "{e}"
    );
    // One that cannot be read now (here: a directory) may be readable at the next try: exit 1.
    std::fs::remove_file(&record).unwrap();
    std::fs::create_dir(&record).unwrap();
    let Err(e) = DeviceCreds::load(&bundle, None) else {
        panic!("an unreadable record was ignored");
    };
    assert!(matches!(e, tunnel::TunnelError::Config(_)), "{e}");
}

/// home1's bundle with a certificate issued as if at now + `shift`, for 30 days.
fn home1_certified_at(shift: time::Duration) -> TestZone {
    let z = TestZone::new(&["home1"]);
    let mut zd = zone_core::zonedir::ZoneDir::open(&z.zone_dir()).unwrap();
    let home1 = zone_core::DeviceName::new("home1").unwrap();
    let (key, cert) = zd
        .renew(&home1, time::OffsetDateTime::now_utc() + shift, 30)
        .unwrap();
    zd.write_bundle(&z.zone_dir().join("devices/home1"), &home1, &key, &cert)
        .unwrap();
    z
}

/// A device whose own certificate has expired does not start, and says how to renew it.
#[test]
fn an_expired_own_certificate_says_how_to_renew_it() {
    let z = home1_certified_at(-time::Duration::days(400));
    let Err(e) = DeviceCreds::load(&z.bundle("home1"), None) else {
        panic!("an expired certificate was loaded");
    };
    let e = e.to_string();
    assert!(
        e.contains("certificate expired") && e.contains("zonegate device renew home1 --zone DIR"),
        "{e}"
    );
}

/// A certificate not valid yet (a machine booting with its clock in the past, before NTP)
/// says so with both times and points at the clock, not at the certificate.
#[test]
fn a_certificate_not_valid_yet_points_at_the_clock() {
    let z = home1_certified_at(time::Duration::days(10));
    let Err(e) = DeviceCreds::load(&z.bundle("home1"), None) else {
        panic!("a certificate not valid yet was loaded");
    };
    let e = e.to_string();
    assert!(
        e.contains("not valid until")
            && e.contains("this machine's clock says")
            && e.contains("NTP"),
        "{e}"
    );
}

/// A device key others may read is refused with the command that fixes it; one its group
/// may read is not.
#[test]
fn a_device_key_others_may_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let z = TestZone::new(&["home1"]);
    let bundle = z.bundle("home1");
    let set = |mode| std::fs::set_permissions(&bundle.key, std::fs::Permissions::from_mode(mode));
    set(0o644).unwrap();
    let Err(e) = DeviceCreds::load(&bundle, None) else {
        panic!("a device key others may read was loaded");
    };
    let e = e.to_string();
    assert!(e.contains("mode 644") && e.contains("chmod 600"), "{e}");
    set(0o640).unwrap();
    DeviceCreds::load(&bundle, None).expect("a key its group may read");
}

/// A newer config whose file cannot be written (here: a directory where zone.json was; a
/// read-only or full disk alike) is still adopted, revocations and all: it used to set the
/// revocations, fail the write and keep the old config, so the revoked device stayed in.
#[test]
fn an_offer_is_adopted_even_when_the_bundle_cannot_be_written() {
    let z = TestZone::new(&["home1", "laptop"]);
    let creds = z.creds("gw");
    let before = creds.zone_serial();
    let revoking = z.revoke("laptop");
    let path = z.bundle("gw").zone_config;
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    let adopted = creds.offer_zone(&revoking).unwrap();
    assert!(adopted.is_some_and(|s| s > before), "{adopted:?}");
    assert_eq!(Some(creds.zone_serial()), adopted);
    let laptop = zone_core::DeviceName::new("laptop").unwrap();
    assert!(creds.trust.is_revoked(&laptop));
    assert!(!creds.zone().config.devices.iter().any(|d| d.name == laptop));
}

/// A zone directory restored from a backup taken before a revocation signs configs with
/// higher serials that do not hold it: such a config is refused, and the revoked device stays
/// out. It used to be adopted, and the stolen device's still-valid certificate was let in.
#[test]
fn a_newer_config_that_drops_a_revocation_is_refused() {
    let z = TestZone::new(&["home1", "laptop"]);
    let creds = z.creds("gw");
    let zone_json = z.zone_dir().join("zone.json");
    let backup = std::fs::read(&zone_json).unwrap();
    let revoking = z.revoke("laptop");
    assert!(creds.offer_zone(&revoking).unwrap().is_some());
    let laptop = zone_core::DeviceName::new("laptop").unwrap();
    assert!(creds.trust.is_revoked(&laptop));
    // The backup comes back; the next change there outranks the revocation's serial.
    std::fs::write(&zone_json, &backup).unwrap();
    let mut zd = zone_core::zonedir::ZoneDir::open(&z.zone_dir()).unwrap();
    // Serials count seconds: twice, in case this is still the revocation's second.
    zd.resign(time::OffsetDateTime::now_utc(), 30).unwrap();
    zd.resign(time::OffsetDateTime::now_utc(), 30).unwrap();
    let restored = std::fs::read(&zone_json).unwrap();
    let serial = creds.zone_serial();
    let e = creds.offer_zone(&restored).unwrap_err().to_string();
    assert!(
        e.contains("leaves out the revocation of laptop") && e.contains("zonegate device revoke"),
        "{e}"
    );
    assert_eq!(
        creds.zone_serial(),
        serial,
        "the restored config was adopted"
    );
    assert!(creds.trust.is_revoked(&laptop));
    // Copied into the bundle, it is set aside and the config in use written back: a restart
    // would otherwise load it, signature checked only.
    let bundle = z.bundle("gw").zone_config;
    std::fs::write(&bundle, &restored).unwrap();
    let aside = creds
        .set_aside_refused(&restored)
        .unwrap()
        .expect("set aside");
    assert_eq!(std::fs::read(&aside).unwrap(), restored);
    let on_disk = zone_core::zonedir::read_zone_json(&bundle).unwrap();
    assert_eq!(on_disk.config.serial, serial);
    assert!(on_disk.config.is_revoked(&laptop));
    // Copied again meanwhile: the newer copy is left for the watcher's next look.
    std::fs::write(&bundle, &restored).unwrap();
    assert!(creds.set_aside_refused(b"other bytes").unwrap().is_none());
    assert_eq!(std::fs::read(&bundle).unwrap(), restored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_closed_as_they_open_are_not_left_on_the_agent() {
    let z = TestZone::new(&["home1"]);
    let uecho = udp_echo().await;
    let gw = start_gateway(&z, fast_tuning(), Duration::from_millis(500)).await;
    let h1 = start_agent(
        &z,
        "home1",
        services(&[("uecho", uecho, tunnel::proto::ServiceProto::Udp)]),
        vec![],
        fast_tuning(),
    )
    .await;
    wait_until("home1 connected", WAIT, || gw.hub.agent("home1").is_some()).await;
    let origin = || Origin::Public("192.0.2.7:5000".parse().unwrap());

    // One flow that stays, and works.
    let (kept, mut rx) = gw
        .hub
        .open_udp_flow("home1", "uecho", "uecho", origin())
        .await
        .unwrap();
    let mut echoed = None;
    for _ in 0..50 {
        kept.send(b"ping").unwrap();
        if let Ok(Some(b)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            echoed = Some(b);
            break;
        }
    }
    assert_eq!(echoed.as_deref(), Some(&b"ping"[..]));
    // Flows closed right after they open: the close reaches the agent right behind the open.
    for _ in 0..200 {
        let (flow, _rx) = gw
            .hub
            .open_udp_flow("home1", "uecho", "uecho", origin())
            .await
            .unwrap();
        drop(flow);
    }
    wait_until("only the kept flow is open on the agent", WAIT, || {
        h1.agent.udp_flows() == 1
    })
    .await;
    drop(kept);
    wait_until("no flow left on the agent", WAIT, || {
        h1.agent.udp_flows() == 0
    })
    .await;
    gw.shutdown.cancel();
}

/// One client address cannot take the whole HTTP front: beyond its limit of open connections
/// new ones are closed at once (logged once, counted in /metrics), while other addresses are
/// served; a closed connection gives its slot back. One address used to be able to hold all
/// 16,384 slots with idle keep-alive connections and lock everyone else out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_address_cannot_take_the_whole_http_front() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let z = TestZone::new(&["home1"]);
    let mut opts = gateway_options(
        &z,
        "gw",
        z.gw_addr,
        fast_tuning(),
        Duration::from_millis(500),
        None,
    );
    opts.http = Some("127.0.0.1:0".parse().unwrap());
    opts.http_tuning.max_connections_per_ip = 3;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let gw = gateway::Gateway::bind(opts, shutdown.clone())
        .await
        .unwrap();
    let (http, admin) = (gw.http_addr().unwrap(), gw.admin_addr());
    tokio::spawn(gw.run());
    // Served: a request on a connection from `ip` gets the front's 404.
    async fn served(c: &mut tokio::net::TcpStream) -> bool {
        if c.write_all(b"GET / HTTP/1.1\r\nHost: nowhere.example\r\n\r\n")
            .await
            .is_err()
        {
            return false;
        }
        let mut buf = [0u8; 12];
        matches!(
            tokio::time::timeout(WAIT, c.read_exact(&mut buf)).await,
            Ok(Ok(_)) if &buf == b"HTTP/1.1 404"
        )
    }
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = socket_from("127.0.0.1").connect(http).await.unwrap();
        assert!(served(&mut c).await);
        held.push(c);
    }
    let mut fourth = socket_from("127.0.0.1").connect(http).await.unwrap();
    assert!(
        !served(&mut fourth).await,
        "a fourth connection from the same address"
    );
    let mut other = socket_from("127.0.0.2").connect(http).await.unwrap();
    assert!(served(&mut other).await, "another address is served");

    drop(held.pop());
    let mut again = None;
    for _ in 0..50 {
        let mut c = socket_from("127.0.0.1").connect(http).await.unwrap();
        if served(&mut c).await {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(again.is_some(), "a closed connection gave its slot back");

    let mut m = tokio::net::TcpStream::connect(admin).await.unwrap();
    m.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    m.read_to_string(&mut text).await.unwrap();
    let refused = text
        .lines()
        .find_map(|l| l.strip_prefix("zonegate_http_connections_refused_total{reason=\"per_ip\"} "))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no per_ip refusals in /metrics:\n{text}"));
    assert!(refused >= 1, "{refused}");
    shutdown.cancel();
}

/// A connection from `from` (a loopback address) to `to`, its echo of `msg` checked.
async fn echoing_from(from: &str, to: SocketAddr, msg: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = socket_from(from).connect(to).await.unwrap();
    s.write_all(msg).await.unwrap();
    let mut back = vec![0; msg.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("echo through the app");
    assert_eq!(back, msg);
    s
}

/// One client address holds at most `tcp_connections_per_ip` connections through the `tcp`
/// apps: the next is closed at once (counted as the app's connection-limit refusal), another
/// address is served meanwhile, and a closed connection gives its slot back. Before, one
/// address could hold every tunnel stream to a device (32,768) when the policy set no
/// `max_connections_per_client`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_address_cannot_hold_every_tcp_app_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = fast_tuning();
    let z = TestZone::new(&["home1"]);
    z.write_policy("apps.toml", echo_policy());
    let mut opts = gateway_options(&z, "gw", z.gw_addr, t, Duration::from_millis(500), None);
    opts.tcp_connections_per_ip = 3;
    let gw = run_gateway(opts).await;
    let _h1 = echo_node(&z, &gw, "home1", t).await;
    let app = gw.apps["echo"];

    let mut held = Vec::new();
    for i in 0..3 {
        held.push(echoing_from("127.0.0.1", app, format!("held {i}").as_bytes()).await);
    }
    // The fourth from the same address: accepted by the kernel, closed by the gateway without
    // a byte of echo.
    let mut fourth = tokio::net::TcpStream::connect(app).await.unwrap();
    let _ = fourth.write_all(b"one too many").await;
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(WAIT, fourth.read(&mut buf))
        .await
        .expect("the gateway closes the fourth in time");
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "a fourth connection from one address was served: {r:?}"
    );
    // Another address is not affected.
    drop(echoing_from("127.0.0.2", app, b"another client").await);
    let mut m = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
    m.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut metrics = String::new();
    m.read_to_string(&mut metrics).await.unwrap();
    assert!(
        metrics
            .contains("zonegate_app_refusals_total{app=\"echo\",reason=\"connection_limit\"} 1\n"),
        "the refusal is not counted:\n{metrics}"
    );
    // A slot comes back when a held connection ends.
    drop(held.pop());
    let mut back = false;
    for _ in 0..100 {
        if roundtrip(app, b"after one closed").await.ok().as_deref() == Some(b"after one closed") {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "the closed connection's slot never came back");
    gw.shutdown.cancel();
}

/// All `tcp` apps together at `tcp_connections` (4 here; 16,384 by default): a new client gets
/// in by closing the longest-idle connection of the client holding the most. Before, 16
/// addresses holding idle connections locked every other client out until they chose to close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_set_of_tcp_apps_makes_room_by_closing_the_biggest_holders_idlest() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = fast_tuning();
    let z = TestZone::new(&["home1"]);
    // Clients of 127.0.0.0/24 only: 127.0.9.9 is refused by the policy.
    // And an app whose device does not offer its service (a typo in `to`).
    let typo = "[app.typo]\ntcp = { listen = \"127.0.0.3:0\" }\nto = \"home1/ehco\"\nallow = { from = [\"public\"] }\n";
    z.write_policy(
        "apps.toml",
        &format!(
            "{}{typo}",
            echo_policy().replace("[\"public\"]", "[\"127.0.0.0/24\"]")
        ),
    );
    let mut opts = gateway_options(&z, "gw", z.gw_addr, t, Duration::from_millis(500), None);
    opts.tcp_connections = 4;
    opts.tcp_connections_per_ip = 4;
    let gw = run_gateway(opts).await;
    let _h1 = echo_node(&z, &gw, "home1", t).await;
    let app = gw.apps["echo"];

    let mut held = Vec::new();
    for i in 0..4 {
        held.push(echoing_from("127.0.0.1", app, format!("held {i}").as_bytes()).await);
    }
    // A client the policy refuses takes nothing: room is made only for one that is served;
    // nor does a client of an app whose service the device does not offer.
    let mut buf = [0u8; 64];
    for (from, to) in [("127.0.9.9", app), ("127.0.0.5", gw.apps["typo"])] {
        let mut refused = socket_from(from).connect(to).await.unwrap();
        let r = tokio::time::timeout(WAIT, refused.read(&mut buf))
            .await
            .expect("the gateway closes it in time");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    }
    // All but the second move bytes again: it is the idlest.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for (i, s) in held.iter_mut().enumerate() {
        if i != 1 {
            s.write_all(b"again").await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
        }
    }
    // A new client is served, at once.
    let newcomer = echoing_from("127.0.0.2", app, b"newcomer").await;
    let r = tokio::time::timeout(WAIT, held[1].read(&mut buf))
        .await
        .expect("the idlest connection is closed in time");
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "the idlest was not closed: {r:?}"
    );
    for i in [0, 2, 3] {
        held[i].write_all(b"still").await.unwrap();
        let mut buf = [0u8; 5];
        tokio::time::timeout(WAIT, held[i].read_exact(&mut buf))
            .await
            .expect("echo in time")
            .unwrap_or_else(|e| panic!("connection {i} was closed too: {e}"));
    }
    // Only from a client holding more than one more: 127.0.0.1 holds 3, so a third client
    // takes one of them (2 / 1 / 1); then the newcomer's address, holding 1, takes nothing.
    let third = echoing_from("127.0.0.3", app, b"third").await;
    let mut fourth = socket_from("127.0.0.2").connect(app).await.unwrap();
    drop(fourth.write_all(b"nothing fair to take").await);
    let r = tokio::time::timeout(WAIT, fourth.read(&mut buf))
        .await
        .expect("the gateway closes it in time");
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "a client was served with no fair room: {r:?}"
    );
    drop((newcomer, third, held));
    gw.shutdown.cancel();
}

/// `msg` to `app` from a new socket on `from`; the socket and the answer within `within`, if
/// any.
async fn udp_ask(
    from: &str,
    app: SocketAddr,
    msg: &[u8],
    within: Duration,
) -> (tokio::net::UdpSocket, Option<Vec<u8>>) {
    let s = tokio::net::UdpSocket::bind(format!("{from}:0"))
        .await
        .unwrap();
    s.send_to(msg, app).await.unwrap();
    let mut buf = [0u8; 256];
    let got = tokio::time::timeout(within, s.recv(&mut buf))
        .await
        .ok()
        .and_then(|r| r.ok())
        .map(|n| buf[..n].to_vec());
    (s, got)
}

/// A gateway (timings of `fast_tuning`) whose policy is one public `udp` app `name` leading
/// to home1's service of that name, its options changed by `tweak` first.
async fn udp_app_gateway(
    z: &TestZone,
    name: &str,
    tweak: impl FnOnce(&mut gateway::GatewayOptions),
) -> RunningGateway {
    z.write_policy(
        "apps.toml",
        &format!("[app.{name}]\nudp = {{ listen = \"127.0.0.1:0\" }}\nto = \"home1/{name}\"\nallow = {{ from = [\"public\"] }}\n"),
    );
    let mut opts = gateway_options(
        z,
        "gw",
        z.gw_addr,
        fast_tuning(),
        Duration::from_millis(500),
        None,
    );
    tweak(&mut opts);
    run_gateway(opts).await
}

/// One client address holds at most `udp_flows_per_ip` flows of a `udp` app (8 here; 256 by
/// default): a host sending from thousands of source ports used to take all 4,096 flow slots,
/// and every other client's datagrams were then dropped. Another address is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_address_cannot_take_every_udp_flow() {
    let t = fast_tuning();
    let z = TestZone::new(&["home1"]);
    let gw = udp_app_gateway(&z, "uecho", |o| o.udp_flows_per_ip = 8).await;
    let echo = udp_echo().await;
    let svcs = services(&[("uecho", echo, tunnel::proto::ServiceProto::Udp)]);
    let _h1 = start_agent(&z, "home1", svcs, vec![], t).await;
    wait_until("home1 connected", WAIT, || gw.hub.agent("home1").is_some()).await;
    let app = gw.apps["uecho"];

    let held = answered_flows(app, 8, "flow").await;
    // In use both ways and busy (a client's own quiet ones may end for its new one).
    in_use_both_ways(&held, app).await;
    let (_s, got) = udp_ask(
        "127.0.0.1",
        app,
        b"one too many",
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(got, None, "a flow beyond the address's limit was served");
    let (_s, got) = udp_ask("127.0.0.2", app, b"another client", WAIT).await;
    assert_eq!(got.as_deref(), Some(&b"another client"[..]));
    gw.shutdown.cancel();
}

/// Datagrams forged from a client's address (never answered) cannot hold its flow slots
/// against it: at its `udp_flows_per_ip`, a flow of its own the device never answered and
/// quiet for a second ends for its new one. Before, the forger kept it at its limit with a
/// few datagrams a second, and every new flow of the client was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_flows_from_a_clients_address_do_not_lock_it_out() {
    let (_z, gw, _h1) = picky_udp_app_with(|o| o.udp_flows_per_ip = 4).await;
    let app = gw.apps["picky"];
    // The forger: four flows from 127.0.0.1 the service never answers.
    let mut forged = Vec::new();
    for _ in 0..4 {
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.send_to(b"quiet, forged", app).await.unwrap();
        forged.push(s);
    }
    // All four taken; once they have been quiet for a second, the client's own new flow is
    // served.
    served_in_time(
        app,
        "the client stayed locked out by flows it never had answered",
    )
    .await;
    gw.shutdown.cancel();
}

/// Asks `app` from 127.0.0.1 on a new flow until it is answered, failing with `locked_out`
/// after [`WAIT`].
async fn served_in_time(app: SocketAddr, locked_out: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_s, got) = udp_ask("127.0.0.1", app, b"mine", Duration::from_millis(500)).await;
        if got.as_deref() == Some(&b"mine"[..]) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{locked_out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `n` flows of `app` from 127.0.0.1, each answered once (`label` and its number).
async fn answered_flows(app: SocketAddr, n: usize, label: &str) -> Vec<tokio::net::UdpSocket> {
    let mut flows = Vec::new();
    for i in 0..n {
        let msg = format!("{label} {i}");
        let (s, got) = udp_ask("127.0.0.1", app, msg.as_bytes(), WAIT).await;
        assert_eq!(got.as_deref(), Some(msg.as_bytes()), "{msg} answered");
        flows.push(s);
    }
    flows
}

/// Sends again on each of `flows` (each answered once) past `ASSURE_AFTER` (2 s) and waits
/// for the answers: the flows are in use both ways, and have just been busy.
async fn in_use_both_ways(flows: &[tokio::net::UdpSocket], app: SocketAddr) {
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for (i, s) in flows.iter().enumerate() {
        echo_on(s, app, format!("again {i}")).await;
    }
}

/// Forged datagrams from a client's address to a service that answers them (DNS, a game)
/// cannot hold its flow slots against it either: at its limit, a flow of its own answered
/// once and quiet for a second ends for its new one. Before, answered ones stayed, and a
/// forger refreshing them a few times a minute kept the client out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_forged_flows_from_a_clients_address_do_not_lock_it_out() {
    let (_z, gw, _h1) = picky_udp_app_with(|o| o.udp_flows_per_ip = 4).await;
    let app = gw.apps["picky"];
    let _forged = answered_flows(app, 4, "forged").await;
    served_in_time(
        app,
        "the client stayed locked out by forged flows the service answered",
    )
    .await;
    gw.shutdown.cancel();
}

/// A table full of one address's flows, in use both ways and busy, makes room for another
/// client: the quietest flow of the client holding the most ends. Before, sixteen addresses
/// at the default per-address limit, each flow sent to every few seconds, held the table
/// against everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_table_held_by_one_address_makes_room_for_another() {
    let (_z, gw, _h1) = picky_udp_app().await;
    let app = gw.apps["picky"];
    let held = answered_flows(app, 4, "held").await;
    in_use_both_ways(&held, app).await;
    let (_s, got) = udp_ask("127.0.0.2", app, b"room for me?", WAIT).await;
    assert_eq!(
        got.as_deref(),
        Some(&b"room for me?"[..]),
        "one address's busy flows held the table"
    );
    gw.shutdown.cancel();
}

/// A gateway whose `udp` app `picky` (a table of 4 flows) reaches a service on home1 that
/// echoes everything but datagrams starting with "quiet"; home1 connected.
async fn picky_udp_app() -> (TestZone, RunningGateway, RunningAgent) {
    picky_udp_app_with(|o| o.udp_flows_per_app = 4).await
}

/// [`picky_udp_app`], the gateway's options set by `tweak`.
async fn picky_udp_app_with(
    tweak: impl FnOnce(&mut gateway::GatewayOptions),
) -> (TestZone, RunningGateway, RunningAgent) {
    let z = TestZone::new(&["home1"]);
    let gw = udp_app_gateway(&z, "picky", tweak).await;
    let service = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let service_addr = service.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = service.recv_from(&mut buf).await {
            if !buf[..n].starts_with(b"quiet") {
                let _ = service.send_to(&buf[..n], from).await;
            }
        }
    });
    let svcs = services(&[("picky", service_addr, tunnel::proto::ServiceProto::Udp)]);
    let h1 = start_agent(&z, "home1", svcs, vec![], fast_tuning()).await;
    wait_until("home1 connected", WAIT, || gw.hub.agent("home1").is_some()).await;
    (z, gw, h1)
}

/// A `udp` app's table full of flows the device never answered (forged sources, or clients
/// the service ignores) makes room for a new client: one quiet for a second ends. A table
/// full of flows in use both ways (answered, and the client sent again 2 s on) refuses the
/// newcomer instead, counted as a `connection_limit` refusal. Flows count every datagram's
/// bytes (only a flow's first datagram was counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_table_full_of_unanswered_flows_makes_room() {
    let (_z, gw, _h1) = picky_udp_app().await;
    let app = gw.apps["picky"];
    let counters = || {
        let cur = gw.hub.policy().current();
        let a = cur.policy.app("picky").expect("picky");
        cur.state(a).counters.snapshot()
    };

    // Four clients the service ignores fill the table, with 3 datagrams of 10 bytes each.
    let mut quiet = Vec::new();
    for _ in 0..4 {
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for _ in 0..3 {
            s.send_to(b"quiet 0123", app).await.unwrap();
        }
        quiet.push(s);
    }
    wait_until("four flows open", WAIT, || counters().connections == 4).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (_s5, got) = udp_ask("127.0.0.1", app, b"room for me?", WAIT).await;
    assert_eq!(
        got.as_deref(),
        Some(&b"room for me?"[..]),
        "no room was made"
    );
    let c = counters();
    assert_eq!(c.connections, 5);
    // Bytes are counted as they pass: the four ignored flows' 3 datagrams of 10 bytes each
    // (one of them ended to make room), and the newcomer's 12.
    assert_eq!(
        c.bytes_in,
        4 * 30 + 12,
        "the flows' datagrams were not all counted: {c:?}"
    );
    assert_eq!(c.refusals.get("connection_limit"), None, "{c:?}");

    // Four more clients the service answers, each making room in turn (a full table looks
    // at most every 250 ms), then each sends again once its flow is 2 s old: the table holds
    // four flows in use both ways.
    // Each held client speaks again before the next newcomer asks: none of them is quiet for
    // the second that would let a newcomer end it before the ignored flows (which are quiet,
    // so go first), and none is old enough for the last resort (on a loaded machine the
    // 300 ms steps stretch).
    let mut held: Vec<tokio::net::UdpSocket> = Vec::new();
    for i in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (j, s) in held.iter().enumerate() {
            echo_on(s, app, format!("keep {j}")).await;
        }
        let msg = format!("answered {i}");
        let (s, got) = udp_ask("127.0.0.1", app, msg.as_bytes(), WAIT).await;
        assert_eq!(got.as_deref(), Some(msg.as_bytes()));
        held.push(s);
    }
    let opened = counters().connections;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for (i, s) in held.iter().enumerate() {
        echo_on(s, app, format!("again {i}")).await;
    }
    assert_eq!(
        counters().connections,
        opened,
        "a held flow was ended and opened anew"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (_s9, got) = udp_ask(
        "127.0.0.1",
        app,
        b"one too many",
        Duration::from_millis(700),
    )
    .await;
    assert_eq!(got, None, "a flow in use was ended for a newcomer");
    // Counted when the gateway's UDP loop took the datagram, which a busy machine may do
    // after the client gave up waiting for an answer.
    wait_until("the newcomer's refusal counted", WAIT, || {
        counters()
            .refusals
            .get("connection_limit")
            .is_some_and(|&n| n >= 1)
    })
    .await;
    // The flows in use still work.
    for (i, s) in held.iter().enumerate() {
        echo_on(s, app, format!("still here {i}")).await;
    }
    gw.shutdown.cancel();
}

/// A table full of flows not in use both ways whose sources keep sending (forged sources
/// each sending more often than once a second, never quiet for the second that lets one end)
/// still makes room for a newcomer: they held it against every new client for as long as
/// they sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_table_full_of_busy_unanswered_flows_makes_room() {
    let (_z, gw, _h1) = picky_udp_app().await;
    let app = gw.apps["picky"];
    let opened = || {
        let cur = gw.hub.policy().current();
        let a = cur.policy.app("picky").expect("picky");
        cur.state(a).counters.snapshot().connections
    };
    let mut busy = Vec::new();
    for _ in 0..4 {
        busy.push(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    // Every 200 ms from each, until the test ends.
    let flood = tokio::spawn(async move {
        loop {
            for s in &busy {
                let _ = s.send_to(b"quiet", app).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    wait_until("four flows open", WAIT, || opened() == 4).await;
    // Older than a flow needs to be in use both ways (a newcomer younger is not ended).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_s5, got) = udp_ask("127.0.0.1", app, b"room for me?", WAIT).await;
    flood.abort();
    assert_eq!(
        got.as_deref(),
        Some(&b"room for me?"[..]),
        "no room was made"
    );
    gw.shutdown.cancel();
}

/// A stopping gateway lets a UDP app's flows in use both ways go on through the drain's grace
/// while they move, as its TCP apps' connections do, and starts no new one: they went dark
/// the moment the drain began. A flow not in use both ways (one datagram answered) ends at
/// once: it held every restart for the whole grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_lets_open_udp_flows_go_on_and_starts_none() {
    let t = fast_tuning();
    let z = TestZone::new(&["home1"]);
    let gw = udp_app_gateway(&z, "uecho", |o| o.grace = Duration::from_secs(8)).await;
    let echo = udp_echo().await;
    let svcs = services(&[("uecho", echo, tunnel::proto::ServiceProto::Udp)]);
    let _h1 = start_agent(&z, "home1", svcs, vec![], t).await;
    wait_until("home1 connected", WAIT, || gw.hub.agent("home1").is_some()).await;
    let app = gw.apps["uecho"];
    let (open, got) = udp_ask("127.0.0.1", app, b"before", WAIT).await;
    assert_eq!(got.as_deref(), Some(&b"before"[..]));
    let (once, got) = udp_ask("127.0.0.1", app, b"once", WAIT).await;
    assert_eq!(got.as_deref(), Some(&b"once"[..]));
    // In use both ways: answered, and the client spoke again 2 s on.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    echo_on(&open, app, "again".into()).await;
    gw.shutdown.cancel();
    wait_until("draining", WAIT, || gw.hub.is_draining()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    echo_on(&open, app, "during the drain".into()).await;
    // A device dialing during the drain is refused at once: left unanswered, it waited for
    // its handshake timeout before trying another gateway (and quinn kept the attempt).
    let creds = z.creds("home1");
    let ep =
        tunnel::transport::client_endpoint("127.0.0.1:0".parse().unwrap(), &creds, &t).unwrap();
    let cc = tunnel::transport::client_config(&creds, &t).unwrap();
    let dial = ep.connect_with(cc, z.gw_addr, "gw.alice.example").unwrap();
    let r = tokio::time::timeout(WAIT, dial)
        .await
        .expect("a dial during the drain got no answer");
    assert!(
        matches!(&r, Err(quinn::ConnectionError::ConnectionClosed(c)) if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED),
        "{r:?}"
    );
    let mut buf = [0u8; 64];
    once.send_to(b"once more", app).await.unwrap();
    let (new, got) = udp_ask("127.0.0.1", app, b"new", Duration::from_millis(500)).await;
    assert_eq!(got, None, "a new flow started during the drain");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), once.recv(&mut buf))
            .await
            .is_err(),
        "the flow not in use both ways went on"
    );
    drop(new);
    echo_on(&open, app, "still during the drain".into()).await;
}

/// `msg` sent on `s`'s flow through `app` comes back.
async fn echo_on(s: &tokio::net::UdpSocket, app: SocketAddr, msg: String) {
    s.send_to(msg.as_bytes(), app).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, s.recv(&mut buf))
        .await
        .expect("a held flow stopped answering")
        .unwrap();
    assert_eq!(&buf[..n], msg.as_bytes());
}

/// An answer proves the service replies, not that the client exists: a table full of flows
/// the device answered once (a DNS or game service answering forged sources) makes room for
/// a newcomer once they are quiet for a second — they held it for `udp_flow_idle`, two minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_table_full_of_flows_answered_once_makes_room() {
    let t = fast_tuning();
    let z = TestZone::new(&["home1"]);
    let gw = udp_app_gateway(&z, "uecho", |o| o.udp_flows_per_app = 4).await;
    let echo = udp_echo().await;
    let svcs = services(&[("uecho", echo, tunnel::proto::ServiceProto::Udp)]);
    let _h1 = start_agent(&z, "home1", svcs, vec![], t).await;
    wait_until("home1 connected", WAIT, || gw.hub.agent("home1").is_some()).await;
    let app = gw.apps["uecho"];
    let _once = answered_flows(app, 4, "forged").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (_s, got) = udp_ask("127.0.0.1", app, b"room for me?", WAIT).await;
    assert_eq!(
        got.as_deref(),
        Some(&b"room for me?"[..]),
        "flows answered once held the table"
    );
    let cur = gw.hub.policy().current();
    let a = cur.policy.app("uecho").expect("uecho");
    let c = cur.state(a).counters.snapshot();
    assert_eq!(c.connections, 5, "{c:?}");
    assert_eq!(c.refusals.get("connection_limit"), None, "{c:?}");
    gw.shutdown.cancel();
}

/// A peer that grants its streams no flow-control credit cannot hold the agent's stream tasks:
/// the agent's refusal (no gateway approved this peer's stream yet) waits for credit at most
/// `REFUSE_TIMEOUT`, then resets the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_grants_no_credit_gets_its_refusal_reset_in_time() {
    use tunnel::stream::REFUSE_TIMEOUT;
    let (z, gw, h1) = echo_zone(&["home1", "home2"], "", fast_tuning()).await;
    let creds = z.creds("home2");
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(0u32.into())
        .keep_alive_interval(Some(Duration::from_millis(300)));
    let mut cfg = tunnel::transport::client_config(&creds, &fast_tuning()).unwrap();
    cfg.transport_config(Arc::new(transport));
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let target = h1.agent.local_addr().unwrap();
    let conn = ep
        .connect_with(cfg, target, "home1.alice.example")
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let open = StreamHeader::Open {
        app: "x".into(),
        service: "echo".into(),
        origin: Origin::Device {
            name: "home2".into(),
            addr: None,
        },
    };
    tunnel::stream::write_header(&mut send, &open)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let got = tokio::time::timeout(REFUSE_TIMEOUT + WAIT, recv.read(&mut [0u8; 64]))
        .await
        .expect("the agent gave up on its refusal");
    assert!(matches!(got, Err(quinn::ReadError::Reset(_))), "{got:?}");
    assert!(
        started.elapsed() >= REFUSE_TIMEOUT - Duration::from_secs(1),
        "reset before the refusal's timeout: {:?}",
        started.elapsed()
    );
    // The agent and its tunnel are fine.
    assert_echoes(gw.apps["echo"], b"after").await;
    gw.shutdown.cancel();
}

/// Timings for the control-stall tests: the stall is told from an idle timeout by its close
/// code, and a keep-alive a busy machine delays past [`fast_tuning`]'s 1.5 s would end the
/// connection as idle first. The stall limit scales with the idle timeout.
fn stall_tuning() -> Tuning {
    Tuning {
        idle_timeout: Duration::from_secs(3),
        ..fast_tuning()
    }
}

/// A device that stops reading its control stream once connected (a zero-credit stream, so
/// the hub's writes wait) is disconnected after four idle timeouts, not before: the hub's
/// session loop waited in its write for ever, applying no command (UDP opens refused as
/// overloaded, drains and config pushes lost) while `/status` showed the device up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_stops_reading_its_control_stream_is_disconnected() {
    let z = TestZone::new(&["home1", "home2"]);
    let tuning = stall_tuning();
    let gw = start_gateway(&z, tuning, Duration::from_millis(500)).await;
    let creds = z.creds("home2");
    // Room for the Welcome, not for what follows.
    let (_ep, conn) = connect_reading_little(&z, &creds, tuning, 512, None).await;
    let mut io = send_hello(&conn, &creds, "home2").await;
    let ev = tokio::time::timeout(WAIT, io.next_event()).await.unwrap();
    assert!(matches!(ev, Ok(Some(Event::Welcome(_)))), "{ev:?}");
    wait_until("home2 registered", WAIT, || gw.hub.agent("home2").is_some()).await;
    // Permits no policy allows, of services it offers: the hub answers with a revocation each
    // (about 30 bytes), far more than the 512 bytes of credit, and the device reads none.
    let offered = (0..200)
        .map(|i| tunnel::proto::ServiceInfo {
            name: format!("svc{i}"),
            proto: tunnel::proto::ServiceProto::Tcp,
        })
        .collect();
    io.session.send_services_update(offered).unwrap();
    let permits = (0..200)
        .map(|i| ("home1".to_owned(), format!("svc{i}")))
        .collect();
    io.session.send_permits_held(permits).unwrap();
    io.flush().await.unwrap();
    let stalled_at = std::time::Instant::now();
    let limit = tuning.idle_timeout * tunnel::hub::CONTROL_STALL_TIMEOUTS + WAIT;
    let Ok(why) = tokio::time::timeout(limit, conn.closed()).await else {
        panic!("the gateway still holds the stalled session");
    };
    match why {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, tunnel::hub::CLOSE_STALLED.into())
        }
        other => panic!("closed otherwise: {other}"),
    }
    // Not at the first idle timeout: slow readers holding the connection's window hold
    // control writes back too.
    let took = stalled_at.elapsed();
    assert!(
        took >= tuning.idle_timeout * (tunnel::hub::CONTROL_STALL_TIMEOUTS - 1),
        "ended after {took:?}"
    );
    assert!(gw.hub.agent("home2").is_none());
    gw.shutdown.cancel();
}

/// An agent of another control protocol version is told so (an `Error` naming both versions)
/// and closed with the protocol code, instead of a bare close it could not explain to its
/// owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_of_another_protocol_version_hears_why() {
    let z = TestZone::new(&["home1"]);
    let tuning = fast_tuning();
    let gw = start_gateway(&z, tuning, Duration::from_millis(500)).await;
    let creds = z.creds("home1");
    let (_ep, conn) = connect_device(&z, &creds, tuning, None).await;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    tunnel::stream::write_header(&mut send, &StreamHeader::Control)
        .await
        .unwrap();
    let hello = Hello {
        proto_version: tunnel::proto::CONTROL_VERSION + 1,
        device: "home1".into(),
        services: vec![],
        zone_serial: creds.zone_serial(),
        zone_config: None,
        agent_version: "from the future".into(),
    };
    let mut io = ControlIo::new(send, recv, ControlSession::agent(hello));
    io.flush().await.unwrap();
    let ev = tokio::time::timeout(WAIT, io.next_event()).await.unwrap();
    match ev {
        Ok(Some(Event::PeerError { code, message })) => {
            assert_eq!(code, tunnel::proto::ErrorCode::VersionMismatch);
            assert!(message.contains("version"), "{message}");
        }
        other => panic!("no Error from the gateway: {other:?}"),
    }
    let why = tokio::time::timeout(WAIT, conn.closed()).await.unwrap();
    match why {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, tunnel::hub::CLOSE_PROTOCOL.into())
        }
        other => panic!("closed otherwise: {other}"),
    }
    assert!(gw.hub.agent("home1").is_none());
    gw.shutdown.cancel();
}

/// A gateway's permit revocations for names that are no device of the zone leave the agent's
/// peer table alone (each made an entry, with a record per service, without bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_for_names_outside_the_zone_leave_the_peer_table_alone() {
    let z = TestZone::new(&["home1", "home2"]);
    let creds = z.creds("home1");
    let ep =
        tunnel::transport::client_endpoint("127.0.0.1:0".parse().unwrap(), &creds, &fast_tuning())
            .unwrap();
    let dial = tunnel::transport::peer_client_config(&creds, &fast_tuning()).unwrap();
    let peers = tunnel::peers::Peers::new(creds, ep, dial);
    for i in 0..1000 {
        assert!(!peers.revoke_permit(&format!("made-up-{i}"), "ssh"));
    }
    assert!(peers.status(None).is_empty());
    // A device of the zone is recorded (a grant racing the revocation is refused by it).
    peers.revoke_permit("home2", "ssh");
    assert_eq!(peers.status(None).len(), 1);
}

/// A node whose certificate ends while it runs: the gateway closes its connection, every
/// redial is refused at the handshake, and the link's error says why and how to renew (it
/// said only that the handshake failed, for ever, in info lines).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_ending_while_running_says_how_to_renew() {
    let z = TestZone::new(&["home1"]);
    // Valid for 30 days counted from 30 days ago, less 20 seconds: time for a loaded machine
    // to start the gateway and connect the node first.
    let mut zd = zone_core::zonedir::ZoneDir::open(&z.zone_dir()).unwrap();
    let home1 = zone_core::DeviceName::new("home1").unwrap();
    let start =
        time::OffsetDateTime::now_utc() - time::Duration::days(30) + time::Duration::seconds(20);
    let (key, cert) = zd.renew(&home1, start, 30).unwrap();
    zd.write_bundle(&z.zone_dir().join("devices/home1"), &home1, &key, &cert)
        .unwrap();
    let gw = start_gateway(&z, fast_tuning(), Duration::from_millis(500)).await;
    let a = echo_node(&z, &gw, "home1", fast_tuning()).await;
    wait_until(
        "the expired device dropped",
        WAIT + Duration::from_secs(20),
        || gw.hub.agent("home1").is_none(),
    )
    .await;
    wait_until("the link says why", WAIT, || {
        a.agent.links()[0]
            .status()
            .last_error
            .is_some_and(|e| e.contains("certificate expired") && e.contains("device renew home1"))
    })
    .await;
    a.shutdown.cancel();
    gw.shutdown.cancel();
}

/// A renewed device.crt copied into a running node's or gateway's bundle is taken without a
/// restart: handshakes from then on present it (a connection up keeps the one it was made
/// with). One that is not a renewal of the certificate in use (an older copy, another
/// device's) is refused with a warning, and the one in use serves on. A renewal needed a
/// restart of each device before.
#[tokio::test(flavor = "current_thread")]
async fn a_renewed_certificate_copied_in_is_taken_without_a_restart() {
    let (logs, _guard) = capture_logs();
    let z = TestZone::new(&["home1", "laptop"]);
    let t = fast_tuning();
    let gw = start_gateway(&z, t, Duration::from_millis(500)).await;
    let home1 = echo_node(&z, &gw, "home1", t).await;
    let said = || String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let first = gw.hub.agent("home1").unwrap().cert_not_after;
    assert_eq!(home1.agent.creds().cert_not_after(), first);

    let mut zd = zone_core::zonedir::ZoneDir::open(&z.zone_dir()).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let renew = |zd: &mut zone_core::zonedir::ZoneDir, name: &str, days: i64| {
        let d = zone_core::DeviceName::new(name).unwrap();
        zd.renew(&d, now, days).unwrap().1
    };
    // Another device's certificate copied over home1's: refused, said, nothing changes.
    let laptops = renew(&mut zd, "laptop", 400);
    std::fs::write(z.bundle("home1").cert, &laptops.pem).unwrap();
    wait_until("another device's certificate refused", WAIT, || {
        said().lines().any(|l| {
            l.contains("WARN")
                && l.contains("device.crt changed but is not taken")
                && l.contains("certificate of laptop.")
        })
    })
    .await;
    assert_eq!(home1.agent.creds().cert_not_after(), first);

    // home1's renewal: taken by the running agent; a new connection (the gateway restarted)
    // carries it.
    let renewed = renew(&mut zd, "home1", 400);
    std::fs::write(z.bundle("home1").cert, &renewed.pem).unwrap();
    wait_until("the renewal taken", WAIT, || {
        home1.agent.creds().cert_not_after() == renewed.not_after
    })
    .await;
    assert!(said().contains("renewed certificate taken"), "{}", said());
    assert_eq!(gw.hub.agent("home1").unwrap().cert_not_after, first);
    gw.shutdown.cancel();
    let _ = gw.task.await;
    let gw = start_gateway(&z, t, Duration::from_millis(500)).await;
    wait_until(
        "home1 reconnected with its renewed certificate",
        WAIT,
        || {
            gw.hub
                .agent("home1")
                .is_some_and(|a| a.cert_not_after == renewed.not_after)
        },
    )
    .await;

    // An older copy (issued a day before) is refused: the renewal serves on. A renewal for
    // fewer days is no older copy: taken.
    let d = zone_core::DeviceName::new("home1").unwrap();
    let older = zd.renew(&d, now - time::Duration::days(1), 600).unwrap().1;
    std::fs::write(z.bundle("home1").cert, &older.pem).unwrap();
    wait_until("an older certificate refused", WAIT, || {
        said().contains("before the certificate in use (")
    })
    .await;
    assert_eq!(home1.agent.creds().cert_not_after(), renewed.not_after);
    let shorter = renew(&mut zd, "home1", 200);
    std::fs::write(z.bundle("home1").cert, &shorter.pem).unwrap();
    wait_until("a renewal for fewer days taken", WAIT, || {
        home1.agent.creds().cert_not_after() == shorter.not_after
    })
    .await;

    // A renewal valid only from a few seconds on by this machine's clock (issued where the
    // clock is ahead by over the day certificates start before their issue): refused and said
    // once, and taken when its validity starts, without the file changing again.
    let issued =
        time::OffsetDateTime::now_utc() + time::Duration::days(1) + time::Duration::seconds(4);
    let early = zd.renew(&d, issued, 300).unwrap().1;
    std::fs::write(z.bundle("home1").cert, &early.pem).unwrap();
    let not_yet = |s: &str| s.matches("it is valid only from").count();
    wait_until("a renewal not valid yet refused", WAIT, || {
        not_yet(&said()) > 0
    })
    .await;
    wait_until("the renewal taken once valid", WAIT, || {
        home1.agent.creds().cert_not_after() == early.not_after
    })
    .await;
    assert_eq!(not_yet(&said()), 1, "said at each retry: {}", said());

    // The gateway's own renewal: presented to a device dialing it from then on.
    let gws = renew(&mut zd, "gw", 500);
    std::fs::write(z.bundle("gw").cert, &gws.pem).unwrap();
    wait_until("the gateway took its renewal", WAIT, || {
        gw.hub.creds().cert_not_after() == gws.not_after
    })
    .await;
    let creds = z.creds("laptop");
    let ep =
        tunnel::transport::client_endpoint("127.0.0.1:0".parse().unwrap(), &creds, &t).unwrap();
    let conn = ep
        .connect(z.gw_addr, "gw.alice.example")
        .unwrap()
        .await
        .unwrap();
    let presented = tunnel::peers::peer_identity(&conn).unwrap();
    assert_eq!(presented.not_after, gws.not_after);
    conn.close(0u32.into(), b"done");
    home1.shutdown.cancel();
    gw.shutdown.cancel();
}

/// A device started with a device.crt older than the certificate its zone config lists (a
/// backup restored, a renewal whose device.crt was not copied) is told so at start: it
/// started silently, and its certificate then ended sooner than the owner thought.
#[tokio::test(flavor = "current_thread")]
async fn a_device_crt_older_than_the_listed_one_is_told_at_start() {
    let (logs, _guard) = capture_logs();
    let z = TestZone::new(&["home1"]);
    let said = || String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let warned = |s: &str| s.contains("is older than the certificate the zone config lists");
    drop(z.creds("home1"));
    assert!(!warned(&said()), "{}", said());
    let mut zd = zone_core::zonedir::ZoneDir::open(&z.zone_dir()).unwrap();
    let d = zone_core::DeviceName::new("home1").unwrap();
    zd.renew(&d, time::OffsetDateTime::now_utc(), 400).unwrap();
    // The renewed config copied in, the old device.crt left.
    std::fs::copy(
        z.zone_dir().join("zone.json"),
        z.bundle("home1").zone_config,
    )
    .unwrap();
    drop(z.creds("home1"));
    assert!(warned(&said()), "{}", said());
}

/// A device whose certificate ends within 30 days is told of in the gateway's log, with what
/// to do, as it connects or as a connection kept up reaches its last 30 days; its end is in
/// `/status` (`cert_not_after_unix`). Only the device's own log, at home, said it, and the
/// gateway's operator learned of it when the tunnel closed.
#[tokio::test(flavor = "current_thread")]
async fn a_device_certificate_ending_soon_is_told_by_the_gateway() {
    let (logs, _guard) = capture_logs();
    let z = TestZone::new(&["home1", "laptop", "nas"]);
    // home1: 30 days' validity, 20 of them gone: 10 days left. The laptop: a year (the test
    // zone issues 30 days). The nas: its last 30 days begin 8 s from now, while connected.
    let mut zd = zone_core::zonedir::ZoneDir::open(&z.zone_dir()).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let start = now - time::Duration::days(20);
    let nas_from = now - time::Duration::days(1) + time::Duration::seconds(8);
    for (name, from, days) in [
        ("home1", start, 30),
        ("laptop", now, 365),
        ("nas", nas_from, 31),
    ] {
        let d = zone_core::DeviceName::new(name).unwrap();
        let (key, cert) = zd.renew(&d, from, days).unwrap();
        zd.write_bundle(&z.zone_dir().join("devices").join(name), &d, &key, &cert)
            .unwrap();
    }
    let gw = start_gateway(&z, fast_tuning(), Duration::from_millis(500)).await;
    let a = echo_node(&z, &gw, "home1", fast_tuning()).await;
    let b = echo_node(&z, &gw, "laptop", fast_tuning()).await;
    let c = echo_node(&z, &gw, "nas", fast_tuning()).await;
    let said = || String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let told = |device: &str| {
        said().lines().any(|l| {
            l.contains("WARN")
                && l.contains("certificate ends soon")
                && l.contains(&format!("device={device}"))
                && l.contains(&format!("zonegate device renew {device}"))
        })
    };
    wait_until("home1's certificate told", WAIT, || told("home1")).await;
    wait_until(
        "the nas's certificate told",
        WAIT + Duration::from_secs(10),
        || told("nas"),
    )
    .await;
    // The laptop's connection had as long to be told of (it never is).
    assert!(!told("laptop"), "{}", said());
    assert!(gw.hub.agent("nas").is_some(), "the nas stays connected");
    let ends = gw.hub.status();
    let end_of = |d: &str| {
        ends.iter()
            .find(|s| s.device == d)
            .map(|s| s.cert_not_after_unix)
    };
    assert_eq!(
        end_of("home1"),
        Some((start + time::Duration::days(30)).unix_timestamp())
    );
    assert!(end_of("laptop") > end_of("home1"));
    for r in [a, b, c] {
        r.shutdown.cancel();
    }
    gw.shutdown.cancel();
}

/// A Ping frame whose body holds a byte more than its nonce: a frame that is no message.
const PING_WITH_A_BYTE_TOO_MANY: [u8; 11] = [0x0a, 0x09, 0, 0, 0, 0, 0, 0, 0, 1, 0xff];

/// Writes `msg` as a control frame on `send`.
async fn write_msg(send: &mut quinn::SendStream, msg: &tunnel::proto::ControlMsg) {
    let mut frame = Vec::new();
    tunnel::proto::encode_control(msg, &mut frame).unwrap();
    send.write_all(&frame).await.unwrap();
}

/// The first control message on `recv` that `pick` takes (`None`: the stream ended first).
async fn read_msg_until<T>(
    recv: &mut quinn::RecvStream,
    dec: &mut tunnel::proto::FrameDecoder,
    pick: impl Fn(tunnel::proto::ControlMsg) -> Option<T>,
) -> Option<T> {
    tokio::time::timeout(WAIT, async {
        loop {
            while let Some(m) = dec.next_msg().unwrap() {
                if let Some(t) = pick(m) {
                    return Some(t);
                }
            }
            match recv.read_chunk(64 * 1024, true).await {
                Ok(Some(c)) => dec.push(&c.bytes).unwrap(),
                _ => return None,
            }
        }
    })
    .await
    .expect("no control message within the wait")
}

/// The `Error` a peer sent for undecodable bytes, and then the close: with the protocol code.
async fn told_of_undecodable_bytes(
    conn: &quinn::Connection,
    recv: &mut quinn::RecvStream,
    dec: &mut tunnel::proto::FrameDecoder,
) {
    use tunnel::proto::{ControlMsg, ErrorCode};
    let told = read_msg_until(recv, dec, |m| match m {
        ControlMsg::Error { code, message } => Some((code, message)),
        _ => None,
    })
    .await;
    let (code, message) = told.expect("the stream ended without an Error");
    assert_eq!(code, ErrorCode::ProtocolViolation, "{message}");
    assert!(message.contains("undecodable"), "{message}");
    match tokio::time::timeout(WAIT, conn.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, tunnel::hub::CLOSE_PROTOCOL.into())
        }
        other => panic!("closed otherwise: {other}"),
    }
}

/// Bytes on a device's control stream that are no message end its session as a violation it
/// is told of — an `Error` naming it, then the protocol close code — as a message out of place
/// does: they ended it with a bare close (code 0), which the device could not tell from the
/// gateway simply going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_sending_undecodable_control_bytes_is_told_why() {
    use tunnel::proto::ControlMsg;
    let z = TestZone::new(&["home1"]);
    let tuning = fast_tuning();
    let gw = start_gateway(&z, tuning, Duration::from_millis(500)).await;
    let creds = z.creds("home1");
    let (_ep, conn) = connect_device(&z, &creds, tuning, None).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    tunnel::stream::write_header(&mut send, &StreamHeader::Control)
        .await
        .unwrap();
    let hello = Hello {
        proto_version: tunnel::proto::CONTROL_VERSION,
        device: "home1".into(),
        services: vec![],
        zone_serial: creds.zone_serial(),
        zone_config: None,
        agent_version: "hostile".into(),
    };
    write_msg(&mut send, &ControlMsg::Hello(hello)).await;
    let mut dec = tunnel::proto::FrameDecoder::new();
    let welcomed = read_msg_until(&mut recv, &mut dec, |m| {
        matches!(m, ControlMsg::Welcome(_)).then_some(())
    })
    .await;
    assert!(welcomed.is_some(), "no Welcome");
    send.write_all(&PING_WITH_A_BYTE_TOO_MANY).await.unwrap();
    told_of_undecodable_bytes(&conn, &mut recv, &mut dec).await;
    assert!(gw.hub.agent("home1").is_none());
    gw.shutdown.cancel();
}

/// The same the other way: a node given undecodable bytes by its gateway (here a fake one at
/// the zone's gateway address) tells it why and closes with the protocol code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_sending_undecodable_control_bytes_is_told_why() {
    let z = TestZone::new(&["home1"]);
    let (h1, _server, conn, (mut send, mut recv, mut dec)) =
        fake_gateway_session(&z, fast_tuning(), None).await;
    // Past the handshake: the session's own loop meets the bytes.
    wait_links_up(&h1.agent).await;
    send.write_all(&PING_WITH_A_BYTE_TOO_MANY).await.unwrap();
    told_of_undecodable_bytes(&conn, &mut recv, &mut dec).await;
    h1.shutdown.cancel();
}

/// A Welcome with undecodable bytes behind it in the same write: the node refuses the session
/// (told why, closed with the protocol code) before it counts the link as connected. It took
/// the Welcome, marked the link up and started its tasks, and met the failure only after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcome_followed_by_undecodable_bytes_is_refused_before_the_link_is_up() {
    let z = TestZone::new(&["home1"]);
    let ((h1, _server, conn, (mut send, mut recv, mut dec)), hello) =
        fake_gateway_hello(&z, fast_tuning(), None).await;
    let mut bytes = Vec::new();
    tunnel::proto::encode_control(&fake_welcome(&conn, &hello), &mut bytes).unwrap();
    bytes.extend_from_slice(&PING_WITH_A_BYTE_TOO_MANY);
    send.write_all(&bytes).await.unwrap();
    told_of_undecodable_bytes(&conn, &mut recv, &mut dec).await;
    let link = h1.agent.links()[0].status();
    assert_eq!(link.connects, 0, "the link counted as connected: {link:?}");
    h1.shutdown.cancel();
}

/// A gateway that offers zone configs that do not verify, one after another, has its session
/// ended after `MAX_REFUSED_OFFERS` (each cost the device a parse and a signature check), as
/// the hub ends a device's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_offering_bad_zone_configs_has_its_session_ended() {
    use tunnel::proto::ControlMsg;
    let z = TestZone::new(&["home1"]);
    let (h1, _server, conn, (mut send, mut recv, mut dec)) =
        fake_gateway_session(&z, fast_tuning(), None).await;
    wait_links_up(&h1.agent).await;
    // A third that do not parse, a third the zone's own config announced as newer than it is
    // (parsed all the same, and counted as the hub counts it), a third that do not parse
    // announced as older (read for their revocations: a gateway labelling forged configs
    // older kept the node checking them without end).
    let own = z.creds("home1").zone().to_json_compact();
    let garbage = br#"{"config":{},"signature":"no"}"#.to_vec();
    for i in 0..tunnel::hub::MAX_REFUSED_OFFERS {
        let (zone_serial, zone_config) = match i % 3 {
            0 => (u64::MAX, garbage.clone()),
            1 => (u64::MAX, own.clone()),
            _ => (0, garbage.clone()),
        };
        let bad = ControlMsg::ConfigUpdate {
            zone_serial,
            zone_config,
        };
        write_msg(&mut send, &bad).await;
    }
    // Told why, then closed with the protocol code.
    let told = read_msg_until(&mut recv, &mut dec, |m| match m {
        ControlMsg::Error { code, message } => Some((code, message)),
        _ => None,
    })
    .await;
    let (code, message) = told.expect("the session went on past the refused offers");
    assert_eq!(
        code,
        tunnel::proto::ErrorCode::ProtocolViolation,
        "{message}"
    );
    assert!(message.contains("do not verify"), "{message}");
    match tokio::time::timeout(WAIT, conn.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, tunnel::hub::CLOSE_PROTOCOL.into())
        }
        other => panic!("closed otherwise: {other}"),
    }
    h1.shutdown.cancel();
}

/// A gateway sending configs older than the node's without end (each a parse) has its
/// session ended too, once past what a gateway sends: they taught nothing, but each cost the
/// node's one thread a 60 KiB parse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_sending_older_configs_without_end_has_its_session_ended() {
    use tunnel::proto::ControlMsg;
    let z = TestZone::new(&["home1"]);
    let (h1, _server, conn, (mut send, mut recv, mut dec)) =
        fake_gateway_session(&z, fast_tuning(), None).await;
    wait_links_up(&h1.agent).await;
    let own = z.creds("home1").zone().to_json_compact();
    for _ in 0..100 {
        let older = ControlMsg::ConfigUpdate {
            zone_serial: 0,
            zone_config: own.clone(),
        };
        write_msg(&mut send, &older).await;
    }
    let told = read_msg_until(&mut recv, &mut dec, |m| match m {
        ControlMsg::Error { message, .. } => Some(message),
        _ => None,
    })
    .await;
    let message = told.expect("the session went on past the older configs");
    assert!(
        message.contains("zone configs older than ours"),
        "{message}"
    );
    match tokio::time::timeout(WAIT, conn.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, tunnel::hub::CLOSE_PROTOCOL.into())
        }
        other => panic!("closed otherwise: {other}"),
    }
    h1.shutdown.cancel();
}

/// The ends of a relayed, end-to-end encrypted stream enforce a revocation themselves: the
/// peer's key is refused for new streams once revoked or past its certificate's end, and a
/// live stream's end (`peer_ended`) comes when the adopted zone config revokes the peer. They
/// ran on as long as the relaying gateway — the party the encryption keeps out — relayed them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ends_of_an_encrypted_stream_enforce_revocations_themselves() {
    let z = TestZone::new(&["home1", "home2"]);
    let creds = z.creds("home1");
    let config = creds.zone().config.clone();
    let now = time::OffsetDateTime::now_utc();
    assert!(tunnel::e2e::peer_public(&config, "home2", now).is_ok());
    let home2 = zone_core::DeviceName::new("home2").unwrap();
    let ends = config.device(&home2).unwrap().cert_expires_at;
    let after = tunnel::e2e::peer_public(&config, "home2", ends + time::Duration::seconds(1));
    assert!(
        after.unwrap_err().to_string().contains("certificate ended"),
        "a key past its certificate's end"
    );

    let ep =
        tunnel::transport::client_endpoint("127.0.0.1:0".parse().unwrap(), &creds, &fast_tuning())
            .unwrap();
    let dial = tunnel::transport::peer_client_config(&creds, &fast_tuning()).unwrap();
    let peers = Arc::new(tunnel::peers::Peers::new(creds.clone(), ep, dial));
    let ended = tokio::spawn({
        let peers = peers.clone();
        async move { peers.peer_ended("home2").await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!ended.is_finished(), "ended before any revocation");
    let revoking = z.revoke("home2");
    assert!(creds.offer_zone(&revoking).unwrap().is_some());
    peers.cut_revoked();
    let why = tokio::time::timeout(WAIT, ended)
        .await
        .expect("a live stream with a revoked peer ran on")
        .unwrap();
    assert!(why.contains("revoked"), "{why}");
    let revoked = tunnel::e2e::peer_public(&creds.zone().config, "home2", now);
    assert!(revoked.unwrap_err().to_string().contains("revoked"));
    // Nor does the revoked device itself start on a bundle that says so (it started, and
    // redialed for ever with vaguer refusals).
    std::fs::write(z.bundle("home2").zone_config, &revoking).unwrap();
    let refused = DeviceCreds::load(&z.bundle("home2"), None).unwrap_err();
    assert!(
        refused.to_string().contains("revokes this device"),
        "{refused}"
    );
}

/// A gateway that stops reading its control stream (its window full of the node's answers) is
/// given what the hub gives a device — four idle timeouts — and the node then ends the session
/// with CLOSE_STALLED. It waited in the write for ever, deaf to the gateway's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_stops_reading_its_control_stream_is_left() {
    use tunnel::proto::ControlMsg;
    let z = TestZone::new(&["home1"]);
    let tuning = stall_tuning();
    let mut tc = quinn::TransportConfig::default();
    // What the node may send on a stream before this side reads: a little.
    tc.stream_receive_window(1024u32.into());
    tc.keep_alive_interval(Some(Duration::from_millis(300)));
    let (h1, _server, conn, (mut send, _recv, _dec)) =
        fake_gateway_session(&z, tuning, Some(tc)).await;
    // Pings the node answers, its answers never read: they fill the stream's window.
    for nonce in 0..2000 {
        write_msg(&mut send, &ControlMsg::Ping { nonce }).await;
    }
    let closed = tokio::time::timeout(
        tuning.idle_timeout * tunnel::hub::CONTROL_STALL_TIMEOUTS + WAIT,
        conn.closed(),
    )
    .await
    .expect("the node held the session past its stall limit");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, tunnel::hub::CLOSE_STALLED.into())
        }
        other => panic!("closed otherwise: {other}"),
    }
    h1.shutdown.cancel();
}

/// A zone config the node adopts while a gateway's handshake runs (from another gateway's
/// welcome, its bundle) reaches that gateway once the session is up: it went to the links with
/// a session then only, and this gateway kept the older config — and a device it revokes
/// connected — until it heard of it some other way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_config_adopted_during_a_handshake_reaches_that_gateway() {
    use tunnel::proto::ControlMsg;
    let z = TestZone::new(&["home1", "home2"]);
    let newer = z.revoke("home2");
    let bundle = z.bundle("home1").zone_config;
    let (h1, _server, _conn, (_send, mut recv, mut dec)) =
        fake_gateway_session_with(&z, fast_tuning(), None, |h1| {
            let before = h1.agent.links()[0].status().state;
            assert_ne!(before, "up", "the link is up before its Welcome");
            h1.agent.adopt_zone_file(&newer, &bundle);
        })
        .await;
    let serial = read_msg_until(&mut recv, &mut dec, |m| match m {
        ControlMsg::ConfigUpdate { zone_serial, .. } => Some(zone_serial),
        _ => None,
    })
    .await
    .expect("the gateway was never sent the zone config adopted during its handshake");
    let want = zone_core::config::SignedZone::from_json(&newer)
        .unwrap()
        .config
        .serial;
    assert_eq!(serial, want);
    h1.shutdown.cancel();
}

/// What [`fake_gateway_session`] gives: the agent, the endpoint (keep it), the connection and
/// the control stream with its decoder.
type FakeSession = (
    RunningAgent,
    quinn::Endpoint,
    quinn::Connection,
    (
        quinn::SendStream,
        quinn::RecvStream,
        tunnel::proto::FrameDecoder,
    ),
);

/// A fake gateway at the zone's gateway address (`transport` for its QUIC if given), home1's
/// agent dialing it, and their control session past its Welcome: the agent, the endpoint (keep
/// it), the connection and the control stream with its decoder.
async fn fake_gateway_session(
    z: &TestZone,
    tuning: Tuning,
    transport: Option<quinn::TransportConfig>,
) -> FakeSession {
    fake_gateway_session_with(z, tuning, transport, |_| {}).await
}

/// [`fake_gateway_session`], `before_welcome` run between the agent's Hello and the Welcome.
async fn fake_gateway_session_with(
    z: &TestZone,
    tuning: Tuning,
    transport: Option<quinn::TransportConfig>,
    before_welcome: impl FnOnce(&RunningAgent),
) -> FakeSession {
    let ((h1, server, conn, (mut send, recv, dec)), hello) =
        fake_gateway_hello(z, tuning, transport).await;
    before_welcome(&h1);
    write_msg(&mut send, &fake_welcome(&conn, &hello)).await;
    (h1, server, conn, (send, recv, dec))
}

/// The fake gateway's Welcome to `hello`, on `conn`.
fn fake_welcome(
    conn: &quinn::Connection,
    hello: &tunnel::proto::Hello,
) -> tunnel::proto::ControlMsg {
    tunnel::proto::ControlMsg::Welcome(tunnel::proto::Welcome {
        session_id: 1,
        observed_addr: conn.remote_address(),
        zone_serial: hello.zone_serial,
        zone_config: None,
        keepalive_ms: 300,
    })
}

/// The first half of [`fake_gateway_session`]: the agent dialed the fake gateway and sent its
/// Hello (returned too), not answered yet.
async fn fake_gateway_hello(
    z: &TestZone,
    tuning: Tuning,
    transport: Option<quinn::TransportConfig>,
) -> (FakeSession, tunnel::proto::Hello) {
    use tunnel::proto::ControlMsg;
    let mut sc = tunnel::transport::server_config(&z.creds("gw"), &tuning).unwrap();
    if let Some(tc) = transport {
        sc.transport_config(Arc::new(tc));
    }
    let server = quinn::Endpoint::server(sc, z.gw_addr).unwrap();
    let h1 = start_agent(z, "home1", services(&[]), vec![], tuning).await;
    let conn = tokio::time::timeout(WAIT, async {
        server.accept().await.expect("an incoming connection").await
    })
    .await
    .expect("home1 dialed")
    .expect("home1's handshake");
    let (send, mut recv) = conn.accept_bi().await.unwrap();
    let (header, rest) = tunnel::stream::read_header(&mut recv).await.unwrap();
    assert_eq!(header, StreamHeader::Control);
    let mut dec = tunnel::proto::FrameDecoder::new();
    dec.push(&rest).unwrap();
    let hello = read_msg_until(&mut recv, &mut dec, |m| match m {
        ControlMsg::Hello(h) => Some(h),
        _ => None,
    })
    .await
    .expect("no Hello");
    ((h1, server, conn, (send, recv, dec)), hello)
}
