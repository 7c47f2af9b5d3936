//! DNS over TCP per client: one address holds at most `MAX_TCP_PER_CLIENT` connections, so it
//! cannot keep all of the server's TCP slots busy (a node fetching the zone config needs TCP:
//! its TXT answer is larger than a UDP answer may be).

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use name_resolver::server::MAX_TCP_PER_CLIENT;
use name_resolver::testzone;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::Running;

/// An SOA query for the zone with `id`, with its TCP length prefix.
fn framed_soa_query(id: u16) -> Vec<u8> {
    framed_query(id, "alice.example.", RecordType::SOA)
}

/// A query for `name` and `ty` with `id`, with its TCP length prefix.
fn framed_query(id: u16, name: &str, ty: RecordType) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), ty));
    let q = m.to_vec().unwrap();
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend(q);
    framed
}

/// A TCP connection from `from` with one SOA query answered on it; `None` if the server closed
/// it without an answer.
pub async fn answered_from(from: &str, server: SocketAddr, id: u16) -> Option<TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(server).await.unwrap();
    let framed = framed_soa_query(id);
    // A closed connection may refuse the write too; either way there is no answer.
    s.write_all(&framed).await.ok()?;
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut len))
        .await
        .expect("an answer or a close in time")
        .ok()?;
    let mut body = vec![0; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut body).await.unwrap();
    let answer = Message::from_vec(&body).unwrap();
    assert_eq!(answer.id(), id);
    assert!(!answer.answers().is_empty(), "{answer:?}");
    Some(s)
}

#[tokio::test]
async fn one_address_holds_at_most_its_share_of_tcp_connections() {
    let server = Running::start(testzone::zone().1).await;
    let mut held = Vec::new();
    for i in 0..MAX_TCP_PER_CLIENT {
        let s = answered_from("127.0.0.1", server.addr, i as u16).await;
        held.push(s.unwrap_or_else(|| panic!("connection {i} was not served")));
    }
    assert!(
        answered_from("127.0.0.1", server.addr, 900).await.is_none(),
        "a connection beyond the address's limit was served"
    );
    assert!(
        answered_from("127.0.0.2", server.addr, 901).await.is_some(),
        "another address is not affected"
    );
    // A closed connection gives its slot back (its task ends a moment after the close).
    drop(held.pop());
    let mut back = false;
    for _ in 0..50 {
        if answered_from("127.0.0.1", server.addr, 902).await.is_some() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "the slot of a closed connection never came back");
    drop(held);
    server.stop().await;
}

/// Which of `held` the server has closed (after a moment for the close to arrive).
/// Each held connection asks once more and is answered: none has been idle for a second (a
/// slow setup would otherwise let the idle rule make room, whatever the rule under test).
async fn requery(held: &mut [TcpStream]) {
    for (i, s) in held.iter_mut().enumerate() {
        s.write_all(&framed_soa_query(i as u16)).await.unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.unwrap();
        let mut body = vec![0; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut body).await.unwrap();
    }
}

/// `n` connections opened one at a time, the `i`th from `from(i)`, each with a query answered.
/// Every 32 connections those held so far ask again, in order: opening 256 can take longer
/// than TCP_IDLE_TIMEOUT on a loaded machine, and the first would be closed as idle before the
/// test makes room. Asked in order, connection 0 stays the idlest, 1 the next, and so on.
async fn fill(server: SocketAddr, n: usize, from: impl Fn(usize) -> String) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for i in 0..n {
        if i > 0 && i % 32 == 0 {
            requery(&mut held).await;
        }
        let s = answered_from(&from(i), server, i as u16).await;
        held.push(s.unwrap_or_else(|| panic!("connection {i} was not served")));
    }
    held
}

async fn closed(held: &[TcpStream]) -> Vec<usize> {
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut byte = [0u8; 1];
    (0..held.len())
        .filter(|&i| match held[i].try_read(&mut byte) {
            Ok(_) => true,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        })
        .collect()
}

/// With every TCP slot taken, a newcomer is served: by closing the idlest connection of the
/// client holding the most while all are busy, and the connection idle the longest once
/// some have been idle a second. A few addresses keeping all slots busy (a query every half
/// second) used to shut out every node fetching the zone config (which needs TCP).
#[tokio::test]
async fn a_full_table_makes_room_for_a_newcomer() {
    use name_resolver::server::MAX_TCP_CONNECTIONS;
    let server = Running::start(testzone::zone().1).await;
    // One connection per client, 64 clients in each of four /24s (a /24 together holds at
    // most MAX_TCP_PER_SITE): no client holds more than the newcomer, four sites do.
    let mut held = fill(server.addr, MAX_TCP_CONNECTIONS, |i| {
        format!("127.0.{}.{}", 10 + i / 64, 1 + i % 64)
    })
    .await;
    // All taken, all busy a moment ago: one of a site holding the most (64) goes.
    requery(&mut held).await;
    let mut first = answered_from("127.0.200.1", server.addr, 998)
        .await
        .expect("a newcomer to a full, busy table was not served");
    let gone = closed(&held).await;
    assert_eq!(gone.len(), 1, "{gone:?}");
    held.remove(gone[0]);
    // Once connections have been idle a second, the one idle longest goes (the first left).
    // All ask again first, in order and the newcomer last (so the first left stays the
    // idlest): none may near TCP_IDLE_TIMEOUT and be closed as idle meanwhile.
    requery(&mut held).await;
    requery(std::slice::from_mut(&mut first)).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = answered_from("127.0.201.1", server.addr, 999)
        .await
        .expect("a newcomer to a full table was not served");
    assert_eq!(closed(&held).await, vec![0]);
    drop((first, second, held));
    server.stop().await;
}

/// Every slot held by a site of its own (an IPv6 /40 holds 256 /48s), each connection busy:
/// a newcomer from yet another site still gets in, by closing one of a site holding more than
/// its own none. "Two more than the newcomer's" kept every newcomer out here.
#[tokio::test]
async fn a_table_of_one_busy_connection_per_site_makes_room() {
    use name_resolver::server::MAX_TCP_CONNECTIONS;
    let server = Running::start(testzone::zone().1).await;
    let mut held = fill(server.addr, MAX_TCP_CONNECTIONS, |i| {
        format!("127.{}.{}.1", 1 + i / 256, i % 256)
    })
    .await;
    requery(&mut held).await;
    answered_from("127.100.0.1", server.addr, 998)
        .await
        .expect("a newcomer to a table of one busy connection per site was not served");
    assert_eq!(closed(&held).await.len(), 1);
    server.stop().await;
}

/// A query that does not decode (here: it announces a question it does not carry) gets
/// FORMERR with its id (RFC 6891 §6.1.1), and the connection goes on: it used to be closed
/// without an answer.
#[tokio::test]
async fn a_malformed_query_over_tcp_gets_formerr_and_the_connection_stays() {
    let server = Running::start(testzone::zone().1).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    // id 0x1234, RD, QDCOUNT 1, and no question.
    let bad = [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    let mut framed = (bad.len() as u16).to_be_bytes().to_vec();
    framed.extend(bad);
    s.write_all(&framed).await.unwrap();
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut len))
        .await
        .expect("an answer in time")
        .expect("an answer, not a close");
    let mut body = vec![0; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut body).await.unwrap();
    let answer = Message::from_vec(&body).unwrap();
    assert_eq!(answer.id(), 0x1234);
    assert_eq!(
        answer.response_code(),
        hickory_proto::op::ResponseCode::FormErr
    );
    // The same connection still answers a good query.
    s.write_all(&framed_soa_query(7)).await.unwrap();
    s.read_exact(&mut len).await.unwrap();
    let mut body = vec![0; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut body).await.unwrap();
    assert_eq!(Message::from_vec(&body).unwrap().id(), 7);
    server.stop().await;
}

/// A connection that sends no query (and is sent nothing) is closed after the idle timeout,
/// and one that queries is not closed while it keeps asking.
#[tokio::test]
async fn an_idle_connection_is_closed_after_the_timeout() {
    use name_resolver::server::TCP_IDLE_TIMEOUT;
    let server = Running::start(testzone::zone().1).await;
    let started = std::time::Instant::now();
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    let mut busy = answered_from("127.0.0.1", server.addr, 1)
        .await
        .expect("served");
    // The busy one asks every second, past the idle one's end.
    let mut b = [0u8; 1];
    let mut id = 2;
    let closed = loop {
        tokio::select! {
            r = idle.read(&mut b) => break r,
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                busy.write_all(&framed_soa_query(id)).await.unwrap();
                let mut len = [0u8; 2];
                busy.read_exact(&mut len).await.expect("the busy connection stays");
                let mut body = vec![0; u16::from_be_bytes(len) as usize];
                busy.read_exact(&mut body).await.unwrap();
                id += 1;
            }
        }
        assert!(
            started.elapsed() < TCP_IDLE_TIMEOUT * 2,
            "the idle connection stayed open"
        );
    };
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    let after = started.elapsed();
    assert!(after >= TCP_IDLE_TIMEOUT, "closed after {after:?}");
    server.stop().await;
}

/// A query with two questions (malformed, RFC 9619): over UDP, where its source may be
/// forged, a header-only FORMERR, at once (a FORMERR of hickory's echoed every question: an
/// answer as large as the query, or past the payload limit an encoding error logged per
/// datagram; and no answer left the client to time out); over TCP, FORMERR. One question is
/// answered.
#[tokio::test]
async fn a_query_with_several_questions_is_not_echoed_over_udp() {
    let server = Running::start(testzone::zone().1).await;
    let query = |questions: usize| {
        let mut m = Message::new();
        // Its own id per shape: a late answer to one cannot pass for the other's.
        m.set_id(0x4200 + questions as u16);
        for _ in 0..questions {
            m.add_query(Query::query(
                Name::from_ascii("alice.example.").unwrap(),
                RecordType::SOA,
            ));
        }
        m.to_vec().unwrap()
    };
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.connect(server.addr).await.unwrap();
    let mut buf = [0u8; 4096];
    udp.send(&query(2)).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(3), udp.recv(&mut buf))
        .await
        .expect("a two-question query over UDP was not answered")
        .unwrap();
    assert_eq!(n, 12, "more than a header: {:?}", &buf[..n]);
    let formerr = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(formerr.id(), 0x4202);
    assert_eq!(
        formerr.response_code(),
        hickory_proto::op::ResponseCode::FormErr
    );
    assert!(formerr.queries().is_empty());
    udp.send(&query(1)).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(3), udp.recv(&mut buf))
        .await
        .expect("a one-question query answered")
        .unwrap();
    assert_eq!(Message::from_vec(&buf[..n]).unwrap().id(), 0x4201);

    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let q = query(2);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend(q);
    s.write_all(&framed).await.unwrap();
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut len))
        .await
        .expect("an answer in time")
        .expect("an answer, not a close");
    let mut body = vec![0; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut body).await.unwrap();
    assert_eq!(
        Message::from_vec(&body).unwrap().response_code(),
        hickory_proto::op::ResponseCode::FormErr
    );
    server.stop().await;
}

/// A resolver's idle connection does not hold the shutdown: it is closed at once (it used to
/// stay until its idle timeout, so every stop took the whole grace period and warned of
/// queries still in flight).
#[tokio::test]
async fn shutdown_closes_idle_connections_at_once() {
    let server = Running::start(testzone::zone().1).await;
    let mut idle = answered_from("127.0.0.1", server.addr, 1)
        .await
        .expect("served");
    let started = std::time::Instant::now();
    server.stop().await;
    let took = started.elapsed();
    assert!(
        took < name_resolver::server::SHUTDOWN_GRACE,
        "the stop waited {took:?}, the grace period is {:?}",
        name_resolver::server::SHUTDOWN_GRACE
    );
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(1), idle.read_to_end(&mut rest))
        .await
        .expect("the connection was closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "no answer without a query");
}

/// A connection still owed answers (a client fetching the zone config on a slow link, its
/// answers queued behind a full socket) is not the one closed to make room while another is
/// between answers, though it has gone longer without progress: it was, and the fetch failed
/// part way.
#[tokio::test]
async fn making_room_closes_a_connection_between_answers_not_one_mid_answer() {
    use name_resolver::server::MAX_TCP_CONNECTIONS;
    let server = Running::start(testzone::zone().1).await;
    let slow = SlowReader::start(server.addr).await;
    // Its answers stall; then every other slot is taken and used after it, 32 at a time: the
    // slow one is cut after TCP_IDLE_TIMEOUT without progress, which one at a time could
    // come close to on a busy machine.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut held: Vec<TcpStream> = Vec::new();
    let others: Vec<usize> = (0..MAX_TCP_CONNECTIONS - 1).collect();
    // Within the listen backlog: a dropped SYN comes back only a second later.
    for batch in others.chunks(32) {
        // Those held so far ask again: filling can take longer than TCP_IDLE_TIMEOUT on a
        // loaded machine, and more than one would be closed (as idle) by the time of the
        // newcomer.
        requery(&mut held).await;
        held.extend(
            futures_util::future::join_all(batch.iter().map(|&i| {
                let from = format!("127.{}.{}.1", 1 + i / 256, i % 256);
                async move {
                    let s = answered_from(&from, server.addr, i as u16).await;
                    s.unwrap_or_else(|| panic!("connection {i} was not served"))
                }
            }))
            .await,
        );
    }
    requery(&mut held).await;
    // All idle long enough to be closed for a newcomer.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    answered_from("127.100.0.1", server.addr, 998)
        .await
        .expect("the newcomer was not served");
    assert_eq!(closed(&held).await.len(), 1, "not one between answers");
    slow.reads_every_answer().await;
    server.stop().await;
}

/// A client that pipelines enough zone-config TXT queries to fill every buffer on the way and
/// reads none of the answers until told: its connection owes answers it cannot write.
struct SlowReader {
    rd: tokio::net::tcp::OwnedReadHalf,
    count: usize,
    writing: tokio::task::JoinHandle<tokio::net::tcp::OwnedWriteHalf>,
}

impl SlowReader {
    async fn start(server: SocketAddr) -> SlowReader {
        let txt = |id: u16| framed_query(id, "_zonegate.alice.example.", RecordType::TXT);
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        // Small, so the answers wait in the server's send buffer, not in ours.
        sock.set_recv_buffer_size(4096).unwrap();
        sock.bind("127.200.0.1:0".parse().unwrap()).unwrap();
        let mut slow = sock.connect(server).await.unwrap();
        // One answer first, for its size.
        slow.write_all(&txt(0)).await.unwrap();
        let mut len = [0u8; 2];
        slow.read_exact(&mut len).await.unwrap();
        let size = u16::from_be_bytes(len) as usize;
        let mut body = vec![0; size];
        slow.read_exact(&mut body).await.unwrap();
        let count = (16 << 20) / (size + 2);
        let queries: Vec<u8> = (1..=count).flat_map(|i| txt(i as u16)).collect();
        let (rd, mut wr) = slow.into_split();
        let writing = tokio::spawn(async move {
            wr.write_all(&queries).await.unwrap();
            wr
        });
        SlowReader { rd, count, writing }
    }

    /// Reads on, asserting every answer owed arrives.
    async fn reads_every_answer(mut self) {
        let mut got = 0;
        let mut len = [0u8; 2];
        let read_all = async {
            while got < self.count {
                self.rd.read_exact(&mut len).await?;
                let mut body = vec![0; u16::from_be_bytes(len) as usize];
                self.rd.read_exact(&mut body).await?;
                got += 1;
            }
            std::io::Result::Ok(())
        };
        let r = tokio::time::timeout(Duration::from_secs(30), read_all).await;
        assert!(
            matches!(r, Ok(Ok(()))),
            "{got} of {} answers: {r:?}",
            self.count
        );
        drop(self.writing.await.unwrap());
    }
}

/// A connection owing answers its client has not read for longer than the idle timeout (a
/// lossy link backs its retransmissions off past it) is not cut as idle: it was, and a node's
/// zone-config fetch failed part way.
#[tokio::test]
async fn a_connection_owing_answers_outlasts_the_idle_timeout() {
    use name_resolver::server::{TCP_IDLE_TIMEOUT, TCP_OWED_TIMEOUT};
    let server = Running::start(testzone::zone().1).await;
    let slow = SlowReader::start(server.addr).await;
    let stall = TCP_IDLE_TIMEOUT + Duration::from_secs(2);
    assert!(stall < TCP_OWED_TIMEOUT);
    tokio::time::sleep(stall).await;
    slow.reads_every_answer().await;
    server.stop().await;
}

/// A site (here an IPv4 /24) whose slots four neighbours hold, every connection busy: a
/// client of that site holding none still gets in, by closing one of the neighbour holding
/// the most. The site's cap refused it at once:
/// a node sharing a cloud /24 (or an IPv6 /64's neighbours their /48) could not fetch its zone
/// config over TCP.
#[tokio::test]
async fn a_full_site_makes_room_for_a_client_of_its_own() {
    use name_resolver::server::MAX_TCP_PER_SITE;
    let server = Running::start(testzone::zone().1).await;
    let mut held = fill(server.addr, MAX_TCP_PER_SITE, |i| {
        format!("127.0.5.{}", 1 + i / MAX_TCP_PER_CLIENT)
    })
    .await;
    requery(&mut held).await;
    let newcomer = answered_from("127.0.5.77", server.addr, 999)
        .await
        .expect("a client of a full site was not served");
    assert_eq!(closed(&held).await.len(), 1);
    drop((newcomer, held));
    server.stop().await;
}
