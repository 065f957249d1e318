//! The DNS resolver every daemon builds from `[dns]`: the system's (/etc/resolv.conf) or the
//! listed name servers, with the configured timeout and attempts, and hickory's answer cache.

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

use crate::config::DnsConfig;

/// Why a resolver could not be built.
#[derive(Debug, thiserror::Error)]
#[error("dns: {0}")]
pub struct DnsSetupError(String);

/// The hickory configuration `[dns]` describes (mail-auth's `MessageAuthenticator::new` takes
/// exactly these).
pub fn resolver_parts(config: &DnsConfig) -> Result<(ResolverConfig, ResolverOpts), DnsSetupError> {
    let (resolver_config, mut opts) = if config.nameservers.is_empty() {
        hickory_resolver::system_conf::read_system_conf().map_err(|err| {
            DnsSetupError(format!(
                "cannot read the system resolver configuration: {err}"
            ))
        })?
    } else {
        let servers = config
            .nameservers
            .iter()
            .map(|addr| {
                let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                for connection in &mut server.connections {
                    connection.port = addr.port();
                }
                server
            })
            .collect();
        let mut opts = ResolverOpts::default();
        // Explicit servers are authoritative for tests and split-horizon setups; /etc/hosts
        // answering instead would hide what they serve.
        opts.use_hosts_file = ResolveHosts::Never;
        (ResolverConfig::from_name_servers(servers), opts)
    };
    opts.timeout = config.timeout.get();
    opts.attempts = config.attempts;
    opts.cache_size = config.cache_size;
    Ok((resolver_config, opts))
}

/// A resolver for lookups that mail-auth does not make (PTR, MX, A for greylisting, selector
/// checks).
pub fn resolver(config: &DnsConfig) -> Result<TokioResolver, DnsSetupError> {
    let (resolver_config, opts) = resolver_parts(config)?;
    TokioResolver::builder_with_config(resolver_config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(|err| DnsSetupError(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigDuration;

    #[test]
    fn explicit_servers_keep_their_ports_and_timeouts() {
        let config = DnsConfig {
            nameservers: vec![
                "127.0.0.1:5353".parse().unwrap(),
                "[::1]:53".parse().unwrap(),
            ],
            timeout: ConfigDuration::from_secs(2),
            attempts: 1,
            cache_size: 100,
        };
        let (resolver_config, opts) = resolver_parts(&config).unwrap();
        let servers = resolver_config.name_servers();
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[0].ip.to_string(), "127.0.0.1");
        assert!(servers[0].connections.iter().all(|c| c.port == 5353));
        assert!(servers[1].connections.iter().all(|c| c.port == 53));
        assert_eq!(opts.timeout, std::time::Duration::from_secs(2));
        assert_eq!(opts.attempts, 1);
        assert_eq!(opts.use_hosts_file, ResolveHosts::Never);
    }

    #[tokio::test]
    async fn resolver_builds_from_explicit_servers() {
        let config = DnsConfig {
            nameservers: vec!["127.0.0.1:5353".parse().unwrap()],
            ..DnsConfig::default()
        };
        resolver(&config).unwrap();
    }
}
