//! SPF checks as postfix-policyd-spf-python (spf-engine 3.0.4) does them: same settings, same
//! decisions, same answers byte for byte. `config` is the `[spf]` table, `decide` the pure
//! decision over injected DNS, `header` the exact texts, `eval` RFC 7208 evaluation over the
//! common resolver, `import` the policyd-spf.conf converter.
//! The request's I/O belongs to `server`; nothing here touches a socket.

pub mod config;
pub mod decide;
pub mod eval;
pub mod header;
pub mod import;

use std::sync::Mutex;

use postern_common::config::{ConfigError, DnsConfig};
use tracing::debug;

pub use self::config::{HeaderType, HeloReject, MailFromReject, SpfConfig};
pub use self::decide::{Attributes, InstanceCache, Outcome, Settings};
use self::eval::ResolverLookups;
pub use self::import::{ImportError, import_policyd_spf_conf};
use crate::proto::{PolicyReply, PolicyRequest};

/// This host's name, for `authserv_id = "HOSTNAME"` and the `%{r}` macro.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The SPF check, built from the configuration; shared by every connection.
#[derive(Debug)]
pub struct SpfCheck {
    settings: Settings,
    lookups: ResolverLookups,
    instances: Mutex<InstanceCache>,
}

impl SpfCheck {
    /// Builds the check: validates the table and builds the resolver.
    pub fn new(config: &SpfConfig, dns: &DnsConfig) -> Result<SpfCheck, ConfigError> {
        config.validate()?;
        let host = hostname();
        let settings = Settings::new(config.clone(), &host);
        let lookups = ResolverLookups::new(dns, config.void_limit, &settings.authserv_id)?;
        Ok(SpfCheck {
            instances: Mutex::new(InstanceCache::new(config.remembered_messages)),
            settings,
            lookups,
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Decides one request.
    ///
    /// Every DNS wait is bounded by `lookup_time` per identity (and `whitelist_lookup_time` per
    /// whitelist lookup), so Postfix always gets an answer.
    pub async fn check(&self, request: &PolicyRequest) -> PolicyReply {
        self.check_with_reason(request).await.0
    }

    /// Decides one request; also says why, for the server's one decision line per request
    /// (the details of the SPF evaluation are logged at debug level).
    pub async fn check_with_reason(&self, request: &PolicyRequest) -> (PolicyReply, String) {
        let config = &self.settings.config;
        let queue_id = request.get("queue_id").unwrap_or("");
        if config.mock {
            return (
                PolicyReply::new("dunno mock header field that should be ignored"),
                "spf mock".to_owned(),
            );
        }
        if config.skip_authenticated
            && request
                .get("sasl_username")
                .is_some_and(|user| !user.is_empty())
        {
            return (
                PolicyReply::new("dunno"),
                "spf not checked: sasl authenticated".to_owned(),
            );
        }
        let attrs = Attributes::from_request(request, config.hide_receiver);
        let replayed = attrs.instance.as_deref().and_then(|instance| {
            self.instances
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .replay(instance)
        });
        let (outcome, repeat) = match replayed {
            Some(outcome) => (outcome, true),
            None => {
                let outcome = decide::decide(&self.settings, &self.lookups, &attrs).await;
                if let Some(instance) = attrs.instance.as_deref() {
                    self.instances
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .remember(instance, &outcome);
                }
                (outcome, false)
            }
        };
        let action = decide::action_text(config, &outcome);
        metrics::counter!("postern_policyd_spf_decisions_total", "outcome" => outcome.kind())
            .increment(1);
        debug!(
            queue_id,
            client = attrs.client_address.as_deref().unwrap_or(""),
            helo = attrs.helo_name.as_deref().unwrap_or(""),
            sender = attrs.sender.as_deref().unwrap_or(""),
            recipient = request.get("recipient").unwrap_or(""),
            outcome = outcome.kind(),
            repeat,
            action = %action,
            "spf"
        );
        let reason = if repeat {
            format!("spf {} (same message)", outcome.kind())
        } else {
            format!("spf {}", outcome.kind())
        };
        (PolicyReply::new(action), reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(config: SpfConfig) -> SpfCheck {
        // Nothing listens on port 9 of loopback: any lookup fails at once.
        let dns = DnsConfig {
            nameservers: vec!["127.0.0.1:9".parse().unwrap()],
            ..DnsConfig::default()
        };
        SpfCheck::new(&config, &dns).unwrap()
    }

    #[tokio::test]
    async fn mock_and_authenticated_clients_are_answered_without_lookups() {
        let request = PolicyRequest::from_pairs([
            ("client_address", "192.0.2.1"),
            ("sender", "a@example.com"),
            ("sasl_username", "alice"),
        ]);
        let mock = check(SpfConfig {
            mock: true,
            ..SpfConfig::default()
        });
        assert_eq!(
            mock.check(&request).await.action(),
            "dunno mock header field that should be ignored"
        );
        let default = check(SpfConfig::default());
        assert_eq!(default.check(&request).await.action(), "dunno");
    }

    #[tokio::test]
    async fn bypassed_clients_get_one_header_per_message() {
        let check = check(SpfConfig::default());
        let first = PolicyRequest::from_pairs([
            ("client_address", "127.0.0.1"),
            ("helo_name", "localhost"),
            ("sender", "a@example.com"),
            ("recipient", "b@example.net"),
            ("instance", "abc.1"),
        ]);
        assert_eq!(
            check.check(&first).await.action(),
            "prepend X-Comment: SPF check N/A for local connections - client-ip=127.0.0.1; helo=localhost; envelope-from=a@example.com; receiver=example.net "
        );
        assert_eq!(check.check(&first).await.action(), "dunno");
    }

    #[test]
    fn invalid_settings_fail_the_build() {
        let dns = DnsConfig::default();
        let err = SpfCheck::new(
            &SpfConfig {
                remembered_messages: 0,
                ..SpfConfig::default()
            },
            &dns,
        )
        .unwrap_err();
        assert!(err.to_string().contains("spf.remembered_messages"), "{err}");
    }
}
