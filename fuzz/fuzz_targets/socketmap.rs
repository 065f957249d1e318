//! Netstring framing never panics and never reads past a declared length.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use postern_srsd::proto::socketmap::SocketmapDecoder;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    for _ in 0..1000 {
        match SocketmapDecoder.decode(&mut buf) {
            Ok(Some(_)) => continue,
            _ => break,
        }
    }
});
