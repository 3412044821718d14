//! What every connection of one TCP listener shares ([`Listener`]), beneath both the accept
//! loops (`super::listen`) and the two sides that serve a connection (`super::inbound`,
//! `super::outbound`).

use std::sync::Arc;

use gatehouse_ca::admission::{Caps, Sources};

use super::config;
use super::metrics::{ListenerMetrics, TcpMetrics};
use crate::config::DEFAULT_FAILED_HANDSHAKE_DELAY;
use crate::state::State;

/// What every connection of one `[[tcp_inbound]]` or `[[tcp_outbound]]` listener shares: its
/// configuration `C`, its index in the configuration, the sidecar's state and its metrics.
pub(super) struct Listener<C> {
    pub(super) index: usize,
    pub(super) cfg: C,
    pub(super) state: Arc<State>,
    pub(super) metrics: ListenerMetrics,
    /// Per-source admission before the TLS handshake (mTLS listeners only).
    pub(super) sources: Option<Arc<Sources>>,
}

impl<C: ListenerConfig> Listener<C> {
    pub(super) fn new(index: usize, cfg: C, state: &Arc<State>, metrics: &TcpMetrics) -> Arc<Self> {
        Arc::new(Self {
            index,
            metrics: metrics.listener(cfg.name()),
            sources: cfg.admission().map(|caps| Arc::new(Sources::new(caps))),
            cfg,
            state: state.clone(),
        })
    }
}

/// A TCP listener's configuration as the accept loop needs it.
pub(super) trait ListenerConfig: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn max_connections(&self) -> usize;
    /// The per-source caps of a listener that terminates mTLS from the network.
    fn admission(&self) -> Option<Caps> {
        None
    }
}

impl ListenerConfig for config::TcpInboundConfig {
    fn name(&self) -> &str {
        &self.name
    }
    fn max_connections(&self) -> usize {
        self.max_connections
    }
    fn admission(&self) -> Option<Caps> {
        Some(Caps {
            connections_per_source: self.max_connections_per_source,
            handshakes_per_source: self.max_handshakes_per_source,
            pending_handshakes: self.max_pending_handshakes,
            failed_handshake_delay: DEFAULT_FAILED_HANDSHAKE_DELAY,
        })
    }
}

impl ListenerConfig for config::TcpOutboundConfig {
    fn name(&self) -> &str {
        &self.name
    }
    fn max_connections(&self) -> usize {
        self.max_connections
    }
}
