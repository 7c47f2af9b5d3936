//! Checks that the NAT lab (tests/netlab/natlab.sh through `netlab::Lab`) behaves as documented:
//! reachability, the two NAT flavours, isolation between labs, teardown, and the impairment and
//! conntrack-flush knobs other tests rely on.

use std::net::{SocketAddr, SocketAddrV4};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::netlab::{
    self, lines, namespaces_with_prefix, parse_seen, python, spawn_reflector, tcp_connects,
    udp_mapping, wait_line, wait_tcp, Lab, LabProcess, CLIENT, HOME1, NAT1_WAN, NAT2_WAN, NAT3_WAN,
    VPS,
};

/// Port of the natprobe reflectors (the STUN port, for the reader's intuition).
const REFLECT: u16 = 3478;
/// Bound for anything that should succeed: generous, successes return as soon as they happen.
const OK_WITHIN: Duration = Duration::from_secs(10);
/// How long a negative check waits for something that must not happen. Inside one machine a
/// datagram or SYN arrives within milliseconds, so a second is ample margin.
const NOT_WITHIN: Duration = Duration::from_secs(1);

fn sock(ip: std::net::Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// natprobe `probe SPORT WAIT H:P`: binds `sport` in `host`, learns its mapping from the
/// reflector, then prints every unsolicited datagram for `wait` seconds.
fn spawn_listener(
    lab: &Lab,
    host: &str,
    sport: u16,
    wait_s: u32,
    reflector: Option<SocketAddrV4>,
) -> (
    LabProcess,
    std::sync::mpsc::Receiver<String>,
    Option<SocketAddrV4>,
) {
    let mut cmd = lab.natprobe(host);
    cmd.args(["probe", &sport.to_string(), &wait_s.to_string()]);
    if let Some(r) = reflector {
        cmd.arg(r.to_string());
    }
    let mut child = lab
        .spawn(cmd.stdout(Stdio::piped()))
        .expect("spawn natprobe probe");
    let rx = lines(&mut child);
    wait_line(&rx, OK_WITHIN, |l| l.starts_with("bound :")).expect("probe socket bound");
    let mapping = reflector.map(|_| {
        let l = wait_line(&rx, OK_WITHIN, |l| l.contains("reflector says")).expect("mapping");
        parse_seen(&l).expect("parse mapping")
    });
    (child, rx, mapping)
}

/// Sends 5 datagrams carrying `msg` from `host` to `to`, 50 ms apart.
fn send_udp(lab: &Lab, host: &str, to: SocketAddrV4, msg: &str) {
    lab.check(
        lab.natprobe(host).args([
            "send",
            &to.ip().to_string(),
            &to.port().to_string(),
            msg,
            "5",
            "0.05",
        ]),
        OK_WITHIN,
    )
    .expect("natprobe send");
}

#[test]
fn homes_reach_vps_over_tcp_from_their_nat_address() {
    if !netlab::require_root("homes_reach_vps_over_tcp_from_their_nat_address") {
        return;
    }
    let lab = Lab::up("homes_reach_vps").unwrap();

    // a real HTTP exchange home1 -> vps
    let web = SocketAddr::from((VPS, 8080));
    let _http = lab
        .spawn(
            lab.cmd("vps", python())
                .args([
                    "-m",
                    "http.server",
                    "8080",
                    "--bind",
                    &VPS.to_string(),
                    "--directory",
                    "/",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .unwrap();
    wait_tcp(&lab, "home1", web, OK_WITHIN).unwrap();
    let status = lab
        .check(
            lab.cmd("home1", python()).args([
                "-c",
                concat!(
                    "import urllib.request; ",
                    "print(urllib.request.urlopen('http://203.0.113.10:8080/', timeout=5).status)"
                ),
            ]),
            OK_WITHIN,
        )
        .unwrap();
    assert_eq!(status.trim(), "200");

    // the vps sees each home as its router's public address
    let _refl = spawn_reflector(&lab, "vps", REFLECT).unwrap();
    for (home, wan) in [
        ("home1", NAT1_WAN),
        ("home2", NAT2_WAN),
        ("home3", NAT3_WAN),
    ] {
        let out = lab
            .check(
                lab.natprobe(home)
                    .args(["tcp", &VPS.to_string(), &REFLECT.to_string()]),
                OK_WITHIN,
            )
            .unwrap();
        let seen = parse_seen(&out).unwrap_or_else(|| panic!("{home}: bad reply {out:?}"));
        assert_eq!(*seen.ip(), wan, "{home} seen as {seen}");
    }
}

#[test]
fn nothing_reaches_a_home_unsolicited_over_tcp() {
    if !netlab::require_root("nothing_reaches_a_home_unsolicited_over_tcp") {
        return;
    }
    let lab = Lab::up("no_inbound_tcp").unwrap();
    let _refl = spawn_reflector(&lab, "home1", REFLECT).unwrap();
    let home1 = SocketAddr::from((HOME1, REFLECT));
    // the listener exists: its own router (LAN side) gets through, so the refusals below are real
    assert!(tcp_connects(&lab, "nat1", home1, OK_WITHIN).unwrap());

    assert!(
        !tcp_connects(&lab, "vps", home1, NOT_WITHIN).unwrap(),
        "vps has no route to 192.168.1.10"
    );
    assert!(
        !tcp_connects(&lab, "client", home1, NOT_WITHIN).unwrap(),
        "client has no route to 192.168.1.10"
    );
    assert!(
        !tcp_connects(&lab, "home2", home1, NOT_WITHIN).unwrap(),
        "home LANs are not routed to each other"
    );
    assert!(
        !tcp_connects(
            &lab,
            "client",
            SocketAddr::from((NAT1_WAN, REFLECT)),
            NOT_WITHIN
        )
        .unwrap(),
        "the cone NAT forwards no TCP"
    );
}

#[test]
fn cone_nats_keep_the_port_symmetric_nat_randomizes_it() {
    if !netlab::require_root("cone_nats_keep_the_port_symmetric_nat_randomizes_it") {
        return;
    }
    let lab = Lab::up("udp_mappings").unwrap();
    let _r1 = spawn_reflector(&lab, "vps", REFLECT).unwrap();
    let _r2 = spawn_reflector(&lab, "vps", REFLECT + 1).unwrap();
    let _r3 = spawn_reflector(&lab, "client", REFLECT).unwrap();
    let reflectors = [
        sock(VPS, REFLECT),
        sock(VPS, REFLECT + 1),
        sock(CLIENT, REFLECT),
    ];

    for (home, wan) in [("home1", NAT1_WAN), ("home3", NAT3_WAN)] {
        for r in reflectors {
            let m = udp_mapping(&lab, home, 40000, r).unwrap();
            assert_eq!(
                m,
                sock(wan, 40000),
                "{home} -> {r}: cone NAT keeps the port for every peer"
            );
        }
    }

    let ports: Vec<u16> = reflectors
        .iter()
        .map(|r| {
            let m = udp_mapping(&lab, "home2", 40000, *r).unwrap();
            assert_eq!(*m.ip(), NAT2_WAN);
            m.port()
        })
        .collect();
    // endpoint-dependent: one port per destination (all three equal by chance: ~1 in 4e9)
    assert!(
        ports.iter().any(|p| *p != ports[0]),
        "symmetric NAT reused port: {ports:?}"
    );
    assert!(
        ports.iter().any(|p| *p != 40000),
        "symmetric NAT kept the source port: {ports:?}"
    );
    // the mapping is stable while its conntrack entry lives
    assert_eq!(
        udp_mapping(&lab, "home2", 40000, reflectors[0])
            .unwrap()
            .port(),
        ports[0]
    );
}

#[test]
fn unsolicited_udp_reaches_cone_home_but_not_symmetric_home() {
    if !netlab::require_root("unsolicited_udp_reaches_cone_home_but_not_symmetric_home") {
        return;
    }
    let lab = Lab::up("udp_filtering").unwrap();
    let _refl = spawn_reflector(&lab, "vps", REFLECT).unwrap();

    let (_h1, rx1, m1) = spawn_listener(&lab, "home1", 40010, 30, Some(sock(VPS, REFLECT)));
    let m1 = m1.unwrap();
    assert_eq!(m1, sock(NAT1_WAN, 40010));
    send_udp(&lab, "client", m1, "to-cone");
    let got = wait_line(&rx1, OK_WITHIN, |l| l.starts_with("UNSOLICITED")).unwrap();
    assert!(
        got.contains(&CLIENT.to_string()) && got.contains("to-cone"),
        "{got}"
    );

    let (_h2, rx2, m2) = spawn_listener(&lab, "home2", 40010, 30, Some(sock(VPS, REFLECT)));
    let m2 = m2.unwrap();
    assert_eq!(*m2.ip(), NAT2_WAN);
    send_udp(&lab, "client", m2, "to-symmetric");
    assert!(
        nothing_within(&rx2, |l| l.starts_with("UNSOLICITED")),
        "symmetric NAT let a stranger's datagram through"
    );
}

#[test]
fn flush_conntrack_renews_mappings() {
    if !netlab::require_root("flush_conntrack_renews_mappings") {
        return;
    }
    let lab = Lab::up("flush_conntrack").unwrap();
    let _refl = spawn_reflector(&lab, "vps", REFLECT).unwrap();
    let vps = sock(VPS, REFLECT);

    // symmetric nat2: same socket, same mapping until the flush; then a fresh random port
    let before = udp_mapping(&lab, "home2", 40020, vps).unwrap();
    assert_eq!(udp_mapping(&lab, "home2", 40020, vps).unwrap(), before);
    // a new random port may equal the old one (1 in ~64k): three flushes make that negligible
    let renewed = (0..3).any(|_| {
        lab.flush_conntrack("nat2").unwrap();
        udp_mapping(&lab, "home2", 40020, vps).unwrap() != before
    });
    assert!(
        renewed,
        "nat2 kept mapping {before} across conntrack flushes"
    );

    // cone nat1: the port is preserved, but the inbound path is forgotten until home1 sends again
    let (mut h1, rx, m) = spawn_listener(&lab, "home1", 40021, 60, Some(vps));
    let m = m.unwrap();
    send_udp(&lab, "client", m, "before-flush");
    wait_line(&rx, OK_WITHIN, |l| l.contains("before-flush")).unwrap();

    lab.flush_conntrack("nat1").unwrap();
    send_udp(&lab, "client", m, "after-flush");
    assert!(
        nothing_within(&rx, |l| l.contains("after-flush")),
        "nat1 still forwarded to {m} after the flush"
    );
    h1.kill().unwrap();
    h1.wait().unwrap();

    // home1 talks again from the same port: same public port (cone), inbound works again
    let (_h1b, rx, m2) = spawn_listener(&lab, "home1", 40021, 60, Some(vps));
    assert_eq!(m2.unwrap(), m);
    send_udp(&lab, "client", m, "renewed");
    wait_line(&rx, OK_WITHIN, |l| l.contains("renewed")).unwrap();
}

#[test]
fn netem_loss_drops_and_clear_restores() {
    if !netlab::require_root("netem_loss_drops_and_clear_restores") {
        return;
    }
    let lab = Lab::up("netem").unwrap();
    let _refl = spawn_reflector(&lab, "vps", REFLECT).unwrap();
    let vps = sock(VPS, REFLECT);
    assert_eq!(
        udp_mapping(&lab, "home1", 40030, vps).unwrap(),
        sock(NAT1_WAN, 40030)
    );

    lab.netem("home1", "eth0", "loss 100%").unwrap();
    assert!(
        timed_out(udp_mapping(&lab, "home1", 40030, vps)),
        "a datagram survived 100% loss"
    );
    lab.netem_clear("home1", "eth0").unwrap();
    assert_eq!(
        udp_mapping(&lab, "home1", 40030, vps).unwrap(),
        sock(NAT1_WAN, 40030)
    );

    // also on a router's WAN side (forwarded traffic)
    lab.netem("nat1", "wan0", "loss 100%").unwrap();
    assert!(timed_out(udp_mapping(&lab, "home1", 40031, vps)));
    lab.netem_clear("nat1", "wan0").unwrap();
    udp_mapping(&lab, "home1", 40031, vps).unwrap();

    // delay needs sch_netem; the CI kernel lacks it and the harness says so instead of lying
    match lab.netem("home1", "eth0", "delay 50ms 10ms") {
        Ok(()) => lab.netem_clear("home1", "eth0").unwrap(),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::Unsupported, "{e}"),
    }
}

#[test]
fn two_labs_at_once_do_not_interfere() {
    if !netlab::require_root("two_labs_at_once_do_not_interfere") {
        return;
    }
    let a = Lab::up("two_labs_a").unwrap();
    let b = Lab::up("two_labs_b").unwrap();
    assert_ne!(a.prefix(), b.prefix());
    let (na, nb) = (
        namespaces_with_prefix(a.prefix()),
        namespaces_with_prefix(b.prefix()),
    );
    assert_eq!(na.len(), netlab::HOSTS.len(), "{na:?}");
    assert_eq!(nb.len(), netlab::HOSTS.len(), "{nb:?}");

    // same addresses, different worlds: only a's vps runs the reflector
    let _refl = spawn_reflector(&a, "vps", REFLECT).unwrap();
    let vps_tcp = SocketAddr::from((VPS, REFLECT));
    assert!(tcp_connects(&a, "home1", vps_tcp, OK_WITHIN).unwrap());
    assert!(!tcp_connects(&b, "home1", vps_tcp, NOT_WITHIN).unwrap());

    // flushing a's nat2 leaves b's nat2 mappings alone
    let _refl_b = spawn_reflector(&b, "vps", REFLECT).unwrap();
    let mb = udp_mapping(&b, "home2", 40040, sock(VPS, REFLECT)).unwrap();
    a.flush_conntrack("nat2").unwrap();
    assert_eq!(
        udp_mapping(&b, "home2", 40040, sock(VPS, REFLECT)).unwrap(),
        mb
    );

    // tearing one down leaves the other working
    let b_prefix = b.prefix().to_string();
    drop(b);
    assert!(namespaces_with_prefix(&b_prefix).is_empty());
    assert!(tcp_connects(&a, "home1", vps_tcp, OK_WITHIN).unwrap());
}

#[test]
fn drop_tears_everything_down_even_on_panic() {
    if !netlab::require_root("drop_tears_everything_down_even_on_panic") {
        return;
    }
    let lab = Lab::up("teardown").unwrap();
    let prefix = lab.prefix().to_string();
    let owner = Path::new("/run/natlab").join(format!("{prefix}.owner"));
    assert!(owner.exists());
    let mut tracked = lab.spawn(lab.cmd("home1", "sleep").arg("600")).unwrap();
    // not through lab.spawn: only the script's `down` (by PID, in the namespace) can stop it
    let mut untracked = lab
        .cmd("vps", "sleep")
        .arg("600")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    drop(lab);
    assert_eq!(namespaces_with_prefix(&prefix), Vec::<String>::new());
    assert!(!owner.exists(), "owner file left behind");
    for child in [&mut *tracked, &mut untracked] {
        assert_ends(child, "the lab");
    }
    untracked.wait().unwrap();

    // a panicking test: unwinding drops the lab (its sleeper, made with into_child, is left
    // to the lab's own kill)
    let mut seen = String::new();
    let mut sleeper = None;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let lab = Lab::up("teardown_panic").unwrap();
        seen = lab.prefix().to_string();
        let s = lab.spawn(lab.cmd("home2", "sleep").arg("600")).unwrap();
        sleeper = Some(s.into_child());
        panic!("deliberate panic inside a lab test (expected in this test's output)");
    }));
    assert!(result.is_err());
    assert!(!seen.is_empty());
    assert_eq!(namespaces_with_prefix(&seen), Vec::<String>::new());
    let owner = Path::new("/run/natlab").join(format!("{seen}.owner"));
    assert!(!owner.exists(), "owner file left behind after a panic");
    let mut sleeper = sleeper.expect("the sleeper was started");
    assert_ends(&mut sleeper, "the panicking test's lab");
}

/// Waits for `child` to end (within [`OK_WITHIN`]), or fails: it survived `what`.
#[track_caller]
fn assert_ends(child: &mut std::process::Child, what: &str) {
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < OK_WITHIN,
            "process {} survived {what}",
            child.id()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stress check of parallel builds (not run by default): `NATLAB_MAX_PARALLEL=6 cargo test
/// stress_parallel_lab_builds -- --ignored --nocapture`.
#[test]
#[ignore = "slow stress check of parallel lab builds"]
fn stress_parallel_lab_builds() {
    if !netlab::require_root("stress_parallel_lab_builds") {
        return;
    }
    const THREADS: usize = 6;
    const ROUNDS: usize = 5;
    let t0 = Instant::now();
    let workers: Vec<_> = (0..THREADS)
        .map(|i| {
            std::thread::spawn(move || {
                for r in 0..ROUNDS {
                    let lab = Lab::up(&format!("stress{i}_{r}")).unwrap();
                    let _refl = spawn_reflector(&lab, "vps", REFLECT).unwrap();
                    let m = udp_mapping(&lab, "home1", 40050, sock(VPS, REFLECT)).unwrap();
                    assert_eq!(m, sock(NAT1_WAN, 40050));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    eprintln!(
        "[netlab] {} labs ({THREADS} threads x {ROUNDS}) up+check+down in {} ms",
        THREADS * ROUNDS,
        t0.elapsed().as_millis()
    );
}

/// True when no line matching `pred` came within [`NOT_WITHIN`] while the listener kept
/// running: a listener that died (its output ended) is a failure, not the silence asserted.
fn nothing_within(rx: &std::sync::mpsc::Receiver<String>, pred: impl FnMut(&str) -> bool) -> bool {
    match wait_line(rx, NOT_WITHIN, pred) {
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => true,
        Err(e) => panic!("the listening probe ended instead of waiting: {e}"),
    }
}

/// True when the probe failed by waiting in vain for the reflector's answer, and only then (a
/// probe that could not run is no evidence of a lost datagram).
fn timed_out<T: std::fmt::Debug>(r: std::io::Result<T>) -> bool {
    match r {
        Ok(_) => false,
        Err(e) if e.to_string().contains("timed out") => true,
        Err(e) => panic!("the probe failed otherwise than by a timeout: {e}"),
    }
}
