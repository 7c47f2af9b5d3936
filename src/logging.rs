//! Log set-up: human-readable lines on stderr, `RUST_LOG` to filter (default `info`).
//!
//! Lines are formatted by the thread that logs and written by a dedicated writer thread, which
//! takes every line queued so far and writes them with one system call. A busy gateway logs a
//! line per request: written one by one, the `write(2)` calls alone cost ~5% of its CPU
//! (`perf` on the HTTP front under `wrk`, benches/RESULTS.md). Nothing is dropped: when the
//! queue is full, logging waits for the writer instead of losing lines.

use std::io::BufWriter;

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Lines queued for the writer before logging waits for it. The queue's slots are allocated
/// up front (32 bytes each), so it stays small for an idle home agent; the writer empties
/// it with one `write(2)` per turn, so 1,024 absorbs a burst.
const QUEUED_LINES: usize = 1_024;

/// Keeps the writer thread alive; dropping it writes out every queued line. Hold it until
/// the process is done logging (see `main`).
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _worker: Option<WorkerGuard>,
}

pub fn init() -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,hickory_server=warn,hickory_proto=warn,quinn=warn")
    });
    // Colour only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let (writer, worker) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("zonegate-log")
        .finish(BufWriter::new(std::io::stderr()));
    // A second init (tests calling run() twice) is harmless: keep the first subscriber, and
    // its writer; this call's writer then has no subscriber and its guard is dropped at once.
    let installed = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .with_target(false)
        .try_init()
        .is_ok();
    LogGuard {
        _worker: installed.then_some(worker),
    }
}
