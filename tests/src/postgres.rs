//! A real PostgreSQL server for the TCP-mode tests (issue 17): the Debian `postgresql` package's
//! `initdb` and `postgres` from `/usr/lib/postgresql/<version>/bin`, a cluster in a temporary
//! directory, listening on a free loopback port, with `log_connections = on` so a test can
//! prove that no connection reached it. `initdb` refuses to run as root: as root, the cluster
//! is owned by and run as `nobody` (`runuser`). Stopped (fast shutdown) on drop.
//!
//! [`psql`] runs the real client against any address (the database directly, or a sidecar's
//! TCP listener in front of it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;

/// The loopback address every test PostgreSQL listens on (clients connect from 127.0.0.1, which
/// `initdb`'s default `pg_hba.conf` trusts).
const PG_IP: [u8; 4] = [127, 0, 9, 1];

/// The database every test uses.
pub const DATABASE: &str = "reports";

/// The newest `/usr/lib/postgresql/<version>/bin`.
///
/// # Errors
/// When PostgreSQL is not installed (`.ci/run` installs the `postgresql` package).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed: apt-get install postgresql (see .ci/run)")?
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .context("no /usr/lib/postgresql/<version>/bin/postgres: apt-get install postgresql")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// `program args…`, as `nobody` when we are root.
fn as_owner(root: bool, program: &Path) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "nobody", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A running PostgreSQL server; stopped on drop.
pub struct Postgres {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    bin: PathBuf,
    root: bool,
    dir: TempDir,
}

impl Postgres {
    /// `initdb` in a temporary directory, then `postgres` on a free loopback port; waits until
    /// it accepts connections (`pg_isready`) and creates [`DATABASE`].
    ///
    /// # Errors
    /// PostgreSQL missing, `initdb` failing, or the server not ready within 20 s.
    pub async fn start() -> anyhow::Result<Self> {
        let bin = bin_dir()?;
        let root = is_root();
        let dir = tempfile::tempdir()?;
        if root {
            std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534))
                .context("chown the cluster directory to nobody")?;
        }
        let data = dir.path().join("data");
        let out = as_owner(root, &bin.join("initdb"))
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .context("run initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // `postgres` cannot take port 0: one picked on its own loopback address, where no
        // connection takes ephemeral ports, stays free until it binds, unless another test's
        // PostgreSQL picked the same one in between: then another is tried.
        let log = dir.path().join("postgres.log");
        let mut tries = 0;
        let (child, addr) = loop {
            let addr = SocketAddr::from((PG_IP, crate::harness::free_port(PG_IP.into())?));
            let logged = std::fs::metadata(&log).map_or(0, |m| m.len());
            let mut child = spawn_server(root, &bin, dir.path(), addr.port(), &log)?;
            match wait_ready(&mut child, addr, &bin, &log).await {
                Ok(()) => break (child, addr),
                Err(e) => {
                    stop_child(&mut child, dir.path());
                    let text = read_log(&log);
                    let lost_port = text
                        .get(usize::try_from(logged).unwrap_or(0)..)
                        .is_some_and(|new| new.contains("could not bind"));
                    if !lost_port || tries == 3 {
                        return Err(e);
                    }
                    tries += 1;
                }
            }
        };
        let pg = Self {
            child,
            addr,
            log,
            bin: bin.clone(),
            root,
            dir,
        };
        let out = psql(pg.addr, "postgres", "CREATE DATABASE reports", None).await?;
        if !out.ok {
            bail!("CREATE DATABASE failed: {}", out.stderr);
        }
        Ok(pg)
    }

    /// Stops the server (fast shutdown: clients disconnected), keeping its data.
    pub fn stop(&mut self) {
        stop_child(&mut self.child, self.dir.path());
    }

    /// Starts the stopped server again on the same port and data; waits until it accepts
    /// connections.
    ///
    /// # Errors
    /// The server does not start or is not ready within 20 s.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.child = spawn_server(
            self.root,
            &self.bin,
            self.dir.path(),
            self.addr.port(),
            &self.log,
        )?;
        wait_ready(&mut self.child, self.addr, &self.bin, &self.log).await
    }

    /// A `postgres://` URL of [`DATABASE`] (user `postgres`, trust authentication).
    pub fn url(&self) -> String {
        format!("postgres://postgres@{}/{DATABASE}", self.addr)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server log so far.
    pub fn log_text(&self) -> String {
        read_log(&self.log)
    }

    /// Connections the server received (`log_connections` lines), whatever became of them.
    pub fn connections_received(&self) -> usize {
        self.log_text().matches("connection received:").count()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        stop_child(&mut self.child, self.dir.path());
    }
}

/// Waits until the server on `addr` accepts connections (`pg_isready`), for at most 20 s.
async fn wait_ready(
    child: &mut Child,
    addr: SocketAddr,
    bin: &Path,
    log: &Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            bail!("postgres exited ({status}):\n{}", read_log(log));
        }
        let ready = tokio::process::Command::new(bin.join("pg_isready"))
            .args(["-q", "-h", &addr.ip().to_string()])
            .args(["-p", &addr.port().to_string()])
            .status()
            .await
            .is_ok_and(|s| s.success());
        if ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("postgres not ready after 20 s:\n{}", read_log(log));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn read_log(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// `postgres` on `127.0.9.1:port` ([`PG_IP`]) with the cluster in `dir/data`, its log appended
/// to `log`.
fn spawn_server(
    root: bool,
    bin: &Path,
    dir: &Path,
    port: u16,
    log: &Path,
) -> anyhow::Result<Child> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    as_owner(root, &bin.join("postgres"))
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-p", &port.to_string(), "-k"])
        .arg(dir)
        .args([
            "-c",
            "listen_addresses=127.0.9.1",
            "-c",
            "log_connections=on",
            "-c",
            "log_disconnections=on",
            "-c",
            "fsync=off",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .context("start postgres")
}

/// SIGINT (fast shutdown: clients disconnected, no checkpoint wait) to the server itself, whose
/// PID is the first line of `data/postmaster.pid` (as root, `child` is `runuser`, which neither
/// forwards SIGINT nor takes the server down when killed); SIGKILL after 5 s.
fn stop_child(child: &mut Child, dir: &Path) {
    let server = std::fs::read_to_string(dir.join("data/postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next().map(str::trim).map(str::to_owned))
        .filter(|pid| pid.parse::<u32>().is_ok())
        .unwrap_or_else(|| child.id().to_string());
    let _ = Command::new("kill").args(["-INT", &server]).status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("kill").args(["-KILL", &server]).status();
    let _ = child.kill();
    let _ = child.wait();
}

/// What a `psql` run printed.
#[derive(Debug)]
pub struct PsqlOutput {
    /// Exit status 0.
    pub ok: bool,
    /// Stdout (`-A -t`: unaligned, tuples only).
    pub stdout: String,
    /// Stderr.
    pub stderr: String,
}

/// The libpq connection string for `addr` and `database` (no TLS: the sidecars carry it).
pub fn conninfo(addr: SocketAddr, database: &str, application: &str) -> String {
    format!(
        "host={} port={} user=postgres dbname={database} sslmode=disable connect_timeout=5 application_name={application}",
        addr.ip(),
        addr.port()
    )
}

/// Runs `psql -c SQL` against `addr`, feeding `stdin` (e.g. `COPY … FROM STDIN` data).
///
/// # Errors
/// When `psql` cannot be started.
pub async fn psql(
    addr: SocketAddr,
    database: &str,
    sql: &str,
    stdin: Option<Vec<u8>>,
) -> anyhow::Result<PsqlOutput> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("psql")
        .arg(conninfo(addr, database, "gatehouse-test"))
        .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("run psql (apt-get install postgresql-client)")?;
    let mut input = child.stdin.take().context("psql stdin")?;
    if let Some(data) = stdin {
        input.write_all(&data).await?;
    }
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .context("psql did not finish within 20 s")??;
    Ok(PsqlOutput {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
