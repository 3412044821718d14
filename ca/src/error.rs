//! [`CaError`]: everything the CA library can refuse or fail at.

use std::path::PathBuf;

use gatehouse_policy::{IdError, SpiffeId, TrustDomain};

/// An error from the CA library.
///
/// Variants carry what a message needs (directory, serial, identity, expected versus presented).
/// [`CaError::is_refusal`] separates "refused by a rule" (exit 1 in the `ca` binary) from usage
/// and I/O errors (exit 2).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// The directory holds no CA (no `ca.json`).
    #[error("no CA in {}", dir.display())]
    NoCa {
        /// The directory that was opened.
        dir: PathBuf,
    },
    /// `init` was pointed at a directory that already holds a CA or other files.
    #[error("{} already exists and is not empty; refusing to overwrite it", dir.display())]
    AlreadyExists {
        /// The directory that was given.
        dir: PathBuf,
    },
    /// A string that is not a valid SPIFFE ID.
    #[error("invalid SPIFFE ID `{input}`: {source}")]
    InvalidId {
        /// What was given.
        input: String,
        /// The rule it broke.
        #[source]
        source: IdError,
    },
    /// A SPIFFE ID outside the CA's trust domain.
    #[error("{id} is not in this CA's trust domain `{expected}`")]
    ForeignTrustDomain {
        /// The requested identity.
        id: SpiffeId,
        /// The CA's trust domain.
        expected: TrustDomain,
    },
    /// A DNS SAN that is not a valid DNS name.
    #[error("invalid DNS name `{name}`")]
    InvalidDnsName {
        /// What was given.
        name: String,
    },
    /// A zero or negative lifetime.
    #[error("the certificate lifetime must be positive")]
    ZeroTtl,
    /// The requested lifetime ends after the signing CA certificate expires.
    #[error(
        "the requested lifetime ends {requested}, after the signing CA certificate expires ({ca_not_after})"
    )]
    TtlBeyondCa {
        /// Requested not-after, RFC 3339.
        requested: String,
        /// The signing CA's not-after, RFC 3339.
        ca_not_after: String,
    },
    /// The CSR could not be parsed (not PEM/DER, not a PKCS#10 request, unsupported extension).
    #[error("malformed CSR {}: {detail}", path.display())]
    MalformedCsr {
        /// Where the CSR came from.
        path: PathBuf,
        /// What the parser said.
        detail: String,
    },
    /// The CSR parsed but its self-signature does not verify.
    #[error("the signature of CSR {} does not verify", path.display())]
    CsrSignature {
        /// Where the CSR came from.
        path: PathBuf,
    },
    /// A file could not be read or written.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done ("cannot read", "cannot write", ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The `--k8s-jwks` file of `ca serve` cannot be used.
    #[error("bad service-account JWKS file {}: {detail}", path.display())]
    K8sJwks {
        /// The file.
        path: PathBuf,
        /// What is wrong with it and what to do.
        detail: String,
    },
    /// The `--k8s-map` file of `ca serve` cannot be used.
    #[error("bad service-account mapping file {}: {detail}", path.display())]
    K8sMap {
        /// The file.
        path: PathBuf,
        /// What is wrong with it and what to do.
        detail: String,
    },
    /// A Kubernetes service-account token refused by `ca serve` (nothing is issued).
    #[error("{0}")]
    Jwt(#[from] crate::k8s::JwtRefusal),
    /// A CA file exists but its content is not what the CA wrote.
    #[error("corrupt CA file {}: {detail}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// A certificate file that is not a readable PEM certificate (chain).
    #[error("bad certificate {}: {detail}", path.display())]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// rcgen refused to build or sign something.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// No inventory record matches the serial given.
    #[error("no certificate with serial {serial} in the inventory")]
    UnknownSerial {
        /// The serial, hex.
        serial: String,
    },
    /// No unexpired, unrevoked certificate for this identity in the inventory.
    #[error("no valid certificate for {id} in the inventory")]
    UnknownIdentity {
        /// The identity.
        id: SpiffeId,
    },
    /// An unknown revocation reason name.
    #[error("unknown revocation reason `{reason}`")]
    UnknownReason {
        /// What was given.
        reason: String,
    },
    /// `root retire` found nothing to retire.
    #[error("there is only one active root; nothing to retire")]
    NothingToRetire,
    /// `root retire` refused: unexpired leaves still chain to an old root.
    #[error(
        "{count} unexpired, unrevoked, not yet re-issued certificate(s) still chain to the old root (first: serial {first_serial}, {first_id})"
    )]
    RootInUse {
        /// How many leaves.
        count: usize,
        /// One of them, hex.
        first_serial: String,
        /// Its identity (or `-` for custom certificates without one).
        first_id: String,
    },
    /// An output path (`--out`, `--crl`, a `rotate` directory) that lands inside the CA
    /// directory once links and `..` are resolved: writing it could replace the CA's keys or state.
    #[error("refusing to write {}: it is inside the CA directory {}{}", path.display(), dir.display(), resolved_note(path, resolved))]
    OutputInsideCa {
        /// The path as given.
        path: PathBuf,
        /// Where it resolves to.
        resolved: PathBuf,
        /// The CA directory (resolved).
        dir: PathBuf,
    },
    /// A certificate directory for `rotate` whose certificate is not ours to re-issue.
    #[error("cannot rotate {}: {detail}", dir.display())]
    NotRotatable {
        /// The certificate directory.
        dir: PathBuf,
        /// Why.
        detail: String,
    },
    /// A join token that this CA never issued (or that was pruned after expiring).
    #[error("unknown join token")]
    TokenUnknown,
    /// A join token past its expiry.
    #[error("the join token expired at {expired}")]
    TokenExpired {
        /// RFC 3339.
        expired: String,
    },
    /// A join token whose uses are spent.
    #[error("the join token was already used")]
    TokenUsed,
    /// An enrollment certificate asked for an identity under `/gatehouse/` (the CA's own).
    #[error("{id} is under /gatehouse/, reserved for the CA's own identities")]
    ReservedPath {
        /// The requested identity.
        id: SpiffeId,
    },
    /// The root key of a generation is offline and its stored CRL cannot stand in for a new one.
    #[error(
        "gen-{generation}/root.key is offline and its stored root CRL cannot be reused: {detail} ({})",
        path.display()
    )]
    RootCrlNeeded {
        /// The generation.
        generation: u32,
        /// Where the root CRL is stored.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// A renewal whose CSR carries the key of the certificate being renewed.
    #[error("the CSR carries the same public key as the certificate being renewed")]
    RenewSameKey,
    /// A renewal with a revoked certificate.
    #[error("certificate serial {serial} is revoked")]
    Revoked {
        /// The serial, hex.
        serial: String,
    },
    /// The shared store (`--store`) cannot be reached: nothing was issued or recorded.
    #[error("the CA store {store} is unavailable: {detail}")]
    StoreUnavailable {
        /// The store, without its password.
        store: String,
        /// What failed.
        detail: String,
    },
    /// A `--store` connection string or TLS setting that cannot work.
    #[error("CA store {store}: {detail}")]
    StoreConfig {
        /// The store, without its password.
        store: String,
        /// What is wrong.
        detail: String,
    },
    /// The PKCS#11 key store (module, token, PIN or key object) failed or is misconfigured.
    #[error("PKCS#11 key store: {detail}")]
    KeyStore {
        /// What failed, with the module/token/label involved (never the PIN).
        detail: String,
    },
}

/// ` (resolves to X)` when the path given is not where it lands.
fn resolved_note(path: &std::path::Path, resolved: &std::path::Path) -> String {
    if path == resolved {
        String::new()
    } else {
        format!(" (it resolves to {})", resolved.display())
    }
}

impl CaError {
    /// True when the request was understood and refused by a rule (exit 1); false for usage,
    /// input and I/O errors (exit 2).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::AlreadyExists { .. }
                | Self::ForeignTrustDomain { .. }
                | Self::TtlBeyondCa { .. }
                | Self::CsrSignature { .. }
                | Self::RootInUse { .. }
                | Self::NothingToRetire
                | Self::NotRotatable { .. }
                | Self::OutputInsideCa { .. }
                | Self::TokenUnknown
                | Self::TokenExpired { .. }
                | Self::TokenUsed
                | Self::RenewSameKey
                | Self::ReservedPath { .. }
                | Self::Revoked { .. }
                | Self::RootCrlNeeded { .. }
        )
    }

    pub(crate) fn io(
        action: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }
}
