//! The one JSON error body both sides answer with when the sidecar, not the app or the
//! upstream, makes the response.
//!
//! Schema (both sides): `{"error", "reason", "message", "request_id", …details}`:
//! - `reason`: a stable machine-readable code, the same word as the metric label and the
//!   audit line's `reason` (`bad_path`, `denied`, `identity_mismatch`, `response_timeout`, …);
//! - `message`: one sentence for a human, saying what happened;
//! - `request_id`: the request's `x-request-id` (also sent as that header);
//! - `error`: kept for clients written against earlier releases, with its earlier meaning on
//!   each side (inbound: the status as a word, `forbidden`; outbound: the message);
//! - details of the failure where there are some (outbound: `upstream`, `expected_id`,
//!   `presented_id`, `alert`). Nothing about the policy is ever included (a denial's `reason`
//!   is `denied`, never which rule).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde_json::{Map, Value};

use super::headers::REQUEST_ID;

/// A body the sidecar made itself.
pub(crate) type OwnBody = Full<Bytes>;

/// One error response as the sidecar sends it.
#[derive(Debug)]
pub(crate) struct ErrorResponse<'a> {
    /// The response status.
    pub(crate) status: StatusCode,
    /// The `error` field (see the module docs).
    pub(crate) error: &'a str,
    /// The machine-readable code.
    pub(crate) reason: &'a str,
    /// The sentence.
    pub(crate) message: &'a str,
    /// Further fields, in this order.
    pub(crate) details: &'a [(&'a str, &'a str)],
}

impl ErrorResponse<'_> {
    /// The response: JSON body, `content-type: application/json`, `x-request-id`.
    pub(crate) fn into_response(self, request_id: &HeaderValue) -> Response<OwnBody> {
        let mut body = Map::with_capacity(4 + self.details.len());
        body.insert("error".into(), Value::from(self.error));
        body.insert("reason".into(), Value::from(self.reason));
        body.insert("message".into(), Value::from(self.message));
        body.insert(
            "request_id".into(),
            Value::from(request_id.to_str().unwrap_or_default()),
        );
        for (k, v) in self.details {
            body.insert((*k).to_owned(), Value::from(*v));
        }
        let mut resp = Response::new(Full::new(Bytes::from(Value::Object(body).to_string())));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(REQUEST_ID, request_id.clone());
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_body_has_the_same_fields() {
        let id = HeaderValue::from_static("rid-1");
        let resp = ErrorResponse {
            status: StatusCode::BAD_GATEWAY,
            error: "bad_gateway",
            reason: "app_unreachable",
            message: "the upstream app is unreachable",
            details: &[("upstream", "ledger")],
        }
        .into_response(&id);
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(resp.headers()[REQUEST_ID], "rid-1");
        let body = resp.into_body();
        let bytes = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(body))
            .expect("a full body is ready")
            .expect("infallible")
            .to_bytes();
        let json: Value = serde_json::from_slice(&bytes).expect("JSON");
        for field in ["error", "reason", "message", "request_id", "upstream"] {
            assert!(json[field].is_string(), "{field}: {json}");
        }
        assert_eq!(json["reason"], "app_unreachable");
        assert_eq!(json["request_id"], "rid-1");
    }
}
