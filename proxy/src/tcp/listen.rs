//! The TCP listeners at run time: bound at startup ([`Tcp::bind`]), then one accept loop per
//! listener ([`Tcp::spawn`]), at most `max_connections` open, each connection served by
//! [`super::inbound::serve_one`] or [`super::outbound::serve_one`] with the listener's shared
//! parts ([`super::listener::Listener`]).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::warn;

use super::config::TcpConfig;
use super::listener::{Listener, ListenerConfig};
use super::metrics::TcpMetrics;
use super::{inbound, outbound};
use crate::error::LoadError;
use crate::metrics::GaugeGuard;
use crate::signal::Shutdown;
use crate::state::State;

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
        // Counted until the task ends, however it ends.
        let (conn, active) = (serve(tcp, shutdown.clone()), GaugeGuard::new(&active));
        let task = async move {
            let _held = (permit, active);
            conn.await;
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
