//! The QUIC tunnel on loopback, in process: public TCP/UDP exposure, mesh forwards (allowed and
//! denied), refusal of foreign/expired/revoked devices, reconnect after a gateway restart, drain.

use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tunnel::proto::ServiceProto;
use tunnel::transport::Tuning;
use zone_core::cert::{issue_device, IssueRequest};
use zone_core::{DeviceName, Role};

use crate::inproc::*;

const WAIT: Duration = Duration::from_secs(10);

fn policy_tcp_udp_mesh() -> &'static str {
    r#"
[app.echo]
tcp = { listen = "127.0.0.1:0" }
to = "home1/echo"
allow = { from = ["public"] }

[app.uecho]
udp = { listen = "127.0.0.1:0" }
to = "home1/uecho"
allow = { from = ["public"] }

[app.echo-mesh]
mesh = true
to = "home1/echo"
allow = { from = ["device:home2"] }
"#
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_udp_and_mesh_through_the_gateway() {
    let z = TestZone::new(&["home1", "home2"]);
    z.write_policy("apps.toml", policy_tcp_udp_mesh());
    let gw = start_gateway(&z, fast_tuning(), Duration::from_secs(1)).await;
    let echo = tcp_echo().await;
    let uecho = udp_echo().await;
    let _h1 = start_agent(
        &z,
        "home1",
        services(&[
            ("echo", echo, ServiceProto::Tcp),
            ("uecho", uecho, ServiceProto::Udp),
        ]),
        vec![],
        fast_tuning(),
    )
    .await;
    let h2 = start_agent(
        &z,
        "home2",
        services(&[]),
        vec![
            forward("127.0.0.1:0", "home1/echo"),
            forward("127.0.0.1:0", "home1/secret"),
        ],
        fast_tuning(),
    )
    .await;
    wait_until("both agents connected", WAIT, || gw.hub.agents().len() == 2).await;

    // Public TCP: 1 MiB of random bytes comes back intact.
    let data = random_bytes(1 << 20);
    let back = roundtrip(gw.apps["echo"], &data).await.unwrap();
    assert!(
        back == data,
        "echo through the tunnel corrupted data ({} of {} bytes)",
        back.len(),
        data.len()
    );

    // Public UDP.
    let u = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    u.connect(gw.apps["uecho"]).await.unwrap();
    let mut buf = [0u8; 64];
    let mut got = None;
    for _ in 0..50 {
        u.send(b"ping-udp").await.unwrap();
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(200), u.recv(&mut buf)).await
        {
            got = Some(buf[..n].to_vec());
            break;
        }
    }
    assert_eq!(got.as_deref(), Some(&b"ping-udp"[..]));

    // Mesh forward allowed by echo-mesh (once home2 has its Welcome: the hub counts it
    // before).
    wait_links_up(&h2.agent).await;
    let fwd = h2.agent.forward_addrs().to_vec();
    let back = roundtrip(fwd[0], b"hello mesh").await.unwrap();
    assert_eq!(back, b"hello mesh");

    // Mesh forward to a service no mesh app allows: closed without data.
    let back = roundtrip(fwd[1], b"let me in").await.unwrap_or_default();
    assert!(back.is_empty(), "denied mesh stream carried data");

    // Status shows both devices with their services, and the app counters moved.
    let st = gw.hub.status();
    let h1 = st.iter().find(|a| a.device == "home1").unwrap();
    assert_eq!(h1.services.len(), 2);
    // The device's byte totals include the public TCP connection's 1 MiB each way (and the
    // mesh stream relayed to it), not only UDP and mesh traffic.
    assert!(
        h1.bytes_to > 1 << 20 && h1.bytes_from > 1 << 20,
        "home1 bytes to {} from {}",
        h1.bytes_to,
        h1.bytes_from
    );
    // The packet counters count packets: 1 MiB each way takes at least 1 MiB / the largest
    // payload datagrams (and they average well over 100 bytes: not a byte count), data that
    // came back was acknowledged, and so was data sent.
    let min = (1u64 << 20) / u64::from(tunnel::transport::MAX_UDP_PAYLOAD);
    assert!(
        h1.udp_tx_datagrams > min
            && h1.udp_rx_datagrams > min
            && h1.udp_tx_datagrams * 100 < h1.udp_tx
            && h1.udp_rx_datagrams * 100 < h1.udp_rx
            && h1.stream_frames_tx > min
            && h1.stream_frames_rx > min
            && h1.ack_frames_tx > 0
            && h1.ack_frames_rx > 0,
        "home1 packet counters: {h1:?}"
    );
    let active = gw.hub.policy().current();
    let snap = active.snapshot();
    let echo_c = &snap.iter().find(|(n, _)| n == "echo").unwrap().1;
    assert!(
        echo_c.connections >= 1 && echo_c.bytes_in >= 1 << 20,
        "{echo_c:?}"
    );
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_serves_only_named_services_and_offline_devices_fail_fast() {
    // home2 is in the zone, never started.
    let z = TestZone::new(&["home1", "home2"]);
    z.write_policy(
        "apps.toml",
        r#"
[app.ghost]
tcp = { listen = "127.0.0.1:0" }
to = "home1/ghost"
allow = { from = ["public"] }

[app.offline]
tcp = { listen = "127.0.0.2:0" }
to = "nobody/web"
allow = { from = ["public"] }
"#,
    );
    let gw = start_gateway(&z, fast_tuning(), Duration::from_secs(1)).await;
    let _h1 = start_echo_node(&z, &gw, "home1").await;
    // home1 does not offer "ghost": the stream is refused, the client sees a closed connection.
    assert!(roundtrip(gw.apps["ghost"], b"x")
        .await
        .unwrap_or_default()
        .is_empty());
    assert!(roundtrip(gw.apps["offline"], b"x")
        .await
        .unwrap_or_default()
        .is_empty());
    // Counted as the apps' failures, by reason (they showed only in the log).
    wait_until("the failures counted", WAIT, || {
        gw.app_counts("ghost").failures.get("no_such_service") == Some(&1)
            && gw.app_counts("offline").failures.get("no_such_device") == Some(&1)
    })
    .await;
    // The hub refuses with typed reasons.
    let e = open_refused(&gw.hub, "home1", "ghost", "ghost").await;
    assert!(
        matches!(
            e,
            tunnel::OpenError::Refused {
                code: tunnel::proto::RefuseCode::NoSuchService,
                ..
            }
        ),
        "{e}"
    );
    let e = open_refused(&gw.hub, "nobody", "web", "offline").await;
    // Told apart from an offline device: its owner went looking for an agent that does not
    // exist.
    assert!(matches!(e, tunnel::OpenError::NotInZone(_)), "{e}");
    let e = open_refused(&gw.hub, "home2", "web", "offline").await;
    assert!(matches!(e, tunnel::OpenError::Offline(_)), "{e}");
    // A UDP flow to a service offered over TCP is refused by the gateway itself (it opened a
    // flow per datagram, each refused by the device and logged there).
    let origin = tunnel::proto::Origin::Public("127.0.0.1:1".parse().unwrap());
    let Err(e) = gw.hub.open_udp_flow("home1", "echo", "ghost", origin).await else {
        panic!("a UDP flow to a TCP service was opened");
    };
    assert!(
        matches!(&e, tunnel::OpenError::Refused { code: tunnel::proto::RefuseCode::NoSuchService, reason, .. } if reason.contains("offers echo over TCP, not UDP")),
        "{e}"
    );
    gw.shutdown.cancel();
}

/// Dials the gateway with a raw certificate/key pair and reports whether the tunnel handshake
/// (QUIC + mutual TLS + first stream round trip) is accepted.
async fn handshake_with(z: &TestZone, cert_pem: &str, key_pem: &str) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    let gw_creds = z.creds("gw");
    let certs =
        vec![rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(gw_creds.trust.crypto())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(gw_creds.trust.server_verifier())
        .with_client_auth_cert(certs, key)
        .unwrap();
    cfg.alpn_protocols = vec![tunnel::tls::ALPN.to_vec()];
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(qc)));
    let conn = ep
        .connect(z.gw_addr, "gw.alice.example")
        .unwrap()
        .await
        .map_err(|e| e.to_string())?;
    // With TLS 1.3 the server's verdict on our certificate arrives after the client finishes:
    // a stream round trip (the control header and an answer or a close) settles it.
    let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let _ = s.write_all(b"ZG").await;
    match tokio::time::timeout(Duration::from_secs(8), r.read_chunk(16, true)).await {
        Ok(Err(e)) => Err(e.to_string()),
        _ => match conn.close_reason() {
            Some(e) => Err(e.to_string()),
            None => Ok(()),
        },
    }
}

/// A certificate (PEM) and key (PEM) for node `name` of the zone in `zd`, valid from
/// `not_before` to `not_after`.
fn node_cert(
    zd: &zone_core::zonedir::ZoneDir,
    name: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> (String, String) {
    device_cert(zd, name, &[Role::Node], not_before, not_after)
}

fn device_cert(
    zd: &zone_core::zonedir::ZoneDir,
    name: &str,
    roles: &[Role],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> (String, String) {
    let name = DeviceName::new(name).unwrap();
    let key = zd.key.derive_device(zd.domain(), &name);
    let cert = issue_device(
        &zd.key,
        &zd.ca_pem,
        &key,
        &IssueRequest {
            domain: zd.domain(),
            name: &name,
            roles,
            not_before,
            not_after,
        },
    )
    .unwrap();
    (cert.pem, key.to_pem().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_expired_and_revoked_devices_are_refused() {
    let z = TestZone::new(&["home1", "laptop"]);
    let other = TestZone::new(&["home1"]);
    // Revoke laptop in the zone.json the gateway will load.
    std::fs::write(z.bundle("gw").zone_config, z.revoke("laptop")).unwrap();
    let zd = zone_core::zonedir::ZoneDir::open(&z.zone_dir()).unwrap();
    // The probe's half-written header is left to the handshake timeout: long past the
    // probe's wait, so an own device is not closed by it on a busy machine.
    let t = Tuning {
        handshake_timeout: Duration::from_secs(30),
        ..fast_tuning()
    };
    let gw = start_gateway(&z, t, Duration::from_secs(1)).await;

    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap();
    let b = |zz: &TestZone, n: &str| zz.zone_dir().join("devices").join(n);
    // Own device: accepted (sanity check of the probe itself).
    handshake_with(
        &z,
        &read(b(&z, "home1").join("device.crt")),
        &read(b(&z, "home1").join("device.key")),
    )
    .await
    .expect("own device accepted");
    // Another zone's device with the same name and domain, at this zone's gateway.
    let e = handshake_with(
        &z,
        &read(b(&other, "home1").join("device.crt")),
        &read(b(&other, "home1").join("device.key")),
    )
    .await;
    assert!(e.is_err(), "foreign device accepted");
    // Revoked.
    let e = handshake_with(
        &z,
        &read(b(&z, "laptop").join("device.crt")),
        &read(b(&z, "laptop").join("device.key")),
    )
    .await;
    assert!(e.is_err(), "revoked device accepted");
    // Expired: a certificate of this zone whose validity ended yesterday.
    let now = OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    let (cert, key) = node_cert(&zd, "home1", now - 10 * day, now - day);
    let e = handshake_with(&z, &cert, &key).await;
    assert!(e.is_err(), "expired certificate accepted");
    assert!(
        gw.hub.agents().is_empty(),
        "a refused device got registered"
    );
    gw.shutdown.cancel();
}

/// A certificate that expires while its device is connected ends the connection then: it was
/// checked only at the handshake, and a device whose tunnel never dropped stayed in the zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_is_disconnected_when_its_certificate_expires() {
    let z = TestZone::new(&["home1"]);
    let zd = zone_core::zonedir::ZoneDir::open(&z.zone_dir()).unwrap();
    let now = OffsetDateTime::now_utc();
    let lasts = time::Duration::seconds(8);
    let (cert, _) = node_cert(&zd, "home1", now - time::Duration::days(1), now + lasts);
    std::fs::write(z.bundle("home1").cert, cert).unwrap();
    let gw = start_gateway(&z, fast_tuning(), Duration::from_secs(1)).await;
    let _h1 = start_echo_node(&z, &gw, "home1").await;
    wait_until("home1 disconnected at its certificate's end", WAIT, || {
        gw.hub.agent("home1").is_none()
    })
    .await;
    // Certificates keep whole seconds: the end is `not_after` cut to its second.
    let end = (now + lasts).replace_nanosecond(0).unwrap();
    assert!(
        OffsetDateTime::now_utc() >= end,
        "disconnected before the certificate expired"
    );
    // And it does not get back in.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(gw.hub.agent("home1").is_none());
    gw.shutdown.cancel();
}

/// The same the other way: an agent closes its link when the gateway's certificate expires
/// (it stayed up for as long as the connection lived), and cannot get back in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_leaves_a_gateway_whose_certificate_expires() {
    let z = TestZone::new(&["home1"]);
    let zd = zone_core::zonedir::ZoneDir::open(&z.zone_dir()).unwrap();
    let now = OffsetDateTime::now_utc();
    let lasts = time::Duration::seconds(8);
    let (cert, _) = device_cert(
        &zd,
        "gw",
        &[Role::Gateway],
        now - time::Duration::days(1),
        now + lasts,
    );
    std::fs::write(z.bundle("gw").cert, cert).unwrap();
    let gw = start_gateway(&z, fast_tuning(), Duration::from_secs(1)).await;
    let h1 = start_echo_node(&z, &gw, "home1").await;
    let link = h1.agent.links()[0].clone();
    wait_until("the link up", WAIT, || link.status().state == "up").await;
    wait_until(
        "the link down at the gateway's certificate's end",
        WAIT,
        || link.status().state != "up",
    )
    .await;
    let end = (now + lasts).replace_nanosecond(0).unwrap();
    assert!(
        OffsetDateTime::now_utc() >= end,
        "left before the certificate expired"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_ne!(link.status().state, "up", "back on an expired gateway");
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reconnects_after_gateway_restart_and_drain_tells_agents() {
    let z = TestZone::new(&["home1"]);
    z.write_policy("apps.toml", "[app.echo]\ntcp = { listen = \"127.0.0.1:0\" }\nto = \"home1/echo\"\nallow = { from = [\"public\"] }\n");
    let echo = tcp_echo().await;
    let h1 = start_agent(
        &z,
        "home1",
        services(&[("echo", echo, ServiceProto::Tcp)]),
        vec![],
        fast_tuning(),
    )
    .await;
    let dns: std::net::SocketAddr = ([127, 0, 0, 1], free_udp_and_tcp_port()).into();
    let gw = start_gateway_with_dns(&z, fast_tuning(), Duration::from_secs(10), Some(dns)).await;
    wait_until("home1 connected", WAIT, || gw.hub.agents().len() == 1).await;
    let link = h1.agent.links()[0].clone();
    // The hub registers the agent when it sends Welcome; the agent marks the link up on receipt.
    wait_until("agent sees the link up", WAIT, || {
        link.status().state == "up"
    })
    .await;
    assert_eq!(roundtrip(gw.apps["echo"], b"one").await.unwrap(), b"one");
    // A connection open through the drain: the drain waits for it (up to the grace).
    let mut held = tokio::net::TcpStream::connect(gw.apps["echo"])
        .await
        .unwrap();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        held.write_all(b"x").await.unwrap();
        held.read_exact(&mut [0u8; 1]).await.unwrap();
    }

    // Drain: the agent hears about it before the gateway goes away.
    gw.shutdown.cancel();
    wait_until("agent sees drain or loss", WAIT, || {
        link.status().state != "up"
    })
    .await;
    // The admin API answers through the drain, and says so.
    eventually_async("/status says draining", || async {
        admin_status(gw.admin).await.contains("\"draining\": true")
    })
    .await;
    // So does the zone DNS: the zone's names resolve while its connections are served (it
    // stopped at the drain's start: the whole zone unresolvable for up to the grace).
    let answer = crate::hostile::raw_dns_query(dns, "home1.alice.example", 1).await;
    assert_eq!(answer[3] & 0x0f, 0, "rcode: {answer:?}");
    drop(held);
    gw.task.await.unwrap();

    // A new gateway on the same address: the agent comes back by itself.
    let gw2 = start_gateway(&z, fast_tuning(), Duration::from_millis(500)).await;
    wait_until("home1 reconnected", Duration::from_secs(20), || {
        gw2.hub.agents().len() == 1
    })
    .await;
    assert_eq!(roundtrip(gw2.apps["echo"], b"two").await.unwrap(), b"two");
    assert!(link.status().connects >= 2);
    gw2.shutdown.cancel();
    h1.shutdown.cancel();
}

/// Path MTU discovery on loopback climbs to the jumbo bound in both directions, and a bulk
/// transfer then crosses in packets of that size intact (quinn batches ten of them per send:
/// `tunnel::udp::GsoBounded` splits what one send cannot carry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_links_discover_jumbo_packets_and_carry_bulk_in_them() {
    let z = TestZone::new(&["home1"]);
    z.write_policy("apps.toml", &tcp_app("echo", 0));
    let gw = start_gateway(&z, fast_tuning(), Duration::from_secs(1)).await;
    let h1 = start_echo_node(&z, &gw, "home1").await;
    let link = h1.agent.links()[0].clone();
    let want = tunnel::transport::MAX_UDP_PAYLOAD;
    wait_until("the path MTU discovered both ways", WAIT, || {
        link.status().path_mtu == Some(want)
            && gw.hub.status().first().map(|a| a.path_mtu) == Some(want)
    })
    .await;
    let data = random_bytes(32 << 20);
    let back = roundtrip(gw.apps["echo"], &data).await.unwrap();
    assert!(
        back == data,
        "{} of {} bytes came back",
        back.len(),
        data.len()
    );
    gw.shutdown.cancel();
    h1.shutdown.cancel();
}

fn tcp_app(name: &str, port: u16) -> String {
    tcp_app_on(name, &format!("127.0.0.1:{port}"))
}

/// A gateway on `z`'s policy and home1 connected to it, offering one service `name` at
/// `addr` (fast timings).
async fn gateway_and_home1_offering(
    z: &TestZone,
    name: &str,
    addr: std::net::SocketAddr,
    proto: ServiceProto,
) -> (RunningGateway, RunningAgent) {
    let gw = start_gateway(z, fast_tuning(), Duration::from_millis(500)).await;
    let h1 = start_agent(
        z,
        "home1",
        services(&[(name, addr, proto)]),
        vec![],
        fast_tuning(),
    )
    .await;
    wait_until("home1 connected", WAIT, || gw.hub.agent("home1").is_some()).await;
    (gw, h1)
}

/// A gateway on `z`'s policy and home1 connected to it, offering its echo service.
async fn echo_gateway(z: &TestZone) -> (RunningGateway, RunningAgent) {
    let gw = start_gateway(z, fast_tuning(), Duration::from_millis(500)).await;
    let h1 = start_echo_node(z, &gw, "home1").await;
    (gw, h1)
}

/// The gateway and home1's echo with app `a` on a port of its own (first address), and
/// another free port (second) for an edit to move it to.
async fn app_a_and_a_free_port(
    z: &TestZone,
) -> (
    RunningGateway,
    RunningAgent,
    std::net::SocketAddr,
    std::net::SocketAddr,
) {
    let (pa, pb) = (free_tcp_port(), free_tcp_port());
    z.write_policy("a.toml", &tcp_app("a", pa));
    let (gw, h1) = echo_gateway(z).await;
    (
        gw,
        h1,
        ([127, 0, 0, 1], pa).into(),
        ([127, 0, 0, 1], pb).into(),
    )
}

/// A connection to the echo app at `a` that has had "one" echoed.
async fn echoed_connection(a: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut open = tokio::net::TcpStream::connect(a).await.unwrap();
    let mut buf = [0u8; 16];
    open.write_all(b"one").await.unwrap();
    let n = tokio::time::timeout(WAIT, open.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"one");
    open
}

/// A `tcp` app `name` listening on `listen`, to home1's echo, for anyone.
fn tcp_app_on(name: &str, listen: &str) -> String {
    format!("[app.{name}]\ntcp = {{ listen = \"{listen}\" }}\nto = \"home1/echo\"\nallow = {{ from = [\"public\"] }}\n")
}

/// Polls an async check until it holds or the deadline passes.
async fn eventually_async<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < WAIT, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_edits_apply_live_and_a_broken_edit_keeps_the_old_policy() {
    let z = TestZone::new(&["home1"]);
    let (gw, _h1, a, b) = app_a_and_a_free_port(&z).await;
    let pb = b.port();
    assert_eq!(roundtrip(a, b"a").await.unwrap(), b"a");

    // A new file: its app becomes reachable without a restart.
    z.write_policy("b.toml", &tcp_app("b", pb));
    eventually_async("app b reachable", || async {
        roundtrip(b, b"b").await.ok().as_deref() == Some(&b"b"[..])
    })
    .await;

    // A removed file: its app goes away (the listener closes).
    std::fs::remove_file(z.policy_dir().join("a.toml")).unwrap();
    eventually_async("app a gone", || async {
        tokio::net::TcpStream::connect(a).await.is_err()
    })
    .await;

    // A broken edit: refused with file:line:column, the old policy keeps serving.
    z.write_policy(
        "c.toml",
        "[app.c]\ntcp = { listen = \"not-an-address\" }\nto = \"home1/echo\"\n",
    );
    wait_until("reload refused", WAIT, || !gw.hub.policy().last_reload().ok).await;
    let status = gw.hub.policy().last_reload();
    assert!(
        status.errors.iter().any(|e| e.contains("c.toml:2:")),
        "{status:?}"
    );
    assert_eq!(roundtrip(b, b"still").await.unwrap(), b"still");
    assert!(gw.hub.policy().current().policy.app("b").is_some());
    gw.shutdown.cancel();
}

/// An edit moving an app to an address the gateway cannot listen on (another program holds
/// it, or it is the gateway's own) is refused, and the old policy keeps serving: the old
/// listener used to be stopped first and the app stayed down, with the reload reported ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_to_an_address_in_use_keeps_the_old_policy() {
    let z = TestZone::new(&["home1"]);
    let pb = free_tcp_port();
    z.write_policy("b.toml", &tcp_app("b", pb));
    let (gw, _h1) = echo_gateway(&z).await;
    let b: std::net::SocketAddr = ([127, 0, 0, 1], pb).into();
    assert_eq!(roundtrip(b, b"b").await.unwrap(), b"b");
    // Below the ephemeral range: once released, no other test's socket takes it first.
    let held = std::net::TcpListener::bind(("127.0.0.1", free_tcp_port())).unwrap();
    let pc = held.local_addr().unwrap().port();
    for (taken, why) in [
        (pc, "already in use"),
        (gw.admin.port(), "the gateway's own `admin`"),
    ] {
        z.write_policy("b.toml", &tcp_app("b", taken));
        // Told where the app is written, as a file's own errors are.
        refused_and_still_serving(&gw, b, |e| {
            e.contains("b.toml:1:6: app b: cannot listen on TCP") && e.contains(why)
        })
        .await;
        // Back to serving for the next round.
        z.write_policy("b.toml", &tcp_app("b", pb));
        wait_until("reload ok", WAIT, || gw.hub.policy().last_reload().ok).await;
    }
    drop(held);
    gw.shutdown.cancel();
}

/// A start that finds one app's address held by another program (after a reboot, a mail
/// server took the port first) serves everything else, shows the failure in `/status`, and
/// starts that app once the port is free. It refused to start at all, and a service manager
/// restarted the whole gateway for ever for one app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_with_one_app_address_taken_serves_the_rest_and_retries_it() {
    let z = TestZone::new(&["home1"]);
    // Below the ephemeral range: once released, no other test's socket takes it first.
    let held = std::net::TcpListener::bind(("127.0.0.1", free_tcp_port())).unwrap();
    let taken: std::net::SocketAddr = held.local_addr().unwrap();
    let pb = free_tcp_port();
    z.write_policy("a.toml", &tcp_app("a", taken.port()));
    z.write_policy("b.toml", &tcp_app("b", pb));
    let (gw, _h1) = echo_gateway(&z).await;
    let b: std::net::SocketAddr = ([127, 0, 0, 1], pb).into();
    assert_eq!(roundtrip(b, b"b").await.unwrap(), b"b");
    let status = admin_status(gw.admin).await;
    assert!(
        status.contains("app a: cannot listen on TCP") && status.contains("already in use"),
        "{status}"
    );
    drop(held);
    eventually_async("a served once its port is free", || async {
        roundtrip(taken, b"a").await.ok().as_deref() == Some(&b"a"[..])
    })
    .await;
    eventually_async("the failure leaves /status", || async {
        !admin_status(gw.admin).await.contains("cannot listen")
    })
    .await;
    gw.shutdown.cancel();
}

/// An agent links only to a gateway whose certificate says gateway: the zone.json it holds
/// naming the device as one is not enough (roles changed without a new certificate), for a
/// gateway link is trusted with more than a peer. The link says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_a_gateway_whose_certificate_lacks_the_role() {
    let z = TestZone::new(&["home1"]);
    let zd = zone_core::zonedir::ZoneDir::open(&z.zone_dir()).unwrap();
    let now = OffsetDateTime::now_utc();
    let (cert, _key) = device_cert(
        &zd,
        "gw",
        &[Role::Node],
        now - time::Duration::hours(1),
        now + time::Duration::days(30),
    );
    std::fs::write(z.bundle("gw").cert, cert).unwrap();
    let gw = start_gateway(&z, fast_tuning(), Duration::from_millis(500)).await;
    let echo = tcp_echo().await;
    let agent = start_agent(
        &z,
        "home1",
        services(&[("echo", echo, ServiceProto::Tcp)]),
        vec![],
        fast_tuning(),
    )
    .await;
    let link = agent.agent.links()[0].clone();
    wait_until("the link says why", WAIT, || {
        link.status()
            .last_error
            .is_some_and(|e| e.contains("without the gateway role"))
    })
    .await;
    assert!(gw.hub.agent("home1").is_none(), "linked to a non-gateway");
    agent.shutdown.cancel();
    gw.shutdown.cancel();
}

/// A second node agent running with a device's bundle (a cloned disk) takes the device's
/// place at the gateway; the agent it replaced says why in its link's status (and log),
/// naming the other agent, instead of a bare "connection lost" each time they take turns;
/// and the gateway's log says it at warn (it said it at info, unseen).
#[tokio::test(flavor = "current_thread")]
async fn an_agent_replaced_by_another_with_its_identity_says_so() {
    let (logs, _guard) = capture_logs();
    let z = TestZone::new(&["home1"]);
    let gw = start_gateway(&z, fast_tuning(), Duration::from_millis(500)).await;
    let first = start_echo_node(&z, &gw, "home1").await;
    let link = first.agent.links()[0].clone();
    wait_until("the first agent up", WAIT, || link.status().state == "up").await;
    let second = start_echo_node(&z, &gw, "home1").await;
    wait_until("the first agent told why it was cut", WAIT, || {
        link.status()
            .last_error
            .is_some_and(|e| e.contains("another node agent with this device's identity"))
    })
    .await;
    let said = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        said.lines().any(|l| l.contains("WARN")
            && l.contains("tunnel::hub")
            && l.contains("device=home1")
            && l.contains("two node agents run with this device's bundle")),
        "{said}"
    );
    second.shutdown.cancel();
    first.shutdown.cancel();
    gw.shutdown.cancel();
}

/// A node started before its gateway (or with the gateway's UDP port closed by a firewall):
/// its link's error says what to check, where it said only "timed out" (here QUIC's own idle
/// timeout ends the dial, shorter than the handshake deadline in the test tuning).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_never_answers_is_told_with_what_to_check() {
    let z = TestZone::new(&["home1"]);
    // No gateway at the zone's address.
    let a = start_agent(&z, "home1", services(&[]), vec![], fast_tuning()).await;
    let link = a.agent.links()[0].clone();
    wait_until("the dial timed out", WAIT + Duration::from_secs(10), || {
        link.status().last_error.is_some()
    })
    .await;
    let e = link.status().last_error.unwrap();
    assert!(
        e.contains("timed out: no answer from the gateway")
            && e.contains("its QUIC port open to UDP"),
        "{e}"
    );
    a.shutdown.cancel();
}

/// Waits for the policy edit just written to be refused with an error `told` accepts, then,
/// past a reconcile, checks the old listener at `app` still serves.
async fn refused_and_still_serving(
    gw: &RunningGateway,
    app: std::net::SocketAddr,
    told: impl Fn(&str) -> bool,
) {
    wait_until("reload refused", WAIT, || !gw.hub.policy().last_reload().ok).await;
    let status = gw.hub.policy().last_reload();
    assert!(status.errors.iter().any(|e| told(e)), "{status:?}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(roundtrip(app, b"still").await.unwrap(), b"still");
}

/// An edit narrowing a wildcard listener to an address this machine does not have (a
/// mistyped IP) is refused before the swap, the old listener serving on: its port could not be
/// tried (the running listener holds it), so the edit served and the app stayed down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_to_an_address_the_machine_lacks_keeps_the_old_policy() {
    let z = TestZone::new(&["home1"]);
    let p = free_tcp_port();
    let app = |listen: String| tcp_app_on("w", &listen);
    z.write_policy("w.toml", &app(format!("0.0.0.0:{p}")));
    let (gw, _h1) = echo_gateway(&z).await;
    let w: std::net::SocketAddr = ([127, 0, 0, 1], p).into();
    assert_eq!(roundtrip(w, b"w").await.unwrap(), b"w");
    // 192.0.2.0/24 is documentation space: no interface here has it (nothing is sent to it).
    z.write_policy("w.toml", &app(format!("192.0.2.55:{p}")));
    refused_and_still_serving(&gw, w, |e| {
        e.contains("app w: cannot listen on TCP 192.0.2.55")
            && e.contains("no interface of this machine has that address")
    })
    .await;
    gw.shutdown.cancel();
}

/// An edit widening an app's address to a wildcard whose port another program holds on
/// another address (`127.0.0.2:P` becoming `0.0.0.0:P` with a program on `127.0.0.1:P`:
/// the wildcard cannot bind beside it) is refused before the swap, the old listener serving
/// on. Its port could not be tried while ours held it: the edit served, the old listener
/// stopped, the wildcard failed, and the app stayed down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_to_a_wildcard_another_program_overlaps_keeps_the_old_policy() {
    let py = crate::netlab::python();
    if std::process::Command::new(py)
        .arg("-c")
        .arg("pass")
        .status()
        .map_or(true, |s| !s.success())
    {
        return crate::common::skip(
            "an_edit_to_a_wildcard_another_program_overlaps_keeps_the_old_policy",
            "needs python3 for the other program",
        );
    }
    let z = TestZone::new(&["home1"]);
    let p = free_tcp_port();
    let app = |listen: String| tcp_app_on("w", &listen);
    z.write_policy("w.toml", &app(format!("127.0.0.2:{p}")));
    let (gw, _h1) = echo_gateway(&z).await;
    let w: std::net::SocketAddr = ([127, 0, 0, 2], p).into();
    assert_eq!(roundtrip(w, b"w").await.unwrap(), b"w");
    // Another program (a process of its own: this one's sockets are the gateway's) listens
    // on 127.0.0.1:P until its stdin closes.
    let script = format!(
        "import socket,sys\ns=socket.socket()\ns.bind(('127.0.0.1',{p}))\ns.listen()\nprint('ready',flush=True)\nsys.stdin.read()\n"
    );
    let mut other = std::process::Command::new(py)
        .arg("-c")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(other.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready");
    z.write_policy("w.toml", &app(format!("0.0.0.0:{p}")));
    refused_and_still_serving(&gw, w, |e| {
        e.contains(&format!("app w: cannot listen on TCP 0.0.0.0:{p}"))
            && e.contains(&format!(
                "another program on this machine holds 127.0.0.1:{p}"
            ))
    })
    .await;
    // Its stdin closed, the other program ends (it was started here, ended by its own hand).
    drop(other.stdin.take());
    let _ = other.wait();
    gw.shutdown.cancel();
}

/// An app moved to another port keeps its open connections (its old listener stops, new
/// clients use the new port): they were cut as "no app serves it any more", every SSH
/// session through the app with them. Moved and then denied, they end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_moved_to_another_port_keeps_its_open_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let z = TestZone::new(&["home1"]);
    let (gw, _h1, a, b) = app_a_and_a_free_port(&z).await;
    let pb = b.port();
    let (mut open, mut buf) = (echoed_connection(a).await, [0u8; 16]);
    z.write_policy("a.toml", &tcp_app("a", pb));
    eventually_async("a moved", || async {
        roundtrip(b, b"new port").await.ok().as_deref() == Some(&b"new port"[..])
    })
    .await;
    // Past the policy's re-decision of open connections.
    tokio::time::sleep(Duration::from_millis(700)).await;
    open.write_all(b"two").await.unwrap();
    let n = tokio::time::timeout(WAIT, open.read(&mut buf))
        .await
        .expect("the open connection stopped answering")
        .unwrap();
    assert_eq!(&buf[..n], b"two", "the open connection was cut");
    // Denied now (only 10.0.0.0/8): it ends.
    z.write_policy(
        "a.toml",
        &tcp_app("a", pb).replace("[\"public\"]", "[\"10.0.0.0/8\"]"),
    );
    let n = tokio::time::timeout(WAIT, open.read(&mut buf))
        .await
        .expect("the open connection was not cut once denied");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    gw.shutdown.cancel();
}

/// An app moved to an address that would not take its open connections (here from
/// 127.0.0.1 to 127.0.0.2; `0.0.0.0` to `127.0.0.1` is the edit that withdraws public
/// access) ends them: they went on under the app's unchanged rules, as a move to another
/// port's do. The same when another app (to another service) takes the old address in the
/// same edit: they went on then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_narrowed_to_another_address_ends_its_connections() {
    use tokio::io::AsyncReadExt;
    for another_app_there in [false, true] {
        let z = TestZone::new(&["home1"]);
        let (gw, _h1, a, b) = app_a_and_a_free_port(&z).await;
        let (mut open, mut buf) = (echoed_connection(a).await, [0u8; 16]);
        let elsewhere: std::net::SocketAddr = ([127, 0, 0, 2], b.port()).into();
        let mut policy = tcp_app_on("a", &elsewhere.to_string());
        if another_app_there {
            policy += &tcp_app_on("b", &a.to_string()).replace("home1/echo", "home1/other");
        }
        z.write_policy("a.toml", &policy);
        eventually_async("a moved", || async {
            roundtrip(elsewhere, b"moved").await.ok().as_deref() == Some(&b"moved"[..])
        })
        .await;
        let n = tokio::time::timeout(WAIT, open.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!("the open connection was not cut (another app there: {another_app_there})")
            });
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        gw.shutdown.cancel();
    }
}

/// Connections are decided as they open and again whenever the policy changes: an edit that
/// no longer allows an open connection closes it (it used to run on until the client left),
/// while renaming its app keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_end_when_the_policy_stops_allowing_them() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let z = TestZone::new(&["home1"]);
    let pa = free_tcp_port();
    z.write_policy("a.toml", &tcp_app("a", pa));
    let (gw, _h1) = echo_gateway(&z).await;
    let a: std::net::SocketAddr = ([127, 0, 0, 1], pa).into();
    let mut open = tokio::net::TcpStream::connect(a).await.unwrap();
    let mut buf = [0u8; 16];
    for word in [&b"one"[..], b"two"] {
        open.write_all(word).await.unwrap();
        let n = tokio::time::timeout(WAIT, open.read(&mut buf))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(&buf[..n], word);
        if word == b"one" {
            // Renamed, same target and rule: the open connection stays.
            z.write_policy("a.toml", &tcp_app("a2", pa));
            let renamed = || gw.hub.policy().current().policy.app("a2").is_some();
            wait_until("a renamed a2", WAIT, renamed).await;
        }
    }

    // Allowed from 10.0.0.0/8 only: the connection from 127.0.0.1 is closed.
    let only_ten = tcp_app("a2", pa).replace("[\"public\"]", "[\"10.0.0.0/8\"]");
    z.write_policy("a.toml", &only_ten);
    let n = tokio::time::timeout(WAIT, open.read(&mut buf))
        .await
        .expect("the open connection was not cut");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert_eq!(roundtrip(a, b"new").await.unwrap_or_default(), b"");
    gw.shutdown.cancel();
}

/// A UDP flow is decided again when the policy changes, as a TCP connection is: an edit that
/// no longer allows its client ends it, and the client's next datagram is refused (through
/// a flow left open it would still be answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_end_when_the_policy_stops_allowing_them() {
    let z = TestZone::new(&["home1"]);
    let port = free_udp_port();
    let app = |from: &str| {
        format!("[app.u]\nudp = {{ listen = \"127.0.0.1:{port}\" }}\nto = \"home1/uecho\"\nallow = {{ from = [\"{from}\"] }}\n")
    };
    z.write_policy("u.toml", &app("public"));
    let echo = udp_echo().await;
    let (gw, _h1) = gateway_and_home1_offering(&z, "uecho", echo, ServiceProto::Udp).await;
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(("127.0.0.1", port)).await.unwrap();
    let mut buf = [0u8; 64];
    client.send(b"allowed").await.unwrap();
    let n = tokio::time::timeout(WAIT, client.recv(&mut buf))
        .await
        .expect("echoed while allowed")
        .unwrap();
    assert_eq!(&buf[..n], b"allowed");

    z.write_policy("u.toml", &app("10.0.0.0/8"));
    wait_until("the edit in force", WAIT, || {
        let cur = gw.hub.policy().current();
        let a = cur.policy.app("u").expect("u");
        let who = policies::Requester::Public {
            ip: [127, 0, 0, 1].into(),
        };
        matches!(
            cur.policy
                .decide(a, &who, None, None, policies::Timestamp::now()),
            policies::Decision::Deny { .. }
        )
    })
    .await;
    let denied = || {
        let cur = gw.hub.policy().current();
        let a = cur.policy.app("u").expect("u");
        cur.state(a)
            .counters
            .snapshot()
            .refusals
            .values()
            .sum::<u64>()
            > 0
    };
    // The socket's loop hears of the edit a moment after it is in force: then the flow is
    // gone and the next datagram's new flow refused.
    let mut refused = false;
    for _ in 0..20 {
        client.send(b"after the edit").await.unwrap();
        if tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf))
            .await
            .is_err()
            && denied()
        {
            refused = true;
            break;
        }
    }
    assert!(
        refused,
        "the flow outlived the edit that no longer allows its client"
    );
    gw.shutdown.cancel();
}

/// Listeners follow what the policy names, not app names: renaming an app, or two apps
/// swapping ports, keeps every port serving (each used to be closed and rebound while the old
/// socket still held it: EADDRINUSE, and the app stayed unreachable until the next edit). An
/// edit naming a port another program holds is refused until saved again with the port free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_follow_renames_swaps_and_busy_ports() {
    let z = TestZone::new(&["home1"]);
    let (pa, pb) = (free_tcp_port(), free_tcp_port());
    // b leads to another service (the same echo server under a second name).
    let tcp_app_b =
        |name: &str, port: u16| tcp_app(name, port).replace("home1/echo", "home1/echo2");
    z.write_policy("a.toml", &tcp_app("a", pa));
    z.write_policy("b.toml", &tcp_app_b("b", pb));
    let gw = start_gateway(&z, fast_tuning(), Duration::from_millis(500)).await;
    let echo = tcp_echo().await;
    let _h1 = start_agent(
        &z,
        "home1",
        services(&[
            ("echo", echo, ServiceProto::Tcp),
            ("echo2", echo, ServiceProto::Tcp),
        ]),
        vec![],
        fast_tuning(),
    )
    .await;
    wait_until("home1 connected", WAIT, || gw.hub.agent("home1").is_some()).await;
    let a: std::net::SocketAddr = ([127, 0, 0, 1], pa).into();
    let b: std::net::SocketAddr = ([127, 0, 0, 1], pb).into();
    assert_eq!(roundtrip(a, b"a").await.unwrap(), b"a");
    assert_eq!(roundtrip(b, b"b").await.unwrap(), b"b");
    let listens = |name: &str| {
        gw.hub
            .policy()
            .current()
            .policy
            .app(name)
            .map(|a| a.listener.clone())
    };

    // Renamed: the port keeps serving, under the new name.
    z.write_policy("a.toml", &tcp_app("a2", pa));
    wait_until("a renamed a2", WAIT, || listens("a2").is_some()).await;
    assert_eq!(roundtrip(a, b"renamed").await.unwrap(), b"renamed");
    let counted = || {
        let cur = gw.hub.policy().current();
        let app = cur.policy.app("a2").expect("a2");
        cur.state(app).counters.snapshot().connections
    };
    let before = counted();
    assert_eq!(roundtrip(a, b"counted").await.unwrap(), b"counted");
    wait_until("a2 counts its connections", WAIT, || counted() > before).await;

    // Swapped ports: both keep serving, and connections open across the swap stay open under
    // their own app though the app now on their port leads elsewhere (they were cut: "app b
    // now leads to home1/echo2").
    let mut open_a = tokio::net::TcpStream::connect(a).await.unwrap();
    let mut open_b = tokio::net::TcpStream::connect(b).await.unwrap();
    for (s, m) in [(&mut open_a, b"before a"), (&mut open_b, b"before b")] {
        assert_eq!(echo_once(s, m).await, m);
    }
    z.write_policy("a.toml", &tcp_app("a2", pb));
    z.write_policy("b.toml", &tcp_app_b("b", pa));
    wait_until("ports swapped", WAIT, || {
        listens("a2") == Some(policies::Listener::Tcp(b))
            && listens("b") == Some(policies::Listener::Tcp(a))
    })
    .await;
    assert_eq!(roundtrip(a, b"swap a").await.unwrap(), b"swap a");
    assert_eq!(roundtrip(b, b"swap b").await.unwrap(), b"swap b");
    // The connections' checks run just after the edit: give them a moment, then ask.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (s, m) in [(&mut open_a, b"after  a"), (&mut open_b, b"after  b")] {
        assert_eq!(echo_once(s, m).await, m, "cut by the swap");
    }

    // A port held by another program: the edit is refused, the policy serving stays; saved
    // again once the port is free, it is taken.
    // Below the ephemeral range: once released, no other test's socket takes it first.
    let held = std::net::TcpListener::bind(("127.0.0.1", free_tcp_port())).unwrap();
    let c = held.local_addr().unwrap();
    z.write_policy("c.toml", &tcp_app("c", c.port()));
    wait_until("the edit refused", WAIT, || {
        !gw.hub.policy().last_reload().ok
    })
    .await;
    assert!(listens("c").is_none());
    assert_eq!(roundtrip(a, b"still a").await.unwrap(), b"still a");
    drop(held);
    z.write_policy("c.toml", &tcp_app("c", c.port()));
    eventually_async("c served once its port is free", || async {
        roundtrip(c, b"c").await.ok().as_deref() == Some(&b"c"[..])
    })
    .await;

    // An app on the gateway's own admin port: a message naming the setting, in /status.
    z.write_policy("d.toml", &tcp_app("d", gw.admin.port()));
    eventually_async("the clash shows in /status", || async {
        let status = admin_status(gw.admin).await;
        status.contains("app d: cannot listen") && status.contains("gateway's own `admin`")
    })
    .await;
    let status = admin_status(gw.admin).await;
    assert!(status.contains("\"zone_expires_at\": \"20"), "{status}");
    gw.shutdown.cancel();
}

/// Writes `m` on an open connection to an echo and reads as many bytes back (empty when the
/// connection was cut).
async fn echo_once(s: &mut tokio::net::TcpStream, m: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut back = vec![0; m.len()];
    let echoed = async {
        s.write_all(m).await?;
        s.read_exact(&mut back).await
    };
    match tokio::time::timeout(WAIT, echoed).await {
        Ok(Ok(_)) => back,
        _ => Vec::new(),
    }
}

/// The admin API's `/status` body (empty when it cannot be fetched).
async fn admin_status(admin: std::net::SocketAddr) -> String {
    admin_get(admin, "/status").await
}

/// The admin API's answer to `GET path`, head and body (empty when it cannot be fetched).
pub(crate) async fn admin_get(admin: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(admin).await else {
        return String::new();
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// `/metrics` and `/status` show each `[[tls]]` certificate's end, and a pair whose files stop
/// loading as failing while its certificate serves on: only a log line said it, and nothing
/// an alert could watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_certificates_show_their_end_and_a_failing_pair() {
    let z = TestZone::new(&["home1"]);
    let d = tempfile::tempdir().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["app.example".to_string()]).unwrap();
    params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (d.path().join("app.crt"), d.path().join("app.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    let mut opts = gateway_options(
        &z,
        "gw",
        z.gw_addr,
        fast_tuning(),
        Duration::from_millis(500),
        None,
    );
    opts.https = Some("127.0.0.1:0".parse().unwrap());
    opts.tls_certs = vec![(c.clone(), k.clone())];
    let gw = run_gateway(opts).await;
    let end = time::macros::datetime!(2099-01-01 0:00 UTC).unix_timestamp();
    let file = c.display().to_string();
    let metrics = admin_get(gw.admin, "/metrics").await;
    for line in [
        format!("zonegate_tls_certificate_not_after_seconds{{file=\"{file}\"}} {end}\n"),
        format!("zonegate_tls_pair_failing{{file=\"{file}\"}} 0\n"),
    ] {
        assert!(metrics.contains(&line), "{line} missing in:\n{metrics}");
    }
    let tls_status = || async {
        let s = admin_status(gw.admin).await;
        let body = s.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {s}"));
        v["tls_certificates"][0].clone()
    };
    let c = tls_status().await;
    assert_eq!(c["not_after"], "2099-01-01T00:00:00Z", "{c}");
    assert_eq!(c["names"][0], "app.example", "{c}");
    assert_eq!(c["failing"], false, "{c}");
    // A renewal's copy half done: the key no longer loads; the certificate serves on.
    std::fs::write(&k, "not a key").unwrap();
    let failing = format!("zonegate_tls_pair_failing{{file=\"{file}\"}} 1\n");
    let deadline = Instant::now() + WAIT + Duration::from_secs(10);
    let metrics = loop {
        let m = admin_get(gw.admin, "/metrics").await;
        if m.contains(&failing) || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        metrics.contains(&failing),
        "{failing} missing in:\n{metrics}"
    );
    assert!(
        metrics.contains(&format!("not_after_seconds{{file=\"{file}\"}} {end}\n")),
        "{metrics}"
    );
    let c = tls_status().await;
    assert_eq!(c["failing"], true, "{c}");
    assert_eq!(c["not_after"], "2099-01-01T00:00:00Z", "{c}");
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_app_bandwidth_limit_paces_the_transfer() {
    let z = TestZone::new(&["home1"]);
    let port = free_tcp_port();
    // 256 KiB/s per connection: 1 MiB each way cannot take less than ~3 s even with a full
    // initial bucket (a lower bound only: a slow machine makes it slower, never faster).
    z.write_policy(
        "a.toml",
        &format!("[app.slow]\ntcp = {{ listen = \"127.0.0.1:{port}\" }}\nto = \"home1/echo\"\nallow = {{ from = [\"public\"] }}\nlimits = {{ bandwidth_per_connection = \"256KiB/s\" }}\n"),
    );
    let (gw, _h1) = echo_gateway(&z).await;
    let data = random_bytes(1 << 20);
    let start = Instant::now();
    let back = roundtrip(([127, 0, 0, 1], port).into(), &data)
        .await
        .unwrap();
    let took = start.elapsed();
    assert!(back == data, "shaped transfer corrupted data");
    assert!(
        took >= Duration::from_millis(2500),
        "1 MiB at 256 KiB/s took only {took:?}: not shaped"
    );
    gw.shutdown.cancel();
}

/// Clients that read a shaped download at the app's (slow) rate are not cut as stalled: the
/// copy's wait for bandwidth is pacing, not a reader that stopped. At 2 KiB/s a 16 KiB chunk
/// waits 8 s, and every such stream of the device counted as held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_shaped_downloads_that_are_read_are_not_cut() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let z = TestZone::new(&["home1"]);
    let port = free_tcp_port();
    z.write_policy(
        "a.toml",
        &format!("[app.slow]\ntcp = {{ listen = \"127.0.0.1:{port}\" }}\nto = \"home1/flood\"\nallow = {{ from = [\"public\"] }}\nlimits = {{ bandwidth_per_connection = \"2KiB/s\" }}\n"),
    );
    let gw = start_gateway(&z, fast_tuning(), Duration::from_millis(500)).await;
    let flood = tcp_flood().await;
    let _h1 = start_agent(
        &z,
        "home1",
        services(&[("flood", flood, ServiceProto::Tcp)]),
        vec![],
        fast_tuning(),
    )
    .await;
    wait_until("home1 connected", WAIT, || gw.hub.agent("home1").is_some()).await;
    let mut readers = Vec::new();
    for _ in 0..8 {
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        c.write_all(b"go").await.unwrap();
        let got = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = got.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n @ 1..) = c.read(&mut buf).await {
                count.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
        });
        readers.push((task, got));
    }
    // Several chunk waits at fast_tuning's 1 s stall time.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let cut = gw
        .hub
        .status()
        .iter()
        .find(|a| a.device == "home1")
        .expect("home1 still connected")
        .streams_cut;
    assert_eq!(cut, 0, "shaped downloads read at their rate were cut");
    // Moving, not merely not finished: each has had bytes at its rate.
    for (task, got) in &readers {
        assert!(!task.is_finished(), "a shaped download ended");
        assert!(
            got.load(std::sync::atomic::Ordering::Relaxed) > 0,
            "a shaped download got nothing"
        );
    }
    for (task, _) in readers {
        task.abort();
    }
    gw.shutdown.cancel();
}

/// A TCP service that echoes until its connection ends, then reports how it ended: `Ok(())`
/// for a clean end of stream, the error kind otherwise. Also hands out each accepted stream's
/// write half owner (the test may reset it).
async fn reporting_echo() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Result<(), std::io::ErrorKind>>,
    tokio::sync::mpsc::UnboundedReceiver<tokio::net::TcpStream>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (ended_tx, ended) = tokio::sync::mpsc::unbounded_channel();
    let (conn_tx, conns) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let ended_tx = ended_tx.clone();
            let conn_tx = conn_tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => {
                            let _ = ended_tx.send(Ok(()));
                            return;
                        }
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                let _ = ended_tx.send(Err(std::io::ErrorKind::BrokenPipe));
                                return;
                            }
                            if &buf[..n] == b"now reset me" {
                                let _ = conn_tx.send(s);
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = ended_tx.send(Err(e.kind()));
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, ended, conns)
}

/// How the reporting echo's next connection ended.
async fn next_end(
    ended: &mut tokio::sync::mpsc::UnboundedReceiver<Result<(), std::io::ErrorKind>>,
) -> Result<(), std::io::ErrorKind> {
    tokio::time::timeout(WAIT, ended.recv())
        .await
        .expect("the service saw its connection end")
        .expect("the service runs")
}

/// A connection that ends abortively on one side must end abortively on the other, across
/// gateway and agent (TCP RST → QUIC RESET_STREAM/STOP_SENDING → TCP RST), never as a clean
/// end of stream that would make a truncated transfer look complete; a clean half-close must
/// stay a half-close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_and_half_closes_cross_the_tunnel_as_they_are() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let z = TestZone::new(&["home1"]);
    z.write_policy("apps.toml", policy_tcp_udp_mesh());
    let gw = start_gateway(&z, fast_tuning(), Duration::from_secs(1)).await;
    let (echo, mut ended, mut conns) = reporting_echo().await;
    let _h1 = start_agent(
        &z,
        "home1",
        services(&[("echo", echo, ServiceProto::Tcp)]),
        vec![],
        fast_tuning(),
    )
    .await;
    wait_until("agent connected", WAIT, || gw.hub.agents().len() == 1).await;
    let app = gw.apps["echo"];

    // Client half-closes: the service sees a clean end, and its echo still comes back.
    let mut c = tokio::net::TcpStream::connect(app).await.unwrap();
    c.write_all(b"all of it").await.unwrap();
    c.shutdown().await.unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"all of it");
    assert_eq!(next_end(&mut ended).await, Ok(()));

    // Client resets mid-connection: the service sees a reset, not an end of stream.
    let mut c = tokio::net::TcpStream::connect(app).await.unwrap();
    c.write_all(b"part of a request").await.unwrap();
    let mut got = [0u8; 17];
    c.read_exact(&mut got).await.unwrap();
    c.set_zero_linger().unwrap();
    drop(c);
    assert_eq!(
        next_end(&mut ended).await,
        Err(std::io::ErrorKind::ConnectionReset)
    );

    // The service resets: the client sees a reset too.
    let mut c = tokio::net::TcpStream::connect(app).await.unwrap();
    c.write_all(b"now reset me").await.unwrap();
    let mut got = [0u8; 12];
    c.read_exact(&mut got).await.unwrap();
    let s = tokio::time::timeout(WAIT, conns.recv())
        .await
        .unwrap()
        .unwrap();
    s.set_zero_linger().unwrap();
    drop(s);
    let mut rest = Vec::new();
    let e = tokio::time::timeout(WAIT, c.read_to_end(&mut rest))
        .await
        .expect("the client saw its connection end")
        .expect_err("a reset, not an end of stream");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    gw.shutdown.cancel();
}

/// A public TCP app's stream is opened early: the client's first bytes go out with the stream
/// header, before the device has answered. Accepted, they reach the service; refused (the
/// service is down), reads and writes fail with the refusal, which is kept with its reason,
/// and the client's connection is reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_opened_streams_carry_data_or_the_refusal() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let z = TestZone::new(&["home1"]);
    z.write_policy(
        "apps.toml",
        "[app.echo]\ntcp = { listen = \"127.0.0.1:0\" }\nto = \"home1/echo\"\nallow = { from = [\"public\"] }\n\n[app.down]\ntcp = { listen = \"127.0.0.2:0\" }\nto = \"home1/down\"\nallow = { from = [\"public\"] }\n",
    );
    let gw = start_gateway(&z, fast_tuning(), Duration::from_secs(1)).await;
    let echo = tcp_echo().await;
    let down: std::net::SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let _h1 = start_agent(
        &z,
        "home1",
        services(&[
            ("echo", echo, ServiceProto::Tcp),
            ("down", down, ServiceProto::Tcp),
        ]),
        vec![],
        fast_tuning(),
    )
    .await;
    wait_until("home1 connected", WAIT, || gw.hub.agent("home1").is_some()).await;
    let origin = || tunnel::proto::Origin::Public("127.0.0.1:1".parse().unwrap());

    // Written before anything was read: the bytes follow the header; the echo comes back.
    let mut up = gw
        .hub
        .connect_early("home1", "echo", "echo", origin())
        .await
        .unwrap();
    up.write_all(b"early bytes").await.unwrap();
    let mut got = [0u8; 11];
    up.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"early bytes");
    assert!(up.refused().is_none());

    // The service is down: connect_early returns at once; the first read brings the refusal.
    let mut up = gw
        .hub
        .connect_early("home1", "down", "down", origin())
        .await
        .unwrap();
    // Usually this goes out before the refusal comes back; on a busy machine the refusal can
    // be first, and then this write fails with it already.
    if let Err(e) = up.write_all(b"lost").await {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    }
    // The device replies "refused" and stops our sending: a later write fails with the
    // refusal (not "stopped"), also before anything was read.
    let mut e = None;
    for _ in 0..100 {
        if let Err(w) = up.write_all(b"more").await {
            e = Some(w);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = e.expect("writes to a refused stream fail");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    let tunnel::stream::StreamRefused { code, reason } =
        up.refused().cloned().expect("the refusal is kept");
    assert_eq!(
        code,
        tunnel::proto::RefuseCode::ServiceUnreachable,
        "{reason}"
    );

    // Read first: the same refusal.
    let mut up = gw
        .hub
        .connect_early("home1", "down", "down", origin())
        .await
        .unwrap();
    let e = up.read(&mut got).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    assert!(up.refused().is_some());

    // Through the public apps, as a client sees it.
    assert_eq!(roundtrip(gw.apps["echo"], b"hi").await.unwrap(), b"hi");
    let r = roundtrip(gw.apps["down"], b"hi").await;
    assert!(
        r.as_ref().map_or(true, |b| b.is_empty()),
        "a client of a down service got data: {r:?}"
    );
    // What the refused stream carried early never reached the service: not the app's
    // bytes_in (it was counted as it went into the stream). The echo's 2 bytes are.
    let counts = |app: &str| gw.app_counts(app);
    wait_until("the echo's bytes counted", WAIT, || {
        counts("echo").bytes_in == 2
    })
    .await;
    wait_until("the refused connection ended", WAIT, || {
        counts("down").refusals.values().sum::<u64>() + counts("down").connections >= 1
    })
    .await;
    // The connection's task counts as its ends are dropped, right after the client's
    // connection is closed: given a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(counts("down").bytes_in, 0, "{:?}", counts("down"));
    gw.shutdown.cancel();
}

/// What a client sends into an early-opened stream the device never takes is not the app's
/// `bytes_in` (it was counted as quinn took it): here the service never completes a connect
/// (a listener whose accept queue is full), so the device's reply is still to come when the
/// gateway gives up on it, and the client's bytes were certainly sent before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_bytes_a_device_never_took_are_not_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let z = TestZone::new(&["home1"]);
    z.write_policy(
        "apps.toml",
        "[app.silent]\ntcp = { listen = \"127.0.0.1:0\" }\nto = \"home1/silent\"\nallow = { from = [\"public\"] }\n",
    );
    let gw = start_gateway(&z, fast_tuning(), Duration::from_secs(1)).await;
    // Backlog 0, filled: further connects get no answer to their SYN.
    let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    full.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    full.listen(0).unwrap();
    let silent = full.local_addr().unwrap().as_socket().unwrap();
    let _fill: Vec<_> = (0..2)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&silent, Duration::from_millis(300)).ok()
        })
        .collect();
    let _h1 = start_agent(
        &z,
        "home1",
        services(&[("silent", silent, ServiceProto::Tcp)]),
        vec![],
        fast_tuning(),
    )
    .await;
    wait_until("home1 connected", WAIT, || gw.hub.agent("home1").is_some()).await;
    let counts = || gw.app_counts("silent");
    let mut c = tokio::net::TcpStream::connect(gw.apps["silent"])
        .await
        .unwrap();
    c.write_all(b"hello").await.unwrap();
    // Ends once the gateway stops waiting for the device's reply (the open timeout, 5 s).
    let mut buf = [0u8; 16];
    let end = tokio::time::timeout(Duration::from_secs(30), c.read(&mut buf))
        .await
        .expect("the connection never ended");
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    wait_until("the connection counted", WAIT, || counts().connections == 1).await;
    // The connection's task counts as its ends are dropped, right after the client's
    // connection is closed: given a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(counts().bytes_in, 0, "{:?}", counts());
    gw.shutdown.cancel();
}

/// A gateway whose DNS at a wildcard works around another server on one address (as
/// systemd-resolved holds 127.0.0.53:53) starts with a `[services]` entry at that server's
/// address: the DNS binds each other address, and the service is not this process (refused
/// as "this process's own dns socket", such a gateway stayed down after an upgrade). A
/// service at an address the DNS did bind is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_beside_the_gateways_dns_is_not_the_gateway() {
    let z = TestZone::new(&["home1"]);
    let port = free_udp_and_tcp_port();
    let resolver: std::net::SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
    let _udp = std::net::UdpSocket::bind(resolver).unwrap();
    let _tcp = std::net::TcpListener::bind(resolver).unwrap();
    let mut opts = gateway_options(
        &z,
        "gw",
        z.gw_addr,
        fast_tuning(),
        Duration::from_millis(500),
        Some(format!("[::]:{port}").parse().unwrap()),
    );
    opts.services = services(&[("resolver", resolver, ServiceProto::Udp)]);
    let stop = tokio_util::sync::CancellationToken::new();
    let gw = gateway::Gateway::bind(opts.clone(), stop.clone())
        .await
        .unwrap_or_else(|e| panic!("refused beside the resolver: {e}"));
    drop(gw);
    stop.cancel();
    let held: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    opts.services = services(&[("resolver", held, ServiceProto::Udp)]);
    // The first gateway's QUIC socket is let go by its endpoint's task: given a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let e = loop {
        let stop = tokio_util::sync::CancellationToken::new();
        let r = gateway::Gateway::bind(opts.clone(), stop.clone()).await;
        stop.cancel();
        match r {
            Ok(_) => panic!("a service at the DNS's own address was taken"),
            Err(e)
                if e.to_string().contains("Address already in use")
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => break e,
        }
    };
    // Exit 1, retried: the service's program may only not have started yet.
    assert!(matches!(e, gateway::run::StartError::Bind(_)), "{e:?}");
    let e = e.to_string();
    assert!(
        e.contains(&format!(
            "`[services.resolver]` ({held}) is this process's own `dns` socket"
        )) && e.contains("start it before the gateway"),
        "{e}"
    );
}

/// A UDP service that is down for a moment (restarting) does not end the flows to it: the
/// ICMP "port unreachable" its closed port sent ended the flow on the node, and the client's
/// next datagram needed a new one (a new source port at the service).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_udp_service_keeps_its_flows() {
    let z = TestZone::new(&["home1"]);
    z.write_policy(
        "apps.toml",
        "[app.uecho]\nudp = { listen = \"127.0.0.1:0\" }\nto = \"home1/uecho\"\nallow = { from = [\"public\"] }\n",
    );
    // Below the ephemeral range: bound again when the service comes back.
    let service = tokio::net::UdpSocket::bind(("127.0.0.1", free_udp_port()))
        .await
        .unwrap();
    let service_addr = service.local_addr().unwrap();
    let echo = |s: tokio::net::UdpSocket| {
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        })
    };
    let first = echo(service);
    let (gw, _h1) = gateway_and_home1_offering(&z, "uecho", service_addr, ServiceProto::Udp).await;
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(gw.apps["uecho"]).await.unwrap();
    let mut buf = [0u8; 64];
    client.send(b"before").await.unwrap();
    let n = tokio::time::timeout(WAIT, client.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"before");

    // The service goes away; a datagram meets its closed port.
    first.abort();
    let _ = first.await;
    client.send(b"into the gap").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Back on the same port: the same flow carries on.
    let again = tokio::net::UdpSocket::bind(service_addr).await.unwrap();
    let _second = echo(again);
    client.send(b"after").await.unwrap();
    // "into the gap" is lost at the closed port, or (on a machine slow to pass it on) echoed
    // by the new service: either way "after" comes back.
    let n = tokio::time::timeout(WAIT, async {
        loop {
            let n = client.recv(&mut buf).await.unwrap();
            if &buf[..n] != b"into the gap" {
                return n;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(&buf[..n], b"after");
    let cur = gw.hub.policy().current();
    let app = cur.policy.app("uecho").expect("uecho");
    assert_eq!(
        cur.state(app).counters.snapshot().connections,
        1,
        "the service's restart ended the flow"
    );
    gw.shutdown.cancel();
}

/// A zone whose only app (`policy`) goes to home1's `service` at `addr`, with the gateway and
/// home1 connected.
async fn one_app_zone(
    policy: &str,
    service: &str,
    addr: std::net::SocketAddr,
    proto: ServiceProto,
) -> (TestZone, RunningGateway, RunningAgent) {
    let z = TestZone::new(&["home1"]);
    z.write_policy("apps.toml", policy);
    let gw = start_gateway(&z, fast_tuning(), Duration::from_millis(500)).await;
    let h1 = start_agent(
        &z,
        "home1",
        services(&[(service, addr, proto)]),
        vec![],
        fast_tuning(),
    )
    .await;
    wait_until("home1 connected", WAIT, || gw.hub.agent("home1").is_some()).await;
    (z, gw, h1)
}

/// A UDP service on loopback that answers every datagram with itself; and how many it got.
async fn counting_udp_echo() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let service = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = service.local_addr().unwrap();
    let heard = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = heard.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = service.recv_from(&mut buf).await {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = service.send_to(&buf[..n], from).await;
        }
    });
    (addr, heard)
}

/// Sends `data` on `client` (connected to a udp app) until an answer comes, at most `tries`
/// times (the first datagrams open the flow; one lost meanwhile is sent again).
async fn udp_answer(client: &tokio::net::UdpSocket, data: &[u8], tries: usize) -> Option<Vec<u8>> {
    let mut buf = [0u8; 2048];
    for _ in 0..tries {
        client.send(data).await.unwrap();
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(700), client.recv(&mut buf)).await
        {
            return Some(buf[..n].to_vec());
        }
    }
    None
}

/// A tcp app with `proxy_protocol = true` sends its service a PROXY v2 header naming the
/// client and the address it reached, ahead of the client's bytes; the service sees the
/// node agent's loopback otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_app_with_proxy_protocol_tells_the_service_the_client() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The service hands back the first 28 bytes it reads (a PROXY v2 header of IPv4 TCP),
    // then echoes.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = [0u8; 28];
                c.read_exact(&mut head).await?;
                c.write_all(&head).await?;
                let (mut r, mut w) = c.split();
                tokio::io::copy(&mut r, &mut w).await
            });
        }
    });
    let (_z, gw, _h1) = one_app_zone(
        "[app.smtp]\ntcp = { listen = \"127.0.0.1:0\", proxy_protocol = true }\nto = \"home1/smtp\"\nallow = { from = [\"public\"] }\n",
        "smtp",
        service,
        ServiceProto::Tcp,
    )
    .await;
    let app = gw.apps["smtp"];
    let mut c = tokio::net::TcpStream::connect(app).await.unwrap();
    let me = c.local_addr().unwrap();
    c.write_all(b"EHLO").await.unwrap();
    let mut got = [0u8; 32];
    tokio::time::timeout(WAIT, c.read_exact(&mut got))
        .await
        .expect("an answer")
        .unwrap();
    let (client, local, len) =
        gateway::proxy_header::decode(&got).expect("a PROXY v2 header first");
    assert_eq!((client, local, len), (me, app, 28));
    assert_eq!(&got[28..], b"EHLO");
    gw.shutdown.cancel();
}

/// A udp app's `bandwidth` holds its flows to the rate: datagrams past it are dropped (not
/// queued), counted in the flow's done line. 200 datagrams of 1,000 bytes sent at once
/// under 16 KiB/s: about the bucket's 16 KiB pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_apps_bandwidth_drops_what_is_past_it() {
    use std::sync::atomic::Ordering;
    let (service, heard) = counting_udp_echo().await;
    let (_z, gw, _h1) = one_app_zone(
        "[app.uecho]\nudp = { listen = \"127.0.0.1:0\" }\nto = \"home1/uecho\"\nallow = { from = [\"public\"] }\nlimits = { bandwidth = \"16KiB/s\" }\n",
        "uecho",
        service,
        ServiceProto::Udp,
    )
    .await;
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(gw.apps["uecho"]).await.unwrap();
    // The flow open first (its first datagrams wait for it in a short queue).
    assert!(
        udp_answer(&client, b"open", 10).await.is_some(),
        "the flow never opened"
    );
    let mut buf = [0u8; 2048];
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Late answers to the opening datagrams are not the burst's.
    while client.try_recv(&mut buf).is_ok() {}
    let before = heard.load(Ordering::Relaxed);
    for _ in 0..200 {
        client.send(&[7u8; 1000]).await.unwrap();
    }
    let mut back = 0;
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(700), client.recv(&mut buf)).await
    {
        back += 1;
    }
    let passed = heard.load(Ordering::Relaxed) - before;
    assert!(
        (8..=40).contains(&passed),
        "{passed} of 200 datagrams passed a 16 KiB/s app at once"
    );
    assert!(back <= passed, "{back} answers to {passed}");
    gw.shutdown.cancel();
}

/// A udp app on a wildcard address answers each client from the address it sent to: the
/// replies left from the address routing picked, which a client that asked another address
/// of the machine (its NAT, its firewall, a connected socket) drops. Here a query to
/// 127.0.0.2 from a socket connected there, which routing answers from 127.0.0.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_app_on_a_wildcard_answers_from_the_address_asked() {
    let (service, _) = counting_udp_echo().await;
    // A wildcard app names its port (port 0 is for loopback apps only).
    let port = free_udp_port();
    let (_z, gw, _h1) = one_app_zone(
        &format!("[app.uecho]\nudp = {{ listen = \"0.0.0.0:{port}\" }}\nto = \"home1/uecho\"\nallow = {{ from = [\"public\"] }}\n"),
        "uecho",
        service,
        ServiceProto::Udp,
    )
    .await;
    let asked = std::net::SocketAddr::from(([127, 0, 0, 2], gw.apps["uecho"].port()));
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(asked).await.unwrap();
    let got = udp_answer(&client, b"ping", 15).await;
    assert_eq!(got.as_deref(), Some(&b"ping"[..]), "no answer from {asked}");
    gw.shutdown.cancel();
}

/// A udp app may go to a service of the gateway's own device, as a tcp app may: each flow is
/// a socket from the gateway to the service (every flow used to fail as "device gw is
/// offline").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_app_reaches_a_service_of_the_gateway_itself() {
    let z = TestZone::new(&["home1"]);
    z.write_policy(
        "apps.toml",
        "[app.here]\nudp = { listen = \"127.0.0.1:0\" }\nto = \"gw/uecho\"\nallow = { from = [\"public\"] }\n",
    );
    let service = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let service_addr = service.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = service.recv_from(&mut buf).await {
            // Answers twice: replies are the flow's, however many.
            for _ in 0..2 {
                let _ = service.send_to(&buf[..n], from).await;
            }
        }
    });
    let mut opts = gateway_options(
        &z,
        "gw",
        z.gw_addr,
        fast_tuning(),
        Duration::from_millis(500),
        None,
    );
    opts.services = services(&[("uecho", service_addr, ServiceProto::Udp)]);
    let gw = run_gateway(opts).await;
    let mut buf = [0u8; 64];
    for (i, word) in [&b"one"[..], b"two"].into_iter().enumerate() {
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(gw.apps["here"]).await.unwrap();
        client.send(word).await.unwrap();
        for _ in 0..2 {
            let n = tokio::time::timeout(WAIT, client.recv(&mut buf))
                .await
                .expect("the gateway's own UDP service answered through the app")
                .unwrap();
            assert_eq!(&buf[..n], word);
        }
        let cur = gw.hub.policy().current();
        let app = cur.policy.app("here").expect("here");
        assert_eq!(cur.state(app).counters.snapshot().connections, i as u64 + 1);
    }
    gw.shutdown.cancel();
}

/// One-way UDP (syslog, statsd, a client's keep-alives to a service that rarely answers): a
/// flow stays open while the client sends, however long the service stays silent — the agent
/// used to close it after the idle time of the service's direction alone, and the gateway kept
/// sending into the closed flow for good. A flow that did go idle is replaced by a new one at
/// the client's next datagram.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_udp_flows_stay_open_and_reopen_after_idle() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let z = TestZone::new(&["home1"]);
    z.write_policy(
        "apps.toml",
        "[app.sink]\nudp = { listen = \"127.0.0.1:0\" }\nto = \"home1/sink\"\nallow = { from = [\"public\"] }\n",
    );
    // Long enough that a busy machine's late sleeps (the client sends every 100 ms) do not
    // make the flow look idle.
    let idle = Duration::from_millis(1500);
    let t = Tuning {
        udp_flow_idle: idle,
        ..fast_tuning()
    };
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let got = Arc::new(AtomicUsize::new(0));
    tokio::spawn({
        let got = got.clone();
        async move {
            let mut buf = [0u8; 2048];
            while sink.recv(&mut buf).await.is_ok() {
                got.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let gw = start_gateway(&z, t, Duration::from_millis(500)).await;
    let _h1 = start_agent(
        &z,
        "home1",
        services(&[("sink", sink_addr, ServiceProto::Udp)]),
        vec![],
        t,
    )
    .await;
    wait_until("home1 connected", WAIT, || gw.hub.agent("home1").is_some()).await;
    let app = gw.apps["sink"];
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(app).await.unwrap();

    // The flow's open first (datagrams sent before it completes wait in a short queue).
    client.send(b"log line").await.unwrap();
    wait_until("the first datagram arrived", WAIT, || {
        got.load(Ordering::Relaxed) == 1
    })
    .await;
    // Then over three idle times of client-only traffic, one datagram every 100 ms.
    let sent = 50;
    for _ in 1..sent {
        client.send(b"log line").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_until("every datagram arrived", WAIT, || {
        got.load(Ordering::Relaxed) == sent
    })
    .await;
    let flows = || {
        let cur = gw.hub.policy().current();
        let app = cur.policy.app("sink").expect("sink");
        cur.state(app).counters.snapshot().connections
    };
    assert_eq!(flows(), 1, "the one-way flow was closed and reopened");

    // Quiet for three idle times: the flow closes. The next datagrams open a new one.
    tokio::time::sleep(idle * 3).await;
    let before = got.load(Ordering::Relaxed);
    for _ in 0..5 {
        client.send(b"after a pause").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_until("datagrams after the pause arrive", WAIT, || {
        got.load(Ordering::Relaxed) >= before + 4
    })
    .await;
    assert_eq!(flows(), 2, "a new flow after the idle one");
    gw.shutdown.cancel();
}

/// A TCP service that writes without end to whoever connects (a download that never finishes).
async fn tcp_flood() -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let chunk = vec![0x5au8; 64 * 1024];
                while s.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    addr
}

/// Waits until `count` stops growing: the same for two readings in a row (one pause could be
/// a slow moment), half a second apart; 15 s at most.
async fn until_still(count: impl Fn() -> u64) {
    let (mut last, mut still, mut polls) = (count(), 0, 0);
    while still < 2 && polls < 30 {
        polls += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = count();
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
}

/// A TCP service that accepts and never reads (small receive buffers: little is absorbed).
async fn tcp_sink() -> std::net::SocketAddr {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = s.listen(64).unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            kept.push(s);
        }
    });
    addr
}

/// A client that resets its upload while the device's service is not reading it: the reset
/// reaches the node while its copy to the service is stuck in a write, and a read would see it
/// only after that write. The held-stream sweep finds it and ends the connection to the
/// service (reset, as the client's was); it stayed open, with its stream, for as long as the
/// service read nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_reaches_a_service_that_stopped_reading() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::AsyncWriteExt;
    let z = TestZone::new(&["home1"]);
    let port = free_tcp_port();
    z.write_policy(
        "a.toml",
        &tcp_app("mute", port).replace("home1/echo", "home1/mute"),
    );
    // Reads nothing (small receive buffer: little is absorbed); writes a byte now and then,
    // which fails once the node has reset the connection.
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = s.listen(8).unwrap();
    let mute = l.local_addr().unwrap();
    let (accepted, reset) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    tokio::spawn({
        let (accepted, reset) = (accepted.clone(), reset.clone());
        async move {
            let Ok((mut c, _)) = l.accept().await else {
                return;
            };
            accepted.store(true, Ordering::Relaxed);
            while c.write_all(b".").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            reset.store(true, Ordering::Relaxed);
        }
    });
    let (gw, _h1) = gateway_and_home1_offering(&z, "mute", mute, ServiceProto::Tcp).await;

    let stop = tokio_util::sync::CancellationToken::new();
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let upload = tokio::spawn({
        let stop = stop.clone();
        async move {
            let chunk = vec![0xa5u8; 64 * 1024];
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    r = c.write_all(&chunk) => if r.is_err() { return },
                }
            }
            // Closed with a reset.
            c.set_zero_linger().unwrap();
        }
    });
    wait_until("the service accepted", WAIT, || {
        accepted.load(Ordering::Relaxed)
    })
    .await;
    // Until the upload is stuck: the bytes sent to the device stop growing.
    let to = || {
        gw.hub
            .status()
            .iter()
            .find(|a| a.device == "home1")
            .map_or(0, |a| a.bytes_to)
    };
    until_still(to).await;
    stop.cancel();
    upload.await.unwrap();
    assert!(!reset.load(Ordering::Relaxed), "reset before the client's");
    // Held after the stall time (1 s here), then seen reset at the sweep's next tick.
    wait_until("the service's connection reset", WAIT, || {
        reset.load(Ordering::Relaxed)
    })
    .await;
    gw.shutdown.cancel();
}

/// A download whose whole answer (and its end) reached the gateway while its client paused
/// past the stall time is held, looked at by the sweep each tick for a reset, and then
/// delivered whole when the client reads again: the look takes nothing from the stream, and
/// one held stream is within the budget (nothing is cut).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_download_whose_end_arrived_is_delivered_whole() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LEN: usize = 4 << 20;
    let z = TestZone::new(&["home1"]);
    let port = free_tcp_port();
    z.write_policy(
        "a.toml",
        &tcp_app("once", port).replace("home1/echo", "home1/once"),
    );
    // Answers LEN bytes to whoever connects, then closes.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let once = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = c.write_all(&vec![7u8; LEN]).await;
                let _ = c.shutdown().await;
            });
        }
    });
    let (gw, h1) = gateway_and_home1_offering(&z, "once", once, ServiceProto::Tcp).await;
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    let mut c = s.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    // Past the stall time (1 s) and some sweep ticks, reading nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, c.read_to_end(&mut got))
        .await
        .expect("the download ends")
        .expect("the download ends cleanly");
    assert_eq!(got.len(), LEN);
    assert_eq!(
        gw.hub
            .status()
            .iter()
            .find(|a| a.device == "home1")
            .map(|a| a.streams_cut),
        Some(0)
    );
    gw.shutdown.cancel();
    h1.shutdown.cancel();
}

/// A local service that stops reading uploads must not stall the device's other streams:
/// what the agent cannot pass on stays unread in its QUIC receive buffers, counted against the
/// window the gateway's connection shares with every other stream to the device — enough such
/// uploads held all of it, and no new connection reached any service of the device. The agent
/// watches the streams it reads as the gateway does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_that_stop_reading_do_not_stall_the_device() {
    use tokio::io::AsyncWriteExt;
    let z = TestZone::new(&["home1"]);
    let (sink_port, echo_port) = (free_tcp_port(), free_tcp_port());
    z.write_policy(
        "a.toml",
        &format!(
            "{}{}",
            tcp_app("sink", sink_port).replace("home1/echo", "home1/sink"),
            tcp_app("echo", echo_port)
        ),
    );
    let gw = start_gateway(&z, fast_tuning(), Duration::from_millis(500)).await;
    let (echo, sink) = (tcp_echo().await, tcp_sink().await);
    let h1 = start_agent(
        &z,
        "home1",
        services(&[
            ("echo", echo, ServiceProto::Tcp),
            ("sink", sink, ServiceProto::Tcp),
        ]),
        vec![],
        fast_tuning(),
    )
    .await;
    wait_until("home1 connected", WAIT, || gw.hub.agent("home1").is_some()).await;

    // Enough stalled uploads to pin the connection's whole receive window several times.
    let mut uploads = Vec::new();
    for _ in 0..24 {
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", sink_port))
            .await
            .unwrap();
        uploads.push(tokio::spawn(async move {
            let chunk = vec![0xa5u8; 64 * 1024];
            while c.write_all(&chunk).await.is_ok() {}
        }));
    }
    // Let them pile up: until the bytes sent to the device stop growing.
    let to = || {
        gw.hub
            .status()
            .iter()
            .find(|a| a.device == "home1")
            .map_or(0, |a| a.bytes_to)
    };
    until_still(to).await;
    let back = tokio::time::timeout(
        Duration::from_secs(20),
        roundtrip(([127, 0, 0, 1], echo_port).into(), b"still there?"),
    )
    .await;
    assert!(
        matches!(&back, Ok(Ok(b)) if b == b"still there?"),
        "a connection to the device's other service stalled behind uploads its service stopped reading: {back:?}"
    );
    let budget = tunnel::holds::HELD_BUDGET as u64;
    wait_until(
        "all held uploads but the budget cut",
        Duration::from_secs(30),
        || h1.agent.streams_cut() >= 24 - budget,
    )
    .await;
    for u in uploads {
        u.abort();
    }
    gw.shutdown.cancel();
}

/// A local client of a mesh forward that stops reading what the peer sends holds the node's
/// receive window on that connection (relayed or direct) like any stalled reader: the agent
/// watches the streams it opens, not only those it is sent, and cuts the held ones beyond
/// the budget (without the watch none are cut: the wait below times out). The forward's
/// other service stays reachable on the direct path meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_clients_that_stop_reading_do_not_stall_the_node() {
    use tokio::io::AsyncWriteExt;
    let z = TestZone::new(&["home1", "home2"]);
    z.write_policy(
        "mesh.toml",
        "[app.flood-mesh]\nmesh = true\nto = \"home1/flood\"\nallow = { from = [\"device:home2\"] }\n\n[app.echo-mesh]\nmesh = true\nto = \"home1/echo\"\nallow = { from = [\"device:home2\"] }\n",
    );
    let gw = start_gateway(&z, fast_tuning(), Duration::from_millis(500)).await;
    let (echo, flood) = (tcp_echo().await, tcp_flood().await);
    let _h1 = start_agent(
        &z,
        "home1",
        services(&[
            ("echo", echo, ServiceProto::Tcp),
            ("flood", flood, ServiceProto::Tcp),
        ]),
        vec![],
        fast_tuning(),
    )
    .await;
    let h2 = start_agent(
        &z,
        "home2",
        services(&[]),
        vec![
            forward("127.0.0.1:0", "home1/flood"),
            forward("127.0.0.1:0", "home1/echo"),
        ],
        fast_tuning(),
    )
    .await;
    wait_until("both agents connected", WAIT, || gw.hub.agents().len() == 2).await;
    wait_links_up(&h2.agent).await;
    let fwd = h2.agent.forward_addrs().to_vec();
    assert_eq!(roundtrip(fwd[1], b"first").await.unwrap(), b"first");
    // The relayed first stream starts the punch; the stalled clients go direct.
    wait_until("direct path to home1", WAIT, || {
        h2.agent.peers().iter().any(|p| p.path == "direct")
    })
    .await;

    let mut stalled = Vec::new();
    for _ in 0..24 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        let mut c = s.connect(fwd[0]).await.unwrap();
        c.write_all(b"go").await.unwrap();
        stalled.push(c);
    }
    // Long enough for their unread data to pile up (fast_tuning's stall time is 1 s).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let back =
        tokio::time::timeout(Duration::from_secs(10), roundtrip(fwd[1], b"still there?")).await;
    assert!(
        matches!(&back, Ok(Ok(b)) if b == b"still there?"),
        "a forward to the peer's other service stalled behind local clients that stopped reading: {back:?}"
    );
    assert!(
        h2.agent.peers().iter().any(|p| p.path == "direct"),
        "{:?}",
        h2.agent.peers()
    );
    // Not all 24 need reach the peer (opens wait for credit the stalled ones hold): those that
    // did are held and, beyond the budget, cut. How many depends on the machine's pace: the
    // connection's window holds twice the budget's worth of held streams, whose cuts come after
    // the stall time; the other opens' replies wait on that credit meanwhile and may be given
    // up on (reset) by the peer first, on a busy machine. So at least one cut, not a count.
    wait_until("held forward streams cut", Duration::from_secs(30), || {
        h2.agent.streams_cut() >= 1
    })
    .await;
    drop(stalled);
    gw.shutdown.cancel();
}

/// Public clients that stop reading a device's downloads must not stall the device's other
/// streams: what they leave unread holds QUIC connection credit, and enough of them used to
/// hold all of it (every other connection to the device, and new ones, waited for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_do_not_stall_the_device() {
    use tokio::io::AsyncWriteExt;
    let z = TestZone::new(&["home1"]);
    let (flood_port, echo_port) = (free_tcp_port(), free_tcp_port());
    z.write_policy(
        "a.toml",
        &format!(
            "{}{}",
            tcp_app("flood", flood_port).replace("home1/echo", "home1/flood")
                + "limits = { max_connections = 24 }\n",
            tcp_app("echo", echo_port)
        ),
    );
    let gw = start_gateway(&z, fast_tuning(), Duration::from_millis(500)).await;
    let (echo, flood) = (tcp_echo().await, tcp_flood().await);
    let _h1 = start_agent(
        &z,
        "home1",
        services(&[
            ("echo", echo, ServiceProto::Tcp),
            ("flood", flood, ServiceProto::Tcp),
        ]),
        vec![],
        fast_tuning(),
    )
    .await;
    wait_until("home1 connected", WAIT, || gw.hub.agent("home1").is_some()).await;

    // Enough stalled downloads to pin the connection's whole receive window several times.
    let mut stalled = Vec::new();
    for _ in 0..24 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        let mut c = s
            .connect(([127, 0, 0, 1], flood_port).into())
            .await
            .unwrap();
        c.write_all(b"go").await.unwrap();
        stalled.push(c);
    }
    // Let their unread data pile up: until the device's byte count stops growing.
    let from = || {
        gw.hub
            .status()
            .iter()
            .find(|a| a.device == "home1")
            .map_or(0, |a| a.bytes_from)
    };
    until_still(from).await;
    let back = tokio::time::timeout(
        Duration::from_secs(20),
        roundtrip(([127, 0, 0, 1], echo_port).into(), b"still there?"),
    )
    .await;
    assert!(
        matches!(&back, Ok(Ok(b)) if b == b"still there?"),
        "a connection to the device's other service stalled behind clients that stopped reading: {back:?}"
    );
    // Cutting frees credit, the device sends to the streams that had none, they are held in
    // turn: within a few stall times all but the budget's worth are cut.
    let cut = || {
        gw.hub
            .status()
            .iter()
            .find(|a| a.device == "home1")
            .map_or(0, |a| a.streams_cut)
    };
    let budget = tunnel::holds::HELD_BUDGET as u64;
    wait_until(
        "all held streams but the budget cut",
        Duration::from_secs(30),
        || cut() >= 24 - budget,
    )
    .await;
    let cut = cut();
    assert_eq!(
        cut,
        24 - budget,
        "the budget's worth of held streams is left alone"
    );

    // A cut ends its splice too (it was stuck writing to a client that reads nothing and
    // would never have read the stream again): the gateway closes those clients' sockets
    // without their reading, and the app's connection slots, all 24 held, come back.
    eventually_async("a cut client's connection slot came back", || async {
        use tokio::io::AsyncReadExt;
        let Ok(mut c) = tokio::net::TcpStream::connect(("127.0.0.1", flood_port)).await else {
            return false;
        };
        let _ = c.write_all(b"go").await;
        let mut b = [0u8; 1024];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), c.read(&mut b)).await,
            Ok(Ok(1..))
        )
    })
    .await;

    // The cut clients' downloads end (at once, or after what was in flight); the ones left
    // within the budget flow again.
    let reads = stalled.into_iter().map(|mut c| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 1 << 20];
        let read_all = async { while let Ok(1..) = c.read(&mut buf).await {} };
        tokio::time::timeout(Duration::from_secs(3), read_all)
            .await
            .is_ok()
    });
    let ended = futures_util::future::join_all(reads).await;
    let ended = ended.iter().filter(|e| **e).count() as u64;
    assert_eq!(ended, cut, "every cut download ends, the others go on");
    gw.shutdown.cancel();
}

/// `n` clients of the flooding tcp app at `port` (receive buffers of 16 KiB, so the window
/// they give opens as they read, not in bursts of half a large buffer), each reading at most
/// `bytes` every 62 ms until aborted: the returned count is what they read together; a task
/// ends early only if its download ends.
async fn slow_readers(
    port: u16,
    n: u64,
    bytes: usize,
) -> (Arc<std::sync::atomic::AtomicU64>, tokio::task::JoinSet<()>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let total = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.set_recv_buffer_size(16 * 1024).unwrap();
        let mut c = s.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        c.write_all(b"go").await.unwrap();
        let read = total.clone();
        tasks.spawn(async move {
            let mut buf = vec![0u8; bytes];
            let mut every = tokio::time::interval(Duration::from_millis(62));
            loop {
                every.tick().await;
                match c.read(&mut buf).await {
                    Ok(n @ 1..) => read.fetch_add(n as u64, Ordering::Relaxed),
                    _ => return,
                };
            }
        });
    }
    (total, tasks)
}

/// A gateway on `z` with a public tcp app (on the returned port) to home1's service that
/// sends without end, home1 connected. Its stall time is 10 s: a read can hand over up to 32
/// of quinn's chunks (~280 KiB at loopback's packet size), seconds' worth for the slow
/// readers of these tests, and what must not be cut is a reader whose writes keep moving.
async fn flood_gateway(z: &TestZone) -> (RunningGateway, RunningAgent, u16) {
    let port = free_tcp_port();
    z.write_policy(
        "a.toml",
        &tcp_app("flood", port).replace("home1/echo", "home1/flood"),
    );
    let tuning = Tuning {
        reader_stall: Duration::from_secs(10),
        ..fast_tuning()
    };
    let gw = start_gateway(z, tuning, Duration::from_millis(500)).await;
    let h1 = start_agent(
        z,
        "home1",
        services(&[("flood", tcp_flood().await, ServiceProto::Tcp)]),
        vec![],
        fast_tuning(),
    )
    .await;
    wait_until("home1 connected", WAIT, || gw.hub.agent("home1").is_some()).await;
    (gw, h1, port)
}

/// Clients reading a device's downloads slowly but steadily are not taken for ones that
/// stopped: a read of the gateway's hands over up to 32 of quinn's chunks (~280 KiB at
/// loopback's packet size), which a client reading 16 KiB/s takes 17 seconds to take, past
/// the 10 s stall here. What counts is that the splice's writes to it make progress (every
/// few seconds here, as ~64 KiB of what the socket holds unsent drains); the eight here
/// (twice the held budget) had some of them cut (3 when last tried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_slow_readers_are_not_cut_as_held() {
    use std::sync::atomic::Ordering;
    let z = TestZone::new(&["home1"]);
    let (gw, _h1, port) = flood_gateway(&z).await;
    const SLOW: u64 = 8;
    let (read, mut slow) = slow_readers(port, SLOW, 1024).await;
    // Each has read more than one of the gateway's reads' worth (past its stall time).
    wait_until(
        "the slow clients read 320 KiB each",
        Duration::from_secs(180),
        || read.load(Ordering::Relaxed) >= SLOW * (320 << 10),
    )
    .await;
    let cut = gw
        .hub
        .status()
        .into_iter()
        .find(|a| a.device == "home1")
        .map(|a| a.streams_cut);
    assert_eq!(cut, Some(0), "no steady reader is cut");
    assert!(
        slow.try_join_next().is_none(),
        "every slow download goes on"
    );
    slow.abort_all();
    gw.shutdown.cancel();
}

/// Public clients that read a device's downloads slower than it sends them, but keep reading
/// (never held), must not slow its other streams to their pace: each leaves a stream window
/// unread at the gateway, and twelve of them held more than the connection's whole window, so
/// a fast client's download got credit only as the slow ones read. The window follows the
/// backlog now ([`tunnel::holds`]): the fast download goes at its own pace. Measured in what
/// the slow clients read meanwhile, not in time: behind them, the fast client would have had
/// to wait for them to read more than its whole download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_do_not_slow_the_devices_other_downloads() {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let z = TestZone::new(&["home1"]);
    let (gw, _h1, port) = flood_gateway(&z).await;
    // Lent to home1's connection (0 while it is away: a reconnect under load).
    let lent_now = || {
        gw.hub
            .status()
            .into_iter()
            .find(|a| a.device == "home1")
            .map_or(0, |a| a.window_lent)
    };

    // Twelve readers of ~32 KiB/s: slower than the device sends, never stopping.
    const SLOW: u64 = 12;
    let (slow_read, mut slow) = slow_readers(port, SLOW, 2 * 1024).await;
    // Their unread data fills their stream windows, more than the connection's own window:
    // it is lent a stream window for each backlogged beyond the held budget.
    let beyond = SLOW - tunnel::holds::HELD_BUDGET as u64;
    let lent = beyond * u64::from(tunnel::transport::STREAM_WINDOW);
    wait_until(
        "the window lent for the slow readers",
        Duration::from_secs(60),
        || lent_now() >= lent,
    )
    .await;

    const FAST: u64 = 16 << 20;
    let before = slow_read.load(Ordering::Relaxed);
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    c.write_all(b"go").await.unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    let download = async {
        while got < FAST {
            match c.read(&mut buf).await {
                Ok(n @ 1..) => got += n as u64,
                other => panic!("the fast download ended after {got} bytes: {other:?}"),
            }
        }
    };
    let done = tokio::time::timeout(Duration::from_secs(120), download).await;
    let meanwhile = slow_read.load(Ordering::Relaxed) - before;
    assert!(
        done.is_ok(),
        "the fast download stalled: {got} bytes in 120 s"
    );
    assert!(
        meanwhile < FAST,
        "the fast download waited on the slow readers: they read {meanwhile} bytes while it read {FAST}"
    );
    assert!(slow.try_join_next().is_none(), "the slow downloads go on");
    slow.abort_all();
    // Their backlog gone (what they left unread counted as they end), the window goes back.
    wait_until(
        "the lent window given back",
        Duration::from_secs(60),
        || lent_now() == 0,
    )
    .await;
    gw.shutdown.cancel();
}

/// A local service that takes what is sent to it as fast as it can, unless a connection's
/// first byte is `s`: then 2 KiB every 62 ms (~32 KiB/s), until `stop` is cancelled (it then
/// closes those). Counts what it read of each kind.
async fn tcp_slow_or_fast_sink(
    stop: tokio_util::sync::CancellationToken,
) -> (
    std::net::SocketAddr,
    Arc<std::sync::atomic::AtomicU64>,
    Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::AsyncReadExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (slow, fast) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (slow2, fast2) = (slow.clone(), fast.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (slow, fast, stop) = (slow2.clone(), fast2.clone(), stop.clone());
            tokio::spawn(async move {
                let mut kind = [0u8; 1];
                if s.read_exact(&mut kind).await.is_err() {
                    return;
                }
                if kind[0] == b's' {
                    let mut buf = vec![0u8; 2 * 1024];
                    let mut every = tokio::time::interval(Duration::from_millis(62));
                    while !stop.is_cancelled() {
                        every.tick().await;
                        match s.read(&mut buf).await {
                            Ok(n @ 1..) => slow.fetch_add(n as u64, Ordering::Relaxed),
                            _ => return,
                        };
                    }
                    return;
                }
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    fast.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    (addr, slow, fast)
}

/// The node's side of the window loan: uploads to a local service that reads slower than
/// their clients send (never stopping) each leave up to a stream window unread at the
/// agent, and twelve of them held more than the connection's whole window, so another
/// upload to the device went at their pace. The agent's connection is lent a window for the
/// backlog as the gateway's is for downloads: the other upload goes at its own. Measured in
/// what the slow service read meanwhile, not in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_services_do_not_slow_the_devices_other_uploads() {
    use std::sync::atomic::Ordering;
    use tokio::io::AsyncWriteExt;
    let z = TestZone::new(&["home1"]);
    let stop_slow = tokio_util::sync::CancellationToken::new();
    let (sink, slow_read, fast_read) = tcp_slow_or_fast_sink(stop_slow.clone()).await;
    let port = free_tcp_port();
    z.write_policy(
        "a.toml",
        &tcp_app("up", port).replace("home1/echo", "home1/sink"),
    );
    let gw = start_gateway(&z, fast_tuning(), Duration::from_millis(500)).await;
    // A stall time past a slow reader's pauses, as flood_gateway's.
    let tuning = Tuning {
        reader_stall: Duration::from_secs(10),
        ..fast_tuning()
    };
    let h1 = start_agent(
        &z,
        "home1",
        services(&[("sink", sink, ServiceProto::Tcp)]),
        vec![],
        tuning,
    )
    .await;
    wait_until("home1 connected", WAIT, || gw.hub.agent("home1").is_some()).await;

    const SLOW: u64 = 12;
    let mut uploads = tokio::task::JoinSet::new();
    for _ in 0..SLOW {
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        c.write_all(b"s").await.unwrap();
        uploads.spawn(async move {
            let chunk = vec![0x5au8; 64 * 1024];
            while c.write_all(&chunk).await.is_ok() {}
        });
    }
    let beyond = SLOW - tunnel::holds::HELD_BUDGET as u64;
    let lent = beyond * u64::from(tunnel::transport::STREAM_WINDOW);
    wait_until(
        "the window lent for the slow service's uploads",
        Duration::from_secs(60),
        || h1.agent.window_lent() >= lent,
    )
    .await;

    const FAST: u64 = 16 << 20;
    let before = slow_read.load(Ordering::Relaxed);
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    c.write_all(b"f").await.unwrap();
    let upload = async {
        let chunk = vec![0xa5u8; 256 * 1024];
        for _ in 0..FAST / chunk.len() as u64 {
            c.write_all(&chunk).await.unwrap();
        }
        while fast_read.load(Ordering::Relaxed) < FAST {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let done = tokio::time::timeout(Duration::from_secs(120), upload).await;
    let meanwhile = slow_read.load(Ordering::Relaxed) - before;
    assert!(
        done.is_ok(),
        "the fast upload stalled: the service read {} bytes of it in 120 s",
        fast_read.load(Ordering::Relaxed)
    );
    assert!(
        meanwhile < FAST,
        "the fast upload waited on the slow service: it read {meanwhile} bytes of the slow uploads while it read {FAST}"
    );
    assert!(uploads.try_join_next().is_none(), "the slow uploads go on");
    // The service closes the slow connections (their clients leaving would not do: what the
    // node holds of their uploads would still be delivered at the service's pace, minutes).
    stop_slow.cancel();
    uploads.abort_all();
    drop(c);
    // Their backlog gone (what was left unread counted as the streams end), the window
    // goes back.
    wait_until(
        "the lent window given back",
        Duration::from_secs(60),
        || h1.agent.window_lent() == 0,
    )
    .await;
    gw.shutdown.cancel();
}

/// A gateway listed with several addresses is one gateway: the agent keeps one connection to
/// it, on the first address that answers (an IPv6 one its IPv4 socket cannot reach is
/// skipped, one nothing answers at is given up after the handshake timeout). A link per
/// address had two connections replace each other at the hub without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_several_addresses_gets_one_connection() {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let first = ["[::1]:9".parse().unwrap(), silent.local_addr().unwrap()];
    let z = TestZone::with_gateway_addrs_before(&first, &["home1"]);
    let t = Tuning {
        handshake_timeout: Duration::from_secs(2),
        ..fast_tuning()
    };
    let gw = start_gateway(&z, t, Duration::from_millis(500)).await;
    let h1 = start_agent(&z, "home1", services(&[]), vec![], t).await;
    wait_until("home1 connected", Duration::from_secs(20), || {
        gw.hub.agent("home1").is_some()
    })
    .await;
    let links = h1.agent.links();
    // The hub has the agent before the agent has the welcome.
    wait_until("home1's link up", WAIT, || links[0].status().state == "up").await;
    let session = gw.hub.agent("home1").unwrap().session_id;
    assert_eq!(links.len(), 1, "one link per gateway");
    assert_eq!(links[0].addrs().len(), 3);
    assert_eq!(
        links[0].addr(),
        z.gw_addr,
        "connected on the address that answers"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        gw.hub.agent("home1").map(|a| a.session_id),
        Some(session),
        "the connection was replaced"
    );
    drop(silent);
    gw.shutdown.cancel();
}

/// Moving a zone to a new VPS needs no restart of its nodes: a gateway added to the zone
/// config is dialed as soon as the agent adopts it (here from the old gateway), and the old
/// one, revoked, loses its connection and its link. Agents made their links once at start and
/// warned that a restart was needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_added_to_the_zone_is_dialed_and_a_revoked_one_dropped_without_restart() {
    let mut z = TestZone::new(&["home1"]);
    z.write_policy("apps.toml", "[app.echo]\ntcp = { listen = \"127.0.0.1:0\" }\nto = \"home1/echo\"\nallow = { from = [\"public\"] }\n");
    let t = fast_tuning();
    let gw = start_gateway(&z, t, Duration::from_millis(500)).await;
    let h1 = start_echo_node(&z, &gw, "home1").await;
    let names = |a: &tunnel::agent::Agent| -> Vec<String> {
        a.links().iter().map(|l| l.name.clone()).collect()
    };
    assert_eq!(names(&h1.agent), ["gw"]);

    let added = z.add_gateway("gw2");
    let gw2 = start_named_gateway(&z, "gw2", t).await;
    // The running gateway adopts the copied zone.json and passes it to its agents.
    std::fs::write(z.bundle("gw").zone_config, added).unwrap();
    wait_until("home1 on the added gateway", WAIT, || {
        gw2.hub.agent("home1").is_some()
    })
    .await;
    assert_eq!(names(&h1.agent), ["gw", "gw2"]);
    assert_eq!(
        roundtrip(gw2.apps["echo"], b"via gw2").await.unwrap(),
        b"via gw2"
    );

    // Revoked at the new gateway: the agent hears it from there and leaves the old one.
    std::fs::write(z.bundle("gw2").zone_config, z.revoke("gw")).unwrap();
    wait_until("home1 left the revoked gateway", WAIT, || {
        gw.hub.agent("home1").is_none() && names(&h1.agent) == ["gw2"]
    })
    .await;
    // Well past the agent's reconnect delay: no link dials it again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        gw.hub.agent("home1").is_none(),
        "home1 went back to the revoked gateway"
    );
    assert_eq!(names(&h1.agent), ["gw2"]);
    assert_eq!(
        roundtrip(gw2.apps["echo"], b"still").await.unwrap(),
        b"still"
    );
    gw.shutdown.cancel();
    gw2.shutdown.cancel();
    h1.shutdown.cancel();
}

/// A node whose gateway is gone learns the gateway's new address (here from a zone.json copied
/// into its bundle) and dials it at once: not after its dial to the old address times out
/// (here 30 s) and its backoff sleep ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_node_dials_a_new_gateway_address_at_once() {
    let mut z = TestZone::new(&["home1"]);
    let t = fast_tuning();
    let gw = start_gateway(&z, t, Duration::from_millis(500)).await;
    // Dials of an address nobody answers at last the handshake timeout (and the idle timeout,
    // quinn's bound on a handshake).
    let slow = Tuning {
        handshake_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(30),
        ..t
    };
    let echo = tcp_echo().await;
    let h1 = start_agent(
        &z,
        "home1",
        services(&[("echo", echo, ServiceProto::Tcp)]),
        vec![],
        slow,
    )
    .await;
    wait_until("home1 connected", WAIT, || gw.hub.agent("home1").is_some()).await;
    let link = h1.agent.links()[0].clone();
    let old_addr = z.gw_addr;
    gw.shutdown.cancel();
    gw.task.await.unwrap();
    // The old address swallows packets, as a VPS that is gone does (on loopback a closed port
    // answers with ICMP and the dial fails at once).
    // quinn lets go of the gateway's socket from its driver task, after the gateway ends (as
    // run_gateway's rebinding allows: up to 5 s).
    let mut silent = std::net::UdpSocket::bind(old_addr);
    for _ in 0..250 {
        if silent.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        silent = std::net::UdpSocket::bind(old_addr);
    }
    let silent = silent.expect("the old gateway's port comes free");
    wait_until("home1 lost its gateway", WAIT, || {
        link.status().state != "up"
    })
    .await;
    // Well into a dial of the old address.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (new_addr, moved) = z.move_gateway("gw");
    std::fs::write(z.bundle("gw").zone_config, &moved).unwrap();
    let gw = start_gateway(&z, t, Duration::from_millis(500)).await;
    std::fs::write(z.bundle("home1").zone_config, &moved).unwrap();
    // Adopted within two file polls (1 s), then one handshake on loopback; the dial of the
    // old address would end about 28 s from now (a busy machine is given WAIT).
    wait_until("home1 at the new address", WAIT, || {
        gw.hub.agent("home1").is_some()
    })
    .await;
    assert_eq!(link.addrs(), [new_addr]);
    drop(silent);
    gw.shutdown.cancel();
    h1.shutdown.cancel();
}

/// A zone.json copied into a running node's bundle is adopted like one a gateway passed on:
/// the node dials the gateway it adds and passes it to the gateways it knows (the way back for
/// a node that missed a move while away). A damaged copy changes nothing. (Nodes used to read
/// their zone.json only at start.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_adopts_a_zone_json_copied_into_its_bundle() {
    let mut z = TestZone::new(&["home1"]);
    let t = fast_tuning();
    let gw = start_gateway(&z, t, Duration::from_millis(500)).await;
    let h1 = start_echo_node(&z, &gw, "home1").await;
    let added = z.add_gateway("gw2");
    let gw2 = start_named_gateway(&z, "gw2", t).await;
    let serial = gw2.hub.creds().zone_serial();
    assert!(gw.hub.creds().zone_serial() < serial);

    std::fs::write(z.bundle("home1").zone_config, &added).unwrap();
    wait_until("home1 on the gateway its new zone.json adds", WAIT, || {
        gw2.hub.agent("home1").is_some()
    })
    .await;
    wait_until("the old gateway got the config from home1", WAIT, || {
        gw.hub.creds().zone_serial() == serial
    })
    .await;

    std::fs::write(z.bundle("home1").zone_config, b"{\"config\": 1").unwrap();
    // Nothing to wait for (a damaged copy changes nothing): the watcher polls every 500 ms
    // and reads a change once it held still for a poll, so 3 s is several chances to read
    // it on a slow machine (1.5 s could pass before the read).
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(h1.agent.links().len(), 2);
    assert_eq!(z.creds("gw2").zone_serial(), serial);
    assert!(gw.hub.agent("home1").is_some() && gw2.hub.agent("home1").is_some());
    gw.shutdown.cancel();
    gw2.shutdown.cancel();
    h1.shutdown.cancel();
}

/// A gateway given a new address (`zonegate device move`) keeps its nodes: they adopt the
/// config from it while it runs at the old address, and after it restarts at the new one they
/// dial that — no node restart, no bundle copied to a node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_moves_keeps_its_nodes() {
    let mut z = TestZone::new(&["home1"]);
    z.write_policy("apps.toml", "[app.echo]\ntcp = { listen = \"127.0.0.1:0\" }\nto = \"home1/echo\"\nallow = { from = [\"public\"] }\n");
    let t = fast_tuning();
    let old_addr = z.gw_addr;
    let gw = start_gateway(&z, t, Duration::from_millis(500)).await;
    let h1 = start_echo_node(&z, &gw, "home1").await;
    let link = h1.agent.links()[0].clone();
    assert_eq!(link.addrs(), [old_addr]);

    let (new_addr, moved) = z.move_gateway("gw");
    std::fs::write(z.bundle("gw").zone_config, moved).unwrap();
    wait_until("home1 knows the new address", WAIT, || {
        link.addrs() == [new_addr]
    })
    .await;
    // The connection at the old address stays until that gateway goes.
    assert_eq!(link.status().state, "up");
    assert_eq!(link.addr(), old_addr);
    gw.shutdown.cancel();
    gw.task.await.unwrap();

    let gw = start_gateway(&z, t, Duration::from_millis(500)).await;
    wait_until("home1 at the new address", Duration::from_secs(20), || {
        gw.hub.agent("home1").is_some()
    })
    .await;
    wait_until("home1's link up", WAIT, || link.status().state == "up").await;
    assert_eq!(link.addr(), new_addr);
    assert!(
        Arc::ptr_eq(&link, &h1.agent.links()[0]),
        "the link was kept, not replaced"
    );
    assert_eq!(
        roundtrip(gw.apps["echo"], b"moved").await.unwrap(),
        b"moved"
    );
    gw.shutdown.cancel();
    h1.shutdown.cancel();
}

/// One agent socket reaches IPv4 and IPv6 gateways: a node binds `[::]:0` with IPV6_V6ONLY
/// off (`transport::agent_endpoint`), and a gateway on `[::]` takes IPv4 agents too and reports
/// their address as written (`127.0.0.1:…`, not `[::ffff:127.0.0.1]:…`). The agent's socket
/// was IPv4 only: a gateway listed with IPv6 addresses only (an IPv6-only VPS) was unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_socket_reaches_ipv4_and_ipv6_gateways() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        crate::common::skip(
            "one_agent_socket_reaches_ipv4_and_ipv6_gateways",
            "needs an IPv6 loopback (::1)",
        );
        return;
    }
    let p4 = free_udp_port();
    let v4: std::net::SocketAddr = format!("127.0.0.1:{p4}").parse().unwrap();
    let v6: std::net::SocketAddr = format!("[::1]:{}", free_udp_port()).parse().unwrap();
    let z = TestZone::with_gateways_at(&[("gw", v4), ("gw6", v6)], &["home1"]);
    z.write_policy("apps.toml", "[app.echo]\ntcp = { listen = \"127.0.0.1:0\" }\nto = \"home1/echo\"\nallow = { from = [\"public\"] }\n");
    let t = fast_tuning();
    // Listed at 127.0.0.1, listening dual-stack: IPv4 agents arrive on an IPv6 socket.
    let gw = start_gateway_listening(&z, "gw", format!("[::]:{p4}").parse().unwrap(), t).await;
    let gw6 = start_named_gateway(&z, "gw6", t).await;

    let echo = tcp_echo().await;
    let creds = z.creds("home1");
    let endpoint = tunnel::transport::agent_endpoint(&creds, &t).unwrap();
    assert!(
        endpoint.local_addr().unwrap().is_ipv6(),
        "a dual-stack socket"
    );
    let agent = tunnel::agent::Agent::bind(
        tunnel::agent::AgentConfig {
            creds,
            services: services(&[("echo", echo, ServiceProto::Tcp)]),
            forwards: vec![],
            gateways: vec![],
            tuning: t,
        },
        endpoint,
    )
    .await
    .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(agent.clone().run(shutdown.clone()));
    wait_until("home1 on both gateways", WAIT, || {
        gw.hub.agent("home1").is_some() && gw6.hub.agent("home1").is_some()
    })
    .await;
    let seen = |hub: &tunnel::hub::Hub| {
        hub.status()[0]
            .addr
            .parse::<std::net::SocketAddr>()
            .unwrap()
    };
    assert_eq!(seen(&gw.hub).ip().to_string(), "127.0.0.1");
    assert_eq!(seen(&gw6.hub).ip().to_string(), "::1");
    wait_links_up(&agent).await;
    let observed: Vec<Option<String>> = agent
        .links()
        .iter()
        .map(|l| l.status().observed_addr)
        .collect();
    assert_eq!(
        observed,
        [
            Some(seen(&gw.hub).to_string()),
            Some(seen(&gw6.hub).to_string())
        ]
    );
    assert_eq!(
        roundtrip(gw.apps["echo"], b"over v4").await.unwrap(),
        b"over v4"
    );
    assert_eq!(
        roundtrip(gw6.apps["echo"], b"over v6").await.unwrap(),
        b"over v6"
    );
    shutdown.cancel();
    gw.shutdown.cancel();
    gw6.shutdown.cancel();
}

/// The gateway's public sockets on `[::]` — its defaults for HTTP, HTTPS and DNS where the
/// machine has IPv6, and what a tcp app may listen on — take IPv4 and IPv6 clients alike, as
/// the zone's DNS answers AAAA for a gateway's IPv6 address. They were bound `0.0.0.0`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_public_sockets_on_any_take_ipv4_and_ipv6() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        crate::common::skip(
            "the_gateways_public_sockets_on_any_take_ipv4_and_ipv6",
            "needs an IPv6 loopback (::1)",
        );
        return;
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let z = TestZone::new(&["home1"]);
    let port = free_tcp_port();
    z.write_policy("apps.toml", &format!("[app.echo]\ntcp = {{ listen = \"[::]:{port}\" }}\nto = \"home1/echo\"\nallow = {{ from = [\"public\"] }}\n"));
    let any: std::net::SocketAddr = "[::]:0".parse().unwrap();
    let mut opts = gateway_options(
        &z,
        "gw",
        z.gw_addr,
        fast_tuning(),
        Duration::from_millis(500),
        Some(any),
    );
    opts.http = Some(any);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let gw = gateway::Gateway::bind(opts, shutdown.clone())
        .await
        .unwrap();
    let (http, dns, app) = (
        gw.http_addr().unwrap(),
        gw.dns_addr().unwrap(),
        gw.app_addrs()["echo"],
    );
    let hub = gw.hub().clone();
    tokio::spawn(gw.run());
    let _h1 = start_agent(
        &z,
        "home1",
        services(&[("echo", tcp_echo().await, ServiceProto::Tcp)]),
        vec![],
        fast_tuning(),
    )
    .await;
    wait_until("home1 connected", WAIT, || hub.agent("home1").is_some()).await;

    for host in ["127.0.0.1", "[::1]"] {
        let at = |a: std::net::SocketAddr| -> std::net::SocketAddr {
            format!("{host}:{}", a.port()).parse().unwrap()
        };
        // HTTP: the front answers (no app for this host).
        let mut c = tokio::net::TcpStream::connect(at(http)).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: nowhere.example\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        c.read_to_end(&mut answer).await.unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 404"),
            "{host}: {}",
            String::from_utf8_lossy(&answer)
        );
        // A tcp app on [::].
        assert_eq!(
            roundtrip(at(app), host.as_bytes()).await.unwrap(),
            host.as_bytes()
        );
        // DNS over UDP: the zone's SOA.
        let q = tokio::net::UdpSocket::bind(format!("{host}:0"))
            .await
            .unwrap();
        let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["alice", "example"] {
            query.push(label.len() as u8);
            query.extend_from_slice(label.as_bytes());
        }
        query.extend_from_slice(&[0, 0, 6, 0, 1]);
        q.send_to(&query, at(dns)).await.unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(WAIT, q.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 12 && buf[..2] == [0x12, 0x34],
            "{host}: {:?}",
            &buf[..n]
        );
        assert_eq!(buf[3] & 0x0f, 0, "{host}: rcode");
        assert!(
            u16::from_be_bytes([buf[6], buf[7]]) >= 1,
            "{host}: an answer"
        );
    }
    shutdown.cancel();
}

/// The first datagram of a new UDP flow reaches the service: it can arrive at the agent
/// before the control stream's flow open (two tasks; a datagram is not ordered with a stream),
/// and was dropped then — a DNS query, a VPN's handshake packet lost, the client's retry
/// seconds later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_datagram_of_every_new_flow_arrives() {
    let z = TestZone::new(&["home1"]);
    let uecho = udp_echo().await;
    let (gw, _h1) = gateway_and_home1_offering(&z, "uecho", uecho, ServiceProto::Udp).await;
    let mut lost = 0;
    for i in 0..100u16 {
        let origin = tunnel::proto::Origin::Public(([192, 0, 2, 7], 5000 + i).into());
        let (flow, mut rx) = gw
            .hub
            .open_udp_flow("home1", "uecho", "uecho", origin)
            .await
            .unwrap();
        flow.send(b"first").unwrap();
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(b)) => assert_eq!(&b[..], b"first"),
            _ => lost += 1,
        }
    }
    assert_eq!(lost, 0, "first datagrams of 100 new flows lost");
    gw.shutdown.cancel();
}

/// A zone whose home1 offers a UDP echo (`uecho`), its gateway and agent with these tunings,
/// and one flow open to it from the gateway (a public client 192.0.2.7:5000).
async fn uecho_flow(
    gw_tuning: Tuning,
    node_tuning: Tuning,
) -> (
    TestZone,
    RunningGateway,
    RunningAgent,
    tunnel::hub::UdpFlow,
    tokio::sync::mpsc::Receiver<bytes::Bytes>,
) {
    let z = TestZone::new(&["home1"]);
    let uecho = udp_echo().await;
    let gw = start_gateway(&z, gw_tuning, Duration::from_millis(500)).await;
    let h1 = start_agent(
        &z,
        "home1",
        services(&[("uecho", uecho, ServiceProto::Udp)]),
        vec![],
        node_tuning,
    )
    .await;
    wait_until("home1 connected", WAIT, || gw.hub.agent("home1").is_some()).await;
    let origin = tunnel::proto::Origin::Public(([192, 0, 2, 7], 5000).into());
    let (flow, rx) = gw
        .hub
        .open_udp_flow("home1", "uecho", "uecho", origin)
        .await
        .unwrap();
    (z, gw, h1, flow, rx)
}

/// A node keeps its end of a UDP flow as long as the gateway keeps its own: the gateway says
/// how long (`UdpFlowIdle`). A node that closed it after its own, shorter, setting turned the
/// gateway's next datagram into a new flow, from a new port to the service (a DTLS or game
/// session broken).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_keeps_a_quiet_udp_flow_as_long_as_the_gateway_does() {
    let mut gw_tuning = fast_tuning();
    gw_tuning.udp_flow_idle = Duration::from_secs(5);
    let mut node_tuning = fast_tuning();
    node_tuning.udp_flow_idle = Duration::from_secs(1);
    let (_z, gw, _h1, flow, mut rx) = uecho_flow(gw_tuning, node_tuning).await;
    flow.send(b"one").unwrap();
    let got = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got[..], b"one");
    // Quiet for longer than the node's own setting, shorter than the gateway's.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(flow.is_alive(), "the node closed a flow the gateway keeps");
    flow.send(b"two").unwrap();
    let got = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got[..], b"two");
    gw.shutdown.cancel();
}

/// Datagrams from a service that a flow's reader is too far behind to take are dropped, as
/// UDP may, and counted for the flow's done line (they were dropped uncounted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_past_a_flows_queue_are_counted_as_dropped() {
    let (_z, gw, _h1, flow, mut rx) = uecho_flow(fast_tuning(), fast_tuning()).await;
    // Nothing reads `rx` while the echoes come back: the queue fills, the rest is dropped.
    // Twice the queue, and more while none is counted dropped: a busy machine's socket
    // buffers on the way may lose some datagrams before they reach the queue.
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < 2 * tunnel::hub::UDP_FLOW_QUEUE as u64 || flow.queue_drops() == 0 {
        assert!(
            started.elapsed() < WAIT,
            "no echo past the queue counted after {sent} datagrams"
        );
        flow.send(format!("d{sent}").as_bytes()).unwrap();
        sent += 1;
        if sent.is_multiple_of(32) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut queued = 0u64;
    while rx.try_recv().is_ok() {
        queued += 1;
    }
    assert_eq!(queued, tunnel::hub::UDP_FLOW_QUEUE as u64);
    let dropped = flow.queue_drops();
    assert!(
        queued + dropped <= sent,
        "{queued} queued + {dropped} dropped of {sent}"
    );
    gw.shutdown.cancel();
}

/// The kernel's view of the IPv4 TCP sockets matching `pick(local port, remote port)`: the
/// timer each runs (`/proc/net/tcp`: 0 none, 1 retransmit, 2 keepalive) and seconds until it
/// fires.
fn tcp_timers(pick: impl Fn(u16, u16) -> bool) -> Vec<(u8, f64)> {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let port = |field: &str| {
        field
            .rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
            .unwrap_or(0)
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // sl local rem st tx:rx tr:when ...; state 01 is ESTABLISHED.
            if f.len() < 6 || f[3] != "01" || !pick(port(f[1]), port(f[2])) {
                return None;
            }
            let (tr, when) = f[5].split_once(':')?;
            let ticks = u64::from_str_radix(when, 16).ok()?;
            // Clock ticks of USER_HZ, 100 on Linux.
            Some((u8::from_str_radix(tr, 16).ok()?, ticks as f64 / 100.0))
        })
        .collect()
}

/// Proxied TCP connections' clients are probed by TCP keepalive after `tcp_keepalive` of
/// silence: the kernel runs a keepalive timer on the gateway's end of a tcp app's client
/// (set on the listener, inherited by what it accepts). A client that vanished without
/// closing (a phone leaving Wi-Fi) used to hold its connection, its tunnel stream and the
/// service's end for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_tcp_connections_are_probed_by_keepalive() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let z = TestZone::new(&["home1"]);
    let port = free_tcp_port();
    z.write_policy("a.toml", &tcp_app("echo", port));
    let keepalive = Duration::from_secs(37);
    let t = Tuning {
        tcp_keepalive: Some(keepalive),
        ..fast_tuning()
    };
    let gw = start_gateway(&z, t, Duration::from_millis(500)).await;
    let echo = tcp_echo().await;
    let _h1 = start_agent(
        &z,
        "home1",
        services(&[("echo", echo, ServiceProto::Tcp)]),
        vec![],
        t,
    )
    .await;
    wait_until("home1 connected", WAIT, || gw.hub.agent("home1").is_some()).await;
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    c.write_all(b"hi").await.unwrap();
    let mut buf = [0u8; 2];
    c.read_exact(&mut buf).await.unwrap();
    let client = c.local_addr().unwrap().port();
    let within = keepalive.as_secs_f64() + 1.0;
    // Polled: a socket with data not yet acknowledged (a delayed ACK) runs its retransmit
    // timer first, and the keepalive timer once the data is acknowledged.
    let keepalive_runs = |pick: &dyn Fn(u16, u16) -> bool| {
        let t = tcp_timers(pick);
        t.len() == 1 && t[0].0 == 2 && t[0].1 <= within
    };
    wait_until(
        "the gateway's end of the client's connection runs a keepalive timer",
        WAIT,
        || keepalive_runs(&|l, r| l == port && r == client),
    )
    .await;
    // The device's end towards a service on its own host is not probed (set per connection,
    // four system calls each; the host's kernel closes what a dead service held). One on
    // another host (a NAS) is: not tested here, this test has loopback only.
    let service_end = tcp_timers(|_, r| r == echo.port());
    assert_eq!(service_end.len(), 1, "{service_end:?}");
    assert_ne!(service_end[0].0, 2, "{service_end:?}");
    // The client's own socket is left as its program set it: no timer here.
    let client_end = tcp_timers(|l, r| l == client && r == port);
    assert_eq!(client_end.len(), 1);
    assert_ne!(client_end[0].0, 2, "{client_end:?}");
    gw.shutdown.cancel();
}

/// A node agent told to stop lets the streams it serves finish (its gateway sends it no new
/// ones meanwhile), and stops once they have: a restart of the node cut every download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_node_lets_its_open_connections_finish() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let z = TestZone::new(&["home1"]);
    z.write_policy("a.toml", &tcp_app("echo", 0));
    let gw = start_gateway(&z, fast_tuning(), Duration::from_secs(1)).await;
    let echo = tcp_echo().await;
    let tuning = Tuning {
        agent_drain: Duration::from_secs(20),
        ..fast_tuning()
    };
    let h1 = start_agent(
        &z,
        "home1",
        services(&[("echo", echo, ServiceProto::Tcp)]),
        vec![],
        tuning,
    )
    .await;
    wait_until("home1 connected", WAIT, || gw.hub.agent("home1").is_some()).await;
    let app = gw.apps["echo"];
    let mut open = tokio::net::TcpStream::connect(app).await.unwrap();
    open.write_all(b"before").await.unwrap();
    let mut got = [0u8; 6];
    open.read_exact(&mut got).await.unwrap();

    h1.shutdown.cancel();
    wait_until("the gateway told home1 offers nothing", WAIT, || {
        roundtrip_refused(app)
    })
    .await;
    // Refused by the gateway as stopping (an HTTP client gets 503 "is stopping; try again"),
    // not as a service home1 does not offer, which sent owners looking for a typo. (Until the
    // gateway has home1's withdrawal, home1 refuses streams itself, as draining.)
    wait_until("the gateway has home1's withdrawal", WAIT, || {
        gw.hub
            .agent("home1")
            .is_some_and(|a| a.services.read().unwrap().is_empty())
    })
    .await;
    let e = open_refused(&gw.hub, "home1", "echo", "echo").await;
    assert!(
        matches!(&e, tunnel::OpenError::Refused { code: tunnel::proto::RefuseCode::Draining, reason, .. } if reason.contains("home1 is stopping")),
        "{e}"
    );
    // The open connection still carries data both ways.
    open.write_all(b"during").await.unwrap();
    tokio::time::timeout(WAIT, open.read_exact(&mut got))
        .await
        .expect("the open stream goes on")
        .unwrap();
    assert_eq!(&got, b"during");
    assert!(!h1.task.is_finished(), "stopped before its stream ended");
    // Once it ends, the agent stops, well before its 20 s.
    drop(open);
    tokio::time::timeout(Duration::from_secs(10), h1.task)
        .await
        .expect("the agent stopped once its streams ended")
        .unwrap();
    gw.shutdown.cancel();
}

/// A node stopping soon after an HTTP request through the front is not held by the idle
/// upstream connection the gateway kept for the next request: the gateway drops it once the
/// device says it is stopping. The node waited out its whole drain (then warned of a cut
/// stream) whenever it was restarted within 30 s of a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_node_is_not_held_by_an_idle_pooled_http_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A keep-alive HTTP service: every request head gets a 2-byte answer.
    let web = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let web_addr = web.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = web.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while let Ok(n) = c.read(&mut chunk).await {
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if c.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let z = TestZone::new(&["home1"]);
    z.write_policy(
        "web.toml",
        "[app.web]\nhttp = { host = \"web.example\" }\nto = \"home1/web\"\nallow = { from = [\"public\"] }\n",
    );
    let mut opts = gateway_options(
        &z,
        "gw",
        z.gw_addr,
        fast_tuning(),
        Duration::from_secs(1),
        None,
    );
    opts.http = Some("127.0.0.1:0".parse().unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let gw = gateway::Gateway::bind(opts, shutdown.clone())
        .await
        .unwrap();
    let (http, hub, admin) = (gw.http_addr().unwrap(), gw.hub().clone(), gw.admin_addr());
    tokio::spawn(gw.run());
    let tuning = Tuning {
        agent_drain: Duration::from_secs(30),
        ..fast_tuning()
    };
    let h1 = start_agent(
        &z,
        "home1",
        services(&[("web", web_addr, ServiceProto::Tcp)]),
        vec![],
        tuning,
    )
    .await;
    wait_until("home1 connected", WAIT, || hub.agent("home1").is_some()).await;
    let mut c = tokio::net::TcpStream::connect(http).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: web.example\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, c.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    // The upstream connection went back to the pool: the node serves one stream, idle.
    let deadline = std::time::Instant::now() + WAIT;
    while !admin_get(admin, "/metrics")
        .await
        .contains("zonegate_http_pool_idle 1\n")
    {
        assert!(std::time::Instant::now() < deadline, "never pooled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h1.shutdown.cancel();
    tokio::time::timeout(WAIT, h1.task)
        .await
        .expect("the node waited its drain out for an idle pooled connection")
        .unwrap();
    shutdown.cancel();
}

/// A stopping node waits for the gateway to acknowledge the end of an answer its service
/// has finished writing: the stream's task ended as soon as quinn had the bytes, and the
/// close that ends the stop threw away what was still unsent (a download cut on a slow
/// uplink). Here the path goes silent while the answer is written, and comes back during
/// the stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_node_delivers_the_end_of_a_finished_answer() {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const ANSWER: usize = 1 << 20;
    let z = TestZone::new(&["home1"]);
    z.write_policy("a.toml", &tcp_app("echo", 0));
    let t = Tuning {
        keepalive: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(10),
        ..fast_tuning()
    };
    let gw = start_gateway(&z, t, Duration::from_secs(1)).await;
    // The service: reads the request to its end, waits for the word, answers 1 MiB, closes.
    let service = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service_addr = service.local_addr().unwrap();
    let (asked_tx, asked_rx) = tokio::sync::oneshot::channel::<()>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let (written_tx, written_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut s, _) = service.accept().await.unwrap();
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.unwrap();
        let _ = asked_tx.send(());
        let _ = go_rx.await;
        s.write_all(&vec![7u8; ANSWER]).await.unwrap();
        s.shutdown().await.unwrap();
        let _ = written_tx.send(());
    });
    // The node reaches the gateway through a UDP relay that can go silent.
    let (relay_addr, silent) = udp_relay(z.gateways[0].1).await;
    let h1 = start_agent_via(
        &z,
        "home1",
        services(&[("echo", service_addr, ServiceProto::Tcp)]),
        vec![],
        Tuning {
            agent_drain: Duration::from_secs(20),
            ..t
        },
        vec![("gw".into(), relay_addr)],
    )
    .await;
    wait_until("home1 connected", WAIT, || gw.hub.agent("home1").is_some()).await;
    let mut c = tokio::net::TcpStream::connect(gw.apps["echo"])
        .await
        .unwrap();
    c.write_all(b"GET it").await.unwrap();
    c.shutdown().await.unwrap();
    tokio::time::timeout(WAIT, asked_rx)
        .await
        .expect("the request reached the service")
        .unwrap();
    // Silent path; the service answers whole; quinn holds the answer, unsent or unacked.
    silent.store(true, Ordering::Relaxed);
    let _ = go_tx.send(());
    tokio::time::timeout(WAIT, written_rx)
        .await
        .expect("the service wrote its answer")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    h1.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(700)).await;
    silent.store(false, Ordering::Relaxed);
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, c.read_to_end(&mut got))
        .await
        .expect("the answer ended")
        .expect("the answer ended cleanly");
    assert_eq!(
        got.len(),
        ANSWER,
        "the end of the answer was lost in the stop"
    );
    tokio::time::timeout(Duration::from_secs(10), h1.task)
        .await
        .expect("the agent stopped once its answer was delivered")
        .unwrap();
    gw.shutdown.cancel();
}

/// A tcp app's connection refused by its connection limit spends none of its rate: a client
/// at its `max_connections_per_client` that retried had spent its rate once its connection
/// ended, and was refused by that too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_refused_by_the_connection_limit_spend_no_rate() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let z = TestZone::new(&["home1"]);
    z.write_policy(
        "a.toml",
        &(tcp_app("echo", 0)
            + "limits = { rate = \"1/h\", burst = 2, max_connections_per_client = 1 }\n"),
    );
    let gw = start_gateway(&z, fast_tuning(), Duration::from_secs(1)).await;
    let _h1 = start_echo_node(&z, &gw, "home1").await;
    let app = gw.apps["echo"];
    // One connection open (the burst's first token), echoing.
    let mut held = tokio::net::TcpStream::connect(app).await.unwrap();
    held.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    held.read_exact(&mut b).await.unwrap();
    // Three more while it is open: refused by the connection limit.
    for i in 0..3 {
        assert!(
            tokio::task::spawn_blocking(move || roundtrip_refused(app))
                .await
                .unwrap(),
            "connection {i} beside the open one"
        );
    }
    drop(held);
    // Its slot comes back as the gateway sees it close; then the burst's second token lets
    // one more in (each try before refused by the connection limit alone).
    let start = Instant::now();
    while tokio::task::spawn_blocking(move || roundtrip_refused(app))
        .await
        .unwrap()
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "refused after the open connection ended: the refusals spent the rate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.shutdown.cancel();
}

/// Whether a new connection to `app` is closed without an echo.
fn roundtrip_refused(app: std::net::SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut c) = std::net::TcpStream::connect(app) else {
        return true;
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    if c.write_all(b"x").is_err() {
        return true;
    }
    let mut b = [0u8; 1];
    !matches!(c.read(&mut b), Ok(1))
}

/// An app's byte counts grow as a connection carries data, not only once it ends: a
/// two-day SSH session showed nothing in /status until it closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_connection_is_counted_as_it_goes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let z = TestZone::new(&["home1"]);
    z.write_policy("a.toml", &tcp_app("echo", 0));
    let gw = start_gateway(&z, fast_tuning(), Duration::from_secs(1)).await;
    let _h1 = start_echo_node(&z, &gw, "home1").await;
    let mut c = tokio::net::TcpStream::connect(gw.apps["echo"])
        .await
        .unwrap();
    let data = vec![5u8; 100_000];
    c.write_all(&data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    c.read_exact(&mut back).await.unwrap();
    let counts = || {
        let active = gw.hub.policy().current();
        let snap = active.snapshot();
        let echo = &snap.iter().find(|(n, _)| n == "echo").unwrap().1;
        (echo.bytes_in, echo.bytes_out)
    };
    wait_until("the open connection counted", WAIT, || {
        let (bytes_in, bytes_out) = counts();
        bytes_in >= 100_000 && bytes_out >= 100_000
    })
    .await;
    // Closed: counted once, not again.
    drop(c);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(counts(), (100_000, 100_000));
    gw.shutdown.cancel();
}

/// A QUIC endpoint that stops accepting by itself (quinn's driver ended on a UDP error) ends
/// the hub's serve with that reason and cancels the process's shutdown token, so the gateway
/// drains and exits with an error (run.rs) instead of running on unreachable and exiting 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_stops_by_itself_stops_the_hub_with_its_reason() {
    let z = TestZone::new(&["home1"]);
    let creds = z.creds("gw");
    let tuning = fast_tuning();
    let policy = Arc::new(policies::PolicyStore::load(&z.policy_dir()).expect("policy loads"));
    let hub = tunnel::hub::Hub::new(tunnel::hub::HubConfig {
        creds: creds.clone(),
        policy,
        local: Arc::new(tunnel::services::LocalServices::default()),
        tuning,
    });
    let endpoint =
        tunnel::transport::server_endpoint("127.0.0.1:0".parse().unwrap(), &creds, &tuning)
            .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn({
        let (hub, endpoint, shutdown) = (hub.clone(), endpoint.clone(), shutdown.clone());
        async move {
            hub.serve(endpoint, shutdown, Duration::from_millis(100))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!serving.is_finished());
    endpoint.close(0u32.into(), b"gone");
    let served = tokio::time::timeout(WAIT, serving).await.unwrap().unwrap();
    assert_eq!(served, tunnel::hub::Served::EndpointEnded);
    assert!(shutdown.is_cancelled());
}

/// A node whose QUIC endpoint stops by itself (quinn's driver ends on a failed receive: its
/// socket is gone) stops, saying why, for its service manager to restart (exit 1): it stayed
/// up, every dial failing, cut off for good while looking healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_endpoint_stops_by_itself_stops() {
    let z = TestZone::new(&["home1"]);
    let t = fast_tuning();
    let gw = start_gateway(&z, t, Duration::from_millis(500)).await;
    let creds = z.creds("home1");
    let endpoint =
        tunnel::transport::client_endpoint("127.0.0.1:0".parse().unwrap(), &creds, &t).unwrap();
    let agent = tunnel::agent::Agent::bind(
        tunnel::agent::AgentConfig {
            creds,
            services: services(&[]),
            forwards: vec![],
            gateways: vec![],
            tuning: t,
        },
        endpoint.clone(),
    )
    .await
    .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(agent.clone().run(shutdown.clone()));
    wait_until("home1 connected", WAIT, || gw.hub.agent("home1").is_some()).await;
    // What its driver's end looks like from here: accepts end, dials fail.
    endpoint.close(0u32.into(), b"socket failed");
    tokio::time::timeout(WAIT, run)
        .await
        .expect("the node went on without its endpoint")
        .unwrap();
    let why = agent.broke().expect("said why");
    assert!(why.contains("QUIC endpoint stopped"), "{why}");
    gw.shutdown.cancel();
}

/// A connection still open when the gateway's drain runs out of grace is logged as cut by
/// the gateway, before the gateway stops: it was cut by the endpoint's close and its line
/// never came (the process ended first) or blamed the tunnel.
#[tokio::test(flavor = "current_thread")]
async fn connections_a_drain_cuts_are_logged_as_cut_by_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (logs, _guard) = capture_logs();
    let z = TestZone::new(&["home1"]);
    z.write_policy("a.toml", &tcp_app("echo", 0));
    let gw = start_gateway(&z, fast_tuning(), Duration::from_millis(300)).await;
    let _h1 = start_echo_node(&z, &gw, "home1").await;
    let mut open = tokio::net::TcpStream::connect(gw.apps["echo"])
        .await
        .unwrap();
    open.write_all(b"held").await.unwrap();
    let mut got = [0u8; 4];
    open.read_exact(&mut got).await.unwrap();
    gw.shutdown.cancel();
    tokio::time::timeout(WAIT, gw.task)
        .await
        .expect("the gateway stopped")
        .unwrap();
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let cut = text
        .lines()
        .position(|l| {
            l.contains("connection cut")
                && l.contains("app=echo")
                && l.contains(tunnel::hub::GRACE_CUT)
        })
        .unwrap_or_else(|| panic!("no line for the cut connection:\n{text}"));
    // The hub's own line: an agent's "tunnel down … reason=gateway drained" may come first.
    let drained = text
        .lines()
        .position(|l| l.contains("tunnel::hub") && l.contains(" drained device="))
        .unwrap_or_else(|| panic!("no drained line:\n{text}"));
    assert!(cut < drained, "{text}");
}
