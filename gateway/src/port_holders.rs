//! Which other program holds a port on this machine: the sockets `/proc/net/{tcp,tcp6,udp,udp6}`
//! lists bound to it, less this process's own (`/proc/self/fd`). For an app listener that
//! replaces one of ours on an overlapping address (`203.0.113.5:P` becoming `0.0.0.0:P`): that
//! port cannot be tried while ours holds it, and a program listening on `127.0.0.1:P` made the
//! wildcard's bind fail only after the swap, the app down under an edit already serving.
//! Linux only; elsewhere nothing is found. The table parsing is sans-IO.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::listeners::Kind;

/// One socket of a table: its local address and its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub local: SocketAddr,
    pub inode: u64,
}

/// TCP state LISTEN in the tables: only a listening socket keeps another from listening
/// (the app listeners set `SO_REUSEADDR`, which lets them bind beside connections).
const TCP_LISTEN: &str = "0A";

/// The sockets of one table's text (`/proc/net/tcp` or `tcp6`, `udp` or `udp6`) that a new
/// listener of `kind` could clash with: listening TCP ones, every UDP one. Lines that do not
/// parse are skipped.
pub fn parse_table(text: &str, kind: Kind) -> Vec<Bound> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
            if kind == Kind::Tcp && *state != TCP_LISTEN {
                return None;
            }
            Some(Bound {
                local: parse_addr(local)?,
                inode: inode.parse().ok()?,
            })
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): each 32-bit word as the kernel
/// holds it, in this machine's byte order; the port in hex.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(ip.get(8 * i..8 * i + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[4 * i..4 * i + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip.to_canonical(), port))
}

/// The first socket of `bound` not among `ours` whose address a listener on `addr` would
/// clash with. One that overlaps an address we listen on now (`beside`) is not counted: it
/// lives beside ours, so the overlap rule is wrong for it — an IPv6-only `[::]:22` (sshd
/// sets `IPV6_V6ONLY`, which the tables do not show) beside our `0.0.0.0:22`.
pub fn clash(
    bound: &[Bound],
    ours: &HashSet<u64>,
    addr: SocketAddr,
    beside: &[SocketAddr],
) -> Option<SocketAddr> {
    use policies::units::listens_overlap;
    bound
        .iter()
        .filter(|b| !ours.contains(&b.inode))
        .map(|b| b.local)
        // Only for the other family: a program's `[::]:P` that lives beside our `0.0.0.0:P`
        // is IPv6-only, and clashes with exactly the IPv6 addresses.
        .filter(|l| {
            l.is_ipv4() == addr.is_ipv4() || !beside.iter().any(|o| listens_overlap(*l, *o))
        })
        // A table's IPv4-mapped address is the IPv4 one (parse_addr), so a dual-stack
        // `[::]:P` meets a program's `127.0.0.1:P` as listens_overlap says.
        .find(|l| listens_overlap(*l, addr))
}

/// Another program's socket on this machine that a new `kind` listener on `addr` would clash
/// with, if one can be seen (`None` where `/proc` cannot be read); `beside`: the addresses
/// this process listens on now (see [`clash`]).
pub fn foreign_clash(kind: Kind, addr: SocketAddr, beside: &[SocketAddr]) -> Option<SocketAddr> {
    let files: [&str; 2] = match kind {
        Kind::Tcp => ["/proc/net/tcp", "/proc/net/tcp6"],
        Kind::Udp => ["/proc/net/udp", "/proc/net/udp6"],
    };
    let bound: Vec<Bound> = files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| parse_table(&t, kind))
        .filter(|b| b.local.port() == addr.port())
        .collect();
    if bound.is_empty() {
        return None;
    }
    clash(&bound, &own_socket_inodes(), addr, beside)
}

/// The inodes of this process's sockets (`socket:[N]` links in `/proc/self/fd`).
fn own_socket_inodes() -> HashSet<u64> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return HashSet::new();
    };
    dir.filter_map(|e| {
        let link = std::fs::read_link(e.ok()?.path()).ok()?;
        let s = link.to_str()?;
        s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's own lines (x86-64, little-endian words): a listener on 127.0.0.1:8080, a
    /// connection from it (not listening), and IPv6 ones on [::]:53 and [::1]:8080.
    #[test]
    fn tables_parse_as_the_kernel_writes_them() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 0 10 -1\n";
        let got = parse_table(tcp, Kind::Tcp);
        if cfg!(target_endian = "little") {
            assert_eq!(
                got,
                [Bound {
                    local: "127.0.0.1:8080".parse().unwrap(),
                    inode: 4242
                }]
            );
        }
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000 100 0 0 10 0\n   1: 0000000000000000FFFF00000100007F:0035 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 78 1 0000000000000000 100 0 0 10 0\n";
        let got = parse_table(tcp6, Kind::Tcp);
        if cfg!(target_endian = "little") {
            assert_eq!(got[0].local, "[::1]:8080".parse().unwrap());
            // IPv4-mapped, as the IPv4 address it is.
            assert_eq!(got[1].local, "127.0.0.1:53".parse().unwrap());
        }
        let udp = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n  1: 3500007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   991        0 99 2 0000000000000000 0\n";
        let got = parse_table(udp, Kind::Udp);
        if cfg!(target_endian = "little") {
            assert_eq!(got[0].local, "127.0.0.53:53".parse().unwrap());
        }
        assert!(parse_table("header\n garbage line\n", Kind::Udp).is_empty());
    }

    /// A wildcard clashes with a program's specific address on its port, and of its family
    /// ([::] with both); ours are not the program's.
    #[test]
    fn a_wildcard_clashes_with_another_programs_address_on_its_port() {
        let b = |a: &str, inode| Bound {
            local: a.parse().unwrap(),
            inode,
        };
        let bound = [b("127.0.0.53:53", 1), b("203.0.113.5:53", 2)];
        let ours: HashSet<u64> = [2].into();
        let at = |a: &str| a.parse::<SocketAddr>().unwrap();
        assert_eq!(
            clash(&bound, &ours, at("0.0.0.0:53"), &[]),
            Some(at("127.0.0.53:53"))
        );
        assert_eq!(
            clash(&bound, &ours, at("[::]:53"), &[]),
            Some(at("127.0.0.53:53"))
        );
        assert_eq!(clash(&bound, &ours, at("198.51.100.1:53"), &[]), None);
        assert_eq!(clash(&bound, &ours, at("[2001:db8::1]:53"), &[]), None);
        assert_eq!(clash(&bound, &[1, 2].into(), at("0.0.0.0:53"), &[]), None);
        // A program's IPv6-only `[::]:22` beside our `0.0.0.0:22`: the overlap rule is wrong
        // for it, and narrowing ours to one address is no clash.
        let sshd = [b("[::]:22", 7)];
        let none = HashSet::new();
        let to = at("203.0.113.5:22");
        assert_eq!(clash(&sshd, &none, to, &[at("0.0.0.0:22")]), None);
        assert_eq!(clash(&sshd, &none, to, &[]), Some(at("[::]:22")));
        // But moving ours to IPv6 meets it.
        for to in [at("[::]:22"), at("[2001:db8::1]:22")] {
            assert_eq!(
                clash(&sshd, &none, to, &[at("0.0.0.0:22")]),
                Some(at("[::]:22"))
            );
        }
    }

    /// The real tables: a socket of this process is found and known as its own; one of
    /// another process would be told (this test cannot make one without a child).
    #[test]
    fn this_process_s_own_listener_is_not_another_programs() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let wildcard = SocketAddr::from(([0, 0, 0, 0], port));
        if std::fs::metadata("/proc/net/tcp").is_ok() {
            let bound: Vec<Bound> = parse_table(
                &std::fs::read_to_string("/proc/net/tcp").unwrap(),
                Kind::Tcp,
            );
            assert!(
                bound.iter().any(|b| b.local == l.local_addr().unwrap()),
                "our listener is not in /proc/net/tcp"
            );
            assert_eq!(
                clash(&bound, &HashSet::new(), wildcard, &[]),
                Some(l.local_addr().unwrap())
            );
        }
        assert_eq!(foreign_clash(Kind::Tcp, wildcard, &[]), None);
    }
}
