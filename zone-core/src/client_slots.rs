//! Open things (connections, handshakes) of a service's clients, capped per client and per
//! site: a client is an IPv4 address or an IPv6 /64 (one host commonly has a whole /64 to
//! pick addresses from); a site is an IPv4 /24 or an IPv6 /48 (65,536 /64s), whose clients
//! count together too, so neither one host nor one network rented by the block can take every
//! slot of a service. The table holds only clients with something open.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

/// (masked address, prefix length): a /48 and a /64 whose last 16 bits are zero mask to the
/// same address.
type Key = (IpAddr, u8);

/// Counts of open things per client and per IPv6 site. Cheap to clone (shared table).
#[derive(Debug, Clone)]
pub struct ClientSlots {
    per_client: usize,
    per_site: usize,
    counts: Arc<Mutex<HashMap<Key, usize>>>,
}

/// Which limit a client is at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// Its own (an IPv4 address, an IPv6 /64).
    Client,
    /// Its site's (an IPv4 /24, an IPv6 /48), which its neighbours may have taken.
    Site,
}

/// One open thing of a client; dropping it uncounts it.
#[derive(Debug)]
pub struct ClientSlot {
    client: Key,
    site: Option<Key>,
    counts: Arc<Mutex<HashMap<Key, usize>>>,
}

impl ClientSlots {
    /// At most `per_client` open per client and `per_site` per site (IPv4 /24, IPv6 /48; each
    /// at least one: a zero would leave an entry per client that is never removed).
    pub fn new(per_client: usize, per_site: usize) -> Self {
        ClientSlots {
            per_client: per_client.max(1),
            per_site: per_site.max(1),
            counts: Arc::default(),
        }
    }

    /// A slot for `ip`, or `None` when its client or its site is at its limit.
    pub fn take(&self, ip: IpAddr) -> Option<ClientSlot> {
        self.take_or_why(ip).ok()
    }

    /// A slot for `ip`, or which limit it is at (its client's first).
    pub fn take_or_why(&self, ip: IpAddr) -> Result<ClientSlot, Full> {
        let (client, site) = match ip.to_canonical() {
            IpAddr::V6(v6) => ((masked(v6, 64), 64), Some((masked(v6, 48), 48))),
            IpAddr::V4(v4) => ((IpAddr::V4(v4), 32), Some((site_of(ip), 24))),
        };
        let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let full = |key: &Key, limit: usize| m.get(key).is_some_and(|n| *n >= limit);
        if full(&client, self.per_client) {
            return Err(Full::Client);
        }
        if site.is_some_and(|s| full(&s, self.per_site)) {
            return Err(Full::Site);
        }
        for key in std::iter::once(client).chain(site) {
            *m.entry(key).or_insert(0) += 1;
        }
        Ok(ClientSlot {
            client,
            site,
            counts: self.counts.clone(),
        })
    }

    /// Clients and sites with something open.
    pub fn tracked(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        for key in std::iter::once(self.client).chain(self.site) {
            if let Some(n) = m.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&key);
                }
            }
        }
    }
}

/// The client `ip` counts as: itself for IPv4, its IPv6 /64.
pub fn client_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => masked(v6, 64),
        v4 => v4,
    }
}

/// The site `ip` counts in: its IPv4 /24, its IPv6 /48.
pub fn site_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => masked(v6, 48),
        IpAddr::V4(v4) => IpAddr::V4(std::net::Ipv4Addr::from(u32::from(v4) & 0xffff_ff00)),
    }
}

/// `v6` masked to its first `bits` bits.
fn masked(v6: Ipv6Addr, bits: u32) -> IpAddr {
    IpAddr::V6((u128::from(v6) & !(u128::MAX >> bits)).into())
}
