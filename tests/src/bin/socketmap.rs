//! `socketmap HOST:PORT|unix:PATH -c 8 -n 100000 [--map forward] [--pid PID]`: load generator
//! for Postfix socketmap servers (postern-srsd, postsrsd 2.x).

use clap::Parser;
use postern_tests::clients::Target;
use postern_tests::clients::socketmap::SocketmapClient;
use postern_tests::load::{self, LoadArgs, Worker};

/// Drive a socketmap server; print one line of figures.
#[derive(Debug, Parser)]
#[command(name = "socketmap")]
struct Args {
    #[command(flatten)]
    load: LoadArgs,
    /// Map name
    #[arg(long, default_value = "forward")]
    map: String,
}

struct MapWorker {
    client: SocketmapClient,
    map: String,
}

impl Worker for MapWorker {
    async fn request(&mut self, index: u64) -> anyhow::Result<()> {
        let reply = self
            .client
            .lookup(
                &self.map,
                &format!("user{}@sender{}.example", index % 1000, index % 7),
            )
            .await?;
        anyhow::ensure!(
            reply.starts_with("OK ") || reply.starts_with("NOTFOUND"),
            "server answered {reply:?}"
        );
        Ok(())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let map = args.map.clone();
    let summary = load::run(&args.load, move |target: Target| {
        let map = map.clone();
        async move {
            Ok(MapWorker {
                client: SocketmapClient::connect(&target).await?,
                map,
            })
        }
    })
    .await?;
    println!("{}", summary.line());
    Ok(())
}
