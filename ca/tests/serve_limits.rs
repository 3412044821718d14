//! What a hostile client can do to `ca serve` with connections alone: the real `ca` binary on
//! 127.0.0.1, real TLS 1.3, clients on other loopback addresses as other sources. Without
//! limits, one client that opened a few hundred TLS connections and sent nothing took every
//! file descriptor, and no sidecar could enroll, renew or fetch the bundle until it let go; a
//! client certificate chain of many self-issued CAs cost webpki's path search ~100 ms of CPU per
//! handshake.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Sandbox;
use common::https::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

const A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const C: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
const D: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4));

/// A new CA (`limits.test`) and `ca serve` on it with `extra` options.
fn ca_serving(extra: &[&str]) -> (Sandbox, Server) {
    let sb = Sandbox::new();
    sb.ok(&["init", "--dir", "ca", "--trust-domain", "limits.test"]);
    let srv = serve(&sb, extra);
    (sb, srv)
}

/// A client configuration trusting the CA's bundle, HTTP/1.1, with `cert` (chain PEM, key) as
/// its client certificate if given.
fn client(sb: &Sandbox, cert: Option<(&str, &KeyPair)>) -> Arc<ClientConfig> {
    let mut config = client_config(sb, cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A TLS connection to `addr` from `source`, handshake done, nothing sent; the error names what
/// failed.
async fn connect_from(
    config: &Arc<ClientConfig>,
    addr: SocketAddr,
    source: IpAddr,
) -> Result<TlsStream<TcpStream>, String> {
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| format!("bind {source}: {e}"))?;
    let tcp = socket
        .connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tokio_rustls::TlsConnector::from(Arc::clone(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))
}

/// `GET /v1/bundle` on `tls`: the status line.
async fn bundle_status(mut tls: TlsStream<TcpStream>) -> String {
    tls.write_all(b"GET /v1/bundle HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .expect("write request");
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response).await;
    String::from_utf8_lossy(&response)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// Whether the server has closed `tls` (EOF or reset), waiting at most `within`.
async fn closed_within(tls: &mut TlsStream<TcpStream>, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, tls.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// One source that opens connections and sends nothing gets `--max-connections-per-source` of
/// them, each closed after the header-read timeout (10 s); its next ones are closed before the
/// handshake, and other sources are served all along. Over `--max-connections` in all, a new
/// connection waits in the accept queue until one closes, and is then served.
#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_cannot_lock_sidecars_out() {
    let (sb, srv) = ca_serving(&[
        "--max-connections",
        "12",
        "--max-connections-per-source",
        "4",
    ]);
    let plain = client(&sb, None);
    let mut held = Vec::new();
    for i in 0..4 {
        let tls = connect_from(&plain, srv.addr, A).await;
        held.push(
            tls.unwrap_or_else(|e| panic!("connection {i} of source A, within its cap: {e}")),
        );
    }
    let refused = connect_from(&plain, srv.addr, A).await;
    assert!(
        refused.is_err(),
        "a fifth idle connection of source A must be closed before the handshake"
    );
    let status = bundle_status(connect_from(&plain, srv.addr, B).await.expect("source B")).await;
    assert_eq!(
        status, "HTTP/1.1 200 OK",
        "another source is served while A holds its cap"
    );

    // B and C take the other 8 slots; D's connection then waits for one of them.
    let mut others = Vec::new();
    for source in [B, C] {
        for _ in 0..4 {
            others.push(
                connect_from(&plain, srv.addr, source)
                    .await
                    .expect("a free slot"),
            );
        }
    }
    let waiting = tokio::spawn({
        let (plain, addr) = (Arc::clone(&plain), srv.addr);
        async move { connect_from(&plain, addr, D).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "with 12 of 12 connections held, D's handshake must wait"
    );
    drop(others.pop());
    let d = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("D is served once a slot frees")
        .expect("task")
        .expect("D's handshake");
    assert_eq!(bundle_status(d).await, "HTTP/1.1 200 OK");

    // The silent connections are closed by the server after the header-read timeout.
    let started = Instant::now();
    for (i, tls) in held.iter_mut().enumerate() {
        assert!(
            closed_within(tls, Duration::from_secs(20)).await,
            "A's idle connection {i} still open after {:?}",
            started.elapsed()
        );
    }
    let status = bundle_status(connect_from(&plain, srv.addr, A).await.expect("A again")).await;
    assert_eq!(status, "HTTP/1.1 200 OK", "A's slots are free again");
}

/// A leaf of the CA's trust domain signed by one of `n` untrusted self-issued CAs that share
/// one subject, followed by all `n`: webpki's path search over them is exponential.
fn bomb_chain(n: usize) -> (String, KeyPair) {
    let mut subject = rcgen::DistinguishedName::new();
    subject.push(rcgen::DnType::CommonName, "bomb CA");
    let mut cas = Vec::with_capacity(n);
    for _ in 0..n {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = subject.clone();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("CA");
        cas.push((params, key, cert));
    }
    let leaf_key = KeyPair::generate().expect("key");
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::URI(
        "spiffe://limits.test/attacker".try_into().expect("uri"),
    )];
    let (params, key, _) = &cas[0];
    let leaf = leaf
        .signed_by(&leaf_key, &rcgen::Issuer::new(params.clone(), key))
        .expect("leaf");
    let mut pem = leaf.pem();
    for (_, _, cert) in &cas {
        pem.push_str(&cert.pem());
    }
    (pem, leaf_key)
}

/// CPU time (user + system) of process `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after_name = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 10)
}

/// A client certificate chain over the bounds (here 12 self-issued CAs of one subject) is
/// refused before webpki builds a path: ten such handshakes, each from its own source, cost the
/// server well under the ~1 s of CPU the path search took. The refused source then waits a
/// second before its next handshake; other sources do not.
#[tokio::test(flavor = "multi_thread")]
async fn a_path_building_bomb_is_refused_before_any_path_is_built() {
    let (sb, srv) = ca_serving(&[]);
    let (chain, key) = bomb_chain(12);
    let bomb = client(&sb, Some((&chain, &key)));
    let source = |i: u8| IpAddr::V4(Ipv4Addr::new(127, 0, 1, i));
    let before = cpu_time(srv.child.id());
    for i in 1..=10 {
        // TLS 1.3: the server verifies the client's chain after the client's handshake ends,
        // so the refusal (an alert) may come with the answer to the request.
        let refused = match connect_from(&bomb, srv.addr, source(i)).await {
            Err(e) => e,
            Ok(tls) => bundle_status(tls).await,
        };
        assert!(
            !refused.starts_with("HTTP/1.1 200"),
            "the bomb chain must be refused, got {refused:?}"
        );
    }
    let spent = cpu_time(srv.child.id()).saturating_sub(before);
    assert!(
        spent < Duration::from_millis(400),
        "ten bomb handshakes cost the server {spent:?} of CPU"
    );

    let plain = client(&sb, None);
    let started = Instant::now();
    let status = bundle_status(
        connect_from(&plain, srv.addr, source(1))
            .await
            .expect("after the penalty"),
    )
    .await;
    let waited = started.elapsed();
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        waited >= Duration::from_millis(900),
        "a source that sent a bomb waits a second before its next handshake, waited {waited:?}"
    );
    let status = bundle_status(
        connect_from(&plain, srv.addr, source(99))
            .await
            .expect("another source"),
    )
    .await;
    assert_eq!(status, "HTTP/1.1 200 OK");
}

/// A request whose body does not arrive is answered 408 after 10 s, so a client that trickles
/// bodies cannot hold buffers and connections for as long as it likes.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_does_not_arrive_is_answered_408() {
    let (sb, srv) = ca_serving(&[]);
    let mut tls = connect_from(&client(&sb, None), srv.addr, A)
        .await
        .expect("connect");
    let started = Instant::now();
    tls.write_all(
        b"POST /v1/enroll HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"csr\":",
    )
    .await
    .expect("write the head and the start of the body");
    let mut response = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(20), tls.read(&mut response))
        .await
        .expect("an answer within 20 s")
        .expect("read");
    let waited = started.elapsed();
    let head = String::from_utf8_lossy(&response[..n]).into_owned();
    assert!(
        head.starts_with("HTTP/1.1 408") && head.contains("body_timeout"),
        "got {head:?}"
    );
    assert!(
        waited >= Duration::from_secs(9),
        "answered after {waited:?}, before the 10 s body timeout"
    );
}

/// `GET /metrics` on `addr` (plain HTTP): the body.
async fn scrape(addr: SocketAddr) -> String {
    let mut tcp = TcpStream::connect(addr)
        .await
        .expect("connect to --metrics-listen");
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.expect("read");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the sample `name{labels}` (labels as Prometheus writes them, sorted by name).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// `--metrics-listen`: requests by endpoint and code, connections refused by cap, open
/// connections, and the serving certificate's expiry (the thing to alert on when the store is
/// down and the server cannot renew it).
#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_requests_refusals_connections_and_the_serving_certificate() {
    let (sb, srv) = ca_serving(&[
        "--metrics-listen",
        "127.0.0.1:0",
        "--max-connections-per-source",
        "2",
    ]);
    let metrics = srv.metrics.expect("metrics on ADDR");
    let plain = client(&sb, None);
    let status = bundle_status(connect_from(&plain, srv.addr, B).await.expect("B")).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let _held = [
        connect_from(&plain, srv.addr, A).await.expect("A 1"),
        connect_from(&plain, srv.addr, A).await.expect("A 2"),
    ];
    assert!(
        connect_from(&plain, srv.addr, A).await.is_err(),
        "A's third is refused"
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = scrape(metrics).await;
        if sample(&text, "gatehouse_ca_active_connections") == Some(2.0)
            || Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        sample(
            &text,
            r#"gatehouse_ca_requests_total{code="200",endpoint="bundle"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"gatehouse_ca_connections_refused_total{reason="source_connections"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "gatehouse_ca_active_connections"),
        Some(2.0),
        "{text}"
    );
    let expiry =
        sample(&text, "gatehouse_ca_serving_cert_expiry_timestamp_seconds").expect("expiry");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        expiry > now + 1800.0 && expiry <= now + 3700.0,
        "the serving certificate (--svid-ttl 1h) expires at {expiry}, now {now}"
    );
}
