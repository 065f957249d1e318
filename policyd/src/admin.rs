//! `postern-policyd greylist ...`: the administrator's commands on the greylist store
//! (import from postgrey, list, delete, stats). Output is plain text for shell pipelines.

use std::io::Write;
use std::path::Path;

use postern_common::config::{self, ConfigError};

use crate::config::PolicydConfig;
use crate::greylist::store::{Kind, Store, StoreUrl};
use crate::greylist::{Backend, import};

/// What an admin command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The configuration is unusable (exit 78).
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// Anything at run time (exit 1).
    #[error("{0}")]
    Runtime(String),
}

impl AdminError {
    fn runtime(err: impl std::fmt::Display) -> Self {
        Self::Runtime(err.to_string())
    }
}

/// Loads the configuration and opens the greylist store it names.
pub async fn open_store(
    config_path: Option<&Path>,
) -> Result<(PolicydConfig, Backend), AdminError> {
    let (config, used) = config::load_path::<PolicydConfig>(config_path)?;
    postern_common::daemon::ensure_state_dir(&config.state_dir)
        .map_err(|e| e.in_file(used.as_deref()))?;
    let url = StoreUrl::parse(&config.greylist.store, &config.state_dir)
        .map_err(|e| ConfigError::invalid("greylist.store", e.to_string()))?;
    let backend = Backend::open(&url, &config.greylist)
        .await
        .map_err(AdminError::runtime)?;
    Ok((config, backend))
}

/// `greylist import-postgrey DIR`: copies postgrey's triplets and AWL clients.
pub async fn import_postgrey(
    config_path: Option<&Path>,
    dir: &Path,
    db_dump: &str,
    out: &mut dyn Write,
) -> Result<(), AdminError> {
    let (entries, skipped) =
        import::read_postgrey_dir(db_dump, dir).map_err(AdminError::runtime)?;
    let (_, store) = open_store(config_path).await?;
    let triplets = entries.iter().filter(|e| e.kind == Kind::Triplet).count();
    let clients = entries.len() - triplets;
    let written = store.import(&entries).await.map_err(AdminError::runtime)?;
    writeln!(
        out,
        "imported {triplets} triplets and {clients} clients from {} ({written} written, {skipped} unreadable entries skipped)",
        dir.display()
    )
    .map_err(AdminError::runtime)?;
    Ok(())
}

/// `greylist list [FILTER]`: one line per entry.
pub async fn list(
    config_path: Option<&Path>,
    filter: &str,
    limit: u64,
    out: &mut dyn Write,
) -> Result<(), AdminError> {
    let (_, store) = open_store(config_path).await?;
    for entry in store
        .list(filter, limit)
        .await
        .map_err(AdminError::runtime)?
    {
        let line = match entry.kind {
            Kind::Triplet => format!(
                "triplet {} first={} last={}",
                entry.key, entry.first_or_count, entry.last
            ),
            Kind::Client => format!(
                "client {} count={} last={}",
                entry.key, entry.first_or_count, entry.last
            ),
        };
        writeln!(out, "{line}").map_err(AdminError::runtime)?;
    }
    Ok(())
}

/// `greylist delete KEY`: removes a triplet (or, with `client`, an AWL client).
pub async fn delete(
    config_path: Option<&Path>,
    key: &str,
    client: bool,
    out: &mut dyn Write,
) -> Result<bool, AdminError> {
    let (_, store) = open_store(config_path).await?;
    let kind = if client { Kind::Client } else { Kind::Triplet };
    let found = store.delete(kind, key).await.map_err(AdminError::runtime)?;
    writeln!(out, "{}", if found { "deleted" } else { "not found" })
        .map_err(AdminError::runtime)?;
    Ok(found)
}

/// `greylist stats`.
pub async fn stats(config_path: Option<&Path>, out: &mut dyn Write) -> Result<(), AdminError> {
    let (config, store) = open_store(config_path).await?;
    let stats = store
        .stats(config.greylist.delay.as_secs())
        .await
        .map_err(AdminError::runtime)?;
    writeln!(
        out,
        "triplets {}\npassed {}\nwaiting {}\nclients {}",
        stats.triplets,
        stats.passed,
        stats.triplets - stats.passed,
        stats.clients
    )
    .map_err(AdminError::runtime)?;
    Ok(())
}
