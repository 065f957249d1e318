//! Listener address parsing never panics, and what parses prints back to something that parses
//! to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_common::listen::ListenSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(spec) = text.parse::<ListenSpec>() {
        let again: ListenSpec = spec.to_string().parse().expect("printed form parses");
        assert_eq!(again, spec);
    }
});
