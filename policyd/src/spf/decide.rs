//! policyd-spf's decision (spf-engine 3.0.4 `_spfcheck` and `policyd_spf.main`): bypass lists,
//! the HELO check, the MAIL FROM check, the configured action per result, and the answer text.
//! DNS comes in through [`Lookups`], so tests inject answers; no sockets, no clock here.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use super::config::{HeaderType, HeloReject, MailFromReject, SpfConfig};
use super::header::{self, Bypass, Facts, Identity, RawFacts, SpfResult};
use crate::proto::PolicyRequest;

/// One identity's SPF result and pyspf's explanation for it (the `exp=` text of a Fail, the
/// error text of an error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The result.
    pub result: SpfResult,
    /// The explanation (pyspf's third return value).
    pub explanation: String,
}

impl Verdict {
    /// A result with pyspf's default explanation.
    pub fn new(result: SpfResult) -> Self {
        Self {
            result,
            explanation: result.default_explanation().to_owned(),
        }
    }
}

/// One `check_host()` (RFC 7208 section 4).
#[derive(Debug, Clone, Copy)]
pub struct HostQuery<'a> {
    /// `<ip>`.
    pub ip: IpAddr,
    /// `<domain>`.
    pub domain: &'a str,
    /// `<sender>` (`postmaster@<helo>` for the HELO identity).
    pub sender: &'a str,
    /// The HELO name (`%{h}`).
    pub helo: &'a str,
    /// The time the whole evaluation may take; past it the result is Temperror.
    pub limit: Duration,
}

/// The DNS-backed facts a decision needs.
pub trait Lookups: Send + Sync {
    /// Evaluates SPF for one identity. Never fails: DNS trouble is a Temperror verdict.
    fn check_host(&self, query: HostQuery<'_>) -> impl Future<Output = Verdict> + Send;
    /// The A (`v6` false) or AAAA records of `name`; empty on any error.
    fn addresses(
        &self,
        name: &str,
        v6: bool,
        limit: Duration,
    ) -> impl Future<Output = Vec<IpAddr>> + Send;
    /// The first PTR name of `ip` without its trailing dot, if any.
    fn first_ptr(&self, ip: IpAddr, limit: Duration)
    -> impl Future<Output = Option<String>> + Send;
    /// Whether `domain` publishes exactly `v=spf1 -all` (for `no_mail`).
    fn is_no_mail_record(&self, domain: &str) -> impl Future<Output = bool> + Send;
}

/// What the check decided, before test mode and header settings shape the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Prepend this header.
    Prepend(String),
    /// Reject with this reason; `error` selects `5.7.24` over `5.7.23`.
    Reject {
        /// The reason text.
        reason: String,
        /// The result was Temperror or Permerror.
        error: bool,
    },
    /// Defer with this reason.
    Defer(String),
    /// Answer the name of a Postfix restriction class.
    Restriction(String),
    /// Nothing to say.
    Dunno,
}

impl Outcome {
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Prepend(_) => "prepend",
            Self::Reject { .. } => "reject",
            Self::Defer(_) => "defer",
            Self::Restriction(_) => "restriction",
            Self::Dunno => "dunno",
        }
    }
}

/// The settings a decision reads: the `[spf]` table with the host names resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The table.
    pub config: SpfConfig,
    /// `authserv_id` with "HOSTNAME" replaced and lower-cased (authres lower-cases it).
    pub authserv_id: String,
}

impl Settings {
    /// Resolves "HOSTNAME" with `hostname`.
    pub fn new(config: SpfConfig, hostname: &str) -> Self {
        let authserv_id = if config.authserv_id == "HOSTNAME" {
            hostname.to_ascii_lowercase()
        } else {
            config.authserv_id.to_ascii_lowercase()
        };
        Self {
            config,
            authserv_id,
        }
    }
}

/// The request attributes policyd-spf reads, lower-cased as it does (all but `protocol_state`,
/// `protocol_name` and `queue_id`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    /// `client_address`.
    pub client_address: Option<String>,
    /// `helo_name`.
    pub helo_name: Option<String>,
    /// `sender`.
    pub sender: Option<String>,
    /// What headers call the receiver: the recipient's domain, `<UNKNOWN>` with
    /// hide_receiver, `none` without a recipient.
    pub receiver: String,
    /// `instance`: the same for every recipient of one message.
    pub instance: Option<String>,
    /// `sasl_username`.
    pub sasl_username: Option<String>,
}

impl Attributes {
    /// Reads a request.
    pub fn from_request(request: &PolicyRequest, hide_receiver: bool) -> Self {
        let lower = |name: &str| request.get(name).map(str::to_lowercase);
        let recipient = lower("recipient").filter(|r| !r.is_empty());
        let receiver = if hide_receiver {
            "<UNKNOWN>".to_owned()
        } else {
            match recipient {
                // Local recipients may be unqualified: kept whole, as policyd-spf does.
                Some(r) => r.split('@').nth(1).map_or_else(|| r.clone(), str::to_owned),
                None => "none".to_owned(),
            }
        };
        Self {
            client_address: lower("client_address"),
            helo_name: lower("helo_name"),
            sender: lower("sender"),
            receiver,
            instance: request.get("instance").map(str::to_owned),
            sasl_username: request.get("sasl_username").map(str::to_owned),
        }
    }
}

/// pyspf's `domainmatch` in the intended direction: `domain` is one of `list` or below one.
fn domain_listed(list: &[String], domain: &str) -> bool {
    !domain.is_empty()
        && list.iter().any(|entry| {
            let entry = entry.trim_end_matches('.').to_ascii_lowercase();
            domain == entry
                || domain
                    .strip_suffix(entry.as_str())
                    .is_some_and(|prefix| prefix.ends_with('.'))
        })
}

/// The action policyd-spf's `_get_resultcodes` gives a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Reject,
    Defer,
    Prepend,
    Dunno,
}

/// The results a reject policy rejects, or `None` for "False" (prepend everything, errors
/// included).
fn rejected_results(policy: Policy) -> Option<&'static [SpfResult]> {
    match policy {
        Policy::Fail => Some(&[SpfResult::Fail]),
        Policy::Softfail => Some(&[SpfResult::Fail, SpfResult::Softfail]),
        Policy::SpfNotPass => Some(&[SpfResult::Fail, SpfResult::Softfail, SpfResult::Neutral]),
        Policy::False => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    Fail,
    Softfail,
    SpfNotPass,
    False,
}

fn action_for(config: &SpfConfig, policy: Policy, result: SpfResult) -> Action {
    let Some(rejected) = rejected_results(policy) else {
        return Action::Prepend;
    };
    if rejected.contains(&result) {
        Action::Reject
    } else if result == SpfResult::Temperror && config.temp_error_defer {
        Action::Defer
    } else if result == SpfResult::Permerror && config.perm_error_reject {
        Action::Reject
    } else {
        Action::Prepend
    }
}

/// One identity's evaluated state.
struct Checked {
    result: SpfResult,
    action: Action,
    reason: String,
    header: String,
}

/// Decides one request (first recipient of a message; [`InstanceCache`] handles the rest).
pub async fn decide<L: Lookups>(settings: &Settings, lookups: &L, attrs: &Attributes) -> Outcome {
    let config = &settings.config;
    let ip_text = match &config.prospective {
        Some(ip) => ip.to_string(),
        None => match &attrs.client_address {
            Some(ip) => ip.clone(),
            None => return Outcome::Dunno,
        },
    };
    let Ok(ip) = ip_text.parse::<IpAddr>() else {
        return Outcome::Dunno;
    };
    let raw = RawFacts {
        client_address: attrs.client_address.as_deref(),
        helo_name: attrs.helo_name.as_deref(),
        sender: attrs.sender.as_deref(),
        receiver: &attrs.receiver,
    };
    if let Some(bypass) = bypassed(settings, lookups, attrs, ip).await {
        return Outcome::Prepend(header::bypass_header(
            config.header_type,
            &settings.authserv_id,
            bypass,
            &raw,
        ));
    }

    let sender = attrs.sender.as_deref().unwrap_or("");
    let helo_name = attrs.helo_name.as_deref().unwrap_or("");
    if sender.is_empty() && helo_name.is_empty() {
        return Outcome::Dunno;
    }
    // No HELO name: the sender's domain stands in (policyd-spf).
    let helo = if helo_name.is_empty() {
        sender.split_once('@').map_or("unknown", |(_, d)| d)
    } else {
        helo_name
    };
    let header_sender = if sender.is_empty() { "<>" } else { sender };
    let timeout = config.lookup_time.get();

    // HELO identity (RFC 7208 section 2.3).
    let mut helo_checked: Option<Checked> = None;
    if config.helo_reject != HeloReject::NoCheck {
        let postmaster = format!("postmaster@{helo}");
        let verdict = lookups
            .check_host(HostQuery {
                ip,
                domain: helo,
                sender: &postmaster,
                helo,
                limit: timeout,
            })
            .await;
        let mut reason = verdict.explanation;
        let action = if config.helo_reject == HeloReject::Null && !sender.is_empty() {
            Action::Dunno
        } else {
            let mut policy = match config.helo_reject {
                HeloReject::Fail | HeloReject::Null => Policy::Fail,
                HeloReject::Softfail => Policy::Softfail,
                HeloReject::SpfNotPass => Policy::SpfNotPass,
                HeloReject::False | HeloReject::NoCheck => Policy::False,
            };
            if domain_listed(&config.reject_not_pass_domains, helo) {
                policy = Policy::SpfNotPass;
                reason = format!("Receiver policy for SPF {}", verdict.result.name());
            }
            action_for(config, policy, verdict.result)
        };
        if verdict.result == SpfResult::None {
            reason = "no SPF record".to_owned();
        }
        let facts = Facts {
            ip: &ip_text,
            helo,
            envelope_from: header_sender,
            receiver: &attrs.receiver,
        };
        let header = header::result_header(
            config.header_type,
            &settings.authserv_id,
            Identity::Helo,
            verdict.result,
            &reason,
            &facts,
        );
        let mut checked = Checked {
            result: verdict.result,
            action,
            reason,
            header,
        };
        if let Some(outcome) = act(
            settings,
            lookups,
            &mut checked,
            Identity::Helo,
            helo,
            helo,
            &ip_text,
            attrs,
        )
        .await
        {
            return outcome;
        }
        helo_checked = Some(checked);
    }

    if sender.is_empty() {
        // The null sender: the HELO result is the message's result.
        return match helo_checked {
            Some(helo) => {
                if helo.result == SpfResult::Pass
                    && let Some(name) = &config.helo_pass_restriction
                {
                    Outcome::Restriction(name.clone())
                } else if helo.action == Action::Dunno {
                    Outcome::Dunno
                } else {
                    Outcome::Prepend(helo.header)
                }
            }
            None => Outcome::Dunno,
        };
    }

    if config.mail_from_reject == MailFromReject::NoCheck {
        return match helo_checked {
            Some(helo) => Outcome::Prepend(helo.header),
            None => Outcome::Dunno,
        };
    }

    // MAIL FROM identity (RFC 7208 section 2.4); pyspf's split_email: no "@" means the whole
    // sender is the domain.
    let domain = header::domain_of(sender);
    let verdict = lookups
        .check_host(HostQuery {
            ip,
            domain,
            sender,
            helo,
            limit: timeout,
        })
        .await;
    let mut policy = match config.mail_from_reject {
        MailFromReject::Fail => Policy::Fail,
        MailFromReject::Softfail => Policy::Softfail,
        MailFromReject::SpfNotPass => Policy::SpfNotPass,
        MailFromReject::False | MailFromReject::NoCheck => Policy::False,
    };
    let mut reason = verdict.explanation;
    let sender_domain = sender.split_once('@').map_or("", |(_, d)| d);
    if domain_listed(&config.reject_not_pass_domains, sender_domain) {
        policy = Policy::SpfNotPass;
        reason = format!("Receiver policy for SPF {}", verdict.result.name());
    }
    let action = action_for(config, policy, verdict.result);
    if verdict.result == SpfResult::None {
        reason = "no SPF record".to_owned();
    }
    let helo_result = helo_checked.as_ref().map_or(SpfResult::None, |h| h.result);
    // A MAIL FROM "None" does not hide a HELO result: the HELO header is kept then.
    let header = if verdict.result != SpfResult::None || helo_result == SpfResult::None {
        let facts = Facts {
            ip: &ip_text,
            helo,
            envelope_from: sender,
            receiver: &attrs.receiver,
        };
        header::result_header(
            config.header_type,
            &settings.authserv_id,
            Identity::MailFrom,
            verdict.result,
            &reason,
            &facts,
        )
    } else {
        helo_checked
            .as_ref()
            .map(|h| h.header.clone())
            .unwrap_or_default()
    };
    // Pass restrictions come before any reject, as in policyd-spf.
    if verdict.result == SpfResult::Pass
        && let Some(name) = &config.mail_from_pass_restriction
    {
        return Outcome::Restriction(name.clone());
    }
    if helo_result == SpfResult::Pass
        && let Some(name) = &config.helo_pass_restriction
    {
        return Outcome::Restriction(name.clone());
    }
    let mut checked = Checked {
        result: verdict.result,
        action,
        reason,
        header,
    };
    if let Some(outcome) = act(
        settings,
        lookups,
        &mut checked,
        Identity::MailFrom,
        sender,
        domain,
        &ip_text,
        attrs,
    )
    .await
    {
        return outcome;
    }
    Outcome::Prepend(checked.header)
}

/// Turns a reject/defer action into the outcome (or, with `no_mail` and a record other than
/// `v=spf1 -all`, into a prepend, returning `None` to go on).
#[allow(clippy::too_many_arguments)]
async fn act<L: Lookups>(
    settings: &Settings,
    lookups: &L,
    checked: &mut Checked,
    identity: Identity,
    id: &str,
    domain: &str,
    ip: &str,
    attrs: &Attributes,
) -> Option<Outcome> {
    let config = &settings.config;
    if checked.action == Action::Reject
        && config.no_mail
        && !lookups.is_no_mail_record(domain).await
    {
        checked.action = Action::Prepend;
    }
    let defer = match checked.action {
        Action::Reject => false,
        Action::Defer => true,
        Action::Prepend | Action::Dunno => return None,
    };
    let reason = header::reason_text(
        &config.reason_message,
        defer,
        &checked.reason,
        identity,
        id,
        ip,
        &attrs.receiver,
    );
    Some(if defer {
        Outcome::Defer(reason)
    } else {
        Outcome::Reject {
            reason,
            error: checked.result.is_error(),
        }
    })
}

/// policyd-spf's bypass order: skip_addresses, Whitelist, Domain_Whitelist, HELO_Whitelist,
/// Domain_Whitelist_PTR.
async fn bypassed<L: Lookups>(
    settings: &Settings,
    lookups: &L,
    attrs: &Attributes,
    ip: IpAddr,
) -> Option<Bypass> {
    let config = &settings.config;
    if config.skip_addresses.iter().any(|net| net.contains(&ip)) {
        return Some(Bypass::Local);
    }
    if config.whitelist.iter().any(|net| net.contains(&ip)) {
        return Some(Bypass::Relay);
    }
    let limit = config.whitelist_lookup_time.get();
    for domain in &config.domain_whitelist {
        let domain = domain.to_ascii_lowercase();
        let sender = format!("postmaster@{domain}");
        let verdict = lookups
            .check_host(HostQuery {
                ip,
                domain: &domain,
                sender: &sender,
                helo: &domain,
                limit,
            })
            .await;
        if verdict.result == SpfResult::Pass {
            return Some(Bypass::RelayDomain);
        }
    }
    if let Some(helo) = attrs.helo_name.as_deref() {
        for domain in &config.helo_whitelist {
            if domain.eq_ignore_ascii_case(helo)
                && lookups
                    .addresses(helo, ip.is_ipv6(), limit)
                    .await
                    .contains(&ip)
            {
                return Some(Bypass::HeloDomain);
            }
        }
    }
    if !config.domain_whitelist_ptr.is_empty()
        && let Some(name) = lookups.first_ptr(ip, limit).await
    {
        let name = name.to_ascii_lowercase();
        if config
            .domain_whitelist_ptr
            .iter()
            .any(|suffix| name.ends_with(&suffix.to_ascii_lowercase()))
        {
            return Some(Bypass::PtrRelayDomain);
        }
    }
    None
}

/// The answer text (`action=` value) for an outcome, as policyd-spf's main loop writes it.
pub fn action_text(config: &SpfConfig, outcome: &Outcome) -> String {
    if config.test_only && !matches!(outcome, Outcome::Prepend(_)) {
        return "dunno".to_owned();
    }
    match outcome {
        Outcome::Reject { reason, error } => {
            let code = if !config.spf_enhanced_status_codes {
                "550"
            } else if *error {
                "550 5.7.24"
            } else {
                "550 5.7.23"
            };
            format!("{code} {reason}")
        }
        Outcome::Defer(reason) => {
            if config.spf_enhanced_status_codes {
                format!("defer_if_permit 4.7.24 {reason}")
            } else {
                format!("defer_if_permit {reason}")
            }
        }
        Outcome::Prepend(header) => {
            if config.prospective.is_some() || config.header_type == HeaderType::None {
                "dunno".to_owned()
            } else {
                format!("prepend {header}")
            }
        }
        Outcome::Restriction(name) => name.clone(),
        Outcome::Dunno => "dunno".to_owned(),
    }
}

/// What later recipients of a message get: policyd-spf answers the first recipient and
/// remembers the outcome per `instance`; a prepended header is not repeated (`dunno`), a
/// reject, defer or restriction is. Bounded: the oldest messages are forgotten first.
#[derive(Debug)]
pub struct InstanceCache {
    capacity: usize,
    outcomes: HashMap<String, Outcome>,
    order: VecDeque<String>,
}

impl InstanceCache {
    /// A cache remembering at most `capacity` messages.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            outcomes: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The outcome for a later recipient of `instance`, if its first one was decided.
    pub fn replay(&self, instance: &str) -> Option<Outcome> {
        self.outcomes.get(instance).map(|outcome| match outcome {
            Outcome::Prepend(_) => Outcome::Dunno,
            // policyd-spf replays a reject without its error flag, so later recipients read
            // 5.7.23 even when the first got 5.7.24; kept, answers are byte-compatible.
            Outcome::Reject { reason, .. } => Outcome::Reject {
                reason: reason.clone(),
                error: false,
            },
            other => other.clone(),
        })
    }

    /// Remembers the first recipient's outcome.
    pub fn remember(&mut self, instance: &str, outcome: &Outcome) {
        if self.outcomes.contains_key(instance) {
            return;
        }
        while self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.outcomes.remove(&old);
            }
        }
        self.order.push_back(instance.to_owned());
        self.outcomes.insert(instance.to_owned(), outcome.clone());
    }

    /// How many messages are remembered.
    pub fn len(&self) -> usize {
        self.outcomes.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.outcomes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Mutex;

    use super::*;
    use crate::spf::config::{HeaderType, HeloReject, MailFromReject};

    /// Injected DNS: a verdict per domain (None when unlisted), A/AAAA, PTR, `v=spf1 -all`
    /// domains; remembers which domains were evaluated.
    #[derive(Default)]
    struct Fake {
        verdicts: HashMap<String, Verdict>,
        addresses: HashMap<String, Vec<IpAddr>>,
        ptr: Option<String>,
        no_mail: HashSet<String>,
        evaluated: Mutex<Vec<(String, String, String)>>,
    }

    impl Fake {
        fn with(mut self, domain: &str, result: SpfResult) -> Self {
            self.verdicts
                .insert(domain.to_owned(), Verdict::new(result));
            self
        }
        fn evaluated(&self) -> Vec<(String, String, String)> {
            self.evaluated.lock().unwrap().clone()
        }
    }

    impl Lookups for Fake {
        async fn check_host(&self, q: HostQuery<'_>) -> Verdict {
            self.evaluated.lock().unwrap().push((
                q.domain.to_owned(),
                q.sender.to_owned(),
                q.helo.to_owned(),
            ));
            self.verdicts
                .get(q.domain)
                .cloned()
                .unwrap_or_else(|| Verdict::new(SpfResult::None))
        }
        async fn addresses(&self, name: &str, v6: bool, _: Duration) -> Vec<IpAddr> {
            self.addresses
                .get(name)
                .map(|a| a.iter().copied().filter(|ip| ip.is_ipv6() == v6).collect())
                .unwrap_or_default()
        }
        async fn first_ptr(&self, _: IpAddr, _: Duration) -> Option<String> {
            self.ptr.clone()
        }
        async fn is_no_mail_record(&self, domain: &str) -> bool {
            self.no_mail.contains(domain)
        }
    }

    const HELO: &str = "mail.example.com";
    const SENDER: &str = "user@example.com";

    fn request(pairs: &[(&str, &str)]) -> PolicyRequest {
        let mut all: Vec<(String, String)> = [
            ("request", "smtpd_access_policy"),
            ("protocol_state", "RCPT"),
            ("client_address", "192.0.2.1"),
            ("helo_name", HELO),
            ("sender", SENDER),
            ("recipient", "bob@example.net"),
            ("instance", "1.2.3"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
        for (name, value) in pairs {
            all.retain(|(n, _)| n != name);
            if !value.starts_with('\u{0}') {
                all.push((name.to_string(), value.to_string()));
            }
        }
        PolicyRequest::from_pairs(all)
    }

    fn answer_with(config: &SpfConfig, fake: &Fake, pairs: &[(&str, &str)]) -> String {
        let settings = Settings::new(config.clone(), "mx.example.net");
        let attrs = Attributes::from_request(&request(pairs), config.hide_receiver);
        let outcome = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(decide(&settings, fake, &attrs));
        action_text(config, &outcome)
    }

    fn answer(config: &SpfConfig, helo: SpfResult, mfrom: SpfResult) -> String {
        let fake = Fake::default().with(HELO, helo).with("example.com", mfrom);
        answer_with(config, &fake, &[])
    }

    fn mfrom_header(result: SpfResult) -> String {
        format!(
            "prepend Received-SPF: {} (mailfrom) identity=mailfrom; client-ip=192.0.2.1; helo=mail.example.com; envelope-from=user@example.com; receiver=example.net ",
            result.name()
        )
    }

    fn reject(code: &str, scope: &str, id: &str, explanation: &str) -> String {
        format!(
            "{code} Message rejected due to: {explanation}. Please see http://www.openspf.net/Why?s={scope};id={id};ip=192.0.2.1;r=example.net"
        )
    }

    #[test]
    fn defaults_every_mail_from_result() {
        let config = SpfConfig::default();
        for result in SpfResult::ALL {
            let got = answer(&config, SpfResult::Pass, result);
            let want = match result {
                SpfResult::Fail => reject("550 5.7.23", "mfrom", SENDER, "SPF fail - not authorized"),
                // A MAIL FROM None keeps the HELO header.
                SpfResult::None => "prepend Received-SPF: Pass (sender SPF authorized) identity=helo; client-ip=192.0.2.1; helo=mail.example.com; envelope-from=user@example.com; receiver=example.net ".to_owned(),
                other => mfrom_header(other),
            };
            assert_eq!(got, want, "{result:?}");
        }
        // Both None: the MAIL FROM header says so.
        assert_eq!(
            answer(&config, SpfResult::None, SpfResult::None),
            "prepend Received-SPF: None (mailfrom) identity=mailfrom; client-ip=192.0.2.1; helo=mail.example.com; envelope-from=user@example.com; receiver=example.net "
        );
    }

    #[test]
    fn defaults_every_helo_result() {
        let config = SpfConfig::default();
        for result in SpfResult::ALL {
            let got = answer(&config, result, SpfResult::Pass);
            let want = if result == SpfResult::Fail {
                reject("550 5.7.23", "helo", HELO, "SPF fail - not authorized")
            } else {
                mfrom_header(SpfResult::Pass)
            };
            assert_eq!(got, want, "{result:?}");
        }
    }

    fn rejected_by_helo_policy(policy: HeloReject, result: SpfResult, null_sender: bool) -> bool {
        match policy {
            HeloReject::Fail => result == SpfResult::Fail,
            HeloReject::Softfail => matches!(result, SpfResult::Fail | SpfResult::Softfail),
            HeloReject::SpfNotPass => matches!(
                result,
                SpfResult::Fail | SpfResult::Softfail | SpfResult::Neutral
            ),
            HeloReject::Null => null_sender && result == SpfResult::Fail,
            HeloReject::False | HeloReject::NoCheck => false,
        }
    }

    #[test]
    fn every_helo_policy_and_result() {
        for policy in [
            HeloReject::Fail,
            HeloReject::Softfail,
            HeloReject::SpfNotPass,
            HeloReject::Null,
            HeloReject::False,
            HeloReject::NoCheck,
        ] {
            let config = SpfConfig {
                helo_reject: policy,
                ..SpfConfig::default()
            };
            for result in SpfResult::ALL {
                for null_sender in [false, true] {
                    let fake = Fake::default()
                        .with(HELO, result)
                        .with("example.com", SpfResult::Pass);
                    let sender = if null_sender { "" } else { SENDER };
                    let got = answer_with(&config, &fake, &[("sender", sender)]);
                    let context = format!("{policy:?} {result:?} null={null_sender}: {got}");
                    if rejected_by_helo_policy(policy, result, null_sender) {
                        assert_eq!(
                            got,
                            reject("550 5.7.23", "helo", HELO, result.default_explanation()),
                            "{context}"
                        );
                    } else if policy == HeloReject::NoCheck {
                        assert!(
                            fake.evaluated().iter().all(|(domain, ..)| domain != HELO),
                            "{context}"
                        );
                        let want = if null_sender {
                            "dunno".to_owned()
                        } else {
                            mfrom_header(SpfResult::Pass)
                        };
                        assert_eq!(got, want, "{context}");
                    } else if null_sender {
                        let comment = if result == SpfResult::None {
                            "no SPF record"
                        } else {
                            result.default_explanation()
                        };
                        assert_eq!(
                            got,
                            format!(
                                "prepend Received-SPF: {} ({comment}) identity=helo; client-ip=192.0.2.1; helo=mail.example.com; envelope-from=<>; receiver=example.net ",
                                result.name()
                            ),
                            "{context}"
                        );
                        // The null sender is never checked as MAIL FROM.
                        assert_eq!(fake.evaluated().len(), 1, "{context}");
                    } else {
                        assert_eq!(got, mfrom_header(SpfResult::Pass), "{context}");
                        assert_eq!(
                            fake.evaluated()[0],
                            (HELO.into(), format!("postmaster@{HELO}"), HELO.into())
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn every_mail_from_policy_and_result() {
        for policy in [
            MailFromReject::Fail,
            MailFromReject::Softfail,
            MailFromReject::SpfNotPass,
            MailFromReject::False,
            MailFromReject::NoCheck,
        ] {
            let config = SpfConfig {
                mail_from_reject: policy,
                ..SpfConfig::default()
            };
            for result in SpfResult::ALL {
                let got = answer(&config, SpfResult::Neutral, result);
                let rejected = match policy {
                    MailFromReject::Fail => result == SpfResult::Fail,
                    MailFromReject::Softfail => {
                        matches!(result, SpfResult::Fail | SpfResult::Softfail)
                    }
                    MailFromReject::SpfNotPass => matches!(
                        result,
                        SpfResult::Fail | SpfResult::Softfail | SpfResult::Neutral
                    ),
                    MailFromReject::False | MailFromReject::NoCheck => false,
                };
                let want = if rejected {
                    reject("550 5.7.23", "mfrom", SENDER, result.default_explanation())
                } else if policy == MailFromReject::NoCheck || result == SpfResult::None {
                    "prepend Received-SPF: Neutral (access neither permitted nor denied) identity=helo; client-ip=192.0.2.1; helo=mail.example.com; envelope-from=user@example.com; receiver=example.net ".to_owned()
                } else {
                    mfrom_header(result)
                };
                assert_eq!(got, want, "{policy:?} {result:?}");
            }
        }
    }

    #[test]
    fn errors_defer_or_reject_with_5_7_24_for_both_identities() {
        let config = SpfConfig {
            temp_error_defer: true,
            perm_error_reject: true,
            ..SpfConfig::default()
        };
        let temp = "temporary DNS error in processing";
        let perm = "permanent error in processing";
        let url = |scope: &str, id: &str| {
            format!(
                "Please see http://www.openspf.net/Why?s={scope};id={id};ip=192.0.2.1;r=example.net"
            )
        };
        assert_eq!(
            answer(&config, SpfResult::Pass, SpfResult::Temperror),
            format!(
                "defer_if_permit 4.7.24 Message deferred due to: {temp}. {}",
                url("mfrom", SENDER)
            )
        );
        assert_eq!(
            answer(&config, SpfResult::Pass, SpfResult::Permerror),
            format!(
                "550 5.7.24 Message rejected due to: {perm}. {}",
                url("mfrom", SENDER)
            )
        );
        assert_eq!(
            answer(&config, SpfResult::Temperror, SpfResult::Pass),
            format!(
                "defer_if_permit 4.7.24 Message deferred due to: {temp}. {}",
                url("helo", HELO)
            )
        );
        assert_eq!(
            answer(&config, SpfResult::Permerror, SpfResult::Pass),
            format!(
                "550 5.7.24 Message rejected due to: {perm}. {}",
                url("helo", HELO)
            )
        );
        // Without enhanced status codes.
        let plain = SpfConfig {
            spf_enhanced_status_codes: false,
            ..config
        };
        assert!(
            answer(&plain, SpfResult::Pass, SpfResult::Permerror)
                .starts_with("550 Message rejected")
        );
        assert!(
            answer(&plain, SpfResult::Pass, SpfResult::Temperror)
                .starts_with("defer_if_permit Message deferred")
        );
        assert!(
            answer(&plain, SpfResult::Pass, SpfResult::Fail).starts_with("550 Message rejected")
        );
        // "False" prepends errors too, whatever the error settings say.
        let never = SpfConfig {
            mail_from_reject: MailFromReject::False,
            ..plain
        };
        assert_eq!(
            answer(&never, SpfResult::Pass, SpfResult::Permerror),
            mfrom_header(SpfResult::Permerror)
        );
    }

    #[test]
    fn test_only_never_rejects_but_prepends() {
        let config = SpfConfig {
            test_only: true,
            temp_error_defer: true,
            ..SpfConfig::default()
        };
        assert_eq!(answer(&config, SpfResult::Pass, SpfResult::Fail), "dunno");
        assert_eq!(
            answer(&config, SpfResult::Pass, SpfResult::Temperror),
            "dunno"
        );
        assert_eq!(
            answer(&config, SpfResult::Pass, SpfResult::Pass),
            mfrom_header(SpfResult::Pass)
        );
    }

    #[test]
    fn header_types_and_receiver_forms() {
        let ar = SpfConfig {
            header_type: HeaderType::AuthenticationResults,
            authserv_id: "MX.Example.NET".into(),
            ..SpfConfig::default()
        };
        assert_eq!(
            answer(&ar, SpfResult::Pass, SpfResult::Pass),
            "prepend Authentication-Results: mx.example.net; spf=pass (sender SPF authorized) smtp.mailfrom=example.com (client-ip=192.0.2.1; helo=mail.example.com; envelope-from=user@example.com; receiver=example.net)"
        );
        let hostname = SpfConfig {
            header_type: HeaderType::AuthenticationResults,
            ..SpfConfig::default()
        };
        assert!(
            answer(&hostname, SpfResult::Pass, SpfResult::Pass)
                .starts_with("prepend Authentication-Results: mx.example.net; spf=pass")
        );
        let none = SpfConfig {
            header_type: HeaderType::None,
            ..SpfConfig::default()
        };
        assert_eq!(answer(&none, SpfResult::Pass, SpfResult::Pass), "dunno");
        assert!(answer(&none, SpfResult::Pass, SpfResult::Fail).starts_with("550 5.7.23"));

        let hidden = SpfConfig {
            hide_receiver: true,
            ..SpfConfig::default()
        };
        assert!(answer(&hidden, SpfResult::Pass, SpfResult::Pass).ends_with("receiver=<UNKNOWN> "));
        assert!(answer(&hidden, SpfResult::Pass, SpfResult::Fail).ends_with(";r=<UNKNOWN>"));
        let fake = Fake::default().with("example.com", SpfResult::Pass);
        let config = SpfConfig::default();
        assert!(answer_with(&config, &fake, &[("recipient", "")]).ends_with("receiver=none "));
        assert!(answer_with(&config, &fake, &[("recipient", "\u{0}")]).ends_with("receiver=none "));
        assert!(answer_with(&config, &fake, &[("recipient", "root")]).ends_with("receiver=root "));
    }

    #[test]
    fn request_values_are_lower_cased_and_missing_helo_uses_the_sender_domain() {
        let fake = Fake::default().with("example.com", SpfResult::Pass);
        let got = answer_with(
            &SpfConfig::default(),
            &fake,
            &[("sender", "User@Example.COM"), ("helo_name", "")],
        );
        assert_eq!(
            got,
            "prepend Received-SPF: Pass (mailfrom) identity=mailfrom; client-ip=192.0.2.1; helo=example.com; envelope-from=user@example.com; receiver=example.net "
        );
        assert_eq!(
            fake.evaluated()[0],
            (
                "example.com".into(),
                "postmaster@example.com".into(),
                "example.com".into()
            )
        );
        // Neither sender nor HELO, or no client address: nothing to check.
        let fake = Fake::default();
        assert_eq!(
            answer_with(
                &SpfConfig::default(),
                &fake,
                &[("sender", ""), ("helo_name", "")]
            ),
            "dunno"
        );
        assert_eq!(
            answer_with(&SpfConfig::default(), &fake, &[("client_address", "\u{0}")]),
            "dunno"
        );
        assert_eq!(
            answer_with(
                &SpfConfig::default(),
                &fake,
                &[("client_address", "unknown")]
            ),
            "dunno"
        );
        assert!(fake.evaluated().is_empty());
    }

    #[test]
    fn bypass_lists_in_policyd_spf_order() {
        let fake = || {
            let mut fake = Fake::default()
                .with("relay.example", SpfResult::Pass)
                .with("example.com", SpfResult::Fail);
            fake.addresses
                .insert(HELO.into(), vec!["192.0.2.1".parse().unwrap()]);
            fake.ptr = Some("out1.forwarder.example".into());
            fake
        };
        let tail = "client-ip=192.0.2.1; helo=mail.example.com; envelope-from=user@example.com; receiver=example.net ";
        let cases: [(SpfConfig, &str); 5] = [
            (
                SpfConfig {
                    skip_addresses: vec!["192.0.2.0/24".parse().unwrap()],
                    ..SpfConfig::default()
                },
                "SPF check N/A for local connections - ",
            ),
            (
                SpfConfig {
                    whitelist: vec!["192.0.2.1/32".parse().unwrap()],
                    ..SpfConfig::default()
                },
                "SPF skipped for whitelisted relay - ",
            ),
            (
                SpfConfig {
                    domain_whitelist: vec!["relay.example".into()],
                    ..SpfConfig::default()
                },
                "SPF skipped for whitelisted relay domain - ",
            ),
            (
                SpfConfig {
                    helo_whitelist: vec![HELO.into()],
                    ..SpfConfig::default()
                },
                "SPF skipped for whitelisted HELO domain - ",
            ),
            (
                SpfConfig {
                    domain_whitelist_ptr: vec!["forwarder.example".into()],
                    ..SpfConfig::default()
                },
                "SPF skipped for PTR whitelisted relay domain - ",
            ),
        ];
        for (config, comment) in cases {
            assert_eq!(
                answer_with(&config, &fake(), &[]),
                format!("prepend X-Comment: {comment}{tail}")
            );
        }
        // Loopback is skipped by default, in both address families.
        for ip in ["127.0.0.1", "::1", "::ffff:127.0.0.2"] {
            assert!(
                answer_with(&SpfConfig::default(), &fake(), &[("client_address", ip)]).starts_with(
                    "prepend X-Comment: SPF check N/A for local connections - client-ip="
                )
            );
        }
        // Lists that do not match fall through to the checks.
        let config = SpfConfig {
            whitelist: vec!["198.51.100.0/24".parse().unwrap()],
            domain_whitelist: vec!["other.example".into()],
            helo_whitelist: vec!["other.example".into()],
            domain_whitelist_ptr: vec!["elsewhere.example".into()],
            ..SpfConfig::default()
        };
        assert!(answer_with(&config, &fake(), &[]).starts_with("550 5.7.23"));
        // A HELO name on the list whose address is not the client's does not bypass.
        let config = SpfConfig {
            helo_whitelist: vec![HELO.into()],
            ..SpfConfig::default()
        };
        assert!(
            answer_with(&config, &fake(), &[("client_address", "192.0.2.9")])
                .starts_with("550 5.7.23")
        );
        // Authentication-Results form of a bypass.
        let config = SpfConfig {
            header_type: HeaderType::AuthenticationResults,
            ..SpfConfig::default()
        };
        assert_eq!(
            answer_with(&config, &fake(), &[("client_address", "127.0.0.1")]),
            "prepend Authentication-Results: mx.example.net; none (SPF check N/A for local connections -  client-ip=127.0.0.1; helo=mail.example.com; envelope-from=user@example.com; receiver=example.net)"
        );
    }

    #[test]
    fn reject_not_pass_domains() {
        let config = SpfConfig {
            reject_not_pass_domains: vec!["example.com".into()],
            ..SpfConfig::default()
        };
        for result in [SpfResult::Softfail, SpfResult::Neutral, SpfResult::Fail] {
            assert_eq!(
                answer(&config, SpfResult::Pass, result),
                reject(
                    "550 5.7.23",
                    "mfrom",
                    SENDER,
                    &format!("Receiver policy for SPF {}", result.name())
                )
            );
        }
        assert_eq!(
            answer(&config, SpfResult::Pass, SpfResult::Pass),
            mfrom_header(SpfResult::Pass)
        );
        // Subdomains are covered; the HELO name is matched too.
        let fake = Fake::default().with("sub.example.com", SpfResult::Softfail);
        assert!(
            answer_with(&config, &fake, &[("sender", "a@sub.example.com")])
                .starts_with("550 5.7.23")
        );
        let config = SpfConfig {
            reject_not_pass_domains: vec![HELO.into()],
            ..SpfConfig::default()
        };
        assert_eq!(
            answer(&config, SpfResult::Neutral, SpfResult::Pass),
            reject(
                "550 5.7.23",
                "helo",
                HELO,
                "Receiver policy for SPF Neutral"
            )
        );
    }

    #[test]
    fn no_mail_rejects_only_v_spf1_minus_all() {
        let config = SpfConfig {
            no_mail: true,
            ..SpfConfig::default()
        };
        assert_eq!(
            answer(&config, SpfResult::Pass, SpfResult::Fail),
            mfrom_header(SpfResult::Fail)
        );
        let mut fake = Fake::default()
            .with(HELO, SpfResult::Pass)
            .with("example.com", SpfResult::Fail);
        fake.no_mail.insert("example.com".into());
        assert!(answer_with(&config, &fake, &[]).starts_with("550 5.7.23"));
    }

    #[test]
    fn pass_restrictions() {
        let config = SpfConfig {
            helo_pass_restriction: Some("helo_ok".into()),
            mail_from_pass_restriction: Some("mfrom_ok".into()),
            ..SpfConfig::default()
        };
        assert_eq!(
            answer(&config, SpfResult::Pass, SpfResult::Pass),
            "mfrom_ok"
        );
        assert_eq!(
            answer(&config, SpfResult::Neutral, SpfResult::Pass),
            "mfrom_ok"
        );
        // policyd-spf answers the HELO restriction before looking at a MAIL FROM reject.
        assert_eq!(answer(&config, SpfResult::Pass, SpfResult::Fail), "helo_ok");
        assert_eq!(
            answer(&config, SpfResult::Pass, SpfResult::Neutral),
            "helo_ok"
        );
        assert!(answer(&config, SpfResult::Neutral, SpfResult::Fail).starts_with("550 5.7.23"));
        let fake = Fake::default().with(HELO, SpfResult::Pass);
        assert_eq!(answer_with(&config, &fake, &[("sender", "")]), "helo_ok");
    }

    #[test]
    fn prospective_checks_that_address_and_prepends_nothing() {
        let config = SpfConfig {
            prospective: Some("198.51.100.7".parse().unwrap()),
            ..SpfConfig::default()
        };
        assert_eq!(answer(&config, SpfResult::Pass, SpfResult::Pass), "dunno");
        assert_eq!(
            answer(&config, SpfResult::Pass, SpfResult::Fail),
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please see http://www.openspf.net/Why?s=mfrom;id=user@example.com;ip=198.51.100.7;r=example.net"
        );
    }

    #[test]
    fn fail_explanation_and_custom_reason_message() {
        let mut fake = Fake::default().with("example.com", SpfResult::Fail);
        fake.verdicts.get_mut("example.com").unwrap().explanation =
            "192.0.2.1 is not one of our servers".into();
        let config = SpfConfig {
            reason_message: "SPF {rejectdefer}: {spf}".into(),
            ..SpfConfig::default()
        };
        assert_eq!(
            answer_with(&config, &fake, &[]),
            "550 5.7.23 SPF rejected: 192.0.2.1 is not one of our servers"
        );
    }

    #[test]
    fn one_header_per_message_and_repeated_rejects() {
        let mut cache = InstanceCache::new(2);
        let header = Outcome::Prepend("Received-SPF: Pass".into());
        let rejected = Outcome::Reject {
            reason: "no".into(),
            error: true,
        };
        assert_eq!(cache.replay("a"), None);
        cache.remember("a", &header);
        cache.remember("b", &rejected);
        assert_eq!(cache.replay("a"), Some(Outcome::Dunno));
        let replayed = Outcome::Reject {
            reason: "no".into(),
            error: false,
        };
        assert_eq!(cache.replay("b"), Some(replayed.clone()));
        // Bounded: a third message pushes out the oldest.
        cache.remember("c", &Outcome::Dunno);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.replay("a"), None);
        assert_eq!(cache.replay("b"), Some(replayed));
        // The first answer is never overwritten.
        cache.remember("c", &header);
        assert_eq!(cache.replay("c"), Some(Outcome::Dunno));
    }
}
