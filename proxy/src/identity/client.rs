//! The HTTPS client of `ca serve` (API v1, `gatehouse_ca::api`): HTTP/1.1 over TLS 1.3, one
//! connection per call (calls are minutes apart). The CA is authenticated like any peer: its
//! chain must end in the anchors we hold (the bootstrap `ca_bundle` until the first answer, then
//! the bundle the CA hands out) and its SVID must be exactly `spiffe://<td>/gatehouse/ca`
//! ([`ServerIdentityVerifier`], the outbound verifier). Host names are not checked; the SNI is
//! the host of the URL. Several replicas (`ca = [ … ]`, or one name with several addresses) are
//! tried in turn within one call (see [`CaClient`]).

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// A client of `ca serve`: one or several replicas (`ca = [ … ]`), every one of them held to
/// the same TLS check (anchors + the SVID `spiffe://<td>/gatehouse/ca`).
///
/// Each call starts at the endpoint that answered last (the first written at start) and moves
/// on, within the same call, to every address its host name resolves to and then to the next
/// URL when one cannot be reached, fails the TLS check, does not answer within
/// [`CALL_TIMEOUT`] or answers 502/503/504 (a replica that lost its database answers 503). Any
/// other answer (a 4xx that says what to fix) is final. Back-off is the driver's, after a whole
/// round failed.
#[derive(Debug, Clone)]
pub struct CaClient {
    endpoints: Arc<[CaEndpoint]>,
    /// Index in `endpoints` of the one that answered last.
    preferred: Arc<AtomicUsize>,
    trust_domain: TrustDomain,
    ca_id: SpiffeId,
    provider: Arc<CryptoProvider>,
}

/// Statuses after which the next endpoint is tried: the replica (or a proxy in front of it)
/// cannot serve now, another may.
fn try_next_on(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

impl CaClient {
    /// A client of the CA at `endpoints` (at least one), which must present the SVID `ca_id`.
    pub fn new(endpoints: Vec<CaEndpoint>, ca_id: SpiffeId, provider: Arc<CryptoProvider>) -> Self {
        Self {
            endpoints: endpoints.into(),
            preferred: Arc::new(AtomicUsize::new(0)),
            trust_domain: ca_id.trust_domain(),
            ca_id,
            provider,
        }
    }

    /// The URL of the endpoint that answered last (the first one before any answer).
    pub fn url(&self) -> &str {
        let i = self.preferred.load(Ordering::Relaxed);
        self.endpoints.get(i).map_or("", |e| e.url.as_str())
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
        let mut req =
            RequestParts::new(Method::POST, path).header(header::CONTENT_TYPE, "application/json");
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
        let mut req = RequestParts::new(Method::GET, path);
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

    /// One request, tried at each endpoint in turn (see [`CaClient`]) until one answers.
    async fn call(
        &self,
        anchors: Arc<RootCertStore>,
        client_cert: Option<Arc<CertifiedKey>>,
        req: RequestParts,
        body: Bytes,
        path: &'static str,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), CaCallError> {
        let config =
            self.tls_config(anchors, client_cert)
                .map_err(|detail| CaCallError::Unreachable {
                    url: self.url().to_owned(),
                    detail,
                })?;
        let n = self.endpoints.len();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut failed: Vec<CaCallError> = Vec::new();
        for i in 0..n {
            let index = (start + i) % n;
            let endpoint = &self.endpoints[index];
            let addrs = match tokio::time::timeout(
                CALL_TIMEOUT,
                tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port)),
            )
            .await
            {
                Ok(Ok(addrs)) => addrs.collect::<Vec<SocketAddr>>(),
                Ok(Err(e)) => {
                    failed.push(CaCallError::Unreachable {
                        url: endpoint.url.clone(),
                        detail: format!("resolving {}: {e}", endpoint.host),
                    });
                    continue;
                }
                Err(_) => {
                    failed.push(CaCallError::Timeout {
                        url: endpoint.url.clone(),
                    });
                    continue;
                }
            };
            for addr in addrs {
                let attempt = tokio::time::timeout(
                    CALL_TIMEOUT,
                    call_once(
                        endpoint,
                        addr,
                        Arc::clone(&config),
                        &req,
                        body.clone(),
                        path,
                    ),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(CaCallError::Timeout {
                        url: endpoint.url.clone(),
                    })
                });
                let error = match attempt {
                    Ok((status, _, body)) if try_next_on(status) => refused(path, status, &body),
                    Ok(answer) => {
                        self.preferred.store(index, Ordering::Relaxed);
                        return Ok(answer);
                    }
                    Err(e) => e,
                };
                if n > 1 {
                    tracing::info!(
                        url = %endpoint.url, %addr, error = %error,
                        "identity: CA endpoint failed; trying the next"
                    );
                }
                failed.push(error);
            }
        }
        Err(round_failed(failed, &self.endpoints))
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

/// What a call sends, rebuilt for each endpoint tried.
#[derive(Debug, Clone)]
struct RequestParts {
    method: Method,
    path: &'static str,
    headers: Vec<(header::HeaderName, String)>,
}

impl RequestParts {
    fn new(method: Method, path: &'static str) -> Self {
        Self {
            method,
            path,
            headers: Vec::new(),
        }
    }

    fn header(mut self, name: header::HeaderName, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

/// One request to one address of one endpoint (no deadline: the caller's).
async fn call_once(
    endpoint: &CaEndpoint,
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    parts: &RequestParts,
    body: Bytes,
    path: &'static str,
) -> Result<(StatusCode, http::HeaderMap, Bytes), CaCallError> {
    let unreachable = |detail: String| CaCallError::Unreachable {
        url: endpoint.url.clone(),
        detail,
    };
    let server_name = ServerName::try_from(endpoint.host.clone())
        .unwrap_or_else(|_| ServerName::try_from("gatehouse-ca").expect("a valid DNS name"));
    let authority = if endpoint.host.contains(':') {
        format!("[{}]:{}", endpoint.host, endpoint.port)
    } else {
        format!("{}:{}", endpoint.host, endpoint.port)
    };
    let mut req = Request::builder()
        .method(parts.method.clone())
        .uri(parts.path)
        .header(header::HOST, authority);
    for (name, value) in &parts.headers {
        req = req.header(name, value.as_str());
    }
    let req = req
        .body(Full::new(body))
        .map_err(|e| unreachable(format!("building the request: {e}")))?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| unreachable(format!("connect to {addr}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .map_err(|e| unreachable(format!("TLS handshake with {addr}: {e}")))?;
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
}

/// The error of a round in which no endpoint answered: the one error when a single address was
/// tried (so a lone CA's refusal keeps its code), else every attempt on one line.
fn round_failed(mut failed: Vec<CaCallError>, endpoints: &[CaEndpoint]) -> CaCallError {
    if failed.len() == 1 {
        return failed.remove(0);
    }
    let urls: Vec<&str> = endpoints.iter().map(|e| e.url.as_str()).collect();
    let detail = if failed.is_empty() {
        "no address to try".to_owned()
    } else {
        let each: Vec<String> = failed.iter().map(ToString::to_string).collect();
        format!("every endpoint failed: {}", each.join("; "))
    };
    CaCallError::Unreachable {
        url: urls.join(", "),
        detail,
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
