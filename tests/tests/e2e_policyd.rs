//! postern-policyd end to end through the real Postfix, configured with the lines Postern
//! documents (deploy/postfix/main.cf and master.cf, the same as README.md), DNS from the test
//! server: greylisting defers the first attempt with postgrey's `450 4.2.0 ... Greylisted`, the
//! retry after the delay is accepted and carries one X-Greylist header; SPF rejects a failing
//! sender with `550 5.7.23` and prepends one Received-SPF header to a passing one, next to the
//! X-Greylist header when both checks are configured; and `--stdio` works as a Postfix `spawn`
//! service, the way policyd-spf is run, its answers clean although spawn makes stderr the same
//! socket as stdout.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use postern_tests::daemon::{self, DaemonProcess, free_port};
use postern_tests::dns::{TestDns, Zone};
use postern_tests::postfix::{self, PostfixInstance};
use postern_tests::smtp::{Delivered, Outgoing, Transcript};

/// The shipped Postfix snippets: the tests configure Postfix with exactly these lines.
const DEPLOY_MAIN_CF: &str = include_str!("../../deploy/postfix/main.cf");
const DEPLOY_MASTER_CF: &str = include_str!("../../deploy/postfix/master.cf");
const README: &str = include_str!("../../README.md");

/// Short enough for a test, long enough that an early retry is seen and deferred.
const DELAY: Duration = Duration::from_secs(2);
/// How often a greylisted client retries here, and for how long at most.
const RETRY_EVERY: Duration = Duration::from_millis(500);
const RETRY_FOR: Duration = Duration::from_secs(20);

/// pass.example allows loopback (where the test client connects from), fail.example does not.
const ZONE: &str = r#"
pass.example        TXT "v=spf1 ip4:127.0.0.0/8 -all"
fail.example        TXT "v=spf1 ip4:192.0.2.1 -all"
"#;

/// The `name = value` setting of a main.cf text, with its indented continuation lines.
fn main_cf_setting(text: &str, name: &str) -> String {
    let mut lines = text.lines().skip_while(|line| {
        line.split_once('=')
            .is_none_or(|(key, _)| key.trim() != name || line.starts_with([' ', '\t', '#']))
    });
    let mut setting = lines
        .next()
        .unwrap_or_else(|| panic!("{name} not found"))
        .to_owned();
    for line in lines.take_while(|line| line.starts_with([' ', '\t'])) {
        setting.push('\n');
        setting.push_str(line);
    }
    setting
}

/// The documented policyd lines of main.cf (smtpd_recipient_restrictions and the policy
/// service settings), pointed at `port` instead of postgrey's 10023.
fn documented_main_cf(port: u16) -> Vec<String> {
    let mut lines = vec![main_cf_setting(
        DEPLOY_MAIN_CF,
        "smtpd_recipient_restrictions",
    )];
    for name in [
        "smtpd_policy_service_timeout",
        "smtpd_policy_service_default_action",
    ] {
        lines.push(main_cf_setting(DEPLOY_MAIN_CF, name));
    }
    lines
        .into_iter()
        .map(|line| line.replace("127.0.0.1:10023", &format!("127.0.0.1:{port}")))
        .collect()
}

/// Whitespace collapsed, for comparing the same setting written over different lines.
fn normalised(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A Postfix that passes the test client (127.0.0.1) to the policy server: mynetworks holds
/// only 127.0.0.2, so permit_mynetworks does not skip it.
async fn start_postfix(main_cf: Vec<String>, master_cf: Option<String>) -> PostfixInstance {
    let mut builder = PostfixInstance::builder().mynetworks("127.0.0.2/32");
    for line in main_cf {
        builder = builder.main_cf(line);
    }
    if let Some(line) = master_cf {
        builder = builder.master_cf(line);
    }
    builder.start().await.unwrap()
}

fn message(from: &str, to: &[String], subject: &str) -> Vec<u8> {
    format!(
        "From: <{from}>\r\nTo: {}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@pass.example>\r\n\
         Date: Wed, 25 Nov 2026 10:00:00 +0000\r\n\r\nHello from the policyd end-to-end test.\r\n",
        to.iter()
            .map(|t| format!("<{t}>"))
            .collect::<Vec<_>>()
            .join(", ")
    )
    .into_bytes()
}

fn outgoing(helo: &str, from: &str, to: &[&str], subject: &str) -> Outgoing {
    let to: Vec<String> = to.iter().map(|t| (*t).to_owned()).collect();
    Outgoing {
        helo: helo.into(),
        from: from.into(),
        data: message(from, &to, subject),
        to,
    }
}

/// The replies to the RCPT commands, in order.
fn rcpt_replies(transcript: &Transcript) -> Vec<&postern_tests::smtp::Reply> {
    transcript
        .exchanges
        .iter()
        .filter(|(cmd, _)| cmd.starts_with("RCPT"))
        .map(|(_, reply)| reply)
        .collect()
}

/// Asserts every recipient of `transcript` got postgrey's greylisting answer through Postfix.
fn assert_greylisted(transcript: &Transcript, outgoing: &Outgoing, log: &str) {
    let replies = rcpt_replies(transcript);
    assert_eq!(replies.len(), outgoing.to.len(), "{transcript:?}");
    for (reply, to) in replies.iter().zip(&outgoing.to) {
        assert_eq!(reply.code, 450, "{transcript:?}\n{log}");
        let expected = format!(
            "4.2.0 <{to}>: Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/dest.example.html"
        );
        assert_eq!(reply.text, expected, "{transcript:?}");
    }
    assert!(transcript.reply_to("DATA").is_none(), "{transcript:?}");
}

/// Sends like a client facing greylisting: after a deferred first attempt, retries every
/// RETRY_EVERY (bounded by RETRY_FOR) until the message is accepted. Returns every attempt and
/// the time from the first attempt to the accepted one.
///
/// The first attempt starts early in a wall-clock second: greylisting counts whole seconds, so
/// recipients first seen on both sides of a second boundary would pass one retry apart, and the
/// message would be accepted for some recipients only (a real client then retries the rest).
async fn send_until_accepted(
    postfix: &PostfixInstance,
    outgoing: &Outgoing,
) -> (Vec<Transcript>, Duration) {
    let into_second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_millis();
    if into_second > 100 {
        tokio::time::sleep(Duration::from_millis(u64::from(1_010 - into_second))).await;
    }
    let started = Instant::now();
    let mut attempts = Vec::new();
    loop {
        let transcript = postfix.send(outgoing).await.unwrap();
        let accepted = transcript.accepted();
        attempts.push(transcript);
        if accepted {
            return (attempts, started.elapsed());
        }
        assert!(
            started.elapsed() < RETRY_FOR,
            "not accepted within {RETRY_FOR:?}: {attempts:#?}\n{}",
            postfix.maillog()
        );
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

/// The X-Greylist header postern-policyd adds with postgrey's template, checked field by field;
/// returns the delay it states.
fn assert_x_greylist(got: &Delivered) -> u64 {
    let headers = got.headers("X-Greylist");
    assert_eq!(headers.len(), 1, "one X-Greylist header: {}", got.text());
    let rest = headers[0]
        .strip_prefix("delayed ")
        .unwrap_or_else(|| panic!("{headers:?}"));
    let (seconds, rest) = rest.split_once(' ').unwrap();
    assert!(
        rest.starts_with("seconds by postgrey-1.37 at mx.test.example; ") && rest.ends_with(" UTC"),
        "{headers:?}"
    );
    seconds.parse().unwrap()
}

fn policyd_config(port: u16, dns: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "state_dir = \"@STATE@\"\n[[listen]]\naddress = \"inet:127.0.0.1:{port}\"\n\
         [dns]\nnameservers = [\"{dns}\"]\ntimeout = \"2s\"\nattempts = 1\n{extra}"
    )
}

/// Greylisting as shipped (SQLite store, postgrey's texts and X-Greylist header) with a 2 s
/// delay; SPF also checks loopback clients (its default skips them, and the test client is one).
fn greylist_and_spf_tables() -> String {
    format!(
        "[greylist]\ndelay = {}\nhostname = \"mx.test.example\"\n[spf]\nskip_addresses = []\n",
        DELAY.as_secs()
    )
}

#[test]
fn readme_and_deploy_snippets_document_the_same_policyd_lines() {
    // README's main.cf block and deploy/postfix/main.cf give the same restriction list, which
    // is the one the tests below run with.
    let readme_main = README
        .split("`main.cf`:")
        .nth(1)
        .and_then(|rest| rest.split("```").nth(1))
        .expect("README has a main.cf block");
    assert_eq!(
        normalised(&main_cf_setting(
            readme_main,
            "smtpd_recipient_restrictions"
        )),
        normalised(&main_cf_setting(
            DEPLOY_MAIN_CF,
            "smtpd_recipient_restrictions"
        ))
    );
    // The spawn service has the same name and runs the same program in both.
    let service = |text: &str| {
        let start = text
            .find("policyd-spf  unix")
            .expect("a policyd-spf spawn service");
        normalised(text[start..].split("\n\n").next().unwrap_or(""))
    };
    let readme_service = service(README);
    let deploy_service = service(DEPLOY_MASTER_CF);
    for text in [&readme_service, &deploy_service] {
        assert!(
            text.starts_with(
                "policyd-spf unix - n n - 0 spawn user=postern argv=/usr/sbin/postern-policyd --stdio"
            ),
            "{text}"
        );
    }
    assert!(README.contains("check_policy_service unix:private/policyd-spf"));
    assert!(DEPLOY_MASTER_CF.contains("check_policy_service unix:private/policyd-spf"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greylisting_defers_then_accepts_with_one_x_greylist_header() {
    if !postern_tests::require(
        postfix::available().is_ok(),
        &format!("{:?}", postfix::available()),
    ) {
        return;
    }
    let dns = TestDns::start(Zone::parse(ZONE).unwrap()).await.unwrap();
    let port = free_port();
    let policyd = DaemonProcess::start(
        "policyd",
        &policyd_config(
            port,
            dns.addr(),
            &format!(
                "[greylist]\ndelay = {}\nhostname = \"mx.test.example\"\n",
                DELAY.as_secs()
            ),
        ),
        &[port],
    )
    .unwrap();
    // Greylisting alone: postgrey's line, `check_policy_service inet:127.0.0.1:10023`.
    let postfix = start_postfix(
        vec![format!(
            "smtpd_recipient_restrictions = permit_mynetworks, permit_sasl_authenticated, \
             reject_unauth_destination, check_policy_service inet:127.0.0.1:{port}"
        )],
        None,
    )
    .await;

    let mail = outgoing(
        "mail.sender.example",
        "alice@sender.example",
        &["bob@dest.example", "carol@dest.example"],
        "greylisted",
    );
    let (attempts, waited) = send_until_accepted(&postfix, &mail).await;
    // The first attempt and every retry before the delay are deferred for every recipient;
    // the retries show the delay is enforced, not just "the second attempt passes".
    assert!(attempts.len() >= 3, "{attempts:#?}");
    for attempt in &attempts[..attempts.len() - 1] {
        assert_greylisted(attempt, &mail, &policyd.log());
    }
    // postgrey's clock (and ours) counts whole seconds: a first attempt late in one second is
    // "2 s old" a little over 1 s later.
    assert!(
        waited > DELAY - Duration::from_secs(1),
        "accepted after {waited:?}"
    );
    let accepted = attempts.last().unwrap();
    assert!(
        rcpt_replies(accepted).iter().all(|r| r.code == 250),
        "{accepted:?}"
    );

    let delivered = postfix
        .wait_delivered(1, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(delivered.len(), 1);
    let got = &delivered[0];
    assert_eq!(got.mail_from, "alice@sender.example");
    assert_eq!(got.rcpt_to, vec!["bob@dest.example", "carol@dest.example"]);
    assert_eq!(got.headers("Subject"), vec!["greylisted"]);
    // One header for the message, although both recipients passed; its delay is the real one.
    let stated = assert_x_greylist(got);
    assert!(
        (DELAY.as_secs()..=RETRY_FOR.as_secs()).contains(&stated),
        "X-Greylist states {stated} s"
    );
    assert!(got.data.ends_with(&mail.data), "{}", got.text());

    let log = policyd.log();
    for reason in [
        "reason=new",
        "reason=early-retry",
        "reason=triplet found, delay=",
    ] {
        assert!(log.contains(reason), "{reason:?} not logged:\n{log}");
    }
    assert!(
        !postfix.maillog().contains("warning"),
        "{}",
        postfix.maillog()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spf_rejects_a_failing_sender_and_heads_a_passing_one_next_to_x_greylist() {
    if !postern_tests::require(
        postfix::available().is_ok(),
        &format!("{:?}", postfix::available()),
    ) {
        return;
    }
    let dns = TestDns::start(Zone::parse(ZONE).unwrap()).await.unwrap();
    let port = free_port();
    let policyd = DaemonProcess::start(
        "policyd",
        &policyd_config(port, dns.addr(), &greylist_and_spf_tables()),
        &[port],
    )
    .unwrap();
    // The documented lines: SPF first (policy_context=spf), then greylisting on the same port.
    let main_cf = documented_main_cf(port);
    assert!(
        main_cf[0].contains(&format!(
            "check_policy_service {{ inet:127.0.0.1:{port}, policy_context=spf }}"
        )),
        "{main_cf:?}"
    );
    let postfix = start_postfix(main_cf, None).await;

    // 1. SPF fails: rejected at RCPT with policyd-spf's answer, before greylisting is asked.
    let forged = outgoing(
        "mail.fail.example",
        "mallory@fail.example",
        &["bob@dest.example"],
        "forged",
    );
    let transcript = postfix.send(&forged).await.unwrap();
    let reply = transcript.reply_to("RCPT").unwrap();
    assert_eq!(reply.code, 550, "{transcript:?}\n{}", policyd.log());
    assert_eq!(
        reply.text,
        "5.7.23 <bob@dest.example>: Recipient address rejected: Message rejected due to: SPF fail - not authorized. \
         Please see http://www.openspf.net/Why?s=mfrom;id=mallory@fail.example;ip=127.0.0.1;r=dest.example"
    );
    assert!(transcript.reply_to("DATA").is_none(), "{transcript:?}");
    policyd
        .wait_log("sender=\"mallory@fail.example\"", Duration::from_secs(5))
        .unwrap();
    let log = policyd.log();
    assert!(
        !log.lines()
            .any(|l| l.contains("mallory@fail.example") && l.contains("check=\"greylist\"")),
        "greylisting was asked about a rejected sender:\n{log}"
    );

    // 2. SPF passes: greylisted first, then delivered once to all three recipients with one
    // Received-SPF and one X-Greylist header.
    let recipients = [
        "bob@dest.example",
        "carol@dest.example",
        "dave@dest.example",
    ];
    let mail = outgoing(
        "client.pass.example",
        "alice@pass.example",
        &recipients,
        "spf-pass",
    );
    let (attempts, _) = send_until_accepted(&postfix, &mail).await;
    assert!(attempts.len() >= 2, "{attempts:#?}");
    assert_greylisted(&attempts[0], &mail, &policyd.log());
    let delivered = postfix
        .wait_delivered(1, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(delivered.len(), 1, "one message, however many recipients");
    let got = &delivered[0];
    assert_eq!(got.rcpt_to, recipients);
    assert_eq!(
        got.headers("Received-SPF"),
        vec![
            "Pass (mailfrom) identity=mailfrom; client-ip=127.0.0.1; helo=client.pass.example; \
             envelope-from=alice@pass.example; receiver=dest.example"
        ],
        "{}",
        got.text()
    );
    assert_x_greylist(got);
    assert!(got.data.ends_with(&mail.data), "{}", got.text());
    // Postfix 3.7 sent policy_context from the `{ ..., policy_context=spf }` form: the same
    // listener ran SPF for one line and greylisting (its configured check) for the other.
    let log = policyd.log();
    for check in ["check=\"spf\"", "check=\"greylist\""] {
        assert!(
            log.lines()
                .any(|l| l.contains("sender=\"alice@pass.example\"") && l.contains(check)),
            "no {check} decision for alice:\n{log}"
        );
    }
    assert!(
        !postfix.maillog().contains("warning"),
        "{}",
        postfix.maillog()
    );
}

/// What spawn(8) gives the program: stdin, stdout and stderr all one socket. With debug logging
/// on, the socket must still carry nothing but the answers, byte for byte, up to the end (the
/// log lines go to syslog, or nowhere without one). No Postfix needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_answers_stay_clean_when_stderr_is_the_socket() {
    use std::io::{Read, Write};
    let dns = TestDns::start(Zone::parse(ZONE).unwrap()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("policyd.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\n[dns]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\nattempts = 1\n\
             [greylist]\nstore = \"memory:\"\n[spf]\nskip_addresses = []\n[log]\nlevel = \"debug\"\n",
            dir.path().join("state").display().to_string(),
            dns.addr()
        ),
    )
    .unwrap();
    let (mut client, server) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut child = Command::new(daemon::bin("postern-policyd"))
        .arg("--stdio")
        .arg("-c")
        .arg(&config)
        .env_remove("POSTERN_LOG")
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            server.try_clone().unwrap(),
        )))
        .stdout(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            server.try_clone().unwrap(),
        )))
        .stderr(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            server,
        )))
        .spawn()
        .unwrap();
    let request = |helo: &str, sender: &str, instance: &str| {
        format!(
            "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n\
             client_address=127.0.0.1\nclient_name=localhost\nhelo_name={helo}\nsender={sender}\n\
             recipient=bob@dest.example\ninstance={instance}\nqueue_id=\n\n"
        )
    };
    client
        .write_all(request("mail.fail.example", "mallory@fail.example", "a.1").as_bytes())
        .unwrap();
    client
        .write_all(request("client.pass.example", "alice@pass.example", "b.1").as_bytes())
        .unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    // Everything the program writes until it exits at the end of its input.
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut out = String::new();
    client.read_to_string(&mut out).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        out,
        "action=550 5.7.23 Message rejected due to: SPF fail - not authorized. Please see \
         http://www.openspf.net/Why?s=mfrom;id=mallory@fail.example;ip=127.0.0.1;r=dest.example\n\n\
         action=prepend Received-SPF: Pass (mailfrom) identity=mailfrom; client-ip=127.0.0.1; \
         helo=client.pass.example; envelope-from=alice@pass.example; receiver=dest.example \n\n"
    );
    assert!(status.success(), "{status}");
}

/// A directory, config and binary the spawn user (nobody) can read: the test's own temp dirs
/// are private to root.
struct SpawnFiles {
    _dir: tempfile::TempDir,
    binary: PathBuf,
    config: PathBuf,
}

fn spawn_files(dns: std::net::SocketAddr) -> SpawnFiles {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("postern-spawn-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let binary = dir.path().join("postern-policyd");
    std::fs::copy(daemon::bin("postern-policyd"), &binary).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let status = Command::new("chown")
        .arg("nobody")
        .arg(&state)
        .status()
        .unwrap();
    assert!(status.success());
    let config = dir.path().join("policyd.toml");
    // Debug logging on purpose: spawn(8) connects stderr to the same socket as stdout, so any
    // log line written there would corrupt the answers Postfix reads.
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\n[dns]\nnameservers = [\"{dns}\"]\ntimeout = \"2s\"\nattempts = 1\n\
             [greylist]\nstore = \"memory:\"\n[spf]\nskip_addresses = []\n[log]\nlevel = \"debug\"\n",
            state.display().to_string()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    SpawnFiles {
        _dir: dir,
        binary,
        config,
    }
}

/// deploy/postfix/master.cf's spawn service, run as nobody with the test's binary and config.
fn documented_spawn_service(files: &SpawnFiles) -> String {
    let start = DEPLOY_MASTER_CF
        .find("policyd-spf  unix")
        .expect("spawn service");
    let service: String = DEPLOY_MASTER_CF[start..]
        .lines()
        .take_while(|line| !line.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let replaced = service
        .replace("user=postern", "user=nobody")
        .replace(
            "/usr/sbin/postern-policyd",
            &files.binary.display().to_string(),
        )
        .replace(
            "/etc/postern/policyd.toml",
            &files.config.display().to_string(),
        );
    assert!(
        replaced.contains(&format!(
            "user=nobody argv={} --stdio -c {}",
            files.binary.display(),
            files.config.display()
        )),
        "{replaced}"
    );
    replaced
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_mode_serves_spf_as_a_postfix_spawn_service() {
    if !postern_tests::require(
        postfix::available().is_ok(),
        &format!("{:?}", postfix::available()),
    ) {
        return;
    }
    let dns = TestDns::start(Zone::parse(ZONE).unwrap()).await.unwrap();
    let files = spawn_files(dns.addr());
    let postfix = start_postfix(
        vec![
            "smtpd_recipient_restrictions = permit_mynetworks, permit_sasl_authenticated, \
             reject_unauth_destination, check_policy_service unix:private/policyd-spf"
                .to_owned(),
            "policyd-spf_time_limit = 3600".to_owned(),
        ],
        Some(documented_spawn_service(&files)),
    )
    .await;

    let forged = outgoing(
        "mail.fail.example",
        "mallory@fail.example",
        &["bob@dest.example"],
        "forged",
    );
    let transcript = postfix.send(&forged).await.unwrap();
    let reply = transcript.reply_to("RCPT").unwrap();
    assert_eq!(reply.code, 550, "{transcript:?}\n{}", postfix.maillog());
    assert!(
        reply.text.starts_with(
            "5.7.23 <bob@dest.example>: Recipient address rejected: Message rejected due to: SPF fail - not authorized."
        ),
        "{reply:?}"
    );

    let recipients = ["bob@dest.example", "carol@dest.example"];
    let mail = outgoing(
        "client.pass.example",
        "alice@pass.example",
        &recipients,
        "spawned",
    );
    let transcript = postfix.send(&mail).await.unwrap();
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
    assert_eq!(got.rcpt_to, recipients);
    assert_eq!(
        got.headers("Received-SPF"),
        vec![
            "Pass (mailfrom) identity=mailfrom; client-ip=127.0.0.1; helo=client.pass.example; \
             envelope-from=alice@pass.example; receiver=dest.example"
        ],
        "{}",
        got.text()
    );
    assert!(got.headers("X-Greylist").is_empty(), "{}", got.text());
    // Postfix talked to the spawned process without a hitch: no malformed answers, no
    // abnormal exits.
    let maillog = postfix.maillog();
    assert!(!maillog.contains("warning"), "{maillog}");
    drop(files);
}
