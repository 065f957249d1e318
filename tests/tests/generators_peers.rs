//! The load generators (`policy`, `milter`, `tcp-table`, `socketmap`) drive the Debian peers
//! they compare against as well as our daemons: postgrey, policyd-spf (through a spawn-style TCP
//! front), opendkim (verify and sign) and postsrsd. Each run must print the one summary line with
//! every request answered and no error. The milter client is also checked to see opendkim's
//! DKIM-Signature among the modifications.

use std::path::Path;
use std::process::Command;

use postern_tests::clients::Target;
use postern_tests::clients::milter::{MilterClient, MilterMessage, Verdict, sample_message};
use postern_tests::daemon::{DaemonProcess, bin, free_port};
use postern_tests::dns::{TestDns, Zone};
use postern_tests::peer::{PeerProcess, installed, spawn_front};

/// Runs a generator binary; returns its one line after checking its shape: `N requests in S s:
/// R req/s, p50 X ms, p99 Y ms[, server peak RSS Z MB], 0 errors`.
fn generate(generator: &str, args: &[&str], requests: u64, pid: Option<u32>) -> String {
    let mut command = Command::new(bin(generator));
    command.args(args).args(["-n", &requests.to_string()]);
    if let Some(pid) = pid {
        command.args(["--pid", &pid.to_string()]);
    }
    let output = command.output().expect("generator runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{generator} {args:?}: {stdout}{stderr}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line: {stdout:?} {stderr}");
    let line = lines[0].to_owned();
    assert!(
        line.starts_with(&format!("{requests} requests in ")),
        "{line} / {stderr}"
    );
    assert!(
        line.contains(" req/s, p50 ") && line.contains(" ms, p99 "),
        "{line}"
    );
    assert!(line.ends_with(", 0 errors"), "{line} / {stderr}");
    assert_eq!(pid.is_some(), line.contains(", server peak RSS "), "{line}");
    eprintln!("{generator} {args:?}: {line}");
    line
}

fn available(program: &str) -> bool {
    let reason = installed(program).err().unwrap_or_default();
    postern_tests::require(reason.is_empty(), &reason)
}

#[test]
fn policy_generator_drives_postgrey_policyd_spf_and_ours() {
    if !available("/usr/sbin/postgrey") || !available("/usr/bin/policyd-spf") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("postgrey");
    std::fs::create_dir(&db).unwrap();
    Command::new("chown")
        .args(["postgrey:postgrey"])
        .arg(&db)
        .status()
        .unwrap();
    let port = free_port();
    let mut command = Command::new("/usr/sbin/postgrey");
    command
        .arg(format!("--inet=127.0.0.1:{port}"))
        .arg(format!("--dbdir={}", db.display()))
        .arg(format!("--pidfile={}/pid", db.display()))
        .args(["--user=postgrey", "--group=postgrey"]);
    let postgrey = PeerProcess::spawn(command, port).unwrap();
    let target = format!("127.0.0.1:{port}");
    generate(
        "policy",
        &[&target, "-c", "2", "--mix", "new"],
        200,
        Some(postgrey.pid()),
    );
    generate("policy", &[&target, "-c", "1", "--mix", "known"], 100, None);
    // postgrey's own clock override, as our policyd honours it too.
    generate(
        "policy",
        &[&target, "--mix", "known", "--test-time", "1764000000"],
        50,
        None,
    );

    // policyd-spf speaks on stdin/stdout; 127.0.0.1 is in its default skip_addresses, so it
    // answers without DNS (a prepended X-Comment) and the protocol path is what is measured.
    let spf = spawn_front("/usr/bin/policyd-spf", &[]).unwrap();
    generate(
        "policy",
        &[
            &format!("127.0.0.1:{spf}"),
            "-c",
            "2",
            "--mix",
            "known",
            "--client",
            "127.0.0.1",
            "--context",
            "spf",
        ],
        100,
        None,
    );

    // And ours, over TCP and over a unix socket.
    let ours = free_port();
    let socket = dir.path().join("policyd.sock");
    let policyd = DaemonProcess::start(
        "policyd",
        &format!(
            "state_dir = \"@STATE@\"\n[[listen]]\naddress = \"inet:127.0.0.1:{ours}\"\n\
             [[listen]]\naddress = \"unix:{}\"\n[greylist]\nstore = \"memory:\"\n",
            socket.display()
        ),
        &[ours],
    )
    .unwrap();
    generate(
        "policy",
        &[&format!("127.0.0.1:{ours}"), "-c", "2", "--mix", "new"],
        200,
        Some(policyd.pid()),
    );
    generate(
        "policy",
        &[&format!("unix:{}", socket.display()), "--mix", "known"],
        100,
        None,
    );
}

fn opendkim(dir: &Path, port: u16) -> PeerProcess {
    let key = dir.join("sel.private");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/dkim/sel.example.test.pem"),
        &key,
    )
    .unwrap();
    let conf = dir.join("opendkim.conf");
    std::fs::write(
        &conf,
        format!(
            "Syslog no\nMode sv\nSocket inet:{port}@127.0.0.1\nPidFile {dir}/opendkim.pid\n\
             Domain example.test\nSelector sel\nKeyFile {key}\nInternalHosts csl:127.0.0.2\n\
             Canonicalization relaxed/simple\nRequireSafeKeys false\n",
            dir = dir.display(),
            key = key.display()
        ),
    )
    .unwrap();
    let mut command = Command::new("/usr/sbin/opendkim");
    command.arg("-f").arg("-x").arg(&conf);
    PeerProcess::spawn(command, port).unwrap()
}

#[test]
fn milter_generator_drives_opendkim_and_ours() {
    if !available("/usr/sbin/opendkim") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let peer = opendkim(dir.path(), port);
    let target = format!("127.0.0.1:{port}");
    // One connection: Debian 12's opendkim wedges under concurrent connections
    // (shared/reference/README.md).
    generate("milter", &[&target, "--end", "abort"], 50, Some(peer.pid()));
    generate("milter", &[&target, "--end", "quit"], 20, None);
    // Signing: the client is an InternalHost and the From domain is opendkim's Domain.
    generate(
        "milter",
        &[
            &target,
            "--sign",
            "--client-ip",
            "127.0.0.2",
            "--from-domain",
            "example.test",
        ],
        20,
        None,
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let target: Target = target.parse().unwrap();
        let mut client = MilterClient::connect(&target).await.unwrap();
        client
            .connect_stage(
                "internal.example.test",
                "127.0.0.2".parse().unwrap(),
                40000,
                "mx",
            )
            .await
            .unwrap();
        client.helo("internal.example.test").await.unwrap();
        let message = MilterMessage::parse(
            &sample_message("example.test"),
            "alice@example.test",
            &["bob@dest.example"],
        );
        let outcome = client.message(&message).await.unwrap();
        assert!(
            matches!(outcome.verdict, Some(Verdict::Continue | Verdict::Accept)),
            "{outcome:?}"
        );
        let signature = outcome
            .added_headers()
            .into_iter()
            .find(|(name, _)| name == "DKIM-Signature")
            .unwrap_or_else(|| panic!("no DKIM-Signature: {outcome:?}"));
        assert!(signature.1.contains("d=example.test"), "{signature:?}");
        assert!(signature.1.contains("s=sel"), "{signature:?}");
        client.abort().await.unwrap();
        client.quit().await.unwrap();
    });
    drop(peer);

    // Ours verifies (SPF, DKIM, DMARC): its DNS is the test server with the fixture zone, kept
    // running on the runtime's worker threads while the generator runs.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dns = runtime
        .block_on(TestDns::start(
            Zone::load(
                &Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/dns/example.test.zone"),
            )
            .unwrap(),
        ))
        .unwrap();
    let ours = free_port();
    let milter = DaemonProcess::start(
        "milter",
        &format!("state_dir = \"@STATE@\"\nlisten = \"inet:127.0.0.1:{ours}\"\n[dns]\nnameservers = [\"{}\"]\n", dns.addr()),
        &[ours],
    )
    .unwrap();
    let target = format!("127.0.0.1:{ours}");
    generate("milter", &[&target, "-c", "2"], 50, Some(milter.pid()));
    generate("milter", &[&target, "--end", "quit"], 20, None);
    generate(
        "milter",
        &[&target, "--from-domain", "example.test"],
        20,
        None,
    );
    assert!(dns.queries() > 0, "the milter asked the test DNS");
}

#[test]
fn table_generators_drive_postsrsd_and_ours() {
    if !available("/usr/sbin/postsrsd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "c2VjcmV0IGZvciB0ZXN0cw==\n").unwrap();
    let (forward, reverse) = (free_port(), free_port());
    let mut command = Command::new("/usr/sbin/postsrsd");
    // postsrsd's getopt wants option values attached ("-Xdomain").
    command
        .args(["-4", "-l127.0.0.1", "-dfwd.example"])
        .arg(format!("-f{forward}"))
        .arg(format!("-r{reverse}"))
        .arg(format!("-s{}", secret.display()));
    let postsrsd = PeerProcess::spawn(command, forward).unwrap();
    generate(
        "tcp-table",
        &[&format!("127.0.0.1:{forward}"), "-c", "2"],
        200,
        Some(postsrsd.pid()),
    );

    let (f, r, s) = (free_port(), free_port(), free_port());
    let srsd = DaemonProcess::start(
        "srsd",
        &format!(
            "state_dir = \"@STATE@\"\nsrs_domain = \"fwd.example\"\nforward_listen = \"inet:127.0.0.1:{f}\"\n\
             reverse_listen = \"inet:127.0.0.1:{r}\"\nsocketmap_listen = \"inet:127.0.0.1:{s}\"\n"
        ),
        &[f, r, s],
    )
    .unwrap();
    generate(
        "tcp-table",
        &[&format!("127.0.0.1:{f}"), "-c", "2"],
        200,
        Some(srsd.pid()),
    );
    generate(
        "socketmap",
        &[&format!("127.0.0.1:{s}"), "-c", "2"],
        200,
        None,
    );
    generate(
        "socketmap",
        &[&format!("127.0.0.1:{s}"), "--map", "reverse"],
        50,
        None,
    );
    // A time budget instead of a request count.
    let output = Command::new(bin("socketmap"))
        .args([&format!("127.0.0.1:{s}"), "-d", "0.3"])
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&output.stdout);
    assert!(
        line.contains(" requests in 0.3") && line.trim_end().ends_with(", 0 errors"),
        "{line}"
    );
}
