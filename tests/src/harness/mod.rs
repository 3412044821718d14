//! The one test harness for real-process, real-TLS tests, used by the end-to-end tests in
//! `tests/tests/` and by the FinTech scenario (`crate::fintech`) and its demo binaries alike:
//! - [`pki`]: test certificates, minted one way: a `gatehouse-ca` [`Authority`](gatehouse_ca::Authority)
//!   in a temp dir ([`Pki`]) issuing real SVIDs and, through `sign_custom`, deliberately broken
//!   ones; plus the real `ca` CLI ([`ca_ok`], [`ca_json`]) where the CLI is what is under test;
//! - [`app`]: the fake services behind a sidecar: [`FakeApp`] (records every request, can answer
//!   slowly or with large bodies) and the plaintext HTTP/1.1 + h2c server loop ([`app::serve`]) the
//!   FinTech services run on;
//! - [`sidecar`]: writes a config, spawns the real `sidecar` binary, waits for `/readyz`,
//!   collects the audit lines from stdout, can send SIGTERM, and kills it on drop;
//! - [`ca_serve`]: the online CA: a `ca init` directory with join tokens and the inventory
//!   ([`CaSandbox`]) and the real `ca serve` ([`CaServe`]), alone or as replicas on PostgreSQL;
//! - [`client`]: [`MtlsClient`] (a rustls client with a chosen certificate, speaking HTTP/1.1
//!   or h2), the one test [`ServerCertVerifier`](rustls::client::danger::ServerCertVerifier)
//!   ([`client::AnyServer`]), the plaintext [`client::HttpClient`] and [`raw_exchange`] (exact
//!   request bytes in, one response out);
//! - [`protocols`]: the real gRPC and WebSocket peers (`tests/protocols/*.py`, issue 17);
//! - [`wait`]: waiting on a condition ([`eventually`], [`wait::until`]) instead of fixed sleeps;
//! - [`fixtures`]: the policy texts several test files share.
//!
//! Ports: every listener is configured as `127.0.0.1:0`; the sidecar logs `listening <name> on
//! <addr>` to stderr once bound and the harness reads the addresses from there, so parallel
//! tests never race for a port. A listener whose port must be written down before it binds
//! (PostgreSQL, a config read by another process) takes [`free_port`] on a loopback address of
//! its own: the fleet on `127.0.1–3.k` and `127.0.11–13.k`, the FinTech test's extra sidecar
//! and an absent CA on `127.0.8.x`, PostgreSQL on `127.0.9.1`.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

pub mod app;
pub mod ca_serve;
pub mod client;
pub mod fixtures;
pub mod pki;
pub mod process;
pub mod protocols;
pub mod sidecar;
pub mod wait;

pub use app::{FakeApp, Generated, Seen};
pub use ca_serve::{CaSandbox, CaServe};
pub use client::{MtlsClient, Proto, RawResponse, Resp, http_get, raw_exchange, tcp_connect_from};
pub use pki::{CertDir, Pki, ca_json, ca_ok};
pub use sidecar::{
    Sidecar, SidecarBuilder, metric_sum, sidecar_cli, sidecar_status, terminate, wait_status,
};
pub use wait::{closed_by_peer, eventually};

/// How long to wait for a sidecar to become ready (a loaded 2-core CI machine is slow).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The FinTech trust domain of the two-sidecar tests.
pub const FINTECH_TD: &str = fixtures::TD;
/// The monolith's SPIFFE ID (the inbound, server side).
pub const MONOLITH_ID: &str = fixtures::MONOLITH;
/// The report service's SPIFFE ID (the outbound, client side).
pub const REPORT_SERVICE_ID: &str = fixtures::REPORTS;
pub use fixtures::REPORT_EXPORT_POLICY;

/// A TCP port free on `ip` right now, for a listener whose address must be known before it
/// binds. `ip` must be a loopback address no other test binds: connections from `127.0.0.1`
/// take their ephemeral ports there, not on `ip`, so the port is still free when the listener
/// binds it (on `127.0.0.1` it could be taken in between).
///
/// # Errors
/// When `ip` cannot be bound.
pub fn free_port(ip: IpAddr) -> std::io::Result<u16> {
    Ok(TcpListener::bind(SocketAddr::new(ip, 0))?
        .local_addr()?
        .port())
}

/// The path of a workspace binary, `target/debug/<name>`: next to the running executable when
/// that is a binary of the workspace (`target/debug/fleet-demo`), one level up when it is a test
/// executable (`target/debug/deps/<test>`).
///
/// # Panics
/// When the binary is missing: run `cargo build --workspace --bins` first.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the running executable has a path");
    let parent = exe.parent().expect("an executable lives in a directory");
    // target/debug/deps/<test> → target/debug/<name>; target/debug/<bin> → target/debug/<name>
    let dir = if parent.file_name().is_some_and(|n| n == "deps") {
        parent.parent().expect("deps/ has a parent")
    } else {
        parent
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}
