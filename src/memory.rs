//! Hands memory freed after a burst back to the system, so an agent's RSS follows its live
//! heap instead of its busiest moment.
//!
//! glibc's malloc keeps freed memory inside its per-thread arenas and returns only the top of
//! each heap. After a burst (a bulk transfer's stream buffers), the pages stay resident: in the
//! 10-minute soak an agent's RSS grew 14% while its live heap, traced with heaptrack, stayed at
//! a median of 8.0 MiB from the first minute to the last (benches/SOAK.md). `malloc_trim(0)`
//! releases the free pages of every arena; it runs every [`INTERVAL`] on a blocking thread.

use std::time::{Duration, Instant};

use tracing::debug;

/// How often freed memory is handed back.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Runs forever (until its runtime ends): every [`INTERVAL`], releases freed heap pages.
pub async fn release_freed_memory() {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        // On its own thread: trimming a large heap walks every arena and can take
        // milliseconds, which must not stall a runtime worker (with two workers, packets
        // queue up behind it; an in-process test moving 2 x 256 MiB saw its peak RSS double).
        let started = Instant::now();
        let Ok(released) = tokio::task::spawn_blocking(trim).await else {
            return;
        };
        debug!(
            released,
            us = started.elapsed().as_micros() as u64,
            "freed heap memory handed back"
        );
    }
}

/// Releases what it can; true if some memory went back to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() -> bool {
    // SAFETY: malloc_trim only walks and trims glibc's own arenas, under their locks; it is
    // safe to call from any thread at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other allocators (musl, macOS) return freed memory on their own.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_memory_goes_back_to_the_system() {
        fn rss_kib() -> u64 {
            let s = std::fs::read_to_string("/proc/self/status").unwrap();
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap()
        }
        // Many small blocks (below the mmap threshold, so they live in the arena), touched,
        // then all but the last freed: the last one pins the top of the heap, so glibc's own
        // top-of-heap trimming cannot return the rest. RSS is the whole process's: another
        // test of this binary allocating (or trimming) between the two readings can hide what
        // went back, so a few tries, of which one must show it.
        let mut seen = Vec::new();
        for _ in 0..5 {
            let mut blocks: Vec<Vec<u8>> = (0..4096).map(|i| vec![i as u8; 16 * 1024]).collect();
            let keep = blocks.pop();
            drop(blocks);
            let before = rss_kib();
            let released = trim();
            let after = rss_kib();
            drop(keep);
            if released && after + 32 * 1024 < before {
                return;
            }
            seen.push((released, before, after));
        }
        panic!(
            "the 64 MiB freed should mostly be gone: (released, RSS KiB before, after) {seen:?}"
        );
    }
}
