//! The sidecar configuration file: raw serde types mirroring the TOML as written
//! (`deny_unknown_fields`, spans kept) → a validation pass collecting *every* problem with its
//! `file:line:col` → the [`Config`] runtime code uses (socket addresses, durations, absolute paths).
//!
//! Format (every key: docs/CONFIG.md, checked by tests/tests/docs_reference.rs):
//! ```toml
//! min_tls = "1.3"                     # or under [tls]; "1.2" only when configured
//! [identity]  cert, key, bundle, crl  # paths relative to this file
//!             crl_stale (refuse|unready|warn, default refuse), crl_grace (default 1h)
//! [inbound]   listen, app, policy, limits and timeouts with safe defaults, among them
//!             send_timeout (30s: a response making no progress is aborted, its app connection
//!             closed), max_h2_resets (200) per h2_reset_window (10s: client RST_STREAMs before
//!             GOAWAY(ENHANCE_YOUR_CALM))
//! [[outbound]] name, listen, connect, server_id, sni, allow_non_loopback_listen
//! [admin]     listen
//! [audit]     enabled (default true), path (default stdout), flush_interval (default 100ms, 0 = every line)
//! [reload]    watch, debounce, poll_interval, allow_identity_change (DANGEROUS)
//! [runtime]   worker_threads          # event loops, default 1 (see RuntimeConfig)
//! ```
//! Knobs that weaken security say so in their name (`insecure_app_address`,
//! `allow_non_loopback_listen`, `allow_identity_change`) and are logged as warnings at startup.
//! Reading certificates and the policy is not done here: see `state.rs`.
//!
//! Layout: `raw` (the serde mirror) → `validate` (every check, positions) → `model` (what
//! the runtime reads); `error` the problems; `defaults` every default, one constant each,
//! which the runtime uses too (it has no defaults of its own).

mod defaults;
mod error;
mod model;
mod raw;
mod validate;

pub(crate) use defaults::*;
pub(crate) use error::{ConfigError, ConfigErrorKind};
pub use model::*;
pub(crate) use validate::Check; // issue 17: tcp/config.rs validates its tables in the same pass

#[cfg(test)]
mod tests;
