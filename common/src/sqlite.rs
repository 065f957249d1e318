//! SQLite housekeeping shared by the stores that embed it (the greylist, the DMARC report
//! store): checkpoints of the write-ahead log off the request path, and a log that stays
//! bounded under sustained writes.

use std::time::Duration;

use sqlx::SqlitePool;
use tracing::{debug, warn};

/// How often the stores copy their WAL into the database file, and when they restart it.
#[derive(Debug, Clone, Copy)]
pub struct Checkpoints {
    /// Time between two checkpoints.
    pub interval: Duration,
    /// A log longer than this many pages after a passive checkpoint is restarted (see
    /// [`checkpoint_in_background`]).
    pub restart_above_pages: i64,
}

impl Default for Checkpoints {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            // 32 MiB of 4 KiB pages.
            restart_above_pages: 8192,
        }
    }
}

/// `journal_size_limit` for the writing connections: a restarted log is cut back to this size.
pub const JOURNAL_SIZE_LIMIT: &str = "67108864";

/// How long a RESTART checkpoint may wait for the writer and readers. It holds the write lock
/// while it waits for readers, so this also bounds how long it can delay a commit.
pub const RESTART_BUSY_TIMEOUT: Duration = Duration::from_millis(100);
/// The busy timeout the stores' connections otherwise use.
const BUSY_TIMEOUT_MS: u32 = 5000;

/// Checkpoints the WAL on `pool`'s connection every `checkpoints.interval` while `alive()`
/// holds.
///
/// The writing connection runs with `wal_autocheckpoint = 0`: otherwise the commit that
/// crosses 1000 WAL pages copies them into the database file and syncs it, milliseconds spent
/// inside whichever request committed. A PASSIVE checkpoint neither waits for the writer nor
/// blocks it; but under a steady stream of commits it never catches up with the end of the
/// log at the moment a commit starts, so SQLite never starts the log over and it grows
/// without bound (half a gigabyte in six seconds of new greylist triplets). When the log is
/// longer than `restart_above_pages` after the passive pass, a RESTART checkpoint copies the
/// few pages written meanwhile, with the write lock held for that short time, and the next
/// commit starts the log from its beginning. `what` names the store in log lines.
pub async fn checkpoint_in_background(
    pool: SqlitePool,
    alive: impl Fn() -> bool + Send + 'static,
    checkpoints: Checkpoints,
    what: &'static str,
) {
    checkpoint_loop(pool, alive, checkpoints, what, None).await;
}

/// As [`checkpoint_in_background`], for a store whose writing connection commits back to back
/// (so that a checkpoint on another connection seldom gets the write lock a restart needs):
/// `ask_writer_to_restart` is called instead, and the writer restarts the log between two of its
/// commits, waiting at most [`RESTART_BUSY_TIMEOUT`] for readers.
pub async fn checkpoint_passively(
    pool: SqlitePool,
    alive: impl Fn() -> bool + Send + 'static,
    checkpoints: Checkpoints,
    what: &'static str,
    ask_writer_to_restart: impl Fn() + Send + Sync + 'static,
) {
    checkpoint_loop(
        pool,
        alive,
        checkpoints,
        what,
        Some(Box::new(ask_writer_to_restart)),
    )
    .await;
}

async fn checkpoint_loop(
    pool: SqlitePool,
    alive: impl Fn() -> bool + Send + 'static,
    checkpoints: Checkpoints,
    what: &'static str,
    ask_writer_to_restart: Option<Box<dyn Fn() + Send + Sync>>,
) {
    loop {
        tokio::time::sleep(checkpoints.interval).await;
        if !alive() {
            return;
        }
        match passive(&pool).await {
            Ok(log_pages) if log_pages > checkpoints.restart_above_pages => {
                if let Some(ask) = &ask_writer_to_restart {
                    ask();
                } else if let Err(err) = restart(&pool).await {
                    // Busy (a long read, such as an admin listing): tried again next time.
                    debug!(store = what, error = %err, log_pages, "SQLite WAL restart postponed");
                }
            }
            Ok(_) => {}
            Err(err) => warn!(store = what, error = %err, "SQLite WAL checkpoint failed; retrying"),
        }
    }
}

/// A PASSIVE checkpoint; returns the log's length in pages.
async fn passive(pool: &SqlitePool) -> Result<i64, sqlx::Error> {
    let (_busy, log_pages, _copied): (i64, i64, i64) =
        sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(pool)
            .await?;
    Ok(log_pages)
}

/// A RESTART checkpoint that waits at most [`RESTART_BUSY_TIMEOUT`] for locks.
async fn restart(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "PRAGMA busy_timeout = {}",
        RESTART_BUSY_TIMEOUT.as_millis()
    )))
    .execute(&mut *conn)
    .await?;
    let (busy, log_pages, _copied): (i64, i64, i64) =
        sqlx::query_as("PRAGMA wal_checkpoint(RESTART)")
            .fetch_one(&mut *conn)
            .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}"
    )))
    .execute(&mut *conn)
    .await?;
    if busy != 0 {
        return Err(sqlx::Error::Protocol(format!(
            "RESTART checkpoint busy with {log_pages} pages in the log"
        )));
    }
    Ok(())
}
