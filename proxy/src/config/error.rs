//! What is wrong with a configuration file: one [`ConfigError`] per problem, with its
//! `file:line:col` and a `help:` line.

use std::net::SocketAddr;
use std::path::PathBuf;

#[cfg(doc)]
use super::defaults::MAX_AUDIT_FLUSH_INTERVAL;
use super::defaults::MAX_WORKER_THREADS;

/// One problem found in the configuration file.
#[derive(Debug, thiserror::Error)]
#[error("{}: {kind}", self.location())]
pub struct ConfigError {
    /// The configuration file.
    pub file: PathBuf,
    /// 1-based line and column of the offending value, when known.
    pub position: Option<(usize, usize)>,
    /// What is wrong.
    #[source]
    pub kind: ConfigErrorKind,
}

impl ConfigError {
    /// `file:line:col`, or just `file` when there is no position (the file could not be read).
    pub fn location(&self) -> String {
        match self.position {
            Some((line, col)) => format!("{}:{line}:{col}", self.file.display()),
            None => self.file.display().to_string(),
        }
    }

    /// What to do about it.
    pub fn help(&self) -> String {
        self.kind.help()
    }
}

/// What is wrong with a configuration value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// The file could not be read: missing, not a regular file, too large
    /// ([`crate::input::read`]).
    #[error("{}", .0.problem)]
    Read(crate::input::FileError),
    /// TOML syntax error, unknown key, missing key or wrong type.
    #[error("{0}")]
    Syntax(String),
    /// Not an `IP:PORT` socket address.
    #[error("`{value}` is not an IP:PORT socket address")]
    Address {
        /// The value as written.
        value: String,
    },
    /// Not a `HOST:PORT` pair.
    #[error("`{value}` is not HOST:PORT")]
    HostPort {
        /// The value as written.
        value: String,
    },
    /// `dns_max_ttl` below `dns_min_ttl`.
    #[error("`outbound.dns_max_ttl` ({}) is below `outbound.dns_min_ttl` ({})", humantime::format_duration(*.max_ttl), humantime::format_duration(*.min_ttl))]
    TtlRange {
        /// The minimum.
        min_ttl: std::time::Duration,
        /// The maximum.
        max_ttl: std::time::Duration,
    },
    /// Not a duration.
    #[error("`{value}` is not a duration")]
    Duration {
        /// The value as written.
        value: String,
    },
    /// A zero or otherwise unusable number or duration.
    #[error("`{key}` must be greater than zero")]
    Zero {
        /// The key.
        key: &'static str,
    },
    /// Unknown TLS version.
    #[error("`{value}` is not a supported minimum TLS version")]
    MinTls {
        /// The value as written.
        value: String,
    },
    /// Unknown `[identity] crl_stale` action.
    #[error("`{value}` is not a `crl_stale` action")]
    CrlStale {
        /// The value as written.
        value: String,
    },
    /// `min_tls` given both at the top level and under `[tls]`.
    #[error("`min_tls` is set twice (top level and [tls])")]
    MinTlsTwice,
    /// A SPIFFE ID that does not parse.
    #[error("invalid SPIFFE ID `{value}`: {source}")]
    SpiffeId {
        /// The value as written.
        value: String,
        /// The broken rule.
        source: gatehouse_policy::IdError,
    },
    /// The app address is not loopback and `insecure_app_address` is not set.
    #[error("the app address {addr} is not a loopback address")]
    NonLoopbackApp {
        /// The address.
        addr: SocketAddr,
    },
    /// An outbound listener on a non-loopback address without the explicit opt-in.
    #[error("outbound `{name}` listens on {addr}, which is not a loopback address")]
    NonLoopbackOutbound {
        /// The outbound entry.
        name: String,
        /// The address.
        addr: SocketAddr,
    },
    /// Two `[[outbound]]` entries share a name.
    #[error("outbound name `{name}` is used twice")]
    DuplicateOutbound {
        /// The name.
        name: String,
    },
    /// An empty string where a name or path is needed.
    #[error("`{key}` must not be empty")]
    Empty {
        /// The key.
        key: &'static str,
    },
    /// Neither `[inbound]` nor any `[[outbound]]`.
    #[error("nothing to do: the config has neither [inbound] nor [[outbound]]")]
    NoListener,
    /// A listen address used twice.
    #[error("listen address {addr} is used twice")]
    DuplicateListen {
        /// The address.
        addr: SocketAddr,
    },
    /// `[audit] flush_interval` longer than [`MAX_AUDIT_FLUSH_INTERVAL`].
    #[error("`audit.flush_interval` = `{value}` is longer than the maximum of 10s")]
    AuditFlushInterval {
        /// The value as written.
        value: String,
    },
    /// `[identity]` names neither files nor an online CA, or lacks one of the files.
    #[error("[identity] has no `{key}`")]
    IdentityMissing {
        /// The missing key.
        key: &'static str,
    },
    /// A file key together with `ca = …`.
    #[error("[identity] `{key}` cannot be combined with `ca` (online identity)")]
    IdentityConflict {
        /// The file key.
        key: &'static str,
    },
    /// A file-mode key given without `ca`.
    #[error("[identity] `{key}` only applies with `ca = …` (online identity)")]
    IdentityOnlineOnly {
        /// The key.
        key: &'static str,
    },
    /// A problem with the online-identity keys.
    #[error("{}", .0.problem)]
    Online(crate::identity::IdentityConfigError),
    /// `[runtime] worker_threads` above [`MAX_WORKER_THREADS`].
    #[error("`runtime.worker_threads` = {value} is more than the maximum of {MAX_WORKER_THREADS}")]
    WorkerThreads {
        /// The value as written.
        value: u64,
    },
}

impl ConfigErrorKind {
    /// The `help:` line.
    pub fn help(&self) -> String {
        match self {
            Self::Read(e) => e.help(),
            Self::Syntax(_) => "fix the TOML; every key is documented in docs/CONFIG.md".into(),
            Self::Address { .. } => "write an IP address and port, e.g. \"127.0.0.1:8443\"".into(),
            Self::HostPort { .. } => {
                "write a host name or IP and a port, e.g. \"monolith.internal:8443\"".into()
            }
            Self::Duration { .. } => "write a duration such as \"10s\", \"500ms\" or \"2m\"".into(),
            Self::Zero { .. } => "use a positive value or remove the key for the default".into(),
            Self::MinTls { .. } => "use \"1.3\" (default) or \"1.2\"".into(),
            Self::MinTlsTwice => "keep one of the two".into(),
            Self::CrlStale { .. } => "use \"refuse\" (default), \"unready\" or \"warn\"".into(),
            Self::SpiffeId { .. } => "write spiffe://<trust-domain>/<path>".into(),
            Self::NonLoopbackApp { .. } => "the sidecar forwards plaintext to the app: keep it on \
                 127.0.0.1, or set `insecure_app_address = true` if the network path is trusted"
                .into(),
            Self::NonLoopbackOutbound { .. } => "outbound listeners accept unauthenticated \
                 plaintext: listen on 127.0.0.1, or set `allow_non_loopback_listen = true` \
                 for this entry if only the app can reach the address"
                .into(),
            Self::DuplicateOutbound { .. } => "give each [[outbound]] entry its own name".into(),
            Self::Empty { .. } => "give it a value".into(),
            Self::TtlRange { .. } => "raise `dns_max_ttl` or lower `dns_min_ttl` (defaults: \
                 5s and 60s)"
                .into(),
            Self::NoListener => {
                // issue 17
                "add an [inbound] section, an [[outbound]] entry or a [[tcp_inbound]]/[[tcp_outbound]] entry".into()
            }
            Self::DuplicateListen { .. } => "give each listener its own port".into(),
            Self::AuditFlushInterval { .. } => "buffered audit lines are lost if the process \
                 is killed: use \"100ms\" (default), at most \"10s\", or \"0\" to write every \
                 line at once"
                .into(),
            Self::IdentityMissing { .. } => "give `cert`, `key` and `bundle` (files from `ca \
                 issue`), or `ca`, `spiffe_id`, `ca_bundle` and one bootstrap credential to \
                 enroll online with `ca serve`"
                .into(),
            Self::IdentityConflict { .. } => "an online identity gets its SVID, bundle and CRLs \
                 from the CA: remove `cert`, `key`, `bundle` and `crl`, or remove `ca` to use \
                 files"
                .into(),
            Self::IdentityOnlineOnly { .. } => {
                "add `ca = \"https://…\"` to enroll online, or remove the key".into()
            }
            Self::Online(e) => e.help.clone(),
            Self::WorkerThreads { .. } => "use at most one event loop per core the sidecar may \
                 use (`nproc`); 1 (the default) is the cheapest per request"
                .into(),
        }
    }
}
