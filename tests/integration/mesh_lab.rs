//! Issue 7 in the NAT lab: device↔device paths between real `zonegate` processes.
//!
//! - home3 → home1 (both behind cone NATs) goes direct after one relayed stream: a 64 MiB
//!   transfer then crosses the gateway's interface with almost no bytes, and keeps working
//!   after the gateway is killed.
//! - home2 (symmetric NAT) → home1 stays relayed and works. Note: nat1 is *full* cone
//!   (endpoint-independent filtering), and a symmetric NAT can reach a full-cone NAT directly
//!   (home2's dial gets a fresh nat2 port, which nat1 lets in), so in the bare lab this pair goes
//!   direct too. The relay test therefore makes nat1 drop unsolicited packets from nat2's
//!   address, i.e. makes nat1 address-restricted towards it: the classic pair no hole punching
//!   can traverse.
//!
//! - home2b → home2, two devices behind the one symmetric NAT (nat2, which does not hairpin):
//!   their observed addresses lead nowhere, so only the LAN addresses they report to the
//!   gateway get them direct; the transfer then crosses neither the gateway nor the NAT.
//!
//! Each test prints `MESH-BENCH` lines (throughput and RTT per path); benches/mesh.md has the
//! figures. `ZONEGATE_BIN=/path/to/release/zonegate` runs the lab on another build (for the
//! benchmark); by default the binary cargo built for the tests.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use serde_json::Value;

use crate::common::ok;
use crate::netlab::{self, python, Lab, LabProcess, HOME2, HOME2B, NAT2_WAN};
use crate::zonefix::eventually;

const READY: Duration = Duration::from_secs(20);
/// Bound for a direct path to come up while relayed streams keep flowing: a failed punching
/// round (three attempts of `PUNCH_ATTEMPT`, easily lost on a loaded machine) is retried only
/// `PUNCH_INTERVAL` (30 s) later, on a later relayed stream; this leaves room for a second round.
const PUNCHED: Duration = Duration::from_secs(60);
/// Bound for the gateway to list a changed LAN address: it hears it at the agent's next
/// recheck (every 10 s), plus the status round trip on a loaded machine.
const RECHECKED: Duration = Duration::from_secs(40);
const SINK_PORT: u16 = 7100; // home1: reads to EOF, answers the byte count
const ECHO_PORT: u16 = 7101; // home1: echo
const FWD_SINK: u16 = 9100; // forward on the sending home -> home1/sink
const FWD_ECHO: u16 = 9101; // forward on the sending home -> home1/echo
const BIG: u64 = 64 << 20;
/// Bytes the gateway's interface may carry while 64 MiB go direct: keep-alives of three
/// tunnels and status polls are a few KiB per second; anything near the payload is a relay.
const DIRECT_GATEWAY_BUDGET: u64 = 2 << 20;

const POLICY: &str = r#"[app.sink-mesh]
mesh = true
to = "home1/sink"
allow = { from = ["device:home2", "device:home3"] }

[app.echo-mesh]
mesh = true
to = "home1/echo"
allow = { from = ["device:home2", "device:home3"] }

[app.sink-lan]
mesh = true
to = "home2/sink"
allow = { from = ["device:home2b"] }

[app.echo-lan]
mesh = true
to = "home2/echo"
allow = { from = ["device:home2b"] }
"#;

const TOOL: &str = r#"
import socket, socketserver, statistics, sys, time, urllib.request

def get(url, timeout):
    with urllib.request.urlopen(url, timeout=float(timeout)) as r:
        sys.stdout.write(r.read().decode())

class Sink(socketserver.BaseRequestHandler):
    def handle(self):
        n = 0
        while True:
            d = self.request.recv(1 << 20)
            if not d:
                break
            n += len(d)
        self.request.sendall(str(n).encode())

class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            d = self.request.recv(65535)
            if not d:
                return
            self.request.sendall(d)

def serve(kind, port):
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", int(port)), {"sink": Sink, "echo": Echo}[kind])
    srv.daemon_threads = True
    print(kind, "on", port, flush=True)
    srv.serve_forever()

def send(port, n, timeout):
    # sends n bytes to 127.0.0.1:port, half-closes, expects the count back: prints "n secs"
    n = int(n)
    s = socket.create_connection(("127.0.0.1", int(port)), timeout=float(timeout))
    block = bytes(range(256)) * 1024
    t0 = time.time()
    left = n
    while left > 0:
        k = min(left, len(block))
        s.sendall(block[:k])
        left -= k
    s.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        d = s.recv(100)
        if not d:
            break
        got += d
    dt = time.time() - t0
    if got.decode() != str(n):
        sys.exit("sink answered %r for %d bytes" % (got, n))
    print(n, "%.3f" % dt)

def rtt(port, count, timeout):
    # one connection, COUNT one-byte round trips: prints median and p90 in ms
    s = socket.create_connection(("127.0.0.1", int(port)), timeout=float(timeout))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ts = []
    for i in range(int(count)):
        t0 = time.perf_counter()
        s.sendall(b"x")
        if s.recv(1) != b"x":
            sys.exit("echo broke")
        ts.append((time.perf_counter() - t0) * 1000)
    ts.sort()
    print("%.3f %.3f" % (statistics.median(ts), ts[int(len(ts) * 0.9)]))

modes = {"get": get, "serve": serve, "send": send, "rtt": rtt}
try:
    modes[sys.argv[1]](*sys.argv[2:])
except SystemExit:
    raise
except Exception as e:
    sys.exit("%s: %s" % (type(e).__name__, e))
"#;

fn bin() -> PathBuf {
    std::env::var_os("ZONEGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(crate::common::bin)
}

/// Prints captured logs when the test panics (or always with `ZG_LAB_LOGS=1`).
#[derive(Default)]
struct Logs(Mutex<Vec<(String, PathBuf)>>);

impl Drop for Logs {
    fn drop(&mut self) {
        if thread::panicking() || std::env::var("ZG_LAB_LOGS").as_deref() == Ok("1") {
            for (tag, p) in self.0.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let text = fs::read_to_string(p).unwrap_or_default();
                eprintln!("===== {tag} =====\n{text}");
            }
        }
    }
}

/// Field order is drop order: logs print before the lab goes down.
struct World {
    logs: Logs,
    lab: Lab,
    zone: PathBuf,
    tool: PathBuf,
    tmp: tempfile::TempDir,
}

/// gw (203.0.113.10:4433) and home1..3, bundles ready, short tunnel timers.
fn make_zone(base: &Path) -> PathBuf {
    let dir = base.join("zone");
    let z = dir.to_str().expect("utf-8");
    ok(["zone", "init", "--domain", "alice.example", "--dir", z]);
    ok([
        "device",
        "add",
        "gw",
        "--zone",
        z,
        "--role",
        "gateway",
        "--public-addr",
        "203.0.113.10:4433",
    ]);
    for n in ["home1", "home2", "home2b", "home3"] {
        ok(["device", "add", n, "--zone", z, "--role", "node"]);
    }
    let tail = "\n[tunnel]\nkeepalive_ms = 1000\nidle_timeout_ms = 4000\n";
    for (d, cfg) in [
        ("gw", "gateway.toml"),
        ("home1", "node.toml"),
        ("home2", "node.toml"),
        ("home2b", "node.toml"),
        ("home3", "node.toml"),
    ] {
        let b = dir.join("devices").join(d);
        fs::copy(dir.join("zone.json"), b.join("zone.json")).expect("zone.json");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(b.join(cfg))
            .expect("config");
        f.write_all(tail.as_bytes()).expect("append");
    }
    let pol = dir.join("devices/gw/policies");
    fs::create_dir_all(&pol).expect("policies");
    fs::write(pol.join("mesh.toml"), POLICY).expect("policy");
    dir
}

impl World {
    fn new(name: &str) -> World {
        let tmp = tempfile::tempdir().expect("tmp");
        let zone = make_zone(tmp.path());
        let tool = tmp.path().join("meshtool.py");
        fs::write(&tool, TOOL).expect("tool");
        let lab = Lab::up(name).expect("lab up");
        World {
            logs: Logs::default(),
            lab,
            zone,
            tool,
            tmp,
        }
    }

    fn spawn(&self, host: &str, tag: &str, program: &Path, args: &[&str]) -> LabProcess {
        let path = self.tmp.path().join(format!("{tag}.log"));
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("log");
        self.logs
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((tag.into(), path));
        let mut cmd = self.lab.cmd(host, program);
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(file.try_clone().expect("dup"))
            .stderr(file);
        self.lab.spawn(&mut cmd).expect("spawn")
    }

    fn gateway(&self) -> LabProcess {
        let cfg = self.zone.join("devices/gw/gateway.toml");
        self.spawn(
            "vps",
            "gateway",
            &bin(),
            &["gateway", "--config", cfg.to_str().unwrap()],
        )
    }

    fn node(&self, host: &str, flags: &[&str]) -> LabProcess {
        let cfg = self.zone.join("devices").join(host).join("node.toml");
        let mut args = vec!["node", "--config", cfg.to_str().unwrap()];
        args.extend_from_slice(flags);
        self.spawn(host, host, &bin(), &args)
    }

    fn tool(&self, host: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
        let mut cmd = self.lab.cmd(host, python());
        cmd.arg(&self.tool).args(args);
        match self.lab.run(&mut cmd, timeout + Duration::from_secs(5)) {
            Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
            Ok(o) => Err(format!(
                "meshtool {args:?} in {host}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!("meshtool {args:?} in {host}: {e}")),
        }
    }

    fn serve(&self, host: &str, kind: &str, port: u16) -> LabProcess {
        let tool = self.tool.to_str().unwrap().to_owned();
        let p = self.spawn(
            host,
            &format!("{kind}-{host}"),
            Path::new(python()),
            &["-u", &tool, "serve", kind, &port.to_string()],
        );
        netlab::wait_tcp(
            &self.lab,
            host,
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            READY,
        )
        .expect("service up");
        p
    }

    fn status(&self, host: &str, port: u16) -> Result<Value, String> {
        let body = self.tool(
            host,
            &["get", &format!("http://127.0.0.1:{port}/status"), "3"],
            Duration::from_secs(3),
        )?;
        serde_json::from_str(&body).map_err(|e| format!("status JSON: {e}: {body}"))
    }

    /// (rx, tx) bytes of the vps's only interface: everything to and from the gateway host.
    fn vps_bytes(&self) -> (u64, u64) {
        let out = self
            .lab
            .check(
                self.lab
                    .cmd("vps", "ip")
                    .args(["-s", "-j", "link", "show", "eth0"]),
                Duration::from_secs(5),
            )
            .expect("ip -s link");
        let v: Value = serde_json::from_str(&out).expect("ip json");
        let st = &v[0]["stats64"];
        (
            st["rx"]["bytes"].as_u64().expect("rx"),
            st["tx"]["bytes"].as_u64().expect("tx"),
        )
    }

    /// Sends `n` bytes through the forward at `port` in `host`; returns seconds taken.
    fn send(&self, host: &str, port: u16, n: u64) -> Result<f64, String> {
        let out = self.tool(
            host,
            &["send", &port.to_string(), &n.to_string(), "60"],
            Duration::from_secs(60),
        )?;
        out.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad send output {out:?}"))
    }

    /// One small stream through the forward at `port` in `host`, briefly bounded, outcome
    /// ignored: while the path is relayed, each such stream may ask for a punching round.
    fn nudge(&self, host: &str, port: u16) {
        let _ = self.tool(
            host,
            &["send", &port.to_string(), "1024", "5"],
            Duration::from_secs(5),
        );
    }

    /// Median and p90 RTT (ms) of one-byte round trips through the forward at `port`.
    fn rtt(&self, host: &str, port: u16) -> Result<(f64, f64), String> {
        let out = self.tool(host, &["rtt", &port.to_string(), "200", "10"], READY)?;
        let mut it = out.split_whitespace().map(|s| s.parse::<f64>());
        match (it.next(), it.next()) {
            (Some(Ok(a)), Some(Ok(b))) => Ok((a, b)),
            _ => Err(format!("bad rtt output {out:?}")),
        }
    }

    fn wait_agents(&self, devices: &[&str]) {
        eventually(READY, "gateway lists the agents", || {
            let st = self.status("vps", 9090)?;
            for d in devices {
                let listed = st["agents"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x["device"] == *d));
                if !listed {
                    return Err(format!("{d} not connected: {st}"));
                }
            }
            Ok(())
        });
    }

    /// `peers[]` entry for `peer` in `host`'s node status.
    fn peer(&self, host: &str, peer: &str) -> Result<Value, String> {
        let st = self.status(host, 9091)?;
        st["peers"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["device"] == peer).cloned())
            .ok_or_else(|| format!("{host} does not list peer {peer}: {st}"))
    }
}

fn mib_per_s(n: u64, secs: f64) -> f64 {
    n as f64 / (1 << 20) as f64 / secs.max(1e-6)
}

#[test]
fn lab_cone_homes_go_direct_bypass_the_gateway_and_survive_its_death() {
    if !netlab::require_root("lab_cone_homes_go_direct_bypass_the_gateway_and_survive_its_death") {
        return;
    }
    let w = World::new("mesh_direct");
    let mut gw = w.gateway();
    let _sink = w.serve("home1", "sink", SINK_PORT);
    let _echo = w.serve("home1", "echo", ECHO_PORT);
    let _h1 = w.node(
        "home1",
        &[
            "--service",
            &format!("sink=127.0.0.1:{SINK_PORT}"),
            "--service",
            &format!("echo=127.0.0.1:{ECHO_PORT}"),
        ],
    );
    let _h3 = w.node(
        "home3",
        &[
            "--forward",
            &format!("127.0.0.1:{FWD_SINK}=home1/sink"),
            "--forward",
            &format!("127.0.0.1:{FWD_ECHO}=home1/echo"),
        ],
    );
    w.wait_agents(&["home1", "home3"]);

    // The first stream is relayed (Noise end to end); it triggers hole punching.
    eventually(READY, "first relayed stream", || {
        w.send("home3", FWD_SINK, 1 << 20)
    });
    let st = eventually(PUNCHED, "home3 reports a direct path to home1", || {
        let p = w.peer("home3", "home1")?;
        if p["path"] == "direct" {
            return Ok(p);
        }
        // another relayed stream: it asks for a new round once a failed one is PUNCH_INTERVAL old
        w.nudge("home3", FWD_SINK);
        Err(format!("not direct yet: {p}"))
    });
    assert!(st["streams_relay"].as_u64() >= Some(1), "{st}");
    eventually(PUNCHED, "home1 reports a direct path to home3", || {
        let p = w.peer("home1", "home3")?;
        (p["path"] == "direct")
            .then_some(())
            .ok_or_else(|| format!("not direct yet: {p}"))
    });

    // 64 MiB direct: the gateway host's interface sees almost nothing of it.
    let (rx0, tx0) = w.vps_bytes();
    let secs = w.send("home3", FWD_SINK, BIG).expect("64 MiB direct");
    let (rx1, tx1) = w.vps_bytes();
    let through_gw = (rx1 - rx0) + (tx1 - tx0);
    eprintln!(
        "MESH-BENCH direct home3->home1 64MiB {secs:.2}s {:.1} MiB/s; vps eth0 carried {through_gw} bytes meanwhile",
        mib_per_s(BIG, secs)
    );
    assert!(
        through_gw < DIRECT_GATEWAY_BUDGET,
        "{through_gw} bytes crossed the gateway's interface during a 64 MiB direct transfer"
    );
    let p = w.peer("home3", "home1").expect("status");
    assert!(p["bytes_direct_out"].as_u64() >= Some(BIG), "{p}");
    // The node's /metrics says the same for a scraper (the gateway's cannot: nothing of it
    // crossed the gateway).
    let metrics = w
        .tool(
            "home3",
            &["get", "http://127.0.0.1:9091/metrics", "3"],
            Duration::from_secs(3),
        )
        .expect("home3 /metrics");
    assert!(
        metrics.contains("zonegate_peer_path{peer=\"home1\",path=\"direct\"} 1\n")
            && metrics.contains("zonegate_gateway_link_state{gateway=\"gw\",state=\"up\"} 1\n"),
        "{metrics}"
    );
    let direct_out = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("zonegate_peer_bytes_out_total{peer=\"home1\",path=\"direct\"} ")
        })
        .and_then(|n| n.parse::<u64>().ok());
    assert!(direct_out >= Some(BIG), "{metrics}");
    let (med, p90) = w.rtt("home3", FWD_ECHO).expect("rtt direct");
    eprintln!(
        "MESH-BENCH direct home3->home1 rtt median {med:.3} ms p90 {p90:.3} ms (tunnel RTT {} ms)",
        p["rtt_ms"]
    );

    // The gateway's status shows the pair it coordinated.
    let gst = w.status("vps", 9090).expect("gateway status");
    let pair = gst["agents"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["device"] == "home3"))
        .and_then(|a| a["mesh"].as_array())
        .and_then(|m| m.iter().find(|x| x["to"] == "home1"))
        .cloned()
        .unwrap_or_else(|| panic!("gateway status lacks the home3->home1 pair: {gst}"));
    assert!(pair["punches"].as_u64() >= Some(1), "{pair}");

    // Kill the gateway: home3 -> home1 keeps working over the direct path.
    gw.kill().expect("kill gateway");
    gw.wait().expect("reap gateway");
    eventually(READY, "home3 notices the gateway is gone", || {
        let st = w.status("home3", 9091)?;
        (st["gateways"][0]["state"] != "up")
            .then_some(())
            .ok_or_else(|| format!("gateway still up: {}", st["gateways"]))
    });
    let secs = w
        .send("home3", FWD_SINK, 8 << 20)
        .expect("direct transfer with the gateway down");
    eprintln!(
        "MESH-BENCH direct home3->home1 without gateway 8MiB {:.1} MiB/s",
        mib_per_s(8 << 20, secs)
    );
    w.rtt("home3", FWD_ECHO)
        .expect("echo with the gateway down");
}

#[test]
fn lab_symmetric_home_stays_relayed_and_works() {
    if !netlab::require_root("lab_symmetric_home_stays_relayed_and_works") {
        return;
    }
    let w = World::new("mesh_relay");
    // nat1 refuses unsolicited packets from nat2's address (see the module docs).
    w.lab
        .check(
            w.lab.cmd("nat1", "nft").args([
                "insert",
                "rule",
                "ip",
                "natlab",
                "forward",
                "iifname",
                "wan0",
                "ip",
                "saddr",
                &NAT2_WAN.to_string(),
                "ct",
                "state",
                "new",
                "drop",
            ]),
            Duration::from_secs(5),
        )
        .expect("restrict nat1 towards nat2");
    let _gw = w.gateway();
    let _sink = w.serve("home1", "sink", SINK_PORT);
    let _echo = w.serve("home1", "echo", ECHO_PORT);
    let _h1 = w.node(
        "home1",
        &[
            "--service",
            &format!("sink=127.0.0.1:{SINK_PORT}"),
            "--service",
            &format!("echo=127.0.0.1:{ECHO_PORT}"),
        ],
    );
    let _h2 = w.node(
        "home2",
        &[
            "--forward",
            &format!("127.0.0.1:{FWD_SINK}=home1/sink"),
            "--forward",
            &format!("127.0.0.1:{FWD_ECHO}=home1/echo"),
        ],
    );
    w.wait_agents(&["home1", "home2"]);
    eventually(READY, "first relayed stream", || {
        w.send("home2", FWD_SINK, 1 << 20)
    });
    // Punching was tried and failed: the peer says so, and stays on the relay.
    let p = eventually(READY, "home2 gave up punching towards home1", || {
        let p = w.peer("home2", "home1")?;
        (p["punches"].as_u64() >= Some(1) && !p["last_error"].is_null())
            .then_some(p.clone())
            .ok_or_else(|| format!("punching not done yet: {p}"))
    });
    assert_eq!(p["path"], "relay", "{p}");

    let n: u64 = 16 << 20;
    let (rx0, tx0) = w.vps_bytes();
    let secs = w.send("home2", FWD_SINK, n).expect("relayed transfer");
    let (rx1, tx1) = w.vps_bytes();
    let through_gw = (rx1 - rx0) + (tx1 - tx0);
    eprintln!(
        "MESH-BENCH relay home2->home1 16MiB {secs:.2}s {:.1} MiB/s; vps eth0 carried {through_gw} bytes",
        mib_per_s(n, secs)
    );
    assert!(
        through_gw >= 2 * n,
        "a relayed transfer must cross the gateway twice (in and out): {through_gw} bytes for {n}"
    );
    let p = w.peer("home2", "home1").expect("status");
    assert_eq!(p["path"], "relay", "{p}");
    assert!(p["streams_direct"].as_u64() == Some(0), "{p}");
    let (med, p90) = w.rtt("home2", FWD_ECHO).expect("rtt relayed");
    eprintln!("MESH-BENCH relay home2->home1 rtt median {med:.3} ms p90 {p90:.3} ms");
}

#[test]
fn lab_two_devices_behind_one_symmetric_nat_go_direct_over_their_lan() {
    if !netlab::require_root("lab_two_devices_behind_one_symmetric_nat_go_direct_over_their_lan") {
        return;
    }
    let w = World::new("mesh_lan");
    let _gw = w.gateway();
    let _sink = w.serve("home2", "sink", SINK_PORT);
    let _echo = w.serve("home2", "echo", ECHO_PORT);
    let _h2 = w.node(
        "home2",
        &[
            "--service",
            &format!("sink=127.0.0.1:{SINK_PORT}"),
            "--service",
            &format!("echo=127.0.0.1:{ECHO_PORT}"),
        ],
    );
    let _h2b = w.node(
        "home2b",
        &[
            "--forward",
            &format!("127.0.0.1:{FWD_SINK}=home2/sink"),
            "--forward",
            &format!("127.0.0.1:{FWD_ECHO}=home2/echo"),
        ],
    );
    w.wait_agents(&["home2", "home2b"]);
    // Both come from nat2's one public address; each reported its LAN address.
    eventually(READY, "gateway lists both LAN addresses", || {
        let st = w.status("vps", 9090)?;
        for (d, ip) in [("home2", HOME2), ("home2b", HOME2B)] {
            let a = st["agents"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["device"] == d))
                .ok_or_else(|| format!("{d} not listed: {st}"))?;
            let want = format!("{ip}:");
            let listed = a["local_addrs"].as_array().is_some_and(|l| {
                l.iter()
                    .any(|x| x.as_str().is_some_and(|s| s.starts_with(&want)))
            });
            let behind_nat2 = a["addr"]
                .as_str()
                .is_some_and(|s| s.starts_with(&format!("{NAT2_WAN}:")));
            if !(listed && behind_nat2) {
                return Err(format!("{d}: {a}"));
            }
        }
        Ok(())
    });

    eventually(READY, "first relayed stream", || {
        w.send("home2b", FWD_SINK, 1 << 20)
    });
    let p = eventually(PUNCHED, "home2b reports a direct path to home2", || {
        let p = w.peer("home2b", "home2")?;
        if p["path"] == "direct" {
            return Ok(p);
        }
        // another relayed stream: it asks for a new round once a failed one is PUNCH_INTERVAL old
        w.nudge("home2b", FWD_SINK);
        Err(format!("not direct yet: {p}"))
    });
    assert!(
        p["direct_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{HOME2}:"))),
        "the direct path should be the LAN one: {p}"
    );

    // 64 MiB direct over the LAN: neither the gateway nor the NAT's outside carries it.
    let (rx0, tx0) = w.vps_bytes();
    let secs = w
        .send("home2b", FWD_SINK, BIG)
        .expect("64 MiB over the LAN");
    let (rx1, tx1) = w.vps_bytes();
    let through_gw = (rx1 - rx0) + (tx1 - tx0);
    eprintln!(
        "MESH-BENCH lan home2b->home2 64MiB {secs:.2}s {:.1} MiB/s; vps eth0 carried {through_gw} bytes meanwhile",
        mib_per_s(BIG, secs)
    );
    assert!(
        through_gw < DIRECT_GATEWAY_BUDGET,
        "{through_gw} bytes crossed the gateway's interface during a 64 MiB LAN transfer"
    );
    let p = w.peer("home2b", "home2").expect("status");
    assert!(p["bytes_direct_out"].as_u64() >= Some(BIG), "{p}");
    let (med, p90) = w.rtt("home2b", FWD_ECHO).expect("rtt over the LAN");
    eprintln!("MESH-BENCH lan home2b->home2 rtt median {med:.3} ms p90 {p90:.3} ms");

    // home2's LAN address changes under its running session (a new DHCP lease): QUIC
    // migration keeps the session, and the gateway hears the new address within the agent's
    // recheck, not only at the next reconnect, and stops handing out the old one.
    let moved = std::net::Ipv4Addr::new(192, 168, 2, 20);
    let nat2_lan = netlab::NAT2_LAN.to_string();
    let lease = format!("{moved}/24");
    let old = format!("{HOME2}/24");
    let moved_s = moved.to_string();
    // The new address stays when the old (primary) one goes; the default route is put back
    // with the new source whatever the deletion did to it.
    w.lab
        .check(
            w.lab
                .cmd("home2", "sysctl")
                .args(["-qw", "net.ipv4.conf.eth0.promote_secondaries=1"]),
            Duration::from_secs(5),
        )
        .expect("sysctl promote_secondaries");
    for args in [
        &["addr", "add", lease.as_str(), "dev", "eth0"][..],
        &["addr", "del", old.as_str(), "dev", "eth0"],
        &[
            "route", "replace", "default", "via", &nat2_lan, "src", &moved_s,
        ],
    ] {
        w.lab
            .check(w.lab.cmd("home2", "ip").args(args), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    }
    eventually(
        RECHECKED,
        "gateway lists home2's new LAN address only",
        || {
            let st = w.status("vps", 9090)?;
            let a = st["agents"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["device"] == "home2"))
                .ok_or_else(|| format!("home2 not listed: {st}"))?;
            let listed: Vec<&str> = a["local_addrs"]
                .as_array()
                .map(|l| l.iter().filter_map(|x| x.as_str()).collect())
                .unwrap_or_default();
            match listed[..] {
                [one] if one.starts_with(&format!("{moved}:")) => Ok(()),
                _ => Err(format!("home2: {a}")),
            }
        },
    );
}
