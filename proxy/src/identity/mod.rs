//! Online identity (`[identity] ca = …`, issue 16): the sidecar makes its key in memory, enrolls
//! with `ca serve`, renews before expiry and fetches the bundle and the CRLs.
//!
//! - [`config`]: the TOML keys and their validation;
//! - [`key`]: the in-memory key and its CSR;
//! - [`client`]: the HTTPS client of the CA's API v1, pinning the CA's SVID;
//! - [`driver`]: enrollment, renewal with back-off, bundle/CRL polling, `/status` and metrics.
//!
//! What the wiring calls: [`OnlineIdentityRaw::validate`], then [`driver::spawn`] with the
//! sidecar's provider, [`IdentityMetrics::register`] on the metrics registry and the run's
//! cancellation token; it waits on [`IdentityHandle::ready`] before building the first snapshot
//! and rebuilds on each change of [`IdentityHandle::subscribe`].

pub mod client;
pub mod config;
pub mod driver;
pub mod key;

/// The crypto provider the client uses (aws-lc-rs, our one provider), for callers of [`spawn`].
pub use crate::tls::provider;
pub use config::{Bootstrap, IdentityConfigError, OnlineIdentity, OnlineIdentityRaw};
pub use driver::{
    IdentityHandle, IdentityMetrics, IdentityStatus, Material, Tuning, check_bootstrap, spawn,
};
