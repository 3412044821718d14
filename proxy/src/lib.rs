//! Gatehouse sidecar library: the `sidecar` binary only parses arguments, calls into here and
//! renders errors.
//!
//! Layout, from the bottom up (no module imports one that imports it back):
//! - [`http`]: the HTTP layer both sides stand on, below every policy decision: the HTTP/2
//!   server and client on `h2`, request and response bodies, the headers we own and strip
//!   (one `x-request-id` rule), the one HTTP/1.1 keep-alive pool, a connection's activity for
//!   its idle and send timeouts, the one JSON error body, lingering close of accepted
//!   sockets, gRPC answers and WebSocket tunnels;
//! - [`config`]: the sidecar TOML → validated [`config::Config`];
//! - [`tls`]: credentials loading, X.509-SVID rules, the SPIFFE verifier, server and client
//!   configs, swappable certificate resolver, the TLS alert tap;
//! - [`input`]: the one reader of configured files (regular files only, size limits, never
//!   blocking on a FIFO) and the watched inputs a snapshot is built from; [`policy_file`]: the
//!   one policy reader (the `[inbound]` policy and every `[[tcp_inbound]]` one);
//! - [`state`]: the [`state::Snapshot`] (credentials, policy, inbound and outbound TLS) built by
//!   the one path startup and reload share, and the trust generation outbound pools follow;
//! - [`outcome`]: what became of one request ([`outcome::Outcome`]): its status, metric labels
//!   and audit fields, on both sides;
//! - [`inbound`] and [`outbound`], which mirror each other (`listener → conn → request →
//!   upstream`) and hold identity, policy, forwarding, audit and metrics only: inbound
//!   terminates mTLS, decides per route and forwards to the app; outbound takes plaintext from
//!   the app and originates mTLS to the peer sidecar with its identity pinned (`upstream`
//!   balances over the endpoints' `pool`s, which dial with the current snapshot's TLS:
//!   `outbound::tls_source`);
//! - [`accept`]: accepting connections (spread over event loops, the shared accept limiter);
//! - [`admin`], [`metrics`], [`audit`]: observability;
//! - [`reload`]: hot reload of certificate, key, bundle, CRL and policy (file events, polling,
//!   SIGHUP), revocation reaching live connections, expiry metrics, typed refusals
//!   (`reload/{mod,apply,watch,expiry,status,error}.rs`); its module docs are the "Reload and
//!   rotation" design note;
//! - [`signal`]: signals, cancellation and the drain of connection tasks;
//! - [`tcp`]: TCP mode (`[[tcp_inbound]]`/`[[tcp_outbound]]`, issue 17): mTLS around a byte
//!   stream, decided once per connection by the policy's `[[tcp]]` entry (`tcp/listen.rs`: the
//!   listeners at run time);
//! - [`run`]: the load path shared by `sidecar check` and `sidecar run`, and the run loop;
//! - `balance`: per-request balancing over an outbound's endpoints (p2c over peak-EWMA, slow
//!   start, ejection, DNS discovery, the retry budget), used by `outbound::upstream`;
//! - [`limits`]: per-caller budgets for the policy's `[[limit]]`s, one limiter per snapshot,
//!   asked by inbound after the policy allows a request;
//! - [`error`]: load errors with their `help:` lines, and inbound refusals as HTTP responses.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(unreachable_pub)]

mod accept;
mod admin;
mod audit;
// Public (hidden) only for tests/tests/discovery.rs, which drives discovery against dnsmasq.
#[doc(hidden)]
pub mod balance;
mod config;
mod error;
mod hexdigits;
mod http;
#[doc(hidden)]
// Public (hidden) only for tests/tests/enroll_client.rs, which drives the enrollment client with
// test timings and inspects the in-memory material; the sidecar binary is tested end to end in
// tests/tests/online_identity.rs.
pub mod identity;
mod inbound;
mod input;
mod limits;
mod metrics;
mod outbound;
mod outcome;
mod policy_file;
mod reload;
mod run;
mod signal;
mod state;
mod tcp; // issue 17: TCP mode
mod tls;

// The library's surface: what the `sidecar` binary and the fuzz targets (`fuzz/`) use. Everything
// else is crate-private (`unreachable_pub` keeps it so).
pub use audit::{
    Sink as AuditSink, Verified as AuditVerified, install as install_audit_sink,
    verify as verify_audit,
};
pub use config::Config;
pub use error::LoadError;
pub use run::{Loaded, check_online, load, run, run_online};
pub use signal::Shutdown;

/// What the fuzz targets in `fuzz/` drive: the sidecar config parser, the PEM loaders, the
/// credential checks and the client verifier. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::config::{Config, CrlPolicy};
    pub use crate::input::{FileKind, Input};
    pub use crate::tls::verify::SpiffeClientVerifier;
    pub use crate::tls::{
        CredentialFiles, Credentials, TlsError, leaf_identity, load_bundle, load_chain, load_crls,
        load_key, provider, serial_hex, svid_identity,
    };
}
