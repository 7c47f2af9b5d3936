//! The hickory-server request handler: turns one query into one response from the current
//! [`ZoneRecords`], which can be swapped at any time without disturbing queries in flight.
//!
//! Not an open resolver: a query for a name outside the zone is REFUSED, recursion is never
//! offered (RA stays clear), and every answer inside the zone is authoritative (AA).

use std::sync::Arc;

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Header, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Record, RecordType};
use hickory_proto::xfer::Protocol;
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use tracing::debug;

use crate::records::{name_wire_len, record_wire_len, Lookup, ZoneRecords};
use crate::rrl::{Response, ResponseLimiter, Verdict};

/// Largest UDP response we send, whatever the client offers: 1232 bytes fits the IPv6 minimum
/// MTU without fragmentation (DNS Flag Day 2020) and caps the amplification a spoofed query can
/// get out of the zone config TXT. Larger answers are truncated (TC) and fetched over TCP.
pub const UDP_PAYLOAD_MAX: u16 = 1232;
/// Size every DNS client accepts over UDP (RFC 1035), used when the query has no EDNS.
const UDP_PAYLOAD_MIN: u16 = 512;
/// Header (12) plus the OPT record of our EDNS (11).
const FIXED_OVERHEAD: usize = 12 + 11;

/// Answers queries for one zone from swappable precomputed records.
#[derive(Clone)]
pub struct ZoneHandler {
    current: Arc<ArcSwap<ZoneRecords>>,
    /// Rate of UDP answers per client network ([`crate::rrl`]).
    rrl: Arc<ResponseLimiter>,
    /// What was answered, for `/metrics`.
    stats: Arc<crate::DnsStats>,
}

impl ZoneHandler {
    pub fn new(records: Arc<ZoneRecords>) -> Self {
        Self::counting(records, Arc::default())
    }

    /// Like [`ZoneHandler::new`], counting its answers in `stats`.
    pub fn counting(records: Arc<ZoneRecords>, stats: Arc<crate::DnsStats>) -> Self {
        ZoneHandler {
            current: Arc::new(ArcSwap::new(records)),
            rrl: Arc::default(),
            stats,
        }
    }

    /// Where its answers are counted.
    pub fn stats(&self) -> &crate::DnsStats {
        &self.stats
    }

    /// The records being served.
    pub fn records(&self) -> Arc<ZoneRecords> {
        self.current.load_full()
    }

    /// UDP answers the rate limiter slipped and dropped since the last call.
    pub fn rate_limited(&self) -> (u64, u64) {
        self.rrl.take_counts()
    }

    /// Whether a FORMERR answer over UDP to `ip` may go (to a query that did not decode, so
    /// the handler never saw it): counted by the rate limiter as the error answers are, and
    /// given TC on a slip. A forged flood of undecodable headers was answered 1:1 unlimited.
    pub(crate) fn admit_udp_formerr(&self, ip: std::net::IpAddr, formerr: &mut [u8]) -> bool {
        match self
            .rrl
            .admit(ip, Response::Error, std::time::Instant::now())
        {
            Verdict::Send => true,
            Verdict::Slip => {
                self.stats.rate_limited(true);
                // TC is bit 1 of the third header byte.
                if let Some(flags) = formerr.get_mut(2) {
                    *flags |= 0x02;
                }
                true
            }
            Verdict::Drop => {
                self.stats.rate_limited(false);
                false
            }
        }
    }

    /// Serves `records` from the next query on; returns the ones replaced.
    pub fn replace(&self, records: Arc<ZoneRecords>) -> Arc<ZoneRecords> {
        self.current.swap(records)
    }
}

#[async_trait::async_trait]
impl RequestHandler for ZoneHandler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        // A cheap Arc clone: one query sees one consistent zone even if a swap happens meanwhile.
        let records = self.current.load_full();
        let mut builder = MessageResponseBuilder::from_message_request(request);
        let mut header = Header::response_from_request(request.header());
        // The OPT record first: every answer to a query that had one carries one (RFC 6891
        // §6.1.1), the rate limiter's truncated "slip" among them.
        let (udp_limit, badvers) = match request.edns() {
            Some(req_edns) => {
                let mut edns = Edns::new();
                edns.set_max_payload(UDP_PAYLOAD_MAX);
                edns.set_version(0);
                // RFC 3225 §3: the DO bit of the query is copied into the response.
                edns.set_dnssec_ok(req_edns.flags().dnssec_ok);
                let badvers = req_edns.version() > 0;
                if badvers {
                    edns.set_rcode_high(ResponseCode::BADVERS.high());
                }
                builder.edns(edns);
                let limit = req_edns
                    .max_payload()
                    .clamp(UDP_PAYLOAD_MIN, UDP_PAYLOAD_MAX);
                (limit, badvers)
            }
            None => (UDP_PAYLOAD_MIN, false),
        };

        // More than one question: no client sends it (RFC 9619), and the FORMERR would echo
        // every question — over UDP, from a forged source, an answer as large as the query
        // (or, past the payload limit, an encoding error hickory logs per datagram). Over
        // UDP the receive loop answers a header-only FORMERR before this; over TCP (no
        // forged sources) it is answered below.
        if request.protocol() == Protocol::Udp && request.queries().len() > 1 {
            return ResponseInfo::from(header);
        }

        // The error answers first: the rate limiter counts them as one kind of answer.
        let info = request.request_info();
        let error = if badvers {
            // RFC 6891 §6.1.3: we speak EDNS version 0 only.
            Some(ResponseCode::BADVERS)
        } else if request.op_code() != OpCode::Query {
            // No UPDATE, NOTIFY or anything else: the zone changes only through zone.json.
            Some(ResponseCode::NotImp)
        } else {
            // Not exactly one question: FORMERR.
            info.as_ref().err().map(|_| ResponseCode::FormErr)
        };
        let found = match (error, info) {
            (None, Ok(info)) => {
                let query = info.query;
                // QCLASS * asks every class there is: here, IN only (RFC 1035 §3.2.5).
                let lookup = if matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
                    records.lookup_as(
                        query.name(),
                        Some(query.original().name()),
                        query.query_type(),
                    )
                } else {
                    Lookup::Refused
                };
                Some((query, lookup))
            }
            _ => None,
        };

        if request.protocol() == Protocol::Udp {
            let response = match &found {
                Some((_, Lookup::NxDomain)) => Response::NxDomain,
                Some((q, Lookup::NoData)) => Response::Empty(records.answer_owner(q.name())),
                Some((q, Lookup::Found { .. })) => {
                    Response::Records(records.answer_owner(q.name()), q.query_type())
                }
                Some((_, Lookup::Refused)) | None => Response::Error,
            };
            match self
                .rrl
                .admit(request.src().ip(), response, std::time::Instant::now())
            {
                Verdict::Send => {}
                Verdict::Slip => {
                    self.stats.rate_limited(true);
                    header.set_truncated(true);
                    return send(&mut response_handle, builder.build_no_records(header)).await;
                }
                // Nothing sent: the source may be forged, and the rate is spent.
                Verdict::Drop => {
                    self.stats.rate_limited(false);
                    return ResponseInfo::from(header);
                }
            }
        }

        let Some((query, lookup)) = found else {
            header.set_response_code(error.unwrap_or(ResponseCode::FormErr));
            return send(&mut response_handle, builder.build_no_records(header)).await;
        };
        let any_over_udp =
            query.query_type() == RecordType::ANY && request.protocol() == Protocol::Udp;
        // A name that is not there, or has nothing, gets its negative answer below (small:
        // nothing to amplify); only records found make a truncated ANY.
        if any_over_udp && matches!(lookup, Lookup::Found { .. }) {
            // RFC 8482 §4: no full ANY answer over UDP, where a spoofed source turns it into
            // amplification; a client that really wants it asks again over TCP.
            header.set_authoritative(true);
            header.set_truncated(true);
            return send(&mut response_handle, builder.build_no_records(header)).await;
        }

        // In a negative answer the SOA's TTL is the negative-caching time (RFC 2308 §3).
        let soa = std::slice::from_ref(records.negative_soa());
        match lookup {
            Lookup::Refused => {
                header.set_response_code(ResponseCode::Refused);
                send(&mut response_handle, builder.build_no_records(header)).await
            }
            Lookup::NxDomain | Lookup::NoData => {
                header.set_authoritative(true);
                if lookup == Lookup::NxDomain {
                    header.set_response_code(ResponseCode::NXDomain);
                }
                let none: &[Record] = &[];
                let response = builder.build(header, none, none, soa, none);
                send(&mut response_handle, response).await
            }
            Lookup::Found {
                answers,
                additionals,
                wire_len,
            } => {
                header.set_authoritative(true);
                let question = name_wire_len(query.name()) + 4;
                let mut bound = FIXED_OVERHEAD + question + wire_len;
                let limit = usize::from(udp_limit);
                let mut additionals = additionals;
                if request.protocol() == Protocol::Udp && bound > limit {
                    // Glue is optional: keep what fits rather than truncate for it (RFC 2181
                    // §9), whole RRsets at a time (ns1's A set, its AAAA set). The answer
                    // itself must fit, or the client asks again over TCP.
                    let glue: usize = additionals.iter().map(record_wire_len).sum();
                    if bound - glue <= limit {
                        let mut room = limit - (bound - glue);
                        let mut kept: Vec<Record> = Vec::new();
                        for set in additionals.chunk_by(|a, b| {
                            a.name() == b.name() && a.record_type() == b.record_type()
                        }) {
                            let len: usize = set.iter().map(record_wire_len).sum();
                            if len <= room {
                                room -= len;
                                kept.extend_from_slice(set);
                            }
                        }
                        bound = limit - room;
                        additionals = std::borrow::Cow::Owned(kept);
                    }
                }
                if request.protocol() == Protocol::Udp && bound > limit {
                    // Whole RRsets or nothing: a partial TXT set would only be refused by the
                    // client, so send none and let it retry over TCP.
                    debug!(src = %request.src(), bound, udp_limit, "truncating UDP answer");
                    header.set_truncated(true);
                    return send(&mut response_handle, builder.build_no_records(header)).await;
                }
                let none: &[Record] = &[];
                let response =
                    builder.build(header, answers.iter(), none, none, additionals.iter());
                send(&mut response_handle, response).await
            }
        }
    }
}

async fn send<'a, R: ResponseHandler>(
    handle: &mut R,
    response: hickory_server::authority::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> ResponseInfo {
    let id = response.header().id();
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(error) => {
            // The client went away (TCP reset) or the socket failed: nothing to answer to.
            debug!(%error, "DNS response not sent");
            let mut h = Header::new();
            h.set_id(id);
            h.set_response_code(ResponseCode::ServFail);
            h.into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FORMERR answers to undecodable UDP queries are rate-limited like the handler's error
    /// answers: past the burst, some go with TC (slipped), the rest not at all.
    #[test]
    fn udp_formerr_answers_are_rate_limited() {
        let records = ZoneRecords::new(&crate::testzone::zone().1).unwrap();
        let handler = ZoneHandler::new(Arc::new(records));
        let forged: std::net::IpAddr = "203.0.113.9".parse().unwrap();
        let formerr = crate::server::formerr_for(&[0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0])
            .expect("a query header");
        let (mut sent, mut slipped) = (0, 0);
        for _ in 0..3 * crate::rrl::BURST {
            let mut answer = formerr.clone();
            if handler.admit_udp_formerr(forged, &mut answer) {
                sent += 1;
                slipped += usize::from(answer[2] & 0x02 != 0);
            }
        }
        // The burst goes; of the rest every SLIP-th goes with TC, the others not at all (a
        // token or two may come back while the loop runs on a slow machine).
        let burst = crate::rrl::BURST as usize;
        let over = 2 * burst;
        assert!(sent >= burst && sent <= burst + over / 2 + 5, "{sent} sent");
        assert!(
            slipped >= over / 2 - 5 && sent - slipped >= burst,
            "{slipped} slipped of {sent}"
        );
        // Loopback is never limited (it cannot be forged from outside).
        let mut answer = formerr.clone();
        for _ in 0..3 * crate::rrl::BURST {
            assert!(handler.admit_udp_formerr("127.0.0.1".parse().unwrap(), &mut answer));
        }
        assert_eq!(answer, formerr);
    }
}
