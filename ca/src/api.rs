//! The JSON types of `ca serve`'s HTTP API, version 1 (shared with enrollment clients).
//!
//! | Method and path   | Request body          | Credential                                   | Answer             |
//! |-------------------|-----------------------|----------------------------------------------|--------------------|
//! | `POST /v1/enroll` | [`EnrollRequest`]     | `token` field, enrollment client cert, or    | [`CertResponse`]   |
//! |                   |                       | `Authorization: Bearer` k8s SA token         |                    |
//! | `POST /v1/renew`  | [`RenewRequest`]      | the current SVID as TLS client certificate   | [`CertResponse`]   |
//! | `GET /v1/bundle`  | -                     | none                                         | PEM, `ETag`        |
//! | `GET /v1/crl`     | -                     | none                                         | PEM, `ETag`        |
//!
//! Errors are [`ErrorResponse`] with a 4xx or 5xx status. `GET` answers honour `If-None-Match`
//! (304). Request bodies are limited to [`MAX_BODY`] bytes.

use serde::{Deserialize, Serialize};

/// Path of the enrollment endpoint.
pub const ENROLL_PATH: &str = "/v1/enroll";
/// Path of the renewal endpoint.
pub const RENEW_PATH: &str = "/v1/renew";
/// Path of the trust bundle.
pub const BUNDLE_PATH: &str = "/v1/bundle";
/// Path of the CRLs.
pub const CRL_PATH: &str = "/v1/crl";
/// Largest request body accepted (bytes); larger bodies get 413.
pub const MAX_BODY: usize = 64 * 1024;

/// `POST /v1/enroll`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// PKCS#10 request, PEM (`CERTIFICATE REQUEST`). Only its public key is used, after its
    /// signature verifies; subject, SANs and extensions are ignored.
    pub csr: String,
    /// Join token from `ca token create`; it decides the SPIFFE ID. Omit it when presenting an
    /// enrollment certificate (`ca enrollment issue`) as the TLS client certificate instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// `POST /v1/renew` (over mTLS with the current SVID, which decides the SPIFFE ID).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// PKCS#10 request, PEM, for a new key (the current certificate's key is refused).
    pub csr: String,
}

/// The answer to enroll and renew.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertResponse {
    /// The identity in the certificate (from the credential, never from the CSR).
    pub spiffe_id: String,
    /// Leaf followed by the intermediate (if any), PEM.
    pub cert_chain: String,
    /// The trust bundle (every active root), PEM.
    pub bundle: String,
    /// End of validity of the leaf, RFC 3339.
    pub not_after: String,
    /// Serial of the leaf, lowercase hex.
    pub serial: String,
}

/// Every error answer: a stable code and a sentence that says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// Stable machine-readable code, e.g. `token_used`, `bad_csr`, `no_client_certificate`.
    pub error: String,
    /// What went wrong and what to do next.
    pub message: String,
}
