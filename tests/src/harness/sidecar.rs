//! The real `sidecar` binary as a test sees it: [`SidecarBuilder`] writes a config (every
//! listener on `127.0.0.1:0`), [`Sidecar`] spawns it, reads the bound addresses from its
//! `listening <name> on <addr>` lines, waits for `/readyz`, collects the audit lines from stdout,
//! can send SIGHUP/SIGTERM, and kills it on drop.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use http::StatusCode;
use tempfile::TempDir;

use super::client::http_get;
use super::pki::CertDir;
use super::wait::{self, eventually};
use super::{READY_TIMEOUT, binary};

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

/// Builds a sidecar configuration and spawns the real binary.
pub struct SidecarBuilder {
    /// The identity files; `None` for an online identity (`[identity]` from `identity_extra`).
    cert: Option<CertDir>,
    policy: Option<String>,
    app: Option<SocketAddr>,
    inbound_listen: Option<SocketAddr>,
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

    /// The inbound listen address (default `127.0.0.1:0`), e.g. another loopback address
    /// with a port shared by several sidecars.
    pub fn inbound_listen(mut self, addr: SocketAddr) -> Self {
        self.inbound_listen = Some(addr);
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
        s.push_str("[identity]\n");
        if let Some(cert) = &self.cert {
            s.push_str(&format!(
                "cert = {:?}\nkey = {:?}\nbundle = {:?}\n",
                cert.cert(),
                cert.key(),
                self.bundle.clone().unwrap_or_else(|| cert.bundle())
            ));
        }
        if let Some(crl) = &self.crl {
            s.push_str(&format!("crl = {crl:?}\n"));
        }
        s.push_str(&self.identity_extra);
        s.push('\n');
        if let Some(app) = self.app {
            s.push_str(&format!(
                "[inbound]\nlisten = \"{}\"\napp = \"{app}\"\npolicy = \"policy.toml\"\n{}\n",
                self.inbound_listen
                    .map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string()),
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
        let mut sidecar = self.start().await?;
        sidecar.wait_ready().await?;
        Ok(sidecar)
    }

    /// Spawns `sidecar run` and waits until it logged its admin listener, not for `/readyz`
    /// (an online identity is unready until its first SVID).
    ///
    /// # Errors
    /// When the process exits early or logs no admin listener in [`READY_TIMEOUT`].
    pub async fn start(self) -> anyhow::Result<Sidecar> {
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
        let stdout_closed = pump(child.stdout.take().expect("piped"), stdout.clone());
        pump(child.stderr.take().expect("piped"), stderr.clone());
        let mut sidecar = Sidecar {
            child,
            stdout,
            stdout_closed,
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
        Ok(sidecar)
    }
}

/// Copies the lines of `src` into `into` on a thread; the flag turns true at end of file.
fn pump(
    src: impl std::io::Read + Send + 'static,
    into: Arc<Mutex<Vec<String>>>,
) -> Arc<AtomicBool> {
    let closed = Arc::new(AtomicBool::new(false));
    let done = closed.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(src).lines() {
            let Ok(line) = line else { break };
            into.lock().expect("lines").push(line);
        }
        done.store(true, Ordering::Release);
    });
    closed
}

/// A running `sidecar` process; killed on drop.
pub struct Sidecar {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    /// The stdout pump read end of file: every line the process wrote is in `stdout`.
    stdout_closed: Arc<AtomicBool>,
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
        let mut b = Self::online("");
        b.cert = Some(cert.clone());
        b
    }

    /// A builder for a sidecar with an online identity: `identity` holds the `[identity]`
    /// lines (`ca = …`, `spiffe_id`, `ca_bundle`, a credential); `spawn` waits for `/readyz`,
    /// i.e. for the first SVID.
    ///
    /// # Panics
    /// If a temp dir cannot be created.
    pub fn online(identity: &str) -> SidecarBuilder {
        SidecarBuilder {
            cert: None,
            policy: None,
            app: None,
            inbound_listen: None,
            inbound_extra: String::new(),
            top_extra: String::new(),
            extra_sections: String::new(),
            bundle: None,
            crl: None,
            identity_extra: format!("{identity}\n").trim_start().to_owned(),
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

    /// Waits until `/readyz` answers 200, then reads every listener (an online identity logs
    /// its admin listener first, the others once it holds an SVID). [`SidecarBuilder::spawn`]
    /// is `start` + this; several sidecars started one after the other become ready together.
    ///
    /// # Errors
    /// When it is not ready within [`READY_TIMEOUT`] (the error carries its stderr).
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let admin = self.admin_addr();
        eventually("/readyz 200", READY_TIMEOUT, async || {
            matches!(http_get(admin, "/readyz").await, Ok((StatusCode::OK, _))).then_some(())
        })
        .await
        .with_context(|| self.stderr_text())?;
        self.listeners = self.parse_listeners();
        Ok(())
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

    /// Waits up to 15 s for an audit line that satisfies `pred`, and returns the first.
    ///
    /// # Panics
    /// When none comes, with `what`, the lines so far and the sidecar's stderr.
    pub async fn wait_audit_line(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        eventually(what, Duration::from_secs(15), async || {
            self.audit().into_iter().find(|l| pred(l))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", self.audit(), self.stderr_text()))
    }

    /// Stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().expect("lines").join("\n")
    }

    /// Waits (10 s) until stderr contains `needle`: a log line can reach the pipe reader after
    /// the metric that counts its event.
    ///
    /// # Panics
    /// On timeout, with stderr.
    pub async fn wait_stderr(&self, needle: &str) {
        eventually(needle, Duration::from_secs(10), async || {
            self.stderr_text().contains(needle).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.stderr_text()));
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

    /// Stops the process; then [`Sidecar::audit`] holds every line it wrote. With `graceful`, SIGTERM and
    /// up to `timeout` for its drain (which writes the lines it still buffers), then SIGKILL;
    /// without, SIGKILL at once (a crash: lines still in its buffer are lost, as
    /// `[audit] flush_interval` documents).
    ///
    /// # Errors
    /// When its stdout is not closed within `timeout` after it exited.
    pub async fn stop(&mut self, graceful: bool, timeout: Duration) -> anyhow::Result<()> {
        if graceful && self.child.try_wait()?.is_none() {
            self.sigterm();
            if self.wait_exit(timeout).await.is_err() {
                let _ = self.child.kill();
            }
        } else {
            let _ = self.child.kill();
        }
        let child = &mut self.child;
        let closed = &self.stdout_closed;
        eventually("the sidecar's stdout to close", timeout, async || {
            let exited = child.try_wait().ok().flatten().is_some();
            (exited && closed.load(Ordering::Acquire)).then_some(())
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
    if wait::until_blocking(grace, || child.try_wait().ok().flatten()).is_some() {
        return;
    }
    let _ = child.kill();
    let _ = child.wait();
}
