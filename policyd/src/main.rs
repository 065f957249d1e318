//! postern-policyd: command line and exit codes; everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;
use postern_common::cli::{self, CommonArgs};
use postern_policyd::server::{self, Policyd};

/// Postfix policy server: greylisting (replaces postgrey) and SPF (replaces policyd-spf).
#[derive(Debug, Parser)]
#[command(name = "postern-policyd", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,

    /// Speak the policy protocol on stdin/stdout instead of listening (for a `spawn` entry in
    /// master.cf, as policyd-spf is run); requests without policy_context run SPF
    #[arg(long)]
    stdio: bool,
}

fn main() -> ExitCode {
    let cli: Cli = cli::parse();
    if cli.stdio {
        postern_common::daemon::run::<Policyd, _, _>(&cli.common, server::run_stdio)
    } else {
        postern_common::daemon::run::<Policyd, _, _>(&cli.common, server::run)
    }
}
