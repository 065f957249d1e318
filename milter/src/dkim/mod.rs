//! DKIM (RFC 6376, RFC 8463) as opendkim does it: the `[dkim]` config table, keys and tables
//! loaded into a [`Dkim`] state at start and on SIGHUP, the sign-or-verify decision, signing and
//! the verification verdict. No milter I/O here: the server feeds messages in and applies what
//! comes out.

pub mod keys;
pub mod sign;
pub mod tables;
pub mod verify;

use std::path::PathBuf;

use ipnet::IpNet;
use postern_common::config::{ConfigDuration, ConfigError};
use serde::{Deserialize, Serialize};

pub use sign::{Dkim, SignRequest, Signer};
pub use verify::{VerifyVerdict, authentication_results};

/// What the milter does with a message: sign, verify, or both depending on the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Sign only.
    #[serde(rename = "s")]
    Sign,
    /// Verify only.
    #[serde(rename = "v")]
    Verify,
    /// Sign mail from trusted clients, verify the rest (opendkim's default).
    #[serde(rename = "sv", alias = "vs")]
    SignVerify,
}

impl Mode {
    /// Signing enabled.
    pub fn signs(self) -> bool {
        matches!(self, Self::Sign | Self::SignVerify)
    }
    /// Verification enabled.
    pub fn verifies(self) -> bool {
        matches!(self, Self::Verify | Self::SignVerify)
    }
}

/// opendkim's On-* actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Deliver (with the Authentication-Results header).
    #[serde(alias = "a")]
    Accept,
    /// Reject with 550 5.7.x.
    #[serde(alias = "r")]
    Reject,
    /// Temporary failure, 451 4.7.x.
    #[serde(alias = "t")]
    Tempfail,
    /// Hold in Postfix's hold queue.
    #[serde(alias = "q")]
    Quarantine,
    /// Accept and drop silently.
    #[serde(alias = "d")]
    Discard,
}

/// Canonicalization, `header/body`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Canon {
    /// Header canonicalization is relaxed.
    pub header_relaxed: bool,
    /// Body canonicalization is relaxed.
    pub body_relaxed: bool,
}

/// One key in the native TOML form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Signing domain (`d=`); mail whose From domain is this (or a subdomain, with
    /// `sub_domains`) is signed with this key.
    pub domain: String,
    /// Selector (`s=`).
    pub selector: String,
    /// PEM private key (RSA PKCS#1/PKCS#8 or Ed25519 PKCS#8).
    pub key_file: PathBuf,
}

/// The `[dkim]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DkimConfig {
    /// `s` (sign), `v` (verify) or `sv` (opendkim's Mode).
    pub mode: Mode,
    /// opendkim KeyTable: a path, `file:/path` or `refile:/path` (`keyname
    /// domain:selector:/key/file`). Empty: not used.
    pub key_table: String,
    /// opendkim SigningTable: `refile:/path` (wildcard patterns, file order) or `file:/path` /
    /// a path (exact lookups in opendkim's order). Needs `key_table`.
    pub signing_table: String,
    /// Sign with every SigningTable match rather than the first (opendkim's
    /// MultipleSignatures; on by default so that RSA and Ed25519 keys for one domain both sign).
    pub multiple_signatures: bool,
    /// Single-key form (opendkim Domain): domains signed with `selector` and `key_file`.
    pub domain: Vec<String>,
    /// Single-key form: the selector.
    pub selector: String,
    /// Single-key form: the key file.
    pub key_file: PathBuf,
    /// Native form: keys, each signing its own domain; several keys for one domain all sign.
    pub keys: Vec<KeyConfig>,
    /// Also sign subdomains of `domain` / `keys` domains (opendkim SubDomains).
    pub sub_domains: bool,
    /// Clients whose mail is signed (opendkim InternalHosts).
    pub internal_hosts: Vec<IpNet>,
    /// Values of the `{daemon_name}` macro whose mail is signed (opendkim MTA), e.g.
    /// "ORIGINATING" with `-o milter_macro_daemon_name=ORIGINATING` on the submission service.
    pub mta: Vec<String>,
    /// `header/body` canonicalization: simple or relaxed each.
    pub canonicalization: String,
    /// Header fields to sign (opendkim SignHeaders). Empty: RFC 6376 §5.4.1's list, as
    /// libopendkim. `["*"]`: every header except `omit_headers`.
    pub sign_headers: Vec<String>,
    /// Header fields never signed (opendkim OmitHeaders); added to RFC 6376 §5.4's list.
    pub omit_headers: Vec<String>,
    /// Header fields signed once more than they occur, so none can be added (OversignHeaders).
    pub oversign_headers: Vec<String>,
    /// Signature lifetime (`x=`); 0: no expiry (opendkim SignatureTTL).
    pub signature_ttl: ConfigDuration,
    /// RSA keys smaller than this are refused at load (opendkim MinimumKeyBits).
    pub minimum_key_bits: usize,
    /// Refuse key files readable or writable by group or others (opendkim RequireSafeKeys).
    pub require_safe_keys: bool,
    /// DKIM-Signature headers evaluated per message; more are ignored and logged
    /// (opendkim MaximumSignaturesToVerify).
    pub max_signatures: usize,
    /// Messages larger than this many bytes are passed unsigned and unverified (logged).
    pub max_message_size: usize,
    /// Action for a signature that does not verify (On-BadSignature).
    pub on_bad_signature: Action,
    /// Action for a message without signatures (On-NoSignature).
    pub on_no_signature: Action,
    /// Action when the signer's key is not in DNS (On-KeyNotFound).
    pub on_key_not_found: Action,
    /// Action on a DNS failure (On-DNSError).
    pub on_dns_error: Action,
    /// Action on an internal error, such as an unparseable message or a failed signing
    /// (On-InternalError).
    pub on_internal_error: Action,
}

impl Default for DkimConfig {
    fn default() -> Self {
        Self {
            mode: Mode::SignVerify,
            key_table: String::new(),
            signing_table: String::new(),
            multiple_signatures: true,
            domain: Vec::new(),
            selector: String::new(),
            key_file: PathBuf::new(),
            keys: Vec::new(),
            sub_domains: false,
            internal_hosts: vec![
                "127.0.0.1/32".parse().expect("literal"),
                "::1/128".parse().expect("literal"),
            ],
            mta: Vec::new(),
            canonicalization: "relaxed/simple".to_owned(),
            sign_headers: Vec::new(),
            omit_headers: Vec::new(),
            oversign_headers: vec!["From".to_owned()],
            signature_ttl: ConfigDuration::from_secs(0),
            minimum_key_bits: 1024,
            require_safe_keys: true,
            max_signatures: 5,
            max_message_size: 64 * 1024 * 1024,
            on_bad_signature: Action::Accept,
            on_no_signature: Action::Accept,
            on_key_not_found: Action::Accept,
            on_dns_error: Action::Tempfail,
            on_internal_error: Action::Tempfail,
        }
    }
}

impl DkimConfig {
    /// Parses `canonicalization`.
    pub fn canon(&self) -> Result<Canon, ConfigError> {
        let text = self.canonicalization.to_ascii_lowercase();
        let (header, body) = text.split_once('/').unwrap_or((text.as_str(), "simple"));
        let relaxed = |part: &str| match part {
            "relaxed" => Ok(true),
            "simple" => Ok(false),
            _ => Err(ConfigError::invalid(
                "dkim.canonicalization",
                format!(
                    "{:?}: expected \"header/body\" with simple or relaxed each, such as \"relaxed/simple\"",
                    self.canonicalization
                ),
            )),
        };
        Ok(Canon {
            header_relaxed: relaxed(header)?,
            body_relaxed: relaxed(body)?,
        })
    }

    /// Cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.canon()?;
        if self.key_table.is_empty() != self.signing_table.is_empty() {
            return Err(ConfigError::invalid(
                "dkim.signing_table",
                "key_table and signing_table go together",
            ));
        }
        if !self.domain.is_empty()
            && (self.selector.is_empty() || self.key_file.as_os_str().is_empty())
        {
            return Err(ConfigError::invalid(
                "dkim.domain",
                "the single-key form needs domain, selector and key_file",
            ));
        }
        if self.max_signatures == 0 {
            return Err(ConfigError::invalid(
                "dkim.max_signatures",
                "must be at least 1",
            ));
        }
        if self
            .sign_headers
            .iter()
            .any(|h| h.eq_ignore_ascii_case("from"))
            && self
                .omit_headers
                .iter()
                .any(|h| h.eq_ignore_ascii_case("from"))
        {
            return Err(ConfigError::invalid(
                "dkim.omit_headers",
                "From must be signed",
            ));
        }
        Ok(())
    }
}

/// `dns-check`: looks up each configured selector and says whether the published key matches
/// the private key. Writes one line per key; returns how many are wrong or missing.
pub async fn dns_check(
    auth: &mail_auth::MessageAuthenticator,
    dkim: &Dkim,
    out: &mut impl std::io::Write,
) -> std::io::Result<usize> {
    let mut bad = 0usize;
    let mut seen: Vec<(String, String)> = Vec::new();
    let keys = dkim.all_keys();
    if keys.is_empty() {
        writeln!(out, "no signing keys configured")?;
    }
    for signer in keys {
        if seen.contains(&(signer.domain.clone(), signer.selector.clone())) {
            continue;
        }
        seen.push((signer.domain.clone(), signer.selector.clone()));
        if signer.domain == "%" {
            writeln!(
                out,
                "skip  {}._domainkey.<sender domain>: the domain is the sender's (%), check each domain by hand",
                signer.selector
            )?;
            continue;
        }
        let name = format!("{}._domainkey.{}", signer.selector, signer.domain);
        match auth.txt_raw_lookup(format!("{name}.")).await {
            Ok(record) => {
                let record = String::from_utf8_lossy(&record);
                match keys::published_matches(&record, &signer.key) {
                    Ok(()) => writeln!(
                        out,
                        "ok    {name}: {} {}-bit key matches",
                        signer.key.kind, signer.key.bits
                    )?,
                    Err(why) => {
                        bad += 1;
                        writeln!(out, "FAIL  {name}: {why}")?;
                    }
                }
            }
            Err(err) => {
                bad += 1;
                writeln!(out, "FAIL  {name}: lookup failed: {err}")?;
            }
        }
    }
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_opendkim_and_the_issue() {
        let config = DkimConfig::default();
        config.validate().unwrap();
        assert_eq!(
            config.canon().unwrap(),
            Canon {
                header_relaxed: true,
                body_relaxed: false
            }
        );
        assert_eq!(config.on_dns_error, Action::Tempfail);
        assert_eq!(config.on_bad_signature, Action::Accept);
    }

    #[test]
    fn opendkim_values_parse() {
        let config: DkimConfig = toml::from_str(
            "mode = \"v\"\non_bad_signature = \"r\"\non_no_signature = \"quarantine\"\ncanonicalization = \"simple/relaxed\"\n",
        )
        .unwrap();
        assert_eq!(config.mode, Mode::Verify);
        assert_eq!(config.on_bad_signature, Action::Reject);
        assert_eq!(config.on_no_signature, Action::Quarantine);
        assert!(config.canon().unwrap().body_relaxed);
        let bad: DkimConfig = toml::from_str("canonicalization = \"loose\"\n").unwrap();
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("canonicalization")
        );
        assert!(toml::from_str::<DkimConfig>("mode = \"x\"\n").is_err());
        assert!(toml::from_str::<DkimConfig>("unknown = 1\n").is_err());
        let half: DkimConfig = toml::from_str("key_table = \"/k\"\n").unwrap();
        assert!(half.validate().is_err());
    }
}
