//! DMARC end to end through a real Postfix (private instance, `smtpd_milters` as a postmaster
//! writes it) with the test DNS server: a spoofed message for a `p=reject` domain is refused
//! with `550 5.7.1` (reject_failures), messages that pass through aligned SPF or aligned DKIM are
//! delivered with opendmarc's own `dmarc=pass` Authentication-Results header, and the next
//! `postern-milter reports send` (the binary, with the milter's own config file) mails an
//! aggregate report through the same Postfix to the `rua` address, captured by the sink: a gzip
//! attachment named per RFC 7489 §7.2.1.1 whose XML validates against the XSD and counts every
//! message once.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use mail_auth::dkim::{Canonicalization, DkimSigner};
use mail_auth::headers::HeaderWriter;
use postern_milter::dkim::keys::{KeygenAlgorithm, generate, load_key};
use postern_milter::reports::Store;
use postern_tests::daemon::{DaemonProcess, bin, free_port};
use postern_tests::dns::{TestDns, Zone};
use postern_tests::postfix::{self, PostfixInstance};
use postern_tests::smtp::{Delivered, Outgoing};
use serde::Deserialize;

const AUTHSERV_ID: &str = "mx.test.example";
const RUA: &str = "dmarc-reports@dest.example";
/// Messages that pass DMARC through aligned SPF (envelope sender in the From domain).
const SPF_PASSES: usize = 3;
/// Messages that fail SPF alignment but carry a valid aligned DKIM signature.
const DKIM_PASSES: usize = 1;
/// Spoofed messages (SPF passes for an unrelated envelope domain, no signature): rejected.
const SPOOFS: usize = 2;
/// A day: the default report interval, so records moved back by it lie in a closed period.
const DAY_SECS: i64 = 86_400;

fn message(from_header: &str, n: usize) -> Vec<u8> {
    format!(
        "From: Alice <{from_header}>\r\nTo: Bob <bob@dest.example>\r\nSubject: dmarc test {n}\r\n\
         Date: Wed, 25 Nov 2026 07:00:00 +0000\r\nMessage-ID: <dmarc-{n}@example.com>\r\n\r\n\
         Message number {n}.\r\n"
    )
    .into_bytes()
}

/// The message with an Ed25519 DKIM-Signature by `d=example.com; s=ed` prepended.
fn signed(raw: &[u8], key_path: &Path) -> Vec<u8> {
    let key = load_key(key_path, false, 0).unwrap();
    let header = DkimSigner::from_key(key.key)
        .domain("example.com")
        .selector("ed")
        .headers(["From", "To", "Subject", "Date", "Message-ID"])
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed)
        .sign(raw)
        .unwrap()
        .to_header();
    let mut out = header.into_bytes();
    out.extend_from_slice(raw);
    out
}

/// Moves every stored record back by `secs`, as if `reports send` ran that much later (the
/// systemd timer's run on the next day) without the test waiting for the period to end.
async fn age_records(db: &Path, domain: &str, secs: i64) -> usize {
    let store = Store::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let records = store.records(domain, 0, i64::MAX).await.unwrap();
    assert_eq!(
        store.delete_before(i64::MAX).await.unwrap(),
        records.len() as u64
    );
    for (i, mut record) in records.iter().cloned().enumerate() {
        record.received -= secs;
        assert!(store.insert(&format!("aged.{i}"), &record).await.unwrap());
    }
    store.close().await;
    records.len()
}

/// Runs the milter binary with `args` and its config; bounded.
fn run_milter(config: &Path, args: &[&str]) -> (bool, String) {
    let mut child = Command::new(bin("postern-milter"))
        .arg("-c")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("postern-milter {args:?} still running after 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// The attachment of a multipart message: (filename, content type line, decoded bytes).
fn attachment(delivered: &Delivered) -> Option<(String, String, Vec<u8>)> {
    let text = delivered.text().replace("\r\n", "\n");
    let content_type = delivered.headers("Content-Type").into_iter().next()?;
    let boundary = content_type
        .split(';')
        .filter_map(|p| p.trim().strip_prefix("boundary="))
        .next()?
        .trim_matches('"')
        .to_owned();
    for part in text.split(&format!("--{boundary}")).skip(1) {
        let Some((head, body)) = part.trim_start_matches('\n').split_once("\n\n") else {
            continue;
        };
        let unfolded = head.replace("\n ", " ").replace("\n\t", " ");
        let lower = unfolded.to_ascii_lowercase();
        if !lower.contains("attachment") {
            continue;
        }
        let filename = filename(&unfolded)?;
        let ctype = unfolded
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-type:"))?
            .to_owned();
        assert!(
            lower.contains("content-transfer-encoding: base64"),
            "attachment not base64: {head}"
        );
        let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.trim_end_matches('-'))
            .unwrap();
        return Some((filename, ctype, bytes));
    }
    None
}

/// The `filename` parameter of a Content-Disposition, plain or split into RFC 2231
/// continuations (`filename*0="..."; filename*1="..."`, as lettre writes long names).
fn filename(head: &str) -> Option<String> {
    let mut pieces: Vec<(usize, String)> = Vec::new();
    for param in head.split([';', '\n']).map(str::trim) {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"').to_owned();
        if name.eq_ignore_ascii_case("filename") {
            return Some(value);
        }
        if let Some(index) = name.strip_prefix("filename*") {
            pieces.push((index.parse().ok()?, value));
        }
    }
    pieces.sort();
    (!pieces.is_empty()).then(|| pieces.into_iter().map(|(_, v)| v).collect())
}

fn xmllint(xml: &str, dir: &Path) {
    let path = dir.join("report.xml");
    std::fs::write(&path, xml).unwrap();
    let xsd = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/dmarc/rfc7489.xsd");
    let output = Command::new("xmllint")
        .args(["--noout", "--schema"])
        .arg(xsd)
        .arg(&path)
        .output()
        .expect("xmllint (Debian package libxml2-utils) must be installed");
    assert!(
        output.status.success(),
        "XSD validation failed:\n{}\n{xml}",
        String::from_utf8_lossy(&output.stderr)
    );
}

// The parts of the report the test checks, read back with quick-xml.
#[derive(Debug, Deserialize)]
struct FeedbackIn {
    report_metadata: MetadataIn,
    policy_published: PolicyIn,
    record: Vec<RecordIn>,
}

#[derive(Debug, Deserialize)]
struct MetadataIn {
    org_name: String,
    email: String,
    report_id: String,
    date_range: RangeIn,
}

#[derive(Debug, Deserialize)]
struct RangeIn {
    begin: i64,
    end: i64,
}

#[derive(Debug, Deserialize)]
struct PolicyIn {
    domain: String,
    p: String,
    pct: u8,
}

#[derive(Debug, Deserialize)]
struct RecordIn {
    row: RowIn,
    identifiers: IdentifiersIn,
    auth_results: AuthIn,
}

#[derive(Debug, Deserialize)]
struct RowIn {
    source_ip: String,
    count: u64,
    policy_evaluated: EvaluatedIn,
}

#[derive(Debug, Deserialize)]
struct EvaluatedIn {
    disposition: String,
    dkim: String,
    spf: String,
}

#[derive(Debug, Deserialize)]
struct IdentifiersIn {
    envelope_from: String,
    header_from: String,
}

#[derive(Debug, Deserialize)]
struct AuthIn {
    #[serde(default)]
    dkim: Vec<DkimIn>,
    spf: Vec<SpfIn>,
}

#[derive(Debug, Deserialize)]
struct DkimIn {
    domain: String,
    selector: String,
    result: String,
}

#[derive(Debug, Deserialize)]
struct SpfIn {
    domain: String,
    scope: String,
    result: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_rejects_spoofs_marks_passes_and_mails_the_aggregate_report() {
    if !postern_tests::require(
        postfix::available().is_ok(),
        &format!("{:?}", postfix::available()),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let generated = generate(KeygenAlgorithm::Ed25519, "example.com", "ed").unwrap();
    let key_path = dir.path().join("ed.private");
    std::fs::write(&key_path, &generated.private_pem).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut zone = Zone::new();
    for (name, value) in [
        ("example.com", "v=spf1 ip4:127.0.0.0/8 -all"),
        (
            "_dmarc.example.com",
            &format!("v=DMARC1; p=reject; rua=mailto:{RUA}"),
        ),
        // RFC 7489 §7.1: dest.example agrees to receive example.com's reports.
        ("example.com._report._dmarc.dest.example", "v=DMARC1"),
        ("ed._domainkey.example.com", &generated.record),
        // The spoofer's own domain: SPF passes, but it is not aligned with example.com.
        ("other.example", "v=spf1 ip4:127.0.0.0/8 -all"),
    ] {
        zone.add(name, "TXT", value).unwrap();
    }
    let dns = TestDns::start(zone).await.unwrap();

    let m = free_port();
    let postfix: PostfixInstance = PostfixInstance::builder()
        .main_cf(format!("smtpd_milters = inet:127.0.0.1:{m}"))
        .main_cf("non_smtpd_milters = $smtpd_milters")
        .relay_domains("dest.example")
        .start()
        .await
        .unwrap();
    let milter = DaemonProcess::start(
        "milter",
        &format!(
            "state_dir = \"@STATE@\"\nlisten = \"inet:127.0.0.1:{m}\"\nauthserv_id = \"{AUTHSERV_ID}\"\n\
             [dmarc]\nreject_failures = true\nignore_hosts = []\n\
             [dmarc.reports]\norg_name = \"Postern Test\"\nemail = \"dmarc-noreply@test.example\"\n\
             receiver = \"{AUTHSERV_ID}\"\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {}\nsmtp_timeout = \"20s\"\n\
             [dns]\nnameservers = [\"{}\"]\n",
            postfix.smtp_addr().port(),
            dns.addr()
        ),
        &[m],
    )
    .unwrap();

    // (a) Spoofs: From example.com, envelope and SPF from other.example, no signature.
    for n in 0..SPOOFS {
        let transcript = postfix
            .send(&Outgoing {
                helo: "client.other.example".into(),
                from: "spoofer@other.example".into(),
                to: vec!["bob@dest.example".into()],
                data: message("ceo@example.com", 100 + n),
            })
            .await
            .unwrap();
        let reply = transcript
            .reply_to(".")
            .unwrap_or_else(|| panic!("no end-of-data reply: {transcript:?}"));
        assert_eq!(
            reply.line(),
            "550 5.7.1 rejected by DMARC policy for example.com",
            "{transcript:?}\n{}\n{}",
            postfix.maillog(),
            milter.log()
        );
    }

    // (b) Passes: aligned SPF, then aligned DKIM with an unaligned envelope sender.
    let mut outgoing = Vec::new();
    for n in 0..SPF_PASSES {
        outgoing.push(Outgoing {
            helo: "client.example.com".into(),
            from: "alice@example.com".into(),
            to: vec!["bob@dest.example".into()],
            data: message("alice@example.com", n),
        });
    }
    for n in 0..DKIM_PASSES {
        outgoing.push(Outgoing {
            helo: "list.other.example".into(),
            from: "bounces@other.example".into(),
            to: vec!["bob@dest.example".into()],
            data: signed(&message("alice@example.com", 10 + n), &key_path),
        });
    }
    for out in &outgoing {
        let transcript = postfix.send(out).await.unwrap();
        assert!(
            transcript.accepted(),
            "{transcript:?}\n{}\n{}",
            postfix.maillog(),
            milter.log()
        );
    }
    let delivered = postfix
        .wait_delivered(outgoing.len(), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(delivered.len(), SPF_PASSES + DKIM_PASSES);
    let expected = format!("{AUTHSERV_ID}; dmarc=pass (p=reject dis=none) header.from=example.com");
    for got in &delivered {
        let results = got.headers("Authentication-Results");
        assert!(
            results.contains(&expected),
            "no {expected:?} among {results:#?}\n{}",
            got.text()
        );
        // Its own header: not merged into the DKIM or SPF results.
        assert!(
            results
                .iter()
                .filter(|r| r.contains("dmarc="))
                .all(|r| !r.contains("dkim=") && !r.contains("spf=")),
            "{results:#?}"
        );
    }
    let signed_one = delivered
        .iter()
        .find(|d| d.mail_from == "bounces@other.example")
        .unwrap();
    assert!(
        signed_one
            .headers("Authentication-Results")
            .iter()
            .any(|r| r.contains("dkim=pass") && r.contains("header.d=example.com")),
        "{}",
        signed_one.text()
    );

    // (c) The report. Every evaluated message was recorded before Postfix got its answer.
    let db = milter.dir.path().join("state/dmarc-reports.db");
    let total = SPF_PASSES + DKIM_PASSES + SPOOFS;
    assert_eq!(age_records(&db, "example.com", DAY_SECS).await, total);
    let (ok, out) = run_milter(&milter.config_path, &["reports", "send"]);
    assert!(ok, "reports send failed: {out}\n{}", postfix.maillog());
    assert_eq!(
        out.lines().last().unwrap_or(""),
        "sent 1, failed 0, skipped 0, periods closed 1",
        "{out}"
    );
    let all = postfix
        .wait_delivered(delivered.len() + 1, Duration::from_secs(30))
        .await
        .unwrap();
    let report = all
        .iter()
        .find(|d| d.rcpt_to == [RUA])
        .unwrap_or_else(|| panic!("no report mail among {all:#?}"));
    assert_eq!(report.mail_from, "dmarc-noreply@test.example");
    let subject = report.headers("Subject").join(" ");
    let (filename, content_type, gz) = attachment(report)
        .unwrap_or_else(|| panic!("no attachment in the report:\n{}", report.text()));
    assert!(
        content_type
            .to_ascii_lowercase()
            .contains("application/gzip"),
        "{content_type}"
    );
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "not gzip");
    let mut xml = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut xml)
        .unwrap();
    xmllint(&xml, dir.path());
    let feedback: FeedbackIn = quick_xml::de::from_str(&xml).unwrap();
    let range = &feedback.report_metadata.date_range;

    // RFC 7489 §7.2.1.1: filename receiver!policy-domain!begin!end[!unique].xml.gz, subject
    // "Report Domain: <domain> Submitter: <org> Report-ID: <<id>>".
    let parts: Vec<&str> = filename.trim_end_matches(".xml.gz").split('!').collect();
    assert!(filename.ends_with(".xml.gz"), "{filename}");
    assert_eq!(parts.len(), 5, "{filename}");
    assert_eq!(parts[0], AUTHSERV_ID);
    assert_eq!(parts[1], "example.com");
    assert_eq!(parts[2], range.begin.to_string());
    assert_eq!(parts[3], range.end.to_string());
    assert_eq!(
        subject,
        format!(
            "Report Domain: example.com Submitter: Postern Test Report-ID: <{}>",
            feedback.report_metadata.report_id
        )
    );
    assert_eq!(feedback.report_metadata.org_name, "Postern Test");
    assert_eq!(feedback.report_metadata.email, "dmarc-noreply@test.example");
    assert_eq!(range.end - range.begin, DAY_SECS - 1);
    assert_eq!(
        range.begin % DAY_SECS,
        0,
        "periods are aligned to the interval"
    );
    assert_eq!(feedback.policy_published.domain, "example.com");
    assert_eq!(feedback.policy_published.p, "reject");
    assert_eq!(feedback.policy_published.pct, 100);

    // Exact counts: one row per distinct outcome.
    let count = |disposition: &str, dkim: &str, spf: &str| -> u64 {
        feedback
            .record
            .iter()
            .filter(|r| {
                let e = &r.row.policy_evaluated;
                e.disposition == disposition && e.dkim == dkim && e.spf == spf
            })
            .map(|r| r.row.count)
            .sum()
    };
    assert_eq!(count("none", "fail", "pass"), SPF_PASSES as u64, "{xml}");
    assert_eq!(count("none", "pass", "fail"), DKIM_PASSES as u64, "{xml}");
    assert_eq!(count("reject", "fail", "fail"), SPOOFS as u64, "{xml}");
    assert_eq!(
        feedback.record.iter().map(|r| r.row.count).sum::<u64>(),
        total as u64,
        "{xml}"
    );
    for record in &feedback.record {
        assert_eq!(record.row.source_ip, "127.0.0.1");
        assert_eq!(record.identifiers.header_from, "example.com");
        let spf = &record.auth_results.spf[0];
        assert_eq!((spf.scope.as_str(), spf.result.as_str()), ("mfrom", "pass"));
        assert_eq!(spf.domain, record.identifiers.envelope_from);
        if record.row.policy_evaluated.dkim == "pass" {
            let dkim = &record.auth_results.dkim[0];
            assert_eq!(
                (
                    dkim.domain.as_str(),
                    dkim.selector.as_str(),
                    dkim.result.as_str()
                ),
                ("example.com", "ed", "pass")
            );
            assert_eq!(record.identifiers.envelope_from, "other.example");
        }
    }

    // Sent means sent: a second run finds nothing due and mails nothing.
    let (ok, out) = run_milter(&milter.config_path, &["reports", "send"]);
    assert!(ok, "{out}");
    assert_eq!(
        out.lines().last().unwrap_or(""),
        "sent 0, failed 0, skipped 0, periods closed 0",
        "{out}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(postfix.sink.messages().len(), all.len());
}
