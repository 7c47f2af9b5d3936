//! Fuzzes the policy parser and compiler (files users edit, read by the gateway while it runs):
//! no panic on any input, errors always carry a position inside the file or none, and every
//! http app that compiles is what its own host and path prefix route to.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match policies::check_str(std::path::Path::new("fuzz.toml"), text) {
        Ok(p) => {
            // Lookups on whatever compiled must not panic, and an http app owns its own route:
            // a request for its host and prefix (and below it) is routed to it, not another.
            let who = policies::Requester::Public {
                ip: "198.51.100.7".parse().unwrap(),
            };
            for app in p.apps() {
                if let policies::Listener::Http(route) = &app.listener {
                    let got = p.route_http(&route.host, &route.path).map(|a| &a.name);
                    assert_eq!(got, Some(&app.name), "{}{}", route.host, route.path);
                    // Below its prefix: this app, or one with a longer prefix on the host —
                    // or none when a longer prefix of the host holds the path once names are
                    // folded (the routing guard: case, trailing dots).
                    let below = format!("{}/x", route.path.trim_end_matches('/'));
                    let folded = policies::fold_name_matching(&below);
                    let longer = p.apps().iter().any(|o| {
                        matches!(&o.listener, policies::Listener::Http(r)
                            if r.host == route.host
                                && r.path.len() > route.path.len()
                                && policies::units::path_has_prefix(&folded, &policies::fold_name_matching(&r.path)))
                    });
                    match p.route_http(&route.host, &below).map(|a| &a.listener) {
                        Some(policies::Listener::Http(r)) => assert!(
                            r.host == route.host && r.path.len() >= route.path.len(),
                            "{}{below} routed to {r:?}",
                            route.host
                        ),
                        None if longer => {}
                        other => panic!("{}{below} routed to {other:?}", route.host),
                    }
                    let _ = p.decide(app, &who, Some("GET"), Some(&below), policies::Timestamp(0));
                }
                let _ = p.decide(app, &who, Some("GET"), Some("/"), policies::Timestamp(0));
            }
            let _ = p.route_http("alice.example", "/dfs/x");
        }
        Err(errs) => {
            let lines = text.lines().count().max(1);
            for e in errs {
                if let Some(pos) = e.position {
                    assert!(
                        pos.line >= 1 && pos.line <= lines + 1,
                        "error line {} outside a {lines}-line file: {e}",
                        pos.line
                    );
                }
            }
        }
    }
});
