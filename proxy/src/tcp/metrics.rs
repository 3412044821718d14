//! `gatehouse_tcp_*` metrics (registered without the prefix: the sidecar's registry adds
//! `gatehouse_`). Labels are bounded: `listener` is the name of a `[[tcp_inbound]]` or
//! `[[tcp_outbound]]` entry (names are unique across both), `result` and `direction` come
//! from the fixed lists below.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// `result` values of `gatehouse_tcp_connections_total`.
pub(crate) const RESULTS: [&str; 9] = [
    "allowed",
    "denied",
    "audit_denied",
    "handshake_failed",
    "refused_source_connections",
    "refused_source_handshakes",
    "refused_pending_handshakes",
    "app_unreachable",
    "connect_failed",
];

/// The TCP metric families.
#[derive(Clone, Debug)]
pub(crate) struct TcpMetrics {
    connections: IntCounterVec,
    bytes: IntCounterVec,
    active: IntGaugeVec,
}

/// One listener's handles, label values bound once (no lookups per chunk).
#[derive(Clone, Debug)]
pub(crate) struct ListenerMetrics {
    families: TcpMetrics,
    name: String,
    /// `direction="client_to_server"`.
    pub client_to_server: IntCounter,
    /// `direction="server_to_client"`.
    pub server_to_client: IntCounter,
    /// Open connections on the listener.
    pub active: IntGauge,
}

impl TcpMetrics {
    /// Creates the families and registers them on `registry`.
    ///
    /// # Errors
    /// A family of the same name is already registered.
    pub(crate) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let connections = IntCounterVec::new(
            Opts::new(
                "tcp_connections_total",
                "TCP connections by listener and result (allowed, denied, audit_denied, handshake_failed, app_unreachable, connect_failed)",
            ),
            &["listener", "result"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "tcp_bytes_total",
                "Bytes streamed through TCP listeners, by listener and direction (client_to_server, server_to_client)",
            ),
            &["listener", "direction"],
        )?;
        let active = IntGaugeVec::new(
            Opts::new("tcp_active_connections", "Open TCP connections by listener"),
            &["listener"],
        )?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(active.clone()))?;
        Ok(Self {
            connections,
            bytes,
            active,
        })
    }

    /// The handles of listener `name`; its series exist from now on (at zero).
    pub(crate) fn listener(&self, name: &str) -> ListenerMetrics {
        for r in RESULTS {
            self.connections.with_label_values(&[name, r]);
        }
        ListenerMetrics {
            families: self.clone(),
            name: name.to_owned(),
            client_to_server: self.bytes.with_label_values(&[name, "client_to_server"]),
            server_to_client: self.bytes.with_label_values(&[name, "server_to_client"]),
            active: self.active.with_label_values(&[name]),
        }
    }
}

impl ListenerMetrics {
    /// Counts a connection with `result` (one of [`RESULTS`]).
    pub(crate) fn connection(&self, result: &'static str) {
        self.families
            .connections
            .with_label_values(&[self.name.as_str(), result])
            .inc();
    }
}
