//! postern-srsd: the Sender Rewriting Scheme for Postfix, byte-compatible with postsrsd, over
//! tcp_table (postsrsd 1.x) and socketmap (postsrsd 2.x).

pub mod config;
pub mod envelope_db;
pub mod proto;
pub mod rewrite;
pub mod server;
pub mod srs;
