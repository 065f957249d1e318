//! The I/O around the policy codec: one task per connection, requests answered in order, bad
//! input logged once and that connection closed. Works over any byte stream, so `--stdio` (a
//! Postfix `spawn` service) uses the same code as the listeners.

use std::sync::Arc;
use std::time::Duration;

use postern_common::config::ConfigError;
use postern_common::daemon::{Daemon, DaemonContext};
use postern_common::listen::{Listener, PeerAddr};
use postern_common::serve::{self, NextFrame, ServeOptions};
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
                Check::Spf => (self.spf.check(request).await, String::new()),
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

/// Answers requests from `reader` on `writer` until the client closes, goes idle, sends
/// garbage, or the daemon shuts down.
pub async fn handle_connection<R, W>(
    reader: R,
    mut writer: W,
    live: watch::Receiver<Arc<Policyd>>,
    listener_checks: Arc<[Check]>,
    peer: &PeerAddr,
    idle: Duration,
    shutdown: &CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut frames = FramedRead::new(reader, PolicyDecoder::default());
    loop {
        let request = match serve::next_frame(&mut frames, idle, shutdown).await {
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
        if let Err(err) = async {
            writer.write_all(&reply.encode()).await?;
            writer.flush().await
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
    let mut tasks = tokio::task::JoinSet::new();
    for listener_config in &config.listen {
        let listener = Listener::bind(&listener_config.address, mode)
            .await
            .map_err(|err| {
                anyhow::anyhow!("cannot listen on {}: {err}", listener_config.address)
            })?;
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
                    let (reader, writer) = tokio::io::split(conn.stream);
                    handle_connection(
                        reader,
                        writer,
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
    Ok(())
}

/// `--stdio`: one connection on stdin/stdout, as Postfix's `spawn` runs policyd-spf.
pub async fn run_stdio(ctx: DaemonContext<Policyd>) -> anyhow::Result<()> {
    let idle = ctx.config.idle_timeout.get();
    handle_connection(
        tokio::io::stdin(),
        tokio::io::stdout(),
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
        let (server_read, server_write) = tokio::io::split(server);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        client_write.write_all(input).await.unwrap();
        client_write.shutdown().await.unwrap();
        let shutdown = CancellationToken::new();
        handle_connection(
            server_read,
            server_write,
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
        let (r, w) = tokio::io::split(server);
        let shutdown = CancellationToken::new();
        let started = tokio::time::Instant::now();
        handle_connection(
            r,
            w,
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
