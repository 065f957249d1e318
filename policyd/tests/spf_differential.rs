//! Differential test against Debian's policyd-spf (postfix-policyd-spf-python 3.0.4): the same
//! requests, answered by both through the same DNS server on loopback, must get byte-identical
//! answers, under policyd-spf's default settings and under a stricter Authentication-Results
//! setup. policyd-spf is pointed at the test server by setting pydns's defaults before its main
//! loop starts. Needs /usr/bin/policyd-spf (tests/run.sh installs the Debian package).

mod spf_common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const POLICYD_SPF: &str = "/usr/bin/policyd-spf";

fn zone() -> spf_common::Zone {
    let data = serde_json::json!({
        "sender.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}],
        "mail.sender.example": [{"TXT": "v=spf1 a -all"}, {"A": "192.0.2.25"}],
        "fail.example": [{"TXT": "v=spf1 -all"}],
        "soft.example": [{"TXT": "v=spf1 ~all"}],
        "neutral.example": [{"TXT": "v=spf1 ?all"}],
        "none.example": [{"A": "192.0.2.99"}],
        "perm.example": [{"TXT": "v=spf1 foo -all"}],
        "perm2.example": [{"TXT": "v=spf1 include:nowhere.example -all"}],
        "exp.example": [{"TXT": "v=spf1 -all exp=why.exp.example"}],
        "why.exp.example": [{"TXT": "%{i} is not allowed to send for %{d}"}],
        "badhelo.example": [{"TXT": "v=spf1 -all"}],
        "mx.example": [{"TXT": "v=spf1 mx -all"}, {"MX": [10, "mail.sender.example"]}],
    });
    spf_common::load_zone(data.as_object().expect("zone"))
}

/// client, helo, sender, recipient.
const CASES: &[(&str, &str, &str, &str)] = &[
    (
        "192.0.2.25",
        "mail.sender.example",
        "user@sender.example",
        "rcpt@dest.example",
    ),
    (
        "192.0.2.25",
        "mail.sender.example",
        "user@fail.example",
        "rcpt@dest.example",
    ),
    (
        "192.0.2.25",
        "mail.sender.example",
        "user@soft.example",
        "rcpt@dest.example",
    ),
    (
        "192.0.2.25",
        "mail.sender.example",
        "user@neutral.example",
        "rcpt@dest.example",
    ),
    (
        "192.0.2.25",
        "mail.sender.example",
        "user@none.example",
        "rcpt@dest.example",
    ),
    (
        "192.0.2.25",
        "none.example",
        "user@none.example",
        "rcpt@dest.example",
    ),
    (
        "192.0.2.25",
        "mail.sender.example",
        "user@perm.example",
        "rcpt@dest.example",
    ),
    (
        "192.0.2.25",
        "mail.sender.example",
        "user@perm2.example",
        "rcpt@dest.example",
    ),
    (
        "192.0.2.25",
        "mail.sender.example",
        "user@exp.example",
        "rcpt@dest.example",
    ),
    (
        "192.0.2.25",
        "badhelo.example",
        "user@sender.example",
        "rcpt@dest.example",
    ),
    ("192.0.2.25", "badhelo.example", "", "rcpt@dest.example"),
    ("192.0.2.25", "mail.sender.example", "", "rcpt@dest.example"),
    ("192.0.2.25", "none.example", "", "rcpt@dest.example"),
    (
        "192.0.2.25",
        "mail.sender.example",
        "user@mx.example",
        "rcpt@dest.example",
    ),
    (
        "198.51.100.1",
        "mail.sender.example",
        "user@mx.example",
        "rcpt@dest.example",
    ),
    (
        "127.0.0.1",
        "localhost",
        "user@fail.example",
        "rcpt@dest.example",
    ),
    (
        "192.0.2.25",
        "mail.sender.example",
        "User@Sender.Example",
        "Rcpt@Dest.Example",
    ),
    ("192.0.2.25", "", "user@sender.example", "rcpt@dest.example"),
    (
        "192.0.2.25",
        "mail.sender.example",
        "user@sender.example",
        "",
    ),
    (
        "2001:db8::1",
        "mail.sender.example",
        "user@sender.example",
        "rcpt@dest.example",
    ),
];

fn requests() -> Vec<u8> {
    let mut out = String::new();
    for (i, (client, helo, sender, recipient)) in CASES.iter().enumerate() {
        out.push_str(&format!(
            "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\nclient_address={client}\nclient_name=unknown\nhelo_name={helo}\nsender={sender}\nrecipient={recipient}\ninstance=i{i}\nsasl_username=\nqueue_id=\n\n"
        ));
        // A second recipient of the same message: one header per message.
        out.push_str(&format!(
            "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={client}\nhelo_name={helo}\nsender={sender}\nrecipient=other@dest.example\ninstance=i{i}\n\n"
        ));
    }
    out.into_bytes()
}

async fn answers(mut command: tokio::process::Command, input: Vec<u8>) -> Vec<String> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = tokio::spawn(async move {
        stdin.write_all(&input).await.expect("write");
    });
    let mut out = String::new();
    tokio::time::timeout(
        Duration::from_secs(120),
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out),
    )
    .await
    .expect("answers within 120 s")
    .expect("read");
    writer.await.expect("writer");
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    out.split_terminator("\n\n").map(str::to_owned).collect()
}

async fn compare(dns: std::net::SocketAddr, conf: &str, toml_spf: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf_path = dir.path().join("policyd-spf.conf");
    std::fs::write(&conf_path, conf).expect("write conf");
    // pydns reads /etc/resolv.conf when spf is imported; point it at the test server after.
    let script = format!(
        "import sys, DNS, spf\nDNS.defaults['server'] = ['{}']\nDNS.defaults['port'] = {}\nfrom spf_engine import policyd_spf\nsys.argv = ['policyd-spf', {:?}]\npolicyd_spf.main()\n",
        dns.ip(),
        dns.port(),
        conf_path.display().to_string()
    );
    let mut theirs = tokio::process::Command::new("/usr/bin/python3");
    theirs.arg("-c").arg(script);
    let config = dir.path().join("policyd.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\n[dns]\nnameservers = [\"{dns}\"]\ntimeout = 2\nattempts = 1\n[greylist]\nstore = \"memory:\"\n[spf]\n{toml_spf}\n",
            dir.path().display().to_string()
        ),
    )
    .expect("write config");
    let mut ours = tokio::process::Command::new(env!("CARGO_BIN_EXE_postern-policyd"));
    ours.arg("-c").arg(&config).arg("--stdio");
    let theirs = answers(theirs, requests()).await;
    let ours = answers(ours, requests()).await;
    assert_eq!(
        theirs.len(),
        CASES.len() * 2,
        "policyd-spf answered {theirs:#?}"
    );
    let mut differences = Vec::new();
    for (i, (a, b)) in theirs.iter().zip(&ours).enumerate() {
        if a != b {
            differences.push(format!(
                "case {:?}:\n  policyd-spf: {a}\n  postern:     {b}",
                CASES[i / 2]
            ));
        }
    }
    assert_eq!(ours.len(), theirs.len(), "postern answered {ours:#?}");
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_match_debians_policyd_spf() {
    if !Path::new(POLICYD_SPF).exists() {
        eprintln!(
            "{POLICYD_SPF} not installed (Debian postfix-policyd-spf-python); comparison skipped"
        );
        return;
    }
    let (dns, task) = spf_common::serve(zone()).await;
    compare(dns, "debugLevel = 0\n", "").await;
    compare(
        dns,
        "debugLevel = 0\nHELO_reject = SPF_Not_Pass\nMail_From_reject = Softfail\nPermError_reject = True\nTempError_Defer = True\nHeader_Type = AR\nAuthserv_Id = mx.dest.example\nHide_Receiver = Yes\nReject_Not_Pass_Domains = neutral.example\n",
        "helo_reject = \"spf_not_pass\"\nmail_from_reject = \"softfail\"\nperm_error_reject = true\ntemp_error_defer = true\nheader_type = \"authentication-results\"\nauthserv_id = \"mx.dest.example\"\nhide_receiver = true\nreject_not_pass_domains = [\"neutral.example\"]\n",
    )
    .await;
    task.abort();
}
