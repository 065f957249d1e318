//! `milter HOST:PORT -c 16 -n 10000 [--sign] [--message FILE] [--pid PID]`: load generator for
//! milters (postern-milter, opendkim, opendmarc). One request = one message from MAIL to end of
//! message. `--end abort` (default) sends SMFIC_ABORT after each message and reuses the
//! connection, as Postfix does within an SMTP session; `--end quit` sends SMFIC_QUIT and opens a
//! new connection (negotiate, connect, helo) for every message. `--chain HOST:PORT` passes each
//! accepted message on to a second milter with the first one's header changes applied, as
//! Postfix does with `smtpd_milters = A, B` (cleanup hands B the message A edited), so that
//! opendkim + opendmarc are measured the way a postmaster runs them. `--expect TEXT` counts a
//! message as an error unless a header the milter adds contains TEXT, so that a rate is one of
//! signatures made or verifications passed, not of messages waved through.

use clap::Parser;
use postern_tests::clients::Target;
use postern_tests::clients::milter::{
    MilterClient, MilterMessage, Modification, Verdict, sample_message,
};
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
    /// A second milter (HOST:PORT or unix:PATH) that gets each message the first accepted, with
    /// the first one's header changes applied; a request is both milters
    #[arg(long)]
    chain: Option<String>,
    /// Count a message as failed unless a header the (first) milter adds contains this text
    /// ("dkim=pass" when verifying, "a=ed25519-sha256" when signing)
    #[arg(long)]
    expect: Option<String>,
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

/// The message as the next milter in the chain sees it: the header changes applied (indexes as
/// in the milter protocol: insert before the index-th header, change the index-th (1-based)
/// header of that name, an empty value deletes it).
fn edited(message: &MilterMessage, modifications: &[Modification]) -> MilterMessage {
    let mut out = message.clone();
    for modification in modifications {
        match modification {
            Modification::AddHeader(name, value) => out.headers.push((name.clone(), value.clone())),
            Modification::InsertHeader(index, name, value) => {
                let at = usize::try_from(*index)
                    .unwrap_or(usize::MAX)
                    .min(out.headers.len());
                out.headers.insert(at, (name.clone(), value.clone()));
            }
            Modification::ChangeHeader(index, name, value) => {
                let nth = usize::try_from(*index).unwrap_or(0).max(1) - 1;
                let position = out
                    .headers
                    .iter()
                    .enumerate()
                    .filter(|(_, (n, _))| n.eq_ignore_ascii_case(name))
                    .nth(nth)
                    .map(|(i, _)| i);
                match position {
                    Some(i) if value.is_empty() => {
                        out.headers.remove(i);
                    }
                    Some(i) => out.headers[i].1 = value.clone(),
                    None if !value.is_empty() => out.headers.push((name.clone(), value.clone())),
                    None => {}
                }
            }
            _ => {}
        }
    }
    out
}

struct MilterWorker {
    expect: Option<std::sync::Arc<str>>,
    client: Option<MilterClient>,
    target: Target,
    chained: Option<MilterClient>,
    chain: Option<Target>,
    client_ip: std::net::IpAddr,
    end: End,
    message: std::sync::Arc<MilterMessage>,
}

impl MilterWorker {
    /// One message through one milter, leaving the connection for the next message or closing it.
    async fn one(
        slot: &mut Option<MilterClient>,
        target: &Target,
        client_ip: std::net::IpAddr,
        end: End,
        message: &MilterMessage,
    ) -> anyhow::Result<Vec<Modification>> {
        let mut client = match slot.take() {
            Some(client) => client,
            None => session(target, client_ip).await?,
        };
        let outcome = client.message(message).await?;
        match end {
            End::Abort => {
                client.abort().await?;
                *slot = Some(client);
            }
            End::Quit => client.quit().await?,
        }
        match outcome.verdict {
            Some(Verdict::Continue | Verdict::Accept) => Ok(outcome.modifications),
            other => anyhow::bail!("message not accepted: {other:?}"),
        }
    }
}

impl Worker for MilterWorker {
    async fn request(&mut self, _index: u64) -> anyhow::Result<()> {
        let modifications = Self::one(
            &mut self.client,
            &self.target,
            self.client_ip,
            self.end,
            &self.message,
        )
        .await?;
        if let Some(expect) = &self.expect {
            anyhow::ensure!(
                modifications.iter().any(|m| match m {
                    Modification::AddHeader(_, value) | Modification::InsertHeader(_, _, value) =>
                        value.contains(&**expect),
                    _ => false,
                }),
                "no added header contains {expect:?}: {modifications:?}"
            );
        }
        if let Some(chain) = &self.chain {
            let next = edited(&self.message, &modifications);
            Self::one(&mut self.chained, chain, self.client_ip, self.end, &next).await?;
        }
        Ok(())
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
    let chain: Option<Target> = args.chain.as_deref().map(str::parse).transpose()?;
    let expect: Option<std::sync::Arc<str>> = args.expect.as_deref().map(Into::into);
    let summary = load::run(&args.load, move |target: Target| {
        let message = message.clone();
        let chain = chain.clone();
        let expect = expect.clone();
        async move {
            let (client, chained) = match end {
                End::Abort => (
                    Some(session(&target, client_ip).await?),
                    match &chain {
                        Some(chain) => Some(session(chain, client_ip).await?),
                        None => None,
                    },
                ),
                End::Quit => (None, None),
            };
            Ok(MilterWorker {
                expect,
                client,
                target,
                chained,
                chain,
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
