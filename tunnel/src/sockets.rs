//! Binding the gateway's and agent's sockets: on the IPv6 unspecified address (`[::]`) one
//! socket takes IPv4 too — IPV6_V6ONLY set off, not left to `net.ipv6.bindv6only` (1 on some
//! systems, where `[::]` would quietly stop serving IPv4). Any other address binds as usual;
//! [`canonical`] writes an address such a socket saw as the other side wrote it.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// Pending connections a listener queues before accepting. tokio's `TcpListener::bind` (mio)
/// asks for std's 128; a public front takes bursts of new connections, and 1,024 (nginx asks
/// for 511; the kernel caps it at `net.core.somaxconn`, 4,096 by default) keeps a burst's
/// SYNs from being dropped and retried a second later.
const BACKLOG: i32 = 1024;

fn dual_stack(addr: SocketAddr) -> bool {
    addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
}

fn v6_socket(ty: Type, proto: Protocol) -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV6, ty, Some(proto))?;
    s.set_only_v6(false)?;
    Ok(s)
}

/// Makes the connections `listener` accepts probe their other end after `idle` without
/// traffic, then every quarter of that (at least a second); after [`KEEPALIVE_PROBES`]
/// unanswered probes (twice `idle` of silence in all) the kernel gives the connection up: a
/// client that vanished without a FIN or RST (a phone leaving Wi-Fi, a powered-off laptop,
/// a NAT that forgot the mapping) no longer holds its connection and its tunnel stream for
/// ever. Set on the listener, which accepted sockets inherit (Linux, the BSDs): no system
/// call per connection. Errors are ignored: an option the system refuses changes nothing
/// else.
pub fn keepalive_accepted(listener: &tokio::net::TcpListener, idle: Option<std::time::Duration>) {
    if let Some(ka) = idle.map(keepalive_params) {
        let _ = socket2::SockRef::from(listener).set_tcp_keepalive(&ka);
    }
}

/// Unsent bytes a proxied connection's socket holds before a write to it waits
/// (`TCP_NOTSENT_LOWAT`). Unbounded, the kernel's send buffer grows to megabytes (2.6 MB
/// queued for a client reading 33 KB/s on loopback: over a minute of its data) and a waiting
/// write is woken only once a third of it drained: a client reading steadily showed the copy
/// no progress for seconds, and its stream counted as one whose reader stopped
/// ([`crate::holds`]). Bounded, the copy writes on as the client's window opens, and what the
/// client has not read yet waits in the tunnel's flow control, where it is counted.
pub const UNSENT_MOST: u32 = 128 * 1024;

/// Bounds the unsent bytes of the connections `listener` accepts to [`UNSENT_MOST`] (set on
/// the listener, which accepted sockets inherit: no system call per connection).
pub fn bound_unsent_accepted(listener: &tokio::net::TcpListener) {
    let _ = socket2::SockRef::from(listener).set_tcp_notsent_lowat(UNSENT_MOST);
}

/// [`bound_unsent_accepted`] for one connection this side opened.
pub fn bound_unsent_connected(tcp: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_tcp_notsent_lowat(UNSENT_MOST);
}

/// [`keepalive_accepted`] for one connection this side opened (four system calls: only where
/// it is worth them).
pub fn keepalive_connected(tcp: &tokio::net::TcpStream, idle: Option<std::time::Duration>) {
    if let Some(ka) = idle.map(keepalive_params) {
        let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka);
    }
}

fn keepalive_params(idle: std::time::Duration) -> socket2::TcpKeepalive {
    let every = (idle / 4).max(std::time::Duration::from_secs(1));
    let ka = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(every);
    #[cfg(any(target_os = "linux", target_os = "macos", target_os = "freebsd"))]
    let ka = ka.with_retries(KEEPALIVE_PROBES);
    ka
}

/// Unanswered keepalive probes after which a connection is dead ([`keepalive_accepted`]).
pub const KEEPALIVE_PROBES: u32 = 4;

/// A blocking UDP socket bound to `addr`.
pub fn std_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let addr = v4_without_v6(addr);
    if !dual_stack(addr) {
        return std::net::UdpSocket::bind(addr);
    }
    let s = v6_socket(Type::DGRAM, Protocol::UDP)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Whether a connected UDP socket's error is an ICMP report about an earlier datagram that
/// a flow outlives, as a UDP client's socket would: port unreachable (the service is
/// restarting), host or network unreachable (a service on another host of the LAN, for now:
/// its ARP entry failed while it rebooted).
pub fn icmp_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}

/// A UDP socket of the address family of `service`, on an ephemeral port, connected to it:
/// one per flow to a local service, so the service's replies are the flow's. Binding and
/// connecting a UDP socket do no network I/O: callers run this on their loop.
pub fn connected_udp(service: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    let bind: SocketAddr = if service.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = std::net::UdpSocket::bind(bind)?;
    sock.connect(service)?;
    sock.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(sock)
}

/// A public UDP socket that answers each client from the address it sent to: it reads each
/// datagram's destination (IP_PKTINFO / IPV6_PKTINFO, through quinn-udp) and sends replies
/// from it. A socket bound to a wildcard otherwise sends from the address routing picks, and
/// on a machine with several (a floating IP, an IPv6 /64's) the client's NAT or firewall drops
/// the replies as another host's.
#[derive(Debug)]
pub struct ReplySocket {
    sock: tokio::net::UdpSocket,
    /// None where the socket could not be set up for it: replies then leave as routing says.
    state: Option<quinn_udp::UdpSocketState>,
}

/// What one receive of a [`ReplySocket`] got: one datagram, or several of one client
/// coalesced (UDP GRO), `stride` bytes each but the last.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub from: SocketAddr,
    /// The address it was sent to (None when the kernel did not say).
    pub to: Option<std::net::IpAddr>,
    len: usize,
    stride: usize,
}

impl Received {
    /// The datagrams in `buf`, the buffer given to [`ReplySocket::recv`]. An empty datagram
    /// is one (some protocols send them as keepalives), not none.
    pub fn datagrams<'a>(&self, buf: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
        let got = &buf[..self.len.min(buf.len())];
        let stride = if self.stride == 0 {
            got.len()
        } else {
            self.stride
        };
        let empty = got.is_empty().then_some(got);
        got.chunks(stride.max(1)).chain(empty)
    }
}

impl ReplySocket {
    pub fn new(sock: tokio::net::UdpSocket) -> Self {
        let state = match quinn_udp::UdpSocketState::new((&sock).into()) {
            Ok(s) => Some(s),
            Err(error) => {
                tracing::warn!(%error, "cannot read the destination of UDP datagrams: replies leave from the address routing picks");
                None
            }
        };
        // quinn-udp sets "don't fragment, ignore the path MTU" (IP_PMTUDISC_PROBE), right for
        // QUIC, which sizes its own packets; a service's reply is not: one larger than a
        // client's path (behind a VPN) was lost on every retry instead of fragmented. Back
        // to the kernel's default for IPv4 (and IPv4-mapped) replies. (IPv6 keeps
        // IPV6_DONTFRAG, which rustix cannot clear.)
        let v4 = sock
            .local_addr()
            .is_ok_and(|a| a.is_ipv4() || !socket2::SockRef::from(&sock).only_v6().unwrap_or(true));
        if v4 {
            if let Err(error) = rustix::net::sockopt::set_ip_mtu_discover(
                &sock,
                rustix::net::sockopt::Ipv4PathMtuDiscovery::WANT,
            ) {
                tracing::debug!(%error, "UDP replies keep the don't-fragment flag");
            }
        }
        ReplySocket { sock, state }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Waits for datagrams and reads them into `buf` (64 KiB holds any).
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        let Some(state) = &self.state else {
            let (len, from) = self.sock.recv_from(buf).await?;
            return Ok(Received {
                from,
                to: None,
                len,
                stride: len,
            });
        };
        let mut meta = [quinn_udp::RecvMeta::default()];
        loop {
            self.sock.readable().await?;
            let got = self.sock.try_io(tokio::io::Interest::READABLE, || {
                let mut bufs = [io::IoSliceMut::new(buf)];
                state.recv((&self.sock).into(), &mut bufs, &mut meta)
            });
            match got {
                Ok(0) => continue,
                Ok(_) => {
                    let m = &meta[0];
                    return Ok(Received {
                        from: m.addr,
                        to: m.dst_ip,
                        len: m.len,
                        stride: m.stride,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends `data` to `to`, from `from` when given (the address `to` sent to; not one no
    /// packet may come from).
    pub async fn send_to(
        &self,
        data: &[u8],
        to: SocketAddr,
        from: Option<std::net::IpAddr>,
    ) -> io::Result<()> {
        let Some(state) = &self.state else {
            return self.sock.send_to(data, to).await.map(drop);
        };
        let from = from.and_then(usable_source);
        let t = quinn_udp::Transmit {
            destination: to,
            ecn: None,
            contents: data,
            segment_size: None,
            src_ip: from,
        };
        loop {
            self.sock.writable().await?;
            // `try_send`: `send` logs and swallows every error but WouldBlock, and the caller
            // counts what was not sent. (IPv4 replies are fragmented as the path needs, see
            // `new`; IPv6 ones keep don't-fragment: one over the interface's MTU fails here,
            // though the device's datagrams come through a QUIC tunnel, which carries none
            // that large.)
            match self.sock.try_io(tokio::io::Interest::WRITABLE, || {
                state.try_send((&self.sock).into(), &t)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }
}

/// The address a datagram came to, as the source of its reply: not one no packet may come
/// from (one sent to a broadcast or multicast address is answered from the address routing
/// picks).
pub fn usable_source(ip: std::net::IpAddr) -> Option<std::net::IpAddr> {
    let unusable = match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => v4.is_broadcast() || v4.is_multicast() || v4.is_unspecified(),
        std::net::IpAddr::V6(v6) => v6.is_multicast() || v6.is_unspecified(),
    };
    (!unusable).then_some(ip)
}

#[cfg(test)]
mod reply_tests {
    use super::*;

    #[test]
    fn answers_never_leave_from_an_address_no_packet_may_come_from() {
        let usable_source = |ip: Option<std::net::IpAddr>| ip.and_then(usable_source);
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
        assert_eq!(usable_source(ip("203.0.113.10")), ip("203.0.113.10"));
        assert_eq!(usable_source(ip("2001:db8::10")), ip("2001:db8::10"));
        assert_eq!(
            usable_source(ip("::ffff:203.0.113.10")),
            ip("::ffff:203.0.113.10")
        );
        for bad in [
            "255.255.255.255",
            "224.0.0.251",
            "ff02::fb",
            "0.0.0.0",
            "::",
        ] {
            assert_eq!(usable_source(ip(bad)), None, "{bad}");
        }
        assert_eq!(usable_source(None), None);
    }

    /// GRO-coalesced datagrams split by their stride, the last shorter; an empty datagram is
    /// one empty datagram (`chunks` of nothing gave none, and `chunks(0)` panics).
    #[test]
    fn received_datagrams_split_by_stride_and_keep_the_empty_one() {
        let from: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let r = |len, stride| Received {
            from,
            to: None,
            len,
            stride,
        };
        let buf = [1u8, 2, 3, 4, 5, 6, 7];
        let parts: Vec<&[u8]> = r(7, 3).datagrams(&buf).collect();
        assert_eq!(parts, [&[1u8, 2, 3][..], &[4, 5, 6], &[7]]);
        let one: Vec<&[u8]> = r(4, 0).datagrams(&buf).collect();
        assert_eq!(one, [&[1u8, 2, 3, 4][..]]);
        let empty: Vec<&[u8]> = r(0, 0).datagrams(&buf).collect();
        assert_eq!(empty, [&[0u8; 0][..]]);
    }
}

/// A UDP socket bound to `addr`, for tokio.
pub fn udp(addr: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    let s = std_udp(addr)?;
    s.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(s)
}

/// A TCP listener on `addr`, for tokio (SO_REUSEADDR as `TcpListener::bind`; [`BACKLOG`]).
pub fn tcp(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::from_std(std_tcp(addr)?)
}

/// [`tcp`] before it is handed to tokio (no runtime needed).
pub fn std_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = tcp_bound(addr)?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

/// A TCP socket bound as [`tcp`] binds, not listening: what a policy reload tries before
/// it takes a new address (a conflict shows at the bind; listening would take connections).
pub fn tcp_bound(addr: SocketAddr) -> io::Result<Socket> {
    let addr = v4_without_v6(addr);
    let s = if dual_stack(addr) {
        v6_socket(Type::STREAM, Protocol::TCP)?
    } else {
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?
    };
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// Whether this machine can bind dual-stack IPv6 sockets (the kernel may have IPv6 off
/// entirely): then the defaults are `[::]`, else `0.0.0.0`. Tried, not guessed: the same
/// kind of bind as the real one.
pub fn ipv6_available() -> bool {
    // Asked for each default address and the agent's socket at start: tried once.
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let any = SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0));
        v6_socket(Type::DGRAM, Protocol::UDP)
            .and_then(|s| s.bind(&any.into()))
            .is_ok()
    })
}

/// `addr`, but `0.0.0.0:port` for `[::]:port` on a machine without IPv6 (booted with
/// `ipv6.disable=1`): "every address" is every IPv4 one there. A policy's `[::]` app (the
/// shipped examples use it) failed to bind at every poll, for good.
fn v4_without_v6(addr: SocketAddr) -> SocketAddr {
    match dual_stack(addr) && !ipv6_available() {
        true => SocketAddr::from(([0, 0, 0, 0], addr.port())),
        false => addr,
    }
}

/// `[::]:port` where IPv6 is available (IPv4 and IPv6 on one socket), else `0.0.0.0:port`.
pub fn any_addr(port: u16) -> SocketAddr {
    v4_without_v6(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
}

/// The next connection on `listener`, or `None` once `stop` fires. An accept that fails (out
/// of file descriptors, typically) is logged and retried after a pause instead of spinning.
/// The peer's address is [`canonical`]: an IPv4 client of a dual-stack listener logged as
/// `[::ffff:a.b.c.d]` on some lines and as itself on others.
pub async fn accept_until(
    listener: &tokio::net::TcpListener,
    stop: &tokio_util::sync::CancellationToken,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    // Failures in a row: out of file descriptors, every try fails until one closes, and a
    // line each 50 ms would flood the log. The 1st, 2nd, 4th, 8th ... are said.
    let mut failures: u64 = 0;
    loop {
        // Biased: once stopped, connections still waiting in the backlog are not taken (an
        // unbiased pick took one about every other turn, to be served through the drain).
        tokio::select! {
            biased;
            _ = stop.cancelled() => return None,
            r = listener.accept() => match r {
                Ok((tcp, peer)) => return Some((tcp, canonical(peer))),
                Err(e) => {
                    failures += 1;
                    if failures.is_power_of_two() {
                        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
                        tracing::warn!(%addr, error = %e, failures, "accept failed");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// The address as the other side wrote it: an IPv4 peer seen on a dual-stack socket arrives
/// as `[::ffff:a.b.c.d]`, which logs badly and which an IPv4-only socket cannot dial.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An IPv4 client of an IPv6 socket (as a `[::]` listener takes them) is told by its IPv4
    /// address.
    #[tokio::test]
    async fn accepted_ipv4_clients_of_an_ipv6_socket_read_as_ipv4() {
        // The IPv4 loopback seen through an IPv6 socket: loopback only, unlike `[::]`.
        let l = match std::net::TcpListener::bind("[::ffff:127.0.0.1]:0") {
            Ok(l) => l,
            Err(e) => {
                eprintln!("SKIPPED accepted_ipv4_clients_of_an_ipv6_socket_read_as_ipv4: no IPv6 socket here ({e})");
                return;
            }
        };
        l.set_nonblocking(true).unwrap();
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        let port = l.local_addr().unwrap().port();
        let _c = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let (_, peer) = accept_until(&l, &stop).await.unwrap();
        assert_eq!(peer.ip(), std::net::IpAddr::from([127, 0, 0, 1]));
    }

    fn has_v6_loopback() -> bool {
        std::net::UdpSocket::bind("[::1]:0").is_ok()
    }

    /// Whether `test` can run (an IPv6 loopback here); says it is skipped otherwise, on fd 2
    /// (libtest captures `eprintln!` of passing tests), or fails where
    /// `ZONEGATE_REQUIRE_TOOLS=1` (CI: nothing may skip there).
    fn v6_or_skip(test: &str) -> bool {
        if has_v6_loopback() {
            return true;
        }
        assert!(
            std::env::var("ZONEGATE_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "ZONEGATE_REQUIRE_TOOLS=1 but {test} cannot run: no ::1 here"
        );
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "\n!!!!! SKIPPED (no ::1 here): {test} !!!!!\n"
        );
        false
    }

    /// A `[::]` listener takes connections to 127.0.0.1 and to ::1, whatever the sysctl says.
    #[tokio::test]
    async fn an_unspecified_v6_tcp_listener_takes_both_families() {
        if !v6_or_skip("an_unspecified_v6_tcp_listener_takes_both_families") {
            return;
        }
        let l = tcp("[::]:0".parse().unwrap()).unwrap();
        // Set, not inherited from net.ipv6.bindv6only.
        assert!(!socket2::SockRef::from(&l).only_v6().unwrap());
        let port = l.local_addr().unwrap().port();
        for to in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
            let mut c = tokio::net::TcpStream::connect(&to).await.unwrap();
            let (mut s, from) = l.accept().await.unwrap();
            c.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            assert_eq!(&b, b"x");
            let from = canonical(from);
            assert_eq!(
                from.ip().is_ipv4(),
                to.starts_with("127"),
                "{to} came from {from}"
            );
        }
    }

    /// A service's replies may be fragmented on their way to a client behind a smaller path
    /// (IPv4): quinn-udp's "don't fragment, ignore the path MTU" is undone on the reply
    /// socket, which it set for QUIC's own packets.
    #[tokio::test]
    async fn reply_sockets_leave_ipv4_fragmentation_to_the_kernel() {
        use rustix::net::sockopt::{ip_mtu_discover, Ipv4PathMtuDiscovery};
        let mut binds = vec!["127.0.0.1:0"];
        if v6_or_skip("reply_sockets_leave_ipv4_fragmentation_to_the_kernel (its IPv6 half)") {
            binds.push("[::]:0");
        }
        for bind in binds {
            let reply = ReplySocket::new(udp(bind.parse().unwrap()).unwrap());
            assert_eq!(
                ip_mtu_discover(&reply.sock).unwrap(),
                Ipv4PathMtuDiscovery::WANT,
                "{bind}"
            );
        }
        // What quinn-udp left it at, for the record: the test sees a change.
        let raw = udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let _state = quinn_udp::UdpSocketState::new((&raw).into()).unwrap();
        assert_ne!(ip_mtu_discover(&raw).unwrap(), Ipv4PathMtuDiscovery::WANT);
    }

    #[tokio::test]
    async fn an_unspecified_v6_udp_socket_takes_both_families() {
        if !v6_or_skip("an_unspecified_v6_udp_socket_takes_both_families") {
            return;
        }
        let s = udp("[::]:0".parse().unwrap()).unwrap();
        assert!(!socket2::SockRef::from(&s).only_v6().unwrap());
        let port = s.local_addr().unwrap().port();
        for (from, to) in [
            ("127.0.0.1:0", format!("127.0.0.1:{port}")),
            ("[::1]:0", format!("[::1]:{port}")),
        ] {
            let c = tokio::net::UdpSocket::bind(from).await.unwrap();
            c.send_to(b"hi", &to).await.unwrap();
            let mut b = [0u8; 8];
            let wait = std::time::Duration::from_secs(5);
            let (n, _) = tokio::time::timeout(wait, s.recv_from(&mut b))
                .await
                .expect("the datagram arrives")
                .unwrap();
            assert_eq!(&b[..n], b"hi");
        }
    }

    #[test]
    fn other_addresses_bind_as_usual() {
        let s = std_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(s.local_addr().unwrap().is_ipv4());
        let any = any_addr(80);
        assert_eq!(any.port(), 80);
        assert!(any.ip().is_unspecified());
    }
}
