//! The I/O around the two codecs: tcp_table on the forward and reverse listeners, socketmap on
//! one listener with maps `forward` and `reverse`. Each lookup is one log line when it rewrites
//! or refuses; pass-throughs are counted, not logged (postsrsd 2.0.6 stopped logging them too).

use std::sync::Arc;
use std::time::Duration;

use postern_common::clock::{Clock, SystemClock};
use postern_common::config::ConfigError;
use postern_common::daemon::{Daemon, DaemonContext};
use postern_common::listen::{self, ListenSpec};
use postern_common::secret;
use postern_common::serve::{self, Connection, FrameReader, NextFrame, ServeOptions};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio_util::codec::FramedRead;
use tracing::{debug, info, warn};

use crate::config::{OriginalEnvelope, SrsdConfig};
use crate::envelope_db::{self, EnvelopeStore};
use crate::proto::{socketmap, tcp_table};
use crate::rewrite::{Outcome, Rewriter, Skip, is_database_alias};
use crate::srs::{Secret, Srs};

/// The live state.
#[derive(Debug)]
pub struct Srsd {
    /// The configuration it was built from.
    pub config: Arc<SrsdConfig>,
    /// The rewriter.
    pub rewriter: Rewriter,
    /// The envelope database, in "database" mode.
    pub store: Option<EnvelopeStore>,
    /// The secrets file, when this build generated it (logged once serving starts, since the
    /// first build runs before logging is set up).
    pub generated_secret: Option<std::path::PathBuf>,
}

/// Reads the secrets file (one secret per line, CR/LF stripped, blank lines skipped), generating
/// one when the default file does not exist yet; says whether it did.
pub fn load_secrets(config: &SrsdConfig) -> Result<(Vec<Secret>, bool), ConfigError> {
    let path = config.effective_secrets_file();
    let generate = config.secrets_file.is_none() && !path.exists();
    if generate {
        let mut bytes = [0u8; 24];
        rand::fill(&mut bytes);
        let text = format!(
            "{}\n",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        secret::write_private_file(&path, text.as_bytes()).map_err(|e| {
            ConfigError::invalid(
                "secrets_file",
                format!("{}: cannot create: {e}", path.display()),
            )
        })?;
        info!(file = %path.display(), "generated a new SRS secret");
    }
    let bytes = secret::read_private_file(&path)
        .map_err(|e| ConfigError::invalid("secrets_file", e.to_string()))?;
    let secrets: Vec<Secret> = bytes
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| !line.is_empty())
        .map(Secret::new)
        .collect();
    if secrets.is_empty() {
        return Err(ConfigError::invalid(
            "secrets_file",
            format!("{}: holds no secret", path.display()),
        ));
    }
    Ok((secrets, generate))
}

impl Daemon for Srsd {
    type Config = SrsdConfig;

    fn build(config: Arc<SrsdConfig>) -> Result<Self, ConfigError> {
        let (secrets, generated) = load_secrets(&config)?;
        let srs = Srs {
            secrets,
            separator: config.separator_char()?,
            hash_length: config.hash_length,
            hash_minimum: config.hash_minimum,
            alphabet: config.hash_alphabet,
        };
        let rewriter = Rewriter::new(
            srs,
            config.effective_srs_domain()?,
            config.always_rewrite,
            config.domains.clone(),
            config.domains_file.clone(),
        )
        .map_err(|e| ConfigError::invalid("domains_file", e.to_string()))?;
        let store = match config.original_envelope {
            OriginalEnvelope::Embedded => None,
            OriginalEnvelope::Database => Some(
                EnvelopeStore::open(&config.effective_envelope_database())
                    .map_err(|e| ConfigError::invalid("envelope_database", e.to_string()))?,
            ),
        };
        Ok(Self {
            generated_secret: generated.then(|| config.effective_secrets_file()),
            config,
            rewriter,
            store,
        })
    }

    fn restart_needed(old: &SrsdConfig, new: &SrsdConfig) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if old.forward_listen != new.forward_listen {
            keys.push("forward_listen");
        }
        if old.reverse_listen != new.reverse_listen {
            keys.push("reverse_listen");
        }
        if old.socketmap_listen != new.socketmap_listen {
            keys.push("socketmap_listen");
        }
        if old.worker_threads != new.worker_threads {
            keys.push("worker_threads");
        }
        keys
    }
}

/// Which way a lookup goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Sender rewriting.
    Forward,
    /// Bounce recipient restoring.
    Reverse,
}

impl Srsd {
    async fn decide(&self, direction: Direction, address: &str, unix: u64) -> Outcome {
        let Some(store) = &self.store else {
            return match direction {
                Direction::Forward => self.rewriter.forward(address, unix),
                Direction::Reverse => self.rewriter.reverse(address, unix),
            };
        };
        match direction {
            Direction::Forward => match self.rewriter.forward_target(address) {
                Err(reason) => Outcome::Unchanged(reason),
                // An SRS address from another forwarder is wrapped as SRS1, not stored
                // (postsrsd does the same): its tail is what the next hop needs to reverse.
                Ok((local, _)) if crate::srs::split_srs(local).is_some() => {
                    self.rewriter.forward(address, unix)
                }
                Ok(_) => {
                    let key = envelope_db::key_for(address);
                    match store.put(&key, address, unix).await {
                        Ok(()) => Outcome::Rewritten(self.rewriter.srs.forward(
                            &key,
                            envelope_db::KEY_HOST,
                            &self.rewriter.srs_domain,
                            unix,
                        )),
                        Err(err) => Outcome::Unavailable(err.to_string()),
                    }
                }
            },
            Direction::Reverse => match self.rewriter.reverse_keeping_aliases(address, unix) {
                Outcome::Rewritten(original) if is_database_alias(&original) => {
                    let key = original.strip_suffix("@1").unwrap_or(&original);
                    match store.get(key, unix).await {
                        Ok(Some(stored)) => Outcome::Rewritten(stored),
                        Ok(None) => Outcome::Unchanged(Skip::UnknownAlias),
                        Err(err) => Outcome::Unavailable(err.to_string()),
                    }
                }
                // Addresses written before database mode was switched on still carry the sender.
                other => other,
            },
        }
    }

    /// One lookup, logged and counted.
    pub async fn lookup(
        &self,
        direction: Direction,
        address: &str,
        unix: u64,
        peer: &str,
    ) -> Outcome {
        let outcome = self.decide(direction, address, unix).await;
        let way = if direction == Direction::Forward {
            "forward"
        } else {
            "reverse"
        };
        match &outcome {
            Outcome::Rewritten(to) => {
                info!(%peer, direction = way, from = address, to = to.as_str(), "rewritten")
            }
            Outcome::Refused(err) if direction == Direction::Forward => {
                warn!(%peer, direction = way, address, reason = %err, "not rewritten: malformed SRS sender")
            }
            Outcome::Refused(err) => {
                warn!(%peer, direction = way, address, reason = %err, "not rewritten: SRS address does not verify")
            }
            Outcome::Failed(reason) => {
                warn!(%peer, direction = way, address, reason, "not rewritten: answering with an error")
            }
            Outcome::Unchanged(skip) => {
                debug!(%peer, direction = way, address, reason = skip.text(), "not rewritten")
            }
            Outcome::Unavailable(reason) => {
                warn!(%peer, direction = way, address, reason = reason.as_str(), "envelope database unavailable; answering with a temporary error")
            }
        }
        let result = match &outcome {
            Outcome::Rewritten(_) => "rewritten",
            Outcome::Unchanged(_) => "unchanged",
            Outcome::Refused(_) => "refused",
            Outcome::Failed(_) => "failed",
            Outcome::Unavailable(_) => "unavailable",
        };
        metrics::counter!("postern_srsd_lookups_total", "direction" => way, "result" => result)
            .increment(1);
        outcome
    }
}

async fn serve_tcp_table(conn: Connection, live: watch::Receiver<Arc<Srsd>>, direction: Direction) {
    // Formatted once: every rewrite logs it.
    let peer = conn.peer.to_string();
    let frames = FramedRead::new(conn.stream, tcp_table::TcpTableDecoder::default());
    let mut requests = FrameReader::new(frames, conn.idle_timeout, &conn.shutdown);
    loop {
        let reply = match requests.next().await {
            NextFrame::Frame(tcp_table::Request::Get(key)) => {
                let srsd = live.borrow().clone();
                match srsd
                    .lookup(direction, &key, SystemClock.unix(), &peer)
                    .await
                {
                    Outcome::Rewritten(address) => tcp_table::Reply::Found(address),
                    Outcome::Unchanged(skip) => {
                        tcp_table::Reply::NotFound(skip.text_v1().to_owned())
                    }
                    Outcome::Refused(err) => tcp_table::Reply::NotFound(err.to_string()),
                    Outcome::Failed(reason) => tcp_table::Reply::Error(reason.to_owned()),
                    // tcp_table(5): 400 is a temporary failure; Postfix defers the message.
                    Outcome::Unavailable(reason) => tcp_table::Reply::Error(reason),
                }
            }
            NextFrame::Frame(tcp_table::Request::Invalid(reason)) => {
                warn!(%peer, reason, "invalid tcp_table request");
                tcp_table::Reply::Error(reason)
            }
            NextFrame::Error(err) => {
                warn!(%peer, error = %err, "bad tcp_table input; closing connection");
                if err.wants_reply() {
                    let _ = requests
                        .socket()
                        .write_all(&tcp_table::Reply::Error(err.to_string()).encode())
                        .await;
                }
                return;
            }
            NextFrame::Idle => {
                info!(%peer, idle_timeout = ?conn.idle_timeout, "idle connection closed");
                return;
            }
            NextFrame::Closed | NextFrame::Shutdown => return,
        };
        if requests.socket().write_all(&reply.encode()).await.is_err() {
            return;
        }
    }
}

async fn serve_socketmap(conn: Connection, live: watch::Receiver<Arc<Srsd>>) {
    // Formatted once: every rewrite logs it.
    let peer = conn.peer.to_string();
    let frames = FramedRead::new(conn.stream, socketmap::SocketmapDecoder);
    let mut requests = FrameReader::new(frames, conn.idle_timeout, &conn.shutdown);
    loop {
        let reply = match requests.next().await {
            NextFrame::Frame(socketmap::Request::Lookup { map, key }) => {
                let direction = match map.as_str() {
                    "forward" => Some(Direction::Forward),
                    "reverse" => Some(Direction::Reverse),
                    _ => None,
                };
                let srsd = live.borrow().clone();
                match direction {
                    Some(direction) => match srsd
                        .lookup(direction, &key, SystemClock.unix(), &peer)
                        .await
                    {
                        // postsrsd 2.x: NOTFOUND and PERM carry the reason.
                        Outcome::Rewritten(address) => socketmap::Reply::Ok(address),
                        Outcome::Unchanged(skip) => {
                            socketmap::Reply::NotFound(skip.text().to_owned())
                        }
                        Outcome::Refused(err) => socketmap::Reply::NotFound(err.to_string()),
                        Outcome::Failed(reason) => socketmap::Reply::Perm(reason.to_owned()),
                        // postsrsd answers PERM "Database error."; TEMP lets Postfix retry.
                        Outcome::Unavailable(reason) => socketmap::Reply::Temp(reason),
                    },
                    None => {
                        warn!(%peer, map, "unknown socketmap map name");
                        socketmap::Reply::Perm("Invalid map.".to_owned())
                    }
                }
            }
            NextFrame::Frame(socketmap::Request::Invalid(reason)) => socketmap::Reply::Perm(reason),
            NextFrame::Error(err) => {
                warn!(%peer, error = %err, "bad socketmap input; closing connection");
                if err.wants_reply() {
                    let _ = requests
                        .socket()
                        .write_all(&socketmap::Reply::Perm(err.to_string()).encode())
                        .await;
                }
                return;
            }
            NextFrame::Idle => {
                info!(%peer, idle_timeout = ?conn.idle_timeout, "idle connection closed");
                return;
            }
            NextFrame::Closed | NextFrame::Shutdown => return,
        };
        if requests.socket().write_all(&reply.encode()).await.is_err() {
            return;
        }
    }
}

/// Serves the configured listeners until shutdown.
pub async fn run(ctx: DaemonContext<Srsd>) -> anyhow::Result<()> {
    let config = ctx.config.clone();
    let mode = config.socket_mode_bits()?;
    let options = ServeOptions {
        max_connections: config.max_connections,
        idle_timeout: config.idle_timeout.get(),
        ..ServeOptions::default()
    };
    if let Some(path) = &ctx.live.borrow().generated_secret {
        info!(file = %path.display(), "generated a new SRS secret; keep it (and back it up) so that addresses in flight keep reversing");
    }
    let tcp_tables: Vec<(&ListenSpec, Direction)> = [
        (&config.forward_listen, Direction::Forward),
        (&config.reverse_listen, Direction::Reverse),
    ]
    .into_iter()
    .filter_map(|(spec, direction)| Some((spec.as_ref()?, direction)))
    .collect();
    let specs = tcp_tables.iter().map(|(spec, _)| *spec);
    let mut listeners = listen::bind_all(specs.chain(&config.socketmap_listen), mode)
        .await?
        .into_iter();
    let mut tasks = tokio::task::JoinSet::new();
    // tcp_tables first: zip stops at its end without taking another listener.
    for (&(_, direction), listener) in tcp_tables.iter().zip(listeners.by_ref()) {
        let live = ctx.live.clone();
        tasks.spawn(serve::serve(
            listener,
            options,
            ctx.shutdown.clone(),
            move |conn| serve_tcp_table(conn, live.clone(), direction),
        ));
    }
    // What is left is the socketmap listener, if configured.
    if let Some(listener) = listeners.next() {
        let live = ctx.live.clone();
        tasks.spawn(serve::serve(
            listener,
            options,
            ctx.shutdown.clone(),
            move |conn| serve_socketmap(conn, live.clone()),
        ));
    }
    // postsrsd 2.x watches its domains file; a cheap mtime poll does the same without inotify.
    let live = ctx.live.clone();
    let shutdown = ctx.shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        while !shutdown.is_cancelled() {
            tokio::select! { _ = tick.tick() => {}, () = shutdown.cancelled() => break }
            match live.borrow().rewriter.refresh_domains() {
                Some(Ok(count)) => info!(count, "domains file changed; reloaded"),
                Some(Err(err)) => {
                    warn!(error = %err, "domains file changed but cannot be read; keeping the old list")
                }
                None => {}
            }
        }
    });
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(())
}
