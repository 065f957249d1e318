//! postern-milter: command line and exit codes; everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use postern_common::cli::{self, CommonArgs};
use postern_common::exit::{EX_OK, EX_RUNTIME};
use postern_milter::dkim::keys::KeygenAlgorithm;
use postern_milter::server::{self, Milter};

/// Postfix milter: DKIM signing and verification (replaces opendkim), DMARC and aggregate
/// reports (replaces opendmarc).
#[derive(Debug, Parser)]
#[command(name = "postern-milter", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generates a DKIM key: <selector>.private (mode 0600) and <selector>.txt (the DNS record
    /// in opendkim-genkey's layout).
    Keygen {
        /// The signing domain.
        #[arg(short = 'd', long)]
        domain: String,
        /// The selector.
        #[arg(short = 's', long, default_value = "default")]
        selector: String,
        /// Key type.
        #[arg(short = 'a', long, value_enum, default_value = "rsa-2048")]
        algorithm: KeygenAlgorithm,
        /// Where to write the files.
        #[arg(short = 'D', long, default_value = ".")]
        dir: PathBuf,
    },
    /// Looks up each configured selector in DNS and reports whether the published key matches
    /// the private key; exit 1 if any does not.
    DnsCheck,
    /// DMARC aggregate reports.
    Reports {
        #[command(subcommand)]
        action: ReportsAction,
    },
}

#[derive(Debug, Subcommand)]
enum ReportsAction {
    /// Sends the reports whose period has ended (run from a timer or cron).
    Send,
    /// Writes the pending reports as .xml.gz files instead of sending them.
    Export {
        /// Target directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Lists what is stored and pending.
    Show,
    /// Imports an opendmarc history file into the store.
    ImportHistory {
        /// The history file (opendmarc HistoryFile).
        file: PathBuf,
    },
}

fn code(n: u8) -> ExitCode {
    ExitCode::from(n)
}

fn keygen(
    domain: &str,
    selector: &str,
    algorithm: KeygenAlgorithm,
    dir: &std::path::Path,
) -> ExitCode {
    let generated = match postern_milter::dkim::keys::generate(algorithm, domain, selector) {
        Ok(generated) => generated,
        Err(err) => {
            eprintln!("postern-milter: key generation failed: {err}");
            return code(EX_RUNTIME);
        }
    };
    let private = dir.join(format!("{selector}.private"));
    let txt = dir.join(format!("{selector}.txt"));
    if private.exists() {
        eprintln!(
            "postern-milter: {} exists; not overwriting it",
            private.display()
        );
        return code(EX_RUNTIME);
    }
    if let Err(err) =
        postern_common::secret::write_private_file(&private, generated.private_pem.as_bytes())
    {
        eprintln!("postern-milter: {}: {err}", private.display());
        return code(EX_RUNTIME);
    }
    if let Err(err) = std::fs::write(&txt, &generated.txt) {
        eprintln!("postern-milter: {}: {err}", txt.display());
        return code(EX_RUNTIME);
    }
    println!("wrote {} and {}", private.display(), txt.display());
    print!("{}", generated.txt);
    code(EX_OK)
}

fn dns_check(common: &CommonArgs) -> ExitCode {
    let (runtime, (_config, milter, _)) =
        match postern_common::daemon::load_for_command::<Milter>(common.config.as_deref()) {
            Ok(loaded) => loaded,
            Err(code) => return code,
        };
    let bad = runtime.block_on(postern_milter::dkim::dns_check(
        &milter.auth,
        &milter.dkim,
        &mut std::io::stdout(),
    ));
    match bad {
        Ok(0) => code(EX_OK),
        Ok(_) => code(EX_RUNTIME),
        Err(err) => {
            eprintln!("postern-milter: {err}");
            code(EX_RUNTIME)
        }
    }
}

fn reports(common: &CommonArgs, action: ReportsAction) -> ExitCode {
    let (runtime, (config, milter, _)) =
        match postern_common::daemon::load_for_command::<Milter>(common.config.as_deref()) {
            Ok(loaded) => loaded,
            Err(code) => return code,
        };
    let reports = &config.dmarc.reports;
    let state_dir = &config.state_dir;
    let now = postern_common::clock::Clock::unix(&postern_common::clock::SystemClock) as i64;
    let result: Result<String, postern_milter::reports::ReportError> = runtime.block_on(async {
        match action {
            ReportsAction::Send => {
                postern_milter::reports::send_reports(reports, state_dir, &milter.auth, now)
                    .await
                    .map(|s| {
                        format!(
                            "sent {}, failed {}, skipped {}, periods closed {}\n",
                            s.sent, s.failed, s.skipped, s.closed
                        )
                    })
            }
            ReportsAction::Export { dir } => {
                postern_milter::reports::export_reports(reports, state_dir, &dir, now)
                    .await
                    .map(|files| files.iter().map(|f| format!("{}\n", f.display())).collect())
            }
            ReportsAction::Show => {
                postern_milter::reports::show_pending(reports, state_dir, now).await
            }
            ReportsAction::ImportHistory { file } => {
                postern_milter::reports::import_history(reports, state_dir, &file)
                    .await
                    .map(|n| format!("imported {n} records from {}\n", file.display()))
            }
        }
    });
    match result {
        Ok(text) => {
            print!("{text}");
            code(EX_OK)
        }
        Err(err) => {
            eprintln!("postern-milter: {err}");
            code(EX_RUNTIME)
        }
    }
}

fn main() -> ExitCode {
    let cli: Cli = cli::parse();
    match cli.command {
        None => postern_common::daemon::run::<Milter, _, _>(&cli.common, server::run),
        Some(Command::Keygen {
            domain,
            selector,
            algorithm,
            dir,
        }) => keygen(&domain, &selector, algorithm, &dir),
        Some(Command::DnsCheck) => dns_check(&cli.common),
        Some(Command::Reports { action }) => reports(&cli.common, action),
    }
}
