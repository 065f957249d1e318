//! Reversing arbitrary local parts never panics, and never accepts what we did not sign.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_srsd::srs::{HashAlphabet, Srs};

fuzz_target!(|data: &[u8]| {
    let Ok(local) = std::str::from_utf8(data) else { return };
    let srs = Srs { secrets: vec![b"fuzz secret".to_vec()], separator: '=', hash_length: 4, hash_minimum: 4, alphabet: HashAlphabet::Base64url };
    if let Ok(original) = srs.reverse(local, 1_577_836_860) {
        // Anything accepted must be what forward() produces for it (modulo case).
        if let Some((user, host)) = original.rsplit_once('@') {
            if !original.starts_with("SRS") {
                let forward = srs.forward(user, host, "x", 1_577_836_860);
                assert!(forward.to_ascii_lowercase().starts_with(&local[..4].to_ascii_lowercase()));
            }
        }
    }
});
