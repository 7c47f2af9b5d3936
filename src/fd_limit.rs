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

/// What a gateway's connection limits may take at once: the front's and the tcp apps'
/// connections, one descriptor each, a sixteenth more (a full table makes room for a newcomer
/// before the connection it closes is gone), the closed sockets lingering to send their last
/// bytes, and [`RESERVE`] for everything else (the tunnel's socket, udp apps, DNS, the admin
/// API, files read while serving).
pub fn gateway_needs(http_connections: usize, tcp_connections: usize) -> Needs {
    let conns = http_connections.saturating_add(tcp_connections) as u64;
    // Each of the two tables' slack, at least one.
    let making_room = conns / gateway::per_ip::ROOM_SLACK as u64 + 2;
    Needs {
        descriptors: conns
            .saturating_add(making_room)
            .saturating_add(tunnel::linger::MAX_LINGERING as u64)
            .saturating_add(RESERVE)
            .max(LOW),
        lower: "or lower http_connections and tcp_connections in gateway.toml",
    }
}

/// Descriptors kept for what is not a proxied connection.
pub const RESERVE: u64 = 1024;

/// How many descriptors a process may hold at once, and what else can be done about a limit
/// below it.
pub struct Needs {
    pub descriptors: u64,
    pub lower: &'static str,
}

/// A node's: [`LOW`].
pub const NODE_NEEDS: Needs = Needs {
    descriptors: LOW,
    lower: "",
};

/// Raises the soft open-files limit to the hard one; logs what it did (one line), and warns
/// when the result is below what the process may need: past it every accept and connect fails
/// at once, and the per-client limits protect nothing. Failure is logged, not fatal: the
/// process still runs within its old limit.
pub fn raise_open_files(needs: Needs) {
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
    if now < needs.descriptors {
        warn!(
            limit = now,
            needed = needs.descriptors,
            "open files limit is below what this process may hold: connections beyond it fail, all at once; allow more (systemd: LimitNOFILE={} in the unit; shell: ulimit -Hn {} as root){}{}",
            needs.descriptors,
            needs.descriptors,
            if needs.lower.is_empty() { "" } else { ", " },
            needs.lower,
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
    fn a_gateway_needs_its_connection_limits_and_a_reserve() {
        // 32,768 connections, 2,050 while making room, 1,024 lingering, 1,024 reserved.
        assert_eq!(super::gateway_needs(16_384, 16_384).descriptors, 36_866);
        assert_eq!(super::gateway_needs(10, 10).descriptors, super::LOW);
    }

    #[test]
    fn reads_the_limit() {
        let (soft, hard) = super::open_files().unwrap();
        assert!(soft > 0 && soft <= hard, "{soft} {hard}");
    }
}
