//! What to rewrite: postsrsd's rules around the SRS algorithm (local domains are left alone,
//! null senders too, bad SRS addresses are passed through and logged). Pure apart from the
//! domains file, which is re-read when it changes.

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

use crate::srs::{ReverseError, Srs};

/// Local domains: an entry matches itself; an entry with a leading dot matches its subdomains
/// only (postsrsd's rule, as `SRS_EXCLUDE_DOMAINS`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainSet {
    exact: Vec<String>,
    suffixes: Vec<String>,
}

impl DomainSet {
    /// Builds the set from entries (case-insensitive; blank entries ignored).
    pub fn new<S: AsRef<str>>(entries: impl IntoIterator<Item = S>) -> Self {
        let mut set = Self::default();
        for entry in entries {
            let entry = entry.as_ref().trim().to_ascii_lowercase();
            if entry.is_empty() {
                continue;
            }
            if entry.starts_with('.') {
                set.suffixes.push(entry);
            } else {
                set.exact.push(entry);
            }
        }
        set
    }

    /// Reads a domains file: one domain per line, `#` comments, blank lines ignored.
    pub fn parse_file_text(text: &str) -> Vec<String> {
        text.lines()
            .map(|line| line.split('#').next().unwrap_or("").trim().to_owned())
            .filter(|line| !line.is_empty())
            .collect()
    }

    /// Whether `domain` is local.
    pub fn contains(&self, domain: &str) -> bool {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        self.exact.contains(&domain) || self.suffixes.iter().any(|s| domain.ends_with(s.as_str()))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.exact.len() + self.suffixes.len()
    }

    /// No entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a lookup leaves an address alone. Each protocol answers with the text of the postsrsd
/// generation that spoke it, so replies stay byte-identical: tcp_table with 1.x's, socketmap
/// with 2.x's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// No `@`, or nothing on one side of it.
    NoDomain,
    /// A local domain (the list, the file, the SRS domain).
    LocalDomain,
    /// Already an SRS address at the SRS domain.
    AlreadyRewritten,
    /// A reverse lookup of an address that is not SRS.
    NotSrs,
    /// Database mode: the key is not (or no longer) in the envelope database.
    UnknownAlias,
}

impl Skip {
    /// postsrsd 2.x's reason (socketmap `NOTFOUND` text).
    pub fn text(self) -> &'static str {
        match self {
            Self::NoDomain => "No domain.",
            Self::LocalDomain | Self::AlreadyRewritten => "Need not rewrite local domain.",
            Self::NotSrs => "Not an SRS address.",
            Self::UnknownAlias => "Unknown alias.",
        }
    }

    /// postsrsd 1.x's reason (tcp_table `500` text; "py policy" is its spelling).
    pub fn text_v1(self) -> &'static str {
        match self {
            Self::NoDomain => "No at sign in sender address",
            Self::LocalDomain => "Domain excluded py policy",
            Self::AlreadyRewritten => "Already rewritten",
            Self::NotSrs => "Not an SRS address.",
            Self::UnknownAlias => "Unknown alias.",
        }
    }
}

/// Whether a reversed address is a database key (`<32 base32hex>@1`) rather than a sender.
pub fn is_database_alias(address: &str) -> bool {
    address.len() == 34 && address.ends_with("@1")
}

/// The answer to one lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Rewritten to this address.
    Rewritten(String),
    /// Left alone, with the reason (for the log and the protocol's not-found text).
    Unchanged(Skip),
    /// An SRS address that does not verify (or a malformed SRS1 sender): left alone, and worth
    /// a log line.
    Refused(ReverseError),
    /// The lookup cannot be answered with this configuration (postsrsd's error replies, such as
    /// "No database for alias."): a protocol error, not a not-found.
    Failed(&'static str),
    /// The envelope database failed: a temporary error, so Postfix tries again later.
    Unavailable(String),
}

/// Forward and reverse rewriting with postsrsd's rules.
#[derive(Debug)]
pub struct Rewriter {
    /// The algorithm and its secrets.
    pub srs: Srs,
    /// The domain SRS addresses are written in.
    pub srs_domain: String,
    /// Rewrite senders in local domains too.
    pub always_rewrite: bool,
    config_domains: Vec<String>,
    domains_file: Option<PathBuf>,
    domains: RwLock<(DomainSet, Option<SystemTime>)>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Rewriter {
    /// A rewriter; reads `domains_file` once now (an unreadable file is an error).
    pub fn new(
        srs: Srs,
        srs_domain: String,
        always_rewrite: bool,
        domains: Vec<String>,
        domains_file: Option<PathBuf>,
    ) -> std::io::Result<Self> {
        let rewriter = Self {
            srs,
            srs_domain: srs_domain.to_ascii_lowercase(),
            always_rewrite,
            config_domains: domains,
            domains_file,
            domains: RwLock::new((DomainSet::default(), None)),
        };
        rewriter.load_domains()?;
        Ok(rewriter)
    }

    fn load_domains(&self) -> std::io::Result<usize> {
        let mut entries = self.config_domains.clone();
        let mut stamp = None;
        if let Some(path) = &self.domains_file {
            stamp = modified(path);
            let text = std::fs::read_to_string(path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            entries.extend(DomainSet::parse_file_text(&text));
        }
        let set = DomainSet::new(entries);
        let count = set.len();
        if let Ok(mut guard) = self.domains.write() {
            *guard = (set, stamp);
        }
        Ok(count)
    }

    /// Re-reads the domains file if it changed since the last read. Returns the new number of
    /// domains when it did; on a read error the old set stays.
    pub fn refresh_domains(&self) -> Option<std::io::Result<usize>> {
        let path = self.domains_file.as_ref()?;
        let now = modified(path);
        let seen = self.domains.read().ok().and_then(|g| g.1);
        (now != seen).then(|| self.load_domains())
    }

    fn is_local(&self, domain: &str) -> bool {
        domain.eq_ignore_ascii_case(&self.srs_domain)
            || self
                .domains
                .read()
                .map(|g| g.0.contains(domain))
                .unwrap_or(false)
    }

    /// Whether a sender is to be rewritten: its local part and domain, or why not.
    pub fn forward_target<'a>(&self, address: &'a str) -> Result<(&'a str, &'a str), Skip> {
        let Some((local, domain)) = address.rsplit_once('@') else {
            return Err(Skip::NoDomain);
        };
        if local.is_empty() || domain.is_empty() {
            return Err(Skip::NoDomain);
        }
        if domain.eq_ignore_ascii_case(&self.srs_domain) && crate::srs::split_srs(local).is_some() {
            return Err(Skip::AlreadyRewritten);
        }
        if !self.always_rewrite && self.is_local(domain) {
            return Err(Skip::LocalDomain);
        }
        Ok((local, domain))
    }

    /// The envelope sender of forwarded mail, rewritten.
    pub fn forward(&self, address: &str, unix: u64) -> Outcome {
        match self.forward_target(address) {
            Ok((local, domain)) => {
                match self.srs.try_forward(local, domain, &self.srs_domain, unix) {
                    Ok(address) => Outcome::Rewritten(address),
                    Err(err) => Outcome::Refused(err),
                }
            }
            Err(reason) => Outcome::Unchanged(reason),
        }
    }

    /// A bounce recipient, restored to the original sender. An address carrying a database key
    /// is an error here: only [`Rewriter::reverse_keeping_aliases`] with the database can
    /// resolve it.
    pub fn reverse(&self, address: &str, unix: u64) -> Outcome {
        match self.reverse_keeping_aliases(address, unix) {
            Outcome::Rewritten(original) if is_database_alias(&original) => {
                Outcome::Failed("No database for alias.")
            }
            other => other,
        }
    }

    /// [`Rewriter::reverse`], but a database key (`<key>@1`) comes back as it is, for the
    /// envelope database to resolve. The domain is not looked at (as in libsrs2).
    pub fn reverse_keeping_aliases(&self, address: &str, unix: u64) -> Outcome {
        let local = address.rsplit_once('@').map_or(address, |(local, _)| local);
        match self.srs.reverse(local, unix) {
            Ok(original) => Outcome::Rewritten(original),
            Err(ReverseError::NotSrs) => Outcome::Unchanged(Skip::NotSrs),
            Err(err) => Outcome::Refused(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::srs::{HashAlphabet, Secret};

    const T: u64 = 1_577_836_860;

    fn rewriter(domains: &[&str], file: Option<PathBuf>) -> Rewriter {
        let srs = Srs {
            secrets: vec![Secret::new(b"tops3cr3t")],
            separator: '=',
            hash_length: 4,
            hash_minimum: 4,
            alphabet: HashAlphabet::Base64url,
        };
        Rewriter::new(
            srs,
            "example.com".into(),
            false,
            domains.iter().map(|d| d.to_string()).collect(),
            file,
        )
        .unwrap()
    }

    #[test]
    fn leading_dot_matches_subdomains_only() {
        let set = DomainSet::new([".sub.example", "Exact.Example"]);
        assert!(set.contains("a.sub.example"));
        assert!(!set.contains("sub.example"));
        assert!(set.contains("exact.example"));
        assert!(set.contains("EXACT.example."));
        assert!(!set.contains("other.example"));
        assert_eq!(
            DomainSet::parse_file_text("# c\n a.example \n\nb.example # x\n"),
            vec!["a.example", "b.example"]
        );
    }

    #[test]
    fn forward_rules() {
        let r = rewriter(&["local.example"], None);
        assert_eq!(
            r.forward("test@otherdomain.com", T),
            Outcome::Rewritten("SRS0=vmyz=2W=otherdomain.com=test@example.com".into())
        );
        assert_eq!(
            r.forward("alice@local.example", T),
            Outcome::Unchanged(Skip::LocalDomain)
        );
        assert_eq!(
            r.forward("alice@EXAMPLE.com", T),
            Outcome::Unchanged(Skip::LocalDomain)
        );
        assert_eq!(
            r.forward("SRS0=vmyz=2W=otherdomain.com=test@example.com", T),
            Outcome::Unchanged(Skip::AlreadyRewritten)
        );
        assert_eq!(r.forward("", T), Outcome::Unchanged(Skip::NoDomain));
        assert_eq!(
            r.forward("postmaster", T),
            Outcome::Unchanged(Skip::NoDomain)
        );
        assert_eq!(r.forward("@x", T), Outcome::Unchanged(Skip::NoDomain));
        assert!(
            matches!(r.forward("SRS0=abcd=2W=a.example=b@fwd.example", T), Outcome::Rewritten(a) if a.starts_with("SRS1="))
        );
    }

    #[test]
    fn reverse_rules() {
        let r = rewriter(&[], None);
        assert_eq!(
            r.reverse("SRS0=vmyz=2W=otherdomain.com=test@example.com", T),
            Outcome::Rewritten("test@otherdomain.com".into())
        );
        assert_eq!(
            r.reverse("bob@example.com", T),
            Outcome::Unchanged(Skip::NotSrs)
        );
        assert_eq!(
            r.reverse("SRS0=xxxx=2W=otherdomain.com=test@example.com", T),
            Outcome::Refused(ReverseError::BadHash)
        );
        // A database-mode address met by a daemon without the database: an error, never the
        // key as if it were a sender.
        let key = "DCJGDE6N24LCRT41A4T0G1UIF0DTKKQJ";
        let srs = r.srs.forward(key, "1", "example.com", T);
        assert!(
            srs.starts_with("SRS0=") && srs.contains("=2W=1=DCJG"),
            "{srs}"
        );
        assert_eq!(
            r.reverse(&srs, T),
            Outcome::Failed("No database for alias.")
        );
        // A malformed SRS1 sender is not wrapped (libsrs2 refuses it too).
        assert_eq!(
            r.forward("SRS1=abcd@other.example", T),
            Outcome::Refused(ReverseError::Malformed("No host in SRS1 address."))
        );
    }

    #[test]
    fn domains_file_is_reread_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("domains");
        std::fs::write(&path, "one.example\n").unwrap();
        let r = rewriter(&[], Some(path.clone()));
        assert!(matches!(
            r.forward("a@one.example", T),
            Outcome::Unchanged(_)
        ));
        assert!(r.refresh_domains().is_none());
        std::fs::write(&path, "two.example\n").unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(r.refresh_domains().unwrap().unwrap(), 1);
        assert!(matches!(
            r.forward("a@one.example", T),
            Outcome::Rewritten(_)
        ));
        assert!(matches!(
            r.forward("a@two.example", T),
            Outcome::Unchanged(_)
        ));
    }
}
