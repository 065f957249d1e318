//! Plain log lines on stderr, which journald and syslog-style collectors read well: no colours,
//! and no timestamp of our own when journald (which adds one) is the reader.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

use crate::config::LogConfig;

mod format;

pub use format::LineFormat;

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

/// Installs the global subscriber for a daemon: lines are appended to a buffer that a thread of
/// its own writes to stderr (see [`BatchedStderr`]), so neither a slow reader (journald busy, a
/// disk under writeback) nor one syscall per line costs a request anything. The guard writes
/// what is waiting when dropped: hold it until the daemon stops.
pub fn init_daemon(config: &LogConfig) -> LogGuard {
    let (writer, guard) = BatchedStderr::start(std::io::stderr(), FLUSH_INTERVAL, BUFFER_LIMIT);
    install(config, BoxMakeWriter::new(writer));
    guard
}

/// How long lines gather before the log thread writes them.
const FLUSH_INTERVAL: Duration = Duration::from_millis(20);
/// Bytes of lines that may wait; beyond that new lines are dropped (and counted) rather than
/// stalling requests behind a blocked stderr.
const BUFFER_LIMIT: usize = 4 << 20;

/// A log sink for busy daemons. Each line is appended to a shared buffer (a lock, no syscall);
/// a thread wakes when the buffer stops being empty, waits [`FLUSH_INTERVAL`] for more lines,
/// and writes them all at once. So at any rate there is at most one wake-up and one write per
/// interval, and an idle daemon's log thread sleeps. Lines beyond [`BUFFER_LIMIT`] are dropped
/// and the number is written once the output moves again: a wedged log reader must not stop
/// mail.
#[derive(Clone)]
pub struct BatchedStderr {
    shared: Arc<LogBuffer>,
}

struct LogBuffer {
    state: Mutex<Pending>,
    ready: Condvar,
    limit: usize,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    dropped: u64,
    stop: bool,
}

/// Writes what is waiting and stops the log thread when dropped.
pub struct LogGuard {
    shared: Arc<LogBuffer>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BatchedStderr {
    fn start<W: Write + Send + 'static>(
        mut out: W,
        interval: Duration,
        limit: usize,
    ) -> (Self, LogGuard) {
        let shared = Arc::new(LogBuffer {
            state: Mutex::new(Pending::default()),
            ready: Condvar::new(),
            limit,
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("postern-log".into())
            .spawn(move || {
                let mut spare = Vec::new();
                loop {
                    let mut pending = worker.lock();
                    while pending.bytes.is_empty() && pending.dropped == 0 && !pending.stop {
                        pending = worker
                            .ready
                            .wait(pending)
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                    }
                    let stopping = pending.stop;
                    if !stopping {
                        // Let the lines of this interval gather; requests keep appending.
                        drop(pending);
                        std::thread::sleep(interval);
                        pending = worker.lock();
                    }
                    std::mem::swap(&mut pending.bytes, &mut spare);
                    let dropped = std::mem::take(&mut pending.dropped);
                    drop(pending);
                    // A failed write has nowhere to be reported; the next batch tries again.
                    let _ = out.write_all(&spare);
                    if dropped > 0 {
                        let _ = writeln!(
                            out,
                            "postern: {dropped} log lines dropped while stderr was not being read"
                        );
                    }
                    let _ = out.flush();
                    spare.clear();
                    if stopping {
                        let rest = std::mem::take(&mut worker.lock().bytes);
                        let _ = out.write_all(&rest);
                        let _ = out.flush();
                        return;
                    }
                }
            })
            .ok();
        (
            Self {
                shared: shared.clone(),
            },
            LogGuard { shared, thread },
        )
    }
}

impl LogBuffer {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Write for BatchedStderr {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut pending = self.shared.lock();
        if pending.bytes.len() + line.len() > self.shared.limit {
            pending.dropped += 1;
            return Ok(line.len());
        }
        let was_empty = pending.bytes.is_empty();
        pending.bytes.extend_from_slice(line);
        drop(pending);
        if was_empty {
            self.shared.ready.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchedStderr {
    type Writer = BatchedStderr;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.ready.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn install(config: &LogConfig, writer: BoxMakeWriter) {
    let filter = std::env::var(LOG_ENV)
        .ok()
        .and_then(|level| filter_for(&LogConfig { level }).ok())
        .or_else(|| filter_for(config).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    // try_init fails only when a subscriber is already installed, which is fine.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .event_format(LineFormat {
            timestamps: !under_journald,
        })
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output that records each write it gets, and can be made to block.
    #[derive(Clone, Default)]
    struct Recorder {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            self.writes.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Recorder {
        fn text(&self) -> String {
            String::from_utf8(self.writes.lock().unwrap().concat()).unwrap()
        }
    }

    #[test]
    fn lines_go_out_in_order_batched_and_all_of_them_at_the_end() {
        let out = Recorder::default();
        let (writer, guard) = BatchedStderr::start(out.clone(), Duration::from_millis(50), 1 << 20);
        let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        for i in 0..1000 {
            writer
                .make_writer()
                .write_all(format!("line {i}\n").as_bytes())
                .unwrap();
        }
        drop(guard);
        assert_eq!(out.text(), expected);
        let writes = out.writes.lock().unwrap().len();
        assert!(writes <= 4, "{writes} writes for 1000 lines");
    }

    #[test]
    fn a_blocked_output_drops_lines_beyond_the_limit_and_says_how_many() {
        let out = Recorder::default();
        let gate = out.gate.lock().unwrap();
        let (writer, guard) = BatchedStderr::start(out.clone(), Duration::from_millis(1), 100);
        writer.make_writer().write_all(b"first\n").unwrap();
        // The log thread takes "first" and then blocks writing it.
        std::thread::sleep(Duration::from_millis(100));
        let started = std::time::Instant::now();
        for _ in 0..50 {
            writer.make_writer().write_all(b"0123456789\n").unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(1), "logging waited");
        drop(gate);
        drop(guard);
        let text = out.text();
        assert!(text.starts_with("first\n"), "{text}");
        assert_eq!(text.matches("0123456789").count(), 9, "{text}");
        assert!(
            text.contains("postern: 41 log lines dropped while stderr was not being read"),
            "{text}"
        );
    }

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
