//! A Postfix policy-delegation client (what smtpd does for check_policy_service).

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::{Io, Target, connect};

/// One connection to a policy server.
pub struct PolicyClient {
    stream: BufReader<Box<dyn Io>>,
}

impl PolicyClient {
    /// Connects.
    pub async fn connect(target: &Target) -> anyhow::Result<Self> {
        Ok(Self {
            stream: BufReader::new(connect(target).await?),
        })
    }

    /// Sends one request (attribute pairs) and returns the action text (after `action=`).
    pub async fn ask(&mut self, attrs: &[(&str, &str)]) -> anyhow::Result<String> {
        let mut request = String::new();
        for (name, value) in attrs {
            request.push_str(name);
            request.push('=');
            request.push_str(value);
            request.push('\n');
        }
        request.push('\n');
        self.ask_raw(request.as_bytes()).await
    }

    /// Sends raw bytes and reads one reply; within 10 s.
    pub async fn ask_raw(&mut self, bytes: &[u8]) -> anyhow::Result<String> {
        self.stream.get_mut().write_all(bytes).await?;
        tokio::time::timeout(Duration::from_secs(10), self.read_reply())
            .await
            .map_err(|_| anyhow::anyhow!("no policy reply within 10 s"))?
    }

    async fn read_reply(&mut self) -> anyhow::Result<String> {
        let mut action = None;
        loop {
            let mut line = String::new();
            if self.stream.read_line(&mut line).await? == 0 {
                anyhow::bail!("connection closed before the reply ended");
            }
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                return action.ok_or_else(|| anyhow::anyhow!("reply without action="));
            }
            if let Some(value) = line.strip_prefix("action=") {
                action = Some(value.to_owned());
            }
        }
    }
}

/// The attributes Postfix 3.7 sends at RCPT time (a representative subset).
pub fn rcpt_request<'a>(
    client_address: &'a str,
    client_name: &'a str,
    helo: &'a str,
    sender: &'a str,
    recipient: &'a str,
    instance: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("request", "smtpd_access_policy"),
        ("protocol_state", "RCPT"),
        ("protocol_name", "ESMTP"),
        ("client_address", client_address),
        ("client_name", client_name),
        ("reverse_client_name", client_name),
        ("helo_name", helo),
        ("sender", sender),
        ("recipient", recipient),
        ("recipient_count", "0"),
        ("queue_id", ""),
        ("instance", instance),
        ("size", "0"),
        ("etrn_domain", ""),
        ("stress", ""),
        ("sasl_method", ""),
        ("sasl_username", ""),
        ("sasl_sender", ""),
        ("ccert_subject", ""),
        ("ccert_issuer", ""),
        ("ccert_fingerprint", ""),
        ("encryption_protocol", ""),
        ("encryption_cipher", ""),
        ("encryption_keysize", "0"),
    ]
}
