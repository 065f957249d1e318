//! Listener addresses in the forms main.cf and opendkim.conf use, and the sockets behind them.
//! Accepted TCP streams get TCP_NODELAY: Postfix and milter peers write small packets, and with
//! Nagle plus delayed ACKs every exchange can stall ~40 ms.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// Where a daemon listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenSpec {
    /// A TCP socket: host name or IP address, and port.
    Inet {
        /// Host name or IP address ("127.0.0.1", "::1", "localhost").
        host: String,
        /// TCP port (0 = any free port, for tests).
        port: u16,
    },
    /// A Unix-domain socket at a path.
    Unix {
        /// The socket file.
        path: PathBuf,
    },
}

/// Why a listener address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid listen address {0:?}: expected inet:HOST:PORT, inet:[IPv6]:PORT, inet:PORT@HOST, unix:/path or local:/path"
)]
pub struct ListenSpecError(String);

impl FromStr for ListenSpec {
    type Err = ListenSpecError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = || ListenSpecError(text.to_owned());
        let text_trimmed = text.trim();
        let (scheme, rest) = match text_trimmed.split_once(':') {
            Some((scheme, rest)) => (scheme, rest),
            None if text_trimmed.starts_with('/') => ("unix", text_trimmed),
            None => return Err(fail()),
        };
        match scheme {
            "unix" | "local" => {
                if rest.is_empty() || !rest.starts_with('/') {
                    return Err(fail());
                }
                Ok(Self::Unix {
                    path: PathBuf::from(rest),
                })
            }
            "inet" | "inet6" | "tcp" => {
                // opendkim: "PORT@HOST" (or a bare "PORT", meaning every interface).
                if let Some((port, host)) = rest.split_once('@') {
                    let port = port.parse().map_err(|_| fail())?;
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    if host.is_empty() {
                        return Err(fail());
                    }
                    return Ok(Self::Inet {
                        host: host.to_owned(),
                        port,
                    });
                }
                if let Ok(port) = rest.parse::<u16>() {
                    let host = if scheme == "inet6" { "::" } else { "0.0.0.0" };
                    return Ok(Self::Inet {
                        host: host.to_owned(),
                        port,
                    });
                }
                // Postfix: "HOST:PORT", "[IPv6]:PORT".
                let (host, port) = rest.rsplit_once(':').ok_or_else(fail)?;
                let port = port.parse().map_err(|_| fail())?;
                let host = match host.strip_prefix('[') {
                    Some(inner) => inner.strip_suffix(']').ok_or_else(fail)?,
                    None if host.contains(':') => return Err(fail()),
                    None => host,
                };
                if host.is_empty() {
                    return Err(fail());
                }
                Ok(Self::Inet {
                    host: host.to_owned(),
                    port,
                })
            }
            _ => Err(fail()),
        }
    }
}

impl fmt::Display for ListenSpec {
    /// Postfix's notation, as main.cf would name the service.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inet { host, port } if host.contains(':') => write!(f, "inet:[{host}]:{port}"),
            Self::Inet { host, port } => write!(f, "inet:{host}:{port}"),
            Self::Unix { path } => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Serialize for ListenSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ListenSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Who connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAddr {
    /// A TCP peer.
    Inet(SocketAddr),
    /// A Unix-domain peer (normally unnamed).
    Unix,
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inet(addr) => write!(f, "{addr}"),
            Self::Unix => f.write_str("unix"),
        }
    }
}

/// A listener that could not be bound, named as the config names it.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {spec}: {source}")]
pub struct BindError {
    /// The address, in Postfix's notation.
    pub spec: String,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// Binds every spec, in order, before any is served: a daemon whose second listener cannot be
/// bound stops before its first answers anyone, and once one answers, all do. On an error the
/// listeners bound so far are dropped (closed, their Unix socket files removed).
pub async fn bind_all<'a>(
    specs: impl IntoIterator<Item = &'a ListenSpec>,
    unix_mode: u32,
) -> Result<Vec<Listener>, BindError> {
    let mut bound = Vec::new();
    for spec in specs {
        bound.push(bind_named(spec, unix_mode).await?);
    }
    Ok(bound)
}

/// [`Listener::bind`], its error naming `spec`.
pub async fn bind_named(spec: &ListenSpec, unix_mode: u32) -> Result<Listener, BindError> {
    Listener::bind(spec, unix_mode)
        .await
        .map_err(|source| BindError {
            spec: spec.to_string(),
            source,
        })
}

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix-domain; the socket file is removed when the listener is dropped.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `spec`. A stale Unix socket file (nobody listening) is removed first; a live one is
    /// an "address in use" error; a non-socket file at the path is never removed. New Unix
    /// sockets get `unix_mode` (e.g. 0o660, so that Postfix's group can connect).
    pub async fn bind(spec: &ListenSpec, unix_mode: u32) -> io::Result<Self> {
        match spec {
            ListenSpec::Inet { host, port } => {
                let mut last_err = None;
                for addr in tokio::net::lookup_host((host.as_str(), *port)).await? {
                    match TcpListener::bind(addr).await {
                        Ok(listener) => return Ok(Self::Tcp(listener)),
                        Err(err) => last_err = Some(err),
                    }
                }
                Err(last_err.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, format!("{host}: no address"))
                }))
            }
            ListenSpec::Unix { path } => {
                remove_stale_socket(path).await?;
                let listener = UnixListener::bind(path)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(unix_mode))?;
                Ok(Self::Unix(listener, path.clone()))
            }
        }
    }

    /// Wraps an already bound std TCP listener (tests bind 127.0.0.1:0 themselves).
    pub fn from_std_tcp(listener: std::net::TcpListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self::Tcp(TcpListener::from_std(listener)?))
    }

    /// Accepts one connection.
    pub async fn accept(&self) -> io::Result<(Stream, PeerAddr)> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// Polls for one connection, with TCP_NODELAY set on it.
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(Stream, PeerAddr)>> {
        match self {
            Self::Tcp(listener) => listener.poll_accept(cx).map_ok(|(stream, addr)| {
                // Best effort: a socket that cannot take the option still works, only slower.
                let _ = stream.set_nodelay(true);
                (Stream::Tcp(stream), PeerAddr::Inet(addr))
            }),
            Self::Unix(listener, _) => listener
                .poll_accept(cx)
                .map_ok(|(stream, _)| (Stream::Unix(stream), PeerAddr::Unix)),
        }
    }

    /// The bound TCP address, if TCP.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Self::Tcp(listener) => listener.local_addr().ok(),
            Self::Unix(..) => None,
        }
    }

    /// What the listener is bound to, in Postfix's notation.
    pub fn describe(&self) -> String {
        match self {
            Self::Tcp(listener) => match listener.local_addr() {
                Ok(addr) => ListenSpec::Inet {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                }
                .to_string(),
                Err(_) => "inet:?".to_owned(),
            },
            Self::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, path) = self {
            // The file may already be gone; nothing to report then.
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{}: exists and is not a socket; not removing it",
                path.display()
            ),
        ));
    }
    if UnixStream::connect(path).await.is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{}: another process is listening on it", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

/// An accepted connection, TCP or Unix.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix-domain.
    Unix(UnixStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Unix(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn inet(host: &str, port: u16) -> ListenSpec {
        ListenSpec::Inet {
            host: host.to_owned(),
            port,
        }
    }

    #[test]
    fn parses_postfix_and_opendkim_forms() {
        let cases = [
            ("inet:127.0.0.1:10023", inet("127.0.0.1", 10023)),
            ("inet:localhost:8891", inet("localhost", 8891)),
            ("inet:[::1]:10001", inet("::1", 10001)),
            ("inet:8891@127.0.0.1", inet("127.0.0.1", 8891)),
            ("inet:8891@localhost", inet("localhost", 8891)),
            ("inet6:8891@[::1]", inet("::1", 8891)),
            ("inet:8891", inet("0.0.0.0", 8891)),
            (
                "unix:/run/postern/policyd.sock",
                ListenSpec::Unix {
                    path: "/run/postern/policyd.sock".into(),
                },
            ),
            (
                "local:/run/opendkim/opendkim.sock",
                ListenSpec::Unix {
                    path: "/run/opendkim/opendkim.sock".into(),
                },
            ),
            (
                "/run/x.sock",
                ListenSpec::Unix {
                    path: "/run/x.sock".into(),
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<ListenSpec>().unwrap(), want, "{text}");
        }
    }

    #[test]
    fn refuses_malformed_addresses() {
        for bad in [
            "",
            "inet:",
            "inet:host",
            "inet:127.0.0.1:notaport",
            "inet:127.0.0.1:70000",
            "inet::1:25",
            "inet:[::1:25",
            "unix:",
            "unix:relative",
            "tcp6x:1",
            "inet:@host",
            "inet:25@",
        ] {
            assert!(bad.parse::<ListenSpec>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn displays_in_postfix_notation_and_round_trips() {
        for text in [
            "inet:127.0.0.1:10023",
            "inet:[::1]:8891",
            "unix:/tmp/x.sock",
        ] {
            let spec: ListenSpec = text.parse().unwrap();
            assert_eq!(spec.to_string(), text);
        }
        let spec: ListenSpec = "inet:8891@127.0.0.1".parse().unwrap();
        assert_eq!(spec.to_string(), "inet:127.0.0.1:8891");
    }

    #[tokio::test]
    async fn bind_all_names_the_listener_that_failed_and_keeps_none_of_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let first = ListenSpec::Unix {
            path: dir.path().join("first.sock"),
        };
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let second = inet("127.0.0.1", taken.local_addr().unwrap().port());
        let err = bind_all([&first, &second], 0o660).await.unwrap_err();
        assert_eq!(err.spec, second.to_string());
        assert!(
            err.to_string()
                .starts_with(&format!("cannot listen on {second}: ")),
            "{err}"
        );
        assert!(!dir.path().join("first.sock").exists());
        let both = bind_all([&first, &inet("127.0.0.1", 0)], 0o660)
            .await
            .unwrap();
        assert_eq!(both.len(), 2);
    }

    #[tokio::test]
    async fn tcp_listener_accepts_with_nodelay() {
        let listener = Listener::bind(&inet("127.0.0.1", 0), 0o660).await.unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(listener.describe().starts_with("inet:127.0.0.1:"));
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.unwrap();
            buf
        });
        let (mut stream, peer) = listener.accept().await.unwrap();
        assert!(matches!(peer, PeerAddr::Inet(a) if a.ip().is_loopback()));
        match &stream {
            Stream::Tcp(s) => assert!(s.nodelay().unwrap()),
            Stream::Unix(_) => panic!("not tcp"),
        }
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.unwrap();
        stream.write_all(b"pong").await.unwrap();
        assert_eq!(&client.await.unwrap(), b"pong");
    }

    #[tokio::test]
    async fn unix_listener_replaces_stale_socket_sets_mode_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        // A stale socket: bound by a std listener that is then dropped without unlinking.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let spec = ListenSpec::Unix { path: path.clone() };
        let listener = Listener::bind(&spec, 0o660).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        // A live socket is not taken over.
        let err = Listener::bind(&spec, 0o660).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        // That probe connected to us; take it off the backlog.
        drop(listener.accept().await.unwrap());
        let client = tokio::spawn({
            let path = path.clone();
            async move {
                let mut s = UnixStream::connect(path).await.unwrap();
                s.write_all(b"hi").await.unwrap();
            }
        });
        let (mut stream, peer) = listener.accept().await.unwrap();
        assert_eq!(peer, PeerAddr::Unix);
        let mut buf = [0u8; 2];
        stream.read_exact(&mut buf).await.unwrap();
        client.await.unwrap();
        drop(listener);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn never_removes_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-socket");
        std::fs::write(&path, "data").unwrap();
        let err = Listener::bind(&ListenSpec::Unix { path: path.clone() }, 0o660)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
    }
}
