//! A real DNS server for tests, on a loopback port: zones from small text files, answers over UDP
//! and TCP, and faults (SERVFAIL, no answer, NXDOMAIN) injected per name. Daemons under test get
//! their DNS from it through `[dns] nameservers`, never from the internet.
//!
//! Zone file format, one record per line, `#` comments:
//! ```text
//! example.test.            TXT   "v=spf1 ip4:192.0.2.0/24 -all"
//! sel._domainkey.example.test TXT "v=DKIM1; k=ed25519; " "p=..."   # several strings
//! mail.example.test        A     192.0.2.25
//! mail.example.test        AAAA  2001:db8::25
//! example.test             MX    10 mail.example.test
//! 25.2.0.192.in-addr.arpa  PTR   mail.example.test
//! www.example.test         CNAME example.test
//! broken.example.test      FAULT servfail            # or timeout, nxdomain
//! ```
//! A TXT string longer than 255 bytes is split into 255-byte strings, as DNS requires.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, PTR, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

/// A fault injected for a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer SERVFAIL.
    ServFail,
    /// Do not answer at all (the client times out).
    Timeout,
    /// Answer NXDOMAIN even if records exist.
    NxDomain,
}

/// Records by lower-case name without the trailing dot.
#[derive(Debug, Clone, Default)]
pub struct Zone {
    records: HashMap<String, Vec<RData>>,
    faults: HashMap<String, Fault>,
    /// TTL of every answer and of "no such record" (the SOA's); `None`: 60 seconds.
    ttl: Option<u32>,
}

/// The TTL answers carry unless a test sets another.
const DEFAULT_TTL: u32 = 60;

fn key(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

fn fqdn(name: &str) -> anyhow::Result<Name> {
    let mut text = name.trim().to_owned();
    if !text.ends_with('.') {
        text.push('.');
    }
    Ok(Name::from_str(&text)?)
}

/// Splits a TXT value into its strings: quoted strings as given, an unquoted value as one.
fn txt_strings(value: &str) -> anyhow::Result<Vec<String>> {
    let value = value.trim();
    if !value.starts_with('"') {
        return Ok(vec![value.to_owned()]);
    }
    let mut strings = Vec::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some('\\') => s.push(chars.next().unwrap_or('\\')),
                        Some('"') => break,
                        Some(c) => s.push(c),
                        None => anyhow::bail!("unterminated string in {value:?}"),
                    }
                }
                strings.push(s);
            }
            c if c.is_whitespace() => {}
            _ => anyhow::bail!("text outside quotes in {value:?}"),
        }
    }
    Ok(strings)
}

fn split_255(strings: Vec<String>) -> Vec<Vec<u8>> {
    strings
        .into_iter()
        .flat_map(|s| {
            let bytes = s.into_bytes();
            if bytes.is_empty() {
                vec![Vec::new()]
            } else {
                bytes.chunks(255).map(<[u8]>::to_vec).collect()
            }
        })
        .collect()
}

impl Zone {
    /// An empty zone.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses zone text (format in the module docs).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut zone = Self::new();
        for (index, line) in text.lines().enumerate() {
            let line = strip_comment(line).trim();
            if line.is_empty() {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(name), Some(rtype)) = (fields.next(), fields.next()) else {
                anyhow::bail!("line {}: expected NAME TYPE VALUE", index + 1);
            };
            // The value is the rest of the line after the type, spacing inside it kept.
            let after_name = line[name.len()..].trim_start();
            let value = after_name[rtype.len()..].trim();
            zone.add(name, rtype, value)
                .map_err(|e| anyhow::anyhow!("line {}: {e}", index + 1))?;
        }
        Ok(zone)
    }

    /// Reads and parses a zone file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Adds one record (or a FAULT line).
    pub fn add(&mut self, name: &str, rtype: &str, value: &str) -> anyhow::Result<()> {
        let rdata = match rtype.to_ascii_uppercase().as_str() {
            "A" => RData::A(A(value.parse()?)),
            "AAAA" => RData::AAAA(AAAA(value.parse()?)),
            "TXT" => RData::TXT(TXT::from_bytes(
                split_255(txt_strings(value)?)
                    .iter()
                    .map(Vec::as_slice)
                    .collect(),
            )),
            "MX" => {
                let (preference, exchange) = value
                    .split_once(char::is_whitespace)
                    .ok_or_else(|| anyhow::anyhow!("MX needs PREFERENCE HOST"))?;
                RData::MX(MX::new(preference.trim().parse()?, fqdn(exchange)?))
            }
            "PTR" => RData::PTR(PTR(fqdn(value)?)),
            "CNAME" => RData::CNAME(CNAME(fqdn(value)?)),
            "FAULT" => {
                let fault = match value.to_ascii_lowercase().as_str() {
                    "servfail" => Fault::ServFail,
                    "timeout" => Fault::Timeout,
                    "nxdomain" => Fault::NxDomain,
                    other => anyhow::bail!("unknown fault {other:?}"),
                };
                self.faults.insert(key(name), fault);
                return Ok(());
            }
            other => anyhow::bail!("unsupported record type {other:?}"),
        };
        fqdn(name)?;
        self.records.entry(key(name)).or_default().push(rdata);
        Ok(())
    }

    /// Sets the TTL of every answer, positive and negative (tests of caching).
    pub fn set_ttl(&mut self, seconds: u32) {
        self.ttl = Some(seconds);
    }

    fn ttl(&self) -> u32 {
        self.ttl.unwrap_or(DEFAULT_TTL)
    }

    /// Removes every record of `name`.
    pub fn remove(&mut self, name: &str) {
        self.records.remove(&key(name));
    }

    /// The PTR name of an address (`25.2.0.192.in-addr.arpa`).
    pub fn reverse_name(ip: IpAddr) -> String {
        match ip {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
            }
            IpAddr::V6(v6) => {
                let mut out = String::new();
                for byte in v6.octets().iter().rev() {
                    out.push_str(&format!("{:x}.{:x}.", byte & 0xf, byte >> 4));
                }
                out.push_str("ip6.arpa");
                out
            }
        }
    }

    fn answer(
        &self,
        query_name: &Name,
        qtype: RecordType,
    ) -> Result<Vec<Record>, (ResponseCode, Option<Fault>)> {
        let mut name = query_name.clone();
        let mut answers = Vec::new();
        // Follow CNAMEs inside the zone, at most 8 deep.
        for _ in 0..8 {
            let k = key(&name.to_ascii());
            if let Some(fault) = self.faults.get(&k) {
                return Err((ResponseCode::ServFail, Some(*fault)));
            }
            let Some(rdatas) = self.records.get(&k) else {
                // A name with no records of its own but names below it (`_domainkey.example.test`
                // when `sel._domainkey.example.test` exists) is an empty non-terminal: it exists,
                // so the answer is NODATA, not NXDOMAIN (RFC 8020).
                let below = format!(".{k}");
                return if !answers.is_empty() || self.records.keys().any(|n| n.ends_with(&below)) {
                    Ok(answers)
                } else {
                    Err((ResponseCode::NXDomain, None))
                };
            };
            let cname = rdatas.iter().find_map(|r| match r {
                RData::CNAME(target) if qtype != RecordType::CNAME => Some(target.0.clone()),
                _ => None,
            });
            if let Some(target) = cname {
                answers.push(Record::from_rdata(
                    name.clone(),
                    self.ttl(),
                    RData::CNAME(CNAME(target.clone())),
                ));
                name = target;
                continue;
            }
            answers.extend(
                rdatas
                    .iter()
                    .filter(|r| r.record_type() == qtype)
                    .map(|r| Record::from_rdata(name.clone(), self.ttl(), r.clone())),
            );
            return Ok(answers);
        }
        Err((ResponseCode::ServFail, None))
    }
}

fn strip_comment(line: &str) -> &str {
    // '#' inside a quoted string is data.
    let mut in_quotes = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => in_quotes = !in_quotes,
            '#' if !in_quotes => return &line[..i],
            _ => {}
        }
    }
    line
}

struct Shared {
    zone: Mutex<Zone>,
    queries: AtomicUsize,
}

/// A running test DNS server; stops when dropped.
pub struct TestDns {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for TestDns {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The SOA a negative answer carries in its authority section (RFC 2308), as real servers send
/// it: without one, resolvers do not cache "no such record" and ask again every time. The
/// owner is the query's last two labels (the test zones have no apex of their own).
fn negative_soa(query: &Name, ttl: u32) -> Record {
    let apex = query.trim_to(2.min(query.num_labels() as usize));
    let host = |label: &str| {
        Name::from_ascii(label)
            .and_then(|n| n.append_domain(&apex))
            .unwrap_or_else(|_| apex.clone())
    };
    Record::from_rdata(
        apex.clone(),
        ttl,
        RData::SOA(SOA::new(
            host("ns"),
            host("hostmaster"),
            1,
            3600,
            600,
            86_400,
            ttl,
        )),
    )
}

/// The response bytes for one query, or `None` to stay silent.
fn respond(shared: &Shared, request: &[u8], max_len: usize) -> Option<Vec<u8>> {
    let request = Message::from_vec(request).ok()?;
    shared.queries.fetch_add(1, Ordering::SeqCst);
    let mut response = Message::new(
        request.metadata.id,
        MessageType::Response,
        request.metadata.op_code,
    );
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.authoritative = true;
    let Some(query) = request.queries.first().cloned() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return response.to_vec().ok();
    };
    response.add_query(query.clone());
    let (result, ttl) = {
        let zone = shared.zone.lock().ok()?;
        (zone.answer(query.name(), query.query_type()), zone.ttl())
    };
    match result {
        Ok(answers) if answers.is_empty() => {
            response.add_authority(negative_soa(query.name(), ttl));
        }
        Ok(answers) => {
            response.add_answers(answers);
        }
        Err((_, Some(Fault::Timeout))) => return None,
        Err((_, Some(Fault::NxDomain))) => response.metadata.response_code = ResponseCode::NXDomain,
        Err((ResponseCode::NXDomain, None)) => {
            response.metadata.response_code = ResponseCode::NXDomain;
            response.add_authority(negative_soa(query.name(), ttl));
        }
        Err((code, _)) => response.metadata.response_code = code,
    }
    let bytes = response.to_vec().ok()?;
    if bytes.len() > max_len {
        let mut truncated = Message::new(
            request.metadata.id,
            MessageType::Response,
            request.metadata.op_code,
        );
        truncated.metadata.truncation = true;
        truncated.metadata.recursion_desired = request.metadata.recursion_desired;
        truncated.add_query(query);
        return truncated.to_vec().ok();
    }
    Some(bytes)
}

impl TestDns {
    /// Starts serving `zone` on 127.0.0.1 at a free port (UDP and TCP).
    pub async fn start(zone: Zone) -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0".parse()?, zone).await
    }

    /// Starts serving on a given address (port 0: any free one).
    pub async fn start_on(addr: SocketAddr, zone: Zone) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            zone: Mutex::new(zone),
            queries: AtomicUsize::new(0),
        });
        // The same port for UDP and TCP: retry a few times in case TCP's is taken.
        let mut bound = None;
        for _ in 0..20 {
            let udp = UdpSocket::bind(addr).await?;
            let local = udp.local_addr()?;
            match TcpListener::bind(local).await {
                Ok(tcp) => {
                    bound = Some((udp, tcp, local));
                    break;
                }
                Err(err) if addr.port() != 0 => return Err(err.into()),
                Err(_) => continue,
            }
        }
        let (udp, tcp, local) =
            bound.ok_or_else(|| anyhow::anyhow!("no free port for UDP and TCP"))?;
        let udp = Arc::new(udp);
        let udp_task = tokio::spawn({
            let shared = shared.clone();
            async move {
                let mut buf = vec![0u8; 4096];
                while let Ok((len, peer)) = udp.recv_from(&mut buf).await {
                    // EDNS clients (hickory) accept 1232 bytes; larger answers are truncated so the
                    // client retries over TCP, as with a real server.
                    if let Some(reply) = respond(&shared, &buf[..len], 1232) {
                        let _ = udp.send_to(&reply, peer).await;
                    }
                }
            }
        });
        let tcp_task = tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Ok((mut stream, _)) = tcp.accept().await {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        loop {
                            let mut len = [0u8; 2];
                            if stream.read_exact(&mut len).await.is_err() {
                                return;
                            }
                            let mut request = vec![0u8; usize::from(u16::from_be_bytes(len))];
                            if stream.read_exact(&mut request).await.is_err() {
                                return;
                            }
                            let Some(reply) = respond(&shared, &request, 65_535) else {
                                continue;
                            };
                            let Ok(reply_len) = u16::try_from(reply.len()) else {
                                return;
                            };
                            let mut framed = reply_len.to_be_bytes().to_vec();
                            framed.extend_from_slice(&reply);
                            if stream.write_all(&framed).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Ok(Self {
            addr: local,
            shared,
            tasks: vec![udp_task, tcp_task],
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds a record while running.
    pub fn add(&self, name: &str, rtype: &str, value: &str) -> anyhow::Result<()> {
        self.shared
            .zone
            .lock()
            .map_err(|_| anyhow::anyhow!("zone lock poisoned"))?
            .add(name, rtype, value)
    }

    /// Sets the TTL of every answer from now on.
    pub fn set_ttl(&self, seconds: u32) {
        if let Ok(mut zone) = self.shared.zone.lock() {
            zone.set_ttl(seconds);
        }
    }

    /// Removes every record of a name while running.
    pub fn remove(&self, name: &str) {
        if let Ok(mut zone) = self.shared.zone.lock() {
            zone.remove(name);
        }
    }

    /// Injects (or with `None` clears) a fault for a name.
    pub fn set_fault(&self, name: &str, fault: Option<Fault>) {
        if let Ok(mut zone) = self.shared.zone.lock() {
            match fault {
                Some(fault) => zone.faults.insert(key(name), fault),
                None => zone.faults.remove(&key(name)),
            };
        }
    }

    /// Queries answered (or deliberately ignored) so far.
    pub fn queries(&self) -> usize {
        self.shared.queries.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::TokioResolver;
    use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;

    fn resolver(addr: SocketAddr) -> TokioResolver {
        let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
        for c in &mut ns.connections {
            c.port = addr.port();
        }
        let mut opts = ResolverOpts::default();
        opts.timeout = std::time::Duration::from_millis(500);
        opts.attempts = 1;
        opts.cache_size = 0;
        opts.use_hosts_file = ResolveHosts::Never;
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(vec![ns]),
            TokioRuntimeProvider::default(),
        )
        .with_options(opts)
        .build()
        .unwrap()
    }

    const ZONE: &str = r#"
# test zone
example.test.  TXT "v=spf1 ip4:192.0.2.0/24 -all"
multi.example.test TXT "v=DKIM1; k=rsa; " "p=ABC"   # two strings
hash.example.test TXT "a#b"
mail.example.test A 192.0.2.25
mail.example.test AAAA 2001:db8::25
example.test MX 10 mail.example.test
25.2.0.192.in-addr.arpa PTR mail.example.test
www.example.test CNAME mail.example.test
broken.example.test FAULT servfail
"#;

    #[tokio::test]
    async fn serves_every_record_type_over_udp_and_tcp() {
        let mut zone = Zone::parse(ZONE).unwrap();
        zone.add(
            "long.example.test",
            "TXT",
            &format!("\"{}\"", "x".repeat(600)),
        )
        .unwrap();
        // An answer over 1232 bytes: truncated over UDP, so the resolver retries over TCP.
        for i in 0..10 {
            zone.add(
                "big.example.test",
                "TXT",
                &format!("\"{i}{}\"", "y".repeat(200)),
            )
            .unwrap();
        }
        let dns = TestDns::start(zone).await.unwrap();
        let r = resolver(dns.addr());
        let before = dns.queries();
        let big = r.txt_lookup("big.example.test.").await.unwrap();
        assert_eq!(big.answers().len(), 10);
        assert_eq!(
            dns.queries() - before,
            2,
            "one UDP query, truncated; one TCP query"
        );
        let txt = r.txt_lookup("example.test.").await.unwrap();
        assert_eq!(
            txt.answers()[0].data.to_string(),
            "v=spf1 ip4:192.0.2.0/24 -all"
        );
        let multi = r.txt_lookup("multi.example.test.").await.unwrap();
        let RData::TXT(t) = &multi.answers()[0].data else {
            panic!()
        };
        assert_eq!(t.txt_data.len(), 2);
        let long = r.txt_lookup("long.example.test.").await.unwrap();
        let RData::TXT(t) = &long.answers()[0].data else {
            panic!()
        };
        assert_eq!(
            t.txt_data.iter().map(|s| s.len()).collect::<Vec<_>>(),
            vec![255, 255, 90]
        );
        let hash = r.txt_lookup("hash.example.test.").await.unwrap();
        assert_eq!(hash.answers()[0].data.to_string(), "a#b");
        let a = r.ipv4_lookup("mail.example.test.").await.unwrap();
        assert_eq!(a.answers()[0].data.to_string(), "192.0.2.25");
        let aaaa = r.ipv6_lookup("mail.example.test.").await.unwrap();
        assert_eq!(aaaa.answers()[0].data.to_string(), "2001:db8::25");
        let mx = r.mx_lookup("example.test.").await.unwrap();
        assert!(
            mx.answers()[0]
                .data
                .to_string()
                .contains("mail.example.test")
        );
        let ptr = r
            .reverse_lookup("192.0.2.25".parse::<IpAddr>().unwrap())
            .await
            .unwrap();
        assert!(
            ptr.answers()[0]
                .data
                .to_string()
                .starts_with("mail.example.test")
        );
        let via_cname = r.ipv4_lookup("www.example.test.").await.unwrap();
        assert!(
            via_cname
                .answers()
                .iter()
                .any(|rec| rec.data.to_string() == "192.0.2.25")
        );
        assert!(dns.queries() >= 9);
    }

    #[tokio::test]
    async fn nxdomain_nodata_and_injected_faults() {
        let dns = TestDns::start(Zone::parse(ZONE).unwrap()).await.unwrap();
        let r = resolver(dns.addr());
        let err = r.txt_lookup("missing.example.test.").await.unwrap_err();
        assert!(err.is_nx_domain(), "{err}");
        let nodata = r.txt_lookup("mail.example.test.").await.unwrap_err();
        assert!(
            !nodata.is_nx_domain() && nodata.is_no_records_found(),
            "{nodata}"
        );
        let servfail = r.txt_lookup("broken.example.test.").await.unwrap_err();
        assert!(
            !servfail.is_nx_domain() && !servfail.is_no_records_found(),
            "{servfail}"
        );
        dns.set_fault("example.test", Some(Fault::Timeout));
        let started = std::time::Instant::now();
        assert!(r.txt_lookup("example.test.").await.is_err());
        assert!(started.elapsed() >= std::time::Duration::from_millis(400));
        dns.set_fault("example.test", Some(Fault::NxDomain));
        assert!(
            r.txt_lookup("example.test.")
                .await
                .unwrap_err()
                .is_nx_domain()
        );
        dns.set_fault("example.test", None);
        assert!(r.txt_lookup("example.test.").await.is_ok());
        dns.add("new.example.test", "A", "192.0.2.99").unwrap();
        assert_eq!(
            r.ipv4_lookup("new.example.test.").await.unwrap().answers()[0]
                .data
                .to_string(),
            "192.0.2.99"
        );
    }

    /// Negative answers carry an SOA, so a caching resolver asks once.
    #[tokio::test]
    async fn negative_answers_are_cached_by_resolvers() {
        let dns = TestDns::start(Zone::parse(ZONE).unwrap()).await.unwrap();
        let mut ns = NameServerConfig::udp_and_tcp(dns.addr().ip());
        for c in &mut ns.connections {
            c.port = dns.addr().port();
        }
        let mut opts = ResolverOpts::default();
        opts.use_hosts_file = ResolveHosts::Never;
        let caching = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(vec![ns]),
            TokioRuntimeProvider::default(),
        )
        .with_options(opts)
        .build()
        .unwrap();
        for name in ["missing.example.test.", "mail.example.test."] {
            assert!(caching.txt_lookup(name).await.is_err());
            let asked = dns.queries();
            assert!(caching.txt_lookup(name).await.is_err());
            assert_eq!(dns.queries(), asked, "{name} asked again");
        }
    }

    fn fixture() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/dns/example.test.zone")
    }

    #[tokio::test]
    async fn the_fixture_zone_loads_and_serves() {
        let dns = TestDns::start(Zone::load(&fixture()).unwrap())
            .await
            .unwrap();
        let r = resolver(dns.addr());
        // The DKIM key is one 400-byte string in the file: two strings on the wire (so the UDP
        // answer is still small enough; no TCP retry needed), joined back to the same text.
        let key = r.txt_lookup("sel._domainkey.example.test.").await.unwrap();
        let RData::TXT(t) = &key.answers()[0].data else {
            panic!()
        };
        assert_eq!(t.txt_data.len(), 2);
        assert_eq!(t.txt_data[0].len(), 255);
        let joined: Vec<u8> = t.txt_data.iter().flat_map(|s| s.iter().copied()).collect();
        assert!(
            joined.starts_with(b"v=DKIM1; k=rsa; p=MIIBIjAN"),
            "{joined:?}"
        );
        // Empty non-terminal: NODATA, not NXDOMAIN.
        let ent = r.txt_lookup("_domainkey.example.test.").await.unwrap_err();
        assert!(!ent.is_nx_domain() && ent.is_no_records_found(), "{ent}");
        // Two SPF records at one name: both answered.
        let two = r.txt_lookup("twospf.test.").await.unwrap();
        assert_eq!(two.answers().len(), 2);
        // IPv6 reverse name as written in the file.
        let ptr = r
            .reverse_lookup("2001:db8::25".parse::<IpAddr>().unwrap())
            .await
            .unwrap();
        assert!(
            ptr.answers()[0]
                .data
                .to_string()
                .starts_with("mail.example.test")
        );
        assert_eq!(
            Zone::reverse_name("2001:db8::25".parse().unwrap()),
            "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
        );
        // Faults from the file: NXDOMAIN over existing data, SERVFAIL.
        assert!(
            r.ipv4_lookup("gone.example.test.")
                .await
                .unwrap_err()
                .is_nx_domain()
        );
        let servfail = r.txt_lookup("servfail.test.").await.unwrap_err();
        assert!(
            !servfail.is_nx_domain() && !servfail.is_no_records_found(),
            "{servfail}"
        );
    }

    #[test]
    fn zone_errors_name_the_line() {
        let err = Zone::parse("a.test A 1.2.3.4\nb.test BOGUS x\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(Zone::parse("a.test A notanip").is_err());
        assert_eq!(
            Zone::reverse_name("192.0.2.25".parse().unwrap()),
            "25.2.0.192.in-addr.arpa"
        );
    }
}
