//! Evaluation, limiters and reload through the public API, with injected time.

use policies::{
    check_dir, check_sources, check_str, Decision, DenyReason, LimitKey, ListenKind, PolicyStore,
    Requester, Timestamp,
};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

fn ts(s: &str) -> Timestamp {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .expect("time")
        .into()
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

// A Friday afternoon in +01:00.
const FRI_1600: &str = "2024-06-07T15:00:00Z";

#[test]
fn examples_load() {
    let files = policies::policy_files(&examples()).expect("list");
    assert_eq!(files.len(), 4, "{files:?}");
    let p = check_dir(&examples()).unwrap_or_else(|e| panic!("{e:?}"));
    let names: Vec<&str> = p.apps().iter().map(|a| a.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "dfs",
            "dfs-rw",
            "etcd-peers",
            "etcd-clients",
            "games",
            "ssh"
        ]
    );
}

#[test]
fn http_routing_longest_prefix_and_host_normalization() {
    let p = check_dir(&examples()).expect("examples");
    let name = |h: &str, path: &str| p.route_http(h, path).map(|a| a.name.as_str());
    assert_eq!(name("alice.example", "/dfs/x"), Some("dfs"));
    assert_eq!(
        name("ALICE.example:443", "/dfs/rw/file?x=1"),
        Some("dfs-rw")
    );
    assert_eq!(name("alice.example.", "/dfs"), Some("dfs"));
    assert_eq!(name("alice.example", "/dfsx"), None);
    // Under dfs-rw's prefix but for case: no app (a case-insensitive service would serve it
    // as dfs-rw's under dfs's rules). A shorter prefix in another case is no matter.
    assert_eq!(name("alice.example", "/dfs/RW/file"), None);
    assert_eq!(name("alice.example", "/dfs/Rw"), None);
    assert_eq!(name("alice.example", "/dfs/rwx"), Some("dfs"));
    // Nor under it but for trailing dots or spaces of a name, which FAT and Windows drop.
    assert_eq!(name("alice.example", "/dfs/rw./file"), None);
    assert_eq!(name("alice.example", "/dfs/rw%20/file"), None);
    assert_eq!(name("alice.example", "/dfs/RW.%20./file"), None);
    assert_eq!(name("alice.example", "/dfs/rw.x/file"), Some("dfs"));
    // Or under it once `;` parameters are dropped too (Tomcat, Jetty, Spring drop them).
    assert_eq!(name("alice.example", "/dfs/rw.;x/file"), None);
    assert_eq!(name("alice.example", "/dfs/rw%20;x=1/file"), None);
    assert_eq!(name("alice.example", "/DFS/x"), None);
    assert_eq!(name("bob.example", "/dfs"), None);
    // Why not, for the log line and `policy explain`.
    let why = |h: &str, path: &str| p.why_no_route(h, path);
    assert!(
        why("alice.example", "/dfs/RW/file")
            .contains("falls under app `dfs-rw`'s path /dfs/rw once letter case"),
        "{}",
        why("alice.example", "/dfs/RW/file")
    );
    assert!(why("alice.example", "/dfs/RW/file").contains("under app `dfs`'s rules"));
    assert_eq!(why("bob.example", "/dfs"), "no app has host bob.example");
    assert!(why("alice.example", "/DFS/x")
        .starts_with("no app of host alice.example has a path that covers it (theirs: /dfs"));
    assert!(why("alice.example", "/a%2Fb").contains("encoded '/'"));
    assert!(why("alice.example", "/a%00b").contains("control character"));
    assert_eq!(why("a b", "/"), "the host is not a host name");
}

/// A path no rule covers is refused as a path whatever the method (it was refused as a
/// method, and the front answered 405 with an empty `Allow`); a method that the rules
/// covering the path do not allow is refused as a method.
#[test]
fn a_path_no_rule_covers_is_refused_as_a_path() {
    let src = r#"
[app.files]
http = { host = "alice.example", path = "/dfs" }
to = "home1/dfs"
allow = [
  { from = ["public"], methods = ["GET", "HEAD"], paths = ["/dfs/pub"] },
  { from = ["public"], methods = ["POST"], paths = ["/dfs/upload"] },
]
"#;
    let p = policies::check_str(Path::new("t.toml"), src).expect("policy");
    let app = p.app("files").expect("files");
    let public = Requester::Public {
        ip: ip("198.51.100.7"),
    };
    let now = ts(FRI_1600);
    let reason = |m: &str, path: &str| match p.decide(app, &public, Some(m), Some(path), now) {
        Decision::Deny { reason } => Some(reason),
        Decision::Allow { .. } => None,
    };
    assert_eq!(reason("POST", "/dfs/private"), Some(DenyReason::Path));
    assert_eq!(reason("GET", "/dfs/private"), Some(DenyReason::Path));
    assert_eq!(reason("POST", "/dfs/pub/a"), Some(DenyReason::Method));
    assert_eq!(reason("GET", "/dfs/upload"), Some(DenyReason::Method));
    assert_eq!(reason("GET", "/dfs/pub/a"), None);
}

/// Two http routes that differ only by case or trailing dots are refused: a service that
/// ignores those would serve both as one, and routing refuses what could reach either, so
/// one of them was accepted and never reached.
#[test]
fn routes_that_differ_only_by_case_are_refused() {
    let src = r#"
[app.a]
http = { host = "alice.example", path = "/dfs/RW" }
to = "home1/dfs"
allow = { from = ["public"] }

[app.b]
http = { host = "alice.example", path = "/dfs/rw" }
to = "home1/dfs"
allow = { from = ["public"] }
"#;
    let errs = policies::check_str(Path::new("t.toml"), src).expect_err("accepted");
    let text = errs
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(text.contains("and app `a`'s /dfs/RW"), "{text}");
    // Nested only once folded: `/a.../b` holds `/a/b/c`'s paths to a FAT or Windows disk.
    let nested = src
        .replace("/dfs/RW", "/a.../b")
        .replace("/dfs/rw", "/a/b/c");
    let errs = policies::check_str(Path::new("t.toml"), &nested).expect_err("accepted");
    assert!(
        errs[0].to_string().contains("differ only by case"),
        "{errs:?}"
    );
    // Nested as written: fine.
    let fine = src.replace("/dfs/RW", "/a/b").replace("/dfs/rw", "/a/b/c");
    policies::check_str(Path::new("t.toml"), &fine).expect("nested as written");
}

#[test]
fn http_decisions_and_reasons() {
    let p = check_dir(&examples()).expect("examples");
    let now = ts(FRI_1600);
    let public = Requester::Public {
        ip: ip("198.51.100.7"),
    };
    let dfs = p.route_http("alice.example", "/dfs/a").expect("dfs");
    assert_eq!(
        p.decide(dfs, &public, Some("GET"), Some("/dfs/a"), now),
        Decision::Allow { rule: 0 }
    );
    let d = p.decide(dfs, &public, Some("POST"), Some("/dfs/a"), now);
    assert_eq!(
        d,
        Decision::Deny {
            reason: DenyReason::Method
        }
    );
    assert_eq!(d.to_string(), "denied: the method is not allowed");
    let rw = p.app("dfs-rw").expect("rw");
    assert_eq!(
        p.decide(rw, &public, Some("PUT"), Some("/dfs/rw"), now),
        Decision::Deny {
            reason: DenyReason::NotInFrom
        }
    );
    let office = Requester::Public {
        ip: ip("203.0.113.9"),
    };
    assert!(p
        .decide(rw, &office, Some("PUT"), Some("/dfs/rw"), now)
        .is_allow());
}

#[test]
fn tcp_listen_lookup_and_cidrs() {
    let p = check_dir(&examples()).expect("examples");
    let addr: SocketAddr = "192.0.2.1:2222".parse().expect("addr");
    let ssh = p
        .app_by_listen(ListenKind::Tcp, addr)
        .expect("wildcard owns the port");
    assert_eq!(ssh.name, "ssh");
    assert!(p.app_by_listen(ListenKind::Udp, addr).is_none());
    let now = ts(FRI_1600);
    let office = Requester::Public {
        ip: ip("203.0.113.9"),
    };
    let office6 = Requester::Public {
        ip: ip("2001:db8:42::1"),
    };
    let other = Requester::Public {
        ip: ip("198.51.100.7"),
    };
    assert!(p.decide(ssh, &office, None, None, now).is_allow());
    assert!(p.decide(ssh, &office6, None, None, now).is_allow());
    // The office as a dual-stack `[::]` listener sees it: an IPv4-mapped IPv6 address.
    let office_mapped = Requester::Public {
        ip: ip("::ffff:203.0.113.9"),
    };
    assert!(p.decide(ssh, &office_mapped, None, None, now).is_allow());
    let other_mapped = Requester::Public {
        ip: ip("::ffff:198.51.100.7"),
    };
    assert!(!p.decide(ssh, &other_mapped, None, None, now).is_allow());
    assert_eq!(
        p.decide(ssh, &other, None, None, now),
        Decision::Deny {
            reason: DenyReason::NotInFrom
        }
    );
}

#[test]
fn kids_tablet_time_window() {
    let p = check_dir(&examples()).expect("examples");
    let check = |when: &str| {
        p.decide_mesh("kids-tablet", &[], "home1", "game-server", ts(when))
            .decision
    };
    // 15:00-19:00 at +01:00 on weekdays = 14:00-18:00 UTC.
    assert!(
        check("2024-06-07T14:00:00Z").is_allow(),
        "friday 15:00 local"
    );
    assert!(
        check("2024-06-07T17:59:00Z").is_allow(),
        "friday 18:59 local"
    );
    assert_eq!(
        check("2024-06-07T18:00:00Z"),
        Decision::Deny {
            reason: DenyReason::OutsideHours
        }
    );
    assert_eq!(
        check("2024-06-07T08:00:00Z"),
        Decision::Deny {
            reason: DenyReason::OutsideHours
        }
    );
    assert_eq!(
        check("2024-06-08T09:30:00Z"),
        Decision::Allow { rule: 1 },
        "saturday 10:30 local"
    );
    let parents = p.decide_mesh(
        "parents-laptop",
        &[],
        "home1",
        "game-server",
        ts("2024-06-07T02:00:00Z"),
    );
    assert_eq!(parents.decision, Decision::Allow { rule: 2 });
    let explained = p.explain_mesh(
        "kids-tablet",
        &[],
        "home1",
        "game-server",
        ts("2024-06-07T20:00:00Z"),
    );
    assert!(
        explained.contains("rule 1: from [device:kids-tablet], hours 15:00-19:00"),
        "{explained}"
    );
    assert!(
        explained.contains("outside the allowed hours"),
        "{explained}"
    );
    assert!(
        explained.contains("overall: DENY (app `games`)"),
        "{explained}"
    );
}

#[test]
fn mesh_roles_and_default_deny() {
    let p = check_dir(&examples()).expect("examples");
    let now = ts(FRI_1600);
    assert!(p
        .decide_mesh("gw1", &["gateway"], "home2", "etcd-peer", now)
        .decision
        .is_allow());
    let d = p.decide_mesh("laptop", &["node"], "home2", "etcd-peer", now);
    assert_eq!(
        d.decision,
        Decision::Deny {
            reason: DenyReason::NotInFrom
        }
    );
    assert_eq!(d.app.map(|a| a.name.as_str()), Some("etcd-peers"));
    let none = p.decide_mesh("home1", &[], "home2", "secret", now);
    assert_eq!(
        (none.app.is_none(), none.decision),
        (
            true,
            Decision::Deny {
                reason: DenyReason::NoMeshApp
            }
        )
    );
    let q = check_str(Path::new("q.toml"), "[app.b]\nmesh = true\nto = \"h/b\"\n").expect("valid");
    assert_eq!(
        q.decide_mesh("home1", &[], "h", "b", now).decision,
        Decision::Deny {
            reason: DenyReason::NoAllowRule
        }
    );
}

#[test]
fn explain_http_names_app_and_rule() {
    let p = check_dir(&examples()).expect("examples");
    let who = Requester::Public {
        ip: ip("198.51.100.7"),
    };
    let text = p.explain_http(
        &who,
        "alice.example",
        Some("DELETE"),
        "/dfs/a",
        ts(FRI_1600),
    );
    assert!(text.contains("app `dfs`"), "{text}");
    assert!(text.contains("rule 1: from [public], methods [GET, HEAD] -> does not match: the method is not allowed"), "{text}");
    assert!(text.contains("result: DENY"), "{text}");
    let none = p.explain_http(&who, "nobody.example", None, "/", ts(FRI_1600));
    assert!(none.contains("no http app serves this host"), "{none}");
}

#[test]
fn every_error_of_every_file_and_duplicates_across_files() {
    let a = (PathBuf::from("a.toml"), "[app.x]\nmesh = true\nto = \"d/s\"\n[app.y]\nhttp = { host = \"bad host\" }\nto = \"d/s\"\n".to_string());
    let b = (
        PathBuf::from("b.toml"),
        "[app.x]\nmesh = true\nto = \"d/t\"\n[app.z]\ntcp = { listen = \"nope\" }\nto = \"D/s\"\n"
            .to_string(),
    );
    let errs: Vec<String> = check_sources(&[a, b])
        .expect_err("invalid")
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert_eq!(errs.len(), 4, "{errs:#?}");
    assert!(
        errs[0].starts_with("a.toml:5:17: app `y`: invalid host"),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("b.toml:1:6: duplicate app `x`: already defined at a.toml:1:6"),
        "{errs:#?}"
    );
    assert!(
        errs[2].starts_with("b.toml:5:18: app `z`: invalid listen address"),
        "{errs:#?}"
    );
    assert!(
        errs[3].starts_with("b.toml:6:6: app `z`: invalid device name \"D\""),
        "{errs:#?}"
    );
}

/// An IPv4-mapped listen address is taken as the IPv4 one it is: it slipped past the overlap
/// checks (with another app on the same IPv4 address and port, or the gateway's own sockets)
/// and then failed to bind.
#[test]
fn an_ipv4_mapped_listen_address_is_the_ipv4_one() {
    let app = |name: &str, listen: &str| {
        format!("[app.{name}]\ntcp = {{ listen = \"{listen}\" }}\nto = \"d/s\"\n")
    };
    let p = check_sources(&[(
        PathBuf::from("m.toml"),
        app("m", "[::ffff:203.0.113.5]:2222"),
    )])
    .expect("a mapped address is an address");
    assert_eq!(
        p.app("m").unwrap().listener,
        policies::Listener::Tcp("203.0.113.5:2222".parse().unwrap())
    );
    let errs: Vec<String> = check_sources(&[
        (PathBuf::from("a.toml"), app("a", "203.0.113.5:2222")),
        (
            PathBuf::from("m.toml"),
            app("m", "[::ffff:203.0.113.5]:2222"),
        ),
    ])
    .expect_err("the same address twice")
    .iter()
    .map(|e| e.to_string())
    .collect();
    assert!(
        errs.iter().any(|e| e.contains("overlaps app `a`")),
        "{errs:#?}"
    );
    // Plain IPv6 and IPv4 stay as they are, a link-local address with its scope (without it,
    // it cannot be bound).
    for listen in [
        "[::1]:2222",
        "[::]:2222",
        "127.0.0.1:2222",
        "[fe80::1%2]:2222",
    ] {
        let p = check_sources(&[(PathBuf::from("m.toml"), app("m", listen))]).expect(listen);
        assert_eq!(
            p.app("m").unwrap().listener,
            policies::Listener::Tcp(listen.parse().unwrap())
        );
    }
}

/// A list written as a single string (`from = "public"`) is told to be written in brackets,
/// not as serde's "invalid type: string, expected a sequence".
#[test]
fn a_string_where_a_list_goes_says_to_write_brackets() {
    let src =
        "[app.m]\nhttp = { host = \"a.example\" }\nto = \"d/s\"\nallow = { from = \"public\" }\n";
    let errs: Vec<String> = check_sources(&[(PathBuf::from("m.toml"), src.to_string())])
        .expect_err("refused")
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert!(
        errs.iter()
            .any(|e| e.starts_with("m.toml:4:")
                && e.contains("expected a list: write it in brackets")),
        "{errs:#?}"
    );
}

/// A file of many broken lines is told by its first 100 errors and a count of the rest (each
/// error was a log line of the gateway's, and each position a scan from the file's start);
/// another file's errors are told in full after it.
#[test]
fn a_file_of_many_errors_is_told_by_its_first_hundred_and_a_count() {
    let many = format!("[app.x]\n{}", "z = 1\n".repeat(251));
    let few = "[app.y]\nmesh = true\nto = \"D/s\"\n".to_string();
    let errs: Vec<String> = check_sources(&[
        (PathBuf::from("many.toml"), many),
        (PathBuf::from("y.toml"), few),
    ])
    .expect_err("refused")
    .iter()
    .map(|e| e.to_string())
    .collect();
    assert_eq!(errs.len(), 102, "{errs:#?}");
    assert!(
        errs[0].starts_with("many.toml:3:1: duplicate key"),
        "{errs:#?}"
    );
    assert!(
        errs[99].starts_with("many.toml:102:1: duplicate key"),
        "{errs:#?}"
    );
    assert_eq!(
        errs[100],
        "many.toml: 150 more errors in this file, not listed: fix the ones above first"
    );
    assert!(
        errs[101].starts_with("y.toml:3:6: app `y`: invalid device name"),
        "{errs:#?}"
    );
}

fn rate_policy(rate: &str, extra: &str) -> policies::CompiledPolicy {
    let src = format!("[app.a]\nhttp = {{ host = \"a.example\" }}\nto = \"d/s\"\nallow = {{ from = [\"public\"] }}\nlimits = {{ rate = \"{rate}\"{extra} }}\n");
    check_str(Path::new("r.toml"), &src).expect("valid")
}

/// `10/min` without a burst: ten at once, then one every 6 s (it was one every 6 s from the
/// first: an `ssh` and then an `scp` were refused).
#[tokio::test(start_paused = true)]
async fn a_rate_per_minute_allows_its_count_at_once() {
    let p = rate_policy("10/min", "");
    let limits = policies::AppLimits::new(&p.apps()[0].limits);
    let a = Requester::Public {
        ip: ip("198.51.100.1"),
    };
    for i in 0..10 {
        assert!(
            limits.check_rate(&a).is_ok(),
            "connection {i} within the minute's count"
        );
    }
    assert!(
        limits.check_rate(&a).is_err(),
        "the 11th at once is refused"
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(limits.check_rate(&a).is_ok(), "one more after 6 s");
}

#[tokio::test(start_paused = true)]
async fn rate_limit_with_paused_clock() {
    let p = rate_policy("5/s", "");
    let limits = policies::AppLimits::new(&p.apps()[0].limits);
    let a = Requester::Public {
        ip: ip("198.51.100.1"),
    };
    let b = Requester::Public {
        ip: ip("198.51.100.2"),
    };
    for i in 0..5 {
        assert!(limits.check_rate(&a).is_ok(), "request {i} within burst");
    }
    let retry = limits.check_rate(&a).expect_err("6th refused").0;
    assert!(
        retry > Duration::from_millis(150) && retry <= Duration::from_millis(200),
        "{retry:?}"
    );
    assert!(
        limits.check_rate(&b).is_ok(),
        "other clients are not affected"
    );
    tokio::time::advance(Duration::from_millis(200)).await;
    assert!(limits.check_rate(&a).is_ok(), "one more after 1/5 s");
    assert!(limits.check_rate(&a).is_err());
}

#[tokio::test(start_paused = true)]
async fn ipv6_clients_share_their_64() {
    let p = rate_policy("1/min", ", burst = 1");
    let limits = policies::AppLimits::new(&p.apps()[0].limits);
    assert!(limits
        .check_rate(&Requester::Public {
            ip: ip("2001:db8:1:2::1")
        })
        .is_ok());
    assert!(limits
        .check_rate(&Requester::Public {
            ip: ip("2001:db8:1:2::ffff")
        })
        .is_err());
    assert!(limits
        .check_rate(&Requester::Public {
            ip: ip("2001:db8:1:3::1")
        })
        .is_ok());
}

/// A rate above 10^9/s is as good as unlimited, never the 1/s fallback of a zero period.
#[tokio::test(start_paused = true)]
async fn a_huge_rate_is_not_one_per_second() {
    let p = rate_policy("4000000000/s", ", burst = 1");
    let cfg = p.apps()[0].limits.rate.expect("rate");
    let limiter = policies::limits::RateLimiter::new(cfg);
    let key = || LimitKey::client_ip(ip("10.0.0.1"));
    assert!(limiter.check(key()).is_ok());
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(limiter.check(key()).is_ok(), "limited to 1/s");
}

#[tokio::test(start_paused = true)]
async fn limiter_memory_bounded_under_100k_clients() {
    let p = rate_policy("50/s", "");
    let cfg = p.apps()[0].limits.rate.expect("rate");
    let limiter = policies::limits::RateLimiter::with_max_keys(cfg, 10_000);
    let mut refused = 0;
    for i in 0..100_000u32 {
        let addr = IpAddr::V4((0x0a00_0000 + i).into());
        if limiter.check(LimitKey::client_ip(addr)).is_err() {
            refused += 1;
        }
    }
    assert!(limiter.len() <= 10_000, "len {}", limiter.len());
    // Past the cap new clients share the overflow buckets, of burst 50 each.
    let overflow = policies::limits::OVERFLOW_BUCKETS as u32 * 50;
    assert!(refused >= 100_000 - 10_000 - overflow, "refused {refused}");
    tokio::time::advance(Duration::from_secs(2)).await;
    limiter.maintain();
    assert_eq!(limiter.len(), 0, "recovered keys are forgotten");
    assert!(limiter.check(LimitKey::client_ip(ip("10.9.9.9"))).is_ok());
}

/// One IPv6 /48 holds 65,536 /64s, each a key of its own: enough to fill a table. Its
/// clients past the cap then share one overflow bucket, which it drains; a newcomer from
/// another network lands on another bucket and is served.
#[tokio::test(start_paused = true)]
async fn a_network_that_fills_the_table_drains_only_its_own_overflow_bucket() {
    // A burst far above what the ~3 newcomers per bucket below need.
    let p = rate_policy("1/min", ", burst = 1000");
    let cfg = p.apps()[0].limits.rate.expect("rate");
    let limiter = policies::limits::RateLimiter::with_max_keys(cfg, 1_000);
    let attacker = |i: u32| {
        LimitKey::client_ip(IpAddr::V6(
            ((0x2001_0db8_0001u128 << 80) | (u128::from(i) << 64)).into(),
        ))
    };
    for i in 0..5_000 {
        let _ = limiter.check(attacker(i));
    }
    assert!(limiter.len() <= 1_000, "len {}", limiter.len());
    let drained = limiter.overflow_key(attacker(0));
    assert!(
        limiter.check(attacker(9_999)).is_err(),
        "the attacker's bucket is empty"
    );
    // Newcomers from other /48s whose bucket is not the attacker's: all served.
    let mut served = 0;
    for net in 2..200u128 {
        let newcomer = LimitKey::client_ip(IpAddr::V6(
            ((0x2001_0db8_0000u128 << 80) | (net << 80) | 1).into(),
        ));
        if limiter.overflow_key(newcomer) == drained {
            continue;
        }
        assert!(limiter.check(newcomer).is_ok(), "network {net} starved");
        served += 1;
    }
    assert!(served > 150, "{served}");
    // Addresses of one /48 (and one IPv4 /24) share their bucket.
    assert_eq!(limiter.overflow_key(attacker(1)), drained);
    let v4 = |a: &str| limiter.overflow_key(LimitKey::client_ip(ip(a)));
    assert_eq!(v4("198.51.100.1"), v4("198.51.100.250"));
}

#[test]
fn connection_limits_release_on_drop() {
    let p = rate_policy(
        "5/s",
        ", max_connections = 3, max_connections_per_client = 2",
    );
    let limits = policies::AppLimits::new(&p.apps()[0].limits);
    let a = Requester::Public {
        ip: ip("198.51.100.1"),
    };
    let b = Requester::Public {
        ip: ip("198.51.100.2"),
    };
    let g1 = limits.connect(&a).expect("1");
    let _g2 = limits.connect(&a).expect("2");
    assert_eq!(
        limits.connect(&a).expect_err("per client").to_string(),
        "the client has reached max_connections_per_client"
    );
    let _g3 = limits.connect(&b).expect("3");
    assert!(matches!(
        limits.connect(&b),
        Err(policies::limits::ConnLimitExceeded::App)
    ));
    assert_eq!(limits.connections.open(), 3);
    drop(g1);
    assert_eq!(limits.connections.open(), 2);
    let _g4 = limits.connect(&b).expect("slot freed");
    assert_eq!(limits.connections.tracked_clients(), 2);
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write");
}

const APP_A: &str = "[app.a]\nhttp = { host = \"a.example\" }\nto = \"d/s\"\nallow = { from = [\"public\"] }\nlimits = { rate = \"1/min\", burst = 1 }\n";

#[tokio::test(start_paused = true)]
async fn reload_keeps_old_policy_on_error_and_state_across_reloads() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "a.toml", APP_A);
    let store = PolicyStore::load(dir.path()).expect("load");
    let who = Requester::Public {
        ip: ip("198.51.100.1"),
    };
    {
        let cur = store.current();
        let app = cur.policy.app("a").expect("a");
        cur.state(app).counters.request();
        assert!(cur.state(app).limits.check_rate(&who).is_ok());
    }
    write(dir.path(), "b.toml", "[app.b]\nmesh = true\nto = \"d/t\"\n");
    let changes = store.reload().expect("reload");
    assert_eq!(changes, vec![policies::Change::Added("b".into())]);
    let cur = store.current();
    let app = cur.policy.app("a").expect("a survives");
    assert_eq!(
        cur.state(app).counters.snapshot().requests,
        1,
        "counters kept"
    );
    assert!(
        cur.state(app).limits.check_rate(&who).is_err(),
        "limiter state kept"
    );

    write(
        dir.path(),
        "b.toml",
        "[app.b]\nmesh = true\nto = \"d/t\"\nbroken = \n",
    );
    let errs = store.reload().expect_err("broken");
    assert!(errs[0].to_string().contains("b.toml:4:"), "{errs:?}");
    let status = store.last_reload();
    assert!(
        !status.ok && status.errors.len() == errs.len() && status.apps == 2,
        "{status:?}"
    );
    assert!(
        store.current().policy.app("b").is_some(),
        "old policy still serving"
    );
    let json = serde_json::to_string(&status).expect("json");
    assert!(json.contains("\"ok\":false"), "{json}");

    std::fs::remove_file(dir.path().join("b.toml")).expect("rm");
    assert_eq!(
        store.reload().expect("ok"),
        vec![policies::Change::Removed("b".into())]
    );
    assert!(store.last_reload().ok);
}

/// An edit that empties what serves — a file whose apps serve now blank, a directory now
/// without files — is the shape of a save or copy in progress and is refused; removing apps
/// on purpose goes by deleting their file or leaving a comment in it.
#[tokio::test(start_paused = true)]
async fn an_emptied_file_or_directory_is_refused_and_a_comment_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "a.toml", APP_A);
    write(dir.path(), "b.toml", "[app.b]\nmesh = true\nto = \"d/t\"\n");
    let store = PolicyStore::load(dir.path()).expect("load");

    write(dir.path(), "a.toml", "");
    let errs = store.reload().expect_err("an emptied file");
    assert!(
        errs.len() == 1 && errs[0].to_string().contains("a.toml: is empty now"),
        "{errs:?}"
    );
    assert!(store.current().policy.app("a").is_some(), "a still serves");
    write(dir.path(), "a.toml", "  \n");
    assert!(store.reload().is_err(), "blank is empty too");

    write(dir.path(), "a.toml", "# a is gone for now\n");
    assert_eq!(
        store.reload().expect("a comment"),
        vec![policies::Change::Removed("a".into())]
    );
    // Emptied again: it held only a comment, and still no app is dropped by it.
    write(dir.path(), "a.toml", "");
    assert_eq!(store.reload().expect("no text lost"), vec![]);
    // An app moved to another file, the old one left blank: nothing is dropped.
    write(dir.path(), "a.toml", APP_A);
    assert!(store.reload().is_ok());
    write(dir.path(), "c.toml", APP_A);
    write(dir.path(), "a.toml", "");
    assert_eq!(store.reload().expect("a moved to c.toml"), vec![]);
    std::fs::remove_file(dir.path().join("c.toml")).expect("rm");
    assert!(store.reload().is_ok());

    std::fs::remove_file(dir.path().join("a.toml")).expect("rm");
    std::fs::remove_file(dir.path().join("b.toml")).expect("rm");
    let errs = store.reload().expect_err("no files at all");
    assert!(
        errs[0].to_string().contains("holds no policy files now"),
        "{errs:?}"
    );
    assert!(store.current().policy.app("b").is_some(), "b still serves");
    write(dir.path(), "none.toml", "# no apps\n");
    assert_eq!(
        store.reload().expect("a comment"),
        vec![policies::Change::Removed("b".into())]
    );
}

/// A file cut short — a part of the start of the text that serves, ending mid-line, its apps
/// gone (a save stopped in the comments that open it) — is refused like an emptied one; the
/// same comments saved whole (ending in a new line) drop the apps as asked. A directory
/// named like a policy file is refused as one that cannot be read, the apps of the file it
/// replaced serving on.
#[tokio::test(start_paused = true)]
async fn a_file_cut_short_or_replaced_by_a_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!("# The a app: read-only view.\n# Edit with care.\n{APP_A}");
    write(dir.path(), "a.toml", &text);
    write(dir.path(), "b.toml", "[app.b]\nmesh = true\nto = \"d/t\"\n");
    let store = PolicyStore::load(dir.path()).expect("load");

    write(dir.path(), "a.toml", &text[..40]);
    let errs = store.reload().expect_err("a file cut short");
    assert!(
        errs.len() == 1
            && errs[0]
                .to_string()
                .contains("a.toml: ends mid-line after 40 of the"),
        "{errs:?}"
    );
    assert!(store.current().policy.app("a").is_some(), "a still serves");

    std::fs::remove_file(dir.path().join("a.toml")).expect("rm");
    std::fs::create_dir(dir.path().join("a.toml")).expect("mkdir");
    let errs = store.reload().expect_err("a directory");
    assert!(
        errs.iter()
            .any(|e| e.to_string().contains("a.toml: is a directory")),
        "{errs:?}"
    );
    assert!(store.current().policy.app("a").is_some(), "a still serves");
    std::fs::remove_dir(dir.path().join("a.toml")).expect("rmdir");

    // The opening comments saved whole: the apps go, as asked.
    write(dir.path(), "a.toml", "# The a app: read-only view.\n");
    assert_eq!(
        store.reload().expect("a comment saved whole"),
        vec![policies::Change::Removed("a".into())]
    );
}

#[tokio::test(start_paused = true)]
async fn watcher_picks_up_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "a.toml", APP_A);
    let store = Arc::new(PolicyStore::load(dir.path()).expect("load"));
    let _guard = policies::spawn_watcher(store.clone(), Duration::from_millis(100));
    tokio::time::sleep(Duration::from_millis(150)).await;
    write(dir.path(), "b.toml", "[app.b]\nmesh = true\nto = \"d/t\"\n");
    // Wait on the observable result, polling in paused time: bounded, no wall-clock sleep.
    let mut seen = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if store.current().policy.app("b").is_some() {
            seen = true;
            break;
        }
    }
    assert!(seen, "watcher did not reload: {:?}", store.last_reload());
    assert_eq!(store.last_reload().changes, vec!["+b".to_string()]);
}

/// A same-size edit that keeps the file's modification time (`cp -p`, `rsync -a`, `touch -r`,
/// or one within the time's granularity on some file systems) is seen: it went unnoticed
/// while size and modification time were all the watcher compared.
#[tokio::test(start_paused = true)]
async fn watcher_sees_a_same_size_edit_that_keeps_the_modification_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.toml");
    write(dir.path(), "a.toml", APP_A);
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let store = Arc::new(PolicyStore::load(dir.path()).expect("load"));
    let _guard = policies::spawn_watcher(store.clone(), Duration::from_millis(100));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let edited = APP_A.replace("1/min", "2/min");
    assert_eq!(edited.len(), APP_A.len());
    write(dir.path(), "a.toml", &edited);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let mut seen = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if store.last_reload().changes == vec!["~a".to_string()] {
            seen = true;
            break;
        }
    }
    assert!(seen, "watcher missed the edit: {:?}", store.last_reload());
}

/// An editor that truncates and then writes: the empty file is a valid policy (no apps), but
/// a watcher that catches it must not adopt it — the app would vanish (listeners closed,
/// counters and limiters reset) until the next poll. Only a state that holds still for one
/// poll is read.
#[tokio::test(start_paused = true)]
async fn watcher_waits_for_a_save_to_finish() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "a.toml", APP_A);
    let store = Arc::new(PolicyStore::load(dir.path()).expect("load"));
    {
        let cur = store.current();
        cur.state(cur.policy.app("a").expect("a"))
            .counters
            .request();
    }
    let poll = Duration::from_millis(100);
    let _guard = policies::spawn_watcher(store.clone(), poll);
    tokio::time::sleep(poll / 2).await;
    // Caught half-saved by one poll, complete by the next.
    write(dir.path(), "a.toml", "");
    tokio::time::sleep(poll).await;
    assert!(
        store.current().policy.app("a").is_some(),
        "a half-saved file was adopted"
    );
    write(dir.path(), "a.toml", &format!("{APP_A}# edited\n"));
    for _ in 0..10 {
        tokio::time::sleep(poll).await;
    }
    let status = store.last_reload();
    assert!(status.ok, "{status:?}");
    let cur = store.current();
    let app = cur.policy.app("a").expect("a serves");
    assert_eq!(
        cur.state(app).counters.snapshot().requests,
        1,
        "the app never went away, its counters stay"
    );
}

/// An edit made between loading the policy and starting the watcher (the gateway's start-up)
/// is picked up.
#[tokio::test(start_paused = true)]
async fn watcher_sees_an_edit_made_before_it_started() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "a.toml", APP_A);
    let store = Arc::new(PolicyStore::load(dir.path()).expect("load"));
    write(dir.path(), "b.toml", "[app.b]\nmesh = true\nto = \"d/t\"\n");
    let _guard = policies::spawn_watcher(store.clone(), Duration::from_millis(100));
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        store.current().policy.app("b").is_some(),
        "{:?}",
        store.last_reload()
    );
}

proptest::proptest! {
    /// Policy text is user input: any string is an Ok or a list of positioned errors, never a
    /// panic.
    #[test]
    fn arbitrary_text_never_panics(s in "(\\[app\\.[a-z]{1,3}\\]\n|[a-z_]{1,8} = |\"[^\"\n]{0,12}\"|\\{|\\}|\\[|\\]|, |\n|[0-9:/.-]{1,6}){0,30}") {
        if let Err(errs) = check_str(Path::new("p.toml"), &s) {
            proptest::prop_assert!(!errs.is_empty());
        }
    }

    #[test]
    fn value_parsers_never_panic(s in "\\PC{0,16}") {
        let _ = policies::units::parse_rate(&s);
        let _ = policies::units::parse_size(&s);
        let _ = policies::units::parse_hours(&s);
        let _ = policies::units::parse_tz(&s);
        let _ = policies::units::parse_host(&s);
        let p = check_dir(&examples()).expect("examples");
        let _ = p.route_http(&s, &s);
    }
}

#[test]
fn ipv4_mapped_networks_match_ipv4_clients() {
    let src = "[app.a]\ntcp = { listen = \"0.0.0.0:1\" }\nto = \"d/s\"\nallow = { from = [\"::ffff:192.168.0.0/112\"] }\n";
    let p = check_str(Path::new("m.toml"), src).expect("valid");
    let app = &p.apps()[0];
    for (client, allowed) in [
        ("192.168.3.4", true),
        ("::ffff:192.168.3.4", true),
        ("192.169.0.1", false),
    ] {
        let who = Requester::Public { ip: ip(client) };
        let d = p.decide(app, &who, None, None, ts(FRI_1600));
        assert_eq!(d.is_allow(), allowed, "{client}");
    }
}

#[test]
fn listeners_of_other_families_do_not_overlap() {
    let src = "[app.a]\ntcp = { listen = \"0.0.0.0:80\" }\nto = \"d/s\"\n[app.b]\ntcp = { listen = \"[::1]:80\" }\nto = \"d/s\"\n";
    assert!(check_str(Path::new("o.toml"), src).is_ok());
    let dual = "[app.a]\ntcp = { listen = \"[::]:80\" }\nto = \"d/s\"\n[app.b]\ntcp = { listen = \"127.0.0.1:80\" }\nto = \"d/s\"\n";
    assert!(check_str(Path::new("o.toml"), dual).is_err());
}

/// A UDP flow takes a `bandwidth` added while it runs (a flow may last days): its shapers
/// follow the app's buckets whether or not a limit was set when it began. An unlimited
/// flow stayed unlimited until it ended.
#[tokio::test(start_paused = true)]
async fn a_udp_flow_takes_a_bandwidth_limit_added_while_it_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = |limits: &str| {
        format!("[app.u]\nudp = {{ listen = \"127.0.0.1:5000\" }}\nto = \"d/s\"\nallow = {{ from = [\"public\"] }}\n{limits}\n")
    };
    write(dir.path(), "u.toml", &app(""));
    let store = PolicyStore::load(dir.path()).expect("load");
    let (shape_in, _) = {
        let cur = store.current();
        let a = cur.policy.app("u").expect("u");
        cur.state(a).limits.datagram_shapers()
    };
    for _ in 0..1000 {
        assert!(shape_in.try_take(1200), "unlimited");
    }
    write(
        dir.path(),
        "u.toml",
        &app("limits = { bandwidth = \"100KiB/s\" }"),
    );
    store.reload().expect("reload");
    let mut passed = 0;
    while shape_in.try_take(1200) {
        passed += 1;
        assert!(
            passed < 1000,
            "the added limit did not apply to the running flow"
        );
    }
}

/// A rate limit commented out and back in, or its `per` changed, gives no client in use a
/// fresh burst either: the removed limiter is kept for a whole burst's refill and replaced as
/// an edited one is; a `per` edit counts every client as empty from the edit (the old keys
/// name none of the new ones). Before, both handed everyone a full bucket.
#[tokio::test(start_paused = true)]
async fn a_rate_limit_removed_and_back_or_per_edited_gives_no_fresh_burst() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = |limits: &str| {
        format!("[app.a]\nhttp = {{ host = \"a.example\" }}\nto = \"d/s\"\nallow = {{ from = [\"public\"] }}\n{limits}\n")
    };
    let limited = |per: &str| {
        app(&format!(
            "limits = {{ rate = \"5/s\", burst = 5, per = \"{per}\" }}"
        ))
    };
    write(dir.path(), "a.toml", &limited("client-ip"));
    let store = PolicyStore::load(dir.path()).expect("load");
    let limits = |s: &PolicyStore| {
        let cur = s.current();
        let a = cur.policy.app("a").expect("a");
        cur.state(a).limits.clone()
    };
    let who = Requester::Public {
        ip: ip("198.51.100.1"),
    };
    let drain = |l: &policies::AppLimits| {
        for _ in 0..5 {
            assert!(l.check_rate(&who).is_ok());
        }
        assert!(l.check_rate(&who).is_err(), "throttled");
    };
    drain(&limits(&store));
    // Out, and back in half a second later.
    write(dir.path(), "a.toml", &app(""));
    store.reload().expect("reload");
    assert!(limits(&store).check_rate(&who).is_ok(), "no limit");
    tokio::time::advance(Duration::from_millis(500)).await;
    write(dir.path(), "a.toml", &limited("client-ip"));
    store.reload().expect("reload");
    let back = limits(&store);
    // The limiter itself, refilled over the gap at 5/s: 2.5 of 5 back after 0.5 s.
    let mut granted = 0;
    while back.check_rate(&who).is_ok() {
        granted += 1;
        assert!(granted <= 5, "a fresh burst after the limit came back");
    }
    assert!(
        (2..=3).contains(&granted),
        "not what refilled over the gap: {granted}"
    );
    // Out, and back at another rate 0.3 s later: empty from the removal, refilling at the
    // new rate (10/s) since — a client idle through the gap is not charged afresh.
    let drained = limits(&store);
    while drained.check_rate(&who).is_ok() {}
    write(dir.path(), "a.toml", &app(""));
    store.reload().expect("reload");
    tokio::time::advance(Duration::from_millis(300)).await;
    write(
        dir.path(),
        "a.toml",
        &app("limits = { rate = \"10/s\", burst = 5 }"),
    );
    store.reload().expect("reload");
    let other = limits(&store);
    let mut granted = 0;
    while other.check_rate(&who).is_ok() {
        granted += 1;
        assert!(granted <= 5, "a fresh burst at the new rate");
    }
    assert!((2..=4).contains(&granted), "{granted}");

    // Back after longer than a whole refill: everyone has their burst, as they would have.
    write(dir.path(), "a.toml", &app(""));
    store.reload().expect("reload");
    tokio::time::advance(Duration::from_secs(2)).await;
    write(dir.path(), "a.toml", &limited("client-ip"));
    store.reload().expect("reload");
    drain(&limits(&store));

    // `per` edited while in use: the app's one bucket starts empty, not full.
    write(dir.path(), "a.toml", &limited("app"));
    store.reload().expect("reload");
    assert!(
        limits(&store).check_rate(&who).is_err(),
        "a fresh burst after the per edit"
    );
}

/// A rate edited some time after its last use (any time at all: a nanosecond) gives the
/// client what its bucket held, not a token more: the time since the edit was rounded up to a
/// whole token, so with a burst of 1 each edit was a fresh burst (1/h edited to 2/h and back,
/// again and again: two requests after every edit).
#[tokio::test(start_paused = true)]
async fn a_rate_edited_later_gives_no_token_more() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = |rate: &str, burst: u32| {
        format!("[app.a]\nhttp = {{ host = \"a.example\" }}\nto = \"d/s\"\nallow = {{ from = [\"public\"] }}\nlimits = {{ rate = \"{rate}\", burst = {burst} }}\n")
    };
    write(dir.path(), "a.toml", &app("1/h", 1));
    let store = PolicyStore::load(dir.path()).expect("load");
    let who = Requester::Public {
        ip: ip("198.51.100.1"),
    };
    let limits = |s: &PolicyStore| {
        let cur = s.current();
        let a = cur.policy.app("a").expect("a");
        cur.state(a).limits.clone()
    };
    assert!(limits(&store).check_rate(&who).is_ok());
    assert!(limits(&store).check_rate(&who).is_err(), "1/h");
    for round in 0..3 {
        // Raised: the difference at once (one more token of a burst of 2), no more.
        write(dir.path(), "a.toml", &app("2/h", 2));
        store.reload().expect("reload");
        tokio::time::advance(Duration::from_millis(1)).await;
        let raised = limits(&store);
        assert!(
            raised.check_rate(&who).is_ok(),
            "round {round}: the difference"
        );
        assert!(
            raised.check_rate(&who).is_err(),
            "round {round}: a token more at 2/h"
        );
        // Lowered again: nothing.
        write(dir.path(), "a.toml", &app("1/h", 1));
        store.reload().expect("reload");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(
            limits(&store).check_rate(&who).is_err(),
            "round {round}: a fresh burst at 1/h"
        );
    }
}

/// Editing an app's limits keeps what its clients already use: open connections stay counted
/// against the new maxima, and under a changed rate a client in use keeps what its bucket
/// lacked (no fresh burst, nothing it had taken away: a raised limit throttled the clients in
/// use), while a client never seen starts full, as it would have before the edit.
#[tokio::test(start_paused = true)]
async fn a_limits_edit_gives_no_client_a_fresh_allowance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = |rate: &str, per_client: u32| {
        format!("[app.a]\nhttp = {{ host = \"a.example\" }}\nto = \"d/s\"\nallow = {{ from = [\"public\"] }}\nlimits = {{ rate = \"{rate}\", burst = 5, max_connections = 10, max_connections_per_client = {per_client} }}\n")
    };
    write(dir.path(), "a.toml", &app("10/s", 3));
    let store = PolicyStore::load(dir.path()).expect("load");
    let who = Requester::Public {
        ip: ip("198.51.100.1"),
    };
    let limits = |s: &PolicyStore| {
        let cur = s.current();
        let a = cur.policy.app("a").expect("a");
        cur.state(a).limits.clone()
    };
    let before = limits(&store);
    assert!(before.check_rate(&who).is_ok());
    let open: Vec<_> = (0..3)
        .map(|i| before.connect(&who).unwrap_or_else(|e| panic!("{i}: {e}")))
        .collect();
    assert!(before.connect(&who).is_err(), "per-client cap of 3");

    // Tighter rate, looser per-client cap.
    write(dir.path(), "a.toml", &app("5/s", 4));
    assert_eq!(
        store.reload().expect("reload"),
        vec![policies::Change::Changed("a".into())]
    );
    let after = limits(&store);
    let _fourth = after.connect(&who).expect("the 4th under the new cap");
    assert!(after.connect(&who).is_err(), "the 3 open ones still count");
    // The new rate's bucket holds what the client had left (4 of 5: it used one), no more;
    // then one request per 1/5 s.
    for i in 0..4 {
        assert!(
            after.check_rate(&who).is_ok(),
            "request {i}: what it had left"
        );
    }
    assert!(after.check_rate(&who).is_err(), "no fresh burst");
    tokio::time::advance(Duration::from_millis(200)).await;
    assert!(after.check_rate(&who).is_ok());
    assert!(after.check_rate(&who).is_err());
    // A client the old limiter never saw has its whole burst, as it would have had there.
    let new = Requester::Public {
        ip: ip("198.51.100.2"),
    };
    for i in 0..5 {
        assert!(
            after.check_rate(&new).is_ok(),
            "request {i} of a new client"
        );
    }
    assert!(after.check_rate(&new).is_err());
    drop(open);
    assert_eq!(after.connections.open(), 1);

    // A throttled client that sends nothing while the owner edits twice (a typo fixed, or
    // the edit undone) gets no fresh burst from the second edit either.
    let quiet = Requester::Public {
        ip: ip("198.51.100.3"),
    };
    for _ in 0..5 {
        assert!(after.check_rate(&quiet).is_ok());
    }
    assert!(after.check_rate(&quiet).is_err(), "throttled");
    write(dir.path(), "a.toml", &app("4/s", 4));
    store.reload().expect("reload");
    write(dir.path(), "a.toml", &app("5/s", 4));
    store.reload().expect("reload");
    let twice = limits(&store);
    assert!(
        twice.check_rate(&quiet).is_err(),
        "a fresh burst after two edits"
    );
    tokio::time::advance(Duration::from_millis(200)).await;
    assert!(twice.check_rate(&quiet).is_ok());
    assert!(twice.check_rate(&quiet).is_err());

    // One away across two edits keeps what it refilled since the first: its bucket counts
    // as empty from then, not from the second (which charged it afresh at every edit).
    let away = Requester::Public {
        ip: ip("198.51.100.4"),
    };
    for _ in 0..5 {
        assert!(twice.check_rate(&away).is_ok());
    }
    assert!(twice.check_rate(&away).is_err(), "throttled");
    write(dir.path(), "a.toml", &app("6/min", 4));
    store.reload().expect("reload");
    tokio::time::advance(Duration::from_secs(40)).await;
    write(dir.path(), "a.toml", &app("5/min", 4));
    store.reload().expect("reload");
    let later = limits(&store);
    // Empty 40 s ago, refilling at 5/min since (one per 12 s): 3 whole ones of its 5 (the
    // third of a fourth is no request).
    for i in 0..3 {
        assert!(later.check_rate(&away).is_ok(), "request {i}");
    }
    assert!(later.check_rate(&away).is_err(), "more than it refilled");

    // A limit raised for a throttled client: its bucket lacks the 5 it lacked, of 10 now.
    write(
        dir.path(),
        "a.toml",
        &app("5/min", 4).replace("burst = 5", "burst = 10"),
    );
    store.reload().expect("reload");
    let raised = limits(&store);
    for i in 0..5 {
        assert!(
            raised.check_rate(&away).is_ok(),
            "request {i} under the raised limit"
        );
    }
    assert!(
        raised.check_rate(&away).is_err(),
        "more than the raise gave"
    );
}

/// Renaming an app keeps its limiters: its open connections stay counted and its clients get
/// no fresh burst (a rename used to hand every client a full bucket and a connection count
/// of 0 while the old connections went on).
#[tokio::test(start_paused = true)]
async fn a_renamed_app_keeps_its_limits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = |name: &str| {
        format!("[app.{name}]\nhttp = {{ host = \"a.example\" }}\nto = \"d/s\"\nallow = {{ from = [\"public\"] }}\nlimits = {{ rate = \"1/min\", burst = 1, max_connections = 1 }}\n")
    };
    write(dir.path(), "a.toml", &app("a"));
    let store = PolicyStore::load(dir.path()).expect("load");
    let who = Requester::Public {
        ip: ip("198.51.100.1"),
    };
    let limits = |s: &PolicyStore, name: &str| {
        let cur = s.current();
        let a = cur.policy.app(name).expect("app");
        cur.state(a).limits.clone()
    };
    let a = limits(&store, "a");
    assert!(a.check_rate(&who).is_ok());
    let _open = a.connect(&who).expect("the one connection");
    write(dir.path(), "a.toml", &app("b"));
    store.reload().expect("reload");
    let b = limits(&store, "b");
    assert!(
        b.check_rate(&who).is_err(),
        "a fresh burst after the rename"
    );
    assert!(
        b.connect(&who).is_err(),
        "the open connection no longer counted"
    );
    // Another app at another place starts afresh.
    write(
        dir.path(),
        "a.toml",
        &format!("{}{}", app("b"), app("c").replace("a.example", "c.example")),
    );
    store.reload().expect("reload");
    assert!(limits(&store, "c").check_rate(&who).is_ok());
}

/// An app renamed while its old name goes to a new app elsewhere, in one edit, keeps its
/// limiters and counters (its open connection goes on counting into them); the new app of
/// the old name starts afresh. By name, the new app took them: its first client was refused
/// for a connection of the renamed app's, and the renamed app let in one more.
#[tokio::test(start_paused = true)]
async fn an_app_renamed_while_its_name_goes_elsewhere_keeps_its_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = |name: &str, host: &str| {
        format!("[app.{name}]\nhttp = {{ host = \"{host}\" }}\nto = \"d/s\"\nallow = {{ from = [\"public\"] }}\nlimits = {{ max_connections = 1 }}\n")
    };
    write(dir.path(), "a.toml", &app("ssh", "a.example"));
    let store = PolicyStore::load(dir.path()).expect("load");
    let who = Requester::Public {
        ip: ip("198.51.100.1"),
    };
    let state = |s: &PolicyStore, name: &str| {
        let cur = s.current();
        let a = cur.policy.app(name).expect("app");
        let st = cur.state(a);
        (st.limits.clone(), st.counters.clone())
    };
    let (limits, counters) = state(&store, "ssh");
    let _open = limits.connect(&who).expect("the one connection");
    write(
        dir.path(),
        "a.toml",
        &format!(
            "{}{}",
            app("ssh-home1", "a.example"),
            app("ssh", "b.example")
        ),
    );
    store.reload().expect("reload");
    let (renamed, renamed_counters) = state(&store, "ssh-home1");
    assert!(
        renamed.connect(&who).is_err(),
        "the renamed app's open connection no longer counted"
    );
    assert!(
        Arc::ptr_eq(&renamed_counters, &counters),
        "its counters left behind"
    );
    let (fresh, fresh_counters) = state(&store, "ssh");
    assert!(
        fresh.connect(&who).is_ok(),
        "the new app refused for the old one's connection"
    );
    assert!(!Arc::ptr_eq(&fresh_counters, &counters));
}

/// Bytes `shaper` lets through in `secs` seconds of chunks of 16 KiB.
async fn pumped(shaper: &policies::bandwidth::Shaper, secs: u64) -> u64 {
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut n = 0;
    while tokio::time::Instant::now() < end {
        shaper.consume(16 * 1024).await;
        n += 16 * 1024;
    }
    n
}

/// A lowered `bandwidth` holds open connections too: they kept the old bucket, and the app
/// moved the old rate plus the new. A lowered `bandwidth_per_connection` does as well.
#[tokio::test(start_paused = true)]
async fn a_bandwidth_edit_applies_to_open_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = |bw: &str, per: &str| {
        format!("[app.a]\nhttp = {{ host = \"a.example\" }}\nto = \"d/s\"\nallow = {{ from = [\"public\"] }}\nlimits = {{ bandwidth = \"{bw}\", bandwidth_per_connection = \"{per}\" }}\n")
    };
    write(dir.path(), "a.toml", &app("1MiB/s", "1MiB/s"));
    let store = PolicyStore::load(dir.path()).expect("load");
    let shaper = |s: &PolicyStore| {
        let cur = s.current();
        let a = cur.policy.app("a").expect("a");
        cur.state(a).limits.shapers().0
    };
    let old = shaper(&store);
    write(dir.path(), "a.toml", &app("64KiB/s", "1MiB/s"));
    store.reload().expect("reload");
    let new = shaper(&store);
    let (a, b) = tokio::join!(pumped(&old, 5), pumped(&new, 5));
    // 5 s at 64 KiB/s, the bucket's first 16 KiB and one chunk in flight each.
    assert!(a + b <= (5 * 64 + 16 + 32) * 1024, "{a} + {b} bytes");
    // The per-connection rate lowered below the app's: it holds the open connection alone.
    write(dir.path(), "a.toml", &app("1MiB/s", "32KiB/s"));
    store.reload().expect("reload");
    let moved = pumped(&old, 5).await;
    assert!(moved <= (5 * 32 + 16 + 16) * 1024, "{moved} bytes");
    // Removed, the limit lets the open connection go; added again, it holds it again.
    write(
        dir.path(),
        "a.toml",
        "[app.a]\nhttp = { host = \"a.example\" }\nto = \"d/s\"\nallow = { from = [\"public\"] }\n",
    );
    store.reload().expect("reload");
    // Unlimited: 64 MiB without a wait (limited, paused time would move past the waits).
    let t0 = tokio::time::Instant::now();
    for _ in 0..1000 {
        old.consume(64 * 1024).await;
    }
    assert!(
        t0.elapsed() < Duration::from_millis(1),
        "still limited: {:?}",
        t0.elapsed()
    );
    write(dir.path(), "a.toml", &app("64KiB/s", "1MiB/s"));
    store.reload().expect("reload");
    let moved = pumped(&old, 5).await;
    assert!(
        moved <= (5 * 64 + 16 + 16) * 1024,
        "{moved} bytes after the limit came back"
    );
}

/// Mesh apps all listen on the mesh and several may lead to one target: renaming two of them
/// at once is no rename of either (two apps sharing one app's limiters would count together).
#[tokio::test(start_paused = true)]
async fn two_mesh_apps_renamed_at_once_start_afresh() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mesh = |name: &str| {
        format!("[app.{name}]\nmesh = true\nto = \"d/etcd\"\nallow = {{ from = [\"zone\"] }}\n")
    };
    write(
        dir.path(),
        "a.toml",
        &format!("{}{}", mesh("m1"), mesh("m2")),
    );
    let store = PolicyStore::load(dir.path()).expect("load");
    let limits = |s: &PolicyStore, name: &str| {
        let cur = s.current();
        let a = cur.policy.app(name).expect("app");
        cur.state(a).limits.clone()
    };
    write(
        dir.path(),
        "a.toml",
        &format!("{}{}", mesh("n1"), mesh("n2")),
    );
    store.reload().expect("reload");
    let (n1, n2) = (limits(&store, "n1"), limits(&store, "n2"));
    assert!(!Arc::ptr_eq(&n1, &n2), "one app's limiters shared by two");
}

/// An edit refused while the gateway ran stays in the directory: the next start serves the
/// policy that served last (from its copy) and reports the errors, instead of not starting.
/// Only while the directory holds exactly that edit: one made while the gateway was stopped
/// is judged as it is.
#[tokio::test]
async fn a_start_with_a_refused_edit_serves_the_last_accepted_policy() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("policies");
    std::fs::create_dir(&dir).expect("mkdir");
    let names = |s: &PolicyStore| {
        let mut v: Vec<String> = s
            .current()
            .policy
            .apps()
            .iter()
            .map(|a| a.name.clone())
            .collect();
        v.sort();
        v
    };
    write(&dir, "a.toml", APP_A);
    let store = PolicyStore::load_keeping_accepted(&dir).expect("load");
    store.started();
    write(&dir, "b.toml", "[app.b]\nmesh = true\nto = \"d/t\"\n");
    store.reload().expect("reload");
    // The refused edit: a typo in `from`.
    let typo = APP_A.replace("public", "publc");
    write(&dir, "a.toml", &typo);
    assert!(store.reload().is_err());
    drop(store);

    let restarted = PolicyStore::load_keeping_accepted(&dir).expect("falls back to the copy");
    assert_eq!(names(&restarted), ["a", "b"], "the policy that served last");
    let status = restarted.last_reload();
    assert!(!status.ok, "the directory's errors are reported");
    assert!(
        status.errors.iter().any(|e| e.contains("publc")),
        "{status:?}"
    );
    assert!(
        status.errors.iter().any(|e| e.contains("last accepted")),
        "{status:?}"
    );
    // Read again (as the watcher does once): still refused, and the status still says the
    // copy serves.
    assert!(restarted.reload().is_err());
    assert!(
        restarted
            .last_reload()
            .errors
            .iter()
            .any(|e| e.contains("last accepted")),
        "{:?}",
        restarted.last_reload()
    );
    restarted.started();
    // A plain load has no fallback.
    assert!(PolicyStore::load(&dir).is_err());
    drop(restarted);

    // Edited again while stopped: not the edit that was refused, so judged as it is.
    write(&dir, "a.toml", &APP_A.replace("public", "pubic"));
    assert!(PolicyStore::load_keeping_accepted(&dir).is_err());
    write(&dir, "a.toml", &typo);
    assert_eq!(
        names(&PolicyStore::load_keeping_accepted(&dir).expect("the refused edit again")),
        ["a", "b"]
    );

    // An edit that compiles but the gateway's own check refuses (an address in use, say):
    // recorded the same way, and a start does not take it either.
    write(&dir, "a.toml", APP_A);
    let store = PolicyStore::load_keeping_accepted(&dir).expect("fixed");
    store.started();
    store.set_check(policies::ReloadCheck(Arc::new(|new, _| {
        match new.app("c") {
            Some(_) => Err(policies::CheckRefusal {
                errors: vec!["app c: cannot listen".to_string().into()],
                may_pass_later: false,
            }),
            None => Ok(()),
        }
    })));
    write(&dir, "c.toml", "[app.c]\nmesh = true\nto = \"d/u\"\n");
    assert!(store.reload().is_err());
    drop(store);
    let again = PolicyStore::load_keeping_accepted(&dir).expect("copy of the policy that served");
    assert_eq!(names(&again), ["a", "b"]);
    assert!(again
        .last_reload()
        .errors
        .iter()
        .any(|e| e.contains("cannot listen")));

    // Without a copy, a bad directory keeps the gateway from starting.
    std::fs::remove_file(dir.join("c.toml")).expect("rm");
    write(&dir, "a.toml", &typo);
    std::fs::remove_file(policies::accepted::path_for(&dir).expect("path")).expect("rm copy");
    assert!(PolicyStore::load_keeping_accepted(&dir).is_err());
}

/// A file emptied while the gateway was down (a crash between an editor's truncate and its
/// write) is refused at the start as a reload refuses it: the copy serves, and starting does
/// not replace the copy (the only place the emptied apps' text is left).
#[tokio::test]
async fn a_start_with_an_emptied_file_serves_the_last_accepted_policy() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("policies");
    std::fs::create_dir(&dir).expect("mkdir");
    write(&dir, "a.toml", APP_A);
    write(&dir, "b.toml", "[app.b]\nmesh = true\nto = \"d/t\"\n");
    let store = PolicyStore::load_keeping_accepted(&dir).expect("load");
    store.started();
    drop(store);

    write(&dir, "a.toml", "");
    let restarted = PolicyStore::load_keeping_accepted(&dir).expect("serves the copy");
    assert!(
        restarted.current().policy.app("a").is_some(),
        "the emptied file's app serves from the copy"
    );
    let status = restarted.last_reload();
    assert!(!status.ok);
    assert!(
        status.errors.iter().any(|e| e.contains("is empty now")),
        "{status:?}"
    );
    restarted.started();
    drop(restarted);
    let again = PolicyStore::load_keeping_accepted(&dir).expect("the copy is still there");
    assert!(again.current().policy.app("a").is_some());
    drop(again);

    // Emptied on purpose, as the message says: a comment only, and the app is dropped.
    write(&dir, "a.toml", "# a is gone\n");
    let store = PolicyStore::load_keeping_accepted(&dir).expect("load");
    assert!(store.last_reload().ok, "{:?}", store.last_reload());
    assert!(store.current().policy.app("a").is_none());
    assert!(store.current().policy.app("b").is_some());
    store.started();
    drop(store);

    // Every policy file removed while stopped: the owner taking the apps offline, not a copy
    // cut short — nothing serves (the copy's apps, deleted, must not).
    for f in ["a.toml", "b.toml"] {
        std::fs::remove_file(dir.join(f)).expect("rm");
    }
    let store = PolicyStore::load_keeping_accepted(&dir).expect("load");
    assert!(store.current().policy.apps().is_empty());
}

/// Log output of the current thread, as text (the subscriber set with [`captured_logs`]).
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A file saved under a name the gateway does not read (`b.toml.txt`, Notepad's save) is
/// told in the running gateway's log, once: it had changed nothing and said nothing, the app
/// in it silently absent (only `zonegate policy check` named it).
#[tokio::test]
async fn a_policy_file_under_a_name_not_read_is_logged_once() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    // The test's runtime has one thread: the watcher task logs on it.
    let _guard = tracing::subscriber::set_default(subscriber);
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "a.toml", APP_A);
    let store = Arc::new(PolicyStore::load(dir.path()).expect("load"));
    let _watcher = policies::spawn_watcher(store, Duration::from_millis(20));
    write(
        dir.path(),
        "b.toml.txt",
        "[app.b]\nmesh = true\nto = \"d/t\"\n",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !logs.text().contains("b.toml.txt") {
        assert!(std::time::Instant::now() < deadline, "{}", logs.text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Several more passes of the watcher.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = logs.text();
    assert_eq!(text.matches("b.toml.txt").count(), 1, "{text}");
    assert!(text.contains("is not read"), "{text}");
}

/// An edit the gateway's own check refuses (an address another program holds) is read again
/// on its own, sooner and then less often, and serves once the check passes: freeing the
/// address changes no policy file, and the edit stayed unapplied until one was touched.
#[tokio::test(start_paused = true)]
async fn an_edit_refused_by_the_gateways_check_is_tried_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "a.toml", APP_A);
    let store = Arc::new(PolicyStore::load(dir.path()).expect("load"));
    let busy = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let checked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (b, n) = (busy.clone(), checked.clone());
    store.set_check(policies::ReloadCheck(Arc::new(move |new, _| {
        n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if new.app("d").is_some() {
            return Err(policies::CheckRefusal {
                errors: vec!["app d: the gateway's own port".to_string().into()],
                may_pass_later: false,
            });
        }
        match new.app("c") {
            Some(_) if b.load(std::sync::atomic::Ordering::SeqCst) => Err(policies::CheckRefusal {
                errors: vec!["app c: cannot listen: address in use".to_string().into()],
                may_pass_later: true,
            }),
            _ => Ok(()),
        }
    })));
    let _guard = policies::spawn_watcher(store.clone(), Duration::from_millis(100));
    tokio::time::sleep(Duration::from_millis(150)).await;
    write(dir.path(), "c.toml", "[app.c]\nmesh = true\nto = \"d/u\"\n");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = store.last_reload();
    assert!(!status.ok, "{status:?}");
    assert!(
        status
            .errors
            .iter()
            .any(|e| e.contains("reads this edit again in 5 s")),
        "{status:?}"
    );
    // Tried again after 5 s, then 10 s later: three checks in 16 s, not one per poll.
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(checked.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert!(store.current().policy.app("c").is_none());
    busy.store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(21)).await;
    assert!(
        store.current().policy.app("c").is_some(),
        "{:?}",
        store.last_reload()
    );
    assert!(store.last_reload().ok);
    // A refusal that no wait can change (an app on the gateway's own port) is not retried.
    write(dir.path(), "d.toml", "[app.d]\nmesh = true\nto = \"d/v\"\n");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_edit = checked.load(std::sync::atomic::Ordering::SeqCst);
    assert!(!store.last_reload().ok);
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(
        checked.load(std::sync::atomic::Ordering::SeqCst),
        after_edit
    );
}
