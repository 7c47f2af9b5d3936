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
        let _ = gateway::admin::addressed_to_this_machine(&req);
    }
});
