//! The load-generator runner shared by the `policy`, `milter`, `tcp-table` and `socketmap`
//! binaries: N connections, a request budget or a time budget, latency percentiles, and the
//! server's peak RSS from /proc.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::clients::Target;

/// Failed requests in a row after which a connection gives up.
const MAX_FAILURES_IN_A_ROW: u32 = 5;

/// What every generator takes on its command line.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Server: HOST:PORT, inet:HOST:PORT, inet:PORT@HOST or unix:PATH
    pub target: String,
    /// Connections used at once
    #[arg(short = 'c', long, default_value_t = 1)]
    pub connections: usize,
    /// Requests in all (ignored with --duration)
    #[arg(short = 'n', long, default_value_t = 10_000)]
    pub requests: u64,
    /// Run for this many seconds instead of a request count
    #[arg(short = 'd', long)]
    pub duration: Option<f64>,
    /// Report the peak RSS (VmHWM) of this server process
    #[arg(long)]
    pub pid: Option<u32>,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Requests answered.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Sorted latencies in microseconds.
    pub latencies_us: Vec<u64>,
    /// The server's peak RSS in kB, if asked.
    pub peak_rss_kb: Option<u64>,
}

impl Summary {
    /// The latency at quantile `q` (0..1) in milliseconds.
    pub fn percentile_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let last = self.latencies_us.len() - 1;
        let index = ((last as f64) * q).round() as usize;
        self.latencies_us[index.min(last)] as f64 / 1000.0
    }

    /// The one line every generator prints.
    pub fn line(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        let mut line = format!(
            "{} requests in {:.2} s: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms",
            self.requests,
            secs,
            self.requests as f64 / secs.max(1e-9),
            self.percentile_ms(0.50),
            self.percentile_ms(0.99)
        );
        if let Some(kb) = self.peak_rss_kb {
            line.push_str(&format!(", server peak RSS {:.1} MB", kb as f64 / 1024.0));
        }
        line.push_str(&format!(", {} errors", self.errors));
        line
    }
}

/// VmHWM of a process, in kB.
pub fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
}

/// One connection's worth of work.
pub trait Worker: Send + 'static {
    /// Sends request number `index` and waits for its answer.
    fn request(&mut self, index: u64) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Runs the load: `connect` makes a worker per connection (and a new one after an error).
pub async fn run<W, F, Fut>(args: &LoadArgs, connect: F) -> anyhow::Result<Summary>
where
    W: Worker,
    F: Fn(Target) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<W>> + Send,
{
    let target: Target = args.target.parse()?;
    let connect = Arc::new(connect);
    let issued = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let budget = if args.duration.is_some() {
        u64::MAX
    } else {
        args.requests
    };
    let deadline = args
        .duration
        .map(|s| Instant::now() + Duration::from_secs_f64(s));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.connections.max(1) {
        let (connect, issued, errors, target) = (
            connect.clone(),
            issued.clone(),
            errors.clone(),
            target.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut worker = match connect(target.clone()).await {
                Ok(worker) => worker,
                Err(err) => {
                    eprintln!("connect failed: {err:#}");
                    errors.fetch_add(1, Ordering::Relaxed);
                    return latencies;
                }
            };
            let mut failures_in_a_row = 0u32;
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let index = issued.fetch_add(1, Ordering::Relaxed);
                if index >= budget {
                    break;
                }
                let t0 = Instant::now();
                match worker.request(index).await {
                    Ok(()) => {
                        failures_in_a_row = 0;
                        latencies.push(u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX))
                    }
                    Err(err) => {
                        failures_in_a_row += 1;
                        // A server that stopped answering would otherwise cost one timeout per
                        // remaining request.
                        if failures_in_a_row >= MAX_FAILURES_IN_A_ROW {
                            eprintln!(
                                "giving up a connection after {MAX_FAILURES_IN_A_ROW} failed requests in a row"
                            );
                            errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("request failed: {err:#}");
                        }
                        match connect(target.clone()).await {
                            Ok(fresh) => worker = fresh,
                            Err(_) => break,
                        }
                    }
                }
            }
            latencies
        }));
    }
    let mut latencies_us = Vec::new();
    for task in tasks {
        latencies_us.extend(task.await?);
    }
    let elapsed = started.elapsed();
    latencies_us.sort_unstable();
    Ok(Summary {
        requests: latencies_us.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        elapsed,
        latencies_us,
        peak_rss_kb: args.pid.and_then(peak_rss_kb),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_line_has_the_agreed_shape() {
        let summary = Summary {
            requests: 4,
            errors: 1,
            elapsed: Duration::from_secs(2),
            latencies_us: vec![100, 200, 300, 10_000],
            peak_rss_kb: Some(5 * 1024),
        };
        assert_eq!(
            summary.line(),
            "4 requests in 2.00 s: 2 req/s, p50 0.300 ms, p99 10.000 ms, server peak RSS 5.0 MB, 1 errors"
        );
        let empty = Summary {
            peak_rss_kb: None,
            latencies_us: Vec::new(),
            requests: 0,
            ..summary
        };
        assert_eq!(
            empty.line(),
            "0 requests in 2.00 s: 0 req/s, p50 0.000 ms, p99 0.000 ms, 1 errors"
        );
        assert!(peak_rss_kb(std::process::id()).is_some_and(|kb| kb > 0));
    }
}
