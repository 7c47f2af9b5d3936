//! I/O around the sans-IO control session: feeds received bytes to the frame decoder and the
//! [`ControlSession`], writes what the session queues, and applies commands from other tasks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::sync::{mpsc, Notify};

use crate::error::TunnelError;
use crate::proto::{self, ControlSession, Event, FrameDecoder, SessionError};

/// Largest chunk read from the control stream at once (the decoder accepts up to 64 KiB pushes).
const CONTROL_READ: usize = proto::limits::MAX_PUSH_CHUNK;
/// Commands queued for a control session: small, since each is applied at once.
pub const CONTROL_QUEUE: usize = 256;

/// A change to make on a session from another task (open a UDP flow, drain, push a config).
pub type SessionCmd = Box<dyn FnOnce(&mut ControlSession) -> Result<(), SessionError> + Send>;

/// UDP flow closes waiting for the session loop, kept apart from the bounded command queue: a
/// close lost to a full queue would leave the flow's socket open on the other side and its id
/// counted against [`proto::limits::MAX_UDP_FLOWS`] for the rest of the session. Each flow is
/// closed once, so this holds at most one id per flow the session had open.
#[derive(Debug, Default)]
struct Closes {
    ids: Mutex<Vec<u32>>,
    wake: Notify,
    /// The session loop is gone: later closes have nowhere to go and are dropped.
    gone: AtomicBool,
}

impl Closes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Sender side of [`SessionCmd`]s; cheap to clone.
#[derive(Clone, Debug)]
pub struct ControlHandle {
    cmds: mpsc::Sender<SessionCmd>,
    closes: Arc<Closes>,
}

impl ControlHandle {
    /// Queues `f`; false when the session is gone.
    pub async fn apply(
        &self,
        f: impl FnOnce(&mut ControlSession) -> Result<(), SessionError> + Send + 'static,
    ) -> bool {
        self.cmds.send(Box::new(f)).await.is_ok()
    }
    /// Queues `f` unless the queue is full or the session gone (then false): for callers that
    /// must not wait, where dropping the command is a fine answer (an open is "overloaded").
    pub fn try_apply(
        &self,
        f: impl FnOnce(&mut ControlSession) -> Result<(), SessionError> + Send + 'static,
    ) -> bool {
        self.cmds.try_send(Box::new(f)).is_ok()
    }
    /// Closes UDP flow `flow_id` on the session. Never waits and is never lost to a full
    /// command queue (closes have their own list); does nothing once the session is gone.
    pub fn close_udp_flow(&self, flow_id: u32) {
        let mut ids = self.closes.lock();
        if self.closes.gone.load(Ordering::Relaxed) {
            return;
        }
        ids.push(flow_id);
        drop(ids);
        self.closes.wake.notify_one();
    }
}

/// Receiver side: what the session loop applies, in [`ControlCmds::recv`] order.
#[derive(Debug)]
pub struct ControlCmds {
    cmds: mpsc::Receiver<SessionCmd>,
    closes: Arc<Closes>,
}

impl ControlCmds {
    /// The next command to apply, pending flow closes first; `None` once every
    /// [`ControlHandle`] is gone. Cancel-safe: nothing is taken before it is returned.
    pub async fn recv(&mut self) -> Option<SessionCmd> {
        loop {
            let ids = std::mem::take(&mut *self.closes.lock());
            if !ids.is_empty() {
                return Some(Box::new(move |s: &mut ControlSession| {
                    // Every id is closed even if one fails, so one bad id loses no other.
                    ids.into_iter()
                        .map(|id| s.close_udp_flow(id))
                        .fold(Ok(()), Result::and)
                }));
            }
            tokio::select! {
                biased;
                _ = self.closes.wake.notified() => {}
                c = self.cmds.recv() => return c,
            }
        }
    }
}

impl Drop for ControlCmds {
    fn drop(&mut self) {
        let mut ids = self.closes.lock();
        self.closes.gone.store(true, Ordering::Relaxed);
        ids.clear();
    }
}

pub fn channel() -> (ControlHandle, ControlCmds) {
    let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
    let closes = Arc::new(Closes::default());
    (
        ControlHandle {
            cmds: tx,
            closes: closes.clone(),
        },
        ControlCmds { cmds: rx, closes },
    )
}

/// The control stream of one connection.
#[derive(Debug)]
pub struct ControlIo {
    send: SendStream,
    recv: RecvStream,
    decoder: FrameDecoder,
    pub session: ControlSession,
    /// Encoded messages not yet written: kept here, not in a local of [`ControlIo::flush`], so
    /// a flush cancelled halfway (inside `next_event`, raced in a `select!`) resumes where it
    /// stopped instead of losing the rest of a frame and breaking the stream's framing.
    out: BytesMut,
}

impl ControlIo {
    pub fn new(send: SendStream, recv: RecvStream, session: ControlSession) -> Self {
        ControlIo {
            send,
            recv,
            decoder: FrameDecoder::new(),
            session,
            out: BytesMut::new(),
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

    /// Writes every message the session has queued. Cancel-safe: what is not written yet stays
    /// queued for the next call.
    pub async fn flush(&mut self) -> Result<(), TunnelError> {
        while let Some(msg) = self.session.poll_transmit() {
            proto::encode_control(&msg, &mut self.out)?;
        }
        while !self.out.is_empty() {
            // `write` writes nothing unless it completes, so each step is cancel-safe.
            let n = self.send.write(&self.out).await?;
            self.out.advance(n);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ControlMsg, Hello, Origin, Welcome, CONTROL_VERSION};

    /// A gateway session past hello and welcome, with UDP flows 0 and 1 open.
    fn gateway_with_flows() -> ControlSession {
        let mut s = ControlSession::gateway();
        s.handle(ControlMsg::Hello(Hello {
            proto_version: CONTROL_VERSION,
            device: "home1".into(),
            services: vec![],
            zone_serial: 1,
            zone_config: None,
            agent_version: "test".into(),
        }))
        .unwrap();
        s.welcome(Welcome {
            session_id: 1,
            observed_addr: "192.0.2.1:4433".parse().unwrap(),
            zone_serial: 1,
            zone_config: None,
            keepalive_ms: 1000,
        })
        .unwrap();
        for want in 0..2 {
            let origin = Origin::Public("192.0.2.9:53".parse().unwrap());
            let id = s.open_udp_flow("a".into(), "dns".into(), origin).unwrap();
            assert_eq!(id, want);
        }
        while s.poll_transmit().is_some() {}
        s
    }

    #[tokio::test]
    async fn flow_closes_get_through_a_full_command_queue() {
        let mut session = gateway_with_flows();
        let (handle, mut cmds) = channel();
        let mut queued = 0;
        while handle.try_apply(|_| Ok(())) {
            queued += 1;
        }
        assert_eq!(queued, CONTROL_QUEUE, "the queue is full now");
        handle.close_udp_flow(1);
        handle.close_udp_flow(0);
        // The closes come first, ahead of everything queued before them.
        let cmd = cmds.recv().await.unwrap();
        cmd(&mut session).unwrap();
        let sent: Vec<_> = std::iter::from_fn(|| session.poll_transmit()).collect();
        assert_eq!(
            sent,
            vec![
                ControlMsg::UdpFlowClose { flow_id: 1 },
                ControlMsg::UdpFlowClose { flow_id: 0 }
            ]
        );
        assert_eq!(session.open_flows(), 0);
        for _ in 0..CONTROL_QUEUE {
            cmds.recv().await.unwrap()(&mut session).unwrap();
        }
        // A close sent while the loop waits wakes it.
        let waiting = tokio::spawn(async move { cmds.recv().await.is_some() });
        tokio::task::yield_now().await;
        handle.close_udp_flow(7);
        assert!(waiting.await.unwrap());
    }

    #[test]
    fn closes_after_the_session_loop_ended_are_dropped() {
        let (handle, cmds) = channel();
        drop(cmds);
        handle.close_udp_flow(3);
        assert!(handle.closes.lock().is_empty());
    }
}
