//! Through a real Postfix (private instance, `smtpd_milters` as a postmaster writes it): mail
//! from an internal client leaves with an RSA and an Ed25519 DKIM-Signature, with
//! simple/simple canonicalization so that any byte Postfix and the milter disagree on (header
//! spacing, folding, the space after the colon) would break them; both verify against the test
//! DNS server.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use mail_auth::{AuthenticatedMessage, DkimResult};
use postern_milter::config::MilterConfig;
use postern_milter::dkim::keys::{KeygenAlgorithm, generate};
use postern_tests::daemon::{DaemonProcess, free_port};
use postern_tests::dns::{TestDns, Zone};
use postern_tests::postfix::{self, PostfixInstance};
use postern_tests::smtp::Outgoing;

#[tokio::test]
async fn postfix_delivers_dual_signed_mail_that_verifies() {
    if !postern_tests::require(
        postfix::available().is_ok(),
        &format!("{:?}", postfix::available()),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut zone = Zone::new();
    let mut keys = String::new();
    for (selector, algorithm) in [
        ("rsa", KeygenAlgorithm::Rsa2048),
        ("ed", KeygenAlgorithm::Ed25519),
    ] {
        let generated = generate(algorithm, "example.com", selector).unwrap();
        let path = dir.path().join(format!("{selector}.private"));
        std::fs::write(&path, generated.private_pem).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        zone.add(
            &format!("{selector}._domainkey.example.com"),
            "TXT",
            &generated.record,
        )
        .unwrap();
        keys.push_str(&format!(
            "[[dkim.keys]]\ndomain = \"example.com\"\nselector = \"{selector}\"\nkey_file = \"{}\"\n",
            path.display()
        ));
    }
    let dns = TestDns::start(zone).await.unwrap();
    let m = free_port();
    let milter = DaemonProcess::start(
        "milter",
        &format!(
            "state_dir = \"@STATE@\"\nlisten = \"inet:127.0.0.1:{m}\"\nauthserv_id = \"mx.test.example\"\n\
             [dkim]\ncanonicalization = \"simple/simple\"\n{keys}[dns]\nnameservers = [\"{}\"]\n",
            dns.addr()
        ),
        &[m],
    )
    .unwrap();
    let postfix: PostfixInstance = PostfixInstance::builder()
        .main_cf(format!("smtpd_milters = inet:127.0.0.1:{m}"))
        .main_cf("non_smtpd_milters = $smtpd_milters")
        .relay_domains("dest.example")
        .start()
        .await
        .unwrap();
    let data = b"From: Alice <alice@example.com>\r\nTo: <bob@dest.example>\r\nSubject:  two  spaces\r\n\tand a fold\r\nDate: Wed, 25 Nov 2026 07:00:00 +0000\r\nMessage-ID: <e2e@example.com>\r\nX-No-Space:tight\r\n\r\nBody line.\r\n\r\n\r\n".to_vec();
    let transcript = postfix
        .send(&Outgoing {
            helo: "client.example.com".into(),
            from: "alice@example.com".into(),
            to: vec!["bob@dest.example".into()],
            data,
        })
        .await
        .unwrap();
    assert!(
        transcript.accepted(),
        "{transcript:?}\n{}",
        postfix.maillog()
    );
    let delivered = postfix
        .wait_delivered(1, Duration::from_secs(30))
        .await
        .unwrap();
    let got = &delivered[0];
    assert_eq!(
        got.headers("DKIM-Signature").len(),
        2,
        "{}\n{}",
        got.text(),
        milter.log()
    );
    let mut config = MilterConfig::default();
    config.dns.nameservers = vec![dns.addr()];
    let auth = Arc::new(postern_milter::server::authenticator(&config).unwrap());
    let message = AuthenticatedMessage::parse(&got.data).unwrap();
    let results = auth.verify_dkim(&message).await;
    assert_eq!(results.len(), 2);
    assert!(
        results.iter().all(|r| r.result() == &DkimResult::Pass),
        "{results:?}\n{}",
        got.text()
    );
}
