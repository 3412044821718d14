//! `ca serve` and `ca token create`, end to end: the real `ca` binary on 127.0.0.1 (port 0),
//! real TLS 1.3 (rustls client trusting bundle.pem, the server's SVID carrying `--dns
//! localhost`), CSRs made here with keys that never leave the test's memory.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use common::Sandbox;
use common::https::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use rustls::pki_types::ServerName;
use serde_json::json;

const TD: &str = "spiffe://serve.test";

fn init(sb: &Sandbox) {
    sb.ok(&["init", "--dir", "ca", "--trust-domain", "serve.test"]);
}

fn inventory(sb: &Sandbox) -> Vec<serde_json::Value> {
    std::fs::read_to_string(sb.path("ca/inventory.jsonl"))
        .expect("inventory")
        .lines()
        .map(|l| serde_json::from_str(l).expect("line"))
        .collect()
}

fn enrolled_rows(sb: &Sandbox) -> usize {
    inventory(sb)
        .iter()
        .filter(|r| r["source"] == "enroll")
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn token_enrollment_issues_the_tokens_identity_once() {
    let sb = Sandbox::new();
    init(&sb);
    let id = format!("{TD}/payments");
    let t = token(&sb, &id, &[]);
    assert!(
        !std::fs::read_to_string(sb.path("ca/tokens.json"))
            .expect("tokens")
            .contains(&t)
    );
    let srv = serve(&sb, &[]);

    // A CSR asking for another identity, CA:TRUE and extra SANs: only its key is used.
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["evil.example".to_owned()]).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .subject_alt_names
        .push(SanType::URI(format!("{TD}/admin").try_into().expect("uri")));
    let evil = params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    let (s, b) = enroll(&sb, srv.addr, &t, &evil).await;
    let r = ok_cert(s, &b);
    assert_eq!(r.spiffe_id, id);
    let i = verified(&r);
    assert_eq!(i.spiffe_id.as_deref(), Some(id.as_str()));
    assert_eq!(i.uri_sans, vec![id.clone()]);
    assert!(i.dns.is_empty() && !i.is_ca, "{i:?}");
    let left = i.seconds_left;
    assert!(
        (3500..=3600).contains(&left),
        "default lifetime 1h, {left}s left"
    );
    let row = inventory(&sb)
        .into_iter()
        .find(|row| row["serial"] == r.serial)
        .expect("row");
    assert_eq!(row["source"], "enroll");
    assert_eq!(row["credential"], "join_token");
    assert!(
        row["peer"]
            .as_str()
            .expect("peer")
            .starts_with("127.0.0.1:")
    );

    // Reused single-use token: refused, nothing issued.
    let (s, b) = enroll(&sb, srv.addr, &t, &csr(&KeyPair::generate().expect("key"))).await;
    let e = err(s, &b, 403, "token_used");
    assert!(
        e.message.contains("ca token create") || e.message.contains("new one"),
        "{e:?}"
    );
    // Unknown token.
    let (s, b) = enroll(&sb, srv.addr, "gh1_00", &csr(&key)).await;
    err(s, &b, 401, "token_unknown");
    // Garbage CSR with a valid token: refused, and the token is not spent.
    let t2 = token(&sb, &id, &[]);
    let (s, b) = enroll(&sb, srv.addr, &t2, "not a csr").await;
    err(s, &b, 400, "bad_csr");
    let (s, b) = enroll(&sb, srv.addr, &t2, &csr(&KeyPair::generate().expect("key"))).await;
    ok_cert(s, &b);
    assert_eq!(enrolled_rows(&sb), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_token_is_refused() {
    let sb = Sandbox::new();
    init(&sb);
    let t = token(&sb, &format!("{TD}/late"), &["--ttl", "1s"]);
    let srv = serve(&sb, &[]);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (s, b) = enroll(&sb, srv.addr, &t, &csr(&KeyPair::generate().expect("key"))).await;
    let e = err(s, &b, 401, "token_expired");
    assert!(e.message.contains("new join token"), "{e:?}");
    assert_eq!(enrolled_rows(&sb), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn renew_needs_current_svid_and_new_key() {
    let sb = Sandbox::new();
    init(&sb);
    let id = format!("{TD}/reports");
    let t = token(&sb, &id, &[]);
    let srv = serve(&sb, &["--svid-ttl", "30s"]);
    let key = KeyPair::generate().expect("key");
    let (s, b) = enroll(&sb, srv.addr, &t, &csr(&key)).await;
    let first = ok_cert(s, &b);
    assert!(verified(&first).seconds_left <= 30);

    // Without a client certificate.
    let body = json!({"csr": csr(&KeyPair::generate().expect("key"))});
    let (s, b) = call(&sb, srv.addr, None, "POST", "/v1/renew", Some(body.clone())).await;
    err(s, &b, 401, "no_client_certificate");
    // Same key as the current certificate.
    let (s, b) = renew(&sb, srv.addr, &first.cert_chain, &key, &key).await;
    err(s, &b, 400, "same_key");
    // A new key: same identity, new serial.
    let key2 = KeyPair::generate().expect("key");
    let (s, b) = renew(&sb, srv.addr, &first.cert_chain, &key, &key2).await;
    let second = ok_cert(s, &b);
    assert_eq!(second.spiffe_id, id);
    assert_ne!(second.serial, first.serial);
    verified(&second);
    let rows = inventory(&sb);
    let row = rows
        .iter()
        .find(|r| r["serial"] == second.serial)
        .expect("row");
    assert_eq!(row["source"], "renew");
    assert_eq!(row["credential"], "svid");

    // Revoked after the server started: refused by the lock-side check.
    sb.ok(&["revoke", "--dir", "ca", "--serial", &second.serial]);
    let key3 = KeyPair::generate().expect("key");
    let (s, b) = renew(&sb, srv.addr, &second.cert_chain, &key2, &key3).await;
    err(s, &b, 403, "revoked");
    assert_eq!(
        inventory(&sb)
            .iter()
            .filter(|r| r["source"] == "renew")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn renew_with_expired_svid_is_refused() {
    let sb = Sandbox::new();
    init(&sb);
    let t = token(&sb, &format!("{TD}/short"), &[]);
    let srv = serve(&sb, &["--svid-ttl", "2s"]);
    let key = KeyPair::generate().expect("key");
    let (s, b) = enroll(&sb, srv.addr, &t, &csr(&key)).await;
    let first = ok_cert(s, &b);
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    // webpki refuses the expired client certificate in the handshake (TLS 1.3: the alert shows
    // up on the first read); if it got through, the handler must refuse it. Nothing is issued.
    let body = json!({"csr": csr(&KeyPair::generate().expect("key"))});
    match try_call(
        &sb,
        srv.addr,
        Some((&first.cert_chain, &key)),
        "POST",
        "/v1/renew",
        Some(body),
    )
    .await
    {
        Ok((s, b)) => {
            err(s, &b, 403, "expired");
        }
        Err(e) => assert!(e.contains("xpired"), "{e}"),
    }
    assert_eq!(
        inventory(&sb)
            .iter()
            .filter(|r| r["source"] == "renew")
            .count(),
        0
    );
}

/// Every file under `dir` that holds a PEM private key, except the CA's own keys (`*.key`).
fn private_keys_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_none_or(|x| x != "key")
                && std::fs::read(&p)
                    .is_ok_and(|b| String::from_utf8_lossy(&b).contains("PRIVATE KEY"))
            {
                found.push(p);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_enrollments_get_distinct_serials_and_no_key_on_disk() {
    let sb = Sandbox::new();
    init(&sb);
    let id = format!("{TD}/fleet");
    // One token with exactly 50 uses: the 51st enrollment must be refused.
    let t = token(&sb, &id, &["--uses", "50"]);
    let srv = serve(&sb, &[]);
    let sb = Arc::new(sb);
    let tasks: Vec<_> = (0..51)
        .map(|_| {
            let (sb, t) = (Arc::clone(&sb), t.clone());
            let addr = srv.addr;
            tokio::spawn(async move {
                let key = KeyPair::generate().expect("key");
                enroll(&sb, addr, &t, &csr(&key)).await
            })
        })
        .collect();
    let mut serials = std::collections::HashSet::new();
    let mut refused = 0;
    for task in tasks {
        let (s, b) = task.await.expect("task");
        if s == 200 {
            let r = ok_cert(s, &b);
            assert_eq!(r.spiffe_id, id);
            assert!(serials.insert(r.serial), "duplicate serial");
        } else {
            err(s, &b, 403, "token_used");
            refused += 1;
        }
    }
    assert_eq!((serials.len(), refused), (50, 1));
    let rows = inventory(&sb);
    let enrolled: std::collections::HashSet<_> = rows
        .iter()
        .filter(|r| r["source"] == "enroll")
        .map(|r| r["serial"].as_str().expect("serial").to_owned())
        .collect();
    assert_eq!(enrolled, serials.iter().cloned().collect());
    assert_eq!(enrolled_rows(&sb), 50);
    // Workload keys live in the clients' memory; the server's own key too.
    let keys = private_keys_under(sb.tmp.path());
    assert!(keys.is_empty(), "private keys written: {keys:?}");
    drop(srv);
}

#[tokio::test(flavor = "multi_thread")]
async fn bundle_and_crl_with_etags() {
    let sb = Sandbox::new();
    init(&sb);
    let t = token(&sb, &format!("{TD}/crl"), &[]);
    let srv = serve(&sb, &[]);
    let bundle = std::fs::read_to_string(sb.path("ca/bundle.pem")).expect("bundle");
    let (s, b) = call(&sb, srv.addr, None, "GET", "/v1/bundle", None).await;
    assert_eq!((s, b.as_ref()), (200, bundle.as_bytes()));

    let (s, crl1) = call(&sb, srv.addr, None, "GET", "/v1/crl", None).await;
    assert_eq!(s, 200);
    assert!(String::from_utf8_lossy(&crl1).contains("BEGIN X509 CRL"));
    let etag = etag_of(&sb, srv.addr, "/v1/crl").await;
    let (s, b) = call_if_none_match(&sb, srv.addr, "/v1/crl", &etag).await;
    assert_eq!((s, b.len()), (304, 0));

    // A revocation changes the CRL (and its ETag).
    let (s, b) = enroll(&sb, srv.addr, &t, &csr(&KeyPair::generate().expect("key"))).await;
    let r = ok_cert(s, &b);
    sb.ok(&["revoke", "--dir", "ca", "--serial", &r.serial]);
    let (s, _) = call_if_none_match(&sb, srv.addr, "/v1/crl", &etag).await;
    assert_eq!(s, 200);
    assert_ne!(etag_of(&sb, srv.addr, "/v1/crl").await, etag);

    // Wrong method, unknown path, oversized and malformed bodies: 4xx JSON, nothing issued.
    let (s, b) = call(&sb, srv.addr, None, "GET", "/v1/enroll", None).await;
    err(s, &b, 405, "method_not_allowed");
    let (s, b) = call(&sb, srv.addr, None, "GET", "/v2/enroll", None).await;
    err(s, &b, 404, "not_found");
    let big = json!({"csr": "x".repeat(100_000), "token": t});
    // The server answers 413 from the declared length without reading the body; a client still
    // writing it may see the connection close first (broken pipe) instead of the answer.
    match try_call(&sb, srv.addr, None, "POST", "/v1/enroll", Some(big)).await {
        Ok((s, b)) => {
            err(s, &b, 413, "body_too_large");
        }
        Err(e) => assert!(e.contains("BodyWrite"), "{e}"),
    }
    let (s, b) = call(
        &sb,
        srv.addr,
        None,
        "POST",
        "/v1/enroll",
        Some(json!({"csr": 1})),
    )
    .await;
    err(s, &b, 400, "bad_json");
    assert_eq!(enrolled_rows(&sb), 1);
}

async fn etag_of(sb: &Sandbox, addr: SocketAddr, path: &str) -> String {
    let (_, _, etag) = get_with(sb, addr, path, None).await;
    etag.expect("etag")
}

async fn call_if_none_match(
    sb: &Sandbox,
    addr: SocketAddr,
    path: &str,
    etag: &str,
) -> (u16, Bytes) {
    let (s, b, _) = get_with(sb, addr, path, Some(etag)).await;
    (s, b)
}

/// A GET over HTTP/2 (ALPN h2), returning status, body and ETag.
async fn get_with(
    sb: &Sandbox,
    addr: SocketAddr,
    path: &str,
    if_none_match: Option<&str>,
) -> (u16, Bytes, Option<String>) {
    let mut config = client_builder(sb).with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let mut req = http::Request::builder().uri(format!("https://localhost{path}"));
    if let Some(e) = if_none_match {
        req = req.header("if-none-match", e);
    }
    let resp = send
        .send_request(req.body(Full::new(Bytes::new())).expect("req"))
        .await
        .expect("response");
    let status = resp.status().as_u16();
    let etag = resp
        .headers()
        .get("etag")
        .map(|v| v.to_str().expect("ascii").to_owned());
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, body, etag)
}

#[tokio::test(flavor = "multi_thread")]
async fn enrollment_certificate_enrolls_as_its_bound_id_only() {
    let sb = Sandbox::new();
    init(&sb);
    let id = format!("{TD}/ecs-task");
    let out: serde_json::Value = serde_json::from_str(&sb.ok(&[
        "--format",
        "json",
        "enrollment",
        "issue",
        "--dir",
        "ca",
        "--spiffe-id",
        &id,
        "--out",
        "enroll",
    ]))
    .expect("json");
    assert_eq!(
        out["enrollment_id"],
        format!("{TD}/gatehouse/enroll/ecs-task")
    );
    let enroll_serial = out["serial"].as_str().expect("serial").to_owned();
    let chain = std::fs::read_to_string(sb.path("enroll/cert.pem")).expect("cert");
    let key = KeyPair::from_pem(&std::fs::read_to_string(sb.path("enroll/key.pem")).expect("key"))
        .expect("key pem");
    let srv = serve(&sb, &[]);

    // No token, no certificate: told what to send.
    let body = json!({"csr": csr(&KeyPair::generate().expect("key"))});
    let (s, b) = call(
        &sb,
        srv.addr,
        None,
        "POST",
        "/v1/enroll",
        Some(body.clone()),
    )
    .await;
    err(s, &b, 401, "no_credential");
    // The enrollment certificate as the client certificate, `{"csr"}` alone.
    let (s, b) = call(
        &sb,
        srv.addr,
        Some((&chain, &key)),
        "POST",
        "/v1/enroll",
        Some(body),
    )
    .await;
    let r = ok_cert(s, &b);
    assert_eq!(r.spiffe_id, id);
    assert_eq!(verified(&r).spiffe_id.as_deref(), Some(id.as_str()));
    let rows = inventory(&sb);
    let row = rows
        .iter()
        .find(|row| row["serial"] == r.serial)
        .expect("row");
    assert_eq!(row["credential"], "enrollment_certificate");
    // It does not renew, and an SVID does not enroll.
    let new_key = KeyPair::generate().expect("key");
    let (s, b) = renew(&sb, srv.addr, &chain, &key, &new_key).await;
    err(s, &b, 403, "enrollment_certificate");
    let body = json!({"csr": csr(&new_key)});
    let svid_key = KeyPair::generate().expect("key");
    let t = token(&sb, &format!("{TD}/other"), &[]);
    let (s, b) = enroll(&sb, srv.addr, &t, &csr(&svid_key)).await;
    let svid = ok_cert(s, &b);
    let (s, b) = call(
        &sb,
        srv.addr,
        Some((&svid.cert_chain, &svid_key)),
        "POST",
        "/v1/enroll",
        Some(body.clone()),
    )
    .await;
    err(s, &b, 403, "not_an_enrollment_certificate");
    // Revoked: refused, nothing issued.
    sb.ok(&["revoke", "--dir", "ca", "--serial", &enroll_serial]);
    let (s, b) = call(
        &sb,
        srv.addr,
        Some((&chain, &key)),
        "POST",
        "/v1/enroll",
        Some(body),
    )
    .await;
    err(s, &b, 403, "revoked");
    assert_eq!(enrolled_rows(&sb), 2);
}

// Kubernetes projected service-account tokens (`--k8s-jwks`): real JWTs signed here with
// `jsonwebtoken`, keys generated in the test, the public halves in a JWKS file.

const K8S_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A signing key (ES256 or RS256) and its public JWK under `kid`.
fn k8s_key(
    kid: &str,
    alg: jsonwebtoken::Algorithm,
) -> (jsonwebtoken::EncodingKey, serde_json::Value) {
    use jsonwebtoken::{Algorithm, EncodingKey, jwk::Jwk};
    let enc = match alg {
        Algorithm::RS256 => {
            let k = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("rsa key");
            // jsonwebtoken signs with a PKCS#1 key: the OCTET STRING inside rcgen's PKCS#8.
            let pkcs8 = k.serialize_der();
            let (_, info) = x509_parser::der_parser::parse_der(&pkcs8).expect("pkcs8");
            let seq = info.as_sequence().expect("PrivateKeyInfo");
            EncodingKey::from_rsa_der(seq[2].as_slice().expect("privateKey"))
        }
        _ => EncodingKey::from_ec_der(&KeyPair::generate().expect("ec key").serialize_der()),
    };
    let mut jwk = Jwk::from_encoding_key(&enc, alg).expect("jwk");
    jwk.common.key_id = Some(kid.to_owned());
    (enc, serde_json::to_value(jwk).expect("jwk json"))
}

fn write_jwks(sb: &Sandbox, keys: &[&serde_json::Value]) {
    std::fs::write(sb.path("jwks.json"), json!({ "keys": keys }).to_string()).expect("jwks");
}

fn serve_k8s(sb: &Sandbox) -> Server {
    serve(sb, &["--k8s-jwks", "jwks.json", "--k8s-issuer", K8S_ISSUER])
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// The claims of a projected token for `ns`/`sa`, expiring `exp_in` seconds from now.
fn sa_claims(iss: &str, aud: &str, exp_in: i64, ns: &str, sa: &str) -> serde_json::Value {
    let now = unix_now();
    json!({
        "iss": iss, "aud": [aud], "iat": now - 60, "nbf": now - 60, "exp": now + exp_in,
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "kubernetes.io": {
            "namespace": ns,
            "pod": {"name": "p-1", "uid": "6f1c"},
            "serviceaccount": {"name": sa, "uid": "9e2d"},
        },
    })
}

fn sign_jwt(
    key: &jsonwebtoken::EncodingKey,
    alg: jsonwebtoken::Algorithm,
    kid: &str,
    claims: &serde_json::Value,
) -> String {
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, key).expect("sign jwt")
}

async fn enroll_jwt(sb: &Sandbox, addr: SocketAddr, jwt: &str) -> (u16, Bytes) {
    let auth = format!("Bearer {jwt}");
    try_call_with(
        sb,
        addr,
        None,
        ("POST", "/v1/enroll", &[("authorization", auth.as_str())]),
        Some(json!({"csr": csr(&KeyPair::generate().expect("key"))})),
    )
    .await
    .expect("request")
}

#[tokio::test(flavor = "multi_thread")]
async fn k8s_service_account_token_enrolls_as_its_namespace_and_account() {
    use jsonwebtoken::Algorithm::{ES256, RS256};
    let sb = Sandbox::new();
    init(&sb);
    let (ec, ec_jwk) = k8s_key("ec-1", ES256);
    let (rsa, rsa_jwk) = k8s_key("rsa-1", RS256);
    write_jwks(&sb, &[&ec_jwk, &rsa_jwk]);
    let srv = serve_k8s(&sb);

    let claims = sa_claims(K8S_ISSUER, "gatehouse", 600, "payments", "report-service");
    let (s, b) = enroll_jwt(&sb, srv.addr, &sign_jwt(&ec, ES256, "ec-1", &claims)).await;
    let r = ok_cert(s, &b);
    assert_eq!(r.spiffe_id, format!("{TD}/ns/payments/sa/report-service"));
    let i = verified(&r);
    assert_eq!(
        i.uri_sans,
        vec![format!("{TD}/ns/payments/sa/report-service")]
    );

    // RS256 (the Kubernetes default), and `sub` alone when there is no `kubernetes.io` claim.
    let mut claims = sa_claims(K8S_ISSUER, "gatehouse", 600, "ledger", "monolith");
    claims
        .as_object_mut()
        .expect("object")
        .remove("kubernetes.io");
    let (s, b) = enroll_jwt(&sb, srv.addr, &sign_jwt(&rsa, RS256, "rsa-1", &claims)).await;
    assert_eq!(
        ok_cert(s, &b).spiffe_id,
        format!("{TD}/ns/ledger/sa/monolith")
    );

    // Within the documented 30 s leeway an `exp` just passed is still accepted.
    let claims = sa_claims(K8S_ISSUER, "gatehouse", -10, "payments", "report-service");
    let (s, b) = enroll_jwt(&sb, srv.addr, &sign_jwt(&ec, ES256, "ec-1", &claims)).await;
    ok_cert(s, &b);

    let rows: Vec<_> = inventory(&sb)
        .into_iter()
        .filter(|r| r["source"] == "enroll")
        .collect();
    assert_eq!(rows.len(), 3, "{rows:?}");
    for row in &rows {
        assert_eq!(row["credential"], "k8s_service_account", "{row}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn k8s_token_with_wrong_audience_issuer_signature_or_expiry_is_refused() {
    use jsonwebtoken::Algorithm::ES256;
    let sb = Sandbox::new();
    init(&sb);
    let (good, jwk) = k8s_key("sa-key", ES256);
    let (forged, _) = k8s_key("sa-key", ES256);
    write_jwks(&sb, &[&jwk]);
    let srv = serve_k8s(&sb);
    let claims = |iss: &str, aud: &str, exp_in: i64, ns: &str| {
        sa_claims(iss, aud, exp_in, ns, "report-service")
    };
    let cases = [
        (
            sign_jwt(
                &good,
                ES256,
                "sa-key",
                &claims(K8S_ISSUER, "vault", 600, "payments"),
            ),
            "jwt_audience",
            "audience",
        ),
        (
            sign_jwt(
                &good,
                ES256,
                "sa-key",
                &claims("https://other.cluster", "gatehouse", 600, "payments"),
            ),
            "jwt_issuer",
            "--k8s-issuer",
        ),
        (
            sign_jwt(
                &forged,
                ES256,
                "sa-key",
                &claims(K8S_ISSUER, "gatehouse", 600, "payments"),
            ),
            "jwt_signature",
            "--k8s-jwks",
        ),
        (
            sign_jwt(
                &good,
                ES256,
                "other-kid",
                &claims(K8S_ISSUER, "gatehouse", 600, "payments"),
            ),
            "jwt_signature",
            "other-kid",
        ),
        (
            sign_jwt(
                &good,
                ES256,
                "sa-key",
                &claims(K8S_ISSUER, "gatehouse", -120, "payments"),
            ),
            "jwt_expired",
            "projected token",
        ),
        (
            sign_jwt(
                &good,
                ES256,
                "sa-key",
                &claims(K8S_ISSUER, "gatehouse", 600, "pay/ments"),
            ),
            "jwt_malformed",
            "path segment",
        ),
        ("not.a.jwt".to_owned(), "jwt_malformed", "Bearer"),
    ];
    for (jwt, code, hint) in &cases {
        let (s, b) = enroll_jwt(&sb, srv.addr, jwt).await;
        let e = err(s, &b, 401, code);
        assert!(e.message.contains(hint), "{code}: {e:?}");
    }
    assert_eq!(enrolled_rows(&sb), 0);

    // A bearer token to a CA started without --k8s-jwks is refused too.
    drop(srv);
    let plain = serve(&sb, &[]);
    let ok_claims = claims(K8S_ISSUER, "gatehouse", 600, "payments");
    let (s, b) = enroll_jwt(
        &sb,
        plain.addr,
        &sign_jwt(&good, ES256, "sa-key", &ok_claims),
    )
    .await;
    err(s, &b, 401, "k8s_not_configured");
    assert_eq!(enrolled_rows(&sb), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn k8s_map_table_decides_the_identity_and_refuses_unlisted_accounts() {
    use jsonwebtoken::Algorithm::ES256;
    let sb = Sandbox::new();
    init(&sb);
    let (key, jwk) = k8s_key("sa-key", ES256);
    write_jwks(&sb, &[&jwk]);
    let k8s = ["--k8s-jwks", "jwks.json", "--k8s-issuer", K8S_ISSUER];

    // An ID outside the CA's trust domain stops `ca serve` at start, naming the entry.
    std::fs::write(
        sb.path("foreign.toml"),
        "\"payments/report-service\" = \"spiffe://other.test/report-service\"\n",
    )
    .expect("map");
    let out = sb.ca(&[
        &["serve", "--dir", "ca", "--listen", "127.0.0.1:0"][..],
        &k8s,
        &["--k8s-map", "foreign.toml"],
    ]
    .concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("payments/report-service") && stderr.contains("trust domain"),
        "{stderr}"
    );

    std::fs::write(
        sb.path("map.toml"),
        format!("\"payments/report-service\" = \"{TD}/report-service\"\n"),
    )
    .expect("map");
    let srv = serve(&sb, &[&k8s[..], &["--k8s-map", "map.toml"]].concat());
    let listed = sa_claims(K8S_ISSUER, "gatehouse", 600, "payments", "report-service");
    let (s, b) = enroll_jwt(&sb, srv.addr, &sign_jwt(&key, ES256, "sa-key", &listed)).await;
    assert_eq!(ok_cert(s, &b).spiffe_id, format!("{TD}/report-service"));

    let unlisted = sa_claims(K8S_ISSUER, "gatehouse", 600, "ledger", "monolith");
    let (s, b) = enroll_jwt(&sb, srv.addr, &sign_jwt(&key, ES256, "sa-key", &unlisted)).await;
    let e = err(s, &b, 403, "k8s_unmapped");
    assert!(e.message.contains("ledger/monolith"), "{e:?}");
    assert_eq!(enrolled_rows(&sb), 1);
}

/// Regression: with `--intermediate`, webpki applies the enroll-only EKU rule to the
/// intermediate too, which has no EKU extension; `KeyUsage::required` refused every enrollment
/// certificate in the handshake (alert `unsupported_certificate`).
#[tokio::test]
async fn enrollment_certificate_works_under_an_intermediate_ca() {
    let sb = Sandbox::new();
    sb.ok(&[
        "init",
        "--dir",
        "ca",
        "--trust-domain",
        "serve.test",
        "--intermediate",
    ]);
    let id = format!("{TD}/ecs-task");
    sb.ok(&[
        "enrollment",
        "issue",
        "--dir",
        "ca",
        "--spiffe-id",
        &id,
        "--out",
        "enroll",
    ]);
    let chain = std::fs::read_to_string(sb.path("enroll/cert.pem")).expect("cert");
    let key = KeyPair::from_pem(&std::fs::read_to_string(sb.path("enroll/key.pem")).expect("key"))
        .expect("key pem");
    let srv = serve(&sb, &[]);
    let body = json!({"csr": csr(&KeyPair::generate().expect("key"))});
    let (s, b) = call(
        &sb,
        srv.addr,
        Some((&chain, &key)),
        "POST",
        "/v1/enroll",
        Some(body),
    )
    .await;
    let r = ok_cert(s, &b);
    assert_eq!(r.spiffe_id, id);
    assert_eq!(verified(&r).spiffe_id.as_deref(), Some(id.as_str()));
}

/// Bundle first, leaves later: after `ca root rotate`, `/v1/bundle` serves both roots at once,
/// but enrollments and renewals stay signed by the old root until the new one has been in the
/// bundle for `--bundle-lead` (sidecars poll the bundle, so each trusts the new root before a
/// peer presents a leaf of it). Operator commands (`ca issue`) sign with the new root at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_root_signs_enrollments_and_renewals_only_after_the_bundle_lead() {
    const LEAD: std::time::Duration = std::time::Duration::from_secs(4);
    let generation_of = |sb: &Sandbox, serial: &str| {
        inventory(sb)
            .iter()
            .find(|r| r["serial"] == serial)
            .map(|r| r["generation"].as_u64().expect("generation"))
            .expect("inventory row")
    };
    let sb = Sandbox::new();
    init(&sb);
    let id = format!("{TD}/reports");
    let t = token(&sb, &id, &[]);
    let srv = serve(&sb, &["--bundle-lead", "4s"]);
    let mut key = KeyPair::generate().expect("key");
    let (s, b) = enroll(&sb, srv.addr, &t, &csr(&key)).await;
    let mut svid = ok_cert(s, &b);
    assert_eq!(generation_of(&sb, &svid.serial), 1);

    let rotated = std::time::Instant::now();
    sb.ok(&["root", "rotate", "--dir", "ca"]);
    let (s, b) = call(&sb, srv.addr, None, "GET", "/v1/bundle", None).await;
    assert_eq!(s, 200);
    let roots = String::from_utf8_lossy(&b)
        .matches("BEGIN CERTIFICATE")
        .count();
    assert_eq!(roots, 2, "the new root is published at once");
    let offline = format!("{TD}/offline");
    sb.ok(&[
        "issue",
        "--dir",
        "ca",
        "--spiffe-id",
        &offline,
        "--out",
        "offline",
    ]);
    let issued = inventory(&sb);
    let row = issued.iter().rev().find(|r| r["source"] == "issue");
    assert_eq!(
        row.expect("issue row")["generation"],
        2,
        "ca issue: the new root"
    );

    // Renew until the new root signs: never before the lead has passed since the rotation,
    // and the old root signs the renewals before that.
    let mut old_root_renewals = 0;
    loop {
        let next = KeyPair::generate().expect("key");
        let (s, b) = renew(&sb, srv.addr, &svid.cert_chain, &key, &next).await;
        let renewed = ok_cert(s, &b);
        verified(&renewed);
        let (generation, elapsed) = (generation_of(&sb, &renewed.serial), rotated.elapsed());
        (svid, key) = (renewed, next);
        if generation == 2 {
            assert!(
                elapsed >= LEAD,
                "a new-root renewal {elapsed:?} after the rotation"
            );
            break;
        }
        assert_eq!(generation, 1);
        old_root_renewals += 1;
        assert!(
            elapsed < LEAD + std::time::Duration::from_secs(10),
            "still signed by the old root {elapsed:?} after the rotation"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert!(old_root_renewals > 0, "no renewal fell within the lead");
}

/// After `ca root rotate`, SVIDs of the new root renew without restarting `ca serve`: its TLS
/// layer re-reads the bundle and CRLs (every 5 s). Before, the handshake refused them
/// (`unknown_ca`) until a restart.
#[tokio::test]
async fn tls_trust_follows_a_root_rotation_without_restart() {
    let sb = Sandbox::new();
    init(&sb);
    let srv = serve(&sb, &[]);
    sb.ok(&["root", "rotate", "--dir", "ca"]);
    let id = format!("{TD}/after-rotation");
    sb.ok(&["issue", "--dir", "ca", "--spiffe-id", &id, "--out", "new"]);
    let chain = std::fs::read_to_string(sb.path("new/cert.pem")).expect("cert");
    let key = KeyPair::from_pem(&std::fs::read_to_string(sb.path("new/key.pem")).expect("key"))
        .expect("key pem");
    let started = std::time::Instant::now();
    loop {
        let body = json!({"csr": csr(&KeyPair::generate().expect("key"))});
        match try_call(
            &sb,
            srv.addr,
            Some((&chain, &key)),
            "POST",
            "/v1/renew",
            Some(body),
        )
        .await
        {
            Ok((200, b)) => {
                let r = ok_cert(200, &b);
                assert_eq!(r.spiffe_id, id);
                break;
            }
            other => assert!(
                started.elapsed() < std::time::Duration::from_secs(15),
                "renewal with a new-root SVID still refused after 15 s: {other:?}"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Issue 23 (found by the fleet demo): after `ca root rotate`, `/v1/crl` must carry a CRL from
/// the new root at once. Sidecars refuse a bundle with a root that has no CRL, so with the CRL
/// cached until the next revocation (or 12 h) every online sidecar refused the two-root bundle
/// and every SVID of the new root: they kept their old SVIDs until these expired. (The cache
/// key is the set of roots not retired, so `ca root retire` re-signs too; the fleet demo's
/// root step covers that end to end.)
#[tokio::test]
async fn issue_23_served_crls_follow_root_rotation_and_retirement() {
    let crl_issuers = |pem: &Bytes| -> Vec<String> {
        use rustls_pki_types::pem::PemObject as _;
        use x509_parser::prelude::FromDer as _;
        rustls_pki_types::CertificateRevocationListDer::pem_slice_iter(pem)
            .map(|c| {
                let der = c.expect("CRL PEM");
                let (_, crl) =
                    x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
                        .expect("CRL DER");
                crl.issuer().to_string()
            })
            .collect()
    };
    let sb = Sandbox::new();
    init(&sb);
    let srv = serve(&sb, &[]);
    let (s, before) = call(&sb, srv.addr, None, "GET", "/v1/crl", None).await;
    assert_eq!(s, 200);
    assert_eq!(crl_issuers(&before).len(), 1, "one root, one CRL");

    sb.ok(&["root", "rotate", "--dir", "ca"]);
    let (s, rotated) = call(&sb, srv.addr, None, "GET", "/v1/crl", None).await;
    assert_eq!(s, 200);
    let issuers = crl_issuers(&rotated);
    assert_eq!(
        issuers.len(),
        2,
        "a CRL from each root of the bundle: {issuers:?}"
    );
    assert!(issuers.iter().any(|i| i.contains("g2")), "{issuers:?}");
}
