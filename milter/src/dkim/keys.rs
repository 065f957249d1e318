//! DKIM private keys: loading (PEM PKCS#1 / PKCS#8, RSA and Ed25519), the safe-permissions rule,
//! the public half as published in DNS, key generation in opendkim-genkey's layout, and the
//! published-key check behind `dns-check`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use mail_auth::crypto::{Algorithm, DkimKey, Ed25519Key, RsaKey, Sha256, SigningKey};
use mail_auth::headers::Writable;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// A key failed to load.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Unsafe permissions or unreadable.
    #[error(transparent)]
    Secret(#[from] postern_common::secret::SecretFileError),
    /// Not a usable PEM key.
    #[error("{}: not an RSA or Ed25519 private key in PEM form ({reason})", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Smaller than `minimum_key_bits`.
    #[error("{}: {bits}-bit RSA key is below minimum_key_bits ({minimum})", path.display())]
    TooSmall {
        /// The file.
        path: PathBuf,
        /// Its size.
        bits: usize,
        /// The configured minimum.
        minimum: usize,
    },
}

/// A loaded private key, shared between the signers built per message.
#[derive(Clone)]
pub struct SharedKey(Arc<DkimKey>);

impl std::fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.algorithm() {
            Algorithm::Ed25519Sha256 => "SharedKey(ed25519)",
            _ => "SharedKey(rsa)",
        })
    }
}

impl SigningKey for SharedKey {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        self.0.sign(input)
    }

    fn algorithm(&self) -> Algorithm {
        self.0.algorithm()
    }
}

/// A private key with what DNS should publish for it.
#[derive(Debug, Clone)]
pub struct LoadedKey {
    /// The key.
    pub key: SharedKey,
    /// `k=` of the DNS record: "rsa" or "ed25519".
    pub kind: &'static str,
    /// Key size in bits (256 for Ed25519).
    pub bits: usize,
    /// The public key as DER PKCS#1 (RSA) or 32 raw bytes (Ed25519).
    pub public: Vec<u8>,
}

/// Loads a PEM private key. With `require_safe` the file must not be accessible by group or
/// others (opendkim's RequireSafeKeys).
pub fn load_key(
    path: &Path,
    require_safe: bool,
    minimum_bits: usize,
) -> Result<LoadedKey, KeyError> {
    let bytes = if require_safe {
        postern_common::secret::read_private_file(path)?
    } else {
        std::fs::read(path).map_err(|source| {
            KeyError::Secret(postern_common::secret::SecretFileError::Unreadable {
                path: path.to_path_buf(),
                source,
            })
        })?
    };
    let invalid = |reason: String| KeyError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let der = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    // Ed25519 first: only a PKCS#8 key can be one (openssl writes PKCS#8 v1 without the public
    // key, hence "maybe unchecked").
    if let PrivateKeyDer::Pkcs8(pkcs8) = &der
        && let Ok(ed) = Ed25519Key::from_pkcs8_maybe_unchecked_der(pkcs8.secret_pkcs8_der())
    {
        let public = ed.public_key();
        return Ok(LoadedKey {
            key: SharedKey(Arc::new(DkimKey::Ed25519(ed))),
            kind: "ed25519",
            bits: 256,
            public,
        });
    }
    let rsa = RsaKey::<Sha256>::from_key_der(der).map_err(|e| invalid(e.to_string()))?;
    let public = rsa.public_key();
    let bits = rsa_public_key_bits(&public).unwrap_or(0);
    if bits < minimum_bits {
        return Err(KeyError::TooSmall {
            path: path.to_path_buf(),
            bits,
            minimum: minimum_bits,
        });
    }
    Ok(LoadedKey {
        key: SharedKey(Arc::new(DkimKey::Rsa(rsa))),
        kind: "rsa",
        bits,
        public,
    })
}

/// One DER element: (tag, content, rest).
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let mut len = 0usize;
        for &b in &rest[..count] {
            len = (len << 8) | usize::from(b);
        }
        rest = &rest[count..];
        len
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The RSA modulus of a DER public key (PKCS#1 RSAPublicKey or SubjectPublicKeyInfo).
fn rsa_modulus(der: &[u8]) -> Option<&[u8]> {
    let (tag, body, _) = der_element(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, first, rest) = der_element(body)?;
    match tag {
        // PKCS#1: SEQUENCE { INTEGER n, INTEGER e }
        0x02 => Some(first),
        // SPKI: SEQUENCE { SEQUENCE alg, BIT STRING { 0x00, RSAPublicKey } }
        0x30 => {
            let (tag, bits, _) = der_element(rest)?;
            if tag != 0x03 || bits.first() != Some(&0) {
                return None;
            }
            rsa_modulus(&bits[1..])
        }
        _ => None,
    }
}

/// Size in bits of an RSA public key in DER (PKCS#1 or SPKI).
pub fn rsa_public_key_bits(der: &[u8]) -> Option<usize> {
    let modulus = rsa_modulus(der)?;
    let start = modulus.iter().position(|&b| b != 0)?;
    let top = modulus[start];
    Some((modulus.len() - start - 1) * 8 + (8 - top.leading_zeros() as usize))
}

/// The key size of a published DKIM record's `p=` (`k=` default rsa), for the
/// Authentication-Results comment.
pub fn published_key_bits(record: &str) -> Option<usize> {
    let tags = parse_tags(record);
    let kind = tags
        .iter()
        .find(|(k, _)| k == "k")
        .map_or("rsa", |(_, v)| v.as_str());
    let p = tags.iter().find(|(k, _)| k == "p")?.1.clone();
    if kind.eq_ignore_ascii_case("ed25519") {
        return Some(256);
    }
    let der = BASE64.decode(p.as_bytes()).ok()?;
    rsa_public_key_bits(&der)
}

/// `tag=value` pairs of a DKIM key record, whitespace removed from values.
pub fn parse_tags(record: &str) -> Vec<(String, String)> {
    record
        .split(';')
        .filter_map(|part| {
            let (k, v) = part.split_once('=')?;
            let value: String = v.chars().filter(|c| !c.is_whitespace()).collect();
            Some((k.trim().to_ascii_lowercase(), value))
        })
        .collect()
}

/// Does the published record carry this key's public half?
pub fn published_matches(record: &str, key: &LoadedKey) -> Result<(), String> {
    let tags = parse_tags(record);
    let kind = tags
        .iter()
        .find(|(k, _)| k == "k")
        .map_or("rsa", |(_, v)| v.as_str());
    if !kind.eq_ignore_ascii_case(key.kind) {
        return Err(format!("published k={kind}, private key is {}", key.kind));
    }
    let Some((_, p)) = tags.iter().find(|(k, _)| k == "p") else {
        return Err("no p= tag".to_owned());
    };
    if p.is_empty() {
        return Err("key revoked (empty p=)".to_owned());
    }
    let published = BASE64
        .decode(p.as_bytes())
        .map_err(|_| "p= is not valid base64".to_owned())?;
    let same = if key.kind == "rsa" {
        // Published as SPKI (opendkim-genkey, openssl -pubout) or bare PKCS#1: compare moduli.
        rsa_modulus(&published).is_some() && rsa_modulus(&published) == rsa_modulus(&key.public)
    } else {
        published == key.public
    };
    if same {
        Ok(())
    } else {
        Err("published public key does not match the private key".to_owned())
    }
}

/// Key algorithms `keygen` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeygenAlgorithm {
    /// RSA, 2048 bits.
    #[value(name = "rsa-2048")]
    Rsa2048,
    /// RSA, 4096 bits.
    #[value(name = "rsa-4096")]
    Rsa4096,
    /// Ed25519 (RFC 8463).
    #[value(name = "ed25519")]
    Ed25519,
}

/// A generated key: PEM private key and the DNS record in opendkim-genkey's `.txt` layout.
#[derive(Debug)]
pub struct GeneratedKey {
    /// PKCS#8 PEM.
    pub private_pem: String,
    /// `<selector>._domainkey.<domain>.\tIN\tTXT\t( ... )  ; ----- DKIM key ...`
    pub txt: String,
    /// The record's value (`v=DKIM1; k=...; p=...`).
    pub record: String,
}

/// Generates a key.
pub fn generate(
    algorithm: KeygenAlgorithm,
    domain: &str,
    selector: &str,
) -> Result<GeneratedKey, String> {
    use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
    use aws_lc_rs::signature::KeyPair;
    let (kind, pkcs8, public) = match algorithm {
        KeygenAlgorithm::Rsa2048 | KeygenAlgorithm::Rsa4096 => {
            let size = if algorithm == KeygenAlgorithm::Rsa2048 {
                aws_lc_rs::rsa::KeySize::Rsa2048
            } else {
                aws_lc_rs::rsa::KeySize::Rsa4096
            };
            let pair = aws_lc_rs::rsa::KeyPair::generate(size).map_err(|e| e.to_string())?;
            let private: Pkcs8V1Der<'static> = pair.as_der().map_err(|e| e.to_string())?;
            // opendkim-genkey publishes SubjectPublicKeyInfo (openssl rsa -pubout).
            let spki: PublicKeyX509Der<'static> =
                pair.public_key().as_der().map_err(|e| e.to_string())?;
            ("rsa", private.as_ref().to_vec(), spki.as_ref().to_vec())
        }
        KeygenAlgorithm::Ed25519 => {
            let pair =
                aws_lc_rs::signature::Ed25519KeyPair::generate().map_err(|e| e.to_string())?;
            // PKCS#8 v1, as `openssl genpkey -algorithm ed25519` writes (OpenSSL 3 cannot read v2).
            let private: Pkcs8V1Der<'static> = pair.as_der().map_err(|e| e.to_string())?;
            (
                "ed25519",
                private.as_ref().to_vec(),
                pair.public_key().as_ref().to_vec(),
            )
        }
    };
    let b64 = BASE64.encode(&pkcs8);
    let mut private_pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        private_pem.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        private_pem.push('\n');
    }
    private_pem.push_str("-----END PRIVATE KEY-----\n");
    // Sanity: the key we write must load back.
    let _ =
        PrivatePkcs8KeyDer::from_pem_slice(private_pem.as_bytes()).map_err(|e| e.to_string())?;
    let p = BASE64.encode(&public);
    let record = format!("v=DKIM1; k={kind}; p={p}");
    Ok(GeneratedKey {
        private_pem,
        txt: genkey_txt(domain, selector, kind, &p),
        record,
    })
}

/// opendkim-genkey's `.txt` layout: `p=` split into 250-character quoted strings.
pub fn genkey_txt(domain: &str, selector: &str, kind: &str, p: &str) -> String {
    let mut out =
        format!("{selector}._domainkey.{domain}.\tIN\tTXT\t( \"v=DKIM1; k={kind}; \"\n\t  \"p=");
    let mut first = true;
    for chunk in p.as_bytes().chunks(250) {
        if !first {
            out.push_str("\"\n\t  \"");
        }
        first = false;
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
    }
    out.push_str(&format!("\" )  ; ----- DKIM key {selector} for {domain}\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn generated_keys_load_and_match_their_records() {
        let dir = tempfile::tempdir().unwrap();
        for (algorithm, kind, bits) in [
            (KeygenAlgorithm::Rsa2048, "rsa", 2048),
            (KeygenAlgorithm::Ed25519, "ed25519", 256),
        ] {
            let generated = generate(algorithm, "example.com", "sel").unwrap();
            let path = write(dir.path(), kind, &generated.private_pem, 0o600);
            let key = load_key(&path, true, 1024).unwrap();
            assert_eq!((key.kind, key.bits), (kind, bits));
            published_matches(&generated.record, &key).unwrap();
            assert_eq!(published_key_bits(&generated.record), Some(bits));
            assert!(
                generated
                    .txt
                    .starts_with("sel._domainkey.example.com.\tIN\tTXT\t( \"v=DKIM1; k=")
            );
            assert!(
                generated
                    .txt
                    .ends_with("\" )  ; ----- DKIM key sel for example.com\n")
            );
        }
        let other = generate(KeygenAlgorithm::Ed25519, "example.com", "sel").unwrap();
        let path = dir.path().join("ed25519");
        let key = load_key(&path, true, 1024).unwrap();
        assert!(published_matches(&other.record, &key).is_err());
        assert!(published_matches("v=DKIM1; k=rsa; p=", &key).is_err());
        assert!(published_matches("v=DKIM1; k=ed25519; p=", &key).is_err());
    }

    #[test]
    fn unsafe_and_invalid_keys_are_refused_with_the_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let generated = generate(KeygenAlgorithm::Ed25519, "example.com", "s").unwrap();
        let open = write(dir.path(), "open.key", &generated.private_pem, 0o644);
        let err = load_key(&open, true, 1024).unwrap_err().to_string();
        assert!(err.contains("open.key"), "{err}");
        load_key(&open, false, 1024).unwrap();
        let junk = write(dir.path(), "junk.key", "not a key\n", 0o600);
        let err = load_key(&junk, true, 1024).unwrap_err().to_string();
        assert!(err.contains("junk.key"), "{err}");
        let rsa = generate(KeygenAlgorithm::Rsa2048, "example.com", "s").unwrap();
        let rsa = write(dir.path(), "rsa.key", &rsa.private_pem, 0o600);
        assert!(matches!(
            load_key(&rsa, true, 4096),
            Err(KeyError::TooSmall { bits: 2048, .. })
        ));
    }

    #[test]
    fn long_rsa_records_split_like_opendkim_genkey() {
        let generated = generate(KeygenAlgorithm::Rsa2048, "example.com", "s").unwrap();
        let lines: Vec<&str> = generated.txt.lines().collect();
        assert!(lines.len() >= 3, "{}", generated.txt);
        assert!(lines[1].starts_with("\t  \"p="));
        assert_eq!(lines[1].len(), "\t  \"p=".len() + 250 + 1);
    }
}
