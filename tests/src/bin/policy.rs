//! `policy HOST:PORT -c 8 -n 100000 --mix new|known|spf [--context spf] [--pid PID]`: load
//! generator for policy servers (postern-policyd, postgrey, policyd-spf).

use clap::Parser;
use postern_tests::clients::Target;
use postern_tests::clients::policy::{PolicyClient, rcpt_request};
use postern_tests::load::{self, LoadArgs, Worker};

/// Drive a policy server; print one line of figures.
#[derive(Debug, Parser)]
#[command(name = "policy")]
struct Args {
    #[command(flatten)]
    load: LoadArgs,
    /// new: every request a new triplet; known: a fixed set of 50 triplets, repeated; spf:
    /// senders cycling over SPF_DOMAINS (every SPF outcome; tests/bench/spf.zone serves them)
    #[arg(long, default_value = "known")]
    mix: String,
    /// Add policy_context=CONTEXT (e.g. spf)
    #[arg(long)]
    context: Option<String>,
    /// Add policy_test_time=SECONDS (postgrey's and our clock override)
    #[arg(long)]
    test_time: Option<u64>,
    /// Sender domain
    #[arg(long, default_value = "sender.example")]
    sender_domain: String,
    /// Client address (known mix)
    #[arg(long, default_value = "192.0.2.25")]
    client: String,
}

/// The sender domains of `--mix spf`, one per kind of SPF evaluation, each answered by a record
/// in tests/bench/spf.zone: pass by ip4, a, mx and include; fail, softfail, neutral; no record.
/// The HELO name (mail.sender.example) has a record too, so every request checks both
/// identities, as policyd-spf does.
const SPF_DOMAINS: [&str; 8] = [
    "pass-ip4.spf.example",
    "pass-a.spf.example",
    "pass-mx.spf.example",
    "pass-include.spf.example",
    "fail.spf.example",
    "softfail.spf.example",
    "neutral.spf.example",
    "none.spf.example",
];

struct PolicyWorker {
    client: PolicyClient,
    args: std::sync::Arc<Args>,
    run_id: u64,
}

impl Worker for PolicyWorker {
    async fn request(&mut self, index: u64) -> anyhow::Result<()> {
        let (client, sender, recipient) = if self.args.mix == "spf" {
            let n = index as usize;
            (
                self.args.client.clone(),
                format!("user{}@{}", n % 1000, SPF_DOMAINS[n % SPF_DOMAINS.len()]),
                format!("rcpt{}@dest.example", n % 50),
            )
        } else if self.args.mix == "new" {
            let n = index + self.run_id;
            (
                format!("198.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255),
                format!("s{n}@{}", self.args.sender_domain),
                format!("r{n}@dest.example"),
            )
        } else {
            let n = index % 50;
            (
                self.args.client.clone(),
                format!("user{n}@{}", self.args.sender_domain),
                format!("rcpt{n}@dest.example"),
            )
        };
        let instance = format!("{:x}.{index:x}", self.run_id);
        let mut attrs = rcpt_request(
            &client,
            "mail.sender.example",
            "mail.sender.example",
            &sender,
            &recipient,
            &instance,
        );
        let test_time = self.args.test_time.map(|t| t.to_string());
        if let Some(t) = &test_time {
            attrs.push(("policy_test_time", t));
        }
        if let Some(context) = &self.args.context {
            attrs.push(("policy_context", context));
        }
        let action = self.client.ask(&attrs).await?;
        anyhow::ensure!(!action.is_empty(), "empty action");
        Ok(())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = std::sync::Arc::new(Args::parse());
    anyhow::ensure!(
        ["new", "known", "spf"].contains(&args.mix.as_str()),
        "--mix must be new, known or spf, not {:?}",
        args.mix
    );
    // Distinct triplets per run so that "new" stays new across runs.
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        % 100_000
        * 1_000_000;
    let worker_args = args.clone();
    let summary = load::run(&args.load, move |target: Target| {
        let args = worker_args.clone();
        async move {
            Ok(PolicyWorker {
                client: PolicyClient::connect(&target).await?,
                args,
                run_id,
            })
        }
    })
    .await?;
    println!("{}", summary.line());
    Ok(())
}
