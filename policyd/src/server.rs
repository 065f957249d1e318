//! The I/O around the policy codec: one task per connection, requests answered in order, bad
//! input logged once and that connection closed. Works over any byte stream, so `--stdio` (a
//! Postfix `spawn` service) uses the same code as the listeners.

use std::sync::Arc;
use std::time::Duration;

use postern_common::config::ConfigError;
use postern_common::daemon::{Daemon, DaemonContext};
use postern_common::listen::{self, PeerAddr};
use postern_common::serve::{self, FrameReader, NextFrame, ServeOptions};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Check, PolicydConfig};
use crate::greylist::Greylist;
use crate::proto::{PolicyDecoder, PolicyReply, PolicyRequest};
use crate::spf::SpfCheck;

/// The live state: what a request is decided with. Rebuilt on SIGHUP (whitelists reread,
/// store reopened).
#[derive(Debug)]
pub struct Policyd {
    /// The configuration it was built from.
    pub config: Arc<PolicydConfig>,
    /// Greylisting; built whatever the listeners say, since `policy_context=greylist` selects
    /// it on any listener.
    pub greylist: Greylist,
    /// SPF.
    pub spf: SpfCheck,
}

impl Daemon for Policyd {
    type Config = PolicydConfig;

    fn build(config: Arc<PolicydConfig>) -> Result<Self, ConfigError> {
        let greylist = Greylist::new(&config.greylist, &config.state_dir)?;
        let spf = SpfCheck::new(&config.spf, &config.dns)?;
        Ok(Self {
            config,
            greylist,
            spf,
        })
    }

    fn restart_needed(old: &PolicydConfig, new: &PolicydConfig) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if old
            .listen
            .iter()
            .map(|l| &l.address)
            .ne(new.listen.iter().map(|l| &l.address))
        {
            keys.push("listen");
        }
        if old.max_connections != new.max_connections {
            keys.push("max_connections");
        }
        if old.worker_threads != new.worker_threads {
            keys.push("worker_threads");
        }
        keys
    }
}

/// Which checks a request runs: Postfix's `policy_context` attribute names one
/// (`check_policy_service { inet:..., policy_context=spf }`); otherwise the listener's.
pub fn checks_for(request: &PolicyRequest, listener_checks: &[Check]) -> Vec<Check> {
    match request.get("policy_context").map(str::trim) {
        Some("spf") => vec![Check::Spf],
        Some("greylist") => vec![Check::Greylist],
        _ => listener_checks.to_vec(),
    }
}

/// Whether an action lets the next check run: DUNNO and PREPEND do (a PREPEND is kept and
/// sent unless a later check refuses); anything else (reject, defer, OK, a restriction class)
/// is final.
fn is_final(action: &str) -> bool {
    let verb = action.split_whitespace().next().unwrap_or("");
    !(verb.eq_ignore_ascii_case("DUNNO") || verb.eq_ignore_ascii_case("PREPEND"))
}

impl Policyd {
    /// Decides one request: the checks in order; the first final answer (reject, defer, ...)
    /// wins and stops the rest, so a message SPF refuses is not also greylisted. Otherwise the
    /// first PREPEND is sent (Postfix takes one action per answer; a later check's PREPEND is
    /// logged as dropped), else DUNNO.
    pub async fn decide(&self, request: &PolicyRequest, checks: &[Check]) -> PolicyReply {
        let mut answer: Option<(Check, PolicyReply, String)> = None;
        for &check in checks {
            let (reply, reason) = match check {
                Check::Greylist => {
                    let verdict = self.greylist.check(request).await;
                    (verdict.reply, verdict.reason)
                }
                Check::Spf => self.spf.check_with_reason(request).await,
            };
            metrics::counter!("postern_policyd_answers_total", "check" => check.name(),
                "action" => action_verb(reply.action()))
            .increment(1);
            let final_answer = is_final(reply.action());
            let is_dunno = reply.action().eq_ignore_ascii_case("DUNNO");
            if final_answer {
                answer = Some((check, reply, reason));
                break;
            }
            if !is_dunno {
                match &answer {
                    Some((first, kept, _)) if !kept.action().eq_ignore_ascii_case("DUNNO") => {
                        info!(
                            kept = first.name(),
                            dropped = check.name(),
                            action = reply.action(),
                            "one PREPEND per answer; this one is dropped"
                        );
                    }
                    _ => answer = Some((check, reply, reason)),
                }
            } else if answer.is_none() {
                answer = Some((check, reply, reason));
            }
        }
        let (check, reply, reason) =
            answer.unwrap_or((Check::Greylist, PolicyReply::dunno(), "no check".to_owned()));
        info!(
            client = request.get("client_address").unwrap_or(""),
            client_name = request.get("client_name").unwrap_or(""),
            sender = request.get("sender").unwrap_or(""),
            recipient = request.get("recipient").unwrap_or(""),
            queue_id = request.get("queue_id").unwrap_or(""),
            check = check.name(),
            action = reply.action(),
            reason = %reason,
            "decision"
        );
        reply
    }
}

/// The first word of an action, upper-cased, for metrics labels ("DEFER_IF_PERMIT", "450").
fn action_verb(action: &str) -> String {
    action
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_uppercase()
}

/// Answers requests from `stream` until the client closes, goes idle, sends garbage, or the
/// daemon shuts down.
pub async fn handle_connection<S>(
    stream: S,
    live: watch::Receiver<Arc<Policyd>>,
    listener_checks: Arc<[Check]>,
    peer: &PeerAddr,
    idle: Duration,
    shutdown: &CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut requests = FrameReader::new(
        FramedRead::new(stream, PolicyDecoder::default()),
        idle,
        shutdown,
    );
    loop {
        let request = match requests.next().await {
            NextFrame::Frame(request) => request,
            NextFrame::Closed | NextFrame::Shutdown => return,
            NextFrame::Idle => {
                info!(%peer, "closing idle connection");
                return;
            }
            NextFrame::Error(err) => {
                warn!(%peer, error = %err, "bad policy request; closing connection");
                metrics::counter!("postern_policyd_bad_requests_total").increment(1);
                return;
            }
        };
        let policyd = live.borrow().clone();
        let checks = checks_for(&request, &listener_checks);
        let reply = policyd.decide(&request, &checks).await;
        metrics::counter!("postern_policyd_requests_total").increment(1);
        let socket = requests.socket();
        if let Err(err) = async {
            socket.write_all(&reply.encode()).await?;
            socket.flush().await
        }
        .await
        {
            warn!(%peer, error = %err, "cannot send the answer; closing connection");
            return;
        }
    }
}

/// Serves every configured listener until shutdown.
pub async fn run(ctx: DaemonContext<Policyd>) -> anyhow::Result<()> {
    let config = ctx.config.clone();
    let mode = config.socket_mode_bits()?;
    let options = ServeOptions {
        max_connections: config.max_connections,
        idle_timeout: config.idle_timeout.get(),
        ..ServeOptions::default()
    };
    let listeners = listen::bind_all(config.listen.iter().map(|l| &l.address), mode).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for (listener, listener_config) in listeners.into_iter().zip(&config.listen) {
        let checks: Arc<[Check]> = listener_config.checks.clone().into();
        let live = ctx.live.clone();
        tasks.spawn(serve::serve(
            listener,
            options,
            ctx.shutdown.clone(),
            move |conn| {
                let live = live.clone();
                let checks = checks.clone();
                async move {
                    handle_connection(
                        conn.stream,
                        live,
                        checks,
                        &conn.peer,
                        conn.idle_timeout,
                        &conn.shutdown,
                    )
                    .await;
                }
            },
        ));
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    // Every connection is done: what the greylist answered is committed before the exit.
    let policyd = ctx.live.borrow().clone();
    policyd.greylist.close().await;
    Ok(())
}

/// Where `--stdio` logs. Postfix's spawn(8) connects the command's stdin, stdout *and stderr*
/// to the client socket, so a log line on stderr lands in the middle of the policy answers:
/// Postfix reads it as an attribute (`warning: missing attribute action in input from
/// private/policyd-spf`, then `451 4.3.5 Server configuration problem`), and once Postfix has
/// hung up, the next write fails and tracing's own error report panics the process. So when
/// stderr is the very socket stdout is, log to syslog as policyd-spf does (nowhere if there is
/// no /dev/log); otherwise (run by hand, or with stderr redirected) stderr as usual.
///
/// Call before [`postern_common::daemon::run`]: its logging setup then finds a subscriber
/// installed and leaves it. `config` is only read for `[log] level` (and `POSTERN_LOG` still
/// wins); a config that does not load is reported by `run` itself.
pub fn init_stdio_logging(config: Option<&std::path::Path>) {
    if !stderr_is_stdout_socket() {
        return;
    }
    let level = postern_common::config::load_path::<PolicydConfig>(config)
        .map(|(config, _)| config.log)
        .unwrap_or_default();
    let filter = std::env::var(postern_common::logging::LOG_ENV)
        .ok()
        .and_then(|level| {
            postern_common::logging::filter_for(&postern_common::config::LogConfig { level }).ok()
        })
        .or_else(|| postern_common::logging::filter_for(&level).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(syslog::Syslog::connect("postern-policyd"))
        .event_format(postern_common::logging::LineFormat { timestamps: false })
        .try_init();
    // The default hook prints to stderr, the socket.
    std::panic::set_hook(Box::new(|panic| tracing::error!("{panic}")));
}

/// Whether stderr and stdout are one and the same socket (Postfix's spawn).
fn stderr_is_stdout_socket() -> bool {
    use std::os::fd::AsFd;
    same_socket(std::io::stderr().as_fd(), std::io::stdout().as_fd())
}

/// Whether two descriptors refer to one socket.
fn same_socket(a: std::os::fd::BorrowedFd<'_>, b: std::os::fd::BorrowedFd<'_>) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let metadata = |fd: std::os::fd::BorrowedFd<'_>| {
        fd.try_clone_to_owned()
            .and_then(|fd| std::fs::File::from(fd).metadata())
            .ok()
    };
    match (metadata(a), metadata(b)) {
        (Some(a), Some(b)) => a.file_type().is_socket() && a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Log lines to the local syslog socket (/dev/log), facility mail, one datagram per event, in
/// the form glibc's syslog(3) sends without its timestamp (the receiver adds one).
///
/// Not syslog-tracing (libc's syslog(3) behind tracing's MakeWriter): syslog(3) sends on a
/// blocking socket, so a full /dev/log (journald rate-limiting, a stalled rsyslog) would stop
/// the worker that has Postfix waiting; here the socket is non-blocking and a line that does
/// not fit is dropped.
mod syslog {
    use std::io::Write;
    use std::os::unix::net::UnixDatagram;

    /// RFC 5424 §6.2.1 facility 2, mail system.
    const FACILITY_MAIL: u8 = 2;
    /// The local syslog socket (journald's and rsyslog's).
    const SOCKET: &str = "/dev/log";

    /// A writer factory for tracing: one [`Line`] per event.
    pub(super) struct Syslog {
        socket: Option<UnixDatagram>,
        tag: String,
    }

    impl Syslog {
        /// Connects to /dev/log; without one, lines are dropped.
        pub(super) fn connect(program: &str) -> Self {
            Self::connect_to(std::path::Path::new(SOCKET), program)
        }

        /// Connects to a syslog socket at `path`.
        pub(super) fn connect_to(path: &std::path::Path, program: &str) -> Self {
            // Non-blocking: a full syslog buffer drops the line instead of stalling a worker
            // that has Postfix waiting.
            let socket = UnixDatagram::unbound()
                .and_then(|socket| socket.connect(path).map(|()| socket))
                .and_then(|socket| socket.set_nonblocking(true).map(|()| socket))
                .ok();
            Self {
                socket,
                tag: format!("{program}[{}]", std::process::id()),
            }
        }

        fn send(&self, severity: u8, line: &[u8]) {
            let Some(socket) = &self.socket else { return };
            let text = String::from_utf8_lossy(line);
            // fmt pads the level (" INFO"); syslog's own separator is enough.
            let text = text.trim_start().trim_end_matches('\n');
            let datagram = format!("<{}>{}: {text}", FACILITY_MAIL * 8 + severity, self.tag);
            // A full or vanished syslog must never stop answering Postfix.
            let _ = socket.send(datagram.as_bytes());
        }
    }

    /// One event's text, sent when tracing drops it.
    pub(super) struct Line<'a> {
        syslog: &'a Syslog,
        severity: u8,
        text: Vec<u8>,
    }

    impl Write for Line<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.text.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Drop for Line<'_> {
        fn drop(&mut self) {
            if !self.text.is_empty() {
                self.syslog.send(self.severity, &self.text);
            }
        }
    }

    /// syslog severities (RFC 5424 §6.2.1).
    pub(super) fn severity(level: &tracing::Level) -> u8 {
        match *level {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Syslog {
        type Writer = Line<'a>;

        fn make_writer(&'a self) -> Line<'a> {
            Line {
                syslog: self,
                severity: 6,
                text: Vec::new(),
            }
        }

        fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Line<'a> {
            Line {
                syslog: self,
                severity: severity(meta.level()),
                text: Vec::new(),
            }
        }
    }
}

/// `--stdio`: one connection on stdin/stdout, as Postfix's `spawn` runs policyd-spf.
pub async fn run_stdio(ctx: DaemonContext<Policyd>) -> anyhow::Result<()> {
    let idle = ctx.config.idle_timeout.get();
    handle_connection(
        tokio::io::join(tokio::io::stdin(), tokio::io::stdout()),
        ctx.live,
        vec![Check::Spf].into(),
        &PeerAddr::Unix,
        idle,
        &ctx.shutdown,
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn live() -> watch::Receiver<Arc<Policyd>> {
        let (_tx, rx) = watch::channel(Arc::new(
            Policyd::build(Arc::new(PolicydConfig::default())).unwrap(),
        ));
        rx
    }

    async fn exchange(input: &[u8]) -> Vec<u8> {
        let (client, server) = tokio::io::duplex(1 << 20);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        client_write.write_all(input).await.unwrap();
        client_write.shutdown().await.unwrap();
        let shutdown = CancellationToken::new();
        handle_connection(
            server,
            live(),
            vec![Check::Greylist].into(),
            &PeerAddr::Unix,
            Duration::from_secs(5),
            &shutdown,
        )
        .await;
        let mut out = Vec::new();
        client_read.read_to_end(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn answers_each_request_in_order() {
        let out = exchange(
            b"request=smtpd_access_policy\nrecipient=a@b\n\nrequest=smtpd_access_policy\n\n",
        )
        .await;
        assert_eq!(out, b"action=DUNNO\n\naction=DUNNO\n\n");
    }

    #[tokio::test]
    async fn garbage_after_a_good_request_closes_without_answer() {
        let out = exchange(b"request=smtpd_access_policy\n\n\x00\x01garbage\n\n").await;
        assert_eq!(out, b"action=DUNNO\n\n");
    }

    #[tokio::test(start_paused = true)]
    async fn silent_client_is_dropped_after_idle_timeout() {
        let (_client, server) = tokio::io::duplex(1024);
        let shutdown = CancellationToken::new();
        let started = tokio::time::Instant::now();
        handle_connection(
            server,
            live(),
            vec![Check::Greylist].into(),
            &PeerAddr::Unix,
            Duration::from_secs(330),
            &shutdown,
        )
        .await;
        assert!(started.elapsed() >= Duration::from_secs(330));
    }

    #[test]
    fn only_one_socket_on_both_descriptors_counts_as_spawned() {
        use std::os::fd::AsFd;
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(same_socket(a.as_fd(), a.as_fd()));
        assert!(!same_socket(a.as_fd(), b.as_fd()));
        let file = tempfile::tempfile().unwrap();
        assert!(!same_socket(file.as_fd(), file.as_fd()));
    }

    #[test]
    fn syslog_gets_one_datagram_per_event_with_mail_facility_and_severity() {
        use std::io::Write;
        use tracing_subscriber::fmt::MakeWriter;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(syslog::Syslog::connect_to(&path, "postern-policyd"))
            .with_ansi(false)
            .with_target(false)
            .without_time()
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(client = "192.0.2.1", "dns temperror");
            tracing::info!("second\nline");
        });
        let mut buf = [0u8; 512];
        let tag = format!("postern-policyd[{}]: ", std::process::id());
        let n = server.recv(&mut buf).unwrap();
        let first = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert_eq!(
            first,
            format!("<20>{tag}WARN dns temperror client=\"192.0.2.1\"")
        );
        let n = server.recv(&mut buf).unwrap();
        let second = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert_eq!(second, format!("<22>{tag}INFO second\nline"));
        assert_eq!(syslog::severity(&tracing::Level::ERROR), 3);
        assert_eq!(syslog::severity(&tracing::Level::DEBUG), 7);
        // Without a syslog socket, lines are dropped quietly.
        let nowhere = syslog::Syslog::connect_to(&dir.path().join("none"), "x");
        nowhere.make_writer().write_all(b"lost\n").unwrap();
    }

    #[test]
    fn policy_context_chooses_the_check() {
        let listener = [Check::Greylist];
        let spf = PolicyRequest::from_pairs([("policy_context", "spf")]);
        let grey = PolicyRequest::from_pairs([("policy_context", "greylist")]);
        let none = PolicyRequest::from_pairs([("recipient", "a@b")]);
        let other = PolicyRequest::from_pairs([("policy_context", "something")]);
        assert_eq!(checks_for(&spf, &listener), vec![Check::Spf]);
        assert_eq!(checks_for(&grey, &[Check::Spf]), vec![Check::Greylist]);
        assert_eq!(checks_for(&none, &listener), vec![Check::Greylist]);
        assert_eq!(
            checks_for(&other, &[Check::Spf, Check::Greylist]),
            vec![Check::Spf, Check::Greylist]
        );
    }
}
