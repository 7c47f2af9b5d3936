//! `zonegate`: the command line. Parses arguments and hands over to [`zonegate::cmd`].

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = zonegate::cli::Cli::parse();
    let log = zonegate::logging::init();
    let result = zonegate::cmd::run(cli);
    // The serving runtime is gone: a signal ends the wait below as it would any tool's.
    zonegate::cmd::serve::default_stop_signals();
    // Every queued log line is out before the final error line below — unless stderr took
    // nothing for a couple of seconds (a paused pager): then no error line, whose write
    // would block the exit for good.
    let stderr_takes = log.finish();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Its reader left (`device list | head -1`): quietly, with the status a Unix tool
        // ended by SIGPIPE has (128 + 13).
        Err(e) if zonegate::cmd::reader_left(&e) => ExitCode::from(141),
        Err(e) if zonegate::cmd::says_nothing(&e) => ExitCode::from(zonegate::cmd::exit_code(&e)),
        Err(e) => {
            // Not `eprintln!`: with stderr closed it panics, and the exit code below is lost.
            if stderr_takes {
                let _ = writeln!(
                    std::io::stderr(),
                    "error: {}",
                    zonegate::cmd::error_text(&e)
                );
            }
            ExitCode::from(zonegate::cmd::exit_code(&e))
        }
    }
}
