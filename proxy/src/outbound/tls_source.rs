//! Where an upstream pool takes its TLS client configuration: the one seam between the pools
//! and the sidecar's snapshot ([`crate::state::State`] implements [`TlsSource`]).
//!
//! A pool asks for the configuration of its entry each time it dials (so a new connection
//! always uses the current snapshot's trust bundle, CRLs and verifier), and compares the
//! *trust generation* a connection was opened under with the current one each time it would
//! reuse the connection: a connection from an older generation is retired (requests in flight
//! finish on it, new ones go over a new handshake). Reading the generation is one atomic load,
//! so the per-request path loads no snapshot.

use std::sync::Arc;

use rustls::ClientConfig;

use super::PreparedOutbound;

/// The TLS client configurations of the upstream pools and their trust generation.
pub(crate) trait TlsSource: Send + Sync + 'static {
    /// The configuration for a new connection of the entry named `upstream` (read once per
    /// connect); `None` when the entry is unknown (a bug: entries never change at run time).
    fn client_config(&self, upstream: &str) -> Option<Arc<ClientConfig>>;

    /// The current trust generation (read once per request: must be cheap). Connections
    /// opened under an older one are not reused.
    fn trust_generation(&self) -> u64;
}

/// The configuration `entries` hold for the entry named `upstream`.
pub(crate) fn find(entries: &[PreparedOutbound], upstream: &str) -> Option<Arc<ClientConfig>> {
    entries
        .iter()
        .find(|p| p.name() == upstream)
        .map(PreparedOutbound::tls_config)
}

/// The configurations of prepared entries, fixed for the pools' life (pools that do not
/// follow reloads: the unit tests' `Outbound::spawn`).
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct FixedTls(pub(crate) Vec<PreparedOutbound>);

#[cfg(test)]
impl TlsSource for FixedTls {
    fn client_config(&self, upstream: &str) -> Option<Arc<ClientConfig>> {
        find(&self.0, upstream)
    }

    fn trust_generation(&self) -> u64 {
        0
    }
}
