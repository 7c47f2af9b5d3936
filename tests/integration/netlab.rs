//! NAT lab harness: each test gets its own small internet made of network namespaces.
//!
//! [`Lab::up`] runs `tests/netlab/natlab.sh` with a prefix unique to this lab, so labs of tests
//! running in parallel (threads of one test binary, or several processes) never share a
//! namespace. The topology (see the script's header) is fixed: `vps` and `client` on the public
//! 203.0.113.0/24, `home1..3` behind `nat1` (cone), `nat2` (symmetric) and `nat3` (cone), and
//! `home2b` on `home2`'s LAN (behind `nat2` too).
//!
//! Cleanup: dropping the [`Lab`] (also while unwinding from a panic) kills the processes started
//! with [`Lab::spawn`] by PID, then runs the script's `down`, which kills whatever else still runs
//! in the lab's namespaces (by PID) and deletes them. A test process killed outright leaves its
//! lab behind: the next [`Lab::up`] in any process runs the script's `gc`, which removes labs whose
//! owner process (PID and start time in `/run/natlab/PREFIX.owner`) is gone.
//!
//! Lab tests need root, `ip`, `nft` and network namespaces; start each with
//! `if !netlab::require_root("name") { return; }`. Environment knobs:
//! - `NATLAB=0` skips every lab test (with the same loud line).
//! - `NATLAB_REQUIRED=1` (or `ZONEGATE_REQUIRE_TOOLS=1`) turns a skip into a panic (for CI: a
//!   skip would hide a broken lab).
//! - `NATLAB_MAX_PARALLEL` (default 2): labs alive at once in this process; a test that already
//!   holds a lab never waits for its second one.
//! - `NATLAB_SCRIPT`: use another copy of natlab.sh.
//!
//! ```ignore
//! if !netlab::require_root("gateway_reaches_node") { return; }
//! let lab = Lab::up("gateway_reaches_node")?;
//! let _gw = lab.spawn(lab.cmd("vps", env!("CARGO_BIN_EXE_zonegate")).args(["gateway", ...]))?;
//! netlab::wait_tcp(&lab, "client", SocketAddr::from((netlab::VPS, 443)), TIMEOUT)?;
//! lab.flush_conntrack("nat1")?; // the node's mapping is gone: does it re-establish?
//! ```
#![allow(dead_code)] // each test file uses a different part of the harness

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Condvar, Mutex, Once, OnceLock};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

/// The public gateway host (namespace `vps`).
pub const VPS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// An internet user (namespace `client`).
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 50);
/// Public (WAN) addresses of the NAT routers; home N's traffic leaves from NAT N.
pub const NAT1_WAN: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 21);
pub const NAT2_WAN: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 22);
pub const NAT3_WAN: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 23);
/// LAN side of the routers: the homes' default gateways.
pub const NAT1_LAN: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
pub const NAT2_LAN: Ipv4Addr = Ipv4Addr::new(192, 168, 2, 1);
pub const NAT3_LAN: Ipv4Addr = Ipv4Addr::new(192, 168, 3, 1);
/// Hosts behind the NATs (`home1` is behind the cone `nat1`, `home2` behind the symmetric `nat2`,
/// `home3` behind the cone `nat3`).
pub const HOME1: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
pub const HOME2: Ipv4Addr = Ipv4Addr::new(192, 168, 2, 10);
pub const HOME3: Ipv4Addr = Ipv4Addr::new(192, 168, 3, 10);
/// A second host on `home2`'s LAN (nat2's LAN is a switch): two devices behind one NAT.
pub const HOME2B: Ipv4Addr = Ipv4Addr::new(192, 168, 2, 11);

/// Host names of the lab, as the script knows them (namespace name = prefix + host).
pub const HOSTS: [&str; 10] = [
    "inet", "vps", "client", "nat1", "nat2", "nat3", "home1", "home2", "home2b", "home3",
];

/// Idle UDP conntrack entries in the NAT routers expire after this (measured, kernel default):
/// keep-alives through the lab must be more frequent.
pub const UDP_CONNTRACK_IDLE: Duration = Duration::from_secs(30);

/// Where the owner files live; the script's `gc` reads them.
const OWNER_DIR: &str = "/run/natlab";
/// Labs building/alive at once in this process unless `NATLAB_MAX_PARALLEL` says otherwise.
/// Two matches the 2-core CI machine; see the smoke tests for the measured parallel build.
const DEFAULT_MAX_PARALLEL: usize = 2;
/// Bound for one script run (`up` takes ~0.4 s, `down` ~0.2 s; apt-get may run on first use).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);
/// Poll interval of the readiness helpers: short, it only bounds the added latency.
const POLL: Duration = Duration::from_millis(50);

/// `natlab.sh` of this repository (or `$NATLAB_SCRIPT`).
pub fn script_path() -> PathBuf {
    if let Some(p) = std::env::var_os("NATLAB_SCRIPT") {
        return PathBuf::from(p);
    }
    netlab_dir().join("natlab.sh")
}

/// `natprobe.py`: reflector/prober for NAT mappings (see its docstring).
pub fn natprobe_path() -> PathBuf {
    netlab_dir().join("natprobe.py")
}

fn netlab_dir() -> PathBuf {
    let from_manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/netlab");
    if from_manifest.join("natlab.sh").exists() {
        return from_manifest;
    }
    // compiled from another crate through `#[path = "/abs/.../netlab.rs"]`: file!() is absolute
    let here = Path::new(file!());
    here.parent()
        .and_then(Path::parent)
        .map(|tests| tests.join("netlab"))
        .unwrap_or(from_manifest)
}

/// The Debian python3 when present (no pyenv shim start-up cost), else whatever `python3` is.
pub fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// True when lab tests can run here: root, `nft` present, and a network namespace can be made.
/// Otherwise prints `SKIPPED (needs root + network namespaces): TEST (reason)` to stderr and
/// returns false (or panics when `NATLAB_REQUIRED=1` or `ZONEGATE_REQUIRE_TOOLS=1`).
pub fn require_root(test: &str) -> bool {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    let verdict = if std::env::var("NATLAB").as_deref() == Ok("0") {
        Err("NATLAB=0".to_string())
    } else {
        PROBE.get_or_init(probe_netns).clone()
    };
    match verdict {
        Ok(()) => true,
        Err(why) => {
            for required in ["NATLAB_REQUIRED", "ZONEGATE_REQUIRE_TOOLS"] {
                if std::env::var(required).as_deref() == Ok("1") {
                    panic!("{required}=1 but the NAT lab cannot run: {why} (test {test})");
                }
            }
            // straight to fd 2: libtest captures eprintln! of passing tests, and a skip must show
            let _ = writeln!(
                io::stderr(),
                "\n!!!!! SKIPPED (needs root + network namespaces): {test} ({why}) !!!!!\n"
            );
            false
        }
    }
}

fn probe_netns() -> Result<(), String> {
    let euid = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
        })
        .ok_or("cannot read euid from /proc/self/status")?;
    if euid != "0" {
        return Err(format!("euid {euid}, not root"));
    }
    // The lab's script says what is missing rather than installing it.
    for tool in ["ip", "nft"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Err(format!(
                "`{tool}` not found (apt-get install iproute2 nftables)"
            ));
        }
    }
    // An unnamed namespace, gone with its process: a named one left by a killed run made
    // every later probe with the same PID fail.
    let lo = Command::new("unshare")
        .args(["--net", "ip", "link", "set", "lo", "up"])
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run unshare: {e}"))?;
    match lo.status.success() {
        true => Ok(()),
        false => Err(format!(
            "cannot make a network namespace and configure it: {}",
            String::from_utf8_lossy(&lo.stderr).trim()
        )),
    }
}

/// A running NAT lab; torn down on drop.
pub struct Lab {
    prefix: String,
    owner_file: PathBuf,
    /// (pid, start time) of processes from [`Lab::spawn`]: the start time guards against killing
    /// an unrelated process that got a reaped child's PID.
    children: Mutex<Vec<(u32, u64)>>,
    /// Released after `Drop::drop` has run, i.e. after the lab is gone.
    _slot: Slot,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab").field("prefix", &self.prefix).finish()
    }
}

impl Lab {
    /// Builds a new lab for test `name` under a fresh prefix like `zk3q9-` (namespaces
    /// `zk3q9-vps`, `zk3q9-home1`, ...). Blocks while `NATLAB_MAX_PARALLEL` other tests hold labs.
    pub fn up(name: &str) -> io::Result<Lab> {
        let slot = Slot::acquire();
        static GC: Once = Once::new();
        GC.call_once(|| {
            // stale labs of killed test runs; failures here must not fail this test
            let _ = run_script(None, &["gc"]);
        });
        let (prefix, owner_file) = reserve_prefix(name)?;
        // from here on, an early return drops `lab`, which tears down whatever got built
        let lab = Lab {
            prefix,
            owner_file,
            children: Mutex::new(Vec::new()),
            _slot: slot,
        };
        let t0 = Instant::now();
        if let Err(e) = lab.script(&["up"]) {
            // Said before the drop's teardown, which panics if it fails too (its panic
            // would be all the test showed).
            let _ = writeln!(
                io::stderr(),
                "[netlab] lab {} for {name}: up failed: {e}",
                lab.prefix
            );
            return Err(e);
        }
        eprintln!(
            "[netlab] lab {} for {name} up in {} ms",
            lab.prefix,
            t0.elapsed().as_millis()
        );
        Ok(lab)
    }

    /// The prefix of every namespace of this lab, e.g. `zk3q9-`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Full namespace name of a lab host: `lab.ns("home1")` = `"zk3q9-home1"`.
    pub fn ns(&self, host: &str) -> String {
        assert!(
            HOSTS.contains(&host),
            "unknown lab host {host:?}, want one of {HOSTS:?}"
        );
        format!("{}{host}", self.prefix)
    }

    /// A command that runs `program` inside host `host` (`ip netns exec NS program`; `ip` execs the
    /// program, so the child's PID is the program's).
    pub fn cmd(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.arg("netns").arg("exec").arg(self.ns(host)).arg(program);
        c
    }

    /// `python3 natprobe.py ARGS...` inside `host`.
    pub fn natprobe(&self, host: &str) -> Command {
        let mut c = self.cmd(host, python());
        c.arg("-u").arg(natprobe_path());
        c
    }

    /// Spawns `cmd` (normally from [`Lab::cmd`]). The returned guard kills and reaps the process
    /// when dropped; the lab also remembers the PID and kills the process on its own drop if it
    /// still runs (e.g. after [`LabProcess::into_child`]). stdin defaults to null so a child never
    /// steals the test's terminal.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<LabProcess> {
        let child = cmd.stdin(Stdio::null()).spawn()?;
        let pid = child.id();
        if let Some(start) = proc_start_time(pid) {
            self.children
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((pid, start));
        }
        Ok(LabProcess { child: Some(child) })
    }

    /// Runs `cmd` to completion with a time bound, capturing stdout and stderr.
    pub fn run(&self, cmd: &mut Command, timeout: Duration) -> io::Result<Output> {
        run_with_timeout(cmd, timeout)
    }

    /// Runs `cmd` like [`Lab::run`] and returns its stdout, or an error carrying its stderr when it
    /// exits non-zero.
    pub fn check(&self, cmd: &mut Command, timeout: Duration) -> io::Result<String> {
        let out = run_with_timeout(cmd, timeout)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(io::Error::other(format!(
                "{cmd:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// Forgets every mapping of NAT router `nat` (`"nat1"`..`"nat3"`): conntrack table flushed and,
    /// on the cone routers, the endpoint-independent map emptied. A home's next outbound packet
    /// creates a fresh mapping (new random port on nat2; same port on nat1/nat3, which preserve
    /// ports); inbound packets for the old mappings are dropped until then.
    pub fn flush_conntrack(&self, nat: &str) -> io::Result<()> {
        self.ns(nat);
        self.script(&["flush-conntrack", nat]).map(drop)
    }

    /// Impairs egress of `iface` in `host`, netem syntax: `lab.netem("home1", "eth0", "loss 5%")`.
    /// On a kernel without sch_netem (this project's CI) only `loss N%` and `rate R` are
    /// emulated; anything else (delay, reorder, ...) gives an error of kind `Unsupported`.
    pub fn netem(&self, host: &str, iface: &str, spec: &str) -> io::Result<()> {
        self.ns(host);
        self.script(&["netem", host, iface, spec]).map(drop)
    }

    /// Removes what [`Lab::netem`] installed on `iface` of `host`.
    pub fn netem_clear(&self, host: &str, iface: &str) -> io::Result<()> {
        self.ns(host);
        self.script(&["netem-clear", host, iface]).map(drop)
    }

    /// The script's `status`: addresses of every host and the routers' nft rulesets.
    pub fn status(&self) -> io::Result<String> {
        self.script(&["status"])
    }

    fn script(&self, args: &[&str]) -> io::Result<String> {
        run_script(Some(&self.prefix), args)
    }

    fn kill_children(&self) {
        let children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|e| e.into_inner()));
        for (pid, start) in children {
            if proc_start_time(pid) == Some(start) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill_children();
        let t0 = Instant::now();
        let down = self
            .script(&["down"])
            .map_err(|e| e.to_string())
            .and_then(|_| {
                let left = namespaces_with_prefix(&self.prefix);
                match left.is_empty() {
                    true => Ok(()),
                    false => Err(format!("namespaces left after down: {left:?}")),
                }
            });
        match down {
            Ok(()) => {
                let _ = fs::remove_file(&self.owner_file);
                eprintln!(
                    "[netlab] lab {} down in {} ms",
                    self.prefix,
                    t0.elapsed().as_millis()
                );
            }
            // keep the owner file: the next `gc` retries once this process is gone
            Err(e) => {
                // straight to fd 2 (a passing test's eprintln! is captured), and the test
                // fails: labs leaking on every run must not stay green
                let msg = format!("[netlab] lab {} teardown FAILED: {e}", self.prefix);
                let _ = writeln!(io::stderr(), "{msg}");
                if !std::thread::panicking() {
                    panic!("{msg}");
                }
            }
        }
    }
}

/// A process started by [`Lab::spawn`]: derefs to its [`Child`]; killed (SIGKILL) and reaped on
/// drop unless it already exited.
#[derive(Debug)]
pub struct LabProcess {
    child: Option<Child>,
}

impl LabProcess {
    /// Gives up the kill-on-drop (the lab still kills it when the lab is dropped).
    pub fn into_child(mut self) -> Child {
        self.child.take().expect("child present until drop")
    }
}

impl std::ops::Deref for LabProcess {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.child.as_ref().expect("child present until drop")
    }
}

impl std::ops::DerefMut for LabProcess {
    fn deref_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present until drop")
    }
}

impl Drop for LabProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// Runs the lab script (with `-p prefix` when given); error carries the script's stderr.
fn run_script(prefix: Option<&str>, args: &[&str]) -> io::Result<String> {
    let mut cmd = Command::new("bash");
    cmd.arg(script_path());
    if let Some(p) = prefix {
        cmd.args(["-p", p]);
    }
    cmd.args(args);
    let out = run_with_timeout(&mut cmd, SCRIPT_TIMEOUT)?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let kind = if out.status.code() == Some(3) {
        io::ErrorKind::Unsupported
    } else {
        io::ErrorKind::Other
    };
    Err(io::Error::new(
        kind,
        format!(
            "natlab.sh {} {} failed ({}): {}",
            prefix.map(|p| format!("-p {p}")).unwrap_or_default(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    ))
}

/// Picks a short prefix from the test name, PID and a counter, and claims it with an
/// exclusively created owner file, which is atomic across processes.
fn reserve_prefix(name: &str) -> io::Result<(String, PathBuf)> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    fs::create_dir_all(OWNER_DIR)?;
    let pid = std::process::id();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    for salt in 0u32..1000 {
        let mut h = Fnv::default();
        h.write(name.as_bytes());
        h.write(&pid.to_le_bytes());
        h.write(&n.to_le_bytes());
        h.write(&salt.to_le_bytes());
        let prefix = format!("z{}-", base36(h.0, 4));
        if Path::new("/run/netns")
            .join(format!("{prefix}inet"))
            .exists()
        {
            continue; // an unowned leftover: leave it to `gc`/humans, pick another name
        }
        let file = Path::new(OWNER_DIR).join(format!("{prefix}.owner"));
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&file)
        {
            Ok(mut f) => {
                // With the start time, `gc` tells this process from a later one given its PID.
                let start = proc_start_time(pid).map_or(String::new(), |t| format!(" {t}"));
                io::Write::write_all(&mut f, format!("{pid}{start}").as_bytes())?;
                return Ok((prefix, file));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("no free lab prefix after 1000 tries"))
}

#[derive(Default)]
struct Fnv(u64);
impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        if self.0 == 0 {
            self.0 = 0xcbf2_9ce4_8422_2325;
        }
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

fn base36(mut v: u64, len: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    (0..len)
        .map(|_| {
            let d = DIGITS[(v % 36) as usize] as char;
            v /= 36;
            d
        })
        .collect()
}

/// Field 22 of /proc/PID/stat (start time in clock ticks since boot).
fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name (field 2) may contain spaces and parens: split after its last ')'
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Admission of labs: at most N test threads hold labs at once; a thread already holding one may
/// take more (a test with two labs must not wait for itself).
struct Slot {
    owner: ThreadId,
}

fn slots() -> &'static (Mutex<HashMap<ThreadId, usize>>, Condvar) {
    static SLOTS: OnceLock<(Mutex<HashMap<ThreadId, usize>>, Condvar)> = OnceLock::new();
    SLOTS.get_or_init(|| (Mutex::new(HashMap::new()), Condvar::new()))
}

fn max_parallel() -> usize {
    std::env::var("NATLAB_MAX_PARALLEL")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_MAX_PARALLEL)
}

impl Slot {
    fn acquire() -> Slot {
        let owner = thread::current().id();
        let (lock, cv) = slots();
        let mut held = lock.lock().unwrap_or_else(|e| e.into_inner());
        while !held.contains_key(&owner) && held.len() >= max_parallel() {
            held = cv.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        *held.entry(owner).or_insert(0) += 1;
        Slot { owner }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let (lock, cv) = slots();
        let mut held = lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.owner) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.owner);
                cv.notify_all();
            }
        }
    }
}

/// Runs a command with a time bound (killed on expiry, with whatever it started: it runs in
/// a process group of its own), capturing stdout and stderr.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> io::Result<Output> {
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status: ExitStatus = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            // The group this call made (its id is the child's PID): the script's `ip` or
            // `nft` of the moment, orphaned, went on after the test had failed.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{cmd:?} still running after {timeout:?}"),
            ));
        }
        thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

/// Waits until a TCP connect from inside `host` to `addr` succeeds (a server is listening and
/// reachable), polling every 50 ms; each attempt is bounded so dropped SYNs cannot stall it.
pub fn wait_tcp(lab: &Lab, host: &str, addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = left
            .min(Duration::from_secs(1))
            .max(Duration::from_millis(100));
        let mut probe = lab.cmd(host, "timeout");
        probe
            .arg(format!("{:.3}", attempt.as_secs_f64()))
            .args(["bash", "-c", "exec 3<>/dev/tcp/$0/$1"])
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string());
        if run_with_timeout(&mut probe, attempt + Duration::from_secs(2))?
            .status
            .success()
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no TCP listener at {addr} seen from {} within {timeout:?}",
                    lab.ns(host)
                ),
            ));
        }
        thread::sleep(POLL);
    }
}

/// True if a TCP connect from `host` to `addr` succeeds within `timeout` (one attempt).
pub fn tcp_connects(
    lab: &Lab,
    host: &str,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<bool> {
    let mut probe = lab.cmd(host, "timeout");
    probe
        .arg(format!("{:.3}", timeout.as_secs_f64()))
        .args(["bash", "-c", "exec 3<>/dev/tcp/$0/$1"])
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string());
    Ok(
        run_with_timeout(&mut probe, timeout + Duration::from_secs(2))?
            .status
            .success(),
    )
}

/// Starts the natprobe UDP+TCP reflector on `0.0.0.0:port` in `host` and waits until it listens.
/// Its stdout (one line per datagram/connection seen) is piped: read it with [`lines`].
pub fn spawn_reflector(lab: &Lab, host: &str, port: u16) -> io::Result<LabProcess> {
    let child = lab.spawn(
        lab.natprobe(host)
            .args(["reflect", &port.to_string()])
            .stdout(Stdio::piped()),
    )?;
    // it binds 0.0.0.0 (UDP first, then TCP): a TCP accept on the host's loopback means ready
    wait_tcp(
        lab,
        host,
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_secs(10),
    )?;
    Ok(child)
}

/// The public mapping `host`'s UDP source port `sport` gets towards `reflector` (a natprobe
/// reflector), as the reflector saw it.
pub fn udp_mapping(
    lab: &Lab,
    host: &str,
    sport: u16,
    reflector: SocketAddrV4,
) -> io::Result<SocketAddrV4> {
    let out = lab.check(
        lab.natprobe(host).args([
            "udp",
            &reflector.ip().to_string(),
            &reflector.port().to_string(),
            &sport.to_string(),
        ]),
        Duration::from_secs(10),
    )?;
    parse_seen(&out).ok_or_else(|| io::Error::other(format!("unexpected natprobe output {out:?}")))
}

/// Parses the `seen IP:PORT` of a natprobe answer.
pub fn parse_seen(line: &str) -> Option<SocketAddrV4> {
    let at = line.find("seen ")? + "seen ".len();
    line[at..].split_whitespace().next()?.parse().ok()
}

/// Address of a host on its only (non-loopback) interface; None for `inet` (bridge only).
pub fn host_ip(host: &str) -> Option<Ipv4Addr> {
    Some(match host {
        "vps" => VPS,
        "client" => CLIENT,
        "nat1" => NAT1_WAN,
        "nat2" => NAT2_WAN,
        "nat3" => NAT3_WAN,
        "home1" => HOME1,
        "home2" => HOME2,
        "home2b" => HOME2B,
        "home3" => HOME3,
        _ => return None,
    })
}

/// Streams a child's stdout line by line into a channel (a reader thread ends with the pipe).
/// Takes the child's stdout: spawn it with `.stdout(Stdio::piped())`.
pub fn lines(child: &mut Child) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stdout: Option<ChildStdout> = child.stdout.take();
    thread::spawn(move || {
        let Some(out) = stdout else { return };
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for the first line satisfying `pred` (earlier lines are consumed and dropped).
pub fn wait_line(
    rx: &Receiver<String>,
    timeout: Duration,
    mut pred: impl FnMut(&str) -> bool,
) -> io::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if pred(&line) => return Ok(line),
            Ok(_) => continue,
            Err(RecvTimeoutError::Timeout) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no matching line in time",
                ))
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "process output ended before a matching line",
                ))
            }
        }
    }
}

/// Names of existing namespaces starting with `prefix` (to check teardown).
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir("/run/netns")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
