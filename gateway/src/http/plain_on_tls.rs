//! A plain HTTP request sent to the HTTPS port (`http://host:8443/`, a missing `s`): answered
//! in HTTP, 400 with the https:// address to use, as nginx does. The TLS handshake's answer to
//! it was a raw alert, which a browser shows as "invalid response" and curl as a wrong version
//! number — neither says which port speaks what.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::body::{self, ProxyBody};

/// The first byte of every TLS connection: a handshake record (RFC 8446 §5.1).
const TLS_HANDSHAKE: u8 = 0x16;

/// Whether a connection to the HTTPS port whose first byte is `first` opens with a plain
/// HTTP/1 request rather than TLS: request methods are tokens, in practice upper-case letters
/// (`GET`, `POST`, `PRI` of HTTP/2's preface). Anything else goes to the TLS handshake, which
/// refuses what is not TLS as it did.
pub fn starts_plain_http(first: u8) -> bool {
    first != TLS_HANDSHAKE && first.is_ascii_uppercase()
}

/// The https:// address of a request that came as plain HTTP to the HTTPS port listening on
/// `port`: its host as the client wrote it (with the port it dialled, this one, when it wrote
/// one), and its path. None without a host that is a valid `host[:port]`: nothing trustworthy
/// to echo.
pub fn https_address(host: Option<&str>, path_and_query: &str, port: u16) -> Option<String> {
    let authority: http::uri::Authority = host?.parse().ok()?;
    if authority.as_str().contains('@') {
        return None;
    }
    // Written without a port, the client dialled 80 (forwarded here, say, by a NAT rule):
    // the port this listener has is then the best guess for HTTPS.
    let host = match (authority.port_u16(), port) {
        (Some(_), _) | (None, 443) => authority.as_str().to_owned(),
        (None, p) => format!("{}:{p}", authority.host()),
    };
    let path = if path_and_query.starts_with('/') {
        path_and_query
    } else {
        "/"
    };
    Some(format!("https://{host}{path}"))
}

/// The answer to a plain HTTP request on the HTTPS port: 400, text that says so and where to
/// go, the address in `Location` too (not followed on a 400; tools show it).
pub fn answer(address: Option<&str>) -> Response<ProxyBody> {
    let text = match address {
        Some(a) => format!(
            "400 bad request: this port speaks HTTPS and the request came as plain HTTP; use {a}\n"
        ),
        None => "400 bad request: this port speaks HTTPS and the request came as plain HTTP; use https:// in the address\n".to_owned(),
    };
    let mut r = Response::new(body::full(Bytes::from(text)));
    *r.status_mut() = StatusCode::BAD_REQUEST;
    let h = r.headers_mut();
    super::errors::plain_text_headers(h);
    if let Some(v) = address.and_then(|a| HeaderValue::from_str(a).ok()) {
        h.insert(header::LOCATION, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_and_http_openings_are_told_apart() {
        assert!(!starts_plain_http(0x16));
        for m in ["GET", "POST", "HEAD", "PRI", "OPTIONS"] {
            assert!(starts_plain_http(m.as_bytes()[0]), "{m}");
        }
        // Not a request: left to the TLS handshake to refuse.
        for b in [0u8, b'\r', b'g', 0x80, 0x15, 0x17] {
            assert!(!starts_plain_http(b), "{b:#x}");
        }
    }

    #[test]
    fn the_https_address_keeps_host_port_and_path() {
        let a = |h, p, port| https_address(h, p, port);
        assert_eq!(
            a(Some("alice.example:8443"), "/a/b?c=1", 8443).as_deref(),
            Some("https://alice.example:8443/a/b?c=1")
        );
        // No port written: dialled 80, forwarded here; 443 needs none.
        assert_eq!(
            a(Some("alice.example"), "/", 443).as_deref(),
            Some("https://alice.example/")
        );
        assert_eq!(
            a(Some("alice.example"), "/x", 8443).as_deref(),
            Some("https://alice.example:8443/x")
        );
        assert_eq!(
            a(Some("[::1]"), "/", 8443).as_deref(),
            Some("https://[::1]:8443/")
        );
        assert_eq!(
            a(Some("127.0.0.1:9443"), "*", 9443).as_deref(),
            Some("https://127.0.0.1:9443/")
        );
        // Nothing to trust: no host, not a host, credentials.
        assert_eq!(a(None, "/", 8443), None);
        assert_eq!(a(Some("a b"), "/", 8443), None);
        assert_eq!(a(Some("evil@alice.example"), "/", 8443), None);
        assert_eq!(a(Some(""), "/", 8443), None);
    }

    #[test]
    fn the_answer_is_a_400_that_names_the_address() {
        let r = answer(Some("https://alice.example:8443/x"));
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            r.headers()[header::LOCATION],
            "https://alice.example:8443/x"
        );
        assert_eq!(r.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        let r = answer(None);
        assert!(r.headers().get(header::LOCATION).is_none());
    }
}
