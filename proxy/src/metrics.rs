//! Prometheus metrics, all under the `gatehouse_` prefix with bounded labels (a caller is a
//! policy alias or `other`, a route is a policy route name or `none`, reasons are fixed sets).
//!
//! [`Metrics::register`] builds the inbound and shared families on a registry the admin
//! listener exposes; other parts (outbound) register their own families on the same
//! [`Metrics::registry`].

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// The metric prefix.
pub const PREFIX: &str = "gatehouse";

/// The sidecar's metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// `gatehouse_inbound_requests_total{route,caller,decision,reason,status}`.
    pub inbound_requests: IntCounterVec,
    /// `gatehouse_inbound_request_duration_seconds{decision}` (to response headers).
    pub inbound_request_duration: HistogramVec,
    /// `gatehouse_tls_handshakes_total{direction,result,reason}`.
    pub tls_handshakes: IntCounterVec,
    /// `gatehouse_tls_handshake_duration_seconds{direction}` (successful handshakes).
    pub tls_handshake_duration: HistogramVec,
    /// `gatehouse_inbound_connections_refused_total{reason}`: connections closed at admission,
    /// before their handshake (`source_connections`, `source_handshakes`,
    /// `pending_handshakes`).
    pub inbound_connections_refused: IntCounterVec,
    /// `gatehouse_inbound_active_connections`.
    pub inbound_active_connections: IntGauge,
    /// `gatehouse_cert_expiry_timestamp_seconds{cert}`: `cert="leaf"` is our own leaf,
    /// `cert="root:<serial>"` each root of the trust bundle (serial truncated to 16 hex digits).
    pub cert_expiry: IntGaugeVec,
    /// `gatehouse_reloads_total{what,result}`: `what` is the file kind that changed (`cert`,
    /// `key`, `bundle`, `crl`, `policy`, or `none` for a SIGHUP with nothing changed), `result`
    /// is `ok` or `error`.
    pub reloads: IntCounterVec,
}

impl Metrics {
    /// Creates the registry (prefix `gatehouse`) and registers the families.
    ///
    /// # Errors
    /// A prometheus error if a family is invalid or registered twice (a programming error).
    pub fn register() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some(PREFIX.to_owned()), None)?;
        let inbound_requests = IntCounterVec::new(
            Opts::new(
                "inbound_requests_total",
                "Inbound requests by route, caller, decision, reason and response status",
            ),
            &["route", "caller", "decision", "reason", "status"],
        )?;
        let inbound_request_duration = HistogramVec::new(
            HistogramOpts::new(
                "inbound_request_duration_seconds",
                "Inbound request time until the response headers, by decision",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["decision"],
        )?;
        let tls_handshakes = IntCounterVec::new(
            Opts::new(
                "tls_handshakes_total",
                "TLS handshakes by direction, result (ok|error) and failure reason",
            ),
            &["direction", "result", "reason"],
        )?;
        let tls_handshake_duration = HistogramVec::new(
            HistogramOpts::new(
                "tls_handshake_duration_seconds",
                "Duration of successful TLS handshakes",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
            ]),
            &["direction"],
        )?;
        let inbound_active_connections = IntGauge::new(
            "inbound_active_connections",
            "Open inbound connections (after the TCP accept)",
        )?;
        let inbound_connections_refused = IntCounterVec::new(
            Opts::new(
                "inbound_connections_refused_total",
                "Inbound connections closed before their handshake, by the limit that was full",
            ),
            &["reason"],
        )?;
        let cert_expiry = IntGaugeVec::new(
            Opts::new(
                "cert_expiry_timestamp_seconds",
                "Expiry of certificates in use, Unix seconds",
            ),
            &["cert"],
        )?;
        registry.register(Box::new(inbound_requests.clone()))?;
        registry.register(Box::new(inbound_request_duration.clone()))?;
        registry.register(Box::new(tls_handshakes.clone()))?;
        registry.register(Box::new(tls_handshake_duration.clone()))?;
        registry.register(Box::new(inbound_active_connections.clone()))?;
        registry.register(Box::new(inbound_connections_refused.clone()))?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "reloads_total",
                "Hot reloads by changed file kind and result (ok|error)",
            ),
            &["what", "result"],
        )?;
        registry.register(Box::new(cert_expiry.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        Ok(Self {
            registry,
            inbound_requests,
            inbound_request_duration,
            tls_handshakes,
            tls_handshake_duration,
            inbound_connections_refused,
            inbound_active_connections,
            cert_expiry,
            reloads,
        })
    }

    /// The registry, for other families (`gatehouse_outbound_*`).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every registered family.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * 1024);
        // Encoding into a Vec only fails on invalid metric families, which registration refused.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
