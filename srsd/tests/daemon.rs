//! postern-srsd as a process, driven over loopback TCP with exact bytes: both protocols answer
//! as postsrsd does, bad input costs one log line and that connection only, the secrets file is
//! generated private, and the domains file is re-read when it changes and on SIGHUP.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use postern_srsd::srs::{HashAlphabet, Secret, Srs};

const BIN: &str = env!("CARGO_BIN_EXE_postern-srsd");
const TIMEOUT: Duration = Duration::from_secs(10);

/// A port that was free a moment ago (the daemon binds it itself).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

struct Srsd {
    child: Child,
    log: PathBuf,
    dir: tempfile::TempDir,
    forward: u16,
    reverse: u16,
    socketmap: u16,
}

impl Drop for Srsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

impl Srsd {
    /// Starts the daemon with `extra` config lines (`@DIR@` = its temp dir) on three fresh ports.
    /// A port found free can be taken by a test running beside this one before the daemon
    /// binds it: then the daemon is started again on other ports (a few times at most).
    fn start(extra: &str) -> Self {
        for _ in 0..4 {
            match Self::start_on_fresh_ports(extra) {
                Ok(srsd) => return srsd,
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("postern-srsd exited: {log}"),
            }
        }
        panic!("postern-srsd found its ports taken four times in a row");
    }

    /// Starts the daemon, or returns its log if it exited before listening.
    fn start_on_fresh_ports(extra: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().unwrap();
        let (forward, reverse, socketmap) = (free_port(), free_port(), free_port());
        let config = dir.path().join("srsd.toml");
        let common = format!(
            "state_dir = \"{state}\"\nsrs_domain = \"example.com\"\nforward_listen = \"inet:127.0.0.1:{forward}\"\nreverse_listen = \"inet:127.0.0.1:{reverse}\"\nsocketmap_listen = \"inet:127.0.0.1:{socketmap}\"\n",
            state = dir.path().join("state").display()
        );
        let extra = extra.replace("@DIR@", &dir.path().display().to_string());
        std::fs::write(
            &config,
            format!("{common}{extra}[log]\nlevel = \"debug\"\n"),
        )
        .unwrap();
        let log = dir.path().join("stderr.log");
        let child = Command::new(BIN)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut srsd = Self {
            child,
            log,
            dir,
            forward,
            reverse,
            socketmap,
        };
        let deadline = Instant::now() + TIMEOUT;
        for port in [forward, reverse, socketmap] {
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                if let Ok(Some(status)) = srsd.child.try_wait() {
                    return Err(format!("{status}: {}", srsd.log_text()));
                }
                assert!(
                    Instant::now() < deadline,
                    "not listening: {}",
                    srsd.log_text()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(srsd)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_count(&self, needle: &str) -> usize {
        self.log_text().matches(needle).count()
    }

    /// Waits until the log holds `needle` `count` times.
    fn wait_log(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + TIMEOUT;
        while self.log_count(needle) < count {
            assert!(
                Instant::now() < deadline,
                "log never had {count}× {needle:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn connect(&self, port: u16) -> Conn {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        Conn(stream)
    }
}

struct Conn(TcpStream);

impl Conn {
    /// Sends a tcp_table request and reads one reply line.
    fn ask(&mut self, request: &[u8]) -> String {
        self.0.write_all(request).unwrap();
        self.read_line()
    }

    fn read_byte(&mut self, so_far: &[u8]) -> u8 {
        let mut byte = [0u8; 1];
        let n = self.0.read(&mut byte).unwrap();
        assert_eq!(n, 1, "connection closed after {so_far:?}");
        byte[0]
    }

    fn read_line(&mut self) -> String {
        let mut line = Vec::new();
        while line.last() != Some(&b'\n') {
            let byte = self.read_byte(&line);
            line.push(byte);
        }
        String::from_utf8(line).unwrap()
    }

    /// Sends a socketmap request and reads one reply netstring.
    fn map(&mut self, request: &str) -> String {
        self.0.write_all(&netstring(request)).unwrap();
        self.read_netstring()
    }

    fn read_netstring(&mut self) -> String {
        let mut reply = Vec::new();
        while reply.last() != Some(&b':') {
            let byte = self.read_byte(&reply);
            reply.push(byte);
            assert!(reply.len() < 8, "not a netstring: {reply:?}");
        }
        let len: usize = std::str::from_utf8(&reply[..reply.len() - 1])
            .unwrap()
            .parse()
            .unwrap();
        for _ in 0..=len {
            let byte = self.read_byte(&reply);
            reply.push(byte);
        }
        String::from_utf8(reply).unwrap()
    }

    /// Reads until the daemon closes the connection.
    fn read_to_close(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let deadline = Instant::now() + TIMEOUT;
        let mut buf = [0u8; 4096];
        loop {
            assert!(Instant::now() < deadline, "not closed; read {out:?}");
            match self.0.read(&mut buf) {
                Ok(0) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => return out,
                Err(err) => panic!("read: {err}"),
            }
        }
    }
}

fn netstring(text: &str) -> Vec<u8> {
    format!("{}:{text},", text.len()).into_bytes()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn tops3cr3t(alphabet: HashAlphabet) -> Srs {
    Srs {
        secrets: vec![Secret::new(b"tops3cr3t")],
        separator: '=',
        hash_length: 4,
        hash_minimum: 4,
        alphabet,
    }
}

/// What postsrsd answers for `local@domain` now (two candidates, in case a day starts between).
fn expected_forward(alphabet: HashAlphabet, local: &str, domain: &str) -> [String; 2] {
    let srs = tops3cr3t(alphabet);
    let t = now();
    [
        srs.forward(local, domain, "example.com", t),
        srs.forward(local, domain, "example.com", t + 5),
    ]
}

#[test]
fn both_protocols_answer_with_postsrsd_bytes() {
    let secrets = tempfile::tempdir().unwrap();
    let secret = secrets.path().join("postsrsd.secret");
    // postsrsd's format: one secret a line, CR/LF stripped, blank lines skipped.
    write_private(&secret, "tops3cr3t\r\n\r\nold secret\n");
    let srsd = Srsd::start(&format!(
        "secrets_file = \"{}\"\ndomains = [\"local.example\", \".sub.example\"]\n",
        secret.display()
    ));
    let mut fwd = srsd.connect(srsd.forward);
    let mut rev = srsd.connect(srsd.reverse);
    let mut map = srsd.connect(srsd.socketmap);

    // tcp_table, forward: base64url by default (postsrsd 2.2.6+).
    let reply = fwd.ask(b"get sender@otherdomain.com\n");
    let candidates = expected_forward(HashAlphabet::Base64url, "sender", "otherdomain.com");
    assert!(
        candidates.iter().any(|c| reply == format!("200 {c}\n")),
        "{reply:?} not in {candidates:?}"
    );
    let srs = reply.trim_end().strip_prefix("200 ").unwrap().to_owned();
    assert_eq!(
        rev.ask(format!("get {srs}\n").as_bytes()),
        "200 sender@otherdomain.com\n"
    );
    // Case-folded by a relay, and with base64's characters: still the same hash.
    assert_eq!(
        rev.ask(format!("get {}\n", srs.to_ascii_lowercase().replace('-', "+")).as_bytes()),
        "200 sender@otherdomain.com\n"
    );
    // %XX in both directions; a space in the local part survives.
    let reply = fwd.ask(b"get a%20b%25c@otherdomain.com\n");
    assert!(
        reply.starts_with("200 SRS0=")
            && reply.ends_with("=otherdomain.com=a%20b%25c@example.com\n"),
        "{reply}"
    );
    let srs2 = reply.trim_end().strip_prefix("200 ").unwrap().to_owned();
    assert_eq!(
        rev.ask(format!("get {srs2}\n").as_bytes()),
        "200 a%20b%25c@otherdomain.com\n"
    );
    // Not rewritten: local domains (a leading dot = subdomains only), the SRS domain, no domain;
    // with postsrsd 1.x's texts on tcp_table (its spelling), 2.x's on socketmap.
    assert_eq!(
        fwd.ask(b"get a@local.example\n"),
        "500 Domain excluded py policy\n"
    );
    assert_eq!(
        fwd.ask(b"get a@x.sub.example\n"),
        "500 Domain excluded py policy\n"
    );
    assert!(fwd.ask(b"get a@sub.example\n").starts_with("200 SRS0="));
    assert_eq!(
        fwd.ask(b"get postmaster\n"),
        "500 No at sign in sender address\n"
    );
    assert_eq!(
        fwd.ask(format!("get {srs}\n").as_bytes()),
        "500 Already rewritten\n"
    );
    // Reverse refusals carry libsrs2's texts.
    assert_eq!(
        rev.ask(b"get bob@example.com\n"),
        "500 Not an SRS address.\n"
    );
    assert_eq!(
        rev.ask(b"get SRS0=vmyz=2W=otherdomain.com=test@example.com\n"),
        "500 Time stamp out of date.\n"
    );
    let forged = format!("SRS0=AAAA{}", &srs[9..]);
    assert_eq!(
        rev.ask(format!("get {forged}\n").as_bytes()),
        "500 Hash invalid in SRS address.\n"
    );
    // The second secret verifies too (rotation): sign with it alone and reverse.
    let old = Srs {
        secrets: vec![Secret::new(b"old secret")],
        ..tops3cr3t(HashAlphabet::Base64url)
    };
    let by_old = old.forward("x", "y.example", "example.com", now());
    assert_eq!(
        rev.ask(format!("get {by_old}\n").as_bytes()),
        "200 x@y.example\n"
    );

    // socketmap: the same answers, postsrsd 2.x's netstrings.
    let reply = map.map("forward sender@otherdomain.com");
    assert!(
        candidates
            .iter()
            .any(|c| reply.as_bytes() == netstring(&format!("OK {c}"))),
        "{reply:?}"
    );
    assert_eq!(
        map.map(&format!("reverse {srs}")),
        "25:OK sender@otherdomain.com,"
    );
    assert_eq!(
        map.map("forward a@local.example"),
        "39:NOTFOUND Need not rewrite local domain.,"
    );
    assert_eq!(
        map.map("reverse bob@example.com"),
        "28:NOTFOUND Not an SRS address.,"
    );
    assert_eq!(map.map("lookup x@y"), "17:PERM Invalid map.,");
    // Several requests in one write are answered in order.
    map.0
        .write_all(
            &[
                netstring("forward a@local.example"),
                netstring(&format!("reverse {srs}")),
            ]
            .concat(),
        )
        .unwrap();
    assert_eq!(
        map.read_netstring(),
        "39:NOTFOUND Need not rewrite local domain.,"
    );
    assert_eq!(map.read_netstring(), "25:OK sender@otherdomain.com,");
}

#[test]
fn bad_input_costs_one_log_line_and_that_connection_only() {
    let mut srsd = Srsd::start("idle_timeout = 2\n");
    let mut good = srsd.connect(srsd.forward);
    assert!(good.ask(b"get a@b.example\n").starts_with("200 SRS0="));

    // Garbage: answered, the connection stays.
    assert_eq!(good.ask(b"hello\n"), "400 invalid request\n");
    assert_eq!(good.ask(b"\x00\xff\xfe\n"), "400 request is not ASCII\n");
    assert!(good.ask(b"get a@b.example\n").starts_with("200 SRS0="));

    // A line over the cap: one error reply, then that connection is closed.
    let mut long = srsd.connect(srsd.forward);
    let _ = long
        .0
        .write_all(format!("get {}", "a".repeat(10_000)).as_bytes());
    let out = long.read_to_close();
    assert!(
        out.starts_with(b"400 request line longer than 4096 bytes\n"),
        "{out:?}"
    );
    srsd.wait_log("bad tcp_table input; closing connection", 1);

    // Disconnect in the middle of a request: one line, no reply.
    let mut cut = srsd.connect(srsd.reverse);
    cut.0.write_all(b"get SRS0=abcd=").unwrap();
    cut.0.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(cut.read_to_close(), b"");
    srsd.wait_log("bad tcp_table input; closing connection", 2);

    // socketmap: oversize, then not a netstring, each closes its own connection.
    let mut big = srsd.connect(srsd.socketmap);
    big.0.write_all(b"200000:forward ").unwrap();
    assert_eq!(big.read_to_close(), b"13:PERM Too big.,");
    let mut junk = srsd.connect(srsd.socketmap);
    junk.0.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(junk.read_to_close(), b"19:PERM Invalid query.,");
    srsd.wait_log("bad socketmap input; closing connection", 2);
    let mut cut = srsd.connect(srsd.socketmap);
    cut.0.write_all(b"30:forward a@").unwrap();
    cut.0.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(cut.read_to_close(), b"");
    srsd.wait_log("bad socketmap input; closing connection", 3);

    // Everyone else is still served, on every listener.
    assert!(good.ask(b"get c@d.example\n").starts_with("200 SRS0="));
    let mut map = srsd.connect(srsd.socketmap);
    assert!(map.map("forward c@d.example").contains(":OK SRS0="));

    // A silent client is closed after idle_timeout, with one line.
    let mut silent = srsd.connect(srsd.reverse);
    let started = Instant::now();
    assert_eq!(silent.read_to_close(), b"");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    srsd.wait_log("idle connection closed", 1);
    assert_eq!(
        srsd.log_count("bad tcp_table input"),
        2,
        "{}",
        srsd.log_text()
    );
    assert!(srsd.child.try_wait().unwrap().is_none(), "daemon died");
}

#[test]
fn generated_secret_is_private_and_in_use() {
    let srsd = Srsd::start("");
    let secret = srsd.dir.path().join("state/srs.secret");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&secret).unwrap();
    assert!(text.trim().len() >= 32, "{text:?}");
    let mut fwd = srsd.connect(srsd.forward);
    let first = fwd.ask(b"get a@b.example\n");
    assert!(first.starts_with("200 SRS0="), "{first}");
    // The generated secret is the one in use: the library signs the same with it.
    let ours = Srs {
        secrets: vec![Secret::new(text.trim().as_bytes())],
        ..tops3cr3t(HashAlphabet::Base64url)
    };
    let t = now();
    assert!(
        [t, t + 5].iter().any(
            |&t| first == format!("200 {}\n", ours.forward("a", "b.example", "example.com", t))
        ),
        "{first}"
    );
    srsd.wait_log("generated a new SRS secret", 1);
}

#[test]
fn domains_file_is_reread_when_it_changes_and_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let domains = dir.path().join("domains");
    std::fs::write(&domains, "# local\none.example\n").unwrap();
    let mut srsd = Srsd::start(&format!("domains_file = \"{}\"\n", domains.display()));
    let mut fwd = srsd.connect(srsd.forward);
    assert_eq!(
        fwd.ask(b"get a@one.example\n"),
        "500 Domain excluded py policy\n"
    );
    assert!(fwd.ask(b"get a@two.example\n").starts_with("200 SRS0="));

    // Changed on disk: picked up without a signal (mtime moved on so coarse clocks see it).
    std::fs::write(&domains, "two.example\n").unwrap();
    let later = SystemTime::now() + Duration::from_secs(3);
    std::fs::File::options()
        .write(true)
        .open(&domains)
        .unwrap()
        .set_modified(later)
        .unwrap();
    srsd.wait_log("domains file changed; reloaded", 1);
    assert_eq!(
        fwd.ask(b"get a@two.example\n"),
        "500 Domain excluded py policy\n"
    );
    assert!(fwd.ask(b"get a@one.example\n").starts_with("200 SRS0="));

    // SIGHUP re-reads it too (and the connection opened before is served by the new state). The
    // mtime is set to the same instant as before, so only the signal can notice the change.
    std::fs::write(&domains, "three.example\n").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&domains)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let status = Command::new("kill")
        .args(["-HUP", &srsd.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if fwd.ask(b"get a@three.example\n") == "500 Domain excluded py policy\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload:\n{}",
            srsd.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(srsd.child.try_wait().unwrap().is_none());
}

#[test]
fn database_mode_stores_plain_senders_and_wraps_srs_ones() {
    let secrets = tempfile::tempdir().unwrap();
    let secret = secrets.path().join("secret");
    write_private(&secret, "tops3cr3t\n");
    let db = Srsd::start(&format!(
        "secrets_file = \"{}\"\noriginal_envelope = \"database\"\n",
        secret.display()
    ));
    let mut fwd = db.connect(db.forward);
    let mut rev = db.connect(db.reverse);
    let long = "a.rather.long.mailing-list+bounces-12345-user=example.com@lists.example.org";
    let reply = fwd.ask(format!("get {long}\n").as_bytes());
    let srs = reply.trim_end().strip_prefix("200 ").unwrap().to_owned();
    // postsrsd's alias: SRS0 over "<32 base32hex of SHA-1(sender)>@1".
    let key = postern_srsd::envelope_db::key_for(long);
    assert!(
        srs.starts_with("SRS0=") && srs.ends_with(&format!("=1={key}@example.com")),
        "{srs}"
    );
    assert!(srs.split('@').next().unwrap().len() <= 64);
    assert_eq!(
        rev.ask(format!("get {srs}\n").as_bytes()),
        format!("200 {long}\n")
    );
    // An SRS address from another forwarder is wrapped as SRS1, not stored (as postsrsd).
    let other = "SRS0=abcd=2W=orig.example=someone@other.example";
    let reply = fwd.ask(format!("get {other}\n").as_bytes());
    assert!(
        reply.starts_with("200 SRS1=")
            && reply.ends_with("=other.example==abcd=2W=orig.example=someone@example.com\n"),
        "{reply}"
    );

    // The same address at a daemon without the database: an error, never the key as a sender.
    let embedded = Srsd::start(&format!("secrets_file = \"{}\"\n", secret.display()));
    let mut rev = embedded.connect(embedded.reverse);
    assert_eq!(
        rev.ask(format!("get {srs}\n").as_bytes()),
        "400 No database for alias.\n"
    );
    let mut map = embedded.connect(embedded.socketmap);
    assert_eq!(
        map.map(&format!("reverse {srs}")),
        "27:PERM No database for alias.,"
    );
}

#[test]
fn database_mode_on_redis_uses_postsrsd_keys() {
    if !Path::new("/usr/bin/redis-server").exists() || !Path::new("/usr/bin/redis-cli").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "redis-server/redis-cli missing (install redis-server; tests/setup.sh does)"
        );
        eprintln!("skipped: redis-server/redis-cli missing (install redis-server)");
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let redis = KillOnDrop(
        Command::new("/usr/bin/redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(data.path())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + TIMEOUT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server not listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    let cli = |args: &[&str]| -> String {
        let out = Command::new("/usr/bin/redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim_end().to_owned()
    };
    let srsd = Srsd::start(&format!(
        "original_envelope = \"database\"\nenvelope_database = \"redis://127.0.0.1:{port}/\"\n"
    ));
    let mut fwd = srsd.connect(srsd.forward);
    let mut rev = srsd.connect(srsd.reverse);
    let sender = "bounces+12345-user=example.com@lists.example.org";
    let reply = fwd.ask(format!("get {sender}\n").as_bytes());
    assert!(reply.starts_with("200 SRS0="), "{reply}");
    let key = postern_srsd::envelope_db::key_for(sender);
    // Stored where postsrsd stores it, with a lifetime.
    assert_eq!(cli(&["GET", &format!("PostSRSd/{key}@1")]), sender);
    let ttl: u64 = cli(&["TTL", &format!("PostSRSd/{key}@1")]).parse().unwrap();
    assert!(ttl > 21 * 86_400 - 60, "{ttl}");
    // An alias postsrsd stored reverses here: sign its SRS0 with our (generated) secret.
    let theirs = "someone.else@example.net";
    let their_key = postern_srsd::envelope_db::key_for(theirs);
    assert_eq!(
        cli(&[
            "SETEX",
            &format!("PostSRSd/{their_key}@1"),
            "1814400",
            theirs
        ]),
        "OK"
    );
    let secret = std::fs::read_to_string(srsd.dir.path().join("state/srs.secret")).unwrap();
    let ours = Srs {
        secrets: vec![Secret::new(secret.trim().as_bytes())],
        ..tops3cr3t(HashAlphabet::Base64url)
    };
    let srs = ours.forward(&their_key, "1", "example.com", now());
    assert_eq!(
        rev.ask(format!("get {srs}\n").as_bytes()),
        format!("200 {theirs}\n")
    );
    drop(redis);
}

/// A helper process, killed however the test ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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
    let srsd = Srsd::start("");
    assert_eq!(worker_threads(srsd.child.id()), 1);
    let srsd = Srsd::start("worker_threads = 3\n");
    assert_eq!(worker_threads(srsd.child.id()), 3);
}
