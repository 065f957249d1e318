//! Our daemons as child processes: started from the built binaries with a config written to a
//! temporary directory, on ports picked by the test, with their log captured for assertions.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The directory holding the built binaries (`target/<profile>`), or `POSTERN_BIN_DIR`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("POSTERN_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The path of a built binary (`postern-policyd`, `test-dns`, ...).
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// A free TCP port on 127.0.0.1 (bound, read, released: good enough for tests on loopback).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A running daemon; killed when dropped.
pub struct DaemonProcess {
    child: Child,
    /// Its temporary directory (config, log, state).
    pub dir: tempfile::TempDir,
    log_path: PathBuf,
    /// The config file it was started with.
    pub config_path: PathBuf,
}

impl DaemonProcess {
    /// Starts `postern-<daemon>` with `config` (TOML; `@STATE@` is replaced by a state directory
    /// inside the temp dir) and waits until every port in `ports` accepts connections.
    pub fn start(daemon: &str, config: &str, ports: &[u16]) -> anyhow::Result<Self> {
        Self::start_with_args(daemon, config, ports, &[])
    }

    /// As [`start`](Self::start), with extra command-line arguments.
    pub fn start_with_args(
        daemon: &str,
        config: &str,
        ports: &[u16],
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("postern-{daemon}-"))
            .tempdir()?;
        let state = dir.path().join("state");
        let config_path = dir.path().join(format!("{daemon}.toml"));
        std::fs::write(
            &config_path,
            config.replace("@STATE@", &state.display().to_string()),
        )?;
        let log_path = dir.path().join("daemon.log");
        let log = std::fs::File::create(&log_path)?;
        let binary = bin(&format!("postern-{daemon}"));
        anyhow::ensure!(
            binary.exists(),
            "{} not built (run cargo build --workspace --bins first)",
            binary.display()
        );
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&config_path)
            .args(args)
            .env("POSTERN_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut process = Self {
            child,
            dir,
            log_path,
            config_path,
        };
        process.wait_ports(ports, Duration::from_secs(15))?;
        Ok(process)
    }

    fn wait_ports(&mut self, ports: &[u16], timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for &port in ports {
            loop {
                if let Some(status) = self.child.try_wait()? {
                    anyhow::bail!(
                        "daemon exited with {status} before listening; log:\n{}",
                        self.log()
                    );
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "daemon not listening on {port} after {timeout:?}; log:\n{}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits (bounded) until its log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        self.wait_log_count(needle, 1, timeout)
    }

    /// Waits (bounded) until its log contains `needle` at least `count` times. The log thread
    /// writes in batches, so lines from two requests may reach the file in two writes.
    pub fn wait_log_count(
        &self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.log().matches(needle).count() < count {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{needle:?} not logged {count} times within {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name ("TERM", "HUP", "KILL").
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg("-s")
            .arg(name)
            .arg(self.pid().to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -s {name} failed");
        Ok(())
    }

    /// Waits (bounded) for it to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "daemon still running after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
