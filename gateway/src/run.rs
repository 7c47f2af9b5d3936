//! The gateway process: QUIC hub for agents, public listeners from the policy (reconciled on
//! every reload), the gateway's own forwards into the mesh, the admin API, and a graceful drain
//! on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use policies::{PolicyStore, Timestamp};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tunnel::agent::Forward;
use tunnel::creds::DeviceCreds;
use tunnel::hub::{refusal_of, Hub, HubConfig};
use tunnel::proto::Origin;
use tunnel::services::LocalServices;
use tunnel::splice::splice;
use tunnel::transport::{self, Tuning};

use crate::admin;
use crate::listeners::Listeners;

/// How often the policy directory is checked for edits.
pub const POLICY_POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct GatewayOptions {
    pub creds: Arc<DeviceCreds>,
    pub policy: Arc<PolicyStore>,
    pub services: Arc<LocalServices>,
    pub forwards: Vec<Forward>,
    /// QUIC address for agents.
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub tuning: Tuning,
    /// How long a drain waits for proxied connections.
    pub grace: Duration,
}

/// A started gateway: everything is bound; [`Gateway::run`] serves until shutdown.
#[derive(Debug)]
pub struct Gateway {
    opts: GatewayOptions,
    hub: Hub,
    endpoint: quinn::Endpoint,
    admin: TcpListener,
    listeners: Listeners,
    forwards: Vec<(Forward, TcpListener)>,
    shutdown: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tunnel(#[from] tunnel::TunnelError),
    #[error("admin API: cannot listen on {0}: {1}")]
    Admin(SocketAddr, std::io::Error),
    #[error("{0}")]
    Bind(String),
}

impl Gateway {
    /// Binds every socket (QUIC, admin, app listeners, forwards) before serving anything, so a
    /// bad config or a taken port fails here and nothing half-starts.
    pub async fn bind(
        opts: GatewayOptions,
        shutdown: CancellationToken,
    ) -> Result<Self, StartError> {
        let endpoint = transport::server_endpoint(opts.listen, &opts.creds, &opts.tuning)?;
        let admin = admin::bind(opts.admin)
            .await
            .map_err(|e| StartError::Admin(opts.admin, e))?;
        let hub = Hub::new(HubConfig {
            creds: opts.creds.clone(),
            policy: opts.policy.clone(),
            local: opts.services.clone(),
            tuning: opts.tuning,
        });
        let mut listeners = Listeners::default();
        let errors = listeners.reconcile(&hub, &shutdown).await;
        if !errors.is_empty() {
            shutdown.cancel();
            return Err(StartError::Bind(errors.join("; ")));
        }
        let mut forwards = Vec::new();
        for f in &opts.forwards {
            let l = TcpListener::bind(f.listen).await.map_err(|e| {
                StartError::Bind(format!(
                    "forward {} -> {}/{}: cannot listen: {e}",
                    f.listen, f.device, f.service
                ))
            })?;
            forwards.push((f.clone(), l));
        }
        Ok(Gateway {
            opts,
            hub,
            endpoint,
            admin,
            listeners,
            forwards,
            shutdown,
        })
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }
    pub fn quic_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().unwrap_or(self.opts.listen)
    }
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.opts.admin)
    }
    /// Bound app listener addresses by app name.
    pub fn app_addrs(&self) -> std::collections::HashMap<String, SocketAddr> {
        self.listeners.bound()
    }
    pub fn forward_addrs(&self) -> Vec<SocketAddr> {
        self.forwards
            .iter()
            .filter_map(|(_, l)| l.local_addr().ok())
            .collect()
    }

    /// Serves until the shutdown token fires, then drains.
    pub async fn run(self) {
        let Gateway {
            opts,
            hub,
            endpoint,
            admin,
            mut listeners,
            forwards,
            shutdown,
        } = self;
        let started = Instant::now();
        info!(
            device = %opts.creds.name(),
            zone = %opts.creds.domain(),
            quic = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            admin = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            apps = hub.policy().current().policy.apps().len(),
            services = ?opts.services.iter().map(|(n, s)| format!("{n}={}", s.addr)).collect::<Vec<_>>(),
            "gateway started"
        );
        let _watcher = policies::spawn_watcher(hub.policy().clone(), POLICY_POLL);
        let status_hub = hub.clone();
        let status: admin::StatusFn = Arc::new(move || status_json(&status_hub, started));
        tokio::spawn(admin::serve(admin, status, shutdown.clone()));
        for (f, l) in forwards {
            tokio::spawn(forward_loop(hub.clone(), f, l, shutdown.clone()));
        }
        // Keep listeners in step with the policy: compare the live policy by pointer.
        let reconcile = {
            let hub = hub.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut seen = hub.policy().current();
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(POLICY_POLL) => {}
                    }
                    let now = hub.policy().current();
                    if !Arc::ptr_eq(&now, &seen) {
                        seen = now;
                        for e in listeners.reconcile(&hub, &shutdown).await {
                            error!(error = %e, "listener of a reloaded policy could not start");
                        }
                    }
                    hub.policy().current().maintain();
                }
            })
        };
        hub.serve(endpoint, shutdown.clone(), opts.grace).await;
        reconcile.abort();
        info!("gateway stopped");
    }
}

fn status_json(hub: &Hub, started: Instant) -> serde_json::Value {
    let creds = hub.creds();
    let zone = creds.zone();
    let agents = hub.status();
    let expected: Vec<String> = zone
        .config
        .devices
        .iter()
        .map(|d| d.name.to_string())
        .filter(|n| n != creds.name())
        .collect();
    let connected = expected
        .iter()
        .filter(|n| agents.iter().any(|a| &a.device == *n))
        .count();
    let health = zone_health(expected.len(), connected);
    let active = hub.policy().current();
    let apps: Vec<serde_json::Value> = active
        .snapshot()
        .into_iter()
        .map(|(name, c)| {
            let app = active.policy.app(&name);
            json!({
                "name": name,
                "summary": app.map(|a| a.summary()),
                "counters": c,
            })
        })
        .collect();
    json!({
        "device": creds.name(),
        "zone": creds.domain().to_string(),
        "zone_serial": zone.config.serial,
        "uptime_secs": started.elapsed().as_secs(),
        "draining": hub.is_draining(),
        "health": health,
        "devices_expected": expected,
        "agents": agents,
        "apps": apps,
        "policy": hub.policy().last_reload(),
    })
}

/// Zone health colour: green all devices connected; yellow some missing; orange most missing;
/// red none connected (DESIGN.md, "Zone health colours").
pub fn zone_health(expected: usize, connected: usize) -> &'static str {
    if expected == 0 || connected == expected {
        "green"
    } else if connected == 0 {
        "red"
    } else if connected * 2 >= expected {
        "yellow"
    } else {
        "orange"
    }
}

async fn forward_loop(hub: Hub, f: Forward, l: TcpListener, shutdown: CancellationToken) {
    info!(listen = %f.listen, to = %format!("{}/{}", f.device, f.service), "mesh forward listening");
    loop {
        let (mut tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = l.accept() => match r { Ok(x) => x, Err(_) => continue },
        };
        let hub = hub.clone();
        let f = f.clone();
        tokio::spawn(async move {
            let me = hub.creds().name().to_owned();
            let roles = hub.creds().roles();
            let active = hub.policy().current();
            let d = active
                .policy
                .decide_mesh(&me, &roles, &f.device, &f.service, Timestamp::now());
            let Some(app) = d
                .app
                .filter(|_| d.decision.is_allow())
                .map(|a| a.name.clone())
            else {
                info!(to = %format!("{}/{}", f.device, f.service), reason = %d.decision, "forward refused by policy");
                return;
            };
            drop(active);
            let started = Instant::now();
            match hub
                .connect(
                    &f.device,
                    &f.service,
                    &app,
                    Origin::Device {
                        name: me,
                        addr: None,
                    },
                )
                .await
            {
                Ok(mut up) => {
                    let m = splice(&mut tcp, &mut up).await;
                    let (a, b) = m.map(|m| (m.a_to_b, m.b_to_a)).unwrap_or((0, 0));
                    info!(app = %app, to = %format!("{}/{}", f.device, f.service), client = %peer, bytes_up = a, bytes_down = b, ms = started.elapsed().as_millis() as u64, "forward connection done");
                }
                Err(e) => {
                    warn!(to = %format!("{}/{}", f.device, f.service), reason = %refusal_of(&e).1, "forward failed")
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::zone_health;

    #[test]
    fn health_colours() {
        assert_eq!(zone_health(0, 0), "green");
        assert_eq!(zone_health(3, 3), "green");
        assert_eq!(zone_health(4, 2), "yellow");
        assert_eq!(zone_health(4, 1), "orange");
        assert_eq!(zone_health(3, 0), "red");
    }
}
