//! One outbound request, top-down: keep the app's `x-request-id` or add one (the rule of
//! [`crate::http::headers::RequestIds::keep_or_assign`], the same as the inbound side's),
//! refuse a `Transfer-Encoding` other than `chunked` (as the inbound side does), drop
//! hop-by-hop headers, send it on the upstream's mTLS pool ([`super::upstream`]), and answer
//! with the upstream's response (streamed) or, when the sidecar could not get one, the JSON
//! error body ([`super::error::OutboundError::to_response`]). Each request is counted and
//! written to the audit log with the same request id the peer's inbound sidecar logs.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tracing::warn;

use super::error::OutboundError;
use super::pool::UpstreamBody;
use super::upstream::Upstream;
use crate::audit::{self, OutboundRecord};
use crate::http::headers::{
    REQUEST_ID, RequestIds, check_transfer_encoding, keep_or_assign, keep_or_derive_trace,
    strip_hop_by_hop,
};
use crate::outcome::Outcome;

/// What the app receives: the upstream's body, streamed, or the sidecar's own JSON.
pub(crate) type OutboundBody = Either<UpstreamBody, Full<Bytes>>;

/// What every request of one outbound listener shares.
#[derive(Debug)]
pub(super) struct Ctx {
    pub(super) upstream: Arc<Upstream>,
    pub(super) server_id: String,
    pub(super) ids: RequestIds,
    /// Graceful shutdown's tasks: a WebSocket tunnel outlives its app connection's task, so
    /// it is tracked itself and drains like a request.
    pub(super) tracker: tokio_util::task::TaskTracker,
}

/// Serves one request (not an upgrade: `super::conn` sends those to `super::websocket`).
pub(super) async fn handle(
    ctx: Arc<Ctx>,
    mut req: Request<Incoming>,
) -> Result<Response<OutboundBody>, Infallible> {
    let started = Instant::now();
    let request_id = keep_or_assign(&ctx.ids, req.headers_mut());
    // Kept for the audit line only; both clones are cheap (the URI shares the request's
    // bytes), where copying the path out was an allocation per request. The trace id joins
    // both sides' audit lines: the app's, or else derived from the request id, which the
    // inbound side derives the same way (no header added here, nothing for either sidecar to
    // encode or decode). Without an audit log there is no line to join.
    let audited = audit::enabled().then(|| {
        let trace_id = keep_or_derive_trace(req.headers_mut(), &request_id, false);
        (req.method().clone(), req.uri().clone(), trace_id)
    });
    let upstream = &ctx.upstream;
    let metrics = upstream.metrics();
    // The framing rule of the inbound side (`headers::strip_for_app`), so a request is refused
    // the same way whichever protocol carries it upstream. Only a body of unknown length can
    // be chunked: the common bodiless or sized request skips the header lookup.
    let framing = match http_body::Body::size_hint(req.body()).exact() {
        Some(_) => Ok(()),
        None => check_transfer_encoding(req.headers_mut()).map_err(OutboundError::Framing),
    };
    let sent = match framing {
        Ok(()) => upstream.send(req).await,
        Err(e) => Err(e),
    };
    let (response, outcome, serial) = match sent {
        Ok((resp, serial)) => {
            let (resp, outcome) = forwarded(resp, &request_id);
            (resp, outcome, Some(serial))
        }
        Err(e) => {
            let (resp, outcome) = refused(&e, upstream, &request_id, "outbound request failed");
            (resp, outcome, None)
        }
    };
    let elapsed = started.elapsed();
    metrics.duration.observe(elapsed.as_secs_f64());
    metrics.request(outcome.status().as_u16());
    if let Some((method, uri, trace_id)) = &audited {
        audit::record_outbound(&OutboundRecord {
            request_id: display_id(&request_id),
            trace_id: Some(trace_id),
            upstream: upstream.name(),
            server_id: &ctx.server_id,
            server_serial: serial.as_deref(),
            method: method.as_str(),
            path: uri.path(),
            outcome,
            duration: elapsed,
        });
    }
    Ok(response)
}

/// The peer's answer as the app receives it: hop-by-hop headers stripped, our request id
/// added when the peer sent none.
pub(super) fn forwarded(
    resp: Response<UpstreamBody>,
    request_id: &HeaderValue,
) -> (Response<OutboundBody>, Outcome) {
    let mut resp = resp.map(Either::Left);
    strip_hop_by_hop(resp.headers_mut());
    resp.headers_mut()
        .entry(REQUEST_ID)
        .or_insert_with(|| request_id.clone());
    let outcome = Outcome::Forwarded(resp.status());
    (resp, outcome)
}

/// The sidecar's own JSON answer to a request that did not reach the peer's app, counted and
/// logged (`what` says which request).
pub(super) fn refused(
    e: &OutboundError,
    upstream: &Upstream,
    request_id: &HeaderValue,
    what: &'static str,
) -> (Response<OutboundBody>, Outcome) {
    let outcome = e.outcome();
    upstream.metrics().error(outcome.reason());
    warn!(request_id = %display_id(request_id), error = %e, "{what}");
    let resp = e
        .to_response(upstream.name(), request_id)
        .map(Either::Right);
    (resp, outcome)
}

pub(super) fn display_id(id: &HeaderValue) -> &str {
    id.to_str().unwrap_or("-")
}
