//! An mTLS client that talks straight to an inbound sidecar with whatever certificate it is handed: the
//! impostor (an SVID from a foreign CA) and the revoked service of the demo. It reports whether the
//! sidecar refused the handshake (and with which TLS alert) or answered an HTTP request.
//!
//! This is the attacker's side, so it does not authenticate the server (an impostor has no reason to);
//! it still verifies the server's handshake signature, and the handshake itself is real rustls.
//! TLS 1.3 subtlety: the client's handshake completes before the server has judged the client
//! certificate, so a refusal may only show on the first read; both count as "refused at the handshake".

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::client::AnyServer;

/// Why a probe could not be run at all (as opposed to being refused by the sidecar).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("cannot load {what} from {path}: {detail}")]
    Pem {
        /// Certificate chain or private key.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        detail: String,
    },
    /// rustls refused the client configuration.
    #[error("client TLS configuration refused: {0}")]
    Config(#[from] rustls::Error),
    /// TCP connect failed (the sidecar is not listening).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Target.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// No outcome within the deadline.
    #[error("no answer from {addr} within {after:?}")]
    Timeout {
        /// Target.
        addr: SocketAddr,
        /// Deadline.
        after: Duration,
    },
}

/// What the sidecar did with the probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The TLS session was refused: the alert (or TLS error) the client observed.
    Refused {
        /// e.g. `AlertReceived(BadCertificate)`.
        reason: String,
    },
    /// The sidecar answered the HTTP request.
    Answered {
        /// HTTP status code.
        status: u16,
    },
    /// The connection closed without an alert and without a response.
    Closed,
}

impl fmt::Display for ProbeOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Refused { reason } => write!(f, "refused at the handshake ({reason})"),
            Self::Answered { status } => write!(f, "answered HTTP {status}"),
            Self::Closed => f.write_str("closed without alert or response"),
        }
    }
}

/// A client identity: certificate chain and key files (as written by `ca issue`).
#[derive(Debug, Clone)]
pub struct ProbeIdentity {
    /// `cert.pem`: leaf first.
    pub cert: PathBuf,
    /// `key.pem`.
    pub key: PathBuf,
}

impl ProbeIdentity {
    /// The `cert.pem`/`key.pem` pair in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        ProbeIdentity {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }
}

/// Connects to `addr` with `identity`, sends `GET path`, and reports what happened.
///
/// # Errors
/// [`ProbeError`] when the probe itself cannot run (files, config, TCP connect, timeout).
pub async fn probe(
    addr: SocketAddr,
    identity: &ProbeIdentity,
    path: &str,
) -> Result<ProbeOutcome, ProbeError> {
    let config = client_config(identity).await?;
    let after = Duration::from_secs(15);
    tokio::time::timeout(after, exchange(addr, config, path))
        .await
        .map_err(|_| ProbeError::Timeout { addr, after })?
}

async fn exchange(
    addr: SocketAddr,
    config: rustls::ClientConfig,
    path: &str,
) -> Result<ProbeOutcome, ProbeError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| ProbeError::Connect { addr, source })?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("gatehouse.invalid").expect("a syntactically valid DNS name");
    let mut tls = match connector.connect(name, tcp).await {
        Ok(tls) => tls,
        Err(e) => return Ok(refusal(&e)),
    };
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    if let Err(e) = tls.write_all(request.as_bytes()).await {
        return Ok(refusal(&e));
    }
    let mut response = Vec::new();
    match tls.read_to_end(&mut response).await {
        Err(e) => Ok(refusal(&e)),
        Ok(_) if response.is_empty() => Ok(ProbeOutcome::Closed),
        Ok(_) => Ok(
            parse_status(&response).map_or(ProbeOutcome::Closed, |status| ProbeOutcome::Answered {
                status,
            }),
        ),
    }
}

fn refusal(e: &std::io::Error) -> ProbeOutcome {
    let reason = match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => format!("{tls:?}"),
        None => e.to_string(),
    };
    ProbeOutcome::Refused { reason }
}

fn parse_status(response: &[u8]) -> Option<u16> {
    let line = response.split(|b| *b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

async fn client_config(identity: &ProbeIdentity) -> Result<rustls::ClientConfig, ProbeError> {
    let chain_pem = read(&identity.cert, "certificate chain").await?;
    let key_pem = read(&identity.key, "private key").await?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error("certificate chain", &identity.cert, &e))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| pem_error("private key", &identity.key, &e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(chain, key)?;
    Ok(config)
}

async fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, ProbeError> {
    tokio::fs::read(path)
        .await
        .map_err(|e| pem_error(what, path, &e))
}

fn pem_error(what: &'static str, path: &Path, e: &dyn fmt::Display) -> ProbeError {
    ProbeError::Pem {
        what,
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}
