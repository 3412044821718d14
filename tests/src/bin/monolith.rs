//! The fake FinTech monolith (expense data, dashboard, expense submission) as a process.
//! Run it behind a Gatehouse inbound sidecar; see `deploy/examples/fintech/README.md`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use gatehouse_tests::fintech::monolith::Monolith;
use gatehouse_tests::harness::app::{DebugArgs, Recorder, run_app};

/// Fake monolith: GET /api/data/reports, GET /api/dashboard, POST /api/expenses.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address of the app (the inbound sidecar's `app`).
    #[arg(long, default_value = "127.0.0.1:17080")]
    listen: SocketAddr,
    #[command(flatten)]
    debug: DebugArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let recorder = Recorder::default();
    let app = Arc::new(Monolith::new(recorder.clone()));
    run_app(
        "monolith",
        args.listen,
        app,
        args.debug.debug_listen,
        &recorder,
    )
    .await
}
