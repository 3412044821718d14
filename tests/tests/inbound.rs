//! Inbound sidecar, end to end: the real `sidecar` binary, certificates minted by
//! `gatehouse-ca`, a fake app that records what it received, rustls/hyper clients, curl and
//! openssl. Run `cargo build --workspace --bins` first.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gatehouse_tests::harness::fixtures::{GATEWAY, MONOLITH, OPS, REPORTS, TD};
use gatehouse_tests::harness::{
    CertDir, FakeApp, Generated, MtlsClient, Pki, Proto, Sidecar, closed_by_peer, eventually,
    sidecar_cli, tcp_connect_from,
};
use gatehouse_tests::{bulk_transfer_route, fintech_policy_head, report_export_route};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const POLICY: &str = concat!(
    fintech_policy_head!(),
    r#"api-gateway    = "spiffe://fintech.internal/api-gateway"
ops            = "spiffe://fintech.internal/ops"
"#,
    report_export_route!(),
    r#"
[[route]]
name    = "dashboard"
methods = ["GET"]
path    = "/api/dashboard"
allow   = ["api-gateway"]
"#,
    bulk_transfer_route!(),
    r#"
[[route]]
name    = "admin"
path    = "/admin"
allow   = ["ops"]

[[route]]
name    = "public"
methods = ["GET"]
path    = "/public/**"
allow   = ["*"]
"#
);

/// A PKI, a fake app and a monolith sidecar in front of it.
struct Setup {
    pki: Pki,
    app: FakeApp,
    sidecar: Sidecar,
    server: CertDir,
}

async fn setup_with(extra: &[&str]) -> Setup {
    let pki = Pki::new(TD);
    let app = FakeApp::start().await;
    let server = pki.issue(MONOLITH);
    let mut b = Sidecar::inbound(&server, app.addr(), POLICY);
    for line in extra {
        b = b.inbound_option(line);
    }
    let sidecar = b.spawn().await.expect("sidecar starts");
    Setup {
        pki,
        app,
        sidecar,
        server,
    }
}

async fn setup() -> Setup {
    setup_with(&[]).await
}

fn leaf_sha256_hex(cert: &CertDir) -> String {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let leaf = CertificateDer::pem_file_iter(cert.cert())
        .expect("cert")
        .next()
        .expect("one cert")
        .expect("pem");
    hex::encode(Sha256::digest(leaf.as_ref()))
}

#[tokio::test]
async fn hop_by_hop_headers_of_the_apps_response_are_not_passed_on() {
    let s = setup().await;
    let client = MtlsClient::new(&s.pki.issue(REPORTS));
    for proto in [Proto::H1, Proto::H2] {
        let req = Request::get("/api/data/reports?hop_header=1")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = client
            .request(s.sidecar.inbound_addr(), proto, req)
            .await
            .expect("allowed request");
        assert_eq!(resp.status, StatusCode::OK, "{proto:?}: {:?}", resp.body);
        assert_eq!(resp.headers["x-app"], "fake", "{proto:?}");
        assert!(
            resp.headers.get("x-app-hop").is_none(),
            "{proto:?}: a header the app's Connection names is dropped: {:?}",
            resp.headers
        );
        assert_ne!(
            resp.headers
                .get(http::header::CONNECTION)
                .map(|v| v.as_bytes()),
            Some(&b"x-app-hop"[..]),
            "{proto:?}: the app's Connection header is not passed on"
        );
    }
    assert_eq!(s.app.count(), 2);
}

#[tokio::test]
async fn allowed_caller_gets_200_and_app_sees_verified_identity_not_spoofed_headers() {
    let s = setup().await;
    let caller = s.pki.issue(REPORTS);
    let client = MtlsClient::new(&caller);
    for proto in [Proto::H1, Proto::H2] {
        let req = Request::get("/api/data/reports?startDate=2024-01-01&endDate=2024-12-31")
            .header(
                "x-forwarded-client-cert",
                "By=x;URI=spiffe://fintech.internal/ops",
            )
            .header("x-client-spiffe-id", OPS)
            .header("client-cert", ":Zm9v:")
            .header("client-cert-chain", ":YmFy:")
            .header("connection", "x-drop-me")
            .header("x-drop-me", "hop-by-hop")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = client
            .request(s.sidecar.inbound_addr(), proto, req)
            .await
            .expect("allowed request");
        assert_eq!(resp.status, StatusCode::OK, "{proto:?}: {:?}", resp.body);
        assert_eq!(resp.headers["x-app"], "fake", "app response passes through");
        assert_eq!(
            resp.json()["path"],
            "/api/data/reports?startDate=2024-01-01&endDate=2024-12-31"
        );
    }
    let seen = s.app.requests();
    assert_eq!(seen.len(), 2);
    let xfcc = format!(
        "By={MONOLITH};Hash={};URI={REPORTS}",
        leaf_sha256_hex(&caller)
    );
    for r in &seen {
        let h = &r.headers;
        assert_eq!(h.get_all("x-forwarded-client-cert").iter().count(), 1);
        assert_eq!(h["x-forwarded-client-cert"], xfcc.as_str());
        assert_eq!(h.get_all("x-client-spiffe-id").iter().count(), 1);
        assert_eq!(h["x-client-spiffe-id"], REPORTS);
        assert!(
            h.get("client-cert").is_none(),
            "spoofed client-cert removed"
        );
        assert!(
            h.get("client-cert-chain").is_none(),
            "spoofed chain removed"
        );
        assert!(
            h.get("x-drop-me").is_none(),
            "Connection-named header removed"
        );
        assert_eq!(
            h["x-request-id"].len(),
            36,
            "request id added (UUID layout, as the outbound side)"
        );
        assert!(h.get("host").is_some(), "Host present for the HTTP/1.1 app");
    }
}

#[tokio::test]
async fn denied_caller_and_unrouted_path_get_403_and_app_sees_nothing() {
    let s = setup().await;
    let gateway = MtlsClient::new(&s.pki.issue(GATEWAY));
    let reports = MtlsClient::new(&s.pki.issue(REPORTS));
    let addr = s.sidecar.inbound_addr();
    let denied = gateway
        .get(addr, Proto::H1, "/api/data/reports?startDate=2024-01-01")
        .await
        .expect("response");
    let unrouted = reports
        .get(addr, Proto::H2, "/api/secret")
        .await
        .expect("response");
    for resp in [&denied, &unrouted] {
        assert_eq!(resp.status, StatusCode::FORBIDDEN);
        let body = resp.json();
        assert_eq!(body["error"], "forbidden");
        let id = body["request_id"].as_str().expect("request id");
        assert_eq!(resp.headers["x-request-id"], id);
        let text = String::from_utf8_lossy(&resp.body);
        assert!(
            !text.contains("route") && !text.contains("report"),
            "nothing about the policy: {text}"
        );
    }
    assert_eq!(s.app.count(), 0, "the app saw nothing");
    let audit = s.sidecar.wait_audit(2).await.expect("audit lines");
    assert_eq!(audit[0]["decision"], "deny");
    assert_eq!(audit[0]["reason"], "not_allowed");
    assert_eq!(audit[0]["route"], "report data export");
    assert_eq!(audit[0]["caller"], GATEWAY);
    assert_eq!(audit[1]["reason"], "no_route");
    assert!(audit[1]["route"].is_null());
    assert_eq!(audit[1]["status"], 403);
}

/// Each certificate must be refused at the handshake; the app never sees a request.
#[tokio::test]
async fn bad_client_certificates_are_refused_at_the_handshake() {
    use rcgen::{BasicConstraints, IsCa, SanType};
    let s = setup().await;
    let now = time::OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    let bundle = s.server.bundle();
    let foreign = Pki::new(TD);

    let mut cases: Vec<(&str, MtlsClient, &[&str])> = Vec::new();
    cases.push((
        "no client certificate",
        MtlsClient::without_cert(&bundle),
        &["no_client_cert"],
    ));
    let other_ca = foreign.issue(REPORTS);
    cases.push((
        "certificate from another CA",
        MtlsClient::with_files(&other_ca.cert(), &other_ca.key(), &bundle),
        // Same issuer name as our CA: webpki tries it and the signature fails.
        &["unknown_issuer", "bad_signature"],
    ));
    let expired = s.pki.sign_custom(
        "expired",
        s.pki.svid_params(REPORTS, now - day * 3, now - day),
    );
    cases.push(("expired", MtlsClient::new(&expired), &["expired"]));
    let future = s.pki.sign_custom(
        "future",
        s.pki.svid_params(REPORTS, now + day, now + day * 2),
    );
    cases.push((
        "not yet valid",
        MtlsClient::new(&future),
        &["not_yet_valid"],
    ));
    let mut ca_leaf = s.pki.params_now(REPORTS);
    ca_leaf.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_leaf = s.pki.sign_custom("ca-leaf", ca_leaf);
    cases.push((
        "CA:TRUE leaf",
        MtlsClient::new(&ca_leaf),
        &["ca_used_as_end_entity", "svid_ca_leaf"],
    ));
    let mut no_uri = s.pki.params_now(REPORTS);
    no_uri.subject_alt_names = vec![SanType::DnsName("report-service".try_into().expect("dns"))];
    let no_uri = s.pki.sign_custom("no-uri", no_uri);
    cases.push(("no URI SAN", MtlsClient::new(&no_uri), &["svid_no_uri_san"]));
    let mut two = s.pki.params_now(REPORTS);
    two.subject_alt_names
        .push(SanType::URI(OPS.try_into().expect("uri")));
    let two = s.pki.sign_custom("two-uris", two);
    cases.push((
        "two URI SANs",
        MtlsClient::new(&two),
        &["svid_multiple_uri_sans"],
    ));
    let foreign_td = s.pki.sign_custom(
        "foreign-td",
        s.pki.params_now("spiffe://evil.example/report-service"),
    );
    cases.push((
        "another trust domain",
        MtlsClient::new(&foreign_td),
        &["svid_foreign_trust_domain"],
    ));
    let a = s.pki.issue(REPORTS);
    let b = s.pki.issue(REPORTS);
    cases.push((
        "key does not match the certificate",
        MtlsClient::with_files(&a.cert(), &b.key(), &bundle),
        &["bad_signature"],
    ));

    let addr = s.sidecar.inbound_addr();
    for (name, client, _) in &cases {
        for proto in [Proto::H1, Proto::H2] {
            let r = client.get(addr, proto, "/api/data/reports").await;
            assert!(r.is_err(), "{name} ({proto:?}) must be refused, got {r:?}");
        }
    }
    assert_eq!(s.app.count(), 0, "the app saw nothing");
    let failures = s
        .sidecar
        .metric("gatehouse_tls_handshakes_total", &[("result", "error")])
        .await
        .expect("metrics");
    assert!(
        failures >= (cases.len() * 2) as f64,
        "every refusal counted: {failures}"
    );
    let (_, text) = s.sidecar.admin_get("/metrics").await.expect("metrics");
    for (name, _, reasons) in &cases {
        let n: f64 = reasons
            .iter()
            .map(|r| {
                gatehouse_tests::harness::metric_sum(
                    &text,
                    "gatehouse_tls_handshakes_total",
                    &[("result", "error"), ("reason", r)],
                )
            })
            .sum();
        assert!(
            n >= 2.0,
            "{name}: one of {reasons:?} counted ({n}):\n{text}"
        );
    }
}

#[tokio::test]
async fn path_tricks_never_reach_a_route_the_caller_is_not_allowed_for() {
    let s = setup().await;
    let reports = MtlsClient::new(&s.pki.issue(REPORTS));
    let ops = MtlsClient::new(&s.pki.issue(OPS));
    let addr = s.sidecar.inbound_addr();
    // report-service may not reach /admin, whatever the spelling.
    let tricks = [
        ("/api/data/reports/../../admin", StatusCode::FORBIDDEN),
        ("/api/data/%2e%2e/admin", StatusCode::FORBIDDEN),
        (
            "/api/data/reports/%2e%2e/%2e%2e/admin",
            StatusCode::FORBIDDEN,
        ),
        ("//admin", StatusCode::FORBIDDEN),
        ("/./admin", StatusCode::FORBIDDEN),
        ("/admin%2F", StatusCode::BAD_REQUEST),
        ("/api%2Fdata%2Freports", StatusCode::BAD_REQUEST),
        ("/ADMIN", StatusCode::FORBIDDEN),
        ("/public/..;/admin", StatusCode::BAD_REQUEST),
        ("/admin;jsessionid=1", StatusCode::BAD_REQUEST),
        ("/public/a%5C..%5Cadmin", StatusCode::BAD_REQUEST),
        ("/../admin", StatusCode::BAD_REQUEST),
    ];
    for (path, want) in tricks {
        for proto in [Proto::H1, Proto::H2] {
            let r = reports.get(addr, proto, path).await.expect("response");
            assert_eq!(r.status, want, "{path} ({proto:?}): {:?}", r.body);
            if want == StatusCode::BAD_REQUEST {
                assert_eq!(r.json()["error"], "bad_request");
            }
        }
    }
    assert_eq!(s.app.count(), 0, "no trick reached the app");
    // Case matters: ops may use /admin, but /ADMIN is another (unrouted) path.
    let r = ops.get(addr, Proto::H1, "/ADMIN").await.expect("response");
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(s.app.count(), 0);
    // The app receives the normalized path it was matched on, with the query untouched.
    let r = reports
        .get(addr, Proto::H1, "/api//data/./reports?x=%2e%2e")
        .await
        .expect("response");
    assert_eq!(r.status, StatusCode::OK);
    let seen = s.app.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path_and_query, "/api/data/reports?x=%2e%2e");
    let r = ops.get(addr, Proto::H2, "//admin").await.expect("response");
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(s.app.requests()[1].path_and_query, "/admin");
}

fn curl(cert: &CertDir, bundle: &std::path::Path, port: u16, flag: &str, path: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", flag])
        .arg("--cert")
        .arg(cert.cert())
        .arg("--key")
        .arg(cert.key())
        .arg("--cacert")
        .arg(bundle)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(["-w", "\n%{http_code} %{http_version}"])
        .arg(format!("https://localhost:{port}{path}"))
        .output()
        .expect("curl is installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "curl {flag} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `openssl s_client -connect 127.0.0.1:PORT FLAGS` presenting `cert` and trusting `ca_file`:
/// writes `request`, closes its stdin and returns what it printed.
fn openssl_s_client(
    cert: &CertDir,
    ca_file: &std::path::Path,
    port: u16,
    flags: &[&str],
    request: &[u8],
) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(flags)
        .arg("-cert")
        .arg(cert.cert())
        .arg("-key")
        .arg(cert.key())
        .arg("-CAfile")
        .arg(ca_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl is installed (.ci/run installs it)");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(request).expect("write request");
    drop(stdin);
    child.wait_with_output().expect("openssl output")
}

#[tokio::test]
async fn curl_http2_http1_and_openssl_s_client_succeed() {
    let s = setup().await;
    let caller = s.pki.issue(REPORTS);
    let port = s.sidecar.inbound_addr().port();
    let bundle = s.server.bundle();
    let path = "/api/data/reports?startDate=2024-01-01";
    let (c, b) = (caller.clone(), bundle.clone());
    let h2 = tokio::task::spawn_blocking(move || curl(&c, &b, port, "--http2", path))
        .await
        .expect("curl");
    assert!(h2.ends_with("\n200 2"), "curl --http2: {h2}");
    let (c, b) = (caller.clone(), bundle.clone());
    let h1 = tokio::task::spawn_blocking(move || curl(&c, &b, port, "--http1.1", path))
        .await
        .expect("curl");
    assert!(h1.ends_with("\n200 1.1"), "curl --http1.1: {h1}");
    assert!(
        h1.contains("\"body_len\":0"),
        "app body passed through: {h1}"
    );

    let (c, b) = (caller.clone(), bundle.clone());
    let s_client = tokio::task::spawn_blocking(move || {
        let flags = [
            "-servername",
            "localhost",
            "-verify_return_error",
            "-quiet",
            "-alpn",
            "http/1.1",
            "-ign_eof",
        ];
        let request =
            b"GET /api/data/reports HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
        openssl_s_client(&c, &b, port, &flags, request)
    })
    .await
    .expect("openssl");
    let text = String::from_utf8_lossy(&s_client.stdout);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "openssl s_client: {text}\n{}",
        String::from_utf8_lossy(&s_client.stderr)
    );
    // OpenSSL offers AES-256-GCM first; the sidecar picks its own preference, AES-128-GCM
    // (cheaper handshakes and records, see `tls::provider`).
    let (c, b) = (caller.clone(), bundle.clone());
    let brief = tokio::task::spawn_blocking(move || {
        openssl_s_client(&c, &b, port, &["-brief", "-servername", "localhost"], b"")
    })
    .await
    .expect("openssl");
    let brief = String::from_utf8_lossy(&brief.stderr);
    assert!(
        brief.contains("Ciphersuite: TLS_AES_128_GCM_SHA256"),
        "openssl s_client -brief: {brief}"
    );
    // TLS 1.2 is refused unless configured.
    let (c, b) = (caller.clone(), bundle.clone());
    let tls12 =
        tokio::task::spawn_blocking(move || openssl_s_client(&c, &b, port, &["-tls1_2"], b""))
            .await
            .expect("openssl");
    assert!(
        !tls12.status.success(),
        "TLS 1.2 must be refused by default"
    );
    assert_eq!(s.app.count(), 3);
}

const BIG: u64 = 200 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_200_mb_up_and_down_with_sidecar_rss_under_64_mb() {
    let s = setup().await;
    let client = MtlsClient::new(&s.pki.issue(REPORTS));
    let addr = s.sidecar.inbound_addr();
    let started = Instant::now();
    for proto in [Proto::H1, Proto::H2] {
        // Upload: the app counts what it receives.
        let req = Request::post("/bulk")
            .body(Generated::new(BIG))
            .expect("request");
        let resp = client.send(addr, proto, req).await.expect("upload");
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["body_len"], BIG, "{proto:?} upload arrived whole");
        // Download: counted frame by frame, never held.
        let req = Request::get(format!("/bulk?download={BIG}"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = client.send(addr, proto, req).await.expect("download");
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            if let Some(d) = frame.expect("frame").data_ref() {
                n += d.len() as u64;
            }
        }
        assert_eq!(n, BIG, "{proto:?} download arrived whole");
    }
    let rss = s.sidecar.peak_rss_kib().expect("rss");
    eprintln!(
        "800 MB through the sidecar in {:?}; sidecar peak RSS {rss} KiB",
        started.elapsed()
    );
    assert!(
        rss < 64 * 1024,
        "sidecar peak RSS {rss} KiB must stay under 64 MiB"
    );
}

/// Many streams on one HTTP/2 connection: a slow one holds up no other, a cancelled one
/// leaves the connection working, uploads and downloads larger than the flow-control windows
/// (1 MiB per stream and per connection) pass at the same time, and the sidecar's own
/// responses carry `date` and `content-length` as hyper's did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_h2_connection_serves_its_streams_independently() {
    use http_body_util::Either;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    type ReqBody = Either<Full<Bytes>, Generated>;
    const SIZE: u64 = 8 * 1024 * 1024 + 3;
    let s = setup().await;
    let client = MtlsClient::new(&s.pki.issue(REPORTS));
    let addr = s.sidecar.inbound_addr();
    let tls = client.connect(addr, Proto::H2).await.expect("handshake");
    let (send, conn) = hyper::client::conn::http2::handshake::<_, _, ReqBody>(
        TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .expect("h2");
    let conn = tokio::spawn(conn);
    let req = |method: &str, pq: &str, body: ReqBody| {
        Request::builder()
            .method(method)
            .uri(format!("https://localhost:{}{pq}", addr.port()))
            .body(body)
            .expect("request")
    };
    let empty = || Either::Left(Full::new(Bytes::new()));

    let slow = {
        let mut send = send.clone();
        let r = req("GET", "/api/data/reports?sleep_ms=3000", empty());
        tokio::spawn(async move { send.send_request(r).await })
    };
    // Given up by the client (RST_STREAM) while the app is still on it.
    let mut cancelled = send.clone();
    let r = req("GET", "/api/data/reports?sleep_ms=5000", empty());
    let gave_up = tokio::time::timeout(Duration::from_millis(300), cancelled.send_request(r)).await;
    assert!(
        gave_up.is_err(),
        "answered before the app slept: {gave_up:?}"
    );

    let started = Instant::now();
    let mut fast = Vec::new();
    for _ in 0..20 {
        let mut send = send.clone();
        let r = req("GET", "/api/data/reports", empty());
        fast.push(tokio::spawn(async move {
            let resp = send.send_request(r).await.expect("fast response");
            let status = resp.status();
            let has_date = resp.headers().contains_key(http::header::DATE);
            resp.into_body().collect().await.expect("fast body");
            (status, has_date)
        }));
    }
    let upload = {
        let mut send = send.clone();
        let r = req("POST", "/bulk", Either::Right(Generated::new(SIZE)));
        tokio::spawn(async move {
            let resp = send.send_request(r).await.expect("upload response");
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            serde_json::from_slice::<serde_json::Value>(&body).expect("json")["body_len"].clone()
        })
    };
    let download = {
        let mut send = send.clone();
        let r = req("GET", &format!("/bulk?download={SIZE}"), empty());
        tokio::spawn(async move {
            let resp = send.send_request(r).await.expect("download response");
            let mut body = resp.into_body();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                if let Some(d) = frame.expect("frame").data_ref() {
                    n += d.len() as u64;
                }
            }
            n
        })
    };
    for t in fast {
        let (status, has_date) = t.await.expect("task");
        assert_eq!(status, StatusCode::OK);
        assert!(has_date);
    }
    assert_eq!(upload.await.expect("task"), SIZE, "upload arrived whole");
    assert_eq!(
        download.await.expect("task"),
        SIZE,
        "download arrived whole"
    );
    assert!(
        !slow.is_finished(),
        "the slow request answered before the others ({:?})",
        started.elapsed()
    );

    // The sidecar's own answer (a refusal): `content-length` from the body, and `date`.
    let mut send2 = send.clone();
    let denied = send2
        .send_request(req("GET", "/admin", empty()))
        .await
        .expect("refusal");
    assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    let h = denied.headers().clone();
    let body = denied.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(
        h[http::header::CONTENT_LENGTH],
        body.len().to_string().as_str()
    );
    assert!(h.contains_key(http::header::DATE));

    let slow = slow.await.expect("task").expect("slow response");
    assert_eq!(slow.status(), StatusCode::OK);
    assert!(!conn.is_finished(), "the connection is still open");
}

#[tokio::test]
async fn slow_header_client_is_disconnected_after_the_header_timeout() {
    let s = setup_with(&["header_read_timeout = \"1s\""]).await;
    let client = MtlsClient::new(&s.pki.issue(REPORTS));
    let mut tls = client
        .connect(s.sidecar.inbound_addr(), Proto::H1)
        .await
        .expect("handshake");
    tls.write_all(b"GET /api/data/reports HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .expect("partial head");
    let started = Instant::now();
    let mut buf = Vec::new();
    // Never finish the head: the sidecar must hang up (408 or a bare close).
    let r = tokio::time::timeout(Duration::from_secs(15), tls.read_to_end(&mut buf)).await;
    let waited = started.elapsed();
    assert!(r.is_ok(), "still connected after 15 s");
    assert!(
        waited >= Duration::from_millis(800),
        "closed too early: {waited:?}"
    );
    assert_eq!(s.app.count(), 0);
}

/// An HTTP/1.1 keep-alive connection idle for a moment lets go of hyper (its buffers) and is
/// counted as parked; its next request, a POST with a body, is served on the same connection,
/// and once that body was read whole the connection parks again.
#[tokio::test]
async fn an_idle_http1_connection_parks_and_serves_its_next_requests() {
    use hyper_util::rt::TokioIo;
    let s = setup().await;
    let client = MtlsClient::new(&s.pki.issue(REPORTS));
    let tls = client
        .connect(s.sidecar.inbound_addr(), Proto::H1)
        .await
        .expect("handshake");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("h1");
    let conn = tokio::spawn(conn);
    let parked = async |n: f64| {
        eventually(
            &format!("{n} parked connection(s)"),
            Duration::from_secs(10),
            async || {
                let v = s
                    .sidecar
                    .metric("gatehouse_inbound_parked_connections", &[])
                    .await
                    .ok()?;
                (v == n).then_some(())
            },
        )
        .await
        .expect("parked gauge");
    };
    let requests = [
        Request::get("/api/data/reports?startDate=2024-01-01&endDate=2024-12-31"),
        Request::post("/bulk"),
        Request::get("/bulk"),
    ];
    for (i, req) in requests.into_iter().enumerate() {
        let body = if i == 1 {
            vec![b'x'; 100_000]
        } else {
            Vec::new()
        };
        let req = req
            .header("host", "localhost")
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        let resp = send
            .send_request(req)
            .await
            .expect("served on the same connection");
        assert_eq!(resp.status(), StatusCode::OK, "request {i}");
        resp.into_body().collect().await.expect("body");
        parked(1.0).await;
    }
    assert_eq!(s.app.count(), 3);
    assert_eq!(
        s.app.requests()[1].body_len,
        100_000,
        "the POST body arrived whole"
    );
    assert!(!conn.is_finished(), "the connection is still open");
    drop(send);
    parked(0.0).await;
}

#[tokio::test]
async fn oversized_header_gets_431() {
    let s = setup().await;
    let client = MtlsClient::new(&s.pki.issue(REPORTS));
    let big = "a".repeat(20 * 1024);
    for proto in [Proto::H1, Proto::H2] {
        let req = Request::get("/api/data/reports")
            .header("x-big", big.as_str())
            .body(Full::new(Bytes::new()))
            .expect("request");
        let r = client
            .request(s.sidecar.inbound_addr(), proto, req)
            .await
            .expect("response");
        assert_eq!(
            r.status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "{proto:?}"
        );
    }
    assert_eq!(s.app.count(), 0);
}

#[tokio::test]
async fn app_down_gives_502_and_slow_app_gives_504() {
    let pki = Pki::new(TD);
    let server = pki.issue(MONOLITH);
    // A port nobody listens on: bind, note, drop.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let sidecar = Sidecar::inbound(&server, dead, POLICY)
        .spawn()
        .await
        .expect("sidecar");
    let client = MtlsClient::new(&pki.issue(REPORTS));
    let r = client
        .get(sidecar.inbound_addr(), Proto::H1, "/api/data/reports")
        .await
        .expect("response");
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.json()["error"], "bad_gateway");
    assert!(r.json()["request_id"].is_string());

    let app = FakeApp::start().await;
    let sidecar = Sidecar::inbound(&server, app.addr(), POLICY)
        .inbound_option("app_timeout = \"500ms\"")
        .spawn()
        .await
        .expect("sidecar");
    let r = client
        .get(
            sidecar.inbound_addr(),
            Proto::H2,
            "/api/data/reports?sleep_ms=3000",
        )
        .await
        .expect("response");
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.json()["error"], "gateway_timeout");
}

#[tokio::test]
async fn sigterm_during_a_slow_request_lets_it_complete_then_exits_0() {
    let mut s = setup().await;
    let client = MtlsClient::new(&s.pki.issue(REPORTS));
    let addr = s.sidecar.inbound_addr();
    let in_flight = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .get(addr, Proto::H1, "/api/data/reports?sleep_ms=4000")
                .await
        })
    };
    let in_flight_h2 = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .get(addr, Proto::H2, "/api/data/reports?sleep_ms=4000")
                .await
        })
    };
    eventually(
        "the app to get both requests",
        Duration::from_secs(10),
        async || (s.app.count() == 2).then_some(()),
    )
    .await
    .expect("requests in flight");
    s.sidecar.sigterm();
    let (status, body) = eventually("/readyz 503", Duration::from_secs(5), async || {
        match s.sidecar.admin_get("/readyz").await {
            Ok((StatusCode::SERVICE_UNAVAILABLE, b)) => Some((StatusCode::SERVICE_UNAVAILABLE, b)),
            _ => None,
        }
    })
    .await
    .expect("readyz turns 503 while draining");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("shutting down"));
    // No new connections are accepted while draining.
    let refused = client.get(addr, Proto::H1, "/api/data/reports").await;
    assert!(refused.is_err(), "new request during drain: {refused:?}");
    for task in [in_flight, in_flight_h2] {
        let r = task
            .await
            .expect("task")
            .expect("in-flight request completes");
        assert_eq!(r.status, StatusCode::OK);
    }
    let exit = s
        .sidecar
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("exits");
    assert!(exit.success(), "exit status {exit}");
    assert_eq!(s.app.count(), 2);
}

async fn counter(sc: &Sidecar, decision: &str, caller: &str) -> f64 {
    sc.metric(
        "gatehouse_inbound_requests_total",
        &[("decision", decision), ("caller", caller)],
    )
    .await
    .expect("metrics")
}

#[tokio::test]
async fn metrics_move_and_every_decision_has_one_json_audit_line() {
    let s = setup().await;
    let reports = MtlsClient::new(&s.pki.issue(REPORTS));
    let gateway = MtlsClient::new(&s.pki.issue(GATEWAY));
    let addr = s.sidecar.inbound_addr();
    assert_eq!(counter(&s.sidecar, "allow", "report-service").await, 0.0);
    assert_eq!(counter(&s.sidecar, "deny", "api-gateway").await, 0.0);
    for _ in 0..3 {
        let r = reports
            .get(addr, Proto::H2, "/api/data/reports")
            .await
            .expect("ok");
        assert_eq!(r.status, StatusCode::OK);
    }
    for _ in 0..2 {
        let r = gateway
            .get(addr, Proto::H1, "/api/data/reports")
            .await
            .expect("ok");
        assert_eq!(r.status, StatusCode::FORBIDDEN);
    }
    let r = reports.get(addr, Proto::H1, "/admin%2f").await.expect("ok");
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(counter(&s.sidecar, "allow", "report-service").await, 3.0);
    assert_eq!(counter(&s.sidecar, "deny", "api-gateway").await, 2.0);
    let ok_handshakes = s
        .sidecar
        .metric("gatehouse_tls_handshakes_total", &[("result", "ok")])
        .await
        .expect("metrics");
    assert_eq!(ok_handshakes, 6.0);
    let (_, text) = s.sidecar.admin_get("/metrics").await.expect("metrics");
    assert!(text.contains("gatehouse_cert_expiry_timestamp_seconds{cert=\"leaf\"}"));
    assert!(text.contains("gatehouse_inbound_request_duration_seconds_bucket"));

    let audit = s.sidecar.wait_audit(6).await.expect("audit");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let audit_now = s.sidecar.audit();
    assert_eq!(
        audit_now.len(),
        6,
        "one line per decision, no more: {audit_now:?}"
    );
    let decisions: Vec<&str> = audit
        .iter()
        .map(|l| l["decision"].as_str().expect("decision"))
        .collect();
    assert_eq!(
        decisions,
        ["allow", "allow", "allow", "deny", "deny", "reject"]
    );
    for line in &audit {
        for key in [
            "time",
            "request_id",
            "caller",
            "method",
            "path",
            "route",
            "decision",
            "reason",
            "status",
            "duration_ms",
        ] {
            assert!(line.get(key).is_some(), "audit line lacks {key}: {line}");
        }
    }
    assert_eq!(audit[0]["status"], 200);
    assert_eq!(audit[0]["route"], "report data export");
    assert_eq!(audit[5]["reason"], "bad_path");
    // The request id the app saw is the one in the audit line.
    let seen = s.app.requests();
    assert_eq!(
        seen[0].headers["x-request-id"],
        audit[0]["request_id"].as_str().expect("id")
    );
}

#[tokio::test]
async fn admin_status_reports_identity_expiry_and_policy_hash() {
    let s = setup().await;
    let (status, body) = s.sidecar.admin_get("/status").await.expect("status");
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["identity"], MONOLITH);
    assert_eq!(v["policy"]["routes"], 5);
    assert_eq!(
        v["policy"]["sha256"],
        hex::encode(Sha256::digest(POLICY.as_bytes()))
    );
    assert!(v["certificate"]["seconds_left"].as_i64().expect("seconds") > 3600);
    assert_eq!(
        v["listeners"]["inbound"],
        s.sidecar.inbound_addr().to_string()
    );
    assert_eq!(
        s.sidecar.admin_get("/healthz").await.expect("healthz").0,
        StatusCode::OK
    );
    assert_eq!(
        s.sidecar.admin_get("/readyz").await.expect("readyz").0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn sidecar_check_prints_the_summary_or_every_problem_with_exit_2() {
    let pki = Pki::new(TD);
    let server = pki.issue(MONOLITH);
    let app = FakeApp::start().await;
    let b = Sidecar::inbound(&server, app.addr(), POLICY);
    let config = b.write();
    let out = sidecar_cli("check", &config);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(MONOLITH), "{text}");
    assert!(text.contains("5 routes"), "{text}");
    assert!(text.contains("expires"), "{text}");
    assert!(text.contains("inbound    127.0.0.1:0"), "{text}");

    // Piped to a reader that has gone (`| grep -q`): still exit 0, nothing on stderr. Into a
    // full disk: exit 2, the error on stderr.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let closed = Stdio::from(writer);
    let full = Stdio::from(std::fs::File::create("/dev/full").expect("/dev/full"));
    for (stdout, want) in [(closed, 0), (full, 2)] {
        let out = Command::new(gatehouse_tests::harness::binary("sidecar"))
            .args(["check", "--config"])
            .arg(&config)
            .stdout(stdout)
            .output()
            .expect("run sidecar");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(want), "{err}");
        assert_eq!(err.contains("cannot write to stdout"), want == 2, "{err}");
    }

    // Three problems at once: a bad duration, a non-loopback app, a policy typo.
    let broken = std::fs::read_to_string(&config).expect("config").replace(
        &format!("app = \"{}\"", app.addr()),
        "app = \"10.1.2.3:80\"\nidle_timeout = \"forever\"",
    );
    std::fs::write(&config, broken).expect("write");
    let out = sidecar_cli("check", &config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let file = config.display().to_string();
    assert!(err.contains(&format!("{file}:")), "{err}");
    assert!(
        err.contains("10.1.2.3:80 is not a loopback address"),
        "{err}"
    );
    assert!(err.contains("`forever` is not a duration"), "{err}");
    assert_eq!(err.matches("help: ").count(), 2, "{err}");

    // Wrong key: a load problem with its file named.
    let other = pki.issue(REPORTS);
    let b = Sidecar::builder(&CertDir {
        dir: server.dir.clone(),
    })
    .app(app.addr())
    .policy(POLICY);
    let config = b.write();
    let text = std::fs::read_to_string(&config).expect("config").replace(
        &format!("{:?}", server.key()),
        &format!("{:?}", other.key()),
    );
    std::fs::write(&config, text).expect("write");
    let out = sidecar_cli("check", &config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("does not match the certificate"), "{err}");
}

#[tokio::test]
async fn stalled_handshake_and_idle_h2_connection_are_closed() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let s = setup_with(&["handshake_timeout = \"1s\"", "idle_timeout = \"1s\""]).await;
    let addr = s.sidecar.inbound_addr();
    // A client that connects and never says hello.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(15), tcp.read(&mut buf)).await;
    assert!(r.is_ok(), "still connected after 15 s");
    assert!(started.elapsed() >= Duration::from_millis(800));
    let timeouts = s
        .sidecar
        .metric(
            "gatehouse_tls_handshakes_total",
            &[("result", "error"), ("reason", "timeout")],
        )
        .await
        .expect("metrics");
    assert_eq!(timeouts, 1.0);

    // An h2 connection that goes quiet after one request is closed after idle_timeout.
    let client = MtlsClient::new(&s.pki.issue(REPORTS));
    let tls = client.connect(addr, Proto::H2).await.expect("handshake");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2");
    let conn = tokio::spawn(conn);
    let req = Request::get(format!(
        "https://localhost:{}/api/data/reports",
        addr.port()
    ))
    .body(Full::new(Bytes::new()))
    .expect("request");
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    drop(resp);
    let quiet = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(15), conn).await;
    assert!(closed.is_ok(), "idle h2 connection still open after 15 s");
    assert!(
        quiet.elapsed() >= Duration::from_millis(800),
        "closed too early"
    );
}

#[tokio::test]
async fn audit_lines_can_go_to_a_file_instead_of_stdout() {
    let pki = Pki::new(TD);
    let app = FakeApp::start().await;
    let server = pki.issue(MONOLITH);
    let log = pki.fresh_dir("audit").join("audit.jsonl");
    let sidecar = Sidecar::inbound(&server, app.addr(), POLICY)
        .section(&format!("[audit]\npath = {log:?}\n"))
        .spawn()
        .await
        .expect("sidecar");
    let client = MtlsClient::new(&pki.issue(GATEWAY));
    let addr = sidecar.inbound_addr();
    assert_eq!(
        client
            .get(addr, Proto::H1, "/api/dashboard")
            .await
            .expect("ok")
            .status,
        StatusCode::OK
    );
    assert_eq!(
        client
            .get(addr, Proto::H1, "/admin")
            .await
            .expect("ok")
            .status,
        StatusCode::FORBIDDEN
    );
    let lines = eventually(
        "two audit lines in the file",
        Duration::from_secs(10),
        async || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).expect("JSON line"))
                .collect();
            (lines.len() >= 2).then_some(lines)
        },
    )
    .await
    .expect("audit file");
    assert_eq!(lines[0]["decision"], "allow");
    assert_eq!(lines[0]["route"], "dashboard");
    assert_eq!(lines[1]["decision"], "deny");
    assert_eq!(lines[1]["caller"], GATEWAY);
    assert!(sidecar.stdout_lines().is_empty(), "nothing on stdout");
}

#[tokio::test]
async fn tls_1_2_is_accepted_only_when_configured() {
    let pki = Pki::new(TD);
    let app = FakeApp::start().await;
    let server = pki.issue(MONOLITH);
    let caller = pki.issue(REPORTS);
    let sidecar = Sidecar::inbound(&server, app.addr(), POLICY)
        .top_option("min_tls = \"1.2\"")
        .spawn()
        .await
        .expect("sidecar");
    let port = sidecar.inbound_addr().port();
    let out = tokio::task::spawn_blocking(move || {
        let flags = [
            "-tls1_2",
            "-verify_return_error",
            "-quiet",
            "-ign_eof",
            "-servername",
            "localhost",
        ];
        let request = b"GET /public/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
        openssl_s_client(&caller, &caller.bundle(), port, &flags, request)
    })
    .await
    .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "TLS 1.2 with min_tls = \"1.2\": {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(app.requests()[0].path_and_query, "/public/x");
}

/// rustls restores a resumed session's client certificate without running the verifier; the
/// sidecar re-verifies it, so a certificate that expired since the full handshake is refused.
#[tokio::test]
async fn resumed_session_with_a_certificate_that_expired_since_is_refused() {
    use hyper_util::rt::TokioIo;
    let s = setup().await;
    let now = time::OffsetDateTime::now_utc();
    let short = s.pki.sign_custom(
        "short-lived",
        s.pki
            .svid_params(REPORTS, now, now + time::Duration::seconds(3)),
    );
    let client = MtlsClient::new(&short);
    let addr = s.sidecar.inbound_addr();
    let r = client
        .get(addr, Proto::H1, "/api/data/reports")
        .await
        .expect("full handshake while valid");
    assert_eq!(r.status, StatusCode::OK);
    // Wait until the certificate has expired.
    let expiry = std::time::SystemTime::UNIX_EPOCH
        + Duration::from_secs(
            u64::try_from((now + time::Duration::seconds(4)).unix_timestamp()).expect("positive"),
        );
    if let Ok(left) = expiry.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
    let tls = client.connect(addr, Proto::H1).await.expect("TLS resumes");
    assert_eq!(
        tls.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "the client resumed its session"
    );
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("h1");
    tokio::spawn(conn);
    let req = Request::get("/api/data/reports")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let refused = send.send_request(req).await;
    assert!(
        refused.is_err(),
        "resumed expired client served: {refused:?}"
    );
    assert_eq!(
        s.app.count(),
        1,
        "only the request made while valid arrived"
    );
    let expired = s
        .sidecar
        .metric(
            "gatehouse_tls_handshakes_total",
            &[("result", "error"), ("reason", "expired")],
        )
        .await
        .expect("metrics");
    assert_eq!(expired, 1.0);
}

/// `sidecar check | grep -q …` (the compliance doc's evidence commands): a reader that closed
/// the pipe before the summary was written is not a failure of a valid config. Before, the
/// summary's second write panicked on the broken pipe (exit 101).
#[tokio::test]
async fn sidecar_check_into_a_closed_pipe_still_exits_0() {
    let pki = Pki::new(TD);
    let server = pki.issue(MONOLITH);
    let app = FakeApp::start().await;
    let b = Sidecar::inbound(&server, app.addr(), POLICY);
    let config = b.write();
    let mut child = Command::new(gatehouse_tests::harness::binary("sidecar"))
        .arg("check")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sidecar check");
    drop(child.stdout.take()); // the reader is gone before anything is written
    let out = child.wait_with_output().expect("sidecar check");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The admin port often listens on the pod's address for probes. One address that opens
/// connections and sends nothing gets 64 of them; its next one is closed at once and counted,
/// and the probes (another address) are answered all along.
#[tokio::test]
async fn one_address_cannot_take_the_admin_port() {
    let s = setup().await;
    let admin = s.sidecar.admin_addr();
    let source = Some("127.0.0.2".parse().expect("address"));
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(tcp_connect_from(admin, source).await.expect("connect"));
    }
    // The 65th is closed at once, not after the 10 s header-read timeout.
    let mut next = tcp_connect_from(admin, source).await.expect("connect");
    closed_by_peer(&mut next, Duration::from_secs(3)).await;
    assert_eq!(
        s.sidecar.admin_get("/readyz").await.expect("readyz").0,
        StatusCode::OK,
        "another address is answered while 127.0.0.2 holds its share"
    );
    let refused = s
        .sidecar
        .metric("gatehouse_admin_connections_refused_total", &[])
        .await
        .expect("metric");
    assert!(refused >= 1.0, "refusals counted: {refused}");
    drop(held);
}
