//! postern-milter (the built binary) at scale, its memory read from /proc: a 50 MB message is
//! signed (RSA and Ed25519) without being held and verified holding about one copy; above
//! `dkim.max_message_size` a message passes untouched and this is logged; 64 connections with
//! 4 KB messages stay under 200 MB.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use postern_milter::dkim::keys::{KeygenAlgorithm, generate};
use postern_tests::clients::Target;
use postern_tests::clients::milter::{
    MessageOutcome, MilterClient, MilterMessage, Verdict, sample_message,
};
use postern_tests::daemon::{DaemonProcess, free_port};
use postern_tests::dns::{TestDns, Zone};
use postern_tests::load::peak_rss_kb;

const MB: usize = 1024 * 1024;
/// An internal client (signed) and an outside one (verified).
const INTERNAL: &str = "127.0.0.1";
const OUTSIDE: &str = "192.0.2.25";

/// The milter with an RSA and an Ed25519 key for example.com, published in a test DNS server.
struct Setup {
    milter: DaemonProcess,
    target: Target,
    _dns: TestDns,
    _keys: tempfile::TempDir,
}

async fn start(extra_dkim: &str) -> Setup {
    let keys = tempfile::tempdir().unwrap();
    let mut zone = Zone::new();
    let mut dkim = String::from("[dkim]\n");
    dkim.push_str(extra_dkim);
    for (selector, algorithm) in [
        ("rsa", KeygenAlgorithm::Rsa2048),
        ("ed", KeygenAlgorithm::Ed25519),
    ] {
        let generated = generate(algorithm, "example.com", selector).unwrap();
        let path = keys.path().join(format!("{selector}.private"));
        std::fs::write(&path, generated.private_pem).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        zone.add(
            &format!("{selector}._domainkey.example.com"),
            "TXT",
            &generated.record,
        )
        .unwrap();
        dkim.push_str(&format!(
            "[[dkim.keys]]\ndomain = \"example.com\"\nselector = \"{selector}\"\nkey_file = \"{}\"\n",
            path.display()
        ));
    }
    let dns = TestDns::start(zone).await.unwrap();
    let port = free_port();
    let config = format!(
        "state_dir = \"@STATE@\"\nlisten = \"inet:127.0.0.1:{port}\"\nauthserv_id = \"mx.test\"\n\
         [dns]\nnameservers = [\"{}\"]\n[dmarc]\nenabled = false\n{dkim}",
        dns.addr()
    );
    let milter = DaemonProcess::start("milter", &config, &[port]).unwrap();
    Setup {
        milter,
        target: format!("127.0.0.1:{port}").parse().unwrap(),
        _dns: dns,
        _keys: keys,
    }
}

/// A message from alice@example.com with a body of about `body_bytes` (76-character lines).
fn message(body_bytes: usize) -> MilterMessage {
    let mut message = MilterMessage::parse(
        &sample_message("example.com"),
        "alice@example.com",
        &["bob@dest.example"],
    );
    // As Postfix sends them to a milter that negotiated SMFIP_HDR_LEADSPC.
    for (_, value) in &mut message.headers {
        value.insert(0, ' ');
    }
    let line = b"0123456789 the quick brown fox jumps over the lazy dog 0123456789 abcdefgh\r\n";
    message.body = Vec::with_capacity(body_bytes + line.len());
    while message.body.len() < body_bytes {
        message.body.extend_from_slice(line);
    }
    message
}

async fn connect(target: &Target, ip: &str) -> MilterClient {
    let mut client = MilterClient::connect(target).await.unwrap();
    let ip: IpAddr = ip.parse().unwrap();
    client
        .connect_stage("client.test", ip, 40000, "mx.test")
        .await
        .unwrap();
    client.helo("client.test").await.unwrap();
    client
}

async fn send(target: &Target, ip: &str, message: &MilterMessage) -> MessageOutcome {
    let mut client = connect(target, ip).await;
    let outcome = tokio::time::timeout(Duration::from_secs(120), client.message(message))
        .await
        .expect("an answer within 120 s")
        .unwrap();
    client.quit().await.unwrap();
    assert!(
        matches!(outcome.verdict, Some(Verdict::Continue | Verdict::Accept)),
        "{:?}",
        outcome.verdict
    );
    outcome
}

fn headers(outcome: &MessageOutcome, name: &str) -> Vec<String> {
    outcome
        .added_headers()
        .into_iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v)
        .collect()
}

/// Signs at an internal client, then verifies the signed message from outside; returns the
/// Authentication-Results value.
async fn sign_then_verify(setup: &Setup, message: &MilterMessage) -> (Vec<String>, String) {
    let signed = send(&setup.target, INTERNAL, message).await;
    let signatures = headers(&signed, "DKIM-Signature");
    assert_eq!(signatures.len(), 2, "{:?}", signed.modifications);
    let mut incoming = message.clone();
    for value in signatures.iter().rev() {
        incoming
            .headers
            .insert(0, ("DKIM-Signature".to_owned(), value.clone()));
    }
    let verified = send(&setup.target, OUTSIDE, &incoming).await;
    let results = headers(&verified, "Authentication-Results");
    assert_eq!(results.len(), 1, "{:?}", verified.modifications);
    (signatures, results[0].clone())
}

fn peak_rss(milter: &DaemonProcess) -> usize {
    usize::try_from(peak_rss_kb(milter.pid()).expect("VmHWM in /proc")).unwrap() * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifty_megabyte_message_is_signed_unheld_and_verified_holding_one_copy() {
    let setup = start("").await;
    // Warm up (runtime, DNS cache, key use) so that what follows measures the message alone.
    let (_, results) = sign_then_verify(&setup, &message(4096)).await;
    assert_eq!(results.matches("dkim=pass").count(), 2, "{results}");
    let base = peak_rss(&setup.milter);
    let big = message(50 * MB);
    let size = big.body.len();

    let signed = send(&setup.target, INTERNAL, &big).await;
    let signatures = headers(&signed, "DKIM-Signature");
    assert_eq!(signatures.len(), 2, "{:?}", signed.modifications);
    let after_signing = peak_rss(&setup.milter);
    // Hashed as it arrives: at most the first STREAM_FROM_BYTES and the queued chunks are held.
    assert!(
        after_signing - base < 16 * MB,
        "signing a {size}-byte message grew the peak RSS from {base} to {after_signing}"
    );

    let mut incoming = big.clone();
    drop(big);
    for value in signatures.iter().rev() {
        incoming
            .headers
            .insert(0, ("DKIM-Signature".to_owned(), value.clone()));
    }
    let verified = send(&setup.target, OUTSIDE, &incoming).await;
    let results = headers(&verified, "Authentication-Results");
    assert_eq!(results.len(), 1, "{:?}", verified.modifications);
    assert!(
        results[0].contains("header.s=rsa") && results[0].contains("header.s=ed"),
        "{}",
        results[0]
    );
    assert_eq!(results[0].matches("dkim=pass").count(), 2, "{}", results[0]);
    let after_verifying = peak_rss(&setup.milter);
    // mail-auth verifies a whole message: one copy, plus little.
    assert!(
        after_verifying - base < size + size / 4,
        "verifying a {size}-byte message grew the peak RSS from {base} to {after_verifying}"
    );
    eprintln!(
        "50 MB message: peak RSS {:.1} MB before, {:.1} MB after signing, {:.1} MB after verifying",
        base as f64 / MB as f64,
        after_signing as f64 / MB as f64,
        after_verifying as f64 / MB as f64
    );
    // Again and again: the copy is given back, nothing piles up.
    for _ in 0..2 {
        let again = send(&setup.target, OUTSIDE, &incoming).await;
        assert_eq!(headers(&again, "Authentication-Results").len(), 1);
    }
    let after_more = peak_rss(&setup.milter);
    assert!(
        after_more < after_verifying + 8 * MB,
        "two more verifications grew the peak RSS from {after_verifying} to {after_more}"
    );
    // A tampered body fails (bh= mismatch: mail-auth reports it as neutral).
    let last = incoming.body.len() - 3;
    incoming.body[last] = b'X';
    let tampered = send(&setup.target, OUTSIDE, &incoming).await;
    let results = headers(&tampered, "Authentication-Results");
    assert!(!results[0].contains("dkim=pass"), "{}", results[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_the_size_limit_a_message_passes_untouched_and_this_is_logged() {
    let setup = start("max_message_size = 1048576\n").await;
    // Under the limit: signed (buffered, then hashed as it arrives past 256 KiB).
    let (_, results) = sign_then_verify(&setup, &message(900 * 1024)).await;
    assert_eq!(results.matches("dkim=pass").count(), 2, "{results}");
    // Over it, signing (the limit is hit while streaming) and verifying alike.
    for ip in [INTERNAL, OUTSIDE] {
        let outcome = send(&setup.target, ip, &message(2 * MB)).await;
        assert!(outcome.modifications.is_empty(), "{ip}: {outcome:?}");
        assert_eq!(outcome.verdict, Some(Verdict::Continue));
    }
    setup
        .milter
        .wait_log_count(
            "message larger than dkim.max_message_size; passed unsigned and unverified",
            2,
            Duration::from_secs(5),
        )
        .unwrap();
    let log = setup.milter.log();
    assert_eq!(
        log.matches("larger than dkim.max_message_size").count(),
        2,
        "{log}"
    );
    assert!(log.contains("limit=1048576"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_connections_with_4_kb_messages_stay_under_200_mb() {
    const CONNECTIONS: usize = 64;
    const MESSAGES: usize = 20;
    let setup = start("").await;
    let message = Arc::new(message(4096 - 400));
    // All 64 connected before any message is sent, so that they are all open at once.
    let barrier = Arc::new(tokio::sync::Barrier::new(CONNECTIONS));
    let mut tasks = Vec::new();
    for n in 0..CONNECTIONS {
        let (target, message, barrier) = (setup.target.clone(), message.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            // Half sign, half verify.
            let ip = if n % 2 == 0 { INTERNAL } else { OUTSIDE };
            let mut client = connect(&target, ip).await;
            barrier.wait().await;
            let mut added = 0;
            for _ in 0..MESSAGES {
                let outcome = client.message(&message).await.unwrap();
                assert!(
                    matches!(outcome.verdict, Some(Verdict::Continue)),
                    "{outcome:?}"
                );
                added += outcome.added_headers().len();
                client.abort().await.unwrap();
            }
            client.quit().await.unwrap();
            (ip, added)
        }));
    }
    let mut added = Vec::new();
    for task in tasks {
        added.push(
            tokio::time::timeout(Duration::from_secs(120), task)
                .await
                .expect("64 connections done within 120 s")
                .unwrap(),
        );
    }
    for (ip, count) in added {
        // Two signatures per signed message, one Authentication-Results per verified one.
        let expected = if ip == INTERNAL { 2 } else { 1 } * MESSAGES;
        assert_eq!(count, expected, "{ip}");
    }
    let peak = peak_rss(&setup.milter);
    eprintln!(
        "64 connections x {MESSAGES} messages: peak RSS {:.1} MB",
        peak as f64 / MB as f64
    );
    assert!(peak < 200 * MB, "peak RSS {peak} bytes");
}
