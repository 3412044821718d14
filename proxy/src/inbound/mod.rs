//! The inbound side: terminate mTLS from callers, enforce the policy per route, forward allowed
//! requests to the app.
//! - [`listener`]: the accept loop, the handshake under a timeout, the per-connection HTTP
//!   server, idle timeout and graceful drain;
//! - [`request`]: per request, normalize → decide → audit + metrics → deny, or rewrite the
//!   identity headers and forward on a pooled keep-alive HTTP/1.1 client.

pub mod listener;
pub mod request;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderValue;
use http::uri::Authority;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::InboundConfig;
use crate::metrics::Metrics;
use crate::state::State;

/// Shared by every inbound connection.
#[derive(Debug)]
pub struct Inbound {
    /// Snapshots (policy, TLS) and the configuration.
    pub state: Arc<State>,
    /// Metrics.
    pub metrics: Metrics,
    /// `[inbound]`.
    pub cfg: InboundConfig,
    client: Client<HttpConnector, Incoming>,
    app_authority: Authority,
    request_ids: RequestIds,
}

impl Inbound {
    /// Builds the inbound side for `cfg` (the app client pool is created here; no socket is
    /// opened until the first request).
    pub fn new(state: Arc<State>, metrics: Metrics, cfg: InboundConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(cfg.app_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(cfg.app_pool_idle_timeout)
            .pool_max_idle_per_host(cfg.app_pool_max_idle)
            .build(connector);
        let app_authority: Authority = cfg
            .app
            .to_string()
            .parse()
            .expect("a SocketAddr always renders as a valid authority");
        let request_ids = RequestIds::new(&state.provider);
        Self {
            state,
            metrics,
            cfg,
            client,
            app_authority,
            request_ids,
        }
    }
}

/// Request ids: a random per-process prefix and a counter, 32 hex digits, unique without a
/// random draw per request.
#[derive(Debug)]
struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl RequestIds {
    fn new(provider: &rustls::crypto::CryptoProvider) -> Self {
        let mut seed = [0u8; 16];
        // The OS RNG does not fail on Linux; an all-zero seed would only make ids predictable.
        let _ = provider.secure_random.fill(&mut seed);
        let (a, b) = seed.split_at(8);
        Self {
            prefix: u64::from_le_bytes(a.try_into().unwrap_or_default()),
            counter: AtomicU64::new(u64::from_le_bytes(b.try_into().unwrap_or_default())),
        }
    }

    fn next(&self) -> HeaderValue {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 32];
        for (i, v) in [self.prefix, n].into_iter().enumerate() {
            for j in 0..16 {
                buf[i * 16 + j] = HEX[((v >> (60 - 4 * j)) & 0xf) as usize];
            }
        }
        HeaderValue::from_bytes(&buf).expect("hex digits are valid header bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::RequestIds;

    #[test]
    fn request_ids_are_32_hex_digits_and_unique() {
        let ids = RequestIds::new(&rustls::crypto::aws_lc_rs::default_provider());
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        for id in [a, b] {
            let s = id.to_str().expect("ascii");
            assert_eq!(s.len(), 32);
            assert!(s.bytes().all(|c| c.is_ascii_hexdigit()), "{s}");
        }
    }
}
