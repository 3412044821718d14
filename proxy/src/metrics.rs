//! Prometheus metrics, all under the `gatehouse_` prefix with bounded labels (a caller is a
//! policy alias or `other`, a route is a policy route name or `none`, reasons are fixed sets).
//!
//! [`Metrics::register`] builds the inbound and shared families on a registry the admin
//! listener exposes; other parts (outbound) register their own families on the same
//! [`Metrics::registry`].

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The metric prefix.
pub(crate) const PREFIX: &str = "gatehouse";

/// Most CRL issuers given a `gatehouse_crl_next_update_timestamp_seconds` series; further ones
/// are folded into `issuer="other"` (the earliest next-update).
pub(crate) const MAX_CRL_ISSUERS: usize = 16;

/// One more in a gauge while it lives: incremented when made, decremented when dropped (a
/// connection open, a connection parked), whichever way its owner ends.
#[derive(Debug)]
pub(crate) struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub(crate) fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The sidecar's metrics.
#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    /// `gatehouse_inbound_requests_total{route,caller,decision,reason,status}`.
    pub inbound_requests: IntCounterVec,
    /// `gatehouse_inbound_limited_total{caller,reason}`: requests the policy allowed but a
    /// `[[limit]]` refused; `caller` a policy identity or `other`, `reason` `rate_limited` or
    /// `overloaded`.
    pub inbound_limited: IntCounterVec,
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
    /// `gatehouse_admin_connections_refused_total`: admin connections closed at once because
    /// their source holds [`crate::admin`]'s per-source share.
    pub admin_connections_refused: IntCounter,
    /// `gatehouse_inbound_active_connections`.
    pub inbound_active_connections: IntGauge,
    /// `gatehouse_inbound_parked_connections`: HTTP/1.1 connections idle long enough to hold
    /// no HTTP buffer ([`crate::http::h1_server`]).
    pub inbound_parked_connections: IntGauge,
    /// `gatehouse_cert_expiry_timestamp_seconds{cert}`: `cert="leaf"` is our own leaf,
    /// `cert="root:<serial>"` each root of the trust bundle (serial truncated to 16 hex digits).
    pub cert_expiry: IntGaugeVec,
    /// `gatehouse_crl_next_update_timestamp_seconds{issuer}`: when each CRL of `[identity] crl`
    /// is due to be replaced, Unix seconds; `issuer` is the CRL issuer's common name (at most
    /// [`MAX_CRL_ISSUERS`] series: the CA tool writes one or two per root).
    pub crl_next_update: IntGaugeVec,
    /// `gatehouse_reloads_total{what,result}`: `what` is the file kind that changed (`cert`,
    /// `key`, `bundle`, `crl`, `policy`, `none` for a SIGHUP with nothing changed, `all` for an
    /// attempt that overran its deadline), `result` is `ok`, `error` (refused) or `timeout`.
    pub reloads: IntCounterVec,
    /// `gatehouse_reload_input_refused{what}`: 1 while that file's content on disk was refused
    /// (the sidecar serves an older version of it), else 0.
    pub reload_input_refused: IntGaugeVec,
    /// `gatehouse_reload_stuck`: 1 while a reload attempt has overrun its deadline.
    pub reload_stuck: IntGauge,
    /// `gatehouse_inbound_h2_client_resets_total`: streams the client reset (`RST_STREAM`)
    /// while they were still being served.
    pub inbound_h2_client_resets: IntCounter,
    /// `gatehouse_inbound_h2_goaways_total{reason}`: HTTP/2 connections we closed with
    /// `GOAWAY(ENHANCE_YOUR_CALM)`: `reason="too_many_resets"` (past `max_h2_resets`) or
    /// `"excessive_load"` (one of the `h2` crate's own limits).
    pub inbound_h2_goaways: IntCounterVec,
    /// `gatehouse_inbound_send_timeouts_total{protocol}`: responses aborted after
    /// `send_timeout` without progress: an HTTP/2 stream without window (`protocol="h2"`), or a
    /// connection whose socket took no byte (`"http1"` or `"h2"`).
    pub inbound_send_timeouts: IntCounterVec,
    /// `gatehouse_websocket_*` (issue 17).
    pub websocket: crate::http::tunnel::WebSocketMetrics,
}

impl Metrics {
    /// Creates the registry (prefix `gatehouse`) and registers the families.
    ///
    /// # Errors
    /// A prometheus error if a family is invalid or registered twice (a programming error).
    pub(crate) fn register() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some(PREFIX.to_owned()), None)?;
        let inbound_requests = IntCounterVec::new(
            Opts::new(
                "inbound_requests_total",
                "Inbound requests by route, caller, decision, reason and response status",
            ),
            &["route", "caller", "decision", "reason", "status"],
        )?;
        let inbound_limited = IntCounterVec::new(
            Opts::new(
                "inbound_limited_total",
                "Inbound requests refused by a [[limit]], by caller and reason (rate_limited|overloaded)",
            ),
            &["caller", "reason"],
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
        let inbound_parked_connections = IntGauge::new(
            "inbound_parked_connections",
            "Open inbound HTTP/1.1 connections waiting for their next request without HTTP buffers",
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
        registry.register(Box::new(inbound_limited.clone()))?;
        registry.register(Box::new(inbound_request_duration.clone()))?;
        registry.register(Box::new(tls_handshakes.clone()))?;
        registry.register(Box::new(tls_handshake_duration.clone()))?;
        registry.register(Box::new(inbound_active_connections.clone()))?;
        registry.register(Box::new(inbound_parked_connections.clone()))?;
        registry.register(Box::new(inbound_connections_refused.clone()))?;
        let admin_connections_refused = IntCounter::new(
            "admin_connections_refused_total",
            "Admin connections closed at once because their source address holds its share",
        )?;
        registry.register(Box::new(admin_connections_refused.clone()))?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "reloads_total",
                "Hot reloads by changed file kind and result (ok|error|timeout)",
            ),
            &["what", "result"],
        )?;
        let crl_next_update = IntGaugeVec::new(
            Opts::new(
                "crl_next_update_timestamp_seconds",
                "Next-update of each CRL in use (stale after it), Unix seconds, by issuer",
            ),
            &["issuer"],
        )?;
        registry.register(Box::new(crl_next_update.clone()))?;
        let reload_input_refused = IntGaugeVec::new(
            Opts::new(
                "reload_input_refused",
                "1 while the file's current content was refused by reload (an older version serves)",
            ),
            &["what"],
        )?;
        let reload_stuck = IntGauge::new(
            "reload_stuck",
            "1 while a reload attempt has overrun its deadline (reading or validating the files)",
        )?;
        registry.register(Box::new(reload_input_refused.clone()))?;
        registry.register(Box::new(reload_stuck.clone()))?;
        registry.register(Box::new(cert_expiry.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        let inbound_h2_client_resets = IntCounter::new(
            "inbound_h2_client_resets_total",
            "HTTP/2 streams the client reset while they were being served",
        )?;
        let inbound_h2_goaways = IntCounterVec::new(
            Opts::new(
                "inbound_h2_goaways_total",
                "HTTP/2 connections closed with GOAWAY(ENHANCE_YOUR_CALM), by reason (too_many_resets|excessive_load)",
            ),
            &["reason"],
        )?;
        let inbound_send_timeouts = IntCounterVec::new(
            Opts::new(
                "inbound_send_timeouts_total",
                "Responses aborted after send_timeout without progress, by protocol (http1|h2)",
            ),
            &["protocol"],
        )?;
        registry.register(Box::new(inbound_h2_client_resets.clone()))?;
        registry.register(Box::new(inbound_h2_goaways.clone()))?;
        registry.register(Box::new(inbound_send_timeouts.clone()))?;
        // issue 17: both sides' WebSocket tunnels.
        let websocket = crate::http::tunnel::WebSocketMetrics::register(&registry)?;
        Ok(Self {
            websocket,
            registry,
            inbound_requests,
            inbound_limited,
            inbound_request_duration,
            tls_handshakes,
            tls_handshake_duration,
            inbound_connections_refused,
            admin_connections_refused,
            inbound_active_connections,
            inbound_parked_connections,
            cert_expiry,
            crl_next_update,
            reloads,
            reload_input_refused,
            reload_stuck,
            inbound_h2_client_resets,
            inbound_h2_goaways,
            inbound_send_timeouts,
        })
    }

    /// Sets `gatehouse_crl_next_update_timestamp_seconds` for the CRLs of `set` (and drops
    /// the series of CRLs no longer there).
    pub(crate) fn publish_crls(&self, set: &crate::tls::crl::CrlSet) {
        let g = &self.crl_next_update;
        g.reset();
        for (i, crl) in set.crls().iter().enumerate() {
            let Some(next) = crl.next_update else {
                continue;
            };
            let label = if i < MAX_CRL_ISSUERS {
                crl.issuer.as_str()
            } else {
                "other"
            };
            let gauge = g.with_label_values(&[label]);
            let t = next.unix_timestamp();
            // Two issuers with one name, or the `other` fold: the earliest is what matters.
            if gauge.get() == 0 || t < gauge.get() {
                gauge.set(t);
            }
        }
    }

    /// The registry, for other families (`gatehouse_outbound_*`).
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every registered family.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * 1024);
        // Encoding into a Vec only fails on invalid metric families, which registration refused.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
