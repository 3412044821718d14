//! The inbound accept loop (mini-redis's `Listener`): the shared accept limiter bounds open
//! connections ([`crate::accept::Acceptor::accept_within`]), a source's admission is checked
//! before any TLS byte is read, and each connection runs as a tracked task (`Conn`).

use std::sync::Arc;

use tokio::sync::Semaphore;
use tracing::{Instrument, debug, info_span};

use super::Inbound;
use super::conn::Conn;
use crate::accept::Acceptor;
use crate::signal::Shutdown;

/// Accepts connections until shutdown starts.
pub(crate) async fn serve(inbound: Arc<Inbound>, mut listener: Acceptor, shutdown: Shutdown) {
    let limit = Arc::new(Semaphore::new(inbound.cfg.max_connections));
    while let Some((tcp, peer, permit)) = listener.accept_within(&limit, &shutdown).await {
        let admission = match inbound.sources.admit(peer.ip()) {
            Ok(a) => a,
            Err(refusal) => {
                // Closed before a TLS byte is read; the slot's permit is released with it.
                inbound
                    .metrics
                    .inbound_connections_refused
                    .with_label_values(&[refusal.reason()])
                    .inc();
                drop((tcp, permit));
                continue;
            }
        };
        // Subscribe before loading the snapshot: a swap in between is then seen as a change.
        let reloads = inbound.state.subscribe();
        let snapshot = inbound.state.snapshot();
        let conn = Conn::new(
            inbound.clone(),
            snapshot,
            reloads,
            admission,
            permit,
            shutdown.clone(),
        );
        shutdown
            .tracker()
            .spawn(conn.run(tcp).instrument(info_span!("inbound", %peer)));
    }
    debug!("inbound listener stopped accepting");
}
