//! Outbound: the local app calls a plaintext listener on loopback, the sidecar originates mTLS
//! to the peer sidecar with its own certificate and pins the peer's SPIFFE ID.
//!
//! The same shape as [`crate::inbound`], one request top-down:
//! - [`listener`]: the plaintext accept loop (the shared limiter);
//! - `conn`: one app connection (`Conn`): HTTP/1.1 or h2c with prior knowledge, header-read
//!   timeout, graceful drain;
//! - `request`: per request: request id, framing, hop-by-hop headers, the upstream, the
//!   [`crate::outcome::Outcome`] counted and written to the audit log;
//! - [`upstream`]: the per-upstream mTLS connection pool (h2 multiplexing or the shared
//!   HTTP/1.1 keep-alive pool, bounded, idle timeout, maximum age, DNS at connect time, safe
//!   retries) to the `connect` target the config parsed ([`crate::config::Target`]);
//! - `websocket`: an `Upgrade: websocket` request tunnelled to the peer as an RFC 8441
//!   extended CONNECT (issue 17);
//! - [`tls_source`]: where a pool takes its TLS client configuration when it dials (the
//!   current snapshot) and the trust generation that retires older connections;
//! - [`error`]: failures and the JSON responses the app gets for them (502/504);
//! - [`metrics`]: the `gatehouse_outbound_*` families.
//!
//! Outbound listeners are unauthenticated plaintext: anything that can reach them speaks with
//! this workload's identity. The configuration refuses a non-loopback `listen` unless
//! `allow_non_loopback_listen = true`, and [`Outbound::bind`] logs a warning when it is set.

mod conn;
pub(crate) mod error;
pub(crate) mod listener;
pub(crate) mod metrics;
mod pool;
mod request;
#[cfg(test)]
mod tests;
pub(crate) mod tls_source;
pub(crate) mod upstream;
mod websocket;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use gatehouse_policy::{IdentityPattern, SpiffeId};
use rustls::ClientConfig;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::accept::Acceptor;
use crate::config::{MinTls, OutboundConfig};
use crate::metrics::Metrics;
use crate::signal::Shutdown;
use crate::tls::Credentials;
use crate::tls::client::{ServerIdentityVerifier, client_config};
use listener::OutboundListener;
use metrics::OutboundMetrics;
#[cfg(test)]
use tls_source::FixedTls;
use tls_source::TlsSource;
use upstream::Upstream;

/// Why the outbound side could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboundSetupError {
    /// The SNI (the `sni` setting or the host of `connect`) is not a DNS name or IP address.
    #[error("outbound `{name}`: `{value}` cannot be sent as SNI (not a DNS name or IP address)")]
    ServerName {
        /// The outbound entry.
        name: String,
        /// The offending value.
        value: String,
    },
    /// The CRL did not parse or rustls refused the configuration.
    #[error("outbound `{name}`: cannot build the TLS client configuration: {detail}")]
    Tls {
        /// The outbound entry.
        name: String,
        /// The reason.
        detail: String,
    },
    /// The listen address could not be bound.
    #[error("outbound `{name}`: cannot listen on {addr}: {source}")]
    Bind {
        /// The outbound entry.
        name: String,
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The metric families could not be registered.
    #[error("cannot register outbound metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl OutboundSetupError {
    /// The `help:` line.
    pub fn help(&self) -> &'static str {
        match self {
            Self::ServerName { .. } => {
                "set `sni` to the DNS name the peer expects, or use a host name in `connect`"
            }
            Self::Tls { .. } => "check [identity] crl and min_tls",
            Self::Bind { .. } => "pick a free loopback port for this [[outbound]] listen",
            Self::Metrics(_) => "this is a bug: report it",
        }
    }
}

/// The pieces every outbound entry shares.
#[derive(Clone)]
pub(crate) struct OutboundTls {
    /// Our certificate (swappable on reload).
    pub cert: Arc<dyn ResolvesClientCert>,
    /// Trust anchors, CRLs and our own identity (for the trust domain).
    pub credentials: Credentials,
    /// Minimum TLS version.
    pub min_tls: MinTls,
    /// The crypto provider.
    pub provider: Arc<CryptoProvider>,
}

/// A checked outbound entry, ready to bind: what `sidecar check` validates and prints. Every
/// snapshot holds one per entry ([`crate::state::Snapshot::outbound`]).
#[derive(Debug, Clone)]
pub(crate) struct PreparedOutbound {
    config: OutboundConfig,
    server_name: ServerName<'static>,
    tls: Arc<ClientConfig>,
}

impl PreparedOutbound {
    /// Builds the TLS client configuration for `config` (verifier pinned to `server_id`, SNI).
    ///
    /// # Errors
    /// An unusable SNI value, an unparsable CRL, or protocol versions rustls refuses.
    pub(crate) fn new(
        config: &OutboundConfig,
        tls: &OutboundTls,
    ) -> Result<Self, OutboundSetupError> {
        let (server_name, tls) = pinned_client_tls(
            &config.name,
            config.sni.as_deref().unwrap_or(config.target.host()),
            &config.server_id,
            config.protocol.alpn(),
            tls,
        )?;
        Ok(Self {
            config: config.clone(),
            server_name,
            tls,
        })
    }

    /// The TLS client configuration built for this entry; its pool reads it (through a
    /// [`TlsSource`]) when it dials.
    pub(crate) fn tls_config(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.tls)
    }

    /// The entry's name.
    pub(crate) fn name(&self) -> &str {
        &self.config.name
    }

    /// One line for `sidecar check`.
    pub(crate) fn summary(&self) -> String {
        let c = &self.config;
        let sni = match &c.sni {
            Some(sni) => format!(", sni {sni}"),
            None => String::new(),
        };
        let danger = if c.allow_non_loopback_listen {
            " [DANGEROUS: allow_non_loopback_listen]"
        } else {
            ""
        };
        format!(
            "outbound {}: {} -> {}:{} (server must be {}{sni}){danger}",
            c.name,
            c.listen,
            c.target.host(),
            c.target.port(),
            c.server_id
        )
    }
}

/// The TLS client configuration of an outbound hop (`[[outbound]]`, and `[[tcp_outbound]]` with
/// no ALPN): a verifier pinned to `server_id`, the SNI `sni`, our certificate.
///
/// # Errors
/// An unusable SNI value, an unparsable CRL, or protocol versions rustls refuses.
pub(crate) fn pinned_client_tls(
    name: &str,
    sni: &str,
    server_id: &SpiffeId,
    alpn: &[&[u8]],
    tls: &OutboundTls,
) -> Result<(ServerName<'static>, Arc<ClientConfig>), OutboundSetupError> {
    let server_name =
        ServerName::try_from(sni.to_owned()).map_err(|_| OutboundSetupError::ServerName {
            name: name.to_owned(),
            value: sni.to_owned(),
        })?;
    let fail = |e: &dyn std::fmt::Display| OutboundSetupError::Tls {
        name: name.to_owned(),
        detail: e.to_string(),
    };
    let creds = &tls.credentials;
    let verifier = ServerIdentityVerifier::new(
        Arc::clone(&creds.roots),
        &creds.crls,
        creds.id.trust_domain(),
        IdentityPattern::Exact(server_id.clone()),
        Arc::clone(&tls.provider),
    )
    .map_err(|e| fail(&e))?
    .with_freshness(creds.freshness.clone());
    let versions = crate::tls::server::versions(tls.min_tls);
    let client = client_config(
        Arc::clone(&tls.provider),
        versions,
        Arc::new(verifier),
        Arc::clone(&tls.cert),
        alpn,
    )
    .map_err(|e| fail(&e))?;
    Ok((server_name, Arc::new(client)))
}

/// Prepares every `[[outbound]]` entry (the shared load path of `check` and `run`).
///
/// # Errors
/// Every entry that cannot be prepared.
pub(crate) fn prepare(
    entries: &[OutboundConfig],
    tls: &OutboundTls,
) -> Result<Vec<PreparedOutbound>, Vec<OutboundSetupError>> {
    let mut ok = Vec::with_capacity(entries.len());
    let mut errors = Vec::new();
    for entry in entries {
        match PreparedOutbound::new(entry, tls) {
            Ok(p) => ok.push(p),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(ok)
    } else {
        Err(errors)
    }
}

/// The bound outbound listeners.
#[derive(Debug)]
pub(crate) struct Outbound {
    listeners: Vec<TcpListener>,
    pools: OutboundPools,
}

/// What every event loop needs to serve the outbound listeners with its own connection pools
/// ([`OutboundPools::spawn`] runs once per loop).
#[derive(Debug)]
pub(crate) struct OutboundPools {
    entries: Vec<PreparedOutbound>,
    families: OutboundMetrics,
    provider: Arc<CryptoProvider>,
    registry: Arc<UpstreamRegistry>,
}

/// Every running upstream (each event loop has its own), for `/status`.
#[derive(Debug, Default)]
pub(crate) struct UpstreamRegistry(Mutex<Vec<Weak<Upstream>>>);

impl UpstreamRegistry {
    fn register(&self, upstream: &Arc<Upstream>) {
        let mut all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        all.retain(|u| u.strong_count() > 0);
        all.push(Arc::downgrade(upstream));
    }

    /// `/status` `upstreams`: per `[[outbound]]` name, its endpoints (of every event loop)
    /// with state, outstanding requests and latency average, and `panic`: every endpoint is
    /// ejected, so the balancer uses them all.
    pub(crate) fn status(&self) -> serde_json::Value {
        let all: Vec<_> = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let mut out = serde_json::Map::new();
        for u in &all {
            let status = u.status();
            let entry = out
                .entry(u.name().to_owned())
                .or_insert_with(|| serde_json::json!({ "panic": false, "endpoints": [] }));
            if status.panic {
                entry["panic"] = true.into();
            }
            if let Some(eps) = entry["endpoints"].as_array_mut() {
                eps.extend(
                    status
                        .endpoints
                        .iter()
                        .filter_map(|e| serde_json::to_value(e).ok()),
                );
            }
        }
        out.into()
    }
}

impl Outbound {
    /// Binds every prepared entry; registers `gatehouse_outbound_*` on `metrics`' registry
    /// (handshakes are also counted in `metrics`' `gatehouse_tls_handshakes_total`). Must run
    /// inside a Tokio runtime. No pool exists until [`Outbound::spawn`] or
    /// [`OutboundPools::spawn`].
    ///
    /// # Errors
    /// A listen address that cannot be bound, or metrics registered twice.
    pub(crate) async fn bind(
        prepared: Vec<PreparedOutbound>,
        metrics: &Metrics,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, OutboundSetupError> {
        let families = OutboundMetrics::register(metrics.registry())?.with_tls(metrics);
        let mut listeners = Vec::with_capacity(prepared.len());
        for p in &prepared {
            let c = &p.config;
            if c.allow_non_loopback_listen && !c.listen.ip().is_loopback() {
                warn!(
                    upstream = %c.name,
                    listen = %c.listen,
                    "DANGEROUS: outbound listener on a non-loopback address \
                     (allow_non_loopback_listen = true): anyone who can reach it \
                     makes requests with this workload's identity"
                );
            }
            let tcp =
                TcpListener::bind(c.listen)
                    .await
                    .map_err(|source| OutboundSetupError::Bind {
                        name: c.name.clone(),
                        addr: c.listen,
                        source,
                    })?;
            info!(upstream = %c.name, listen = %c.listen, connect = %format!("{}:{}", c.target.host(), c.target.port()), server_id = %c.server_id, "outbound listener bound");
            listeners.push(tcp);
        }
        Ok(Self {
            listeners,
            pools: OutboundPools {
                entries: prepared,
                families,
                provider,
                registry: Arc::default(),
            },
        })
    }

    /// The bound addresses, in configuration order.
    pub(crate) fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Serves every listener on the calling event loop with the TLS configurations the entries
    /// were prepared with (no reloads); the accept loops stop when `shutdown` starts. The unit
    /// tests' way to run an outbound without a `State`.
    ///
    /// # Panics
    /// If a bound socket cannot report its address (it just did, in `bind`).
    #[cfg(test)]
    pub(crate) fn spawn(self, shutdown: &Shutdown) {
        let (pools, listeners) = self.split();
        let acceptors = listeners
            .into_iter()
            .map(|l| Acceptor::listener(l).expect("a bound listener has an address"))
            .collect();
        let tls: Arc<dyn TlsSource> = Arc::new(FixedTls(pools.entries.clone()));
        pools.spawn(acceptors, &tls, shutdown);
    }

    /// The listeners (configuration order), to be spread over event loops
    /// ([`crate::accept::spread`]), and what each loop needs to serve them.
    pub(crate) fn split(self) -> (OutboundPools, Vec<TcpListener>) {
        (self.pools, self.listeners)
    }
}

impl OutboundPools {
    /// What `/status` reads the upstreams' endpoints from.
    pub(crate) fn registry(&self) -> Arc<UpstreamRegistry> {
        Arc::clone(&self.registry)
    }

    /// Starts, on the calling event loop, a connection pool per entry and an accept loop on
    /// each of `acceptors` (configuration order); they stop when `shutdown` starts. The pools
    /// take their TLS client configuration from `tls` when they dial.
    pub(crate) fn spawn(
        &self,
        acceptors: Vec<Acceptor>,
        tls: &Arc<dyn TlsSource>,
        shutdown: &Shutdown,
    ) {
        for (p, acceptor) in self.entries.iter().zip(acceptors) {
            let c = &p.config;
            let upstream = Upstream::start(
                &c.name,
                c.target.clone(),
                p.server_name.clone(),
                c.protocol,
                Arc::clone(tls),
                c.limits.clone(),
                self.families.upstream(&c.name),
            );
            self.registry.register(&upstream);
            let listener = OutboundListener::new(
                acceptor,
                Arc::clone(&upstream),
                c.server_id.to_string(),
                Arc::clone(&self.provider),
            );
            tokio::spawn(listener.serve(shutdown.clone()));
        }
    }
}
