//! Errors the sidecar reports, and the one place that maps them to HTTP responses.
//!
//! Load-time problems ([`LoadError`]) are collected, never stop at the first one, and each has a
//! `help:` line; the binary renders them. Request-time failures become small JSON bodies that
//! carry the request id and nothing about the policy (routes are not revealed): 400 for a
//! refused path, method spelling or malformed framing, 501 for a transfer coding we do not
//! forward, 403 for a denial, 429 (over a rate) or 503 (over a concurrency) with `retry-after`
//! for a caller over a `[[limit]]`, 502 when the app is unreachable, 504 when it is too slow.

use http::{HeaderValue, Response, StatusCode};

use crate::config::ConfigError;
use crate::http::respond::ErrorResponse;
pub(crate) use crate::http::respond::OwnBody;
use crate::tls::TlsError;

/// A problem found while loading the configuration, credentials or policy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The configuration file.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Certificates, key, bundle or CRL.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A configured file that could not be read (missing, not a regular file, too large).
    #[error(transparent)]
    File(#[from] crate::input::FileError),
    /// The policy file (already rendered as `file:line:col: message`).
    #[error("{}", policy_location(.0))]
    Policy(gatehouse_policy::Diagnostic),
    /// The policy is written for another trust domain than our certificate's.
    #[error(
        "{policy}: the policy is for trust domain `{policy_td}` but our certificate is in `{cert_td}`"
    )]
    TrustDomainMismatch {
        /// The policy file.
        policy: String,
        /// The policy's trust domain.
        policy_td: String,
        /// Our certificate's trust domain.
        cert_td: String,
    },
    /// Prometheus refused a metric family (a programming error, reported rather than hidden).
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// An `[[outbound]]` entry could not be prepared or bound.
    #[error(transparent)]
    Outbound(#[from] crate::outbound::OutboundSetupError),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: std::net::SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The signal handlers could not be installed.
    #[error("cannot install the SIGTERM/SIGINT handlers: {0}")]
    Signal(#[source] std::io::Error),
    /// An event loop thread (`[runtime] worker_threads`) could not be started.
    #[error("cannot start event loop {index}: {source}")]
    Worker {
        /// Which loop (0 is the main thread).
        index: usize,
        /// The I/O error (thread creation, runtime, or duplicating a listening socket).
        #[source]
        source: std::io::Error,
    },
    /// An online identity's bootstrap file (`ca_bundle`, token, enrollment certificate or
    /// key) is unusable (`sidecar check`).
    #[error("[identity] {0}")]
    Bootstrap(String),
    /// The audit log file could not be opened.
    #[error("{}: cannot open the audit log: {source}", path.display())]
    AuditFile {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

fn policy_location(d: &gatehouse_policy::Diagnostic) -> String {
    if d.line == 0 {
        format!("{}: {}", d.file, d.message)
    } else {
        format!("{}:{}:{}: {}", d.file, d.line, d.col, d.message)
    }
}

impl LoadError {
    /// The `help:` line.
    pub fn help(&self) -> String {
        match self {
            Self::Config(e) => e.help(),
            Self::Tls(e) => e.help(),
            Self::File(e) => e.help(),
            Self::Policy(d) => d.help.clone(),
            Self::TrustDomainMismatch { .. } => {
                "set the policy's trust_domain to the one in our certificate's spiffe:// ID".into()
            }
            Self::Metrics(_) => "report this as a bug".into(),
            Self::Outbound(e) => e.help().into(),
            Self::Bind { .. } => {
                "another process holds the port, or the address is not local: change the listen address".into()
            }
            Self::Signal(_) => "report this as a bug".into(),
            Self::Bootstrap(_) => "fix or replace the file named; it is what the sidecar \
                 presents to the CA on its first contact (`sidecar check` does not contact the CA)"
                .into(),
            Self::Worker { .. } => {
                "lower [runtime] worker_threads, or raise the process's thread and open-files limits (ulimit -u, ulimit -n)".into()
            }
            Self::AuditFile { .. } => "check [audit] path: its directory must exist and be writable".into(),
        }
    }
}

/// Why the sidecar answers a request itself instead of the app.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refusal<'a> {
    /// The path was refused by normalization (the reason is the `PathError` text).
    BadPath(&'a gatehouse_policy::path::PathError),
    /// A standard method in a non-standard spelling (`get`).
    BadMethod(gatehouse_policy::method::MethodError),
    /// A `Transfer-Encoding` we do not forward (400 malformed, 501 unsupported coding).
    BadFraming(crate::http::headers::FramingError),
    /// The policy denied the request (or no route matched).
    Denied,
    /// The app could not be reached or failed mid-response.
    AppUnreachable,
    /// The app did not start its response in time.
    AppTimeout,
    /// The caller's certificate is no longer trusted (revoked by a new CRL, or its root left
    /// the bundle); its connection is closing.
    PeerNoLongerTrusted,
    /// The caller is over a `[[limit]]` rate; `retry-after` in whole seconds.
    RateLimited {
        /// Seconds until a token is available (at least 1).
        retry_after: u64,
    },
    /// The caller is over a `[[limit]]` concurrency; `retry-after` in whole seconds.
    Overloaded {
        /// A hint for the client, in seconds.
        retry_after: u64,
    },
}

impl Refusal<'_> {
    /// The status code.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::BadPath(_) | Self::BadMethod(_) => StatusCode::BAD_REQUEST,
            Self::BadFraming(e) => e.status(),
            Self::Denied => StatusCode::FORBIDDEN,
            Self::AppUnreachable => StatusCode::BAD_GATEWAY,
            Self::AppTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::PeerNoLongerTrusted | Self::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The response for a gRPC call (issue 17): trailers-only, HTTP 200, the gRPC status
    /// closest to [`Self::status`] (a denial is `PERMISSION_DENIED`), and `retry-after` when
    /// over a limit. Otherwise [`Self::response`].
    pub(crate) fn response_for(&self, request_id: &HeaderValue, grpc: bool) -> Response<OwnBody> {
        use crate::http::grpc::{Code, trailers_only};
        if !grpc {
            return self.response(request_id);
        }
        let (code, message) = match self {
            Self::BadPath(_) | Self::BadMethod(_) | Self::BadFraming(_) => {
                (Code::Internal, "request refused by the sidecar: malformed")
            }
            Self::Denied => (Code::PermissionDenied, "access denied"),
            Self::AppUnreachable => (Code::Unavailable, "the upstream app is unreachable"),
            Self::AppTimeout => (
                Code::DeadlineExceeded,
                "the upstream app did not answer in time",
            ),
            Self::PeerNoLongerTrusted => (
                Code::Unavailable,
                "this connection's client certificate is no longer trusted",
            ),
            Self::RateLimited { .. } | Self::Overloaded { .. } => {
                (Code::ResourceExhausted, "this caller is over its limit")
            }
        };
        let mut resp = trailers_only(code, message, request_id);
        if let Self::RateLimited { retry_after } | Self::Overloaded { retry_after } = self {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(*retry_after));
        }
        resp
    }

    /// The response: a JSON body `{"error", "message", "request_id"}` and `x-request-id`
    /// (and `retry-after` when over a limit).
    pub(crate) fn response(&self, request_id: &HeaderValue) -> Response<OwnBody> {
        let (error, reason, message) = match self {
            Self::BadPath(e) => ("bad_request", "bad_path", format!("refused request path: {e}")),
            Self::BadMethod(e) => (
                "bad_request",
                "bad_method",
                format!("refused request method: {e}"),
            ),
            Self::BadFraming(e) => match e.status() {
                StatusCode::NOT_IMPLEMENTED => ("not_implemented", e.reason(), e.to_string()),
                _ => ("bad_request", e.reason(), e.to_string()),
            },
            Self::Denied => ("forbidden", "denied", "access denied".to_owned()),
            Self::AppUnreachable => (
                "bad_gateway",
                "app_unreachable",
                "the upstream app is unreachable".to_owned(),
            ),
            Self::AppTimeout => (
                "gateway_timeout",
                "app_timeout",
                "the upstream app did not answer in time".to_owned(),
            ),
            Self::PeerNoLongerTrusted => (
                "service_unavailable",
                "peer_not_trusted",
                "this connection's client certificate is no longer trusted; the connection is closing"
                    .to_owned(),
            ),
            Self::RateLimited { .. } => (
                "too_many_requests",
                "rate_limited",
                "this caller is over its request rate; retry after the retry-after seconds"
                    .to_owned(),
            ),
            Self::Overloaded { .. } => (
                "service_unavailable",
                "overloaded",
                "this caller has too many requests in flight; retry after the retry-after seconds"
                    .to_owned(),
            ),
        };
        let mut resp = ErrorResponse {
            status: self.status(),
            error,
            reason,
            message: &message,
            details: &[],
        }
        .into_response(request_id);
        if let Self::RateLimited { retry_after } | Self::Overloaded { retry_after } = self {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(*retry_after));
        }
        resp
    }
}
