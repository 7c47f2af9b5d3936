//! PROXY protocol version 2 headers (HAProxy's `proxy-protocol.txt`, section 2.2): what a tcp
//! app with `proxy_protocol = true` sends its service ahead of the client's bytes, so that the
//! service (nginx `listen ... proxy_protocol`, HAProxy `accept-proxy`, Postfix, Dovecot)
//! learns the client's address and the one it connected to, not the node agent's loopback.
//! Sans-IO: bytes out, and a decoder for tests and the fuzz target.

use std::net::{IpAddr, SocketAddr};

/// The 12 bytes every version 2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY (a relayed connection; LOCAL would be the proxy's own).
const VERSION_PROXY: u8 = 0x21;
/// Address family and protocol: TCP over IPv4, TCP over IPv6.
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;

/// The header for a connection from `client` to `local` (the gateway's address it reached).
/// IPv4-mapped addresses are written as the IPv4 ones they are; a pair of two families
/// (which one TCP connection cannot have) as IPv6.
pub fn encode(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (c, l) = (client.ip().to_canonical(), local.ip().to_canonical());
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION_PROXY);
    match (c, l) {
        (IpAddr::V4(c4), IpAddr::V4(l4)) => {
            out.push(TCP4);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&c4.octets());
            out.extend_from_slice(&l4.octets());
        }
        _ => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(TCP6);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(c).octets());
            out.extend_from_slice(&v6(l).octets());
        }
    }
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&local.port().to_be_bytes());
    out
}

/// Reads a version 2 PROXY header of a TCP connection from the front of `bytes`: the client
/// and local addresses and the header's length; None if `bytes` do not start with a whole
/// one. What a service does with the header; here for tests and the fuzz target.
pub fn decode(bytes: &[u8]) -> Option<(SocketAddr, SocketAddr, usize)> {
    let rest = bytes.strip_prefix(&SIGNATURE)?;
    let (head, rest) = rest.split_first_chunk::<4>()?;
    let [ver_cmd, family, len_hi, len_lo] = *head;
    let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    let body = rest.get(..len)?;
    if ver_cmd != VERSION_PROXY {
        return None;
    }
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    let (client, local) = match family {
        TCP4 if len >= 12 => {
            let (c, l): ([u8; 4], [u8; 4]) =
                (body[0..4].try_into().ok()?, body[4..8].try_into().ok()?);
            (
                SocketAddr::new(IpAddr::from(c), port(8)),
                SocketAddr::new(IpAddr::from(l), port(10)),
            )
        }
        TCP6 if len >= 36 => {
            let (c, l): ([u8; 16], [u8; 16]) =
                (body[0..16].try_into().ok()?, body[16..32].try_into().ok()?);
            (
                SocketAddr::new(IpAddr::from(c), port(32)),
                SocketAddr::new(IpAddr::from(l), port(34)),
            )
        }
        _ => return None,
    };
    Some((client, local, SIGNATURE.len() + 4 + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of the specification's layout, and back.
    #[test]
    fn headers_carry_both_addresses_in_the_layout_services_read() {
        let c: SocketAddr = "203.0.113.7:51234".parse().unwrap();
        let l: SocketAddr = "198.51.100.1:2222".parse().unwrap();
        let h = encode(c, l);
        assert_eq!(
            h,
            [
                &SIGNATURE[..],
                &[0x21, 0x11, 0, 12],
                &[203, 0, 113, 7, 198, 51, 100, 1],
                &51234u16.to_be_bytes(),
                &2222u16.to_be_bytes()
            ]
            .concat()
        );
        assert_eq!(decode(&h), Some((c, l, 28)));
        // A dual-stack socket's IPv4 client: written as IPv4.
        let mapped: SocketAddr = "[::ffff:203.0.113.7]:51234".parse().unwrap();
        let local6: SocketAddr = "[::ffff:198.51.100.1]:2222".parse().unwrap();
        assert_eq!(encode(mapped, local6), h);
        let c6: SocketAddr = "[2001:db8::7]:51234".parse().unwrap();
        let l6: SocketAddr = "[2001:db8::1]:2222".parse().unwrap();
        let h6 = encode(c6, l6);
        assert_eq!(h6.len(), 16 + 36);
        assert_eq!(decode(&h6), Some((c6, l6, 52)));
        // Cut short anywhere: no header.
        for n in 0..h6.len() {
            assert_eq!(decode(&h6[..n]), None, "{n}");
        }
    }
}
