//! postern-srsd beside Debian's postsrsd (1.x, tcp_table) with the same secret: the same forward
//! addresses byte for byte, and each one's addresses reverse in the other. Also SRS over
//! socketmap through a real Postfix.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use postern_tests::clients::Target;
use postern_tests::clients::tcp_table::{TableReply, TcpTableClient};
use postern_tests::daemon::{DaemonProcess, free_port};
use postern_tests::postfix::{self, PostfixInstance};
use postern_tests::smtp::Outgoing;

struct Postsrsd(Child);

impl Drop for Postsrsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_postsrsd(secret: &std::path::Path, forward: u16, reverse: u16) -> Postsrsd {
    let mut child = Command::new("/usr/sbin/postsrsd")
        // postsrsd's getopt wants option values attached ("-Xdomain").
        .args(["-4", "-l127.0.0.1", "-dfwd.example", "-Xlocal.example"])
        .arg(format!("-f{forward}"))
        .arg(format!("-r{reverse}"))
        .arg(format!("-s{}", secret.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("postsrsd starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", reverse)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            panic!("postsrsd exited with {status}: {err}");
        }
        assert!(Instant::now() < deadline, "postsrsd not listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    Postsrsd(child)
}

fn target(port: u16) -> Target {
    format!("127.0.0.1:{port}").parse().unwrap()
}

#[tokio::test]
async fn same_addresses_as_postsrsd_and_each_reverses_the_others() {
    if !postern_tests::require(
        std::path::Path::new("/usr/sbin/postsrsd").exists(),
        "Debian's postsrsd is not installed (tests/setup.sh installs it)",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("postsrsd.secret");
    std::fs::write(&secret, "interop s3cret\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (pf, pr, of, or) = (free_port(), free_port(), free_port(), free_port());
    let _peer = start_postsrsd(&secret, pf, pr);
    let _ours = DaemonProcess::start(
        "srsd",
        &format!(
            "state_dir = \"@STATE@\"\nsrs_domain = \"fwd.example\"\ndomains = [\"local.example\"]\nsecrets_file = \"{}\"\nhash_alphabet = \"base64\"\nforward_listen = \"inet:127.0.0.1:{of}\"\nreverse_listen = \"inet:127.0.0.1:{or}\"\n",
            secret.display()
        ),
        &[of, or],
    )
    .unwrap();
    let (mut peer_fwd, mut peer_rev) = (
        TcpTableClient::connect(&target(pf)).await.unwrap(),
        TcpTableClient::connect(&target(pr)).await.unwrap(),
    );
    let (mut our_fwd, mut our_rev) = (
        TcpTableClient::connect(&target(of)).await.unwrap(),
        TcpTableClient::connect(&target(or)).await.unwrap(),
    );
    let senders = [
        "alice@example.org",
        "Bob.Smith+tag@Mixed.Case.Example",
        "x@a.b",
        "user=with=equals@example.net",
        "SRS0=abcd=2W=orig.example=someone@other-forwarder.example",
    ];
    for sender in senders {
        let TableReply::Found(theirs) = peer_fwd.get(sender).await.unwrap() else {
            panic!("postsrsd did not rewrite {sender}")
        };
        let TableReply::Found(ours) = our_fwd.get(sender).await.unwrap() else {
            panic!("we did not rewrite {sender}")
        };
        assert_eq!(ours, theirs, "forward of {sender}");
        let expected = if sender.starts_with("SRS0=") {
            "SRS0=abcd=2W=orig.example=someone@other-forwarder.example".to_owned()
        } else {
            sender.to_owned()
        };
        assert_eq!(
            our_rev.get(&theirs).await.unwrap(),
            TableReply::Found(expected.clone()),
            "we reverse postsrsd's {theirs}"
        );
        assert_eq!(
            peer_rev.get(&ours).await.unwrap(),
            TableReply::Found(expected),
            "postsrsd reverses our {ours}"
        );
    }
    // Neither rewrites the local domain or its own domain.
    assert!(matches!(
        peer_fwd.get("carol@local.example").await.unwrap(),
        TableReply::NotFound(_)
    ));
    assert!(matches!(
        our_fwd.get("carol@local.example").await.unwrap(),
        TableReply::NotFound(_)
    ));
    // A forged address reverses in neither.
    assert!(matches!(
        our_rev
            .get("SRS0=XXXX=2W=example.org=alice@fwd.example")
            .await
            .unwrap(),
        TableReply::NotFound(_)
    ));
    assert!(!matches!(
        peer_rev
            .get("SRS0=XXXX=2W=example.org=alice@fwd.example")
            .await
            .unwrap(),
        TableReply::Found(_)
    ));
}

#[tokio::test]
async fn srs_over_socketmap_through_postfix() {
    if !postern_tests::require(
        postfix::available().is_ok(),
        &format!("{:?}", postfix::available()),
    ) {
        return;
    }
    let port = free_port();
    let srsd = DaemonProcess::start(
        "srsd",
        &format!("state_dir = \"@STATE@\"\nsrs_domain = \"test.example\"\nforward_listen = \"off\"\nreverse_listen = \"off\"\nsocketmap_listen = \"inet:127.0.0.1:{port}\"\n"),
        &[port],
    )
    .unwrap();
    let postfix = PostfixInstance::builder()
        .main_cf(format!(
            "sender_canonical_maps = socketmap:inet:127.0.0.1:{port}:forward"
        ))
        .main_cf("sender_canonical_classes = envelope_sender")
        .main_cf(format!(
            "recipient_canonical_maps = socketmap:inet:127.0.0.1:{port}:reverse"
        ))
        .main_cf("recipient_canonical_classes = envelope_recipient, header_recipient")
        .relay_domains("dest.example, test.example")
        .start()
        .await
        .unwrap();
    let data = b"From: <erin@dest.example>\r\nTo: <frank@dest.example>\r\nSubject: socketmap\r\n\r\nforwarded\r\n".to_vec();
    let forward = Outgoing {
        helo: "mx.dest.example".into(),
        from: "erin@dest.example".into(),
        to: vec!["frank@dest.example".into()],
        data: data.clone(),
    };
    assert!(postfix.send(&forward).await.unwrap().accepted());
    let delivered = postfix
        .wait_delivered(1, Duration::from_secs(30))
        .await
        .unwrap();
    let srs = delivered[0].mail_from.clone();
    assert!(
        srs.starts_with("SRS0=") && srs.ends_with("=dest.example=erin@test.example"),
        "{srs}"
    );
    let bounce = Outgoing {
        helo: "mx.dest.example".into(),
        from: String::new(),
        to: vec![srs.clone()],
        data,
    };
    assert!(postfix.send(&bounce).await.unwrap().accepted());
    let delivered = postfix
        .wait_delivered(2, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(delivered[1].rcpt_to, vec!["erin@dest.example"]);
    srsd.wait_log("direction=\"reverse\"", Duration::from_secs(5))
        .unwrap();
}

fn srsd_db_config(url: &str, f: u16, r: u16) -> String {
    format!(
        "state_dir = \"@STATE@\"\nsrs_domain = \"fwd.example\"\noriginal_envelope = \"database\"\nenvelope_database = \"{url}\"\nforward_listen = \"inet:127.0.0.1:{f}\"\nreverse_listen = \"inet:127.0.0.1:{r}\"\n"
    )
}

const LONG_SENDER: &str =
    "a.rather.long.mailing-list+bounces-12345-user=example.com@lists.subdomain.example.org";

#[tokio::test]
async fn database_mode_keeps_long_senders_within_64_octets() {
    let (f, r) = (free_port(), free_port());
    let _srsd = DaemonProcess::start("srsd", &srsd_db_config("", f, r), &[f, r]).unwrap();
    let mut fwd = TcpTableClient::connect(&target(f)).await.unwrap();
    let mut rev = TcpTableClient::connect(&target(r)).await.unwrap();
    let TableReply::Found(srs) = fwd.get(LONG_SENDER).await.unwrap() else {
        panic!()
    };
    let local = srs.split('@').next().unwrap();
    assert!(local.len() <= 64, "{srs}");
    assert!(srs.starts_with("SRS0=") && srs.contains("=1="), "{srs}");
    assert_eq!(
        rev.get(&srs).await.unwrap(),
        TableReply::Found(LONG_SENDER.into())
    );
    // A key nobody stored: not found, and no crash.
    let unknown = srs.replace(&local[local.len() - 4..], "0000");
    assert!(matches!(
        rev.get(&unknown).await.unwrap(),
        TableReply::NotFound(_)
    ));
}

struct RedisServer(Child, u16, #[allow(dead_code)] tempfile::TempDir);

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis() -> Option<RedisServer> {
    if !postern_tests::require(
        std::path::Path::new("/usr/bin/redis-server").exists(),
        "redis-server is not installed (tests/setup.sh installs it)",
    ) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Command::new("/usr/bin/redis-server")
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
        .arg(dir.path())
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server not listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(RedisServer(child, port, dir))
}

#[tokio::test]
async fn database_mode_on_redis_is_shared_by_two_mx_hosts_and_survives_an_outage() {
    let Some(redis) = start_redis() else { return };
    let url = format!("redis://127.0.0.1:{}/", redis.1);
    let (f1, r1, f2, r2) = (free_port(), free_port(), free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "shared secret\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let with_secret = |f, r| {
        format!(
            "{}secrets_file = \"{}\"\n",
            srsd_db_config(&url, f, r),
            secret.display()
        )
    };
    let _mx1 = DaemonProcess::start("srsd", &with_secret(f1, r1), &[f1, r1]).unwrap();
    let mx2 = DaemonProcess::start("srsd", &with_secret(f2, r2), &[f2, r2]).unwrap();
    let TableReply::Found(srs) = TcpTableClient::connect(&target(f1))
        .await
        .unwrap()
        .get(LONG_SENDER)
        .await
        .unwrap()
    else {
        panic!()
    };
    let mut rev2 = TcpTableClient::connect(&target(r2)).await.unwrap();
    assert_eq!(
        rev2.get(&srs).await.unwrap(),
        TableReply::Found(LONG_SENDER.into())
    );
    drop(redis);
    // Redis gone: a temporary error (Postfix defers), within the store timeout, no crash.
    let started = Instant::now();
    assert!(
        matches!(rev2.get(&srs).await.unwrap(), TableReply::Error(line) if line.starts_with("400 "))
    );
    assert!(started.elapsed() < Duration::from_secs(8));
    mx2.wait_log("envelope database unavailable", Duration::from_secs(5))
        .unwrap();
}
