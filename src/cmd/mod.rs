//! Command dispatch and the CLI's exit codes.

use crate::cli::{Cli, Command};

pub mod device;
pub mod policy;
pub mod serve;
pub mod zone;

/// Exit code of a command line that was wrong (as clap uses for unknown flags).
pub const EXIT_USAGE: u8 = 2;
/// Exit code of a command that ran and failed.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code of `policy explain` when the policy denies what it was asked about.
pub const EXIT_DENIED: u8 = 3;

/// Standard output could not be written (its reader left: `device list | head -1`).
#[derive(Debug, thiserror::Error)]
#[error("cannot write to standard output: {0}")]
pub struct Output(#[from] pub std::io::Error);

/// `println!` for the one-shot commands, failing the command with [`Output`] instead of
/// panicking ("failed printing to stdout", exit 101) when stdout is gone. Rust ignores
/// SIGPIPE, so a reader leaving early is a write error here; `main` ends quietly on it.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*).map_err($crate::cmd::Output)?
    }};
}
pub(crate) use say;

/// Whether `e` is stdout's reader having left: nothing to say, nowhere to say it.
pub fn reader_left(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<Output>()
            .is_some_and(|o| o.0.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// A mistake in how the command was called, found after parsing (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Zone(c) => zone::run(c),
        Command::Device(c) => device::run(c),
        Command::Gateway(a) => serve::gateway(a),
        Command::Node(a) => serve::node(a),
        Command::Policy(c) => policy::run(c),
        Command::Files {
            dir,
            listen,
            site,
            hidden,
            proxies,
        } => serve::files(
            dir,
            listen,
            crate::files::Options {
                pages: if site {
                    crate::files::Pages::Site
                } else {
                    crate::files::Pages::Sandboxed
                },
                hidden,
                proxies,
            },
        ),
        Command::Demo { dir, check } => crate::demo::run(dir, check),
    }
}

/// The error line's text: the error and its causes joined by ": ", as anyhow's `{:#}` does,
/// except that a cause whose text the line already holds is left out — many of our errors
/// embed their cause in their own message to say what to do about it, and printing it again
/// would say the same thing twice.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

/// Whether `e` says nothing more on stderr: `policy explain`'s DENY (its explanation said it).
pub fn says_nothing(e: &anyhow::Error) -> bool {
    e.is::<policy::Denied>()
}

/// Usage mistakes exit 2, `policy explain`'s DENY 3, everything else 1.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.is::<policy::Denied>() {
        return EXIT_DENIED;
    }
    for cause in e.chain() {
        if cause.is::<UsageError>() {
            return EXIT_USAGE;
        }
        if let Some(zone_core::ZoneError::Usage(_)) = cause.downcast_ref() {
            return EXIT_USAGE;
        }
        if let Some(crate::config::ConfigError::Usage(_)) = cause.downcast_ref() {
            return EXIT_USAGE;
        }
        // A bundle that names another device, or a zone that revokes this one.
        if let Some(tunnel::TunnelError::Unrunnable(_)) = cause.downcast_ref() {
            return EXIT_USAGE;
        }
        // A zone too large for its DNS records: only a change to the zone helps. (A [[tls]]
        // file that cannot be read is not: a mount late at boot or a certbot hook half way
        // through its copy is fixed by a restart, which exit 2 would prevent.)
        if let Some(
            gateway::run::StartError::Usage(_)
            | gateway::run::StartError::Dns(name_resolver::DnsError::Records(_)),
        ) = cause.downcast_ref()
        {
            return EXIT_USAGE;
        }
    }
    EXIT_FAILURE
}

pub(crate) fn check_days(flag: &str, days: i64) -> Result<(), UsageError> {
    if !(1..=3650).contains(&days) {
        return Err(UsageError(format!("{flag} {days}: use 1 to 3650")));
    }
    Ok(())
}

pub(crate) fn fmt_time(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// "in 12 days" / "EXPIRED 3 days ago", with a warning mark under 30 days.
pub(crate) fn expiry_note(t: time::OffsetDateTime, now: time::OffsetDateTime) -> String {
    let days = (t - now).whole_days();
    if t <= now {
        format!("EXPIRED {} days ago", -days)
    } else if days < 30 {
        format!("WARNING: expires in {days} days")
    } else {
        format!("in {days} days")
    }
}

#[cfg(test)]
mod tests {
    use super::error_text;

    #[derive(Debug, thiserror::Error)]
    #[error("HTTPS: {0}")]
    struct Embeds(#[from] std::io::Error);

    #[test]
    fn error_text_prints_each_cause_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "cert.pem: no such file");
        // A cause the message already embeds is not repeated.
        let e = anyhow::Error::from(Embeds(io()));
        assert_eq!(error_text(&e), "HTTPS: cert.pem: no such file");
        // Context whose text does not hold the cause still gets it appended, in chain order.
        let e = anyhow::Error::from(io()).context("reading the config");
        assert_eq!(error_text(&e), "reading the config: cert.pem: no such file");
        let e = anyhow::Error::from(Embeds(io())).context("gateway");
        assert_eq!(error_text(&e), "gateway: HTTPS: cert.pem: no such file");
    }
}
