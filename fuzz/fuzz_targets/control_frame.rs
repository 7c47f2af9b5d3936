//! Fuzzes the control stream: the first input byte picks a chunk size, the rest is fed to a
//! `FrameDecoder` in chunks of that size. Checks: no panic; the decoder yields exactly what
//! the pure `decode_control` yields on the whole stream (and fails where it fails); every known
//! message re-encodes to the bytes it came from; the session roles, past their handshake and
//! with local actions between messages, survive every message: an error closes a session
//! after queueing its `Error`, a closed session takes nothing, flows stay within their bound.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use tunnel::proto::limits::MAX_UDP_FLOWS;
use tunnel::proto::{
    decode_control, encode_control, ControlMsg, ControlSession, Event, FrameDecoder, Hello, Origin,
    Welcome, CONTROL_VERSION,
};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk) + 1;

    let mut decoder = FrameDecoder::new();
    let mut via_decoder = Vec::new();
    let mut decoder_failed = false;
    'feed: for piece in stream.chunks(chunk) {
        decoder
            .push(piece)
            .expect("small chunks, drained after each push");
        loop {
            match decoder.next_msg() {
                Ok(Some(msg)) => via_decoder.push(msg),
                Ok(None) => break,
                Err(_) => {
                    decoder_failed = true;
                    break 'feed;
                }
            }
        }
    }

    let mut via_pure = Vec::new();
    let mut pure_failed = false;
    let mut pos = 0;
    loop {
        match decode_control(&stream[pos..]) {
            Ok(Some((msg, used))) => {
                if !matches!(msg, ControlMsg::Unknown { .. }) {
                    let mut out = Vec::new();
                    encode_control(&msg, &mut out).expect("a decoded message re-encodes");
                    assert_eq!(out, &stream[pos..pos + used], "not canonical: {msg:?}");
                }
                via_pure.push(msg);
                pos += used;
            }
            Ok(None) => break,
            Err(_) => {
                pure_failed = true;
                break;
            }
        }
    }
    assert_eq!(via_decoder, via_pure);
    assert_eq!(decoder_failed, pure_failed);

    // The sessions must turn any message sequence into events or errors, never a panic, and
    // hold their invariants. Both are taken past the handshake (the gateway welcomes the
    // hello it is sent; a second agent starts welcomed), so the established and draining
    // states see every message too; the chunk byte's bits pick local actions between them.
    let mut gateway = ControlSession::gateway();
    let mut agent = ControlSession::agent(hello());
    let mut welcomed = ControlSession::agent(hello());
    drive(&mut welcomed, ControlMsg::Welcome(welcome()));
    let mut sessions = [&mut gateway, &mut agent, &mut welcomed];
    for (i, msg) in via_pure.into_iter().enumerate() {
        for s in sessions.iter_mut() {
            act(s, chunk.wrapping_add(i));
            drive(s, msg.clone());
        }
    }
});

fn hello() -> Hello {
    Hello {
        proto_version: CONTROL_VERSION,
        device: "fuzz".into(),
        services: Vec::new(),
        zone_serial: 0,
        zone_config: None,
        agent_version: String::new(),
    }
}

const PUBLIC: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 4433);

fn welcome() -> Welcome {
    Welcome {
        session_id: 7,
        observed_addr: PUBLIC,
        zone_serial: 0,
        zone_config: None,
        keepalive_ms: 1000,
    }
}

/// A local action the I/O layer may take between messages, picked by `bits`.
fn act(s: &mut ControlSession, bits: usize) {
    let _ = match bits % 8 {
        0 => s.send_ping(bits as u64),
        1 => s.drain(1000, "fuzz"),
        2 => s.close_udp_flow(bits as u32 % 4),
        3 => s
            .open_udp_flow("app".into(), "svc".into(), Origin::Public(PUBLIC))
            .map(drop),
        _ => Ok(()),
    };
    drain_output(s);
}

/// Feeds `msg`: a gateway welcomes the hello it gets; checks the session's invariants.
fn drive(s: &mut ControlSession, msg: ControlMsg) {
    let was_closed = s.is_closed();
    let result = s.handle(msg);
    if was_closed {
        assert!(result.is_err(), "a closed session took a message");
        assert!(s.poll_event().is_none(), "an event after the close");
    }
    if result.is_err() {
        assert!(s.is_closed(), "an error left the session open");
    }
    let mut ended_with_error = false;
    while let Some(ev) = s.poll_event() {
        if matches!(ev, Event::Hello(_)) {
            s.welcome(welcome())
                .expect("the hello event's welcome is taken");
        }
    }
    while let Some(out) = s.poll_transmit() {
        ended_with_error = matches!(out, ControlMsg::Error { .. });
        // What a session sends must always be encodable.
        encode_control(&out, &mut Vec::new()).expect("session output encodes");
    }
    if result.is_err() && !was_closed {
        assert!(
            ended_with_error,
            "a session ended without telling its peer why"
        );
    }
    assert!(s.open_flows() <= MAX_UDP_FLOWS);
}

fn drain_output(s: &mut ControlSession) {
    while let Some(out) = s.poll_transmit() {
        encode_control(&out, &mut Vec::new()).expect("session output encodes");
    }
    assert!(s.open_flows() <= MAX_UDP_FLOWS);
}
