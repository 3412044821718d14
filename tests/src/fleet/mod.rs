//! The fleet demo (issue 23): the FinTech services as a fleet on loopback. A real DNS server
//! (dnsmasq), the real `ca serve` (embedded store in a temporary directory), the API gateway,
//! report-service replicas and monolith replicas, each replica behind its own `sidecar` that
//! enrolled with its own join token, on its own 127.0.x.k address with the same port as its
//! siblings, so one DNS name lists every replica.
//!
//! Layout:
//! - this module: the [`Fleet`] (processes, scaling, the CA), the paced report load ([`Load`]) and
//!   the per-window figures read from the sidecars' audit lines ([`Window`]);
//! - [`scenario`]: the peak, step by step, each step a ✔/✘ check;
//! - [`scale`]: `fleet-demo --replicas N --simulate`, N sidecars enrolling against one `ca serve`.
//!
//! Everything stands on the one harness: [`Sidecar`] launches the sidecars, [`Process`] the
//! app binaries and `ca serve`, [`Dnsmasq`] the DNS server.

pub mod scale;
pub mod scenario;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::Method;

use crate::dns::Dnsmasq;
use crate::fintech::report_service::TRACEPARENT;
use crate::harness::client::HttpClient;
use crate::harness::process::Process;
use crate::harness::{Sidecar, binary, free_port};

/// The example's trust domain.
pub const TD: &str = "fintech.internal";
/// The DNS name listing every monolith replica.
pub const MONOLITH_NAME: &str = "monolith.fleet.internal";
/// The DNS name listing every report-service replica.
pub const REPORTS_NAME: &str = "reports.fleet.internal";

const MONOLITH_POLICY: &str = include_str!("../../../deploy/examples/fintech/monolith/policy.toml");
const REPORTS_POLICY: &str =
    include_str!("../../../deploy/examples/fintech/report-service/policy.toml");
const GATEWAY_POLICY: &str =
    include_str!("../../../deploy/examples/fintech/api-gateway/policy.toml");

/// The report every request asks for (a quarter of data rows from the monolith).
pub const REPORT_BODY: &str =
    r#"{"startDate":"2024-01-01","endDate":"2024-03-31","format":"json"}"#;
/// The call the monolith's policy denies to the gateway: the bulk data export.
pub const DENIED_PATH: &str = "/api/data/reports?startDate=2024-01-01&endDate=2024-01-31";

/// How the fleet is sized and timed.
#[derive(Debug, Clone)]
pub struct Options {
    /// Monolith replicas at the peak (the fleet starts with 2).
    pub peak: usize,
    /// Length of a measuring window.
    pub window: Duration,
    /// Report requests per second through the gateway.
    pub rate: f64,
    /// `ca serve --svid-ttl`: SVIDs renew at about 2/3 of it.
    pub svid_ttl: Duration,
    /// The work directory (CA directory, bootstrap files).
    pub work_dir: PathBuf,
}

const fn ip(a: u8, b: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, a, b))
}

/// The gateway's loopback address.
const GATEWAY_IP: IpAddr = ip(3, 1);

/// Where the app of the replica at `127.0.a.k` listens when its port must be known before it
/// binds: `127.0.(a+10).k`, an address of its own, so no sidecar port can be chosen twice.
fn app_ip(replica: IpAddr) -> IpAddr {
    let IpAddr::V4(v) = replica else {
        unreachable!("fleet replicas are on 127.0.a.k (`ip`)")
    };
    let [_, _, a, k] = v.octets();
    ip(a + 10, k)
}

/// One task of a service: its app process and its enrolled sidecar.
pub struct Replica {
    /// `monolith-3`, `report-service-2`, `api-gateway`.
    pub name: String,
    /// Its address (the sidecar's inbound).
    pub ip: IpAddr,
    /// The sidecar (its stdout is the audit stream).
    pub sidecar: Sidecar,
    /// The app.
    pub app: Process,
}

impl Replica {
    /// The audit lines so far, parsed (a line that does not parse is skipped).
    pub fn audit(&self) -> Vec<serde_json::Value> {
        self.sidecar
            .stdout_lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// The running fleet. Dropping it kills every process.
pub struct Fleet {
    /// Sizing and timing.
    pub opts: Options,
    /// `ca serve` (`None` while it is down).
    pub ca: Option<Process>,
    /// Where `ca serve` listens (kept across restarts).
    pub ca_addr: SocketAddr,
    /// The DNS server.
    pub dns: Dnsmasq,
    /// Live monolith replicas, by number.
    pub monoliths: BTreeMap<usize, Replica>,
    /// Report-service replicas, by number.
    pub reports: BTreeMap<usize, Replica>,
    /// The API gateway.
    pub gateway: Replica,
    monolith_port: u16,
    /// Every replica's audit lines, kept when the replica is stopped (for the summary).
    pub gone: Vec<(String, Vec<serde_json::Value>)>,
    /// Requests of the gateway for the data export that a stopped monolith app saw.
    pub leaked: usize,
    /// Replicas SIGKILLed, and when: audit lines they still buffered were lost.
    pub crashes: Vec<(String, Instant)>,
}

/// How a replica is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGKILL to its sidecar and app: a crash. Its sidecar loses the audit lines of its last
    /// [`AUDIT_FLUSH`] at most.
    Crash,
    /// SIGTERM to its sidecar (it drains and writes every audit line), then its app stops: how
    /// ECS and Kubernetes stop a task on scale-in.
    Retire,
}

/// The sidecars' `[audit] flush_interval` (they run with the default): the longest an audit
/// line waits in memory, so what a crash can lose.
pub const AUDIT_FLUSH: Duration = Duration::from_millis(100);

/// How many requests of the gateway for the data export the monolith app of `r` received
/// (from its debug endpoint); an unreadable endpoint counts as one, so it cannot hide a leak.
pub async fn gateway_exports_seen(client: &HttpClient, r: &Replica) -> usize {
    let url = format!("http://{}/requests", r.app.listener("debug endpoint"));
    let seen: Vec<crate::harness::app::SeenRequest> =
        match client.get(&url).await.map(|reply| reply.json()) {
            Ok(Ok(v)) => v,
            _ => return 1,
        };
    let gateway = format!("spiffe://{TD}/api-gateway");
    seen.iter()
        .filter(|s| {
            s.path == "/api/data/reports"
                && s.header(crate::harness::app::CLIENT_ID_HEADER) == Some(gateway.as_str())
        })
        .count()
}

/// Runs `ca ARGS` in `dir` and returns its stdout.
///
/// # Errors
/// Its stderr when it exits non-zero.
pub async fn ca(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(binary("ca"))
        .args(args)
        .current_dir(dir)
        .output()
        .await
        .context("run ca")?;
    if !out.status.success() {
        bail!(
            "`ca {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ca init` in `DIR/ca` and the bootstrap bundle in `DIR/bootstrap/bundle.pem`.
///
/// # Errors
/// When `ca` fails.
pub async fn init_ca(dir: &Path) -> anyhow::Result<()> {
    ca(dir, &["init", "--dir", "ca", "--trust-domain", TD]).await?;
    tokio::fs::create_dir_all(dir.join("bootstrap")).await?;
    tokio::fs::copy(dir.join("ca/bundle.pem"), dir.join("bootstrap/bundle.pem")).await?;
    Ok(())
}

/// `ca serve --bundle-lead` in the fleet: a few times the sidecars' `ca_poll` (1 s), so each
/// has fetched a new root before the CA signs with it.
pub const BUNDLE_LEAD: Duration = Duration::from_secs(4);

/// Starts `ca serve` on `listen` with `--svid-ttl` and [`BUNDLE_LEAD`].
///
/// # Errors
/// When it does not start.
pub async fn serve_ca(dir: &Path, listen: &str, ttl: Duration) -> anyhow::Result<Process> {
    let args: Vec<String> = [
        "serve",
        "--dir",
        "ca",
        "--listen",
        listen,
        "--svid-ttl",
        &format!("{}s", ttl.as_secs()),
        "--bundle-lead",
        &format!("{}s", BUNDLE_LEAD.as_secs()),
    ]
    .map(str::to_owned)
    .to_vec();
    Process::start("ca", &args, dir, 1).await
}

/// A single-use join token for `spiffe://fintech.internal/<service>`, written to
/// `DIR/bootstrap/<file>.token`; its path.
///
/// # Errors
/// When `ca token create` fails.
pub async fn token(dir: &Path, service: &str, file: &str) -> anyhow::Result<PathBuf> {
    token_with(dir, service, file, &[]).await
}

/// [`token`] with more `ca token create` options (`--uses N`, `--ttl 1h`).
///
/// # Errors
/// When `ca token create` fails.
pub async fn token_with(
    dir: &Path,
    service: &str,
    file: &str,
    options: &[&str],
) -> anyhow::Result<PathBuf> {
    let id = format!("spiffe://{TD}/{service}");
    let args = ["--format", "json", "token", "create", "--dir", "ca"];
    let out = ca(dir, &[&args[..], &["--spiffe-id", &id], options].concat()).await?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let path = dir.join(format!("bootstrap/{file}.token"));
    let token = v["token"].as_str().context("no token in the answer")?;
    tokio::fs::write(&path, token).await?;
    Ok(path)
}

/// The `[identity]` lines of an enrolled sidecar fetching the bundle and CRLs every second.
pub fn identity(dir: &Path, ca: SocketAddr, service: &str, token: &Path) -> String {
    identity_polling(dir, ca, service, token, "1s")
}

/// The `[identity]` lines of an enrolled sidecar with `ca_poll = poll`.
pub fn identity_polling(
    dir: &Path,
    ca: SocketAddr,
    service: &str,
    token: &Path,
    poll: &str,
) -> String {
    format!(
        "ca = \"https://{ca}\"\nspiffe_id = \"spiffe://{TD}/{service}\"\nca_bundle = {:?}\n\
         join_token_file = {token:?}\nca_poll = \"{poll}\"",
        dir.join("bootstrap/bundle.pem")
    )
}

/// An `[[outbound]]` to every A record of `name` (re-resolved every second, short slow start).
fn balanced(out: &str, name: &str, port: u16, server: &str, dns: SocketAddr) -> String {
    format!(
        "[[outbound]]\nname = \"{out}\"\nlisten = \"127.0.0.1:0\"\nconnect = \"{name}:{port}\"\n\
         server_id = \"spiffe://{TD}/{server}\"\nresolver = \"{dns}\"\ndns_min_ttl = \"1s\"\n\
         slow_start = \"1s\"\n"
    )
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

impl Fleet {
    /// Starts the CA, the DNS server, 2 monolith replicas, 2 report-service replicas and the
    /// gateway, each replica enrolled with its own join token.
    ///
    /// # Errors
    /// When a process does not start or become ready.
    pub async fn start(opts: Options) -> anyhow::Result<Fleet> {
        let dir = opts.work_dir.clone();
        init_ca(&dir).await?;
        let ca = serve_ca(&dir, "127.0.0.1:0", opts.svid_ttl).await?;
        let ca_addr = ca.listener("");
        let dns = tokio::task::block_in_place(|| Dnsmasq::start(&[], 1));
        let (rport, gw_in, gw_app) = (
            free_port(ip(2, 1))?,
            free_port(GATEWAY_IP)?,
            free_port(app_ip(GATEWAY_IP))?,
        );
        // The first monolith replica picks the port every other one shares.
        let first = Self::monolith(&dir, ca_addr, 1, 0).await?;
        let monolith_port = first.sidecar.inbound_addr().port();
        let mut monoliths = BTreeMap::from([(1, first)]);
        monoliths.insert(2, Self::monolith(&dir, ca_addr, 2, monolith_port).await?);
        // Records before the clients: a sidecar resolves its upstream names as it starts.
        let records = |m: &BTreeMap<usize, Replica>, name| {
            m.values()
                .map(|r| (name, r.ip))
                .collect::<Vec<(&str, IpAddr)>>()
        };
        let mut published = records(&monoliths, MONOLITH_NAME);
        tokio::task::block_in_place(|| dns.set_records(&published));
        let mut reports = BTreeMap::new();
        for k in 1..=2 {
            let r = Self::report_service(&dir, ca_addr, &dns, k, rport, monolith_port, gw_in);
            reports.insert(k, r.await?);
        }
        published.extend(records(&reports, REPORTS_NAME));
        tokio::task::block_in_place(|| dns.set_records(&published));
        let ports = (rport, monolith_port);
        let gateway = Self::gateway(&dir, ca_addr, &dns, ports, gw_in, gw_app).await?;
        let fleet = Fleet {
            opts,
            ca: Some(ca),
            ca_addr,
            dns,
            monoliths,
            reports,
            gateway,
            monolith_port,
            gone: Vec::new(),
            crashes: Vec::new(),
            leaked: 0,
        };
        Ok(fleet)
    }

    async fn monolith(dir: &Path, ca: SocketAddr, k: usize, port: u16) -> anyhow::Result<Replica> {
        let mut r = Self::start_monolith(dir, ca, k, port).await?;
        r.sidecar.wait_ready().await?;
        Ok(r)
    }

    /// Starts replica `k` of the monolith without waiting for its sidecar's first SVID.
    async fn start_monolith(
        dir: &Path,
        ca: SocketAddr,
        k: usize,
        port: u16,
    ) -> anyhow::Result<Replica> {
        let name = format!("monolith-{k}");
        let app = Process::start(
            "monolith",
            &strings(&["--listen", "127.0.0.1:0", "--debug-listen", "127.0.0.1:0"]),
            dir,
            2,
        )
        .await?;
        let token = token(dir, "monolith", &name).await?;
        let addr = ip(1, u8::try_from(k)?);
        let sidecar = Sidecar::online(&identity(dir, ca, "monolith", &token))
            .app(app.listener("monolith"))
            .policy(MONOLITH_POLICY)
            .inbound_listen(SocketAddr::new(addr, port))
            .start()
            .await
            .with_context(|| format!("{name}'s sidecar"))?;
        Ok(Replica {
            name,
            ip: addr,
            sidecar,
            app,
        })
    }

    async fn report_service(
        dir: &Path,
        ca: SocketAddr,
        dns: &Dnsmasq,
        k: usize,
        port: u16,
        monolith_port: u16,
        gateway_port: u16,
    ) -> anyhow::Result<Replica> {
        let name = format!("report-service-{k}");
        let token = token(dir, "report-service", &name).await?;
        let addr = ip(2, u8::try_from(k)?);
        let app_addr = SocketAddr::new(app_ip(addr), free_port(app_ip(addr))?);
        let webhook = format!(
            "[[outbound]]\nname = \"api-gateway\"\nlisten = \"127.0.0.1:0\"\n\
             connect = \"{}\"\nserver_id = \"spiffe://{TD}/api-gateway\"\n",
            SocketAddr::new(GATEWAY_IP, gateway_port)
        );
        let sidecar = Sidecar::online(&identity(dir, ca, "report-service", &token))
            .app(app_addr)
            .policy(REPORTS_POLICY)
            .inbound_listen(SocketAddr::new(addr, port))
            .section(&balanced(
                "monolith",
                MONOLITH_NAME,
                monolith_port,
                "monolith",
                dns.addr(),
            ))
            .section(&webhook)
            .spawn()
            .await
            .with_context(|| format!("{name}'s sidecar"))?;
        let monolith = format!("http://{}", sidecar.listener("outbound:monolith"));
        let hook = format!(
            "http://{}/webhooks/report-ready",
            sidecar.listener("outbound:api-gateway")
        );
        let args = [
            "--listen",
            &app_addr.to_string(),
            "--monolith",
            &monolith,
            "--webhook-url",
            &hook,
            "--debug-listen",
            "127.0.0.1:0",
        ];
        let app = Process::start("report-service", &strings(&args), dir, 2).await?;
        Ok(Replica {
            name,
            ip: addr,
            sidecar,
            app,
        })
    }

    async fn gateway(
        dir: &Path,
        ca: SocketAddr,
        dns: &Dnsmasq,
        (reports_port, monolith_port): (u16, u16),
        inbound_port: u16,
        app_port: u16,
    ) -> anyhow::Result<Replica> {
        let token = token(dir, "api-gateway", "api-gateway").await?;
        let sidecar = Sidecar::online(&identity(dir, ca, "api-gateway", &token))
            .app(SocketAddr::new(app_ip(GATEWAY_IP), app_port))
            .policy(GATEWAY_POLICY)
            .inbound_listen(SocketAddr::new(GATEWAY_IP, inbound_port))
            .section(&balanced(
                "report-service",
                REPORTS_NAME,
                reports_port,
                "report-service",
                dns.addr(),
            ))
            .section(&balanced(
                "monolith",
                MONOLITH_NAME,
                monolith_port,
                "monolith",
                dns.addr(),
            ))
            .spawn()
            .await
            .context("api-gateway's sidecar")?;
        let args = [
            "--frontend-listen",
            "127.0.0.1:0",
            "--webhook-listen",
            &SocketAddr::new(app_ip(GATEWAY_IP), app_port).to_string(),
            "--report-service",
            &format!("http://{}", sidecar.listener("outbound:report-service")),
            "--monolith",
            &format!("http://{}", sidecar.listener("outbound:monolith")),
            "--debug-listen",
            "127.0.0.1:0",
        ];
        let app = Process::start("api-gateway", &strings(&args), dir, 3).await?;
        Ok(Replica {
            name: "api-gateway".into(),
            ip: GATEWAY_IP,
            sidecar,
            app,
        })
    }

    /// The gateway's browser-facing frontend.
    pub fn frontend(&self) -> SocketAddr {
        self.gateway.app.listener("api-gateway frontend")
    }

    /// Writes the A records of every live replica and reloads dnsmasq (SIGHUP), returning once
    /// it re-read them.
    pub fn publish_dns(&self) {
        let mut records: Vec<(&str, IpAddr)> = Vec::new();
        records.extend(self.monoliths.values().map(|r| (MONOLITH_NAME, r.ip)));
        records.extend(self.reports.values().map(|r| (REPORTS_NAME, r.ip)));
        tokio::task::block_in_place(|| self.dns.set_records(&records));
    }

    /// Starts monolith replicas up to `n` (each enrolls with its own join token), then publishes
    /// their A records. Returns the new replicas' numbers.
    ///
    /// # Errors
    /// When a replica does not start.
    pub async fn scale_monolith_to(&mut self, n: usize) -> anyhow::Result<Vec<usize>> {
        let next = self.monoliths.keys().next_back().copied().unwrap_or(0) + 1;
        let new: Vec<usize> = (next..next + n.saturating_sub(self.monoliths.len())).collect();
        // Started one after the other, they enroll and become ready together.
        let dir = self.opts.work_dir.clone();
        let mut started = Vec::new();
        for &k in &new {
            started.push((
                k,
                Self::start_monolith(&dir, self.ca_addr, k, self.monolith_port).await?,
            ));
        }
        for (k, mut r) in started {
            r.sidecar.wait_ready().await?;
            self.monoliths.insert(k, r);
        }
        self.publish_dns();
        Ok(new)
    }

    /// Stops replica `k` of the monolith as `how` says, keeping every audit line its sidecar
    /// wrote and counting the gateway's requests its app saw (there must be none).
    ///
    /// # Errors
    /// When the sidecar's output does not close within 20 s after it was stopped.
    pub async fn stop_monolith(&mut self, k: usize, how: Stop) -> anyhow::Result<()> {
        let Some(mut r) = self.monoliths.remove(&k) else {
            return Ok(());
        };
        if how == Stop::Crash {
            self.crashes.push((r.name.clone(), Instant::now()));
        }
        let stopped = r
            .sidecar
            .stop(how == Stop::Retire, Duration::from_secs(20))
            .await;
        let client = HttpClient::new(Duration::from_secs(10));
        self.leaked += gateway_exports_seen(&client, &r).await;
        let _ = std::fs::write(self.log_path(&r.name), r.sidecar.stderr_text());
        self.gone.push((r.name.clone(), r.audit()));
        stopped.with_context(|| format!("stop {}", r.name))
    }

    fn log_path(&self, name: &str) -> PathBuf {
        let dir = self.opts.work_dir.join("logs");
        let _ = std::fs::create_dir_all(&dir);
        dir.join(format!("{name}.log"))
    }

    /// Writes every sidecar's log to `WORK/logs/NAME.log` and its audit lines to
    /// `WORK/logs/NAME.audit.jsonl` (for a look after the demo).
    pub fn save_logs(&self) {
        for r in self.replicas() {
            let _ = std::fs::write(self.log_path(&r.name), r.sidecar.stderr_text());
        }
        for (name, lines) in self.audit_lines() {
            let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
            let path = self
                .opts
                .work_dir
                .join("logs")
                .join(format!("{name}.audit.jsonl"));
            let _ = std::fs::write(path, text);
        }
        if let Some(ca) = &self.ca {
            let _ = std::fs::write(self.log_path("ca-serve"), ca.output());
        }
    }

    /// Every replica (gateway, report-services, monoliths), live ones only.
    pub fn replicas(&self) -> impl Iterator<Item = &Replica> {
        std::iter::once(&self.gateway)
            .chain(self.reports.values())
            .chain(self.monoliths.values())
    }

    /// Kills `ca serve`, leaves it down for `down`, and starts it again on the same address
    /// and CA directory.
    ///
    /// # Errors
    /// When it does not start again.
    pub async fn restart_ca(&mut self, down: Duration) -> anyhow::Result<()> {
        let dir = self.opts.work_dir.clone();
        let listen = self.ca_addr.to_string();
        self.ca = None; // dropped: killed
        tokio::time::sleep(down).await;
        self.ca = Some(serve_ca(&dir, &listen, self.opts.svid_ttl).await?);
        Ok(())
    }
}

/// One report request through the gateway's frontend.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When it was sent.
    pub at: Instant,
    /// Until the whole answer arrived.
    pub latency: Duration,
    /// The status, or `None` for a transport error.
    pub status: Option<u16>,
    /// The trace id its `traceparent` carried.
    pub trace: String,
}

/// The peak: paced `POST /reports` through the gateway (each with its own `traceparent`), and
/// twice a second the call the policy denies to the gateway.
pub struct Load {
    samples: Arc<Mutex<Vec<Sample>>>,
    denied: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A fresh W3C trace id (32 lowercase hex digits, never all zeros) and a `traceparent` for it.
fn traceparent(n: u64) -> (String, String) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let trace = format!("{:016x}{:016x}", (nanos as u64) | 1, n);
    let header = format!("00-{trace}-{:016x}-01", n + 1);
    (trace, header)
}

async fn send(client: &HttpClient, method: Method, url: &str, n: u64) -> Sample {
    let (trace, header) = traceparent(n);
    let at = Instant::now();
    let headers = [("content-type", "application/json"), (TRACEPARENT, &header)];
    let body = (method == Method::POST).then(|| Bytes::from_static(REPORT_BODY.as_bytes()));
    let status = client
        .send(method, url, &headers, body)
        .await
        .ok()
        .map(|r| r.status.as_u16());
    Sample {
        at,
        latency: at.elapsed(),
        status,
        trace,
    }
}

impl Load {
    /// Starts `workers` workers sending about `rate` report requests per second to `frontend`
    /// together, and the denied probe.
    pub fn start(frontend: SocketAddr, rate: f64, workers: usize) -> Load {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let denied = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        #[allow(clippy::cast_precision_loss)] // a handful of workers
        let period = Duration::from_secs_f64(workers as f64 / rate);
        let client = HttpClient::new(Duration::from_secs(20));
        let mut tasks = Vec::new();
        for w in 0..workers {
            let (samples, stop, client) = (samples.clone(), stop.clone(), client.clone());
            let url = format!("http://{frontend}/reports");
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut n = (w as u64) << 40;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    n += 1;
                    let s = send(&client, Method::POST, &url, n).await;
                    samples.lock().expect("samples").push(s);
                }
            }));
        }
        let (denied2, stop2) = (denied.clone(), stop.clone());
        let url = format!("http://{frontend}{DENIED_PATH}");
        tasks.push(tokio::spawn(async move {
            let mut n = u64::MAX >> 1;
            while !stop2.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(500)).await;
                n -= 1;
                let s = send(&client, Method::GET, &url, n).await;
                denied2.lock().expect("denied").push(s);
            }
        }));
        Load {
            samples,
            denied,
            stop,
            tasks,
        }
    }

    /// Report requests so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().expect("samples").clone()
    }

    /// The denied probes so far.
    pub fn denied(&self) -> Vec<Sample> {
        self.denied.lock().expect("denied").clone()
    }

    /// Stops every worker (each finishes its request).
    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(25), t).await;
        }
    }
}

/// Where each stream stood when a window opened.
#[derive(Debug, Clone)]
pub struct Mark {
    /// When.
    pub at: Instant,
    load: usize,
    denied: usize,
    audit: BTreeMap<String, usize>,
}

/// What happened in one window, from the load's samples and every sidecar's audit lines.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// How long the window lasted.
    pub secs: f64,
    /// Report requests answered 202 by the gateway.
    pub reports_ok: usize,
    /// Report requests not answered 202.
    pub reports_failed: usize,
    /// Gateway round trip p50 and p99, milliseconds.
    pub report_ms: (f64, f64),
    /// Mesh calls (every outbound audit line, but the denied probe).
    pub calls: usize,
    /// Failed mesh calls per sidecar (status not 2xx).
    pub failed: BTreeMap<String, usize>,
    /// The first failed calls, as `sidecar → upstream METHOD path status reason`.
    pub failures: Vec<String>,
    /// Data fetches report-service → monolith, p50 and p99 of their outbound duration, ms.
    pub fetch_ms: (f64, f64),
    /// Data exports served, per monolith replica (inbound allows).
    pub per_monolith: BTreeMap<String, usize>,
    /// Reports created, per report-service replica (inbound allows).
    pub per_report_service: BTreeMap<String, usize>,
    /// Denied probes sent, and how many were not answered 403.
    pub denied: (usize, usize),
    /// Monolith inbound denials of the gateway's data export calls (audit).
    pub denied_audited: usize,
}

impl Stats {
    /// Failed mesh calls outside `except`.
    pub fn failed_outside(&self, except: &[&str]) -> usize {
        self.failed
            .iter()
            .filter(|(k, _)| !except.contains(&k.as_str()))
            .map(|(_, v)| v)
            .sum()
    }

    /// Two lines: requests, failures, p50/p99, spread.
    pub fn describe(&self) -> String {
        let spread = |m: &BTreeMap<String, usize>| {
            m.iter()
                .map(|(k, v)| format!("{}={v}", k.rsplit('-').next().unwrap_or(k)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let failed: usize = self.failed.values().sum();
        let examples: String = self
            .failures
            .iter()
            .map(|f| format!("\n  failed: {f}"))
            .collect();
        format!(
            "{:.1}s: {} reports ({} failed, p50 {:.1} ms, p99 {:.1} ms); {} mesh calls ({failed} failed{}); \
             data fetch p50 {:.1} ms, p99 {:.1} ms\n\
             per monolith replica: {}; per report-service replica: {}; denied probe {}× 403",
            self.secs,
            self.reports_ok + self.reports_failed,
            self.reports_failed,
            self.report_ms.0,
            self.report_ms.1,
            self.calls,
            if failed > 0 {
                format!(": {:?}", self.failed)
            } else {
                String::new()
            },
            self.fetch_ms.0,
            self.fetch_ms.1,
            spread(&self.per_monolith),
            spread(&self.per_report_service),
            self.denied.0 - self.denied.1,
        ) + &examples
    }
}

/// The `q` quantile (0..=1) of `v`, sorted here; 0 for none.
pub fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i]
}

impl Fleet {
    /// Every replica's audit lines (live and gone), by name.
    pub fn audit_lines(&self) -> BTreeMap<String, Vec<serde_json::Value>> {
        let mut all: BTreeMap<String, Vec<serde_json::Value>> = self
            .replicas()
            .map(|r| (r.name.clone(), r.audit()))
            .collect();
        for (name, lines) in &self.gone {
            all.insert(name.clone(), lines.clone());
        }
        all
    }

    /// Opens a window.
    pub fn mark(&self, load: &Load) -> Mark {
        Mark {
            at: Instant::now(),
            load: load.samples.lock().expect("samples").len(),
            denied: load.denied.lock().expect("denied").len(),
            audit: self
                .audit_lines()
                .into_iter()
                .map(|(k, v)| (k, v.len()))
                .collect(),
        }
    }

    /// What happened since `from`.
    pub fn stats(&self, from: &Mark, load: &Load) -> Stats {
        let samples = load.samples();
        let samples = &samples[from.load.min(samples.len())..];
        let mut st = Stats {
            secs: from.at.elapsed().as_secs_f64(),
            ..Stats::default()
        };
        let ok = |s: &Sample| s.status == Some(202);
        st.reports_ok = samples.iter().filter(|s| ok(s)).count();
        st.reports_failed = samples.len() - st.reports_ok;
        let mut ms: Vec<f64> = samples
            .iter()
            .map(|s| s.latency.as_secs_f64() * 1e3)
            .collect();
        st.report_ms = (quantile(&mut ms, 0.5), quantile(&mut ms, 0.99));
        let denied = load.denied();
        let denied = &denied[from.denied.min(denied.len())..];
        let others = || denied.iter().filter(|s| s.status != Some(403));
        st.denied = (denied.len(), others().count());
        for d in others().take(3) {
            st.failures
                .push(format!("denied probe answered {:?}", d.status));
        }
        for s in samples.iter().filter(|s| !ok(s)).take(3) {
            st.failures.push(format!(
                "report request answered {:?} after {:?}",
                s.status, s.latency
            ));
        }
        let mut fetch = Vec::new();
        for (name, lines) in self.audit_lines() {
            let start = from.audit.get(&name).copied().unwrap_or(0);
            for l in lines.iter().skip(start) {
                self.count_line(&name, l, &mut st, &mut fetch);
            }
        }
        st.fetch_ms = (quantile(&mut fetch, 0.5), quantile(&mut fetch, 0.99));
        st
    }

    fn count_line(&self, name: &str, l: &serde_json::Value, st: &mut Stats, fetch: &mut Vec<f64>) {
        let path = l["path"].as_str().unwrap_or_default();
        let status = l["status"].as_u64().unwrap_or(0);
        let allowed = l["decision"] == "allow";
        match l["direction"].as_str() {
            Some("outbound") => {
                let probe = name == "api-gateway" && l["upstream"] == "monolith";
                if probe {
                    return;
                }
                st.calls += 1;
                if !(200..300).contains(&status) {
                    *st.failed.entry(name.to_owned()).or_default() += 1;
                    if st.failures.len() < 6 {
                        st.failures.push(format!(
                            "{name} → {} {} {} {} {} at {}",
                            l["upstream"].as_str().unwrap_or("-"),
                            l["method"].as_str().unwrap_or("-"),
                            l["path"].as_str().unwrap_or("-"),
                            status,
                            l["reason"],
                            l["time"].as_str().unwrap_or("-"),
                        ));
                    }
                }
                if l["upstream"] == "monolith" {
                    fetch.push(l["duration_ms"].as_f64().unwrap_or(0.0));
                }
            }
            Some("inbound") if name.starts_with("monolith") => {
                if allowed && path == "/api/data/reports" {
                    *st.per_monolith.entry(name.to_owned()).or_default() += 1;
                } else if !allowed && l["caller"] == format!("spiffe://{TD}/api-gateway") {
                    st.denied_audited += 1;
                }
            }
            Some("inbound")
                if name.starts_with("report-service") && allowed && path == "/reports" =>
            {
                *st.per_report_service.entry(name.to_owned()).or_default() += 1;
            }
            _ => {}
        }
    }
}
