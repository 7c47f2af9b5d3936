//! Log set-up: human-readable lines on stderr, `RUST_LOG` to filter (default `info`).
//!
//! [`init`] installs the subscriber; the [`LogGuard`] it returns keeps the log writer running.
//!
//! - `writer`: the writer thread every line goes through, one `write(2)` per batch of lines.
//! - `format`: `PlainFormat`, the default format's plain-text lines at a fraction of the cost.

mod format;
mod writer;

use std::io;

use tracing_subscriber::EnvFilter;

use format::PlainFormat;
use writer::{start, WriterThread, BUFFER_CAP};

/// Keeps the writer thread alive; dropping it writes out every buffered line. Hold it until
/// the process is done logging (see `main`).
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _writer: Option<WriterThread>,
}

pub fn init() -> LogGuard {
    // rustls warns (through `log`) about what TLS clients send, e.g. an IP address as SNI,
    // which wrk and scanners do on every connection: a public server's log would fill with
    // the peers' mistakes. Failed handshakes are logged by the front itself (at debug).
    // hickory's warnings are per datagram too (a source port of 0, a send the kernel refused
    // under a flood): anyone could fill the log, past the budgets of the project's own lines.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,hickory_server=error,hickory_proto=error,quinn=warn,rustls=error")
    });
    // Colour only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let (writer, thread) = start(Box::new(io::stderr()), BUFFER_CAP);
    // A second init (tests calling run() twice) is harmless: keep the first subscriber, and
    // its writer; this call's writer then has no subscriber and its thread is stopped at once.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .with_target(false);
    // Colour keeps tracing-subscriber's own format; plain text gets the same lines, cheaper.
    let installed = if ansi {
        builder.try_init()
    } else {
        builder.event_format(PlainFormat::new()).try_init()
    }
    .is_ok();
    LogGuard {
        _writer: installed.then_some(thread),
    }
}
