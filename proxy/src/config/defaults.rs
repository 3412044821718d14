//! Every default of the configuration, one named constant each: the validator fills a key that
//! is not written with its constant, and the runtime has no defaults of its own (it always gets
//! its values from a [`super::Config`]). docs/CONFIG.md documents these values and
//! tests/tests/docs_reference.rs checks the documentation against the binary.

use std::time::Duration;

// ---- [inbound] ----------------------------------------------------------------------------------

/// Default TLS handshake timeout.
pub(crate) const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a client has to send a complete HTTP/1.1 request head.
pub(crate) const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default idle time after which an inbound connection with no request in flight is closed.
pub(crate) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time the app has to start its response (504 after).
pub(crate) const DEFAULT_APP_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `inbound.max_connections`.
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default `inbound.max_connections_per_source`: open connections from one IP address.
pub(crate) const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 1024;
/// Default `inbound.max_handshakes_per_source`: handshakes in progress from one IP address.
pub(crate) const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: usize = 64;
/// Default `inbound.max_pending_handshakes`: handshakes in progress over all sources (capped
/// at half of `max_connections`, so unauthenticated connections never hold every slot).
pub(crate) const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 1024;
/// Default `inbound.failed_handshake_delay`: how long a source that sent a certificate chain
/// over the bounds waits before each of its next handshakes.
pub(crate) const DEFAULT_FAILED_HANDSHAKE_DELAY: Duration = Duration::from_secs(1);
/// Default grace period for in-flight requests on shutdown.
pub(crate) const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default time a response may make no progress (the client reads nothing, or an HTTP/2
/// stream gets no flow-control window) before it is aborted and its app connection closed
/// (nginx's `send_timeout`, which defaults to 60 s: half, as the app connection is pinned).
pub(crate) const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Default number of client resets (`RST_STREAM` of a stream still being served) one HTTP/2
/// connection may send within [`DEFAULT_H2_RESET_WINDOW`] before it gets
/// `GOAWAY(ENHANCE_YOUR_CALM)` (CVE-2023-44487, rapid reset; Netty allows 200 per 30 s).
pub(crate) const DEFAULT_MAX_H2_RESETS: u32 = 200;
/// Default window over which [`DEFAULT_MAX_H2_RESETS`] is counted.
pub(crate) const DEFAULT_H2_RESET_WINDOW: Duration = Duration::from_secs(10);
/// Default `inbound.max_header_bytes`: the largest request head accepted (431 beyond).
pub(crate) const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// Default `inbound.max_h2_streams`: concurrent HTTP/2 streams per connection.
pub(crate) const DEFAULT_MAX_H2_STREAMS: u32 = 128;
/// Default `inbound.app_pool_max_idle`: idle keep-alive connections kept to the app.
pub(crate) const DEFAULT_APP_POOL_MAX_IDLE: usize = 64;
/// Default `inbound.app_pool_idle_timeout`: how long an idle connection to the app is kept.
pub(crate) const DEFAULT_APP_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `inbound.websocket_idle_timeout`: a WebSocket tunnel with no byte either way for
/// this long is closed (issue 17); the outbound side's tunnels use it too. Long enough for clients that ping every 30-60 s.
pub(crate) const DEFAULT_WEBSOCKET_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default `inbound.websocket_max_duration`: a WebSocket tunnel is closed this long after its
/// upgrade (both sides), so a certificate rotation or a policy change reaches it within that time.
pub(crate) const DEFAULT_WEBSOCKET_MAX_DURATION: Duration = Duration::from_secs(3600);

// ---- [[outbound]] -------------------------------------------------------------------------------

/// Default `outbound.connect_timeout`: DNS + TCP connect + TLS handshake to the peer, per attempt.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `outbound.request_timeout`: time the peer has to start its response (504 after); the
/// same budget the inbound side gives the app.
pub(crate) const DEFAULT_REQUEST_TIMEOUT: Duration = DEFAULT_APP_TIMEOUT;
/// Default `outbound.pool_idle_timeout`: an unused pooled connection is closed after this long.
pub(crate) const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `outbound.pool_max_idle`: idle HTTP/1.1 connections kept per peer.
pub(crate) const DEFAULT_POOL_MAX_IDLE: usize = 32;
/// Default `outbound.pool_max_connections`: open connections per peer, busy or idle.
pub(crate) const DEFAULT_POOL_MAX_CONNECTIONS: usize = 64;
/// Default `outbound.max_connection_age`: no request starts on a pooled connection older than
/// this, so a rotated certificate or bundle reaches every connection within it.
pub(crate) const DEFAULT_MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);
/// How long a request waits for a pooled connection when `pool_max_connections` are busy (not
/// configurable: the caller's own `request_timeout` is usually shorter).
pub(crate) const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(10);
/// The HTTP/1.1 lane's idle time (`crate::outbound::pool`; not configurable): a lane
/// connection idle this long is closed, and one is dialled only for a caller whose previous
/// request came within it. Half the inbound's default HTTP/1.1 keep-alive bound
/// (`header_read_timeout`, 10 s), so the peer does not close a lane under a request; a slower
/// caller stays on the HTTP/2 connection, which both sides keep longer.
pub(crate) const LANE_IDLE: Duration = Duration::from_secs(5);

// ---- [runtime], [reload], [identity], [audit] ---------------------------------------------------

/// Default `[runtime] worker_threads`: one event loop serves every connection. A sidecar shares
/// its machine with the app it fronts; one loop is the cheapest per request (the most work per
/// wake-up and per syscall) and keeps idle RSS under 10 MiB.
pub(crate) const DEFAULT_WORKER_THREADS: usize = 1;

/// Largest `[runtime] worker_threads` accepted: each loop is a thread with its own pools, and
/// more loops than cores only add CPU per request.
pub(crate) const MAX_WORKER_THREADS: usize = 256;

/// Default interval of the polling fallback of hot reload.
pub(crate) const DEFAULT_RELOAD_POLL: Duration = Duration::from_secs(2);
/// Default quiet time after a file event before reloading (a writer's burst becomes one reload).
pub(crate) const DEFAULT_RELOAD_DEBOUNCE: Duration = Duration::from_millis(75);

/// Default `[identity] crl_grace`: how long after a CRL's next-update `crl_stale` acts. Long
/// enough for a late cron run or a slow Secret sync, short next to `ca crl`'s 24 h lifetime.
pub(crate) const DEFAULT_CRL_GRACE: Duration = Duration::from_secs(3600);

/// Default `[audit] flush_interval`: the longest an audit line waits in memory before it is
/// written (under load the buffer fills to 128 KiB and is written sooner).
pub(crate) const DEFAULT_AUDIT_FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Longest `[audit] flush_interval` accepted: lines still buffered when the process is killed
/// (not a graceful shutdown) are lost.
pub(crate) const MAX_AUDIT_FLUSH_INTERVAL: Duration = Duration::from_secs(10);

// ---- [[tcp_inbound]] / [[tcp_outbound]] (issue 17) ----------------------------------------------

/// Default `idle_timeout` of a TCP connection: no byte either way for this long closes it.
pub(crate) const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default `handshake_timeout` (inbound) and `connect_timeout` (outbound).
pub(crate) const DEFAULT_TCP_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `max_connections` per TCP listener.
pub(crate) const DEFAULT_TCP_MAX_CONNECTIONS: usize = 1024;
/// Default `tcp_inbound.max_connections_per_source`: a quarter of the listener's default
/// `max_connections` (the `[inbound]` default, 1024, would be all of them).
pub(crate) const DEFAULT_TCP_MAX_CONNECTIONS_PER_SOURCE: usize = 256;
