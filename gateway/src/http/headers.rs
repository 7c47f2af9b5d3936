//! Header rewriting at the edge: hop-by-hop headers are removed in both directions (RFC 9110
//! §7.6.1), an upgrade handshake keeps exactly `Connection: upgrade` + `Upgrade`, and the
//! `X-Forwarded-*` headers tell the service who asked.
//!
//! The gateway is the zone's edge, so `X-Forwarded-*` sent by a client are not trusted: they
//! are replaced, never appended to, and a service can believe what it reads.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::addr_text;

/// Headers that describe one hop, never forwarded (with `Proxy-Authenticate` on answers, and
/// whatever `Connection` names).
pub const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];
pub const PROXY_AUTHENTICATE: HeaderName = header::PROXY_AUTHENTICATE;

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The protocol a token asks to upgrade to, if `headers` ask for an upgrade (`Connection`
/// lists `upgrade` and `Upgrade` is present).
pub fn upgrade_requested(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants = connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"));
    wants
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers (the fixed list and every header `Connection` names). With
/// `upgrade`, the handshake headers are put back as `Connection: upgrade` and `Upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: Option<&HeaderValue>) {
    // Most requests carry none of them: one pass over the few names present is cheaper than
    // ten hashed removals (~3% of the gateway's instructions per proxied request, callgrind).
    // Headers that `Connection` names only count when `Connection` is there, which is listed.
    if headers.keys().any(is_hop_by_hop) {
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for n in named.iter().chain(HOP_BY_HOP.iter()) {
            headers.remove(n);
        }
        headers.remove(PROXY_AUTHENTICATE);
    }
    if let Some(proto) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto.clone());
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == PROXY_AUTHENTICATE || HOP_BY_HOP.contains(name)
}

/// Sets `X-Forwarded-For` (the client address), `-Proto` (`http`/`https`) and `-Host` (the
/// host the client asked for), replacing whatever the client sent. `Host` becomes `host`
/// too, the one the request was routed by: an absolute-form or HTTP/2 request may carry a
/// `Host` that says otherwise (RFC 9112 §3.2.2: a proxy replaces it), and a service choosing
/// its virtual host by that would serve an app the policy never decided on.
pub fn set_forwarded(headers: &mut HeaderMap, client: IpAddr, https: bool, host: &str) {
    if let Some(v) = ip_value(client) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if https { "https" } else { "http" }),
    );
    match HeaderValue::from_str(host) {
        Ok(v) => {
            headers.insert(header::HOST, v.clone());
            headers.insert(X_FORWARDED_HOST, v);
        }
        Err(_) => {
            headers.remove(X_FORWARDED_HOST);
        }
    }
}

/// `ip` as a header value (IPv4, most clients, without `core::fmt`: see [`addr_text`]).
fn ip_value(ip: IpAddr) -> Option<HeaderValue> {
    match ip {
        IpAddr::V4(v4) => addr_text::with_v4(v4, |s| HeaderValue::from_str(s).ok()),
        IpAddr::V6(_) => HeaderValue::from_str(&ip.to_string()).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_fixed_and_connection_named_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("upgrade", "websocket"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut h, None);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn each_hop_by_hop_header_alone_is_stripped() {
        let mut names = HOP_BY_HOP.to_vec();
        names.push(PROXY_AUTHENTICATE);
        for name in &names {
            let mut h = map(&[("accept", "*/*"), (name.as_str(), "x")]);
            strip_hop_by_hop(&mut h, None);
            assert!(!h.contains_key(name), "{name} kept");
            assert_eq!(h.len(), 1, "{h:?}");
        }
        let mut h = map(&[("accept", "*/*"), ("x-custom", "1")]);
        strip_hop_by_hop(&mut h, None);
        assert_eq!(h.len(), 2, "end-to-end headers stay");
    }

    #[test]
    fn upgrade_keeps_only_the_handshake() {
        let mut h = map(&[
            ("connection", "Upgrade, keep-alive"),
            ("upgrade", "websocket"),
            ("keep-alive", "1"),
            ("sec-websocket-key", "abc"),
        ]);
        let up = upgrade_requested(&h);
        assert_eq!(up.as_ref().unwrap(), "websocket");
        strip_hop_by_hop(&mut h, up.as_ref());
        assert_eq!(h.get("connection").unwrap(), "upgrade");
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert!(h.contains_key("sec-websocket-key"));
        assert!(!h.contains_key("keep-alive"));
        // `Upgrade` without `Connection: upgrade` is no upgrade request.
        assert!(upgrade_requested(&map(&[("upgrade", "websocket")])).is_none());
    }

    #[test]
    fn forwarded_headers_replace_client_values() {
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "gopher"),
        ]);
        set_forwarded(&mut h, "192.0.2.7".parse().unwrap(), true, "alice.example");
        assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h.get(X_FORWARDED_FOR).unwrap(), "192.0.2.7");
        assert_eq!(h.get(X_FORWARDED_PROTO).unwrap(), "https");
        assert_eq!(h.get(X_FORWARDED_HOST).unwrap(), "alice.example");
        assert_eq!(h.get(header::HOST).unwrap(), "alice.example");
    }

    #[test]
    fn client_addresses_are_written_as_std_writes_them() {
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.0.1",
            "192.0.2.7",
            "100.64.9.99",
            "1.20.100.0",
            "::1",
            "2001:db8::7",
            "::ffff:192.0.2.7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_value(ip).unwrap(), ip.to_string().as_str());
        }
    }

    #[test]
    fn host_is_the_routed_one() {
        // `GET http://alice.example/ HTTP/1.1` with `Host: admin.alice.example`: routed by
        // the URI, so the service must not see the other host.
        let mut h = map(&[("host", "admin.alice.example"), ("host", "alice.example")]);
        set_forwarded(&mut h, "192.0.2.7".parse().unwrap(), false, "alice.example");
        assert_eq!(h.get_all(header::HOST).iter().count(), 1);
        assert_eq!(h.get(header::HOST).unwrap(), "alice.example");
    }
}
