//! Stage one: the TOML as written. `deny_unknown_fields` everywhere, every value that the
//! validator may refuse kept [`Spanned`] so its error can name the line and column.

use serde::Deserialize;
use toml::Spanned;

use super::model::{AppProtocol, UpstreamProtocol};

pub(super) type S<T> = Spanned<T>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) min_tls: Option<S<String>>,
    pub(super) shutdown_grace_period: Option<S<String>>,
    pub(super) identity: S<RawIdentity>,
    pub(super) tls: Option<RawTls>,
    pub(super) inbound: Option<RawInbound>,
    #[serde(default)]
    pub(super) outbound: Vec<RawOutbound>,
    #[serde(default)] // issue 17
    pub(super) tcp_inbound: Vec<crate::tcp::config::RawTcpInbound>,
    #[serde(default)] // issue 17
    pub(super) tcp_outbound: Vec<crate::tcp::config::RawTcpOutbound>,
    pub(super) admin: RawAdmin,
    pub(super) audit: Option<RawAudit>,
    pub(super) reload: Option<RawReload>,
    pub(super) runtime: Option<RawRuntime>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRuntime {
    pub(super) worker_threads: Option<S<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReload {
    pub(super) watch: Option<bool>,
    pub(super) debounce: Option<S<String>>,
    pub(super) poll_interval: Option<S<String>>,
    #[serde(default)]
    pub(super) allow_identity_change: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) min_tls: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdentity {
    // Files (`cert`, `key`, `bundle`, optional `crl`) or online (`ca` with the keys below).
    pub(super) cert: Option<S<String>>,
    pub(super) key: Option<S<String>>,
    pub(super) bundle: Option<S<String>>,
    pub(super) crl: Option<S<String>>,
    pub(super) crl_stale: Option<S<String>>,
    pub(super) crl_grace: Option<S<String>>,
    pub(super) ca: Option<S<crate::identity::config::CaUrls>>,
    pub(super) spiffe_id: Option<S<String>>,
    pub(super) ca_bundle: Option<S<String>>,
    pub(super) join_token_file: Option<S<String>>,
    pub(super) enrollment_cert: Option<S<String>>,
    pub(super) enrollment_key: Option<S<String>>,
    pub(super) k8s_token_file: Option<S<String>>,
    pub(super) ca_poll: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInbound {
    pub(super) listen: S<String>,
    pub(super) app: S<String>,
    pub(super) policy: S<String>,
    #[serde(default)]
    pub(super) insecure_app_address: bool,
    pub(super) handshake_timeout: Option<S<String>>,
    pub(super) header_read_timeout: Option<S<String>>,
    pub(super) idle_timeout: Option<S<String>>,
    pub(super) app_timeout: Option<S<String>>,
    pub(super) max_header_bytes: Option<S<u64>>,
    pub(super) max_connections: Option<S<u64>>,
    pub(super) max_connections_per_source: Option<S<u64>>,
    pub(super) max_handshakes_per_source: Option<S<u64>>,
    pub(super) max_pending_handshakes: Option<S<u64>>,
    pub(super) failed_handshake_delay: Option<S<String>>,
    pub(super) max_h2_streams: Option<S<u32>>,
    pub(super) max_h2_resets: Option<S<u64>>,
    pub(super) h2_reset_window: Option<S<String>>,
    pub(super) send_timeout: Option<S<String>>,
    pub(super) app_pool_max_idle: Option<S<u64>>,
    pub(super) app_pool_idle_timeout: Option<S<String>>,
    #[serde(default)]
    pub(super) allow_matrix_params: bool,
    pub(super) app_protocol: Option<AppProtocol>, // issue 17
    pub(super) websocket_idle_timeout: Option<S<String>>, // issue 17
    pub(super) websocket_max_duration: Option<S<String>>, // issue 17
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutbound {
    pub(super) name: S<String>,
    pub(super) listen: S<String>,
    pub(super) connect: S<String>,
    pub(super) server_id: S<String>,
    pub(super) sni: Option<S<String>>,
    #[serde(default)]
    pub(super) allow_non_loopback_listen: bool,
    pub(super) connect_timeout: Option<S<String>>,
    pub(super) request_timeout: Option<S<String>>,
    pub(super) pool_idle_timeout: Option<S<String>>,
    pub(super) pool_max_idle: Option<S<u64>>,
    pub(super) pool_max_connections: Option<S<u64>>,
    pub(super) max_connection_age: Option<S<String>>,
    pub(super) protocol: Option<UpstreamProtocol>,
    pub(super) resolver: Option<S<String>>,
    pub(super) dns_min_ttl: Option<S<String>>,
    pub(super) dns_max_ttl: Option<S<String>>,
    pub(super) slow_start: Option<S<String>>,
    #[serde(default)]
    pub(super) retry_idempotent: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    pub(super) enabled: Option<bool>,
    pub(super) path: Option<S<String>>,
    pub(super) flush_interval: Option<S<String>>,
}

// ---- stage two: validation --------------------------------------------------------------------
