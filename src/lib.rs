//! The `zonegate` binary's library half: CLI definitions and the commands behind them.
//!
//! # Layout
//! - [`cli`]: every command and flag (clap derive).
//! - [`cmd`]: one module per command group; each turns parsed arguments into calls on the crates
//!   (`zone-core`, `policies`, `tunnel`, `gateway`, `name-resolver`).
//! - [`logging`]: tracing set-up shared by every command.

pub mod cli;
pub mod cmd;
pub mod config;
pub mod demo;
pub mod files;
pub mod logging;
pub mod memory;
