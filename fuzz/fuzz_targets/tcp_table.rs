//! tcp_table framing and %XX decoding never panic; keys round-trip through the encoder.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use postern_srsd::proto::tcp_table::{Request, TcpTableDecoder, decode_key, encode_key};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut decoder = TcpTableDecoder::default();
    let mut buf = BytesMut::from(data);
    for _ in 0..1000 {
        match decoder.decode(&mut buf) {
            Ok(Some(Request::Get(key))) => assert_eq!(decode_key(&encode_key(&key)).as_deref(), Some(key.as_str())),
            Ok(Some(Request::Invalid(_))) => continue,
            _ => break,
        }
    }
});
