//! End to end through a real Postfix with all three daemons plugged in by the main.cf lines a
//! postmaster writes, their DNS from the test server: the policy request is answered (a new
//! triplet is greylisted, the retry passes), the milter sees every message by its queue id, the
//! canonical-map lookups are answered, and the message arrives unchanged. Then SRS for real: a
//! sender forwarded through a virtual alias leaves with an SRS0 envelope sender, a bounce to that
//! address reaches the original sender, a forged one does not; and a local submission through
//! sendmail passes the non_smtpd_milters path.

use std::time::Duration;

use postern_tests::daemon::{DaemonProcess, free_port};
use postern_tests::dns::{TestDns, Zone};
use postern_tests::postfix::{self, PostfixInstance};
use postern_tests::smtp::{Outgoing, Transcript};

struct Daemons {
    policyd: DaemonProcess,
    milter: DaemonProcess,
    srsd: DaemonProcess,
    ports: (u16, u16, u16, u16),
}

/// The sending and receiving domains' DNS, so no daemon asks the Internet.
const ZONE: &str = r#"
local.example      TXT "v=spf1 ip4:127.0.0.0/8 -all"
_dmarc.local.example TXT "v=DMARC1; p=none"
dest.example       TXT "v=spf1 ip4:127.0.0.0/8 -all"
mx.test.example    A   127.0.0.1
"#;

fn start_daemons(dns: std::net::SocketAddr) -> Daemons {
    let (p, m, f, r) = (free_port(), free_port(), free_port(), free_port());
    let dns = format!("[dns]\nnameservers = [\"{dns}\"]\n");
    let policyd = DaemonProcess::start(
        "policyd",
        // Greylisting as shipped (postgrey's defaults) but with a 1 s delay, so the test retries
        // like a real client; no X-Greylist header, so messages arrive unchanged.
        &format!(
            "state_dir = \"@STATE@\"\n[[listen]]\naddress = \"inet:127.0.0.1:{p}\"\n\
             [greylist]\ndelay = \"1s\"\nstore = \"memory:\"\nx_greylist_header = \"\"\n{dns}"
        ),
        &[p],
    )
    .unwrap();
    let milter = DaemonProcess::start("milter", &format!("state_dir = \"@STATE@\"\nlisten = \"inet:{m}@127.0.0.1\"\nauthserv_id = \"mx.test.example\"\n{dns}"), &[m]).unwrap();
    let srsd = DaemonProcess::start(
        "srsd",
        &format!("state_dir = \"@STATE@\"\nsrs_domain = \"test.example\"\ndomains = [\"local.example\"]\nforward_listen = \"inet:127.0.0.1:{f}\"\nreverse_listen = \"inet:127.0.0.1:{r}\"\n{dns}"),
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
        .virtual_alias("fwd@alias.example", "dave@dest.example")
        .start()
        .await
        .unwrap()
}

fn message(from: &str, to: &str, subject: &str) -> Vec<u8> {
    format!("From: <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nMessage-ID: <{subject}@local.example>\r\nDate: Wed, 25 Nov 2026 07:00:00 +0000\r\n\r\nHello from the foundation test.\r\n.leading dot line\r\nBye.\r\n").into_bytes()
}

/// Sends like a real SMTP client facing greylisting: a 450 at RCPT is retried once, after the
/// configured 1 s delay. Returns the transcripts of every attempt.
async fn send_retrying(postfix: &PostfixInstance, outgoing: &Outgoing) -> Vec<Transcript> {
    let first = postfix.send(outgoing).await.unwrap();
    let greylisted = first
        .exchanges
        .iter()
        .any(|(cmd, reply)| cmd.starts_with("RCPT") && reply.code == 450);
    if !greylisted {
        return vec![first];
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let second = postfix.send(outgoing).await.unwrap();
    vec![first, second]
}

#[tokio::test]
async fn message_passes_through_postfix_with_all_three_daemons() {
    if !postern_tests::require(
        postfix::available().is_ok(),
        &format!("{:?}", postfix::available()),
    ) {
        return;
    }
    let dns = TestDns::start(Zone::parse(ZONE).unwrap()).await.unwrap();
    let daemons = start_daemons(dns.addr());
    let postfix = start_postfix(&daemons).await;

    // 1. A local sender: nothing to rewrite, nothing to change.
    let outgoing = Outgoing {
        helo: "client.local.example".into(),
        from: "alice@local.example".into(),
        to: vec!["bob@dest.example".into()],
        data: message("alice@local.example", "bob@dest.example", "foundation"),
    };
    // The policy server answers through Postfix: the new triplet is greylisted with postgrey's
    // text, the retry after the delay passes.
    let attempts = send_retrying(&postfix, &outgoing).await;
    assert_eq!(attempts.len(), 2, "{attempts:?}\n{}", postfix.maillog());
    let refused = attempts[0].reply_to("RCPT").unwrap();
    assert_eq!(refused.code, 450, "{refused:?}");
    assert!(
        refused
            .text
            .starts_with("4.2.0 <bob@dest.example>: Recipient address rejected: Greylisted"),
        "{refused:?}"
    );
    let transcript = &attempts[1];
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
    // Unchanged: the message as sent is the end of what arrived; before it only Postfix's
    // Received header and at most one Authentication-Results header of ours.
    assert!(got.data.ends_with(&outgoing.data), "{}", got.text());
    let added = &got.data[..got.data.len() - outgoing.data.len()];
    let added = String::from_utf8_lossy(added);
    let names: Vec<&str> = added
        .lines()
        .filter(|l| !l.starts_with([' ', '\t']))
        .filter_map(|l| l.split_once(':').map(|(name, _)| name))
        .collect();
    assert_eq!(
        names.iter().filter(|n| **n == "Received").count(),
        1,
        "{added}"
    );
    assert!(
        names
            .iter()
            .all(|n| *n == "Received" || *n == "Authentication-Results"),
        "{added}"
    );
    let results = got.headers("Authentication-Results");
    assert!(results.len() <= 1, "{results:?}");
    assert!(
        results.iter().all(|r| r.starts_with("mx.test.example")),
        "{results:?}"
    );

    // The policy server answered the RCPT request, the milter saw the message, srsd was asked.
    for needle in ["action=\"DEFER_IF_PERMIT", "action=\"DUNNO\""] {
        daemons
            .policyd
            .wait_log(needle, Duration::from_secs(5))
            .unwrap();
    }
    // The milter logged its decision on this very message: the queue id Postfix gave it (in
    // Postfix's Received header) is in the milter's log.
    let received = got.headers("Received").join(" ");
    let queue_id = received
        .split_once(" id ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .map(|id| id.trim_end_matches(';').to_owned())
        .unwrap_or_else(|| panic!("no queue id in {received:?}"));
    daemons
        .milter
        .wait_log(&format!("queue_id=\"{queue_id}\""), Duration::from_secs(5))
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
        to: vec!["fwd@alias.example".into()],
        data: message("carol@dest.example", "fwd@alias.example", "srs"),
    };
    assert!(
        send_retrying(&postfix, &outgoing)
            .await
            .last()
            .unwrap()
            .accepted()
    );
    let delivered = postfix
        .wait_delivered(2, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(delivered[1].rcpt_to, vec!["dave@dest.example"], "forwarded");
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
    let attempts = send_retrying(&postfix, &bounce).await;
    assert!(attempts.last().unwrap().accepted(), "{attempts:?}");
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
    assert!(
        send_retrying(&postfix, &forged)
            .await
            .last()
            .unwrap()
            .accepted()
    );
    let delivered = postfix
        .wait_delivered(4, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(delivered[3].rcpt_to, vec![forged_address]);
    daemons
        .srsd
        .wait_log("does not verify", Duration::from_secs(5))
        .unwrap();

    // 5. Local submission (sendmail -> pickup -> cleanup): the non_smtpd_milters path, with no
    // policy check; the milter sees it too and it arrives unchanged.
    let local = message(
        "alice@local.example",
        "erin@dest.example",
        "local-submission",
    );
    postfix
        .sendmail("alice@local.example", &["erin@dest.example"], &local)
        .unwrap();
    let delivered = postfix
        .wait_delivered(5, Duration::from_secs(30))
        .await
        .unwrap();
    let got = &delivered[4];
    assert_eq!(got.rcpt_to, vec!["erin@dest.example"]);
    assert_eq!(got.mail_from, "alice@local.example");
    assert_eq!(got.headers("Subject"), vec!["local-submission"]);
    assert!(got.body().contains(".leading dot line"), "{}", got.text());
    let received = got.headers("Received").join(" ");
    assert!(received.contains("(Postfix, from userid 0)"), "{received}");
    let queue_id = received
        .split_once(" id ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .map(|id| id.trim_end_matches(';').to_owned())
        .unwrap();
    daemons
        .milter
        .wait_log(&format!("queue_id=\"{queue_id}\""), Duration::from_secs(5))
        .unwrap();
    // Everything delivered: the queue is empty and a flush has nothing to do.
    postfix.flush().unwrap();
    assert!(
        postfix.queue().contains("Mail queue is empty"),
        "{}",
        postfix.queue()
    );
}
