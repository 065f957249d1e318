//! SIGKILL during a load run loses no DMARC report record that the MTA saw accepted, and counts
//! none twice. Several MTA connections (the milter protocol client, as Postfix speaks it) send
//! messages with unique queue IDs for a `p=reject` domain; the milter records each one in its
//! SQLite store before it answers end-of-message. Mid-run the milter is killed with SIGKILL and
//! started again on the same state directory, and the connections carry on. Afterwards every
//! message whose end-of-message got an accept reply has exactly one record in the store (or the
//! spool), and nothing else is there except, at most, the messages in flight at a kill. Three
//! kills per run, so that some land while a record is being written.
//!
//! The second test makes the same claim through a real Postfix (`milter_default_action =
//! tempfail`, so a message the milter could not answer is refused with 4xx, never accepted
//! unrecorded): every message Postfix answered `250 ... queued as ID` has exactly one record
//! under that queue ID.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use postern_milter::reports::Store;
use postern_tests::clients::Target;
use postern_tests::clients::milter::{MilterClient, MilterMessage, Verdict, sample_message};
use postern_tests::daemon::{DaemonProcess, free_port};
use postern_tests::dns::{TestDns, Zone};
use postern_tests::postfix::{self, PostfixInstance};
use postern_tests::smtp::Outgoing;

/// MTA connections sending at once.
const CONNECTIONS: usize = 4;
/// Messages each connection sends (attempted: some fail while the milter is down).
const MESSAGES_PER_CONNECTION: usize = 200;
/// A kill comes each time this many more messages were accepted.
const KILL_EVERY_ACCEPTED: usize = 150;
/// Kills in one run.
const KILLS: usize = 3;
/// Reconnection attempts, 20 ms apart, while the milter restarts (20 s on a loaded machine).
const MAX_RECONNECTS: u32 = 1000;
/// The whole run must finish within this.
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

/// What one connection saw: queue IDs accepted, and queue IDs whose end-of-message went out
/// but got no answer (the milter died under them).
#[derive(Debug, Default)]
struct Outcome {
    accepted: Vec<String>,
    unanswered: Vec<String>,
    refused: Vec<(String, Verdict)>,
}

async fn session(target: &Target) -> anyhow::Result<MilterClient> {
    let mut client = MilterClient::connect(target).await?;
    client
        .connect_stage(
            "mail.example.com",
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 25)),
            40000,
            "mx.test.example",
        )
        .await?;
    client.helo("mail.example.com").await?;
    Ok(client)
}

async fn connection(
    index: usize,
    target: Target,
    template: Arc<MilterMessage>,
    accepted_total: Arc<AtomicUsize>,
) -> Outcome {
    let mut outcome = Outcome::default();
    let mut client: Option<MilterClient> = None;
    for n in 0..MESSAGES_PER_CONNECTION {
        let queue_id = format!("K{index}X{n:04}");
        // Reconnect (bounded) while the milter is down or restarting.
        let mut attempts = 0;
        while client.is_none() {
            match session(&target).await {
                Ok(c) => client = Some(c),
                Err(err) => {
                    attempts += 1;
                    assert!(
                        attempts < MAX_RECONNECTS,
                        "milter not back after {MAX_RECONNECTS} attempts: {err:#}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let mut message = (*template).clone();
        message.queue_id = queue_id.clone();
        let mut current = client.take().expect("connected above");
        match current.message(&message).await {
            Ok(result) => match result.verdict {
                Some(Verdict::Continue | Verdict::Accept) => {
                    outcome.accepted.push(queue_id);
                    accepted_total.fetch_add(1, Ordering::SeqCst);
                    if current.abort().await.is_ok() {
                        client = Some(current);
                    }
                }
                other => {
                    outcome
                        .refused
                        .push((queue_id, other.unwrap_or(Verdict::NotAsked)));
                    client = Some(current);
                }
            },
            // The connection broke somewhere between MAIL and the end-of-message reply: the
            // MTA would answer 4xx (milter_default_action = tempfail) and the client retry.
            Err(_) => outcome.unanswered.push(queue_id),
        }
    }
    outcome
}

/// Queue IDs of the records in the store and in the spool file, with their multiplicity.
async fn recorded(state: &Path) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    let store = Store::connect(&format!(
        "sqlite://{}",
        state.join("dmarc-reports.db").display()
    ))
    .await
    .unwrap();
    for record in store.records("example.com", 0, i64::MAX).await.unwrap() {
        *seen.entry(record.job_id).or_insert(0) += 1;
    }
    assert_eq!(
        store.count().await.unwrap() as usize,
        seen.values().sum::<usize>(),
        "records outside example.com"
    );
    store.close().await;
    if let Ok(text) = std::fs::read_to_string(state.join("dmarc-reports.spool")) {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let entry: serde_json::Value = serde_json::from_str(line).unwrap();
            let job = entry["record"]["job_id"].as_str().unwrap().to_owned();
            *seen.entry(job).or_insert(0) += 1;
        }
    }
    seen
}

/// DNS for example.com: SPF allowing `senders`, DMARC p=reject with a rua address.
async fn example_com_dns(senders: &str) -> TestDns {
    let mut zone = Zone::new();
    zone.add("example.com", "TXT", &format!("v=spf1 {senders} -all"))
        .unwrap();
    zone.add(
        "_dmarc.example.com",
        "TXT",
        "v=DMARC1; p=reject; rua=mailto:dmarc@example.com",
    )
    .unwrap();
    TestDns::start(zone).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_loses_no_accepted_record() {
    let dns = example_com_dns("ip4:192.0.2.0/24").await;
    let state_root = tempfile::tempdir().unwrap();
    let state = state_root.path().join("state");
    let port = free_port();
    let config = format!(
        "state_dir = \"{}\"\nlisten = \"inet:127.0.0.1:{port}\"\nauthserv_id = \"mx.test.example\"\n\
         [dmarc]\nreject_failures = true\nignore_hosts = []\n[dns]\nnameservers = [\"{}\"]\n",
        state.display(),
        dns.addr()
    );
    let mut milter = DaemonProcess::start("milter", &config, &[port]).unwrap();

    let target: Target = format!("127.0.0.1:{port}").parse().unwrap();
    let template = Arc::new(MilterMessage::parse(
        &sample_message("example.com"),
        "alice@example.com",
        &["bob@dest.example"],
    ));
    let accepted_total = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            tokio::spawn(connection(
                i,
                target.clone(),
                template.clone(),
                accepted_total.clone(),
            ))
        })
        .collect();

    // Kill while every connection is busy; start it again on the same port and state
    // directory, as systemd's Restart= would.
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut accepted_at_kill = 0;
    for kill in 1..=KILLS {
        while accepted_total.load(Ordering::SeqCst) < kill * KILL_EVERY_ACCEPTED {
            assert!(
                Instant::now() < deadline,
                "only {} accepted before the deadline; log:\n{}",
                accepted_total.load(Ordering::SeqCst),
                milter.log()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        milter.signal("KILL").unwrap();
        milter.wait_exit(Duration::from_secs(10)).unwrap();
        accepted_at_kill = accepted_total.load(Ordering::SeqCst);
        milter = DaemonProcess::start("milter", &config, &[port]).unwrap();
    }

    let mut outcomes = Vec::new();
    for worker in workers {
        let outcome =
            tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), worker)
                .await
                .expect("load run within the deadline")
                .unwrap();
        outcomes.push(outcome);
    }
    let accepted: BTreeSet<String> = outcomes
        .iter()
        .flat_map(|o| o.accepted.iter().cloned())
        .collect();
    let unanswered: BTreeSet<String> = outcomes
        .iter()
        .flat_map(|o| o.unanswered.iter().cloned())
        .collect();
    let refused: Vec<&(String, Verdict)> = outcomes.iter().flat_map(|o| &o.refused).collect();
    assert!(refused.is_empty(), "refused: {refused:?}\n{}", milter.log());
    assert_eq!(
        accepted.len() + unanswered.len(),
        CONNECTIONS * MESSAGES_PER_CONNECTION
    );
    // The kills hit a live run: connections broke, and messages were accepted after the last.
    assert!(
        unanswered.len() >= KILLS,
        "connections did not notice the kills"
    );
    assert!(
        accepted.len() > accepted_at_kill + CONNECTIONS,
        "nothing accepted after the last restart: {} of {accepted_at_kill}\n{}",
        accepted.len(),
        milter.log()
    );

    let seen = recorded(&state).await;
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "counted twice: {twice:?}");
    let lost: Vec<&String> = accepted.iter().filter(|q| !seen.contains_key(*q)).collect();
    assert!(
        lost.is_empty(),
        "{} accepted message(s) without a record: {lost:?}",
        lost.len()
    );
    // Besides the accepted ones, only messages whose answer a kill swallowed (recorded, then
    // killed before the reply went out): at most one per connection and kill.
    let extra: Vec<&String> = seen.keys().filter(|q| !accepted.contains(*q)).collect();
    assert!(
        extra.iter().all(|q| unanswered.contains(*q)),
        "records of messages never sent: {extra:?}"
    );
    assert!(extra.len() <= CONNECTIONS * KILLS, "{extra:?}");
    eprintln!(
        "accepted {} (last kill after {accepted_at_kill}), unanswered {}, recorded {} ({} of them unanswered)",
        accepted.len(),
        unanswered.len(),
        seen.len(),
        extra.len()
    );
}

/// SMTP clients sending through Postfix at once, and messages each sends (one per session).
const SMTP_CLIENTS: usize = 4;
const SMTP_MESSAGES_PER_CLIENT: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_through_postfix_loses_no_record_postfix_accepted() {
    if !postern_tests::require(
        postfix::available().is_ok(),
        &format!("{:?}", postfix::available()),
    ) {
        return;
    }
    let dns = example_com_dns("ip4:127.0.0.0/8").await;
    let state_root = tempfile::tempdir().unwrap();
    let state = state_root.path().join("state");
    let port = free_port();
    let config = format!(
        "state_dir = \"{}\"\nlisten = \"inet:127.0.0.1:{port}\"\nauthserv_id = \"mx.test.example\"\n\
         [dmarc]\nignore_hosts = []\n[dns]\nnameservers = [\"{}\"]\n",
        state.display(),
        dns.addr()
    );
    let postfix: PostfixInstance = PostfixInstance::builder()
        .main_cf(format!("smtpd_milters = inet:127.0.0.1:{port}"))
        .main_cf("milter_default_action = tempfail")
        .relay_domains("dest.example")
        .start()
        .await
        .unwrap();
    let mut milter = DaemonProcess::start("milter", &config, &[port]).unwrap();
    let postfix = Arc::new(postfix);
    let accepted_total = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..SMTP_CLIENTS)
        .map(|client| {
            let (postfix, accepted_total) = (postfix.clone(), accepted_total.clone());
            tokio::spawn(async move {
                // (queue IDs Postfix accepted, replies that were not 250)
                let mut accepted = Vec::new();
                let mut refused = Vec::new();
                for n in 0..SMTP_MESSAGES_PER_CLIENT {
                    let data = format!(
                        "From: Alice <alice@example.com>\r\nTo: <bob@dest.example>\r\n\
                         Subject: kill {client}.{n}\r\nMessage-ID: <kill.{client}.{n}@example.com>\r\n\r\nBody.\r\n"
                    );
                    // A refused message is tried again, as a sending MTA does after a 4xx.
                    for attempt in 0.. {
                        assert!(attempt < MAX_RECONNECTS, "message {client}.{n} never accepted");
                        let transcript = postfix
                            .send(&Outgoing {
                                helo: "mail.example.com".into(),
                                from: "alice@example.com".into(),
                                to: vec!["bob@dest.example".into()],
                                data: data.clone().into_bytes(),
                            })
                            .await
                            .unwrap_or_else(|err| panic!("SMTP session failed: {err:#}"));
                        if transcript.accepted() {
                            let reply = transcript.reply_to(".").expect("accepted has a reply");
                            assert!(reply.text.contains("queued as"), "{reply:?}");
                            let queue_id = reply.text.rsplit(' ').next().unwrap_or_default();
                            accepted.push(queue_id.to_owned());
                            accepted_total.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        refused.push(transcript.exchanges.last().map(|(_, r)| r.clone()));
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                (accepted, refused)
            })
        })
        .collect();

    let deadline = Instant::now() + RUN_TIMEOUT;
    let kill_at = SMTP_CLIENTS * SMTP_MESSAGES_PER_CLIENT / 3;
    while accepted_total.load(Ordering::SeqCst) < kill_at {
        assert!(
            Instant::now() < deadline,
            "only {} accepted before the deadline\n{}\n{}",
            accepted_total.load(Ordering::SeqCst),
            postfix.maillog(),
            milter.log()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    milter.signal("KILL").unwrap();
    milter.wait_exit(Duration::from_secs(10)).unwrap();
    let accepted_at_kill = accepted_total.load(Ordering::SeqCst);
    // Postfix refuses with 4xx while the milter is down; then it is back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    milter = DaemonProcess::start("milter", &config, &[port]).unwrap();

    let mut accepted = BTreeSet::new();
    let mut refused = Vec::new();
    for client in clients {
        let (ids, refusals) =
            tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), client)
                .await
                .expect("SMTP run within the deadline")
                .unwrap();
        accepted.extend(ids);
        refused.extend(refusals);
    }
    assert_eq!(accepted.len(), SMTP_CLIENTS * SMTP_MESSAGES_PER_CLIENT);
    assert!(
        refused
            .iter()
            .all(|r| r.as_ref().is_some_and(|r| (400..500).contains(&r.code))),
        "only temporary refusals while the milter was down: {refused:?}"
    );
    assert!(!refused.is_empty(), "no session noticed the kill");

    let seen = recorded(&state).await;
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "counted twice: {twice:?}");
    let lost: Vec<&String> = accepted.iter().filter(|q| !seen.contains_key(*q)).collect();
    assert!(
        lost.is_empty(),
        "{} message(s) Postfix accepted without a record: {lost:?}\n{}",
        lost.len(),
        milter.log()
    );
    // Records of refused attempts: at most those in flight at the kill (recorded, then killed
    // before the answer; the sender's retry is a new message with a new queue ID).
    let extra = seen.keys().filter(|q| !accepted.contains(*q)).count();
    assert!(extra <= SMTP_CLIENTS, "{extra} records of refused messages");
    eprintln!(
        "postfix accepted {} (kill after {accepted_at_kill}), refused attempts {}, recorded {} ({extra} refused)",
        accepted.len(),
        refused.len(),
        seen.len()
    );
}

/// When neither the report store nor the spool file takes a record, the message is refused
/// with a temporary error (the sender retries) rather than accepted without its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_store_and_no_spool_means_tempfail_not_an_unrecorded_accept() {
    let dns = example_com_dns("ip4:192.0.2.0/24").await;
    let state_root = tempfile::tempdir().unwrap();
    let state = state_root.path().join("state");
    // The spool "file" is a directory (appending fails); nothing listens on the store's port.
    let spool = state_root.path().join("spool-is-a-directory");
    std::fs::create_dir(&spool).unwrap();
    let port = free_port();
    let dead_store = free_port();
    let config = format!(
        "state_dir = \"{}\"\nlisten = \"inet:127.0.0.1:{port}\"\nauthserv_id = \"mx.test.example\"\n\
         [dmarc]\nignore_hosts = []\n[dmarc.reports]\nstore = \"postgres://postern@127.0.0.1:{dead_store}/reports\"\n\
         spool_file = \"{}\"\n[dns]\nnameservers = [\"{}\"]\n",
        state.display(),
        spool.display(),
        dns.addr()
    );
    let milter = DaemonProcess::start("milter", &config, &[port]).unwrap();
    let target: Target = format!("127.0.0.1:{port}").parse().unwrap();
    let mut client = session(&target).await.unwrap();
    let mut message = MilterMessage::parse(
        &sample_message("example.com"),
        "alice@example.com",
        &["bob@dest.example"],
    );
    message.queue_id = "T1".into();
    let result = client.message(&message).await.unwrap();
    assert_eq!(
        result.verdict,
        Some(Verdict::ReplyCode(
            "451 4.3.0 DMARC report store unavailable, try again later".into()
        )),
        "{}",
        milter.log()
    );
    milter
        .wait_log("answering tempfail", Duration::from_secs(5))
        .unwrap();
}
