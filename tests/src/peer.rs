//! The Debian peers (postgrey, policyd-spf, opendkim, postsrsd, ...) as child processes for
//! interop tests: started in the foreground on a loopback port the test picked, output captured,
//! killed on drop. Also a TCP front for programs that speak on stdin/stdout (policyd-spf), the
//! way Postfix's spawn(8) runs them.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running peer; killed when dropped.
pub struct PeerProcess {
    child: Child,
    name: String,
    log: tempfile::NamedTempFile,
}

impl PeerProcess {
    /// Spawns `command` (stdout and stderr captured) and waits up to 15 s until 127.0.0.1:`port`
    /// accepts connections. Fails with the peer's output if it exits first.
    pub fn spawn(mut command: Command, port: u16) -> anyhow::Result<Self> {
        let name = command.get_program().to_string_lossy().into_owned();
        // A file, not a pipe: a chatty peer must never block on a full pipe nobody reads.
        let log = tempfile::NamedTempFile::new()?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.reopen()?)
            .stderr(log.reopen()?)
            .spawn()
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        let mut peer = Self { child, name, log };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = peer.child.try_wait()? {
                anyhow::bail!(
                    "{} exited with {status} before listening: {}",
                    peer.name,
                    peer.output()
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} not listening on {port} after 15 s",
                peer.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(peer)
    }

    /// Its process id (for `--pid`: peak RSS).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it wrote to stdout and stderr so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a peer's program is installed; the reason to print when not.
pub fn installed(program: &str) -> Result<(), String> {
    if Path::new(program).exists() {
        Ok(())
    } else {
        Err(format!(
            "{program} is not installed (tests/setup.sh installs it)"
        ))
    }
}

/// A TCP listener on 127.0.0.1 that runs `program args` for every connection with the
/// connection on its stdin and stdout, like a Postfix `spawn` service. Runs until the process
/// ends (threads, not tasks: the children are blocking programs).
pub fn spawn_front(program: &str, args: &[&str]) -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let program = program.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let _ = stream.set_nodelay(true);
            let (Ok(read_half), Ok(write_half)) = (stream.try_clone(), stream.try_clone()) else {
                continue;
            };
            let Ok(mut child) = Command::new(&program)
                .args(&args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
            else {
                continue;
            };
            let (Some(mut stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take())
            else {
                continue;
            };
            std::thread::spawn(move || {
                // Client closed: the program sees end of input and exits.
                pump(read_half, &mut stdin);
            });
            std::thread::spawn(move || {
                let mut write_half = write_half;
                pump(&mut stdout, &mut write_half);
                let _ = write_half.shutdown(std::net::Shutdown::Both);
                let _ = child.kill();
                let _ = child.wait();
            });
        }
    });
    Ok(port)
}

/// Copies what arrives, as it arrives (no splice, no waiting for a full buffer), until either
/// side closes.
fn pump(mut from: impl Read, to: &mut impl Write) {
    let mut buf = [0u8; 8192];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
                    return;
                }
            }
        }
    }
}
