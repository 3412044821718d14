//! Outbound sidecar end to end, over the real `sidecar` binary, certificates minted by
//! `gatehouse-ca`, real TLS everywhere:
//! - report service → outbound sidecar → inbound sidecar → fake monolith, with the request id
//!   in both audit logs and a handful of TLS connections for 1,000 requests;
//! - a server impostor (valid certificate from our CA, another identity) gets no request byte;
//! - a server that refuses our client certificate is reported with its TLS alert;
//! - nginx (`ssl_verify_client on`) accepts our client certificate, and is refused by us when
//!   it does not hold the pinned identity;
//! - a non-loopback outbound listener is refused by `sidecar check` and `sidecar run`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gatehouse_ca::{IssueRequest, SpiffeId};
use gatehouse_tests::fintech::monolith::Monolith;
use gatehouse_tests::harness::app::{Recorder, serve};
use gatehouse_tests::harness::{
    CertDir, FINTECH_TD, MONOLITH_ID, Pki, REPORT_EXPORT_POLICY, REPORT_SERVICE_ID, Sidecar,
    closed_by_peer, eventually, sidecar_cli, terminate, wait,
};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

const REPORTS_QUERY: &str = "/api/data/reports?startDate=2024-01-01&endDate=2024-12-31";

// ---- support ------------------------------------------------------------------------------

/// Issues `id` like `Pki::issue`, and also returns the serial (hex) the CA assigned.
fn issue_with_serial(pki: &Pki, id: &str) -> (CertDir, String) {
    let svid = pki
        .authority()
        .issue(&IssueRequest {
            spiffe_id: SpiffeId::parse(id).expect("id"),
            dns: vec![],
            ttl: Duration::from_secs(3600),
        })
        .expect("issue");
    let dir = pki.fresh_dir(id);
    svid.write_to(&dir).expect("write");
    (CertDir { dir }, svid.serial_hex)
}

/// `[[outbound]]` entries: (name, connect, server_id).
fn outbound_entries(entries: &[(&str, String, &str)]) -> String {
    entries
        .iter()
        .map(|(name, connect, server_id)| {
            format!(
                "[[outbound]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nconnect = \"{connect}\"\nserver_id = \"{server_id}\"\n\n"
            )
        })
        .collect()
}

/// The report service's sidecar: outbound entries only.
async fn outbound_sidecar(cert: &CertDir, entries: &[(&str, String, &str)]) -> Sidecar {
    Sidecar::builder(cert)
        .section(&outbound_entries(entries))
        .spawn()
        .await
        .expect("outbound sidecar starts")
}

/// The value of `k=` in nginx's `/whoami` answer.
fn field_of(body: &str, k: &str) -> String {
    body.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
        .unwrap_or_default()
        .to_owned()
}

/// A plaintext keep-alive HTTP/1.1 client: the report service's view of its sidecar.
struct Http(Client<HttpConnector, Full<Bytes>>);

impl Http {
    fn new() -> Self {
        Self(Client::builder(TokioExecutor::new()).build_http())
    }

    async fn get(
        &self,
        url: &str,
        request_id: Option<&str>,
    ) -> (StatusCode, http::HeaderMap, String) {
        let mut req = Request::get(url);
        if let Some(id) = request_id {
            req = req.header("x-request-id", id);
        }
        let req = req.body(Full::default()).expect("request");
        let resp = tokio::time::timeout(Duration::from_secs(30), self.0.request(req))
            .await
            .expect("response within 30 s")
            .expect("response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }
}

/// A raw rustls server (TLS 1.3, client certificate required from `client_roots`) that never
/// answers and counts the bytes it reads after the handshake.
struct RecordingServer {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    bytes_read: Arc<AtomicUsize>,
}

async fn recording_server(server: &CertDir, client_bundle: &Path) -> RecordingServer {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(server.cert())
        .expect("cert")
        .collect::<Result<_, _>>()
        .expect("cert");
    let key = PrivateKeyDer::from_pem_file(server.key()).expect("key");
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(client_bundle).expect("bundle") {
        roots.add(c.expect("bundle")).expect("anchor");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .expect("verifier");
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server cert");
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handshakes = Arc::new(AtomicUsize::new(0));
    let bytes_read = Arc::new(AtomicUsize::new(0));
    let (hs, br) = (handshakes.clone(), bytes_read.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, hs, br) = (acceptor.clone(), hs.clone(), br.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                hs.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    br.fetch_add(n, Ordering::SeqCst);
                }
            });
        }
    });
    RecordingServer {
        addr,
        handshakes,
        bytes_read,
    }
}

// ---- tests --------------------------------------------------------------------------------

/// The FinTech call, through both sidecars: report service → outbound sidecar → mTLS → the
/// monolith's inbound sidecar → the fake monolith. Then 1,000 more on the same pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_service_reaches_monolith_through_both_sidecars_with_one_request_id() {
    let pki = Pki::new(FINTECH_TD);
    let monolith_cert = pki.issue(MONOLITH_ID);
    let report_cert = pki.issue(REPORT_SERVICE_ID);

    let recorder = Recorder::default();
    let app_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let app_addr = app_listener.local_addr().expect("addr");
    tokio::spawn(serve(
        app_listener,
        Arc::new(Monolith::new(recorder.clone())),
    ));

    let inbound = Sidecar::inbound(&monolith_cert, app_addr, REPORT_EXPORT_POLICY)
        .spawn()
        .await
        .expect("inbound sidecar starts");
    // A DNS name, resolved by the sidecar when it connects; SNI is that host.
    let connect = format!("localhost:{}", inbound.inbound_addr().port());
    let outbound = outbound_sidecar(&report_cert, &[("monolith", connect, MONOLITH_ID)]).await;
    let base = format!("http://{}", outbound.listener("outbound:monolith"));

    let http = Http::new();
    let (status, headers, body) = http.get(&format!("{base}{REPORTS_QUERY}"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let data: serde_json::Value = serde_json::from_str(&body).expect("monolith JSON");
    assert!(data.is_object(), "{body}");
    assert!(
        body.contains("2024-01-01") && body.contains("2024-12-31"),
        "{body}"
    );

    // The monolith saw the report service's identity (vouched for by its inbound sidecar).
    let seen = recorder.snapshot();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/api/data/reports");
    assert_eq!(
        seen[0].query.as_deref(),
        Some("startDate=2024-01-01&endDate=2024-12-31")
    );
    assert_eq!(
        seen[0].caller().map(|id| id.to_string()).as_deref(),
        Some(REPORT_SERVICE_ID)
    );

    // One request id: assigned by the outbound sidecar, returned to the caller, seen by the
    // app, and in both sidecars' audit logs.
    let rid = headers["x-request-id"].to_str().expect("ascii").to_owned();
    assert_eq!(seen[0].header("x-request-id"), Some(rid.as_str()));
    let line_of = |sidecar: &Sidecar| {
        sidecar
            .audit()
            .into_iter()
            .find(|l| l["request_id"] == rid.as_str())
    };
    let (in_line, out_line) = eventually(
        "the request id in both audit logs",
        Duration::from_secs(10),
        async || Some((line_of(&inbound)?, line_of(&outbound)?)),
    )
    .await
    .expect("request id in both audit logs");
    assert_eq!(in_line["caller"], REPORT_SERVICE_ID);
    assert_eq!(in_line["decision"], "allow");
    assert_eq!(out_line["direction"], "outbound");
    assert_eq!(out_line["status"], 200);
    assert_eq!(out_line["server_id"], MONOLITH_ID);

    // 1,000 sequential requests reuse a handful of TLS connections at most.
    let started = Instant::now();
    let small = format!("{base}/api/data/reports?startDate=2024-01-01&endDate=2024-01-02");
    for i in 0..1000 {
        let (status, _, body) = http.get(&small, None).await;
        assert_eq!(status, StatusCode::OK, "request {i}: {body}");
    }
    let elapsed = started.elapsed();
    let out_handshakes = outbound
        .metric(
            "gatehouse_outbound_tls_handshakes_total",
            &[("upstream", "monolith"), ("result", "ok")],
        )
        .await
        .expect("outbound metrics");
    let in_handshakes = inbound
        .metric("gatehouse_tls_handshakes_total", &[("result", "ok")])
        .await
        .expect("inbound metrics");
    eprintln!(
        "1000 sequential requests in {elapsed:?}; outbound handshakes {out_handshakes}, inbound handshakes {in_handshakes}"
    );
    assert!(
        (1.0..=3.0).contains(&out_handshakes),
        "outbound opened {out_handshakes} TLS connections"
    );
    assert!(
        (1.0..=3.0).contains(&in_handshakes),
        "inbound accepted {in_handshakes} TLS connections"
    );
    let forwarded = outbound
        .metric(
            "gatehouse_outbound_requests_total",
            &[("upstream", "monolith"), ("status", "200")],
        )
        .await
        .expect("outbound metrics");
    assert_eq!(forwarded, 1001.0);
}

/// A valid certificate from our CA with another identity behind `connect`: the handshake
/// fails on our side, the app gets a 502 naming both identities, the impostor reads nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_impostor_gets_no_request_bytes_and_app_gets_502_naming_both_ids() {
    let pki = Pki::new(FINTECH_TD);
    let report_cert = pki.issue(REPORT_SERVICE_ID);
    let impostor_cert = pki.issue("spiffe://fintech.internal/impostor");
    let impostor = recording_server(&impostor_cert, &impostor_cert.bundle()).await;
    let sidecar = outbound_sidecar(
        &report_cert,
        &[("monolith", impostor.addr.to_string(), MONOLITH_ID)],
    )
    .await;
    let http = Http::new();
    let url = format!(
        "http://{}{REPORTS_QUERY}",
        sidecar.listener("outbound:monolith")
    );
    let (status, headers, body) = http.get(&url, Some("impostor-check-1")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(headers["content-type"], "application/json");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(json["reason"], "identity_mismatch", "{body}");
    assert_eq!(json["expected_id"], MONOLITH_ID);
    assert_eq!(json["presented_id"], "spiffe://fintech.internal/impostor");
    assert_eq!(json["request_id"], "impostor-check-1");
    let message = json["error"].as_str().unwrap_or_default();
    assert!(
        message.contains(MONOLITH_ID) && message.contains("spiffe://fintech.internal/impostor"),
        "{body}"
    );
    // Whatever a broken client would have written has had time to arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        impostor.bytes_read.load(Ordering::SeqCst),
        0,
        "the impostor received request bytes"
    );
    assert_eq!(
        impostor.handshakes.load(Ordering::SeqCst),
        0,
        "the handshake must not complete"
    );
    let errors = sidecar
        .metric(
            "gatehouse_outbound_errors_total",
            &[("upstream", "monolith"), ("reason", "identity_mismatch")],
        )
        .await
        .expect("metrics");
    assert_eq!(errors, 1.0);
    let failed = sidecar
        .metric(
            "gatehouse_outbound_tls_handshakes_total",
            &[("result", "identity_mismatch")],
        )
        .await
        .expect("metrics");
    assert_eq!(failed, 1.0);
}

/// TLS 1.3: our client certificate is judged after our side of the handshake completed; the
/// server's refusal arrives on the first read and is reported as such, with its alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refusing_our_client_certificate_is_502_naming_the_alert() {
    let pki = Pki::new(FINTECH_TD);
    let foreign = Pki::new("elsewhere.internal");
    let report_cert = pki.issue(REPORT_SERVICE_ID);
    let monolith_cert = pki.issue(MONOLITH_ID);
    let foreign_bundle = foreign.bundle_file();
    let server = recording_server(&monolith_cert, &foreign_bundle).await;
    let sidecar = outbound_sidecar(
        &report_cert,
        &[("monolith", server.addr.to_string(), MONOLITH_ID)],
    )
    .await;
    let http = Http::new();
    let url = format!(
        "http://{}/api/data/reports",
        sidecar.listener("outbound:monolith")
    );
    let (status, _, body) = http.get(&url, None).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(
        json["reason"],
        "client_certificate_rejected",
        "{body}\nsidecar stderr:\n{}",
        sidecar.stderr_text()
    );
    assert_eq!(json["alert"], "unknown_ca", "{body}");
    let rejected = sidecar
        .metric(
            "gatehouse_outbound_errors_total",
            &[("reason", "client_certificate_rejected")],
        )
        .await
        .expect("metrics");
    assert_eq!(rejected, 1.0);
}

/// Interop with a server nobody here wrote: nginx verifies our client certificate against the
/// bundle and echoes what it verified; with a server_id nginx does not hold, we refuse it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_accepts_our_client_certificate_and_is_refused_when_not_the_pinned_identity() {
    let Ok(nginx) = which("nginx") else {
        panic!("nginx is not installed: .ci/run installs it (apt-get install nginx)");
    };
    let pki = Pki::new(FINTECH_TD);
    let (report_cert, our_serial) = issue_with_serial(&pki, REPORT_SERVICE_ID);
    let monolith_cert = pki.issue(MONOLITH_ID);
    let ngx = Nginx::start(&nginx, &monolith_cert, &pki.fresh_dir("nginx"));
    let sidecar = outbound_sidecar(
        &report_cert,
        &[
            ("nginx", ngx.addr.to_string(), MONOLITH_ID),
            (
                "nginx-wrong",
                ngx.addr.to_string(),
                "spiffe://fintech.internal/ledger",
            ),
        ],
    )
    .await;
    let http = Http::new();

    let url = format!("http://{}/whoami", sidecar.listener("outbound:nginx"));
    let (status, _, body) = http.get(&url, None).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{body}; nginx error log:\n{}",
        ngx.error_log()
    );
    let field = |k: &str| field_of(&body, k);
    assert_eq!(field("verify"), "SUCCESS", "{body}");
    let norm = |s: &str| s.trim_start_matches('0').to_ascii_lowercase();
    assert_eq!(
        norm(&field("serial")),
        norm(&our_serial),
        "nginx saw another certificate: {body}"
    );
    assert_eq!(
        field("proto"),
        "HTTP/2.0",
        "h2 negotiated with nginx: {body}"
    );
    // The next request, one at a time, goes over the HTTP/1.1 lane, negotiated with nginx.
    let (status, _, body) = http.get(&url, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(field_of(&body, "verify"), "SUCCESS", "{body}");
    assert_eq!(
        field_of(&body, "proto"),
        "HTTP/1.1",
        "the lane negotiated with nginx: {body}"
    );

    let url = format!("http://{}/whoami", sidecar.listener("outbound:nginx-wrong"));
    let (status, _, body) = http.get(&url, None).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(json["reason"], "identity_mismatch");
    assert_eq!(json["expected_id"], "spiffe://fintech.internal/ledger");
    assert_eq!(json["presented_id"], MONOLITH_ID);
}

/// Outbound listeners are unauthenticated plaintext: a non-loopback address needs the
/// explicitly dangerous option, in `check` and in `run` alike.
#[test]
fn non_loopback_outbound_listen_is_refused_by_check_and_run() {
    let pki = Pki::new(FINTECH_TD);
    let report_cert = pki.issue(REPORT_SERVICE_ID);
    let entry = format!(
        "[[outbound]]\nname = \"monolith\"\nlisten = \"0.0.0.0:7001\"\nconnect = \"monolith.internal:8443\"\nserver_id = \"{MONOLITH_ID}\"\n"
    );
    let refused = Sidecar::builder(&report_cert).section(&entry);
    let config = refused.write();
    for verb in ["check", "run"] {
        let out = sidecar_cli(verb, &config);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "sidecar {verb}: {stderr}");
        assert!(
            stderr.contains("sidecar.toml:"),
            "sidecar {verb} names the file: {stderr}"
        );
        assert!(
            stderr.contains("0.0.0.0:7001") && stderr.contains("not a loopback address"),
            "sidecar {verb}: {stderr}"
        );
        assert!(
            stderr.contains("allow_non_loopback_listen"),
            "sidecar {verb} says how to opt in: {stderr}"
        );
    }
    // With the opt-in, `check` accepts it and says loudly what it is.
    let opted_in = entry.replace(
        "server_id =",
        "allow_non_loopback_listen = true\nserver_id =",
    );
    let opted_in = Sidecar::builder(&report_cert).section(&opted_in);
    let config = opted_in.write();
    let out = sidecar_cli("check", &config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("outbound monolith: 0.0.0.0:7001 -> monolith.internal:8443"),
        "{stdout}"
    );
    assert!(stdout.contains("DANGEROUS"), "{stdout}");
}

// ---- nginx --------------------------------------------------------------------------------

fn which(cmd: &str) -> Result<PathBuf, ()> {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
    {
        let p = Path::new(dir).join(cmd);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(())
}

/// nginx with `ssl_verify_client on`, the monolith's certificate, and our bundle; answers with
/// what it verified about the client.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Nginx {
    fn start(bin: &Path, server: &CertDir, dir: &Path) -> Self {
        let dir = dir.to_path_buf();
        std::fs::create_dir_all(dir.join("tmp")).expect("nginx dir");
        let certs = &server.dir;
        // nginx cannot report a port it picked itself: pick a free one, retry if taken meanwhile.
        for _ in 0..5 {
            let addr = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port");
            let conf = format!(
                r#"worker_processes 1;
error_log {dir}/error.log info;
pid {dir}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    server {{
        listen {addr} ssl http2;
        ssl_protocols TLSv1.3;
        ssl_certificate {certs}/cert.pem;
        ssl_certificate_key {certs}/key.pem;
        ssl_client_certificate {certs}/bundle.pem;
        ssl_verify_client on;
        location / {{
            default_type text/plain;
            return 200 "verify=$ssl_client_verify serial=$ssl_client_serial proto=$server_protocol\n";
        }}
    }}
}}
"#,
                dir = dir.display(),
                certs = certs.display(),
            );
            std::fs::write(dir.join("nginx.conf"), conf).expect("nginx.conf");
            let mut child = Command::new(bin)
                .arg("-p")
                .arg(&dir)
                .args(["-c", "nginx.conf", "-g", "daemon off;"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn nginx");
            // Listening, or exited (port taken or bad config: see error.log; try another port).
            let listening = wait::until_blocking(Duration::from_secs(20), || {
                if std::net::TcpStream::connect(addr).is_ok() {
                    return Some(true);
                }
                matches!(child.try_wait(), Ok(Some(_))).then_some(false)
            });
            if listening == Some(true) {
                return Self { child, addr, dir };
            }
            terminate(&mut child, Duration::from_secs(5));
        }
        panic!(
            "nginx did not start; error.log:\n{}",
            std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        );
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(5));
    }
}

/// An app connection that sends nothing is closed after the header-read timeout (10 s). hyper-util
/// reads the first bytes to tell HTTP/1.1 from h2c and waits for them with no timeout, so such a
/// connection held its slot under the listener's limit for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_app_connection_is_closed_after_the_header_read_timeout() {
    let pki = Pki::new(FINTECH_TD);
    let sidecar = outbound_sidecar(
        &pki.issue(REPORT_SERVICE_ID),
        &[("monolith", "127.0.0.1:9".to_owned(), MONOLITH_ID)],
    )
    .await;
    let mut silent = tokio::net::TcpStream::connect(sidecar.listener("outbound:monolith"))
        .await
        .expect("connect");
    let after = closed_by_peer(&mut silent, Duration::from_secs(20)).await;
    assert!(
        after >= Duration::from_secs(9),
        "closed after {after:?}, before the 10 s header-read timeout"
    );
}
