//! Evaluation tests with DNS answers injected through mail-auth's cache hook (no network).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mail_auth::crypto::Ed25519Key;
use mail_auth::dkim::{Canonicalization, DkimSigner, DomainKey};
use mail_auth::dmarc::DmarcRecord;
use mail_auth::dns::{DnsCache, Negative, RecordSet, ResolverCache, TxtRecord, TxtRecordParser};
use mail_auth::headers::HeaderWriter;
use mail_auth::hickory_resolver::config::{ResolverConfig, ResolverOpts};
use mail_auth::hickory_resolver::proto::op::ResponseCode;
use mail_auth::spf::SpfRecord;
use mail_auth::{AuthenticatedMessage, DnsError, Error, MessageAuthenticator, Mx, Parameters};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;

use super::*;

pub(crate) struct ZoneMap<K, V> {
    map: Mutex<HashMap<K, V>>,
    on_miss: V,
}

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for ZoneMap<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let map = self.map.lock().unwrap();
        Some(
            map.get(name)
                .cloned()
                .unwrap_or_else(|| self.on_miss.clone()),
        )
    }
    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.lock().unwrap().remove(name)
    }
    fn insert(&self, key: K, value: V, _valid_until: Instant) {
        self.map.lock().unwrap().insert(key, value);
    }
}

type Answer<T> = Result<RecordSet<T>, Negative>;

/// A test zone: parsed records for mail-auth, raw DMARC texts for the pct/ri lookup.
pub(crate) struct Zone {
    txt: ZoneMap<Box<str>, TxtRecord>,
    mx: ZoneMap<Box<str>, Answer<Mx>>,
    ipv4: ZoneMap<Box<str>, Answer<Ipv4Addr>>,
    ipv6: ZoneMap<Box<str>, Answer<Ipv6Addr>>,
    ptr: ZoneMap<IpAddr, Answer<Box<str>>>,
    raw: Mutex<HashMap<String, Result<Vec<String>, ()>>>,
}

fn nx<T>() -> Answer<T> {
    Err(Negative {
        code: ResponseCode::NXDomain,
    })
}

impl Zone {
    pub(crate) fn new() -> Self {
        Self {
            txt: ZoneMap {
                map: Mutex::default(),
                on_miss: TxtRecord::Error(Error::Dns(DnsError::RecordNotFound(
                    ResponseCode::NXDomain,
                ))),
            },
            mx: ZoneMap {
                map: Mutex::default(),
                on_miss: nx(),
            },
            ipv4: ZoneMap {
                map: Mutex::default(),
                on_miss: nx(),
            },
            ipv6: ZoneMap {
                map: Mutex::default(),
                on_miss: nx(),
            },
            ptr: ZoneMap {
                map: Mutex::default(),
                on_miss: nx(),
            },
            raw: Mutex::default(),
        }
    }

    fn key(name: &str) -> Box<str> {
        format!("{}.", name.trim_end_matches('.').to_ascii_lowercase()).into_boxed_str()
    }

    pub(crate) fn txt<T: TxtRecordParser + Into<TxtRecord>>(&self, name: &str, text: &str) {
        let parsed: TxtRecord = T::parse(text.as_bytes())
            .map(Into::into)
            .unwrap_or_else(TxtRecord::Error);
        self.txt.insert(Self::key(name), parsed, Instant::now());
    }

    pub(crate) fn dmarc(&self, domain: &str, text: &str) {
        self.txt::<DmarcRecord>(&format!("_dmarc.{domain}"), text);
        self.raw
            .lock()
            .unwrap()
            .insert(format!("_dmarc.{domain}"), Ok(vec![text.to_owned()]));
    }

    pub(crate) fn a(&self, name: &str, ip: Ipv4Addr) {
        self.ipv4.insert(
            Self::key(name),
            Ok(RecordSet {
                records: vec![ip].into(),
                dnssec_status: Default::default(),
            }),
            Instant::now(),
        );
    }

    pub(crate) fn servfail(&self, name: &str) {
        self.txt.insert(
            Self::key(name),
            TxtRecord::Error(Error::Dns(DnsError::Resolver("SERVFAIL".into()))),
            Instant::now(),
        );
        self.raw.lock().unwrap().insert(name.to_owned(), Err(()));
    }
}

impl DnsCache for Zone {
    type Txt = ZoneMap<Box<str>, TxtRecord>;
    type Mx = ZoneMap<Box<str>, Answer<Mx>>;
    type Ipv4 = ZoneMap<Box<str>, Answer<Ipv4Addr>>;
    type Ipv6 = ZoneMap<Box<str>, Answer<Ipv6Addr>>;
    type Ptr = ZoneMap<IpAddr, Answer<Box<str>>>;
    fn txt(&self) -> Option<&Self::Txt> {
        Some(&self.txt)
    }
    fn mx(&self) -> Option<&Self::Mx> {
        Some(&self.mx)
    }
    fn ipv4(&self) -> Option<&Self::Ipv4> {
        Some(&self.ipv4)
    }
    fn ipv6(&self) -> Option<&Self::Ipv6> {
        Some(&self.ipv6)
    }
    fn ptr(&self) -> Option<&Self::Ptr> {
        Some(&self.ptr)
    }
}

impl TxtSource for Zone {
    async fn raw_txt(&self, name: &str) -> Result<Vec<String>, ()> {
        self.raw
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .unwrap_or(Ok(Vec::new()))
    }
}

/// An authenticator whose resolver points at a closed loopback port: every answer must come
/// from the zone.
pub(crate) fn offline_authenticator() -> MessageAuthenticator {
    use mail_auth::hickory_resolver::config::NameServerConfig;
    let mut ns = NameServerConfig::udp_and_tcp(IpAddr::V4(Ipv4Addr::LOCALHOST));
    for conn in &mut ns.connections {
        conn.port = 9;
    }
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_millis(200);
    opts.attempts = 1;
    MessageAuthenticator::new(ResolverConfig::from_name_servers(vec![ns]), opts).unwrap()
}

const ED_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIGAcz6YuoQZYw7z6qYo2AN0AE5ydqtEyyCxxDgnfi+HM\n-----END PRIVATE KEY-----\n";
const ED_PUB: &str = "Hb8P1V+sRs+vzzPVkGT3SV3gmd1frJxIw6x0EgurFAg=";

pub(crate) fn sign(domain: &str, raw: &str) -> String {
    let der = PrivatePkcs8KeyDer::from_pem_slice(ED_KEY.as_bytes()).unwrap();
    let key = Ed25519Key::from_pkcs8_maybe_unchecked_der(der.secret_pkcs8_der()).unwrap();
    let signer = DkimSigner::from_key(key)
        .domain(domain)
        .selector("ed")
        .headers(["From", "To", "Subject", "Date"])
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed);
    let signature = signer.sign(raw.as_bytes()).unwrap();
    format!("{}{raw}", signature.to_header())
}

pub(crate) fn message(from: &str, extra_headers: &str) -> String {
    format!(
        "{extra_headers}Received: from mail.sender.test (mail.sender.test [192.0.2.25])\r\n\tby mx.test (Postfix) with ESMTP id 4AbCdE\r\n\
         From: Alice <{from}>\r\nTo: bob@receiver.test\r\nSubject: hello\r\n\
         Date: Wed, 25 Nov 2026 08:00:00 +0000\r\nMessage-ID: <1@sender.test>\r\n\r\nHi Bob.\r\n"
    )
}

pub(crate) fn standard_zone() -> Zone {
    let zone = Zone::new();
    zone.dmarc(
        "example.com",
        "v=DMARC1; p=reject; sp=quarantine; np=reject; rua=mailto:dmarc@example.com; fo=1",
    );
    zone.txt::<SpfRecord>("example.com", "v=spf1 ip4:192.0.2.0/24 -all");
    zone.txt::<SpfRecord>("bounce.example.com", "v=spf1 ip4:192.0.2.0/24 -all");
    zone.txt::<SpfRecord>("other.org", "v=spf1 ip4:192.0.2.0/24 -all");
    zone.txt::<DomainKey>(
        "ed._domainkey.example.com",
        &format!("v=DKIM1; k=ed25519; p={ED_PUB}"),
    );
    zone.txt::<DomainKey>(
        "ed._domainkey.other.org",
        &format!("v=DKIM1; k=ed25519; p={ED_PUB}"),
    );
    zone.a("sub.example.com", Ipv4Addr::new(192, 0, 2, 80));
    zone
}

struct Case<'a> {
    config: DmarcConfig,
    zone: &'a Zone,
    raw: String,
    client: IpAddr,
    envelope_from: &'a str,
    authenticated: bool,
    random: u8,
}

impl<'a> Case<'a> {
    fn new(zone: &'a Zone, raw: String, envelope_from: &'a str) -> Self {
        Self {
            config: DmarcConfig::default(),
            zone,
            raw,
            client: "192.0.2.25".parse().unwrap(),
            envelope_from,
            authenticated: false,
            random: 0,
        }
    }

    async fn run(&self) -> DmarcDecision {
        let auth = offline_authenticator();
        let am = AuthenticatedMessage::parse(self.raw.as_bytes()).unwrap();
        let dkim = auth
            .verify_dkim(Parameters::new(&am).with_cache(self.zone))
            .await;
        let to = vec!["bob@receiver.test".to_owned()];
        let input = DmarcInput {
            client_ip: self.client,
            helo: "mail.sender.test",
            envelope_from: self.envelope_from,
            envelope_to: &to,
            authenticated: self.authenticated,
            message: &am,
            dkim: &dkim,
            authserv_id: "mx.test",
            queue_id: "4AbCdE",
            now: 1_790_000_000,
        };
        let random = self.random;
        evaluate_with(
            &self.config,
            &input,
            &auth,
            Some(self.zone),
            self.zone,
            &mut || random,
        )
        .await
    }
}

fn header(decision: &DmarcDecision) -> &str {
    decision.header.as_deref().unwrap_or("")
}

#[tokio::test]
async fn spf_aligned_relaxed_passes() {
    let zone = standard_zone();
    let case = Case::new(
        &zone,
        message("alice@example.com", ""),
        "b@bounce.example.com",
    );
    let decision = case.run().await;
    assert_eq!(
        header(&decision),
        "mx.test; dmarc=pass (p=reject dis=none) header.from=example.com"
    );
    assert_eq!(decision.action, DmarcAction::Accept);
    assert_eq!(
        decision.spf_header.as_deref(),
        Some("mx.test; spf=pass smtp.mailfrom=bounce.example.com")
    );
    let record = decision.record.expect("recorded");
    assert!(record.spf_aligned);
    assert!(!record.dkim_aligned);
    assert_eq!(record.spf_domain, "bounce.example.com");
    assert_eq!(record.spf_scope, "mfrom");
    assert_eq!(record.envelope_to, "receiver.test");
    assert_eq!(record.published.domain, "example.com");
    assert_eq!(record.published.fo, "1");
    assert_eq!(record.published.rua, vec!["dmarc@example.com".to_owned()]);
    assert_eq!(record.published.pct, 100);
}

#[tokio::test]
async fn strict_spf_alignment_fails_and_reject_failures_rejects() {
    let zone = standard_zone();
    zone.dmarc("example.com", "v=DMARC1; p=reject; aspf=s");
    let mut case = Case::new(
        &zone,
        message("alice@example.com", ""),
        "b@bounce.example.com",
    );
    let decision = case.run().await;
    assert_eq!(
        header(&decision),
        "mx.test; dmarc=fail (p=reject dis=none) header.from=example.com"
    );
    assert_eq!(decision.action, DmarcAction::Accept);
    let record = decision.record.unwrap();
    assert_eq!(record.disposition, "none");
    assert_eq!(record.reasons[0].0, "local_policy");
    assert!(!record.spf_aligned);

    case.config.reject_failures = true;
    let decision = case.run().await;
    assert_eq!(
        decision.action,
        DmarcAction::Reject {
            code: "550",
            enhanced: "5.7.1",
            text: "rejected by DMARC policy for example.com".into()
        }
    );
    assert_eq!(decision.header, None, "no header on a rejected message");
    assert_eq!(decision.record.unwrap().disposition, "reject");
}

#[tokio::test]
async fn dkim_aligned_passes_and_unaligned_fails() {
    let zone = standard_zone();
    let signed = sign("example.com", &message("alice@example.com", ""));
    let mut case = Case::new(&zone, signed, "x@elsewhere.test");
    case.client = "198.51.100.7".parse().unwrap();
    let decision = case.run().await;
    assert_eq!(decision.result, "pass", "{decision:?}");
    let record = decision.record.unwrap();
    assert!(record.dkim_aligned);
    assert_eq!(
        record.dkim,
        vec![crate::reports::DkimAuth {
            domain: "example.com".into(),
            selector: "ed".into(),
            result: "pass".into()
        }]
    );

    let signed = sign("other.org", &message("alice@example.com", ""));
    let mut case = Case::new(&zone, signed, "x@elsewhere.test");
    case.client = "198.51.100.7".parse().unwrap();
    let decision = case.run().await;
    assert_eq!(decision.result, "fail");
    let record = decision.record.unwrap();
    assert!(!record.dkim_aligned);
    assert_eq!(record.dkim[0].domain, "other.org");
    assert_eq!(record.dkim[0].result, "pass");
}

#[tokio::test]
async fn policy_selection_p_sp_np() {
    let zone = standard_zone();
    let mut config = DmarcConfig {
        reject_failures: true,
        hold_quarantined_messages: true,
        ..DmarcConfig::default()
    };
    config.spf_self_validate = false;
    // Existing subdomain: sp=quarantine.
    let mut case = Case::new(&zone, message("a@sub.example.com", ""), "x@elsewhere.test");
    case.config = config.clone();
    let decision = case.run().await;
    assert_eq!(
        decision.action,
        DmarcAction::Quarantine {
            reason: "quarantined by DMARC policy for example.com".into()
        }
    );
    assert_eq!(
        header(&decision),
        "mx.test; dmarc=fail (p=quarantine dis=quarantine) header.from=sub.example.com"
    );
    // Non-existent subdomain: np=reject.
    let mut case = Case::new(&zone, message("a@nx.example.com", ""), "x@elsewhere.test");
    case.config = config.clone();
    let decision = case.run().await;
    assert!(matches!(decision.action, DmarcAction::Reject { .. }));
    // The domain itself: p=reject.
    let mut case = Case::new(&zone, message("a@example.com", ""), "x@elsewhere.test");
    case.config = config;
    assert!(matches!(
        case.run().await.action,
        DmarcAction::Reject { .. }
    ));
}

#[tokio::test]
async fn pct_sampling_uses_the_injected_random_source() {
    let zone = standard_zone();
    zone.dmarc("example.com", "v=DMARC1; p=reject; pct=50");
    let mut case = Case::new(&zone, message("a@example.com", ""), "x@elsewhere.test");
    case.config.reject_failures = true;
    case.config.spf_self_validate = false;
    case.random = 49;
    let decision = case.run().await;
    assert!(matches!(decision.action, DmarcAction::Reject { .. }));
    assert_eq!(decision.record.unwrap().published.pct, 50);

    case.random = 50;
    let decision = case.run().await;
    assert_eq!(decision.action, DmarcAction::Accept, "sampled out");
    let record = decision.record.unwrap();
    assert_eq!(record.disposition, "none");
    assert_eq!(record.reasons[0], ("sampled_out".to_owned(), String::new()));

    case.config.hold_quarantined_messages = true;
    let decision = case.run().await;
    assert!(
        matches!(decision.action, DmarcAction::Quarantine { .. }),
        "a sampled-out reject falls back to quarantine"
    );
}

#[tokio::test]
async fn dns_failure_is_temperror_and_tempfails_when_configured() {
    let zone = standard_zone();
    zone.servfail("_dmarc.example.com");
    let mut case = Case::new(&zone, message("a@example.com", ""), "b@bounce.example.com");
    let decision = case.run().await;
    assert_eq!(decision.result, "temperror");
    assert_eq!(
        header(&decision),
        "mx.test; dmarc=temperror (p=none dis=none) header.from=example.com"
    );
    assert_eq!(decision.action, DmarcAction::Accept);
    case.config.dns_failure_action = TempErrorAction::Tempfail;
    let decision = case.run().await;
    assert!(matches!(decision.action, DmarcAction::Tempfail { .. }));
    assert_eq!(decision.header, None);
    assert_eq!(decision.record, None);
}

#[tokio::test]
async fn no_record_is_none_and_recorded_only_with_record_all_messages() {
    let zone = standard_zone();
    let mut case = Case::new(&zone, message("a@norecord.test", ""), "b@norecord.test");
    let decision = case.run().await;
    assert_eq!(
        header(&decision),
        "mx.test; dmarc=none (p=none dis=none) header.from=norecord.test"
    );
    assert_eq!(decision.record, None);
    case.config.record_all_messages = true;
    let record = case.run().await.record.unwrap();
    assert_eq!(record.published.domain, "norecord.test");
    assert!(record.published.rua.is_empty());
}

#[tokio::test]
async fn reports_disabled_evaluates_but_records_nothing() {
    let zone = standard_zone();
    let mut case = Case::new(
        &zone,
        message("alice@example.com", ""),
        "b@bounce.example.com",
    );
    assert!(case.run().await.record.is_some());
    case.config.reports.enabled = false;
    case.config.record_all_messages = true;
    let decision = case.run().await;
    assert_eq!(
        header(&decision),
        "mx.test; dmarc=pass (p=reject dis=none) header.from=example.com"
    );
    assert_eq!(decision.record, None);
}

#[tokio::test]
async fn ignored_clients_and_domains_are_not_evaluated() {
    let zone = standard_zone();
    let mut case = Case::new(&zone, message("a@example.com", ""), "x@elsewhere.test");
    case.config.reject_failures = true;
    case.client = "127.0.0.1".parse().unwrap();
    let decision = case.run().await;
    assert_eq!(decision.result, "ignored");
    assert_eq!((decision.header, decision.record), (None, None));
    assert_eq!(decision.action, DmarcAction::Accept);

    case.client = "192.0.2.99".parse().unwrap();
    case.authenticated = true;
    assert!(matches!(
        case.run().await.action,
        DmarcAction::Reject { .. }
    ));
    case.config.ignore_authenticated_clients = true;
    assert_eq!(case.run().await.result, "ignored");

    case.authenticated = false;
    case.config.ignore_mail_from = vec!["EXAMPLE.com".into()];
    assert_eq!(case.run().await.result, "ignored");
}

#[tokio::test]
async fn multi_value_from_and_required_headers() {
    let zone = standard_zone();
    let raw = message("a@example.com", "").replace(
        "From: Alice <a@example.com>",
        "From: Alice <a@example.com>, Eve <e@other.org>",
    );
    let mut case = Case::new(&zone, raw, "x@elsewhere.test");
    let decision = case.run().await;
    assert_eq!(decision.action, DmarcAction::Accept);
    assert_eq!(decision.header, None);
    case.config.reject_multi_value_from = true;
    let decision = case.run().await;
    assert!(
        matches!(&decision.action, DmarcAction::Reject { code: "550", text, .. } if text.contains("multi-valued From"))
    );

    let raw = message("a@example.com", "").replace("Subject: hello", "Subject: a\r\nSubject: b");
    let mut case = Case::new(&zone, raw.clone(), "b@bounce.example.com");
    assert_eq!(case.run().await.result, "pass");
    case.config.required_headers = true;
    let decision = case.run().await;
    assert!(
        matches!(&decision.action, DmarcAction::Reject { text, .. } if text.contains("2 subject fields")),
        "{decision:?}"
    );
    let no_from = message("a@example.com", "").replace("From: Alice <a@example.com>\r\n", "");
    let mut case = Case::new(&zone, no_from, "b@bounce.example.com");
    assert_eq!(
        case.run().await.header,
        None,
        "no From: nothing to evaluate"
    );
    case.config.required_headers = true;
    assert!(matches!(
        case.run().await.action,
        DmarcAction::Reject { .. }
    ));
}

#[tokio::test]
async fn null_sender_uses_helo() {
    let zone = standard_zone();
    zone.txt::<SpfRecord>("mail.sender.test", "v=spf1 ip4:192.0.2.25 -all");
    let case = Case::new(&zone, message("a@example.com", ""), "");
    let decision = case.run().await;
    assert_eq!(
        decision.spf_header.as_deref(),
        Some("mx.test; spf=pass smtp.helo=mail.sender.test")
    );
    let record = decision.record.unwrap();
    assert_eq!(record.spf_scope, "helo");
    assert_eq!(record.spf_result, "pass");
    assert_eq!(record.envelope_from, "");
    assert!(
        !record.spf_aligned,
        "sender.test is not aligned with example.com"
    );
}

#[tokio::test]
async fn trusted_upstream_spf_is_used_untrusted_is_not() {
    let zone = standard_zone();
    // No SPF record for the sender's domain: only an upstream result can make SPF pass.
    let sender = "b@bounce2.example.com";
    let mut base = DmarcConfig {
        spf_self_validate: false,
        trusted_authserv_ids: vec!["policy.mx.test".into()],
        ..DmarcConfig::default()
    };
    base.reject_failures = true;
    let run = |prefix: String, after: String| {
        let config = base.clone();
        let zone = &zone;
        async move {
            let raw = message("a@example.com", &prefix).replacen(
                "From: Alice",
                &format!("{after}From: Alice"),
                1,
            );
            let mut case = Case::new(zone, raw, sender);
            case.config = config;
            case.run().await
        }
    };
    // Received-SPF prepended by our Postfix (above its Received), identity=mailfrom, same sender.
    let good = format!(
        "Received-SPF: Pass (mailfrom) identity=mailfrom; client-ip=192.0.2.25; helo=mail.sender.test; envelope-from={sender}; receiver=<UNKNOWN>\r\n"
    );
    let decision = run(good.clone(), String::new()).await;
    assert_eq!(decision.result, "pass", "{decision:?}");
    assert_eq!(
        decision.spf_header, None,
        "no own spf header for an upstream result"
    );
    // An Authentication-Results from a trusted authserv-id.
    let ar = format!(
        "Authentication-Results: policy.mx.test;\r\n\tspf=pass (sender SPF authorized) smtp.mailfrom={sender}\r\n"
    );
    assert_eq!(run(ar.clone(), String::new()).await.result, "pass");
    // The same headers below our Received (they came with the message): ignored.
    assert_eq!(run(String::new(), good.clone()).await.result, "fail");
    assert_eq!(run(String::new(), ar).await.result, "fail");
    // Untrusted authserv-id.
    let forged =
        format!("Authentication-Results: evil.example; spf=pass smtp.mailfrom={sender}\r\n");
    assert_eq!(run(forged, String::new()).await.result, "fail");
    // identity=helo, or another sender (CVE-2019-20790): ignored.
    let helo = good.replace("identity=mailfrom", "identity=helo");
    assert_eq!(run(helo, String::new()).await.result, "fail");
    let other = good.replace(sender, "b@other.example.com");
    assert_eq!(run(other, String::new()).await.result, "fail");
    // receiver= naming an untrusted host.
    let receiver = good.replace("<UNKNOWN>", "mx.evil.example");
    assert_eq!(run(receiver, String::new()).await.result, "fail");
}

#[test]
fn extra_tags_parse() {
    assert_eq!(
        parse_extra_tags("v=DMARC1; p=reject; pct=25; ri=3600"),
        ExtraTags { pct: 25, ri: 3600 }
    );
    assert_eq!(
        parse_extra_tags("v=DMARC1; p=none; pct=250; ri=10"),
        ExtraTags { pct: 100, ri: 3600 }
    );
    assert_eq!(parse_extra_tags("v=DMARC1; p=none"), ExtraTags::default());
}

#[test]
fn upstream_header_parsers() {
    let ids = vec!["mx.test".to_owned()];
    assert_eq!(
        upstream::from_authentication_results(
            "mx.test; dkim=pass header.d=a.test; spf=softfail (x) smtp.mailfrom=a.test",
            &ids,
            "u@a.test"
        ),
        Some(mail_auth::SpfResult::SoftFail)
    );
    assert_eq!(
        upstream::from_authentication_results(
            "mx.test; spf=pass smtp.helo=a.test",
            &ids,
            "u@a.test"
        ),
        None
    );
    assert_eq!(
        upstream::from_received_spf(
            "Softfail (domain of transitioning) identity=mailfrom; envelope-from=\"u@a.test\"; receiver=mx.test",
            &ids,
            "U@A.test"
        ),
        Some(mail_auth::SpfResult::SoftFail)
    );
}

#[test]
fn config_round_trip_and_validation() {
    let config: DmarcConfig = toml::from_str(
        "reject_failures = true\nignore_hosts = [\"10.0.0.0/8\"]\ndns_failure_action = \"tempfail\"\n[reports]\nstore = \"postgres://u:p@127.0.0.1/db\"\n",
    )
    .unwrap();
    assert!(config.reject_failures);
    assert_eq!(config.dns_failure_action, TempErrorAction::Tempfail);
    config.validate().unwrap();
    let text = toml::to_string(&config).unwrap();
    assert_eq!(toml::from_str::<DmarcConfig>(&text).unwrap(), config);
    assert!(toml::from_str::<DmarcConfig>("rejectfailures = true").is_err());
    let bad = DmarcConfig {
        trusted_authserv_ids: vec!["a b".into()],
        ..DmarcConfig::default()
    };
    assert!(bad.validate().is_err());
}

#[tokio::test]
async fn ignore_hosts_file_in_opendmarc_format() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ignore.hosts");
    std::fs::write(
        &file,
        "# opendmarc IgnoreHosts\n127.0.0.1\nlocalhost\n192.0.2.0/24  # our relays\nmx.example.net\n[2001:db8::1]\n",
    )
    .unwrap();
    let nets = read_ignore_hosts(&file).unwrap();
    assert_eq!(nets.len(), 5, "{nets:?}");
    let zone = standard_zone();
    let mut case = Case::new(&zone, message("a@example.com", ""), "x@elsewhere.test");
    case.config.ignore_hosts = Vec::new();
    case.client = "192.0.2.77".parse().unwrap();
    assert_eq!(case.run().await.result, "fail");
    case.config.ignore_hosts_file = file.clone();
    case.config.validate().unwrap();
    assert_eq!(case.run().await.result, "ignored");
    case.client = "198.51.100.1".parse().unwrap();
    assert_eq!(case.run().await.result, "fail");
    case.config.ignore_hosts_file = dir.path().join("missing");
    assert!(
        case.config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("missing")
    );
}
