//! End to end through a real Postfix with all three daemons plugged in by the main.cf lines a
//! postmaster writes: the policy request is answered, the milter negotiates and sees the
//! message, the canonical-map lookups are answered, and the message arrives unchanged. Then
//! SRS for real: a foreign sender leaves with an SRS0 envelope sender, and a bounce to that
//! address reaches the original sender.

use std::time::Duration;

use postern_tests::daemon::{DaemonProcess, free_port};
use postern_tests::postfix::{self, PostfixInstance};
use postern_tests::smtp::Outgoing;

struct Daemons {
    policyd: DaemonProcess,
    milter: DaemonProcess,
    srsd: DaemonProcess,
    ports: (u16, u16, u16, u16),
}

fn start_daemons() -> Daemons {
    let (p, m, f, r) = (free_port(), free_port(), free_port(), free_port());
    let policyd = DaemonProcess::start(
        "policyd",
        &format!("state_dir = \"@STATE@\"\n[[listen]]\naddress = \"inet:127.0.0.1:{p}\"\n"),
        &[p],
    )
    .unwrap();
    let milter = DaemonProcess::start("milter", &format!("state_dir = \"@STATE@\"\nlisten = \"inet:{m}@127.0.0.1\"\nauthserv_id = \"mx.test.example\"\n"), &[m]).unwrap();
    let srsd = DaemonProcess::start(
        "srsd",
        &format!("state_dir = \"@STATE@\"\nsrs_domain = \"test.example\"\ndomains = [\"local.example\"]\nforward_listen = \"inet:127.0.0.1:{f}\"\nreverse_listen = \"inet:127.0.0.1:{r}\"\n"),
        &[f, r],
    )
    .unwrap();
    Daemons {
        policyd,
        milter,
        srsd,
        ports: (p, m, f, r),
    }
}

async fn start_postfix(d: &Daemons) -> PostfixInstance {
    let (p, m, f, r) = d.ports;
    PostfixInstance::builder()
        .main_cf(format!("smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination, check_policy_service inet:127.0.0.1:{p}"))
        .main_cf(format!("smtpd_milters = inet:127.0.0.1:{m}"))
        .main_cf("non_smtpd_milters = $smtpd_milters")
        .main_cf(format!("sender_canonical_maps = tcp:127.0.0.1:{f}"))
        .main_cf("sender_canonical_classes = envelope_sender")
        .main_cf(format!("recipient_canonical_maps = tcp:127.0.0.1:{r}"))
        .main_cf("recipient_canonical_classes = envelope_recipient, header_recipient")
        // Let the policy server see our own test client too (permit_mynetworks would skip it).
        .mynetworks("127.0.0.2/32")
        // Bounces come back to the SRS domain; cleanup's recipient_canonical_maps turns them
        // into the original sender's address, which is relayed to the sink.
        .relay_domains("dest.example, test.example")
        // A forwarding address: fwd@alias.example goes on to dave@dest.example.
        .main_cf("virtual_alias_domains = alias.example")
        .main_cf("virtual_alias_maps = inline:{ fwd@alias.example=dave@dest.example }")
        .start()
        .await
        .unwrap()
}

fn message(from: &str, to: &str, subject: &str) -> Vec<u8> {
    format!("From: <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nMessage-ID: <{subject}@local.example>\r\nDate: Wed, 25 Nov 2026 07:00:00 +0000\r\n\r\nHello from the foundation test.\r\n.leading dot line\r\nBye.\r\n").into_bytes()
}

#[tokio::test]
async fn message_passes_through_postfix_with_all_three_daemons() {
    if !postern_tests::require(
        postfix::available().is_ok(),
        &format!("{:?}", postfix::available()),
    ) {
        return;
    }
    let daemons = start_daemons();
    let postfix = start_postfix(&daemons).await;

    // 1. A local sender: nothing to rewrite, nothing to change.
    let outgoing = Outgoing {
        helo: "client.local.example".into(),
        from: "alice@local.example".into(),
        to: vec!["bob@dest.example".into()],
        data: message("alice@local.example", "bob@dest.example", "foundation"),
    };
    let transcript = postfix.send(&outgoing).await.unwrap();
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
    assert_eq!(got.mail_from, "alice@local.example");
    assert_eq!(got.rcpt_to, vec!["bob@dest.example"]);
    assert_eq!(got.headers("Subject"), vec!["foundation"]);
    assert_eq!(got.headers("From"), vec!["<alice@local.example>"]);
    assert!(
        got.body()
            .contains("Hello from the foundation test.\n.leading dot line\nBye."),
        "{}",
        got.text()
    );
    assert!(got.headers("Authentication-Results").is_empty());

    // The policy server answered the RCPT request, the milter saw the message, srsd was asked.
    daemons
        .policyd
        .wait_log("recipient=\"bob@dest.example\"", Duration::from_secs(5))
        .unwrap();
    assert!(
        daemons.policyd.log().contains("action=\"DUNNO\""),
        "{}",
        daemons.policyd.log()
    );
    daemons
        .milter
        .wait_log("message passed", Duration::from_secs(5))
        .unwrap();
    assert!(
        daemons
            .milter
            .log()
            .contains("sender=\"alice@local.example\""),
        "{}",
        daemons.milter.log()
    );
    daemons
        .srsd
        .wait_log(
            "address=\"alice@local.example\" reason=\"Need not rewrite local domain.\"",
            Duration::from_secs(5),
        )
        .unwrap();
    assert!(
        !postfix.maillog().contains("warning"),
        "{}",
        postfix.maillog()
    );

    // 2. A foreign sender forwarded onwards leaves with an SRS0 envelope sender at our domain.
    let outgoing = Outgoing {
        helo: "mx.sender.example".into(),
        from: "carol@dest.example".into(),
        to: vec!["dave@dest.example".into()],
        data: message("carol@dest.example", "dave@dest.example", "srs"),
    };
    assert!(postfix.send(&outgoing).await.unwrap().accepted());
    let delivered = postfix
        .wait_delivered(2, Duration::from_secs(30))
        .await
        .unwrap();
    let srs_sender = delivered[1].mail_from.clone();
    assert!(
        srs_sender.starts_with("SRS0=") && srs_sender.ends_with("=dest.example=carol@test.example"),
        "{srs_sender}"
    );
    assert_eq!(
        delivered[1].headers("From"),
        vec!["<carol@dest.example>"],
        "headers are not rewritten"
    );

    // 3. The bounce to that address goes back to carol.
    let bounce = Outgoing {
        helo: "mx.dest.example".into(),
        from: String::new(),
        to: vec![srs_sender.clone()],
        data: message("mailer-daemon@dest.example", &srs_sender, "bounce"),
    };
    let transcript = postfix.send(&bounce).await.unwrap();
    assert!(transcript.accepted(), "{transcript:?}");
    let delivered = postfix
        .wait_delivered(3, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(delivered[2].rcpt_to, vec!["carol@dest.example"]);
    assert_eq!(delivered[2].mail_from, "");

    // 4. A forged SRS address is not turned back into carol's (postsrsd 2.x: NOTFOUND).
    let forged_address = "SRS0=AAAA=2W=dest.example=carol@test.example";
    let forged = Outgoing {
        helo: "evil.example".into(),
        from: String::new(),
        to: vec![forged_address.into()],
        data: message("x@evil.example", forged_address, "forged"),
    };
    assert!(postfix.send(&forged).await.unwrap().accepted());
    let delivered = postfix
        .wait_delivered(4, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(delivered[3].rcpt_to, vec![forged_address]);
    daemons
        .srsd
        .wait_log("does not verify", Duration::from_secs(5))
        .unwrap();
}
