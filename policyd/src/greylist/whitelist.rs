//! postgrey's whitelist files, read as they are: client regexes, addresses, networks and domain
//! suffixes; recipient regexes, `user@domain`, `user@`, `domain`.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use tracing::warn;

/// A whitelist file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum WhitelistError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A `/regex/` line that is not a valid regular expression.
    #[error("{}:{line}: bad regular expression: {message}", path.display())]
    Regex {
        /// The file.
        path: PathBuf,
        /// Line number, from 1.
        line: usize,
        /// The regex engine's complaint.
        message: String,
    },
}

/// The client whitelist: names (regexes and domain suffixes) and networks.
#[derive(Debug, Default)]
pub struct ClientWhitelist {
    names: Patterns,
    /// Looked up for the name and each of its parent domains: one hash per label rather than a
    /// comparison per entry (Debian's file has 130).
    suffixes: HashSet<String>,
    networks: Vec<IpNet>,
}

/// The recipient whitelist.
#[derive(Debug, Default)]
pub struct RecipientWhitelist {
    patterns: Patterns,
}

/// Regexes matched as one set: a single pass over the text however many there are. Asked one
/// by one, Debian's 34 client regexes were a twentieth of a request's CPU. Regexes too large
/// to be held as one set (each has the engine's size limit alone, the set one for all) are
/// asked one by one, as before.
#[derive(Debug, Default)]
struct Patterns {
    sources: Vec<String>,
    set: Option<RegexSet>,
    each: Vec<Regex>,
}

impl Patterns {
    /// Adds a pattern, checked alone so that a bad one is reported with its file and line.
    fn push(&mut self, pattern: &str, path: &Path, line: usize) -> Result<(), WhitelistError> {
        regex(pattern, path, line)?;
        self.sources.push(pattern.to_owned());
        Ok(())
    }

    /// Builds the matcher once a file's patterns are in.
    fn build(&mut self, path: &Path) {
        match RegexSetBuilder::new(&self.sources)
            .case_insensitive(true)
            .build()
        {
            Ok(set) => {
                self.set = Some(set);
                self.each = Vec::new();
            }
            Err(err) => {
                warn!(
                    file = %path.display(),
                    error = %err,
                    "whitelist regexes too large as one set; matched one by one"
                );
                self.set = None;
                self.each = self
                    .sources
                    .iter()
                    .filter_map(|pattern| regex(pattern, path, 0).ok())
                    .collect();
            }
        }
    }

    fn is_match(&self, text: &str) -> bool {
        match &self.set {
            Some(set) => set.is_match(text),
            None => self.each.iter().any(|re| re.is_match(text)),
        }
    }

    fn len(&self) -> usize {
        self.sources.len()
    }
}

/// Comments stripped, whitespace trimmed, blank lines skipped; with line numbers.
fn entries(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().filter_map(|(index, line)| {
        let line = line
            .split_once('#')
            .map_or(line, |(before, _)| before)
            .trim();
        (!line.is_empty()).then_some((index + 1, line))
    })
}

fn regex(pattern: &str, path: &Path, line: usize) -> Result<Regex, WhitelistError> {
    RegexBuilder::new(pattern)
        .case_insensitive(true)
        .build()
        .map_err(|err| WhitelistError::Regex {
            path: path.to_owned(),
            line,
            message: err.to_string(),
        })
}

/// `/regex/` as postgrey recognises it: slashes at both ends, no whitespace inside.
fn slash_regex(entry: &str) -> Option<&str> {
    let inner = entry.strip_prefix('/')?.strip_suffix('/')?;
    (!inner.is_empty() && !inner.contains(char::is_whitespace)).then_some(inner)
}

fn is_dotted(entry: &str, parts: usize) -> bool {
    let fields: Vec<&str> = entry.split('.').collect();
    fields.len() == parts
        && fields
            .iter()
            .all(|f| (1..=3).contains(&f.len()) && f.bytes().all(|b| b.is_ascii_digit()))
}

/// Reads a file, or `None` (with a warning, except for `*.local` files, as postgrey) when it
/// does not exist.
fn read(path: &Path) -> Result<Option<String>, WhitelistError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            if path.extension().is_none_or(|ext| ext != "local") {
                warn!(file = %path.display(), "whitelist file not found; skipped");
            }
            Ok(None)
        }
        Err(source) => Err(WhitelistError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

impl ClientWhitelist {
    /// Loads the files in order; missing files are skipped as postgrey does.
    pub fn load(paths: &[PathBuf]) -> Result<Self, WhitelistError> {
        let mut list = Self::default();
        for path in paths {
            if let Some(text) = read(path)? {
                list.add(&text, path)?;
            }
        }
        Ok(list)
    }

    /// Adds the entries of one file's text.
    pub fn add(&mut self, text: &str, path: &Path) -> Result<(), WhitelistError> {
        for (line, entry) in entries(text) {
            if let Some(pattern) = slash_regex(entry) {
                self.names.push(pattern, path, line)?;
                continue;
            }
            let (addr, prefix) = match entry.split_once('/') {
                Some((addr, prefix)) => (addr, Some(prefix)),
                None => (entry, None),
            };
            let prefix_ok = |max: u8| {
                prefix.is_none_or(|p| {
                    !p.is_empty()
                        && p.len() <= 3
                        && p.bytes().all(|b| b.is_ascii_digit())
                        && p.parse::<u8>().is_ok_and(|n| n <= max)
                })
            };
            let network = if is_dotted(addr, 4) && prefix_ok(32) {
                addr.parse::<IpAddr>().ok().and_then(|ip| {
                    IpNet::new(ip, prefix.map_or(32, |p| p.parse().unwrap_or(32))).ok()
                })
            } else if prefix.is_none() && (is_dotted(entry, 3) || is_dotted(entry, 2)) {
                // "a.b.c" is a /24; "a.b" is also a /24 in postgrey (a known quirk kept so that
                // existing files mean the same: 10.1 covers 10.1.0.0/24 only).
                let mut octets: Vec<&str> = entry.split('.').collect();
                octets.resize(4, "0");
                octets
                    .join(".")
                    .parse::<IpAddr>()
                    .ok()
                    .and_then(|ip| IpNet::new(ip, 24).ok())
            } else if addr.matches(':').count() >= 2 && prefix_ok(128) {
                addr.parse::<IpAddr>().ok().and_then(|ip| {
                    IpNet::new(ip, prefix.map_or(128, |p| p.parse().unwrap_or(128))).ok()
                })
            } else if !entry.contains(char::is_whitespace) {
                self.suffixes.insert(entry.to_ascii_lowercase());
                continue;
            } else {
                warn!(file = %path.display(), line, "doesn't look like a hostname; ignored");
                continue;
            };
            match network {
                Some(net) => self.networks.push(net.trunc()),
                None => {
                    warn!(file = %path.display(), line, entry, "not a valid address; ignored")
                }
            }
        }
        self.names.build(path);
        Ok(())
    }

    /// Whether the client name matches a regex or a domain suffix (`(^|\.)name$`).
    pub fn matches_name(&self, client_name: &str) -> bool {
        if self.names.is_match(client_name) {
            return true;
        }
        if self.suffixes.is_empty() {
            return false;
        }
        let name = client_name.to_ascii_lowercase();
        let parents = name.match_indices('.').map(|(dot, _)| &name[dot + 1..]);
        std::iter::once(name.as_str())
            .chain(parents)
            .any(|domain| self.suffixes.contains(domain))
    }

    /// Whether the address is inside a listed network.
    pub fn matches_address(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.networks.iter().any(|net| net.contains(&ip))
    }

    /// Entries loaded (names, suffixes, networks).
    pub fn len(&self) -> usize {
        self.names.len() + self.suffixes.len() + self.networks.len()
    }

    /// No entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl RecipientWhitelist {
    /// Loads the files in order; missing files are skipped as postgrey does.
    pub fn load(paths: &[PathBuf]) -> Result<Self, WhitelistError> {
        let mut list = Self::default();
        for path in paths {
            if let Some(text) = read(path)? {
                list.add(&text, path)?;
            }
        }
        Ok(list)
    }

    /// Adds the entries of one file's text.
    pub fn add(&mut self, text: &str, path: &Path) -> Result<(), WhitelistError> {
        for (line, entry) in entries(text) {
            let pattern = if let Some(pattern) = slash_regex(entry) {
                pattern.to_owned()
            } else if entry.contains(char::is_whitespace) {
                warn!(file = %path.display(), line, "doesn't look like an address; ignored");
                continue;
            } else {
                match entry.split_once('@') {
                    Some((user, domain)) if !domain.is_empty() => format!(
                        r"^{}(?:\+[^@]+)?@{}$",
                        regex::escape(user),
                        regex::escape(domain)
                    ),
                    Some((user, _)) => format!(r"^{}(?:\+[^@]+)?@", regex::escape(user)),
                    None => format!(r"(?:@|\.){}$", regex::escape(entry)),
                }
            };
            self.patterns.push(&pattern, path, line)?;
        }
        self.patterns.build(path);
        Ok(())
    }

    /// Whether the recipient address matches.
    pub fn matches(&self, recipient: &str) -> bool {
        self.patterns.is_match(recipient)
    }

    /// Entries loaded.
    pub fn len(&self) -> usize {
        self.patterns.len()
    }

    /// No entries.
    pub fn is_empty(&self) -> bool {
        self.patterns.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clients(text: &str) -> ClientWhitelist {
        let mut list = ClientWhitelist::default();
        list.add(text, Path::new("test")).unwrap();
        list
    }

    fn recipients(text: &str) -> RecipientWhitelist {
        let mut list = RecipientWhitelist::default();
        list.add(text, Path::new("test")).unwrap();
        list
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn client_forms() {
        let list = clients(
            "# comment\n\n  example.org  # trailing comment\n/^mail\\d+\\.example\\.net$/\n\
             192.0.2.7\n198.51.100.0/25\n203.0.113\n10.20\n2001:db8::/32\n::1\nbad entry here\n",
        );
        assert!(list.matches_name("example.org"));
        assert!(list.matches_name("MX1.Example.ORG"));
        assert!(!list.matches_name("badexample.org"));
        assert!(!list.matches_name("example.org.evil"));
        assert!(list.matches_name("mail42.example.net"));
        assert!(list.matches_name("MAIL42.EXAMPLE.NET"));
        assert!(!list.matches_name("mail.example.net"));
        assert!(list.matches_address(ip("192.0.2.7")));
        assert!(!list.matches_address(ip("192.0.2.8")));
        assert!(list.matches_address(ip("198.51.100.127")));
        assert!(!list.matches_address(ip("198.51.100.128")));
        assert!(list.matches_address(ip("203.0.113.200")));
        // postgrey's quirk: "10.20" is 10.20.0.0/24, not /16.
        assert!(list.matches_address(ip("10.20.0.9")));
        assert!(!list.matches_address(ip("10.20.1.9")));
        assert!(list.matches_address(ip("2001:db8:ffff::1")));
        assert!(list.matches_address(ip("::1")));
        assert!(list.matches_address(ip("::ffff:192.0.2.7")));
        assert!(!list.matches_address(ip("2001:db9::1")));
        assert_eq!(list.len(), 8, "the line with spaces is ignored");
    }

    #[test]
    fn recipient_forms() {
        let list = recipients(
            "postmaster@\nabuse@example.org\nexample.net\n/^list-.*@lists\\.example$/\n",
        );
        assert!(list.matches("postmaster@anything.example"));
        assert!(list.matches("Postmaster+tag@x.example"));
        assert!(!list.matches("xpostmaster@x.example"));
        assert!(list.matches("abuse@example.org"));
        assert!(list.matches("abuse+x@example.org"));
        assert!(!list.matches("abuse@example.org.evil"));
        assert!(!list.matches("abuse@sub.example.org"));
        assert!(list.matches("anyone@example.net"));
        assert!(list.matches("anyone@sub.example.net"));
        assert!(!list.matches("anyone@badexample.net"));
        assert!(list.matches("list-users@lists.example"));
        assert!(!list.matches("users@lists.example"));
    }

    #[test]
    fn bad_regex_names_file_and_line() {
        let mut list = ClientWhitelist::default();
        let err = list
            .add("ok.example\n/(unclosed/\n", Path::new("/etc/wl"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/etc/wl:2: bad regular expression"),
            "{err}"
        );
    }

    #[test]
    fn regexes_too_large_as_one_set_are_asked_one_by_one() {
        // Each one compiles alone; together they pass the engine's size limit.
        let list = clients(
            "/^\\w{100}\\.a\\.example$/\n/^\\w{100}\\.b\\.example$/\n/^\\w{100}\\.c\\.example$/\n",
        );
        assert!(list.names.set.is_none(), "expected the one-by-one fallback");
        let name = |domain: &str| format!("{}.{domain}", "x".repeat(100));
        assert!(list.matches_name(&name("c.example")));
        assert!(list.matches_name(&name("A.EXAMPLE")));
        assert!(!list.matches_name(&name("d.example")));
        assert!(clients("/^mx\\d+\\.example$/\n").names.set.is_some());
    }

    #[test]
    fn missing_files_are_skipped() {
        let list = ClientWhitelist::load(&[PathBuf::from("/nonexistent/whitelist_clients.local")])
            .unwrap();
        assert!(list.is_empty());
    }
}
