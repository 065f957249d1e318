//! The pure part: from what DNS told us ([`Facts`]) to the action, the header and the report
//! record.

use mail_auth::dmarc::Policy;
use mail_auth::{DmarcResult, SpfResult};

use super::{DmarcConfig, DmarcInput, TempErrorAction, spf_result_token};
use crate::reports::{DkimAuth, PublishedPolicy, ReportRecord};

/// What DNS evaluation established about a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// The message is exempt (IgnoreHosts, IgnoreMailFrom, IgnoreAuthenticatedClients).
    pub ignored: bool,
    /// The distinct From header domains.
    pub from_domains: Vec<String>,
    /// The SPF identity's domain (MAIL FROM, or HELO for the null sender).
    pub spf_domain: String,
    /// `"mfrom"` or `"helo"`.
    pub spf_scope: &'static str,
    /// Where the SPF result came from: `"self"`, `"upstream"` or `""` (none).
    pub spf_source: &'static str,
    /// The raw SPF result.
    pub spf_result: SpfResult,
    /// Each DKIM signature's domain, selector, result.
    pub dkim: Vec<DkimAuth>,
    /// The overall DMARC result.
    pub result: DmarcResult,
    /// An aligned DKIM pass.
    pub dkim_aligned: bool,
    /// An aligned SPF pass.
    pub spf_aligned: bool,
    /// The policy that applies to a failing message (p, sp or np; lowered for `t=y`).
    pub policy: Policy,
    /// The record found, if any.
    pub published: Option<PublishedPolicy>,
}

impl Default for Facts {
    fn default() -> Self {
        Self {
            ignored: false,
            from_domains: Vec::new(),
            spf_domain: String::new(),
            spf_scope: "mfrom",
            spf_source: "",
            spf_result: SpfResult::None,
            dkim: Vec::new(),
            result: DmarcResult::None,
            dkim_aligned: false,
            spf_aligned: false,
            policy: Policy::None,
            published: None,
        }
    }
}

/// What the milter does with the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DmarcAction {
    /// Deliver.
    Accept,
    /// Refuse: `code` `enhanced` `text`, e.g. `550` `5.7.1` `rejected by DMARC policy for d`.
    Reject {
        /// SMTP reply code.
        code: &'static str,
        /// Enhanced status code.
        enhanced: &'static str,
        /// Reply text.
        text: String,
    },
    /// Deliver into Postfix's hold queue (milter quarantine) with this reason.
    Quarantine {
        /// The reason, `quarantined by DMARC policy for <domain>`.
        reason: String,
    },
    /// Ask the client to retry: `451 4.7.1 <text>`.
    Tempfail {
        /// Reply text.
        text: String,
    },
}

/// The outcome of [`super::evaluate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarcDecision {
    /// What to do.
    pub action: DmarcAction,
    /// The value of the `Authentication-Results` header to insert (without the field name),
    /// opendmarc's form `<authserv-id>; dmarc=fail (p=reject dis=none) header.from=example.com`.
    /// `None` when the message was not evaluated or is rejected / tempfailed.
    pub header: Option<String>,
    /// The SPF `Authentication-Results` value when SPF was evaluated here:
    /// `<authserv-id>; spf=pass smtp.mailfrom=example.com`.
    pub spf_header: Option<String>,
    /// The record for the aggregate report store (store it before answering end-of-message).
    pub record: Option<ReportRecord>,
    /// The DMARC result token for logs and metrics (`pass`, `fail`, `none`, `temperror`,
    /// `permerror`, or `ignored`).
    pub result: &'static str,
    /// The From domain evaluated (empty when none).
    pub domain: String,
}

/// Decides from the facts. `random` yields `0..100` for `pct` sampling.
pub fn decide(
    config: &DmarcConfig,
    input: &DmarcInput<'_>,
    facts: &Facts,
    random: &mut dyn FnMut() -> u8,
) -> DmarcDecision {
    let mut decision = DmarcDecision {
        action: DmarcAction::Accept,
        header: None,
        spf_header: None,
        record: None,
        result: "ignored",
        domain: facts.from_domains.first().cloned().unwrap_or_default(),
    };
    if !config.enabled || facts.ignored {
        return decision;
    }
    if config.required_headers
        && let Err(problem) = required_headers(input.message)
    {
        decision.result = "none";
        decision.action = DmarcAction::Reject {
            code: "550",
            enhanced: "5.7.1",
            text: format!("RFC5322 requirements not met: {problem}"),
        };
        return decision;
    }
    if facts.from_domains.len() > 1 && config.reject_multi_value_from {
        decision.result = "none";
        decision.action = DmarcAction::Reject {
            code: "550",
            enhanced: "5.7.1",
            text: "multi-valued From field detected".to_owned(),
        };
        return decision;
    }
    if config.spf_add_header && facts.spf_source == "self" {
        let identity = if facts.spf_scope == "helo" {
            "smtp.helo"
        } else {
            "smtp.mailfrom"
        };
        decision.spf_header = Some(format!(
            "{}; spf={} {identity}={}",
            input.authserv_id,
            spf_result_token(facts.spf_result),
            facts.spf_domain
        ));
    }
    let Some(domain) = facts
        .from_domains
        .first()
        .filter(|_| facts.from_domains.len() == 1)
    else {
        // No From domain, or several (not rejected): nothing to evaluate, as opendmarc.
        decision.result = "none";
        return decision;
    };

    let policy = policy_token(facts.policy);
    let (token, disposition, reasons): (&'static str, &'static str, Vec<(String, String)>) =
        match &facts.result {
            DmarcResult::Pass => ("pass", "none", Vec::new()),
            DmarcResult::None => ("none", "none", Vec::new()),
            DmarcResult::PermError(_) => ("permerror", "none", Vec::new()),
            DmarcResult::TempError(_) => ("temperror", "none", Vec::new()),
            DmarcResult::Fail(_) => {
                // pct sampling: the policy applies when random() % 100 < pct; otherwise the next
                // less strict one (RFC 7489 §6.6.4).
                let pct = facts.published.as_ref().map_or(100, |p| p.pct);
                let sampled = pct >= 100 || random() % 100 < pct;
                let effective = match (facts.policy, sampled) {
                    (Policy::Reject, true) => Policy::Reject,
                    (Policy::Reject, false) | (Policy::Quarantine, true) => Policy::Quarantine,
                    _ => Policy::None,
                };
                let mut reasons = Vec::new();
                if !sampled && matches!(facts.policy, Policy::Reject | Policy::Quarantine) {
                    reasons.push(("sampled_out".to_owned(), String::new()));
                }
                let applied = match effective {
                    Policy::Reject if config.reject_failures => "reject",
                    Policy::Reject | Policy::Quarantine if config.hold_quarantined_messages => {
                        "quarantine"
                    }
                    _ => "none",
                };
                if applied != policy_token(effective) && effective != Policy::None {
                    reasons.push((
                        "local_policy".to_owned(),
                        format!("{} not enforced", policy_token(effective)),
                    ));
                }
                ("fail", applied, reasons)
            }
        };
    decision.result = token;
    match disposition {
        "reject" => {
            decision.action = DmarcAction::Reject {
                code: "550",
                enhanced: "5.7.1",
                text: config.reject_text(policy_domain(facts, domain)),
            }
        }
        "quarantine" => {
            decision.action = DmarcAction::Quarantine {
                reason: format!(
                    "quarantined by DMARC policy for {}",
                    policy_domain(facts, domain)
                ),
            }
        }
        _ => {}
    }
    let tempfail = token == "temperror" && config.dns_failure_action == TempErrorAction::Tempfail;
    if tempfail {
        decision.action = DmarcAction::Tempfail {
            text: format!("temporary DMARC evaluation failure for {domain}"),
        };
    }
    if matches!(
        decision.action,
        DmarcAction::Accept | DmarcAction::Quarantine { .. }
    ) {
        decision.header = Some(if token == "permerror" {
            format!(
                "{}; dmarc=permerror header.from={domain}",
                input.authserv_id
            )
        } else {
            format!(
                "{}; dmarc={token} (p={policy} dis={disposition}) header.from={domain}",
                input.authserv_id
            )
        });
    }
    // `[dmarc.reports] enabled = false`: evaluate and act, but leave nothing for reports.
    if config.reports.enabled
        && (facts.published.is_some() || config.record_all_messages)
        && !tempfail
    {
        decision.record = Some(ReportRecord {
            received: input.now as i64,
            job_id: input.queue_id.to_owned(),
            source_ip: input.client_ip.to_string(),
            header_from: domain.clone(),
            envelope_from: super::domain_of(input.envelope_from),
            envelope_to: input
                .envelope_to
                .first()
                .map(|to| super::domain_of(to))
                .unwrap_or_default(),
            spf_domain: facts.spf_domain.clone(),
            spf_scope: facts.spf_scope.to_owned(),
            spf_result: spf_result_token(facts.spf_result).to_owned(),
            dkim: facts.dkim.clone(),
            dkim_aligned: facts.dkim_aligned,
            spf_aligned: facts.spf_aligned,
            disposition: disposition.to_owned(),
            reasons,
            published: facts
                .published
                .clone()
                .unwrap_or_else(|| PublishedPolicy::absent(domain)),
        });
    }
    decision
}

fn policy_domain<'a>(facts: &'a Facts, from: &'a str) -> &'a str {
    facts.published.as_ref().map_or(from, |p| p.domain.as_str())
}

fn policy_token(policy: Policy) -> &'static str {
    match policy {
        Policy::Reject => "reject",
        Policy::Quarantine => "quarantine",
        Policy::None | Policy::Unspecified => "none",
    }
}

/// RFC 5322 §3.6 header counts: exactly one From and one Date; at most one Sender, Reply-To,
/// To, Cc, Bcc, Message-ID, In-Reply-To, References, Subject.
pub(crate) fn required_headers(
    message: &mail_auth::AuthenticatedMessage<'_>,
) -> Result<(), String> {
    const EXACTLY_ONE: [&str; 2] = ["from", "date"];
    const AT_MOST_ONE: [&str; 9] = [
        "sender",
        "reply-to",
        "to",
        "cc",
        "bcc",
        "message-id",
        "in-reply-to",
        "references",
        "subject",
    ];
    let count = |name: &str| {
        message
            .headers()
            .iter()
            .filter(|(field, _)| field.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
            .count()
    };
    for name in EXACTLY_ONE {
        let n = count(name);
        if n != 1 {
            return Err(format!("{n} {name} fields"));
        }
    }
    for name in AT_MOST_ONE {
        let n = count(name);
        if n > 1 {
            return Err(format!("{n} {name} fields"));
        }
    }
    Ok(())
}
