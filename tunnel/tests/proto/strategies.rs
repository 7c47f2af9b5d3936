//! proptest strategies producing valid protocol values.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use tunnel::proto::{
    ControlMsg, ErrorCode, Hello, Origin, PeerAddr, RefuseCode, ServiceInfo, ServiceProto,
    StreamHeader, StreamReply, UdpFlowOpen, Welcome,
};

pub fn name() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
}

/// Free text the wire takes ([`tunnel::proto::unfit_for_logs`] left out); 64 chars of at most
/// 4 bytes stay within 256 bytes.
pub fn text(max_chars: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[^\\p{{Cc}}]{{0,{max_chars}}}"))
        .expect("valid regex")
        .prop_filter("log-safe text", |t| {
            !t.chars().any(tunnel::proto::unfit_for_logs)
        })
}

pub fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port))),
        // Flow info and scope id are not carried on the wire, so generate them as zero.
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(ip),
            port,
            0,
            0
        ))),
    ]
}

pub fn origin() -> impl Strategy<Value = Origin> {
    prop_oneof![
        addr().prop_map(Origin::Public),
        (name(), proptest::option::of(addr()))
            .prop_map(|(name, addr)| Origin::Device { name, addr }),
    ]
}

pub fn stream_header() -> impl Strategy<Value = StreamHeader> {
    prop_oneof![
        (name(), name(), origin()).prop_map(|(app, service, origin)| StreamHeader::Open {
            app,
            service,
            origin
        }),
        (name(), name(), name()).prop_map(|(app, to_device, service)| StreamHeader::Relay {
            app,
            to_device,
            service
        }),
        Just(StreamHeader::Control),
    ]
}

/// Refuse codes; `Unknown` only with unassigned values (an assigned one decodes as known).
pub fn refuse_code() -> impl Strategy<Value = RefuseCode> {
    prop_oneof![
        (1u8..=8).prop_map(RefuseCode::from_u8),
        prop_oneof![Just(0u8), 9u8..=255].prop_map(RefuseCode::Unknown),
    ]
}

pub fn stream_reply() -> impl Strategy<Value = StreamReply> {
    prop_oneof![
        Just(StreamReply::Accepted),
        (refuse_code(), text(64)).prop_map(|(code, reason)| StreamReply::Refused { code, reason }),
    ]
}

pub fn services() -> impl Strategy<Value = Vec<ServiceInfo>> {
    btree_map(name(), any::<bool>(), 0..20).prop_map(|m| {
        m.into_iter()
            .map(|(name, udp)| ServiceInfo {
                name,
                proto: if udp {
                    ServiceProto::Udp
                } else {
                    ServiceProto::Tcp
                },
            })
            .collect()
    })
}

fn zone_config() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..512)
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        (1u16..=3).prop_map(ErrorCode::from_u16),
        prop_oneof![Just(0u16), 4u16..=u16::MAX].prop_map(ErrorCode::Unknown),
    ]
}

pub fn control_msg() -> impl Strategy<Value = ControlMsg> {
    prop_oneof![
        (
            // Only our own version decodes (another one's Hello is refused as such).
            Just(tunnel::proto::CONTROL_VERSION),
            name(),
            services(),
            any::<u64>(),
            proptest::option::of(zone_config()),
            text(16)
        )
            .prop_map(
                |(proto_version, device, services, zone_serial, zone_config, agent_version)| {
                    ControlMsg::Hello(Hello {
                        proto_version,
                        device,
                        services,
                        zone_serial,
                        zone_config,
                        agent_version,
                    })
                }
            ),
        (
            any::<u64>(),
            addr(),
            any::<u64>(),
            proptest::option::of(zone_config()),
            any::<u32>()
        )
            .prop_map(
                |(session_id, observed_addr, zone_serial, zone_config, keepalive_ms)| {
                    ControlMsg::Welcome(Welcome {
                        session_id,
                        observed_addr,
                        zone_serial,
                        zone_config,
                        keepalive_ms,
                    })
                }
            ),
        (any::<u64>(), zone_config()).prop_map(|(zone_serial, zone_config)| {
            ControlMsg::ConfigUpdate {
                zone_serial,
                zone_config,
            }
        }),
        services().prop_map(|services| ControlMsg::ServicesUpdate { services }),
        (any::<u32>(), text(64))
            .prop_map(|(grace_ms, reason)| ControlMsg::Drain { grace_ms, reason }),
        (any::<u32>(), name(), name(), origin()).prop_map(|(flow_id, app, service, origin)| {
            ControlMsg::UdpFlowOpen(UdpFlowOpen {
                flow_id,
                app,
                service,
                origin,
            })
        }),
        any::<u32>().prop_map(|flow_id| ControlMsg::UdpFlowClose { flow_id }),
        (name(), vec(addr(), 0..=8), any::<u64>()).prop_map(|(device, addrs, punch_nonce)| {
            ControlMsg::PeerAddr(PeerAddr {
                device,
                addrs,
                punch_nonce,
            })
        }),
        name().prop_map(|device| ControlMsg::PunchRequest { device }),
        (name(), name()).prop_map(|(device, service)| ControlMsg::PermitRevoke { device, service }),
        vec((name(), name()), 0..=8).prop_map(|permits| ControlMsg::PermitsHeld { permits }),
        vec(addr(), 0..=4).prop_map(|addrs| ControlMsg::LocalAddrs { addrs }),
        any::<u32>().prop_map(|idle_ms| ControlMsg::UdpFlowIdle { idle_ms }),
        any::<u64>().prop_map(|nonce| ControlMsg::Ping { nonce }),
        any::<u64>().prop_map(|nonce| ControlMsg::Pong { nonce }),
        (error_code(), text(64)).prop_map(|(code, message)| ControlMsg::Error { code, message }),
    ]
}
