//! `gatehouse_outbound_*` metrics (registered without the prefix: the sidecar's registry adds
//! `gatehouse_`). Labels are bounded: `upstream` is the name of an
//! `[[outbound]]` entry, `reason`/`result` come from fixed lists in this module's callers.

use std::sync::OnceLock;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// The outbound metric families, registered once per process.
#[derive(Clone, Debug)]
pub(crate) struct OutboundMetrics {
    requests: IntCounterVec,
    errors: IntCounterVec,
    handshakes: IntCounterVec,
    connections_open: IntGaugeVec,
    retries: IntCounterVec,
    retry_budget_exhausted: IntCounterVec,
    duration: HistogramVec,
    endpoint_requests: IntCounterVec,
    ejections: IntCounterVec,
    endpoints: IntGaugeVec,
    /// `gatehouse_tls_handshakes_total` and `gatehouse_tls_handshake_duration_seconds`, shared
    /// with the inbound side (`direction="outbound"` here), when registered with
    /// [`OutboundMetrics::with_tls`].
    tls: Option<(IntCounterVec, HistogramVec)>,
    /// `gatehouse_websocket_*{side="outbound"}` (issue 17), with the TLS families.
    websocket: Option<crate::http::tunnel::SideMetrics>,
}

/// The metric handles of one upstream, label values already bound (no lookups per request).
#[derive(Clone, Debug)]
pub(crate) struct UpstreamMetrics {
    families: OutboundMetrics,
    upstream: String,
    /// Open TLS connections to the upstream.
    pub connections_open: IntGauge,
    /// Time from the app's request to the upstream's response head.
    pub duration: Histogram,
    /// Endpoints ejected by the balancer.
    pub ejections: IntCounter,
    /// Endpoints by state (`active`, `warming`, `ejected`, `draining`), summed over event loops.
    pub endpoints: [IntGauge; 4],
    /// The `status="200"` counter, looked up on first use (most requests; the label lookup
    /// hashes both values under a lock).
    ok: OnceLock<IntCounter>,
    /// WebSocket tunnels through this upstream (issue 17); `None` in unit tests.
    pub websocket: Option<crate::http::tunnel::SideMetrics>,
}

impl OutboundMetrics {
    /// Creates the families and registers them on `registry`.
    ///
    /// # Errors
    /// A family of the same name is already registered.
    pub(crate) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "outbound_requests_total",
                "Requests the app sent through an outbound listener, by upstream and HTTP status returned to the app",
            ),
            &["upstream", "status"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "outbound_errors_total",
                "Requests the sidecar answered itself because the upstream failed, by upstream and reason",
            ),
            &["upstream", "reason"],
        )?;
        let handshakes = IntCounterVec::new(
            Opts::new(
                "outbound_tls_handshakes_total",
                "TLS handshakes with upstream sidecars, by upstream and result",
            ),
            &["upstream", "result"],
        )?;
        let connections_open = IntGaugeVec::new(
            Opts::new(
                "outbound_connections_open",
                "Open TLS connections to the upstream",
            ),
            &["upstream"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "outbound_retries_total",
                "Requests sent a second time, by upstream and reason (connect, unsent, refused, status_503)",
            ),
            &["upstream", "reason"],
        )?;
        let retry_budget_exhausted = IntCounterVec::new(
            Opts::new(
                "outbound_retry_budget_exhausted_total",
                "Retries retry_idempotent would have made but the retry budget refused",
            ),
            &["upstream"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "outbound_request_duration_seconds",
                "Time from the app's request to the upstream's response head (or the error)",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["upstream"],
        )?;
        let endpoint_requests = IntCounterVec::new(
            Opts::new(
                "outbound_endpoint_requests_total",
                "Requests sent to each endpoint (address DNS returned) of an upstream",
            ),
            &["upstream", "endpoint"],
        )?;
        let ejections = IntCounterVec::new(
            Opts::new(
                "outbound_ejections_total",
                "Endpoints ejected after consecutive connect, TLS or gateway failures",
            ),
            &["upstream"],
        )?;
        let endpoints = IntGaugeVec::new(
            Opts::new(
                "outbound_endpoints",
                "Endpoints of an upstream by balancer state",
            ),
            &["upstream", "state"],
        )?;
        registry.register(Box::new(endpoint_requests.clone()))?;
        registry.register(Box::new(ejections.clone()))?;
        registry.register(Box::new(endpoints.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(handshakes.clone()))?;
        registry.register(Box::new(connections_open.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(retry_budget_exhausted.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(Self {
            requests,
            errors,
            handshakes,
            connections_open,
            retries,
            retry_budget_exhausted,
            duration,
            endpoint_requests,
            ejections,
            endpoints,
            tls: None,
            websocket: None,
        })
    }

    /// Also counts handshakes in the sidecar's `gatehouse_tls_handshakes_total{direction}` and
    /// `gatehouse_tls_handshake_duration_seconds{direction}`, as `direction="outbound"`.
    pub(crate) fn with_tls(mut self, metrics: &crate::metrics::Metrics) -> Self {
        self.tls = Some((
            metrics.tls_handshakes.clone(),
            metrics.tls_handshake_duration.clone(),
        ));
        self.websocket = Some(metrics.websocket.side("outbound"));
        self
    }

    /// The handles for the upstream named `upstream`.
    pub(crate) fn upstream(&self, upstream: &str) -> UpstreamMetrics {
        UpstreamMetrics {
            connections_open: self.connections_open.with_label_values(&[upstream]),
            duration: self.duration.with_label_values(&[upstream]),
            ejections: self.ejections.with_label_values(&[upstream]),
            endpoints: ENDPOINT_STATES
                .map(|state| self.endpoints.with_label_values(&[upstream, state])),
            upstream: upstream.to_owned(),
            families: self.clone(),
            ok: OnceLock::new(),
            websocket: self.websocket.clone(),
        }
    }
}

/// The `state` label values of `gatehouse_outbound_endpoints`, in [`UpstreamMetrics::endpoints`]
/// order.
pub(crate) const ENDPOINT_STATES: [&str; 4] = ["active", "warming", "ejected", "draining"];

/// Why a request was sent a second time (`gatehouse_outbound_retries_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetryReason {
    /// No connection to the endpoint (TCP or TLS failed): nothing was sent.
    Connect,
    /// The pooled connection closed before any of the request was written.
    Unsent,
    /// The peer refused the HTTP/2 stream unprocessed (`REFUSED_STREAM`, or a GOAWAY whose last
    /// processed stream is below it).
    Refused,
    /// `retry_idempotent`: a bodiless GET/HEAD/OPTIONS answered 503.
    Status503,
}

impl RetryReason {
    /// The metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Unsent => "unsent",
            Self::Refused => "refused",
            Self::Status503 => "status_503",
        }
    }
}

impl UpstreamMetrics {
    /// The request counter of one endpoint (bound once, when the endpoint is added).
    pub(crate) fn endpoint_requests(&self, endpoint: std::net::SocketAddr) -> IntCounter {
        self.families
            .endpoint_requests
            .with_label_values(&[self.upstream.as_str(), &endpoint.to_string()])
    }

    /// Counts one request answered to the app with `status`.
    pub(crate) fn request(&self, status: u16) {
        if status == 200 {
            let ok = self.ok.get_or_init(|| {
                self.families
                    .requests
                    .with_label_values(&[self.upstream.as_str(), "200"])
            });
            ok.inc();
            return;
        }
        // StatusCode renders its three digits without allocating.
        let code = http::StatusCode::from_u16(status);
        let owned;
        let label = match &code {
            Ok(code) => code.as_str(),
            Err(_) => {
                owned = status.to_string();
                owned.as_str()
            }
        };
        self.families
            .requests
            .with_label_values(&[self.upstream.as_str(), label])
            .inc();
    }

    /// Counts one retry, by why (a label lookup, but only when a request is sent again).
    pub(crate) fn retry(&self, reason: RetryReason) {
        self.families
            .retries
            .with_label_values(&[self.upstream.as_str(), reason.label()])
            .inc();
    }

    /// Counts one retry the budget refused.
    pub(crate) fn retry_budget_exhausted(&self) {
        self.families
            .retry_budget_exhausted
            .with_label_values(&[self.upstream.as_str()])
            .inc();
    }

    /// Counts one request the sidecar answered itself, by `reason`.
    pub(crate) fn error(&self, reason: &str) {
        self.families
            .errors
            .with_label_values(&[self.upstream.as_str(), reason])
            .inc();
    }

    /// Counts one handshake with `result` (`ok` or a failure reason).
    pub(crate) fn handshake(&self, result: &str) {
        self.families
            .handshakes
            .with_label_values(&[self.upstream.as_str(), result])
            .inc();
        if let Some((counts, _)) = &self.families.tls {
            let labels = match result {
                "ok" => ["outbound", "ok", "none"],
                reason => ["outbound", "error", reason],
            };
            counts.with_label_values(&labels).inc();
        }
    }

    /// A successful handshake took `elapsed` (TCP connected to TLS done).
    pub(crate) fn handshake_took(&self, elapsed: std::time::Duration) {
        if let Some((_, durations)) = &self.families.tls {
            durations
                .with_label_values(&["outbound"])
                .observe(elapsed.as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_status_and_200_appears_on_first_use() {
        let registry = Registry::new();
        let families = OutboundMetrics::register(&registry).expect("register");
        let m = families.upstream("monolith");
        let series = |status: &str| {
            families
                .requests
                .with_label_values(&["monolith", status])
                .get()
        };
        let has_200 = || {
            registry.gather().iter().any(|f| {
                f.get_metric().iter().any(|m| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == "status" && l.value() == "200")
                })
            })
        };
        assert!(!has_200(), "no 200 series before a 200");
        m.request(200);
        m.clone().request(200);
        m.request(404);
        m.request(799);
        assert_eq!(series("200"), 2);
        assert_eq!(series("404"), 1);
        assert_eq!(series("799"), 1);
    }
}
