//! Build script: links the `zonegate` binary with packed relative relocations (DT_RELR) where
//! the C library it will run on loads them.
//!
//! Why: a position-independent executable carries one 24-byte record per pointer to relocate
//! at start (`.rela.dyn`, ~390 KB here), which the loader reads whole, so every zonegate process
//! keeps those pages resident. RELR packs them into ~8 KB: an idle node agent's RSS drops by
//! ~380 KiB (benches/RESULTS.md). The executable stays position-independent (ASLR unchanged).
//!
//! glibc loads RELR from 2.36 on, and the linker marks the binary as needing it, so a binary
//! built so refuses to start on an older glibc: the flag is passed only when building for the
//! machine that builds (`TARGET == HOST`) and that machine's glibc is 2.36 or newer. Set
//! `ZONEGATE_RELR=0` to leave it out (a binary to copy to an older system, a linker without
//! `-z pack-relative-relocs`).

use std::env;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=ZONEGATE_RELR");
    println!("cargo:rerun-if-changed=build.rs");
    if env::var("ZONEGATE_RELR").as_deref() == Ok("0") {
        return;
    }
    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let target_env = env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if target_os != "linux"
        || target_env != "gnu"
        || env::var("TARGET").ok() != env::var("HOST").ok()
    {
        return;
    }
    match host_glibc() {
        Some((major, minor)) if (major, minor) >= (2, 36) => {
            println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
        }
        _ => {}
    }
}

/// The build machine's glibc version, from `getconf GNU_LIBC_VERSION` ("glibc 2.36").
fn host_glibc() -> Option<(u32, u32)> {
    let out = Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let version = text.trim().strip_prefix("glibc ")?;
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts
        .next()?
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .ok()?;
    Some((major, minor))
}
