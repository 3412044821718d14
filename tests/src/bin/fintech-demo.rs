//! The FinTech demo: mints a CA and certificates with `ca`, starts the monolith, the report service and
//! the API gateway with their Gatehouse sidecars (the configs of `deploy/examples/fintech/`) on
//! loopback, and prints a transcript in which every line is an assertion (✔ held, ✘ did not).
//! Exits 0 only when every step behaved as expected; every child process is killed on exit.
//!
//! `--online`: no workload certificate is minted; the three sidecars enroll with a real `ca serve`
//! using join tokens and renew their 10 s SVIDs during the run (`gatehouse_tests::fintech::online`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// `println!` that survives a closed stdout (`fintech-demo | head`): the demo still runs to the end,
/// cleans up and exits with its verdict.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}
use gatehouse_tests::fintech::online;
use gatehouse_tests::fintech::scenario::{self, Check, label};
use gatehouse_tests::fintech::stack::{
    Ports, Service, Stack, StackError, StackOptions, examples_dir,
};
use gatehouse_tests::harness::process::interrupted;

/// Run the FinTech zero-trust demo on 127.0.0.1 and print what happened.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Work directory for configs, certificates and logs (must be empty or missing).
    /// Default: a fresh temporary directory, kept when a step fails.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Added to every port of the example (127.0.0.1:17xxx), e.g. when those ports are taken.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=40000))]
    port_offset: u16,
    /// The example directory (sidecar configs, policies, mint.sh).
    #[arg(long, default_value_os_t = examples_dir())]
    examples: PathBuf,
    /// Online identity: the sidecars enroll with `ca serve` (127.0.0.1:17800) using join tokens
    /// and renew their short-lived SVIDs during the run; nothing is minted for them.
    #[arg(long)]
    online: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let (work_dir, temp) = match args.work_dir {
        Some(dir) => (dir, None),
        None => match tempfile::Builder::new()
            .prefix("gatehouse-fintech-")
            .tempdir()
        {
            Ok(t) => (t.path().to_path_buf(), Some(t)),
            Err(e) => {
                eprintln!("fintech-demo: error: cannot create a temporary directory: {e}");
                eprintln!("  help: pass --work-dir DIR");
                return ExitCode::from(2);
            }
        },
    };
    say!(
        "Gatehouse FinTech demo{}: trust domain fintech.internal, work dir {}",
        if args.online {
            " (online identity)"
        } else {
            ""
        },
        work_dir.display()
    );
    let ok = demo(
        args.examples,
        work_dir.clone(),
        Ports {
            offset: args.port_offset,
        },
        args.online,
    )
    .await;
    match (ok, temp) {
        (true, _) => ExitCode::SUCCESS,
        (false, temp) => {
            // Keep the evidence: logs, audit lines, certificates.
            if let Some(t) = temp {
                let _kept = t.keep();
            }
            say!("logs kept in {}/logs", work_dir.display());
            ExitCode::FAILURE
        }
    }
}

/// Runs everything; the stack (and with it every child process) is dropped before this returns.
async fn demo(examples: PathBuf, work_dir: PathBuf, ports: Ports, online: bool) -> bool {
    let opts = match StackOptions::for_repo(work_dir, ports) {
        Ok(opts) => StackOptions {
            examples,
            online,
            ..opts
        },
        Err(e) => return fail_start(&e),
    };
    say!("binaries from {}\n", opts.bin_dir.display());
    let prepared = tokio::select! {
        res = Stack::prepare(opts) => res,
        () = interrupted() => { say!("interrupted"); return false; }
    };
    let mut stack = match prepared {
        Ok(stack) => stack,
        Err(e) => return fail_start(&e),
    };
    if online {
        say!(
            "{}",
            Check {
                ok: true,
                label: online::label::CA,
                detail: format!(
                    "{}: CA directory ca/, bundle.pem, tokens/<service>.token (0600, spent at enrollment)",
                    stack.certs_dir().display()
                ),
            }
        );
    } else {
        print_minted(&stack).await;
    }
    let launched = tokio::select! {
        res = stack.launch() => res,
        () = interrupted() => { say!("interrupted"); return false; }
    };
    if let Err(e) = launched {
        return fail_start(&e);
    }
    print_started(&stack);
    let mut print = |c: &Check| say!("{c}");
    let run = async {
        if online {
            online::run(&stack, &mut print).await
        } else {
            scenario::run(&stack, &mut print).await
        }
    };
    let checks = tokio::select! {
        checks = run => checks,
        () = interrupted() => { say!("interrupted"); return false; }
    };
    stack.stop().await;
    let failed = checks.iter().filter(|c| !c.ok).count();
    let total = checks.len() + 2;
    if failed == 0 {
        say!("\nall {total} checks passed");
        true
    } else {
        say!("\n{failed} of {total} checks failed");
        false
    }
}

async fn print_minted(stack: &Stack) {
    let certs = stack.certs_dir();
    let mut made = vec![
        "CA fintech.internal",
        "SVIDs for monolith, report-service, api-gateway",
    ];
    if tokio::fs::try_exists(certs.join("crl.pem"))
        .await
        .unwrap_or(false)
    {
        made.push("a revoked report-service SVID + CRL");
    }
    if tokio::fs::try_exists(certs.join("impostor/cert.pem"))
        .await
        .unwrap_or(false)
    {
        made.push("a foreign CA + impostor SVID");
    }
    let minted = Check {
        ok: true,
        label: label::MINTED,
        detail: format!("{}: {}", certs.display(), made.join(", ")),
    };
    say!("{minted}");
}

fn print_started(stack: &Stack) {
    let p = stack.ports();
    let mut detail = String::new();
    if stack.options().online {
        detail.push_str(&format!("ca serve        {}\n", p.ca_serve()));
    }
    for s in Service::ALL {
        detail.push_str(&format!(
            "{:<15} app {}  sidecar inbound {}  admin {}\n",
            s.name(),
            p.app(s),
            p.inbound(s),
            p.admin(s)
        ));
    }
    detail.push_str(&format!(
        "gateway frontend (the browser's entry) {}",
        p.frontend()
    ));
    let started = if stack.options().online {
        online::label::STARTED
    } else {
        detail.push_str(&format!(
            "\nleaked key's sidecar (attacker) outbound {}  admin {}",
            p.leaked_key_outbound(),
            p.leaked_key_admin()
        ));
        label::STARTED
    };
    say!(
        "{}\n",
        Check {
            ok: true,
            label: started,
            detail
        }
    );
}

fn fail_start(e: &StackError) -> bool {
    let step = match e {
        StackError::Exited { .. } | StackError::NotReady { .. } => label::STARTED,
        _ => label::MINTED,
    };
    say!(
        "{}",
        Check {
            ok: false,
            label: step,
            detail: e.to_string()
        }
    );
    eprintln!("fintech-demo: error: {e}");
    eprintln!("  help: {}", e.help());
    false
}
