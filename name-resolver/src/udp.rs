//! DNS over UDP: a receive loop per socket of our own, in place of hickory-server's, so that
//! each answer leaves from the address its query came to (IP_PKTINFO / IPV6_PKTINFO, through
//! quinn-udp). A socket bound to a wildcard (`[::]:53`, the default) answered from whichever
//! address routing picked: a resolver asking the machine's second address (an alias, one of
//! several IPv6 addresses) got its answer from another and dropped it as spoofed.

use crate::stats::Transport;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Header, MessageType, ResponseCode};
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use hickory_proto::xfer::Protocol;
use hickory_server::authority::{MessageRequest, MessageResponse};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use tunnel::sockets::ReplySocket;

use crate::handler::ZoneHandler;

/// Room for one receive: a query is at most 64 KiB, and with UDP GRO (which quinn-udp turns
/// on) several from one client arrive as one buffer, split by their stride.
const RECV_BUF: usize = 64 * 1024;
/// Size an answer is encoded to at most when the query had no EDNS (RFC 1035).
const PLAIN_UDP_MAX: u16 = 512;
/// How long an answer waits for room in the socket's send buffer before it is given up (as
/// a lost packet would be): queries behind it on this socket wait meanwhile.
const SEND_WAIT: Duration = Duration::from_millis(200);

/// One socket's queries answered until `stop`, each from the address it came to
/// ([`ReplySocket`]). Errors of one receive (or of one answer) are logged and the loop goes
/// on: one client's ICMP error or a full buffer must not stop DNS.
pub(crate) async fn serve(socket: UdpSocket, handler: ZoneHandler, stop: CancellationToken) {
    let socket = Arc::new(ReplySocket::new(socket));
    let mut buf = vec![0u8; RECV_BUF];
    loop {
        let got = tokio::select! {
            _ = stop.cancelled() => return,
            r = socket.recv(&mut buf) => match r {
                Ok(got) => got,
                Err(error) => {
                    debug!(%error, "DNS over UDP: receive failed");
                    continue;
                }
            },
        };
        // An empty datagram is no query: skipped (it once stopped the loop, and the gateway).
        for query in got.datagrams(&buf).filter(|d| !d.is_empty()) {
            let reply = UdpReply {
                out: Out::Socket(socket.clone()),
                to: got.from,
                from_ip: got.to,
                max: PLAIN_UDP_MAX,
                question: None,
            };
            answer(&handler, query, reply).await;
        }
    }
}

/// Source ports no resolver sends from: port 0, and those of UDP services that answer
/// whatever reaches them (echo, daytime, QOTD, chargen, time, TFTP, kpasswd). A query forged
/// from one had that service and this server answer each other until one lost a packet
/// (CVE-2024-2169, "Loop DoS"), each exchange well inside the rate limiter's refill.
const LOOPING_PORTS: [u16; 8] = [0, 7, 13, 17, 19, 37, 69, 464];

/// Whether a datagram from `port` is read at all ([`LOOPING_PORTS`]).
fn read_from(port: u16) -> bool {
    !LOOPING_PORTS.contains(&port)
}

/// Whether a FORMERR may go to `port`: DNS's own, or an unprivileged one (where resolvers and
/// stubs send from). A malformed datagram from another privileged port is some other
/// service's answer, and a FORMERR back would start the same loop with a service not listed.
fn formerr_to(port: u16) -> bool {
    port == 53 || port >= 1024
}

/// One datagram: a query answered through the handler, a malformed one — or one of several
/// questions (RFC 9619) — with a header-only FORMERR (no larger than the query: nothing to
/// amplify), a response never (reflection loops), nothing from a [`LOOPING_PORTS`] port.
async fn answer(handler: &ZoneHandler, query: &[u8], mut reply: UdpReply) {
    let port = reply.to.port();
    if !read_from(port) {
        return;
    }
    let formerr = |why: &dyn std::fmt::Display| {
        let mut formerr = crate::server::formerr_for(query).filter(|_| formerr_to(port))?;
        handler
            .admit_udp_formerr(reply.to.ip(), &mut formerr)
            .then(|| {
                debug!(src = %reply.to, %why, "DNS over UDP: FORMERR");
                handler.stats().answered(Transport::Udp, 1);
                formerr
            })
    };
    let message = match MessageRequest::read(&mut BinDecoder::new(query)) {
        Ok(m) => m,
        Err(error) => {
            if let Some(f) = formerr(&error) {
                reply.send(&f).await;
            }
            return;
        }
    };
    if message.message_type() == MessageType::Response {
        return;
    }
    // Told at once, not left to time out (RFC 9619: a message of several questions is
    // malformed); the header alone, so it echoes none of them.
    if message.queries().len() > 1 {
        if let Some(f) = formerr(&"more than one question") {
            reply.send(&f).await;
        }
        return;
    }
    // What the client takes, as the handler sizes its answers: our advertised size bounded
    // the encoding before, and a long negative answer to a client of 512 went out larger.
    reply.max = message.edns().map_or(PLAIN_UDP_MAX, |e| {
        e.max_payload()
            .clamp(PLAIN_UDP_MAX, crate::handler::UDP_PAYLOAD_MAX)
    });
    reply.question = message.queries().first().map(|q| q.original().clone());
    let request = Request::new(message, reply.to, Protocol::Udp);
    let answered = handler.handle_request(&request, reply).await;
    handler
        .stats()
        .answered(Transport::Udp, answered.response_code().into());
}

/// What answers are sent through: the socket, or (for the fuzz target) a list they are kept in.
#[derive(Clone)]
enum Out {
    Socket(Arc<ReplySocket>),
    Kept(Arc<std::sync::Mutex<Vec<Vec<u8>>>>),
}

/// What a datagram `query` from `from` is answered with, as [`serve`] answers it, the
/// socket left out (for the fuzz target): no datagram, or one. Sans-IO but for the handler.
#[doc(hidden)]
pub async fn answer_datagram(
    handler: &ZoneHandler,
    query: &[u8],
    from: SocketAddr,
) -> Vec<Vec<u8>> {
    let kept = Arc::new(std::sync::Mutex::new(Vec::new()));
    let reply = UdpReply {
        out: Out::Kept(kept.clone()),
        to: from,
        from_ip: None,
        max: PLAIN_UDP_MAX,
        question: None,
    };
    answer(handler, query, reply).await;
    let sent = std::mem::take(&mut *kept.lock().unwrap_or_else(|p| p.into_inner()));
    sent
}

/// Where one answer goes, and from which address.
#[derive(Clone)]
struct UdpReply {
    out: Out,
    to: SocketAddr,
    from_ip: Option<IpAddr>,
    /// The largest answer the client takes (its EDNS size, or 512 without EDNS).
    max: u16,
    /// The query's question, for an answer that must be cut to its header.
    question: Option<hickory_proto::op::Query>,
}

impl UdpReply {
    /// Sends `bytes`, waiting at most [`SEND_WAIT`] for room.
    async fn send(&self, bytes: &[u8]) {
        let socket = match &self.out {
            Out::Socket(s) => s,
            Out::Kept(k) => {
                k.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(bytes.to_vec());
                return;
            }
        };
        let sent = socket.send_to(bytes, self.to, self.from_ip);
        match tokio::time::timeout(SEND_WAIT, sent).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => debug!(dst = %self.to, %error, "DNS answer not sent"),
            Err(_) => {
                debug!(dst = %self.to, "DNS answer dropped: the socket's send buffer stayed full")
            }
        }
    }
}

impl UdpReply {
    /// `wire` made the header `head` of an answer with TC set, the question, and the OPT
    /// record `edns` if the answer had one (every answer to an EDNS query carries one, RFC
    /// 6891 §6.1.1).
    fn truncated(
        &self,
        head: Header,
        edns: Option<&hickory_proto::op::Edns>,
        wire: &mut Vec<u8>,
    ) -> io::Result<ResponseInfo> {
        wire.clear();
        let mut header = head;
        header.set_truncated(true);
        header.set_query_count(self.question.iter().count() as u16);
        header.set_answer_count(0);
        header.set_name_server_count(0);
        header.set_additional_count(edns.iter().count() as u16);
        let mut encoder = BinEncoder::new(wire);
        header.emit(&mut encoder).map_err(io::Error::other)?;
        if let Some(q) = &self.question {
            q.emit(&mut encoder).map_err(io::Error::other)?;
        }
        if let Some(e) = edns {
            Record::from(e)
                .emit(&mut encoder)
                .map_err(io::Error::other)?;
        }
        Ok(ResponseInfo::from(header))
    }
}

#[async_trait::async_trait]
impl ResponseHandler for UdpReply {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> io::Result<ResponseInfo> {
        let id = response.header().id();
        let head = *response.header();
        let edns = response.get_edns().clone();
        // The handler sized the answer to what the client takes; this only guards it.
        let mut wire = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut wire);
        encoder.set_max_size(crate::handler::UDP_PAYLOAD_MAX);
        let info = match response.destructive_emit(&mut encoder) {
            // Larger than the client takes (measured on the encoding: hickory's size check
            // trips on answers that end up smaller): the header and question alone with TC,
            // so it asks over TCP. Our own advertised size bounded it before, and a long
            // negative answer went whole to a client of 512, which drops it.
            Ok(_) if wire.len() > usize::from(self.max) => {
                self.truncated(head, edns.as_ref(), &mut wire)?
            }
            Err(error)
                if matches!(
                    error.kind(),
                    hickory_proto::ProtoErrorKind::MaxBufferSizeExceeded(_)
                ) =>
            {
                self.truncated(head, edns.as_ref(), &mut wire)?
            }
            Ok(info) => info,
            Err(error) => {
                let question = self
                    .question
                    .as_ref()
                    .map(|q| format!("{} {}", q.name(), q.query_type()));
                warn!(dst = %self.to, question = question.as_deref().unwrap_or("-"), %error, "DNS answer could not be encoded: SERVFAIL");
                wire.clear();
                let mut header = Header::new();
                header.set_id(id);
                header.set_message_type(MessageType::Response);
                header.set_response_code(ResponseCode::ServFail);
                header
                    .emit(&mut BinEncoder::new(&mut wire))
                    .map_err(io::Error::other)?;
                ResponseInfo::from(header)
            }
        };
        self.send(&wire).await;
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing is read from the ports of services that answer anything (a forged query from
    /// one started a loop), and no FORMERR goes to a privileged port but DNS's.
    #[test]
    fn datagrams_from_looping_ports_are_not_read_nor_errors_sent_to_privileged_ones() {
        for port in [0, 7, 13, 17, 19, 37, 69, 464] {
            assert!(!read_from(port), "{port}");
        }
        for port in [53, 123, 1023, 1024, 5353, 40000, 65535] {
            assert!(read_from(port), "{port}");
        }
        for port in [53, 1024, 33000, 65535] {
            assert!(formerr_to(port), "{port}");
        }
        for port in [1, 111, 123, 161, 1023] {
            assert!(!formerr_to(port), "{port}");
        }
    }
}
