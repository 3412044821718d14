//! What every connection of one TCP listener shares ([`Listener`]), beneath both the accept
//! loops (`super::listen`) and the two sides that serve a connection (`super::inbound`,
//! `super::outbound`).

use std::sync::Arc;

use super::config;
use super::metrics::{ListenerMetrics, TcpMetrics};
use crate::state::State;

/// What every connection of one `[[tcp_inbound]]` or `[[tcp_outbound]]` listener shares: its
/// configuration `C`, its index in the configuration, the sidecar's state and its metrics.
pub(super) struct Listener<C> {
    pub(super) index: usize,
    pub(super) cfg: C,
    pub(super) state: Arc<State>,
    pub(super) metrics: ListenerMetrics,
}

impl<C: ListenerConfig> Listener<C> {
    pub(super) fn new(index: usize, cfg: C, state: &Arc<State>, metrics: &TcpMetrics) -> Arc<Self> {
        Arc::new(Self {
            index,
            metrics: metrics.listener(cfg.name()),
            cfg,
            state: state.clone(),
        })
    }
}

/// A TCP listener's configuration as the accept loop needs it.
pub(super) trait ListenerConfig: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn max_connections(&self) -> usize;
}

impl ListenerConfig for config::TcpInboundConfig {
    fn name(&self) -> &str {
        &self.name
    }
    fn max_connections(&self) -> usize {
        self.max_connections
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
