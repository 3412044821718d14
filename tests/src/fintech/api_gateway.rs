//! The fake API gateway. It has two faces:
//!
//! - **Frontend** ([`Frontend`]): what the browser calls. `/reports…` is forwarded to the report service
//!   and `/api/…` to the monolith, each through the gateway's outbound sidecar (plain HTTP on loopback;
//!   the sidecar originates mTLS and pins the peer's identity). `GET /notifications` lists the webhook
//!   notifications received so far (the in-app notification feed). Authentication and rate limiting,
//!   which a real gateway does here, are out of scope.
//! - **Webhook receiver** ([`WebhookReceiver`]): the app behind the gateway's inbound sidecar;
//!   `POST /webhooks/report-ready` stores the notification together with the caller identity the sidecar
//!   vouched for.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body_util::Full;
use serde::{Deserialize, Serialize};

use super::report_service::{ReportReady, TRACEPARENT, WEBHOOK_PATH};
use crate::harness::app::{
    App, CLIENT_ID_HEADER, Captured, Recorder, ServiceBody as Body, error, json,
};
use crate::harness::client::HttpClient;

/// A webhook notification as the gateway received it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    /// Caller identity from `x-client-spiffe-id` (set by the inbound sidecar), if any.
    pub from: Option<String>,
    /// The notification itself.
    pub event: ReportReady,
}

/// Notifications received, shared by both faces.
#[derive(Debug, Clone, Default)]
pub struct Inbox(Arc<Mutex<Vec<Notification>>>);

impl Inbox {
    fn push(&self, n: Notification) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(n);
    }

    /// Everything received so far.
    pub fn snapshot(&self) -> Vec<Notification> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The app behind the gateway's inbound sidecar.
#[derive(Debug, Clone)]
pub struct WebhookReceiver {
    /// Where notifications go.
    pub inbox: Inbox,
    /// Every request received.
    pub recorder: Recorder,
}

impl App for WebhookReceiver {
    async fn handle(&self, req: Captured) -> Response<Body> {
        if req.method != Method::POST || req.path != WEBHOOK_PATH {
            return error(
                StatusCode::NOT_FOUND,
                &format!("no such endpoint: {} {}", req.method, req.path),
            );
        }
        let event: ReportReady = match serde_json::from_slice(&req.body) {
            Ok(e) => e,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("invalid notification: {e}"),
                );
            }
        };
        let from = req
            .headers
            .get(CLIENT_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        self.inbox.push(Notification { from, event });
        let mut resp = Response::new(Full::default());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        resp
    }

    fn recorder(&self) -> Option<&Recorder> {
        Some(&self.recorder)
    }
}

/// The browser-facing side: routes by path prefix to an upstream reached through the outbound sidecar.
#[derive(Debug, Clone)]
pub struct Frontend {
    /// Base URL of the gateway's outbound sidecar toward the report service.
    pub report_service: String,
    /// Base URL of the gateway's outbound sidecar toward the monolith.
    pub monolith: String,
    /// Notifications, as received by the [`WebhookReceiver`].
    pub inbox: Inbox,
    client: HttpClient,
}

impl Frontend {
    /// A frontend forwarding to the given upstream base URLs.
    pub fn new(report_service: String, monolith: String, inbox: Inbox) -> Self {
        Frontend {
            report_service,
            monolith,
            inbox,
            client: HttpClient::new(Duration::from_secs(20)),
        }
    }

    async fn forward(&self, name: &'static str, base: &str, req: Captured) -> Response<Body> {
        let url = format!("{base}{}", req.path_and_query());
        let content_type = req
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        // The trace context travels on (as an instrumented gateway would), so the sidecars'
        // audit lines of one request share its trace id.
        let traceparent = req.headers.get(TRACEPARENT).and_then(|v| v.to_str().ok());
        let headers: Vec<(&str, &str)> = content_type
            .map(|ct| ("content-type", ct))
            .into_iter()
            .chain(traceparent.map(|t| (TRACEPARENT, t)))
            .collect();
        match self
            .client
            .send(req.method.clone(), &url, &headers, Some(req.body.clone()))
            .await
        {
            Ok(reply) => {
                let mut resp = Response::new(Full::new(reply.body));
                *resp.status_mut() = reply.status;
                for name in [header::CONTENT_TYPE, header::LOCATION] {
                    if let Some(value) = reply.headers.get(&name) {
                        resp.headers_mut().insert(name, value.clone());
                    }
                }
                resp.headers_mut()
                    .insert("x-gateway-upstream", HeaderValue::from_static(name));
                resp
            }
            Err(e) => error(
                StatusCode::BAD_GATEWAY,
                &format!("upstream {name} unreachable: {e}"),
            ),
        }
    }
}

impl App for Frontend {
    async fn handle(&self, req: Captured) -> Response<Body> {
        let path = req.path.as_str();
        if path == "/reports" || path.starts_with("/reports/") {
            self.forward("report-service", &self.report_service, req)
                .await
        } else if path.starts_with("/api/") {
            self.forward("monolith", &self.monolith, req).await
        } else if req.method == Method::GET && path == "/notifications" {
            json(
                StatusCode::OK,
                &serde_json::json!({ "notifications": self.inbox.snapshot() }),
            )
        } else {
            error(
                StatusCode::NOT_FOUND,
                &format!("no such endpoint: {} {}", req.method, req.path),
            )
        }
    }
}
