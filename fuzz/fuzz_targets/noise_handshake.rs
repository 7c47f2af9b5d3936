//! Fuzzes what the relay (the party end-to-end encryption defends against) can feed a mesh
//! stream's Noise layer: forged handshake messages never panic and are never accepted, in
//! either role; and a sealed stream cut into reads at fuzzer-chosen places opens to exactly
//! what was sealed, whatever the split (the reassembly `E2eStream` does across reads).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tunnel::e2e::{framer_pair_for_tests, handshake_pair_for_tests, Opened};

fuzz_target!(|data: &[u8]| {
    // The relay's message 1 to a responder: it cannot hold the initiator's static key.
    let (_, responder, expected) = handshake_pair_for_tests();
    let mut out = BytesMut::new();
    if responder.answer(data, "a", &expected, &mut out).is_ok() {
        panic!("a forged first handshake message was accepted");
    }
    // The relay's message 2 to an initiator that sent a real message 1.
    let (mut initiator, _, _) = handshake_pair_for_tests();
    let mut first = BytesMut::new();
    initiator.write_first(&mut first).expect("message 1");
    if initiator.read_second(data).is_ok() {
        panic!("a forged second handshake message was accepted");
    }

    // Reassembly: the input sealed in frames of a size it picks, opened in pieces it picks.
    let Some((&frame_len, rest)) = data.split_first() else {
        return;
    };
    let frame_len = usize::from(frame_len).max(1);
    let (mut tx, mut rx) = framer_pair_for_tests();
    let mut sealed = BytesMut::new();
    for chunk in rest.chunks(frame_len) {
        tx.seal(chunk, &mut sealed).expect("seal");
    }
    tx.seal_end(&mut sealed).expect("seal end");
    let wire = sealed.freeze();
    let mut cuts = rest.iter().map(|b| usize::from(*b % 97) + 1).cycle();
    let mut buf = BytesMut::new();
    let (mut at, mut back, mut ended) = (0, Vec::new(), false);
    while !ended {
        let n = cuts.next().unwrap_or(wire.len()).min(wire.len() - at);
        buf.extend_from_slice(&wire[at..at + n]);
        at += n;
        loop {
            match rx.open(&mut buf).expect("own frames open") {
                Some(Opened::Data(d)) => back.extend_from_slice(&d),
                Some(Opened::End) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        if at == wire.len() && !ended {
            panic!("the whole stream was fed and its end frame never opened");
        }
    }
    assert_eq!(back, rest);
    assert!(buf.is_empty() && at == wire.len());
});
