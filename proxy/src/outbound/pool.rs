//! One endpoint's connections (a [`Pool`]): dialled on demand (TCP, then TLS with our
//! certificate and the server's identity pinned, then HTTP/2 when the server agreed to `h2`,
//! else an HTTP/1.1 keep-alive pool), bounded by `max_connections`, retired by idle time, age
//! and trust generation, and the one exchange of a request on one of them ([`Exchange`]).
//! [`super::upstream::Upstream`] picks the pool a request goes to.
//!
//! **The HTTP/1.1 lane** (`protocol = "auto"`, the default): besides the shared HTTP/2
//! connection, a pool keeps [`LANE`] HTTP/1.1 connection to the same peer (dialled offering
//! only `http/1.1`). An HTTP/1.x request from the app takes it when it is idle and no other
//! request of the pool is waiting for its response or dialling; otherwise it shares the HTTP/2
//! connection. A caller that sends one request at a time (the report service fetching its
//! data) so never pays for HTTP/2's framing, HPACK and stream bookkeeping on either sidecar
//! (the pair's user CPU per request a fifth lower at concurrency 1), while concurrent callers
//! multiplex on one connection, where HTTP/2 is the cheaper of the two (its writes carry many
//! requests' frames).
//!
//! - The lane is dialled only for a caller whose previous request came within `lane_idle`
//!   (5 s, `LANE_IDLE` in [`crate::config`]), and closed after that long idle: a slower caller
//!   stays on HTTP/2 (kept 30 s) instead of paying a handshake per request after the peer
//!   closed the lane (the inbound keeps an idle HTTP/1.1 connection 10 s).
//! - HTTP/2 requests from the app (gRPC: trailers) and WebSocket tunnels never take it.
//! - A peer that refuses `http/1.1` in ALPN, or that chose it for the shared connection,
//!   turns the lane off for the pool.
//! - The shared connection is dialled by one request at a time ([`SharedDial`]): a burst of
//!   first requests waits for it instead of each paying a handshake.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, header};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use rustls::AlertDescription;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use super::error::OutboundError;
use super::metrics::UpstreamMetrics;
use super::tls_source::TlsSource;
use crate::config::{OutboundLimits, UpstreamProtocol};
use crate::http::body::{BoxError, RecvBody};
use crate::http::h1_pool;
use crate::http::h2_client::{self, H2Sender, send_h2};
use crate::http::headers::{strip_for_h2, strip_hop_by_hop};
use crate::tls::alert_tap::AlertTap;
use crate::tls::client::received_alert;

use crate::http::body::HttpBody;
use bytes::Bytes;
use http::Method;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;

/// How many HTTP/1.1 connections of the lane (module docs) a pool keeps at most.
pub(super) const LANE: usize = 1;

/// The ALPN a lane connection offers.
const LANE_ALPN: &[u8] = b"http/1.1";

/// The connection pool to one endpoint address of an upstream.
pub(crate) struct Pool {
    pub(super) name: String,
    pub(super) addr: SocketAddr,
    /// `gatehouse_outbound_endpoint_requests_total` for this endpoint.
    pub(super) requests: IntCounter,
    pub(super) authority: Authority,
    host_header: HeaderValue,
    pub(super) server_name: ServerName<'static>,
    /// The TLS client configuration (read when dialling) and the trust generation (read
    /// before reusing a connection): connections of an older generation are not reused.
    pub(super) tls: Arc<dyn TlsSource>,
    pub(super) limits: OutboundLimits,
    permits: Arc<Semaphore>,
    available: Arc<Notify>,
    idle: Mutex<Idle>,
    /// Lane connections open or being dialled (at most [`LANE`]).
    lane_open: Arc<AtomicUsize>,
    /// The peer multiplexes (the configuration offers `h2`, and no connection came back as
    /// HTTP/1.1): one request dials the shared connection while the others wait for it,
    /// instead of a burst of requests each paying for a handshake.
    single_dial: AtomicBool,
    /// Requests sent and waiting for their response head: the lane is taken only when this
    /// is zero (a caller with one request at a time), so concurrent callers stay on HTTP/2.
    in_flight: AtomicUsize,
    /// No lane for this pool: the configuration offers one protocol only (`protocol = "h2"`
    /// or `"http1"`, fixed for the process), or the peer refused `http/1.1` in ALPN.
    lane_off: AtomicBool,
    pub(super) metrics: UpstreamMetrics,
}

pub(super) struct Idle {
    /// A request is dialling the shared connection ([`SharedDial`]).
    dialling: bool,
    /// The shared HTTP/2 connection and when a request last started on it.
    h2: Option<(Conn, Instant)>,
    /// Idle HTTP/1.1 connections (the keep-alive pool both hops share) of a peer that chose
    /// `http/1.1` (or of `protocol = "http1"`).
    h1: h1_pool::Idle<Conn>,
    /// The idle connection of the HTTP/1.1 lane (module docs).
    lane: h1_pool::Idle<Conn>,
    /// When a request last looked for a connection: the lane is dialled only for a caller
    /// whose previous request came within `lane_idle`.
    last_checkout: Option<Instant>,
}

pub(super) enum Sender {
    H1(http1::SendRequest<ReqBody>),
    H2(H2Sender),
}

/// A checked-out connection. HTTP/2 connections are shared: each checkout holds a clone of
/// the sender.
pub(super) struct Conn {
    pub(super) sender: Sender,
    born: Instant,
    /// The trust generation ([`TlsSource::trust_generation`]) when the connection was started.
    generation: u64,
    /// The fatal TLS alert the server sent on this connection, once read: how a server that
    /// refused our certificate after a TLS 1.3 handshake had already "succeeded" shows up.
    alert: Arc<OnceLock<AlertDescription>>,
    /// The serial number of the server's certificate, lowercase hex (for the audit line).
    pub(super) serial: Arc<str>,
    /// A connection of the HTTP/1.1 lane: goes back to the lane's idle set.
    lane: bool,
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
                lane: false,
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

impl Pool {
    /// A pool for the endpoint `addr` of `spec`'s upstream, and a task that closes idle, aged
    /// and retired connections (it stops when the returned `Arc` is dropped). Must be called
    /// inside a Tokio runtime.
    pub(super) fn start(spec: &PoolSpec, addr: SocketAddr) -> Arc<Self> {
        let limits = spec.limits.clone();
        // Whether the entry offers h2 at all (one dial for the shared connection), and the lane.
        let (h2, lane) = match spec.protocol {
            UpstreamProtocol::Http1 => (false, false),
            UpstreamProtocol::H2 => (true, false),
            UpstreamProtocol::Auto => (true, true),
        };
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
                dialling: false,
                h2: None,
                h1: h1_pool::Idle::new(limits.max_idle, limits.idle_timeout),
                lane: h1_pool::Idle::new(LANE, limits.lane_idle.min(limits.idle_timeout)),
                last_checkout: None,
            }),
            lane_open: Arc::new(AtomicUsize::new(0)),
            lane_off: AtomicBool::new(!lane),
            single_dial: AtomicBool::new(h2),
            in_flight: AtomicUsize::new(0),
            limits,
            metrics: spec.metrics.clone(),
        });
        tokio::spawn(reap(Arc::downgrade(&pool)));
        pool
    }

    /// The TLS client configuration a new connection uses, from the current snapshot: the one
    /// spot where an upstream obtains it (`None` only if the snapshot has no entry for this
    /// upstream, which the one build path rules out).
    pub(super) fn client_config(&self) -> Option<Arc<ClientConfig>> {
        self.tls.client_config(&self.name)
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
    pub(super) async fn exchange(
        self: &Arc<Self>,
        conn: Conn,
        req: Request<ReqBody>,
    ) -> Result<Response<UpstreamBody>, Exchange> {
        let timeout = self.limits.response_timeout;
        let _in_flight = InFlight::enter(&self.in_flight);
        let Conn {
            sender,
            born,
            generation,
            alert,
            serial,
            lane,
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
                        lane,
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
            let mut idle = self.lock_idle();
            let set = if conn.lane {
                &mut idle.lane
            } else {
                &mut idle.h1
            };
            if !set.put(conn, now) {
                return; // dropping the sender closes the connection
            }
        }
        self.available.notify_one();
    }

    /// A connection to send on: for a `lane` request (HTTP/1.x from the app) the lane's idle
    /// connection first; then the shared h2 connection, an idle h1 one, or a new one if the
    /// pool has room (the lane's when it has none yet); otherwise waits for one of those to
    /// become true.
    pub(super) async fn checkout(&self, lane: bool) -> Result<Conn, OutboundError> {
        // The common case, a pooled connection, without registering as a waiter first.
        let mut found = Some(self.take_pooled(lane));
        let deadline = tokio::time::Instant::now() + self.limits.pool_wait_timeout;
        loop {
            let notified = self.available.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Looked again once registered (a dial found above is kept: nothing to wait for).
            let now = match found.take() {
                Some(Pooled::Wait) | None => self.take_pooled(lane),
                Some(f) => f,
            };
            match now {
                Pooled::Conn(conn) => return Ok(conn),
                Pooled::Dial(dial) => match self.permits.clone().try_acquire_owned() {
                    // Boxed: the connect future (DNS, TCP, TLS and HTTP handshakes) is large
                    // and rarely needed; inline, every request's future would carry it.
                    Ok(permit) => return Box::pin(self.connect(permit, dial)).await,
                    // No room: wait for a connection to end, like the others.
                    Err(_) => dial.give_up(),
                },
                Pooled::Wait => {}
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(OutboundError::PoolTimeout(self.limits.pool_wait_timeout));
            }
        }
    }

    /// A pooled connection for a request (`lane`: HTTP/1.x from the app); else the connection
    /// to dial (the lane's, when it has room), or `Wait` while the shared HTTP/2 connection is
    /// being dialled by another request.
    fn take_pooled(&self, lane: bool) -> Pooled<'_> {
        let now = Instant::now();
        let mut idle = self.lock_idle();
        let previous = idle.last_checkout.replace(now);
        // Nothing else in flight or being dialled: a caller with one request at a time.
        if lane
            && !self.lane_off.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Relaxed) == 0
            && !idle.dialling
        {
            if let Some(conn) = idle.lane.take(now, |conn| self.usable(conn, now)) {
                return Pooled::Conn(conn);
            }
            let recent =
                previous.is_some_and(|t| now.saturating_duration_since(t) < self.limits.lane_idle);
            let reserved = recent
                && self
                    .lane_open
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < LANE).then_some(n + 1)
                    })
                    .is_ok();
            if reserved {
                return Pooled::Dial(Dial::Lane(LaneSlot(Arc::clone(&self.lane_open))));
            }
        }
        if let Some(conn) = self.share_h2(&mut idle, now) {
            return Pooled::Conn(conn);
        }
        if let Some(conn) = idle.h1.take(now, |conn| self.usable(conn, now)) {
            return Pooled::Conn(conn);
        }
        if !self.single_dial.load(Ordering::Relaxed) {
            return Pooled::Dial(Dial::Plain);
        }
        if idle.dialling {
            return Pooled::Wait;
        }
        idle.dialling = true;
        Pooled::Dial(Dial::Shared(SharedDial {
            pool: self,
            wake: true,
        }))
    }

    /// A handle on the shared HTTP/2 connection, if there is a usable one.
    fn share_h2(&self, idle: &mut Idle, now: Instant) -> Option<Conn> {
        let (h2, last_used) = idle.h2.as_mut()?;
        if self.usable(h2, now) {
            *last_used = now;
            return h2.share();
        }
        // Aged or closed: new streams go to a new connection; open streams finish.
        idle.h2 = None;
        None
    }

    /// Opens a new connection under the connect timeout.
    pub(super) async fn connect(
        &self,
        permit: OwnedSemaphorePermit,
        dial: Dial<'_>,
    ) -> Result<Conn, OutboundError> {
        let timeout = self.limits.connect_timeout;
        let (mut slot, _shared) = match dial {
            Dial::Lane(slot) => (Some(slot), None),
            Dial::Shared(shared) => (None, Some(shared)),
            Dial::Plain => (None, None),
        };
        let result =
            match tokio::time::timeout(timeout, self.connect_inner(permit, &mut slot)).await {
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

    async fn connect_inner(
        &self,
        permit: OwnedSemaphorePermit,
        slot: &mut Option<LaneSlot>,
    ) -> Result<Conn, OutboundError> {
        // The generation first: a trust change during the handshake (which uses the
        // configuration current now) retires this connection too.
        let generation = self.tls.trust_generation();
        let Some(config) = self.client_config() else {
            return Err(OutboundError::Handshake(io::Error::other(format!(
                "no TLS client configuration for upstream `{}` (a bug: report it)",
                self.name
            ))));
        };
        let connector = TlsConnector::from(config);
        let started = Instant::now();
        let handshake = loop {
            let tcp = self.dial().await?;
            let handshake = match slot {
                Some(_) => {
                    let lane = connector.with_alpn(vec![LANE_ALPN.to_vec()]);
                    lane.connect(self.server_name.clone(), tcp).await
                }
                None => connector.connect(self.server_name.clone(), tcp).await,
            };
            match handshake {
                Err(e) if slot.is_some() && refused_alpn(&e) => {
                    // A peer that speaks only h2: no lane to it; the shared connection, or
                    // dialled again as configured.
                    debug!(upstream = %self.name, endpoint = %self.addr, "the peer refused an HTTP/1.1 lane; using HTTP/2 only");
                    self.lane_off.store(true, Ordering::Relaxed);
                    *slot = None;
                    if let Some(conn) = self.share_h2(&mut self.lock_idle(), Instant::now()) {
                        return Ok(conn);
                    }
                }
                handshake => break handshake,
            }
        };
        let tls = match handshake {
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
        let lane = slot.is_some();
        if !h2 && !lane {
            // The peer chose HTTP/1.1: one connection per request in flight, dialled in
            // parallel, and no lane (its pool is HTTP/1.1 already).
            self.single_dial.store(false, Ordering::Relaxed);
            self.lane_off.store(true, Ordering::Relaxed);
        }
        let sender = if h2 {
            let (sender, conn) = h2_client::handshake(io)
                .await
                .map_err(|e| OutboundError::Upstream(e.into()))?;
            self.spawn_conn(conn, (permit, slot.take()));
            Sender::H2(sender)
        } else {
            let (sender, conn) = http1::handshake(TokioIo::new(io))
                .await
                .map_err(|e| OutboundError::Upstream(e.into()))?;
            self.spawn_conn(conn, (permit, slot.take()));
            Sender::H1(sender)
        };
        let conn = Conn {
            sender,
            born: Instant::now(),
            generation,
            alert,
            serial,
            lane,
        };
        if let Some(shared) = conn.share() {
            let mut idle = self.lock_idle();
            idle.h2 = Some((shared, Instant::now()));
            drop(idle);
            // Callers waiting for a connection can share this one.
            self.available.notify_waiters();
        }
        Ok(conn)
    }

    /// Opens TCP to this pool's endpoint.
    pub(super) async fn dial(&self) -> Result<TcpStream, OutboundError> {
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

    /// Runs a connection's task; `held` (its connection permit and lane place) is released
    /// when the connection ends.
    fn spawn_conn<F, E>(&self, conn: F, held: (OwnedSemaphorePermit, Option<LaneSlot>))
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
            drop(held);
            available.notify_one();
        });
    }

    /// Points the request at the upstream: origin-form URI and `Host` for HTTP/1.1, absolute
    /// URI (`:authority`) for HTTP/2, and drops what describes the app's connection (for
    /// HTTP/2 also its `transfer-encoding`, which `h2` refuses). Idempotent, so a request
    /// handed back unsent can be re-targeted for another connection.
    pub(super) fn set_target(&self, req: &mut Request<ReqBody>, sender: &Sender) {
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
        let mut idle = self.lock_idle();
        idle.h1.sweep(now, |conn| self.usable(conn, now));
        idle.lane.sweep(now, |conn| self.usable(conn, now));
        if idle.h2.as_ref().is_some_and(|(conn, last_used)| {
            now.saturating_duration_since(*last_used) >= limits.idle_timeout
                || !self.usable(conn, now)
        }) {
            // Streams still open on it finish; the connection closes after the last one.
            idle.h2 = None;
        }
    }
}

/// What [`Pool::take_pooled`] found.
enum Pooled<'a> {
    Conn(Conn),
    /// Nothing to reuse: dial (when a connection permit is free).
    Dial(Dial<'a>),
    /// Another request is dialling the shared connection.
    Wait,
}

/// Which connection a request dials.
pub(super) enum Dial<'a> {
    /// The lane's (the request holds its place).
    Lane(LaneSlot),
    /// The shared HTTP/2 connection (the request is the one dialling it).
    Shared(SharedDial<'a>),
    /// One more HTTP/1.1 connection of a peer that does not multiplex.
    Plain,
}

impl Dial<'_> {
    /// Not dialled after all (no connection permit): the place is given back without waking
    /// the waiters (they wait for a permit too, and a connection that ends wakes one).
    fn give_up(self) {
        if let Dial::Shared(mut shared) = self {
            shared.wake = false;
        }
    }
}

/// The one request dialling a pool's shared connection; when the dial ends (in any way) the
/// waiting requests look again: the new connection, or their turn to dial.
pub(super) struct SharedDial<'a> {
    pool: &'a Pool,
    wake: bool,
}

impl Drop for SharedDial<'_> {
    fn drop(&mut self) {
        self.pool.lock_idle().dialling = false;
        if self.wake {
            self.pool.available.notify_waiters();
        }
    }
}

/// A place in the HTTP/1.1 lane, held by a lane connection (or its dial) and given back when
/// it ends.
pub(super) struct LaneSlot(Arc<AtomicUsize>);

impl Drop for LaneSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request between being sent and its response head (counted in `Pool::in_flight`).
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The peer answered our ALPN offer with `no_application_protocol`.
fn refused_alpn(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::AlertReceived(AlertDescription::NoApplicationProtocol)
            )
        })
}

pub(super) enum Exchange {
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
pub(super) fn failed(
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

/// What every endpoint pool of one upstream shares.
pub(super) struct PoolSpec {
    pub(super) name: String,
    pub(super) authority: Authority,
    pub(super) host_header: HeaderValue,
    pub(super) server_name: ServerName<'static>,
    /// What the entry offers in ALPN: whether there is a lane, and one dial for the shared
    /// connection.
    pub(super) protocol: UpstreamProtocol,
    pub(super) tls: Arc<dyn TlsSource>,
    pub(super) limits: OutboundLimits,
    pub(super) metrics: UpstreamMetrics,
}

/// The upstream's response body, streamed: HTTP/1.1 (hyper) or HTTP/2 (h2).
pub(crate) type UpstreamBody = HttpBody;

/// The request body the pools send: the app's, or none (a bodiless request sent again).
pub(crate) type ReqBody = Either<Incoming, Empty<Bytes>>;

/// The head of a bodiless request, kept (only with `retry_idempotent`) so it can be sent a
/// second time.
pub(super) struct Replay {
    pub(super) method: Method,
    pub(super) uri: Uri,
    pub(super) version: http::Version,
    pub(super) headers: http::HeaderMap,
    /// GET, HEAD or OPTIONS: may be retried after a 503.
    pub(super) idempotent: bool,
}

impl Replay {
    /// A copy of `req`'s head, when it has no body (a body is never buffered for a retry).
    pub(super) fn of(req: &Request<Incoming>) -> Option<Replay> {
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
    pub(super) fn request(self) -> Request<ReqBody> {
        let mut req = Request::new(Either::Right(Empty::new()));
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}
