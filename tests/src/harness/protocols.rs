//! The real gRPC and WebSocket peers of the protocol tests (issue 17): `tests/protocols/*.py`
//! run by the Python of `target/protocols-venv`, which `.ci/run` installs from
//! `tests/protocols/requirements.txt` (grpcio, websockets). A server prints
//! `{"listening": "127.0.0.1:PORT"}` first and then one JSON line per call or upgrade it
//! receives ([`PyServer::seen`]); a client prints one JSON result line ([`py_call`]).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, anyhow};

use super::wait::eventually;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// `target/protocols-venv/bin/python`.
///
/// # Panics
/// When the venv is missing, saying how to create it.
pub fn python() -> PathBuf {
    let py = root().join("target/protocols-venv/bin/python");
    assert!(
        py.is_file(),
        "{} is missing: run `python3 -m venv target/protocols-venv && \
         target/protocols-venv/bin/pip install -r tests/protocols/requirements.txt` (as .ci/run does)",
        py.display()
    );
    py
}

/// `tests/protocols/<script>`.
pub fn script(name: &str) -> PathBuf {
    root().join("tests/protocols").join(name)
}

/// A running peer server (`grpc_echo.py serve`, `ws_echo.py serve`); killed on drop.
pub struct PyServer {
    child: Child,
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl PyServer {
    /// Starts `script serve --listen 127.0.0.1:0` and waits for its `listening` line.
    ///
    /// # Errors
    /// When it does not start or print its address within 30 s.
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        let mut child = Command::new(python())
            .arg(script(name))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {name}"))?;
        let lines: Arc<Mutex<Vec<serde_json::Value>>> = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (out, into) = (child.stdout.take().expect("piped"), lines.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    into.lock().expect("lines").push(v);
                }
            }
        });
        let (err, into) = (child.stderr.take().expect("piped"), stderr.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                into.lock().expect("lines").push(line);
            }
        });
        let found = eventually(
            "the peer's listening line",
            Duration::from_secs(30),
            async || {
                lines.lock().expect("lines").iter().find_map(|l| {
                    l["listening"]
                        .as_str()
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                })
            },
        )
        .await;
        let addr = match found {
            Ok(addr) => addr,
            Err(e) => {
                let _ = child.kill();
                return Err(anyhow!("{e}: {}", stderr.lock().expect("lines").join("\n")));
            }
        };
        Ok(Self {
            child,
            lines,
            stderr,
            addr,
        })
    }

    /// Every JSON line it printed after `listening` (calls, upgrades, closes).
    pub fn seen(&self) -> Vec<serde_json::Value> {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .filter(|l| l.get("listening").is_none())
            .cloned()
            .collect()
    }

    /// Its stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().expect("lines").join("\n")
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `script call ARGS` to its end (at most `within`) and returns its last JSON line.
///
/// # Errors
/// When it cannot run, runs past `within`, or prints no JSON.
pub async fn py_call(
    name: &str,
    args: &[&str],
    within: Duration,
) -> anyhow::Result<serde_json::Value> {
    let out = tokio::process::Command::new(python())
        .arg(script(name))
        .arg("call")
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(within, out)
        .await
        .map_err(|_| anyhow!("{name} call {args:?} ran past {within:?}"))?
        .with_context(|| format!("run {name}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| {
            anyhow!(
                "{name} call {args:?} printed no JSON: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}
