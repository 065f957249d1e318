//! The DKIM state built from `[dkim]` (tables and keys loaded once, at start and on SIGHUP), the
//! sign-or-verify decision (opendkim's: the From domain has a key and the client is trusted), and
//! signing with every key that applies: a whole message, or one fed in chunks as it arrives
//! ([`SignStream`]) so that a large message is hashed, never held.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;

use bytes::Bytes;
use mail_auth::dkim::{Canonicalization, DkimSigner};
use mail_auth::headers::HeaderWriter;
use mail_auth::signer::Ready;
use postern_common::config::ConfigError;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::keys::{LoadedKey, SharedKey, load_key};
use super::tables::{KeyTable, SigningTable};
use super::{Canon, DkimConfig};

/// RFC 6376 §5.4.1's header fields that should be signed (libopendkim's `dkim_should_signhdrs`),
/// plus the MIME and Message-ID fields receivers expect covered.
pub const DEFAULT_SIGN_HEADERS: [&str; 24] = [
    "from",
    "reply-to",
    "subject",
    "date",
    "to",
    "cc",
    "resent-date",
    "resent-from",
    "resent-sender",
    "resent-to",
    "resent-cc",
    "in-reply-to",
    "references",
    "list-id",
    "list-help",
    "list-unsubscribe",
    "list-subscribe",
    "list-post",
    "list-owner",
    "list-archive",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
];

/// RFC 6376 §5.4's fields that should not be signed (libopendkim's `dkim_should_not_signhdrs`).
pub const DEFAULT_OMIT_HEADERS: [&str; 7] = [
    "return-path",
    "received",
    "comments",
    "keywords",
    "bcc",
    "resent-bcc",
    "dkim-signature",
];

/// One key that signs a message.
#[derive(Debug, Clone)]
pub struct Signer {
    /// `d=`.
    pub domain: String,
    /// `s=`.
    pub selector: String,
    /// The key.
    pub key: LoadedKey,
}

/// What the decision needs to know about the SMTP session.
#[derive(Debug, Clone, Default)]
pub struct SignRequest<'a> {
    /// The From header's address (local part, domain).
    pub from: Option<(&'a str, &'a str)>,
    /// `{auth_type}` or `{auth_authen}` was set: a SASL-authenticated client.
    pub authenticated: bool,
    /// The client's address.
    pub client: Option<IpAddr>,
    /// The `{daemon_name}` macro.
    pub daemon_name: Option<&'a str>,
}

/// The DKIM state: config, tables and loaded keys.
#[derive(Debug)]
pub struct Dkim {
    /// The `[dkim]` table it was built from.
    pub config: DkimConfig,
    canon: Canon,
    tables: Option<(KeyTable, SigningTable)>,
    /// KeyTable keys by file.
    table_keys: HashMap<PathBuf, LoadedKey>,
    /// Single-key and native-form keys: (domain, selector, key).
    direct: Vec<Signer>,
}

impl Dkim {
    /// Loads tables and every key they name; any failure names the file.
    pub fn build(config: &DkimConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let canon = config.canon()?;
        let load = |path: &PathBuf, key: &'static str| {
            load_key(path, config.require_safe_keys, config.minimum_key_bits)
                .map_err(|e| ConfigError::invalid(key, e.to_string()))
        };
        let mut table_keys = HashMap::new();
        let tables = if config.key_table.is_empty() {
            None
        } else {
            let key_table = KeyTable::load(&config.key_table)
                .map_err(|e| ConfigError::invalid("dkim.key_table", e.to_string()))?;
            let signing_table = SigningTable::load(&config.signing_table)
                .map_err(|e| ConfigError::invalid("dkim.signing_table", e.to_string()))?;
            for (_, name) in &signing_table.entries {
                if key_table.get(name).is_none() {
                    return Err(ConfigError::invalid(
                        "dkim.signing_table",
                        format!(
                            "{}: key {name:?} is not in the KeyTable",
                            config.signing_table
                        ),
                    ));
                }
            }
            for entry in &key_table.entries {
                if !table_keys.contains_key(&entry.key_file) {
                    table_keys.insert(
                        entry.key_file.clone(),
                        load(&entry.key_file, "dkim.key_table")?,
                    );
                }
            }
            Some((key_table, signing_table))
        };
        let mut direct = Vec::new();
        if !config.domain.is_empty() {
            let key = load(&config.key_file, "dkim.key_file")?;
            for domain in &config.domain {
                direct.push(Signer {
                    domain: domain.to_ascii_lowercase(),
                    selector: config.selector.clone(),
                    key: key.clone(),
                });
            }
        }
        for entry in &config.keys {
            direct.push(Signer {
                domain: entry.domain.to_ascii_lowercase(),
                selector: entry.selector.clone(),
                key: load(&entry.key_file, "dkim.keys")?,
            });
        }
        Ok(Self {
            config: config.clone(),
            canon,
            tables,
            table_keys,
            direct,
        })
    }

    /// Every configured (domain, selector, key); `%` domains are listed as "%".
    pub fn all_keys(&self) -> Vec<Signer> {
        let mut out = self.direct.clone();
        if let Some((key_table, _)) = &self.tables {
            for entry in &key_table.entries {
                if let Some(key) = self.table_keys.get(&entry.key_file) {
                    out.push(Signer {
                        domain: entry.domain.clone(),
                        selector: entry.selector.clone(),
                        key: key.clone(),
                    });
                }
            }
        }
        out
    }

    /// Is the client one whose mail we sign (authenticated, internal, or a listed daemon)?
    pub fn trusted(&self, request: &SignRequest<'_>) -> bool {
        request.authenticated
            || request.client.is_some_and(|ip| {
                self.config
                    .internal_hosts
                    .iter()
                    .any(|net| net.contains(&ip))
            })
            || request
                .daemon_name
                .is_some_and(|name| self.config.mta.iter().any(|m| m == name))
    }

    /// The keys that sign mail from `local@domain` (none: not ours).
    pub fn signers_for(&self, local: &str, domain: &str) -> Vec<Signer> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let mut out: Vec<Signer> = Vec::new();
        let mut push = |signer: Signer| {
            if !out
                .iter()
                .any(|s| s.domain == signer.domain && s.selector == signer.selector)
            {
                out.push(signer);
            }
        };
        for signer in &self.direct {
            let matches = signer.domain == domain
                || (self.config.sub_domains && domain.ends_with(&format!(".{}", signer.domain)));
            if matches {
                push(signer.clone());
            }
        }
        if let Some((key_table, signing_table)) = &self.tables {
            for name in signing_table.lookup(local, &domain, self.config.multiple_signatures) {
                let Some(entry) = key_table.get(&name) else {
                    continue;
                };
                let Some(key) = self.table_keys.get(&entry.key_file) else {
                    continue;
                };
                push(Signer {
                    domain: if entry.domain == "%" {
                        domain.clone()
                    } else {
                        entry.domain.clone()
                    },
                    selector: entry.selector.clone(),
                    key: key.clone(),
                });
            }
        }
        out
    }

    /// The `h=` list for a message with these header names (in order): each signed field once
    /// (mail-auth signs every instance of a listed field, bottom up; listing a field twice
    /// would make it sign an absent extra instance), then each oversigned field once more,
    /// which mail-auth signs as absent.
    pub fn header_list<'a>(&self, names: impl Iterator<Item = &'a str>) -> Vec<String> {
        let omitted = |name: &str| {
            DEFAULT_OMIT_HEADERS
                .iter()
                .any(|h| h.eq_ignore_ascii_case(name))
                || self
                    .config
                    .omit_headers
                    .iter()
                    .any(|h| h.eq_ignore_ascii_case(name))
        };
        let all = self.config.sign_headers.iter().any(|h| h == "*");
        let listed = |name: &str| {
            if self.config.sign_headers.is_empty() {
                DEFAULT_SIGN_HEADERS
                    .iter()
                    .any(|h| h.eq_ignore_ascii_case(name))
            } else {
                all || self
                    .config
                    .sign_headers
                    .iter()
                    .any(|h| h.eq_ignore_ascii_case(name))
            }
        };
        let mut list: Vec<String> = Vec::new();
        for name in names.filter(|name| listed(name) && !omitted(name)) {
            if !list.iter().any(|n| n.eq_ignore_ascii_case(name)) {
                list.push(name.to_owned());
            }
        }
        for name in &self.config.oversign_headers {
            list.push(name.clone());
        }
        list
    }

    /// A mail-auth signer for one key with our canonicalization, expiry and header list.
    fn signer(&self, signer: &Signer, header_list: &[String]) -> DkimSigner<SharedKey, Ready> {
        let canon = |relaxed: bool| {
            if relaxed {
                Canonicalization::Relaxed
            } else {
                Canonicalization::Simple
            }
        };
        let mut builder = DkimSigner::from_key(SharedKey::clone(&signer.key.key))
            .domain(signer.domain.clone())
            .selector(signer.selector.clone())
            .headers(header_list.iter().cloned())
            .header_canonicalization(canon(self.canon.header_relaxed))
            .body_canonicalization(canon(self.canon.body_relaxed));
        let ttl = self.config.signature_ttl.get();
        if !ttl.is_zero() {
            builder = builder.expiration(ttl);
        }
        builder
    }

    /// Signs `raw` (the whole message, CRLF) with each signer; returns the DKIM-Signature
    /// values, folded with "\r\n\t", without the field name.
    pub fn sign(
        &self,
        signers: &[Signer],
        header_list: &[String],
        raw: &[u8],
    ) -> Result<Vec<String>, mail_auth::Error> {
        signers
            .iter()
            .map(|signer| {
                let signature = self.signer(signer, header_list).sign(raw)?;
                Ok(header_value(&signature.to_header()))
            })
            .collect()
    }

    /// Starts signing a message that arrives in chunks (header section first, then the body),
    /// with each signer; `header_list` from [`Dkim::header_list`]. Only the header
    /// section is kept; body chunks are canonicalized and hashed as they come, on a task of
    /// their own (mail-auth's streaming signer borrows its key, so it lives in that task).
    /// Needs a tokio runtime.
    pub fn sign_streaming(&self, signers: &[Signer], header_list: &[String]) -> SignStream {
        let signers: Vec<DkimSigner<SharedKey, Ready>> = signers
            .iter()
            .map(|signer| self.signer(signer, header_list))
            .collect();
        let (chunks, mut receiver) = mpsc::channel::<Bytes>(SIGN_QUEUE_CHUNKS);
        let task = tokio::spawn(async move {
            let mut streams: Vec<_> = signers.iter().map(DkimSigner::sign_streaming).collect();
            while let Some(chunk) = receiver.recv().await {
                for stream in &mut streams {
                    stream.write(&chunk);
                }
            }
            streams
                .into_iter()
                .map(|stream| Ok(header_value(&stream.finish()?.to_header())))
                .collect::<Result<Vec<String>, mail_auth::Error>>()
        });
        SignStream {
            chunks: Some(chunks),
            task: Some(task),
        }
    }
}

/// Chunks queued for the hashing task before [`SignStream::write`] waits: with the milter's
/// body chunks of at most 64 KiB, about 1 MiB in flight per message.
const SIGN_QUEUE_CHUNKS: usize = 16;

/// Why streaming signing failed.
#[derive(Debug, thiserror::Error)]
pub enum SignStreamError {
    /// mail-auth refused to sign (no signed header present, key failure).
    #[error("{0}")]
    Sign(#[from] mail_auth::Error),
    /// The hashing task is gone (it panicked or was cancelled).
    #[error("signing task failed: {0}")]
    Task(String),
}

/// A message being signed as it arrives (see [`Dkim::sign_streaming`]). Dropping it cancels the
/// signing.
#[derive(Debug)]
pub struct SignStream {
    chunks: Option<mpsc::Sender<Bytes>>,
    task: Option<JoinHandle<Result<Vec<String>, mail_auth::Error>>>,
}

impl SignStream {
    /// Feeds the next chunk, in message order; waits while the hashing task is behind.
    pub async fn write(&mut self, chunk: Bytes) {
        if let Some(chunks) = &self.chunks {
            // A send error means the task ended early; finish() reports why.
            let _ = chunks.send(chunk).await;
        }
    }

    /// Ends the message; returns the DKIM-Signature values, one per signer, as
    /// [`Dkim::sign`] does.
    pub async fn finish(mut self) -> Result<Vec<String>, SignStreamError> {
        self.chunks = None;
        let task = self
            .task
            .take()
            .ok_or_else(|| SignStreamError::Task("already finished".to_owned()))?;
        match task.await {
            Ok(result) => Ok(result?),
            Err(err) => Err(SignStreamError::Task(err.to_string())),
        }
    }
}

impl Drop for SignStream {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The value of a `DKIM-Signature: ...\r\n` header line as mail-auth writes it: without the
/// name and the final CRLF, folds kept.
fn header_value(header: &str) -> String {
    header
        .split_once(':')
        .map_or(header, |(_, v)| v)
        .trim_start()
        .trim_end_matches("\r\n")
        .to_owned()
}

/// The (local part, domain) of the first address in a From header value.
pub fn from_address(value: &str) -> Option<(String, String)> {
    let text = value.replace(['\r', '\n'], " ");
    let address = match (text.rfind('<'), text.rfind('>')) {
        (Some(start), Some(end)) if start < end => text[start + 1..end].to_owned(),
        _ => {
            // No angle brackets: strip comments, take the first token with an '@'.
            let mut plain = String::new();
            let mut depth = 0usize;
            for c in text.chars() {
                match c {
                    '(' => depth += 1,
                    ')' => depth = depth.saturating_sub(1),
                    _ if depth == 0 => plain.push(c),
                    _ => {}
                }
            }
            plain
                .split([',', ' ', '\t'])
                .find(|t| t.contains('@'))?
                .to_owned()
        }
    };
    let (local, domain) = address.trim().rsplit_once('@')?;
    let local = local.trim().trim_matches('"');
    let domain = domain.trim().trim_end_matches('.');
    if domain.is_empty() {
        return None;
    }
    Some((local.to_owned(), domain.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::super::keys::{KeygenAlgorithm, generate};
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn key_file(dir: &std::path::Path, name: &str, algorithm: KeygenAlgorithm) -> PathBuf {
        let path = dir.join(name);
        let generated = generate(algorithm, "example.com", name).unwrap();
        std::fs::write(&path, generated.private_pem).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    fn table_config(dir: &std::path::Path) -> DkimConfig {
        let rsa = key_file(dir, "rsa", KeygenAlgorithm::Rsa2048);
        let ed = key_file(dir, "ed", KeygenAlgorithm::Ed25519);
        std::fs::write(
            dir.join("KeyTable"),
            format!(
                "rsa example.com:rsa:{}\ned example.com:ed:{}\nany %:rsa:{}\n",
                rsa.display(),
                ed.display(),
                rsa.display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("SigningTable"),
            "*@example.com rsa\n*@example.com ed\n*@hosted.example any\n",
        )
        .unwrap();
        DkimConfig {
            key_table: format!("refile:{}", dir.join("KeyTable").display()),
            signing_table: format!("refile:{}", dir.join("SigningTable").display()),
            ..DkimConfig::default()
        }
    }

    #[test]
    fn tables_give_dual_keys_and_percent_domains() {
        let dir = tempfile::tempdir().unwrap();
        let dkim = Dkim::build(&table_config(dir.path())).unwrap();
        let signers = dkim.signers_for("alice", "Example.COM");
        let names: Vec<(&str, &str, &str)> = signers
            .iter()
            .map(|s| (s.domain.as_str(), s.selector.as_str(), s.key.kind))
            .collect();
        assert_eq!(
            names,
            [
                ("example.com", "rsa", "rsa"),
                ("example.com", "ed", "ed25519")
            ]
        );
        let hosted = dkim.signers_for("bob", "hosted.example");
        assert_eq!(hosted[0].domain, "hosted.example");
        assert!(dkim.signers_for("eve", "other.org").is_empty());
        let single = Dkim::build(&DkimConfig {
            multiple_signatures: false,
            ..table_config(dir.path())
        })
        .unwrap();
        assert_eq!(single.signers_for("alice", "example.com").len(), 1);
    }

    #[test]
    fn a_missing_or_unsafe_key_fails_the_build_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = table_config(dir.path());
        std::fs::set_permissions(
            dir.path().join("ed"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        let err = Dkim::build(&config).unwrap_err().to_string();
        assert!(
            err.contains("dkim.key_table") && err.contains("/ed"),
            "{err}"
        );
        std::fs::write(dir.path().join("SigningTable"), "*@x.example nokey\n").unwrap();
        std::fs::set_permissions(
            dir.path().join("ed"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let err = Dkim::build(&config).unwrap_err().to_string();
        assert!(err.contains("nokey"), "{err}");
    }

    #[test]
    fn trust_decision() {
        let dkim = Dkim::build(&DkimConfig {
            mta: vec!["ORIGINATING".into()],
            ..DkimConfig::default()
        })
        .unwrap();
        let outside: IpAddr = "192.0.2.1".parse().unwrap();
        let base = SignRequest {
            client: Some(outside),
            ..SignRequest::default()
        };
        assert!(!dkim.trusted(&base));
        assert!(dkim.trusted(&SignRequest {
            authenticated: true,
            ..base.clone()
        }));
        assert!(dkim.trusted(&SignRequest {
            daemon_name: Some("ORIGINATING"),
            ..base.clone()
        }));
        assert!(!dkim.trusted(&SignRequest {
            daemon_name: Some("mx.example.net"),
            ..base.clone()
        }));
        assert!(dkim.trusted(&SignRequest {
            client: Some("::1".parse().unwrap()),
            ..SignRequest::default()
        }));
    }

    #[test]
    fn header_lists_and_oversigning() {
        let dkim = Dkim::build(&DkimConfig::default()).unwrap();
        let names = [
            "Received", "From", "To", "Subject", "X-Mailer", "Bcc", "Date",
        ];
        assert_eq!(
            dkim.header_list(names.into_iter()),
            ["From", "To", "Subject", "Date", "From"]
        );
        let all = Dkim::build(&DkimConfig {
            sign_headers: vec!["*".into()],
            omit_headers: vec!["x-mailer".into()],
            oversign_headers: vec![],
            ..DkimConfig::default()
        })
        .unwrap();
        assert_eq!(
            all.header_list(names.into_iter()),
            ["From", "To", "Subject", "Date"]
        );
    }

    #[test]
    fn signing_with_expiry_and_sub_domains() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_file(dir.path(), "ed", KeygenAlgorithm::Ed25519);
        let dkim = Dkim::build(&DkimConfig {
            domain: vec!["example.com".into()],
            selector: "ed".into(),
            key_file: key,
            sub_domains: true,
            signature_ttl: postern_common::config::ConfigDuration::from_secs(86400),
            ..DkimConfig::default()
        })
        .unwrap();
        assert!(dkim.signers_for("a", "example.org").is_empty());
        let signers = dkim.signers_for("a", "mail.example.com");
        assert_eq!(signers[0].domain, "example.com");
        let raw = b"From: a@mail.example.com\r\nSubject: x\r\n\r\nbody\r\n";
        let list = dkim.header_list(["From", "Subject"].into_iter());
        let values = dkim.sign(&signers, &list, raw).unwrap();
        assert_eq!(values.len(), 1);
        let tags: String = values[0].split_whitespace().collect();
        assert!(
            tags.starts_with("v=1;a=ed25519-sha256;s=ed;d=example.com;c=relaxed/simple;"),
            "{tags}"
        );
        let t: u64 = tags
            .split(";t=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let x: u64 = tags
            .split(";x=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(x - t, 86400, "{tags}");
        assert!(!values[0].ends_with('\n'));
    }

    /// A tag's value in a signature with its folds removed.
    fn tag(value: &str, name: &str) -> String {
        let flat: String = value.split_whitespace().collect();
        flat.split(';')
            .find_map(|t| t.strip_prefix(&format!("{name}=")))
            .unwrap_or_default()
            .to_owned()
    }

    #[tokio::test]
    async fn streaming_signatures_match_one_shot_ones() {
        let dir = tempfile::tempdir().unwrap();
        let dkim = Dkim::build(&table_config(dir.path())).unwrap();
        let signers = dkim.signers_for("alice", "example.com");
        let mut raw = b"From: a@example.com\r\nTo: b@x.example\r\nReceived: x\r\nTo: c@x.example\r\nSubject:  two  spaces \r\n\r\n".to_vec();
        for i in 0..5000 {
            raw.extend_from_slice(format!("line {i} with  trailing space \r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n\r\n");
        let names = ["From", "To", "Received", "To", "Subject"];
        let list = dkim.header_list(names.into_iter());
        assert_eq!(list, ["From", "To", "Subject", "From"]);
        let whole = dkim.sign(&signers, &list, &raw).unwrap();
        // Chunks that split the header/body boundary and CRLF pairs.
        let mut stream = dkim.sign_streaming(&signers, &list);
        for chunk in raw.chunks(7001) {
            stream.write(Bytes::copy_from_slice(chunk)).await;
        }
        let streamed = stream.finish().await.unwrap();
        assert_eq!(streamed.len(), 2);
        for (one, two) in whole.iter().zip(&streamed) {
            assert_eq!(tag(one, "bh"), tag(two, "bh"));
            assert_eq!(tag(one, "h"), tag(two, "h"));
            assert_eq!(tag(one, "a"), tag(two, "a"));
        }
        assert_eq!(tag(&streamed[0], "h"), "Subject:To:To:From:From");
        // Dropped half way: the task is cancelled, nothing panics.
        let mut abandoned = dkim.sign_streaming(&signers, &list);
        abandoned
            .write(Bytes::from_static(b"From: a@example.com\r\n"))
            .await;
        drop(abandoned);
    }

    #[test]
    fn from_addresses() {
        let pick = |v: &str| from_address(v).map(|(l, d)| format!("{l}@{d}"));
        assert_eq!(
            pick("Alice <alice@Example.COM>").as_deref(),
            Some("alice@example.com")
        );
        assert_eq!(
            pick("bob@example.org (Bob)").as_deref(),
            Some("bob@example.org")
        );
        assert_eq!(
            pick("\"x\" <\"a b\"@ex.net>").as_deref(),
            Some("a b@ex.net")
        );
        assert_eq!(pick("undisclosed"), None);
        assert_eq!(
            pick("Alice\n\t<alice@example.com>").as_deref(),
            Some("alice@example.com")
        );
    }
}
