//! The fleet demo (issue 23): the FinTech services as a fleet on loopback (dnsmasq, `ca serve`,
//! the API gateway, report-service and monolith replicas, each behind its own enrolled sidecar
//! on its own 127.0.x.k address), driven through a peak: scale-out, a killed replica, a CA
//! restart, a root rotation, a revoked replica, scale-in. Every step prints as a ✔/✘
//! assertion; exits 0 only when every one held. Every child process is killed on exit.
//!
//! `--replicas N --simulate` instead starts N sidecars enrolling against one `ca serve` and
//! reports what they cost (see `bench/results/fleet-scale-*.md`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use gatehouse_tests::fleet::{Fleet, Options, scale, scenario};
use gatehouse_tests::harness::process::interrupted;

/// `println!` that survives a closed stdout (`fleet-demo | head`).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// Run the fleet demo on 127.0.0.0/8 and print what happened.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Work directory for the CA and the bootstrap files (must be empty or missing).
    /// Default: a fresh temporary directory, kept when a step fails.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Monolith replicas at the peak (the fleet starts with 2).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(3..=60))]
    peak: u8,
    /// Seconds each measuring window lasts.
    #[arg(long, default_value_t = 5)]
    window_secs: u64,
    /// Report requests per second through the gateway.
    #[arg(long, default_value_t = 40.0)]
    rate: f64,
    /// Lifetime of the SVIDs `ca serve` issues, in seconds (renewal at about 2/3 of it).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(6..=3600))]
    svid_ttl_secs: u64,
    /// With --simulate: how many sidecars enroll.
    #[arg(long, default_value_t = 10)]
    replicas: usize,
    /// Start --replicas sidecars enrolling against one `ca serve` and report their cost
    /// instead of running the demo.
    #[arg(long)]
    simulate: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> ExitCode {
    let args = Args::parse();
    let (work_dir, temp) = match &args.work_dir {
        Some(dir) => {
            if let Err(e) = std::fs::create_dir_all(dir) {
                eprintln!("fleet-demo: error: cannot create {}: {e}", dir.display());
                return ExitCode::from(2);
            }
            (dir.clone(), None)
        }
        None => match tempfile::Builder::new()
            .prefix("gatehouse-fleet-")
            .tempdir()
        {
            Ok(t) => (t.path().to_path_buf(), Some(t)),
            Err(e) => {
                eprintln!("fleet-demo: error: cannot create a temporary directory: {e}");
                eprintln!("  help: pass --work-dir DIR");
                return ExitCode::from(2);
            }
        },
    };
    let ok = if args.simulate {
        tokio::select! {
            ok = simulate(&args, work_dir.clone()) => ok,
            () = interrupted() => { say!("interrupted"); false }
        }
    } else {
        tokio::select! {
            ok = demo(&args, work_dir.clone()) => ok,
            () = interrupted() => { say!("interrupted"); false }
        }
    };
    if ok {
        return ExitCode::SUCCESS;
    }
    if let Some(t) = temp {
        let _kept = t.keep();
    }
    say!("work directory kept: {}", work_dir.display());
    ExitCode::FAILURE
}

async fn demo(args: &Args, work_dir: PathBuf) -> bool {
    say!(
        "Gatehouse fleet demo: trust domain fintech.internal, work dir {}",
        work_dir.display()
    );
    let opts = Options {
        peak: usize::from(args.peak),
        window: Duration::from_secs(args.window_secs),
        rate: args.rate,
        svid_ttl: Duration::from_secs(args.svid_ttl_secs),
        work_dir,
    };
    let t = std::time::Instant::now();
    let mut fleet = match Fleet::start(opts).await {
        Ok(f) => f,
        Err(e) => {
            say!("✘ fleet started\n      {e:#}");
            return false;
        }
    };
    say!(
        "✔ fleet started in {:.1}s: dnsmasq {}, ca serve {} (SVIDs {}s), api-gateway frontend {}\n      \
         monolith replicas {} and report-service replicas {} (one DNS name each), every sidecar enrolled with its own join token\n",
        t.elapsed().as_secs_f64(),
        fleet.dns.addr(),
        fleet.ca_addr,
        args.svid_ttl_secs,
        fleet.frontend(),
        ips(fleet.monoliths.values()),
        ips(fleet.reports.values()),
    );
    let mut print = |c: &gatehouse_tests::fintech::scenario::Check| say!("{c}\n");
    let outcome = scenario::run(&mut fleet, &mut print).await;
    fleet.save_logs();
    drop(fleet);
    say!("{}", scenario::table(&outcome.rows));
    let failed = outcome.checks.iter().filter(|c| !c.ok).count();
    let total = outcome.checks.len() + 1;
    if failed == 0 {
        say!(
            "all {total} checks passed in {:.0}s",
            t.elapsed().as_secs_f64()
        );
        true
    } else {
        say!("{failed} of {total} checks failed");
        false
    }
}

fn ips<'a>(rs: impl Iterator<Item = &'a gatehouse_tests::fleet::Replica>) -> String {
    rs.map(|r| r.sidecar.inbound_addr().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

async fn simulate(args: &Args, work_dir: PathBuf) -> bool {
    match scale::run(&work_dir, args.replicas).await {
        Ok(report) => {
            say!("{report}");
            true
        }
        Err(e) => {
            say!("✘ scale simulation with {} sidecars: {e:#}", args.replicas);
            false
        }
    }
}
