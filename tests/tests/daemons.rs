//! The three daemons as a postmaster and an attacker meet them: the command line and its exit
//! codes, config errors, signals, and bad protocol input (garbage, oversize, silence, hang-ups),
//! each answered with one log line and a closed connection while everyone else is still served.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use postern_tests::clients::Target;
use postern_tests::clients::milter::{
    MilterClient, MilterMessage, Modification, Verdict, sample_message,
};
use postern_tests::clients::policy::PolicyClient;
use postern_tests::clients::socketmap::SocketmapClient;
use postern_tests::clients::tcp_table::{TableReply, TcpTableClient};
use postern_tests::daemon::{DaemonProcess, bin, free_port};

const DAEMONS: [&str; 3] = ["policyd", "milter", "srsd"];

fn run(daemon: &str, args: &[&str]) -> (i32, String) {
    let output = Command::new(bin(&format!("postern-{daemon}")))
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

fn target(port: u16) -> Target {
    format!("127.0.0.1:{port}").parse().unwrap()
}

/// Reads until EOF (the server closed), bounded.
fn read_to_close(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // Closing with unread input makes the kernel send a reset instead of a FIN.
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(err) => panic!("connection not closed within {within:?}: {err}; got {out:?}"),
        }
    }
}

#[test]
fn version_help_and_usage_errors() {
    for daemon in DAEMONS {
        let (code, out) = run(daemon, &["--version"]);
        assert_eq!(code, 0, "{out}");
        assert!(out.starts_with(&format!("postern-{daemon} ")), "{out}");
        let (code, out) = run(daemon, &["--help"]);
        assert_eq!(code, 0);
        assert!(
            out.contains("--check-config") && out.contains("--config"),
            "{out}"
        );
        let (code, out) = run(daemon, &["--no-such-flag"]);
        assert_eq!(code, 64, "{out}");
    }
}

#[test]
fn config_errors_exit_78_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    for daemon in DAEMONS {
        let (code, out) = run(daemon, &["-c", "/nonexistent/postern.toml"]);
        assert_eq!(code, 78, "{out}");
        assert!(
            out.contains("/nonexistent/postern.toml: cannot read"),
            "{out}"
        );
        let path = dir.path().join(format!("{daemon}.toml"));
        std::fs::write(
            &path,
            format!(
                "state_dir = \"{}\"\n\n[log]\nlevel = \"info\"\nlevle = \"debug\"\n",
                dir.path().join(daemon).display()
            ),
        )
        .unwrap();
        let (code, out) = run(daemon, &["-c", path.to_str().unwrap(), "--check-config"]);
        assert_eq!(code, 78, "{out}");
        assert!(
            out.contains(&format!("{}:5: key `levle`", path.display())),
            "{out}"
        );
        // A state_dir that cannot be created is a clear error too.
        std::fs::write(&path, "state_dir = \"/proc/postern-cannot-create\"\n").unwrap();
        let (code, out) = run(daemon, &["-c", path.to_str().unwrap(), "--check-config"]);
        assert_eq!(code, 78, "{out}");
        assert!(
            out.contains("key `state_dir`") && out.contains("/proc/postern-cannot-create"),
            "{out}"
        );
    }
}

#[test]
fn check_config_prints_the_effective_config_with_the_peers_ports() {
    let dir = tempfile::tempdir().unwrap();
    for (daemon, port) in [
        ("policyd", "inet:127.0.0.1:10023"),
        ("milter", "inet:127.0.0.1:8891"),
        ("srsd", "inet:127.0.0.1:10001"),
    ] {
        let path = dir.path().join(format!("{daemon}.toml"));
        let extra = if daemon == "srsd" {
            "srs_domain = \"example.com\"\n"
        } else {
            ""
        };
        std::fs::write(
            &path,
            format!(
                "state_dir = \"{}\"\n{extra}",
                dir.path().join(daemon).display()
            ),
        )
        .unwrap();
        let (code, out) = run(daemon, &["-c", path.to_str().unwrap(), "--check-config"]);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains(port), "{daemon}: {out}");
        assert!(out.contains("[dns]") && out.contains("[log]"), "{out}");
    }
}

#[test]
fn shipped_configs_parse() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/etc/postern");
    postern_common::config::load_file::<postern_policyd::config::PolicydConfig>(
        &root.join("policyd.toml"),
    )
    .unwrap();
    postern_common::config::load_file::<postern_milter::config::MilterConfig>(
        &root.join("milter.toml"),
    )
    .unwrap();
    postern_common::config::load_file::<postern_srsd::config::SrsdConfig>(&root.join("srsd.toml"))
        .unwrap();
}

#[test]
fn sigterm_stops_cleanly_and_sighup_keeps_a_good_config_over_a_bad_one() {
    let port = free_port();
    let mut policyd = DaemonProcess::start(
        "policyd",
        &format!("state_dir = \"@STATE@\"\n[[listen]]\naddress = \"inet:127.0.0.1:{port}\"\n"),
        &[port],
    )
    .unwrap();
    std::fs::write(&policyd.config_path, "this is = not toml [").unwrap();
    policyd.signal("HUP").unwrap();
    policyd
        .wait_log(
            "reload failed, keeping the running configuration",
            Duration::from_secs(5),
        )
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = PolicyClient::connect(&target(port)).await.unwrap();
        assert_eq!(
            client
                .ask(&[("request", "smtpd_access_policy")])
                .await
                .unwrap(),
            "DUNNO"
        );
    });
    std::fs::write(
        &policyd.config_path,
        format!(
            "state_dir = \"{}\"\n[[listen]]\naddress = \"inet:127.0.0.1:{port}\"\n",
            policyd.dir.path().join("state").display()
        ),
    )
    .unwrap();
    policyd.signal("HUP").unwrap();
    policyd
        .wait_log("configuration reloaded", Duration::from_secs(5))
        .unwrap();
    policyd.signal("TERM").unwrap();
    assert_eq!(
        policyd.wait_exit(Duration::from_secs(15)).unwrap(),
        Some(0),
        "{}",
        policyd.log()
    );
    assert!(policyd.log().contains("postern-policyd stopped"));
}

#[test]
fn policyd_survives_garbage_oversize_silence_and_hangups() {
    let port = free_port();
    let policyd = DaemonProcess::start("policyd", &format!("state_dir = \"@STATE@\"\nidle_timeout = 1\n[[listen]]\naddress = \"inet:127.0.0.1:{port}\"\n"), &[port]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // A well-behaved client keeps its connection through all of it.
    let mut good = rt.block_on(PolicyClient::connect(&target(port))).unwrap();

    let mut garbage = TcpStream::connect(("127.0.0.1", port)).unwrap();
    garbage
        .write_all(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\n\n")
        .unwrap();
    assert_eq!(read_to_close(&mut garbage, Duration::from_secs(5)), b"");
    policyd
        .wait_log(
            "bad policy request; closing connection",
            Duration::from_secs(5),
        )
        .unwrap();

    let mut oversize = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let long = format!("sender={}\n", "a".repeat(20_000));
    let _ = oversize.write_all(long.as_bytes());
    assert_eq!(read_to_close(&mut oversize, Duration::from_secs(5)), b"");
    policyd
        .wait_log(
            "attribute line longer than 8192 bytes",
            Duration::from_secs(5),
        )
        .unwrap();
    // Requests on the good connection still get answers.
    for _ in 0..3 {
        assert_eq!(
            rt.block_on(good.ask(&[("request", "smtpd_access_policy"), ("recipient", "x@y")]))
                .unwrap(),
            "DUNNO"
        );
    }

    let started = Instant::now();
    let mut silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert_eq!(read_to_close(&mut silent, Duration::from_secs(5)), b"");
    assert!(started.elapsed() >= Duration::from_millis(900));
    policyd
        .wait_log("closing idle connection", Duration::from_secs(5))
        .unwrap();

    let mut hangup = TcpStream::connect(("127.0.0.1", port)).unwrap();
    hangup
        .write_all(b"request=smtpd_access_policy\nsender=a@b")
        .unwrap();
    hangup.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_to_close(&mut hangup, Duration::from_secs(5)), b"");
    policyd
        .wait_log(
            "connection closed in the middle of a request",
            Duration::from_secs(5),
        )
        .unwrap();

    // The good connection went idle meanwhile and was closed too; new ones are served.
    assert!(
        rt.block_on(good.ask(&[("request", "smtpd_access_policy")]))
            .is_err()
    );
    let mut fresh = rt.block_on(PolicyClient::connect(&target(port))).unwrap();
    assert_eq!(
        rt.block_on(fresh.ask(&[("request", "smtpd_access_policy")]))
            .unwrap(),
        "DUNNO"
    );
}

#[test]
fn srsd_answers_bad_tcp_table_and_socketmap_input() {
    let (f, r, s) = (free_port(), free_port(), free_port());
    let srsd = DaemonProcess::start(
        "srsd",
        &format!("state_dir = \"@STATE@\"\nsrs_domain = \"fwd.example\"\nidle_timeout = 1\nforward_listen = \"inet:127.0.0.1:{f}\"\nreverse_listen = \"inet:127.0.0.1:{r}\"\nsocketmap_listen = \"inet:127.0.0.1:{s}\"\n"),
        &[f, r, s],
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut table = TcpTableClient::connect(&target(f)).await.unwrap();
        assert_eq!(table.raw(b"hello\n").await.unwrap(), "400 invalid request");
        assert_eq!(table.raw(b"get %zz\n").await.unwrap(), "400 malformed %XX encoding");
        // The connection survives a bad request.
        assert!(matches!(table.get("a@b.example").await.unwrap(), TableReply::Found(x) if x.starts_with("SRS0=")));
        assert_eq!(table.get("").await.unwrap(), TableReply::Error("400 invalid request".into()));
        let mut reverse = TcpTableClient::connect(&target(r)).await.unwrap();
        assert_eq!(reverse.get("bob@fwd.example").await.unwrap(), TableReply::NotFound("Not an SRS address.".into()));
        assert_eq!(reverse.get("SRS0=zzzz=2W=a.example=b@fwd.example").await.unwrap(), TableReply::NotFound("Time stamp out of date.".into()));

        let mut map = SocketmapClient::connect(&target(s)).await.unwrap();
        assert!(map.lookup("forward", "a@b.example").await.unwrap().starts_with("OK SRS0="));
        assert_eq!(map.lookup("reverse", "bob@fwd.example").await.unwrap(), "NOTFOUND Not an SRS address.");
        assert_eq!(map.lookup("nosuchmap", "x").await.unwrap(), "PERM Invalid map.");
        assert_eq!(map.raw(b"3:abc,").await.unwrap(), "PERM Invalid query.");
    });
    let mut oversize = TcpStream::connect(("127.0.0.1", s)).unwrap();
    oversize.write_all(b"200000:forward ").unwrap();
    assert_eq!(
        read_to_close(&mut oversize, Duration::from_secs(5)),
        b"13:PERM Too big.,"
    );
    let mut long = TcpStream::connect(("127.0.0.1", f)).unwrap();
    let _ = long.write_all(format!("get {}", "a".repeat(10_000)).as_bytes());
    let reply = read_to_close(&mut long, Duration::from_secs(5));
    assert!(
        reply.starts_with(b"400 request line longer than 4096 bytes"),
        "{reply:?}"
    );
    let mut silent = TcpStream::connect(("127.0.0.1", r)).unwrap();
    assert_eq!(read_to_close(&mut silent, Duration::from_secs(5)), b"");
    srsd.wait_log(
        "bad socketmap input; closing connection",
        Duration::from_secs(5),
    )
    .unwrap();
    srsd.wait_log(
        "bad tcp_table input; closing connection",
        Duration::from_secs(5),
    )
    .unwrap();
}

#[test]
fn srsd_refuses_a_secrets_file_others_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("postsrsd.secret");
    std::fs::write(&secret, "tops3cr3t\n").unwrap();
    let path = dir.path().join("srsd.toml");
    std::fs::write(
        &path,
        format!(
            "state_dir = \"{}\"\nsrs_domain = \"example.com\"\nsecrets_file = \"{}\"\n",
            dir.path().join("state").display(),
            secret.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out) = run("srsd", &["-c", path.to_str().unwrap(), "--check-config"]);
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains(&format!(
            "{}: is accessible by group or others (mode 0644)",
            secret.display()
        )),
        "{out}"
    );
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        run("srsd", &["-c", path.to_str().unwrap(), "--check-config"]).0,
        0
    );
}

#[test]
fn milter_passes_mail_and_survives_malformed_packets_and_silence() {
    let port = free_port();
    // The milter verifies: its DNS is a test server with nothing in it (fast NXDOMAIN answers).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dns = rt
        .block_on(postern_tests::dns::TestDns::start(
            postern_tests::dns::Zone::new(),
        ))
        .unwrap();
    let milter = DaemonProcess::start(
        "milter",
        &format!(
            "state_dir = \"@STATE@\"\nlisten = \"inet:127.0.0.1:{port}\"\nconnection_timeout = 1\n\
             [dns]\nnameservers = [\"{}\"]\n",
            dns.addr()
        ),
        &[port],
    )
    .unwrap();
    rt.block_on(async {
        let mut client = MilterClient::connect(&target(port)).await.unwrap();
        client
            .connect_stage(
                "mail.example.org",
                "192.0.2.1".parse().unwrap(),
                4000,
                "mx.test.example",
            )
            .await
            .unwrap();
        client.helo("mail.example.org").await.unwrap();
        let message = MilterMessage::parse(
            &sample_message("example.org"),
            "alice@example.org",
            &["bob@dest.example"],
        );
        for _ in 0..3 {
            let outcome = client.message(&message).await.unwrap();
            assert!(
                matches!(outcome.verdict, Some(Verdict::Continue | Verdict::Accept)),
                "{outcome:?}"
            );
            // Passed unchanged: at most its Authentication-Results headers are added.
            assert!(
                outcome.modifications.iter().all(|m| matches!(
                    m,
                    Modification::AddHeader(name, _) | Modification::InsertHeader(_, name, _)
                        if name == "Authentication-Results"
                )),
                "{outcome:?}"
            );
        }
        client.quit().await.unwrap();
    });
    // Its decision on each message is logged with the queue id the MTA gave (macro `i`).
    milter
        .wait_log("queue_id=\"4ABCDEF0123\"", Duration::from_secs(5))
        .unwrap();
    // A packet claiming 4 GB, and plain garbage: the connection is dropped, nothing else.
    for bytes in [&b"\xff\xff\xff\xffO"[..], b"GET / HTTP/1.0\r\n\r\n"] {
        let mut bad = TcpStream::connect(("127.0.0.1", port)).unwrap();
        bad.write_all(bytes).unwrap();
        read_to_close(&mut bad, Duration::from_secs(5));
    }
    // Each with a log line that says why.
    milter
        .wait_log("is over the limit of 1048575", Duration::from_secs(5))
        .unwrap();
    milter
        .wait_log(
            "bad milter input; connection closed",
            Duration::from_secs(5),
        )
        .unwrap();
    let started = Instant::now();
    let mut silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    read_to_close(&mut silent, Duration::from_secs(5));
    assert!(started.elapsed() >= Duration::from_millis(900));
    rt.block_on(async {
        let mut client = MilterClient::connect(&target(port)).await.unwrap();
        assert!(matches!(
            client
                .connect_stage("h", "192.0.2.1".parse().unwrap(), 1, "mx")
                .await
                .unwrap(),
            Verdict::Continue | Verdict::NotAsked
        ));
    });
}

#[test]
fn metrics_endpoint_counts_requests() {
    let (port, metrics) = (free_port(), free_port());
    let _policyd = DaemonProcess::start(
        "policyd",
        &format!("state_dir = \"@STATE@\"\n[[listen]]\naddress = \"inet:127.0.0.1:{port}\"\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n"),
        &[port, metrics],
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = PolicyClient::connect(&target(port)).await.unwrap();
        for _ in 0..3 {
            client
                .ask(&[("request", "smtpd_access_policy")])
                .await
                .unwrap();
        }
    });
    let mut http = TcpStream::connect(("127.0.0.1", metrics)).unwrap();
    http.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let body =
        String::from_utf8_lossy(&read_to_close(&mut http, Duration::from_secs(5))).into_owned();
    assert!(
        body.starts_with("HTTP/1.") && body.contains(" 200 "),
        "{body}"
    );
    assert!(
        body.lines().any(
            |l| l.starts_with("postern_policyd_requests_total{daemon=\"policyd\"} ")
                && l.ends_with(" 3")
        ),
        "{body}"
    );
}

#[test]
fn policyd_spf_import_converts_a_policyd_spf_conf() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("policyd-spf.conf");
    std::fs::write(&conf, "debugLevel = 1\nTestOnly = 1\nHELO_reject = SPF_Not_Pass\nMail_From_reject = Fail\nPermError_reject = False\nTempError_Defer = False\nskip_addresses = 127.0.0.0/8,::ffff:127.0.0.0/104,::1\n").unwrap();
    let (code, out) = run("policyd", &["policyd-spf-import", conf.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("[spf]"), "{out}");
    // The output is a valid policyd.toml.
    let toml_path = dir.path().join("policyd.toml");
    let body: String = out
        .lines()
        .filter(|l| !l.starts_with("#"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(
        &toml_path,
        format!(
            "state_dir = \"{}\"\n{body}",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let (code, out) = run(
        "policyd",
        &["-c", toml_path.to_str().unwrap(), "--check-config"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("helo_reject"), "{out}");
}

#[test]
fn a_listener_that_cannot_bind_stops_the_start_before_any_listener_serves() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().port();
    let (first, second) = (free_port(), free_port());
    let configs = [
        (
            "policyd",
            format!(
                "[[listen]]\naddress = \"inet:127.0.0.1:{first}\"\n\
                 [[listen]]\naddress = \"inet:127.0.0.1:{taken}\"\n"
            ),
        ),
        (
            "srsd",
            format!(
                "srs_domain = \"fwd.example\"\nforward_listen = \"inet:127.0.0.1:{first}\"\n\
                 reverse_listen = \"inet:127.0.0.1:{second}\"\n\
                 socketmap_listen = \"inet:127.0.0.1:{taken}\"\n"
            ),
        ),
    ];
    for (daemon, listeners) in configs {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\n{listeners}",
                dir.path().join("state").display()
            ),
        )
        .unwrap();
        let (code, log) = run(daemon, &["-c", config.to_str().unwrap()]);
        assert_ne!(code, 0, "{daemon}: {log}");
        assert!(
            log.contains(&format!("cannot listen on inet:127.0.0.1:{taken}")),
            "{daemon}: {log}"
        );
        assert!(
            !log.contains("listening"),
            "{daemon}: a listener served before the start failed: {log}"
        );
    }
}
