//! Gatehouse test harness and fake services.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
pub mod dns;
pub mod docs;
pub mod fintech;
pub mod fleet;
pub mod harness;
pub mod load;
pub mod postgres; // issue 17: a real PostgreSQL for the TCP-mode tests
