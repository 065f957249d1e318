//! postern-policyd: a Postfix policy-delegation server (check_policy_service) that replaces
//! postgrey (greylisting) and policyd-spf (SPF).

pub mod config;
pub mod proto;
pub mod server;
