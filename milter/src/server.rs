//! The milter server: indymilter's protocol engine on our listener (with TCP_NODELAY, without
//! which every exchange with Postfix stalls ~40 ms on delayed ACKs), callbacks that keep
//! per-message state, and the DKIM sign-or-verify decision at end of message.

use std::ffi::CString;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use indymilter::{
    Actions, Callbacks, Config, ContextActions, EomContext, MacroStage, NegotiateContext,
    ProtoOpts, SetErrorReply, SocketInfo, Status,
};
use mail_auth::{AuthenticatedMessage, MessageAuthenticator};
use postern_common::config::ConfigError;
use postern_common::daemon::{Daemon, DaemonContext};
use postern_common::listen::{Listener, Stream};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::MilterConfig;
use crate::dkim::{self, Action, Dkim, SignRequest};
use crate::dmarc::{self, DmarcAction, DmarcInput};
use crate::reports::Recorder;

/// The live state.
pub struct Milter {
    /// The configuration it was built from.
    pub config: Arc<MilterConfig>,
    /// Our name in Authentication-Results.
    pub authserv_id: String,
    /// DKIM tables and keys.
    pub dkim: Dkim,
    /// DNS-backed verifier (with hickory's answer cache).
    pub auth: Arc<MessageAuthenticator>,
}

impl std::fmt::Debug for Milter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Milter")
            .field("authserv_id", &self.authserv_id)
            .field("dkim", &self.dkim)
            .finish_non_exhaustive()
    }
}

/// Builds the DNS verifier from `[dns]`.
pub fn authenticator(config: &MilterConfig) -> Result<MessageAuthenticator, ConfigError> {
    let (resolver_config, opts) = postern_common::dns::resolver_parts(&config.dns)
        .map_err(|e| ConfigError::invalid("dns", e.to_string()))?;
    MessageAuthenticator::new(resolver_config, opts)
        .map_err(|e| ConfigError::invalid("dns", format!("cannot set up the resolver: {e}")))
}

impl Daemon for Milter {
    type Config = MilterConfig;

    fn build(config: Arc<MilterConfig>) -> Result<Self, ConfigError> {
        let authserv_id = config.effective_authserv_id();
        let dkim = Dkim::build(&config.dkim)?;
        let auth = Arc::new(authenticator(&config)?);
        Ok(Self {
            config,
            authserv_id,
            dkim,
            auth,
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
    /// Header values arrive with their leading space (negotiated LEADING_SPACE), and values we
    /// add must carry one.
    pub leading_space: bool,
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
    /// Headers of the current message (values as received, folds as "\n").
    pub headers: Vec<(String, String)>,
    /// Headers beyond [`MAX_HEADERS`], counted only.
    pub headers_dropped: usize,
    /// The message as the MTA will deliver it (CRLF), for signing and verification.
    pub message: Vec<u8>,
    /// Body bytes seen.
    pub body_bytes: usize,
    /// Largest message buffered (from `dkim.max_message_size` at MAIL).
    pub max_message_size: usize,
    /// The message outgrew `max_message_size`: pass it untouched.
    pub oversize: bool,
}

impl Session {
    fn reset_message(&mut self) {
        self.mail_from.clear();
        self.rcpt_to.clear();
        self.headers.clear();
        self.headers_dropped = 0;
        self.message = Vec::new();
        self.body_bytes = 0;
        self.oversize = false;
    }

    /// Appends bytes to the buffered message unless it outgrew the limit.
    fn buffer(&mut self, bytes: &[u8]) {
        if self.oversize {
            return;
        }
        if self.message.len() + bytes.len() > self.max_message_size {
            self.oversize = true;
            self.message = Vec::new();
            return;
        }
        self.message.extend_from_slice(bytes);
    }

    fn add_header(&mut self, name: String, value: String) {
        let mut line = Vec::with_capacity(name.len() + value.len() + 4);
        line.extend_from_slice(name.as_bytes());
        line.push(b':');
        if !self.leading_space {
            line.push(b' ');
        }
        // libmilter folds with bare LF; the message on disk has CRLF.
        let bytes = value.as_bytes();
        for (i, &b) in bytes.iter().enumerate() {
            if b == b'\n' && (i == 0 || bytes[i - 1] != b'\r') {
                line.push(b'\r');
            }
            line.push(b);
        }
        line.extend_from_slice(b"\r\n");
        self.buffer(&line);
        if self.headers.len() < MAX_HEADERS {
            self.headers.push((name, value));
        } else {
            self.headers_dropped += 1;
        }
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

fn callbacks(
    live: watch::Receiver<Arc<Milter>>,
    recorder: Option<Arc<Recorder>>,
) -> Callbacks<Session> {
    let live_mail = live.clone();
    Callbacks::new()
        .on_negotiate(|cx, actions, opts| Box::pin(on_negotiate(cx, actions, opts)))
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
        .on_mail(move |cx, args| {
            let max_message_size = live_mail.borrow().dkim.config.max_message_size;
            Box::pin(async move {
                let session = cx.data.get_or_insert_with(Session::default);
                session.reset_message();
                session.max_message_size = max_message_size;
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
                if let Some(session) = cx.data.as_mut() {
                    session.add_header(lossy(&name), lossy(&value));
                }
                Status::Continue
            })
        })
        .on_eoh(|cx| {
            Box::pin(async move {
                if let Some(session) = cx.data.as_mut() {
                    session.buffer(b"\r\n");
                }
                Status::Continue
            })
        })
        .on_body(|cx, chunk| {
            Box::pin(async move {
                if let Some(session) = cx.data.as_mut() {
                    session.body_bytes += chunk.len();
                    session.buffer(&chunk);
                }
                Status::Continue
            })
        })
        .on_eom(move |cx| {
            let milter = live.borrow().clone();
            Box::pin(on_eom(cx, milter, recorder.clone()))
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

async fn on_negotiate(
    cx: &mut NegotiateContext<Session>,
    offered: Actions,
    offered_opts: ProtoOpts,
) -> Status {
    // Header values byte for byte (simple header canonicalization needs the exact spacing).
    let leading_space = offered_opts.contains(ProtoOpts::LEADING_SPACE);
    if leading_space {
        cx.requested_opts |= ProtoOpts::LEADING_SPACE;
    }
    cx.data = Some(Session {
        leading_space,
        ..Session::default()
    });
    // Requesting an action the MTA did not offer makes it drop the session.
    cx.requested_actions |=
        offered & (Actions::ADD_HEADER | Actions::CHANGE_HEADER | Actions::QUARANTINE);
    // Ask for what the sign decision needs; Postfix's default milter_*_macros send these
    // anyway, but asking makes it explicit for other MTAs.
    let requests = [
        (MacroStage::Connect, "j {daemon_name} {client_addr}"),
        (MacroStage::Mail, "{auth_authen} {auth_type} i"),
        (MacroStage::Eom, "i"),
    ];
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

fn macro_value(cx: &EomContext<Session>, name: &std::ffi::CStr) -> Option<String> {
    cx.macros
        .get(name)
        .map(|v| v.to_string_lossy().into_owned())
        .filter(|v| !v.is_empty())
}

/// A header value as the MTA wants it back: LF folds, and a leading space when negotiated.
fn milter_value(value: &str, leading_space: bool) -> String {
    let value = value.replace("\r\n", "\n");
    if leading_space {
        format!(" {value}")
    } else {
        value
    }
}

/// Applies an On-* action; `what` says why, for the reply text and the log.
fn apply(cx: &mut EomContext<Session>, action: Action, what: &str) -> Status {
    match action {
        Action::Accept | Action::Quarantine => Status::Continue,
        Action::Discard => Status::Discard,
        Action::Reject => {
            let _ = cx
                .reply
                .set_error_reply("550", Some("5.7.1"), [format!("DKIM: {what}")]);
            Status::Reject
        }
        Action::Tempfail => {
            let _ = cx
                .reply
                .set_error_reply("451", Some("4.7.1"), [format!("DKIM: {what}")]);
            Status::Tempfail
        }
    }
}

fn action_name(action: Action) -> &'static str {
    match action {
        Action::Accept => "accept",
        Action::Reject => "reject",
        Action::Tempfail => "tempfail",
        Action::Quarantine => "quarantine",
        Action::Discard => "discard",
    }
}

async fn on_eom(
    cx: &mut EomContext<Session>,
    milter: Arc<Milter>,
    recorder: Option<Arc<Recorder>>,
) -> Status {
    let queue_id = macro_value(cx, c"i").unwrap_or_default();
    let authenticated =
        macro_value(cx, c"{auth_type}").is_some() || macro_value(cx, c"{auth_authen}").is_some();
    let daemon_name = macro_value(cx, c"{daemon_name}");
    let Some(mut session) = cx.data.take() else {
        warn!(queue_id, "end of message without a session; passing it");
        return Status::Continue;
    };
    let message = std::mem::take(&mut session.message);
    let facts = Facts {
        queue_id: &queue_id,
        authenticated,
        daemon_name: daemon_name.as_deref(),
        recorder: recorder.as_deref(),
    };
    let status = process(cx, &milter, &session, &message, &facts).await;
    session.reset_message();
    cx.data = Some(session);
    status
}

/// What end-of-message knows besides the session.
struct Facts<'a> {
    queue_id: &'a str,
    authenticated: bool,
    daemon_name: Option<&'a str>,
    recorder: Option<&'a Recorder>,
}

/// A number in 0..100 for DMARC `pct` sampling.
fn percent_sample() -> u8 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    (hasher.finish() % 100) as u8
}

async fn process(
    cx: &mut EomContext<Session>,
    milter: &Milter,
    session: &Session,
    message: &[u8],
    facts: &Facts<'_>,
) -> Status {
    let queue_id = facts.queue_id;
    let authenticated = facts.authenticated;
    let daemon_name = facts.daemon_name;
    let config = &milter.dkim.config;
    let client = session
        .client
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    if session.oversize {
        info!(
            queue_id,
            client,
            sender = session.mail_from.as_str(),
            limit = session.max_message_size,
            action = "pass",
            "message larger than dkim.max_message_size; passed unsigned and unverified"
        );
        metrics::counter!("postern_milter_messages_total", "action" => "oversize").increment(1);
        return Status::Continue;
    }
    // RFC 8601 §5: nobody else may speak in our name.
    for instance in dkim::verify::forged_instances(&session.headers, &milter.authserv_id) {
        let index = i32::try_from(instance).unwrap_or(i32::MAX);
        match cx
            .actions
            .change_header("Authentication-Results", index, None::<&str>)
            .await
        {
            Ok(()) => info!(
                queue_id,
                client,
                instance,
                "removed an Authentication-Results header claiming our authserv-id"
            ),
            Err(err) => warn!(
                queue_id,
                client, "cannot remove a forged Authentication-Results header: {err}"
            ),
        }
    }
    let from_header = session
        .headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("From"))
        .map(|(_, value)| value.as_str());
    let from = from_header.and_then(dkim::sign::from_address);
    let request = SignRequest {
        from: from.as_ref().map(|(l, d)| (l.as_str(), d.as_str())),
        authenticated,
        client: session.client.map(|a| a.ip()),
        daemon_name,
    };
    if config.mode.signs() && milter.dkim.trusted(&request) {
        let signers = from
            .as_ref()
            .map(|(local, domain)| milter.dkim.signers_for(local, domain))
            .unwrap_or_default();
        if !signers.is_empty() {
            let list = milter
                .dkim
                .header_list(session.headers.iter().map(|(n, _)| n.as_str()));
            return match milter.dkim.sign(&signers, &list, message) {
                Ok(values) => {
                    // Each inserted at the top: the last inserted ends first, so insert in
                    // reverse to keep the configured order.
                    for value in values.iter().rev() {
                        if let Err(err) = cx
                            .actions
                            .insert_header(
                                0,
                                "DKIM-Signature",
                                milter_value(value, session.leading_space),
                            )
                            .await
                        {
                            warn!(queue_id, client, "cannot add DKIM-Signature: {err}");
                            return apply(cx, config.on_internal_error, "internal error");
                        }
                    }
                    let selectors: Vec<String> = signers
                        .iter()
                        .map(|s| format!("{}/{}", s.domain, s.selector))
                        .collect();
                    info!(
                        queue_id,
                        client,
                        sender = session.mail_from.as_str(),
                        from = from.as_ref().map(|(_, d)| d.as_str()).unwrap_or(""),
                        signatures = selectors.join(",").as_str(),
                        action = "sign",
                        "signed"
                    );
                    metrics::counter!("postern_milter_dkim_total", "action" => "sign")
                        .increment(signers.len() as u64);
                    Status::Continue
                }
                Err(err) => {
                    warn!(queue_id, client, "signing failed: {err}");
                    metrics::counter!("postern_milter_dkim_total", "action" => "sign_error")
                        .increment(1);
                    apply(cx, config.on_internal_error, "internal error while signing")
                }
            };
        }
    }
    if !config.mode.verifies() {
        return Status::Continue;
    }
    let Some(mut parsed) = AuthenticatedMessage::parse(message) else {
        warn!(
            queue_id,
            client, "message cannot be parsed for DKIM verification"
        );
        return apply(cx, config.on_internal_error, "message cannot be parsed");
    };
    let (errors_before, dropped) =
        dkim::verify::limit_signatures(&mut parsed, config.max_signatures);
    if dropped > 0 {
        info!(
            queue_id,
            client,
            dropped,
            max = config.max_signatures,
            "more DKIM signatures than dkim.max_signatures; the rest were not evaluated"
        );
    }
    let outputs = dkim::verify::verify(&milter.auth, &parsed).await;
    let mut bits = Vec::with_capacity(outputs.len());
    for output in &outputs {
        bits.push(dkim::verify::key_bits(&milter.auth, output).await);
    }
    let entries = dkim::verify::entries(&outputs, errors_before, &bits);
    let header = dkim::authentication_results(&milter.authserv_id, &entries);
    if let Err(err) = cx
        .actions
        .insert_header(
            0,
            "Authentication-Results",
            milter_value(&header, session.leading_space),
        )
        .await
    {
        warn!(queue_id, client, "cannot add Authentication-Results: {err}");
    }
    let verdict = dkim::verify::verdict(&entries, config);
    let results: Vec<String> = entries
        .iter()
        .map(|e| format!("{}:{}/{}", e.result, e.d, e.s))
        .collect();
    info!(
        queue_id,
        client,
        sender = session.mail_from.as_str(),
        dkim = results.join(",").as_str(),
        case = verdict.case,
        action = action_name(verdict.action),
        "verified"
    );
    metrics::counter!("postern_milter_dkim_total", "action" => "verify", "case" => verdict.case)
        .increment(1);
    if verdict.action == Action::Quarantine
        && let Err(err) = cx
            .actions
            .quarantine(format!("DKIM: {}", verdict.case))
            .await
    {
        warn!(queue_id, client, "cannot quarantine: {err}");
    }
    if verdict.action != Action::Accept && verdict.action != Action::Quarantine {
        return apply(cx, verdict.action, verdict.case);
    }
    let dmarc_config = &milter.config.dmarc;
    if !dmarc_config.enabled {
        return apply(cx, verdict.action, verdict.case);
    }
    let Some(client_ip) = session.client.map(|a| a.ip()) else {
        return apply(cx, verdict.action, verdict.case);
    };
    let input = DmarcInput {
        client_ip,
        helo: &session.helo,
        envelope_from: &session.mail_from,
        envelope_to: &session.rcpt_to,
        authenticated,
        message: &parsed,
        dkim: &outputs,
        authserv_id: &milter.authserv_id,
        queue_id,
        now: postern_common::clock::Clock::unix(&postern_common::clock::SystemClock),
    };
    // dmarc::evaluate takes `&mut dyn FnMut() -> u8` (not Send), so its future cannot be held
    // across an await in indymilter's Send callbacks; run it to completion on this worker
    // thread instead (block_in_place needs the multi-threaded runtime common::daemon builds).
    if tokio::runtime::Handle::current().runtime_flavor()
        != tokio::runtime::RuntimeFlavor::MultiThread
    {
        warn!(
            queue_id,
            client, "DMARC needs the multi-threaded runtime; not evaluated"
        );
        return apply(cx, verdict.action, verdict.case);
    }
    let decision = tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(dmarc::evaluate(
            dmarc_config,
            &input,
            &milter.auth,
            &mut percent_sample,
        ))
    });
    if let Some(record) = &decision.record
        && let Some(recorder) = facts.recorder
        && let Err(err) = recorder.record(record).await
    {
        warn!(
            queue_id,
            client, "cannot record the DMARC result for reports: {err}"
        );
    }
    // After ours (index 0): DMARC's own Authentication-Results, then SPF's.
    for (index, value) in (1..).zip(
        [&decision.header, &decision.spf_header]
            .into_iter()
            .flatten(),
    ) {
        if let Err(err) = cx
            .actions
            .insert_header(
                index,
                "Authentication-Results",
                milter_value(value, session.leading_space),
            )
            .await
        {
            warn!(
                queue_id,
                client, "cannot add the DMARC Authentication-Results: {err}"
            );
        }
    }
    info!(
        queue_id,
        client,
        from = decision.domain.as_str(),
        dmarc = decision.result,
        action = ?decision.action,
        "dmarc evaluated"
    );
    metrics::counter!("postern_milter_dmarc_total", "result" => decision.result).increment(1);
    match decision.action {
        DmarcAction::Accept => apply(cx, verdict.action, verdict.case),
        DmarcAction::Quarantine { reason } => {
            if verdict.action != Action::Quarantine
                && let Err(err) = cx.actions.quarantine(reason).await
            {
                warn!(queue_id, client, "cannot quarantine: {err}");
            }
            Status::Continue
        }
        DmarcAction::Reject {
            code,
            enhanced,
            text,
        } => {
            let _ = cx.reply.set_error_reply(code, Some(enhanced), [text]);
            Status::Reject
        }
        DmarcAction::Tempfail { text } => {
            let _ = cx.reply.set_error_reply("451", Some("4.7.1"), [text]);
            Status::Tempfail
        }
    }
}

/// Serves the milter protocol until shutdown.
pub async fn run(ctx: DaemonContext<Milter>) -> anyhow::Result<()> {
    let config = ctx.config.clone();
    let listener = Listener::bind(&config.listen, config.socket_mode_bits()?)
        .await
        .map_err(|err| anyhow::anyhow!("cannot listen on {}: {err}", config.listen))?;
    info!(listen = %listener.describe(), "listening");
    let recorder = if config.dmarc.enabled {
        Some(Arc::new(
            Recorder::open(&config.dmarc.reports, &config.state_dir).await,
        ))
    } else {
        None
    };
    serve(
        listener,
        &config,
        ctx.live.clone(),
        recorder,
        ctx.shutdown.clone(),
    )
    .await
}

/// Serves on a bound listener (tests bind 127.0.0.1:0) until `shutdown`.
pub async fn serve(
    listener: Listener,
    config: &MilterConfig,
    live: watch::Receiver<Arc<Milter>>,
    recorder: Option<Arc<Recorder>>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let milter_config = Config {
        max_connections: config.max_connections,
        connection_timeout: config.connection_timeout.get(),
        ..Config::default()
    };
    indymilter::run(
        MilterListener(listener),
        callbacks(live, recorder),
        milter_config,
        async move { shutdown.cancelled().await },
    )
    .await
    .map_err(|err| anyhow::anyhow!("milter server failed: {err}"))
}
