//! Gatehouse policy: the identity vocabulary (SPIFFE IDs, trust domains, identity patterns),
//! the policy file model and its compiled matcher, and the review tools behind the `policy`
//! CLI. Pure: no sockets, no TLS, no async runtime; it reads only the files it is handed.
//!
//! Layout:
//! - [`identity`]: [`SpiffeId`], [`TrustDomain`], [`IdentityPattern`];
//! - `source`: [`SourceFile`] and the [`Diagnostic`] every binary renders;
//! - `file` (the TOML as written) and `compile` (validation into a [`Policy`], every error at
//!   once with `file:line:col`);
//! - [`limit`]: the `[[limit]]` overload limits and their lookup by caller and route;
//! - [`path`]: request path normalization, shared with the sidecar;
//! - [`method`]: the method spelling check (non-canonical `get` refused), shared with the sidecar;
//! - `matcher`: the segment trie behind [`Policy::decide`] and its [`Decision`];
//! - [`review`], [`diff`], [`explain`], [`cases`]: what `policy check`, `policy diff`,
//!   `policy explain` and `policy test` compute (`probe` samples requests for the first two);
//! - [`fleet`] (and `fleet_html`): `policy explain --fleet DIR…`, the map of who can call what
//!   across many services, built from the same matrices and review findings;
//! - [`stdout`]: standard output for the `ca`, `policy` and `sidecar` binaries (a reader that
//!   stopped reading is not a panic), with the [`outln!`] and [`out!`] macros.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod cases;
mod compile;
pub mod diff;
pub mod explain;
mod file;
pub mod fleet;
mod fleet_html;
pub mod identity;
pub mod limit;
mod matcher;
pub mod method;
pub mod path;
mod probe;
pub mod review;
mod source;
pub mod stdout;
mod tcp; // issue 17: `[[tcp]]` entries

pub use compile::{Alias, CallerError, Policy, SUPPORTED_VERSION};
pub use identity::{IdError, IdentityPattern, SpiffeId, TrustDomain};
pub use limit::{Limit, Rate};
pub use matcher::{AllowEntry, Decision, DenyReason, METHODS, Route};
pub use source::{Diagnostic, SourceFile};
pub use tcp::{TcpDecision, TcpEntry}; // issue 17
