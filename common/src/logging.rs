//! Plain log lines on stderr, which journald and syslog-style collectors read well: no colours,
//! and no timestamp of our own when journald (which adds one) is the reader.

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

use crate::config::LogConfig;

/// The environment variable that overrides `[log] level`.
pub const LOG_ENV: &str = "POSTERN_LOG";

/// The filter `[log] level` describes, or why it cannot be read.
pub fn filter_for(config: &LogConfig) -> Result<EnvFilter, LevelError> {
    // EnvFilter takes a bare word as a target name, so "loud" would silently mean "everything
    // from a module called loud": insist that every directive names a level.
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    for directive in config.level.split(',').map(str::trim) {
        let level = directive
            .rsplit_once('=')
            .map_or(directive, |(_, level)| level);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(LevelError(config.level.clone()));
        }
    }
    EnvFilter::builder()
        .parse(&config.level)
        .map_err(|_| LevelError(config.level.clone()))
}

/// Why `[log] level` was refused.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "invalid log level {0:?}: expected off, error, warn, info, debug or trace, optionally per module (\"info,postern_policyd=debug\")"
)]
pub struct LevelError(String);

/// Installs the global subscriber, writing each line to stderr as it is logged. Safe to call
/// more than once (later calls do nothing), so tests and one-shot commands can call it freely.
pub fn init(config: &LogConfig) {
    install(config, BoxMakeWriter::new(std::io::stderr));
}

/// Lines a daemon may have waiting for stderr before logging waits for it.
pub const LOG_BUFFER_LINES: usize = 16_384;

/// Installs the global subscriber for a daemon: lines go to stderr from a thread of their own,
/// so a slow reader (journald busy, a disk under writeback) delays no request. Up to
/// [`LOG_BUFFER_LINES`] lines wait; beyond that logging waits rather than dropping lines. The
/// guard flushes what is waiting when dropped: hold it until the daemon stops.
pub fn init_daemon(config: &LogConfig) -> WorkerGuard {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .thread_name("postern-log")
        // Lines waiting together go out in one write: the thread flushes when its queue is empty.
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    install(config, BoxMakeWriter::new(writer));
    guard
}

fn install(config: &LogConfig, writer: BoxMakeWriter) {
    let filter = std::env::var(LOG_ENV)
        .ok()
        .and_then(|level| filter_for(&LogConfig { level }).ok())
        .or_else(|| filter_for(config).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false)
        .with_target(false);
    // try_init fails only when a subscriber is already installed, which is fine.
    let _ = if under_journald {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_levels_and_directives_refuses_garbage() {
        for ok in ["info", "debug", "warn,postern_policyd=debug", "error"] {
            assert!(filter_for(&LogConfig { level: ok.into() }).is_ok(), "{ok}");
        }
        assert!(
            filter_for(&LogConfig {
                level: "loud".into()
            })
            .is_err()
        );
    }
}
