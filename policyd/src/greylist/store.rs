//! Where triplets and auto-whitelisted clients live. One trait, three backends: SQLite (the
//! embedded default), Redis (shared by several MX hosts, also Redis Cluster) and memory (tests,
//! and a store that forgets on restart if asked for with `memory:`).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::logic::{
    ClientCount, TripletRules, TripletSeen, TripletTimes, bump_client, record_triplet,
};

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] sqlx::Error),
    /// SQLite failed on the greylist store's writing connection.
    #[error("sqlite: {0}")]
    Writer(#[from] rusqlite::Error),
    /// Redis failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A stored value that is not `first,last`.
    #[error("corrupt entry {key:?}: {value:?}")]
    Corrupt {
        /// Its key.
        key: String,
        /// Its value.
        value: String,
    },
    /// The store URL is not usable.
    #[error("{0}")]
    Url(String),
    /// A batch of requests failed together (each request of the batch gets this copy).
    #[error("sqlite: {0}")]
    Batch(String),
    /// The store's worker is gone (the store is shutting down).
    #[error("greylist store worker stopped")]
    WorkerGone,
    /// The committer thread could not be started.
    #[error("cannot start the greylist committer thread: {0}")]
    Thread(String),
}

/// One greylisting request's store work: the AWL check of the client, then the triplet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GreylistStep {
    /// The client's AWL key.
    pub awl_key: String,
    /// The triplet's key.
    pub triplet_key: String,
    /// The request's time, Unix seconds.
    pub now: u64,
    /// Delay and retry window.
    pub rules: TripletRules,
    /// Deliveries after which a client is auto-whitelisted; 0 disables the AWL.
    pub awl_threshold: u64,
}

impl GreylistStep {
    /// Whether this request is a client's first pass of a triplet, which counts for the AWL.
    pub fn counts_for_awl(&self, seen: TripletSeen) -> bool {
        self.awl_threshold > 0
            && self.now.saturating_sub(seen.first) >= self.rules.delay
            && !seen.last_was_successful
    }
}

/// What a [`GreylistStep`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    /// The client is auto-whitelisted (its count refreshed at most once an hour).
    ClientAwl,
    /// The triplet was recorded.
    Triplet {
        /// What the request sees.
        seen: TripletSeen,
        /// The client's new AWL count when this request counted for it.
        client_bumped: Option<ClientCount>,
    },
}

/// Which table an entry is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Greylist triplets (`client_net/sender/recipient`).
    Triplet,
    /// Auto-whitelisted clients (AWL), by address.
    Client,
}

/// One stored entry, for `greylist list` and import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Triplet or client.
    pub kind: Kind,
    /// The key, as postgrey builds it.
    pub key: String,
    /// Triplet: first seen; client: count of successful deliveries.
    pub first_or_count: u64,
    /// Last seen / last counted, Unix seconds.
    pub last: u64,
}

/// Counts for `greylist stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Triplets stored.
    pub triplets: u64,
    /// Of those, triplets that have passed greylisting.
    pub passed: u64,
    /// Clients in the AWL table (counted at least once).
    pub clients: u64,
}

/// The operations greylisting needs. Every backend applies postgrey's rules
/// ([`record_triplet`], [`bump_client`]) atomically, so two MX hosts racing on one triplet
/// never both see it as new.
pub trait Store: Send + Sync {
    /// Records that the triplet `key` is seen at `now` (stores `first,now`) and returns what
    /// the request sees.
    fn record_triplet(
        &self,
        key: &str,
        now: u64,
        rules: TripletRules,
    ) -> impl Future<Output = Result<TripletSeen, StoreError>> + Send;

    /// The AWL state of a client.
    fn client(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<ClientCount>, StoreError>> + Send;

    /// Counts a successful delivery of a client (at most once an hour); returns the new count.
    fn bump_client(
        &self,
        key: &str,
        now: u64,
    ) -> impl Future<Output = Result<Option<ClientCount>, StoreError>> + Send;

    /// Deletes entries last seen before `cutoff`, at most `batch` of them; returns how many.
    fn expire(
        &self,
        cutoff: u64,
        batch: u32,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Up to `limit` entries whose key contains `filter`.
    fn list(
        &self,
        filter: &str,
        limit: u64,
    ) -> impl Future<Output = Result<Vec<Entry>, StoreError>> + Send;

    /// Deletes one entry; true if it existed.
    fn delete(
        &self,
        kind: Kind,
        key: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Counts.
    fn stats(&self, delay: u64) -> impl Future<Output = Result<Stats, StoreError>> + Send;

    /// Writes entries as they are (import); returns how many.
    fn import(&self, entries: &[Entry]) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// A whole request's store work: the AWL check, the triplet, the AWL count. Backends that
    /// can do better than three round trips (SQLite batches concurrent requests into one
    /// transaction) override it; the result must equal this composition.
    fn greylist_step(
        &self,
        step: &GreylistStep,
    ) -> impl Future<Output = Result<StepOutcome, StoreError>> + Send {
        async move {
            if step.awl_threshold > 0
                && let Some(count) = self.client(&step.awl_key).await?
                && count.count >= step.awl_threshold
            {
                self.bump_client(&step.awl_key, step.now).await?;
                return Ok(StepOutcome::ClientAwl);
            }
            let seen = self
                .record_triplet(&step.triplet_key, step.now, step.rules)
                .await?;
            let client_bumped = if step.counts_for_awl(seen) {
                self.bump_client(&step.awl_key, step.now).await?
            } else {
                None
            };
            Ok(StepOutcome::Triplet {
                seen,
                client_bumped,
            })
        }
    }
}

/// A store chosen by URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite:` (the default file `greylist.sqlite` under `state_dir`) or `sqlite:/path/file`.
    Sqlite(PathBuf),
    /// `redis://...`, `rediss://...`, `redis+unix:///...`.
    Redis(String),
    /// `redis+cluster://host:port,host:port`: the nodes as `redis://host:port` URLs.
    RedisCluster(Vec<String>),
    /// `memory:`: forgotten on restart.
    Memory,
}

impl StoreUrl {
    /// Parses a URL; a relative SQLite path is under `state_dir`.
    pub fn parse(url: &str, state_dir: &Path) -> Result<Self, StoreError> {
        let url = url.trim();
        if let Some(path) = url.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            let path = if path.is_empty() {
                state_dir.join("greylist.sqlite")
            } else {
                state_dir.join(path)
            };
            return Ok(Self::Sqlite(path));
        }
        if url == "memory:" {
            return Ok(Self::Memory);
        }
        if let Some(rest) = url.strip_prefix("redis+cluster://") {
            let (auth, hosts) = match rest.rsplit_once('@') {
                Some((auth, hosts)) => (format!("{auth}@"), hosts),
                None => (String::new(), rest),
            };
            let hosts = hosts.split('/').next().unwrap_or_default();
            let nodes: Vec<String> = hosts
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| format!("redis://{auth}{h}"))
                .collect();
            if nodes.is_empty() {
                return Err(StoreError::Url(format!("{url:?} names no cluster node")));
            }
            return Ok(Self::RedisCluster(nodes));
        }
        if url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("redis+unix://")
            || url.starts_with("unix://")
        {
            redis::parse_redis_url(url)
                .ok_or_else(|| StoreError::Url(format!("{url:?} is not a valid redis URL")))?;
            return Ok(Self::Redis(url.to_owned()));
        }
        Err(StoreError::Url(format!(
            "{url:?}: expected sqlite:[PATH], redis://..., redis+cluster://HOST:PORT,... or memory:"
        )))
    }
}

/// An in-process store; applies the same rules as the others.
#[derive(Debug, Default)]
pub struct MemoryStore {
    entries: Mutex<HashMap<(Kind, String), (u64, u64)>>,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Kind, String), (u64, u64)>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Store for MemoryStore {
    async fn record_triplet(
        &self,
        key: &str,
        now: u64,
        rules: TripletRules,
    ) -> Result<TripletSeen, StoreError> {
        let mut map = self.lock();
        let slot = (Kind::Triplet, key.to_owned());
        let prev = map
            .get(&slot)
            .map(|&(first, last)| TripletTimes { first, last });
        let seen = record_triplet(prev, now, rules);
        map.insert(slot, (seen.first, now));
        Ok(seen)
    }

    async fn client(&self, key: &str) -> Result<Option<ClientCount>, StoreError> {
        Ok(self
            .lock()
            .get(&(Kind::Client, key.to_owned()))
            .map(|&(count, last)| ClientCount { count, last }))
    }

    async fn bump_client(&self, key: &str, now: u64) -> Result<Option<ClientCount>, StoreError> {
        let mut map = self.lock();
        let slot = (Kind::Client, key.to_owned());
        let prev = map
            .get(&slot)
            .map(|&(count, last)| ClientCount { count, last });
        let next = bump_client(prev, now);
        if let Some(next) = next {
            map.insert(slot, (next.count, next.last));
        }
        Ok(next)
    }

    async fn expire(&self, cutoff: u64, batch: u32) -> Result<u64, StoreError> {
        let mut map = self.lock();
        let old: Vec<_> = map
            .iter()
            .filter(|(_, (_, last))| *last < cutoff)
            .map(|(k, _)| k.clone())
            .take(batch as usize)
            .collect();
        for key in &old {
            map.remove(key);
        }
        Ok(old.len() as u64)
    }

    async fn list(&self, filter: &str, limit: u64) -> Result<Vec<Entry>, StoreError> {
        let map = self.lock();
        let mut out: Vec<Entry> = map
            .iter()
            .filter(|((_, key), _)| key.contains(filter))
            .map(|((kind, key), &(first, last))| Entry {
                kind: *kind,
                key: key.clone(),
                first_or_count: first,
                last,
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out.truncate(limit as usize);
        Ok(out)
    }

    async fn delete(&self, kind: Kind, key: &str) -> Result<bool, StoreError> {
        Ok(self.lock().remove(&(kind, key.to_owned())).is_some())
    }

    async fn stats(&self, delay: u64) -> Result<Stats, StoreError> {
        let map = self.lock();
        let mut stats = Stats::default();
        for ((kind, _), (first, last)) in map.iter() {
            match kind {
                Kind::Triplet => {
                    stats.triplets += 1;
                    if last.saturating_sub(*first) >= delay {
                        stats.passed += 1;
                    }
                }
                Kind::Client => stats.clients += 1,
            }
        }
        Ok(stats)
    }

    async fn import(&self, entries: &[Entry]) -> Result<u64, StoreError> {
        let mut map = self.lock();
        for entry in entries {
            map.insert(
                (entry.kind, entry.key.clone()),
                (entry.first_or_count, entry.last),
            );
        }
        Ok(entries.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let state = Path::new("/var/lib/postern/policyd");
        assert_eq!(
            StoreUrl::parse("sqlite:", state).unwrap(),
            StoreUrl::Sqlite(state.join("greylist.sqlite"))
        );
        assert_eq!(
            StoreUrl::parse("sqlite:/srv/g.db", state).unwrap(),
            StoreUrl::Sqlite(PathBuf::from("/srv/g.db"))
        );
        assert_eq!(
            StoreUrl::parse("sqlite:grey.db", state).unwrap(),
            StoreUrl::Sqlite(state.join("grey.db"))
        );
        assert_eq!(
            StoreUrl::parse("redis://127.0.0.1:6379/2", state).unwrap(),
            StoreUrl::Redis("redis://127.0.0.1:6379/2".into())
        );
        assert_eq!(
            StoreUrl::parse("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7000", state).unwrap(),
            StoreUrl::RedisCluster(vec![
                "redis://:pw@10.0.0.1:7000".into(),
                "redis://:pw@10.0.0.2:7000".into()
            ])
        );
        assert_eq!(StoreUrl::parse("memory:", state).unwrap(), StoreUrl::Memory);
        assert!(StoreUrl::parse("mysql://x", state).is_err());
        assert!(StoreUrl::parse("redis+cluster://", state).is_err());
    }

    #[tokio::test]
    async fn memory_store_applies_the_rules() {
        let store = MemoryStore::default();
        let rules = TripletRules {
            delay: 300,
            retry_window: 86_400,
        };
        let first = store.record_triplet("k", 1000, rules).await.unwrap();
        assert_eq!(first.first, 1000);
        let again = store.record_triplet("k", 1400, rules).await.unwrap();
        assert_eq!(again.first, 1000);
        assert!(!again.last_was_successful);
        let third = store.record_triplet("k", 1500, rules).await.unwrap();
        assert!(third.last_was_successful);
        assert_eq!(
            store.bump_client("c", 1000).await.unwrap().unwrap().count,
            1
        );
        assert_eq!(store.bump_client("c", 1001).await.unwrap(), None);
        assert_eq!(store.client("c").await.unwrap().unwrap().count, 1);
        assert_eq!(
            store.stats(300).await.unwrap(),
            Stats {
                triplets: 1,
                passed: 1,
                clients: 1
            }
        );
        assert_eq!(store.expire(1200, 10).await.unwrap(), 1);
        assert_eq!(store.list("", 10).await.unwrap().len(), 1);
        assert!(store.delete(Kind::Triplet, "k").await.unwrap());
        assert!(!store.delete(Kind::Triplet, "k").await.unwrap());
    }
}
