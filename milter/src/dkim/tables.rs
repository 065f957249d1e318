//! opendkim's KeyTable and SigningTable files, read as they are: parsing and lookup only, no key
//! material and no I/O beyond reading the table files.

use std::path::{Path, PathBuf};

/// A table file failed to load.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The file cannot be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("{}:{line}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A dataset type we do not read.
    #[error("{0}: unsupported dataset type (only file:, refile: and plain paths)")]
    Unsupported(String),
}

/// One KeyTable entry: `keyname  domain:selector:/path/to/key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// The key's name, as the SigningTable refers to it.
    pub name: String,
    /// The signing domain; `%` stands for the sender's domain.
    pub domain: String,
    /// The selector.
    pub selector: String,
    /// The private key file.
    pub key_file: PathBuf,
}

/// The KeyTable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyTable {
    /// Entries in file order.
    pub entries: Vec<KeyEntry>,
}

impl KeyTable {
    /// Parses a KeyTable's text; `path` is only for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, TableError> {
        let mut entries: Vec<KeyEntry> = Vec::new();
        for (line, key, value) in key_value_lines(text) {
            let syntax = |message: String| TableError::Syntax {
                path: path.to_path_buf(),
                line,
                message,
            };
            let mut parts = value.splitn(3, ':');
            let (Some(domain), Some(selector), Some(file)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(syntax(format!(
                    "key {key:?}: expected \"domain:selector:/path/to/key\", got {value:?}"
                )));
            };
            if domain.is_empty() || selector.is_empty() || file.is_empty() {
                return Err(syntax(format!(
                    "key {key:?}: empty domain, selector or key file in {value:?}"
                )));
            }
            if !file.starts_with('/') && !file.starts_with('.') {
                return Err(syntax(format!(
                    "key {key:?}: {file:?} is not a file path (inline keys are not supported)"
                )));
            }
            if entries.iter().any(|e| e.name == key) {
                return Err(syntax(format!("key {key:?} defined twice")));
            }
            entries.push(KeyEntry {
                name: key.to_owned(),
                domain: domain.to_ascii_lowercase(),
                selector: selector.to_owned(),
                key_file: PathBuf::from(file),
            });
        }
        Ok(Self { entries })
    }

    /// Loads `file:/path`, `refile:/path` (treated alike) or a plain path.
    pub fn load(spec: &str) -> Result<Self, TableError> {
        let (_, path) = dataset_path(spec)?;
        Self::parse(&read(&path)?, &path)
    }

    /// The entry named `name`.
    pub fn get(&self, name: &str) -> Option<&KeyEntry> {
        self.entries.iter().find(|e| e.name == name)
    }
}

/// How the SigningTable's keys are matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// `file:`: exact lookups in opendkim's order.
    Exact,
    /// `refile:`: `*` wildcard patterns, first match in file order.
    Wildcard,
}

/// The SigningTable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningTable {
    /// How keys match.
    pub kind: TableKind,
    /// (key or pattern lower-cased, KeyTable name) in file order.
    pub entries: Vec<(String, String)>,
}

impl SigningTable {
    /// Parses a SigningTable's text.
    pub fn parse(text: &str, kind: TableKind) -> Self {
        let entries = key_value_lines(text)
            .map(|(_, key, value)| {
                // The value may carry a signer identity after a colon (`keyname:@sub.example`);
                // only the key name matters for choosing keys.
                let name = value.split(':').next().unwrap_or(value).trim();
                (key.to_ascii_lowercase(), name.to_owned())
            })
            .collect();
        Self { kind, entries }
    }

    /// Loads `refile:/path` (wildcards), `file:/path` or a plain path (exact keys).
    pub fn load(spec: &str) -> Result<Self, TableError> {
        let (kind, path) = dataset_path(spec)?;
        Ok(Self::parse(&read(&path)?, kind))
    }

    /// The KeyTable names for the sender `local@domain`: every match (in opendkim's order) when
    /// `multiple` is set, else the first.
    pub fn lookup(&self, local: &str, domain: &str, multiple: bool) -> Vec<String> {
        let local = local.to_ascii_lowercase();
        let domain = domain.to_ascii_lowercase();
        let mut found: Vec<String> = Vec::new();
        let mut add = |name: &str| {
            if !found.iter().any(|n| n == name) {
                found.push(name.to_owned());
            }
        };
        match self.kind {
            TableKind::Wildcard => {
                let address = format!("{local}@{domain}");
                for (pattern, name) in &self.entries {
                    if wildcard_match(pattern, &address) {
                        add(name);
                        if !multiple {
                            break;
                        }
                    }
                }
            }
            TableKind::Exact => {
                // opendkim's order: user@host, host, then for each parent domain user@.parent
                // and .parent, then user@* and *.
                let mut keys = vec![format!("{local}@{domain}"), domain.clone()];
                let mut rest = domain.as_str();
                while let Some(dot) = rest.find('.') {
                    let parent = &rest[dot..];
                    keys.push(format!("{local}@{parent}"));
                    keys.push(parent.to_owned());
                    rest = &rest[dot + 1..];
                }
                keys.push(format!("{local}@*"));
                keys.push("*".to_owned());
                'keys: for key in &keys {
                    for (entry, name) in &self.entries {
                        if entry == key {
                            add(name);
                            if !multiple {
                                break 'keys;
                            }
                        }
                    }
                }
            }
        }
        found
    }
}

/// Case-insensitive glob with `*` only (opendkim's refile:).
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    let pattern = pattern.as_bytes();
    let text = text.as_bytes();
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p].eq_ignore_ascii_case(&text[t]) {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

fn dataset_path(spec: &str) -> Result<(TableKind, PathBuf), TableError> {
    if let Some(path) = spec.strip_prefix("refile:") {
        Ok((TableKind::Wildcard, PathBuf::from(path)))
    } else if let Some(path) = spec.strip_prefix("file:") {
        Ok((TableKind::Exact, PathBuf::from(path)))
    } else if spec.starts_with('/') || spec.starts_with('.') {
        Ok((TableKind::Exact, PathBuf::from(spec)))
    } else {
        Err(TableError::Unsupported(spec.to_owned()))
    }
}

fn read(path: &Path) -> Result<String, TableError> {
    std::fs::read_to_string(path).map_err(|source| TableError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// (line number, key, value) of each non-empty, non-comment line; the key is the first
/// whitespace-separated word, the value the rest.
fn key_value_lines(text: &str) -> impl Iterator<Item = (usize, &str, &str)> {
    text.lines().enumerate().filter_map(|(index, raw)| {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            return None;
        }
        let (key, value) = line
            .split_once([' ', '\t'])
            .map_or((line, ""), |(k, v)| (k, v.trim()));
        Some((index + 1, key, value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_table_parses_opendkim_lines() {
        let table = KeyTable::parse(
            "# comment\nrsa  example.com:rsa2026:/etc/dkim/rsa.private\n\ned\t%:ed:/etc/dkim/ed.key # trailing\n",
            Path::new("KeyTable"),
        )
        .unwrap();
        assert_eq!(table.entries.len(), 2);
        assert_eq!(table.get("ed").unwrap().domain, "%");
        assert_eq!(
            table.get("rsa").unwrap().key_file,
            PathBuf::from("/etc/dkim/rsa.private")
        );
        let err = KeyTable::parse("bad example.com:sel\n", Path::new("KT")).unwrap_err();
        assert!(err.to_string().starts_with("KT:1:"), "{err}");
        assert!(KeyTable::parse("x a:b:/k\nx a:b:/k\n", Path::new("KT")).is_err());
        assert!(KeyTable::parse("x a:b:MIIEv...\n", Path::new("KT")).is_err());
    }

    #[test]
    fn refile_first_match_or_all() {
        let table = SigningTable::parse(
            "*@example.com rsa\n*@example.com ed\n*@*.example.com sub\n*  catchall\n",
            TableKind::Wildcard,
        );
        assert_eq!(table.lookup("Alice", "EXAMPLE.com", false), ["rsa"]);
        assert_eq!(
            table.lookup("alice", "example.com", true),
            ["rsa", "ed", "catchall"]
        );
        assert_eq!(table.lookup("bob", "mail.example.com", false), ["sub"]);
        assert_eq!(table.lookup("bob", "other.org", false), ["catchall"]);
    }

    #[test]
    fn file_lookup_order_is_opendkims() {
        let table = SigningTable::parse(
            "* any\nbob@* bobany\n.example.com parent\nbob@.example.com bobparent\nmail.example.com host\nbob@mail.example.com exact\n",
            TableKind::Exact,
        );
        assert_eq!(
            table.lookup("bob", "mail.example.com", true),
            ["exact", "host", "bobparent", "parent", "bobany", "any"]
        );
        assert_eq!(table.lookup("eve", "mail.example.com", false), ["host"]);
        assert_eq!(table.lookup("eve", "x.example.com", false), ["parent"]);
        assert_eq!(table.lookup("eve", "example.com", false), ["any"]);
        let with_signer = SigningTable::parse("example.com key1:@example.com\n", TableKind::Exact);
        assert_eq!(with_signer.lookup("a", "example.com", false), ["key1"]);
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("*@example.com", "a@example.com"));
        assert!(!wildcard_match("*@example.com", "a@example.com.evil"));
        assert!(wildcard_match("a*b*c", "aXXbYYc"));
        assert!(!wildcard_match("a*b*c", "aXXbYY"));
        assert!(wildcard_match("*@*.Example.COM", "x@mail.example.com"));
    }

    #[test]
    fn dataset_prefixes() {
        assert!(matches!(
            SigningTable::load("db:/x.db"),
            Err(TableError::Unsupported(_))
        ));
        assert!(matches!(
            SigningTable::load("refile:/nonexistent/st"),
            Err(TableError::Read { .. })
        ));
    }
}
