//! SPF results an upstream checker (postern-policyd, pypolicyd-spf) left in the message, trusted
//! only when they cannot have come from the sender:
//!
//! * only headers above the first `Received:` field, i.e. prepended by our own MTA for this hop
//!   (Postfix writes policy `PREPEND` headers before its own `Received:`, and shows that to the
//!   milter); anything below came with the message. A message without any `Received:` field
//!   has no trusted region;
//! * `Authentication-Results` only under a trusted authserv-id, `Received-SPF` only when its
//!   `receiver=` is a trusted name or hidden (`<UNKNOWN>`, pypolicyd-spf's default);
//! * only the MAIL FROM identity (`identity=mailfrom`, `smtp.mailfrom=`), and only when it names
//!   this message's envelope sender. Trusting a HELO result or another sender's result as the
//!   DMARC SPF input was CVE-2019-20790 in opendmarc.

use mail_auth::{AuthenticatedMessage, SpfResult};

/// The first trusted upstream SPF result for `envelope_from`, if any.
pub(crate) fn trusted_spf(
    message: &AuthenticatedMessage<'_>,
    trusted_ids: &[String],
    envelope_from: &str,
) -> Option<SpfResult> {
    if envelope_from.is_empty() {
        return None;
    }
    let headers = message.headers();
    let first_received = headers
        .iter()
        .position(|(name, _)| name.trim_ascii().eq_ignore_ascii_case(b"received"))?;
    headers[..first_received].iter().find_map(|(name, value)| {
        let value = String::from_utf8_lossy(value);
        let name = name.trim_ascii();
        if name.eq_ignore_ascii_case(b"authentication-results") {
            from_authentication_results(&value, trusted_ids, envelope_from)
        } else if name.eq_ignore_ascii_case(b"received-spf") {
            from_received_spf(&value, trusted_ids, envelope_from)
        } else {
            None
        }
    })
}

/// `Received-SPF: Pass (mailfrom) identity=mailfrom; client-ip=...; envelope-from=a@b; receiver=...`
pub(crate) fn from_received_spf(
    value: &str,
    trusted_ids: &[String],
    envelope_from: &str,
) -> Option<SpfResult> {
    let value = unfold(value);
    let result = parse_result(value.split_whitespace().next()?)?;
    let mut identity = None;
    let mut sender = None;
    let mut receiver = None;
    for (key, val) in key_values(&value) {
        match key.as_str() {
            "identity" => identity = Some(val.to_ascii_lowercase()),
            "envelope-from" => sender = Some(val),
            "receiver" => receiver = Some(val),
            _ => {}
        }
    }
    if identity.as_deref() != Some("mailfrom") {
        return None;
    }
    if !same_sender(sender.as_deref()?, envelope_from) {
        return None;
    }
    match receiver.as_deref() {
        None | Some("<UNKNOWN>") => {}
        Some(receiver) => {
            let receiver = receiver.to_ascii_lowercase();
            if !trusted_ids.contains(&receiver) {
                return None;
            }
        }
    }
    Some(result)
}

/// `Authentication-Results: id; spf=pass (comment) smtp.mailfrom=a@b; dkim=...`
pub(crate) fn from_authentication_results(
    value: &str,
    trusted_ids: &[String],
    envelope_from: &str,
) -> Option<SpfResult> {
    let value = strip_comments(&unfold(value));
    let mut parts = value.split(';');
    let authserv_id = parts
        .next()?
        .split_whitespace()
        .next()?
        .to_ascii_lowercase();
    if !trusted_ids.contains(&authserv_id) {
        return None;
    }
    parts.find_map(|part| {
        let mut words = part.split_whitespace();
        let (method, result) = words.next()?.split_once('=')?;
        if !method.eq_ignore_ascii_case("spf") {
            return None;
        }
        let result = parse_result(result)?;
        let mailfrom = words.find_map(|word| {
            let (key, val) = word.split_once('=')?;
            key.eq_ignore_ascii_case("smtp.mailfrom")
                .then(|| val.trim_matches('"'))
        })?;
        same_sender(mailfrom, envelope_from).then_some(result)
    })
}

/// Whether an identity written by the checker names the envelope sender: the whole address, or
/// (RFC 8601 allows it) its domain alone.
fn same_sender(written: &str, envelope_from: &str) -> bool {
    let written = written.trim_matches(['<', '>', '"']);
    let envelope_from = envelope_from.trim_matches(['<', '>']);
    if written.contains('@') {
        written.eq_ignore_ascii_case(envelope_from)
    } else {
        super::domain_of(envelope_from).eq_ignore_ascii_case(written.trim_end_matches('.'))
    }
}

fn parse_result(token: &str) -> Option<SpfResult> {
    Some(match token.to_ascii_lowercase().as_str() {
        "pass" => SpfResult::Pass,
        "fail" => SpfResult::Fail,
        "softfail" => SpfResult::SoftFail,
        "neutral" => SpfResult::Neutral,
        "none" => SpfResult::None,
        "temperror" | "tempfail" | "temperr" => SpfResult::TempError,
        "permerror" | "permfail" | "permerr" => SpfResult::PermError,
        _ => return None,
    })
}

fn unfold(value: &str) -> String {
    value.replace(['\r', '\n', '\t'], " ")
}

/// Removes RFC 5322 comments `( ... )` (nested), outside quoted strings.
fn strip_comments(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut depth = 0usize;
    let mut quoted = false;
    for ch in value.chars() {
        match ch {
            '"' if depth == 0 => {
                quoted = !quoted;
                out.push(ch);
            }
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(ch),
            _ => {}
        }
    }
    out
}

/// `key=value` pairs after the result and comment of a Received-SPF value.
fn key_values(value: &str) -> Vec<(String, String)> {
    strip_comments(value)
        .split([';', ' '])
        .filter_map(|part| {
            let (key, val) = part.trim().split_once('=')?;
            Some((
                key.trim().to_ascii_lowercase(),
                val.trim().trim_matches('"').to_owned(),
            ))
        })
        .collect()
}
