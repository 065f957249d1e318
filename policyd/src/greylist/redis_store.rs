//! The shared store: Redis (or Redis Cluster), so that several MX hosts greylist together.
//! Every update is one Lua script on one key, so it is atomic even when two hosts see the same
//! triplet at once; entries expire by TTL (`max_age` after they were last seen).

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};

use super::logic::{AWL_INTERVAL, ClientCount, TripletRules, TripletSeen};
use super::store::{Entry, Kind, Stats, Store, StoreError};

/// The triplet rules of logic::record_triplet, in Lua. KEYS[1] = key; ARGV = now, delay,
/// retry_window, ttl. Returns {first, last_was_successful}.
const RECORD_TRIPLET: &str = r"
local now = tonumber(ARGV[1])
local delay = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local first = now
local passed = 0
local value = redis.call('GET', KEYS[1])
if value then
  local f, l = string.match(value, '^(%d+),(%d+)')
  if f then
    f = tonumber(f)
    l = tonumber(l)
    first = f
    if l - f >= delay then
      passed = 1
    elseif now - f > window then
      first = now
    end
    if first > now then first = now end
  end
end
redis.call('SET', KEYS[1], first .. ',' .. now, 'EX', ARGV[4])
return {first, passed}
";

/// logic::bump_client in Lua. KEYS[1] = key; ARGV = now, interval, ttl. Returns {count, last}
/// or nil when the request does not count.
const BUMP_CLIENT: &str = r"
local now = tonumber(ARGV[1])
local value = redis.call('GET', KEYS[1])
local count = 0
if value then
  local c, l = string.match(value, '^(%d+),(%d+)')
  if c then
    l = tonumber(l)
    if now < l + tonumber(ARGV[2]) and l <= now then
      redis.call('EXPIRE', KEYS[1], ARGV[3])
      return false
    end
    count = tonumber(c)
  end
end
count = count + 1
redis.call('SET', KEYS[1], count .. ',' .. now, 'EX', ARGV[3])
return {count, now}
";

/// A single-node or cluster connection; both reconnect by themselves.
#[derive(Clone)]
pub enum RedisConnection {
    /// One server (or a Sentinel-free replica set behind one address).
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// The Redis store.
#[derive(Clone)]
pub struct RedisStore {
    conn: RedisConnection,
    prefix: String,
    ttl: u64,
    record: Script,
    bump: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to one server. `ttl`: seconds an entry lives after it was last seen.
    pub async fn connect(
        url: &str,
        prefix: &str,
        ttl: u64,
        timeout: std::time::Duration,
    ) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        let conn = client.get_connection_manager_with_config(config).await?;
        Ok(Self::with(RedisConnection::Single(conn), prefix, ttl))
    }

    /// Connects to a cluster through any of its nodes.
    pub async fn connect_cluster(
        nodes: &[String],
        prefix: &str,
        ttl: u64,
        timeout: std::time::Duration,
    ) -> Result<Self, StoreError> {
        let client = redis::cluster::ClusterClientBuilder::new(nodes.to_vec())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .build()?;
        let conn = client.get_async_connection().await?;
        Ok(Self::with(RedisConnection::Cluster(conn), prefix, ttl))
    }

    fn with(conn: RedisConnection, prefix: &str, ttl: u64) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
            ttl: ttl.max(1),
            record: Script::new(RECORD_TRIPLET),
            bump: Script::new(BUMP_CLIENT),
        }
    }

    fn key(&self, kind: Kind, key: &str) -> String {
        match kind {
            Kind::Triplet => format!("{}t:{key}", self.prefix),
            Kind::Client => format!("{}c:{key}", self.prefix),
        }
    }

    fn parse(key: &str, value: &str) -> Result<(u64, u64), StoreError> {
        value
            .split_once(',')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.split(',').next()?.parse().ok()?)))
            .ok_or_else(|| StoreError::Corrupt {
                key: key.to_owned(),
                value: value.to_owned(),
            })
    }

    /// Keys matching a pattern (SCAN, so a large keyspace is walked in steps). On a cluster
    /// this walks the node the command is routed to; `greylist list` on a cluster is partial.
    async fn scan(&self, pattern: &str, limit: u64) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut keys = Vec::new();
        for _ in 0..100_000 {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 || keys.len() as u64 >= limit {
                break;
            }
        }
        keys.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        Ok(keys)
    }
}

/// Escapes Redis glob characters.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Store for RedisStore {
    async fn record_triplet(
        &self,
        key: &str,
        now: u64,
        rules: TripletRules,
    ) -> Result<TripletSeen, StoreError> {
        let mut conn = self.conn.clone();
        let (first, passed): (u64, u8) = self
            .record
            .key(self.key(Kind::Triplet, key))
            .arg(now)
            .arg(rules.delay)
            .arg(rules.retry_window)
            .arg(self.ttl)
            .invoke_async(&mut conn)
            .await?;
        Ok(TripletSeen {
            first,
            last_was_successful: passed != 0,
        })
    }

    async fn client(&self, key: &str) -> Result<Option<ClientCount>, StoreError> {
        let mut conn = self.conn.clone();
        let full = self.key(Kind::Client, key);
        let value: Option<String> = redis::cmd("GET").arg(&full).query_async(&mut conn).await?;
        value
            .map(|v| Self::parse(&full, &v).map(|(count, last)| ClientCount { count, last }))
            .transpose()
    }

    async fn bump_client(&self, key: &str, now: u64) -> Result<Option<ClientCount>, StoreError> {
        let mut conn = self.conn.clone();
        let result: Option<(u64, u64)> = self
            .bump
            .key(self.key(Kind::Client, key))
            .arg(now)
            .arg(AWL_INTERVAL)
            .arg(self.ttl)
            .invoke_async(&mut conn)
            .await?;
        Ok(result.map(|(count, last)| ClientCount { count, last }))
    }

    async fn expire(&self, _cutoff: u64, _batch: u32) -> Result<u64, StoreError> {
        // Redis expires keys by their TTL.
        Ok(0)
    }

    async fn list(&self, filter: &str, limit: u64) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        for kind in [Kind::Triplet, Kind::Client] {
            let pattern = format!("{}*{}*", self.key(kind, ""), glob_escape(filter));
            let keys = self.scan(&pattern, limit).await?;
            let mut conn = self.conn.clone();
            for full in keys {
                let value: Option<String> =
                    redis::cmd("GET").arg(&full).query_async(&mut conn).await?;
                if let Some(value) = value {
                    let (first_or_count, last) = Self::parse(&full, &value)?;
                    let prefix_len = self.key(kind, "").len();
                    out.push(Entry {
                        kind,
                        key: full[prefix_len..].to_owned(),
                        first_or_count,
                        last,
                    });
                }
            }
        }
        out.sort_by(|a, b| (a.kind as u8, &a.key).cmp(&(b.kind as u8, &b.key)));
        out.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        Ok(out)
    }

    async fn delete(&self, kind: Kind, key: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let n: u64 = redis::cmd("DEL")
            .arg(self.key(kind, key))
            .query_async(&mut conn)
            .await?;
        Ok(n > 0)
    }

    async fn stats(&self, delay: u64) -> Result<Stats, StoreError> {
        let mut stats = Stats::default();
        for entry in self.list("", u64::MAX).await? {
            match entry.kind {
                Kind::Triplet => {
                    stats.triplets += 1;
                    if entry.last.saturating_sub(entry.first_or_count) >= delay {
                        stats.passed += 1;
                    }
                }
                Kind::Client => stats.clients += 1,
            }
        }
        Ok(stats)
    }

    async fn import(&self, entries: &[Entry]) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut imported = 0;
        for chunk in entries.chunks(500) {
            let mut pipe = redis::pipe();
            for entry in chunk {
                // The TTL counts from when the entry was last seen, as SQLite expiry does.
                let ttl = (entry.last + self.ttl).saturating_sub(now);
                if ttl == 0 {
                    continue;
                }
                pipe.cmd("SET")
                    .arg(self.key(entry.kind, &entry.key))
                    .arg(format!("{},{}", entry.first_or_count, entry.last))
                    .arg("EX")
                    .arg(ttl)
                    .ignore();
                imported += 1;
            }
            let () = pipe.query_async(&mut conn).await?;
        }
        Ok(imported)
    }
}
