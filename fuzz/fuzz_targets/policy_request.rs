//! The policy-delegation codec never panics, and what it accepts re-encodes to a request that
//! parses to the same attributes.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
// The codec module alone, compiled here: postern-policyd as a whole pulls in mail-auth, whose
// dependency declares a newer rust-version than cargo-fuzz's nightly accepts without a flag.
#[path = "../../policyd/src/proto.rs"]
#[allow(dead_code, unreachable_pub)]
mod proto;
use proto::{PolicyDecoder, parse_request};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = parse_request(data) {
        let again = parse_request(&request.encode()).expect("re-encoded request parses");
        assert_eq!(again, request);
    }
    let mut decoder = PolicyDecoder::default();
    let mut buf = BytesMut::from(data);
    for _ in 0..1000 {
        match decoder.decode(&mut buf) {
            Ok(Some(_)) => continue,
            _ => break,
        }
    }
    let _ = decoder.decode_eof(&mut buf);
});
