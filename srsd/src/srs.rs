//! The Sender Rewriting Scheme exactly as postsrsd (libsrs2) writes it, so that addresses in
//! flight keep bouncing back after a switch: same hash, same timestamp, same SRS1 wrapping.
//! Pure: the time comes in as an argument, the secrets as bytes.

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};

/// libsrs2's compiled-in maximum age of a timestamp, in days.
pub const MAX_AGE_DAYS: u64 = 21;
/// Timestamps count days modulo this.
const TIMESTAMP_DAYS: u64 = 1024;
const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// The base64 alphabet of the hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HashAlphabet {
    /// `A-Za-z0-9-_`, postsrsd 2.2.6 and later (a `/` upset several receivers).
    #[default]
    Base64url,
    /// `A-Za-z0-9+/`, postsrsd 1.x and 2.x up to 2.2.5.
    Base64,
}

/// One secret, held as the HMAC keyed with it. Keying hashes the padded key into the inner and
/// outer states, two SHA-1 blocks of the four a lookup costs: done once here, each hash starts
/// from a copy. Its `Debug` shows no key material.
#[derive(Clone)]
pub struct Secret {
    keyed: Hmac<sha1::Sha1>,
}

impl Secret {
    /// A secret from its bytes (a line of the secrets file).
    pub fn new(bytes: impl AsRef<[u8]>) -> Self {
        let keyed = Hmac::<sha1::Sha1>::new_from_slice(bytes.as_ref())
            .expect("HMAC takes a key of any length (a long one is hashed first)");
        Self { keyed }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The signing and verifying settings.
#[derive(Debug, Clone)]
pub struct Srs {
    /// Secrets: the first signs, every one verifies.
    pub secrets: Vec<Secret>,
    /// The character after `SRS0`/`SRS1` in addresses we write: `=`, `+` or `-`.
    pub separator: char,
    /// Characters of hash written.
    pub hash_length: usize,
    /// Fewest hash characters accepted when verifying.
    pub hash_minimum: usize,
    /// The hash alphabet written.
    pub alphabet: HashAlphabet,
}

/// Why an address does not reverse (or, for a malformed SRS1 sender, does not forward). The
/// messages are libsrs2's (`srs_strerror`), which postsrsd puts in its not-found replies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReverseError {
    /// Not an SRS address at all.
    #[error("Not an SRS address.")]
    NotSrs,
    /// SRS-shaped but with a missing field; the text names it ("No host in SRS0 address.").
    #[error("{0}")]
    Malformed(&'static str),
    /// A timestamp character outside base32.
    #[error("Bad base32 character in timestamp.")]
    BadTimestamp,
    /// Older than [`MAX_AGE_DAYS`], from the future, or not two characters long.
    #[error("Time stamp out of date.")]
    Expired,
    /// Shorter than `hash_minimum`.
    #[error("Hash too short in SRS address.")]
    HashTooShort,
    /// No secret produces this hash: forged, or signed with a secret we no longer have.
    #[error("Hash invalid in SRS address.")]
    BadHash,
}

/// The day-number stamp of `unix` seconds: 2 base32 characters, high bits first.
pub fn timestamp(unix: u64) -> String {
    let day = (unix / 86_400) % TIMESTAMP_DAYS;
    let hi = BASE32[usize::try_from((day >> 5) & 31).unwrap_or(0)];
    let lo = BASE32[usize::try_from(day & 31).unwrap_or(0)];
    String::from_utf8(vec![hi, lo]).unwrap_or_default()
}

fn base32_value(c: u8) -> Option<u64> {
    let upper = c.to_ascii_uppercase();
    BASE32
        .iter()
        .position(|&b| b == upper)
        .and_then(|p| u64::try_from(p).ok())
}

/// Checks a stamp against `unix`: at most [`MAX_AGE_DAYS`] old, counting modulo 1024 days.
pub fn check_timestamp(stamp: &str, unix: u64) -> Result<(), ReverseError> {
    let bytes = stamp.as_bytes();
    if bytes.len() != 2 {
        // libsrs2 reports a stamp of the wrong length as out of date.
        return Err(ReverseError::Expired);
    }
    let then = base32_value(bytes[0])
        .zip(base32_value(bytes[1]))
        .map(|(hi, lo)| (hi << 5) | lo)
        .ok_or(ReverseError::BadTimestamp)?;
    let today = (unix / 86_400) % TIMESTAMP_DAYS;
    let age = (today + TIMESTAMP_DAYS - then) % TIMESTAMP_DAYS;
    if age <= MAX_AGE_DAYS {
        Ok(())
    } else {
        Err(ReverseError::Expired)
    }
}

/// base64's `+`/`-` and `/`/`_` are the same character to the verifier, and case is ignored
/// (some MTAs lower-case local parts).
fn hash_char_eq(a: u8, b: u8) -> bool {
    let fold = |c: u8| match c {
        b'-' => b'+',
        b'_' => b'/',
        other => other.to_ascii_lowercase(),
    };
    fold(a) == fold(b)
}

impl Srs {
    fn hash_with(&self, secret: &Secret, parts: &[&str]) -> String {
        let mut mac = secret.keyed.clone();
        // Lower-cased on the stack a chunk at a time: an address part seldom needs more than one.
        let mut lower = [0u8; 64];
        for part in parts {
            for chunk in part.as_bytes().chunks(lower.len()) {
                let lower = &mut lower[..chunk.len()];
                lower.copy_from_slice(chunk);
                lower.make_ascii_lowercase();
                mac.update(lower);
            }
        }
        let digest = mac.finalize().into_bytes();
        // 20 digest bytes are 28 base64 characters, padding included.
        let mut encoded = [0u8; 28];
        let engine = match self.alphabet {
            HashAlphabet::Base64 => &base64::engine::general_purpose::STANDARD,
            HashAlphabet::Base64url => &base64::engine::general_purpose::URL_SAFE,
        };
        let written = engine.encode_slice(digest, &mut encoded).unwrap_or(0);
        let kept = &encoded[..written.min(self.hash_length)];
        std::str::from_utf8(kept).unwrap_or_default().to_owned()
    }

    fn sign(&self, parts: &[&str]) -> String {
        match self.secrets.first() {
            Some(secret) => self.hash_with(secret, parts),
            // A config always holds a secret (load refuses an empty file); with none, the
            // empty key, as before.
            None => self.hash_with(&Secret::new([]), parts),
        }
    }

    fn verify(&self, given: &str, parts: &[&str]) -> Result<(), ReverseError> {
        if given.len() < self.hash_minimum {
            return Err(ReverseError::HashTooShort);
        }
        let compared = given.len().min(self.hash_length);
        let given = &given.as_bytes()[..compared];
        let matches = self.secrets.iter().any(|secret| {
            let expected = self.hash_with(secret, parts);
            expected.len() >= compared
                && expected.as_bytes()[..compared]
                    .iter()
                    .zip(given)
                    .all(|(&a, &b)| hash_char_eq(a, b))
        });
        if matches {
            Ok(())
        } else {
            Err(ReverseError::BadHash)
        }
    }

    /// Rewrites `local@domain` (a sender from a foreign domain) into an address at `srs_domain`.
    /// An SRS0 or SRS1 address from another forwarder becomes SRS1, as libsrs2 does; a
    /// malformed SRS1 local part (no host or no user) is an error, as in libsrs2.
    pub fn try_forward(
        &self,
        local: &str,
        domain: &str,
        srs_domain: &str,
        unix: u64,
    ) -> Result<String, ReverseError> {
        let Some((kind, rest)) = split_srs(local) else {
            return Ok(self.forward_plain(local, domain, srs_domain, unix));
        };
        // rest starts at the separator: "=HHHH=TT=host=user" (SRS0) or "=HHHH=host==rest" (SRS1).
        let (host, user) = if kind == b'0' {
            // SRS0 from another forwarder: guarded with that forwarder's domain as the host and
            // the whole tail, original separator included, as the user.
            (domain, rest)
        } else {
            let fields = &rest[1..];
            if fields.is_empty() {
                return Err(ReverseError::Malformed("No hash in SRS1 address."));
            }
            let (_hash, after) = fields
                .split_once('=')
                .ok_or(ReverseError::Malformed("No host in SRS1 address."))?;
            after
                .split_once('=')
                .ok_or(ReverseError::Malformed("No user in SRS1 address."))?
        };
        let hash = self.sign(&[host, user]);
        Ok(format!(
            "SRS1{}{hash}={host}={user}@{srs_domain}",
            self.separator
        ))
    }

    /// [`Srs::try_forward`], with a malformed SRS1 local part wrapped as a plain SRS0 sender.
    pub fn forward(&self, local: &str, domain: &str, srs_domain: &str, unix: u64) -> String {
        self.try_forward(local, domain, srs_domain, unix)
            .unwrap_or_else(|_| self.forward_plain(local, domain, srs_domain, unix))
    }

    fn forward_plain(&self, local: &str, domain: &str, srs_domain: &str, unix: u64) -> String {
        let stamp = timestamp(unix);
        let hash = self.sign(&[&stamp, domain, local]);
        format!(
            "SRS0{}{hash}={stamp}={domain}={local}@{srs_domain}",
            self.separator
        )
    }

    /// Turns an SRS local part back into the address it stands for (the domain after `@` is not
    /// looked at, as libsrs2). SRS1 goes back to the SRS0 address of the previous forwarder.
    pub fn reverse(&self, local: &str, unix: u64) -> Result<String, ReverseError> {
        let (kind, rest) = split_srs(local).ok_or(ReverseError::NotSrs)?;
        let fields = &rest[1..];
        let malformed = ReverseError::Malformed;
        if kind == b'0' {
            // libsrs2's order: hash, stamp, host, user (which may hold further '='), then the
            // stamp is checked, then the hash.
            if fields.is_empty() {
                return Err(malformed("No hash in SRS0 address."));
            }
            let (hash, after) = fields
                .split_once('=')
                .ok_or(malformed("No timestamp in SRS0 address."))?;
            let (stamp, after) = after
                .split_once('=')
                .ok_or(malformed("No host in SRS0 address."))?;
            let (host, user) = after
                .split_once('=')
                .ok_or(malformed("No user in SRS0 address."))?;
            if host.is_empty() {
                return Err(malformed("No host in SRS0 address."));
            }
            if user.is_empty() {
                return Err(malformed("No user in SRS0 address."));
            }
            check_timestamp(stamp, unix)?;
            self.verify(hash, &[stamp, host, user])?;
            Ok(format!("{user}@{host}"))
        } else {
            if fields.is_empty() {
                return Err(malformed("No hash in SRS1 address."));
            }
            let (hash, after) = fields
                .split_once('=')
                .ok_or(malformed("No host in SRS1 address."))?;
            let (host, user) = after
                .split_once('=')
                .ok_or(malformed("No user in SRS1 address."))?;
            if host.is_empty() {
                return Err(malformed("No host in SRS1 address."));
            }
            if user.len() < 2 {
                return Err(malformed("No user in SRS1 address."));
            }
            self.verify(hash, &[host, user])?;
            Ok(format!("SRS0{user}@{host}"))
        }
    }
}

/// `Some((b'0' | b'1', rest-from-the-separator))` when `local` starts with `SRS0`/`SRS1` and a
/// separator (`=`, `+`, `-`), case-insensitively.
pub fn split_srs(local: &str) -> Option<(u8, &str)> {
    let bytes = local.as_bytes();
    if bytes.len() < 5 || !bytes[..3].eq_ignore_ascii_case(b"SRS") {
        return None;
    }
    let kind = bytes[3];
    if (kind == b'0' || kind == b'1') && matches!(bytes[4], b'=' | b'+' | b'-') {
        Some((kind, &local[4..]))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// 2020-01-01T00:01:00Z, the time of postsrsd's published vectors.
    const T: u64 = 1_577_836_860;

    fn srs(alphabet: HashAlphabet) -> Srs {
        Srs {
            secrets: vec![Secret::new(b"tops3cr3t")],
            separator: '=',
            hash_length: 4,
            hash_minimum: 4,
            alphabet,
        }
    }

    #[test]
    fn the_hash_lower_cases_parts_of_any_length_and_keeps_padding_within_the_length() {
        // Parts longer than the 64-byte chunk the hash lower-cases at a time, in mixed case:
        // the same HMAC as over the lower-cased text in one piece.
        let long_user = "Very.Long.Local.Part.".repeat(9);
        let host = "Sub.Example.ORG";
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(b"tops3cr3t").unwrap();
        mac.update(b"2w");
        mac.update(host.to_ascii_lowercase().as_bytes());
        mac.update(long_user.to_ascii_lowercase().as_bytes());
        let expected =
            base64::engine::general_purpose::URL_SAFE.encode(mac.finalize().into_bytes());
        let mut srs = srs(HashAlphabet::Base64url);
        for length in [4, 27, 28, 40] {
            srs.hash_length = length;
            let hash = srs.sign(&["2W", host, &long_user]);
            assert_eq!(hash, expected[..length.min(28)], "length {length}");
        }
    }

    #[test]
    fn published_postsrsd_vectors() {
        assert_eq!(timestamp(T), "2W");
        for alphabet in [HashAlphabet::Base64, HashAlphabet::Base64url] {
            let s = srs(alphabet);
            assert_eq!(
                s.forward("test", "otherdomain.com", "example.com", T),
                "SRS0=vmyz=2W=otherdomain.com=test@example.com"
            );
            assert_eq!(
                s.forward(
                    "SRS0=vmyz=2W=otherdomain.com=test",
                    "example.com",
                    "example.net",
                    T
                ),
                "SRS1=JO9m=example.com==vmyz=2W=otherdomain.com=test@example.net"
            );
        }
        assert_eq!(
            srs(HashAlphabet::Base64url).forward("sender", "otherdomain.com", "example.com", T),
            "SRS0=9KJ-=2W=otherdomain.com=sender@example.com"
        );
        assert_eq!(
            srs(HashAlphabet::Base64).forward("sender", "otherdomain.com", "example.com", T),
            "SRS0=9KJ+=2W=otherdomain.com=sender@example.com"
        );
    }

    #[test]
    fn reverse_accepts_either_alphabet_case_and_every_secret() {
        let mut s = srs(HashAlphabet::Base64);
        assert_eq!(
            s.reverse("SRS0=9KJ+=2W=otherdomain.com=sender", T).unwrap(),
            "sender@otherdomain.com"
        );
        assert_eq!(
            s.reverse("SRS0=9kj-=2w=otherdomain.com=sender", T).unwrap(),
            "sender@otherdomain.com"
        );
        assert_eq!(
            s.reverse("srs0=VMYZ=2W=otherdomain.com=test", T).unwrap(),
            "test@otherdomain.com"
        );
        assert_eq!(
            s.reverse("SRS1=JO9m=example.com==vmyz=2W=otherdomain.com=test", T)
                .unwrap(),
            "SRS0=vmyz=2W=otherdomain.com=test@example.com"
        );
        s.secrets.insert(0, Secret::new(b"new secret"));
        assert_eq!(
            s.reverse("SRS0=vmyz=2W=otherdomain.com=test", T).unwrap(),
            "test@otherdomain.com"
        );
        s.secrets.truncate(1);
        assert_eq!(
            s.reverse("SRS0=vmyz=2W=otherdomain.com=test", T),
            Err(ReverseError::BadHash)
        );
    }

    #[test]
    fn the_settings_debug_output_shows_no_secret() {
        let shown = format!("{:?}", srs(HashAlphabet::Base64url));
        assert!(shown.contains("Secret(..)"), "{shown}");
        assert!(!shown.contains("tops3cr3t"), "{shown}");
        // Nor the secret's bytes as numbers: b't' is 116, b'o' 111, ...
        assert!(!shown.contains("116"), "{shown}");
    }

    #[test]
    fn forged_expired_and_malformed_are_refused() {
        let s = srs(HashAlphabet::Base64url);
        assert_eq!(
            s.reverse("SRS0=abcd=2W=otherdomain.com=test", T),
            Err(ReverseError::BadHash)
        );
        assert_eq!(
            s.reverse("SRS0=vmy=2W=otherdomain.com=test", T),
            Err(ReverseError::HashTooShort)
        );
        assert_eq!(
            s.reverse("SRS0=vmyz=2W=otherdomain.com=test", T + 22 * 86_400),
            Err(ReverseError::Expired)
        );
        assert_eq!(
            s.reverse("SRS0=vmyz=2W=otherdomain.com=test", T + 21 * 86_400),
            Ok("test@otherdomain.com".into())
        );
        // A stamp from the future is as bad as an old one (it wraps to ~1000 days old).
        assert_eq!(
            s.reverse("SRS0=vmyz=2W=otherdomain.com=test", T - 86_400),
            Err(ReverseError::Expired)
        );
        assert_eq!(
            s.reverse("SRS0=vmyz=2!=otherdomain.com=test", T),
            Err(ReverseError::BadTimestamp)
        );
        assert_eq!(
            s.reverse("SRS0=vmyz=2W=otherdomain.com", T),
            Err(ReverseError::Malformed("No user in SRS0 address."))
        );
        assert_eq!(
            s.reverse("SRS0==2W=a=b", T),
            Err(ReverseError::HashTooShort)
        );
        assert_eq!(
            s.reverse("SRS0=", T),
            Err(ReverseError::Malformed("No hash in SRS0 address."))
        );
        assert_eq!(
            s.reverse("SRS0=vmyz", T),
            Err(ReverseError::Malformed("No timestamp in SRS0 address."))
        );
        assert_eq!(
            s.reverse("SRS0=vmyz=2W", T),
            Err(ReverseError::Malformed("No host in SRS0 address."))
        );
        assert_eq!(
            s.reverse("SRS0=vmyz=2WX=a.example=b", T),
            Err(ReverseError::Expired)
        );
        // The messages are libsrs2's, which postsrsd answers with.
        assert_eq!(
            ReverseError::BadHash.to_string(),
            "Hash invalid in SRS address."
        );
        assert_eq!(ReverseError::Expired.to_string(), "Time stamp out of date.");
        assert_eq!(s.reverse("alice", T), Err(ReverseError::NotSrs));
        assert_eq!(s.reverse("SRS2=x=y", T), Err(ReverseError::NotSrs));
        assert_eq!(
            s.reverse("SRS1=abcd=host", T),
            Err(ReverseError::Malformed("No user in SRS1 address."))
        );
        assert_eq!(
            s.reverse("SRS1=abcd", T),
            Err(ReverseError::Malformed("No host in SRS1 address."))
        );
    }

    #[test]
    fn srs1_is_rewrapped_and_a_malformed_one_is_an_error() {
        let s = srs(HashAlphabet::Base64url);
        // An SRS1 from another forwarder keeps its first-hop host and tail; only the hash is new.
        let srs1 = "SRS1=JO9m=example.com==vmyz=2W=otherdomain.com=test";
        let out = s
            .try_forward(srs1, "example.net", "fwd.example", T)
            .unwrap();
        assert!(
            out.starts_with("SRS1=")
                && out.ends_with("=example.com==vmyz=2W=otherdomain.com=test@fwd.example"),
            "{out}"
        );
        let local = out.rsplit_once('@').unwrap().0;
        assert_eq!(
            s.reverse(local, T).unwrap(),
            "SRS0=vmyz=2W=otherdomain.com=test@example.com"
        );
        // Another separator after SRS0 survives the wrapping and the unwrapping.
        let out = s
            .try_forward(
                "SRS0+vmyz=2W=otherdomain.com=test",
                "example.com",
                "fwd.example",
                T,
            )
            .unwrap();
        assert!(out.contains("=example.com=+vmyz="), "{out}");
        let local = out.rsplit_once('@').unwrap().0;
        assert_eq!(
            s.reverse(local, T).unwrap(),
            "SRS0+vmyz=2W=otherdomain.com=test@example.com"
        );
        assert_eq!(
            s.try_forward("SRS1=abcd", "x.example", "fwd.example", T),
            Err(ReverseError::Malformed("No host in SRS1 address."))
        );
        assert_eq!(
            s.try_forward("SRS1=", "x.example", "fwd.example", T),
            Err(ReverseError::Malformed("No hash in SRS1 address."))
        );
        assert_eq!(
            s.try_forward("SRS1=abcd=host", "x.example", "fwd.example", T),
            Err(ReverseError::Malformed("No user in SRS1 address."))
        );
    }

    #[test]
    fn timestamps_wrap_modulo_1024_days() {
        let day = 86_400;
        let wrap_start = 1023 * day; // stamp "77" (day 1023)
        assert_eq!(timestamp(wrap_start), "77");
        assert_eq!(timestamp(1024 * day), "AA");
        assert_eq!(check_timestamp("77", 1024 * day + 5 * day), Ok(()));
        assert_eq!(
            check_timestamp("77", 1024 * day + 21 * day),
            Err(ReverseError::Expired)
        );
    }

    #[test]
    fn other_separators_and_hash_lengths() {
        let mut s = srs(HashAlphabet::Base64url);
        s.separator = '+';
        s.hash_length = 8;
        let out = s.forward("bob", "b.example", "fwd.example", T);
        assert!(out.starts_with("SRS0+"), "{out}");
        let local = out.split('@').next().unwrap();
        assert_eq!(local.split('=').next().unwrap().len(), 4 + 1 + 8);
        assert_eq!(s.reverse(local, T).unwrap(), "bob@b.example");
    }

    proptest! {
        #[test]
        fn reverse_undoes_forward(
            local in "[a-zA-Z0-9._+-]{1,30}",
            domain in "[a-z0-9-]{1,20}\\.[a-z]{2,6}",
            unix in 0u64..4_000_000_000,
            age_days in 0u64..=21,
            url in any::<bool>(),
        ) {
            prop_assume!(split_srs(&local).is_none());
            let s = srs(if url { HashAlphabet::Base64url } else { HashAlphabet::Base64 });
            let address = s.forward(&local, &domain, "fwd.example", unix);
            let srs_local = address.rsplit_once('@').unwrap().0;
            prop_assert_eq!(s.reverse(srs_local, unix + age_days * 86_400).unwrap(), format!("{local}@{domain}"));
            // Any change to the hash is caught.
            let forged = srs_local.replacen(&srs_local[5..9], "zzzz", 1);
            if !srs_local[5..9].eq_ignore_ascii_case("zzzz") {
                prop_assert!(s.reverse(&forged, unix).is_err());
            }
            prop_assert_eq!(s.reverse(srs_local, unix + 22 * 86_400), Err(ReverseError::Expired));
        }
    }
}
