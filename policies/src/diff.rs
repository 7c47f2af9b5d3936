//! What changed between two compiled policies, by app name: the reload log line and the
//! decision of which runtime state survives a reload.

use crate::policy::CompiledPolicy;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Added(String),
    Removed(String),
    /// Same name, different behaviour (entry point, target, rules or limits).
    Changed(String),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Added(n) => write!(f, "+{n}"),
            Change::Removed(n) => write!(f, "-{n}"),
            Change::Changed(n) => write!(f, "~{n}"),
        }
    }
}

/// Changes from `old` to `new`, sorted by app name. Moving an app to another file or line is
/// not a change.
pub fn diff(old: &CompiledPolicy, new: &CompiledPolicy) -> Vec<Change> {
    let mut out = Vec::new();
    for app in new.apps() {
        match old.app(&app.name) {
            None => out.push(Change::Added(app.name.clone())),
            Some(o) if !o.same_behaviour(app) => out.push(Change::Changed(app.name.clone())),
            Some(_) => {}
        }
    }
    for app in old.apps() {
        if new.app(&app.name).is_none() {
            out.push(Change::Removed(app.name.clone()));
        }
    }
    out.sort_by(|a, b| name(a).cmp(name(b)));
    out
}

fn name(c: &Change) -> &str {
    match c {
        Change::Added(n) | Change::Removed(n) | Change::Changed(n) => n,
    }
}

/// `+new ~edited -gone`, or `no change`.
pub fn summarize(changes: &[Change]) -> String {
    if changes.is_empty() {
        return "no change".into();
    }
    changes
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn policy(src: &str) -> CompiledPolicy {
        crate::check_str(Path::new("t.toml"), src).unwrap()
    }

    const A: &str = "[app.a]\nmesh = true\nto = \"d/s\"\n";
    const B: &str = "[app.b]\nhttp = { host = \"x.example\" }\nto = \"d/web\"\nallow = { from = [\"public\"] }\n";
    const B2: &str =
        "[app.b]\nhttp = { host = \"x.example\" }\nto = \"d/web\"\nallow = { from = [\"10.0.0.0/8\"] }\n";

    #[test]
    fn identical_is_empty() {
        assert!(diff(&policy(A), &policy(A)).is_empty());
        assert_eq!(summarize(&[]), "no change");
    }

    #[test]
    fn added_removed_changed() {
        let old = policy(&format!("{A}{B}"));
        let new = policy(&format!("{B2}\n[app.c]\nmesh = true\nto = \"d/t\"\n"));
        let d = diff(&old, &new);
        assert_eq!(
            d,
            vec![
                Change::Removed("a".into()),
                Change::Changed("b".into()),
                Change::Added("c".into())
            ]
        );
        assert_eq!(summarize(&d), "-a ~b +c");
    }

    #[test]
    fn moving_an_app_is_not_a_change() {
        let old = policy(&format!("{A}{B}"));
        let new = policy(&format!("\n\n# moved\n{B}{A}"));
        assert!(diff(&old, &new).is_empty());
    }

    #[test]
    fn limit_edit_is_a_change() {
        let old = policy(B);
        let new = policy(&format!("{B}limits = {{ rate = \"5/s\" }}\n"));
        assert_eq!(diff(&old, &new), vec![Change::Changed("b".into())]);
    }
}
