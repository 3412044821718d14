//! Gatehouse private CA: one CA per SPIFFE trust domain, issuing X.509-SVIDs.
//!
//! Layout (one verb per module):
//! - [`authority`]: the CA directory (`ca.json`, `gen-N/` keys and certificates, `bundle.pem`,
//!   `inventory.jsonl`, the `.lock` file), `init`/`open`, root rotation and retirement.
//! - [`profile`]: the X.509-SVID profile (X509-SVID §4: one URI SAN, `CA:FALSE`, key usage
//!   `digitalSignature` critical, EKU serverAuth + clientAuth) and the CA certificate profile.
//! - [`issue`] ([`Authority::issue`], [`Authority::sign_custom`]), [`csr`] ([`Authority::sign_csr`]),
//!   [`rotate`] (re-issue certificate directories inside their renewal window),
//!   [`revoke`] (revocation and CRLs), [`inventory`] (the append-only JSON-lines ledger),
//!   [`inspect`] (what a certificate file says, and whether it verifies with webpki).
//! - [`token`] (one-time join tokens), [`serve`] (`ca serve`, the HTTPS enrollment service) and
//!   [`api`] (its JSON types, shared with enrollment clients).
//! - [`store`]: atomic writes (temp file + rename), private keys 0600, and the versioned
//!   certificate directory with its `..data` symlink swap.
//!
//! What does not live here: TLS (the sidecar verifies peers; this crate only checks chains with
//! webpki for `inspect`), and policy. The trust domain is enforced by the sidecar's verifier, not
//! by X.509 name constraints (webpki rejects URI name constraints).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod admission;
pub mod api;
pub mod authority;
pub mod chain_bounds;
pub mod csr;
mod error;
pub mod inspect;
pub mod inventory;
pub mod issue;
pub mod k8s;
pub mod keystore;
pub mod ledger;
pub mod pg;
pub mod profile;
mod records;
pub mod revoke;
pub mod rotate;
pub mod serve;
pub mod store;
pub mod token;

pub use authority::{Authority, InitOptions, KeyType};
pub use error::CaError;
pub use gatehouse_policy::identity::{SpiffeId, TrustDomain};
pub use issue::{IssueRequest, Svid};
