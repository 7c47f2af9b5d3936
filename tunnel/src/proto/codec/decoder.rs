//! `FrameDecoder`: buffers control stream bytes as they arrive and yields whole messages.

use bytes::{Buf, BytesMut};

use super::super::control::{decode_control, decode_frame_prefix, ControlMsg};
use super::super::limits::{MAX_DECODER_BUFFER, MAX_FRAME_PREFIX};
use super::super::ProtoError;

/// Incremental decoder for the control stream.
///
/// Usage: after each read, `push` the chunk (at most
/// [`MAX_PUSH_CHUNK`](super::super::limits::MAX_PUSH_CHUNK) bytes), then call `next_msg` until it
/// returns `Ok(None)`. Memory stays under [`MAX_DECODER_BUFFER`]: a frame's announced length is
/// checked as soon as its prefix arrives, before its payload is awaited. After an error the
/// decoder stays failed; the control stream (and the connection) must be closed, because the
/// framing can no longer be trusted.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
    failed: bool,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held but not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Appends received bytes. Fails (and writes nothing) when the buffer would exceed
    /// [`MAX_DECODER_BUFFER`], which only happens if the caller does not drain with `next_msg`
    /// or pushes oversized chunks.
    pub fn push(&mut self, data: &[u8]) -> Result<(), ProtoError> {
        if self.failed {
            return Err(ProtoError::DecoderFailed);
        }
        let buffered = self.buf.len() + data.len();
        if buffered > MAX_DECODER_BUFFER {
            self.failed = true;
            return Err(ProtoError::DecoderFull { buffered });
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// The next complete message, `Ok(None)` if more bytes are needed.
    pub fn next_msg(&mut self) -> Result<Option<ControlMsg>, ProtoError> {
        if self.failed {
            return Err(ProtoError::DecoderFailed);
        }
        match decode_control(&self.buf) {
            Ok(Some((msg, used))) => {
                self.buf.advance(used);
                Ok(Some(msg))
            }
            Ok(None) => {
                self.reserve_for_frame();
                Ok(None)
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    /// Once a frame prefix is known, reserve its full size at once (bounded: the prefix was
    /// validated) rather than growing the buffer chunk by chunk.
    fn reserve_for_frame(&mut self) {
        if let Ok(Some((_, len, prefix))) = decode_frame_prefix(&self.buf) {
            let want = prefix + len;
            debug_assert!(want <= MAX_FRAME_PREFIX + super::super::limits::MAX_CONTROL_FRAME);
            self.buf.reserve(want.saturating_sub(self.buf.len()));
        }
    }
}
