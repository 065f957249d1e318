//! postern-srsd: command line and exit codes; everything else lives in the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use postern_common::cli::{self, CommonArgs};
use postern_common::exit::{EX_CONFIG, EX_RUNTIME};
use postern_srsd::server::{self, Srsd};

/// Sender Rewriting Scheme daemon for Postfix (replaces postsrsd, same addresses for the same
/// secret), over tcp_table and socketmap.
#[derive(Debug, Parser)]
#[command(name = "postern-srsd", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Convert /etc/default/postsrsd (1.x) or postsrsd.conf (2.x) to srsd.toml on stdout
    ImportPostsrsd {
        /// The postsrsd settings file
        file: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let cli: Cli = cli::parse();
    match cli.command {
        Some(Command::ImportPostsrsd { file }) => {
            let text = match std::fs::read_to_string(&file) {
                Ok(text) => text,
                Err(err) => {
                    eprintln!("postern-srsd: {}: {err}", file.display());
                    return ExitCode::from(EX_RUNTIME);
                }
            };
            match postern_srsd::config::import_postsrsd(&text) {
                Ok(toml) => {
                    print!("{toml}");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("postern-srsd: {}: {err}", file.display());
                    ExitCode::from(EX_CONFIG)
                }
            }
        }
        None => postern_common::daemon::run::<Srsd, _, _>(&cli.common, server::run),
    }
}
