//! Postfix tcp_table(5): the client sends `get KEY\n` with KEY %XX-encoded; the server answers
//! `200 VALUE\n` (found, %XX-encoded), `500 REASON\n` (not found) or `400 REASON\n` (error).

use bytes::BytesMut;
use tokio_util::codec::Decoder;

/// Longest request line accepted, newline excluded. Postfix's dict_tcp sends keys up to its
/// line limit of 4096; an address is at most 254 octets, %XX-encoding at most triples it.
pub const MAX_LINE_BYTES: usize = 4096;
/// Longest reply text: Postfix's dict_tcp refuses reply lines over 4096 bytes.
pub const MAX_REPLY_BYTES: usize = 4096;

/// A tcp_table request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `get KEY`: the decoded key.
    Get(String),
    /// A request the protocol does not know (`put`, or garbage): answered 400, connection kept.
    Invalid(String),
}

/// A tcp_table reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// 200: the key maps to this value.
    Found(String),
    /// 500: no such key (the reason is for logs; Postfix ignores it).
    NotFound(String),
    /// 400: the request failed.
    Error(String),
}

impl Reply {
    /// The reply line, value %XX-encoded, reasons stripped of anything that would break the line.
    pub fn encode(&self) -> Vec<u8> {
        let mut line = String::with_capacity(80);
        match self {
            Self::Found(value) => {
                line.push_str("200 ");
                encode_key_into(&mut line, value);
            }
            Self::NotFound(reason) => {
                line.push_str("500 ");
                push_printable(&mut line, reason);
            }
            Self::Error(reason) => {
                line.push_str("400 ");
                push_printable(&mut line, reason);
            }
        }
        if line.len() >= MAX_REPLY_BYTES {
            if matches!(self, Self::Found(_)) {
                // A cut address would be a wrong address: better no rewrite at all.
                return b"500 Result too long\n".to_vec();
            }
            let mut end = MAX_REPLY_BYTES - 1;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
        }
        line.push('\n');
        line.into_bytes()
    }
}

fn push_printable(line: &mut String, text: &str) {
    line.extend(text.chars().map(|c| if c.is_control() { ' ' } else { c }));
}

/// Why a line could not be framed (the connection is then closed).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TcpTableError {
    /// Longer than [`MAX_LINE_BYTES`].
    #[error("request line longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    /// The client closed the connection in the middle of a request.
    #[error("connection closed in the middle of a request")]
    Truncated,
    /// The socket failed.
    #[error("read failed: {0}")]
    Io(String),
}

impl TcpTableError {
    /// Whether the client should still get an error reply (it sent something we refuse), as
    /// opposed to having gone away.
    pub fn wants_reply(&self) -> bool {
        !matches!(self, Self::Truncated | Self::Io(_))
    }
}

impl From<std::io::Error> for TcpTableError {
    fn from(err: std::io::Error) -> Self {
        Self::Io(err.to_string())
    }
}

/// %XX-encodes what Postfix's dict_tcp and postsrsd 1.x encode: everything outside printable
/// ASCII, space, and `%`.
pub fn encode_key(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    encode_key_into(&mut out, text);
    out
}

/// [`encode_key`], appending to `out`.
fn encode_key_into(out: &mut String, text: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in text.as_bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
}

/// Decodes %XX escapes; `None` for a malformed escape or bytes that are not UTF-8.
pub fn decode_key(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Parses one request line (without its newline).
pub fn parse_line(line: &[u8]) -> Request {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(text) = std::str::from_utf8(line) else {
        return Request::Invalid("request is not ASCII".to_owned());
    };
    match text.split_once(' ') {
        Some(("get", key)) if !key.is_empty() && !key.contains(' ') => match decode_key(key) {
            Some(key) if !key.chars().any(char::is_control) => Request::Get(key),
            _ => Request::Invalid("malformed %XX encoding".to_owned()),
        },
        Some(("put", _)) => Request::Invalid("put is not supported".to_owned()),
        _ => Request::Invalid("invalid request".to_owned()),
    }
}

/// Frames request lines.
#[derive(Debug, Default)]
pub struct TcpTableDecoder {
    scanned: usize,
}

impl Decoder for TcpTableDecoder {
    type Item = Request;
    type Error = TcpTableError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, TcpTableError> {
        // Never trust the saved offset beyond the buffer it was taken from.
        let start = self.scanned.min(buf.len());
        match buf[start..].iter().position(|&b| b == b'\n') {
            Some(offset) => {
                let end = start + offset;
                self.scanned = 0;
                if end > MAX_LINE_BYTES + 1 {
                    return Err(TcpTableError::LineTooLong);
                }
                let line = buf.split_to(end + 1);
                Ok(Some(parse_line(&line[..end])))
            }
            None if buf.len() > MAX_LINE_BYTES + 1 => Err(TcpTableError::LineTooLong),
            None => {
                self.scanned = buf.len();
                Ok(None)
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, TcpTableError> {
        match self.decode(buf)? {
            Some(request) => Ok(Some(request)),
            None if buf.is_empty() => Ok(None),
            None => {
                self.scanned = 0;
                Err(TcpTableError::Truncated)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8]) -> Result<Vec<Request>, TcpTableError> {
        let mut decoder = TcpTableDecoder::default();
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(request) = decoder.decode(&mut buf)? {
            out.push(request);
        }
        Ok(out)
    }

    #[test]
    fn decodes_gets_and_answers() {
        let requests =
            decode_all(b"get alice@example.com\nget a%20b%2Bc%25d@x\nget caf%C3%A9@x\r\n").unwrap();
        assert_eq!(
            requests,
            vec![
                Request::Get("alice@example.com".into()),
                Request::Get("a b+c%d@x".into()),
                Request::Get("café@x".into())
            ]
        );
        assert_eq!(
            Reply::Found("SRS0=vmyz=2W=otherdomain.com=test@example.com".into()).encode(),
            b"200 SRS0=vmyz=2W=otherdomain.com=test@example.com\n"
        );
        assert_eq!(
            Reply::Found("a b+c%@x".into()).encode(),
            b"200 a%20b+c%25@x\n"
        );
        // Never a truncated address; reasons are cut at a character boundary.
        let long = "a".repeat(MAX_REPLY_BYTES);
        assert_eq!(
            Reply::Found(long.clone()).encode(),
            b"500 Result too long\n"
        );
        let reason = "é".repeat(MAX_REPLY_BYTES);
        let line = Reply::NotFound(reason).encode();
        assert!(line.len() <= MAX_REPLY_BYTES && line.ends_with(b"\n"));
        assert!(std::str::from_utf8(&line).is_ok());
        assert_eq!(
            Reply::NotFound("Domain excluded\nby policy".into()).encode(),
            b"500 Domain excluded by policy\n"
        );
        assert_eq!(
            Reply::Error("Invalid request".into()).encode(),
            b"400 Invalid request\n"
        );
    }

    #[test]
    fn round_trips_every_byte() {
        let all: String = (1u8..=127).map(char::from).chain("é€".chars()).collect();
        assert_eq!(decode_key(&encode_key(&all)).as_deref(), Some(all.as_str()));
    }

    #[test]
    fn partial_lines_wait_and_oversize_fails() {
        let mut decoder = TcpTableDecoder::default();
        let mut buf = BytesMut::from(&b"get ali"[..]);
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        buf.extend_from_slice(b"ce@x\n");
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Some(Request::Get("alice@x".into())))
        );
        let long = vec![b'a'; MAX_LINE_BYTES + 10];
        assert_eq!(decode_all(&long), Err(TcpTableError::LineTooLong));
        assert!(TcpTableError::LineTooLong.wants_reply());
        // End of stream: between requests is clean, inside one is an error without a reply.
        let mut buf = BytesMut::from(&b"get a@b\nget c"[..]);
        let mut decoder = TcpTableDecoder::default();
        assert_eq!(
            decoder.decode_eof(&mut buf),
            Ok(Some(Request::Get("a@b".into())))
        );
        assert_eq!(decoder.decode_eof(&mut buf), Err(TcpTableError::Truncated));
        assert!(!TcpTableError::Truncated.wants_reply());
        assert_eq!(decoder.decode_eof(&mut BytesMut::new()), Ok(None));
    }

    #[test]
    fn garbage_is_answered_as_invalid() {
        for line in [
            &b"hello"[..],
            b"get",
            b"get ",
            b"get a b",
            b"get %zz",
            b"get %4",
            b"\xff\xfe",
            b"put a b",
            b"get %00x",
            b"get %FF",
        ] {
            assert!(matches!(parse_line(line), Request::Invalid(_)), "{line:?}");
        }
    }
}
