//! A Postfix tcp_table client (`get KEY` → `200 VALUE` / `500 ...` / `400 ...`).

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::{Io, Target, connect};

/// The answer to one lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableReply {
    /// 200, with the decoded value.
    Found(String),
    /// 500, with the reason.
    NotFound(String),
    /// 400 (or anything else), with the line.
    Error(String),
}

/// One connection.
pub struct TcpTableClient {
    stream: BufReader<Box<dyn Io>>,
}

impl TcpTableClient {
    /// Connects.
    pub async fn connect(target: &Target) -> anyhow::Result<Self> {
        Ok(Self {
            stream: BufReader::new(connect(target).await?),
        })
    }

    /// Looks `key` up.
    pub async fn get(&mut self, key: &str) -> anyhow::Result<TableReply> {
        let line = format!("get {}\n", postern_srsd::proto::tcp_table::encode_key(key));
        let reply = self.raw(line.as_bytes()).await?;
        Ok(
            match reply.split_once(' ').unwrap_or((reply.as_str(), "")) {
                ("200", value) => TableReply::Found(
                    postern_srsd::proto::tcp_table::decode_key(value)
                        .ok_or_else(|| anyhow::anyhow!("bad encoding in {reply:?}"))?,
                ),
                ("500", reason) => TableReply::NotFound(reason.to_owned()),
                _ => TableReply::Error(reply),
            },
        )
    }

    /// Sends raw bytes and reads one reply line (without newline); within 10 s.
    pub async fn raw(&mut self, bytes: &[u8]) -> anyhow::Result<String> {
        self.stream.get_mut().write_all(bytes).await?;
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read_line(&mut line))
            .await
            .map_err(|_| anyhow::anyhow!("no reply within 10 s"))??;
        if n == 0 {
            anyhow::bail!("connection closed");
        }
        Ok(line.trim_end_matches(['\n', '\r']).to_owned())
    }
}
