//! Gatehouse sidecar library: the `sidecar` binary only parses arguments, calls into here and
//! renders errors.
//!
//! Layout:
//! - [`config`]: the sidecar TOML → validated [`config::Config`];
//! - [`tls`]: credentials loading, X.509-SVID rules, the SPIFFE verifier, server and client
//!   configs, swappable certificate resolver;
//! - [`input`]: the one reader of configured files (regular files only, size limits, never
//!   blocking on a FIFO) and the watched inputs a snapshot is built from;
//! - [`state`]: the [`state::Snapshot`] (credentials, policy, TLS) every connection holds;
//! - [`inbound`]: mTLS termination, per-route policy, forwarding to the app;
//! - [`outbound`]: plaintext from the app, mTLS to the peer sidecar with its identity pinned;
//! - [`admin`], [`metrics`], [`audit`]: observability;
//! - [`reload`]: hot reload of certificate, key, bundle, CRL and policy (file events, polling,
//!   SIGHUP), revocation reaching live connections, expiry metrics; its module docs are the
//!   "Reload and rotation" design note;
//! - [`signal`]: signals, cancellation and the drain of connection tasks;
//! - [`run`]: the load path shared by `sidecar check` and `sidecar run`, and the run loop;
//! - [`balance`]: per-request balancing over an outbound's endpoints (issue 15);
//! - [`limits`]: per-caller budgets for the policy's `[[limit]]`s (issue 15);
//! - [`h2body`]: request and response bodies on the sidecar-to-sidecar HTTP/2 hop;
//! - [`error`]: load errors with their `help:` lines, and refusals as HTTP responses.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod accept;
pub mod admin;
pub mod audit;
// Wired into outbound in the next step (issue 15).
#[allow(dead_code)]
pub mod balance;
pub mod config;
pub mod error;
pub mod h2body;
pub mod headers;
pub mod inbound;
pub mod input;
// Wired into inbound in the next step (issue 15).
#[allow(dead_code)]
pub mod limits;
pub mod metrics;
pub mod outbound;
pub mod reload;
pub mod run;
pub mod signal;
pub mod state;
pub mod tls;
