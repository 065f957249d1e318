//! `tcp-table HOST:PORT -c 8 -n 100000 [--reverse] [--pid PID]`: load generator for Postfix
//! tcp_table servers (postern-srsd, postsrsd 1.x).

use clap::Parser;
use postern_tests::clients::Target;
use postern_tests::clients::tcp_table::{TableReply, TcpTableClient};
use postern_tests::load::{self, LoadArgs, Worker};

/// Drive a tcp_table server; print one line of figures.
#[derive(Debug, Parser)]
#[command(name = "tcp-table")]
struct Args {
    #[command(flatten)]
    load: LoadArgs,
    /// Look up these keys in turn instead of generated foreign senders
    #[arg(long)]
    key: Vec<String>,
}

struct TableWorker {
    client: TcpTableClient,
    keys: std::sync::Arc<Vec<String>>,
}

impl Worker for TableWorker {
    async fn request(&mut self, index: u64) -> anyhow::Result<()> {
        let key = if self.keys.is_empty() {
            format!("user{}@sender{}.example", index % 1000, index % 7)
        } else {
            self.keys[usize::try_from(index).unwrap_or(0) % self.keys.len()].clone()
        };
        match self.client.get(&key).await? {
            TableReply::Found(_) | TableReply::NotFound(_) => Ok(()),
            TableReply::Error(line) => anyhow::bail!("server error: {line}"),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let keys = std::sync::Arc::new(args.key.clone());
    let summary = load::run(&args.load, move |target: Target| {
        let keys = keys.clone();
        async move {
            Ok(TableWorker {
                client: TcpTableClient::connect(&target).await?,
                keys,
            })
        }
    })
    .await?;
    println!("{}", summary.line());
    Ok(())
}
