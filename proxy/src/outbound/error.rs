//! What can go wrong between the app's plaintext request and the upstream's response, and how
//! each failure is told to the app: a JSON body, 502 for "the upstream could not be reached or
//! refused us", 504 for "it took too long", 400/501 for a request framing we do not forward.
//! The `reason` is also the metric label.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use gatehouse_policy::{IdentityPattern, SpiffeId};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

use crate::http::respond::ErrorResponse;
use crate::outcome::Outcome;
use crate::tls::client::{
    ServerIdentityError, alert_name, received_alert, rustls_error, server_identity_error,
};

/// A failed outbound request. Every variant is answered by the sidecar itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum OutboundError {
    /// The server's certificate is valid but proves another identity. No request byte was sent.
    #[error("upstream identity mismatch: expected `{expected}`, server presented `{presented}`")]
    IdentityMismatch {
        /// What the `[[outbound]]` entry pins (`server_id`).
        expected: IdentityPattern,
        /// What the server's certificate says.
        presented: SpiffeId,
    },
    /// The server's certificate did not verify (other CA, expired, revoked, not an SVID).
    #[error("upstream certificate refused: {0}")]
    ServerCertificate(#[source] io::Error),
    /// The server refused our client certificate: a fatal alert during the handshake or, in
    /// TLS 1.3, on the first read after the request was written.
    #[error("upstream refused our client certificate (TLS alert `{alert}`)")]
    ClientCertificateRejected {
        /// The alert the server sent, e.g. `unknown_ca`, `certificate_required`.
        alert: String,
    },
    /// The server ended the handshake with an alert unrelated to certificates.
    #[error("TLS handshake with upstream failed (TLS alert `{alert}`)")]
    HandshakeAlert {
        /// The alert the server sent, e.g. `protocol_version`.
        alert: String,
    },
    /// The handshake failed for another reason (connection reset, malformed messages).
    #[error("TLS handshake with upstream failed: {0}")]
    Handshake(#[source] io::Error),
    /// The host of `connect` did not resolve.
    #[error("could not resolve `{host}`: {source}")]
    Resolve {
        /// The host that did not resolve.
        host: String,
        /// The resolver's error.
        #[source]
        source: io::Error,
    },
    /// No TCP connection could be opened.
    #[error("could not connect to upstream {addr}: {source}")]
    Connect {
        /// The last address tried.
        addr: String,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// DNS, TCP and TLS together took longer than the connect timeout.
    #[error("connecting to upstream timed out after {0:?}")]
    ConnectTimeout(Duration),
    /// The upstream did not send a response head in time.
    #[error("upstream did not respond within {0:?}")]
    ResponseTimeout(Duration),
    /// Every pooled connection stayed busy, and no new one was allowed, for too long.
    #[error("no upstream connection became available within {0:?}")]
    PoolTimeout(Duration),
    /// The upstream closed the connection before the request could be written, on a fresh
    /// connection too (the request was retried once, nothing was sent).
    #[error("upstream closed the connection before the request could be written")]
    ClosedBeforeSend,
    /// The HTTP exchange with the upstream failed after the connection was established.
    #[error("upstream connection failed: {0}")]
    Upstream(#[source] crate::http::body::BoxError),
    /// The app's request claims a `Transfer-Encoding` we would not forward as it is (the
    /// inbound side refuses the same ones); nothing was sent.
    #[error("request not forwarded: {0}")]
    Framing(#[source] crate::http::headers::FramingError),
}

impl OutboundError {
    /// Classifies a failed TLS handshake (the error tokio-rustls returns).
    pub(crate) fn from_handshake(err: io::Error) -> Self {
        if let Some(e) = server_identity_error(&err) {
            return match e {
                ServerIdentityError::Mismatch {
                    expected,
                    presented,
                } => Self::IdentityMismatch {
                    expected: expected.clone(),
                    presented: presented.clone(),
                },
                _ => Self::ServerCertificate(err),
            };
        }
        if let Some(alert) = received_alert(&err) {
            return Self::from_alert(alert);
        }
        match rustls_error(&err) {
            Some(rustls::Error::InvalidCertificate(_)) => Self::ServerCertificate(err),
            _ => Self::Handshake(err),
        }
    }

    /// A fatal alert from the server: about our certificate, or about the handshake.
    pub(crate) fn from_alert(alert: rustls::AlertDescription) -> Self {
        use rustls::AlertDescription as A;
        let name = alert_name(alert);
        match alert {
            A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::CertificateRequired => Self::ClientCertificateRejected { alert: name },
            _ => Self::HandshakeAlert { alert: name },
        }
    }

    /// Whether the failure happened before a connection existed and before any request byte
    /// was written, with a cause that a second attempt could plausibly avoid (a refused or
    /// reset TCP connection). Certificate and identity failures are deterministic: never
    /// retried.
    pub(crate) fn is_retryable(&self) -> bool {
        matches!(self, Self::Connect { .. } | Self::Handshake(_))
    }

    /// What this failure says about the endpoint that caused it, for the balancer's outlier
    /// ejection: connect and TLS failures (a wrong `server_id` included) count against it,
    /// response timeouts and broken exchanges as gateway errors; failures that are not the
    /// endpoint's (no endpoint, our pool full, a request we refused to forward) say nothing.
    pub(crate) fn endpoint_outcome(&self) -> Option<crate::balance::Outcome> {
        use crate::balance::Outcome as O;
        match self {
            Self::IdentityMismatch { .. }
            | Self::ServerCertificate(_)
            | Self::ClientCertificateRejected { .. }
            | Self::HandshakeAlert { .. }
            | Self::Handshake(_)
            | Self::Connect { .. }
            | Self::ConnectTimeout(_) => Some(O::ConnectFailure),
            Self::ResponseTimeout(_) | Self::ClosedBeforeSend | Self::Upstream(_) => {
                Some(O::GatewayError)
            }
            Self::Resolve { .. } | Self::PoolTimeout(_) | Self::Framing(_) => None,
        }
    }

    /// The metric label and the `reason` field of the JSON body.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::IdentityMismatch { .. } => "identity_mismatch",
            Self::ServerCertificate(_) => "server_certificate",
            Self::ClientCertificateRejected { .. } => "client_certificate_rejected",
            Self::HandshakeAlert { .. } => "handshake_alert",
            Self::Handshake(_) => "handshake",
            Self::Resolve { .. } => "dns",
            Self::Connect { .. } => "connect",
            Self::ConnectTimeout(_) => "connect_timeout",
            Self::ResponseTimeout(_) => "response_timeout",
            Self::PoolTimeout(_) => "pool_timeout",
            Self::ClosedBeforeSend => "upstream_closed",
            Self::Upstream(_) => "upstream",
            Self::Framing(e) => e.reason(),
        }
    }

    /// The request's [`Outcome`] when this error answered it.
    pub(crate) fn outcome(&self) -> Outcome {
        Outcome::Failed {
            reason: self.reason(),
            status: self.status(),
        }
    }

    /// The status the app receives: 504 for timeouts, 400 or 501 for a request we would not
    /// forward, 502 for everything else.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::ConnectTimeout(_) | Self::ResponseTimeout(_) | Self::PoolTimeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Self::Framing(e) => e.status(),
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// The response the sidecar sends the app in place of the upstream's.
    pub(crate) fn to_response(
        &self,
        upstream: &str,
        request_id: &HeaderValue,
    ) -> Response<Full<Bytes>> {
        let message = self.to_string();
        let expected;
        let details: &[(&str, &str)] = match self {
            Self::IdentityMismatch {
                expected: e,
                presented,
            } => {
                expected = e.to_string();
                &[
                    ("upstream", upstream),
                    ("expected_id", &expected),
                    ("presented_id", presented.as_str()),
                ]
            }
            Self::ClientCertificateRejected { alert } | Self::HandshakeAlert { alert } => {
                &[("upstream", upstream), ("alert", alert)]
            }
            _ => &[("upstream", upstream)],
        };
        ErrorResponse {
            status: self.status(),
            error: &message,
            reason: self.reason(),
            message: &message,
            details,
        }
        .into_response(request_id)
    }
}
