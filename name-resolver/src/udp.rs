//! DNS over UDP: a receive loop per socket of our own, in place of hickory-server's, so that
//! each answer leaves from the address its query came to (IP_PKTINFO / IPV6_PKTINFO, through
//! quinn-udp). A socket bound to a wildcard (`[::]:53`, the default) answered from whichever
//! address routing picked: a resolver asking the machine's second address (an alias, one of
//! several IPv6 addresses) got its answer from another and dropped it as spoofed.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Header, MessageType, ResponseCode};
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use hickory_proto::xfer::Protocol;
use hickory_server::authority::{MessageRequest, MessageResponse};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::handler::ZoneHandler;

/// Room for one receive: a query is at most 64 KiB, and with UDP GRO (which quinn-udp turns
/// on) several from one client arrive as one buffer, split by their stride.
const RECV_BUF: usize = 64 * 1024;
/// Size an answer is encoded to at most when the query had no EDNS (RFC 1035).
const PLAIN_UDP_MAX: u16 = 512;
/// How long an answer waits for room in the socket's send buffer before it is given up (as
/// a lost packet would be): queries behind it on this socket wait meanwhile.
const SEND_WAIT: Duration = Duration::from_millis(200);

/// One socket's queries answered until `stop`. Errors of one receive (or of one answer) are
/// logged and the loop goes on: one client's ICMP error or a full buffer must not stop DNS.
pub(crate) async fn serve(socket: UdpSocket, handler: ZoneHandler, stop: CancellationToken) {
    let socket = Arc::new(socket);
    let state = match UdpSocketState::new((&*socket).into()) {
        Ok(s) => Arc::new(s),
        Err(error) => {
            // Without the destination of each query, answers leave from the address routing
            // picks: as before, and right for a socket bound to one address.
            warn!(%error, "DNS over UDP: cannot ask the kernel for each query's destination; answers leave from the address routing picks");
            return serve_plain(socket, handler, stop).await;
        }
    };
    let mut buf = vec![0u8; RECV_BUF];
    let mut meta = [RecvMeta::default()];
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = socket.readable() => if let Err(error) = r {
                warn!(%error, "DNS over UDP: socket failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            },
        }
        let got = socket.try_io(Interest::READABLE, || {
            let mut bufs = [IoSliceMut::new(&mut buf)];
            state.recv((&*socket).into(), &mut bufs, &mut meta)
        });
        let n = match got {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => {
                debug!(%error, "DNS over UDP: receive failed");
                continue;
            }
        };
        for m in &meta[..n] {
            // An empty datagram has stride 0 too, and `chunks(0)` panics: one empty datagram
            // stopped the DNS server (and with it the gateway). It is no query: skipped.
            let stride = if m.stride == 0 { m.len } else { m.stride };
            if stride == 0 {
                continue;
            }
            let from_ip = usable_source(m.dst_ip);
            for query in buf[..m.len.min(buf.len())].chunks(stride) {
                let reply = UdpReply {
                    socket: socket.clone(),
                    state: Some(state.clone()),
                    to: m.addr,
                    from_ip,
                };
                answer(&handler, query, reply).await;
            }
        }
    }
}

/// [`serve`] without per-query destinations (a socket quinn-udp could not set up).
async fn serve_plain(socket: Arc<UdpSocket>, handler: ZoneHandler, stop: CancellationToken) {
    let mut buf = vec![0u8; RECV_BUF];
    loop {
        let (n, from) = tokio::select! {
            _ = stop.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(got) => got,
                Err(error) => {
                    debug!(%error, "DNS over UDP: receive failed");
                    continue;
                }
            },
        };
        let reply = UdpReply {
            socket: socket.clone(),
            state: None,
            to: from,
            from_ip: None,
        };
        answer(&handler, &buf[..n], reply).await;
    }
}

/// The address a query came to, as the source of its answer: not one no packet may come from
/// (a query sent to a broadcast or multicast address is answered from the address routing
/// picks, as before).
fn usable_source(dst: Option<IpAddr>) -> Option<IpAddr> {
    let ip = dst?;
    let unusable = match ip.to_canonical() {
        IpAddr::V4(v4) => v4.is_broadcast() || v4.is_multicast() || v4.is_unspecified(),
        IpAddr::V6(v6) => v6.is_multicast() || v6.is_unspecified(),
    };
    (!unusable).then_some(ip)
}

/// One datagram: a query answered through the handler, a malformed one with FORMERR (no
/// larger than the query: nothing to amplify), a response never (reflection loops).
async fn answer(handler: &ZoneHandler, query: &[u8], reply: UdpReply) {
    let message = match MessageRequest::read(&mut BinDecoder::new(query)) {
        Ok(m) => m,
        Err(error) => {
            if let Some(formerr) = crate::server::formerr_for(query) {
                debug!(src = %reply.to, %error, "DNS over UDP: malformed query, FORMERR");
                reply.send(&formerr).await;
            }
            return;
        }
    };
    if message.message_type() == MessageType::Response {
        return;
    }
    let request = Request::new(message, reply.to, Protocol::Udp);
    handler.handle_request(&request, reply).await;
}

/// Where one answer goes, and from which address.
#[derive(Clone)]
struct UdpReply {
    socket: Arc<UdpSocket>,
    state: Option<Arc<UdpSocketState>>,
    to: SocketAddr,
    from_ip: Option<IpAddr>,
}

impl UdpReply {
    /// Sends `bytes`, waiting at most [`SEND_WAIT`] for room.
    async fn send(&self, bytes: &[u8]) {
        let sent = tokio::time::timeout(SEND_WAIT, async {
            loop {
                let r = match &self.state {
                    Some(state) => {
                        let t = Transmit {
                            destination: self.to,
                            ecn: None,
                            contents: bytes,
                            segment_size: None,
                            src_ip: self.from_ip,
                        };
                        // `try_send`: `send` logs and swallows every error but WouldBlock.
                        self.socket.try_io(Interest::WRITABLE, || {
                            state.try_send((&*self.socket).into(), &t)
                        })
                    }
                    None => self.socket.try_send_to(bytes, self.to).map(drop),
                };
                match r {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if self.socket.writable().await.is_err() {
                            return;
                        }
                    }
                    Err(error) => {
                        debug!(dst = %self.to, %error, "DNS answer not sent");
                        return;
                    }
                    Ok(()) => return,
                }
            }
        })
        .await;
        if sent.is_err() {
            debug!(dst = %self.to, "DNS answer dropped: the socket's send buffer stayed full");
        }
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
        // The handler sized the answer to what the client takes; this only guards it.
        let max = response
            .get_edns()
            .as_ref()
            .map_or(PLAIN_UDP_MAX, |e| e.max_payload().max(PLAIN_UDP_MAX));
        let mut wire = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut wire);
        encoder.set_max_size(max);
        let info = match response.destructive_emit(&mut encoder) {
            Ok(info) => info,
            Err(error) => {
                warn!(%error, "DNS answer could not be encoded: SERVFAIL");
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

    #[test]
    fn answers_never_leave_from_an_address_no_packet_may_come_from() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(usable_source(ip("203.0.113.10")), ip("203.0.113.10"));
        assert_eq!(usable_source(ip("2001:db8::10")), ip("2001:db8::10"));
        assert_eq!(
            usable_source(ip("::ffff:203.0.113.10")),
            ip("::ffff:203.0.113.10")
        );
        for bad in [
            "255.255.255.255",
            "224.0.0.251",
            "ff02::fb",
            "0.0.0.0",
            "::",
        ] {
            assert_eq!(usable_source(ip(bad)), None, "{bad}");
        }
        assert_eq!(usable_source(None), None);
    }
}
