//! Gatehouse sidecar library: the `sidecar` binary only parses arguments, calls into here and
//! renders errors.
//!
//! Layout:
//! - [`config`]: the sidecar TOML → validated [`config::Config`];
//! - [`tls`]: credentials loading, X.509-SVID rules, the SPIFFE verifier, server and client
//!   configs, swappable certificate resolver;
//! - [`input`]: the one reader of configured files (regular files only, size limits, never
//!   blocking on a FIFO) and the watched inputs a snapshot is built from;
//! - [`state`]: the [`state::Snapshot`] (credentials, policy, inbound and outbound TLS) built by
//!   the one path startup and reload share, and the trust generation outbound pools follow;
//! - [`inbound`]: mTLS termination, per-route policy, forwarding to the app;
//! - [`outbound`]: plaintext from the app, mTLS to the peer sidecar with its identity pinned
//!   (the pools dial with the current snapshot's TLS: `outbound::tls_source`);
//! - [`admin`], [`metrics`], [`audit`]: observability;
//! - [`reload`]: hot reload of certificate, key, bundle, CRL and policy (file events, polling,
//!   SIGHUP), revocation reaching live connections, expiry metrics, typed refusals
//!   (`reload/{mod,apply,watch,expiry,status,error}.rs`); its module docs are the "Reload and
//!   rotation" design note;
//! - [`signal`]: signals, cancellation and the drain of connection tasks;
//! - [`run`]: the load path shared by `sidecar check` and `sidecar run`, and the run loop;
//! - [`h2body`]: request and response bodies on the sidecar-to-sidecar HTTP/2 hop;
//! - [`error`]: load errors with their `help:` lines, and refusals as HTTP responses.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod accept;
pub mod admin;
pub mod audit;
pub mod config;
pub mod error;
pub mod h2body;
pub mod headers;
pub mod inbound;
pub mod input;
pub mod metrics;
pub mod outbound;
pub mod reload;
pub mod run;
pub mod signal;
pub mod state;
pub mod tcp; // issue 17: TCP mode
pub mod tls;
