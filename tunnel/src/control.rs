//! I/O around the sans-IO control session: feeds received bytes to the frame decoder and the
//! [`ControlSession`], writes what the session queues, and applies commands from other tasks.

use bytes::BytesMut;
use quinn::{RecvStream, SendStream};
use tokio::sync::mpsc;

use crate::error::TunnelError;
use crate::proto::{self, ControlSession, Event, FrameDecoder, SessionError};

/// Largest chunk read from the control stream at once (the decoder accepts up to 64 KiB pushes).
const CONTROL_READ: usize = proto::limits::MAX_PUSH_CHUNK;
/// Commands queued for a control session: small, since each is applied at once.
pub const CONTROL_QUEUE: usize = 256;

/// A change to make on a session from another task (open a UDP flow, drain, push a config).
pub type SessionCmd = Box<dyn FnOnce(&mut ControlSession) -> Result<(), SessionError> + Send>;

/// Sender side of [`SessionCmd`]s; cheap to clone.
#[derive(Clone, Debug)]
pub struct ControlHandle(pub(crate) mpsc::Sender<SessionCmd>);

impl ControlHandle {
    /// Queues `f`; false when the session is gone.
    pub async fn apply(
        &self,
        f: impl FnOnce(&mut ControlSession) -> Result<(), SessionError> + Send + 'static,
    ) -> bool {
        self.0.send(Box::new(f)).await.is_ok()
    }
    pub fn try_apply(
        &self,
        f: impl FnOnce(&mut ControlSession) -> Result<(), SessionError> + Send + 'static,
    ) -> bool {
        self.0.try_send(Box::new(f)).is_ok()
    }
}

pub fn channel() -> (ControlHandle, mpsc::Receiver<SessionCmd>) {
    let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
    (ControlHandle(tx), rx)
}

/// The control stream of one connection.
#[derive(Debug)]
pub struct ControlIo {
    send: SendStream,
    recv: RecvStream,
    decoder: FrameDecoder,
    pub session: ControlSession,
}

impl ControlIo {
    pub fn new(send: SendStream, recv: RecvStream, session: ControlSession) -> Self {
        ControlIo {
            send,
            recv,
            decoder: FrameDecoder::new(),
            session,
        }
    }

    /// Like [`ControlIo::new`], with bytes already read past the stream header.
    pub fn with_prefix(
        send: SendStream,
        recv: RecvStream,
        session: ControlSession,
        prefix: &[u8],
    ) -> Result<Self, TunnelError> {
        let mut io = Self::new(send, recv, session);
        io.decoder.push(prefix)?;
        Ok(io)
    }

    /// Writes every message the session has queued.
    pub async fn flush(&mut self) -> Result<(), TunnelError> {
        let mut buf = BytesMut::new();
        while let Some(msg) = self.session.poll_transmit() {
            proto::encode_control(&msg, &mut buf)?;
        }
        if !buf.is_empty() {
            self.send.write_all(&buf).await?;
        }
        Ok(())
    }

    /// The next session event; `None` when the peer finished the stream.
    ///
    /// Cancel-safe: received bytes go into the decoder before any other await, and queued
    /// events are returned first, so a cancelled call loses nothing.
    pub async fn next_event(&mut self) -> Result<Option<Event>, TunnelError> {
        loop {
            if let Some(ev) = self.session.poll_event() {
                return Ok(Some(ev));
            }
            while let Some(msg) = self.decoder.next_msg()? {
                self.session
                    .handle(msg)
                    .map_err(|e| TunnelError::Config(format!("control session: {e}")))?;
            }
            if let Some(ev) = self.session.poll_event() {
                return Ok(Some(ev));
            }
            // Answers the session produced while handling (Pong) go out before we block.
            self.flush().await?;
            match self.recv.read_chunk(CONTROL_READ, true).await? {
                Some(chunk) => self.decoder.push(&chunk.bytes)?,
                None => return Ok(None),
            }
        }
    }

    /// Finishes our side of the stream.
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }
}
