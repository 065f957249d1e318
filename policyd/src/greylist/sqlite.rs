//! The embedded store: one SQLite file in WAL mode. Each request is one atomic UPSERT (the
//! postgrey rules are written in SQL, so readers and the writer never hold a transaction across
//! statements), and expiry deletes in small indexed batches.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::logic::{AWL_INTERVAL, ClientCount, TripletRules, TripletSeen};
use super::store::{Entry, Kind, Stats, Store, StoreError};

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
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .pragma("cache_size", "-16000");
        // One connection: every request writes (last seen), and SQLite has one writer at a
        // time anyway; queueing in the pool is cheaper than SQLite's busy-wait sleeps.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .connect_with(options)
            .await?;
        for statement in SCHEMA {
            sqlx::query(statement).execute(&pool).await?;
        }
        Ok(Self { pool })
    }

    /// Closes the pool (checkpointing the WAL).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

impl Store for SqliteStore {
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
        let mut deleted = 0;
        for table in ["triplets", "clients"] {
            let sql = format!(
                "DELETE FROM {table} WHERE key IN \
                 (SELECT key FROM {table} WHERE last < ?1 LIMIT ?2)"
            );
            deleted += sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(to_i64(cutoff))
                .bind(i64::from(batch))
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        Ok(deleted)
    }

    async fn list(&self, filter: &str, limit: u64) -> Result<Vec<Entry>, StoreError> {
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
        let sql = match kind {
            Kind::Triplet => "DELETE FROM triplets WHERE key = ?1",
            Kind::Client => "DELETE FROM clients WHERE key = ?1",
        };
        Ok(sqlx::query(sql)
            .bind(key)
            .execute(&self.pool)
            .await?
            .rows_affected()
            > 0)
    }

    async fn stats(&self, delay: u64) -> Result<Stats, StoreError> {
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
        Ok(entries.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
