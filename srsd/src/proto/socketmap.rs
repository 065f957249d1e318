//! Postfix socketmap_table(5): requests and replies are netstrings (`LEN:DATA,`); a request is
//! `NAME KEY`, a reply `OK VALUE`, `NOTFOUND REASON`, `TEMP REASON`, `PERM REASON`.

use std::io::Write as _;

use bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

/// Largest netstring accepted; Postfix's socketmap client uses the same limit
/// (socketmap_max_reply = 100000).
pub const MAX_NETSTRING_BYTES: usize = 100_000;

/// A socketmap request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `NAME KEY`.
    Lookup {
        /// The map name (`forward`, `reverse`).
        map: String,
        /// The key.
        key: String,
    },
    /// A well-framed netstring that is not a lookup: answered PERM.
    Invalid(String),
}

/// A socketmap reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Found.
    Ok(String),
    /// Not in the map, with the reason (postsrsd 2.x writes one; Postfix ignores it).
    NotFound(String),
    /// A temporary failure.
    Temp(String),
    /// A permanent failure.
    Perm(String),
}

impl Reply {
    /// The reply netstring.
    pub fn encode(&self) -> Vec<u8> {
        let (status, text) = match self {
            Self::Ok(value) => ("OK ", value),
            Self::NotFound(reason) => ("NOTFOUND ", reason),
            Self::Temp(reason) => ("TEMP ", reason),
            Self::Perm(reason) => ("PERM ", reason),
        };
        if status.len() + text.len() > MAX_NETSTRING_BYTES {
            // Postfix would drop the connection on a reply over its socketmap_max_reply.
            return encode_netstring(b"PERM Too big.");
        }
        netstring_of(&[status.as_bytes(), text.as_bytes()])
    }
}

/// `LEN:DATA,`.
pub fn encode_netstring(data: &[u8]) -> Vec<u8> {
    netstring_of(&[data])
}

/// The netstring of `parts` joined, built in one buffer (a reply is `STATUS ` and a text).
fn netstring_of(parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = parts.iter().map(|part| part.len()).sum();
    let mut out = Vec::with_capacity(len + 8);
    // Writing to a Vec cannot fail.
    let _ = write!(out, "{len}:");
    for part in parts {
        out.extend_from_slice(part);
    }
    out.push(b',');
    out
}

/// Why the stream cannot be framed any more (answered PERM, then the connection is closed).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SocketmapError {
    /// Longer than [`MAX_NETSTRING_BYTES`].
    #[error("Too big.")]
    TooBig,
    /// Not a netstring.
    #[error("Invalid query.")]
    Malformed,
    /// The client closed the connection in the middle of a request.
    #[error("connection closed in the middle of a request")]
    Truncated,
    /// The socket failed.
    #[error("read failed: {0}")]
    Io(String),
}

impl SocketmapError {
    /// Whether the client should still get an error reply (it sent something we refuse), as
    /// opposed to having gone away.
    pub fn wants_reply(&self) -> bool {
        !matches!(self, Self::Truncated | Self::Io(_))
    }
}

impl From<std::io::Error> for SocketmapError {
    fn from(err: std::io::Error) -> Self {
        Self::Io(err.to_string())
    }
}

/// Parses the payload of a request netstring.
pub fn parse_payload(payload: &[u8]) -> Request {
    let Ok(text) = std::str::from_utf8(payload) else {
        return Request::Invalid("Invalid query.".to_owned());
    };
    match text.split_once(' ') {
        Some((map, key))
            if !map.is_empty() && !key.is_empty() && !text.chars().any(char::is_control) =>
        {
            Request::Lookup {
                map: map.to_owned(),
                key: key.to_owned(),
            }
        }
        _ => Request::Invalid("Invalid query.".to_owned()),
    }
}

/// Frames request netstrings.
#[derive(Debug, Default)]
pub struct SocketmapDecoder;

impl Decoder for SocketmapDecoder {
    type Item = Request;
    type Error = SocketmapError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, SocketmapError> {
        let digits = buf.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits > 6 {
            return Err(SocketmapError::TooBig);
        }
        if digits == buf.len() {
            return Ok(None);
        }
        if digits == 0 || buf[digits] != b':' || (digits > 1 && buf[0] == b'0') {
            return Err(SocketmapError::Malformed);
        }
        let len: usize = std::str::from_utf8(&buf[..digits])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(SocketmapError::Malformed)?;
        if len > MAX_NETSTRING_BYTES {
            return Err(SocketmapError::TooBig);
        }
        let total = digits + 1 + len + 1;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        if buf[total - 1] != b',' {
            return Err(SocketmapError::Malformed);
        }
        buf.advance(digits + 1);
        let payload = buf.split_to(len);
        buf.advance(1);
        Ok(Some(parse_payload(&payload)))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, SocketmapError> {
        match self.decode(buf)? {
            Some(request) => Ok(Some(request)),
            None if buf.is_empty() => Ok(None),
            None => Err(SocketmapError::Truncated),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8]) -> Result<Vec<Request>, SocketmapError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(request) = SocketmapDecoder.decode(&mut buf)? {
            out.push(request);
        }
        Ok(out)
    }

    #[test]
    fn decodes_requests_and_encodes_replies() {
        let got = decode_all(b"25:forward alice@example.com,22:reverse SRS0=a=b=c=d@x,").unwrap();
        assert_eq!(
            got[0],
            Request::Lookup {
                map: "forward".into(),
                key: "alice@example.com".into()
            }
        );
        assert_eq!(
            got[1],
            Request::Lookup {
                map: "reverse".into(),
                key: "SRS0=a=b=c=d@x".into()
            }
        );
        assert_eq!(Reply::Ok("x@y".into()).encode(), b"6:OK x@y,");
        assert_eq!(Reply::NotFound(String::new()).encode(), b"9:NOTFOUND ,");
        assert_eq!(
            Reply::NotFound("Need not rewrite local domain.".into()).encode(),
            b"39:NOTFOUND Need not rewrite local domain.,"
        );
        assert_eq!(
            Reply::Perm("Too big.".into()).encode(),
            b"13:PERM Too big.,"
        );
        assert_eq!(Reply::Temp("later".into()).encode(), b"10:TEMP later,");
        assert_eq!(encode_netstring(b""), b"0:,");
        // A reply Postfix would refuse is not sent.
        assert_eq!(
            Reply::Ok("a".repeat(MAX_NETSTRING_BYTES)).encode(),
            b"13:PERM Too big.,"
        );
    }

    #[test]
    fn partial_netstrings_wait() {
        let full = b"25:forward alice@example.com,";
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(SocketmapDecoder.decode(&mut buf), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn end_of_stream_inside_a_netstring_is_truncation() {
        let mut buf = BytesMut::from(&b"3:a b,30:forward a@"[..]);
        assert!(matches!(
            SocketmapDecoder.decode_eof(&mut buf),
            Ok(Some(Request::Lookup { .. }))
        ));
        assert_eq!(
            SocketmapDecoder.decode_eof(&mut buf),
            Err(SocketmapError::Truncated)
        );
        assert!(!SocketmapError::Truncated.wants_reply());
        assert!(SocketmapError::TooBig.wants_reply());
        assert_eq!(SocketmapDecoder.decode_eof(&mut BytesMut::new()), Ok(None));
    }

    #[test]
    fn oversize_and_garbage_are_refused() {
        assert_eq!(decode_all(b"100001:x"), Err(SocketmapError::TooBig));
        assert_eq!(decode_all(b"99999999999:"), Err(SocketmapError::TooBig));
        assert_eq!(decode_all(b"hello"), Err(SocketmapError::Malformed));
        assert_eq!(decode_all(b"5:abcdef"), Err(SocketmapError::Malformed));
        assert_eq!(decode_all(b"05:a b c,"), Err(SocketmapError::Malformed));
        assert_eq!(decode_all(b":,"), Err(SocketmapError::Malformed));
        assert_eq!(
            decode_all(b"3:abc,").unwrap(),
            vec![Request::Invalid("Invalid query.".into())]
        );
        assert_eq!(
            decode_all(b"4:a \xff\xfe,").unwrap(),
            vec![Request::Invalid("Invalid query.".into())]
        );
    }
}
