//! The public edge: TCP/UDP listeners for policy apps, routing to devices through the tunnel
//! hub, the admin API, and the gateway process that ties them together.
//!
//! # Layout
//! - [`run`]: [`run::Gateway`] — starts the hub, listeners, forwards, admin; drains on stop.
//! - [`listeners`]: one TCP or UDP listener per `tcp`/`udp` policy app, reconciled on reload.
//! - [`admin`]: loopback HTTP: `/status` JSON.

pub mod admin;
pub mod listeners;
pub mod run;

pub use run::{Gateway, GatewayOptions};
