//! postern-policyd: a Postfix policy-delegation server (check_policy_service) that replaces
//! postgrey (greylisting) and policyd-spf (SPF).

pub mod admin;
pub mod config;
pub mod greylist;
pub mod proto;
pub mod server;
pub mod spf;
