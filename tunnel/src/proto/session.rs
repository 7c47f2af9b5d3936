//! `ControlSession`: the control stream's rules (Hello first, Welcome once, who may send
//! what), without I/O or clocks, in quinn-proto's style.
//!
//! The I/O layer feeds decoded messages to [`ControlSession::handle`], calls the `send_*`
//! methods for its own decisions, and drains [`ControlSession::poll_transmit`] (messages to
//! write) and [`ControlSession::poll_event`] (things to act on). Time-based behaviour (ping
//! interval, RTT, drain deadline) stays in the I/O layer, which owns the clock.

use std::collections::{HashSet, VecDeque};

use super::control::{
    ControlMsg, ErrorCode, Hello, PeerAddr, ServiceInfo, UdpFlowOpen, Welcome, CONTROL_VERSION,
};
use super::header::Origin;
use super::limits::{MAX_REASON_LEN, MAX_UDP_FLOWS};
use super::{ProtoError, SessionError};

/// Which end of the control stream this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The node agent: opens the control stream and sends `Hello`.
    Agent,
    /// The gateway: answers `Hello` with `Welcome`.
    Gateway,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Agent: `Hello` queued, waiting for `Welcome`.
    AwaitWelcome,
    /// Gateway: waiting for the agent's `Hello`.
    AwaitHello,
    /// Gateway: `Hello` delivered as an event, the I/O layer has not answered yet.
    HelloReceived,
    Established,
    /// The gateway announced `Drain`: no new UDP flows; existing work finishes.
    Draining,
    Closed,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::AwaitWelcome => "awaiting Welcome",
            State::AwaitHello => "awaiting Hello",
            State::HelloReceived => "answering Hello",
            State::Established => "established",
            State::Draining => "draining",
            State::Closed => "closed",
        }
    }
}

/// Something the I/O layer must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Gateway: the agent introduced itself; answer with [`ControlSession::welcome`] or
    /// [`ControlSession::reject`].
    Hello(Hello),
    /// Agent: the session is up.
    Welcome(Welcome),
    /// A newer signed zone config (verify it before adopting it).
    ConfigUpdate {
        zone_serial: u64,
        zone_config: Vec<u8>,
    },
    /// Gateway: the agent's service list changed.
    ServicesUpdate { services: Vec<ServiceInfo> },
    /// Agent: the gateway is going away; move new work elsewhere within `grace_ms`.
    Drain { grace_ms: u32, reason: String },
    /// Agent: bind a UDP socket for this flow.
    UdpFlowOpen(UdpFlowOpen),
    /// The flow ended (sent by either side).
    UdpFlowClose { flow_id: u32 },
    /// Agent: punch towards this peer.
    PeerAddr(PeerAddr),
    /// Gateway: the agent wants to reach `device` directly; send both sides `PeerAddr`.
    PunchRequest { device: String },
    /// Agent: the policy no longer lets `device` reach `service` here; drop its permit and
    /// end its direct streams to it.
    PermitRevoke { device: String, service: String },
    /// Gateway: the (peer, service) direct-path permits the agent holds.
    PermitsHeld { permits: Vec<(String, String)> },
    /// Agent: how long the gateway keeps a quiet UDP flow.
    UdpFlowIdle { idle_ms: u32 },
    /// Gateway: the agent's socket addresses behind its NAT.
    LocalAddrs { addrs: Vec<std::net::SocketAddr> },
    /// Answer to our latest [`ControlSession::send_ping`].
    Pong { nonce: u64 },
    /// The peer reported an error and the session is closed.
    PeerError { code: ErrorCode, message: String },
}

/// Control stream state machine for one connection.
#[derive(Debug)]
pub struct ControlSession {
    role: Role,
    state: State,
    transmit: VecDeque<ControlMsg>,
    events: VecDeque<Event>,
    session_id: Option<u64>,
    ping_in_flight: Option<u64>,
    flows: HashSet<u32>,
    next_flow_id: u32,
    /// Closed by this side, its `Error` queued (a violation by the peer, a refusal), not by
    /// the peer's `Error`.
    ended_here: bool,
}

impl ControlSession {
    /// Agent side: `hello` is queued as the first message.
    pub fn agent(hello: Hello) -> Self {
        let mut s = Self::new(Role::Agent, State::AwaitWelcome);
        s.transmit.push_back(ControlMsg::Hello(hello));
        s
    }

    /// Gateway side, waiting for `Hello`.
    pub fn gateway() -> Self {
        Self::new(Role::Gateway, State::AwaitHello)
    }

    fn new(role: Role, state: State) -> Self {
        ControlSession {
            role,
            state,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            session_id: None,
            ping_in_flight: None,
            flows: HashSet::new(),
            next_flow_id: 0,
            ended_here: false,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Set once `Welcome` was sent (gateway) or received (agent).
    pub fn session_id(&self) -> Option<u64> {
        self.session_id
    }

    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established | State::Draining)
    }

    pub fn is_draining(&self) -> bool {
        self.state == State::Draining
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Closed by this side with an `Error` for the peer ([`ControlSession::reject`], or a
    /// violation the peer made), not by the peer's own `Error`: the peer is to be told why
    /// before the connection closes.
    pub fn ended_here(&self) -> bool {
        self.ended_here
    }

    /// Number of UDP flows currently open on this connection.
    pub fn open_flows(&self) -> usize {
        self.flows.len()
    }

    /// Next message to encode and write, if any.
    pub fn poll_transmit(&mut self) -> Option<ControlMsg> {
        self.transmit.pop_front()
    }

    /// Next event for the I/O layer, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Feeds one decoded message from the peer. On a violation the session closes and queues
    /// an `Error` for the peer: flush `poll_transmit`, then close the connection.
    pub fn handle(&mut self, msg: ControlMsg) -> Result<(), SessionError> {
        if self.state == State::Closed {
            return Err(SessionError::Closed);
        }
        let result = match self.role {
            Role::Agent => self.handle_as_agent(msg),
            Role::Gateway => self.handle_as_gateway(msg),
        };
        if let Err(e) = &result {
            let code = match e {
                SessionError::VersionMismatch(..) => ErrorCode::VersionMismatch,
                _ => ErrorCode::ProtocolViolation,
            };
            self.fail(code, e.to_string());
        }
        result
    }

    fn handle_as_agent(&mut self, msg: ControlMsg) -> Result<(), SessionError> {
        match (self.state, msg) {
            (_, ControlMsg::Unknown { .. }) => {}
            (_, ControlMsg::Error { code, message }) => self.peer_error(code, message),
            (State::AwaitWelcome, ControlMsg::Welcome(w)) => {
                self.state = State::Established;
                self.session_id = Some(w.session_id);
                self.events.push_back(Event::Welcome(w));
            }
            (State::Established, ControlMsg::UdpFlowOpen(f)) => {
                if self.flows.contains(&f.flow_id) {
                    return Err(SessionError::DuplicateFlow(f.flow_id));
                }
                if self.flows.len() >= MAX_UDP_FLOWS {
                    return Err(SessionError::TooManyFlows(MAX_UDP_FLOWS));
                }
                self.flows.insert(f.flow_id);
                self.events.push_back(Event::UdpFlowOpen(f));
            }
            (State::Established | State::Draining, ControlMsg::Drain { grace_ms, reason }) => {
                self.state = State::Draining;
                self.events.push_back(Event::Drain { grace_ms, reason });
            }
            (State::Established | State::Draining, ControlMsg::PeerAddr(p)) => {
                self.events.push_back(Event::PeerAddr(p));
            }
            (State::Established | State::Draining, ControlMsg::UdpFlowIdle { idle_ms }) => {
                self.events.push_back(Event::UdpFlowIdle { idle_ms });
            }
            (
                State::Established | State::Draining,
                ControlMsg::PermitRevoke { device, service },
            ) => {
                self.events
                    .push_back(Event::PermitRevoke { device, service });
            }
            (State::Established | State::Draining, msg) => self.handle_common(msg)?,
            (state, msg) => return Err(unexpected(state, &msg)),
        }
        Ok(())
    }

    fn handle_as_gateway(&mut self, msg: ControlMsg) -> Result<(), SessionError> {
        match (self.state, msg) {
            (_, ControlMsg::Unknown { .. }) => {}
            (_, ControlMsg::Error { code, message }) => self.peer_error(code, message),
            (State::AwaitHello, ControlMsg::Hello(h)) => {
                if h.proto_version != CONTROL_VERSION {
                    return Err(SessionError::VersionMismatch(
                        h.proto_version,
                        CONTROL_VERSION,
                    ));
                }
                self.state = State::HelloReceived;
                self.events.push_back(Event::Hello(h));
            }
            (State::Established | State::Draining, ControlMsg::ServicesUpdate { services }) => {
                self.events.push_back(Event::ServicesUpdate { services });
            }
            (State::Established | State::Draining, ControlMsg::PunchRequest { device }) => {
                self.events.push_back(Event::PunchRequest { device });
            }
            (State::Established | State::Draining, ControlMsg::PermitsHeld { permits }) => {
                self.events.push_back(Event::PermitsHeld { permits });
            }
            (State::Established | State::Draining, ControlMsg::LocalAddrs { addrs }) => {
                self.events.push_back(Event::LocalAddrs { addrs });
            }
            (State::Established | State::Draining, msg) => self.handle_common(msg)?,
            (state, msg) => return Err(unexpected(state, &msg)),
        }
        Ok(())
    }

    /// Messages both roles accept once established.
    fn handle_common(&mut self, msg: ControlMsg) -> Result<(), SessionError> {
        match msg {
            ControlMsg::ConfigUpdate {
                zone_serial,
                zone_config,
            } => self.events.push_back(Event::ConfigUpdate {
                zone_serial,
                zone_config,
            }),
            // Closing races with the other side's close, so an unknown id is not an error.
            ControlMsg::UdpFlowClose { flow_id } => {
                if self.flows.remove(&flow_id) {
                    self.events.push_back(Event::UdpFlowClose { flow_id });
                }
            }
            ControlMsg::Ping { nonce } => self.transmit.push_back(ControlMsg::Pong { nonce }),
            // Only the latest ping counts: an older pong would give a wrong RTT.
            ControlMsg::Pong { nonce } => {
                if self.ping_in_flight == Some(nonce) {
                    self.ping_in_flight = None;
                    self.events.push_back(Event::Pong { nonce });
                }
            }
            msg => return Err(unexpected(self.state, &msg)),
        }
        Ok(())
    }

    fn peer_error(&mut self, code: ErrorCode, message: String) {
        self.state = State::Closed;
        self.events.push_back(Event::PeerError { code, message });
    }

    fn fail(&mut self, code: ErrorCode, message: String) {
        let message = super::name::wire_text(&message, MAX_REASON_LEN);
        self.state = State::Closed;
        self.ended_here = true;
        self.transmit.push_back(ControlMsg::Error { code, message });
    }

    fn require(
        &self,
        role: Role,
        states: &[State],
        what: &'static str,
    ) -> Result<(), SessionError> {
        if self.role == role && states.contains(&self.state) {
            Ok(())
        } else if self.state == State::Closed {
            Err(SessionError::Closed)
        } else {
            Err(SessionError::Unexpected {
                msg: what,
                state: self.state.name(),
            })
        }
    }

    // ---- gateway actions ---------------------------------------------------------------

    /// Gateway: accept the agent announced by `Event::Hello`.
    pub fn welcome(&mut self, welcome: Welcome) -> Result<(), SessionError> {
        self.require(Role::Gateway, &[State::HelloReceived], "Welcome")?;
        self.state = State::Established;
        self.session_id = Some(welcome.session_id);
        self.transmit.push_back(ControlMsg::Welcome(welcome));
        Ok(())
    }

    /// Ends the session for any reason (the gateway refusing the agent; either side given
    /// bytes that are no message); queues an `Error` for the peer.
    pub fn reject(&mut self, code: ErrorCode, message: &str) {
        self.fail(code, message.to_owned());
    }

    /// Bytes from the peer that are no control message (`e`, from the decoder): the session
    /// ends as a violation the peer is told of, or, for a Hello of another version, as the
    /// version mismatch it is (so the agent can say which side to upgrade). The error to
    /// report.
    pub fn reject_undecodable(&mut self, e: &ProtoError) -> SessionError {
        let err = match e {
            ProtoError::HelloVersion(theirs) => {
                SessionError::VersionMismatch(*theirs, CONTROL_VERSION)
            }
            other => SessionError::Proto(other.clone()),
        };
        if !self.is_closed() {
            match &err {
                SessionError::VersionMismatch(..) => {
                    self.reject(ErrorCode::VersionMismatch, &err.to_string())
                }
                _ => self.reject(
                    ErrorCode::ProtocolViolation,
                    &format!("undecodable control message: {e}"),
                ),
            }
        }
        err
    }

    /// Gateway: tell the agent to move new work elsewhere.
    pub fn drain(&mut self, grace_ms: u32, reason: &str) -> Result<(), SessionError> {
        self.require(
            Role::Gateway,
            &[State::Established, State::Draining],
            "Drain",
        )?;
        self.state = State::Draining;
        let reason = super::name::wire_text(reason, MAX_REASON_LEN);
        self.transmit
            .push_back(ControlMsg::Drain { grace_ms, reason });
        Ok(())
    }

    /// Gateway: open a UDP flow to the agent's `service`; returns the flow id to put on its
    /// datagrams.
    pub fn open_udp_flow(
        &mut self,
        app: String,
        service: String,
        origin: Origin,
    ) -> Result<u32, SessionError> {
        self.require(Role::Gateway, &[State::Established], "UdpFlowOpen")?;
        if self.flows.len() >= MAX_UDP_FLOWS {
            return Err(SessionError::TooManyFlows(MAX_UDP_FLOWS));
        }
        // Terminates: fewer than MAX_UDP_FLOWS ids are taken out of 2^32.
        let mut flow_id = self.next_flow_id;
        while self.flows.contains(&flow_id) {
            flow_id = flow_id.wrapping_add(1);
        }
        self.next_flow_id = flow_id.wrapping_add(1);
        self.flows.insert(flow_id);
        self.transmit
            .push_back(ControlMsg::UdpFlowOpen(UdpFlowOpen {
                flow_id,
                app,
                service,
                origin,
            }));
        Ok(flow_id)
    }

    /// Gateway: give the agent a peer's addresses to punch towards.
    pub fn send_peer_addr(&mut self, peer: PeerAddr) -> Result<(), SessionError> {
        self.require(Role::Gateway, &[State::Established], "PeerAddr")?;
        self.transmit.push_back(ControlMsg::PeerAddr(peer));
        Ok(())
    }

    /// Gateway: tell the agent that `device` may no longer reach `service` there directly.
    pub fn send_permit_revoke(
        &mut self,
        device: String,
        service: String,
    ) -> Result<(), SessionError> {
        self.require(
            Role::Gateway,
            &[State::Established, State::Draining],
            "PermitRevoke",
        )?;
        self.transmit
            .push_back(ControlMsg::PermitRevoke { device, service });
        Ok(())
    }

    // ---- agent actions -----------------------------------------------------------------

    /// Agent: announce a changed service list.
    pub fn send_services_update(&mut self, services: Vec<ServiceInfo>) -> Result<(), SessionError> {
        self.require(
            Role::Agent,
            &[State::Established, State::Draining],
            "ServicesUpdate",
        )?;
        self.transmit
            .push_back(ControlMsg::ServicesUpdate { services });
        Ok(())
    }

    /// Agent: report the direct-path permits it holds (peer, service).
    pub fn send_permits_held(
        &mut self,
        permits: Vec<(String, String)>,
    ) -> Result<(), SessionError> {
        self.require(Role::Agent, &[State::Established], "PermitsHeld")?;
        self.transmit.push_back(ControlMsg::PermitsHeld { permits });
        Ok(())
    }

    /// Gateway: tell the agent how long it keeps a quiet UDP flow.
    pub fn send_udp_flow_idle(&mut self, idle_ms: u32) -> Result<(), SessionError> {
        self.require(Role::Gateway, &[State::Established], "UdpFlowIdle")?;
        self.transmit.push_back(ControlMsg::UdpFlowIdle { idle_ms });
        Ok(())
    }

    /// Agent: report its socket's addresses behind its NAT (at most
    /// [`MAX_LOCAL_ADDRS`](super::limits::MAX_LOCAL_ADDRS)).
    pub fn send_local_addrs(
        &mut self,
        addrs: Vec<std::net::SocketAddr>,
    ) -> Result<(), SessionError> {
        self.require(Role::Agent, &[State::Established], "LocalAddrs")?;
        self.transmit.push_back(ControlMsg::LocalAddrs { addrs });
        Ok(())
    }

    /// Agent: ask the gateway to coordinate hole punching with `device`.
    pub fn request_punch(&mut self, device: String) -> Result<(), SessionError> {
        self.require(Role::Agent, &[State::Established], "PunchRequest")?;
        self.transmit.push_back(ControlMsg::PunchRequest { device });
        Ok(())
    }

    // ---- both ----------------------------------------------------------------------------

    /// Pass on a newer signed zone config.
    pub fn send_config_update(
        &mut self,
        zone_serial: u64,
        zone_config: Vec<u8>,
    ) -> Result<(), SessionError> {
        let states = [State::Established, State::Draining];
        self.require(self.role, &states, "ConfigUpdate")?;
        self.transmit.push_back(ControlMsg::ConfigUpdate {
            zone_serial,
            zone_config,
        });
        Ok(())
    }

    /// Close a UDP flow (its socket or client went away). Unknown ids are ignored.
    pub fn close_udp_flow(&mut self, flow_id: u32) -> Result<(), SessionError> {
        let states = [State::Established, State::Draining];
        self.require(self.role, &states, "UdpFlowClose")?;
        if self.flows.remove(&flow_id) {
            self.transmit
                .push_back(ControlMsg::UdpFlowClose { flow_id });
        }
        Ok(())
    }

    /// Send a ping; the matching pong becomes `Event::Pong`. A new ping supersedes the last.
    pub fn send_ping(&mut self, nonce: u64) -> Result<(), SessionError> {
        let states = [State::Established, State::Draining];
        self.require(self.role, &states, "Ping")?;
        self.ping_in_flight = Some(nonce);
        self.transmit.push_back(ControlMsg::Ping { nonce });
        Ok(())
    }
}

fn unexpected(state: State, msg: &ControlMsg) -> SessionError {
    SessionError::Unexpected {
        msg: msg.name(),
        state: state.name(),
    }
}
