//! Loading and running a sidecar: [`load`] is the shared path of `sidecar check` and
//! `sidecar run` (configuration, credentials, policy, TLS configurations, outbound entries;
//! nothing is bound), [`run`] binds the listeners, starts the [`Reloader`] (file events,
//! polling, SIGHUP), serves until SIGTERM/SIGINT and drains.
//!
//! Each bound listener is logged as `listening <name> on <addr>` (port 0 in the configuration
//! picks a free port; the log line and `/status` tell which).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use time::format_description::well_known::Rfc3339;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::admin::Admin;
use crate::config::Config;
use crate::error::LoadError;
use crate::inbound::{Inbound, listener};
use crate::metrics::Metrics;
use crate::outbound::{self, Outbound, OutboundTls, PreparedOutbound};
use crate::reload::Reloader;
use crate::signal::{Shutdown, Terminate};
use crate::state::State;

/// The target of the `listening <name> on <addr>` lines.
pub const LISTEN_TARGET: &str = "gatehouse::listen";

/// A loaded, validated sidecar, ready to bind.
#[derive(Debug)]
pub struct Loaded {
    /// Shared state (configuration, snapshot, resolver).
    pub state: Arc<State>,
    /// Metrics registry and families.
    pub metrics: Metrics,
    /// Outbound entries with their TLS client configurations.
    pub outbound: Vec<PreparedOutbound>,
}

/// Loads everything `run` needs, without binding: what `sidecar check` runs.
///
/// # Errors
/// Every problem found.
pub fn load(config: Config) -> Result<Loaded, Vec<LoadError>> {
    let state = Arc::new(State::load(config)?);
    let metrics = Metrics::register().map_err(|e| vec![e.into()])?;
    let snapshot = state.snapshot();
    let tls = OutboundTls {
        cert: state.resolver.clone(),
        credentials: snapshot.credentials.clone(),
        min_tls: state.config.min_tls,
        provider: state.provider.clone(),
    };
    let outbound = outbound::prepare(&state.config.outbound, &tls)
        .map_err(|es| es.into_iter().map(LoadError::from).collect::<Vec<_>>())?;
    Ok(Loaded {
        state,
        metrics,
        outbound,
    })
}

impl Loaded {
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
        for o in &self.outbound {
            let _ = writeln!(s, "{}", o.summary());
        }
        let _ = writeln!(s, "admin      {}", cfg.admin.listen);
        s
    }
}

/// Binds every listener, serves until SIGTERM/SIGINT, then drains for the grace period.
/// Returns the number of connections still open when the grace period ran out.
///
/// # Errors
/// A listener that cannot be bound, or the audit file.
pub async fn run(loaded: Loaded, shutdown: Shutdown) -> Result<usize, LoadError> {
    let mut signals = Terminate::install().map_err(LoadError::Signal)?;
    // Installed before anything is bound: SIGHUP's default action would kill the process.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(LoadError::Signal)?;
    let Loaded {
        state,
        metrics,
        outbound,
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
            let inbound = Arc::new(Inbound::new(state.clone(), metrics.clone(), i.clone()));
            Some((inbound, l))
        }
        None => None,
    };
    let out = Outbound::bind(outbound, metrics.registry(), state.provider.clone()).await?;
    for (o, addr) in cfg.outbound.iter().zip(out.local_addrs()) {
        bound.push((format!("outbound:{}", o.name), addr));
    }
    let admin_listener = bind("admin", cfg.admin.listen).await?;
    bound.push((
        "admin".into(),
        admin_listener.local_addr().unwrap_or(cfg.admin.listen),
    ));

    for (name, addr) in &bound {
        info!(target: LISTEN_TARGET, "listening {name} on {addr}");
    }
    info!(identity = %snap.credentials.id, "sidecar ready");
    let admin = Arc::new(Admin {
        state: state.clone(),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        listeners: bound,
    });
    tokio::spawn(admin.serve(admin_listener));
    if let Some((inbound, l)) = inbound {
        tokio::spawn(listener::serve(inbound, l, shutdown.clone()));
    }
    let upstreams = out.spawn(&shutdown);
    let reloader = Reloader::new(state.clone(), metrics.clone(), upstreams);
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
    Ok(cut)
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, LoadError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| LoadError::Bind { what, addr, source })
}
