//! Log set-up: human-readable lines on stderr, `RUST_LOG` to filter (default `info`).
//!
//! [`init`] installs the subscriber; the [`LogGuard`] it returns keeps the log writer running.
//!
//! - `writer`: the writer thread every line goes through, one `write(2)` per batch of lines.
//! - `format`: `PlainFormat`, the default format's plain-text lines at a fraction of the cost.

mod format;
mod writer;

use std::io;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use format::PlainFormat;
use writer::{start, WriterThread, BUFFER_CAP};

/// Keeps the writer thread alive; dropping it writes out every buffered line. Hold it until
/// the process is done logging (see `main`).
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _writer: Option<WriterThread>,
}

/// What is logged unless `RUST_LOG` says otherwise.
///
/// rustls warns (through `log`) about what TLS clients send, e.g. an IP address as SNI, which
/// wrk and scanners do on every connection: a public server's log would fill with the peers'
/// mistakes. Failed handshakes are logged by the front itself (at debug). hickory's warnings
/// are per datagram too (a source port of 0, a send the kernel refused under a flood): anyone
/// could fill the log, past the budgets of the project's own lines.
const DEFAULT_FILTER: &str =
    "info,hickory_server=error,hickory_proto=error,quinn=warn,rustls=error";

/// The log filter from `RUST_LOG` (`LEVEL` or `TARGET=LEVEL`, comma-separated, e.g.
/// `info,tunnel=debug`), or [`DEFAULT_FILTER`] when it is unset or empty. A value that is no
/// filter is said on stderr (logging is not running yet) and the default used: a typo in a
/// debugging aid must not keep a gateway from starting.
///
/// `Targets` rather than `EnvFilter`: its per-span and field directives pulled a regex engine
/// into the binary, compiled at every start (the agent's start-up code stays resident).
fn filter(rust_log: Option<&str>) -> Targets {
    let default = || {
        DEFAULT_FILTER
            .parse()
            .unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO))
    };
    match rust_log.map(str::trim) {
        None | Some("") => default(),
        Some(text) => text.parse().unwrap_or_else(|e| {
            eprintln!(
                "zonegate: RUST_LOG={text:?} is not a log filter ({e}); expected LEVEL or \
                 TARGET=LEVEL, comma-separated (e.g. `info,tunnel=debug`); logging with \
                 {DEFAULT_FILTER:?}"
            );
            default()
        }),
    }
}

pub fn init() -> LogGuard {
    let filter = filter(std::env::var("RUST_LOG").ok().as_deref());
    // Colour only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let (writer, thread) = start(Box::new(io::stderr()), BUFFER_CAP);
    // A second init (tests calling run() twice) is harmless: keep the first subscriber, and
    // its writer; this call's writer then has no subscriber and its thread is stopped at once.
    let builder = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(ansi)
        .with_target(false);
    // Colour keeps tracing-subscriber's own format; plain text gets the same lines, cheaper.
    let installed = if ansi {
        builder.finish().with(filter).try_init()
    } else {
        builder
            .event_format(PlainFormat::new())
            .finish()
            .with(filter)
            .try_init()
    }
    .is_ok();
    LogGuard {
        _writer: installed.then_some(thread),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    fn would_log(filter: &Targets, target: &str, level: Level) -> bool {
        filter.would_enable(target, &level)
    }

    #[test]
    fn the_default_filter_quiets_the_libraries_that_log_what_peers_send() {
        for unset in [None, Some(""), Some("  ")] {
            let f = filter(unset);
            assert!(would_log(&f, "gateway::http::server", Level::INFO));
            assert!(!would_log(&f, "gateway::http::server", Level::DEBUG));
            assert!(!would_log(&f, "rustls::server::hs", Level::WARN));
            assert!(would_log(&f, "rustls::server::hs", Level::ERROR));
            assert!(!would_log(&f, "quinn_proto::connection", Level::INFO));
            assert!(!would_log(&f, "hickory_server::server", Level::WARN));
        }
    }

    #[test]
    fn rust_log_chooses_levels_per_target_and_a_bad_one_keeps_the_default() {
        let f = filter(Some("warn,tunnel=debug"));
        assert!(would_log(&f, "tunnel::hub", Level::DEBUG));
        assert!(!would_log(&f, "gateway::run", Level::INFO));
        assert!(would_log(&f, "gateway::run", Level::WARN));
        let f = filter(Some("info,tunnel=loud"));
        assert!(would_log(&f, "tunnel::hub", Level::INFO));
        assert!(!would_log(&f, "tunnel::hub", Level::DEBUG));
        assert!(!would_log(&f, "rustls::server::hs", Level::WARN));
    }
}
