//! Rotation, revocation and hot reload under load, over the real `sidecar` and `ca` binaries
//! and real TLS. The load generator runs in the test: several keep-alive HTTP/1.1 connections
//! to an outbound sidecar, which forwards over mTLS to an inbound sidecar in front of a fake
//! app; every response status other than the expected ones, and every transport error, is a
//! failure.
//!
//! - `rotation_under_load_fails_no_request`: `ca rotate --force` of both leaves, `ca root
//!   rotate` + re-issue, `ca root retire`, at ≥ 300 requests/s for ≥ 10 s: zero failures, and
//!   new connections present the new certificates (serial in `/status`, leaf hash on the wire
//!   and in the app's `x-forwarded-client-cert`);
//! - `policy_edit_applies_to_live_connections_within_two_seconds`: 403s within 2 s of an edit
//!   revoking the caller's route, 200s again after restoring it, nothing else;
//! - `broken_files_are_refused_and_traffic_keeps_flowing`: truncated and garbage certificate,
//!   mismatched key, policy syntax error: each refused, counted and logged;
//! - `revocation_closes_the_revoked_peers_open_connection`: `ca revoke --crl`: the revoked
//!   client's open connection is closed within 2 s and its new handshakes refused, another
//!   client on the same sidecar is unaffected;
//! - `resumed_session_after_revocation_is_refused`;
//! - `outbound_pool_drops_a_server_revoked_by_a_new_crl`: a CRL reload retires the outbound
//!   pool, so the next request makes a new handshake, which refuses the revoked server;
//! - `own_certificate_rotation_retires_pooled_outbound_connections`: our own re-issued leaf
//!   retires the outbound pool, so the peer never sees the old leaf again;
//! - expiry: `sidecar run` refuses an expired own leaf naming the file and the time; expiry
//!   metrics for the leaf and the roots, the last-third warning, SIGHUP, and a certificate for
//!   another identity refused on reload.
//!
//! - issue 21, finding 9: a CRL written while `policy.toml` is broken is applied at once (the
//!   serving policy kept, the broken one visibly refused) and still applies after the fix;
//!   finding 12: a FIFO or a link to `/dev/zero` in place of a watched file, and an oversized
//!   file, are refused without blocking the reloader or reading them, at startup too.
//!
//! The load-heavy tests take a lock so they do not compete for the (2-core) CI machine.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gatehouse_tests::harness::{
    CertDir, FakeApp, MtlsClient, Pki, Proto, Sidecar, SidecarBuilder, binary, eventually,
};
use gatehouse_tests::harness::{ca_json as ca, sidecar_status as status, wait_status};
use gatehouse_tests::load::{self, Load, Sample, exchange, failures};
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::HandshakeKind;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

const SERVER_ID: &str = "spiffe://reload.test/monolith";
const CLIENT_ID: &str = "spiffe://reload.test/report-service";
const OTHER_ID: &str = "spiffe://reload.test/gateway";
const PATH: &str = "/api/data/reports?startDate=2024-01-01";

/// Quick reload settings: file events plus a 1 s polling fallback.
const RELOAD: &str = "[reload]\ndebounce = \"50ms\"\npoll_interval = \"1s\"\n";

static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The monolith's policy; `api` lists the aliases allowed on `GET /api/**`.
fn policy(api: &str) -> String {
    format!(
        r#"version = 1
trust_domain = "reload.test"

[identities]
report-service = "{CLIENT_ID}"
gateway = "{OTHER_ID}"

[[route]]
name    = "api"
methods = ["GET"]
path    = "/api/**"
allow   = [{api}]

[[route]]
name    = "health"
methods = ["GET"]
path    = "/health"
allow   = ["gateway", "report-service"]
"#
    )
}

// ---- support ------------------------------------------------------------------------------

/// (serial, SHA-256 of the leaf DER) of a certificate file, from `ca inspect`.
async fn leaf(cert: &Path) -> (String, String) {
    let v = ca(&["inspect", &cert.display().to_string()]).await;
    (
        v["serial"].as_str().expect("serial").to_owned(),
        v["sha256"].as_str().expect("sha256").to_owned(),
    )
}

/// Waits until `gatehouse_reloads_total{what,result}` reaches `at_least`.
async fn wait_reloads(sc: &Sidecar, what: &str, result: &str, at_least: f64) {
    let metric = "gatehouse_reloads_total";
    let labels = &[("what", what), ("result", result)];
    eventually(
        &format!("{metric}{labels:?} >= {at_least}"),
        Duration::from_secs(15),
        async || {
            let v = sc.metric(metric, labels).await.ok()?;
            (v >= at_least).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", sc.stderr_text()));
}

async fn reloads(sc: &Sidecar, what: &str, result: &str) -> f64 {
    sc.metric(
        "gatehouse_reloads_total",
        &[("what", what), ("result", result)],
    )
    .await
    .expect("metrics")
}

/// Handshakes refused because the peer is revoked (`gatehouse_tls_handshakes_total`).
async fn revoked_handshakes(sc: &Sidecar) -> f64 {
    sc.metric(
        "gatehouse_tls_handshakes_total",
        &[("result", "error"), ("reason", "revoked")],
    )
    .await
    .expect("metrics")
}

/// `ca crl --out CRL`: the test CA's current CRL.
async fn write_crl(pki: &Pki, crl: &Path) {
    let ca_dir = pki.authority().dir().display().to_string();
    ca(&["crl", "--dir", &ca_dir, "--out", &crl.display().to_string()]).await;
}

/// `ca revoke --serial SERIAL --crl CRL` on the test CA.
async fn revoke(pki: &Pki, serial: &str, crl: &Path) {
    let ca_dir = pki.authority().dir().display().to_string();
    let crl = crl.display().to_string();
    ca(&[
        "revoke", "--dir", &ca_dir, "--serial", serial, "--crl", &crl,
    ])
    .await;
}

/// Replaces `path` atomically (temp file + rename), as a careful writer would.
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp-test");
    std::fs::write(&tmp, bytes).expect("write temp");
    std::fs::rename(&tmp, path).expect("rename");
}

/// An inbound sidecar in front of a fake app, and an outbound sidecar pointing at it; both
/// trust the CA's own `bundle.pem`, which `ca root rotate`/`retire` update.
struct Pair {
    pki: Pki,
    app: FakeApp,
    server: CertDir,
    client: CertDir,
    inbound: Sidecar,
    outbound: Sidecar,
}

impl Pair {
    async fn start(policy: &str) -> Self {
        let pki = Pki::new("reload.test");
        let app = FakeApp::start().await;
        let server = pki.issue(SERVER_ID);
        let client = pki.issue(CLIENT_ID);
        let bundle = pki.authority().dir().join("bundle.pem");
        let inbound = Sidecar::inbound(&server, app.addr(), policy)
            .bundle(&bundle)
            .section(RELOAD)
            .spawn()
            .await
            .expect("inbound sidecar starts");
        let entry = format!(
            "[[outbound]]\nname = \"monolith\"\nlisten = \"127.0.0.1:0\"\nconnect = \"{}\"\n\
             server_id = \"{SERVER_ID}\"\nmax_connection_age = \"2s\"\n\n{RELOAD}",
            inbound.inbound_addr()
        );
        let outbound = Sidecar::builder(&client)
            .bundle(&bundle)
            .section(&entry)
            .spawn()
            .await
            .expect("outbound sidecar starts");
        Self {
            pki,
            app,
            server,
            client,
            inbound,
            outbound,
        }
    }

    fn ca_dir(&self) -> String {
        self.pki.authority().dir().display().to_string()
    }

    fn load(&self, workers: usize, rate: f64) -> Load {
        let addr = self.outbound.listener("outbound:monolith");
        Load::start(addr, PATH, "monolith", workers, rate)
    }

    fn stderr(&self) -> String {
        format!(
            "--- inbound ---\n{}\n--- outbound ---\n{}",
            self.inbound.stderr_text(),
            self.outbound.stderr_text()
        )
    }
}

async fn one_request(
    addr: std::net::SocketAddr,
    sender: &mut Option<SendRequest<Empty<Bytes>>>,
) -> Result<u16, String> {
    load::one_request(addr, sender, PATH, "monolith").await
}

fn is_200(s: &Sample) -> bool {
    s.is_200()
}

// ---- the tests ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_under_load_fails_no_request() {
    let _heavy = HEAVY.lock().await;
    let p = Pair::start(&policy("\"report-service\"")).await;
    let ca_dir = p.ca_dir();
    let (server_dir, client_dir) = (
        p.server.dir.display().to_string(),
        p.client.dir.display().to_string(),
    );
    let (server0, _) = leaf(&p.server.cert()).await;
    let (client0, _) = leaf(&p.client.cert()).await;
    assert_eq!(status(&p.inbound).await["certificate"]["serial"], server0);

    let load = p.load(12, 450.0);
    load.wait_flowing().await;

    // 1. Both leaves, same root.
    ca(&[
        "rotate",
        "--dir",
        &ca_dir,
        "--force",
        &server_dir,
        &client_dir,
    ])
    .await;
    let t = Instant::now();
    let (server1, _) = leaf(&p.server.cert()).await;
    let (client1, _) = leaf(&p.client.cert()).await;
    assert!(server1 != server0 && client1 != client0);
    wait_status(&p.inbound, "inbound serves the rotated leaf", |s| {
        s["certificate"]["serial"] == server1
    })
    .await;
    wait_status(&p.outbound, "outbound presents the rotated leaf", |s| {
        s["certificate"]["serial"] == client1
    })
    .await;
    println!(
        "leaf rotation picked up by both sidecars in {:?}",
        t.elapsed()
    );

    // 2. New root next to the old one, distributed first, then leaves from the new root.
    ca(&["root", "rotate", "--dir", &ca_dir]).await;
    let t = Instant::now();
    for sc in [&p.inbound, &p.outbound] {
        wait_status(sc, "bundle with old and new root", |s| {
            s["bundle"].as_array().is_some_and(|b| b.len() == 2)
        })
        .await;
    }
    println!("new root in both bundles after {:?}", t.elapsed());
    ca(&[
        "rotate",
        "--dir",
        &ca_dir,
        "--force",
        &server_dir,
        &client_dir,
    ])
    .await;
    let (server2, server2_sha) = leaf(&p.server.cert()).await;
    let (client2, client2_sha) = leaf(&p.client.cert()).await;
    wait_status(&p.inbound, "inbound serves the new-root leaf", |s| {
        s["certificate"]["serial"] == server2
    })
    .await;
    wait_status(&p.outbound, "outbound presents the new-root leaf", |s| {
        s["certificate"]["serial"] == client2
    })
    .await;

    // New connections present the new certificates: a fresh handshake sees the server's new
    // leaf, and the outbound sidecar's new connections (max_connection_age = 2s) carry the
    // client's new leaf to the app's x-forwarded-client-cert.
    let bundle = p.pki.authority().dir().join("bundle.pem");
    let probe = MtlsClient::with_files(&p.client.cert(), &p.client.key(), &bundle);
    let tls = probe
        .connect(p.inbound.inbound_addr(), Proto::H1)
        .await
        .expect("handshake with the inbound sidecar");
    let presented = tls.get_ref().1.peer_certificates().expect("server certs")[0].clone();
    assert_eq!(
        hex::encode(Sha256::digest(presented.as_ref())),
        server2_sha,
        "a new handshake presents the new server leaf (serial {server2})"
    );
    drop(tls);
    let want = format!("Hash={client2_sha};");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let seen = p.app.requests().iter().rev().take(200).any(|r| {
            r.headers
                .get("x-forwarded-client-cert")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains(&want))
        });
        if seen {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the app never saw the new client leaf {client2}\n{}",
            p.stderr()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // 3. Retire the old root once pooled connections made with old leaves aged out.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    ca(&["root", "retire", "--dir", &ca_dir]).await;
    for sc in [&p.inbound, &p.outbound] {
        wait_status(sc, "bundle with only the new root", |s| {
            s["bundle"].as_array().is_some_and(|b| b.len() == 1)
        })
        .await;
    }
    while load.started.elapsed() < Duration::from_millis(10_500) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let started = load.started;
    let (samples, elapsed) = load.stop().await;
    let rate = samples.len() as f64 / elapsed.as_secs_f64();
    let failed = failures(&samples, started, is_200);
    println!(
        "rotation under load: {} requests in {:.1}s = {rate:.0} req/s, {} failed",
        samples.len(),
        elapsed.as_secs_f64(),
        samples.iter().filter(|s| !is_200(s)).count()
    );
    assert!(
        failed.is_empty(),
        "failed requests: {failed:#?}\n{}",
        p.stderr()
    );
    assert!(elapsed >= Duration::from_secs(10));
    assert!(rate >= 300.0, "only {rate:.0} requests/s");
    for sc in [&p.inbound, &p.outbound] {
        assert!(reloads(sc, "cert", "ok").await >= 2.0);
        assert!(reloads(sc, "bundle", "ok").await >= 2.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn policy_edit_applies_to_live_connections_within_two_seconds() {
    let _heavy = HEAVY.lock().await;
    let allowed = policy("\"report-service\"");
    let p = Pair::start(&allowed).await;
    let load = p.load(4, 200.0);
    load.wait_flowing().await;

    replace(&p.inbound.policy_path(), policy("\"gateway\"").as_bytes());
    let edited = Instant::now();
    let first_403 = eventually("403s after the edit", Duration::from_secs(10), async || {
        load.samples()
            .iter()
            .find(|s| s.at >= edited && s.outcome == Ok(403))
            .map(|s| s.at)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", p.stderr()));
    let to_403 = first_403.duration_since(edited);
    tokio::time::sleep(Duration::from_millis(2500)).await;

    replace(&p.inbound.policy_path(), allowed.as_bytes());
    let restored = Instant::now();
    let first_200 = eventually(
        "200s after the restore",
        Duration::from_secs(10),
        async || {
            load.samples()
                .iter()
                .find(|s| s.at >= restored && s.outcome == Ok(200))
                .map(|s| s.at)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", p.stderr()));
    let to_200 = first_200.duration_since(restored);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let started = load.started;
    let (samples, _) = load.stop().await;
    println!(
        "policy edit: first 403 after {to_403:?}, first 200 after restore {to_200:?}, {} requests",
        samples.len()
    );
    assert!(to_403 <= Duration::from_secs(2), "403s took {to_403:?}");
    assert!(to_200 <= Duration::from_secs(2), "200s took {to_200:?}");
    let window = Duration::from_secs(2);
    let expected = |s: &Sample| {
        if s.at < edited || s.at >= restored + window {
            s.outcome == Ok(200)
        } else if s.at >= edited + window && s.at < restored {
            s.outcome == Ok(403)
        } else {
            matches!(s.outcome, Ok(200 | 403))
        }
    };
    let bad = failures(&samples, started, expected);
    assert!(
        bad.is_empty(),
        "unexpected outcomes: {bad:#?}\n{}",
        p.stderr()
    );
    let live_403 = samples.iter().filter(|s| s.outcome == Ok(403)).count();
    assert!(live_403 > 50, "only {live_403} requests were denied");
    assert!(reloads(&p.inbound, "policy", "ok").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broken_files_are_refused_and_traffic_keeps_flowing() {
    let _heavy = HEAVY.lock().await;
    let allowed = policy("\"report-service\"");
    let p = Pair::start(&allowed).await;
    let (serial, _) = leaf(&p.server.cert()).await;
    let cert = std::fs::read(p.server.cert()).expect("cert");
    let key = std::fs::read(p.server.key()).expect("key");
    let stranger_key = std::fs::read(p.pki.issue(OTHER_ID).key()).expect("other key");
    let load = p.load(4, 200.0);
    load.wait_flowing().await;

    // (file, what, broken content, original content)
    let cases: [(PathBuf, &str, Vec<u8>, &[u8]); 4] = [
        (
            p.server.cert(),
            "cert",
            cert[..cert.len() / 2].to_vec(),
            &cert,
        ),
        (
            p.server.cert(),
            "cert",
            b"-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n".to_vec(),
            &cert,
        ),
        (p.server.key(), "key", stranger_key, &key),
        (
            p.inbound.policy_path(),
            "policy",
            b"version = 1\n[[route]\nname = \"x\"\n".to_vec(),
            allowed.as_bytes(),
        ),
    ];
    for (path, what, broken, original) in &cases {
        let errors = reloads(&p.inbound, what, "error").await;
        let oks = reloads(&p.inbound, what, "ok").await;
        let generation = status(&p.inbound).await["reload_generation"].clone();
        replace(path, broken);
        wait_reloads(&p.inbound, what, "error", errors + 1.0).await;
        let s = status(&p.inbound).await;
        assert_eq!(s["certificate"]["serial"], serial, "old snapshot kept");
        assert_eq!(s["reload_generation"], generation, "nothing was swapped in");
        replace(path, original);
        wait_reloads(&p.inbound, what, "ok", oks + 1.0).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = load.started;
    let (samples, _) = load.stop().await;
    let bad = failures(&samples, started, is_200);
    println!(
        "broken files: {} requests, {} failed",
        samples.len(),
        samples.iter().filter(|s| !is_200(s)).count()
    );
    assert!(bad.is_empty(), "failed requests: {bad:#?}\n{}", p.stderr());
    let log = p.inbound.stderr_text();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("reload refused"))
        .collect();
    assert!(refused.len() >= 4, "refusals logged: {refused:#?}");
    for needle in [
        "cert.pem",
        "the private key does not match the certificate",
        "policy.toml",
    ] {
        assert!(
            refused.iter().any(|l| l.contains(needle)),
            "no refusal mentions {needle:?}: {refused:#?}"
        );
    }
}

/// A keep-alive HTTP/1.1 connection over mTLS; the handle yields when the connection ended.
async fn keep_alive(
    client: &MtlsClient,
    addr: std::net::SocketAddr,
) -> (SendRequest<Empty<Bytes>>, JoinHandle<Instant>) {
    let tls = client.connect(addr, Proto::H1).await.expect("handshake");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("http1");
    let ended = tokio::spawn(async move {
        let _ = conn.await;
        Instant::now()
    });
    (send, ended)
}

async fn get_on(send: &mut SendRequest<Empty<Bytes>>) -> Result<u16, String> {
    exchange(send, "/api/x", "localhost", Duration::from_secs(10)).await
}

/// An inbound sidecar with a CRL (initially listing nothing) allowing both clients on /api.
async fn crl_sidecar(pki: &Pki, app: &FakeApp) -> (Sidecar, PathBuf) {
    let crl = pki.fresh_dir("crl").join("crl.pem");
    write_crl(pki, &crl).await;
    let server = pki.issue(SERVER_ID);
    let sc = Sidecar::inbound(
        &server,
        app.addr(),
        &policy("\"report-service\", \"gateway\""),
    )
    .crl(&crl)
    .section(RELOAD)
    .spawn()
    .await
    .expect("sidecar starts");
    (sc, crl)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_closes_the_revoked_peers_open_connection() {
    let pki = Pki::new("reload.test");
    let app = FakeApp::start().await;
    let (sc, crl) = crl_sidecar(&pki, &app).await;
    let addr = sc.inbound_addr();
    let revoked = pki.issue(CLIENT_ID);
    let kept = pki.issue(OTHER_ID);
    let (revoked_serial, _) = leaf(&revoked.cert()).await;
    let (revoked_client, kept_client) = (MtlsClient::new(&revoked), MtlsClient::new(&kept));
    let (mut r_send, r_ended) = keep_alive(&revoked_client, addr).await;
    // And an HTTP/2 connection of the revoked client: closed with GOAWAY.
    let tls = revoked_client
        .connect(addr, Proto::H2)
        .await
        .expect("h2 handshake");
    let (mut r2_send, r2_conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .expect("h2");
    let r2_ended = tokio::spawn(async move {
        let _ = r2_conn.await;
        Instant::now()
    });
    let h2_req = || {
        Request::get(format!("https://localhost:{}/api/x", addr.port()))
            .body(Empty::<Bytes>::new())
            .expect("request")
    };
    let first = r2_send.send_request(h2_req()).await.expect("h2 response");
    assert_eq!(first.status(), StatusCode::OK);
    let (mut k_send, k_ended) = keep_alive(&kept_client, addr).await;
    assert_eq!(get_on(&mut r_send).await, Ok(200));
    assert_eq!(get_on(&mut k_send).await, Ok(200));

    // The non-revoked client keeps one request every 50 ms going on its open connection.
    let stop = Arc::new(AtomicBool::new(false));
    let kept_load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                out.push(get_on(&mut k_send).await);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (out, k_send)
        })
    };

    let t0 = Instant::now();
    revoke(&pki, &revoked_serial, &crl).await;
    let written = Instant::now();
    let closed_at = tokio::time::timeout(Duration::from_secs(10), r_ended)
        .await
        .expect("the revoked client's connection is closed")
        .expect("join");
    let to_close = closed_at.saturating_duration_since(written);
    println!(
        "revocation: open connection closed {to_close:?} after the CRL was written ({:?} after `ca revoke` started)",
        closed_at.duration_since(t0)
    );
    assert!(
        to_close <= Duration::from_secs(2),
        "closed after {to_close:?}"
    );
    assert!(
        get_on(&mut r_send).await.is_err(),
        "no request on the closed connection"
    );
    let h2_closed = tokio::time::timeout(Duration::from_secs(10), r2_ended)
        .await
        .expect("the revoked client's h2 connection is closed")
        .expect("join");
    let h2_to_close = h2_closed.saturating_duration_since(written);
    println!("revocation: open h2 connection closed {h2_to_close:?} after the CRL was written");
    assert!(
        h2_to_close <= Duration::from_secs(2),
        "h2 closed after {h2_to_close:?}"
    );
    assert!(r2_send.send_request(h2_req()).await.is_err());

    // New handshakes of the revoked client are refused; the other client is unaffected.
    let refused = revoked_client.get(addr, Proto::H1, "/api/x").await;
    assert!(refused.is_err(), "revoked client got {refused:?}");
    let fresh = kept_client
        .get(addr, Proto::H2, "/api/x")
        .await
        .expect("kept client");
    assert_eq!(fresh.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (kept_results, _k_send) = kept_load.await.expect("kept load");
    assert!(
        kept_results.iter().all(|r| *r == Ok(200)),
        "the other client saw {:?}",
        kept_results
            .iter()
            .filter(|r| **r != Ok(200))
            .collect::<Vec<_>>()
    );
    assert!(kept_results.len() >= 10);
    assert!(
        !k_ended.is_finished(),
        "the other client's connection stays open"
    );
    let revoked_handshakes = revoked_handshakes(&sc).await;
    assert!(revoked_handshakes >= 1.0);
    assert!(sc.stderr_text().contains("no longer trusted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_session_after_revocation_is_refused() {
    let pki = Pki::new("reload.test");
    let app = FakeApp::start().await;
    let (sc, crl) = crl_sidecar(&pki, &app).await;
    let addr = sc.inbound_addr();
    let cert = pki.issue(CLIENT_ID);
    let (serial, _) = leaf(&cert.cert()).await;
    let client = MtlsClient::new(&cert);

    // A full handshake, then a resumed one (the client keeps its session tickets).
    assert_eq!(handshake_and_get(&client, addr).await, HandshakeKind::Full);
    assert_eq!(
        handshake_and_get(&client, addr).await,
        HandshakeKind::Resumed
    );

    revoke(&pki, &serial, &crl).await;
    wait_reloads(&sc, "crl", "ok", 1.0).await;
    // The client offers its session again: refused (the new snapshot's session cache is
    // fresh, so the handshake is a full one and the verifier sees the CRL).
    let resumed = client.get(addr, Proto::H1, "/api/x").await;
    assert!(resumed.is_err(), "revoked client resumed: {resumed:?}");
    let refused = revoked_handshakes(&sc).await;
    assert!(refused >= 1.0, "{}", sc.stderr_text());
}

/// One new TLS connection with `client`'s session store, one GET that must get 200; returns
/// whether the handshake was full or resumed.
async fn handshake_and_get(client: &MtlsClient, addr: std::net::SocketAddr) -> HandshakeKind {
    let tls = client.connect(addr, Proto::H1).await.expect("handshake");
    let kind = tls.get_ref().1.handshake_kind().expect("handshake done");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("http1");
    tokio::spawn(conn);
    assert_eq!(get_on(&mut send).await, Ok(200));
    kind
}

/// A reload that leaves trust alone (a policy edit) keeps the server's session cache, so
/// clients resume instead of paying a full handshake; a CRL change (above) does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_only_reload_keeps_tls_sessions_resumable() {
    let pki = Pki::new("reload.test");
    let app = FakeApp::start().await;
    let (sc, _crl) = crl_sidecar(&pki, &app).await;
    let addr = sc.inbound_addr();
    let client = MtlsClient::new(&pki.issue(CLIENT_ID));
    assert_eq!(handshake_and_get(&client, addr).await, HandshakeKind::Full);

    replace(&sc.policy_path(), policy("\"report-service\"").as_bytes());
    wait_reloads(&sc, "policy", "ok", 1.0).await;
    assert_eq!(
        handshake_and_get(&client, addr).await,
        HandshakeKind::Resumed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_own_leaf_is_refused_at_startup_naming_file_and_time() {
    let pki = Pki::new("reload.test");
    let now = time::OffsetDateTime::now_utc();
    let params = pki.svid_params(
        SERVER_ID,
        now - time::Duration::days(2),
        now - time::Duration::hours(1),
    );
    let expired = pki.sign_custom("expired-own", params);
    let app = FakeApp::start().await;
    let builder = Sidecar::inbound(&expired, app.addr(), &policy("\"gateway\""));
    let config = builder.write();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(binary("sidecar"))
            .args(["run", "--config"])
            .arg(&config)
            .output(),
    )
    .await
    .expect("sidecar run exits")
    .expect("run sidecar");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&expired.cert().display().to_string())
            && stderr.contains("expired at")
            && stderr.contains("help:"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_metrics_lifetime_warning_sighup_and_identity_change_refused() {
    let pki = Pki::new("reload.test");
    let now = time::OffsetDateTime::now_utc();
    let not_after = now + time::Duration::hours(4);
    // A sixth of its lifetime left: inside the last third.
    let params = pki.svid_params(SERVER_ID, now - time::Duration::hours(20), not_after);
    let old = pki.sign_custom("aging", params);
    let app = FakeApp::start().await;
    let sc = Sidecar::inbound(&old, app.addr(), &policy("\"gateway\""))
        .section(RELOAD)
        .spawn()
        .await
        .expect("sidecar starts");
    let log = sc.stderr_text();
    assert!(
        log.contains("less than a third of its lifetime left"),
        "{log}"
    );
    let (_, metrics) = sc.admin_get("/metrics").await.expect("metrics");
    let leaf_expiry = gatehouse_tests::harness::metric_sum(
        &metrics,
        "gatehouse_cert_expiry_timestamp_seconds",
        &[("cert", "leaf")],
    );
    assert_eq!(leaf_expiry, not_after.unix_timestamp() as f64);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("gatehouse_cert_expiry_timestamp_seconds{cert=\"root:")),
        "no root expiry sample:\n{metrics}"
    );

    // SIGHUP reloads even when nothing changed.
    sc.sighup();
    wait_reloads(&sc, "none", "ok", 1.0).await;

    // A valid certificate and key for another identity is refused.
    let other = pki.issue(OTHER_ID);
    replace(&old.key(), &std::fs::read(other.key()).expect("key"));
    replace(&old.cert(), &std::fs::read(other.cert()).expect("cert"));
    eventually(
        "the identity change refused",
        Duration::from_secs(15),
        async || {
            sc.stderr_text()
                .contains("refusing to change identity")
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", sc.stderr_text()));
    assert_eq!(status(&sc).await["identity"], SERVER_ID);
    assert!(reloads(&sc, "cert", "error").await >= 1.0);
}

/// An inbound in front of `app` (report-service allowed on `/api/**`) and the report-service
/// outbound to it (`outbound` adds its options), with the default `max_connection_age` (5 min):
/// only a reload can retire a pooled connection.
async fn pooled_pair(
    app: &FakeApp,
    (server, client): (&CertDir, &CertDir),
    outbound: impl FnOnce(SidecarBuilder) -> SidecarBuilder,
) -> (Sidecar, Sidecar) {
    let inbound = Sidecar::inbound(server, app.addr(), &policy("\"report-service\""))
        .spawn()
        .await
        .expect("inbound starts");
    let entry = format!(
        "[[outbound]]\nname = \"monolith\"\nlisten = \"127.0.0.1:0\"\nconnect = \"{}\"\n\
         server_id = \"{SERVER_ID}\"\n\n{RELOAD}",
        inbound.inbound_addr()
    );
    let outbound = outbound(Sidecar::builder(client).section(&entry))
        .spawn()
        .await
        .expect("outbound starts");
    (inbound, outbound)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_pool_drops_a_server_revoked_by_a_new_crl() {
    let pki = Pki::new("reload.test");
    let app = FakeApp::start().await;
    let crl = pki.fresh_dir("crl").join("crl.pem");
    write_crl(&pki, &crl).await;
    let (server, client) = (pki.issue(SERVER_ID), pki.issue(CLIENT_ID));
    let (_inbound, outbound) = pooled_pair(&app, (&server, &client), |b| b.crl(&crl)).await;
    let addr = outbound.listener("outbound:monolith");
    let mut sender = None;
    for _ in 0..3 {
        assert_eq!(one_request(addr, &mut sender).await, Ok(200));
    }
    let (serial, _) = leaf(&server.cert()).await;
    revoke(&pki, &serial, &crl).await;
    wait_reloads(&outbound, "crl", "ok", 1.0).await;
    let after = one_request(addr, &mut sender).await;
    assert_eq!(
        after,
        Ok(502),
        "the pooled connection to the revoked server was reused\n{}",
        outbound.stderr_text()
    );
}

/// Our own certificate re-issued on disk (`ca rotate --force`, the step before `ca root
/// retire`): the outbound stops reusing the connections that presented the old leaf, so the
/// next request opens a new handshake with the new one. Reused, they would be refused by the
/// peer once it retires the old root (503 `peer_not_trusted` under load, the root-rotation
/// race of the CRL test in `revocation.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_certificate_rotation_retires_pooled_outbound_connections() {
    let pki = Pki::new("reload.test");
    let app = FakeApp::start().await;
    let (server, client) = (pki.issue(SERVER_ID), pki.issue(CLIENT_ID));
    let (inbound, outbound) = pooled_pair(&app, (&server, &client), |b| b).await;
    let addr = outbound.listener("outbound:monolith");
    let handshakes = async || {
        inbound
            .metric("gatehouse_tls_handshakes_total", &[("result", "ok")])
            .await
            .expect("inbound metrics")
    };
    let mut sender = None;
    for _ in 0..3 {
        assert_eq!(one_request(addr, &mut sender).await, Ok(200));
    }
    let before = handshakes().await;
    assert_eq!(
        before, 2.0,
        "three requests, one at a time: the HTTP/2 connection and the HTTP/1.1 lane"
    );

    let ca_dir = pki.authority().dir().display().to_string();
    let dir = client.dir.display().to_string();
    ca(&["rotate", "--dir", &ca_dir, "--force", &dir]).await;
    let (serial, _) = leaf(&client.cert()).await;
    wait_status(&outbound, "the re-issued leaf", |s| {
        s["certificate"]["serial"] == serial
    })
    .await;
    assert_eq!(one_request(addr, &mut sender).await, Ok(200));
    assert_eq!(
        handshakes().await,
        before + 1.0,
        "the request after our own certificate changed reused the connection that presented \
         the old one\n{}",
        outbound.stderr_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_fallback_reloads_without_file_events() {
    let pki = Pki::new("reload.test");
    let app = FakeApp::start().await;
    let server = pki.issue(SERVER_ID);
    let allowed = policy("\"report-service\"");
    let sc = Sidecar::inbound(&server, app.addr(), &allowed)
        .section("[reload]\nwatch = false\npoll_interval = \"500ms\"\n")
        .spawn()
        .await
        .expect("sidecar starts");
    let client = MtlsClient::new(&pki.issue(CLIENT_ID));
    let (mut send, _ended) = keep_alive(&client, sc.inbound_addr()).await;
    assert_eq!(get_on(&mut send).await, Ok(200));
    replace(&sc.policy_path(), policy("\"gateway\"").as_bytes());
    let edited = Instant::now();
    eventually(
        "403 on the open connection",
        Duration::from_secs(10),
        async || (get_on(&mut send).await == Ok(403)).then_some(()),
    )
    .await
    .expect("the polling fallback applied the edit");
    println!("polling fallback: 403 after {:?}", edited.elapsed());
    assert!(reloads(&sc, "policy", "ok").await >= 1.0);
}

// ---- issue 21: reload inputs (findings 9 and 12) ------------------------------------------------

/// A fresh client (empty session store, so a full handshake) requesting `/api/x`: the status,
/// or the error when the handshake or the request was refused.
async fn fresh_get(cert: &CertDir, addr: std::net::SocketAddr) -> Result<u16, String> {
    MtlsClient::new(cert)
        .get(addr, Proto::H1, "/api/x")
        .await
        .map(|r| r.status.as_u16())
        .map_err(|e| format!("{e:#}"))
}

/// Waits until a fresh full handshake of `cert` is refused.
async fn wait_refused(sc: &Sidecar, cert: &CertDir, what: &str) {
    let addr = sc.inbound_addr();
    eventually(what, Duration::from_secs(10), async || {
        fresh_get(cert, addr).await.is_err().then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", sc.stderr_text()));
}

/// `gatehouse_reload_input_refused{what}`.
async fn input_refused(sc: &Sidecar, what: &str) -> f64 {
    sc.metric("gatehouse_reload_input_refused", &[("what", what)])
        .await
        .expect("metrics")
}

/// The `what`s of `/status` `reload.refused`.
async fn refused_kinds(sc: &Sidecar) -> Vec<String> {
    status(sc).await["reload"]["refused"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["what"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

const BROKEN_POLICY: &[u8] = b"version = 1\n[[route]\nname = \"x\"\n";

/// Replaces `path` with a FIFO (made next to it, renamed over it).
fn replace_with_fifo(path: &Path) {
    let tmp = path.with_extension("fifo-test");
    let made = std::process::Command::new("mkfifo")
        .arg(&tmp)
        .status()
        .expect("mkfifo");
    assert!(made.success(), "mkfifo failed");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Replaces `path` with a symlink to `target`.
fn replace_with_link(path: &Path, target: &str) {
    let tmp = path.with_extension("link-test");
    std::os::unix::fs::symlink(target, &tmp).expect("symlink");
    std::fs::rename(&tmp, path).expect("rename");
}

/// A CRL sidecar whose policy is then broken (the refusal seen) and a client, accepted
/// before, revoked meanwhile: the sidecar, the good policy text and the revoked client.
async fn break_policy_then_revoke(pki: &Pki, app: &FakeApp) -> (Sidecar, Vec<u8>, CertDir) {
    let (sc, crl) = crl_sidecar(pki, app).await;
    let good = std::fs::read(sc.policy_path()).expect("policy");
    let revoked = pki.issue(CLIENT_ID);
    assert_eq!(fresh_get(&revoked, sc.inbound_addr()).await, Ok(200));
    assert_eq!(input_refused(&sc, "policy").await, 0.0);
    replace(&sc.policy_path(), BROKEN_POLICY);
    wait_reloads(&sc, "policy", "error", 1.0).await;
    let (serial, _) = leaf(&revoked.cert()).await;
    revoke(pki, &serial, &crl).await;
    (sc, good, revoked)
}

/// Finding 9, as reported: a CRL written while `policy.toml` has a typo; once the policy is
/// fixed the revoked client must be refused on a fresh full handshake. It used to be
/// accepted until a SIGHUP: the fix reloaded "the policy" only and kept the TLS
/// configuration built with the old CRL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_21_9_revocation_written_while_the_policy_is_broken_applies_once_it_is_fixed() {
    let pki = Pki::new("reload.test");
    let app = FakeApp::start().await;
    let (sc, good, revoked) = break_policy_then_revoke(&pki, &app).await;
    let addr = sc.inbound_addr();
    eventually(
        "an attempt with the new CRL",
        Duration::from_secs(15),
        async || {
            let seen = reloads(&sc, "crl", "ok").await + reloads(&sc, "crl", "error").await;
            (seen >= 1.0).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", sc.stderr_text()));

    replace(&sc.policy_path(), &good);
    wait_reloads(&sc, "policy", "ok", 1.0).await;
    let after = fresh_get(&revoked, addr).await;
    assert!(
        after.is_err(),
        "the revoked client was accepted on a fresh full handshake after the policy fix: {after:?}\n{}",
        sc.stderr_text()
    );
    assert!(revoked_handshakes(&sc).await >= 1.0);
}

/// Finding 9, the choice made: a broken policy does not hold back a valid CRL. The CRL is
/// applied at once with the serving policy kept, and the policy stays visibly refused
/// (metric, `/status`, log) until it is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_21_9_broken_policy_does_not_hold_back_a_new_crl_and_stays_visibly_refused() {
    let pki = Pki::new("reload.test");
    let app = FakeApp::start().await;
    let (sc, good, revoked) = break_policy_then_revoke(&pki, &app).await;
    let addr = sc.inbound_addr();
    let kept = pki.issue(OTHER_ID);
    wait_refused(
        &sc,
        &revoked,
        "the new CRL applied while the policy is broken",
    )
    .await;
    assert!(reloads(&sc, "crl", "ok").await >= 1.0);
    // The serving policy still decides; the broken one stays refused, visibly.
    assert_eq!(fresh_get(&kept, addr).await, Ok(200));
    assert_eq!(input_refused(&sc, "policy").await, 1.0);
    assert_eq!(refused_kinds(&sc).await, vec!["policy".to_owned()]);
    let s = status(&sc).await;
    let refusal = &s["reload"]["refused"][0];
    assert!(
        refusal["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("policy.toml"))
            && refusal["errors"].as_array().is_some_and(|e| !e.is_empty()),
        "{s:#}"
    );
    assert!(
        sc.stderr_text()
            .lines()
            .any(|l| l.contains("reload refused") && l.contains("applied=crl")),
        "{}",
        sc.stderr_text()
    );

    replace(&sc.policy_path(), &good);
    eventually("the refusal cleared", Duration::from_secs(15), async || {
        (input_refused(&sc, "policy").await == 0.0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", sc.stderr_text()));
    assert!(refused_kinds(&sc).await.is_empty());
    assert!(fresh_get(&revoked, addr).await.is_err());
}

/// Finding 12: `policy.toml` replaced by a FIFO is refused without blocking the reloader
/// (it used to wait forever for a writer), visibly, and a revocation written afterwards is
/// still applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_21_12_fifo_policy_is_refused_and_later_revocations_still_apply() {
    let pki = Pki::new("reload.test");
    let app = FakeApp::start().await;
    let (sc, crl) = crl_sidecar(&pki, &app).await;
    let revoked = pki.issue(CLIENT_ID);
    assert_eq!(fresh_get(&revoked, sc.inbound_addr()).await, Ok(200));

    replace_with_fifo(&sc.policy_path());
    wait_reloads(&sc, "policy", "error", 1.0).await;
    let policy = sc.policy_path().display().to_string();
    assert!(
        sc.stderr_text()
            .lines()
            .any(|l| l.contains("reload refused")
                && l.contains(&policy)
                && l.contains("not a regular file but a FIFO")),
        "{}",
        sc.stderr_text()
    );
    assert_eq!(input_refused(&sc, "policy").await, 1.0);
    assert_eq!(refused_kinds(&sc).await, vec!["policy".to_owned()]);

    let (serial, _) = leaf(&revoked.cert()).await;
    revoke(&pki, &serial, &crl).await;
    wait_refused(&sc, &revoked, "the revocation applied with a FIFO policy").await;
    assert_eq!(
        sc.metric("gatehouse_reload_stuck", &[]).await.expect("m"),
        0.0
    );
}

/// Finding 12: a link to `/dev/zero` (a device) and an oversized file are refused without
/// reading them: the sidecar's memory stays small (it used to read `/dev/zero` without end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_21_12_link_to_dev_zero_and_oversized_files_are_refused_without_reading() {
    let pki = Pki::new("reload.test");
    let app = FakeApp::start().await;
    let (sc, crl) = crl_sidecar(&pki, &app).await;
    let client = pki.issue(CLIENT_ID);

    replace_with_link(&sc.policy_path(), "/dev/zero");
    wait_reloads(&sc, "policy", "error", 1.0).await;
    sc.wait_stderr("not a regular file but a character device")
        .await;
    // 60 MiB (sparse) CRL: over the 16 MiB limit.
    let big = crl.with_extension("big");
    std::fs::File::create(&big)
        .and_then(|f| f.set_len(60 << 20))
        .expect("sparse file");
    std::fs::rename(&big, &crl).expect("rename");
    wait_reloads(&sc, "crl", "error", 1.0).await;
    sc.wait_stderr("more than the limit of 16777216 bytes")
        .await;
    assert_eq!(fresh_get(&client, sc.inbound_addr()).await, Ok(200));
    let peak = sc.peak_rss_kib().expect("VmHWM");
    println!("peak RSS with /dev/zero and a 60 MiB CRL refused: {peak} KiB");
    assert!(peak < 48 * 1024, "peak RSS {peak} KiB");
}

/// Finding 12 at startup: `sidecar check` and `sidecar run` refuse a FIFO or a device where a
/// file is configured (the config file too), naming it and saying what to do, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_21_12_startup_refuses_fifo_and_device_inputs_naming_them() {
    let pki = Pki::new("reload.test");
    let app = FakeApp::start().await;
    let crl = pki.fresh_dir("crl").join("crl.pem");
    write_crl(&pki, &crl).await;
    let server = pki.issue(SERVER_ID);
    let builder = Sidecar::inbound(&server, app.addr(), &policy("\"gateway\"")).crl(&crl);
    let config = builder.write();
    let policy_file = config.with_file_name("policy.toml");
    replace_with_fifo(&policy_file);
    replace_with_link(&crl, "/dev/zero");
    let config_fifo = config.with_file_name("fifo.toml");
    replace_with_fifo(&config_fifo);

    let cli = async |verb: &str, config: &Path| {
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::process::Command::new(binary("sidecar"))
                .args([verb, "--config"])
                .arg(config)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("`sidecar {verb}` hangs on {}", config.display()))
        .expect("run sidecar");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for verb in ["check", "run"] {
        let (code, stderr) = cli(verb, &config).await;
        assert_eq!(code, Some(2), "{stderr}");
        for needle in [
            format!("{}: not a regular file but a FIFO", policy_file.display()),
            "help: [inbound] policy must name a regular file".to_owned(),
            format!(
                "{}: not a regular file but a character device",
                crl.display()
            ),
            "help: [identity] crl must name a regular file".to_owned(),
        ] {
            assert!(
                stderr.contains(&needle),
                "`sidecar {verb}`: no {needle:?} in\n{stderr}"
            );
        }
        let (code, stderr) = cli(verb, &config_fifo).await;
        assert_eq!(code, Some(2), "{stderr}");
        assert!(
            stderr.contains("fifo.toml: not a regular file but a FIFO")
                && stderr.contains("help: --config must name a regular file"),
            "{stderr}"
        );
    }
}
