//! Header rewriting at the edge: hop-by-hop headers are removed in both directions (RFC 9110
//! §7.6.1; answers as they are parsed, in `h1.rs`), an upgrade handshake keeps exactly
//! `Connection: upgrade` + `Upgrade`, and the `X-Forwarded-*` headers tell the service who
//! asked.
//!
//! The gateway is the zone's edge, so `X-Forwarded-*` sent by a client are not trusted: they
//! are replaced, never appended to, and a service can believe what it reads. Other headers
//! through which frameworks learn the client's address, scheme or host (`Forwarded`,
//! `X-Real-IP`, …: [`CLIENT_CLAIMS`]) are dropped, so a service that prefers them falls back
//! to the gateway's `X-Forwarded-*` instead of believing the client.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::addr_text;

/// Headers that describe one hop, never forwarded (with `Proxy-Authenticate` on answers, and
/// whatever `Connection` names). `HTTP2-Settings` belongs to an `h2c` upgrade, which is never
/// passed on ([`upgrade_requested`]). A `static`, not a `const`: a const array is built and
/// dropped at every use, i.e. for every header of every request (callgrind: ~1,100
/// instructions per request for the two lists here).
pub static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("http2-settings"),
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

/// Request headers by which a client could claim another address, scheme, host or prefix to
/// a service that reads them (chi's `RealIP`, Spring's and Quarkus' `Forwarded` support, …);
/// dropped on the way up.
pub static CLIENT_CLAIMS: [HeaderName; 57] = [
    header::FORWARDED,
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("cf-connecting-ip"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-ssl"),
    HeaderName::from_static("x-forwarded-scheme"),
    // Scheme claims some frameworks prefer to `X-Forwarded-Proto` (Tornado's `xheaders`
    // reads `X-Scheme` first): a plain-http request could pass as https.
    HeaderName::from_static("x-scheme"),
    HeaderName::from_static("x-url-scheme"),
    HeaderName::from_static("x-forwarded-protocol"),
    HeaderName::from_static("front-end-https"),
    HeaderName::from_static("client-ip"),
    HeaderName::from_static("x-cluster-client-ip"),
    // Client-address headers of CDNs and platforms, and the forms of `X-Forwarded-For`
    // libraries read as well (Express' proxy-addr, ipware, request-ip list them).
    HeaderName::from_static("fastly-client-ip"),
    HeaderName::from_static("x-proxyuser-ip"),
    HeaderName::from_static("x-forwarded"),
    HeaderName::from_static("forwarded-for"),
    HeaderName::from_static("x-original-forwarded-for"),
    HeaderName::from_static("x-envoy-external-address"),
    HeaderName::from_static("x-appengine-user-ip"),
    // Host and URL claims (the host a framework builds absolute links and redirects from).
    HeaderName::from_static("x-host"),
    HeaderName::from_static("x-original-host"),
    HeaderName::from_static("x-forwarded-server"),
    HeaderName::from_static("x-forwarded-uri"),
    // The URL a front proxy rewrote from (IIS, older Symfony and Zend route by them): only
    // a proxy sets them, and this one never does, so a client's would bypass path rules.
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-original-uri"),
    // Address claims of other stacks (Apache's, IIS', PHP frameworks').
    HeaderName::from_static("x-remote-addr"),
    HeaderName::from_static("remote-addr"),
    HeaderName::from_static("x-remote-ip"),
    // A TLS client certificate's or verification's claim, which front proxies terminating
    // mutual TLS set (Envoy, IIS ARR, nginx setups): this gateway asks for no client
    // certificate, so a client's would pass as verified.
    HeaderName::from_static("x-forwarded-client-cert"),
    HeaderName::from_static("x-arr-ssl"),
    HeaderName::from_static("x-arr-clientcert"),
    HeaderName::from_static("ssl-client-verify"),
    HeaderName::from_static("x-ssl-client-verify"),
    HeaderName::from_static("ssl-client-cert"),
    HeaderName::from_static("x-ssl-client-cert"),
    HeaderName::from_static("x-client-cert"),
    // The signed-in user an authenticating proxy in front tells its service (Grafana's
    // auth.proxy, Authelia's, oauth2-proxy's): a service set to trust them from loopback —
    // every request reaches it from the node agent there — would take a client's word for
    // who it is.
    HeaderName::from_static("remote-user"),
    HeaderName::from_static("remote-groups"),
    HeaderName::from_static("remote-email"),
    HeaderName::from_static("remote-name"),
    HeaderName::from_static("x-remote-user"),
    HeaderName::from_static("x-webauth-user"),
    HeaderName::from_static("x-forwarded-user"),
    HeaderName::from_static("x-forwarded-email"),
    HeaderName::from_static("x-forwarded-groups"),
    HeaderName::from_static("x-forwarded-preferred-username"),
    HeaderName::from_static("x-forwarded-access-token"),
    HeaderName::from_static("x-auth-request-user"),
    HeaderName::from_static("x-auth-request-email"),
    HeaderName::from_static("x-auth-request-groups"),
    HeaderName::from_static("x-auth-request-preferred-username"),
    HeaderName::from_static("x-auth-request-access-token"),
    // httpoxy (CVE-2016-5385): CGI-style servers hand `Proxy` to the app as `HTTP_PROXY`,
    // which HTTP client libraries take as their outbound proxy: a client's value would send
    // the service's own outbound requests, credentials included, through the client's proxy.
    HeaderName::from_static("proxy"),
];

/// The methods a request's method overrides ask a framework to run it as: every value of
/// every `X-HTTP-Method-Override`, `X-HTTP-Method` and `X-Method-Override` header (also spelt
/// with `_`; comma-separated lists split), and `_method` in the query (Rails, Laravel and
/// Symfony read it for POSTs; in a form body it is the service's to check), uppercased as
/// frameworks compare them.
pub fn method_overrides(headers: &HeaderMap, query: Option<&str>) -> Vec<String> {
    let named = |n: &str, want: &str| {
        n.len() == want.len()
            && n.bytes()
                .zip(want.bytes())
                .all(|(a, b)| a == b || (a == b'_' && b == b'-'))
    };
    let mut out = Vec::new();
    for (name, value) in headers {
        let n = name.as_str();
        if [
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
        ]
        .iter()
        .any(|w| named(n, w))
        {
            // A value that is not text is a method no app names.
            let text = value.to_str().unwrap_or("?");
            out.extend(text.split(',').map(|m| m.trim().to_ascii_uppercase()));
        }
    }
    for pair in query.unwrap_or("").split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        // As PHP names query parameters for the frameworks that read `_method`: decoded,
        // leading spaces dropped, `.`, ` ` and `[` made `_` (`%5Fmethod`, `.method`).
        let name = form_decode(name);
        let name: String = name
            .trim_start_matches(' ')
            .chars()
            .map(|c| if matches!(c, '.' | ' ' | '[') { '_' } else { c })
            .collect();
        if name == "_method" {
            out.push(form_decode(value).trim().to_ascii_uppercase());
        }
    }
    // An empty value is no override (frameworks ignore it). Each method once: every one is
    // decided against the policy, and 14,000 copies of an allowed one in a 64 KiB head were
    // 14,000 decisions (a full path normalization each) before the rate limit.
    out.retain(|m| !m.is_empty());
    out.sort_unstable();
    out.dedup();
    out
}

/// `s` as a form field decodes: `+` a space, `%XX` its byte (invalid escapes kept as they
/// are, bytes that are not UTF-8 replaced).
fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The protocol a token asks to upgrade to, if `headers` ask for an upgrade (`Connection`
/// lists `upgrade` and `Upgrade` is present).
///
/// An upgrade to `h2c` (cleartext HTTP/2, RFC 7540 §3.2) is no upgrade here: after a `101`
/// the connection carries HTTP/2 requests straight to the service, past the app's methods,
/// paths, rate and body limits, which were checked for the upgrade request only. The request
/// goes up as an ordinary one (`Upgrade` and `HTTP2-Settings` are hop-by-hop), as RFC 9113
/// §3.1 lets a server ignore the offer.
pub fn upgrade_requested(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants = connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"));
    let proto = wants.then(|| headers.get(header::UPGRADE)).flatten()?;
    let h2c = proto.to_str().map_or(true, |v| {
        v.split(',').any(|p| {
            let name = p.trim().split('/').next().unwrap_or("");
            name.eq_ignore_ascii_case("h2c")
        })
    });
    (!h2c).then(|| proto.clone())
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

/// What the gateway says about the hop, in place of whatever the client said.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded<'a> {
    pub client: IpAddr,
    pub https: bool,
    /// The host the request was routed by.
    pub host: &'a str,
    /// The protocol the client asked to upgrade to ([`upgrade_requested`]).
    pub upgrade: Option<&'a HeaderValue>,
    /// The path prefix the app strips (`strip_prefix`): sent as `X-Forwarded-Prefix`, so the
    /// service can build links and redirects that work from outside (Spring, ASP.NET Core,
    /// Traefik's StripPrefix do the same).
    pub prefix: Option<&'a str>,
}

/// Writes the header lines of a request going up (`name: value\r\n` each), as HTTP/1.1:
/// - hop-by-hop headers are left out (the fixed list and whatever `Connection` names); with
///   an upgrade, exactly `connection: upgrade` and `upgrade` are written instead;
/// - `Host` is the host the request was routed by: an absolute-form or HTTP/2 request may
///   carry a `Host` that says otherwise (RFC 9112 §3.2.2: a proxy replaces it), and a service
///   choosing its virtual host by that would serve an app the policy never decided on;
/// - `X-Forwarded-For` (the client's address), `-Proto` (`http`/`https`) and `-Host` replace
///   the client's own, and `-Prefix` says what a `strip_prefix` app removed; [`CLIENT_CLAIMS`]
///   (the client's `X-Forwarded-Prefix` among them) are left out;
/// - `Content-Length` is left to the caller, who frames the body.
///
/// Writing the head this way costs less than removing and inserting in the `HeaderMap`
/// (~2,000 instructions per request, callgrind: benches/front_cost.sh).
pub fn write_request_headers(headers: &HeaderMap, fwd: &Forwarded<'_>, out: &mut Vec<u8>) {
    // As header names (lower case, hashed): a 64 KiB `Connection: a,a,a,…` held ~30,000
    // tokens, each compared with every header before.
    let listed: std::collections::HashSet<HeaderName> = if headers.contains_key(header::CONNECTION)
    {
        connection_tokens(headers)
            .filter(|t| !is_connection_option(t.as_bytes()))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect()
    } else {
        std::collections::HashSet::new()
    };
    let mut cookies_written = false;
    for (name, value) in headers {
        if listed.contains(name) {
            continue;
        }
        if name == header::COOKIE {
            // HTTP/2 clients send each cookie as its own field (RFC 9113 §8.2.3: joined with
            // "; " for HTTP/1.1); as several lines, most servers kept only the first cookie or
            // joined them with ", ", which breaks the value.
            if !cookies_written {
                cookies_written = true;
                join_cookies(headers, out);
            }
            continue;
        }
        let name = name.as_str();
        if left_out_going_up(name) {
            continue;
        }
        line(out, name, value.as_bytes());
    }
    if let Some(proto) = fwd.upgrade {
        line(out, "connection", b"upgrade");
        line(out, "upgrade", proto.as_bytes());
    }
    line(out, "host", fwd.host.as_bytes());
    match fwd.client {
        IpAddr::V4(v4) => addr_text::with_v4(v4, |s| line(out, "x-forwarded-for", s.as_bytes())),
        IpAddr::V6(v6) => line(out, "x-forwarded-for", v6.to_string().as_bytes()),
    }
    let proto: &[u8] = if fwd.https { b"https" } else { b"http" };
    line(out, "x-forwarded-proto", proto);
    line(out, "x-forwarded-host", fwd.host.as_bytes());
    if let Some(prefix) = fwd.prefix {
        line(out, "x-forwarded-prefix", prefix.as_bytes());
    }
}

/// Every `Cookie` field as one line, the values joined with "; ".
fn join_cookies(headers: &HeaderMap, out: &mut Vec<u8>) {
    out.extend_from_slice(b"cookie: ");
    for (i, v) in headers.get_all(header::COOKIE).iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b"; ");
        }
        out.extend_from_slice(v.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

fn line(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A `Connection` token that needs no listing: a name that is hop-by-hop anyway
/// (`keep-alive`, `upgrade`).
pub fn is_connection_option(token: &[u8]) -> bool {
    token.eq_ignore_ascii_case(b"keep-alive") || token.eq_ignore_ascii_case(b"upgrade")
}

/// One of the fixed hop-by-hop names (not those a `Connection` header lists).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_by_hop_name(name.as_str())
}

// One `match` on the (lowercase) name per header: comparing `HeaderName`s against the lists
// above cost ~1,900 instructions per request through the front (callgrind,
// benches/front_cost.sh); a unit test keeps these in step with the lists.

fn hop_by_hop_name(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "http2-settings"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

fn client_claim_name(name: &str) -> bool {
    matches!(
        name,
        "forwarded"
            | "x-real-ip"
            | "true-client-ip"
            | "x-client-ip"
            | "cf-connecting-ip"
            | "x-forwarded-port"
            | "x-forwarded-prefix"
            | "x-forwarded-ssl"
            | "x-forwarded-scheme"
            | "x-scheme"
            | "x-url-scheme"
            | "x-forwarded-protocol"
            | "front-end-https"
            | "client-ip"
            | "x-cluster-client-ip"
            | "fastly-client-ip"
            | "x-proxyuser-ip"
            | "x-forwarded"
            | "forwarded-for"
            | "x-original-forwarded-for"
            | "x-envoy-external-address"
            | "x-appengine-user-ip"
            | "x-host"
            | "x-original-host"
            | "x-forwarded-server"
            | "x-forwarded-uri"
            | "x-original-url"
            | "x-rewrite-url"
            | "x-original-uri"
            | "x-remote-addr"
            | "remote-addr"
            | "x-remote-ip"
            | "x-forwarded-client-cert"
            | "x-arr-ssl"
            | "x-arr-clientcert"
            | "ssl-client-verify"
            | "x-ssl-client-verify"
            | "ssl-client-cert"
            | "x-ssl-client-cert"
            | "x-client-cert"
            | "remote-user"
            | "remote-groups"
            | "remote-email"
            | "remote-name"
            | "x-remote-user"
            | "x-webauth-user"
            | "x-forwarded-user"
            | "x-forwarded-email"
            | "x-forwarded-groups"
            | "x-forwarded-preferred-username"
            | "x-forwarded-access-token"
            | "x-auth-request-user"
            | "x-auth-request-email"
            | "x-auth-request-groups"
            | "x-auth-request-preferred-username"
            | "x-auth-request-access-token"
            | "proxy"
    )
}

/// A request header [`write_request_headers`] does not pass on as the client sent it: ours
/// (replaced), the framing (the caller's), hop-by-hop names and client claims, and `Expect`:
/// the front answers `100 Continue` itself and sends the body up at once, so a service told
/// to expect it could answer early and read the body as its next request — one the policy
/// never saw (the Expect-based desync; nginx drops it for this).
/// Names spelt with `_` for `-` count as the names they stand for: servers that map header
/// names CGI-style (`X_Forwarded_For` and `X-Forwarded-For` both become
/// `HTTP_X_FORWARDED_FOR`) would otherwise take the client's look-alike for ours (nginx and
/// Apache drop them for this reason).
fn left_out_going_up(name: &str) -> bool {
    let listed = |name: &str| {
        matches!(
            name,
            "host"
                | "content-length"
                | "x-forwarded-for"
                | "x-forwarded-proto"
                | "x-forwarded-host"
                | "expect"
        ) || hop_by_hop_name(name)
            || client_claim_name(name)
    };
    listed(name) || (name.contains('_') && listed(&name.replace('_', "-")))
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

    fn fwd(upgrade: Option<&HeaderValue>) -> Forwarded<'_> {
        Forwarded {
            client: "192.0.2.7".parse().unwrap(),
            https: true,
            host: "alice.example",
            upgrade,
            prefix: None,
        }
    }

    /// The headers [`write_request_headers`] writes, read back; ours (`host`,
    /// `x-forwarded-*`) are checked and left out unless `keep_ours`.
    fn sent(h: &HeaderMap, f: &Forwarded<'_>, keep_ours: bool) -> HeaderMap {
        let mut out = Vec::new();
        write_request_headers(h, f, &mut out);
        let text = String::from_utf8(out).unwrap();
        let mut got = HeaderMap::new();
        for l in text.split_terminator("\r\n") {
            let (n, v) = l.split_once(": ").unwrap();
            got.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        assert_eq!(got.get_all(header::HOST).iter().count(), 1, "{got:?}");
        assert_eq!(got[header::HOST], f.host);
        assert_eq!(got.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(got[X_FORWARDED_FOR], f.client.to_string().as_str());
        assert_eq!(
            got[X_FORWARDED_PROTO],
            if f.https { "https" } else { "http" }
        );
        assert_eq!(got[X_FORWARDED_HOST], f.host);
        let prefixes: Vec<&str> = got
            .get_all("x-forwarded-prefix")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(prefixes, f.prefix.into_iter().collect::<Vec<_>>());
        if !keep_ours {
            for n in [
                header::HOST,
                X_FORWARDED_FOR,
                X_FORWARDED_PROTO,
                X_FORWARDED_HOST,
                HeaderName::from_static("x-forwarded-prefix"),
            ] {
                got.remove(n);
            }
        }
        got
    }

    #[test]
    fn the_stripped_prefix_is_ours_not_the_clients() {
        let h = map(&[("x-forwarded-prefix", "/evil")]);
        assert!(sent(&h, &fwd(None), false).is_empty());
        let stripped = Forwarded {
            prefix: Some("/api"),
            ..fwd(None)
        };
        assert!(sent(&h, &stripped, false).is_empty());
    }

    #[test]
    fn cookie_fields_go_up_as_one_line() {
        let h = map(&[
            ("cookie", "a=1"),
            ("accept", "*/*"),
            ("cookie", "session=xyz"),
            ("cookie", "c=3"),
        ]);
        let got = sent(&h, &fwd(None), false);
        let cookies: Vec<&str> = got
            .get_all(header::COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(cookies, ["a=1; session=xyz; c=3"]);
        assert!(got.contains_key("accept"));
        let one = sent(&map(&[("cookie", "a=1")]), &fwd(None), false);
        assert_eq!(one[header::COOKIE], "a=1");
    }

    #[test]
    fn strips_fixed_and_connection_named_headers() {
        let h = map(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("upgrade", "websocket"),
            ("content-length", "12"),
            ("accept", "*/*"),
        ]);
        let got = sent(&h, &fwd(None), false);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got.contains_key("accept"));
    }

    #[test]
    fn each_hop_by_hop_header_alone_is_stripped() {
        let mut names = HOP_BY_HOP.to_vec();
        names.push(PROXY_AUTHENTICATE);
        for name in &names {
            let h = map(&[("accept", "*/*"), (name.as_str(), "x")]);
            let got = sent(&h, &fwd(None), false);
            assert!(!got.contains_key(name), "{name} kept");
            assert_eq!(got.len(), 1, "{got:?}");
        }
        let h = map(&[("accept", "*/*"), ("x-custom", "1"), ("x-custom", "2")]);
        assert_eq!(
            sent(&h, &fwd(None), false),
            h,
            "end-to-end headers stay, in order"
        );
    }

    #[test]
    fn upgrade_keeps_only_the_handshake() {
        let h = map(&[
            ("connection", "Upgrade, keep-alive"),
            ("upgrade", "websocket"),
            ("keep-alive", "1"),
            ("sec-websocket-key", "abc"),
        ]);
        let up = upgrade_requested(&h);
        assert_eq!(up.as_ref().unwrap(), "websocket");
        let got = sent(&h, &fwd(up.as_ref()), false);
        assert_eq!(
            got.get_all("connection").iter().collect::<Vec<_>>(),
            ["upgrade"]
        );
        assert_eq!(
            got.get_all("upgrade").iter().collect::<Vec<_>>(),
            ["websocket"]
        );
        assert!(got.contains_key("sec-websocket-key"));
        assert!(!got.contains_key("keep-alive"));
        // `Upgrade` without `Connection: upgrade` is no upgrade request.
        assert!(upgrade_requested(&map(&[("upgrade", "websocket")])).is_none());
    }

    /// An `h2c` upgrade would tunnel HTTP/2 requests past the app's rules: it goes up as an
    /// ordinary request, without `Upgrade` or its `HTTP2-Settings`.
    #[test]
    fn h2c_upgrade_is_not_passed_on() {
        for proto in ["h2c", "H2C", "websocket, h2c", "h2c/1"] {
            let h = map(&[
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", proto),
                ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
                ("accept", "*/*"),
            ]);
            let up = upgrade_requested(&h);
            assert!(up.is_none(), "{proto}: {up:?}");
            let got = sent(&h, &fwd(up.as_ref()), false);
            assert_eq!(got.len(), 1, "{proto}: {got:?}");
            assert!(got.contains_key("accept"));
        }
        // Not even when `Connection` forgets to list it.
        let h = map(&[("http2-settings", "AAMA"), ("accept", "*/*")]);
        assert_eq!(sent(&h, &fwd(None), false).len(), 1);
    }

    #[test]
    fn method_overrides_are_found_in_every_spelling() {
        for name in [
            "x-http-method-override",
            "x_http_method",
            "x-method_override",
        ] {
            let h = map(&[("accept", "*/*"), (name, " delete ")]);
            assert_eq!(method_overrides(&h, None), vec!["DELETE"], "{name}");
        }
        // Every value of every name, lists split, and `_method` in the query.
        let mut h = map(&[
            ("x-http-method", "GET"),
            ("x-http-method-override", "HEAD, PUT"),
        ]);
        h.append("x-http-method-override", HeaderValue::from_static("DELETE"));
        assert_eq!(
            method_overrides(&h, Some("a=1&_method=patch")),
            vec!["DELETE", "GET", "HEAD", "PATCH", "PUT"]
        );
        // Each once, however often it is named.
        let many = map(&[("x-http-method-override", &["get"; 5000].join(","))]);
        assert_eq!(method_overrides(&many, Some("_method=GET")), vec!["GET"]);
        // The query's name as PHP reads it; empty values are no override.
        for q in [
            "%5Fmethod=DELETE",
            ".method=delete",
            "+_method=DELETE",
            "_m%65thod=DELETE",
            "_method=%44ELETE",
        ] {
            assert_eq!(
                method_overrides(&HeaderMap::new(), Some(q)),
                vec!["DELETE"],
                "{q}"
            );
        }
        let empty = map(&[("x-http-method-override", "GET, ")]);
        assert_eq!(method_overrides(&empty, Some("_method=&x=%")), vec!["GET"]);
        let none = map(&[("x-http-methods", "PUT")]);
        assert!(method_overrides(&none, Some("method=x")).is_empty());
        // The URL claims and the other client-address headers never go up.
        let h = map(&[
            ("x-original-url", "/admin"),
            ("x_rewrite_url", "/admin"),
            ("client-ip", "192.0.2.6"),
            ("x-cluster-client-ip", "192.0.2.6"),
        ]);
        assert!(sent(&h, &fwd(None), false).is_empty());
    }

    #[test]
    fn name_matches_agree_with_the_lists() {
        for n in HOP_BY_HOP.iter().chain([&PROXY_AUTHENTICATE]) {
            assert!(is_hop_by_hop(n), "{n}");
            assert!(left_out_going_up(n.as_str()), "{n}");
        }
        for n in &CLIENT_CLAIMS {
            assert!(client_claim_name(n.as_str()), "{n}");
            assert!(!is_hop_by_hop(n), "{n}");
        }
        for n in [
            X_FORWARDED_FOR,
            X_FORWARDED_PROTO,
            X_FORWARDED_HOST,
            header::EXPECT,
        ] {
            assert!(left_out_going_up(n.as_str()), "{n}");
        }
        for n in [
            "accept",
            "user-agent",
            "cookie",
            "x-forwardedx",
            "forwarded-fo",
            "tee",
            "x_custom_header",
        ] {
            assert!(!left_out_going_up(n), "{n}");
        }
        // Underscore look-alikes of ours go too (CGI-style servers read them as ours).
        for n in [
            "x_forwarded_for",
            "x_real_ip",
            "proxy",
            "x-forwarded_proto",
            "content_length",
            "transfer_encoding",
        ] {
            assert!(left_out_going_up(n), "{n}");
        }
    }

    #[test]
    fn client_claims_of_address_scheme_and_host_are_dropped() {
        let mut pairs = vec![("accept", "*/*")];
        let values: Vec<(String, &str)> = CLIENT_CLAIMS
            .iter()
            .map(|n| (n.as_str().to_owned(), "for=6.6.6.6;proto=https"))
            .collect();
        pairs.extend(values.iter().map(|(n, v)| (n.as_str(), *v)));
        let got = sent(&map(&pairs), &fwd(None), false);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got.contains_key("accept"));
    }

    #[test]
    fn forwarded_headers_replace_client_values() {
        let h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "gopher"),
            ("x-forwarded-host", "evil.example"),
        ]);
        // `sent` checks ours are there, once each, with the gateway's values.
        assert!(sent(&h, &fwd(None), false).is_empty());
        let plain = Forwarded {
            https: false,
            ..fwd(None)
        };
        sent(&h, &plain, true);
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
            let f = Forwarded {
                client: ip.parse().unwrap(),
                ..fwd(None)
            };
            sent(&HeaderMap::new(), &f, true);
        }
    }

    #[test]
    fn host_is_the_routed_one() {
        // `GET http://alice.example/ HTTP/1.1` with `Host: admin.alice.example`: routed by
        // the URI, so the service must not see the other host.
        let h = map(&[("host", "admin.alice.example"), ("host", "alice.example")]);
        let got = sent(&h, &fwd(None), true);
        assert_eq!(
            got.get_all(header::HOST).iter().collect::<Vec<_>>(),
            ["alice.example"]
        );
    }
}
