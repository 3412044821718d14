//! What a running sidecar serves with: the validated [`Config`], the TLS credentials, the
//! compiled policy and the inbound `ServerConfig`, bundled in one immutable [`Snapshot`] held
//! in an `ArcSwap`. A connection loads the snapshot once at accept and keeps it for its life;
//! a reload builds a whole new snapshot and swaps it in (or keeps the old one).
//!
//! `sidecar check` and `sidecar run` both call [`State::load`], so check validates exactly
//! what run would use, stopping before any socket is bound.

use std::sync::Arc;

use arc_swap::ArcSwap;
use gatehouse_policy::path::NormalizeOptions;
use gatehouse_policy::{Policy, SourceFile, TrustDomain};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use sha2::{Digest, Sha256};

use crate::config::{Config, InboundConfig};
use crate::error::LoadError;
use crate::tls::resolver::CertResolver;
use crate::tls::server::server_config;
use crate::tls::verify::SpiffeClientVerifier;
use crate::tls::{CredentialPaths, Credentials};

/// Everything one connection needs, fixed for its life.
#[derive(Debug)]
pub struct Snapshot {
    /// Our certificate, key, trust bundle and CRLs.
    pub credentials: Credentials,
    /// Our trust domain (from our own certificate); peers must belong to it.
    pub trust_domain: TrustDomain,
    /// The inbound side, when `[inbound]` is configured.
    pub inbound: Option<InboundSnapshot>,
}

/// The inbound part of a [`Snapshot`].
#[derive(Debug)]
pub struct InboundSnapshot {
    /// The compiled policy.
    pub policy: Policy,
    /// SHA-256 of the policy file as read, lowercase hex.
    pub policy_sha256: String,
    /// Path normalization options.
    pub normalize: NormalizeOptions,
    /// The client verifier (also used after resumed handshakes).
    pub verifier: Arc<SpiffeClientVerifier>,
    /// The TLS server configuration.
    pub tls: Arc<ServerConfig>,
}

/// The running sidecar's shared state.
#[derive(Debug)]
pub struct State {
    /// The configuration the sidecar started with.
    pub config: Config,
    /// The crypto provider.
    pub provider: Arc<CryptoProvider>,
    /// Our certificate for both TLS roles (swappable).
    pub resolver: Arc<CertResolver>,
    snapshot: ArcSwap<Snapshot>,
}

impl State {
    /// Loads credentials and policy and builds the TLS configuration: everything `run` needs
    /// before binding sockets.
    ///
    /// # Errors
    /// Every problem found.
    pub fn load(config: Config) -> Result<Self, Vec<LoadError>> {
        let provider = crate::tls::provider();
        let paths = CredentialPaths {
            cert: &config.identity.cert,
            key: &config.identity.key,
            bundle: &config.identity.bundle,
            crl: config.identity.crl.as_deref(),
        };
        let credentials = Credentials::load(paths, &provider)
            .map_err(|es| es.into_iter().map(LoadError::from).collect::<Vec<_>>());
        let policy = config.inbound.as_ref().map(load_policy).transpose();
        let (credentials, policy) = match (credentials, policy) {
            (Ok(c), Ok(p)) => (c, p),
            (c, p) => {
                let mut errors = c.err().unwrap_or_default();
                errors.extend(p.err().unwrap_or_default());
                return Err(errors);
            }
        };
        let resolver = Arc::new(CertResolver::new(credentials.certified.clone()));
        let trust_domain = credentials.id.trust_domain();
        let inbound = match (&config.inbound, policy) {
            (Some(cfg), Some((policy, sha))) => Some(
                inbound_snapshot(
                    cfg,
                    &config,
                    &credentials,
                    policy,
                    sha,
                    &provider,
                    &resolver,
                )
                .map_err(|e| vec![e])?,
            ),
            _ => None,
        };
        let snapshot = Snapshot {
            credentials,
            trust_domain,
            inbound,
        };
        Ok(Self {
            config,
            provider,
            resolver,
            snapshot: ArcSwap::from_pointee(snapshot),
        })
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Replaces the snapshot; connections that already hold the old one keep it.
    pub fn swap(&self, snapshot: Snapshot) {
        self.resolver.store(snapshot.credentials.certified.clone());
        self.snapshot.store(Arc::new(snapshot));
    }
}

fn load_policy(cfg: &InboundConfig) -> Result<(Policy, String), Vec<LoadError>> {
    let src = SourceFile::read(&cfg.policy).map_err(|d| vec![LoadError::Policy(d)])?;
    let sha = hex::encode(Sha256::digest(src.text().as_bytes()));
    let policy = Policy::compile(&src)
        .map_err(|ds| ds.into_iter().map(LoadError::Policy).collect::<Vec<_>>())?;
    Ok((policy, sha))
}

fn inbound_snapshot(
    cfg: &InboundConfig,
    config: &Config,
    credentials: &Credentials,
    policy: Policy,
    policy_sha256: String,
    provider: &Arc<CryptoProvider>,
    resolver: &Arc<CertResolver>,
) -> Result<InboundSnapshot, LoadError> {
    if !credentials.id.is_member_of(policy.trust_domain()) {
        return Err(LoadError::TrustDomainMismatch {
            policy: cfg.policy.display().to_string(),
            policy_td: policy.trust_domain().to_string(),
            cert_td: credentials.id.trust_domain_str().to_owned(),
        });
    }
    let verifier = Arc::new(SpiffeClientVerifier::new(
        credentials.roots.clone(),
        credentials.crls.clone(),
        policy.trust_domain().clone(),
        provider.clone(),
    )?);
    let tls = server_config(
        provider.clone(),
        config.min_tls,
        verifier.clone(),
        resolver.clone(),
    )?;
    Ok(InboundSnapshot {
        policy,
        policy_sha256,
        normalize: NormalizeOptions {
            allow_matrix_params: cfg.allow_matrix_params,
        },
        verifier,
        tls: Arc::new(tls),
    })
}
