//! The validated configuration: the types the rest of the sidecar reads (socket addresses,
//! durations, absolute paths, a parsed outbound [`Target`]).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::balance::BalanceConfig;
use crate::balance::discover::DiscoverConfig;
use gatehouse_policy::SpiffeId;
use serde::Deserialize;

use super::defaults::*;

/// Minimum TLS version a sidecar accepts and offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MinTls {
    /// TLS 1.3 only (default).
    Tls13,
    /// TLS 1.2 and 1.3 (by configuration only).
    Tls12,
}

impl fmt::Display for MinTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tls13 => "1.3",
            Self::Tls12 => "1.2",
        })
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The configuration file (absolute).
    pub(crate) path: PathBuf,
    /// The sidecar's own identity files.
    pub(crate) identity: IdentityConfig,
    /// Minimum TLS version, both directions.
    pub(crate) min_tls: MinTls,
    /// The inbound (mTLS → app) side, if configured.
    pub(crate) inbound: Option<InboundConfig>,
    /// Outbound (app → mTLS peer) listeners.
    pub(crate) outbound: Vec<OutboundConfig>,
    /// `[[tcp_inbound]]` and `[[tcp_outbound]]` (issue 17: `crate::tcp::config`).
    pub(crate) tcp: crate::tcp::config::TcpConfig,
    /// Admin listener.
    pub(crate) admin: AdminConfig,
    /// Audit log destination.
    pub(crate) audit: AuditConfig,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    pub(crate) shutdown_grace_period: Duration,
    /// Hot reload of certificate, key, bundle, CRL and policy.
    pub(crate) reload: ReloadConfig,
    /// The async runtime's threads.
    pub(crate) runtime: RuntimeConfig,
}

impl Config {
    /// Whether the identity is enrolled online (`[identity] ca = …`) rather than read from
    /// files.
    pub fn is_online(&self) -> bool {
        self.identity.online.is_some()
    }

    /// Every listen address: inbound, outbound and admin, with a label.
    pub fn listeners(&self) -> Vec<(String, SocketAddr)> {
        let mut out = Vec::new();
        if let Some(i) = &self.inbound {
            out.push(("inbound".to_owned(), i.listen));
        }
        for o in &self.outbound {
            out.push((format!("outbound:{}", o.name), o.listen));
        }
        out.extend(self.tcp.listeners()); // issue 17
        out.push(("admin".to_owned(), self.admin.listen));
        out
    }
}

/// `[runtime]`: the sidecar's event loops.
#[derive(Debug, Clone)]
pub(crate) struct RuntimeConfig {
    /// Event loops (threads) serving connections. Each is a single-threaded runtime with its
    /// own app and outbound connection pools, accepting from the same listening sockets, so a
    /// connection stays on one thread for its life (no work stealing, no cross-thread
    /// wake-ups per request), like nginx's `worker_processes`. More than one raises the
    /// throughput ceiling when the sidecar has cores to spare, at some CPU per request.
    pub(crate) worker_threads: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            worker_threads: DEFAULT_WORKER_THREADS,
        }
    }
}

/// `[inbound] app_protocol`: how the inbound side speaks to the app (issue 17).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum AppProtocol {
    /// HTTP/1.1 on a keep-alive pool (the default).
    #[default]
    Http1,
    /// HTTP/2 cleartext with prior knowledge, every request multiplexed on one connection
    /// (gRPC: `te: trailers` and trailers pass).
    H2c,
}

/// `[[outbound]] protocol`: what the sidecar offers its peer in ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum UpstreamProtocol {
    /// HTTP/1.1 only: a keep-alive pool, one request per connection at a time (about 25 %
    /// less CPU per request than h2 at concurrency 1 on the benchmark machine, about 20 % more
    /// at concurrency 32).
    Http1,
    /// HTTP/2 only: every request multiplexed on one shared connection.
    H2,
    /// Offer `h2` then `http/1.1` and use what the peer picks, plus one HTTP/1.1 connection
    /// per endpoint for requests sent one at a time (the lane: `crate::outbound::pool`; the
    /// default).
    #[default]
    Auto,
}

impl UpstreamProtocol {
    /// The ALPN protocol names offered, most preferred first.
    pub(crate) fn alpn(self) -> &'static [&'static [u8]] {
        match self {
            Self::Http1 => &[b"http/1.1"],
            Self::H2 => &[b"h2"],
            Self::Auto => &[b"h2", b"http/1.1"],
        }
    }
}

/// `[reload]`: how the sidecar notices changed files (see `crate::reload`).
#[derive(Debug, Clone)]
pub(crate) struct ReloadConfig {
    /// Watch the directories of the watched files with inotify (notify).
    pub(crate) watch: bool,
    /// Quiet time after a file event before reloading.
    pub(crate) debounce: Duration,
    /// Polling fallback: compare the files' contents this often.
    pub(crate) poll_interval: Duration,
    /// DANGEROUS: accept a reloaded certificate with a different SPIFFE ID than the running
    /// one. Off by default: a changed identity on disk is refused and the old one kept.
    pub(crate) allow_identity_change: bool,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        Self {
            watch: true,
            debounce: DEFAULT_RELOAD_DEBOUNCE,
            poll_interval: DEFAULT_RELOAD_POLL,
            allow_identity_change: false,
        }
    }
}

/// Default `[identity] crl_stale` (kept beside its type, so `defaults` needs nothing from here): refuse the peers a stale CRL vouches for, as OpenSSL (and so
/// nginx, HAProxy and Envoy) does with an expired CRL. A CRL past its next-update says nothing
/// about what was revoked since; accepting it forever would let a stopped CRL job (or an
/// attacker who keeps the new CRL from arriving) switch revocation off without anyone seeing.
pub(crate) const DEFAULT_CRL_STALE: CrlStale = CrlStale::Refuse;

/// `[identity] crl_stale`: what a CRL stale beyond `crl_grace` does (each also logs a warning and
/// shows in `gatehouse_crl_next_update_timestamp_seconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrlStale {
    /// Log a warning only; peers are still accepted on the stale CRL.
    Warn,
    /// Also fail `/readyz`, so orchestrators and load balancers take the sidecar out.
    Unready,
    /// Also refuse handshakes from peers whose issuer's CRL is stale (and fail `/readyz`).
    Refuse,
}

impl CrlStale {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Warn => "warn",
            Self::Unready => "unready",
            Self::Refuse => "refuse",
        }
    }
}

/// `[identity] crl_stale` and `crl_grace`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrlPolicy {
    /// The action.
    pub(crate) stale: CrlStale,
    /// How long after next-update the action starts.
    pub(crate) grace: Duration,
}

impl Default for CrlPolicy {
    fn default() -> Self {
        Self {
            stale: DEFAULT_CRL_STALE,
            grace: DEFAULT_CRL_GRACE,
        }
    }
}

/// `[identity]`: paths resolved against the config file's directory.
#[derive(Debug, Clone)]
pub(crate) struct IdentityConfig {
    /// Leaf + intermediates, PEM.
    pub(crate) cert: PathBuf,
    /// PKCS#8 private key, PEM.
    pub(crate) key: PathBuf,
    /// Trust anchors, PEM.
    pub(crate) bundle: PathBuf,
    /// Certificate revocation list(s), PEM, optional.
    pub(crate) crl: Option<PathBuf>,
    /// What a CRL past its next-update (beyond the grace period) does: `crl_stale`, `crl_grace`.
    pub(crate) crl_policy: CrlPolicy,
    /// `ca = …`: enroll and renew online; then `cert`, `key` and `bundle` are not files but
    /// names for the in-memory SVID in messages, and `crl` is `None` (the CRLs come from the
    /// CA).
    pub(crate) online: Option<crate::identity::OnlineIdentity>,
}

/// `[inbound]`.
#[derive(Debug, Clone)]
pub(crate) struct InboundConfig {
    /// mTLS listen address.
    pub(crate) listen: SocketAddr,
    /// Where allowed requests go (plaintext HTTP/1.1).
    pub(crate) app: SocketAddr,
    /// The policy file.
    pub(crate) policy: PathBuf,
    /// The app address is not loopback and the operator said that is fine.
    pub(crate) insecure_app_address: bool,
    /// TLS handshake timeout.
    pub(crate) handshake_timeout: Duration,
    /// Time a client has to send a complete HTTP/1.1 request head (slow clients are dropped).
    /// hyper also runs this timer while a keep-alive HTTP/1.1 connection waits for its next
    /// request, so it bounds HTTP/1.1 idle time too.
    pub(crate) header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/2 with GOAWAY).
    pub(crate) idle_timeout: Duration,
    /// Time the app has to start its response before the caller gets 504.
    pub(crate) app_timeout: Duration,
    /// Largest request head accepted (431 beyond).
    pub(crate) max_header_bytes: usize,
    /// Concurrent inbound connections.
    pub(crate) max_connections: usize,
    /// Open connections from one source IP address (handshaking or authenticated).
    pub(crate) max_connections_per_source: usize,
    /// Handshakes in progress from one source IP address.
    pub(crate) max_handshakes_per_source: usize,
    /// Handshakes in progress over all sources, at most half of `max_connections`.
    pub(crate) max_pending_handshakes: usize,
    /// After a peer sent a certificate chain over the bounds, its source's handshakes wait this
    /// long to start, until that long after the refusal.
    pub(crate) failed_handshake_delay: Duration,
    /// Concurrent HTTP/2 streams per connection.
    pub(crate) max_h2_streams: u32,
    /// Client resets of streams still being served that an HTTP/2 connection may send within
    /// `h2_reset_window`; one more gets `GOAWAY(ENHANCE_YOUR_CALM)` and the connection closes.
    pub(crate) max_h2_resets: u32,
    /// The window over which `max_h2_resets` is counted.
    pub(crate) h2_reset_window: Duration,
    /// A response that makes no progress for this long is aborted and its app connection
    /// closed: an HTTP/2 stream left without flow-control window is reset, a connection whose
    /// socket accepts no byte (HTTP/1.1 or HTTP/2) is dropped.
    pub(crate) send_timeout: Duration,
    /// Idle keep-alive connections kept to the app.
    pub(crate) app_pool_max_idle: usize,
    /// How long an idle keep-alive connection to the app is kept.
    pub(crate) app_pool_idle_timeout: Duration,
    /// Accept `;` in path segments (off by default: see `gatehouse_policy::path`).
    pub(crate) allow_matrix_params: bool,
    /// How the app is spoken to: HTTP/1.1 (default) or h2c (issue 17).
    pub(crate) app_protocol: AppProtocol,
    /// A WebSocket tunnel that moves no byte either way for this long is closed (issue 17).
    pub(crate) websocket_idle_timeout: Duration,
    /// A WebSocket tunnel is closed this long after its upgrade, busy or not (issue 17).
    pub(crate) websocket_max_duration: Duration,
}

/// One `[[outbound]]` entry.
#[derive(Debug, Clone)]
pub(crate) struct OutboundConfig {
    /// Name, used in logs and metric labels.
    pub(crate) name: String,
    /// Plaintext listen address for the local app.
    pub(crate) listen: SocketAddr,
    /// The peer sidecar (`connect`), parsed once by the validator, resolved at connect time.
    pub(crate) target: Target,
    /// The SPIFFE ID the peer must present.
    pub(crate) server_id: SpiffeId,
    /// SNI to send; `None` means the host of `connect`.
    pub(crate) sni: Option<String>,
    /// `listen` is not loopback and the operator said that is fine (dangerous).
    pub(crate) allow_non_loopback_listen: bool,
    /// The pool's timeouts and bounds (`connect_timeout`, `request_timeout`, `pool_*`,
    /// `max_connection_age`).
    pub(crate) limits: OutboundLimits,
    /// What to offer the peer in ALPN (`protocol`, default `auto`).
    pub(crate) protocol: UpstreamProtocol,
}

/// Where an upstream lives: the host and port of `connect`, kept unresolved. Only the validator
/// builds one from text, and it refuses what would not render as an HTTP authority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    host: String,
    port: u16,
}

impl Target {
    /// A target from a validated host (DNS name or IP, without brackets) and port.
    pub(crate) fn new(host: &str, port: u16) -> Self {
        Self {
            host: host.to_owned(),
            port,
        }
    }

    /// `host:port` as written, IPv6 in brackets, if it is one an HTTP authority accepts.
    pub(super) fn parse(s: &str) -> Option<Self> {
        let (host, port) = s.rsplit_once(':')?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
        let target = Self::new(host, port);
        // The outbound pool renders host and port as an HTTP authority and relies on it
        // parsing ([`Target::authority`]), so refuse here what would not: `mono#lith:8443`.
        let ok =
            !host.is_empty() && !host.contains(['/', ' ', '@']) && target.try_authority().is_some();
        ok.then_some(target)
    }

    /// The host without brackets: a DNS name or an IP address.
    pub(crate) fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// `host:port` (IPv6 in brackets) as an HTTP authority: the `Host` header and `:authority`.
    ///
    /// # Panics
    /// Never for a target the validator built; [`Target::new`] callers pass a validated host.
    pub(crate) fn authority(&self) -> http::uri::Authority {
        // Invariant: the validator refused every host that does not render as an authority.
        self.try_authority()
            .expect("a validated host and port form an authority")
    }

    fn try_authority(&self) -> Option<http::uri::Authority> {
        let text = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        text.parse().ok()
    }
}

/// Connection limits and timeouts of one upstream pool, from its `[[outbound]]` entry. The
/// default is the documented configuration default of every key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OutboundLimits {
    /// DNS + TCP + TLS + HTTP handshake, per attempt (`connect_timeout`).
    pub(crate) connect_timeout: Duration,
    /// From the request being sent to the response head arriving (`request_timeout`, 504 after).
    pub(crate) response_timeout: Duration,
    /// An unused connection is closed after this long (`pool_idle_timeout`).
    pub(crate) idle_timeout: Duration,
    /// No request starts on a connection older than this (`max_connection_age`): rotated
    /// certificates take effect.
    pub(crate) max_connection_age: Duration,
    /// Open connections to the upstream, busy or idle (`pool_max_connections`; requests wait
    /// beyond it).
    pub(crate) max_connections: usize,
    /// Idle HTTP/1.1 connections kept for reuse (`pool_max_idle`).
    pub(crate) max_idle: usize,
    /// How long a request waits for a connection when `max_connections` are busy.
    pub(crate) pool_wait_timeout: Duration,
    /// The HTTP/1.1 lane's idle time ([`LANE_IDLE`]; tests shorten it).
    pub(crate) lane_idle: Duration,
    /// The balancer over the upstream's endpoints (`slow_start`; the rest built in).
    pub(crate) balance: BalanceConfig,
    /// Endpoint discovery (`resolver`, `dns_min_ttl`, `dns_max_ttl`).
    pub(crate) discover: DiscoverConfig,
    /// `retry_idempotent`: a bodiless GET/HEAD/OPTIONS answered 503 is retried once on another
    /// endpoint, within the retry budget; off by default.
    pub(crate) retry_idempotent: bool,
}

impl Default for OutboundLimits {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_REQUEST_TIMEOUT,
            idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
            max_connection_age: DEFAULT_MAX_CONNECTION_AGE,
            max_connections: DEFAULT_POOL_MAX_CONNECTIONS,
            max_idle: DEFAULT_POOL_MAX_IDLE,
            pool_wait_timeout: POOL_WAIT_TIMEOUT,
            lane_idle: LANE_IDLE,
            balance: BalanceConfig::default(),
            discover: DiscoverConfig::default(),
            retry_idempotent: false,
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub(crate) struct AdminConfig {
    /// Listen address of /metrics, /healthz, /readyz, /status.
    pub(crate) listen: SocketAddr,
}

/// `[audit]`.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Whether decisions are audited at all (default true; off is logged as a warning).
    pub(crate) enabled: bool,
    /// Append audit lines to this file; `None` = stdout.
    pub(crate) path: Option<PathBuf>,
    /// Longest time a line is buffered before it is written; zero = every line at once.
    pub(crate) flush_interval: Duration,
}

impl AuditConfig {
    /// One line for `sidecar check` and the startup log: destination and flushing, or that
    /// decisions are not recorded.
    pub fn summary(&self) -> String {
        if !self.enabled {
            return "OFF ([audit] enabled = false): access decisions are not recorded".into();
        }
        let to = self
            .path
            .as_ref()
            .map_or_else(|| "stdout".to_owned(), |p| p.display().to_string());
        if self.flush_interval.is_zero() {
            format!("{to}, every line written at once (flush_interval = 0)")
        } else {
            format!(
                "{to}, buffered: written every {} or 128 KiB, and on shutdown",
                humantime::format_duration(self.flush_interval)
            )
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: None,
            flush_interval: DEFAULT_AUDIT_FLUSH_INTERVAL,
        }
    }
}
