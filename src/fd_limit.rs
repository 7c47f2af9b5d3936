//! Raises the open-files limit to what the system allows before serving.
//!
//! Every public connection, every device-side TCP connection behind a tunnel stream and every
//! UDP flow's socket is a file descriptor, and the usual soft limit — 1,024, also systemd's
//! default for services — is far below what a gateway or a busy node holds: past it, accepts
//! and connects fail with "too many open files" (EMFILE) for every app at once. The hard limit
//! is what the administrator allows; raising the soft limit up to it needs no privilege. Go's
//! runtime does the same at start, nginx has `worker_rlimit_nofile` for it.

use tracing::{info, warn};

/// Below this many descriptors a warning says how to allow more: a gateway holds two per
/// proxied TCP connection (client and nothing else on the gateway: the device side is a QUIC
/// stream), a node one per connection to a local service and one per UDP flow.
pub const LOW: u64 = 8192;

/// Above this the soft limit is not raised: Linux refuses more than `fs.nr_open` (1,048,576
/// by default), macOS more than `OPEN_MAX`, and a hard limit of "unlimited" would fail.
pub const MOST: u64 = 1 << 20;

/// Tried when the system refuses the hard limit itself (EINVAL): macOS reports an unlimited
/// hard limit but takes at most `OPEN_MAX` (10,240) per process.
const FALLBACK: u64 = 10_240;

/// The soft and hard `RLIMIT_NOFILE` now.
#[allow(unsafe_code)]
pub fn open_files() -> std::io::Result<(u64, u64)> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the `rlimit` struct we pass, which lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // rlim_t is 32 bits on some targets (32-bit ARM): widened, never narrowed here.
    #[allow(clippy::unnecessary_cast)]
    Ok((l.rlim_cur as u64, l.rlim_max as u64))
}

/// Raises the soft open-files limit to the hard one; logs what it did (one line), and warns
/// when the result is below [`LOW`]. Failure is logged, not fatal: the process still runs
/// within its old limit.
pub fn raise_open_files() {
    let (soft, hard) = match open_files() {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot read the open files limit");
            return;
        }
    };
    let mut now = soft;
    let want = hard.min(MOST);
    if soft < want {
        let mut r = set_open_files(want).map(|()| want);
        if matches!(&r, Err(e) if e.raw_os_error() == Some(libc::EINVAL))
            && soft < FALLBACK
            && FALLBACK < want
        {
            r = set_open_files(FALLBACK).map(|()| FALLBACK);
        }
        match r {
            Ok(to) => {
                info!(from = soft, to, "open files limit raised");
                now = to;
            }
            Err(e) => {
                warn!(from = soft, to = want, error = %e, "cannot raise the open files limit")
            }
        }
    }
    if now < LOW {
        warn!(
            limit = now,
            "open files limit is low: connections beyond it fail; allow more (systemd: LimitNOFILE=65536 in the unit; shell: ulimit -Hn 65536 as root)"
        );
    }
}

/// Sets the soft open-files limit (the hard one stays as it is: `limit` must not exceed it).
#[allow(unsafe_code)]
fn set_open_files(limit: u64) -> std::io::Result<()> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the `rlimit` struct we pass, which lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // `limit` is at most the hard limit, which came from an rlim_t: it fits.
    l.rlim_cur = libc::rlim_t::try_from(limit).unwrap_or(l.rlim_max);
    // SAFETY: setrlimit only reads the `rlimit` struct we pass, which lives across the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_limit() {
        let (soft, hard) = super::open_files().unwrap();
        assert!(soft > 0 && soft <= hard, "{soft} {hard}");
    }
}
