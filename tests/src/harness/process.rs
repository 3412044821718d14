//! A workspace binary other than the sidecar as a child process: a fake service
//! (`monolith`, `report-service`, `api-gateway`) or `ca serve`. [`Process::start`] spawns it,
//! collects its stdout and stderr lines, waits for its `… listening on ADDR` lines (so every
//! listener can be asked for port 0), and kills it on drop. The sidecar has its own launcher
//! ([`super::sidecar`]).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, anyhow};

use super::wait::eventually;
use super::{READY_TIMEOUT, binary};

/// A running child process; killed on drop.
pub struct Process {
    name: String,
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Spawns `target/debug/<program> ARGS` in `dir` and waits until it printed `listeners`
    /// `listening on` lines (each `[NAME ]listening on ADDR`).
    ///
    /// # Errors
    /// When it cannot start, exits early, or does not print them within [`READY_TIMEOUT`]
    /// (the error carries its output).
    pub async fn start(
        program: &str,
        args: &[String],
        dir: &Path,
        listeners: usize,
    ) -> anyhow::Result<Process> {
        let mut child = Command::new(binary(program))
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {program}"))?;
        let (stdout, stderr) = (Arc::default(), Arc::default());
        pump(child.stdout.take().expect("piped"), Arc::clone(&stdout));
        pump(child.stderr.take().expect("piped"), Arc::clone(&stderr));
        let mut p = Process {
            name: program.to_owned(),
            child,
            stdout,
            stderr,
        };
        let what = format!("{listeners} listening lines from {program}");
        eventually(&what, READY_TIMEOUT, async || {
            if let Ok(Some(status)) = p.child.try_wait() {
                return Some(Err(anyhow!("{program} exited early ({status})")));
            }
            (p.listeners().len() >= listeners).then_some(Ok(()))
        })
        .await
        .and_then(|r| r)
        .with_context(|| p.output())?;
        Ok(p)
    }

    /// The bound listeners by name: `NAME listening on ADDR` gives `NAME`, a bare
    /// `listening on ADDR` (`ca serve`) gives the empty name.
    pub fn listeners(&self) -> HashMap<String, SocketAddr> {
        let mut map = HashMap::new();
        for line in self.stdout.lock().expect("lines").iter() {
            if let Some((name, addr)) = line.split_once("listening on ")
                && let Ok(addr) = addr.trim().parse()
            {
                map.insert(name.trim().to_owned(), addr);
            }
        }
        map
    }

    /// The listener named `name`.
    ///
    /// # Panics
    /// When there is none.
    pub fn listener(&self, name: &str) -> SocketAddr {
        *self
            .listeners()
            .get(name)
            .unwrap_or_else(|| panic!("{}: no listener `{name}`", self.name))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Stdout and stderr so far.
    pub fn output(&self) -> String {
        format!(
            "--- {} stdout ---\n{}\n--- stderr ---\n{}",
            self.name,
            self.stdout.lock().expect("lines").join("\n"),
            self.stderr.lock().expect("lines").join("\n")
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// Resident set size (`VmRSS`) and CPU time (user + system, in clock ticks: 100 per second on
/// Linux) of process `pid`, from `/proc`.
///
/// # Errors
/// When `/proc/PID` cannot be read (the process is gone).
pub fn usage(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((rss_kib, tick(11) + tick(12)))
}

/// Resolves on SIGINT or SIGTERM (never, when the handlers cannot be installed): a demo binary
/// selects on it so its children (killed on drop) go with it.
pub async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}
