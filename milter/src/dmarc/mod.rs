//! DMARC evaluation (RFC 7489 / RFC 9989) in opendmarc's manner: its options, its
//! Authentication-Results form, its SMTP replies; and the record each evaluated message leaves in
//! the aggregate report store.
//!
//! The milter calls [`evaluate`] once per message at end-of-message with everything it knows
//! ([`DmarcInput`]) and acts on the [`DmarcDecision`]: insert [`DmarcDecision::header`] (and
//! [`DmarcDecision::spf_header`]) as `Authentication-Results`, apply [`DmarcDecision::action`],
//! and hand [`DmarcDecision::record`] to [`crate::reports::Recorder::record`] before answering.

mod config;
mod decide;
mod upstream;

#[cfg(test)]
pub(crate) mod tests;

use std::future::Future;
use std::net::IpAddr;

use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, DkimOutput, DkimResult, DmarcOutput, DmarcResult, MessageAuthenticator,
    Parameters, SpfOutput, SpfResult,
};

pub use config::{DmarcConfig, IgnoreHostsFile, TempErrorAction, read_ignore_hosts};
pub use decide::{DmarcAction, DmarcDecision, Facts, decide};

use crate::reports::{DkimAuth, PublishedPolicy};

/// Everything the milter knows about a message at end-of-message.
#[derive(Debug, Clone, Copy)]
pub struct DmarcInput<'a> {
    /// The SMTP client's address.
    pub client_ip: IpAddr,
    /// The HELO/EHLO name.
    pub helo: &'a str,
    /// The envelope sender without angle brackets; empty for the null sender `<>`.
    pub envelope_from: &'a str,
    /// The envelope recipients without angle brackets.
    pub envelope_to: &'a [String],
    /// Whether the client authenticated with SMTP AUTH (`{auth_authen}` set).
    pub authenticated: bool,
    /// The parsed message (headers and body as received).
    pub message: &'a AuthenticatedMessage<'a>,
    /// This milter's DKIM verification results for the message.
    pub dkim: &'a [DkimOutput<'a>],
    /// Our name in Authentication-Results (the milter's `authserv_id`, resolved).
    pub authserv_id: &'a str,
    /// The Postfix queue ID (`i` macro), for logs and the report store's job column.
    pub queue_id: &'a str,
    /// Now, seconds since the epoch (injected so tests are deterministic).
    pub now: u64,
}

/// Raw TXT lookups for the record tags mail-auth does not keep (`pct`, `ri`): RFC 9989 dropped
/// them, RFC 7489 reports and opendmarc's sampling still use them. [`MessageAuthenticator`]
/// implements it over the shared resolver; tests implement it over a map.
pub trait TxtSource: Sync {
    /// The TXT strings at `name` (FQDN without the trailing dot) joined, `Ok(None)` when the name
    /// has no TXT record, `Err(())` on a transient DNS failure.
    fn raw_txt(&self, name: &str) -> impl Future<Output = Result<Vec<String>, ()>> + Send;
}

impl TxtSource for MessageAuthenticator {
    async fn raw_txt(&self, name: &str) -> Result<Vec<String>, ()> {
        use mail_auth::hickory_resolver::proto::rr::RData;
        match self.resolver().txt_lookup(format!("{name}.")).await {
            Ok(answer) => Ok(answer
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|part| String::from_utf8_lossy(part).into_owned())
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect()),
            Err(err) if err.is_no_records_found() || err.is_nx_domain() => Ok(Vec::new()),
            Err(_) => Err(()),
        }
    }
}

/// Evaluates DMARC for one message and decides what to do with it. Never fails: DNS trouble
/// becomes `dmarc=temperror` and the configured [`TempErrorAction`].
///
/// `random` returns a number in `0..100` for `pct` sampling (opendmarc: `random() % 100 < pct`
/// means the policy applies).
pub async fn evaluate(
    config: &DmarcConfig,
    input: &DmarcInput<'_>,
    auth: &MessageAuthenticator,
    random: &mut (dyn FnMut() -> u8 + Send),
) -> DmarcDecision {
    evaluate_with(
        config,
        input,
        auth,
        None::<&mail_auth::dns::NoCache>,
        auth,
        random,
    )
    .await
}

/// [`evaluate`] with an explicit DNS cache (tests inject records through it) and tag source.
pub async fn evaluate_with<C: mail_auth::dns::DnsCache + Sync>(
    config: &DmarcConfig,
    input: &DmarcInput<'_>,
    auth: &MessageAuthenticator,
    cache: Option<&C>,
    tags: &impl TxtSource,
    random: &mut (dyn FnMut() -> u8 + Send),
) -> DmarcDecision {
    let facts = gather(config, input, auth, cache, tags).await;
    decide(config, input, &facts, random)
}

/// The DNS-dependent part: SPF (own or trusted upstream), the DMARC record and alignment.
async fn gather<C: mail_auth::dns::DnsCache + Sync>(
    config: &DmarcConfig,
    input: &DmarcInput<'_>,
    auth: &MessageAuthenticator,
    cache: Option<&C>,
    tags: &impl TxtSource,
) -> Facts {
    let from_domains = header_from_domains(input.message);
    let mut facts = Facts {
        from_domains: from_domains.clone(),
        ..Facts::default()
    };
    if config.ignored(input, &from_domains) {
        facts.ignored = true;
        return facts;
    }
    // SPF: the MAIL FROM identity, or HELO for the null sender (RFC 7489 §3.1.2).
    let (spf_domain, scope) = if input.envelope_from.is_empty() {
        (input.helo.to_ascii_lowercase(), "helo")
    } else {
        (domain_of(input.envelope_from), "mfrom")
    };
    facts.spf_domain = spf_domain.clone();
    facts.spf_scope = scope;
    let mut spf_output: Option<SpfOutput> = None;
    if !config.spf_ignore_results
        && let Some(result) = upstream::trusted_spf(
            input.message,
            &config.trusted_ids(input.authserv_id),
            input.envelope_from,
        )
    {
        facts.spf_source = "upstream";
        spf_output = Some(SpfOutput::new(spf_domain.clone()).with_result(result));
    }
    if spf_output.is_none() && config.spf_self_validate {
        let params = if input.envelope_from.is_empty() {
            SpfParameters::helo(input.client_ip, input.helo, input.authserv_id)
        } else {
            SpfParameters::mail_from(
                input.client_ip,
                input.helo,
                input.authserv_id,
                input.envelope_from,
            )
        };
        let output = match cache {
            Some(cache) => {
                auth.verify_spf(Parameters::new(params).with_cache(cache))
                    .await
            }
            None => auth.verify_spf(params).await,
        };
        facts.spf_source = "self";
        spf_output = Some(output);
    }
    let spf_output = spf_output.unwrap_or_else(|| SpfOutput::new(spf_domain.clone()));
    facts.spf_result = spf_output.result();

    facts.dkim = input
        .dkim
        .iter()
        .filter_map(|output| {
            let signature = output.signature()?;
            Some(DkimAuth {
                domain: signature.d.to_ascii_lowercase(),
                selector: signature.s.clone(),
                result: dkim_result_token(output.result()).to_owned(),
            })
        })
        .collect();

    if from_domains.len() != 1 {
        return facts;
    }
    let params = DmarcParameters::new(input.message, input.dkim, &spf_domain, &spf_output);
    let output: DmarcOutput = match cache {
        Some(cache) => {
            auth.verify_dmarc(Parameters::new(params).with_cache(cache))
                .await
        }
        None => auth.verify_dmarc(params).await,
    };
    facts.result = output.result();
    facts.dkim_aligned = output.dkim_result() == &DmarcResult::Pass;
    facts.spf_aligned = output.spf_result() == &DmarcResult::Pass;
    facts.policy = output.policy();
    if let Some(record) = output.record() {
        let (policy_domain, extra) = record_tags(tags, &from_domains[0]).await;
        facts.published = Some(PublishedPolicy {
            domain: policy_domain,
            adkim: record.adkim.to_string(),
            aspf: record.aspf.to_string(),
            p: record.p.to_string(),
            sp: record.sp.to_string(),
            np: record.np.to_string(),
            pct: extra.pct,
            fo: fo_token(&record.fo).to_owned(),
            rua: record
                .rua()
                .iter()
                .map(|uri| match uri.max_size() {
                    0 => uri.uri().to_owned(),
                    size => format!("{}!{size}", uri.uri()),
                })
                .collect(),
            ri: extra.ri,
        });
    }
    facts
}

/// Tags of the applicable record that mail-auth does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExtraTags {
    pub(crate) pct: u8,
    pub(crate) ri: u32,
}

impl Default for ExtraTags {
    fn default() -> Self {
        Self { pct: 100, ri: 0 }
    }
}

/// Finds the record again by walking from the author domain to its parents (the record mail-auth
/// applied is the author's own or an ancestor's) and returns its domain and `pct`/`ri`.
async fn record_tags(tags: &impl TxtSource, author: &str) -> (String, ExtraTags) {
    let labels: Vec<&str> = author.split('.').filter(|l| !l.is_empty()).collect();
    for start in 0..labels.len().saturating_sub(1) {
        let name = labels[start..].join(".");
        if let Ok(texts) = tags.raw_txt(&format!("_dmarc.{name}")).await
            && let Some(text) = texts
                .iter()
                .find(|t| t.trim_start().to_ascii_lowercase().starts_with("v=dmarc1"))
        {
            return (name, parse_extra_tags(text));
        }
    }
    (author.to_owned(), ExtraTags::default())
}

/// `pct=` (0..100, default 100) and `ri=` (seconds, at least an hour, at most a week; 0 when
/// absent) of a DMARC record's text.
pub(crate) fn parse_extra_tags(text: &str) -> ExtraTags {
    let mut tags = ExtraTags::default();
    for part in text.split(';') {
        let Some((key, value)) = part.split_once('=') else {
            continue;
        };
        match key.trim().to_ascii_lowercase().as_str() {
            "pct" => {
                if let Ok(pct) = value.trim().parse::<u32>() {
                    tags.pct = pct.min(100) as u8;
                }
            }
            "ri" => {
                if let Ok(ri) = value.trim().parse::<u32>() {
                    tags.ri = ri.clamp(3600, 7 * 86400);
                }
            }
            _ => {}
        }
    }
    tags
}

/// The distinct domains of the From header's addresses, lowercased, in order.
pub fn header_from_domains(message: &AuthenticatedMessage<'_>) -> Vec<String> {
    let mut domains: Vec<String> = Vec::new();
    for address in message.from_addresses() {
        let domain = domain_of(address);
        if !domain.is_empty() && !domains.contains(&domain) {
            domains.push(domain);
        }
    }
    domains
}

/// The lowercased domain part of an address (`""` if it has none).
pub fn domain_of(address: &str) -> String {
    address
        .trim_matches(['<', '>'])
        .rsplit_once('@')
        .map(|(_, domain)| domain.trim_end_matches('.').to_ascii_lowercase())
        .unwrap_or_default()
}

/// RFC 7489 Appendix C `DKIMResultType` token of a DKIM result.
pub(crate) fn dkim_result_token(result: &DkimResult) -> &'static str {
    match result {
        DkimResult::Pass => "pass",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::Fail(_) => "fail",
        DkimResult::PermError(_) => "permerror",
        DkimResult::TempError(_) => "temperror",
        DkimResult::None => "none",
    }
}

/// RFC 7489 Appendix C `SPFResultType` token of an SPF result.
pub(crate) fn spf_result_token(result: SpfResult) -> &'static str {
    match result {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

fn fo_token(fo: &mail_auth::dmarc::FailureOptions) -> &'static str {
    use mail_auth::dmarc::FailureOptions;
    match fo {
        FailureOptions::All => "0",
        FailureOptions::Any => "1",
        FailureOptions::Dkim => "d",
        FailureOptions::Spf => "s",
        FailureOptions::DkimSpf => "d:s",
    }
}
