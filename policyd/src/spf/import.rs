//! `postern-policyd policyd-spf-import FILE`: converts a policyd-spf.conf (`Name = value`
//! lines, `#` comments, comma-separated lists) into the `[spf]` table, with policyd-spf's own
//! reading of each value (spf-engine 3.0.4 `policydspfsupp._readConfigFile`). Pure text in,
//! text out.

use std::net::IpAddr;

use ipnet::IpNet;
use toml::{Table, Value};

use super::config::SpfConfig;

/// Why a policyd-spf.conf could not be converted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImportError {
    /// A line or value that policyd-spf would not accept either, or a setting postern lacks.
    #[error("line {line}: {message}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The settings convert but do not make a valid `[spf]` table.
    #[error("converted settings are invalid: {0}")]
    Invalid(String),
}

/// Settings of pyspf-milter and the process, which postern-policyd has no use for.
const IGNORED: &[&str] = &[
    "debugLevel",
    "QueueID",
    "Socket",
    "PidFile",
    "UserID",
    "UMask",
    "InternalHosts",
    "IntHosts",
    "MacroList",
];

fn list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

fn networks(value: &str) -> Result<Value, String> {
    list(value)
        .iter()
        .map(|item| {
            item.parse::<IpNet>()
                .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                .map(|net| Value::String(net.to_string()))
                .map_err(|_| format!("{item:?} is not an IP network"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

fn strings(value: &str) -> Value {
    Value::Array(list(value).into_iter().map(Value::String).collect())
}

fn integer(value: &str) -> Result<i64, String> {
    value
        .parse::<i64>()
        .map_err(|_| format!("{value:?} is not an integer"))
}

fn choice(value: &str, allowed: &[(&str, &str)]) -> Result<Value, String> {
    allowed
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(value))
        .map(|(_, toml)| Value::String((*toml).to_owned()))
        .ok_or_else(|| {
            format!(
                "{value:?} is not one of {}",
                allowed
                    .iter()
                    .map(|(name, _)| *name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// Converts policyd-spf.conf text into TOML for policyd.toml (an `[spf]` table holding the
/// settings the file sets; everything else keeps policyd-spf's defaults).
pub fn import_policyd_spf_conf(text: &str) -> Result<String, ImportError> {
    let mut table = Table::new();
    let mut notes = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |message: String| ImportError::Line {
            line: line_no,
            message,
        };
        let parts: Vec<&str> = line.split('=').map(str::trim).collect();
        let [name, value] = parts[..] else {
            return Err(err(format!(
                "expected \"Name = value\" (policyd-spf allows exactly one '='), got {line:?}"
            )));
        };
        if IGNORED.contains(&name) {
            notes.push(format!("# {name} = {value}: not used by postern-policyd"));
            continue;
        }
        let (key, converted): (&str, Value) = match name {
            // policyd-spf: TestOnly = 0 means test mode (prepend only).
            "TestOnly" | "defaultSeedOnly" => (
                "test_only",
                Value::Boolean(integer(value).map_err(err)? == 0),
            ),
            "HELO_reject" => (
                "helo_reject",
                choice(
                    value,
                    &[
                        ("Fail", "fail"),
                        ("Softfail", "softfail"),
                        ("SPF_Not_Pass", "spf_not_pass"),
                        ("Null", "null"),
                        ("False", "false"),
                        ("No_Check", "no_check"),
                    ],
                )
                .map_err(err)?,
            ),
            "Mail_From_reject" => (
                "mail_from_reject",
                choice(
                    value,
                    &[
                        ("Fail", "fail"),
                        ("Softfail", "softfail"),
                        ("SPF_Not_Pass", "spf_not_pass"),
                        ("False", "false"),
                        ("No_Check", "no_check"),
                    ],
                )
                .map_err(err)?,
            ),
            // policyd-spf compares these with the string 'True'.
            "PermError_reject" => ("perm_error_reject", Value::Boolean(value == "True")),
            "TempError_Defer" => ("temp_error_defer", Value::Boolean(value == "True")),
            "No_Mail" => ("no_mail", Value::Boolean(value == "True")),
            "HELO_pass_restriction" => ("helo_pass_restriction", Value::String(value.to_owned())),
            "Mail_From_pass_restriction" => (
                "mail_from_pass_restriction",
                Value::String(value.to_owned()),
            ),
            "Prospective" => (
                "prospective",
                Value::String(
                    value
                        .parse::<IpAddr>()
                        .map_err(|_| err(format!("{value:?} is not an IP address")))?
                        .to_string(),
                ),
            ),
            "skip_addresses" => ("skip_addresses", networks(value).map_err(err)?),
            "Whitelist" => ("whitelist", networks(value).map_err(err)?),
            "HELO_Whitelist" => ("helo_whitelist", strings(value)),
            "Domain_Whitelist" => ("domain_whitelist", strings(value)),
            "Domain_Whitelist_PTR" => ("domain_whitelist_ptr", strings(value)),
            "Reject_Not_Pass_Domains" => ("reject_not_pass_domains", strings(value)),
            // policyd-spf: only "No" turns them off / on.
            "SPF_Enhanced_Status_Codes" => {
                ("spf_enhanced_status_codes", Value::Boolean(value != "No"))
            }
            "Hide_Receiver" => ("hide_receiver", Value::Boolean(value != "No")),
            "Header_Type" => {
                if value.contains("SPF") && value.contains("AR") {
                    return Err(err(
                        "Header_Type includes both SPF and AR (policyd-spf refuses it too)".into(),
                    ));
                }
                (
                    "header_type",
                    choice(
                        value,
                        &[
                            ("SPF", "received-spf"),
                            ("AR", "authentication-results"),
                            ("None", "none"),
                        ],
                    )
                    .map_err(err)?,
                )
            }
            "Authserv_Id" => ("authserv_id", Value::String(value.to_owned())),
            "Lookup_Time" => ("lookup_time", Value::Integer(integer(value).map_err(err)?)),
            "Whitelist_Lookup_Time" => (
                "whitelist_lookup_time",
                Value::Integer(integer(value).map_err(err)?),
            ),
            "Void_Limit" => ("void_limit", Value::Integer(integer(value).map_err(err)?)),
            "Reason_Message" => ("reason_message", Value::String(value.to_owned())),
            // Python's bool() of any non-empty string is True, even "False".
            "Mock" => ("mock", Value::Boolean(!value.is_empty())),
            "Per_User" => {
                return Err(err(
                    "Per_User (per-recipient settings) is not supported by postern-policyd".into(),
                ));
            }
            other => return Err(err(format!("unknown setting {other:?}"))),
        };
        table.insert(key.to_owned(), converted);
    }
    // The result must load as the daemon will load it.
    let config: SpfConfig = Value::Table(table.clone())
        .try_into()
        .map_err(|e: toml::de::Error| ImportError::Invalid(e.to_string()))?;
    config
        .validate()
        .map_err(|e| ImportError::Invalid(e.to_string()))?;
    let mut out = String::from(
        "# Converted from policyd-spf.conf by postern-policyd policyd-spf-import.\n\
         # Settings not listed keep policyd-spf's defaults.\n",
    );
    for note in &notes {
        out.push_str(note);
        out.push('\n');
    }
    let mut document = Table::new();
    document.insert("spf".to_owned(), Value::Table(table));
    out.push_str(&toml::to_string(&document).map_err(|e| ImportError::Invalid(e.to_string()))?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spf::config::{HeaderType, HeloReject, MailFromReject};

    fn load(toml_text: &str) -> SpfConfig {
        #[derive(serde::Deserialize)]
        struct Doc {
            spf: SpfConfig,
        }
        toml::from_str::<Doc>(toml_text).unwrap().spf
    }

    #[test]
    fn converts_debians_shipped_file() {
        // /etc/postfix-policyd-spf-python/policyd-spf.conf as Debian ships it.
        let text = "#  Amavis-style config file for the SPF policy server\ndebugLevel = 1\nTestOnly = 1\n\nHELO_reject = Fail\nMail_From_reject = Fail\n\nPermError_reject = False\nTempError_Defer = False\n\nskip_addresses = 127.0.0.0/8,::ffff:127.0.0.0/104,::1\n";
        let out = import_policyd_spf_conf(text).unwrap();
        assert!(out.contains("# debugLevel = 1: not used"), "{out}");
        let config = load(&out);
        assert_eq!(config, SpfConfig::default());
    }

    #[test]
    fn converts_every_setting() {
        let text = "TestOnly = 0\nHELO_reject = SPF_Not_Pass\nMail_From_reject = Softfail\nPermError_reject = True\nTempError_Defer = True\nNo_Mail = True\nHELO_pass_restriction = helo_passed\nMail_From_pass_restriction = mfrom_passed\nReject_Not_Pass_Domains = gmail.com,example.org\nWhitelist = 192.0.2.0/24,2001:db8::1\nHELO_Whitelist = mx.example.net\nDomain_Whitelist = pobox.com\nDomain_Whitelist_PTR = .google.com\nSPF_Enhanced_Status_Codes = No\nHeader_Type = AR\nHide_Receiver = Yes\nAuthserv_Id = mx.example.net\nLookup_Time = 5\nWhitelist_Lookup_Time = 3\nVoid_Limit = 3\nReason_Message = Message {rejectdefer}: {spf} ({url})\nProspective = 198.51.100.7\n";
        let config = load(&import_policyd_spf_conf(text).unwrap());
        assert!(config.test_only);
        assert_eq!(config.helo_reject, HeloReject::SpfNotPass);
        assert_eq!(config.mail_from_reject, MailFromReject::Softfail);
        assert!(config.perm_error_reject && config.temp_error_defer && config.no_mail);
        assert_eq!(config.helo_pass_restriction.as_deref(), Some("helo_passed"));
        assert_eq!(
            config.mail_from_pass_restriction.as_deref(),
            Some("mfrom_passed")
        );
        assert_eq!(config.reject_not_pass_domains, ["gmail.com", "example.org"]);
        assert_eq!(
            config
                .whitelist
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["192.0.2.0/24", "2001:db8::1/128"]
        );
        assert_eq!(config.helo_whitelist, ["mx.example.net"]);
        assert_eq!(config.domain_whitelist, ["pobox.com"]);
        assert_eq!(config.domain_whitelist_ptr, [".google.com"]);
        assert!(!config.spf_enhanced_status_codes);
        assert_eq!(config.header_type, HeaderType::AuthenticationResults);
        assert!(config.hide_receiver);
        assert_eq!(config.authserv_id, "mx.example.net");
        assert_eq!(config.lookup_time.as_secs(), 5);
        assert_eq!(config.whitelist_lookup_time.as_secs(), 3);
        assert_eq!(config.void_limit, 3);
        assert_eq!(
            config.reason_message,
            "Message {rejectdefer}: {spf} ({url})"
        );
        assert_eq!(config.prospective, Some("198.51.100.7".parse().unwrap()));
    }

    #[test]
    fn refuses_what_policyd_spf_refuses_and_what_postern_lacks() {
        for (text, want) in [
            ("HELO_reject = Maybe\n", "line 1: \"Maybe\" is not one of"),
            (
                "\nLookup_Time = soon\n",
                "line 2: \"soon\" is not an integer",
            ),
            ("Header_Type = SPF,AR\n", "both SPF and AR"),
            ("Whitelist = 192.0.2.300/24\n", "not an IP network"),
            ("Per_User = text,/etc/x\n", "not supported"),
            ("Colour = blue\n", "unknown setting \"Colour\""),
            ("Reason_Message = a=b\n", "exactly one '='"),
            ("Reason_Message = {nope}\n", "unknown placeholder"),
        ] {
            let err = import_policyd_spf_conf(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn python_truthiness_is_kept() {
        let config =
            load(&import_policyd_spf_conf("Mock = False\nPermError_reject = true\n").unwrap());
        assert!(config.mock, "bool('False') is True in policyd-spf");
        assert!(
            !config.perm_error_reject,
            "only the exact string 'True' enables it"
        );
    }
}
