//! RFC 7208 `check_host()` over the common resolver (hickory, with its cache): strict record
//! syntax, macros, the 10-lookup and void-lookup limits, `exp=`, and one deadline for the whole
//! evaluation. Written here because mail-auth 0.15's evaluator is lax where RFC 7208 demands a
//! PermError (bad CIDRs, toplabels, duplicate records, unknown modifiers, void limit) and fails
//! 55 of the 203 cases of the openspf suite; this one passes them (policyd/tests/spf_rfc7208.rs).
//! Errors read as pyspf's (`SPF Permanent Error: ...`), since policyd-spf puts them in headers.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mail_auth::hickory_resolver::TokioResolver;
use mail_auth::hickory_resolver::net::{DnsError, NetError, NoRecords};
use mail_auth::hickory_resolver::proto::rr::{Name, RData, RecordType};
use postern_common::config::{ConfigError, DnsConfig};
use tokio::time::Instant;

use super::decide::{HostQuery, Lookups, Verdict};
use super::header::SpfResult;

/// RFC 7208 section 4.6.4: at most 10 DNS-querying terms per evaluation.
const MAX_DNS_TERMS: u32 = 10;
/// RFC 7208 section 4.6.4: an `mx` term may name at most 10 exchanges, `ptr` names are
/// checked at most 10.
const MAX_NAMES_PER_TERM: usize = 10;
/// RFC 7208 section 4.6.4 / 5.5: nested include/redirect depth guard (the 10-term limit
/// already bounds it; this stops loops cheaply).
const MAX_DEPTH: u32 = 12;

/// Why an evaluation stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stop {
    Temp(String),
    Perm(String),
}

type Eval<T> = Result<T, Stop>;

/// `check_host()` recurses (include, redirect), so its future is boxed.
type CheckFuture<'r> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Eval<(SpfResult, Option<String>)>> + Send + 'r>,
>;

fn perm<T>(message: impl Into<String>) -> Eval<T> {
    Err(Stop::Perm(message.into()))
}

/// A qualifier's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Qualifier {
    Pass,
    Fail,
    Softfail,
    Neutral,
}

impl Qualifier {
    fn result(self) -> SpfResult {
        match self {
            Self::Pass => SpfResult::Pass,
            Self::Fail => SpfResult::Fail,
            Self::Softfail => SpfResult::Softfail,
            Self::Neutral => SpfResult::Neutral,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Mechanism {
    All,
    Include(String),
    A(Option<String>, u8, u8),
    Mx(Option<String>, u8, u8),
    Ptr(Option<String>),
    Ip4(Ipv4Addr, u8),
    Ip6(Ipv6Addr, u8),
    Exists(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Record {
    directives: Vec<(Qualifier, Mechanism)>,
    redirect: Option<String>,
    exp: Option<String>,
}

/// Whether a TXT string set is an SPF version 1 record.
fn is_spf1(text: &str) -> bool {
    let lower = text.get(..6).map(str::to_ascii_lowercase);
    lower.as_deref() == Some("v=spf1") && (text.len() == 6 || text.as_bytes()[6] == b' ')
}

fn parse_cidr(text: &str, max: u8, max_digits: usize) -> Eval<u8> {
    // ip4-cidr-length = "/" ("0" / %x31-39 0*1DIGIT); ip6: 0*2DIGIT. No leading zeros.
    if text.is_empty()
        || text.len() > max_digits
        || !text.bytes().all(|b| b.is_ascii_digit())
        || (text.len() > 1 && text.starts_with('0'))
    {
        return perm(format!("Invalid CIDR length /{text}"));
    }
    match text.parse::<u8>() {
        Ok(n) if n <= max => Ok(n),
        _ => perm(format!("Invalid CIDR length /{text}")),
    }
}

/// Splits `[domain-spec][/ip4-cidr][//ip6-cidr]`.
fn dual_cidr(arg: &str) -> Eval<(Option<String>, u8, u8)> {
    // A "/" followed by something other than digits belongs to the domain-spec
    // ("a:foo:bar/baz.example.com").
    let cidr_at = |text: &str, sep: &str| {
        text.rfind(sep)
            .filter(|pos| text[pos + sep.len()..].bytes().all(|b| b.is_ascii_digit()))
    };
    let (rest, v6) = match cidr_at(arg, "//") {
        Some(pos) => (&arg[..pos], parse_cidr(&arg[pos + 2..], 128, 3)?),
        None => (arg, 128),
    };
    let (domain, v4) = match cidr_at(rest, "/") {
        Some(pos) => (&rest[..pos], parse_cidr(&rest[pos + 1..], 32, 2)?),
        None => (rest, 32),
    };
    if domain.ends_with('/') {
        return perm(format!("Invalid CIDR in {arg:?}"));
    }
    let domain = if domain.is_empty() {
        None
    } else {
        let spec = domain
            .strip_prefix(':')
            .ok_or_else(|| Stop::Perm(format!("Unknown mechanism syntax {arg:?}")))?;
        check_domain_spec(spec)?;
        Some(spec.to_owned())
    };
    Ok((domain, v4, v6))
}

fn is_toplabel(label: &str) -> bool {
    // toplabel = ( *alphanum ALPHA *alphanum ) / ( 1*alphanum "-" *( alphanum / "-" ) alphanum )
    let bytes = label.as_bytes();
    !bytes.is_empty()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        && bytes.iter().any(|b| !b.is_ascii_digit())
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

/// RFC 7208 section 7.1: `domain-spec = macro-string domain-end`, `domain-end = ( "." toplabel
/// [ "." ] ) / macro-expand`.
fn check_domain_spec(spec: &str) -> Eval<()> {
    check_macro_string(spec, false)?;
    if spec.ends_with('}') && spec.contains("%{") {
        return Ok(());
    }
    let trimmed = spec.strip_suffix('.').unwrap_or(spec);
    match trimmed.rsplit_once('.') {
        Some((_, top)) if is_toplabel(top) => Ok(()),
        _ => perm(format!("Invalid domain found (use FQDN): {spec}")),
    }
}

/// Validates macro syntax without expanding.
fn check_macro_string(text: &str, exp: bool) -> Eval<()> {
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if !(c.is_ascii_graphic() || (exp && c == ' ')) {
            return perm(format!("Invalid character in macro string {text:?}"));
        }
        if c != '%' {
            continue;
        }
        match chars.next() {
            Some('%' | '_' | '-') => {}
            Some('{') => {
                let letter = chars.next().unwrap_or(' ').to_ascii_lowercase();
                let allowed = if exp { "slodiphvcrt" } else { "slodiphv" };
                if !allowed.contains(letter) {
                    return perm(format!("Unknown Macro Encountered in {text:?}"));
                }
                let mut body = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => body.push(c),
                        None => return perm(format!("Unterminated macro in {text:?}")),
                    }
                }
                let digits: String = body.chars().take_while(char::is_ascii_digit).collect();
                let rest = &body[digits.len()..];
                let rest = rest.strip_prefix(['r', 'R']).unwrap_or(rest);
                if digits.starts_with('0') && !digits.is_empty() {
                    return perm(format!("Invalid macro transformer in {text:?}"));
                }
                if !rest.chars().all(|c| ".-+,/_=".contains(c)) {
                    return perm(format!("Invalid macro delimiter in {text:?}"));
                }
            }
            _ => return perm(format!("invalid-macro-char in {text:?}")),
        }
    }
    Ok(())
}

fn parse_record(text: &str) -> Eval<Record> {
    if !text.is_ascii() {
        return perm("Non-ascii characters found in SPF record");
    }
    let mut record = Record::default();
    for term in text.split(' ').skip(1).filter(|t| !t.is_empty()) {
        // Modifier: name "=" macro-string, name = ALPHA *( ALPHA / DIGIT / "-" / "_" / "." ).
        if let Some((name, value)) = term.split_once('=') {
            let name_ok = name.starts_with(|c: char| c.is_ascii_alphabetic())
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if name_ok && !name.contains(':') && !name.contains('/') {
                match name.to_ascii_lowercase().as_str() {
                    "redirect" => {
                        if record.redirect.is_some() {
                            return perm("redirect= MUST appear at most once");
                        }
                        check_domain_spec(value)?;
                        record.redirect = Some(value.to_owned());
                    }
                    "exp" => {
                        if record.exp.is_some() {
                            return perm("exp= MUST appear at most once");
                        }
                        check_domain_spec(value)?;
                        record.exp = Some(value.to_owned());
                    }
                    _ => check_macro_string(value, false)?,
                }
                continue;
            }
        }
        let (qualifier, body) = match term.as_bytes()[0] {
            b'+' => (Qualifier::Pass, &term[1..]),
            b'-' => (Qualifier::Fail, &term[1..]),
            b'~' => (Qualifier::Softfail, &term[1..]),
            b'?' => (Qualifier::Neutral, &term[1..]),
            _ => (Qualifier::Pass, term),
        };
        let split = body.find([':', '/']).unwrap_or(body.len());
        let (name, arg) = body.split_at(split);
        let mechanism = match name.to_ascii_lowercase().as_str() {
            "all" if arg.is_empty() => Mechanism::All,
            "include" => {
                let spec = arg.strip_prefix(':').unwrap_or_default();
                if spec.is_empty() {
                    return perm(format!("include mechanism missing domain: {term}"));
                }
                check_domain_spec(spec)?;
                Mechanism::Include(spec.to_owned())
            }
            "a" => {
                let (d, v4, v6) = dual_cidr(arg)?;
                Mechanism::A(d, v4, v6)
            }
            "mx" => {
                let (d, v4, v6) = dual_cidr(arg)?;
                Mechanism::Mx(d, v4, v6)
            }
            "ptr" => match arg {
                "" => Mechanism::Ptr(None),
                _ => {
                    let spec = arg
                        .strip_prefix(':')
                        .filter(|s| !s.is_empty())
                        .ok_or_else(|| Stop::Perm(format!("Invalid ptr mechanism: {term}")))?;
                    check_domain_spec(spec)?;
                    Mechanism::Ptr(Some(spec.to_owned()))
                }
            },
            "ip4" => {
                let value = arg.strip_prefix(':').unwrap_or_default();
                let (addr, cidr) = match value.split_once('/') {
                    Some((a, c)) => (a, parse_cidr(c, 32, 2)?),
                    None => (value, 32),
                };
                let addr = addr
                    .parse::<Ipv4Addr>()
                    .map_err(|_| Stop::Perm(format!("Invalid IP4 address: {term}")))?;
                Mechanism::Ip4(addr, cidr)
            }
            "ip6" => {
                let value = arg.strip_prefix(':').unwrap_or_default();
                let (addr, cidr) = match value.split_once('/') {
                    Some((a, c)) => (a, parse_cidr(c, 128, 3)?),
                    None => (value, 128),
                };
                let addr = addr
                    .parse::<Ipv6Addr>()
                    .map_err(|_| Stop::Perm(format!("Invalid IP6 address: {term}")))?;
                Mechanism::Ip6(addr, cidr)
            }
            "exists" => {
                let spec = arg.strip_prefix(':').unwrap_or_default();
                if spec.is_empty() {
                    return perm(format!("empty domain: {term}"));
                }
                check_domain_spec(spec)?;
                Mechanism::Exists(spec.to_owned())
            }
            _ => return perm(format!("Unknown mechanism found: {term}")),
        };
        record.directives.push((qualifier, mechanism));
    }
    Ok(record)
}

/// Whether `name` is a usable DNS name: labels of 1..=63 bytes, at most 253 in all, and (for
/// the initial domain) more than one label.
fn valid_name(name: &str, need_dot: bool) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && (!need_dot || name.contains('.'))
        && name.split('.').all(|l| !l.is_empty() && l.len() <= 63)
        && name.is_ascii()
}

fn in_network(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// How long "no such name" / "no such record" is kept when the answer's SOA asks for longer
/// (RFC 2308 section 5 advises capping negative caching at a few hours).
const MAX_NEGATIVE_TTL: Duration = Duration::from_secs(3600);

/// The records of one name and type as an earlier lookup found them.
struct Answered {
    records: Vec<RData>,
    valid_until: std::time::Instant,
    /// For a TXT answer asked as a domain's SPF record: that record, parsed once.
    spf_record: OnceLock<Eval<Option<Arc<Record>>>>,
}

impl Answered {
    /// No records, kept nowhere.
    fn nothing() -> Self {
        Self {
            records: Vec::new(),
            valid_until: std::time::Instant::now(),
            spf_record: OnceLock::new(),
        }
    }
}

/// Answers the evaluator already has, each for as long as its TTL allows. hickory's cache
/// answers the same questions, but every hit there builds a `Name`, clones the whole response
/// and arms a timer; an SPF check asks the same few names for every message from a domain
/// (its record, its includes, its `a` and `mx` hosts), and the record is parsed once too.
#[derive(Clone)]
struct AnswerCache {
    entries: moka::sync::Cache<(String, RecordType), Arc<Answered>>,
}

/// Entries leave the cache when their TTL runs out.
struct UntilValid;

impl moka::Expiry<(String, RecordType), Arc<Answered>> for UntilValid {
    fn expire_after_create(
        &self,
        _key: &(String, RecordType),
        value: &Arc<Answered>,
        created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.valid_until.saturating_duration_since(created_at))
    }
}

impl AnswerCache {
    fn new(capacity: u64) -> Self {
        Self {
            entries: moka::sync::Cache::builder()
                .max_capacity(capacity.max(1))
                .expire_after(UntilValid)
                .build(),
        }
    }

    fn key(name: &str, rtype: RecordType) -> (String, RecordType) {
        (name.trim_end_matches('.').to_ascii_lowercase(), rtype)
    }

    fn get(&self, key: &(String, RecordType)) -> Option<Arc<Answered>> {
        self.entries
            .get(key)
            .filter(|answer| answer.valid_until > std::time::Instant::now())
    }

    fn insert(
        &self,
        key: (String, RecordType),
        records: Vec<RData>,
        valid_until: std::time::Instant,
    ) -> Arc<Answered> {
        let answer = Arc::new(Answered {
            records,
            valid_until,
            spf_record: OnceLock::new(),
        });
        if valid_until > std::time::Instant::now() {
            self.entries.insert(key, answer.clone());
        }
        answer
    }
}

/// The DNS the evaluator asks.
#[derive(Clone)]
pub struct Evaluator {
    resolver: TokioResolver,
    answers: AnswerCache,
    void_limit: u32,
    receiver: String,
}

impl std::fmt::Debug for Evaluator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Evaluator")
            .field("void_limit", &self.void_limit)
            .field("receiver", &self.receiver)
            .finish_non_exhaustive()
    }
}

/// One evaluation's counters and macro inputs.
struct Run<'a> {
    ip: IpAddr,
    sender: String,
    helo: &'a str,
    terms: u32,
    voids: u32,
    deadline: Instant,
    validated: Option<String>,
}

impl Evaluator {
    /// An evaluator over the resolver `[dns]` describes.
    pub fn new(dns: &DnsConfig, void_limit: u32, receiver: &str) -> Result<Self, ConfigError> {
        let resolver = postern_common::dns::resolver(dns)
            .map_err(|err| ConfigError::invalid("dns", err.to_string()))?;
        Ok(Self {
            resolver,
            answers: AnswerCache::new(dns.cache_size),
            void_limit,
            receiver: receiver.to_owned(),
        })
    }

    /// Records of one type; an empty list for NXDOMAIN or no data.
    async fn lookup(&self, run: &Run<'_>, name: &str, rtype: RecordType) -> Eval<Arc<Answered>> {
        let key = AnswerCache::key(name, rtype);
        if let Some(answer) = self.answers.get(&key) {
            return Ok(answer);
        }
        // Labels are taken as raw bytes: RFC 7208 section 7.1 lets a domain-spec hold any
        // visible character ("foo:bar/baz.example.com"); a name DNS cannot carry at all (a
        // label over 63 bytes) exists nowhere.
        let labels: Vec<&[u8]> = name
            .trim_end_matches('.')
            .split('.')
            .map(str::as_bytes)
            .collect();
        let Ok(mut fqdn) = Name::from_labels(labels) else {
            return Ok(Arc::new(Answered::nothing()));
        };
        fqdn.set_fqdn(true);
        let remaining = run.deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(Stop::Temp(
                "DNS Error: exceeded max query lookup time".into(),
            ));
        }
        match tokio::time::timeout(remaining, self.resolver.lookup(fqdn, rtype)).await {
            Err(_) => Err(Stop::Temp(
                "DNS Error: exceeded max query lookup time".into(),
            )),
            Ok(Ok(lookup)) => {
                let records = lookup
                    .answers()
                    .iter()
                    .filter(|r| r.record_type() == rtype)
                    .map(|r| r.data.clone())
                    .collect();
                Ok(self.answers.insert(key, records, lookup.valid_until()))
            }
            Ok(Err(err)) if err.is_nx_domain() || err.is_no_records_found() => {
                // Kept only as long as the zone's SOA allows; without one, not kept here.
                let negative_ttl = match &err {
                    NetError::Dns(DnsError::NoRecordsFound(NoRecords {
                        negative_ttl: Some(ttl),
                        ..
                    })) => Duration::from_secs(u64::from(*ttl)).min(MAX_NEGATIVE_TTL),
                    _ => Duration::ZERO,
                };
                Ok(self
                    .answers
                    .insert(key, Vec::new(), std::time::Instant::now() + negative_ttl))
            }
            Ok(Err(err)) => {
                let text = err.to_string();
                Err(Stop::Temp(if text.starts_with("DNS") {
                    text
                } else {
                    format!("DNS {text}")
                }))
            }
        }
    }

    /// A lookup that counts towards the void limit when it finds nothing.
    async fn counted(
        &self,
        run: &mut Run<'_>,
        name: &str,
        rtype: RecordType,
    ) -> Eval<Arc<Answered>> {
        let records = self.lookup(run, name, rtype).await?;
        if records.records.is_empty() {
            run.voids += 1;
            if run.voids > self.void_limit {
                return perm(format!("Void lookup limit of {} exceeded", self.void_limit));
            }
        }
        Ok(records)
    }

    async fn addresses(
        &self,
        run: &mut Run<'_>,
        name: &str,
        count_void: bool,
    ) -> Eval<Vec<IpAddr>> {
        let rtype = if run.ip.is_ipv4() {
            RecordType::A
        } else {
            RecordType::AAAA
        };
        let records = if count_void {
            self.counted(run, name, rtype).await?
        } else {
            self.lookup(run, name, rtype).await?
        };
        Ok(records
            .records
            .iter()
            .filter_map(|r| match r {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect())
    }

    fn count_term(run: &mut Run<'_>) -> Eval<()> {
        run.terms += 1;
        if run.terms > MAX_DNS_TERMS {
            return perm(format!("Too many DNS lookups (more than {MAX_DNS_TERMS})"));
        }
        Ok(())
    }

    /// The SPF record of `domain`: `Ok(None)` when it has none.
    async fn record(&self, run: &Run<'_>, domain: &str) -> Eval<Option<Arc<Record>>> {
        let answer = self.lookup(run, domain, RecordType::TXT).await?;
        answer
            .spf_record
            .get_or_init(|| Self::spf_record(&answer.records))
            .clone()
    }

    /// The one SPF record among a name's TXT records, parsed.
    fn spf_record(records: &[RData]) -> Eval<Option<Arc<Record>>> {
        let mut spf = records.iter().filter_map(|r| match r {
            RData::TXT(txt) => {
                let bytes: Vec<u8> = txt
                    .txt_data
                    .iter()
                    .flat_map(|s| s.iter().copied())
                    .collect();
                let text = String::from_utf8_lossy(&bytes).into_owned();
                is_spf1(&text).then_some(text)
            }
            _ => None,
        });
        let Some(first) = spf.next() else {
            return Ok(None);
        };
        if spf.next().is_some() {
            return perm("Two or more type TXT spf records found.");
        }
        parse_record(&first).map(|record| Some(Arc::new(record)))
    }

    /// `<domain>` as the validated PTR name of the client, for `%{p}`.
    async fn validated_name(
        &self,
        run: &mut Run<'_>,
        target: Option<&str>,
    ) -> Eval<Option<String>> {
        let names: Vec<String> = match self
            .lookup(run, &reverse_name(run.ip), RecordType::PTR)
            .await
        {
            Ok(answer) => answer
                .records
                .iter()
                .filter_map(|r| match r {
                    RData::PTR(p) => Some(raw_name(&p.0).to_ascii_lowercase()),
                    _ => None,
                })
                .collect(),
            Err(Stop::Temp(_)) => Vec::new(),
            Err(other) => return Err(other),
        };
        let mut first_valid = None;
        for name in names.into_iter().take(MAX_NAMES_PER_TERM) {
            let addrs = match self.addresses(run, &name, false).await {
                Ok(addrs) => addrs,
                Err(Stop::Temp(_)) => continue,
                Err(other) => return Err(other),
            };
            if !addrs.contains(&run.ip) {
                continue;
            }
            match target {
                Some(target) => {
                    if name == target || name.ends_with(&format!(".{target}")) {
                        return Ok(Some(name));
                    }
                }
                None => return Ok(Some(name)),
            }
            first_valid.get_or_insert(name);
        }
        Ok(if target.is_some() { None } else { first_valid })
    }

    async fn expand(&self, run: &mut Run<'_>, spec: &str, domain: &str, exp: bool) -> Eval<String> {
        let mut out = String::new();
        let mut chars = spec.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('%') => out.push('%'),
                Some('_') => out.push(' '),
                Some('-') => out.push_str("%20"),
                Some('{') => {
                    let letter = chars.next().unwrap_or(' ');
                    let mut body = String::new();
                    for c in chars.by_ref() {
                        if c == '}' {
                            break;
                        }
                        body.push(c);
                    }
                    let value = self
                        .macro_value(run, letter.to_ascii_lowercase(), domain, exp)
                        .await?;
                    let digits: String = body.chars().take_while(char::is_ascii_digit).collect();
                    let rest = &body[digits.len()..];
                    let (reverse, delims) = match rest.strip_prefix(['r', 'R']) {
                        Some(d) => (true, d),
                        None => (false, rest),
                    };
                    let delims = if delims.is_empty() { "." } else { delims };
                    let mut parts: Vec<&str> = value.split(|c| delims.contains(c)).collect();
                    if reverse {
                        parts.reverse();
                    }
                    if let Ok(n) = digits.parse::<usize>() {
                        if n == 0 {
                            return perm("Invalid macro transformer 0");
                        }
                        if parts.len() > n {
                            parts.drain(..parts.len() - n);
                        }
                    }
                    let joined = parts.join(".");
                    if letter.is_ascii_uppercase() {
                        out.push_str(&url_escape(&joined));
                    } else {
                        out.push_str(&joined);
                    }
                }
                _ => return perm("invalid-macro-char"),
            }
        }
        Ok(out)
    }

    async fn macro_value(
        &self,
        run: &mut Run<'_>,
        letter: char,
        domain: &str,
        exp: bool,
    ) -> Eval<String> {
        let (local, sender_domain) = run
            .sender
            .rsplit_once('@')
            .map(|(l, d)| (l.to_owned(), d.to_owned()))
            .unwrap_or_else(|| ("postmaster".to_owned(), run.sender.clone()));
        Ok(match letter {
            's' => run.sender.clone(),
            'l' => local,
            'o' => sender_domain,
            'd' => domain.to_owned(),
            'h' => run.helo.to_owned(),
            'i' => match run.ip {
                IpAddr::V4(v4) => v4.to_string(),
                IpAddr::V6(v6) => nibbles(v6).join("."),
            },
            'v' => if run.ip.is_ipv4() { "in-addr" } else { "ip6" }.to_owned(),
            'p' => {
                if run.validated.is_none() {
                    let name = self.validated_name(run, Some(domain)).await?;
                    let name = match name {
                        Some(n) => Some(n),
                        None => self.validated_name(run, None).await?,
                    };
                    run.validated = Some(name.unwrap_or_else(|| "unknown".to_owned()));
                }
                run.validated.clone().unwrap_or_default()
            }
            'c' if exp => run.ip.to_string(),
            'r' if exp => self.receiver.clone(),
            't' if exp => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default()
                .to_string(),
            _ => return perm(format!("Unknown Macro Encountered %{{{letter}}}")),
        })
    }

    /// A domain-spec expanded into a name to look up (RFC 7208 section 7.3: names over 253
    /// bytes lose labels on the left).
    async fn target(&self, run: &mut Run<'_>, spec: &str, domain: &str) -> Eval<String> {
        let mut name = self.expand(run, spec, domain, false).await?;
        while name.trim_end_matches('.').len() > 253 {
            match name.split_once('.') {
                Some((_, rest)) => name = rest.to_owned(),
                None => break,
            }
        }
        if !valid_name(&name, false) {
            return perm(format!("Invalid domain found: {name}"));
        }
        Ok(name.trim_end_matches('.').to_ascii_lowercase())
    }

    /// `check_host()`: the result for `domain` and, for a Fail, the explanation.
    fn check<'r>(&'r self, run: &'r mut Run<'_>, domain: String, depth: u32) -> CheckFuture<'r> {
        Box::pin(async move {
            if depth > MAX_DEPTH {
                return perm("Too many levels of recursion");
            }
            let Some(record) = self.record(run, &domain).await? else {
                return Ok((SpfResult::None, None));
            };
            for (qualifier, mechanism) in &record.directives {
                let matched = match mechanism {
                    Mechanism::All => true,
                    Mechanism::Ip4(net, prefix) => in_network(run.ip, IpAddr::V4(*net), *prefix),
                    Mechanism::Ip6(net, prefix) => in_network(run.ip, IpAddr::V6(*net), *prefix),
                    Mechanism::Include(spec) => {
                        Self::count_term(run)?;
                        let target = self.target(run, spec, &domain).await?;
                        match self.check(run, target.clone(), depth + 1).await? {
                            (SpfResult::Pass, _) => true,
                            (SpfResult::None, _) => {
                                // pyspf's wording, which policyd-spf puts in its answers.
                                return perm(format!(
                                    "No valid SPF record for included domain: {target}: include:{spec}"
                                ));
                            }
                            _ => false,
                        }
                    }
                    Mechanism::A(spec, v4, v6) => {
                        Self::count_term(run)?;
                        let name = match spec {
                            Some(spec) => self.target(run, spec, &domain).await?,
                            None => domain.clone(),
                        };
                        let prefix = if run.ip.is_ipv4() { *v4 } else { *v6 };
                        self.addresses(run, &name, true)
                            .await?
                            .iter()
                            .any(|a| in_network(run.ip, *a, prefix))
                    }
                    Mechanism::Mx(spec, v4, v6) => {
                        Self::count_term(run)?;
                        let name = match spec {
                            Some(spec) => self.target(run, spec, &domain).await?,
                            None => domain.clone(),
                        };
                        let prefix = if run.ip.is_ipv4() { *v4 } else { *v6 };
                        let exchanges: Vec<String> = self
                            .counted(run, &name, RecordType::MX)
                            .await?
                            .records
                            .iter()
                            .filter_map(|r| match r {
                                RData::MX(mx) => Some(raw_name(&mx.exchange)),
                                _ => None,
                            })
                            .collect();
                        if exchanges.len() > MAX_NAMES_PER_TERM {
                            return perm(format!("More than {MAX_NAMES_PER_TERM} MX records"));
                        }
                        let mut found = false;
                        for exchange in exchanges {
                            if !valid_name(&exchange, false) {
                                continue;
                            }
                            if self
                                .addresses(run, &exchange, false)
                                .await?
                                .iter()
                                .any(|a| in_network(run.ip, *a, prefix))
                            {
                                found = true;
                                break;
                            }
                        }
                        found
                    }
                    Mechanism::Ptr(spec) => {
                        Self::count_term(run)?;
                        let target = match spec {
                            Some(spec) => self.target(run, spec, &domain).await?,
                            None => domain.clone(),
                        };
                        self.validated_name(run, Some(&target)).await?.is_some()
                    }
                    Mechanism::Exists(spec) => {
                        Self::count_term(run)?;
                        let name = self.target(run, spec, &domain).await?;
                        // exists always asks for A records, whatever the client's family.
                        !self
                            .counted(run, &name, RecordType::A)
                            .await?
                            .records
                            .is_empty()
                    }
                };
                if matched {
                    let result = qualifier.result();
                    let explanation = match (&record.exp, result) {
                        (Some(exp), SpfResult::Fail) => self.explain(run, exp, &domain).await,
                        _ => None,
                    };
                    return Ok((result, explanation));
                }
            }
            if let Some(spec) = &record.redirect {
                Self::count_term(run)?;
                let target = self.target(run, spec, &domain).await?;
                return match self.check(run, target.clone(), depth + 1).await? {
                    (SpfResult::None, _) => {
                        perm(format!("redirect domain has no SPF record: {target}"))
                    }
                    other => Ok(other),
                };
            }
            Ok((SpfResult::Neutral, None))
        })
    }

    /// The `exp=` text; any problem means no explanation (RFC 7208 section 6.2).
    async fn explain(&self, run: &mut Run<'_>, spec: &str, domain: &str) -> Option<String> {
        let name = self.target(run, spec, domain).await.ok()?;
        let records = self.lookup(run, &name, RecordType::TXT).await.ok()?;
        let [RData::TXT(txt)] = &records.records[..] else {
            return None;
        };
        let bytes: Vec<u8> = txt
            .txt_data
            .iter()
            .flat_map(|s| s.iter().copied())
            .collect();
        let text = String::from_utf8(bytes).ok()?;
        if !text.is_ascii() {
            return None;
        }
        check_macro_string(&text, true).ok()?;
        self.expand(run, &text, domain, true).await.ok()
    }

    /// Evaluates one identity.
    pub async fn evaluate(&self, query: HostQuery<'_>) -> Verdict {
        // RFC 7208 section 5: an IPv4-mapped IPv6 client is an IPv4 client.
        let ip = match query.ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(query.ip, IpAddr::V4),
            v4 => v4,
        };
        let sender = if query.sender.starts_with('@') {
            format!("postmaster{}", query.sender)
        } else if query.sender.contains('@') {
            query.sender.to_owned()
        } else {
            format!("postmaster@{}", query.sender)
        };
        let domain = query.domain.trim_end_matches('.').to_ascii_lowercase();
        // RFC 7208 section 4.3: a domain that is not a multi-label FQDN gives None.
        if !valid_name(&domain, true) || domain.starts_with('[') {
            return Verdict::new(SpfResult::None);
        }
        let mut run = Run {
            ip,
            sender,
            helo: query.helo,
            terms: 0,
            voids: 0,
            deadline: Instant::now() + query.limit,
            validated: None,
        };
        match self.check(&mut run, domain, 0).await {
            Ok((result, explanation)) => Verdict {
                explanation: explanation
                    .filter(|_| result == SpfResult::Fail)
                    .unwrap_or_else(|| result.default_explanation().to_owned()),
                result,
            },
            Err(Stop::Temp(message)) => Verdict {
                result: SpfResult::Temperror,
                explanation: format!("SPF Temporary Error: {message}"),
            },
            Err(Stop::Perm(message)) => Verdict {
                result: SpfResult::Permerror,
                explanation: format!("SPF Permanent Error: {message}"),
            },
        }
    }
}

/// A name's labels as text, unescaped, without the root dot.
fn raw_name(name: &Name) -> String {
    name.iter()
        .map(|label| String::from_utf8_lossy(label).into_owned())
        .collect::<Vec<_>>()
        .join(".")
}

fn nibbles(v6: Ipv6Addr) -> Vec<String> {
    v6.octets()
        .iter()
        .flat_map(|b| [format!("{:x}", b >> 4), format!("{:x}", b & 0xf)])
        .collect()
}

fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut parts = nibbles(v6);
            parts.reverse();
            format!("{}.ip6.arpa", parts.join("."))
        }
    }
}

/// RFC 7208 section 7.3: upper-case macro letters URL-escape everything but unreserved
/// characters (RFC 3986).
fn url_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// [`Lookups`] over the evaluator and the same resolver.
#[derive(Debug, Clone)]
pub struct ResolverLookups {
    evaluator: Evaluator,
}

impl ResolverLookups {
    /// Builds the resolver from `[dns]`.
    pub fn new(dns: &DnsConfig, void_limit: u32, receiver: &str) -> Result<Self, ConfigError> {
        Ok(Self {
            evaluator: Evaluator::new(dns, void_limit, receiver)?,
        })
    }

    fn run(&self, ip: IpAddr, limit: Duration) -> Run<'static> {
        Run {
            ip,
            sender: String::new(),
            helo: "",
            terms: 0,
            voids: 0,
            deadline: Instant::now() + limit,
            validated: None,
        }
    }
}

impl Lookups for ResolverLookups {
    async fn check_host(&self, query: HostQuery<'_>) -> Verdict {
        self.evaluator.evaluate(query).await
    }

    async fn addresses(&self, name: &str, v6: bool, limit: Duration) -> Vec<IpAddr> {
        let probe = if v6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        let mut run = self.run(probe, limit);
        self.evaluator
            .addresses(&mut run, name, false)
            .await
            .unwrap_or_default()
    }

    async fn first_ptr(&self, ip: IpAddr, limit: Duration) -> Option<String> {
        let run = self.run(ip, limit);
        let records = self
            .evaluator
            .lookup(&run, &reverse_name(ip), RecordType::PTR)
            .await
            .ok()?;
        records.records.iter().find_map(|r| match r {
            RData::PTR(p) => Some(raw_name(&p.0)),
            _ => None,
        })
    }

    async fn is_no_mail_record(&self, domain: &str) -> bool {
        let run = self.run(IpAddr::V4(Ipv4Addr::UNSPECIFIED), Duration::from_secs(5));
        let Ok(records) = self.evaluator.lookup(&run, domain, RecordType::TXT).await else {
            return false;
        };
        let spf: Vec<String> = records
            .records
            .iter()
            .filter_map(|r| match r {
                RData::TXT(txt) => {
                    let bytes: Vec<u8> = txt
                        .txt_data
                        .iter()
                        .flat_map(|s| s.iter().copied())
                        .collect();
                    let text = String::from_utf8_lossy(&bytes).into_owned();
                    is_spf1(&text).then_some(text)
                }
                _ => None,
            })
            .collect();
        // pyspf compares the cached record with exactly "v=spf1 -all".
        matches!(&spf[..], [only] if only == "v=spf1 -all")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_syntax() {
        assert!(
            parse_record("v=spf1 ip4:192.0.2.0/24 a mx/24//64 include:_spf.example.com -all")
                .is_ok()
        );
        for bad in [
            "v=spf1 ip4:192.0.2.0/33",
            "v=spf1 ip4:192.0.2.0/032",
            "v=spf1 ip6:::1/129",
            "v=spf1 a:foo.example.123",
            "v=spf1 a:museum",
            "v=spf1 foo",
            "v=spf1 redirect=a.example redirect=b.example",
            "v=spf1 exists:%{x}.example.com",
            "v=spf1 include",
        ] {
            assert!(matches!(parse_record(bad), Err(Stop::Perm(_))), "{bad}");
        }
        assert!(is_spf1("v=spf1") && is_spf1("V=SPF1 -all") && !is_spf1("v=spf10"));
    }

    #[test]
    fn arbitrary_records_and_macros_never_panic() {
        // A cheap stand-in for a fuzz target: pseudo-random soup of record syntax.
        let alphabet: Vec<&str> = vec![
            " ", "a", ":", "/", "//", "%{", "}", "%", "ir", "l", "1", "0", "=", ".", "-", "~",
            "ip4", "ip6", "mx", "ptr", "include", "exists", "redirect", "exp", "all", "\u{e9}",
            "9", "_", "+", "?", "..", "%%", "%-", "%_",
        ];
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..5000 {
            let len = (seed % 24) as usize;
            let mut text = String::from("v=spf1 ");
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                text.push_str(alphabet[(seed % alphabet.len() as u64) as usize]);
            }
            let _ = parse_record(&text);
            let _ = check_macro_string(&text, true);
            let _ = check_domain_spec(&text[7..]);
        }
    }

    #[test]
    fn networks_and_escapes() {
        assert!(in_network(
            "192.0.2.9".parse().unwrap(),
            "192.0.2.0".parse().unwrap(),
            24
        ));
        assert!(!in_network(
            "192.0.3.9".parse().unwrap(),
            "192.0.2.0".parse().unwrap(),
            24
        ));
        assert!(in_network(
            "2001:db8::1".parse().unwrap(),
            "::".parse().unwrap(),
            0
        ));
        assert!(!in_network(
            "192.0.2.9".parse().unwrap(),
            "::".parse().unwrap(),
            0
        ));
        assert_eq!(url_escape("a&b=c d"), "a%26b%3Dc%20d");
        assert_eq!(
            reverse_name("192.0.2.1".parse().unwrap()),
            "1.2.0.192.in-addr.arpa"
        );
    }
}
