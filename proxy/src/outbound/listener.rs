//! The plaintext side of an outbound entry (mini-redis's `Listener`): the local app connects
//! here (HTTP/1.1, or h2c with prior knowledge); the shared accept limiter
//! ([`crate::accept::Acceptor::accept_within`]) bounds open connections, and each runs as a
//! tracked task (`Conn`) whose requests go to `super::request`.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use tokio::sync::Semaphore;
use tracing::{Instrument, info_span};

use super::conn::Conn;
use super::request::Ctx;
use super::upstream::Upstream;
use crate::accept::Acceptor;
use crate::config::DEFAULT_MAX_CONNECTIONS;
use crate::http::headers::RequestIds;
use crate::signal::Shutdown;

/// One bound outbound listener and the upstream it forwards to.
#[derive(Debug)]
pub(crate) struct OutboundListener {
    listener: Acceptor,
    upstream: Arc<Upstream>,
    server_id: String,
    ids: RequestIds,
}

impl OutboundListener {
    /// Wraps a bound listener.
    pub(crate) fn new(
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

    /// Accepts until shutdown starts, at most [`DEFAULT_MAX_CONNECTIONS`] app connections open
    /// at once (the inbound side's default limit); each connection runs as a tracked task and
    /// drains gracefully.
    pub(crate) async fn serve(mut self, shutdown: Shutdown) {
        let ctx = Arc::new(Ctx {
            upstream: self.upstream,
            server_id: self.server_id,
            ids: self.ids,
            tracker: shutdown.tracker().clone(),
        });
        let limit = Arc::new(Semaphore::new(DEFAULT_MAX_CONNECTIONS));
        while let Some((tcp, peer, permit)) = self.listener.accept_within(&limit, &shutdown).await {
            let span = info_span!("outbound", upstream = %ctx.upstream.name(), %peer);
            let conn = Conn::new(Arc::clone(&ctx), permit, shutdown.clone());
            shutdown.tracker().spawn(conn.run(tcp).instrument(span));
        }
    }
}
