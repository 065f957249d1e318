//! Debian's postsrsd (1.x, tcp_table) and postern-srsd side by side with the same secret: every
//! reply line is byte-identical, rewritten or not, and each one's SRS addresses reverse in the
//! other. Needs /usr/sbin/postsrsd (tests/setup.sh installs the `postsrsd` package): without it
//! the test fails when `CI` is set and is skipped with a printed reason otherwise.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use postern_srsd::proto::tcp_table::encode_key;
use postern_srsd::srs::timestamp;

const POSTSRSD: &str = "/usr/sbin/postsrsd";
const TIMEOUT: Duration = Duration::from_secs(10);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_listening(child: &mut Child, ports: &[u16], what: &str) {
    let deadline = Instant::now() + TIMEOUT;
    for &port in ports {
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{what} exited with {status}");
            }
            assert!(
                Instant::now() < deadline,
                "{what} is not listening on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

struct Table(BufReader<TcpStream>);

impl Table {
    fn connect(port: u16) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        Self(BufReader::new(stream))
    }

    /// The whole reply line to `get <key>`.
    fn get(&mut self, key: &str) -> String {
        self.0
            .get_mut()
            .write_all(format!("get {}\n", encode_key(key)).as_bytes())
            .unwrap();
        let mut line = String::new();
        self.0.read_line(&mut line).unwrap();
        assert!(line.ends_with('\n'), "cut reply {line:?} to {key:?}");
        line
    }
}

/// The address in a `200` line, decoded.
fn found(line: &str) -> String {
    let value = line
        .strip_prefix("200 ")
        .unwrap_or_else(|| panic!("not found: {line:?}"));
    postern_srsd::proto::tcp_table::decode_key(value.trim_end()).unwrap()
}

#[test]
fn every_reply_is_byte_identical_to_postsrsd_1x() {
    if !Path::new(POSTSRSD).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{POSTSRSD} is missing (install the postsrsd package; tests/setup.sh does)"
        );
        eprintln!("skipped: {POSTSRSD} is missing (install the postsrsd package)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("postsrsd.secret");
    std::fs::write(&secret, "interop s3cret\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();

    let (pf, pr, of, or) = (free_port(), free_port(), free_port(), free_port());
    // postsrsd's getopt wants option values attached; it stays in the foreground without -D.
    let mut peer = Command::new(POSTSRSD)
        .args([
            "-4",
            "-l127.0.0.1",
            "-dfwd.example",
            "-Xlocal.example,.sub.example",
        ])
        .arg(format!("-f{pf}"))
        .arg(format!("-r{pr}"))
        .arg(format!("-s{}", secret.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(&mut peer, &[pf, pr], "postsrsd");
    let _peer = Killed(peer);

    let config = dir.path().join("srsd.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\nsrs_domain = \"fwd.example\"\ndomains = [\"local.example\", \".sub.example\"]\nsecrets_file = \"{}\"\nhash_alphabet = \"base64\"\nforward_listen = \"inet:127.0.0.1:{of}\"\nreverse_listen = \"inet:127.0.0.1:{or}\"\n",
            dir.path().join("state").display(),
            secret.display()
        ),
    )
    .unwrap();
    let mut ours = Command::new(env!("CARGO_BIN_EXE_postern-srsd"))
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(&mut ours, &[of, or], "postern-srsd");
    let _ours = Killed(ours);

    let (mut peer_fwd, mut peer_rev) = (Table::connect(pf), Table::connect(pr));
    let (mut our_fwd, mut our_rev) = (Table::connect(of), Table::connect(or));

    let forwards = [
        "alice@example.org",
        "Bob.Smith+tag@Mixed.Case.Example",
        "x@a.b",
        "user=with=equals@example.net",
        "a b%c@example.net",
        "SRS0=abcd=2W=orig.example=someone@other-forwarder.example",
        "SRS0+abcd=2W=orig.example=someone@other-forwarder.example",
        "SRS1=abcd=orig.example==xyzw=2W=a.example=b@other-forwarder.example",
        "SRS1=abcd@other-forwarder.example",
        "carol@local.example",
        "carol@LOCAL.Example",
        "dave@x.sub.example",
        "erin@sub.example",
        "postmaster",
    ];
    let mut ours_rewritten = Vec::new();
    for sender in forwards {
        let theirs = peer_fwd.get(sender);
        let mine = our_fwd.get(sender);
        assert_eq!(mine, theirs, "forward of {sender:?}");
        if mine.starts_with("200 ") {
            ours_rewritten.push((sender, found(&mine)));
        }
    }
    assert!(ours_rewritten.len() >= 8, "{ours_rewritten:?}");

    // Each reverses the other's addresses (the same ones, byte for byte) to the same answer.
    for (sender, srs) in &ours_rewritten {
        let theirs = peer_rev.get(srs);
        assert_eq!(our_rev.get(srs), theirs, "reverse of {srs:?}");
        let expected = if sender.starts_with("SRS") {
            // SRS0/SRS1 from another forwarder unwraps to an SRS0 address at that forwarder.
            found(&theirs)
        } else {
            (*sender).to_owned()
        };
        assert_eq!(found(&theirs), expected, "{srs}");
        // Already ours: neither wraps it again.
        assert_eq!(
            our_fwd.get(srs),
            peer_fwd.get(srs),
            "forward of our own {srs:?}"
        );
    }

    // Refusals carry libsrs2's texts in both.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let stamp = timestamp(now);
    let (_, good) = &ours_rewritten[0];
    let reverses = [
        "bob@fwd.example".to_owned(),
        "SRS0=vmyz=2W=otherdomain.com=test@fwd.example".to_owned(),
        format!("SRS0=AAAA={stamp}{}", &good[12..]),
        format!("SRS0=zzzz={stamp}=example.org=alice@fwd.example"),
        format!("SRS0=abc={stamp}=example.org=alice@fwd.example"),
        format!("SRS0=={stamp}=example.org=alice@fwd.example"),
        "SRS0=abcd=2!=example.org=alice@fwd.example".to_owned(),
        "SRS0=abcd@fwd.example".to_owned(),
        "SRS0=abcd=2W@fwd.example".to_owned(),
        "SRS0=abcd=2W=example.org@fwd.example".to_owned(),
        "SRS1=abcd=host@fwd.example".to_owned(),
        "SRS1=abcd@fwd.example".to_owned(),
        "srs0=x=y=z=w@elsewhere.example".to_owned(),
    ];
    for address in &reverses {
        let theirs = peer_rev.get(address);
        assert!(theirs.starts_with("500 "), "{address}: {theirs}");
        assert_eq!(our_rev.get(address), theirs, "reverse of {address:?}");
    }
}
