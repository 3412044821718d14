//! The fake report service split out of the monolith. Reports are generated asynchronously:
//!
//! - `POST /reports` `{"startDate","endDate","format"}` → 202 `{"id","status":"pending","url"}`; a background
//!   task fetches `GET /api/data/reports` from the monolith (through the report service's outbound
//!   sidecar, plain HTTP on loopback), builds the report, stores it in memory, then POSTs a webhook
//!   notification (through the outbound sidecar toward the API gateway).
//! - `GET /reports` lists the reports without their content; `GET /reports/{id}` returns one with its
//!   status and, once done, its content.
//!
//! Formats: `json` and `csv` (the content is the real rendering; other formats are refused with 400
//! rather than faked).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};
use serde::{Deserialize, Serialize};

use super::monolith::{ReportData, parse_range};
use crate::harness::app::{App, Captured, Recorder, ServiceBody as Body, error, json};
use crate::harness::client::HttpClient;

/// Formats the report service renders.
pub const FORMATS: [&str; 2] = ["json", "csv"];

/// Path of the webhook the gateway receives.
pub const WEBHOOK_PATH: &str = "/webhooks/report-ready";

/// The W3C trace context header the fake services pass on from a request to the calls it causes.
pub const TRACEPARENT: &str = "traceparent";

/// Body of `POST /reports`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReportRequest {
    /// First day, `YYYY-MM-DD`.
    pub start_date: String,
    /// Last day, `YYYY-MM-DD`.
    pub end_date: String,
    /// `json` or `csv`.
    pub format: String,
}

/// Lifecycle of a report.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReportStatus {
    /// Accepted, not started.
    Pending,
    /// Fetching data or rendering.
    Running,
    /// Content available.
    Done,
    /// Gave up; `error` says why.
    Failed,
}

/// A report as `GET /reports/{id}` returns it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Report id, e.g. `rpt-1`.
    pub id: String,
    /// Where it is in its lifecycle.
    pub status: ReportStatus,
    /// What was asked for.
    pub start_date: String,
    /// What was asked for.
    pub end_date: String,
    /// What was asked for.
    pub format: String,
    /// Number of expense rows the monolith returned.
    pub rows: usize,
    /// Sum of all rows, in cents.
    pub total_cents: i64,
    /// Sum per category, in cents.
    pub by_category: BTreeMap<String, i64>,
    /// The rendered report, once done (omitted in listings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Outcome of the webhook: `delivered (204)`, `failed: …`, or absent while pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
}

/// The webhook body sent when a report is finished (done or failed).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReportReady {
    /// `report.ready` or `report.failed`.
    pub event: String,
    /// Report id.
    pub id: String,
    /// Final status.
    pub status: ReportStatus,
    /// Where to fetch it on the report service.
    pub url: String,
}

/// Where the report service's own calls go.
#[derive(Debug, Clone)]
pub struct Upstreams {
    /// Base URL of the monolith as this app reaches it: its outbound sidecar, e.g. `http://127.0.0.1:17001`.
    pub monolith: String,
    /// Full webhook URL, e.g. `http://127.0.0.1:17002/webhooks/report-ready`; `None` sends no webhook.
    pub webhook: Option<String>,
}

/// The report service app.
#[derive(Debug)]
pub struct ReportService {
    upstreams: Upstreams,
    client: HttpClient,
    recorder: Recorder,
    reports: Mutex<BTreeMap<u64, Report>>,
}

impl ReportService {
    /// A report service with no reports.
    pub fn new(upstreams: Upstreams, recorder: Recorder) -> Arc<Self> {
        Arc::new(ReportService {
            upstreams,
            client: HttpClient::new(Duration::from_secs(20)),
            recorder,
            reports: Mutex::default(),
        })
    }

    fn with_reports<T>(&self, f: impl FnOnce(&mut BTreeMap<u64, Report>) -> T) -> T {
        f(&mut self.reports.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut Report)) -> Report {
        self.with_reports(|reports| {
            let report = reports
                .get_mut(&id)
                .expect("reports are never removed once created");
            f(report);
            report.clone()
        })
    }

    fn create(self: &Arc<Self>, req: &Captured) -> Response<Body> {
        let ask: ReportRequest = match serde_json::from_slice(&req.body) {
            Ok(ask) => ask,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("invalid report request: {e}"),
                );
            }
        };
        if let Err(message) = parse_range(Some(&ask.start_date), Some(&ask.end_date)) {
            return error(StatusCode::BAD_REQUEST, &message);
        }
        if !FORMATS.contains(&ask.format.as_str()) {
            let message = format!(
                "format `{}` is not supported; use one of {FORMATS:?}",
                ask.format
            );
            return error(StatusCode::BAD_REQUEST, &message);
        }
        let (id, report) = self.with_reports(|reports| {
            let id = reports.keys().next_back().map_or(1, |last| last + 1);
            let report = Report {
                id: format!("rpt-{id}"),
                status: ReportStatus::Pending,
                start_date: ask.start_date,
                end_date: ask.end_date,
                format: ask.format,
                rows: 0,
                total_cents: 0,
                by_category: BTreeMap::new(),
                content: None,
                error: None,
                webhook: None,
            };
            reports.insert(id, report.clone());
            (id, report)
        });
        let trace = req
            .headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        tokio::spawn(self.clone().generate(id, trace));
        let url = format!("/reports/{}", report.id);
        let mut resp = json(
            StatusCode::ACCEPTED,
            &serde_json::json!({ "id": report.id, "status": report.status, "url": url }),
        );
        if let Ok(location) = HeaderValue::from_str(&url) {
            resp.headers_mut().insert(header::LOCATION, location);
        }
        resp
    }

    /// The background job: fetch, render, store, notify; the request's `traceparent` (if any)
    /// goes with the fetch and the webhook.
    async fn generate(self: Arc<Self>, id: u64, trace: Option<String>) {
        let report = self.update(id, |r| r.status = ReportStatus::Running);
        let url = format!(
            "{}/api/data/reports?startDate={}&endDate={}",
            self.upstreams.monolith, report.start_date, report.end_date
        );
        let trace: Vec<(&str, &str)> = trace.iter().map(|t| (TRACEPARENT, t.as_str())).collect();
        let outcome = match self.client.send(Method::GET, &url, &trace, None).await {
            Ok(reply) if reply.status == StatusCode::OK => {
                reply.json::<ReportData>().map_err(|e| e.to_string())
            }
            Ok(reply) => Err(format!(
                "monolith answered {}: {}",
                reply.status,
                reply.text()
            )),
            Err(e) => Err(e.to_string()),
        };
        let report = self.update(id, |r| match outcome {
            Ok(data) => render(r, &data),
            Err(message) => {
                r.status = ReportStatus::Failed;
                r.error = Some(message);
            }
        });
        self.notify(id, &report, &trace).await;
    }

    async fn notify(&self, id: u64, report: &Report, trace: &[(&str, &str)]) {
        let Some(webhook) = &self.upstreams.webhook else {
            return;
        };
        let event = if report.status == ReportStatus::Done {
            "report.ready"
        } else {
            "report.failed"
        };
        let body = ReportReady {
            event: event.to_owned(),
            id: report.id.clone(),
            status: report.status,
            url: format!("/reports/{}", report.id),
        };
        let mut outcome = String::new();
        // A few bounded attempts: the gateway may still be starting; a refusal (4xx) is final.
        for attempt in 1..=4u32 {
            let json = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
            let mut headers = vec![("content-type", "application/json")];
            headers.extend_from_slice(trace);
            outcome = match self
                .client
                .send(Method::POST, webhook, &headers, Some(json))
                .await
            {
                Ok(reply) if reply.status.is_success() => {
                    format!("delivered ({})", reply.status.as_u16())
                }
                Ok(reply) if reply.status.is_client_error() => {
                    format!("refused ({}): {}", reply.status.as_u16(), reply.text())
                }
                Ok(reply) => format!("failed ({}): {}", reply.status.as_u16(), reply.text()),
                Err(e) => format!("failed: {e}"),
            };
            if !outcome.starts_with("failed") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250) * attempt).await;
        }
        self.update(id, |r| r.webhook = Some(outcome));
    }

    fn list(&self) -> Response<Body> {
        let reports: Vec<Report> = self.with_reports(|reports| {
            reports
                .values()
                .map(|r| Report {
                    content: None,
                    ..r.clone()
                })
                .collect()
        });
        json(StatusCode::OK, &serde_json::json!({ "reports": reports }))
    }

    fn show(&self, id: &str) -> Response<Body> {
        let found = id
            .strip_prefix("rpt-")
            .and_then(|n| n.parse::<u64>().ok())
            .and_then(|n| self.with_reports(|reports| reports.get(&n).cloned()));
        match found {
            Some(report) => json(StatusCode::OK, &report),
            None => error(StatusCode::NOT_FOUND, &format!("no report `{id}`")),
        }
    }
}

/// Fills in totals and the rendered content; marks the report done.
fn render(report: &mut Report, data: &ReportData) {
    report.rows = data.rows.len();
    report.total_cents = data.rows.iter().map(|r| r.amount_cents).sum();
    report.by_category.clear();
    for row in &data.rows {
        *report.by_category.entry(row.category.clone()).or_default() += row.amount_cents;
    }
    let content = if report.format == "csv" {
        let mut csv = String::from("category,total_cents\n");
        for (category, cents) in &report.by_category {
            csv.push_str(&format!("{category},{cents}\n"));
        }
        csv.push_str(&format!("TOTAL,{}\n", report.total_cents));
        csv
    } else {
        serde_json::json!({ "rows": report.rows, "totalCents": report.total_cents, "byCategory": report.by_category })
            .to_string()
    };
    report.content = Some(content);
    report.status = ReportStatus::Done;
}

/// The app is served through an `Arc` because `POST /reports` spawns work that outlives the request.
#[derive(Debug, Clone)]
pub struct ReportServiceApp(pub Arc<ReportService>);

impl App for ReportServiceApp {
    async fn handle(&self, req: Captured) -> Response<Body> {
        let service = &self.0;
        match (&req.method, req.path.as_str()) {
            (&Method::POST, "/reports") => service.create(&req),
            (&Method::GET, "/reports") => service.list(),
            (&Method::GET, path) if path.starts_with("/reports/") => {
                service.show(&path["/reports/".len()..])
            }
            _ => error(
                StatusCode::NOT_FOUND,
                &format!("no such endpoint: {} {}", req.method, req.path),
            ),
        }
    }

    fn recorder(&self) -> Option<&Recorder> {
        Some(&self.0.recorder)
    }
}
