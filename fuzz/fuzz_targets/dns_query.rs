//! Fuzzes the zone DNS server's answer to whatever a client on the internet sends it: a flags
//! byte (bit 0: over TCP, else UDP; bits 1-3 pick the client's source port, the rest its
//! address), then the query's bytes. Over UDP, the server's own datagram path
//! (`answer_datagram`: its FORMERRs, reflection guards and size guard, the socket left out);
//! over TCP, each framed message read as the server reads it (`tcp_frame`: its FORMERRs,
//! responses ignored, the connection closed on bytes with no query header) and answered by
//! `ZoneHandler`; both from a generated zone (gateways, nodes, the zone config TXT). Checks: no
//! panic; at most one answer to a datagram, none to a response or to a port of a service that
//! answers anything; a malformed query (or, over UDP, one of several questions) gets a
//! 12-byte FORMERR with its id, over UDP only to port 53 or an unprivileged one; over TCP a
//! query that decodes is never taken for a malformed one nor closes the connection; an answer
//! encodes and parses back as one DNS response with the query's id; over UDP it fits what the
//! query allows (512 bytes without EDNS, its payload size clamped to 512..=1232 with it), so a
//! spoofed query cannot draw more; a question for a name outside the zone is refused or
//! answered with no record.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{DNSClass, Name};
use hickory_proto::serialize::binary::{BinDecodable, BinEncoder};
use hickory_proto::xfer::Protocol;
use hickory_server::authority::{MessageRequest, MessageResponse};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use libfuzzer_sys::fuzz_target;
use name_resolver::{ZoneHandler, ZoneRecords};

/// Collects the encoded answer, as hickory's own handle encodes it (its size bound included).
#[derive(Clone, Default)]
struct Collect {
    protocol: Option<Protocol>,
    bytes: Arc<Mutex<Option<Vec<u8>>>>,
}

#[async_trait::async_trait]
impl ResponseHandler for Collect {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
            impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
            impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
            impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
        >,
    ) -> std::io::Result<ResponseInfo> {
        let max = match (self.protocol, response.get_edns()) {
            (Some(Protocol::Udp), Some(e)) => e.max_payload(),
            (Some(Protocol::Udp), None) => 512,
            _ => u16::MAX,
        };
        let mut buf = Vec::new();
        let mut encoder = BinEncoder::new(&mut buf);
        encoder.set_max_size(max);
        let info = response
            .destructive_emit(&mut encoder)
            .map_err(std::io::Error::other)?;
        *self.bytes.lock().unwrap() = Some(buf);
        Ok(info)
    }
}

fn records() -> Arc<ZoneRecords> {
    static RECORDS: OnceLock<Arc<ZoneRecords>> = OnceLock::new();
    RECORDS
        .get_or_init(|| {
            let (_, zone) = name_resolver::testzone::zone();
            Arc::new(ZoneRecords::new(&zone).expect("the generated zone has records"))
        })
        .clone()
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

/// Source ports the input picks from: DNS's, resolvers' (unprivileged), and privileged ones
/// of services that answer anything (never answered: reflection loops), or of others.
const PORTS: [u16; 8] = [5353, 53, 0, 7, 19, 464, 1000, 40000];
/// Those never answered at all (the UDP path's `LOOPING_PORTS`).
const LOOPING: [u16; 4] = [0, 7, 19, 464];

fuzz_target!(|data: &[u8]| {
    let Some((&flags, wire)) = data.split_first() else {
        return;
    };
    let protocol = if flags & 1 == 1 {
        Protocol::Tcp
    } else {
        Protocol::Udp
    };
    let port = PORTS[usize::from((flags >> 1) & 7)];
    let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, flags >> 4)), port);
    // A fresh handler each time: its response rate limiter would otherwise silence the
    // fuzzer's one client after a few queries.
    let handler = ZoneHandler::new(records());
    let parsed = MessageRequest::from_bytes(wire);
    let (bytes, request) = if protocol == Protocol::Udp {
        // The UDP path as the server runs it (its FORMERRs, its size guard), socket aside.
        let mut sent = runtime().block_on(name_resolver::answer_datagram(&handler, wire, client));
        assert!(sent.len() <= 1, "{} answers to one datagram", sent.len());
        let Some(bytes) = sent.pop() else {
            // Nothing sent: a query that gets a FORMERR (malformed, or several questions)
            // from a port that may have one, gets it (the handler is fresh: no rate limit).
            let formerr_due = wire.len() >= 12
                && wire[2] & 0x80 == 0
                && (port == 53 || port >= 1024)
                && !LOOPING.contains(&port)
                && parsed.as_ref().map_or(true, |q| q.queries().len() > 1);
            assert!(!formerr_due, "no FORMERR from port {port}");
            return;
        };
        assert!(!LOOPING.contains(&port), "an answer to port {port}");
        assert!(
            wire.len() >= 12 && wire[2] & 0x80 == 0,
            "an answer to a response or to no header"
        );
        match parsed {
            Ok(q) if q.queries().len() <= 1 => (bytes, Some(Request::new(q, client, protocol))),
            // Malformed, or several questions (RFC 9619): a header-only FORMERR, no larger
            // than the query, and only to DNS's port or an unprivileged one.
            _ => {
                assert_eq!(bytes.len(), 12, "a FORMERR of {} bytes", bytes.len());
                assert_eq!(bytes[..2], wire[..2], "the FORMERR's id");
                assert_eq!(bytes[3] & 0x0f, 1, "not a FORMERR");
                assert!(port == 53 || port >= 1024, "a FORMERR to port {port}");
                return;
            }
        }
    } else {
        // The TCP path as the server runs it, frame by frame (the length prefix aside).
        let query = match name_resolver::tcp_frame(wire) {
            name_resolver::TcpFrame::Query(q) => q,
            // Malformed with a query's header: a header-only FORMERR with its id, and the
            // connection goes on.
            name_resolver::TcpFrame::FormErr(bytes, _) => {
                assert!(parsed.is_err(), "a FORMERR to a query that decodes");
                assert_eq!(bytes.len(), 12, "a FORMERR of {} bytes", bytes.len());
                assert_eq!(bytes[..2], wire[..2], "the FORMERR's id");
                assert_eq!(bytes[2] & 0x80, 0x80, "the FORMERR is no response");
                assert_eq!(bytes[3] & 0x0f, 1, "not a FORMERR");
                assert_eq!(wire[2] & 0x80, 0, "a FORMERR to a response");
                return;
            }
            // Never answered, malformed or not.
            name_resolver::TcpFrame::Response => {
                let q = parsed.expect("a response read");
                assert_eq!(q.message_type(), MessageType::Response);
                return;
            }
            name_resolver::TcpFrame::NotAQuery(_) => {
                assert!(
                    parsed.is_err(),
                    "a query that decodes closed the connection"
                );
                assert!(
                    wire.len() < 12 || wire[2] & 0x80 != 0,
                    "a query's header closed the connection"
                );
                return;
            }
        };
        let request = Request::new(query, client, protocol);
        let out = Collect {
            protocol: Some(protocol),
            ..Collect::default()
        };
        runtime().block_on(handler.handle_request(&request, out.clone()));
        let Some(bytes) = out.bytes.lock().unwrap().take() else {
            return; // dropped by the rate limiter: nothing sent
        };
        (bytes, Some(request))
    };
    let Some(request) = request else {
        return;
    };
    let id = request.id();
    let question = request
        .queries()
        .first()
        .map(|q| (q.name().clone(), q.query_class()));
    // hickory-server echoes the question section's bytes as the query had them: a question
    // name with a compression pointer (into the header) then points at the answer's own
    // header, which no longer spells a name. Malformed queries only; their answers are no
    // larger for it (left alone, fuzz/README.md).
    if question_uses_pointers(wire) {
        return;
    }
    let answer = Message::from_vec(&bytes).expect("the answer parses");
    assert_eq!(answer.id(), id);
    assert_eq!(answer.message_type(), MessageType::Response);
    if protocol == Protocol::Udp {
        let allowed = request
            .edns()
            .map_or(512, |e| e.max_payload().clamp(512, 1232));
        assert!(
            bytes.len() <= usize::from(allowed),
            "a {}-byte UDP answer where {allowed} were allowed",
            bytes.len()
        );
    }
    if let Some((name, class)) = question {
        let zone = Name::from_ascii("alice.example.").expect("a name");
        let inside = zone.zone_of(&name);
        if !inside
            && matches!(class, DNSClass::IN | DNSClass::ANY)
            && request.edns().is_none_or(|e| e.version() == 0)
        {
            assert!(
                answer.answers().is_empty(),
                "records for {name}, outside the zone"
            );
            assert!(
                matches!(
                    answer.response_code(),
                    ResponseCode::Refused | ResponseCode::FormErr | ResponseCode::NotImp
                ),
                "{name} outside the zone answered {:?}",
                answer.response_code()
            );
        }
    }
});

/// Whether a name of the query's question section uses a compression pointer.
fn question_uses_pointers(wire: &[u8]) -> bool {
    let Some(count) = wire.get(4..6).map(|c| u16::from_be_bytes([c[0], c[1]])) else {
        return false;
    };
    let mut at = 12;
    for _ in 0..count {
        loop {
            let Some(&len) = wire.get(at) else {
                return false;
            };
            if len & 0xc0 != 0 {
                return true;
            }
            at += 1 + usize::from(len);
            if len == 0 {
                break;
            }
        }
        at += 4;
    }
    false
}
