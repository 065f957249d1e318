//! Loading and validating a daemon's TOML configuration. Errors name the file, the line and the
//! key, because a postmaster fixing a config at 3 a.m. should not have to guess.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::cli::CommonArgs;

/// Where the daemons look for their configuration when `-c` is not given.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/postern";
/// Where the daemons keep their embedded databases and generated secrets by default.
pub const DEFAULT_STATE_ROOT: &str = "/var/lib/postern";

/// A daemon's configuration: its own keys plus the keys every daemon understands
/// (`state_dir`, `[dns]`, `[log]`, `[metrics]`), which each config struct holds itself (serde's
/// flatten would break `deny_unknown_fields`).
pub trait DaemonConfig:
    Serialize + DeserializeOwned + Default + Clone + fmt::Debug + Send + Sync + 'static
{
    /// The daemon's short name: "policyd", "milter" or "srsd".
    const DAEMON: &'static str;

    /// Where embedded databases and generated secrets live.
    fn state_dir(&self) -> &Path;
    /// The `[dns]` table.
    fn dns(&self) -> &DnsConfig;
    /// The `[log]` table.
    fn log(&self) -> &LogConfig;
    /// The `[metrics]` table.
    fn metrics(&self) -> &MetricsConfig;

    /// Cross-field rules that serde cannot express.
    fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }

    /// Threads serving requests; 0 means one per CPU core the process may run on.
    fn worker_threads(&self) -> usize {
        0
    }

    /// The default config file: `/etc/postern/<daemon>.toml`.
    fn default_path() -> PathBuf {
        Path::new(DEFAULT_CONFIG_DIR).join(format!("{}.toml", Self::DAEMON))
    }

    /// The default state directory: `/var/lib/postern/<daemon>`.
    fn default_state_dir() -> PathBuf {
        Path::new(DEFAULT_STATE_ROOT).join(Self::DAEMON)
    }
}

/// What can be wrong with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named with `-c` does not exist or cannot be read.
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("{}:{line}: {}{message}", file.display(), key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
    Parse {
        /// The file.
        file: PathBuf,
        /// 1-based line of the offending key or value (0 when unknown).
        line: usize,
        /// The key, when the error points at one.
        key: Option<String>,
        /// What is wrong, as the TOML parser says it.
        message: String,
    },
    /// A value is well-formed but not acceptable (a cross-field rule, a file it names).
    #[error("{}key `{key}`: {message}", file.as_ref().map(|f| format!("{}: ", f.display())).unwrap_or_default())]
    Invalid {
        /// The file, once known.
        file: Option<PathBuf>,
        /// The key, dotted (`greylist.delay`).
        key: String,
        /// What is wrong and what is expected.
        message: String,
    },
}

impl ConfigError {
    /// A validation error for `key`.
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            file: None,
            key: key.into(),
            message: message.into(),
        }
    }

    /// Attaches the config file to a validation error that does not name one yet.
    pub fn in_file(self, path: Option<&Path>) -> Self {
        match self {
            Self::Invalid {
                file: None,
                key,
                message,
            } => Self::Invalid {
                file: path.map(Path::to_path_buf),
                key,
                message,
            },
            other => other,
        }
    }
}

/// Parses `text` (the contents of `file`) as configuration `C`.
pub fn parse_str<C: DeserializeOwned>(text: &str, file: &Path) -> Result<C, ConfigError> {
    toml::from_str(text).map_err(|err| {
        let span = err.span();
        let line = span.as_ref().map_or(0, |s| {
            text[..s.start.min(text.len())].matches('\n').count() + 1
        });
        let key = span.and_then(|s| key_at(text, s));
        ConfigError::Parse {
            file: file.to_path_buf(),
            line,
            key,
            message: err.message().trim().to_owned(),
        }
    })
}

/// The bare key the parser's span points at, when it points at one (unknown keys do).
fn key_at(text: &str, span: std::ops::Range<usize>) -> Option<String> {
    let snippet = text.get(span)?.trim();
    let bare = snippet.trim_matches('"');
    let is_key = !bare.is_empty()
        && bare
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    is_key.then(|| bare.to_owned())
}

/// Reads, parses and validates the config file at `path`.
pub fn load_file<C: DaemonConfig>(path: &Path) -> Result<C, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.to_path_buf(),
        source,
    })?;
    let config: C = parse_str(&text, path)?;
    validate_common(&config)
        .and_then(|()| config.validate())
        .map_err(|e| e.in_file(Some(path)))?;
    Ok(config)
}

/// Loads the config the command line asks for: the `-c` file (which must exist), else the default
/// file if it exists, else the built-in defaults. Returns the file actually read, if any.
pub fn load<C: DaemonConfig>(args: &CommonArgs) -> Result<(C, Option<PathBuf>), ConfigError> {
    load_path(args.config.as_deref())
}

/// As [`load`], from an optional explicit path.
pub fn load_path<C: DaemonConfig>(
    explicit: Option<&Path>,
) -> Result<(C, Option<PathBuf>), ConfigError> {
    match explicit {
        Some(path) => Ok((load_file(path)?, Some(path.to_path_buf()))),
        None => {
            let default = C::default_path();
            if default.exists() {
                Ok((load_file(&default)?, Some(default)))
            } else {
                let config = C::default();
                validate_common(&config).and_then(|()| config.validate())?;
                Ok((config, None))
            }
        }
    }
}

fn validate_common<C: DaemonConfig>(config: &C) -> Result<(), ConfigError> {
    crate::logging::filter_for(config.log())
        .map_err(|e| ConfigError::invalid("log.level", e.to_string()))?;
    if config.dns().timeout.get().is_zero() {
        return Err(ConfigError::invalid(
            "dns.timeout",
            "must be more than zero, e.g. \"5s\"",
        ));
    }
    if config.dns().attempts == 0 {
        return Err(ConfigError::invalid("dns.attempts", "must be at least 1"));
    }
    if config.state_dir().as_os_str().is_empty() {
        return Err(ConfigError::invalid("state_dir", "must not be empty"));
    }
    Ok(())
}

/// Parses a unix-socket mode written as an octal string ("0660", "0o660"); `key` names the
/// setting in the error.
pub fn parse_socket_mode(key: &str, text: &str) -> Result<u32, ConfigError> {
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| {
            ConfigError::invalid(
                key,
                format!("{text:?} is not an octal file mode such as \"0660\""),
            )
        })
}

/// The `[dns]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Name servers to ask, as "IP:PORT" ("127.0.0.1:5353", "[::1]:53"); empty means the system
    /// resolver from /etc/resolv.conf.
    pub nameservers: Vec<SocketAddr>,
    /// How long to wait for one answer before trying again or giving up.
    pub timeout: ConfigDuration,
    /// How many times to ask each server before giving up.
    pub attempts: usize,
    /// How many answers the resolver's cache keeps.
    pub cache_size: u64,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            timeout: ConfigDuration::from_secs(5),
            attempts: 2,
            cache_size: 8192,
        }
    }
}

/// The `[log]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// "error", "warn", "info", "debug" or "trace", or per-module directives as tracing's
    /// EnvFilter reads them ("info,postern_policyd=debug"). The POSTERN_LOG environment
    /// variable, when set, overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
        }
    }
}

/// The `[metrics]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the Prometheus endpoint (`GET /metrics`), e.g. "127.0.0.1:9123"; unset means
    /// no endpoint.
    pub listen: Option<SocketAddr>,
}

/// A duration in the config: an integer number of seconds (`300`) or a string of numbers with
/// units `ms`, `s`, `m`, `h`, `d`, `w` (`"5m"`, `"35d"`, `"1h30m"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ConfigDuration(Duration);

impl ConfigDuration {
    /// A duration of `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    /// A duration of `millis` milliseconds.
    pub const fn from_millis(millis: u64) -> Self {
        Self(Duration::from_millis(millis))
    }

    /// The duration.
    pub const fn get(self) -> Duration {
        self.0
    }

    /// Whole seconds.
    pub const fn as_secs(self) -> u64 {
        self.0.as_secs()
    }
}

impl From<Duration> for ConfigDuration {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

impl From<ConfigDuration> for Duration {
    fn from(d: ConfigDuration) -> Self {
        d.0
    }
}

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {0:?}: expected seconds or a number with a unit (ms, s, m, h, d, w), e.g. \"5m\" or \"1h30m\""
)]
pub struct DurationError(String);

impl std::str::FromStr for ConfigDuration {
    type Err = DurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = || DurationError(text.to_owned());
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        if compact.is_empty() {
            return Err(fail());
        }
        if let Ok(secs) = compact.parse::<u64>() {
            return Ok(Self::from_secs(secs));
        }
        let mut total_ms: u64 = 0;
        let mut rest = compact.as_str();
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(fail)?;
            if digits == 0 {
                return Err(fail());
            }
            let number: u64 = rest[..digits].parse().map_err(|_| fail())?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let unit_ms: u64 = match &rest[..unit_len] {
                "ms" => 1,
                "s" | "sec" | "secs" => 1000,
                "m" | "min" | "mins" => 60_000,
                "h" | "hour" | "hours" => 3_600_000,
                "d" | "day" | "days" => 86_400_000,
                "w" | "week" | "weeks" => 604_800_000,
                _ => return Err(fail()),
            };
            rest = &rest[unit_len..];
            total_ms = number
                .checked_mul(unit_ms)
                .and_then(|ms| total_ms.checked_add(ms))
                .ok_or_else(fail)?;
        }
        Ok(Self::from_millis(total_ms))
    }
}

impl fmt::Display for ConfigDuration {
    /// The shortest exact form: "35d", "5m", "90s", "1500ms".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            return write!(f, "{ms}ms");
        }
        let secs = ms / 1000;
        for (unit, size) in [("w", 604_800), ("d", 86_400), ("h", 3_600), ("m", 60)] {
            if secs != 0 && secs.is_multiple_of(size) {
                return write!(f, "{}{unit}", secs / size);
            }
        }
        write!(f, "{secs}s")
    }
}

impl Serialize for ConfigDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ConfigDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of seconds or a string such as \"5m\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(ConfigDuration::from_secs(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u64::try_from(v)
                    .map(ConfigDuration::from_secs)
                    .map_err(|_| E::custom("a duration cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct TestConfig {
        state_dir: PathBuf,
        dns: DnsConfig,
        log: LogConfig,
        metrics: MetricsConfig,
        delay: ConfigDuration,
    }

    impl Default for TestConfig {
        fn default() -> Self {
            Self {
                state_dir: Self::default_state_dir(),
                dns: DnsConfig::default(),
                log: LogConfig::default(),
                metrics: MetricsConfig::default(),
                delay: ConfigDuration::from_secs(300),
            }
        }
    }

    impl DaemonConfig for TestConfig {
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
        fn validate(&self) -> Result<(), ConfigError> {
            if self.delay.get().is_zero() {
                return Err(ConfigError::invalid("delay", "must be positive"));
            }
            Ok(())
        }
    }

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("testd.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn durations_accept_seconds_and_units() {
        for (text, secs) in [
            ("300", 300),
            ("5m", 300),
            ("35d", 35 * 86_400),
            ("2d", 172_800),
            ("1h30m", 5_400),
            ("1h 30m", 5_400),
            ("1w", 604_800),
            ("45s", 45),
        ] {
            assert_eq!(
                text.parse::<ConfigDuration>().unwrap().as_secs(),
                secs,
                "{text}"
            );
        }
        assert_eq!(
            "250ms".parse::<ConfigDuration>().unwrap().get(),
            Duration::from_millis(250)
        );
        for bad in ["", "m", "5x", "-5", "5m3", "1.5h", "99999999999999999999d"] {
            assert!(bad.parse::<ConfigDuration>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn durations_print_in_their_shortest_exact_form() {
        for (secs, text) in [
            (300, "5m"),
            (35 * 86_400, "5w"),
            (2 * 86_400, "2d"),
            (90, "90s"),
            (0, "0s"),
        ] {
            assert_eq!(ConfigDuration::from_secs(secs).to_string(), text);
        }
        assert_eq!(ConfigDuration::from_millis(1500).to_string(), "1500ms");
        let round: ConfigDuration = ConfigDuration::from_secs(5400).to_string().parse().unwrap();
        assert_eq!(round.as_secs(), 5400);
    }

    #[test]
    fn integer_and_string_durations_in_toml() {
        let (_dir, path) = write("delay = 60\n");
        assert_eq!(load_file::<TestConfig>(&path).unwrap().delay.as_secs(), 60);
        let (_dir, path) =
            write("delay = \"2m\"\n[dns]\ntimeout = \"3s\"\nnameservers = [\"127.0.0.1:5353\"]\n");
        let config = load_file::<TestConfig>(&path).unwrap();
        assert_eq!(config.delay.as_secs(), 120);
        assert_eq!(config.dns.timeout.as_secs(), 3);
        assert_eq!(
            config.dns.nameservers,
            vec!["127.0.0.1:5353".parse().unwrap()]
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let (_dir, path) = write("delay = 60\n\n[dns]\ntimeout = 2\nnamesrevers = []\n");
        let err = load_file::<TestConfig>(&path).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("{}:5: key `namesrevers`: ", path.display())),
            "{text}"
        );
        assert!(text.contains("unknown field"), "{text}");
    }

    #[test]
    fn wrong_type_names_the_line() {
        let (_dir, path) = write("delay = 60\nlog = 5\n");
        let err = load_file::<TestConfig>(&path).unwrap_err();
        match err {
            ConfigError::Parse { line, .. } => assert_eq!(line, 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn validation_errors_name_file_and_key() {
        let (_dir, path) = write("delay = 0\n");
        let text = load_file::<TestConfig>(&path).unwrap_err().to_string();
        assert_eq!(
            text,
            format!("{}: key `delay`: must be positive", path.display())
        );
        let (_dir, path) = write("[log]\nlevel = \"loud\"\n");
        let text = load_file::<TestConfig>(&path).unwrap_err().to_string();
        assert!(text.contains("key `log.level`"), "{text}");
        let (_dir, path) = write("[dns]\ntimeout = 0\n");
        let text = load_file::<TestConfig>(&path).unwrap_err().to_string();
        assert!(text.contains("key `dns.timeout`"), "{text}");
    }

    #[test]
    fn socket_modes_are_octal() {
        assert_eq!(parse_socket_mode("socket_mode", "0660").unwrap(), 0o660);
        assert_eq!(parse_socket_mode("socket_mode", "0o600").unwrap(), 0o600);
        for bad in ["rw", "0999", "1777", ""] {
            let err = parse_socket_mode("socket_mode", bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains("key `socket_mode`"), "{err}");
        }
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let err = load_path::<TestConfig>(Some(Path::new("/nonexistent/testd.toml"))).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("/nonexistent/testd.toml: cannot read")
        );
    }

    #[test]
    fn missing_default_file_means_defaults() {
        let (config, path) = load_path::<TestConfig>(None).unwrap();
        assert!(path.is_none());
        assert_eq!(config.state_dir, Path::new("/var/lib/postern/testd"));
        assert_eq!(
            TestConfig::default_path(),
            Path::new("/etc/postern/testd.toml")
        );
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let text = toml::to_string(&TestConfig::default()).unwrap();
        let (_dir, path) = write(&text);
        let back = load_file::<TestConfig>(&path).unwrap();
        assert_eq!(back.delay, TestConfig::default().delay);
        assert_eq!(back.dns, DnsConfig::default());
    }
}
