//! The pooled mTLS client to one upstream (one `[[outbound]]` entry).
//!
//! Connections are opened on demand: DNS is resolved at connect time (never cached from
//! startup), TCP, then TLS with our certificate and the server's identity pinned
//! ([`ServerIdentityVerifier`](crate::tls::client::ServerIdentityVerifier)), then HTTP/2 when
//! the server agreed to `h2` in ALPN (one connection, many concurrent streams) or HTTP/1.1
//! (a keep-alive pool); with `protocol = "auto"` also one HTTP/1.1 connection for requests sent
//! one at a time (the lane, [`super::pool`]). The pool is bounded (`max_connections`, waiting callers get a
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
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use http::uri::Scheme;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::Either;
use hyper::body::Incoming;
use rustls::pki_types::ServerName;
use tokio::sync::{Notify, watch};
use tracing::{debug, warn};

use super::error::OutboundError;
use super::metrics::{ENDPOINT_STATES, RetryReason, UpstreamMetrics};
use super::pool::{Exchange, Pool, PoolSpec, Replay, ReqBody, Sender, UpstreamBody};
use super::tls_source::TlsSource;
use crate::balance::discover::{DiscoverConfig, Discovery};
use crate::balance::{Balancer, BalancerStatus, Outcome, Pick, RetryBudget};
use crate::config::{OutboundLimits, Target, UpstreamProtocol};
use crate::http::body::BoxError;
use crate::http::h2_client::{self};

/// One upstream: its endpoints (from `connect`: an IP literal is one, a DNS name is every
/// address it resolves to, re-resolved on its TTL) behind a balancer that picks one per
/// request, each endpoint with its own connection pool.
pub(crate) struct Upstream {
    pub(super) name: String,
    pub(super) target: Target,
    pub(super) balancer: Balancer<Arc<Pool>>,
    /// Set once the first resolution has published endpoints (or failed).
    pub(super) resolved: Notify,
    /// The last resolution error while no endpoint is known (the request's error then).
    pub(super) resolve_error: Mutex<Option<String>>,
    /// What this upstream last added to `gatehouse_outbound_endpoints{state}`.
    pub(super) counted: Mutex<[i64; 4]>,
    /// The retry budget of `retry_idempotent`; `None` (nothing counted) without it.
    pub(super) budget: Option<RetryBudget>,
    pub(super) limits: OutboundLimits,
    pub(super) metrics: UpstreamMetrics,
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

impl Upstream {
    /// The upstream `name` at `target`, presenting `server_name` as SNI, dialling with the
    /// configuration `tls` holds for `name`. An IP literal is one endpoint; a DNS name is
    /// resolved (by `discover`'s server or the system's) in a task that keeps the endpoint set
    /// current until the returned `Arc` is dropped. Must be called inside a Tokio runtime.
    pub(crate) fn start(
        name: &str,
        target: Target,
        server_name: ServerName<'static>,
        protocol: UpstreamProtocol,
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
            protocol,
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
        // HTTP/1.x from the app may take the pool's HTTP/1.1 lane; HTTP/2 (gRPC) may not.
        let lane = req.version() < http::Version::HTTP_2;
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
            let conn = match pool.checkout(lane).await {
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
        let conn = match pool.checkout(false).await {
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
