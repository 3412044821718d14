//! `ca serve`: the CA as an HTTPS service (the API is in [`crate::api`]).
//!
//! - TLS 1.3 only, ALPN `h2` and `http/1.1` (hyper's auto server), no session resumption (so a
//!   client certificate is verified on every connection, never restored from a ticket).
//! - Its own certificate is the SVID `spiffe://<td>/gatehouse/ca` (plus `--dns` names), issued by
//!   the CA itself at start with a key that exists only in this process's memory, and re-issued
//!   (new key) after two thirds of its lifetime.
//! - Client certificates are optional; when presented they are verified with webpki against the
//!   bundle and the CRLs, re-read every 5 s and swapped in when they changed (root rotation,
//!   revocation; open connections keep their configuration). `POST /v1/renew` additionally
//!   re-checks, under the CA directory lock, that the serial is not revoked now.
//! - Every CA directory access (locks, files, signatures) runs in `spawn_blocking`: the
//!   directory lock is an flock on a std `File` and never taken on an async worker thread.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rcgen::KeyPair;
use rustls::RootCertStore;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use x509_parser::extensions::GeneralName;

mod metrics;

use crate::admission::{Admission, Caps, Refusal, Sources};
use crate::api::{self, CertResponse, EnrollRequest, ErrorResponse, RenewRequest};
use crate::csr::Credential;
use crate::inventory::{Source, fmt_time};
use crate::k8s::K8sVerifier;
use crate::{Authority, CaError, IssueRequest, SpiffeId, profile};

/// Path of the CA's own SPIFFE ID inside its trust domain.
pub const SERVER_ID_PATH: &str = "/gatehouse/ca";
/// Validity of the CRLs served at `/v1/crl` (re-signed after half of it, or on a revocation).
pub const CRL_TTL: Duration = Duration::from_secs(24 * 3600);
/// Time allowed for a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `--max-connections`: connections held at once, below the usual soft limit of 1,024
/// open files with room for the store's pool and the CA directory's files.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// Default `--max-connections-per-source`: connections from one IP address, a quarter of the
/// default `--max-connections` (the sidecar's inbound keeps the same ratio). A sidecar opens
/// one connection per call (calls are seconds to minutes apart), so this leaves room for a
/// fleet starting at once behind one address.
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 128;
/// How long a source that sent a certificate chain over [`crate::chain_bounds`] waits before
/// each of its next handshakes.
const FAILED_HANDSHAKE_DELAY: Duration = Duration::from_secs(1);
/// How long a connection may wait for a request head: the first one after the handshake and
/// each next one on a keep-alive connection (HTTP/1.1). A silent connection closes after it.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request's body may take to arrive (it is at most [`api::MAX_BODY`] bytes).
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent HTTP/2 streams per connection. Sidecars send one request per connection; the
/// bound keeps the bodies buffered at once to `--max-connections` × 4 × 64 KiB (hyper's
/// default of 200 streams allowed 6 GiB with the default 512 connections).
const MAX_H2_STREAMS: u32 = 4;
/// Longest life of one connection (HTTP/2 included, whose idle streams no header timeout
/// bounds): then it closes gracefully (HTTP/1.1 after the request in flight, HTTP/2 with
/// GOAWAY). Sidecars open one connection per call, so only a client that holds connections
/// open on purpose meets it.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// After a graceful close starts, how long the requests in flight may take before the
/// connection is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// How many connections `ca serve` holds (`--max-connections`, `--max-connections-per-source`).
///
/// Every connection is bounded in time as well: [`HEADER_READ_TIMEOUT`] for each request head,
/// [`CONNECTION_LIFETIME`] in all. So a client that opens connections and sends nothing, or
/// holds them open, cannot take the slots that sidecars need to enroll, renew and fetch the
/// bundle, and one source cannot take them all.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Connections held at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Connections from one IP address; more are closed at once, before a TLS byte is read.
    pub max_connections_per_source: usize,
}

impl ConnLimits {
    /// The per-source admission caps: a source's connections count against its cap whether
    /// they are handshaking or not, and handshakes in progress over all sources are capped at
    /// half of `max_connections`, so unauthenticated connections never hold every slot.
    fn caps(self) -> Caps {
        Caps {
            connections_per_source: self.max_connections_per_source,
            handshakes_per_source: self.max_connections_per_source,
            pending_handshakes: (self.max_connections / 2).max(1),
            failed_handshake_delay: FAILED_HANDSHAKE_DELAY,
        }
    }
}

/// What `ca serve` needs besides the CA directory.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Lifetime of the SVIDs it issues, and of its own serving certificate.
    pub svid_ttl: Duration,
    /// Extra DNS SANs on its serving certificate (for clients that check a host name).
    pub dns: Vec<String>,
    /// Kubernetes service-account tokens accepted for enrollment (`--k8s-jwks`), if any.
    pub k8s: Option<Arc<K8sVerifier>>,
    /// How long a new root is in the published bundle before it signs enrollments, renewals
    /// and the server's own certificate (`--bundle-lead`; [`Authority::with_online_lead`]).
    pub bundle_lead: Duration,
    /// How many connections it holds, in all and per source address.
    pub limits: ConnLimits,
    /// Where to serve `gatehouse_ca_*` metrics (`--metrics-listen`, plain HTTP), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

/// webpki's client verifier (clientAuth, bundle, CRLs), plus enrollment certificates: a chain
/// refused only for its purpose is accepted when it verifies for the enroll-only EKU
/// ([`crate::profile::ENROLL_EKU_OID`]) against the same anchors. The handlers decide what
/// each kind may do (enrollment certificates only enroll; SVIDs only renew).
#[derive(Debug)]
struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Before any path building: a chain of many self-issued CAs would cost webpki ~100 ms.
        crate::chain_bounds::check_chain(end_entity, intermediates)?;
        let err = match self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let purpose = matches!(
            err,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::InvalidPurpose
                    | rustls::CertificateError::InvalidPurposeContext { .. }
            )
        );
        if !purpose {
            return Err(err);
        }
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|_| err.clone())?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.anchors,
            intermediates,
            now,
            // webpki applies the EKU rule to every certificate of the path: `required` would
            // refuse an intermediate without an EKU extension (every `--intermediate` CA), so
            // "if present". The leaf has an EKU (it failed for its purpose), so it must carry
            // the enroll-only OID; the handlers check that again.
            webpki::KeyUsage::required_if_present(crate::profile::ENROLL_EKU_OID),
            None,
            None,
        )
        .map(|_| ClientCertVerified::assertion())
        .map_err(|_| err)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The serving certificate, swapped in place on renewal.
#[derive(Debug)]
struct ServingCert(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|c| Arc::clone(&c))
    }
}

struct CachedCrl {
    pem: Bytes,
    etag: String,
    revoked: usize,
    /// The generations it covers: `ca root rotate`/`retire` change them, and sidecars refuse a
    /// bundle root without a CRL (issue 23).
    roots: Vec<u32>,
    made: Instant,
}

struct State {
    ca: Authority,
    opts: ServeOptions,
    crl: Mutex<Option<CachedCrl>>,
    metrics: Arc<metrics::Metrics>,
}

fn io_err(e: std::io::Error) -> CaError {
    CaError::Io {
        action: "cannot serve on",
        path: "listen address".into(),
        source: e,
    }
}

fn bad_pem(what: &str) -> CaError {
    CaError::Corrupt {
        path: "bundle.pem".into(),
        detail: format!("cannot load {what}"),
    }
}

/// Issues the serving certificate (key generated here, kept in memory) and returns its
/// rustls form and its not-after.
fn serving_cert(
    ca: &Authority,
    opts: &ServeOptions,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, CaError> {
    let id = SpiffeId::parse(&format!("spiffe://{}{SERVER_ID_PATH}", ca.trust_domain())).map_err(
        |source| CaError::InvalidId {
            input: SERVER_ID_PATH.into(),
            source,
        },
    )?;
    let req = IssueRequest {
        spiffe_id: id,
        dns: opts.dns.clone(),
        ttl: opts.svid_ttl,
    };
    let key: KeyPair = ca.key_type().generate()?;
    let svid = ca.issue_for_key(&req, &key, Source::Serve, None)?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(svid.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|_| bad_pem("the serving certificate"))?;
    let key = PrivateKeyDer::from_pem_slice(svid.key_pem.as_bytes())
        .map_err(|_| bad_pem("the serving key"))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|_| bad_pem("the serving key pair"))
}

/// Runs `ca serve` on `listener` until the process ends. `ready` is called once the serving
/// certificate exists and the listener accepts.
///
/// # Errors
/// Issuance errors for the serving certificate (e.g. [`CaError::TtlBeyondCa`] for a
/// `--svid-ttl` beyond the CA's lifetime), unreadable bundle or CRLs.
pub async fn serve(
    ca: Authority,
    opts: ServeOptions,
    listener: TcpListener,
    ready: impl FnOnce(SocketAddr, Option<SocketAddr>),
) -> Result<(), CaError> {
    let ca = ca.with_online_lead(opts.bundle_lead);
    log_pending_root(&ca);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let setup = {
        let (ca, opts, provider) = (ca.clone(), opts.clone(), Arc::clone(&provider));
        tokio::task::spawn_blocking(move || -> Result<_, CaError> {
            let cert = serving_cert(&ca, &opts, &provider)?;
            let bundle = ca.bundle_pem()?;
            let revoked = ca.revoked_serials()?.len();
            let roots = active_generations(&ca)?;
            let crl = ca.crl_pem(CRL_TTL)?;
            Ok((cert, bundle, crl, (revoked, roots)))
        })
        .await
        .map_err(|e| io_err(std::io::Error::other(e)))??
    };
    let (cert, bundle, crl, (revoked, roots)) = setup;
    let resolver = Arc::new(ServingCert(RwLock::new(Arc::new(cert))));
    let crl = Bytes::from(crl);
    let digest = trust_digest(&bundle, &crl);
    let config = tls_config(&bundle, &crl, &provider, resolver.clone())?;
    let acceptor = Arc::new(RwLock::new(tokio_rustls::TlsAcceptor::from(Arc::new(
        config,
    ))));

    tokio::spawn(renew_own_cert(
        ca.clone(),
        opts.clone(),
        Arc::clone(&provider),
        resolver.clone(),
    ));
    let metrics = Arc::new(metrics::Metrics::new().map_err(|e| io_err(std::io::Error::other(e)))?);
    let metrics_addr = match opts.metrics_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr).await.map_err(io_err)?;
            let bound = l.local_addr().map_err(io_err)?;
            let cert = resolver.clone();
            tokio::spawn(metrics::serve(l, Arc::clone(&metrics), move || {
                not_after(&cert)
            }));
            Some(bound)
        }
        None => None,
    };
    let state = Arc::new(State {
        metrics,
        ca,
        opts,
        crl: Mutex::new(Some(CachedCrl {
            etag: etag(&crl),
            pem: crl,
            revoked,
            roots,
            made: Instant::now(),
        })),
    });
    tokio::spawn(refresh_trust(
        Arc::clone(&state),
        provider,
        resolver,
        Arc::clone(&acceptor),
        digest,
    ));
    ready(listener.local_addr().map_err(io_err)?, metrics_addr);
    let limits = state.opts.limits;
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let sources = Arc::new(Sources::new(limits.caps()));
    let mut refusals = RefusalLog::default();
    loop {
        // At the limit, new connections wait in the kernel's accept queue until one closes.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return Ok(()); // never closed
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ca serve: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let admission = match sources.admit(peer.ip()) {
            Ok(a) => a,
            Err(refusal) => {
                // Closed before a TLS byte is read.
                state.metrics.refused(refusal.reason());
                refusals.note(refusal, peer);
                continue;
            }
        };
        let acceptor = match acceptor.read() {
            Ok(a) => a.clone(),
            Err(_) => continue,
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let _slot = slot;
            state.metrics.active.inc();
            serve_connection(Arc::clone(&state), acceptor, admission, tcp, peer).await;
            state.metrics.active.dec();
        });
    }
}

/// One connection: the TLS handshake (after its source's penalty delay) under its timeout,
/// then HTTP under [`HEADER_READ_TIMEOUT`] and [`CONNECTION_LIFETIME`].
async fn serve_connection(
    state: Arc<State>,
    acceptor: tokio_rustls::TlsAcceptor,
    mut admission: Admission,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    admission.penalty().await;
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return admission.handshake_failed(&e),
        Err(_) => return,
    };
    admission.authenticated();
    let client_cert: Option<Arc<CertificateDer<'static>>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| Arc::new(c.clone().into_owned()));
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (state, client_cert) = (Arc::clone(&state), client_cert.clone());
        async move {
            let endpoint = metrics::endpoint(req.uri().path());
            let reply = handle(Arc::clone(&state), peer, client_cert, req).await;
            if let Ok(r) = &reply {
                state.metrics.request(endpoint, r.status());
            }
            reply
        }
    });
    // The protocol is the one ALPN chose, not sniffed from the first bytes: hyper-util's
    // sniffing waits for them with no timeout, so a silent connection would outlive
    // HEADER_READ_TIMEOUT.
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().max_concurrent_streams(MAX_H2_STREAMS);
    let builder = if h2 {
        builder.http2_only()
    } else {
        builder.http1_only()
    };
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = tokio::time::sleep(CONNECTION_LIFETIME) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
        }
    }
}

/// Connections refused at admission, logged at most once per [`REFUSAL_LOG_EVERY`] with the
/// count since the last line, so a flood does not flood the log as well.
#[derive(Default)]
struct RefusalLog {
    last: Option<Instant>,
    since: u64,
}

/// How often [`RefusalLog`] writes a line while connections are being refused.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

impl RefusalLog {
    fn note(&mut self, refusal: Refusal, peer: SocketAddr) {
        self.since += 1;
        if self.last.is_some_and(|t| t.elapsed() < REFUSAL_LOG_EVERY) {
            return;
        }
        let advice = match refusal {
            Refusal::PendingHandshakes => {
                "half of --max-connections are in their TLS handshake: a flood, or raise --max-connections"
            }
            Refusal::SourceConnections | Refusal::SourceHandshakes => {
                "raise --max-connections-per-source if many sidecars share one address"
            }
        };
        eprintln!(
            "ca serve: refused {} connection(s) before the TLS handshake ({}; last from {}); {advice}",
            self.since,
            refusal.reason(),
            peer.ip()
        );
        self.since = 0;
        self.last = Some(Instant::now());
    }
}

/// How often the TLS layer's trust (bundle and CRLs) is compared with the CA directory.
const TRUST_REFRESH: Duration = Duration::from_secs(5);

fn trust_digest(bundle: &str, crl: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(bundle.as_bytes());
    h.update([0]);
    h.update(crl);
    h.finalize().into()
}

/// The TLS 1.3 server configuration: our serving certificate, client certificates optional and
/// verified against `bundle` and `crl` (see [`ClientVerifier`]).
fn tls_config(
    bundle: &str,
    crl: &[u8],
    provider: &Arc<CryptoProvider>,
    resolver: Arc<ServingCert>,
) -> Result<rustls::ServerConfig, CaError> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots
            .add(c.map_err(|_| bad_pem("the bundle"))?)
            .map_err(|_| bad_pem("a root of the bundle"))?;
    }
    let crls: Vec<CertificateRevocationListDer<'static>> =
        CertificateRevocationListDer::pem_slice_iter(crl)
            .collect::<Result<_, _>>()
            .map_err(|_| bad_pem("the CRLs"))?;
    let anchors: Vec<rustls::pki_types::TrustAnchor<'static>> = roots.roots.clone();
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
        .with_crls(crls)
        .allow_unknown_revocation_status()
        .allow_unauthenticated()
        .build()
        .map_err(|e| bad_pem(&format!("the client verifier ({e})")))?;
    let verifier = Arc::new(ClientVerifier {
        inner,
        anchors,
        provider: Arc::clone(provider),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| bad_pem(&format!("TLS 1.3 ({e})")))?
        .with_client_cert_verifier(verifier as Arc<dyn ClientCertVerifier>)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    Ok(config)
}

/// Every [`TRUST_REFRESH`], re-reads the bundle and the (cached) CRLs and, when either changed
/// (`ca root rotate`/`retire`, `ca revoke`), swaps in a TLS configuration built from them: new
/// handshakes use it, open connections keep theirs. A failure keeps the current configuration.
async fn refresh_trust(
    state: Arc<State>,
    provider: Arc<CryptoProvider>,
    resolver: Arc<ServingCert>,
    acceptor: Arc<RwLock<tokio_rustls::TlsAcceptor>>,
    mut digest: [u8; 32],
) {
    loop {
        tokio::time::sleep(TRUST_REFRESH).await;
        let st = Arc::clone(&state);
        let read = tokio::task::spawn_blocking(move || -> Result<_, CaError> {
            let bundle = st.ca.bundle_pem()?;
            let (crl, _) = current_crl(&st)?;
            Ok((bundle, crl))
        })
        .await;
        let (bundle, crl) = match read {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                eprintln!(
                    "ca serve: reading the bundle and CRLs failed: {e}; keeping the current TLS trust"
                );
                continue;
            }
            Err(_) => continue,
        };
        let now = trust_digest(&bundle, &crl);
        if now == digest {
            continue;
        }
        match tls_config(&bundle, &crl, &provider, resolver.clone()) {
            Ok(config) => {
                if let Ok(mut slot) = acceptor.write() {
                    *slot = tokio_rustls::TlsAcceptor::from(Arc::new(config));
                    digest = now;
                    eprintln!("ca serve: TLS trust reloaded (the bundle or the CRLs changed)");
                    log_pending_root(&state.ca);
                }
            }
            Err(e) => eprintln!(
                "ca serve: the new bundle or CRLs are unusable: {e}; keeping the current TLS trust"
            ),
        }
    }
}

/// Says when a root that is in the bundle but still within `--bundle-lead` starts signing.
fn log_pending_root(ca: &Authority) {
    if let Ok(Some((generation, at))) = ca.pending_online_root() {
        let at = fmt_time(at);
        eprintln!(
            "ca serve: root generation {generation} is in the published bundle; enrollments and renewals are signed by an older root until {at} (--bundle-lead), so every sidecar fetches the new bundle first"
        );
    }
}

/// Re-issues the serving certificate (new key) after two thirds of its lifetime; retries every
/// 10 s on failure while the old one is still served.
async fn renew_own_cert(
    ca: Authority,
    opts: ServeOptions,
    provider: Arc<CryptoProvider>,
    resolver: Arc<ServingCert>,
) {
    let mut wait = opts.svid_ttl * 2 / 3;
    loop {
        tokio::time::sleep(wait).await;
        let (ca, opts, provider) = (ca.clone(), opts.clone(), Arc::clone(&provider));
        match tokio::task::spawn_blocking(move || serving_cert(&ca, &opts, &provider)).await {
            Ok(Ok(cert)) => {
                if let Ok(mut slot) = resolver.0.write() {
                    *slot = Arc::new(cert);
                }
                wait = opts_wait(&resolver);
            }
            Ok(Err(e)) => {
                eprintln!(
                    "ca serve: renewing the serving certificate failed: {e}; retrying in 10s"
                );
                wait = Duration::from_secs(10);
            }
            Err(e) => {
                eprintln!("ca serve: renewal task failed: {e}; retrying in 10s");
                wait = Duration::from_secs(10);
            }
        }
    }
}

/// Two thirds of the current serving certificate's remaining lifetime.
fn opts_wait(resolver: &ServingCert) -> Duration {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let left = not_after(resolver)
        .and_then(|end| u64::try_from(end - now).ok())
        .unwrap_or(30);
    Duration::from_secs((left * 2 / 3).max(1))
}

/// The current serving certificate's `not_after`, Unix seconds.
fn not_after(resolver: &ServingCert) -> Option<i64> {
    let cert = resolver.0.read().ok()?.clone();
    let der = cert.end_entity_cert().ok()?;
    let (_, x) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(x.validity().not_after.timestamp())
}

type Reply = Response<Full<Bytes>>;

fn json<T: Serialize>(status: StatusCode, body: &T) -> Reply {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Reply {
    json(
        status,
        &ErrorResponse {
            error: code.into(),
            message: message.into(),
        },
    )
}

/// Maps a library refusal to the API's status, code and advice.
fn refusal(e: &CaError) -> Reply {
    use StatusCode as S;
    let (status, code, advice) = match e {
        CaError::TokenUnknown => (
            S::UNAUTHORIZED,
            "token_unknown",
            "ask the CA operator for a join token (`ca token create --spiffe-id ID`)",
        ),
        CaError::TokenExpired { .. } => (
            S::UNAUTHORIZED,
            "token_expired",
            "ask the CA operator for a new join token (`ca token create --spiffe-id ID --ttl 15m`)",
        ),
        CaError::TokenUsed => (
            S::FORBIDDEN,
            "token_used",
            "join tokens are single use: ask for a new one, or renew with the SVID you already hold (POST /v1/renew)",
        ),
        CaError::MalformedCsr { .. } => (
            S::BAD_REQUEST,
            "bad_csr",
            "send a PKCS#10 request as PEM (`-----BEGIN CERTIFICATE REQUEST-----`) in the `csr` field",
        ),
        CaError::CsrSignature { .. } => (
            S::BAD_REQUEST,
            "bad_csr_signature",
            "sign the CSR with the key it carries",
        ),
        CaError::RenewSameKey => (
            S::BAD_REQUEST,
            "same_key",
            "generate a new key for every renewal and send its CSR",
        ),
        CaError::Revoked { .. } => (
            S::FORBIDDEN,
            "revoked",
            "this certificate was revoked: enroll again with a new bootstrap credential",
        ),
        CaError::Jwt(r @ crate::k8s::JwtRefusal::Unmapped(_)) => {
            (S::FORBIDDEN, r.code(), r.advice())
        }
        CaError::Jwt(r) => (S::UNAUTHORIZED, r.code(), r.advice()),
        CaError::ForeignTrustDomain { .. } => (
            S::FORBIDDEN,
            "foreign_trust_domain",
            "use the CA of that trust domain",
        ),
        // Nothing is issued without its record: the replica refuses until the store is back.
        CaError::StoreUnavailable { .. } => {
            eprintln!("ca serve: {e}");
            return error(
                S::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the CA cannot reach its database, so it issues nothing: retry shortly or another CA replica",
            );
        }
        _ => {
            eprintln!("ca serve: internal error: {e}");
            return error(
                S::INTERNAL_SERVER_ERROR,
                "internal",
                "the CA could not complete the request; see its log and retry",
            );
        }
    };
    error(status, code, format!("{e}: {advice}"))
}

async fn handle(
    state: Arc<State>,
    peer: SocketAddr,
    client_cert: Option<Arc<CertificateDer<'static>>>,
    req: Request<Incoming>,
) -> Result<Reply, Infallible> {
    let path = req.uri().path();
    Ok(match (req.method(), path) {
        (&Method::POST, api::ENROLL_PATH) => match (bearer(&req), state.opts.k8s.is_some()) {
            (Err(r), _) => *r,
            (Ok(Some(_)), false) => error(
                StatusCode::UNAUTHORIZED,
                "k8s_not_configured",
                "this CA does not accept Kubernetes service-account tokens (start `ca serve` with --k8s-jwks and --k8s-issuer); enroll with a join token or an enrollment certificate",
            ),
            (Ok(Some(jwt)), true) => match read_json::<EnrollRequest>(req).await {
                Ok(EnrollRequest { csr, token: None }) => {
                    issue(state, peer, csr, OwnedCredential::Jwt(jwt)).await
                }
                Ok(EnrollRequest { token: Some(_), .. }) => error(
                    StatusCode::BAD_REQUEST,
                    "two_credentials",
                    "send one credential: either the `Authorization: Bearer` service-account token or a join token in `token`",
                ),
                Err(r) => *r,
            },
            (Ok(None), _) => enroll_without_bearer(state, peer, client_cert, req).await,
        },
        (&Method::POST, api::RENEW_PATH) => {
            let Some(cert) = client_cert else {
                return Ok(error(
                    StatusCode::UNAUTHORIZED,
                    "no_client_certificate",
                    "renewal needs the current SVID as the TLS client certificate; without one, enroll again (POST /v1/enroll)",
                ));
            };
            let credential = match svid_credential(&cert) {
                Ok(c) => c,
                Err(r) => return Ok(*r),
            };
            match read_json::<RenewRequest>(req).await {
                Ok(body) => issue(state, peer, body.csr, OwnedCredential::Cert(credential)).await,
                Err(r) => *r,
            }
        }
        (&Method::GET, api::BUNDLE_PATH) => {
            let ca = state.ca.clone();
            match blocking(move || ca.bundle_pem()).await {
                Ok(pem) => {
                    let etag = etag(pem.as_bytes());
                    pem_reply(&req, Bytes::from(pem), &etag)
                }
                Err(e) => refusal(&e),
            }
        }
        (&Method::GET, api::CRL_PATH) => {
            let st = Arc::clone(&state);
            match blocking(move || current_crl(&st)).await {
                Ok((pem, etag)) => pem_reply(&req, pem, &etag),
                Err(e) => refusal(&e),
            }
        }
        (_, api::ENROLL_PATH | api::RENEW_PATH | api::BUNDLE_PATH | api::CRL_PATH) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "enroll and renew are POST, bundle and crl are GET",
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "the API is /v1/enroll, /v1/renew, /v1/bundle and /v1/crl (see ca/README.md)",
        ),
    })
}

/// `POST /v1/enroll` with a join token in the body or an enrollment client certificate.
async fn enroll_without_bearer(
    state: Arc<State>,
    peer: SocketAddr,
    client_cert: Option<Arc<CertificateDer<'static>>>,
    req: Request<Incoming>,
) -> Reply {
    match read_json::<EnrollRequest>(req).await {
        Ok(EnrollRequest {
            csr,
            token: Some(token),
        }) => issue(state, peer, csr, OwnedCredential::Token(token)).await,
        Ok(EnrollRequest { csr, token: None }) => {
            match client_cert.as_deref().map(enrollment_credential) {
                Some(Ok(c)) => issue(state, peer, csr, OwnedCredential::Cert(c)).await,
                Some(Err(r)) => *r,
                None => error(
                    StatusCode::UNAUTHORIZED,
                    "no_credential",
                    "send a join token in `token`, or present an enrollment certificate (`ca enrollment issue`) as the TLS client certificate",
                ),
            }
        }
        Err(r) => *r,
    }
}

/// The token of an `Authorization: Bearer` header, if there is one.
fn bearer(req: &Request<Incoming>) -> Result<Option<String>, Box<Reply>> {
    let Some(v) = req.headers().get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let token = v.to_str().ok().and_then(|v| {
        let (scheme, token) = v.split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
    });
    match token {
        Some(t) => Ok(Some(t)),
        None => Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "jwt_malformed",
            "the Authorization header must be `Bearer <projected service-account token>`",
        ))),
    }
}

/// What the handlers need from a presented (already verified) client certificate.
struct Presented {
    id: SpiffeId,
    serial: String,
    public_key: Vec<u8>,
    enroll_only: bool,
}

fn presented(der: &CertificateDer<'_>) -> Result<Presented, Box<Reply>> {
    let unusable = |why: &str| {
        Box::new(error(
            StatusCode::FORBIDDEN,
            "not_an_svid",
            format!(
                "the client certificate {why}: present the current X.509-SVID (renew) or an enrollment certificate (enroll)"
            ),
        ))
    };
    let (_, x) =
        x509_parser::parse_x509_certificate(der).map_err(|_| unusable("does not parse"))?;
    let now = OffsetDateTime::now_utc().unix_timestamp();
    if x.validity().not_after.timestamp() <= now {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "expired",
            "the client certificate has expired: enroll again with a new bootstrap credential",
        )));
    }
    let uris: Vec<&str> = x
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let [uri] = uris.as_slice() else {
        return Err(unusable("does not carry exactly one URI SAN"));
    };
    let id = SpiffeId::parse(uri).map_err(|_| unusable("has no valid SPIFFE ID"))?;
    let enroll_only = x.extended_key_usage().ok().flatten().is_some_and(|e| {
        !e.value.client_auth
            && e.value
                .other
                .iter()
                .any(|o| o.as_bytes() == profile::ENROLL_EKU_OID)
    });
    Ok(Presented {
        id,
        serial: hex::encode(x.raw_serial()),
        public_key: x.public_key().subject_public_key.data.to_vec(),
        enroll_only,
    })
}

/// The renewal credential: a presented SVID (never an enrollment certificate).
fn svid_credential(der: &CertificateDer<'_>) -> Result<Credential<'static>, Box<Reply>> {
    let p = presented(der)?;
    if p.enroll_only || profile::enrollment_target(&p.id).is_some() {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "enrollment_certificate",
            "an enrollment certificate only enrolls (POST /v1/enroll with {\"csr\"}); renew with the SVID it got you",
        )));
    }
    Ok(Credential::Svid {
        id: p.id,
        serial: p.serial,
        public_key: p.public_key,
    })
}

/// The enrollment credential: a presented enrollment certificate, for the identity it is bound to.
fn enrollment_credential(der: &CertificateDer<'_>) -> Result<Credential<'static>, Box<Reply>> {
    let p = presented(der)?;
    match profile::enrollment_target(&p.id) {
        Some(id) if p.enroll_only => Ok(Credential::EnrollmentCert {
            id,
            serial: p.serial,
        }),
        _ => Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "not_an_enrollment_certificate",
            "enroll with a join token (`token`) or an enrollment certificate from `ca enrollment issue`; an SVID renews (POST /v1/renew)",
        ))),
    }
}

/// A [`Credential`] that owns its token, to move into a blocking task.
enum OwnedCredential {
    Token(String),
    Cert(Credential<'static>),
    /// A service-account JWT, verified in the blocking task (never logged).
    Jwt(String),
}

impl OwnedCredential {
    /// The [`Credential`] it stands for; a JWT is verified here.
    fn credential(&self, state: &State) -> Result<Credential<'_>, CaError> {
        Ok(match self {
            Self::Token(t) => Credential::JoinToken(t),
            Self::Cert(c) => c.clone(),
            Self::Jwt(jwt) => {
                let verifier = state.opts.k8s.as_ref().ok_or_else(|| {
                    crate::k8s::JwtRefusal::Malformed("no --k8s-jwks configured".into())
                })?;
                Credential::K8sServiceAccount {
                    id: verifier.verify(jwt)?,
                }
            }
        })
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Token(_) => "join_token",
            Self::Cert(c) => c.kind(),
            Self::Jwt(_) => "k8s_service_account",
        }
    }
}

/// Signs `csr` in a blocking task with `owned` as the credential, and answers.
async fn issue(state: Arc<State>, peer: SocketAddr, csr: String, owned: OwnedCredential) -> Reply {
    let res = blocking(move || {
        let peer = peer.to_string();
        let kind = owned.kind();
        let signed = owned.credential(&state).and_then(|credential| {
            state
                .ca
                .sign_csr_online(csr.as_bytes(), &credential, state.opts.svid_ttl, &peer)
        });
        match signed {
            Ok(s) => {
                eprintln!(
                    "{}",
                    serde_json::json!({"event": "issued", "spiffe_id": s.spiffe_id.as_str(), "serial": s.serial_hex, "credential": kind, "peer": peer})
                );
                Ok((s, state.ca.bundle_pem()?))
            }
            Err(e) => {
                eprintln!(
                    "{}",
                    serde_json::json!({"event": "refused", "credential": kind, "peer": peer, "error": e.to_string()})
                );
                Err(e)
            }
        }
    })
    .await;
    match res {
        Ok((s, bundle)) => json(
            StatusCode::OK,
            &CertResponse {
                spiffe_id: s.spiffe_id.as_str().to_owned(),
                cert_chain: s.cert_pem,
                bundle,
                not_after: fmt_time(s.not_after),
                serial: s.serial_hex,
            },
        ),
        Err(e) => refusal(&e),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CaError> + Send + 'static,
) -> Result<T, CaError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io_err(std::io::Error::other(e)))?
}

/// Reads a JSON body of at most [`api::MAX_BODY`] bytes.
async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<T, Box<Reply>> {
    let too_large = || {
        Box::new(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request bodies are limited to {} bytes", api::MAX_BODY),
        ))
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > api::MAX_BODY as u64) {
        return Err(too_large());
    }
    let body = Limited::new(req.into_body(), api::MAX_BODY).collect();
    let body = match tokio::time::timeout(BODY_READ_TIMEOUT, body).await {
        Ok(read) => read.map_err(|_| too_large())?.to_bytes(),
        Err(_) => {
            return Err(Box::new(error(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {} s; send it with the request",
                    BODY_READ_TIMEOUT.as_secs()
                ),
            )));
        }
    };
    serde_json::from_slice(&body).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("the body is not the expected JSON ({e}); see ca/README.md for the fields"),
        ))
    })
}

fn etag(bytes: &[u8]) -> String {
    format!("\"{}\"", &hex::encode(Sha256::digest(bytes))[..32])
}

fn pem_reply(req: &Request<Incoming>, pem: Bytes, etag: &str) -> Reply {
    let matches = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut r = if matches {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let mut r = Response::new(Full::new(pem));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/x-pem-file"),
        );
        r
    };
    if let Ok(v) = header::HeaderValue::from_str(etag) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

/// The cached CRLs, re-signed when the number of revocations changed or half their validity
/// passed (signing bumps the CRL number, so it is not done per request).
fn current_crl(state: &State) -> Result<(Bytes, String), CaError> {
    let revoked = state.ca.revoked_serials()?.len();
    let roots = active_generations(&state.ca)?;
    let mut slot = state.crl.lock().map_err(|_| bad_pem("the CRL cache"))?;
    if let Some(c) = slot.as_ref()
        && c.revoked == revoked
        && c.roots == roots
        && c.made.elapsed() < CRL_TTL / 2
    {
        return Ok((c.pem.clone(), c.etag.clone()));
    }
    let pem = Bytes::from(state.ca.crl_pem(CRL_TTL)?);
    let etag = etag(&pem);
    *slot = Some(CachedCrl {
        pem: pem.clone(),
        etag: etag.clone(),
        revoked,
        roots,
        made: Instant::now(),
    });
    Ok((pem, etag))
}

/// The generations (roots) not retired: the issuers the served CRLs must cover. Read before
/// the CRLs are signed, so a root change racing the signature only costs one more signature.
fn active_generations(ca: &Authority) -> Result<Vec<u32>, CaError> {
    let (generations, _) = ca.generations()?;
    Ok(generations
        .iter()
        .filter(|g| !g.retired)
        .map(|g| g.id)
        .collect())
}
