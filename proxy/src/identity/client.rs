//! The HTTPS client of `ca serve` (API v1, `gatehouse_ca::api`): HTTP/1.1 over TLS 1.3, one
//! connection per call (calls are minutes apart). The CA is authenticated like any peer: its
//! chain must end in the anchors we hold (the bootstrap `ca_bundle` until the first answer, then
//! the bundle the CA hands out) and its SVID must be exactly `spiffe://<td>/gatehouse/ca`
//! ([`ServerIdentityVerifier`], the outbound verifier). Host names are not checked; the SNI is
//! the host of `ca`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gatehouse_ca::api::{
    BUNDLE_PATH, CRL_PATH, CertResponse, ENROLL_PATH, EnrollRequest, ErrorResponse, RENEW_PATH,
    RenewRequest,
};
use gatehouse_policy::{IdentityPattern, SpiffeId, TrustDomain};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;

use crate::identity::config::CaEndpoint;
use crate::tls::client::ServerIdentityVerifier;
use crate::tls::resolver::CertResolver;

/// Longest answer read from the CA (a chain, a bundle or the CRLs).
pub const MAX_ANSWER: usize = 1024 * 1024;
/// Deadline of one call: connect, handshake, request and answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How a call authenticates, besides the TLS server check.
#[derive(Clone)]
pub enum Auth {
    /// Nothing (bundle, CRL).
    None,
    /// A join token in the JSON body.
    Token(String),
    /// A bearer token (Kubernetes service-account JWT).
    Bearer(String),
    /// A TLS client certificate: an enrollment certificate, or the current SVID for renewal.
    ClientCert(Arc<CertifiedKey>),
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the token itself.
        f.write_str(match self {
            Self::None => "None",
            Self::Token(_) => "Token(…)",
            Self::Bearer(_) => "Bearer(…)",
            Self::ClientCert(_) => "ClientCert(…)",
        })
    }
}

/// Why a call to the CA failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaCallError {
    /// No TCP connection, or the TLS handshake failed (e.g. the CA's certificate does not chain
    /// to our anchors or is not `spiffe://<td>/gatehouse/ca`).
    #[error("cannot reach the CA at {url}: {detail}")]
    Unreachable {
        /// The CA.
        url: String,
        /// What failed.
        detail: String,
    },
    /// The call did not finish within [`CALL_TIMEOUT`].
    #[error("the CA at {url} did not answer within {CALL_TIMEOUT:?}")]
    Timeout {
        /// The CA.
        url: String,
    },
    /// The CA refused with its JSON error.
    #[error("the CA refused {path} ({status} {code}): {message}")]
    Refused {
        /// The endpoint.
        path: &'static str,
        /// HTTP status.
        status: u16,
        /// The CA's error code (`token_used`, `revoked`, …).
        code: String,
        /// The CA's sentence, which says what to do.
        message: String,
    },
    /// The answer was not what API v1 promises.
    #[error("unexpected answer from the CA to {path}: {detail}")]
    BadAnswer {
        /// The endpoint.
        path: &'static str,
        /// What was wrong.
        detail: String,
    },
}

impl CaCallError {
    /// The CA's error code, when it refused.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A `GET` of the bundle or the CRLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// 304: what we hold (its ETag was sent) is current.
    NotModified,
    /// 200: new content and its ETag.
    New {
        /// The PEM text.
        pem: String,
        /// The `ETag` (empty if the CA sent none).
        etag: String,
    },
}

/// A client of one `ca serve`.
#[derive(Debug, Clone)]
pub struct CaClient {
    endpoint: CaEndpoint,
    server_name: ServerName<'static>,
    trust_domain: TrustDomain,
    ca_id: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl CaClient {
    /// A client of the CA at `endpoint`, which must present the SVID `ca_id`.
    pub fn new(endpoint: CaEndpoint, ca_id: SpiffeId, provider: Arc<CryptoProvider>) -> Self {
        let server_name = ServerName::try_from(endpoint.host.clone())
            .unwrap_or_else(|_| ServerName::try_from("gatehouse-ca").expect("a valid DNS name"));
        Self {
            endpoint,
            server_name,
            trust_domain: ca_id.trust_domain(),
            ca_id,
            provider,
        }
    }

    /// The CA's URL as configured.
    pub fn url(&self) -> &str {
        &self.endpoint.url
    }

    /// `POST /v1/enroll` with `csr_pem` and a bootstrap credential (`Token`, `Bearer` or an
    /// enrollment certificate as `ClientCert`).
    ///
    /// # Errors
    /// The CA could not be reached, refused, or answered outside the API.
    pub async fn enroll(
        &self,
        anchors: Arc<RootCertStore>,
        auth: Auth,
        csr_pem: String,
    ) -> Result<CertResponse, CaCallError> {
        let token = match &auth {
            Auth::Token(t) => Some(t.clone()),
            _ => None,
        };
        let body = serde_json::to_vec(&EnrollRequest {
            csr: csr_pem,
            token,
        })
        .unwrap_or_default();
        self.post_cert(anchors, ENROLL_PATH, auth, body).await
    }

    /// `POST /v1/renew` over mTLS with `current` (the SVID held now) for a new key's `csr_pem`.
    ///
    /// # Errors
    /// As [`CaClient::enroll`].
    pub async fn renew(
        &self,
        anchors: Arc<RootCertStore>,
        current: Arc<CertifiedKey>,
        csr_pem: String,
    ) -> Result<CertResponse, CaCallError> {
        let body = serde_json::to_vec(&RenewRequest { csr: csr_pem }).unwrap_or_default();
        self.post_cert(anchors, RENEW_PATH, Auth::ClientCert(current), body)
            .await
    }

    /// `GET /v1/bundle` with `If-None-Match: etag`.
    ///
    /// # Errors
    /// As [`CaClient::enroll`].
    pub async fn bundle(
        &self,
        anchors: Arc<RootCertStore>,
        etag: Option<&str>,
    ) -> Result<Fetched, CaCallError> {
        self.get(anchors, BUNDLE_PATH, etag).await
    }

    /// `GET /v1/crl` with `If-None-Match: etag`.
    ///
    /// # Errors
    /// As [`CaClient::enroll`].
    pub async fn crl(
        &self,
        anchors: Arc<RootCertStore>,
        etag: Option<&str>,
    ) -> Result<Fetched, CaCallError> {
        self.get(anchors, CRL_PATH, etag).await
    }

    async fn post_cert(
        &self,
        anchors: Arc<RootCertStore>,
        path: &'static str,
        auth: Auth,
        body: Vec<u8>,
    ) -> Result<CertResponse, CaCallError> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json");
        if let Auth::Bearer(jwt) = &auth {
            req = req.header(header::AUTHORIZATION, format!("Bearer {}", jwt.trim()));
        }
        let cert = match auth {
            Auth::ClientCert(ck) => Some(ck),
            _ => None,
        };
        let (status, _, body) = self.call(anchors, cert, req, body.into(), path).await?;
        if status != StatusCode::OK {
            return Err(refused(path, status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| CaCallError::BadAnswer {
            path,
            detail: format!("not the v1 certificate answer: {e}"),
        })
    }

    async fn get(
        &self,
        anchors: Arc<RootCertStore>,
        path: &'static str,
        etag: Option<&str>,
    ) -> Result<Fetched, CaCallError> {
        let mut req = Request::builder().method(Method::GET).uri(path);
        if let Some(tag) = etag.filter(|t| !t.is_empty()) {
            req = req.header(header::IF_NONE_MATCH, tag);
        }
        let (status, headers, body) = self.call(anchors, None, req, Bytes::new(), path).await?;
        match status {
            StatusCode::NOT_MODIFIED => Ok(Fetched::NotModified),
            StatusCode::OK => Ok(Fetched::New {
                pem: String::from_utf8(body.to_vec()).map_err(|_| CaCallError::BadAnswer {
                    path,
                    detail: "not UTF-8 PEM text".into(),
                })?,
                etag: headers
                    .get(header::ETAG)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned(),
            }),
            s => Err(refused(path, s, &body)),
        }
    }

    async fn call(
        &self,
        anchors: Arc<RootCertStore>,
        client_cert: Option<Arc<CertifiedKey>>,
        req: http::request::Builder,
        body: Bytes,
        path: &'static str,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), CaCallError> {
        let url = self.endpoint.url.clone();
        let unreachable = |detail: String| CaCallError::Unreachable {
            url: url.clone(),
            detail,
        };
        let config = self.tls_config(anchors, client_cert).map_err(unreachable)?;
        let authority = if self.endpoint.host.contains(':') {
            format!("[{}]:{}", self.endpoint.host, self.endpoint.port)
        } else {
            format!("{}:{}", self.endpoint.host, self.endpoint.port)
        };
        let req = req
            .header(header::HOST, authority)
            .body(Full::new(body))
            .map_err(|e| unreachable(format!("building the request: {e}")))?;
        let work = async {
            let tcp =
                tokio::net::TcpStream::connect((self.endpoint.host.as_str(), self.endpoint.port))
                    .await
                    .map_err(|e| unreachable(format!("connect: {e}")))?;
            let _ = tcp.set_nodelay(true);
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| unreachable(format!("TLS handshake: {e}")))?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| unreachable(format!("HTTP: {e}")))?;
            let driver = tokio::spawn(conn);
            let result = async {
                let resp = send
                    .send_request(req)
                    .await
                    .map_err(|e| unreachable(format!("HTTP request: {}", chain(&e))))?;
                let (parts, body) = resp.into_parts();
                let bytes = Limited::new(body, MAX_ANSWER)
                    .collect()
                    .await
                    .map_err(|e| CaCallError::BadAnswer {
                        path,
                        detail: format!("reading the answer: {e}"),
                    })?
                    .to_bytes();
                Ok((parts.status, parts.headers, bytes))
            }
            .await;
            driver.abort();
            result
        };
        match tokio::time::timeout(CALL_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err(CaCallError::Timeout { url }),
        }
    }

    fn tls_config(
        &self,
        anchors: Arc<RootCertStore>,
        client_cert: Option<Arc<CertifiedKey>>,
    ) -> Result<Arc<ClientConfig>, String> {
        let verifier = ServerIdentityVerifier::new(
            anchors,
            &[],
            self.trust_domain.clone(),
            IdentityPattern::Exact(self.ca_id.clone()),
            Arc::clone(&self.provider),
        )
        .map_err(|e| e.to_string())?;
        let builder = ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let mut config = match client_cert {
            Some(ck) => builder.with_client_cert_resolver(Arc::new(CertResolver::new(ck))),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The error and its sources on one line (hyper hides the TLS alert in a source).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

fn refused(path: &'static str, status: StatusCode, body: &[u8]) -> CaCallError {
    match serde_json::from_slice::<ErrorResponse>(body) {
        Ok(e) => CaCallError::Refused {
            path,
            status: status.as_u16(),
            code: e.error,
            message: e.message,
        },
        Err(_) => CaCallError::Refused {
            path,
            status: status.as_u16(),
            code: "unknown".into(),
            message: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        },
    }
}
