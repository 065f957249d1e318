//! What the three Postern daemons share: the command line, config loading, listeners, the accept
//! loop, the daemon life cycle (signals, reload), the DNS resolver, logging, metrics, secret files,
//! the clock and SQLite housekeeping. Nothing here knows about greylisting, DKIM or SRS.

pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod dns;
pub mod exit;
pub mod listen;
pub mod logging;
pub mod metrics;
pub mod secret;
pub mod serve;
pub mod sqlite;
