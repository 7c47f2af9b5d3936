//! Fuzzes the control stream: the first input byte picks a chunk size, the rest is fed to a
//! `FrameDecoder` in chunks of that size. Checks: no panic; the decoder yields exactly what
//! the pure `decode_control` yields on the whole stream (and fails where it fails); every known
//! message re-encodes to the bytes it came from; both session roles survive every message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel::proto::{
    decode_control, encode_control, ControlMsg, ControlSession, FrameDecoder, Hello,
    CONTROL_VERSION,
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

    // The session must turn any message sequence into events or errors, never a panic.
    let mut gateway = ControlSession::gateway();
    let mut agent = ControlSession::agent(Hello {
        proto_version: CONTROL_VERSION,
        device: "fuzz".into(),
        services: Vec::new(),
        zone_serial: 0,
        zone_config: None,
        agent_version: String::new(),
    });
    for msg in via_pure {
        let _ = gateway.handle(msg.clone());
        let _ = agent.handle(msg);
        while gateway.poll_event().is_some() || agent.poll_event().is_some() {}
        while let Some(out) = gateway.poll_transmit().or_else(|| agent.poll_transmit()) {
            // What a session sends must always be encodable.
            encode_control(&out, &mut Vec::new()).expect("session output encodes");
        }
    }
});
