//! What the sidecar knows about gRPC (issue 17): which requests are gRPC calls, their
//! deadline (`grpc-timeout`), and the trailers-only answer a gRPC client understands when the
//! sidecar, not the app, ends a call (a denial is `PERMISSION_DENIED`, not an HTTP 403 the
//! client would report as `UNKNOWN` or `UNIMPLEMENTED`).
//!
//! Everything else about gRPC is plain HTTP/2 and passes untouched: `te: trailers`
//! ([`super::headers::strip_for_h2`] keeps it), trailers both ways ([`super::body`]), and
//! `grpc-status` / `grpc-message` from the app.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

use super::headers::REQUEST_ID;

/// `grpc-status`.
pub(crate) const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`.
pub(crate) const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// gRPC status codes the sidecar answers with (grpc/doc/statuscodes.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Code {
    /// 4: the call's deadline (or the sidecar's `app_timeout`) passed before the app answered.
    DeadlineExceeded = 4,
    /// 7: the policy denied the call.
    PermissionDenied = 7,
    /// 8: the caller is over a `[[limit]]`.
    ResourceExhausted = 8,
    /// 13: the request was malformed (path, method, framing).
    Internal = 13,
    /// 14: the app is unreachable, or the connection is closing.
    Unavailable = 14,
}

/// Whether a request is a gRPC call: `content-type: application/grpc` or
/// `application/grpc+proto`, `application/grpc;…` (any case).
pub(crate) fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= 16
            && v[..16].eq_ignore_ascii_case(b"application/grpc")
            && matches!(v.get(16), None | Some(b'+' | b';'))
    })
}

/// The call's deadline from `grpc-timeout` (1 to 8 digits and a unit: `H`, `M`, `S`, `m`,
/// `u`, `n`); `None` when absent or malformed (then only the sidecar's own timeout applies).
pub(crate) fn timeout(h: &HeaderMap) -> Option<Duration> {
    let v = h.get(GRPC_TIMEOUT)?.as_bytes();
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A trailers-only gRPC response: HTTP 200, `content-type: application/grpc`, `grpc-status`
/// and `grpc-message` in the one HEADERS frame that ends the stream, and `x-request-id`.
/// `message` is sent as is: it must be printable ASCII without `%` (gRPC percent-encodes
/// others).
pub(crate) fn trailers_only(
    code: Code,
    message: &'static str,
    request_id: &HeaderValue,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(GRPC_STATUS, HeaderValue::from(code as u16));
    h.insert(GRPC_MESSAGE, HeaderValue::from_static(message));
    h.insert(REQUEST_ID, request_id.clone());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn grpc_requests_are_told_by_their_content_type() {
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC;x=1",
        ] {
            assert!(is_grpc(&headers(&[("content-type", ct)])), "{ct}");
        }
        for ct in ["application/grpcx", "application/json", "application/grp"] {
            assert!(!is_grpc(&headers(&[("content-type", ct)])), "{ct}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn grpc_timeout_is_parsed_per_the_spec_and_garbage_is_ignored() {
        let t = |v: &'static str| timeout(&headers(&[("grpc-timeout", v)]));
        assert_eq!(t("1S"), Some(Duration::from_secs(1)));
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("2M"), Some(Duration::from_secs(120)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(t("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "S", "123456789S", "1s", "-1S", "1.5S", "1"] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_trailers_only_answer_ends_the_stream_in_its_head() {
        let resp = trailers_only(
            Code::PermissionDenied,
            "access denied",
            &HeaderValue::from_static("rid"),
        );
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "application/grpc");
        assert_eq!(resp.headers()["grpc-status"], "7");
        assert_eq!(resp.headers()["grpc-message"], "access denied");
        assert!(http_body::Body::is_end_stream(resp.body()));
    }
}
