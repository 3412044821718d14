//! A real rustls mTLS handshake on 127.0.0.1 between a server and a client whose certificates
//! come from `ca issue` (the binary), verified with webpki against bundle.pem; and a handshake
//! refused because `ca revoke --crl` revoked the client.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Sandbox, issue_args};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

fn chain(dir: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(dir.join("cert.pem"))
        .expect("cert.pem")
        .collect::<Result<_, _>>()
        .expect("pem")
}

fn key(dir: &Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(dir.join("key.pem")).expect("key.pem")
}

fn roots(dir: &Path) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.join("bundle.pem")).expect("bundle.pem") {
        roots.add(cert.expect("pem")).expect("root");
    }
    Arc::new(roots)
}

fn uri_san(der: &[u8]) -> String {
    let (_, cert) = X509Certificate::from_der(der).expect("parse");
    let san = cert
        .subject_alternative_name()
        .expect("unique")
        .expect("san");
    san.value
        .general_names
        .iter()
        .find_map(|n| {
            if let GeneralName::URI(u) = n {
                Some((*u).to_owned())
            } else {
                None
            }
        })
        .expect("uri san")
}

/// `ca issue` of `spiffe://fintech.internal/server` with DNS name `server.fintech.internal`
/// into `server/`.
fn issue_server(sb: &Sandbox) {
    sb.ok(&issue_args(
        "spiffe://fintech.internal/server",
        &["--dns", "server.fintech.internal"],
        "server",
    ));
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// TLS 1.3 server config with the SVID in `dir`, requiring a client certificate that chains to
/// `dir/bundle.pem` and is not revoked by `crls`.
fn server_config(dir: &Path, crls: Vec<CertificateRevocationListDer<'static>>) -> ServerConfig {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(dir), provider())
        .with_crls(crls)
        .build()
        .expect("verifier");
    ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain(dir), key(dir))
        .expect("server cert and key match")
}

/// TLS 1.3 client config presenting the SVID in `dir`, trusting `dir/bundle.pem`.
fn client_config(dir: &Path) -> ClientConfig {
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots(dir))
        .with_client_auth_cert(chain(dir), key(dir))
        .expect("client cert and key match")
}

async fn handshake(intermediate: bool) {
    let sb = Sandbox::new();
    sb.init(intermediate);
    issue_server(&sb);
    sb.ok(&issue_args(
        "spiffe://fintech.internal/client",
        &[],
        "client",
    ));
    let (server_dir, client_dir) = (sb.path("server"), sb.path("client"));

    let server_cfg = server_config(&server_dir, Vec::new());
    let client_cfg = client_config(&client_dir);

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut tls = acceptor.accept(tcp).await.expect("server handshake");
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .expect("client presented a certificate")[0]
            .as_ref()
            .to_vec();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.expect("read ping");
        tls.write_all(b"pong").await.expect("write pong");
        tls.shutdown().await.ok();
        uri_san(&peer)
    });

    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("server.fintech.internal").expect("name");
    let mut tls = connector
        .connect(name, tcp)
        .await
        .expect("client handshake");
    tls.write_all(b"ping").await.expect("write ping");
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf)
        .await
        .expect("pong: the server accepted our certificate");
    assert_eq!(&buf, b"pong");
    let server_peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .expect("server certificate")[0]
        .as_ref()
        .to_vec();
    assert_eq!(uri_san(&server_peer), "spiffe://fintech.internal/server");
    let client_seen = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("server done")
        .expect("server task");
    assert_eq!(
        client_seen, "spiffe://fintech.internal/client",
        "server saw the client's SPIFFE ID"
    );
}

#[tokio::test]
async fn mtls_handshake_with_certificates_from_ca_issue() {
    handshake(false).await;
}

#[tokio::test]
async fn mtls_handshake_through_an_intermediate() {
    handshake(true).await;
}

/// Server config that requires a client certificate chaining to `bundle_dir/bundle.pem` and not
/// revoked by the CRLs in `crl_file`.
fn server_with_crl(sb: &Sandbox, server: &str, crl_file: &str) -> ServerConfig {
    let crls = CertificateRevocationListDer::pem_file_iter(sb.path(crl_file))
        .expect("crl")
        .collect::<Result<_, _>>()
        .expect("pem");
    server_config(&sb.path(server), crls)
}

/// One handshake + ping/pong as `client`; returns the server's handshake result.
async fn try_client(
    cfg: Arc<ServerConfig>,
    sb: &Sandbox,
    client: &str,
) -> Result<(), std::io::Error> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut tls = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        tls.write_all(b"pong").await?;
        tls.shutdown().await.ok();
        Ok::<_, std::io::Error>(())
    });
    let client_cfg = client_config(&sb.path(client));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("server.fintech.internal").expect("name");
    // TLS 1.3: the client's connect can succeed before the server judged its certificate; the
    // refusal shows up on the first read.
    let client_side = async {
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client_cfg))
            .connect(name, tcp)
            .await?;
        tls.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(())
    };
    let client_result = tokio::time::timeout(Duration::from_secs(30), client_side)
        .await
        .expect("client done");
    let server_result = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("server done")
        .expect("task");
    assert_eq!(
        client_result.is_ok(),
        server_result.is_ok(),
        "both sides agree: {client_result:?} / {server_result:?}"
    );
    server_result
}

#[tokio::test]
async fn revoked_client_is_refused_in_a_real_handshake_and_others_are_not() {
    let sb = Sandbox::new();
    sb.init(true);
    issue_server(&sb);
    sb.issue("alice");
    sb.issue("mallory");
    sb.ok(&[
        "revoke",
        "--dir",
        "ca",
        "--spiffe-id",
        "spiffe://fintech.internal/mallory",
        "--reason",
        "key-compromise",
        "--crl",
        "crl.pem",
    ]);
    let cfg = Arc::new(server_with_crl(&sb, "server", "crl.pem"));
    try_client(cfg.clone(), &sb, "alice")
        .await
        .expect("alice is not revoked");
    let err = try_client(cfg, &sb, "mallory")
        .await
        .expect_err("mallory is revoked");
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    assert_eq!(
        inner,
        Some(&rustls::Error::InvalidCertificate(
            rustls::CertificateError::Revoked
        )),
        "{err:?}"
    );
}
