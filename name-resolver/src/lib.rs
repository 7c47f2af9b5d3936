//! DNS authority for hosted zone domains (hickory-server) and zone-config bootstrap over DNS.
//!
//! # Layout
//! - [`records`]: the zone's answers, precomputed from a `SignedZone` (pure, no I/O): SOA, NS,
//!   A/AAAA for the apex, `*.DOMAIN` and devices, TXT `_zonegate.DOMAIN`; RFC 4592 wildcards.
//! - [`handler`]: hickory-server `RequestHandler` answering from swappable records: REFUSED
//!   outside the zone, AA inside, truncation (TC) of UDP answers that do not fit.
//! - [`server`]: [`DnsServer`]: binds UDP/TCP, follows the gateway's zone serial, bounded TCP.
//! - [`bootstrap`]: [`fetch_zone`]: a node fetches and verifies the zone config over DNS.
//! - [`rrl`]: response rate limiting of UDP answers (no reflection).
//! - `udp`: the UDP receive loop; each answer leaves from the address its query came to.
//! - `tcp_writer`: a TCP connection's socket: answers owed, the length sent with its answer,
//!   lingering close.
//! - [`error`]: typed errors.
//!
//! # Glossary
//! - *apex*: the zone domain itself (`alice.example.`).
//! - *zone config TXT*: the `zone dump-text` strings of zone.json at `_zonegate.DOMAIN`.

pub mod bootstrap;
pub mod error;
pub mod handler;
pub mod records;
pub mod rrl;
pub mod server;
pub mod stats;
mod tcp_writer;
#[doc(hidden)]
pub mod testzone;
mod udp;

pub use bootstrap::{fetch_txt, fetch_zone};
pub use error::{Blame, BootstrapError, DnsError, RecordsError};
pub use handler::ZoneHandler;
pub use records::ZoneRecords;
pub use server::{tcp_frame, DnsServer, TcpFrame};
pub use stats::{DnsCounts, DnsStats};
#[doc(hidden)]
pub use udp::answer_datagram;
