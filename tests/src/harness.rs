//! The test harness for real-process, real-TLS tests of the sidecar:
//! - [`Pki`]: a `gatehouse-ca` authority in a temp dir, issuing real SVIDs and, through
//!   `Authority::sign_custom`, deliberately broken ones;
//! - [`FakeApp`]: a hyper HTTP/1.1 app on 127.0.0.1:0 that records every request it gets
//!   (method, path, headers, body length) and can answer slowly or with large bodies;
//! - [`Sidecar`]: writes a config, spawns the real `sidecar` binary, waits for `/readyz`,
//!   collects the audit lines from stdout, can send SIGTERM, and kills it on drop;
//! - [`MtlsClient`]: a rustls client with a chosen certificate, speaking HTTP/1.1 or h2;
//! - [`raw_exchange`]: exact request bytes in, one response out (over TLS or plain TCP).
//!
//! Ports: every listener is configured as `127.0.0.1:0`; the sidecar logs `listening <name> on
//! <addr>` to stderr once bound and the harness reads the addresses from there, so parallel
//! tests never race for a port.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use gatehouse_ca::{Authority, InitOptions, IssueRequest, KeyType, SpiffeId, TrustDomain};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How long to wait for a sidecar to become ready (a loaded 2-core CI machine is slow).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The FinTech trust domain of the two-sidecar tests.
pub const FINTECH_TD: &str = "fintech.internal";
/// The monolith's SPIFFE ID (the inbound, server side).
pub const MONOLITH_ID: &str = "spiffe://fintech.internal/monolith";
/// The report service's SPIFFE ID (the outbound, client side).
pub const REPORT_SERVICE_ID: &str = "spiffe://fintech.internal/report-service";
/// The monolith's policy for the report data export: the report service may
/// `GET /api/data/reports`, nothing else is routed.
pub const REPORT_EXPORT_POLICY: &str = r#"
version = 1
trust_domain = "fintech.internal"

[identities]
report-service = "spiffe://fintech.internal/report-service"

[[route]]
name    = "report data export"
methods = ["GET"]
path    = "/api/data/reports"
allow   = ["report-service"]
"#;

/// The path of a workspace binary, `target/debug/<name>`, next to the running test executable.
///
/// # Panics
/// When the binary is missing: run `cargo build --workspace --bins` first.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    // target/debug/deps/<test> → target/debug/<name>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executables live in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// Runs the real `ca ARGS` to completion and returns its stdout.
///
/// # Panics
/// When it cannot be started or exits non-zero (with its stdout and stderr).
pub async fn ca_ok(args: &[&str]) -> String {
    let out = tokio::process::Command::new(binary("ca"))
        .args(args)
        .output()
        .await
        .expect("run ca");
    assert!(
        out.status.success(),
        "ca {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `sidecar VERB --config CONFIG` to completion: `check`, or `run` with a config it refuses.
///
/// # Panics
/// When the binary is missing or cannot be started.
pub fn sidecar_cli(verb: &str, config: &Path) -> std::process::Output {
    Command::new(binary("sidecar"))
        .args([verb, "--config"])
        .arg(config)
        .output()
        .expect("run sidecar")
}

/// Runs `ca ARGS --format json` and returns its JSON output (`null` when it printed none).
///
/// # Panics
/// When `ca` cannot be run or fails.
pub async fn ca_json(args: &[&str]) -> serde_json::Value {
    let out = tokio::process::Command::new(binary("ca"))
        .args(args)
        .args(["--format", "json"])
        .output()
        .await
        .expect("run ca");
    assert!(
        out.status.success(),
        "ca {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// The sidecar's `/status`, parsed.
///
/// # Panics
/// When `/status` does not answer 200 with JSON.
pub async fn sidecar_status(sc: &Sidecar) -> serde_json::Value {
    let (code, body) = sc.admin_get("/status").await.expect("/status");
    assert_eq!(code, StatusCode::OK);
    serde_json::from_str(&body).expect("status JSON")
}

/// Waits (up to 15 s) until the sidecar's `/status` satisfies `ok`.
///
/// # Panics
/// On timeout, with the sidecar's stderr.
pub async fn wait_status(sc: &Sidecar, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    eventually(what, Duration::from_secs(15), async || {
        ok(&sidecar_status(sc).await).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", sc.stderr_text()));
}

/// Polls `check` until it returns `Some`, or fails after `timeout`.
///
/// # Errors
/// `what` with the timeout when `check` never succeeded.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ---- PKI ------------------------------------------------------------------------------------

/// A certificate directory as `ca issue` writes it: `cert.pem`, `key.pem`, `bundle.pem`.
#[derive(Debug, Clone)]
pub struct CertDir {
    /// The directory.
    pub dir: PathBuf,
}

impl CertDir {
    /// `cert.pem` (leaf + chain).
    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    /// `key.pem`.
    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
    /// `bundle.pem`.
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle.pem")
    }
}

/// A CA of our own (gatehouse-ca, in-process) in a fresh temp dir.
pub struct Pki {
    dir: TempDir,
    ca: Authority,
    counter: Mutex<u32>,
}

impl Pki {
    /// A root CA for trust domain `td`.
    ///
    /// # Panics
    /// If the CA cannot be created (a broken test environment).
    pub fn new(td: &str) -> Self {
        Self::build(td, false)
    }

    /// A root + intermediate CA for `td` (leaves signed by the intermediate).
    ///
    /// # Panics
    /// If the CA cannot be created.
    pub fn with_intermediate(td: &str) -> Self {
        Self::build(td, true)
    }

    fn build(td: &str, intermediate: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let opts = InitOptions {
            trust_domain: TrustDomain::parse(td).expect("valid trust domain"),
            key_type: KeyType::EcdsaP256,
            ttl: Duration::from_secs(10 * 24 * 3600),
            intermediate,
        };
        let ca = Authority::init(&dir.path().join("ca"), &opts).expect("ca init");
        Self {
            dir,
            ca,
            counter: Mutex::new(0),
        }
    }

    /// The authority.
    pub fn authority(&self) -> &Authority {
        &self.ca
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        self.ca.trust_domain()
    }

    /// A fresh directory under this PKI's temp dir.
    pub fn fresh_dir(&self, hint: &str) -> PathBuf {
        let mut n = self.counter.lock().expect("counter");
        *n += 1;
        let safe: String = hint
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let p = self.dir.path().join(format!("{n:03}-{safe}"));
        std::fs::create_dir_all(&p).expect("create dir");
        p
    }

    /// Issues an SVID for `id` (DNS SAN `localhost`, so curl and openssl can verify a sidecar
    /// by name) and writes it to a fresh directory.
    ///
    /// # Panics
    /// If issuance fails.
    pub fn issue(&self, id: &str) -> CertDir {
        let req = IssueRequest {
            spiffe_id: SpiffeId::parse(id).expect("valid SPIFFE ID"),
            dns: vec!["localhost".into()],
            ttl: Duration::from_secs(24 * 3600),
        };
        let svid = self.ca.issue(&req).expect("issue");
        let dir = self.fresh_dir(id);
        svid.write_to(&dir).expect("write svid");
        CertDir { dir }
    }

    /// X.509-SVID parameters for `id`, valid from `not_before` to `not_after`, for tests that
    /// then break one rule before [`Pki::sign_custom`].
    ///
    /// # Panics
    /// If the parameters cannot be built.
    pub fn svid_params(
        &self,
        id: &str,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> rcgen::CertificateParams {
        // svid_params builds a parseable SpiffeId; a foreign trust domain is fine here.
        let id = SpiffeId::parse(id).expect("valid SPIFFE ID");
        gatehouse_ca::profile::svid_params(&id, &[], not_before, not_after).expect("params")
    }

    /// Valid-now parameters for `id` (one day).
    pub fn params_now(&self, id: &str) -> rcgen::CertificateParams {
        let now = time::OffsetDateTime::now_utc();
        self.svid_params(id, now, now + time::Duration::days(1))
    }

    /// Signs `params` with this CA (bypassing the SVID profile checks) for a fresh key and
    /// writes the result as a certificate directory.
    ///
    /// # Panics
    /// If signing fails.
    pub fn sign_custom(&self, hint: &str, params: rcgen::CertificateParams) -> CertDir {
        let key = rcgen::KeyPair::generate().expect("key");
        let chain = self.ca.sign_custom(params, &key).expect("sign_custom");
        let dir = self.fresh_dir(hint);
        std::fs::write(dir.join("cert.pem"), chain).expect("write cert");
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("write key");
        std::fs::write(
            dir.join("bundle.pem"),
            self.ca.bundle_pem().expect("bundle"),
        )
        .expect("write bundle");
        CertDir { dir }
    }

    /// Writes the bundle to a fresh file and returns its path.
    pub fn bundle_file(&self) -> PathBuf {
        let p = self.fresh_dir("bundle").join("bundle.pem");
        std::fs::write(&p, self.ca.bundle_pem().expect("bundle")).expect("write bundle");
        p
    }
}

// ---- the fake app ---------------------------------------------------------------------------

/// What the fake app received.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method.
    pub method: Method,
    /// Path and query as received.
    pub path_and_query: String,
    /// Headers as received.
    pub headers: HeaderMap,
    /// Request body length (counted while streaming, never buffered).
    pub body_len: u64,
}

/// A plain HTTP/1.1 app on 127.0.0.1:0 that records every request.
///
/// Behaviour by query parameter: `sleep_ms=N` waits N ms before answering; `download=N`
/// streams an N-byte body; otherwise it reads the request body to the end and answers 200 with
/// `{"method","path","body_len"}`.
pub struct FakeApp {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    open: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// Counts an app connection open until dropped (its `serve_connection` ended: the sidecar
/// closed it, or a write to it failed).
struct OpenGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

type AppBody = Either<Full<Bytes>, Generated>;

impl FakeApp {
    /// Starts the app.
    ///
    /// # Panics
    /// If 127.0.0.1:0 cannot be bound.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let addr = listener.local_addr().expect("app addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let opened = open.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                opened.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let guard = OpenGuard(opened.clone());
                tokio::spawn(async move {
                    let _guard = guard;
                    let svc = hyper::service::service_fn(move |req| app(log.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            seen,
            open,
            task,
        }
    }

    /// Connections from the sidecar that are open now (accepted, not yet closed by the
    /// sidecar or failed on a write).
    pub fn open_connections(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The app's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().expect("log").clone()
    }

    /// How many requests arrived.
    pub fn count(&self) -> usize {
        self.seen.lock().expect("log").len()
    }
}

impl Drop for FakeApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn query_u64(q: Option<&str>, key: &str) -> Option<u64> {
    q?.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

async fn app(
    log: Arc<Mutex<Vec<Seen>>>,
    req: Request<Incoming>,
) -> Result<Response<AppBody>, hyper::Error> {
    let (parts, mut body) = req.into_parts();
    let mut body_len = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            body_len += d.len() as u64;
        }
    }
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.to_string(), ToString::to_string);
    log.lock().expect("log").push(Seen {
        method: parts.method.clone(),
        path_and_query: path_and_query.clone(),
        headers: parts.headers.clone(),
        body_len,
    });
    let q = parts.uri.query();
    if let Some(ms) = query_u64(q, "sleep_ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(n) = query_u64(q, "download") {
        return Ok(Response::new(Either::Right(Generated::new(n))));
    }
    let json = serde_json::json!({
        "method": parts.method.as_str(),
        "path": path_and_query,
        "body_len": body_len,
    });
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from(json.to_string()))));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert("x-app", http::HeaderValue::from_static("fake"));
    if query_u64(q, "hop_header") == Some(1) {
        // A header the response's `Connection` names: the sidecar must not pass it on.
        let h = resp.headers_mut();
        h.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("x-app-hop"),
        );
        h.insert("x-app-hop", http::HeaderValue::from_static("1"));
    }
    Ok(resp)
}

static CHUNK: [u8; 64 * 1024] = [b'g'; 64 * 1024];

/// A body of `n` generated bytes, produced chunk by chunk (never held in memory).
#[derive(Debug)]
pub struct Generated {
    left: u64,
}

impl Generated {
    /// `n` bytes.
    pub fn new(n: u64) -> Self {
        Self { left: n }
    }
}

impl Body for Generated {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(CHUNK.len() as u64);
        self.left -= n;
        #[allow(clippy::cast_possible_truncation)] // n <= 64 KiB
        let chunk = Bytes::from_static(&CHUNK[..n as usize]);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

// ---- the sidecar process ----------------------------------------------------------------------

/// Builds a sidecar configuration and spawns the real binary.
pub struct SidecarBuilder {
    cert: CertDir,
    policy: Option<String>,
    app: Option<SocketAddr>,
    inbound_extra: String,
    top_extra: String,
    extra_sections: String,
    bundle: Option<PathBuf>,
    crl: Option<PathBuf>,
    identity_extra: String,
    work: TempDir,
}

impl SidecarBuilder {
    /// Extra `key = value` lines under `[identity]` (e.g. `crl_stale`, `crl_grace`).
    pub fn identity_option(mut self, lines: &str) -> Self {
        self.identity_extra.push_str(lines);
        self.identity_extra.push('\n');
        self
    }

    /// Trust this bundle file instead of the certificate directory's `bundle.pem` (e.g. the
    /// CA's own `bundle.pem`, which `ca root rotate`/`retire` update in place).
    pub fn bundle(mut self, path: &Path) -> Self {
        self.bundle = Some(path.to_path_buf());
        self
    }

    /// Configure `[identity] crl`.
    pub fn crl(mut self, path: &Path) -> Self {
        self.crl = Some(path.to_path_buf());
        self
    }

    /// The policy file's text (enables `[inbound]`).
    pub fn policy(mut self, text: &str) -> Self {
        self.policy = Some(text.to_owned());
        self
    }

    /// The app the inbound side forwards to.
    pub fn app(mut self, addr: SocketAddr) -> Self {
        self.app = Some(addr);
        self
    }

    /// Extra `key = value` lines under `[inbound]`.
    pub fn inbound_option(mut self, line: &str) -> Self {
        self.inbound_extra.push_str(line);
        self.inbound_extra.push('\n');
        self
    }

    /// Extra top-level `key = value` lines.
    pub fn top_option(mut self, line: &str) -> Self {
        self.top_extra.push_str(line);
        self.top_extra.push('\n');
        self
    }

    /// Extra TOML sections (e.g. `[[outbound]]` entries) appended to the config.
    pub fn section(mut self, text: &str) -> Self {
        self.extra_sections.push_str(text);
        self.extra_sections.push('\n');
        self
    }

    /// The configuration text this builder writes.
    pub fn config_text(&self) -> String {
        let mut s = self.top_extra.clone();
        s.push_str(&format!(
            "[identity]\ncert = {:?}\nkey = {:?}\nbundle = {:?}\n",
            self.cert.cert(),
            self.cert.key(),
            self.bundle.clone().unwrap_or_else(|| self.cert.bundle())
        ));
        if let Some(crl) = &self.crl {
            s.push_str(&format!("crl = {crl:?}\n"));
        }
        s.push_str(&self.identity_extra);
        s.push('\n');
        if let Some(app) = self.app {
            s.push_str(&format!(
                "[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\npolicy = \"policy.toml\"\n{}\n",
                self.inbound_extra
            ));
        }
        s.push_str("[admin]\nlisten = \"127.0.0.1:0\"\n\n");
        s.push_str(&self.extra_sections);
        s
    }

    /// Writes the config (and policy) and returns the config path, without spawning.
    ///
    /// # Panics
    /// On I/O errors.
    pub fn write(&self) -> PathBuf {
        let config = self.work.path().join("sidecar.toml");
        std::fs::write(&config, self.config_text()).expect("write config");
        if let Some(p) = &self.policy {
            std::fs::write(self.work.path().join("policy.toml"), p).expect("write policy");
        }
        config
    }

    /// Spawns `sidecar run` and waits until `/readyz` answers 200.
    ///
    /// # Errors
    /// When the process exits early or does not become ready in [`READY_TIMEOUT`] (the
    /// error carries its stderr).
    pub async fn spawn(self) -> anyhow::Result<Sidecar> {
        let config = self.write();
        let mut child = Command::new(binary("sidecar"))
            .args(["run", "--config"])
            .arg(&config)
            .env(
                "RUST_LOG",
                std::env::var("TMPLOG").unwrap_or("info,gatehouse_proxy=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn sidecar")?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        pump(child.stdout.take().expect("piped"), stdout.clone());
        pump(child.stderr.take().expect("piped"), stderr.clone());
        let mut sidecar = Sidecar {
            child,
            stdout,
            stderr,
            listeners: HashMap::new(),
            work: self.work,
        };
        let listeners = eventually("the sidecar's listening lines", READY_TIMEOUT, async || {
            if let Ok(Some(status)) = sidecar.child.try_wait() {
                return Some(Err(anyhow!(
                    "sidecar exited early ({status}):\n{}",
                    sidecar.stderr_text()
                )));
            }
            let map = sidecar.parse_listeners();
            map.contains_key("admin").then_some(Ok(map))
        })
        .await
        .with_context(|| sidecar.stderr_text())??;
        sidecar.listeners = listeners;
        let admin = sidecar.admin_addr();
        eventually("/readyz 200", READY_TIMEOUT, async || {
            matches!(http_get(admin, "/readyz").await, Ok((StatusCode::OK, _))).then_some(())
        })
        .await
        .with_context(|| sidecar.stderr_text())?;
        Ok(sidecar)
    }
}

fn pump(src: impl std::io::Read + Send + 'static, into: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(src).lines() {
            let Ok(line) = line else { break };
            into.lock().expect("lines").push(line);
        }
    });
}

/// A running `sidecar` process; killed on drop.
pub struct Sidecar {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    listeners: HashMap<String, SocketAddr>,
    work: TempDir,
}

impl Sidecar {
    /// A builder for a sidecar presenting `cert`.
    ///
    /// # Panics
    /// If a temp dir cannot be created.
    pub fn builder(cert: &CertDir) -> SidecarBuilder {
        SidecarBuilder {
            cert: cert.clone(),
            policy: None,
            app: None,
            inbound_extra: String::new(),
            top_extra: String::new(),
            extra_sections: String::new(),
            bundle: None,
            crl: None,
            identity_extra: String::new(),
            work: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// An inbound sidecar for `cert` in front of `app`, enforcing `policy`.
    pub fn inbound(cert: &CertDir, app: SocketAddr, policy: &str) -> SidecarBuilder {
        Self::builder(cert).app(app).policy(policy)
    }

    fn parse_listeners(&self) -> HashMap<String, SocketAddr> {
        let mut map = HashMap::new();
        for line in self.stderr.lock().expect("lines").iter() {
            let Some(rest) = line.split("listening ").nth(1) else {
                continue;
            };
            if let Some((name, addr)) = rest.split_once(" on ")
                && let Ok(addr) = addr.trim().parse()
            {
                map.insert(name.to_owned(), addr);
            }
        }
        map
    }

    /// A bound listener by name (`inbound`, `admin`, `outbound:<name>`).
    ///
    /// # Panics
    /// When there is no such listener.
    pub fn listener(&self, name: &str) -> SocketAddr {
        *self
            .listeners
            .get(name)
            .unwrap_or_else(|| panic!("no listener `{name}` in {:?}", self.listeners))
    }

    /// The inbound mTLS address.
    pub fn inbound_addr(&self) -> SocketAddr {
        self.listener("inbound")
    }

    /// The admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.listener("admin")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The policy file the sidecar was started with (rewrite it to test hot reload).
    pub fn policy_path(&self) -> PathBuf {
        self.work.path().join("policy.toml")
    }

    /// Sends SIGHUP (reload).
    ///
    /// # Panics
    /// If `kill` cannot be run.
    pub fn sighup(&self) {
        self.kill("-HUP");
    }

    /// `kill SIGNAL PID`; panics when it fails.
    fn kill(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(ok.success(), "kill {signal} failed");
    }

    /// Stdout lines so far (the audit log).
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().expect("lines").clone()
    }

    /// Audit lines so far, parsed.
    ///
    /// # Panics
    /// If a stdout line is not JSON (the audit stream must be parseable).
    pub fn audit(&self) -> Vec<serde_json::Value> {
        self.stdout_lines()
            .iter()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("audit line {l:?} is not JSON: {e}"))
            })
            .collect()
    }

    /// Waits until at least `n` audit lines were written.
    ///
    /// # Errors
    /// On timeout.
    pub async fn wait_audit(&self, n: usize) -> anyhow::Result<Vec<serde_json::Value>> {
        eventually("audit lines", Duration::from_secs(10), async || {
            let a = self.audit();
            (a.len() >= n).then_some(a)
        })
        .await
    }

    /// Stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().expect("lines").join("\n")
    }

    /// GET on the admin listener: status and body.
    ///
    /// # Errors
    /// Connection errors.
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<(StatusCode, String)> {
        http_get(self.admin_addr(), path).await
    }

    /// The sum of `metric` samples whose labels contain every `key="value"` in `labels`.
    ///
    /// # Errors
    /// Connection errors.
    pub async fn metric(&self, metric: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        let (_, text) = self.admin_get("/metrics").await?;
        Ok(metric_sum(&text, metric, labels))
    }

    /// `/status` as JSON.
    ///
    /// # Errors
    /// Connection errors, a status other than 200, a body that is not JSON.
    pub async fn status_json(&self) -> anyhow::Result<serde_json::Value> {
        let (code, body) = self.admin_get("/status").await?;
        anyhow::ensure!(code == StatusCode::OK, "/status answered {code}");
        Ok(serde_json::from_str(&body)?)
    }

    /// Waits up to 20 s until `/status` satisfies `ok`.
    ///
    /// # Panics
    /// When it never does, with `what` and the sidecar's stderr.
    pub async fn wait_status(&self, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
        eventually(what, Duration::from_secs(20), async || {
            self.status_json().await.ok().filter(|s| ok(s)).map(|_| ())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.stderr_text()));
    }

    /// Sends SIGTERM.
    ///
    /// # Panics
    /// If `kill` cannot be run.
    pub fn sigterm(&self) {
        self.kill("-TERM");
    }

    /// Waits for the process to exit.
    ///
    /// # Errors
    /// On timeout.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let child = &mut self.child;
        eventually("the sidecar to exit", timeout, async || {
            child.try_wait().ok().flatten()
        })
        .await
    }

    /// Peak resident set size (`VmHWM`) in KiB.
    ///
    /// # Errors
    /// When /proc cannot be read.
    pub fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("no VmHWM in /proc/PID/status"))
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sum of the samples of `metric` whose label set contains all of `labels`.
pub fn metric_sum(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name_labels, value) = l.rsplit_once(' ')?;
            let (name, rest) = match name_labels.split_once('{') {
                Some((n, r)) => (n, r),
                None => (name_labels, ""),
            };
            (name == metric
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

/// A plain HTTP/1.1 GET (admin endpoints): status and body.
///
/// # Errors
/// Connection or protocol errors.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(StatusCode, String)> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

// ---- the mTLS client --------------------------------------------------------------------------

/// HTTP version for [`MtlsClient`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// HTTP/1.1 (ALPN `http/1.1`).
    H1,
    /// HTTP/2 (ALPN `h2`).
    H2,
}

/// A response, body collected.
#[derive(Debug)]
pub struct Resp {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Resp {
    /// The body as JSON.
    ///
    /// # Panics
    /// If it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body {:?} is not JSON: {e}", self.body))
    }
}

/// Presents a fixed certificate without checking that the key matches (rustls'
/// `with_client_auth_cert` would refuse a mismatched pair).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// A rustls client presenting a chosen certificate (or none), verifying the sidecar as
/// `localhost` against a bundle.
#[derive(Clone)]
pub struct MtlsClient {
    base: ClientConfig,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn roots(bundle: &Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(bundle).expect("bundle") {
        roots.add(c.expect("bundle cert")).expect("anchor");
    }
    roots
}

impl MtlsClient {
    /// Presents `cert`'s certificate and key; trusts `cert`'s bundle.
    pub fn new(cert: &CertDir) -> Self {
        Self::with_files(&cert.cert(), &cert.key(), &cert.bundle())
    }

    /// Presents `cert_file` with `key_file` (they need not match); trusts `bundle`.
    ///
    /// # Panics
    /// If a file does not parse.
    pub fn with_files(cert_file: &Path, key_file: &Path, bundle: &Path) -> Self {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
            .expect("cert file")
            .collect::<Result<_, _>>()
            .expect("certs");
        let key = PrivateKeyDer::from_pem_file(key_file).expect("key file");
        let p = provider();
        let signer = p.key_provider.load_private_key(key).expect("key");
        let ck = Arc::new(CertifiedKey::new(chain, signer));
        let base = ClientConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots(bundle))
            .with_client_cert_resolver(Arc::new(Fixed(ck)));
        Self { base }
    }

    /// Presents no certificate; trusts `bundle`.
    pub fn without_cert(bundle: &Path) -> Self {
        let base = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots(bundle))
            .with_no_client_auth();
        Self { base }
    }

    /// Opens a TLS connection negotiating `proto`.
    ///
    /// # Errors
    /// Connection or handshake errors (in TLS 1.3 a refused client certificate only shows on
    /// the first read).
    pub async fn connect(
        &self,
        addr: SocketAddr,
        proto: Proto,
    ) -> anyhow::Result<TlsStream<TcpStream>> {
        self.connect_from(addr, proto, None).await
    }

    /// As [`MtlsClient::connect`], from source address `from` (e.g. `127.0.0.2`) when given.
    ///
    /// # Errors
    /// As [`MtlsClient::connect`].
    pub async fn connect_from(
        &self,
        addr: SocketAddr,
        proto: Proto,
        from: Option<std::net::IpAddr>,
    ) -> anyhow::Result<TlsStream<TcpStream>> {
        let mut cfg = self.base.clone();
        cfg.alpn_protocols = vec![match proto {
            Proto::H1 => b"http/1.1".to_vec(),
            Proto::H2 => b"h2".to_vec(),
        }];
        let tcp = match from {
            None => TcpStream::connect(addr).await?,
            Some(ip) => {
                let socket = if ip.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                socket.bind(SocketAddr::new(ip, 0))?;
                socket.connect(addr).await?
            }
        };
        let name = ServerName::try_from("localhost").expect("valid name");
        Ok(TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await?)
    }

    /// One request on a fresh connection, body collected.
    ///
    /// # Errors
    /// TLS refusal, connection or protocol errors.
    pub async fn request(
        &self,
        addr: SocketAddr,
        proto: Proto,
        req: Request<Full<Bytes>>,
    ) -> anyhow::Result<Resp> {
        let resp = self.send(addr, proto, req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// GET `path` on a fresh connection.
    ///
    /// # Errors
    /// As [`MtlsClient::request`].
    pub async fn get(&self, addr: SocketAddr, proto: Proto, path: &str) -> anyhow::Result<Resp> {
        let req = Request::get(path).body(Full::new(Bytes::new()))?;
        self.request(addr, proto, req).await
    }

    /// One request on a fresh connection; the response body is left streaming.
    ///
    /// # Errors
    /// As [`MtlsClient::request`].
    pub async fn send<B>(
        &self,
        addr: SocketAddr,
        proto: Proto,
        req: Request<B>,
    ) -> anyhow::Result<Response<Incoming>>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let tls = self.connect(addr, proto).await?;
        let io = TokioIo::new(tls);
        let (mut parts, body) = req.into_parts();
        match proto {
            Proto::H1 => {
                let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(conn);
                parts
                    .headers
                    .entry(http::header::HOST)
                    .or_insert(http::HeaderValue::from_static("localhost"));
                Ok(send.send_request(Request::from_parts(parts, body)).await?)
            }
            Proto::H2 => {
                let (mut send, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(conn);
                let pq = parts
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_owned();
                parts.uri = format!("https://localhost:{}{pq}", addr.port()).parse()?;
                Ok(send.send_request(Request::from_parts(parts, body)).await?)
            }
        }
    }
}

// ---- raw HTTP/1.1 -----------------------------------------------------------------------------

/// A response read off the wire by [`raw_exchange`].
#[derive(Debug)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// The status line and header lines as received.
    pub head: String,
    /// The body (`Content-Length` bytes, or everything until the peer closed).
    pub body: Vec<u8>,
}

/// Writes `request` (raw HTTP/1.1 bytes, exactly as given) on `io` and reads one response:
/// its head, then `Content-Length` bytes of body, or the rest of the stream when it has none.
/// For tests of what a proxy does with requests an ordinary client library would not send.
///
/// # Errors
/// I/O errors, a head that does not parse, or no complete response within 10 s.
pub async fn raw_exchange<S>(io: &mut S, request: &[u8]) -> anyhow::Result<RawResponse>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        io.write_all(request).await?;
        io.flush().await?;
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = io.read(&mut chunk).await?;
            if n == 0 {
                bail!("connection closed before a response head: {buf:?}");
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no status in {head:?}"))?;
        let length = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        });
        let mut body = buf[head_end..].to_vec();
        match length {
            Some(n) => {
                while body.len() < n {
                    let mut chunk = [0u8; 4096];
                    let got = io.read(&mut chunk).await?;
                    if got == 0 {
                        bail!(
                            "connection closed {} bytes into a {n}-byte body",
                            body.len()
                        );
                    }
                    body.extend_from_slice(&chunk[..got]);
                }
                body.truncate(n);
            }
            None => {
                io.read_to_end(&mut body).await?;
            }
        }
        Ok(RawResponse { status, head, body })
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .context("no complete response within 10 s")?
}

/// Stops a child process the way an operator would: SIGTERM, then SIGKILL if it has not exited
/// within `grace`. Servers with worker processes (nginx) take their workers down on SIGTERM; a
/// bare SIGKILL of the master would orphan them.
pub fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}
