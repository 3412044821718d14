//! `sidecar`: the Gatehouse sidecar. `sidecar run --config FILE` serves; `sidecar check
//! --config FILE` runs the same load path, prints a summary and exits (0 ok, 2 problems).
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gatehouse_policy::{outln, stdout};
use gatehouse_proxy::{Config, LoadError, Shutdown};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

/// Gatehouse sidecar: inbound mTLS with per-route SPIFFE policy, outbound mTLS with pinned peers.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve until SIGTERM/SIGINT, then drain in-flight requests and exit 0.
    Run {
        /// The sidecar configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate the configuration, certificates and policy exactly as `run` would, print a
    /// summary (identity, expiry, listeners, route count) and exit: 0 ok, 2 problems.
    Check {
        /// The sidecar configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain of audit files, read in the given order (oldest first): prints the
    /// lines verified (exit 0) or the first broken, missing or reordered line (exit 1).
    Verify {
        /// Audit files, oldest first (e.g. `audit.log.1 audit.log`).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match load_config(&config)
            .and_then(|c| gatehouse_proxy::check_online(&c).map_err(|es| render(&es)))
        {
            Ok(summary) => {
                // Often piped (`| grep -q …`): a reader that stopped early is not an error.
                outln!("{summary}ok: {} is valid", config.display());
                stdout::exit_code(ExitCode::SUCCESS)
            }
            Err(code) => code,
        },
        Command::Audit {
            command: AuditCommand::Verify { files },
        } => match gatehouse_proxy::verify_audit(&files) {
            Ok(v) => {
                let from = v.continues_from.map_or_else(String::new, |h| {
                    format!("; the first line continues from a line not given, SHA-256 {h}")
                });
                outln!(
                    "ok: {} lines verified in {} file(s), {} chain start(s){from}; last line SHA-256 {}",
                    v.lines,
                    files.len(),
                    v.starts,
                    v.last
                );
                stdout::exit_code(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("audit verify: FAILED: {e}");
                ExitCode::from(1)
            }
        },
        Command::Run { config } => {
            let config = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if config.is_online() {
                return run_online(config);
            }
            let loaded = match gatehouse_proxy::load(config).map_err(|es| render(&es)) {
                Ok(l) => l,
                Err(code) => return code,
            };
            if let Err(e) = init_logging(loaded.audit_sink()) {
                return render(&[e]);
            }
            serve(async {
                gatehouse_proxy::run(loaded, Shutdown::new())
                    .await
                    .map_err(|e| vec![e])
            })
        }
    }
}

/// The main thread's event loop: tokio's current-thread runtime (no work stealing, no
/// cross-thread wake-ups). `[runtime] worker_threads = N` adds N - 1 more such loops on their
/// own threads (`gatehouse_proxy::run`), each accepting from the same listening sockets.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path)
        .map_err(|es| render(&es.into_iter().map(LoadError::from).collect::<Vec<_>>()))
}

/// `sidecar run` with `[identity] ca = …`: logging first (the enrollment logs), then the
/// online start-up (the first snapshot is built once the first SVID arrives).
fn run_online(config: Config) -> ExitCode {
    if let Err(e) = init_logging(config.audit_sink()) {
        return render(&[e]);
    }
    serve(gatehouse_proxy::run_online(config, Shutdown::new()))
}

/// Runs `sidecar` on the main thread's event loop ([`runtime`]) until it stops.
fn serve(sidecar: impl std::future::Future<Output = Result<usize, Vec<LoadError>>>) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(sidecar) {
        Ok(_) => ExitCode::SUCCESS,
        Err(es) => render(&es),
    }
}

/// Prints every problem with its `help:` line; exit code 2.
fn render(errors: &[LoadError]) -> ExitCode {
    for e in errors {
        eprintln!("error: {e}\n  help: {}", e.help());
    }
    if errors.len() > 1 {
        eprintln!("{} problems found", errors.len());
    }
    ExitCode::from(2)
}

/// Operational logs to stderr (RUST_LOG, default `info`) through `tracing`; audit lines to
/// stdout or the configured file through the process-wide [`AuditSink`], or nowhere (with a
/// warning) when `[audit] enabled = false`.
fn init_logging(
    sink: Result<(Option<gatehouse_proxy::AuditSink>, String), LoadError>,
) -> Result<(), LoadError> {
    let (sink, summary) = sink?;
    // `target=level` directives, comma-separated (`info`, `gatehouse_proxy=debug,warn`): `Targets`
    // rather than `EnvFilter`, whose span-field filters nobody here needs and whose regex engine
    // was 250 KiB of the binary's start-up pages (issue 20's idle RSS).
    let rust_log = std::env::var("RUST_LOG").unwrap_or_default();
    let (filter, unparsable) = match rust_log.parse::<Targets>() {
        Ok(targets) if !rust_log.is_empty() => (targets, None),
        parsed => (
            Targets::new().with_default(tracing::Level::INFO),
            parsed.err(),
        ),
    };
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(filter);
    tracing_subscriber::registry().with(logs).init();
    if let Some(e) = unparsable {
        tracing::warn!(
            "RUST_LOG={rust_log:?} is not a list of target=level directives ({e}); logging at info. Fix: e.g. RUST_LOG=info or RUST_LOG=gatehouse_proxy=debug,info"
        );
    }
    match sink {
        Some(sink) => {
            let _ = gatehouse_proxy::install_audit_sink(sink);
            tracing::info!("audit log: {summary}");
        }
        None => tracing::warn!("audit log {summary}"),
    }
    Ok(())
}
