//! Report tests: records from evaluated fixture messages, the XML against the RFC 7489 XSD, the
//! SQLite store and its spool, sending through a real SMTP sink on loopback, history import.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mail_auth::AuthenticatedMessage;
use mail_auth::Parameters;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use super::*;
use crate::dmarc::tests::{Zone, message, offline_authenticator, sign, standard_zone};
use crate::dmarc::{DmarcConfig, DmarcInput, evaluate_with};

const NOW: u64 = 1_790_000_000;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/dmarc")
}

/// Evaluates a message as the milter would and returns its record.
async fn record_for(
    zone: &Zone,
    raw: &str,
    client: &str,
    envelope_from: &str,
    at: u64,
) -> ReportRecord {
    let auth = offline_authenticator();
    let am = AuthenticatedMessage::parse(raw.as_bytes()).unwrap();
    let dkim = auth
        .verify_dkim(Parameters::new(&am).with_cache(zone))
        .await;
    let to = vec!["bob@receiver.test".to_owned()];
    let input = DmarcInput {
        client_ip: client.parse().unwrap(),
        helo: "mail.sender.test",
        envelope_from,
        envelope_to: &to,
        authenticated: false,
        message: &am,
        dkim: &dkim,
        authserv_id: "mx.test",
        queue_id: "Q1",
        now: at,
    };
    evaluate_with(
        &DmarcConfig::default(),
        &input,
        &auth,
        Some(zone),
        zone,
        &mut || 0,
    )
    .await
    .record
    .expect("example.com has a record")
}

/// The fixture set: 3 identical SPF-aligned passes from one IP, 2 DKIM-aligned passes from
/// another, 1 failure from a third, 1 message with an unaligned signature.
async fn fixture_records(base: u64) -> Vec<ReportRecord> {
    let zone = standard_zone();
    let mut records = Vec::new();
    for i in 0..3 {
        records.push(
            record_for(
                &zone,
                &message("a@example.com", ""),
                "192.0.2.25",
                "b@bounce.example.com",
                base + i,
            )
            .await,
        );
    }
    let signed = sign("example.com", &message("a@example.com", ""));
    for i in 0..2 {
        records.push(
            record_for(
                &zone,
                &signed,
                "198.51.100.7",
                "x@elsewhere.test",
                base + 10 + i,
            )
            .await,
        );
    }
    records.push(
        record_for(
            &zone,
            &message("a@example.com", ""),
            "203.0.113.9",
            "x@evil.test",
            base + 20,
        )
        .await,
    );
    let other = sign("other.org", &message("a@example.com", ""));
    records.push(record_for(&zone, &other, "203.0.113.9", "x@evil.test", base + 30).await);
    records
}

fn xmllint(xml: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("report.xml");
    std::fs::write(&file, xml).unwrap();
    let output = std::process::Command::new("xmllint")
        .arg("--noout")
        .arg("--schema")
        .arg(fixtures().join("rfc7489.xsd"))
        .arg(&file)
        .output()
        .expect("xmllint (Debian package libxml2-utils) must be installed");
    assert!(
        output.status.success(),
        "XSD validation failed:\n{}\n{xml}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn feedback_groups_counts_and_validates_against_the_xsd() {
    let records = fixture_records(NOW).await;
    assert_eq!(records.len(), 7);
    let feedback = build_feedback(
        "Postern Test",
        "postmaster@mx.test",
        "",
        "r1",
        100,
        199,
        &records,
    );
    let counts: Vec<(String, u64, String, String)> = feedback
        .record
        .iter()
        .map(|r| {
            (
                r.row.source_ip.clone(),
                r.row.count,
                r.row.policy_evaluated.dkim.clone(),
                r.row.policy_evaluated.spf.clone(),
            )
        })
        .collect();
    assert_eq!(
        counts,
        vec![
            ("192.0.2.25".into(), 3, "fail".into(), "pass".into()),
            ("198.51.100.7".into(), 2, "pass".into(), "fail".into()),
            ("203.0.113.9".into(), 1, "fail".into(), "fail".into()),
            ("203.0.113.9".into(), 1, "fail".into(), "fail".into()),
        ]
    );
    let xml = feedback.to_xml();
    xmllint(&xml);
    for needle in [
        "<version>1.0</version>",
        "<fo>1</fo>",
        "<envelope_from>bounce.example.com</envelope_from>",
        "<envelope_to>receiver.test</envelope_to>",
        "<scope>mfrom</scope>",
        "<selector>ed</selector>",
        "<domain>other.org</domain>",
        "<p>reject</p>",
        "<sp>quarantine</sp>",
        "<pct>100</pct>",
        "<type>local_policy</type>",
        "<begin>100</begin>",
    ] {
        assert!(xml.contains(needle), "{needle} missing in\n{xml}");
    }
    let total: u64 = feedback.record.iter().map(|r| r.row.count).sum();
    assert_eq!(total, 7);
    assert_eq!(
        report_subject("example.com", "Postern Test", "r1"),
        "Report Domain: example.com Submitter: Postern Test Report-ID: <r1>"
    );
    assert_eq!(
        report_file_name("mx.test", "example.com", 100, 199, "ab"),
        "mx.test!example.com!100!199!ab.xml.gz"
    );
    // gzip round trip.
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(&gzip(xml.as_bytes())[..])
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, xml);
}

fn test_config(dir: &Path) -> ReportsConfig {
    ReportsConfig {
        org_name: "Postern Test".into(),
        email: "dmarc-noreply@mx.test".into(),
        receiver: "mx.test".into(),
        store: format!("sqlite://{}?mode=rwc", dir.join("store.db").display()),
        spool_file: dir.join("spool"),
        store_retry_interval: postern_common::config::ConfigDuration::from_secs(0),
        ..ReportsConfig::default()
    }
}

#[tokio::test]
async fn sqlite_store_records_and_spool_replays_without_loss_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    // The store's directory does not exist yet: the store is "down".
    let db_dir = dir.path().join("db");
    let mut config = test_config(dir.path());
    config.store = format!("sqlite://{}?mode=rwc", db_dir.join("store.db").display());
    let recorder = Recorder::open(&config, dir.path()).await;
    let records = fixture_records(NOW).await;
    for record in &records[..4] {
        recorder.record(record).await.unwrap();
    }
    let spool = std::fs::read_to_string(dir.path().join("spool")).unwrap();
    assert_eq!(spool.lines().count(), 4, "spooled while the store is down");
    // The store comes back; the next record replays the spool first.
    std::fs::create_dir(&db_dir).unwrap();
    for record in &records[4..] {
        recorder.record(record).await.unwrap();
    }
    assert!(
        !dir.path().join("spool").exists(),
        "spool emptied after replay"
    );
    let store = recorder.store().await.unwrap();
    assert_eq!(store.backend_name(), "SQLite");
    assert_eq!(store.count().await.unwrap(), 7);
    // A replay repeated after a crash (same spool lines again) adds nothing.
    std::fs::write(dir.path().join("spool"), &spool).unwrap();
    assert_eq!(recorder.replay().await.unwrap(), 0);
    assert_eq!(store.count().await.unwrap(), 7);
    // A line cut short by a crash is skipped, the rest is kept.
    let partial = format!(
        "{}{{\"uid\":\"x",
        spool.lines().next().unwrap().to_owned() + "\n"
    );
    std::fs::write(dir.path().join("spool"), partial).unwrap();
    assert_eq!(recorder.replay().await.unwrap(), 0);
    // A new recorder (restart) over the same store sees everything.
    let again = Recorder::open(&config, dir.path()).await;
    assert_eq!(again.store().await.unwrap().count().await.unwrap(), 7);
    let stored = store.records("example.com", 0, i64::MAX).await.unwrap();
    assert_eq!(stored.len(), 7);
    assert_eq!(stored[0], records[0]);
}

/// A minimal SMTP server on loopback that keeps what it receives; `fail_data` answers 451 to
/// DATA.
struct Sink {
    port: u16,
    received: Arc<Mutex<Vec<(String, String)>>>,
    fail_data: Arc<Mutex<bool>>,
}

impl Sink {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let received: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let fail_data: Arc<Mutex<bool>> = Arc::default();
        let (store, fail) = (received.clone(), fail_data.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (store, fail) = (store.clone(), fail.clone());
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    write.write_all(b"220 sink ESMTP\r\n").await.ok();
                    let mut rcpt = String::new();
                    while let Ok(Ok(Some(line))) =
                        tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await
                    {
                        let upper = line.to_ascii_uppercase();
                        let reply: String = if upper.starts_with("EHLO") {
                            "250-sink\r\n250 8BITMIME\r\n".into()
                        } else if upper.starts_with("RCPT TO:") {
                            rcpt = line[8..].trim().trim_matches(['<', '>']).to_owned();
                            "250 ok\r\n".into()
                        } else if upper.starts_with("DATA") {
                            if *fail.lock().unwrap() {
                                "451 4.3.0 try later\r\n".into()
                            } else {
                                write.write_all(b"354 go\r\n").await.ok();
                                let mut data = String::new();
                                while let Ok(Some(line)) = lines.next_line().await {
                                    if line == "." {
                                        break;
                                    }
                                    data.push_str(&line);
                                    data.push('\n');
                                }
                                store.lock().unwrap().push((rcpt.clone(), data));
                                "250 queued\r\n".into()
                            }
                        } else if upper.starts_with("QUIT") {
                            write.write_all(b"221 bye\r\n").await.ok();
                            break;
                        } else {
                            "250 ok\r\n".into()
                        };
                        if write.write_all(reply.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Self {
            port,
            received,
            fail_data,
        }
    }
}

fn attachment_xml(data: &str) -> String {
    use base64::Engine;
    use std::io::Read;
    let start = data
        .find("Content-Transfer-Encoding: base64")
        .expect("base64 part");
    let body = &data[start..];
    let body = &body[body.find("\n\n").unwrap() + 2..];
    let end = body.find("\n--").unwrap_or(body.len());
    let b64: String = body[..end].split_whitespace().collect();
    let gz = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let mut xml = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut xml)
        .unwrap();
    xml
}

#[tokio::test]
async fn send_through_smtp_sink_retries_and_verifies_external_destinations() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start().await;
    let mut config = test_config(dir.path());
    config.smtp_port = sink.port;
    config.smtp_timeout = postern_common::config::ConfigDuration::from_secs(10);
    let store = Store::connect(&config.store_url(dir.path())).await.unwrap();
    // Day 20358 (1_758_931_200 .. +86400): the fixture set, with one internal and two external
    // destinations, one of them authorised, one with a size limit below the report's size.
    let day = 1_758_931_200i64;
    let mut records = fixture_records(day as u64 + 3600).await;
    for record in &mut records {
        record.published.rua = vec![
            "dmarc@example.com".into(),
            "agg@reports.test".into(),
            "tiny@reports.test!100".into(),
            "nobody@unauthorised.test".into(),
        ];
    }
    for (i, record) in records.iter().enumerate() {
        assert!(store.insert(&format!("u{i}"), record).await.unwrap());
    }
    let zone = Zone::new();
    zone.txt::<mail_auth::dmarc::DmarcRecord>(
        "example.com._report._dmarc.reports.test",
        "v=DMARC1",
    );
    let auth = offline_authenticator();
    let now = day + 86400 + 600;

    // STARTTLS required but the sink does not offer it: nothing is sent or marked sent.
    config.smtp_tls = SmtpTls::Required;
    let summary = send::send_with(&store, &config, &auth, Some(&zone), now)
        .await
        .unwrap();
    assert_eq!(
        (summary.sent, summary.failed, summary.closed),
        (0, 2, 0),
        "{summary:?}"
    );
    assert!(sink.received.lock().unwrap().is_empty());
    config.smtp_tls = SmtpTls::Never;

    // The sink refuses DATA: nothing is marked sent, the period stays open.
    *sink.fail_data.lock().unwrap() = true;
    let summary = send::send_with(&store, &config, &auth, Some(&zone), now)
        .await
        .unwrap();
    assert_eq!(summary.sent, 0);
    assert_eq!(summary.failed, 2, "{summary:?}");
    assert_eq!(summary.closed, 0);
    assert_eq!(store.last_end("example.com").await.unwrap(), None);

    // The sink accepts: the report goes to the internal and the authorised destination.
    *sink.fail_data.lock().unwrap() = false;
    let summary = send::send_with(&store, &config, &auth, Some(&zone), now)
        .await
        .unwrap();
    assert_eq!(summary.sent, 2, "{summary:?}");
    assert_eq!(summary.closed, 1);
    assert_eq!(
        summary.skipped, 1,
        "unauthorised (the oversized one was skipped on the first run)"
    );
    assert_eq!(
        store.last_end("example.com").await.unwrap(),
        Some(day + 86400)
    );
    let received = sink.received.lock().unwrap().clone();
    let rcpts: Vec<&str> = received.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(rcpts, vec!["dmarc@example.com", "agg@reports.test"]);
    let data = &received[0].1;
    let report_id = format!("{day}.example.com@mx.test");
    let unfolded = data.replace("\n ", " ");
    assert!(
        unfolded.contains(&format!(
            "Subject: Report Domain: example.com Submitter: Postern Test Report-ID: <{report_id}>"
        )),
        "{data}"
    );
    assert!(
        unfolded.contains(&format!("mx.test!example.com!{day}!{}!", day + 86399)),
        "{data}"
    );
    let xml = attachment_xml(data);
    xmllint(&xml);
    assert!(xml.contains("<count>3</count>"));

    // Nothing is due any more; a further run sends nothing twice.
    let summary = send::send_with(&store, &config, &auth, Some(&zone), now + 60)
        .await
        .unwrap();
    assert_eq!(summary, SendSummary::default());
    assert_eq!(sink.received.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn history_import_export_and_show() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let history = fixtures().join("history.txt");
    let parsed = parse_history(&std::fs::read_to_string(&history).unwrap(), "h").unwrap();
    assert_eq!(parsed.len(), 2, "the tempfailed message is not reported");
    let first = &parsed[0].1;
    assert_eq!(first.source_ip, "192.0.2.25");
    assert_eq!(first.spf_result, "pass");
    assert!(first.dkim_aligned && !first.spf_aligned);
    assert_eq!(first.dkim.len(), 2);
    assert_eq!(first.dkim[1].result, "fail");
    assert_eq!(first.published.aspf, "s");
    assert_eq!(first.published.sp, "quarantine");
    assert_eq!(
        first.published.rua,
        vec![
            "dmarc@example.com".to_owned(),
            "reports@thirdparty.test!10485760".to_owned()
        ]
    );
    assert_eq!(parsed[1].1.disposition, "reject");

    assert_eq!(
        import_history(&config, dir.path(), &history).await.unwrap(),
        2
    );
    assert_eq!(
        import_history(&config, dir.path(), &history).await.unwrap(),
        0,
        "idempotent"
    );

    let now = 1_790_000_300 + 2 * 86400;
    let shown = show_pending(&config, dir.path(), now).await.unwrap();
    assert!(shown.contains("2 records"), "{shown}");
    assert!(shown.contains("example.com: "), "{shown}");
    assert!(
        shown.contains("1 report(s) due covering 2 message(s)"),
        "{shown}"
    );
    std::fs::write(&config.spool_file, "{}\n{}\n").unwrap();
    let shown = show_pending(&config, dir.path(), now).await.unwrap();
    assert!(
        shown.contains("2 record(s) waiting for the store"),
        "{shown}"
    );
    std::fs::remove_file(&config.spool_file).unwrap();

    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let files = export_reports(&config, dir.path(), &out, now)
        .await
        .unwrap();
    assert_eq!(files.len(), 1);
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("mx.test!example.com!1789948800!1790035199!"),
        "{name}"
    );
    let gz = std::fs::read(&files[0]).unwrap();
    let mut xml = String::new();
    use std::io::Read;
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut xml)
        .unwrap();
    xmllint(&xml);
    // Export marks nothing sent.
    let store = Store::connect(&config.store_url(dir.path())).await.unwrap();
    assert_eq!(store.last_end("example.com").await.unwrap(), None);
    // Expiry removes old rows.
    let mut short = config.clone();
    short.expire_after = postern_common::config::ConfigDuration::from_secs(60);
    assert_eq!(expire(&store, &short, now).await.unwrap(), 2);
    assert_eq!(store.count().await.unwrap(), 0);
}

#[tokio::test]
async fn periods_follow_ri_and_close_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let store = Store::connect(&config.store_url(dir.path())).await.unwrap();
    let hour = 1_790_002_800i64; // a multiple of 3600
    let mut records = fixture_records(hour as u64 + 10).await;
    records.truncate(3);
    records[2].received = hour + 3600 + 5; // the next hour
    records[1].received = hour + 3 * 3600 + 5; // three hours later
    for (i, record) in records.iter_mut().enumerate() {
        record.published.ri = 3600;
        store.insert(&format!("p{i}"), record).await.unwrap();
    }
    // Before the first hour has ended nothing is due.
    assert!(
        build_pending(&store, &config, hour + 3599)
            .await
            .unwrap()
            .is_empty()
    );
    let due = build_pending(&store, &config, hour + 4 * 3600 + 1)
        .await
        .unwrap();
    let periods: Vec<(i64, Option<usize>)> = due
        .iter()
        .map(|(_, end, report)| (*end, report.as_ref().map(|r| r.messages)))
        .collect();
    assert_eq!(
        periods,
        vec![
            (hour + 3600, Some(1)),
            (hour + 7200, Some(1)),
            (hour + 4 * 3600, Some(1)),
        ]
    );
    // With the default interval (no ri=), the same records make one daily report.
    for record in &mut records {
        record.published.ri = 0;
    }
    let dir2 = tempfile::tempdir().unwrap();
    let store2 = Store::connect(&test_config(dir2.path()).store_url(dir2.path()))
        .await
        .unwrap();
    for (i, record) in records.iter().enumerate() {
        store2.insert(&format!("d{i}"), record).await.unwrap();
    }
    let due = build_pending(&store2, &config, hour + 2 * 86400)
        .await
        .unwrap();
    let reports: Vec<&PendingReport> = due.iter().filter_map(|(_, _, r)| r.as_ref()).collect();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].messages, 3);
    assert_eq!(reports[0].end - reports[0].begin, 86400);
    // The empty day after it is closed too, without a report.
    assert_eq!(due.last().unwrap().2.as_ref().map(|r| r.messages), None);
}

#[tokio::test]
async fn recording_rate_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let recorder = Recorder::open(&config, dir.path()).await;
    let record = fixture_records(NOW).await.remove(0);
    let started = std::time::Instant::now();
    for _ in 0..2000 {
        recorder.record(&record).await.unwrap();
    }
    let elapsed = started.elapsed();
    eprintln!(
        "recorded 2000 messages in {elapsed:?} ({:.0}/s)",
        2000.0 / elapsed.as_secs_f64()
    );
    assert_eq!(recorder.store().await.unwrap().count().await.unwrap(), 2000);
    assert!(!dir.path().join("spool").exists());
    // Far below the milter's budget per message even in a debug build on a shared machine.
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
}

/// Recording never checkpoints SQLite's WAL (a checkpoint copies the log into the database
/// file and syncs it, milliseconds inside one message's commit); the background task does.
#[tokio::test]
async fn the_report_store_wal_is_checkpointed_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let record = fixture_records(NOW).await.remove(0);
    let size = |path: &Path| std::fs::metadata(path).unwrap().len();
    // Well past SQLite's automatic checkpoint at 1000 pages of log.
    let write = |store: Store| {
        let record = record.clone();
        async move {
            for round in 0..40 {
                let batch: Vec<(String, ReportRecord)> = (0..250)
                    .map(|i| (format!("r{round}.{i}"), record.clone()))
                    .collect();
                store.insert_batch(&batch).await.unwrap();
            }
        }
    };
    let path = dir.path().join("quiet.sqlite");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let store = Store::connect_checkpointing(
        &url,
        postern_common::sqlite::Checkpoints {
            interval: Duration::from_secs(3600),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let empty = size(&path);
    write(store.clone()).await;
    assert!(
        size(&path.with_extension("sqlite-wal")) > 4_096_000,
        "the log holds more than 1000 pages"
    );
    assert_eq!(size(&path), empty, "a record's commit checkpointed");
    drop(store);

    let path = dir.path().join("reports.sqlite");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let store = Store::connect(&url).await.unwrap();
    let empty = size(&path);
    write(store.clone()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while size(&path) < empty + 1_000_000 {
        assert!(std::time::Instant::now() < deadline, "no checkpoint in 5 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Concurrent callers share writes (group commit), and each returns only once its own record is
/// stored: every record lands exactly once, in the store or, while it is down, in the spool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_records_are_written_together_each_exactly_once() {
    const CALLERS: usize = 64;
    let dir = tempfile::tempdir().unwrap();
    let db_dir = dir.path().join("db");
    let mut config = test_config(dir.path());
    config.store = format!("sqlite://{}?mode=rwc", db_dir.join("store.db").display());
    let template = fixture_records(NOW).await.remove(0);
    let run = |recorder: std::sync::Arc<Recorder>, round: usize| {
        let template = template.clone();
        async move {
            let tasks: Vec<_> = (0..CALLERS)
                .map(|i| {
                    let recorder = recorder.clone();
                    let mut record = template.clone();
                    record.job_id = format!("R{round}Q{i}");
                    tokio::spawn(async move { recorder.record(&record).await })
                })
                .collect();
            for task in tasks {
                task.await.unwrap().unwrap();
            }
        }
    };
    // The store's directory is missing: everything goes to the spool, each record once.
    let recorder = std::sync::Arc::new(Recorder::open(&config, dir.path()).await);
    run(recorder.clone(), 0).await;
    let spool = std::fs::read_to_string(dir.path().join("spool")).unwrap();
    assert_eq!(spool.lines().count(), CALLERS);
    // The store is back: the spool is replayed, then the next round is stored.
    std::fs::create_dir(&db_dir).unwrap();
    assert_eq!(recorder.replay().await.unwrap(), CALLERS);
    run(recorder.clone(), 1).await;
    let store = recorder.store().await.unwrap();
    let mut jobs: Vec<String> = store
        .records("example.com", 0, i64::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.job_id)
        .collect();
    jobs.sort();
    let mut expected: Vec<String> = (0..2)
        .flat_map(|round| (0..CALLERS).map(move |i| format!("R{round}Q{i}")))
        .collect();
    expected.sort();
    assert_eq!(jobs, expected);
    assert!(!dir.path().join("spool").exists());
}

#[tokio::test]
async fn a_down_store_is_retried_only_after_the_retry_interval() {
    let dir = tempfile::tempdir().unwrap();
    let db_dir = dir.path().join("db");
    let mut config = test_config(dir.path());
    config.store = format!("sqlite://{}?mode=rwc", db_dir.join("store.db").display());
    config.store_retry_interval = postern_common::config::ConfigDuration::from_secs(3600);
    let recorder = Recorder::open(&config, dir.path()).await;
    let record = fixture_records(NOW).await.remove(0);
    recorder.record(&record).await.unwrap();
    std::fs::create_dir(&db_dir).unwrap();
    // The store is back, but within the retry interval records keep going to the spool.
    recorder.record(&record).await.unwrap();
    let spool = std::fs::read_to_string(dir.path().join("spool")).unwrap();
    assert_eq!(spool.lines().count(), 2);
    // An explicit replay tries at once.
    assert_eq!(recorder.replay().await.unwrap(), 2);
    assert!(!dir.path().join("spool").exists());
    recorder.record(&record).await.unwrap();
    assert_eq!(recorder.store().await.unwrap().count().await.unwrap(), 3);
}

#[tokio::test]
async fn send_through_sendmail() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let sendmail = dir.path().join("sendmail");
    let out = dir.path().join("mail.out");
    std::fs::write(
        &sendmail,
        format!(
            "#!/bin/sh\necho \"$@\" > {0}.args\ncat > {0}\n",
            out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&sendmail, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut config = test_config(dir.path());
    config.transport = Transport::Sendmail;
    config.sendmail_path = sendmail.clone();
    let store = Store::connect(&config.store_url(dir.path())).await.unwrap();
    let day = 1_758_931_200i64;
    for (i, record) in fixture_records(day as u64).await.iter().enumerate() {
        store.insert(&format!("s{i}"), record).await.unwrap();
    }
    let auth = offline_authenticator();
    let zone = Zone::new();
    let summary = send::send_with(&store, &config, &auth, Some(&zone), day + 86400 + 1)
        .await
        .unwrap();
    assert_eq!((summary.sent, summary.closed), (1, 1), "{summary:?}");
    let args = std::fs::read_to_string(format!("{}.args", out.display())).unwrap();
    assert_eq!(
        args.trim(),
        "-i -f dmarc-noreply@mx.test -- dmarc@example.com"
    );
    let mail = std::fs::read_to_string(&out).unwrap().replace("\r\n", "\n");
    xmllint(&attachment_xml(&mail));

    // A failing sendmail leaves the next period unsent.
    std::fs::write(&sendmail, "#!/bin/sh\necho 'queue full' >&2\nexit 75\n").unwrap();
    for (i, record) in fixture_records(day as u64 + 86400).await.iter().enumerate() {
        store.insert(&format!("t{i}"), record).await.unwrap();
    }
    let summary = send::send_with(&store, &config, &auth, Some(&zone), day + 2 * 86400 + 1)
        .await
        .unwrap();
    assert_eq!((summary.sent, summary.failed, summary.closed), (0, 1, 0));
    assert_eq!(
        store.last_end("example.com").await.unwrap(),
        Some(day + 86400)
    );
}
