//! DKIM verification as opendkim reports it: every signature up to a maximum, one
//! Authentication-Results header in opendkim's format, the On-* action the results call for, and
//! spotting Authentication-Results headers that forge our authserv-id.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use mail_auth::dkim::{DkimError, Signature};
use mail_auth::{
    AuthenticatedMessage, DkimOutput, DkimResult, DnsError, Error, MessageAuthenticator,
};

use super::keys::published_key_bits;
use super::{Action, DkimConfig};

/// The shortest `header.b=` prefix opendkim prints (libopendkim MINSIGLEN).
const MIN_HEADER_B: usize = 8;

/// One `dkim=` result of the Authentication-Results header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArEntry {
    /// pass, fail, neutral, permerror, temperror, none.
    pub result: &'static str,
    /// Why, when not pass.
    pub reason: Option<String>,
    /// Key size when the key was fetched.
    pub bits: Option<usize>,
    /// d=, i=, a=, s=, full b= (base64); empty when the signature did not parse.
    pub d: String,
    /// i= (defaults to "@d").
    pub i: String,
    /// a=.
    pub a: String,
    /// s=.
    pub s: String,
    /// b= in base64.
    pub b: String,
}

/// What verification concluded for the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyVerdict {
    /// The action the On-* settings give.
    pub action: Action,
    /// Which case applied: "pass", "no signature", "bad signature", "key not found",
    /// "dns error".
    pub case: &'static str,
}

/// Marks DKIM-Signature headers beyond `max` so that mail-auth does not evaluate them;
/// returns how many were dropped. Their outputs are the [`DkimOutput`]s without a signature
/// after the first `errors_before` (see [`entries`]).
pub fn limit_signatures(message: &mut AuthenticatedMessage<'_>, max: usize) -> (usize, usize) {
    let errors_before = message
        .errors()
        .iter()
        .filter(|e| matches!(e.header, Error::Dkim(_)))
        .count();
    let mut seen = 0usize;
    let mut dropped = 0usize;
    message.retain_dkim_signatures(|_| {
        seen += 1;
        if seen > max {
            dropped += 1;
            Err(DkimError::UnsupportedVersion)
        } else {
            Ok(())
        }
    });
    (errors_before, dropped)
}

/// Verifies every DKIM signature (after [`limit_signatures`]).
pub async fn verify<'x>(
    auth: &MessageAuthenticator,
    message: &'x AuthenticatedMessage<'x>,
) -> Vec<DkimOutput<'x>> {
    auth.verify_dkim(message).await
}

fn result_name(result: &DkimResult) -> &'static str {
    match result {
        DkimResult::Pass => "pass",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::Fail(_) => "fail",
        DkimResult::PermError(_) => "permerror",
        DkimResult::TempError(_) => "temperror",
        DkimResult::None => "none",
    }
}

/// opendkim-like reason text for an error.
pub fn reason(error: &Error) -> String {
    match error {
        Error::Dkim(DkimError::BodyHashMismatch) => "body hash did not verify".to_owned(),
        Error::Dkim(DkimError::SignatureExpired) => "signature expired".to_owned(),
        Error::Dkim(DkimError::AuidMismatch) => "i= domain mismatch".to_owned(),
        Error::Dkim(DkimError::PublicKeyRevoked) => "key revoked".to_owned(),
        Error::Dkim(DkimError::UnsupportedAlgorithm) => "unsupported algorithm".to_owned(),
        Error::Dkim(DkimError::UnsupportedKeyType) => "unsupported key type".to_owned(),
        Error::Crypto(_) => "signature verification failed".to_owned(),
        Error::Dns(DnsError::RecordNotFound(_)) => "key not found".to_owned(),
        Error::Dns(DnsError::Resolver(_)) => "key DNS query failed".to_owned(),
        Error::Dns(DnsError::InvalidRecordType) | Error::Parse | Error::Base64 => {
            "key syntax error".to_owned()
        }
        other => other.to_string().to_ascii_lowercase(),
    }
}

fn error_of(result: &DkimResult) -> Option<&Error> {
    match result {
        DkimResult::Neutral(e)
        | DkimResult::Fail(e)
        | DkimResult::PermError(e)
        | DkimResult::TempError(e) => Some(e),
        DkimResult::Pass | DkimResult::None => None,
    }
}

/// The key size as published, looked up again (hickory answers from its cache) for the
/// "(2048-bit key)" comment; only when the key was fetched.
pub async fn key_bits(auth: &MessageAuthenticator, output: &DkimOutput<'_>) -> Option<usize> {
    let signature = output.signature()?;
    if !matches!(
        output.result(),
        DkimResult::Pass | DkimResult::Fail(Error::Crypto(_))
    ) {
        return None;
    }
    let name = format!("{}._domainkey.{}.", signature.s, signature.d);
    let record = auth.txt_raw_lookup(name).await.ok()?;
    published_key_bits(&String::from_utf8_lossy(&record))
}

/// Turns outputs into A-R entries, skipping the outputs of signatures dropped by
/// [`limit_signatures`]. `bits[n]` is the key size of `outputs[n]`.
pub fn entries(
    outputs: &[DkimOutput<'_>],
    errors_before: usize,
    bits: &[Option<usize>],
) -> Vec<ArEntry> {
    let mut out = Vec::new();
    let mut unsigned_seen = 0usize;
    for (n, output) in outputs.iter().enumerate() {
        let signature: Option<&Signature> = output.signature();
        if signature.is_none() {
            unsigned_seen += 1;
            if unsigned_seen > errors_before {
                continue;
            }
        }
        let mut entry = ArEntry {
            result: result_name(output.result()),
            reason: error_of(output.result()).map(reason),
            bits: bits.get(n).copied().flatten(),
            d: String::new(),
            i: String::new(),
            a: String::new(),
            s: String::new(),
            b: String::new(),
        };
        if let Some(sig) = signature {
            entry.d = sig.d.clone();
            entry.i = if sig.i.is_empty() {
                format!("@{}", sig.d)
            } else {
                sig.i.clone()
            };
            entry.a = match sig.a {
                mail_auth::crypto::Algorithm::RsaSha1 => "rsa-sha1",
                mail_auth::crypto::Algorithm::RsaSha256 => "rsa-sha256",
                mail_auth::crypto::Algorithm::Ed25519Sha256 => "ed25519-sha256",
                _ => "unknown",
            }
            .to_owned();
            entry.s = sig.s.clone();
            entry.b = BASE64.encode(&sig.b);
        }
        out.push(entry);
    }
    out
}

/// The On-* action the results call for.
pub fn verdict(entries: &[ArEntry], config: &DkimConfig) -> VerifyVerdict {
    let has = |result: &str| entries.iter().any(|e| e.result == result);
    let (action, case) = if entries.is_empty() {
        (config.on_no_signature, "no signature")
    } else if has("pass") {
        (Action::Accept, "pass")
    } else if has("temperror") {
        (config.on_dns_error, "dns error")
    } else if entries
        .iter()
        .any(|e| e.result == "permerror" && e.reason.as_deref() == Some("key not found"))
    {
        (config.on_key_not_found, "key not found")
    } else {
        (config.on_bad_signature, "bad signature")
    };
    VerifyVerdict { action, case }
}

/// The shortest prefix of `b` (at least 8 characters) that no other signature shares.
fn unique_prefix<'a>(b: &'a str, all: &[&str]) -> &'a str {
    let mut len = MIN_HEADER_B.min(b.len());
    while len < b.len()
        && all
            .iter()
            .any(|other| *other != b && other.starts_with(&b[..len]))
    {
        len += 1;
    }
    &b[..len]
}

/// The Authentication-Results value (without the field name), opendkim's format: the
/// authserv-id, then each result on its own line (`;\n\t`); `dkim=none` when unsigned.
pub fn authentication_results(authserv_id: &str, entries: &[ArEntry]) -> String {
    let mut out = format!("{authserv_id};");
    if entries.is_empty() {
        out.push_str("\n\tdkim=none");
        return out;
    }
    let all_b: Vec<&str> = entries.iter().map(|e| e.b.as_str()).collect();
    for (n, entry) in entries.iter().enumerate() {
        if n > 0 {
            out.push(';');
        }
        out.push_str("\n\tdkim=");
        out.push_str(entry.result);
        if let Some(reason) = &entry.reason {
            out.push_str(&format!(" reason=\"{}\"", reason.replace('"', "'")));
        }
        if let Some(bits) = entry.bits {
            out.push_str(&format!(" ({bits}-bit key)"));
        }
        if !entry.d.is_empty() {
            out.push_str(&format!(
                " header.d={} header.i={} header.a={} header.s={}",
                entry.d, entry.i, entry.a, entry.s
            ));
            if !entry.b.is_empty() {
                out.push_str(" header.b=");
                out.push_str(unique_prefix(&entry.b, &all_b));
            }
        }
    }
    out
}

/// The authserv-id an Authentication-Results value claims (comments skipped, any
/// "/jobid" or version dropped).
pub fn claimed_authserv_id(value: &str) -> String {
    let mut text = value.trim_start();
    while let Some(rest) = text.strip_prefix('(') {
        let mut depth = 1usize;
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        text = rest[end.min(rest.len())..].trim_start();
    }
    let token = text
        .split([';', ' ', '\t', '\r', '\n', '('])
        .next()
        .unwrap_or("");
    token.split('/').next().unwrap_or("").to_ascii_lowercase()
}

/// 1-based instance numbers of the Authentication-Results headers that claim `authserv_id`
/// (RFC 8601 §5: remove them before adding ours), highest first so that deleting one does
/// not renumber the next.
pub fn forged_instances(headers: &[(String, String)], authserv_id: &str) -> Vec<u32> {
    let ours = authserv_id.to_ascii_lowercase();
    let mut instance = 0u32;
    let mut out = Vec::new();
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("Authentication-Results") {
            instance += 1;
            if claimed_authserv_id(value) == ours {
                out.push(instance);
            }
        }
    }
    out.reverse();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(result: &'static str, b: &str) -> ArEntry {
        ArEntry {
            result,
            reason: None,
            bits: Some(2048),
            d: "example.com".into(),
            i: "@example.com".into(),
            a: "rsa-sha256".into(),
            s: "sel".into(),
            b: b.into(),
        }
    }

    #[test]
    fn opendkim_format() {
        let header = authentication_results(
            "mx.example.net",
            &[entry("pass", "AbCdEfGhIjKl"), entry("pass", "AbCdEfGhXyZ")],
        );
        assert_eq!(
            header,
            "mx.example.net;\n\tdkim=pass (2048-bit key) header.d=example.com header.i=@example.com header.a=rsa-sha256 header.s=sel header.b=AbCdEfGhI;\n\tdkim=pass (2048-bit key) header.d=example.com header.i=@example.com header.a=rsa-sha256 header.s=sel header.b=AbCdEfGhX"
        );
        assert_eq!(
            authentication_results("mx.example.net", &[]),
            "mx.example.net;\n\tdkim=none"
        );
        let mut failed = entry("neutral", "QUJD");
        failed.reason = Some("body hash did not verify".into());
        failed.bits = None;
        assert_eq!(
            authentication_results("mx", &[failed]),
            "mx;\n\tdkim=neutral reason=\"body hash did not verify\" header.d=example.com header.i=@example.com header.a=rsa-sha256 header.s=sel header.b=QUJD"
        );
    }

    #[test]
    fn verdicts_follow_on_settings() {
        let config = DkimConfig {
            on_bad_signature: Action::Reject,
            on_no_signature: Action::Quarantine,
            ..DkimConfig::default()
        };
        assert_eq!(verdict(&[], &config).action, Action::Quarantine);
        assert_eq!(
            verdict(&[entry("fail", "x")], &config).action,
            Action::Reject
        );
        assert_eq!(
            verdict(&[entry("fail", "x"), entry("pass", "y")], &config).action,
            Action::Accept
        );
        assert_eq!(
            verdict(&[entry("temperror", "x")], &config).action,
            Action::Tempfail
        );
        let mut missing = entry("permerror", "x");
        missing.reason = Some("key not found".into());
        assert_eq!(verdict(&[missing], &config).case, "key not found");
    }

    #[test]
    fn forged_results_are_found() {
        assert_eq!(
            claimed_authserv_id(" MX.example.net; dkim=pass"),
            "mx.example.net"
        );
        assert_eq!(
            claimed_authserv_id("(c) mx.example.net/1234 1; spf=pass"),
            "mx.example.net"
        );
        assert_eq!(
            claimed_authserv_id("mx.example.net;\n\tdkim=pass"),
            "mx.example.net"
        );
        let headers = vec![
            (
                "Authentication-Results".to_owned(),
                "other.example; dkim=pass".to_owned(),
            ),
            ("Subject".to_owned(), "x".to_owned()),
            (
                "authentication-results".to_owned(),
                " mx.example.net; dkim=pass".to_owned(),
            ),
            (
                "Authentication-Results".to_owned(),
                "mx.example.net; spf=pass".to_owned(),
            ),
        ];
        assert_eq!(forged_instances(&headers, "mx.example.net"), [3, 2]);
        assert!(forged_instances(&headers, "nobody.example").is_empty());
    }

    #[test]
    fn unique_prefixes() {
        assert_eq!(unique_prefix("abcdefghij", &["abcdefghij"]), "abcdefgh");
        assert_eq!(unique_prefix("abc", &["abc"]), "abc");
        assert_eq!(
            unique_prefix("abcdefghij", &["abcdefghij", "abcdefghik"]),
            "abcdefghij"
        );
    }
}
