//! The life cycle every daemon shares: load the config, build the live state, start logging,
//! metrics and the state directory, then serve until SIGTERM/SIGINT, rebuilding the state on
//! SIGHUP (a bad new config is logged and the old state kept).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::cli::CommonArgs;
use crate::config::{self, ConfigError, DaemonConfig};
use crate::exit::{EX_CONFIG, EX_OK, EX_RUNTIME};

/// A daemon's live state, built from its config: loaded keys, tables, whitelists, secrets.
pub trait Daemon: Sized + Send + Sync + 'static {
    /// The config it is built from.
    type Config: DaemonConfig;

    /// Builds the state. Fails start and `--check-config` with exit 78; on SIGHUP a failure keeps
    /// the old state.
    fn build(config: Arc<Self::Config>) -> Result<Self, ConfigError>;

    /// The keys that differ between `old` and `new` and take effect only after a restart
    /// (listen addresses, for example); a reload warns about each.
    fn restart_needed(old: &Self::Config, new: &Self::Config) -> Vec<&'static str> {
        let _ = (old, new);
        Vec::new()
    }
}

/// What the serving code gets.
pub struct DaemonContext<D: Daemon> {
    /// The current state; replaced on each successful reload.
    pub live: watch::Receiver<Arc<D>>,
    /// The config the daemon started with (listen addresses and other restart-only keys).
    pub config: Arc<D::Config>,
    /// Cancelled on SIGTERM or SIGINT.
    pub shutdown: CancellationToken,
    /// The config file read at start, if any.
    pub config_path: Option<PathBuf>,
}

/// A loaded config, the state built from it, and the file it came from (`None`: defaults).
pub type Loaded<D> = (Arc<<D as Daemon>::Config>, D, Option<PathBuf>);

/// Loads and builds from `path` (or the default file / built-in defaults when `None`).
pub fn load_and_build<D: Daemon>(path: Option<&Path>) -> Result<Loaded<D>, ConfigError> {
    let (config, used) = config::load_path::<D::Config>(path)?;
    build::<D>(config, used)
}

/// Builds the daemon's state from a loaded config (`used`: the file it came from, for errors).
fn build<D: Daemon>(config: D::Config, used: Option<PathBuf>) -> Result<Loaded<D>, ConfigError> {
    let config = Arc::new(config);
    ensure_state_dir(config.state_dir()).map_err(|e| e.in_file(used.as_deref()))?;
    let daemon = D::build(config.clone()).map_err(|e| e.in_file(used.as_deref()))?;
    Ok((config, daemon, used))
}

/// For one-shot subcommands (`reports send`, `dns-check`, ...): a single-threaded runtime, and the
/// config and state built inside its context (state may hold lazily connected pools, which need
/// one). On failure the message is printed and the exit code (78 or 1) returned.
pub fn load_for_command<D: Daemon>(
    path: Option<&Path>,
) -> Result<(tokio::runtime::Runtime, Loaded<D>), ExitCode> {
    let program = format!("postern-{}", D::Config::DAEMON);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| {
            eprintln!("{program}: cannot start the runtime: {err}");
            ExitCode::from(EX_RUNTIME)
        })?;
    let loaded = {
        let _context = runtime.enter();
        load_and_build::<D>(path)
    };
    match loaded {
        Ok(loaded) => Ok((runtime, loaded)),
        Err(err) => {
            eprintln!("{program}: {err}");
            Err(ExitCode::from(EX_CONFIG))
        }
    }
}

/// Creates the state directory if missing (mode 0750) and checks that it is writable.
pub fn ensure_state_dir(dir: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::DirBuilderExt;
    let fail = |what: &str, err: std::io::Error| {
        ConfigError::invalid("state_dir", format!("{}: {what}: {err}", dir.display()))
    };
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|e| fail("cannot create", e))?;
    }
    let probe = dir.join(format!(".postern-write-test.{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| fail("not writable", e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Runs a daemon: the whole life cycle, returning the process exit code.
pub fn run<D, F, Fut>(args: &CommonArgs, serve: F) -> ExitCode
where
    D: Daemon,
    F: FnOnce(DaemonContext<D>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let program = format!("postern-{}", D::Config::DAEMON);
    // The file is read once; the runtime, sized by it, comes before the state is built, since
    // building may set up pools that need the runtime's context.
    let parsed = config::load_path::<D::Config>(args.config.as_deref());
    let threads = parsed
        .as_ref()
        .map_or(0, |(config, _)| config.worker_threads());
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("{program}: cannot start the runtime: {err}");
            return ExitCode::from(EX_RUNTIME);
        }
    };
    let loaded = parsed.and_then(|(config, used)| {
        let _context = runtime.enter();
        build::<D>(config, used)
    });
    let (config, daemon, used) = match loaded {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("{program}: {err}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    if args.check_config {
        let source = used.as_ref().map_or_else(
            || "built-in defaults".to_owned(),
            |p| p.display().to_string(),
        );
        match toml::to_string(&*config) {
            Ok(text) => {
                println!("# {program}: configuration OK ({source})\n{text}");
                return ExitCode::from(EX_OK);
            }
            Err(err) => {
                eprintln!("{program}: cannot print the configuration: {err}");
                return ExitCode::from(EX_CONFIG);
            }
        }
    }
    let log_guard = crate::logging::init_daemon(config.log());
    let code = runtime.block_on(async move {
        if let Err(err) = crate::metrics::install(config.metrics(), D::Config::DAEMON) {
            error!("{err}");
            return EX_RUNTIME;
        }
        let shutdown = CancellationToken::new();
        let (live_tx, live_rx) = watch::channel(Arc::new(daemon));
        let signals = match spawn_signal_handler::<D>(
            shutdown.clone(),
            live_tx,
            config.clone(),
            used.clone(),
        ) {
            Ok(handle) => handle,
            Err(err) => {
                error!("cannot install signal handlers: {err}");
                return EX_RUNTIME;
            }
        };
        info!(
            version = env!("CARGO_PKG_VERSION"),
            config = %used.as_ref().map_or_else(|| "built-in defaults".to_owned(), |p| p.display().to_string()),
            "{program} starting"
        );
        let ctx = DaemonContext {
            live: live_rx,
            config,
            shutdown: shutdown.clone(),
            config_path: used,
        };
        let result = serve(ctx).await;
        signals.abort();
        match result {
            Ok(()) => {
                info!("{program} stopped");
                EX_OK
            }
            Err(err) => {
                error!("{err:#}");
                EX_RUNTIME
            }
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    // The last lines ("stopped") reach stderr before the process exits.
    drop(log_guard);
    ExitCode::from(code)
}

fn spawn_signal_handler<D: Daemon>(
    shutdown: CancellationToken,
    live: watch::Sender<Arc<D>>,
    mut current: Arc<D::Config>,
    path: Option<PathBuf>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {
                    current = reload::<D>(&live, current, path.as_deref());
                    continue;
                }
            }
            if shutdown.is_cancelled() {
                // Straight to stderr: the log thread's queue is not flushed by exit().
                eprintln!("second stop signal: exiting at once");
                std::process::exit(i32::from(EX_RUNTIME));
            }
            info!("stop signal received: finishing open requests");
            shutdown.cancel();
        }
    }))
}

/// One SIGHUP: rebuild from the same file; keep the old state when anything fails.
fn reload<D: Daemon>(
    live: &watch::Sender<Arc<D>>,
    current: Arc<D::Config>,
    path: Option<&Path>,
) -> Arc<D::Config> {
    match load_and_build::<D>(path) {
        Ok((config, daemon, used)) => {
            for key in D::restart_needed(&current, &config) {
                warn!(key, "changed; restart needed for it to take effect");
            }
            if config.log() != current.log() {
                warn!(key = "log", "changed; restart needed for it to take effect");
            }
            if config.metrics() != current.metrics() {
                warn!(
                    key = "metrics",
                    "changed; restart needed for it to take effect"
                );
            }
            live.send_replace(Arc::new(daemon));
            info!(
                config = %used.as_ref().map_or_else(|| "built-in defaults".to_owned(), |p| p.display().to_string()),
                "configuration reloaded"
            );
            config
        }
        Err(err) => {
            error!("reload failed, keeping the running configuration: {err}");
            current
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DnsConfig, LogConfig, MetricsConfig};
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Conf {
        state_dir: PathBuf,
        dns: DnsConfig,
        log: LogConfig,
        metrics: MetricsConfig,
        word: String,
    }

    impl Default for Conf {
        fn default() -> Self {
            Self {
                state_dir: std::env::temp_dir().join("postern-daemon-test"),
                dns: DnsConfig::default(),
                log: LogConfig::default(),
                metrics: MetricsConfig::default(),
                word: "hello".into(),
            }
        }
    }

    impl DaemonConfig for Conf {
        const DAEMON: &'static str = "testd";
        fn state_dir(&self) -> &Path {
            &self.state_dir
        }
        fn dns(&self) -> &DnsConfig {
            &self.dns
        }
        fn log(&self) -> &LogConfig {
            &self.log
        }
        fn metrics(&self) -> &MetricsConfig {
            &self.metrics
        }
    }

    struct Live {
        word: String,
    }

    impl Daemon for Live {
        type Config = Conf;
        fn build(config: Arc<Conf>) -> Result<Self, ConfigError> {
            if config.word == "bad" {
                return Err(ConfigError::invalid("word", "must not be bad"));
            }
            Ok(Self {
                word: config.word.clone(),
            })
        }
    }

    #[test]
    fn reload_replaces_good_state_and_keeps_old_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("testd.toml");
        let state = dir.path().join("state");
        let write = |word: &str| {
            std::fs::write(
                &path,
                format!(
                    "state_dir = {:?}\nword = {word:?}\n",
                    state.display().to_string()
                ),
            )
            .unwrap();
        };
        write("one");
        let (config, daemon, _) = load_and_build::<Live>(Some(&path)).unwrap();
        assert!(state.is_dir(), "state_dir is created");
        let (tx, rx) = watch::channel(Arc::new(daemon));
        write("two");
        let config = reload::<Live>(&tx, config, Some(&path));
        assert_eq!(rx.borrow().word, "two");
        write("bad");
        let config = reload::<Live>(&tx, config, Some(&path));
        assert_eq!(rx.borrow().word, "two");
        assert_eq!(config.word, "two");
        std::fs::write(&path, "word = \"x\"\nunknown = 1\n").unwrap();
        reload::<Live>(&tx, config, Some(&path));
        assert_eq!(rx.borrow().word, "two");
    }

    #[test]
    fn unwritable_state_dir_is_a_clear_config_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"").unwrap();
        let err = ensure_state_dir(&file.join("sub")).unwrap_err().to_string();
        assert!(err.contains("key `state_dir`"), "{err}");
        assert!(err.contains("plain-file/sub"), "{err}");
    }
}
