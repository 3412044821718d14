//! In-process tests of the outbound path: a real plaintext listener, the real mTLS pool, and
//! real rustls servers holding certificates minted by `gatehouse-ca`. (The end-to-end tests
//! over the `sidecar` binary live in `tests/tests/outbound.rs`.)

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use gatehouse_ca::revoke::RevokeTarget;
use gatehouse_ca::{Authority, InitOptions, IssueRequest, KeyType};
use gatehouse_policy::{SpiffeId, TrustDomain};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::{Outbound, OutboundTls, prepare};
use crate::config::{MinTls, OutboundConfig, OutboundLimits, Target, UpstreamProtocol};
use crate::signal::Shutdown;
use crate::tls::resolver::CertResolver;
use crate::tls::{CredentialPaths, Credentials, provider};

const TD: &str = "fintech.internal";
const MONOLITH: &str = "spiffe://fintech.internal/monolith";

struct Ca {
    dir: tempfile::TempDir,
    ca: Authority,
}

impl Ca {
    fn new(td: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Authority::init(
            &dir.path().join("ca"),
            &InitOptions {
                trust_domain: TrustDomain::parse(td).expect("td"),
                key_type: KeyType::EcdsaP256,
                ttl: Duration::from_secs(86400 * 30),
                intermediate: false,
            },
        )
        .expect("ca init");
        Self { dir, ca }
    }

    /// Issues `spiffe://TD/<name>` into `<tmp>/<name>/`.
    fn issue(&self, name: &str) -> std::path::PathBuf {
        let id = format!("spiffe://{}/{name}", self.ca.trust_domain());
        let svid = self
            .ca
            .issue(&IssueRequest {
                spiffe_id: SpiffeId::parse(&id).expect("id"),
                dns: vec![],
                ttl: Duration::from_secs(3600),
            })
            .expect("issue");
        let out = self.dir.path().join(name);
        svid.write_to(&out).expect("write");
        out
    }
}

/// The credentials in `dir`, with `dir/crl.pem` as the CRL when a test wrote one.
fn credentials(dir: &Path) -> Credentials {
    let (cert, key, bundle, crl) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("bundle.pem"),
        dir.join("crl.pem"),
    );
    let paths = CredentialPaths {
        cert: &cert,
        key: &key,
        bundle: &bundle,
        crl: crl.is_file().then_some(crl.as_path()),
        crl_policy: crate::config::CrlPolicy::default(),
    };
    Credentials::load(paths, &provider()).expect("credentials")
}

/// What the test server does after a successful handshake.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Serve HTTP (h2 or HTTP/1.1 as negotiated); responds `served by <id> path <path>`.
    Http,
    /// Serve HTTP but take this long to answer (paths under `/long/` four times as long).
    Slow(Duration),
    /// Read and count bytes, never answer.
    Record,
    /// Serve HTTP, `/slow` taking a second; after answering `/fast`, close the connection
    /// gracefully (GOAWAY) while the slow requests finish.
    GoAwayAfterFast,
    /// HTTP/2 only: reset each connection's first stream with `REFUSED_STREAM` (unprocessed),
    /// answer the others `HTTP/2.0 <path>`.
    RefuseFirst,
}

struct TestServer {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    bytes_read: Arc<AtomicUsize>,
    /// The SNI of each completed handshake.
    sni: Arc<std::sync::Mutex<Vec<Option<String>>>>,
}

/// A rustls server with the certificate in `cert_dir`, requiring client certificates that
/// chain to `client_roots_dir/bundle.pem`, offering `alpn`.
async fn server(
    cert_dir: &Path,
    client_roots_dir: &Path,
    alpn: &[&[u8]],
    mode: Mode,
) -> TestServer {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert_dir.join("cert.pem"))
            .expect("cert")
            .collect::<Result<_, _>>()
            .expect("cert");
    let key = PrivateKeyDer::from_pem_file(cert_dir.join("key.pem")).expect("key");
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(client_roots_dir.join("bundle.pem")).expect("bundle") {
        roots.add(c.expect("bundle")).expect("anchor");
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .expect("verifier");
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server cert");
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handshakes = Arc::new(AtomicUsize::new(0));
    let bytes_read = Arc::new(AtomicUsize::new(0));
    let sni = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (hs, br, names) = (
        Arc::clone(&handshakes),
        Arc::clone(&bytes_read),
        Arc::clone(&sni),
    );
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, hs, br) = (acceptor.clone(), Arc::clone(&hs), Arc::clone(&br));
            let names = Arc::clone(&names);
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let name = tls.get_ref().1.server_name().map(str::to_owned);
                names.lock().expect("sni").push(name);
                hs.fetch_add(1, Ordering::SeqCst);
                match mode {
                    Mode::Record => {
                        let mut buf = [0u8; 4096];
                        while let Ok(n) = tls.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            br.fetch_add(n, Ordering::SeqCst);
                        }
                    }
                    Mode::Http | Mode::Slow(_) | Mode::GoAwayAfterFast => {
                        serve_http(tls, mode).await;
                    }
                    Mode::RefuseFirst => serve_refusing_first(tls).await,
                }
            });
        }
    });
    TestServer {
        addr,
        handshakes,
        bytes_read,
        sni,
    }
}

async fn serve_refusing_first(tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>) {
    let Ok(mut conn) = h2::server::handshake(tls).await else {
        return;
    };
    let mut first = true;
    while let Some(Ok((req, mut respond))) = conn.accept().await {
        if std::mem::take(&mut first) {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            continue;
        }
        let body = format!("{:?} {}", req.version(), req.uri().path());
        let mut send = respond
            .send_response(hyper::Response::new(()), false)
            .expect("response head");
        send.send_data(Bytes::from(body), true)
            .expect("response body");
    }
}

async fn serve_http(tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>, mode: Mode) {
    let goaway = Arc::new(tokio::sync::Notify::new());
    let fast_done = Arc::clone(&goaway);
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let fast_done = Arc::clone(&fast_done);
        async move { respond(req, mode, &fast_done).await }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = goaway.notified() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

async fn respond(
    req: Request<hyper::body::Incoming>,
    mode: Mode,
    fast_done: &tokio::sync::Notify,
) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
    {
        match mode {
            Mode::Slow(d) if req.uri().path().starts_with("/long/") => {
                tokio::time::sleep(d * 4).await;
            }
            Mode::Slow(d) => tokio::time::sleep(d).await,
            Mode::GoAwayAfterFast if req.uri().path() == "/slow" => {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Mode::GoAwayAfterFast if req.uri().path() == "/fast" => fast_done.notify_one(),
            _ => {}
        }
        let rid = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        let head = format!("{:?} {} rid={rid}", req.version(), req.uri().path());
        let body = if req.method() == http::Method::POST {
            // Count the streamed upload without keeping it.
            let mut body = req.into_body();
            let mut len = 0usize;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.expect("upload frame").into_data() {
                    len += data.len();
                }
            }
            format!("{head} len={len}")
        } else {
            head
        };
        Ok(hyper::Response::new(Full::new(Bytes::from(body))))
    }
}

struct Sidecar {
    addr: SocketAddr,
    registry: prometheus::Registry,
    _shutdown: Shutdown,
}

impl Sidecar {
    async fn start(
        own_dir: &Path,
        connect: SocketAddr,
        server_id: &str,
        tweak: impl FnOnce(&mut OutboundConfig),
    ) -> Self {
        let credentials = credentials(own_dir);
        let tls = OutboundTls {
            cert: Arc::new(CertResolver::new(Arc::clone(&credentials.certified))),
            credentials,
            min_tls: MinTls::Tls13,
            provider: provider(),
        };
        let mut entry = OutboundConfig {
            name: "monolith".into(),
            listen: "127.0.0.1:0".parse().expect("addr"),
            target: Target::new(&connect.ip().to_string(), connect.port()),
            server_id: SpiffeId::parse(server_id).expect("server id"),
            sni: Some("monolith.internal".into()),
            allow_non_loopback_listen: false,
            limits: OutboundLimits {
                connect_timeout: Duration::from_secs(10),
                response_timeout: Duration::from_secs(20),
                idle_timeout: Duration::from_secs(30),
                max_idle: 8,
                max_connections: 64,
                max_connection_age: Duration::from_secs(300),
                ..OutboundLimits::default()
            },
            protocol: UpstreamProtocol::Auto,
        };
        tweak(&mut entry);
        let prepared = prepare(&[entry], &tls).expect("prepare");
        let metrics = crate::metrics::Metrics::register().expect("metrics");
        let registry = metrics.registry().clone();
        let outbound = Outbound::bind(prepared, &metrics, provider())
            .await
            .expect("bind");
        let addr = outbound.local_addrs()[0];
        let shutdown = Shutdown::new();
        outbound.spawn(&shutdown);
        Self {
            addr,
            registry,
            _shutdown: shutdown,
        }
    }

    /// An outbound sidecar with `own_dir`'s credentials and the default settings, pinning
    /// the upstream at `connect` to [`MONOLITH`].
    async fn to_monolith(own_dir: &Path, connect: SocketAddr) -> Self {
        Self::start(own_dir, connect, MONOLITH, |_| {}).await
    }

    /// The sum of the samples of `name` whose labels include all of `labels` (text format).
    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .expect("encode");
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter(|l| l[name.len()..].starts_with(['{', ' ']))
            .filter(|l| {
                labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

async fn get(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    path: &str,
    rid: Option<&str>,
) -> (StatusCode, http::HeaderMap, String) {
    let mut req = Request::get(format!("http://{addr}{path}"));
    if let Some(rid) = rid {
        req = req.header("x-request-id", rid);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(30),
        client.request(req.body(Full::default()).expect("req")),
    )
    .await
    .expect("response in time")
    .expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// Sends `n` GETs one after the other; each must be answered 200 and have reached the upstream
/// over `proto` (`HTTP/1.1` or `HTTP/2.0`).
async fn one_at_a_time(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    n: usize,
    proto: &str,
) {
    for i in 0..n {
        let (status, _, body) = get(client, addr, &format!("/n/{i}"), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.starts_with(&format!("{proto} /n/")), "{body}");
    }
}

fn h1_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn h2c_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

#[tokio::test]
async fn pinned_h2_upstream_multiplexes_many_requests_on_one_handshake() {
    let ca = Ca::new(TD);
    let (caller, monolith) = (ca.issue("report-service"), ca.issue("monolith"));
    let upstream = server(&monolith, &monolith, &[b"h2", b"http/1.1"], Mode::Http).await;
    // HTTP/2 only: with `auto`, requests one at a time would take the HTTP/1.1 lane.
    let sidecar = Sidecar::start(&caller, upstream.addr, MONOLITH, |o| {
        o.protocol = UpstreamProtocol::H2;
    })
    .await;
    let client = h1_client();
    let (status, headers, body) = get(
        &client,
        sidecar.addr,
        "/api/data/reports?startDate=2024-01-01",
        Some("rid-42"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "HTTP/2.0 /api/data/reports rid=rid-42");
    assert_eq!(headers["x-request-id"], "rid-42");
    let (_, headers, body) = get(&client, sidecar.addr, "/x", None).await;
    let assigned = headers["x-request-id"].to_str().expect("ascii").to_owned();
    assert_eq!(assigned.len(), 36, "a fresh UUID-shaped id: {assigned}");
    assert!(
        body.ends_with(&format!("rid={assigned}")),
        "the upstream saw the same id: {body}"
    );
    for i in 0..100 {
        let (status, _, _) = get(&client, sidecar.addr, &format!("/n/{i}"), None).await;
        assert_eq!(status, StatusCode::OK);
    }
    // h2c (prior knowledge) from the app works too and shares the same upstream connection.
    let (status, _, body) = get(&h2c_client(), sidecar.addr, "/h2c", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(upstream.handshakes.load(Ordering::SeqCst), 1);
    let ok = sidecar.metric(
        "gatehouse_outbound_tls_handshakes_total",
        &[("result", "ok")],
    );
    assert_eq!(ok, 1.0);
    assert_eq!(
        sidecar.metric("gatehouse_outbound_requests_total", &[("status", "200")]),
        103.0
    );
}

/// Polls `cond` every 5 ms for up to 10 s.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn one_request_at_a_time_takes_the_http1_lane_and_concurrent_ones_share_h2() {
    let ca = Ca::new(TD);
    let (caller, monolith) = (ca.issue("report-service"), ca.issue("monolith"));
    // Every answer takes 300 ms, so requests started together overlap.
    let slow = Mode::Slow(Duration::from_millis(300));
    let upstream = server(&monolith, &monolith, &[b"h2", b"http/1.1"], slow).await;
    let sidecar = Sidecar::to_monolith(&caller, upstream.addr).await;
    let client = h1_client();
    // The first request of a pool opens the HTTP/2 connection; the next, one at a time
    // within `lane_idle` of it, dials the lane and the ones after reuse it.
    let (_, _, body) = get(&client, sidecar.addr, "/seq/first", None).await;
    assert!(body.starts_with("HTTP/2.0 /seq/first"), "{body}");
    one_at_a_time(&client, sidecar.addr, 3, "HTTP/1.1").await;
    assert_eq!(
        upstream.handshakes.load(Ordering::SeqCst),
        2,
        "the HTTP/2 connection and one lane connection"
    );
    let sent = || sidecar.metric("gatehouse_outbound_endpoint_requests_total", &[]);
    let spawn_get = |path: String| {
        let (client, addr) = (client.clone(), sidecar.addr);
        tokio::spawn(async move { get(&client, addr, &path, None).await })
    };
    // A takes the idle lane; B (answered in 1.2 s), sent while A waits for its answer, and
    // the rest share the HTTP/2 connection.
    let before = sent();
    let a = spawn_get("/a".into());
    until("A to be sent", || sent() > before).await;
    let b = spawn_get("/long/b".into());
    let rest: Vec<_> = (0..6).map(|i| spawn_get(format!("/c/{i}"))).collect();
    let (_, _, body) = a.await.expect("A");
    assert!(body.starts_with("HTTP/1.1 /a"), "A on the lane: {body}");
    // The lane is idle again but B still waits for its answer: a caller with concurrent
    // requests stays on HTTP/2.
    let (_, _, body) = get(&client, sidecar.addr, "/d", None).await;
    assert!(
        body.starts_with("HTTP/2.0 /d"),
        "not the lane while B is out: {body}"
    );
    for c in rest.into_iter().chain([b]) {
        let (status, _, body) = c.await.expect("B or C");
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            body.starts_with("HTTP/2.0 /"),
            "concurrent ones on h2: {body}"
        );
    }
    // HTTP/2 from the app (gRPC's trailers need it end to end) never takes the idle lane.
    let (_, _, body) = get(&h2c_client(), sidecar.addr, "/h2c", None).await;
    assert!(body.starts_with("HTTP/2.0 /h2c"), "{body}");
    // Alone again: back on the lane, with no new connection.
    let (_, _, body) = get(&client, sidecar.addr, "/seq/again", None).await;
    assert!(body.starts_with("HTTP/1.1 /seq/again"), "{body}");
    assert_eq!(upstream.handshakes.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_burst_of_first_requests_dials_one_shared_connection() {
    let ca = Ca::new(TD);
    let (caller, monolith) = (ca.issue("report-service"), ca.issue("monolith"));
    let slow = Mode::Slow(Duration::from_millis(200));
    for (protocol, alpn, want) in [
        (UpstreamProtocol::H2, &[&b"h2"[..]][..], 1),
        // Concurrent requests: no lane either.
        (
            UpstreamProtocol::Auto,
            &[&b"h2"[..], &b"http/1.1"[..]][..],
            1,
        ),
        // A peer that speaks only HTTP/1.1: one connection per request in flight.
        (UpstreamProtocol::Auto, &[&b"http/1.1"[..]][..], 10),
    ] {
        let upstream = server(&monolith, &monolith, alpn, slow).await;
        let sidecar =
            Sidecar::start(&caller, upstream.addr, MONOLITH, |o| o.protocol = protocol).await;
        let client = h1_client();
        let burst: Vec<_> = (0..10)
            .map(|i| {
                let (client, addr) = (client.clone(), sidecar.addr);
                tokio::spawn(async move { get(&client, addr, &format!("/burst/{i}"), None).await })
            })
            .collect();
        for b in burst {
            let (status, _, body) = b.await.expect("request");
            assert_eq!(status, StatusCode::OK, "{protocol:?}: {body}");
        }
        assert_eq!(
            upstream.handshakes.load(Ordering::SeqCst),
            want,
            "{protocol:?} to a peer offering {alpn:?}"
        );
    }
}

#[tokio::test]
async fn a_caller_slower_than_the_lane_s_idle_time_stays_on_h2() {
    let ca = Ca::new(TD);
    let (caller, monolith) = (ca.issue("report-service"), ca.issue("monolith"));
    let upstream = server(&monolith, &monolith, &[b"h2", b"http/1.1"], Mode::Http).await;
    let lane_idle = Duration::from_millis(300);
    let sidecar = Sidecar::start(&caller, upstream.addr, MONOLITH, |o| {
        o.limits.lane_idle = lane_idle;
    })
    .await;
    let client = h1_client();
    let proto = async |path: &str| {
        let (status, _, body) = get(&client, sidecar.addr, path, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body.split(' ').next().unwrap_or_default().to_owned()
    };
    assert_eq!(proto("/1").await, "HTTP/2.0");
    assert_eq!(proto("/2").await, "HTTP/1.1", "the lane, dialled");
    // The pause is what is under test: longer than the lane's idle time.
    tokio::time::sleep(lane_idle + Duration::from_millis(100)).await;
    assert_eq!(
        proto("/3").await,
        "HTTP/2.0",
        "after the pause: h2, no new dial"
    );
    assert_eq!(upstream.handshakes.load(Ordering::SeqCst), 2);
    assert_eq!(
        proto("/4").await,
        "HTTP/1.1",
        "back to back again: a new lane"
    );
    assert_eq!(upstream.handshakes.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_peer_that_refuses_http1_in_alpn_gets_no_lane() {
    let ca = Ca::new(TD);
    let (caller, monolith) = (ca.issue("report-service"), ca.issue("monolith"));
    let upstream = server(&monolith, &monolith, &[b"h2"], Mode::Http).await;
    let sidecar = Sidecar::to_monolith(&caller, upstream.addr).await;
    let client = h1_client();
    one_at_a_time(&client, sidecar.addr, 5, "HTTP/2.0").await;
    // The refused lane handshake was not completed; the lane is not tried again.
    assert_eq!(upstream.handshakes.load(Ordering::SeqCst), 1);
    let failed = sidecar.metric("gatehouse_outbound_tls_handshakes_total", &[])
        - sidecar.metric(
            "gatehouse_outbound_tls_handshakes_total",
            &[("result", "ok")],
        );
    assert_eq!(failed, 0.0, "the refused lane is not a failed handshake");
}

#[tokio::test]
async fn http1_upstream_reuses_keepalive_connections() {
    let ca = Ca::new(TD);
    let (caller, monolith) = (ca.issue("report-service"), ca.issue("monolith"));
    let upstream = server(&monolith, &monolith, &[b"http/1.1"], Mode::Http).await;
    let sidecar = Sidecar::to_monolith(&caller, upstream.addr).await;
    let client = h1_client();
    one_at_a_time(&client, sidecar.addr, 50, "HTTP/1.1").await;
    assert_eq!(upstream.handshakes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn protocol_http1_keeps_a_keepalive_pool_to_an_h2_capable_peer() {
    let ca = Ca::new(TD);
    let (caller, monolith) = (ca.issue("report-service"), ca.issue("monolith"));
    let upstream = server(&monolith, &monolith, &[b"h2", b"http/1.1"], Mode::Http).await;
    let sidecar = Sidecar::start(&caller, upstream.addr, MONOLITH, |o| {
        o.protocol = UpstreamProtocol::Http1
    })
    .await;
    let client = h1_client();
    one_at_a_time(&client, sidecar.addr, 20, "HTTP/1.1").await;
    assert_eq!(upstream.handshakes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn impostor_gets_no_request_bytes_and_app_gets_502_naming_both_ids() {
    let ca = Ca::new(TD);
    let (caller, impostor) = (ca.issue("report-service"), ca.issue("impostor"));
    let upstream = server(&impostor, &impostor, &[b"h2", b"http/1.1"], Mode::Record).await;
    let sidecar = Sidecar::to_monolith(&caller, upstream.addr).await;
    let (status, headers, body) = get(&h1_client(), sidecar.addr, "/api/data/reports", None).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers["content-type"], "application/json");
    let json: serde_json::Value = serde_json::from_str(&body).expect("json body");
    assert_eq!(json["reason"], "identity_mismatch");
    assert_eq!(json["expected_id"], "spiffe://fintech.internal/monolith");
    assert_eq!(json["presented_id"], "spiffe://fintech.internal/impostor");
    assert_eq!(
        json["request_id"],
        headers["x-request-id"].to_str().expect("ascii")
    );
    // Give a misbehaving client time to write anything it would have written.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        upstream.bytes_read.load(Ordering::SeqCst),
        0,
        "the impostor read request bytes"
    );
    assert_eq!(
        upstream.handshakes.load(Ordering::SeqCst),
        0,
        "the handshake must fail"
    );
    let mismatches = sidecar.metric(
        "gatehouse_outbound_errors_total",
        &[("reason", "identity_mismatch")],
    );
    assert_eq!(mismatches, 1.0);
    let retries = sidecar.metric("gatehouse_outbound_retries_total", &[]);
    assert_eq!(retries, 0.0, "identity failures are never retried");
}

#[tokio::test]
async fn server_refusing_our_certificate_is_502_naming_the_alert() {
    let ca = Ca::new(TD);
    let other = Ca::new("other.internal");
    let (caller, monolith) = (ca.issue("report-service"), ca.issue("monolith"));
    let other_dir = other.issue("someone");
    // The server trusts only the other CA: our certificate is refused after a TLS 1.3
    // handshake the client already considers complete.
    let both: &[&[u8]] = &[b"h2", b"http/1.1"];
    let h1_only: &[&[u8]] = &[b"http/1.1"];
    for alpn in [both, h1_only] {
        let upstream = server(&monolith, &other_dir, alpn, Mode::Http).await;
        let sidecar = Sidecar::to_monolith(&caller, upstream.addr).await;
        let (status, _, body) = get(&h1_client(), sidecar.addr, "/api/data/reports", None).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("json body");
        assert_eq!(json["reason"], "client_certificate_rejected", "{body}");
        assert_eq!(json["alert"], "unknown_ca", "{body}");
    }
}

#[tokio::test]
async fn unreachable_upstream_is_502_after_one_safe_retry() {
    let ca = Ca::new(TD);
    let caller = ca.issue("report-service");
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = closed.local_addr().expect("addr");
    drop(closed);
    let sidecar = Sidecar::to_monolith(&caller, addr).await;
    let (status, _, body) = get(&h1_client(), sidecar.addr, "/", None).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("\"reason\":\"connect\""), "{body}");
    assert_eq!(sidecar.metric("gatehouse_outbound_retries_total", &[]), 1.0);
}

#[tokio::test]
async fn a_request_after_the_upstreams_goaway_is_retried_on_a_new_connection() {
    let ca = Ca::new(TD);
    let (caller, monolith) = (ca.issue("report-service"), ca.issue("monolith"));
    let upstream = server(&monolith, &monolith, &[b"h2"], Mode::GoAwayAfterFast).await;
    let sidecar = Sidecar::to_monolith(&caller, upstream.addr).await;
    let client = h1_client();
    // A slow request keeps the first connection open past its GOAWAY.
    let slow = tokio::spawn({
        let (client, addr) = (client.clone(), sidecar.addr);
        async move { get(&client, addr, "/slow", None).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _, body) = get(&client, sidecar.addr, "/fast", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The GOAWAY has arrived; the connection still carries the slow stream.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _, body) = get(&client, sidecar.addr, "/after", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.starts_with("HTTP/2.0 /after "), "{body}");
    let (status, _, body) = slow.await.expect("slow request");
    assert_eq!(
        status,
        StatusCode::OK,
        "the in-flight stream finished: {body}"
    );
    assert_eq!(upstream.handshakes.load(Ordering::SeqCst), 2);
    assert_eq!(sidecar.metric("gatehouse_outbound_retries_total", &[]), 1.0);
}

/// A stream the peer refused unprocessed (`REFUSED_STREAM`) never reached its app: with
/// `retry_idempotent` (which keeps a bodiless request's head) it is sent again, any method;
/// without it the head is gone and the app gets 502 (nothing is copied per request then).
#[tokio::test]
async fn a_refused_stream_is_sent_again_when_its_head_was_kept() {
    let ca = Ca::new(TD);
    let (caller, monolith) = (ca.issue("report-service"), ca.issue("monolith"));
    for retry in [true, false] {
        let upstream = server(&monolith, &monolith, &[b"h2"], Mode::RefuseFirst).await;
        let sidecar = Sidecar::start(&caller, upstream.addr, MONOLITH, |c| {
            c.limits.retry_idempotent = retry;
        })
        .await;
        let client = h1_client();
        let req = Request::post(format!("http://{}/submit", sidecar.addr))
            .body(Full::default())
            .expect("request");
        let resp = client.request(req).await.expect("response");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let refused = sidecar.metric("gatehouse_outbound_retries_total", &[("reason", "refused")]);
        if retry {
            assert_eq!(status, StatusCode::OK, "{body:?}");
            assert_eq!(&body[..], b"HTTP/2.0 /submit");
            assert_eq!(refused, 1.0);
        } else {
            assert_eq!(status, StatusCode::BAD_GATEWAY, "{body:?}");
            assert_eq!(refused, 0.0);
        }
        assert_eq!(
            upstream.handshakes.load(Ordering::SeqCst),
            1,
            "one connection"
        );
    }
}

#[tokio::test]
async fn slow_upstream_is_504_and_not_retried() {
    let ca = Ca::new(TD);
    let (caller, monolith) = (ca.issue("report-service"), ca.issue("monolith"));
    let upstream = server(
        &monolith,
        &monolith,
        &[b"http/1.1"],
        Mode::Slow(Duration::from_secs(5)),
    )
    .await;
    let sidecar = Sidecar::start(&caller, upstream.addr, MONOLITH, |c| {
        c.limits.response_timeout = Duration::from_millis(300);
    })
    .await;
    let (status, _, body) = get(&h1_client(), sidecar.addr, "/slow", None).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(body.contains("\"reason\":\"response_timeout\""), "{body}");
    assert_eq!(sidecar.metric("gatehouse_outbound_retries_total", &[]), 0.0);
}

#[tokio::test]
async fn aged_connections_are_replaced() {
    let ca = Ca::new(TD);
    let (caller, monolith) = (ca.issue("report-service"), ca.issue("monolith"));
    let upstream = server(&monolith, &monolith, &[b"h2"], Mode::Http).await;
    let sidecar = Sidecar::start(&caller, upstream.addr, MONOLITH, |c| {
        c.limits.max_connection_age = Duration::from_millis(200);
    })
    .await;
    let client = h1_client();
    assert_eq!(
        get(&client, sidecar.addr, "/a", None).await.0,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        get(&client, sidecar.addr, "/b", None).await.0,
        StatusCode::OK
    );
    assert_eq!(upstream.handshakes.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn pool_is_bounded_and_waiting_requests_get_a_freed_connection() {
    let ca = Ca::new(TD);
    let (caller, monolith) = (ca.issue("report-service"), ca.issue("monolith"));
    let slow = Mode::Slow(Duration::from_millis(300));
    let upstream = server(&monolith, &monolith, &[b"http/1.1"], slow).await;
    let sidecar = Sidecar::start(&caller, upstream.addr, MONOLITH, |c| {
        c.limits.max_connections = 2;
    })
    .await;
    let client = h1_client();
    let requests = (0..6).map(|i| {
        let client = client.clone();
        let addr = sidecar.addr;
        tokio::spawn(async move { get(&client, addr, &format!("/p/{i}"), None).await.0 })
    });
    for r in requests.collect::<Vec<_>>() {
        assert_eq!(r.await.expect("task"), StatusCode::OK);
    }
    assert_eq!(
        upstream.handshakes.load(Ordering::SeqCst),
        2,
        "never more than the bound"
    );
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let ca = Ca::new(TD);
    let (caller, monolith) = (ca.issue("report-service"), ca.issue("monolith"));
    let upstream = server(&monolith, &monolith, &[b"http/1.1"], Mode::Http).await;
    let sidecar = Sidecar::start(&caller, upstream.addr, MONOLITH, |c| {
        c.limits.idle_timeout = Duration::from_millis(200);
    })
    .await;
    let client = h1_client();
    assert_eq!(
        get(&client, sidecar.addr, "/a", None).await.0,
        StatusCode::OK
    );
    let open = || {
        sidecar.metric(
            "gatehouse_outbound_connections_open",
            &[("upstream", "monolith")],
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while open() != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "idle connection still open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        get(&client, sidecar.addr, "/b", None).await.0,
        StatusCode::OK
    );
    assert_eq!(upstream.handshakes.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn request_bodies_stream_through_on_h1_and_h2() {
    let ca = Ca::new(TD);
    let (caller, monolith) = (ca.issue("report-service"), ca.issue("monolith"));
    let both: &[&[u8]] = &[b"h2", b"http/1.1"];
    let h1_only: &[&[u8]] = &[b"http/1.1"];
    for alpn in [both, h1_only] {
        let upstream = server(&monolith, &monolith, alpn, Mode::Http).await;
        let sidecar = Sidecar::to_monolith(&caller, upstream.addr).await;
        let upload = vec![7u8; 3 * 1024 * 1024];
        let req = Request::post(format!("http://{}/api/expenses", sidecar.addr))
            .body(Full::new(Bytes::from(upload)))
            .expect("request");
        let resp = h1_client().request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(body.ends_with("len=3145728"), "{body}");
        // A chunked upload (no length known up front, as a streaming client sends it): its
        // `transfer-encoding` describes the app's HTTP/1.1 hop only, and HTTP/2 refuses it.
        let mut tcp = tokio::net::TcpStream::connect(sidecar.addr)
            .await
            .expect("connect");
        tcp.write_all(
            b"POST /api/expenses HTTP/1.1\r\nhost: monolith\r\ntransfer-encoding: chunked\r\n\
              connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        .await
        .expect("write");
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.expect("read");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("len=11"), "{answer}");
    }
}

#[tokio::test]
async fn server_from_another_ca_is_502_server_certificate_and_not_retried() {
    let ca = Ca::new(TD);
    let other = Ca::new(TD); // same trust domain name, different keys: not our bundle
    let caller = ca.issue("report-service");
    let forged = other.issue("monolith");
    let upstream = server(&forged, &caller, &[b"h2"], Mode::Record).await;
    let sidecar = Sidecar::to_monolith(&caller, upstream.addr).await;
    let (status, _, body) = get(&h1_client(), sidecar.addr, "/", None).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("\"reason\":\"server_certificate\""), "{body}");
    assert_eq!(upstream.bytes_read.load(Ordering::SeqCst), 0);
    assert_eq!(sidecar.metric("gatehouse_outbound_retries_total", &[]), 0.0);
}

#[tokio::test]
async fn sni_is_the_connect_host_unless_configured() {
    let ca = Ca::new(TD);
    let (caller, monolith) = (ca.issue("report-service"), ca.issue("monolith"));
    for (configured, expected) in [
        (None, "localhost"),
        (Some("monolith.internal"), "monolith.internal"),
    ] {
        let upstream = server(&monolith, &monolith, &[b"h2"], Mode::Http).await;
        let sidecar = Sidecar::start(&caller, upstream.addr, MONOLITH, |c| {
            c.target = Target::new("localhost", c.target.port());
            c.sni = configured.map(str::to_owned);
        })
        .await;
        let (status, _, body) = get(&h1_client(), sidecar.addr, "/", None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let seen = upstream.sni.lock().expect("sni").clone();
        assert_eq!(seen, vec![Some(expected.to_owned())]);
    }
}

#[tokio::test]
async fn connect_host_is_resolved_when_connecting_not_at_startup() {
    let ca = Ca::new(TD);
    let caller = ca.issue("report-service");
    let unused = "127.0.0.1:9".parse().expect("addr");
    // RFC 6761: `.invalid` never resolves. Binding the listener must not need it to.
    let sidecar = Sidecar::start(&caller, unused, MONOLITH, |c| {
        c.target = Target::new("gatehouse-test.invalid", c.target.port());
        c.sni = None;
    })
    .await;
    let (status, _, body) = get(&h1_client(), sidecar.addr, "/", None).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("\"reason\":\"dns\""), "{body}");
    assert!(body.contains("gatehouse-test.invalid"), "{body}");
}

#[tokio::test]
async fn revoked_server_certificate_is_refused_with_a_crl() {
    let ca = Ca::new(TD);
    let caller = ca.issue("report-service");
    let (revoked, good) = (ca.issue("monolith"), ca.issue("ledger"));
    let id = SpiffeId::parse(MONOLITH).expect("id");
    ca.ca
        .revoke(&RevokeTarget::Identity(id), "key-compromise")
        .expect("revoke");
    ca.ca
        .write_crl(&caller.join("crl.pem"), Duration::from_secs(3600))
        .expect("crl");

    let upstream = server(&revoked, &revoked, &[b"h2"], Mode::Record).await;
    let sidecar = Sidecar::to_monolith(&caller, upstream.addr).await;
    let (status, _, body) = get(&h1_client(), sidecar.addr, "/", None).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("\"reason\":\"server_certificate\""), "{body}");
    assert!(body.contains("Revoked"), "{body}");
    assert_eq!(upstream.bytes_read.load(Ordering::SeqCst), 0);

    // The same CRL leaves a certificate it does not list alone.
    let upstream = server(&good, &good, &[b"h2"], Mode::Http).await;
    let sidecar = Sidecar::start(
        &caller,
        upstream.addr,
        "spiffe://fintech.internal/ledger",
        |_| {},
    )
    .await;
    let (status, _, body) = get(&h1_client(), sidecar.addr, "/", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn outbound_handshakes_are_counted_in_the_shared_handshake_metric() {
    let ca = Ca::new(TD);
    let (caller, monolith, impostor) = (
        ca.issue("report-service"),
        ca.issue("monolith"),
        ca.issue("impostor"),
    );
    let good = server(&monolith, &monolith, &[b"h2", b"http/1.1"], Mode::Http).await;
    let sidecar = Sidecar::to_monolith(&caller, good.addr).await;
    let (status, _, body) = get(&h1_client(), sidecar.addr, "/ok", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let outbound_ok = [
        ("direction", "outbound"),
        ("result", "ok"),
        ("reason", "none"),
    ];
    assert_eq!(
        sidecar.metric("gatehouse_tls_handshakes_total", &outbound_ok),
        1.0
    );
    assert_eq!(
        sidecar.metric(
            "gatehouse_tls_handshake_duration_seconds_count",
            &[("direction", "outbound")]
        ),
        1.0
    );
    let bad = server(&impostor, &impostor, &[b"h2", b"http/1.1"], Mode::Record).await;
    let sidecar = Sidecar::to_monolith(&caller, bad.addr).await;
    let (status, _, body) = get(&h1_client(), sidecar.addr, "/no", None).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let refused = [
        ("direction", "outbound"),
        ("result", "error"),
        ("reason", "identity_mismatch"),
    ];
    assert_eq!(
        sidecar.metric("gatehouse_tls_handshakes_total", &refused),
        1.0
    );
}
