//! `reports import-history FILE`: opendmarc's history file (`HistoryFile`, the input of
//! opendmarc-import) into the store, so that what was collected before the switch is reported.
//!
//! The format is one `key value` line per fact, a new message at every `job` line; codes are
//! libopendmarc's (`opendmarc/README`). Re-importing the same file adds nothing twice: each
//! message's key is (reporter, received, job), opendmarc's own unique key.

use std::path::Path;

use super::{DkimAuth, PublishedPolicy, ReportError, ReportRecord, ReportsConfig, Store};

/// Parses a history file's text into records with their unique keys.
pub fn parse_history(text: &str, path: &str) -> Result<Vec<(String, ReportRecord)>, ReportError> {
    let mut out = Vec::new();
    let mut current: Option<(String, String, ReportRecord, Option<i32>)> = None;
    let finish = |entry: Option<(String, String, ReportRecord, Option<i32>)>,
                  out: &mut Vec<(String, ReportRecord)>| {
        if let Some((job, reporter, mut record, action)) = entry {
            if record.published.domain.is_empty() {
                record.published.domain = record.header_from.clone();
            }
            // 3 = tempfail: the message was not accepted, so it is not reported.
            if action != Some(3) && !record.header_from.is_empty() {
                let uid = format!("history.{reporter}.{}.{job}", record.received);
                out.push((uid, record));
            }
        }
    };
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim_end();
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| ReportError::History {
            path: path.to_owned(),
            line: index + 1,
            message,
        };
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        let value = value.trim();
        if key == "job" {
            finish(current.take(), &mut out);
            let record = ReportRecord {
                received: 0,
                job_id: value.to_owned(),
                source_ip: String::new(),
                header_from: String::new(),
                envelope_from: String::new(),
                envelope_to: String::new(),
                spf_domain: String::new(),
                spf_scope: "mfrom".to_owned(),
                spf_result: "none".to_owned(),
                dkim: Vec::new(),
                dkim_aligned: false,
                spf_aligned: false,
                disposition: "none".to_owned(),
                reasons: Vec::new(),
                published: PublishedPolicy::absent(""),
            };
            current = Some((value.to_owned(), String::new(), record, None));
            continue;
        }
        let Some((_, reporter, record, action)) = current.as_mut() else {
            return Err(bad(format!("{key:?} before the first job line")));
        };
        let number = |text: &str| {
            text.trim()
                .parse::<i64>()
                .map_err(|_| bad(format!("{key}: {text:?} is not a number")))
        };
        match key {
            "reporter" => *reporter = value.to_owned(),
            "received" => record.received = number(value)?,
            "ipaddr" => record.source_ip = value.to_owned(),
            "from" => record.header_from = value.to_ascii_lowercase(),
            "mfrom" => {
                record.envelope_from = value.to_ascii_lowercase();
                record.spf_domain = record.envelope_from.clone();
            }
            "spf" => record.spf_result = spf_code(number(value)?).to_owned(),
            "dkim" => {
                let mut parts = value.split_whitespace();
                let (Some(domain), Some(selector), Some(code)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return Err(bad(format!(
                        "dkim: {value:?} is not \"domain selector code\""
                    )));
                };
                record.dkim.push(DkimAuth {
                    domain: domain.to_ascii_lowercase(),
                    selector: if selector == "-" {
                        String::new()
                    } else {
                        selector.to_owned()
                    },
                    result: dkim_code(number(code)?).to_owned(),
                });
            }
            "pdomain" => record.published.domain = value.to_ascii_lowercase(),
            "rua" => {
                record.published.rua = if value == "-" {
                    Vec::new()
                } else {
                    value.split(',').filter_map(rua_entry).collect()
                }
            }
            "pct" => record.published.pct = number(value)?.clamp(0, 100) as u8,
            "adkim" => record.published.adkim = align_code(number(value)?).to_owned(),
            "aspf" => record.published.aspf = align_code(number(value)?).to_owned(),
            "p" => record.published.p = policy_code(number(value)?).to_owned(),
            "sp" => record.published.sp = policy_code(number(value)?).to_owned(),
            "align_dkim" => record.dkim_aligned = number(value)? == 4,
            "align_spf" => record.spf_aligned = number(value)? == 4,
            "action" => {
                let code = number(value)? as i32;
                *action = Some(code);
                record.disposition = match code {
                    0 | 1 => "reject",
                    4 => "quarantine",
                    _ => "none",
                }
                .to_owned();
            }
            // policy, arc, arc_policy and unknown keys carry nothing the report needs.
            _ => {}
        }
    }
    finish(current.take(), &mut out);
    for (_, record) in &mut out {
        if record.published.sp.is_empty() {
            record.published.sp = record.published.p.clone();
        }
        record.published.np = record.published.sp.clone();
    }
    Ok(out)
}

/// Imports a history file into the store; returns the number of new records.
pub async fn import_history(
    config: &ReportsConfig,
    state_dir: &Path,
    path: &Path,
) -> Result<usize, ReportError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| ReportError::Io {
            path: path.display().to_string(),
            source,
        })?;
    let records = parse_history(&text, &path.display().to_string())?;
    let store = Store::connect(&config.store_url(state_dir)).await?;
    let mut new = 0;
    for (uid, record) in &records {
        if store.insert(uid, record).await? {
            new += 1;
        }
    }
    store.close().await;
    Ok(new)
}

fn spf_code(code: i64) -> &'static str {
    match code {
        0 => "pass",
        2 => "softfail",
        3 => "neutral",
        4 => "temperror",
        5 | 9 => "permerror",
        7 => "fail",
        _ => "none",
    }
}

fn dkim_code(code: i64) -> &'static str {
    match code {
        0 => "pass",
        2 | 7 | 12 => "fail",
        3 => "neutral",
        4 => "temperror",
        5 | 9 => "permerror",
        8 => "policy",
        _ => "none",
    }
}

fn align_code(code: i64) -> &'static str {
    if code == 115 { "s" } else { "r" }
}

fn policy_code(code: i64) -> &'static str {
    match code {
        113 => "quarantine",
        114 => "reject",
        _ => "none",
    }
}

/// `mailto:a@b!10m` → `a@b!10485760`.
fn rua_entry(uri: &str) -> Option<String> {
    let uri = uri.trim();
    let address = uri
        .strip_prefix("mailto:")
        .or_else(|| uri.strip_prefix("MAILTO:"))?;
    match address.split_once('!') {
        Some((address, size)) => {
            let (digits, unit) = size.split_at(
                size.find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(size.len()),
            );
            let base: u64 = digits.parse().ok()?;
            let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
                "" => 1,
                "k" => 1 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                "t" => 1 << 40,
                _ => return None,
            };
            Some(format!(
                "{}!{}",
                address.to_ascii_lowercase(),
                base.saturating_mul(multiplier)
            ))
        }
        None => Some(address.to_ascii_lowercase()),
    }
}
