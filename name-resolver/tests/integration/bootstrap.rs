//! Zone-config bootstrap over DNS: success, and every refusal a node must make.

use name_resolver::{fetch_zone, testzone, Blame, BootstrapError, DnsServer, ZoneRecords};
use zone_core::{Domain, ZoneKey};

use crate::common::Running;

fn domain() -> Domain {
    Domain::new(testzone::DOMAIN).unwrap()
}

#[tokio::test]
async fn bootstrap_fetches_and_verifies_through_the_pinned_ca() {
    let (key, zone) = testzone::zone_with(5, |_| {});
    let s = Running::start(zone.clone()).await;
    // The node pins the zone CA certificate, as `--ca zone-ca.crt` does.
    let ca_pem =
        zone_core::cert::make_ca(&key, &domain(), time::OffsetDateTime::now_utc()).unwrap();
    let ca_der = zone_core::cert::parse_pem_certs(&ca_pem).unwrap().remove(0);
    let pinned = zone_core::cert::ca_public_key(&ca_der).unwrap();
    // The TXT set is larger than a UDP answer: this goes UDP, TC, then TCP.
    let got = fetch_zone(&domain(), s.addr, &pinned, None).await.unwrap();
    assert_eq!(got, zone);
    let gateways: Vec<String> = got
        .config
        .gateway_addrs()
        .iter()
        .map(|(_, a)| a.to_string())
        .collect();
    assert_eq!(
        gateways,
        [
            "203.0.113.10:4433",
            "[2001:db8::10]:4433",
            "203.0.113.11:4433"
        ]
    );
    // Same serial as known is fine (a restart re-fetching).
    fetch_zone(&domain(), s.addr, &pinned, Some(5))
        .await
        .unwrap();
    s.stop().await;
}

#[tokio::test]
async fn forged_txt_is_refused() {
    let (key, zone) = testzone::zone();
    // A server that rewrites a gateway address but cannot re-sign.
    let mut forged = zone.clone();
    forged.config.gateways[0].addrs[0] = "198.51.100.66:4433".parse().unwrap();
    let s = Running::start(forged).await;
    let e = fetch_zone(&domain(), s.addr, &key.verifying_key(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, BootstrapError::Forged { .. }), "{e}");
    assert_eq!(e.blame(), Blame::Answer);
    assert!(e.to_string().contains("does not verify"), "{e}");
    s.stop().await;

    // A zone signed by someone else's key for the same domain.
    let (_, other) = testzone::zone();
    let s = Running::start(other).await;
    let e = fetch_zone(&domain(), s.addr, &key.verifying_key(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, BootstrapError::Forged { .. }), "{e}");
    assert!(e.to_string().contains("another zone"), "{e}");
    s.stop().await;
}

#[tokio::test]
async fn truncated_txt_is_refused() {
    let (key, zone) = testzone::zone();
    let mut txt = zone_core::txt::to_txt(&zone);
    assert!(txt.len() > 2);
    txt.remove(1);
    let s = Running::start_records(ZoneRecords::with_txt(&zone, &txt).unwrap()).await;
    let e = fetch_zone(&domain(), s.addr, &key.verifying_key(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, BootstrapError::Malformed { .. }), "{e}");
    assert!(e.to_string().contains("truncated"), "{e}");
    s.stop().await;
}

#[tokio::test]
async fn stale_serial_is_refused() {
    let key = ZoneKey::generate();
    let old = testzone::config(&key, 3, 3).sign(&key).unwrap();
    let s = Running::start(old).await;
    let e = fetch_zone(&domain(), s.addr, &key.verifying_key(), Some(5))
        .await
        .unwrap_err();
    assert!(matches!(e, BootstrapError::Stale { .. }), "{e}");
    assert!(e.to_string().contains("older than"), "{e}");
    s.stop().await;
}

#[tokio::test]
async fn wrong_domain_and_wrong_server_are_refused() {
    let (key, zone) = testzone::zone();
    let s = Running::start(zone).await;
    let bob = Domain::new("bob.example").unwrap();
    let e = fetch_zone(&bob, s.addr, &key.verifying_key(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, BootstrapError::Rcode { .. }), "{e}");
    assert_eq!(e.blame(), Blame::Server);
    assert!(e.to_string().contains("not authoritative"), "{e}");
    s.stop().await;
}

/// An error answered over UDP (a network that answers port 53 itself, a forged answer) is
/// asked again over TCP, which the real server answers: the node bootstraps. Before, the
/// UDP answer was the last word and a node without a zone.json could not start.
#[tokio::test]
async fn an_error_answered_over_udp_is_asked_again_over_tcp() {
    let (key, zone) = testzone::zone();
    // UDP port P answers REFUSED to everything; the real server has TCP port P.
    let (fake, server) = udp_impostor_and_tcp_server().await;
    let addr = server.tcp_addr();
    let refusing = tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        let mut answered = 0u32;
        while let Ok((n, from)) = fake.recv_from(&mut buf).await {
            // The query back, as a response, RCODE REFUSED.
            buf[2] |= 0x80;
            buf[3] = (buf[3] & 0xf0) | 5;
            fake.send_to(&buf[..n], from).await.unwrap();
            answered += 1;
            if answered == 1 {
                return answered;
            }
        }
        answered
    });
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(server.run(move || std::sync::Arc::new(zone.clone()), stop.clone()));
    let got = fetch_zone(&domain(), addr, &key.verifying_key(), None)
        .await
        .expect("TCP's answer was not asked for");
    assert_eq!(got.config.domain, domain());
    assert_eq!(refusing.await.unwrap(), 1, "UDP was not asked first");
    stop.cancel();
    serving.await.unwrap().unwrap();
}

/// A UDP answer holding TXT strings that are no valid config (cut by a middlebox without the
/// TC bit, a captive portal's, forged on the path) is asked again over TCP, which the real
/// server answers: the node bootstraps. Before, only error and empty UDP answers were.
#[tokio::test]
async fn a_refused_config_answered_over_udp_is_asked_again_over_tcp() {
    use hickory_proto::op::{Message, MessageType};
    use hickory_proto::rr::{rdata::TXT, RData, Record};
    let (key, zone) = testzone::zone();
    // UDP port P answers a TXT of junk to everything; the real server has TCP port P.
    let (fake, server) = udp_impostor_and_tcp_server().await;
    let addr = server.tcp_addr();
    let forging = tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        let (n, from) = fake.recv_from(&mut buf).await.unwrap();
        let query = Message::from_vec(&buf[..n]).unwrap();
        let mut answer = query.clone();
        answer.set_message_type(MessageType::Response);
        let name = query.queries()[0].name().clone();
        answer.add_answer(Record::from_rdata(
            name,
            60,
            RData::TXT(TXT::new(vec!["zg1 not a config".into()])),
        ));
        fake.send_to(&answer.to_vec().unwrap(), from).await.unwrap();
    });
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(server.run(move || std::sync::Arc::new(zone.clone()), stop.clone()));
    let got = fetch_zone(&domain(), addr, &key.verifying_key(), None)
        .await
        .expect("TCP's answer was not asked for");
    assert_eq!(got.config.domain, domain());
    forging.await.expect("UDP was not asked first");
    stop.cancel();
    serving.await.unwrap().unwrap();
}

/// A UDP socket on some port P that the test answers from (an impostor), and the real server
/// with its TCP on port P (its UDP elsewhere).
async fn udp_impostor_and_tcp_server() -> (tokio::net::UdpSocket, DnsServer) {
    loop {
        let fake = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = fake.local_addr().unwrap().port();
        let tcp = format!("127.0.0.1:{port}").parse().unwrap();
        if let Ok(server) = DnsServer::bind("127.0.0.1:0".parse().unwrap(), tcp).await {
            return (fake, server);
        }
    }
}

#[tokio::test]
async fn unreachable_server_is_a_network_error() {
    // A port nobody answers on, kept reserved (a released one could be taken by another
    // test meanwhile): a UDP socket that never answers (silence, as the port was before:
    // the query times out) and a TCP socket bound but not listening (a connection is
    // refused). No SO_REUSEADDR on the TCP one: nothing else may bind the port.
    let (addr, _udp, _tcp) = loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = tokio::net::TcpSocket::new_v4().unwrap();
        if tcp.bind(addr).is_ok() {
            break (addr, udp, tcp);
        }
    };
    let (key, _) = testzone::zone();
    let e = fetch_zone(&domain(), addr, &key.verifying_key(), None)
        .await
        .unwrap_err();
    assert_eq!(e.blame(), Blame::Network, "{e}");
    // Both tries are told: UDP's silence and TCP's refusal.
    let text = e.to_string();
    assert!(text.contains("UDP") && text.contains("TCP"), "{text}");
}
