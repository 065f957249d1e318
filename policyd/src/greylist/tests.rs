//! The greylisting check end to end in-process: manual clock, memory and SQLite stores, every
//! branch of postgrey's decision.

use std::sync::Arc;
use std::time::Duration;

use postern_common::clock::ManualClock;

use super::*;

const T0: u64 = 1_700_000_000;

fn config() -> GreylistConfig {
    GreylistConfig {
        store: "memory:".into(),
        whitelist_clients: Vec::new(),
        whitelist_recipients: Vec::new(),
        hostname: "mx.test.example".into(),
        ..GreylistConfig::default()
    }
}

fn greylist(config: &GreylistConfig) -> (Greylist, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::at_unix(T0));
    let dir = std::env::temp_dir();
    (
        Greylist::with_clock(config, &dir, clock.clone()).unwrap(),
        clock,
    )
}

fn request(client: &str, sender: &str, recipient: &str, instance: &str) -> PolicyRequest {
    PolicyRequest::from_pairs([
        ("request", "smtpd_access_policy"),
        ("protocol_state", "RCPT"),
        ("client_address", client),
        ("client_name", "mail.sender.example"),
        ("sender", sender),
        ("recipient", recipient),
        ("instance", instance),
        ("etrn_domain", ""),
    ])
}

fn with(request: &PolicyRequest, name: &str, value: &str) -> PolicyRequest {
    let mut pairs: Vec<(&str, &str)> = request.attrs().filter(|(n, _)| *n != name).collect();
    pairs.push((name, value));
    PolicyRequest::from_pairs(pairs)
}

fn without(request: &PolicyRequest, name: &str) -> PolicyRequest {
    PolicyRequest::from_pairs(request.attrs().filter(|(n, _)| *n != name))
}

const DEFER: &str =
    "DEFER_IF_PERMIT 4.2.0 Greylisted, see http://postgrey.schweikert.ch/help/dest.example.html";

#[tokio::test]
async fn new_early_retry_pass_header_once_then_dunno() {
    let (grey, clock) = greylist(&config());
    let req = request(
        "192.0.2.25",
        "alice@sender.example",
        "bob@dest.example",
        "a1",
    );
    let v = grey.check(&req).await;
    assert_eq!(v.reply.action(), DEFER);
    assert_eq!(v.reason, "new");

    clock.advance(Duration::from_secs(120));
    let v = grey.check(&req).await;
    assert_eq!(v.reply.action(), DEFER);
    assert_eq!(v.reason, "early-retry (180s missing)");

    clock.advance(Duration::from_secs(193));
    let v = grey.check(&with(&req, "instance", "a2")).await;
    assert_eq!(
        v.reply.action(),
        "PREPEND X-Greylist: delayed 313 seconds by postgrey-1.37 at mx.test.example; Tue, 14 Nov 2023 22:18:33 UTC"
    );
    assert_eq!(v.reason, "triplet found, delay=313");
    // Second recipient of the same message, same sender and client: already passed.
    let v = grey
        .check(&with(
            &request(
                "192.0.2.25",
                "alice@sender.example",
                "carol@dest.example",
                "a2",
            ),
            "policy_test_time",
            &(T0 + 313).to_string(),
        ))
        .await;
    assert_eq!(v.reason, "new", "another recipient is another triplet");
    // Same triplet, same message again (Postfix asks again for a repeated RCPT): no header.
    let v = grey.check(&with(&req, "instance", "a2")).await;
    assert_eq!(v.reply, PolicyReply::dunno());
    // Next message: the triplet passed before, DUNNO without header.
    clock.advance(Duration::from_secs(3600));
    let v = grey.check(&with(&req, "instance", "a3")).await;
    assert_eq!(v.reply, PolicyReply::dunno());
    assert_eq!(v.reason, "triplet found");
}

#[tokio::test]
async fn header_once_per_instance_for_a_first_pass() {
    let (grey, clock) = greylist(&config());
    let req = request("192.0.2.25", "a@s.example", "b@dest.example", "m1");
    grey.check(&req).await;
    clock.advance(Duration::from_secs(400));
    // The retry of message m2 reaches the same triplet twice (e.g. a repeated RCPT): the
    // header only once. Triplet passed on the first, so the second is a plain DUNNO anyway;
    // the instance memory matters for a second request that still sees a first pass.
    let v = grey.check(&with(&req, "instance", "m2")).await;
    assert!(
        v.reply
            .action()
            .starts_with("PREPEND X-Greylist: delayed 400 seconds")
    );
    assert!(!grey.instances.lock().unwrap().is_new(Some("m2")));
}

#[tokio::test]
async fn without_etrn_domain_no_dsn_and_custom_action_text() {
    let cfg = GreylistConfig {
        greylist_action: "451".into(),
        greylist_text: "Try again in %s seconds (%r)".into(),
        ..config()
    };
    let (grey, _) = greylist(&cfg);
    let req = without(
        &request("192.0.2.25", "a@s.example", "b@dest.example", "x"),
        "etrn_domain",
    );
    assert_eq!(
        grey.check(&req).await.reply.action(),
        "451 Try again in 300 seconds (dest.example)"
    );
    let (grey, _) = greylist(&config());
    assert_eq!(
        grey.check(&req).await.reply.action(),
        "DEFER_IF_PERMIT Greylisted, see http://postgrey.schweikert.ch/help/dest.example.html"
    );
}

#[tokio::test]
async fn retry_window_expiry_restarts() {
    let (grey, clock) = greylist(&config());
    let req = request("192.0.2.25", "a@s.example", "b@dest.example", "x");
    grey.check(&req).await;
    clock.advance(Duration::from_secs(2 * 86_400 + 1));
    let v = grey.check(&req).await;
    assert_eq!(v.reason, "new");
    assert_eq!(v.reply.action(), DEFER);
}

#[tokio::test]
async fn policy_test_time_overrides_the_clock() {
    let (grey, _) = greylist(&config());
    let req = request("192.0.2.25", "a@s.example", "b@dest.example", "x");
    let at = |t: u64| with(&req, "policy_test_time", &t.to_string());
    assert_eq!(grey.check(&at(1000)).await.reason, "new");
    assert_eq!(
        grey.check(&at(1299)).await.reason,
        "early-retry (1s missing)"
    );
    assert_eq!(
        grey.check(&at(1300)).await.reason,
        "triplet found, delay=300"
    );
}

#[tokio::test]
async fn same_network_and_normalised_sender_share_a_triplet() {
    let (grey, clock) = greylist(&config());
    grey.check(&request(
        "192.0.2.25",
        "bounce-123@s.example",
        "b@dest.example",
        "1",
    ))
    .await;
    clock.advance(Duration::from_secs(301));
    // Another host of the /24, another VERP number, upper case: same triplet.
    let v = grey
        .check(&request(
            "192.0.2.200",
            "BOUNCE-456@S.example",
            "B@dest.example",
            "2",
        ))
        .await;
    assert_eq!(v.reason, "triplet found, delay=301");
    // Another /24: new.
    let v = grey
        .check(&request(
            "192.0.3.1",
            "bounce-1@s.example",
            "b@dest.example",
            "3",
        ))
        .await;
    assert_eq!(v.reason, "new");
    // IPv6: /64.
    grey.check(&request(
        "2001:db8::1",
        "a@s.example",
        "b@dest.example",
        "4",
    ))
    .await;
    clock.advance(Duration::from_secs(301));
    let v = grey
        .check(&request(
            "2001:db8::ffff:1",
            "a@s.example",
            "b@dest.example",
            "5",
        ))
        .await;
    assert_eq!(v.reason, "triplet found, delay=301");
}

#[tokio::test]
async fn lookup_by_host_and_privacy() {
    let cfg = GreylistConfig {
        lookup_by_host: true,
        privacy: true,
        ..config()
    };
    let (grey, clock) = greylist(&cfg);
    grey.check(&request("192.0.2.25", "a@s.example", "b@dest.example", "1"))
        .await;
    clock.advance(Duration::from_secs(301));
    let v = grey
        .check(&request("192.0.2.26", "a@s.example", "b@dest.example", "2"))
        .await;
    assert_eq!(
        v.reason, "new",
        "by host: another address is another triplet"
    );
    let store = grey.store().await.unwrap();
    let keys: Vec<String> = store
        .list("", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(keys.len(), 2);
    assert!(
        keys.iter().all(|k| k.len() == 40 && !k.contains('@')),
        "{keys:?}"
    );
    assert!(keys.contains(&logic::sha1_hex("192.0.2.25/32/a@s.example/b@dest.example")));
}

#[tokio::test]
async fn auto_whitelist_after_n_passes() {
    let cfg = GreylistConfig {
        auto_whitelist_clients: 2,
        ..config()
    };
    let (grey, clock) = greylist(&cfg);
    // Two triplets from one client pass, an hour apart: the client is whitelisted.
    for (n, rcpt) in ["r1@dest.example", "r2@dest.example"].iter().enumerate() {
        let req = request("192.0.2.25", "a@s.example", rcpt, &format!("i{n}"));
        assert_eq!(grey.check(&req).await.reason, "new");
        clock.advance(Duration::from_secs(3600));
        assert!(
            grey.check(&req)
                .await
                .reason
                .starts_with("triplet found, delay=")
        );
    }
    let v = grey
        .check(&request(
            "192.0.2.25",
            "new@s.example",
            "r3@dest.example",
            "i9",
        ))
        .await;
    assert_eq!(v.reason, "client AWL");
    assert_eq!(v.reply, PolicyReply::dunno());
    // The AWL is per address, not per network.
    let v = grey
        .check(&request(
            "192.0.2.26",
            "new@s.example",
            "r3@dest.example",
            "i9",
        ))
        .await;
    assert_eq!(v.reason, "new");
}

#[tokio::test]
async fn awl_counts_once_per_hour_and_zero_disables() {
    let cfg = GreylistConfig {
        auto_whitelist_clients: 2,
        ..config()
    };
    let (grey, clock) = greylist(&cfg);
    for rcpt in ["r1@dest.example", "r2@dest.example"] {
        grey.check(&request("192.0.2.25", "a@s.example", rcpt, "x"))
            .await;
    }
    clock.advance(Duration::from_secs(301));
    for rcpt in ["r1@dest.example", "r2@dest.example"] {
        grey.check(&request("192.0.2.25", "a@s.example", rcpt, "y"))
            .await;
    }
    // Both passed within the same hour: counted once, not whitelisted.
    let v = grey
        .check(&request(
            "192.0.2.25",
            "a@s.example",
            "r3@dest.example",
            "z",
        ))
        .await;
    assert_eq!(v.reason, "new");

    let cfg = GreylistConfig {
        auto_whitelist_clients: 0,
        ..config()
    };
    let (grey, _) = greylist(&cfg);
    let req = request("192.0.2.25", "a@s.example", "r@dest.example", "x");
    grey.check(&req).await;
    assert!(
        grey.store()
            .await
            .unwrap()
            .client("192.0.2.25")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn whitelists_trusted_authenticated_and_non_rcpt_skip() {
    let dir = tempfile::tempdir().unwrap();
    let clients = dir.path().join("clients");
    let recipients = dir.path().join("recipients");
    std::fs::write(
        &clients,
        "trusted.example\n198.51.100.0/24\n/^mx\\d+\\.re\\.example$/\n",
    )
    .unwrap();
    std::fs::write(&recipients, "postmaster@\nopen.example\n").unwrap();
    let cfg = GreylistConfig {
        whitelist_clients: vec![clients, dir.path().join("missing.local")],
        whitelist_recipients: vec![recipients],
        trusted_networks: vec!["203.0.113.0/24".parse().unwrap()],
        ..config()
    };
    let (grey, _) = greylist(&cfg);
    let base = request("192.0.2.25", "a@s.example", "b@dest.example", "x");
    let cases = [
        (
            with(&base, "client_name", "smtp.trusted.example"),
            "client whitelist",
        ),
        (
            with(&base, "client_name", "MX12.re.example"),
            "client whitelist",
        ),
        (
            with(&base, "client_address", "198.51.100.9"),
            "client whitelist",
        ),
        (
            with(&base, "recipient", "postmaster@dest.example"),
            "recipient whitelist",
        ),
        (
            with(&base, "recipient", "x@sub.open.example"),
            "recipient whitelist",
        ),
        (
            with(&base, "client_address", "203.0.113.5"),
            "trusted network",
        ),
        (
            with(&base, "sasl_username", "alice"),
            "authenticated client",
        ),
        (with(&base, "protocol_state", "DATA"), "not at RCPT (DATA)"),
        (without(&base, "sender"), "attribute missing: sender"),
        (
            with(&base, "client_address", "unknown"),
            "bad client_address \"unknown\"",
        ),
    ];
    for (req, reason) in cases {
        let v = grey.check(&req).await;
        assert_eq!(v.reason, reason);
        assert_eq!(v.reply, PolicyReply::dunno());
    }
    // An empty sasl_username is not authenticated, and a plain request is greylisted.
    assert_eq!(
        grey.check(&with(&base, "sasl_username", "")).await.reason,
        "new"
    );
}

#[tokio::test]
async fn store_failure_answers_the_fallback_quickly() {
    // A Redis URL where nothing listens: connecting fails; the answer is the fallback.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = GreylistConfig {
        store: format!("redis://127.0.0.1:{port}/"),
        fallback_action: "DEFER_IF_PERMIT 4.3.0 try later".into(),
        store_timeout: postern_common::config::ConfigDuration::from_millis(500),
        ..config()
    };
    let (grey, _) = greylist(&cfg);
    let started = std::time::Instant::now();
    let v = grey
        .check(&request("192.0.2.25", "a@s.example", "b@dest.example", "x"))
        .await;
    assert_eq!(v.reply.action(), "DEFER_IF_PERMIT 4.3.0 try later");
    assert!(v.reason.starts_with("store failure"), "{}", v.reason);
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn sqlite_store_behaves_like_memory() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = GreylistConfig {
        store: "sqlite:".into(),
        ..config()
    };
    let clock = Arc::new(ManualClock::at_unix(T0));
    let grey = Greylist::with_clock(&cfg, dir.path(), clock.clone()).unwrap();
    let req = request("192.0.2.25", "a@s.example", "b@dest.example", "x");
    assert_eq!(grey.check(&req).await.reason, "new");
    clock.advance(Duration::from_secs(60));
    assert_eq!(grey.check(&req).await.reason, "early-retry (240s missing)");
    clock.advance(Duration::from_secs(240));
    assert_eq!(grey.check(&req).await.reason, "triplet found, delay=300");
    assert!(dir.path().join("greylist.sqlite").exists());
}

#[tokio::test]
async fn background_expiry_deletes_old_entries() {
    let cfg = GreylistConfig {
        expiry_interval: postern_common::config::ConfigDuration::from_millis(50),
        expiry_batch: 2,
        max_age: postern_common::config::ConfigDuration::from_secs(86_400),
        ..config()
    };
    let (grey, clock) = greylist(&cfg);
    for n in 0..5 {
        grey.check(&request(
            "192.0.2.25",
            "a@s.example",
            &format!("r{n}@dest.example"),
            "x",
        ))
        .await;
    }
    let store = grey.store().await.unwrap().clone();
    assert_eq!(store.stats(300).await.unwrap().triplets, 5);
    clock.advance(Duration::from_secs(86_401));
    let mut left = 5;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = store.stats(300).await.unwrap().triplets;
        if left == 0 {
            break;
        }
    }
    assert_eq!(left, 0);
}

#[test]
fn debian_whitelists_load_and_match_like_postgrey() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let clients = whitelist::ClientWhitelist::load(&[fixtures.join("whitelist_clients")]).unwrap();
    let recipients =
        whitelist::RecipientWhitelist::load(&[fixtures.join("whitelist_recipients")]).unwrap();
    assert_eq!(clients.len(), 164, "every entry of the file is used");
    assert_eq!(recipients.len(), 2);
    // Domain suffixes, regexes (\d, (?:...), lazy .*?) and literal hosts from Debian's file.
    for name in [
        "debian.org",
        "master.debian.org",
        "vger.kernel.org",
        "ms-smtp-01.rr.com",
        "smtp12.orange.fr",
        "smtp3-g21.free.fr",
        "postfix12-g3.free.fr",
        "foo.server.arvato-systems.de",
        "m15-112.126.com",
    ] {
        assert!(clients.matches_name(name), "{name}");
    }
    for name in [
        "notdebian.org",
        "smtp.orange.fr",
        "mail.example.com",
        "debian.org.evil",
    ] {
        assert!(!clients.matches_name(name), "{name}");
    }
    assert!(recipients.matches("postmaster@example.com"));
    assert!(recipients.matches("abuse+x@example.com"));
    assert!(!recipients.matches("webmaster@example.com"));
}
