//! The inbound side: terminate mTLS from callers, enforce the policy per route, forward allowed
//! requests to the app.
//!
//! The same shape as [`crate::outbound`], one request top-down:
//! - [`listener`]: the accept loop (the shared limiter, per-source admission);
//! - `conn`: one connection (`Conn`): the handshake under a timeout, the peer's identity and
//!   its re-check after reloads, HTTP/1.1 (hyper) or HTTP/2 ([`crate::http::h2_server`]),
//!   idle and send timeouts, graceful drain;
//! - [`request`]: per request of either protocol, normalize → decide → audit + metrics →
//!   deny, or rewrite the identity headers and forward;
//! - [`upstream`]: the hop to the app, on the shared HTTP/1.1 keep-alive pool;
//! - [`sources`]: per-source admission before the handshake.

mod conn;
pub(crate) mod listener;
pub(crate) mod request;
pub(crate) mod sources;
pub(crate) mod upstream;

use std::sync::Arc;

use http::HeaderValue;

use crate::config::InboundConfig;
use crate::http::headers::RequestIds;
use crate::metrics::Metrics;
use crate::state::State;

/// Shared by every inbound connection.
#[derive(Debug)]
pub(crate) struct Inbound {
    /// Snapshots (policy, TLS) and the configuration.
    pub state: Arc<State>,
    /// Metrics.
    pub metrics: Metrics,
    /// `[inbound]`.
    pub cfg: InboundConfig,
    app: Arc<upstream::AppPool>,
    /// `Host` for requests that came without one (the app's address).
    app_host: HeaderValue,
    request_ids: RequestIds,
    /// Per-source admission, shared by every event loop.
    pub sources: Arc<sources::Sources>,
}

impl Inbound {
    /// Builds the inbound side for `cfg`. Nothing is opened or spawned here: the app
    /// connection pool connects, and starts its sweep task, on the runtime of the first
    /// request that needs it (one `Inbound` per event loop).
    pub(crate) fn new(
        state: Arc<State>,
        metrics: Metrics,
        cfg: InboundConfig,
        sources: Arc<sources::Sources>,
    ) -> Self {
        let app = Arc::new(upstream::AppPool::new(
            cfg.app,
            cfg.app_pool_max_idle,
            cfg.app_pool_idle_timeout,
        ));
        let app_host = HeaderValue::try_from(cfg.app.to_string())
            .expect("a SocketAddr always renders as a valid header value");
        let request_ids = RequestIds::new(&state.provider);
        Self {
            state,
            metrics,
            cfg,
            app,
            app_host,
            request_ids,
            sources,
        }
    }
}
