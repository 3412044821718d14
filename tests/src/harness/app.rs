//! The fake services behind a sidecar, on loopback, speaking plain HTTP like a real app:
//! - [`FakeApp`]: a hyper HTTP/1.1 app on 127.0.0.1:0 that records every request it gets
//!   (method, path, headers, body length), can answer slowly or with large bodies, and counts
//!   its open connections;
//! - [`serve`] with an [`App`]: the HTTP/1.1 + h2c server loop the FinTech services run on, with
//!   a [`Recorder`] of every request and [`DebugApp`] serving it;
//! - [`Servers`] / [`run_app`]: how the FinTech binaries bind their listeners and run until told
//!   to stop.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use gatehouse_policy::SpiffeId;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// What the fake app received.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method.
    pub method: Method,
    /// Path and query as received.
    pub path_and_query: String,
    /// Headers as received.
    pub headers: HeaderMap,
    /// Request body length (counted while streaming, never buffered).
    pub body_len: u64,
}

/// A plain HTTP/1.1 app on 127.0.0.1:0 that records every request.
///
/// Behaviour by query parameter: `sleep_ms=N` waits N ms before answering; `download=N`
/// streams an N-byte body; otherwise it reads the request body to the end and answers 200 with
/// `{"method","path","body_len"}`. Every response names the app in `x-app-addr` (its
/// address). [`FakeApp::set_delay`] and [`FakeApp::set_status`] make it slow or failing.
pub struct FakeApp {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    behaviour: Arc<Behaviour>,
    open: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// Counts an app connection open until dropped (its `serve_connection` ended: the sidecar
/// closed it, or a write to it failed).
struct OpenGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

type AppBody = Either<Full<Bytes>, Generated>;

/// What a [`FakeApp`] does to every request (changed while it runs).
#[derive(Debug)]
struct Behaviour {
    /// `x-app-addr`.
    name: HeaderValue,
    /// Milliseconds to wait before answering.
    delay_ms: std::sync::atomic::AtomicU64,
    /// The status to answer with instead of 200; 0 = normal.
    status: std::sync::atomic::AtomicU16,
}

impl FakeApp {
    /// Starts the app.
    ///
    /// # Panics
    /// If 127.0.0.1:0 cannot be bound.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let addr = listener.local_addr().expect("app addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let behaviour = Arc::new(Behaviour {
            name: HeaderValue::from_str(&addr.to_string()).expect("an address is a header value"),
            delay_ms: 0.into(),
            status: 0.into(),
        });
        let does = behaviour.clone();
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let opened = open.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                let does = does.clone();
                opened.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let guard = OpenGuard(opened.clone());
                tokio::spawn(async move {
                    let _guard = guard;
                    let svc =
                        hyper::service::service_fn(move |req| app(log.clone(), does.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            seen,
            behaviour,
            open,
            task,
        }
    }

    /// Every later request waits `delay` before it is answered.
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.behaviour
            .delay_ms
            .store(ms, std::sync::atomic::Ordering::SeqCst);
    }

    /// Every later request is answered `status` (with an empty body); `200` = normal again.
    pub fn set_status(&self, status: StatusCode) {
        let code = if status == StatusCode::OK {
            0
        } else {
            status.as_u16()
        };
        self.behaviour
            .status
            .store(code, std::sync::atomic::Ordering::SeqCst);
    }

    /// Connections from the sidecar that are open now (accepted, not yet closed by the
    /// sidecar or failed on a write).
    pub fn open_connections(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The app's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().expect("log").clone()
    }

    /// How many requests arrived.
    pub fn count(&self) -> usize {
        self.seen.lock().expect("log").len()
    }
}

impl Drop for FakeApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn query_u64(q: Option<&str>, key: &str) -> Option<u64> {
    q?.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

async fn app(
    log: Arc<Mutex<Vec<Seen>>>,
    does: Arc<Behaviour>,
    req: Request<Incoming>,
) -> Result<Response<AppBody>, hyper::Error> {
    let mut resp = answer(log, &does, req).await?;
    resp.headers_mut().insert("x-app-addr", does.name.clone());
    Ok(resp)
}

async fn answer(
    log: Arc<Mutex<Vec<Seen>>>,
    does: &Behaviour,
    req: Request<Incoming>,
) -> Result<Response<AppBody>, hyper::Error> {
    let (parts, mut body) = req.into_parts();
    let mut body_len = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            body_len += d.len() as u64;
        }
    }
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.to_string(), ToString::to_string);
    log.lock().expect("log").push(Seen {
        method: parts.method.clone(),
        path_and_query: path_and_query.clone(),
        headers: parts.headers.clone(),
        body_len,
    });
    let delay = does.delay_ms.load(std::sync::atomic::Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let status = does.status.load(std::sync::atomic::Ordering::SeqCst);
    if let Ok(status) = StatusCode::from_u16(status) {
        let mut resp = Response::new(Either::Left(Full::new(Bytes::new())));
        *resp.status_mut() = status;
        return Ok(resp);
    }
    let q = parts.uri.query();
    if let Some(ms) = query_u64(q, "sleep_ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(n) = query_u64(q, "download") {
        return Ok(Response::new(Either::Right(Generated::new(n))));
    }
    let json = serde_json::json!({
        "method": parts.method.as_str(),
        "path": path_and_query,
        "body_len": body_len,
    });
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from(json.to_string()))));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert("x-app", http::HeaderValue::from_static("fake"));
    if query_u64(q, "hop_header") == Some(1) {
        // A header the response's `Connection` names: the sidecar must not pass it on.
        let h = resp.headers_mut();
        h.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("x-app-hop"),
        );
        h.insert("x-app-hop", http::HeaderValue::from_static("1"));
    }
    Ok(resp)
}

static CHUNK: [u8; 64 * 1024] = [b'g'; 64 * 1024];

/// A body of `n` generated bytes, produced chunk by chunk (never held in memory).
#[derive(Debug)]
pub struct Generated {
    left: u64,
}

impl Generated {
    /// `n` bytes.
    pub fn new(n: u64) -> Self {
        Self { left: n }
    }
}

impl Body for Generated {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(CHUNK.len() as u64);
        self.left -= n;
        #[allow(clippy::cast_possible_truncation)] // n <= 64 KiB
        let chunk = Bytes::from_static(&CHUNK[..n as usize]);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

// ---- the FinTech services' server loop ------------------------------------------------------

/// Response body type of every [`App`].
pub type ServiceBody = Full<Bytes>;

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
    fn handle(&self, req: Captured) -> impl Future<Output = Response<ServiceBody>> + Send;

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

async fn dispatch<A: App>(app: &A, req: Request<hyper::body::Incoming>) -> Response<ServiceBody> {
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
pub fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<ServiceBody> {
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
pub fn error(status: StatusCode, message: &str) -> Response<ServiceBody> {
    json(status, &serde_json::json!({ "error": message }))
}

/// Serves the recorder's contents: `GET /requests` → JSON array of [`SeenRequest`]. Meant for a separate
/// loopback-only listener so the debug view never sits behind the sidecar.
#[derive(Debug, Clone)]
pub struct DebugApp(pub Recorder);

impl App for DebugApp {
    async fn handle(&self, req: Captured) -> Response<ServiceBody> {
        match (&req.method, req.path.as_str()) {
            (&Method::GET, "/requests") => json(StatusCode::OK, &self.0.snapshot()),
            _ => error(
                StatusCode::NOT_FOUND,
                "debug endpoint serves GET /requests only",
            ),
        }
    }
}

// ---- the FinTech binaries' listeners ---------------------------------------------------------

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({what}): {source}")]
pub struct BindError {
    /// What the listener is for.
    pub what: &'static str,
    /// The address asked for.
    pub addr: SocketAddr,
    /// Cause.
    #[source]
    pub source: std::io::Error,
}

/// The servers of one fake-service process.
#[derive(Debug, Default)]
pub struct Servers {
    tasks: JoinSet<()>,
}

impl Servers {
    /// Binds `addr` and serves `app` on it; prints one `NAME listening on ADDR` line.
    ///
    /// # Errors
    /// [`BindError`] when the address cannot be bound.
    pub async fn add<A: App>(
        &mut self,
        what: &'static str,
        addr: SocketAddr,
        app: Arc<A>,
    ) -> Result<(), BindError> {
        let listener =
            TcpListener::bind(addr)
                .await
                .map_err(|source| BindError { what, addr, source })?;
        // The bound address (port 0 asks the kernel for one; the launcher reads it from here).
        let bound = listener.local_addr().unwrap_or(addr);
        println!("{what} listening on {bound}");
        self.tasks.spawn(serve(listener, app));
        Ok(())
    }

    /// Adds the loopback debug endpoint (`GET /requests`) for `recorder`, when an address is given.
    ///
    /// # Errors
    /// [`BindError`] when the address cannot be bound.
    pub async fn add_debug(
        &mut self,
        addr: Option<SocketAddr>,
        recorder: &Recorder,
    ) -> Result<(), BindError> {
        match addr {
            Some(addr) => {
                self.add("debug endpoint", addr, Arc::new(DebugApp(recorder.clone())))
                    .await
            }
            None => Ok(()),
        }
    }

    /// Runs until SIGINT or SIGTERM.
    pub async fn run_until_signal(mut self) {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let terminated = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = terminated => {}
            _ = self.tasks.join_next() => {}
        }
        self.tasks.shutdown().await;
    }
}

/// The `main` of a one-app fake service: serves `app` as `program` on `listen`, plus the debug
/// endpoint for `recorder` when `debug_listen` is given, until SIGINT/SIGTERM. Exit code 0, or 2
/// (rendered) when a listener cannot be bound.
pub async fn run_app<A: App>(
    program: &'static str,
    listen: SocketAddr,
    app: Arc<A>,
    debug_listen: Option<SocketAddr>,
    recorder: &Recorder,
) -> std::process::ExitCode {
    let mut servers = Servers::default();
    let bound = match servers.add(program, listen, app).await {
        Ok(()) => servers.add_debug(debug_listen, recorder).await,
        Err(e) => Err(e),
    };
    if let Err(e) = bound {
        return render_bind_error(program, &e);
    }
    servers.run_until_signal().await;
    std::process::ExitCode::SUCCESS
}

/// The flag every fake-service binary shares: where to serve its request recorder.
#[derive(Debug, Clone, clap::Args)]
pub struct DebugArgs {
    /// Loopback address serving `GET /requests`: every request the app received, with its headers.
    #[arg(long)]
    pub debug_listen: Option<SocketAddr>,
}

/// Prints a bind failure the way every fake-service binary does, and returns exit code 2.
pub fn render_bind_error(program: &str, e: &BindError) -> std::process::ExitCode {
    eprintln!("{program}: error: {e}");
    eprintln!(
        "  help: another process (an earlier demo run?) may hold port {}; stop it or pick another address",
        e.addr.port()
    );
    std::process::ExitCode::from(2)
}
