//! postern-milter's configuration (`/etc/postern/milter.toml`).

use std::path::{Path, PathBuf};

use postern_common::config::{
    ConfigDuration, ConfigError, DaemonConfig, DnsConfig, LogConfig, MetricsConfig,
};
use postern_common::listen::ListenSpec;
use serde::{Deserialize, Serialize};

use crate::dkim::DkimConfig;
use crate::dmarc::DmarcConfig;

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MilterConfig {
    /// Where the report store and other state live.
    pub state_dir: PathBuf,
    /// Where to listen: opendkim's `inet:127.0.0.1:8891` by default; also `inet:8891@127.0.0.1`,
    /// `unix:/path`, `local:/path`.
    pub listen: ListenSpec,
    /// Mode of a unix: socket, octal.
    pub socket_mode: String,
    /// Our name in Authentication-Results headers (opendkim/opendmarc AuthservID). Empty: the
    /// host name.
    pub authserv_id: String,
    /// MTA connections served at once.
    pub max_connections: usize,
    /// An MTA connection silent this long is closed (libmilter's default is 7210 s).
    pub connection_timeout: ConfigDuration,
    /// Threads serving connections; 0: one per CPU core. Each MTA connection is a chain of
    /// short exchanges, and on a machine whose cores are busy with Postfix itself one thread
    /// answers with less latency (no hand-offs between threads); RSA signing at high
    /// concurrency wants the cores. Read at start only.
    pub worker_threads: usize,
    /// DKIM signing and verification (opendkim's options).
    pub dkim: DkimConfig,
    /// DMARC evaluation and aggregate reports (opendmarc's options).
    pub dmarc: DmarcConfig,
    /// DNS resolver.
    pub dns: DnsConfig,
    /// Logging.
    pub log: LogConfig,
    /// Prometheus endpoint.
    pub metrics: MetricsConfig,
}

impl Default for MilterConfig {
    fn default() -> Self {
        Self {
            state_dir: Self::default_state_dir(),
            listen: ListenSpec::Inet {
                host: "127.0.0.1".to_owned(),
                port: 8891,
            },
            socket_mode: "0660".to_owned(),
            authserv_id: String::new(),
            max_connections: 100,
            connection_timeout: ConfigDuration::from_secs(7210),
            worker_threads: 0,
            dkim: DkimConfig::default(),
            dmarc: DmarcConfig::default(),
            dns: DnsConfig::default(),
            log: LogConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

impl MilterConfig {
    /// `socket_mode` as a number.
    pub fn socket_mode_bits(&self) -> Result<u32, ConfigError> {
        postern_common::config::parse_socket_mode("socket_mode", &self.socket_mode)
    }

    /// `authserv_id`, or the host name when unset.
    pub fn effective_authserv_id(&self) -> String {
        if !self.authserv_id.trim().is_empty() {
            return self.authserv_id.trim().to_owned();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_owned())
            .ok()
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "localhost".to_owned())
    }
}

impl DaemonConfig for MilterConfig {
    const DAEMON: &'static str = "milter";

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
    fn worker_threads(&self) -> usize {
        self.worker_threads
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.socket_mode_bits()?;
        self.dkim.validate()?;
        self.dmarc.validate()?;
        if self.max_connections == 0 {
            return Err(ConfigError::invalid(
                "max_connections",
                "must be at least 1",
            ));
        }
        if self.authserv_id.contains([';', ' ', '\t', '\n']) {
            return Err(ConfigError::invalid(
                "authserv_id",
                "must be a single token (no spaces or ';')",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_opendkim_socket_forms() {
        let config = MilterConfig::default();
        assert_eq!(config.listen.to_string(), "inet:127.0.0.1:8891");
        config.validate().unwrap();
        let config: MilterConfig =
            toml::from_str("listen = \"inet:8891@127.0.0.1\"\nauthserv_id = \"mx.example.net\"\n")
                .unwrap();
        assert_eq!(config.listen.to_string(), "inet:127.0.0.1:8891");
        assert_eq!(config.effective_authserv_id(), "mx.example.net");
        assert!(!MilterConfig::default().effective_authserv_id().is_empty());
        let bad = MilterConfig {
            authserv_id: "a; b".into(),
            ..MilterConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("authserv_id")
        );
    }
}
