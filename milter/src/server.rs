//! The milter server: the accept loop (common::serve, with TCP_NODELAY, without which every
//! exchange with Postfix stalls ~40 ms on delayed ACKs), the per-message state a connection
//! keeps ([`Session`]), and what end of message does: the DKIM sign-or-verify decision, taken
//! at end of headers, so that a message we sign is held only up to [`STREAM_FROM_BYTES`] and
//! beyond that hashed as its body arrives, while one we verify is held once (mail-auth verifies
//! whole messages), each up to `dkim.max_message_size`; then DMARC and its report record.
//! The protocol itself is in `proto` (wire format) and `connection` (one MTA connection).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use mail_auth::{AuthenticatedMessage, MessageAuthenticator};
use postern_common::config::ConfigError;
use postern_common::daemon::{Daemon, DaemonContext};
use postern_common::listen::{self, Listener};
use postern_common::serve::ServeOptions;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::MilterConfig;
use crate::connection::{Eom, Verdict};
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

/// What the milter knows about the current SMTP session and message.
#[derive(Debug, Default)]
pub struct Session {
    /// Header values arrive with their leading space (negotiated LEADING_SPACE), and values we
    /// add must carry one.
    pub leading_space: bool,
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
    /// The From domain the keys were chosen for (for the log line).
    pub from_domain: String,
}

/// Messages to be signed are buffered up to this size, then hashed as they arrive.
pub const STREAM_FROM_BYTES: usize = 256 * 1024;

impl Session {
    /// Forgets the message (after end of message, or an abort).
    pub(crate) fn reset_message(&mut self) {
        self.signing = None;
        self.mail_from.clear();
        self.rcpt_to.clear();
        self.headers.clear();
        self.headers_dropped = 0;
        // The buffer is kept for the next message (most are a few kilobytes: no reallocation
        // as it fills), unless a large one grew it.
        self.message.clear();
        if self.message.capacity() > STREAM_FROM_BYTES {
            self.message = Vec::new();
        }
        self.body_bytes = 0;
        self.oversize = false;
    }

    /// MAIL: a new message, handled with the configuration live now (a reload in the middle
    /// of a message does not mix two).
    pub(crate) fn start_message(&mut self, milter: Arc<Milter>, sender: Option<&str>) {
        self.reset_message();
        self.max_message_size = milter.dkim.config.max_message_size;
        self.milter = Some(milter);
        self.mail_from = sender.map(strip_brackets).unwrap_or_default();
    }

    /// RCPT.
    pub(crate) fn add_recipient(&mut self, recipient: Option<&str>) {
        self.rcpt_to
            .push(recipient.map(strip_brackets).unwrap_or_default());
    }

    /// End of headers: the blank line, and whether the body goes to a signer.
    pub(crate) fn end_of_headers(&mut self, authenticated: bool, daemon_name: Option<&str>) {
        self.buffer(b"\r\n");
        self.start_signing(authenticated, daemon_name);
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
        let Some((local, domain)) = from else {
            return;
        };
        let signers = milter.dkim.signers_for(&local, &domain);
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
            from_domain: domain,
        });
    }

    /// A body chunk: buffered (for verification, or signing a small message), or hashed.
    pub(crate) async fn body(&mut self, chunk: Bytes) {
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

    /// A header, as the MTA sent it.
    pub(crate) fn add_header(&mut self, name: String, value: String) {
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

fn strip_brackets(arg: &str) -> String {
    arg.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_owned()
}

/// Most headers kept per message; more are counted but not stored (a message with thousands of
/// headers is an attack, not mail).
const MAX_HEADERS: usize = 1000;

/// A header value as the MTA wants it back: LF folds, and a leading space when negotiated.
fn milter_value(value: &str, leading_space: bool) -> String {
    let mut out = String::with_capacity(value.len() + 1);
    if leading_space {
        out.push(' ');
    }
    let mut rest = value;
    while let Some(at) = rest.find("\r\n") {
        out.push_str(&rest[..at]);
        out.push('\n');
        rest = &rest[at + 2..];
    }
    out.push_str(rest);
    out
}

/// Applies an On-* action; `what` says why, for the reply text and the log.
fn apply(eom: &mut Eom, action: Action, what: &str) -> Verdict {
    match action {
        Action::Accept | Action::Quarantine => Verdict::Continue,
        Action::Discard => Verdict::Discard,
        Action::Reject => {
            eom.set_error_reply("550", "5.7.1", &format!("DKIM: {what}"));
            Verdict::Reject
        }
        Action::Tempfail => {
            eom.set_error_reply("451", "4.7.1", &format!("DKIM: {what}"));
            Verdict::Tempfail
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

impl Session {
    /// End of message: sign, or verify and evaluate DMARC, with the configuration taken at
    /// MAIL; the modifications go into `eom`.
    pub(crate) async fn end_of_message(
        &mut self,
        eom: &mut Eom,
        milter: &Milter,
        queue_id: &str,
        authenticated: bool,
        recorder: Option<&Recorder>,
    ) -> Verdict {
        let signing = self.signing.take();
        let facts = Facts {
            queue_id,
            authenticated,
            recorder,
        };
        let session: &Session = self;
        let verdict = process(eom, milter, session, &session.message, signing, &facts).await;
        self.reset_message();
        verdict
    }
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
    eom: &mut Eom,
    milter: &Milter,
    session: &Session,
    message: &[u8],
    signing: Option<Signing>,
    facts: &Facts<'_>,
) -> Verdict {
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
        return Verdict::Continue;
    }
    // RFC 8601 §5: nobody else may speak in our name.
    for instance in dkim::verify::forged_instances(&session.headers, &milter.authserv_id) {
        match eom.delete_header(instance, "Authentication-Results") {
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
        return finish_signing(eom, milter, session, message, signing, queue_id, &client).await;
    }
    if !config.mode.verifies() {
        return Verdict::Continue;
    }
    let Some(mut parsed) = AuthenticatedMessage::parse(message) else {
        warn!(
            queue_id,
            client, "message cannot be parsed for DKIM verification"
        );
        return apply(eom, config.on_internal_error, "message cannot be parsed");
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
    if let Err(err) = eom.insert_header(
        0,
        "Authentication-Results",
        milter_value(&header, session.leading_space),
    ) {
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
        && let Err(err) = eom.quarantine(format!("DKIM: {}", verdict.case))
    {
        warn!(queue_id, client, "cannot quarantine: {err}");
    }
    if verdict.action != Action::Accept && verdict.action != Action::Quarantine {
        return apply(eom, verdict.action, verdict.case);
    }
    let dmarc_config = &milter.config.dmarc;
    if !dmarc_config.enabled {
        return apply(eom, verdict.action, verdict.case);
    }
    let Some(client_ip) = session.client.map(|a| a.ip()) else {
        return apply(eom, verdict.action, verdict.case);
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
        eom.set_error_reply(
            "451",
            "4.3.0",
            "DMARC report store unavailable, try again later",
        );
        return Verdict::Tempfail;
    }
    // After ours (index 0): DMARC's own Authentication-Results, then SPF's.
    for (index, value) in (1..).zip(
        [&decision.header, &decision.spf_header]
            .into_iter()
            .flatten(),
    ) {
        if let Err(err) = eom.insert_header(
            index,
            "Authentication-Results",
            milter_value(value, session.leading_space),
        ) {
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
        DmarcAction::Accept => apply(eom, verdict.action, verdict.case),
        DmarcAction::Quarantine { reason } => {
            if verdict.action != Action::Quarantine
                && let Err(err) = eom.quarantine(reason)
            {
                warn!(queue_id, client, "cannot quarantine: {err}");
            }
            Verdict::Continue
        }
        DmarcAction::Reject {
            code,
            enhanced,
            text,
        } => {
            eom.set_error_reply(code, enhanced, &text);
            Verdict::Reject
        }
        DmarcAction::Tempfail { text } => {
            eom.set_error_reply("451", "4.7.1", &text);
            Verdict::Tempfail
        }
    }
}

/// End of a message being signed: the signatures, inserted at the top in the configured order.
async fn finish_signing(
    eom: &mut Eom,
    milter: &Milter,
    session: &Session,
    message: &[u8],
    signing: Signing,
    queue_id: &str,
    client: &str,
) -> Verdict {
    let config = &milter.dkim.config;
    let Signing {
        signers,
        header_list,
        stream,
        from_domain,
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
            return apply(
                eom,
                config.on_internal_error,
                "internal error while signing",
            );
        }
    };
    // Each inserted at the top: the last inserted ends first, so insert in reverse to keep the
    // configured order.
    for value in values.iter().rev() {
        if let Err(err) = eom.insert_header(
            0,
            "DKIM-Signature",
            milter_value(value, session.leading_space),
        ) {
            warn!(queue_id, client, "cannot add DKIM-Signature: {err}");
            return apply(eom, config.on_internal_error, "internal error");
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
        from = from_domain.as_str(),
        signatures = selectors.join(",").as_str(),
        action = "sign",
        "signed"
    );
    metrics::counter!("postern_milter_dkim_total", "action" => "sign")
        .increment(signers.len() as u64);
    Verdict::Continue
}

/// Serves the milter protocol until shutdown.
pub async fn run(ctx: DaemonContext<Milter>) -> anyhow::Result<()> {
    let config = ctx.config.clone();
    let listener = listen::bind_named(&config.listen, config.socket_mode_bits()?).await?;
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
    let options = ServeOptions {
        max_connections: config.max_connections,
        idle_timeout: config.connection_timeout.get(),
        ..ServeOptions::default()
    };
    postern_common::serve::serve(listener, options, shutdown, move |conn| {
        crate::connection::serve_connection(conn, live.clone(), recorder.clone())
    })
    .await
    .map_err(|err| anyhow::anyhow!("milter server failed: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_go_back_with_lf_folds_and_the_negotiated_space() {
        assert_eq!(milter_value("a\r\n\tb\r\n\tc", true), " a\n\tb\n\tc");
        assert_eq!(milter_value("plain", false), "plain");
        assert_eq!(
            milter_value("lone\nlf and cr\r", true),
            " lone\nlf and cr\r"
        );
    }
}
