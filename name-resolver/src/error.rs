//! Typed errors: building records, running the server, bootstrapping from DNS.
//!
//! Each says who caused it (the local config, the operating system, the DNS server asked, or the
//! answer itself) and what to do.

use std::net::SocketAddr;

use zone_core::ZoneError;

/// The zone cannot be turned into DNS records (a problem of the local zone.json).
#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    #[error("{0:?} is not a valid DNS name: {1}; serve this zone's DNS elsewhere (dns = \"off\" in gateway.toml)")]
    Name(String, String),
    #[error("zone config is too large for DNS: its TXT record would be {bytes} bytes, the limit is {max} (a DNS message holds at most 64 KiB); revoke devices no longer used (a revocation takes less room than a device), or set dns = \"off\" in gateway.toml and give nodes their zone.json by hand")]
    TxtTooLarge { bytes: usize, max: usize },
    #[error("a TXT string is {0} bytes; one TXT character-string holds at most 255")]
    TxtString(usize),
}

/// The DNS server cannot start or stopped unexpectedly.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    // The message embeds the I/O error, so it is not also a `source`: error chains (anyhow's
    // `{:#}`) would print it twice.
    #[error("DNS: cannot listen on {proto} {addr}: {error}{hint}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        error: std::io::Error,
        /// What to do about it, with a leading "; ".
        hint: String,
    },
    #[error("DNS: cannot build the zone's records: {0}")]
    Records(#[from] RecordsError),
    #[error("DNS: the {0} listener stopped unexpectedly: {1}")]
    Stopped(&'static str, String),
}

impl DnsError {
    /// A bind refused because another socket holds the address.
    pub fn in_use(&self) -> bool {
        matches!(self, DnsError::Bind { error, .. } if error.kind() == std::io::ErrorKind::AddrInUse)
    }

    /// The error without its hint, for a list of addresses skipped.
    pub fn short(&self) -> String {
        match self {
            DnsError::Bind { proto, error, .. } => format!("{proto}: {error}"),
            other => other.to_string(),
        }
    }
}

/// Who is to blame for a failed bootstrap: decides whether trying another server can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    /// The server could not be reached or did not answer.
    Network,
    /// The server answered, but not with the zone config (not authoritative, no record).
    Server,
    /// The answer came but is not acceptable: forged, incomplete or stale.
    Answer,
}

/// Fetching the zone config over DNS failed.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("DNS server {server} did not answer for {name} over {proto}: {why}{}", if *.proto == "-" { "" } else { " (is it the gateway's `dns` address and port, and open to this machine through any firewall?)" })]
    Unreachable {
        server: SocketAddr,
        name: String,
        proto: &'static str,
        why: String,
    },
    /// UDP failed, and so did the TCP tried after it (networks that drop UDP to port 53 may
    /// let TCP through): both said, each may be the one to fix.
    #[error("{udp}; then over TCP: {tcp}")]
    Both {
        udp: Box<BootstrapError>,
        tcp: Box<BootstrapError>,
    },
    /// UDP answered, truncated (the config is larger than a UDP answer may be), and TCP,
    /// which it then needs, failed: most likely a firewall letting UDP through only.
    #[error("{tcp}; the server answered over UDP, but the zone config needs DNS over TCP: allow TCP port {} to {} as UDP is", .server.port(), .server.ip())]
    TcpNeeded {
        server: SocketAddr,
        tcp: Box<BootstrapError>,
    },
    #[error("DNS server {server} answered {rcode} for {name}: {hint}")]
    Rcode {
        server: SocketAddr,
        name: String,
        rcode: String,
        hint: &'static str,
    },
    #[error("DNS server {server} has no TXT record at {name}: is it the gateway of this zone? (A gateway whose zone config is too large for DNS publishes none: its log says so)")]
    NoRecord { server: SocketAddr, name: String },
    #[error("DNS server {server}: the answer for {name} was still truncated over TCP")]
    Truncated { server: SocketAddr, name: String },
    #[error(
        "zone config from DNS server {server} is incomplete or malformed, refusing it: {source}"
    )]
    Malformed {
        server: SocketAddr,
        #[source]
        source: ZoneError,
    },
    /// Valid, but not a successor of the config already held (it leaves out a revocation).
    #[error("zone config from DNS server {server} refused: {source}")]
    NotASuccessor {
        server: SocketAddr,
        #[source]
        source: ZoneError,
    },
    #[error("zone config from DNS server {server} does not verify against the pinned zone CA, refusing it (forged or tampered answer): {source}")]
    Forged {
        server: SocketAddr,
        #[source]
        source: ZoneError,
    },
    #[error("zone config from DNS server {server} is older than the one already known, refusing it: {source}")]
    Stale {
        server: SocketAddr,
        #[source]
        source: ZoneError,
    },
    #[error("zone config from DNS server {server} has expired: {source}")]
    Expired {
        server: SocketAddr,
        #[source]
        source: ZoneError,
    },
    #[error(
        "zone config from DNS server {server} is for domain {found}, not {asked}: refusing it"
    )]
    WrongDomain {
        server: SocketAddr,
        asked: String,
        found: String,
    },
}

impl BootstrapError {
    /// Who caused the failure.
    pub fn blame(&self) -> Blame {
        match self {
            BootstrapError::Unreachable { .. } => Blame::Network,
            BootstrapError::TcpNeeded { tcp, .. } => tcp.blame(),
            // TCP's failure is the last word: UDP may be filtered where TCP got an answer.
            // Unless UDP brought an answer that was refused: TCP's failure to bring one does
            // not make that the network's fault.
            BootstrapError::Both { udp, .. } if udp.blame() == Blame::Answer => Blame::Answer,
            BootstrapError::Both { tcp, .. } => tcp.blame(),
            BootstrapError::Rcode { .. }
            | BootstrapError::NoRecord { .. }
            | BootstrapError::Truncated { .. } => Blame::Server,
            _ => Blame::Answer,
        }
    }
}
