//! A Postfix socketmap client (netstrings `NAME KEY` → `OK VALUE` / `NOTFOUND ` / `TEMP` / `PERM`).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};

use super::{Io, Target, connect};

/// One connection.
pub struct SocketmapClient {
    stream: BufReader<Box<dyn Io>>,
}

impl SocketmapClient {
    /// Connects.
    pub async fn connect(target: &Target) -> anyhow::Result<Self> {
        Ok(Self {
            stream: BufReader::new(connect(target).await?),
        })
    }

    /// Looks `key` up in map `map`; returns the reply payload ("OK x@y", "NOTFOUND ", ...).
    pub async fn lookup(&mut self, map: &str, key: &str) -> anyhow::Result<String> {
        let payload = format!("{map} {key}");
        self.raw(format!("{}:{payload},", payload.len()).as_bytes())
            .await
    }

    /// Sends raw bytes and reads one reply netstring's payload; within 10 s.
    pub async fn raw(&mut self, bytes: &[u8]) -> anyhow::Result<String> {
        self.stream.get_mut().write_all(bytes).await?;
        tokio::time::timeout(Duration::from_secs(10), self.read_netstring())
            .await
            .map_err(|_| anyhow::anyhow!("no reply within 10 s"))?
    }

    async fn read_netstring(&mut self) -> anyhow::Result<String> {
        let mut len = 0usize;
        loop {
            let b = self.stream.read_u8().await?;
            match b {
                b'0'..=b'9' if len < 1_000_000 => len = len * 10 + usize::from(b - b'0'),
                b':' => break,
                _ => anyhow::bail!("bad netstring length byte {b:#x}"),
            }
        }
        let mut payload = vec![0u8; len + 1];
        self.stream.read_exact(&mut payload).await?;
        anyhow::ensure!(
            payload.pop() == Some(b','),
            "netstring without trailing comma"
        );
        Ok(String::from_utf8(payload)?)
    }
}
