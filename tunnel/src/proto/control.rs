//! Control stream messages and their frames: `type varint | length varint | payload`.

use std::net::SocketAddr;

use bytes::BufMut;

use super::codec::{
    parse_body, put_addr, put_bytes, put_count, put_name, put_text, put_varint, Read, Reader,
};
use super::header::{put_origin, read_origin, Origin};
use super::limits::{
    MAX_CONTROL_FRAME, MAX_LOCAL_ADDRS, MAX_PEER_ADDRS, MAX_PERMITS_HELD, MAX_REASON_LEN,
    MAX_SERVICES, MAX_VERSION_LEN, MAX_ZONE_CONFIG,
};
use super::{varint, ProtoError};

/// Control protocol version carried in `Hello`. The stream header version guards the framing;
/// this one lets the gateway refuse an agent whose message semantics it does not know.
pub const CONTROL_VERSION: u16 = 1;

/// Assigned control message types. Anything else decodes as [`ControlMsg::Unknown`].
pub mod msg_type {
    pub const HELLO: u64 = 0x01;
    pub const WELCOME: u64 = 0x02;
    pub const CONFIG_UPDATE: u64 = 0x03;
    pub const SERVICES_UPDATE: u64 = 0x04;
    pub const DRAIN: u64 = 0x05;
    pub const UDP_FLOW_OPEN: u64 = 0x06;
    pub const UDP_FLOW_CLOSE: u64 = 0x07;
    pub const PEER_ADDR: u64 = 0x08;
    pub const PUNCH_REQUEST: u64 = 0x09;
    pub const PING: u64 = 0x0a;
    pub const PONG: u64 = 0x0b;
    pub const ERROR: u64 = 0x0c;
    pub const PERMIT_REVOKE: u64 = 0x0d;
    pub const PERMITS_HELD: u64 = 0x0e;
    pub const LOCAL_ADDRS: u64 = 0x0f;
    pub const UDP_FLOW_IDLE: u64 = 0x10;
}

const PROTO_TCP: u8 = 0x01;
const PROTO_UDP: u8 = 0x02;

/// Transport of an offered service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceProto {
    Tcp,
    Udp,
}

/// A service a device offers, by name (its local address stays on the device).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceInfo {
    pub name: String,
    pub proto: ServiceProto,
}

/// Agent→gateway, first message of the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub proto_version: u16,
    pub device: String,
    pub services: Vec<ServiceInfo>,
    pub zone_serial: u64,
    /// A newer signed zone.json than the gateway may have (opaque here; zone-core verifies).
    pub zone_config: Option<Vec<u8>>,
    pub agent_version: String,
}

/// Gateway→agent, answer to `Hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub session_id: u64,
    /// The agent's address as the gateway sees it (its NAT's public side).
    pub observed_addr: SocketAddr,
    pub zone_serial: u64,
    pub zone_config: Option<Vec<u8>>,
    pub keepalive_ms: u32,
}

/// Gateway→agent: a new UDP flow to `service`; its datagrams carry `flow_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpFlowOpen {
    pub flow_id: u32,
    pub app: String,
    pub service: String,
    pub origin: Origin,
}

/// Gateway→device: try a direct connection to `device` at these addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    pub device: String,
    pub addrs: Vec<SocketAddr>,
    /// Both sides get the same nonce, so they can tell this punching round from older ones.
    pub punch_nonce: u64,
}

/// Control stream error codes. Unassigned values decode as `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    ProtocolViolation,
    VersionMismatch,
    Internal,
    Unknown(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::ProtocolViolation => 1,
            ErrorCode::VersionMismatch => 2,
            ErrorCode::Internal => 3,
            ErrorCode::Unknown(n) => n,
        }
    }

    pub fn from_u16(code: u16) -> Self {
        match code {
            1 => ErrorCode::ProtocolViolation,
            2 => ErrorCode::VersionMismatch,
            3 => ErrorCode::Internal,
            n => ErrorCode::Unknown(n),
        }
    }
}

/// One control stream message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMsg {
    Hello(Hello),
    Welcome(Welcome),
    ConfigUpdate {
        zone_serial: u64,
        zone_config: Vec<u8>,
    },
    ServicesUpdate {
        services: Vec<ServiceInfo>,
    },
    Drain {
        grace_ms: u32,
        reason: String,
    },
    UdpFlowOpen(UdpFlowOpen),
    UdpFlowClose {
        flow_id: u32,
    },
    PeerAddr(PeerAddr),
    PunchRequest {
        device: String,
    },
    /// Gateway to agent: the policy no longer lets `device` reach `service` there; the agent
    /// drops the direct-path permit and ends the direct streams it carries.
    PermitRevoke {
        device: String,
        service: String,
    },
    /// Agent to gateway, as a session starts: the (peer, service) direct-path permits it
    /// holds, so that a gateway that did not relay them (restarted, or another one) still
    /// revokes those its policy does not allow.
    PermitsHeld {
        permits: Vec<(String, String)>,
    },
    /// Agent to gateway, as a session starts: the addresses its QUIC socket has on its own
    /// network (behind its NAT). The gateway passes them to a peer behind the same public
    /// address, whose packets to the shared NAT's outside would rarely come back in.
    LocalAddrs {
        addrs: Vec<SocketAddr>,
    },
    /// Gateway to agent, after `Welcome`: how long the gateway keeps a UDP flow quiet both
    /// ways, so that the agent does not close one the gateway still holds (it closes its
    /// flows after the longer of this and its own setting).
    UdpFlowIdle {
        idle_ms: u32,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// A message type this version does not know; its payload was skipped. Never encoded.
    Unknown {
        ty: u64,
    },
}

impl ControlMsg {
    /// Short name for logs and session errors.
    pub fn name(&self) -> &'static str {
        match self {
            ControlMsg::Hello(_) => "Hello",
            ControlMsg::Welcome(_) => "Welcome",
            ControlMsg::ConfigUpdate { .. } => "ConfigUpdate",
            ControlMsg::ServicesUpdate { .. } => "ServicesUpdate",
            ControlMsg::Drain { .. } => "Drain",
            ControlMsg::UdpFlowOpen(_) => "UdpFlowOpen",
            ControlMsg::UdpFlowClose { .. } => "UdpFlowClose",
            ControlMsg::PeerAddr(_) => "PeerAddr",
            ControlMsg::PunchRequest { .. } => "PunchRequest",
            ControlMsg::PermitRevoke { .. } => "PermitRevoke",
            ControlMsg::PermitsHeld { .. } => "PermitsHeld",
            ControlMsg::LocalAddrs { .. } => "LocalAddrs",
            ControlMsg::UdpFlowIdle { .. } => "UdpFlowIdle",
            ControlMsg::Ping { .. } => "Ping",
            ControlMsg::Pong { .. } => "Pong",
            ControlMsg::Error { .. } => "Error",
            ControlMsg::Unknown { .. } => "unknown message",
        }
    }
}

fn put_services<B: BufMut>(out: &mut B, services: &[ServiceInfo]) -> Result<(), ProtoError> {
    check_unique(services)?;
    put_count(out, "services", services.len(), MAX_SERVICES)?;
    for s in services {
        put_name(out, "service", &s.name)?;
        out.put_u8(match s.proto {
            ServiceProto::Tcp => PROTO_TCP,
            ServiceProto::Udp => PROTO_UDP,
        });
    }
    Ok(())
}

/// A service name is the routing key on the gateway; two entries with one name would make
/// the route ambiguous. Quadratic, but over at most 256 short names.
fn check_unique(services: &[ServiceInfo]) -> Result<(), ProtoError> {
    for (i, s) in services.iter().enumerate() {
        if services[..i].iter().any(|t| t.name == s.name) {
            return Err(ProtoError::DuplicateService);
        }
    }
    Ok(())
}

fn read_services(r: &mut Reader<'_>) -> Read<Vec<ServiceInfo>> {
    let count = r.count("services", MAX_SERVICES)?;
    let mut services = Vec::with_capacity(count);
    for _ in 0..count {
        let name = r.name("service")?;
        let proto = match r.u8()? {
            PROTO_TCP => ServiceProto::Tcp,
            PROTO_UDP => ServiceProto::Udp,
            tag => {
                return Err(ProtoError::InvalidTag {
                    field: "service proto",
                    tag,
                }
                .into())
            }
        };
        services.push(ServiceInfo { name, proto });
    }
    check_unique(&services)?;
    Ok(services)
}

fn put_opt_config<B: BufMut>(out: &mut B, config: &Option<Vec<u8>>) -> Result<(), ProtoError> {
    match config {
        None => out.put_u8(0),
        Some(c) => {
            out.put_u8(1);
            put_bytes(out, "zone config", c, MAX_ZONE_CONFIG)?;
        }
    }
    Ok(())
}

fn read_opt_config(r: &mut Reader<'_>) -> Read<Option<Vec<u8>>> {
    Ok(if r.present("zone config")? {
        Some(r.bytes("zone config", MAX_ZONE_CONFIG)?.to_vec())
    } else {
        None
    })
}

/// Type and payload of a known message. `Unknown` cannot be encoded: we never send types we
/// do not know.
fn encode_payload(msg: &ControlMsg, p: &mut Vec<u8>) -> Result<u64, ProtoError> {
    use msg_type::*;
    Ok(match msg {
        ControlMsg::Hello(h) => {
            p.put_u16(h.proto_version);
            put_name(p, "device", &h.device)?;
            put_services(p, &h.services)?;
            p.put_u64(h.zone_serial);
            put_opt_config(p, &h.zone_config)?;
            put_text(p, "agent version", &h.agent_version, MAX_VERSION_LEN)?;
            HELLO
        }
        ControlMsg::Welcome(w) => {
            p.put_u64(w.session_id);
            put_addr(p, &w.observed_addr);
            p.put_u64(w.zone_serial);
            put_opt_config(p, &w.zone_config)?;
            p.put_u32(w.keepalive_ms);
            WELCOME
        }
        ControlMsg::ConfigUpdate {
            zone_serial,
            zone_config,
        } => {
            p.put_u64(*zone_serial);
            put_bytes(p, "zone config", zone_config, MAX_ZONE_CONFIG)?;
            CONFIG_UPDATE
        }
        ControlMsg::ServicesUpdate { services } => {
            put_services(p, services)?;
            SERVICES_UPDATE
        }
        ControlMsg::Drain { grace_ms, reason } => {
            p.put_u32(*grace_ms);
            put_text(p, "drain reason", reason, MAX_REASON_LEN)?;
            DRAIN
        }
        ControlMsg::UdpFlowOpen(f) => {
            put_varint(p, u64::from(f.flow_id))?;
            put_name(p, "app", &f.app)?;
            put_name(p, "service", &f.service)?;
            put_origin(p, &f.origin)?;
            UDP_FLOW_OPEN
        }
        ControlMsg::UdpFlowClose { flow_id } => {
            put_varint(p, u64::from(*flow_id))?;
            UDP_FLOW_CLOSE
        }
        ControlMsg::PeerAddr(pa) => {
            put_name(p, "peer device", &pa.device)?;
            put_count(p, "peer addresses", pa.addrs.len(), MAX_PEER_ADDRS)?;
            for a in &pa.addrs {
                put_addr(p, a);
            }
            p.put_u64(pa.punch_nonce);
            PEER_ADDR
        }
        ControlMsg::PunchRequest { device } => {
            put_name(p, "punch device", device)?;
            PUNCH_REQUEST
        }
        ControlMsg::PermitRevoke { device, service } => {
            put_name(p, "permit device", device)?;
            put_name(p, "permit service", service)?;
            PERMIT_REVOKE
        }
        ControlMsg::PermitsHeld { permits } => {
            put_count(p, "permits", permits.len(), MAX_PERMITS_HELD)?;
            for (device, service) in permits {
                put_name(p, "permit device", device)?;
                put_name(p, "permit service", service)?;
            }
            PERMITS_HELD
        }
        ControlMsg::LocalAddrs { addrs } => {
            put_count(p, "local addresses", addrs.len(), MAX_LOCAL_ADDRS)?;
            for a in addrs {
                put_addr(p, a);
            }
            LOCAL_ADDRS
        }
        ControlMsg::UdpFlowIdle { idle_ms } => {
            p.put_u32(*idle_ms);
            UDP_FLOW_IDLE
        }
        ControlMsg::Ping { nonce } => {
            p.put_u64(*nonce);
            PING
        }
        ControlMsg::Pong { nonce } => {
            p.put_u64(*nonce);
            PONG
        }
        ControlMsg::Error { code, message } => {
            p.put_u16(code.to_u16());
            put_text(p, "error message", message, MAX_REASON_LEN)?;
            ERROR
        }
        ControlMsg::Unknown { ty } => return Err(ProtoError::EncodeUnknown(*ty)),
    })
}

fn parse_payload(ty: u64, r: &mut Reader<'_>) -> Read<ControlMsg> {
    use msg_type::*;
    Ok(match ty {
        HELLO => ControlMsg::Hello(Hello {
            // First, and alone for another version: a newer one may add fields (which read
            // here as trailing bytes, a mere violation) or change them.
            proto_version: match r.u16()? {
                CONTROL_VERSION => CONTROL_VERSION,
                other => return Err(ProtoError::HelloVersion(other).into()),
            },
            device: r.name("device")?,
            services: read_services(r)?,
            zone_serial: r.u64()?,
            zone_config: read_opt_config(r)?,
            agent_version: r.text("agent version", MAX_VERSION_LEN)?,
        }),
        WELCOME => ControlMsg::Welcome(Welcome {
            session_id: r.u64()?,
            observed_addr: r.addr("observed address")?,
            zone_serial: r.u64()?,
            zone_config: read_opt_config(r)?,
            keepalive_ms: r.u32()?,
        }),
        CONFIG_UPDATE => ControlMsg::ConfigUpdate {
            zone_serial: r.u64()?,
            zone_config: r.bytes("zone config", MAX_ZONE_CONFIG)?.to_vec(),
        },
        SERVICES_UPDATE => ControlMsg::ServicesUpdate {
            services: read_services(r)?,
        },
        DRAIN => ControlMsg::Drain {
            grace_ms: r.u32()?,
            reason: r.text("drain reason", MAX_REASON_LEN)?,
        },
        UDP_FLOW_OPEN => ControlMsg::UdpFlowOpen(UdpFlowOpen {
            flow_id: r.varint_u32("flow id")?,
            app: r.name("app")?,
            service: r.name("service")?,
            origin: read_origin(r)?,
        }),
        UDP_FLOW_CLOSE => ControlMsg::UdpFlowClose {
            flow_id: r.varint_u32("flow id")?,
        },
        PEER_ADDR => {
            let device = r.name("peer device")?;
            let count = r.count("peer addresses", MAX_PEER_ADDRS)?;
            let mut addrs = Vec::with_capacity(count);
            for _ in 0..count {
                addrs.push(r.addr("peer address")?);
            }
            ControlMsg::PeerAddr(PeerAddr {
                device,
                addrs,
                punch_nonce: r.u64()?,
            })
        }
        PUNCH_REQUEST => ControlMsg::PunchRequest {
            device: r.name("punch device")?,
        },
        PERMIT_REVOKE => ControlMsg::PermitRevoke {
            device: r.name("permit device")?,
            service: r.name("permit service")?,
        },
        PERMITS_HELD => {
            let count = r.count("permits", MAX_PERMITS_HELD)?;
            let mut permits = Vec::with_capacity(count);
            for _ in 0..count {
                permits.push((r.name("permit device")?, r.name("permit service")?));
            }
            ControlMsg::PermitsHeld { permits }
        }
        LOCAL_ADDRS => {
            let count = r.count("local addresses", MAX_LOCAL_ADDRS)?;
            let mut addrs = Vec::with_capacity(count);
            for _ in 0..count {
                addrs.push(r.addr("local address")?);
            }
            ControlMsg::LocalAddrs { addrs }
        }
        UDP_FLOW_IDLE => ControlMsg::UdpFlowIdle { idle_ms: r.u32()? },
        PING => ControlMsg::Ping { nonce: r.u64()? },
        PONG => ControlMsg::Pong { nonce: r.u64()? },
        ERROR => ControlMsg::Error {
            code: ErrorCode::from_u16(r.u16()?),
            message: r.text("error message", MAX_REASON_LEN)?,
        },
        ty => {
            // Skip: a newer peer's message must not break us.
            r.rest();
            ControlMsg::Unknown { ty }
        }
    })
}

/// Appends one framed control message; on error nothing is written.
pub fn encode_control<B: BufMut>(msg: &ControlMsg, out: &mut B) -> Result<(), ProtoError> {
    let mut payload = Vec::new();
    let ty = encode_payload(msg, &mut payload)?;
    // Unreachable with valid fields (see `limits::WORST_CASE_HELLO`); kept as a guard for
    // future messages.
    if payload.len() > MAX_CONTROL_FRAME {
        return Err(ProtoError::FrameTooLarge {
            ty,
            len: payload.len() as u64,
            max: MAX_CONTROL_FRAME,
        });
    }
    put_varint(out, ty)?;
    put_varint(out, payload.len() as u64)?;
    out.put_slice(&payload);
    Ok(())
}

/// Reads a frame prefix: `Ok(None)` until complete, `(type, payload length, prefix length)`.
/// The length is checked against [`MAX_CONTROL_FRAME`] here, before any payload is awaited.
pub(crate) fn decode_frame_prefix(buf: &[u8]) -> Result<Option<(u64, usize, usize)>, ProtoError> {
    let Some((ty, ty_len)) = varint::decode(buf)? else {
        return Ok(None);
    };
    let Some((len, len_len)) = varint::decode(&buf[ty_len..])? else {
        return Ok(None);
    };
    if len > MAX_CONTROL_FRAME as u64 {
        return Err(ProtoError::FrameTooLarge {
            ty,
            len,
            max: MAX_CONTROL_FRAME,
        });
    }
    Ok(Some((ty, len as usize, ty_len + len_len)))
}

/// Decodes one framed control message from the start of `buf`. Unknown types are returned as
/// `ControlMsg::Unknown` with their whole frame consumed.
pub fn decode_control(buf: &[u8]) -> Result<Option<(ControlMsg, usize)>, ProtoError> {
    let Some((ty, len, prefix)) = decode_frame_prefix(buf)? else {
        return Ok(None);
    };
    let Some(payload) = buf.get(prefix..prefix + len) else {
        return Ok(None);
    };
    let msg = parse_body(payload, "control message", |r| parse_payload(ty, r))?;
    Ok(Some((msg, prefix + len)))
}
