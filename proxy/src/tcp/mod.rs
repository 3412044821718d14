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
//! - [`listen`]: binding the listeners and their accept loops;
//! - `listener`: what every connection of one listener shares (configuration, state, metrics);
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
pub(crate) mod listen;
mod listener;
pub(crate) mod metrics;
pub(crate) mod outbound;
pub(crate) mod pump;

use std::sync::Arc;

use gatehouse_policy::Policy;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};

use crate::config::Config;
use crate::error::LoadError;
use crate::input::{FileKind, Input};
use crate::outbound::OutboundTls;
use crate::tls::verify::SpiffeClientVerifier;
use config::TcpConfig;

/// A client verifier and the TLS server configuration that runs it.
pub(crate) type ServerParts = (Arc<SpiffeClientVerifier>, Arc<ServerConfig>);

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
    /// file, takes `server` (the `[inbound]` TLS server configuration, or one built the same
    /// way; `None` without `[[tcp_inbound]]`), and builds the pinned client configuration of
    /// each `[[tcp_outbound]]`.
    ///
    /// # Errors
    /// Every problem found.
    pub(crate) fn build(
        config: &Config,
        server: Option<Result<ServerParts, LoadError>>,
        tls: &OutboundTls,
    ) -> Result<Self, Vec<LoadError>> {
        let tcp = &config.tcp;
        let mut errors = Vec::new();
        let creds = &tls.credentials;
        let server = match server {
            Some(Ok((verifier, tls))) => Some(ServerTls { verifier, tls }),
            Some(Err(e)) => {
                errors.push(e);
                None
            }
            None => None,
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
    let (policy, sha256) = crate::policy_file::load(&t.policy, &file)?;
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
