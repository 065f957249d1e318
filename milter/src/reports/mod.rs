//! DMARC aggregate reports (RFC 7489 §7.2, Appendix C): the record each evaluated message leaves,
//! the store (sqlx Any: SQLite under `state_dir` by default, PostgreSQL or MySQL/MariaDB by URL)
//! with a spool file for store outages, report building, sending, opendmarc history import and
//! expiry.
//!
//! Entry points for the milter binary:
//! * [`Recorder::open`] at start (keep it in the live state), [`Recorder::record`] per message;
//! * `reports send` → [`send_reports`], `reports export --dir DIR` → [`export_reports`],
//!   `reports show` → [`show_pending`], `reports import-history FILE` → [`import_history`],
//!   expiry → [`expire`] (also run by [`send_reports`]).

mod config;
mod history;
mod send;
mod store;
mod xml;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use config::{ReportsConfig, SmtpTls, Transport};
pub use history::{import_history, parse_history};
pub use send::{
    PendingReport, ReportFile, SendSummary, build_pending, export_reports, send_reports, send_with,
    show_pending,
};
pub use store::{Recorder, Store, expire};
pub use xml::{Feedback, build_feedback, gzip, report_file_name, report_subject};

/// Errors of the report machinery.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The store (database) failed.
    #[error("report store {url}: {source}")]
    Store {
        /// The store URL with any password removed.
        url: String,
        /// The database error.
        #[source]
        source: sqlx::Error,
    },
    /// The spool file failed.
    #[error("report spool {path}: {source}")]
    Spool {
        /// The spool file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A history file line could not be understood.
    #[error("{path} line {line}: {message}")]
    History {
        /// The history file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Building or mailing a report failed.
    #[error("report {report_id}: {message}")]
    Send {
        /// The report.
        report_id: String,
        /// What failed.
        message: String,
    },
}

/// One DKIM signature's outcome as reported (`auth_results/dkim`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DkimAuth {
    /// The signing domain (`d=`).
    pub domain: String,
    /// The selector (`s=`).
    pub selector: String,
    /// `none`, `pass`, `fail`, `policy`, `neutral`, `temperror` or `permerror`.
    pub result: String,
}

/// The DMARC record as published, for `policy_published`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PublishedPolicy {
    /// The domain the record was found at (the policy domain).
    pub domain: String,
    /// `r` or `s`.
    pub adkim: String,
    /// `r` or `s`.
    pub aspf: String,
    /// `none`, `quarantine`, `reject`.
    pub p: String,
    /// `none`, `quarantine`, `reject`.
    pub sp: String,
    /// `none`, `quarantine`, `reject`.
    pub np: String,
    /// 0..=100.
    pub pct: u8,
    /// `0`, `1`, `d`, `s`, `d:s`.
    pub fo: String,
    /// Aggregate report destinations (`addr` or `addr!bytes`), without `mailto:`.
    pub rua: Vec<String>,
    /// Requested report interval in seconds (`ri=`); 0 when the record has none.
    pub ri: u32,
}

impl PublishedPolicy {
    /// The placeholder for a domain without a record (RecordAllMessages).
    pub fn absent(domain: &str) -> Self {
        Self {
            domain: domain.to_owned(),
            adkim: "r".to_owned(),
            aspf: "r".to_owned(),
            p: "none".to_owned(),
            sp: "none".to_owned(),
            np: "none".to_owned(),
            pct: 100,
            fo: "0".to_owned(),
            rua: Vec::new(),
            ri: 0,
        }
    }
}

/// What one evaluated message contributes to aggregate reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportRecord {
    /// When it was received, seconds since the epoch.
    pub received: i64,
    /// Postfix queue ID (or opendmarc job ID for imported history).
    pub job_id: String,
    /// The SMTP client's address.
    pub source_ip: String,
    /// The RFC5322.From domain.
    pub header_from: String,
    /// The envelope sender's domain (empty for `<>`).
    pub envelope_from: String,
    /// The first envelope recipient's domain.
    pub envelope_to: String,
    /// The SPF identity's domain.
    pub spf_domain: String,
    /// `mfrom` or `helo`.
    pub spf_scope: String,
    /// The raw SPF result token.
    pub spf_result: String,
    /// Every DKIM signature's outcome.
    pub dkim: Vec<DkimAuth>,
    /// DKIM passed aligned (`policy_evaluated/dkim`).
    pub dkim_aligned: bool,
    /// SPF passed aligned (`policy_evaluated/spf`).
    pub spf_aligned: bool,
    /// `none`, `quarantine` or `reject`: what was done.
    pub disposition: String,
    /// Policy override reasons: (type, comment).
    pub reasons: Vec<(String, String)>,
    /// The record that applied.
    pub published: PublishedPolicy,
}
