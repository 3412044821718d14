//! TCP mode (issue 17): plain TCP (PostgreSQL, Redis, anything) under the same identity rules
//! as HTTP.
//!
//! - `[[tcp_inbound]]` ([`inbound`]): mTLS terminated with the *same* client verifier and
//!   `ServerConfig` the HTTP inbound uses (the snapshot's; built by the one path in
//!   `crate::state::server_tls` when there is no `[inbound]`), the caller decided by the
//!   `[[tcp]]` entry of the listener's name in its policy file, then bytes streamed both ways
//!   to the app.
//! - `[[tcp_outbound]]` ([`outbound`]): plain TCP from the app on loopback, mTLS to the peer
//!   sidecar with our certificate and the peer's `server_id` pinned (no ALPN is offered).
//! - [`pump`]: both directions with half-close (EOF on one side shuts down the write side of
//!   the other), byte counters, the idle timeout, and the reasons a connection ends.
//!
//! Every connection keeps the snapshot it was accepted with for its TLS, and re-checks its
//! peer on every reload (`State::subscribe`, the same signal the HTTP inbound listens to): a
//! caller whose certificate the new snapshot no longer accepts (revoked, root retired) or
//! whose `[[tcp]]` entry no longer names it is cut at once, with no grace period (a TCP stream
//! has no request boundary to finish on).
//!
//! TCP policy files are read on every snapshot build (startup, each reload); a change to a TCP
//! policy file that is not also the `[inbound]` policy is picked up on the next reload
//! (SIGHUP, or any watched file changing). The accept loops run on the main event loop.
//! Metrics: `gatehouse_tcp_connections_total{listener,result}`,
//! `gatehouse_tcp_bytes_total{listener,direction}`, `gatehouse_tcp_active_connections{listener}`.
//! Audit: one line per connection (`crate::audit::TcpRecord`).

pub(crate) mod config;
pub(crate) mod inbound;
pub(crate) mod metrics;
pub(crate) mod outbound;
pub(crate) mod pump;

use std::net::SocketAddr;
use std::sync::Arc;

use gatehouse_policy::Policy;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::net::TcpListener;
use tracing::warn;

use crate::config::Config;
use crate::error::LoadError;
use crate::input::{FileKind, Input};
use crate::outbound::OutboundTls;
use crate::signal::Shutdown;
use crate::state::{InboundSnapshot, State};
use crate::tls::resolver::CertResolver;
use crate::tls::verify::SpiffeClientVerifier;
use config::TcpConfig;
use metrics::{ListenerMetrics, TcpMetrics};

/// The TCP part of a [`crate::state::Snapshot`].
#[derive(Debug, Default)]
pub(crate) struct TcpSnapshot {
    /// The server side of every `[[tcp_inbound]]` (none without one).
    pub server: Option<ServerTls>,
    /// The policy of each `[[tcp_inbound]]`, in configuration order.
    pub policies: Vec<TcpPolicy>,
    /// The client side of each `[[tcp_outbound]]`, in configuration order.
    pub outbound: Vec<PinnedClient>,
}

/// The client verifier and TLS server configuration of the TCP listeners.
#[derive(Debug, Clone)]
pub(crate) struct ServerTls {
    /// The client verifier (also re-run on live connections after a reload).
    pub verifier: Arc<SpiffeClientVerifier>,
    /// The TLS server configuration.
    pub tls: Arc<ServerConfig>,
}

/// A `[[tcp_inbound]]`'s compiled policy file.
#[derive(Debug)]
pub(crate) struct TcpPolicy {
    /// The compiled policy (its `[[tcp]]` entry of the listener's name decides).
    pub policy: Policy,
    /// SHA-256 of the file as read, lowercase hex.
    pub sha256: String,
}

/// A `[[tcp_outbound]]`'s TLS client: our certificate, the peer's SPIFFE ID pinned.
#[derive(Debug, Clone)]
pub(crate) struct PinnedClient {
    /// The TLS client configuration.
    pub tls: Arc<ClientConfig>,
    /// The SNI sent.
    pub server_name: ServerName<'static>,
}

impl TcpSnapshot {
    /// Builds the TCP part of a snapshot: reads and compiles each `[[tcp_inbound]]` policy
    /// file, takes the `[inbound]` TLS server configuration when there is one (else builds it
    /// the same way), and the pinned client configuration of each `[[tcp_outbound]]`.
    ///
    /// # Errors
    /// Every problem found.
    pub(crate) fn build(
        config: &Config,
        inbound: Option<&InboundSnapshot>,
        tls: &OutboundTls,
        resolver: &Arc<CertResolver>,
    ) -> Result<Self, Vec<LoadError>> {
        let tcp = &config.tcp;
        let mut errors = Vec::new();
        let creds = &tls.credentials;
        let server = match inbound {
            _ if tcp.inbound.is_empty() => None,
            Some(i) => Some(ServerTls {
                verifier: i.verifier.clone(),
                tls: i.tls.clone(),
            }),
            None => {
                let td = creds.id.trust_domain();
                match crate::state::server_tls(config, creds, &td, &tls.provider, resolver) {
                    Ok((verifier, tls)) => Some(ServerTls { verifier, tls }),
                    Err(e) => {
                        errors.push(e);
                        None
                    }
                }
            }
        };
        let mut policies = Vec::with_capacity(tcp.inbound.len());
        for t in &tcp.inbound {
            match tcp_policy(t, creds) {
                Ok(p) => policies.push(p),
                Err(es) => errors.extend(es),
            }
        }
        let mut outbound = Vec::with_capacity(tcp.outbound.len());
        for o in &tcp.outbound {
            match pinned_client(o, tls) {
                Ok(c) => outbound.push(c),
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(Self {
                server,
                policies,
                outbound,
            })
        } else {
            Err(errors)
        }
    }

    /// Carries the running server configuration over to a snapshot that changed no trust
    /// (see `State::keep_server_tls`).
    pub(crate) fn keep_server_tls(&mut self, current: &TcpSnapshot) {
        if let (Some(next), Some(current)) = (self.server.as_mut(), current.server.as_ref()) {
            *next = current.clone();
        }
    }

    /// Lines for `sidecar check`.
    pub(crate) fn summary(&self, config: &TcpConfig) -> String {
        let mut s = String::new();
        for (t, p) in config.inbound.iter().zip(&self.policies) {
            let callers = p.policy.tcp_entry(&t.name).map_or(0, |e| e.allow().len());
            s.push_str(&format!(
                "tcp_inbound {}: {} -> app {} (policy {}, [[tcp]] `{}`: {callers} allow entries, sha256 {})\n",
                t.name,
                t.listen,
                t.app,
                t.policy.display(),
                t.name,
                p.sha256
            ));
        }
        for o in &config.outbound {
            s.push_str(&format!(
                "tcp_outbound {}: {} -> {}:{} (server must be {})\n",
                o.name,
                o.listen,
                o.target.host(),
                o.target.port(),
                o.server_id
            ));
        }
        s
    }
}

fn tcp_policy(
    t: &config::TcpInboundConfig,
    creds: &crate::tls::Credentials,
) -> Result<TcpPolicy, Vec<LoadError>> {
    let file = Input::read(&t.policy, FileKind::Policy);
    let (policy, sha256) = crate::state::load_policy(&t.policy, &file)?;
    let name = t.policy.display().to_string();
    if !creds.id.is_member_of(policy.trust_domain()) {
        return Err(vec![LoadError::TrustDomainMismatch {
            policy: name,
            policy_td: policy.trust_domain().to_string(),
            cert_td: creds.id.trust_domain_str().to_owned(),
        }]);
    }
    if policy.tcp_entry(&t.name).is_none() {
        return Err(vec![LoadError::Policy(
            gatehouse_policy::Diagnostic::whole_file(
                name,
                format!(
                    "no [[tcp]] entry named `{}` for the [[tcp_inbound]] listener of that name",
                    t.name
                ),
                format!(
                    "add [[tcp]] name = \"{}\" with the callers allowed to connect",
                    t.name
                ),
            ),
        )]);
    }
    Ok(TcpPolicy { policy, sha256 })
}

fn pinned_client(
    o: &config::TcpOutboundConfig,
    tls: &OutboundTls,
) -> Result<PinnedClient, LoadError> {
    // No ALPN: the stream is not HTTP.
    let (server_name, tls) = crate::outbound::pinned_client_tls(
        &o.name,
        o.sni.as_deref().unwrap_or(o.target.host()),
        &o.server_id,
        &[],
        tls,
    )
    .map_err(LoadError::Outbound)?;
    Ok(PinnedClient { tls, server_name })
}

/// The bound TCP listeners, in configuration order (inbound, then outbound).
#[derive(Debug)]
pub(crate) struct Tcp {
    inbound: Vec<TcpListener>,
    outbound: Vec<TcpListener>,
    metrics: TcpMetrics,
}

impl Tcp {
    /// Binds every TCP listener and registers `gatehouse_tcp_*` on `registry`.
    ///
    /// # Errors
    /// A listen address that cannot be bound, or metrics registered twice.
    pub(crate) async fn bind(
        config: &TcpConfig,
        registry: &prometheus::Registry,
    ) -> Result<Self, LoadError> {
        let metrics = TcpMetrics::register(registry)?;
        let mut inbound = Vec::with_capacity(config.inbound.len());
        for t in &config.inbound {
            if t.insecure_app_address && !t.app.ip().is_loopback() {
                warn!(listener = %t.name, app = %t.app, "DANGEROUS: plain TCP to a non-loopback app address (insecure_app_address = true)");
            }
            inbound.push(bind("tcp_inbound", t.listen).await?);
        }
        let mut outbound = Vec::with_capacity(config.outbound.len());
        for o in &config.outbound {
            if o.allow_non_loopback_listen && !o.listen.ip().is_loopback() {
                warn!(listener = %o.name, listen = %o.listen, "DANGEROUS: TCP outbound listener on a non-loopback address (allow_non_loopback_listen = true)");
            }
            outbound.push(bind("tcp_outbound", o.listen).await?);
        }
        Ok(Self {
            inbound,
            outbound,
            metrics,
        })
    }

    /// `(tcp_inbound:NAME | tcp_outbound:NAME, bound address)` for the `listening` lines.
    pub(crate) fn local_addrs(&self, config: &TcpConfig) -> Vec<(String, SocketAddr)> {
        let names = config.listeners().map(|(n, _)| n);
        let addrs = self.inbound.iter().chain(&self.outbound);
        names
            .zip(addrs)
            .filter_map(|(n, l)| Some((n, l.local_addr().ok()?)))
            .collect()
    }

    /// Starts the accept loops on the calling event loop; they stop when shutdown starts.
    pub(crate) fn spawn(self, state: &Arc<State>, shutdown: &Shutdown) {
        let config = state.config.tcp.clone();
        for (index, (cfg, l)) in config.inbound.into_iter().zip(self.inbound).enumerate() {
            let shared = Listener::new(index, cfg, state, &self.metrics);
            tokio::spawn(listen(
                l,
                "inbound",
                shared,
                shutdown.clone(),
                |l, tcp, stop| async move { inbound::serve_one(&l, tcp, &stop).await },
            ));
        }
        for (index, (cfg, l)) in config.outbound.into_iter().zip(self.outbound).enumerate() {
            let shared = Listener::new(index, cfg, state, &self.metrics);
            tokio::spawn(listen(
                l,
                "outbound",
                shared,
                shutdown.clone(),
                |l, tcp, stop| async move { outbound::serve_one(&l, tcp, &stop).await },
            ));
        }
    }
}

/// What every connection of one `[[tcp_inbound]]` or `[[tcp_outbound]]` listener shares: its
/// configuration `C`, its index in the configuration, the sidecar's state and its metrics.
struct Listener<C> {
    index: usize,
    cfg: C,
    state: Arc<State>,
    metrics: ListenerMetrics,
}

impl<C: ListenerConfig> Listener<C> {
    fn new(index: usize, cfg: C, state: &Arc<State>, metrics: &TcpMetrics) -> Arc<Self> {
        Arc::new(Self {
            index,
            metrics: metrics.listener(cfg.name()),
            cfg,
            state: state.clone(),
        })
    }
}

/// A TCP listener's configuration as the accept loop needs it.
trait ListenerConfig: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn max_connections(&self) -> usize;
}

impl ListenerConfig for config::TcpInboundConfig {
    fn name(&self) -> &str {
        &self.name
    }
    fn max_connections(&self) -> usize {
        self.max_connections
    }
}

impl ListenerConfig for config::TcpOutboundConfig {
    fn name(&self) -> &str {
        &self.name
    }
    fn max_connections(&self) -> usize {
        self.max_connections
    }
}

/// Runs the accept loop of one listener, each connection served by `serve_one`.
async fn listen<C, F, Fut>(
    listener: TcpListener,
    side: &'static str,
    shared: Arc<Listener<C>>,
    shutdown: Shutdown,
    serve_one: F,
) where
    C: ListenerConfig,
    F: Fn(Arc<Listener<C>>, tokio::net::TcpStream, Shutdown) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (name, max) = (shared.cfg.name().to_owned(), shared.cfg.max_connections());
    let active = shared.metrics.active.clone();
    let serve = move |tcp, stop| serve_one(shared.clone(), tcp, stop);
    accept_loop(listener, side, name, max, active, shutdown, serve).await;
}

/// Accepts on `listener` until shutdown starts: at most `max` connections open, one task per
/// connection in the drain tracker, counted in `active`, each served by `serve`.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    side: &'static str,
    name: String,
    max: usize,
    active: prometheus::IntGauge,
    shutdown: Shutdown,
    serve: F,
) where
    F: Fn(tokio::net::TcpStream, Shutdown) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(tokio::sync::Semaphore::new(max));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = shutdown.token().cancelled() => break,
        };
        let (tcp, peer) = tokio::select! {
            c = listener.accept() => match c {
                Ok(c) => c,
                Err(e) => {
                    warn!(side, listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.token().cancelled() => break,
        };
        let span = tracing::info_span!("tcp", side, listener = %name, %peer);
        let (conn, active) = (serve(tcp, shutdown.clone()), active.clone());
        let task = async move {
            let _permit = permit;
            active.inc();
            conn.await;
            active.dec();
        };
        shutdown
            .tracker()
            .spawn(tracing::Instrument::instrument(task, span));
    }
    tracing::debug!(side, listener = %name, "tcp listener stopped accepting");
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, LoadError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| LoadError::Bind { what, addr, source })
}
