//! The report store through sqlx Any, and the [`Recorder`] the milter records into: the store
//! when it answers, otherwise a spool file that is replayed (each record has a unique key, so a
//! replay interrupted half-way and repeated counts nothing twice). Records that arrive while one
//! is being written are written together, in one statement (group commit): each caller still
//! returns only once its own record is durable.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use postern_common::sqlite::{Checkpoints, JOURNAL_SIZE_LIMIT};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{AnyPool, AssertSqlSafe, Executor, Row};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Mutex, oneshot};
use tracing::{info, warn};

use super::{ReportError, ReportRecord, ReportsConfig};

/// One store connection pool.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    url: String,
    /// While a clone lives, SQLite's WAL is checkpointed in the background.
    alive: Arc<()>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
    Mysql,
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

impl Store {
    /// Connects and brings the schema up to date.
    pub async fn connect(url: &str) -> Result<Self, ReportError> {
        Self::connect_checkpointing(url, Checkpoints::default()).await
    }

    /// As [`Store::connect`], with SQLite's WAL checkpointed as `checkpoints` says.
    pub(super) async fn connect_checkpointing(
        url: &str,
        checkpoints: Checkpoints,
    ) -> Result<Self, ReportError> {
        static DRIVERS: std::sync::Once = std::sync::Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let redacted = redact(url);
        let error = |source| ReportError::Store {
            url: redacted.clone(),
            source,
        };
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres") {
            Backend::Postgres
        } else {
            Backend::Mysql
        };
        let mut options = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(3));
        if backend == Backend::Sqlite {
            // One writer at a time; WAL so readers (reports send) do not block the milter. No
            // ping before each use: a file does not go away like a server connection, and the
            // ping is one more trip to sqlx's SQLite thread per record.
            options = options
                .max_connections(1)
                .test_before_acquire(false)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        conn.execute("PRAGMA busy_timeout = 5000").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                        // Checkpoints run in the background (below), never in a record's commit.
                        conn.execute("PRAGMA wal_autocheckpoint = 0").await?;
                        conn.execute(AssertSqlSafe(format!(
                            "PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}"
                        )))
                        .await?;
                        Ok(())
                    })
                });
        } else {
            options = options.max_connections(4);
        }
        let pool = options.connect(url).await.map_err(error)?;
        let store = Self {
            pool,
            backend,
            url: redacted.clone(),
            alive: Arc::new(()),
        };
        store.migrate().await?;
        if backend == Backend::Sqlite {
            let checkpoint_pool = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_lazy_with(
                    SqliteConnectOptions::from_str(url)
                        .map_err(error)?
                        .busy_timeout(Duration::from_secs(5)),
                );
            let alive = Arc::downgrade(&store.alive);
            tokio::spawn(postern_common::sqlite::checkpoint_in_background(
                checkpoint_pool,
                move || alive.strong_count() > 0,
                checkpoints,
                "DMARC reports",
            ));
        }
        Ok(store)
    }

    /// Which database, as sqlx names it.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
            Backend::Mysql => "MySQL",
        }
    }

    fn err(&self, source: sqlx::Error) -> ReportError {
        ReportError::Store {
            url: self.url.clone(),
            source,
        }
    }

    /// `?` placeholders for SQLite/MySQL, `$n` for PostgreSQL.
    fn sql(&self, text: &str) -> String {
        if self.backend != Backend::Postgres {
            return text.to_owned();
        }
        let mut out = String::with_capacity(text.len() + 8);
        let mut n = 0;
        for ch in text.chars() {
            if ch == '?' {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            } else {
                out.push(ch);
            }
        }
        out
    }

    async fn migrate(&self) -> Result<(), ReportError> {
        let ddl = match self.backend {
            Backend::Sqlite => {
                let mut conn = self.pool.acquire().await.map_err(|e| self.err(e))?;
                conn.execute("PRAGMA journal_mode = WAL")
                    .await
                    .map_err(|e| self.err(e))?;
                include_str!("../../migrations/sqlite.sql")
            }
            Backend::Postgres => include_str!("../../migrations/postgres.sql"),
            Backend::Mysql => include_str!("../../migrations/mysql.sql"),
        };
        for statement in ddl.split(';') {
            let statement: String = statement
                .lines()
                .filter(|line| !line.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n");
            if statement.trim().is_empty() {
                continue;
            }
            sqlx::query(AssertSqlSafe(statement))
                .execute(&self.pool)
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Stores a record under `uid`; a uid already present is left alone (returns false).
    pub async fn insert(&self, uid: &str, record: &ReportRecord) -> Result<bool, ReportError> {
        let text = serde_json::to_string(record).expect("records serialise");
        let sql = match self.backend {
            Backend::Sqlite => {
                "INSERT OR IGNORE INTO dmarc_messages (uid, received, policy_domain, record) VALUES (?, ?, ?, ?)"
            }
            Backend::Postgres => {
                "INSERT INTO dmarc_messages (uid, received, policy_domain, record) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING"
            }
            Backend::Mysql => {
                "INSERT IGNORE INTO dmarc_messages (uid, received, policy_domain, record) VALUES (?, ?, ?, ?)"
            }
        };
        let done = sqlx::query(AssertSqlSafe(self.sql(sql)))
            .bind(uid.to_owned())
            .bind(record.received)
            .bind(record.published.domain.to_ascii_lowercase())
            .bind(text)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(done.rows_affected() > 0)
    }

    /// Stores several records in one statement (atomic: all or none); uids already present are
    /// left alone. Returns how many were new.
    pub async fn insert_batch(&self, batch: &[(String, ReportRecord)]) -> Result<u64, ReportError> {
        if batch.is_empty() {
            return Ok(0);
        }
        let head = match self.backend {
            Backend::Sqlite => "INSERT OR IGNORE INTO dmarc_messages",
            Backend::Postgres => "INSERT INTO dmarc_messages",
            Backend::Mysql => "INSERT IGNORE INTO dmarc_messages",
        };
        let mut sql = format!("{head} (uid, received, policy_domain, record) VALUES ");
        for i in 0..batch.len() {
            sql.push_str(if i == 0 {
                "(?, ?, ?, ?)"
            } else {
                ", (?, ?, ?, ?)"
            });
        }
        if self.backend == Backend::Postgres {
            sql.push_str(" ON CONFLICT DO NOTHING");
        }
        let sql = self.sql(&sql);
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for (uid, record) in batch {
            query = query
                .bind(uid.clone())
                .bind(record.received)
                .bind(record.published.domain.to_ascii_lowercase())
                .bind(serde_json::to_string(record).expect("records serialise"));
        }
        let done = query.execute(&self.pool).await.map_err(|e| self.err(e))?;
        Ok(done.rows_affected())
    }

    /// Number of stored records.
    pub async fn count(&self) -> Result<i64, ReportError> {
        let row = sqlx::query("SELECT COUNT(*) FROM dmarc_messages")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        row.try_get::<i64, _>(0).map_err(|e| self.err(e))
    }

    /// Policy domains with records, each with its oldest record time.
    pub async fn domains(&self) -> Result<Vec<(String, i64)>, ReportError> {
        let rows = sqlx::query(
            "SELECT policy_domain, MIN(received) FROM dmarc_messages GROUP BY policy_domain ORDER BY policy_domain",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        rows.iter()
            .map(|row: &AnyRow| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(|e| self.err(e))
    }

    /// The records of a domain received in `[begin, end)`.
    pub async fn records(
        &self,
        domain: &str,
        begin: i64,
        end: i64,
    ) -> Result<Vec<ReportRecord>, ReportError> {
        let rows = sqlx::query(AssertSqlSafe(self.sql(
            "SELECT record FROM dmarc_messages WHERE policy_domain = ? AND received >= ? AND received < ? ORDER BY received, uid",
        )))
        .bind(domain.to_owned())
        .bind(begin)
        .bind(end)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        let mut records = Vec::with_capacity(rows.len());
        for row in rows {
            let text: String = row.try_get(0).map_err(|e| self.err(e))?;
            match serde_json::from_str(&text) {
                Ok(record) => records.push(record),
                Err(err) => {
                    warn!(domain, error = %err, "unreadable record in the report store, skipped")
                }
            }
        }
        Ok(records)
    }

    /// End of the last period reported for a domain.
    pub async fn last_end(&self, domain: &str) -> Result<Option<i64>, ReportError> {
        let row = sqlx::query(AssertSqlSafe(
            self.sql("SELECT last_end FROM dmarc_report_state WHERE policy_domain = ?"),
        ))
        .bind(domain.to_owned())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        row.map(|row| row.try_get::<i64, _>(0))
            .transpose()
            .map_err(|e| self.err(e))
    }

    /// Records that a domain's period up to `end` is done.
    pub async fn set_last_end(&self, domain: &str, end: i64) -> Result<(), ReportError> {
        let sql = match self.backend {
            Backend::Sqlite | Backend::Postgres => {
                "INSERT INTO dmarc_report_state (policy_domain, last_end) VALUES (?, ?) ON CONFLICT (policy_domain) DO UPDATE SET last_end = excluded.last_end"
            }
            Backend::Mysql => {
                "INSERT INTO dmarc_report_state (policy_domain, last_end) VALUES (?, ?) ON DUPLICATE KEY UPDATE last_end = VALUES(last_end)"
            }
        };
        sqlx::query(AssertSqlSafe(self.sql(sql)))
            .bind(domain.to_owned())
            .bind(end)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Whether a report already went to a destination.
    pub async fn was_sent(&self, report_id: &str, destination: &str) -> Result<bool, ReportError> {
        let row = sqlx::query(AssertSqlSafe(self.sql(
            "SELECT COUNT(*) FROM dmarc_sent WHERE report_id = ? AND destination = ?",
        )))
        .bind(report_id.to_owned())
        .bind(destination.to_owned())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(row.try_get::<i64, _>(0).map_err(|e| self.err(e))? > 0)
    }

    /// Notes that a report reached a destination.
    pub async fn mark_sent(
        &self,
        report_id: &str,
        destination: &str,
        now: i64,
    ) -> Result<(), ReportError> {
        let sql = match self.backend {
            Backend::Sqlite => {
                "INSERT OR IGNORE INTO dmarc_sent (report_id, destination, sent_at) VALUES (?, ?, ?)"
            }
            Backend::Postgres => {
                "INSERT INTO dmarc_sent (report_id, destination, sent_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
            }
            Backend::Mysql => {
                "INSERT IGNORE INTO dmarc_sent (report_id, destination, sent_at) VALUES (?, ?, ?)"
            }
        };
        sqlx::query(AssertSqlSafe(self.sql(sql)))
            .bind(report_id.to_owned())
            .bind(destination.to_owned())
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Deletes records received before `before` and send marks older than it; returns the
    /// number of records deleted.
    pub async fn delete_before(&self, before: i64) -> Result<u64, ReportError> {
        let done = sqlx::query(AssertSqlSafe(
            self.sql("DELETE FROM dmarc_messages WHERE received < ?"),
        ))
        .bind(before)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        sqlx::query(AssertSqlSafe(
            self.sql("DELETE FROM dmarc_sent WHERE sent_at < ?"),
        ))
        .bind(before)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(done.rows_affected())
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Deletes rows older than `expire_after` (opendmarc-expire). Returns the records deleted.
pub async fn expire(store: &Store, config: &ReportsConfig, now: i64) -> Result<u64, ReportError> {
    let before = now - config.expire_after.get().as_secs() as i64;
    let deleted = store.delete_before(before).await?;
    if deleted > 0 {
        info!(deleted, before, "expired old DMARC report records");
    }
    Ok(deleted)
}

/// Most records written in one statement (SQLite allows 32766 bound values; 4 per record).
const MAX_BATCH_RECORDS: usize = 256;

/// A record waiting for the writer, and where its outcome goes.
#[derive(Debug)]
struct Queued {
    uid: String,
    record: ReportRecord,
    done: oneshot::Sender<Result<(), String>>,
}

/// What the milter records into: the store, or the spool while the store is down.
#[derive(Debug)]
pub struct Recorder {
    url: String,
    spool: PathBuf,
    /// Records not yet written; whoever holds `store` next writes them all.
    queue: std::sync::Mutex<Vec<Queued>>,
    store: Mutex<Option<Store>>,
    spooled: AtomicBool,
    counter: AtomicU64,
    instance: u64,
    /// While the store is down, it is tried again at most this often, so that messages are not
    /// each held up by a connection attempt.
    retry_at: std::sync::Mutex<Option<std::time::Instant>>,
    retry_interval: Duration,
}

/// A spool line: the unique key and the record.
#[derive(serde::Serialize, serde::Deserialize)]
struct SpoolEntry {
    uid: String,
    record: ReportRecord,
}

impl Recorder {
    /// Prepares recording; connects to the store now if it can (a store that is down is not an
    /// error: records are spooled until it is back).
    pub async fn open(config: &ReportsConfig, state_dir: &Path) -> Self {
        let url = config.store_url(state_dir);
        let spool = config.spool_path(state_dir);
        let store = match Store::connect(&url).await {
            Ok(store) => Some(store),
            Err(err) => {
                warn!(error = %err, "DMARC report store unavailable, recording to the spool file");
                None
            }
        };
        let spooled = tokio::fs::metadata(&spool)
            .await
            .is_ok_and(|meta| meta.len() > 0);
        let instance = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()) << 40;
        let recorder = Self {
            url,
            spool,
            queue: std::sync::Mutex::new(Vec::new()),
            store: Mutex::new(store),
            spooled: AtomicBool::new(spooled),
            counter: AtomicU64::new(0),
            instance,
            retry_at: std::sync::Mutex::new(None),
            retry_interval: config.store_retry_interval.get(),
        };
        if spooled && let Err(err) = recorder.replay().await {
            warn!(error = %err, "DMARC report spool not replayed yet");
        }
        recorder
    }

    /// The spool file.
    pub fn spool_path(&self) -> &Path {
        &self.spool
    }

    /// A key unique to this record.
    fn uid(&self, record: &ReportRecord) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!(
            "{}.{}.{:x}.{n}",
            record.received, record.job_id, self.instance
        )
    }

    /// Records one message durably (store or spool) before the milter answers. Fails only when
    /// both the store and the spool file fail.
    ///
    /// Group commit: the record is queued; whoever gets the store next writes everything queued
    /// in one statement, so concurrent messages share one database round trip and commit.
    pub async fn record(&self, record: &ReportRecord) -> Result<(), ReportError> {
        let (done, outcome) = oneshot::channel();
        self.queue.lock().expect("not poisoned").push(Queued {
            uid: self.uid(record),
            record: record.clone(),
            done,
        });
        {
            let mut guard = self.store.lock().await;
            let batch: Vec<Queued> = {
                let mut queue = self.queue.lock().expect("not poisoned");
                let n = queue.len().min(MAX_BATCH_RECORDS);
                queue.drain(..n).collect()
            };
            // Empty: an earlier writer took ours along, and its outcome is waiting below.
            if !batch.is_empty() {
                self.write_locked(&mut guard, batch).await;
            }
        }
        match outcome.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(ReportError::Spool {
                path: self.spool.display().to_string(),
                source: std::io::Error::other(message),
            }),
            Err(_) => Err(ReportError::Spool {
                path: self.spool.display().to_string(),
                source: std::io::Error::other("recording interrupted"),
            }),
        }
    }

    /// Writes a batch to the store, or to the spool when the store fails, and tells each
    /// caller the outcome.
    async fn write_locked(&self, guard: &mut Option<Store>, batch: Vec<Queued>) {
        if self.spooled.load(Ordering::Acquire)
            && (guard.is_some() || !self.backing_off())
            && let Err(err) = self.replay_locked(guard).await
        {
            warn!(error = %err, "DMARC report spool replay failed");
        }
        let entries: Vec<(String, ReportRecord)> = batch
            .iter()
            .map(|q| (q.uid.clone(), q.record.clone()))
            .collect();
        let mut stored = false;
        if !self.spooled.load(Ordering::Acquire)
            && let Some(store) = self.connected(guard).await
        {
            match store.insert_batch(&entries).await {
                Ok(_) => {
                    metrics::counter!("postern_milter_dmarc_records_stored_total")
                        .increment(entries.len() as u64);
                    stored = true;
                }
                Err(err) => {
                    warn!(error = %err, records = entries.len(), "DMARC report store write failed, spooling");
                    *guard = None;
                    self.back_off();
                }
            }
        }
        let result = if stored {
            Ok(())
        } else {
            self.append_spool(&entries).await.map_err(|e| e.to_string())
        };
        for queued in batch {
            let _ = queued.done.send(result.clone());
        }
    }

    fn back_off(&self) {
        *self.retry_at.lock().expect("not poisoned") =
            Some(std::time::Instant::now() + self.retry_interval);
    }

    fn backing_off(&self) -> bool {
        self.retry_at
            .lock()
            .expect("not poisoned")
            .is_some_and(|at| std::time::Instant::now() < at)
    }

    async fn connected<'a>(&self, guard: &'a mut Option<Store>) -> Option<&'a Store> {
        if guard.is_none() {
            if self.backing_off() {
                return None;
            }
            match Store::connect(&self.url).await {
                Ok(store) => {
                    info!(
                        backend = store.backend_name(),
                        "DMARC report store connected"
                    );
                    *guard = Some(store);
                }
                Err(err) => {
                    warn!(error = %err, "DMARC report store unavailable");
                    self.back_off();
                    return None;
                }
            }
        }
        guard.as_ref()
    }

    async fn append_spool(&self, entries: &[(String, ReportRecord)]) -> Result<(), ReportError> {
        let error = |source| ReportError::Spool {
            path: self.spool.display().to_string(),
            source,
        };
        let mut lines = String::new();
        for (uid, record) in entries {
            lines.push_str(
                &serde_json::to_string(&SpoolEntry {
                    uid: uid.clone(),
                    record: record.clone(),
                })
                .expect("records serialise"),
            );
            lines.push('\n');
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.spool)
            .await
            .map_err(error)?;
        file.write_all(lines.as_bytes()).await.map_err(error)?;
        file.sync_data().await.map_err(error)?;
        self.spooled.store(true, Ordering::Release);
        metrics::counter!("postern_milter_dmarc_records_spooled_total")
            .increment(entries.len() as u64);
        Ok(())
    }

    /// Moves spooled records into the store now (trying the store even while backing off);
    /// returns how many were new. The milter may call it from a timer so that a spool is
    /// emptied even when no message comes.
    pub async fn replay(&self) -> Result<usize, ReportError> {
        let mut guard = self.store.lock().await;
        *self.retry_at.lock().expect("not poisoned") = None;
        self.replay_locked(&mut guard).await
    }

    async fn replay_locked(&self, guard: &mut Option<Store>) -> Result<usize, ReportError> {
        let spool_error = |source| ReportError::Spool {
            path: self.spool.display().to_string(),
            source,
        };
        let text = match tokio::fs::read_to_string(&self.spool).await {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                self.spooled.store(false, Ordering::Release);
                return Ok(0);
            }
            Err(err) => return Err(spool_error(err)),
        };
        let Some(store) = self.connected(guard).await else {
            return Err(ReportError::Spool {
                path: self.spool.display().to_string(),
                source: std::io::Error::other("report store unavailable"),
            });
        };
        let mut new = 0;
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let entry: SpoolEntry = match serde_json::from_str(line) {
                Ok(entry) => entry,
                Err(err) => {
                    // A line cut short by a crash while appending: nothing was acknowledged.
                    warn!(line = index + 1, error = %err, "unreadable DMARC spool line skipped");
                    continue;
                }
            };
            match store.insert(&entry.uid, &entry.record).await {
                Ok(true) => new += 1,
                Ok(false) => {}
                Err(err) => {
                    *guard = None;
                    self.back_off();
                    return Err(err);
                }
            }
        }
        // Everything is in the store now (unique keys make a repeated replay harmless).
        tokio::fs::remove_file(&self.spool)
            .await
            .map_err(spool_error)?;
        self.spooled.store(false, Ordering::Release);
        info!(records = new, "DMARC report spool replayed into the store");
        Ok(new)
    }

    /// The store, connecting if needed (for the report commands).
    pub async fn store(&self) -> Option<Store> {
        let mut guard = self.store.lock().await;
        self.connected(&mut guard).await.cloned()
    }
}
