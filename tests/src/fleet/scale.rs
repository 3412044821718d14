//! `fleet-demo --replicas N --simulate`: N sidecars (inbound in front of one shared app
//! address, as N replicas of one service) enrolling against one `ca serve`, started one after
//! the other and then awaited together. Reports the sidecars' resident memory, the CA's CPU
//! time per enrollment and its resident memory, and enrollments per second.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{MONOLITH_POLICY, identity_polling, init_ca, serve_ca, token_with};
use crate::harness::Sidecar;
use crate::harness::process::usage;

/// Clock ticks per second of `/proc/PID/stat` (USER_HZ; 100 on every Linux we run on).
const TICKS_PER_SEC: f64 = 100.0;

/// Runs the simulation with `n` sidecars in `dir` and returns the report (a Markdown table row
/// and its explanation).
///
/// # Errors
/// When the CA or a sidecar does not start, or a sidecar does not enroll in time.
pub async fn run(dir: &Path, n: usize) -> anyhow::Result<String> {
    init_ca(dir).await?;
    let server = serve_ca(dir, "127.0.0.1:0", Duration::from_secs(3600)).await?;
    let ca_addr = server.listener("");
    // One join token with N uses (N `ca token create` processes would dominate the timing).
    let uses = n.to_string();
    let token = token_with(
        dir,
        "monolith",
        "monolith",
        &["--uses", &uses, "--ttl", "1h"],
    )
    .await?;
    let app = std::net::SocketAddr::from(([127, 0, 0, 1], 9));
    let (ca_rss_before, ca_cpu_before) = usage(server.pid())?;
    let t = Instant::now();
    let mut sidecars = Vec::with_capacity(n);
    for _ in 0..n {
        // `ca_poll` at its default (5 s), as a real fleet runs.
        let sc = Sidecar::online(&identity_polling(dir, ca_addr, "monolith", &token, "5s"))
            .app(app)
            .policy(MONOLITH_POLICY)
            .start()
            .await?;
        sidecars.push(sc);
    }
    let started = t.elapsed();
    for sc in &mut sidecars {
        sc.wait_ready().await?;
    }
    let enrolled = t.elapsed();
    let (ca_rss, ca_cpu) = usage(server.pid())?;
    // Steady state: the CA's CPU while the N sidecars only fetch the bundle and CRLs.
    let steady = Duration::from_secs(10);
    tokio::time::sleep(steady).await;
    let (_, ca_cpu_steady) = usage(server.pid())?;
    #[allow(clippy::cast_precision_loss)]
    let poll_ms_per_sidecar_s =
        (ca_cpu_steady - ca_cpu) as f64 / TICKS_PER_SEC * 1e3 / steady.as_secs_f64() / n as f64;
    let mut rss: Vec<f64> = Vec::with_capacity(n);
    for sc in &sidecars {
        #[allow(clippy::cast_precision_loss)]
        rss.push(usage(sc.pid())?.0 as f64 / 1024.0);
    }
    let mean = rss.iter().sum::<f64>() / rss.len().max(1) as f64;
    let max = rss.iter().copied().fold(0.0, f64::max);
    #[allow(clippy::cast_precision_loss)]
    let per_enrollment_ms = (ca_cpu - ca_cpu_before) as f64 / TICKS_PER_SEC * 1e3 / n as f64;
    #[allow(clippy::cast_precision_loss)]
    let rate = n as f64 / enrolled.as_secs_f64();
    let mut report = String::new();
    let _ = writeln!(
        report,
        "| N | sidecar RSS mean (MiB) | sidecar RSS max (MiB) | CA CPU per enrollment (ms) | CA CPU polling (ms per sidecar per s) | CA RSS before → after (MiB) | all started (s) | all enrolled (s) | enrollments/s |"
    );
    let _ = writeln!(report, "|---|---|---|---|---|---|---|---|---|");
    #[allow(clippy::cast_precision_loss)]
    let _ = writeln!(
        report,
        "| {n} | {mean:.1} | {max:.1} | {per_enrollment_ms:.2} | {poll_ms_per_sidecar_s:.3} | {:.1} → {:.1} | {:.1} | {:.1} | {rate:.1} |",
        ca_rss_before as f64 / 1024.0,
        ca_rss as f64 / 1024.0,
        started.as_secs_f64(),
        enrolled.as_secs_f64(),
    );
    let _ = write!(
        report,
        "✔ {n} sidecars enrolled against one `ca serve` in {:.1}s ({rate:.1} enrollments/s, processes started one after the other in {:.1}s)",
        enrolled.as_secs_f64(),
        started.as_secs_f64()
    );
    Ok(report)
}
