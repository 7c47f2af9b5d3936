//! Fuzzes the read side of an end-to-end encrypted mesh stream (`tunnel::e2e::E2eStream`) as
//! a relay feeds it: the bytes arrive in pieces of the fuzzer's sizes, with waits between
//! them. An honest stream reads back exactly what was sealed, then a clean end; one cut before
//! its end frame, or with bytes after it, reads a prefix of it and then an error, never a clean
//! end; bytes nobody sealed open to nothing and never end cleanly.
#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tunnel::e2e::{framer_pair_for_tests, E2eStream};

/// What a relay hands over: `wire` in pieces whose sizes come from `sizes`, each after a wait.
struct Pieces {
    wire: Vec<u8>,
    at: usize,
    sizes: Vec<u8>,
    turn: usize,
    waited: bool,
}

impl AsyncRead for Pieces {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if !this.waited {
            this.waited = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.waited = false;
        let size = 1 + this
            .sizes
            .get(this.turn % this.sizes.len().max(1))
            .copied()
            .unwrap_or(7) as usize;
        this.turn += 1;
        let n = size.min(this.wire.len() - this.at).min(buf.remaining());
        buf.put_slice(&this.wire[this.at..this.at + n]);
        this.at += n;
        Poll::Ready(Ok(()))
    }
}

/// Everything read, and how the reading ended (`Ok` for a clean end).
async fn read_all(mut s: E2eStream<Pieces>) -> (Vec<u8>, std::io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 97];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Err(e)),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (mut tx, rx) = framer_pair_for_tests();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let pieces = |wire: Vec<u8>| Pieces {
        wire,
        at: 0,
        sizes: rest.to_vec(),
        turn: 0,
        waited: false,
    };
    if mode % 4 == 3 {
        let (got, end) = rt.block_on(read_all(E2eStream::new(pieces(rest.to_vec()), rx)));
        assert!(got.is_empty(), "bytes nobody sealed opened: {got:?}");
        assert!(end.is_err(), "a stream nobody sealed ended cleanly");
        return;
    }
    // Sealed in writes of up to 300 bytes (each one frame), then the end frame.
    let mut wire = BytesMut::new();
    for chunk in rest.chunks(300) {
        tx.seal(chunk, &mut wire).expect("seal");
    }
    tx.seal_end(&mut wire).expect("seal end");
    let mut wire = wire.to_vec();
    match mode % 4 {
        // Cut short by 1 to all of its bytes: never a clean end.
        1 => {
            let cut = 1 + (mode as usize / 4) % wire.len();
            wire.truncate(wire.len() - cut);
        }
        // Bytes after the end frame.
        2 => wire.extend_from_slice(&[mode; 3][..1 + (mode as usize / 4) % 3]),
        _ => {}
    }
    let (got, end) = rt.block_on(read_all(E2eStream::new(pieces(wire), rx)));
    assert!(rest.starts_with(&got), "read what was not sealed");
    match mode % 4 {
        0 => {
            assert_eq!(got, rest, "an honest stream read back other bytes");
            if let Err(e) = end {
                panic!("an honest stream ended with an error: {e}");
            }
        }
        _ => assert!(end.is_err(), "a damaged stream ended cleanly"),
    }
});
