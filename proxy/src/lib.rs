//! Gatehouse sidecar library: the `sidecar` binary only parses arguments, calls into here and
//! renders errors.
//!
//! Layout:
//! - [`config`]: the sidecar TOML → validated [`config::Config`];
//! - [`tls`]: credentials loading, X.509-SVID rules, the SPIFFE verifier, server config,
//!   swappable certificate resolver;
//! - [`metrics`]: the Prometheus families (`gatehouse_*`);
//! - [`signal`]: signals, cancellation and the drain of connection tasks.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod config;
pub mod metrics;
pub mod outbound;
pub mod signal;
pub mod tls;
