//! The milter protocol's wire format, filter side (sendmail's libmilter, protocol version 6, as
//! Postfix's milter8 client speaks it): packets from the MTA in, values out; replies and
//! end-of-message modifications in, bytes out. No sockets, no state; a fuzz target decodes
//! arbitrary bytes with the same function.
//!
//! A packet is a 32-bit big-endian length, then that many bytes: one command byte and its
//! data. Strings are NUL-terminated.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::Decoder;

/// Largest packet accepted (command byte and data). Postfix sends body chunks of at most
/// 65 535 bytes, but a header as one packet, and `header_size_limit` is 102 400 by default.
pub const MAX_PACKET_BYTES: usize = 1024 * 1024 - 1;

/// The protocol version we speak.
pub const VERSION: u32 = 6;

/// Actions a filter may take at end of message (SMFIF_*), as negotiated.
pub mod action {
    /// Add (and insert) headers.
    pub const ADD_HEADERS: u32 = 0x01;
    /// Change or delete headers.
    pub const CHANGE_HEADERS: u32 = 0x10;
    /// Quarantine the message.
    pub const QUARANTINE: u32 = 0x20;
    /// Ask for macros per stage in the negotiation reply.
    pub const SET_MACRO_LIST: u32 = 0x100;
}

/// Protocol options (SMFIP_*): stages the MTA leaves out, replies it does not wait for.
pub mod protocol {
    /// No connect information.
    pub const NO_CONNECT: u32 = 0x01;
    /// No HELO.
    pub const NO_HELO: u32 = 0x02;
    /// No MAIL.
    pub const NO_MAIL: u32 = 0x04;
    /// No RCPT.
    pub const NO_RCPT: u32 = 0x08;
    /// No body.
    pub const NO_BODY: u32 = 0x10;
    /// No headers.
    pub const NO_HEADERS: u32 = 0x20;
    /// No end of headers.
    pub const NO_EOH: u32 = 0x40;
    /// No reply to headers.
    pub const NR_HEADER: u32 = 0x80;
    /// No unknown SMTP commands.
    pub const NO_UNKNOWN: u32 = 0x100;
    /// No DATA.
    pub const NO_DATA: u32 = 0x200;
    /// No reply to connect.
    pub const NR_CONNECT: u32 = 0x1000;
    /// No reply to HELO.
    pub const NR_HELO: u32 = 0x2000;
    /// No reply to MAIL.
    pub const NR_MAIL: u32 = 0x4000;
    /// No reply to RCPT.
    pub const NR_RCPT: u32 = 0x8000;
    /// No reply to DATA.
    pub const NR_DATA: u32 = 0x10000;
    /// No reply to unknown commands.
    pub const NR_UNKNOWN: u32 = 0x20000;
    /// No reply to end of headers.
    pub const NR_EOH: u32 = 0x40000;
    /// No reply to body chunks.
    pub const NR_BODY: u32 = 0x80000;
    /// Header values keep their leading space.
    pub const LEADING_SPACE: u32 = 0x100000;
}

/// The stages macros belong to, in the order of an SMTP session; the index is the number the
/// negotiation reply uses to ask for a stage's macros (SMFIM_*).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Connection (`C`).
    Connect = 0,
    /// HELO (`H`).
    Helo = 1,
    /// MAIL (`M`).
    Mail = 2,
    /// RCPT (`R`).
    Rcpt = 3,
    /// DATA (`T`).
    Data = 4,
    /// End of message (`E`).
    Eom = 5,
    /// End of headers (`N`).
    Eoh = 6,
}

impl Stage {
    /// The stage of a command byte, for the macros sent ahead of it.
    pub fn of_command(byte: u8) -> Option<Self> {
        Some(match byte {
            b'C' => Self::Connect,
            b'H' => Self::Helo,
            b'M' => Self::Mail,
            b'R' => Self::Rcpt,
            b'T' => Self::Data,
            b'E' => Self::Eom,
            b'N' => Self::Eoh,
            _ => return None,
        })
    }

    /// Position in an SMTP session (end of headers comes before end of message).
    pub fn order(self) -> usize {
        match self {
            Self::Connect => 0,
            Self::Helo => 1,
            Self::Mail => 2,
            Self::Rcpt => 3,
            Self::Data => 4,
            Self::Eoh => 5,
            Self::Eom => 6,
        }
    }
}

/// The connecting client's address family and address, as the MTA saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAddress {
    /// Unknown (`U`).
    Unknown,
    /// IPv4 or IPv6 (`4`, `6`), with the port.
    Inet(std::net::SocketAddr),
    /// A local socket (`L`), with its path.
    Local(String),
}

/// What the MTA sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `O`: the MTA's protocol version, actions and protocol options.
    Negotiate {
        /// Protocol version.
        version: u32,
        /// Actions offered.
        actions: u32,
        /// Protocol options offered.
        protocol: u32,
    },
    /// `D`: macros for the stage whose command follows.
    Macros {
        /// The stage, if it is one we know.
        stage: Option<Stage>,
        /// Name/value pairs (names as sent, `{auth_type}` or `i`).
        pairs: Vec<(String, String)>,
    },
    /// `C`: the client's host name and address.
    Connect {
        /// Host name (or `[address]`).
        hostname: String,
        /// Address.
        address: ClientAddress,
    },
    /// `H`: the HELO/EHLO argument.
    Helo(String),
    /// `M`: the envelope sender and its ESMTP arguments.
    Mail(Vec<String>),
    /// `R`: a recipient and its ESMTP arguments.
    Rcpt(Vec<String>),
    /// `T`: DATA.
    Data,
    /// `L`: a header.
    Header {
        /// Name.
        name: String,
        /// Value as sent (folds as LF, a leading space if negotiated).
        value: String,
    },
    /// `N`: end of headers.
    EndOfHeaders,
    /// `B`: a body chunk.
    Body(Bytes),
    /// `E`: end of message, with a last body chunk if any.
    EndOfMessage(Bytes),
    /// `A`: the message is abandoned; the connection stays.
    Abort,
    /// `Q`: the MTA closes the connection.
    Quit,
    /// `K`: the SMTP session ended; the next one reuses this connection.
    QuitNewConnection,
    /// `U`: an SMTP command the MTA did not know.
    Unknown(String),
}

/// Why the stream cannot be read as milter packets (the connection is closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// A length beyond [`MAX_PACKET_BYTES`].
    #[error("packet of {0} bytes is over the limit of {MAX_PACKET_BYTES}")]
    TooBig(usize),
    /// A zero length: not even a command byte.
    #[error("empty packet")]
    Empty,
    /// A command byte we do not know.
    #[error("unknown command {0:?}")]
    UnknownCommand(char),
    /// A command whose data does not parse.
    #[error("malformed {command:?} packet: {reason}")]
    Malformed {
        /// The command byte.
        command: char,
        /// What is wrong.
        reason: &'static str,
    },
    /// The socket failed.
    #[error("read failed: {0}")]
    Io(String),
}

impl From<std::io::Error> for ProtoError {
    fn from(err: std::io::Error) -> Self {
        Self::Io(err.to_string())
    }
}

/// Frames and parses the MTA's packets.
#[derive(Debug, Default)]
pub struct CommandDecoder;

impl Decoder for CommandDecoder {
    type Item = Command;
    type Error = ProtoError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Command>, ProtoError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len == 0 {
            return Err(ProtoError::Empty);
        }
        if len > MAX_PACKET_BYTES {
            return Err(ProtoError::TooBig(len));
        }
        if buf.len() < 4 + len {
            buf.reserve(4 + len - buf.len());
            return Ok(None);
        }
        buf.advance(4);
        let packet = buf.split_to(len).freeze();
        parse_command(packet).map(Some)
    }
}

/// Parses one packet (command byte and data).
pub fn parse_command(mut packet: Bytes) -> Result<Command, ProtoError> {
    let command = packet.get_u8();
    let malformed = |reason| ProtoError::Malformed {
        command: char::from(command),
        reason,
    };
    Ok(match command {
        b'O' => {
            if packet.len() < 12 {
                return Err(malformed("shorter than three 32-bit fields"));
            }
            Command::Negotiate {
                version: packet.get_u32(),
                actions: packet.get_u32(),
                protocol: packet.get_u32(),
            }
        }
        b'D' => {
            if packet.is_empty() {
                // Postfix sends empty macro packets for stages without macros.
                return Ok(Command::Macros {
                    stage: None,
                    pairs: Vec::new(),
                });
            }
            let stage = Stage::of_command(packet.get_u8());
            let strings = c_strings(&packet);
            let pairs = strings
                .chunks_exact(2)
                .map(|pair| (pair[0].clone(), pair[1].clone()))
                .collect();
            Command::Macros { stage, pairs }
        }
        b'C' => {
            let mut fields = packet.splitn(2, |&b| b == 0);
            let hostname = lossy(fields.next().unwrap_or_default());
            let mut rest = Bytes::copy_from_slice(fields.next().ok_or(malformed("no host name"))?);
            if rest.is_empty() {
                return Err(malformed("no address family"));
            }
            let family = rest.get_u8();
            let address = match family {
                b'U' => ClientAddress::Unknown,
                b'4' | b'6' | b'L' => {
                    if rest.len() < 2 {
                        return Err(malformed("no port"));
                    }
                    let port = rest.get_u16();
                    let text = lossy(rest.split(|&b| b == 0).next().unwrap_or_default());
                    if family == b'L' {
                        ClientAddress::Local(text)
                    } else {
                        // IPv6 addresses may come as "IPv6:..." (sendmail's form).
                        let ip = text.strip_prefix("IPv6:").unwrap_or(&text);
                        match ip.parse::<std::net::IpAddr>() {
                            Ok(ip) => ClientAddress::Inet(std::net::SocketAddr::new(ip, port)),
                            Err(_) => return Err(malformed("address does not parse")),
                        }
                    }
                }
                _ => return Err(malformed("unknown address family")),
            };
            Command::Connect { hostname, address }
        }
        b'H' => Command::Helo(first_string(&packet)),
        b'M' => Command::Mail(c_strings(&packet)),
        b'R' => Command::Rcpt(c_strings(&packet)),
        b'T' => Command::Data,
        b'L' => {
            let mut strings = packet.splitn(3, |&b| b == 0);
            let name = lossy(strings.next().unwrap_or_default());
            let value = lossy(strings.next().ok_or(malformed("no header value"))?);
            if name.is_empty() {
                return Err(malformed("empty header name"));
            }
            Command::Header { name, value }
        }
        b'N' => Command::EndOfHeaders,
        b'B' => Command::Body(packet),
        b'E' => Command::EndOfMessage(packet),
        b'A' => Command::Abort,
        b'Q' => Command::Quit,
        b'K' => Command::QuitNewConnection,
        b'U' => Command::Unknown(first_string(&packet)),
        other => return Err(ProtoError::UnknownCommand(char::from(other))),
    })
}

/// Text as UTF-8, invalid bytes replaced (header values are 8-bit in the wild).
fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The NUL-terminated strings of a packet's data (a last one without its NUL included).
fn c_strings(data: &[u8]) -> Vec<String> {
    let data = data.strip_suffix(&[0]).unwrap_or(data);
    if data.is_empty() {
        return Vec::new();
    }
    data.split(|&b| b == 0).map(lossy).collect()
}

fn first_string(data: &[u8]) -> String {
    lossy(data.split(|&b| b == 0).next().unwrap_or_default())
}

/// What the filter answers to a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `c`: go on.
    Continue,
    /// `a`: accept, stop filtering this message.
    Accept,
    /// `r`: reject (the MTA's default 5xx text).
    Reject,
    /// `t`: temporary failure (the MTA's default 4xx text).
    Tempfail,
    /// `d`: accept and drop the message.
    Discard,
    /// `y`: a reject or temporary failure with our own SMTP reply ("550 5.7.1 text").
    ReplyCode(String),
}

/// What the filter asks the MTA to change, sent before the end-of-message reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Modification {
    /// `i`: insert a header at an index (0 = on top).
    InsertHeader {
        /// Position among the headers.
        index: u32,
        /// Name.
        name: String,
        /// Value (LF folds; a leading space if negotiated).
        value: String,
    },
    /// `m`: change the index-th (1-based) header of that name; an empty value deletes it.
    ChangeHeader {
        /// Which of the headers with that name.
        index: u32,
        /// Name.
        name: String,
        /// New value; empty deletes.
        value: String,
    },
    /// `q`: hold the message in the MTA's hold queue, with the reason.
    Quarantine(String),
}

impl Modification {
    /// The SMFIF_* flag the MTA must have agreed to.
    pub fn needs(&self) -> u32 {
        match self {
            Self::InsertHeader { .. } => action::ADD_HEADERS,
            Self::ChangeHeader { .. } => action::CHANGE_HEADERS,
            Self::Quarantine(_) => action::QUARANTINE,
        }
    }
}

/// Appends a packet: length, command byte, data.
fn put_packet(out: &mut BytesMut, command: u8, data: &[&[u8]]) {
    let len: usize = 1 + data.iter().map(|d| d.len()).sum::<usize>();
    out.reserve(4 + len);
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    out.put_u8(command);
    for part in data {
        out.put_slice(part);
    }
}

/// A string as the wire carries it: no NUL inside (it would end the string early), then NUL.
fn c_string(text: &str) -> Vec<u8> {
    let mut bytes: Vec<u8> = text.bytes().filter(|&b| b != 0).collect();
    bytes.push(0);
    bytes
}

/// Appends the negotiation reply: version, actions, protocol options, and the macros wanted
/// per stage (space-separated names).
pub fn encode_negotiation(
    out: &mut BytesMut,
    version: u32,
    actions: u32,
    protocol: u32,
    macros: &[(Stage, &str)],
) {
    let mut data = Vec::with_capacity(12);
    data.extend_from_slice(&version.to_be_bytes());
    data.extend_from_slice(&actions.to_be_bytes());
    data.extend_from_slice(&protocol.to_be_bytes());
    for (stage, names) in macros {
        data.extend_from_slice(&(*stage as u32).to_be_bytes());
        data.extend_from_slice(&c_string(names));
    }
    put_packet(out, b'O', &[&data]);
}

/// Appends a reply.
pub fn encode_reply(out: &mut BytesMut, reply: &Reply) {
    match reply {
        Reply::Continue => put_packet(out, b'c', &[]),
        Reply::Accept => put_packet(out, b'a', &[]),
        Reply::Reject => put_packet(out, b'r', &[]),
        Reply::Tempfail => put_packet(out, b't', &[]),
        Reply::Discard => put_packet(out, b'd', &[]),
        Reply::ReplyCode(text) => {
            // One line: a CR or LF would end the SMTP reply early.
            let line = text.replace(['\r', '\n'], " ");
            put_packet(out, b'y', &[&c_string(&line)]);
        }
    }
}

/// Appends a modification.
pub fn encode_modification(out: &mut BytesMut, modification: &Modification) {
    match modification {
        Modification::InsertHeader { index, name, value } => put_packet(
            out,
            b'i',
            &[&index.to_be_bytes(), &c_string(name), &c_string(value)],
        ),
        Modification::ChangeHeader { index, name, value } => put_packet(
            out,
            b'm',
            &[&index.to_be_bytes(), &c_string(name), &c_string(value)],
        ),
        Modification::Quarantine(reason) => put_packet(out, b'q', &[&c_string(reason)]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(command: u8, data: &[u8]) -> Vec<u8> {
        let mut out = ((data.len() + 1) as u32).to_be_bytes().to_vec();
        out.push(command);
        out.extend_from_slice(data);
        out
    }

    fn decode_all(bytes: &[u8]) -> Result<Vec<Command>, ProtoError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(command) = CommandDecoder.decode(&mut buf)? {
            out.push(command);
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        Ok(out)
    }

    #[test]
    fn commands_as_postfix_sends_them() {
        let mut stream = Vec::new();
        let mut negotiate = Vec::new();
        negotiate.extend_from_slice(&6u32.to_be_bytes());
        negotiate.extend_from_slice(&0x1ffu32.to_be_bytes());
        negotiate.extend_from_slice(&0x1f_ffffu32.to_be_bytes());
        stream.extend(packet(b'O', &negotiate));
        stream.extend(packet(b'D', b"Cj\0mx.example\0{daemon_name}\0smtpd\0"));
        stream.extend(packet(b'C', b"mail.example.org\x004\x0f\xa0192.0.2.1\0"));
        stream.extend(packet(b'C', b"[::1]\x006\x00\x19IPv6:::1\0"));
        stream.extend(packet(b'C', b"localhost\0L\0\0/run/sock\0"));
        stream.extend(packet(b'C', b"unknown\0U"));
        stream.extend(packet(b'H', b"mail.example.org\0"));
        stream.extend(packet(b'M', b"<alice@example.org>\0SIZE=100\0"));
        stream.extend(packet(b'R', b"<bob@example.net>\0"));
        stream.extend(packet(b'D', b""));
        stream.extend(packet(b'L', b"Subject\0 hello\n\tworld\0"));
        stream.extend(packet(b'L', b"X-Empty\0\0"));
        stream.extend(packet(b'N', b""));
        stream.extend(packet(b'B', b"body\r\n"));
        stream.extend(packet(b'E', b""));
        stream.extend(packet(b'A', b""));
        stream.extend(packet(b'K', b""));
        stream.extend(packet(b'U', b"HELP\0"));
        stream.extend(packet(b'T', b""));
        stream.extend(packet(b'Q', b""));
        let commands = decode_all(&stream).unwrap();
        assert_eq!(
            commands,
            vec![
                Command::Negotiate {
                    version: 6,
                    actions: 0x1ff,
                    protocol: 0x1f_ffff
                },
                Command::Macros {
                    stage: Some(Stage::Connect),
                    pairs: vec![
                        ("j".into(), "mx.example".into()),
                        ("{daemon_name}".into(), "smtpd".into())
                    ]
                },
                Command::Connect {
                    hostname: "mail.example.org".into(),
                    address: ClientAddress::Inet("192.0.2.1:4000".parse().unwrap())
                },
                Command::Connect {
                    hostname: "[::1]".into(),
                    address: ClientAddress::Inet("[::1]:25".parse().unwrap())
                },
                Command::Connect {
                    hostname: "localhost".into(),
                    address: ClientAddress::Local("/run/sock".into())
                },
                Command::Connect {
                    hostname: "unknown".into(),
                    address: ClientAddress::Unknown
                },
                Command::Helo("mail.example.org".into()),
                Command::Mail(vec!["<alice@example.org>".into(), "SIZE=100".into()]),
                Command::Rcpt(vec!["<bob@example.net>".into()]),
                Command::Macros {
                    stage: None,
                    pairs: vec![]
                },
                Command::Header {
                    name: "Subject".into(),
                    value: " hello\n\tworld".into()
                },
                Command::Header {
                    name: "X-Empty".into(),
                    value: String::new()
                },
                Command::EndOfHeaders,
                Command::Body(Bytes::from_static(b"body\r\n")),
                Command::EndOfMessage(Bytes::new()),
                Command::Abort,
                Command::QuitNewConnection,
                Command::Unknown("HELP".into()),
                Command::Data,
                Command::Quit,
            ]
        );
    }

    #[test]
    fn partial_packets_wait_for_the_rest() {
        let whole = packet(b'H', b"mail.example.org\0");
        let mut buf = BytesMut::new();
        for (i, &b) in whole.iter().enumerate() {
            buf.put_u8(b);
            let got = CommandDecoder.decode(&mut buf).unwrap();
            if i + 1 < whole.len() {
                assert_eq!(got, None, "after {} bytes", i + 1);
            } else {
                assert_eq!(got, Some(Command::Helo("mail.example.org".into())));
            }
        }
    }

    #[test]
    fn oversize_empty_unknown_and_malformed_packets_are_errors() {
        assert_eq!(
            decode_all(b"\xff\xff\xff\xffO"),
            Err(ProtoError::TooBig(0xffff_ffff))
        );
        assert_eq!(decode_all(b"\0\0\0\0X"), Err(ProtoError::Empty));
        assert_eq!(
            decode_all(&packet(b'Z', b"junk")),
            Err(ProtoError::UnknownCommand('Z'))
        );
        assert!(matches!(
            decode_all(b"GET / HTTP/1.0\r\n\r\n"),
            Err(ProtoError::TooBig(_))
        ));
        for bad in [
            packet(b'O', b"\0\0\0\x06"),
            packet(b'C', b"host"),
            packet(b'C', b"host\0"),
            packet(b'C', b"host\x004"),
            packet(b'C', b"host\x004\0\x19not-an-address\0"),
            packet(b'C', b"host\0X"),
            packet(b'L', b"Subject"),
            packet(b'L', b"\0value\0"),
        ] {
            assert!(
                matches!(decode_all(&bad), Err(ProtoError::Malformed { .. })),
                "{bad:?}"
            );
        }
        // At the limit, a packet is accepted.
        let mut big = vec![0u8; MAX_PACKET_BYTES - 1];
        big[..4].copy_from_slice(b"abcd");
        assert!(matches!(
            decode_all(&packet(b'B', &big)).unwrap()[..],
            [Command::Body(ref b)] if b.len() == MAX_PACKET_BYTES - 1
        ));
    }

    #[test]
    fn garbage_never_panics() {
        // Every prefix of a valid stream, and bytes flipped one at a time.
        let mut stream = packet(b'C', b"mail.example.org\x004\x0f\xa0192.0.2.1\0");
        stream.extend(packet(b'L', b"Subject\0hello\0"));
        stream.extend(packet(b'D', b"Mi\0ABC\0"));
        let decode_what_decodes = |bytes: &[u8]| {
            let mut buf = BytesMut::from(bytes);
            while let Ok(Some(_)) = CommandDecoder.decode(&mut buf) {}
        };
        for end in 0..stream.len() {
            decode_what_decodes(&stream[..end]);
        }
        for i in 0..stream.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bent = stream.clone();
                bent[i] ^= flip;
                decode_what_decodes(&bent);
            }
        }
    }

    #[test]
    fn replies_and_modifications_on_the_wire() {
        let mut out = BytesMut::new();
        encode_negotiation(
            &mut out,
            6,
            action::ADD_HEADERS | action::SET_MACRO_LIST,
            protocol::NR_HEADER,
            &[(Stage::Mail, "{auth_type} i"), (Stage::Eom, "i")],
        );
        assert_eq!(
            &out[..],
            b"\0\0\0\x25O\0\0\0\x06\0\0\x01\x01\0\0\0\x80\0\0\0\x02{auth_type} i\0\0\0\0\x05i\0"
        );
        let mut out = BytesMut::new();
        for reply in [
            Reply::Continue,
            Reply::Accept,
            Reply::Reject,
            Reply::Tempfail,
            Reply::Discard,
        ] {
            encode_reply(&mut out, &reply);
        }
        assert_eq!(
            &out[..],
            b"\0\0\0\x01c\0\0\0\x01a\0\0\0\x01r\0\0\0\x01t\0\0\0\x01d"
        );
        let mut out = BytesMut::new();
        encode_reply(
            &mut out,
            &Reply::ReplyCode("550 5.7.1 no\r\nforged line".into()),
        );
        assert_eq!(&out[..], b"\0\0\0\x1by550 5.7.1 no  forged line\0");
        let mut out = BytesMut::new();
        encode_modification(
            &mut out,
            &Modification::InsertHeader {
                index: 0,
                name: "DKIM-Signature".into(),
                value: " v=1".into(),
            },
        );
        encode_modification(
            &mut out,
            &Modification::ChangeHeader {
                index: 2,
                name: "Authentication-Results".into(),
                value: String::new(),
            },
        );
        encode_modification(&mut out, &Modification::Quarantine("DMARC\0x".into()));
        assert_eq!(
            &out[..],
            &b"\0\0\0\x19i\0\0\0\0DKIM-Signature\0 v=1\0\
               \0\0\0\x1dm\0\0\0\x02Authentication-Results\0\0\
               \0\0\0\x08qDMARCx\0"[..]
        );
    }
}
