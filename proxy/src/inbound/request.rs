//! One inbound request, top-down: check the method's spelling and normalize the path (400 on
//! refusal) → `policy.decide` → deny (403, the app sees nothing) → the caller's `[[limit]]`s
//! (429 over a rate, 503 over a concurrency, both with `retry-after`; the app sees nothing) →
//! forward → audit line + metrics with the final status.
//!
//! An admitted request's concurrency is held by its [`LimitGuard`], which lives in the
//! [`ResponseBody`]: it is released when the response body is finished or dropped (the
//! client went away, the HTTP/2 stream was reset, the app failed), not when the head is sent.
//! A policy without limits has no limiter in its snapshot: one branch, nothing allocated.
//!
//! Forwarding ([`crate::http::headers::strip_for_app`]) refuses a `Transfer-Encoding` other than
//! `chunked` (501, or 400 when malformed), drops hop-by-hop headers and every identity header
//! the client sent, in any spelling that normalizes to one of ours (`x-forwarded-client-cert`,
//! `x-client-spiffe-id`, `client-cert`, `client-cert-chain`, `X_Client_Spiffe_Id`, …), then adds
//! ours from the verified session (`x-request-id` was kept or assigned first, by the rule both
//! sides share: [`crate::http::headers::keep_or_assign`]), and sends the normalized path
//! with the original query to the app on a pooled keep-alive HTTP/1.1 connection. Bodies stream
//! both ways; nothing is buffered.
//!
//! Every request reads the policy of the *current* snapshot (not the one the connection was
//! accepted with), so a policy reload applies to open keep-alive and HTTP/2 connections from
//! their next request on. A connection whose peer a reload stopped trusting (revoked, or its
//! root retired) is marked [`ConnCtx::distrust`]: requests that still arrive get 503 while it
//! closes.
//!
//! The audit line is written once the status is known: right away for refusals, when the
//! app's response head arrives (or fails) for forwarded requests.
//!
//! [`handle`] serves both protocols: HTTP/1.1 requests come from hyper (body
//! [`hyper::body::Incoming`]), HTTP/2 requests from the `h2` crate directly (body
//! [`crate::http::body::RecvBody`], see [`super::listener`]); [`RequestBody`] is either, and is
//! what the app pool forwards.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use gatehouse_policy::method;
use gatehouse_policy::path::normalize;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;

use super::Inbound;
use super::upstream::AppBody;
use crate::audit::{self, AuditRecord};
use crate::error::Refusal;
use crate::http::activity::{Activity, RequestGuard};
use crate::http::body::{HttpBody, RecvBody};
use crate::http::grpc;
use crate::http::headers::{
    FramingError, is_te_trailers, keep_or_assign, keep_or_derive_trace, strip_for_app,
    strip_hop_by_hop,
};
use crate::limits::{Admission, LimitGuard};
use crate::outcome::{Outcome, Rejection};
use crate::state::{InboundSnapshot, Snapshot};
use crate::tls::PeerIdentity;

const XFCC_HEADER: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
const SPIFFE_ID_HEADER: HeaderName = HeaderName::from_static("x-client-spiffe-id");

/// Per-connection context: fixed for the connection's life.
#[derive(Debug)]
pub(crate) struct ConnCtx {
    pub(super) inbound: Arc<Inbound>,
    peer: PeerIdentity,
    distrusted: AtomicBool,
    xfcc: HeaderValue,
    spiffe_id: HeaderValue,
    /// The peer's metric label under the snapshot it was computed for.
    caller: LabelCache<Snapshot>,
    /// In-flight requests, for the idle timeout.
    pub activity: Arc<Activity>,
}

/// A string computed from one `Arc<T>` (the caller's label under one policy snapshot),
/// recomputed when a different `Arc<T>` is current: a reload takes effect on the next request
/// of the connection. The `Weak` keeps the old allocation, so a new snapshot can never reuse
/// its address and be mistaken for it.
#[derive(Debug)]
struct LabelCache<T>(std::sync::Mutex<Option<(std::sync::Weak<T>, Arc<str>)>>);

impl<T> LabelCache<T> {
    fn new() -> Self {
        Self(std::sync::Mutex::new(None))
    }

    fn get(&self, current: &Arc<T>, compute: impl FnOnce() -> Arc<str>) -> Arc<str> {
        let mut cached = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match &*cached {
            Some((of, label)) if std::ptr::eq(of.as_ptr(), Arc::as_ptr(current)) => label.clone(),
            _ => {
                let label = compute();
                *cached = Some((Arc::downgrade(current), label.clone()));
                label
            }
        }
    }
}

impl ConnCtx {
    /// Precomputes the identity headers once per connection (our own identity cannot change
    /// on reload unless `allow_identity_change`, and then the XFCC `By=` of open connections
    /// keeps the identity they were accepted under).
    pub(crate) fn new(inbound: Arc<Inbound>, snapshot: &Snapshot, peer: PeerIdentity) -> Self {
        let own = &snapshot.credentials.id;
        let xfcc = format!("By={own};Hash={};URI={}", peer.leaf_sha256_hex(), peer.id());
        Self {
            xfcc: HeaderValue::try_from(xfcc).expect("SPIFFE IDs and hex are visible ASCII"),
            spiffe_id: HeaderValue::try_from(peer.id().as_str())
                .expect("SPIFFE IDs are visible ASCII"),
            inbound,
            peer,
            distrusted: AtomicBool::new(false),
            caller: LabelCache::new(),
            activity: Arc::new(Activity::default()),
        }
    }

    /// The peer is no longer trusted: every further request on this connection gets 503.
    pub(crate) fn distrust(&self) {
        self.distrusted.store(true, Ordering::Relaxed);
    }

    /// Whether [`Self::distrust`] was called.
    pub(super) fn is_distrusted(&self) -> bool {
        self.distrusted.load(Ordering::Relaxed)
    }

    /// The verified caller.
    pub(super) fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    /// The audit and metrics context of a request decided by `inb` (of `snapshot`) that
    /// started at `started`: what [`handle`] builds, for the WebSocket path (issue 17).
    pub(super) fn request_log<'a>(
        &'a self,
        snapshot: &Arc<Snapshot>,
        inb: &'a InboundSnapshot,
        request_id: &'a HeaderValue,
        trace_id: Option<[u8; 16]>,
        method: http::Method,
        started: Instant,
    ) -> RequestLog<'a> {
        RequestLog {
            ctx: self,
            caller: self
                .caller
                .get(snapshot, || inb.policy.caller_label(self.peer.id()).into()),
            request_id,
            trace_id,
            inb,
            method,
            started,
        }
    }

    /// Adds the identity statements to a request head for the app, after
    /// [`strip_for_app`] removed the client's (the WebSocket path, issue 17).
    pub(super) fn add_identity(&self, h: &mut http::HeaderMap) {
        h.append(XFCC_HEADER, self.xfcc.clone());
        h.append(SPIFFE_ID_HEADER, self.spiffe_id.clone());
    }
}

/// A request body as either protocol delivers it; streamed to the app as it arrives.
pub(crate) type RequestBody = HttpBody;

/// What a response carries: the app's body (HTTP/1.1 from the keep-alive pool, or an h2c
/// stream: issue 17), streamed, or one the sidecar made. One enum, not nested `Either`s: its
/// single tag keeps every stream's future as small as with the HTTP/1.1 hop alone.
pub(crate) enum Inner {
    /// From the app, HTTP/1.1.
    App(AppBody),
    /// From the app, h2c.
    AppH2(RecvBody),
    /// The sidecar's own.
    Own(Full<Bytes>),
}

impl Body for Inner {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Self::App(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Self::AppH2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Self::Own(b) => Pin::new(b).poll_frame(cx).map_err(|e| match e {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::App(b) => b.is_end_stream(),
            Self::AppH2(b) => b.is_end_stream(),
            Self::Own(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::App(b) => b.size_hint(),
            Self::AppH2(b) => b.size_hint(),
            Self::Own(b) => b.size_hint(),
        }
    }
}

/// The response body: the app's, streamed, or one the sidecar made; it ends the request's
/// activity (idle timeout) when dropped.
pub(crate) struct ResponseBody {
    inner: Inner,
    _guard: RequestGuard,
    /// The caller's concurrency under its `[[limit]]`s, released with the body. Boxed (one
    /// pointer: this body sits in every stream's future, see `the_per_stream_future_stays_small`),
    /// and only when a concurrency budget is held: no limit, or a rate alone, allocates nothing.
    _limit: Option<Box<LimitGuard>>,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Handles one request. Never fails: every error becomes a response.
///
/// One `async fn` with the whole request inside (no nested `async fn` taking the request by
/// value): this future is moved into the connection's HTTP/2 stream set (or hyper's HTTP/1.1
/// dispatcher) and copied on each move, so its size is paid on every request, and every
/// by-value argument of an `async fn` is stored in its future twice.
#[allow(
    clippy::manual_async_fn,
    reason = "an `async fn` stores its by-value arguments twice in its future"
)]
pub(crate) fn handle(
    ctx: Arc<ConnCtx>,
    mut req: Request<RequestBody>,
) -> impl Future<Output = Result<Response<ResponseBody>, Infallible>> + Send + 'static {
    async move {
        let guard = ctx.activity.begin();
        let started = Instant::now();
        // Kept or assigned by the one rule both sides share; the app gets it as is.
        let request_id = &keep_or_assign(&ctx.inbound.request_ids, req.headers_mut());
        // With an audit log, the trace id that joins both sides' lines: the request's valid
        // `traceparent`, or one derived from the request id (as the outbound side did) and
        // started for the app.
        let trace_id =
            audit::enabled().then(|| keep_or_derive_trace(req.headers_mut(), request_id, true));
        // The current snapshot, not the connection's: policy reloads reach open connections.
        let snapshot = ctx.inbound.state.snapshot();
        let mut limit = None;
        let resp = 'resp: {
            let Some(inb) = snapshot.inbound.as_ref() else {
                break 'resp refuse(Refusal::Denied, request_id, req.headers());
            };
            // The caller's label: a SipHash lookup in the policy, once per connection and
            // snapshot.
            let mut log = ctx.request_log(
                &snapshot,
                inb,
                request_id,
                trace_id,
                req.method().clone(),
                started,
            );
            if ctx.distrusted.load(Ordering::Relaxed) {
                let path = req.uri().path();
                log.finish(path, None, Outcome::Rejected(Rejection::PeerNotTrusted));
                break 'resp refuse(Refusal::PeerNoLongerTrusted, request_id, req.headers());
            }
            let uri = req.uri().clone();
            // Before matching: `get` must not be decided as an extension method.
            if let Err(e) = method::check(req.method().as_str()) {
                log.finish(uri.path(), None, Outcome::Rejected(Rejection::BadMethod));
                break 'resp refuse(Refusal::BadMethod(e), request_id, req.headers());
            }
            let path = match normalize(uri.path(), &inb.normalize) {
                Ok(p) => p,
                Err(e) => {
                    log.finish(uri.path(), None, Outcome::Rejected(Rejection::BadPath));
                    break 'resp refuse(Refusal::BadPath(&e), request_id, req.headers());
                }
            };
            let decision = inb
                .policy
                .decide(ctx.peer.id(), req.method().as_str(), &path);
            let route = decision.route_name();
            if !decision.is_allowed() {
                log.finish(
                    &path,
                    route,
                    Outcome::decided(&decision, StatusCode::FORBIDDEN),
                );
                break 'resp refuse(Refusal::Denied, request_id, req.headers());
            }
            match log.admit(&decision, &path) {
                Ok(held) => limit = held,
                Err(refusal) => break 'resp refuse(refusal, request_id, req.headers()),
            }
            // An HTTP/2 response head is stripped where it is fitted for HTTP/2
            // (`h2::fit_for_h2`, which drops `transfer-encoding` too): one scan, not two.
            let over_h2 = req.version() == http::Version::HTTP_2;
            let fwd = match rewrite(&ctx, req, &uri, &path) {
                Ok(fwd) => fwd,
                Err(e) => {
                    log.finish(&path, route, Outcome::Rejected(Rejection::BadFraming(e)));
                    // Only HTTP/1.1 requests carry `Transfer-Encoding` (`h2` refuses it), so
                    // never a gRPC call: the JSON answer.
                    break 'resp refuse_as(Refusal::BadFraming(e), request_id, false);
                }
            };
            let resp = match &ctx.inbound.app_h2 {
                None => {
                    let sent = tokio::time::timeout(
                        ctx.inbound.cfg.app_timeout,
                        ctx.inbound.app.send(fwd),
                    );
                    match sent.await {
                        Ok(Ok(mut resp)) => {
                            if !over_h2 {
                                strip_hop_by_hop(resp.headers_mut());
                            }
                            resp.map(Inner::App)
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, app = %ctx.inbound.cfg.app, "forwarding to the app failed");
                            refuse_as(Refusal::AppUnreachable, request_id, false)
                        }
                        Err(_) => refuse_as(Refusal::AppTimeout, request_id, false),
                    }
                }
                // Boxed: the HTTP/1.1 hop's request future stays what it was.
                Some(app) => Box::pin(forward_h2c(&ctx, app, fwd, request_id, over_h2)).await,
            };
            log.finish(&path, route, Outcome::decided(&decision, resp.status()));
            resp
        };
        Ok(resp.map(|inner| ResponseBody {
            inner,
            _guard: guard,
            _limit: limit,
        }))
    }
}

/// Forwards `fwd` to the app over its h2c connection (`app_protocol = "h2c"`, issue 17). A
/// gRPC call's own deadline (`grpc-timeout`) bounds the wait for the app's response head when
/// it is shorter than `app_timeout`, and the sidecar's answers to a gRPC call are gRPC-shaped
/// (`DEADLINE_EXCEEDED`, `UNAVAILABLE`).
async fn forward_h2c(
    ctx: &ConnCtx,
    app: &super::app_h2::AppH2,
    fwd: Request<RequestBody>,
    request_id: &HeaderValue,
    over_h2: bool,
) -> Response<Inner> {
    let mut wait = ctx.inbound.cfg.app_timeout;
    let grpc = grpc::is_grpc(fwd.headers());
    if grpc && let Some(deadline) = grpc::timeout(fwd.headers()) {
        wait = wait.min(deadline);
    }
    match tokio::time::timeout(wait, app.send(fwd)).await {
        Ok(Ok(resp)) => {
            let mut resp = resp.map(|b| Inner::AppH2(RecvBody::new(b)));
            if !over_h2 {
                strip_hop_by_hop(resp.headers_mut());
            }
            resp
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, app = %ctx.inbound.cfg.app, "forwarding to the app (h2c) failed");
            refuse_as(Refusal::AppUnreachable, request_id, grpc)
        }
        Err(_) => refuse_as(Refusal::AppTimeout, request_id, grpc),
    }
}

/// The sidecar's own answer to a request whose head is `h`: gRPC-shaped for a gRPC call.
fn refuse(r: Refusal<'_>, request_id: &HeaderValue, h: &http::HeaderMap) -> Response<Inner> {
    refuse_as(r, request_id, grpc::is_grpc(h))
}

fn refuse_as(r: Refusal<'_>, request_id: &HeaderValue, grpc: bool) -> Response<Inner> {
    r.response_for(request_id, grpc).map(Inner::Own)
}

/// What the audit line and the metrics need, minus the [`Outcome`].
pub(super) struct RequestLog<'a> {
    ctx: &'a ConnCtx,
    caller: Arc<str>,
    request_id: &'a HeaderValue,
    /// The request's W3C trace id, when it sent a valid `traceparent`.
    trace_id: Option<[u8; 16]>,
    /// The snapshot that decides (its policy's SHA-256 goes in the line).
    inb: &'a InboundSnapshot,
    method: http::Method,
    started: Instant,
}

impl RequestLog<'_> {
    /// The caller's `[[limit]]`s for a request the policy allowed (`decision`): `Ok` with the
    /// concurrency budgets to hold while it is in flight (`None` when it holds none: no limit,
    /// or a rate alone), or the refusal (429 or 503 with `retry-after`), already counted and
    /// logged. The request path and the WebSocket upgrade (whose tunnel holds its budget while
    /// open) both ask here.
    pub(super) fn admit(
        &mut self,
        decision: &gatehouse_policy::Decision<'_>,
        path: &str,
    ) -> Result<Option<Box<LimitGuard>>, Refusal<'static>> {
        let Some(limiter) = self.inb.limiter.as_deref() else {
            return Ok(None);
        };
        let peer = self.ctx.peer.id();
        let admission = limiter.admit(&self.inb.policy, peer, decision.route());
        let retry_after = admission.retry_after_secs().unwrap_or(1);
        let (outcome, refusal, index) = match admission {
            Admission::Allow(held) => return Ok((!held.is_empty()).then(|| Box::new(held))),
            Admission::RateLimited { limit, .. } => (
                Outcome::RateLimited,
                Refusal::RateLimited { retry_after },
                limit,
            ),
            Admission::Overloaded { limit, .. } => (
                Outcome::Overloaded,
                Refusal::Overloaded { retry_after },
                limit,
            ),
        };
        tracing::debug!(caller = %peer, limit = index, reason = outcome.reason(), retry_after, "request over a [[limit]]");
        self.ctx
            .inbound
            .metrics
            .inbound_limited
            .with_label_values(&[&*self.caller, outcome.reason()])
            .inc();
        self.finish(path, decision.route_name(), outcome);
        Err(refusal)
    }

    /// Counts the request and writes its audit line.
    pub(super) fn finish(&mut self, path: &str, route: Option<&str>, outcome: Outcome) {
        let duration = self.started.elapsed();
        let m = &self.ctx.inbound.metrics;
        m.inbound_requests
            .with_label_values(&[
                route.unwrap_or("none"),
                &self.caller,
                outcome.decision(),
                outcome.reason(),
                outcome.status().as_str(),
            ])
            .inc();
        m.inbound_request_duration
            .with_label_values(&[outcome.decision()])
            .observe(duration.as_secs_f64());
        audit::record(&AuditRecord {
            request_id: self.request_id.to_str().unwrap_or_default(),
            trace_id: self.trace_id.as_ref(),
            caller: self.ctx.peer.id(),
            caller_serial: self.ctx.peer.serial_hex(),
            policy_sha256: &self.inb.policy_sha256,
            method: self.method.as_str(),
            path,
            route,
            outcome,
            duration,
        });
    }
}

/// The request the app receives, or why it cannot be forwarded.
fn rewrite(
    ctx: &ConnCtx,
    req: Request<RequestBody>,
    uri: &Uri,
    path: &str,
) -> Result<Request<RequestBody>, FramingError> {
    let (mut parts, body) = req.into_parts();
    let h = &mut parts.headers;
    // gRPC needs `te: trailers` on the h2c hop (issue 17); the HTTP/1.1 hop never carries it.
    let te_trailers = ctx.inbound.app_h2.is_some() && is_te_trailers(h);
    // Hop-by-hop headers and every client header in the spelling of one of ours go first
    // (`Connection` cannot name ours away); ours are added below.
    strip_for_app(h)?;
    // HTTP/2 carries the authority in the URI; the app speaks HTTP/1.1 and wants Host (the
    // app's own address when the caller gave none).
    if let header::Entry::Vacant(host) = h.entry(header::HOST) {
        host.insert(
            uri.authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                .unwrap_or_else(|| ctx.inbound.app_host.clone()),
        );
    }
    // Both were removed above: appending is inserting.
    ctx.add_identity(h);
    // An already normal path is forwarded as the client sent it (no allocation).
    let path_and_query = match uri.path_and_query() {
        Some(pq) if pq.path() == path => pq.clone(),
        _ => {
            let s = match uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path.to_string(),
            };
            PathAndQuery::try_from(s).unwrap_or_else(|_| PathAndQuery::from_static("/"))
        }
    };
    if ctx.inbound.app_h2.is_some() {
        // h2c: the authority goes in the URI (`:authority`), not a `Host` header.
        let authority = h
            .remove(header::HOST)
            .and_then(|v| http::uri::Authority::try_from(v.as_bytes()).ok())
            .unwrap_or_else(|| ctx.inbound.app_authority.clone());
        if te_trailers {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(authority);
        uri.path_and_query = Some(path_and_query);
        // Invariant: scheme, authority and path are all set and individually valid.
        parts.uri = Uri::from_parts(uri).expect("complete absolute URI");
        parts.version = http::Version::HTTP_2;
        return Ok(Request::from_parts(parts, body));
    }
    // Origin-form: the app is the connection's only destination.
    parts.uri = Uri::from(path_and_query);
    parts.version = http::Version::HTTP_11;
    Ok(Request::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request future is moved into the HTTP/2 stream set and copied on every move
    /// (`memcpy` was the top self cost per request at 2,680 bytes): keep it small. Raise the
    /// bound only knowingly.
    #[test]
    fn the_per_request_future_stays_small() {
        fn future_size<F, A, B, R>(_: &F) -> usize
        where
            F: Fn(A, B) -> R,
        {
            std::mem::size_of::<R>()
        }
        let size = future_size(&handle);
        assert!(size <= 1400, "handle's future is {size} bytes");
    }

    #[test]
    fn caller_label_is_recomputed_for_a_new_snapshot_only() {
        let cache = LabelCache::new();
        let calls = std::cell::Cell::new(0);
        let compute = |s: &'static str| {
            calls.set(calls.get() + 1);
            Arc::<str>::from(s)
        };
        let first = Arc::new(1u64);
        assert_eq!(&*cache.get(&first, || compute("a")), "a");
        assert_eq!(&*cache.get(&first, || compute("b")), "a");
        assert_eq!(calls.get(), 1);
        // A reload: a new snapshot, even once the old one is gone.
        drop(first);
        let second = Arc::new(1u64);
        assert_eq!(&*cache.get(&second, || compute("b")), "b");
        assert_eq!(&*cache.get(&second, || compute("c")), "b");
        assert_eq!(calls.get(), 2);
    }
}
