//! A wildcard bind on a port another DNS server holds on one address (systemd-resolved holds
//! 127.0.0.53:53 on every stock Ubuntu) serves each of the machine's other addresses instead
//! of failing: the gateway exited, and systemd restarted it for ever.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_client::client::{Client, ClientHandle};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use hickory_proto::runtime::TokioRuntimeProvider;
use hickory_proto::udp::UdpClientStream;
use name_resolver::{testzone, DnsServer};
use tokio_util::sync::CancellationToken;

use crate::tcp_limits::answered_from;

/// A port held on 127.0.0.53 (UDP and TCP, as systemd-resolved holds 53) and free on
/// 127.0.0.1; the sockets holding it. Chosen below the kernel's ephemeral range
/// (`ip_local_port_range`, 32768–60999 by default): the server binds it on 127.0.0.1 only
/// later, and another test's socket bound to port 0 (or connecting) could be given it
/// meanwhile.
fn held_port() -> (u16, std::net::UdpSocket, std::net::TcpListener) {
    use std::hash::{BuildHasher, Hasher};
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    for _ in 0..10_000 {
        let udp = if low > 11_000 {
            // A random port (each RandomState hashes differently; no rand here).
            let random = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish();
            let port = 10_000 + (random % u64::from(low - 10_000)) as u16;
            match std::net::UdpSocket::bind(("127.0.0.53", port)) {
                Ok(udp) => udp,
                Err(_) => continue,
            }
        } else {
            // An unusual range: any free port.
            std::net::UdpSocket::bind("127.0.0.53:0").unwrap()
        };
        let port = udp.local_addr().unwrap().port();
        let Ok(tcp) = std::net::TcpListener::bind(("127.0.0.53", port)) else {
            continue;
        };
        let free = std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        if free {
            return (port, udp, tcp);
        }
    }
    panic!("no port free on both 127.0.0.53 and 127.0.0.1");
}

#[tokio::test]
async fn a_wildcard_beside_another_server_serves_each_other_address() {
    let (port, _udp, _tcp) = held_port();
    // IPv4's wildcard: `[::]` would depend on the machine's bindv6only and IPv6.
    let wildcard: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
    let server = DnsServer::bind_same_port(wildcard)
        .await
        .expect("served on the other addresses");
    let addrs = server.udp_addrs();
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    assert!(addrs.contains(&local), "{addrs:?}");
    assert!(
        addrs
            .iter()
            .all(|a| a.is_ipv4() && !a.ip().is_unspecified()),
        "{addrs:?}"
    );
    assert!(addrs.iter().any(|a| !a.ip().is_loopback()), "{addrs:?}");
    assert_eq!(server.tcp_addrs(), addrs);

    let stop = CancellationToken::new();
    let zone = Arc::new(testzone::zone().1);
    let task = tokio::spawn(server.run(move || zone.clone(), stop.clone()));
    // Over UDP and over TCP, on 127.0.0.1.
    let conn = UdpClientStream::builder(local, TokioRuntimeProvider::new()).build();
    let (mut client, bg) = Client::connect(conn).await.unwrap();
    let bg = tokio::spawn(bg);
    let soa = client
        .query(
            Name::from_ascii("alice.example.").unwrap(),
            DNSClass::IN,
            RecordType::SOA,
        )
        .await
        .unwrap();
    assert!(soa.header().authoritative() && !soa.answers().is_empty());
    bg.abort();
    assert!(answered_from("127.0.0.1", local, 7).await.is_some());
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("stops in time")
        .unwrap()
        .unwrap();
}
