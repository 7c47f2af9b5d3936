//! A new zone serial is served without a restart.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_client::client::{Client, ClientHandle};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use hickory_proto::runtime::TokioRuntimeProvider;
use hickory_proto::udp::UdpClientStream;
use name_resolver::testzone;

use crate::common::{run_tool, short_lines, Running};

async fn query(addr: SocketAddr, name: &str, t: RecordType) -> hickory_proto::xfer::DnsResponse {
    let conn = UdpClientStream::builder(addr, TokioRuntimeProvider::new()).build();
    let (mut client, bg) = Client::connect(conn).await.unwrap();
    let bg = tokio::spawn(bg);
    let r = client
        .query(Name::from_ascii(name).unwrap(), DNSClass::IN, t)
        .await
        .unwrap();
    bg.abort();
    r
}

async fn soa_serial(addr: SocketAddr) -> u32 {
    let r = query(addr, "alice.example.", RecordType::SOA).await;
    assert!(r.header().authoritative());
    match r.answers().first().map(|a| a.data()) {
        Some(RData::SOA(soa)) => soa.serial(),
        other => panic!("no SOA: {other:?}"),
    }
}

#[tokio::test]
async fn serial_change_is_followed_without_restart() {
    let key = zone_core::ZoneKey::generate();
    let z1 = testzone::config(&key, 1, 3).sign(&key).unwrap();
    let s = Running::start(z1).await;
    assert_eq!(soa_serial(s.addr).await, 1);
    // home4 is not a device yet: the wildcard covers it and any name below it.
    let below = query(s.addr, "x.home4.alice.example.", RecordType::A).await;
    assert!(
        !below.answers().is_empty(),
        "wildcard covers x.home4 while home4 is unknown"
    );

    let z2 = testzone::config(&key, 2, 4).sign(&key).unwrap();
    s.set_zone(z2);
    // The server polls its zone source every second; wait for the observable change, bounded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while soa_serial(s.addr).await != 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "serial 2 never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // home4 is now a device: names below it are NXDOMAIN.
    let below = query(s.addr, "x.home4.alice.example.", RecordType::A).await;
    assert_eq!(
        below.response_code(),
        hickory_proto::op::ResponseCode::NXDomain
    );
    if let Some(out) = run_tool(
        "dig",
        "dig SOA after serial change",
        s.addr,
        &["+short", "SOA", "alice.example"],
    )
    .await
    {
        assert_eq!(out.split_whitespace().nth(2), Some("2"));
    }
    if let Some(out) = run_tool(
        "dig",
        "dig A new device",
        s.addr,
        &["+short", "A", "home4.alice.example"],
    )
    .await
    {
        assert_eq!(short_lines(&out), ["203.0.113.10", "203.0.113.11"]);
    }
    s.stop().await;
}
