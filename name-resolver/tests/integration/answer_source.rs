//! Over UDP each answer leaves from the address its query came to: a server bound to a
//! wildcard answered from whichever address routing picked, and a resolver asking a second
//! address of the machine dropped the answer as coming from someone else.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use name_resolver::{testzone, DnsServer};
use tokio_util::sync::CancellationToken;

/// Asks the apex's SOA with `id` on `client` (connected to a server) until an answer comes,
/// at most three times (UDP: a lost query is asked again).
async fn ask_soa(client: &tokio::net::UdpSocket, id: u16) -> Option<Message> {
    let mut m = Message::new();
    m.set_id(id);
    m.add_query(Query::query(
        Name::from_ascii("alice.example.").unwrap(),
        RecordType::SOA,
    ));
    let query = m.to_vec().unwrap();
    let mut buf = [0u8; 2048];
    for _ in 0..3 {
        client.send(&query).await.unwrap();
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(700), client.recv(&mut buf)).await
        {
            return Some(Message::from_vec(&buf[..n]).unwrap());
        }
    }
    None
}

/// A query to 127.0.0.2 from a socket on 127.0.0.1 connected there (it takes datagrams from
/// 127.0.0.2 only), to a server on the IPv4 wildcard: routing alone picks 127.0.0.1 to
/// answer 127.0.0.1 from.
#[tokio::test]
async fn a_wildcard_server_answers_from_the_address_asked() {
    let server = DnsServer::bind_same_port("0.0.0.0:0".parse().unwrap())
        .await
        .unwrap();
    let port = server.udp_addr().port();
    let stop = CancellationToken::new();
    let task = tokio::spawn(server.run(|| std::sync::Arc::new(testzone::zone().1), stop.clone()));
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let asked: SocketAddr = ([127, 0, 0, 2], port).into();
    client.connect(asked).await.unwrap();
    let answer = ask_soa(&client, 4242)
        .await
        .expect("an answer from 127.0.0.2, the address asked");
    assert_eq!(answer.id(), 4242);
    assert!(!answer.answers().is_empty(), "{answer:?}");
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// An empty datagram is no query, and nothing else: it stopped the UDP loop (a panic on a
/// zero stride), and with it the gateway.
#[tokio::test]
async fn an_empty_datagram_is_ignored() {
    let server = DnsServer::bind_same_port("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = server.udp_addr();
    let stop = CancellationToken::new();
    let task = tokio::spawn(server.run(|| std::sync::Arc::new(testzone::zone().1), stop.clone()));
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(addr).await.unwrap();
    for _ in 0..3 {
        client.send(&[]).await.unwrap();
    }
    let answered = ask_soa(&client, 7).await.is_some_and(|m| m.id() == 7);
    assert!(answered, "no answer after empty datagrams");
    assert!(!task.is_finished(), "the server stopped");
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Without EDNS a client takes 512 bytes: an answer larger than that (a negative one under a
/// long domain for a long name) goes as its header and question with TC, so the client asks
/// over TCP. It went out whole, up to our own advertised 1232, and was dropped as too long.
#[tokio::test]
async fn a_negative_answer_larger_than_the_client_takes_is_truncated() {
    // As long as a zone's domain may be (`hostmaster.` must fit under it).
    let label = "a".repeat(60);
    let long = format!("{label}.{label}.{label}.{}.example", "a".repeat(51));
    assert_eq!(long.len(), 242);
    let (_, zone) = name_resolver::testzone::zone_with(2, |c| {
        c.domain = zone_core::Domain::new(&long).unwrap();
    });
    let server = crate::common::Running::start(zone).await;
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // A name as long as DNS allows under the domain, of a type it does not have.
    let name = format!("{}.{long}.", "b".repeat(10));
    let mut q = Message::new();
    q.set_id(77);
    q.add_query(Query::query(
        Name::from_ascii(&name).unwrap(),
        RecordType::MX,
    ));
    client
        .send_to(&q.to_vec().unwrap(), server.addr)
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), client.recv(&mut buf))
        .await
        .expect("an answer in time")
        .unwrap();
    assert!(n <= 512, "{n} bytes to a client of 512");
    let answer = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(answer.id(), 77);
    assert!(answer.truncated(), "{answer:?}");
    assert_eq!(answer.queries().len(), 1);
    assert_eq!(answer.queries()[0].name().to_ascii(), name);
    assert!(answer.extensions().is_none(), "OPT to a query without EDNS");
    // With EDNS at 512 too, and the answer keeps its OPT record (RFC 6891 §6.1.1).
    let mut edns = hickory_proto::op::Edns::new();
    edns.set_max_payload(512);
    q.set_id(78).set_edns(edns);
    client
        .send_to(&q.to_vec().unwrap(), server.addr)
        .await
        .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(3), client.recv(&mut buf))
        .await
        .expect("an answer in time")
        .unwrap();
    let answer = Message::from_vec(&buf[..n]).unwrap();
    assert!(n <= 512 && answer.truncated(), "{n} bytes: {answer:?}");
    assert_eq!(answer.id(), 78);
    assert!(answer.extensions().is_some(), "no OPT: {answer:?}");
    server.stop().await;
}
