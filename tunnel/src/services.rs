//! The services a device offers: name → local address. A device serves only these; nothing
//! else on its network is reachable through zonegate.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::proto::{RefuseCode, ServiceInfo, ServiceProto};

/// Time to connect to a local service before the stream is refused as unreachable.
pub const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalService {
    pub addr: SocketAddr,
    pub proto: ServiceProto,
}

/// This device's services.
#[derive(Debug, Clone, Default)]
pub struct LocalServices {
    map: BTreeMap<String, LocalService>,
}

impl LocalServices {
    pub fn new(map: BTreeMap<String, LocalService>) -> Self {
        LocalServices { map }
    }
    pub fn get(&self, name: &str) -> Option<&LocalService> {
        self.map.get(name)
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&String, &LocalService)> {
        self.map.iter()
    }
    /// What the hello advertises.
    pub fn infos(&self) -> Vec<ServiceInfo> {
        self.map
            .iter()
            .map(|(n, s)| ServiceInfo {
                name: n.clone(),
                proto: s.proto,
            })
            .collect()
    }

    /// A socket connected to UDP service `name` (one per flow: its replies are the flow's),
    /// or why not in stream-refusal terms.
    pub fn connect_udp(&self, name: &str) -> Result<tokio::net::UdpSocket, (RefuseCode, String)> {
        match self.map.get(name) {
            Some(s) if s.proto == ServiceProto::Udp => crate::sockets::connected_udp(s.addr)
                .map_err(|e| {
                    (
                        RefuseCode::ServiceUnreachable,
                        format!(
                            "cannot open a UDP socket to service {name} at {}: {e}",
                            s.addr
                        ),
                    )
                }),
            Some(_) => Err((
                RefuseCode::NoSuchService,
                format!("service {name} is TCP, not UDP"),
            )),
            None => Err((
                RefuseCode::NoSuchService,
                format!("no UDP service {name} on this device"),
            )),
        }
    }

    /// Connects to TCP service `name`, or says why not in stream-refusal terms. A service on
    /// another host gets TCP keepalive after `keepalive` of silence: one that powered off
    /// while its client idles (an SSH session, IMAP IDLE) would hold the connection until the
    /// client writes. One on this host needs none: its kernel closes what a dead process held.
    pub async fn connect_tcp(
        &self,
        name: &str,
        keepalive: Option<std::time::Duration>,
    ) -> Result<TcpStream, (RefuseCode, String)> {
        let svc = match self.map.get(name) {
            Some(s) if s.proto == ServiceProto::Tcp => s,
            Some(_) => {
                return Err((
                    RefuseCode::NoSuchService,
                    format!("service {name} is UDP, not TCP"),
                ))
            }
            None => {
                return Err((
                    RefuseCode::NoSuchService,
                    format!("no service {name} on this device"),
                ))
            }
        };
        match tokio::time::timeout(LOCAL_CONNECT_TIMEOUT, TcpStream::connect(svc.addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                crate::sockets::bound_unsent_connected(&s);
                if !svc.addr.ip().to_canonical().is_loopback() {
                    crate::sockets::keepalive_connected(&s, keepalive);
                }
                Ok(s)
            }
            Ok(Err(e)) => Err((
                RefuseCode::ServiceUnreachable,
                format!("service {name} at {}: {e}", svc.addr),
            )),
            Err(_) => Err((
                RefuseCode::ServiceUnreachable,
                format!("service {name} at {}: connect timed out", svc.addr),
            )),
        }
    }
}
