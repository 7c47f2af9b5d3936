//! The `zonegate` binary's library half: CLI definitions and the commands behind them.
//!
//! # Layout
//! - [`cli`]: every command and flag (clap derive).
//! - [`cmd`]: one module per command group; each turns parsed arguments into calls on the crates
//!   (`zone-core`, `policies`, `tunnel`, `gateway`, `name-resolver`).
//! - [`logging`]: tracing set-up shared by every command; [`fd_limit`]: the open-files limit
//!   raised before serving; [`node_metrics`]: a node agent's `/metrics`.

pub mod cli;
pub mod cmd;
pub mod config;
pub mod demo;
pub mod fd_limit;
pub mod files;
pub mod logging;
pub mod memory;
pub mod node_metrics;
