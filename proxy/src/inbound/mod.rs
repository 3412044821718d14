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
//! - [`upstream`]: the hop to the app, on the shared HTTP/1.1 keep-alive pool, or
//!   [`app_h2`]: one multiplexed h2c connection (`app_protocol = "h2c"`, gRPC);
//! - `websocket`: an RFC 8441 extended CONNECT (a WebSocket tunnel from a peer's outbound
//!   side) decided as a `GET`, then an HTTP/1.1 upgrade to the app, spliced (issue 17);
//! - [`sources`]: per-source admission before the handshake.

pub(crate) mod app_h2;
mod conn;
pub(crate) mod listener;
pub(crate) mod request;
pub(crate) use gatehouse_ca::admission as sources;
pub(crate) mod upstream;
mod websocket;

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
    /// The h2c connection to the app when `app_protocol = "h2c"` (issue 17); `app` is then
    /// unused.
    app_h2: Option<Arc<app_h2::AppH2>>,
    /// `Host` for requests that came without one (the app's address).
    app_host: HeaderValue,
    /// The same as an h2c `:authority` (issue 17).
    app_authority: http::uri::Authority,
    request_ids: RequestIds,
    /// Per-source admission, shared by every event loop.
    pub sources: Arc<sources::Sources>,
    /// `gatehouse_websocket_*{side="inbound"}` (issue 17).
    websocket: crate::http::tunnel::SideMetrics,
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
        let app_h2 = (cfg.app_protocol == crate::config::AppProtocol::H2c)
            .then(|| Arc::new(app_h2::AppH2::new(cfg.app)));
        let app_host = HeaderValue::try_from(cfg.app.to_string())
            .expect("a SocketAddr always renders as a valid header value");
        let app_authority = http::uri::Authority::try_from(cfg.app.to_string())
            .expect("a SocketAddr always renders as a valid authority");
        let request_ids = RequestIds::new(&state.provider);
        let websocket = metrics.websocket.side("inbound");
        Self {
            websocket,
            state,
            metrics,
            cfg,
            app,
            app_h2,
            app_host,
            app_authority,
            request_ids,
            sources,
        }
    }
}
