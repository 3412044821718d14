//! The FinTech fake services on their own (in-process, plain HTTP, ephemeral ports, no sidecars): the
//! behaviour the demo relies on, including the failure paths the demo never takes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gatehouse_tests::fintech::api_gateway::{Frontend, Inbox, WebhookReceiver};
use gatehouse_tests::fintech::monolith::{Monolith, ReportData};
use gatehouse_tests::fintech::report_service::{
    Report, ReportService, ReportServiceApp, ReportStatus, Upstreams,
};
use gatehouse_tests::harness::app::{App, Recorder, serve};
use gatehouse_tests::harness::client::HttpClient;
use gatehouse_tests::harness::wait;
use serde_json::{Value, json};

async fn start<A: App>(app: A) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(serve(listener, Arc::new(app)));
    addr
}

struct Trio {
    monolith: Recorder,
    inbox: Inbox,
    frontend: SocketAddr,
}

/// Monolith, report service and gateway wired directly (no sidecars); `monolith_url` overrides where
/// the report service looks for the monolith.
async fn trio(monolith_url: Option<String>) -> Trio {
    let monolith = Recorder::default();
    let monolith_addr = start(Monolith::new(monolith.clone())).await;
    let inbox = Inbox::default();
    let receiver = start(WebhookReceiver {
        inbox: inbox.clone(),
        recorder: Recorder::default(),
    })
    .await;
    let upstreams = Upstreams {
        monolith: monolith_url.unwrap_or_else(|| format!("http://{monolith_addr}")),
        webhook: Some(format!("http://{receiver}/webhooks/report-ready")),
    };
    let reports = start(ReportServiceApp(ReportService::new(
        upstreams,
        Recorder::default(),
    )))
    .await;
    let frontend = start(Frontend::new(
        format!("http://{reports}"),
        format!("http://{monolith_addr}"),
        inbox.clone(),
    ))
    .await;
    Trio {
        monolith,
        inbox,
        frontend,
    }
}

#[tokio::test]
async fn monolith_validates_dates_and_serves_one_row_per_day() {
    let trio = trio(None).await;
    let client = HttpClient::default();
    let url = |q: &str| format!("http://{}/api/data/reports{q}", trio.frontend);
    let ok = client
        .get(&url("?startDate=2024-02-01&endDate=2024-02-29"))
        .await
        .expect("call");
    assert_eq!(ok.status, 200);
    let data: ReportData = ok.json().expect("report data");
    assert_eq!(data.rows.len(), 29);
    for (query, why) in [
        ("", "startDate is required"),
        ("?startDate=2024-01-01", "endDate is required"),
        (
            "?startDate=2024-13-01&endDate=2024-12-31",
            "startDate must be a calendar date",
        ),
        (
            "?startDate=2023-02-29&endDate=2024-12-31",
            "startDate must be a calendar date",
        ),
        (
            "?startDate=2024-12-31&endDate=2024-01-01",
            "is before startDate",
        ),
        (
            "?startDate=1990-01-01&endDate=2024-01-01",
            "exceeds the maximum",
        ),
    ] {
        let reply = client.get(&url(query)).await.expect("call");
        assert_eq!(reply.status, 400, "{query}");
        assert!(reply.text().contains(why), "{query}: {}", reply.text());
    }
    assert_eq!(
        trio.monolith.snapshot().len(),
        7,
        "every request is recorded, rejected ones too"
    );
}

#[tokio::test]
async fn report_is_generated_in_the_background_and_announced_by_webhook() {
    let trio = trio(None).await;
    let client = HttpClient::default();
    let frontend = format!("http://{}", trio.frontend);
    let body = json!({ "startDate": "2024-01-01", "endDate": "2024-01-31", "format": "json" });
    let accepted = client
        .post_json(&format!("{frontend}/reports"), &body)
        .await
        .expect("call");
    assert_eq!(accepted.status, 202);
    let id = accepted.json::<Value>().expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert_eq!(
        accepted.headers["location"],
        format!("/reports/{id}").as_str()
    );
    let note = wait::until(Duration::from_secs(20), || async {
        trio.inbox.snapshot().into_iter().next()
    })
    .await
    .expect("webhook within 20s");
    assert_eq!(
        (note.event.event.as_str(), note.event.id.as_str()),
        ("report.ready", id.as_str())
    );
    let report: Report = client
        .get(&format!("{frontend}/reports/{id}"))
        .await
        .expect("call")
        .json()
        .expect("report");
    assert_eq!(report.status, ReportStatus::Done);
    assert_eq!(report.rows, 31);
    assert_eq!(report.by_category.values().sum::<i64>(), report.total_cents);
    let content: Value =
        serde_json::from_str(report.content.as_deref().expect("content")).expect("json report");
    assert_eq!(content["rows"], 31);
    let listed = client
        .get(&format!("{frontend}/reports"))
        .await
        .expect("call")
        .json::<Value>()
        .expect("json");
    assert_eq!(listed["reports"][0]["id"], id.as_str());
    assert!(
        listed["reports"][0].get("content").is_none(),
        "listings omit content"
    );
    let seen = trio.monolith.snapshot();
    assert_eq!(
        seen[0].query.as_deref(),
        Some("startDate=2024-01-01&endDate=2024-01-31")
    );
}

#[tokio::test]
async fn report_requests_are_validated_before_anything_runs() {
    let trio = trio(None).await;
    let client = HttpClient::default();
    let url = format!("http://{}/reports", trio.frontend);
    for body in [
        json!({ "startDate": "2024-01-01", "endDate": "2024-12-31", "format": "pdf" }),
        json!({ "startDate": "2024-12-31", "endDate": "2024-01-01", "format": "csv" }),
        json!({ "startDate": "2024-01-01", "format": "csv" }),
        json!({ "startDate": "2024-01-01", "endDate": "2024-12-31", "format": "csv", "extra": 1 }),
    ] {
        let reply = client.post_json(&url, &body).await.expect("call");
        assert_eq!(reply.status, 400, "{body}: {}", reply.text());
    }
    assert_eq!(
        client
            .get(&format!("{url}/rpt-99"))
            .await
            .expect("call")
            .status,
        404
    );
    assert!(
        trio.monolith.snapshot().is_empty(),
        "nothing reached the monolith"
    );
}

#[tokio::test]
async fn report_fails_visibly_when_the_monolith_is_unreachable() {
    // A port nobody listens on: bind one, note it, drop it.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let trio = trio(Some(format!("http://{closed}"))).await;
    let client = HttpClient::default();
    let body = json!({ "startDate": "2024-01-01", "endDate": "2024-01-31", "format": "csv" });
    let accepted = client
        .post_json(&format!("http://{}/reports", trio.frontend), &body)
        .await
        .expect("call");
    assert_eq!(accepted.status, 202);
    let note = wait::until(Duration::from_secs(30), || async {
        trio.inbox.snapshot().into_iter().next()
    })
    .await
    .expect("webhook within 30s");
    assert_eq!(note.event.event, "report.failed");
    assert_eq!(note.event.status, ReportStatus::Failed);
    let report: Report = client
        .get(&format!("http://{}{}", trio.frontend, note.event.url))
        .await
        .expect("call")
        .json()
        .expect("report");
    assert!(report.content.is_none());
    assert!(
        report
            .error
            .as_deref()
            .is_some_and(|e| e.contains(&closed.to_string())),
        "{report:?}"
    );
}
