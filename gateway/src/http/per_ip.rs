//! Open front connections per client address, capped: one address holding every one of the
//! front's [`super::MAX_CONNECTIONS`] slots (keep-alive connections with a request every few
//! seconds cost it almost nothing) locked every other client out.
//!
//! IPv6 clients count per /64: one host commonly has a whole /64 to pick addresses from.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tracing::info;

/// The key a client's connections count under.
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

/// Counts of open connections by client (address, or /64 for IPv6).
#[derive(Debug)]
pub struct PerIp {
    limit: usize,
    open: Mutex<HashMap<IpAddr, Client>>,
}

#[derive(Debug, Default)]
struct Client {
    open: usize,
    /// Connections refused since it reached the limit: its first refusal and its return
    /// under the limit are logged, not every refusal of a flood.
    refused: u64,
}

/// One counted connection; dropping it uncounts it.
#[derive(Debug)]
pub struct IpSlot {
    table: Arc<PerIp>,
    key: IpAddr,
}

impl PerIp {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(PerIp {
            limit,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a new connection from `ip`, or `None` when it has `limit` open already.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let key = key(ip);
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let c = open.entry(key).or_default();
        if c.open >= self.limit {
            c.refused += 1;
            if c.refused == 1 {
                info!(client = %key, limit = self.limit, "client at its limit of open HTTP connections: refusing more until some close");
            }
            return None;
        }
        c.open += 1;
        Some(IpSlot {
            table: self.clone(),
            key,
        })
    }

    /// Clients with a connection open now.
    pub fn clients(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self
            .table
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = open.get_mut(&self.key) {
            c.open -= 1;
            if c.refused > 0 {
                info!(client = %self.key, refused = c.refused, "client under its limit of open HTTP connections again");
                c.refused = 0;
            }
            // Forgotten at zero: the table holds clients with open connections only.
            if c.open == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_gets_the_limit_and_slots_come_back() {
        let t = PerIp::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = t.admit(a).unwrap();
        let s2 = t.admit(a).unwrap();
        assert!(t.admit(a).is_none(), "a third from the same address");
        assert!(t.admit(a).is_none());
        assert!(t.admit(b).is_some(), "another address is not affected");
        drop(s1);
        let s3 = t.admit(a).expect("a slot came back");
        drop((s2, s3));
        assert_eq!(t.clients(), 0, "a client without connections is forgotten");
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let t = PerIp::new(1);
        let _s = t.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(t.admit("2001:db8:1:2:ffff::9".parse().unwrap()).is_none());
        assert!(t.admit("2001:db8:1:3::1".parse().unwrap()).is_some());
        let _v4 = t.admit("192.0.2.1".parse().unwrap()).unwrap();
        assert!(t.admit("::ffff:192.0.2.1".parse().unwrap()).is_none());
    }
}
