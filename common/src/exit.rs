//! Process exit codes, as sysexits.h names them, shared by every binary.

/// Success.
pub const EX_OK: u8 = 0;
/// A runtime failure (a listener could not bind, a store failed at start).
pub const EX_RUNTIME: u8 = 1;
/// The command line was wrong (sysexits EX_USAGE).
pub const EX_USAGE: u8 = 64;
/// The configuration was wrong (sysexits EX_CONFIG).
pub const EX_CONFIG: u8 = 78;
