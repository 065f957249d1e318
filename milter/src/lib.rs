//! postern-milter: a Postfix milter for DKIM signing and verification (replacing opendkim) and
//! DMARC with aggregate reports (replacing opendmarc).

pub mod config;
pub mod connection;
pub mod dkim;
pub mod dmarc;
pub mod proto;
pub mod reports;
pub mod server;
