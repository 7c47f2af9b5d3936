//! Addresses a device may be dialed at directly: which ones a punching round is told, and the
//! LAN address an agent reports for peers behind the same NAT.
//!
//! Two devices behind one NAT see each other's *observed* address (the NAT's outside), and a
//! packet sent there comes back in only if the NAT hairpins, which many home routers (and all
//! symmetric ones) do not. So each agent tells the gateway the address its socket has on its
//! own network ([`lan_candidate`]); the gateway passes it on only to a peer behind the same
//! public address ([`punch_candidates`]). Only private addresses are passed on (RFC 1918,
//! IPv6 unique local): a device cannot point its peers' packets at a host on the Internet.
//!
//! The same public address is likely, not certain, to mean the same LAN: behind a carrier's
//! NAT, or a gateway behind a proxy that rewrites source addresses, two homes share one, and
//! a peer's packets to the other's LAN address go to whichever host on its own network holds
//! that address — a few QUIC Initials a round (at most one round per 5 s per pair), which the
//! mutual TLS check turns away if that host runs a zone device that is not the peer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use crate::proto::limits::{MAX_LOCAL_ADDRS, MAX_PEER_ADDRS};
use crate::sockets::canonical;

/// Whether a packet can be meant for `addr`: no unspecified, multicast or broadcast address
/// and no port 0. An IPv4-mapped address is judged as the IPv4 address a dual-stack socket
/// sends to.
pub fn dialable(addr: &SocketAddr) -> bool {
    let ip = addr.ip().to_canonical();
    addr.port() != 0
        && !ip.is_unspecified()
        && !ip.is_multicast()
        && !matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

/// Whether `ip` is an address of a private network: IPv4 10/8, 172.16/12, 192.168/16 or IPv6
/// fc00::/7 (an IPv4-mapped address judged as IPv4). Carrier-grade NAT space (100.64/10) is
/// not: it is shared between a carrier's customers.
pub fn is_lan(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.is_private(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// The `LocalAddrs` a device reported, as the gateway keeps them: private ([`is_lan`]) and
/// dialable, canonical, no repeats, at most [`MAX_LOCAL_ADDRS`].
pub fn sanitize_local(addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in addrs.iter().map(|a| canonical(*a)) {
        if dialable(&a) && is_lan(a.ip()) && !out.contains(&a) {
            out.push(a);
        }
    }
    out.truncate(MAX_LOCAL_ADDRS);
    out
}

/// The addresses of a gateway's `PeerAddr` an agent dials: what [`punch_candidates`] can
/// make, and nothing else. Dialable and canonical, no repeats; private ones ([`is_lan`]),
/// and of the others only the last (the peer's observed address; several were a gateway
/// pointing the agent's packets at hosts of its choosing). Loopback only when `gateway` is
/// on loopback too (a zone on one machine), IPv4 link-local (169.254/16) only when it is
/// link-local too (a network without DHCP); IPv6 link-local never (no scope to send it
/// with, and nothing a round makes). LAN ones are not held to rounds between devices behind
/// one NAT (this agent's observed address as the round's last): the agent knows its observed
/// address only from its welcome, and a session migrated since (the home's public address
/// changed) would lose the LAN path the gateway, seeing both at the new address, sends.
pub fn sanitize_peer(addrs: &[SocketAddr], gateway: SocketAddr) -> Vec<SocketAddr> {
    let gateway = gateway.ip().to_canonical();
    let v4_link_local = |ip: IpAddr| matches!(ip, IpAddr::V4(v4) if v4.is_link_local());
    let mut out: Vec<SocketAddr> = Vec::new();
    let mut observed = None;
    for a in addrs.iter().map(|a| canonical(*a)) {
        let ip = a.ip();
        let refused = match ip {
            IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => true,
            _ if ip.is_loopback() => !gateway.is_loopback(),
            _ if v4_link_local(ip) => !v4_link_local(gateway),
            _ => false,
        };
        if !dialable(&a) || refused {
            continue;
        }
        if is_lan(ip) {
            if !out.contains(&a) {
                out.push(a);
            }
        } else {
            observed = Some(a);
        }
    }
    if let Some(a) = observed.filter(|a| !out.contains(a)) {
        out.push(a);
    }
    out
}

/// What the gateway tells a device about `peer` in a punching round: the peer's LAN
/// addresses first when both are behind the same public address (then the NAT's outside is
/// the unlikely path), then its observed address, which always stays in the list (a hairpinning
/// NAT, or LAN addresses that are not the peer's).
pub fn punch_candidates(
    me_observed: SocketAddr,
    peer_observed: SocketAddr,
    peer_local: &[SocketAddr],
) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    if me_observed.ip() == peer_observed.ip() {
        out.extend(
            peer_local
                .iter()
                .copied()
                .filter(|a| *a != peer_observed)
                .take(MAX_PEER_ADDRS - 1),
        );
    }
    out.push(peer_observed);
    out
}

/// This device's address for peers behind the same NAT: the address its QUIC socket is bound
/// to, or (bound to a wildcard) the source address the system picks towards the gateway, with
/// the socket's port. None when that is the observed address (no NAT in between) or is not a
/// private address a peer could dial ([`is_lan`]).
pub fn lan_candidate(
    bound: SocketAddr,
    gateway: SocketAddr,
    observed: SocketAddr,
) -> Option<SocketAddr> {
    let ip = if bound.ip().is_unspecified() {
        route_source(canonical(gateway))?
    } else {
        bound.ip()
    };
    pick(ip, bound.port(), observed)
}

fn pick(ip: IpAddr, port: u16, observed: SocketAddr) -> Option<SocketAddr> {
    let candidate = SocketAddr::new(ip.to_canonical(), port);
    (dialable(&candidate) && is_lan(candidate.ip()) && candidate != canonical(observed))
        .then_some(candidate)
}

/// The source address the system's routing picks for packets to `to`. Connecting a UDP socket
/// sends nothing: it only looks the route up.
fn route_source(to: SocketAddr) -> Option<IpAddr> {
    let any: IpAddr = match to {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let s = UdpSocket::bind(SocketAddr::new(any, 0)).ok()?;
    s.connect(to).ok()?;
    Some(s.local_addr().ok()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn lan_addresses_go_only_to_a_peer_behind_the_same_public_address() {
        let lan = [a("192.168.2.11:4500"), a("[fd00::11]:4500")];
        assert_eq!(
            punch_candidates(a("203.0.113.22:1000"), a("203.0.113.22:2000"), &lan),
            vec![lan[0], lan[1], a("203.0.113.22:2000")]
        );
        assert_eq!(
            punch_candidates(a("203.0.113.21:1000"), a("203.0.113.22:2000"), &lan),
            vec![a("203.0.113.22:2000")]
        );
        // The observed address is never listed twice, and the list fits one PeerAddr.
        let many: Vec<SocketAddr> = (1..=20)
            .map(|i| a(&format!("10.0.0.{i}:4500")))
            .chain([a("203.0.113.22:2000")])
            .collect();
        let c = punch_candidates(a("203.0.113.22:1000"), a("203.0.113.22:2000"), &many);
        assert_eq!(c.len(), MAX_PEER_ADDRS);
        assert_eq!(c.last(), Some(&a("203.0.113.22:2000")));
        assert_eq!(
            c.iter().filter(|x| **x == a("203.0.113.22:2000")).count(),
            1
        );
    }

    /// An agent dials of a `PeerAddr` only what an honest gateway's round holds: LAN
    /// addresses and one other (the last: the peer's observed one), loopback only from a
    /// gateway on loopback, never link-local.
    #[test]
    fn an_agent_dials_only_what_a_round_can_hold() {
        let public_gw = a("198.51.100.1:4433");
        let sent = [
            a("203.0.113.5:4500"),
            a("192.168.2.11:4500"),
            a("127.0.0.1:22"),
            a("169.254.1.1:4500"),
            a("[fe80::1]:4500"),
            a("[::ffff:10.0.0.7]:4500"),
            a("192.168.2.11:4500"),
            a("203.0.113.22:2000"),
        ];
        assert_eq!(
            sanitize_peer(&sent, public_gw),
            vec![
                a("192.168.2.11:4500"),
                a("10.0.0.7:4500"),
                a("203.0.113.22:2000")
            ]
        );
        // A zone on one machine: the peer's observed address is a loopback one.
        assert_eq!(
            sanitize_peer(&[a("127.0.0.1:5000")], a("127.0.0.1:4433")),
            vec![a("127.0.0.1:5000")]
        );
        assert_eq!(
            sanitize_peer(&[a("[::1]:5000")], a("[::ffff:127.0.0.1]:4433")),
            vec![a("[::1]:5000")]
        );
        assert!(sanitize_peer(&[a("127.0.0.1:5000")], public_gw).is_empty());
        // A network without DHCP: IPv4 link-local everywhere, the gateway's too.
        assert_eq!(
            sanitize_peer(&[a("169.254.7.8:5000")], a("169.254.1.1:4433")),
            vec![a("169.254.7.8:5000")]
        );
        // What a round is made of passes whole.
        let round = punch_candidates(
            a("203.0.113.22:1000"),
            a("203.0.113.22:2000"),
            &[a("192.168.2.11:4500"), a("[fd00::11]:4500")],
        );
        assert_eq!(sanitize_peer(&round, public_gw), round);
    }

    #[test]
    fn reported_local_addresses_are_kept_only_when_a_peer_could_dial_them() {
        let got = sanitize_local(&[
            a("203.0.113.99:4500"),
            a("100.64.1.2:4500"),
            a("[2001:db8::1]:4500"),
            a("[fe80::1]:4500"),
            a("127.0.0.1:4500"),
            a("[::1]:4500"),
            a("0.0.0.0:4500"),
            a("192.168.2.11:0"),
            a("224.0.0.1:4500"),
            a("255.255.255.255:4500"),
            a("[::ffff:192.168.2.11]:4500"),
            a("192.168.2.11:4500"),
            a("10.1.1.1:4500"),
            a("10.1.1.2:4500"),
            a("10.1.1.3:4500"),
            a("10.1.1.4:4500"),
            a("[fd00::4]:4500"),
        ]);
        assert_eq!(
            got,
            vec![
                a("192.168.2.11:4500"),
                a("10.1.1.1:4500"),
                a("10.1.1.2:4500"),
                a("10.1.1.3:4500"),
            ]
        );
    }

    #[test]
    fn the_lan_candidate_is_the_socket_address_unless_nothing_translates_it() {
        let observed = a("203.0.113.22:31000");
        assert_eq!(
            pick("192.168.2.11".parse().unwrap(), 4500, observed),
            Some(a("192.168.2.11:4500"))
        );
        // A mapped address is reported as the IPv4 one peers dial.
        assert_eq!(
            pick("::ffff:192.168.2.11".parse().unwrap(), 4500, observed),
            Some(a("192.168.2.11:4500"))
        );
        assert_eq!(
            pick("fd00::11".parse().unwrap(), 4500, observed),
            Some(a("[fd00::11]:4500"))
        );
        // No NAT: the gateway already sees this address; a public one is never reported.
        assert_eq!(
            pick("10.0.0.5".parse().unwrap(), 31000, a("10.0.0.5:31000")),
            None
        );
        assert_eq!(pick("203.0.113.22".parse().unwrap(), 4500, observed), None);
        assert_eq!(pick("100.64.0.9".parse().unwrap(), 4500, observed), None);
        assert_eq!(pick("127.0.0.1".parse().unwrap(), 4500, observed), None);
        assert_eq!(pick("0.0.0.0".parse().unwrap(), 4500, observed), None);
        // A socket bound to one address reports it without a route lookup.
        assert_eq!(
            lan_candidate(a("192.168.2.11:4500"), a("203.0.113.10:4433"), observed),
            Some(a("192.168.2.11:4500"))
        );
        // Bound to a wildcard on a loopback-only route: nothing a peer could use.
        assert_eq!(
            lan_candidate(a("0.0.0.0:4500"), a("127.0.0.1:4433"), a("127.0.0.1:4500")),
            None
        );
    }
}
