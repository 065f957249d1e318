//! The SPF check keeps DNS answers exactly as long as their TTL allows, against the real test
//! DNS server: a changed record is not seen while the old one is still valid and is seen once it
//! expires; "no such record" is kept for the SOA's negative TTL; a failure (SERVFAIL) is never
//! kept, so the check recovers as soon as the server does.

use std::time::Duration;

use postern_common::config::{ConfigDuration, DnsConfig};
use postern_policyd::proto::PolicyRequest;
use postern_policyd::spf::{SpfCheck, SpfConfig};
use postern_tests::dns::{Fault, TestDns, Zone};

/// Every answer's TTL in this test: long enough to ask twice inside it, short enough to wait
/// out.
const TTL_SECS: u32 = 2;

fn request(sender_domain: &str, instance: &str) -> PolicyRequest {
    let sender = format!("someone@{sender_domain}");
    PolicyRequest::from_pairs([
        ("request", "smtpd_access_policy"),
        ("protocol_state", "RCPT"),
        ("client_address", "192.0.2.1"),
        ("helo_name", "helo.cache.test"),
        ("sender", sender.as_str()),
        ("recipient", "postmaster@receiver.test"),
        ("instance", instance),
    ])
}

async fn result_for(check: &SpfCheck, sender_domain: &str, instance: &str) -> String {
    let reply = check.check(&request(sender_domain, instance)).await;
    let action = reply.action().to_owned();
    if action.starts_with("550 5.7.23") {
        "fail".to_owned()
    } else if let Some(header) = action.strip_prefix("prepend Received-SPF: ") {
        header
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase()
    } else if action.starts_with("defer_if_permit") {
        "temperror".to_owned()
    } else {
        action
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_kept_for_their_ttl_and_failures_never() {
    let mut zone = Zone::new();
    zone.set_ttl(TTL_SECS);
    zone.add(
        "changing.cache.test",
        "TXT",
        "\"v=spf1 ip4:192.0.2.1 -all\"",
    )
    .unwrap();
    let dns = TestDns::start(zone).await.unwrap();
    let check = SpfCheck::new(
        &SpfConfig {
            temp_error_defer: true,
            ..SpfConfig::default()
        },
        &DnsConfig {
            nameservers: vec![dns.addr()],
            timeout: ConfigDuration::from_secs(2),
            attempts: 1,
            cache_size: 1000,
        },
    )
    .unwrap();

    // Positive answers: asked once, then kept until the TTL runs out.
    assert_eq!(
        result_for(&check, "changing.cache.test", "m1").await,
        "pass"
    );
    let asked = dns.queries();
    assert_eq!(
        result_for(&check, "changing.cache.test", "m2").await,
        "pass"
    );
    assert_eq!(dns.queries(), asked, "a valid answer is not asked again");
    dns.remove("changing.cache.test");
    dns.add("changing.cache.test", "TXT", "\"v=spf1 -all\"")
        .unwrap();
    assert_eq!(
        result_for(&check, "changing.cache.test", "m3").await,
        "pass",
        "the old record is still valid"
    );
    tokio::time::sleep(Duration::from_millis(u64::from(TTL_SECS) * 1000 + 300)).await;
    assert_eq!(
        result_for(&check, "changing.cache.test", "m4").await,
        "fail",
        "the new record is seen once the old one expired"
    );

    // Negative answers: kept for the SOA's TTL.
    assert_eq!(result_for(&check, "later.cache.test", "m5").await, "none");
    let asked = dns.queries();
    dns.add("later.cache.test", "TXT", "\"v=spf1 ip4:192.0.2.1 -all\"")
        .unwrap();
    assert_eq!(result_for(&check, "later.cache.test", "m6").await, "none");
    assert_eq!(
        dns.queries(),
        asked,
        "a valid negative answer is not asked again"
    );
    tokio::time::sleep(Duration::from_millis(u64::from(TTL_SECS) * 1000 + 300)).await;
    assert_eq!(result_for(&check, "later.cache.test", "m7").await, "pass");

    // Failures: never kept.
    dns.add("flaky.cache.test", "TXT", "\"v=spf1 ip4:192.0.2.1 -all\"")
        .unwrap();
    dns.set_fault("flaky.cache.test", Some(Fault::ServFail));
    assert_eq!(
        result_for(&check, "flaky.cache.test", "m8").await,
        "temperror"
    );
    dns.set_fault("flaky.cache.test", None);
    assert_eq!(
        result_for(&check, "flaky.cache.test", "m9").await,
        "pass",
        "the next check asks again"
    );
}
