//! Integration tests of name-resolver: a real server on 127.0.0.1 (port 0) asked by real clients
//! (dig, kdig, hickory's client). One binary, one module per concern.

mod answer_source;
mod bootstrap;
mod common;
mod digs;
mod serial;
mod shared_port;
mod tcp_limits;
