//! Log set-up: human-readable lines on stderr, `RUST_LOG` to filter (default `info`).
//!
//! [`init`] installs the subscriber; the [`LogGuard`] it returns keeps the log writer running.
//!
//! - `writer`: the writer thread every line goes through, one `write(2)` per batch of lines.
//! - `format`: `PlainFormat`, the default format's plain-text lines at a fraction of the cost.

mod format;
mod writer;

use std::io;
use std::io::Write as _;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use format::PlainFormat;
use writer::{start, Finisher, WriterThread, BUFFER_CAP, EXIT_WAIT};

/// The installed writer's [`Finisher`], for [`finish_before_exit`].
static FINISHER: std::sync::OnceLock<Finisher> = std::sync::OnceLock::new();

/// Writes out the buffered log lines before an exit that skips `main`'s return (a second
/// signal's `process::exit`, which drops no [`LogGuard`]): waits at most a couple of seconds
/// for a stderr that takes nothing. Lines logged afterwards go straight to stderr. False if
/// stderr took nothing meanwhile: a direct write to it would block too.
pub fn finish_before_exit() -> bool {
    FINISHER.get().is_none_or(|f| f.finish_now(EXIT_WAIT))
}

/// Keeps the writer thread alive; dropping it (or [`LogGuard::finish`]) writes out every
/// buffered line, waiting at most a couple of seconds for a stderr that takes nothing. Hold it
/// until the process is done logging (see `main`).
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _writer: Option<WriterThread>,
}

impl LogGuard {
    /// Writes out every buffered line and stops the writer; false if stderr took nothing for
    /// the wait (a paused pager, a full pipe): a direct write to it would block for good.
    pub fn finish(self) -> bool {
        self._writer.is_none_or(|w| w.finish(EXIT_WAIT))
    }
}

/// What is logged unless `RUST_LOG` says otherwise.
///
/// rustls warns (through `log`) about what TLS clients send, e.g. an IP address as SNI, which
/// wrk and scanners do on every connection: a public server's log would fill with the peers'
/// mistakes. Failed handshakes are logged by the front itself (at debug). hickory's warnings
/// are per datagram too (a source port of 0, a send the kernel refused under a flood): anyone
/// could fill the log, past the budgets of the project's own lines. h2 warns per HTTP/2
/// connection of a client that resets streams early (one line each: 70,000 lines, 12 MB, in
/// 5 s from one client), which the front's own budgeted line already tells.
const DEFAULT_FILTER: &str =
    "info,hickory_server=error,hickory_proto=error,quinn=warn,rustls=error,h2=error";

/// The library entries of [`DEFAULT_FILTER`]: kept under a `RUST_LOG` that does not name
/// their target (at the general level where that is stricter), so that
/// `RUST_LOG=info,tunnel=debug` does not open the log to the floods they hold back.
const QUIET_LIBRARIES: [&str; 5] = [
    "hickory_server=error",
    "hickory_proto=error",
    "quinn=warn",
    "rustls=error",
    "h2=error",
];

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
    let Some(text) = rust_log.map(str::trim).filter(|t| !t.is_empty()) else {
        return default();
    };
    match parse_filter(text) {
        Ok(f) => f,
        Err(why) => {
            // Not `eprintln!`: with stderr closed it panics, before any logging is set up.
            let _ = writeln!(
                std::io::stderr(),
                "zonegate: RUST_LOG={text:?} is not a log filter ({why}); expected LEVEL or \
                 TARGET=LEVEL, comma-separated (e.g. `info,tunnel=debug`); logging with \
                 {DEFAULT_FILTER:?}"
            );
            default()
        }
    }
}

/// `text` as a filter, with [`QUIET_LIBRARIES`] for the targets it does not name. Empty
/// items are skipped (`info,` — `Targets` read an empty item as "errors only" and logged
/// nothing else, without a word); span and field directives (`tunnel[conn]=debug`,
/// `{app=web}`), which only EnvFilter knew, are refused rather than taken for target names
/// that match nothing, and so is a word that is no level (`warning`): `Targets` took it for a
/// target to log at every level, and with no default level left logged nothing else at all.
fn parse_filter(text: &str) -> Result<Targets, String> {
    let mut items = Vec::new();
    let mut targets = Vec::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((target, level)) = item.split_once('=') else {
            item.parse::<tracing::level_filters::LevelFilter>().map_err(|_| {
                format!("{item:?} is no level (off, error, warn, info, debug, trace); a target takes one as TARGET=LEVEL")
            })?;
            items.push(item);
            continue;
        };
        if target.contains(['[', ']', '{', '}']) {
            return Err(format!(
                "{item:?}: span and field filters are not supported"
            ));
        }
        if target.is_empty()
            || !target
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-'))
        {
            return Err(format!("{item:?}: {target:?} is no target (a module path such as `tunnel` or `gateway::http`)"));
        }
        if level.is_empty() {
            return Err(format!("{item:?} names no level"));
        }
        targets.push(target);
        items.push(item);
    }
    if items.is_empty() {
        return Err("no level or target in it".into());
    }
    // The level for every other target (the last one given): a quiet library logs no more
    // than it, and nothing without one (`off`, or only TARGET=LEVEL items: all else is off).
    let general = items
        .iter()
        .filter(|i| !i.contains('='))
        .filter_map(|i| i.parse::<tracing::level_filters::LevelFilter>().ok())
        .next_back()
        .filter(|g| *g != tracing::level_filters::LevelFilter::OFF);
    let quiet: Vec<String> = match general {
        None => Vec::new(),
        Some(general) => QUIET_LIBRARIES
            .into_iter()
            .filter_map(|q| q.split_once('='))
            // Named by the user: theirs (a module of it named is more specific already).
            .filter(|(lib, _)| !targets.contains(lib))
            .filter_map(|(lib, level)| {
                let level = level.parse::<tracing::level_filters::LevelFilter>().ok()?;
                Some(format!("{lib}={}", level.min(general)))
            })
            .collect(),
    };
    quiet
        .iter()
        .map(String::as_str)
        .chain(items)
        .collect::<Vec<_>>()
        .join(",")
        .parse()
        .map_err(|e| format!("{e}"))
}

/// The fmt subscriber both formats start from, writing to `writer`.
fn builder<W>(
    writer: W,
) -> tracing_subscriber::fmt::SubscriberBuilder<
    tracing_subscriber::fmt::format::DefaultFields,
    tracing_subscriber::fmt::format::Format,
    tracing::level_filters::LevelFilter,
    W,
>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    // The fmt builder caps events at INFO unless told otherwise: the filter decides alone.
    tracing_subscriber::fmt()
        .with_max_level(tracing::level_filters::LevelFilter::TRACE)
        .with_writer(writer)
        .with_target(false)
}

/// A panic's report, as a log line through the writer like any other: the default hook
/// writes it to stderr itself, blocking — with stderr stalled (journald stopped, a full
/// pipe) a connection task's panic froze the runtime thread it ran on, the only one of a
/// node — and apart from the lines buffered before it, in several lines, unescaped.
fn log_panic(info: &std::panic::PanicHookInfo<'_>) {
    let (what, at, thread, trace) = panic_parts(info);
    if trace.status() == std::backtrace::BacktraceStatus::Captured {
        tracing::error!(panic = %what, at = %at, thread = %thread, backtrace = %trace, "panicked");
    } else {
        tracing::error!(panic = %what, at = %at, thread = %thread, "panicked");
    }
}

/// A panic's report for a filter that drops [`log_panic`]'s line (`RUST_LOG=off`, or targets
/// that leave this module out): one line into the writer's buffer all the same, never to
/// stderr directly — the default hook's write blocked a runtime thread on a stalled stderr.
fn panic_line(writer: &writer::BatchWriter, info: &std::panic::PanicHookInfo<'_>) {
    let (what, at, thread, trace) = panic_parts(info);
    let mut line = format!("ERROR zonegate: panicked: {what:?} at {at} (thread {thread:?})");
    if trace.status() == std::backtrace::BacktraceStatus::Captured {
        line.push_str(&format!(" backtrace={:?}", trace.to_string()));
    }
    line.push('\n');
    writer.push_error_line(line.as_bytes());
}

/// What a panic's report says: its message, where, on which thread, and a backtrace when
/// `RUST_BACKTRACE` asks for one (as the default hook).
fn panic_parts(
    info: &std::panic::PanicHookInfo<'_>,
) -> (String, String, String, std::backtrace::Backtrace) {
    let payload = info.payload();
    let what = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not text)")
        .to_owned();
    let at = info.location().map(|l| l.to_string()).unwrap_or_default();
    let thread = std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .to_owned();
    (what, at, thread, std::backtrace::Backtrace::capture())
}

pub fn init() -> LogGuard {
    let rust_log = match std::env::var("RUST_LOG") {
        Ok(text) => Some(text),
        Err(std::env::VarError::NotPresent) => None,
        // Said, as a filter that does not parse is (`.ok()` dropped it without a word).
        Err(std::env::VarError::NotUnicode(raw)) => {
            let _ = writeln!(
                std::io::stderr(),
                "zonegate: RUST_LOG={raw:?} is not UTF-8 text, so no log filter; logging with \
                 {DEFAULT_FILTER:?}"
            );
            None
        }
    };
    let filter = filter(rust_log.as_deref());
    // Colour only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let (writer, thread) = start(Box::new(io::stderr()), BUFFER_CAP);
    let panic_writer = writer.clone();
    // A second init (tests calling run() twice) is harmless: keep the first subscriber, and
    // its writer; this call's writer then has no subscriber and its thread is stopped at once.
    let builder = builder(writer).with_ansi(ansi);
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
    if installed {
        let _ = FINISHER.set(thread.finisher());
        // A panic the filter would drop (`RUST_LOG=off`, or targets that leave this module
        // out) is written all the same: a panic must never go unreported.
        std::panic::set_hook(Box::new(move |info| {
            if tracing::enabled!(tracing::Level::ERROR) {
                log_panic(info);
            } else {
                panic_line(&panic_writer, info);
            }
        }));
    }
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
            assert!(!would_log(&f, "h2::proto::streams::recv", Level::WARN));
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
        // Empty items are skipped, not read as "errors only".
        let f = filter(Some("info,, tunnel=debug,"));
        assert!(would_log(&f, "gateway::run", Level::INFO));
        assert!(would_log(&f, "tunnel::hub", Level::DEBUG));
        // What only EnvFilter knew, a target without a level, or a word that is no level
        // (which Targets took for a target, and then logged nothing else) keeps the default.
        for bad in [
            "tunnel[conn]=debug",
            "info,{app=web}=debug",
            "tunnel=",
            ",",
            "warning",
            "inf",
            "info;tunnel=debug",
            "info,tunnel debug=info",
        ] {
            let f = filter(Some(bad));
            assert!(would_log(&f, "gateway::run", Level::INFO), "{bad}");
            assert!(!would_log(&f, "rustls::server::hs", Level::WARN), "{bad}");
        }
        // The libraries the default quiets stay quiet unless named.
        let f = filter(Some("debug,tunnel=trace"));
        assert!(would_log(&f, "gateway::run", Level::DEBUG));
        assert!(!would_log(&f, "rustls::server::hs", Level::WARN));
        assert!(!would_log(&f, "hickory_server::server", Level::WARN));
        let f = filter(Some("info,rustls=debug,quinn::connection=trace"));
        assert!(would_log(&f, "rustls::server::hs", Level::DEBUG));
        assert!(would_log(&f, "quinn::connection", Level::TRACE));
        assert!(!would_log(&f, "quinn::endpoint", Level::INFO));
        assert!(!would_log(&f, "quinn_proto::conn", Level::INFO));
        assert!(!would_log(&f, "hickory_server::server", Level::WARN));
        // Nor do they log more than a stricter level lets anything else.
        for strict in ["off", "error,tunnel=info", "tunnel=debug"] {
            let f = filter(Some(strict));
            assert!(!would_log(&f, "quinn::endpoint", Level::WARN), "{strict}");
            assert!(!would_log(&f, "gateway::run", Level::WARN), "{strict}");
        }
        let f = filter(Some("off"));
        assert!(!would_log(&f, "rustls::server::hs", Level::ERROR));
    }

    /// The filter decides alone: the fmt builder's own cap (INFO) kept `RUST_LOG=debug` from
    /// logging any debug line, as installed.
    #[test]
    fn rust_log_debug_reaches_the_installed_subscriber() {
        let subscriber = builder(std::io::sink)
            .event_format(PlainFormat::new())
            .finish()
            .with(filter(Some("info,zonegate=debug")));
        tracing::subscriber::with_default(subscriber, || {
            assert!(tracing::enabled!(target: "zonegate::files", Level::DEBUG));
            assert!(!tracing::enabled!(target: "gateway::run", Level::DEBUG));
        });
    }
}
