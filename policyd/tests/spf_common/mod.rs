//! Shared by the SPF integration tests: a DNS server on loopback serving zones written as the
//! openspf suite's `zonedata` (JSON), with pyspf's driver semantics (testspf.py): SPF-type
//! records are copied to TXT when a name has no TXT, `TIMEOUT` never answers, unknown names are
//! NXDOMAIN, a name listed without records exists with no data.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, PTR, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use serde_json::Value;
use tokio::net::UdpSocket;

/// One name's data: records, or "never answer" for all types or for one type.
#[derive(Debug, Default, Clone)]
pub(crate) struct Node {
    records: Vec<RData>,
    timeout_all: bool,
    timeout_types: Vec<RecordType>,
}

pub(crate) type Zone = HashMap<String, Node>;

pub(crate) fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

pub(crate) fn fqdn(name: &str) -> Option<Name> {
    let mut name =
        Name::from_labels(name.trim_end_matches('.').split('.').map(str::as_bytes)).ok()?;
    name.set_fqdn(true);
    Some(name)
}

pub(crate) fn txt_strings(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(parts) => parts
            .iter()
            .map(|p| p.as_str().unwrap_or_default().to_owned())
            .collect(),
        other => vec![other.to_string()],
    }
}

pub(crate) fn txt(strings: &[String]) -> RData {
    // A TXT record without strings cannot be put on the wire; one empty string is the closest.
    let empty = [String::new()];
    let strings = if strings.is_empty() {
        &empty[..]
    } else {
        strings
    };
    RData::TXT(TXT::from_bytes(
        strings.iter().map(|s| s.as_bytes()).collect(),
    ))
}

/// pyspf testspf.py `getrdata`.
pub(crate) fn load_zone(zonedata: &serde_json::Map<String, Value>) -> Zone {
    let mut zone = Zone::new();
    for (name, entries) in zonedata {
        let node = zone.entry(key(name)).or_default();
        let mut generated = Vec::new();
        let mut has_txt = false;
        for entry in entries.as_array().into_iter().flatten() {
            if entry.as_str() == Some("TIMEOUT") {
                node.timeout_all = true;
                continue;
            }
            let Some((rtype, value)) = entry.as_object().and_then(|o| o.iter().next()) else {
                continue;
            };
            let rtype_enum = match rtype.as_str() {
                "A" => RecordType::A,
                "AAAA" => RecordType::AAAA,
                "MX" => RecordType::MX,
                "PTR" => RecordType::PTR,
                "CNAME" => RecordType::CNAME,
                "TXT" => RecordType::TXT,
                "SPF" => RecordType::Unknown(99),
                other => panic!("record type {other} in the suite"),
            };
            if value.as_str() == Some("TIMEOUT") {
                node.timeout_types.push(rtype_enum);
                continue;
            }
            match rtype.as_str() {
                "TXT" | "SPF" => {
                    let strings = txt_strings(value);
                    if rtype == "TXT" {
                        has_txt = true;
                    } else if !has_txt {
                        generated.push(strings.clone());
                    }
                    // Type SPF (99) itself is not served: RFC 7208 uses TXT only.
                    if rtype == "TXT" && strings != ["NONE"] {
                        node.records.push(txt(&strings));
                    }
                }
                "A" => {
                    for ip in txt_strings(value) {
                        node.records
                            .push(RData::A(A(ip.parse().expect("A address"))));
                    }
                }
                "AAAA" => {
                    for ip in txt_strings(value) {
                        node.records
                            .push(RData::AAAA(AAAA(ip.parse().expect("AAAA address"))));
                    }
                }
                "MX" => {
                    let pair = value.as_array().expect("MX [pref, host]");
                    let pref = pair[0].as_u64().expect("MX preference") as u16;
                    if let Some(host) = pair[1].as_str().and_then(fqdn) {
                        node.records.push(RData::MX(MX::new(pref, host)));
                    }
                }
                "PTR" => {
                    if let Some(target) = value.as_str().and_then(fqdn) {
                        node.records.push(RData::PTR(PTR(target)));
                    }
                }
                "CNAME" => {
                    if let Some(target) = value.as_str().and_then(fqdn) {
                        node.records.push(RData::CNAME(CNAME(target)));
                    }
                }
                _ => unreachable!(),
            }
        }
        if !has_txt {
            for strings in generated {
                node.records.push(txt(&strings));
            }
        }
    }
    zone
}

/// The answer to one query, or `None` to stay silent (a timeout).
pub(crate) fn respond(zone: &Zone, request: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(request).ok()?;
    let mut response = Message::new(
        request.metadata.id,
        MessageType::Response,
        request.metadata.op_code,
    );
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.authoritative = true;
    let query = request.queries.first().cloned()?;
    response.add_query(query.clone());
    let qtype = query.query_type();
    let mut name = query.name().clone();
    let mut answers = Vec::new();
    // One level of CNAME, as testspf.py follows.
    for level in 0..2 {
        // Raw labels: the suite has names with ':', '/', '%' and spaces.
        let k = key(&name
            .iter()
            .map(|label| String::from_utf8_lossy(label).into_owned())
            .collect::<Vec<_>>()
            .join("."));
        let Some(node) = zone.get(&k) else {
            if answers.is_empty() {
                if k.starts_with("error.") {
                    return None;
                }
                response.metadata.response_code = ResponseCode::NXDomain;
            }
            break;
        };
        if node.timeout_types.contains(&qtype)
            || (node.timeout_all && !node.records.iter().any(|r| r.record_type() == qtype))
        {
            return None;
        }
        let cname = node.records.iter().find_map(|r| match r {
            RData::CNAME(target) if qtype != RecordType::CNAME && level == 0 => {
                Some(target.0.clone())
            }
            _ => None,
        });
        if let Some(target) = cname {
            answers.push(Record::from_rdata(
                name.clone(),
                60,
                RData::CNAME(CNAME(target.clone())),
            ));
            name = target;
            continue;
        }
        answers.extend(
            node.records
                .iter()
                .filter(|r| r.record_type() == qtype)
                .map(|r| Record::from_rdata(name.clone(), 60, r.clone())),
        );
        break;
    }
    response.add_answers(answers);
    response.to_vec().ok()
}

pub(crate) async fn serve(zone: Zone) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns");
    let addr = socket.local_addr().expect("dns addr");
    let zone = Arc::new(zone);
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((len, peer)) = socket.recv_from(&mut buf).await {
            if let Some(reply) = respond(&zone, &buf[..len]) {
                let _ = socket.send_to(&reply, peer).await;
            }
        }
    });
    (addr, task)
}
