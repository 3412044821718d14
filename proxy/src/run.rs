//! Loading and running a sidecar: [`load`] is the shared path of `sidecar check` and
//! `sidecar run` (configuration, then the first [`crate::state::Snapshot`] with credentials,
//! policy, inbound and outbound TLS configurations; nothing is bound), [`run`] binds the
//! listeners, starts the [`Reloader`] (file events, polling, SIGHUP), serves until
//! SIGTERM/SIGINT and drains. The outbound pools dial with the current snapshot's TLS
//! configuration ([`crate::outbound::tls_source`]): nothing hands configurations to them.
//!
//! Each bound listener is logged as `listening <name> on <addr>` (port 0 in the configuration
//! picks a free port; the log line and `/status` tell which).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use time::format_description::well_known::Rfc3339;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::accept::{self, Acceptor};
use crate::admin::{Admin, AdminListener};
use crate::config::{Config, InboundConfig};
use crate::error::LoadError;
use crate::identity::{IdentityHandle, IdentityMetrics, Tuning};
use crate::inbound::sources::{Caps, Sources};
use crate::inbound::{Inbound, listener};
use crate::input::Inputs;
use crate::metrics::Metrics;
use crate::outbound::tls_source::TlsSource;
use crate::outbound::{Outbound, OutboundPools};
use crate::reload::Reloader;
use crate::signal::{Shutdown, Terminate};
use crate::state::State;

/// The target of the `listening <name> on <addr>` lines.
pub(crate) const LISTEN_TARGET: &str = "gatehouse::listen";

/// A loaded, validated sidecar, ready to bind.
#[derive(Debug)]
pub struct Loaded {
    /// Shared state (configuration, snapshot, resolver).
    pub(crate) state: Arc<State>,
    /// Metrics registry and families.
    pub(crate) metrics: Metrics,
    /// The watched files as read for the first snapshot (what the reloader compares with).
    pub(crate) inputs: Inputs,
    /// The online identity's driver, when `[identity] ca = …`.
    pub(crate) identity: Option<IdentityHandle>,
}

/// Loads everything `run` needs, without binding: what `sidecar check` runs.
///
/// # Errors
/// Every problem found.
pub fn load(config: Config) -> Result<Loaded, Vec<LoadError>> {
    let (state, inputs) = State::load(config)?;
    let state = Arc::new(state);
    let metrics = Metrics::register().map_err(|e| vec![e.into()])?;
    Ok(Loaded {
        state,
        metrics,
        inputs,
        identity: None,
    })
}

/// `sidecar check` of an online identity (`[identity] ca = …`), without contacting the CA:
/// the configuration is valid (checked by [`Config::load`]), `ca_bundle` and the bootstrap
/// credential's files read and parse, and the policy compiles for the identity's trust
/// domain. Returns the summary. Certificates and outbound TLS are checked at run time, when
/// the first SVID arrives, through the same build path as files.
///
/// # Errors
/// Every problem found.
pub fn check_online(config: &Config) -> Result<String, Vec<LoadError>> {
    let Some(online) = &config.identity.online else {
        return load(config.clone()).map(|l| l.summary());
    };
    let mut errors: Vec<LoadError> = Vec::new();
    if let Err(es) = crate::identity::check_bootstrap(online, &crate::tls::provider()) {
        errors.extend(es.into_iter().map(LoadError::Bootstrap));
    }
    let mut s = String::new();
    let _ = writeln!(s, "identity   {} (online)", online.spiffe_id);
    let _ = writeln!(
        s,
        "enrolls    with {} using {} (not contacted by check); bundle and CRLs every {}",
        online.ca_urls(),
        online.bootstrap.kind(),
        humantime::format_duration(online.ca_poll)
    );
    let _ = writeln!(s, "min TLS    {}", config.min_tls);
    if let Some(i) = &config.inbound {
        let input = crate::input::Input::read(&i.policy, crate::input::FileKind::Policy);
        match crate::policy_file::load(&i.policy, &input) {
            Ok((policy, sha)) => {
                if !online.spiffe_id.is_member_of(policy.trust_domain()) {
                    errors.push(LoadError::TrustDomainMismatch {
                        policy: i.policy.display().to_string(),
                        policy_td: policy.trust_domain().to_string(),
                        cert_td: online.trust_domain().to_string(),
                    });
                }
                let _ = writeln!(s, "inbound    {} -> app {}", i.listen, i.app);
                let _ = writeln!(
                    s,
                    "policy     {} ({} routes, sha256 {sha})",
                    i.policy.display(),
                    policy.route_count()
                );
            }
            Err(es) => errors.extend(es),
        }
    }
    for o in &config.outbound {
        let _ = writeln!(s, "outbound   {} {} -> {}", o.name, o.listen, o.server_id);
    }
    let _ = writeln!(s, "admin      {}", config.admin.listen);
    let _ = writeln!(s, "audit      {}", config.audit.summary());
    if errors.is_empty() {
        Ok(s)
    } else {
        Err(errors)
    }
}

impl Config {
    /// The audit sink `[audit]` asks for (`None` when `enabled = false`) and the one-line
    /// summary of where it writes, for the start-up log.
    ///
    /// # Errors
    /// The audit file cannot be opened for appending.
    pub fn audit_sink(&self) -> Result<(Option<crate::audit::Sink>, String), LoadError> {
        let cfg = &self.audit;
        let sink = crate::audit::Sink::from_config(cfg).map_err(|source| LoadError::AuditFile {
            path: cfg
                .path
                .clone()
                .unwrap_or_else(|| std::path::PathBuf::from("/dev/stdout")),
            source,
        })?;
        Ok((sink, cfg.summary()))
    }
}

impl Loaded {
    /// The audit sink `[audit]` asks for (`None` when `enabled = false`) and the one-line
    /// summary of where it writes, for the start-up log.
    ///
    /// # Errors
    /// The audit file cannot be opened for appending.
    pub fn audit_sink(&self) -> Result<(Option<crate::audit::Sink>, String), LoadError> {
        self.state.config.audit_sink()
    }

    /// The `sidecar check` summary: identity, expiry, listeners, routes.
    pub fn summary(&self) -> String {
        let snap = self.state.snapshot();
        let c = &snap.credentials;
        let cfg = &self.state.config;
        let left = c.not_after - time::OffsetDateTime::now_utc();
        let mut s = String::new();
        let _ = writeln!(s, "identity   {}", c.id);
        let _ = writeln!(
            s,
            "expires    {} (in {}h{:02}m), serial {}",
            c.not_after.format(&Rfc3339).unwrap_or_default(),
            left.whole_hours(),
            left.whole_minutes() % 60,
            c.serial_hex
        );
        let _ = writeln!(s, "min TLS    {}", cfg.min_tls);
        if let Some(path) = &cfg.identity.crl {
            let _ = writeln!(s, "{}", crl_summary(path, c, cfg.identity.crl_policy));
        }
        if let (Some(i), Some(inb)) = (&cfg.inbound, &snap.inbound) {
            let mode = if inb.policy.is_audit_mode() {
                "audit"
            } else {
                "enforce"
            };
            let _ = writeln!(s, "inbound    {} -> app {}", i.listen, i.app);
            let _ = writeln!(
                s,
                "policy     {} ({} routes, mode {mode}, sha256 {})",
                i.policy.display(),
                inb.policy.route_count(),
                inb.policy_sha256
            );
        }
        for o in &snap.outbound {
            let _ = writeln!(s, "{}", o.summary());
        }
        s.push_str(&snap.tcp.summary(&cfg.tcp)); // issue 17
        let _ = writeln!(s, "admin      {}", cfg.admin.listen);
        let _ = writeln!(s, "audit      {}", cfg.audit.summary());
        let _ = writeln!(s, "runtime    {} event loop(s)", cfg.runtime.worker_threads);
        s
    }
}

/// `crl  FILE: N CRL(s), earliest next-update T (stale ...), crl_stale = A after G`.
fn crl_summary(
    path: &std::path::Path,
    c: &crate::tls::Credentials,
    policy: crate::config::CrlPolicy,
) -> String {
    let now = time::OffsetDateTime::now_utc();
    let crls = c.crl_set.crls();
    let next = crls.iter().filter_map(|c| c.next_update).min();
    let state = match next {
        Some(t) if now >= t + policy.grace => " STALE beyond the grace period",
        Some(t) if now >= t => " STALE (within the grace period)",
        _ => "",
    };
    format!(
        "crl        {}: {} CRL(s), earliest next-update {}{state}; crl_stale = {} after {}",
        path.display(),
        crls.len(),
        next.and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_else(|| "none".into()),
        policy.stale.as_str(),
        humantime::format_duration(policy.grace)
    )
}

/// Binds every listener, serves until SIGTERM/SIGINT, then drains for the grace period.
/// Returns the number of connections still open when the grace period ran out.
///
/// # Errors
/// A listener that cannot be bound, or the audit file.
pub async fn run(loaded: Loaded, shutdown: Shutdown) -> Result<usize, LoadError> {
    let (signals, hangup) = install_signals()?;
    serve(loaded, shutdown, signals, hangup, None).await
}

/// Installed before anything is bound: SIGHUP's default action would kill the process.
fn install_signals() -> Result<(Terminate, tokio::signal::unix::Signal), LoadError> {
    let signals = Terminate::install().map_err(LoadError::Signal)?;
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(LoadError::Signal)?;
    Ok((signals, hangup))
}

/// `sidecar run` with an online identity (`[identity] ca = …`): binds the admin listener
/// (`/readyz` 503 until an SVID is held), starts the enrollment driver, waits for the first
/// SVID, builds the first snapshot from it (in memory, through [`State::load_with`]: the same
/// build path as files) and then serves as [`run`] does, the reloader applying every new
/// SVID, bundle or CRL set. Returns 0 when shutdown came before the first SVID. With
/// identity files it is [`load`] then [`run`].
///
/// # Errors
/// A listener that cannot be bound, or the first snapshot does not build.
pub async fn run_online(config: Config, shutdown: Shutdown) -> Result<usize, Vec<LoadError>> {
    let (mut signals, hangup) = install_signals().map_err(|e| vec![e])?;
    let Some(online) = config.identity.online.clone() else {
        // Files: exactly `run`.
        let loaded = load(config)?;
        return serve(loaded, shutdown, signals, hangup, None)
            .await
            .map_err(|e| vec![e]);
    };
    let metrics = Metrics::register().map_err(|e| vec![e.into()])?;
    let identity_metrics =
        IdentityMetrics::register(metrics.registry()).map_err(|e| vec![e.into()])?;
    let admin_listener = AdminListener::new(
        bind("admin", config.admin.listen)
            .await
            .map_err(|e| vec![e])?,
    );
    if let Ok(addr) = admin_listener.local_addr() {
        // Logged again with the other listeners once serving.
        info!(target: LISTEN_TARGET, "listening admin on {addr}");
    }
    info!(
        ca = %online.ca_urls(),
        spiffe_id = %online.spiffe_id,
        credential = online.bootstrap.kind(),
        "online identity: enrolling with the CA (readyz 503 until an SVID is held)"
    );
    let identity = crate::identity::spawn(
        online,
        crate::tls::provider(),
        Some(identity_metrics),
        Tuning::default(),
        shutdown.token().clone(),
    );
    let first = tokio::select! {
        m = crate::admin::until_ready(&admin_listener, &identity, &metrics) => m,
        s = signals.recv() => {
            info!(signal = s, "shutting down before the first SVID");
            None
        }
        () = shutdown.token().cancelled() => None,
    };
    let Some(first) = first else {
        shutdown.begin();
        return Ok(0);
    };
    let (state, inputs) = State::load_with(config, Some(&first))?;
    let loaded = Loaded {
        state: Arc::new(state),
        metrics,
        inputs,
        identity: Some(identity),
    };
    serve(loaded, shutdown, signals, hangup, Some(admin_listener))
        .await
        .map_err(|e| vec![e])
}

async fn serve(
    loaded: Loaded,
    shutdown: Shutdown,
    mut signals: Terminate,
    hangup: tokio::signal::unix::Signal,
    admin_listener: Option<AdminListener>,
) -> Result<usize, LoadError> {
    let Loaded {
        state,
        metrics,
        inputs,
        identity,
    } = loaded;
    let cfg = state.config.clone();
    let snap = state.snapshot();
    let mut bound: Vec<(String, SocketAddr)> = Vec::new();

    let inbound = match &cfg.inbound {
        Some(i) => {
            if i.insecure_app_address && !i.app.ip().is_loopback() {
                warn!(app = %i.app, "DANGEROUS: forwarding plaintext to a non-loopback app address (insecure_app_address = true)");
            }
            let l = bind("inbound", i.listen).await?;
            bound.push(("inbound".into(), l.local_addr().unwrap_or(i.listen)));
            Some((i.clone(), l))
        }
        None => None,
    };
    let out = Outbound::bind(snap.outbound.clone(), &metrics, state.provider.clone()).await?;
    for (o, addr) in cfg.outbound.iter().zip(out.local_addrs()) {
        bound.push((format!("outbound:{}", o.name), addr));
    }
    let tcp = crate::tcp::listen::Tcp::bind(&cfg.tcp, metrics.registry()).await?; // issue 17
    bound.extend(tcp.local_addrs(&cfg.tcp)); // issue 17
    let admin_listener = match admin_listener {
        Some(l) => l,
        None => AdminListener::new(bind("admin", cfg.admin.listen).await?),
    };
    bound.push((
        "admin".into(),
        admin_listener.local_addr().unwrap_or(cfg.admin.listen),
    ));

    let loops = cfg.runtime.worker_threads.max(1);
    // Loop 0 is this thread (with the admin endpoint, the reloader and the accept tasks that
    // spread connections when there is more than one loop); the others are threads with their
    // own current-thread runtime. Each loop owns its pools.
    let (pools, out_listeners) = out.split();
    let upstreams = pools.registry();
    let spread_error = |source| LoadError::Worker { index: 0, source };
    let mut inbound_acceptors = match inbound {
        Some((i, l)) => Some((
            i,
            accept::spread(l, loops, &shutdown).map_err(spread_error)?,
        )),
        None => None,
    };
    let mut outbound_acceptors = Vec::with_capacity(out_listeners.len());
    for l in out_listeners {
        outbound_acceptors.push(accept::spread(l, loops, &shutdown).map_err(spread_error)?);
    }
    let shared = Arc::new(Shared {
        state: state.clone(),
        metrics: metrics.clone(),
        inbound: inbound_acceptors.as_ref().map(|(i, _)| i.clone()),
        sources: cfg
            .inbound
            .as_ref()
            .map(|i| Arc::new(Sources::new(admission_caps(i)))),
        outbound: pools,
    });
    for index in (0..loops).rev() {
        let share = LoopShare {
            inbound: inbound_acceptors.as_mut().and_then(|(_, a)| a.pop()),
            outbound: outbound_acceptors.iter_mut().filter_map(Vec::pop).collect(),
        };
        if index == 0 {
            shared.start(share, &shutdown);
        } else {
            spawn_loop(index, Arc::clone(&shared), share, shutdown.clone())
                .await
                .map_err(|source| {
                    shutdown.begin();
                    LoadError::Worker { index, source }
                })?;
        }
    }
    drop(shared);
    tcp.spawn(&state, &shutdown); // issue 17: TCP listeners on the main event loop

    for (name, addr) in &bound {
        info!(target: LISTEN_TARGET, "listening {name} on {addr}");
    }
    info!(identity = %snap.credentials.id, event_loops = loops, "sidecar ready");
    let mut reloader = Reloader::new(state.clone(), metrics.clone(), inputs);
    if let Some(identity) = &identity {
        reloader = reloader.follow(identity.clone());
    }
    let admin = Arc::new(Admin {
        state: state.clone(),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        listeners: bound,
        reload: reloader.status(),
        identity,
        upstreams,
    });
    tokio::spawn(admin.serve(admin_listener));
    tokio::spawn(reloader.run(hangup, shutdown.clone()));

    let sig = tokio::select! {
        s = signals.recv() => s,
        () = shutdown.token().cancelled() => "shutdown request",
    };
    info!(
        signal = sig,
        grace_s = cfg.shutdown_grace_period.as_secs_f64(),
        "shutting down: readyz 503, no new connections, draining in-flight requests"
    );
    let cut = shutdown.drain(cfg.shutdown_grace_period).await;
    if cut > 0 {
        warn!(
            connections = cut,
            "grace period over: closing connections still open"
        );
    } else {
        info!("drained cleanly");
    }
    // Audit lines still buffered (at most `[audit] flush_interval`'s worth) reach the log.
    crate::audit::flush();
    Ok(cut)
}

/// What every event loop needs to serve the listeners with its own pools.
struct Shared {
    state: Arc<State>,
    metrics: Metrics,
    inbound: Option<InboundConfig>,
    /// Per-source admission of inbound connections, one table for every event loop.
    sources: Option<Arc<Sources>>,
    outbound: OutboundPools,
}

/// One event loop's acceptors: the inbound one and one per `[[outbound]]` entry.
struct LoopShare {
    inbound: Option<Acceptor>,
    outbound: Vec<Acceptor>,
}

impl Shared {
    /// Serves `share` on the calling event loop, with this loop's own app connection pool and
    /// outbound pools (which dial with the current snapshot's TLS configurations).
    fn start(&self, share: LoopShare, shutdown: &Shutdown) {
        if let (Some(cfg), Some(sources), Some(acceptor)) =
            (&self.inbound, &self.sources, share.inbound)
        {
            let inbound = Inbound::new(
                self.state.clone(),
                self.metrics.clone(),
                cfg.clone(),
                sources.clone(),
            );
            tokio::spawn(listener::serve(
                Arc::new(inbound),
                acceptor,
                shutdown.clone(),
            ));
        }
        let tls: Arc<dyn TlsSource> = self.state.clone();
        self.outbound.spawn(share.outbound, &tls, shutdown);
    }
}

/// Starts event loop `index` on its own thread; resolves once it serves its share. The loop
/// runs until shutdown has started and every connection task has finished (the main thread
/// bounds that wait by the grace period, then the process exits).
async fn spawn_loop(
    index: usize,
    shared: Arc<Shared>,
    share: LoopShare,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("gatehouse-loop{index}"))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                shared.start(share, &shutdown);
                drop(shared);
                let _ = tx.send(Ok(()));
                shutdown.token().cancelled().await;
                shutdown.tracker().wait().await;
            });
        })?;
    rx.await
        .unwrap_or_else(|_| Err(std::io::Error::other("the event loop thread exited early")))
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, LoadError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| LoadError::Bind { what, addr, source })
}

/// The admission caps `[inbound]` configures.
fn admission_caps(cfg: &InboundConfig) -> Caps {
    Caps {
        connections_per_source: cfg.max_connections_per_source,
        handshakes_per_source: cfg.max_handshakes_per_source,
        pending_handshakes: cfg.max_pending_handshakes,
        failed_handshake_delay: cfg.failed_handshake_delay,
    }
}
