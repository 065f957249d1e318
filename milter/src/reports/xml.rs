//! The aggregate report document (RFC 7489 Appendix C) built from stored records, grouped so that
//! identical rows are counted once, and its transport names (§7.2.1.1).

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;

use super::{DkimAuth, PublishedPolicy, ReportRecord};

/// `<feedback>`.
#[derive(Debug, Clone, Serialize)]
pub struct Feedback {
    /// `1.0`.
    pub version: String,
    /// Who reports what.
    pub report_metadata: ReportMetadata,
    /// The record as published.
    pub policy_published: PolicyPublishedXml,
    /// The grouped rows.
    pub record: Vec<RecordXml>,
}

/// `<report_metadata>`.
#[derive(Debug, Clone, Serialize)]
pub struct ReportMetadata {
    /// Our organisation.
    pub org_name: String,
    /// Our contact address.
    pub email: String,
    /// Optional extra contact.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra_contact_info: Option<String>,
    /// Unique report ID.
    pub report_id: String,
    /// Period covered.
    pub date_range: DateRange,
}

/// `<date_range>`.
#[derive(Debug, Clone, Serialize)]
pub struct DateRange {
    /// Start, epoch seconds.
    pub begin: i64,
    /// End, epoch seconds.
    pub end: i64,
}

/// `<policy_published>`.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyPublishedXml {
    /// Policy domain.
    pub domain: String,
    /// `r`/`s`.
    pub adkim: String,
    /// `r`/`s`.
    pub aspf: String,
    /// Domain policy.
    pub p: String,
    /// Subdomain policy.
    pub sp: String,
    /// Percentage.
    pub pct: u8,
    /// Failure reporting options.
    pub fo: String,
}

/// `<record>`.
#[derive(Debug, Clone, Serialize)]
pub struct RecordXml {
    /// The row.
    pub row: RowXml,
    /// The identifiers.
    pub identifiers: Identifiers,
    /// The raw results.
    pub auth_results: AuthResults,
}

/// `<row>`.
#[derive(Debug, Clone, Serialize)]
pub struct RowXml {
    /// Client address.
    pub source_ip: String,
    /// Messages in this group.
    pub count: u64,
    /// What was done.
    pub policy_evaluated: PolicyEvaluated,
}

/// `<policy_evaluated>`.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyEvaluated {
    /// `none`/`quarantine`/`reject`.
    pub disposition: String,
    /// Aligned DKIM `pass`/`fail`.
    pub dkim: String,
    /// Aligned SPF `pass`/`fail`.
    pub spf: String,
    /// Override reasons.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reason: Vec<Reason>,
}

/// `<reason>`.
#[derive(Debug, Clone, Serialize)]
pub struct Reason {
    /// Override type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Comment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// `<identifiers>`.
#[derive(Debug, Clone, Serialize)]
pub struct Identifiers {
    /// Envelope recipient domain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envelope_to: Option<String>,
    /// Envelope sender domain.
    pub envelope_from: String,
    /// Header From domain.
    pub header_from: String,
}

/// `<auth_results>`.
#[derive(Debug, Clone, Serialize)]
pub struct AuthResults {
    /// DKIM results.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dkim: Vec<DkimXml>,
    /// SPF results (one).
    pub spf: Vec<SpfXml>,
}

/// `<dkim>`.
#[derive(Debug, Clone, Serialize)]
pub struct DkimXml {
    /// Signing domain.
    pub domain: String,
    /// Selector.
    pub selector: String,
    /// Result.
    pub result: String,
}

/// `<spf>`.
#[derive(Debug, Clone, Serialize)]
pub struct SpfXml {
    /// Domain checked.
    pub domain: String,
    /// `helo`/`mfrom`.
    pub scope: String,
    /// Result.
    pub result: String,
}

/// The grouping key: everything a `<record>` shows except the count.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct GroupKey {
    source_ip: String,
    disposition: String,
    dkim_aligned: bool,
    spf_aligned: bool,
    reasons: Vec<(String, String)>,
    envelope_to: String,
    envelope_from: String,
    header_from: String,
    dkim: Vec<DkimAuth>,
    spf: (String, String, String),
}

/// Builds the report for one policy domain and period from its records (at least one).
pub fn build_feedback(
    org_name: &str,
    email: &str,
    extra_contact_info: &str,
    report_id: &str,
    begin: i64,
    end: i64,
    records: &[ReportRecord],
) -> Feedback {
    let mut groups: BTreeMap<GroupKey, u64> = BTreeMap::new();
    for record in records {
        let mut dkim = record.dkim.clone();
        dkim.sort();
        let key = GroupKey {
            source_ip: record.source_ip.clone(),
            disposition: record.disposition.clone(),
            dkim_aligned: record.dkim_aligned,
            spf_aligned: record.spf_aligned,
            reasons: record.reasons.clone(),
            envelope_to: record.envelope_to.clone(),
            envelope_from: record.envelope_from.clone(),
            header_from: record.header_from.clone(),
            dkim,
            spf: (
                record.spf_domain.clone(),
                record.spf_scope.clone(),
                record.spf_result.clone(),
            ),
        };
        *groups.entry(key).or_default() += 1;
    }
    // The policy as published most recently in the period.
    let published: PublishedPolicy = records
        .iter()
        .max_by_key(|r| r.received)
        .map(|r| r.published.clone())
        .unwrap_or_else(|| PublishedPolicy::absent(""));
    let pass_fail = |ok: bool| if ok { "pass" } else { "fail" }.to_owned();
    Feedback {
        version: "1.0".to_owned(),
        report_metadata: ReportMetadata {
            org_name: org_name.to_owned(),
            email: email.to_owned(),
            extra_contact_info: (!extra_contact_info.is_empty())
                .then(|| extra_contact_info.to_owned()),
            report_id: report_id.to_owned(),
            date_range: DateRange { begin, end },
        },
        policy_published: PolicyPublishedXml {
            domain: published.domain,
            adkim: published.adkim,
            aspf: published.aspf,
            p: published.p,
            sp: published.sp,
            pct: published.pct,
            fo: published.fo,
        },
        record: groups
            .into_iter()
            .map(|(key, count)| RecordXml {
                row: RowXml {
                    source_ip: key.source_ip,
                    count,
                    policy_evaluated: PolicyEvaluated {
                        disposition: key.disposition,
                        dkim: pass_fail(key.dkim_aligned),
                        spf: pass_fail(key.spf_aligned),
                        reason: key
                            .reasons
                            .into_iter()
                            .map(|(kind, comment)| Reason {
                                kind,
                                comment: (!comment.is_empty()).then_some(comment),
                            })
                            .collect(),
                    },
                },
                identifiers: Identifiers {
                    envelope_to: (!key.envelope_to.is_empty()).then_some(key.envelope_to),
                    envelope_from: key.envelope_from,
                    header_from: key.header_from,
                },
                auth_results: AuthResults {
                    dkim: key
                        .dkim
                        .into_iter()
                        .map(|d| DkimXml {
                            domain: d.domain,
                            selector: d.selector,
                            result: d.result,
                        })
                        .collect(),
                    spf: vec![SpfXml {
                        domain: key.spf.0,
                        scope: key.spf.1,
                        result: key.spf.2,
                    }],
                },
            })
            .collect(),
    }
}

impl Feedback {
    /// The XML document.
    pub fn to_xml(&self) -> String {
        let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let mut serializer = quick_xml::se::Serializer::with_root(&mut xml, Some("feedback"))
            .expect("static root name");
        serializer.indent(' ', 2);
        self.serialize(serializer).expect("plain strings serialise");
        xml.push('\n');
        xml
    }
}

/// gzip-compresses bytes.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes).expect("writing to memory");
    encoder.finish().expect("writing to memory")
}

/// `<receiver>!<policy-domain>!<begin>!<end>!<unique>.xml.gz` (RFC 7489 §7.2.1.1).
pub fn report_file_name(
    receiver: &str,
    domain: &str,
    begin: i64,
    end: i64,
    unique: &str,
) -> String {
    format!("{receiver}!{domain}!{begin}!{end}!{unique}.xml.gz")
}

/// `Report Domain: <d> Submitter: <org> Report-ID: <<id>>` (RFC 7489 §7.2.1.1).
pub fn report_subject(domain: &str, org: &str, report_id: &str) -> String {
    format!("Report Domain: {domain} Submitter: {org} Report-ID: <{report_id}>")
}
