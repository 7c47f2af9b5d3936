//! Zone fixtures for tunnel tests: a zone with a gateway `gw` (203.0.113.10:4433, the NAT lab's
//! `vps`) and two nodes `home1`, `home2`, each with a ready-to-run bundle; plus `zgtool.py`, a
//! small python helper the lab tests run inside namespaces (HTTP GET, UDP/TCP probes and echo
//! servers), written next to the bundles.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::common::ok;

/// The gateway's public QUIC address in the zone config (the lab's `vps`).
pub const GW_PUBLIC: &str = "203.0.113.10:4433";

/// Short transport timers for tests, so a dead gateway or path is noticed within seconds
/// (defaults are 10 s / 30 s). Applied to every bundle.
pub const TEST_KEEPALIVE_MS: u64 = 1000;
pub const TEST_IDLE_MS: u64 = 4000;

/// A zone with bundles for `gw`, `home1` and `home2`.
#[derive(Debug)]
pub struct Zone {
    /// The zone directory (zone.key, zone-ca.crt, zone.json, devices/).
    pub dir: PathBuf,
    /// Bundle directories.
    pub gw: PathBuf,
    pub home1: PathBuf,
    pub home2: PathBuf,
}

impl Zone {
    /// `gw/gateway.toml`.
    pub fn gateway_toml(&self) -> PathBuf {
        self.gw.join("gateway.toml")
    }
    /// `NAME/node.toml` of a node bundle.
    pub fn node_toml(&self, node: &str) -> PathBuf {
        self.dir.join("devices").join(node).join("node.toml")
    }
    /// The gateway's policy directory (`policies` next to gateway.toml; created empty).
    pub fn policies(&self) -> PathBuf {
        self.gw.join("policies")
    }
    /// Writes (atomically: temp file + rename) policy file `name` in the gateway's policy dir.
    pub fn write_policy(&self, name: &str, toml: &str) {
        let dir = self.policies();
        let tmp = dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, toml).expect("write policy");
        fs::rename(&tmp, dir.join(name)).expect("rename policy");
    }
}

/// Creates the zone in `base/zone`: gateway first (so every bundle's zone.json lists it), then
/// the nodes; copies the final zone.json into every bundle, appends the short test timers to
/// every config and creates the gateway's (empty) policy directory.
pub fn three_device_zone(base: &Path) -> Zone {
    let dir = base.join("zone");
    let z = dir.to_str().expect("utf-8 temp path");
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
        GW_PUBLIC,
    ]);
    for n in ["home1", "home2"] {
        ok(["device", "add", n, "--zone", z, "--role", "node"]);
    }
    let devices = dir.join("devices");
    let zone = Zone {
        gw: devices.join("gw"),
        home1: devices.join("home1"),
        home2: devices.join("home2"),
        dir: dir.clone(),
    };
    let tail = format!(
        "\n# tests: notice a dead peer within seconds\n[tunnel]\nkeepalive_ms = {TEST_KEEPALIVE_MS}\nidle_timeout_ms = {TEST_IDLE_MS}\n"
    );
    for (bundle, cfg) in [
        (&zone.gw, "gateway.toml"),
        (&zone.home1, "node.toml"),
        (&zone.home2, "node.toml"),
    ] {
        fs::copy(dir.join("zone.json"), bundle.join("zone.json")).expect("copy zone.json");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(bundle.join(cfg))
            .expect("open bundle config");
        f.write_all(tail.as_bytes()).expect("append tunnel timers");
    }
    fs::create_dir_all(zone.policies()).expect("policy dir");
    zone
}

/// Writes `zgtool.py` into `dir` and returns its path.
pub fn write_tool(dir: &Path) -> PathBuf {
    let p = dir.join("zgtool.py");
    fs::write(&p, ZGTOOL).expect("write zgtool.py");
    p
}

/// Helper run inside lab namespaces. Every client mode prints its result on stdout and exits 1
/// with the reason on stderr when it fails.
const ZGTOOL: &str = r#"
import socket, socketserver, sys, threading, time, urllib.request

def get(url, timeout):
    with urllib.request.urlopen(url, timeout=float(timeout)) as r:
        sys.stdout.write(r.read().decode())

def udp(host, port, msg, total):
    # datagrams may be lost while a flow is set up: resend until an answer or the deadline
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.3)
    end = time.time() + float(total)
    while time.time() < end:
        s.sendto(msg.encode(), (host, int(port)))
        try:
            data, _ = s.recvfrom(65535)
            sys.stdout.write(data.decode())
            return
        except socket.timeout:
            continue
    sys.exit("no UDP answer within %ss" % total)

def tcp_probe(host, port, msg, timeout):
    # connect, send, half-close, read until EOF: prints `eof DATA`, `reset DATA` or exits 1
    # (a reset can come before the connect returns: a forward that resets what it accepts)
    try:
        s = socket.create_connection((host, int(port)), timeout=float(timeout))
    except ConnectionResetError:
        sys.stdout.write("reset ")
        return
    got = b""
    try:
        s.sendall(msg.encode())
        s.shutdown(socket.SHUT_WR)
        while True:
            d = s.recv(65535)
            if not d:
                sys.stdout.write("eof " + got.decode())
                return
            got += d
    except socket.timeout:
        sys.exit("timeout after %r" % got)
    except OSError:
        # reset, broken pipe, or ENOTCONN when the peer's RST came before our half-close
        sys.stdout.write("reset " + got.decode())

def udp_echo(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", int(port)))
    print("udp echo on", port, flush=True)
    while True:
        d, a = s.recvfrom(65535)
        s.sendto(d, a)

class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            d = self.request.recv(65535)
            if not d:
                return
            self.request.sendall(d)

def tcp_echo(bind, port):
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    srv = socketserver.ThreadingTCPServer((bind, int(port)), Echo)
    srv.daemon_threads = True
    print("tcp echo on", bind, port, flush=True)
    srv.serve_forever()

modes = {"get": get, "udp": udp, "tcp-probe": tcp_probe, "udp-echo": udp_echo, "tcp-echo": tcp_echo}
try:
    modes[sys.argv[1]](*sys.argv[2:])
except SystemExit:
    raise
except Exception as e:
    sys.exit("%s: %s" % (type(e).__name__, e))
"#;

/// Interval of the readiness loops of the lab tests.
const POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Err when the process has exited (so a readiness loop fails fast with the reason in the logs).
pub fn alive(p: &mut crate::netlab::LabProcess, what: &str) -> Result<(), String> {
    match p.try_wait() {
        Ok(None) => Ok(()),
        Ok(Some(st)) => Err(format!("{what} exited: {st} (see its log below)")),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// Polls `f` until it returns Ok or `timeout` passes; then panics with the last error.
#[track_caller]
pub fn eventually<T>(
    timeout: std::time::Duration,
    what: &str,
    mut f: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if e.contains(" exited: ") || std::time::Instant::now() >= deadline => {
                panic!("{what}: not within {timeout:?}: {e}")
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// The entry of `device` in a gateway `/status` document.
pub fn find_agent<'a>(
    status: &'a serde_json::Value,
    device: &str,
) -> Option<&'a serde_json::Value> {
    status["agents"]
        .as_array()?
        .iter()
        .find(|a| a["device"] == device)
}

/// Appends the short test timers (a `[tunnel]` table) to a bundle's config file.
fn append_test_timers(cfg: &Path) {
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(cfg)
        .expect("open bundle config");
    writeln!(
        f,
        "\n# tests: notice a dead peer within seconds\n[tunnel]\nkeepalive_ms = {TEST_KEEPALIVE_MS}\nidle_timeout_ms = {TEST_IDLE_MS}"
    )
    .expect("append tunnel timers");
}

/// `zonegate device add NAME --role node` on a zone made by [`three_device_zone`] (e.g. `home3`,
/// the lab's third home): the bundle gets the zone's newest zone.json (`device add` writes it)
/// and the short test timers. Returns the bundle's `node.toml`. The other bundles keep their
/// older zone.json until the test copies the new one.
pub fn add_node(zone: &Zone, name: &str) -> PathBuf {
    let z = zone.dir.to_str().expect("utf-8 temp path");
    ok(["device", "add", name, "--zone", z, "--role", "node"]);
    let cfg = zone.node_toml(name);
    append_test_timers(&cfg);
    cfg
}

/// Copies the zone's current `zone.json` (after `device add`/`revoke`) into the gateway's bundle.
pub fn publish_to_gateway(zone: &Zone) {
    fs::copy(zone.dir.join("zone.json"), zone.gw.join("zone.json")).expect("copy zone.json");
}

/// Logs of the processes a lab test started, printed when the test panics (or always with
/// `ZG_LAB_LOGS=1`).
#[derive(Default)]
pub struct LabLogs(std::sync::Mutex<Vec<(String, PathBuf)>>);

impl LabLogs {
    /// Registers `path` under `tag` (once).
    pub fn add(&self, tag: &str, path: &Path) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if v.iter().all(|(_, p)| p != path) {
            v.push((tag.to_owned(), path.to_owned()));
        }
    }
}

impl Drop for LabLogs {
    fn drop(&mut self) {
        if !std::thread::panicking() && std::env::var("ZG_LAB_LOGS").as_deref() != Ok("1") {
            return;
        }
        for (tag, path) in self.0.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let text = fs::read_to_string(path).unwrap_or_else(|e| format!("<unreadable: {e}>"));
            eprintln!("===== {tag} ({}) =====\n{text}", path.display());
        }
    }
}

/// A lab test's world: a NAT lab, the zone of [`three_device_zone`] (no policy yet) and
/// `zgtool.py` in a temporary directory, and the logs of every process started through it
/// (`TMP/TAG.log`). Field order is drop order: the logs are printed before the lab goes down.
pub struct LabWorld {
    pub logs: LabLogs,
    pub lab: crate::netlab::Lab,
    pub zone: Zone,
    pub tool: PathBuf,
    pub tmp: tempfile::TempDir,
}

impl LabWorld {
    pub fn new(name: &str) -> LabWorld {
        let tmp = tempfile::tempdir().expect("tempdir");
        let zone = three_device_zone(tmp.path());
        let tool = write_tool(tmp.path());
        let lab = crate::netlab::Lab::up(name).expect("lab up");
        LabWorld {
            logs: LabLogs::default(),
            lab,
            zone,
            tool,
            tmp,
        }
    }

    /// `TMP/TAG.log`, registered for printing.
    pub fn log_path(&self, tag: &str) -> PathBuf {
        let path = self.tmp.path().join(format!("{tag}.log"));
        self.logs.add(tag, &path);
        path
    }

    /// The text of `TMP/TAG.log` so far (empty when there is none).
    pub fn log_text(&self, tag: &str) -> String {
        fs::read_to_string(self.tmp.path().join(format!("{tag}.log"))).unwrap_or_default()
    }

    /// Spawns `program args` in `host` with `RUST_LOG=info`; stdout (unless `piped_stdout`) and
    /// stderr are appended to `TMP/TAG.log`, so a restarted process adds to its earlier log.
    pub fn spawn_in(
        &self,
        host: &str,
        tag: &str,
        program: &Path,
        args: &[&str],
        piped_stdout: bool,
    ) -> crate::netlab::LabProcess {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(tag))
            .expect("log file");
        let out = if piped_stdout {
            std::process::Stdio::piped()
        } else {
            file.try_clone().expect("dup log fd").into()
        };
        let mut cmd = self.lab.cmd(host, program);
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(out)
            .stderr(file);
        self.lab
            .spawn(&mut cmd)
            .unwrap_or_else(|e| panic!("spawn {tag} in {host}: {e}"))
    }

    /// `zonegate gateway` in `vps` (log tag `gateway`).
    pub fn gateway(&self) -> crate::netlab::LabProcess {
        let cfg = self.zone.gateway_toml();
        let cfg = cfg.to_str().expect("utf-8 temp path");
        let bin = crate::common::bin();
        self.spawn_in("vps", "gateway", &bin, &["gateway", "--config", cfg], false)
    }

    /// `zonegate node` of the bundle named like lab host `host` (log tag = host), with `flags`.
    pub fn node(&self, host: &str, flags: &[&str]) -> crate::netlab::LabProcess {
        let cfg = self.zone.node_toml(host);
        let mut args = vec!["node", "--config", cfg.to_str().expect("utf-8 temp path")];
        args.extend_from_slice(flags);
        self.spawn_in(host, host, &crate::common::bin(), &args, false)
    }

    /// Runs `zgtool.py ARGS` in `host`: Ok(stdout) or Err(why).
    pub fn tool(
        &self,
        host: &str,
        args: &[&str],
        timeout: std::time::Duration,
    ) -> Result<String, String> {
        let mut cmd = self.lab.cmd(host, crate::netlab::python());
        cmd.arg(&self.tool).args(args);
        let out = self
            .lab
            .run(&mut cmd, timeout + std::time::Duration::from_secs(3))
            .map_err(|e| format!("zgtool {args:?} in {host}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "zgtool {args:?} in {host}: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `/status` of the admin API on `host`'s loopback (gateway 9090, node 9091).
    pub fn status(&self, host: &str, port: u16) -> Result<serde_json::Value, String> {
        let url = format!("http://127.0.0.1:{port}/status");
        let body = self.tool(host, &["get", &url, "3"], std::time::Duration::from_secs(3))?;
        serde_json::from_str(&body).map_err(|e| format!("status JSON: {e}: {body}"))
    }

    /// Waits until the gateway's `/status` lists every device of `want` offering its services;
    /// fails fast if the gateway exits.
    pub fn wait_agents(
        &self,
        gw: &mut crate::netlab::LabProcess,
        want: &[(&str, &[&str])],
        within: std::time::Duration,
    ) -> serde_json::Value {
        eventually(within, "gateway /status lists the agents", || {
            alive(gw, "gateway")?;
            let st = self.status("vps", 9090)?;
            for (device, services) in want {
                let agent = find_agent(&st, device)
                    .ok_or_else(|| format!("{device} not connected: {st}"))?;
                let offered = |svc: &str| {
                    agent["services"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x["name"] == svc))
                };
                if let Some(svc) = services.iter().find(|s| !offered(s)) {
                    return Err(format!("{device} does not offer {svc} yet: {agent}"));
                }
            }
            Ok(st)
        })
    }
}
