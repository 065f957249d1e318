//! The one accept loop of the line-protocol daemons: a connection permit is taken before
//! `accept()` (so a flood queues in the kernel instead of in memory), each connection runs in its
//! own task, and on shutdown the loop stops accepting and gives open connections a grace period
//! to answer what they are working on. Per-connection errors never reach this loop.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream as FrameStream, StreamExt};
use tokio::sync::Semaphore;
use tokio_util::codec::FramedRead;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::listen::{Listener, PeerAddr, Stream};

/// Limits of the accept loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeOptions {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// On shutdown, how long open connections may take to finish their current request.
    pub grace_period: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_connections: 1000,
            // Postfix's own policy client gives up on an idle connection after 300 s
            // (smtpd_policy_service_max_idle); ours closes a little later.
            idle_timeout: Duration::from_secs(330),
            grace_period: Duration::from_secs(10),
        }
    }
}

/// One accepted connection, handed to the handler.
#[derive(Debug)]
pub struct Connection {
    /// The socket.
    pub stream: Stream,
    /// Who connected.
    pub peer: PeerAddr,
    /// Cancelled when the daemon shuts down; check it between requests.
    pub shutdown: CancellationToken,
    /// How long a read may wait for the client.
    pub idle_timeout: Duration,
}

/// Accepts connections on `listener` until `shutdown` is cancelled, running `handler` for each.
/// Returns once every connection has finished or the grace period has passed.
pub async fn serve<H, Fut>(
    listener: Listener,
    options: ServeOptions,
    shutdown: CancellationToken,
    handler: H,
) -> io::Result<()>
where
    H: Fn(Connection) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handler = Arc::new(handler);
    let permits = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let tracker = TaskTracker::new();
    let name = listener.describe();
    info!(listen = %name, "listening");
    let mut warned_full = false;
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if !warned_full {
                    warn!(listen = %name, limit = options.max_connections, "connection limit reached; new connections wait");
                    warned_full = true;
                }
                tokio::select! {
                    permit = permits.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                    () = shutdown.cancelled() => break,
                }
            }
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // EMFILE, ENFILE, ECONNABORTED and friends: the listener itself is fine, so
                // back off briefly instead of spinning or giving up.
                warn!(listen = %name, error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if permits.available_permits() > options.max_connections / 2 {
            warned_full = false;
        }
        let connection = Connection {
            stream,
            peer,
            shutdown: shutdown.clone(),
            idle_timeout: options.idle_timeout,
        };
        let handler = handler.clone();
        tracker.spawn(async move {
            handler(connection).await;
            drop(permit);
        });
    }
    tracker.close();
    drop(listener);
    if tokio::time::timeout(options.grace_period, tracker.wait())
        .await
        .is_err()
    {
        warn!(listen = %name, open = tracker.len(), "grace period over; closing connections still open");
    }
    Ok(())
}

/// What waiting for the next request frame produced.
#[derive(Debug)]
pub enum NextFrame<T, E> {
    /// A complete frame.
    Frame(T),
    /// The client closed the connection cleanly between frames.
    Closed,
    /// The client sent nothing for the idle timeout.
    Idle,
    /// The daemon is shutting down and no request is in progress.
    Shutdown,
    /// The frame was malformed or the connection failed.
    Error(E),
}

/// A connection's requests: frames out of a framed reader, each wait bounded by the idle
/// timeout and cut short by shutdown. The shutdown is only noticed between frames, so an
/// in-flight request is always answered.
///
/// The idle timer and the shutdown wait live as long as the connection and are re-armed per
/// request, not made anew: a request is a few microseconds of work, and a fresh timer and
/// waiter each time (a registration in the timer wheel and in the token's waiter list, both
/// under locks) were a measurable share of it.
pub struct FrameReader<S> {
    frames: S,
    idle: Duration,
    idle_timer: Pin<Box<tokio::time::Sleep>>,
    shutdown_token: CancellationToken,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<S> FrameReader<S> {
    /// Reads from `frames`; a wait longer than `idle` ends the connection. Needs a Tokio
    /// runtime (the timer is made here).
    pub fn new(frames: S, idle: Duration, shutdown: &CancellationToken) -> Self {
        Self {
            frames,
            idle,
            idle_timer: Box::pin(tokio::time::sleep(idle)),
            shutdown_token: shutdown.clone(),
            shutdown: Box::pin(shutdown.clone().cancelled_owned()),
        }
    }

    /// Waits for the next frame.
    pub async fn next<T, E>(&mut self) -> NextFrame<T, E>
    where
        S: FrameStream<Item = Result<T, E>> + Unpin,
    {
        if self.shutdown_token.is_cancelled() {
            return NextFrame::Shutdown;
        }
        self.idle_timer
            .as_mut()
            .reset(tokio::time::Instant::now() + self.idle);
        tokio::select! {
            biased;
            next = self.frames.next() => match next {
                Some(Ok(frame)) => NextFrame::Frame(frame),
                Some(Err(err)) => NextFrame::Error(err),
                None => NextFrame::Closed,
            },
            () = &mut self.idle_timer => NextFrame::Idle,
            () = &mut self.shutdown => NextFrame::Shutdown,
        }
    }
}

impl<T, D> FrameReader<FramedRead<T, D>> {
    /// The socket beneath, to answer on: one request at a time per connection, so no split
    /// halves (and no lock between them) are needed.
    pub fn socket(&mut self) -> &mut T {
        self.frames.get_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listen::ListenSpec;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpStream;
    use tokio_util::codec::LinesCodec;

    async fn loopback() -> (Listener, std::net::SocketAddr) {
        let spec = ListenSpec::Inet {
            host: "127.0.0.1".into(),
            port: 0,
        };
        let listener = Listener::bind(&spec, 0o660).await.unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    /// An echo handler over lines, reading with FrameReader and answering on the socket beneath
    /// it, as the daemons do.
    async fn echo(conn: Connection) {
        let frames = FramedRead::new(conn.stream, LinesCodec::new_with_max_length(64));
        let mut requests = FrameReader::new(frames, conn.idle_timeout, &conn.shutdown);
        loop {
            match requests.next().await {
                NextFrame::Frame(line) => {
                    if line == "slow" {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    if requests
                        .socket()
                        .write_all(format!("{line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                _ => return,
            }
        }
    }

    /// The echo server with this idle timeout: its task, address and shutdown token.
    async fn echo_with_idle_timeout(
        idle_timeout: Duration,
    ) -> (
        tokio::task::JoinHandle<io::Result<()>>,
        std::net::SocketAddr,
        CancellationToken,
    ) {
        let (listener, addr) = loopback().await;
        let shutdown = CancellationToken::new();
        let options = ServeOptions {
            max_connections: 8,
            idle_timeout,
            grace_period: Duration::from_secs(2),
        };
        let server = tokio::spawn(serve(listener, options, shutdown.clone(), echo));
        (server, addr, shutdown)
    }

    /// Shuts the server down; it must end within 3 s.
    async fn stop(server: tokio::task::JoinHandle<io::Result<()>>, shutdown: &CancellationToken) {
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(3), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn serves_many_connections_and_idle_ones_are_closed() {
        let (server, addr, shutdown) = echo_with_idle_timeout(Duration::from_millis(200)).await;
        for i in 0..20 {
            let stream = TcpStream::connect(addr).await.unwrap();
            let (read, mut write) = stream.into_split();
            write
                .write_all(format!("hello {i}\n").as_bytes())
                .await
                .unwrap();
            let mut lines = BufReader::new(read).lines();
            assert_eq!(
                lines.next_line().await.unwrap().unwrap(),
                format!("hello {i}")
            );
        }
        // A silent client is closed after the idle timeout.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), silent.read(&mut buf))
            .await
            .expect("idle connection was not closed");
        assert_eq!(read.unwrap(), 0);
        stop(server, &shutdown).await;
    }

    #[tokio::test]
    async fn a_connection_busy_past_the_idle_timeout_stays_open_until_it_goes_quiet() {
        let (server, addr, shutdown) = echo_with_idle_timeout(Duration::from_millis(200)).await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        // Six requests 120 ms apart: 720 ms in all, each gap under the timeout. The timer set
        // at connect fires in the middle of this and must only move on.
        for i in 0..6 {
            tokio::time::sleep(Duration::from_millis(120)).await;
            write
                .write_all(format!("ping {i}\n").as_bytes())
                .await
                .unwrap();
            assert_eq!(
                lines.next_line().await.unwrap().as_deref(),
                Some(format!("ping {i}").as_str())
            );
        }
        let started = std::time::Instant::now();
        let closed = tokio::time::timeout(Duration::from_secs(2), lines.next_line())
            .await
            .expect("quiet connection was not closed");
        assert_eq!(closed.unwrap(), None);
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "{:?}",
            started.elapsed()
        );
        stop(server, &shutdown).await;
    }

    #[tokio::test]
    async fn a_connection_waiting_for_its_next_request_ends_at_shutdown() {
        let (server, addr, shutdown) = echo_with_idle_timeout(Duration::from_secs(30)).await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        write.write_all(b"one\n").await.unwrap();
        assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("one"));
        let started = std::time::Instant::now();
        shutdown.cancel();
        // Closed at once, not after the idle timeout (30 s) or the grace period (2 s).
        let closed = tokio::time::timeout(Duration::from_secs(1), lines.next_line())
            .await
            .expect("waiting connection was not closed at shutdown");
        assert_eq!(closed.unwrap(), None);
        stop(server, &shutdown).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn in_flight_request_is_answered_at_shutdown() {
        let (listener, addr) = loopback().await;
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            ServeOptions::default(),
            shutdown.clone(),
            echo,
        ));
        let stream = TcpStream::connect(addr).await.unwrap();
        let (read, mut write) = stream.into_split();
        write.write_all(b"slow\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        shutdown.cancel();
        let mut lines = BufReader::new(read).lines();
        assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("slow"));
        // After answering, the connection is closed rather than kept for more requests.
        assert_eq!(lines.next_line().await.unwrap(), None);
        tokio::time::timeout(Duration::from_secs(3), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        // No longer accepting.
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn connection_limit_queues_instead_of_refusing() {
        let (listener, addr) = loopback().await;
        let shutdown = CancellationToken::new();
        let active = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let options = ServeOptions {
            max_connections: 2,
            ..ServeOptions::default()
        };
        let server = tokio::spawn(serve(listener, options, shutdown.clone(), {
            let active = active.clone();
            let peak = peak.clone();
            move |conn: Connection| {
                let active = active.clone();
                let peak = peak.clone();
                async move {
                    let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let mut stream = conn.stream;
                    let _ = stream.write_all(b"done\n").await;
                    active.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }));
        let clients: Vec<_> = (0..6)
            .map(|_| {
                tokio::spawn(async move {
                    let mut s = TcpStream::connect(addr).await.unwrap();
                    let mut buf = Vec::new();
                    s.read_to_end(&mut buf).await.unwrap();
                    buf
                })
            })
            .collect();
        for client in clients {
            let got = tokio::time::timeout(Duration::from_secs(5), client)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got, b"done\n");
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2);
        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}
