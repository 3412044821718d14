//! The plaintext side of an outbound entry: the local app connects here (HTTP/1.1, or h2c with
//! prior knowledge) and every request is forwarded on the upstream's mTLS pool.
//!
//! Per request: keep the app's `x-request-id` or add one, refuse a `Transfer-Encoding` other
//! than `chunked` (as the inbound side does), drop hop-by-hop headers, send it upstream, and
//! answer with the upstream's response (streamed) or, when the sidecar could not get one, a
//! JSON error body ([`super::error::OutboundError::to_response`]). Each request is counted and
//! written to the audit log with the same request id the peer's inbound sidecar logs.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::crypto::CryptoProvider;
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info_span, warn};

use super::error::OutboundError;
use super::upstream::{Upstream, UpstreamBody};
use crate::accept::Acceptor;
use crate::audit::{self, OutboundRecord};
use crate::http::headers::{
    REQUEST_ID, RequestIds, check_transfer_encoding, is_acceptable_request_id, keep_or_start_trace,
    strip_hop_by_hop,
};
use crate::signal::Shutdown;

/// What the app receives: the upstream's body, streamed, or the sidecar's own JSON.
pub type OutboundBody = Either<UpstreamBody, Full<Bytes>>;

/// One bound outbound listener and the upstream it forwards to.
#[derive(Debug)]
pub struct OutboundListener {
    listener: Acceptor,
    upstream: Arc<Upstream>,
    server_id: String,
    ids: RequestIds,
}

impl OutboundListener {
    /// Wraps a bound listener.
    pub fn new(
        listener: Acceptor,
        upstream: Arc<Upstream>,
        server_id: String,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            listener,
            upstream,
            server_id,
            ids: RequestIds::new(&provider),
        }
    }

    /// The bound address.
    ///
    /// # Errors
    /// The socket's error.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.listener.local_addr())
    }

    /// Accepts until shutdown starts; each connection runs as a tracked task and drains
    /// gracefully (HTTP/1.1 closes after the in-flight request, HTTP/2 sends GOAWAY).
    pub async fn serve(mut self, shutdown: Shutdown) {
        let ctx = Arc::new(Ctx {
            upstream: self.upstream,
            server_id: self.server_id,
            ids: self.ids,
        });
        loop {
            let (tcp, peer) = tokio::select! {
                c = self.listener.accept() => c,
                () = shutdown.token().cancelled() => break,
            };
            let span = info_span!("outbound", upstream = %ctx.upstream.name(), %peer);
            let task = serve_one(tcp, Arc::clone(&ctx), shutdown.clone()).instrument(span);
            shutdown.tracker().spawn(task);
        }
    }
}

#[derive(Debug)]
struct Ctx {
    upstream: Arc<Upstream>,
    server_id: String,
    ids: RequestIds,
}

async fn serve_one(tcp: TcpStream, ctx: Arc<Ctx>, shutdown: Shutdown) {
    let _ = tcp.set_nodelay(true);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    let service = hyper::service::service_fn(move |req| handle(Arc::clone(&ctx), req));
    let conn = builder.serve_connection(TokioIo::new(tcp), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        res = conn.as_mut() => res,
        () = shutdown.token().cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "outbound app connection ended with an error");
    }
}

async fn handle(
    ctx: Arc<Ctx>,
    mut req: Request<Incoming>,
) -> Result<Response<OutboundBody>, Infallible> {
    let started = Instant::now();
    let request_id = keep_or_assign(&ctx.ids, req.headers_mut());
    // Both sides' audit lines join on it: kept when the app sent one, else started here.
    let trace_id = keep_or_start_trace(&ctx.ids, req.headers_mut());
    // Kept for the audit line only; both clones are cheap (the URI shares the request's
    // bytes), where copying the path out was an allocation per request.
    let audited = audit::enabled().then(|| (req.method().clone(), req.uri().clone()));
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
    let (response, reason, serial) = match sent {
        Ok((resp, serial)) => {
            let mut resp = resp.map(Either::Left);
            strip_hop_by_hop(resp.headers_mut());
            resp.headers_mut()
                .entry(REQUEST_ID)
                .or_insert_with(|| request_id.clone());
            (resp, "forwarded", Some(serial))
        }
        Err(e) => {
            metrics.error(e.reason());
            warn!(request_id = %display_id(&request_id), error = %e, "outbound request failed");
            let resp = e
                .to_response(upstream.name(), &request_id)
                .map(Either::Right);
            (resp, e.reason(), None)
        }
    };
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    metrics.duration.observe(elapsed.as_secs_f64());
    metrics.request(status);
    if let Some((method, uri)) = &audited {
        audit::record_outbound(&OutboundRecord {
            request_id: display_id(&request_id),
            trace_id: Some(&trace_id),
            upstream: upstream.name(),
            server_id: &ctx.server_id,
            server_serial: serial.as_deref(),
            method: method.as_str(),
            path: uri.path(),
            status,
            reason,
            duration: elapsed,
        });
    }
    Ok(response)
}

fn display_id(id: &HeaderValue) -> &str {
    id.to_str().unwrap_or("-")
}

/// The app's `x-request-id` if acceptable (the inbound side keeps exactly the same ones),
/// else a fresh one, set on the request; sensitive either way (never HPACK-indexed, see
/// [`RequestIds::next`]).
fn keep_or_assign(ids: &RequestIds, headers: &mut HeaderMap) -> HeaderValue {
    // One hash and probe of the name for the lookup and the insertion.
    match headers.entry(REQUEST_ID) {
        header::Entry::Occupied(mut e) => {
            let v = e.get_mut();
            if is_acceptable_request_id(v) {
                v.set_sensitive(true);
                return v.clone();
            }
            let id = ids.next();
            // Replaces every value of the header (a repeated one included).
            e.insert(id.clone());
            id
        }
        header::Entry::Vacant(e) => e.insert(ids.next()).clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_is_kept_when_sane_and_replaced_otherwise() {
        let ids = RequestIds::new(&crate::tls::provider());
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(keep_or_assign(&ids, &mut h), "abc-123");

        let mut h = HeaderMap::new();
        // A fresh id from the generator (its UUID shape is tested in `crate::http::headers`).
        let fresh = keep_or_assign(&ids, &mut h);
        assert_eq!(fresh.len(), 36);
        assert!(is_acceptable_request_id(&fresh));
        assert_eq!(h.get(&REQUEST_ID), Some(&fresh));
        assert_ne!(fresh, keep_or_assign(&ids, &mut HeaderMap::new()));

        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("has space"));
        h.append(REQUEST_ID, HeaderValue::from_static("second"));
        let id = keep_or_assign(&ids, &mut h);
        assert_ne!(id, "has space");
        let sent: Vec<&HeaderValue> = h.get_all(&REQUEST_ID).iter().collect();
        assert_eq!(sent, [&id], "one value, the fresh id");

        // An id the inbound side would replace is replaced here already, so both sidecars'
        // audit lines carry the same one.
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("tenant/42"));
        assert_ne!(keep_or_assign(&ids, &mut h), "tenant/42");
    }

    #[test]
    fn request_ids_sent_upstream_are_never_hpack_indexed() {
        // A sensitive value is an HPACK never-indexed literal: unique ids must not churn the
        // h2 dynamic tables of the two sidecars.
        let ids = RequestIds::new(&crate::tls::provider());
        let mut kept = HeaderMap::new();
        kept.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        let mut fresh = HeaderMap::new();
        fresh.insert(REQUEST_ID, HeaderValue::from_static("has space"));
        for mut h in [kept, fresh, HeaderMap::new()] {
            let id = keep_or_assign(&ids, &mut h);
            assert!(id.is_sensitive());
            assert!(h[&REQUEST_ID].is_sensitive(), "{:?}", h.get(&REQUEST_ID));
        }
    }
}
