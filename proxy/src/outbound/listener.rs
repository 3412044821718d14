//! The plaintext side of an outbound entry: the local app connects here (HTTP/1.1, or h2c with
//! prior knowledge) and every request is forwarded on the upstream's mTLS pool.
//!
//! Per request: keep the app's `x-request-id` or add one, drop hop-by-hop headers, send it
//! upstream, and answer with the upstream's response (streamed) or, when the sidecar could not
//! get one, a JSON error body ([`OutboundError::to_response`]). Each request is counted and
//! written to the audit log with the same request id the peer's inbound sidecar logs.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::crypto::CryptoProvider;
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info_span, warn};

use super::connect::Upstream;
use crate::accept::Acceptor;
use crate::audit::{self, OutboundRecord};
use crate::signal::Shutdown;

/// What the app receives: the upstream's body, streamed, or the sidecar's own JSON.
pub type OutboundBody = Either<Incoming, Full<Bytes>>;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// A request id longer than this, or not visible ASCII, is replaced (it ends up in logs).
const MAX_REQUEST_ID_LEN: usize = 128;

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
                res = self.listener.accept() => match res {
                    Ok(conn) => conn,
                    Err(e) => {
                        warn!(upstream = %ctx.upstream.name(), error = %e, "outbound accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
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
    let request_id = ctx.ids.keep_or_assign(req.headers_mut());
    // Kept for the audit line only; both clones are cheap (the URI shares the request's
    // bytes), where copying the path out was an allocation per request.
    let audited = audit::enabled().then(|| (req.method().clone(), req.uri().clone()));
    strip_hop_by_hop(req.headers_mut());
    let upstream = &ctx.upstream;
    let metrics = upstream.metrics();
    let (response, reason) = match upstream.send(req).await {
        Ok(resp) => {
            let mut resp = resp.map(Either::Left);
            strip_hop_by_hop(resp.headers_mut());
            resp.headers_mut()
                .entry(X_REQUEST_ID)
                .or_insert_with(|| request_id.clone());
            (resp, "forwarded")
        }
        Err(e) => {
            metrics.error(e.reason());
            warn!(request_id = %display_id(&request_id), error = %e, "outbound request failed");
            let resp = e
                .to_response(upstream.name(), &request_id)
                .map(Either::Right);
            (resp, e.reason())
        }
    };
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    metrics.duration.observe(elapsed.as_secs_f64());
    metrics.request(status);
    if let Some((method, uri)) = &audited {
        audit::record_outbound(&OutboundRecord {
            request_id: display_id(&request_id),
            upstream: upstream.name(),
            server_id: &ctx.server_id,
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

/// Request ids: UUID-shaped (version 4 and RFC 4122 variant bits set) from a random
/// per-listener 64-bit prefix drawn from the TLS provider's CSPRNG and a counter starting at a
/// random value, so they are unique without a random draw per request (the draw cost more than
/// the rest of the request's header handling).
#[derive(Debug)]
struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl RequestIds {
    fn new(provider: &CryptoProvider) -> Self {
        let mut seed = [0u8; 16];
        if provider.secure_random.fill(&mut seed).is_err() {
            // The CSPRNG failing is not a reason to fail: fall back to the clock, ids only need
            // to be unique enough to follow a request through two logs.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            seed = nanos.to_le_bytes();
        }
        let (a, b) = seed.split_at(8);
        Self {
            prefix: u64::from_le_bytes(a.try_into().unwrap_or_default()),
            counter: AtomicU64::new(u64::from_le_bytes(b.try_into().unwrap_or_default())),
        }
    }

    /// The app's `x-request-id` if it is a sane token, else a fresh one (set on the request).
    fn keep_or_assign(&self, headers: &mut HeaderMap) -> HeaderValue {
        // One hash and probe of the name for the lookup and the insertion.
        // Sensitive: HPACK sends it as a never-indexed literal. A request id is unique, so
        // indexing it only churns the h2 dynamic tables on both sides, evicting the entries
        // (path, authority) that let every other header be sent as an index.
        match headers.entry(X_REQUEST_ID) {
            header::Entry::Occupied(mut e) => {
                let v = e.get_mut();
                let ok = !v.is_empty()
                    && v.len() <= MAX_REQUEST_ID_LEN
                    && v.as_bytes().iter().all(|b| b.is_ascii_graphic());
                if ok {
                    v.set_sensitive(true);
                    return v.clone();
                }
                let id = self.fresh();
                // Replaces every value of the header (a repeated one included).
                e.insert(id.clone());
                id
            }
            header::Entry::Vacant(e) => e.insert(self.fresh()).clone(),
        }
    }

    fn fresh(&self) -> HeaderValue {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.prefix.to_be_bytes());
        b[8..].copy_from_slice(&n.to_be_bytes());
        b[6] = (b[6] & 0x0f) | 0x40; // version 4
        b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
        // Where each byte's two hex digits go in 8-4-4-4-12.
        const AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
        let mut text = *b"00000000-0000-0000-0000-000000000000";
        for (byte, at) in b.into_iter().zip(AT) {
            text[at] = HEX[usize::from(byte >> 4)];
            text[at + 1] = HEX[usize::from(byte & 0xf)];
        }
        // Invariant: lowercase hex and dashes are valid header bytes.
        let mut id = HeaderValue::from_bytes(&text).expect("hex is a valid header value");
        id.set_sensitive(true);
        id
    }
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): those named in `Connection`, and the fixed
/// list. They describe one connection and must not be forwarded to the next.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests carry none: one pass over the names instead of a lookup per name.
    if !headers.keys().any(|k| {
        matches!(
            k,
            &header::CONNECTION
                | &header::TE
                | &header::TRAILER
                | &header::TRANSFER_ENCODING
                | &header::UPGRADE
                | &header::PROXY_AUTHENTICATE
                | &header::PROXY_AUTHORIZATION
        ) || k == "keep-alive"
            || k == "proxy-connection"
    }) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_is_kept_when_sane_and_replaced_otherwise() {
        let ids = RequestIds::new(&crate::tls::provider());
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(ids.keep_or_assign(&mut h), "abc-123");

        let mut h = HeaderMap::new();
        let fresh = ids.keep_or_assign(&mut h);
        assert_eq!(fresh.len(), 36);
        let text = fresh.to_str().expect("ascii");
        for (i, c) in text.bytes().enumerate() {
            match i {
                8 | 13 | 18 | 23 => assert_eq!(c, b'-', "{text}"),
                14 => assert_eq!(c, b'4', "version 4: {text}"),
                19 => assert!(b"89ab".contains(&c), "RFC 4122 variant: {text}"),
                _ => assert!(matches!(c, b'0'..=b'9' | b'a'..=b'f'), "{text}"),
            }
        }
        assert_eq!(h.get(&X_REQUEST_ID), Some(&fresh));
        assert_ne!(fresh, ids.keep_or_assign(&mut HeaderMap::new()));

        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
        h.append(X_REQUEST_ID, HeaderValue::from_static("second"));
        let id = ids.keep_or_assign(&mut h);
        assert_ne!(id, "has space");
        let sent: Vec<&HeaderValue> = h.get_all(&X_REQUEST_ID).iter().collect();
        assert_eq!(sent, [&id], "one value, the fresh id");
    }

    #[test]
    fn request_ids_sent_upstream_are_never_hpack_indexed() {
        // A sensitive value is an HPACK never-indexed literal: unique ids must not churn the
        // h2 dynamic tables of the two sidecars.
        let ids = RequestIds::new(&crate::tls::provider());
        let mut kept = HeaderMap::new();
        kept.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        let mut fresh = HeaderMap::new();
        fresh.insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
        for mut h in [kept, fresh, HeaderMap::new()] {
            let id = ids.keep_or_assign(&mut h);
            assert!(id.is_sensitive());
            assert!(
                h[&X_REQUEST_ID].is_sensitive(),
                "{:?}",
                h.get(&X_REQUEST_ID)
            );
        }
    }

    #[test]
    fn fresh_ids_are_prefix_and_counter_in_uuid_layout() {
        let ids = RequestIds {
            prefix: 0x0123_4567_89ab_cdef,
            counter: AtomicU64::new(0xfedc_ba98_7654_3210),
        };
        assert_eq!(ids.fresh(), "01234567-89ab-4def-bedc-ba9876543210");
        assert_eq!(ids.fresh(), "01234567-89ab-4def-bedc-ba9876543211");
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_and_end_to_end_ones_kept() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::ACCEPT));
    }
}
