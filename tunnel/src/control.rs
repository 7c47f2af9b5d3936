//! I/O around the sans-IO control session: feeds received bytes to the frame decoder and the
//! [`ControlSession`], writes what the session queues, and applies commands from other tasks.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::error::TunnelError;
use crate::proto::{self, ControlSession, Event, FrameDecoder, ServiceInfo, SessionError};

/// Largest chunk read from the control stream at once (the decoder accepts up to 64 KiB pushes).
const CONTROL_READ: usize = proto::limits::MAX_PUSH_CHUNK;
/// What a write that timed out under [`ControlIo::end_stalled_after`] says.
pub const CONTROL_NOT_READ: &str = "the peer has not read its control stream";

/// What a session ends with once more than [`MAX_UNREAD`] bytes wait for its peer.
pub const CONTROL_BACKLOG: &str = "the peer reads its control stream too slowly to keep up";
/// Commands queued for a control session: small, since each is applied at once.
pub const CONTROL_QUEUE: usize = 256;

/// Configs sent for their revocations that wait at once ([`ControlHandle::send_revoking_config`]).
pub const MAX_REVOKING_CONFIGS: usize = 4;

/// A change to make on a session from another task (open a UDP flow, drain, push a config).
pub type SessionCmd = Box<dyn FnOnce(&mut ControlSession) -> Result<(), SessionError> + Send>;

/// Messages for the session that must not be lost to a full command queue, kept apart from
/// it: a UDP flow close (else the flow's socket stays open on the other side and its id counts
/// against [`proto::limits::MAX_UDP_FLOWS`] for the rest of the session), a newer zone config
/// (else a device kept an older one, with its revocations, until its next connection), a
/// permit revocation (else a direct path the policy no longer allows ran on), a drain or a
/// services update at a stop, a config whose revocations the device must take though it is
/// not the newest. Each kind is bounded without a queue: flows are closed once, only the
/// newest config and the latest services are kept, a revocation is held once per (peer,
/// service), configs for their revocations at most [`MAX_REVOKING_CONFIGS`].
#[derive(Debug, Default)]
struct Pending {
    closes: Vec<u32>,
    config: Option<(u64, Vec<u8>)>,
    /// Configs not the newest, sent for the revocations they hold ([`ControlHandle::send_revoking_config`]).
    revoking: Vec<(u64, Vec<u8>)>,
    revokes: HashSet<(String, String)>,
    services: Option<Vec<ServiceInfo>>,
    drain: Option<(u32, String)>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.closes.is_empty()
            && self.config.is_none()
            && self.revoking.is_empty()
            && self.revokes.is_empty()
            && self.services.is_none()
            && self.drain.is_none()
    }

    /// Applies everything to `s`: each message even if another fails, so one bad one loses
    /// no other; the drain last, as it changes the session's state.
    fn apply(self, s: &mut ControlSession) -> Result<(), SessionError> {
        let mut r: Result<(), SessionError> = Ok(());
        for id in self.closes {
            r = r.and(s.close_udp_flow(id));
        }
        if let Some(services) = self.services {
            r = r.and(s.send_services_update(services));
        }
        if let Some((serial, json)) = self.config {
            r = r.and(s.send_config_update(serial, json));
        }
        for (serial, json) in self.revoking {
            r = r.and(s.send_config_update(serial, json));
        }
        for (peer, service) in self.revokes {
            r = r.and(s.send_permit_revoke(peer, service));
        }
        if let Some((grace_ms, reason)) = self.drain {
            r = r.and(s.drain(grace_ms, &reason));
        }
        r
    }
}

#[derive(Debug, Default)]
struct Side {
    pending: Mutex<Pending>,
    wake: Notify,
    /// The session loop is gone: later messages have nowhere to go and are dropped.
    gone: AtomicBool,
}

impl Side {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes what is pending with `f` and wakes the session loop, unless it is gone.
    fn add(&self, f: impl FnOnce(&mut Pending)) {
        let mut p = self.lock();
        if self.gone.load(Ordering::Relaxed) {
            return;
        }
        f(&mut p);
        drop(p);
        self.wake.notify_one();
    }
}

/// Sender side of [`SessionCmd`]s; cheap to clone.
#[derive(Clone, Debug)]
pub struct ControlHandle {
    cmds: mpsc::Sender<SessionCmd>,
    side: Arc<Side>,
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
    /// command queue ([`Pending`]); does nothing once the session is gone.
    pub fn close_udp_flow(&self, flow_id: u32) {
        self.side.add(|p| p.closes.push(flow_id));
    }
    /// Sends zone config `json` (serial `serial`) unless a newer one is pending already.
    /// Never waits and is never lost to a full command queue.
    pub fn send_config(&self, serial: u64, json: Vec<u8>) {
        self.side.add(|p| {
            if p.config.as_ref().is_none_or(|(s, _)| *s < serial) {
                p.config = Some((serial, json));
            }
        });
    }
    /// Gateway: sends zone config `json` (serial `serial`) for the revocations it holds,
    /// which a config not adopted may carry though it is older than the newest: unlike
    /// [`ControlHandle::send_config`], a newer one pending does not replace it. At most
    /// [`MAX_REVOKING_CONFIGS`] wait (the oldest asked for goes first), each once.
    pub fn send_revoking_config(&self, serial: u64, json: Vec<u8>) {
        self.side.add(|p| {
            if p.revoking.iter().any(|(s, j)| *s == serial && *j == json) {
                return;
            }
            if p.revoking.len() >= MAX_REVOKING_CONFIGS {
                p.revoking.remove(0);
            }
            p.revoking.push((serial, json));
        });
    }
    /// Gateway: tells the device to drop its permit for `peer` to use `service` directly.
    /// Never waits, never lost, and sent once however often it is asked before it goes out.
    pub fn revoke_permit(&self, peer: String, service: String) {
        self.side.add(|p| {
            p.revokes.insert((peer, service));
        });
    }
    /// Agent: tells the gateway the device offers `services` now (the latest call wins).
    pub fn send_services(&self, services: Vec<ServiceInfo>) {
        self.side.add(|p| p.services = Some(services));
    }
    /// Gateway: tells the device to drain within `grace_ms`.
    pub fn drain(&self, grace_ms: u32, reason: &str) {
        let reason = reason.to_owned();
        self.side.add(|p| p.drain = Some((grace_ms, reason)));
    }
}

/// Receiver side: what the session loop applies, in [`ControlCmds::recv`] order.
#[derive(Debug)]
pub struct ControlCmds {
    cmds: mpsc::Receiver<SessionCmd>,
    side: Arc<Side>,
}

impl ControlCmds {
    /// The next command to apply, [`Pending`] messages first; `None` once every
    /// [`ControlHandle`] is gone. Cancel-safe: nothing is taken before it is returned.
    pub async fn recv(&mut self) -> Option<SessionCmd> {
        loop {
            let pending = std::mem::take(&mut *self.side.lock());
            if !pending.is_empty() {
                return Some(Box::new(move |s: &mut ControlSession| pending.apply(s)));
            }
            tokio::select! {
                biased;
                _ = self.side.wake.notified() => {}
                c = self.cmds.recv() => return c,
            }
        }
    }
}

impl Drop for ControlCmds {
    fn drop(&mut self) {
        let mut p = self.side.lock();
        self.side.gone.store(true, Ordering::Relaxed);
        *p = Pending::default();
    }
}

pub fn channel() -> (ControlHandle, ControlCmds) {
    let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
    let side = Arc::new(Side::default());
    (
        ControlHandle {
            cmds: tx,
            side: side.clone(),
        },
        ControlCmds { cmds: rx, side },
    )
}

/// Bytes of encoded messages that may wait for a peer reading slowly before its bytes are read
/// no more (a peer sending pings and reading none of the answers). What commands queue is
/// bounded by the protocol's own limits (UDP flows per session, one config, one revocation
/// per pair, one drain).
pub const MAX_BACKLOG: usize = 256 * 1024;

/// Bytes of encoded messages past which a session that ends stalled readers
/// ([`ControlIo::end_stalled_after`]) ends this one too: a peer reading a byte now and then
/// restarts the stall timer each time, while flows opened and closed by public clients queue
/// a frame each behind it, without limit.
pub const MAX_UNREAD: usize = 4 * MAX_BACKLOG;

/// Writes `out` to `send`, failing with `Timeout(`[`CONTROL_NOT_READ`]`)` once it waited
/// `limit` without a byte going out. Cancel-safe: each `write` writes nothing unless it
/// completes, and `stalled_since` keeps the wait's start across calls.
async fn write_out(
    send: &mut SendStream,
    out: &mut BytesMut,
    stalled_since: &mut Option<Instant>,
    limit: Option<Duration>,
) -> Result<(), TunnelError> {
    while !out.is_empty() {
        let since = *stalled_since.get_or_insert_with(Instant::now);
        let write = send.write(out);
        let n = match limit {
            Some(limit) => tokio::time::timeout_at(since + limit, write)
                .await
                .map_err(|_| TunnelError::Timeout(CONTROL_NOT_READ))??,
            None => write.await?,
        };
        out.advance(n);
        if n > 0 {
            *stalled_since = None;
        }
    }
    Ok(())
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
    /// Since when `out` has waited without a byte of it written (the peer stopped reading its
    /// control stream); None while nothing waits.
    stalled_since: Option<Instant>,
    /// How long a write may wait for the peer to read ([`ControlIo::end_stalled_after`]).
    stall_limit: Option<Duration>,
    /// Why the session failed, returned once the events decoded before it are.
    failed: Option<TunnelError>,
}

impl ControlIo {
    pub fn new(send: SendStream, recv: RecvStream, session: ControlSession) -> Self {
        // Its buffered messages go out ahead of buffered stream data (quinn's priority orders
        // what is sent, not who may buffer: a connection window that slow readers hold still
        // holds control writes back, which the hub's stall limit allows for).
        let _ = send.set_priority(1);
        ControlIo {
            send,
            recv,
            decoder: FrameDecoder::new(),
            session,
            out: BytesMut::new(),
            stalled_since: None,
            stall_limit: None,
            failed: None,
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
        self.encode_queued()?;
        write_out(
            &mut self.send,
            &mut self.out,
            &mut self.stalled_since,
            self.stall_limit,
        )
        .await
    }

    /// Encodes what the session has queued into `out`.
    fn encode_queued(&mut self) -> Result<(), TunnelError> {
        while let Some(msg) = self.session.poll_transmit() {
            proto::encode_control(&msg, &mut self.out)?;
        }
        if self.stall_limit.is_some() && self.out.len() > MAX_UNREAD {
            return Err(TunnelError::Timeout(CONTROL_BACKLOG));
        }
        Ok(())
    }

    /// Fails writes (and so [`ControlIo::next_event`], which writes while it reads) with
    /// `Timeout(`[`CONTROL_NOT_READ`]`)` once queued messages have waited `limit` without a
    /// byte going out: a peer that stopped reading its control stream otherwise held them for
    /// ever while more queued behind them.
    pub fn end_stalled_after(&mut self, limit: Duration) {
        self.stall_limit = Some(limit);
    }

    /// Writes what is queued (the `Error` a session ended on), finishes the stream and waits
    /// for the peer to acknowledge it, for at most `limit`: a connection closed right after a
    /// write discards what is not yet delivered.
    pub async fn finish_within(&mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            self.flush().await?;
            let _ = self.send.finish();
            let _ = self.send.stopped().await;
            Ok::<_, TunnelError>(())
        })
        .await;
    }

    /// The next session event; `None` when the peer finished the stream, or the session is
    /// closed (by the peer's `Error`, already returned as an event, or here).
    ///
    /// What the session queued is written while the peer's bytes are read: a write waiting
    /// for the peer (its window full) no longer keeps its messages — a drain, a revocation —
    /// unread meanwhile. Events decoded before a failure are returned before it.
    ///
    /// Cancel-safe: received bytes go into the decoder before any other await, writes keep
    /// what they have not written, and queued events are returned first, so a cancelled call
    /// loses nothing.
    pub async fn next_event(&mut self) -> Result<Option<Event>, TunnelError> {
        loop {
            if let Some(ev) = self.session.poll_event() {
                return Ok(Some(ev));
            }
            if let Some(e) = self.failed.take() {
                return Err(e);
            }
            self.decode();
            if let Some(ev) = self.session.poll_event() {
                return Ok(Some(ev));
            }
            if let Some(e) = self.failed.take() {
                return Err(e);
            }
            if self.session.is_closed() {
                return Ok(None);
            }
            // Answers the session produced while handling (Pong) go out as we read on.
            self.encode_queued()?;
            let writing = !self.out.is_empty();
            // A peer that sends (pings) and never reads is read no more once this much waits
            // for it: the stall limit then ends the session.
            let reading = self.out.len() < MAX_BACKLOG;
            tokio::select! {
                r = write_out(&mut self.send, &mut self.out, &mut self.stalled_since, self.stall_limit), if writing => r?,
                r = self.recv.read_chunk(CONTROL_READ, true), if reading => match r? {
                    Some(chunk) => {
                        if let Err(e) = self.decoder.push(&chunk.bytes) {
                            self.failed = Some(self.undecodable(e));
                        }
                    }
                    None => return Ok(None),
                },
            }
        }
    }

    /// Feeds the decoded messages to the session until it closes; a failure is kept for after
    /// the events decoded before it.
    fn decode(&mut self) {
        while self.failed.is_none() && !self.session.is_closed() {
            match self.decoder.next_msg() {
                Ok(Some(msg)) => {
                    if let Err(e) = self.session.handle(msg) {
                        self.failed = Some(TunnelError::Config(format!("control session: {e}")));
                    }
                }
                Ok(None) => return,
                Err(e) => self.failed = Some(self.undecodable(e)),
            }
        }
    }

    /// Ends the connection after a violation found here (the session's `Error` queued): the
    /// `Error` is written and acknowledged first, for at most a second, then the connection
    /// closes with [`crate::hub::CLOSE_PROTOCOL`] and `reason`. Nothing when the session did
    /// not end here.
    pub async fn close_as_violation(&mut self, conn: &quinn::Connection, reason: &'static [u8]) {
        if self.session.ended_here() {
            self.finish_within(Duration::from_secs(1)).await;
            conn.close(crate::hub::CLOSE_PROTOCOL.into(), reason);
        }
    }

    /// Bytes from the peer that are no control message end the session as a violation the
    /// peer is told of (the session's `Error` is queued), as a message out of place does:
    /// callers see a session ended here ([`ControlSession::ended_here`]) and say why before
    /// closing (it closed with code 0, no reason, as if the peer had simply gone).
    fn undecodable(&mut self, e: crate::proto::ProtoError) -> TunnelError {
        self.session.reject_undecodable(&e);
        e.into()
    }

    /// Why the session failed, if it did and that was not returned yet by
    /// [`ControlIo::next_event`].
    pub fn take_failure(&mut self) -> Option<TunnelError> {
        self.failed.take()
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

    /// A newer zone config, a permit revocation and a drain get through a full command queue
    /// (they were dropped, or each waited in a task of its own): the newest config only, a
    /// revocation asked for three times once, the drain after them.
    #[tokio::test]
    async fn pending_messages_get_through_a_full_queue_once_each() {
        let mut session = gateway_with_flows();
        let (handle, mut cmds) = channel();
        while handle.try_apply(|_| Ok(())) {}
        handle.send_config(5, b"five".to_vec());
        handle.send_config(7, b"seven".to_vec());
        handle.send_config(6, b"six".to_vec());
        for _ in 0..3 {
            handle.revoke_permit("home2".into(), "ssh".into());
        }
        handle.drain(1000, "bye");
        cmds.recv().await.unwrap()(&mut session).unwrap();
        let sent: Vec<_> = std::iter::from_fn(|| session.poll_transmit()).collect();
        assert_eq!(
            sent,
            vec![
                ControlMsg::ConfigUpdate {
                    zone_serial: 7,
                    zone_config: b"seven".to_vec()
                },
                ControlMsg::PermitRevoke {
                    device: "home2".into(),
                    service: "ssh".into()
                },
                ControlMsg::Drain {
                    grace_ms: 1000,
                    reason: "bye".into()
                },
            ]
        );
        assert!(session.is_draining());
    }

    #[test]
    fn closes_after_the_session_loop_ended_are_dropped() {
        let (handle, cmds) = channel();
        drop(cmds);
        handle.close_udp_flow(3);
        assert!(handle.side.lock().is_empty());
    }
}
