//! The DMARC report store on real PostgreSQL and MariaDB servers started by the test in a temporary
//! directory on free loopback ports: schema, unique keys, report state, expiry, and records
//! spooled while the server is down and replayed once it is up.
//!
//! Needs Debian's postgresql (initdb/pg_ctl under /usr/lib/postgresql/*/bin, run as the
//! `postgres` user) and mariadb-server (mariadb-install-db, mariadbd). When a server cannot be
//! started the test fails if the environment variable CI is set, and is skipped otherwise.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use postern_milter::reports::{DkimAuth, PublishedPolicy, Recorder, ReportRecord, ReportsConfig};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn unavailable(what: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{what} (CI is set, so this is a failure)");
    }
    eprintln!("skipped: {what}");
}

fn wait_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn record(i: i64) -> ReportRecord {
    ReportRecord {
        received: 1_790_000_000 + i,
        job_id: format!("Q{i}"),
        source_ip: "192.0.2.25".into(),
        header_from: "example.com".into(),
        envelope_from: "bounce.example.com".into(),
        envelope_to: "receiver.test".into(),
        spf_domain: "bounce.example.com".into(),
        spf_scope: "mfrom".into(),
        spf_result: "pass".into(),
        dkim: vec![DkimAuth {
            domain: "example.com".into(),
            selector: "ed".into(),
            result: "pass".into(),
        }],
        dkim_aligned: true,
        spf_aligned: true,
        disposition: "none".into(),
        reasons: Vec::new(),
        published: PublishedPolicy {
            rua: vec!["dmarc@example.com".into()],
            p: "reject".into(),
            ..PublishedPolicy::absent("example.com")
        },
    }
}

/// The same scenario on any backend: the server is down for the first records (spooled), then
/// up (replayed, no loss, no duplicates), then the store's operations.
async fn scenario(url: &str, state: &Path, start_server: impl FnOnce() -> bool) {
    let config = ReportsConfig {
        store: url.to_owned(),
        spool_file: state.join("spool"),
        store_retry_interval: postern_common::config::ConfigDuration::from_secs(0),
        ..ReportsConfig::default()
    };
    let recorder = Recorder::open(&config, state).await;
    for i in 0..3 {
        recorder.record(&record(i)).await.unwrap();
    }
    assert_eq!(
        std::fs::read_to_string(state.join("spool"))
            .unwrap()
            .lines()
            .count(),
        3
    );
    assert!(start_server(), "server did not start");
    for i in 3..5 {
        recorder.record(&record(i)).await.unwrap();
    }
    assert!(!state.join("spool").exists());
    let store = recorder.store().await.expect("connected");
    assert_eq!(store.count().await.unwrap(), 5);
    assert!(store.insert("dup", &record(9)).await.unwrap());
    assert!(
        !store.insert("dup", &record(9)).await.unwrap(),
        "unique key"
    );
    assert_eq!(store.count().await.unwrap(), 6);
    let records = store.records("example.com", 0, i64::MAX).await.unwrap();
    assert_eq!(records.len(), 6);
    assert_eq!(records[0], record(0));
    assert_eq!(
        store.domains().await.unwrap(),
        vec![("example.com".to_owned(), 1_790_000_000)]
    );
    assert_eq!(store.last_end("example.com").await.unwrap(), None);
    store.set_last_end("example.com", 100).await.unwrap();
    store.set_last_end("example.com", 200).await.unwrap();
    assert_eq!(store.last_end("example.com").await.unwrap(), Some(200));
    assert!(!store.was_sent("r1", "a@b").await.unwrap());
    store.mark_sent("r1", "a@b", 1_790_000_000).await.unwrap();
    store.mark_sent("r1", "a@b", 1_790_000_000).await.unwrap();
    assert!(store.was_sent("r1", "a@b").await.unwrap());
    assert_eq!(store.delete_before(1_790_000_003).await.unwrap(), 3);
    assert_eq!(store.count().await.unwrap(), 3);
    store.close().await;
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The uid and gid of the `postgres` user (PostgreSQL refuses to run as root).
fn postgres_ids() -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

fn pg_bin(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .collect();
    dirs.sort();
    dirs.into_iter()
        .rev()
        .map(|d| d.join(name))
        .find(|p| p.exists())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_store_and_spool_replay() {
    let (Some(initdb), Some(postgres), Some((uid, gid))) =
        (pg_bin("initdb"), pg_bin("postgres"), postgres_ids())
    else {
        return unavailable(
            "PostgreSQL binaries or user not installed (Debian package postgresql)",
        );
    };
    let dir = tempfile::Builder::new()
        .prefix("postern-pg")
        .tempdir()
        .unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let chown = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir.path())
        .status();
    let init = Command::new(&initdb)
        .uid(uid)
        .gid(gid)
        .args(["--auth=trust", "-U", "postgres", "-E", "UTF8", "-D"])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    match (chown, init) {
        (Ok(c), Ok(out)) if c.success() && out.status.success() => {}
        (_, out) => {
            return unavailable(&format!(
                "initdb failed: {:?}",
                out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            ));
        }
    }
    let port = free_port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let mut server: Option<Server> = None;
    let start = || {
        // Run directly (not through runuser) so that dropping the Server kills the postmaster.
        let child = Command::new(&postgres)
            .uid(uid)
            .gid(gid)
            .arg("-D")
            .arg(&data)
            .args([
                "-p",
                &port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-k",
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(child) => {
                server = Some(Server(child));
                wait_port(port, Duration::from_secs(30))
            }
            Err(_) => false,
        }
    };
    scenario(&url, &state, start).await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_store_and_spool_replay() {
    if Command::new("mariadbd").arg("--version").output().is_err() {
        return unavailable("mariadbd not installed (Debian package mariadb-server)");
    }
    let dir = tempfile::Builder::new()
        .prefix("postern-maria")
        .tempdir()
        .unwrap();
    let data = dir.path().join("data");
    let install = Command::new("mariadb-install-db")
        .arg("--no-defaults")
        .arg(format!("--datadir={}", data.display()))
        .args([
            "--user=root",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    match install {
        Ok(out) if out.status.success() => {}
        out => {
            return unavailable(&format!(
                "mariadb-install-db failed: {:?}",
                out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            ));
        }
    }
    let port = free_port();
    let url = format!("mysql://root@127.0.0.1:{port}/mysql");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let mut server: Option<Server> = None;
    let start = || {
        let child = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", dir.path().join("sock").display()))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .args([
                "--user=root",
                "--bind-address=127.0.0.1",
                "--skip-grant-tables",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=16M",
            ])
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(child) => {
                server = Some(Server(child));
                wait_port(port, Duration::from_secs(30))
            }
            Err(_) => false,
        }
    };
    scenario(&url, &state, start).await;
    drop(server);
}
