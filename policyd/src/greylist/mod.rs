//! Greylisting as postgrey does it: whitelists, auto-whitelisted clients (AWL), triplets in a
//! store, postgrey's answers. [`logic`] is the pure algorithm, [`whitelist`] the file formats,
//! [`store`] the storage trait with the [`sqlite`] and [`redis_store`] backends.

pub mod import;
pub mod logic;
pub mod redis_store;
pub mod sqlite;
pub mod store;
pub mod whitelist;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use ipnet::IpNet;
use postern_common::clock::{Clock, SystemClock};
use postern_common::config::{ConfigDuration, ConfigError};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use tracing::{debug, info, warn};

use crate::proto::{PolicyReply, PolicyRequest};
use logic::{ClientCount, ClientKeying, InstanceMemory, TripletRules, TripletSeen};
use redis_store::RedisStore;
use sqlite::SqliteStore;
use store::{
    Entry, GreylistStep, Kind, MemoryStore, Stats, StepOutcome, Store, StoreError, StoreUrl,
};
use whitelist::{ClientWhitelist, RecipientWhitelist};

/// The `[greylist]` table. Defaults are postgrey's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GreylistConfig {
    /// How long a new triplet is refused (postgrey `--delay`).
    pub delay: ConfigDuration,
    /// Triplets and AWL clients not seen for this long are deleted (postgrey `--max-age`).
    pub max_age: ConfigDuration,
    /// The first retry must arrive within this time of the first attempt, otherwise the
    /// triplet starts over (postgrey `--retry-window`).
    pub retry_window: ConfigDuration,
    /// Whitelist a client after this many successful deliveries, counted at most once an hour;
    /// 0 disables the auto-whitelist (postgrey `--auto-whitelist-clients`).
    pub auto_whitelist_clients: u64,
    /// Client whitelist files in postgrey's format (regexes on the client name, IPs,
    /// networks, domain suffixes). Missing files are skipped with a warning (silently for
    /// `*.local`).
    pub whitelist_clients: Vec<PathBuf>,
    /// Recipient whitelist files in postgrey's format (`/regex/`, `user@domain`, `user@`,
    /// `domain`).
    pub whitelist_recipients: Vec<PathBuf>,
    /// Where triplets live: "sqlite:" (greylist.sqlite under state_dir), "sqlite:/path",
    /// "redis://host:6379/0", "redis+cluster://host1:7000,host2:7000", or "memory:" (lost on
    /// restart and reload).
    pub store: String,
    /// Prefix of every Redis key.
    pub redis_prefix: String,
    /// Longest wait for the store on one request; past it (or on any store error) the
    /// request gets `fallback_action`.
    pub store_timeout: ConfigDuration,
    /// The answer when the store fails or is too slow: "DUNNO" (fail open, the default) or,
    /// for example, "DEFER_IF_PERMIT 4.3.0 Greylist store unavailable".
    pub fallback_action: String,
    /// IPv4 prefix length of the client network in the triplet (postgrey `--ipv4cidr`).
    pub ipv4_cidr: u8,
    /// IPv6 prefix length of the client network in the triplet (postgrey `--ipv6cidr`).
    pub ipv6_cidr: u8,
    /// Key triplets by the whole client address instead of its network
    /// (postgrey `--lookup-by-host`).
    pub lookup_by_host: bool,
    /// The access(5) action for a greylisted request (postgrey `--greylist-action`).
    pub greylist_action: String,
    /// The text after it: `%s` = seconds left, `%r` = recipient domain
    /// (postgrey `--greylist-text`). "4.2.0 " is put in front when Postfix sends
    /// `etrn_domain` and the text does not start with a digit.
    pub greylist_text: String,
    /// Store SHA-1 hashes of keys instead of addresses (postgrey `--privacy`).
    pub privacy: bool,
    /// The header prepended to a message that passed after a delay, once per message: `%t`
    /// seconds delayed, `%v` version, `%h` host name, `%d` date (postgrey
    /// `--x-greylist-header`). Empty: no header.
    pub x_greylist_header: String,
    /// Host name for `%h`; empty: this machine's name.
    pub hostname: String,
    /// Clients never greylisted (besides the whitelist files), e.g. ["192.0.2.0/24"].
    pub trusted_networks: Vec<IpNet>,
    /// Do not greylist SASL-authenticated clients (requests with a `sasl_username`).
    pub skip_authenticated: bool,
    /// How often the SQLite store deletes entries older than `max_age`.
    pub expiry_interval: ConfigDuration,
    /// Rows deleted per expiry step; small steps keep requests fast during expiry.
    pub expiry_batch: u32,
}

impl Default for GreylistConfig {
    fn default() -> Self {
        Self {
            delay: ConfigDuration::from_secs(300),
            max_age: ConfigDuration::from_secs(35 * 86_400),
            retry_window: ConfigDuration::from_secs(2 * 86_400),
            auto_whitelist_clients: 5,
            whitelist_clients: vec![
                PathBuf::from("/etc/postgrey/whitelist_clients"),
                PathBuf::from("/etc/postgrey/whitelist_clients.local"),
            ],
            whitelist_recipients: vec![PathBuf::from("/etc/postgrey/whitelist_recipients")],
            store: "sqlite:".to_owned(),
            redis_prefix: "postern:greylist:".to_owned(),
            store_timeout: ConfigDuration::from_secs(1),
            fallback_action: "DUNNO".to_owned(),
            ipv4_cidr: 24,
            ipv6_cidr: 64,
            lookup_by_host: false,
            greylist_action: "DEFER_IF_PERMIT".to_owned(),
            greylist_text: "Greylisted, see http://postgrey.schweikert.ch/help/%r.html".to_owned(),
            privacy: false,
            x_greylist_header: "X-Greylist: delayed %t seconds by postgrey-%v at %h; %d".to_owned(),
            hostname: String::new(),
            trusted_networks: Vec::new(),
            skip_authenticated: true,
            expiry_interval: ConfigDuration::from_secs(600),
            expiry_batch: 500,
        }
    }
}

impl GreylistConfig {
    /// Cross-field checks.
    pub fn validate(&self, state_dir: &Path) -> Result<(), ConfigError> {
        if self.ipv4_cidr > 32 {
            return Err(ConfigError::invalid(
                "greylist.ipv4_cidr",
                "must be 0 to 32",
            ));
        }
        if self.ipv6_cidr > 128 {
            return Err(ConfigError::invalid(
                "greylist.ipv6_cidr",
                "must be 0 to 128",
            ));
        }
        if self.max_age.as_secs() < self.delay.as_secs() {
            return Err(ConfigError::invalid(
                "greylist.max_age",
                "must be at least the delay",
            ));
        }
        if self.store_timeout.get().is_zero() {
            return Err(ConfigError::invalid(
                "greylist.store_timeout",
                "must be more than zero",
            ));
        }
        if self.expiry_batch == 0 || self.expiry_interval.get().is_zero() {
            return Err(ConfigError::invalid(
                "greylist.expiry_batch",
                "expiry_batch and expiry_interval must be more than zero",
            ));
        }
        if self.greylist_action.trim().is_empty() || self.fallback_action.trim().is_empty() {
            return Err(ConfigError::invalid(
                "greylist.greylist_action",
                "greylist_action and fallback_action must not be empty",
            ));
        }
        StoreUrl::parse(&self.store, state_dir)
            .map_err(|err| ConfigError::invalid("greylist.store", err.to_string()))?;
        Ok(())
    }

    fn rules(&self) -> TripletRules {
        TripletRules {
            delay: self.delay.as_secs(),
            retry_window: self.retry_window.as_secs(),
        }
    }
}

/// This machine's host name (for `%h`).
pub fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// An opened store of any kind.
#[derive(Debug)]
pub enum Backend {
    /// SQLite.
    Sqlite(SqliteStore),
    /// Redis or Redis Cluster.
    Redis(RedisStore),
    /// Memory.
    Memory(MemoryStore),
}

macro_rules! dispatch {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            Backend::Sqlite($store) => $call,
            Backend::Redis($store) => $call,
            Backend::Memory($store) => $call,
        }
    };
}

impl Backend {
    /// Opens the store a URL names.
    pub async fn open(url: &StoreUrl, config: &GreylistConfig) -> Result<Self, StoreError> {
        let ttl = config.max_age.as_secs();
        let timeout = config.store_timeout.get();
        Ok(match url {
            StoreUrl::Sqlite(path) => Self::Sqlite(SqliteStore::open(path).await?),
            StoreUrl::Redis(url) => {
                Self::Redis(RedisStore::connect(url, &config.redis_prefix, ttl, timeout).await?)
            }
            StoreUrl::RedisCluster(nodes) => Self::Redis(
                RedisStore::connect_cluster(nodes, &config.redis_prefix, ttl, timeout).await?,
            ),
            StoreUrl::Memory => Self::Memory(MemoryStore::default()),
        })
    }

    /// Commits what the store still holds in flight (SQLite answers before its commit).
    pub async fn close(&self) {
        if let Self::Sqlite(sqlite) = self {
            sqlite.close().await;
        }
    }
}

impl Store for Backend {
    async fn record_triplet(
        &self,
        key: &str,
        now: u64,
        rules: TripletRules,
    ) -> Result<TripletSeen, StoreError> {
        dispatch!(self, s => s.record_triplet(key, now, rules).await)
    }
    async fn client(&self, key: &str) -> Result<Option<ClientCount>, StoreError> {
        dispatch!(self, s => s.client(key).await)
    }
    async fn bump_client(&self, key: &str, now: u64) -> Result<Option<ClientCount>, StoreError> {
        dispatch!(self, s => s.bump_client(key, now).await)
    }
    async fn expire(&self, cutoff: u64, batch: u32) -> Result<u64, StoreError> {
        dispatch!(self, s => s.expire(cutoff, batch).await)
    }
    async fn list(&self, filter: &str, limit: u64) -> Result<Vec<Entry>, StoreError> {
        dispatch!(self, s => s.list(filter, limit).await)
    }
    async fn delete(&self, kind: Kind, key: &str) -> Result<bool, StoreError> {
        dispatch!(self, s => s.delete(kind, key).await)
    }
    async fn stats(&self, delay: u64) -> Result<Stats, StoreError> {
        dispatch!(self, s => s.stats(delay).await)
    }
    async fn import(&self, entries: &[Entry]) -> Result<u64, StoreError> {
        dispatch!(self, s => s.import(entries).await)
    }
    async fn greylist_step(&self, step: &GreylistStep) -> Result<StepOutcome, StoreError> {
        dispatch!(self, s => s.greylist_step(step).await)
    }
}

/// An answer and why, for the decision log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The answer.
    pub reply: PolicyReply,
    /// postgrey's reason words: "new", "early-retry (42s missing)", "client whitelist",
    /// "recipient whitelist", "client AWL", "triplet found", "triplet found, delay=313", or
    /// why greylisting did not apply.
    pub reason: String,
}

impl Verdict {
    fn dunno(reason: impl Into<String>) -> Self {
        Self {
            reply: PolicyReply::dunno(),
            reason: reason.into(),
        }
    }
}

/// The greylisting check: whitelists loaded, store opened on first use.
pub struct Greylist {
    config: GreylistConfig,
    url: StoreUrl,
    clients: ClientWhitelist,
    recipients: RecipientWhitelist,
    hostname: String,
    clock: Arc<dyn Clock>,
    backend: OnceCell<Arc<Backend>>,
    instances: Mutex<InstanceMemory>,
    /// Background expiry runs while this lives.
    alive: Arc<()>,
}

impl std::fmt::Debug for Greylist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Greylist")
            .field("url", &self.url)
            .field("clients", &self.clients.len())
            .field("recipients", &self.recipients.len())
            .finish_non_exhaustive()
    }
}

impl Greylist {
    /// Loads the whitelists and checks the store URL; the store itself opens on first use
    /// (so a store that is down at start is retried on each request).
    pub fn new(config: &GreylistConfig, state_dir: &Path) -> Result<Self, ConfigError> {
        Self::with_clock(config, state_dir, Arc::new(SystemClock))
    }

    /// As [`Greylist::new`], with a clock (tests).
    pub fn with_clock(
        config: &GreylistConfig,
        state_dir: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ConfigError> {
        config.validate(state_dir)?;
        let url = StoreUrl::parse(&config.store, state_dir)
            .map_err(|err| ConfigError::invalid("greylist.store", err.to_string()))?;
        let clients = ClientWhitelist::load(&config.whitelist_clients)
            .map_err(|err| ConfigError::invalid("greylist.whitelist_clients", err.to_string()))?;
        let recipients = RecipientWhitelist::load(&config.whitelist_recipients).map_err(|err| {
            ConfigError::invalid("greylist.whitelist_recipients", err.to_string())
        })?;
        let hostname = if config.hostname.is_empty() {
            system_hostname()
        } else {
            config.hostname.clone()
        };
        Ok(Self {
            config: config.clone(),
            url,
            clients,
            recipients,
            hostname,
            clock,
            backend: OnceCell::new(),
            instances: Mutex::new(InstanceMemory::new(1024)),
            alive: Arc::new(()),
        })
    }

    /// The store, opened (and its background expiry started) on first use.
    pub async fn store(&self) -> Result<&Arc<Backend>, StoreError> {
        self.backend
            .get_or_try_init(|| async {
                let backend = Arc::new(Backend::open(&self.url, &self.config).await?);
                if matches!(&*backend, Backend::Sqlite(_) | Backend::Memory(_))
                    && tokio::runtime::Handle::try_current().is_ok()
                {
                    tokio::spawn(expire_in_background(
                        Arc::downgrade(&self.alive),
                        backend.clone(),
                        self.clock.clone(),
                        self.config.clone(),
                    ));
                }
                Ok(backend)
            })
            .await
    }

    /// Closes the store if it was opened: at shutdown, so that nothing answered is left
    /// uncommitted.
    pub async fn close(&self) {
        if let Some(backend) = self.backend.get() {
            backend.close().await;
        }
    }

    /// Decides one request at the clock's time (or `policy_test_time`).
    pub async fn check(&self, request: &PolicyRequest) -> Verdict {
        let now = request
            .get("policy_test_time")
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or_else(|| self.clock.unix());
        let timeout = self.config.store_timeout.get();
        match self.decide(request, now, timeout).await {
            Ok(verdict) => verdict,
            Err(err) => {
                warn!(
                    client = request.get("client_address").unwrap_or(""),
                    queue_id = request.get("queue_id").unwrap_or(""),
                    error = %err,
                    fallback = %self.config.fallback_action,
                    "greylist store failed; answering with the fallback action"
                );
                metrics::counter!("postern_policyd_greylist_store_errors_total").increment(1);
                Verdict {
                    reply: PolicyReply::new(self.config.fallback_action.clone()),
                    reason: format!("store failure ({err})"),
                }
            }
        }
    }

    async fn decide(
        &self,
        request: &PolicyRequest,
        now: u64,
        timeout: Duration,
    ) -> Result<Verdict, GreylistStoreError> {
        if let Some(state) = request.get("protocol_state")
            && !state.eq_ignore_ascii_case("RCPT")
        {
            return Ok(Verdict::dunno(format!("not at RCPT ({state})")));
        }
        let mut attrs = [""; 4];
        for (slot, name) in
            attrs
                .iter_mut()
                .zip(["client_address", "client_name", "recipient", "sender"])
        {
            match request.get(name) {
                Some(value) => *slot = value,
                None => return Ok(Verdict::dunno(format!("attribute missing: {name}"))),
            }
        }
        let [address, client_name, recipient, sender] = attrs;
        let Ok(ip) = address.trim().parse::<IpAddr>() else {
            return Ok(Verdict::dunno(format!("bad client_address {address:?}")));
        };
        if self.config.skip_authenticated
            && request.get("sasl_username").is_some_and(|u| !u.is_empty())
        {
            return Ok(Verdict::dunno("authenticated client"));
        }
        if self.config.trusted_networks.iter().any(|n| n.contains(&ip)) {
            return Ok(Verdict::dunno("trusted network"));
        }
        if self.clients.matches_name(client_name) || self.clients.matches_address(ip) {
            return Ok(Verdict::dunno("client whitelist"));
        }
        if self.recipients.matches(recipient) {
            return Ok(Verdict::dunno("recipient whitelist"));
        }

        // Store work, bounded as a whole. Opening happens once, and its future (a Redis
        // connection's) is kilobytes: boxed, so that every later request neither carries it in
        // its own state nor copies it into a timeout.
        let store = match self.backend.get() {
            Some(store) => store,
            None => tokio::time::timeout(timeout, Box::pin(self.store()))
                .await
                .map_err(|_| GreylistStoreError::Timeout(timeout))??,
        };
        let awl_key = logic::client_awl_key(ip, self.config.privacy);
        let keying = ClientKeying {
            ipv4_prefix: self.config.ipv4_cidr,
            ipv6_prefix: self.config.ipv6_cidr,
            by_host: self.config.lookup_by_host,
        };
        let rules = self.config.rules();
        let step = GreylistStep {
            triplet_key: logic::triplet_key(
                &logic::client_net(ip, keying),
                sender,
                recipient,
                self.config.privacy,
            ),
            awl_key,
            now,
            rules,
            awl_threshold: self.config.auto_whitelist_clients,
        };
        let work = async {
            match store.greylist_step(&step).await? {
                StepOutcome::ClientAwl => Ok(Verdict::dunno("client AWL")),
                StepOutcome::Triplet {
                    seen,
                    client_bumped,
                } => {
                    if client_bumped.is_some_and(|c| c.count == step.awl_threshold) {
                        info!(client = %ip, client_name, "client auto-whitelisted");
                    }
                    Ok::<_, StoreError>(self.answer(request, seen, now, rules.delay, recipient))
                }
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| GreylistStoreError::Timeout(timeout))?
            .map_err(GreylistStoreError::Store)
    }

    fn answer(
        &self,
        request: &PolicyRequest,
        seen: TripletSeen,
        now: u64,
        delay: u64,
        recipient: &str,
    ) -> Verdict {
        let waited = now.saturating_sub(seen.first);
        if waited < delay {
            let left = delay - waited;
            let action = logic::greylist_answer(
                &self.config.greylist_action,
                &self.config.greylist_text,
                left,
                recipient,
                request.get("etrn_domain").is_some(),
            );
            let reason = if now == seen.first {
                "new".to_owned()
            } else {
                format!("early-retry ({left}s missing)")
            };
            return Verdict {
                reply: PolicyReply::new(action),
                reason,
            };
        }
        if !seen.last_was_successful && !self.config.x_greylist_header.is_empty() {
            let new_instance = self
                .instances
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_new(request.get("instance"));
            if new_instance {
                let header = logic::x_greylist_header(
                    &self.config.x_greylist_header,
                    waited,
                    &logic::rfc2822_utc(now),
                    &self.hostname,
                );
                return Verdict {
                    reply: PolicyReply::new(format!("PREPEND {header}")),
                    reason: format!("triplet found, delay={waited}"),
                };
            }
        }
        Verdict::dunno("triplet found")
    }

    /// The effective configuration.
    pub fn config(&self) -> &GreylistConfig {
        &self.config
    }
}

/// A store failure or a store too slow.
#[derive(Debug, thiserror::Error)]
enum GreylistStoreError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Deletes entries older than `max_age` every `expiry_interval`, in batches with a pause
/// between them so requests never wait behind a long delete. Ends when the greylist that
/// started it is dropped (a reload builds a new one).
async fn expire_in_background(
    alive: Weak<()>,
    store: Arc<Backend>,
    clock: Arc<dyn Clock>,
    config: GreylistConfig,
) {
    let interval = config.expiry_interval.get();
    let max_age = config.max_age.as_secs();
    loop {
        tokio::time::sleep(interval).await;
        if alive.strong_count() == 0 {
            return;
        }
        let cutoff = clock.unix().saturating_sub(max_age);
        let mut total = 0u64;
        // Bounded: at most 100 000 batches per run; the next run continues.
        for _ in 0..100_000 {
            if alive.strong_count() == 0 {
                return;
            }
            match store.expire(cutoff, config.expiry_batch).await {
                Ok(0) => break,
                Ok(n) => {
                    total += n;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(err) => {
                    warn!(error = %err, "greylist expiry failed; retrying at the next run");
                    break;
                }
            }
        }
        if total > 0 {
            info!(deleted = total, "expired old greylist entries");
            metrics::counter!("postern_policyd_greylist_expired_total").increment(total);
        } else {
            debug!("greylist expiry: nothing to delete");
        }
    }
}

#[cfg(test)]
mod tests;
