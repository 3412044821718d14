//! The FinTech stack as real processes: the example configs from `deploy/examples/fintech/` copied into
//! a work directory, certificates minted there by the example's `mint.sh` with the `ca` binary, then the
//! three fake services and their three `sidecar`s started, each logging to `WORK/logs/NAME.log`.
//!
//! Ports are those of the example configs (127.0.0.1:17xxx, see the example README); a port offset
//! shifts every one of them, in the copied configs and in the services' arguments alike.
//! Every child is killed when the [`Stack`] is dropped, including on a panic.
//!
//! Online mode ([`StackOptions::online`], `fintech-demo --online`): no certificate is minted. A CA
//! is created with `ca init`, `ca serve` runs on 127.0.0.1:17800 with short SVIDs, and each
//! sidecar's `[identity]` is rewritten to enroll with a join token (see [`super::online`]); the
//! leaked key's sidecar (a file-identity story) is not started.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use gatehouse_policy::SpiffeId;
use tokio::process::{Child, Command};

use crate::harness::app::SeenRequest;
use crate::harness::client::HttpClient;
use crate::harness::wait;

/// The example's trust domain.
pub const TRUST_DOMAIN: &str = "fintech.internal";

/// Example directory (and process name) of the sidecar an attacker would run with the report
/// service's leaked, revoked key.
pub const LEAKED_KEY: &str = "revoked-report-service";

/// How long a process gets to become ready on a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The three services of the scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// The Spring Boot monolith (expense data, dashboard).
    Monolith,
    /// The report service split out of it.
    ReportService,
    /// The API gateway in front.
    ApiGateway,
}

impl Service {
    /// All three, in start order.
    pub const ALL: [Service; 3] = [
        Service::Monolith,
        Service::ReportService,
        Service::ApiGateway,
    ];

    /// Directory and binary name: `monolith`, `report-service`, `api-gateway`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Monolith => "monolith",
            Self::ReportService => "report-service",
            Self::ApiGateway => "api-gateway",
        }
    }

    /// `spiffe://fintech.internal/<name>`.
    pub fn spiffe_id(self) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}/{}", self.name()))
            .expect("static, valid SPIFFE IDs")
    }

    fn index(self) -> u16 {
        match self {
            Self::Monolith => 0,
            Self::ReportService => 1,
            Self::ApiGateway => 2,
        }
    }
}

/// The example's port plan (see `deploy/examples/fintech/README.md`), shifted by `offset`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ports {
    /// Added to every port.
    pub offset: u16,
}

impl Ports {
    fn at(self, port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port + self.offset))
    }

    /// The app behind the inbound sidecar: 17080, 17081, 17082.
    pub fn app(self, s: Service) -> SocketAddr {
        self.at(17080 + s.index())
    }

    /// The app's loopback debug endpoint (`GET /requests`): 17090, 17091, 17092.
    pub fn debug(self, s: Service) -> SocketAddr {
        self.at(17090 + s.index())
    }

    /// The inbound sidecar (mTLS): 17443, 17444, 17445.
    pub fn inbound(self, s: Service) -> SocketAddr {
        self.at(17443 + s.index())
    }

    /// The sidecar's admin endpoint: 17901, 17902, 17903.
    pub fn admin(self, s: Service) -> SocketAddr {
        self.at(17901 + s.index())
    }

    /// The gateway's browser-facing frontend: 17180.
    pub fn frontend(self) -> SocketAddr {
        self.at(17180)
    }

    /// Outbound listener (toward the monolith) of the sidecar running the revoked key: 17003.
    pub fn leaked_key_outbound(self) -> SocketAddr {
        self.at(17003)
    }

    /// `ca serve` in online mode: 17800.
    pub fn ca_serve(self) -> SocketAddr {
        self.at(17800)
    }

    /// Admin endpoint of the sidecar running the revoked key: 17904.
    pub fn leaked_key_admin(self) -> SocketAddr {
        self.at(17904)
    }

    /// The outbound listener in `from`'s sidecar toward `to`, if the example has one.
    pub fn outbound(self, from: Service, to: Service) -> Option<SocketAddr> {
        let port = match (from, to) {
            (Service::ReportService, Service::Monolith) => 17001,
            (Service::ReportService, Service::ApiGateway) => 17002,
            (Service::ApiGateway, Service::ReportService) => 17011,
            (Service::ApiGateway, Service::Monolith) => 17012,
            _ => return None,
        };
        Some(self.at(port))
    }
}

/// Adds `offset` to every `127.0.0.1:PORT` in a config text.
pub fn shift_ports(text: &str, offset: u16) -> String {
    const HOST: &str = "127.0.0.1:";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(HOST) {
        let (before, after) = rest.split_at(at + HOST.len());
        out.push_str(before);
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[..digits].parse::<u16>() {
            Ok(port) if offset > 0 => out.push_str(&(port.saturating_add(offset)).to_string()),
            _ => out.push_str(&after[..digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

/// Why the stack could not be brought up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StackError {
    /// A binary is missing next to the running executable.
    #[error("binary `{}` not found", path.display())]
    BinaryMissing {
        /// Where it was expected.
        path: PathBuf,
    },
    /// A file operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The work directory exists and is not empty.
    #[error("work directory {} is not empty", path.display())]
    WorkDirNotEmpty {
        /// The directory.
        path: PathBuf,
    },
    /// `mint.sh` failed.
    #[error("minting certificates failed ({status}); log {}:\n{tail}", log.display())]
    Mint {
        /// Exit status.
        status: std::process::ExitStatus,
        /// Full log.
        log: PathBuf,
        /// Its last lines.
        tail: String,
    },
    /// Online mode: creating the CA or a join token with `ca` failed.
    #[error("setting up the online CA failed: {detail}")]
    CaSetup {
        /// The command and its error.
        detail: String,
    },
    /// A process exited during startup.
    #[error("{name} exited during startup ({status}); log {}:\n{tail}", log.display())]
    Exited {
        /// Which process.
        name: String,
        /// Exit status.
        status: std::process::ExitStatus,
        /// Full log.
        log: PathBuf,
        /// Its last lines.
        tail: String,
    },
    /// A process did not become ready in time.
    #[error("{name} not ready on {addr} after {after:?}; log {}:\n{tail}", log.display())]
    NotReady {
        /// Which process.
        name: String,
        /// What was polled.
        addr: SocketAddr,
        /// How long we waited.
        after: Duration,
        /// Full log.
        log: PathBuf,
        /// Its last lines.
        tail: String,
    },
}

impl StackError {
    /// What to do about it.
    pub fn help(&self) -> &'static str {
        match self {
            Self::BinaryMissing { .. } => {
                "build every binary first: cargo build --workspace --bins --locked"
            }
            Self::WorkDirNotEmpty { .. } => {
                "pass an empty or new directory to --work-dir, or omit it for a fresh one"
            }
            Self::Exited { .. } | Self::NotReady { .. } => {
                "read the log above; if a port is in use, stop the other process or pass --port-offset N"
            }
            Self::Mint { .. } | Self::Io { .. } | Self::CaSetup { .. } => {
                "read the message above; it names the file or step that failed"
            }
        }
    }
}

/// `map_err` adapter: an I/O failure while doing `action` on `path`.
pub(crate) fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StackError {
    let path = path.to_path_buf();
    move |source| StackError::Io {
        action,
        path,
        source,
    }
}

/// Where to find things and where to work.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// `deploy/examples/fintech` (configs, policies, `mint.sh`).
    pub examples: PathBuf,
    /// Where the binaries are (`ca`, `sidecar`, the fake services).
    pub bin_dir: PathBuf,
    /// Empty or missing directory for configs, certificates and logs.
    pub work_dir: PathBuf,
    /// Port plan.
    pub ports: Ports,
    /// Online identity: the sidecars enroll with `ca serve` instead of reading minted files.
    pub online: bool,
}

impl StackOptions {
    /// The repository's example directory, the binaries next to this executable, the given work dir.
    ///
    /// # Errors
    /// When the running executable's path cannot be determined.
    pub fn for_repo(work_dir: PathBuf, ports: Ports) -> Result<Self, StackError> {
        Ok(StackOptions {
            examples: examples_dir(),
            bin_dir: bin_dir()?,
            work_dir,
            ports,
            online: false,
        })
    }
}

/// `deploy/examples/fintech` of the source tree this crate was built from.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/fintech")
}

/// The directory holding the workspace's binaries: the running executable's directory, or its parent
/// when running from `target/<profile>/deps` (a test executable).
///
/// # Errors
/// When the running executable's path cannot be determined.
pub fn bin_dir() -> Result<PathBuf, StackError> {
    let exe = std::env::current_exe().map_err(|source| StackError::Io {
        action: "locate the running executable",
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    let dir = exe.parent().unwrap_or(Path::new(".")).to_path_buf();
    Ok(if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().unwrap_or(&dir).to_path_buf()
    } else {
        dir
    })
}

/// The running stack. Dropping it kills every process it started.
#[derive(Debug)]
pub struct Stack {
    opts: StackOptions,
    children: Vec<(String, Child)>,
    client: HttpClient,
}

impl Stack {
    /// Copies the example, mints certificates, starts the apps and the sidecars, waits until all are
    /// ready. Processes already started are killed if a later one fails.
    ///
    /// # Errors
    /// [`StackError`] naming the step and, for a process, the tail of its log.
    pub async fn start(opts: StackOptions) -> Result<Stack, StackError> {
        let mut stack = Self::prepare(opts).await?;
        stack.launch().await?;
        Ok(stack)
    }

    /// Copies the example into the work directory and mints the certificates; starts nothing.
    ///
    /// # Errors
    /// [`StackError`] for a missing binary, a non-empty work directory, a file error or a failed mint.
    pub async fn prepare(opts: StackOptions) -> Result<Stack, StackError> {
        for bin in ["ca", "sidecar", "monolith", "report-service", "api-gateway"] {
            let path = opts.bin_dir.join(bin);
            if !tokio::fs::metadata(&path).await.is_ok_and(|m| m.is_file()) {
                return Err(StackError::BinaryMissing { path });
            }
        }
        let stack = Stack {
            opts,
            children: Vec::new(),
            client: HttpClient::new(Duration::from_secs(20)),
        };
        stack.prepare_work_dir().await?;
        if stack.opts.online {
            super::online::prepare(&stack).await?;
        } else {
            stack.mint().await?;
        }
        Ok(stack)
    }

    /// Starts the apps and the sidecars of a prepared stack and waits until all are ready.
    ///
    /// # Errors
    /// [`StackError`] naming the process that exited or did not become ready, with its log's tail.
    pub async fn launch(&mut self) -> Result<(), StackError> {
        if self.opts.online {
            let args = super::online::ca_serve_args(self);
            self.spawn("ca-serve", "ca", &args).await?;
            let ca = self.ports().ca_serve();
            self.wait_for(vec![("ca-serve".into(), ca, false)]).await?;
        }
        for s in Service::ALL {
            self.spawn_app(s).await?;
        }
        for s in Service::ALL {
            let config = self.sidecar_config(s);
            let args = [
                "run".into(),
                "--config".into(),
                config.display().to_string(),
            ];
            self.spawn(&format!("{}-sidecar", s.name()), "sidecar", &args)
                .await?;
        }
        if self.opts.online {
            return self.wait_ready().await;
        }
        let config = self.work_dir().join(LEAKED_KEY).join("sidecar.toml");
        let args = [
            "run".into(),
            "--config".into(),
            config.display().to_string(),
        ];
        self.spawn(&format!("{LEAKED_KEY}-sidecar"), "sidecar", &args)
            .await?;
        self.wait_ready().await
    }

    /// `WORK/<name>/sidecar.toml`: the example's config as copied (ports shifted by the offset).
    pub fn sidecar_config(&self, s: Service) -> PathBuf {
        self.work_dir().join(s.name()).join("sidecar.toml")
    }

    /// The options this stack runs with.
    pub fn options(&self) -> &StackOptions {
        &self.opts
    }

    /// The work directory.
    pub fn work_dir(&self) -> &Path {
        &self.opts.work_dir
    }

    /// The port plan.
    pub fn ports(&self) -> Ports {
        self.opts.ports
    }

    /// `WORK/certs`, as written by `mint.sh`.
    pub fn certs_dir(&self) -> PathBuf {
        self.work_dir().join("certs")
    }

    /// A plaintext HTTP client for the frontend, debug and admin endpoints.
    pub fn client(&self) -> &HttpClient {
        &self.client
    }

    /// `http://<gateway frontend><path>`: what the browser calls.
    pub fn frontend_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ports().frontend())
    }

    /// Everything the app of `s` has received so far, from its debug endpoint.
    ///
    /// # Errors
    /// A message when the debug endpoint does not answer with the JSON list.
    pub async fn seen(&self, s: Service) -> Result<Vec<SeenRequest>, String> {
        let url = format!("http://{}/requests", self.ports().debug(s));
        let reply = self.client.get(&url).await.map_err(|e| e.to_string())?;
        reply.json().map_err(|e| e.to_string())
    }

    /// The `/metrics` text of the sidecar of `s`.
    ///
    /// # Errors
    /// A message when the admin endpoint does not answer 200.
    pub async fn metrics(&self, s: Service) -> Result<String, String> {
        let url = format!("http://{}/metrics", self.ports().admin(s));
        match self.client.get(&url).await {
            Ok(reply) if reply.status.is_success() => Ok(reply.text()),
            Ok(reply) => Err(format!("GET {url} answered {}", reply.status)),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The audit lines written so far by the sidecar of `s` (`WORK/<name>/audit.jsonl`), parsed.
    pub async fn audit(&self, s: Service) -> Vec<serde_json::Value> {
        let path = self.work_dir().join(s.name()).join("audit.jsonl");
        let text = tokio::fs::read_to_string(&path).await.unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Runs the `ca` binary with `args` in the work directory (`certs/ca` is the CA directory) and
    /// returns its stdout.
    ///
    /// # Errors
    /// A message with the command line and its stderr when it cannot run or exits non-zero.
    pub async fn ca(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(self.opts.bin_dir.join("ca"))
            .args(args)
            .current_dir(self.work_dir())
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("cannot run ca: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "`ca {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Kills every process (also done on drop) and waits for them to exit.
    pub async fn stop(mut self) {
        for (_, child) in &mut self.children {
            // Already exited is fine; there is nothing else to do about a failed kill.
            let _ = child.kill().await;
        }
    }

    async fn prepare_work_dir(&self) -> Result<(), StackError> {
        let work = self.work_dir().to_path_buf();
        if let Ok(mut entries) = tokio::fs::read_dir(&work).await
            && entries
                .next_entry()
                .await
                .map_err(io("list", &work))?
                .is_some()
        {
            return Err(StackError::WorkDirNotEmpty { path: work });
        }
        tokio::fs::create_dir_all(work.join("logs"))
            .await
            .map_err(io("create", &work))?;
        let examples = &self.opts.examples;
        for s in Service::ALL {
            self.copy_example(s.name(), true).await?;
        }
        if self.opts.online {
            return Ok(());
        }
        self.copy_example(LEAKED_KEY, false).await?;
        let mint = examples.join("mint.sh");
        tokio::fs::copy(&mint, work.join("mint.sh"))
            .await
            .map_err(io("copy", &mint))?;
        Ok(())
    }

    /// Copies `examples/<name>/sidecar.toml` (ports shifted) and, if asked, its `policy.toml` into
    /// `WORK/<name>/`.
    async fn copy_example(&self, name: &str, policy: bool) -> Result<(), StackError> {
        let (src, dst) = (self.opts.examples.join(name), self.work_dir().join(name));
        tokio::fs::create_dir_all(&dst)
            .await
            .map_err(io("create", &dst))?;
        let config_src = src.join("sidecar.toml");
        let config = tokio::fs::read_to_string(&config_src)
            .await
            .map_err(io("read", &config_src))?;
        let config_dst = dst.join("sidecar.toml");
        let shifted = shift_ports(&config, self.opts.ports.offset);
        tokio::fs::write(&config_dst, shifted)
            .await
            .map_err(io("write", &config_dst))?;
        if policy {
            let policy_src = src.join("policy.toml");
            tokio::fs::copy(&policy_src, dst.join("policy.toml"))
                .await
                .map_err(io("copy", &policy_src))?;
        }
        Ok(())
    }

    async fn mint(&self) -> Result<(), StackError> {
        let log = self.work_dir().join("logs/mint.log");
        let out = Command::new("bash")
            .arg(self.work_dir().join("mint.sh"))
            .arg(self.certs_dir())
            .env("CA", self.opts.bin_dir.join("ca"))
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|source| StackError::Io {
                action: "run",
                path: "bash".into(),
                source,
            })?;
        let mut text = out.stdout;
        text.extend_from_slice(&out.stderr);
        tokio::fs::write(&log, &text)
            .await
            .map_err(|source| StackError::Io {
                action: "write",
                path: log.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(StackError::Mint {
                status: out.status,
                tail: tail(&String::from_utf8_lossy(&text)),
                log,
            });
        }
        Ok(())
    }

    async fn spawn_app(&mut self, s: Service) -> Result<(), StackError> {
        let p = self.ports();
        let url = |to| {
            format!(
                "http://{}",
                p.outbound(s, to).expect("the example has this outbound")
            )
        };
        let mut args = match s {
            Service::Monolith => vec!["--listen".into(), p.app(s).to_string()],
            Service::ReportService => vec![
                "--listen".into(),
                p.app(s).to_string(),
                "--monolith".into(),
                url(Service::Monolith),
                "--webhook-url".into(),
                format!("{}/webhooks/report-ready", url(Service::ApiGateway)),
            ],
            Service::ApiGateway => vec![
                "--frontend-listen".into(),
                p.frontend().to_string(),
                "--webhook-listen".into(),
                p.app(s).to_string(),
                "--report-service".into(),
                url(Service::ReportService),
                "--monolith".into(),
                url(Service::Monolith),
            ],
        };
        args.extend(["--debug-listen".into(), p.debug(s).to_string()]);
        self.spawn(s.name(), s.name(), &args).await
    }

    async fn spawn(
        &mut self,
        name: &str,
        program: &str,
        args: &[String],
    ) -> Result<(), StackError> {
        let log = self.log_path(name);
        let file = tokio::fs::File::create(&log)
            .await
            .map_err(|source| StackError::Io {
                action: "create",
                path: log.clone(),
                source,
            })?
            .into_std()
            .await;
        let file2 = file.try_clone().map_err(|source| StackError::Io {
            action: "open",
            path: log.clone(),
            source,
        })?;
        let path = self.opts.bin_dir.join(program);
        let child = Command::new(&path)
            .args(args)
            .current_dir(self.work_dir())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file2)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| StackError::Io {
                action: "start",
                path,
                source,
            })?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.work_dir().join("logs").join(format!("{name}.log"))
    }

    /// Starts one more `sidecar run --config CONFIG` (named `name` in logs), owned by this stack, and
    /// waits until its admin endpoint at `admin` answers `/readyz` with 200.
    ///
    /// # Errors
    /// [`StackError`] when it cannot start, exits, or is not ready in time.
    pub async fn start_sidecar(
        &mut self,
        name: &str,
        config: &Path,
        admin: SocketAddr,
    ) -> Result<(), StackError> {
        let args = [
            "run".into(),
            "--config".into(),
            config.display().to_string(),
        ];
        self.spawn(name, "sidecar", &args).await?;
        self.wait_for(vec![(name.to_owned(), admin, true)]).await
    }

    async fn wait_ready(&mut self) -> Result<(), StackError> {
        let p = self.ports();
        let mut checks: Vec<(String, SocketAddr, bool)> = Vec::new();
        for s in Service::ALL {
            checks.push((s.name().to_owned(), p.app(s), false));
            checks.push((s.name().to_owned(), p.debug(s), false));
            checks.push((format!("{}-sidecar", s.name()), p.admin(s), true));
        }
        checks.push(("api-gateway".into(), p.frontend(), false));
        if !self.opts.online {
            checks.push((format!("{LEAKED_KEY}-sidecar"), p.leaked_key_admin(), true));
        }
        self.wait_for(checks).await
    }

    /// Polls each `(name, addr, http)` until it accepts a TCP connection (or, with `http`, answers
    /// `/readyz` with 200), failing early when any child exits.
    async fn wait_for(
        &mut self,
        checks: Vec<(String, SocketAddr, bool)>,
    ) -> Result<(), StackError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        for (name, addr, http) in checks {
            let left = deadline.saturating_duration_since(Instant::now());
            let outcome = wait::until(left, async || {
                if self.is_ready(addr, http).await {
                    return Some(Ok(()));
                }
                self.check_alive().await.err().map(Err)
            })
            .await;
            match outcome {
                Some(ready) => ready?,
                None => {
                    let log = self.log_path(&name);
                    let text = tokio::fs::read_to_string(&log).await.unwrap_or_default();
                    return Err(StackError::NotReady {
                        name,
                        addr,
                        after: READY_TIMEOUT,
                        log,
                        tail: tail(&text),
                    });
                }
            }
        }
        Ok(())
    }

    async fn is_ready(&self, addr: SocketAddr, http: bool) -> bool {
        if !http {
            return tokio::net::TcpStream::connect(addr).await.is_ok();
        }
        let url = format!("http://{addr}/readyz");
        matches!(self.client.get(&url).await, Ok(reply) if reply.status.is_success())
    }

    /// Fails when any process of the stack has exited (none is ever restarted).
    ///
    /// # Errors
    /// [`StackError::Exited`] for the first process found gone, with its log's tail.
    pub async fn check_alive(&mut self) -> Result<(), StackError> {
        let mut exited = None;
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some((name.clone(), status));
                break;
            }
        }
        let Some((name, status)) = exited else {
            return Ok(());
        };
        // The child wrote straight into the log file (no pipe in between): once it has exited,
        // its last words are there.
        let log = self.log_path(&name);
        let text = tokio::fs::read_to_string(&log).await.unwrap_or_default();
        Err(StackError::Exited {
            name,
            status,
            log,
            tail: tail(&text),
        })
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            // kill_on_drop would do it too; being explicit keeps the guarantee visible here.
            let _ = child.start_kill();
        }
    }
}

/// The last 15 lines of a log.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(15);
    lines[start..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_ports_moves_every_loopback_port() {
        let text = "listen = \"127.0.0.1:17443\"\napp = \"127.0.0.1:17080\" # 127.0.0.1:x\n";
        assert_eq!(shift_ports(text, 0), text);
        assert_eq!(
            shift_ports(text, 100),
            "listen = \"127.0.0.1:17543\"\napp = \"127.0.0.1:17180\" # 127.0.0.1:x\n"
        );
    }
}
