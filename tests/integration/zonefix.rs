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
    s = socket.create_connection((host, int(port)), timeout=float(timeout))
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
