//! The `wemoe-engine` command line.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    wemoe_engine::heap::keep_freed_memory();
    wemoe_engine::partial::remove_on_interrupt();
    let args = cli::Cli::parse();
    // A report that could not be written to stdout fails the command (after it ran, as its output went).
    let result = cli::run(args).and_then(|()| cli::stdout::check());
    if let Some(table) = wemoe_engine::device::op_times::report() {
        eprint!("{table}");
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line naming the input at fault: anyhow's chain, outermost context first.
            let line = format!("{err:#}").replace('\n', " ");
            eprintln!("error: {line}");
            ExitCode::FAILURE
        }
    }
}
