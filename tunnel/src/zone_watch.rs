//! Watches the zone.json in a device's bundle: a newer one the owner copies in while the
//! gateway or node agent runs (after `device revoke`, `device add` or `device move`) is
//! adopted as if a device had passed it on — on a gateway verified, pushed to every agent,
//! revoked devices disconnected, served by the zone DNS; on a node verified, its gateway links
//! made to match, passed to every gateway. Its device.crt is watched the same way: a renewed
//! certificate is presented from the next handshake ([`crate::creds::DeviceCreds::renew_cert`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::warn;

/// What is compared between polls: the file's size, modification time, inode and change time,
/// or nothing when it cannot be read. The inode and change time catch a copy that keeps the
/// old modification time (`cp -p`, `rsync -a`) or lands within its granularity, as the policy
/// watcher's fingerprint does.
type Fingerprint = Option<(u64, Option<SystemTime>, u64, (i64, i64))>;

fn fingerprint(path: &Path) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((
        meta.len(),
        meta.modified().ok(),
        meta.ino(),
        (meta.ctime(), meta.ctime_nsec()),
    ))
}

/// Polls `path` every `interval` until `shutdown` and hands a changed file's bytes to `adopt`.
/// A changed file is read once it has held still for one interval, so a copy in progress
/// (`cp` truncates, then writes) is not read half-written. Polling, like the policy watcher:
/// the same on every filesystem and way of copying.
pub async fn watch(
    adopt: impl Fn(&[u8], &Path),
    path: PathBuf,
    interval: Duration,
    shutdown: CancellationToken,
) {
    // Read once after start too: a copy made while the device was starting (after its
    // credentials were loaded) is not missed. An unchanged file is the config in use: ignored.
    let mut seen: Fingerprint = Some((u64::MAX, None, 0, (0, 0)));
    let mut settling: Option<Fingerprint> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        // Off the runtime's threads, as the bundle's writes are: a bundle on a hung NFS mount
        // or a busy SD card must not freeze the tunnels sharing this thread.
        let p = path.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || fingerprint(&p)).await else {
            continue;
        };
        if now == seen {
            settling = None;
            continue;
        }
        if settling.as_ref() != Some(&now) {
            settling = Some(now);
            continue;
        }
        settling = None;
        seen = now;
        match tokio::fs::read(&path).await {
            Ok(bytes) => adopt(&bytes, &path),
            Err(e) => {
                warn!(file = %path.display(), error = %e, "cannot read the changed file; what was read from it before stays in use")
            }
        }
    }
}
