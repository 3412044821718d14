//! `ca serve --metrics-listen ADDR`: Prometheus text on plain HTTP (`GET /metrics`), for the
//! scraper only. Keep it on loopback or a network only the scraper reaches, as the sidecar's
//! admin port; it holds at most [`MAX_CONNECTIONS`] connections, each closed after 10 s without
//! a request head.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Connections the metrics listener holds at once (more wait in the accept queue).
const MAX_CONNECTIONS: usize = 16;

/// The `gatehouse_ca_*` metrics of one `ca serve`.
pub(super) struct Metrics {
    registry: Registry,
    /// `gatehouse_ca_requests_total{endpoint, code}`.
    requests: IntCounterVec,
    /// `gatehouse_ca_connections_refused_total{reason}`.
    refused: IntCounterVec,
    /// `gatehouse_ca_active_connections`.
    pub(super) active: IntGauge,
    /// `gatehouse_ca_serving_cert_expiry_timestamp_seconds`, set at each scrape.
    serving_cert_expiry: IntGauge,
}

impl Metrics {
    /// The metrics, registered on their own registry.
    pub(super) fn new() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("gatehouse_ca".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "API requests by endpoint (enroll, renew, bundle, crl, other) and status code",
            ),
            &["endpoint", "code"],
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "connections_refused_total",
                "Connections closed before their TLS handshake, by the cap that was full",
            ),
            &["reason"],
        )?;
        let active = IntGauge::new("active_connections", "Open API connections")?;
        let serving_cert_expiry = IntGauge::new(
            "serving_cert_expiry_timestamp_seconds",
            "Expiry of the server's own certificate, Unix seconds (it renews after two thirds; \
             an expiry coming close means renewal fails, e.g. the store is down)",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(active.clone()))?;
        registry.register(Box::new(serving_cert_expiry.clone()))?;
        Ok(Self {
            registry,
            requests,
            refused,
            active,
            serving_cert_expiry,
        })
    }

    /// Counts an answered request to `endpoint` ([`endpoint`]).
    pub(super) fn request(&self, endpoint: &'static str, status: StatusCode) {
        self.requests
            .with_label_values(&[endpoint, status.as_str()])
            .inc();
    }

    /// Counts a connection refused at admission.
    pub(super) fn refused(&self, reason: &'static str) {
        self.refused.with_label_values(&[reason]).inc();
    }

    /// The text exposition, with the serving certificate's expiry (`not_after`) as of now.
    fn encode(&self, not_after: Option<i64>) -> Vec<u8> {
        if let Some(t) = not_after {
            self.serving_cert_expiry.set(t);
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// The `endpoint` label of a request path: the API's paths, else `other` (bounded).
pub(super) fn endpoint(path: &str) -> &'static str {
    match path {
        crate::api::ENROLL_PATH => "enroll",
        crate::api::RENEW_PATH => "renew",
        crate::api::BUNDLE_PATH => "bundle",
        crate::api::CRL_PATH => "crl",
        _ => "other",
    }
}

/// Serves `GET /metrics` on `listener` until the process exits; `not_after` reads the serving
/// certificate's expiry at each scrape.
pub(super) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    not_after: impl Fn() -> Option<i64> + Send + Sync + 'static,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let not_after = Arc::new(not_after);
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return; // never closed
        };
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (metrics, not_after) = (Arc::clone(&metrics), Arc::clone(&not_after));
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r = answer(&req, &metrics, not_after());
                async move { Ok::<_, Infallible>(r) }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            let _ = b.serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}

fn answer(
    req: &Request<Incoming>,
    metrics: &Metrics,
    not_after: Option<i64>,
) -> Response<Full<Bytes>> {
    let (status, body, kind) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            metrics.encode(not_after),
            "text/plain; version=0.0.4",
        ),
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            b"only /metrics here; the API is on --listen\n".to_vec(),
            "text/plain",
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            b"use GET /metrics\n".to_vec(),
            "text/plain",
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
    r
}
