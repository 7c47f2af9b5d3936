//! Per-app counters (requests, connections, bytes, refusals and failures by reason) as plain
//! atomics, and a serializable snapshot for `/status` and `/metrics`.

use crate::eval::DenyReason;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a request or connection was refused, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    Denied(DenyReason),
    RateLimited,
    ConnectionLimit,
    BodyTooLarge,
}

const EXTRA: [&str; 3] = ["rate_limited", "connection_limit", "body_too_large"];
const N_REFUSALS: usize = DenyReason::ALL.len() + EXTRA.len();

impl Refusal {
    fn index(self) -> usize {
        match self {
            Refusal::Denied(r) => DenyReason::ALL.iter().position(|x| *x == r).unwrap_or(0),
            Refusal::RateLimited => DenyReason::ALL.len(),
            Refusal::ConnectionLimit => DenyReason::ALL.len() + 1,
            Refusal::BodyTooLarge => DenyReason::ALL.len() + 2,
        }
    }

    /// Stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Denied(r) => r.as_str(),
            other => EXTRA[other.index() - DenyReason::ALL.len()],
        }
    }
}

/// Why a request, connection or flow the policy let through did not reach its service: the
/// device's side, not the client's (a tcp app's failures showed only in the log, counted as
/// connections like any other).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// Its node agent is not connected.
    DeviceOffline,
    /// No device of that name in the zone config (never added, misspelt, revoked).
    NoSuchDevice,
    /// The device does not offer the service (or not over that protocol).
    NoSuchService,
    /// The device could not reach its local service (not running, refused).
    ServiceUnreachable,
    /// The device did not answer in time.
    Timeout,
    /// The tunnel to the device failed.
    Tunnel,
    /// The device's node agent is stopping.
    DeviceStopping,
    /// Refused by the device for another reason (overloaded, rate limited there).
    RefusedByDevice,
}

const FAILURES: [&str; 8] = [
    "device_offline",
    "no_such_device",
    "no_such_service",
    "service_unreachable",
    "timeout",
    "tunnel",
    "device_stopping",
    "refused_by_device",
];

impl Failure {
    fn index(self) -> usize {
        match self {
            Failure::DeviceOffline => 0,
            Failure::NoSuchDevice => 1,
            Failure::NoSuchService => 2,
            Failure::ServiceUnreachable => 3,
            Failure::Timeout => 4,
            Failure::Tunnel => 5,
            Failure::DeviceStopping => 6,
            Failure::RefusedByDevice => 7,
        }
    }

    /// Stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        FAILURES[self.index()]
    }
}

fn label(i: usize) -> &'static str {
    if i < DenyReason::ALL.len() {
        DenyReason::ALL[i].as_str()
    } else {
        EXTRA[i - DenyReason::ALL.len()]
    }
}

/// Counters of one app. Relaxed atomics: each counter is independent and only ever read for
/// display, so no ordering between them is needed.
#[derive(Debug, Default)]
pub struct AppCounters {
    requests: AtomicU64,
    connections: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    refusals: [AtomicU64; N_REFUSALS],
    failures: [AtomicU64; FAILURES.len()],
}

impl AppCounters {
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
    pub fn connection(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }
    /// Bytes from the client towards the service.
    pub fn bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
    }
    /// Bytes from the service towards the client.
    pub fn bytes_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Ordering::Relaxed);
    }
    pub fn refused(&self, why: Refusal) {
        self.refusals[why.index()].fetch_add(1, Ordering::Relaxed);
    }
    pub fn failed(&self, why: Failure) {
        self.failures[why.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CountersSnapshot {
        let refusals = self
            .refusals
            .iter()
            .enumerate()
            .map(|(i, c)| (label(i), c.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect();
        let failures = self
            .failures
            .iter()
            .enumerate()
            .map(|(i, c)| (FAILURES[i], c.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect();
        CountersSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            refusals,
            failures,
        }
    }
}

/// A point-in-time copy of [`AppCounters`]; refusal reasons with a zero count are omitted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CountersSnapshot {
    pub requests: u64,
    pub connections: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub refusals: BTreeMap<&'static str, u64>,
    /// Let through by the policy, but the device's side failed, by reason.
    pub failures: BTreeMap<&'static str, u64>,
}

/// Appends Prometheus text for `(app name, snapshot)` pairs. App names are DNS labels, so they
/// need no escaping inside label values.
pub fn render_prometheus(apps: &[(&str, CountersSnapshot)], out: &mut String) {
    type Getter = fn(&CountersSnapshot) -> u64;
    let simple: [(&str, &str, Getter); 4] = [
        (
            "zonegate_app_requests_total",
            "HTTP requests or UDP flows handled",
            |s| s.requests,
        ),
        (
            "zonegate_app_connections_total",
            "Connections accepted",
            |s| s.connections,
        ),
        (
            "zonegate_app_bytes_in_total",
            "Bytes from clients to the service",
            |s| s.bytes_in,
        ),
        (
            "zonegate_app_bytes_out_total",
            "Bytes from the service to clients",
            |s| s.bytes_out,
        ),
    ];
    for (name, help, get) in simple {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (app, s) in apps {
            let _ = writeln!(out, "{name}{{app=\"{app}\"}} {}", get(s));
        }
    }
    type ByReason = fn(&CountersSnapshot) -> &BTreeMap<&'static str, u64>;
    let by_reason: [(&str, &str, ByReason); 2] = [
        (
            "zonegate_app_refusals_total",
            "Requests or connections refused, by reason",
            |s| &s.refusals,
        ),
        (
            "zonegate_app_failures_total",
            "Requests, connections or flows the policy let through that did not reach the service, by reason",
            |s| &s.failures,
        ),
    ];
    for (name, help, get) in by_reason {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (app, s) in apps {
            for (reason, n) in get(s) {
                let _ = writeln!(out, "{name}{{app=\"{app}\",reason=\"{reason}\"}} {n}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_renders() {
        let c = AppCounters::default();
        c.request();
        c.request();
        c.connection();
        c.bytes_in(10);
        c.bytes_out(20);
        c.refused(Refusal::RateLimited);
        c.refused(Refusal::Denied(DenyReason::Method));
        c.refused(Refusal::Denied(DenyReason::Method));
        c.failed(Failure::NoSuchService);
        let s = c.snapshot();
        assert_eq!(s.failures.get("no_such_service"), Some(&1));
        assert_eq!(s.failures.len(), 1);
        assert_eq!(
            (s.requests, s.connections, s.bytes_in, s.bytes_out),
            (2, 1, 10, 20)
        );
        assert_eq!(s.refusals.get("method"), Some(&2));
        assert_eq!(s.refusals.get("rate_limited"), Some(&1));
        assert_eq!(s.refusals.len(), 2);
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            json.contains("\"refusals\":{\"method\":2,\"rate_limited\":1}"),
            "{json}"
        );
        let mut text = String::new();
        render_prometheus(&[("dfs", s)], &mut text);
        assert!(
            text.contains("zonegate_app_requests_total{app=\"dfs\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("zonegate_app_refusals_total{app=\"dfs\",reason=\"method\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "zonegate_app_failures_total{app=\"dfs\",reason=\"no_such_service\"} 1\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn every_refusal_has_a_distinct_label() {
        let mut all: Vec<Refusal> = DenyReason::ALL
            .iter()
            .map(|r| Refusal::Denied(*r))
            .collect();
        all.extend([
            Refusal::RateLimited,
            Refusal::ConnectionLimit,
            Refusal::BodyTooLarge,
        ]);
        let labels: std::collections::HashSet<&str> = all.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), N_REFUSALS);
        for r in all {
            assert_eq!(label(r.index()), r.as_str());
        }
    }
}
