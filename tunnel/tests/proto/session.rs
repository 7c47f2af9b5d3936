//! The control session state machine, driven as an in-memory agent/gateway pair through the
//! real encoder and decoder.

use std::net::SocketAddr;

use tunnel::proto::{
    encode_control, ControlMsg, ControlSession, ErrorCode, Event, FrameDecoder, Hello, Origin,
    PeerAddr, ServiceInfo, ServiceProto, SessionError, Welcome, CONTROL_VERSION,
};

fn hello(version: u16) -> Hello {
    Hello {
        proto_version: version,
        device: "home1".into(),
        services: vec![ServiceInfo {
            name: "dns".into(),
            proto: ServiceProto::Udp,
        }],
        zone_serial: 3,
        zone_config: None,
        agent_version: "0.1.0".into(),
    }
}

fn welcome() -> Welcome {
    Welcome {
        session_id: 77,
        observed_addr: "198.51.100.2:40000".parse().unwrap(),
        zone_serial: 3,
        zone_config: None,
        keepalive_ms: 10_000,
    }
}

/// Moves every queued message from `from` to `to` through bytes; returns `to`'s events.
fn pump(from: &mut ControlSession, to: &mut ControlSession) -> Result<Vec<Event>, SessionError> {
    let mut bytes = Vec::new();
    while let Some(m) = from.poll_transmit() {
        encode_control(&m, &mut bytes).unwrap();
    }
    let mut dec = FrameDecoder::new();
    dec.push(&bytes).unwrap();
    loop {
        match dec.next_msg() {
            Ok(Some(m)) => to.handle(m)?,
            Ok(None) => break,
            // As the control stream's I/O does with bytes that are no message.
            Err(e) => return Err(to.reject_undecodable(&e)),
        }
    }
    Ok(std::iter::from_fn(|| to.poll_event()).collect())
}

fn established() -> (ControlSession, ControlSession) {
    let mut agent = ControlSession::agent(hello(CONTROL_VERSION));
    let mut gw = ControlSession::gateway();
    let events = pump(&mut agent, &mut gw).unwrap();
    assert_eq!(events, vec![Event::Hello(hello(CONTROL_VERSION))]);
    assert!(!gw.is_established());
    gw.welcome(welcome()).unwrap();
    assert_eq!(
        pump(&mut gw, &mut agent).unwrap(),
        vec![Event::Welcome(welcome())]
    );
    assert_eq!((agent.session_id(), gw.session_id()), (Some(77), Some(77)));
    assert!(agent.is_established() && gw.is_established());
    (agent, gw)
}

#[test]
fn handshake_and_ping() {
    let (mut agent, mut gw) = established();
    agent.send_ping(1).unwrap();
    agent.send_ping(2).unwrap();
    assert!(pump(&mut agent, &mut gw).unwrap().is_empty());
    // Both pings are answered; only the latest counts.
    assert_eq!(
        pump(&mut gw, &mut agent).unwrap(),
        vec![Event::Pong { nonce: 2 }]
    );
}

#[test]
fn hello_must_come_first_and_once() {
    let mut gw = ControlSession::gateway();
    let err = gw.handle(ControlMsg::Ping { nonce: 1 }).unwrap_err();
    assert_eq!(
        err,
        SessionError::Unexpected {
            msg: "Ping",
            state: "awaiting Hello"
        }
    );
    assert!(gw.is_closed());
    // The peer is told why before the connection closes.
    assert!(matches!(
        gw.poll_transmit(),
        Some(ControlMsg::Error {
            code: ErrorCode::ProtocolViolation,
            ..
        })
    ));
    assert_eq!(
        gw.handle(ControlMsg::Ping { nonce: 1 }),
        Err(SessionError::Closed)
    );

    let (_, mut gw) = established();
    assert!(matches!(
        gw.handle(ControlMsg::Hello(hello(CONTROL_VERSION))),
        Err(SessionError::Unexpected { msg: "Hello", .. })
    ));
}

#[test]
fn welcome_only_once_and_only_from_gateway() {
    let (mut agent, mut gw) = established();
    assert!(agent.handle(ControlMsg::Welcome(welcome())).is_err());
    assert!(gw.welcome(welcome()).is_err());
    let mut agent = ControlSession::agent(hello(CONTROL_VERSION));
    assert!(agent.welcome(welcome()).is_err());
}

#[test]
fn version_mismatch_is_refused_with_error() {
    let mut agent = ControlSession::agent(hello(CONTROL_VERSION + 1));
    let mut gw = ControlSession::gateway();
    assert_eq!(
        pump(&mut agent, &mut gw),
        Err(SessionError::VersionMismatch(
            CONTROL_VERSION + 1,
            CONTROL_VERSION
        ))
    );
    let events = pump(&mut gw, &mut agent).unwrap();
    assert!(matches!(
        &events[..],
        [Event::PeerError {
            code: ErrorCode::VersionMismatch,
            ..
        }]
    ));
    assert!(agent.is_closed());
}

#[test]
fn udp_flows() {
    let (mut agent, mut gw) = established();
    let origin = Origin::Public("192.0.2.1:5353".parse().unwrap());
    let a = gw
        .open_udp_flow("dns".into(), "dns".into(), origin.clone())
        .unwrap();
    let b = gw
        .open_udp_flow("dns".into(), "dns".into(), origin)
        .unwrap();
    assert_ne!(a, b);
    let events = pump(&mut gw, &mut agent).unwrap();
    assert!(matches!(
        &events[..],
        [Event::UdpFlowOpen(_), Event::UdpFlowOpen(_)]
    ));
    assert_eq!(agent.open_flows(), 2);
    agent.close_udp_flow(a).unwrap();
    assert_eq!(
        pump(&mut agent, &mut gw).unwrap(),
        vec![Event::UdpFlowClose { flow_id: a }]
    );
    // A close racing with the other side's close is not an error.
    gw.handle(ControlMsg::UdpFlowClose { flow_id: a }).unwrap();
    assert_eq!(gw.open_flows(), 1);
    // A reused open id is a violation.
    let dup = tunnel::proto::UdpFlowOpen {
        flow_id: b,
        app: "dns".into(),
        service: "dns".into(),
        origin: Origin::Device {
            name: "home2".into(),
            addr: None,
        },
    };
    assert_eq!(
        agent.handle(ControlMsg::UdpFlowOpen(dup)),
        Err(SessionError::DuplicateFlow(b))
    );
}

#[test]
fn drain_stops_new_flows() {
    let (mut agent, mut gw) = established();
    gw.drain(5_000, "upgrade\nnow").unwrap();
    assert!(gw.is_draining());
    let events = pump(&mut gw, &mut agent).unwrap();
    // Control characters in local text are replaced, not sent.
    assert_eq!(
        events,
        vec![Event::Drain {
            grace_ms: 5_000,
            reason: "upgrade now".into()
        }]
    );
    assert!(agent.is_draining());
    let origin = Origin::Public("192.0.2.1:1".parse().unwrap());
    assert!(gw.open_udp_flow("a".into(), "b".into(), origin).is_err());
    // Existing work carries on: pings still work while draining.
    agent.send_ping(9).unwrap();
    pump(&mut agent, &mut gw).unwrap();
    assert_eq!(
        pump(&mut gw, &mut agent).unwrap(),
        vec![Event::Pong { nonce: 9 }]
    );
}

#[test]
fn punching_and_updates() {
    let (mut agent, mut gw) = established();
    agent.request_punch("home3".into()).unwrap();
    agent
        .send_permits_held(vec![("home3".into(), "ssh".into())])
        .unwrap();
    let lan: SocketAddr = "192.168.2.11:41000".parse().unwrap();
    agent.send_local_addrs(vec![lan]).unwrap();
    agent.send_services_update(vec![]).unwrap();
    agent.send_config_update(4, b"{}".to_vec()).unwrap();
    assert_eq!(
        pump(&mut agent, &mut gw).unwrap(),
        vec![
            Event::PunchRequest {
                device: "home3".into()
            },
            Event::PermitsHeld {
                permits: vec![("home3".into(), "ssh".into())]
            },
            Event::LocalAddrs { addrs: vec![lan] },
            Event::ServicesUpdate { services: vec![] },
            Event::ConfigUpdate {
                zone_serial: 4,
                zone_config: b"{}".to_vec()
            },
        ]
    );
    let addr: SocketAddr = "203.0.113.5:4433".parse().unwrap();
    let peer = PeerAddr {
        device: "home3".into(),
        addrs: vec![addr],
        punch_nonce: 5,
    };
    gw.send_peer_addr(peer.clone()).unwrap();
    assert_eq!(
        pump(&mut gw, &mut agent).unwrap(),
        vec![Event::PeerAddr(peer)]
    );
    gw.send_udp_flow_idle(600_000).unwrap();
    assert_eq!(
        pump(&mut gw, &mut agent).unwrap(),
        vec![Event::UdpFlowIdle { idle_ms: 600_000 }]
    );
    assert!(agent.send_udp_flow_idle(1).is_err());
    gw.send_permit_revoke("home3".into(), "ssh".into()).unwrap();
    assert_eq!(
        pump(&mut gw, &mut agent).unwrap(),
        vec![Event::PermitRevoke {
            device: "home3".into(),
            service: "ssh".into()
        }]
    );
    // Role checks: an agent cannot drain or revoke permits, a gateway cannot request
    // punching, nor take a permit revocation.
    assert!(agent.drain(1, "x").is_err());
    assert!(agent.send_permit_revoke("x".into(), "y".into()).is_err());
    assert!(gw.request_punch("home1".into()).is_err());
    assert!(gw.send_local_addrs(vec![lan]).is_err());
    // Unknown messages from newer peers are ignored.
    gw.handle(ControlMsg::Unknown { ty: 99 }).unwrap();
    assert!(gw.is_established());
    // A permit revocation sent to a gateway is a protocol violation.
    assert!(gw
        .handle(ControlMsg::PermitRevoke {
            device: "x".into(),
            service: "y".into()
        })
        .is_err());
}

#[test]
fn agent_refuses_agent_messages() {
    let (mut agent, _) = established();
    assert!(matches!(
        agent.handle(ControlMsg::PunchRequest { device: "x".into() }),
        Err(SessionError::Unexpected {
            msg: "PunchRequest",
            state: "established"
        })
    ));
}
