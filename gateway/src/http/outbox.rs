//! A response's bytes waiting for the client's connection: heads, chunk-size lines and small
//! body pieces copied together into one buffer, large body chunks held as the service's
//! connection delivered them (slices of received tunnel packets), so a download's bytes are
//! not copied once more on their way out. Written with one vectored write. Sans-IO.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes};

/// Body pieces at least this long are held rather than copied: below it a copy costs less
/// than the extra slice in the write (and a small answer stays one contiguous write). A
/// tunnel stream's chunks are one packet's payload each: ~1.2 KB over Ethernet-sized paths,
/// up to ~8.9 KB on loopback or jumbo frames.
pub const HOLD_MIN: usize = 1024;
/// Slices handed to one vectored write (the kernel's limit is 1,024; a write of this many
/// ~9 KB chunks is ~0.5 MB).
pub const MAX_SLICES: usize = 64;

/// Bytes to write, in order: `buf[at..]` with `held` chunks inserted at their positions.
#[derive(Debug, Default)]
pub struct Outbox {
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    at: usize,
    /// Chunks to write before `buf[pos..]`, each with its `pos` (ascending).
    held: VecDeque<(usize, Bytes)>,
    /// Total length of `held`.
    held_len: usize,
}

impl Outbox {
    /// The copy buffer, to append to (heads are encoded straight into it). Only appends keep
    /// the held chunks' positions right.
    #[inline]
    pub fn buf_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Appends a copy of `bytes`.
    #[inline]
    pub fn copy(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Appends `chunk` without copying it.
    pub fn hold(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        self.held_len += chunk.len();
        self.held.push_back((self.buf.len(), chunk));
    }

    /// Appends `chunk`: held if it is [`HOLD_MIN`] or longer and `vectored` (the connection
    /// takes vectored writes; otherwise each slice would be a write of its own), else copied.
    pub fn push(&mut self, chunk: Bytes, vectored: bool) {
        if vectored && chunk.len() >= HOLD_MIN && self.held.len() < MAX_SLICES / 2 {
            self.hold(chunk);
        } else {
            self.copy(&chunk);
        }
    }

    /// Bytes not yet written.
    #[inline]
    pub fn len(&self) -> usize {
        self.buf.len() - self.at + self.held_len
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes copied and not yet written (what gathering counts against its limit).
    #[inline]
    pub fn copied(&self) -> usize {
        self.buf.len() - self.at
    }

    /// Chunks held.
    #[inline]
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Forgets everything, keeping the buffer's allocation for the next response.
    #[inline]
    pub fn clear(&mut self) {
        self.buf.clear();
        self.at = 0;
        self.held.clear();
        self.held_len = 0;
    }

    /// The unwritten bytes as slices, in order, into `slices`: how many were filled. Fewer
    /// than all when `slices` runs out; the rest follow after [`Outbox::advance`].
    pub fn slices<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let mut k = 0;
        let mut pos = self.at;
        let mut put = |s: &'a [u8], k: &mut usize| {
            if !s.is_empty() && *k < slices.len() {
                slices[*k] = IoSlice::new(s);
                *k += 1;
            }
        };
        for (p, chunk) in &self.held {
            put(&self.buf[pos..*p], &mut k);
            put(chunk, &mut k);
            pos = *p;
        }
        put(&self.buf[pos..], &mut k);
        k
    }

    /// The first unwritten contiguous piece (for connections without vectored writes).
    #[inline]
    pub fn first(&self) -> &[u8] {
        match self.held.front() {
            Some((p, _)) if *p > self.at => &self.buf[self.at..*p],
            Some((_, chunk)) => chunk,
            None => &self.buf[self.at..],
        }
    }

    /// Marks `n` bytes (from the front) written.
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let upto = self.held.front().map_or(self.buf.len(), |(p, _)| *p);
            let k = n.min(upto - self.at);
            self.at += k;
            n -= k;
            if n == 0 {
                break;
            }
            let Some((_, chunk)) = self.held.front_mut() else {
                // More written than was handed out: a broken writer; nothing is left anyway.
                break;
            };
            let k = n.min(chunk.len());
            chunk.advance(k);
            self.held_len -= k;
            n -= k;
            if chunk.is_empty() {
                self.held.pop_front();
            }
        }
        if self.at == self.buf.len() && self.held.is_empty() {
            self.buf.clear();
            self.at = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written_by(out: &mut Outbox, step: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while !out.is_empty() {
            let mut s = [IoSlice::new(&[]); 3];
            let k = out.slices(&mut s);
            let mut take = step;
            let mut n = 0;
            for slice in &s[..k] {
                let m = slice.len().min(take);
                got.extend_from_slice(&slice[..m]);
                take -= m;
                n += m;
            }
            out.advance(n);
        }
        got
    }

    fn sample() -> (Outbox, Vec<u8>) {
        let mut out = Outbox::default();
        let mut want = Vec::new();
        out.copy(b"HTTP/1.1 200 OK\r\n\r\n");
        want.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\n");
        for (i, len) in [3000, 10, 5000, 4096].into_iter().enumerate() {
            let chunk = Bytes::from(vec![b'a' + i as u8; len]);
            want.extend_from_slice(&chunk);
            out.push(chunk, true);
            if i == 1 {
                out.copy(b"\r\n");
                want.extend_from_slice(b"\r\n");
            }
        }
        (out, want)
    }

    #[test]
    fn written_in_order_whatever_the_write_sizes() {
        for step in [1, 7, 19, 2048, 3000, 4096, 1 << 20] {
            let (mut out, want) = sample();
            assert_eq!(out.len(), want.len());
            assert_eq!(out.held(), 3, "the three long chunks are held");
            assert_eq!(written_by(&mut out, step), want, "step {step}");
            assert!(out.is_empty());
            assert_eq!(out.held(), 0);
        }
    }

    #[test]
    fn without_vectored_writes_everything_is_copied() {
        let mut out = Outbox::default();
        out.push(Bytes::from(vec![1u8; 9000]), false);
        assert_eq!((out.held(), out.copied()), (0, 9000));
    }

    #[test]
    fn first_walks_the_pieces_one_at_a_time() {
        let (mut out, want) = sample();
        let mut got = Vec::new();
        while !out.is_empty() {
            let piece = out.first().to_vec();
            assert!(!piece.is_empty());
            got.extend_from_slice(&piece);
            out.advance(piece.len());
        }
        assert_eq!(got, want);
    }

    #[test]
    fn a_finished_outbox_starts_over_at_the_front() {
        let (mut out, want) = sample();
        out.advance(want.len());
        assert_eq!((out.len(), out.copied(), out.held()), (0, 0, 0));
        out.copy(b"next");
        assert_eq!(out.first(), b"next");
    }
}
