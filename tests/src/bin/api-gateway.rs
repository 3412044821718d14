//! The fake API gateway as a process: a browser-facing frontend that forwards through the gateway's
//! outbound sidecar, and the webhook receiver behind its inbound sidecar.
//! See `deploy/examples/fintech/README.md`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use gatehouse_tests::fintech::api_gateway::{Frontend, Inbox, WebhookReceiver};
use gatehouse_tests::harness::app::{DebugArgs, Recorder, Servers, render_bind_error};

/// Fake API gateway: /reports… → report service, /api/… → monolith, GET /notifications; webhook receiver.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Browser-facing address (what the frontend calls).
    #[arg(long, default_value = "127.0.0.1:17180")]
    frontend_listen: SocketAddr,
    /// Address of the webhook receiver app (the inbound sidecar's `app`).
    #[arg(long, default_value = "127.0.0.1:17082")]
    webhook_listen: SocketAddr,
    /// Base URL of the report service: the outbound sidecar listener named "report-service".
    #[arg(long, default_value = "http://127.0.0.1:17011")]
    report_service: String,
    /// Base URL of the monolith: the outbound sidecar listener named "monolith".
    #[arg(long, default_value = "http://127.0.0.1:17012")]
    monolith: String,
    #[command(flatten)]
    debug: DebugArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let recorder = Recorder::default();
    let inbox = Inbox::default();
    let frontend = Frontend::new(
        args.report_service.trim_end_matches('/').to_owned(),
        args.monolith.trim_end_matches('/').to_owned(),
        inbox.clone(),
    );
    let receiver = WebhookReceiver {
        inbox,
        recorder: recorder.clone(),
    };
    let mut servers = Servers::default();
    let mut bound = servers
        .add(
            "api-gateway frontend",
            args.frontend_listen,
            Arc::new(frontend),
        )
        .await;
    if bound.is_ok() {
        bound = servers
            .add(
                "api-gateway webhook receiver",
                args.webhook_listen,
                Arc::new(receiver),
            )
            .await;
    }
    if bound.is_ok() {
        bound = servers.add_debug(args.debug.debug_listen, &recorder).await;
    }
    if let Err(e) = bound {
        return render_bind_error("api-gateway", &e);
    }
    servers.run_until_signal().await;
    ExitCode::SUCCESS
}
