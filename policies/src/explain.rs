//! Human explanations of decisions, for `zonegate policy explain`: which app, which rule,
//! and why each rule did or did not allow.

use crate::eval::{check_rule, Decision, Requester, Timestamp};
use crate::model::{App, ListenKind, Rule};
use crate::policy::CompiledPolicy;
use std::fmt::Write as _;
use std::net::SocketAddr;

fn describe_rule(rule: &Rule) -> String {
    let mut s = format!("from {}", rule.from);
    if !rule.methods.is_empty() {
        let _ = write!(s, ", methods [{}]", rule.methods.join(", "));
    }
    if !rule.paths.is_empty() {
        let _ = write!(s, ", paths [{}]", rule.paths.join(", "));
    }
    if let Some(w) = &rule.window {
        if let Some(h) = w.hours {
            let _ = write!(
                s,
                ", hours {:02}:{:02}-{:02}:{:02}",
                h.start / 60,
                h.start % 60,
                h.end / 60,
                h.end % 60
            );
        }
        if w.days != crate::model::ALL_DAYS {
            const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
            let days: Vec<&str> = (0..7)
                .filter(|d| w.days & (1 << d) != 0)
                .map(|d| NAMES[d])
                .collect();
            let _ = write!(s, ", days [{}]", days.join(", "));
        }
        let o = w.offset_secs;
        let _ = write!(
            s,
            ", tz {}{:02}:{:02}",
            if o < 0 { '-' } else { '+' },
            o.abs() / 3600,
            o.abs() % 3600 / 60
        );
    }
    s
}

/// Appends one line per rule and the verdict; returns the decision.
fn explain_app(
    policy: &CompiledPolicy,
    out: &mut String,
    app: &App,
    who: &Requester<'_>,
    method: Option<&str>,
    path: Option<&str>,
    now: Timestamp,
) -> Decision {
    let _ = writeln!(
        out,
        "app `{}` ({}) at {}",
        app.name,
        app.summary(),
        app.source
    );
    if app.rules.is_empty() {
        let _ = writeln!(out, "  no allow rule: everything is denied by default");
    }
    for (i, rule) in app.rules.iter().enumerate() {
        let verdict = match check_rule(rule, who, method, path, now) {
            Ok(()) => "matches".to_string(),
            Err(r) => format!("does not match: {r}"),
        };
        let _ = writeln!(
            out,
            "  rule {}: {} -> {verdict}",
            i + 1,
            describe_rule(rule)
        );
    }
    // An HTTP request as the front decides it (a method refused while no method is allowed
    // there now is refused for the time), with the methods a 405 would list.
    let (decision, allow) = match (method, path, &app.listener) {
        (Some(m), Some(p), crate::model::Listener::Http(_)) => {
            policy.decide_http(app, who, m, p, now)
        }
        _ => (
            crate::eval::decide_app(app, who, method, path, now),
            Vec::new(),
        ),
    };
    let _ = writeln!(
        out,
        "result: {} {}",
        if decision.is_allow() { "ALLOW" } else { "DENY" },
        decision
    );
    if !allow.is_empty() {
        let _ = writeln!(out, "allowed here now: {}", allow.join(", "));
    }
    decision
}

/// An explanation: its text, and whether it ends in ALLOW (`policy explain` exits 3 on DENY,
/// for scripts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub text: String,
    pub allowed: bool,
}

impl std::fmt::Display for Explanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::ops::Deref for Explanation {
    type Target = str;
    fn deref(&self) -> &str {
        &self.text
    }
}

impl CompiledPolicy {
    /// Explains an HTTP request by `who` to `host` + `path` with `method`.
    pub fn explain_http(
        &self,
        who: &Requester<'_>,
        host: &str,
        method: Option<&str>,
        path: &str,
        now: Timestamp,
    ) -> Explanation {
        let mut out = format!(
            "request: {who} -> {} {host}{path}\n",
            method.unwrap_or("(any method)")
        );
        let allowed = match self.route_http(host, path) {
            Some(app) => explain_app(self, &mut out, app, who, method, Some(path), now).is_allow(),
            None => {
                let why = self.why_no_route(host, path);
                let _ = writeln!(out, "no http app serves this host and path: {why}");
                out.push_str("result: DENY (no route)\n");
                false
            }
        };
        Explanation { text: out, allowed }
    }

    /// Explains a tcp/udp connection by `who` to `addr`.
    pub fn explain_listen(
        &self,
        who: &Requester<'_>,
        kind: ListenKind,
        addr: SocketAddr,
        now: Timestamp,
    ) -> Explanation {
        let mut out = format!("connection: {who} -> {kind:?} {addr}\n");
        let allowed = match self.app_by_listen(kind, addr) {
            Some(app) => explain_app(self, &mut out, app, who, None, None, now).is_allow(),
            None => {
                out.push_str("no app listens there\nresult: DENY (no route)\n");
                false
            }
        };
        Explanation { text: out, allowed }
    }

    /// Explains a mesh stream from device `from` to `to_device/to_service`.
    pub fn explain_mesh(
        &self,
        from: &str,
        roles: &[&str],
        to_device: &str,
        to_service: &str,
        now: Timestamp,
    ) -> Explanation {
        let who = Requester::Device {
            name: from,
            roles,
            ip: None,
        };
        let mut out = format!("mesh: {who} -> {to_device}/{to_service}\n");
        let mut any = false;
        for app in self.mesh_apps_for_target(to_device, to_service) {
            any = true;
            explain_app(self, &mut out, app, &who, None, None, now);
        }
        if !any {
            out.push_str("no mesh app targets this service\n");
        }
        let d = self.decide_mesh(from, roles, to_device, to_service, now);
        let _ = writeln!(
            out,
            "overall: {}{}",
            if d.decision.is_allow() {
                "ALLOW"
            } else {
                "DENY"
            },
            d.app
                .map(|a| format!(" (app `{}`)", a.name))
                .unwrap_or_default()
        );
        Explanation {
            text: out,
            allowed: d.decision.is_allow(),
        }
    }
}
