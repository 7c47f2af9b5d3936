//! Zone-config bootstrap over DNS: fetch the TXT strings at `_zonegate.DOMAIN` from one server,
//! reassemble them and verify them against the pinned zone key.
//!
//! Nothing in the answer is trusted before verification: the DNS server (or anybody on the path)
//! may forge, cut or replay it. The signature decides authenticity, the chunk headers decide
//! completeness, and `known_serial` refuses a replay of an older config.

use std::net::SocketAddr;
use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use hickory_client::client::{Client, ClientHandle};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use hickory_proto::runtime::TokioRuntimeProvider;
use hickory_proto::tcp::TcpClientStream;
use hickory_proto::udp::UdpClientStream;
use hickory_proto::xfer::DnsResponse;
use time::OffsetDateTime;
use tracing::{debug, info};
use zone_core::{Domain, SignedZone, ZoneError};

use crate::error::BootstrapError;
use crate::records::TXT_LABEL;

/// Time for one UDP query. A gateway on the other side of the world answers in well under a
/// second; the rest covers a lost datagram being noticed.
pub const UDP_TIMEOUT: Duration = Duration::from_secs(3);
/// Time for connecting over TCP.
pub const TCP_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for the whole TCP answer once connected: a config of tens of KB over a slow or lossy
/// link takes seconds (the server gives a connection that owes an answer 30 s, too).
pub const TCP_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Fetches, reassembles and verifies the zone config of `domain` from the DNS server `server`.
///
/// Asks over UDP first and over TCP when the answer is truncated (the config is usually larger
/// than a UDP answer may be), UDP gets no answer, or its answer is an error, holds no config
/// or holds one that is refused (a network answering port 53 itself, something on the path
/// cutting or forging answers: TCP has a say too before a node without a zone.json fails to
/// start). Refuses a config that does not verify against `zone_key`, is incomplete, is for
/// another domain, has expired, or has a serial below `known_serial`.
pub async fn fetch_zone(
    domain: &Domain,
    server: SocketAddr,
    zone_key: &VerifyingKey,
    known_serial: Option<u64>,
) -> Result<SignedZone, BootstrapError> {
    let (strings, over_udp) = fetch_strings(domain, server).await?;
    let udp_err = match verified(domain, server, zone_key, known_serial, &strings) {
        Ok(zone) => return Ok(zone),
        Err(e) if over_udp => e,
        Err(e) => return Err(e),
    };
    let qname = txt_name(domain, server)?;
    let tcp = query_tcp(server, qname.clone())
        .await
        .and_then(|r| strings_of(&r, &qname, server))
        .and_then(|strings| verified(domain, server, zone_key, known_serial, &strings));
    match tcp {
        Ok(zone) => {
            info!(%server, udp = %udp_err, "zone config answered over TCP where UDP's answer was refused");
            Ok(zone)
        }
        Err(tcp_err) if tcp_err.to_string() == udp_err.to_string() => Err(tcp_err),
        Err(tcp_err) => Err(BootstrapError::Both {
            udp: Box::new(udp_err),
            tcp: Box::new(tcp_err),
        }),
    }
}

/// The config `strings` hold, verified as [`fetch_zone`] says.
fn verified(
    domain: &Domain,
    server: SocketAddr,
    zone_key: &VerifyingKey,
    known_serial: Option<u64>,
    strings: &[String],
) -> Result<SignedZone, BootstrapError> {
    let zone = zone_core::txt::from_txt(strings)
        .map_err(|source| BootstrapError::Malformed { server, source })?;
    zone.verify_newer_than(zone_key, OffsetDateTime::now_utc(), known_serial)
        .map_err(|source| match source {
            ZoneError::BadSignature | ZoneError::ForeignZone { .. } => {
                BootstrapError::Forged { server, source }
            }
            ZoneError::StaleSerial { .. } => BootstrapError::Stale { server, source },
            ZoneError::Expired(_) => BootstrapError::Expired { server, source },
            // Signed by the zone key but inconsistent: the owner's problem, still unusable.
            source => BootstrapError::Malformed { server, source },
        })?;
    if &zone.config.domain != domain {
        // The same zone key may sign configs of several domains; a config is only good for its own.
        return Err(BootstrapError::WrongDomain {
            server,
            asked: domain.to_string(),
            found: zone.config.domain.to_string(),
        });
    }
    info!(%domain, %server, serial = zone.config.serial, "zone config fetched over DNS and verified");
    Ok(zone)
}

/// The TXT strings at `_zonegate.DOMAIN`, in the order the server sent them (the chunk headers
/// make order irrelevant anyway).
pub async fn fetch_txt(domain: &Domain, server: SocketAddr) -> Result<Vec<String>, BootstrapError> {
    fetch_strings(domain, server).await.map(|(s, _)| s)
}

/// `_zonegate.DOMAIN` as a DNS name.
fn txt_name(domain: &Domain, server: SocketAddr) -> Result<Name, BootstrapError> {
    Name::from_ascii(format!("{TXT_LABEL}.{domain}.")).map_err(|e| BootstrapError::Unreachable {
        server,
        name: format!("{TXT_LABEL}.{domain}"),
        proto: "-",
        why: format!("not a DNS name: {e}"),
    })
}

/// [`fetch_txt`], and whether the strings came over UDP (an answer TCP may still correct).
async fn fetch_strings(
    domain: &Domain,
    server: SocketAddr,
) -> Result<(Vec<String>, bool), BootstrapError> {
    let qname = txt_name(domain, server)?;
    let name = qname.to_ascii();
    match query_udp(server, qname.clone()).await {
        Ok(r) if !r.truncated() => match strings_of(&r, &qname, server) {
            Ok(strings) => Ok((strings, true)),
            // An error or an empty answer over UDP may be a network's own (one that answers
            // port 53 itself: a hotel's, a captive portal's) or a forged one: TCP has a say
            // too before the node gives up — and a node without a zone.json, its start.
            Err(udp_err) => match query_tcp(server, qname.clone())
                .await
                .and_then(|r| strings_of(&r, &qname, server))
            {
                Ok(strings) => {
                    info!(%server, %name, udp = %udp_err, "zone config answered over TCP where UDP's answer was an error");
                    Ok((strings, false))
                }
                // The same answer both ways: said once.
                Err(tcp_err) if tcp_err.to_string() == udp_err.to_string() => Err(tcp_err),
                Err(tcp_err) => Err(BootstrapError::Both {
                    udp: Box::new(udp_err),
                    tcp: Box::new(tcp_err),
                }),
            },
        },
        Ok(_) => {
            debug!(%server, %name, "truncated over UDP, asking over TCP");
            // UDP reached the server: a TCP failure now is most likely a firewall's.
            let r =
                query_tcp(server, qname.clone())
                    .await
                    .map_err(|e| BootstrapError::TcpNeeded {
                        server,
                        tcp: Box::new(e),
                    })?;
            strings_of(&r, &qname, server).map(|s| (s, false))
        }
        // Some networks drop UDP to port 53 but let TCP through: one more chance before failing.
        Err(udp_err) => match query_tcp(server, qname.clone()).await {
            Ok(r) => strings_of(&r, &qname, server).map(|s| (s, false)),
            Err(tcp_err) => Err(BootstrapError::Both {
                udp: Box::new(udp_err),
                tcp: Box::new(tcp_err),
            }),
        },
    }
}

/// The `_zonegate` TXT strings of one answer, or why it has none.
fn strings_of(
    response: &DnsResponse,
    qname: &Name,
    server: SocketAddr,
) -> Result<Vec<String>, BootstrapError> {
    let name = qname.to_ascii();
    if response.truncated() {
        return Err(BootstrapError::Truncated { server, name });
    }
    let rcode = response.response_code();
    if rcode != ResponseCode::NoError {
        let hint = match rcode {
            ResponseCode::Refused => "the server is not authoritative for this domain (wrong server, or the gateway serves another zone)",
            ResponseCode::NXDomain => "no such name: the server does not publish a zonegate config for this domain",
            ResponseCode::ServFail => "the server failed: see its logs",
            _ => "unexpected answer",
        };
        return Err(BootstrapError::Rcode {
            server,
            name,
            rcode: rcode.to_string(),
            hint,
        });
    }
    let mut strings = Vec::new();
    for record in response.answers() {
        // Name equality is case-insensitive, as DNS is.
        if record.name() != qname {
            continue;
        }
        if let RData::TXT(txt) = record.data() {
            for s in txt.iter() {
                // zonegate chunks are ASCII; anything else is not ours and is left to
                // reassembly, which ignores strings without its prefix.
                strings.push(String::from_utf8_lossy(s).into_owned());
            }
        }
    }
    if strings.is_empty() {
        return Err(BootstrapError::NoRecord { server, name });
    }
    Ok(strings)
}

async fn query_udp(server: SocketAddr, qname: Name) -> Result<DnsResponse, BootstrapError> {
    let unreachable = |why: String| BootstrapError::Unreachable {
        server,
        name: qname.to_ascii(),
        proto: "UDP",
        why,
    };
    let conn = UdpClientStream::builder(server, TokioRuntimeProvider::new())
        .with_timeout(Some(UDP_TIMEOUT))
        .build();
    let (mut client, bg) = Client::connect(conn)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let bg = tokio::spawn(bg);
    let r = tokio::time::timeout(
        UDP_TIMEOUT,
        client.query(qname.clone(), DNSClass::IN, RecordType::TXT),
    )
    .await;
    bg.abort();
    match r {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => Err(unreachable(e.to_string())),
        Err(_) => Err(unreachable(format!("no answer within {UDP_TIMEOUT:?}"))),
    }
}

async fn query_tcp(server: SocketAddr, qname: Name) -> Result<DnsResponse, BootstrapError> {
    let unreachable = |why: String| BootstrapError::Unreachable {
        server,
        name: qname.to_ascii(),
        proto: "TCP",
        why,
    };
    let (conn, handle) =
        TcpClientStream::new(server, None, Some(TCP_TIMEOUT), TokioRuntimeProvider::new());
    let fut = async {
        let (mut client, bg) = Client::with_timeout(conn, handle, TCP_ANSWER_TIMEOUT, None)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let bg = tokio::spawn(bg);
        let r = client
            .query(qname.clone(), DNSClass::IN, RecordType::TXT)
            .await
            .map_err(|e| unreachable(e.to_string()));
        bg.abort();
        r
    };
    tokio::time::timeout(TCP_TIMEOUT + TCP_ANSWER_TIMEOUT, fut)
        .await
        .map_err(|_| {
            unreachable(format!(
                "no whole answer within {:?} (a slow link?)",
                TCP_TIMEOUT + TCP_ANSWER_TIMEOUT
            ))
        })?
}
