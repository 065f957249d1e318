//! The embedded store: one SQLite file in WAL mode. Requests are group committed: one thread
//! owns the writing connection, takes every request waiting at that moment, reads the rows the
//! batch needs that its row cache does not hold, applies postgrey's rules to the batch in
//! memory (the pure functions of `logic`), answers each request, and writes the changed rows of
//! the batches answered within a few milliseconds in one transaction (see [`run_batch`] for why
//! the answer comes before the commit, [`COMMIT_WITHIN`] for the window, and what happens when
//! a commit fails). An idle store answers a lone request at once. Expiry deletes in small
//! indexed batches between transactions.
//!
//! The writing connection is rusqlite's, on a thread of its own, not an sqlx connection: sqlx
//! runs every SQLite connection on a thread of its own anyway and hands each statement and each
//! row across with channel messages, so a batch cost several thread wake-ups and about 200 us
//! of CPU (new triplets at 8 connections: 79 us per request in all). Here a batch is one
//! wake-up of the writer and plain function calls into SQLite. The admin commands, imports and
//! WAL checkpoints keep sqlx's pool: they are not on the request path.

use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// The writer hashes every key of a batch several times over (cache, plan, decision); SipHash
// was a tenth of its time. foldhash is randomly seeded per process, and the maps it backs are
// bounded (a batch, a cache generation of CACHE_GENERATION keys).
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use postern_common::sqlite::{Checkpoints, JOURNAL_SIZE_LIMIT};
use rusqlite::{OptionalExtension, TransactionBehavior};
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::logic::{
    AWL_INTERVAL, ClientCount, TripletRules, TripletSeen, TripletTimes, bump_client, record_triplet,
};
use super::store::{Entry, GreylistStep, Kind, Stats, StepOutcome, Store, StoreError};

/// Requests in one group commit at most.
const MAX_BATCH: usize = 128;

/// Requests waiting for the worker; a sender blocks (within the store timeout) beyond this.
const QUEUE_DEPTH: usize = 4096;

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
    jobs: mpsc::Sender<Job>,
    /// The worker's row cache, read (never written) by requests that it answers alone.
    cache: Arc<Mutex<RowCache>>,
}

/// A request waiting for a group commit.
#[derive(Debug)]
struct StepJob {
    step: GreylistStep,
    reply: oneshot::Sender<Result<StepOutcome, StoreError>>,
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
        // The group-commit worker owns the one connection that writes for requests and
        // expiry; the pool (one connection) serves the admin commands, imports and
        // checkpoints. Page caches (KiB, negative) sized so that the daemon stays well under
        // 40 MB: the writer's holds the B-tree's upper levels of a 10-million-triplet store.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .connect_with(options.pragma("cache_size", "-1000"))
            .await?;
        for statement in SCHEMA {
            sqlx::query(statement).execute(&pool).await?;
        }
        let writer = open_writer(path)?;
        let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
        let cache = Arc::new(Mutex::new(RowCache::default()));
        let alive = jobs.downgrade();
        tokio::spawn(postern_common::sqlite::checkpoint_in_background(
            pool.clone(),
            move || alive.upgrade().is_some(),
            checkpoints,
            "greylist",
        ));
        let worker_cache = cache.clone();
        std::thread::Builder::new()
            .name("greylist-writer".into())
            .spawn(move || group_commit_worker(writer, queue, &worker_cache))
            .map_err(|e| StoreError::Thread(e.to_string()))?;
        Ok(Self { pool, jobs, cache })
    }

    /// Waits until every request queued so far is committed (answers may come before their
    /// commit, see [`run_batch`]).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (reply, done) = oneshot::channel();
        self.jobs
            .send(Job::Flush(reply))
            .await
            .map_err(|_| StoreError::WorkerGone)?;
        done.await.map_err(|_| StoreError::WorkerGone)
    }

    /// Commits what is queued, then closes the pool (checkpointing the WAL).
    pub async fn close(&self) {
        if let Err(err) = self.flush().await {
            warn!(error = %err, "greylist store closing: queued requests not flushed");
        }
        self.pool.close().await;
    }
}

/// Work for the worker that owns the writing connection.
#[derive(Debug)]
enum Job {
    /// A request's greylisting step.
    Step(StepJob),
    /// One expiry batch, run between group commits so it never holds the write lock long.
    Expire(ExpireJob),
    /// Answered once the steps queued before it are committed.
    Flush(oneshot::Sender<()>),
}

/// One expiry batch: up to `batch` rows of each table last seen before `cutoff`.
#[derive(Debug)]
struct ExpireJob {
    cutoff: u64,
    batch: u32,
    reply: oneshot::Sender<Result<u64, StoreError>>,
}

/// The jobs of one round of the worker, sorted.
#[derive(Debug, Default)]
struct Round {
    steps: Vec<StepJob>,
    expiries: Vec<ExpireJob>,
    flushes: Vec<oneshot::Sender<()>>,
}

/// How long a statement waits for a lock another connection holds (a checkpoint, an admin
/// command) before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The writing connection, set up as the pool's connections are. Checkpoints copy the WAL into
/// the database file and sync it, which can take milliseconds: they run on the pool's
/// connection (automatic checkpoints off here), never in a request's commit.
fn open_writer(path: &Path) -> Result<rusqlite::Connection, StoreError> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "wal")?;
    conn.pragma_update(None, "synchronous", "normal")?;
    conn.pragma_update(None, "cache_size", "-16000")?;
    conn.pragma_update(None, "wal_autocheckpoint", "0")?;
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)?;
    conn.set_prepared_statement_cache_capacity(16);
    Ok(conn)
}

/// Takes the requests waiting, decides and answers them, and commits what they changed; ends
/// when every handle of the store is dropped and the queue is empty (committing what is left).
/// Runs on the writer thread: while it commits, the next requests gather in the queue.
fn group_commit_worker(
    conn: rusqlite::Connection,
    mut queue: mpsc::Receiver<Job>,
    cache: &Mutex<RowCache>,
) {
    let mut round = Round::default();
    let mut answer_first = true;
    let mut uncommitted = Uncommitted::default();
    // Only for waiting on the queue with a deadline (tokio's blocking receive has none).
    let timer = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .inspect_err(
            |err| warn!(error = %err, "greylist writer: no timer, so every batch commits at once"),
        )
        .ok();
    loop {
        let job = match (uncommitted.due, &timer) {
            (Some(due), Some(timer)) => {
                // The timeout is made inside the runtime: its timer belongs to it.
                let wait = async { tokio::time::timeout_at(due.into(), queue.recv()).await };
                match timer.block_on(wait) {
                    Ok(job) => job,
                    Err(_elapsed) => {
                        commit_answered(&conn, cache, &mut uncommitted, &mut answer_first);
                        continue;
                    }
                }
            }
            _ => queue.blocking_recv(),
        };
        let Some(job) = job else { break };
        round.sort(job);
        take_waiting(&mut queue, &mut round);
        // Expiry waits for no quiet moment (under steady load there may be none): one expiry
        // step runs between two batches. Answered rows are written before the rows they may
        // expire are deleted.
        if !round.expiries.is_empty() {
            commit_answered(&conn, cache, &mut uncommitted, &mut answer_first);
        }
        for ExpireJob {
            cutoff,
            batch,
            reply,
        } in round.expiries.drain(..)
        {
            // Rows last seen before the cutoff may be cached (a client read for its AWL
            // count); they are gone from the database now.
            lock(cache).forget_older_than(cutoff);
            let _ = reply.send(expire_batch(&conn, cutoff, batch));
        }
        if !round.steps.is_empty() {
            run_batch(
                &conn,
                cache,
                std::mem::take(&mut round.steps),
                &mut answer_first,
                &mut uncommitted,
            );
        }
        if uncommitted.is_due() || !round.flushes.is_empty() || timer.is_none() {
            commit_answered(&conn, cache, &mut uncommitted, &mut answer_first);
        }
        // Steps queued before a flush were taken with it, or in an earlier round.
        for reply in round.flushes.drain(..) {
            let _ = reply.send(());
        }
    }
    commit_answered(&conn, cache, &mut uncommitted, &mut answer_first);
}

/// Rows of answered requests, not yet committed.
#[derive(Debug, Default)]
struct Uncommitted {
    rows: WriteRows,
    /// The requests that changed them.
    steps: usize,
    /// When they are committed at the latest.
    due: Option<std::time::Instant>,
}

impl Uncommitted {
    fn is_due(&self) -> bool {
        self.steps >= COMMIT_AFTER_STEPS
            || self.due.is_some_and(|due| std::time::Instant::now() >= due)
    }
}

/// How long the rows of an answered request wait at most for their commit. One commit per batch (about three requests at 8
/// connections) cost a third of the new-triplet rate: each writes the pages it changed into the
/// WAL, one write call per page, and takes and drops the write lock. Gathered over a few
/// milliseconds, the inserts of many requests share their pages and locks. A crash forgets at
/// most this window of first sightings (those senders are greylisted once more), as a power
/// loss with `synchronous = NORMAL` forgets the commits since the last checkpoint.
const COMMIT_WITHIN: Duration = Duration::from_millis(5);
/// Requests whose rows wait for a commit that starts one at once, whatever the time. With the
/// batch that crosses it (at most [`MAX_BATCH`] more), well below [`CACHE_GENERATION`], so that
/// every uncommitted row is still cached (a request deciding on the database alone would miss
/// it).
const COMMIT_AFTER_STEPS: usize = 512;

/// Commits the rows of answered requests, if any.
fn commit_answered(
    conn: &rusqlite::Connection,
    cache: &Mutex<RowCache>,
    uncommitted: &mut Uncommitted,
    answer_first: &mut bool,
) {
    end_reads(conn);
    let Uncommitted { rows, steps, .. } = std::mem::take(uncommitted);
    if rows.is_empty() {
        return;
    }
    if let Err(err) = commit_rows(conn, &rows) {
        forget_uncommitted(cache);
        *answer_first = false;
        warn!(
            requests = steps,
            triplets = rows.triplets.len(),
            clients = rows.clients.len(),
            error = %err,
            "greylist commit failed after its requests were answered; their rows are lost, \
             and requests are answered after their commit until one succeeds"
        );
    }
}

/// Reads, decides and answers one batch; its rows join the uncommitted ones.
///
/// While commits succeed, a batch is answered as soon as it is decided, before its commit,
/// which no request then waits for. Later batches are decided on the cached rows, so they see
/// what this one decided whether or not its commit is done. Once a commit fails,
/// `answer_first` is cleared and batches are committed at once and answered only when
/// committed, so that while the database cannot be written every request gets the fallback
/// answer (a failed batch) rather than a decision that is not stored; the first commit that
/// succeeds sets it again.
fn run_batch(
    conn: &rusqlite::Connection,
    cache: &Mutex<RowCache>,
    jobs: Vec<StepJob>,
    answer_first: &mut bool,
    uncommitted: &mut Uncommitted,
) {
    metrics::histogram!("postern_policyd_greylist_batch_requests").record(jobs.len() as f64);
    let batch: Vec<&GreylistStep> = jobs.iter().map(|job| &job.step).collect();
    let decided = (|| {
        let plan = ReadPlan::new(&lock(cache), &batch);
        let rows = if plan.is_empty() {
            ReadRows::default()
        } else {
            begin_reads(conn)?;
            plan.read(conn)?
        };
        Ok::<_, rusqlite::Error>(decide(&mut lock(cache), &batch, plan, rows))
    })();
    drop(batch);
    let Decision { outcomes, write } = match decided {
        Ok(decision) => decision,
        Err(err) => {
            // The failure clears the cache, which must not lose rows that are not committed.
            commit_answered(conn, cache, uncommitted, answer_first);
            return fail_batch(cache, jobs, &err);
        }
    };
    if write.is_empty() {
        if uncommitted.due.is_none() {
            end_reads(conn);
        }
        return answer_batch(jobs, outcomes);
    }
    if *answer_first {
        uncommitted.steps += jobs.len();
        uncommitted.rows.append(write);
        uncommitted
            .due
            .get_or_insert_with(|| std::time::Instant::now() + COMMIT_WITHIN);
        return answer_batch(jobs, outcomes);
    }
    end_reads(conn);
    match commit_rows(conn, &write) {
        Ok(()) => {
            *answer_first = true;
            answer_batch(jobs, outcomes);
        }
        Err(err) => fail_batch(cache, jobs, &err),
    }
}

/// Begins the read transaction that the batches of a commit window share, unless one is open.
///
/// Reads outside a transaction would each be a transaction of their own, and each transaction
/// takes and drops its read lock with a round of file locks (about four fcntl calls, more than a
/// microsecond each). A transaction per batch (about four requests at 8 connections) still cost
/// a lock round per batch; shared by the window's batches, it costs one per commit. It is ended
/// ([`end_reads`]) before every write transaction, expiry step and flush, and whenever no rows
/// wait for a commit, so it lives at most [`COMMIT_WITHIN`] and a checkpoint that waits for
/// readers (common::sqlite) waits no longer than that. The write lock is taken only for the
/// writes: with the reads inside the write transaction it was so rarely free that the log
/// outgrew its bound. This thread is the only writer in the process, so deciding on what it
/// read before is safe; a change another process makes meanwhile (an admin `delete`) can be
/// overwritten, as with a cached row.
fn begin_reads(conn: &rusqlite::Connection) -> Result<(), rusqlite::Error> {
    if conn.is_autocommit() {
        conn.prepare_cached("BEGIN DEFERRED")?.execute([])?;
    }
    Ok(())
}

/// Ends the shared read transaction, if one is open. It wrote nothing, so a commit that fails
/// is rolled back instead and nothing is lost.
fn end_reads(conn: &rusqlite::Connection) {
    if conn.is_autocommit() {
        return;
    }
    let ended = conn
        .prepare_cached("COMMIT")
        .and_then(|mut commit| commit.execute([]));
    if ended.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
}

/// Writes a batch's rows in one transaction.
fn commit_rows(conn: &rusqlite::Connection, write: &WriteRows) -> Result<(), rusqlite::Error> {
    // IMMEDIATE takes the write lock at once, so a database busy with another connection (a
    // checkpoint, an admin command) is waited for (busy timeout) before anything is written.
    // A transaction dropped before its commit rolls back.
    let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    write_rows(&tx, write)?;
    tx.commit()
}

/// After a failure, what was committed is not known: the cache forgets what it holds.
fn forget_uncommitted(cache: &Mutex<RowCache>) {
    lock(cache).clear();
}

fn answer_batch(jobs: Vec<StepJob>, outcomes: Vec<StepOutcome>) {
    for (job, outcome) in jobs.into_iter().zip(outcomes) {
        // The requester may have timed out meanwhile; its rows are written anyway.
        let _ = job.reply.send(Ok(outcome));
    }
}

/// Answers each request of a batch that failed with the error (the caller answers with its
/// fallback action).
fn fail_batch(cache: &Mutex<RowCache>, jobs: Vec<StepJob>, err: &rusqlite::Error) {
    forget_uncommitted(cache);
    let message = err.to_string();
    warn!(requests = jobs.len(), error = %message, "greylist batch failed");
    for job in jobs {
        let _ = job.reply.send(Err(StoreError::Batch(message.clone())));
    }
}

impl Round {
    /// Queues a job for this round.
    fn sort(&mut self, job: Job) {
        match job {
            // A requester that gave up (store timeout) is not waited for.
            Job::Step(step) if step.reply.is_closed() => {}
            Job::Step(step) => self.steps.push(step),
            Job::Expire(expire) => self.expiries.push(expire),
            Job::Flush(reply) => self.flushes.push(reply),
        }
    }
}

/// Takes what is waiting, up to a full batch.
fn take_waiting(queue: &mut mpsc::Receiver<Job>, round: &mut Round) {
    while round.steps.len() < MAX_BATCH {
        match queue.try_recv() {
            Ok(job) => round.sort(job),
            Err(_) => break,
        }
    }
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

/// Rows the worker read or wrote recently, as committed: `None` for a key known to be absent.
/// Bounded (two generations of at most [`CACHE_GENERATION`] keys) and short-lived (a generation
/// lasts [`CACHE_LIFETIME`]): another process's change to the file (`greylist delete`) is seen
/// within two lifetimes.
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

fn lock(cache: &Mutex<RowCache>) -> std::sync::MutexGuard<'_, RowCache> {
    cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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

#[derive(Debug)]
struct Generations<V> {
    current: HashMap<String, V>,
    previous: HashMap<String, V>,
    started: std::time::Instant,
}

impl<V: Clone> Generations<V> {
    fn new() -> Self {
        Self {
            current: HashMap::new(),
            previous: HashMap::new(),
            started: std::time::Instant::now(),
        }
    }

    fn get(&self, key: &str) -> Option<V> {
        self.current
            .get(key)
            .or_else(|| self.previous.get(key))
            .cloned()
    }

    fn insert(&mut self, key: &str, value: V) {
        if self.current.len() >= CACHE_GENERATION || self.started.elapsed() >= CACHE_LIFETIME {
            self.previous = std::mem::take(&mut self.current);
            self.started = std::time::Instant::now();
        }
        self.current.insert(key.to_owned(), value);
    }

    fn clear(&mut self) {
        self.current.clear();
        self.previous.clear();
    }

    fn retain(&mut self, keep: impl Fn(&V) -> bool) {
        self.current.retain(|_, value| keep(value));
        self.previous.retain(|_, value| keep(value));
    }
}

/// The rows a batch reads: what the cache does not hold.
#[derive(Debug, Default)]
struct ReadPlan {
    triplets: Vec<String>,
    clients: Vec<String>,
}

impl ReadPlan {
    fn new(cache: &RowCache, steps: &[&GreylistStep]) -> Self {
        let mut plan = Self::default();
        let mut planned: HashSet<(bool, &str)> = HashSet::new();
        for step in steps {
            let key = &step.triplet_key;
            if cache.triplets.get(key).is_none() && planned.insert((false, key)) {
                plan.triplets.push(key.clone());
            }
            let key = &step.awl_key;
            if step.awl_threshold > 0
                && cache.clients.get(key).is_none()
                && planned.insert((true, key))
            {
                plan.clients.push(key.clone());
            }
        }
        plan
    }

    fn is_empty(&self) -> bool {
        self.triplets.is_empty() && self.clients.is_empty()
    }

    /// Reads the planned rows.
    fn read(&self, conn: &rusqlite::Connection) -> Result<ReadRows, rusqlite::Error> {
        Ok(ReadRows {
            triplets: read_keyed(
                conn,
                "SELECT first, last, passed FROM triplets WHERE key = ?1",
                &self.triplets,
                |row| {
                    Ok((
                        TripletTimes {
                            first: to_u64(row.get(0)?),
                            last: to_u64(row.get(1)?),
                        },
                        row.get::<_, i64>(2)? != 0,
                    ))
                },
            )?,
            clients: read_keyed(
                conn,
                "SELECT count, last FROM clients WHERE key = ?1",
                &self.clients,
                |row| {
                    Ok(ClientCount {
                        count: to_u64(row.get(0)?),
                        last: to_u64(row.get(1)?),
                    })
                },
            )?,
        })
    }
}

/// The row of each key that has one, by `sql` (its one parameter is the key).
fn read_keyed<T>(
    conn: &rusqlite::Connection,
    sql: &str,
    keys: &[String],
    decode: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<(String, T)>> {
    let mut found = Vec::new();
    if keys.is_empty() {
        return Ok(found);
    }
    let mut select = conn.prepare_cached(sql)?;
    for key in keys {
        if let Some(row) = select.query_row([key], &decode).optional()? {
            found.push((key.clone(), row));
        }
    }
    Ok(found)
}

/// The stored rows of a batch's keys (keys without a row are absent).
#[derive(Debug, Default)]
struct ReadRows {
    triplets: Vec<(String, (TripletTimes, bool))>,
    clients: Vec<(String, ClientCount)>,
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

/// What postgrey's rules make of a batch: each step's outcome, and the rows that changed.
#[derive(Debug)]
struct Decision {
    outcomes: Vec<StepOutcome>,
    write: WriteRows,
}

/// Writes a batch's rows (in the batch's transaction).
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

/// Applies postgrey's rules ([`record_triplet`], [`bump_client`]) to each step of a batch in
/// turn, in memory, on the rows the cache holds and the rows read; returns the outcomes (in the
/// order of `steps`, exactly [`Store::greylist_step`]'s composition run for each step in turn)
/// and the rows that changed. The cache takes the new rows at once (requests answered from the
/// cache alone may see them before the commit; see [`answer_from_cache`]); if the write fails
/// the cache is cleared.
fn decide(
    cache: &mut RowCache,
    steps: &[&GreylistStep],
    plan: ReadPlan,
    rows: ReadRows,
) -> Decision {
    let mut triplets: HashMap<String, Option<(TripletTimes, bool)>> = HashMap::new();
    let mut clients: HashMap<String, Option<ClientCount>> = HashMap::new();
    for key in plan.triplets {
        triplets.insert(key, None);
    }
    for key in plan.clients {
        clients.insert(key, None);
    }
    for (key, row) in rows.triplets {
        triplets.insert(key, Some(row));
    }
    for (key, row) in rows.clients {
        clients.insert(key, Some(row));
    }
    for step in steps {
        if !triplets.contains_key(&step.triplet_key) {
            let cached = cache.triplets.get(&step.triplet_key).flatten();
            triplets.insert(step.triplet_key.clone(), cached);
        }
        if step.awl_threshold > 0 && !clients.contains_key(&step.awl_key) {
            let cached = cache.clients.get(&step.awl_key).flatten();
            clients.insert(step.awl_key.clone(), cached);
        }
    }
    let stored_triplets = triplets.clone();

    let mut changed_clients: HashSet<&str> = HashSet::new();
    let mut outcomes = Vec::with_capacity(steps.len());
    for &step in steps {
        let mut count_client = |clients: &mut HashMap<String, Option<ClientCount>>| {
            let prev = clients.get(&step.awl_key).copied().flatten();
            let next = bump_client(prev, step.now)?;
            clients.insert(step.awl_key.clone(), Some(next));
            changed_clients.insert(step.awl_key.as_str());
            Some(next)
        };
        if step.awl_threshold > 0
            && clients
                .get(&step.awl_key)
                .copied()
                .flatten()
                .is_some_and(|c| c.count >= step.awl_threshold)
        {
            count_client(&mut clients);
            outcomes.push(StepOutcome::ClientAwl);
            continue;
        }
        let prev = triplets
            .get(&step.triplet_key)
            .copied()
            .flatten()
            .map(|(times, _)| times);
        let seen = record_triplet(prev, step.now, step.rules);
        let times = TripletTimes {
            first: seen.first,
            last: step.now,
        };
        triplets.insert(
            step.triplet_key.clone(),
            Some((times, seen.last_was_successful)),
        );
        let client_bumped = if step.counts_for_awl(seen) {
            count_client(&mut clients)
        } else {
            None
        };
        outcomes.push(StepOutcome::Triplet {
            seen,
            client_bumped,
        });
    }

    let mut write = WriteRows::default();
    for (key, row) in &triplets {
        if let Some((times, passed)) = row
            && stored_triplets.get(key) != Some(row)
        {
            write.triplets.push((
                key.clone(),
                to_i64(times.first),
                to_i64(times.last),
                i64::from(*passed),
            ));
        }
    }
    for key in changed_clients {
        if let Some(Some(count)) = clients.get(key) {
            write
                .clients
                .push((key.to_owned(), to_i64(count.count), to_i64(count.last)));
        }
    }
    for (key, row) in triplets {
        cache.triplets.insert(&key, row);
    }
    for (key, row) in clients {
        cache.clients.insert(&key, row);
    }
    Decision { outcomes, write }
}

impl Store for SqliteStore {
    async fn greylist_step(&self, step: &GreylistStep) -> Result<StepOutcome, StoreError> {
        if let Some(outcome) = answer_from_cache(&lock(&self.cache), step) {
            return Ok(outcome);
        }
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::Step(StepJob {
                step: step.clone(),
                reply,
            }))
            .await
            .map_err(|_| StoreError::WorkerGone)?;
        answer.await.map_err(|_| StoreError::WorkerGone)?
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
        self.jobs
            .send(Job::Expire(ExpireJob {
                cutoff,
                batch,
                reply,
            }))
            .await
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

    /// The group-commit path (and the cache-only answer of a repeated step) gives what the
    /// three-call composition gives on the reference store, for every state a triplet and its
    /// client can be in.
    #[tokio::test]
    async fn group_commit_matches_the_composition_one_by_one() {
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
            answer_from_cache(&lock(&sqlite.cache), &first),
            None,
            "not cached"
        );
        let outcome = sqlite.greylist_step(&first).await.unwrap();
        assert_eq!(
            answer_from_cache(&lock(&sqlite.cache), &first),
            Some(outcome),
            "same triplet, same second"
        );
        let later = step("t", "c", 1001, 5);
        assert_eq!(
            answer_from_cache(&lock(&sqlite.cache), &later),
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
            answer_from_cache(&lock(&sqlite.cache), &step("t3", "awl", 5200, 5)),
            Some(StepOutcome::ClientAwl),
            "counted less than an hour ago"
        );
        assert_eq!(
            answer_from_cache(&lock(&sqlite.cache), &step("t3", "awl", 5000 + 3600, 5)),
            None,
            "an hour later the count is refreshed"
        );
    }

    /// Requests never checkpoint (the writer's auto-checkpoint is off); the background task
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
        const STEPS_EACH: usize = 8000;
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

    /// A failing database fails the batch's requests (the caller answers with its fallback
    /// action), and the worker recovers once the database works again.
    #[tokio::test]
    async fn a_failed_batch_is_reported_and_the_worker_recovers() {
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
        // t1 was forgotten by the cache on the failure: read again, it is a retry, not new.
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

    /// The batches of a commit window share one read transaction; it ends with the window, so
    /// what another process wrote meanwhile is seen by the requests after it.
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
    async fn concurrent_requests_are_group_committed() {
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
        let mut same_firsts = HashSet::new();
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
