//! The `[dmarc.reports]` table (opendmarc-reports' and opendmarc-expire's options, plus what
//! they lacked: SMTP AUTH and STARTTLS settings, sendmail, a store URL for any database).

use std::path::{Path, PathBuf};

use postern_common::config::{ConfigDuration, ConfigError};
use serde::{Deserialize, Serialize};

/// How reports leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// SMTP to `smtp_host:smtp_port` (the local Postfix by default).
    Smtp,
    /// Piped into `sendmail_path -i -f <from> -- <rcpt>`.
    Sendmail,
}

/// TLS on the SMTP transport (certificates checked against the system's trust store).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain SMTP (the local Postfix does the TLS to the world).
    Never,
    /// STARTTLS when the server offers it.
    Opportunistic,
    /// STARTTLS or fail (the report is retried).
    Required,
    /// TLS from the first byte (SMTPS, port 465).
    Wrapper,
}

/// The `[dmarc.reports]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReportsConfig {
    /// Record evaluated messages for aggregate reports.
    pub enabled: bool,
    /// The report store: `sqlite:///path/reports.db`, `postgres://user:pass@host/db`,
    /// `mysql://user:pass@host/db`. Empty: `sqlite://<state_dir>/dmarc-reports.db`.
    pub store: String,
    /// While the store is unreachable it is tried again at most this often (meanwhile records
    /// go to the spool without waiting for a connection attempt).
    pub store_retry_interval: ConfigDuration,
    /// Where records go while the store is unreachable (replayed when it is back). Empty:
    /// `<state_dir>/dmarc-reports.spool`.
    pub spool_file: PathBuf,
    /// `report_metadata/org_name` and the `Submitter:` of the subject (opendmarc-reports
    /// --report-org). Empty: the host name.
    pub org_name: String,
    /// `report_metadata/email` and the sender of report mail (--report-email). Empty:
    /// `postmaster@<host name>`.
    pub email: String,
    /// Optional `report_metadata/extra_contact_info` (a URL or address).
    pub extra_contact_info: String,
    /// The receiver name in report file names (`<receiver>!<domain>!<begin>!<end>.xml.gz`).
    /// Empty: the host name.
    pub receiver: String,
    /// `smtp` (default) or `sendmail`.
    pub transport: Transport,
    /// SMTP server (opendmarc-reports --smtp-host).
    pub smtp_host: String,
    /// SMTP port (--smtp-port).
    pub smtp_port: u16,
    /// `never` (default: the local Postfix relays and does the TLS), `opportunistic` or
    /// `required` STARTTLS, or `wrapper` (SMTPS).
    pub smtp_tls: SmtpTls,
    /// SMTP AUTH user name; empty: no AUTH.
    pub smtp_username: String,
    /// File holding the SMTP AUTH password (mode 0600).
    pub smtp_password_file: PathBuf,
    /// SMTP timeout.
    pub smtp_timeout: ConfigDuration,
    /// sendmail binary for `transport = "sendmail"`.
    pub sendmail_path: PathBuf,
    /// Report interval for domains that do not ask for one (`ri=`), and the lower bound of any.
    pub default_interval: ConfigDuration,
    /// Rows older than this are deleted (opendmarc-expire --expire, default 180 days there).
    pub expire_after: ConfigDuration,
    /// Reports that keep failing are dropped (and logged) after this long.
    pub give_up_after: ConfigDuration,
}

impl Default for ReportsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            store: String::new(),
            store_retry_interval: ConfigDuration::from_secs(2),
            spool_file: PathBuf::new(),
            org_name: String::new(),
            email: String::new(),
            extra_contact_info: String::new(),
            receiver: String::new(),
            transport: Transport::Smtp,
            smtp_host: "127.0.0.1".to_owned(),
            smtp_port: 25,
            smtp_tls: SmtpTls::Never,
            smtp_username: String::new(),
            smtp_password_file: PathBuf::new(),
            smtp_timeout: ConfigDuration::from_secs(60),
            sendmail_path: PathBuf::from("/usr/sbin/sendmail"),
            default_interval: ConfigDuration::from_secs(86400),
            expire_after: ConfigDuration::from_secs(180 * 86400),
            give_up_after: ConfigDuration::from_secs(7 * 86400),
        }
    }
}

impl ReportsConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let store = self.store.trim();
        if !store.is_empty()
            && !["sqlite:", "postgres:", "postgresql:", "mysql:", "mariadb:"]
                .iter()
                .any(|scheme| store.starts_with(scheme))
        {
            return Err(ConfigError::invalid(
                "dmarc.reports.store",
                "must be a sqlite:, postgres: or mysql: URL",
            ));
        }
        if self.default_interval.get().as_secs() < 3600 {
            return Err(ConfigError::invalid(
                "dmarc.reports.default_interval",
                "must be at least 1h",
            ));
        }
        if !self.smtp_username.is_empty() && self.smtp_password_file.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "dmarc.reports.smtp_password_file",
                "required with smtp_username",
            ));
        }
        Ok(())
    }

    /// The store URL, defaulting to SQLite under `state_dir`.
    pub fn store_url(&self, state_dir: &Path) -> String {
        let store = self.store.trim();
        if store.is_empty() {
            format!(
                "sqlite://{}?mode=rwc",
                state_dir.join("dmarc-reports.db").display()
            )
        } else {
            store.replacen("mariadb:", "mysql:", 1)
        }
    }

    /// The spool file path.
    pub fn spool_path(&self, state_dir: &Path) -> PathBuf {
        if self.spool_file.as_os_str().is_empty() {
            state_dir.join("dmarc-reports.spool")
        } else {
            self.spool_file.clone()
        }
    }

    /// org_name, or the host name.
    pub fn effective_org_name(&self) -> String {
        non_empty_or(&self.org_name, host_name)
    }

    /// receiver, or the host name.
    pub fn effective_receiver(&self) -> String {
        non_empty_or(&self.receiver, host_name)
    }

    /// email, or postmaster@host name.
    pub fn effective_email(&self) -> String {
        non_empty_or(&self.email, || format!("postmaster@{}", host_name()))
    }
}

fn non_empty_or(value: &str, default: impl FnOnce() -> String) -> String {
    if value.trim().is_empty() {
        default()
    } else {
        value.trim().to_owned()
    }
}

pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
