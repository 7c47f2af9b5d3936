//! The files `zonegate node --config` and `zonegate gateway --config` read (as written by
//! `zonegate device add`), and the `--service`/`--forward` flags that add to them.
//! Unknown keys are errors; relative paths are relative to the config file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tunnel::agent::Forward;
use tunnel::creds::BundlePaths;
use tunnel::proto::ServiceProto;
use tunnel::services::{LocalService, LocalServices};
use tunnel::transport::Tuning;
use zone_core::DeviceName;

use crate::cmd::UsageError;

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEntry {
    #[serde(deserialize_with = "addr::one")]
    pub local: SocketAddr,
    #[serde(default)]
    pub proto: Proto,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardEntry {
    #[serde(deserialize_with = "addr::one")]
    pub listen: SocketAddr,
    pub to: String,
}

/// Optional transport timing (milliseconds); defaults suit home NATs.
#[derive(Debug, Clone, Copy, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TunnelSection {
    pub keepalive_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    /// A UDP flow quiet both ways this long is closed (syslog or game clients that send
    /// rarely may want more than the 120 s default).
    pub udp_flow_idle_secs: Option<u64>,
    /// Gateway: a stream whose public client took nothing for this long is held
    /// (`tunnel::holds`); default 5 s.
    pub reader_stall_secs: Option<u64>,
    /// Seconds of silence after which a proxied TCP connection's client is probed (TCP
    /// keepalive, a probe every quarter of this after; four unanswered end the connection,
    /// twice this after its last packet); 0: never. Default 300.
    pub tcp_keepalive_secs: Option<u64>,
}

/// Optional HTTP(S) front timing, gateway.toml `[front]` (seconds, 1 to 86,400); defaults in
/// [`gateway::http::HttpTuning`].
#[derive(Debug, Clone, Copy, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FrontSection {
    /// A client's request headers (default 10).
    pub header_read_timeout_secs: Option<u64>,
    /// A service's answer to start, else 504 (default 60).
    pub response_timeout_secs: Option<u64>,
    /// A service's pause in the middle of its answer, else the answer is cut (default 300).
    pub read_timeout_secs: Option<u64>,
    /// A client leaving its answer unread, else its connection is closed (default 60).
    pub send_timeout_secs: Option<u64>,
    /// A client's stalled request body, else 408 (default 60).
    pub body_timeout_secs: Option<u64>,
    /// An HTTP/2 connection without an open request, else GOAWAY (default 60).
    pub idle_timeout_secs: Option<u64>,
    /// A client's TLS handshake (default 10).
    pub tls_handshake_timeout_secs: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    pub device: DeviceName,
    pub domain: zone_core::Domain,
    pub key: PathBuf,
    pub cert: PathBuf,
    pub ca: PathBuf,
    pub zone_config: PathBuf,
    #[serde(default, deserialize_with = "addr::maybe")]
    pub admin: Option<SocketAddr>,
    /// Seconds a stopping agent lets the streams it serves finish.
    pub grace_secs: Option<u64>,
    /// A DNS server (usually a gateway) to fetch and verify the zone config from at start;
    /// the result replaces `zone_config` when newer (or creates it).
    #[serde(default, deserialize_with = "addr::maybe")]
    pub bootstrap_dns: Option<SocketAddr>,
    #[serde(default)]
    pub services: BTreeMap<String, ServiceEntry>,
    #[serde(default)]
    pub forward: Vec<ForwardEntry>,
    #[serde(default)]
    pub tunnel: TunnelSection,
    /// Worker threads of the async runtime (default [`NODE_THREADS`]).
    pub threads: Option<usize>,
}

/// Worker threads of a node agent by default. One: the agent shares its device with the
/// services it exposes, and one thread carries far more than a home uplink (on the 2-core
/// bench machine 4-5 Gbit/s of tunnel traffic); measured against two threads, it also spends
/// less CPU per request and per byte (fewer cross-thread wake-ups; benches/RESULTS.md).
pub const NODE_THREADS: usize = 1;
/// Worker threads of a gateway by default: one per CPU core but one, at least one. The core
/// left over goes to the kernel's network stack (every packet a gateway relays is copied and
/// checksummed there, in softirq time the scheduler charges to whoever is running) and to the
/// log writer. On the 2-core bench machine one worker against two (`benches/ab.sh
/// half|front|conn|bulk BIN@1,1 BIN@1,2`, 3 rounds) spent 26 % less gateway CPU per request
/// at half load with a lower p99 (2.1–3.3 vs 3.1–3.5 ms), 10–15 % less per new connection
/// with more of them per second, and the same req/s and Gbit/s: the tunnel to a node is one
/// QUIC connection, one state machine behind one lock, so a second worker mostly added
/// cross-thread wake-ups (~1.1 futex calls per request). More cores were not measured.
pub fn gateway_threads(cores: usize) -> usize {
    cores.saturating_sub(1).max(1)
}

/// Upper bound of the `threads` key: a typo (`threads = 10000`) is an error, not 10,000 threads.
const MAX_THREADS: usize = 1024;

/// The `threads` key: `None` is the caller's default.
pub fn threads(file: &Path, threads: Option<usize>) -> Result<Option<usize>, UsageError> {
    match threads {
        Some(n) if n == 0 || n > MAX_THREADS => Err(UsageError(format!(
            "{}: threads = {n}: expected 1 to {MAX_THREADS} worker threads (or leave it out for the default)",
            file.display()
        ))),
        t => Ok(t),
    }
}

/// gateway.toml `listen`, the QUIC address node agents dial: port 0 would bind a random port
/// the agents (and the zone's published gateway address) cannot know.
pub fn quic_listen(file: &Path, listen: SocketAddr) -> Result<SocketAddr, UsageError> {
    if listen.port() == 0 {
        return Err(UsageError(format!(
            "{}: listen = \"{listen}\": port 0 would be a random free port node agents cannot find; give the UDP port of this gateway's public address (`zonegate zone show --zone DIR` lists the gateways)",
            file.display()
        )));
    }
    Ok(listen)
}

/// A limit from gateway.toml `key` (per client or per app): `default` when left out, else 1 to `max`
/// (`max_is` says what bounds it, for the error).
fn per_client_limit(
    file: &Path,
    key: &str,
    n: Option<usize>,
    default: usize,
    max: usize,
    max_is: &str,
) -> Result<usize, UsageError> {
    match n {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(UsageError(format!(
            "{}: {key} = {n}: expected 1 to {max} ({max_is}), or leave it out for the default {default}",
            file.display()
        ))),
    }
}

/// The front's per-client connection limit: 1 to `total`, the front's connections.
pub fn http_connections_per_ip(
    file: &Path,
    n: Option<usize>,
    total: usize,
) -> Result<usize, UsageError> {
    per_client_limit(
        file,
        "http_connections_per_ip",
        n,
        gateway::http::MAX_CONNECTIONS_PER_IP.min(total),
        total,
        "http_connections, the front's connections of all clients together",
    )
}

/// The connections the front holds for all clients together.
pub fn http_connections(file: &Path, n: Option<usize>) -> Result<usize, UsageError> {
    per_client_limit(
        file,
        "http_connections",
        n,
        gateway::http::MAX_CONNECTIONS,
        gateway::http::MAX_CONNECTIONS,
        "the most the front takes",
    )
}

/// The per-client connection limit of the `tcp` apps: 1 to `total`, the connections of all
/// tcp apps together.
pub fn tcp_connections_per_ip(
    file: &Path,
    n: Option<usize>,
    total: usize,
) -> Result<usize, UsageError> {
    per_client_limit(
        file,
        "tcp_connections_per_ip",
        n,
        gateway::listeners::TCP_CONNECTIONS_PER_IP.min(total),
        total,
        "tcp_connections, the connections all tcp apps take together",
    )
}

/// The connections all `tcp` apps hold together: 1 to half the streams a device takes.
pub fn tcp_connections(file: &Path, n: Option<usize>) -> Result<usize, UsageError> {
    per_client_limit(
        file,
        "tcp_connections",
        n,
        gateway::listeners::MAX_TCP_CONNECTIONS,
        gateway::listeners::MAX_TCP_CONNECTIONS,
        "half the streams one device connection takes",
    )
}

/// The config's `domain` must be the zone of the bundle's certificate: a mismatch would
/// otherwise go unnoticed (a node's DNS bootstrap asks for the config's).
pub fn check_domain(
    file: &Path,
    written: &zone_core::Domain,
    certified: &zone_core::Domain,
) -> Result<(), UsageError> {
    if written == certified {
        return Ok(());
    }
    Err(UsageError(format!(
        "{}: domain = \"{written}\", but the bundle's certificate is for zone {certified}: fix `domain` (or use this zone's bundle)",
        file.display()
    )))
}

/// The drain's grace period (`grace_secs`): 0 to an hour. A service manager must wait longer
/// (the systemd unit's `TimeoutStopSec`), or the drain is cut.
pub fn grace(file: &Path, secs: Option<u64>, default: Duration) -> Result<Duration, UsageError> {
    match secs {
        None => Ok(default),
        Some(s @ 0..=3600) => {
            // Under systemd (it sets INVOCATION_ID) the drain is cut by SIGKILL at the unit's
            // TimeoutStopSec, which this process cannot read: said where it can be seen.
            if s >= STOP_TIMEOUT_MARGIN_FROM && std::env::var_os("INVOCATION_ID").is_some() {
                tracing::warn!(file = %file.display(), grace_secs = s, "a long drain: systemd kills the service at its TimeoutStopSec (30 s in the shipped gateway unit, 90 s by default): set it at least 9 s above grace_secs with `systemctl edit` (the drain's end takes up to 9 s more), or the drain is cut short");
            }
            Ok(Duration::from_secs(s))
        }
        Some(s) => Err(UsageError(format!(
            "{}: grace_secs = {s}: give 0 to 3600 seconds (and a service manager stop timeout above it: TimeoutStopSec in the systemd unit)",
            file.display()
        ))),
    }
}

/// A `grace_secs` from which a systemd stop timeout of 30 s leaves too little margin: after
/// the grace come up to 2 s for the QUIC endpoint to go idle, up to 5 s for the last
/// zone.json save (`Hub::drain`, `Hub::serve`) and up to 2 s for blocking work still running
/// as the runtime stops (`STOP_WAIT` in `cmd::serve`), 9 s in all.
const STOP_TIMEOUT_MARGIN_FROM: u64 = 30 - 9;

/// The per-client flow limit of each `udp` app: 1 to the flows an app keeps (`per_app`),
/// by default a sixteenth of them.
pub fn udp_flows_per_ip(
    file: &Path,
    n: Option<usize>,
    per_app: usize,
) -> Result<usize, UsageError> {
    per_client_limit(
        file,
        "udp_flows_per_ip",
        n,
        (per_app / 16).max(1),
        per_app,
        "udp_flows_per_app, the flows one udp app keeps",
    )
}

/// The flows each `udp` app keeps: 1 to the flows one device connection takes.
pub fn udp_flows_per_app(file: &Path, n: Option<usize>) -> Result<usize, UsageError> {
    per_client_limit(
        file,
        "udp_flows_per_app",
        n,
        gateway::listeners::MAX_UDP_CLIENTS,
        gateway::listeners::MAX_UDP_CLIENTS,
        "the flows one device connection takes",
    )
}

/// A public listener setting: `"off"` or `"IP:PORT"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum ListenSetting {
    Off,
    At(SocketAddr),
}

impl TryFrom<String> for ListenSetting {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s == "off" {
            return Ok(ListenSetting::Off);
        }
        let a = socket_addr(&s)
            .map_err(|e| format!("expected \"off\" or an address like \"0.0.0.0:443\": {e}"))?;
        // Bound it would be, to a port picked at random that no client can know.
        if a.port() == 0 {
            return Err(format!(
                "{s:?}: port 0 would be a random free port clients cannot find; give the port they use (or \"off\")"
            ));
        }
        Ok(ListenSetting::At(a))
    }
}

impl ListenSetting {
    /// The address to bind: `default` when the key is absent, nothing when `"off"`.
    pub fn resolve(setting: Option<ListenSetting>, default: SocketAddr) -> Option<SocketAddr> {
        match setting {
            None => Some(default),
            Some(ListenSetting::Off) => None,
            Some(ListenSetting::At(a)) => Some(a),
        }
    }
}

/// A certificate for the HTTPS front (`[[tls]]`); chosen by the name the client asks for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsEntry {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the leaf.
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    pub device: DeviceName,
    pub domain: zone_core::Domain,
    pub key: PathBuf,
    pub cert: PathBuf,
    pub ca: PathBuf,
    pub zone_config: PathBuf,
    #[serde(deserialize_with = "addr::one")]
    pub listen: SocketAddr,
    /// The policy directory; `--policies` stands in for it (or overrides it).
    #[serde(default)]
    pub policies: Option<PathBuf>,
    #[serde(default, deserialize_with = "addr::maybe")]
    pub admin: Option<SocketAddr>,
    /// Seconds a drain waits for proxied connections on shutdown.
    pub grace_secs: Option<u64>,
    /// Public HTTP: `"off"` or `"IP:PORT"` (default `[::]:80`, IPv4 and IPv6; `0.0.0.0:80`
    /// where the machine has no IPv6).
    pub http: Option<ListenSetting>,
    /// Public HTTPS: `"off"` or `"IP:PORT"` (default `[::]:443`, IPv4 and IPv6; `0.0.0.0:443`
    /// where the machine has no IPv6).
    pub https: Option<ListenSetting>,
    /// Zone DNS (UDP and TCP): `"off"` or `"IP:PORT"` (default `[::]:53` or `0.0.0.0:53`, as
    /// `http`).
    pub dns: Option<ListenSetting>,
    /// HTTPS certificates; none: a self-signed certificate for the zone's names.
    #[serde(default)]
    pub tls: Vec<TlsEntry>,
    #[serde(default)]
    pub services: BTreeMap<String, ServiceEntry>,
    #[serde(default)]
    pub forward: Vec<ForwardEntry>,
    #[serde(default)]
    pub tunnel: TunnelSection,
    /// Worker threads of the async runtime (default [`gateway_threads`] of the CPU cores).
    pub threads: Option<usize>,
    /// HTTP(S) front connections one client address (IPv6: its /64) may have open at once
    /// (default [`gateway::http::MAX_CONNECTIONS_PER_IP`]).
    pub http_connections_per_ip: Option<usize>,
    /// HTTP(S) front connections all clients together may have open (default and most
    /// [`gateway::http::MAX_CONNECTIONS`]).
    pub http_connections: Option<usize>,
    /// Connections one client address (IPv6: its /64) may have open through all `tcp` apps
    /// together (default [`gateway::listeners::TCP_CONNECTIONS_PER_IP`]).
    pub tcp_connections_per_ip: Option<usize>,
    /// Connections all `tcp` apps hold together (default and most
    /// [`gateway::listeners::MAX_TCP_CONNECTIONS`]).
    pub tcp_connections: Option<usize>,
    /// Flows of one `udp` app one client address (IPv6: its /64) may have (default
    /// [`gateway::listeners::UDP_FLOWS_PER_IP`]).
    pub udp_flows_per_ip: Option<usize>,
    /// Flows one `udp` app keeps at once (default and most
    /// [`gateway::listeners::MAX_UDP_CLIENTS`]).
    pub udp_flows_per_app: Option<usize>,
    /// Timing of the HTTP(S) front.
    #[serde(default)]
    pub front: FrontSection,
}

/// A config file that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Missing, or not valid TOML for this command: a mistake to fix (exit 2).
    #[error(transparent)]
    Usage(#[from] UsageError),
    /// There but not readable (permissions not set yet, an I/O error): exit 1, which the
    /// systemd units restart, so the fix needs no manual start.
    #[error("{}: cannot read it: {error}", path.display())]
    Unreadable {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// `what` (a setting, as the user wrote it) at `a`: refused when its port is 0, which would
/// bind a random free port nobody can find (or, for an address to reach, is none).
pub fn fixed_port(what: &str, a: SocketAddr) -> Result<(), UsageError> {
    if a.port() != 0 {
        return Ok(());
    }
    Err(UsageError(format!(
        "{what} {a}: port 0 would be a random free port nobody can find; give the port to use"
    )))
}

/// `e`, a setting's error found after parsing (it names the setting), said as `file`'s.
pub fn in_file(file: &Path, e: UsageError) -> UsageError {
    UsageError(format!("{}: {}", file.display(), e.0))
}

/// As [`in_file`], for `[services]` and `[[forward]]`, which `--service` and `--forward` add to.
pub fn in_file_or_flags(file: &Path, e: UsageError) -> UsageError {
    UsageError(format!(
        "{} (or its --service/--forward flags): {}",
        file.display(),
        e.0
    ))
}

/// Reads and parses a TOML config file; errors name the file, line and column.
pub fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| match error.kind() {
        std::io::ErrorKind::NotFound => ConfigError::Usage(UsageError(format!(
            "{}: {error}: give this device's config file (`zonegate device add` writes gateway.toml or node.toml into ZONE/devices/NAME/)",
            path.display()
        ))),
        // An editor's UTF-16 or Latin-1 save: no restart mends it either.
        std::io::ErrorKind::InvalidData => ConfigError::Usage(UsageError(format!(
            "{}: not UTF-8 text: save it as UTF-8",
            path.display()
        ))),
        // No restart turns a directory into the file: give the config file itself.
        std::io::ErrorKind::IsADirectory => ConfigError::Usage(UsageError(format!(
            "{}: is a directory: give the config file (gateway.toml or node.toml in the device's bundle)",
            path.display()
        ))),
        _ => ConfigError::Unreadable {
            path: path.to_owned(),
            error,
        },
    })?;
    parse(path, &text)
}

/// The config `text` read from `path` (named in the error, with the line and column).
pub fn parse<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| -> ConfigError {
        let pos = e.span().map(|s| {
            // A span inside a character (none seen) says the line up to its start.
            let mut start = s.start.min(text.len());
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            let before = &text[..start];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            format!("{line}:{col}: ")
        });
        UsageError(format!(
            "{}:{}{}",
            path.display(),
            pos.unwrap_or_default(),
            friendly(e.message())
        ))
        .into()
    })
}

/// serde's words for a number of the wrong type (`grace_secs = "30"`, `threads = -1`) name
/// the Rust type ("expected u64"): said as what to write.
fn friendly(message: &str) -> String {
    ["u8", "u16", "u32", "u64", "usize"]
        .iter()
        .fold(message.to_owned(), |m, t| {
            m.replace(
                &format!("expected {t}"),
                "expected a whole number of 0 or more, without quotes",
            )
        })
}

/// A config that does not parse as this command's may be the other role's (`node.toml` given
/// to `zonegate gateway`, or the reverse): if it parses as `Other`, say which command runs it.
pub fn other_role_hint<Other: serde::de::DeserializeOwned>(
    e: ConfigError,
    path: &Path,
    whose: &str,
    command: &str,
) -> ConfigError {
    match e {
        // "Reads as", not "is": a file of this role cut short, or with one key of the other's,
        // may parse as the other's too.
        ConfigError::Usage(e) if read::<Other>(path).is_ok() => UsageError(format!(
            "{e}\n  this reads as {whose} config: if it is one, run it with `zonegate {command} --config {}`; else it is this command's cut short or mistyped",
            path.display()
        ))
        .into(),
        e => e,
    }
}

pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.parent().unwrap_or(Path::new(".")).join(p)
    }
}

pub fn bundle(base: &Path, key: &Path, cert: &Path, ca: &Path, zone: &Path) -> BundlePaths {
    BundlePaths {
        key: resolve(base, key),
        cert: resolve(base, cert),
        ca: resolve(base, ca),
        zone_config: resolve(base, zone),
    }
}

fn check_name(what: &str, s: &str) -> Result<(), UsageError> {
    // The kind of name, for the message ("invalid service name: …"; it said "name name").
    let field = if what.contains("device") {
        "device"
    } else {
        "service"
    };
    tunnel::proto::validate_name(field, s).map_err(|e| UsageError(format!("{what} {s:?}: {e}")))
}

/// `NAME=IP:PORT` or `NAME=IP:PORT/udp`.
pub fn parse_service_flag(s: &str) -> Result<(String, ServiceEntry), UsageError> {
    let bad = || {
        UsageError(format!(
            "--service {s:?}: expected NAME=IP:PORT or NAME=IP:PORT/udp, an IP address (127.0.0.1:8000, [::1]:8000), not a host name"
        ))
    };
    let (name, rest) = s.split_once('=').ok_or_else(bad)?;
    let (addr, proto) = match rest.strip_suffix("/udp") {
        Some(a) => (a, Proto::Udp),
        None => (rest.strip_suffix("/tcp").unwrap_or(rest), Proto::Tcp),
    };
    if let Some((_, other)) = addr.rsplit_once('/') {
        return Err(UsageError(format!(
            "--service {s:?}: /{other} is no protocol a service takes: end it in /udp for UDP (TCP is the default; /tcp also says it)"
        )));
    }
    check_name("service", name)?;
    Ok((
        name.to_owned(),
        ServiceEntry {
            // The address's own hint (a port missing, brackets, a name): "not a host name"
            // read oddly for `web=127.0.0.1`.
            local: socket_addr(addr).map_err(|e| UsageError(format!("--service {s:?}: {e}")))?,
            proto,
        },
    ))
}

/// Adds `--service` flags to the file's `[services]`. A name given twice, or one the file already
/// has, is refused rather than one silently replacing the other: which address was meant is the
/// user's call, and guessing would serve the wrong thing under that name.
pub fn add_service_flags(
    file: &Path,
    services: &mut BTreeMap<String, ServiceEntry>,
    flags: &[String],
) -> Result<(), UsageError> {
    let in_file: Vec<String> = services.keys().cloned().collect();
    for s in flags {
        let (name, entry) = parse_service_flag(s)?;
        if services.contains_key(&name) {
            let where_ = if in_file.contains(&name) {
                format!("{} already has [services.{name}]", file.display())
            } else {
                "another --service flag already names it".to_owned()
            };
            return Err(UsageError(format!(
                "--service {s:?}: {where_}; remove one of them or give this one another name"
            )));
        }
        services.insert(name, entry);
    }
    Ok(())
}

/// `LISTEN=DEVICE/SERVICE`.
pub fn parse_forward_flag(s: &str) -> Result<ForwardEntry, UsageError> {
    let bad = || {
        UsageError(format!(
            "--forward {s:?}: expected LISTEN_IP:PORT=DEVICE/SERVICE"
        ))
    };
    let (listen, to) = s.split_once('=').ok_or_else(bad)?;
    Ok(ForwardEntry {
        listen: socket_addr(listen).map_err(|e| UsageError(format!("--forward {s:?}: {e}")))?,
        to: to.to_owned(),
    })
}

/// A gateway's forwards listen on loopback only: whoever connects to one reaches the device
/// as the gateway itself (its mesh identity and roles), past every per-client limit. On a
/// public or wildcard address that would be anyone on the internet.
pub fn gateway_forwards_local(forwards: &[Forward]) -> Result<(), UsageError> {
    match forwards.iter().find(|f| !f.listen.ip().is_loopback()) {
        None => Ok(()),
        Some(f) => Err(UsageError(format!(
            "forward {} -> {}/{}: a gateway's forward listens on loopback only (127.0.0.1 or [::1]), since it reaches the device as the gateway; to offer a device's service to others, add a tcp app to the policy (its `from`, rate and connection limits apply)",
            f.listen, f.device, f.service
        ))),
    }
}

pub fn services(map: &BTreeMap<String, ServiceEntry>) -> Result<LocalServices, UsageError> {
    // The hello that tells the gateway the services carries at most this many: past it, the
    // agent would start and then fail every connect.
    let most = tunnel::proto::limits::MAX_SERVICES;
    if map.len() > most {
        return Err(UsageError(format!(
            "{} services configured: a device offers at most {most}; remove some (or move them to another device)",
            map.len()
        )));
    }
    let mut out = BTreeMap::new();
    for (name, e) in map {
        check_name("service", name)?;
        fixed_port(&format!("service {name}: local ="), e.local)?;
        let proto = match e.proto {
            Proto::Tcp => ServiceProto::Tcp,
            Proto::Udp => ServiceProto::Udp,
        };
        out.insert(
            name.clone(),
            LocalService {
                addr: e.local,
                proto,
            },
        );
    }
    Ok(LocalServices::new(out))
}

pub fn forwards(list: &[ForwardEntry], me: &DeviceName) -> Result<Vec<Forward>, UsageError> {
    let mut seen = std::collections::HashSet::new();
    list.iter()
        .map(|f| {
            let (device, service) = f
                .to
                .split_once('/')
                .ok_or_else(|| UsageError(format!("forward {} -> {:?}: `to` must be DEVICE/SERVICE", f.listen, f.to)))?;
            check_name("forward device", device)?;
            check_name("forward service", service)?;
            fixed_port(&format!("forward to {}: listen =", f.to), f.listen)?;
            if device == me.as_str() {
                return Err(UsageError(format!("forward {} -> {}: a forward to this device itself makes no sense; connect to the service directly", f.listen, f.to)));
            }
            if !seen.insert(f.listen) {
                return Err(UsageError(format!("two forwards listen on {}", f.listen)));
            }
            Ok(Forward { listen: f.listen, device: device.into(), service: service.into() })
        })
        .collect()
}

/// A node's own TCP sockets that would take the same port (equal addresses, or one a
/// wildcard of the other's), said with both settings, before anything is bound: found by the
/// binds, `[[forward]] listen = "127.0.0.1:9091"` beside the default admin address failed
/// as the admin's bind (exit 1, restarted for ever) naming the wrong setting to change.
pub fn node_socket_clashes(
    file: &Path,
    admin: SocketAddr,
    forwards: &[Forward],
    services: &LocalServices,
) -> Result<(), UsageError> {
    use gateway::listeners::{clashes_among, services_on_own, Kind};
    let mut own = vec![(Kind::Tcp, admin, "admin".to_string())];
    own.extend(forwards.iter().map(|f| {
        let key = format!("forward to {}/{}", f.device, f.service);
        (Kind::Tcp, f.listen, key)
    }));
    let mut clashes = clashes_among(&own, &format!("{} or its --forward flags", file.display()));
    // A service on one of them is this node itself: a forward there took a gateway's requests
    // for the service on to another device as this one.
    clashes.extend(services_on_own(
        &own,
        &gateway::run::services_here(services),
        &format!("{} or its --service/--forward flags", file.display()),
    ));
    match clashes.is_empty() {
        true => Ok(()),
        false => Err(UsageError(clashes.join("; "))),
    }
}

/// `[tunnel] name = v` as a duration of `v` units (`of`), `v` within `range`.
fn bounded(
    name: &str,
    v: u64,
    range: std::ops::RangeInclusive<u64>,
    (unit, of): (&str, fn(u64) -> Duration),
) -> Result<Duration, UsageError> {
    if range.contains(&v) {
        Ok(of(v))
    } else {
        Err(UsageError(format!(
            "[tunnel] {name} = {v}: give a number of {unit} from {} to {}",
            range.start(),
            range.end()
        )))
    }
}

pub fn tuning(t: &TunnelSection) -> Result<Tuning, UsageError> {
    let mut out = Tuning::default();
    let millis = ("milliseconds", Duration::from_millis as fn(u64) -> Duration);
    let secs = ("seconds", Duration::from_secs as fn(u64) -> Duration);
    // Bounded: 1 ms keepalives are a thousand pings a second per connection, and an idle
    // timeout past what QUIC can carry was silently replaced by 30 s (below the keepalive:
    // tunnels dropped in a loop).
    if let Some(k) = t.keepalive_ms {
        out.keepalive = bounded("keepalive_ms", k, 100..=3_600_000, millis)?;
    }
    if let Some(i) = t.idle_timeout_ms {
        out.idle_timeout = bounded("idle_timeout_ms", i, 1_000..=86_400_000, millis)?;
    }
    // At most half: with a keepalive just under the idle timeout, one lost ping ended the
    // tunnel.
    if out.keepalive * 2 > out.idle_timeout {
        return Err(UsageError(format!(
            "[tunnel] keepalive_ms ({}) must be at most half of idle_timeout_ms ({}), so that one lost keepalive does not end the tunnel",
            out.keepalive.as_millis(),
            out.idle_timeout.as_millis()
        )));
    }
    // Bounded so that the durations stay far from overflowing the timers they feed.
    if let Some(v) = t.udp_flow_idle_secs {
        out.udp_flow_idle = bounded("udp_flow_idle_secs", v, 1..=86_400, secs)?;
    }
    if let Some(v) = t.reader_stall_secs {
        out.reader_stall = bounded("reader_stall_secs", v, 1..=86_400, secs)?;
    }
    match t.tcp_keepalive_secs {
        None => {}
        Some(0) => out.tcp_keepalive = None,
        Some(v @ 1..=7200) => out.tcp_keepalive = Some(Duration::from_secs(v)),
        Some(v) => {
            return Err(UsageError(format!(
                "[tunnel] tcp_keepalive_secs = {v}: give a number of seconds from 1 to 7200, or 0 for no TCP keepalive"
            )))
        }
    }
    Ok(out)
}

/// The front's timing from gateway.toml's `[front]` section, with its connection limits
/// (all clients together, and per client).
pub fn http_tuning(
    file: &Path,
    h: &FrontSection,
    (max_connections, max_connections_per_ip): (usize, usize),
) -> Result<gateway::http::HttpTuning, UsageError> {
    let mut out = gateway::http::HttpTuning {
        max_connections,
        max_connections_per_ip,
        ..Default::default()
    };
    let set = |to: &mut Duration, name: &str, v: Option<u64>| {
        match v {
        None => Ok(()),
        Some(v @ 1..=86_400) => {
            *to = Duration::from_secs(v);
            Ok(())
        }
        Some(v) => Err(UsageError(format!(
            "{}: [front] {name} = {v}: give a number of seconds from 1 to 86400, or leave it out for the default {}",
            file.display(),
            to.as_secs()
        ))),
    }
    };
    set(
        &mut out.header_read_timeout,
        "header_read_timeout_secs",
        h.header_read_timeout_secs,
    )?;
    set(
        &mut out.response_timeout,
        "response_timeout_secs",
        h.response_timeout_secs,
    )?;
    set(
        &mut out.read_timeout,
        "read_timeout_secs",
        h.read_timeout_secs,
    )?;
    set(
        &mut out.send_timeout,
        "send_timeout_secs",
        h.send_timeout_secs,
    )?;
    set(
        &mut out.body_timeout,
        "body_timeout_secs",
        h.body_timeout_secs,
    )?;
    set(
        &mut out.h2_idle_timeout,
        "idle_timeout_secs",
        h.idle_timeout_secs,
    )?;
    set(
        &mut out.tls_handshake_timeout,
        "tls_handshake_timeout_secs",
        h.tls_handshake_timeout_secs,
    )?;
    Ok(out)
}

/// An `IP:PORT` argument, with what to write when it is not one: the usual slips are an IPv6
/// address without brackets and a missing port.
///
/// An IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]:9091`) is taken as the IPv4 address it
/// stands for, as every client address is: bound, it takes that IPv4 address, and the clash
/// and loopback checks compared it as another address (a forward there beside the admin API
/// passed the checks and failed to bind, exit 1 for ever).
pub fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(zone_core::zonedir::unmapped(a));
    }
    let bracketed = s.starts_with('[') && s.ends_with(']');
    // A well-formed address whose port is not one (70000), or with something after it.
    let bad_port = s.rsplit_once(':').filter(|(h, _)| {
        h.parse::<std::net::Ipv4Addr>().is_ok()
            || h.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
    });
    let hint = if let Some((_, p)) = bad_port {
        match p.parse::<u64>() {
            Ok(_) => format!("the port {p} is out of range: ports are 1 to 65535"),
            Err(_) => format!("{p:?} is not a port: ports are numbers from 1 to 65535"),
        }
    } else if s.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("an IPv6 address goes in brackets before its port: [{s}]:PORT")
    } else if bracketed || s.parse::<std::net::Ipv4Addr>().is_ok() {
        format!("add the port: {s}:PORT")
    } else if s.matches(':').count() > 1 {
        "an IPv6 address goes in brackets before its port, e.g. [2001:db8::10]:4433".into()
    } else {
        "expected IP:PORT, e.g. 203.0.113.10:4433 or [2001:db8::10]:4433 (a name is not resolved here)".into()
    };
    Err(format!("{s:?} is not an address: {hint}"))
}

/// serde's `deserialize_with` for addresses in config files: [`socket_addr`]'s hints after
/// the file's line and column, where the standard parse said only "invalid socket address
/// syntax" (`bootstrap_dns = "203.0.113.10"` is the natural slip).
mod addr {
    use serde::{de::Error, Deserialize, Deserializer};
    use std::net::SocketAddr;

    pub fn one<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        super::socket_addr(&String::deserialize(d)?).map_err(D::Error::custom)
    }

    pub fn maybe<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        one(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4-mapped address is the IPv4 address it stands for: a forward at
    /// `[::ffff:127.0.0.1]:9091` is at the admin API's default address, and on loopback.
    #[test]
    fn mapped_addresses_are_their_ipv4_ones() {
        let v4: SocketAddr = "127.0.0.1:9091".parse().unwrap();
        assert_eq!(socket_addr("[::ffff:127.0.0.1]:9091"), Ok(v4));
        let fw = parse_forward_flag("[::ffff:127.0.0.1]:9091=home2/web").unwrap();
        assert_eq!(fw.listen, v4);
        let forwards = forwards(&[fw], &DeviceName::new("home1").unwrap()).unwrap();
        assert!(gateway_forwards_local(&forwards).is_ok());
        let e = node_socket_clashes(
            Path::new("node.toml"),
            v4,
            &forwards,
            &LocalServices::default(),
        )
        .unwrap_err();
        assert!(e.0.contains("admin"), "{}", e.0);
        // Scopes and plain IPv6 stay as written.
        let scoped: SocketAddr = "[fe80::1%2]:53".parse().unwrap();
        assert_eq!(socket_addr("[fe80::1%2]:53"), Ok(scoped));
    }

    /// A port out of range, or not a number, is said as that (it read "not an address:
    /// expected IP:PORT"); another protocol than udp/tcp on a `--service` too.
    #[test]
    fn a_bad_port_or_protocol_is_said_as_such() {
        let e = socket_addr("127.0.0.1:70000").unwrap_err();
        assert!(e.contains("the port 70000 is out of range"), "{e}");
        let e = socket_addr("[::1]:http").unwrap_err();
        assert!(e.contains("\"http\" is not a port"), "{e}");
        let e = socket_addr("[::1]").unwrap_err();
        assert!(e.contains("add the port"), "{e}");
        let e = parse_service_flag("web=127.0.0.1:45620/sctp").unwrap_err();
        assert!(e.0.contains("/sctp is no protocol"), "{}", e.0);
        assert!(parse_service_flag("web=127.0.0.1:45620/tcp").is_ok());
    }

    /// An address in a config file that is not one says what to write, after where it is:
    /// the standard parse said only "invalid socket address syntax".
    #[test]
    fn addresses_in_config_files_say_what_to_write() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("node.toml");
        let text = "device = \"home1\"\ndomain = \"alice.example\"\nkey = \"k\"\ncert = \"c\"\nca = \"a\"\nzone_config = \"z\"\n";
        for (line, hint) in [
            (
                "bootstrap_dns = \"203.0.113.10\"",
                "add the port: 203.0.113.10:PORT",
            ),
            ("admin = \"::1:9091\"", "an IPv6 address goes in brackets"),
            // serde named the Rust type: "expected u64".
            (
                "grace_secs = \"30\"",
                "expected a whole number of 0 or more, without quotes",
            ),
            (
                "threads = -1",
                "expected a whole number of 0 or more, without quotes",
            ),
            (
                "[services.web]\nlocal = \"localhost:8000\"",
                "a name is not resolved here",
            ),
        ] {
            std::fs::write(&node, format!("{text}{line}\n")).unwrap();
            let e = read::<NodeFile>(&node).unwrap_err().to_string();
            assert!(e.contains("node.toml:") && e.contains(hint), "{e}");
        }
    }

    /// A config file that is missing or not UTF-8 is a mistake to fix (exit 2, which the
    /// systemd units do not restart), and the message says what to do.
    #[test]
    fn missing_and_non_utf8_config_files_say_what_to_do() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct T {
            a: u32,
        }
        let dir = tempfile::tempdir().unwrap();
        let missing = read::<T>(&dir.path().join("gateway.tml")).unwrap_err();
        assert!(matches!(missing, ConfigError::Usage(_)), "{missing:?}");
        assert!(
            missing.to_string().contains("zonegate device add"),
            "{missing}"
        );

        let utf16 = dir.path().join("node.toml");
        let text: Vec<u8> = "a = 1\n"
            .encode_utf16()
            .flat_map(|u| u.to_le_bytes())
            .collect();
        std::fs::write(&utf16, [&[0xff, 0xfe][..], &text].concat()).unwrap();
        let e = read::<T>(&utf16).unwrap_err();
        assert!(matches!(e, ConfigError::Usage(_)), "{e:?}");
        assert!(e.to_string().contains("save it as UTF-8"), "{e}");

        let bom = dir.path().join("bom.toml");
        std::fs::write(&bom, "\u{feff}a = 1\n").unwrap();
        assert_eq!(
            read::<T>(&bom).map(|t| t.a).map_err(|e| e.to_string()),
            Ok(1)
        );
    }

    /// A `--service` never silently replaces another entry of the same name.
    #[test]
    fn a_service_flag_does_not_replace_a_same_named_service() {
        let f = Path::new("node.toml");
        let mut services = BTreeMap::new();
        let (n, e) = parse_service_flag("nas=127.0.0.1:8000").unwrap();
        services.insert(n, e);
        let e = add_service_flags(f, &mut services, &["nas=127.0.0.1:9000".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("node.toml already has [services.nas]"), "{e}");
        assert_eq!(services["nas"].local.port(), 8000);

        let twice = ["web=127.0.0.1:1".to_owned(), "web=127.0.0.1:2".to_owned()];
        let e = add_service_flags(f, &mut services, &twice)
            .unwrap_err()
            .to_string();
        assert!(e.contains("another --service flag"), "{e}");

        add_service_flags(
            f,
            &mut BTreeMap::new(),
            &["a=127.0.0.1:1".into(), "b=[::1]:2/udp".into()],
        )
        .unwrap();
    }

    #[test]
    fn the_grace_period_is_bounded() {
        let f = Path::new("gateway.toml");
        let d = Duration::from_secs(10);
        assert_eq!(grace(f, None, d).unwrap(), d);
        assert_eq!(grace(f, Some(0), d).unwrap(), Duration::ZERO);
        let e = grace(f, Some(7200), d).unwrap_err().to_string();
        assert!(
            e.contains("grace_secs = 7200") && e.contains("TimeoutStopSec"),
            "{e}"
        );
    }

    /// A config file there but unreadable (permissions not set yet) exits 1, which the
    /// systemd units restart; a missing or malformed one exits 2.
    #[test]
    fn an_unreadable_config_is_retried_a_wrong_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let code = |e: ConfigError| crate::cmd::exit_code(&anyhow::Error::from(e));
        // A file whose read fails (root reads past permissions; this one fails with EIO at
        // offset 0): a read error that is neither "not found" nor a directory.
        let e = read::<GatewayFile>(Path::new("/proc/self/mem")).unwrap_err();
        assert!(matches!(e, ConfigError::Unreadable { .. }), "{e}");
        assert_eq!(code(e), 1);
        // A directory given for the file: no restart mends that.
        let e = read::<GatewayFile>(dir.path()).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
        assert_eq!(code(e), 2);
        let e = read::<GatewayFile>(&dir.path().join("missing.toml")).unwrap_err();
        assert_eq!(code(e), 2);
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "listen = ").unwrap();
        let e = read::<GatewayFile>(&bad).unwrap_err();
        assert!(e.to_string().contains("bad.toml:1:"), "{e}");
        assert_eq!(code(e), 2);
    }

    #[test]
    fn the_quic_listen_port_is_one_agents_can_find() {
        let f = Path::new("gateway.toml");
        let e = quic_listen(f, "0.0.0.0:0".parse().unwrap()).unwrap_err().0;
        assert!(
            e.contains("gateway.toml: listen") && e.contains("port 0"),
            "{e}"
        );
        assert!(quic_listen(f, "[::]:4433".parse().unwrap()).is_ok());
    }

    #[test]
    fn public_listeners_are_off_or_a_port_clients_can_find() {
        let l = |s: &str| ListenSetting::try_from(s.to_string());
        assert_eq!(l("off"), Ok(ListenSetting::Off));
        assert_eq!(
            l("[::]:443"),
            Ok(ListenSetting::At("[::]:443".parse().unwrap()))
        );
        assert!(l("0.0.0.0:0").unwrap_err().contains("port 0"));
        assert!(l("443").unwrap_err().contains("like \"0.0.0.0:443\""));
    }

    #[test]
    fn http_timings_are_read_and_bounded() {
        let f = Path::new("gateway.toml");
        let d = gateway::http::HttpTuning::default();
        let t = http_tuning(f, &FrontSection::default(), (9, 7)).unwrap();
        assert_eq!(
            (
                t.response_timeout,
                t.read_timeout,
                t.max_connections,
                t.max_connections_per_ip
            ),
            (d.response_timeout, d.read_timeout, 9, 7)
        );
        let h: FrontSection =
            toml::from_str("response_timeout_secs = 600\nidle_timeout_secs = 5").unwrap();
        let t = http_tuning(f, &h, (9, 7)).unwrap();
        assert_eq!(t.response_timeout, Duration::from_secs(600));
        assert_eq!(t.h2_idle_timeout, Duration::from_secs(5));
        assert_eq!(t.send_timeout, d.send_timeout);
        for bad in ["read_timeout_secs = 0", "body_timeout_secs = 90000"] {
            let h: FrontSection = toml::from_str(bad).unwrap();
            let e = http_tuning(f, &h, (9, 7)).unwrap_err().to_string();
            assert!(
                e.contains("gateway.toml: [front] ") && e.contains("from 1 to 86400"),
                "{e}"
            );
        }
        assert!(toml::from_str::<FrontSection>("response_timeout = 5").is_err());
    }

    #[test]
    fn a_gateways_forwards_listen_on_loopback_only() {
        let me: DeviceName = "gw".parse().unwrap();
        let entry = |listen: &str| ForwardEntry {
            listen: listen.parse().unwrap(),
            to: "home2/etcd".into(),
        };
        for ok in ["127.0.0.1:2379", "[::1]:2379"] {
            let f = forwards(&[entry(ok)], &me).unwrap();
            assert!(gateway_forwards_local(&f).is_ok(), "{ok}");
        }
        for public in ["0.0.0.0:2379", "[::]:2379", "203.0.113.10:2379"] {
            let f = forwards(&[entry(public)], &me).unwrap();
            let e = gateway_forwards_local(&f).unwrap_err().to_string();
            assert!(e.contains("loopback only") && e.contains("tcp app"), "{e}");
        }
    }

    #[test]
    fn more_services_than_a_hello_carries_are_refused() {
        let entry = |i: u16| ServiceEntry {
            local: SocketAddr::from(([127, 0, 0, 1], 1000 + i)),
            proto: Proto::Tcp,
        };
        let most = tunnel::proto::limits::MAX_SERVICES as u16;
        let mut map: BTreeMap<String, ServiceEntry> =
            (0..most).map(|i| (format!("s{i}"), entry(i))).collect();
        assert!(services(&map).is_ok());
        map.insert("one-more".into(), entry(most));
        let e = services(&map).unwrap_err().to_string();
        assert!(
            e.contains("257 services") && e.contains("at most 256"),
            "{e}"
        );
    }

    #[test]
    fn tunnel_timings_are_read_and_bounded() {
        let t = TunnelSection {
            udp_flow_idle_secs: Some(600),
            reader_stall_secs: Some(30),
            ..TunnelSection::default()
        };
        let got = tuning(&t).unwrap();
        assert_eq!(got.udp_flow_idle, Duration::from_secs(600));
        assert_eq!(got.reader_stall, Duration::from_secs(30));
        assert_eq!(got.tcp_keepalive, Some(Duration::from_secs(300)), "default");
        for (v, want) in [(0, None), (60, Some(Duration::from_secs(60)))] {
            let t = TunnelSection {
                tcp_keepalive_secs: Some(v),
                ..TunnelSection::default()
            };
            assert_eq!(tuning(&t).unwrap().tcp_keepalive, want);
        }
        let t = TunnelSection {
            tcp_keepalive_secs: Some(7201),
            ..TunnelSection::default()
        };
        let e = tuning(&t).unwrap_err().to_string();
        assert!(
            e.contains("tcp_keepalive_secs = 7201") && e.contains("0 for no"),
            "{e}"
        );
        for (keepalive, idle, want) in [
            (
                Some(1),
                None,
                "keepalive_ms = 1: give a number of milliseconds from 100",
            ),
            (
                Some(60_000),
                Some(u64::MAX),
                "idle_timeout_ms = 18446744073709551615: give",
            ),
            (
                Some(29_900),
                None,
                "keepalive_ms (29900) must be at most half of idle_timeout_ms (30000)",
            ),
        ] {
            let t = TunnelSection {
                keepalive_ms: keepalive,
                idle_timeout_ms: idle,
                ..TunnelSection::default()
            };
            let e = tuning(&t).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        for bad in [0, 86_401] {
            let t = TunnelSection {
                udp_flow_idle_secs: Some(bad),
                ..TunnelSection::default()
            };
            let e = tuning(&t).unwrap_err().to_string();
            assert!(
                e.contains("udp_flow_idle_secs") && e.contains("1 to 86400"),
                "{e}"
            );
        }
    }

    #[test]
    fn per_client_connection_limits_are_bounded_with_a_clear_error() {
        let f = Path::new("gateway.toml");
        // The per-address UDP limit follows the app's: a sixteenth by default, at most all.
        assert_eq!(udp_flows_per_ip(f, None, 4096).unwrap(), 256);
        assert_eq!(udp_flows_per_ip(f, None, 128).unwrap(), 8);
        assert_eq!(udp_flows_per_ip(f, None, 8).unwrap(), 1);
        let e = udp_flows_per_ip(f, Some(200), 128).unwrap_err().to_string();
        assert!(e.contains("expected 1 to 128 (udp_flows_per_app"), "{e}");
        assert_eq!(
            tcp_connections_per_ip(f, None, 16_384).unwrap(),
            gateway::listeners::TCP_CONNECTIONS_PER_IP
        );
        assert_eq!(tcp_connections_per_ip(f, None, 100).unwrap(), 100);
        assert_eq!(tcp_connections_per_ip(f, Some(5), 100).unwrap(), 5);
        let e = tcp_connections_per_ip(f, Some(200), 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected 1 to 100 (tcp_connections,"), "{e}");
        assert_eq!(tcp_connections(f, None).unwrap(), 16_384);
        // The front's the same way: its per-address default fits a smaller total.
        assert_eq!(http_connections(f, None).unwrap(), 16_384);
        assert_eq!(http_connections_per_ip(f, None, 16_384).unwrap(), 1_024);
        assert_eq!(http_connections_per_ip(f, None, 100).unwrap(), 100);
        let e = http_connections_per_ip(f, Some(200), 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected 1 to 100 (http_connections,"), "{e}");
        for bad in [0, 1 << 20] {
            let e = tcp_connections_per_ip(f, Some(bad), 16_384)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("gateway.toml: tcp_connections_per_ip")
                    && e.contains("expected 1 to 16384"),
                "{e}"
            );
            let e = tcp_connections(f, Some(bad)).unwrap_err().to_string();
            assert!(
                e.contains("gateway.toml: tcp_connections =") && e.contains("expected 1 to 16384"),
                "{e}"
            );
            let e = udp_flows_per_ip(f, Some(bad), 4096)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("gateway.toml: udp_flows_per_ip") && e.contains("expected 1 to 4096"),
                "{e}"
            );
            let e = http_connections_per_ip(f, Some(bad), 16_384)
                .unwrap_err()
                .to_string();
            assert!(e.contains("expected 1 to 16384"), "{e}");
            let e = http_connections(f, Some(bad)).unwrap_err().to_string();
            assert!(
                e.contains("gateway.toml: http_connections =") && e.contains("expected 1 to 16384"),
                "{e}"
            );
            let e = udp_flows_per_app(f, Some(bad)).unwrap_err().to_string();
            assert!(
                e.contains("gateway.toml: udp_flows_per_app") && e.contains("expected 1 to 4096"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_gateway_leaves_one_core_but_always_has_a_worker() {
        assert_eq!(gateway_threads(0), 1);
        assert_eq!(gateway_threads(1), 1);
        assert_eq!(gateway_threads(2), 1);
        assert_eq!(gateway_threads(8), 7);
    }
}
