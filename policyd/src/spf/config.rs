//! The `[spf]` table: policyd-spf's settings (policyd-spf.conf(5), spf-engine 3.0.4) in snake
//! case, with its defaults. Values only; no DNS, no I/O.

use std::net::IpAddr;

use ipnet::IpNet;
use postern_common::config::{ConfigDuration, ConfigError};
use serde::{Deserialize, Serialize};

/// policyd-spf's `Reason_Message` default.
pub const DEFAULT_REASON_MESSAGE: &str = "Message {rejectdefer} due to: {spf}. Please see {url}";

/// `HELO_reject`: which HELO results are rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeloReject {
    /// Reject Fail only (policyd-spf's default).
    #[default]
    #[serde(alias = "Fail")]
    Fail,
    /// Reject Fail and Softfail.
    #[serde(alias = "Softfail")]
    Softfail,
    /// Reject everything but Pass, None and errors (Fail, Softfail, Neutral).
    #[serde(alias = "SPF_Not_Pass")]
    SpfNotPass,
    /// Reject a HELO Fail only when the sender is null (`<>`); otherwise never act on HELO.
    #[serde(alias = "Null")]
    Null,
    /// Never reject on HELO; only prepend the result.
    #[serde(alias = "False")]
    False,
    /// Do not check HELO at all.
    #[serde(alias = "No_Check")]
    NoCheck,
}

/// `Mail_From_reject`: which MAIL FROM results are rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MailFromReject {
    /// Reject Fail only (policyd-spf's default).
    #[default]
    #[serde(alias = "Fail")]
    Fail,
    /// Reject Fail and Softfail.
    #[serde(alias = "Softfail")]
    Softfail,
    /// Reject Fail, Softfail and Neutral.
    #[serde(alias = "SPF_Not_Pass")]
    SpfNotPass,
    /// Never reject; only prepend the result.
    #[serde(alias = "False")]
    False,
    /// Do not check MAIL FROM at all.
    #[serde(alias = "No_Check")]
    NoCheck,
}

/// `Header_Type`: which header records the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeaderType {
    /// `Received-SPF:` (policyd-spf's `SPF`, the default).
    #[default]
    #[serde(alias = "SPF", alias = "spf")]
    ReceivedSpf,
    /// `Authentication-Results:` (policyd-spf's `AR`).
    #[serde(alias = "AR", alias = "ar")]
    AuthenticationResults,
    /// No header; a result that would only be prepended answers `dunno`.
    #[serde(alias = "None")]
    None,
}

/// The `[spf]` table of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpfConfig {
    /// Test mode (policyd-spf `TestOnly = 0`): never reject or defer, only prepend the header.
    pub test_only: bool,
    /// HELO results that reject: "fail", "softfail", "spf_not_pass", "null", "false",
    /// "no_check" (policyd-spf `HELO_reject`).
    pub helo_reject: HeloReject,
    /// MAIL FROM results that reject: "fail", "softfail", "spf_not_pass", "false", "no_check"
    /// (policyd-spf `Mail_From_reject`).
    pub mail_from_reject: MailFromReject,
    /// Postfix restriction class answered (as `action=<name>`) when HELO passes
    /// (policyd-spf `HELO_pass_restriction`); unset means none.
    pub helo_pass_restriction: Option<String>,
    /// Postfix restriction class answered when MAIL FROM passes
    /// (policyd-spf `Mail_From_pass_restriction`); unset means none.
    pub mail_from_pass_restriction: Option<String>,
    /// Only reject when the failing record is exactly `v=spf1 -all` (a domain that sends no
    /// mail); other rejections become a prepended header (policyd-spf `No_Mail`).
    pub no_mail: bool,
    /// Domains (and their subdomains) whose Neutral and Softfail results are rejected too; the
    /// reason then reads "Receiver policy for SPF <Result>" (policyd-spf
    /// `Reject_Not_Pass_Domains`).
    pub reject_not_pass_domains: Vec<String>,
    /// Reject a PermError result with `550 5.7.24` (policyd-spf `PermError_reject`).
    pub perm_error_reject: bool,
    /// Defer a TempError result with `defer_if_permit 4.7.24` (policyd-spf `TempError_Defer`).
    pub temp_error_defer: bool,
    /// Check this address instead of the client's and never prepend a header: for testing what
    /// outbound mail would get (policyd-spf `Prospective`).
    pub prospective: Option<IpAddr>,
    /// Client networks not checked; answered with an `X-Comment: SPF check N/A for local
    /// connections` header (policyd-spf `skip_addresses`).
    pub skip_addresses: Vec<IpNet>,
    /// Client networks not checked, e.g. secondary MX hosts and known forwarders
    /// (policyd-spf `Whitelist`).
    pub whitelist: Vec<IpNet>,
    /// HELO names not checked when the name's A/AAAA records include the client address
    /// (policyd-spf `HELO_Whitelist`).
    pub helo_whitelist: Vec<String>,
    /// Domains whose SPF record passes the client: such clients are not checked
    /// (policyd-spf `Domain_Whitelist`).
    pub domain_whitelist: Vec<String>,
    /// Suffixes of the client's first PTR name that exempt it from checks
    /// (policyd-spf `Domain_Whitelist_PTR`; a plain suffix match, as policyd-spf does).
    pub domain_whitelist_ptr: Vec<String>,
    /// Use RFC 7372 enhanced status codes: `550 5.7.23`, `550 5.7.24`,
    /// `defer_if_permit 4.7.24` (policyd-spf `SPF_Enhanced_Status_Codes`).
    pub spf_enhanced_status_codes: bool,
    /// The header prepended: "received-spf", "authentication-results" or "none"
    /// (policyd-spf `Header_Type` SPF, AR, None).
    pub header_type: HeaderType,
    /// Write `receiver=<UNKNOWN>` instead of the recipient's domain (policyd-spf
    /// `Hide_Receiver`).
    pub hide_receiver: bool,
    /// The authserv-id of the Authentication-Results header; "HOSTNAME" means this host's name
    /// (policyd-spf `Authserv_Id`).
    pub authserv_id: String,
    /// Longest time one identity's SPF evaluation may take; past it the result is TempError
    /// (policyd-spf `Lookup_Time`, 20 s). Keep it below Postfix's smtpd_policy_service_timeout
    /// (100 s) so Postfix always gets an answer.
    pub lookup_time: ConfigDuration,
    /// Longest time one whitelist lookup may take (policyd-spf `Whitelist_Lookup_Time`, 10 s).
    pub whitelist_lookup_time: ConfigDuration,
    /// Most DNS lookups that may return no answer ("void lookups") before the result is
    /// PermError (RFC 7208 section 4.6.4; policyd-spf `Void_Limit`).
    pub void_limit: u32,
    /// The reject/defer text; `{rejectdefer}` is "rejected" or "deferred", `{spf}` the SPF
    /// explanation, `{url}` the openspf "Why" URL (policyd-spf `Reason_Message`).
    pub reason_message: String,
    /// Answer every request `dunno mock header field that should be ignored` (policyd-spf
    /// `Mock`, used as a first dummy policy call).
    pub mock: bool,
    /// Answer `dunno` without checking for SASL-authenticated clients (requests with a
    /// non-empty `sasl_username`): they submit mail, SPF is for relays.
    pub skip_authenticated: bool,
    /// Messages (Postfix `instance` values) remembered so that only the first recipient of a
    /// message gets the header and later ones the same decision; the oldest are forgotten.
    pub remembered_messages: usize,
}

impl Default for SpfConfig {
    fn default() -> Self {
        Self {
            test_only: false,
            helo_reject: HeloReject::Fail,
            mail_from_reject: MailFromReject::Fail,
            helo_pass_restriction: None,
            mail_from_pass_restriction: None,
            no_mail: false,
            reject_not_pass_domains: Vec::new(),
            perm_error_reject: false,
            temp_error_defer: false,
            prospective: None,
            skip_addresses: ["127.0.0.0/8", "::ffff:127.0.0.0/104", "::1/128"]
                .iter()
                .map(|net| net.parse().expect("valid default network"))
                .collect(),
            whitelist: Vec::new(),
            helo_whitelist: Vec::new(),
            domain_whitelist: Vec::new(),
            domain_whitelist_ptr: Vec::new(),
            spf_enhanced_status_codes: true,
            header_type: HeaderType::ReceivedSpf,
            hide_receiver: false,
            authserv_id: "HOSTNAME".to_owned(),
            lookup_time: ConfigDuration::from_secs(20),
            whitelist_lookup_time: ConfigDuration::from_secs(10),
            void_limit: 2,
            reason_message: DEFAULT_REASON_MESSAGE.to_owned(),
            mock: false,
            skip_authenticated: true,
            remembered_messages: 10_000,
        }
    }
}

impl SpfConfig {
    /// Cross-field checks; keys are named as in the file (`spf.lookup_time`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.lookup_time.get().is_zero() {
            return Err(ConfigError::invalid(
                "spf.lookup_time",
                "must be more than zero",
            ));
        }
        if self.whitelist_lookup_time.get().is_zero() {
            return Err(ConfigError::invalid(
                "spf.whitelist_lookup_time",
                "must be more than zero",
            ));
        }
        if self.authserv_id.trim().is_empty()
            || self
                .authserv_id
                .contains(|c: char| c.is_whitespace() || c == ';')
        {
            return Err(ConfigError::invalid(
                "spf.authserv_id",
                "must be a host name (or \"HOSTNAME\" for this host's name)",
            ));
        }
        for (key, value) in [
            ("spf.helo_pass_restriction", &self.helo_pass_restriction),
            (
                "spf.mail_from_pass_restriction",
                &self.mail_from_pass_restriction,
            ),
        ] {
            if let Some(name) = value
                && (name.is_empty() || name.contains(char::is_whitespace))
            {
                return Err(ConfigError::invalid(
                    key,
                    "must be the name of a Postfix restriction class (one word)",
                ));
            }
        }
        for (key, list) in [
            ("spf.reject_not_pass_domains", &self.reject_not_pass_domains),
            ("spf.helo_whitelist", &self.helo_whitelist),
            ("spf.domain_whitelist", &self.domain_whitelist),
            ("spf.domain_whitelist_ptr", &self.domain_whitelist_ptr),
        ] {
            if let Some(bad) = list
                .iter()
                .find(|d| d.is_empty() || d.contains(|c: char| c.is_whitespace() || c == ','))
            {
                return Err(ConfigError::invalid(
                    key,
                    format!("{bad:?} is not a domain name"),
                ));
            }
        }
        for placeholder in placeholders(&self.reason_message) {
            if !matches!(placeholder, "rejectdefer" | "spf" | "url") {
                return Err(ConfigError::invalid(
                    "spf.reason_message",
                    format!(
                        "unknown placeholder {{{placeholder}}} (known: {{rejectdefer}}, {{spf}}, {{url}})"
                    ),
                ));
            }
        }
        if self.remembered_messages == 0 {
            return Err(ConfigError::invalid(
                "spf.remembered_messages",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// The `{name}` placeholders of a reason message.
fn placeholders(text: &str) -> impl Iterator<Item = &str> {
    text.split('{')
        .skip(1)
        .filter_map(|rest| rest.split_once('}').map(|(name, _)| name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_policyd_spfs() {
        let config = SpfConfig::default();
        assert_eq!(config.helo_reject, HeloReject::Fail);
        assert_eq!(config.mail_from_reject, MailFromReject::Fail);
        assert!(config.spf_enhanced_status_codes);
        assert!(!config.hide_receiver);
        assert_eq!(config.header_type, HeaderType::ReceivedSpf);
        assert_eq!(config.lookup_time.as_secs(), 20);
        assert_eq!(config.void_limit, 2);
        assert_eq!(config.authserv_id, "HOSTNAME");
        assert_eq!(
            config
                .skip_addresses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["127.0.0.0/8", "::ffff:127.0.0.0/104", "::1/128"]
        );
        config.validate().unwrap();
    }

    #[test]
    fn parses_snake_case_and_policyd_spf_spellings() {
        let config: SpfConfig = toml::from_str(
            "helo_reject = \"SPF_Not_Pass\"\nmail_from_reject = \"softfail\"\nheader_type = \"AR\"\nlookup_time = \"5s\"\nwhitelist = [\"192.0.2.0/24\"]\n",
        )
        .unwrap();
        assert_eq!(config.helo_reject, HeloReject::SpfNotPass);
        assert_eq!(config.mail_from_reject, MailFromReject::Softfail);
        assert_eq!(config.header_type, HeaderType::AuthenticationResults);
        assert_eq!(config.lookup_time.as_secs(), 5);
        assert_eq!(config.whitelist[0].to_string(), "192.0.2.0/24");
        // Round trip through the effective TOML --check-config prints.
        let text = toml::to_string(&config).unwrap();
        assert_eq!(toml::from_str::<SpfConfig>(&text).unwrap(), config);
    }

    #[test]
    fn unknown_keys_and_values_are_refused() {
        let err = toml::from_str::<SpfConfig>("helo_rejcet = \"fail\"\n").unwrap_err();
        assert!(err.to_string().contains("helo_rejcet"), "{err}");
        let err = toml::from_str::<SpfConfig>("helo_reject = \"sometimes\"\n").unwrap_err();
        assert!(err.to_string().contains("sometimes"), "{err}");
        let err = toml::from_str::<SpfConfig>("mail_from_reject = \"null\"\n").unwrap_err();
        assert!(err.to_string().contains("null"), "{err}");
    }

    #[test]
    fn validation_names_the_key() {
        for (config, key) in [
            (
                SpfConfig {
                    lookup_time: ConfigDuration::from_secs(0),
                    ..SpfConfig::default()
                },
                "spf.lookup_time",
            ),
            (
                SpfConfig {
                    authserv_id: "mx example".into(),
                    ..SpfConfig::default()
                },
                "spf.authserv_id",
            ),
            (
                SpfConfig {
                    reason_message: "no {reason}".into(),
                    ..SpfConfig::default()
                },
                "spf.reason_message",
            ),
            (
                SpfConfig {
                    helo_pass_restriction: Some("two words".into()),
                    ..SpfConfig::default()
                },
                "spf.helo_pass_restriction",
            ),
            (
                SpfConfig {
                    domain_whitelist: vec!["a.example,b.example".into()],
                    ..SpfConfig::default()
                },
                "spf.domain_whitelist",
            ),
        ] {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }
}
