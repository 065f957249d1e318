//! `dkim-sign KEY_FILE -d 5 [-c THREADS] [--domain D --selector S] [--message FILE]
//! [--write FILE]`: signs one message over and over in this process with mail-auth (through
//! `postern_milter::dkim::Dkim::sign`, the milter's own one-shot signing: a mail-auth
//! `DkimSigner` per key, then `sign`), without any milter protocol, and prints the generators'
//! line. It is the bound the milter's signing rows are held against; `--write` saves the
//! message with its DKIM-Signature header (the verify benchmark's input).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use postern_milter::dkim::{Dkim, DkimConfig};
use postern_tests::clients::milter::sample_message;
use postern_tests::load::Summary;

/// Sign in-process; print one line of figures.
#[derive(Debug, Parser)]
#[command(name = "dkim-sign")]
struct Args {
    /// Private key (PEM, RSA or Ed25519), mode 0600
    key_file: PathBuf,
    /// Signing domain; also the From domain of the built-in message
    #[arg(long, default_value = "example.com")]
    domain: String,
    /// Selector
    #[arg(long, default_value = "sel")]
    selector: String,
    /// Threads signing at once
    #[arg(short = 'c', long, default_value_t = 1)]
    threads: usize,
    /// Seconds to run
    #[arg(short = 'd', long, default_value_t = 5.0)]
    duration: f64,
    /// Message file (RFC 5322, CRLF); default the generators' built-in 4 KB message
    #[arg(long)]
    message: Option<PathBuf>,
    /// Write the message with its DKIM-Signature header here, then run
    #[arg(long)]
    write: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let raw = match &args.message {
        Some(path) => std::fs::read(path)?,
        None => sample_message(&args.domain),
    };
    let dkim = Dkim::build(&DkimConfig {
        domain: vec![args.domain.clone()],
        selector: args.selector.clone(),
        key_file: args.key_file.clone(),
        ..DkimConfig::default()
    })?;
    let signers = dkim.signers_for("alice", &args.domain);
    anyhow::ensure!(!signers.is_empty(), "no key for {}", args.domain);
    // The header names, as the milter collects them.
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("the message has no CRLF header/body separator"))?;
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let names: Vec<&str> = head
        .split("\r\n")
        .filter(|line| !line.starts_with([' ', '\t']))
        .filter_map(|line| line.split_once(':').map(|(name, _)| name))
        .collect();
    let list = dkim.header_list(names.into_iter());
    if let Some(path) = &args.write {
        let values = dkim.sign(&signers, &list, &raw)?;
        let mut out = Vec::new();
        for value in values {
            out.extend_from_slice(format!("DKIM-Signature: {value}\r\n").as_bytes());
        }
        out.extend_from_slice(&raw);
        std::fs::write(path, out)?;
    }
    let shared = Arc::new((dkim, signers, list, raw));
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let started = Instant::now();
    let threads: Vec<_> = (0..args.threads.max(1))
        .map(|_| {
            let shared = shared.clone();
            std::thread::spawn(move || -> anyhow::Result<Vec<u64>> {
                let (dkim, signers, list, raw) = &*shared;
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    let values = dkim.sign(signers, list, raw)?;
                    std::hint::black_box(values);
                    latencies.push(u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX));
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut latencies_us = Vec::new();
    for thread in threads {
        let latencies = thread
            .join()
            .map_err(|_| anyhow::anyhow!("a signing thread panicked"))??;
        latencies_us.extend(latencies);
    }
    latencies_us.sort_unstable();
    let summary = Summary {
        requests: latencies_us.len() as u64,
        errors: 0,
        elapsed: started.elapsed(),
        latencies_us,
        peak_rss_kb: None,
    };
    println!("{}", summary.line());
    Ok(())
}
