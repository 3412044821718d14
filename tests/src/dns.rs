//! A real DNS server for tests: Debian's `dnsmasq`, started on a loopback port with only the
//! records a test gives it (no upstream, no /etc/hosts), and reloaded with SIGHUP when the test
//! changes them. Readiness is dnsmasq's own log line, never a sleep.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

/// A running dnsmasq answering for the names given to it; killed on drop.
pub struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
    hosts: PathBuf,
    log: Receiver<String>,
    _dir: tempfile::TempDir,
}

fn hosts_text(records: &[(&str, IpAddr)]) -> String {
    records
        .iter()
        .map(|(name, ip)| format!("{ip} {name}\n"))
        .collect()
}

impl Dnsmasq {
    /// Starts dnsmasq on 127.0.0.1 with `records` (name, address) and a record TTL of
    /// `ttl_secs`.
    ///
    /// # Panics
    /// When dnsmasq is missing (install the Debian package `dnsmasq`; `.ci/run` does) or does
    /// not start within 10 s.
    pub fn start(records: &[(&str, IpAddr)], ttl_secs: u32) -> Dnsmasq {
        let dir = tempfile::tempdir().expect("temp dir");
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, hosts_text(records)).expect("write hosts");
        let mut dir = Some(dir);
        let mut tries = Vec::new();
        for _ in 0..5 {
            // dnsmasq cannot take port 0: ask the kernel for a free UDP port, then hand it
            // over. Another process may take it (or its TCP twin) in between: then dnsmasq
            // exits saying so, and we try another port.
            let port = UdpSocket::bind("127.0.0.1:0")
                .and_then(|s| s.local_addr())
                .expect("free port")
                .port();
            match Self::spawn(&hosts, port, ttl_secs) {
                Ok((child, log)) => {
                    return Dnsmasq {
                        child,
                        addr: SocketAddr::from(([127, 0, 0, 1], port)),
                        hosts,
                        log,
                        _dir: dir.take().expect("one directory"),
                    };
                }
                Err(e) if e.contains("in use") => tries.push(format!("port {port}: {e}")),
                Err(e) => panic!("dnsmasq did not start: {e}"),
            }
        }
        panic!("dnsmasq found no free port:\n{}", tries.join("\n"))
    }

    /// Starts dnsmasq on `port` and waits until it has bound its sockets and read `hosts`
    /// ("read …/hosts - N names"), or says why it exited.
    fn spawn(
        hosts: &std::path::Path,
        port: u16,
        ttl_secs: u32,
    ) -> Result<(Child, Receiver<String>), String> {
        let mut child = Command::new("dnsmasq")
            .args([
                "--no-daemon",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--user=root",
                "--pid-file=",
                "--log-facility=-",
                "--log-queries",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--local-ttl={ttl_secs}"))
            .arg(format!("--addn-hosts={}", hosts.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dnsmasq (install the Debian package `dnsmasq`)");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, log) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        match wait_line(&log, "names", Duration::from_secs(10)) {
            Ok(()) => Ok((child, log)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// The server's address, for `resolver = "ip:port"`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the records and reloads dnsmasq (SIGHUP re-reads the hosts file), returning
    /// once it has.
    ///
    /// # Panics
    /// When the reload is not logged within 10 s.
    pub fn set_records(&self, records: &[(&str, IpAddr)]) {
        std::fs::write(&self.hosts, hosts_text(records)).expect("write hosts");
        let ok = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "SIGHUP to dnsmasq failed");
        self.wait_log("names", Duration::from_secs(10));
    }

    fn wait_log(&self, needle: &str, timeout: Duration) {
        if let Err(e) = wait_line(&self.log, needle, timeout) {
            panic!("{e}");
        }
    }
}

/// Waits for a line of dnsmasq's log containing `needle`; the lines seen otherwise when it
/// does not come within `timeout` or dnsmasq exits.
fn wait_line(log: &Receiver<String>, needle: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match log.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return Ok(()),
            Ok(line) => seen.push(line),
            Err(e) => {
                let why = match e {
                    RecvTimeoutError::Timeout => {
                        format!("did not log `{needle}` within {timeout:?}")
                    }
                    RecvTimeoutError::Disconnected => "exited".to_owned(),
                };
                return Err(format!("dnsmasq {why}; its log:\n{}", seen.join("\n")));
            }
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
