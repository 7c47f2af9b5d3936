//! Wire protocol (sans-IO `proto`), QUIC transport, node agent, gateway hub, relay and mesh.
//!
//! # Layout
//! - [`proto`]: the wire protocol without I/O: stream headers, control messages, datagrams,
//!   the control session state machine.
//! - [`creds`]: a device's bundle loaded and cross-checked; the newest verified zone config.
//! - [`tls`], [`transport`], [`udp`]: rustls (mutual TLS, ALPN `zonegate/1`), quinn endpoints
//!   and the UDP socket under them; [`sockets`]: binding, `[::]` for IPv4 and IPv6 at once.
//! - [`control`]: I/O around the control session.
//! - [`stream`], [`splice`], [`upstream`]: one proxied connection per QUIC stream;
//!   [`holds`]: cutting streams whose readers stopped reading before they stall the rest.
//! - [`e2e`]: Noise IK end to end on relayed mesh streams (sans-IO framer + stream wrapper).
//! - [`admit`]: handshake cap and QUIC Retry for incoming connections (hub and peers).
//! - [`hub`]: the gateway side (agents table, streams to devices, mesh relay, UDP flows, drain).
//! - [`peers`]: direct device↔device paths: peer table, hole punching, direct-use permits;
//!   [`candidates`]: the addresses a punching round dials (LAN ones behind a shared NAT).
//! - [`agent`]: the node side (dial, reconnect, serve services, forwards).
//! - [`services`]: the services a device offers; [`status`]: `/status` snapshots.
//! - [`flow_activity`]: when a UDP flow last carried a datagram, either way (its idle timer);
//!   [`flow_datagram`]: sending one, a too-large one reported; [`flow_table`]: an agent's
//!   flows, and datagrams that came before their flow's open.
//! - [`zone_watch`]: adopts a newer zone.json copied into a running device's bundle.

pub mod admit;
pub mod agent;
pub mod backoff;
pub mod candidates;
pub mod control;
pub mod creds;
pub mod e2e;
pub mod error;
pub mod flow_activity;
pub mod flow_datagram;
pub mod flow_table;
pub mod holds;
pub mod hub;
pub mod linger;
pub mod log_budget;
pub mod peers;
pub mod proto;
mod read_gate;
pub mod services;
pub mod sockets;
pub mod splice;
pub mod status;
pub mod stream;
pub mod tls;
pub mod transport;
pub mod udp;
pub mod upstream;
pub mod window_loan;
pub mod zone_watch;

pub use error::{OpenError, TunnelError};
