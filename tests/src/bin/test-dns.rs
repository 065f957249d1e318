//! `test-dns --listen 127.0.0.1:5353 ZONEFILE...`: the tests' DNS server as a program, for
//! deploy/demo.sh and for pointing peers at test zones.

use clap::Parser;
use postern_tests::dns::{TestDns, Zone};

/// Serve test zones on a loopback port until stopped.
#[derive(Debug, Parser)]
#[command(name = "test-dns")]
struct Args {
    /// Address to listen on (UDP and TCP)
    #[arg(long, default_value = "127.0.0.1:5353")]
    listen: std::net::SocketAddr,
    /// Zone files (format: see tests/src/dns.rs)
    zones: Vec<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut text = String::new();
    for path in &args.zones {
        text.push_str(
            &std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        );
        text.push('\n');
    }
    let dns = TestDns::start_on(args.listen, Zone::parse(&text)?).await?;
    eprintln!("test-dns listening on {} (udp and tcp)", dns.addr());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
