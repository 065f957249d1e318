//! postsrsd 2.x's `original-envelope = database`: a long sender is stored under a short key and
//! the SRS address carries the key (`SRS0=HHHH=TT=1=<32 base32hex chars>@srs-domain`), so it
//! stays within the 64 octets a local part may have. SQLite (embedded) or Redis (shared by
//! several MX hosts); entries live as long as an SRS address does (21 days and the day it was
//! made). The storage is postsrsd's own (SQLite table `kv (k, v, lt)`, Redis keys
//! `PostSRSd/<key>`), so pointing `envelope_database` at postsrsd's database keeps the addresses
//! it handed out reversing.

use std::time::Duration;

use sha1::Digest;
use tokio::sync::OnceCell;

/// How long a stored sender is kept: the lifetime of an SRS timestamp.
pub const ENTRY_LIFETIME: Duration =
    Duration::from_secs(crate::srs::MAX_AGE_DAYS * 86_400 + 86_400);
/// The "host" part that marks a database key inside an SRS address.
pub const KEY_HOST: &str = "1";
const BASE32HEX: &[u8; 32] = b"0123456789ABCDEFGHIJKLMNOPQRSTUV";
/// postsrsd's Redis key prefix.
const REDIS_PREFIX: &str = "PostSRSd/";

/// The key for an address: base32hex (no padding) of its SHA-1, 32 characters.
pub fn key_for(address: &str) -> String {
    let digest = sha1::Sha1::digest(address.as_bytes());
    let mut out = String::with_capacity(32);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &byte in digest.iter() {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(BASE32HEX[((buffer >> bits) & 31) as usize]));
        }
    }
    out
}

/// Why the store failed (the lookup is then answered with a temporary error).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite.
    #[error("envelope database (sqlite): {0}")]
    Sqlite(#[from] sqlx::Error),
    /// Redis.
    #[error("envelope database (redis): {0}")]
    Redis(#[from] redis::RedisError),
    /// Unsupported URL.
    #[error("envelope database {0:?}: expected sqlite:PATH or redis://HOST:PORT")]
    Url(String),
    /// No answer in time.
    #[error("envelope database: no answer within {0:?}")]
    Timeout(Duration),
}

/// Where stored senders live.
pub enum EnvelopeStore {
    /// Embedded SQLite.
    Sqlite {
        /// The pool (connected lazily).
        pool: sqlx::SqlitePool,
        /// Schema created once.
        ready: OnceCell<()>,
    },
    /// Redis (keys expire by TTL).
    Redis {
        /// The client.
        client: redis::Client,
        /// A reconnecting connection, made on first use.
        connection: OnceCell<redis::aio::ConnectionManager>,
    },
}

impl std::fmt::Debug for EnvelopeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sqlite { .. } => "EnvelopeStore::Sqlite",
            Self::Redis { .. } => "EnvelopeStore::Redis",
        })
    }
}

/// Every store call is bounded, so a dead database cannot hold Postfix's lookups.
const STORE_TIMEOUT: Duration = Duration::from_secs(3);

async fn bounded<T, E: Into<StoreError>>(
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(STORE_TIMEOUT, work)
        .await
        .map_err(|_| StoreError::Timeout(STORE_TIMEOUT))?
        .map_err(Into::into)
}

impl EnvelopeStore {
    /// Opens (lazily: nothing is connected until the first lookup) the store a URL names.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        if let Some(path) = url.strip_prefix("sqlite:") {
            let path = path.trim_start_matches("//");
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(2));
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(4)
                .acquire_timeout(STORE_TIMEOUT)
                .connect_lazy_with(options);
            return Ok(Self::Sqlite {
                pool,
                ready: OnceCell::new(),
            });
        }
        if url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("redis+unix://")
        {
            return Ok(Self::Redis {
                client: redis::Client::open(url)?,
                connection: OnceCell::new(),
            });
        }
        Err(StoreError::Url(url.to_owned()))
    }

    async fn sqlite_ready(pool: &sqlx::SqlitePool, ready: &OnceCell<()>) -> Result<(), StoreError> {
        ready
            .get_or_try_init(|| async {
                // postsrsd 2.x's schema, byte for byte (src/database.c).
                bounded(sqlx::query("CREATE TABLE IF NOT EXISTS kv (k TEXT NOT NULL UNIQUE ON CONFLICT REPLACE, v TEXT NOT NULL, lt INTEGER NOT NULL)").execute(pool)).await?;
                bounded(sqlx::query("CREATE INDEX IF NOT EXISTS ltidx ON kv (lt)").execute(pool)).await?;
                Ok::<(), StoreError>(())
            })
            .await
            .map(|_| ())
    }

    async fn redis(
        client: &redis::Client,
        connection: &OnceCell<redis::aio::ConnectionManager>,
    ) -> Result<redis::aio::ConnectionManager, StoreError> {
        connection
            .get_or_try_init(|| bounded(client.get_connection_manager()))
            .await
            .cloned()
    }

    /// Stores `address` under `key` (upper-cased, with `@1`), for [`ENTRY_LIFETIME`].
    pub async fn put(&self, key: &str, address: &str, now_unix: u64) -> Result<(), StoreError> {
        let key = format!("{}@{KEY_HOST}", key.to_ascii_uppercase());
        match self {
            Self::Sqlite { pool, ready } => {
                Self::sqlite_ready(pool, ready).await?;
                let expires =
                    i64::try_from(now_unix + ENTRY_LIFETIME.as_secs()).unwrap_or(i64::MAX);
                bounded(
                    sqlx::query("INSERT INTO kv (k, v, lt) VALUES (?, ?, ?)")
                        .bind(&key)
                        .bind(address)
                        .bind(expires)
                        .execute(pool),
                )
                .await?;
            }
            Self::Redis { client, connection } => {
                let mut con = Self::redis(client, connection).await?;
                bounded(
                    redis::cmd("SET")
                        .arg(format!("{REDIS_PREFIX}{key}"))
                        .arg(address)
                        .arg("EX")
                        .arg(ENTRY_LIFETIME.as_secs())
                        .query_async::<()>(&mut con),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// The address stored under `key`, if any and not expired.
    pub async fn get(&self, key: &str, now_unix: u64) -> Result<Option<String>, StoreError> {
        let key = format!("{}@{KEY_HOST}", key.to_ascii_uppercase());
        match self {
            Self::Sqlite { pool, ready } => {
                Self::sqlite_ready(pool, ready).await?;
                let now = i64::try_from(now_unix).unwrap_or(i64::MAX);
                let row: Option<(String,)> = bounded(
                    sqlx::query_as("SELECT v FROM kv WHERE k = ? AND lt > ?")
                        .bind(&key)
                        .bind(now)
                        .fetch_optional(pool),
                )
                .await?;
                Ok(row.map(|(address,)| address))
            }
            Self::Redis { client, connection } => {
                let mut con = Self::redis(client, connection).await?;
                Ok(bounded(
                    redis::cmd("GET")
                        .arg(format!("{REDIS_PREFIX}{key}"))
                        .query_async::<Option<String>>(&mut con),
                )
                .await?)
            }
        }
    }

    /// Deletes expired SQLite entries, at most `batch` at a time (Redis expires them itself).
    pub async fn expire(&self, now_unix: u64, batch: u32) -> Result<u64, StoreError> {
        match self {
            Self::Sqlite { pool, ready } => {
                Self::sqlite_ready(pool, ready).await?;
                let now = i64::try_from(now_unix).unwrap_or(i64::MAX);
                let done = bounded(
                    sqlx::query(
                        "DELETE FROM kv WHERE k IN (SELECT k FROM kv WHERE lt <= ? LIMIT ?)",
                    )
                    .bind(now)
                    .bind(i64::from(batch))
                    .execute(pool),
                )
                .await?;
                Ok(done.rows_affected())
            }
            Self::Redis { .. } => Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_32_base32hex_characters() {
        let key = key_for("a.very.long.sender.address+with-a-tag@subdomain.of.some.example.org");
        assert_eq!(key.len(), 32);
        assert!(key.bytes().all(|b| BASE32HEX.contains(&b)));
        assert_eq!(
            key,
            key_for("a.very.long.sender.address+with-a-tag@subdomain.of.some.example.org")
        );
        assert_ne!(key, key_for("other@example.org"));
        // SHA-1("") = da39a3ee..., whose base32hex starts with "R8SQ".
        assert!(key_for("").starts_with("R8SQ"), "{}", key_for(""));
    }

    #[tokio::test]
    async fn sqlite_store_round_trips_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let store = EnvelopeStore::open(&format!("sqlite:{}", dir.path().join("env.db").display()))
            .unwrap();
        let now = 1_700_000_000;
        store
            .put("abc", "long.sender@example.org", now)
            .await
            .unwrap();
        assert_eq!(
            store.get("ABC", now).await.unwrap().as_deref(),
            Some("long.sender@example.org")
        );
        assert_eq!(store.get("abd", now).await.unwrap(), None);
        let later = now + ENTRY_LIFETIME.as_secs() + 1;
        assert_eq!(store.get("abc", later).await.unwrap(), None);
        assert_eq!(store.expire(later, 100).await.unwrap(), 1);
        assert!(matches!(
            EnvelopeStore::open("mysql://x"),
            Err(StoreError::Url(_))
        ));
    }

    #[tokio::test]
    async fn reads_a_database_postsrsd_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("postsrsd.db");
        // What postsrsd 2.x creates and writes (src/database.c), done here with plain SQL.
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        sqlx::query("CREATE TABLE IF NOT EXISTS kv (k TEXT NOT NULL UNIQUE ON CONFLICT REPLACE, v TEXT NOT NULL, lt INTEGER NOT NULL)")
            .execute(&pool)
            .await
            .unwrap();
        let now = 1_700_000_000u64;
        let sender = "list-bounces+someone=example.com@lists.example.org";
        let key = key_for(sender);
        sqlx::query("INSERT INTO kv (k, v, lt) VALUES (?, ?, ?)")
            .bind(format!("{key}@1"))
            .bind(sender)
            .bind(i64::try_from(now + 21 * 86_400).unwrap())
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        let store = EnvelopeStore::open(&format!("sqlite:{}", path.display())).unwrap();
        assert_eq!(store.get(&key, now).await.unwrap().as_deref(), Some(sender));
        // And what we write, postsrsd reads: the same table, key and columns.
        store.put("ABC", "x@y.example", now).await.unwrap();
        let EnvelopeStore::Sqlite { pool, .. } = &store else {
            panic!()
        };
        let row: (String, i64) = sqlx::query_as("SELECT v, lt FROM kv WHERE k = ?")
            .bind("ABC@1")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(row.0, "x@y.example");
        assert!(row.1 > i64::try_from(now + 21 * 86_400).unwrap());
    }
}
