//! `milter HOST:PORT -c 16 -n 10000 [--sign] [--message FILE] [--pid PID]`: load generator for
//! milters (postern-milter, opendkim, opendmarc). One request = one message from MAIL to end of
//! message; connections are reused for many messages, as Postfix does within a session.

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
}

struct MilterWorker {
    client: MilterClient,
    message: std::sync::Arc<MilterMessage>,
}

impl Worker for MilterWorker {
    async fn request(&mut self, _index: u64) -> anyhow::Result<()> {
        let outcome = self.client.message(&self.message).await?;
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
    let client_ip = args.client_ip;
    let summary = load::run(&args.load, move |target: Target| {
        let message = message.clone();
        async move {
            let mut client = MilterClient::connect(&target).await?;
            client
                .connect_stage("mail.sender.example", client_ip, 40000, "mx.test.example")
                .await?;
            client.helo("mail.sender.example").await?;
            Ok(MilterWorker { client, message })
        }
    })
    .await?;
    println!("{}", summary.line());
    Ok(())
}
