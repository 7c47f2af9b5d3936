//! Fuzzes the HTTP front's own request handling, as `gateway::http::proxy::forward` composes
//! it, on requests built from arbitrary bytes: the host a request names, routing by host and
//! path, the app's rules, the path the device's service gets, hop-by-hop stripping and the
//! `X-Forwarded-*`/`Host` headers as the head sent up to the service writes them. hyper
//! parses the bytes off the wire; this target starts where our code does.
//!
//! Input: `METHOD SP URI [SP FLAGS]` then `NAME: VALUE` lines, `\n`-separated. FLAGS may hold
//! `s` (https), `2` (HTTP/2), `6` (IPv6 client). Lines that are no valid header are skipped.
//!
//! Checked: no panic; the upstream target is an origin-form URI with the request's query; the
//! path a service resolves (percent-decoding, `.`/`..` segments, `\`), seen through the app's
//! prefix, routes to the same app under the same verdict (no path escapes its app); the head
//! sent up parses as one HTTP/1.1 request head with the method and target; no
//! hop-by-hop header and no client claim (`Forwarded`, `X-Real-IP`, …) survives (an upgrade
//! keeps exactly `Connection: upgrade` + `Upgrade`, and is never to `h2c`);
//! `X-Forwarded-For/-Proto/-Host` and `Host` are single and say what the gateway routed by.
#![no_main]

use std::net::IpAddr;
use std::sync::OnceLock;

use gateway::http::h1::{encode_request_head, ReqFraming};
use gateway::http::headers::{
    method_overrides, upgrade_requested, Forwarded, CLIENT_CLAIMS, HOP_BY_HOP, PROXY_AUTHENTICATE,
    X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO,
};
use gateway::http::route::{forwarded_host, request_host, upstream_target};
use gateway::http::server_h1::MAX_HEADERS;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};
use libfuzzer_sys::fuzz_target;
use policies::{CompiledPolicy, Listener, Requester, Timestamp};

/// Two apps on one service (`site` and `admin` on home1/web, where a path escaping `site`
/// into `/admin` is a bypass), nested stripped prefixes on another service, and a rule
/// restricted by path.
const POLICY: &str = r#"
[app.site]
http = { host = "alice.example" }
to = "home1/web"
allow = { from = ["public"] }

[app.admin]
http = { host = "alice.example", path = "/admin" }
to = "home1/web"
allow = { from = ["192.0.2.0/24"] }

[app.dfs]
http = { host = "alice.example", path = "/dfs", strip_prefix = true }
to = "home1/dfs"
allow = { from = ["public"], methods = ["GET", "HEAD"] }

[app.dfs-rw]
http = { host = "alice.example", path = "/dfs/rw", strip_prefix = true }
to = "home1/dfs"
allow = { from = ["10.0.0.0/8"] }

[app.blog]
http = { host = "blog.alice.example" }
to = "home2/blog"
allow = { from = ["public"], paths = ["/pub"] }
"#;

fn policy() -> &'static CompiledPolicy {
    static P: OnceLock<CompiledPolicy> = OnceLock::new();
    P.get_or_init(|| policies::check_str("fuzz.toml".as_ref(), POLICY).expect("policy compiles"))
}

struct Input {
    req: http::request::Parts,
    https: bool,
    client: IpAddr,
}

/// The gateway's HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE` (`MAX_H2_HEAD` in
/// gateway/src/http/h2.rs).
const H2_HEADER_LIST: usize = 32 * 1024;

fn parse(data: &[u8]) -> Option<Input> {
    let mut lines = data.split(|&b| b == b'\n');
    let mut first = lines.next()?.splitn(3, |&b| b == b' ');
    let method = Method::from_bytes(first.next()?).ok()?;
    let uri = Uri::try_from(first.next()?).ok()?;
    let flags = first.next().unwrap_or_default();
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .version(if flags.contains(&b'2') {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        })
        .body(())
        .ok()?
        .into_parts()
        .0;
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            req.headers.append(n, v);
        }
    }
    // Only what a server lets through: ours (HTTP/1) answers 431 past MAX_HEADERS header
    // lines; hyper's HTTP/2 refuses a header list over 16 KiB as HTTP/2 counts it (name and
    // value plus 32 bytes per field).
    let listed: usize = req
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 32)
        .sum();
    if (req.version == Version::HTTP_11 && req.headers.len() > MAX_HEADERS)
        || (req.version == Version::HTTP_2 && listed > H2_HEADER_LIST)
    {
        return None;
    }
    let client = if flags.contains(&b'6') {
        "2001:db8::7".parse().unwrap()
    } else {
        "198.51.100.7".parse().unwrap()
    };
    Some(Input {
        req,
        https: flags.contains(&b's'),
        client,
    })
}

/// What a lenient service makes of a path: every escape decoded, `\` taken as `/`, empty and
/// `.` segments dropped, `..` going up. Written back canonically (only unreserved characters,
/// sub-delimiters, `:`, `@` and `/` literal), so that routing it again decodes nothing twice.
fn service_view(path: &str) -> String {
    let b = path.as_bytes();
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                decoded.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                decoded.push(c);
                i += 1;
            }
        }
    }
    let mut segs: Vec<&[u8]> = Vec::new();
    for s in decoded.split(|&c| c == b'/' || c == b'\\') {
        match s {
            b"" | b"." => {}
            b".." => {
                segs.pop();
            }
            s => segs.push(s),
        }
    }
    let mut out = String::from("/");
    for (n, s) in segs.iter().enumerate() {
        if n > 0 {
            out.push('/');
        }
        for &c in *s {
            if c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&c) {
                out.push(c as char);
            } else {
                out.push_str(&format!("%{c:02X}"));
            }
        }
    }
    out
}

fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

fn single<'a>(h: &'a HeaderMap, n: &HeaderName) -> &'a HeaderValue {
    let mut all = h.get_all(n).iter();
    let v = all.next().unwrap_or_else(|| panic!("no {n}: {h:?}"));
    assert!(all.next().is_none(), "{n} more than once: {h:?}");
    v
}

/// What the front decides a request's method overrides on (`method_overrides`) holds every
/// one a reference reader finds: each `_method` a form decoder (`form_urlencoded`) reads from
/// the query, named as PHP names parameters (leading spaces dropped; `.`, ` ` and `[` as
/// `_`), and each listed value of an override header (`_` for `-` in its name), trimmed and
/// uppercased. One missed would pass an app's method rule unchecked.
fn overrides_agree(headers: &HeaderMap, query: Option<&str>) {
    let got = method_overrides(headers, query);
    let mut want = Vec::new();
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let name: String = name
            .trim_start_matches(' ')
            .chars()
            .map(|c| if matches!(c, '.' | ' ' | '[') { '_' } else { c })
            .collect();
        if name == "_method" {
            want.push(value.trim().to_ascii_uppercase());
        }
    }
    for (name, value) in headers {
        let n = name.as_str().replace('_', "-");
        if [
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
        ]
        .contains(&n.as_str())
        {
            let text = value.to_str().unwrap_or("?");
            want.extend(text.split(',').map(|m| m.trim().to_ascii_uppercase()));
        }
    }
    for m in want.iter().filter(|m| !m.is_empty()) {
        assert!(
            got.contains(m),
            "override {m:?} not decided on: {got:?} ({query:?})"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(Input { req, https, client }) = parse(data) else {
        return;
    };
    overrides_agree(&req.headers, req.uri.query());
    let policy = policy();
    // 400 without a host, 404 without a route: nothing more of ours runs.
    let Some(host) = request_host(&req).map(str::to_owned) else {
        return;
    };
    let path = req.uri.path().to_owned();
    let Some(app) = policy.route_http(&host, &path) else {
        return;
    };
    let Listener::Http(route) = &app.listener else {
        panic!("route_http gave the non-http app {}", app.name);
    };
    let who = Requester::Public { ip: client };
    let method = req.method.as_str();
    let verdict = policy.decide(app, &who, Some(method), Some(&path), Timestamp(0));

    let target = upstream_target(req.uri.path_and_query(), route);
    let turi = Uri::try_from(&*target)
        .unwrap_or_else(|e| panic!("upstream target {target:?} is no URI: {e}"));
    assert!(
        target.starts_with('/') && turi.scheme().is_none() && turi.authority().is_none(),
        "upstream target {target:?} is not origin-form"
    );
    assert_eq!(turi.query(), req.uri.query(), "query changed on the way");

    // Whatever the service makes of the path stays inside the app the gateway chose.
    let seen = service_view(turi.path());
    let full = match (route.strip_prefix, route.path.as_str(), seen.as_str()) {
        (true, p, "/") if p != "/" => p.to_owned(),
        (true, p, s) if p != "/" => format!("{p}{s}"),
        (_, _, s) => s.to_owned(),
    };
    let again = policy.route_http(&host, &full).map(|a| a.name.as_str());
    assert_eq!(
        again,
        Some(app.name.as_str()),
        "{path:?} is app {}, but the service resolves it to {full:?}",
        app.name
    );
    let verdict_seen = policy.decide(app, &who, Some(method), Some(&full), Timestamp(0));
    assert_eq!(
        verdict_seen.is_allow(),
        verdict.is_allow(),
        "{path:?} is {verdict:?}, the path the service resolves ({full:?}) is {verdict_seen:?}"
    );

    // 400 from proxy::forward: a request line or `Host` that would not be one.
    if !gateway::http::proxy::writable_head(&target, &host) {
        return;
    }
    // The host as routing compared it, told to the service; routed alike.
    let fwd_host = forwarded_host(&host);
    assert_eq!(
        policy.route_http(&fwd_host, &path).map(|a| a.name.as_str()),
        Some(app.name.as_str()),
        "{host:?} is told as {fwd_host:?}, which routes elsewhere"
    );
    // What a `strip_prefix` app tells its service it removed.
    let prefix = (route.strip_prefix && route.path != "/").then(|| route.path.clone());
    // The head as `proxy::forward` sends it up, read back as the service reads it.
    let upgrade = (req.version == Version::HTTP_11)
        .then(|| upgrade_requested(&req.headers))
        .flatten();
    let named = connection_named(&req.headers);
    let fwd = Forwarded {
        client,
        https,
        host: &fwd_host,
        upgrade: upgrade.as_ref(),
        prefix: prefix.as_deref(),
    };
    let mut wire = Vec::new();
    encode_request_head(
        &req.method,
        &target,
        &req.headers,
        &fwd,
        ReqFraming::Empty,
        &mut wire,
    );
    // Room for every field an HTTP/2 header list can hold, and the ones the gateway adds.
    let mut raw = [httparse::EMPTY_HEADER; H2_HEADER_LIST / 32 + 16];
    let mut parsed = httparse::Request::new(&mut raw);
    let status = parsed.parse(&wire).unwrap_or_else(|e| {
        panic!(
            "the head sent up does not parse ({e}): {:?}",
            String::from_utf8_lossy(&wire)
        )
    });
    assert_eq!(
        status,
        httparse::Status::Complete(wire.len()),
        "one head, nothing after it"
    );
    assert_eq!(parsed.method, Some(req.method.as_str()));
    assert_eq!(parsed.path, Some(&*target));
    let mut h = HeaderMap::new();
    for l in parsed.headers.iter() {
        h.append(
            HeaderName::from_bytes(l.name.as_bytes()).expect("header name"),
            HeaderValue::from_bytes(l.value).expect("header value"),
        );
    }
    let h = &h;
    let handshake = [header::CONNECTION, header::UPGRADE];
    for n in named.iter().chain(&HOP_BY_HOP).chain([&PROXY_AUTHENTICATE]) {
        // Set again by the gateway, whatever `Connection` named.
        let ours = [
            header::HOST,
            X_FORWARDED_FOR,
            X_FORWARDED_PROTO,
            X_FORWARDED_HOST,
        ];
        if ours.contains(n) || (upgrade.is_some() && handshake.contains(n)) {
            continue;
        }
        assert!(!h.contains_key(n), "hop-by-hop {n} forwarded: {h:?}");
    }
    for n in &CLIENT_CLAIMS {
        // The gateway's own prefix header, once, for an app that strips one.
        if let (Some(p), true) = (&prefix, n.as_str() == "x-forwarded-prefix") {
            assert_eq!(single(h, n), p.as_str());
            continue;
        }
        assert!(!h.contains_key(n), "client claim {n} forwarded: {h:?}");
    }
    if let Some(proto) = &upgrade {
        assert_eq!(single(h, &header::CONNECTION), "upgrade");
        assert_eq!(single(h, &header::UPGRADE), proto);
        // Never h2c: its HTTP/2 requests would pass the app's rules unchecked.
        let p = proto.to_str().unwrap_or("").to_ascii_lowercase();
        assert!(
            !p.split(',')
                .any(|t| t.trim().split('/').next() == Some("h2c")),
            "h2c upgrade passed on: {p:?}"
        );
    }
    // A bodiless request says so where its method usually carries a body, and only there.
    if matches!(req.method, Method::POST | Method::PUT | Method::PATCH) {
        assert_eq!(single(h, &header::CONTENT_LENGTH), "0");
    } else {
        assert!(
            !h.contains_key(header::CONTENT_LENGTH),
            "a bodiless {} got a length: {h:?}",
            req.method
        );
    }
    assert_eq!(single(h, &X_FORWARDED_FOR), client.to_string().as_str());
    assert_eq!(
        single(h, &X_FORWARDED_PROTO),
        if https { "https" } else { "http" }
    );
    assert_eq!(single(h, &X_FORWARDED_HOST), fwd_host.as_bytes());
    // The service sees the host the gateway routed by, whatever else the client sent.
    assert_eq!(
        single(h, &header::HOST),
        fwd_host.as_bytes(),
        "routed by {host:?}"
    );
});
