//! Issue 9, "the quick start across NATs", in the NAT lab with real processes only:
//!
//! - a zone `alice.example` with the gateway `gw` on the public `vps` (QUIC 203.0.113.10:4433,
//!   public HTTP on :80, HTTPS off, zone DNS on :53) and node agents in `home1` (behind the cone
//!   `nat1`) and `home2` (behind the symmetric `nat2`);
//! - a 3-member etcd cluster (Debian's `etcd-server`): `e0` on the vps, `e1` in home1, `e2` in
//!   home2. Each member listens on loopback only; member N's peer port is 127.0.0.1:(23800+N) in
//!   its own namespace, offered to the zone as service `etcd-peer` of its device, and in the two
//!   other namespaces a zonegate mesh forward listens on that same address and leads to it. So
//!   every peer URL is the same string everywhere and `--initial-cluster` is identical on all
//!   three members. A put on one member is read back on the others; while home1's node agent is
//!   down the other two keep quorum (a put on e0 succeeds, e1 cannot see it), and once the agent
//!   is back e1 catches up;
//! - `zonegate files` on home1 is browsable read-only from the internet `client` at
//!   `http://alice.example/dfs/`, the name resolved through the gateway's DNS (`dig`); a PUT and
//!   a POST are refused by the gateway (405) and change nothing.
//!
//! Needs root + network namespaces (loud skip otherwise, like every lab test) and `etcd` +
//! `etcdctl` (Debian `etcd-server` and `etcd-client`): without them the test prints a loud
//! `SKIPPED` line, or fails when `NATLAB_REQUIRED=1` (CI). `dig` (Debian `dnsutils`) is used for
//! the DNS query when present; otherwise a hand-built query in python asks the same question.
//!
//! Readiness is always polled under a deadline. Every child's output goes to a file in the test's
//! temporary directory (etcdctl runs are appended to `etcdctl.log`); all of them are printed when
//! the test fails (or always with `ZG_LAB_LOGS=1`).

use std::fs;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::bin;
use crate::netlab::{self, python, wait_tcp, Lab, LabProcess, VPS};
use crate::zonefix::{self, alive, eventually, find_agent, Zone};

/// Bound for anything that should succeed soon (successes return at once).
const READY: Duration = Duration::from_secs(20);
/// Bound for the etcd cluster to bootstrap across the lab.
const ETCD_BOOT: Duration = Duration::from_secs(30);

/// The zone's domain (zonefix creates it).
const DOMAIN: &str = "alice.example";
/// `zonegate files` in home1, offered as service `dfs`.
const FILES_PORT: u16 = 8000;
/// Every member's client port, in its own namespace.
const ETCD_CLIENT: u16 = 2379;
/// Member N's peer port is ETCD_PEER_BASE + N, the same address in every namespace.
const ETCD_PEER_BASE: u16 = 23800;

/// The members: (name, lab host, zone device). Index = N.
const MEMBERS: [(&str, &str, &str); 3] = [
    ("e0", "vps", "gw"),
    ("e1", "home1", "home1"),
    ("e2", "home2", "home2"),
];

const POLICY: &str = r#"# The quick start: a read-only public view of home1's file service ...
[app.dfs]
http = { host = "alice.example", path = "/dfs", strip_prefix = true }
to = "home1/dfs"
allow = { from = ["public"], methods = ["GET", "HEAD"] }

# ... and the etcd members' peer ports, reachable by the zone's devices over the mesh.
[app.etcd-e0]
mesh = true
to = "gw/etcd-peer"
allow = { from = ["zone"] }

[app.etcd-e1]
mesh = true
to = "home1/etcd-peer"
allow = { from = ["zone"] }

[app.etcd-e2]
mesh = true
to = "home2/etcd-peer"
allow = { from = ["zone"] }
"#;

/// Helper run inside lab namespaces: `http METHOD IP PORT HOST PATH BODY TIMEOUT` prints the
/// status code on the first line, then the body; `dns SERVER NAME TIMEOUT` prints the A records
/// (one per line) of a hand-built query (used when `dig` is missing).
const QSTOOL: &str = r#"
import http.client, random, socket, struct, sys

def http_req(method, ip, port, host, path, body, timeout):
    c = http.client.HTTPConnection(ip, int(port), timeout=float(timeout))
    c.request(method, path, body=body.encode() if body else None, headers={"Host": host})
    r = c.getresponse()
    sys.stdout.write("%d\n%s" % (r.status, r.read().decode("utf-8", "replace")))

def dns(server, name, timeout):
    qid = random.randrange(65536)
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
    q += struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(float(timeout))
    s.sendto(q, (server, 53))
    d, _ = s.recvfrom(65535)
    rid, flags, qd, an = struct.unpack(">HHHH", d[:8])
    if rid != qid or flags & 0xF:
        sys.exit("bad answer: id %d rcode %d" % (rid, flags & 0xF))
    def skip_name(i):
        while True:
            n = d[i]
            if n == 0:
                return i + 1
            if n & 0xC0 == 0xC0:
                return i + 2
            i += n + 1
    i = 12
    for _ in range(qd):
        i = skip_name(i) + 4
    for _ in range(an):
        i = skip_name(i)
        typ, cls, ttl, rdlen = struct.unpack(">HHIH", d[i:i + 10])
        i += 10
        if typ == 1 and rdlen == 4:
            print(socket.inet_ntoa(d[i:i + 4]))
        i += rdlen

modes = {"http": http_req, "dns": dns}
try:
    modes[sys.argv[1]](*sys.argv[2:])
except SystemExit:
    raise
except Exception as e:
    sys.exit("%s: %s" % (type(e).__name__, e))
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
}

impl Drop for Logs {
    fn drop(&mut self) {
        if thread::panicking() || std::env::var("ZG_LAB_LOGS").as_deref() == Ok("1") {
            for (tag, path) in self.0.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let text =
                    fs::read_to_string(path).unwrap_or_else(|e| format!("<unreadable: {e}>"));
                eprintln!("===== {tag} ({}) =====\n{text}", path.display());
            }
        }
    }
}

/// The test's world. Field order is drop order: logs are printed before the lab goes down.
struct World {
    logs: Logs,
    lab: Lab,
    zone: Zone,
    tool: PathBuf,
    tmp: tempfile::TempDir,
    t0: Instant,
}

impl World {
    fn new(name: &str) -> World {
        let t0 = Instant::now();
        let tmp = tempfile::tempdir().expect("tempdir");
        let zone = zonefix::three_device_zone(tmp.path());
        // the public front and the zone DNS on the vps; HTTPS off (no certificates in the lab).
        // Top-level keys go first: zonefix appended a [tunnel] table at the end.
        let cfg = zone.gateway_toml();
        let text = fs::read_to_string(&cfg).expect("read gateway.toml");
        let front = "http = \"0.0.0.0:80\"\nhttps = \"off\"\ndns = \"0.0.0.0:53\"\n";
        fs::write(&cfg, format!("{front}{text}")).expect("write gateway.toml");
        zone.write_policy("quickstart.toml", POLICY);
        let tool = tmp.path().join("qstool.py");
        fs::write(&tool, QSTOOL).expect("write qstool.py");
        let lab = Lab::up(name).expect("lab up");
        World {
            logs: Logs::default(),
            lab,
            zone,
            tool,
            tmp,
            t0,
        }
    }

    fn step(&self, what: &str) {
        eprintln!(
            "[quickstart +{:>5} ms] {what}",
            self.t0.elapsed().as_millis()
        );
    }

    fn log_path(&self, tag: &str) -> PathBuf {
        let path = self.tmp.path().join(format!("{tag}.log"));
        self.logs.add(tag, &path);
        path
    }

    /// Spawns `program args` in `host`, stdout and stderr appended to `TMP/tag.log`.
    fn spawn(&self, host: &str, tag: &str, program: &Path, args: &[String]) -> LabProcess {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(tag))
            .expect("log file");
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

    /// `zonegate gateway` in `vps`, offering e0's peer port and forwarding to e1's and e2's.
    fn gateway(&self) -> LabProcess {
        let mut args = s(&["gateway", "--config", path_str(&self.zone.gateway_toml())]);
        args.extend(etcd_flags(0));
        self.spawn("vps", "gateway", &bin(), &args)
    }

    /// `zonegate node` for member N's home (1 or 2), with its etcd flags and `extra`.
    fn node(&self, n: usize, extra: &[&str]) -> LabProcess {
        let host = MEMBERS[n].1;
        let mut args = s(&["node", "--config", path_str(&self.zone.node_toml(host))]);
        args.extend(etcd_flags(n));
        args.extend(s(extra));
        self.spawn(host, host, &bin(), &args)
    }

    /// etcd member N in its host; loopback only, data in the test's temporary directory.
    fn etcd(&self, n: usize, token: &str) -> LabProcess {
        let (name, host, _) = MEMBERS[n];
        let data = self.tmp.path().join(format!("etcd-{name}"));
        let cluster = (0..MEMBERS.len())
            .map(|m| format!("{}={}", MEMBERS[m].0, peer_url(m)))
            .collect::<Vec<_>>()
            .join(",");
        let client = format!("http://127.0.0.1:{ETCD_CLIENT}");
        let args = s(&[
            "--name",
            name,
            "--data-dir",
            path_str(&data),
            "--listen-peer-urls",
            &peer_url(n),
            "--initial-advertise-peer-urls",
            &peer_url(n),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--initial-cluster",
            &cluster,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            token,
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]);
        self.spawn(host, &format!("etcd-{name}"), Path::new("etcd"), &args)
    }

    /// `etcdctl ARGS` against member N's client port, in its host. Ok(stdout) or Err(why); every
    /// run is appended to `etcdctl.log`.
    fn etcdctl(&self, n: usize, args: &[&str]) -> Result<String, String> {
        let host = MEMBERS[n].1;
        let endpoint = format!("http://127.0.0.1:{ETCD_CLIENT}");
        let mut cmd = self.lab.cmd(host, "etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .args(["--endpoints", &endpoint])
            .args(["--dial-timeout", "2s", "--command-timeout", "3s"])
            .args(args);
        let res = self.lab.run(&mut cmd, Duration::from_secs(8));
        let (ok, text) = match &res {
            Ok(o) => (
                o.status.success(),
                format!(
                    "{}\nstdout: {}\nstderr: {}",
                    o.status,
                    String::from_utf8_lossy(&o.stdout).trim(),
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            ),
            Err(e) => (false, e.to_string()),
        };
        if let Ok(mut f) = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path("etcdctl"))
        {
            let _ = writeln!(
                f,
                "+{} ms [{}] etcdctl {args:?}: {text}",
                self.t0.elapsed().as_millis(),
                MEMBERS[n].0
            );
        }
        match res {
            Ok(o) if ok => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
            _ => Err(format!("etcdctl {args:?} on {}: {text}", MEMBERS[n].0)),
        }
    }

    /// Member N's own view from `etcdctl endpoint status`: (member id in hex, is it the leader).
    fn member_status(&self, n: usize) -> Result<(String, bool), String> {
        // `ENDPOINT, ID, VERSION, DB SIZE, IS LEADER, IS LEARNER, TERM, INDEX, APPLIED, ERRORS`
        let out = self.etcdctl(n, &["endpoint", "status"])?;
        let f: Vec<&str> = out.trim().split(", ").collect();
        match (f.get(1), f.get(4)) {
            (Some(id), Some(leader)) => Ok((id.to_string(), *leader == "true")),
            _ => Err(format!("unexpected endpoint status {out:?}")),
        }
    }

    /// The member that currently leads, as seen by the members themselves.
    fn leader(&self) -> Result<usize, String> {
        for n in 0..MEMBERS.len() {
            if self.member_status(n)?.1 {
                return Ok(n);
            }
        }
        Err("no member says it leads".to_string())
    }

    /// Serializable (member-local) read of `key` on member N: the value, or "" when absent.
    fn local_get(&self, n: usize, key: &str) -> Result<String, String> {
        self.etcdctl(n, &["get", "--consistency", "s", "--print-value-only", key])
            .map(|v| v.trim().to_owned())
    }

    /// Waits until member N's own store holds `key` = `value`.
    #[track_caller]
    fn wait_value(&self, n: usize, key: &str, value: &str, within: Duration) {
        eventually(
            within,
            &format!("{} holds {key}={value}", MEMBERS[n].0),
            || match self.local_get(n, key)? {
                v if v == value => Ok(()),
                v => Err(format!("{} has {key}={v:?}", MEMBERS[n].0)),
            },
        );
    }

    /// Runs `qstool.py ARGS` in `host`; Ok(stdout) or Err(why).
    fn tool(&self, host: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
        let mut cmd: Command = self.lab.cmd(host, python());
        cmd.arg(&self.tool).args(args);
        match self.lab.run(&mut cmd, timeout + Duration::from_secs(3)) {
            Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
            Ok(o) => Err(format!(
                "qstool {args:?} in {host}: {} {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!("qstool {args:?} in {host}: {e}")),
        }
    }

    /// An HTTP request from `client` to `ip:80` with `Host: alice.example`: (status, body).
    fn http(
        &self,
        ip: Ipv4Addr,
        method: &str,
        path: &str,
        body: &str,
    ) -> Result<(u16, String), String> {
        let out = self.tool(
            "client",
            &[
                "http",
                method,
                &ip.to_string(),
                "80",
                DOMAIN,
                path,
                body,
                "5",
            ],
            Duration::from_secs(5),
        )?;
        let (code, body) = out.split_once('\n').unwrap_or((out.as_str(), ""));
        let code = code
            .trim()
            .parse()
            .map_err(|_| format!("{method} {path}: unexpected output {out:?}"))?;
        Ok((code, body.to_owned()))
    }

    /// A records of `name` from the gateway's DNS, asked from `client`.
    fn resolve(&self, name: &str) -> Result<Vec<Ipv4Addr>, String> {
        let out = if dig_available() {
            let mut cmd = self.lab.cmd("client", "dig");
            cmd.arg(format!("@{VPS}"))
                .args(["+short", "+time=2", "+tries=1", name, "A"]);
            match self.lab.run(&mut cmd, Duration::from_secs(5)) {
                Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
                Ok(o) => {
                    return Err(format!(
                        "dig {name}: {} {}{}",
                        o.status,
                        String::from_utf8_lossy(&o.stdout).trim(),
                        String::from_utf8_lossy(&o.stderr).trim()
                    ))
                }
                Err(e) => return Err(format!("dig {name}: {e}")),
            }
        } else {
            self.tool(
                "client",
                &["dns", &VPS.to_string(), name, "2"],
                Duration::from_secs(2),
            )?
        };
        let ips: Vec<Ipv4Addr> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
        if ips.is_empty() {
            return Err(format!("no A record for {name}: {out:?}"));
        }
        Ok(ips)
    }

    /// `/status` of the admin API on `host`'s loopback (gateway 9090, node 9091).
    fn status(&self, host: &str, port: u16) -> Result<Value, String> {
        let out = self.tool(
            host,
            &[
                "http",
                "GET",
                "127.0.0.1",
                &port.to_string(),
                "127.0.0.1",
                "/status",
                "",
                "3",
            ],
            Duration::from_secs(3),
        )?;
        let body = out
            .strip_prefix("200\n")
            .ok_or_else(|| format!("/status: {out}"))?;
        serde_json::from_str(body).map_err(|e| format!("status JSON: {e}: {body}"))
    }
}

/// Member N's peer URL: the same string in every namespace.
fn peer_url(n: usize) -> String {
    format!("http://127.0.0.1:{}", peer_port(n))
}

fn peer_port(n: usize) -> u16 {
    ETCD_PEER_BASE + n as u16
}

/// The zonegate flags of member N's device: its peer port as service `etcd-peer`, and forwards
/// on the other members' peer addresses to their devices' `etcd-peer`.
fn etcd_flags(n: usize) -> Vec<String> {
    let mut v = vec![
        "--service".to_string(),
        format!("etcd-peer=127.0.0.1:{}", peer_port(n)),
    ];
    for (m, (_, _, device)) in MEMBERS.iter().enumerate() {
        if m != n {
            v.push("--forward".to_string());
            v.push(format!("127.0.0.1:{}={device}/etcd-peer", peer_port(m)));
        }
    }
    v
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// Whether dig is installed; without it the lab asks with its own hand-built query (A records
/// only). Where the DNS tools are required (CI: `ZONEGATE_REQUIRE_DNS_TOOLS=1`), its absence
/// fails the test instead of changing what it checks.
fn dig_available() -> bool {
    let there = on_path("dig");
    if !there && std::env::var("ZONEGATE_REQUIRE_DNS_TOOLS").as_deref() == Ok("1") {
        panic!("ZONEGATE_REQUIRE_DNS_TOOLS=1 but dig is not installed (Debian package dnsutils)");
    }
    there
}

pub(crate) fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// False (with a loud line, or a panic under `NATLAB_REQUIRED=1`) when etcd is not installed.
fn require_etcd(test: &str) -> bool {
    let missing: Vec<&str> = ["etcd", "etcdctl"]
        .into_iter()
        .filter(|p| !on_path(p))
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{} not on PATH (Debian packages etcd-server and etcd-client)",
        missing.join(" and ")
    );
    for required in ["NATLAB_REQUIRED", "ZONEGATE_REQUIRE_TOOLS"] {
        if std::env::var(required).as_deref() == Ok("1") {
            panic!("{required}=1 but {test} cannot run: {why}");
        }
    }
    // straight to fd 2: libtest captures eprintln! of passing tests, and a skip must show
    let _ = writeln!(
        io::stderr(),
        "\n!!!!! SKIPPED (needs etcd): {test} ({why}) !!!!!\n"
    );
    false
}

fn marker(tag: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("zg-{tag}-{:016x}", h.finish())
}

#[test]
fn lab_quickstart_etcd_and_dfs_across_nats() {
    const NAME: &str = "lab_quickstart_etcd_and_dfs_across_nats";
    if !netlab::require_root(NAME) || !require_etcd(NAME) {
        return;
    }
    let w = World::new("quickstart");
    w.step("lab up, zone made");

    // home1's file service, with a file to find through the public view
    let share = w.tmp.path().join("share");
    fs::create_dir_all(&share).expect("share dir");
    let file_name = format!("{}.txt", marker("file"));
    let file_body = marker("content");
    fs::write(share.join(&file_name), format!("{file_body}\n")).expect("shared file");
    let _files = w.spawn(
        "home1",
        "files-home1",
        &bin(),
        &s(&[
            "files",
            "--dir",
            path_str(&share),
            "--listen",
            &format!("127.0.0.1:{FILES_PORT}"),
        ]),
    );

    let mut gw = w.gateway();
    let dfs = format!("dfs=127.0.0.1:{FILES_PORT}");
    let mut home1 = w.node(1, &["--service", &dfs]);
    // home2 ships without zone.json: it learns its gateway from the gateway's DNS (issue 6's
    // bootstrap), verified against its pinned zone CA, before it dials.
    let home2_zone = w.zone.node_toml("home2").with_file_name("zone.json");
    std::fs::remove_file(&home2_zone).unwrap();
    eventually(
        READY,
        "the gateway's DNS serves _zonegate TXT to home2",
        || {
            alive(&mut gw, "gateway")?;
            if !dig_available() {
                // the hand-built query asks for A records only: the same server answers both
                return w.resolve("alice.example").map(drop);
            }
            let mut dig = w.lab.cmd("home2", "dig");
            dig.args([
                "@203.0.113.10",
                "+tcp",
                "+short",
                "+time=2",
                "+tries=1",
                "TXT",
                "_zonegate.alice.example",
            ]);
            let out = w
                .lab
                .run(&mut dig, Duration::from_secs(5))
                .map_err(|e| format!("dig: {e}"))?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.contains(zone_core::txt::PREFIX) {
                Ok(())
            } else {
                Err(format!("no zone TXT yet: {text}"))
            }
        },
    );
    let mut home2 = w.node(2, &["--bootstrap-dns", "203.0.113.10:53"]);
    eventually(
        READY,
        "gateway /status lists both agents and their services",
        || {
            alive(&mut gw, "gateway")?;
            alive(&mut home1, "home1 agent")?;
            alive(&mut home2, "home2 agent")?;
            let st = w.status("vps", 9090)?;
            for (device, services) in [
                ("home1", &["dfs", "etcd-peer"][..]),
                ("home2", &["etcd-peer"]),
            ] {
                let agent = find_agent(&st, device)
                    .ok_or_else(|| format!("{device} not connected: {st}"))?;
                for svc in services {
                    if !agent["services"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x["name"] == *svc))
                    {
                        return Err(format!("{device} does not offer {svc} yet: {agent}"));
                    }
                }
            }
            Ok(())
        },
    );
    // every forward listens before anything is served (zonegate binds first); cheap to confirm
    for (n, (_, host, _)) in MEMBERS.iter().enumerate() {
        for m in (0..MEMBERS.len()).filter(|&m| m != n) {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, peer_port(m)));
            wait_tcp(&w.lab, host, addr, READY)
                .unwrap_or_else(|e| panic!("forward in {host} to {}: {e}", MEMBERS[m].0));
        }
    }
    w.step("gateway and both agents up, forwards listening");

    // ---- the public read-only file view, name resolved through the zone DNS ----
    let ips = eventually(READY, "the gateway's DNS answers for the zone apex", || {
        w.resolve(DOMAIN)
    });
    assert_eq!(ips, vec![VPS], "A records of {DOMAIN}");
    let via = if dig_available() {
        "dig"
    } else {
        "python (no dig)"
    };
    w.step(&format!(
        "{DOMAIN} resolves to {VPS} at the gateway's DNS ({via})"
    ));
    let ip = ips[0];
    let listing = eventually(READY, "GET /dfs/ from the client", || {
        match w.http(ip, "GET", "/dfs/", "")? {
            (200, body) if body.contains(&file_name) => Ok(body),
            (code, body) => Err(format!("GET /dfs/: {code} {body:?}")),
        }
    });
    eprintln!("GET http://{DOMAIN}/dfs/ ({ip}) lists the share:\n{listing}");
    let path = format!("/dfs/{file_name}");
    let (code, body) = w.http(ip, "GET", &path, "").expect("GET the file");
    assert_eq!((code, body.trim()), (200, file_body.as_str()), "GET {path}");
    let created = format!("{}.txt", marker("new"));
    for (method, target) in [("PUT", path.clone()), ("POST", format!("/dfs/{created}"))] {
        let (code, body) = w
            .http(ip, method, &target, "overwritten")
            .unwrap_or_else(|e| panic!("{method} {target}: {e}"));
        eprintln!("{method} {target} -> {code} {}", body.trim());
        assert!(
            (400..500).contains(&code),
            "{method} {target}: {code} {body}"
        );
        // refused by the gateway's policy, not merely by the service behind it
        assert!(
            code == 405 && body.contains("app dfs"),
            "{method} {target}: expected the gateway's 405 for app dfs, got {code} {body}"
        );
    }
    let (code, body) = w.http(ip, "GET", &path, "").expect("GET the file again");
    assert_eq!(
        (code, body.trim()),
        (200, file_body.as_str()),
        "after the writes"
    );
    assert!(!share.join(&created).exists(), "POST created a file");
    w.step("read-only /dfs/ checked from the client");

    // ---- the etcd cluster over the mesh ----
    let token = marker("cluster");
    let mut etcds: Vec<LabProcess> = (0..MEMBERS.len()).map(|n| w.etcd(n, &token)).collect();
    for (n, (name, ..)) in MEMBERS.iter().enumerate() {
        eventually(ETCD_BOOT, &format!("etcd {name} healthy"), || {
            for (m, p) in etcds.iter_mut().enumerate() {
                alive(p, &format!("etcd {}", MEMBERS[m].0))?;
            }
            w.etcdctl(n, &["endpoint", "health"])
        });
    }
    // e0's view of the membership may lag the others' publication by a heartbeat
    let members = eventually(READY, "e0 lists 3 started members", || {
        let l = w.etcdctl(0, &["member", "list"])?;
        match l.lines().filter(|x| x.contains(", started, ")).count() {
            3 => Ok(l),
            k => Err(format!("{k} started: {l}")),
        }
    });
    eprintln!("etcd members:\n{members}");
    w.step("etcd cluster of 3 healthy");

    assert!(
        home2_zone.exists(),
        "home2's DNS bootstrap did not write its zone.json"
    );
    // a put on e1 (home1) is read back on e0 (vps) and e2 (home2)
    let v1 = marker("v1");
    // puts are retried under a deadline: a leader change just after the bootstrap is legal
    eventually(READY, "put on e1", || {
        w.etcdctl(1, &["put", "quickstart/k1", &v1])
    });
    w.wait_value(0, "quickstart/k1", &v1, READY);
    w.wait_value(2, "quickstart/k1", &v1, READY);
    // and a put on e2 (behind the symmetric NAT) on the others
    let v2 = marker("v2");
    eventually(READY, "put on e2", || {
        w.etcdctl(2, &["put", "quickstart/k2", &v2])
    });
    w.wait_value(0, "quickstart/k2", &v2, READY);
    w.wait_value(1, "quickstart/k2", &v2, READY);
    w.step("puts replicated to every member");

    // make e1 the leader, so that home1's restart takes the leader away: the hardest case (the
    // other two must notice, elect a new leader among themselves and commit without e1)
    let e1_id = eventually(READY, "e1's member status", || w.member_status(1)).0;
    eventually(READY, "leadership moved to e1", || {
        let l = w.leader()?;
        if l == 1 {
            return Ok(());
        }
        w.etcdctl(l, &["move-leader", &e1_id])?;
        Err(format!("{} led, asked it to hand over to e1", MEMBERS[l].0))
    });
    w.step("e1 (home1) leads the cluster");

    // home1's agent goes away: e1 is cut off, e0 + e2 keep quorum
    home1.kill().expect("kill home1 agent");
    let st = home1.wait().expect("reap home1 agent");
    drop(home1);
    w.step(&format!("home1 agent killed ({st})"));
    let v3 = marker("v3");
    // a put may need a new leader first (if e1 led): retried until the deadline
    eventually(READY, "put on e0 while home1's agent is down", || {
        w.etcdctl(0, &["put", "quickstart/k3", &v3])
    });
    w.wait_value(2, "quickstart/k3", &v3, READY);
    // e1's own (serializable) read works without a leader: it must answer (a failed command is
    // retried), and not know k3 (any answer is final)
    let on_e1 = eventually(
        READY,
        "a serializable read on e1 while its agent is down",
        || w.local_get(1, "quickstart/k3"),
    );
    assert!(
        on_e1.is_empty(),
        "e1 saw k3 while its agent was down: {on_e1:?}"
    );
    let new_leader = eventually(READY, "a new leader among e0 and e2", || {
        for n in [0, 2] {
            if w.member_status(n)?.1 {
                return Ok(n);
            }
        }
        Err("neither e0 nor e2 leads".to_string())
    });
    w.step(&format!(
        "quorum kept without home1: {} leads, put on e0 committed, e1 cut off",
        MEMBERS[new_leader].0
    ));

    // the agent is back: e1 catches up
    let mut home1 = w.node(1, &["--service", &dfs]);
    w.wait_value(1, "quickstart/k3", &v3, READY);
    w.step("home1 agent restarted, e1 caught up");
    // and the whole cluster works again: a linearizable round from e1
    let v4 = marker("v4");
    eventually(READY, "put on e1 after the restart", || {
        w.etcdctl(1, &["put", "quickstart/k4", &v4])
    });
    for n in [0, 2] {
        w.wait_value(n, "quickstart/k4", &v4, READY);
    }
    for (n, (name, ..)) in MEMBERS.iter().enumerate() {
        eventually(
            READY,
            &format!("etcd {name} healthy after the restart"),
            || w.etcdctl(n, &["endpoint", "health"]),
        );
    }
    alive(&mut home1, "home1 agent").unwrap();
    alive(&mut home2, "home2 agent").unwrap();
    alive(&mut gw, "gateway").unwrap();
    for (m, p) in etcds.iter_mut().enumerate() {
        alive(p, &format!("etcd {}", MEMBERS[m].0)).unwrap();
    }
    // the public view survived the restart too (home1's agent carries it)
    eventually(READY, "GET the file after home1's restart", || {
        match w.http(ip, "GET", &path, "")? {
            (200, b) if b.trim() == file_body => Ok(()),
            (code, b) => Err(format!("{code} {b:?}")),
        }
    });
    for (n, (name, ..)) in MEMBERS.iter().enumerate() {
        let st = w.etcdctl(n, &["endpoint", "status", "-w", "table"]);
        eprintln!("{name} after the test:\n{}", st.unwrap_or_else(|e| e));
    }
    w.step("done");
}
