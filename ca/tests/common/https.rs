//! `ca serve` over real HTTPS: start the binary, mint tokens, make CSRs, call the JSON API.
//! Shared by `serve.rs`, `pkcs11.rs` and `pg_store.rs`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use bytes::Bytes;
use gatehouse_ca::api::{CertResponse, ErrorResponse};
use gatehouse_ca::inspect::{self, Inspection};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::json;

use super::Sandbox;

/// A running `ca serve`, killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// The `--metrics-listen` address, when one was asked for.
    pub metrics: Option<SocketAddr>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn serve(sb: &Sandbox, extra: &[&str]) -> Server {
    serve_dir(sb, "ca", extra)
}

/// [`serve`] on the CA directory `dir` (relative to the sandbox).
pub fn serve_dir(sb: &Sandbox, dir: &str, extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ca"))
        .args([
            "serve",
            "--dir",
            dir,
            "--listen",
            "127.0.0.1:0",
            "--dns",
            "localhost",
        ])
        .args(extra)
        .envs(sb.env.iter().map(|(k, v)| (k, v)))
        .current_dir(sb.tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn ca serve");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut next_line = |prefix: &str| -> SocketAddr {
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read stdout");
        line.trim()
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("expected {prefix:?}, got {line:?}"))
            .parse()
            .expect("address")
    };
    let addr = next_line("listening on ");
    let metrics = extra
        .contains(&"--metrics-listen")
        .then(|| next_line("metrics on "));
    Server {
        child,
        addr,
        metrics,
    }
}

pub fn token(sb: &Sandbox, id: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "--format",
        "json",
        "token",
        "create",
        "--dir",
        "ca",
        "--spiffe-id",
        id,
    ];
    args.extend_from_slice(extra);
    let out: serde_json::Value = serde_json::from_str(&sb.ok(&args)).expect("json");
    assert_eq!(out["spiffe_id"], id);
    assert!(out["expires"].is_string());
    out["token"].as_str().expect("token").to_owned()
}

pub fn csr(key: &KeyPair) -> String {
    CertificateParams::new(Vec::<String>::new())
        .expect("params")
        .serialize_request(key)
        .expect("csr")
        .pem()
        .expect("pem")
}

/// A TLS 1.3 client configuration trusting the CA's bundle.pem.
pub fn client_builder(
    sb: &Sandbox,
) -> rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(sb.path("ca/bundle.pem")).expect("bundle") {
        roots.add(c.expect("pem")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
}

/// [`client_builder`] finished: with `client` (chain PEM, key) as the client certificate if
/// given, else none.
pub fn client_config(sb: &Sandbox, client: Option<(&str, &KeyPair)>) -> ClientConfig {
    let builder = client_builder(sb);
    match client {
        Some((chain, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(chain.as_bytes())
                    .collect::<Result<_, _>>()
                    .expect("chain"),
                PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).expect("key"),
            )
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    }
}

/// One HTTPS request (HTTP/1.1), optionally with a client certificate (chain PEM, key).
pub async fn call(
    sb: &Sandbox,
    addr: SocketAddr,
    client: Option<(&str, &KeyPair)>,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, Bytes) {
    try_call(sb, addr, client, method, path, body)
        .await
        .expect("request")
}

/// [`call`], returning transport errors (handshake alerts) as text.
pub async fn try_call(
    sb: &Sandbox,
    addr: SocketAddr,
    client: Option<(&str, &KeyPair)>,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, Bytes), String> {
    try_call_with(sb, addr, client, (method, path, &[]), body).await
}

/// [`try_call`] with extra request headers.
pub async fn try_call_with(
    sb: &Sandbox,
    addr: SocketAddr,
    client: Option<(&str, &KeyPair)>,
    (method, path, headers): (&str, &str, &[(&str, &str)]),
    body: Option<serde_json::Value>,
) -> Result<(u16, Bytes), String> {
    let config = client_config(sb, client);
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("http handshake: {e:?}"))?;
    let conn = tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .expect("request");
    let resp = match send.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            let why = conn.await.map(|r| r.map_err(|c| format!("{c:?}")));
            return Err(format!("request: {e:?}; connection: {why:?}"));
        }
    };
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e:?}"))?;
    Ok((status, body.to_bytes()))
}

pub async fn enroll(sb: &Sandbox, addr: SocketAddr, token: &str, csr_pem: &str) -> (u16, Bytes) {
    call(
        sb,
        addr,
        None,
        "POST",
        "/v1/enroll",
        Some(json!({"csr": csr_pem, "token": token})),
    )
    .await
}

/// `POST /v1/renew` over mTLS with (`chain`, `key`), asking for `new_key`.
pub async fn renew(
    sb: &Sandbox,
    addr: SocketAddr,
    chain: &str,
    key: &KeyPair,
    new_key: &KeyPair,
) -> (u16, Bytes) {
    let body = json!({"csr": csr(new_key)});
    call(
        sb,
        addr,
        Some((chain, key)),
        "POST",
        "/v1/renew",
        Some(body),
    )
    .await
}

pub fn ok_cert(status: u16, body: &Bytes) -> CertResponse {
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(body));
    serde_json::from_slice(body).expect("CertResponse")
}

pub fn err(status: u16, body: &Bytes, want_status: u16, code: &str) -> ErrorResponse {
    assert_eq!(status, want_status, "{}", String::from_utf8_lossy(body));
    let e: ErrorResponse = serde_json::from_slice(body).expect("ErrorResponse");
    assert_eq!(e.error, code, "{e:?}");
    assert!(!e.message.is_empty());
    e
}

/// The chain verified with webpki against the bundle the CA answered.
pub fn verified(r: &CertResponse) -> Inspection {
    let i = inspect::inspect_pem(
        &r.cert_chain,
        Path::new("cert_chain"),
        Some((&r.bundle, Path::new("bundle"))),
        time::OffsetDateTime::now_utc(),
    )
    .expect("inspect");
    assert_eq!(i.verified, Some(true), "{:?}", i.verify_error);
    i
}
