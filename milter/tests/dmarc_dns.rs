//! `dmarc::evaluate` as the milter calls it (no injected cache): real DNS over UDP from a small
//! responder on a loopback port, including the raw `pct=` lookup mail-auth does not do.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mail_auth::hickory_resolver::config::{
    NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use mail_auth::hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
use mail_auth::hickory_resolver::proto::rr::rdata::TXT;
use mail_auth::hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use mail_auth::{AuthenticatedMessage, MessageAuthenticator};
use postern_milter::dmarc::{DmarcAction, DmarcConfig, DmarcInput, evaluate};
use tokio::net::UdpSocket;

/// Serves TXT records (lower-case names without the trailing dot); NXDOMAIN for anything else.
async fn dns_server(txt: HashMap<String, String>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let txt = Arc::new(txt);
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((len, peer)) = socket.recv_from(&mut buf).await {
            let Ok(request) = Message::from_vec(&buf[..len]) else {
                continue;
            };
            let mut response = Message::new(
                request.metadata.id,
                MessageType::Response,
                request.metadata.op_code,
            );
            response.metadata.recursion_desired = request.metadata.recursion_desired;
            response.metadata.recursion_available = true;
            let Some(query) = request.queries.first().cloned() else {
                continue;
            };
            response.add_query(query.clone());
            let name = query
                .name()
                .to_ascii()
                .trim_end_matches('.')
                .to_ascii_lowercase();
            match txt.get(&name) {
                Some(text) if query.query_type() == RecordType::TXT => {
                    response.add_answer(Record::from_rdata(
                        Name::from_ascii(format!("{name}.")).unwrap(),
                        60,
                        RData::TXT(TXT::new(vec![text.clone()])),
                    ));
                }
                Some(_) => {}
                None => response.metadata.response_code = ResponseCode::NXDomain,
            }
            if let Ok(bytes) = response.to_vec() {
                let _ = socket.send_to(&bytes, peer).await;
            }
        }
    });
    (addr, task)
}

fn authenticator(server: SocketAddr) -> MessageAuthenticator {
    let mut ns = NameServerConfig::udp_and_tcp(server.ip());
    for conn in &mut ns.connections {
        conn.port = server.port();
    }
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 1;
    opts.use_hosts_file = ResolveHosts::Never;
    MessageAuthenticator::new(ResolverConfig::from_name_servers(vec![ns]), opts).unwrap()
}

const MESSAGE: &str = "Received: from mail.sender.test (mail.sender.test [192.0.2.25])\r\n\tby mx.test (Postfix) with ESMTP id 4AbCdE\r\nFrom: Alice <alice@example.com>\r\nTo: bob@receiver.test\r\nSubject: hi\r\nDate: Wed, 25 Nov 2026 08:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n\r\nHi.\r\n";

async fn run(
    auth: &MessageAuthenticator,
    config: &DmarcConfig,
    client: IpAddr,
    random: u8,
) -> postern_milter::dmarc::DmarcDecision {
    let am = AuthenticatedMessage::parse(MESSAGE.as_bytes()).unwrap();
    let to = vec!["bob@receiver.test".to_owned()];
    let input = DmarcInput {
        client_ip: client,
        helo: "mail.sender.test",
        envelope_from: "alice@example.com",
        envelope_to: &to,
        authenticated: false,
        message: &am,
        dkim: &[],
        authserv_id: "mx.test",
        queue_id: "4AbCdE",
        now: 1_790_000_000,
    };
    let mut sample = move || random;
    tokio::time::timeout(
        Duration::from_secs(20),
        evaluate(config, &input, auth, &mut sample),
    )
    .await
    .expect("evaluation finishes")
}

#[tokio::test]
async fn evaluate_over_real_dns_with_pct() {
    let txt = HashMap::from([
        (
            "_dmarc.example.com".to_owned(),
            "v=DMARC1; p=reject; pct=30; ri=3600; rua=mailto:dmarc@example.com".to_owned(),
        ),
        (
            "example.com".to_owned(),
            "v=spf1 ip4:192.0.2.0/24 -all".to_owned(),
        ),
    ]);
    let (addr, server) = dns_server(txt).await;
    let auth = authenticator(addr);
    let config = DmarcConfig {
        reject_failures: true,
        ..DmarcConfig::default()
    };

    let pass = run(&auth, &config, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 25)), 0).await;
    assert_eq!(
        pass.header.as_deref(),
        Some("mx.test; dmarc=pass (p=reject dis=none) header.from=example.com")
    );
    let record = pass.record.unwrap();
    assert_eq!(record.published.pct, 30, "pct read from the raw record");
    assert_eq!(record.published.ri, 3600);
    assert_eq!(record.published.rua, vec!["dmarc@example.com".to_owned()]);

    let outside = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
    let rejected = run(&auth, &config, outside, 29).await;
    assert_eq!(
        rejected.action,
        DmarcAction::Reject {
            code: "550",
            enhanced: "5.7.1",
            text: "rejected by DMARC policy for example.com".into()
        }
    );
    let sampled_out = run(&auth, &config, outside, 30).await;
    assert_eq!(sampled_out.action, DmarcAction::Accept);
    assert_eq!(
        sampled_out.header.as_deref(),
        Some("mx.test; dmarc=fail (p=reject dis=none) header.from=example.com")
    );
    assert_eq!(sampled_out.record.unwrap().reasons[0].0, "sampled_out");
    server.abort();
}
