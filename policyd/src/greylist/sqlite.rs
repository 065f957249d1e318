//! The embedded store: one SQLite file in WAL mode, read and written on two connections of its
//! own so that a commit never holds up an answer.
//!
//! A request the row cache cannot answer alone is decided where it arrives, on the caller's
//! thread: the decider (the reading connection, behind a mutex) reads the rows the cache lacks,
//! applies postgrey's rules (the pure functions of `logic`), and the request is answered at
//! once. Its changed rows join the open commit window. The committer, a thread with the
//! writing connection, writes a window in one transaction once it is [`COMMIT_WITHIN`] old or
//! [`COMMIT_AFTER_STEPS`] requests long, while the next window fills; it also runs expiry
//! steps and flushes. Until its window is committed, a row lives in the row cache, which keeps
//! it whatever its age (see [`Generations`]), so later requests decide on it.
//!
//! Why this shape, measured at 8 connections: a thread hop to a writer and back for every new
//! triplet left a third of both cores idle (each request waited for two wake-ups), and a commit
//! on the deciding connection stopped every answer while it ran: at 10 million triplets a
//! commit of a few hundred rows reads as many pages of the `last` index from disk (7 ms). The
//! decider's reads block the caller's thread for their time; a read that misses the page cache
//! waits for the disk, as every request's read would anyway.
//!
//! The connections are rusqlite's, not sqlx's: sqlx runs every SQLite connection on a thread of
//! its own and hands each statement and row across with channel messages (about 200 us of CPU
//! per batch). The admin commands, imports and WAL checkpoints keep sqlx's pool: they are not
//! on the request path.

use std::path::Path;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self as sync_mpsc, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

// Every request the cache cannot answer alone hashes its keys a few times (lookups, inserts);
// SipHash was a tenth of the old writer's time. foldhash is randomly seeded per process, and
// the cache it backs is bounded.
use foldhash::{HashMap, HashMapExt};
use postern_common::sqlite::{Checkpoints, JOURNAL_SIZE_LIMIT, RESTART_BUSY_TIMEOUT};
use rusqlite::{OptionalExtension, TransactionBehavior};
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::logic::{
    AWL_INTERVAL, ClientCount, TripletRules, TripletSeen, TripletTimes, bump_client, record_triplet,
};
use super::store::{Entry, GreylistStep, Kind, Stats, StepOutcome, Store, StoreError};

const SCHEMA: [&str; 4] = [
    "CREATE TABLE IF NOT EXISTS triplets (key TEXT PRIMARY KEY NOT NULL, first INTEGER NOT NULL, \
     last INTEGER NOT NULL, passed INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS triplets_last ON triplets (last)",
    "CREATE TABLE IF NOT EXISTS clients (key TEXT PRIMARY KEY NOT NULL, count INTEGER NOT NULL, \
     last INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS clients_last ON clients (last)",
];

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    shared: Arc<Shared>,
    commits: sync_mpsc::Sender<CommitJob>,
}

/// What the requests and the committer share.
#[derive(Debug)]
struct Shared {
    /// parking_lot's mutex, fair to a waiter after half a millisecond: with std's, a runtime
    /// thread took it again and again for its own tasks while another waited (waits of 3 to
    /// 15 ms at 8 connections on two runtime threads). Tokio's, fair at every hand-off, made
    /// each request wait for all the others queued (p50 1.3 ms at 10 million triplets).
    decider: parking_lot::Mutex<Decider>,
    /// Read (never written) by requests it answers alone; written under the decider's lock.
    cache: Mutex<RowCache>,
    /// The newest window the committer is done with (committed, or failed and forgotten).
    done: AtomicU64,
    /// The requests of the window being committed.
    committing: AtomicUsize,
    /// The log has grown past its bound: the committer restarts it between two commits.
    restart_wanted: AtomicBool,
    /// The committer is restarting the log, which waits for every read transaction begun
    /// before: the decider begins one per request meanwhile.
    restarting: AtomicBool,
    /// Told after each window the committer is done with, to requests waiting for room.
    committed: tokio::sync::Notify,
    /// Requests wait for room (see [`MAX_UNCOMMITTED_STEPS`]): logged once per episode.
    behind: AtomicBool,
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

impl SqliteStore {
    /// Opens (creating if needed) the database file, mode 0600 via the state directory's
    /// permissions, in WAL mode with the schema in place.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_checkpointing(path, Checkpoints::default()).await
    }

    async fn open_checkpointing(path: &Path, checkpoints: Checkpoints) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT);
        // The pool (one connection) serves the admin commands, imports and checkpoints. Page
        // caches (KiB, negative) sized so that the daemon stays well under 40 MB: the
        // decider's holds the B-trees' upper levels of a 10-million-triplet store, the
        // committer's the pages it is rewriting.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .connect_with(options.pragma("cache_size", "-1000"))
            .await?;
        for statement in SCHEMA {
            sqlx::query(statement).execute(&pool).await?;
        }
        let shared = Arc::new(Shared {
            decider: parking_lot::Mutex::new(Decider {
                conn: open_connection(path, "-12000")?,
                window: Window::default(),
                last_window: 0,
                answer_first: true,
                snapshot: None,
                refresh: false,
            }),
            cache: Mutex::new(RowCache::default()),
            done: AtomicU64::new(0),
            committing: AtomicUsize::new(0),
            restart_wanted: AtomicBool::new(false),
            restarting: AtomicBool::new(false),
            committed: tokio::sync::Notify::new(),
            behind: AtomicBool::new(false),
        });
        let writer = open_connection(path, "-4000")?;
        let (commits, jobs) = sync_mpsc::channel();
        // The committer holds `shared` until every handle of the store is gone.
        let (alive, asking) = (Arc::downgrade(&shared), Arc::downgrade(&shared));
        tokio::spawn(postern_common::sqlite::checkpoint_passively(
            pool.clone(),
            move || alive.strong_count() > 0,
            checkpoints,
            "greylist",
            move || {
                if let Some(shared) = asking.upgrade() {
                    shared.restart_wanted.store(true, Ordering::Release);
                    // An idle committer is not woken: with no commits the passive checkpoints
                    // catch up, and the next commit starts the log over by itself.
                }
            },
        ));
        let committer_shared = shared.clone();
        std::thread::Builder::new()
            .name("greylist-commit".into())
            .spawn(move || committer(&writer, &jobs, &committer_shared))
            .map_err(|e| StoreError::Thread(e.to_string()))?;
        Ok(Self {
            pool,
            shared,
            commits,
        })
    }

    /// Waits until every request answered so far is committed, and makes the next request read
    /// what was written meanwhile (by this process's admin commands, or another process).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (reply, done) = oneshot::channel();
        self.commits
            .send(CommitJob::Flush(reply))
            .map_err(|_| StoreError::WorkerGone)?;
        done.await.map_err(|_| StoreError::WorkerGone)
    }

    /// Commits what is answered, then closes the pool (checkpointing the WAL).
    pub async fn close(&self) {
        if let Err(err) = self.flush().await {
            warn!(error = %err, "greylist store closing: answered requests not flushed");
        }
        self.pool.close().await;
    }
}

/// Work for the committer.
#[derive(Debug)]
enum CommitJob {
    /// A window opened, filled up, or waits with a request for its commit: look at it.
    Wake,
    /// One expiry batch, run between two commits so that it never holds the write lock long.
    Expire(ExpireJob),
    /// Answered once everything answered before it is committed.
    Flush(oneshot::Sender<()>),
}

/// One expiry batch: up to `batch` rows of each table last seen before `cutoff`.
#[derive(Debug)]
struct ExpireJob {
    cutoff: u64,
    batch: u32,
    reply: oneshot::Sender<Result<u64, StoreError>>,
}

/// How long a statement waits for a lock another connection holds (a checkpoint, an admin
/// command) before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection of the decider or the committer, set up as the pool's connections are, with a
/// page cache of `cache_size`. Checkpoints copy the WAL into the database file and sync it,
/// which can take milliseconds: they run on the pool's connection (automatic checkpoints off
/// here), never in a commit.
fn open_connection(path: &Path, cache_size: &str) -> Result<rusqlite::Connection, StoreError> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "wal")?;
    conn.pragma_update(None, "synchronous", "normal")?;
    conn.pragma_update(None, "cache_size", cache_size)?;
    conn.pragma_update(None, "wal_autocheckpoint", "0")?;
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)?;
    conn.set_prepared_statement_cache_capacity(16);
    Ok(conn)
}

/// How long the rows of an answered request wait at most for their commit. One commit per
/// batch of about three requests cost a third of the new-triplet rate: each writes the pages it
/// changed into the WAL, one write call per page, and takes and drops the write lock. Gathered
/// over a few milliseconds, the inserts of many requests share their pages and locks. A crash
/// forgets at most this window (plus a commit under way) of first sightings (those senders are
/// greylisted once more), as a power loss with `synchronous = NORMAL` forgets the commits since
/// the last checkpoint.
const COMMIT_WITHIN: Duration = Duration::from_millis(5);
/// Requests in a window that is committed at once, whatever its age: fewer rows per commit
/// would write more log for the same rows (each commit appends every page it touches).
const COMMIT_AFTER_STEPS: usize = 512;
/// Answered requests whose rows may wait for their commit at most. Beyond it (requests
/// faster than the disk, a lock another process holds) a request waits for the committer
/// before it is decided, within the store timeout (then the fallback answer): memory alone
/// never keeps more decisions than this, and a burst is slowed down rather than answered
/// with the fallback.
const MAX_UNCOMMITTED_STEPS: usize = 20_000;
/// How long the decider's read transaction lives at most. One shared by many requests saves
/// a round of file locks per read and, as long as it lives, the page cache it has (SQLite
/// drops a connection's page cache when a transaction begins after another connection
/// committed); a checkpoint that restarts the log waits for it to end.
const SNAPSHOT_WITHIN: Duration = Duration::from_millis(25);

/// The reading connection and what the decisions made since the last commit left.
#[derive(Debug)]
struct Decider {
    conn: rusqlite::Connection,
    /// Rows of answered requests that wait for the committer.
    window: Window,
    /// The number of the newest window opened.
    last_window: u64,
    /// Whether requests are answered before their rows are committed: cleared by a failed
    /// commit, set again by the next one that succeeds (see [`commit_window`]).
    answer_first: bool,
    /// The read transaction open on `conn`, if any.
    snapshot: Option<Snapshot>,
    /// A cache generation waits for a snapshot that sees a newer commit.
    refresh: bool,
}

/// A read transaction of the decider.
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    began: Instant,
    /// Every window up to this one is committed in what it reads.
    sees: u64,
}

/// Changed rows of answered requests, committed together.
#[derive(Debug, Default)]
struct Window {
    /// Its number; windows are committed in order.
    number: u64,
    rows: WriteRows,
    /// The requests that changed them.
    steps: usize,
    opened: Option<Instant>,
    /// Requests answered only once the window is committed (after a failed commit).
    waiters: Vec<oneshot::Sender<Result<(), String>>>,
}

/// How a request is answered.
#[derive(Debug)]
enum Decided {
    /// Not decided: too many answered requests wait for their commit.
    Behind(usize),
    /// At once.
    Now(StepOutcome),
    /// Once its window is committed.
    AfterCommit(StepOutcome, oneshot::Receiver<Result<(), String>>),
}

impl Decider {
    /// The newest window whose rows a read on this connection may miss no longer: a cached
    /// row of an older window can be dropped, since a read finds it in the database.
    fn sees(&self, done: &AtomicU64) -> u64 {
        self.snapshot
            .map_or_else(|| done.load(Ordering::Acquire), |snapshot| snapshot.sees)
    }

    /// Begins the read transaction that requests share, unless one is open.
    ///
    /// Reads outside a transaction would each be a transaction of their own, and each takes
    /// and drops its read lock with a round of file locks (about four fcntl calls, more than a
    /// microsecond each). The write lock is never taken here: the committer's connection is
    /// the only one of this process that writes, and what it writes is cached until a snapshot
    /// sees it. A change another process makes meanwhile (an admin `delete`) can be
    /// overwritten, as with a cached row.
    fn begin_reads(&mut self, done: &AtomicU64) -> Result<(), rusqlite::Error> {
        if self.conn.is_autocommit() {
            // Loaded before the transaction begins: it sees at least these windows.
            let sees = done.load(Ordering::Acquire);
            self.conn.prepare_cached("BEGIN DEFERRED")?.execute([])?;
            self.snapshot = Some(Snapshot {
                began: Instant::now(),
                sees,
            });
        }
        Ok(())
    }

    /// Ends the read transaction, if one is open.
    fn end_reads(&mut self) {
        self.snapshot = None;
        if self.conn.is_autocommit() {
            return;
        }
        let ended = self
            .conn
            .prepare_cached("COMMIT")
            .and_then(|mut commit| commit.execute([]));
        if ended.is_err() && !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    /// A step's rows: those the cache holds (`Some`), and the others read.
    fn rows_of(
        &mut self,
        step: &GreylistStep,
        cached_triplet: Option<Option<(TripletTimes, bool)>>,
        cached_client: Option<Option<ClientCount>>,
        done: &AtomicU64,
    ) -> rusqlite::Result<StepRows> {
        if cached_triplet.is_none() || cached_client.is_none() {
            self.begin_reads(done)?;
        }
        Ok(StepRows {
            triplet: match cached_triplet {
                Some(row) => row,
                None => read_triplet(&self.conn, &step.triplet_key)?,
            },
            client: match cached_client {
                Some(row) => row,
                None => read_client(&self.conn, &step.awl_key)?,
            },
        })
    }

    /// Adds a request's changed rows to the open window (opening one if none is), and returns
    /// the window's number.
    fn add_to_window(&mut self, rows: WriteRows, commits: &sync_mpsc::Sender<CommitJob>) -> u64 {
        let window = &mut self.window;
        if window.opened.is_none() {
            self.last_window += 1;
            window.number = self.last_window;
            window.opened = Some(Instant::now());
            let _ = commits.send(CommitJob::Wake);
        }
        window.rows.append(rows);
        window.steps += 1;
        if window.steps == COMMIT_AFTER_STEPS {
            let _ = commits.send(CommitJob::Wake);
        }
        window.number
    }
}

impl Shared {
    /// Whether a read transaction begun now would see a window newer than `sees`.
    fn fresher_than(&self, sees: u64) -> bool {
        self.done.load(Ordering::Acquire) > sees
    }

    /// Decides one request the cache could not answer alone: reads what the cache lacks,
    /// applies the rules, caches the rows, and queues the changed ones for the committer.
    ///
    /// While commits succeed, a request is answered as soon as it is decided, and the requests
    /// after it decide on the cached rows, whether or not its commit is done. Once a commit
    /// fails, requests are answered only when their window is committed, so that while the
    /// database cannot be written every request gets the fallback answer (the store error)
    /// rather than a decision that is not stored.
    fn decide_one(
        &self,
        step: &GreylistStep,
        commits: &sync_mpsc::Sender<CommitJob>,
    ) -> Result<Decided, StoreError> {
        let mut decider = self.decider.lock();
        let uncommitted = decider.window.steps + self.committing.load(Ordering::Acquire);
        if uncommitted >= MAX_UNCOMMITTED_STEPS {
            return Ok(Decided::Behind(uncommitted));
        }
        // Caught up once half the room is free again, not at every commit that frees some.
        if uncommitted < MAX_UNCOMMITTED_STEPS / 2
            && self.behind.load(Ordering::Relaxed)
            && self.behind.swap(false, Ordering::AcqRel)
        {
            info!(uncommitted, "greylist commits caught up");
        }
        if decider.refresh
            || decider.snapshot.is_some_and(|snapshot| {
                snapshot.began.elapsed() >= SNAPSHOT_WITHIN
                    || self.restarting.load(Ordering::Acquire)
            })
        {
            decider.refresh = false;
            decider.end_reads();
        }
        let (triplet, client) = {
            let cache = lock(&self.cache);
            let client = if step.awl_threshold > 0 {
                cache.clients.get(&step.awl_key)
            } else {
                Some(None)
            };
            (cache.triplets.get(&step.triplet_key), client)
        };
        let stored = decider
            .rows_of(step, triplet, client, &self.done)
            .map_err(|err| {
                // Nothing was written: what the cache holds stays right.
                decider.end_reads();
                warn!(error = %err, "greylist read failed");
                StoreError::Batch(err.to_string())
            })?;
        let sees = decider.sees(&self.done);
        let Decision {
            outcome,
            write,
            rows,
        } = decide(step, stored);
        let wrote = !write.is_empty();
        let window = if wrote {
            decider.add_to_window(write, commits)
        } else {
            decider.last_window
        };
        let kept = lock(&self.cache).keep(step, rows, window, sees);
        decider.refresh |= kept && self.fresher_than(sees);
        if !wrote {
            if decider.window.opened.is_none() {
                // Nothing waits for a commit that would end it.
                decider.end_reads();
            }
            return Ok(Decided::Now(outcome));
        }
        if decider.answer_first {
            return Ok(Decided::Now(outcome));
        }
        let (reply, committed) = oneshot::channel();
        decider.window.waiters.push(reply);
        let _ = commits.send(CommitJob::Wake);
        Ok(Decided::AfterCommit(outcome, committed))
    }
}

/// Commits windows as they come due, and runs expiry steps and flushes between them; ends when
/// every handle of the store is dropped (committing what is left). Runs on its own thread:
/// while it commits, requests are decided and answered.
fn committer(conn: &rusqlite::Connection, jobs: &sync_mpsc::Receiver<CommitJob>, shared: &Shared) {
    let mut due: Option<Instant> = None;
    let mut expiries = Vec::new();
    let mut flushes = Vec::new();
    loop {
        let job = match due {
            Some(due) => jobs.recv_timeout(due.saturating_duration_since(Instant::now())),
            None => jobs.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let closing = match job {
            Ok(job) => {
                sort(job, &mut expiries, &mut flushes);
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        while let Ok(job) = jobs.try_recv() {
            sort(job, &mut expiries, &mut flushes);
        }
        // Answered rows are written before any flush is answered and before the rows they may
        // expire are deleted.
        let now = closing || !expiries.is_empty() || !flushes.is_empty();
        let (taken, next_due) = take_due_window(shared, now);
        due = next_due;
        if let Some(window) = taken {
            commit_window(conn, shared, window);
            shared.committing.store(0, Ordering::Release);
            shared.committed.notify_waiters();
            if shared.restart_wanted.swap(false, Ordering::AcqRel) {
                shared.restarting.store(true, Ordering::Release);
                restart_log(conn);
                shared.restarting.store(false, Ordering::Release);
            }
            // Looked at again at once: the next window may be due already, or none is open
            // and the decider's snapshot can end.
            due = Some(Instant::now());
        }
        for ExpireJob {
            cutoff,
            batch,
            reply,
        } in expiries.drain(..)
        {
            let expired = expire_batch(conn, cutoff, batch);
            // Rows last seen before the cutoff may be cached (a client read for its AWL
            // count); they are gone from the database now, and the next read must see it.
            let mut decider = shared.decider.lock();
            lock(&shared.cache).forget_older_than(cutoff);
            decider.end_reads();
            drop(decider);
            let _ = reply.send(expired);
        }
        if !flushes.is_empty() {
            shared.decider.lock().end_reads();
            for reply in flushes.drain(..) {
                let _ = reply.send(());
            }
        }
        if closing {
            break;
        }
    }
}

fn sort(job: CommitJob, expiries: &mut Vec<ExpireJob>, flushes: &mut Vec<oneshot::Sender<()>>) {
    match job {
        CommitJob::Wake => {}
        CommitJob::Expire(expire) => expiries.push(expire),
        CommitJob::Flush(reply) => flushes.push(reply),
    }
}

/// Takes the open window if it is due (or `now`), ending the decider's read transaction when no
/// window is left open; otherwise returns when it will be due.
fn take_due_window(shared: &Shared, now: bool) -> (Option<Window>, Option<Instant>) {
    let mut decider = shared.decider.lock();
    let Some(opened) = decider.window.opened else {
        // Nothing waits for a commit: a snapshot would only hold back checkpoints and hide
        // what another process writes.
        decider.end_reads();
        return (None, None);
    };
    let window = &decider.window;
    if now
        || window.steps >= COMMIT_AFTER_STEPS
        || !window.waiters.is_empty()
        || opened.elapsed() >= COMMIT_WITHIN
    {
        shared.committing.store(window.steps, Ordering::Release);
        (Some(std::mem::take(&mut decider.window)), None)
    } else {
        (None, Some(opened + COMMIT_WITHIN))
    }
}

/// Commits a window. On success its waiting requests are answered and requests are answered
/// first again. On failure what is not committed is forgotten: this window's rows, the rows of
/// the window opened since (its requests were answered too), the whole row cache and the
/// decider's snapshot, so that the next requests decide on the database; the waiting requests
/// get the error, and from then on requests wait for their commit until one succeeds.
fn commit_window(conn: &rusqlite::Connection, shared: &Shared, window: Window) {
    metrics::histogram!("postern_policyd_greylist_commit_requests").record(window.steps as f64);
    match commit_rows(conn, &window.rows) {
        Ok(()) => {
            shared.done.fetch_max(window.number, Ordering::AcqRel);
            if !window.waiters.is_empty() {
                shared.decider.lock().answer_first = true;
            }
            for waiter in window.waiters {
                let _ = waiter.send(Ok(()));
            }
        }
        Err(err) => {
            let message = err.to_string();
            let mut decider = shared.decider.lock();
            let later = std::mem::take(&mut decider.window);
            decider.answer_first = false;
            decider.end_reads();
            lock(&shared.cache).clear();
            shared
                .done
                .fetch_max(window.number.max(later.number), Ordering::AcqRel);
            drop(decider);
            warn!(
                requests = window.steps + later.steps,
                triplets = window.rows.triplets.len() + later.rows.triplets.len(),
                clients = window.rows.clients.len() + later.rows.clients.len(),
                error = %message,
                "greylist commit failed after its requests were answered; their rows are lost, \
                 and requests are answered after their commit until one succeeds"
            );
            for waiter in window.waiters.into_iter().chain(later.waiters) {
                let _ = waiter.send(Err(message.clone()));
            }
        }
    }
}

/// Restarts the log from its beginning, between two commits (see
/// `postern_common::sqlite::checkpoint_passively`): this connection writes back to back, so a
/// checkpoint on another connection would seldom get the write lock. It copies what the
/// passive checkpoints have not and waits at most [`RESTART_BUSY_TIMEOUT`] for the decider's
/// snapshot (at most [`SNAPSHOT_WITHIN`] old) and other readers; while it runs, requests are
/// answered and their rows wait in the next window.
fn restart_log(conn: &rusqlite::Connection) {
    let _ = conn.busy_timeout(RESTART_BUSY_TIMEOUT);
    let checkpoint = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |row| {
        Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?))
    });
    let _ = conn.busy_timeout(BUSY_TIMEOUT);
    match checkpoint {
        Ok((0, _)) => {}
        Ok((_, log_pages)) => {
            debug!(log_pages, "greylist WAL restart postponed: readers busy");
        }
        Err(err) => debug!(error = %err, "greylist WAL restart postponed"),
    }
}

/// Writes a window's rows in one transaction.
fn commit_rows(conn: &rusqlite::Connection, write: &WriteRows) -> Result<(), rusqlite::Error> {
    // IMMEDIATE takes the write lock at once, so a database busy with another connection (a
    // checkpoint, an admin command) is waited for (busy timeout) before anything is written.
    // A transaction dropped before its commit rolls back.
    let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    write_rows(&tx, write)?;
    tx.commit()
}

/// Deletes up to `batch` rows of each table last seen before `cutoff`.
fn expire_batch(conn: &rusqlite::Connection, cutoff: u64, batch: u32) -> Result<u64, StoreError> {
    let mut deleted = 0;
    for sql in [
        "DELETE FROM triplets WHERE key IN (SELECT key FROM triplets WHERE last < ?1 LIMIT ?2)",
        "DELETE FROM clients WHERE key IN (SELECT key FROM clients WHERE last < ?1 LIMIT ?2)",
    ] {
        let rows = conn
            .prepare_cached(sql)?
            .execute((to_i64(cutoff), i64::from(batch)))?;
        deleted += rows as u64;
    }
    Ok(deleted)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Rows the decider read or decided recently: `None` for a key known to be absent. A row
/// decided but not yet committed stays until a read would find it (see [`Generations`]);
/// otherwise the cache is bounded (two generations of about [`CACHE_GENERATION`] keys) and
/// short-lived (a generation lasts [`CACHE_LIFETIME`]): another process's change to the file
/// (`greylist delete`) is seen within two lifetimes.
#[derive(Debug)]
struct RowCache {
    triplets: Generations<Option<(TripletTimes, bool)>>,
    clients: Generations<Option<ClientCount>>,
}

impl Default for RowCache {
    fn default() -> Self {
        Self {
            triplets: Generations::new(),
            clients: Generations::new(),
        }
    }
}

impl RowCache {
    /// Caches a step's rows, decided in `window` (or, when they changed nothing, as of the
    /// newest window): a generation holding rows of a window newer than `sees` is not dropped.
    /// Returns whether one had to be kept beyond its size or time for that.
    fn keep(&mut self, step: &GreylistStep, rows: StepRows, window: u64, sees: u64) -> bool {
        let mut kept = self
            .triplets
            .insert(step.triplet_key.clone(), rows.triplet, window, sees);
        if step.awl_threshold > 0 {
            kept |= self
                .clients
                .insert(step.awl_key.clone(), rows.client, window, sees);
        }
        kept
    }

    fn clear(&mut self) {
        self.triplets.clear();
        self.clients.clear();
    }

    fn forget_older_than(&mut self, cutoff: u64) {
        self.triplets
            .retain(|row| row.is_none_or(|(times, _)| times.last >= cutoff));
        self.clients
            .retain(|row| row.is_none_or(|count| count.last >= cutoff));
    }
}

/// The outcome of a step that changes nothing, from the cache alone: a known triplet seen again
/// in the same second, or an auto-whitelisted client counted less than an hour ago. None when
/// a row is not cached or the step writes (a new triplet, a new second, an AWL count).
///
/// The cache may hold rows of a batch whose commit is still under way. Answering from them is
/// safe: such a row differs from the committed one at most by a last-seen time (or is a new
/// triplet, answered "greylisted"), so the answer is the one the committed state gives.
fn answer_from_cache(cache: &RowCache, step: &GreylistStep) -> Option<StepOutcome> {
    if step.awl_threshold > 0 {
        let client = cache.clients.get(&step.awl_key)?;
        if let Some(count) = client
            && count.count >= step.awl_threshold
        {
            return bump_client(Some(count), step.now)
                .is_none()
                .then_some(StepOutcome::ClientAwl);
        }
    }
    let (times, passed) = cache.triplets.get(&step.triplet_key)??;
    let seen = record_triplet(Some(times), step.now, step.rules);
    let unchanged =
        seen.first == times.first && step.now == times.last && seen.last_was_successful == passed;
    (unchanged && !step.counts_for_awl(seen)).then_some(StepOutcome::Triplet {
        seen,
        client_bumped: None,
    })
}

/// Keys cached per generation.
const CACHE_GENERATION: usize = 4096;
/// How long a generation takes new keys.
const CACHE_LIFETIME: Duration = Duration::from_secs(30);

/// Two maps: new keys go into the current one, which becomes the previous one when it is full
/// or old; the previous one is dropped then. Each remembers the newest window whose rows it
/// holds, and is dropped only once the decider's reads see that window committed: until then
/// a read of one of its keys would find an older row, or none.
#[derive(Debug)]
struct Generations<V> {
    current: HashMap<String, V>,
    previous: HashMap<String, V>,
    started: Instant,
    current_newest: u64,
    previous_newest: u64,
}

impl<V: Clone> Generations<V> {
    fn new() -> Self {
        Self {
            current: HashMap::new(),
            previous: HashMap::new(),
            started: Instant::now(),
            current_newest: 0,
            previous_newest: 0,
        }
    }

    fn get(&self, key: &str) -> Option<V> {
        self.current
            .get(key)
            .or_else(|| self.previous.get(key))
            .cloned()
    }

    /// Inserts a row of `window`; returns whether the previous generation was due to go but
    /// holds a window newer than `sees`, and so stays.
    fn insert(&mut self, key: String, value: V, window: u64, sees: u64) -> bool {
        let mut kept = false;
        if self.current.len() >= CACHE_GENERATION || self.started.elapsed() >= CACHE_LIFETIME {
            if self.previous_newest <= sees {
                // The dropped generation's table is reused: a new one would grow to its
                // size again by rehashing.
                std::mem::swap(&mut self.previous, &mut self.current);
                self.current.clear();
                self.previous_newest = std::mem::take(&mut self.current_newest);
                self.started = Instant::now();
            } else {
                kept = true;
            }
        }
        self.current.insert(key, value);
        self.current_newest = self.current_newest.max(window);
        kept
    }

    fn clear(&mut self) {
        self.current.clear();
        self.previous.clear();
        self.current_newest = 0;
        self.previous_newest = 0;
    }

    fn retain(&mut self, keep: impl Fn(&V) -> bool) {
        self.current.retain(|_, value| keep(value));
        self.previous.retain(|_, value| keep(value));
    }
}

/// A step's rows as they stand: its triplet's and, with the AWL on, its client's; `None` for a
/// row known to be absent.
#[derive(Debug, Clone, Copy)]
struct StepRows {
    triplet: Option<(TripletTimes, bool)>,
    client: Option<ClientCount>,
}

/// The stored row of a triplet, if there is one.
fn read_triplet(
    conn: &rusqlite::Connection,
    key: &str,
) -> rusqlite::Result<Option<(TripletTimes, bool)>> {
    conn.prepare_cached("SELECT first, last, passed FROM triplets WHERE key = ?1")?
        .query_row([key], |row| {
            Ok((
                TripletTimes {
                    first: to_u64(row.get(0)?),
                    last: to_u64(row.get(1)?),
                },
                row.get::<_, i64>(2)? != 0,
            ))
        })
        .optional()
}

/// The stored AWL count of a client, if there is one.
fn read_client(conn: &rusqlite::Connection, key: &str) -> rusqlite::Result<Option<ClientCount>> {
    conn.prepare_cached("SELECT count, last FROM clients WHERE key = ?1")?
        .query_row([key], |row| {
            Ok(ClientCount {
                count: to_u64(row.get(0)?),
                last: to_u64(row.get(1)?),
            })
        })
        .optional()
}

/// Rows to write: `(key, first, last, passed)` and `(key, count, last)`.
#[derive(Debug, Default)]
struct WriteRows {
    triplets: Vec<(String, i64, i64, i64)>,
    clients: Vec<(String, i64, i64)>,
}

impl WriteRows {
    fn is_empty(&self) -> bool {
        self.triplets.is_empty() && self.clients.is_empty()
    }

    /// Adds later rows; written in order, a key's last row is the one that stays.
    fn append(&mut self, later: WriteRows) {
        self.triplets.extend(later.triplets);
        self.clients.extend(later.clients);
    }
}

/// What postgrey's rules make of a step: its outcome, the rows it changed, and its rows as they
/// now stand, for the cache.
#[derive(Debug)]
struct Decision {
    outcome: StepOutcome,
    write: WriteRows,
    rows: StepRows,
}

/// Writes a window's rows (in its transaction).
fn write_rows(tx: &rusqlite::Transaction<'_>, write: &WriteRows) -> Result<(), rusqlite::Error> {
    if !write.triplets.is_empty() {
        let mut upsert = tx.prepare_cached(
            "INSERT INTO triplets (key, first, last, passed) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (key) DO UPDATE SET \
               first = excluded.first, last = excluded.last, passed = excluded.passed",
        )?;
        for row in &write.triplets {
            upsert.execute((&row.0, row.1, row.2, row.3))?;
        }
    }
    if !write.clients.is_empty() {
        let mut upsert = tx.prepare_cached(
            "INSERT INTO clients (key, count, last) VALUES (?1, ?2, ?3) \
             ON CONFLICT (key) DO UPDATE SET count = excluded.count, last = excluded.last",
        )?;
        for row in &write.clients {
            upsert.execute((&row.0, row.1, row.2))?;
        }
    }
    Ok(())
}

/// Applies postgrey's rules ([`record_triplet`], [`bump_client`]) to a step, in memory, on its
/// rows as they stand: exactly [`Store::greylist_step`]'s composition. The caller caches the
/// rows at once (requests answered from the cache alone may see them before the commit; see
/// [`answer_from_cache`]); if the commit fails the cache is cleared.
fn decide(step: &GreylistStep, stored: StepRows) -> Decision {
    let mut rows = stored;
    let mut write = WriteRows::default();
    if step.awl_threshold > 0
        && rows
            .client
            .is_some_and(|count| count.count >= step.awl_threshold)
    {
        count_client(step, &mut rows, &mut write);
        return Decision {
            outcome: StepOutcome::ClientAwl,
            write,
            rows,
        };
    }
    let seen = record_triplet(rows.triplet.map(|(times, _)| times), step.now, step.rules);
    let times = TripletTimes {
        first: seen.first,
        last: step.now,
    };
    let triplet = (times, seen.last_was_successful);
    if stored.triplet != Some(triplet) {
        write.triplets.push((
            step.triplet_key.clone(),
            to_i64(times.first),
            to_i64(times.last),
            i64::from(seen.last_was_successful),
        ));
    }
    rows.triplet = Some(triplet);
    let client_bumped = if step.counts_for_awl(seen) {
        count_client(step, &mut rows, &mut write)
    } else {
        None
    };
    Decision {
        outcome: StepOutcome::Triplet {
            seen,
            client_bumped,
        },
        write,
        rows,
    }
}

/// Counts a delivery for the step's client (at most once an hour, see [`bump_client`]).
fn count_client(
    step: &GreylistStep,
    rows: &mut StepRows,
    write: &mut WriteRows,
) -> Option<ClientCount> {
    let next = bump_client(rows.client, step.now)?;
    rows.client = Some(next);
    write
        .clients
        .push((step.awl_key.clone(), to_i64(next.count), to_i64(next.last)));
    Some(next)
}

impl Store for SqliteStore {
    async fn greylist_step(&self, step: &GreylistStep) -> Result<StepOutcome, StoreError> {
        // Most steps are answered without waiting for anything: a caller that loops on them
        // would otherwise keep its runtime thread from every other task.
        tokio::task::consume_budget().await;
        if let Some(outcome) = answer_from_cache(&lock(&self.shared.cache), step) {
            return Ok(outcome);
        }
        // Waiting for room: registered for the committer's news before looking again, so
        // that a commit done in between is not missed (and not before: registering costs a
        // lock, and nearly every request finds room).
        let mut room: Option<Pin<Box<tokio::sync::futures::Notified<'_>>>> = None;
        loop {
            match self.shared.decide_one(step, &self.commits)? {
                Decided::Now(outcome) => return Ok(outcome),
                Decided::AfterCommit(outcome, committed) => {
                    return match committed.await {
                        Ok(Ok(())) => Ok(outcome),
                        Ok(Err(message)) => Err(StoreError::Batch(message)),
                        Err(_) => Err(StoreError::WorkerGone),
                    };
                }
                Decided::Behind(uncommitted) => {
                    if !self.shared.behind.swap(true, Ordering::AcqRel) {
                        warn!(
                            uncommitted,
                            "greylist commits are not keeping up; requests wait for them"
                        );
                    }
                    match room.take() {
                        Some(registered) => registered.await,
                        None => {
                            let mut registered = Box::pin(self.shared.committed.notified());
                            registered.as_mut().enable();
                            room = Some(registered);
                        }
                    }
                }
            }
        }
    }

    async fn record_triplet(
        &self,
        key: &str,
        now: u64,
        rules: TripletRules,
    ) -> Result<TripletSeen, StoreError> {
        // SET expressions all read the old row, so `passed` is computed from the stored times
        // before they change; the CASE is logic::record_triplet in SQL.
        let row = sqlx::query(
            "INSERT INTO triplets (key, first, last, passed) VALUES (?1, ?2, ?2, 0) \
             ON CONFLICT (key) DO UPDATE SET \
               passed = (last - first >= ?3), \
               first = CASE WHEN last - first >= ?3 THEN MIN(first, ?2) \
                            WHEN ?2 - first > ?4 THEN ?2 \
                            ELSE MIN(first, ?2) END, \
               last = ?2 \
             RETURNING first, passed",
        )
        .bind(key)
        .bind(to_i64(now))
        .bind(to_i64(rules.delay))
        .bind(to_i64(rules.retry_window))
        .fetch_one(&self.pool)
        .await?;
        Ok(TripletSeen {
            first: to_u64(row.try_get(0)?),
            last_was_successful: row.try_get::<i64, _>(1)? != 0,
        })
    }

    async fn client(&self, key: &str) -> Result<Option<ClientCount>, StoreError> {
        let row = sqlx::query("SELECT count, last FROM clients WHERE key = ?1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok(ClientCount {
                count: to_u64(row.try_get(0)?),
                last: to_u64(row.try_get(1)?),
            })
        })
        .transpose()
    }

    async fn bump_client(&self, key: &str, now: u64) -> Result<Option<ClientCount>, StoreError> {
        let row = sqlx::query(
            "INSERT INTO clients (key, count, last) VALUES (?1, 1, ?2) \
             ON CONFLICT (key) DO UPDATE SET count = count + 1, last = ?2 \
               WHERE ?2 >= last + ?3 OR last > ?2 \
             RETURNING count, last",
        )
        .bind(key)
        .bind(to_i64(now))
        .bind(to_i64(AWL_INTERVAL))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(ClientCount {
                count: to_u64(row.try_get(0)?),
                last: to_u64(row.try_get(1)?),
            })
        })
        .transpose()
    }

    async fn expire(&self, cutoff: u64, batch: u32) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.commits
            .send(CommitJob::Expire(ExpireJob {
                cutoff,
                batch,
                reply,
            }))
            .map_err(|_| StoreError::WorkerGone)?;
        answer.await.map_err(|_| StoreError::WorkerGone)?
    }

    async fn list(&self, filter: &str, limit: u64) -> Result<Vec<Entry>, StoreError> {
        // What this process has answered is listed (the admin commands of another process
        // may see it one commit later).
        self.flush().await?;
        let pattern = format!(
            "%{}%",
            filter
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        let rows = sqlx::query(
            "SELECT 0, key, first, last FROM triplets WHERE key LIKE ?1 ESCAPE '\\' \
             UNION ALL SELECT 1, key, count, last FROM clients WHERE key LIKE ?1 ESCAPE '\\' \
             ORDER BY 1, 2 LIMIT ?2",
        )
        .bind(pattern)
        .bind(to_i64(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(Entry {
                    kind: if row.try_get::<i64, _>(0)? == 0 {
                        Kind::Triplet
                    } else {
                        Kind::Client
                    },
                    key: row.try_get(1)?,
                    first_or_count: to_u64(row.try_get(2)?),
                    last: to_u64(row.try_get(3)?),
                })
            })
            .collect()
    }

    async fn delete(&self, kind: Kind, key: &str) -> Result<bool, StoreError> {
        self.flush().await?;
        let sql = match kind {
            Kind::Triplet => "DELETE FROM triplets WHERE key = ?1",
            Kind::Client => "DELETE FROM clients WHERE key = ?1",
        };
        let deleted = sqlx::query(sql)
            .bind(key)
            .execute(&self.pool)
            .await?
            .rows_affected()
            > 0;
        // The writer's read window may predate the delete: ended, so the next request sees it.
        self.flush().await?;
        Ok(deleted)
    }

    async fn stats(&self, delay: u64) -> Result<Stats, StoreError> {
        self.flush().await?;
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM triplets), \
                    (SELECT COUNT(*) FROM triplets WHERE last - first >= ?1), \
                    (SELECT COUNT(*) FROM clients)",
        )
        .bind(to_i64(delay))
        .fetch_one(&self.pool)
        .await?;
        Ok(Stats {
            triplets: to_u64(row.try_get(0)?),
            passed: to_u64(row.try_get(1)?),
            clients: to_u64(row.try_get(2)?),
        })
    }

    async fn import(&self, entries: &[Entry]) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Bulk loads (a postgrey database of millions of triplets) want the B-tree's upper
        // levels cached; the pool's connection is otherwise kept small.
        sqlx::query("PRAGMA cache_size = -16000")
            .execute(&mut *tx)
            .await?;
        for entry in entries {
            let sql = match entry.kind {
                Kind::Triplet => {
                    "INSERT OR REPLACE INTO triplets (key, first, last, passed) VALUES (?1, ?2, ?3, 0)"
                }
                Kind::Client => {
                    "INSERT OR REPLACE INTO clients (key, count, last) VALUES (?1, ?2, ?3)"
                }
            };
            sqlx::query(sql)
                .bind(&entry.key)
                .bind(to_i64(entry.first_or_count))
                .bind(to_i64(entry.last))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        // The writer's read window may predate the import: ended, so the next request sees it.
        self.flush().await?;
        Ok(entries.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::super::store::MemoryStore;
    use super::*;

    fn step(triplet: &str, client: &str, now: u64, awl_threshold: u64) -> GreylistStep {
        GreylistStep {
            awl_key: client.to_owned(),
            triplet_key: triplet.to_owned(),
            now,
            rules: RULES,
            awl_threshold,
        }
    }

    /// The decider (and the cache-only answer of a repeated step) gives what the
    /// three-call composition gives on the reference store, for every state a triplet and its
    /// client can be in.
    #[tokio::test]
    async fn decisions_match_the_composition_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = SqliteStore::open(&dir.path().join("g.sqlite"))
            .await
            .unwrap();
        let memory = MemoryStore::default();
        let times = [0u64, 299, 300, 301, 3600, 2 * 86_400 + 1, 3 * 86_400];
        let mut n = 0;
        for &first in &times {
            for &last in times.iter().filter(|&&l| l >= first) {
                for count in [None, Some(1u64), Some(4), Some(5), Some(9)] {
                    for &now in &times {
                        for threshold in [0, 5] {
                            n += 1;
                            let (triplet, client) = (format!("t{n}"), format!("c{n}"));
                            let mut entries = vec![Entry {
                                kind: Kind::Triplet,
                                key: triplet.clone(),
                                first_or_count: first,
                                last,
                            }];
                            if let Some(count) = count {
                                entries.push(Entry {
                                    kind: Kind::Client,
                                    key: client.clone(),
                                    first_or_count: count,
                                    last: first,
                                });
                            }
                            sqlite.import(&entries).await.unwrap();
                            memory.import(&entries).await.unwrap();
                            let step = step(&triplet, &client, now, threshold);
                            // The second time in the same second, most steps are answered
                            // from the cache alone.
                            for _ in 0..2 {
                                let got = sqlite.greylist_step(&step).await.unwrap();
                                let want = memory.greylist_step(&step).await.unwrap();
                                assert_eq!(got, want, "{step:?} count={count:?} last={last}");
                            }
                            assert_eq!(
                                sqlite.list(&client, 10).await.unwrap(),
                                memory.list(&client, 10).await.unwrap(),
                                "{step:?}"
                            );
                        }
                    }
                }
            }
        }
        let fresh = step("fresh", "new-client", 42, 5);
        assert_eq!(
            sqlite.greylist_step(&fresh).await.unwrap(),
            StepOutcome::Triplet {
                seen: TripletSeen {
                    first: 42,
                    last_was_successful: false
                },
                client_bumped: None
            }
        );
    }

    /// A known triplet seen again in the same second, and an auto-whitelisted client counted
    /// within the hour, are answered from the cache without the worker; anything that writes
    /// is not.
    #[tokio::test]
    async fn steps_that_change_nothing_are_answered_from_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = SqliteStore::open(&dir.path().join("g.sqlite"))
            .await
            .unwrap();
        let first = step("t", "c", 1000, 5);
        assert_eq!(
            answer_from_cache(&lock(&sqlite.shared.cache), &first),
            None,
            "not cached"
        );
        let outcome = sqlite.greylist_step(&first).await.unwrap();
        assert_eq!(
            answer_from_cache(&lock(&sqlite.shared.cache), &first),
            Some(outcome),
            "same triplet, same second"
        );
        let later = step("t", "c", 1001, 5);
        assert_eq!(
            answer_from_cache(&lock(&sqlite.shared.cache), &later),
            None,
            "last seen moves"
        );
        sqlite
            .import(&[Entry {
                kind: Kind::Client,
                key: "awl".into(),
                first_or_count: 7,
                last: 5000,
            }])
            .await
            .unwrap();
        let whitelisted = step("t2", "awl", 5100, 5);
        assert_eq!(
            sqlite.greylist_step(&whitelisted).await.unwrap(),
            StepOutcome::ClientAwl
        );
        assert_eq!(
            answer_from_cache(&lock(&sqlite.shared.cache), &step("t3", "awl", 5200, 5)),
            Some(StepOutcome::ClientAwl),
            "counted less than an hour ago"
        );
        assert_eq!(
            answer_from_cache(
                &lock(&sqlite.shared.cache),
                &step("t3", "awl", 5000 + 3600, 5)
            ),
            None,
            "an hour later the count is refreshed"
        );
    }

    /// Requests never checkpoint (the committer's auto-checkpoint is off); the background task
    /// copies the WAL into the database file.
    #[tokio::test]
    async fn the_wal_is_checkpointed_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let size = |path: &Path| std::fs::metadata(path).unwrap().len();
        let write = |store: SqliteStore| async move {
            for i in 0..3000 {
                let key = format!("10.0.0.0/sender{i}@example.com/rcpt{i}@example.net");
                store
                    .greylist_step(&step(&key, "c", 1000, 5))
                    .await
                    .unwrap();
            }
        };
        let path = dir.path().join("quiet.sqlite");
        let sqlite = SqliteStore::open_checkpointing(
            &path,
            Checkpoints {
                interval: Duration::from_secs(3600),
                ..Checkpoints::default()
            },
        )
        .await
        .unwrap();
        let empty = size(&path);
        write(sqlite.clone()).await;
        assert_eq!(size(&path), empty, "a request checkpointed");
        drop(sqlite);

        let path = dir.path().join("g.sqlite");
        let sqlite = SqliteStore::open(&path).await.unwrap();
        write(sqlite.clone()).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while size(&path) < empty + 65_536 {
            assert!(std::time::Instant::now() < deadline, "no checkpoint in 5 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(sqlite);
    }

    /// Under a steady stream of new triplets (no quiet moment for passive checkpoints to catch
    /// up), the log is restarted and stays bounded; without the restarts it grows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_stays_bounded_under_steady_writes() {
        const WRITERS: usize = 8;
        const STEPS_EACH: usize = 24_000;
        /// The bound: the restart threshold (1 MiB) plus what a few checkpoint intervals add
        /// (every commit appends its pages again: about 2.5 MiB per 100 ms here).
        const BOUND: u64 = 12 << 20;
        async fn largest_wal(checkpoints: Checkpoints, name: &str) -> u64 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(name);
            let wal = path.with_extension("sqlite-wal");
            let sqlite = SqliteStore::open_checkpointing(&path, checkpoints)
                .await
                .unwrap();
            let writers: Vec<_> = (0..WRITERS)
                .map(|w| {
                    let sqlite = sqlite.clone();
                    tokio::spawn(async move {
                        for i in 0..STEPS_EACH {
                            let key = format!("10.{w}.0.0/s{i}@example.com/r{i}@example.net");
                            sqlite
                                .greylist_step(&step(&key, "c", 1000, 0))
                                .await
                                .unwrap();
                        }
                    })
                })
                .collect();
            let mut largest = 0;
            while !writers.iter().all(|w| w.is_finished()) {
                largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            for writer in writers {
                writer.await.unwrap();
            }
            largest
        }
        let interval = Duration::from_millis(100);
        let unbounded = largest_wal(
            Checkpoints {
                interval,
                restart_above_pages: i64::MAX,
            },
            "passive-only.sqlite",
        )
        .await;
        assert!(
            unbounded > 2 * BOUND,
            "the load is too light to show anything: {unbounded} bytes of log without restarts"
        );
        let bounded = largest_wal(
            Checkpoints {
                interval,
                restart_above_pages: 256,
            },
            "restarted.sqlite",
        )
        .await;
        assert!(
            bounded < BOUND,
            "the log reached {bounded} bytes (without restarts: {unbounded})"
        );
    }

    /// Expiry steps interleave with a steady stream of requests, including batches that
    /// change nothing (cached triplets seen again in the same second), and all complete.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn expiry_completes_under_steady_load() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = SqliteStore::open(&dir.path().join("g.sqlite"))
            .await
            .unwrap();
        let old: Vec<Entry> = (0..5000)
            .map(|i| Entry {
                kind: Kind::Triplet,
                key: format!("old{i}"),
                first_or_count: 10,
                last: 10,
            })
            .collect();
        sqlite.import(&old).await.unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut load = tokio::task::JoinSet::new();
        for task in 0..8 {
            let (store, stop) = (sqlite.clone(), stop.clone());
            load.spawn(async move {
                let mut served = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && served < 1_000_000 {
                    let key = format!("hot{task}-{}", served % 4);
                    store
                        .greylist_step(&step(&key, "c", 5000, 5))
                        .await
                        .unwrap();
                    served += 1;
                }
                served
            });
        }
        let mut expired = 0;
        let expiry = async {
            for _ in 0..1000 {
                match sqlite.expire(1000, 100).await.unwrap() {
                    0 => break,
                    n => expired += n,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), expiry)
            .await
            .expect("expiry starved by the load");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let served: u64 = load.join_all().await.into_iter().sum();
        assert_eq!(expired, 5000);
        assert!(served > 0);
    }

    /// A read that fails fails its request (the caller answers with its fallback action), and
    /// the store recovers once the database works again.
    #[tokio::test]
    async fn a_failed_read_is_reported_and_the_store_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = SqliteStore::open(&dir.path().join("g.sqlite"))
            .await
            .unwrap();
        let first = step("t1", "c1", 1000, 5);
        assert!(sqlite.greylist_step(&first).await.is_ok());
        sqlite.flush().await.unwrap();
        sqlx::query("ALTER TABLE triplets RENAME TO moved")
            .execute(&sqlite.pool)
            .await
            .unwrap();
        let err = sqlite
            .greylist_step(&step("t2", "c2", 1000, 5))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Batch(ref m) if m.contains("triplets")),
            "{err}"
        );
        sqlx::query("ALTER TABLE moved RENAME TO triplets")
            .execute(&sqlite.pool)
            .await
            .unwrap();
        // t1 is still known (a failed read changes nothing): a retry, not new.
        let again = sqlite
            .greylist_step(&step("t1", "c1", 1400, 5))
            .await
            .unwrap();
        assert_eq!(
            again,
            StepOutcome::Triplet {
                seen: TripletSeen {
                    first: 1000,
                    last_was_successful: false
                },
                client_bumped: Some(ClientCount {
                    count: 1,
                    last: 1400
                })
            }
        );
    }

    /// A commit that fails after its batch was answered loses that batch's rows (logged, and
    /// the cache forgets them); from then on requests are answered after their commit, so
    /// while writes fail each one gets the error (and the caller its fallback action), until
    /// a commit succeeds.
    #[tokio::test]
    async fn after_a_failed_commit_requests_wait_for_their_commit_until_one_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = SqliteStore::open(&dir.path().join("g.sqlite"))
            .await
            .unwrap();
        let new_at = |first| StepOutcome::Triplet {
            seen: TripletSeen {
                first,
                last_was_successful: false,
            },
            client_bumped: None,
        };
        sqlx::query(
            "CREATE TRIGGER full BEFORE INSERT ON triplets BEGIN SELECT RAISE(ABORT, 'disk full'); END",
        )
        .execute(&sqlite.pool)
        .await
        .unwrap();
        // Answered before its commit, which fails.
        let lost = sqlite.greylist_step(&step("t1", "c1", 1000, 0)).await;
        assert_eq!(lost.unwrap(), new_at(1000));
        sqlite.flush().await.unwrap();
        // Now answered after the commit: the error.
        let err = sqlite
            .greylist_step(&step("t2", "c2", 1000, 0))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Batch(ref m) if m.contains("disk full")),
            "{err}"
        );
        sqlx::query("DROP TRIGGER full")
            .execute(&sqlite.pool)
            .await
            .unwrap();
        // t1 was not stored and is not cached: new again. This commit succeeds.
        let again = sqlite.greylist_step(&step("t1", "c1", 1100, 0)).await;
        assert_eq!(again.unwrap(), new_at(1100));
        assert_eq!(sqlite.stats(300).await.unwrap().triplets, 1);
        // Answered first again.
        sqlite
            .greylist_step(&step("t3", "c3", 1100, 0))
            .await
            .unwrap();
        let stored = sqlite.list("t", 10).await.unwrap();
        let keys: Vec<&str> = stored.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["t1", "t3"]);
    }

    /// Another connection that holds the write lock, as a long checkpoint or a slow disk would
    /// hold up a commit.
    fn hold_write_lock(path: &Path) -> rusqlite::Connection {
        let holder = rusqlite::Connection::open(path).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        holder
    }

    /// While a commit waits for the write lock, requests are decided and answered all the same,
    /// their rows stay known however many keys come after them, and they are written once the
    /// lock is free.
    #[tokio::test]
    async fn answers_do_not_wait_for_a_stalled_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sqlite");
        let sqlite = SqliteStore::open(&path).await.unwrap();
        let holder = hold_write_lock(&path);
        let seen_first_at_1000 = StepOutcome::Triplet {
            seen: TripletSeen {
                first: 1000,
                last_was_successful: false,
            },
            client_bumped: None,
        };
        let started = std::time::Instant::now();
        // Over two cache generations of keys, so that the first ones would have been dropped
        // from the cache had they been committed.
        let keys = 2 * CACHE_GENERATION + 10;
        for i in 0..keys {
            let outcome = sqlite
                .greylist_step(&step(&format!("t{i}"), "c", 1000, 0))
                .await
                .unwrap();
            assert_eq!(outcome, seen_first_at_1000);
        }
        assert!(
            started.elapsed() < BUSY_TIMEOUT / 2,
            "answers waited for the commit: {:?}",
            started.elapsed()
        );
        // The first key is still known, though nothing is committed yet: a retry.
        let retry = sqlite
            .greylist_step(&step("t0", "c", 1400, 0))
            .await
            .unwrap();
        assert_eq!(retry, seen_first_at_1000);
        let committed = || {
            rusqlite::Connection::open(&path)
                .unwrap()
                .query_row("SELECT COUNT(*) FROM triplets", [], |row| {
                    row.get::<_, i64>(0)
                })
                .unwrap()
        };
        assert_eq!(committed(), 0, "written through the held lock");
        holder.execute_batch("ROLLBACK").unwrap();
        sqlite.flush().await.unwrap();
        assert_eq!(committed(), i64::try_from(keys).unwrap());
        assert_eq!(sqlite.list("t0", 1).await.unwrap()[0].last, 1400);
    }

    /// When the rows of too many answered requests wait for their commit, the next request
    /// waits for the committer before it is decided, then is answered.
    #[tokio::test]
    async fn too_many_uncommitted_requests_wait_for_the_committer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sqlite");
        let sqlite = SqliteStore::open(&path).await.unwrap();
        let holder = hold_write_lock(&path);
        for i in 0..MAX_UNCOMMITTED_STEPS {
            sqlite
                .greylist_step(&step(&format!("t{i}"), "c", 1000, 0))
                .await
                .unwrap();
        }
        let waiting = {
            let sqlite = sqlite.clone();
            tokio::spawn(async move { sqlite.greylist_step(&step("one-more", "c", 1000, 0)).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "answered before there was room");
        assert!(sqlite.shared.behind.load(Ordering::Acquire));
        holder.execute_batch("ROLLBACK").unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("still waiting once the commits went through")
            .unwrap()
            .unwrap();
        assert!(
            matches!(outcome, StepOutcome::Triplet { seen, .. } if seen.first == 1000),
            "{outcome:?}"
        );
        sqlite.flush().await.unwrap();
        assert_eq!(
            sqlite.stats(300).await.unwrap().triplets,
            u64::try_from(MAX_UNCOMMITTED_STEPS).unwrap() + 1
        );
        sqlite
            .greylist_step(&step("after", "c", 1000, 0))
            .await
            .unwrap();
        assert!(!sqlite.shared.behind.load(Ordering::Acquire), "caught up");
    }

    /// An answered request's rows reach the database within the commit window by themselves,
    /// with no flush and no later request.
    #[tokio::test]
    async fn answered_rows_are_committed_within_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sqlite");
        let sqlite = SqliteStore::open(&path).await.unwrap();
        sqlite
            .greylist_step(&step("t1", "c1", 1000, 0))
            .await
            .unwrap();
        let answered = std::time::Instant::now();
        let other_process = rusqlite::Connection::open(&path).unwrap();
        let stored = || {
            other_process
                .query_row(
                    "SELECT COUNT(*) FROM triplets WHERE key = 't1'",
                    [],
                    |row| row.get::<_, i64>(0),
                )
                .unwrap()
        };
        while stored() == 0 {
            assert!(
                answered.elapsed() < Duration::from_secs(2),
                "not committed 2 s after its answer"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(answered.elapsed() < COMMIT_WITHIN * 20);
        drop(sqlite);
    }

    /// The requests of a commit window share one read transaction; it ends once the window is
    /// committed and no other is open, so what another process wrote meanwhile is seen by the
    /// requests after it.
    #[tokio::test]
    async fn the_shared_read_transaction_ends_with_its_window() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sqlite");
        let sqlite = SqliteStore::open(&path).await.unwrap();
        // Opens a window: its rows wait for their commit, its reads' transaction stays open.
        sqlite
            .greylist_step(&step("t1", "c1", 1000, 5))
            .await
            .unwrap();
        let other_process = rusqlite::Connection::open(&path).unwrap();
        other_process
            .execute(
                "INSERT INTO clients (key, count, last) VALUES ('awl', 7, 1000)",
                [],
            )
            .unwrap();
        tokio::time::sleep(COMMIT_WITHIN * 10).await;
        assert_eq!(
            sqlite
                .greylist_step(&step("t2", "awl", 1100, 5))
                .await
                .unwrap(),
            StepOutcome::ClientAwl,
            "a read after the window saw the old snapshot"
        );
        drop(sqlite);
    }

    /// Many requests at once: each gets its own triplet's answer, and requests for one triplet
    /// are serialised (never two "first seen").
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_are_serialised() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = SqliteStore::open(&dir.path().join("g.sqlite"))
            .await
            .unwrap();
        // Client c0 is auto-whitelisted; triplets t0..t99 were first seen at 1000.
        let mut entries = vec![Entry {
            kind: Kind::Client,
            key: "c0".into(),
            first_or_count: 5,
            last: 1000,
        }];
        entries.extend((0..100).map(|i| Entry {
            kind: Kind::Triplet,
            key: format!("t{i}"),
            first_or_count: 1000,
            last: 1000,
        }));
        sqlite.import(&entries).await.unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..400u64 {
            let store = sqlite.clone();
            tasks.spawn(async move {
                // t0..t99 retried after the delay, n0..n99 new, c0's mail, and 100 requests
                // for the single triplet "same" in one second.
                let step = match i / 100 {
                    0 => step(&format!("t{i}"), &format!("c{}", i + 1), 1400, 5),
                    1 => step(&format!("n{i}"), &format!("c{}", i + 1), 1400, 5),
                    2 => step(&format!("x{i}"), "c0", 1400, 5),
                    _ => step("same", "c-same", 2300, 5),
                };
                (i, step.clone(), store.greylist_step(&step).await.unwrap())
            });
        }
        let mut same_firsts = std::collections::HashSet::new();
        while let Some(joined) = tasks.join_next().await {
            let (i, step, outcome) = joined.unwrap();
            match i / 100 {
                0 => assert_eq!(
                    outcome,
                    StepOutcome::Triplet {
                        seen: TripletSeen {
                            first: 1000,
                            last_was_successful: false
                        },
                        client_bumped: Some(ClientCount {
                            count: 1,
                            last: 1400
                        })
                    },
                    "{step:?}"
                ),
                1 => assert_eq!(
                    outcome,
                    StepOutcome::Triplet {
                        seen: TripletSeen {
                            first: 1400,
                            last_was_successful: false
                        },
                        client_bumped: None
                    },
                    "{step:?}"
                ),
                2 => assert_eq!(outcome, StepOutcome::ClientAwl, "{step:?}"),
                _ => {
                    let StepOutcome::Triplet { seen, .. } = outcome else {
                        panic!("{step:?}: {outcome:?}");
                    };
                    same_firsts.insert(seen.first);
                }
            }
        }
        assert_eq!(same_firsts.into_iter().collect::<Vec<_>>(), [2300]);
        let same = sqlite.list("same", 10).await.unwrap();
        assert_eq!(
            same,
            [Entry {
                kind: Kind::Triplet,
                key: "same".into(),
                first_or_count: 2300,
                last: 2300
            }]
        );
        let stats = sqlite.stats(300).await.unwrap();
        assert_eq!(
            stats.triplets,
            100 + 100 + 1,
            "t*, n*, same (c0 records none)"
        );
        assert_eq!(stats.passed, 100, "t* passed");
        assert_eq!(stats.clients, 101, "c0 and the hundred c1..c100 of t*");
    }

    const RULES: TripletRules = TripletRules {
        delay: 300,
        retry_window: 2 * 86_400,
    };

    #[tokio::test]
    async fn sql_rules_match_the_pure_rules() {
        use super::super::logic::{TripletTimes, record_triplet};
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("g.sqlite"))
            .await
            .unwrap();
        // Walk a grid of (stored first, stored last, now) and compare with logic.rs.
        let times = [
            0u64,
            100,
            299,
            300,
            301,
            1000,
            2 * 86_400,
            2 * 86_400 + 1,
            3 * 86_400,
        ];
        let mut n = 0;
        for &first in &times {
            for &last in times.iter().filter(|&&l| l >= first) {
                for &now in &times {
                    n += 1;
                    let key = format!("k{n}");
                    store
                        .import(&[Entry {
                            kind: Kind::Triplet,
                            key: key.clone(),
                            first_or_count: first,
                            last,
                        }])
                        .await
                        .unwrap();
                    let got = store.record_triplet(&key, now, RULES).await.unwrap();
                    let want = record_triplet(Some(TripletTimes { first, last }), now, RULES);
                    assert_eq!(got, want, "first={first} last={last} now={now}");
                }
            }
        }
        let new = store.record_triplet("fresh", 42, RULES).await.unwrap();
        assert_eq!(new.first, 42);
        assert!(!new.last_was_successful);
    }

    #[tokio::test]
    async fn clients_expiry_list_delete_stats() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sqlite");
        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(
            store
                .bump_client("192.0.2.1", 1000)
                .await
                .unwrap()
                .unwrap()
                .count,
            1
        );
        assert_eq!(store.bump_client("192.0.2.1", 2000).await.unwrap(), None);
        assert_eq!(
            store.bump_client("192.0.2.1", 4600).await.unwrap(),
            Some(ClientCount {
                count: 2,
                last: 4600
            })
        );
        assert_eq!(store.client("192.0.2.1").await.unwrap().unwrap().count, 2);
        assert_eq!(store.client("192.0.2.2").await.unwrap(), None);
        for i in 0..25u64 {
            store
                .record_triplet(&format!("10.0.0.0/s{i}@x/r@y"), 100 + i, RULES)
                .await
                .unwrap();
        }
        store
            .record_triplet("10.0.0.0/s0@x/r@y", 1000, RULES)
            .await
            .unwrap();
        let stats = store.stats(300).await.unwrap();
        assert_eq!(
            stats,
            Stats {
                triplets: 25,
                passed: 1,
                clients: 1
            }
        );
        let listed = store.list("s1", 100).await.unwrap();
        assert_eq!(listed.len(), 11, "s1 and s10..s19");
        assert!(listed.iter().all(|e| e.kind == Kind::Triplet));
        assert_eq!(
            store.list("%", 100).await.unwrap().len(),
            0,
            "LIKE is escaped"
        );
        // Expire everything last seen before 120 in batches of 7: 20 rows, 3 batches.
        let mut rounds = 0;
        let mut total = 0;
        loop {
            let n = store.expire(120, 7).await.unwrap();
            total += n;
            rounds += 1;
            if n == 0 || rounds > 10 {
                break;
            }
        }
        assert_eq!(total, 19, "s0 was seen again at 1000");
        assert_eq!(rounds, 4);
        assert!(store.delete(Kind::Client, "192.0.2.1").await.unwrap());
        assert_eq!(store.stats(300).await.unwrap().clients, 0);
        store.close().await;
        // Reopening keeps the data, in WAL mode.
        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(store.stats(300).await.unwrap().triplets, 6);
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
    }
}
