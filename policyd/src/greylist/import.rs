//! Import of a postgrey database: `postgrey.db` (triplets, `first,last[,host]`) and
//! `postgrey_clients.db` (AWL, `count,last`), BerkeleyDB files read through `db_dump -p`
//! (Debian's db-util), whose printable output is parsed here.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::store::{Entry, Kind};

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// db_dump could not be run.
    #[error("cannot run {program}: {source} (install Debian's db-util)")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// db_dump failed.
    #[error("{program} {}: {stderr}", file.display())]
    Dump {
        /// The program.
        program: String,
        /// The database file.
        file: PathBuf,
        /// Its complaint.
        stderr: String,
    },
    /// The dump is not in db_dump's printable format.
    #[error("line {line} of the dump: {message}")]
    Format {
        /// Line number, from 1.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// Decodes one printable db_dump data line (leading space already removed): `\\` is a
/// backslash, `\xx` a hex byte.
fn unescape(text: &str, line: usize) -> Result<String, ImportError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes.get(i + 1) == Some(&b'\\') {
                out.push(b'\\');
                i += 2;
                continue;
            }
            let hex = text.get(i + 1..i + 3).ok_or_else(|| ImportError::Format {
                line,
                message: "truncated escape".into(),
            })?;
            out.push(
                u8::from_str_radix(hex, 16).map_err(|_| ImportError::Format {
                    line,
                    message: format!("bad escape \\{hex}"),
                })?,
            );
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The key/value pairs of a `db_dump -p` output (the first database in it).
pub fn parse_dump(text: &str) -> Result<Vec<(String, String)>, ImportError> {
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
    let mut header_done = false;
    for (_, line) in lines.by_ref() {
        if line == "HEADER=END" {
            header_done = true;
            break;
        }
    }
    if !header_done {
        return Err(ImportError::Format {
            line: 1,
            message: "no HEADER=END (not db_dump output)".into(),
        });
    }
    let mut pairs = Vec::new();
    loop {
        let Some((n, key)) = lines.next() else {
            return Err(ImportError::Format {
                line: 0,
                message: "no DATA=END".into(),
            });
        };
        if key == "DATA=END" {
            return Ok(pairs);
        }
        let key = key.strip_prefix(' ').ok_or_else(|| ImportError::Format {
            line: n,
            message: "data line without leading space (use db_dump -p)".into(),
        })?;
        let Some((m, value)) = lines.next() else {
            return Err(ImportError::Format {
                line: n,
                message: "key without value".into(),
            });
        };
        let value = value.strip_prefix(' ').ok_or_else(|| ImportError::Format {
            line: m,
            message: "data line without leading space".into(),
        })?;
        pairs.push((unescape(key, n)?, unescape(value, m)?));
    }
}

/// Turns postgrey's pairs into entries; values that are not `a,b[,...]` numbers are skipped
/// and counted.
pub fn entries(kind: Kind, pairs: &[(String, String)]) -> (Vec<Entry>, usize) {
    let mut skipped = 0;
    let mut out = Vec::with_capacity(pairs.len());
    for (key, value) in pairs {
        let mut fields = value.split(',');
        let parsed = (|| {
            let a = fields.next()?.trim().parse().ok()?;
            let b = fields.next()?.trim().parse().ok()?;
            Some((a, b))
        })();
        match parsed {
            Some((first_or_count, last)) => out.push(Entry {
                kind,
                key: key.clone(),
                first_or_count,
                last,
            }),
            None => skipped += 1,
        }
    }
    (out, skipped)
}

/// Runs `db_dump -p FILE` and parses its output. With the database's environment directory
/// as `home` (`-h`), pages postgrey still holds in its shared cache are read too.
pub fn dump_file(
    program: &str,
    home: Option<&Path>,
    file: &Path,
) -> Result<Vec<(String, String)>, ImportError> {
    let mut command = Command::new(program);
    if let Some(home) = home {
        command.arg("-h").arg(home);
    }
    let output = command
        .arg("-p")
        .arg(file)
        .output()
        .map_err(|source| ImportError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    if !output.status.success() {
        return Err(ImportError::Dump {
            program: program.to_owned(),
            file: file.to_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    parse_dump(&String::from_utf8_lossy(&output.stdout))
}

/// Reads a postgrey dbdir: triplets from `postgrey.db`, clients from `postgrey_clients.db`
/// (optional: postgrey without AWL has none). Returns the entries and how many were skipped.
/// Stop postgrey first (`systemctl stop postgrey`) so the files are complete.
pub fn read_postgrey_dir(program: &str, dir: &Path) -> Result<(Vec<Entry>, usize), ImportError> {
    // Join postgrey's BerkeleyDB environment when it has one (__db.* region files).
    let home = dir.join("__db.001").exists().then_some(dir);
    let triplets = dump_file(program, home, &dir.join("postgrey.db"))?;
    let (mut all, mut skipped) = entries(Kind::Triplet, &triplets);
    let clients_file = dir.join("postgrey_clients.db");
    if clients_file.exists() {
        let clients = dump_file(program, home, &clients_file)?;
        let (more, more_skipped) = entries(Kind::Client, &clients);
        all.extend(more);
        skipped += more_skipped;
    }
    Ok((all, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "VERSION=3\nformat=print\ntype=btree\ndb_pagesize=4096\nHEADER=END\n \
192.0.2.0/a@b.example/c@d.example\n 1700000000,1700000400\n \
198.51.100.0/x\\\\y@b/c@d\n 1700000000,1700000000,host\n \
bad\n not-numbers\n \
caf\\c3\\a9@x/y\n 1,2\nDATA=END\n";

    #[test]
    fn parses_printable_dump() {
        let pairs = parse_dump(DUMP).unwrap();
        assert_eq!(pairs.len(), 4);
        assert_eq!(pairs[1].0, "198.51.100.0/x\\y@b/c@d");
        assert_eq!(pairs[3].0, "café@x/y");
        let (entries, skipped) = entries(Kind::Triplet, &pairs);
        assert_eq!(skipped, 1);
        assert_eq!(
            entries[0],
            Entry {
                kind: Kind::Triplet,
                key: "192.0.2.0/a@b.example/c@d.example".into(),
                first_or_count: 1_700_000_000,
                last: 1_700_000_400
            }
        );
        assert_eq!(entries[1].last, 1_700_000_000);
    }

    #[test]
    fn rejects_non_dumps() {
        assert!(parse_dump("hello\n").is_err());
        assert!(parse_dump("HEADER=END\n k\n").is_err());
        assert!(parse_dump("HEADER=END\nk\nv\nDATA=END\n").is_err());
        assert!(parse_dump("HEADER=END\n k\\zz\n v\nDATA=END\n").is_err());
    }
}
