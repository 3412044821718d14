//! The pooled mTLS client to one upstream (one `[[outbound]]` entry).
//!
//! Connections are opened on demand: DNS is resolved at connect time (never cached from
//! startup), TCP, then TLS with our certificate and the server's identity pinned
//! ([`ServerIdentityVerifier`](crate::tls::client::ServerIdentityVerifier)), then HTTP/2 when
//! the server agreed to `h2` in ALPN (one connection, many concurrent streams) or HTTP/1.1
//! (a keep-alive pool). The pool is bounded (`max_connections`, waiting callers get a
//! connection as one frees up), idle connections close after `idle_timeout`, and no connection
//! is reused past `max_connection_age`, so a rotated client certificate is presented within a
//! bounded time.
//!
//! HTTP/2 is spoken with the `h2` crate directly (bodies: [`crate::http::body`]): hyper's HTTP/2
//! client spawned a task per request and passed each request and response through a channel
//! and a oneshot, which cost about a tenth of this sidecar's instructions per request. The
//! request's own task now opens the stream and awaits the response head. The connection task
//! sends a PING every 30 s and drops a connection whose peer does not answer within 20 s, so a
//! peer that vanished mid-response is noticed.
//!
//! Retries, at most one per request, to another endpoint when there is one: a request is sent
//! again when it provably never left: the connection could not be established (TCP refused or
//! reset during the handshake, or TLS: then only to another endpoint), or a pooled connection
//! was found closed before any of the request was queued (HTTP/1.1: hyper handed it back;
//! HTTP/2: the connection refused new streams, e.g. after the peer's GOAWAY), or the peer
//! refused the HTTP/2 stream unprocessed (`REFUSED_STREAM`, a GOAWAY below it: only with
//! `retry_idempotent`, which keeps a bodiless request's head; h2 consumed the original).
//! With `retry_idempotent`, a bodiless GET/HEAD/OPTIONS answered 503 is sent again within the
//! [`RetryBudget`]. Nothing else is retried.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use rustls::AlertDescription;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use super::error::OutboundError;
use super::metrics::{ENDPOINT_STATES, RetryReason, UpstreamMetrics};
use super::tls_source::TlsSource;
use crate::balance::discover::{DiscoverConfig, Discovery};
use crate::balance::{Balancer, BalancerStatus, Outcome, Pick, RetryBudget};
use crate::config::{OutboundLimits, Target};
use crate::http::body::{BoxError, HttpBody, RecvBody};
use crate::http::h1_pool;
use crate::http::h2_client::{self, H2Sender, send_h2};
use crate::http::headers::{strip_for_h2, strip_hop_by_hop};
use crate::tls::alert_tap::AlertTap;
use crate::tls::client::received_alert;

/// One upstream: its endpoints (from `connect`: an IP literal is one, a DNS name is every
/// address it resolves to, re-resolved on its TTL) behind a balancer that picks one per
/// request, each endpoint with its own connection pool.
pub(crate) struct Upstream {
    name: String,
    target: Target,
    balancer: Balancer<Arc<Pool>>,
    /// Set once the first resolution has published endpoints (or failed).
    resolved: Notify,
    /// The last resolution error while no endpoint is known (the request's error then).
    resolve_error: Mutex<Option<String>>,
    /// What this upstream last added to `gatehouse_outbound_endpoints{state}`.
    counted: Mutex<[i64; 4]>,
    /// The retry budget of `retry_idempotent`; `None` (nothing counted) without it.
    budget: Option<RetryBudget>,
    limits: OutboundLimits,
    metrics: UpstreamMetrics,
}

/// The connection pool to one endpoint address of an upstream.
pub(crate) struct Pool {
    name: String,
    addr: SocketAddr,
    /// `gatehouse_outbound_endpoint_requests_total` for this endpoint.
    requests: IntCounter,
    authority: Authority,
    host_header: HeaderValue,
    server_name: ServerName<'static>,
    /// The TLS client configuration (read when dialling) and the trust generation (read
    /// before reusing a connection): connections of an older generation are not reused.
    tls: Arc<dyn TlsSource>,
    limits: OutboundLimits,
    permits: Arc<Semaphore>,
    available: Arc<Notify>,
    idle: Mutex<Idle>,
    metrics: UpstreamMetrics,
}

struct Idle {
    /// The shared HTTP/2 connection and when a request last started on it.
    h2: Option<(Conn, Instant)>,
    /// Idle HTTP/1.1 connections (the keep-alive pool both hops share).
    h1: h1_pool::Idle<Conn>,
}

enum Sender {
    H1(http1::SendRequest<ReqBody>),
    H2(H2Sender),
}

/// The upstream's response body, streamed: HTTP/1.1 (hyper) or HTTP/2 (h2).
pub(crate) type UpstreamBody = HttpBody;

/// A checked-out connection. HTTP/2 connections are shared: each checkout holds a clone of
/// the sender.
struct Conn {
    sender: Sender,
    born: Instant,
    /// The trust generation ([`TlsSource::trust_generation`]) when the connection was started.
    generation: u64,
    /// The fatal TLS alert the server sent on this connection, once read: how a server that
    /// refused our certificate after a TLS 1.3 handshake had already "succeeded" shows up.
    alert: Arc<OnceLock<AlertDescription>>,
    /// The serial number of the server's certificate, lowercase hex (for the audit line).
    serial: Arc<str>,
}

impl Conn {
    /// Another handle on a shared HTTP/2 connection; `None` for HTTP/1.1 (one request at a
    /// time, never shared).
    fn share(&self) -> Option<Conn> {
        match &self.sender {
            Sender::H2(s) => Some(Conn {
                sender: Sender::H2(s.clone()),
                born: self.born,
                generation: self.generation,
                alert: Arc::clone(&self.alert),
                serial: Arc::clone(&self.serial),
            }),
            Sender::H1(_) => None,
        }
    }

    fn is_usable(&self, max_age: Duration, now: Instant) -> bool {
        let open = match &self.sender {
            Sender::H1(s) => !s.is_closed(),
            Sender::H2(s) => !s.is_closed(),
        };
        open && now.saturating_duration_since(self.born) < max_age
    }
}

impl h1_pool::Keepalive for Conn {
    fn is_closed(&self) -> bool {
        match &self.sender {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    fn is_ready(&self) -> bool {
        match &self.sender {
            Sender::H1(s) => s.is_ready(),
            Sender::H2(_) => true,
        }
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        match &mut self.sender {
            Sender::H1(s) => s.poll_ready(cx),
            Sender::H2(_) => Poll::Ready(Ok(())),
        }
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("target", &self.target)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// What every endpoint pool of one upstream shares.
struct PoolSpec {
    name: String,
    authority: Authority,
    host_header: HeaderValue,
    server_name: ServerName<'static>,
    tls: Arc<dyn TlsSource>,
    limits: OutboundLimits,
    metrics: UpstreamMetrics,
}

impl Upstream {
    /// The upstream `name` at `target`, presenting `server_name` as SNI, dialling with the
    /// configuration `tls` holds for `name`. An IP literal is one endpoint; a DNS name is
    /// resolved (by `discover`'s server or the system's) in a task that keeps the endpoint set
    /// current until the returned `Arc` is dropped. Must be called inside a Tokio runtime.
    pub(crate) fn start(
        name: &str,
        target: Target,
        server_name: ServerName<'static>,
        tls: Arc<dyn TlsSource>,
        limits: OutboundLimits,
        metrics: UpstreamMetrics,
    ) -> Arc<Self> {
        let (balance, discover) = (limits.balance, limits.discover);
        let authority = target.authority();
        let host_header = HeaderValue::from_str(authority.as_str())
            .expect("an authority is a valid header value");
        let spec = PoolSpec {
            name: name.to_owned(),
            authority,
            host_header,
            server_name,
            tls,
            limits: limits.clone(),
            metrics: metrics.clone(),
        };
        let upstream = Arc::new(Self {
            name: name.to_owned(),
            target: target.clone(),
            balancer: Balancer::new(balance),
            resolved: Notify::new(),
            resolve_error: Mutex::new(None),
            counted: Mutex::new([0; 4]),
            budget: limits.retry_idempotent.then(RetryBudget::default),
            limits,
            metrics,
        });
        let fixed = target
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok();
        match fixed {
            Some(ip) => {
                let addr = SocketAddr::new(ip, target.port());
                upstream.balancer.add(addr, Pool::start(&spec, addr));
                tokio::spawn(maintain(Arc::downgrade(&upstream), None));
            }
            None => {
                tokio::spawn(discover_endpoints(
                    Arc::downgrade(&upstream),
                    spec,
                    discover,
                ));
            }
        }
        upstream
    }

    /// The `[[outbound]]` name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The upstream's metric handles.
    pub(crate) fn metrics(&self) -> &UpstreamMetrics {
        &self.metrics
    }

    /// The endpoints and their states (for `/status`).
    pub(crate) fn status(&self) -> BalancerStatus {
        self.balancer.status()
    }

    /// Picks an endpoint other than `not` when there is one; before the first resolution
    /// answered, waits for it (up to the connect timeout).
    async fn pick(&self, not: Option<SocketAddr>) -> Result<Pick<Arc<Pool>>, OutboundError> {
        if let Ok(pick) = self.balancer.pick_at(Instant::now(), not) {
            return Ok(pick);
        }
        let deadline = tokio::time::Instant::now() + self.limits.connect_timeout;
        loop {
            let resolved = self.resolved.notified();
            tokio::pin!(resolved);
            resolved.as_mut().enable();
            if let Ok(pick) = self.balancer.pick_at(Instant::now(), not) {
                return Ok(pick);
            }
            let error = self
                .resolve_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if let Some(reason) = error {
                return Err(self.no_endpoints(reason));
            }
            if tokio::time::timeout_at(deadline, resolved).await.is_err() {
                return Err(self.no_endpoints("no answer yet".to_owned()));
            }
        }
    }

    /// Records how a request on `pick` ended (and counts an ejection it caused).
    fn finish(&self, pick: Pick<Arc<Pool>>, outcome: Outcome) {
        if pick.finish(&self.balancer, outcome) {
            self.metrics.ejections.inc();
        }
    }

    /// Drops drained endpoints and brings `gatehouse_outbound_endpoints` up to date.
    fn tick(&self) {
        self.balancer.prune();
        let mut now = [0i64; 4];
        for e in self.balancer.status().endpoints {
            let i = ENDPOINT_STATES
                .iter()
                .position(|s| *s == e.state.label())
                .unwrap_or(0);
            now[i] += 1;
        }
        self.count_endpoints(now);
    }

    fn count_endpoints(&self, now: [i64; 4]) {
        let mut counted = self.counted.lock().unwrap_or_else(PoisonError::into_inner);
        for (i, gauge) in self.metrics.endpoints.iter().enumerate() {
            gauge.add(now[i] - counted[i]);
        }
        *counted = now;
    }

    fn no_endpoints(&self, reason: String) -> OutboundError {
        OutboundError::Resolve {
            host: self.target.host().to_owned(),
            source: io::Error::new(io::ErrorKind::NotFound, reason),
        }
    }

    /// Sends `req` upstream and returns the response head (the body streams on) and the
    /// serial number of the server's certificate (lowercase hex).
    ///
    /// # Errors
    /// Any [`OutboundError`]; see the module docs for which ones were retried first.
    pub(crate) async fn send(
        self: &Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<(Response<UpstreamBody>, Arc<str>), OutboundError> {
        // With `retry_idempotent` only: the request counts toward the retry budget, and a
        // bodiless one keeps a copy of its head for a second attempt. Without it nothing is
        // copied or counted (one branch).
        let mut replay = match &self.budget {
            Some(budget) => {
                budget.deposit();
                Replay::of(&req)
            }
            None => None,
        };
        let mut req = req.map(Either::Left);
        let mut connect_retried = false;
        let mut unsent_retried = false;
        let mut not = None;
        let mut next = None;
        loop {
            let mut pick = match next.take() {
                Some(pick) => pick,
                None => self.pick(not).await?,
            };
            // A clone (an atomic increment) so the pick can be updated while the pool is used.
            let pool = Arc::clone(pick.conn());
            pool.requests.inc();
            let conn = match pool.checkout().await {
                Ok(conn) => conn,
                Err(e) => {
                    not = Some(pick.addr());
                    match e.endpoint_outcome() {
                        Some(outcome) => self.finish(pick, outcome),
                        None => drop(pick),
                    }
                    if connect_retried {
                        return Err(e);
                    }
                    if !e.is_retryable() {
                        // A certificate or identity failure is deterministic for this
                        // endpoint, not for the others: nothing was sent, so the request
                        // goes to another endpoint if there is one (never the same again).
                        let other = self
                            .balancer
                            .pick_at(Instant::now(), not)
                            .ok()
                            .filter(|p| Some(p.addr()) != not);
                        match other {
                            Some(p) if e.endpoint_outcome() == Some(Outcome::ConnectFailure) => {
                                next = Some(p);
                            }
                            _ => return Err(e),
                        }
                    }
                    debug!(upstream = %self.name, endpoint = ?not, error = %e, "connect failed before anything was sent; retrying on another endpoint");
                    connect_retried = true;
                    self.metrics.retry(RetryReason::Connect);
                    continue;
                }
            };
            pool.set_target(&mut req, &conn.sender);
            let serial = Arc::clone(&conn.serial);
            pick.sent();
            match pool.exchange(conn, req).await {
                Ok(resp) => {
                    let status = resp.status();
                    let outcome = match status.as_u16() {
                        502..=504 => Outcome::GatewayError,
                        _ => Outcome::Success,
                    };
                    let addr = pick.addr();
                    self.finish(pick, outcome);
                    if status == StatusCode::SERVICE_UNAVAILABLE
                        && !connect_retried
                        && let Some(again) = self.replay_503(&mut replay)
                    {
                        // The 503 (its body unread) is dropped: the app sees the second answer.
                        drop(resp);
                        debug!(upstream = %self.name, endpoint = %addr, "503 to an idempotent request; retrying on another endpoint");
                        self.metrics.retry(RetryReason::Status503);
                        not = Some(addr);
                        req = again;
                        continue;
                    }
                    return Ok((resp, serial));
                }
                Err(Exchange::Unsent(back)) if !unsent_retried => {
                    not = Some(pick.addr());
                    drop(pick);
                    debug!(upstream = %self.name, "pooled connection closed before the request was written; retrying on another endpoint");
                    unsent_retried = true;
                    self.metrics.retry(RetryReason::Unsent);
                    req = *back;
                }
                Err(Exchange::Unsent(_)) => return Err(OutboundError::ClosedBeforeSend),
                Err(Exchange::Refused(e)) => {
                    // The peer did not process the stream (RST_STREAM REFUSED_STREAM, or a
                    // GOAWAY below it): it provably never reached the app, whatever the
                    // method. Sent again when a copy of the head was kept.
                    not = Some(pick.addr());
                    match e.endpoint_outcome() {
                        Some(outcome) => self.finish(pick, outcome),
                        None => drop(pick),
                    }
                    match replay.take() {
                        Some(r) => {
                            debug!(upstream = %self.name, endpoint = ?not, error = %e, "the peer refused the stream unprocessed; retrying on another endpoint");
                            self.metrics.retry(RetryReason::Refused);
                            req = r.request();
                        }
                        None => return Err(e),
                    }
                }
                Err(Exchange::Failed(e)) => {
                    match e.endpoint_outcome() {
                        Some(outcome) => self.finish(pick, outcome),
                        None => drop(pick),
                    }
                    return Err(e);
                }
            }
        }
    }

    /// The second attempt of a request answered 503, when `retry_idempotent` kept its head,
    /// it is a GET, HEAD or OPTIONS without a body, it was not retried yet, and the retry
    /// budget has room.
    fn replay_503(&self, replay: &mut Option<Replay>) -> Option<Request<ReqBody>> {
        let r = replay.take_if(|r| r.idempotent)?;
        let budget = self.budget.as_ref()?;
        if budget.try_withdraw() {
            Some(r.request())
        } else {
            self.metrics.retry_budget_exhausted();
            None
        }
    }
}

/// The request body the pools send: the app's, or none (a bodiless request sent again).
pub(crate) type ReqBody = Either<Incoming, Empty<Bytes>>;

/// The head of a bodiless request, kept (only with `retry_idempotent`) so it can be sent a
/// second time.
struct Replay {
    method: Method,
    uri: Uri,
    version: http::Version,
    headers: http::HeaderMap,
    /// GET, HEAD or OPTIONS: may be retried after a 503.
    idempotent: bool,
}

impl Replay {
    /// A copy of `req`'s head, when it has no body (a body is never buffered for a retry).
    fn of(req: &Request<Incoming>) -> Option<Replay> {
        if !http_body::Body::is_end_stream(req.body()) {
            return None;
        }
        let method = req.method().clone();
        Some(Replay {
            idempotent: matches!(method, Method::GET | Method::HEAD | Method::OPTIONS),
            method,
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        })
    }

    /// The request again (the pool re-targets it for its connection).
    fn request(self) -> Request<ReqBody> {
        let mut req = Request::new(Either::Right(Empty::new()));
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

impl Upstream {
    /// Opens a WebSocket tunnel (issue 17): an RFC 8441 extended-CONNECT stream for `head`
    /// on an endpoint's shared HTTP/2 connection, and waits for the response head (within
    /// `request_timeout`). Returns the response (its body is the peer's half of the stream),
    /// our half, and the serial of the server's certificate. Not retried: a tunnel is opened
    /// once; an HTTP/1.1 upstream (`protocol = "http1"`) cannot carry one.
    ///
    /// # Errors
    /// As [`Upstream::send`], and [`OutboundError::Upstream`] when the peer speaks HTTP/1.1 or
    /// does not allow extended CONNECT.
    pub(crate) async fn open_tunnel(
        self: &Arc<Self>,
        mut head: Request<()>,
    ) -> Result<
        (
            Response<h2::RecvStream>,
            h2::SendStream<bytes::Bytes>,
            Arc<str>,
        ),
        OutboundError,
    > {
        let mut pick = self.pick(None).await?;
        let pool = Arc::clone(pick.conn());
        pool.requests.inc();
        let conn = match pool.checkout().await {
            Ok(conn) => conn,
            Err(e) => {
                match e.endpoint_outcome() {
                    Some(outcome) => self.finish(pick, outcome),
                    None => drop(pick),
                }
                return Err(e);
            }
        };
        let Sender::H2(mut sender) = conn.sender else {
            drop(pick);
            return Err(OutboundError::Upstream(
                "WebSocket needs HTTP/2 to the peer sidecar (RFC 8441): this upstream speaks \
                 HTTP/1.1; set `protocol = \"auto\"` or `\"h2\"`"
                    .into(),
            ));
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTPS);
        parts.authority = Some(pool.authority.clone());
        parts.path_and_query = head.uri().path_and_query().cloned();
        *head.uri_mut() = Uri::from_parts(parts).map_err(|e| OutboundError::Upstream(e.into()))?;
        *head.version_mut() = http::Version::HTTP_2;
        pick.sent();
        let timeout = self.limits.response_timeout;
        let opened = tokio::time::timeout(timeout, async {
            let (response, send) =
                h2_client::open_extended_connect(&mut sender, head, self.limits.connect_timeout)
                    .await?;
            Ok::<_, BoxError>((response.await?, send))
        })
        .await;
        match opened {
            Ok(Ok((resp, send))) => {
                let outcome = match resp.status().as_u16() {
                    502..=504 => Outcome::GatewayError,
                    _ => Outcome::Success,
                };
                self.finish(pick, outcome);
                Ok((resp, send, conn.serial))
            }
            Ok(Err(e)) => {
                self.finish(pick, Outcome::GatewayError);
                Err(OutboundError::Upstream(e))
            }
            Err(_elapsed) => {
                self.finish(pick, Outcome::GatewayError);
                Err(OutboundError::ResponseTimeout(timeout))
            }
        }
    }
}

/// Keeps `upstream`'s endpoint set equal to what `spec`'s host resolves to: new addresses get
/// a pool (warming up), addresses that left drain. Ends when the upstream is dropped.
async fn discover_endpoints(upstream: Weak<Upstream>, spec: PoolSpec, config: DiscoverConfig) {
    let (host, port) = match upstream.upgrade() {
        Some(u) => (u.target.host().to_owned(), u.target.port()),
        None => return,
    };
    let mut rx = loop {
        let first = match Discovery::new(&host, port, config) {
            Ok(d) => d.spawn().await,
            Err(e) => Err(e),
        };
        let Some(u) = upstream.upgrade() else { return };
        match first {
            Ok(rx) => break rx,
            Err(e) => {
                warn!(upstream = %spec.name, %host, error = %e, "cannot resolve the upstream; retrying");
                *u.resolve_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
                u.resolved.notify_waiters();
            }
        }
        drop(u);
        tokio::time::sleep(config.min_ttl).await;
    };
    {
        let Some(u) = upstream.upgrade() else { return };
        let addrs = Arc::clone(&rx.borrow_and_update());
        u.set_endpoints(&addrs, &spec);
    }
    maintain(upstream, Some((rx, spec))).await;
}

impl Upstream {
    fn set_endpoints(&self, addrs: &[SocketAddr], spec: &PoolSpec) {
        self.balancer.update(addrs, |addr| Pool::start(spec, addr));
        *self
            .resolve_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        self.resolved.notify_waiters();
        self.tick();
    }
}

/// Applies each new endpoint set from discovery (if any), and every second drops drained
/// endpoints and updates the endpoint gauges. Ends when the upstream is dropped.
async fn maintain(
    upstream: Weak<Upstream>,
    mut discovery: Option<(watch::Receiver<Arc<Vec<SocketAddr>>>, PoolSpec)>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let changed = async {
            match &mut discovery {
                Some((rx, _)) => rx.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ok = changed => {
                let Some(u) = upstream.upgrade() else { return };
                match (ok, &mut discovery) {
                    (true, Some((rx, spec))) => {
                        let addrs = Arc::clone(&rx.borrow_and_update());
                        u.set_endpoints(&addrs, spec);
                    }
                    // Discovery ended (not while this task holds the receiver).
                    _ => discovery = None,
                }
            }
            _ = tick.tick() => {
                let Some(u) = upstream.upgrade() else { return };
                u.tick();
            }
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.count_endpoints([0; 4]);
    }
}

impl Pool {
    /// A pool for the endpoint `addr` of `spec`'s upstream, and a task that closes idle, aged
    /// and retired connections (it stops when the returned `Arc` is dropped). Must be called
    /// inside a Tokio runtime.
    fn start(spec: &PoolSpec, addr: SocketAddr) -> Arc<Self> {
        let limits = spec.limits.clone();
        let pool = Arc::new(Self {
            name: spec.name.clone(),
            addr,
            requests: spec.metrics.endpoint_requests(addr),
            authority: spec.authority.clone(),
            host_header: spec.host_header.clone(),
            server_name: spec.server_name.clone(),
            tls: Arc::clone(&spec.tls),
            permits: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            available: Arc::new(Notify::new()),
            idle: Mutex::new(Idle {
                h2: None,
                h1: h1_pool::Idle::new(limits.max_idle, limits.idle_timeout),
            }),
            limits,
            metrics: spec.metrics.clone(),
        });
        tokio::spawn(reap(Arc::downgrade(&pool)));
        pool
    }

    /// The TLS client configuration a new connection uses, from the current snapshot: the one
    /// spot where an upstream obtains it (`None` only if the snapshot has no entry for this
    /// upstream, which the one build path rules out).
    fn client_config(&self) -> Option<Arc<ClientConfig>> {
        self.tls.client_config(&self.name)
    }

    /// Open, younger than the maximum age at `now`, and not retired: opened under the current
    /// trust generation (a reload that changed the bundle or CRL, or a CRL gone stale beyond
    /// its grace period, retires every connection, so a revoked or no longer trusted server is
    /// not talked to again; requests in flight finish on theirs).
    fn usable(&self, conn: &Conn, now: Instant) -> bool {
        conn.generation == self.tls.trust_generation()
            && conn.is_usable(self.limits.max_connection_age, now)
    }

    /// Writes `req` on `conn` and waits for the response head.
    async fn exchange(
        self: &Arc<Self>,
        conn: Conn,
        req: Request<ReqBody>,
    ) -> Result<Response<UpstreamBody>, Exchange> {
        let timeout = self.limits.response_timeout;
        let Conn {
            sender,
            born,
            generation,
            alert,
            serial,
        } = conn;
        match sender {
            Sender::H1(mut s) => {
                let sent = tokio::time::timeout(timeout, s.try_send_request(req)).await;
                if matches!(sent, Ok(Ok(_))) {
                    self.recycle_h1(Conn {
                        sender: Sender::H1(s),
                        born,
                        generation,
                        alert: Arc::clone(&alert),
                        serial,
                    });
                }
                match sent {
                    Err(_elapsed) => Err(Exchange::Failed(OutboundError::ResponseTimeout(timeout))),
                    Ok(Ok(resp)) => Ok(resp.map(UpstreamBody::H1)),
                    Ok(Err(mut err)) => {
                        let read = received_alert(err.error());
                        let unsent = err.take_message();
                        Err(failed(&alert, read, unsent, false, err.into_error().into()))
                    }
                }
            }
            Sender::H2(mut s) => match tokio::time::timeout(timeout, send_h2(&mut s, req)).await {
                Err(_elapsed) => Err(Exchange::Failed(OutboundError::ResponseTimeout(timeout))),
                Ok(Ok(resp)) => Ok(resp.map(|b| UpstreamBody::H2(RecvBody::new(b)))),
                Ok(Err((err, unsent))) => {
                    let read = err.get_io().and_then(|e| received_alert(e));
                    let refused = unsent.is_none() && h2_client::refused_unprocessed(&err);
                    Err(failed(&alert, read, unsent, refused, err.into()))
                }
            },
        }
    }

    /// Once the HTTP/1.1 response has been read to its end, the connection goes back to the
    /// idle set (if it is still young and open).
    fn recycle_h1(self: &Arc<Self>, conn: Conn) {
        h1_pool::once_ready(conn, self, |pool, conn| pool.put_idle(conn));
    }

    fn put_idle(&self, conn: Conn) {
        let now = Instant::now();
        if !self.usable(&conn, now) {
            return;
        }
        {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if !idle.h1.put(conn, now) {
                return; // dropping the sender closes the connection
            }
        }
        self.available.notify_one();
    }

    /// A connection to send on: the shared h2 connection, an idle h1 one, or a new one if the
    /// pool has room; otherwise waits for one of those to become true.
    async fn checkout(&self) -> Result<Conn, OutboundError> {
        // The common case, a pooled connection, without registering as a waiter first.
        if let Some(conn) = self.take_pooled() {
            return Ok(conn);
        }
        let deadline = tokio::time::Instant::now() + self.limits.pool_wait_timeout;
        loop {
            let notified = self.available.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(conn) = self.take_pooled() {
                return Ok(conn);
            }
            if let Ok(permit) = self.permits.clone().try_acquire_owned() {
                // Boxed: the connect future (DNS, TCP, TLS and HTTP handshakes) is large and
                // rarely needed; inline, every request's future would carry (and move) it.
                return Box::pin(self.connect(permit)).await;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(OutboundError::PoolTimeout(self.limits.pool_wait_timeout));
            }
        }
    }

    fn take_pooled(&self) -> Option<Conn> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((h2, last_used)) = &mut idle.h2 {
            if self.usable(h2, now) {
                *last_used = now;
                return h2.share();
            }
            // Aged or closed: new streams go to a new connection; open streams finish.
            idle.h2 = None;
        }
        idle.h1.take(now, |conn| self.usable(conn, now))
    }

    /// Opens a new connection under the connect timeout.
    async fn connect(&self, permit: OwnedSemaphorePermit) -> Result<Conn, OutboundError> {
        let timeout = self.limits.connect_timeout;
        let result = match tokio::time::timeout(timeout, self.connect_inner(permit)).await {
            Ok(result) => result,
            Err(_elapsed) => {
                self.metrics.handshake("timeout");
                Err(OutboundError::ConnectTimeout(timeout))
            }
        };
        if result.is_err() {
            // The failed attempt's permit is free again: a waiting request may try.
            self.available.notify_one();
        }
        result
    }

    async fn connect_inner(&self, permit: OwnedSemaphorePermit) -> Result<Conn, OutboundError> {
        // The generation first: a trust change during the handshake (which uses the
        // configuration current now) retires this connection too.
        let generation = self.tls.trust_generation();
        let tcp = self.dial().await?;
        let Some(config) = self.client_config() else {
            return Err(OutboundError::Handshake(io::Error::other(format!(
                "no TLS client configuration for upstream `{}` (a bug: report it)",
                self.name
            ))));
        };
        let connector = TlsConnector::from(config);
        let started = Instant::now();
        let tls = match connector.connect(self.server_name.clone(), tcp).await {
            Ok(tls) => tls,
            Err(e) => {
                let err = OutboundError::from_handshake(e);
                self.metrics.handshake(err.reason());
                warn!(upstream = %self.name, error = %err, "outbound TLS handshake failed");
                return Err(err);
            }
        };
        self.metrics.handshake("ok");
        self.metrics.handshake_took(started.elapsed());
        let serial: Arc<str> = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(<[_]>::first)
            .map_or_else(String::new, crate::tls::serial_hex)
            .into();
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let alert = Arc::new(OnceLock::new());
        let io = AlertTap::new(tls, Arc::clone(&alert));
        let sender = if h2 {
            let (sender, conn) = h2_client::handshake(io)
                .await
                .map_err(|e| OutboundError::Upstream(e.into()))?;
            self.spawn_conn(conn, permit);
            Sender::H2(sender)
        } else {
            let (sender, conn) = http1::handshake(TokioIo::new(io))
                .await
                .map_err(|e| OutboundError::Upstream(e.into()))?;
            self.spawn_conn(conn, permit);
            Sender::H1(sender)
        };
        let conn = Conn {
            sender,
            born: Instant::now(),
            generation,
            alert,
            serial,
        };
        if let Some(shared) = conn.share() {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.h2 = Some((shared, Instant::now()));
            drop(idle);
            // Callers waiting for a connection can share this one.
            self.available.notify_waiters();
        }
        Ok(conn)
    }

    /// Opens TCP to this pool's endpoint.
    async fn dial(&self) -> Result<TcpStream, OutboundError> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|source| OutboundError::Connect {
                addr: self.addr.to_string(),
                source,
            })?;
        // Requests are small writes; do not let Nagle hold them back.
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    fn spawn_conn<F, E>(&self, conn: F, permit: OwnedSemaphorePermit)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Debug,
    {
        let open = self.metrics.connections_open.clone();
        let available = Arc::clone(&self.available);
        let name = self.name.clone();
        open.inc();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(upstream = %name, error = ?e, "upstream connection ended with an error");
            }
            open.dec();
            drop(permit);
            available.notify_one();
        });
    }

    /// Points the request at the upstream: origin-form URI and `Host` for HTTP/1.1, absolute
    /// URI (`:authority`) for HTTP/2, and drops what describes the app's connection (for
    /// HTTP/2 also its `transfer-encoding`, which `h2` refuses). Idempotent, so a request
    /// handed back unsent can be re-targeted for another connection.
    fn set_target(&self, req: &mut Request<ReqBody>, sender: &Sender) {
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        match sender {
            Sender::H1(_) => {
                *req.uri_mut() = Uri::from(path);
                *req.version_mut() = http::Version::HTTP_11;
                strip_hop_by_hop(req.headers_mut());
                req.headers_mut()
                    .insert(header::HOST, self.host_header.clone());
            }
            Sender::H2(_) => {
                let mut parts = http::uri::Parts::default();
                parts.scheme = Some(Scheme::HTTPS);
                parts.authority = Some(self.authority.clone());
                parts.path_and_query = Some(path);
                // Invariant: scheme, authority and path are all set and individually valid.
                *req.uri_mut() = Uri::from_parts(parts).expect("complete absolute URI");
                *req.version_mut() = http::Version::HTTP_2;
                let headers = req.headers_mut();
                strip_for_h2(headers);
                headers.remove(header::HOST);
            }
        }
    }

    /// Drops idle HTTP/1.1 connections past `idle_timeout` and the shared h2 connection once
    /// it is aged or closed.
    fn reap_idle(&self) {
        let limits = &self.limits;
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.h1.sweep(now, |conn| self.usable(conn, now));
        if idle.h2.as_ref().is_some_and(|(conn, last_used)| {
            now.saturating_duration_since(*last_used) >= limits.idle_timeout
                || !self.usable(conn, now)
        }) {
            // Streams still open on it finish; the connection closes after the last one.
            idle.h2 = None;
        }
    }
}

enum Exchange {
    /// The request came back: not one byte of it was written.
    Unsent(Box<Request<ReqBody>>),
    /// The peer refused the HTTP/2 stream without processing it (`REFUSED_STREAM`, or a
    /// GOAWAY whose last processed stream is below it); the request is gone (h2 took it).
    Refused(OutboundError),
    Failed(OutboundError),
}

/// Classifies a failed exchange: a TLS alert the server sent (read with the error, or earlier
/// by the connection's I/O tap) says more than the HTTP error; a request that came back unsent
/// may be retried, and so may a stream the peer `refused` unprocessed (when its head was
/// kept); anything else is the upstream's failure.
fn failed(
    tapped: &OnceLock<AlertDescription>,
    read: Option<AlertDescription>,
    unsent: Option<Request<ReqBody>>,
    refused: bool,
    err: BoxError,
) -> Exchange {
    // A server that refused our certificate after a TLS 1.3 handshake sends its alert as the
    // first thing we read; the connection task may have read it before the request was
    // written (the request then comes back unsent), and HTTP/2 streams only see a stringified
    // summary of the connection's error. The I/O tap recorded the original.
    if let Some(alert) = read.or_else(|| tapped.get().copied()) {
        return Exchange::Failed(OutboundError::from_alert(alert));
    }
    match unsent {
        Some(req) => Exchange::Unsent(Box::new(req)),
        None if refused => Exchange::Refused(OutboundError::Upstream(err)),
        None => Exchange::Failed(OutboundError::Upstream(err)),
    }
}

/// Background sweep of one pool; ends when the pool is dropped.
async fn reap(pool: Weak<Pool>) {
    let period = match pool.upgrade() {
        Some(p) => (p.limits.idle_timeout.min(p.limits.max_connection_age) / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(15)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match pool.upgrade() {
            Some(p) => p.reap_idle(),
            None => return,
        }
    }
}
