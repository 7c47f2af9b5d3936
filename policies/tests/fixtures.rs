//! One test per fixture file in `tests/fixtures/{valid,invalid}`, plus a test that every
//! table of every valid fixture refuses an unknown key. Fixture lists are explicit and their
//! counts asserted against the directories, so a filtering mistake cannot make this vacuous.

use std::path::{Path, PathBuf};

fn fixture(kind: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(kind)
        .join(format!("{name}.toml"))
}

/// The `*.toml` names in a fixture directory, sorted.
fn listed(kind: &str) -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(kind);
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("fixture dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| p.file_stem().expect("stem").to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn check_valid(name: &str, apps: usize) {
    let path = fixture("valid", name);
    let src = std::fs::read_to_string(&path).expect("read fixture");
    match policies::check_str(&path, &src) {
        Ok(p) => assert_eq!(p.apps().len(), apps, "{name}: app count"),
        Err(errs) => panic!(
            "{name} should be valid, got:\n{}",
            errs.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

/// Expectations are `# expect: LINE:COL substring` lines at the top of the fixture, one per
/// error, in the order reported.
fn check_invalid(name: &str) {
    let path = fixture("invalid", name);
    let src = std::fs::read_to_string(&path).expect("read fixture");
    let expects: Vec<(String, String)> = src
        .lines()
        .map_while(|l| l.strip_prefix("# expect: "))
        .map(|l| {
            let (pos, msg) = l.split_once(' ').expect("expect line: POS MESSAGE");
            (pos.to_string(), msg.to_string())
        })
        .collect();
    assert!(!expects.is_empty(), "{name}: no `# expect:` line");
    let errs = match policies::check_str(&path, &src) {
        Ok(_) => panic!("{name} should be refused"),
        Err(e) => e,
    };
    let shown: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        errs.len(),
        expects.len(),
        "{name}: error count; got:\n{}",
        shown.join("\n")
    );
    for ((pos, msg), err) in expects.iter().zip(&errs) {
        let text = err.to_string();
        let prefix = format!("{}:{pos}: ", path.display());
        assert!(
            text.starts_with(&prefix),
            "{name}: expected position {pos}, got {text}"
        );
        assert!(
            text.contains(msg.as_str()),
            "{name}: expected {msg:?} in {text}"
        );
    }
}

macro_rules! valid_fixtures {
    ($($name:ident => $apps:expr),* $(,)?) => {
        mod valid {
            $( #[test] fn $name() { super::check_valid(stringify!($name), $apps) } )*
            pub const NAMES: &[&str] = &[$(stringify!($name)),*];
        }
    };
}

macro_rules! invalid_fixtures {
    ($($name:ident),* $(,)?) => {
        mod invalid {
            $( #[test] fn $name() { super::check_invalid(stringify!($name)) } )*
            pub const NAMES: &[&str] = &[$(stringify!($name)),*];
        }
    };
}

valid_fixtures! {
    empty => 0,
    http_full => 2,
    mesh => 3,
    nested_tables => 1,
    rule_tables => 1,
    tcp_udp => 2,
}

invalid_fixtures! {
    bad_app_name, bad_bandwidth, bad_cidr, bad_day, bad_from, bad_hours, bad_listen, bad_per,
    bad_rate, bad_to, bad_tz, burst_beyond_200_years, burst_without_rate, empty_methods_and_paths,
    from_an_address, from_that_never_matches, limits_that_never_apply,
    lowercase_method, methods_on_tcp, missing_to,
    no_entry_point, port_zero, public_mesh, same_listen, same_route, several_errors, syntax,
    two_entry_points, unclosed_string, unknown_allow_key, unknown_app_key, unknown_limits_key, unknown_role, unknown_top_key,
    wrong_type,
}

#[test]
fn every_fixture_has_a_test() {
    let mut v: Vec<String> = valid::NAMES.iter().map(|s| s.to_string()).collect();
    v.sort();
    assert_eq!(v.len(), 6);
    assert_eq!(listed("valid"), v);
    let mut i: Vec<String> = invalid::NAMES.iter().map(|s| s.to_string()).collect();
    i.sort();
    assert_eq!(i.len(), 35);
    assert_eq!(listed("invalid"), i);
}

/// Paths (key lists) of every table in a TOML document, including tables inside arrays.
fn table_paths(t: &toml::Table, here: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(here.clone());
    for (k, v) in t {
        here.push(k.clone());
        match v {
            toml::Value::Table(t) => table_paths(t, here, out),
            toml::Value::Array(a) => {
                for (i, item) in a.iter().enumerate() {
                    if let toml::Value::Table(t) = item {
                        here.push(format!("#{i}"));
                        table_paths(t, here, out);
                        here.pop();
                    }
                }
            }
            _ => {}
        }
        here.pop();
    }
}

fn table_at<'a>(root: &'a mut toml::Table, path: &[String]) -> &'a mut toml::Table {
    let mut t = root;
    let mut i = 0;
    while i < path.len() {
        let v = t.get_mut(&path[i]).expect("path exists");
        if let Some(idx) = path.get(i + 1).and_then(|s| s.strip_prefix('#')) {
            let idx: usize = idx.parse().expect("index");
            t = v.as_array_mut().expect("array")[idx]
                .as_table_mut()
                .expect("table");
            i += 2;
        } else {
            t = v.as_table_mut().expect("table");
            i += 1;
        }
    }
    t
}

#[test]
fn unknown_key_at_every_level_is_refused() {
    const KEY: &str = "zz_unknown_key";
    let mut tried = 0;
    for name in valid::NAMES {
        let src = std::fs::read_to_string(fixture("valid", name)).expect("read");
        let doc: toml::Table = toml::from_str(&src).expect("valid fixture is TOML");
        let mut paths = Vec::new();
        table_paths(&doc, &mut Vec::new(), &mut paths);
        for path in paths {
            let mut edited = doc.clone();
            table_at(&mut edited, &path).insert(KEY.into(), toml::Value::Integer(1));
            let text = toml::to_string(&edited).expect("serialize");
            let errs = match policies::check_str(Path::new("edited.toml"), &text) {
                Ok(_) => panic!("{name}: unknown key at {path:?} was accepted:\n{text}"),
                Err(e) => e,
            };
            assert!(
                errs.iter().any(|e| e.to_string().contains(KEY)),
                "{name}: error for key at {path:?} does not name it: {errs:?}"
            );
            tried += 1;
        }
    }
    // root + app maps + app tables + http/tcp/udp + allow + limits tables of the fixtures.
    assert!(tried >= 30, "only {tried} tables tried");
}
