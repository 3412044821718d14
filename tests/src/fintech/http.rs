//! The small HTTP toolkit the fake services share: a request collected in full ([`Captured`]), a
//! [`Recorder`] of everything an app saw, a plaintext HTTP/1.1 + h2c server loop ([`serve`]) and a
//! plaintext client ([`HttpClient`]) for calling a sidecar's outbound listener or a debug endpoint.
//!
//! No TLS lives here: the fake services speak plain HTTP on loopback, exactly like the real apps behind
//! a Gatehouse sidecar. Identity arrives in the headers the inbound sidecar adds.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use gatehouse_policy::SpiffeId;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

/// Response body type of every fake service.
pub type Body = Full<Bytes>;

/// Largest request body a fake service accepts (anything larger gets 413).
pub const MAX_BODY: usize = 1 << 20;

/// Header the inbound sidecar sets to the verified caller's SPIFFE ID.
pub const CLIENT_ID_HEADER: &str = "x-client-spiffe-id";

/// An incoming request with its body read in full.
#[derive(Debug, Clone)]
pub struct Captured {
    /// Request method.
    pub method: Method,
    /// Path without the query.
    pub path: String,
    /// Raw query string, if any.
    pub query: Option<String>,
    /// Request headers.
    pub headers: HeaderMap,
    /// Request body.
    pub body: Bytes,
}

impl Captured {
    /// Value of query parameter `name` (first occurrence, not percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query.as_deref()?.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name).then_some(value)
        })
    }

    /// The path plus `?query` when there is one.
    pub fn path_and_query(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

/// What an app saw of one request, as recorded and served on its debug endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SeenRequest {
    /// Request method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Raw query string, if any.
    pub query: Option<String>,
    /// Headers, lowercase names; repeated headers joined with `, `.
    pub headers: BTreeMap<String, String>,
    /// Body length in bytes.
    pub body_len: usize,
}

impl SeenRequest {
    fn from_captured(req: &Captured) -> Self {
        let mut headers: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in &req.headers {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            headers
                .entry(name.as_str().to_owned())
                .and_modify(|v| {
                    v.push_str(", ");
                    v.push_str(&value);
                })
                .or_insert(value);
        }
        SeenRequest {
            method: req.method.to_string(),
            path: req.path.clone(),
            query: req.query.clone(),
            headers,
            body_len: req.body.len(),
        }
    }

    /// Value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The caller's SPIFFE ID as the inbound sidecar vouched for it, if the header is present and valid.
    pub fn caller(&self) -> Option<SpiffeId> {
        SpiffeId::parse(self.header(CLIENT_ID_HEADER)?).ok()
    }
}

/// Every request an app received, in arrival order. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct Recorder(Arc<Mutex<Vec<SeenRequest>>>);

impl Recorder {
    /// Appends one request.
    pub fn record(&self, req: &Captured) {
        let seen = SeenRequest::from_captured(req);
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(seen);
    }

    /// A copy of everything recorded so far.
    pub fn snapshot(&self) -> Vec<SeenRequest> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A fake service: handles one fully-read request.
pub trait App: Send + Sync + 'static {
    /// Answers `req`. Never fails: errors become error responses.
    fn handle(&self, req: Captured) -> impl Future<Output = Response<Body>> + Send;

    /// Where requests are recorded; `None` records nothing.
    fn recorder(&self) -> Option<&Recorder> {
        None
    }
}

/// Serves `app` on `listener` (HTTP/1.1 and h2c prior knowledge) until the task is dropped.
pub async fn serve<A: App>(listener: TcpListener, app: Arc<A>) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                eprintln!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let app = app.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(dispatch(&*app, req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // A client that goes away mid-request is its own business; nothing to report.
            let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}

async fn dispatch<A: App>(app: &A, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, &format!("body refused: {e}")),
    };
    let captured = Captured {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers,
        body,
    };
    if let Some(recorder) = app.recorder() {
        recorder.record(&captured);
    }
    app.handle(captured).await
}

/// A JSON response.
pub fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<Body> {
    let body =
        serde_json::to_vec(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A JSON error response: `{"error": message}`.
pub fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}

/// Serves the recorder's contents: `GET /requests` → JSON array of [`SeenRequest`]. Meant for a separate
/// loopback-only listener so the debug view never sits behind the sidecar.
#[derive(Debug, Clone)]
pub struct DebugApp(pub Recorder);

impl App for DebugApp {
    async fn handle(&self, req: Captured) -> Response<Body> {
        match (&req.method, req.path.as_str()) {
            (&Method::GET, "/requests") => json(StatusCode::OK, &self.0.snapshot()),
            _ => error(
                StatusCode::NOT_FOUND,
                "debug endpoint serves GET /requests only",
            ),
        }
    }
}

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
    inner: Client<HttpConnector, Body>,
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
