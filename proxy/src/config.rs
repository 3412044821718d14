//! The sidecar configuration file: raw serde types mirroring the TOML as written
//! (`deny_unknown_fields`, spans kept) → a validation pass collecting *every* problem with its
//! `file:line:col` → the [`Config`] runtime code uses (socket addresses, durations, absolute paths).
//!
//! Format (every key: docs/CONFIG.md, checked by tests/tests/docs_reference.rs):
//! ```toml
//! min_tls = "1.3"                     # or under [tls]; "1.2" only when configured
//! [identity]  cert, key, bundle, crl  # paths relative to this file
//!             crl_stale (refuse|unready|warn, default refuse), crl_grace (default 1h)
//! [inbound]   listen, app, policy, limits and timeouts with safe defaults, among them
//!             send_timeout (30s: a response making no progress is aborted, its app connection
//!             closed), max_h2_resets (200) per h2_reset_window (10s: client RST_STREAMs before
//!             GOAWAY(ENHANCE_YOUR_CALM))
//! [[outbound]] name, listen, connect, server_id, sni, allow_non_loopback_listen
//! [admin]     listen
//! [audit]     enabled (default true), path (default stdout), flush_interval (default 100ms, 0 = every line)
//! [reload]    watch, debounce, poll_interval, allow_identity_change (DANGEROUS)
//! [runtime]   worker_threads          # event loops, default 1 (see RuntimeConfig)
//! ```
//! Knobs that weaken security say so in their name (`insecure_app_address`,
//! `allow_non_loopback_listen`, `allow_identity_change`) and are logged as warnings at startup.
//! Reading certificates and the policy is not done here: see `state.rs`.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gatehouse_policy::SpiffeId;
use serde::Deserialize;
use toml::Spanned;

/// Default TLS handshake timeout.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a client has to send a complete HTTP/1.1 request head.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default idle time after which an inbound connection with no request in flight is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time the app has to start its response (504 after).
pub const DEFAULT_APP_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `inbound.max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default `inbound.max_connections_per_source`: open connections from one IP address.
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 1024;
/// Default `inbound.max_handshakes_per_source`: handshakes in progress from one IP address.
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: usize = 64;
/// Default `inbound.max_pending_handshakes`: handshakes in progress over all sources (capped
/// at half of `max_connections`, so unauthenticated connections never hold every slot).
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 1024;
/// Default `inbound.failed_handshake_delay`: how long a source that sent a certificate chain
/// over the bounds waits before each of its next handshakes.
pub const DEFAULT_FAILED_HANDSHAKE_DELAY: Duration = Duration::from_secs(1);
/// Default grace period for in-flight requests on shutdown.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default time a response may make no progress (the client reads nothing, or an HTTP/2
/// stream gets no flow-control window) before it is aborted and its app connection closed
/// (nginx's `send_timeout`, which defaults to 60 s: half, as the app connection is pinned).
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Default number of client resets (`RST_STREAM` of a stream still being served) one HTTP/2
/// connection may send within [`DEFAULT_H2_RESET_WINDOW`] before it gets
/// `GOAWAY(ENHANCE_YOUR_CALM)` (CVE-2023-44487, rapid reset; Netty allows 200 per 30 s).
pub const DEFAULT_MAX_H2_RESETS: u32 = 200;
/// Default window over which [`DEFAULT_MAX_H2_RESETS`] is counted.
pub const DEFAULT_H2_RESET_WINDOW: Duration = Duration::from_secs(10);

/// One problem found in the configuration file.
#[derive(Debug, thiserror::Error)]
#[error("{}: {kind}", self.location())]
pub struct ConfigError {
    /// The configuration file.
    pub file: PathBuf,
    /// 1-based line and column of the offending value, when known.
    pub position: Option<(usize, usize)>,
    /// What is wrong.
    #[source]
    pub kind: ConfigErrorKind,
}

impl ConfigError {
    /// `file:line:col`, or just `file` when there is no position (the file could not be read).
    pub fn location(&self) -> String {
        match self.position {
            Some((line, col)) => format!("{}:{line}:{col}", self.file.display()),
            None => self.file.display().to_string(),
        }
    }

    /// What to do about it.
    pub fn help(&self) -> String {
        self.kind.help()
    }
}

/// What is wrong with a configuration value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// The file could not be read: missing, not a regular file, too large
    /// ([`crate::input::read`]).
    #[error("{}", .0.problem)]
    Read(crate::input::FileError),
    /// TOML syntax error, unknown key, missing key or wrong type.
    #[error("{0}")]
    Syntax(String),
    /// Not an `IP:PORT` socket address.
    #[error("`{value}` is not an IP:PORT socket address")]
    Address {
        /// The value as written.
        value: String,
    },
    /// Not a `HOST:PORT` pair.
    #[error("`{value}` is not HOST:PORT")]
    HostPort {
        /// The value as written.
        value: String,
    },
    /// Not a duration.
    #[error("`{value}` is not a duration")]
    Duration {
        /// The value as written.
        value: String,
    },
    /// A zero or otherwise unusable number or duration.
    #[error("`{key}` must be greater than zero")]
    Zero {
        /// The key.
        key: &'static str,
    },
    /// Unknown TLS version.
    #[error("`{value}` is not a supported minimum TLS version")]
    MinTls {
        /// The value as written.
        value: String,
    },
    /// Unknown `[identity] crl_stale` action.
    #[error("`{value}` is not a `crl_stale` action")]
    CrlStale {
        /// The value as written.
        value: String,
    },
    /// `min_tls` given both at the top level and under `[tls]`.
    #[error("`min_tls` is set twice (top level and [tls])")]
    MinTlsTwice,
    /// A SPIFFE ID that does not parse.
    #[error("invalid SPIFFE ID `{value}`: {source}")]
    SpiffeId {
        /// The value as written.
        value: String,
        /// The broken rule.
        source: gatehouse_policy::IdError,
    },
    /// The app address is not loopback and `insecure_app_address` is not set.
    #[error("the app address {addr} is not a loopback address")]
    NonLoopbackApp {
        /// The address.
        addr: SocketAddr,
    },
    /// An outbound listener on a non-loopback address without the explicit opt-in.
    #[error("outbound `{name}` listens on {addr}, which is not a loopback address")]
    NonLoopbackOutbound {
        /// The outbound entry.
        name: String,
        /// The address.
        addr: SocketAddr,
    },
    /// Two `[[outbound]]` entries share a name.
    #[error("outbound name `{name}` is used twice")]
    DuplicateOutbound {
        /// The name.
        name: String,
    },
    /// An empty string where a name or path is needed.
    #[error("`{key}` must not be empty")]
    Empty {
        /// The key.
        key: &'static str,
    },
    /// Neither `[inbound]` nor any `[[outbound]]`.
    #[error("nothing to do: the config has neither [inbound] nor [[outbound]]")]
    NoListener,
    /// A listen address used twice.
    #[error("listen address {addr} is used twice")]
    DuplicateListen {
        /// The address.
        addr: SocketAddr,
    },
    /// `[audit] flush_interval` longer than [`MAX_AUDIT_FLUSH_INTERVAL`].
    #[error("`audit.flush_interval` = `{value}` is longer than the maximum of 10s")]
    AuditFlushInterval {
        /// The value as written.
        value: String,
    },
    /// `[runtime] worker_threads` above [`MAX_WORKER_THREADS`].
    #[error("`runtime.worker_threads` = {value} is more than the maximum of {MAX_WORKER_THREADS}")]
    WorkerThreads {
        /// The value as written.
        value: u64,
    },
}

impl ConfigErrorKind {
    /// The `help:` line.
    pub fn help(&self) -> String {
        match self {
            Self::Read(e) => e.help(),
            Self::Syntax(_) => "fix the TOML; every key is documented in docs/CONFIG.md".into(),
            Self::Address { .. } => "write an IP address and port, e.g. \"127.0.0.1:8443\"".into(),
            Self::HostPort { .. } => {
                "write a host name or IP and a port, e.g. \"monolith.internal:8443\"".into()
            }
            Self::Duration { .. } => "write a duration such as \"10s\", \"500ms\" or \"2m\"".into(),
            Self::Zero { .. } => "use a positive value or remove the key for the default".into(),
            Self::MinTls { .. } => "use \"1.3\" (default) or \"1.2\"".into(),
            Self::MinTlsTwice => "keep one of the two".into(),
            Self::CrlStale { .. } => "use \"refuse\" (default), \"unready\" or \"warn\"".into(),
            Self::SpiffeId { .. } => "write spiffe://<trust-domain>/<path>".into(),
            Self::NonLoopbackApp { .. } => "the sidecar forwards plaintext to the app: keep it on \
                 127.0.0.1, or set `insecure_app_address = true` if the network path is trusted"
                .into(),
            Self::NonLoopbackOutbound { .. } => "outbound listeners accept unauthenticated \
                 plaintext: listen on 127.0.0.1, or set `allow_non_loopback_listen = true` \
                 for this entry if only the app can reach the address"
                .into(),
            Self::DuplicateOutbound { .. } => "give each [[outbound]] entry its own name".into(),
            Self::Empty { .. } => "give it a value".into(),
            Self::NoListener => "add an [inbound] section, an [[outbound]] entry or a [[tcp_inbound]]/[[tcp_outbound]] entry".into(), // issue 17
            Self::DuplicateListen { .. } => "give each listener its own port".into(),
            Self::AuditFlushInterval { .. } => "buffered audit lines are lost if the process \
                 is killed: use \"100ms\" (default), at most \"10s\", or \"0\" to write every \
                 line at once"
                .into(),
            Self::WorkerThreads { .. } => "use at most one event loop per core the sidecar may \
                 use (`nproc`); 1 (the default) is the cheapest per request"
                .into(),
        }
    }
}

/// Minimum TLS version a sidecar accepts and offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinTls {
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
    pub path: PathBuf,
    /// The sidecar's own identity files.
    pub identity: IdentityConfig,
    /// Minimum TLS version, both directions.
    pub min_tls: MinTls,
    /// The inbound (mTLS → app) side, if configured.
    pub inbound: Option<InboundConfig>,
    /// Outbound (app → mTLS peer) listeners.
    pub outbound: Vec<OutboundConfig>,
    /// `[[tcp_inbound]]` and `[[tcp_outbound]]` (issue 17: `crate::tcp::config`).
    pub tcp: crate::tcp::config::TcpConfig,
    /// Admin listener.
    pub admin: AdminConfig,
    /// Audit log destination.
    pub audit: AuditConfig,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    pub shutdown_grace_period: Duration,
    /// Hot reload of certificate, key, bundle, CRL and policy.
    pub reload: ReloadConfig,
    /// The async runtime's threads.
    pub runtime: RuntimeConfig,
}

/// Default `[runtime] worker_threads`: one event loop serves every connection. A sidecar shares
/// its machine with the app it fronts; one loop is the cheapest per request (the most work per
/// wake-up and per syscall) and keeps idle RSS under 10 MiB.
pub const DEFAULT_WORKER_THREADS: usize = 1;

/// Largest `[runtime] worker_threads` accepted: each loop is a thread with its own pools, and
/// more loops than cores only add CPU per request.
pub const MAX_WORKER_THREADS: usize = 256;

/// `[runtime]`: the sidecar's event loops.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Event loops (threads) serving connections. Each is a single-threaded runtime with its
    /// own app and outbound connection pools, accepting from the same listening sockets, so a
    /// connection stays on one thread for its life (no work stealing, no cross-thread
    /// wake-ups per request), like nginx's `worker_processes`. More than one raises the
    /// throughput ceiling when the sidecar has cores to spare, at some CPU per request.
    pub worker_threads: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            worker_threads: DEFAULT_WORKER_THREADS,
        }
    }
}

/// `[[outbound]] protocol`: what the sidecar offers its peer in ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 only: a keep-alive pool, one request per connection at a time (about 25 %
    /// less CPU per request than h2 at concurrency 1 on the benchmark machine, about 20 % more
    /// at concurrency 32).
    Http1,
    /// HTTP/2 only: every request multiplexed on one shared connection.
    H2,
    /// Offer `h2` then `http/1.1` and use what the peer picks (the default).
    #[default]
    Auto,
}

impl UpstreamProtocol {
    /// The ALPN protocol names offered, most preferred first.
    pub fn alpn(self) -> &'static [&'static [u8]] {
        match self {
            Self::Http1 => &[b"http/1.1"],
            Self::H2 => &[b"h2"],
            Self::Auto => &[b"h2", b"http/1.1"],
        }
    }
}

/// Default interval of the polling fallback of hot reload.
pub const DEFAULT_RELOAD_POLL: Duration = Duration::from_secs(2);
/// Default quiet time after a file event before reloading (a writer's burst becomes one reload).
pub const DEFAULT_RELOAD_DEBOUNCE: Duration = Duration::from_millis(75);

/// `[reload]`: how the sidecar notices changed files (see `crate::reload`).
#[derive(Debug, Clone)]
pub struct ReloadConfig {
    /// Watch the directories of the watched files with inotify (notify).
    pub watch: bool,
    /// Quiet time after a file event before reloading.
    pub debounce: Duration,
    /// Polling fallback: compare the files' contents this often.
    pub poll_interval: Duration,
    /// DANGEROUS: accept a reloaded certificate with a different SPIFFE ID than the running
    /// one. Off by default: a changed identity on disk is refused and the old one kept.
    pub allow_identity_change: bool,
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

/// Default `[identity] crl_stale`: refuse the peers a stale CRL vouches for, as OpenSSL (and so
/// nginx, HAProxy and Envoy) does with an expired CRL. A CRL past its next-update says nothing
/// about what was revoked since; accepting it forever would let a stopped CRL job (or an
/// attacker who keeps the new CRL from arriving) switch revocation off without anyone seeing.
pub const DEFAULT_CRL_STALE: CrlStale = CrlStale::Refuse;

/// Default `[identity] crl_grace`: how long after a CRL's next-update `crl_stale` acts. Long
/// enough for a late cron run or a slow Secret sync, short next to `ca crl`'s 24 h lifetime.
pub const DEFAULT_CRL_GRACE: Duration = Duration::from_secs(3600);

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
    pub stale: CrlStale,
    /// How long after next-update the action starts.
    pub grace: Duration,
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
pub struct IdentityConfig {
    /// Leaf + intermediates, PEM.
    pub cert: PathBuf,
    /// PKCS#8 private key, PEM.
    pub key: PathBuf,
    /// Trust anchors, PEM.
    pub bundle: PathBuf,
    /// Certificate revocation list(s), PEM, optional.
    pub crl: Option<PathBuf>,
    /// What a CRL past its next-update (beyond the grace period) does: `crl_stale`, `crl_grace`.
    pub crl_policy: CrlPolicy,
}

/// `[inbound]`.
#[derive(Debug, Clone)]
pub struct InboundConfig {
    /// mTLS listen address.
    pub listen: SocketAddr,
    /// Where allowed requests go (plaintext HTTP/1.1).
    pub app: SocketAddr,
    /// The policy file.
    pub policy: PathBuf,
    /// The app address is not loopback and the operator said that is fine.
    pub insecure_app_address: bool,
    /// TLS handshake timeout.
    pub handshake_timeout: Duration,
    /// Time a client has to send a complete HTTP/1.1 request head (slow clients are dropped).
    /// hyper also runs this timer while a keep-alive HTTP/1.1 connection waits for its next
    /// request, so it bounds HTTP/1.1 idle time too.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/2 with GOAWAY).
    pub idle_timeout: Duration,
    /// Time the app has to start its response before the caller gets 504.
    pub app_timeout: Duration,
    /// Largest request head accepted (431 beyond).
    pub max_header_bytes: usize,
    /// Concurrent inbound connections.
    pub max_connections: usize,
    /// Open connections from one source IP address (handshaking or authenticated).
    pub max_connections_per_source: usize,
    /// Handshakes in progress from one source IP address.
    pub max_handshakes_per_source: usize,
    /// Handshakes in progress over all sources, at most half of `max_connections`.
    pub max_pending_handshakes: usize,
    /// After a peer sent a certificate chain over the bounds, its source's handshakes wait this
    /// long to start, until that long after the refusal.
    pub failed_handshake_delay: Duration,
    /// Concurrent HTTP/2 streams per connection.
    pub max_h2_streams: u32,
    /// Client resets of streams still being served that an HTTP/2 connection may send within
    /// `h2_reset_window`; one more gets `GOAWAY(ENHANCE_YOUR_CALM)` and the connection closes.
    pub max_h2_resets: u32,
    /// The window over which `max_h2_resets` is counted.
    pub h2_reset_window: Duration,
    /// A response that makes no progress for this long is aborted and its app connection
    /// closed: an HTTP/2 stream left without flow-control window is reset, a connection whose
    /// socket accepts no byte (HTTP/1.1 or HTTP/2) is dropped.
    pub send_timeout: Duration,
    /// Idle keep-alive connections kept to the app.
    pub app_pool_max_idle: usize,
    /// How long an idle keep-alive connection to the app is kept.
    pub app_pool_idle_timeout: Duration,
    /// Accept `;` in path segments (off by default: see `gatehouse_policy::path`).
    pub allow_matrix_params: bool,
}

/// One `[[outbound]]` entry.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// Name, used in logs and metric labels.
    pub name: String,
    /// Plaintext listen address for the local app.
    pub listen: SocketAddr,
    /// The peer sidecar's host (DNS name or IP), resolved at connect time.
    pub connect_host: String,
    /// The peer sidecar's port.
    pub connect_port: u16,
    /// The SPIFFE ID the peer must present.
    pub server_id: SpiffeId,
    /// SNI to send; `None` means the host of `connect`.
    pub sni: Option<String>,
    /// `listen` is not loopback and the operator said that is fine (dangerous).
    pub allow_non_loopback_listen: bool,
    /// TCP connect + TLS handshake timeout.
    pub connect_timeout: Duration,
    /// Time the peer has to start its response (504 after).
    pub request_timeout: Duration,
    /// Idle pooled connections are closed after this.
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept per peer.
    pub pool_max_idle: usize,
    /// Open connections per peer, busy or idle (the pool bound; requests wait beyond it).
    pub pool_max_connections: usize,
    /// Pooled connections are retired after this age (rotated certificates take effect).
    pub max_connection_age: Duration,
    /// What to offer the peer in ALPN (`protocol`, default `auto`).
    pub protocol: UpstreamProtocol,
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Listen address of /metrics, /healthz, /readyz, /status.
    pub listen: SocketAddr,
}

/// Default `[audit] flush_interval`: the longest an audit line waits in memory before it is
/// written (under load the buffer fills to 32 KiB and is written sooner).
pub const DEFAULT_AUDIT_FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Longest `[audit] flush_interval` accepted: lines still buffered when the process is killed
/// (not a graceful shutdown) are lost.
pub const MAX_AUDIT_FLUSH_INTERVAL: Duration = Duration::from_secs(10);

/// `[audit]`.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Whether decisions are audited at all (default true; off is logged as a warning).
    pub enabled: bool,
    /// Append audit lines to this file; `None` = stdout.
    pub path: Option<PathBuf>,
    /// Longest time a line is buffered before it is written; zero = every line at once.
    pub flush_interval: Duration,
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
                "{to}, buffered: written every {} or 32 KiB, and on shutdown",
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

// ---- stage one: the TOML as written ---------------------------------------------------------

type S<T> = Spanned<T>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    min_tls: Option<S<String>>,
    shutdown_grace_period: Option<S<String>>,
    identity: RawIdentity,
    tls: Option<RawTls>,
    inbound: Option<RawInbound>,
    #[serde(default)]
    outbound: Vec<RawOutbound>,
    #[serde(default)] // issue 17
    tcp_inbound: Vec<crate::tcp::config::RawTcpInbound>,
    #[serde(default)] // issue 17
    tcp_outbound: Vec<crate::tcp::config::RawTcpOutbound>,
    admin: RawAdmin,
    audit: Option<RawAudit>,
    reload: Option<RawReload>,
    runtime: Option<RawRuntime>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    worker_threads: Option<S<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReload {
    watch: Option<bool>,
    debounce: Option<S<String>>,
    poll_interval: Option<S<String>>,
    #[serde(default)]
    allow_identity_change: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    min_tls: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    cert: S<String>,
    key: S<String>,
    bundle: S<String>,
    crl: Option<S<String>>,
    crl_stale: Option<S<String>>,
    crl_grace: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInbound {
    listen: S<String>,
    app: S<String>,
    policy: S<String>,
    #[serde(default)]
    insecure_app_address: bool,
    handshake_timeout: Option<S<String>>,
    header_read_timeout: Option<S<String>>,
    idle_timeout: Option<S<String>>,
    app_timeout: Option<S<String>>,
    max_header_bytes: Option<S<u64>>,
    max_connections: Option<S<u64>>,
    max_connections_per_source: Option<S<u64>>,
    max_handshakes_per_source: Option<S<u64>>,
    max_pending_handshakes: Option<S<u64>>,
    failed_handshake_delay: Option<S<String>>,
    max_h2_streams: Option<S<u32>>,
    max_h2_resets: Option<S<u64>>,
    h2_reset_window: Option<S<String>>,
    send_timeout: Option<S<String>>,
    app_pool_max_idle: Option<S<u64>>,
    app_pool_idle_timeout: Option<S<String>>,
    #[serde(default)]
    allow_matrix_params: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbound {
    name: S<String>,
    listen: S<String>,
    connect: S<String>,
    server_id: S<String>,
    sni: Option<S<String>>,
    #[serde(default)]
    allow_non_loopback_listen: bool,
    connect_timeout: Option<S<String>>,
    request_timeout: Option<S<String>>,
    pool_idle_timeout: Option<S<String>>,
    pool_max_idle: Option<S<u64>>,
    pool_max_connections: Option<S<u64>>,
    max_connection_age: Option<S<String>>,
    protocol: Option<UpstreamProtocol>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    enabled: Option<bool>,
    path: Option<S<String>>,
    flush_interval: Option<S<String>>,
}

// ---- stage two: validation --------------------------------------------------------------------

/// Collects every problem with its position.
pub(crate) struct Check<'a> {
    // issue 17: pub(crate) for tcp/config.rs
    file: &'a Path,
    dir: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Check<'_> {
    pub(crate) fn push(&mut self, span: Option<Range<usize>>, kind: ConfigErrorKind) {
        let position = span.map(|s| line_col(self.text, s.start));
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            position,
            kind,
        });
    }

    pub(crate) fn path(&mut self, v: &S<String>, key: &'static str) -> PathBuf {
        if v.get_ref().is_empty() {
            self.push(Some(v.span()), ConfigErrorKind::Empty { key });
        }
        self.dir.join(v.get_ref())
    }

    pub(crate) fn addr(&mut self, v: &S<String>) -> Option<SocketAddr> {
        match v.get_ref().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                let value = v.get_ref().clone();
                self.push(Some(v.span()), ConfigErrorKind::Address { value });
                None
            }
        }
    }

    pub(crate) fn duration(
        &mut self,
        v: Option<&S<String>>,
        key: &'static str,
        default: Duration,
    ) -> Duration {
        let Some(v) = v else { return default };
        match humantime::parse_duration(v.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.push(Some(v.span()), ConfigErrorKind::Zero { key });
                default
            }
            Ok(d) => d,
            Err(_) => {
                let value = v.get_ref().clone();
                self.push(Some(v.span()), ConfigErrorKind::Duration { value });
                default
            }
        }
    }

    /// `[audit] flush_interval`: zero allowed (every line written at once), at most
    /// [`MAX_AUDIT_FLUSH_INTERVAL`].
    fn audit_flush_interval(&mut self, v: Option<&S<String>>) -> Duration {
        let Some(v) = v else {
            return DEFAULT_AUDIT_FLUSH_INTERVAL;
        };
        match humantime::parse_duration(v.get_ref()) {
            Ok(d) if d > MAX_AUDIT_FLUSH_INTERVAL => {
                let value = v.get_ref().clone();
                self.push(
                    Some(v.span()),
                    ConfigErrorKind::AuditFlushInterval { value },
                );
                DEFAULT_AUDIT_FLUSH_INTERVAL
            }
            Ok(d) => d,
            Err(_) => {
                let value = v.get_ref().clone();
                self.push(Some(v.span()), ConfigErrorKind::Duration { value });
                DEFAULT_AUDIT_FLUSH_INTERVAL
            }
        }
    }

    pub(crate) fn count(&mut self, v: Option<&S<u64>>, key: &'static str, default: usize) -> usize {
        let Some(v) = v else { return default };
        if *v.get_ref() == 0 {
            self.push(Some(v.span()), ConfigErrorKind::Zero { key });
            return default;
        }
        usize::try_from(*v.get_ref()).unwrap_or(usize::MAX)
    }

    fn crl_stale(&mut self, v: Option<&S<String>>) -> CrlStale {
        let Some(v) = v else {
            return DEFAULT_CRL_STALE;
        };
        match v.get_ref().as_str() {
            "warn" => CrlStale::Warn,
            "unready" => CrlStale::Unready,
            "refuse" => CrlStale::Refuse,
            other => {
                let value = other.to_owned();
                self.push(Some(v.span()), ConfigErrorKind::CrlStale { value });
                DEFAULT_CRL_STALE
            }
        }
    }

    fn min_tls(&mut self, top: Option<&S<String>>, tls: Option<&S<String>>) -> MinTls {
        let v = match (top, tls) {
            (Some(_), Some(t)) => {
                self.push(Some(t.span()), ConfigErrorKind::MinTlsTwice);
                return MinTls::Tls13;
            }
            (Some(v), None) | (None, Some(v)) => v,
            (None, None) => return MinTls::Tls13,
        };
        match v.get_ref().as_str() {
            "1.3" => MinTls::Tls13,
            "1.2" => MinTls::Tls12,
            other => {
                let value = other.to_owned();
                self.push(Some(v.span()), ConfigErrorKind::MinTls { value });
                MinTls::Tls13
            }
        }
    }
}

/// 1-based line and column (in characters) of byte offset `at`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

fn placeholder_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

impl Config {
    /// Reads and validates the configuration file.
    ///
    /// # Errors
    /// Every problem found, each with `file:line:col` (or only the file when it cannot be read).
    pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let err = |kind| {
            vec![ConfigError {
                file: path.to_path_buf(),
                position: None,
                kind,
            }]
        };
        let bytes = crate::input::read(&abs, crate::input::FileKind::Config)
            .map_err(|e| err(ConfigErrorKind::Read(e)))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            err(ConfigErrorKind::Syntax(format!(
                "the file is not UTF-8 text: {e}"
            )))
        })?;
        Self::parse(&text, &abs)
    }

    /// Validates configuration text as if it had been read from `path` (relative paths inside
    /// are resolved against `path`'s directory).
    ///
    /// # Errors
    /// Every problem found, each with `file:line:col`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, Vec<ConfigError>> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut check = Check {
            file: path,
            dir,
            text,
            errors: Vec::new(),
        };
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                // toml's message repeats the position and a snippet; keep the first line.
                let msg = e
                    .message()
                    .lines()
                    .next()
                    .unwrap_or("invalid TOML")
                    .to_owned();
                check.push(e.span(), ConfigErrorKind::Syntax(msg));
                return Err(check.errors);
            }
        };
        let config = check.validate(raw, path);
        if check.errors.is_empty() {
            Ok(config)
        } else {
            Err(check.errors)
        }
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

impl Check<'_> {
    fn validate(&mut self, raw: RawConfig, path: &Path) -> Config {
        let min_tls = self.min_tls(
            raw.min_tls.as_ref(),
            raw.tls.as_ref().and_then(|t| t.min_tls.as_ref()),
        );
        let identity = IdentityConfig {
            cert: self.path(&raw.identity.cert, "identity.cert"),
            key: self.path(&raw.identity.key, "identity.key"),
            bundle: self.path(&raw.identity.bundle, "identity.bundle"),
            crl: raw
                .identity
                .crl
                .as_ref()
                .map(|c| self.path(c, "identity.crl")),
            crl_policy: CrlPolicy {
                stale: self.crl_stale(raw.identity.crl_stale.as_ref()),
                grace: self.duration(
                    raw.identity.crl_grace.as_ref(),
                    "identity.crl_grace",
                    DEFAULT_CRL_GRACE,
                ),
            },
        };
        let inbound = raw.inbound.map(|i| self.inbound(i));
        let outbound = self.outbound(raw.outbound);
        let tcp = self.tcp(raw.tcp_inbound, raw.tcp_outbound); // issue 17
        let admin = AdminConfig {
            listen: self
                .addr(&raw.admin.listen)
                .unwrap_or_else(placeholder_addr),
        };
        let audit = raw
            .audit
            .map_or_else(AuditConfig::default, |a| AuditConfig {
                enabled: a.enabled.unwrap_or(true),
                path: a.path.map(|p| self.path(&p, "audit.path")),
                flush_interval: self.audit_flush_interval(a.flush_interval.as_ref()),
            });
        let shutdown_grace_period = self.duration(
            raw.shutdown_grace_period.as_ref(),
            "shutdown_grace_period",
            DEFAULT_SHUTDOWN_GRACE,
        );
        let reload = raw
            .reload
            .map_or_else(ReloadConfig::default, |r| ReloadConfig {
                watch: r.watch.unwrap_or(true),
                debounce: self.duration(
                    r.debounce.as_ref(),
                    "reload.debounce",
                    DEFAULT_RELOAD_DEBOUNCE,
                ),
                poll_interval: self.duration(
                    r.poll_interval.as_ref(),
                    "reload.poll_interval",
                    DEFAULT_RELOAD_POLL,
                ),
                allow_identity_change: r.allow_identity_change,
            });
        let worker_threads = raw.runtime.as_ref().and_then(|r| r.worker_threads.as_ref());
        let mut loops = self.count(
            worker_threads,
            "runtime.worker_threads",
            DEFAULT_WORKER_THREADS,
        );
        if let Some(v) = worker_threads.filter(|_| loops > MAX_WORKER_THREADS) {
            let value = *v.get_ref();
            self.push(Some(v.span()), ConfigErrorKind::WorkerThreads { value });
            loops = DEFAULT_WORKER_THREADS;
        }
        let runtime = RuntimeConfig {
            worker_threads: loops,
        };
        if inbound.is_none() && outbound.is_empty() && tcp.is_empty() {
            self.push(None, ConfigErrorKind::NoListener);
        }
        let config = Config {
            path: path.to_path_buf(),
            identity,
            min_tls,
            inbound,
            outbound,
            tcp, // issue 17
            admin,
            audit,
            shutdown_grace_period,
            reload,
            runtime,
        };
        self.duplicate_listens(&config);
        config
    }

    fn duplicate_listens(&mut self, config: &Config) {
        let mut seen = std::collections::HashSet::new();
        for (_, addr) in config.listeners() {
            if addr.port() != 0 && !seen.insert(addr) {
                self.push(None, ConfigErrorKind::DuplicateListen { addr });
            }
        }
    }

    fn inbound(&mut self, i: RawInbound) -> InboundConfig {
        let listen = self.addr(&i.listen).unwrap_or_else(placeholder_addr);
        let app = self.addr(&i.app).unwrap_or_else(placeholder_addr);
        if !app.ip().is_loopback() && !i.insecure_app_address {
            self.push(
                Some(i.app.span()),
                ConfigErrorKind::NonLoopbackApp { addr: app },
            );
        }
        let max_h2_streams = match i.max_h2_streams {
            Some(v) if *v.get_ref() == 0 => {
                let key = "inbound.max_h2_streams";
                self.push(Some(v.span()), ConfigErrorKind::Zero { key });
                128
            }
            Some(v) => *v.get_ref(),
            None => 128,
        };
        let max_header_bytes = self.count(
            i.max_header_bytes.as_ref(),
            "inbound.max_header_bytes",
            16 * 1024,
        );
        let mut inbound = InboundConfig {
            listen,
            app,
            policy: self.path(&i.policy, "inbound.policy"),
            insecure_app_address: i.insecure_app_address,
            handshake_timeout: self.duration(
                i.handshake_timeout.as_ref(),
                "inbound.handshake_timeout",
                DEFAULT_HANDSHAKE_TIMEOUT,
            ),
            header_read_timeout: self.duration(
                i.header_read_timeout.as_ref(),
                "inbound.header_read_timeout",
                DEFAULT_HEADER_READ_TIMEOUT,
            ),
            idle_timeout: self.duration(
                i.idle_timeout.as_ref(),
                "inbound.idle_timeout",
                DEFAULT_IDLE_TIMEOUT,
            ),
            app_timeout: self.duration(
                i.app_timeout.as_ref(),
                "inbound.app_timeout",
                DEFAULT_APP_TIMEOUT,
            ),
            max_header_bytes,
            max_connections: self.count(
                i.max_connections.as_ref(),
                "inbound.max_connections",
                DEFAULT_MAX_CONNECTIONS,
            ),
            max_connections_per_source: self.count(
                i.max_connections_per_source.as_ref(),
                "inbound.max_connections_per_source",
                DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
            ),
            max_handshakes_per_source: self.count(
                i.max_handshakes_per_source.as_ref(),
                "inbound.max_handshakes_per_source",
                DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            ),
            max_pending_handshakes: self.count(
                i.max_pending_handshakes.as_ref(),
                "inbound.max_pending_handshakes",
                DEFAULT_MAX_PENDING_HANDSHAKES,
            ),
            failed_handshake_delay: self.duration(
                i.failed_handshake_delay.as_ref(),
                "inbound.failed_handshake_delay",
                DEFAULT_FAILED_HANDSHAKE_DELAY,
            ),
            max_h2_streams,
            max_h2_resets: u32::try_from(self.count(
                i.max_h2_resets.as_ref(),
                "inbound.max_h2_resets",
                DEFAULT_MAX_H2_RESETS as usize,
            ))
            .unwrap_or(u32::MAX),
            h2_reset_window: self.duration(
                i.h2_reset_window.as_ref(),
                "inbound.h2_reset_window",
                DEFAULT_H2_RESET_WINDOW,
            ),
            send_timeout: self.duration(
                i.send_timeout.as_ref(),
                "inbound.send_timeout",
                DEFAULT_SEND_TIMEOUT,
            ),
            app_pool_max_idle: self.count(
                i.app_pool_max_idle.as_ref(),
                "inbound.app_pool_max_idle",
                64,
            ),
            app_pool_idle_timeout: self.duration(
                i.app_pool_idle_timeout.as_ref(),
                "inbound.app_pool_idle_timeout",
                Duration::from_secs(30),
            ),
            allow_matrix_params: i.allow_matrix_params,
        };
        // Unauthenticated connections never hold more than half the slots.
        inbound.max_pending_handshakes = inbound
            .max_pending_handshakes
            .min(inbound.max_connections.div_ceil(2));
        inbound
    }

    fn outbound(&mut self, raw: Vec<RawOutbound>) -> Vec<OutboundConfig> {
        let mut names = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(raw.len());
        for o in raw {
            let name = o.name.get_ref().clone();
            if name.is_empty() {
                let key = "outbound.name";
                self.push(Some(o.name.span()), ConfigErrorKind::Empty { key });
            } else if !names.insert(name.clone()) {
                let kind = ConfigErrorKind::DuplicateOutbound { name: name.clone() };
                self.push(Some(o.name.span()), kind);
            }
            let listen = self.addr(&o.listen).unwrap_or_else(placeholder_addr);
            if !listen.ip().is_loopback() && !o.allow_non_loopback_listen {
                let kind = ConfigErrorKind::NonLoopbackOutbound {
                    name: name.clone(),
                    addr: listen,
                };
                self.push(Some(o.listen.span()), kind);
            }
            let (connect_host, connect_port) = self.host_port(&o.connect);
            let server_id = match SpiffeId::parse(o.server_id.get_ref()) {
                Ok(id) => Some(id),
                Err(source) => {
                    let value = o.server_id.get_ref().clone();
                    let kind = ConfigErrorKind::SpiffeId { value, source };
                    self.push(Some(o.server_id.span()), kind);
                    None
                }
            };
            let sni = o.sni.map(|s| {
                if s.get_ref().is_empty() {
                    let key = "outbound.sni";
                    self.push(Some(s.span()), ConfigErrorKind::Empty { key });
                }
                s.into_inner()
            });
            let entry = OutboundConfig {
                name,
                listen,
                connect_host,
                connect_port,
                server_id: match server_id {
                    Some(id) => id,
                    // An error is already recorded; the value is never used.
                    None => continue,
                },
                sni,
                allow_non_loopback_listen: o.allow_non_loopback_listen,
                connect_timeout: self.duration(
                    o.connect_timeout.as_ref(),
                    "outbound.connect_timeout",
                    Duration::from_secs(5),
                ),
                request_timeout: self.duration(
                    o.request_timeout.as_ref(),
                    "outbound.request_timeout",
                    DEFAULT_APP_TIMEOUT,
                ),
                pool_idle_timeout: self.duration(
                    o.pool_idle_timeout.as_ref(),
                    "outbound.pool_idle_timeout",
                    Duration::from_secs(30),
                ),
                pool_max_idle: self.count(o.pool_max_idle.as_ref(), "outbound.pool_max_idle", 32),
                pool_max_connections: self.count(
                    o.pool_max_connections.as_ref(),
                    "outbound.pool_max_connections",
                    64,
                ),
                max_connection_age: self.duration(
                    o.max_connection_age.as_ref(),
                    "outbound.max_connection_age",
                    Duration::from_secs(300),
                ),
                protocol: o.protocol.unwrap_or_default(),
            };
            out.push(entry);
        }
        out
    }

    pub(crate) fn host_port(&mut self, v: &S<String>) -> (String, u16) {
        let s = v.get_ref();
        let parsed = s.rsplit_once(':').and_then(|(host, port)| {
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
            // The outbound pool renders host and port as an HTTP authority and relies on it
            // parsing (`Target::authority`), so refuse here what would not: `mono#lith:8443`.
            let rendered = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            let ok_host = !host.is_empty()
                && !host.contains(['/', ' ', '@'])
                && rendered.parse::<http::uri::Authority>().is_ok();
            ok_host.then(|| (host.to_owned(), port))
        });
        parsed.unwrap_or_else(|| {
            let value = s.clone();
            self.push(Some(v.span()), ConfigErrorKind::HostPort { value });
            (String::new(), 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[identity]
cert = "certs/cert.pem"
key = "certs/key.pem"
bundle = "certs/bundle.pem"

[inbound]
listen = "0.0.0.0:8443"
app = "127.0.0.1:8080"
policy = "policy.toml"

[[outbound]]
name = "monolith"
listen = "127.0.0.1:7001"
connect = "monolith.internal:8443"
server_id = "spiffe://fintech.internal/monolith"

[admin]
listen = "127.0.0.1:9901"
"#;

    fn parse(text: &str) -> Result<Config, Vec<ConfigError>> {
        Config::parse(text, Path::new("/etc/gh/sidecar.toml"))
    }

    fn errors(text: &str) -> Vec<String> {
        parse(text)
            .expect_err("config should be refused")
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn good_config_resolves_paths_and_defaults() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.identity.cert, Path::new("/etc/gh/certs/cert.pem"));
        assert_eq!(c.min_tls, MinTls::Tls13);
        let i = c.inbound.expect("inbound");
        assert_eq!(i.policy, Path::new("/etc/gh/policy.toml"));
        assert_eq!(i.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
        assert_eq!(c.outbound[0].connect_host, "monolith.internal");
        assert_eq!(c.outbound[0].connect_port, 8443);
        assert_eq!(c.shutdown_grace_period, DEFAULT_SHUTDOWN_GRACE);
    }

    #[test]
    fn connection_limits_default_and_pending_handshakes_stay_under_half_the_slots() {
        let i = parse(GOOD).expect("valid").inbound.expect("inbound");
        assert_eq!(i.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(
            i.max_connections_per_source,
            DEFAULT_MAX_CONNECTIONS_PER_SOURCE
        );
        assert_eq!(
            i.max_handshakes_per_source,
            DEFAULT_MAX_HANDSHAKES_PER_SOURCE
        );
        assert_eq!(i.max_pending_handshakes, DEFAULT_MAX_PENDING_HANDSHAKES);
        assert_eq!(i.failed_handshake_delay, DEFAULT_FAILED_HANDSHAKE_DELAY);
        let text = GOOD.replace(
            "policy = \"policy.toml\"",
            "policy = \"p\"\nmax_connections = 100\nmax_pending_handshakes = 500\n\
             max_connections_per_source = 7\nmax_handshakes_per_source = 3\n\
             failed_handshake_delay = \"250ms\"",
        );
        let i = parse(&text).expect("valid").inbound.expect("inbound");
        assert_eq!(i.max_pending_handshakes, 50);
        assert_eq!(i.max_connections_per_source, 7);
        assert_eq!(i.max_handshakes_per_source, 3);
        assert_eq!(i.failed_handshake_delay, Duration::from_millis(250));
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let text = GOOD.replace("policy = \"policy.toml\"", "policy = \"p\"\npolcy = 1");
        let e = errors(&text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("/etc/gh/sidecar.toml:11:1: "), "{e:?}");
        assert!(e[0].contains("polcy"), "{e:?}");
    }

    #[test]
    fn every_problem_is_reported_with_its_position() {
        let text = GOOD
            .replace("\"127.0.0.1:8080\"", "\"10.0.0.5:8080\"")
            .replace("\"127.0.0.1:7001\"", "\"0.0.0.0:7001\"")
            .replace(
                "spiffe://fintech.internal/monolith",
                "spiffe://Fintech/monolith",
            )
            .replace("listen = \"127.0.0.1:9901\"", "listen = \"localhost\"");
        let e = errors(&text);
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(
            e[0].contains(":9:7: the app address 10.0.0.5:8080"),
            "{e:?}"
        );
        assert!(
            e[1].contains(":14:10: outbound `monolith` listens on 0.0.0.0:7001"),
            "{e:?}"
        );
        assert!(e[2].contains(":16:13: invalid SPIFFE ID"), "{e:?}");
        assert!(
            e[3].contains(":19:10: `localhost` is not an IP:PORT"),
            "{e:?}"
        );
    }

    #[test]
    fn dangerous_opt_ins_allow_non_loopback() {
        let text = GOOD
            .replace(
                "app = \"127.0.0.1:8080\"",
                "app = \"10.0.0.5:8080\"\ninsecure_app_address = true",
            )
            .replace(
                "listen = \"127.0.0.1:7001\"",
                "listen = \"0.0.0.0:7001\"\nallow_non_loopback_listen = true",
            );
        let c = parse(&text).expect("valid");
        assert!(c.inbound.expect("inbound").insecure_app_address);
        assert!(c.outbound[0].allow_non_loopback_listen);
    }

    #[test]
    fn min_tls_top_level_or_tls_table() {
        let c = parse(&format!("min_tls = \"1.2\"\n{GOOD}")).expect("valid");
        assert_eq!(c.min_tls, MinTls::Tls12);
        let c = parse(&format!("{GOOD}\n[tls]\nmin_tls = \"1.2\"\n")).expect("valid");
        assert_eq!(c.min_tls, MinTls::Tls12);
        let e = errors(&format!("min_tls = \"1.1\"\n{GOOD}"));
        assert!(e[0].contains(":1:11: `1.1` is not a supported"), "{e:?}");
    }

    #[test]
    fn crl_stale_and_grace_default_to_refuse_after_an_hour() {
        let c = parse(GOOD).expect("good").identity.crl_policy;
        assert_eq!(
            (c.stale, c.grace),
            (CrlStale::Refuse, Duration::from_secs(3600))
        );
        let with =
            |lines: &str| GOOD.replacen("[identity]\n", &format!("[identity]\n{lines}\n"), 1);
        for (v, want) in [("warn", CrlStale::Warn), ("unready", CrlStale::Unready)] {
            let text = with(&format!("crl_stale = \"{v}\"\ncrl_grace = \"10m\""));
            let c = parse(&text).expect("valid").identity.crl_policy;
            assert_eq!((c.stale, c.grace), (want, Duration::from_secs(600)));
        }
        let e = errors(&with("crl_stale = \"ignore\""));
        assert!(
            e[0].contains(":3:13: `ignore` is not a `crl_stale` action"),
            "{e:?}"
        );
        let e = errors(&with("crl_grace = \"soon\""));
        assert_eq!(e.len(), 1, "{e:?}");
    }

    #[test]
    fn reload_section_defaults_values_and_errors() {
        let d = parse(GOOD).expect("good").reload;
        assert!(d.watch && !d.allow_identity_change);
        assert_eq!(
            (d.debounce, d.poll_interval),
            (DEFAULT_RELOAD_DEBOUNCE, DEFAULT_RELOAD_POLL)
        );
        let text = format!(
            "{GOOD}\n[reload]\nwatch = false\ndebounce = \"10ms\"\npoll_interval = \"5s\"\nallow_identity_change = true\n"
        );
        let r = parse(&text).expect("reload section").reload;
        assert!(!r.watch && r.allow_identity_change);
        assert_eq!(r.debounce, Duration::from_millis(10));
        assert_eq!(r.poll_interval, Duration::from_secs(5));
        let e = errors(&format!("{GOOD}\n[reload]\npoll_interval = \"0s\"\n"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("reload.poll_interval"), "{e:?}");
        let e = errors(&format!("{GOOD}\n[reload]\nintervall = \"1s\"\n"));
        assert!(e[0].contains("intervall"), "{e:?}");
    }

    #[test]
    fn runtime_worker_threads_and_outbound_protocol() {
        let c = parse(GOOD).expect("good");
        assert_eq!(c.runtime.worker_threads, DEFAULT_WORKER_THREADS);
        assert_eq!(c.outbound[0].protocol, UpstreamProtocol::Auto);
        let text = GOOD.replace(
            "connect = \"monolith.internal:8443\"",
            "connect = \"monolith.internal:8443\"\nprotocol = \"http1\"",
        );
        let c = parse(&format!("{text}\n[runtime]\nworker_threads = 2\n")).expect("valid");
        assert_eq!(c.runtime.worker_threads, 2);
        assert_eq!(c.outbound[0].protocol, UpstreamProtocol::Http1);
        assert_eq!(c.outbound[0].protocol.alpn(), [b"http/1.1".as_slice()]);
        let e = errors(&format!("{GOOD}\n[runtime]\nworker_threads = 0\n"));
        assert!(e[0].contains("runtime.worker_threads"), "{e:?}");
        let e = errors(&format!("{GOOD}\n[runtime]\nworker_threads = 257\n"));
        assert!(
            e[0].contains("worker_threads` = 257 is more than the maximum of 256"),
            "{e:?}"
        );
        assert!(
            e[0].contains("sidecar.toml:22:18:"),
            "names line and column: {e:?}"
        );
        let c = parse(&format!("{GOOD}\n[runtime]\nworker_threads = 256\n")).expect("max");
        assert_eq!(c.runtime.worker_threads, MAX_WORKER_THREADS);
        let e = errors(&GOOD.replace(
            "connect = \"monolith.internal:8443\"",
            "connect = \"monolith.internal:8443\"\nprotocol = \"h3\"",
        ));
        assert!(e[0].contains("h3"), "{e:?}");
    }

    #[test]
    fn slow_reader_and_reset_limits_default_and_can_be_set() {
        let i = parse(GOOD).expect("good").inbound.expect("inbound");
        assert_eq!(i.send_timeout, DEFAULT_SEND_TIMEOUT);
        assert_eq!(i.max_h2_resets, DEFAULT_MAX_H2_RESETS);
        assert_eq!(i.h2_reset_window, DEFAULT_H2_RESET_WINDOW);
        let text = GOOD.replace(
            "policy = \"policy.toml\"",
            "policy = \"p\"\nsend_timeout = \"5s\"\nmax_h2_resets = 50\nh2_reset_window = \"1m\"",
        );
        let i = parse(&text).expect("set").inbound.expect("inbound");
        assert_eq!(i.send_timeout, Duration::from_secs(5));
        assert_eq!(i.max_h2_resets, 50);
        assert_eq!(i.h2_reset_window, Duration::from_secs(60));
        let text = GOOD.replace(
            "policy = \"policy.toml\"",
            "policy = \"p\"\nsend_timeout = \"0s\"\nmax_h2_resets = 0",
        );
        let e = errors(&text);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e.iter().any(|e| e.contains("inbound.send_timeout")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|e| e.contains("inbound.max_h2_resets")),
            "{e:?}"
        );
    }

    #[test]
    fn bad_durations_and_zero_limits() {
        let text = GOOD.replace(
            "policy = \"policy.toml\"",
            "policy = \"p\"\nheader_read_timeout = \"soon\"\nmax_connections = 0",
        );
        let e = errors(&text);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].contains(":11:23: `soon` is not a duration"), "{e:?}");
        assert!(
            e[1].contains(":12:19: `inbound.max_connections` must be"),
            "{e:?}"
        );
    }

    #[test]
    fn connect_host_that_is_no_http_authority_is_refused_not_a_panic_at_run() {
        let text = GOOD.replace("monolith.internal:8443", "mono#lith:8443");
        let e = errors(&text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("`mono#lith:8443` is not HOST:PORT"), "{e:?}");
        for good in ["monolith.internal:8443", "10.0.0.7:8443", "[::1]:8443"] {
            let c = parse(&GOOD.replace("monolith.internal:8443", good)).expect(good);
            assert_eq!(c.outbound[0].connect_port, 8443);
        }
    }

    #[test]
    fn missing_section_is_a_syntax_error_with_position() {
        let text = GOOD.replace("[admin]\nlisten = \"127.0.0.1:9901\"\n", "");
        let e = errors(&text);
        assert!(e[0].contains("admin"), "{e:?}");
    }

    #[test]
    fn audit_section_defaults_values_and_errors() {
        let d = parse(GOOD).expect("good").audit;
        assert!(d.enabled);
        assert_eq!(d.path, None);
        assert_eq!(d.flush_interval, DEFAULT_AUDIT_FLUSH_INTERVAL);
        let a = parse(&format!("{GOOD}\n[audit]\npath = \"audit.jsonl\"\n"))
            .expect("path only")
            .audit;
        assert!(a.enabled);
        assert_eq!(a.path.as_deref(), Some(Path::new("/etc/gh/audit.jsonl")));
        assert_eq!(a.flush_interval, DEFAULT_AUDIT_FLUSH_INTERVAL);
        let a = parse(&format!(
            "{GOOD}\n[audit]\nenabled = false\nflush_interval = \"1s\"\n"
        ))
        .expect("off")
        .audit;
        assert!(!a.enabled);
        assert_eq!(a.flush_interval, Duration::from_secs(1));
        for zero in ["0", "0s"] {
            let a = parse(&format!("{GOOD}\n[audit]\nflush_interval = \"{zero}\"\n"))
                .expect("zero: every line at once")
                .audit;
            assert_eq!(a.flush_interval, Duration::ZERO);
        }
        let e = errors(&format!("{GOOD}\n[audit]\nflush_interval = \"1m\"\n"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].contains(":22:18: `audit.flush_interval` = `1m` is longer than the maximum"),
            "{e:?}"
        );
        let e = errors(&format!("{GOOD}\n[audit]\nflush_interval = \"soon\"\n"));
        assert!(e[0].contains(":22:18: `soon` is not a duration"), "{e:?}");
        let e = errors(&format!("{GOOD}\n[audit]\nenabled = \"no\"\n"));
        assert!(e[0].contains(":22:"), "{e:?}");
        let e = errors(&format!("{GOOD}\n[audit]\nflush = \"1s\"\n"));
        assert!(e[0].contains("flush"), "{e:?}");
    }

    #[test]
    fn audit_summary_says_where_how_and_when_off() {
        let mut a = AuditConfig::default();
        assert_eq!(
            a.summary(),
            "stdout, buffered: written every 100ms or 32 KiB, and on shutdown"
        );
        a.path = Some(PathBuf::from("/var/log/gh/audit.jsonl"));
        a.flush_interval = Duration::ZERO;
        assert_eq!(
            a.summary(),
            "/var/log/gh/audit.jsonl, every line written at once (flush_interval = 0)"
        );
        a.enabled = false;
        assert!(a.summary().starts_with("OFF"), "{}", a.summary());
    }

    #[test]
    fn audit_flush_interval_error_has_help() {
        let kind = ConfigErrorKind::AuditFlushInterval { value: "1h".into() };
        assert!(kind.help().contains("10s"), "{}", kind.help());
    }
}
