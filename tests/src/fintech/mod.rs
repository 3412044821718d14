//! The FinTech scenario of the seed story, played by fake services over real Gatehouse sidecars.
//!
//! Layout:
//! - [`http`]: the plaintext HTTP toolkit the fakes share (server loop, request recorder, client).
//! - [`monolith`], [`report_service`], [`api_gateway`]: the three fake services; each is also a binary in
//!   `tests/src/bin/` so the demo and the end-to-end tests can start them as real processes.
//! - [`stack`], [`scenario`], [`probe`]: the demo's stack of processes, its checks, and the attacker's probe.
//! - [`online`]: the online mode (`fintech-demo --online`): enrollment with `ca serve`, renewal under load.
//!
//! The server loop, request recorder, listeners and clients they stand on are the one test harness's
//! ([`crate::harness::app`], [`crate::harness::client`]).
//!
//! The sidecar configurations they run behind live in `deploy/examples/fintech/`.

pub mod api_gateway;
pub mod monolith;
pub mod online;
pub mod probe;
pub mod report_service;
pub mod scenario;
pub mod stack;
