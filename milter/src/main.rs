//! postern-milter: command line and exit codes; everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;
use postern_common::cli::{self, CommonArgs};
use postern_milter::server::{self, Milter};

/// Postfix milter: DKIM signing and verification (replaces opendkim), DMARC and aggregate
/// reports (replaces opendmarc).
#[derive(Debug, Parser)]
#[command(name = "postern-milter", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let cli: Cli = cli::parse();
    postern_common::daemon::run::<Milter, _, _>(&cli.common, server::run)
}
