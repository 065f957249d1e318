//! The milter on 127.0.0.1:0, driven over the milter protocol by the harness's MTA client, with
//! the test DNS server publishing the keys: signing (RSA + Ed25519 side by side), verification
//! and its Authentication-Results header, forged header removal, On-* actions, size limit, key
//! rollover on reload, and bad protocol input.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use postern_common::daemon::Daemon;
use postern_common::listen::Listener;
use postern_milter::config::MilterConfig;
use postern_milter::dkim::keys::{KeygenAlgorithm, generate};
use postern_milter::dkim::{Action, DkimConfig};
use postern_milter::server::{self, Milter};
use postern_tests::clients::Target;
use postern_tests::clients::milter::{MilterClient, MilterMessage, Modification, Verdict};
use postern_tests::dns::{Fault, TestDns, Zone};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const AUTHSERV: &str = "mx.test";

struct Harness {
    target: Target,
    dns: TestDns,
    dir: tempfile::TempDir,
    config: MilterConfig,
    live: watch::Sender<Arc<Milter>>,
    shutdown: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Writes a key, publishes it, and returns its path.
fn make_key(dir: &Path, zone: &mut Zone, selector: &str, algorithm: KeygenAlgorithm) -> String {
    let generated = generate(algorithm, "example.com", selector).unwrap();
    let path = dir.join(format!("{selector}.private"));
    std::fs::write(&path, generated.private_pem).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    zone.add(
        &format!("{selector}._domainkey.example.com"),
        "TXT",
        &generated.record,
    )
    .unwrap();
    // "name record" lines, opendkim's TestPublicKeys format, for the interop test.
    let mut records = std::fs::read_to_string(dir.join("records")).unwrap_or_default();
    records.push_str(&format!(
        "{selector}._domainkey.example.com {}\n",
        generated.record
    ));
    std::fs::write(dir.join("records"), records).unwrap();
    path.display().to_string()
}

async fn start(adjust: impl FnOnce(&mut DkimConfig)) -> Harness {
    start_with(adjust, 7210).await
}

async fn start_with(adjust: impl FnOnce(&mut DkimConfig), connection_timeout: u64) -> Harness {
    start_full(adjust, connection_timeout, false).await
}

async fn start_full(
    adjust: impl FnOnce(&mut DkimConfig),
    connection_timeout: u64,
    dmarc: bool,
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut zone = Zone::new();
    let rsa = make_key(dir.path(), &mut zone, "rsa", KeygenAlgorithm::Rsa2048);
    let ed = make_key(dir.path(), &mut zone, "ed", KeygenAlgorithm::Ed25519);
    std::fs::write(
        dir.path().join("KeyTable"),
        format!("rsa example.com:rsa:{rsa}\ned example.com:ed:{ed}\n"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("SigningTable"),
        "*@example.com rsa\n*@example.com ed\n",
    )
    .unwrap();
    zone.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
        .unwrap();
    let dns = TestDns::start(zone).await.unwrap();
    let mut config = MilterConfig {
        state_dir: dir.path().to_path_buf(),
        authserv_id: AUTHSERV.to_owned(),
        ..MilterConfig::default()
    };
    config.dns.nameservers = vec![dns.addr()];
    config.dns.timeout = postern_common::config::ConfigDuration::from_secs(1);
    config.dns.attempts = 1;
    // DMARC has its own tests; these look at DKIM alone.
    config.dmarc.enabled = dmarc;
    config.dkim.key_table = format!("refile:{}", dir.path().join("KeyTable").display());
    config.dkim.signing_table = format!("refile:{}", dir.path().join("SigningTable").display());
    adjust(&mut config.dkim);
    config.connection_timeout =
        postern_common::config::ConfigDuration::from_secs(connection_timeout);
    let milter = Milter::build(Arc::new(config.clone())).unwrap();
    let (live, receiver) = watch::channel(Arc::new(milter));
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let listener = Listener::from_std_tcp(std_listener).unwrap();
    let shutdown = CancellationToken::new();
    let server_config = config.clone();
    let token = shutdown.clone();
    tokio::spawn(
        async move { server::serve(listener, &server_config, receiver, None, token).await },
    );
    Harness {
        target: Target::Tcp(addr.to_string()),
        dns,
        dir,
        config,
        live,
        shutdown,
    }
}

/// A message as Postfix sends it with LEADING_SPACE negotiated (values keep their space).
fn message(headers: &[(&str, &str)], body: &str) -> MilterMessage {
    MilterMessage {
        mail_from: "alice@example.com".to_owned(),
        rcpt_to: vec!["bob@dest.test".to_owned()],
        mail_macros: Vec::new(),
        queue_id: "4QTEST".to_owned(),
        headers: headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), format!(" {v}")))
            .collect(),
        body: body.replace('\n', "\r\n").into_bytes(),
    }
}

fn plain() -> MilterMessage {
    message(
        &[
            ("From", "Alice <alice@example.com>"),
            ("To", "Bob <bob@dest.test>"),
            ("Subject", "dual\n\tsigned"),
            ("Date", "Wed, 25 Nov 2026 08:00:00 +0000"),
            ("Message-ID", "<1@example.com>"),
        ],
        "Hello Bob,\n\nthis  line has  double spaces.\n\n\n",
    )
}

async fn send(
    target: &Target,
    ip: &str,
    message: &MilterMessage,
) -> postern_tests::clients::milter::MessageOutcome {
    let mut client = MilterClient::connect(target).await.unwrap();
    let ip: IpAddr = ip.parse().unwrap();
    // No reply when the milter negotiated SMFIP_NR_CONN (it never acts at connect).
    assert!(matches!(
        client
            .connect_stage("client.test", ip, 40000, "mx.test")
            .await
            .unwrap(),
        Verdict::Continue | Verdict::NotAsked
    ));
    client.helo("client.test").await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(20), client.message(message))
        .await
        .expect("answer within 20 s")
        .unwrap();
    client.quit().await.unwrap();
    outcome
}

fn pick(signatures: &[String], selector: &str) -> String {
    signatures
        .iter()
        .find(|s| s.contains(&format!("s={selector};")))
        .cloned()
        .unwrap_or_else(|| panic!("no s={selector} in {signatures:?}"))
}

fn inserted(outcome: &postern_tests::clients::milter::MessageOutcome, name: &str) -> Vec<String> {
    outcome
        .modifications
        .iter()
        .filter_map(|m| match m {
            Modification::InsertHeader(_, n, v) if n == name => Some(v.clone()),
            _ => None,
        })
        .collect()
}

/// The message as delivered: the inserted headers (values carry their space) on top.
fn with_headers(original: &MilterMessage, added: &[(&str, String)]) -> MilterMessage {
    let mut out = original.clone();
    let mut headers: Vec<(String, String)> = added
        .iter()
        .map(|(n, v)| ((*n).to_owned(), v.clone()))
        .collect();
    headers.extend(out.headers);
    out.headers = headers;
    out
}

#[tokio::test]
async fn internal_mail_gets_rsa_and_ed25519_signatures_that_verify() {
    let harness = start(|_| {}).await;
    let outcome = send(&harness.target, "127.0.0.1", &plain()).await;
    assert_eq!(outcome.verdict, Some(Verdict::Continue));
    let signatures = inserted(&outcome, "DKIM-Signature");
    assert_eq!(signatures.len(), 2, "{outcome:?}");
    // Inserted so that the first SigningTable key ends on top: sent last.
    assert!(
        signatures[1].starts_with(" v=1; a=rsa-sha256; s=rsa; d=example.com; c=relaxed/simple;"),
        "{}",
        signatures[1]
    );
    assert!(
        signatures[0].starts_with(" v=1; a=ed25519-sha256; s=ed; d=example.com;"),
        "{}",
        signatures[0]
    );
    for signature in &signatures {
        assert!(signature.contains("c=relaxed/simple"), "{signature}");
        assert!(
            signature.contains("\n\t"),
            "folded with LF for the MTA: {signature:?}"
        );
        assert!(!signature.contains('\r'));
        // From is oversigned (h= lists it twice).
        let h = signature
            .split("h=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap();
        assert_eq!(h.to_ascii_lowercase().matches("from").count(), 2, "{h}");
    }
    // No Authentication-Results on the signing path.
    assert!(inserted(&outcome, "Authentication-Results").is_empty());

    // The same message arriving from outside verifies (as on disk: RSA on top).
    let signed = with_headers(
        &plain(),
        &[
            ("DKIM-Signature", signatures[1].clone()),
            ("DKIM-Signature", signatures[0].clone()),
        ],
    );
    let outcome = send(&harness.target, "192.0.2.7", &signed).await;
    assert_eq!(outcome.verdict, Some(Verdict::Continue));
    let ar = inserted(&outcome, "Authentication-Results");
    assert_eq!(ar.len(), 1, "{outcome:?}");
    let ar = &ar[0];
    assert!(ar.starts_with(" mx.test;\n\tdkim=pass (2048-bit key) header.d=example.com header.i=@example.com header.a=rsa-sha256 header.s=rsa header.b="), "{ar}");
    assert!(ar.contains(";\n\tdkim=pass (256-bit key) header.d=example.com header.i=@example.com header.a=ed25519-sha256 header.s=ed header.b="), "{ar}");
    assert!(
        inserted(&outcome, "DKIM-Signature").is_empty(),
        "outside mail is not signed"
    );

    // A changed body: both signatures fail (mail-auth says neutral: body hash), mail passes.
    let mut tampered = signed.clone();
    tampered.body.extend_from_slice(b"P.S. added by a list\r\n");
    let outcome = send(&harness.target, "192.0.2.7", &tampered).await;
    let ar = inserted(&outcome, "Authentication-Results").join("");
    assert_eq!(
        ar.matches("dkim=neutral reason=\"body hash did not verify\"")
            .count(),
        2,
        "{ar}"
    );
    assert_eq!(outcome.verdict, Some(Verdict::Continue));
}

#[tokio::test]
async fn authenticated_clients_and_listed_daemons_are_signed_others_verified() {
    let harness = start(|dkim| {
        dkim.mta = vec!["ORIGINATING".into()];
        dkim.canonicalization = "simple/relaxed".into();
        dkim.multiple_signatures = false;
    })
    .await;
    let mut authed = plain();
    authed.mail_macros = vec![
        ("{auth_type}".into(), "PLAIN".into()),
        ("{auth_authen}".into(), "alice".into()),
    ];
    let outcome = send(&harness.target, "198.51.100.9", &authed).await;
    let signatures = inserted(&outcome, "DKIM-Signature");
    assert_eq!(
        signatures.len(),
        1,
        "first SigningTable match only: {outcome:?}"
    );
    assert!(
        signatures[0].contains("c=simple/relaxed"),
        "{}",
        signatures[0]
    );
    // Simple header canonicalization verifies because header bytes were kept exactly.
    let signed = with_headers(&plain(), &[("DKIM-Signature", signatures[0].clone())]);
    let outcome = send(&harness.target, "192.0.2.7", &signed).await;
    let ar = inserted(&outcome, "Authentication-Results").join("");
    assert!(ar.contains("dkim=pass (2048-bit key)"), "{ar}");

    // Outside, unauthenticated, From one of our domains: verified, not signed.
    let outcome = send(&harness.target, "192.0.2.7", &plain()).await;
    assert!(inserted(&outcome, "DKIM-Signature").is_empty());
    assert_eq!(
        inserted(&outcome, "Authentication-Results"),
        [" mx.test;\n\tdkim=none"]
    );
    // Internal client, foreign From domain: nothing to sign with, so verified.
    let mut foreign = plain();
    foreign.headers[0].1 = " Carol <carol@elsewhere.test>".into();
    let outcome = send(&harness.target, "127.0.0.1", &foreign).await;
    assert!(inserted(&outcome, "DKIM-Signature").is_empty());
    assert_eq!(inserted(&outcome, "Authentication-Results").len(), 1);
}

#[tokio::test]
async fn forged_authentication_results_are_removed() {
    let harness = start(|_| {}).await;
    let forged = message(
        &[
            (
                "Authentication-Results",
                "relay.other.test; dkim=pass header.d=example.com",
            ),
            (
                "Authentication-Results",
                "MX.test; dkim=pass header.d=bank.test",
            ),
            ("From", "Mallory <m@bank.test>"),
            ("Subject", "trust me"),
        ],
        "pay now\n",
    );
    let outcome = send(&harness.target, "192.0.2.66", &forged).await;
    let removed: Vec<&Modification> = outcome
        .modifications
        .iter()
        .filter(|m| matches!(m, Modification::ChangeHeader(..)))
        .collect();
    assert_eq!(
        removed,
        [&Modification::ChangeHeader(
            2,
            "Authentication-Results".into(),
            String::new()
        )],
        "{outcome:?}"
    );
    assert_eq!(
        inserted(&outcome, "Authentication-Results"),
        [" mx.test;\n\tdkim=none"]
    );
}

#[tokio::test]
async fn on_actions_and_dns_errors() {
    let harness = start(|dkim| {
        dkim.on_no_signature = Action::Reject;
        dkim.on_bad_signature = Action::Quarantine;
    })
    .await;
    let outcome = send(&harness.target, "192.0.2.7", &plain()).await;
    match &outcome.verdict {
        Some(Verdict::ReplyCode(text)) => assert!(text.starts_with("550 5.7.1"), "{text}"),
        other => panic!("expected a 550 reply, got {other:?}"),
    }

    // Sign internally, then break the key record: SERVFAIL gives temperror and On-DNSError's
    // tempfail; a body change gives quarantine.
    let signatures = inserted(
        &send(&harness.target, "::1", &plain()).await,
        "DKIM-Signature",
    );
    assert_eq!(signatures.len(), 2);
    let signed = with_headers(&plain(), &[("DKIM-Signature", pick(&signatures, "ed"))]);
    let mut tampered = signed.clone();
    tampered.body = b"other body\r\n".to_vec();
    let outcome = send(&harness.target, "192.0.2.7", &tampered).await;
    assert!(
        outcome
            .modifications
            .iter()
            .any(|m| matches!(m, Modification::Quarantine(_))),
        "{outcome:?}"
    );
    harness
        .dns
        .set_fault("ed._domainkey.example.com", Some(Fault::ServFail));
    let outcome = send(&harness.target, "192.0.2.7", &signed).await;
    let ar = inserted(&outcome, "Authentication-Results").join("");
    assert!(ar.contains("dkim=temperror"), "{ar}");
    match &outcome.verdict {
        Some(Verdict::ReplyCode(text)) => assert!(text.starts_with("451 4.7.1"), "{text}"),
        other => panic!("expected a 451 reply, got {other:?}"),
    }
}

#[tokio::test]
async fn key_not_found_and_too_many_signatures() {
    let harness = start(|dkim| {
        dkim.max_signatures = 1;
        dkim.on_key_not_found = Action::Tempfail;
    })
    .await;
    let signatures = inserted(
        &send(&harness.target, "127.0.0.1", &plain()).await,
        "DKIM-Signature",
    );
    // Only the first of two signatures is evaluated.
    let signed = with_headers(
        &plain(),
        &[
            ("DKIM-Signature", pick(&signatures, "rsa")),
            ("DKIM-Signature", pick(&signatures, "ed")),
        ],
    );
    let outcome = send(&harness.target, "192.0.2.7", &signed).await;
    let ar = inserted(&outcome, "Authentication-Results").join("");
    assert_eq!(ar.matches("dkim=").count(), 1, "{ar}");
    assert!(
        ar.contains("dkim=pass (2048-bit key)"),
        "the first one only: {ar}"
    );
    // The key disappears from DNS.
    harness.dns.remove("rsa._domainkey.example.com");
    let only_rsa = with_headers(
        &plain(),
        &[(
            "DKIM-Signature",
            pick(&signatures, "rsa").replace("s=rsa;", "s=gone;"),
        )],
    );
    let outcome = send(&harness.target, "192.0.2.7", &only_rsa).await;
    let ar = inserted(&outcome, "Authentication-Results").join("");
    assert!(
        ar.contains("dkim=permerror reason=\"key not found\""),
        "{ar}"
    );
    assert!(
        matches!(&outcome.verdict, Some(Verdict::ReplyCode(t)) if t.starts_with("451")),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn oversize_messages_pass_untouched() {
    let harness = start(|dkim| dkim.max_message_size = 1024).await;
    let mut big = plain();
    big.body = vec![b'x'; 4000];
    big.body.extend_from_slice(b"\r\n");
    let outcome = send(&harness.target, "127.0.0.1", &big).await;
    assert!(outcome.modifications.is_empty(), "{outcome:?}");
    assert_eq!(outcome.verdict, Some(Verdict::Continue));
}

#[tokio::test]
async fn reload_switches_keys_without_dropping_connections() {
    let harness = start(|_| {}).await;
    let mut client = MilterClient::connect(&harness.target).await.unwrap();
    client
        .connect_stage("localhost", "127.0.0.1".parse().unwrap(), 1, "mx.test")
        .await
        .unwrap();
    let first = client.message(&plain()).await.unwrap();
    assert!(
        inserted(&first, "DKIM-Signature")
            .iter()
            .any(|s| s.contains("s=rsa;"))
    );
    // Key rollover: a new selector in the KeyTable; the server sees it on the next message.
    let generated = generate(KeygenAlgorithm::Ed25519, "example.com", "ed2027").unwrap();
    let path = harness.dir.path().join("ed2027.private");
    std::fs::write(&path, generated.private_pem).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(
        harness.dir.path().join("KeyTable"),
        format!("new example.com:ed2027:{}\n", path.display()),
    )
    .unwrap();
    std::fs::write(
        harness.dir.path().join("SigningTable"),
        "*@example.com new\n",
    )
    .unwrap();
    let rebuilt = Milter::build(Arc::new(harness.config.clone())).unwrap();
    harness.live.send(Arc::new(rebuilt)).unwrap();
    let second = client.message(&plain()).await.unwrap();
    let signatures = inserted(&second, "DKIM-Signature");
    assert_eq!(signatures.len(), 1, "{second:?}");
    assert!(signatures[0].contains("s=ed2027;"), "{}", signatures[0]);
    client.quit().await.unwrap();
    // A bad new config (unsafe key) fails to build; the caller keeps the old state.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Milter::build(Arc::new(harness.config.clone()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("ed2027.private"), "{err}");
}

#[tokio::test]
async fn garbage_and_oversize_packets_close_only_that_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let harness = start(|_| {}).await;
    let Target::Tcp(addr) = &harness.target else {
        unreachable!()
    };
    for bad in [
        &b"\xff\xff\xff\xffO"[..],      // 4 GiB packet
        &b"\x00\x00\x00\x00X"[..],      // zero length
        &b"\x00\x00\x00\x05Zjunk"[..],  // unknown command
        &b"GET / HTTP/1.0\r\n\r\n"[..], // not milter at all
    ] {
        let mut stream = tokio::net::TcpStream::connect(addr.as_str()).await.unwrap();
        stream.write_all(bad).await.unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("the server closes or answers within 10 s");
        // Closed (Ok(0)) or reset; never a hang.
        if let Ok(n) = read {
            assert!(n == 0 || n < 64, "unexpected {n} bytes");
        }
    }
    // Still serving.
    let outcome = send(&harness.target, "127.0.0.1", &plain()).await;
    assert_eq!(inserted(&outcome, "DKIM-Signature").len(), 2);
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_connection_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let harness = start_with(|_| {}, 1).await;
    let Target::Tcp(addr) = &harness.target else {
        unreachable!()
    };
    let mut stream = tokio::net::TcpStream::connect(addr.as_str()).await.unwrap();
    // Half a packet, then silence.
    stream.write_all(b"\x00\x00\x00\x0dO").await.unwrap();
    let mut buf = [0u8; 16];
    let started = std::time::Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(15), stream.read(&mut buf))
        .await
        .expect("closed within 15 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmarc_runs_after_dkim_with_its_own_header() {
    let harness = start_full(|_| {}, 7210, true).await;
    let signatures = inserted(
        &send(&harness.target, "127.0.0.1", &plain()).await,
        "DKIM-Signature",
    );
    let signed = with_headers(&plain(), &[("DKIM-Signature", pick(&signatures, "rsa"))]);
    let outcome = send(&harness.target, "192.0.2.7", &signed).await;
    let results: Vec<(u32, String)> = outcome
        .modifications
        .iter()
        .filter_map(|m| match m {
            Modification::InsertHeader(i, n, v) if n == "Authentication-Results" => {
                Some((*i, v.clone()))
            }
            _ => None,
        })
        .collect();
    assert!(results.len() >= 2, "{outcome:?}");
    assert_eq!(results[0].0, 0);
    assert!(results[0].1.contains("dkim=pass"), "{results:?}");
    assert_eq!(results[1].0, 1, "DMARC's header goes after ours");
    assert!(results[1].1.contains("dmarc=pass"), "{results:?}");
    assert_eq!(outcome.verdict, Some(Verdict::Continue));
    // Unsigned mail in the name of a p=reject domain from an outside client: dmarc=fail, and
    // (opendmarc's RejectFailures is off by default) delivered with the verdict in the header.
    let outcome = send(&harness.target, "192.0.2.7", &plain()).await;
    let all = inserted(&outcome, "Authentication-Results").join("|");
    assert!(
        all.contains("dkim=none") && all.contains("dmarc=fail (p=reject"),
        "{all}"
    );
}

/// A raw message as Postfix hands it over with LEADING_SPACE: values keep their leading space,
/// folded lines joined with "\n".
fn from_raw(raw: &str) -> MilterMessage {
    let (head, body) = raw.split_once("\n\n").unwrap();
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in head.lines() {
        if line.starts_with([' ', '\t']) {
            let last = headers.last_mut().unwrap();
            last.1.push('\n');
            last.1.push_str(line);
        } else {
            let (name, value) = line.split_once(':').unwrap();
            headers.push((name.to_owned(), value.to_owned()));
        }
    }
    MilterMessage {
        mail_from: "joe@football.example.com".to_owned(),
        rcpt_to: vec!["suzie@shopping.example.net".to_owned()],
        mail_macros: Vec::new(),
        queue_id: "4QRFC".to_owned(),
        headers,
        body: body.replace('\n', "\r\n").into_bytes(),
    }
}

#[tokio::test]
async fn rfc_example_messages_verify() {
    let harness = start(|_| {}).await;
    for (file, expected) in [
        (include_str!("data/rfc8463-example.txt"), 2),
        (include_str!("data/rfc6376-example.txt"), 1),
    ] {
        let (records, message) = file.split_once("\n\n").unwrap();
        for line in records.lines() {
            let (name, value) = line.split_once(' ').unwrap();
            harness.dns.add(name, "TXT", value).unwrap();
        }
        let outcome = send(&harness.target, "192.0.2.7", &from_raw(message)).await;
        let ar = inserted(&outcome, "Authentication-Results").join("");
        assert_eq!(ar.matches("dkim=pass").count(), expected, "{ar}");
        assert!(!ar.contains("dkim=fail") && !ar.contains("neutral"), "{ar}");
    }
}

#[tokio::test]
async fn dns_check_compares_published_and_private_keys() {
    let harness = start(|_| {}).await;
    let milter = harness.live.borrow().clone();
    let mut out = Vec::new();
    let bad = postern_milter::dkim::dns_check(&milter.auth, &milter.dkim, &mut out)
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(bad, 0, "{text}");
    assert!(
        text.contains("ok    rsa._domainkey.example.com: rsa 2048-bit key matches"),
        "{text}"
    );
    assert!(
        text.contains("ok    ed._domainkey.example.com: ed25519 256-bit key matches"),
        "{text}"
    );
    // Publish a different key for one selector, remove the other.
    let other = generate(KeygenAlgorithm::Rsa2048, "example.com", "rsa").unwrap();
    harness.dns.remove("rsa._domainkey.example.com");
    harness
        .dns
        .add("rsa._domainkey.example.com", "TXT", &other.record)
        .unwrap();
    harness.dns.remove("ed._domainkey.example.com");
    // A fresh resolver (no cached answers), as the dns-check command has.
    let fresh = Milter::build(Arc::new(harness.config.clone())).unwrap();
    let mut out = Vec::new();
    let bad = postern_milter::dkim::dns_check(&fresh.auth, &fresh.dkim, &mut out)
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(bad, 2, "{text}");
    assert!(
        text.contains("FAIL  rsa._domainkey.example.com: published public key does not match"),
        "{text}"
    );
    assert!(
        text.contains("FAIL  ed._domainkey.example.com: lookup failed"),
        "{text}"
    );
}

/// Debian's opendkim as a milter on loopback, keys from a TestPublicKeys file.
struct Opendkim {
    child: std::process::Child,
    target: Target,
}

impl Drop for Opendkim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_opendkim(dir: &Path) -> Option<Opendkim> {
    if !Path::new("/usr/sbin/opendkim").exists() {
        eprintln!("SKIPPED: /usr/sbin/opendkim is not installed (Debian package opendkim)");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let key = generate(KeygenAlgorithm::Rsa2048, "example.com", "odk").unwrap();
    let key_path = dir.join("odk.private");
    std::fs::write(&key_path, key.private_pem).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut records = std::fs::read_to_string(dir.join("records")).unwrap();
    records.push_str(&format!("odk._domainkey.example.com {}\n", key.record));
    std::fs::write(dir.join("records"), records).unwrap();
    std::fs::write(
        dir.join("odk.KeyTable"),
        format!("odk example.com:odk:{}\n", key_path.display()),
    )
    .unwrap();
    std::fs::write(dir.join("odk.SigningTable"), "*@example.com odk\n").unwrap();
    // RequireSafeKeys off: opendkim also judges the key's directories, and /tmp is
    // world-writable.
    let conf = dir.join("opendkim.conf");
    std::fs::write(
        &conf,
        format!(
            "Mode sv\nSocket inet:{port}@127.0.0.1\nKeyTable file:{d}/odk.KeyTable\nSigningTable refile:{d}/odk.SigningTable\nInternalHosts 127.0.0.1\nTestPublicKeys {d}/records\nCanonicalization relaxed/simple\nSyslog no\nAuthservID odk.test\nUserID root\nRequireSafeKeys no\nPidFile {d}/opendkim.pid\n",
            d = dir.display()
        ),
    )
    .unwrap();
    // Owned by the guard at once, so that it is killed and reaped on every path.
    let opendkim = Opendkim {
        child: std::process::Command::new("/usr/sbin/opendkim")
            .arg("-f")
            .arg("-x")
            .arg(&conf)
            .spawn()
            .unwrap(),
        target: Target::Tcp(format!("127.0.0.1:{port}")),
    };
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Some(opendkim);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("opendkim did not start listening on {port}");
}

/// The message for a filter that did not negotiate LEADING_SPACE (values without it).
fn without_leading_space(message: &MilterMessage) -> MilterMessage {
    let mut out = message.clone();
    for (_, value) in &mut out.headers {
        if let Some(rest) = value.strip_prefix(' ') {
            *value = rest.to_owned();
        }
    }
    out
}

#[tokio::test]
async fn signatures_interoperate_with_opendkim() {
    let harness = start(|_| {}).await;
    let Some(opendkim) = start_opendkim(harness.dir.path()).await else {
        return;
    };
    // Ours (RSA and Ed25519) verify in opendkim.
    let ours = inserted(
        &send(&harness.target, "127.0.0.1", &plain()).await,
        "DKIM-Signature",
    );
    let signed = with_headers(
        &plain(),
        &[
            ("DKIM-Signature", ours[1].clone()),
            ("DKIM-Signature", ours[0].clone()),
        ],
    );
    let outcome = send(
        &opendkim.target,
        "192.0.2.7",
        &without_leading_space(&signed),
    )
    .await;
    let ar = inserted(&outcome, "Authentication-Results").join("|");
    assert_eq!(ar.matches("dkim=pass").count(), 2, "opendkim says: {ar}");
    assert!(
        ar.contains("header.s=rsa") && ar.contains("header.s=ed"),
        "{ar}"
    );
    // opendkim's signature verifies in ours.
    let outcome = send(
        &opendkim.target,
        "127.0.0.1",
        &without_leading_space(&plain()),
    )
    .await;
    let theirs = inserted(&outcome, "DKIM-Signature");
    assert_eq!(theirs.len(), 1, "opendkim signed: {outcome:?}");
    let value = if theirs[0].starts_with(' ') {
        theirs[0].clone()
    } else {
        format!(" {}", theirs[0])
    };
    let signed = with_headers(&plain(), &[("DKIM-Signature", value)]);
    harness
        .dns
        .add(
            "odk._domainkey.example.com",
            "TXT",
            std::fs::read_to_string(harness.dir.path().join("records"))
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("odk._domainkey.example.com "))
                .unwrap(),
        )
        .unwrap();
    let outcome = send(&harness.target, "192.0.2.7", &signed).await;
    let ar = inserted(&outcome, "Authentication-Results").join("");
    assert!(ar.contains("dkim=pass (2048-bit key) header.d=example.com header.i=@example.com header.a=rsa-sha256 header.s=odk"), "{ar}");
}

/// Not a check: writes benchmark fixtures into $POSTERN_BENCH_DIR (keys, a zone file for
/// test-dns, milter configs, messages signed with each key). Run by hand with
/// `cargo test -p postern-milter --test dkim bench_fixtures -- --ignored`.
#[tokio::test]
#[ignore = "writes benchmark fixtures; run by hand"]
async fn bench_fixtures() {
    let out =
        std::path::PathBuf::from(std::env::var("POSTERN_BENCH_DIR").expect("POSTERN_BENCH_DIR"));
    std::fs::create_dir_all(&out).unwrap();
    let harness = start(|_| {}).await;
    for name in ["rsa.private", "ed.private"] {
        std::fs::copy(harness.dir.path().join(name), out.join(name)).unwrap();
        std::fs::set_permissions(out.join(name), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let records = std::fs::read_to_string(harness.dir.path().join("records")).unwrap();
    let zone: String = records
        .lines()
        .map(|l| {
            let (name, record) = l.split_once(' ').unwrap();
            format!("{name} TXT {record}\n")
        })
        .collect();
    std::fs::write(out.join("zone"), zone).unwrap();
    let raw = postern_tests::clients::milter::sample_message("example.com");
    let message = MilterMessage::parse(&raw, "alice@example.com", &["bob@dest.example"]);
    let mut with_space = message.clone();
    for (_, v) in &mut with_space.headers {
        *v = format!(" {v}");
    }
    let signatures = inserted(
        &send(&harness.target, "127.0.0.1", &with_space).await,
        "DKIM-Signature",
    );
    for selector in ["rsa", "ed"] {
        let signature = pick(&signatures, selector).replace('\n', "\r\n");
        let mut signed = format!("DKIM-Signature:{signature}\r\n").into_bytes();
        signed.extend_from_slice(&raw);
        std::fs::write(out.join(format!("signed-{selector}.eml")), signed).unwrap();
    }
    for (name, keys) in [
        ("sign-rsa", "rsa"),
        ("sign-ed", "ed"),
        ("sign-both", "rsa,ed"),
    ] {
        let mut toml = format!(
            "listen = \"inet:127.0.0.1:PORT\"\nauthserv_id = \"mx.test\"\nstate_dir = \"{d}/state\"\n[dkim]\n",
            d = out.display()
        );
        for key in keys.split(',') {
            toml.push_str(&format!(
                "[[dkim.keys]]\ndomain = \"example.com\"\nselector = \"{key}\"\nkey_file = \"{}/{key}.private\"\n",
                out.display()
            ));
        }
        toml.push_str("[dns]\nnameservers = [\"127.0.0.1:DNSPORT\"]\n[dmarc]\nenabled = false\n");
        std::fs::write(out.join(format!("{name}.toml")), toml).unwrap();
    }
}

/// The message bytes as the MTA holds them (values with their leading space).
fn to_bytes(message: &MilterMessage) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in &message.headers {
        out.extend_from_slice(name.as_bytes());
        out.push(b':');
        out.extend_from_slice(value.replace('\n', "\r\n").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&message.body);
    out
}

fn dkimpy_available() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import dkim, nacl"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "SKIPPED: python3 with dkimpy and pynacl (pip install dkimpy pynacl) is not available"
        );
    }
    ok
}

fn dkimpy(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/dkimpy.py");
    let output = std::process::Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "dkimpy: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn signatures_interoperate_with_dkimpy() {
    if !dkimpy_available() {
        return;
    }
    for canon in ["relaxed/relaxed", "simple/simple"] {
        let harness = start(|dkim| dkim.canonicalization = canon.to_owned()).await;
        let dir = harness.dir.path();
        let ours = inserted(
            &send(&harness.target, "127.0.0.1", &plain()).await,
            "DKIM-Signature",
        );
        assert_eq!(ours.len(), 2);
        let signed = with_headers(
            &plain(),
            &[
                ("DKIM-Signature", ours[1].clone()),
                ("DKIM-Signature", ours[0].clone()),
            ],
        );
        let path = dir.join("signed.eml");
        std::fs::write(&path, to_bytes(&signed)).unwrap();
        let verdicts = dkimpy(&[
            "verify",
            &dir.join("records").display().to_string(),
            &path.display().to_string(),
        ]);
        assert_eq!(
            verdicts, "pass\npass\n",
            "dkimpy on our {canon} RSA and Ed25519 signatures"
        );

        // dkimpy signs (RSA, with our PKCS#8 key file), we verify.
        let plain_path = dir.join("plain.eml");
        std::fs::write(&plain_path, to_bytes(&plain())).unwrap();
        let header = dkimpy(&[
            "sign",
            &dir.join("rsa.private").display().to_string(),
            "rsa",
            "example.com",
            canon,
            &plain_path.display().to_string(),
        ]);
        let value = header
            .strip_prefix("DKIM-Signature:")
            .unwrap_or_else(|| panic!("{header:?}"))
            .trim_end()
            .replace("\r\n", "\n");
        let theirs = with_headers(&plain(), &[("DKIM-Signature", value)]);
        let outcome = send(&harness.target, "192.0.2.7", &theirs).await;
        let ar = inserted(&outcome, "Authentication-Results").join("");
        assert!(
            ar.contains("dkim=pass (2048-bit key) header.d=example.com"),
            "{canon}: {ar}"
        );
    }
}
