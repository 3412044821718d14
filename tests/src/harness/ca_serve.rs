//! The online CA for real-process tests: a CA directory made by the real `ca init` in a
//! temporary directory ([`CaSandbox`]), join tokens and the inventory through the real CLI, and
//! the real `ca serve` ([`CaServe`], killed on drop) on loopback, optionally on a shared
//! `--store postgres://…` (one CA directory copy per replica, as each replica has its own volume).
//!
//! Used by `tests/tests/online_identity.rs` and the FinTech online demo (`crate::fintech::online`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};

use super::binary;

/// A temporary directory holding the CA directory `ca/` and `bootstrap/` (a copy of the CA's
/// `bundle.pem` and the join tokens): what an operator hands a sidecar.
pub struct CaSandbox {
    dir: tempfile::TempDir,
    td: String,
    store: Option<String>,
}

impl CaSandbox {
    /// `ca init --dir ca --trust-domain TD [--intermediate]`, and `bootstrap/bundle.pem`.
    ///
    /// # Panics
    /// When `ca init` fails.
    pub fn new(td: &str, intermediate: bool) -> Self {
        let sb = Self {
            dir: tempfile::tempdir().expect("tempdir"),
            td: td.to_owned(),
            store: None,
        };
        let mut args = vec!["init", "--dir", "ca", "--trust-domain", td];
        if intermediate {
            args.push("--intermediate");
        }
        sb.ca(&args);
        std::fs::create_dir(sb.path("bootstrap")).expect("mkdir");
        std::fs::copy(sb.path("ca/bundle.pem"), sb.path("bootstrap/bundle.pem")).expect("copy");
        sb
    }

    /// From now on, tokens, inventory and revocations go through `--store URL`, and
    /// [`CaSandbox::replica_dir`] copies the CA directory for a second replica.
    pub fn use_store(&mut self, url: &str) {
        self.store = Some(url.to_owned());
    }

    /// The sandbox directory.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// `rel` under the sandbox.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.td
    }

    /// Runs `ca ARGS` in the sandbox and returns its stdout.
    ///
    /// # Panics
    /// When it fails (with its stderr).
    pub fn ca(&self, args: &[&str]) -> String {
        let out = Command::new(binary("ca"))
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run ca");
        assert!(
            out.status.success(),
            "ca {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// `ca ARGS --dir ca [--store URL]`.
    fn ca_dir(&self, args: &[&str]) -> String {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--dir", "ca"]);
        if let Some(url) = &self.store {
            all.extend(["--store", url.as_str()]);
        }
        self.ca(&all)
    }

    /// A join token for `spiffe://<td>/<name>` with `uses` uses, written to
    /// `bootstrap/<name>.token`.
    pub fn token(&self, name: &str, uses: u32) -> PathBuf {
        let id = format!("spiffe://{}/{name}", self.td);
        let uses = uses.to_string();
        let out = self.ca_dir(&[
            "--format",
            "json",
            "token",
            "create",
            "--spiffe-id",
            &id,
            "--uses",
            &uses,
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        let path = self.path(&format!("bootstrap/{name}.token"));
        std::fs::write(&path, v["token"].as_str().expect("token")).expect("write token");
        path
    }

    /// `ca list --format json`: every issuance.
    pub fn inventory(&self) -> Vec<serde_json::Value> {
        let out = self.ca_dir(&["--format", "json", "list"]);
        match serde_json::from_str(&out).expect("ca list json") {
            serde_json::Value::Array(a) => a,
            other => panic!("ca list: {other}"),
        }
    }

    /// `ca revoke --serial SERIAL`.
    pub fn revoke(&self, serial: &str) {
        self.ca_dir(&["revoke", "--serial", serial]);
    }

    /// A copy of `ca/` as `name/` (a second replica's own volume; only the store is shared).
    pub fn replica_dir(&self, name: &str) -> String {
        let out = Command::new("cp")
            .args(["-a", "ca", name])
            .current_dir(self.dir.path())
            .output()
            .expect("cp");
        assert!(out.status.success(), "cp -a ca {name}");
        name.to_owned()
    }

    /// `[identity]` lines enrolling `name` with a fresh single-use join token at `cas` (one
    /// URL per address, tried in this order), `ca_poll = "1s"`.
    pub fn identity(&self, cas: &[SocketAddr], name: &str) -> String {
        let urls: Vec<String> = cas.iter().map(|a| format!("\"https://{a}\"")).collect();
        let ca = match urls.as_slice() {
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        };
        format!(
            "ca = {ca}\nspiffe_id = \"spiffe://{}/{name}\"\nca_bundle = {:?}\n\
             join_token_file = {:?}\nca_poll = \"1s\"",
            self.td,
            self.path("bootstrap/bundle.pem"),
            self.token(name, 1)
        )
    }

    /// Files under the sandbox, outside the CA directories (`ca*`), holding a private key.
    pub fn workload_keys_on_disk(&self) -> Vec<PathBuf> {
        private_keys_under(self.dir.path(), &|p: &Path| {
            p.parent() == Some(self.dir.path())
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("ca"))
        })
    }
}

/// Files under `root` holding `PRIVATE KEY`, not descending into directories `skip` accepts.
pub fn private_keys_under(root: &Path, skip: &dyn Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if skip(&p) {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p)
                .is_ok_and(|b| String::from_utf8_lossy(&b).contains("PRIVATE KEY"))
            {
                found.push(p);
            }
        }
    }
    found
}

/// A running `ca serve`, killed on drop.
pub struct CaServe {
    child: Child,
    addr: SocketAddr,
}

impl CaServe {
    /// `ca serve --dir DIR --listen LISTEN ARGS…` in the sandbox (`--store` added when the
    /// sandbox uses one); returns once it printed `listening on ADDR`.
    ///
    /// # Errors
    /// When it cannot start or exits before listening (its stderr is inherited).
    pub fn start(sb: &CaSandbox, dir: &str, listen: &str, args: &[&str]) -> anyhow::Result<Self> {
        let mut cmd = Command::new(binary("ca"));
        cmd.args(["serve", "--dir", dir, "--listen", listen])
            .args(args)
            .current_dir(sb.root())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(url) = &sb.store {
            cmd.args(["--store", url]);
        }
        let mut child = cmd.spawn().context("spawn ca serve")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?)
            .read_line(&mut line)
            .context("read ca serve's stdout")?;
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("ca serve did not start: first line {line:?}");
        };
        let addr = addr.parse().context("ca serve's address")?;
        Ok(Self { child, addr })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Kills it now (SIGKILL: a replica lost, not a shutdown).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CaServe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
