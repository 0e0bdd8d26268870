//! `commission-ledger`: the server and the operator's command line.

use clap::Parser;

fn main() {
    let cli = commission_ledger::cli::Cli::parse();
    match commission_ledger::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}
