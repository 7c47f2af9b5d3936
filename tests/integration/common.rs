//! Helpers shared by integration tests: running the built binary, temporary zones.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `zonegate` binary cargo built for these tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_zonegate"))
}

/// Runs `zonegate ARGS` and returns its output (never panics on a failing command; fails the
/// test on one that runs past [`COMMAND_WITHIN`]).
pub fn zg<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(bin());
    cmd.args(args).env("RUST_LOG", "warn");
    output_within(&mut cmd, COMMAND_WITHIN)
}

/// How long one `zonegate` command of a test may run: one that should have refused to start
/// and serves instead fails its test then, rather than block the whole run (libtest has no
/// timeout). Far above what any command here takes (`demo --check` of a debug build ~30 s).
pub const COMMAND_WITHIN: std::time::Duration = std::time::Duration::from_secs(300);

/// `cmd`'s output, as [`Command::output`] gives it, if it ends `within`; else it is killed
/// (by its PID) and the test fails with what it wrote so far.
pub fn output_within(cmd: &mut Command, within: std::time::Duration) -> Output {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run zonegate");
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let deadline = std::time::Instant::now() + within;
    let mut pause = std::time::Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for zonegate") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let (out, err) = (out.join().unwrap(), err.join().unwrap());
            panic!(
                "{cmd:?} still ran after {within:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs and asserts success, returning stdout.
#[track_caller]
pub fn ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let o = zg(args);
    assert!(
        o.status.success(),
        "zonegate failed: {}\n{}",
        stderr(&o),
        stdout(&o)
    );
    stdout(&o)
}

/// Runs and asserts failure with `code`, returning stderr.
#[track_caller]
pub fn fails<I, S>(code: i32, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let o = zg(args);
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(&o),
        stderr(&o)
    );
    let e = stderr(&o);
    assert!(!e.contains("panicked"), "panic: {e}");
    e
}

/// Runs `policy explain` arguments that end in DENY: exit 3 and nothing on stderr (the
/// explanation said it), returning stdout.
#[track_caller]
pub fn denied<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let o = zg(args);
    assert_eq!(
        (o.status.code(), stderr(&o).as_str()),
        (Some(3), ""),
        "stdout: {}",
        stdout(&o)
    );
    let out = stdout(&o);
    assert!(out.contains("DENY"), "{out}");
    out
}

/// A zone with a gateway `gw` (203.0.113.10:4433) and a node `home1`, in `dir/zone`.
pub fn zone_with_devices(dir: &Path) -> PathBuf {
    let z = dir.join("zone");
    let zs = z.to_str().unwrap();
    ok(["zone", "init", "--domain", "alice.example", "--dir", zs]);
    let first = ok([
        "device",
        "add",
        "gw",
        "--zone",
        zs,
        "--role",
        "gateway",
        "--public-addr",
        "203.0.113.10:4433",
    ]);
    // The zone's first device: no other bundle to copy zone.json to (it was said anyway).
    assert!(!first.contains("older zone.json"), "{first}");
    let second = ok(["device", "add", "home1", "--zone", zs, "--role", "node"]);
    assert!(
        second.contains("note: other bundles hold an older zone.json"),
        "{second}"
    );
    z
}

/// Environment variable naming the one test a child process of this test binary runs.
const ISOLATED: &str = "ZONEGATE_TEST_ISOLATED";

/// For tests that measure this process (peak RSS): `cargo test` runs every test of the binary
/// as threads of one process, so what the others allocate at the same time would count
/// against the measuring test. Returns `true` in a child process that runs only test `name`
/// (the caller then runs its body); otherwise starts that child, asserts it passed (its output
/// is passed through) and returns `false`.
pub fn in_isolated_process(name: &str) -> bool {
    if std::env::var(ISOLATED).as_deref() == Ok(name) {
        return true;
    }
    let exe = std::env::current_exe().expect("path of the test binary");
    let o = Command::new(exe)
        .args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env(ISOLATED, name)
        .output()
        .expect("run the test binary again for one test");
    let out = String::from_utf8_lossy(&o.stdout);
    eprintln!("{}{}", out, String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "isolated run of {name} failed");
    // A filter that matched nothing would "pass" without running the body.
    assert!(
        out.contains("1 passed"),
        "isolated run of {name} did not run exactly that test"
    );
    false
}

/// A test that cannot run here for want of `what` (a tool, IPv6): says so on fd 2 — libtest
/// captures `eprintln!` of passing tests, and a skip must show — or fails where
/// `ZONEGATE_REQUIRE_TOOLS=1` (CI installs everything: nothing may skip there).
pub fn skip(test: &str, what: &str) {
    if std::env::var("ZONEGATE_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("ZONEGATE_REQUIRE_TOOLS=1 but {test} cannot run: {what}");
    }
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "\n!!!!! SKIPPED ({what}): {test} !!!!!\n"
    );
}
