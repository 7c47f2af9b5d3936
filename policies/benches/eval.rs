//! Decision cost for a generated 100-app policy (target: under 1 µs) and the cost of
//! reloading that policy from a directory.

use criterion::{criterion_group, criterion_main, Criterion};
use policies::{check_dir, check_sources, Requester, Timestamp};
use std::hint::black_box;
use std::net::IpAddr;
use std::path::PathBuf;

/// 100 apps in 10 files: 60 http (10 hosts × 6 paths), 20 tcp, 20 mesh, with CIDRs, methods,
/// paths and time windows so decisions go through every kind of check.
fn generated() -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    for f in 0..10 {
        let mut s = String::new();
        for i in 0..10 {
            let n = f * 10 + i;
            let to = format!("to = \"home{}/svc{n}\"\n", n % 5);
            let body = match i {
                0..=5 => format!(
                    "http = {{ host = \"host{f}.example\", path = \"/p{i}\" }}\n{to}allow = [{{ from = [\"10.{n}.0.0/16\", \"device:d{n}\"], methods = [\"PUT\"] }}, {{ from = [\"public\"], methods = [\"GET\", \"HEAD\"], paths = [\"/p{i}/pub\"], hours = \"06:00-23:00\", tz = \"+01:00\" }}]\nlimits = {{ rate = \"50/s\", bandwidth = \"20MiB/s\" }}\n"
                ),
                6 | 7 => format!("tcp = {{ listen = \"0.0.0.0:{}\" }}\n{to}allow = {{ from = [\"192.168.{n}.0/24\", \"2001:db8:{n}::/48\"] }}\n", 20000 + n),
                _ => format!("mesh = true\n{to}allow = {{ from = [\"device:d{n}\", \"role:gateway\"], days = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\"] }}\n"),
            };
            s.push_str(&format!("[app.app{n}]\n{body}\n"));
        }
        files.push((PathBuf::from(format!("f{f}.toml")), s));
    }
    files
}

fn bench(c: &mut Criterion) {
    let files = generated();
    let policy =
        check_sources(&files).unwrap_or_else(|e| panic!("generated policy invalid: {e:?}"));
    assert_eq!(policy.apps().len(), 100);
    let now = Timestamp(1_717_770_000);
    let ip: IpAddr = "198.51.100.7".parse().expect("ip");
    let public = Requester::Public { ip };

    c.bench_function("route_http + decide (100 apps, allowed by 2nd rule)", |b| {
        b.iter(|| {
            let app = policy
                .route_http(
                    black_box("HOST7.example:443"),
                    black_box("/p3/pub/file.txt"),
                )
                .expect("route");
            black_box(policy.decide(app, &public, Some("GET"), Some("/p3/pub/file.txt"), now))
        })
    });
    c.bench_function("route_http + decide (100 apps, denied)", |b| {
        b.iter(|| {
            let app = policy
                .route_http(black_box("host7.example"), black_box("/p3/private"))
                .expect("route");
            black_box(policy.decide(app, &public, Some("POST"), Some("/p3/private"), now))
        })
    });
    c.bench_function("decide_mesh (100 apps)", |b| {
        b.iter(|| {
            black_box(policy.decide_mesh(black_box("gw1"), &["gateway"], "home3", "svc98", now))
        })
    });

    let dir = tempfile::tempdir().expect("tempdir");
    for (p, s) in &files {
        std::fs::write(dir.path().join(p), s).expect("write");
    }
    c.bench_function("reload: check_dir of 100 apps in 10 files", |b| {
        b.iter(|| black_box(check_dir(dir.path()).expect("valid")))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
