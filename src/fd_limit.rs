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
    Ok((l.rlim_cur, l.rlim_max))
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
    if soft < hard {
        match set_open_files(hard) {
            Ok(()) => {
                info!(from = soft, to = hard, "open files limit raised");
                now = hard;
            }
            Err(e) => {
                warn!(from = soft, to = hard, error = %e, "cannot raise the open files limit")
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
    let (_, hard) = open_files()?;
    let l = libc::rlimit {
        rlim_cur: limit,
        rlim_max: hard,
    };
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
