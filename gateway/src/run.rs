//! The gateway process: QUIC hub for agents, the public HTTP(S) front, public listeners from
//! the policy (reconciled on every reload), the gateway's own forwards into the mesh, the admin
//! API, and a graceful drain on shutdown.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
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
use tunnel::log_budget::LogBudget;
use tunnel::proto::Origin;
use tunnel::services::LocalServices;
use tunnel::splice::splice_until;
use tunnel::transport::{self, Tuning};

use crate::addr_text::Client;
use crate::admin;
use crate::http::{self as front, Front, HttpTuning};
use crate::listeners::{clashes_among, Kind, Listeners};

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
    /// Public HTTP address; `None`: no plain HTTP.
    pub http: Option<SocketAddr>,
    /// Public HTTPS address; `None`: no HTTPS.
    pub https: Option<SocketAddr>,
    /// `(certificate chain, private key)` PEM files, chosen by SNI. Empty: a self-signed
    /// certificate for the zone's names.
    pub tls_certs: Vec<(PathBuf, PathBuf)>,
    pub http_tuning: HttpTuning,
    /// Connections one client address (IPv6: its /64) may have open through all `tcp` apps
    /// together ([`crate::listeners::TCP_CONNECTIONS_PER_IP`] by default).
    pub tcp_connections_per_ip: usize,
    /// Connections all `tcp` apps hold together; when full, a client holding fewer gets in
    /// by closing the longest-idle connection of the one holding the most
    /// ([`crate::listeners::MAX_TCP_CONNECTIONS`] by default and at most).
    pub tcp_connections: usize,
    /// Flows of one `udp` app one client address may have
    /// ([`crate::listeners::UDP_FLOWS_PER_IP`] by default).
    pub udp_flows_per_ip: usize,
    /// Flows one `udp` app keeps at once ([`crate::listeners::MAX_UDP_CLIENTS`] by default).
    pub udp_flows_per_app: usize,
    /// Authoritative DNS for the zone (UDP and TCP on this address); `None`: no DNS.
    pub dns: Option<SocketAddr>,
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
    front: Front,
    http: Option<TcpListener>,
    https: Option<(TcpListener, front::tls::Tls)>,
    self_signed_pem: Option<String>,
    dns: Option<(name_resolver::DnsServer, name_resolver::ZoneRecords)>,
    shutdown: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tunnel(#[from] tunnel::TunnelError),
    #[error(transparent)]
    Admin(#[from] admin::BindError),
    #[error("{0}")]
    Bind(String),
    /// A setting to change (restarting cannot help): a policy app on one of the gateway's
    /// own ports.
    #[error("{0}")]
    Usage(String),
    #[error("HTTPS: {0}")]
    Tls(#[from] front::tls::TlsError),
    /// Its messages name DNS themselves.
    #[error(transparent)]
    Dns(#[from] name_resolver::DnsError),
}

/// Why a started gateway stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the zone DNS server stopped ({0}): the gateway stopped with it, since nodes fetch the zone config from it (a service manager restarts it)")]
    Dns(name_resolver::DnsError),
    #[error("the zone DNS server's task failed ({0}): the gateway stopped with it (a service manager restarts it)")]
    DnsTask(String),
    #[error("the {what} failed ({why}): the gateway stopped, since without it {without} (a service manager restarts it)")]
    Part {
        what: &'static str,
        why: String,
        without: &'static str,
    },
}

type Fatal = Arc<std::sync::Mutex<Option<RunError>>>;

/// Watches a part of the gateway that must run as long as it does: one that ends on its own
/// (a panic; a return before the shutdown) stops the gateway, drained, with its error — a
/// gateway serving without it would look healthy to its service manager while, say, no
/// revocation in a newer zone.json were adopted. At the shutdown the watch ends; the part
/// finishes as it does (the admin API answers through the drain, the front closes its pool).
fn essential(
    what: &'static str,
    without: &'static str,
    task: tokio::task::JoinHandle<()>,
    fatal: &Fatal,
    token: &CancellationToken,
) {
    let (fatal, token) = (fatal.clone(), token.clone());
    tokio::spawn(async move {
        let ended = tokio::select! {
            r = task => r,
            () = token.cancelled() => return,
        };
        if token.is_cancelled() {
            return;
        }
        let why = match ended {
            Ok(()) => "it returned".to_owned(),
            Err(e) => e.to_string(),
        };
        let stopped = RunError::Part { what, why, without };
        tracing::error!(error = %stopped, "stopping the gateway");
        *fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(stopped);
        token.cancel();
    });
}

/// Tells the devices the policy names that the zone config does not list, and the services
/// its apps name that their connected device does not offer ([`crate::unlisted`]), at start
/// and as the policy, the zone config or a device's services change: each once, at warn,
/// until it is mended and made again.
#[derive(Default)]
struct Unlisted {
    /// The policy and zone serial last looked at (the policy held: a pointer alone could be
    /// a newer one's, allocated where the old one was).
    at: Option<(Arc<policies::Active>, u64)>,
    told: std::collections::HashSet<String>,
    /// Apps told of a service their device does not offer ([`crate::unlisted::Offer`] keys),
    /// looked at every poll: a device's services change with no policy or zone change (a
    /// node restarted with another `--service`).
    told_services: std::collections::HashSet<String>,
}

impl Unlisted {
    fn tell(&mut self, hub: &Hub) {
        let policy = hub.policy().current();
        let offers = crate::unlisted::unoffered_services(&policy.policy, |d| {
            hub.agent(d)
                .map(|a| a.services.read().unwrap_or_else(|p| p.into_inner()).clone())
        });
        // Told once per mistake: again only after the device offered it, or the app left
        // the policy — not as the device reconnects or stops.
        let keys: std::collections::HashSet<&String> = offers.iter().map(|(k, _)| k).collect();
        self.told_services.retain(|k| keys.contains(k));
        for (key, offer) in offers {
            match offer {
                crate::unlisted::Offer::NotOffered(line) => {
                    if self.told_services.insert(key) {
                        tracing::warn!(problem = %line, "the policy names a service its device does not offer");
                    }
                }
                crate::unlisted::Offer::Offered => {
                    self.told_services.remove(&key);
                }
                crate::unlisted::Offer::Unknown => {}
            }
        }
        let zone = hub.creds().zone();
        let serial = zone.config.serial;
        if let Some((p, s)) = &self.at {
            if Arc::ptr_eq(p, &policy) && *s == serial {
                return;
            }
        }
        self.at = Some((policy.clone(), serial));
        let now: std::collections::HashSet<String> =
            crate::unlisted::unlisted_devices(&policy.policy, &zone.config)
                .into_iter()
                .collect();
        for line in now.difference(&self.told) {
            tracing::warn!(problem = %line, serial = zone.config.serial, "the policy names a device the zone config does not list or revokes");
        }
        self.told = now;
    }
}

/// How often the `[[tls]]` files are looked at for a change.
const CERT_POLL: Duration = Duration::from_secs(5);

/// The `[[tls]]` pairs as the certificate watcher last saw them ([`watch_certificates`]), for
/// `/status` and `/metrics`.
#[derive(Debug, Default, Clone)]
struct TlsView {
    /// The pairs that do not load, one per line.
    failing: Option<String>,
    /// Each pair and the certificate it serves.
    served: Vec<front::tls::ServedCert>,
}

impl TlsView {
    fn of(tls: &front::tls::Tls) -> Self {
        TlsView {
            failing: tls.failing().map(str::to_owned),
            served: tls.served(),
        }
    }
}

type TlsShown = Arc<std::sync::Mutex<TlsView>>;

/// Serves renewed `[[tls]]` certificates from the next handshake on, as their files change;
/// files that do not load are logged, shown in `/status` (`tls_errors`), and the old
/// certificates serve on.
async fn watch_certificates(
    mut tls: front::tls::Tls,
    domain: String,
    policy: Arc<PolicyStore>,
    shown: TlsShown,
    shutdown: CancellationToken,
) {
    tell_expiry(&mut tls);
    loop {
        *shown.lock().unwrap_or_else(|p| p.into_inner()) = TlsView::of(&tls);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(CERT_POLL) => {}
        }
        // Only a self-signed certificate follows the policy's hosts.
        let names = tls
            .self_signed_pem
            .is_some()
            .then(|| self_signed_names(&domain, &policy));
        // File reads (and signing): off the runtime's threads.
        let (back, r) = match tokio::task::spawn_blocking(move || {
            let r = tls
                .reload_if_changed()
                .or_else(|| tls.reissue_self_signed(&names?));
            (tls, r)
        })
        .await
        {
            Ok(done) => done,
            Err(e) => {
                // The gateway stops on it (`essential`), with this as the cause.
                tracing::error!(error = %e, "reading the HTTPS certificate files failed");
                return;
            }
        };
        tls = back;
        tell_expiry(&mut tls);
        let self_signed = tls.self_signed_pem.is_some();
        match r {
            None => {}
            Some(Ok(names)) if self_signed => {
                info!(names = ?names, "the policy's http hosts changed: the self-signed HTTPS certificate now names them (same key)")
            }
            Some(Err(e)) if self_signed => {
                error!(error = %e, "the self-signed HTTPS certificate could not be issued for the policy's new hosts: the previous one serves on; tried again every 5 s")
            }
            Some(Ok(names)) => {
                info!(names = ?names, "HTTPS certificates changed on disk: serving the new ones")
            }
            // A warning: during a renewal the key may change a moment before its certificate.
            Some(Err(e)) => {
                warn!(error = %e, "HTTPS certificate files changed but a pair does not load or is out of date: its previous certificate serves on, if it ever loaded (else its names get the first pair's), and the other pairs' new ones serve; read again every 5 s until it loads")
            }
        }
    }
}

/// Says which served certificates from files near their end or have ended, each once per
/// change: a renewal that fails leaves the files as they were, so no reload would say it.
fn tell_expiry(tls: &mut front::tls::Tls) {
    use front::tls::Expiry;
    let now = front::tls::unix_now();
    for n in tls.expiry(now) {
        let days_left = n.days_left(now);
        match n.now {
            Expiry::Expired => {
                error!(names = ?n.names, days_left, "an HTTPS certificate has expired and its files were not renewed: browsers refuse it, and it serves on for the names no other certificate covers; renew it (`certbot renew`): the gateway serves new files as they change")
            }
            Expiry::Soon => {
                warn!(names = ?n.names, days_left, "an HTTPS certificate ends soon and its files were not renewed: check its renewal (`certbot renew --dry-run`): the gateway serves new files as they change")
            }
            Expiry::InDate => {
                info!(names = ?n.names, days_left, "an HTTPS certificate is in date again (the clock changed)")
            }
        }
    }
}

/// Binds a public HTTP(S) port, with a message that says what to do when it fails.
async fn bind_public(what: &str, key: &str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    tunnel::sockets::tcp(addr).map_err(|e| {
        let fix = format!("set `{key} = \"IP:PORT\"` or `{key} = \"off\"` in gateway.toml");
        let hint = bind_hint(&e, addr, &fix);
        StartError::Bind(format!("{what}: cannot listen on {addr}: {e}{hint}"))
    })
}

/// What to do about a failed bind of `addr`, ending with `fix` (the setting to change), or
/// nothing for errors without a usual cause.
pub(crate) fn bind_hint(e: &std::io::Error, addr: SocketAddr, fix: &str) -> String {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied if addr.port() < 1024 => format!(
            " (ports below 1024 need root or CAP_NET_BIND_SERVICE: `setcap cap_net_bind_service=+ep $(which zonegate)`; or {fix})"
        ),
        std::io::ErrorKind::AddrInUse => {
            format!(" (another program, or another listener of this gateway, uses it: {fix})")
        }
        std::io::ErrorKind::AddrNotAvailable => {
            format!(" (no interface of this machine has that address: {fix})")
        }
        _ => String::new(),
    }
}

/// Names of the self-signed certificate: the zone domain, its wildcard, and every host of
/// the policy's http apps.
fn self_signed_names(domain: &str, policy: &PolicyStore) -> Vec<String> {
    let d = domain.to_string();
    let mut names = vec![d.clone(), format!("*.{d}")];
    for a in policy.current().policy.apps() {
        if let policies::Listener::Http(r) = &a.listener {
            if !names.contains(&r.host) {
                names.push(r.host.clone());
            }
        }
    }
    names
}

/// The gateway's own sockets as gateway.toml sets them: kind, address, setting. Two of them
/// on one port ([`clashes_among`]: `admin` and a `[[forward]]` on 127.0.0.1:9090, `http` and
/// `https` alike, a `listen` on the DNS port) is a setting to change.
fn own_sockets(opts: &GatewayOptions) -> Vec<(Kind, SocketAddr, String)> {
    own_sockets_of(
        (opts.listen, opts.admin),
        (opts.http, opts.https, opts.dns),
        &opts.forwards,
    )
}

/// [`own_sockets`] from the settings themselves (`zonegate policy check --gateway-config`
/// has no credentials to make [`GatewayOptions`] of): QUIC `listen` and `admin`; `http`,
/// `https` and `dns` where on; the `[[forward]]`s.
pub fn own_sockets_of(
    (listen, admin): (SocketAddr, SocketAddr),
    (http, https, dns): (Option<SocketAddr>, Option<SocketAddr>, Option<SocketAddr>),
    forwards: &[Forward],
) -> Vec<(Kind, SocketAddr, String)> {
    let mut own: Vec<(Kind, SocketAddr, String)> = vec![
        (Kind::Udp, listen, "listen".into()),
        (Kind::Tcp, admin, "admin".into()),
    ];
    own.extend(http.map(|a| (Kind::Tcp, a, "http".into())));
    own.extend(https.map(|a| (Kind::Tcp, a, "https".into())));
    if let Some(a) = dns {
        own.push((Kind::Udp, a, "dns".into()));
        own.push((Kind::Tcp, a, "dns".into()));
    }
    for f in forwards {
        let key = format!("[[forward]] to {}/{}", f.device, f.service);
        own.push((Kind::Tcp, f.listen, key));
    }
    // Port 0 is any free port: it takes none an app could name.
    own.retain(|(_, a, _)| a.port() != 0);
    own
}

/// The gateway's own `[services]` on this machine (at a loopback or unspecified address, or
/// one of its interfaces' addresses: a database at the machine's LAN address), as sockets no
/// app may listen on: an app there either could not bind (the service holds the port) or,
/// bound while the service was down, took its port and, if it leads to that service,
/// connected to itself over and over — a chain of connections per client up to the
/// per-address limit — while the service could not start. (Services at other hosts'
/// addresses are not this machine's ports.)
pub fn services_here(services: &LocalServices) -> Vec<(Kind, SocketAddr, String)> {
    // Unreadable, the interfaces' addresses are left out: loopback is still checked.
    let own: Vec<IpAddr> = if_addrs::get_if_addrs()
        .map(|l| l.into_iter().map(|i| i.ip()).collect())
        .unwrap_or_default();
    services_on(services, &own)
}

/// [`services_here`] on a machine whose interfaces have the addresses `own`.
fn services_on(services: &LocalServices, own: &[IpAddr]) -> Vec<(Kind, SocketAddr, String)> {
    services
        .iter()
        .filter(|(_, s)| {
            let ip = s.addr.ip().to_canonical();
            ip.is_loopback() || ip.is_unspecified() || own.iter().any(|o| o.to_canonical() == ip)
        })
        .filter(|(_, s)| s.addr.port() != 0)
        .map(|(name, s)| {
            let kind = match s.proto {
                tunnel::proto::ServiceProto::Tcp => Kind::Tcp,
                tunnel::proto::ServiceProto::Udp => Kind::Udp,
            };
            // As compared above: `[::ffff:10.0.0.5]` is the IPv4 address an IPv4 app's
            // listener overlaps (kept mapped, it overlapped none).
            let at = SocketAddr::new(s.addr.ip().to_canonical(), s.addr.port());
            (kind, at, format!("[services.{name}]"))
        })
        .collect()
}

impl Gateway {
    /// Binds every socket (QUIC, admin, app listeners, forwards) before serving anything, so a
    /// bad config or a taken port fails here and nothing half-starts.
    pub async fn bind(
        opts: GatewayOptions,
        shutdown: CancellationToken,
    ) -> Result<Self, StartError> {
        // Two of the gateway's own sockets on one port is a setting to change: told here, exit
        // 2, not found by a bind (exit 1, which a service manager restarts for ever).
        let own = own_sockets(&opts);
        let clashes = clashes_among(&own, "gateway.toml");
        if !clashes.is_empty() {
            return Err(StartError::Usage(clashes.join("; ")));
        }
        // A policy app on one of them, likewise, before any bind: found after the binds, a
        // port another program held (exit 1) hid this setting to change. (Checked again once
        // bound, for DNS's per-address sockets.)
        let services = services_here(&opts.services);
        // DNS at a wildcard binds each address another server does not hold (systemd-resolved
        // at 127.0.0.53:53): a service there is not this process. Checked against what the
        // DNS bound, below.
        let fixed: Vec<_> = own
            .iter()
            .filter(|(_, a, key)| !(key == "dns" && a.ip().is_unspecified()))
            .cloned()
            .collect();
        let clashes = crate::listeners::services_on_own(&fixed, &services, "gateway.toml");
        if !clashes.is_empty() {
            return Err(StartError::Usage(clashes.join("; ")));
        }
        let mut own = own;
        own.extend(services.iter().cloned());
        let clashes = crate::listeners::clashes_with(&own, &opts.policy.current().policy);
        if !clashes.is_empty() {
            return Err(StartError::Usage(clashes.join("; ")));
        }
        // The checks of files first, before any socket: [[tls]] pairs none of which loads (a
        // mistyped path) or a zone the DNS cannot carry is a setting to change, told before
        // anything is bound. Some pairs loading: those serve, the others are logged.
        let tls = match opts.https {
            Some(_) => {
                let names = self_signed_names(&opts.creds.domain().to_string(), &opts.policy);
                Some(front::tls::configure(&opts.tls_certs, &names)?)
            }
            None => None,
        };
        let records = match opts.dns {
            // A zone too large for DNS is served as a running gateway serves one it adopts:
            // its addresses, without its TXT set, said at error. Refusing the start (exit 2,
            // which the unit does not restart) left a gateway that had adopted such a zone
            // from another gateway down at its next reboot. Names DNS cannot carry still stop
            // the start here.
            Some(_) => {
                let zone = opts.creds.zone();
                Some(match name_resolver::ZoneRecords::new(&zone) {
                    Ok(r) => r,
                    Err(error @ name_resolver::RecordsError::TxtTooLarge { .. }) => {
                        tracing::error!(%error, serial = zone.config.serial, "DNS serves this zone serial's addresses without its TXT record: nodes cannot bootstrap over DNS until it fits");
                        name_resolver::ZoneRecords::without_txt(&zone)
                            .map_err(name_resolver::DnsError::from)?
                    }
                    Err(e) => return Err(name_resolver::DnsError::from(e).into()),
                })
            }
            None => None,
        };
        let endpoint = transport::server_endpoint(opts.listen, &opts.creds, &opts.tuning)
            .map_err(|e| match e {
                tunnel::TunnelError::Bind { addr, error, .. } => {
                    let hint = bind_hint(&error, addr, "set `listen = \"IP:PORT\"` in gateway.toml");
                    StartError::Bind(format!(
                        "`listen` (the tunnel's QUIC port): cannot listen on UDP {addr}: {error}{hint}"
                    ))
                }
                e => e.into(),
            })?;
        let admin = admin::bind(opts.admin).await?;
        let hub = Hub::new(HubConfig {
            creds: opts.creds.clone(),
            policy: opts.policy.clone(),
            local: opts.services.clone(),
            tuning: opts.tuning,
        });
        let mut forwards = Vec::new();
        for f in &opts.forwards {
            let l = tunnel::sockets::tcp(f.listen).map_err(|e| {
                let hint = bind_hint(&e, f.listen, "give the [[forward]] another `listen`");
                StartError::Bind(format!(
                    "forward {} -> {}/{}: cannot listen: {e}{hint}",
                    f.listen, f.device, f.service
                ))
            })?;
            forwards.push((f.clone(), l));
        }
        let http = match opts.http {
            Some(a) => Some(bind_public("HTTP", "http", a).await?),
            None => None,
        };
        let (https, self_signed_pem) = match (opts.https, tls) {
            (Some(a), Some(tls)) => {
                let l = bind_public("HTTPS", "https", a).await?;
                if tls.self_signed_pem.is_some() {
                    warn!(names = ?tls.names, "HTTPS uses a self-signed certificate (browsers will warn): add [[tls]] cert/key files to gateway.toml");
                } else {
                    info!(names = ?tls.names, "HTTPS certificates loaded");
                }
                let pem = tls.self_signed_pem.clone();
                (Some((l, tls)), pem)
            }
            _ => (None, None),
        };
        let dns = match (opts.dns, records) {
            (Some(a), Some(records)) => {
                let server = name_resolver::DnsServer::bind_same_port_using(
                    a,
                    tunnel::sockets::udp,
                    tunnel::sockets::tcp,
                )
                .await?;
                Some((server, records))
            }
            _ => None,
        };
        if let Some((d, _)) = &dns {
            let bound: Vec<_> = (d.udp_addrs().into_iter().map(|a| (Kind::Udp, a)))
                .chain(d.tcp_addrs().into_iter().map(|a| (Kind::Tcp, a)))
                .map(|(k, a)| (k, a, "dns".to_owned()))
                .collect();
            let clashes = crate::listeners::services_on_own(&bound, &services, "gateway.toml");
            if !clashes.is_empty() {
                // The DNS could bind it, so nothing listens there now: the service's program
                // may not have started yet (it could not bind once the gateway holds the port).
                // Exit 1, which a service manager retries: a start before it stayed down.
                shutdown.cancel();
                return Err(StartError::Bind(format!(
                    "{}; if the service's program is to listen there, start it before the gateway (it is not listening now: the gateway's DNS could bind the address)",
                    clashes.join("; ")
                )));
            }
        }
        // Last, as app listeners start accepting at once: nothing serves before every other
        // socket is bound and every check passed.
        let mut reserved = services;
        let mut own = |kind, addr: std::io::Result<SocketAddr>, setting: &str| {
            if let Ok(a) = addr {
                reserved.push((kind, a, setting.to_owned()));
            }
        };
        own(Kind::Udp, endpoint.local_addr(), "listen");
        own(Kind::Tcp, admin.local_addr(), "admin");
        if let Some(l) = &http {
            own(Kind::Tcp, l.local_addr(), "http");
        }
        if let Some((l, _)) = &https {
            own(Kind::Tcp, l.local_addr(), "https");
        }
        if let Some((d, _)) = &dns {
            d.udp_addrs()
                .into_iter()
                .for_each(|a| own(Kind::Udp, Ok(a), "dns"));
            d.tcp_addrs()
                .into_iter()
                .for_each(|a| own(Kind::Tcp, Ok(a), "dns"));
        }
        for (_, l) in &forwards {
            own(Kind::Tcp, l.local_addr(), "forward");
        }
        let mut listeners = Listeners::new(
            reserved,
            opts.tcp_connections_per_ip,
            opts.tcp_connections,
            crate::listeners::UdpLimits {
                per_ip: opts.udp_flows_per_ip,
                per_app: opts.udp_flows_per_app,
            },
        );
        // Clashes with the gateway's own sockets first: a config error, not a bind failure
        // that a restart might get past (exit 2, which a service manager does not restart).
        let clashes = listeners.own_clashes(&hub.policy().current().policy);
        if !clashes.is_empty() {
            shutdown.cancel();
            return Err(StartError::Usage(clashes.join("; ")));
        }
        // An app's address another program holds (a mail server that took port 25 first
        // after a reboot) costs that app only, as it does while running: a start refused for
        // it put every app, DNS and the tunnel in a restart loop. Retried at every poll;
        // `/status` lists it under `listener_errors`.
        for e in listeners.reconcile(&hub, &shutdown).await {
            error!(error = %e, "app listener could not start; the gateway serves the rest and tries it again at every policy poll");
        }
        hub.policy().set_check(listeners.reload_check());
        let front = Front::new(hub.clone(), opts.http_tuning);
        Ok(Gateway {
            opts,
            hub,
            endpoint,
            admin,
            listeners,
            forwards,
            front,
            http,
            https,
            self_signed_pem,
            dns,
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
    /// Bound public HTTP address, if serving plain HTTP.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }
    /// Bound public HTTPS address, if serving HTTPS.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }
    /// The self-signed HTTPS certificate (PEM) when no certificate files are configured.
    pub fn self_signed_pem(&self) -> Option<&str> {
        self.self_signed_pem.as_deref()
    }
    /// Bound DNS address (UDP and TCP), if serving DNS.
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.dns.as_ref().map(|(d, _)| d.udp_addr())
    }
    pub fn forward_addrs(&self) -> Vec<SocketAddr> {
        self.forwards
            .iter()
            .filter_map(|(_, l)| l.local_addr().ok())
            .collect()
    }

    /// Serves until the shutdown token fires, then drains. A part that stops on its own (the
    /// DNS server) stops the whole gateway, drained, with its error: a gateway half up would
    /// look healthy to its service manager.
    pub async fn run(self) -> Result<(), RunError> {
        let Gateway {
            opts,
            hub,
            endpoint,
            admin,
            mut listeners,
            forwards,
            front,
            http,
            https,
            self_signed_pem: _,
            dns,
            shutdown,
        } = self;
        let fatal: Fatal = Arc::default();
        // Parts that outlive `shutdown`, up to the end of the drain (this function): the admin
        // API, the zone DNS (the zone's names must resolve while the connections it drains
        // are served, and its single NS is this gateway), the policy watcher (a time window's
        // end or an edit still ends the proxied connections a drain of up to an hour waits
        // for) and the zone.json watcher (a revocation copied in still disconnects).
        let lasting = CancellationToken::new();
        let _lasting = lasting.clone().drop_guard();
        let dns_stats = dns.as_ref().map(|(d, _)| d.stats());
        if let Some((dns, records)) = dns {
            // Answers follow the gateway's current zone config: a newer zone.json adopted from
            // an agent is served within a second, with its serial in the SOA.
            let creds = opts.creds.clone();
            let (stop, fail) = (lasting.clone(), shutdown.clone());
            let fatal = fatal.clone();
            let serving = tokio::spawn(dns.run_with(records, move || creds.zone(), stop.clone()));
            // Watched from outside its task: a panic in it ends the gateway too.
            tokio::spawn(async move {
                let stopped = match serving.await {
                    Ok(Ok(())) => return,
                    // Ending with the gateway is no failure of its own (as for `essential`).
                    _ if stop.is_cancelled() => return,
                    Ok(Err(e)) => RunError::Dns(e),
                    Err(e) => RunError::DnsTask(e.to_string()),
                };
                tracing::error!(error = %stopped, "stopping the gateway");
                *fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(stopped);
                fail.cancel();
            });
        }
        let started = Instant::now();
        info!(
            device = %opts.creds.name(),
            zone = %opts.creds.domain(),
            quic = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            admin = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            serial = opts.creds.zone_serial(),
            apps = hub.policy().current().policy.apps().len(),
            services = ?opts.services.iter().map(|(n, s)| format!("{n}={}", s.addr)).collect::<Vec<_>>(),
            "gateway started"
        );
        // Watched as the DNS server is: a panic in one would otherwise leave the gateway
        // serving without it, silently.
        let (store, stop) = (hub.policy().clone(), lasting.clone());
        essential(
            "policy watcher",
            "policy edits and time windows would no longer apply",
            // It runs until dropped.
            tokio::spawn(async move {
                tokio::select! {
                    () = policies::watch(store, POLICY_POLL) => {}
                    () = stop.cancelled() => {}
                }
            }),
            &fatal,
            &shutdown,
        );
        if let Some(p) = opts.creds.zone_path() {
            let h = hub.clone();
            essential(
                "zone.json watcher",
                "a zone.json copied in (a revocation, a moved gateway) would not be adopted",
                tokio::spawn(tunnel::zone_watch::watch(
                    move |bytes, path, _| {
                        h.adopt_zone_file(bytes, path);
                        None
                    },
                    p.to_owned(),
                    POLICY_POLL,
                    lasting.clone(),
                )),
                &fatal,
                &shutdown,
            );
        }
        if let Some(p) = opts.creds.cert_path() {
            let creds = opts.creds.clone();
            essential(
                "device.crt watcher",
                "a renewed device.crt copied in would not be taken",
                tokio::spawn(tunnel::zone_watch::watch(
                    move |bytes, path, seen| creds.cert_file_changed(bytes, path, seen),
                    p.to_owned(),
                    POLICY_POLL,
                    lasting.clone(),
                )),
                &fatal,
                &shutdown,
            );
        }
        let status_hub = hub.clone();
        let failing = listeners.failures();
        // The `[[tls]]` pairs, as the certificate watcher last saw them.
        let tls_shown: TlsShown = Arc::new(std::sync::Mutex::new(
            https
                .as_ref()
                .map(|(_, t)| TlsView::of(t))
                .unwrap_or_default(),
        ));
        let status: admin::StatusFn = Arc::new({
            let tls_shown = tls_shown.clone();
            move || {
                let failing = failing.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let tls = tls_shown.lock().unwrap_or_else(|p| p.into_inner()).clone();
                status_json(&status_hub, started, failing, tls)
            }
        });
        let extras = admin::Extras {
            metrics: Some({
                let front = front.clone();
                let tls_shown = tls_shown.clone();
                Arc::new(move || {
                    let tls = tls_shown.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    metrics_text(&front, &tls, dns_stats.as_deref())
                })
            }),
            page: Some({
                let status = status.clone();
                Arc::new(move || front::status_page::render(&status()))
            }),
        };
        // Not `shutdown`: the API answers through the drain ("draining": true in /status),
        // when monitoring most needs it, and stops once the gateway has.
        essential(
            "admin API",
            "its /status and /metrics would not answer",
            tokio::spawn(admin::serve_with(admin, status, extras, lasting.clone())),
            &fatal,
            &shutdown,
        );
        if let Some(l) = http {
            essential(
                "HTTP front",
                "no HTTP request would be served",
                tokio::spawn(front.clone().serve(l, None, shutdown.clone())),
                &fatal,
                &shutdown,
            );
        }
        if let Some((l, tls)) = https {
            let acc = tokio_rustls::TlsAcceptor::from(tls.config.clone());
            essential(
                "HTTPS front",
                "no HTTPS request would be served",
                tokio::spawn(front.clone().serve(l, Some(acc), shutdown.clone())),
                &fatal,
                &shutdown,
            );
            essential(
                "HTTPS certificate watcher",
                "renewed certificates would not be served before the old ones end",
                tokio::spawn(watch_certificates(
                    tls,
                    opts.creds.domain().to_string(),
                    hub.policy().clone(),
                    tls_shown,
                    shutdown.clone(),
                )),
                &fatal,
                &shutdown,
            );
        }
        for (f, l) in forwards {
            essential(
                "[[forward]] listener",
                "its local port would take no connection",
                tokio::spawn(forward_loop(hub.clone(), f, l, shutdown.clone())),
                &fatal,
                &shutdown,
            );
        }
        // Keep listeners in step with the policy: compare the live policy by pointer.
        {
            let hub = hub.clone();
            let front = front.clone();
            let stop = shutdown.clone();
            let reconcile = tokio::spawn(async move {
                let mut seen = hub.policy().current();
                let mut health = HealthLog::default();
                let mut unlisted = Unlisted::default();
                unlisted.tell(&hub);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(POLICY_POLL) => {}
                    }
                    unlisted.tell(&hub);
                    let now = hub.policy().current();
                    // Binds that failed (the port was taken) are retried at every poll.
                    if !Arc::ptr_eq(&now, &seen) || listeners.has_failures() {
                        seen = now;
                        for e in listeners.reconcile(&hub, &stop).await {
                            error!(error = %e, "listener of a reloaded policy could not start");
                        }
                    }
                    hub.policy().current().maintain();
                    // As the front takes them (proxy.rs): while the device offers the service.
                    front
                        .pool()
                        .sweep(|k| hub.offers_tcp(&k.device, &k.service));
                    health.update(&hub);
                }
            });
            essential(
                "listener and upkeep loop",
                "listeners would no longer follow policy edits, limiter tables and idle pooled connections would no longer be swept, and zone health changes no longer logged",
                reconcile,
                &fatal,
                &shutdown,
            );
        }
        let served = hub.serve(endpoint, shutdown.clone(), opts.grace).await;
        let stopped_by = fatal.lock().unwrap_or_else(|p| p.into_inner()).take();
        info!(device = %opts.creds.name(), zone = %opts.creds.domain(), "gateway stopped");
        match (stopped_by, served) {
            (Some(e), _) => Err(e),
            // Exit 0 would tell the service manager not to restart a gateway no agent reaches.
            (None, tunnel::hub::Served::EndpointEnded) => Err(RunError::Part {
                what: "QUIC endpoint",
                why: "it stopped accepting connections".into(),
                without: "no node agent could connect",
            }),
            (None, tunnel::hub::Served::Shutdown) => Ok(()),
        }
    }
}

/// `/metrics`: HTTP requests and latency, app counters, tunnel gauges, agent handshakes, the
/// `[[tls]]` certificates.
fn metrics_text(front: &Front, tls: &TlsView, dns: Option<&name_resolver::DnsStats>) -> String {
    let hub = front.hub();
    let mut out = String::new();
    {
        let active = hub.policy().current();
        front
            .metrics()
            .retain_apps(|name| active.policy.app(name).is_some());
    }
    front.metrics().render(&mut out);
    let snap = hub.policy().current().snapshot();
    let apps: Vec<(&str, policies::accounting::CountersSnapshot)> =
        snap.iter().map(|(n, c)| (n.as_str(), c.clone())).collect();
    policies::accounting::render_prometheus(&apps, &mut out);
    let agents = hub.status();
    let (expected, connected) = expected_connected(hub);
    front::metrics::render_tunnel(
        &agents,
        zone_health(expected.len(), connected),
        front.pool().idle_count(),
        &mut out,
    );
    front::metrics::render_handshakes(&hub.handshake_stats(), &mut out);
    front::metrics::render_ends(&zone_ends(hub), &mut out);
    front::metrics::render_tls(&tls.served, &mut out);
    if let Some(dns) = dns {
        front::metrics::render_dns(&dns.counts(), &mut out);
    }
    out
}

/// This gateway's certificate's end, the zone config's expiry, and the end of each device's
/// certificate as the zone config lists it (revoked ones left out).
fn zone_ends(hub: &Hub) -> front::metrics::ZoneEnds {
    let creds = hub.creds();
    let zone = creds.zone();
    front::metrics::ZoneEnds {
        own_certificate: creds.cert_not_after().unix_timestamp(),
        zone_config: zone.config.expires_at.unix_timestamp(),
        devices: zone
            .config
            .devices
            .iter()
            .filter(|d| !creds.is_revoked(d.name.as_str()))
            .map(|d| (d.name.to_string(), d.cert_expires_at.unix_timestamp()))
            .collect(),
    }
}

/// Devices of the zone config that connect to this gateway, and how many of them are
/// connected.
fn expected_connected(hub: &Hub) -> (Vec<String>, usize) {
    let creds = hub.creds();
    // Not a device this gateway keeps out: one revoked in an earlier config that the one in
    // use leaves out (see zone_core::seen_revocations) would be "missing" for ever.
    let mut expected = expected_agents(&creds.zone().config);
    expected.retain(|n| !creds.is_revoked(n));
    // One lookup each (the full status of every agent was built, then searched, per device).
    let connected = expected.iter().filter(|n| hub.agent(n).is_some()).count();
    (expected, connected)
}

/// The devices whose agents connect to gateways: every device but the gateways (this one
/// and the others, which never connect to each other). Counting a second gateway as
/// missing kept the health of every zone with two gateways from ever being green.
fn expected_agents(zone: &zone_core::ZoneConfig) -> Vec<String> {
    zone.devices
        .iter()
        .filter(|d| !d.roles.contains(&zone_core::Role::Gateway))
        .map(|d| d.name.to_string())
        .collect()
}

/// The zone's health colour and how it is made up, logged when the colour changes (DESIGN.md:
/// "shown in status and logged on change"); it was only ever worked out when asked for.
#[derive(Default)]
struct HealthLog {
    last: Option<&'static str>,
}

impl HealthLog {
    fn update(&mut self, hub: &Hub) {
        let (expected, connected) = expected_connected(hub);
        let health = zone_health(expected.len(), connected);
        if self.last == Some(health) {
            return;
        }
        let missing: Vec<&str> = expected
            .iter()
            .filter(|n| hub.agent(n).is_none())
            .map(String::as_str)
            .collect();
        let previous = self.last.replace(health).unwrap_or("unknown");
        info!(zone = %hub.creds().domain(), health, previous, connected, expected = expected.len(), missing = ?missing, "zone health changed");
    }
}

fn status_json(
    hub: &Hub,
    started: Instant,
    listener_errors: Vec<String>,
    tls: TlsView,
) -> serde_json::Value {
    let now = front::tls::unix_now();
    let ends = zone_ends(hub);
    let creds = hub.creds();
    let zone = creds.zone();
    let agents = hub.status();
    let (expected, connected) = expected_connected(hub);
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
        // Devices keep running on an expired config, but DNS bootstrap and devices holding an
        // older one refuse it: `zonegate zone resign` before this.
        "zone_expires_at": zone.config.expires_at.format(&time::format_description::well_known::Rfc3339).ok(),
        // This gateway's own certificate: every tunnel through it stops at its end.
        "cert_not_after": rfc3339(ends.own_certificate),
        "uptime_secs": started.elapsed().as_secs(),
        "draining": hub.is_draining(),
        "health": health,
        "devices_expected": expected,
        "agents": agents,
        "apps": apps,
        "policy": hub.policy().last_reload(),
        // Listeners of the policy that cannot bind (retried every poll).
        "listener_errors": listener_errors,
        // `[[tls]]` pairs that do not load (read again every 5 s; their previous certificates
        // serve on, but the next start is refused if none loads).
        "tls_errors": tls.failing.as_deref().map(|f| f.lines().collect::<Vec<_>>()).unwrap_or_default(),
        // Each `[[tls]]` pair and the end of the certificate it serves (none: self-signed).
        "tls_certificates": tls.served.iter().map(|c| {
            json!({
                "file": c.file.display().to_string(),
                "names": c.names,
                "not_before": c.valid.map(|(from, _)| rfc3339(from)),
                "not_after": c.valid.map(|(_, until)| rfc3339(until)),
                // Floored, as the log's: -1 on the first day after the end.
                "days_left": c.valid.map(|(_, until)| (until - now).div_euclid(86_400)),
                "failing": c.failing,
            })
        }).collect::<Vec<_>>(),
        // The end of each device's newest certificate, as the zone config lists it: for a
        // device not connected too (an agent's own, as it connected, is in `agents`).
        "device_cert_not_after_unix": ends.devices.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
    })
}

/// Unix seconds as RFC 3339 (UTC), as `/status` gives times.
fn rfc3339(t: i64) -> Option<String> {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()?
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
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
    tunnel::sockets::keepalive_accepted(&l, hub.tuning().tcp_keepalive);
    info!(listen = %f.listen, to = %format!("{}/{}", f.device, f.service), "mesh forward listening");
    // A local program retrying in a loop against a refusal or an offline device makes one
    // line per connection: budgeted, as the agent's forwards are.
    let lines = Arc::new(std::sync::Mutex::new(LogBudget::new(10)));
    while let Some((tcp, peer)) = tunnel::sockets::accept_until(&l, &shutdown).await {
        let hub = hub.clone();
        let f = f.clone();
        let lines = lines.clone();
        let _ = tcp.set_nodelay(true);
        // A local client's end: an early answer must reach it whole (a lingering close).
        let mut tcp = tunnel::linger::Lingering::new(tcp, None, None);
        // On the hub's work tracker, as public connections: a drain gives it `grace_secs`.
        let work = hub.work().clone();
        work.spawn(async move {
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
                if let Some(unlogged) = LogBudget::take_shared(&lines) {
                    info!(to = %format!("{}/{}", f.device, f.service), client = %Client(peer), reason = %d.decision, unlogged, "forward refused by policy");
                }
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
                        name: me.clone(),
                        addr: None,
                    },
                )
                .await
            {
                Ok(mut up) => {
                    let policy = hub.policy().clone();
                    let refused = policy.until_mesh_refused(&me, &roles, &f.device, &f.service);
                    let stop = async {
                        tokio::select! {
                            why = refused => format!("the policy no longer allows it ({why})"),
                            () = hub.grace_over().cancelled() => tunnel::hub::GRACE_CUT.to_owned(),
                        }
                    };
                    let m = splice_until(&mut tcp, &mut up, stop).await;
                    let (a, b) = (m.a_to_b, m.b_to_a);
                    let ms = started.elapsed().as_millis() as u64;
                    match &m.stopped {
                        Some(why) => {
                            info!(app = %app, to = %format!("{}/{}", f.device, f.service), client = %Client(peer), bytes_up = a, bytes_down = b, ms, reason = %why, "forward connection cut")
                        }
                        None => {
                            info!(app = %app, to = %format!("{}/{}", f.device, f.service), client = %Client(peer), bytes_up = a, bytes_down = b, ms, end = %m.end(), "forward connection done")
                        }
                    }
                }
                Err(e) => {
                    if let Some(unlogged) = LogBudget::take_shared(&lines) {
                        warn!(app = %app, to = %format!("{}/{}", f.device, f.service), client = %Client(peer), reason = %refusal_of(&e).1, unlogged, "forward failed")
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service at one of the machine's own addresses holds a port here, as one at loopback
    /// does; one at another host's address does not.
    #[test]
    fn services_at_the_machines_own_addresses_are_here() {
        use tunnel::services::LocalService;
        let svc = |a: &str| LocalService {
            addr: a.parse().unwrap(),
            proto: tunnel::proto::ServiceProto::Tcp,
        };
        let services = LocalServices::new(
            [
                ("db".to_string(), svc("10.0.0.5:5432")),
                ("web".to_string(), svc("127.0.0.1:8000")),
                ("nas".to_string(), svc("10.0.0.9:445")),
                ("pg".to_string(), svc("[::ffff:10.0.0.5]:5433")),
            ]
            .into(),
        );
        let own: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "::1".parse().unwrap()];
        let here: Vec<(SocketAddr, String)> = services_on(&services, &own)
            .into_iter()
            .map(|(_, at, key)| (at, key))
            .collect();
        let at = |a: &str| a.parse::<SocketAddr>().unwrap();
        assert_eq!(
            here,
            [
                (at("10.0.0.5:5432"), "[services.db]".to_string()),
                (at("10.0.0.5:5433"), "[services.pg]".to_string()),
                (at("127.0.0.1:8000"), "[services.web]".to_string()),
            ]
        );
    }

    /// Gateways never connect to one another: only the other devices count for health.
    #[test]
    fn a_zones_other_gateways_are_not_expected_to_connect() {
        let key = zone_core::ZoneKey::generate();
        let zone = name_resolver::testzone::config(&key, 1, 2);
        assert_eq!(expected_agents(&zone), ["home1", "home2"]);
        assert_eq!(zone_health(expected_agents(&zone).len(), 2), "green");
    }

    #[test]
    fn the_gateways_own_sockets_on_one_port_are_told_apart_by_kind_and_address() {
        let own = |v: &[(Kind, &str, &str)]| -> Vec<(Kind, SocketAddr, String)> {
            v.iter()
                .map(|(k, a, s)| (*k, a.parse().unwrap(), s.to_string()))
                .collect()
        };
        let clashes = clashes_among(
            &own(&[
                (Kind::Udp, "0.0.0.0:4433", "listen"),
                (Kind::Tcp, "127.0.0.1:9090", "admin"),
                (Kind::Tcp, "0.0.0.0:80", "http"),
                (Kind::Tcp, "[::]:80", "https"),
                (Kind::Udp, "[::]:4433", "dns"),
                (Kind::Tcp, "127.0.0.1:9090", "[[forward]] to home1/web"),
                // Other kinds, other addresses of one family, and port 0 clash with nothing.
                (Kind::Tcp, "0.0.0.0:4433", "dns"),
                (Kind::Tcp, "127.0.0.2:9091", "a"),
                (Kind::Tcp, "127.0.0.3:9091", "b"),
                (Kind::Tcp, "127.0.0.1:0", "c"),
                (Kind::Tcp, "127.0.0.1:0", "d"),
            ]),
            "gateway.toml",
        );
        assert_eq!(clashes.len(), 3, "{clashes:#?}");
        assert!(clashes[0]
            .contains("`listen` (0.0.0.0:4433) and `dns` ([::]:4433) both take UDP port 4433"));
        assert!(clashes[1].contains("`admin` (127.0.0.1:9090) and `[[forward]] to home1/web`"));
        assert!(
            clashes[2].contains("`http` (0.0.0.0:80) and `https` ([::]:80) both take TCP port 80")
        );
    }

    /// A part that ends on its own stops the gateway with its error; one ended by the
    /// shutdown does not.
    #[tokio::test]
    async fn an_essential_part_that_ends_stops_the_gateway() {
        let fatal: Fatal = Arc::default();
        let token = CancellationToken::new();
        let part = tokio::spawn(async { panic!("a bug in the part") });
        essential("part", "nothing would work", part, &fatal, &token);
        tokio::time::timeout(Duration::from_secs(5), token.cancelled())
            .await
            .expect("the gateway was not stopped");
        let e = fatal.lock().unwrap().take().expect("the cause").to_string();
        assert!(
            e.contains("the part failed") && e.contains("nothing would work"),
            "{e}"
        );

        let fatal: Fatal = Arc::default();
        let token = CancellationToken::new();
        let stop = token.clone();
        let part = tokio::spawn(async move { stop.cancelled().await });
        essential("part", "nothing would work", part, &fatal, &token);
        token.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(fatal.lock().unwrap().is_none());
    }

    #[test]
    fn health_colours() {
        assert_eq!(zone_health(0, 0), "green");
        assert_eq!(zone_health(3, 3), "green");
        assert_eq!(zone_health(4, 2), "yellow");
        assert_eq!(zone_health(4, 1), "orange");
        assert_eq!(zone_health(3, 0), "red");
    }
}
