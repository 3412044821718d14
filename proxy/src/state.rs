//! What a running sidecar serves with: the validated [`Config`], the TLS credentials, the
//! compiled policy, the inbound `ServerConfig` and the outbound `ClientConfig`s, bundled in one
//! immutable [`Snapshot`] held in an `ArcSwap`. An inbound connection takes the snapshot's TLS
//! configuration and verifier at accept; each inbound request reads the policy of the
//! *current* snapshot; an outbound pool reads its entry's `ClientConfig` from the current
//! snapshot when it dials (`State` is its [`TlsSource`]) and stops reusing connections opened
//! under an older *trust generation*. A reload builds a whole new snapshot with
//! [`State::build_snapshot`] (the same path as startup) and swaps it in, or keeps the old one
//! (see `crate::reload`).
//!
//! The trust generation changes when what a peer is verified against changes: a swap with a
//! new bundle or CRL (or any swap on SIGHUP), and [`State::recheck_peers`] (a CRL gone stale
//! beyond its grace period with `crl_stale = "refuse"`). A swap that leaves trust alone (a
//! policy edit, a certificate rotation) keeps the inbound `ServerConfig` and its session cache.
//! Outbound connections stay pooled across a policy edit; a new certificate of our own retires
//! them too ([`State::retire_outbound`]: they present the old one).
//!
//! `sidecar check` and `sidecar run` both call [`State::load`], so check validates exactly
//! what run would use, stopping before any socket is bound. Files are read once per build,
//! with [`crate::input::read`], into [`Inputs`]; a snapshot is built from those bytes, so the
//! reloader knows exactly which content is serving.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use gatehouse_policy::path::NormalizeOptions;
use gatehouse_policy::{Policy, TrustDomain};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, ServerConfig};

use crate::config::{Config, InboundConfig};
use crate::error::LoadError;
use crate::identity::Material;
use crate::input::{FileKind, Input, Inputs};
use crate::limits::Limiter;
use crate::outbound::tls_source::{TlsSource, find};
use crate::outbound::{OutboundTls, PreparedOutbound};
use crate::tls::resolver::CertResolver;
use crate::tls::server::server_config;
use crate::tls::verify::SpiffeClientVerifier;
use crate::tls::{CredentialFiles, Credentials};

/// Everything one connection needs, fixed for its life.
#[derive(Debug)]
pub(crate) struct Snapshot {
    /// Our certificate, key, trust bundle and CRLs.
    pub credentials: Credentials,
    /// Our trust domain (from our own certificate); peers must belong to it.
    pub trust_domain: TrustDomain,
    /// The inbound side, when `[inbound]` is configured.
    pub inbound: Option<InboundSnapshot>,
    /// Every `[[outbound]]` entry with its TLS client configuration, in configuration order.
    pub outbound: Vec<PreparedOutbound>,
    /// The TCP listeners' TLS and policies (issue 17: `crate::tcp`).
    pub tcp: crate::tcp::TcpSnapshot,
}

/// The inbound part of a [`Snapshot`].
#[derive(Debug)]
pub(crate) struct InboundSnapshot {
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
    /// The budgets of the policy's `[[limit]]`s, built from this snapshot's `policy`: a reload
    /// that changes the policy file starts new budgets for new requests, one that leaves it
    /// byte for byte alone (a certificate rotation) keeps the running ones. `None` when the
    /// policy has no limits, so a policy without limits costs one branch per request.
    pub limiter: Option<Arc<Limiter>>,
}

/// The running sidecar's shared state.
#[derive(Debug)]
pub(crate) struct State {
    /// The configuration the sidecar started with.
    pub config: Config,
    /// The crypto provider.
    pub provider: Arc<CryptoProvider>,
    /// Our certificate for both TLS roles (swappable).
    pub resolver: Arc<CertResolver>,
    snapshot: ArcSwap<Snapshot>,
    /// Bumped on every swap; live connections watch it to re-check their peer.
    generation: tokio::sync::watch::Sender<u64>,
    /// Bumped when trust changes (see the module docs); outbound connections opened under an
    /// older value are not reused. Stored after the snapshot it belongs to.
    trust_generation: AtomicU64,
}

/// Whether a swapped-in snapshot changes what peers are verified against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trust {
    /// New bundle or CRL (or a SIGHUP): fresh inbound `ServerConfig` (fresh session cache) and
    /// a new trust generation (outbound connections are retired).
    Changed,
    /// Policy or certificate only: the running inbound `ServerConfig` and its sessions carry
    /// over ([`State::keep_server_tls`]); outbound connections stay pooled.
    Kept,
}

impl State {
    /// Reads the watched files, loads credentials and policy and builds the TLS
    /// configuration: everything `run` needs before binding sockets. Also returns the files
    /// as read (what the first snapshot serves).
    ///
    /// # Errors
    /// Every problem found.
    pub(crate) fn load(config: Config) -> Result<(Self, Inputs), Vec<LoadError>> {
        Self::load_with(config, None)
    }

    /// [`State::load`], with the credentials of an online identity taken from `material`
    /// (in memory) instead of files.
    ///
    /// # Errors
    /// Every problem found.
    pub(crate) fn load_with(
        config: Config,
        material: Option<&Material>,
    ) -> Result<(Self, Inputs), Vec<LoadError>> {
        let provider = crate::tls::provider();
        let inputs = with_material(Inputs::read(&watched_paths(&config)), &config, material);
        let (credentials, policy) = load_files(&config, &inputs, &provider)?;
        let resolver = Arc::new(CertResolver::new(credentials.certified.clone()));
        let snapshot = assemble(&config, credentials, policy, &provider, &resolver)?;
        let state = Self {
            config,
            provider,
            resolver,
            snapshot: ArcSwap::from_pointee(snapshot),
            generation: tokio::sync::watch::Sender::new(0),
            trust_generation: AtomicU64::new(0),
        };
        Ok((state, inputs))
    }

    /// Checks `inputs` (files read again by the reloader) and builds a complete new snapshot
    /// from them, exactly as [`State::load`] does at startup; nothing is swapped.
    ///
    /// # Errors
    /// Every problem found.
    pub(crate) fn build_snapshot(&self, inputs: &Inputs) -> Result<Snapshot, Vec<LoadError>> {
        let (credentials, policy) = load_files(&self.config, inputs, &self.provider)?;
        let mut next = assemble(
            &self.config,
            credentials,
            policy,
            &self.provider,
            &self.resolver,
        )?;
        // The same policy bytes: keep the running budgets (a rotation must not refill every
        // bucket or forget requests in flight).
        let current = self.snapshot();
        if let (Some(new), Some(old)) = (next.inbound.as_mut(), current.inbound.as_ref())
            && new.policy_sha256 == old.policy_sha256
        {
            new.limiter.clone_from(&old.limiter);
        }
        Ok(next)
    }

    /// The current snapshot.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Replaces the snapshot: new handshakes present the new certificate, new requests use the
    /// new policy, new outbound connections the new `ClientConfig`s. With [`Trust::Changed`]
    /// new inbound handshakes use the new `ServerConfig` (fresh session cache) and pooled
    /// outbound connections are retired; with [`Trust::Kept`] the running `ServerConfig`
    /// carries over. Then tells live connections ([`State::subscribe`]) so they re-check their
    /// peer.
    pub(crate) fn swap(&self, mut snapshot: Snapshot, trust: Trust) {
        if trust == Trust::Kept {
            self.keep_server_tls(&mut snapshot);
        }
        self.resolver.store(snapshot.credentials.certified.clone());
        self.snapshot.store(Arc::new(snapshot));
        if trust == Trust::Changed {
            self.trust_generation.fetch_add(1, Ordering::Release);
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// Carries the running inbound `ServerConfig` (its verifier and session cache) over to
    /// `next`, for a reload that changed neither the bundle nor the CRL: a policy edit or a
    /// certificate rotation then costs clients no full handshake. The certificate still
    /// changes, because every `ServerConfig` serves through the one shared resolver that
    /// [`State::swap`] updates.
    fn keep_server_tls(&self, next: &mut Snapshot) {
        let current = self.snapshot.load();
        if let (Some(next), Some(current)) = (next.inbound.as_mut(), current.inbound.as_ref()) {
            next.tls = current.tls.clone();
            next.verifier = current.verifier.clone();
        }
        next.tcp.keep_server_tls(&current.tcp); // issue 17
    }

    /// Tells live connections to re-check their peer against the current snapshot without a
    /// swap, and retires pooled outbound connections (the next request verifies its server
    /// again): a CRL went stale beyond its grace period with `crl_stale = "refuse"`.
    pub(crate) fn recheck_peers(&self) {
        self.retire_outbound();
        // Notifies every receiver; the generation (swaps since startup) stays as it is.
        self.generation.send_modify(|_| {});
    }

    /// Retires pooled outbound connections (requests in flight finish on them; the next
    /// request dials with the current snapshot): our own certificate changed, and the
    /// connections still present the previous one.
    pub(crate) fn retire_outbound(&self) {
        self.trust_generation.fetch_add(1, Ordering::Release);
    }

    /// A receiver that changes on every swap (`State::swap`) and on
    /// [`State::recheck_peers`].
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// How many snapshots were swapped in since startup.
    pub(crate) fn generation(&self) -> u64 {
        *self.generation.borrow()
    }
}

/// Outbound pools dial with the current snapshot's configuration for their entry.
impl TlsSource for State {
    fn client_config(&self, upstream: &str) -> Option<Arc<ClientConfig>> {
        find(&self.snapshot.load().outbound, upstream)
    }

    fn trust_generation(&self) -> u64 {
        // Acquire: a pool that sees a new generation then loads the snapshot stored before it.
        self.trust_generation.load(Ordering::Acquire)
    }
}

/// The watched files of `config`, in [`crate::input::WATCHED`] order. An online identity
/// has no credential files: its inputs come from memory ([`with_material`]).
pub(crate) fn watched_paths(config: &Config) -> [Option<std::path::PathBuf>; 5] {
    if config.identity.online.is_some() {
        return [
            None,
            None,
            None,
            None,
            config.inbound.as_ref().map(|i| i.policy.clone()),
        ];
    }
    [
        Some(config.identity.cert.clone()),
        Some(config.identity.key.clone()),
        Some(config.identity.bundle.clone()),
        config.identity.crl.clone(),
        config.inbound.as_ref().map(|i| i.policy.clone()),
    ]
}

/// `inputs` with the certificate, key, bundle and CRLs of an online identity taken from
/// `material` (PEM in memory, never on disk), so that startup and every reload build the
/// snapshot from them through the one path files take. Without an online identity (or
/// before the first SVID) `inputs` is returned as it is.
pub(crate) fn with_material(
    mut inputs: Inputs,
    config: &Config,
    material: Option<&Material>,
) -> Inputs {
    let (Some(online), Some(m)) = (&config.identity.online, material) else {
        return inputs;
    };
    let id = &config.identity;
    let memory = |path: &std::path::Path, text: &str| {
        Some(Input::from_memory(
            path.to_path_buf(),
            text.as_bytes().to_vec(),
        ))
    };
    inputs.0[0] = memory(&id.cert, &m.chain_pem);
    inputs.0[1] = memory(&id.key, &m.key_pem());
    inputs.0[2] = memory(&id.bundle, &m.bundle_pem);
    let crls = std::path::PathBuf::from(format!("{} (CRLs)", online.ca_urls()));
    inputs.0[3] = m.crl_pem.as_deref().and_then(|crl| memory(&crls, crl));
    inputs
}

type Files = (Credentials, Option<(Policy, String)>);

fn load_files(
    config: &Config,
    inputs: &Inputs,
    provider: &Arc<CryptoProvider>,
) -> Result<Files, Vec<LoadError>> {
    // Inputs read from `watched_paths(config)` always hold cert, key and bundle.
    let id = &config.identity;
    let get = |kind, path: &std::path::Path| {
        inputs
            .get(kind)
            .cloned()
            .unwrap_or_else(|| Input::read(path, kind))
    };
    let (cert, key, bundle) = (
        get(FileKind::Cert, &id.cert),
        get(FileKind::Key, &id.key),
        get(FileKind::Bundle, &id.bundle),
    );
    let files = CredentialFiles {
        cert: &cert,
        key: &key,
        bundle: &bundle,
        crl: inputs.get(FileKind::Crl),
        crl_policy: id.crl_policy,
    };
    let credentials = Credentials::parse(files, provider)
        .map_err(|es| es.into_iter().map(LoadError::from).collect::<Vec<_>>());
    let policy = match (&config.inbound, inputs.get(FileKind::Policy)) {
        (Some(cfg), Some(file)) => Some(crate::policy_file::load(&cfg.policy, file)).transpose(),
        _ => Ok(None),
    };
    match (credentials, policy) {
        (Ok(c), Ok(p)) => Ok((c, p)),
        (c, p) => {
            let mut errors = c.err().unwrap_or_default();
            errors.extend(p.err().unwrap_or_default());
            Err(errors)
        }
    }
}

fn assemble(
    config: &Config,
    credentials: Credentials,
    policy: Option<(Policy, String)>,
    provider: &Arc<CryptoProvider>,
    resolver: &Arc<CertResolver>,
) -> Result<Snapshot, Vec<LoadError>> {
    let trust_domain = credentials.id.trust_domain();
    let inbound = match (&config.inbound, policy) {
        (Some(cfg), Some((policy, sha))) => Some(
            inbound_snapshot(cfg, config, &credentials, policy, sha, provider, resolver)
                .map_err(|e| vec![e])?,
        ),
        _ => None,
    };
    let tls = OutboundTls {
        cert: resolver.clone(),
        credentials: credentials.clone(),
        min_tls: config.min_tls,
        provider: provider.clone(),
    };
    let outbound = crate::outbound::prepare(&config.outbound, &tls)
        .map_err(|es| es.into_iter().map(LoadError::from).collect::<Vec<_>>())?;
    // `[[tcp_inbound]]` terminates mTLS like `[inbound]`: the same verifier and `ServerConfig`
    // (the inbound's own, or built the same way when there is no `[inbound]`).
    let tcp_server = (!config.tcp.inbound.is_empty()).then(|| match &inbound {
        Some(i) => Ok((i.verifier.clone(), i.tls.clone())),
        None => server_tls(config, &tls.credentials, &trust_domain, provider, resolver),
    });
    let tcp = crate::tcp::TcpSnapshot::build(config, tcp_server, &tls)?; // issue 17
    Ok(Snapshot {
        credentials,
        trust_domain,
        inbound,
        outbound,
        tcp, // issue 17
    })
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
    let (verifier, tls) = server_tls(
        config,
        credentials,
        policy.trust_domain(),
        provider,
        resolver,
    )?;
    let limiter = (!policy.limits().is_empty()).then(|| Arc::new(Limiter::new(&policy)));
    Ok(InboundSnapshot {
        limiter,
        policy,
        policy_sha256,
        normalize: NormalizeOptions {
            allow_matrix_params: cfg.allow_matrix_params,
        },
        verifier,
        tls,
    })
}

/// The inbound client verifier and `ServerConfig` for peers of `td`: the one build path of
/// `[inbound]` and `[[tcp_inbound]]` (issue 17).
pub(crate) fn server_tls(
    config: &Config,
    credentials: &Credentials,
    td: &TrustDomain,
    provider: &Arc<CryptoProvider>,
    resolver: &Arc<CertResolver>,
) -> Result<(Arc<SpiffeClientVerifier>, Arc<ServerConfig>), LoadError> {
    let verifier = Arc::new(
        SpiffeClientVerifier::new(
            credentials.roots.clone(),
            credentials.crls.clone(),
            td.clone(),
            provider.clone(),
        )?
        .with_freshness(credentials.freshness.clone()),
    );
    let tls = server_config(
        provider.clone(),
        config.min_tls,
        verifier.clone(),
        resolver.clone(),
    )?;
    Ok((verifier, Arc::new(tls)))
}
