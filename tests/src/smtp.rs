//! A small SMTP client (to talk to the Postfix under test) and an SMTP sink (Postfix's next hop,
//! recording every delivered message with its envelope).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// One SMTP reply: code and the text of every line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code.
    pub code: u16,
    /// The text, lines joined with "\n", without codes.
    pub text: String,
}

impl Reply {
    /// "450 4.2.0 ..." form of the first line.
    pub fn line(&self) -> String {
        format!("{} {}", self.code, self.text.lines().next().unwrap_or(""))
    }
}

/// Every command sent and the reply it got.
#[derive(Debug, Clone, Default)]
pub struct Transcript {
    /// (command, reply), the greeting first with an empty command.
    pub exchanges: Vec<(String, Reply)>,
}

impl Transcript {
    /// The reply to the first command starting with `prefix` ("RCPT", "DATA", ".").
    pub fn reply_to(&self, prefix: &str) -> Option<&Reply> {
        self.exchanges
            .iter()
            .find(|(cmd, _)| cmd.starts_with(prefix))
            .map(|(_, reply)| reply)
    }

    /// Whether the message was accepted (the reply after the data was 250).
    pub fn accepted(&self) -> bool {
        self.reply_to(".").is_some_and(|r| r.code == 250)
    }
}

/// An envelope and message to send.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// HELO name.
    pub helo: String,
    /// MAIL FROM (empty: null sender).
    pub from: String,
    /// RCPT TO addresses.
    pub to: Vec<String>,
    /// The message, CRLF or LF line ends.
    pub data: Vec<u8>,
}

async fn read_reply(
    reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
) -> anyhow::Result<Reply> {
    let mut text = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            anyhow::bail!("connection closed while waiting for a reply");
        }
        let line = line.trim_end_matches(['\r', '\n']);
        anyhow::ensure!(line.len() >= 3, "short reply line {line:?}");
        let code: u16 = line[..3].parse()?;
        text.push(line.get(4..).unwrap_or("").to_owned());
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(Reply {
                code,
                text: text.join("\n"),
            });
        }
    }
}

/// Sends one message; stops at the first refusal (then QUIT). Every wait is bounded.
pub async fn send(addr: SocketAddr, message: &Outgoing) -> anyhow::Result<Transcript> {
    tokio::time::timeout(Duration::from_secs(60), send_inner(addr, message))
        .await
        .map_err(|_| anyhow::anyhow!("SMTP session to {addr} took over 60 s"))?
}

async fn send_inner(addr: SocketAddr, message: &Outgoing) -> anyhow::Result<Transcript> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut transcript = Transcript::default();
    transcript
        .exchanges
        .push((String::new(), read_reply(&mut reader).await?));
    let mut commands = vec![
        format!("EHLO {}", message.helo),
        format!("MAIL FROM:<{}>", message.from),
    ];
    commands.extend(message.to.iter().map(|to| format!("RCPT TO:<{to}>")));
    commands.push("DATA".to_owned());
    let mut any_rcpt = false;
    for command in commands {
        if command == "DATA" && !any_rcpt {
            break;
        }
        write.write_all(format!("{command}\r\n").as_bytes()).await?;
        let reply = read_reply(&mut reader).await?;
        let ok = reply.code < 400;
        if command.starts_with("RCPT") && ok {
            any_rcpt = true;
        }
        let is_rcpt = command.starts_with("RCPT");
        transcript.exchanges.push((command.clone(), reply));
        if !ok && !is_rcpt {
            break;
        }
        if command == "DATA" {
            write.write_all(&dot_stuff(&message.data)).await?;
            let reply = read_reply(&mut reader).await?;
            transcript.exchanges.push((".".to_owned(), reply));
        }
    }
    write.write_all(b"QUIT\r\n").await?;
    let _ = read_reply(&mut reader).await;
    Ok(transcript)
}

/// A message as the sink received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The envelope sender Postfix used (after canonical rewriting, e.g. SRS).
    pub mail_from: String,
    /// The envelope recipients.
    pub rcpt_to: Vec<String>,
    /// The message as delivered (CRLF, dot-unstuffed).
    pub data: Vec<u8>,
}

impl Delivered {
    /// The message as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }

    /// Every value of header `name` (case-insensitive), unfolded.
    pub fn headers(&self, name: &str) -> Vec<String> {
        let text = self.text().replace("\r\n", "\n");
        let head = text.split("\n\n").next().unwrap_or("");
        let mut out: Vec<String> = Vec::new();
        let mut current: Option<String> = None;
        for line in head.lines() {
            if line.starts_with([' ', '\t']) {
                if let Some(value) = current.as_mut() {
                    value.push(' ');
                    value.push_str(line.trim());
                }
                continue;
            }
            if let Some(value) = current.take() {
                out.push(value);
            }
            if let Some((n, v)) = line.split_once(':')
                && n.eq_ignore_ascii_case(name)
            {
                current = Some(v.trim().to_owned());
            }
        }
        out.extend(current);
        out
    }

    /// The body after the header section.
    pub fn body(&self) -> String {
        let text = self.text().replace("\r\n", "\n");
        text.split_once("\n\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default()
    }
}

/// An SMTP server that accepts everything and keeps it.
pub struct Sink {
    addr: SocketAddr,
    messages: Arc<Mutex<Vec<Delivered>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sink {
    /// Starts on 127.0.0.1 at a free port.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0".parse()?).await
    }

    /// Starts on a given address.
    pub async fn start_on(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let messages = Arc::new(Mutex::new(Vec::new()));
        let store = messages.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let store = store.clone();
                tokio::spawn(async move {
                    let _ = sink_session(stream, store).await;
                });
            }
        });
        Ok(Self {
            addr,
            messages,
            task,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every message received so far.
    pub fn messages(&self) -> Vec<Delivered> {
        self.messages.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Waits (at most `timeout`) until at least `count` messages have arrived.
    pub async fn wait_for(
        &self,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Delivered>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let messages = self.messages();
            if messages.len() >= count {
                return Ok(messages);
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "{} of {count} messages delivered within {timeout:?}",
                    messages.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn sink_session(stream: TcpStream, store: Arc<Mutex<Vec<Delivered>>>) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    write.write_all(b"220 sink.test ESMTP\r\n").await?;
    let mut current = Delivered {
        mail_from: String::new(),
        rcpt_to: Vec::new(),
        data: Vec::new(),
    };
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let command = line.trim_end().to_owned();
        let upper = command.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            b"250-sink.test\r\n250-8BITMIME\r\n250 PIPELINING\r\n"
        } else if upper.starts_with("HELO")
            || upper.starts_with("RSET")
            || upper.starts_with("NOOP")
        {
            if upper.starts_with("RSET") {
                current = Delivered {
                    mail_from: String::new(),
                    rcpt_to: Vec::new(),
                    data: Vec::new(),
                };
            }
            b"250 ok\r\n"
        } else if upper.starts_with("MAIL FROM:") {
            current.mail_from = angle(&command[10..]);
            b"250 ok\r\n"
        } else if upper.starts_with("RCPT TO:") {
            current.rcpt_to.push(angle(&command[8..]));
            b"250 ok\r\n"
        } else if upper == "DATA" {
            write.write_all(b"354 go ahead\r\n").await?;
            let mut data = Vec::new();
            loop {
                // Bytes, not text: 8-bit and malformed UTF-8 must arrive as they were sent.
                let mut l = Vec::new();
                if reader.read_until(b'\n', &mut l).await? == 0 {
                    return Ok(());
                }
                if l == b".\r\n" || l == b".\n" {
                    break;
                }
                let l = l.strip_prefix(b".").unwrap_or(&l);
                data.extend_from_slice(l);
            }
            current.data = data;
            if let Ok(mut messages) = store.lock() {
                messages.push(current.clone());
            }
            current = Delivered {
                mail_from: String::new(),
                rcpt_to: Vec::new(),
                data: Vec::new(),
            };
            b"250 queued\r\n"
        } else if upper == "QUIT" {
            write.write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else {
            b"502 not implemented\r\n"
        };
        write.write_all(reply).await?;
    }
}

/// The DATA payload on the wire: CRLF line ends, leading dots doubled, the final ".\r\n".
/// Works on bytes so 8-bit bodies go through untouched.
pub fn dot_stuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16);
    let mut lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.starts_with(b".") {
            out.push(b'.');
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

fn angle(arg: &str) -> String {
    let arg = arg.trim();
    let inner = arg.split_whitespace().next().unwrap_or("");
    inner
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing_is_byte_exact() {
        assert_eq!(dot_stuff(b"a\n.b\r\n..c"), b"a\r\n..b\r\n...c\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
        assert_eq!(dot_stuff(b"\xe9t\xe9\r\n"), b"\xe9t\xe9\r\n.\r\n");
    }

    #[tokio::test]
    async fn client_and_sink_keep_envelope_and_8bit_data() {
        let sink = Sink::start().await.unwrap();
        let data = b"Subject: caf\xe9\r\n\r\n.dot\r\n\xff\xfe not utf-8\r\n".to_vec();
        let outgoing = Outgoing {
            helo: "client.test".into(),
            from: "a@x.test".into(),
            to: vec!["b@y.test".into(), "c@y.test".into()],
            data: data.clone(),
        };
        let transcript = send(sink.addr(), &outgoing).await.unwrap();
        assert!(transcript.accepted(), "{transcript:?}");
        assert_eq!(transcript.exchanges[0].1.code, 220);
        assert_eq!(transcript.reply_to("EHLO").unwrap().code, 250);
        assert_eq!(transcript.reply_to("DATA").unwrap().line(), "354 go ahead");
        let got = sink.wait_for(1, Duration::from_secs(5)).await.unwrap();
        assert_eq!(got[0].mail_from, "a@x.test");
        assert_eq!(got[0].rcpt_to, vec!["b@y.test", "c@y.test"]);
        assert_eq!(got[0].data, data);
        assert!(got[0].body().starts_with(".dot\n"));
        // The null sender is kept as empty.
        let bounce = Outgoing {
            from: String::new(),
            ..outgoing
        };
        assert!(send(sink.addr(), &bounce).await.unwrap().accepted());
        let got = sink.wait_for(2, Duration::from_secs(5)).await.unwrap();
        assert_eq!(got[1].mail_from, "");
    }
}
