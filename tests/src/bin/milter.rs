//! `milter HOST:PORT -c 16 -n 10000 [--sign] [--message FILE] [--pid PID]`: load generator for
//! milters (postern-milter, opendkim, opendmarc). One request = one message from MAIL to end of
//! message. `--end abort` (default) sends SMFIC_ABORT after each message and reuses the
//! connection, as Postfix does within an SMTP session; `--end quit` sends SMFIC_QUIT and opens a
//! new connection (negotiate, connect, helo) for every message.

use clap::Parser;
use postern_tests::clients::Target;
use postern_tests::clients::milter::{MilterClient, MilterMessage, Verdict, sample_message};
use postern_tests::load::{self, LoadArgs, Worker};

/// Drive a milter as an MTA would; print one line of figures.
#[derive(Debug, Parser)]
#[command(name = "milter")]
struct Args {
    #[command(flatten)]
    load: LoadArgs,
    /// Submit as an authenticated user ({auth_authen} macro): the signing path
    #[arg(long)]
    sign: bool,
    /// Message file (RFC 5322); default a built-in 4 KB message
    #[arg(long)]
    message: Option<std::path::PathBuf>,
    /// From domain of the built-in message
    #[arg(long, default_value = "example.com")]
    from_domain: String,
    /// Client IP the MTA reports (127.0.0.1 counts as internal for DKIM signers)
    #[arg(long, default_value = "192.0.2.25")]
    client_ip: std::net::IpAddr,
    /// After each message: abort (keep the connection) or quit (reconnect per message)
    #[arg(long, value_enum, default_value_t = End::Abort)]
    end: End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum End {
    Abort,
    Quit,
}

/// Negotiates and runs the connect and helo stages, as an MTA does when a client connects.
async fn session(target: &Target, client_ip: std::net::IpAddr) -> anyhow::Result<MilterClient> {
    let mut client = MilterClient::connect(target).await?;
    client
        .connect_stage("mail.sender.example", client_ip, 40000, "mx.test.example")
        .await?;
    client.helo("mail.sender.example").await?;
    Ok(client)
}

struct MilterWorker {
    client: Option<MilterClient>,
    target: Target,
    client_ip: std::net::IpAddr,
    end: End,
    message: std::sync::Arc<MilterMessage>,
}

impl Worker for MilterWorker {
    async fn request(&mut self, _index: u64) -> anyhow::Result<()> {
        let mut client = match self.client.take() {
            Some(client) => client,
            None => session(&self.target, self.client_ip).await?,
        };
        let outcome = client.message(&self.message).await?;
        match self.end {
            End::Abort => {
                client.abort().await?;
                self.client = Some(client);
            }
            End::Quit => client.quit().await?,
        }
        match outcome.verdict {
            Some(Verdict::Continue | Verdict::Accept) => Ok(()),
            other => anyhow::bail!("message not accepted: {other:?}"),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let raw = match &args.message {
        Some(path) => std::fs::read(path)?,
        None => sample_message(&args.from_domain),
    };
    let mut message = MilterMessage::parse(
        &raw,
        &format!("alice@{}", args.from_domain),
        &["bob@dest.example"],
    );
    if args.sign {
        message
            .mail_macros
            .push(("{auth_authen}".to_owned(), "alice".to_owned()));
        message
            .mail_macros
            .push(("{auth_type}".to_owned(), "PLAIN".to_owned()));
    }
    let message = std::sync::Arc::new(message);
    let (client_ip, end) = (args.client_ip, args.end);
    let summary = load::run(&args.load, move |target: Target| {
        let message = message.clone();
        async move {
            let client = match end {
                End::Abort => Some(session(&target, client_ip).await?),
                End::Quit => None,
            };
            Ok(MilterWorker {
                client,
                target,
                client_ip,
                end,
                message,
            })
        }
    })
    .await?;
    println!("{}", summary.line());
    Ok(())
}
