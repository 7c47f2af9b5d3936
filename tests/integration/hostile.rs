//! Hostile input on the gateway's public ports: garbage on the QUIC and DNS ports, and an
//! authenticated device that speaks garbage. Connected agents must keep working throughout.

use std::time::Duration;

use crate::inproc::*;

const WAIT: Duration = Duration::from_secs(10);

fn echo_policy() -> &'static str {
    "[app.echo]\ntcp = { listen = \"127.0.0.1:0\" }\nto = \"home1/echo\"\nallow = { from = [\"public\"] }\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_on_quic_and_dns_ports_change_nothing() {
    let z = TestZone::new(&["home1"]);
    z.write_policy("apps.toml", echo_policy());
    let dns_port = {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        u.local_addr().unwrap().port()
    };
    let dns: std::net::SocketAddr = ([127, 0, 0, 1], dns_port).into();
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
    assert_eq!(
        roundtrip(gw.apps["echo"], b"after the storm")
            .await
            .unwrap(),
        b"after the storm"
    );
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
    let z = TestZone::new(&["home1", "home2"]);
    z.write_policy("apps.toml", echo_policy());
    let gw = start_gateway(&z, fast_tuning(), Duration::from_millis(500)).await;
    let _h1 = start_echo_node(&z, &gw, "home1").await;

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
    assert_eq!(
        roundtrip(gw.apps["echo"], b"still here").await.unwrap(),
        b"still here"
    );
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_streams_from_one_agent_leave_others_served() {
    use tunnel::control::ControlIo;
    use tunnel::proto::{ControlSession, Event, Hello, StreamHeader};
    let z = TestZone::new(&["home1", "home2"]);
    z.write_policy("apps.toml", echo_policy());
    let gw = start_gateway(&z, fast_tuning(), Duration::from_millis(500)).await;
    let _h1 = start_echo_node(&z, &gw, "home1").await;

    // home2 says a proper hello, then opens 10,000 streams that never finish their header.
    let creds = z.creds("home2");
    let ep =
        tunnel::transport::client_endpoint("127.0.0.1:0".parse().unwrap(), &creds, &fast_tuning())
            .unwrap();
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
        services: vec![],
        zone_serial: creds.zone_serial(),
        zone_config: None,
        agent_version: "hostile".into(),
    };
    let mut io = ControlIo::new(send, recv, ControlSession::agent(hello));
    io.flush().await.unwrap();
    let ev = tokio::time::timeout(WAIT, io.next_event())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(ev, Some(Event::Welcome(_))), "{ev:?}");
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
                    tokio::time::sleep(Duration::from_secs(3)).await;
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
    let (opened, _tasks) = flood.await.unwrap();
    assert!(
        opened <= tunnel::transport::MAX_STREAMS_PER_CONNECTION + 100,
        "the gateway let {opened} streams open at once"
    );
    eprintln!("hostile agent opened {opened} streams before the gateway's limit held it");
    assert!(
        opened >= 1000,
        "the flood never really started ({opened} streams)"
    );
    assert_eq!(
        roundtrip(gw.apps["echo"], b"after").await.unwrap(),
        b"after"
    );
    gw.shutdown.cancel();
}
