//! Status snapshots (serde) for the admin `/status` endpoints of gateway and node.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub proto: String,
}

/// A connected agent as the gateway sees it.
#[derive(Debug, Clone, Serialize)]
pub struct AgentStatus {
    pub device: String,
    pub roles: Vec<String>,
    /// Address as seen by the gateway (the agent's NAT's public side).
    pub addr: String,
    pub session: u64,
    pub rtt_ms: f64,
    pub uptime_secs: u64,
    pub since_unix: u64,
    pub streams: u64,
    pub bytes_to: u64,
    pub bytes_from: u64,
    pub udp_tx: u64,
    pub udp_rx: u64,
    pub services: Vec<ServiceStatus>,
}

/// One gateway link as an agent sees it.
#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    pub gateway: String,
    pub addr: String,
    pub state: String,
    pub observed_addr: Option<String>,
    pub rtt_ms: Option<f64>,
    pub connects: u64,
    pub last_error: Option<String>,
}
