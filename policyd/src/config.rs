//! postern-policyd's configuration (`/etc/postern/policyd.toml`).

use std::path::{Path, PathBuf};

use postern_common::config::{
    ConfigDuration, ConfigError, DaemonConfig, DnsConfig, LogConfig, MetricsConfig,
};
use postern_common::listen::ListenSpec;
use serde::{Deserialize, Serialize};

use crate::greylist::GreylistConfig;
use crate::spf::SpfConfig;

/// A policy check a listener can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Check {
    /// Greylisting, as postgrey.
    Greylist,
    /// SPF, as policyd-spf.
    Spf,
}

impl Check {
    /// The name used in the config and in Postfix's `policy_context`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Greylist => "greylist",
            Self::Spf => "spf",
        }
    }
}

/// One `[[listen]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Where to listen: "inet:127.0.0.1:10023", "unix:/var/spool/postfix/private/postern".
    pub address: ListenSpec,
    /// The checks a request runs when it carries no `policy_context` attribute ("greylist",
    /// "spf"); a request with `policy_context=greylist` or `policy_context=spf` runs that check
    /// whatever is listed here.
    #[serde(default = "default_checks")]
    pub checks: Vec<Check>,
}

fn default_checks() -> Vec<Check> {
    vec![Check::Greylist]
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicydConfig {
    /// Where the embedded greylist database lives.
    pub state_dir: PathBuf,
    /// Connections served at once, over all listeners; more wait in the listen backlog.
    pub max_connections: usize,
    /// A connection idle this long is closed (Postfix itself drops idle policy connections
    /// after smtpd_policy_service_max_idle = 300 s).
    pub idle_timeout: ConfigDuration,
    /// Threads serving requests; 0 means one per CPU core. One thread answers far more
    /// requests than a Postfix sends (about 55 000 SPF or known-triplet requests a second here)
    /// and leaves the other cores to Postfix, without waking threads across cores for each
    /// request (the SQLite store writes on threads of its own). Read at start only.
    pub worker_threads: usize,
    /// Mode of unix: listener sockets, as an octal string.
    pub socket_mode: String,
    /// The listeners. Default: postgrey's `inet:127.0.0.1:10023`, greylisting.
    pub listen: Vec<ListenerConfig>,
    /// DNS resolver.
    pub dns: DnsConfig,
    /// Logging.
    pub log: LogConfig,
    /// Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// Greylisting (postgrey's settings).
    pub greylist: GreylistConfig,
    /// SPF checks (policyd-spf's settings).
    pub spf: SpfConfig,
}

impl Default for PolicydConfig {
    fn default() -> Self {
        Self {
            state_dir: Self::default_state_dir(),
            max_connections: 1000,
            idle_timeout: ConfigDuration::from_secs(330),
            worker_threads: 1,
            socket_mode: "0660".to_owned(),
            listen: vec![ListenerConfig {
                address: ListenSpec::Inet {
                    host: "127.0.0.1".to_owned(),
                    port: 10023,
                },
                checks: default_checks(),
            }],
            dns: DnsConfig::default(),
            log: LogConfig::default(),
            metrics: MetricsConfig::default(),
            greylist: GreylistConfig::default(),
            spf: SpfConfig::default(),
        }
    }
}

impl PolicydConfig {
    /// `socket_mode` as a number.
    pub fn socket_mode_bits(&self) -> Result<u32, ConfigError> {
        postern_common::config::parse_socket_mode("socket_mode", &self.socket_mode)
    }
}

impl DaemonConfig for PolicydConfig {
    const DAEMON: &'static str = "policyd";

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
        self.greylist.validate(&self.state_dir)?;
        if self.max_connections == 0 {
            return Err(ConfigError::invalid(
                "max_connections",
                "must be at least 1",
            ));
        }
        if self.idle_timeout.get().is_zero() {
            return Err(ConfigError::invalid(
                "idle_timeout",
                "must be more than zero",
            ));
        }
        for (index, listener) in self.listen.iter().enumerate() {
            if listener.checks.is_empty() {
                return Err(ConfigError::invalid(
                    format!("listen[{index}].checks"),
                    "must name at least one check",
                ));
            }
            if self.listen[..index]
                .iter()
                .any(|other| other.address == listener.address)
            {
                return Err(ConfigError::invalid(
                    format!("listen[{index}].address"),
                    format!("{} is listed twice", listener.address),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_postgreys_port_and_greylisting() {
        let config = PolicydConfig::default();
        assert_eq!(config.listen[0].address.to_string(), "inet:127.0.0.1:10023");
        assert_eq!(config.listen[0].checks, vec![Check::Greylist]);
        config.validate().unwrap();
    }

    #[test]
    fn listeners_with_checks_parse() {
        let config: PolicydConfig = toml::from_str(
            "[[listen]]\naddress = \"inet:127.0.0.1:10023\"\n[[listen]]\naddress = \"unix:/run/p.sock\"\nchecks = [\"spf\", \"greylist\"]\n",
        )
        .unwrap();
        assert_eq!(config.listen.len(), 2);
        assert_eq!(config.listen[0].checks, vec![Check::Greylist]);
        assert_eq!(config.listen[1].checks, vec![Check::Spf, Check::Greylist]);
        config.validate().unwrap();
        assert!(
            toml::from_str::<PolicydConfig>(
                "[[listen]]\naddress = \"inet:1.2.3.4:1\"\nchecks = [\"rbl\"]\n"
            )
            .is_err()
        );
    }

    #[test]
    fn greylist_table_parses_and_refuses_unknown_keys() {
        let config: PolicydConfig = toml::from_str(
            "[greylist]\ndelay = \"2m\"\nmax_age = 3024000\nretry_window = \"12h\"\n\
             auto_whitelist_clients = 0\nstore = \"redis://127.0.0.1:6379/1\"\n\
             whitelist_clients = [\"/etc/postgrey/whitelist_clients\"]\n",
        )
        .unwrap();
        assert_eq!(config.greylist.delay.as_secs(), 120);
        assert_eq!(config.greylist.max_age.as_secs(), 35 * 86_400);
        assert_eq!(config.greylist.retry_window.as_secs(), 12 * 3600);
        config.validate().unwrap();
        assert!(toml::from_str::<PolicydConfig>("[greylist]\ndelai = 300\n").is_err());
        let bad: PolicydConfig = toml::from_str("[greylist]\nstore = \"mysql://db\"\n").unwrap();
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("greylist.store")
        );
        let bad: PolicydConfig = toml::from_str("[greylist]\nipv4_cidr = 33\n").unwrap();
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("greylist.ipv4_cidr")
        );
    }

    #[test]
    fn bad_values_are_named() {
        let config = PolicydConfig {
            socket_mode: "rw".into(),
            ..PolicydConfig::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("socket_mode")
        );
        let mut config = PolicydConfig::default();
        config.listen.push(config.listen[0].clone());
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("listen[1].address")
        );
    }
}
