//! Open public connections per client address, capped: one address holding every slot of the
//! HTTP front's [`crate::http::MAX_CONNECTIONS`] (keep-alive connections with a request every few
//! seconds cost it almost nothing), or every tunnel stream to a device through a `tcp` app,
//! locked every other client out.
//!
//! IPv6 clients count per /64 (one host commonly has a whole /64 to pick addresses from), and
//! per /48 together with [`SITE_FACTOR`] times the limit.
//!
//! A table with a total can make room when it is full ([`PerIp::making_room`]): see
//! [`crate::make_room`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::{info, warn};
use tunnel::log_budget::LogBudget;

use crate::make_room::Held;

/// An IPv6 site (/48) may hold this many times the per-client limit, all its /64s together: a
/// home or a VPS often has a whole /48 or /56 (65,536 or 256 /64s), and one of them could
/// otherwise take a whole front, 1,024 connections per /64 at a time.
pub const SITE_FACTOR: usize = 4;

/// A full table making room admits a client at once, before the connection it picked has
/// ended: up to a sixteenth of the total (at least one) more than the total, while picked
/// ones close.
pub const ROOM_SLACK: usize = 16;
/// How long the client found holding the most is taken as that without looking again, and
/// for at most how many connections picked from it: a look goes through every client, and a
/// flood of new clients would make one each; the count bounds what is taken from one client
/// once another holds as many.
const HOG_LOOK_EVERY: Duration = Duration::from_millis(10);
const HOG_PICKS: u32 = 16;

/// `ip` masked to its first `bits` bits (IPv6).
fn prefix(ip: std::net::Ipv6Addr, bits: u32) -> IpAddr {
    IpAddr::V6((u128::from(ip) & !(u128::MAX >> bits)).into())
}

/// The keys a client's connections count under: its address (IPv6: its /64), and for IPv6
/// its /48.
pub(crate) fn keys(ip: IpAddr) -> (IpAddr, Option<IpAddr>) {
    match ip.to_canonical() {
        IpAddr::V6(v6) => (prefix(v6, 64), Some(prefix(v6, 48))),
        v4 => (v4, None),
    }
}

/// Counts of open connections by client (address, or /64 for IPv6) and by IPv6 site (/48).
#[derive(Debug)]
pub struct PerIp {
    /// Per client; changes with [`PerIp::set_limit`].
    limit: std::sync::atomic::AtomicUsize,
    /// All clients together, if capped ([`PerIp::with_total`]).
    total: Option<usize>,
    /// What is counted ("HTTP connections", …) and the gateway.toml key that sets the
    /// limit, for the log lines.
    what: &'static str,
    setting: &'static str,
    /// Which table this is, for the log lines when there are several of a kind (a udp app's
    /// listen address): [`PerIp::set_label`].
    label: std::sync::OnceLock<String>,
    /// When full, ends idle connections of the client holding the most for others ([`Held`]).
    room: bool,
    open: Mutex<Tables>,
}

/// Lines a second a table logs about clients reaching and leaving their limit: each client's
/// run is told once, but forged sources, each a client of its own, would make a line each.
const LINES_PER_SECOND: u32 = 10;

#[derive(Debug)]
struct Tables {
    /// Budget of the per-client lines ([`LINES_PER_SECOND`]).
    lines: LogBudget,
    clients: HashMap<IpAddr, Count>,
    sites: HashMap<IpAddr, Count>,
    all: Count,
    /// The last look for the client holding the most: when it was made, its key (the
    /// fairness key: [`fair_key`]), and the connections picked from it since.
    hog: Option<(Instant, Option<IpAddr>, u32)>,
}

/// Why [`PerIp::try_admit`] gave no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The client (or its IPv6 site) has its limit open: refused, logged.
    Client,
    /// All clients together have the total, in a table that makes room: the caller decides
    /// first whether the connection would be served at all, then asks
    /// [`PerIp::admit_making_room`]. Not logged yet.
    Total,
}

/// Whether [`PerIp::admit_inner`] may end another client's connection at the total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AtTotal {
    Refuse,
    Defer,
    MakeRoom,
}

/// What fairness counts a client's connections under when a table makes room: an IPv4
/// address, an IPv6 /48 (a /48 has 65,536 /64s: one connection from each of thousands would
/// otherwise count as thousands of clients holding one, none of them "the most").
fn fair_key(key: IpAddr, site: Option<IpAddr>) -> IpAddr {
    site.unwrap_or(key)
}

#[derive(Debug, Default)]
struct Count {
    open: usize,
    /// Connections refused since it reached its limit: the first refusal is logged, and the
    /// return to half the limit, not every refusal (or slot freed) of a flood.
    refused: u64,
    /// Its open connections, in a table making room.
    held: Vec<Arc<Held>>,
    /// Of those, picked to make room and not closed yet.
    evicting: usize,
}

/// What a table's per-client lines say about it.
struct Said<'a> {
    what: &'a str,
    setting: &'a str,
    label: &'a str,
}

impl Count {
    /// Counts a refusal; logs the first of a run (within the table's line budget).
    fn refuse(
        &mut self,
        key: IpAddr,
        limit: usize,
        counted: &str,
        said: &Said<'_>,
        lines: &mut LogBudget,
    ) {
        self.refused += 1;
        if self.refused == 1 {
            if let Some(unlogged) = lines.take() {
                let Said {
                    what,
                    setting,
                    label,
                } = said;
                info!(client = %key, limit, what = counted, table = %label, unlogged, "client at its limit of open {what}: refusing more until some close (a shared address that needs more: raise {setting} in gateway.toml)");
            }
        }
    }

    /// Counts a refusal at the total of all clients; logs the first of a run.
    fn refuse_all(&mut self, total: usize, what: &str) {
        self.refused += 1;
        if self.refused == 1 {
            warn!(total, "all clients together at the gateway's limit of open {what}: refusing more until some close");
        }
    }

    /// Open connections not picked to make room.
    fn staying(&self) -> usize {
        self.open.saturating_sub(self.evicting)
    }

    /// Uncounts a connection; true when nothing is left open.
    fn release(
        &mut self,
        key: IpAddr,
        limit: usize,
        counted: &str,
        said: &Said<'_>,
        lines: &mut LogBudget,
    ) -> bool {
        self.open = self.open.saturating_sub(1);
        if self.refused > 0 && self.open <= limit / 2 {
            if let Some(unlogged) = lines.take() {
                let Said { what, label, .. } = said;
                info!(client = %key, refused = self.refused, what = counted, table = %label, unlogged, "client well under its limit of open {what} again");
            }
            self.refused = 0;
        }
        self.open == 0
    }
}

/// One counted connection; dropping it uncounts it.
#[derive(Debug)]
pub struct IpSlot {
    table: Arc<PerIp>,
    key: IpAddr,
    site: Option<IpAddr>,
    /// In a table making room: its activity and the signal that ends it.
    held: Option<Arc<Held>>,
}

impl IpSlot {
    /// The connection's activity clock and eviction signal, in a table making room: its
    /// owner stamps it as bytes move ([`crate::make_room::Stamped`]) and ends the connection
    /// when it is evicted.
    pub fn held(&self) -> Option<&Arc<Held>> {
        self.held.as_ref()
    }
}

impl PerIp {
    /// At least one connection per client: with 0 every refusal would leave an entry behind.
    /// `what` names the connections in log lines ("HTTP connections"), `setting` the
    /// gateway.toml key that sets `limit`.
    pub fn new(limit: usize, what: &'static str, setting: &'static str) -> Arc<Self> {
        Self::build(limit, None, false, what, setting)
    }

    /// As [`PerIp::new`], and at most `total` connections of all clients together.
    pub fn with_total(
        limit: usize,
        total: usize,
        what: &'static str,
        setting: &'static str,
    ) -> Arc<Self> {
        Self::build(limit, Some(total), false, what, setting)
    }

    /// As [`PerIp::with_total`]; when all clients together have the total, a client holding
    /// fewer than the one holding the most gets in by ending that one's longest-idle
    /// connection ([`IpSlot::held`], [`PerIp::admit_making_room`]).
    pub fn making_room(
        limit: usize,
        total: usize,
        what: &'static str,
        setting: &'static str,
    ) -> Arc<Self> {
        Self::build(limit, Some(total), true, what, setting)
    }

    fn build(
        limit: usize,
        total: Option<usize>,
        room: bool,
        what: &'static str,
        setting: &'static str,
    ) -> Arc<Self> {
        Arc::new(PerIp {
            limit: std::sync::atomic::AtomicUsize::new(limit.max(1)),
            total: total.map(|t| t.max(1)),
            what,
            setting,
            label: std::sync::OnceLock::new(),
            room,
            open: Mutex::new(Tables {
                lines: LogBudget::new(LINES_PER_SECOND),
                clients: HashMap::new(),
                sites: HashMap::new(),
                all: Count::default(),
                hog: None,
            }),
        })
    }

    /// Names this table in its log lines (once; later calls change nothing).
    pub fn set_label(&self, label: String) {
        let _ = self.label.set(label);
    }

    fn said(&self) -> Said<'_> {
        Said {
            what: self.what,
            setting: self.setting,
            label: self.label.get().map_or(self.setting, String::as_str),
        }
    }

    fn limit(&self) -> usize {
        self.limit.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Changes the limit per client (at least one) for the connections admitted from now on;
    /// those open stay.
    pub fn set_limit(&self, limit: usize) {
        self.limit
            .store(limit.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    fn site_limit(&self) -> usize {
        self.limit().saturating_mul(SITE_FACTOR)
    }

    /// Whether `ip` itself (its address, or its IPv6 /64) has its limit open: what refused it
    /// then was that limit, not its /48's.
    pub fn client_full(&self, ip: IpAddr) -> bool {
        let (key, _) = keys(ip);
        let limit = self.limit();
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clients
            .get(&key)
            .is_some_and(|c| c.open >= limit)
    }

    /// A slot for a new connection from `ip`, or `None` when it (or its IPv6 site) has its
    /// limit open already, or all clients together have the total.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        self.admit_inner(ip, AtTotal::Refuse).ok()
    }

    /// As [`PerIp::admit`], but in a table that makes room, the total reached is left for the
    /// caller to decide ([`Full::Total`]): a connection the policy or a rate limit would
    /// refuse must not end someone else's.
    pub fn try_admit(self: &Arc<Self>, ip: IpAddr) -> Result<IpSlot, Full> {
        let at_total = if self.room {
            AtTotal::Defer
        } else {
            AtTotal::Refuse
        };
        self.admit_inner(ip, at_total)
    }

    /// A slot for a connection [`PerIp::try_admit`] left at [`Full::Total`], now decided to be
    /// served: room is made if that is fair (the longest-idle connection of the client
    /// holding the most, if it holds at least two more than `ip`), else `None`.
    pub fn admit_making_room(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        self.admit_inner(ip, AtTotal::MakeRoom).ok()
    }

    fn admit_inner(self: &Arc<Self>, ip: IpAddr, at_total: AtTotal) -> Result<IpSlot, Full> {
        let (key, site) = keys(ip);
        let mut guard = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let t = &mut *guard;
        let limit = self.limit();
        let said = self.said();
        if let Some(c) = t.clients.get_mut(&key).filter(|c| c.open >= limit) {
            c.refuse(key, limit, "address", &said, &mut t.lines);
            return Err(Full::Client);
        }
        if let Some(site) = site {
            let site_limit = self.site_limit();
            if let Some(s) = t.sites.get_mut(&site).filter(|s| s.open >= site_limit) {
                s.refuse(site, site_limit, "IPv6 /48", &said, &mut t.lines);
                return Err(Full::Client);
            }
        }
        if let Some(total) = self.total.filter(|total| t.all.open >= *total) {
            match at_total {
                AtTotal::Defer => return Err(Full::Total),
                AtTotal::MakeRoom if t.make_room(fair_key(key, site), total) => {}
                AtTotal::MakeRoom | AtTotal::Refuse => {
                    t.all.refuse_all(total, self.what);
                    return Err(Full::Total);
                }
            }
        }
        let held = self.room.then(Held::new);
        if let Some(site) = site {
            t.sites.entry(site).or_default().open += 1;
        }
        t.clients.entry(key).or_default().open += 1;
        if let (Some(h), Some(c)) = (&held, t.fair_mut(key, site)) {
            c.held.push(h.clone());
        }
        t.all.open += 1;
        Ok(IpSlot {
            table: self.clone(),
            key,
            site,
            held,
        })
    }

    /// Clients (and IPv6 sites) with a connection open now.
    #[cfg(test)]
    fn clients(&self) -> usize {
        let t = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        t.clients.len() + t.sites.len()
    }
}

impl Tables {
    /// The count fairness keeps a client's connections in ([`fair_key`]): its address's for
    /// IPv4, its /48's for IPv6.
    fn fair_mut(&mut self, key: IpAddr, site: Option<IpAddr>) -> Option<&mut Count> {
        match site {
            Some(s) => self.sites.get_mut(&s),
            None => self.clients.get_mut(&key),
        }
    }

    fn fair(&self, fair: IpAddr) -> Option<&Count> {
        if fair.is_ipv6() {
            self.sites.get(&fair)
        } else {
            self.clients.get(&fair)
        }
    }

    /// In a full table: picks the longest-idle connection of the client holding the most
    /// (counted by [`fair_key`], not counting connections picked before), if it holds more
    /// than one more than `mine` (the newcomer's fairness key), and signals it to end. False
    /// when there is nothing fair to take, or too many picked connections have not closed yet.
    fn make_room(&mut self, mine: IpAddr, total: usize) -> bool {
        if self.all.open >= total.saturating_add((total / ROOM_SLACK).max(1)) {
            return false;
        }
        let mine = self.fair(mine).map_or(0, Count::staying);
        let Some(hog) = self.hog(Instant::now()) else {
            return false;
        };
        let c = if hog.is_ipv6() {
            self.sites.get_mut(&hog)
        } else {
            self.clients.get_mut(&hog)
        };
        let Some(c) = c else {
            return false;
        };
        if c.staying() <= mine + 1 {
            return false;
        }
        // Idlest first among connections with no request in flight: a long poll waiting for
        // its answer is quiet, not idle, and goes only when every other has.
        let victim = c
            .held
            .iter()
            .filter(|h| !h.is_evicted())
            .max_by_key(|h| (h.is_between_requests(), h.quiet_for()));
        if !victim.is_some_and(|v| v.evict()) {
            return false;
        }
        c.evicting += 1;
        if let Some((_, _, picks)) = &mut self.hog {
            *picks += 1;
        }
        true
    }

    /// The client (by [`fair_key`]) holding the most connections not picked to make room:
    /// looked for again after [`HOG_LOOK_EVERY`] or [`HOG_PICKS`] connections picked from it
    /// (or when it has closed them all).
    fn hog(&mut self, now: Instant) -> Option<IpAddr> {
        if let Some((at, found, picks)) = self.hog {
            let still = found.is_none_or(|k| self.fair(k).is_some());
            if now.duration_since(at) < HOG_LOOK_EVERY && picks < HOG_PICKS && still {
                return found;
            }
        }
        // IPv6 clients (/64s) count by their site.
        let v4 = self.clients.iter().filter(|(k, _)| k.is_ipv4());
        let found = v4
            .chain(self.sites.iter())
            .max_by_key(|(_, c)| c.staying())
            .map(|(k, _)| *k);
        self.hog = Some((now, found, 0));
        found
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let limit = self.table.limit();
        let what = self.table.what;
        let said = self.table.said();
        let site_limit = self.table.site_limit();
        let mut guard = self
            .table
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let t = &mut *guard;
        if let Some(h) = self.held.take() {
            if let Some(c) = t.fair_mut(self.key, self.site) {
                if let Some(i) = c.held.iter().position(|x| Arc::ptr_eq(x, &h)) {
                    c.held.swap_remove(i);
                }
                if h.is_evicted() {
                    c.evicting = c.evicting.saturating_sub(1);
                }
            }
        }
        // Forgotten at zero: the tables hold clients with open connections only.
        if t.clients
            .get_mut(&self.key)
            .is_some_and(|c| c.release(self.key, limit, "address", &said, &mut t.lines))
        {
            t.clients.remove(&self.key);
        }
        if let Some(site) = self.site {
            if t.sites
                .get_mut(&site)
                .is_some_and(|s| s.release(site, site_limit, "IPv6 /48", &said, &mut t.lines))
            {
                t.sites.remove(&site);
            }
        }
        if let Some(total) = self.table.total {
            t.all.open = t.all.open.saturating_sub(1);
            if t.all.refused > 0 && t.all.open <= total / 2 {
                info!(
                    refused = t.all.refused,
                    "open {what} well under the gateway's limit again"
                );
                t.all.refused = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which limit refused a client: its own (address or /64), or only its /48's.
    #[test]
    fn a_client_at_its_own_limit_is_told_from_one_at_its_sites() {
        let t = PerIp::new(1, "test connections", "test_setting");
        let a: IpAddr = "2001:db8:1:1::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        assert!(!t.client_full(a));
        let _a = t.admit(a).unwrap();
        assert!(t.client_full(a), "its /64 has its one");
        assert!(
            t.client_full("2001:db8:1:1::2".parse().unwrap()),
            "the same /64"
        );
        assert!(!t.client_full(b), "another /64 of the site");
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let _v4 = t.admit(v4).unwrap();
        assert!(t.client_full(v4));
        assert!(!t.client_full("192.0.2.2".parse().unwrap()));
    }

    #[test]
    fn each_client_gets_the_limit_and_slots_come_back() {
        let t = PerIp::new(2, "test connections", "test_setting");
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
        // A lowered limit holds for what comes next; open slots stay.
        let held: Vec<_> = (0..2).map(|_| t.admit(a).unwrap()).collect();
        t.set_limit(1);
        assert!(t.admit(a).is_none());
        drop(held);
        let one = t.admit(a).expect("under the lowered limit");
        assert!(t.admit(a).is_none(), "past the lowered limit");
        drop(one);
        assert_eq!(t.clients(), 0);
    }

    /// With a total, many addresses together stop at it, and its slots come back too.
    #[test]
    fn all_clients_together_stop_at_the_total() {
        let t = PerIp::with_total(2, 5, "test connections", "test_setting");
        let mut held: Vec<IpSlot> = (1..=5)
            .map(|i| t.admit(format!("192.0.2.{i}").parse().unwrap()).unwrap())
            .collect();
        assert!(
            t.admit("192.0.2.9".parse().unwrap()).is_none(),
            "past the total"
        );
        held.pop();
        assert!(
            t.admit("192.0.2.9".parse().unwrap()).is_some(),
            "a slot came back"
        );
    }

    fn ip(i: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0xc000_0200 + i))
    }

    /// A full table making room ends the longest-idle connection of the client holding the
    /// most, and only for a client holding at least two fewer.
    #[test]
    fn a_full_table_making_room_ends_the_longest_idle_connection_of_the_biggest_holder() {
        let t = PerIp::making_room(8, 8, "test connections", "test_setting");
        let mut hog: Vec<IpSlot> = (0..6)
            .map(|_| t.admit_making_room(ip(1)).unwrap())
            .collect();
        let small: Vec<IpSlot> = (0..2)
            .map(|_| t.admit_making_room(ip(2)).unwrap())
            .collect();
        // All but the fourth of the big holder's connections move bytes later than it.
        std::thread::sleep(Duration::from_millis(5));
        for (i, s) in hog.iter().enumerate() {
            if i != 3 {
                s.held().unwrap().touch();
            }
        }
        let newcomer = t
            .admit_making_room(ip(3))
            .expect("room made for a client holding nothing");
        assert!(newcomer.held().is_some());
        let evicted: Vec<usize> = (0..hog.len())
            .filter(|&i| hog[i].held().unwrap().is_evicted())
            .collect();
        assert_eq!(evicted, vec![3], "the big holder's longest-idle connection");
        assert!(small.iter().all(|s| !s.held().unwrap().is_evicted()));
        // The picked one closes; the table is at its total again.
        hog.remove(3);
        // The small holder already holds two: the big one (5) holds more than one more.
        let again = t.admit_making_room(ip(2)).expect("room made again");
        assert_eq!(
            hog.iter()
                .filter(|s| s.held().unwrap().is_evicted())
                .count(),
            1
        );
        drop(again);
    }

    #[test]
    fn a_full_table_takes_nothing_from_clients_holding_as_few() {
        let t = PerIp::making_room(8, 4, "test connections", "test_setting");
        let held: Vec<IpSlot> = (0..4)
            .map(|i| t.admit_making_room(ip(i)).unwrap())
            .collect();
        assert!(
            t.admit_making_room(ip(9)).is_none(),
            "everyone holds one: nothing fair to take"
        );
        let _more = (t.admit_making_room(ip(0)), t.admit_making_room(ip(0)));
        assert!(
            held.iter().all(|s| !s.held().unwrap().is_evicted()),
            "nothing taken"
        );
    }

    #[test]
    fn a_client_at_its_own_limit_takes_no_room() {
        let t = PerIp::making_room(2, 4, "test connections", "test_setting");
        let _a: Vec<IpSlot> = (0..2)
            .map(|_| t.admit_making_room(ip(1)).unwrap())
            .collect();
        let b: Vec<IpSlot> = (0..2)
            .map(|_| t.admit_making_room(ip(2)).unwrap())
            .collect();
        assert!(t.admit_making_room(ip(2)).is_none(), "at its own limit");
        assert!(b.iter().all(|s| !s.held().unwrap().is_evicted()));
        assert!(_a.iter().all(|s| !s.held().unwrap().is_evicted()));
    }

    /// Picked connections that do not close stop the making of more room past a sixteenth
    /// of the total.
    #[test]
    fn room_is_made_ahead_of_closes_only_up_to_a_slack() {
        let t = PerIp::making_room(64, 32, "test connections", "test_setting");
        let hog: Vec<IpSlot> = (0..32)
            .map(|_| t.admit_making_room(ip(1)).unwrap())
            .collect();
        let newcomers: Vec<IpSlot> = (10..20)
            .filter_map(|i| t.admit_making_room(ip(i)))
            .collect();
        assert_eq!(newcomers.len(), 2, "32 / 16 admitted ahead of closes");
        assert_eq!(
            hog.iter()
                .filter(|s| s.held().unwrap().is_evicted())
                .count(),
            2
        );
        drop(hog);
        assert_eq!(t.clients(), newcomers.len());
    }

    /// Only a connection decided to be served makes room: `try_admit` defers at the total.
    #[test]
    fn try_admit_leaves_the_total_to_the_caller() {
        let t = PerIp::making_room(8, 2, "test connections", "test_setting");
        let held: Vec<IpSlot> = (0..2).map(|_| t.try_admit(ip(1)).unwrap()).collect();
        assert_eq!(t.try_admit(ip(2)).err(), Some(Full::Total));
        assert!(
            held.iter().all(|s| !s.held().unwrap().is_evicted()),
            "nothing taken"
        );
        assert!(t.admit_making_room(ip(2)).is_some());
        assert_eq!(
            held.iter()
                .filter(|s| s.held().unwrap().is_evicted())
                .count(),
            1
        );
    }

    /// IPv6 clients count by their /48 for fairness: one connection from each of many /64s of
    /// one site is that site holding many.
    #[test]
    fn an_ipv6_site_spread_over_its_64s_is_one_big_holder() {
        let t = PerIp::making_room(8, 8, "test connections", "test_setting");
        let site: Vec<IpSlot> = (0..8u16)
            .map(|n| {
                let a: IpAddr = format!("2001:db8:5:{n:x}::1").parse().unwrap();
                t.admit_making_room(a).unwrap()
            })
            .collect();
        assert!(t.admit_making_room(ip(1)).is_some(), "room from the /48");
        assert_eq!(
            site.iter()
                .filter(|s| s.held().unwrap().is_evicted())
                .count(),
            1
        );
    }

    #[test]
    fn an_ipv6_site_gets_four_times_the_limit_across_its_64s() {
        let t = PerIp::new(2, "test connections", "test_setting");
        let mut held = Vec::new();
        for net in 0..4 {
            for host in 1..=2 {
                let ip = format!("2001:db8:7:{net}::{host}").parse().unwrap();
                held.push(t.admit(ip).expect("within the /64's and the /48's limits"));
            }
        }
        assert!(
            t.admit("2001:db8:7:9::1".parse().unwrap()).is_none(),
            "a fifth /64 of the /48"
        );
        assert!(
            t.admit("2001:db8:8::1".parse().unwrap()).is_some(),
            "another /48"
        );
        held.pop();
        assert!(t.admit("2001:db8:7:9::1".parse().unwrap()).is_some());
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let t = PerIp::new(1, "test connections", "test_setting");
        let _s = t.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(t.admit("2001:db8:1:2:ffff::9".parse().unwrap()).is_none());
        assert!(t.admit("2001:db8:1:3::1".parse().unwrap()).is_some());
        let _v4 = t.admit("192.0.2.1".parse().unwrap()).unwrap();
        assert!(t.admit("::ffff:192.0.2.1".parse().unwrap()).is_none());
    }
}
