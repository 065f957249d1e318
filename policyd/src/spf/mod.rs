//! SPF checks as policyd-spf. Placeholder with the agreed API until the SPF module lands: every
//! request is answered DUNNO.

use postern_common::config::{ConfigError, DnsConfig};
use serde::{Deserialize, Serialize};

use crate::proto::{PolicyReply, PolicyRequest};

/// The `[spf]` table of the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpfConfig {}

/// The SPF check, built from the configuration.
#[derive(Debug)]
pub struct SpfCheck {}

impl SpfCheck {
    /// Builds the check.
    pub fn new(config: &SpfConfig, dns: &DnsConfig) -> Result<SpfCheck, ConfigError> {
        let _ = (config, dns);
        Ok(SpfCheck {})
    }

    /// Decides one request.
    pub async fn check(&self, request: &PolicyRequest) -> PolicyReply {
        let _ = request;
        PolicyReply::dunno()
    }
}
