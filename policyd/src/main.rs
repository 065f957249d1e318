//! postern-policyd: command line and exit codes; everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use postern_common::cli::{self, CommonArgs};
use postern_common::exit::{EX_CONFIG, EX_OK, EX_RUNTIME};
use postern_policyd::admin::{self, AdminError};
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

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Administer the greylist store
    #[command(subcommand)]
    Greylist(GreylistCommand),
    /// Convert an existing policyd-spf.conf to policyd.toml's [spf] table (on stdout)
    PolicydSpfImport {
        /// The policyd-spf.conf file
        file: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum GreylistCommand {
    /// Import postgrey's database (postgrey.db, postgrey_clients.db) from its --dbdir
    ImportPostgrey {
        /// postgrey's database directory (Debian: /var/lib/postgrey)
        dir: PathBuf,
        /// The BerkeleyDB dump program (Debian package db-util)
        #[arg(long, default_value = "db_dump")]
        db_dump: String,
    },
    /// List triplets and auto-whitelisted clients whose key contains FILTER
    List {
        /// Part of the key, e.g. a client network or an address
        #[arg(default_value = "")]
        filter: String,
        /// At most this many entries
        #[arg(long, default_value_t = 1000)]
        limit: u64,
    },
    /// Delete a triplet (client_net/sender/recipient, as `list` prints it)
    Delete {
        /// The key
        key: String,
        /// KEY is an auto-whitelisted client address, not a triplet
        #[arg(long)]
        client: bool,
    },
    /// Count triplets (waiting and passed) and auto-whitelisted clients
    Stats,
}

fn admin(cli: &Cli, command: &GreylistCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("postern-policyd: cannot start the runtime: {err}");
            return ExitCode::from(EX_RUNTIME);
        }
    };
    let config = cli.common.config.as_deref();
    let mut out = std::io::stdout().lock();
    let result = runtime.block_on(async {
        match command {
            GreylistCommand::ImportPostgrey { dir, db_dump } => {
                admin::import_postgrey(config, dir, db_dump, &mut out).await
            }
            GreylistCommand::List { filter, limit } => {
                admin::list(config, filter, *limit, &mut out).await
            }
            GreylistCommand::Delete { key, client } => {
                admin::delete(config, key, *client, &mut out)
                    .await
                    .map(|_| ())
            }
            GreylistCommand::Stats => admin::stats(config, &mut out).await,
        }
    });
    match result {
        Ok(()) => ExitCode::from(EX_OK),
        Err(AdminError::Config(err)) => {
            eprintln!("postern-policyd: {err}");
            ExitCode::from(EX_CONFIG)
        }
        Err(err) => {
            eprintln!("postern-policyd: {err}");
            ExitCode::from(EX_RUNTIME)
        }
    }
}

fn import_spf(file: &std::path::Path) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(err) => {
            eprintln!("postern-policyd: {}: {err}", file.display());
            return ExitCode::from(postern_common::exit::EX_RUNTIME);
        }
    };
    match postern_policyd::spf::import_policyd_spf_conf(&text) {
        Ok(toml) => {
            print!("{toml}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("postern-policyd: {}: {err}", file.display());
            ExitCode::from(postern_common::exit::EX_CONFIG)
        }
    }
}

fn main() -> ExitCode {
    let cli: Cli = cli::parse();
    match &cli.command {
        Some(Command::Greylist(command)) => return admin(&cli, command),
        Some(Command::PolicydSpfImport { file }) => return import_spf(file),
        None => {}
    }
    if cli.stdio {
        server::init_stdio_logging(cli.common.config.as_deref());
        postern_common::daemon::run::<Policyd, _, _>(&cli.common, server::run_stdio)
    } else {
        postern_common::daemon::run::<Policyd, _, _>(&cli.common, server::run)
    }
}
