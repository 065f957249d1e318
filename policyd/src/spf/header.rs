//! The exact text policyd-spf (spf-engine 3.0.4) writes: `Received-SPF:` with its comment
//! forms, the `Authentication-Results:` form of python-authres, the `X-Comment:` bypass headers
//! and the reject/defer reason with the openspf URL. Pure string building.

use super::config::HeaderType;

/// An SPF result as policyd-spf spells it (pyspf's result, capitalised).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpfResult {
    /// The client is authorised.
    Pass,
    /// The client is not authorised.
    Fail,
    /// The client is probably not authorised.
    Softfail,
    /// The domain makes no assertion.
    Neutral,
    /// No SPF record (or no valid domain).
    None,
    /// A transient DNS error.
    Temperror,
    /// A broken record or an exceeded limit.
    Permerror,
}

impl SpfResult {
    /// Every result, for table tests.
    pub const ALL: [SpfResult; 7] = [
        Self::Pass,
        Self::Fail,
        Self::Softfail,
        Self::Neutral,
        Self::None,
        Self::Temperror,
        Self::Permerror,
    ];

    /// "Pass", "Fail", "Softfail", ... as in Received-SPF.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pass => "Pass",
            Self::Fail => "Fail",
            Self::Softfail => "Softfail",
            Self::Neutral => "Neutral",
            Self::None => "None",
            Self::Temperror => "Temperror",
            Self::Permerror => "Permerror",
        }
    }

    /// "pass", "fail", ... as in Authentication-Results (authres lower-cases results).
    pub fn lower(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Fail => "fail",
            Self::Softfail => "softfail",
            Self::Neutral => "neutral",
            Self::None => "none",
            Self::Temperror => "temperror",
            Self::Permerror => "permerror",
        }
    }

    /// pyspf's explanation for a result without a published `exp=` (spf.py `EXPLANATIONS`).
    pub fn default_explanation(self) -> &'static str {
        match self {
            Self::Pass => "sender SPF authorized",
            Self::Fail => "SPF fail - not authorized",
            Self::Softfail => "domain owner discourages use of this host",
            Self::Neutral => "access neither permitted nor denied",
            Self::None => "",
            Self::Temperror => "temporary DNS error in processing",
            Self::Permerror => "permanent error in processing",
        }
    }

    /// TempError and PermError answer with `5.7.24` instead of `5.7.23` (RFC 7372).
    pub fn is_error(self) -> bool {
        matches!(self, Self::Temperror | Self::Permerror)
    }
}

/// The identity a result is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// The HELO/EHLO name.
    Helo,
    /// The MAIL FROM address.
    MailFrom,
}

impl Identity {
    /// `identity=` value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Helo => "helo",
            Self::MailFrom => "mailfrom",
        }
    }

    /// `s=` value of the openspf URL.
    fn url_scope(self) -> &'static str {
        match self {
            Self::Helo => "helo",
            Self::MailFrom => "mfrom",
        }
    }
}

/// The message facts every header repeats.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The address checked (`client-ip=`).
    pub ip: &'a str,
    /// The HELO name used (the sender's domain or "unknown" when the client sent none).
    pub helo: &'a str,
    /// The envelope sender, `<>` for the null sender in HELO headers.
    pub envelope_from: &'a str,
    /// The recipient's domain, `<UNKNOWN>` with hide_receiver, `none` without recipient.
    pub receiver: &'a str,
}

/// The header recording one identity's result.
///
/// Received-SPF: the HELO form carries the explanation in the comment, the MAIL FROM form the
/// literal `(mailfrom)` (policyd-spf's asymmetry), and both end with a space.
pub fn result_header(
    header_type: HeaderType,
    authserv_id: &str,
    identity: Identity,
    result: SpfResult,
    reason: &str,
    facts: &Facts<'_>,
) -> String {
    match header_type {
        HeaderType::AuthenticationResults => {
            let (property, value) = match identity {
                Identity::Helo => ("smtp.helo", facts.helo),
                Identity::MailFrom => ("smtp.mailfrom", domain_of(facts.envelope_from)),
            };
            let mut out = format!(
                "Authentication-Results: {authserv_id}; spf={}",
                result.lower()
            );
            if !reason.is_empty() {
                out.push_str(&format!(" ({reason})"));
            }
            if !value.is_empty() {
                out.push_str(&format!(
                    " {property}={} (client-ip={}; helo={}; envelope-from={}; receiver={})",
                    quote_if_needed(value),
                    facts.ip,
                    facts.helo,
                    facts.envelope_from,
                    facts.receiver
                ));
            }
            out
        }
        // HeaderType::None never reaches the wire (the answer becomes dunno) but the text is
        // still logged, as policyd-spf does.
        HeaderType::ReceivedSpf | HeaderType::None => {
            let comment = match identity {
                Identity::Helo => reason,
                Identity::MailFrom => "mailfrom",
            };
            format!(
                "Received-SPF: {} ({comment}) identity={}; client-ip={}; helo={}; envelope-from={}; receiver={} ",
                result.name(),
                identity.name(),
                facts.ip,
                facts.helo,
                facts.envelope_from,
                facts.receiver
            )
        }
    }
}

/// Why a client was not checked (policyd-spf `_spfbypass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bypass {
    /// `skip_addresses`.
    Local,
    /// `whitelist`.
    Relay,
    /// `domain_whitelist`.
    RelayDomain,
    /// `helo_whitelist`.
    HeloDomain,
    /// `domain_whitelist_ptr`.
    PtrRelayDomain,
}

impl Bypass {
    /// The comment opening the header.
    pub fn comment(self) -> &'static str {
        match self {
            Self::Local => "SPF check N/A for local connections - ",
            Self::Relay => "SPF skipped for whitelisted relay - ",
            Self::RelayDomain => "SPF skipped for whitelisted relay domain - ",
            Self::HeloDomain => "SPF skipped for whitelisted HELO domain - ",
            Self::PtrRelayDomain => "SPF skipped for PTR whitelisted relay domain - ",
        }
    }

    /// For logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "skip_addresses",
            Self::Relay => "whitelist",
            Self::RelayDomain => "domain_whitelist",
            Self::HeloDomain => "helo_whitelist",
            Self::PtrRelayDomain => "domain_whitelist_ptr",
        }
    }
}

/// The request's own values for a bypass header: absent attributes read `<UNKNOWN>`.
#[derive(Debug, Clone, Copy)]
pub struct RawFacts<'a> {
    /// `client_address`.
    pub client_address: Option<&'a str>,
    /// `helo_name`.
    pub helo_name: Option<&'a str>,
    /// `sender`.
    pub sender: Option<&'a str>,
    /// The receiver as in [`Facts`].
    pub receiver: &'a str,
}

/// The header of a bypassed client: `X-Comment: <comment>client-ip=...; receiver=... ` or, with
/// Authentication-Results, `spf`-less `none (<comment> client-ip=...)` (the double space is
/// policyd-spf's).
pub fn bypass_header(
    header_type: HeaderType,
    authserv_id: &str,
    bypass: Bypass,
    raw: &RawFacts<'_>,
) -> String {
    let unknown = "<UNKNOWN>";
    let (ip, helo, sender) = (
        raw.client_address.unwrap_or(unknown),
        raw.helo_name.unwrap_or(unknown),
        raw.sender.unwrap_or(unknown),
    );
    match header_type {
        HeaderType::AuthenticationResults => format!(
            "Authentication-Results: {authserv_id}; none ({} client-ip={ip}; helo={helo}; envelope-from={sender}; receiver={})",
            bypass.comment(),
            raw.receiver
        ),
        HeaderType::ReceivedSpf | HeaderType::None => format!(
            "X-Comment: {}client-ip={ip}; helo={helo}; envelope-from={sender}; receiver={} ",
            bypass.comment(),
            raw.receiver
        ),
    }
}

/// policyd-spf's reject/defer text: `reason_message` with `{rejectdefer}`, `{spf}` and `{url}`
/// filled in (Python `str.format`, so `{{` and `}}` are literal braces).
pub fn reason_text(
    template: &str,
    defer: bool,
    explanation: &str,
    identity: Identity,
    id: &str,
    ip: &str,
    receiver: &str,
) -> String {
    let url = format!(
        "http://www.openspf.net/Why?s={};id={id};ip={ip};r={receiver}",
        identity.url_scope()
    );
    let rejectdefer = if defer { "deferred" } else { "rejected" };
    let mut out = String::with_capacity(template.len() + url.len() + explanation.len());
    let mut rest = template;
    while let Some(pos) = rest.find(['{', '}']) {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        if tail.starts_with('{')
            && let Some(end) = tail.find('}')
        {
            match &tail[1..end] {
                "rejectdefer" => out.push_str(rejectdefer),
                "spf" => out.push_str(explanation),
                "url" => out.push_str(&url),
                other => {
                    // validate() refuses unknown placeholders; keep them verbatim if one slips by.
                    out.push('{');
                    out.push_str(other);
                    out.push('}');
                }
            }
            rest = &tail[end + 1..];
            continue;
        }
        out.push_str(&tail[..1]);
        rest = &tail[1..];
    }
    out.push_str(rest);
    out
}

/// The domain of an address as pyspf's `split_email` sees it: after the first `@`, or the whole
/// string when there is none.
pub fn domain_of(address: &str) -> &str {
    address.split_once('@').map_or(address, |(_, d)| d)
}

/// authres `QuotableValue.quote_if_needed`: values with `@` or RFC 2045 token characters only
/// stay bare, anything else becomes a quoted-string.
fn quote_if_needed(value: &str) -> String {
    let is_token = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?=".contains(&b));
    if value.contains('@') || is_token {
        value.to_owned()
    } else {
        let mut out = String::with_capacity(value.len() + 2);
        out.push('"');
        for c in value.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FACTS: Facts<'static> = Facts {
        ip: "192.0.2.1",
        helo: "mail.example.com",
        envelope_from: "user@example.com",
        receiver: "example.net",
    };

    #[test]
    fn received_spf_forms() {
        assert_eq!(
            result_header(
                HeaderType::ReceivedSpf,
                "mx",
                Identity::MailFrom,
                SpfResult::Pass,
                "sender SPF authorized",
                &FACTS
            ),
            "Received-SPF: Pass (mailfrom) identity=mailfrom; client-ip=192.0.2.1; helo=mail.example.com; envelope-from=user@example.com; receiver=example.net "
        );
        let helo = Facts {
            envelope_from: "<>",
            ..FACTS
        };
        assert_eq!(
            result_header(
                HeaderType::ReceivedSpf,
                "mx",
                Identity::Helo,
                SpfResult::None,
                "no SPF record",
                &helo
            ),
            "Received-SPF: None (no SPF record) identity=helo; client-ip=192.0.2.1; helo=mail.example.com; envelope-from=<>; receiver=example.net "
        );
    }

    #[test]
    fn authentication_results_forms() {
        assert_eq!(
            result_header(
                HeaderType::AuthenticationResults,
                "mx.example.net",
                Identity::MailFrom,
                SpfResult::Softfail,
                "domain owner discourages use of this host",
                &FACTS
            ),
            "Authentication-Results: mx.example.net; spf=softfail (domain owner discourages use of this host) smtp.mailfrom=example.com (client-ip=192.0.2.1; helo=mail.example.com; envelope-from=user@example.com; receiver=example.net)"
        );
        let literal = Facts {
            helo: "[192.0.2.1]",
            ..FACTS
        };
        assert_eq!(
            result_header(
                HeaderType::AuthenticationResults,
                "mx",
                Identity::Helo,
                SpfResult::None,
                "no SPF record",
                &literal
            ),
            "Authentication-Results: mx; spf=none (no SPF record) smtp.helo=\"[192.0.2.1]\" (client-ip=192.0.2.1; helo=[192.0.2.1]; envelope-from=user@example.com; receiver=example.net)"
        );
    }

    #[test]
    fn bypass_headers() {
        let raw = RawFacts {
            client_address: Some("127.0.0.1"),
            helo_name: Some("localhost"),
            sender: None,
            receiver: "<UNKNOWN>",
        };
        assert_eq!(
            bypass_header(HeaderType::ReceivedSpf, "mx", Bypass::Local, &raw),
            "X-Comment: SPF check N/A for local connections - client-ip=127.0.0.1; helo=localhost; envelope-from=<UNKNOWN>; receiver=<UNKNOWN> "
        );
        assert_eq!(
            bypass_header(HeaderType::AuthenticationResults, "mx", Bypass::Relay, &raw),
            "Authentication-Results: mx; none (SPF skipped for whitelisted relay -  client-ip=127.0.0.1; helo=localhost; envelope-from=<UNKNOWN>; receiver=<UNKNOWN>)"
        );
        for (bypass, text) in [
            (
                Bypass::RelayDomain,
                "SPF skipped for whitelisted relay domain - ",
            ),
            (
                Bypass::HeloDomain,
                "SPF skipped for whitelisted HELO domain - ",
            ),
            (
                Bypass::PtrRelayDomain,
                "SPF skipped for PTR whitelisted relay domain - ",
            ),
        ] {
            assert!(
                bypass_header(HeaderType::ReceivedSpf, "mx", bypass, &raw)
                    .starts_with(&format!("X-Comment: {text}client-ip="))
            );
        }
    }

    #[test]
    fn reason_message_placeholders() {
        assert_eq!(
            reason_text(
                super::super::config::DEFAULT_REASON_MESSAGE,
                false,
                "SPF fail - not authorized",
                Identity::MailFrom,
                "user@example.com",
                "192.0.2.1",
                "<UNKNOWN>"
            ),
            "Message rejected due to: SPF fail - not authorized. Please see http://www.openspf.net/Why?s=mfrom;id=user@example.com;ip=192.0.2.1;r=<UNKNOWN>"
        );
        assert_eq!(
            reason_text(
                "{{x}} {rejectdefer}: {spf} {other}",
                true,
                "e",
                Identity::Helo,
                "h",
                "i",
                "r"
            ),
            "{x} deferred: e {other}"
        );
    }

    #[test]
    fn quoting_follows_authres() {
        assert_eq!(quote_if_needed("example.com"), "example.com");
        assert_eq!(quote_if_needed("a@b"), "a@b");
        assert_eq!(quote_if_needed("a b\"c"), "\"a b\\\"c\"");
    }
}
