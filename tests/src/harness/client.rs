//! Clients: [`MtlsClient`] (rustls with a chosen certificate or none, HTTP/1.1 or h2),
//! [`AnyServer`] (the one test `ServerCertVerifier`: accepts any server certificate but checks the
//! handshake signature, for attackers and probes), [`HttpClient`] (plaintext, for a sidecar's
//! outbound listener and debug endpoints), [`http_get`] (admin endpoints) and [`raw_exchange`]
//! (exact request bytes in, one response out).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::app::ServiceBody;
use super::pki::CertDir;

/// A plain HTTP/1.1 GET (admin endpoints): status and body.
///
/// # Errors
/// Connection or protocol errors.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(StatusCode, String)> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// HTTP version for [`MtlsClient`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// HTTP/1.1 (ALPN `http/1.1`).
    H1,
    /// HTTP/2 (ALPN `h2`).
    H2,
}

/// A response, body collected.
#[derive(Debug)]
pub struct Resp {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Resp {
    /// The body as JSON.
    ///
    /// # Panics
    /// If it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body {:?} is not JSON: {e}", self.body))
    }
}

/// Presents a fixed certificate without checking that the key matches (rustls'
/// `with_client_auth_cert` would refuse a mismatched pair).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// A rustls client presenting a chosen certificate (or none), verifying the sidecar as
/// `localhost` against a bundle.
#[derive(Clone)]
pub struct MtlsClient {
    base: ClientConfig,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn roots(bundle: &Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(bundle).expect("bundle") {
        roots.add(c.expect("bundle cert")).expect("anchor");
    }
    roots
}

impl MtlsClient {
    /// Presents `cert`'s certificate and key; trusts `cert`'s bundle.
    pub fn new(cert: &CertDir) -> Self {
        Self::with_files(&cert.cert(), &cert.key(), &cert.bundle())
    }

    /// Presents `cert_file` with `key_file` (they need not match); trusts `bundle`.
    ///
    /// # Panics
    /// If a file does not parse.
    pub fn with_files(cert_file: &Path, key_file: &Path, bundle: &Path) -> Self {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
            .expect("cert file")
            .collect::<Result<_, _>>()
            .expect("certs");
        let key = PrivateKeyDer::from_pem_file(key_file).expect("key file");
        let p = provider();
        let signer = p.key_provider.load_private_key(key).expect("key");
        let ck = Arc::new(CertifiedKey::new(chain, signer));
        let base = ClientConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots(bundle))
            .with_client_cert_resolver(Arc::new(Fixed(ck)));
        Self { base }
    }

    /// Presents no certificate; trusts `bundle`.
    pub fn without_cert(bundle: &Path) -> Self {
        let base = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots(bundle))
            .with_no_client_auth();
        Self { base }
    }

    /// Opens a TLS connection negotiating `proto`.
    ///
    /// # Errors
    /// Connection or handshake errors (in TLS 1.3 a refused client certificate only shows on
    /// the first read).
    pub async fn connect(
        &self,
        addr: SocketAddr,
        proto: Proto,
    ) -> anyhow::Result<TlsStream<TcpStream>> {
        self.connect_from(addr, proto, None).await
    }

    /// As [`MtlsClient::connect`], from source address `from` (e.g. `127.0.0.2`) when given.
    ///
    /// # Errors
    /// As [`MtlsClient::connect`].
    pub async fn connect_from(
        &self,
        addr: SocketAddr,
        proto: Proto,
        from: Option<std::net::IpAddr>,
    ) -> anyhow::Result<TlsStream<TcpStream>> {
        let mut cfg = self.base.clone();
        cfg.alpn_protocols = vec![match proto {
            Proto::H1 => b"http/1.1".to_vec(),
            Proto::H2 => b"h2".to_vec(),
        }];
        let tcp = tcp_connect_from(addr, from).await?;
        let name = ServerName::try_from("localhost").expect("valid name");
        Ok(TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await?)
    }

    /// One request on a fresh connection, body collected.
    ///
    /// # Errors
    /// TLS refusal, connection or protocol errors.
    pub async fn request(
        &self,
        addr: SocketAddr,
        proto: Proto,
        req: Request<Full<Bytes>>,
    ) -> anyhow::Result<Resp> {
        let resp = self.send(addr, proto, req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// GET `path` on a fresh connection.
    ///
    /// # Errors
    /// As [`MtlsClient::request`].
    pub async fn get(&self, addr: SocketAddr, proto: Proto, path: &str) -> anyhow::Result<Resp> {
        let req = Request::get(path).body(Full::new(Bytes::new()))?;
        self.request(addr, proto, req).await
    }

    /// One request on a fresh connection; the response body is left streaming.
    ///
    /// # Errors
    /// As [`MtlsClient::request`].
    pub async fn send<B>(
        &self,
        addr: SocketAddr,
        proto: Proto,
        req: Request<B>,
    ) -> anyhow::Result<Response<Incoming>>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let tls = self.connect(addr, proto).await?;
        let io = TokioIo::new(tls);
        let (mut parts, body) = req.into_parts();
        match proto {
            Proto::H1 => {
                let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(conn);
                parts
                    .headers
                    .entry(http::header::HOST)
                    .or_insert(http::HeaderValue::from_static("localhost"));
                Ok(send.send_request(Request::from_parts(parts, body)).await?)
            }
            Proto::H2 => {
                let (mut send, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(conn);
                let pq = parts
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_owned();
                parts.uri = format!("https://localhost:{}{pq}", addr.port()).parse()?;
                Ok(send.send_request(Request::from_parts(parts, body)).await?)
            }
        }
    }
}

/// A response read off the wire by [`raw_exchange`].
#[derive(Debug)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// The status line and header lines as received.
    pub head: String,
    /// The body (`Content-Length` bytes, or everything until the peer closed).
    pub body: Vec<u8>,
}

/// Writes `request` (raw HTTP/1.1 bytes, exactly as given) on `io` and reads one response:
/// its head, then `Content-Length` bytes of body, or the rest of the stream when it has none.
/// For tests of what a proxy does with requests an ordinary client library would not send.
///
/// # Errors
/// I/O errors, a head that does not parse, or no complete response within 10 s.
pub async fn raw_exchange<S>(io: &mut S, request: &[u8]) -> anyhow::Result<RawResponse>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        io.write_all(request).await?;
        io.flush().await?;
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = io.read(&mut chunk).await?;
            if n == 0 {
                bail!("connection closed before a response head: {buf:?}");
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no status in {head:?}"))?;
        let length = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        });
        let mut body = buf[head_end..].to_vec();
        match length {
            Some(n) => {
                while body.len() < n {
                    let mut chunk = [0u8; 4096];
                    let got = io.read(&mut chunk).await?;
                    if got == 0 {
                        bail!(
                            "connection closed {} bytes into a {n}-byte body",
                            body.len()
                        );
                    }
                    body.extend_from_slice(&chunk[..got]);
                }
                body.truncate(n);
            }
            None => {
                io.read_to_end(&mut body).await?;
            }
        }
        Ok(RawResponse { status, head, body })
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .context("no complete response within 10 s")?
}

// ---- plaintext HTTP ----------------------------------------------------------------------------

/// Failure of an outgoing plaintext HTTP call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The URL could not be parsed.
    #[error("invalid url `{url}`")]
    Url {
        /// The URL as given.
        url: String,
    },
    /// The request could not be built (bad header, method).
    #[error("invalid request to `{url}`: {source}")]
    Request {
        /// Target URL.
        url: String,
        /// Cause.
        #[source]
        source: http::Error,
    },
    /// Connecting or exchanging the request failed.
    #[error("request to `{url}` failed: {detail}")]
    Transport {
        /// Target URL.
        url: String,
        /// The cause and its whole source chain, rendered.
        detail: String,
    },
    /// No complete answer within the deadline.
    #[error("request to `{url}` timed out after {after:?}")]
    Timeout {
        /// Target URL.
        url: String,
        /// The deadline.
        after: Duration,
    },
    /// The body was not the JSON expected.
    #[error("answer from `{url}` is not the expected JSON: {source}")]
    Json {
        /// Target URL.
        url: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// A complete answer to an outgoing call.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Where it came from.
    pub url: String,
    /// Status code.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// Response body.
    pub body: Bytes,
}

impl Reply {
    /// The body parsed as JSON.
    ///
    /// # Errors
    /// [`HttpError::Json`] when it does not parse as `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body).map_err(|source| HttpError::Json {
            url: self.url.clone(),
            source,
        })
    }

    /// The body as (lossy) UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Plaintext HTTP/1.1 client with keep-alive and a per-call deadline.
#[derive(Debug, Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, ServiceBody>,
    timeout: Duration,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new(Duration::from_secs(15))
    }
}

impl HttpClient {
    /// A client whose calls each give up after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        HttpClient { inner, timeout }
    }

    /// `GET url`.
    ///
    /// # Errors
    /// See [`HttpClient::send`].
    pub async fn get(&self, url: &str) -> Result<Reply, HttpError> {
        self.send(Method::GET, url, &[], None).await
    }

    /// `POST url` with a JSON body.
    ///
    /// # Errors
    /// See [`HttpClient::send`].
    pub async fn post_json<T: Serialize + ?Sized>(
        &self,
        url: &str,
        value: &T,
    ) -> Result<Reply, HttpError> {
        let body = serde_json::to_vec(value).map_err(|source| HttpError::Json {
            url: url.to_owned(),
            source,
        })?;
        let headers = [("content-type", "application/json")];
        self.send(Method::POST, url, &headers, Some(Bytes::from(body)))
            .await
    }

    /// Sends one request and reads the whole answer, whatever its status.
    ///
    /// # Errors
    /// [`HttpError`] for a bad URL or header, a transport failure or the deadline passing.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
    ) -> Result<Reply, HttpError> {
        let uri: http::Uri = url.parse().map_err(|_| HttpError::Url {
            url: url.to_owned(),
        })?;
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let req = builder
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|source| HttpError::Request {
                url: url.to_owned(),
                source,
            })?;
        let exchange = async {
            let resp = self
                .inner
                .request(req)
                .await
                .map_err(|e| transport(url, e))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| transport(url, e))?
                .to_bytes();
            Ok(Reply {
                url: url.to_owned(),
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| HttpError::Timeout {
                url: url.to_owned(),
                after: self.timeout,
            })?
    }
}

fn transport(url: &str, e: impl std::error::Error) -> HttpError {
    // hyper-util's top-level message is terse ("client error (Connect)"); the cause is in the chain.
    let mut detail = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        detail.push_str(": ");
        detail.push_str(&cause.to_string());
        source = cause.source();
    }
    HttpError::Transport {
        url: url.to_owned(),
        detail,
    }
}

// ---- the one test server verifier ----------------------------------------------------------------

/// The attacker's server verifier: accepts any server certificate, but checks the handshake signature
/// so the session is a genuine TLS 1.3 session with whoever holds that certificate's key.
#[derive(Debug)]
pub struct AnyServer(pub Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The client config offers TLS 1.3 only.
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TCP connection to `addr`, from the address `from` when given (another loopback address
/// is another source to a listener's per-source caps).
///
/// # Errors
/// Binding `from` or connecting.
pub async fn tcp_connect_from(
    addr: SocketAddr,
    from: Option<std::net::IpAddr>,
) -> std::io::Result<TcpStream> {
    let Some(ip) = from else {
        return TcpStream::connect(addr).await;
    };
    let socket = if ip.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(addr).await
}
