//! Every command and flag of `zonegate`. Values that have a type (device names, domains,
//! roles, addresses) are parsed here, so a bad one is a usage error (exit code 2).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use zone_core::{DeviceName, Domain, Role};

#[derive(Debug, Parser)]
#[command(
    name = "zonegate",
    version,
    about = "Your devices behind NATs, one network with a public face"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create and inspect a zone (run on the owner's machine, where the zone key lives)
    #[command(subcommand)]
    Zone(ZoneCmd),
    /// Add, list, revoke, renew and move devices of a zone
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Run the public gateway (on the VPS)
    Gateway(GatewayArgs),
    /// Run the node agent (on a device, usually behind NAT)
    Node(NodeArgs),
    /// Check and explain traffic policy files
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Run a whole zone on this machine: a gateway and two nodes on loopback, with services
    Demo {
        /// Where to create the demo zone (default: a temporary directory, removed at exit)
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Check every path once and exit (non-zero on failure)
        #[arg(long)]
        check: bool,
    },
    /// Serve a directory read-only over HTTP (a file service for a node to offer)
    Files {
        /// Directory to serve
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Address to listen on (keep it on loopback: the node agent offers it to the zone)
        #[arg(long, default_value = "127.0.0.1:8000", value_parser = crate::config::socket_addr)]
        listen: SocketAddr,
        /// The directory is a web site: its HTML, SVG and XML files run their scripts as the
        /// site's pages (without it they are sandboxed: a file someone else put in the share
        /// cannot run script as the zone's site)
        #[arg(long)]
        site: bool,
        /// Serve and list names starting with `.` too (without it `.git/`, `.env`, `.ssh/`
        /// answer 404 and listings leave them out)
        #[arg(long)]
        hidden: bool,
        /// The node agent's address when it runs on another machine than this service: its
        /// X-Forwarded-For names the clients, counted apart (loopback's always is)
        /// (repeatable)
        #[arg(long = "proxy", value_name = "IP")]
        proxies: Vec<std::net::IpAddr>,
    },
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// gateway.toml from the device bundle
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Policy directory (overrides `policies` in the config)
    #[arg(long, value_name = "DIR")]
    pub policies: Option<PathBuf>,
    /// A service this device offers: NAME=IP:PORT[/udp] (repeatable)
    #[arg(long = "service", value_name = "NAME=IP:PORT")]
    pub services: Vec<String>,
    /// A local port into the mesh: LISTEN=DEVICE/SERVICE (repeatable)
    #[arg(long = "forward", value_name = "LISTEN=DEVICE/SERVICE")]
    pub forwards: Vec<String>,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// node.toml from the device bundle
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Fetch the zone config from this DNS server (IP:PORT) at start, verified with the zone CA
    #[arg(long, value_name = "IP:PORT", value_parser = crate::config::socket_addr)]
    pub bootstrap_dns: Option<SocketAddr>,
    /// A service this device offers: NAME=IP:PORT[/udp] (repeatable)
    #[arg(long = "service", value_name = "NAME=IP:PORT")]
    pub services: Vec<String>,
    /// A local port into the mesh: LISTEN=DEVICE/SERVICE (repeatable)
    #[arg(long = "forward", value_name = "LISTEN=DEVICE/SERVICE")]
    pub forwards: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Print every error of every policy file (file:line:column); exit 1 if any
    Check {
        /// The policy directory
        dir: PathBuf,
        /// Also check the apps against this gateway's own ports (its gateway.toml: `listen`,
        /// `admin`, `http`, `https`, `dns`, forwards), as the gateway does; defaults are taken
        /// as this machine would bind them (`[::]`, or `0.0.0.0` without IPv6)
        #[arg(long, value_name = "FILE")]
        gateway_config: Option<PathBuf>,
    },
    /// Say which app and rule decide a request, and why
    Explain {
        /// The policy directory
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Who asks: an IP address (public client) or device:NAME
        #[arg(long)]
        from: String,
        /// Roles of the asking device (with --from device:NAME): gateway or node
        #[arg(long = "role", value_name = "ROLE")]
        roles: Vec<Role>,
        /// HTTP host
        #[arg(long, requires = "path")]
        host: Option<String>,
        /// HTTP path
        #[arg(long)]
        path: Option<String>,
        /// HTTP method (default GET)
        #[arg(long, conflicts_with = "to")]
        method: Option<String>,
        /// Mesh target DEVICE/SERVICE (instead of --host/--path)
        #[arg(long, conflicts_with_all = ["host", "path"])]
        to: Option<String>,
        /// A tcp app's listen address IP:PORT (instead of --host/--path)
        #[arg(long, value_name = "IP:PORT", value_parser = crate::config::socket_addr, conflicts_with_all = ["host", "path", "to", "method", "udp", "roles"])]
        tcp: Option<std::net::SocketAddr>,
        /// A udp app's listen address IP:PORT (instead of --host/--path)
        #[arg(long, value_name = "IP:PORT", value_parser = crate::config::socket_addr, conflicts_with_all = ["host", "path", "to", "method", "roles"])]
        udp: Option<std::net::SocketAddr>,
        /// The moment to decide at, RFC 3339 (2026-12-07T21:30:00+01:00); default now: rules
        /// with hours or days decide by it
        #[arg(long, value_name = "TIME", value_parser = parse_moment)]
        at: Option<time::OffsetDateTime>,
    },
}

/// An RFC 3339 moment, with what to write when it is not one.
fn parse_moment(s: &str) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(|e| {
        format!("{s:?}: {e}; write a moment as 2026-12-07T21:30:00+01:00 (or ...Z for UTC)")
    })
}

#[derive(Debug, Args)]
pub struct ZoneArg {
    /// The zone directory (made by `zonegate zone init`)
    #[arg(long, value_name = "DIR")]
    pub zone: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum ZoneCmd {
    /// Create a zone: zone key (0600), zone-ca.crt and a signed zone.json (serial 1)
    Init {
        /// The zone's domain, e.g. alice.example
        #[arg(long)]
        domain: Domain,
        /// Where to create the zone (must not hold a zone already)
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Show devices, roles, serial and expiries; warns about what expires within 30 days
    Show(ZoneArg),
    /// Print the TXT strings for _zonegate.DOMAIN, one per line, in order
    DumpText(ZoneArg),
    /// Re-sign zone.json with a fresh validity period (new serial)
    Resign {
        #[command(flatten)]
        zone: ZoneArg,
        /// Validity of the signed config in days; later changes (device add, revoke, move,
        /// renew) sign with the same validity until the next resign
        #[arg(long, default_value_t = zone_core::config::DEFAULT_VALID_DAYS)]
        valid_days: i64,
        /// Sign as of this machine's clock even when the zone's last change is later (it was
        /// signed by a clock ahead): `device add` and `device renew` work again at once
        #[arg(long)]
        clock_is_right: bool,
    },
    /// Verify a zone config against the pinned zone CA; exits non-zero with the reason
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
#[group(id = "source", required = true, multiple = false)]
pub struct VerifySource {
    /// A zone.json file
    #[arg(long, value_name = "FILE", group = "source")]
    pub file: Option<PathBuf>,
    /// A file of TXT strings (as printed by `zone dump-text`), one per line, any order
    #[arg(long, value_name = "FILE", group = "source")]
    pub text: Option<PathBuf>,
    /// Fetch the TXT strings of _zonegate.DOMAIN from a DNS server (with --server)
    #[arg(long, value_name = "DOMAIN", group = "source", requires = "server")]
    pub dns: Option<Domain>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub source: VerifySource,
    /// The zone CA certificate you trust (zone-ca.crt)
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// Refuse a config older than this serial (the newest you already know)
    #[arg(long, value_name = "SERIAL")]
    pub known_serial: Option<u64>,
    /// DNS server to ask with --dns, as IP:PORT
    #[arg(long, value_name = "IP:PORT", conflicts_with_all = ["file", "text"], value_parser = crate::config::socket_addr)]
    pub server: Option<SocketAddr>,
}

#[derive(Debug, Subcommand)]
pub enum DeviceCmd {
    /// Add a device: derived key, certificate and a ready-to-run bundle
    Add {
        name: DeviceName,
        #[command(flatten)]
        zone: ZoneArg,
        /// Role of the device (repeat for several): gateway or node
        #[arg(long = "role", required = true, value_name = "ROLE")]
        roles: Vec<Role>,
        /// Public IP:PORT agents dial (gateways only; repeat for several)
        #[arg(long = "public-addr", value_name = "IP:PORT", value_parser = crate::config::socket_addr)]
        public_addrs: Vec<SocketAddr>,
        /// Where to write the bundle (default: ZONE/devices/NAME)
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Certificate validity in days
        #[arg(long, default_value_t = zone_core::cert::DEVICE_CERT_DAYS)]
        days: i64,
    },
    /// List the zone's devices
    List(ZoneArg),
    /// Revoke a device: its certificate is refused wherever this zone.json is known
    Revoke {
        name: DeviceName,
        #[command(flatten)]
        zone: ZoneArg,
        /// Revoke the zone's only gateway even so (every node then needs the new zone.json
        /// copied into its bundle by hand); or revoke a name this directory does not list
        /// (a device added in a newer copy of the zone: its certificates are refused by name)
        #[arg(long)]
        force: bool,
    },
    /// Re-issue a device's certificate (same derived key) and rewrite its bundle
    Renew {
        name: DeviceName,
        #[command(flatten)]
        zone: ZoneArg,
        /// Where to write the bundle (default: ZONE/devices/NAME)
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Certificate validity in days
        #[arg(long, default_value_t = zone_core::cert::DEVICE_CERT_DAYS)]
        days: i64,
    },
    /// Give a gateway new public addresses (it moved; key and certificate stay)
    Move {
        name: DeviceName,
        #[command(flatten)]
        zone: ZoneArg,
        /// The public IP:PORT agents dial from now on (repeat for several; replaces the old)
        #[arg(long = "public-addr", value_name = "IP:PORT", required = true, value_parser = crate::config::socket_addr)]
        public_addrs: Vec<SocketAddr>,
    },
    /// Print a device's derived public key (writes nothing)
    Pubkey {
        name: DeviceName,
        #[command(flatten)]
        zone: ZoneArg,
    },
}
