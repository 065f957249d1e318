//! postern-srsd's configuration (`/etc/postern/srsd.toml`), with postsrsd's settings under
//! their postsrsd 2.x names in snake case.

use std::path::{Path, PathBuf};

use postern_common::config::{
    ConfigDuration, ConfigError, DaemonConfig, DnsConfig, LogConfig, MetricsConfig,
};
use postern_common::listen::ListenSpec;
use serde::{Deserialize, Serialize};

use crate::srs::HashAlphabet;

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SrsdConfig {
    /// Where the generated secrets file lives when `secrets_file` is not set.
    pub state_dir: PathBuf,
    /// The domain SRS addresses are written in (postsrsd `srs-domain`, 1.x `SRS_DOMAIN`);
    /// it counts as local. Empty: the mail name from /etc/mailname.
    pub srs_domain: String,
    /// Local domains, never rewritten; a leading dot means subdomains only (postsrsd
    /// `domains`, 1.x `SRS_EXCLUDE_DOMAINS`).
    pub domains: Vec<String>,
    /// A file of further local domains, one per line, `#` comments; re-read on SIGHUP and
    /// when it changes.
    pub domains_file: Option<PathBuf>,
    /// The character after SRS0/SRS1 in new addresses: "=", "+" or "-".
    pub separator: String,
    /// Hash characters written (1 to 20).
    pub hash_length: usize,
    /// Fewest hash characters accepted on reverse.
    pub hash_minimum: usize,
    /// One secret per line; the first signs, all verify. Unset: `<state_dir>/srs.secret`,
    /// generated at first start. Refused when readable by group or others.
    pub secrets_file: Option<PathBuf>,
    /// Rewrite senders in local domains too.
    pub always_rewrite: bool,
    /// "base64url" (postsrsd 2.2.6 and later) or "base64" (1.x, 2.x up to 2.2.5).
    pub hash_alphabet: HashAlphabet,
    /// "embedded" (the sender is inside the SRS address, as always) or "database" (postsrsd
    /// 2.x `original-envelope = database`: the sender is stored and the address carries a
    /// 32-character key, so long senders stay within 64 octets).
    pub original_envelope: OriginalEnvelope,
    /// The store for "database" mode: "sqlite:PATH" or "redis://HOST:PORT" (several MX hosts
    /// share it). Empty: sqlite under state_dir.
    pub envelope_database: String,
    /// tcp_table forward map (sender_canonical_maps = tcp:127.0.0.1:10001); "off" disables it.
    #[serde(with = "optional_listen")]
    pub forward_listen: Option<ListenSpec>,
    /// tcp_table reverse map (recipient_canonical_maps = tcp:127.0.0.1:10002); "off" disables it.
    #[serde(with = "optional_listen")]
    pub reverse_listen: Option<ListenSpec>,
    /// socketmap with maps "forward" and "reverse"; "off" unless set (postsrsd 2.x uses
    /// "unix:/var/spool/postfix/srs").
    #[serde(with = "optional_listen")]
    pub socketmap_listen: Option<ListenSpec>,
    /// Mode of unix: sockets, octal.
    pub socket_mode: String,
    /// Connections served at once, over all listeners.
    pub max_connections: usize,
    /// An idle connection is closed after this long.
    pub idle_timeout: ConfigDuration,
    /// Threads serving lookups; 0 means one per CPU core. One thread answers far more lookups
    /// than a Postfix sends (about 90 000 a second here) and leaves the other cores to Postfix,
    /// without waking threads across cores for each lookup.
    pub worker_threads: usize,
    /// DNS resolver (unused by SRS; accepted for uniformity).
    pub dns: DnsConfig,
    /// Logging.
    pub log: LogConfig,
    /// Prometheus endpoint.
    pub metrics: MetricsConfig,
}

impl Default for SrsdConfig {
    fn default() -> Self {
        let inet = |port| {
            Some(ListenSpec::Inet {
                host: "127.0.0.1".to_owned(),
                port,
            })
        };
        Self {
            state_dir: Self::default_state_dir(),
            srs_domain: String::new(),
            domains: Vec::new(),
            domains_file: None,
            separator: "=".to_owned(),
            hash_length: 4,
            hash_minimum: 4,
            secrets_file: None,
            always_rewrite: false,
            original_envelope: OriginalEnvelope::Embedded,
            envelope_database: String::new(),
            hash_alphabet: HashAlphabet::Base64url,
            forward_listen: inet(10001),
            reverse_listen: inet(10002),
            socketmap_listen: None,
            socket_mode: "0660".to_owned(),
            max_connections: 1000,
            idle_timeout: ConfigDuration::from_secs(330),
            worker_threads: 1,
            dns: DnsConfig::default(),
            log: LogConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

/// Where the original sender lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OriginalEnvelope {
    /// Inside the SRS address.
    #[default]
    Embedded,
    /// In the envelope database, under a key the SRS address carries.
    Database,
}

impl SrsdConfig {
    /// The envelope database URL actually used.
    pub fn effective_envelope_database(&self) -> String {
        if self.envelope_database.trim().is_empty() {
            format!("sqlite:{}", self.state_dir.join("envelopes.db").display())
        } else {
            self.envelope_database.trim().to_owned()
        }
    }

    /// `separator` as a character.
    pub fn separator_char(&self) -> Result<char, ConfigError> {
        match self.separator.as_str() {
            "=" => Ok('='),
            "+" => Ok('+'),
            "-" => Ok('-'),
            other => Err(ConfigError::invalid(
                "separator",
                format!("{other:?}: expected \"=\", \"+\" or \"-\""),
            )),
        }
    }

    /// `socket_mode` as a number.
    pub fn socket_mode_bits(&self) -> Result<u32, ConfigError> {
        postern_common::config::parse_socket_mode("socket_mode", &self.socket_mode)
    }

    /// The SRS domain: configured, else /etc/mailname.
    pub fn effective_srs_domain(&self) -> Result<String, ConfigError> {
        if !self.srs_domain.trim().is_empty() {
            return Ok(self.srs_domain.trim().to_ascii_lowercase());
        }
        std::fs::read_to_string("/etc/mailname")
            .ok()
            .map(|name| name.trim().to_ascii_lowercase())
            .filter(|name| name.contains('.'))
            .ok_or_else(|| {
                ConfigError::invalid(
                    "srs_domain",
                    "not set, and /etc/mailname names no domain: set srs_domain = \"your.domain\"",
                )
            })
    }

    /// The secrets file actually used.
    pub fn effective_secrets_file(&self) -> PathBuf {
        self.secrets_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("srs.secret"))
    }
}

impl DaemonConfig for SrsdConfig {
    const DAEMON: &'static str = "srsd";

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
        self.separator_char()?;
        self.socket_mode_bits()?;
        if !(1..=20).contains(&self.hash_length) {
            return Err(ConfigError::invalid(
                "hash_length",
                "must be between 1 and 20",
            ));
        }
        if self.hash_minimum == 0 || self.hash_minimum > self.hash_length {
            return Err(ConfigError::invalid(
                "hash_minimum",
                "must be between 1 and hash_length",
            ));
        }
        if self.forward_listen.is_none()
            && self.reverse_listen.is_none()
            && self.socketmap_listen.is_none()
        {
            return Err(ConfigError::invalid(
                "forward_listen",
                "no listener configured (forward_listen, reverse_listen, socketmap_listen)",
            ));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::invalid(
                "max_connections",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// A listener that can be switched off: "off" (or "") in TOML, since TOML has no null.
mod optional_listen {
    use postern_common::listen::ListenSpec;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        value: &Option<ListenSpec>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(spec) => serializer.collect_str(spec),
            None => serializer.serialize_str("off"),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<ListenSpec>, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.trim() {
            "" | "off" | "none" => Ok(None),
            spec => spec.parse().map(Some).map_err(serde::de::Error::custom),
        }
    }
}

/// Converts postsrsd's settings — `/etc/default/postsrsd` (1.x, shell variables) or
/// `postsrsd.conf` (2.x, libConfuse) — into srsd.toml text.
pub fn import_postsrsd(text: &str) -> Result<String, String> {
    let mut config = SrsdConfig {
        srs_domain: String::new(),
        ..SrsdConfig::default()
    };
    let mut notes = Vec::new();
    for raw in text.lines() {
        let line = raw.split('#').next().unwrap_or("").trim();
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim().trim_start_matches("export ").trim();
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'').trim();
        let list = || -> Vec<String> {
            value
                .trim_matches(|c| c == '{' || c == '}')
                .split([',', ' '])
                .map(|d| d.trim().trim_matches('"').to_owned())
                .filter(|d| !d.is_empty())
                .collect()
        };
        let number = || {
            value
                .parse::<usize>()
                .map_err(|_| format!("{key}: {value:?} is not a number"))
        };
        let listen = |port: &str| -> Result<Option<ListenSpec>, String> {
            let spec = if port.parse::<u16>().is_ok() {
                format!("inet:127.0.0.1:{port}")
            } else {
                port.to_owned()
            };
            spec.parse().map(Some).map_err(|e| format!("{key}: {e}"))
        };
        match key {
            "SRS_DOMAIN" | "srs-domain" => config.srs_domain = value.to_owned(),
            "SRS_EXCLUDE_DOMAINS" | "domains" => config.domains = list(),
            "domains-file" => config.domains_file = Some(value.into()),
            "SRS_SEPARATOR" | "separator" => config.separator = value.to_owned(),
            "SRS_HASHLENGTH" | "hash-length" => config.hash_length = number()?,
            "SRS_HASHMIN" | "hash-minimum" => config.hash_minimum = number()?,
            "SRS_SECRET" | "secrets-file" => config.secrets_file = Some(value.into()),
            "SRS_FORWARD_PORT" => config.forward_listen = listen(value)?,
            "SRS_REVERSE_PORT" => config.reverse_listen = listen(value)?,
            "socketmap" => {
                config.socketmap_listen = listen(value)?;
                config.forward_listen = None;
                config.reverse_listen = None;
            }
            "original-envelope" => {
                config.original_envelope = if value == "database" {
                    OriginalEnvelope::Database
                } else {
                    OriginalEnvelope::Embedded
                }
            }
            "envelope-database" => {
                // postsrsd writes "sqlite:./file" or "redis:host:port".
                config.envelope_database = match value.strip_prefix("redis:") {
                    Some(rest) if !rest.starts_with("//") => format!("redis://{rest}"),
                    _ => value.to_owned(),
                };
            }
            "always-rewrite" => config.always_rewrite = matches!(value, "on" | "true" | "yes"),
            other => notes.push(format!("# not converted: {other} = {value}")),
        }
    }
    // 1.x writes base64 hashes; 2.x since 2.2.6 base64url. Verification accepts both either way.
    if text.contains("SRS_") {
        config.hash_alphabet = HashAlphabet::Base64;
    }
    config.validate().map_err(|e| e.to_string())?;
    let mut out =
        String::from("# converted from postsrsd settings by postern-srsd import-postsrsd\n");
    for note in notes {
        out.push_str(&note);
        out.push('\n');
    }
    out.push_str(&toml::to_string(&config).map_err(|e| e.to_string())?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_postsrsd_1x_ports() {
        let config = SrsdConfig::default();
        assert_eq!(
            config.forward_listen.as_ref().unwrap().to_string(),
            "inet:127.0.0.1:10001"
        );
        assert_eq!(
            config.reverse_listen.as_ref().unwrap().to_string(),
            "inet:127.0.0.1:10002"
        );
        assert!(config.socketmap_listen.is_none());
        config.validate().unwrap();
    }

    #[test]
    fn bad_settings_are_named() {
        for (config, key) in [
            (
                SrsdConfig {
                    separator: "/".into(),
                    ..SrsdConfig::default()
                },
                "separator",
            ),
            (
                SrsdConfig {
                    hash_length: 21,
                    ..SrsdConfig::default()
                },
                "hash_length",
            ),
            (
                SrsdConfig {
                    hash_minimum: 5,
                    ..SrsdConfig::default()
                },
                "hash_minimum",
            ),
            (
                SrsdConfig {
                    forward_listen: None,
                    reverse_listen: None,
                    ..SrsdConfig::default()
                },
                "forward_listen",
            ),
        ] {
            assert!(
                config.validate().unwrap_err().to_string().contains(key),
                "{key}"
            );
        }
        assert!(toml::from_str::<SrsdConfig>("hash_alphabet = \"base32\"").is_err());
    }

    #[test]
    fn imports_debian_default_file_and_postsrsd_conf() {
        let debian = "# /etc/default/postsrsd\nSRS_DOMAIN=example.com\nSRS_EXCLUDE_DOMAINS=.example.com,example.org\nSRS_SEPARATOR==\nSRS_SECRET=/etc/postsrsd.secret\nSRS_FORWARD_PORT=10001\nSRS_REVERSE_PORT=10002\nRUN_AS=postsrsd\n";
        let text = import_postsrsd(debian).unwrap();
        let config: SrsdConfig = toml::from_str(
            &text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n"),
        )
        .unwrap();
        assert_eq!(config.srs_domain, "example.com");
        assert_eq!(config.domains, vec![".example.com", "example.org"]);
        assert_eq!(
            config.secrets_file.as_deref(),
            Some(Path::new("/etc/postsrsd.secret"))
        );
        assert_eq!(config.hash_alphabet, HashAlphabet::Base64);
        assert!(text.contains("# not converted: RUN_AS = postsrsd"));
        let conf2 = "srs-domain = \"example.com\"\ndomains = {\"example.com\", \".sub.example.com\"}\nsocketmap = unix:/var/spool/postfix/srs\nhash-length = 6\nsecrets-file = \"/etc/postsrsd.secret\"\n";
        let text = import_postsrsd(conf2).unwrap();
        let config: SrsdConfig = toml::from_str(&text).unwrap();
        assert_eq!(
            config.socketmap_listen.unwrap().to_string(),
            "unix:/var/spool/postfix/srs"
        );
        assert!(config.forward_listen.is_none());
        assert_eq!(config.hash_length, 6);
        assert_eq!(config.hash_alphabet, HashAlphabet::Base64url);
        let conf3 = "srs-domain = example.com\noriginal-envelope = database\nenvelope-database = \"redis:localhost:6379\"\n";
        let config: SrsdConfig = toml::from_str(&import_postsrsd(conf3).unwrap()).unwrap();
        assert_eq!(config.original_envelope, OriginalEnvelope::Database);
        assert_eq!(config.envelope_database, "redis://localhost:6379");
    }
}
