//! The fake report service (asynchronous report generation) as a process.
//! Run it behind a Gatehouse sidecar; see `deploy/examples/fintech/README.md`.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use gatehouse_tests::fintech::report_service::{ReportService, ReportServiceApp, Upstreams};
use gatehouse_tests::harness::app::{DebugArgs, Recorder, run_app};

/// Fake report service: POST /reports (202), GET /reports, GET /reports/{id}; webhook when done.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address of the app (the inbound sidecar's `app`).
    #[arg(long, default_value = "127.0.0.1:17081")]
    listen: SocketAddr,
    /// Base URL of the monolith: the outbound sidecar listener named "monolith".
    #[arg(long, default_value = "http://127.0.0.1:17001")]
    monolith: String,
    /// Webhook notified when a report is finished: through the outbound sidecar named "api-gateway".
    #[arg(long, default_value = "http://127.0.0.1:17002/webhooks/report-ready")]
    webhook_url: String,
    /// Send no webhook.
    #[arg(long, conflicts_with = "webhook_url")]
    no_webhook: bool,
    #[command(flatten)]
    debug: DebugArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let recorder = Recorder::default();
    let upstreams = Upstreams {
        monolith: args.monolith.trim_end_matches('/').to_owned(),
        webhook: (!args.no_webhook).then_some(args.webhook_url),
    };
    let app = std::sync::Arc::new(ReportServiceApp(ReportService::new(
        upstreams,
        recorder.clone(),
    )));
    run_app(
        "report-service",
        args.listen,
        app,
        args.debug.debug_listen,
        &recorder,
    )
    .await
}
