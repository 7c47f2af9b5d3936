//! Fuzzes the PROXY protocol v2 header a tcp app with `proxy_protocol = true` writes ahead of
//! a client's bytes, which its service (nginx, HAProxy, Postfix) believes for the client's
//! address: every pair of addresses the input picks (either family, IPv4-mapped included)
//! encodes to a header that decodes back to the same pair, canonical, and to its own length;
//! and the decoder never panics on arbitrary bytes, whatever it decodes re-encoding to a
//! header of the same addresses.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use gateway::proxy_header::{decode, encode};
use libfuzzer_sys::fuzz_target;

/// An address from `b` (at least 19 bytes): its first byte picks IPv4, IPv4-mapped IPv6 or
/// IPv6.
fn addr(b: &[u8]) -> SocketAddr {
    let port = u16::from_be_bytes([b[1], b[2]]);
    let v4 = Ipv4Addr::new(b[3], b[4], b[5], b[6]);
    let ip = match b[0] % 3 {
        0 => IpAddr::V4(v4),
        1 => IpAddr::V6(v4.to_ipv6_mapped()),
        _ => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&b[3..19]);
            IpAddr::V6(Ipv6Addr::from(o))
        }
    };
    SocketAddr::new(ip, port)
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fuzz_target!(|data: &[u8]| {
    let same = |a: (SocketAddr, SocketAddr), b: (SocketAddr, SocketAddr)| {
        (canonical(a.0), canonical(a.1)) == (canonical(b.0), canonical(b.1))
    };
    if let Some((c, l, n)) = decode(data) {
        assert!(n <= data.len());
        let again = encode(c, l);
        let (c2, l2, n2) = decode(&again).expect("an encoded header decodes");
        assert!(same((c2, l2), (c, l)) && n2 == again.len());
    }
    if data.len() < 38 {
        return;
    }
    let (client, local) = (addr(&data[..19]), addr(&data[19..38]));
    let header = encode(client, local);
    let (c, l, n) = decode(&header).expect("an encoded header decodes");
    assert_eq!(n, header.len());
    assert!(same((c, l), (client, local)), "{client} {local} -> {c} {l}");
    // Two IPv4 addresses (mapped or not) are written as IPv4: read back as IPv4 exactly.
    if client.ip().to_canonical().is_ipv4() && local.ip().to_canonical().is_ipv4() {
        assert_eq!((c, l), (canonical(client), canonical(local)));
    }
});
