//! The sidecar's enrollment client (`gatehouse_proxy::identity`) against the real `ca serve`
//! binary on 127.0.0.1: join-token enrollment, renewal with a new key, two replicas of one ID,
//! a CA outage, revocation through the CRL poll, several CA endpoints, and no workload key on
//! disk. (Here rather than in `proxy/tests/` so it shares the `ca serve` launcher of the test
//! harness, `gatehouse_tests::harness::ca_serve`.)
//!
//! Needs `target/debug/ca`: run `cargo build --workspace --bins` first.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gatehouse_proxy::identity::{
    self, IdentityHandle, IdentityMetrics, Material, OnlineIdentityRaw, Tuning,
};
use gatehouse_tests::harness::{CaSandbox, CaServe};
use rustls_pki_types::pem::PemObject;
use tokio_util::sync::CancellationToken;

const TD: &str = "enroll.test";

fn serve(sb: &CaSandbox, listen: &str, svid_ttl: &str) -> CaServe {
    CaServe::start(sb, "ca", listen, &["--svid-ttl", svid_ttl]).expect("ca serve starts")
}

fn config(
    sb: &CaSandbox,
    addr: SocketAddr,
    name: &str,
    token: &Path,
    poll: &str,
) -> identity::OnlineIdentity {
    OnlineIdentityRaw {
        ca: format!("https://{addr}").into(),
        spiffe_id: format!("spiffe://{TD}/{name}"),
        ca_bundle: "bootstrap/bundle.pem".into(),
        join_token_file: Some(token.to_path_buf()),
        ca_poll: Some(poll.into()),
        ..OnlineIdentityRaw::default()
    }
    .validate(sb.root())
    .expect("valid identity config")
}

fn fast() -> Tuning {
    Tuning {
        backoff_min: Duration::from_millis(300),
        backoff_max: Duration::from_secs(2),
        ..Tuning::default()
    }
}

fn start(
    cfg: identity::OnlineIdentity,
    cancel: &CancellationToken,
) -> (IdentityHandle, IdentityMetrics) {
    let metrics =
        IdentityMetrics::register(&prometheus::Registry::new()).expect("register metrics");
    let handle = identity::spawn(
        cfg,
        gatehouse_proxy::identity::provider(),
        Some(metrics.clone()),
        fast(),
        cancel.clone(),
    );
    (handle, metrics)
}

/// Waits until `f` holds for the material (or panics after `limit`, naming `what`).
async fn wait_material(
    h: &IdentityHandle,
    limit: Duration,
    what: &str,
    f: impl Fn(&Material) -> bool,
) -> Arc<Material> {
    let mut rx = h.subscribe();
    let waited = tokio::time::timeout(limit, rx.wait_for(|m| m.as_deref().is_some_and(&f))).await;
    match waited {
        Ok(Ok(m)) => m.clone().expect("material"),
        _ => panic!("{what}: not within {limit:?}; status {:?}", h.status()),
    }
}

async fn wait_until(limit: Duration, what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spki(m: &Material) -> Vec<u8> {
    let (_, cert) = x509_parser::parse_x509_certificate(m.chain[0].as_ref()).expect("leaf");
    cert.public_key().raw.to_vec()
}

fn issued(sb: &CaSandbox, serial: &str) -> serde_json::Value {
    sb.inventory()
        .into_iter()
        .find(|e| e["serial"].as_str() == Some(serial))
        .unwrap_or_else(|| panic!("serial {serial} not in the inventory"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolls_with_a_join_token_then_renews_with_a_new_key_and_serial() {
    let sb = CaSandbox::new(TD, true);
    let ca = serve(&sb, "127.0.0.1:0", "9s");
    let token = sb.token("report-service", 1);
    let cancel = CancellationToken::new();
    let (h, metrics) = start(
        config(&sb, ca.addr(), "report-service", &token, "1s"),
        &cancel,
    );

    let first = tokio::time::timeout(Duration::from_secs(10), h.ready())
        .await
        .expect("enrolled within 10 s")
        .expect("driver running");
    assert_eq!(
        first.spiffe_id.to_string(),
        format!("spiffe://{TD}/report-service")
    );
    assert!(first.crl_pem.is_some(), "the CRLs come with the first SVID");
    assert_eq!(first.chain.len(), 2, "leaf + intermediate");
    let e = issued(&sb, &first.serial);
    assert_eq!(e["credential"], "join_token");
    let status = h.status();
    assert_eq!(status.serial.as_deref(), Some(first.serial.as_str()));
    assert!(status.next_renewal.is_some() && status.expires_in_seconds.is_some());

    // ~2/3 of 9 s: a renewal within a few seconds, new serial and new key.
    let second = wait_material(&h, Duration::from_secs(12), "renewal", |m| {
        m.serial != first.serial
    })
    .await;
    assert_ne!(spki(&first), spki(&second), "renewal must carry a new key");
    // The inventory records each certified key: SHA-256 of the SubjectPublicKeyInfo.
    for m in [&first, &second] {
        use sha2::Digest as _;
        assert_eq!(
            issued(&sb, &m.serial)["public_key_sha256"].as_str(),
            Some(hex::encode(sha2::Sha256::digest(spki(m))).as_str())
        );
    }
    let e = issued(&sb, &second.serial);
    assert_eq!(e["source"], "renew");
    assert_eq!(e["credential"], "svid");
    assert!(second.not_after > first.not_after);
    assert_eq!(metrics.renewals.with_label_values(&["ok"]).get(), 2);
    assert!(metrics.expiry_seconds.get() > 0);
    assert_eq!(h.status().serial.as_deref(), Some(second.serial.as_str()));
    // The key PEM the wiring can hand to the parse path matches the certificate.
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(second.key_pem().as_bytes())
        .expect("key pem");
    rustls::sign::CertifiedKey::from_der(
        second.chain.clone(),
        key,
        &gatehouse_proxy::identity::provider(),
    )
    .expect("key matches");

    let keys = sb.workload_keys_on_disk();
    assert!(keys.is_empty(), "workload keys on disk: {keys:?}");
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_of_one_id_get_different_keys_and_serials() {
    let sb = CaSandbox::new(TD, true);
    let ca = serve(&sb, "127.0.0.1:0", "1h");
    let token = sb.token("ledger", 2);
    let cancel = CancellationToken::new();
    let (a, _) = start(config(&sb, ca.addr(), "ledger", &token, "5s"), &cancel);
    let (b, _) = start(config(&sb, ca.addr(), "ledger", &token, "5s"), &cancel);
    let limit = Duration::from_secs(10);
    let ma = tokio::time::timeout(limit, a.ready())
        .await
        .expect("a enrolled")
        .expect("a");
    let mb = tokio::time::timeout(limit, b.ready())
        .await
        .expect("b enrolled")
        .expect("b");
    assert_eq!(ma.spiffe_id, mb.spiffe_id);
    assert_ne!(ma.serial, mb.serial);
    assert_ne!(spki(&ma), spki(&mb));
    assert_eq!(
        issued(&sb, &ma.serial)["spiffe_id"],
        issued(&sb, &mb.serial)["spiffe_id"]
    );
    // The inventory shows the two keys too (SHA-256 of each certified public key).
    let (ka, kb) = (
        issued(&sb, &ma.serial)["public_key_sha256"].clone(),
        issued(&sb, &mb.serial)["public_key_sha256"].clone(),
    );
    assert!(ka.is_string() && kb.is_string(), "{ka} {kb}");
    assert_ne!(ka, kb, "two replicas, two keys");
    let keys = sb.workload_keys_on_disk();
    assert!(keys.is_empty(), "workload keys on disk: {keys:?}");
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_outage_keeps_the_current_svid_and_renewal_resumes_when_it_returns() {
    let sb = CaSandbox::new(TD, true);
    let mut ca = serve(&sb, "127.0.0.1:0", "15s");
    let addr = ca.addr();
    let token = sb.token("monolith", 1);
    let cancel = CancellationToken::new();
    let (h, metrics) = start(config(&sb, addr, "monolith", &token, "1s"), &cancel);
    let first = tokio::time::timeout(Duration::from_secs(10), h.ready())
        .await
        .expect("enrolled")
        .expect("driver");
    drop(ca);

    // Renewal is due at ~10 s; with the CA down it fails and is retried with back-off while
    // the first SVID stays in place.
    wait_until(Duration::from_secs(13), "two failed renewals", || {
        metrics.renewals.with_label_values(&["error"]).get() >= 2
    })
    .await;
    let status = h.status();
    assert_eq!(
        h.current().expect("held").serial,
        first.serial,
        "the current SVID is kept"
    );
    assert!(status.failures_in_a_row >= 2, "{status:?}");
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("cannot reach the CA")),
        "{status:?}"
    );
    assert!(
        status.expires_in_seconds.is_some_and(|s| s > 0),
        "{status:?}"
    );

    ca = serve(&sb, &addr.to_string(), "15s");
    let renewed = wait_material(
        &h,
        Duration::from_secs(5),
        "renewal after the outage",
        |m| m.serial != first.serial,
    )
    .await;
    assert_eq!(issued(&sb, &renewed.serial)["source"], "renew");
    assert_ne!(spki(&first), spki(&renewed));
    assert_eq!(h.status().failures_in_a_row, 0);
    assert!(h.status().last_error.is_none());
    drop(ca);
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_the_client_through_the_crl_poll() {
    let sb = CaSandbox::new(TD, true);
    let ca = serve(&sb, "127.0.0.1:0", "1h");
    let token = sb.token("api-gateway", 1);
    let cancel = CancellationToken::new();
    let (h, _) = start(config(&sb, ca.addr(), "api-gateway", &token, "1s"), &cancel);
    let m = tokio::time::timeout(Duration::from_secs(10), h.ready())
        .await
        .expect("enrolled")
        .expect("driver");
    let listed = |m: &Material, serial: &str| {
        let pem = m.crl_pem.as_deref().unwrap_or_default();
        rustls_pki_types::CertificateRevocationListDer::pem_slice_iter(pem.as_bytes()).any(|c| {
            let c = c.expect("crl pem");
            let (_, crl) = x509_parser::parse_x509_crl(c.as_ref()).expect("crl der");
            crl.iter_revoked_certificates()
                .any(|r| hex::encode(r.raw_serial()) == serial)
        })
    };
    assert!(!listed(&m, &m.serial));
    let serial = m.serial.clone();
    let t0 = Instant::now();
    sb.revoke(&serial);
    let after = wait_material(
        &h,
        Duration::from_secs(10),
        "the revocation in the CRLs",
        |n| listed(n, &serial),
    )
    .await;
    let took = t0.elapsed();
    assert_eq!(after.serial, serial, "the CRL update keeps the SVID");
    assert!(took < Duration::from_secs(10), "{took:?}");
    eprintln!("revocation reached the client after {took:?}");
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_certificate_enrolls_and_enrolls_again_after_the_svid_expired() {
    let sb = CaSandbox::new(TD, true);
    let id = format!("spiffe://{TD}/reports-db");
    sb.ca(&[
        "enrollment",
        "issue",
        "--dir",
        "ca",
        "--spiffe-id",
        &id,
        "--out",
        "bootstrap/enroll",
    ]);
    let ca = serve(&sb, "127.0.0.1:0", "4s");
    let addr = ca.addr();
    let cfg = OnlineIdentityRaw {
        ca: format!("https://{addr}").into(),
        spiffe_id: id.clone(),
        ca_bundle: "bootstrap/bundle.pem".into(),
        enrollment_cert: Some("bootstrap/enroll/cert.pem".into()),
        enrollment_key: Some("bootstrap/enroll/key.pem".into()),
        ca_poll: Some("1s".into()),
        ..OnlineIdentityRaw::default()
    }
    .validate(sb.root())
    .expect("valid");
    let cancel = CancellationToken::new();
    let (h, _) = start(cfg, &cancel);
    let first = wait_material(&h, Duration::from_secs(10), "enrollment", |_| true).await;
    assert_eq!(first.spiffe_id.to_string(), id);
    assert_eq!(
        issued(&sb, &first.serial)["credential"],
        "enrollment_certificate"
    );

    // The CA is away for longer than the SVID lives: renewal cannot happen, the SVID expires.
    drop(ca);
    wait_until(Duration::from_secs(10), "the SVID expired", || {
        first.expires_in() == Duration::ZERO
    })
    .await;
    assert_eq!(h.current().expect("held").serial, first.serial);
    let ca = serve(&sb, &addr.to_string(), "4s");
    // An expired SVID cannot renew; the enrollment certificate enrolls again.
    let again = wait_material(&h, Duration::from_secs(8), "enrollment after expiry", |m| {
        m.serial != first.serial
    })
    .await;
    let e = issued(&sb, &again.serial);
    assert_eq!(e["source"], "enroll");
    assert_eq!(e["credential"], "enrollment_certificate");
    // Only the bootstrap credential (the enrollment key, as `ca enrollment issue` wrote it) is
    // on disk, no SVID key.
    let keys: Vec<PathBuf> = sb
        .workload_keys_on_disk()
        .into_iter()
        .filter(|p| !p.starts_with(sb.path("bootstrap/enroll")))
        .collect();
    assert!(keys.is_empty(), "{keys:?}");
    drop(ca);
    cancel.cancel();
}

/// `ca = [ … ]`: a dead replica and one whose certificate does not chain to our anchors (another
/// CA, same trust domain name) are skipped within the same call, and the next replica answers;
/// a list of only those fails with the TLS error (the CA SVID check holds at every endpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_foreign_ca_endpoint_is_skipped_for_the_next_in_the_same_call() {
    let sb = CaSandbox::new(TD, true);
    let ca = serve(&sb, "127.0.0.1:0", "1h");
    // Another CA with the same trust domain name, in its own sandbox: its SVID
    // `spiffe://enroll.test/gatehouse/ca` does not chain to our bundle.
    let foreign_sb = CaSandbox::new(TD, true);
    let foreign = serve(&foreign_sb, "127.0.0.1:0", "1h");
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let token = sb.token("reports", 1);
    let cfg = |urls: Vec<String>| {
        OnlineIdentityRaw {
            ca: identity::config::CaUrls::Many(urls),
            spiffe_id: format!("spiffe://{TD}/reports"),
            ca_bundle: "bootstrap/bundle.pem".into(),
            join_token_file: Some(token.clone()),
            ca_poll: Some("5s".into()),
            ..OnlineIdentityRaw::default()
        }
        .validate(sb.root())
        .expect("valid")
    };
    let url = |a: SocketAddr| format!("https://{a}");

    // Only the foreign CA and the dead one: no SVID, the error names both failures.
    let cancel = CancellationToken::new();
    let (h, metrics) = start(cfg(vec![url(foreign.addr()), url(dead)]), &cancel);
    wait_until(Duration::from_secs(10), "a failed round", || {
        metrics.renewals.with_label_values(&["error"]).get() >= 1
    })
    .await;
    assert!(h.current().is_none());
    let err = h.status().last_error.expect("an error");
    assert!(
        err.contains("TLS handshake") && err.contains("connect to"),
        "{err}"
    );
    cancel.cancel();

    // With the real CA last: enrolled in one round, no failed attempt counted, and /status
    // names the endpoint that answered.
    let cancel = CancellationToken::new();
    let (h, metrics) = start(
        cfg(vec![url(dead), url(foreign.addr()), url(ca.addr())]),
        &cancel,
    );
    let m = tokio::time::timeout(Duration::from_secs(10), h.ready())
        .await
        .expect("enrolled")
        .expect("driver");
    assert_eq!(m.spiffe_id.to_string(), format!("spiffe://{TD}/reports"));
    assert_eq!(metrics.renewals.with_label_values(&["error"]).get(), 0);
    assert_eq!(h.status().ca_endpoint, Some(url(ca.addr())));
    assert_eq!(issued(&sb, &m.serial)["source"], "enroll");
    cancel.cancel();
}
