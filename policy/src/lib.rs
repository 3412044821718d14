//! Gatehouse policy: the identity vocabulary (SPIFFE IDs, trust domains, identity patterns),
//! the policy file model and its compiled matcher. Pure: no sockets, no TLS, no async runtime.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod identity;

pub use identity::{IdError, IdentityPattern, SpiffeId, TrustDomain};
