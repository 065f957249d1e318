//! A private real Postfix (Debian's package) for end-to-end tests: its own config and queue
//! directories in a temp dir, smtpd on a free loopback port, no chroot, and an in-process SMTP
//! sink as the next hop, so tests read delivered messages with their envelopes.
//! Pitfalls (shared/reference/README.md): master refuses non-root; maillog_file must sit under
//! maillog_file_prefixes or master dies silently; data_directory must belong to postfix.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::smtp::{self, Delivered, Outgoing, Sink, Transcript};

/// What to put into the instance's main.cf and master.cf beyond the basics.
#[derive(Debug, Clone, Default)]
pub struct PostfixBuilder {
    main_cf: Vec<String>,
    master_cf: Vec<String>,
    relay_domains: Option<String>,
    mynetworks: Option<String>,
    virtual_aliases: Vec<(String, String)>,
}

impl PostfixBuilder {
    /// A main.cf line ("smtpd_milters = inet:127.0.0.1:8891").
    pub fn main_cf(mut self, line: impl Into<String>) -> Self {
        self.main_cf.push(line.into());
        self
    }

    /// A master.cf line (a `spawn` service, say).
    pub fn master_cf(mut self, line: impl Into<String>) -> Self {
        self.master_cf.push(line.into());
        self
    }

    /// Domains relayed to the sink (default "dest.example").
    pub fn relay_domains(mut self, domains: impl Into<String>) -> Self {
        self.relay_domains = Some(domains.into());
        self
    }

    /// A virtual alias (`fwd@alias.example` → `dave@dest.example`, or several targets separated
    /// by commas): mail to the alias is forwarded, the way SRS is needed. The alias's domain
    /// becomes a virtual alias domain.
    pub fn virtual_alias(mut self, alias: impl Into<String>, target: impl Into<String>) -> Self {
        self.virtual_aliases.push((alias.into(), target.into()));
        self
    }

    /// mynetworks (default "127.0.0.1/32").
    pub fn mynetworks(mut self, networks: impl Into<String>) -> Self {
        self.mynetworks = Some(networks.into());
        self
    }

    /// Writes the configuration and starts Postfix and the sink.
    pub async fn start(self) -> anyhow::Result<PostfixInstance> {
        PostfixInstance::start(self).await
    }
}

/// Whether this machine can run a private Postfix (installed, and we are root).
pub fn available() -> Result<(), String> {
    if !Path::new("/usr/sbin/postfix").exists() {
        return Err("Postfix is not installed (tests/setup.sh installs it)".to_owned());
    }
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if uid != "0" {
        return Err("Postfix's master must run as root".to_owned());
    }
    Ok(())
}

/// A running private Postfix; stopped when dropped.
pub struct PostfixInstance {
    dir: tempfile::TempDir,
    smtp_port: u16,
    /// The next hop, holding what Postfix delivered.
    pub sink: Sink,
}

fn run(command: &mut Command) -> anyhow::Result<String> {
    let output = command.output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    anyhow::ensure!(output.status.success(), "{command:?} failed: {text}");
    Ok(text)
}

impl PostfixInstance {
    /// A builder.
    pub fn builder() -> PostfixBuilder {
        PostfixBuilder::default()
    }

    async fn start(options: PostfixBuilder) -> anyhow::Result<Self> {
        available().map_err(|e| anyhow::anyhow!(e))?;
        let sink = Sink::start().await?;
        let dir = tempfile::Builder::new()
            .prefix("postern-postfix-")
            .tempdir()?;
        let root = dir.path();
        for sub in ["etc", "spool", "data"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        run(Command::new("chown")
            .arg("postfix:postfix")
            .arg(root.join("data")))?;
        run(Command::new("chmod").arg("755").arg(root))?;
        let smtp_port = crate::daemon::free_port();
        let master = std::fs::read_to_string("/usr/share/postfix/master.cf.dist")?;
        let mut master_out = String::new();
        for line in master.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if line.starts_with(char::is_alphanumeric) && fields.len() >= 8 {
                let mut fields: Vec<String> = fields.iter().map(|f| (*f).to_owned()).collect();
                if fields[0] == "smtp" && fields[1] == "inet" {
                    fields[0] = format!("127.0.0.1:{smtp_port}");
                }
                // No chroot: the private instance's queue is not set up as a chroot jail.
                fields[4] = "n".to_owned();
                master_out.push_str(&fields.join(" "));
            } else {
                master_out.push_str(line);
            }
            master_out.push('\n');
        }
        for line in &options.master_cf {
            master_out.push_str(line);
            master_out.push('\n');
        }
        std::fs::write(root.join("etc/master.cf"), master_out)?;
        let mut main = format!(
            "compatibility_level = 3.6\nqueue_directory = {root}/spool\ndata_directory = {root}/data\nmail_owner = postfix\nsetgid_group = postdrop\n\
             myhostname = mx.test.example\nmydomain = test.example\nmyorigin = test.example\nmydestination =\nrelay_domains = {relay}\n\
             alias_maps =\nalias_database =\nlocal_recipient_maps =\ninet_interfaces = loopback-only\ninet_protocols = ipv4\n\
             mynetworks = {mynetworks}\nrelayhost = [127.0.0.1]:{sink_port}\nsmtp_dns_support_level = disabled\nsmtp_host_lookup = native\n\
             smtpd_client_restrictions =\nsmtpd_helo_required = no\nbiff = no\n\
             maillog_file_prefixes = /var, /dev/stdout, {root}\nmaillog_file = {root}/maillog\n\
             smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n\
             milter_protocol = 6\nmilter_default_action = tempfail\n\
             queue_run_delay = 1s\nminimal_backoff_time = 1s\nmaximal_backoff_time = 2s\n\
             smtpd_error_sleep_time = 0\nsmtp_connect_timeout = 5s\nin_flow_delay = 0\n",
            root = root.display(),
            relay = options.relay_domains.as_deref().unwrap_or("dest.example"),
            mynetworks = options.mynetworks.as_deref().unwrap_or("127.0.0.1/32"),
            sink_port = sink.addr().port(),
        );
        if !options.virtual_aliases.is_empty() {
            let mut domains: Vec<&str> = options
                .virtual_aliases
                .iter()
                .filter_map(|(alias, _)| alias.rsplit_once('@').map(|(_, d)| d))
                .collect();
            domains.sort_unstable();
            domains.dedup();
            // A file, not inline:{}: targets may hold commas and spaces.
            let table: String = options
                .virtual_aliases
                .iter()
                .map(|(alias, target)| format!("{alias} {target}\n"))
                .collect();
            std::fs::write(root.join("etc/virtual"), table)?;
            main.push_str(&format!(
                "virtual_alias_domains = {}\nvirtual_alias_maps = texthash:{}/etc/virtual\n",
                domains.join(", "),
                root.display()
            ));
        }
        for line in &options.main_cf {
            main.push_str(line);
            main.push('\n');
        }
        std::fs::write(root.join("etc/main.cf"), main)?;
        let etc = root.join("etc");
        run(Command::new("postfix").arg("-c").arg(&etc).arg("check"))?;
        run(Command::new("postfix").arg("-c").arg(&etc).arg("start"))?;
        let instance = Self {
            dir,
            smtp_port,
            sink,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", smtp_port))
            .await
            .is_err()
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "Postfix smtpd not listening after 20 s; maillog:\n{}",
                instance.maillog()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(instance)
    }

    /// The config directory (for `postfix -c`).
    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    /// smtpd's address.
    pub fn smtp_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.smtp_port))
    }

    /// Sends a message over SMTP.
    pub async fn send(&self, message: &Outgoing) -> anyhow::Result<Transcript> {
        smtp::send(self.smtp_addr(), message).await
    }

    /// Submits a message through the local sendmail (pickup: the non_smtpd_milters path).
    pub fn sendmail(&self, from: &str, to: &[&str], data: &[u8]) -> anyhow::Result<()> {
        use std::io::Write;
        let mut child = Command::new("/usr/sbin/sendmail")
            .arg("-C")
            .arg(self.config_dir())
            .arg("-f")
            .arg(from)
            .arg("--")
            .args(to)
            .stdin(std::process::Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdin"))?
            .write_all(data)?;
        let status = child.wait()?;
        anyhow::ensure!(status.success(), "sendmail failed: {status}");
        Ok(())
    }

    /// Waits (bounded) until `count` messages reached the sink.
    pub async fn wait_delivered(
        &self,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Delivered>> {
        self.sink
            .wait_for(count, timeout)
            .await
            .map_err(|e| anyhow::anyhow!("{e}; maillog:\n{}", self.maillog()))
    }

    /// The instance's log.
    pub fn maillog(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// Asks the queue manager to retry deferred mail now.
    pub fn flush(&self) -> anyhow::Result<()> {
        run(Command::new("postqueue")
            .arg("-c")
            .arg(self.config_dir())
            .arg("-f"))
        .map(|_| ())
    }

    /// `postqueue -p`.
    pub fn queue(&self) -> String {
        run(Command::new("postqueue")
            .arg("-c")
            .arg(self.config_dir())
            .arg("-p"))
        .unwrap_or_else(|e| e.to_string())
    }
}

impl Drop for PostfixInstance {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(self.config_dir())
            .arg("stop")
            .output();
    }
}
