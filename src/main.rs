//! `zonegate`: the command line. Parses arguments and hands over to [`zonegate::cmd`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = zonegate::cli::Cli::parse();
    zonegate::logging::init();
    match zonegate::cmd::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(zonegate::cmd::exit_code(&e))
        }
    }
}
