//! The milter connection over raw milter packets on 127.0.0.1:0: what is negotiated, a whole
//! message answered in one piece, a message under way when the daemon stops is still answered,
//! stages not negotiated away are answered, and a second message reuses the connection.

use std::sync::Arc;
use std::time::Duration;

use postern_common::daemon::Daemon;
use postern_common::listen::Listener;
use postern_milter::config::MilterConfig;
use postern_milter::server::{self, Milter};
use postern_tests::dns::{TestDns, Zone};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn packet(command: u8, data: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(data.len() + 1)
        .unwrap()
        .to_be_bytes()
        .to_vec();
    out.push(command);
    out.extend_from_slice(data);
    out
}

fn negotiate(protocol: u32) -> Vec<u8> {
    let mut data = 6u32.to_be_bytes().to_vec();
    data.extend_from_slice(&0x1ffu32.to_be_bytes());
    data.extend_from_slice(&protocol.to_be_bytes());
    packet(b'O', &data)
}

/// The packets of one message, MAIL to end of message, as Postfix sends them.
fn message_packets(with_end: bool) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(packet(b'D', b"Mi\0\0"));
    out.extend(packet(b'M', b"<alice@example.org>\0"));
    out.extend(packet(b'R', b"<bob@dest.example>\0"));
    out.extend(packet(b'L', b"From\0 Alice <alice@example.org>\0"));
    out.extend(packet(b'L', b"Subject\0 hello\0"));
    out.extend(packet(b'N', b""));
    if with_end {
        out.extend(end_packets());
    }
    out
}

fn end_packets() -> Vec<u8> {
    let mut out = packet(b'B', b"Hello Bob.\r\n");
    out.extend(packet(b'D', b"Ei\x004QTEST\0"));
    out.extend(packet(b'E', b""));
    out
}

/// Splits bytes into (command, data) packets; panics on a partial one.
fn packets(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert!(bytes.len() >= 4 + len, "partial packet in {bytes:?}");
        out.push((bytes[4], bytes[5..4 + len].to_vec()));
        bytes = &bytes[4 + len..];
    }
    out
}

struct Server {
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dns: TestDns,
    _dir: tempfile::TempDir,
}

/// The milter verifying only (no keys), DMARC off, its DNS a test server with nothing in it.
async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let dns = TestDns::start(Zone::new()).await.unwrap();
    let mut config = MilterConfig {
        state_dir: dir.path().to_path_buf(),
        authserv_id: "mx.test".to_owned(),
        ..MilterConfig::default()
    };
    config.dns.nameservers = vec![dns.addr()];
    config.dmarc.enabled = false;
    let milter = Milter::build(Arc::new(config.clone())).unwrap();
    let (live, receiver) = watch::channel(Arc::new(milter));
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let listener = Listener::from_std_tcp(std_listener).unwrap();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let done = tokio::spawn(async move {
        // The sender lives as long as the server: a dropped sender ends nothing, but keeps the
        // configuration the tests started with.
        let _live = live;
        server::serve(listener, &config, receiver, None, token).await
    });
    Server {
        addr,
        shutdown,
        done,
        _dns: dns,
        _dir: dir,
    }
}

async fn read_some(stream: &mut TcpStream) -> Vec<u8> {
    let mut buf = vec![0u8; 65536];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    buf.truncate(n);
    buf
}

/// Connects and negotiates everything Postfix offers; returns the negotiated protocol flags.
async fn connect(server: &Server, protocol: u32) -> (TcpStream, u32, u32) {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    stream.write_all(&negotiate(protocol)).await.unwrap();
    let reply = packets(&read_some(&mut stream).await);
    assert_eq!(reply.len(), 1, "{reply:?}");
    let (command, data) = &reply[0];
    assert_eq!(*command, b'O');
    let field = |i: usize| u32::from_be_bytes(data[i * 4..i * 4 + 4].try_into().unwrap());
    assert_eq!(field(0), 6);
    (stream, field(1), field(2))
}

#[tokio::test]
async fn negotiates_and_answers_a_whole_message_in_one_piece() {
    let server = start().await;
    let (mut stream, actions, protocol) = connect(&server, 0x1f_ffff).await;
    // Add, change headers, quarantine, and the macro list; every no-reply stage, no DATA, no
    // unknown commands, leading spaces.
    assert_eq!(actions, 0x01 | 0x10 | 0x20 | 0x100);
    assert_eq!(
        protocol,
        0x1000 | 0x2000 | 0x4000 | 0x8000 | 0x80 | 0x40000 | 0x80000 | 0x200 | 0x100 | 0x100000
    );
    let mut session = packet(b'D', b"Cj\0mx.test\0{daemon_name}\0smtpd\0");
    session.extend(packet(b'C', b"mail.example.org\x004\x0f\xa0192.0.2.1\0"));
    session.extend(packet(b'H', b"mail.example.org\0"));
    stream.write_all(&session).await.unwrap();
    for _ in 0..3 {
        // The whole message in one write; the answer (the header it adds, then the verdict)
        // comes back in one piece: the first read has all of it.
        stream.write_all(&message_packets(true)).await.unwrap();
        let answer = packets(&read_some(&mut stream).await);
        let commands: Vec<u8> = answer.iter().map(|(c, _)| *c).collect();
        assert_eq!(commands, b"ic", "{answer:?}");
        let header = String::from_utf8_lossy(&answer[0].1[4..]).into_owned();
        assert!(
            header.starts_with("Authentication-Results\0 mx.test;\n\tdkim=none"),
            "{header:?}"
        );
    }
    stream.write_all(&packet(b'Q', b"")).await.unwrap();
    assert_eq!(read_some(&mut stream).await, b"", "closed after QUIT");
    server.shutdown.cancel();
    server.done.await.unwrap().unwrap();
}

#[tokio::test]
async fn stages_the_mta_waits_for_are_answered() {
    let server = start().await;
    // An MTA that offers no no-reply stages (and no leading space): every stage is answered.
    let (mut stream, _, protocol) = connect(&server, 0x37f).await;
    assert_eq!(
        protocol,
        0x200 | 0x100,
        "only NO_DATA and NO_UNKNOWN are left to ask for"
    );
    stream
        .write_all(&packet(b'C', b"mail.example.org\x004\x0f\xa0192.0.2.1\0"))
        .await
        .unwrap();
    assert_eq!(packets(&read_some(&mut stream).await), [(b'c', vec![])]);
    stream.write_all(&packet(b'H', b"h\0")).await.unwrap();
    assert_eq!(packets(&read_some(&mut stream).await), [(b'c', vec![])]);
    // MAIL, RCPT, two headers, end of headers, body: six answers, then the header and verdict.
    stream.write_all(&message_packets(true)).await.unwrap();
    let mut answers = Vec::new();
    while answers.len() < 8 {
        answers.extend(packets(&read_some(&mut stream).await));
    }
    let commands: Vec<u8> = answers.iter().map(|(c, _)| *c).collect();
    assert_eq!(commands, b"ccccccic");
    // An abort in the middle of a message: no answer; the next message is served.
    stream.write_all(&message_packets(false)).await.unwrap();
    let mut answers = Vec::new();
    while answers.len() < 5 {
        answers.extend(packets(&read_some(&mut stream).await));
    }
    stream.write_all(&packet(b'A', b"")).await.unwrap();
    stream.write_all(&message_packets(true)).await.unwrap();
    let mut answers = Vec::new();
    while answers.len() < 8 {
        answers.extend(packets(&read_some(&mut stream).await));
    }
    assert_eq!(answers.last().unwrap().0, b'c');
}

#[tokio::test]
async fn a_message_under_way_at_shutdown_is_answered_then_the_connection_closes() {
    let server = start().await;
    let (mut stream, _, _) = connect(&server, 0x1f_ffff).await;
    let mut start_of_message = packet(b'C', b"mail.example.org\x004\x0f\xa0192.0.2.1\0");
    start_of_message.extend(packet(b'H', b"mail.example.org\0"));
    start_of_message.extend(message_packets(false));
    stream.write_all(&start_of_message).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The rest of the message still gets its answer.
    stream.write_all(&end_packets()).await.unwrap();
    let answer = packets(&read_some(&mut stream).await);
    let commands: Vec<u8> = answer.iter().map(|(c, _)| *c).collect();
    assert_eq!(commands, b"ic", "{answer:?}");
    // Then the connection is closed rather than kept for another message.
    assert_eq!(read_some(&mut stream).await, b"");
    tokio::time::timeout(Duration::from_secs(5), server.done)
        .await
        .expect("the server stops once the message is answered")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn an_idle_connection_is_closed_at_shutdown() {
    let server = start().await;
    let (mut stream, _, _) = connect(&server, 0x1f_ffff).await;
    server.shutdown.cancel();
    assert_eq!(read_some(&mut stream).await, b"");
    tokio::time::timeout(Duration::from_secs(5), server.done)
        .await
        .expect("stopped")
        .unwrap()
        .unwrap();
}
