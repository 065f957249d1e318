//! postern-tests: what the end-to-end tests and benchmarks share: a DNS server for test zones,
//! a private real Postfix, our daemons as child processes, protocol clients for every interface
//! (policy, milter, tcp_table, socketmap), the Debian peers as child processes, and the
//! load-generator runner.

pub mod clients;
pub mod daemon;
pub mod dns;
pub mod load;
pub mod peer;
pub mod postfix;
pub mod smtp;

/// Whether a missing server (Postfix, Redis, ...) must fail the test instead of skipping it.
pub fn strict() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// Ends the test early with a printed reason when `condition` is false and not in CI; panics
/// with the reason in CI. Returns true when the test should go on.
pub fn require(condition: bool, reason: &str) -> bool {
    if condition {
        return true;
    }
    assert!(!strict(), "CI is set and {reason}");
    eprintln!("SKIPPED: {reason}");
    false
}
