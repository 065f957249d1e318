//! The milter server: indymilter's protocol engine on our listener (with TCP_NODELAY, without
//! which every exchange with Postfix stalls ~40 ms on delayed ACKs), callbacks that keep
//! per-message state, and the decision at end of message.

use std::ffi::CString;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use indymilter::{
    Actions, Callbacks, Config, EomContext, MacroStage, NegotiateContext, SocketInfo, Status,
};
use postern_common::config::ConfigError;
use postern_common::daemon::{Daemon, DaemonContext};
use postern_common::listen::{Listener, Stream};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::MilterConfig;

/// The live state.
#[derive(Debug)]
pub struct Milter {
    /// The configuration it was built from.
    pub config: Arc<MilterConfig>,
    /// Our name in Authentication-Results.
    pub authserv_id: String,
}

impl Daemon for Milter {
    type Config = MilterConfig;

    fn build(config: Arc<MilterConfig>) -> Result<Self, ConfigError> {
        let authserv_id = config.effective_authserv_id();
        Ok(Self {
            config,
            authserv_id,
        })
    }

    fn restart_needed(old: &MilterConfig, new: &MilterConfig) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if old.listen != new.listen {
            keys.push("listen");
        }
        if old.max_connections != new.max_connections {
            keys.push("max_connections");
        }
        keys
    }
}

/// Adapts our listener to indymilter's accept loop.
struct MilterListener(Listener);

impl indymilter::Listener for MilterListener {
    type Io = Stream;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Stream>> {
        self.0.poll_accept(cx).map_ok(|(stream, _peer)| stream)
    }
}

/// What the milter knows about the current SMTP session and message.
#[derive(Debug, Default)]
pub struct Session {
    /// The client's address, if TCP.
    pub client: Option<SocketAddr>,
    /// The client's host name as Postfix resolved it.
    pub client_name: String,
    /// HELO/EHLO argument.
    pub helo: String,
    /// Envelope sender (without angle brackets).
    pub mail_from: String,
    /// Envelope recipients.
    pub rcpt_to: Vec<String>,
    /// Headers of the current message.
    pub headers: Vec<(String, String)>,
    /// Body bytes seen.
    pub body_bytes: usize,
}

impl Session {
    fn reset_message(&mut self) {
        self.mail_from.clear();
        self.rcpt_to.clear();
        self.headers.clear();
        self.body_bytes = 0;
    }
}

fn lossy(value: &CString) -> String {
    value.to_string_lossy().into_owned()
}

fn strip_brackets(arg: &str) -> String {
    arg.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_owned()
}

/// Most headers kept per message; more are counted but not stored (a message with thousands of
/// headers is an attack, not mail).
const MAX_HEADERS: usize = 1000;

fn callbacks(live: watch::Receiver<Arc<Milter>>) -> Callbacks<Session> {
    Callbacks::new()
        .on_negotiate(|cx, actions, _opts| Box::pin(on_negotiate(cx, actions)))
        .on_connect(|cx, hostname, socket| {
            Box::pin(async move {
                let session = cx.data.get_or_insert_with(Session::default);
                session.client_name = lossy(&hostname);
                session.client = match socket {
                    SocketInfo::Inet(addr) => Some(addr),
                    _ => None,
                };
                Status::Continue
            })
        })
        .on_helo(|cx, helo| {
            Box::pin(async move {
                if let Some(session) = cx.data.as_mut() {
                    session.helo = lossy(&helo);
                }
                Status::Continue
            })
        })
        .on_mail(|cx, args| {
            Box::pin(async move {
                let session = cx.data.get_or_insert_with(Session::default);
                session.reset_message();
                session.mail_from = args
                    .first()
                    .map(|a| strip_brackets(&lossy(a)))
                    .unwrap_or_default();
                Status::Continue
            })
        })
        .on_rcpt(|cx, args| {
            Box::pin(async move {
                if let Some(session) = cx.data.as_mut() {
                    session.rcpt_to.push(
                        args.first()
                            .map(|a| strip_brackets(&lossy(a)))
                            .unwrap_or_default(),
                    );
                }
                Status::Continue
            })
        })
        .on_header(|cx, name, value| {
            Box::pin(async move {
                if let Some(session) = cx.data.as_mut()
                    && session.headers.len() < MAX_HEADERS
                {
                    session.headers.push((lossy(&name), lossy(&value)));
                }
                Status::Continue
            })
        })
        .on_body(|cx, chunk| {
            Box::pin(async move {
                if let Some(session) = cx.data.as_mut() {
                    session.body_bytes += chunk.len();
                }
                Status::Continue
            })
        })
        .on_eom(move |cx| {
            let milter = live.borrow().clone();
            Box::pin(on_eom(cx, milter))
        })
        .on_abort(|cx| {
            Box::pin(async move {
                if let Some(session) = cx.data.as_mut() {
                    session.reset_message();
                }
                Status::Continue
            })
        })
        .on_close(|cx| {
            Box::pin(async move {
                cx.data = None;
                Status::Continue
            })
        })
}

async fn on_negotiate(cx: &mut NegotiateContext<Session>, offered: Actions) -> Status {
    // Ask for what later decisions need; Postfix's default milter_*_macros send these anyway,
    // but asking makes it explicit for other MTAs.
    let requests = [
        (MacroStage::Connect, "j {daemon_name} {client_addr}"),
        (MacroStage::Mail, "{auth_authen} {auth_type} i"),
        (MacroStage::Eom, "i"),
    ];
    // Requesting an action the MTA did not offer makes it drop the session.
    if !offered.contains(Actions::REQUEST_MACROS) {
        return Status::Continue;
    }
    cx.requested_actions |= Actions::REQUEST_MACROS;
    for (stage, names) in requests {
        if let Ok(names) = CString::new(names) {
            cx.requested_macros.insert(stage, names);
        }
    }
    Status::Continue
}

async fn on_eom(cx: &mut EomContext<Session>, milter: Arc<Milter>) -> Status {
    let queue_id = cx
        .macros
        .get(c"i")
        .map(|v| v.to_string_lossy().into_owned())
        .unwrap_or_default();
    match cx.data.as_ref() {
        Some(session) => info!(
            queue_id,
            client = %session.client.map(|a| a.ip().to_string()).unwrap_or_default(),
            helo = session.helo.as_str(),
            sender = session.mail_from.as_str(),
            recipients = session.rcpt_to.len(),
            headers = session.headers.len(),
            body_bytes = session.body_bytes,
            authserv_id = milter.authserv_id.as_str(),
            action = "accept",
            "message passed"
        ),
        None => warn!(queue_id, "end of message without a session; passing it"),
    }
    metrics::counter!("postern_milter_messages_total", "action" => "accept").increment(1);
    Status::Continue
}

/// Serves the milter protocol until shutdown.
pub async fn run(ctx: DaemonContext<Milter>) -> anyhow::Result<()> {
    let config = ctx.config.clone();
    let listener = Listener::bind(&config.listen, config.socket_mode_bits()?)
        .await
        .map_err(|err| anyhow::anyhow!("cannot listen on {}: {err}", config.listen))?;
    info!(listen = %listener.describe(), "listening");
    let milter_config = Config {
        max_connections: config.max_connections,
        connection_timeout: config.connection_timeout.get(),
        ..Config::default()
    };
    let shutdown = ctx.shutdown.clone();
    indymilter::run(
        MilterListener(listener),
        callbacks(ctx.live.clone()),
        milter_config,
        async move { shutdown.cancelled().await },
    )
    .await
    .map_err(|err| anyhow::anyhow!("milter server failed: {err}"))
}
