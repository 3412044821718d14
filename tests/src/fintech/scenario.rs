//! The demo's script: every step is a [`Check`] that either holds (✔) or not (✘), with what was
//! observed. The `fintech-demo` binary prints them as they happen; the end-to-end tests run the same
//! steps and assert each one. The labels are stable (tests look for `✔ <label>`), details vary.

use std::fmt;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::api_gateway::Notification;
use super::probe::{ProbeIdentity, ProbeOutcome, probe};
use super::report_service::{Report, ReportStatus};
use super::stack::{LEAKED_KEY, Service, Stack};
use crate::harness::app::SeenRequest;
use crate::harness::wait;

/// The report the demo asks for (the seed story's request).
pub const REPORT_REQUEST: &str =
    r#"{"startDate":"2024-01-01","endDate":"2024-12-31","format":"csv"}"#;
/// The query the report service must send the monolith for it.
pub const REPORT_QUERY: &str = "startDate=2024-01-01&endDate=2024-12-31";

/// Step labels, in transcript order. Each must appear as `✔ <label>` for the demo to pass.
pub mod label {
    /// Certificates minted.
    pub const MINTED: &str = "minted the CA and every certificate with `ca` (mint.sh)";
    /// All processes up.
    pub const STARTED: &str = "started 3 fake services, their 3 sidecars and the leaked key's sidecar; every /readyz is 200";
    /// Gateway asks for a report.
    pub const REPORT_ACCEPTED: &str = "gateway: POST /reports → 202 Accepted";
    /// Report service fetched the data through mTLS.
    pub const DATA_FETCHED: &str = "report-service fetched GET /api/data/reports through mTLS; the monolith app saw it as report-service";
    /// One request id across both sidecars' audit logs and the app.
    pub const AUDIT_TRAIL: &str = "one request id follows the data fetch: report-service sidecar (outbound) → monolith sidecar (inbound) → app";
    /// Webhook delivered.
    pub const WEBHOOK: &str = "webhook report.ready reached the gateway, sent by report-service";
    /// Report downloaded.
    pub const DOWNLOADED: &str = "gateway: GET /reports/{id} → 200, report done";
    /// Gateway allowed on the dashboard.
    pub const DASHBOARD: &str = "gateway: GET /api/dashboard → 200 (allowed)";
    /// Gateway denied on the report data.
    pub const DENIED: &str = "gateway: GET /api/data/reports → 403 Forbidden";
    /// The app never saw the denied request.
    pub const NOT_SEEN: &str = "the monolith app never saw the gateway's denied request";
    /// The denial is in the audit log.
    pub const AUDITED: &str = "the monolith sidecar's audit log records the denial";
    /// Control: the probe client works with a valid certificate.
    pub const CONTROL: &str =
        "control: the same raw mTLS client with report-service's valid SVID → HTTP 200";
    /// Foreign CA refused.
    pub const IMPOSTOR: &str =
        "impostor (report-service SVID from a foreign CA) refused at the handshake";
    /// Revoked certificate refused.
    pub const REVOKED: &str = "revoked report-service certificate refused at the handshake";
    /// The revoked key behind its own sidecar gets 502 naming the alert.
    pub const REVOKED_SIDECAR: &str =
        "a sidecar running the revoked key is refused too: 502 naming `certificate_revoked`";
    /// Neither reached the app.
    pub const REFUSED_NOT_SEEN: &str =
        "the monolith app saw no request from the impostor or the revoked key";
    /// The running report service's own SVID revoked: refused without any restart.
    pub const LIVE_REVOKED: &str = "live revocation: report-service's SVID revoked with `ca revoke --crl`; refused with no restart";
    /// A new SVID issued: back in service without any restart.
    pub const LIVE_REISSUED: &str = "re-issued with `ca issue`: report-service's sidecar picks up the new SVID, the data fetch works again";
    /// Metrics account for it all.
    pub const METRICS: &str =
        "monolith sidecar /metrics counts the allow, the deny and the refused handshakes";

    /// Every label, in order.
    pub const ALL: [&str; 19] = [
        MINTED,
        STARTED,
        REPORT_ACCEPTED,
        DATA_FETCHED,
        AUDIT_TRAIL,
        WEBHOOK,
        DOWNLOADED,
        DASHBOARD,
        DENIED,
        NOT_SEEN,
        AUDITED,
        CONTROL,
        IMPOSTOR,
        REVOKED,
        REVOKED_SIDECAR,
        REFUSED_NOT_SEEN,
        LIVE_REVOKED,
        LIVE_REISSUED,
        METRICS,
    ];
}

/// One assertion of the transcript.
#[derive(Debug, Clone)]
pub struct Check {
    /// Did it behave as expected?
    pub ok: bool,
    /// Stable label (see [`label`]).
    pub label: &'static str,
    /// What was observed; indented lines follow the check in the transcript.
    pub detail: String,
}

impl Check {
    /// A check that holds when `result` is `Ok(detail)`.
    pub fn from_result(label: &'static str, result: Result<String, String>) -> Self {
        match result {
            Ok(detail) => Check {
                ok: true,
                label,
                detail,
            },
            Err(detail) => Check {
                ok: false,
                label,
                detail,
            },
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = if self.ok { '✔' } else { '✘' };
        write!(f, "{mark} {}", self.label)?;
        for line in self.detail.lines() {
            write!(f, "\n      {line}")?;
        }
        Ok(())
    }
}

/// Runs every step against a started stack, handing each check to `report` as soon as it is known.
pub async fn run(stack: &Stack, report: &mut dyn FnMut(&Check)) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut record = |check: Check| {
        report(&check);
        checks.push(check);
    };
    for check in report_flow(stack).await {
        record(check);
    }
    for check in denied_flow(stack).await {
        record(check);
    }
    for check in refused_handshakes(stack).await {
        record(check);
    }
    for check in live_revocation(stack).await {
        record(check);
    }
    record(Check::from_result(
        label::METRICS,
        metrics_excerpt(stack).await,
    ));
    checks
}

/// The async report flow: request, data fetch over mTLS, webhook, download.
pub async fn report_flow(stack: &Stack) -> Vec<Check> {
    let client = stack.client();
    let body: Value = serde_json::from_str(REPORT_REQUEST).expect("static JSON");
    let accepted = match client
        .post_json(&stack.frontend_url("/reports"), &body)
        .await
    {
        Ok(reply) if reply.status.as_u16() == 202 => {
            reply.json::<Value>().map_err(|e| e.to_string())
        }
        Ok(reply) => Err(format!("answered {}: {}", reply.status, reply.text())),
        Err(e) => Err(e.to_string()),
    };
    let id = match accepted.as_ref().ok().and_then(|v| v["id"].as_str()) {
        Some(id) => id.to_owned(),
        None => {
            let detail = accepted.map_or_else(|e| e, |v| format!("no id in {v}"));
            return vec![Check {
                ok: false,
                label: label::REPORT_ACCEPTED,
                detail,
            }];
        }
    };
    let mut checks = vec![Check {
        ok: true,
        label: label::REPORT_ACCEPTED,
        detail: format!("{REPORT_REQUEST} → id {id}, generated in the background"),
    }];
    let notification = wait_for_notification(stack, &id).await;
    checks.push(Check::from_result(
        label::DATA_FETCHED,
        data_fetch(stack).await,
    ));
    checks.push(Check::from_result(
        label::AUDIT_TRAIL,
        audit_trail(stack).await,
    ));
    checks.push(Check::from_result(label::WEBHOOK, notification));
    checks.push(Check::from_result(
        label::DOWNLOADED,
        download(stack, &id).await,
    ));
    checks
}

async fn wait_for_notification(stack: &Stack, id: &str) -> Result<String, String> {
    let url = stack.frontend_url("/notifications");
    let found = wait::until(Duration::from_secs(45), || async {
        let reply = stack.client().get(&url).await.ok()?;
        let list: Value = reply.json().ok()?;
        let notes: Vec<Notification> =
            serde_json::from_value(list["notifications"].clone()).ok()?;
        notes.into_iter().find(|n| n.event.id == id)
    })
    .await
    .ok_or_else(|| format!("no notification for {id} within 45s (see logs/report-service.log)"))?;
    let expected = Service::ReportService.spiffe_id();
    if found.from.as_deref() != Some(expected.as_str()) || found.event.event != "report.ready" {
        return Err(format!(
            "unexpected notification {found:?}; expected report.ready from {expected}"
        ));
    }
    Ok(format!(
        "POST /webhooks/report-ready {{\"event\":\"report.ready\",\"id\":\"{id}\"}}, x-client-spiffe-id: {expected}"
    ))
}

async fn data_fetch(stack: &Stack) -> Result<String, String> {
    let seen = stack.seen(Service::Monolith).await?;
    let fetch = seen
        .iter()
        .find(|r| r.path == "/api/data/reports" && r.query.as_deref() == Some(REPORT_QUERY))
        .ok_or_else(|| format!("the monolith app saw no GET /api/data/reports?{REPORT_QUERY}"))?;
    let expected = Service::ReportService.spiffe_id();
    if fetch.caller().as_ref() != Some(&expected) {
        return Err(format!(
            "x-client-spiffe-id was {:?}, expected {expected}",
            fetch.header("x-client-spiffe-id")
        ));
    }
    let xfcc = fetch.header("x-forwarded-client-cert").unwrap_or("");
    if !xfcc.contains(&format!("URI={expected}")) {
        return Err(format!(
            "x-forwarded-client-cert `{xfcc}` does not name {expected}"
        ));
    }
    Ok(format!(
        "report-service app → 127.0.0.1:{} (plain) → sidecar mTLS → monolith sidecar {} → app\n\
         monolith app saw: x-client-spiffe-id: {expected}\n\
         x-forwarded-client-cert: {xfcc}",
        stack
            .ports()
            .outbound(Service::ReportService, Service::Monolith)
            .map_or(0, |a| a.port()),
        stack.ports().inbound(Service::Monolith),
    ))
}

/// The report service's data fetch, followed by its request id through the outbound audit line of the
/// report service's sidecar, the inbound audit line of the monolith's sidecar and the app's headers.
async fn audit_trail(stack: &Stack) -> Result<String, String> {
    let outbound = wait::until(Duration::from_secs(10), || async {
        stack
            .audit(Service::ReportService)
            .await
            .into_iter()
            .find(|l| {
                l["direction"] == "outbound"
                    && l["upstream"] == "monolith"
                    && l["path"] == "/api/data/reports"
            })
    })
    .await
    .ok_or("no outbound audit line for the data fetch in report-service/audit.jsonl")?;
    let id = outbound["request_id"]
        .as_str()
        .ok_or("outbound audit line without request_id")?
        .to_owned();
    let inbound = wait::until(Duration::from_secs(10), || async {
        stack
            .audit(Service::Monolith)
            .await
            .into_iter()
            .find(|l| l["request_id"] == id.as_str())
    })
    .await
    .ok_or_else(|| format!("request id {id} is not in monolith/audit.jsonl"))?;
    let caller = Service::ReportService.spiffe_id();
    if inbound["caller"] != caller.as_str() || inbound["decision"] != "allow" {
        return Err(format!("monolith audit line for {id}: {inbound}"));
    }
    let seen = stack.seen(Service::Monolith).await?;
    if !seen
        .iter()
        .any(|r| r.header("x-request-id") == Some(id.as_str()))
    {
        return Err(format!(
            "the monolith app saw no request with x-request-id {id}"
        ));
    }
    Ok(format!(
        "x-request-id {id}\nreport-service sidecar: {outbound}\nmonolith sidecar:       {inbound}"
    ))
}

async fn download(stack: &Stack, id: &str) -> Result<String, String> {
    let reply = stack
        .client()
        .get(&stack.frontend_url(&format!("/reports/{id}")))
        .await
        .map_err(|e| e.to_string())?;
    if reply.status.as_u16() != 200 {
        return Err(format!("answered {}: {}", reply.status, reply.text()));
    }
    let report: Report = reply.json().map_err(|e| e.to_string())?;
    let content = report.content.clone().unwrap_or_default();
    if report.status != ReportStatus::Done
        || report.rows != 366
        || !content.starts_with("category,total_cents")
    {
        return Err(format!("unexpected report: {report:?}"));
    }
    let total = format!(
        "{}.{:02}",
        report.total_cents / 100,
        report.total_cents % 100
    );
    Ok(format!(
        "{} rows, total {total}, webhook {}\n{}",
        report.rows,
        report.webhook.unwrap_or_default(),
        content.trim_end()
    ))
}

fn count_reports_api(seen: &[SeenRequest]) -> usize {
    seen.iter()
        .filter(|r| r.path == "/api/data/reports")
        .count()
}

/// The gateway allowed on the dashboard, denied on the report data, and the app never seeing it.
pub async fn denied_flow(stack: &Stack) -> Vec<Check> {
    let client = stack.client();
    let dashboard = match client.get(&stack.frontend_url("/api/dashboard")).await {
        Ok(reply) if reply.status.as_u16() == 200 => Ok(reply.text()),
        Ok(reply) => Err(format!("answered {}: {}", reply.status, reply.text())),
        Err(e) => Err(e.to_string()),
    };
    let mut checks = vec![Check::from_result(label::DASHBOARD, dashboard)];
    let before = stack
        .seen(Service::Monolith)
        .await
        .map(|s| count_reports_api(&s));
    let path = "/api/data/reports?startDate=2024-01-01&endDate=2024-01-31";
    let denied = match client.get(&stack.frontend_url(path)).await {
        Ok(reply) if reply.status.as_u16() == 403 => Ok(format!(
            "GET {path}\nmonolith sidecar answered: {}",
            reply.text()
        )),
        Ok(reply) => Err(format!("answered {}: {}", reply.status, reply.text())),
        Err(e) => Err(e.to_string()),
    };
    checks.push(Check::from_result(label::DENIED, denied));
    let after = stack
        .seen(Service::Monolith)
        .await
        .map(|s| count_reports_api(&s));
    let not_seen = match (before, after) {
        (Ok(b), Ok(a)) if a == b => Ok(format!(
            "/api/data/reports requests seen by the app: {b} before, {a} after"
        )),
        (Ok(b), Ok(a)) => Err(format!(
            "/api/data/reports requests seen by the app: {b} before, {a} after"
        )),
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    checks.push(Check::from_result(label::NOT_SEEN, not_seen));
    checks.push(Check::from_result(
        label::AUDITED,
        audited_denial(stack).await,
    ));
    checks
}

async fn audited_denial(stack: &Stack) -> Result<String, String> {
    let gateway = Service::ApiGateway.spiffe_id();
    let line = wait::until(Duration::from_secs(10), || async {
        stack.audit(Service::Monolith).await.into_iter().find(|l| {
            l["caller"].as_str() == Some(gateway.as_str())
                && l["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("/api/data/reports"))
                && l["decision"].as_str() == Some("deny")
        })
    })
    .await;
    match line {
        Some(line) => Ok(line.to_string()),
        None => Err(format!(
            "no deny line for {gateway} in monolith/audit.jsonl"
        )),
    }
}

/// The raw mTLS client against the monolith's sidecar: valid SVID (control), foreign CA, revoked.
pub async fn refused_handshakes(stack: &Stack) -> Vec<Check> {
    let certs = stack.certs_dir();
    let addr = stack.ports().inbound(Service::Monolith);
    let path = format!("/api/data/reports?{REPORT_QUERY}");
    let before = stack.seen(Service::Monolith).await.map(|s| s.len());
    let outcome = |who: &str| {
        let identity = ProbeIdentity::in_dir(&certs.join(who));
        let path = path.clone();
        async move {
            probe(addr, &identity, &path)
                .await
                .map_err(|e| e.to_string())
        }
    };
    let control = match outcome("report-service").await {
        Ok(ProbeOutcome::Answered { status: 200 }) => Ok(format!("GET {path} → HTTP 200")),
        Ok(other) => Err(format!("expected HTTP 200, got: {other}")),
        Err(e) => Err(e),
    };
    let after_control = stack.seen(Service::Monolith).await.map(|s| s.len());
    let refused = |who: &'static str, res: Result<ProbeOutcome, String>| match res {
        Ok(o @ ProbeOutcome::Refused { .. }) => Ok(format!("certs/{who}: {o}")),
        Ok(other) => Err(format!(
            "certs/{who}: expected a refused handshake, got: {other}"
        )),
        Err(e) => Err(e),
    };
    let impostor = refused("impostor", outcome("impostor").await);
    let serial = tokio::fs::read_to_string(certs.join("revoked-report-service/serial"))
        .await
        .unwrap_or_default();
    let revoked = refused(
        "revoked-report-service",
        outcome("revoked-report-service").await,
    )
    .map(|d| format!("serial {} (in certs/crl.pem)\n{d}", serial.trim()));
    let leaked = leaked_key_sidecar(stack).await;
    let after = stack.seen(Service::Monolith).await.map(|s| s.len());
    let not_seen = match (after_control.clone(), after) {
        (Ok(a), Ok(b)) if a == b => Ok(format!(
            "requests seen by the monolith app: {a} before, {b} after"
        )),
        (Ok(a), Ok(b)) => Err(format!(
            "requests seen by the monolith app: {a} before, {b} after"
        )),
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    let control = match (control, before, after_control) {
        (Ok(d), Ok(b), Ok(a)) if a == b + 1 => Ok(d),
        (Ok(_), Ok(b), Ok(a)) => Err(format!(
            "app saw {} requests for one control request",
            a.saturating_sub(b)
        )),
        (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => Err(e),
    };
    vec![
        Check::from_result(label::CONTROL, control),
        Check::from_result(label::IMPOSTOR, impostor),
        Check::from_result(label::REVOKED, revoked),
        Check::from_result(label::REVOKED_SIDECAR, leaked),
        Check::from_result(label::REFUSED_NOT_SEEN, not_seen),
    ]
}

/// The sidecar running the leaked, revoked key asks the monolith for the report data: its own sidecar
/// must answer 502 naming the alert the monolith's sidecar sent, `certificate_revoked`.
async fn leaked_key_sidecar(stack: &Stack) -> Result<String, String> {
    let url = format!(
        "http://{}/api/data/reports?{REPORT_QUERY}",
        stack.ports().leaked_key_outbound()
    );
    let reply = stack.client().get(&url).await.map_err(|e| e.to_string())?;
    let body: Value = reply.json().unwrap_or(Value::Null);
    if reply.status.as_u16() == 502 && body["alert"] == "certificate_revoked" {
        Ok(format!(
            "GET {url}
{LEAKED_KEY} sidecar answered 502: {}",
            reply.text()
        ))
    } else {
        Err(format!(
            "expected 502 naming certificate_revoked, got {}: {}",
            reply.status,
            reply.text()
        ))
    }
}

/// Incident response while everything runs: the report service's current key is declared compromised
/// and revoked (`ca revoke --crl certs/crl.pem`); every sidecar reloads the CRL on its own, so the
/// report service's data fetch is refused (its sidecar answers 502 `certificate_revoked`); then a new
/// SVID is issued into `certs/report-service/` and the report service's sidecar reloads it, so the
/// fetch works again. No process is restarted.
pub async fn live_revocation(stack: &Stack) -> Vec<Check> {
    let revoked = revoke_live(stack).await;
    let reissued = match &revoked {
        Ok(_) => reissue(stack).await,
        Err(_) => Err("skipped: the revocation step failed".to_owned()),
    };
    vec![
        Check::from_result(label::LIVE_REVOKED, revoked),
        Check::from_result(label::LIVE_REISSUED, reissued),
    ]
}

/// What the report service's app gets for a data fetch through its outbound sidecar: status and body.
async fn fetch_as_report_service(stack: &Stack) -> Option<(u16, Value)> {
    let outbound = stack
        .ports()
        .outbound(Service::ReportService, Service::Monolith)?;
    let url = format!("http://{outbound}/api/data/reports?startDate=2024-03-01&endDate=2024-03-31");
    let reply = stack.client().get(&url).await.ok()?;
    Some((reply.status.as_u16(), reply.json().unwrap_or(Value::Null)))
}

async fn revoke_live(stack: &Stack) -> Result<String, String> {
    let inspected = stack
        .ca(&[
            "inspect",
            "--format",
            "json",
            "certs/report-service/cert.pem",
        ])
        .await?;
    let inspected: Value =
        serde_json::from_str(&inspected).map_err(|e| format!("ca inspect output: {e}"))?;
    let serial = inspected["serial"]
        .as_str()
        .ok_or("no serial in `ca inspect` output")?
        .to_owned();
    let started = Instant::now();
    stack
        .ca(&[
            "revoke",
            "--dir",
            "certs/ca",
            "--serial",
            &serial,
            "--reason",
            "key-compromise",
            "--crl",
            "certs/crl.pem",
        ])
        .await?;
    let refused = wait::until(Duration::from_secs(30), || async {
        fetch_as_report_service(stack)
            .await
            .filter(|(status, body)| *status == 502 && body["alert"] == "certificate_revoked")
    })
    .await;
    let identity = ProbeIdentity::in_dir(&stack.certs_dir().join("report-service"));
    let path = format!("/api/data/reports?{REPORT_QUERY}");
    let probe = probe(stack.ports().inbound(Service::Monolith), &identity, &path)
        .await
        .map_err(|e| e.to_string())?;
    match (refused, probe) {
        (Some((_, body)), ProbeOutcome::Refused { reason }) => Ok(format!(
            "ca revoke --serial {serial} --reason key-compromise --crl certs/crl.pem\n\
             after {:.1}s the report service's data fetch got 502 from its sidecar: {body}\n\
             raw mTLS client with the same SVID: refused at the handshake ({reason})",
            started.elapsed().as_secs_f64()
        )),
        (None, _) => Err(format!(
            "the data fetch was not refused with certificate_revoked within 30s (serial {serial})"
        )),
        (_, other) => Err(format!(
            "raw client with the revoked SVID: expected a refused handshake, got {other}"
        )),
    }
}

async fn reissue(stack: &Stack) -> Result<String, String> {
    let id = Service::ReportService.spiffe_id();
    let started = Instant::now();
    stack
        .ca(&[
            "issue",
            "--dir",
            "certs/ca",
            "--spiffe-id",
            id.as_str(),
            "--ttl",
            "24h",
            "--out",
            "certs/report-service",
        ])
        .await?;
    let back = wait::until(Duration::from_secs(30), || async {
        fetch_as_report_service(stack)
            .await
            .filter(|(status, _)| *status == 200)
    })
    .await;
    match back {
        Some((_, body)) => Ok(format!(
            "ca issue --spiffe-id {id} --out certs/report-service\n\
             after {:.1}s the data fetch through the report service's sidecar answered 200 ({} rows)",
            started.elapsed().as_secs_f64(),
            body["rows"].as_array().map_or(0, Vec::len)
        )),
        None => Err("the data fetch did not answer 200 within 30s of the re-issue".to_owned()),
    }
}

/// The `gatehouse_*` sample lines of `metrics` whose name starts with one of `families`.
pub fn excerpt(metrics: &str, families: &[&str]) -> Vec<String> {
    metrics
        .lines()
        .filter(|l| families.iter().any(|f| l.starts_with(f)))
        .map(str::to_owned)
        .collect()
}

fn sample_value(line: &str) -> f64 {
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn metrics_excerpt(stack: &Stack) -> Result<String, String> {
    // Counters are bumped as the sidecar finishes with a connection, which can trail the client's view
    // by a moment on a loaded machine: poll briefly for the expected counts.
    match wait::until(Duration::from_secs(10), async || {
        judge_metrics(stack).await.ok()
    })
    .await
    {
        Some(judged) => Ok(judged),
        None => judge_metrics(stack).await,
    }
}

async fn judge_metrics(stack: &Stack) -> Result<String, String> {
    let text = stack.metrics(Service::Monolith).await?;
    let lines = excerpt(
        &text,
        &[
            "gatehouse_inbound_requests_total",
            "gatehouse_tls_handshakes_total",
            "gatehouse_reloads_total",
        ],
    );
    let has = |needles: &[&str], min: f64| {
        lines
            .iter()
            .any(|l| needles.iter().all(|n| l.contains(n)) && sample_value(l) >= min)
    };
    let allow = has(
        &[
            "gatehouse_inbound_requests_total",
            "caller=\"report-service\"",
            "decision=\"allow\"",
        ],
        1.0,
    );
    let deny = has(
        &[
            "gatehouse_inbound_requests_total",
            "caller=\"api-gateway\"",
            "decision=\"deny\"",
        ],
        1.0,
    );
    let failed: f64 = lines
        .iter()
        .filter(|l| {
            l.starts_with("gatehouse_tls_handshakes_total") && l.contains("result=\"error\"")
        })
        .map(|l| sample_value(l))
        .sum();
    let mut detail = lines.join("\n");
    if let Ok(outbound) = stack.metrics(Service::ReportService).await {
        let outbound = excerpt(&outbound, &["gatehouse_outbound_requests_total"]);
        if !outbound.is_empty() {
            detail.push_str("\nreport-service sidecar:\n");
            detail.push_str(&outbound.join("\n"));
        }
    }
    if allow && deny && failed >= 3.0 {
        Ok(detail)
    } else {
        Err(format!(
            "allow counted: {allow}, deny counted: {deny}, failed handshakes: {failed} (want ≥ 3)\n{detail}"
        ))
    }
}
