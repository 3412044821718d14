//! Gatehouse policy: the identity vocabulary (SPIFFE IDs, trust domains, identity patterns),
//! the policy file model and its compiled matcher, and the review tools behind the `policy`
//! CLI. Pure: no sockets, no TLS, no async runtime; it reads only the files it is handed.
//!
//! Layout:
//! - `identity`: [`SpiffeId`], [`TrustDomain`], [`IdentityPattern`];
//! - `source`: [`SourceFile`] and the [`Diagnostic`] every binary renders;
//! - `file` (private): the TOML as written; `compile`: validation into a [`Policy`];
//! - [`path`]: request path normalization, shared with the sidecar;
//! - `matcher`: the segment trie behind [`Policy::decide`] and its [`Decision`];
//! - [`review`], [`diff`], [`explain`]: what `policy check`, `policy diff` and
//!   `policy explain` compute.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod compile;
mod file;
pub mod identity;
mod matcher;
pub mod path;
mod source;

pub use compile::{Alias, Policy, SUPPORTED_VERSION};
pub use identity::{IdError, IdentityPattern, SpiffeId, TrustDomain};
pub use matcher::{AllowEntry, Decision, DenyReason, METHODS, Route};
pub use source::{Diagnostic, SourceFile};
