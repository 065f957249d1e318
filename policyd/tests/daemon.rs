//! postern-policyd as Postfix sees it: the binary started with a config on an ephemeral
//! loopback port, driven by a real policy client, answers compared byte for byte.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_postern-policyd");
const T0: u64 = 1_700_000_000;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The TCP ports of every `[[listen]]` address in a config.
fn listener_ports(config: &str) -> Vec<u16> {
    config
        .lines()
        .filter_map(|line| line.trim().strip_prefix("address = \"inet:127.0.0.1:"))
        .filter_map(|rest| rest.trim_end_matches('"').parse().ok())
        .collect()
}

/// A running postern-policyd; killed on drop.
struct Policyd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    log: PathBuf,
}

impl Policyd {
    /// Starts the daemon with `extra` appended to a config that sets the state dir and one
    /// listener on a free port.
    fn start(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, extra)
    }

    fn start_in(dir: tempfile::TempDir, extra: &str) -> Self {
        Self::start_full(dir, "", extra)
    }

    /// `top`: top-level keys (before the listener table); `extra`: tables after it.
    fn start_full(dir: tempfile::TempDir, top: &str, extra: &str) -> Self {
        let port = free_port();
        let config = dir.path().join("policyd.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\n{top}[[listen]]\naddress = \"inet:127.0.0.1:{port}\"\n{extra}",
                dir.path().join("state").display()
            ),
        )
        .unwrap();
        let log = dir.path().join("log");
        let child = Command::new(BIN)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut daemon = Self {
            child,
            port,
            dir,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        // A test may talk to any of the listeners: wait for each.
        for port in listener_ports(&std::fs::read_to_string(&config).unwrap()) {
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                if let Some(status) = daemon.child.try_wait().unwrap() {
                    panic!("policyd exited {status}: {}", daemon.log());
                }
                assert!(
                    Instant::now() < deadline,
                    "policyd did not listen on {port}: {}",
                    daemon.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        daemon
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in log: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn client(&self) -> Client {
        Client::connect(self.port)
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("policyd.toml")
    }
}

impl Drop for Policyd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A policy client on one connection.
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(port: u16) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Self {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    /// Sends one request and returns the raw answer, empty line included.
    fn ask(&mut self, attrs: &[(&str, &str)]) -> String {
        let mut request = String::new();
        for (name, value) in attrs {
            request.push_str(&format!("{name}={value}\n"));
        }
        request.push('\n');
        self.writer.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).unwrap();
            assert!(n > 0, "connection closed after {answer:?}");
            answer.push_str(&line);
            if line == "\n" {
                return answer;
            }
        }
    }
}

/// A RCPT request as Postfix 3.x sends it (the attributes postgrey needs and a few more).
fn rcpt<'a>(
    client: &'a str,
    sender: &'a str,
    recipient: &'a str,
    instance: &'a str,
    time: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("request", "smtpd_access_policy"),
        ("protocol_state", "RCPT"),
        ("protocol_name", "ESMTP"),
        ("client_address", client),
        ("client_name", "mail.sender.example"),
        ("reverse_client_name", "mail.sender.example"),
        ("helo_name", "mail.sender.example"),
        ("sender", sender),
        ("recipient", recipient),
        ("recipient_count", "0"),
        ("queue_id", ""),
        ("instance", instance),
        ("size", "0"),
        ("etrn_domain", ""),
        ("sasl_username", ""),
        ("policy_test_time", time),
    ]
}

const DEFER: &str = "action=DEFER_IF_PERMIT 4.2.0 Greylisted, see http://postgrey.schweikert.ch/help/dest.example.html\n\n";
const DUNNO: &str = "action=DUNNO\n\n";

/// The runtime's worker threads, by their names in /proc.
fn worker_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "tokio-rt-worker")
        .count()
}

#[test]
fn one_worker_thread_by_default_and_as_configured() {
    let policyd = Policyd::start("");
    assert_eq!(worker_threads(policyd.child.id()), 1);
    let policyd = Policyd::start_full(tempfile::tempdir().unwrap(), "worker_threads = 3\n", "");
    assert_eq!(worker_threads(policyd.child.id()), 3);
}

fn at(t: u64) -> String {
    t.to_string()
}

#[test]
fn greylisting_sequence_exact_bytes_on_one_connection() {
    let daemon = Policyd::start(
        "[greylist]\nhostname = \"mx.test.example\"\nwhitelist_clients = []\nwhitelist_recipients = []\n",
    );
    let mut c = daemon.client();
    let (ip, from, to) = ("192.0.2.25", "alice@sender.example", "bob@dest.example");
    assert_eq!(c.ask(&rcpt(ip, from, to, "m1", &at(T0))), DEFER);
    // Early retry: still deferred; the log says how many seconds are missing.
    assert_eq!(c.ask(&rcpt(ip, from, to, "m1", &at(T0 + 100))), DEFER);
    daemon.wait_log("early-retry (200s missing)");
    // Without etrn_domain: no DSN code.
    let mut no_etrn = rcpt(ip, from, "carol@dest.example", "m1", "");
    no_etrn.retain(|(n, _)| *n != "etrn_domain" && *n != "policy_test_time");
    let t = at(T0);
    no_etrn.push(("policy_test_time", &t));
    assert_eq!(
        c.ask(&no_etrn),
        "action=DEFER_IF_PERMIT Greylisted, see http://postgrey.schweikert.ch/help/dest.example.html\n\n"
    );
    // After the delay: the header once per message, then DUNNO.
    assert_eq!(
        c.ask(&rcpt(ip, from, to, "m2", &at(T0 + 313))),
        "action=PREPEND X-Greylist: delayed 313 seconds by postgrey-1.37 at mx.test.example; Tue, 14 Nov 2023 22:18:33 UTC\n\n"
    );
    assert_eq!(c.ask(&rcpt(ip, from, to, "m2", &at(T0 + 314))), DUNNO);
    assert_eq!(c.ask(&rcpt(ip, from, to, "m3", &at(T0 + 4000))), DUNNO);
    daemon.wait_log("reason=triplet found");
    // Retry window: a triplet never retried within 2 days starts over.
    let other = "dave@dest.example";
    assert_eq!(c.ask(&rcpt(ip, from, other, "m4", &at(T0))), DEFER);
    assert_eq!(
        c.ask(&rcpt(ip, from, other, "m4", &at(T0 + 2 * 86_400 + 1))),
        DEFER
    );
    assert!(
        c.ask(&rcpt(ip, from, other, "m4", &at(T0 + 2 * 86_400 + 301)))
            .starts_with("action=PREPEND X-Greylist: delayed 300 seconds")
    );
    // Other stages and authenticated clients are not greylisted.
    let mut data = rcpt("192.0.2.99", from, to, "m5", "");
    data[1] = ("protocol_state", "DATA");
    assert_eq!(c.ask(&data), DUNNO);
    let mut sasl = rcpt("192.0.2.99", from, to, "m5", "");
    sasl.retain(|(n, _)| *n != "sasl_username");
    sasl.push(("sasl_username", "alice"));
    assert_eq!(c.ask(&sasl), DUNNO);
}

#[test]
fn auto_whitelist_and_whitelist_files_through_the_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let clients = dir.path().join("whitelist_clients");
    let recipients = dir.path().join("whitelist_recipients");
    std::fs::write(
        &clients,
        "# test\nfriendly.example\n198.51.100.0/24\n/^relay\\d+\\.big\\.example$/\n",
    )
    .unwrap();
    std::fs::write(
        &recipients,
        "postmaster@\nabuse@dest.example\nopen.example\n",
    )
    .unwrap();
    let daemon = Policyd::start_in(
        dir,
        &format!(
            "[greylist]\nauto_whitelist_clients = 2\nwhitelist_clients = [\"{}\"]\nwhitelist_recipients = [\"{}\"]\n",
            clients.display(),
            recipients.display()
        ),
    );
    let mut c = daemon.client();
    let from = "a@sender.example";
    let mut by_name = rcpt("192.0.2.1", from, "x@dest.example", "i", "1000");
    by_name[4] = ("client_name", "mx.friendly.example");
    assert_eq!(c.ask(&by_name), DUNNO);
    by_name[4] = ("client_name", "relay7.big.example");
    assert_eq!(c.ask(&by_name), DUNNO);
    assert_eq!(
        c.ask(&rcpt("198.51.100.7", from, "x@dest.example", "i", "1000")),
        DUNNO
    );
    for rcpt_addr in [
        "postmaster@dest.example",
        "abuse+x@dest.example",
        "x@sub.open.example",
    ] {
        assert_eq!(
            c.ask(&rcpt("192.0.2.1", from, rcpt_addr, "i", "1000")),
            DUNNO,
            "{rcpt_addr}"
        );
    }
    daemon.wait_log("reason=recipient whitelist");
    daemon.wait_log("reason=client whitelist");
    // Not whitelisted: greylisted.
    assert_eq!(
        c.ask(&rcpt("192.0.2.1", from, "x@dest.example", "i", "1000")),
        DEFER
    );

    // AWL: two first passes an hour apart, then a new triplet from that client passes.
    let ip = "203.0.113.9";
    for (n, (start, retry)) in [(10_000u64, 10_400u64), (20_000, 20_400)]
        .iter()
        .enumerate()
    {
        let to = format!("r{n}@dest.example");
        assert_eq!(c.ask(&rcpt(ip, from, &to, "a", &at(*start))), DEFER);
        assert!(
            c.ask(&rcpt(ip, from, &to, &format!("b{n}"), &at(*retry)))
                .starts_with("action=PREPEND X-Greylist: ")
        );
    }
    assert_eq!(
        c.ask(&rcpt(
            ip,
            "new@else.example",
            "new@dest.example",
            "c",
            "20500"
        )),
        DUNNO
    );
    daemon.wait_log("reason=client AWL");

    // SIGHUP rereads the whitelist files.
    std::fs::write(&recipients, "newly-open.example\n").unwrap();
    daemon.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = daemon.client();
        if c.ask(&rcpt(
            "192.0.2.1",
            from,
            "x@newly-open.example",
            "i",
            "1000",
        )) == DUNNO
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reload not applied: {}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn policy_context_selects_the_check() {
    // An SPF-only listener still greylists when asked with policy_context=greylist.
    let dir = tempfile::tempdir().unwrap();
    let port2 = free_port();
    let daemon = Policyd::start_in(
        dir,
        &format!(
            "[[listen]]\naddress = \"inet:127.0.0.1:{port2}\"\nchecks = [\"spf\"]\n[dns]\nnameservers = [\"127.0.0.1:9\"]\ntimeout = 1\nattempts = 1\n[greylist]\nwhitelist_clients = []\nwhitelist_recipients = []\n"
        ),
    );
    let mut spf_only = Client::connect(port2);
    let mut request = rcpt(
        "192.0.2.25",
        "a@sender.example",
        "b@dest.example",
        "i",
        "5000",
    );
    request.push(("policy_context", "greylist"));
    assert_eq!(spf_only.ask(&request), DEFER);
    // Without the attribute, the SPF listener does not greylist: a new triplet is not
    // deferred by greylisting.
    let fresh = rcpt(
        "192.0.2.25",
        "z@sender.example",
        "b@dest.example",
        "i",
        "5000",
    );
    let answer = spf_only.ask(&fresh);
    assert!(!answer.contains("Greylisted"), "{answer}");
    // The greylist listener with policy_context=spf does not greylist either.
    let mut grey = daemon.client();
    let mut spf = rcpt(
        "192.0.2.25",
        "y@sender.example",
        "b@dest.example",
        "i",
        "5000",
    );
    spf.push(("policy_context", "spf"));
    assert!(!grey.ask(&spf).contains("Greylisted"));
    assert_eq!(
        grey.ask(&rcpt(
            "192.0.2.25",
            "y@sender.example",
            "b@dest.example",
            "i",
            "5000"
        )),
        DEFER,
        "the SPF request did not record the triplet"
    );
}

#[test]
fn bad_input_closes_only_that_connection() {
    let daemon = Policyd::start_full(
        tempfile::tempdir().unwrap(),
        "idle_timeout = 1\n",
        "[greylist]\nstore = \"memory:\"\n",
    );
    let mut good = daemon.client();
    assert_eq!(good.ask(&[("request", "smtpd_access_policy")]), DUNNO);
    // Garbage: one log line, connection closed.
    let mut bad = TcpStream::connect(("127.0.0.1", daemon.port)).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    bad.write_all(b"\x00\x01\x02 not a policy request\n\n")
        .unwrap();
    let mut rest = Vec::new();
    assert_eq!(bad.read_to_end(&mut rest).unwrap(), 0);
    daemon.wait_log("bad policy request; closing connection");
    // A line over the cap.
    let mut long = TcpStream::connect(("127.0.0.1", daemon.port)).unwrap();
    long.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = long.write_all(format!("sender={}\n", "a".repeat(100_000)).as_bytes());
    assert_eq!(long.read_to_end(&mut rest).unwrap_or(0), 0);
    // Disconnect in the middle of a request.
    let mut half = TcpStream::connect(("127.0.0.1", daemon.port)).unwrap();
    half.write_all(b"request=smtpd_access_policy\nsender=a@b")
        .unwrap();
    drop(half);
    // A silent client is dropped after idle_timeout.
    let mut silent = TcpStream::connect(("127.0.0.1", daemon.port)).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    assert_eq!(silent.read_to_end(&mut rest).unwrap(), 0);
    assert!(started.elapsed() < Duration::from_secs(8));
    // The first connection is still served.
    let mut good = daemon.client();
    assert_eq!(good.ask(&[("request", "smtpd_access_policy")]), DUNNO);
    assert_eq!(
        daemon.log().matches("bad policy request").count(),
        3,
        "{}",
        daemon.log()
    );
}

#[test]
fn stdio_mode_answers_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("policyd.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n[greylist]\nstore = \"memory:\"\nwhitelist_clients = []\nwhitelist_recipients = []\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .arg("-c")
        .arg(&config)
        .arg("--stdio")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut input = String::new();
    for attrs in [
        rcpt("192.0.2.25", "a@s.example", "b@dest.example", "i", "1000"),
        {
            let mut r = rcpt("192.0.2.25", "a@s.example", "b@dest.example", "i", "1000");
            r.push(("policy_context", "greylist"));
            r
        },
    ] {
        for (n, v) in attrs {
            input.push_str(&format!("{n}={v}\n"));
        }
        input.push('\n');
    }
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "--stdio did not exit at end of input"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    // The first request runs SPF (the --stdio default), the second greylists.
    let answers: Vec<&str> = out.split_inclusive("\n\n").collect();
    assert_eq!(answers.len(), 2, "{out:?}");
    assert_eq!(answers[1], DEFER);
}

#[test]
fn admin_commands_list_delete_stats() {
    let daemon = Policyd::start("[greylist]\nwhitelist_clients = []\nwhitelist_recipients = []\n");
    let mut c = daemon.client();
    assert_eq!(
        c.ask(&rcpt(
            "192.0.2.25",
            "a@s.example",
            "b@dest.example",
            "i",
            "1000"
        )),
        DEFER
    );
    assert_eq!(
        c.ask(&rcpt(
            "192.0.2.25",
            "a@s.example",
            "c@dest.example",
            "i",
            "1000"
        )),
        DEFER
    );
    assert!(
        c.ask(&rcpt(
            "192.0.2.25",
            "a@s.example",
            "c@dest.example",
            "j",
            "1400"
        ))
        .starts_with("action=PREPEND")
    );
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("-c")
            .arg(daemon.config_path())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // The daemon answers before its commit: another process sees the rows a moment later.
    let mut stats = String::new();
    for _ in 0..100 {
        stats = run(&["greylist", "stats"]);
        if stats == "triplets 2\npassed 1\nwaiting 1\nclients 1\n" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(stats, "triplets 2\npassed 1\nwaiting 1\nclients 1\n");
    assert_eq!(
        run(&["greylist", "list", "b@dest"]),
        "triplet 192.0.2.0/a@s.example/b@dest.example first=1000 last=1000\n"
    );
    assert!(run(&["greylist", "list"]).contains("client 192.0.2.25 count=1 last=1400\n"));
    assert_eq!(
        run(&["greylist", "delete", "192.0.2.0/a@s.example/b@dest.example"]),
        "deleted\n"
    );
    assert_eq!(
        run(&["greylist", "delete", "192.0.2.0/a@s.example/b@dest.example"]),
        "not found\n"
    );
    assert_eq!(
        run(&["greylist", "stats"]),
        "triplets 1\npassed 1\nwaiting 0\nclients 1\n"
    );
    // A bad store URL is a config error (78).
    let bad = daemon.dir.path().join("bad.toml");
    std::fs::write(&bad, "[greylist]\nstore = \"mysql://x\"\n").unwrap();
    let out = Command::new(BIN)
        .arg("-c")
        .arg(&bad)
        .args(["greylist", "stats"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("greylist.store"));
}

/// redis-server on a free port in a temp dir; killed on drop.
struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start_on(port: u16) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(err) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "redis-server is needed in CI: {err}"
                );
                eprintln!("skipping: redis-server not installed");
                return None;
            }
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Self {
            child,
            port,
            _dir: dir,
        })
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn two_daemons_share_redis_and_fall_back_when_it_dies() {
    let Some(redis) = Redis::start_on(free_port()) else {
        return;
    };
    let config = format!(
        "[greylist]\nstore = \"redis://127.0.0.1:{}/\"\nstore_timeout = \"500ms\"\nwhitelist_clients = []\nwhitelist_recipients = []\nhostname = \"mx\"\n",
        redis.port
    );
    let a = Policyd::start(&config);
    let b = Policyd::start(&config);
    let (ip, from, to) = ("192.0.2.25", "a@s.example", "b@dest.example");
    // First seen at A; B knows it (early retry), then passes it after the delay.
    assert_eq!(a.client().ask(&rcpt(ip, from, to, "i", "1000")), DEFER);
    assert_eq!(b.client().ask(&rcpt(ip, from, to, "i", "1100")), DEFER);
    b.wait_log("early-retry (200s missing)");
    assert!(
        b.client()
            .ask(&rcpt(ip, from, to, "j", "1300"))
            .starts_with("action=PREPEND X-Greylist: delayed 300 seconds by postgrey-1.37 at mx;")
    );
    assert_eq!(a.client().ask(&rcpt(ip, from, to, "k", "1400")), DUNNO);

    // Redis dies: answers are the fallback (DUNNO), within the bound.
    let port = redis.port;
    drop(redis);
    let started = Instant::now();
    let mut c = a.client();
    assert_eq!(
        c.ask(&rcpt(ip, from, "new@dest.example", "l", "6000")),
        DUNNO
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    a.wait_log("greylist store failed; answering with the fallback action");
    // Redis comes back (empty): greylisting resumes on its own.
    let _redis = Redis::start_on(port).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if c.ask(&rcpt(ip, from, "back@dest.example", "m", "7000")) == DEFER {
            break;
        }
        assert!(Instant::now() < deadline, "no recovery: {}", a.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs Debian's postgrey on a free port with its database in `dbdir`.
fn start_postgrey(dbdir: &Path, port: u16) -> Option<Child> {
    let child = Command::new("postgrey")
        .arg(format!("--inet=127.0.0.1:{port}"))
        .arg(format!("--dbdir={}", dbdir.display()))
        .args([
            "--user=root",
            "--group=root",
            "--whitelist-clients=/dev/null",
            "--whitelist-recipients=/dev/null",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match child {
        Ok(mut child) => {
            let deadline = Instant::now() + Duration::from_secs(20);
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("postgrey exited {status}");
                }
                assert!(Instant::now() < deadline, "postgrey did not start");
                std::thread::sleep(Duration::from_millis(50));
            }
            Some(child)
        }
        Err(err) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "postgrey is needed in CI: {err}"
            );
            eprintln!("skipping: postgrey not installed");
            None
        }
    }
}

#[test]
fn imports_a_database_written_by_postgrey() {
    let work = tempfile::tempdir().unwrap();
    let dbdir = work.path().join("postgrey");
    std::fs::create_dir(&dbdir).unwrap();
    let port = free_port();
    let Some(mut postgrey) = start_postgrey(&dbdir, port) else {
        return;
    };
    let mut c = Client::connect(port);
    let from = "bounce-42@sender.example";
    // A triplet that passed, one still waiting, and a client counted in the AWL.
    assert_eq!(
        c.ask(&rcpt(
            "192.0.2.25",
            from,
            "passed@dest.example",
            "i",
            "1000"
        )),
        DEFER
    );
    assert!(
        c.ask(&rcpt(
            "192.0.2.25",
            from,
            "passed@dest.example",
            "j",
            "1400"
        ))
        .starts_with("action=PREPEND X-Greylist: delayed 400 seconds by postgrey-1.37")
    );
    assert_eq!(
        c.ask(&rcpt(
            "192.0.2.25",
            from,
            "waiting@dest.example",
            "k",
            "1500"
        )),
        DEFER
    );
    drop(c);
    // Stopped as systemd stops it (SIGTERM), so BerkeleyDB closes cleanly.
    assert!(
        Command::new("kill")
            .arg(postgrey.id().to_string())
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while postgrey.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "postgrey did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }

    let daemon = Policyd::start("[greylist]\nwhitelist_clients = []\nwhitelist_recipients = []\n");
    let out = Command::new(BIN)
        .arg("-c")
        .arg(daemon.config_path())
        .args(["greylist", "import-postgrey"])
        .arg(&dbdir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("imported 2 triplets and 1 clients"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mut c = daemon.client();
    // The passed triplet stays passed (postgrey's key format, VERP number folded).
    assert_eq!(
        c.ask(&rcpt(
            "192.0.2.77",
            "bounce-43@sender.example",
            "passed@dest.example",
            "l",
            "2000"
        )),
        DUNNO
    );
    daemon.wait_log("reason=triplet found");
    // The waiting one keeps its first-seen time: 100 s later it is an early retry, at 300 s
    // it passes.
    assert_eq!(
        c.ask(&rcpt(
            "192.0.2.25",
            from,
            "waiting@dest.example",
            "m",
            "1600"
        )),
        DEFER
    );
    daemon.wait_log("early-retry (200s missing)");
    assert!(
        c.ask(&rcpt(
            "192.0.2.25",
            from,
            "waiting@dest.example",
            "n",
            "1800"
        ))
        .starts_with("action=PREPEND X-Greylist: delayed 300 seconds")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_updates_are_atomic_across_connections() {
    use postern_policyd::greylist::logic::TripletRules;
    use postern_policyd::greylist::redis_store::RedisStore;
    use postern_policyd::greylist::store::Store;
    let Some(redis) = Redis::start_on(free_port()) else {
        return;
    };
    let url = format!("redis://127.0.0.1:{}/", redis.port);
    let timeout = Duration::from_secs(5);
    // Two stores = two connections, as two MX hosts.
    let a = RedisStore::connect(&url, "t:", 86_400, timeout)
        .await
        .unwrap();
    let b = RedisStore::connect(&url, "t:", 86_400, timeout)
        .await
        .unwrap();
    // AWL counts: every bump is an hour or more from every other, so each one counts; a lost
    // update (read-modify-write race) would leave the count short.
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..64u64 {
        let store = if k % 2 == 0 { a.clone() } else { b.clone() };
        tasks.spawn(async move {
            store
                .bump_client("192.0.2.1", 1_000_000 + k * 3600)
                .await
                .unwrap()
        });
    }
    while let Some(result) = tasks.join_next().await {
        assert!(result.unwrap().is_some());
    }
    assert_eq!(a.client("192.0.2.1").await.unwrap().unwrap().count, 64);
    // A triplet first seen by both at once is recorded once; after the delay both see it pass.
    let rules = TripletRules {
        delay: 300,
        retry_window: 86_400,
    };
    let (x, y) = tokio::join!(
        a.record_triplet("k", 1000, rules),
        b.record_triplet("k", 1000, rules)
    );
    assert_eq!((x.unwrap().first, y.unwrap().first), (1000, 1000));
    let seen = b.record_triplet("k", 1300, rules).await.unwrap();
    assert_eq!(seen.first, 1000);
    assert!(!seen.last_was_successful);
    assert!(
        a.record_triplet("k", 1400, rules)
            .await
            .unwrap()
            .last_was_successful
    );
    // Keys carry the TTL (max_age).
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ttl: i64 = redis::cmd("TTL")
        .arg("t:t:k")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((86_000..=86_400).contains(&ttl), "{ttl}");
}

/// Benchmark, not a timed test: `POSTERN_SCALE=10000000 cargo test --release -p
/// postern-policyd --test daemon sqlite_at_scale -- --ignored --nocapture`. Fills the SQLite
/// store, measures request latency on known triplets, then again while the background-style
/// batched expiry deletes a tenth of the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run by hand"]
async fn sqlite_at_scale() {
    use postern_policyd::greylist::logic::TripletRules;
    use postern_policyd::greylist::sqlite::SqliteStore;
    use postern_policyd::greylist::store::{Entry, GreylistStep, Kind, Store};
    let total: u64 = std::env::var("POSTERN_SCALE")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("g.sqlite"))
        .await
        .unwrap();
    let started = Instant::now();
    let old = total / 10;
    for chunk_start in (0..total).step_by(50_000) {
        let entries: Vec<Entry> = (chunk_start..(chunk_start + 50_000).min(total))
            .map(|n| Entry {
                kind: Kind::Triplet,
                key: format!(
                    "10.{}.{}.0/sender{n}@example.com/rcpt{n}@dest.example",
                    n >> 16 & 255,
                    n >> 8 & 255
                ),
                first_or_count: if n < old { 1000 } else { 1_000_000 },
                last: if n < old { 1000 } else { 1_000_300 },
            })
            .collect();
        store.import(&entries).await.unwrap();
    }
    eprintln!(
        "filled {total} triplets in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // The bulk load leaves its last transactions in the WAL and gigabytes of dirty pages for
    // the kernel to write back: measure the store, not the background checkpoints copying the
    // fill into the database file, nor that writeback. A TRUNCATE checkpoint waits for readers
    // and copies everything; then the files are synced.
    let settled = Instant::now();
    let drain = rusqlite::Connection::open(dir.path().join("g.sqlite")).unwrap();
    drain.busy_timeout(Duration::from_secs(600)).unwrap();
    let (busy, log_pages, copied): (i64, i64, i64) = drain
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .unwrap();
    assert_eq!(
        busy, 0,
        "the WAL did not drain ({log_pages} pages, {copied} copied)"
    );
    drop(drain);
    for name in ["g.sqlite", "g.sqlite-wal"] {
        if let Ok(file) = std::fs::File::open(dir.path().join(name)) {
            let _ = file.sync_all();
        }
    }
    eprintln!(
        "checkpointed and written back in {:.1} s",
        settled.elapsed().as_secs_f64()
    );
    let rules = TripletRules {
        delay: 300,
        retry_window: 86_400,
    };
    // Eight requests at a time, as from eight Postfix smtpd processes, through the path the
    // daemon uses (AWL lookup, triplet, AWL count, committed in windows).
    // Each phase touches keys of its own, so that the second measures the store, not the
    // row cache the first one filled.
    let measure = |label: &'static str, phase: u64, store: SqliteStore| async move {
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..8u64 {
            let store = store.clone();
            tasks.spawn(async move {
                let mut latencies = Vec::new();
                for i in 0..2_500u64 {
                    let n = old + ((phase * 20_000 + task * 2_500 + i) * 7919) % (total - old);
                    let step = GreylistStep {
                        awl_key: format!("10.{}.{}.{}", n >> 16 & 255, n >> 8 & 255, n & 255),
                        triplet_key: format!(
                            "10.{}.{}.0/sender{n}@example.com/rcpt{n}@dest.example",
                            n >> 16 & 255,
                            n >> 8 & 255
                        ),
                        now: 1_000_400 + i,
                        rules,
                        awl_threshold: 5,
                    };
                    let t = Instant::now();
                    store.greylist_step(&step).await.unwrap();
                    latencies.push(t.elapsed().as_micros() as u64);
                }
                latencies
            });
        }
        let mut latencies: Vec<u64> = tasks.join_all().await.into_iter().flatten().collect();
        latencies.sort_unstable();
        eprintln!(
            "{label}: p50 {} us, p99 {} us, max {} us",
            latencies[latencies.len() / 2],
            latencies[latencies.len() * 99 / 100],
            latencies[latencies.len() - 1]
        );
    };
    measure("known triplets", 0, store.clone()).await;
    let expiring = store.clone();
    let expiry = tokio::spawn(async move {
        let t = Instant::now();
        let mut deleted = 0;
        for _ in 0..1_000_000 {
            let n = expiring.expire(2000, 500).await.unwrap();
            deleted += n;
            if n == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (deleted, t.elapsed())
    });
    measure("known triplets during expiry", 1, store.clone()).await;
    let (deleted, took) = expiry.await.unwrap();
    eprintln!("expired {deleted} rows in {:.1} s", took.as_secs_f64());
    assert_eq!(deleted, old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_url_works_against_a_one_node_cluster() {
    use postern_policyd::greylist::logic::TripletRules;
    use postern_policyd::greylist::redis_store::RedisStore;
    use postern_policyd::greylist::store::{Store, StoreUrl};
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--cluster-enabled", "yes", "--cluster-config-file"])
        .arg(dir.path().join("nodes.conf"))
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(child) = child else {
        assert!(
            std::env::var_os("CI").is_none(),
            "redis-server is needed in CI"
        );
        return;
    };
    let _redis = Redis {
        child,
        port,
        _dir: tempfile::tempdir().unwrap(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // All 16384 slots on this node, then wait for cluster_state:ok.
    let mut admin = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = redis::cmd("CLUSTER")
        .arg("ADDSLOTSRANGE")
        .arg(0)
        .arg(16383)
        .query_async(&mut admin)
        .await
        .unwrap();
    loop {
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut admin)
            .await
            .unwrap();
        if info.contains("cluster_state:ok") {
            break;
        }
        assert!(Instant::now() < deadline, "cluster not ok: {info}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("redis+cluster://127.0.0.1:{port}");
    let StoreUrl::RedisCluster(nodes) = StoreUrl::parse(&url, Path::new("/tmp")).unwrap() else {
        panic!("not a cluster URL");
    };
    let store = RedisStore::connect_cluster(&nodes, "c:", 3600, Duration::from_secs(5))
        .await
        .unwrap();
    let rules = TripletRules {
        delay: 300,
        retry_window: 86_400,
    };
    assert_eq!(
        store.record_triplet("k", 1000, rules).await.unwrap().first,
        1000
    );
    assert_eq!(
        store.record_triplet("k", 1100, rules).await.unwrap().first,
        1000
    );
    assert_eq!(
        store
            .bump_client("192.0.2.1", 1000)
            .await
            .unwrap()
            .unwrap()
            .count,
        1
    );
    assert_eq!(store.client("192.0.2.1").await.unwrap().unwrap().count, 1);
    let listed = store.list("", 10).await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
}
