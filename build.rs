//! Build script: links the `zonegate` binary with packed relative relocations (DT_RELR) where
//! the C library it will run on loads them, and with the functions an idle node agent runs
//! placed together where the linker is lld.
//!
//! Relocations: a position-independent executable carries one 24-byte record per pointer to
//! relocate at start (`.rela.dyn`, ~390 KB here), which the loader reads whole, so every
//! zonegate process keeps those pages resident. RELR packs them into ~8 KB: an idle node
//! agent's RSS drops by ~380 KiB (benches/RESULTS.md). The executable stays
//! position-independent (ASLR unchanged). glibc loads RELR from 2.36 on, and the linker marks
//! the binary as needing it, so a binary built so refuses to start on an older glibc: the
//! flag is passed only when building for the machine that builds (`TARGET == HOST`) and that
//! machine's glibc is 2.36 or newer. `ZONEGATE_RELR=0` leaves it out (a binary to copy to an
//! older system, a linker without `-z pack-relative-relocs`).
//!
//! Function order: the kernel maps an executable's text by whole runs of pages around each
//! page touched (fault-around, read-ahead), so the ~2 MB of functions an idle node agent runs,
//! spread over 9 MB of text, kept ~6.6 MiB of it resident. `link/node-idle.order` lists them
//! (made by `benches/node_order.sh` with callgrind); lld's `--symbol-ordering-file` puts them
//! first, together. Names it lists that no longer exist are skipped, so a stale list only
//! loses its effect. Passed where the linker takes it, as a probe finds (rustup's rustc 1.90
//! and later link x86_64-unknown-linux-gnu with their own lld; GNU ld refuses the option).
//! `ZONEGATE_ORDER=0` leaves it out.

use std::env;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=ZONEGATE_RELR");
    println!("cargo:rerun-if-env-changed=ZONEGATE_ORDER");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link/node-idle.order");
    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let target_env = env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if target_os != "linux" || target_env != "gnu" {
        return;
    }
    if env::var("ZONEGATE_ORDER").as_deref() != Ok("0") && linker_takes_symbol_order() {
        let order = env::var("CARGO_MANIFEST_DIR").unwrap_or_default() + "/link/node-idle.order";
        if std::path::Path::new(&order).is_file() {
            println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={order}");
            println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
        }
    }
    if env::var("ZONEGATE_RELR").as_deref() == Ok("0")
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

/// Whether the binary is linked by an lld that takes `--symbol-ordering-file`: rustup's rustc
/// 1.90 and later link x86_64-unknown-linux-gnu with their own lld, but a distribution's rustc
/// may link through `cc` and GNU ld, which refuses the option, as may a configured linker
/// (`RUSTC_LINKER`, set by Cargo from a `linker` setting). So: a probe, an empty program
/// linked with it as the binary will be.
fn linker_takes_symbol_order() -> bool {
    if env::var("TARGET").as_deref() != Ok("x86_64-unknown-linux-gnu")
        || env::var_os("RUSTC_LINKER").is_some()
    {
        return false;
    }
    let (Ok(rustc), Ok(out_dir)) = (env::var("RUSTC"), env::var("OUT_DIR")) else {
        return false;
    };
    let dir = std::path::Path::new(&out_dir);
    let src = dir.join("order_probe.rs");
    let empty = dir.join("order_probe.order");
    if std::fs::write(&src, "fn main() {}\n").is_err() || std::fs::write(&empty, "").is_err() {
        return false;
    }
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    Command::new(rustc)
        .args(flags.split('\x1f').filter(|f| !f.is_empty()))
        .arg("--target")
        .arg("x86_64-unknown-linux-gnu")
        .arg("-o")
        .arg(dir.join("order_probe"))
        .arg("-C")
        .arg(format!(
            "link-arg=-Wl,--symbol-ordering-file={}",
            empty.display()
        ))
        .arg(&src)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
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
