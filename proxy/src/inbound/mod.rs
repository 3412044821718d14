//! The inbound side: terminate mTLS from callers, enforce the policy per route, forward allowed
//! requests to the app.
//! - [`listener`]: the accept loop, the handshake under a timeout, the per-connection HTTP
//!   server, idle timeout and graceful drain;
//! - [`request`]: per request, normalize → decide → audit + metrics → deny, or rewrite the
//!   identity headers and forward on a pooled keep-alive HTTP/1.1 connection;
//! - [`app`]: the pool of keep-alive connections to the app.

pub mod app;
pub mod listener;
pub mod request;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderValue;

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
    app: Arc<app::AppPool>,
    /// `Host` for requests that came without one (the app's address).
    app_host: HeaderValue,
    request_ids: RequestIds,
}

impl Inbound {
    /// Builds the inbound side for `cfg`. Nothing is opened or spawned here: the app
    /// connection pool connects, and starts its sweep task, on the runtime of the first
    /// request that needs it (one `Inbound` per event loop).
    pub fn new(state: Arc<State>, metrics: Metrics, cfg: InboundConfig) -> Self {
        let app = Arc::new(app::AppPool::new(
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
