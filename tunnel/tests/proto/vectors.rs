//! Known-answer byte vectors: the wire format is pinned here so it cannot change by accident.
//! Changing one of these means a protocol version bump.

use std::net::SocketAddr;

use tunnel::proto::{
    decode_control, decode_datagram, decode_stream_header, decode_stream_reply, encode_control,
    encode_datagram, encode_stream_header, encode_stream_reply, ControlMsg, ErrorCode, Hello,
    Origin, PeerAddr, RefuseCode, ServiceInfo, ServiceProto, StreamHeader, StreamReply,
    UdpFlowOpen, Welcome,
};

pub fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

pub fn header_vectors() -> Vec<(&'static str, StreamHeader, Vec<u8>)> {
    vec![
        ("control", StreamHeader::Control, hex("5a47 01 0001 03")),
        (
            "open_public_v4",
            StreamHeader::Open {
                app: "web".into(),
                service: "http".into(),
                origin: Origin::Public(addr("203.0.113.7:54321")),
            },
            hex("5a47 01 0012 01 03776562 0468747470 01 04cb007107 d431"),
        ),
        (
            "open_device_v6",
            StreamHeader::Open {
                app: "etcd-peers".into(),
                service: "etcd-peer".into(),
                origin: Origin::Device {
                    name: "home1".into(),
                    addr: Some(addr("[2001:db8::1]:443")),
                },
            },
            hex("5a47 01 0030 01 0a657463642d7065657273 09657463642d70656572
                 02 05686f6d6531 06 20010db8000000000000000000000001 01bb"),
        ),
        (
            "open_device_no_addr",
            StreamHeader::Open {
                app: "ssh".into(),
                service: "ssh".into(),
                origin: Origin::Device {
                    name: "laptop".into(),
                    addr: None,
                },
            },
            hex("5a47 01 0012 01 03737368 03737368 02 066c6170746f70 00"),
        ),
        (
            "relay",
            StreamHeader::Relay {
                app: "sync".into(),
                to_device: "home1".into(),
                service: "dfs".into(),
            },
            hex("5a47 01 0010 02 0473796e63 05686f6d6531 03646673"),
        ),
    ]
}

pub fn reply_vectors() -> Vec<(&'static str, StreamReply, Vec<u8>)> {
    vec![
        ("accepted", StreamReply::Accepted, hex("00")),
        (
            "refused_policy",
            StreamReply::Refused {
                code: RefuseCode::PolicyDenied,
                reason: "no".into(),
            },
            hex("01 02 02 6e6f"),
        ),
        (
            "refused_unknown",
            StreamReply::Refused {
                code: RefuseCode::Unknown(200),
                reason: String::new(),
            },
            hex("01 c8 00"),
        ),
    ]
}

pub fn control_vectors() -> Vec<(&'static str, ControlMsg, Vec<u8>)> {
    vec![
        (
            "hello",
            ControlMsg::Hello(Hello {
                proto_version: 1,
                device: "home1".into(),
                services: vec![
                    ServiceInfo {
                        name: "web".into(),
                        proto: ServiceProto::Tcp,
                    },
                    ServiceInfo {
                        name: "dns".into(),
                        proto: ServiceProto::Udp,
                    },
                ],
                zone_serial: 42,
                zone_config: Some(vec![0xab, 0xcd]),
                agent_version: "0.1.0".into(),
            }),
            hex(
                "01 25 0001 05686f6d6531 02 0377656201 03646e7302 000000000000002a
                 01 02abcd 05302e312e30",
            ),
        ),
        (
            "welcome",
            ControlMsg::Welcome(Welcome {
                session_id: 1,
                observed_addr: addr("198.51.100.2:40000"),
                zone_serial: 7,
                zone_config: None,
                keepalive_ms: 15_000,
            }),
            hex("02 1c 0000000000000001 04c6336402 9c40 0000000000000007 00 00003a98"),
        ),
        (
            "config_update",
            ControlMsg::ConfigUpdate {
                zone_serial: 8,
                zone_config: b"{}".to_vec(),
            },
            hex("03 0b 0000000000000008 02 7b7d"),
        ),
        (
            "services_update_empty",
            ControlMsg::ServicesUpdate { services: vec![] },
            hex("04 01 00"),
        ),
        (
            "drain",
            ControlMsg::Drain {
                grace_ms: 30_000,
                reason: "bye".into(),
            },
            hex("05 08 00007530 03627965"),
        ),
        (
            "udp_flow_open",
            ControlMsg::UdpFlowOpen(UdpFlowOpen {
                flow_id: 300,
                app: "dns".into(),
                service: "dns".into(),
                origin: Origin::Public(addr("192.0.2.1:53")),
            }),
            hex("06 12 412c 03646e73 03646e73 01 04c0000201 0035"),
        ),
        (
            "udp_flow_close",
            ControlMsg::UdpFlowClose { flow_id: 5 },
            hex("07 01 05"),
        ),
        (
            "peer_addr",
            ControlMsg::PeerAddr(PeerAddr {
                device: "home3".into(),
                addrs: vec![addr("192.0.2.9:4433")],
                punch_nonce: 0x0102_0304_0506_0708,
            }),
            hex("08 16 05686f6d6533 01 04c0000209 1151 0102030405060708"),
        ),
        (
            "punch_request",
            ControlMsg::PunchRequest {
                device: "home1".into(),
            },
            hex("09 06 05686f6d6531"),
        ),
        (
            "permit_revoke",
            ControlMsg::PermitRevoke {
                device: "home2".into(),
                service: "ssh".into(),
            },
            hex("0d 0a 05686f6d6532 03737368"),
        ),
        (
            "permits_held",
            ControlMsg::PermitsHeld {
                permits: vec![("home2".into(), "ssh".into())],
            },
            hex("0e 0b 01 05686f6d6532 03737368"),
        ),
        (
            "local_addrs",
            ControlMsg::LocalAddrs {
                addrs: vec![addr("192.168.2.11:4433"), addr("[fd00::11]:4433")],
            },
            hex("0f 1b 02 04c0a8020b1151 06fd000000000000000000000000000011 1151"),
        ),
        (
            "udp_flow_idle",
            ControlMsg::UdpFlowIdle { idle_ms: 600_000 },
            hex("10 04 000927c0"),
        ),
        (
            "ping",
            ControlMsg::Ping {
                nonce: 0x0102_0304_0506_0708,
            },
            hex("0a 08 0102030405060708"),
        ),
        (
            "pong",
            ControlMsg::Pong { nonce: 0 },
            hex("0b 08 0000000000000000"),
        ),
        (
            "error",
            ControlMsg::Error {
                code: ErrorCode::VersionMismatch,
                message: "v2".into(),
            },
            hex("0c 05 0002 027632"),
        ),
    ]
}

pub fn datagram_vectors() -> Vec<(&'static str, u32, Vec<u8>, Vec<u8>)> {
    vec![
        ("small", 5, b"hi".to_vec(), hex("05 6869")),
        ("two_byte_id", 300, b"x".to_vec(), hex("412c 78")),
        ("empty_payload", 0, vec![], hex("00")),
        ("max_id", u32::MAX, vec![1], hex("c0000000ffffffff 01")),
    ]
}

#[test]
fn stream_headers() {
    for (name, value, bytes) in header_vectors() {
        let mut out = Vec::new();
        encode_stream_header(&value, &mut out).unwrap();
        assert_eq!(out, bytes, "{name}");
        assert_eq!(
            decode_stream_header(&bytes),
            Ok(Some((value, bytes.len()))),
            "{name}"
        );
    }
}

#[test]
fn stream_replies() {
    for (name, value, bytes) in reply_vectors() {
        let mut out = Vec::new();
        encode_stream_reply(&value, &mut out).unwrap();
        assert_eq!(out, bytes, "{name}");
        assert_eq!(
            decode_stream_reply(&bytes),
            Ok(Some((value, bytes.len()))),
            "{name}"
        );
    }
}

/// Every message type that is encoded, by [`ControlMsg::name`]. The match has no `_` arm: a
/// new message type does not compile here until it has an arm, which is the reminder to add
/// its name to the list below; [`control_messages`] and
/// [`the_strategy_makes_every_message_type`] then fail until it has a vector and a strategy.
/// (Nothing ties the list to the match: an arm added without its name goes unchecked.)
pub fn every_control_type() -> Vec<&'static str> {
    fn listed(m: &ControlMsg) {
        match m {
            ControlMsg::Hello(_)
            | ControlMsg::Welcome(_)
            | ControlMsg::ConfigUpdate { .. }
            | ControlMsg::ServicesUpdate { .. }
            | ControlMsg::Drain { .. }
            | ControlMsg::UdpFlowOpen(_)
            | ControlMsg::UdpFlowClose { .. }
            | ControlMsg::PeerAddr(_)
            | ControlMsg::PunchRequest { .. }
            | ControlMsg::PermitRevoke { .. }
            | ControlMsg::PermitsHeld { .. }
            | ControlMsg::LocalAddrs { .. }
            | ControlMsg::UdpFlowIdle { .. }
            | ControlMsg::Ping { .. }
            | ControlMsg::Pong { .. }
            | ControlMsg::Error { .. } => {}
            // Never encoded: what a decoder makes of a type it does not know.
            ControlMsg::Unknown { .. } => {}
        }
    }
    let _ = listed;
    vec![
        "Hello",
        "Welcome",
        "ConfigUpdate",
        "ServicesUpdate",
        "Drain",
        "UdpFlowOpen",
        "UdpFlowClose",
        "PeerAddr",
        "PunchRequest",
        "PermitRevoke",
        "PermitsHeld",
        "LocalAddrs",
        "UdpFlowIdle",
        "Ping",
        "Pong",
        "Error",
    ]
}

#[test]
fn control_messages() {
    let vectors = control_vectors();
    // One vector per message type, so a new type cannot go unpinned.
    let mut pinned: Vec<_> = vectors.iter().map(|(_, m, _)| m.name()).collect();
    pinned.sort_unstable();
    pinned.dedup();
    let mut every = every_control_type();
    every.sort_unstable();
    assert_eq!(pinned, every, "message types with a vector");
    for (name, value, bytes) in vectors {
        let mut out = Vec::new();
        encode_control(&value, &mut out).unwrap();
        assert_eq!(out, bytes, "{name}");
        assert_eq!(
            decode_control(&bytes),
            Ok(Some((value, bytes.len()))),
            "{name}"
        );
    }
}

#[test]
fn datagrams() {
    for (name, flow_id, payload, bytes) in datagram_vectors() {
        let mut out = Vec::new();
        encode_datagram(flow_id, &payload, &mut out).unwrap();
        assert_eq!(out, bytes, "{name}");
        assert_eq!(
            decode_datagram(&bytes),
            Ok((flow_id, &payload[..])),
            "{name}"
        );
    }
}

/// The round-trip property tests' strategy makes every message type (a deterministic runner;
/// 16 types drawn 2,000 times miss one with a probability below 10^-50).
#[test]
fn the_strategy_makes_every_message_type() {
    use proptest::strategy::{Strategy, ValueTree};
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = super::strategies::control_msg();
    let mut made: Vec<_> = (0..2000)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current().name())
        .collect();
    made.sort_unstable();
    made.dedup();
    let mut every = every_control_type();
    every.sort_unstable();
    assert_eq!(made, every, "message types the strategy makes");
}
