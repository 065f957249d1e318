//! SQLite housekeeping shared by the stores that embed it (the greylist, the DMARC report
//! store): checkpoints of the write-ahead log off the request path.

use std::time::Duration;

use sqlx::SqlitePool;
use tracing::warn;

/// How often the stores copy their WAL into the database file.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Checkpoints the WAL every `interval` on `pool`'s connection while `alive()` holds.
///
/// The writing connection runs with `wal_autocheckpoint = 0`: otherwise the commit that
/// crosses 1000 WAL pages copies them into the database file and syncs it, milliseconds spent
/// inside whichever request committed. PASSIVE neither waits for the writer nor blocks it.
/// `what` names the store in the log line when a checkpoint fails (it is retried next time).
pub async fn checkpoint_in_background(
    pool: SqlitePool,
    alive: impl Fn() -> bool + Send + 'static,
    interval: Duration,
    what: &'static str,
) {
    loop {
        tokio::time::sleep(interval).await;
        if !alive() {
            return;
        }
        if let Err(err) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            warn!(store = what, error = %err, "SQLite WAL checkpoint failed; retrying");
        }
    }
}
