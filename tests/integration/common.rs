//! Helpers shared by integration tests: running the built binary, temporary zones.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `zonegate` binary cargo built for these tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_zonegate"))
}

/// Runs `zonegate ARGS` and returns its output (never panics on a failing command).
pub fn zg<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run zonegate")
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

/// A zone with a gateway `gw` (203.0.113.10:4433) and a node `home1`, in `dir/zone`.
pub fn zone_with_devices(dir: &Path) -> PathBuf {
    let z = dir.join("zone");
    let zs = z.to_str().unwrap();
    ok(["zone", "init", "--domain", "alice.example", "--dir", zs]);
    ok([
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
    ok(["device", "add", "home1", "--zone", zs, "--role", "node"]);
    z
}
