//! One connection from the app (mini-redis's `Handler`): a `Conn` serves it with hyper,
//! HTTP/1.1 or h2c with prior knowledge, each request through `handle` (an upgrade through
//! `websocket::upgrade`), under the same header-read timeout default as the inbound side
//! ([`crate::config::DEFAULT_HEADER_READ_TIMEOUT`], also for the first bytes, which hyper-util
//! reads to tell the protocol with no timeout of its own), and drains it gracefully on shutdown
//! (HTTP/1.1 closes after the in-flight request, HTTP/2 sends GOAWAY).

use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tracing::debug;

use super::request::{Ctx, handle};
use super::websocket;
use crate::config::DEFAULT_HEADER_READ_TIMEOUT;
use crate::signal::Shutdown;

/// One accepted app connection and what it holds until it ends.
pub(super) struct Conn {
    ctx: Arc<Ctx>,
    shutdown: Shutdown,
    /// The connection's slot under the listener's limit.
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    /// A connection just accepted, holding its slot.
    pub(super) fn new(ctx: Arc<Ctx>, permit: OwnedSemaphorePermit, shutdown: Shutdown) -> Self {
        Self {
            ctx,
            shutdown,
            _permit: permit,
        }
    }

    /// Serves the connection on `tcp` to its end.
    pub(super) async fn run(self, tcp: TcpStream) {
        let Self {
            ctx,
            shutdown,
            _permit,
        } = self;
        let _ = tcp.set_nodelay(true);
        // hyper-util tells HTTP/1.1 from h2c by the first bytes and waits for them with no
        // timeout: a connection that sends nothing would hold its slot for good.
        let mut byte = [0u8; 1];
        let first = tokio::select! {
            r = tokio::time::timeout(DEFAULT_HEADER_READ_TIMEOUT, tcp.peek(&mut byte)) => r,
            () = shutdown.token().cancelled() => return,
        };
        if !matches!(first, Ok(Ok(1..))) {
            debug!("outbound app connection closed: nothing sent within the header-read timeout");
            return;
        }
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(DEFAULT_HEADER_READ_TIMEOUT);
        // A WebSocket upgrade is tunnelled (issue 17), every other request handled: the
        // dispatch the inbound side makes for an extended CONNECT.
        let service = hyper::service::service_fn(move |req| {
            let ctx = Arc::clone(&ctx);
            async move {
                if websocket::is_upgrade(&req) {
                    return Ok(Box::pin(websocket::upgrade(ctx, req)).await);
                }
                handle(ctx, req).await
            }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
        tokio::pin!(conn);
        let result = tokio::select! {
            res = conn.as_mut() => res,
            () = shutdown.token().cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.as_mut().await
            }
        };
        if let Err(e) = result {
            debug!(error = %e, "outbound app connection ended with an error");
        }
    }
}
