//! From a request to where it goes: the host a request names (HTTP/1.1 `Host` or HTTP/2
//! `:authority`) and the path the device's service sees (with the app's prefix stripped when
//! the app asks for it). Routing itself (host + longest prefix → app) is the policy's
//! [`policies::CompiledPolicy::route_http`].

use std::borrow::Cow;

use http::request::Parts;
use http::uri::PathAndQuery;
use policies::units::normalize_path;
use policies::HttpRoute;

/// The host a request is for, as the client wrote it (may carry a port). HTTP/2 and
/// absolute-form requests carry it in the URI (which then wins over `Host`, RFC 9112 §3.2.2);
/// HTTP/1.1 in `Host`. Several `Host` lines name no host: which one a service would believe
/// is anyone's guess (RFC 9112 §3.2 answers them 400).
pub fn request_host(parts: &Parts) -> Option<&str> {
    let mut lines = parts.headers.get_all(http::header::HOST).iter();
    let (first, more) = (lines.next(), lines.next().is_some());
    // HTTP/1.1 requires exactly one `Host` line whatever the target's form (RFC 9112 §3.2);
    // an absolute-form target is routed by its authority, but not without or with several.
    if parts.version == http::Version::HTTP_11 && (first.is_none() || more) {
        return None;
    }
    parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| first.filter(|_| !more).and_then(|h| h.to_str().ok()))
        .filter(|h| !h.is_empty())
}

/// The host a service is told (`Host`, `X-Forwarded-Host`): the routed name as routing
/// compared it — lowercase, without a trailing dot — and the client's port if it wrote one.
/// As written, `BLOG.alice.example.` was routed to the `blog` app but reached a service that
/// picks its site by the exact string as another site (its default, say an admin one).
/// Borrowed when already so (the common case).
pub fn forwarded_host(host: &str) -> Cow<'_, str> {
    // A bracketed IPv6 address: routing takes it as it is but for case.
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if !host.starts_with('[') || name.ends_with(']') => (name, Some(port)),
        _ => (host, None),
    };
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.len() == name.len() && !name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Cow::Borrowed(host);
    }
    let mut out = bare.to_ascii_lowercase();
    if let Some(port) = port {
        out.push(':');
        out.push_str(port);
    }
    Cow::Owned(out)
}

/// Where to send a request for exactly a `strip_prefix` app's path without its trailing
/// slash (`/dfs` for `path = "/dfs"`): to `/dfs/`, query kept. Stripped, both reach the
/// service as `/`, so a page there could not know its relative links resolve one level up —
/// outside the app, into another. Built from the app's path, not the request's.
pub fn slash_redirect(pq: Option<&PathAndQuery>, route: &HttpRoute) -> Option<String> {
    if !route.strip_prefix || route.path == "/" {
        return None;
    }
    let raw = pq.map(|p| p.path()).unwrap_or("/");
    if raw.ends_with('/') {
        return None;
    }
    let normal = normalize_path(raw).ok()?;
    if !policies::units::strip_path_prefix(&normal, &route.path)?.is_empty() {
        return None;
    }
    let base = route.path.trim_end_matches('/');
    Some(match pq.and_then(|p| p.query()) {
        Some(q) => format!("{base}/?{q}"),
        None => format!("{base}/"),
    })
}

/// The origin-form target (`/path?query`) to send upstream: the path in the normal form it was
/// routed by ([`policies::units::normalize_path`]), so the service serves what the app allowed.
/// With `strip_prefix`, the app's path prefix is removed (`/dfs/a` → `/a`, `/dfs` → `/`);
/// routing guarantees the prefix matches on whole segments. Borrowed from the request when it
/// is sent as the client wrote it (the common case: no copy per request).
pub fn upstream_target<'a>(pq: Option<&'a PathAndQuery>, route: &HttpRoute) -> Cow<'a, str> {
    let raw = pq.map(|p| p.path()).unwrap_or("/");
    // Routing refused paths without a normal form, so the fallback is never taken for a
    // routed request.
    let normal = normalize_path(raw).unwrap_or(Cow::Borrowed(raw));
    let query = pq.and_then(|p| p.query());
    let path: &str = &normal;
    let stripped = if route.strip_prefix && route.path != "/" {
        // As routing matched it: `;` parameters and parameter-only segments do not count.
        match policies::units::strip_path_prefix(path, &route.path) {
            Some("") => "/",
            Some(rest) => rest,
            None => path,
        }
    } else {
        path
    };
    let unchanged = matches!(normal, Cow::Borrowed(_)) && stripped.len() == raw.len();
    match pq {
        // An absolute-form request with no path (`GET http://host?q`) has none written
        // (`path()` says "/"): that one is built, or `?q` would be the request line's target.
        Some(pq) if unchanged && pq.as_str().starts_with('/') => Cow::Borrowed(pq.as_str()),
        _ => {
            let path = if stripped.is_empty() { "/" } else { stripped };
            Cow::Owned(match query {
                Some(q) => format!("{path}?{q}"),
                None => path.to_owned(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The service is told the host as routing compared it, the client's port kept.
    #[test]
    fn forwarded_host_is_the_routed_form() {
        for (written, told) in [
            ("blog.alice.example", "blog.alice.example"),
            ("BLOG.alice.example.", "blog.alice.example"),
            ("Blog.Alice.Example.:8443", "blog.alice.example:8443"),
            ("blog.alice.example:443", "blog.alice.example:443"),
            ("[2001:DB8::1]:8080", "[2001:db8::1]:8080"),
            ("[2001:db8::1]", "[2001:db8::1]"),
            ("[2001:DB8::1]", "[2001:db8::1]"),
        ] {
            assert_eq!(forwarded_host(written), told, "{written}");
        }
        assert!(matches!(forwarded_host("a.example:80"), Cow::Borrowed(_)));
    }

    fn route(path: &str, strip: bool) -> HttpRoute {
        HttpRoute {
            host: "alice.example".into(),
            path: path.into(),
            strip_prefix: strip,
        }
    }

    fn target(uri: &str, r: &HttpRoute) -> String {
        let uri: http::Uri = uri.parse().unwrap();
        upstream_target(uri.path_and_query(), r).into_owned()
    }

    #[test]
    fn a_stripped_prefix_without_its_slash_is_redirected() {
        let dfs = route("/dfs", true);
        let redirect = |uri: &str, r: &HttpRoute| {
            let uri: http::Uri = uri.parse().unwrap();
            slash_redirect(uri.path_and_query(), r)
        };
        assert_eq!(redirect("/dfs", &dfs).as_deref(), Some("/dfs/"));
        assert_eq!(redirect("/dfs?x=1", &dfs).as_deref(), Some("/dfs/?x=1"));
        assert_eq!(redirect("/a/../dfs", &dfs).as_deref(), Some("/dfs/"));
        for none in ["/dfs/", "/dfs/a", "/dfs/a?x"] {
            assert_eq!(redirect(none, &dfs), None, "{none}");
        }
        assert_eq!(
            redirect("/dfs", &route("/dfs", false)),
            None,
            "not stripped"
        );
        assert_eq!(redirect("/", &route("/", true)), None);
    }

    #[test]
    fn http11_needs_exactly_one_host_line_whatever_the_target() {
        let parts = |uri: &str, version, hosts: &[&str]| {
            let mut b = http::Request::builder().uri(uri).version(version);
            for h in hosts {
                b = b.header(http::header::HOST, *h);
            }
            b.body(()).unwrap().into_parts().0
        };
        use http::Version;
        let abs = "http://app.example/x";
        let one = parts(abs, Version::HTTP_11, &["other.example"]);
        assert_eq!(request_host(&one), Some("app.example"));
        assert_eq!(request_host(&parts(abs, Version::HTTP_11, &[])), None);
        let two = parts(abs, Version::HTTP_11, &["a.example", "b.example"]);
        assert_eq!(request_host(&two), None);
        assert_eq!(
            request_host(&parts("/x", Version::HTTP_11, &["a.example"])),
            Some("a.example")
        );
        // HTTP/2 names it in :authority; HTTP/1.0 may leave Host out.
        assert_eq!(
            request_host(&parts(abs, Version::HTTP_2, &[])),
            Some("app.example")
        );
        assert_eq!(
            request_host(&parts(abs, Version::HTTP_10, &[])),
            Some("app.example")
        );
    }

    #[test]
    fn strips_prefix_on_whole_segments() {
        let r = route("/dfs", true);
        assert_eq!(target("/dfs/a/b?x=1", &r), "/a/b?x=1");
        assert_eq!(target("/dfs", &r), "/");
        assert_eq!(target("/dfs?x", &r), "/?x");
        assert_eq!(target("/dfs/", &r), "/");
        // Routed with `;` parameters ignored, stripped the same way.
        assert_eq!(target("/dfs;x/a", &r), "/a");
        assert_eq!(target("/;x/dfs/a?q", &r), "/a?q");
    }

    #[test]
    fn keeps_path_without_strip_or_at_root() {
        assert_eq!(target("/dfs/a?q", &route("/dfs", false)), "/dfs/a?q");
        assert_eq!(target("/x", &route("/", true)), "/x");
        assert_eq!(
            target("http://alice.example/a?b", &route("/", false)),
            "/a?b"
        );
        // No path written at all (found by fuzz/http_request): still origin-form.
        assert_eq!(target("http://alice.example?a", &route("/", false)), "/?a");
        assert_eq!(target("http://alice.example", &route("/", false)), "/");
    }

    #[test]
    fn a_target_sent_as_written_is_not_copied() {
        let uri: http::Uri = "/a/b?x=1&y".parse().unwrap();
        let pq = uri.path_and_query();
        assert!(matches!(
            upstream_target(pq, &route("/", false)),
            Cow::Borrowed("/a/b?x=1&y")
        ));
        assert!(matches!(
            upstream_target(pq, &route("/a", false)),
            Cow::Borrowed(_)
        ));
        assert!(matches!(
            upstream_target(pq, &route("/a", true)),
            Cow::Owned(_)
        ));
        let odd: http::Uri = "/a//b".parse().unwrap();
        let t = upstream_target(odd.path_and_query(), &route("/", false));
        assert!(matches!(&t, Cow::Owned(s) if s == "/a/b"), "{t}");
    }

    #[test]
    fn forwards_the_path_it_routed_by() {
        let r = route("/dfs", true);
        assert_eq!(target("/dfs/a/../b?x=1", &r), "/b?x=1");
        assert_eq!(target("//dfs//%61?q", &r), "/a?q");
        assert_eq!(target("/x/../admin", &route("/", false)), "/admin");
    }

    #[test]
    fn host_from_header_or_authority() {
        let (p, _) = http::Request::builder()
            .uri("/x")
            .header("host", "Alice.Example:8443")
            .body(())
            .unwrap()
            .into_parts();
        assert_eq!(request_host(&p), Some("Alice.Example:8443"));
        let (p, _) = http::Request::builder()
            .uri("https://alice.example/x")
            .header("host", "other")
            .body(())
            .unwrap()
            .into_parts();
        assert_eq!(request_host(&p), Some("alice.example"));
        let (p, _) = http::Request::builder()
            .uri("/x")
            .body(())
            .unwrap()
            .into_parts();
        assert_eq!(request_host(&p), None);
        let (p, _) = http::Request::builder()
            .uri("/x")
            .header("host", "alice.example")
            .header("host", "admin.alice.example")
            .body(())
            .unwrap()
            .into_parts();
        assert_eq!(request_host(&p), None, "two Host lines name no host");
    }
}
