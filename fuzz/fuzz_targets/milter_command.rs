//! Milter packet framing and parsing never panic, whatever the MTA (or anyone) sends.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use postern_milter::proto::CommandDecoder;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    for _ in 0..1000 {
        match CommandDecoder.decode(&mut buf) {
            Ok(Some(_)) => continue,
            _ => break,
        }
    }
});
