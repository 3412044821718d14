//! What became of one request, on either side. An [`Outcome`] is decided once per request and
//! yields everything its end is told with: the HTTP status sent, the metric labels
//! (`decision`, `reason`, `status`) and the audit line's fields of the same names.

use gatehouse_policy::Decision;
use http::StatusCode;

use crate::http::headers::FramingError;

/// The end of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Inbound: refused before (or without) the policy's say.
    Rejected(Rejection),
    /// Inbound: the policy decided. `status` is what the caller got: 403 for a denial; for an
    /// allowed request the app's status, or 502/504 when the app could not answer.
    Decided {
        /// `allow`, `deny` or `audit_deny`.
        decision: &'static str,
        /// `allowed`, `no_route` or `not_allowed`.
        reason: &'static str,
        /// The response status.
        status: StatusCode,
    },
    /// Inbound: the policy allowed the request but the caller is over a `[[limit]]` rate:
    /// 429 with `retry-after`, never forwarded.
    RateLimited,
    /// Inbound: the policy allowed the request but the caller is over a `[[limit]]`
    /// concurrency (or the limiter's table is full of busy callers): 503 with `retry-after`,
    /// never forwarded.
    Overloaded,
    /// Outbound: the upstream's response went to the app.
    Forwarded(StatusCode),
    /// Outbound: the sidecar answered the app itself.
    Failed {
        /// Why ([`crate::outbound::error::OutboundError::reason`]).
        reason: &'static str,
        /// The response status (502, 504, or 400/501 for framing).
        status: StatusCode,
    },
}

/// Why an inbound request was refused before the policy decided (or, for framing, after it
/// allowed the request but before it was forwarded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// A reload stopped trusting the connection's peer: 503.
    PeerNotTrusted,
    /// The method is not spelled as HTTP requires: 400.
    BadMethod,
    /// The path was refused by normalization: 400.
    BadPath,
    /// A `Transfer-Encoding` we do not forward: 501, or 400 when malformed.
    BadFraming(FramingError),
}

impl Outcome {
    /// The policy's `decision` of a request, answered with `status`.
    pub(crate) fn decided(decision: &Decision<'_>, status: StatusCode) -> Self {
        Self::Decided {
            decision: decision.label(),
            reason: decision.reason(),
            status,
        }
    }

    /// The status sent.
    pub(crate) fn status(&self) -> StatusCode {
        match *self {
            Self::Rejected(Rejection::PeerNotTrusted) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Rejected(Rejection::BadMethod | Rejection::BadPath) => StatusCode::BAD_REQUEST,
            Self::Rejected(Rejection::BadFraming(e)) => e.status(),
            Self::Decided { status, .. } | Self::Failed { status, .. } => status,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::Forwarded(status) => status,
        }
    }

    /// The inbound `decision` label: the policy's, or `reject` (refused by the sidecar, as a
    /// limited request is: the policy allowed it, the app never saw it); outbound, `forward` or
    /// `fail` (outbound lines and metrics do not carry it).
    pub(crate) fn decision(&self) -> &'static str {
        match self {
            Self::Rejected(_) | Self::RateLimited | Self::Overloaded => "reject",
            Self::Decided { decision, .. } => decision,
            Self::Forwarded(_) => "forward",
            Self::Failed { .. } => "fail",
        }
    }

    /// The `reason` label.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::Rejected(Rejection::PeerNotTrusted) => "peer_not_trusted",
            Self::Rejected(Rejection::BadMethod) => "bad_method",
            Self::Rejected(Rejection::BadPath) => "bad_path",
            Self::Rejected(Rejection::BadFraming(e)) => e.reason(),
            Self::Decided { reason, .. } | Self::Failed { reason, .. } => reason,
            Self::RateLimited => "rate_limited",
            Self::Overloaded => "overloaded",
            Self::Forwarded(_) => "forwarded",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_outcome_yields_its_status_and_labels() {
        let cases = [
            (
                Outcome::Rejected(Rejection::PeerNotTrusted),
                503,
                "reject",
                "peer_not_trusted",
            ),
            (
                Outcome::Rejected(Rejection::BadMethod),
                400,
                "reject",
                "bad_method",
            ),
            (
                Outcome::Rejected(Rejection::BadPath),
                400,
                "reject",
                "bad_path",
            ),
            (
                Outcome::Decided {
                    decision: "deny",
                    reason: "no_route",
                    status: StatusCode::FORBIDDEN,
                },
                403,
                "deny",
                "no_route",
            ),
            (Outcome::RateLimited, 429, "reject", "rate_limited"),
            (Outcome::Overloaded, 503, "reject", "overloaded"),
            (
                Outcome::Forwarded(StatusCode::OK),
                200,
                "forward",
                "forwarded",
            ),
            (
                Outcome::Failed {
                    reason: "response_timeout",
                    status: StatusCode::GATEWAY_TIMEOUT,
                },
                504,
                "fail",
                "response_timeout",
            ),
        ];
        for (outcome, status, decision, reason) in cases {
            assert_eq!(outcome.status().as_u16(), status, "{outcome:?}");
            assert_eq!(outcome.decision(), decision, "{outcome:?}");
            assert_eq!(outcome.reason(), reason, "{outcome:?}");
        }
    }
}
