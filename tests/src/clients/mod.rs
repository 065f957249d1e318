//! Protocol clients for each interface Postern serves, written against the protocols (not our
//! code), so that they drive the peers (postgrey, policyd-spf, opendkim, postsrsd) just as well.

pub mod milter;
pub mod policy;
pub mod socketmap;
pub mod tcp_table;

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

/// A connection target: "HOST:PORT", "inet:HOST:PORT", "inet:PORT@HOST" or "unix:PATH".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// TCP.
    Tcp(String),
    /// Unix-domain socket.
    Unix(std::path::PathBuf),
}

impl std::str::FromStr for Target {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Self> {
        let spec = if text.starts_with("inet:")
            || text.starts_with("unix:")
            || text.starts_with("local:")
            || text.starts_with('/')
        {
            text.to_owned()
        } else {
            format!("inet:{text}")
        };
        match spec.parse::<postern_common::listen::ListenSpec>()? {
            postern_common::listen::ListenSpec::Inet { host, port } if host.contains(':') => {
                Ok(Self::Tcp(format!("[{host}]:{port}")))
            }
            postern_common::listen::ListenSpec::Inet { host, port } => {
                Ok(Self::Tcp(format!("{host}:{port}")))
            }
            postern_common::listen::ListenSpec::Unix { path } => Ok(Self::Unix(path)),
        }
    }
}

/// Either kind of stream.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connects with TCP_NODELAY (small writes must not wait for delayed ACKs), within 5 s.
pub async fn connect(target: &Target) -> anyhow::Result<Box<dyn Io>> {
    let connecting = async {
        Ok::<Box<dyn Io>, anyhow::Error>(match target {
            Target::Tcp(addr) => {
                let stream = TcpStream::connect(addr.as_str()).await?;
                stream.set_nodelay(true)?;
                Box::new(stream)
            }
            Target::Unix(path) => Box::new(UnixStream::connect(path).await?),
        })
    };
    tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .map_err(|_| anyhow::anyhow!("connect to {target:?} timed out"))?
}
