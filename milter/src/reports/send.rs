//! Which reports are due, and sending (SMTP or sendmail) or exporting them. A report is marked
//! sent per destination only after that destination accepted it; a period is closed only when
//! every authorised destination has it, so a failure is retried on the next run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use lettre::message::header::ContentType;
use lettre::message::{Attachment, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use mail_auth::MessageAuthenticator;
use mail_auth::dns::DnsCache;
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use super::xml::{Feedback, build_feedback, gzip, report_file_name, report_subject};
use super::{ReportError, ReportsConfig, SmtpTls, Store, Transport, expire};

/// A report that is due: one policy domain, one period.
#[derive(Debug, Clone)]
pub struct PendingReport {
    /// The policy domain.
    pub domain: String,
    /// Period start (inclusive), epoch seconds.
    pub begin: i64,
    /// Period end (exclusive), epoch seconds.
    pub end: i64,
    /// The report ID.
    pub report_id: String,
    /// The `rua` destinations as published (`addr` or `addr!bytes`).
    pub rua: Vec<String>,
    /// Messages covered.
    pub messages: usize,
    /// The document.
    pub feedback: Feedback,
}

/// A report rendered for transport.
#[derive(Debug, Clone)]
pub struct ReportFile {
    /// `<receiver>!<domain>!<begin>!<end>!<unique>.xml.gz`.
    pub name: String,
    /// The XML.
    pub xml: String,
    /// The gzip attachment.
    pub gz: Vec<u8>,
}

impl PendingReport {
    /// Renders the report.
    pub fn file(&self, receiver: &str) -> ReportFile {
        let xml = self.feedback.to_xml();
        let gz = gzip(xml.as_bytes());
        let unique = format!("{:x}", fnv(self.report_id.as_bytes()));
        ReportFile {
            name: report_file_name(receiver, &self.domain, self.begin, self.end - 1, &unique),
            xml,
            gz,
        }
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What one `reports send` run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SendSummary {
    /// Reports delivered to a destination (one per destination).
    pub sent: usize,
    /// Deliveries that failed (retried next run).
    pub failed: usize,
    /// Destinations skipped: not authorised (§7.1) or report over their size limit.
    pub skipped: usize,
    /// Periods closed.
    pub closed: usize,
}

/// Periods whose end has passed, per domain, and whether each has records. Periods are aligned
/// to multiples of the domain's interval (`ri`, at least `default_interval` when absent).
pub async fn build_pending(
    store: &Store,
    config: &ReportsConfig,
    now: i64,
) -> Result<Vec<(String, i64, Option<PendingReport>)>, ReportError> {
    let org = config.effective_org_name();
    let email = config.effective_email();
    let receiver = config.effective_receiver();
    let mut due = Vec::new();
    for (domain, oldest) in store.domains().await? {
        // Only what has not been reported yet is read.
        let last_end = store.last_end(&domain).await?;
        let latest = store
            .records(&domain, last_end.unwrap_or(oldest), now + 1)
            .await?;
        let Some(last) = latest.last() else { continue };
        let ri = match last.published.ri {
            0 => config.default_interval.get().as_secs() as i64,
            ri => i64::from(ri.max(3600)),
        };
        let start = match last_end {
            Some(end) => end,
            None => oldest - oldest.rem_euclid(ri),
        };
        let closed_until = now - now.rem_euclid(ri);
        if closed_until <= start {
            continue;
        }
        let mut buckets: BTreeMap<i64, Vec<_>> = BTreeMap::new();
        for record in latest
            .into_iter()
            .filter(|r| r.received >= start && r.received < closed_until)
        {
            let begin = start + (record.received - start) / ri * ri;
            buckets.entry(begin).or_default().push(record);
        }
        if buckets.is_empty() {
            due.push((domain.clone(), closed_until, None));
            continue;
        }
        for (begin, records) in buckets {
            let end = begin + ri;
            let report_id = format!("{begin}.{domain}@{receiver}");
            let feedback = build_feedback(
                &org,
                &email,
                &config.extra_contact_info,
                &report_id,
                begin,
                end - 1,
                &records,
            );
            let rua = records
                .last()
                .map(|r| r.published.rua.clone())
                .unwrap_or_default();
            due.push((
                domain.clone(),
                end,
                Some(PendingReport {
                    domain: domain.clone(),
                    begin,
                    end,
                    report_id,
                    rua,
                    messages: records.len(),
                    feedback,
                }),
            ));
        }
        // Close the empty periods after the last one with records too.
        if due.last().is_some_and(|(_, end, _)| *end < closed_until) {
            due.push((domain.clone(), closed_until, None));
        }
    }
    Ok(due)
}

/// `reports send`: mails every due report to its authorised `rua` destinations, then expires
/// old rows.
pub async fn send_reports(
    config: &ReportsConfig,
    state_dir: &Path,
    auth: &MessageAuthenticator,
    now: i64,
) -> Result<SendSummary, ReportError> {
    let store = Store::connect(&config.store_url(state_dir)).await?;
    let summary = send_with(&store, config, auth, None::<&mail_auth::dns::NoCache>, now).await;
    store.close().await;
    summary
}

/// [`send_reports`] on an open store, with an optional DNS cache for the §7.1 checks.
pub async fn send_with<C: DnsCache + Sync>(
    store: &Store,
    config: &ReportsConfig,
    auth: &MessageAuthenticator,
    cache: Option<&C>,
    now: i64,
) -> Result<SendSummary, ReportError> {
    let receiver = config.effective_receiver();
    let mut summary = SendSummary::default();
    let mut blocked: Vec<String> = Vec::new();
    for (domain, end, report) in build_pending(store, config, now).await? {
        if blocked.contains(&domain) {
            continue;
        }
        let Some(report) = report else {
            store.set_last_end(&domain, end).await?;
            continue;
        };
        let destinations: Vec<(String, usize)> = report
            .rua
            .iter()
            .map(|uri| match uri.rsplit_once('!') {
                Some((address, size)) => (address.to_owned(), size.parse().unwrap_or(0)),
                None => (uri.clone(), 0),
            })
            .collect();
        let addresses: Vec<&str> = destinations.iter().map(|(a, _)| a.as_str()).collect();
        let authorized = match cache {
            Some(cache) => {
                auth.authorized_report_addresses(
                    mail_auth::Parameters::new((domain.as_str(), addresses.as_slice()))
                        .with_cache(cache),
                )
                .await
            }
            None => {
                auth.authorized_report_addresses((domain.as_str(), addresses.as_slice()))
                    .await
            }
        };
        let authorized: Vec<String> = match authorized {
            Ok(list) => list.into_iter().map(|a| (*a).to_owned()).collect(),
            Err(err) => {
                warn!(domain, error = %err, "DMARC report destinations not verifiable now, retrying later");
                summary.failed += 1;
                blocked.push(domain.clone());
                continue;
            }
        };
        let file = report.file(&receiver);
        let mut all_done = true;
        for (address, max_size) in &destinations {
            if !authorized.contains(address) {
                warn!(domain, destination = %address, "external DMARC report destination not authorised (RFC 7489 §7.1), skipped");
                summary.skipped += 1;
                continue;
            }
            if store.was_sent(&report.report_id, address).await? {
                continue;
            }
            if *max_size > 0 && file.gz.len() > *max_size {
                warn!(domain, destination = %address, size = file.gz.len(), limit = max_size, "DMARC report larger than the destination accepts, skipped");
                summary.skipped += 1;
                store.mark_sent(&report.report_id, address, now).await?;
                continue;
            }
            match deliver(config, &report, &file, address).await {
                Ok(()) => {
                    store.mark_sent(&report.report_id, address, now).await?;
                    summary.sent += 1;
                    info!(domain, destination = %address, report_id = %report.report_id, messages = report.messages, "DMARC aggregate report sent");
                    metrics::counter!("postern_milter_dmarc_reports_sent_total").increment(1);
                }
                Err(err) => {
                    warn!(domain, destination = %address, error = %err, "DMARC aggregate report not sent, will retry");
                    metrics::counter!("postern_milter_dmarc_reports_failed_total").increment(1);
                    summary.failed += 1;
                    all_done = false;
                }
            }
        }
        let give_up = now - report.end > config.give_up_after.get().as_secs() as i64;
        if all_done || give_up {
            if !all_done {
                warn!(domain, report_id = %report.report_id, "giving up on a DMARC report after repeated failures");
            }
            store.set_last_end(&domain, report.end).await?;
            summary.closed += 1;
        } else {
            // Later periods wait so that periods close in order.
            blocked.push(domain.clone());
        }
    }
    expire(store, config, now).await?;
    Ok(summary)
}

async fn deliver(
    config: &ReportsConfig,
    report: &PendingReport,
    file: &ReportFile,
    to: &str,
) -> Result<(), ReportError> {
    let error = |message: String| ReportError::Send {
        report_id: report.report_id.clone(),
        message,
    };
    let org = config.effective_org_name();
    let from = config.effective_email();
    let body = format!(
        "This is a DMARC aggregate report for {} covering {} to {} (UTC epoch), {} message(s).\n\
         It is attached as {}.\n",
        report.domain, report.begin, report.end, report.messages, file.name
    );
    let message = Message::builder()
        .from(
            from.parse()
                .map_err(|e| error(format!("from {from}: {e}")))?,
        )
        .to(to.parse().map_err(|e| error(format!("to {to}: {e}")))?)
        .subject(report_subject(&report.domain, &org, &report.report_id))
        .multipart(
            MultiPart::mixed()
                .singlepart(SinglePart::plain(body))
                .singlepart(Attachment::new(file.name.clone()).body(
                    file.gz.clone(),
                    ContentType::parse("application/gzip").expect("static"),
                )),
        )
        .map_err(|e| error(e.to_string()))?;
    match config.transport {
        Transport::Smtp => {
            let tls_parameters =
                || TlsParameters::new(config.smtp_host.clone()).map_err(|e| error(e.to_string()));
            let tls = match config.smtp_tls {
                SmtpTls::Never => Tls::None,
                SmtpTls::Opportunistic => Tls::Opportunistic(tls_parameters()?),
                SmtpTls::Required => Tls::Required(tls_parameters()?),
                SmtpTls::Wrapper => Tls::Wrapper(tls_parameters()?),
            };
            let mut builder =
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(config.smtp_host.clone())
                    .port(config.smtp_port)
                    .tls(tls)
                    .timeout(Some(config.smtp_timeout.get()));
            if !config.smtp_username.is_empty() {
                postern_common::secret::check_private_file(&config.smtp_password_file)
                    .map_err(|e| error(e.to_string()))?;
                let password = std::fs::read_to_string(&config.smtp_password_file)
                    .map_err(|e| error(format!("{}: {e}", config.smtp_password_file.display())))?;
                builder = builder.credentials(Credentials::new(
                    config.smtp_username.clone(),
                    password.trim_end_matches(['\r', '\n']).to_owned(),
                ));
            }
            builder
                .build()
                .send(message)
                .await
                .map_err(|e| error(e.to_string()))?;
        }
        Transport::Sendmail => {
            let mut child = tokio::process::Command::new(&config.sendmail_path)
                .args(["-i", "-f", &from, "--", to])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| error(format!("{}: {e}", config.sendmail_path.display())))?;
            let mut stdin = child.stdin.take().expect("piped");
            stdin
                .write_all(&message.formatted())
                .await
                .map_err(|e| error(e.to_string()))?;
            drop(stdin);
            let output = tokio::time::timeout(config.smtp_timeout.get(), child.wait_with_output())
                .await
                .map_err(|_| error("sendmail timed out".to_owned()))?
                .map_err(|e| error(e.to_string()))?;
            if !output.status.success() {
                return Err(error(format!(
                    "sendmail exited with {}: {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                )));
            }
        }
    }
    Ok(())
}

/// `reports export --dir DIR`: writes every due report as `<name>.xml.gz` into `dir` without
/// marking anything sent. Returns the files written.
pub async fn export_reports(
    config: &ReportsConfig,
    state_dir: &Path,
    dir: &Path,
    now: i64,
) -> Result<Vec<PathBuf>, ReportError> {
    let store = Store::connect(&config.store_url(state_dir)).await?;
    let receiver = config.effective_receiver();
    let mut written = Vec::new();
    for (_, _, report) in build_pending(&store, config, now).await? {
        let Some(report) = report else { continue };
        let file = report.file(&receiver);
        let path = dir.join(&file.name);
        tokio::fs::write(&path, &file.gz)
            .await
            .map_err(|source| ReportError::Io {
                path: path.display().to_string(),
                source,
            })?;
        written.push(path);
    }
    store.close().await;
    Ok(written)
}

/// `reports show`: a summary of what is stored and due, one line per domain.
pub async fn show_pending(
    config: &ReportsConfig,
    state_dir: &Path,
    now: i64,
) -> Result<String, ReportError> {
    let store = Store::connect(&config.store_url(state_dir)).await?;
    let mut out = format!(
        "store: {} ({} records)\n",
        store.backend_name(),
        store.count().await?
    );
    let spool = config.spool_path(state_dir);
    if let Ok(text) = tokio::fs::read_to_string(&spool).await {
        out.push_str(&format!(
            "spool {}: {} record(s) waiting for the store\n",
            spool.display(),
            text.lines().filter(|l| !l.trim().is_empty()).count()
        ));
    }
    let pending = build_pending(&store, config, now).await?;
    for (domain, oldest) in store.domains().await? {
        let reports: Vec<&PendingReport> = pending
            .iter()
            .filter(|(d, _, _)| *d == domain)
            .filter_map(|(_, _, r)| r.as_ref())
            .collect();
        let messages: usize = reports.iter().map(|r| r.messages).sum();
        let rua = reports.last().map(|r| r.rua.join(",")).unwrap_or_default();
        out.push_str(&format!(
            "{domain}: oldest record {oldest}, last reported until {}, {} report(s) due covering {messages} message(s), rua={}\n",
            store
                .last_end(&domain)
                .await?
                .map_or_else(|| "never".to_owned(), |t| t.to_string()),
            reports.len(),
            if rua.is_empty() { "-" } else { &rua },
        ));
    }
    store.close().await;
    Ok(out)
}
