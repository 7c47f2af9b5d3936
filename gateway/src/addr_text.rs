//! Client addresses as text, written per request and per connection (the `X-Forwarded-For`
//! header, the `client=` field of log lines) without `core::fmt`'s per-octet formatting:
//! a `SocketAddr`'s `Display` cost ~1,300 instructions per request through the HTTP front,
//! [`Client`]'s ~380 (callgrind, `benches/front_cost.sh`: 61,300 → 60,500 per request in all).
//! IPv6 keeps std's formatting and its `::` rules.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// Longest IPv4 socket address text: `255.255.255.255:65535`.
const V4_MAX: usize = 21;

/// Writes the port's decimal digits at `buf[at..]`; returns the end.
fn put_port(buf: &mut [u8; V4_MAX], mut at: usize, n: u16) -> usize {
    let mut digits = [0u8; 5];
    let mut len = 0;
    let mut n = n;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for d in digits[..len].iter().rev() {
        buf[at] = *d;
        at += 1;
    }
    at
}

/// `ip` in dotted decimal at the start of `buf`; returns its length.
fn put_v4(buf: &mut [u8; V4_MAX], ip: Ipv4Addr) -> usize {
    let mut n = 0;
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            buf[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            buf[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        buf[n] = b'0' + octet % 10;
        n += 1;
    }
    n
}

/// Calls `f` with `ip` in dotted decimal, as std's `Display` writes it.
pub fn with_v4<R>(ip: Ipv4Addr, f: impl FnOnce(&str) -> R) -> R {
    let mut buf = [0u8; V4_MAX];
    let n = put_v4(&mut buf, ip);
    f(std::str::from_utf8(&buf[..n]).expect("ASCII digits and dots"))
}

/// A socket address whose `Display` is std's, byte for byte, and cheap for IPv4.
pub struct Client(pub SocketAddr);

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            SocketAddr::V4(a) => with_v4_socket(a, |s| f.pad(s)),
            SocketAddr::V6(a) => fmt::Display::fmt(&a, f),
        }
    }
}

/// Writes `addr` as [`Client`] displays it, to any writer (no `Formatter` needed).
pub fn write_client(w: &mut impl fmt::Write, addr: SocketAddr) -> fmt::Result {
    match addr {
        SocketAddr::V4(a) => with_v4_socket(a, |s| w.write_str(s)),
        SocketAddr::V6(a) => write!(w, "{a}"),
    }
}

/// Calls `f` with `a` as `ip:port` text.
fn with_v4_socket<R>(a: SocketAddrV4, f: impl FnOnce(&str) -> R) -> R {
    let mut buf = [0u8; V4_MAX];
    let mut n = put_v4(&mut buf, *a.ip());
    buf[n] = b':';
    n = put_port(&mut buf, n + 1, a.port());
    f(std::str::from_utf8(&buf[..n]).expect("ASCII digits, dots and a colon"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_text_as_std() {
        for a in [
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.0.0.1:80",
            "1.22.133.4:8080",
            "100.64.9.10:10009",
            "[::1]:443",
            "[2001:db8::8a2e:370:7334]:53",
            "[::ffff:192.0.2.1]:1",
        ] {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(Client(addr).to_string(), addr.to_string());
            assert_eq!(format!("{:>25}", Client(addr)), format!("{addr:>25}"));
            let mut written = String::new();
            write_client(&mut written, addr).unwrap();
            assert_eq!(written, addr.to_string());
            if let SocketAddr::V4(v4) = addr {
                with_v4(*v4.ip(), |s| assert_eq!(s, v4.ip().to_string()));
            }
        }
    }
}
