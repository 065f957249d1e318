//! The MTA side of the milter protocol (version 6, as Postfix speaks it): negotiation, macros,
//! the SMTP stages, and the modification actions a filter sends at end of message. Honours the
//! stages and replies the filter negotiated away, so it drives opendkim as well as our milter.
//! Writes are buffered and flushed when a reply is awaited, as Postfix's milter8 client does
//! (its VSTREAM sends "macros and event parameters in one VSTREAM transaction", and headers
//! and body chunks the filter needs no reply to go out together; SMFIC_ABORT waits in the
//! buffer for the next exchange).

use std::net::IpAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};

use super::{Io, Target, connect};

// Protocol flags (libmilter mfapi.h).
const NO_CONNECT: u32 = 0x1;
const NO_HELO: u32 = 0x2;
const NO_MAIL: u32 = 0x4;
const NO_RCPT: u32 = 0x8;
const NO_BODY: u32 = 0x10;
const NO_HDRS: u32 = 0x20;
const NO_EOH: u32 = 0x40;
const NR_HDR: u32 = 0x80;
const NO_DATA: u32 = 0x200;
const NR_CONN: u32 = 0x1000;
const NR_HELO: u32 = 0x2000;
const NR_MAIL: u32 = 0x4000;
const NR_RCPT: u32 = 0x8000;
const NR_DATA: u32 = 0x10000;
const NR_EOH: u32 = 0x40000;
const NR_BODY: u32 = 0x80000;
/// Every protocol bit Postfix 3.7 offers.
const OFFERED_PROTOCOL: u32 = 0x1F_FFFF;
/// Every action (add/change headers, body, recipients, quarantine, change from, macros).
const OFFERED_ACTIONS: u32 = 0x1FF;
/// Largest body chunk libmilter accepts.
const MAX_BODY_CHUNK: usize = 65_535;
/// Largest packet we accept from a filter.
const MAX_PACKET: usize = 1 << 20;
/// Write buffer: what is queued beyond this goes out at once (Postfix grows its VSTREAM buffer
/// to the TCP MSS, 64 KiB on loopback, see vstream_tweak_tcp).
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// A filter's verdict at one stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go on.
    Continue,
    /// Accept the message, stop filtering it.
    Accept,
    /// Reject (5xx).
    Reject,
    /// Temporary failure (4xx).
    Tempfail,
    /// Drop silently.
    Discard,
    /// A custom SMTP reply ("550 5.7.1 ...").
    ReplyCode(String),
    /// Skip the rest of the body.
    Skip,
    /// The stage was negotiated away or needs no reply.
    NotAsked,
}

/// A change the filter asked for at end of message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Modification {
    /// Append a header.
    AddHeader(String, String),
    /// Insert a header at an index.
    InsertHeader(u32, String, String),
    /// Change (empty value: delete) the index-th (1-based) header of that name.
    ChangeHeader(u32, String, String),
    /// Hold the message.
    Quarantine(String),
    /// Replace the envelope sender.
    ChangeFrom(String),
    /// Add a recipient.
    AddRecipient(String),
    /// Remove a recipient.
    DeleteRecipient(String),
    /// Replace (a chunk of) the body.
    ReplaceBody(Vec<u8>),
    /// Another action code.
    Other(u8),
}

/// One message to send.
#[derive(Debug, Clone, Default)]
pub struct MilterMessage {
    /// Envelope sender (without brackets).
    pub mail_from: String,
    /// Envelope recipients.
    pub rcpt_to: Vec<String>,
    /// Macros sent at MAIL (e.g. `{auth_authen}` for an authenticated submission).
    pub mail_macros: Vec<(String, String)>,
    /// The queue id (macro `i` at DATA and end of message).
    pub queue_id: String,
    /// Headers in order (values without the leading space, folded lines joined with "\n\t").
    pub headers: Vec<(String, String)>,
    /// The body, CRLF line ends.
    pub body: Vec<u8>,
}

impl MilterMessage {
    /// Splits an RFC 5322 message (CRLF or LF) into headers and body.
    pub fn parse(raw: &[u8], mail_from: &str, rcpt_to: &[&str]) -> Self {
        // Headers as text; the body as bytes (8-bit bodies must reach a verifier unchanged).
        let split = (0..raw.len()).find_map(|i| {
            if raw[i..].starts_with(b"\r\n\r\n") {
                Some((i, i + 4))
            } else if raw[i..].starts_with(b"\n\n") {
                Some((i, i + 2))
            } else {
                None
            }
        });
        let (head, body) =
            split.map_or((raw, &b""[..]), |(end, start)| (&raw[..end], &raw[start..]));
        let head = String::from_utf8_lossy(head).replace("\r\n", "\n");
        let mut headers: Vec<(String, String)> = Vec::new();
        for line in head.lines() {
            if line.starts_with([' ', '\t']) {
                if let Some(last) = headers.last_mut() {
                    last.1.push('\n');
                    last.1.push_str(line);
                }
            } else if let Some((name, value)) = line.split_once(':') {
                headers.push((
                    name.to_owned(),
                    value.strip_prefix(' ').unwrap_or(value).to_owned(),
                ));
            }
        }
        Self {
            mail_from: mail_from.to_owned(),
            rcpt_to: rcpt_to.iter().map(|r| (*r).to_owned()).collect(),
            mail_macros: Vec::new(),
            queue_id: "4ABCDEF0123".to_owned(),
            headers,
            body: crlf(body),
        }
    }
}

/// LF or CRLF line ends to CRLF, byte for byte otherwise.
fn crlf(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 32);
    for (i, &b) in body.iter().enumerate() {
        if b == b'\n' && (i == 0 || body[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// What one message produced.
#[derive(Debug, Clone, Default)]
pub struct MessageOutcome {
    /// The changes asked for at end of message.
    pub modifications: Vec<Modification>,
    /// The final verdict (of the stage that ended the message).
    pub verdict: Option<Verdict>,
}

impl MessageOutcome {
    /// Headers added or inserted, as (name, value).
    pub fn added_headers(&self) -> Vec<(String, String)> {
        self.modifications
            .iter()
            .filter_map(|m| match m {
                Modification::AddHeader(n, v) | Modification::InsertHeader(_, n, v) => {
                    Some((n.clone(), v.clone()))
                }
                _ => None,
            })
            .collect()
    }
}

/// One MTA connection to a filter.
pub struct MilterClient {
    stream: BufReader<BufWriter<Box<dyn Io>>>,
    protocol: u32,
    /// What the filter negotiated: (actions, protocol flags).
    pub negotiated: (u32, u32),
}

fn cstr(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(text.as_bytes());
    out.push(0);
}

impl MilterClient {
    /// Connects and negotiates (protocol version 6, everything offered).
    pub async fn connect(target: &Target) -> anyhow::Result<Self> {
        let mut client = Self {
            stream: BufReader::new(BufWriter::with_capacity(
                WRITE_BUFFER_BYTES,
                connect(target).await?,
            )),
            protocol: 0,
            negotiated: (0, 0),
        };
        let mut data = Vec::new();
        data.extend_from_slice(&6u32.to_be_bytes());
        data.extend_from_slice(&OFFERED_ACTIONS.to_be_bytes());
        data.extend_from_slice(&OFFERED_PROTOCOL.to_be_bytes());
        client.send(b'O', &data).await?;
        let (cmd, reply) = client.read().await?;
        anyhow::ensure!(
            cmd == b'O' && reply.len() >= 12,
            "bad negotiation reply {:?}",
            char::from(cmd)
        );
        let actions = u32::from_be_bytes(reply[4..8].try_into()?);
        client.protocol = u32::from_be_bytes(reply[8..12].try_into()?);
        client.negotiated = (actions, client.protocol);
        Ok(client)
    }

    async fn send(&mut self, cmd: u8, data: &[u8]) -> anyhow::Result<()> {
        let len = u32::try_from(data.len() + 1)?;
        let out = self.stream.get_mut();
        out.write_all(&len.to_be_bytes()).await?;
        out.write_u8(cmd).await?;
        out.write_all(data).await?;
        Ok(())
    }

    async fn read(&mut self) -> anyhow::Result<(u8, Vec<u8>)> {
        tokio::time::timeout(Duration::from_secs(30), async {
            self.stream.get_mut().flush().await?;
            let len = usize::try_from(self.stream.read_u32().await?)?;
            anyhow::ensure!((1..=MAX_PACKET).contains(&len), "bad packet length {len}");
            let cmd = self.stream.read_u8().await?;
            let mut data = vec![0u8; len - 1];
            self.stream.read_exact(&mut data).await?;
            Ok((cmd, data))
        })
        .await
        .map_err(|_| anyhow::anyhow!("no reply from the filter within 30 s"))?
    }

    fn verdict(cmd: u8, data: &[u8]) -> Option<Verdict> {
        Some(match cmd {
            b'c' => Verdict::Continue,
            b'a' => Verdict::Accept,
            b'r' => Verdict::Reject,
            b't' => Verdict::Tempfail,
            b'd' => Verdict::Discard,
            b's' => Verdict::Skip,
            b'y' => Verdict::ReplyCode(
                String::from_utf8_lossy(data.strip_suffix(&[0]).unwrap_or(data)).into_owned(),
            ),
            _ => return None,
        })
    }

    /// Sends a stage command and reads its verdict, unless the stage is negotiated away or needs
    /// no reply.
    async fn stage(
        &mut self,
        cmd: u8,
        data: &[u8],
        skip_flag: u32,
        noreply_flag: u32,
    ) -> anyhow::Result<Verdict> {
        if self.protocol & skip_flag != 0 {
            return Ok(Verdict::NotAsked);
        }
        self.send(cmd, data).await?;
        if self.protocol & noreply_flag != 0 {
            return Ok(Verdict::NotAsked);
        }
        loop {
            let (reply, body) = self.read().await?;
            if reply == b'p' {
                continue; // progress: the filter is still working
            }
            return Self::verdict(reply, &body).ok_or_else(|| {
                anyhow::anyhow!(
                    "unexpected reply {:?} to {:?}",
                    char::from(reply),
                    char::from(cmd)
                )
            });
        }
    }

    async fn macros(&mut self, stage: u8, pairs: &[(String, String)]) -> anyhow::Result<()> {
        let mut data = vec![stage];
        for (name, value) in pairs {
            cstr(&mut data, name);
            cstr(&mut data, value);
        }
        self.send(b'D', &data).await
    }

    /// The SMTP connection stage, with the macros Postfix sends then.
    pub async fn connect_stage(
        &mut self,
        hostname: &str,
        ip: IpAddr,
        port: u16,
        myhostname: &str,
    ) -> anyhow::Result<Verdict> {
        let macros = vec![
            ("j".to_owned(), myhostname.to_owned()),
            ("{daemon_name}".to_owned(), "smtpd".to_owned()),
            ("{client_addr}".to_owned(), ip.to_string()),
            ("{client_name}".to_owned(), hostname.to_owned()),
            ("v".to_owned(), "Postfix 3.7".to_owned()),
        ];
        self.macros(b'C', &macros).await?;
        let mut data = Vec::new();
        cstr(&mut data, hostname);
        data.push(if ip.is_ipv4() { b'4' } else { b'6' });
        data.extend_from_slice(&port.to_be_bytes());
        cstr(&mut data, &ip.to_string());
        self.stage(b'C', &data, NO_CONNECT, NR_CONN).await
    }

    /// HELO/EHLO.
    pub async fn helo(&mut self, name: &str) -> anyhow::Result<Verdict> {
        let mut data = Vec::new();
        cstr(&mut data, name);
        self.stage(b'H', &data, NO_HELO, NR_HELO).await
    }

    /// One whole message, MAIL to end of message. Stops at the first stage that does not say
    /// continue.
    pub async fn message(&mut self, message: &MilterMessage) -> anyhow::Result<MessageOutcome> {
        let mut outcome = MessageOutcome::default();
        let mut mail_macros = message.mail_macros.clone();
        mail_macros.push(("{mail_addr}".to_owned(), message.mail_from.clone()));
        self.macros(b'M', &mail_macros).await?;
        let mut data = Vec::new();
        cstr(&mut data, &format!("<{}>", message.mail_from));
        let verdict = self.stage(b'M', &data, NO_MAIL, NR_MAIL).await?;
        if !matches!(verdict, Verdict::Continue | Verdict::NotAsked) {
            outcome.verdict = Some(verdict);
            return Ok(outcome);
        }
        for rcpt in &message.rcpt_to {
            self.macros(b'R', &[("{rcpt_addr}".to_owned(), rcpt.clone())])
                .await?;
            let mut data = Vec::new();
            cstr(&mut data, &format!("<{rcpt}>"));
            let verdict = self.stage(b'R', &data, NO_RCPT, NR_RCPT).await?;
            if !matches!(verdict, Verdict::Continue | Verdict::NotAsked) {
                outcome.verdict = Some(verdict);
                return Ok(outcome);
            }
        }
        self.macros(b'T', &[("i".to_owned(), message.queue_id.clone())])
            .await?;
        let verdict = self.stage(b'T', &[], NO_DATA, NR_DATA).await?;
        if !matches!(verdict, Verdict::Continue | Verdict::NotAsked) {
            outcome.verdict = Some(verdict);
            return Ok(outcome);
        }
        for (name, value) in &message.headers {
            let mut data = Vec::new();
            cstr(&mut data, name);
            cstr(&mut data, value);
            let verdict = self.stage(b'L', &data, NO_HDRS, NR_HDR).await?;
            if !matches!(verdict, Verdict::Continue | Verdict::NotAsked) {
                outcome.verdict = Some(verdict);
                return Ok(outcome);
            }
        }
        let verdict = self.stage(b'N', &[], NO_EOH, NR_EOH).await?;
        if !matches!(verdict, Verdict::Continue | Verdict::NotAsked) {
            outcome.verdict = Some(verdict);
            return Ok(outcome);
        }
        for chunk in message.body.chunks(MAX_BODY_CHUNK) {
            let verdict = self.stage(b'B', chunk, NO_BODY, NR_BODY).await?;
            if verdict == Verdict::Skip {
                break;
            }
            if !matches!(verdict, Verdict::Continue | Verdict::NotAsked) {
                outcome.verdict = Some(verdict);
                return Ok(outcome);
            }
        }
        self.macros(b'E', &[("i".to_owned(), message.queue_id.clone())])
            .await?;
        self.send(b'E', &[]).await?;
        loop {
            let (cmd, data) = self.read().await?;
            if let Some(verdict) = Self::verdict(cmd, &data) {
                outcome.verdict = Some(verdict);
                return Ok(outcome);
            }
            outcome.modifications.push(parse_modification(cmd, &data));
        }
    }

    /// Forgets the current message and keeps the connection for the next one (SMFIC_ABORT, no
    /// reply expected): what Postfix sends after each message and at RSET. Like Postfix's, it
    /// stays in the write buffer until the next exchange.
    pub async fn abort(&mut self) -> anyhow::Result<()> {
        self.send(b'A', &[]).await
    }

    /// Ends the session politely.
    pub async fn quit(mut self) -> anyhow::Result<()> {
        self.send(b'Q', &[]).await?;
        self.stream.get_mut().flush().await?;
        Ok(())
    }

    /// Sends a raw packet at once (tests of malformed input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream.get_mut().write_all(bytes).await?;
        self.stream.get_mut().flush().await?;
        Ok(())
    }
}

fn split_cstrs(data: &[u8]) -> Vec<String> {
    data.split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn parse_modification(cmd: u8, data: &[u8]) -> Modification {
    let index = || {
        data.get(..4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_be_bytes)
    };
    match cmd {
        b'h' => {
            let parts = split_cstrs(data);
            Modification::AddHeader(
                parts.first().cloned().unwrap_or_default(),
                parts.get(1).cloned().unwrap_or_default(),
            )
        }
        b'i' | b'm' => {
            let parts = split_cstrs(data.get(4..).unwrap_or_default());
            let (name, value) = (
                parts.first().cloned().unwrap_or_default(),
                parts.get(1).cloned().unwrap_or_default(),
            );
            if cmd == b'i' {
                Modification::InsertHeader(index(), name, value)
            } else {
                Modification::ChangeHeader(index(), name, value)
            }
        }
        b'q' => Modification::Quarantine(split_cstrs(data).first().cloned().unwrap_or_default()),
        b'e' => Modification::ChangeFrom(split_cstrs(data).first().cloned().unwrap_or_default()),
        b'+' | b'2' => {
            Modification::AddRecipient(split_cstrs(data).first().cloned().unwrap_or_default())
        }
        b'-' => {
            Modification::DeleteRecipient(split_cstrs(data).first().cloned().unwrap_or_default())
        }
        b'b' => Modification::ReplaceBody(data.to_vec()),
        other => Modification::Other(other),
    }
}

/// A 4 KB test message (headers a DKIM signer covers, a plain-text body).
pub fn sample_message(from_domain: &str) -> Vec<u8> {
    let mut raw = format!(
        "From: Alice <alice@{from_domain}>\r\nTo: Bob <bob@dest.example>\r\nSubject: load test message\r\nDate: Wed, 25 Nov 2026 07:00:00 +0000\r\nMessage-ID: <load.{from_domain}@test>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    .into_bytes();
    while raw.len() < 4096 {
        raw.extend_from_slice(
            b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n",
        );
    }
    raw
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_keeps_8bit_bodies_and_folded_headers() {
        let raw = b"From: a@x.test\nSubject: one\n two\n\nl\xe9ine\r\nnext\n";
        let m = MilterMessage::parse(raw, "a@x.test", &["b@y.test"]);
        assert_eq!(
            m.headers,
            vec![
                ("From".to_owned(), "a@x.test".to_owned()),
                ("Subject".to_owned(), "one\n two".to_owned())
            ]
        );
        assert_eq!(m.body, b"l\xe9ine\r\nnext\r\n");
        let crlf_raw = b"A: b\r\n\r\nbody\r\n";
        assert_eq!(MilterMessage::parse(crlf_raw, "", &[]).body, b"body\r\n");
        assert_eq!(sample_message("example.test").len() / 1024, 4);
    }
}
