//! The `[dmarc]` table: opendmarc.conf's options in snake case, with its defaults unless noted.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use ipnet::IpNet;
use postern_common::config::ConfigError;
use serde::{Deserialize, Serialize};

use super::DmarcInput;
use crate::reports::ReportsConfig;

/// What to do when DMARC cannot be evaluated because of a transient DNS failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TempErrorAction {
    /// Deliver, with `dmarc=temperror` in the header.
    Accept,
    /// Answer `451 4.7.1` so the client retries later.
    Tempfail,
}

/// The networks of an IgnoreHosts file, read once per configuration (a reload makes a new one).
#[derive(Debug, Clone, Default)]
pub struct IgnoreHostsFile(Arc<OnceLock<Vec<IpNet>>>);

impl PartialEq for IgnoreHostsFile {
    fn eq(&self, _: &Self) -> bool {
        true // derived data, not configuration
    }
}

impl Eq for IgnoreHostsFile {}

/// Reads an IgnoreHosts file: addresses and networks, `#` comments, host names skipped.
pub fn read_ignore_hosts(path: &Path) -> Result<Vec<IpNet>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        ConfigError::invalid(
            "dmarc.ignore_hosts_file",
            format!("{}: {err}", path.display()),
        )
    })?;
    let mut nets = Vec::new();
    for line in text.lines() {
        let entry = line.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        if entry.eq_ignore_ascii_case("localhost") {
            nets.push("127.0.0.0/8".parse().expect("literal"));
            nets.push("::1/128".parse().expect("literal"));
        } else if let Ok(net) = entry.parse::<IpNet>() {
            nets.push(net);
        } else if let Ok(ip) = entry.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
            nets.push(IpNet::from(ip));
        }
    }
    Ok(nets)
}

/// The `[dmarc]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DmarcConfig {
    /// Evaluate DMARC at all. Off: no DMARC header, no record, no action.
    pub enabled: bool,
    /// opendmarc RejectFailures: reject messages that fail DMARC for a `p=reject` domain (after
    /// `pct` sampling) with `550 5.7.1 rejected by DMARC policy for <domain>`. Off: such messages
    /// are delivered and marked `dmarc=fail`.
    pub reject_failures: bool,
    /// The text of the rejection; `%s` is replaced by the policy domain (opendmarc RejectString).
    pub reject_string: String,
    /// opendmarc HoldQuarantinedMessages: put messages failing a `p=quarantine` domain (or a
    /// sampled-out `p=reject`) into Postfix's hold queue (milter quarantine action).
    pub hold_quarantined_messages: bool,
    /// opendmarc IgnoreHosts: clients whose messages are not evaluated (networks or addresses).
    pub ignore_hosts: Vec<IpNet>,
    /// opendmarc's IgnoreHosts file: one address or network per line, `#` comments; host names
    /// in it are skipped (the milter matches the client address). Read when the configuration
    /// is loaded or reloaded; added to `ignore_hosts`.
    pub ignore_hosts_file: PathBuf,
    /// The networks read from `ignore_hosts_file` (filled once per loaded configuration).
    #[serde(skip)]
    pub ignore_hosts_loaded: IgnoreHostsFile,
    /// opendmarc IgnoreMailFrom: header From domains not evaluated.
    pub ignore_mail_from: Vec<String>,
    /// opendmarc IgnoreAuthenticatedClients: do not evaluate mail from SMTP AUTH clients.
    pub ignore_authenticated_clients: bool,
    /// opendmarc TrustedAuthservIDs: upstream Authentication-Results / Received-SPF headers under
    /// these names are trusted as the SPF input. Empty: the milter's own `authserv_id`.
    pub trusted_authserv_ids: Vec<String>,
    /// opendmarc SPFSelfValidate: evaluate SPF here when no trusted upstream result is present.
    /// On by default (opendmarc: off), so that DMARC works without an upstream SPF checker.
    pub spf_self_validate: bool,
    /// opendmarc SPFIgnoreResults: never use upstream SPF results, always self-validate.
    pub spf_ignore_results: bool,
    /// Add opendmarc's own `spf=` Authentication-Results header when SPF was evaluated here.
    pub spf_add_header: bool,
    /// opendmarc RecordAllMessages: also record messages whose From domain has no DMARC record.
    pub record_all_messages: bool,
    /// opendmarc RequiredHeaders: reject messages that break RFC 5322 §3.6 header counts (one
    /// From, one Date, at most one Subject, To, Cc, Message-ID, ...).
    pub required_headers: bool,
    /// opendmarc RejectMultiValueFrom: reject messages whose From names several domains.
    /// Off: they are delivered unevaluated (`dmarc=none`), as opendmarc does.
    pub reject_multi_value_from: bool,
    /// What to do when DNS fails during evaluation: "accept" (default) or "tempfail".
    pub dns_failure_action: TempErrorAction,
    /// Aggregate reports: the store and how reports are sent.
    pub reports: ReportsConfig,
}

impl Default for DmarcConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            reject_failures: false,
            reject_string: "rejected by DMARC policy for %s".to_owned(),
            hold_quarantined_messages: false,
            ignore_hosts: vec![
                "127.0.0.1/32".parse().expect("literal"),
                "::1/128".parse().expect("literal"),
            ],
            ignore_hosts_file: PathBuf::new(),
            ignore_hosts_loaded: IgnoreHostsFile::default(),
            ignore_mail_from: Vec::new(),
            ignore_authenticated_clients: false,
            trusted_authserv_ids: Vec::new(),
            spf_self_validate: true,
            spf_ignore_results: false,
            spf_add_header: true,
            record_all_messages: false,
            required_headers: false,
            reject_multi_value_from: false,
            dns_failure_action: TempErrorAction::Accept,
            reports: ReportsConfig::default(),
        }
    }
}

impl DmarcConfig {
    /// Checks the values serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for id in &self.trusted_authserv_ids {
            if id.is_empty() || id.contains([';', ' ', '\t', '\n']) {
                return Err(ConfigError::invalid(
                    "dmarc.trusted_authserv_ids",
                    format!("{id:?} is not a single token"),
                ));
            }
        }
        if self.reject_string.matches("%s").count() > 1 {
            return Err(ConfigError::invalid(
                "dmarc.reject_string",
                "may contain %s at most once",
            ));
        }
        if !self.ignore_hosts_file.as_os_str().is_empty() {
            let nets = read_ignore_hosts(&self.ignore_hosts_file)?;
            let _ = self.ignore_hosts_loaded.0.set(nets);
        }
        self.reports.validate()
    }

    /// The networks from `ignore_hosts_file` (read on first use if `validate` did not).
    fn file_ignore_hosts(&self) -> &[IpNet] {
        if self.ignore_hosts_file.as_os_str().is_empty() {
            return &[];
        }
        self.ignore_hosts_loaded.0.get_or_init(|| {
            read_ignore_hosts(&self.ignore_hosts_file).unwrap_or_else(|err| {
                tracing::warn!(error = %err, "IgnoreHosts file not read");
                Vec::new()
            })
        })
    }

    /// The trusted authserv-ids, lowercased (the milter's own by default).
    pub(crate) fn trusted_ids(&self, own: &str) -> Vec<String> {
        if self.trusted_authserv_ids.is_empty() {
            vec![own.to_ascii_lowercase()]
        } else {
            self.trusted_authserv_ids
                .iter()
                .map(|id| id.to_ascii_lowercase())
                .collect()
        }
    }

    /// Whether the message is exempt (IgnoreHosts, IgnoreAuthenticatedClients, IgnoreMailFrom).
    pub(crate) fn ignored(&self, input: &DmarcInput<'_>, from_domains: &[String]) -> bool {
        self.ignore_hosts
            .iter()
            .chain(self.file_ignore_hosts())
            .any(|net| net.contains(&input.client_ip))
            || (self.ignore_authenticated_clients && input.authenticated)
            || from_domains.iter().any(|domain| {
                self.ignore_mail_from
                    .iter()
                    .any(|ignored| ignored.trim_end_matches('.').eq_ignore_ascii_case(domain))
            })
    }

    /// The rejection text for a policy domain.
    pub(crate) fn reject_text(&self, domain: &str) -> String {
        if self.reject_string.contains("%s") {
            self.reject_string.replacen("%s", domain, 1)
        } else {
            self.reject_string.clone()
        }
    }
}
