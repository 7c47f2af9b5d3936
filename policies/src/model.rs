//! The compiled, validated form of an app: what the evaluator and the gateway work with.

use crate::schema::Per;
use crate::units::{Hours, Rate};
use ipnet::IpNet;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::error::Position;

/// How an app is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listener {
    Http(HttpRoute),
    Tcp(SocketAddr),
    Udp(SocketAddr),
    /// Only zone devices, over the mesh.
    Mesh,
}

/// The two kinds of raw listeners a gateway binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenKind {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRoute {
    /// Lowercase, no trailing dot.
    pub host: String,
    /// Starts with '/', no trailing '/' unless it is "/".
    pub path: String,
    /// Remove `path` from the request path before forwarding.
    pub strip_prefix: bool,
}

/// `device/service` the app forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub device: String,
    pub service: String,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.device, self.service)
    }
}

/// Who a rule admits. `public` admits everybody (a zone device is at least as trusted as an
/// internet client); `zone` admits every zone device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FromSet {
    pub public: bool,
    pub zone: bool,
    pub devices: Vec<String>,
    pub roles: Vec<String>,
    pub nets: Vec<IpNet>,
}

impl fmt::Display for FromSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if self.public {
            parts.push("public".into());
        }
        if self.zone {
            parts.push("zone".into());
        }
        parts.extend(self.devices.iter().map(|d| format!("device:{d}")));
        parts.extend(self.roles.iter().map(|r| format!("role:{r}")));
        parts.extend(self.nets.iter().map(|n| n.to_string()));
        write!(f, "[{}]", parts.join(", "))
    }
}

/// When a rule applies, in a fixed UTC offset (no daylight-saving rules on purpose).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    /// `None`: all day on the allowed days.
    pub hours: Option<Hours>,
    /// Bit `i` set = day `i` allowed (Monday = 0). All seven bits when `days` is absent.
    pub days: u8,
    pub offset_secs: i32,
}

pub(crate) const ALL_DAYS: u8 = 0x7f;

/// One allow rule: every condition present must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub from: FromSet,
    /// Empty: any method.
    pub methods: Vec<String>,
    /// Empty: any path. Prefixes, matched by whole segments.
    pub paths: Vec<String>,
    pub window: Option<TimeWindow>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub rate: Rate,
    pub burst: u32,
    pub per: Per,
}

/// Limits of one app, all optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitsConfig {
    pub rate: Option<RateLimit>,
    /// Bytes per second for the whole app, each direction.
    pub bandwidth: Option<u64>,
    /// Bytes per second for each connection, each direction.
    pub bandwidth_per_connection: Option<u64>,
    pub max_connections: Option<u32>,
    pub max_connections_per_client: Option<u32>,
    /// Largest HTTP request body in bytes.
    pub max_body: Option<u64>,
}

/// Where an app was defined, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub path: PathBuf,
    pub position: Position,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.position)
    }
}

/// A validated app.
#[derive(Debug, Clone)]
pub struct App {
    pub name: String,
    /// Position in [`crate::CompiledPolicy::apps`]; stable for the life of one compiled policy.
    pub index: usize,
    pub listener: Listener,
    pub target: Target,
    /// Empty: nobody is allowed (deny by default).
    pub rules: Vec<Rule>,
    pub limits: LimitsConfig,
    /// A tcp app's connections start with a PROXY protocol v2 header naming the client.
    pub proxy_protocol: bool,
    pub source: Source,
}

impl App {
    /// Same behaviour (ignoring where it is written and its index): used by reload diffs and
    /// to decide whether limiter state can be kept.
    pub fn same_behaviour(&self, other: &App) -> bool {
        self.name == other.name
            && self.listener == other.listener
            && self.target == other.target
            && self.rules == other.rules
            && self.limits == other.limits
            && self.proxy_protocol == other.proxy_protocol
    }

    /// One-line summary such as `http alice.example/dfs -> home1/dfs`.
    pub fn summary(&self) -> String {
        let entry = match &self.listener {
            Listener::Http(h) => format!(
                "http {}{}",
                h.host,
                if h.path == "/" { "" } else { &h.path }
            ),
            Listener::Tcp(a) if self.proxy_protocol => format!("tcp {a} (PROXY v2)"),
            Listener::Tcp(a) => format!("tcp {a}"),
            Listener::Udp(a) => format!("udp {a}"),
            Listener::Mesh => "mesh".to_string(),
        };
        format!("{entry} -> {}", self.target)
    }
}
