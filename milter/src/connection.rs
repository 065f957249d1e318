//! One MTA connection: negotiation, macros, each SMTP stage handed to the [`Session`], replies
//! only where the MTA waits for them, and the end-of-message modifications and verdict.
//!
//! The commands of one read are handled in turn and their replies go out together when we next
//! wait for the MTA. With the no-reply stages negotiated, Postfix sends a whole message (MAIL
//! to end of message) in a few writes and waits once, so a message costs one read and one
//! write here, in the connection's own task. (indymilter, used before, moved every packet
//! between the session task and a stream task over channels: about thirty task wake-ups and
//! 25 us of CPU per message before any DKIM work.)

use std::sync::Arc;

use bytes::BytesMut;
use postern_common::serve::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::codec::Decoder;
use tracing::{debug, info, warn};

use crate::proto::{
    self, ClientAddress, Command, CommandDecoder, Modification, ProtoError, Reply, Stage, action,
    protocol,
};
use crate::reports::Recorder;
use crate::server::{Milter, Session};

/// The stages we never act on, so the MTA need not wait for our reply to them.
const NO_REPLY_STAGES: u32 = protocol::NR_CONNECT
    | protocol::NR_HELO
    | protocol::NR_MAIL
    | protocol::NR_RCPT
    | protocol::NR_HEADER
    | protocol::NR_EOH
    | protocol::NR_BODY;

/// Stages we have no use for: the MTA leaves them out.
const SKIPPED_STAGES: u32 = protocol::NO_DATA | protocol::NO_UNKNOWN;

/// The actions we may take at end of message.
const ACTIONS: u32 = action::ADD_HEADERS | action::CHANGE_HEADERS | action::QUARANTINE;

/// Macros asked for, per stage: what the sign decision and the log lines need. Postfix's
/// default milter_*_macros send these anyway; asking makes it explicit for other MTAs.
const MACROS: [(Stage, &str); 3] = [
    (Stage::Connect, "j {daemon_name} {client_addr}"),
    (Stage::Mail, "{auth_authen} {auth_type} i"),
    (Stage::Eom, "i"),
];

/// Bytes read from the MTA at a time (Postfix writes up to 64 KiB, its VSTREAM buffer).
const READ_BYTES: usize = 64 * 1024;

/// The macros the MTA has sent, per stage, for the current SMTP session and message.
#[derive(Debug, Default)]
pub struct Macros {
    by_stage: [Vec<(String, String)>; 7],
}

impl Macros {
    /// Replaces a stage's macros.
    fn set(&mut self, stage: Stage, pairs: Vec<(String, String)>) {
        self.by_stage[stage.order()] = pairs;
    }

    /// Forgets the macros of the stages after `stage` (they belong to the previous message).
    fn clear_after(&mut self, stage: Stage) {
        for list in &mut self.by_stage[stage.order() + 1..] {
            list.clear();
        }
    }

    fn clear(&mut self) {
        for list in &mut self.by_stage {
            list.clear();
        }
    }

    /// A macro's value, looked up from the latest stage back (libmilter's smfi_getsymval);
    /// `{name}` and `name` are the same macro. Empty values count as absent.
    pub fn get(&self, name: &str) -> Option<&str> {
        let bare = name.trim_start_matches('{').trim_end_matches('}');
        self.by_stage
            .iter()
            .rev()
            .flatten()
            .find(|(n, _)| n.trim_start_matches('{').trim_end_matches('}') == bare)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }
}

/// What end of message answers: the modifications to send first, then the verdict.
#[derive(Debug)]
pub struct Eom {
    /// The actions the MTA agreed to (SMFIF_*).
    actions: u32,
    /// Changes, in the order they are sent.
    pub modifications: Vec<Modification>,
    /// A custom SMTP reply for a reject or temporary failure ("550 5.7.1 text").
    error_reply: Option<String>,
}

/// A modification the MTA did not agree to in the negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the MTA did not allow this change (milter action flag {0:#x} not negotiated)")]
pub struct NotNegotiated(u32);

/// The verdict of end of message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver (with the modifications).
    Continue,
    /// Reject, with the custom reply if one was set.
    Reject,
    /// Temporary failure, with the custom reply if one was set.
    Tempfail,
    /// Accept and drop.
    Discard,
}

impl Eom {
    /// An empty answer for a connection with these negotiated actions.
    pub fn new(actions: u32) -> Self {
        Self {
            actions,
            modifications: Vec::new(),
            error_reply: None,
        }
    }

    fn push(&mut self, modification: Modification) -> Result<(), NotNegotiated> {
        let needs = modification.needs();
        if self.actions & needs == 0 {
            return Err(NotNegotiated(needs));
        }
        self.modifications.push(modification);
        Ok(())
    }

    /// Inserts a header at `index` (0 = on top).
    pub fn insert_header(
        &mut self,
        index: u32,
        name: &str,
        value: String,
    ) -> Result<(), NotNegotiated> {
        self.push(Modification::InsertHeader {
            index,
            name: name.to_owned(),
            value,
        })
    }

    /// Deletes the `index`-th (1-based) header called `name`.
    pub fn delete_header(&mut self, index: u32, name: &str) -> Result<(), NotNegotiated> {
        self.push(Modification::ChangeHeader {
            index,
            name: name.to_owned(),
            value: String::new(),
        })
    }

    /// Holds the message in the MTA's hold queue.
    pub fn quarantine(&mut self, reason: String) -> Result<(), NotNegotiated> {
        self.push(Modification::Quarantine(reason))
    }

    /// The SMTP reply a reject or temporary failure carries: `code enhanced text`.
    pub fn set_error_reply(&mut self, code: &str, enhanced: &str, text: &str) {
        self.error_reply = Some(format!("{code} {enhanced} {text}"));
    }

    /// The reply packet for a verdict: a custom reply only if it matches the verdict's class.
    fn reply(&self, verdict: Verdict) -> Reply {
        let custom = |class: char| {
            self.error_reply
                .as_ref()
                .filter(|r| r.starts_with(class))
                .map(|r| Reply::ReplyCode(r.clone()))
        };
        match verdict {
            Verdict::Continue => Reply::Continue,
            Verdict::Discard => Reply::Discard,
            Verdict::Reject => custom('5').unwrap_or(Reply::Reject),
            Verdict::Tempfail => custom('4').unwrap_or(Reply::Tempfail),
        }
    }
}

/// What the negotiation settled.
#[derive(Debug, Clone, Copy)]
struct Negotiated {
    actions: u32,
    protocol: u32,
}

/// The negotiation reply to the MTA's offer, or why we cannot talk to it.
fn negotiate(
    out: &mut BytesMut,
    version: u32,
    offered_actions: u32,
    offered_protocol: u32,
) -> Result<Negotiated, String> {
    // libmilter talks to version 2 and later; everything since is negotiated by flags.
    if version < 2 {
        return Err(format!("milter protocol version {version} is too old"));
    }
    // Only what the MTA offers: asking for more makes it drop the session.
    let mut actions = offered_actions & ACTIONS;
    let macros: &[(Stage, &str)] = if offered_actions & action::SET_MACRO_LIST != 0 {
        actions |= action::SET_MACRO_LIST;
        &MACROS
    } else {
        &[]
    };
    // Header values byte for byte (simple header canonicalization needs the exact spacing).
    let protocol = offered_protocol & (NO_REPLY_STAGES | SKIPPED_STAGES | protocol::LEADING_SPACE);
    proto::encode_negotiation(out, version.min(proto::VERSION), actions, protocol, macros);
    Ok(Negotiated { actions, protocol })
}

/// How a connection ended, for the log.
enum Ending {
    Quit,
    Closed,
    Idle,
    Shutdown,
    Bad(String),
}

/// Serves one MTA connection until it quits, fails, idles out or the daemon stops (between
/// messages; a message under way is finished first).
pub async fn serve_connection(
    mut conn: Connection,
    live: watch::Receiver<Arc<Milter>>,
    recorder: Option<Arc<Recorder>>,
) {
    let mut state = ConnectionState {
        negotiated: Negotiated {
            actions: 0,
            protocol: 0,
        },
        macros: Macros::default(),
        session: Session::default(),
        in_message: false,
        live,
        recorder,
    };
    let mut input = BytesMut::with_capacity(READ_BYTES);
    let mut out = BytesMut::new();
    let ending = 'connection: loop {
        loop {
            let command = match CommandDecoder.decode(&mut input) {
                Ok(Some(command)) => command,
                Ok(None) => break,
                Err(err) => break 'connection Ending::Bad(err.to_string()),
            };
            match state.handle(command, &mut out).await {
                Ok(true) => {}
                Ok(false) => break 'connection Ending::Quit,
                Err(reason) => break 'connection Ending::Bad(reason),
            }
        }
        // What the commands of this read answered goes out in one write, before we wait.
        if !out.is_empty() {
            match tokio::time::timeout(conn.idle_timeout, conn.stream.write_all(&out)).await {
                Ok(Ok(())) => out.clear(),
                Ok(Err(_)) => break Ending::Closed,
                Err(_) => break Ending::Idle,
            }
        }
        if !state.in_message && conn.shutdown.is_cancelled() {
            break Ending::Shutdown;
        }
        input.reserve(READ_BYTES);
        let read = tokio::select! {
            biased;
            read = tokio::time::timeout(conn.idle_timeout, conn.stream.read_buf(&mut input)) => read,
            () = conn.shutdown.cancelled(), if !state.in_message => break Ending::Shutdown,
        };
        match read {
            Ok(Ok(0)) => {
                if input.is_empty() {
                    break Ending::Closed;
                }
                break Ending::Bad(
                    ProtoError::Io("connection closed in the middle of a packet".into())
                        .to_string(),
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(err)) => break Ending::Bad(ProtoError::from(err).to_string()),
            Err(_) => break Ending::Idle,
        }
    };
    if !out.is_empty() {
        let _ = tokio::time::timeout(conn.idle_timeout, conn.stream.write_all(&out)).await;
    }
    let peer = &conn.peer;
    match ending {
        Ending::Quit | Ending::Closed | Ending::Shutdown => {
            debug!(%peer, "milter connection ended")
        }
        Ending::Idle => {
            info!(%peer, timeout = ?conn.idle_timeout, "milter connection idle for too long; closed")
        }
        Ending::Bad(reason) => warn!(%peer, reason, "bad milter input; connection closed"),
    }
}

/// A connection's state between commands.
struct ConnectionState {
    negotiated: Negotiated,
    macros: Macros,
    session: Session,
    /// Between MAIL and the end (or abort) of the message.
    in_message: bool,
    live: watch::Receiver<Arc<Milter>>,
    recorder: Option<Arc<Recorder>>,
}

impl ConnectionState {
    /// Answers `Continue` to a stage unless the MTA agreed not to wait for it.
    fn proceed(&self, out: &mut BytesMut, no_reply: u32) {
        if self.negotiated.protocol & no_reply == 0 {
            proto::encode_reply(out, &Reply::Continue);
        }
    }

    /// Handles one command; `Ok(false)` when the MTA quits, `Err` when it cannot go on.
    async fn handle(&mut self, command: Command, out: &mut BytesMut) -> Result<bool, String> {
        match command {
            Command::Negotiate {
                version,
                actions,
                protocol,
            } => {
                self.macros.clear();
                self.negotiated = negotiate(out, version, actions, protocol)?;
                self.session = Session {
                    leading_space: self.negotiated.protocol & protocol::LEADING_SPACE != 0,
                    ..Session::default()
                };
                self.in_message = false;
            }
            Command::Macros { stage, pairs } => {
                if let Some(stage) = stage {
                    self.macros.set(stage, pairs);
                }
            }
            Command::Connect { hostname, address } => {
                self.macros.clear_after(Stage::Connect);
                self.session.client_name = hostname;
                self.session.client = match address {
                    ClientAddress::Inet(addr) => Some(addr),
                    ClientAddress::Local(_) | ClientAddress::Unknown => None,
                };
                self.proceed(out, protocol::NR_CONNECT);
            }
            Command::Helo(helo) => {
                self.macros.clear_after(Stage::Helo);
                self.session.helo = helo;
                self.proceed(out, protocol::NR_HELO);
            }
            Command::Mail(args) => {
                self.macros.clear_after(Stage::Mail);
                let milter = self.live.borrow().clone();
                self.session
                    .start_message(milter, args.first().map(String::as_str));
                self.in_message = true;
                self.proceed(out, protocol::NR_MAIL);
            }
            Command::Rcpt(args) => {
                self.macros.clear_after(Stage::Rcpt);
                self.session.add_recipient(args.first().map(String::as_str));
                self.proceed(out, protocol::NR_RCPT);
            }
            Command::Data => {
                self.macros.clear_after(Stage::Data);
                self.proceed(out, protocol::NR_DATA);
            }
            Command::Header { name, value } => {
                self.session.add_header(name, value);
                self.proceed(out, protocol::NR_HEADER);
            }
            Command::EndOfHeaders => {
                self.session
                    .end_of_headers(self.authenticated(), self.macros.get("{daemon_name}"));
                self.proceed(out, protocol::NR_EOH);
            }
            Command::Body(chunk) => {
                self.session.body(chunk).await;
                self.proceed(out, protocol::NR_BODY);
            }
            Command::EndOfMessage(chunk) => {
                if !chunk.is_empty() {
                    self.session.body(chunk).await;
                }
                let mut eom = Eom::new(self.negotiated.actions);
                // A message that arrived without MAIL is handled with the configuration now.
                let milter = match &self.session.milter {
                    Some(milter) => milter.clone(),
                    None => self.live.borrow().clone(),
                };
                let verdict = self
                    .session
                    .end_of_message(
                        &mut eom,
                        &milter,
                        self.macros.get("i").unwrap_or_default(),
                        self.authenticated(),
                        self.recorder.as_deref(),
                    )
                    .await;
                for modification in &eom.modifications {
                    proto::encode_modification(out, modification);
                }
                proto::encode_reply(out, &eom.reply(verdict));
                self.in_message = false;
            }
            Command::Abort => {
                self.session.reset_message();
                self.session.milter = None;
                self.in_message = false;
            }
            Command::Quit => return Ok(false),
            Command::QuitNewConnection => {
                // What was negotiated holds for the connection: the MTA starts the next SMTP
                // session on it without negotiating again.
                self.macros.clear();
                self.session = Session {
                    leading_space: self.session.leading_space,
                    ..Session::default()
                };
                self.in_message = false;
            }
            Command::Unknown(_) => self.proceed(out, protocol::NR_UNKNOWN),
        }
        Ok(true)
    }

    /// Whether the client authenticated (SASL): `{auth_type}` or `{auth_authen}` is set.
    fn authenticated(&self) -> bool {
        self.macros.get("{auth_type}").is_some() || self.macros.get("{auth_authen}").is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macros_by_stage_braces_or_not_latest_first() {
        let mut macros = Macros::default();
        macros.set(
            Stage::Connect,
            vec![
                ("j".into(), "mx".into()),
                ("{daemon_name}".into(), "smtpd".into()),
            ],
        );
        macros.set(
            Stage::Mail,
            vec![
                ("{auth_type}".into(), "PLAIN".into()),
                ("i".into(), "".into()),
            ],
        );
        macros.set(Stage::Eom, vec![("i".into(), "4ABC".into())]);
        assert_eq!(macros.get("{daemon_name}"), Some("smtpd"));
        assert_eq!(macros.get("daemon_name"), Some("smtpd"));
        assert_eq!(macros.get("{j}"), Some("mx"));
        assert_eq!(
            macros.get("i"),
            Some("4ABC"),
            "end of message's, not MAIL's empty one"
        );
        assert_eq!(macros.get("{auth_authen}"), None);
        // A new message forgets the last one's macros, not the connection's.
        macros.clear_after(Stage::Mail);
        assert_eq!(macros.get("i"), None);
        assert_eq!(macros.get("{auth_type}"), Some("PLAIN"));
        macros.clear_after(Stage::Connect);
        assert_eq!(macros.get("{auth_type}"), None);
        assert_eq!(macros.get("j"), Some("mx"));
    }

    #[test]
    fn negotiation_asks_only_for_what_is_offered() {
        let mut out = BytesMut::new();
        let all = negotiate(&mut out, 6, 0x1ff, 0x1f_ffff).unwrap();
        assert_eq!(all.actions, ACTIONS | action::SET_MACRO_LIST);
        assert_eq!(
            all.protocol,
            NO_REPLY_STAGES | SKIPPED_STAGES | protocol::LEADING_SPACE
        );
        let mut out = BytesMut::new();
        let few = negotiate(&mut out, 6, action::ADD_HEADERS, protocol::NR_HEADER).unwrap();
        assert_eq!(
            (few.actions, few.protocol),
            (action::ADD_HEADERS, protocol::NR_HEADER)
        );
        // Version 2 MTAs get version 2 back, without a macro list.
        assert_eq!(&out[5..9], &6u32.to_be_bytes());
        let mut out = BytesMut::new();
        negotiate(&mut out, 2, 0x1ff, 0).unwrap();
        assert_eq!(&out[5..9], &2u32.to_be_bytes());
        assert!(negotiate(&mut BytesMut::new(), 1, 0x1ff, 0).is_err());
    }

    #[test]
    fn custom_replies_only_with_their_verdict() {
        let mut eom = Eom::new(action::ADD_HEADERS);
        assert_eq!(eom.reply(Verdict::Reject), Reply::Reject);
        eom.set_error_reply("550", "5.7.1", "rejected by DMARC policy for example.com");
        assert_eq!(
            eom.reply(Verdict::Reject),
            Reply::ReplyCode("550 5.7.1 rejected by DMARC policy for example.com".into())
        );
        assert_eq!(eom.reply(Verdict::Tempfail), Reply::Tempfail);
        assert_eq!(eom.reply(Verdict::Continue), Reply::Continue);
        assert_eq!(
            eom.quarantine("x".into()),
            Err(NotNegotiated(action::QUARANTINE))
        );
        assert_eq!(
            eom.delete_header(1, "A-R"),
            Err(NotNegotiated(action::CHANGE_HEADERS))
        );
        assert!(eom.insert_header(0, "X", " y".into()).is_ok());
        assert_eq!(eom.modifications.len(), 1);
    }
}
