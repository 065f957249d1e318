//! The milter server: indymilter's protocol engine on our listener (with TCP_NODELAY, without
//! which every exchange with Postfix stalls ~40 ms on delayed ACKs), callbacks that keep
//! per-message state, and the DKIM sign-or-verify decision: taken at end of headers, so that a
//! message we sign is held only up to [`STREAM_FROM_BYTES`] and beyond that hashed as its body
//! arrives, while one we verify is held once (mail-auth verifies whole messages), each up to
//! `dkim.max_message_size`.
//!
//! Replies: we never act before end of message, so we ask the MTA not to wait for a reply to
//! connect, HELO, MAIL, RCPT, each header, end of headers and each body chunk (SMFIP_NR_*, as
//! mature milters do); Postfix then sends a whole message in a few writes and waits once.

use std::ffi::CString;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use indymilter::{
    Actions, Callbacks, Config, ContextActions, EomContext, MacroStage, Macros, NegotiateContext,
    ProtoOpts, SetErrorReply, SocketInfo, Status,
};
use mail_auth::{AuthenticatedMessage, MessageAuthenticator};
use postern_common::config::ConfigError;
use postern_common::daemon::{Daemon, DaemonContext};
use postern_common::listen::{Listener, Stream};
use tokio::io::AsyncWrite;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::MilterConfig;
use crate::dkim::sign::SignStream;
use crate::dkim::{self, Action, Dkim, SignRequest, Signer};
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
        if old.worker_threads != new.worker_threads {
            keys.push("worker_threads");
        }
        // The report store is opened at start, when DMARC and its reports are on.
        let recording = |c: &MilterConfig| c.dmarc.enabled && c.dmarc.reports.enabled;
        if recording(old) != recording(new) || old.dmarc.reports.store != new.dmarc.reports.store {
            keys.push("dmarc.reports");
        }
        keys
    }
}

/// Adapts our listener to indymilter's accept loop.
struct MilterListener(Listener);

impl indymilter::Listener for MilterListener {
    type Io = ReplyBuffer<Stream>;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<ReplyBuffer<Stream>>> {
        self.0
            .poll_accept(cx)
            .map_ok(|(stream, _peer)| ReplyBuffer::new(stream))
    }
}

/// Most reply bytes held back before they are written anyway.
const REPLY_BUFFER_BYTES: usize = 64 * 1024;

/// An MTA connection whose replies go out when we next read (or close), not at each flush.
/// indymilter writes and flushes every reply on its own; at end of message that is one write
/// per header change and one for the verdict, and Postfix reads them all before it sends
/// anything. Holding them until we wait for the MTA again sends them in one segment, the way
/// Postfix's VSTREAM buffers its side of the conversation. Nothing is held while we wait for
/// the MTA, so no exchange can stall on it.
struct ReplyBuffer<S> {
    inner: S,
    pending: Vec<u8>,
    written: usize,
}

impl<S: tokio::io::AsyncRead + AsyncWrite + Unpin> ReplyBuffer<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            written: 0,
        }
    }

    /// Writes out what is held.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n = std::task::ready!(
                std::pin::Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.written = 0;
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
}

impl<S: tokio::io::AsyncRead + AsyncWrite + Unpin> tokio::io::AsyncRead for ReplyBuffer<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_drain(cx))?;
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncRead + AsyncWrite + Unpin> AsyncWrite for ReplyBuffer<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending.len() >= REPLY_BUFFER_BYTES {
            std::task::ready!(this.poll_drain(cx))?;
        }
        this.pending.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending.len() >= REPLY_BUFFER_BYTES {
            return this.poll_drain(cx);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_drain(cx))?;
        std::pin::Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// What the milter knows about the current SMTP session and message.
#[derive(Debug, Default)]
pub struct Session {
    /// Header values arrive with their leading space (negotiated LEADING_SPACE), and values we
    /// add must carry one.
    pub leading_space: bool,
    /// The stages the MTA agreed not to wait for our reply to (SMFIP_NR_*).
    pub noreply: ProtoOpts,
    /// The configuration this message is handled with (taken at MAIL, so a reload in the
    /// middle of a message does not mix two).
    pub milter: Option<Arc<Milter>>,
    /// The message is being signed as it arrives (decided at end of headers).
    pub signing: Option<Signing>,
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

/// A message to be signed (decided at end of headers).
#[derive(Debug)]
pub struct Signing {
    /// The keys it is signed with.
    pub signers: Vec<Signer>,
    /// The `h=` list.
    pub header_list: Vec<String>,
    /// Hashing as it arrives, once the message outgrew [`STREAM_FROM_BYTES`]; before that it
    /// is buffered and signed in one go at end of message (no task, no hand-off between
    /// threads: what most mail is).
    pub stream: Option<SignStream>,
    /// Bytes seen so far (header section and body).
    pub bytes: usize,
}

/// Messages to be signed are buffered up to this size, then hashed as they arrive.
pub const STREAM_FROM_BYTES: usize = 256 * 1024;

/// What a callback answers: nothing when the MTA agreed not to wait (`stage` is one of the
/// NOREPLY_* options), else continue.
fn proceed(session: Option<&Session>, stage: ProtoOpts) -> Status {
    if session.is_some_and(|s| s.noreply.contains(stage)) {
        Status::Noreply
    } else {
        Status::Continue
    }
}

/// The stages we never act on, so the MTA need not wait for our reply to them.
fn noreply_stages() -> ProtoOpts {
    ProtoOpts::NOREPLY_CONNECT
        | ProtoOpts::NOREPLY_HELO
        | ProtoOpts::NOREPLY_MAIL
        | ProtoOpts::NOREPLY_RCPT
        | ProtoOpts::NOREPLY_HEADER
        | ProtoOpts::NOREPLY_EOH
        | ProtoOpts::NOREPLY_BODY
}

impl Session {
    fn reset_message(&mut self) {
        self.signing = None;
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

    /// At end of headers: is this message to be signed (signing mode, a trusted client, a key
    /// for the From domain)? If so, the body goes to the signer rather than to verification.
    fn start_signing(&mut self, authenticated: bool, daemon_name: Option<&str>) {
        if self.oversize {
            return;
        }
        let Some(milter) = self.milter.clone() else {
            return;
        };
        if !milter.dkim.config.mode.signs() {
            return;
        }
        let from = self
            .headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("From"))
            .and_then(|(_, value)| dkim::sign::from_address(value));
        let request = SignRequest {
            from: from.as_ref().map(|(l, d)| (l.as_str(), d.as_str())),
            authenticated,
            client: self.client.map(|a| a.ip()),
            daemon_name,
        };
        if !milter.dkim.trusted(&request) {
            return;
        }
        let signers = from
            .as_ref()
            .map(|(local, domain)| milter.dkim.signers_for(local, domain))
            .unwrap_or_default();
        if signers.is_empty() {
            return;
        }
        let header_list = milter
            .dkim
            .header_list(self.headers.iter().map(|(n, _)| n.as_str()));
        self.signing = Some(Signing {
            signers,
            header_list,
            stream: None,
            bytes: self.message.len(),
        });
    }

    /// A body chunk: buffered (for verification, or signing a small message), or hashed.
    async fn body(&mut self, chunk: Bytes) {
        self.body_bytes += chunk.len();
        let Some(signing) = self.signing.as_mut() else {
            self.buffer(&chunk);
            return;
        };
        signing.bytes += chunk.len();
        if signing.bytes > self.max_message_size {
            self.oversize = true;
            self.signing = None;
            self.message = Vec::new();
            return;
        }
        if let Some(stream) = signing.stream.as_mut() {
            stream.write(chunk).await;
            return;
        }
        self.message.extend_from_slice(&chunk);
        if self.message.len() >= STREAM_FROM_BYTES
            && let Some(milter) = &self.milter
        {
            let mut stream = milter
                .dkim
                .sign_streaming(&signing.signers, &signing.header_list);
            stream
                .write(Bytes::from(std::mem::take(&mut self.message)))
                .await;
            signing.stream = Some(stream);
        }
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
                proceed(cx.data.as_ref(), ProtoOpts::NOREPLY_CONNECT)
            })
        })
        .on_helo(|cx, helo| {
            Box::pin(async move {
                if let Some(session) = cx.data.as_mut() {
                    session.helo = lossy(&helo);
                }
                proceed(cx.data.as_ref(), ProtoOpts::NOREPLY_HELO)
            })
        })
        .on_mail(move |cx, args| {
            let milter = live_mail.borrow().clone();
            Box::pin(async move {
                let session = cx.data.get_or_insert_with(Session::default);
                session.reset_message();
                session.max_message_size = milter.dkim.config.max_message_size;
                session.milter = Some(milter);
                session.mail_from = args
                    .first()
                    .map(|a| strip_brackets(&lossy(a)))
                    .unwrap_or_default();
                proceed(cx.data.as_ref(), ProtoOpts::NOREPLY_MAIL)
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
                proceed(cx.data.as_ref(), ProtoOpts::NOREPLY_RCPT)
            })
        })
        .on_header(|cx, name, value| {
            Box::pin(async move {
                if let Some(session) = cx.data.as_mut() {
                    session.add_header(lossy(&name), lossy(&value));
                }
                proceed(cx.data.as_ref(), ProtoOpts::NOREPLY_HEADER)
            })
        })
        .on_eoh(|cx| {
            Box::pin(async move {
                let authenticated = macro_value(&cx.macros, c"{auth_type}").is_some()
                    || macro_value(&cx.macros, c"{auth_authen}").is_some();
                let daemon_name = macro_value(&cx.macros, c"{daemon_name}");
                if let Some(session) = cx.data.as_mut() {
                    session.buffer(b"\r\n");
                    session.start_signing(authenticated, daemon_name.as_deref());
                }
                proceed(cx.data.as_ref(), ProtoOpts::NOREPLY_EOH)
            })
        })
        .on_body(|cx, chunk| {
            Box::pin(async move {
                if let Some(session) = cx.data.as_mut() {
                    session.body(chunk).await;
                }
                proceed(cx.data.as_ref(), ProtoOpts::NOREPLY_BODY)
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
                    session.milter = None;
                }
                Status::Continue
            })
        })
        .on_close(|cx| {
            Box::pin(async move {
                // What was negotiated holds for the connection: after SMFIC_QUIT_NC the MTA
                // starts the next SMTP session on it without negotiating again.
                cx.data = cx.data.take().map(|old| Session {
                    leading_space: old.leading_space,
                    noreply: old.noreply,
                    ..Session::default()
                });
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
    // Only what the MTA offers (Postfix offers them all with milter_protocol 6).
    let noreply = offered_opts & noreply_stages();
    cx.requested_opts |= noreply;
    cx.data = Some(Session {
        leading_space,
        noreply,
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

fn macro_value(macros: &Macros, name: &std::ffi::CStr) -> Option<String> {
    macros
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
    let queue_id = macro_value(&cx.macros, c"i").unwrap_or_default();
    let authenticated = macro_value(&cx.macros, c"{auth_type}").is_some()
        || macro_value(&cx.macros, c"{auth_authen}").is_some();
    let Some(mut session) = cx.data.take() else {
        warn!(queue_id, "end of message without a session; passing it");
        return Status::Continue;
    };
    let milter = session.milter.clone().unwrap_or(milter);
    let message = std::mem::take(&mut session.message);
    let signing = session.signing.take();
    let facts = Facts {
        queue_id: &queue_id,
        authenticated,
        recorder: recorder.as_deref(),
    };
    let status = process(cx, &milter, &session, &message, signing, &facts).await;
    session.reset_message();
    cx.data = Some(session);
    status
}

/// What end-of-message knows besides the session.
struct Facts<'a> {
    queue_id: &'a str,
    authenticated: bool,
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
    signing: Option<Signing>,
    facts: &Facts<'_>,
) -> Status {
    let queue_id = facts.queue_id;
    let authenticated = facts.authenticated;
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
    if let Some(signing) = signing {
        return finish_signing(cx, milter, session, message, signing, queue_id, &client).await;
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
    let decision = dmarc::evaluate(dmarc_config, &input, &milter.auth, &mut percent_sample).await;
    if let Some(record) = &decision.record
        && let Some(recorder) = facts.recorder
        && let Err(err) = recorder.record(record).await
    {
        // Neither the store nor the spool took it: accepting would lose the record of a
        // message Postfix then delivers. The sender retries later.
        warn!(
            queue_id,
            client,
            "cannot record the DMARC result for reports (store and spool failed): {err}; answering tempfail"
        );
        let _ = cx.reply.set_error_reply(
            "451",
            Some("4.3.0"),
            ["DMARC report store unavailable, try again later"],
        );
        return Status::Tempfail;
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

/// End of a message being signed: the signatures, inserted at the top in the configured order.
async fn finish_signing(
    cx: &mut EomContext<Session>,
    milter: &Milter,
    session: &Session,
    message: &[u8],
    signing: Signing,
    queue_id: &str,
    client: &str,
) -> Status {
    let config = &milter.dkim.config;
    let Signing {
        signers,
        header_list,
        stream,
        ..
    } = signing;
    let values = match stream {
        Some(stream) => stream.finish().await.map_err(|e| e.to_string()),
        None => milter
            .dkim
            .sign(&signers, &header_list, message)
            .map_err(|e| e.to_string()),
    };
    let values = match values {
        Ok(values) => values,
        Err(err) => {
            warn!(queue_id, client, "signing failed: {err}");
            metrics::counter!("postern_milter_dkim_total", "action" => "sign_error").increment(1);
            return apply(cx, config.on_internal_error, "internal error while signing");
        }
    };
    // Each inserted at the top: the last inserted ends first, so insert in reverse to keep the
    // configured order.
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
    let from = session
        .headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("From"))
        .and_then(|(_, value)| dkim::sign::from_address(value));
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

/// Serves the milter protocol until shutdown.
pub async fn run(ctx: DaemonContext<Milter>) -> anyhow::Result<()> {
    let config = ctx.config.clone();
    let listener = Listener::bind(&config.listen, config.socket_mode_bits()?)
        .await
        .map_err(|err| anyhow::anyhow!("cannot listen on {}: {err}", config.listen))?;
    info!(listen = %listener.describe(), "listening");
    let recorder = if config.dmarc.enabled && config.dmarc.reports.enabled {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes the peer can read within a short wait.
    async fn available(peer: &mut tokio::io::DuplexStream) -> Vec<u8> {
        let mut buf = vec![0u8; 256];
        match tokio::time::timeout(Duration::from_millis(50), peer.read(&mut buf)).await {
            Ok(Ok(n)) => buf[..n].to_vec(),
            _ => Vec::new(),
        }
    }

    #[tokio::test]
    async fn replies_go_out_when_we_read_again_or_close() {
        let (ours, mut mta) = tokio::io::duplex(1 << 20);
        let mut milter = ReplyBuffer::new(ours);
        milter.write_all(b"\0\0\0\x01i").await.unwrap();
        milter.flush().await.unwrap();
        milter.write_all(b"\0\0\0\x01c").await.unwrap();
        milter.flush().await.unwrap();
        assert_eq!(available(&mut mta).await, b"", "held at flush");
        // Waiting for the MTA sends everything first, in one piece.
        mta.write_all(b"next").await.unwrap();
        let mut got = [0u8; 4];
        milter.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"next");
        assert_eq!(available(&mut mta).await, b"\0\0\0\x01i\0\0\0\x01c");
        // A large reply is not held back.
        let big = vec![b'b'; REPLY_BUFFER_BYTES + 10];
        milter.write_all(&big).await.unwrap();
        milter.write_all(b"x").await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < big.len() {
            let chunk = available(&mut mta).await;
            assert!(!chunk.is_empty(), "only {} bytes went out", seen.len());
            seen.extend(chunk);
        }
        // Closing sends what is left.
        milter.write_all(b"bye").await.unwrap();
        milter.shutdown().await.unwrap();
        let mut rest = Vec::new();
        mta.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"xbye");
    }
}
