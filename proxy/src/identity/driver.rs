//! The renewal driver: enrolls at start, renews at about 2/3 of each SVID's lifetime (with
//! jitter) over mTLS with the current SVID and a new key, keeps the current SVID while the CA is
//! unreachable (exponential back-off with jitter, capped so that attempts get denser as expiry
//! nears), fetches the bundle and the CRLs every `ca_poll` (ETag, `If-None-Match`), and
//! publishes every new [`Material`] on a `tokio::sync::watch` channel.
//!
//! The wiring feeds [`Material`] into the snapshot build path as in-memory credentials (the PEM
//! texts parse like the files would) and shows [`IdentityHandle::status`] on `/status`.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use gatehouse_ca::api::CertResponse;
use gatehouse_policy::SpiffeId;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::identity::client::{Auth, CaCallError, CaClient, Fetched};
use crate::identity::config::{Bootstrap, OnlineIdentity};
use crate::identity::key::WorkloadKey;

/// Largest bootstrap file read (token, JWT, enrollment certificate or key).
pub const MAX_BOOTSTRAP_FILE: u64 = 64 * 1024;

/// Timing of the driver. [`Tuning::default`] is what the sidecar uses; tests shorten it.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// First retry delay after a failed enrollment or renewal.
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Renewal happens after this fraction of the lifetime left at receipt...
    pub renew_at: f64,
    /// ... plus or minus this fraction (uniform jitter).
    pub renew_jitter: f64,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            renew_at: 2.0 / 3.0,
            renew_jitter: 0.05,
        }
    }
}

/// One complete set of online credentials: our chain and key, the CA's bundle and CRLs.
#[derive(Clone)]
pub struct Material {
    /// Our identity (as the CA issued it; checked equal to `spiffe_id`).
    pub spiffe_id: SpiffeId,
    /// Leaf + intermediates, PEM as the CA sent it.
    pub chain_pem: String,
    /// Leaf + intermediates, DER.
    pub chain: Vec<CertificateDer<'static>>,
    /// Chain and key, checked to match, for rustls.
    pub certified: Arc<CertifiedKey>,
    /// The trust bundle (every root in its overlap), PEM.
    pub bundle_pem: String,
    /// The CRLs (one per issuing CA), PEM; `None` until the first successful fetch.
    pub crl_pem: Option<String>,
    /// Leaf serial, lowercase hex.
    pub serial: String,
    /// Leaf not-after.
    pub not_after: OffsetDateTime,
    key: Arc<PrivateKeyDer<'static>>,
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("crl", &self.crl_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl Material {
    /// The private key (in memory only; never log or write it).
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// The private key as PKCS#8 PEM, for a parse path that takes file contents. Keep it in
    /// memory.
    pub fn key_pem(&self) -> String {
        let der: &[u8] = self.key.secret_der();
        pem_block("PRIVATE KEY", der)
    }

    /// Time left until the leaf expires (zero once expired).
    pub fn expires_in(&self) -> Duration {
        let left = self.not_after - OffsetDateTime::now_utc();
        left.try_into().unwrap_or(Duration::ZERO)
    }

    fn anchors(&self) -> Option<Arc<RootCertStore>> {
        roots_from_pem(self.bundle_pem.as_bytes()).ok()
    }
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use std::fmt::Write as _;
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        let _ = writeln!(out, "{}", String::from_utf8_lossy(line));
    }
    let _ = writeln!(out, "-----END {label}-----");
    out
}

/// What `/status` shows about the online identity.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IdentityStatus {
    /// The CA's URL (the URLs, `, `-separated, with several replicas).
    pub ca: String,
    /// The CA URL that answered last (the one the next call tries first); `None` before.
    pub ca_endpoint: Option<String>,
    /// The bootstrap credential kind.
    pub credential: &'static str,
    /// Serial of the SVID held, if any.
    pub serial: Option<String>,
    /// Its not-after, RFC 3339.
    pub not_after: Option<String>,
    /// Seconds until it expires (computed when read).
    pub expires_in_seconds: Option<i64>,
    /// When the next renewal (or retry) is due, RFC 3339.
    pub next_renewal: Option<String>,
    /// The last failure (enroll, renew, bundle or CRL fetch), cleared by a successful renewal.
    pub last_error: Option<String>,
    /// Successful enrollments and renewals.
    pub renewals: u64,
    /// Failed attempts since the last success.
    pub failures_in_a_row: u32,
}

/// `gatehouse_identity_renewals_total{result}` and `gatehouse_identity_expiry_seconds`.
#[derive(Debug, Clone)]
pub struct IdentityMetrics {
    /// Enrollments and renewals by `result` = `ok` | `error` (CA unreachable or bad answer) |
    /// `refused` (the CA said no).
    pub renewals: IntCounterVec,
    /// Seconds until the held SVID expires (0 before the first one, or once expired).
    pub expiry_seconds: IntGauge,
}

impl IdentityMetrics {
    /// Registers the two families on `registry` (the sidecar's, prefix `gatehouse`).
    ///
    /// # Errors
    /// Registered twice.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let renewals = IntCounterVec::new(
            Opts::new(
                "identity_renewals_total",
                "Enrollments and renewals with the online CA, by result (ok|error|refused)",
            ),
            &["result"],
        )?;
        let expiry_seconds = IntGauge::new(
            "identity_expiry_seconds",
            "Seconds until the SVID held from the online CA expires",
        )?;
        registry.register(Box::new(renewals.clone()))?;
        registry.register(Box::new(expiry_seconds.clone()))?;
        Ok(Self {
            renewals,
            expiry_seconds,
        })
    }
}

/// The running driver: the latest [`Material`] and the status.
#[derive(Debug, Clone)]
pub struct IdentityHandle {
    material: watch::Receiver<Option<Arc<Material>>>,
    status: Arc<Mutex<IdentityStatus>>,
}

impl IdentityHandle {
    /// A receiver of every new [`Material`] (`None` until the first enrollment).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Material>>> {
        self.material.clone()
    }

    /// The material held now.
    pub fn current(&self) -> Option<Arc<Material>> {
        self.material.borrow().clone()
    }

    /// Waits for the first SVID (the sidecar is not ready before). `None` if the driver stopped.
    pub async fn ready(&self) -> Option<Arc<Material>> {
        let mut rx = self.material.clone();
        rx.wait_for(Option::is_some).await.ok()?.clone()
    }

    /// The status, with `expires_in_seconds` as of now.
    pub fn status(&self) -> IdentityStatus {
        let mut s = self.status.lock().map(|s| s.clone()).unwrap_or_default();
        if let Some(m) = self.current() {
            s.expires_in_seconds = Some((m.not_after - OffsetDateTime::now_utc()).whole_seconds());
        }
        s
    }
}

/// Starts the driver on the current runtime. It runs until `cancel` fires.
pub fn spawn(
    cfg: OnlineIdentity,
    provider: Arc<CryptoProvider>,
    metrics: Option<IdentityMetrics>,
    tuning: Tuning,
    cancel: CancellationToken,
) -> IdentityHandle {
    let (tx, rx) = watch::channel(None);
    let status = Arc::new(Mutex::new(IdentityStatus {
        ca: cfg.ca_urls(),
        credential: cfg.bootstrap.kind(),
        ..IdentityStatus::default()
    }));
    let driver = Driver {
        client: CaClient::new(cfg.ca.clone(), cfg.ca_id.clone(), Arc::clone(&provider)),
        cfg,
        provider,
        metrics,
        tuning,
        status: Arc::clone(&status),
        tx,
        bundle_etag: None,
        crl_etag: None,
        failures: 0,
    };
    tokio::spawn(async move {
        tokio::select! {
            () = cancel.cancelled() => {}
            () = driver.run() => {}
        }
    });
    IdentityHandle {
        material: rx,
        status,
    }
}

struct Driver {
    cfg: OnlineIdentity,
    client: CaClient,
    provider: Arc<CryptoProvider>,
    metrics: Option<IdentityMetrics>,
    tuning: Tuning,
    status: Arc<Mutex<IdentityStatus>>,
    tx: watch::Sender<Option<Arc<Material>>>,
    bundle_etag: Option<String>,
    crl_etag: Option<String>,
    failures: u32,
}

/// A failed step, for logs and `/status` (never holds a token or a key).
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Ca(#[from] CaCallError),
    #[error("{0}")]
    Local(String),
}

impl Driver {
    async fn run(mut self) {
        let mut next_attempt = Instant::now();
        let mut next_poll = Instant::now() + self.cfg.ca_poll;
        loop {
            let now = Instant::now();
            if now >= next_attempt {
                next_attempt = match self.renew_or_enroll().await {
                    Ok(material) => {
                        let due = self.renewal_due(&material);
                        self.failures = 0;
                        self.count("ok");
                        let answered = self.client.url().to_owned();
                        self.update_status(|s| {
                            s.ca_endpoint = Some(answered);
                            s.renewals += 1;
                            s.failures_in_a_row = 0;
                            s.last_error = None;
                        });
                        tracing::info!(
                            serial = %material.serial,
                            ca = %self.client.url(),
                            not_after = %material.not_after.format(&Rfc3339).unwrap_or_default(),
                            "identity: SVID received from the CA"
                        );
                        // Status first: whoever sees the new material sees its schedule.
                        self.set_next(due);
                        self.publish(material);
                        next_poll = Instant::now() + self.cfg.ca_poll;
                        due
                    }
                    Err(e) => {
                        self.failures = self.failures.saturating_add(1);
                        self.count(match &e {
                            StepError::Ca(CaCallError::Refused { .. }) => "refused",
                            _ => "error",
                        });
                        let retry = self.backoff();
                        let left = self.current().map(|m| m.expires_in());
                        tracing::warn!(
                            error = %e,
                            retry_in_ms = retry.as_millis() as u64,
                            expires_in_s = left.map(|d| d.as_secs()),
                            "identity: enrollment or renewal failed; keeping the current SVID"
                        );
                        let failures = self.failures;
                        self.update_status(|s| {
                            s.failures_in_a_row = failures;
                            s.last_error = Some(e.to_string());
                        });
                        let at = Instant::now() + retry;
                        self.set_next(at);
                        at
                    }
                };
            }
            if Instant::now() >= next_poll {
                if self.current().is_some() {
                    self.poll().await;
                }
                next_poll = Instant::now() + self.cfg.ca_poll;
            }
            if let (Some(m), Some(metrics)) = (self.current(), &self.metrics) {
                metrics
                    .expiry_seconds
                    .set(i64::try_from(m.expires_in().as_secs()).unwrap_or(i64::MAX));
            }
            let wake = next_attempt.min(next_poll);
            tokio::time::sleep_until(wake.into()).await;
        }
    }

    fn current(&self) -> Option<Arc<Material>> {
        self.tx.borrow().clone()
    }

    fn count(&self, result: &str) {
        if let Some(m) = &self.metrics {
            m.renewals.with_label_values(&[result]).inc();
        }
    }

    fn update_status(&self, f: impl FnOnce(&mut IdentityStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    fn set_next(&self, at: Instant) {
        let wall =
            OffsetDateTime::from(SystemTime::now() + at.saturating_duration_since(Instant::now()));
        self.update_status(|s| s.next_renewal = wall.format(&Rfc3339).ok());
    }

    fn publish(&self, material: Material) {
        let m = Arc::new(material);
        self.update_status(|s| {
            s.serial = Some(m.serial.clone());
            s.not_after = m.not_after.format(&Rfc3339).ok();
        });
        self.tx.send_replace(Some(m));
    }

    /// Uniform in [0, 1) from the provider's random source.
    fn unit_random(&self) -> f64 {
        let mut b = [0u8; 8];
        if self.provider.secure_random.fill(&mut b).is_err() {
            return 0.5;
        }
        (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// When to renew `m`: `renew_at` ± `renew_jitter` of the lifetime left now (the CA
    /// backdates not-before, so the lifetime is measured from receipt).
    fn renewal_due(&self, m: &Material) -> Instant {
        let left = m.expires_in().as_secs_f64();
        let f = self.tuning.renew_at + self.tuning.renew_jitter * (2.0 * self.unit_random() - 1.0);
        Instant::now() + Duration::from_secs_f64((left * f.clamp(0.1, 0.95)).max(0.0))
    }

    /// Full-jitter exponential back-off: up to `backoff_min · 2^(failures-1)`, at most
    /// `backoff_max` and at most a sixth of the time left on the current SVID (never below
    /// `backoff_min`), so a sidecar close to expiry retries often.
    fn backoff(&self) -> Duration {
        let exp = self.failures.saturating_sub(1).min(16);
        let mut cap = self
            .tuning
            .backoff_min
            .saturating_mul(1u32 << exp)
            .min(self.tuning.backoff_max);
        if let Some(m) = self.current() {
            cap = cap.min(m.expires_in() / 6);
        }
        let cap = cap.max(self.tuning.backoff_min);
        let half = cap / 2;
        half + half.mul_f64(self.unit_random())
    }

    fn anchors(&self) -> Result<Arc<RootCertStore>, StepError> {
        if let Some(a) = self.current().and_then(|m| m.anchors()) {
            return Ok(a);
        }
        let pem = read_small(&self.cfg.ca_bundle)?;
        roots_from_pem(&pem).map_err(|e| {
            StepError::Local(format!(
                "{}: {e}; it must hold the PEM roots of the CA (its bundle.pem)",
                self.cfg.ca_bundle.display()
            ))
        })
    }

    async fn renew_or_enroll(&mut self) -> Result<Material, StepError> {
        let anchors = self.anchors()?;
        let key = WorkloadKey::generate()
            .map_err(|e| StepError::Local(format!("generating a key: {e}")))?;
        let csr = key
            .csr_pem()
            .map_err(|e| StepError::Local(format!("making the CSR: {e}")))?;
        // Renew while the SVID is valid; an expired one can only be replaced by enrolling again
        // with the bootstrap credential (a spent join token will be refused: say so).
        let answer = match self.current() {
            Some(m) if m.expires_in() > Duration::from_secs(1) => {
                self.client
                    .renew(anchors.clone(), Arc::clone(&m.certified), csr)
                    .await?
            }
            _ => {
                let auth = bootstrap_auth(&self.cfg.bootstrap, &self.provider).await?;
                self.client.enroll(anchors.clone(), auth, csr).await?
            }
        };
        let mut material = self.accept(answer, key)?;
        // Fetch the CRLs before the first publication, so the sidecar starts with them.
        material.crl_pem = self.current().and_then(|m| m.crl_pem.clone());
        if let Some(a) = material.anchors() {
            match self.client.crl(a, None).await {
                Ok(Fetched::New { pem, etag }) => {
                    material.crl_pem = Some(pem);
                    self.crl_etag = Some(etag);
                }
                Ok(Fetched::NotModified) => {}
                Err(e) => tracing::warn!(error = %e, "identity: fetching the CRLs failed"),
            }
        }
        Ok(material)
    }

    /// Checks the CA's answer and pairs it with our key.
    fn accept(&self, r: CertResponse, key: WorkloadKey) -> Result<Material, StepError> {
        let bad = |what: String| StepError::Local(format!("the CA's answer was refused: {what}"));
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(r.cert_chain.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| bad(format!("cert_chain is not PEM: {e}")))?;
        let Some(leaf) = chain.first() else {
            return Err(bad("cert_chain is empty".into()));
        };
        let id = crate::tls::svid_identity(leaf, &self.cfg.trust_domain()).map_err(|e| {
            bad(format!(
                "the leaf is not an X.509-SVID of our trust domain: {e}"
            ))
        })?;
        if id != self.cfg.spiffe_id {
            return Err(bad(format!(
                "the CA issued `{id}` but [identity] spiffe_id is `{}`; the credential is bound \
                 to `{id}`: fix spiffe_id or use a credential for `{}`",
                self.cfg.spiffe_id, self.cfg.spiffe_id
            )));
        }
        roots_from_pem(r.bundle.as_bytes()).map_err(|e| bad(format!("bundle: {e}")))?;
        let not_after = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map(|(_, c)| c.validity().not_after.to_datetime())
            .map_err(|e| bad(format!("the leaf does not parse: {e}")))?;
        let private = key.private_key_der();
        let certified = CertifiedKey::from_der(chain.clone(), private.clone_key(), &self.provider)
            .map_err(|e| bad(format!("the certificate is not for our key: {e}")))?;
        Ok(Material {
            spiffe_id: id,
            serial: crate::tls::serial_hex(leaf),
            chain_pem: r.cert_chain,
            chain,
            certified: Arc::new(certified),
            bundle_pem: r.bundle,
            crl_pem: None,
            not_after,
            key: Arc::new(private),
        })
    }

    /// Fetches the bundle and the CRLs; publishes when either changed.
    async fn poll(&mut self) {
        let Some(current) = self.current() else {
            return;
        };
        let Some(anchors) = current.anchors() else {
            return;
        };
        let mut next = (*current).clone();
        let mut changed = false;
        match self
            .client
            .bundle(anchors.clone(), self.bundle_etag.as_deref())
            .await
        {
            Ok(Fetched::New { pem, etag }) => {
                self.bundle_etag = Some(etag);
                if roots_from_pem(pem.as_bytes()).is_ok() && pem != next.bundle_pem {
                    next.bundle_pem = pem;
                    changed = true;
                }
            }
            Ok(Fetched::NotModified) => {}
            Err(e) => self.poll_failed("bundle", &e),
        }
        match self.client.crl(anchors, self.crl_etag.as_deref()).await {
            Ok(Fetched::New { pem, etag }) => {
                self.crl_etag = Some(etag);
                if next.crl_pem.as_deref() != Some(pem.as_str()) {
                    next.crl_pem = Some(pem);
                    changed = true;
                }
            }
            Ok(Fetched::NotModified) => {}
            Err(e) => self.poll_failed("crl", &e),
        }
        if changed {
            tracing::info!(serial = %next.serial, "identity: new bundle or CRLs from the CA");
            self.tx.send_replace(Some(Arc::new(next)));
        }
    }

    fn poll_failed(&self, what: &str, e: &CaCallError) {
        tracing::warn!(what, error = %e, "identity: fetching from the CA failed; keeping what we hold");
        let msg = format!("fetching the {what}: {e}");
        self.update_status(|s| s.last_error = Some(msg));
    }
}

/// The enrollment credential, read now (tokens rotate; files are small).
async fn bootstrap_auth(b: &Bootstrap, provider: &CryptoProvider) -> Result<Auth, StepError> {
    let text = |p: &Path, bytes: Vec<u8>| {
        String::from_utf8(bytes)
            .map(|s| s.trim().to_owned())
            .map_err(|_| StepError::Local(format!("{}: not text", p.display())))
    };
    match b {
        Bootstrap::JoinTokenFile(p) => Ok(Auth::Token(text(p, read_async(p).await?)?)),
        Bootstrap::K8sTokenFile(p) => Ok(Auth::Bearer(text(p, read_async(p).await?)?)),
        Bootstrap::EnrollmentCert { cert, key } => {
            let (c, k) = (read_async(cert).await?, read_async(key).await?);
            let ck = enrollment_key(cert, &c, key, &k, provider)?;
            Ok(Auth::ClientCert(Arc::new(ck)))
        }
    }
}

fn enrollment_key(
    cert: &Path,
    cert_pem: &[u8],
    key: &Path,
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, StepError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| StepError::Local(format!("{}: not PEM: {e}", cert.display())))?;
    let key_der = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| StepError::Local(format!("{}: no private key: {e}", key.display())))?;
    CertifiedKey::from_der(chain, key_der, provider).map_err(|e| {
        StepError::Local(format!(
            "{} does not match {}: {e}",
            key.display(),
            cert.display()
        ))
    })
}

/// What `sidecar check` checks of an online identity without contacting the CA: `ca_bundle`
/// holds PEM roots, and the bootstrap credential's files read and parse (a token file is not
/// empty; an enrollment certificate matches its key). Blocking: reads files.
///
/// # Errors
/// Every problem, as a sentence naming the file.
pub fn check_bootstrap(cfg: &OnlineIdentity, provider: &CryptoProvider) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    let mut read = |p: &Path| read_small(p).map_err(|e| errors.push(e.to_string())).ok();
    let bundle = read(&cfg.ca_bundle);
    let files: Vec<(std::path::PathBuf, Option<Vec<u8>>)> = match &cfg.bootstrap {
        Bootstrap::JoinTokenFile(p) | Bootstrap::K8sTokenFile(p) => vec![(p.clone(), read(p))],
        Bootstrap::EnrollmentCert { cert, key } => {
            vec![(cert.clone(), read(cert)), (key.clone(), read(key))]
        }
    };
    if let Some(b) = bundle
        && let Err(e) = roots_from_pem(&b)
    {
        errors.push(format!(
            "{}: {e}; ca_bundle must hold the PEM roots of the CA (its bundle.pem)",
            cfg.ca_bundle.display()
        ));
    }
    match (&cfg.bootstrap, files.as_slice()) {
        (Bootstrap::EnrollmentCert { cert, key }, [(_, Some(c)), (_, Some(k))]) => {
            if let Err(e) = enrollment_key(cert, c, key, k, provider) {
                errors.push(e.to_string());
            }
        }
        (Bootstrap::JoinTokenFile(p) | Bootstrap::K8sTokenFile(p), [(_, Some(t))])
            if t.trim_ascii().is_empty() =>
        {
            errors.push(format!("{}: the file is empty", p.display()));
        }
        _ => {}
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

async fn read_async(p: &Path) -> Result<Vec<u8>, StepError> {
    let owned = p.to_path_buf();
    tokio::task::spawn_blocking(move || read_small(&owned))
        .await
        .map_err(|e| StepError::Local(format!("reading {}: {e}", p.display())))?
}

fn read_small(p: &Path) -> Result<Vec<u8>, StepError> {
    use std::io::Read as _;
    let f = std::fs::File::open(p)
        .map_err(|e| StepError::Local(format!("{}: cannot open: {e}", p.display())))?;
    let mut buf = Vec::new();
    f.take(MAX_BOOTSTRAP_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| StepError::Local(format!("{}: cannot read: {e}", p.display())))?;
    if buf.len() as u64 > MAX_BOOTSTRAP_FILE {
        return Err(StepError::Local(format!(
            "{}: larger than {MAX_BOOTSTRAP_FILE} bytes",
            p.display()
        )));
    }
    Ok(buf)
}

fn roots_from_pem(pem: &[u8]) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem) {
        let c = c.map_err(|e| format!("not PEM: {e}"))?;
        roots
            .add(c)
            .map_err(|e| format!("not a usable root: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no certificate".into());
    }
    Ok(Arc::new(roots))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_pem_round_trips() {
        let key = WorkloadKey::generate().expect("key");
        let der = key.private_key_der();
        let pem = pem_block("PRIVATE KEY", der.secret_der());
        let back = PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("pem");
        assert_eq!(back.secret_der(), der.secret_der());
        for n in [0usize, 1, 2, 3, 47, 48, 49] {
            let bytes: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let pem = pem_block("X", &bytes);
            let inner: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
            assert_eq!(inner.len() % 4, 0, "{n}");
        }
    }
}
