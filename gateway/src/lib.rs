//! The public edge: the HTTP(S) front and TCP/UDP listeners for policy apps, routing to
//! devices through the tunnel hub, the admin API, and the gateway process that ties them
//! together.
//!
//! # Layout
//! - [`run`]: [`run::Gateway`] — starts the hub, listeners, forwards, admin; drains on stop.
//! - [`http`]: the public HTTP(S) front (routing, proxy, TLS, pool, metrics, status page).
//! - [`listeners`]: one TCP or UDP listener per `tcp`/`udp` policy app, reconciled on reload.
//! - [`per_ip`]: open public connections (front, `tcp` apps) and UDP flows per client address.
//! - [`proxy_header`]: PROXY protocol v2 headers for tcp apps that ask for them.
//! - [`admin`]: loopback HTTP: `/status` JSON, `/metrics`, the HTML status page at `/`.

pub mod addr_text;
pub mod admin;
pub mod http;
pub mod listeners;
pub mod make_room;
pub mod per_ip;
pub mod port_holders;
pub mod proxy_header;
pub mod run;
pub mod udp_app;
pub mod unlisted;

pub use run::{Gateway, GatewayOptions, RunError};
