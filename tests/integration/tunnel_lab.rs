//! Issue 3 end to end in the NAT lab: a gateway on the public `vps`, node agents in `home1`
//! (behind the cone `nat1`) and `home2` (behind the symmetric `nat2`), all real `zonegate`
//! processes. An internet client reaches home1's service through the gateway's port, home2
//! reaches it through a mesh forward, a direct connection around the gateway fails, mesh is
//! deny-by-default, the tunnel comes back after the gateway is killed and restarted and after the
//! NATs forget their mappings, and UDP is exposed through QUIC datagrams.
//!
//! Readiness is always polled (gateway `/status`, a port that accepts, an answer through the
//! tunnel) under a deadline; nothing waits on a fixed sleep. Every child's stderr goes to a file in
//! the test's temporary directory; all of them are printed when a test fails (or always with
//! `ZG_LAB_LOGS=1`).

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::bin;
use crate::netlab::{
    self, python, tcp_connects, wait_tcp, Lab, LabProcess, HOME1, NAT1_WAN, NAT2_WAN, VPS,
};
use crate::zonefix::{self, alive, eventually, find_agent, Zone};

/// Bound for anything that should succeed soon: generous, successes return at once.
const READY: Duration = Duration::from_secs(15);
/// How long a negative check waits for something that must not happen (a SYN crosses the lab
/// in microseconds).
const NOT_WITHIN: Duration = Duration::from_secs(1);

/// Service and app ports.
const WEB_LOCAL: u16 = 8000; // python http.server in home1
const WEB_PUBLIC: u16 = 8080; // gateway tcp app -> home1/web
const MESH_WEB: u16 = 9000; // forward in home2 -> home1/web
const ECHO_LOCAL: u16 = 7001; // tcp echo in home2
const MESH_ECHO: u16 = 9001; // forward in home1 -> home2/echo
const UDP_LOCAL: u16 = 7000; // udp echo in home1
const UDP_PUBLIC: u16 = 5353; // gateway udp app -> home1/dns

const WEB_POLICY: &str = r#"# public TCP to home1's web server, and home2 may reach it over the mesh
[app.web]
tcp = { listen = "0.0.0.0:8080" }
to = "home1/web"
allow = { from = ["public"] }

[app.web-mesh]
mesh = true
to = "home1/web"
allow = { from = ["device:home2"] }
"#;

const ECHO_MESH_POLICY: &str = r#"[app.echo-mesh]
mesh = true
to = "home2/echo"
allow = { from = ["device:home1"] }
"#;

const UDP_POLICY: &str = r#"[app.dns]
udp = { listen = "0.0.0.0:5353" }
to = "home1/dns"
allow = { from = ["public"] }
"#;

/// Prints every captured log when the test panics (or always with `ZG_LAB_LOGS=1`).
#[derive(Default)]
struct Logs(Mutex<Vec<(String, PathBuf)>>);

impl Logs {
    fn add(&self, tag: &str, path: &Path) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !v.iter().any(|(_, p)| p == path) {
            v.push((tag.to_owned(), path.to_owned()));
        }
    }
    fn dump(&self) {
        for (tag, path) in self.0.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let text = fs::read_to_string(path).unwrap_or_else(|e| format!("<unreadable: {e}>"));
            eprintln!("===== {tag} ({}) =====\n{text}", path.display());
        }
    }
}

impl Drop for Logs {
    fn drop(&mut self) {
        if thread::panicking() || std::env::var("ZG_LAB_LOGS").as_deref() == Ok("1") {
            self.dump();
        }
    }
}

/// One test's world. Field order is drop order: the logs are printed before the lab goes down
/// (processes the test still holds are dropped, i.e. killed, before this struct).
struct World {
    logs: Logs,
    lab: Lab,
    zone: Zone,
    tool: PathBuf,
    tmp: tempfile::TempDir,
}

impl World {
    fn new(name: &str) -> World {
        let tmp = tempfile::tempdir().expect("tempdir");
        let zone = zonefix::three_device_zone(tmp.path());
        zone.write_policy("web.toml", WEB_POLICY);
        let tool = zonefix::write_tool(tmp.path());
        let lab = Lab::up(name).expect("lab up");
        World {
            logs: Logs::default(),
            lab,
            zone,
            tool,
            tmp,
        }
    }

    /// Spawns `program args` in `host`, stdout and stderr appended to `TMP/tag.log` (appending
    /// keeps the log of an earlier run of the same tag, e.g. a restarted gateway).
    fn spawn(&self, host: &str, tag: &str, program: &Path, args: &[String]) -> LabProcess {
        let path = self.tmp.path().join(format!("{tag}.log"));
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("log file");
        self.logs.add(tag, &path);
        let mut cmd = self.lab.cmd(host, program);
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(file.try_clone().expect("dup log fd"))
            .stderr(file);
        self.lab
            .spawn(&mut cmd)
            .unwrap_or_else(|e| panic!("spawn {tag}: {e}"))
    }

    fn gateway(&self) -> LabProcess {
        let cfg = self.zone.gateway_toml();
        self.spawn(
            "vps",
            "gateway",
            &bin(),
            &s(&["gateway", "--config", path_str(&cfg)]),
        )
    }

    /// `zonegate node` for `home1`/`home2` with extra flags (`--service ...`, `--forward ...`).
    fn node(&self, host: &str, flags: &[&str]) -> LabProcess {
        let cfg = self.zone.node_toml(host);
        let mut args = s(&["node", "--config", path_str(&cfg)]);
        args.extend(flags.iter().map(|f| f.to_string()));
        self.spawn(host, host, &bin(), &args)
    }

    fn python(&self, host: &str, tag: &str, args: &[&str]) -> LabProcess {
        let mut a = vec!["-u".to_string()];
        a.extend(args.iter().map(|x| x.to_string()));
        self.spawn(host, tag, Path::new(python()), &a)
    }

    /// Runs `zgtool.py ARGS` in `host`; Ok(stdout) or Err(stderr/why).
    fn tool(&self, host: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
        let mut cmd: Command = self.lab.cmd(host, python());
        cmd.arg(&self.tool).args(args);
        match self.lab.run(&mut cmd, timeout + Duration::from_secs(3)) {
            Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
            Ok(o) => Err(format!(
                "zgtool {args:?} in {host}: {} {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!("zgtool {args:?} in {host}: {e}")),
        }
    }

    /// HTTP GET from inside `host` (python urllib: python3 is all CI installs).
    fn http_get(&self, host: &str, url: &str) -> Result<String, String> {
        self.tool(host, &["get", url, "3"], Duration::from_secs(3))
    }

    /// `/status` of the admin API on `host`'s loopback (gateway 9090, node 9091).
    fn status(&self, host: &str, port: u16) -> Result<Value, String> {
        let body = self.http_get(host, &format!("http://127.0.0.1:{port}/status"))?;
        serde_json::from_str(&body).map_err(|e| format!("status JSON: {e}: {body}"))
    }

    /// Waits until the gateway's `/status` lists every device of `want` with its services.
    fn wait_agents(&self, gw: &mut LabProcess, want: &[(&str, &[&str])]) -> Value {
        eventually(READY, "gateway /status lists the agents", || {
            alive(gw, "gateway")?;
            let st = self.status("vps", 9090)?;
            for (device, services) in want {
                let agent = find_agent(&st, device)
                    .ok_or_else(|| format!("{device} not connected: {st}"))?;
                for svc in *services {
                    if !agent["services"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x["name"] == *svc))
                    {
                        return Err(format!("{device} does not offer {svc} yet: {agent}"));
                    }
                }
            }
            Ok(st)
        })
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn marker(tag: &str) -> String {
    format!("zg-{tag}-{:016x}", rand_u64())
}

/// A random-enough u64 without a rand dependency: std's randomly keyed hasher.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// home1's web server: python http.server on 0.0.0.0:8000 (all interfaces, so the "direct
/// connection fails" checks are about the NAT, not the bind address) serving `index.html` with a
/// random marker. Returns the process and the marker.
fn start_web(w: &World) -> (LabProcess, String) {
    let root = w.tmp.path().join("www");
    fs::create_dir_all(&root).expect("www dir");
    let m = marker("web");
    fs::write(root.join("index.html"), format!("{m}\n")).expect("index.html");
    let p = w.python(
        "home1",
        "web-home1",
        &[
            "-m",
            "http.server",
            &WEB_LOCAL.to_string(),
            "--bind",
            "0.0.0.0",
            "--directory",
            path_str(&root),
        ],
    );
    wait_tcp(&w.lab, "home1", sa(Ipv4Addr::LOCALHOST, WEB_LOCAL), READY).expect("web up");
    (p, m)
}

fn public_url() -> String {
    format!("http://{VPS}:{WEB_PUBLIC}/")
}

/// GET through the gateway's public port from `client`, retried until it shows `m`.
#[track_caller]
fn client_sees(w: &World, m: &str, within: Duration) {
    eventually(within, "client GET through the gateway", || {
        let body = w.http_get("client", &public_url())?;
        body.contains(m)
            .then_some(())
            .ok_or_else(|| format!("body without marker: {body:?}"))
    });
}

#[test]
fn lab_client_and_mesh_reach_home1_only_through_gateway() {
    if !netlab::require_root("lab_client_and_mesh_reach_home1_only_through_gateway") {
        return;
    }
    let w = World::new("tunnel_reach");
    let (_web, m) = start_web(&w);
    let mut gw = w.gateway();
    let _home1 = w.node("home1", &["--service", "web=127.0.0.1:8000"]);
    let _home2 = w.node("home2", &["--forward", "127.0.0.1:9000=home1/web"]);
    let st = w.wait_agents(&mut gw, &[("home1", &["web"]), ("home2", &[])]);

    // the gateway sees each home as its NAT's public address
    for (dev, wan) in [("home1", NAT1_WAN), ("home2", NAT2_WAN)] {
        let addr: SocketAddr = find_agent(&st, dev).unwrap()["addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("{dev}: no addr in {st}"));
        assert_eq!(addr.ip(), std::net::IpAddr::V4(wan), "{dev} seen as {addr}");
    }
    // and home1's agent learns that address from the gateway (the gateway lists an agent
    // before the agent has handled its Welcome: polled)
    eventually(READY, "home1's agent up with its observed address", || {
        let n1 = w.status("home1", 9091)?;
        let link = &n1["gateways"][0];
        let observed = link["observed_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{NAT1_WAN}:")));
        (link["state"] == "up" && observed)
            .then_some(())
            .ok_or_else(|| format!("home1 /status: {n1}"))
    });

    // internet client -> gateway port -> QUIC stream -> home1's service
    client_sees(&w, &m, READY);

    // Path MTU discovery over the lab's Ethernet-sized links (MTU 1,500) settles on what they
    // carry — the probes toward the jumbo bound are lost, none is fragmented — on both ends, and
    // no lower than quinn's default bound (1,452) would have left it (measured: 1,470 both ways).
    let (from_home, from_gw) = eventually(READY, "path MTU discovered over the NAT", || {
        let link = w.status("home1", 9091)?["gateways"][0]["path_mtu"].as_u64();
        let agent =
            find_agent(&w.status("vps", 9090)?, "home1").and_then(|a| a["path_mtu"].as_u64());
        match (link, agent) {
            (Some(l), Some(a)) if l >= 1_452 && a >= 1_452 => Ok((l, a)),
            other => Err(format!("path_mtu home1 -> vps, vps -> home1: {other:?}")),
        }
    });
    eprintln!("path MTU over the lab: home1 -> vps {from_home}, vps -> home1 {from_gw}");
    assert!(
        from_home <= 1_472 && from_gw <= 1_472,
        "path MTU beyond a 1,500-byte link: {from_home} / {from_gw}"
    );
    // home2 -> its local forward -> gateway relay -> home1's service
    let body = eventually(READY, "home2 GET through its mesh forward", || {
        w.http_get("home2", &format!("http://127.0.0.1:{MESH_WEB}/"))
    });
    assert!(body.contains(&m), "mesh body {body:?}");

    // around the gateway nothing gets in: the server listens on all of home1's interfaces (its
    // own router reaches it), yet neither the NAT's public address nor the private one works
    assert!(tcp_connects(&w.lab, "nat1", sa(HOME1, WEB_LOCAL), READY).unwrap());
    for target in [sa(NAT1_WAN, WEB_LOCAL), sa(HOME1, WEB_LOCAL)] {
        assert!(
            !tcp_connects(&w.lab, "client", target, NOT_WITHIN).unwrap(),
            "client reached home1 directly at {target}"
        );
    }
    assert!(
        !tcp_connects(&w.lab, "vps", sa(NAT1_WAN, WEB_LOCAL), NOT_WITHIN).unwrap(),
        "vps reached home1 directly"
    );

    // the client's connections were accounted to the app, with what it was sent (counters
    // settle as each connection ends)
    let web = eventually(
        READY,
        "the client's connections counted for app web",
        || {
            let st = w.status("vps", 9090)?;
            let web = st["apps"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["name"] == "web"))
                .cloned()
                .ok_or_else(|| format!("no app web in {st}"))?;
            let c = &web["counters"];
            let taken =
                c["connections"].as_u64().unwrap_or(0) + c["requests"].as_u64().unwrap_or(0);
            let out = c["bytes_out"].as_u64().unwrap_or(0);
            (taken >= 1 && out >= m.len() as u64)
                .then_some(web.clone())
                .ok_or_else(|| format!("app web counters: {c}"))
        },
    );
    eprintln!("app web after the test: {web}");

    // the zone's health colour is logged as it changes: green once every device is connected
    let green = eventually(
        READY,
        "the gateway logs the zone's health turning green",
        || {
            let log =
                fs::read_to_string(w.tmp.path().join("gateway.log")).map_err(|e| e.to_string())?;
            log.lines()
                .find(|l| l.contains("zone health changed") && l.contains("green"))
                .map(str::to_owned)
                .ok_or_else(|| "no such line yet".to_string())
        },
    );
    eprintln!("{green}");
}

#[test]
fn lab_mesh_is_deny_by_default() {
    if !netlab::require_root("lab_mesh_is_deny_by_default") {
        return;
    }
    let w = World::new("tunnel_deny");
    let (_web, m) = start_web(&w);
    let _echo = w.python(
        "home2",
        "echo-home2",
        &[
            path_str(&w.tool),
            "tcp-echo",
            "127.0.0.1",
            &ECHO_LOCAL.to_string(),
        ],
    );
    wait_tcp(&w.lab, "home2", sa(Ipv4Addr::LOCALHOST, ECHO_LOCAL), READY).expect("echo up");
    let mut gw = w.gateway();
    let _home1 = w.node(
        "home1",
        &[
            "--service",
            "web=127.0.0.1:8000",
            "--forward",
            "127.0.0.1:9001=home2/echo",
        ],
    );
    let _home2 = w.node(
        "home2",
        &[
            "--service",
            "echo=127.0.0.1:7001",
            "--forward",
            "127.0.0.1:9000=home1/web",
        ],
    );
    w.wait_agents(&mut gw, &[("home1", &["web"]), ("home2", &["echo"])]);
    client_sees(&w, &m, READY);

    // no mesh app lets home1 reach home2/echo: the forward accepts, then resets (or closes)
    // without data
    let probe = |msg: &str| {
        w.tool(
            "home1",
            &["tcp-probe", "127.0.0.1", &MESH_ECHO.to_string(), msg, "5"],
            Duration::from_secs(5),
        )
    };
    for i in 0..3 {
        let out = probe(&format!("secret-{i}")).expect("probe the forward");
        assert!(
            out == "eof " || out == "reset ",
            "denied mesh stream carried data: {out:?}"
        );
    }
    // the log writer batches: the line may land a little after the refusal
    eventually(READY, "the gateway logs the refusal", || {
        let gw_log =
            fs::read_to_string(w.tmp.path().join("gateway.log")).map_err(|e| e.to_string())?;
        gw_log
            .contains("mesh stream refused")
            .then_some(())
            .ok_or_else(|| "gateway did not log the refusal yet".to_string())
    });

    // the gateway keeps serving others: the public port and home2's allowed forward (its
    // first stream, relayed: retried)
    client_sees(&w, &m, READY);
    let body = eventually(READY, "home2's allowed mesh forward", || {
        w.http_get("home2", &format!("http://127.0.0.1:{MESH_WEB}/"))
    });
    assert!(body.contains(&m), "mesh body {body:?}");
    alive(&mut gw, "gateway").unwrap();

    // control: the refusal was the policy's doing. Allow it (hot reload) and it echoes.
    w.zone.write_policy("echo.toml", ECHO_MESH_POLICY);
    eventually(
        READY,
        "home1 reaches home2/echo once allowed",
        || match probe("allowed-now")? {
            out if out == "eof allowed-now" => Ok(()),
            out => Err(format!("got {out:?}")),
        },
    );
}

#[test]
fn lab_gateway_killed_and_restarted_agents_come_back() {
    if !netlab::require_root("lab_gateway_killed_and_restarted_agents_come_back") {
        return;
    }
    let w = World::new("tunnel_restart");
    let (_web, m) = start_web(&w);
    let mut gw = w.gateway();
    let mut home1 = w.node("home1", &["--service", "web=127.0.0.1:8000"]);
    let mut home2 = w.node("home2", &["--forward", "127.0.0.1:9000=home1/web"]);
    let before = w.wait_agents(&mut gw, &[("home1", &["web"]), ("home2", &[])]);
    client_sees(&w, &m, READY);

    // SIGKILL: no drain, no goodbye; the agents only notice by silence (idle timeout)
    gw.kill().expect("SIGKILL gateway");
    let killed = gw.wait().expect("reap gateway");
    eprintln!("gateway killed: {killed}");
    assert!(w.http_get("client", &public_url()).is_err());
    drop(gw);

    let t0 = Instant::now();
    let mut gw = w.gateway();
    let after = w.wait_agents(&mut gw, &[("home1", &["web"]), ("home2", &[])]);
    client_sees(&w, &m, READY);
    let body = eventually(READY, "home2's mesh forward after the restart", || {
        w.http_get("home2", &format!("http://127.0.0.1:{MESH_WEB}/"))
    });
    assert!(body.contains(&m));
    eprintln!(
        "traffic through the restarted gateway after {} ms (idle timeout {} ms)",
        t0.elapsed().as_millis(),
        zonefix::TEST_IDLE_MS
    );
    // same agent processes, new sessions
    alive(&mut home1, "home1 agent").unwrap();
    alive(&mut home2, "home2 agent").unwrap();
    for dev in ["home1", "home2"] {
        assert_ne!(
            find_agent(&before, dev).unwrap()["session"],
            find_agent(&after, dev).unwrap()["session"],
            "{dev}: expected a new session"
        );
    }
    let n1 = w.status("home1", 9091).unwrap();
    assert!(
        n1["gateways"][0]["connects"].as_u64() >= Some(2),
        "home1 should have connected twice: {n1}"
    );
}

#[test]
fn lab_nat_mappings_flushed_traffic_recovers() {
    if !netlab::require_root("lab_nat_mappings_flushed_traffic_recovers") {
        return;
    }
    let w = World::new("tunnel_flush");
    let (_web, m) = start_web(&w);
    let mut gw = w.gateway();
    let _home1 = w.node("home1", &["--service", "web=127.0.0.1:8000"]);
    let _home2 = w.node("home2", &["--forward", "127.0.0.1:9000=home1/web"]);
    w.wait_agents(&mut gw, &[("home1", &["web"]), ("home2", &[])]);
    client_sees(&w, &m, READY);

    // cone nat1 forgets home1's mapping (it comes back on the same port with home1's next packet)
    let t0 = Instant::now();
    w.lab.flush_conntrack("nat1").expect("flush nat1");
    client_sees(&w, &m, READY);
    eprintln!(
        "client -> home1 after flushing nat1: {} ms",
        t0.elapsed().as_millis()
    );

    // symmetric nat2 forgets home2's mapping: its next packet leaves from a new random port,
    // so the gateway must follow the address change (QUIC migration) or home2 must reconnect
    let home2_before =
        find_agent(&w.status("vps", 9090).unwrap(), "home2").unwrap()["addr"].clone();
    let t0 = Instant::now();
    w.lab.flush_conntrack("nat2").expect("flush nat2");
    let body = eventually(READY, "home2's mesh forward after flushing nat2", || {
        w.http_get("home2", &format!("http://127.0.0.1:{MESH_WEB}/"))
    });
    assert!(body.contains(&m));
    let st = w.status("vps", 9090).unwrap();
    eprintln!(
        "home2 -> home1 after flushing nat2: {} ms; home2 seen at {} before, {} after",
        t0.elapsed().as_millis(),
        home2_before,
        find_agent(&st, "home2")
            .map(|a| a["addr"].clone())
            .unwrap_or_default()
    );
    // and the public path still works
    client_sees(&w, &m, READY);
}

#[test]
fn lab_udp_service_exposed_through_gateway() {
    if !netlab::require_root("lab_udp_service_exposed_through_gateway") {
        return;
    }
    let w = World::new("tunnel_udp");
    w.zone.write_policy("udp.toml", UDP_POLICY);
    let mut echo = w.python(
        "home1",
        "udp-echo-home1",
        &[path_str(&w.tool), "udp-echo", &UDP_LOCAL.to_string()],
    );
    // a UDP server has no accept to poll: wait for the direct echo inside home1
    eventually(READY, "udp echo in home1", || {
        alive(&mut echo, "udp echo")?;
        w.tool(
            "home1",
            &["udp", "127.0.0.1", &UDP_LOCAL.to_string(), "hello", "1"],
            Duration::from_secs(1),
        )
    });
    let mut gw = w.gateway();
    let _home1 = w.node("home1", &["--service", "dns=127.0.0.1:7000/udp"]);
    w.wait_agents(&mut gw, &[("home1", &["dns"])]);

    for i in 0..5 {
        let msg = marker(&format!("udp{i}"));
        let got = w
            .tool(
                "client",
                &["udp", &VPS.to_string(), &UDP_PUBLIC.to_string(), &msg, "5"],
                Duration::from_secs(5),
            )
            .unwrap_or_else(|e| panic!("UDP through the gateway: {e}"));
        assert_eq!(got, msg);
    }
}

/// A gateway whose sockets are on `[::]` serves IPv4 clients and agents even where the system
/// says `net.ipv6.bindv6only = 1` (some distributions, BSD-like setups): zonegate turns
/// IPV6_V6ONLY off itself rather than relying on the sysctl. The vps gets IPv6 back (the lab
/// disables it) and the sysctl set, in its own namespace only; every other host stays IPv4, so
/// each check below is IPv4 reaching an IPv6 socket: the agents' QUIC (UDP), a TCP app, the
/// HTTP front (TCP) and the zone DNS (UDP and TCP).
#[test]
fn lab_gateway_on_ipv6_any_serves_ipv4_under_bindv6only() {
    if !netlab::require_root("lab_gateway_on_ipv6_any_serves_ipv4_under_bindv6only") {
        return;
    }
    let w = World::new("tunnel_v6only");
    w.lab
        .check(
            w.lab.cmd("vps", "sysctl").args([
                "-q",
                "-w",
                "net.ipv6.conf.all.disable_ipv6=0",
                "net.ipv6.conf.default.disable_ipv6=0",
                "net.ipv6.conf.lo.disable_ipv6=0",
                "net.ipv6.bindv6only=1",
            ]),
            READY,
        )
        .expect("IPv6 on and bindv6only=1 in the vps namespace");
    let cfg = w.zone.gateway_toml();
    let text = fs::read_to_string(&cfg).expect("read gateway.toml");
    assert!(text.contains("listen = \"0.0.0.0:4433\""), "{text}");
    let text = text.replace("listen = \"0.0.0.0:4433\"", "listen = \"[::]:4433\"");
    // Top-level keys go first: zonefix appended a [tunnel] table at the end.
    let front = "http = \"[::]:80\"\nhttps = \"off\"\ndns = \"[::]:53\"\n";
    fs::write(&cfg, format!("{front}{text}")).expect("write gateway.toml");
    w.zone.write_policy(
        "web.toml",
        &WEB_POLICY.replace("listen = \"0.0.0.0:8080\"", "listen = \"[::]:8080\""),
    );

    let (_web, m) = start_web(&w);
    let mut gw = w.gateway();
    let _home1 = w.node("home1", &["--service", "web=127.0.0.1:8000"]);
    w.wait_agents(&mut gw, &[("home1", &["web"])]);
    client_sees(&w, &m, READY);
    assert!(
        tcp_connects(&w.lab, "client", sa(VPS, 80), READY).expect("probe"),
        "the HTTP front on [::]:80 refused an IPv4 client"
    );
    // The DNS part needs dig (CI installs dnsutils); the rest has run. Said loudly, as every
    // skip is: a machine without it failed here after 15 s of "not within".
    if !crate::quickstart_lab::on_path("dig") {
        // Fails instead where the tools are required (CI).
        crate::common::skip(
            "lab_gateway_on_ipv6_any_serves_ipv4_under_bindv6only, its DNS part",
            "needs dig: install Debian package dnsutils",
        );
        return;
    }
    for transport in ["+notcp", "+tcp"] {
        eventually(READY, "zone TXT over IPv4 from the [::]:53 DNS", || {
            alive(&mut gw, "gateway")?;
            let out = w
                .lab
                .run(
                    w.lab.cmd("client", "dig").args([
                        &format!("@{VPS}"),
                        transport,
                        "+short",
                        "+time=1",
                        "+tries=1",
                        "TXT",
                        "_zonegate.alice.example",
                    ]),
                    Duration::from_secs(5),
                )
                .map_err(|e| format!("dig (install dnsutils): {e}"))?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.contains(zone_core::txt::PREFIX)
                .then_some(())
                .ok_or_else(|| format!("dig {transport}: {text}"))
        });
    }
}
