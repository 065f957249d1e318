//! `smtp-sink --listen 127.0.0.1:2526 --dir DIR`: accepts every message and writes each to
//! DIR/NNNN.eml with its envelope in `X-Envelope-From` / `X-Envelope-To` lines on top, printing
//! one line per message (deploy/demo.sh's next hop).

use std::time::Duration;

use clap::Parser;
use postern_tests::smtp::Sink;

/// Keep every message Postfix delivers.
#[derive(Debug, Parser)]
#[command(name = "smtp-sink")]
struct Args {
    /// Address to listen on
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Where to write messages
    #[arg(long)]
    dir: std::path::PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)?;
    let sink = Sink::start_on(args.listen).await?;
    eprintln!("smtp-sink listening on {}", sink.addr());
    let mut written = 0;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        for message in sink.messages().iter().skip(written) {
            written += 1;
            let path = args.dir.join(format!("{written:04}.eml"));
            let mut text = format!("X-Envelope-From: <{}>\r\n", message.mail_from);
            for rcpt in &message.rcpt_to {
                text.push_str(&format!("X-Envelope-To: <{rcpt}>\r\n"));
            }
            text.push_str(&message.text());
            std::fs::write(&path, text)?;
            println!(
                "delivered {} from=<{}> to=<{}>",
                path.display(),
                message.mail_from,
                message.rcpt_to.join(",")
            );
        }
    }
}
