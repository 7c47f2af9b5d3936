//! Fuzzes the policy parser and compiler (files users edit, read by the gateway while it runs):
//! no panic on any input, errors always carry a position inside the file or none.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match policies::check_str(std::path::Path::new("fuzz.toml"), text) {
        Ok(p) => {
            // Lookups on whatever compiled must not panic either.
            for app in p.apps() {
                let _ = p.route_http("alice.example", "/dfs/x");
                let who = policies::Requester::Public {
                    ip: "198.51.100.7".parse().unwrap(),
                };
                let _ = p.decide(app, &who, Some("GET"), Some("/"), policies::Timestamp(0));
            }
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
