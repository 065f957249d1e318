//! The Postfix policy-delegation protocol (SMTPD_POLICY_README): `name=value` lines, an empty
//! line ends a request, several requests per connection; the answer is `action=...` and an empty
//! line. Pure: bytes in, values out, every frame capped. No sockets, no clock.

use bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

/// Longest attribute line accepted, newline excluded. Postfix's own attribute values are far
/// shorter (SMTP lines are at most 2048 bytes incl. ESMTP extensions); 8 KiB leaves room for
/// long client certificate subjects.
pub const MAX_LINE_BYTES: usize = 8192;
/// Most attributes in one request; Postfix 3.7 sends about 40.
pub const MAX_ATTRIBUTES: usize = 256;
/// Largest request accepted, terminating empty line included.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Why a request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    /// A line longer than [`MAX_LINE_BYTES`].
    #[error("attribute line longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    /// A request larger than [`MAX_REQUEST_BYTES`].
    #[error("request larger than {MAX_REQUEST_BYTES} bytes")]
    RequestTooLarge,
    /// More than [`MAX_ATTRIBUTES`] attributes.
    #[error("more than {MAX_ATTRIBUTES} attributes")]
    TooManyAttributes,
    /// A line without `=`, or with an empty name.
    #[error("malformed attribute line {0:?} (expected name=value)")]
    MalformedLine(String),
    /// A NUL or other control character inside a line.
    #[error("control character in attribute line")]
    ControlCharacter,
    /// Bytes that are not UTF-8.
    #[error("attribute line is not UTF-8")]
    NotUtf8,
    /// The connection closed in the middle of a request.
    #[error("connection closed in the middle of a request ({0} bytes unanswered)")]
    Truncated(usize),
    /// The socket failed.
    #[error("read failed: {0}")]
    Io(String),
}

impl From<std::io::Error> for ProtoError {
    fn from(err: std::io::Error) -> Self {
        Self::Io(err.to_string())
    }
}

/// One policy request: its attributes in the order Postfix sent them.
///
/// The attributes live in one string (`name=value\n` each) with their offsets beside it: a
/// request is two allocations, not two per attribute (Postfix sends about 40).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyRequest {
    text: String,
    spans: Vec<AttributeSpan>,
}

/// Where one attribute sits in [`PolicyRequest::text`]: the name is `start..equals`, the value
/// `equals + 1..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AttributeSpan {
    start: u32,
    equals: u32,
    end: u32,
}

impl PolicyRequest {
    /// A request from name/value pairs (tests, --stdio callers).
    pub fn from_pairs<N: AsRef<str>, V: AsRef<str>>(
        pairs: impl IntoIterator<Item = (N, V)>,
    ) -> Self {
        let mut request = Self::default();
        for (name, value) in pairs {
            request.push(name.as_ref(), value.as_ref());
        }
        request
    }

    fn push(&mut self, name: &str, value: &str) {
        let start = offset(self.text.len());
        self.text.push_str(name);
        let equals = offset(self.text.len());
        self.text.push('=');
        self.text.push_str(value);
        let end = offset(self.text.len());
        self.text.push('\n');
        self.spans.push(AttributeSpan { start, equals, end });
    }

    fn name_and_value(&self, span: AttributeSpan) -> (&str, &str) {
        (
            &self.text[span.start as usize..span.equals as usize],
            &self.text[span.equals as usize + 1..span.end as usize],
        )
    }

    /// The first value of attribute `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.attrs().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Every attribute, in order.
    pub fn attrs(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + '_ {
        self.spans.iter().map(|&span| self.name_and_value(span))
    }

    /// Encodes the request as Postfix sends it (load generators, tests).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.text.len() + 1);
        out.extend_from_slice(self.text.as_bytes());
        out.push(b'\n');
        out
    }
}

/// A position in a request's text: requests are capped far below 4 GiB.
fn offset(at: usize) -> u32 {
    u32::try_from(at).expect("a request is far below 4 GiB")
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyReply {
    action: String,
}

impl PolicyReply {
    /// An answer with `action` (e.g. "DUNNO", "DEFER_IF_PERMIT Greylisted", "PREPEND X-Foo: bar").
    pub fn new(action: impl Into<String>) -> Self {
        let mut action: String = action.into();
        // A newline would end the reply early and smuggle a second one into the stream.
        action.retain(|c| c != '\n' && c != '\r');
        Self { action }
    }

    /// "Don't know": let the next restriction decide.
    pub fn dunno() -> Self {
        Self::new("DUNNO")
    }

    /// The action text.
    pub fn action(&self) -> &str {
        &self.action
    }

    /// `action=...\n\n`.
    pub fn encode(&self) -> Vec<u8> {
        format!("action={}\n\n", self.action).into_bytes()
    }
}

/// Parses one complete request: lines of `name=value`, optionally ending with the empty line.
pub fn parse_request(bytes: &[u8]) -> Result<PolicyRequest, ProtoError> {
    if bytes.len() > MAX_REQUEST_BYTES {
        return Err(ProtoError::RequestTooLarge);
    }
    let mut request = PolicyRequest {
        text: String::with_capacity(bytes.len()),
        // Postfix's lines average about 20 bytes: room enough without counting them first.
        spans: Vec::with_capacity(bytes.len() / 12 + 1),
    };
    // What Postfix sends is plain UTF-8 text with bare newlines: checked whole in one pass each
    // (a fold, not a short-circuiting search, so that it runs on wide registers). Anything else
    // takes the line-by-line path, which finds the line at fault and the rule it broke.
    let odd_bytes = bytes.iter().fold(false, |odd, &b| {
        odd | (b < 0x20 && b != b'\t' && b != b'\n') | (b == 0x7f)
    });
    match std::str::from_utf8(bytes) {
        Ok(text) if !odd_bytes => {
            if !add_plain_lines(&mut request, text)? {
                for line in text.split('\n').filter(|line| !line.is_empty()) {
                    add_attribute(&mut request, line)?;
                }
            }
        }
        _ => {
            for raw in bytes.split(|&b| b == b'\n') {
                let line = raw.strip_suffix(b"\r").unwrap_or(raw);
                if line.is_empty() {
                    continue;
                }
                if line.len() > MAX_LINE_BYTES {
                    return Err(ProtoError::LineTooLong);
                }
                if line.iter().any(|&b| b < 0x20 && b != b'\t' || b == 0x7f) {
                    return Err(ProtoError::ControlCharacter);
                }
                let text = std::str::from_utf8(line).map_err(|_| ProtoError::NotUtf8)?;
                add_attribute(&mut request, text)?;
            }
        }
    }
    Ok(request)
}

/// The usual request, one attribute per line and no empty line but at the end: its text is
/// kept as it came and the attributes are found where they lie, in one pass. Returns false,
/// leaving `request` empty as it came, on an empty line elsewhere (left to the line-by-line
/// path).
fn add_plain_lines(request: &mut PolicyRequest, text: &str) -> Result<bool, ProtoError> {
    let lines = text.trim_end_matches('\n');
    let mut start = 0;
    for line in lines.split('\n') {
        if line.is_empty() {
            request.spans.clear();
            return Ok(false);
        }
        let equals = start + name_length(line)?;
        if request.spans.len() == MAX_ATTRIBUTES {
            return Err(ProtoError::TooManyAttributes);
        }
        let end = start + line.len();
        request.spans.push(AttributeSpan {
            start: offset(start),
            equals: offset(equals),
            end: offset(end),
        });
        start = end + 1;
    }
    request.text.push_str(lines);
    request.text.push('\n');
    Ok(true)
}

/// The length of a `name=value` line's name, checking the line (no newline, no control
/// characters): not too long, a non-empty name without spaces.
fn name_length(line: &str) -> Result<usize, ProtoError> {
    if line.len() > MAX_LINE_BYTES {
        return Err(ProtoError::LineTooLong);
    }
    line.find('=')
        .filter(|&equals| equals > 0 && !line[..equals].contains(' '))
        .ok_or_else(|| ProtoError::MalformedLine(line.chars().take(64).collect()))
}

/// Adds one non-empty `name=value` line (no newline, no control characters) to `request`.
fn add_attribute(request: &mut PolicyRequest, line: &str) -> Result<(), ProtoError> {
    let (name, value) = line.split_at(name_length(line)?);
    if request.spans.len() == MAX_ATTRIBUTES {
        return Err(ProtoError::TooManyAttributes);
    }
    request.push(name, &value[1..]);
    Ok(())
}

/// Frames requests out of a byte stream.
#[derive(Debug, Default)]
pub struct PolicyDecoder {
    /// How far the buffer has been searched for the end of a request.
    scanned: usize,
    /// Where the current line started.
    line_start: usize,
}

impl Decoder for PolicyDecoder {
    type Item = PolicyRequest;
    type Error = ProtoError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<PolicyRequest>, ProtoError> {
        // Empty lines before a request (a client's stray newline) are skipped, as Postfix does.
        while self.scanned == 0 && buf.first() == Some(&b'\n') {
            buf.advance(1);
        }
        while let Some(offset) = buf[self.scanned..].iter().position(|&b| b == b'\n') {
            let newline = self.scanned + offset;
            if newline - self.line_start > MAX_LINE_BYTES + 1 {
                return Err(ProtoError::LineTooLong);
            }
            self.scanned = newline + 1;
            let line = &buf[self.line_start..newline];
            let is_end = line.is_empty() || line == b"\r";
            self.line_start = self.scanned;
            if is_end {
                // Parsed where it lies, then dropped from the buffer: splitting the frame off
                // would leave the codec a shared buffer and make it allocate a new one.
                let request = parse_request(&buf[..self.scanned]);
                buf.advance(self.scanned);
                self.scanned = 0;
                self.line_start = 0;
                return request.map(Some);
            }
        }
        self.scanned = buf.len();
        if buf.len() - self.line_start > MAX_LINE_BYTES + 1 {
            return Err(ProtoError::LineTooLong);
        }
        if buf.len() > MAX_REQUEST_BYTES {
            return Err(ProtoError::RequestTooLarge);
        }
        Ok(None)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<PolicyRequest>, ProtoError> {
        match self.decode(buf)? {
            Some(request) => Ok(Some(request)),
            None if buf.iter().all(|&b| b == b'\n' || b == b'\r') => Ok(None),
            None => Err(ProtoError::Truncated(buf.len())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POSTFIX_REQUEST: &[u8] = b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\nclient_address=192.0.2.1\nclient_name=mail.example.com\nhelo_name=mail.example.com\nsender=alice@example.com\nrecipient=bob@example.net\ninstance=123.456.7\nsasl_username=\nccert_subject=\nsize=12345\n\n";

    fn decode_all(bytes: &[u8]) -> (Vec<PolicyRequest>, Option<ProtoError>) {
        let mut decoder = PolicyDecoder::default();
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(request)) => out.push(request),
                Ok(None) => match decoder.decode_eof(&mut buf) {
                    Ok(Some(request)) => out.push(request),
                    Ok(None) => return (out, None),
                    Err(err) => return (out, Some(err)),
                },
                Err(err) => return (out, Some(err)),
            }
        }
    }

    #[test]
    fn parses_a_postfix_request() {
        let (requests, err) = decode_all(POSTFIX_REQUEST);
        assert_eq!(err, None);
        assert_eq!(requests.len(), 1);
        let r = &requests[0];
        assert_eq!(r.get("protocol_state"), Some("RCPT"));
        assert_eq!(r.get("sender"), Some("alice@example.com"));
        assert_eq!(r.get("sasl_username"), Some(""));
        assert_eq!(r.get("missing"), None);
        assert_eq!(r.attrs().len(), 12);
        assert_eq!(r.encode(), POSTFIX_REQUEST);
    }

    #[test]
    fn several_requests_on_one_connection_and_in_pieces() {
        let mut stream = POSTFIX_REQUEST.to_vec();
        stream.extend_from_slice(b"request=smtpd_access_policy\nrecipient=x@y\n\n");
        let (requests, err) = decode_all(&stream);
        assert_eq!(err, None);
        assert_eq!(requests.len(), 2);
        assert_eq!(requests[1].get("recipient"), Some("x@y"));
        // Byte by byte gives the same result.
        let mut decoder = PolicyDecoder::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for &b in &stream {
            buf.extend_from_slice(&[b]);
            if let Some(request) = decoder.decode(&mut buf).unwrap() {
                got.push(request);
            }
        }
        assert_eq!(got, requests);
    }

    #[test]
    fn values_may_contain_equals_and_crlf_is_tolerated() {
        let (requests, err) = decode_all(b"sender=a=b@c\r\nx=\r\n\r\n");
        assert_eq!(err, None);
        assert_eq!(requests[0].get("sender"), Some("a=b@c"));
        assert_eq!(requests[0].get("x"), Some(""));
    }

    #[test]
    fn partial_request_waits_and_truncated_one_is_reported() {
        let mut decoder = PolicyDecoder::default();
        let mut buf = BytesMut::from(&b"request=smtpd_access_policy\nsender=a"[..]);
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        assert_eq!(decoder.decode_eof(&mut buf), Err(ProtoError::Truncated(36)));
        let (requests, err) = decode_all(b"\n\n");
        assert!(requests.is_empty());
        assert_eq!(err, None);
    }

    #[test]
    fn oversize_line_and_request_are_refused_early() {
        let mut long = b"sender=".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_LINE_BYTES + 10));
        let mut decoder = PolicyDecoder::default();
        let mut buf = BytesMut::from(&long[..]);
        assert_eq!(decoder.decode(&mut buf), Err(ProtoError::LineTooLong));
        let mut many = Vec::new();
        for i in 0..(MAX_REQUEST_BYTES / 50) {
            many.extend_from_slice(format!("a{i}={}\n", "x".repeat(90)).as_bytes());
        }
        let mut decoder = PolicyDecoder::default();
        let mut buf = BytesMut::from(&many[..]);
        assert_eq!(decoder.decode(&mut buf), Err(ProtoError::RequestTooLarge));
        let attrs: String = (0..=MAX_ATTRIBUTES).map(|i| format!("a{i}=1\n")).collect();
        assert_eq!(
            parse_request(attrs.as_bytes()),
            Err(ProtoError::TooManyAttributes)
        );
    }

    #[test]
    fn garbage_is_refused() {
        for (bytes, want) in [
            (&b"no equals sign\n\n"[..], "malformed"),
            (b"=value\n\n", "malformed"),
            (b"a b=c\n\n", "malformed"),
            (b"a=\x00\x01\x02\n\n", "control"),
            (b"a=\xff\xfe\n\n", "UTF-8"),
            (
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n",
                "control",
            ),
        ] {
            let (requests, err) = decode_all(bytes);
            assert!(requests.is_empty());
            let text = err.expect("refused").to_string();
            assert!(text.contains(want), "{bytes:?}: {text}");
        }
    }

    #[test]
    fn reply_encoding_cannot_be_split() {
        assert_eq!(PolicyReply::dunno().encode(), b"action=DUNNO\n\n");
        let reply = PolicyReply::new("PREPEND X-Evil: a\n\naction=OK");
        assert_eq!(reply.encode(), b"action=PREPEND X-Evil: aaction=OK\n\n");
    }

    #[test]
    fn plain_and_line_by_line_parsing_agree() {
        // A carriage return sends a request down the line-by-line path; with bare newlines the
        // same request takes the plain one. Both must give the same request or the same error.
        let mut long_line = b"name=".to_vec();
        long_line.resize(MAX_LINE_BYTES + 10, b'v');
        long_line.extend_from_slice(b"\n\n");
        let many: Vec<u8> = (0..=MAX_ATTRIBUTES)
            .flat_map(|i| format!("a{i}=v\n").into_bytes())
            .collect();
        let mut cases: Vec<Vec<u8>> = [
            POSTFIX_REQUEST,
            b"a=1\nb=\n\n",
            b"a=1\n\nb=2\n",
            b"\n\na=1\n",
            b"a=x=y\n\tb=\t\n\n",
            b"a=1\nno equals\n\n",
            b"a=1\n=v\n\n",
            b"a b=1\n\n",
            b"\n\n",
            b"",
            "caf\u{e9}=cr\u{e8}me\n\n".as_bytes(),
        ]
        .iter()
        .map(|case| case.to_vec())
        .collect();
        cases.extend([long_line, many]);
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..2000 {
            let len = (seed % 60) as usize;
            cases.push(
                (0..len)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        [b'a', b'b', b'=', b'\n', b' ', b'\t'][(seed % 6) as usize]
                    })
                    .collect(),
            );
        }
        for plain in cases {
            let with_cr: Vec<u8> = plain
                .iter()
                .flat_map(|&b| {
                    if b == b'\n' {
                        vec![b'\r', b'\n']
                    } else {
                        vec![b]
                    }
                })
                .collect();
            assert_eq!(
                parse_request(&plain),
                parse_request(&with_cr),
                "{:?}",
                String::from_utf8_lossy(&plain)
            );
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap stand-in for the fuzz target, run on every test: pseudo-random byte soup.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let len = (seed % 300) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    [b'a', b'=', b'\n', b'\r', 0, 0xff, b' '][(seed % 7) as usize]
                })
                .collect();
            let _ = decode_all(&bytes);
            let _ = parse_request(&bytes);
        }
    }
}
