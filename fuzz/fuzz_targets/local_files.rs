//! Fuzzes the readers of what reaches a device other than from its peers: the files people
//! and other programs write beside it (gateway.toml and node.toml, whose errors quote a line
//! and column; zone-revoked.txt, which a restart reads back) and the admin API's `Host` check
//! (anyone who reaches the admin address sends it). No panic; whatever zone-revoked.txt
//! parses renders and parses again to the same names; a config's error names its file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use zone_core::seen_revocations;
use zonegate::config::{self, GatewayFile, NodeFile};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(names) = seen_revocations::parse(text) {
            let again = seen_revocations::parse(&seen_revocations::render(&names))
                .expect("rendered names parse");
            assert_eq!(again, names);
        }
        let path = Path::new("/etc/zonegate/gw/gateway.toml");
        if let Err(e) = config::parse::<GatewayFile>(path, text) {
            assert!(e.to_string().contains("gateway.toml"), "{e}");
        }
        if let Err(e) = config::parse::<NodeFile>(path, text) {
            assert!(e.to_string().contains("gateway.toml"), "{e}");
        }
    }
    if let Ok(req) = http::Request::builder()
        .uri("/status")
        .header(http::header::HOST, data)
        .body(())
    {
        // Accepted only for a name of this machine: an IP address, localhost or *.localhost
        // (the admin API's defence against DNS rebinding: a page's own name is refused).
        if gateway::admin::addressed_to_this_machine(&req) {
            let h = std::str::from_utf8(data)
                .expect("an accepted Host is text")
                .to_ascii_lowercase();
            let h = h.rsplit_once('@').map_or(h.as_str(), |(_, host)| host);
            let host = match h.strip_prefix('[') {
                Some(rest) => rest.split(']').next().unwrap_or_default(),
                None => h.rsplit_once(':').map_or(h, |(host, _)| host),
            };
            let host = host.trim_end_matches('.');
            assert!(
                host == "localhost"
                    || host.ends_with(".localhost")
                    || host.parse::<std::net::IpAddr>().is_ok(),
                "the admin API took Host {h:?} for this machine"
            );
        }
    }
});
