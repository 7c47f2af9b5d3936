//! Prometheus text for a node agent's admin `/metrics`: its gateway links, its mesh peers per
//! path, its certificate's end and its zone config's — what its `/status` says, for a scraper.
//! A pair of homes that went direct carries nothing through the gateway, so only the nodes can
//! show it (the gateway's `/metrics` has the relayed side).

use std::fmt::Write as _;

use tunnel::status::{LinkStatus, PeerStatus};

/// What the node's `/metrics` shows.
pub struct NodeView<'a> {
    /// End of this device's certificate in use (Unix seconds).
    pub cert_not_after: i64,
    /// End of the zone config in use (Unix seconds) and its serial.
    pub zone_expires: i64,
    pub zone_serial: u64,
    pub links: &'a [LinkStatus],
    pub peers: &'a [PeerStatus],
    /// Streams the agent cut because their local reader (a service, a forward's client)
    /// stopped taking them while more were held than the connection's window allows.
    pub streams_cut: u64,
}

/// One metric's `# HELP` and `# TYPE` lines.
fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One series per state of `states` for the thing `key="id"`, 1 for `current`, 0 for the
/// others (a state set: a state that ends drops to 0 rather than vanishing).
fn state_set(
    out: &mut String,
    name: &str,
    (key, id): (&str, &str),
    (label, states): (&str, &[&str]),
    current: &str,
) {
    for state in states {
        let _ = writeln!(
            out,
            "{name}{{{key}=\"{id}\",{label}=\"{state}\"}} {}",
            u8::from(current == *state)
        );
    }
}

/// The Prometheus text of `v`. Device and gateway names are DNS labels: no label escaping.
pub fn render(v: &NodeView<'_>) -> String {
    let mut out = String::new();
    let o = &mut out;
    for (name, help, value) in [
        (
            "zonegate_certificate_not_after_seconds",
            "End (Unix time) of this device's certificate in use: renew before (zonegate device renew)",
            v.cert_not_after,
        ),
        (
            "zonegate_zone_config_expires_seconds",
            "End (Unix time) of the zone config in use: re-sign before (zonegate zone resign)",
            v.zone_expires,
        ),
    ] {
        head(o, name, "gauge", help);
        let _ = writeln!(o, "{name} {value}");
    }
    head(
        o,
        "zonegate_zone_config_serial",
        "gauge",
        "Serial of the zone config in use",
    );
    let _ = writeln!(o, "zonegate_zone_config_serial {}", v.zone_serial);
    head(
        o,
        "zonegate_node_streams_cut_total",
        "counter",
        "Streams cut because their local reader (a service, a forward's client) stopped taking them while more were held than the connection's window allows (reader_stall_secs)",
    );
    let _ = writeln!(o, "zonegate_node_streams_cut_total {}", v.streams_cut);

    head(
        o,
        "zonegate_gateway_link_state",
        "gauge",
        "State of the link to each gateway (1 for the current one)",
    );
    for l in v.links {
        state_set(
            o,
            "zonegate_gateway_link_state",
            ("gateway", &l.gateway),
            ("state", &["up", "draining", "connecting"]),
            &l.state,
        );
    }
    head(
        o,
        "zonegate_gateway_link_rtt_seconds",
        "gauge",
        "Round-trip time to each gateway, while its link is up",
    );
    for l in v.links {
        if let Some(ms) = l.rtt_ms {
            let _ = writeln!(
                o,
                "zonegate_gateway_link_rtt_seconds{{gateway=\"{}\"}} {}",
                l.gateway,
                ms / 1000.0
            );
        }
    }
    head(
        o,
        "zonegate_gateway_link_connects_total",
        "counter",
        "Connections made to each gateway (a rise is a reconnect)",
    );
    for l in v.links {
        let _ = writeln!(
            o,
            "zonegate_gateway_link_connects_total{{gateway=\"{}\"}} {}",
            l.gateway, l.connects
        );
    }

    head(
        o,
        "zonegate_peer_path",
        "gauge",
        "How streams to each mesh peer travel (1 for the current): direct, relay (through a gateway, encrypted end to end), offline, revoked",
    );
    for p in v.peers {
        state_set(
            o,
            "zonegate_peer_path",
            ("peer", &p.device),
            ("path", &["direct", "relay", "offline", "revoked"]),
            &p.path,
        );
    }
    head(
        o,
        "zonegate_peer_rtt_seconds",
        "gauge",
        "Round-trip time of the direct connection to each peer, while its path is direct (relayed streams add the gateway's: zonegate_gateway_link_rtt_seconds)",
    );
    // Only while direct: relayed, the status's RTT is the gateway's, another quantity in
    // the same series.
    for p in v.peers.iter().filter(|p| p.path == "direct") {
        if let Some(ms) = p.rtt_ms {
            let _ = writeln!(
                o,
                "zonegate_peer_rtt_seconds{{peer=\"{}\"}} {}",
                p.device,
                ms / 1000.0
            );
        }
    }
    type Per = fn(&PeerStatus) -> (u64, u64);
    let per_path: [(&str, &str, &str, Per); 4] = [
        (
            "zonegate_peer_streams_total",
            "counter",
            "Streams with each peer that ended, by path",
            |p| (p.streams_direct, p.streams_relay),
        ),
        (
            "zonegate_peer_open_streams",
            "gauge",
            "Streams with each peer open now, by path (one opened on the relay stays there for its life)",
            |p| (p.open_direct, p.open_relay),
        ),
        (
            "zonegate_peer_bytes_out_total",
            "counter",
            "Payload bytes sent to each peer, by path",
            |p| (p.bytes_direct_out, p.bytes_relay_out),
        ),
        (
            "zonegate_peer_bytes_in_total",
            "counter",
            "Payload bytes received from each peer, by path",
            |p| (p.bytes_direct_in, p.bytes_relay_in),
        ),
    ];
    for (name, kind, help, get) in per_path {
        head(o, name, kind, help);
        for p in v.peers {
            let (direct, relay) = get(p);
            let _ = writeln!(
                o,
                "{name}{{peer=\"{}\",path=\"direct\"}} {direct}\n{name}{{peer=\"{}\",path=\"relay\"}} {relay}",
                p.device, p.device
            );
        }
    }
    type One = fn(&PeerStatus) -> u64;
    let per_peer: [(&str, &str, One); 2] = [
        (
            "zonegate_peer_punches_total",
            "Hole-punching rounds the gateway coordinated with each peer",
            |p| p.punches,
        ),
        (
            "zonegate_peer_direct_connects_total",
            "Direct connections made with each peer",
            |p| p.direct_connects,
        ),
    ];
    for (name, help, get) in per_peer {
        head(o, name, "counter", help);
        for p in v.peers {
            let _ = writeln!(o, "{name}{{peer=\"{}\"}} {}", p.device, get(p));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(device: &str, path: &str) -> PeerStatus {
        PeerStatus {
            device: device.into(),
            path: path.into(),
            direct_addr: None,
            rtt_ms: Some(12.5),
            path_mtu: None,
            streams_direct: 3,
            streams_relay: 4,
            open_direct: 1,
            open_relay: 0,
            bytes_direct_out: 100,
            bytes_direct_in: 200,
            bytes_relay_out: 300,
            bytes_relay_in: 400,
            punches: 2,
            direct_connects: 1,
            permits: Vec::new(),
            last_error: None,
        }
    }

    #[test]
    fn links_and_peers_render_per_name_and_path() {
        let links = [LinkStatus {
            gateway: "gw".into(),
            addr: "203.0.113.10:4433".into(),
            state: "up".into(),
            observed_addr: None,
            rtt_ms: Some(20.0),
            path_mtu: None,
            connects: 2,
            last_error: None,
        }];
        let peers = [peer("home2", "direct"), peer("laptop", "revoked")];
        let text = render(&NodeView {
            cert_not_after: 1_800_000_000,
            zone_expires: 1_790_000_000,
            zone_serial: 42,
            links: &links,
            peers: &peers,
            streams_cut: 0,
        });
        for line in [
            "zonegate_certificate_not_after_seconds 1800000000\n",
            "zonegate_zone_config_expires_seconds 1790000000\n",
            "zonegate_zone_config_serial 42\n",
            "zonegate_gateway_link_state{gateway=\"gw\",state=\"up\"} 1\n",
            "zonegate_gateway_link_state{gateway=\"gw\",state=\"connecting\"} 0\n",
            "zonegate_gateway_link_rtt_seconds{gateway=\"gw\"} 0.02\n",
            "zonegate_gateway_link_connects_total{gateway=\"gw\"} 2\n",
            "zonegate_peer_path{peer=\"home2\",path=\"direct\"} 1\n",
            "zonegate_peer_path{peer=\"laptop\",path=\"revoked\"} 1\n",
            "zonegate_peer_path{peer=\"laptop\",path=\"relay\"} 0\n",
            "zonegate_peer_rtt_seconds{peer=\"home2\"} 0.0125\n",
            "zonegate_peer_streams_total{peer=\"home2\",path=\"relay\"} 4\n",
            "zonegate_peer_open_streams{peer=\"home2\",path=\"direct\"} 1\n",
            "zonegate_peer_bytes_in_total{peer=\"home2\",path=\"relay\"} 400\n",
            "zonegate_peer_punches_total{peer=\"laptop\"} 2\n",
            "zonegate_node_streams_cut_total 0\n",
            "# TYPE zonegate_peer_bytes_out_total counter\n",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        // Relayed or revoked: no RTT of the peer's own.
        assert!(
            !text.contains("zonegate_peer_rtt_seconds{peer=\"laptop\"}"),
            "{text}"
        );
        // Every sample line belongs to a metric announced before it.
        let mut typed = std::collections::HashSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap_or("").to_owned());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap_or("");
                assert!(typed.contains(name), "{l}");
            }
        }
    }
}
