//! The part of the command line that every daemon shares, and argument parsing with the
//! project's exit codes (64 for usage errors instead of clap's 2).

use std::path::PathBuf;

use crate::exit::{EX_OK, EX_USAGE};

/// Options common to postern-policyd, postern-milter and postern-srsd.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CommonArgs {
    /// TOML configuration file [default: /etc/postern/<daemon>.toml; built-in defaults if that
    /// file does not exist]
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Load and validate the configuration, print the effective configuration, and exit
    /// (0 when valid, 78 when not)
    #[arg(long = "check-config")]
    pub check_config: bool,
}

/// Parses the process arguments; prints help or version and exits 0, or prints the usage error
/// and exits 64.
pub fn parse<P: clap::Parser>() -> P {
    parse_from(std::env::args_os())
}

/// As [`parse`], from an explicit argument list.
pub fn parse_from<P, I, T>(args: I) -> P
where
    P: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    match P::try_parse_from(args) {
        Ok(parsed) => parsed,
        Err(err) => {
            use clap::error::ErrorKind;
            let code = match err.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => EX_OK,
                _ => EX_USAGE,
            };
            // Printing can only fail on a closed stdout/stderr, where nothing better can be done.
            let _ = err.print();
            std::process::exit(i32::from(code));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        common: CommonArgs,
    }

    #[test]
    fn short_and_long_config_flags() {
        let cli = Cli::try_parse_from(["x", "-c", "/tmp/a.toml", "--check-config"]).unwrap();
        assert_eq!(
            cli.common.config.as_deref(),
            Some(std::path::Path::new("/tmp/a.toml"))
        );
        assert!(cli.common.check_config);
        let cli = Cli::try_parse_from(["x", "--config", "/tmp/b.toml"]).unwrap();
        assert_eq!(
            cli.common.config.as_deref(),
            Some(std::path::Path::new("/tmp/b.toml"))
        );
        assert!(!cli.common.check_config);
    }

    #[test]
    fn unknown_flag_is_a_usage_error() {
        let err = Cli::try_parse_from(["x", "--no-such-flag"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
    }
}
