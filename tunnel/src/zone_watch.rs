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

/// What `adopt` is told with a file's bytes: whether it saw these bytes before (a retry it
/// asked for), so it says a refusal once, not at every retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The file changed (or the watch started): these bytes are new to `adopt`.
    New,
    /// The same bytes again, `adopt` having asked for a retry.
    Again,
}

/// Polls `path` every `interval` until `shutdown` and hands a changed file's bytes to `adopt`.
/// A changed file is read once it has held still for one interval, so a copy in progress
/// (`cp` truncates, then writes) is not read half-written. Polling, like the policy watcher:
/// the same on every filesystem and way of copying. `adopt` returns when to be handed the
/// same bytes again if the file has not changed by then (a renewed certificate not valid yet
/// by this machine's clock is taken once it is), or None.
pub async fn watch(
    adopt: impl Fn(&[u8], &Path, Seen) -> Option<Duration>,
    path: PathBuf,
    interval: Duration,
    shutdown: CancellationToken,
) {
    // Read once after start too: a copy made while the device was starting (after its
    // credentials were loaded) is not missed. An unchanged file is the config in use: ignored.
    let mut seen: Fingerprint = Some((u64::MAX, None, 0, (0, 0)));
    let mut settling: Option<Fingerprint> = None;
    // The bytes last read and when `adopt` wants them again.
    let mut retry: Option<(tokio::time::Instant, Vec<u8>)> = None;
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
            if let Some((_, bytes)) = retry.take_if(|(at, _)| *at <= tokio::time::Instant::now()) {
                retry = adopt(&bytes, &path, Seen::Again)
                    .map(|after| (tokio::time::Instant::now() + after, bytes));
            }
            continue;
        }
        retry = None;
        if settling.as_ref() != Some(&now) {
            settling = Some(now);
            continue;
        }
        settling = None;
        seen = now;
        match tokio::fs::read(&path).await {
            Ok(bytes) => {
                retry = adopt(&bytes, &path, Seen::New)
                    .map(|after| (tokio::time::Instant::now() + after, bytes));
            }
            Err(e) => {
                warn!(file = %path.display(), error = %e, "cannot read the changed file; what was read from it before stays in use")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// `adopt` asking for a retry is handed the same bytes again (as `Again`) until it stops
    /// asking; a change to the file hands the new bytes (as `New`) and drops the retry.
    #[tokio::test]
    async fn a_retry_asked_for_hands_the_same_bytes_again_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.crt");
        std::fs::write(&path, b"one").unwrap();
        type Calls = Arc<Mutex<Vec<(Vec<u8>, Seen)>>>;
        let calls: Calls = Arc::default();
        let stop = CancellationToken::new();
        let c = calls.clone();
        let task = tokio::spawn(watch(
            move |bytes, _, seen| {
                let mut c = c.lock().unwrap();
                c.push((bytes.to_vec(), seen));
                // "one" wants two retries; "two" none.
                (bytes == b"one" && c.len() < 3).then_some(Duration::from_millis(1))
            },
            path.clone(),
            Duration::from_millis(10),
            stop.clone(),
        ));
        let wait = |n: usize| {
            let calls = calls.clone();
            async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                while calls.lock().unwrap().len() < n {
                    assert!(tokio::time::Instant::now() < deadline, "{n} calls not made");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        wait(3).await;
        // Stopped asking: no fourth call while the file stays as it is.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(calls.lock().unwrap().len(), 3);
        std::fs::write(&path, b"two, longer").unwrap();
        wait(4).await;
        stop.cancel();
        task.await.unwrap();
        let calls = calls.lock().unwrap();
        let seen: Vec<(&[u8], Seen)> = calls.iter().map(|(b, s)| (b.as_slice(), *s)).collect();
        assert_eq!(
            seen,
            [
                (&b"one"[..], Seen::New),
                (&b"one"[..], Seen::Again),
                (&b"one"[..], Seen::Again),
                (&b"two, longer"[..], Seen::New),
            ]
        );
    }
}
